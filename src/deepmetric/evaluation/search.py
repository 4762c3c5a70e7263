"""Exact and approximate k-nearest-neighbour search by inner product, in bounded memory.

Ranking rule, in every backend: score descending, then gallery index ascending. The torch
backend computes scores ``query_chunk @ gallery_block.T`` (float32) a chunk at a time and keeps
running top-k lists; it never holds the full Q x G matrix. Searching a set against itself, it
multiplies only the blocks on and above the diagonal of the symmetric score matrix and reduces
each along both axes (:func:`knn_self`). The faiss backends search an index
(``IndexFlatIP`` exact, ``IndexIVFFlat`` / ``IndexHNSWFlat`` approximate) and re-sort the returned
lists with the same tie rule; for the exact index, rows whose k-th and (k+1)-th scores are equal
are searched again with a longer list, so ties at the cut are resolved by index too.

Scores are float32 dot products as each backend computes them: two backends (or two chunk
shapes) may round a score differently in the last bit, so for data whose products are not
exact in float32 a near-tie can order differently across backends. Ties between exactly equal
scores (duplicate embeddings, quantised values) are ordered identically.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import as_embeddings, check_same_space

BACKENDS = ("auto", "torch", "faiss", "faiss-ivf", "faiss-hnsw")
APPROXIMATE_BACKENDS = ("faiss-ivf", "faiss-hnsw")

# Memory model used to turn a byte budget into chunk sizes.
# One score costs 4 B; comparison masks, row copies and sorts of tied rows are done for at most
# a quarter of a chunk's rows at a time, which adds at most another 4 B per score.
SCORE_BYTES = 8
# One top-list entry: float32 value + int64 index, about four copies alive while sorting/merging.
LIST_BYTES = 48
# Below this many query rows per chunk the gallery is chunked too.
MIN_QUERY_ROWS = 16
# On the CPU the matmul runs ~30% faster into blocks of this many gallery columns than into
# full-width rows of a large gallery (measured at d = 512, G = 60,502, 2 threads).
CPU_BLOCK_COLUMNS = 8192
# Self-search (gallery = query set): square blocks of at most this many rows, and at least
# MIN_SELF_BLOCK rows (below that the query x gallery search is used instead).
SELF_BLOCK = 4096
MIN_SELF_BLOCK = 256
# Bytes per entry of a top list kept for every item: float32 value + int64 index.
KEPT_LIST_BYTES = 12


# --------------------------------------------------------------------------------------------
# chunk planning and small helpers


def plan_chunks(
    num_query: int, num_gallery: int, list_size: int, budget: int, extra_row_bytes: int = 0
) -> tuple[int, int]:
    """Chunk sizes ``(query_rows, gallery_cols)`` whose working memory stays within ``budget``.

    A chunk of c query rows against g gallery columns costs about
    ``c * (SCORE_BYTES * g + 2 * LIST_BYTES * (list_size + 1) + extra_row_bytes)`` bytes.
    The whole gallery is used at once when that allows at least ``MIN_QUERY_ROWS`` rows (or all
    queries); otherwise at most ``MIN_QUERY_ROWS`` rows are taken and the gallery is cut into
    blocks. Raises ``ValueError`` when not even one row's lists fit.
    """
    if budget <= 0:
        raise ValueError(f"memory_budget_bytes must be positive, got {budget}")
    list_row = 2 * LIST_BYTES * (list_size + 1) + extra_row_bytes
    rows = budget // (SCORE_BYTES * num_gallery + list_row)
    if rows >= min(num_query, MIN_QUERY_ROWS):
        return int(min(num_query, rows)), num_gallery
    rows = min(num_query, MIN_QUERY_ROWS, budget // (list_row + SCORE_BYTES))
    if rows < 1:
        raise ValueError(
            f"memory_budget_bytes={budget} is too small for lists of {list_size} neighbours; "
            f"need at least {list_row + SCORE_BYTES} bytes"
        )
    cols = (budget // rows - list_row) // SCORE_BYTES
    return int(rows), int(min(cols, num_gallery))


def plan_knn(
    num_query: int, num_gallery: int, k: int, budget: int, device: torch.device
) -> tuple[int, int]:
    """Chunk sizes for :func:`knn_torch`, which holds one column block of scores at a time.

    Plans as if the gallery were one block wide (``CPU_BLOCK_COLUMNS`` on the CPU), so the query
    chunk can be large; returns ``(query_rows, gallery_cols)``.
    """
    width = num_gallery if device.type == "cuda" else min(num_gallery, CPU_BLOCK_COLUMNS)
    rows, cols = plan_chunks(num_query, width, k, budget)
    return rows, (num_gallery if cols == width else cols)


def plan_self_block(num_items: int, k: int, budget: int) -> int:
    """Block size for :func:`knn_self` within ``budget``, or 0 when it does not fit.

    Costs: the N x k lists of every item (``KEPT_LIST_BYTES`` per entry) plus, per block of
    b rows, b x b scores (``SCORE_BYTES`` per score, gather temporaries included) and the
    merge of b rows' lists (``2 * LIST_BYTES * (k + 1)`` per row).
    """
    rest = budget - KEPT_LIST_BYTES * num_items * k
    block = min(num_items, SELF_BLOCK)
    while block > 0 and block * (SCORE_BYTES * block + 2 * LIST_BYTES * (k + 1)) > rest:
        block = block * 3 // 4
    return block if block >= min(num_items, MIN_SELF_BLOCK) else 0


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """On CUDA, disable TF32 for the duration (exact float32 scores); restore the setting after."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def column_blocks(num_gallery: int, gallery_chunk: int, device: torch.device) -> list[range]:
    """Gallery column ranges scored at once: ``gallery_chunk`` wide, at most
    ``CPU_BLOCK_COLUMNS`` on the CPU."""
    width = gallery_chunk if device.type == "cuda" else min(gallery_chunk, CPU_BLOCK_COLUMNS)
    return [range(g0, min(num_gallery, g0 + width)) for g0 in range(0, num_gallery, width)]


def scores_into(query: Tensor, gallery: Tensor, buffer: Tensor, offset: int = 0) -> Tensor:
    """``query (c, d) @ gallery (g, d).T`` written into a flat reusable ``buffer`` at ``offset``.

    Returns the (c, g) view. Reusing one buffer avoids page-faulting a fresh c x g allocation
    for every chunk.
    """
    c, g = query.shape[0], gallery.shape[0]
    out = buffer[offset : offset + c * g].view(c, g)
    torch.mm(query, gallery.T, out=out)
    return out


def mask_self(scores: Tensor, self_index: Tensor | None, col_offset: int) -> None:
    """Set ``scores[r, self_index[r] - col_offset] = -inf`` where that column lies in the block.

    scores: (c, g) block whose columns are gallery items ``col_offset .. col_offset + g - 1``;
    self_index: (c,) int64 gallery index of each row's own copy, -1 for none.
    """
    if self_index is None:
        return
    cols = self_index - col_offset
    inside = (cols >= 0) & (cols < scores.shape[1])
    rows = inside.nonzero().flatten()
    scores[rows, cols[rows]] = float("-inf")


def order_ties(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row of a candidate list by (value descending, index ascending).

    values: (c, m) float; indices: (c, m) int64 (distinct within a row). Returns both re-ordered.
    """
    indices, perm = torch.sort(indices, dim=1)
    values = values.gather(1, perm)
    values, perm = torch.sort(values, dim=1, descending=True, stable=True)
    return values, indices.gather(1, perm)


# Two-level top-k: a line of n scores is cut into n // GROUP_SLOTS interleaved groups
# (positions t, t + w, t + 2w, ... for w groups); see topk_candidates.
GROUP_SLOTS = 16


def topk_candidates(scores: Tensor, m: int, dim: int = 1) -> tuple[Tensor, Tensor]:
    """m entries of each line of ``scores`` (rows for dim=1, columns for dim=0) holding its top
    m, unordered: values (lines, m) and positions in the line (lines, m) int64.

    Each line is cut into interleaved groups of ``GROUP_SLOTS`` entries (position p is in group
    p mod w, w = n // GROUP_SLOTS; the last n mod GROUP_SLOTS positions are always candidates).
    The top m entries lie in the m groups with the largest maxima, unless the m-th and
    (m+1)-th values of the line are equal, which the caller's tie check detects either way (it
    then sees equal m-1-th and m-th candidate values). Group maxima are one fast pass
    (an elementwise max over GROUP_SLOTS slabs), so torch.topk, which is slow on the CPU,
    only sees about m * GROUP_SLOTS + n / GROUP_SLOTS entries per line instead of n.
    For dim=0 no transposed copy of the block is made.
    """
    lines = scores if dim == 1 else scores.T
    num_lines, length = lines.shape
    width = length // GROUP_SLOTS
    if width < 4 * m or not scores.is_contiguous():
        return torch.topk(lines, m, dim=1, sorted=False)
    grouped = GROUP_SLOTS * width
    if dim == 1:
        slabs = scores.as_strided((num_lines, GROUP_SLOTS, width), (length, width, 1))
        maxima = slabs.amax(1)
    else:
        maxima = scores[:grouped].view(GROUP_SLOTS, width, num_lines).amax(0).T.contiguous()
    groups = torch.topk(maxima, m, dim=1, sorted=False).indices  # (lines, m)
    slots = width * torch.arange(GROUP_SLOTS, device=scores.device)
    positions = (groups[:, :, None] + slots).flatten(1)  # (lines, m * GROUP_SLOTS)
    if grouped < length:
        tail = torch.arange(grouped, length, device=scores.device).expand(num_lines, -1)
        positions = torch.cat([positions, tail], 1)
    values, pick = torch.topk(lines.gather(1, positions), m, dim=1, sorted=False)
    return values, positions.gather(1, pick)


def topk_exact(scores: Tensor, k: int, dim: int = 1) -> tuple[Tensor, Tensor]:
    """Exact top-k of each row (dim=1) or each column (dim=0) of ``scores`` under the tie
    rule; returns (lines, k) values and positions.

    ``torch.topk`` leaves the order and the choice among equal values unspecified, so k + 1
    candidates are taken (:func:`topk_candidates`): when the k-th and (k+1)-th values differ
    the set of the first k is exact and only needs re-ordering; lines where they are equal (a
    tie across the cut) are stably sorted in full, a quarter of the lines at a time.
    """
    lines = scores if dim == 1 else scores.T
    num_lines, length = lines.shape
    if k >= length:
        values, indices = torch.sort(lines, dim=1, descending=True, stable=True)
        return values[:, :k], indices[:, :k]
    values, indices = topk_candidates(scores, k + 1, dim)
    values, indices = order_ties(values, indices)
    tied = (values[:, k - 1] == values[:, k]).nonzero().flatten()
    step = max(1, num_lines // 4)
    for start in range(0, tied.numel(), step):
        rows = tied[start : start + step]
        v, i = torch.sort(lines[rows], dim=1, descending=True, stable=True)
        values[rows] = v[:, : k + 1]
        indices[rows] = i[:, : k + 1]
    return values[:, :k].contiguous(), indices[:, :k].contiguous()


def merge_topk(
    values: Tensor, indices: Tensor, new_values: Tensor, new_indices: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Merge two exact top lists of the same rows (disjoint gallery items); keep the best k."""
    v, i = order_ties(torch.cat([values, new_values], 1), torch.cat([indices, new_indices], 1))
    return v[:, :k], i[:, :k]


# --------------------------------------------------------------------------------------------
# torch backend


def knn_torch(
    query: Tensor,
    gallery: Tensor,
    k: int,
    self_index: Tensor | None,
    query_chunk: int,
    gallery_chunk: int,
) -> tuple[Tensor, Tensor]:
    """Exact top-k with explicit chunk sizes (validated float32 inputs on one device).

    query (Q, d), gallery (G, d), self_index (Q,) int64 or None. Returns values (Q, k) float32
    and indices (Q, k) int64, each row ordered by the tie rule.
    """
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    out_values = torch.empty(num_query, k, dtype=torch.float32, device=query.device)
    out_indices = torch.empty(num_query, k, dtype=torch.int64, device=query.device)
    blocks = column_blocks(num_gallery, gallery_chunk, query.device)
    buffer = torch.empty(
        min(query_chunk, num_query) * len(blocks[0]), dtype=torch.float32, device=query.device
    )
    with exact_float32(query.device):
        for q0 in range(0, num_query, query_chunk):
            q1 = min(num_query, q0 + query_chunk)
            chunk_self = None if self_index is None else self_index[q0:q1]
            values, indices = block_topk(query[q0:q1], gallery, blocks, k, chunk_self, buffer)
            out_values[q0:q1] = values
            out_indices[q0:q1] = indices
    return out_values, out_indices


def knn_self(x: Tensor, k: int, exclude_self: bool, block: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of every item of ``x`` (N, d) among the items of ``x`` (itself removed by
    index with ``exclude_self``), computing each score once.

    S = X X^T is symmetric, so the rows are cut into blocks of ``block`` and only the blocks
    X_a X_b^T with a <= b are multiplied: each is reduced to top lists along its rows (for
    the items of a) and along its columns (for the items of b; no transposed copy). That is
    half the matmul work of a query x gallery search. Returns values (N, k) float32 and
    indices (N, k) int64, each row ordered by the tie rule.
    """
    num = x.shape[0]
    values = torch.full((num, k), float("-inf"), device=x.device)
    indices = torch.full((num, k), -1, dtype=torch.int64, device=x.device)  # placeholders
    buffer = torch.empty(block * block, device=x.device)
    starts = range(0, num, block)
    with exact_float32(x.device):
        for a0 in starts:
            a = slice(a0, min(num, a0 + block))
            for b0 in range(a0, num, block):
                b = slice(b0, min(num, b0 + block))
                scores = scores_into(x[a], x[b], buffer)
                if a0 == b0 and exclude_self:
                    scores.fill_diagonal_(float("-inf"))
                _merge_block(values, indices, a, scores, 1, b0, k)
                if b0 != a0:
                    _merge_block(values, indices, b, scores, 0, a0, k)
    return values, indices


def _merge_block(
    values: Tensor, indices: Tensor, items: slice, scores: Tensor, dim: int, offset: int, k: int
) -> None:
    """Merge the top-k along ``dim`` of the block ``scores`` into the lists of ``items``
    (in place): dim=1, the block's rows are those items and its columns the items from
    ``offset``; dim=0, the other way round."""
    v, i = topk_exact(scores, min(k, scores.shape[dim]), dim)
    values[items], indices[items] = merge_topk(values[items], indices[items], v, i + offset, k)


def block_topk(
    query: Tensor,
    gallery: Tensor,
    blocks: list[range],
    k: int,
    self_index: Tensor | None,
    buffer: Tensor,
    keep_scores: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, list[Tensor]]:
    """Exact top-k of one query chunk (c, d), scoring the gallery a column block at a time.

    Each block's scores are reduced to its top list and merged into a running list. With
    ``keep_scores`` the blocks are laid out one after another in ``buffer`` (which must hold
    c x G floats) and returned too, as a list of (c, len(block)) views; otherwise every block
    reuses the front of ``buffer``.
    """
    best_v = best_i = None
    kept, offset = [], 0
    for block in blocks:
        scores = scores_into(query, gallery[block.start : block.stop], buffer, offset)
        mask_self(scores, self_index, block.start)
        v, i = topk_exact(scores, min(k, len(block)))
        i += block.start
        if best_v is None:
            best_v, best_i = v, i
        else:
            best_v, best_i = merge_topk(best_v, best_i, v, i, k)
        if keep_scores:
            kept.append(scores)
            offset += scores.numel()
    if keep_scores:
        return best_v, best_i, kept
    return best_v, best_i


# --------------------------------------------------------------------------------------------
# faiss backends


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError(
            "this backend needs faiss (pip install faiss-cpu); backend='torch' works without it"
        ) from error
    return faiss


class FaissSearcher:
    """A faiss index over a gallery, searched with the deepmetric tie rule.

    backend: "faiss" (``IndexFlatIP``, exact), "faiss-ivf" (``IndexIVFFlat``, inner product;
    options ``nlist`` = round(sqrt(G)), ``nprobe`` = 16, ``train_size`` = 64 * nlist,
    ``seed`` = 0) or "faiss-hnsw" (``IndexHNSWFlat``, inner product; options ``m`` = 32,
    ``ef_construction`` = 80, ``ef_search`` = 128). The index holds its own copy of the gallery
    (G * d * 4 bytes), outside the evaluation memory budget. ``build_seconds`` records the
    construction time (training + adding).
    """

    def __init__(
        self, gallery: Tensor, backend: str = "faiss", options: Mapping[str, Any] | None = None
    ) -> None:
        faiss = _import_faiss()
        options = dict(options or {})
        x = np.ascontiguousarray(gallery.detach().cpu().numpy(), dtype=np.float32)
        num, dim = x.shape
        self.backend = backend
        self.num_gallery = num
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
            self._quantizer = quantizer  # keep a Python reference alive with the index
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
        self.exact = backend == "faiss"

    def _raw_search(self, query: np.ndarray, k: int, self_index: Tensor | None):
        scores, indices = self.index.search(query, k)
        values = torch.from_numpy(scores)
        indices = torch.from_numpy(indices)
        values[indices < 0] = float("-inf")  # missing results of approximate indexes
        if self_index is not None:
            values[indices == self_index[:, None]] = float("-inf")
        return order_ties(values, indices)

    def search(
        self, query: Tensor, k: int, self_index: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Top-k of ``query`` (c, d); ``self_index`` (c,) excludes each row's own gallery item.

        Returns values (c, k) float32 and indices (c, k) int64 on the CPU (index -1 with value
        -inf where an approximate index found fewer than k items).
        """
        q = np.ascontiguousarray(query.detach().cpu().numpy(), dtype=np.float32)
        if self_index is not None:
            self_index = self_index.cpu()
        length = min(self.num_gallery, k + 1 + (self_index is not None))
        values, indices = self._raw_search(q, length, self_index)
        if self.exact:
            # a tie across the cut: search those rows again with a longer list until it ends
            # on a strict inequality (or covers the whole gallery)
            tied = (values[:, k - 1] == values[:, k]).nonzero().flatten() if length > k else None
            while tied is not None and tied.numel() > 0 and length < self.num_gallery:
                length = min(self.num_gallery, 2 * length)
                sub_self = None if self_index is None else self_index[tied]
                v, i = self._raw_search(q[tied.numpy()], length, sub_self)
                values[tied] = v[:, : values.shape[1]]
                indices[tied] = i[:, : values.shape[1]]
                still = v[:, k - 1] == v[:, k] if length > k else torch.zeros_like(tied, dtype=bool)
                tied = tied[still]
        return values[:, :k].contiguous(), indices[:, :k].contiguous()


# --------------------------------------------------------------------------------------------
# public API


def resolve_backend(backend: str) -> str:
    """Validate a backend name; "auto" means "torch" (exact, any device, no faiss needed)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return "torch" if backend == "auto" else backend


def knn(
    query: Tensor | np.ndarray,
    gallery: Tensor | np.ndarray | None,
    k: int,
    *,
    exclude_self: bool = False,
    backend: str = "auto",
    memory_budget_bytes: int = 2**30,
    index_options: Mapping[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k gallery items of each query by inner product, in bounded memory.

    Args:
        query: (Q, d) embeddings (L2-normalised for cosine similarity).
        gallery: (G, d) embeddings, or None for the query set itself: then the torch backend
            computes each score of the symmetric Q x Q matrix once (:func:`knn_self`) when
            the Q x k lists fit the budget (pass the same tensor twice to avoid this).
        k: number of neighbours, 1 <= k <= G (G - 1 with ``exclude_self``).
        exclude_self: query i and gallery i are the same item (requires Q == G); its own
            gallery index gets score -inf, by index, so it is never returned.
        backend: "auto" (= "torch"), "torch" (exact, on the inputs' device), "faiss"
            (``IndexFlatIP``, exact, CPU), "faiss-ivf" or "faiss-hnsw" (approximate, CPU; see
            :class:`FaissSearcher` for ``index_options``).
        memory_budget_bytes: bound on the working memory beyond inputs and outputs
            (default 1 GiB); sets the query chunk size (:func:`plan_knn`), and a narrower
            gallery block when ``MIN_QUERY_ROWS`` rows against one block would not fit.
        index_options: options of the approximate faiss indexes.

    Returns:
        (similarities (Q, k) float32, indices (Q, k) int64) on the query's device, each row
        sorted by score descending, then gallery index ascending.
    """
    q = as_embeddings(query, "query")
    g = q if gallery is None else as_embeddings(gallery, "gallery")
    check_same_space(q, g)
    backend = resolve_backend(backend)
    num_query, num_gallery = q.shape[0], g.shape[0]
    if exclude_self and num_query != num_gallery:
        raise ValueError(
            f"exclude_self needs query i = gallery i: got {num_query} queries, {num_gallery} "
            "gallery items"
        )
    available = num_gallery - int(exclude_self)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= available:
        raise ValueError(f"k must be an integer in [1, {available}], got {k!r}")
    self_index = torch.arange(num_query, device=q.device) if exclude_self else None
    if index_options and backend not in APPROXIMATE_BACKENDS:
        raise ValueError(f"index_options only apply to {APPROXIMATE_BACKENDS}")
    if backend == "torch":
        block = plan_self_block(num_query, k, memory_budget_bytes) if gallery is None else 0
        if block:
            return knn_self(q, k, exclude_self, block)
        query_chunk, gallery_chunk = plan_knn(
            num_query, num_gallery, k, memory_budget_bytes, q.device
        )
        return knn_torch(q, g, k, self_index, query_chunk, gallery_chunk)
    searcher = FaissSearcher(g, backend, index_options)
    query_chunk = max(1, memory_budget_bytes // (2 * LIST_BYTES * (k + 2)))
    values, indices = [], []
    for q0 in range(0, num_query, query_chunk):
        q1 = min(num_query, q0 + query_chunk)
        chunk_self = None if self_index is None else self_index[q0:q1]
        v, i = searcher.search(q[q0:q1], k, chunk_self)
        values.append(v)
        indices.append(i)
    return torch.cat(values).to(q.device), torch.cat(indices).to(q.device)


def ann_agreement(
    query: Tensor | np.ndarray,
    gallery: Tensor | np.ndarray | None = None,
    k: int = 10,
    *,
    backend: str = "faiss-ivf",
    index_options: Mapping[str, Any] | None = None,
    num_samples: int = 10_000,
    seed: int = 0,
    exclude_self: bool | None = None,
    memory_budget_bytes: int = 2**30,
) -> dict[str, Any]:
    """How well an approximate index agrees with exact search, on a sample of queries.

    Builds the ``backend`` index over ``gallery`` (the query set when None, with the query's own
    item excluded by index), searches ``num_samples`` queries drawn without replacement
    (seeded), and compares with exact torch search of the same queries.

    Returns a dict: "recall@1" (fraction of sampled queries whose approximate first result is
    the exact nearest neighbour, by index), "top_k_agreement" (mean |approx top-k ∩ exact
    top-k| / k), "k", "num_samples", "build_s", "search_s", "exact_s" (seconds), and the
    tensors "sample_index" (S,), "approx_indices" (S, k), "exact_indices" (S, k).
    """
    if backend not in (*APPROXIMATE_BACKENDS, "faiss"):
        raise ValueError(f"backend must be a faiss backend, got {backend!r}")
    q = as_embeddings(query, "query")
    g = q if gallery is None else as_embeddings(gallery, "gallery")
    check_same_space(q, g)
    if exclude_self is None:
        exclude_self = gallery is None
    if exclude_self and q.shape[0] != g.shape[0]:
        raise ValueError("exclude_self needs query i = gallery i (same number of rows)")
    available = g.shape[0] - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"k must be in [1, {available}], got {k}")
    generator = torch.Generator().manual_seed(seed)
    count = min(num_samples, q.shape[0])
    sample = torch.randperm(q.shape[0], generator=generator)[:count].sort().values
    sample_q = q[sample.to(q.device)]
    self_index = sample.to(q.device) if exclude_self else None

    searcher = FaissSearcher(g, backend, index_options)
    start = time.perf_counter()
    _, approx_i = searcher.search(sample_q, k, None if self_index is None else sample)
    search_s = time.perf_counter() - start

    start = time.perf_counter()
    query_chunk, gallery_chunk = plan_knn(count, g.shape[0], k, memory_budget_bytes, q.device)
    _, exact_i = knn_torch(sample_q, g, k, self_index, query_chunk, gallery_chunk)
    exact_s = time.perf_counter() - start
    exact_i = exact_i.cpu()

    top1 = (approx_i[:, 0] == exact_i[:, 0]).double().mean().item()
    overlap = (approx_i[:, :, None] == exact_i[:, None, :]).any(dim=2).sum(dim=1)
    return {
        "recall@1": top1,
        "top_k_agreement": (overlap.double() / k).mean().item(),
        "k": k,
        "num_samples": count,
        "build_s": searcher.build_seconds,
        "search_s": search_s,
        "exact_s": exact_s,
        "sample_index": sample,
        "approx_indices": approx_i,
        "exact_indices": exact_i,
    }
