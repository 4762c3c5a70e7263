"""faiss indexes searched under the deepmetric tie rule (score descending, then index ascending).

faiss finds candidates; their scores are then recomputed in float32 by one arithmetic for every
candidate (:meth:`FaissSearcher.rescore`), so exact copies of a gallery vector tie, and the
lists are ordered from those scores. faiss's own scores cannot be used for that:
``IndexFlatIP`` gives copies of one gallery vector scores one ulp apart once a call holds a
few thousand queries, which puts the copies out of index order. Recomputed scores may differ
from the torch backend's in the last bit (another summation order).

For the exact index the candidate set is checked too: an item faiss did not return has a
faiss score at most that of the last one returned, and faiss's and the recomputed float32
scores of one pair differ by at most ``2 * gamma_d * |q| * |g|`` (gamma_d = d u / (1 - d u),
u = 2^-24, the bound on any order of summing d products). Rows where that margin does not
separate the k-th recomputed score from everything not returned are searched again with a
longer list.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .topk import order_ties

# Deferred import: faiss (slow to import; optional for backend="torch"), in import_faiss().

# Candidates fetched beyond k (and the own item), so that the margin check rarely fails.
EXTRA_CANDIDATES = 16


def import_faiss() -> Any:
    """The faiss module, or an ImportError that says what to install."""
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError(
            "this backend needs faiss (pip install faiss-cpu); backend='torch' works without it"
        ) from error
    return faiss


class FaissSearcher:
    """A faiss index over a gallery (G, d), searched with the deepmetric tie rule.

    backend: "faiss" (``IndexFlatIP``, exact), "faiss-ivf" (``IndexIVFFlat``, inner product;
    options ``nlist`` = round(sqrt(G)), ``nprobe`` = 16, ``train_size`` = 64 * nlist,
    ``seed`` = 0) or "faiss-hnsw" (``IndexHNSWFlat``, inner product; options ``m`` = 32,
    ``ef_construction`` = 80, ``ef_search`` = 128). The index holds its own copy of the gallery
    (G * d * 4 bytes), outside the evaluation memory budget, and so does the searcher (a CPU
    float32 tensor, to recompute candidate scores). ``build_seconds``: training + adding time.
    """

    def __init__(
        self, gallery: Tensor, backend: str = "faiss", options: Mapping[str, Any] | None = None
    ) -> None:
        faiss = import_faiss()
        options = dict(options or {})
        self.gallery = gallery.detach().to("cpu", torch.float32).contiguous()
        x = self.gallery.numpy()
        num, dim = x.shape
        start = time.perf_counter()
        if backend == "faiss":
            index = faiss.IndexFlatIP(dim)
        elif backend == "faiss-ivf":
            nlist = int(options.pop("nlist", max(1, round(math.sqrt(num)))))
            nprobe = int(options.pop("nprobe", 16))
            train_size = int(options.pop("train_size", min(num, 64 * nlist)))
            seed = int(options.pop("seed", 0))
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.min_points_per_centroid = 1  # silence faiss' "too few points" warning
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(num, size=min(num, train_size), replace=False))
            index.train(x[sample])
            index.nprobe = min(nprobe, nlist)
            self.quantizer = quantizer  # the index does not keep its quantizer alive
        elif backend == "faiss-hnsw":
            m = int(options.pop("m", 32))
            index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(options.pop("ef_construction", 80))
            index.hnsw.efSearch = int(options.pop("ef_search", 128))
        else:
            raise ValueError(f"unknown faiss backend {backend!r}")
        if options:
            raise ValueError(f"unknown index_options for {backend!r}: {sorted(options)}")
        index.add(x)
        self.build_seconds = time.perf_counter() - start
        self.index = index
        self.backend = backend
        self.exact = backend == "faiss"
        d_u = dim * 2.0**-24  # d times the float32 unit roundoff
        gamma = d_u / (1 - d_u)
        # bound on |faiss score - recomputed score| of any pair, per unit of query norm
        self.error_per_norm = 2 * gamma * float(self.gallery.norm(dim=1).max())

    def search(
        self, query: Tensor, k: int, self_index: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Top-k of ``query`` (c, d); ``self_index`` (c,) int64 names each row's own gallery
        item (-1 = none), which is never returned.

        Returns values (c, k) float32 and indices (c, k) int64 on the CPU (index -1 with value
        -inf where an approximate index found fewer than k items).
        """
        q = query.detach().to("cpu", torch.float32).contiguous()
        own = None if self_index is None else self_index.cpu()
        num_gallery = self.gallery.shape[0]
        length = min(num_gallery, k + EXTRA_CANDIDATES + (own is not None))
        values, indices, unseen = self._candidates(q, length, own)
        if self.exact:
            margin = self.error_per_norm * q.norm(dim=1)
            rows = (unseen + margin >= values[:, k - 1]).nonzero().flatten()
            while rows.numel() > 0 and length < num_gallery:
                length = min(num_gallery, 2 * length)
                sub_own = None if own is None else own[rows]
                v, i, sub_unseen = self._candidates(q[rows], length, sub_own)
                values[rows], indices[rows] = v[:, : values.shape[1]], i[:, : values.shape[1]]
                rows = rows[sub_unseen + margin[rows] >= v[:, k - 1]]
        return values[:, :k].contiguous(), indices[:, :k].contiguous()

    def _candidates(
        self, query: Tensor, length: int, own: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """faiss's top ``length`` of each row, re-scored and ordered; also the highest faiss
        score an item left out can have (-inf when nothing was left out)."""
        faiss_scores, found = self.index.search(query.numpy(), length)
        indices = torch.from_numpy(found)
        values = self.rescore(query, indices)
        if own is not None:
            values[indices == own[:, None]] = float("-inf")
        unseen = torch.from_numpy(faiss_scores[:, -1].copy())
        if length >= self.gallery.shape[0]:
            unseen.fill_(float("-inf"))
        values, indices = order_ties(values, indices)
        return values, indices, unseen

    def rescore(self, query: Tensor, indices: Tensor) -> Tensor:
        """float32 scores of ``query`` (c, d) against its candidates ``indices`` (c, m), -inf
        where the index is -1, as elementwise products summed over d: the same arithmetic for
        every candidate, wherever it sits (a BLAS matmul of small shapes is not: it can score
        two copies of one vector differently by their column). Groups of rows hold at most
        about 2^22 products (16 MiB, twice: gathered rows and products)."""
        num, length = indices.shape
        values = torch.empty(num, length)
        group = max(1, 2**22 // (length * query.shape[1]))
        for rows in range(0, num, group):
            part = indices[rows : rows + group].clamp(min=0)
            products = self.gallery[part] * query[rows : rows + group, None, :]
            values[rows : rows + group] = products.sum(dim=2)
        values[indices < 0] = float("-inf")
        return values
