"""Training-free re-ranking of retrieval lists: k-reciprocal encoding with Jaccard distance
(Zhong, Zheng, Cao, Li, CVPR 2017) and alpha-query expansion with optional database-side
augmentation (Radenovic, Tolias, Chum, TPAMI 2018).

One entry point serves :func:`~.retrieval.evaluate`, ``Retriever.search`` and
``deepmetric search``, so all three give the same lists::

    indices, scores = rerank("k_reciprocal", query, gallery, k=10, options={"k1": 20})

- ``k_reciprocal`` (options ``k1`` = 20, ``k2`` = 6, ``lambda_value`` = 0.3, the released
  code's defaults; ``candidates`` = 100). Every item of the pool (queries and gallery; the
  query set alone when it is its own gallery) gets a sparse vector V over the pool from its
  expanded k-reciprocal neighbours; the first ``candidates`` items of each query's list are
  re-ordered by d* = (1 - lambda) d_Jaccard(V_q, V_g) + lambda D(q, g), D the squared
  distance of the L2-normalised embeddings divided by its row maximum. The items after them
  keep their original order. Scores are 1 - d*. Memory O(N k1), never N x N.
- ``alpha_qe`` (options ``alpha`` = 3, ``n`` = 2, ``dba`` = false): each query becomes
  normalise(q + sum_{i<=n} max(q.d_i, 0)^alpha d_i) over its top-n gallery items and is
  searched again; with ``dba`` every gallery vector is first replaced by the same
  combination of itself and its top-n other gallery items. Scores are inner products of the
  expanded vectors.

Depends on :mod:`.neighbours` (exact search), :mod:`.blocks` and :mod:`.topk` (the pool's
neighbour lists under the tie rule).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .blocks import LIST_BYTES, SCORE_BYTES, even_ranges, exact_float32, scores_into
from .checks import as_embeddings, as_self_index, check_same_space
from .neighbours import Neighbours, search
from .ranks import first_positive_in_lists
from .topk import order_ties, topk_exact

__all__ = [
    "OPTIONS",
    "RERANK_NAMES",
    "KReciprocal",
    "RerankError",
    "Reranking",
    "SparseRows",
    "alpha_qe",
    "check_rerank",
    "expand_queries",
    "k_reciprocal",
    "prepare_rerank",
    "rerank",
]

RERANK_NAMES = ("none", "k_reciprocal", "alpha_qe")


class RerankError(ValueError):
    """A re-ranking name, option or size the user chose that cannot work (one line)."""


@dataclass(frozen=True)
class Option:
    """One re-ranking option: default, type (int, float or bool), lowest and highest value."""

    default: Any
    kind: type
    low: float | None = None
    high: float | None = None


# The options of each re-ranking, with their defaults (sources in docs and module docstring).
OPTIONS: dict[str, dict[str, Option]] = {
    "none": {},
    "k_reciprocal": {
        "k1": Option(20, int, 1),  # released code (Zhong et al.)
        "k2": Option(6, int, 1),  # released code
        "lambda_value": Option(0.3, float, 0.0, 1.0),  # released code
        "candidates": Option(None, int, 1),  # None: 100, or the whole gallery when smaller
    },
    "alpha_qe": {
        "alpha": Option(3.0, float, 0.0),  # Radenovic et al.
        "n": Option(2, int, 0),  # ours: few positives per class in DML sets (SOP: ~4)
        "dba": Option(False, bool),
    },
}
DEFAULT_CANDIDATES = 100


def check_rerank(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options of re-ranking ``name`` with defaults filled in; RerankError (one line)
    for an unknown name, an unknown option (the message starts with the key) or a value of
    the wrong type or range.

    >>> check_rerank("alpha_qe", {"n": 5})
    {'alpha': 3.0, 'n': 5, 'dba': False}
    """
    if name not in OPTIONS:
        raise RerankError(f"unknown re-ranking {name!r}; expected one of: {', '.join(OPTIONS)}")
    accepted = OPTIONS[name]
    out = {key: option.default for key, option in accepted.items()}
    for key, value in (options or {}).items():
        if key not in accepted:
            raise RerankError(
                f"{key}: not an option of re-ranking {name!r}; expected one of: "
                f"{', '.join(accepted) or '(none)'}"
            )
        option = accepted[key]
        if value is None and option.default is None:
            out[key] = None
            continue
        if option.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        right_type = isinstance(value, option.kind) and (
            option.kind is bool or not isinstance(value, bool)
        )
        low_ok = option.low is None or (right_type and value >= option.low)
        high_ok = option.high is None or (right_type and value <= option.high)
        if not (right_type and low_ok and high_ok):
            raise RerankError(f"{key}: expected {_describe(option)}, got {value!r}")
        out[key] = value
    return out


def _describe(option: Option) -> str:
    kind = {int: "an integer", float: "a number", bool: "true or false"}[option.kind]
    if option.low is None:
        return kind
    if option.high is None:
        return f"{kind} >= {option.low:g}"
    return f"{kind} in [{option.low:g}, {option.high:g}]"


def _too_large(what: str, value: int, available: int) -> RerankError:
    return RerankError(
        f"re-ranking with k larger than the gallery: {what}={value}, but a query can "
        f"retrieve {available} gallery items"
    )


# --------------------------------------------------------------------------- sparse rows


@dataclass(frozen=True)
class SparseRows:
    """Rows of an (N, M) matrix in CSR form: row i holds ``indices[indptr[i]:indptr[i+1]]``
    (ascending) with ``values`` at the same positions."""

    indptr: Tensor  # (N + 1,) int64
    indices: Tensor  # (nnz,) int64
    values: Tensor  # (nnz,) float64
    width: int  # M

    @property
    def counts(self) -> Tensor:
        return self.indptr[1:] - self.indptr[:-1]

    def row_of_entry(self) -> Tensor:
        """(nnz,) int64: the row of every stored entry."""
        rows = torch.arange(self.counts.numel(), device=self.indptr.device)
        return torch.repeat_interleave(rows, self.counts)

    def positions(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The entries of ``rows`` (P,), concatenated: (entry positions, owner 0..P-1)."""
        counts = self.counts[rows]
        total = int(counts.sum())
        owner = torch.repeat_interleave(
            torch.arange(rows.numel(), device=rows.device), counts, output_size=total
        )
        shift = self.indptr[rows] - (torch.cumsum(counts, 0) - counts)  # entry j of row r
        return torch.arange(total, device=rows.device) + shift[owner], owner

    def to_dense(self) -> Tensor:
        """(N, M) float64 (for tests on small sets)."""
        out = torch.zeros(self.counts.numel(), self.width, dtype=torch.float64)
        out[self.row_of_entry().cpu(), self.indices.cpu()] = self.values.cpu()
        return out


def _csr(counts: Tensor, indices: Tensor, values: Tensor, width: int) -> SparseRows:
    indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=indptr[1:])
    return SparseRows(indptr, indices, values, width)


# --------------------------------------------------------------------------- k-reciprocal


def _pool_neighbours(pool: Tensor, length: int, budget: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each pool item's ``length`` nearest pool items (itself included) by inner product,
    under the tie rule, and its farthest pool item (lowest inner product), in one chunked
    pass. Returns indices (N, length) int64, scores (N, length) float32, farthest (N,) int64."""
    num = pool.shape[0]
    rows = max(1, budget // (SCORE_BYTES * num + 2 * LIST_BYTES * (length + 1)))
    indices = torch.empty(num, length, dtype=torch.int64, device=pool.device)
    values = torch.empty(num, length, device=pool.device)
    farthest = torch.empty(num, dtype=torch.int64, device=pool.device)
    buffer = torch.empty(min(rows, num) * num, device=pool.device)
    with exact_float32(pool.device):
        for chunk in even_ranges(num, rows):
            part = slice(chunk.start, chunk.stop)
            scores = scores_into(pool[part], pool, buffer)
            farthest[part] = scores.argmin(dim=1)
            values[part], indices[part] = topk_exact(scores, length)
    return indices, values, farthest


def _reciprocal(neighbours: Tensor, width: int, chunk: int) -> Tensor:
    """(N, width) bool: entry p of row i is reciprocal, i.e. i is among the first ``width``
    neighbours of item neighbours[i, p] (p < width)."""
    head = neighbours[:, :width]
    out = torch.empty(head.shape, dtype=torch.bool, device=head.device)
    for rows in even_ranges(head.shape[0], chunk):
        own = torch.arange(rows.start, rows.stop, device=head.device)
        back = head[head[rows.start : rows.stop]]  # (c, width, width)
        out[rows.start : rows.stop] = (back == own[:, None, None]).any(dim=2)
    return out


def _squared_distance(pool: Tensor, norms: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """||x_a - x_b||^2 = 2 - 2 cos(a, b) of the L2-normalised pool rows, in float64, for
    the pairs (a[j], b[j]); pool (N, d) float32 as given, norms (N,) float64 its row norms;
    a, b (P,) int64. Returns (P,) float64."""
    out = torch.empty(a.numel(), dtype=torch.float64, device=pool.device)
    step = max(1, 2**21 // pool.shape[1])
    for s in range(0, a.numel(), step):
        i, j = a[s : s + step], b[s : s + step]
        cos = (pool[i].double() * pool[j].double()).sum(dim=1) / (norms[i] * norms[j])
        out[s : s + step] = (2.0 - 2.0 * cos).clamp(min=0)
    return out


@dataclass(frozen=True)
class KReciprocal:
    """k-reciprocal encoding of a pool of N items (Zhong et al. 2017, as released).

    With D[i, j] = ||x_i - x_j||^2 / max_j ||x_i - x_j||^2 (L2-normalised x; squared
    distance divided by its row maximum), rank[i] the pool by D[i] ascending (itself first):

    - R(i) = {j in rank[i][:k1+1] : i in rank[j][:k1+1]} (k-reciprocal set, holds i);
    - R*(i) = R(i), plus R_h(c) for every c in R(i) with |R_h(c) & R(i)| > 2/3 |R_h(c)|,
      where R_h is the same set with h = round(k1 / 2) (round half to even) in place of k1;
    - V[i, j] = exp(-D[i, j]) / sum_{m in R*(i)} exp(-D[i, m]) for j in R*(i), else 0;
    - with k2 > 1, V_qe[i] = mean of V[j] over j in rank[i][:k2] (local query expansion);
    - d_J(i, j) = 1 - S / (2 - S), S = sum_m min(V_qe[i, m], V_qe[j, m]);
    - d*(i, j) = (1 - lambda) d_J(i, j) + lambda D[i, j].

    Built from the top-(k1 + 1) lists only: ``neighbours`` (N, L) int64 (L = max(k1 + 1,
    k2)), ``reciprocal`` (N, k1 + 1) bool (R(i) membership of each list entry), ``row_max``
    (N,) float64, ``encoding`` V and ``expanded`` V_qe as :class:`SparseRows` (N, N).
    D inside V is computed in float64; the D term of d* for the candidate pairs is a float32
    product (one batched matmul; error about 1e-7, so near-ties of d* may order either way).
    """

    pool: Tensor  # (N, d) float32, as given
    norms: Tensor  # (N,) float64 row norms of the pool
    neighbours: Tensor
    reciprocal: Tensor
    row_max: Tensor
    encoding: SparseRows
    expanded: SparseRows
    lambda_value: float

    @classmethod
    def build(
        cls,
        pool: Tensor,
        k1: int = 20,
        k2: int = 6,
        lambda_value: float = 0.3,
        memory_budget_bytes: int = 2**30,
    ) -> KReciprocal:
        """Encode the pool (N, d); k1 + 1 and k2 at most N."""
        num = pool.shape[0]
        if k1 + 1 > num or k2 > num:
            raise ValueError(f"k1 + 1 = {k1 + 1} and k2 = {k2} must be at most the pool's {num}")
        pool = pool.float()
        norms = pool.double().norm(dim=1).clamp(min=1e-300)
        length = max(k1 + 1, k2)
        unit = torch.nn.functional.normalize(pool, dim=1)
        neighbours, _, farthest = _pool_neighbours(unit, length, memory_budget_bytes)
        del unit
        everyone = torch.arange(num, device=pool.device)
        row_max = _squared_distance(pool, norms, everyone, farthest)
        row_max = torch.where(row_max > 0, row_max, torch.ones_like(row_max))  # all-equal pool
        width, half = k1 + 1, round(k1 / 2) + 1
        chunk = max(1, 2**22 // (width * width * half))
        reciprocal = _reciprocal(neighbours, width, chunk)
        sets = _expanded_sets(neighbours[:, :width], reciprocal, half, chunk)
        rows = sets.row_of_entry()
        distance = _squared_distance(pool, norms, rows, sets.indices) / row_max[rows]
        weight = torch.exp(-distance)
        total = torch.zeros(num, dtype=torch.float64, device=pool.device)
        total.index_add_(0, rows, weight)
        encoding = replace(sets, values=weight / total[rows])
        expanded = encoding
        if k2 != 1:
            expanded = _mean_of_rows(encoding, neighbours[:, :k2], memory_budget_bytes)
        return cls(pool, norms, neighbours, reciprocal, row_max, encoding, expanded, lambda_value)

    def distances(self, a: Tensor, b: Tensor, memory_budget_bytes: int = 2**30) -> Tensor:
        """d* of pool rows ``a`` (c,) against pool rows ``b`` (c, m) (-1 = no item: inf).
        Returns (c, m) float64."""
        num, (count, width) = self.pool.shape[0], b.shape
        out = torch.full((count, width), float("inf"), dtype=torch.float64, device=b.device)
        if out.numel() == 0:
            return out
        v = self.expanded
        mean_row = max(1.0, v.indices.numel() / max(1, num))
        # per query row: a dense row of V_qe (8 N bytes), about 128 bytes per gathered entry
        # (positions, columns, values, their minimum, in int64 / float64) and the candidates'
        # vectors (4 d bytes each)
        dim = self.pool.shape[1]
        per_row = 8 * num + 128 * width * mean_row + 8 * width * dim
        rows = max(1, int(memory_budget_bytes // per_row))
        dense = torch.zeros(min(rows, count) * num, dtype=torch.float64, device=b.device)
        for chunk in even_ranges(count, rows):
            part = slice(chunk.start, chunk.stop)
            mine, theirs = a[part], b[part]
            # the chunk's query rows of V_qe, written densely
            entries, owner = v.positions(mine)
            slots = owner * num + v.indices[entries]
            dense[slots] = v.values[entries]
            # S = sum_m min(V_qe[i, m], V_qe[j, m]) over the stored entries of each j (-1: none)
            near = theirs.clamp(min=0).reshape(-1)
            found, pair = v.positions(near)
            row_of_pair = torch.div(pair, width, rounding_mode="floor")
            mins = torch.minimum(dense[row_of_pair * num + v.indices[found]], v.values[found])
            shared = torch.zeros(near.numel(), dtype=torch.float64, device=b.device)
            shared.index_add_(0, pair, mins)
            jaccard = (1.0 - shared / (2.0 - shared)).view(len(chunk), width)
            # D of the pairs: float32 products (one batched matmul), divided by the norms
            products = torch.bmm(
                self.pool[near].view(len(chunk), width, -1), self.pool[mine, :, None]
            )
            cos = products[:, :, 0].double() / (
                self.norms[mine, None] * self.norms[near].view_as(jaccard)
            )
            original = (2.0 - 2.0 * cos).clamp(min=0) / self.row_max[mine, None]
            lam = self.lambda_value
            value = (1 - lam) * jaccard + lam * original
            out[part] = value.masked_fill(theirs < 0, float("inf"))
            dense[slots] = 0.0
        return out


def _expanded_sets(head: Tensor, reciprocal: Tensor, half: int, chunk: int) -> SparseRows:
    """R*(i) of every pool item as sparse rows (values 1): head (N, k1 + 1) neighbour lists,
    reciprocal (N, k1 + 1) their R(i) membership, half = round(k1 / 2) + 1."""
    num = head.shape[0]
    half_reciprocal = _reciprocal(head, half, chunk)  # R_h(c) membership of rank[c][:half]
    half_size = half_reciprocal.sum(dim=1)
    counts, columns = [], []
    for rows in even_ranges(num, chunk):
        members = head[rows.start : rows.stop]  # (c, W) rank[i][:k1+1]
        in_r = reciprocal[rows.start : rows.stop]  # (c, W) member of R(i)
        their = head[members, :half]  # (c, W, h) rank[member][:h+1]
        their_r = half_reciprocal[members]  # (c, W, h) member of R_h(member)
        # |R_h(c) & R(i)| for every list entry c of row i
        in_mine = ((their[..., None] == members[:, None, None, :]) & in_r[:, None, None, :]).any(
            dim=3
        )
        overlap = (in_mine & their_r).sum(dim=2)
        accept = in_r & (3 * overlap > 2 * half_size[members])  # |.| > 2/3 |R_h(c)|
        sets = torch.cat(
            [
                torch.where(in_r, members, num),
                torch.where(their_r & accept[..., None], their, num).flatten(1),
            ],
            dim=1,
        )
        sets = torch.sort(sets, dim=1).values
        repeated = torch.zeros_like(sets, dtype=torch.bool)
        repeated[:, 1:] = sets[:, 1:] == sets[:, :-1]
        keep = (sets < num) & ~repeated
        counts.append(keep.sum(dim=1))
        columns.append(sets[keep])
    indices = torch.cat(columns)
    values = torch.ones(indices.numel(), dtype=torch.float64, device=head.device)
    return _csr(torch.cat(counts), indices, values, num)


def _mean_of_rows(v: SparseRows, lists: Tensor, budget: int) -> SparseRows:
    """Row i = mean of the rows lists[i] (N, k2) of ``v``, as sparse rows."""
    num, k2 = lists.shape
    mean_row = max(1.0, v.indices.numel() / max(1, num))
    rows = max(1, int(budget // (128 * k2 * mean_row)))
    counts, columns, values = [], [], []
    for chunk in even_ranges(num, rows):
        sources = lists[chunk.start : chunk.stop].reshape(-1)
        entries, owner = v.positions(sources)
        keys = (owner // k2) * num + v.indices[entries]
        unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        sums = torch.zeros(unique.numel(), dtype=torch.float64, device=lists.device)
        sums.index_add_(0, inverse, v.values[entries])
        counts.append(torch.bincount(unique // num, minlength=len(chunk)))
        columns.append(unique % num)
        values.append(sums / k2)
    return _csr(torch.cat(counts), torch.cat(columns), torch.cat(values), num)


# --------------------------------------------------------------------------- alpha-QE


def expand_queries(
    x: Tensor,
    database: Tensor,
    n: int,
    alpha: float,
    self_index: Tensor | None = None,
    memory_budget_bytes: int = 2**30,
) -> Tensor:
    """alpha-QE: normalise(x + sum_{i<=n} max(x.d_i, 0)^alpha d_i), d_i the top-n rows of
    ``database`` (G, d) for each row of ``x`` (Q, d), its own item (``self_index``, -1 =
    none) excluded. alpha = 0 is average query expansion; n = 0 returns ``x`` unchanged.
    Returns (Q, d) float32."""
    if n == 0:
        return x
    found = search(x, database, n, self_index=self_index, memory_budget_bytes=memory_budget_bytes)
    weight = found.scores.clamp(min=0).pow(alpha)  # (Q, n); 0^0 = 1
    out = x.clone()
    step = max(1, 2**22 // (n * x.shape[1]))
    for s in range(0, x.shape[0], step):
        rows = slice(s, s + step)
        out[rows] += (weight[rows, :, None] * database[found.indices[rows]]).sum(dim=1)
    return torch.nn.functional.normalize(out, dim=1)


# --------------------------------------------------------------------------- entry points


@dataclass(frozen=True)
class Reranking:
    """A re-ranking prepared for one query set and gallery (:func:`prepare_rerank`): search
    ``query`` against ``gallery`` (None: the query set itself), then re-order the first
    ``candidates`` items of each list with :meth:`reorder` (k-reciprocal; 0: none)."""

    query: Tensor  # (Q, d) the vectors to search with
    gallery: Tensor | None  # (G, d), or None: the query set itself
    candidates: int = 0
    encoding: KReciprocal | None = None
    query_rows: Tensor | None = None  # (Q,) pool row of each query
    gallery_offset: int = 0  # pool row of gallery item 0
    budget: int = 2**30

    def rows(self, rows: Tensor) -> Reranking:
        """The same re-ranking for a subset of the queries (bool mask or indices)."""
        query_rows = None if self.query_rows is None else self.query_rows[rows]
        return replace(self, query=self.query[rows], query_rows=query_rows)

    def scores(self, rows: slice, indices: Tensor) -> Tensor:
        """1 - d* of queries ``rows`` against their gallery items ``indices`` (c, m), float64
        (-inf where the index is -1)."""
        pool_cols = torch.where(indices >= 0, indices + self.gallery_offset, -1)
        return 1.0 - self.encoding.distances(self.query_rows[rows], pool_cols, self.budget)

    def reorder(self, rows: slice, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Lists (c, L) of queries ``rows``: the first ``candidates`` ordered by d* ascending
        (then gallery index), the rest as they were. Returns the lists and their 1 - d*
        scores (c, min(L, candidates))."""
        head = indices[:, : self.candidates]
        scores, head = order_ties(self.scores(rows, head), head)  # float64: no float32 ties
        return torch.cat([head, indices[:, self.candidates :]], dim=1), scores.float()

    def apply(
        self, rows: slice, found: Neighbours, query_labels: Tensor, gallery_labels: Tensor
    ) -> Neighbours:
        """``found`` (lists of queries ``rows``) with the first ``candidates`` re-ordered and
        the first-positive ranks updated: a first positive beyond them keeps its rank."""
        if self.candidates == 0:
            return found
        indices, head_scores = self.reorder(rows, found.indices)
        scores = torch.cat([head_scores, found.scores[:, self.candidates :]], dim=1)
        first = found.first_positive
        if first is not None:
            width = min(self.candidates, indices.shape[1])
            head = first_positive_in_lists(indices[:, :width], query_labels, gallery_labels)
            first = torch.where(head < width, head, first).clamp(max=found.rank_limit)
        return Neighbours(indices, scores, found.num_relevant, first, found.rank_limit)


def prepare_rerank(
    name: str,
    query: Tensor,
    gallery: Tensor | None = None,
    self_index: Tensor | None = None,
    options: dict[str, Any] | None = None,
    memory_budget_bytes: int = 2**30,
) -> Reranking:
    """Prepare re-ranking ``name`` ("none", "k_reciprocal", "alpha_qe") of ``query`` (Q, d)
    against ``gallery`` (G, d), or the query set itself (gallery None, each query's own
    item excluded), with ``self_index`` (Q,) each query's own gallery item (-1 = none).

    k_reciprocal: the pool is the gallery plus the queries without an own item (placed
    first, as in the paper's [queries; gallery]); a query with an own item is that item.
    ``memory_budget_bytes`` bounds the chunks; the encoding itself (about N (k1 + 1) * 13
    bytes plus 16 bytes per stored V entry) comes on top.
    """
    options = check_rerank(name, options)
    same_set = gallery is None
    num_query = query.shape[0]
    num_gallery = num_query if same_set else gallery.shape[0]
    if same_set:
        self_index = torch.arange(num_query, device=query.device)
    own = None if self_index is None else self_index >= 0
    available = num_gallery - int(own is not None and bool(own.any()))
    if name == "none":
        return Reranking(query, gallery, budget=memory_budget_bytes)
    if name == "alpha_qe":
        n, alpha = options["n"], options["alpha"]
        if n > available or (options["dba"] and n > num_gallery - 1):
            raise _too_large("n", n, available if not options["dba"] else num_gallery - 1)
        database = query if same_set else gallery
        if options["dba"]:
            everyone = torch.arange(num_gallery, device=database.device)
            database = expand_queries(database, database, n, alpha, everyone, memory_budget_bytes)
        searched = expand_queries(query, database, n, alpha, self_index, memory_budget_bytes)
        return Reranking(searched, database, budget=memory_budget_bytes)
    k1, k2, candidates = options["k1"], options["k2"], options["candidates"]
    for key in ("k1", "k2", "candidates"):
        if options[key] is not None and options[key] > available:
            raise _too_large(key, options[key], available)
    candidates = min(DEFAULT_CANDIDATES, available) if candidates is None else candidates
    if same_set:
        pool, query_rows, offset = query, torch.arange(num_query, device=query.device), 0
    else:
        alone = (
            torch.ones(num_query, dtype=torch.bool, device=query.device) if own is None else ~own
        )
        offset = int(alone.sum())
        pool = torch.cat([query[alone], gallery])
        query_rows = torch.empty(num_query, dtype=torch.int64, device=query.device)
        query_rows[alone] = torch.arange(offset, device=query.device)
        if own is not None:
            query_rows[own] = offset + self_index[own]
    # half the budget: evaluate's lists of a group stay alive while they are re-ordered
    budget = memory_budget_bytes // 2
    encoding = KReciprocal.build(pool, k1, k2, options["lambda_value"], budget)
    return Reranking(query, gallery, candidates, encoding, query_rows, offset, budget=budget)


def rerank(
    name: str,
    query: Tensor | np.ndarray,
    gallery: Tensor | np.ndarray | None = None,
    k: int = 10,
    options: dict[str, Any] | None = None,
    *,
    self_index: Tensor | np.ndarray | None = None,
    memory_budget_bytes: int = 2**30,
) -> tuple[Tensor, Tensor]:
    """The k best gallery items of each query after re-ranking ``name`` (exact search).

    Args:
        name: "none", "k_reciprocal" or "alpha_qe"; options: see :data:`OPTIONS`.
        query: (Q, d) L2-normalised embeddings; gallery: (G, d), or None for the query set
            itself (each query's own item excluded, the DML benchmarks' protocol).
        self_index: (Q,) each query's own gallery item (-1 = none), never returned.

    Returns:
        indices (Q, k) int64 gallery indices in rank order, scores (Q, k) float32: inner
        products (none, alpha_qe: of the expanded vectors) or 1 - d* (k_reciprocal; in
        order within the first ``candidates``, after which the original order is kept).
    """
    query = as_embeddings(query, "query")
    if gallery is not None:
        gallery = as_embeddings(gallery, "gallery")
        check_same_space(query, gallery)
        if self_index is not None:
            self_index = as_self_index(self_index, len(query), len(gallery), query.device)
    elif self_index is not None:
        raise ValueError("self_index needs a gallery (without one, self is excluded)")
    prepared = prepare_rerank(name, query, gallery, self_index, options, memory_budget_bytes)
    length = max(k, prepared.candidates)
    own = torch.arange(len(query), device=query.device) if gallery is None else self_index
    found = search(
        prepared.query,
        prepared.gallery,
        length,
        self_index=own,
        memory_budget_bytes=memory_budget_bytes,
    )
    indices, scores = found.indices, found.scores
    if prepared.candidates:
        rows = slice(0, len(query))
        indices, head_scores = prepared.reorder(rows, indices)
        tail = prepared.scores(rows, indices[:, prepared.candidates : k]).float()
        scores = torch.cat([head_scores, tail], dim=1)
    return indices[:, :k], scores[:, :k]


def k_reciprocal(
    query: Tensor | np.ndarray,
    gallery: Tensor | np.ndarray | None = None,
    k: int = 10,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    candidates: int | None = None,
    self_index: Tensor | np.ndarray | None = None,
    memory_budget_bytes: int = 2**30,
) -> tuple[Tensor, Tensor]:
    """:func:`rerank` with k-reciprocal re-ranking (see :class:`KReciprocal`); candidates
    None = 100, or the whole gallery when smaller."""
    options = {"k1": k1, "k2": k2, "lambda_value": lambda_value, "candidates": candidates}
    return rerank(
        "k_reciprocal",
        query,
        gallery,
        k,
        options,
        self_index=self_index,
        memory_budget_bytes=memory_budget_bytes,
    )


def alpha_qe(
    query: Tensor | np.ndarray,
    gallery: Tensor | np.ndarray | None = None,
    k: int = 10,
    *,
    alpha: float = 3.0,
    n: int = 2,
    dba: bool = False,
    self_index: Tensor | np.ndarray | None = None,
    memory_budget_bytes: int = 2**30,
) -> tuple[Tensor, Tensor]:
    """:func:`rerank` with alpha-query expansion (see :func:`expand_queries`), and with
    ``dba`` database-side augmentation of the gallery first."""
    options = {"alpha": alpha, "n": n, "dba": dba}
    return rerank(
        "alpha_qe",
        query,
        gallery,
        k,
        options,
        self_index=self_index,
        memory_budget_bytes=memory_budget_bytes,
    )
