"""``Retriever``: a gallery index with the model that made it: build, search, add, remove.

    from deepmetric.retrieval import Retriever

    r = Retriever.build("runs/demo", "gallery/")        # embeds every image, exact index
    r.save("gallery.index")
    r = Retriever.load("gallery.index")
    hits = r.search("queries/", k=5)                     # image files, or a (Q, d) array
    hits.paths[0], hits.scores[0], hits.labels[0]        # the first query's 5 nearest items
    r.add(["new/1.jpg"], labels=["cat"]); r.remove(["gallery/old.jpg"]); r.save()
    r.calibrate(far=1e-3); r.save()    # threshold on the run's validation classes (or a folder)
    hits = r.search("queries/", k=5, threshold="auto")   # hits.match[i]: False = "no match"

Scores are inner products of the model's embeddings (cosine similarity for L2-normalised
ones); each list is ordered by score, then by the order items were added.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import deepmetric.evaluation.rerank as reranking
from deepmetric.config import ConfigError
from deepmetric.data import IMAGE_EXTENSIONS
from deepmetric.engine.devices import resolve_device
from deepmetric.engine.inference import (
    checkpoint_digest,
    embed_paths,
    list_images,
    load_model,
    preprocessing,
)
from deepmetric.retrieval.index import (
    FORMAT,
    KINDS,
    IndexFileError,
    Items,
    faiss_parameters,
    new_faiss_index,
    read_index_folder,
    reconstruct,
    write_index_folder,
)
from deepmetric.retrieval.thresholds import (
    calibration_record,
    label_codes,
    resolve_threshold,
    validation_embeddings,
)

# Deferred imports: faiss (optional, slow to import), inside the functions that use it.

__all__ = ["Retriever", "SearchResult", "read_gallery"]

Queries = str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray | torch.Tensor


@dataclass
class SearchResult:
    """The k nearest gallery items of each query (lists are shorter when an approximate
    index finds fewer than k)."""

    queries: list[str]  # (Q,) query image paths, or "0".."Q-1" for embeddings
    paths: list[list[str]]  # (Q, <=k) gallery item ids (paths), nearest first
    scores: list[list[float]]  # (Q, <=k) inner products
    labels: list[list[str | None]]  # (Q, <=k) gallery labels (None when unknown)
    # with a threshold: (Q,) best score >= threshold; the lists then hold only the items
    # scoring >= threshold (empty for a query without a match); None without a threshold
    match: list[bool] | None = None
    threshold: float | None = None

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (query, rank): query, rank (1-based), path, score, label; with a
        threshold also ``match``, and a query without a match has one row of its own (match
        False, rank, path, score and label None)."""
        rows = []
        lists = zip(self.queries, self.paths, self.scores, self.labels)
        for i, (q, ps, ss, ls) in enumerate(lists):
            if self.match is not None and not self.match[i]:
                none = {"rank": None, "path": None, "score": None, "label": None}
                rows.append({"query": q, **none, "match": False})
            for r, (p, s, lab) in enumerate(zip(ps, ss, ls)):
                row = {"query": q, "rank": r + 1, "path": p, "score": s, "label": lab}
                rows.append(row if self.match is None else {**row, "match": True})
        return rows

    def above(self, threshold: float, decided_by: np.ndarray | None = None) -> SearchResult:
        """The items scoring >= ``threshold``, and ``match`` = a query keeps one.
        ``decided_by`` (Q, k): the scores compared instead of ``scores`` (re-ranking: the
        inner products the threshold was calibrated on)."""
        by = self.scores if decided_by is None else decided_by
        keep = [[s >= threshold for s in ss] for ss in by]
        return SearchResult(
            self.queries,
            [[x for x, k in zip(xs, ks) if k] for xs, ks in zip(self.paths, keep)],
            [[x for x, k in zip(xs, ks) if k] for xs, ks in zip(self.scores, keep)],
            [[x for x, k in zip(xs, ks) if k] for xs, ks in zip(self.labels, keep)],
            [any(ks) for ks in keep],
            float(threshold),
        )


def read_gallery(source: str | os.PathLike) -> tuple[list[str], list[str | None]]:
    """(paths, labels) of a gallery: a folder (recursive; labels = the first-level folder
    names when every image lies in one, else none), a CSV with a ``path`` and an optional
    ``label`` column, or a list file (``path`` or ``path label`` a line). Relative paths in a
    file are taken from its folder."""
    src = Path(source)
    if src.is_dir():
        paths = [str(p) for p in list_images(src)]
        tops = [Path(p).relative_to(src).parts for p in paths]
        labels: list[str | None] = (
            [t[0] for t in tops] if all(len(t) > 1 for t in tops) else [None] * len(paths)
        )
        return paths, labels
    if src.suffix.lower() == ".csv" and src.is_file():
        with open(src, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise IndexFileError(f"{src}, line 1: no 'path' column ({reader.fieldnames})")
            rows = [(r["path"].strip(), (r.get("label") or "").strip() or None) for r in reader]
        return [str(src.parent / p) if not Path(p).is_absolute() else p for p, _ in rows], [
            label for _, label in rows
        ]
    if not src.is_file():
        raise FileNotFoundError(f"no such folder or file: {src}")
    paths, labels = [], []
    for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, label = line, None
        if not _exists(src, path) and len(line.split()) > 1:
            path, label = line.rsplit(None, 1)
        if not _exists(src, path):
            raise FileNotFoundError(f"{src}, line {n}: image not found: {path}")
        paths.append(str(Path(path) if Path(path).is_file() else src.parent / path))
        labels.append(label)
    if not paths:
        raise FileNotFoundError(f"{src}: lists no image")
    return paths, labels


def _exists(list_file: Path, path: str) -> bool:
    return Path(path).is_file() or (list_file.parent / path).is_file()


class Retriever:
    """A faiss index over gallery embeddings, its items (paths, labels) and the fingerprint of
    the model and preprocessing that made them. See the module docstring."""

    def __init__(
        self, manifest: dict[str, Any], index: Any, items: Items, path: Path | None = None
    ) -> None:
        self.manifest, self.index, self.items, self.path = manifest, index, items, path
        self._model: tuple[Any, torch.nn.Module] | None = None  # (cfg, model), loaded on use

    # ------------------------------------------------------------------ building and files
    @classmethod
    def build(
        cls,
        checkpoint: str | os.PathLike,
        images: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        labels: Sequence[str | None] | None = None,
        kind: str = "flat",
        approximate_above: int | None = None,
        options: dict[str, Any] | None = None,
        overrides: list[str] | None = None,
        batch_size: int | None = None,
        progress: bool = True,
        calibrate: dict[str, Any] | None = None,
    ) -> Retriever:
        """Embed a gallery with a checkpoint and index it.

        Args:
            checkpoint: a run folder (its best, else last checkpoint) or a checkpoint folder.
            images: a folder, list file or CSV (see :func:`read_gallery`), or a list of paths.
            labels: one per image (overrides those read from ``images``).
            kind: "flat" (exact), "ivf" or "hnsw"; with ``approximate_above``, ``kind`` is
                used only for galleries larger than that, exact search below.
            options: ``nlist``, ``nprobe`` (ivf), ``m``, ``ef_construction``, ``ef_search``
                (hnsw); defaults in :func:`~deepmetric.retrieval.index.faiss_parameters`.
            calibrate: the arguments of :meth:`calibrate` (``far`` or ``precision``, and
                ``source``), done before the gallery is embedded (a failure costs no time).
        """
        retriever = cls({}, None, Items(np.zeros(0, dtype=np.int64), [], []))
        retriever._load_model(checkpoint, overrides)
        paths, found = _gallery(images)
        labels = list(labels) if labels is not None else found
        if len(labels) != len(paths):
            raise ValueError(f"{len(paths)} images but {len(labels)} labels")
        _check_unique(paths, {})  # before spending the time to embed
        if calibrate is not None:
            retriever.calibrate(**calibrate, batch_size=batch_size, progress=progress)
        start = time.perf_counter()
        vectors = retriever._embed(paths, batch_size, progress)
        embed_seconds = time.perf_counter() - start
        built = cls.from_embeddings(
            vectors,
            paths,
            labels,
            kind=kind,
            approximate_above=approximate_above,
            options=options,
            fingerprint=retriever._fingerprint(),
            normalized=bool(retriever._model[0].model.l2_normalize),
        )
        built._model, built._checkpoint = retriever._model, retriever._checkpoint
        built.manifest["timings_s"]["embed"] = round(embed_seconds, 3)
        if "threshold" in retriever.manifest:
            built.manifest["threshold"] = retriever.manifest["threshold"]
        return built

    @classmethod
    def from_embeddings(
        cls,
        embeddings: np.ndarray | torch.Tensor,
        ids: Sequence[str | os.PathLike],
        labels: Sequence[str | None] | None = None,
        *,
        kind: str = "flat",
        approximate_above: int | None = None,
        options: dict[str, Any] | None = None,
        fingerprint: dict[str, Any] | None = None,
        normalized: bool = True,
    ) -> Retriever:
        """Index precomputed embeddings (N, d) under ``ids`` (N item names, e.g. the paths
        written by ``deepmetric embed``). Without a ``fingerprint`` (checkpoint, preprocessing)
        the index can be searched with embeddings only. Arguments as for :meth:`build`."""
        if kind not in KINDS:
            raise ConfigError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        paths = [str(p) for p in ids]
        labels = list(labels) if labels is not None else [None] * len(paths)
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().cpu().float().numpy()
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(paths) or len(labels) != len(paths):
            raise ValueError(
                f"embeddings {vectors.shape}, {len(paths)} ids, {len(labels)} labels: "
                "expected (N, d) with N ids and N labels"
            )
        _check_unique(paths, {})
        count = len(paths)
        if approximate_above is not None and count <= approximate_above:
            kind = "flat"
        params = faiss_parameters(kind, count, options or {})
        start = time.perf_counter()
        index = new_faiss_index(kind, vectors.shape[1], params, vectors)
        index.add_with_ids(vectors, np.arange(count, dtype=np.int64))
        manifest = {
            "format": FORMAT,
            "fingerprint": fingerprint or {"embedding_dim": int(vectors.shape[1])},
            "index": {"kind": kind, "params": params, "metric": "inner_product"},
            "count": count,
            "next_id": count,
            "normalized": normalized,
            "faiss_version": _faiss_version(),
            "timings_s": {},
        }
        if kind != "flat":
            manifest["recall_vs_exact"] = measure_recall(index, vectors)
        manifest["timings_s"]["index"] = round(time.perf_counter() - start, 3)
        items = Items(np.arange(count, dtype=np.int64), paths, labels)
        return cls(manifest, index, items)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Retriever:
        """Open an index folder (nothing is unpickled). The model is loaded on first use."""
        manifest, index, items = read_index_folder(Path(path))
        return cls(manifest, index, items, Path(path))

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the index folder atomically (default: where it was loaded from)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("save: no path given and the index was not loaded from one")
        self.manifest["count"] = len(self.items)
        write_index_folder(target, self.manifest, self.index, self.items)
        self.path = target
        return target

    # ------------------------------------------------------------------ use
    def search(
        self,
        queries: Queries,
        k: int = 10,
        *,
        threshold: float | str | None = None,
        rerank: str = "none",
        rerank_options: dict[str, Any] | None = None,
        batch_size: int | None = None,
        progress=False,
    ) -> SearchResult:
        """The ``k`` nearest gallery items of each query: image files (a folder, list file,
        a path or list of paths; embedded with the index's model) or embeddings (Q, d).

        ``threshold`` (a score, or "auto": the one :meth:`calibrate` stored): only items
        scoring >= it are listed, and ``match`` says which queries have one ("no match":
        an empty list).

        ``rerank`` ("k_reciprocal", "alpha_qe"; options ``rerank_options``, see
        :mod:`deepmetric.evaluation.rerank`): the index's vectors are read back once and
        searched exactly, whatever the index kind, then re-ranked as ``deepmetric.evaluation.
        evaluate(rerank=...)`` does; scores are then those of the re-ranking (1 - d* for
        k_reciprocal, inner products of the expanded vectors for alpha_qe). With both, the
        threshold applies to the plain inner products it was calibrated on: a query matches
        when one of its re-ranked items has an inner product >= the threshold."""
        reranking.check_rerank(rerank, rerank_options)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if len(self.items) == 0:
            raise IndexFileError(f"{self.path or 'the index'} is empty; add items first")
        value = resolve_threshold(self.manifest, threshold, self.path)
        names, vectors = self._queries(queries, batch_size, progress)
        k = min(k, len(self.items))
        if rerank == "none":
            scores, ids = self.index.search(vectors, k)
            result = self._result(names, scores, ids)
            return result if value is None else result.above(value)
        gallery = reconstruct(self.index, self.items.ids)
        rows, values = reranking.rerank(rerank, vectors, gallery, k, rerank_options)
        ids = self.items.ids[rows.numpy()]
        result = self._result(names, values.numpy(), ids, ordered=True)
        if value is None:
            return result
        inner = np.einsum("qd,qkd->qk", vectors, gallery[rows.numpy()])
        return result.above(value, decided_by=inner)

    def calibrate(
        self,
        source: str | os.PathLike | np.ndarray | torch.Tensor | None = None,
        labels: Sequence[Any] | None = None,
        *,
        far: float | None = None,
        precision: float | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Choose the threshold of ``search(threshold="auto")`` at a target ``far`` or
        ``precision`` over every pair of labelled calibration data, never the test classes,
        and store it in the manifest (``"threshold"``, written by :meth:`save`; fields in
        :mod:`deepmetric.retrieval.thresholds`). Returns that record.

        ``source``: None = the validation classes of the index's run (``eval.protocol:
        val``), rebuilt from its config; a folder of class folders (or a list / CSV with
        labels) embedded with the index's model; or embeddings (N, d) with ``labels`` (N,).
        """
        if source is None and self._model is None:
            self.use_checkpoint()
        fingerprint = self._fingerprint() if self._model else self.manifest["fingerprint"]
        model = fingerprint.get("checkpoint_sha256")
        if source is None:
            cfg, net = self._model
            vectors, labels, where = validation_embeddings(
                cfg, net, self._checkpoint, batch_size=batch_size, progress=progress
            )
        elif isinstance(source, (np.ndarray, torch.Tensor)):
            vectors, where = self._as_vectors(source, None), f"{len(source):,} embeddings given"
            labels = list(labels) if labels is not None else [None] * len(vectors)
            if len(labels) != len(vectors):
                raise ValueError(f"{len(vectors)} embeddings but {len(labels)} labels")
        else:
            paths, found = _gallery(source)
            labels = list(labels) if labels is not None else found
            where = str(source)
            label_codes(labels, f"calibration images {where}")  # before spending time to embed
            vectors = self._embed(paths, batch_size, progress)
        record = calibration_record(
            vectors, labels, far=far, precision=precision, source=where, model=model
        )
        self.manifest["threshold"] = record
        return record

    def add(
        self,
        images: str | os.PathLike | Sequence[str | os.PathLike],
        labels: Sequence[str | None] | None = None,
        *,
        embeddings: np.ndarray | torch.Tensor | None = None,
        batch_size: int | None = None,
        progress: bool = True,
    ) -> int:
        """Add items without rebuilding: image files (embedded with the index's model), or
        ``embeddings`` (N, d) with ``images`` their N ids. Returns the number added.

        Raises:
            IndexFileError: an id already in the index (nothing is added).
        """
        paths, found = _gallery(images)
        labels = list(labels) if labels is not None else found
        if len(labels) != len(paths):
            raise ValueError(f"{len(paths)} items but {len(labels)} labels")
        _check_unique(paths, self.items.row_of)
        if embeddings is None:
            vectors = self._embed(paths, batch_size, progress)
        else:
            vectors = self._as_vectors(embeddings, len(paths))
        first = int(self.manifest["next_id"])
        ids = np.arange(first, first + len(paths), dtype=np.int64)
        self.index.add_with_ids(vectors, ids)
        self.items = Items(
            np.concatenate([self.items.ids, ids]),
            self.items.paths + [str(p) for p in paths],
            self.items.labels + list(labels),
        )
        self.manifest["next_id"] = first + len(paths)
        return len(paths)

    def remove(self, ids: Sequence[str | os.PathLike]) -> int:
        """Drop items by id (path). Returns the number removed.

        Raises:
            IndexFileError: an id not in the index (nothing is removed).
        """
        names = [str(i) for i in ids]
        unknown = [n for n in names if n not in self.items.row_of]
        if unknown:
            raise IndexFileError(f"not in the index: {unknown[0]}" + _more(unknown))
        drop = np.zeros(len(self.items), dtype=bool)
        drop[[self.items.row_of[n] for n in names]] = True
        faiss_ids = self.items.ids[drop]
        if self.manifest["index"]["kind"] == "hnsw":  # faiss cannot unlink graph nodes
            keep_ids = self.items.ids[~drop]
            vectors = reconstruct(self.index, keep_ids)
            params = self.manifest["index"]["params"]
            self.index = new_faiss_index("hnsw", self.index.d, params, vectors)
            self.index.add_with_ids(vectors, keep_ids)
        else:
            self.index.remove_ids(np.ascontiguousarray(faiss_ids, dtype=np.int64))
        keep = np.flatnonzero(~drop)
        self.items = Items(
            self.items.ids[keep],
            [self.items.paths[i] for i in keep],
            [self.items.labels[i] for i in keep],
        )
        return int(drop.sum())

    # ------------------------------------------------------------------ internals
    def _result(
        self, names: list[str], scores: np.ndarray, ids: np.ndarray, ordered: bool = False
    ) -> SearchResult:
        found = ids >= 0
        if not ordered:
            # ties (equal scores) in the order items were added: sort rows by (-score, id)
            order = np.lexsort((np.where(found, ids, np.iinfo(np.int64).max), -scores), axis=1)
            scores = np.take_along_axis(scores, order, 1)
            ids = np.take_along_axis(ids, order, 1)
        rows = np.searchsorted(self.items.ids, ids)  # ids ascend with the rows
        paths, labels, values = [], [], []
        for q in range(len(names)):
            valid = rows[q][ids[q] >= 0].tolist()
            paths.append([self.items.paths[r] for r in valid])
            labels.append([self.items.labels[r] for r in valid])
            values.append(scores[q][: len(valid)].tolist())
        return SearchResult(names, paths, values, labels)

    def _queries(
        self, queries: Queries, batch_size: int | None, progress: bool
    ) -> tuple[list[str], np.ndarray]:
        if isinstance(queries, (np.ndarray, torch.Tensor)):
            vectors = self._as_vectors(queries, None)
            return [str(i) for i in range(len(vectors))], vectors
        paths, _ = _gallery(queries)
        return [str(p) for p in paths], self._embed(paths, batch_size, progress)

    def _as_vectors(self, values: np.ndarray | torch.Tensor, count: int | None) -> np.ndarray:
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().float().numpy()
        vectors = np.ascontiguousarray(values, dtype=np.float32)
        dim = self.manifest["fingerprint"]["embedding_dim"]
        if vectors.ndim != 2 or vectors.shape[1] != dim:
            raise ValueError(f"embeddings of shape {vectors.shape}; this index holds {dim}-d")
        if count is not None and len(vectors) != count:
            raise ValueError(f"{len(vectors)} embeddings for {count} ids")
        return vectors

    def _load_model(self, checkpoint: str | os.PathLike, overrides: list[str] | None) -> None:
        cfg, model, ckpt = load_model(checkpoint, overrides)
        model.to(resolve_device(cfg.train.device))
        self._model = (cfg, model)
        self._checkpoint = ckpt

    def use_checkpoint(
        self, checkpoint: str | os.PathLike | None = None, overrides: list[str] | None = None
    ) -> None:
        """Load the model that embeds queries and new items (default: the checkpoint recorded
        in the index) and check it against the index's fingerprint.

        Raises:
            ConfigError: another model or preprocessing than the index's, naming both.
        """
        recorded = self.manifest["fingerprint"]
        if checkpoint is None and "checkpoint" not in recorded:
            raise ConfigError(
                f"{self.path or 'this index'} was built from embeddings without a model; "
                "search it with embeddings, or pass --checkpoint"
            )
        self._load_model(checkpoint or recorded["checkpoint"], overrides)
        if "checkpoint" not in recorded:
            return
        mine = self._fingerprint()
        for key, what in (
            ("checkpoint_sha256", "model weights"),
            ("preprocessing", "preprocessing"),
            ("embedding_dim", "embedding size"),
        ):
            if mine[key] != recorded[key]:
                where = self.path or "this index"
                raise ConfigError(
                    f"{where}: built with the {what} of {recorded['checkpoint']} "
                    f"({_short(recorded[key])}), but {mine['checkpoint']} has "
                    f"{_short(mine[key])}; use that checkpoint, or rebuild the index"
                )

    def _embed(self, paths: list[str], batch_size: int | None, progress: bool) -> np.ndarray:
        if self._model is None:
            self.use_checkpoint()
        cfg, model = self._model  # an unreadable image raises DatasetError naming it
        return np.ascontiguousarray(
            embed_paths(cfg, model, paths, batch_size=batch_size, progress=progress)
        )

    def _fingerprint(self) -> dict[str, Any]:
        cfg, _ = self._model
        return {
            "checkpoint": str(Path(self._checkpoint).resolve()),
            "checkpoint_sha256": checkpoint_digest(self._checkpoint),
            "preprocessing": preprocessing(cfg),
            "embedding_dim": cfg.model.embedding_dim,
        }


def measure_recall(index: Any, vectors: np.ndarray, k: int = 10, sample: int = 1000) -> dict:
    """Recall of an approximate ``index`` against exact inner-product search, on ``sample``
    of its own vectors as queries (seeded): ``recall@1`` = share of queries whose exact
    nearest item is the index's first; ``recall@k`` = share of the exact k found in the
    index's k."""
    import faiss

    rng = np.random.default_rng(0)
    take = np.sort(rng.choice(len(vectors), min(sample, len(vectors)), replace=False))
    queries = vectors[take]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    k = min(k, len(vectors))
    _, truth = exact.search(queries, k)
    _, approx = index.search(queries, k)  # ids = rows: the build adds ids 0..N-1
    top1 = float(np.mean(truth[:, 0] == approx[:, 0]))
    overlap = np.mean([len(set(t) & set(a)) / k for t, a in zip(truth, approx)])
    return {"queries": len(take), "k": k, "recall@1": top1, f"recall@{k}": float(overlap)}


def _gallery(
    images: str | os.PathLike | Sequence[str | os.PathLike],
) -> tuple[list[str], list[str | None]]:
    if isinstance(images, (str, os.PathLike)):
        if Path(images).is_file() and Path(images).suffix.lower() in IMAGE_EXTENSIONS:
            return [str(images)], [None]
        return read_gallery(images)
    paths = [str(p) for p in images]
    return paths, [None] * len(paths)


def _check_unique(paths: list[str], existing: dict[str, int]) -> None:
    seen: set[str] = set()
    for p in paths:
        if p in existing:
            raise IndexFileError(f"{p} is already in the index; remove it first to replace it")
        if p in seen:
            raise IndexFileError(f"{p} is listed twice")
        seen.add(p)


def _more(items: list) -> str:
    return f" (and {len(items) - 1:,} more)" if len(items) > 1 else ""


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text[:16] + "..." if isinstance(value, str) and len(text) == 64 else text


def _faiss_version() -> str:
    import faiss

    return faiss.__version__
