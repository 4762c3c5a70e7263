"""A gallery index on disk: one folder, written atomically, that is safe to open (faiss's own
format, CSV and JSON; nothing is unpickled).

    INDEX/manifest.json   format version; fingerprint of what made the vectors (checkpoint
                          path and sha256 of its weights, preprocessing, embedding size);
                          faiss index kind and parameters; item count; measured recall of an
                          approximate index against exact search
         /index.faiss     the vectors with their int64 ids (``faiss.write_index``), inner
                          product on L2-normalised embeddings (cosine similarity)
         /items.csv       id, path, label: one row per gallery item (label empty when unknown)

Kinds: ``flat`` (``IndexIDMap2`` over ``IndexFlatIP``: exact), ``ivf`` (``IndexIVFFlat``,
inner product, ``nlist`` lists, ``nprobe`` searched; ids kept in a hash-table direct map so
that vectors can be read back), ``hnsw`` (``IndexIDMap2`` over ``IndexHNSWFlat``, ``m``
links, ``ef_search``; removing items rebuilds the graph, which faiss cannot unlink).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Deferred import: faiss (optional, slow to import), inside _faiss().

__all__ = [
    "FORMAT",
    "KINDS",
    "IndexFileError",
    "Items",
    "faiss_parameters",
    "new_faiss_index",
    "read_index_folder",
    "reconstruct",
    "write_index_folder",
]

FORMAT = "deepmetric-index-1"
KINDS = ("flat", "ivf", "hnsw")
MANIFEST, FAISS_FILE, ITEMS = "manifest.json", "index.faiss", "items.csv"


class IndexFileError(ValueError):
    """An index folder that cannot be used as it is: the message names the file."""


@dataclass
class Items:
    """The gallery items, row i = faiss id ``ids[i]``."""

    ids: np.ndarray  # (N,) int64, stable: never reused after a removal
    paths: list[str]  # (N,) the item ids users see (image paths)
    labels: list[str | None]  # (N,) labels when known
    row_of: dict[str, int] = field(default_factory=dict)  # path -> row

    def __post_init__(self) -> None:
        self.row_of = {p: i for i, p in enumerate(self.paths)}

    def __len__(self) -> int:
        return len(self.paths)


def _faiss() -> Any:
    import faiss

    return faiss


def faiss_parameters(kind: str, count: int, options: dict[str, Any]) -> dict[str, Any]:
    """The parameters of a new index of ``kind`` for ``count`` vectors: ``nlist`` (default
    4 sqrt(N), at most N / 39 so that k-means has its 39 points per list) and ``nprobe``
    (default nlist / 8, at least 8) for ivf; ``m`` (32) and ``ef_search`` (128) for hnsw."""
    if kind == "flat":
        return {}
    if kind == "ivf":
        nlist = int(options.get("nlist") or max(1, min(round(4 * math.sqrt(count)), count // 39)))
        nprobe = int(options.get("nprobe") or min(nlist, max(8, nlist // 8)))
        return {"nlist": nlist, "nprobe": nprobe}
    if kind == "hnsw":
        return {
            "m": int(options.get("m") or 32),
            "ef_construction": int(options.get("ef_construction") or 80),
            "ef_search": int(options.get("ef_search") or 128),
        }
    raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")


def new_faiss_index(kind: str, dim: int, params: dict[str, Any], train: np.ndarray) -> Any:
    """An empty faiss index of ``kind`` over ``dim``-d vectors (ivf: trained on ``train``,
    (M, dim) float32, with faiss's k-means seed 1234)."""
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.train(np.ascontiguousarray(train, dtype=np.float32))
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.nprobe = params["nprobe"]
        return index
    hnsw = faiss.IndexHNSWFlat(dim, params["m"], faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = params["ef_construction"]
    hnsw.hnsw.efSearch = params["ef_search"]
    return faiss.IndexIDMap2(hnsw)


def set_search_parameters(index: Any, kind: str, params: dict[str, Any]) -> None:
    """Apply the recorded search-time parameters (nprobe, efSearch) after loading."""
    faiss = _faiss()
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    elif kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = params["ef_search"]


def reconstruct(index: Any, ids: np.ndarray) -> np.ndarray:
    """The stored vectors of ``ids`` (N,), as (N, d) float32."""
    if len(ids) == 0:
        return np.zeros((0, index.d), dtype=np.float32)
    return np.stack([index.reconstruct(int(i)) for i in ids]).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------- files


def write_index_folder(path: Path, manifest: dict[str, Any], index: Any, items: Items) -> None:
    """Write the folder atomically: everything goes into a temporary folder beside ``path``,
    which then takes its place (an existing index is moved aside first and deleted after), so
    an interrupted write never leaves a half index at ``path``."""
    faiss = _faiss()
    path = Path(path)
    if path.exists() and not (path / MANIFEST).is_file():
        raise IndexFileError(f"{path} exists and is not a deepmetric index; choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        faiss.write_index(index, str(tmp / FAISS_FILE))
        with open(tmp / ITEMS, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(["id", "path", "label"])
            for i, p, label in zip(items.ids.tolist(), items.paths, items.labels):
                out.writerow([i, p, "" if label is None else label])
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for name in (FAISS_FILE, ITEMS, MANIFEST):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "index")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_index_folder(path: Path) -> tuple[dict[str, Any], Any, Items]:
    """(manifest, faiss index, items) of an index folder, checked for consistency.

    Raises:
        IndexFileError: a missing, unreadable or inconsistent file, named.
    """
    faiss = _faiss()
    path = Path(path)
    if not path.is_dir():
        raise IndexFileError(f"index not found: {path} (build one with deepmetric index build)")
    for name in (MANIFEST, FAISS_FILE, ITEMS):
        if not (path / name).is_file():
            raise IndexFileError(f"{path / name}: missing; the index folder is incomplete")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFileError(f"{path / MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFileError(f"{path / MANIFEST}: not a {FORMAT} manifest")
    try:
        index = faiss.read_index(str(path / FAISS_FILE))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise IndexFileError(
            f"{path / FAISS_FILE}: not a readable faiss index ({reason})"
        ) from None
    items = _read_items(path / ITEMS)
    dim = manifest["fingerprint"]["embedding_dim"]
    if index.d != dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexFileError(
            f"{path / FAISS_FILE}: {index.d}-d index with metric {index.metric_type}, the "
            f"manifest says {dim}-d inner product"
        )
    if index.ntotal != len(items):
        raise IndexFileError(
            f"{path / FAISS_FILE} holds {index.ntotal:,} vectors but {path / ITEMS} lists "
            f"{len(items):,} items"
        )
    set_search_parameters(index, manifest["index"]["kind"], manifest["index"]["params"])
    return manifest, index, items


def _read_items(file: Path) -> Items:
    ids, paths, labels = [], [], []
    try:
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            if next(reader, None) != ["id", "path", "label"]:
                raise IndexFileError(f"{file}, line 1: expected the header id,path,label")
            for row in reader:
                if len(row) != 3 or not row[0].lstrip("-").isdigit():
                    raise IndexFileError(f"{file}, line {reader.line_num}: expected id,path,label")
                ids.append(int(row[0]))
                paths.append(row[1])
                labels.append(row[2] or None)
    except UnicodeDecodeError as e:
        raise IndexFileError(f"{file}: not UTF-8 text ({e})") from None
    return Items(np.asarray(ids, dtype=np.int64), paths, labels)
