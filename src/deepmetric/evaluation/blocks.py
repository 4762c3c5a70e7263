"""Chunk planning and score blocks of the torch search: the memory model that turns a byte
budget into chunk sizes, and the float32 score blocks ``query_rows @ gallery.T``.

Exact copies of a gallery vector must get equal scores (then the tie rule orders them by
index), but a BLAS may multiply narrow products with kernels that round by position. So
chunks and blocks are cut into nearly equal parts (:func:`even_ranges`: no sliver of a few
rows or columns multiplied apart from the rest), and products narrower than ``MIN_COLUMNS``
are padded (:func:`scores_into`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

# Memory model turning a byte budget into chunk sizes.
# One score costs 4 B; counting, masks and sorts of tied lines work on at most a quarter of a
# chunk's rows at a time, which adds at most another 4 B per score.
SCORE_BYTES = 8
# One list entry being searched: float32 value + int64 index, about four copies while merging.
LIST_BYTES = 48
# One entry of a list kept for every item (knn_self): float32 value + int64 index.
KEPT_LIST_BYTES = 12
# Below this many query rows per chunk the gallery is cut into blocks (knn_torch).
MIN_QUERY_ROWS = 16
# knn_torch scores the gallery this many columns at a time, so that its query chunks can be
# large and each gallery block is read once per chunk (benchmarks/RESULTS.md, "Retrieval
# evaluation": 10,000 queries against 1,000,000 x 128).
BLOCK_COLUMNS = 8192
# Products with fewer gallery columns are padded to this many (scores_into).
MIN_COLUMNS = 128
# knn_self: square blocks of at most SELF_BLOCK rows, and at least MIN_SELF_BLOCK rows (below
# that search_rows is used instead).
SELF_BLOCK = 4096
MIN_SELF_BLOCK = 256


def even_ranges(n: int, max_size: int) -> list[range]:
    """range(n) cut into the fewest consecutive ranges of at most ``max_size``, all of one
    size but the last, and the last no sliver (at least half the others). The size is a
    multiple of 256, or else of 16, where that allows: BLAS kernels work in such tiles, and
    the two-level top-k cuts lines into 16 slabs.

    >>> even_ranges(100, 30)
    [range(0, 25), range(25, 50), range(50, 75), range(75, 100)]
    >>> even_ranges(1000, 400)
    [range(0, 336), range(336, 672), range(672, 1000)]
    """
    parts = -(-n // max(1, max_size))
    size = -(-n // parts)
    for align in (256, 16):
        aligned = -(-size // align) * align
        if aligned <= max_size and n - aligned * (parts - 1) >= aligned // 2:
            size = aligned
            break
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


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


def plan_blocks(num_query: int, num_gallery: int, list_size: int, budget: int) -> tuple[int, int]:
    """Chunk sizes ``(query_rows, gallery_cols)`` for :func:`knn_torch`: planned as if the
    gallery were ``BLOCK_COLUMNS`` wide (it is scored one block at a time), narrower blocks
    when not even ``MIN_QUERY_ROWS`` rows fit."""
    width = min(num_gallery, BLOCK_COLUMNS)
    return plan_chunks(num_query, width, list_size, budget)


def plan_self_block(num_items: int, k: int, budget: int) -> int:
    """Block size for :func:`knn_self` within ``budget``, or 0 when it does not fit.

    Costs: the N x k lists of every item (``KEPT_LIST_BYTES`` per entry) plus, per block of
    b rows, b x b scores (``SCORE_BYTES`` per score) and the merge of b rows' lists
    (``2 * LIST_BYTES * (k + 1)`` per row).
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


def scores_into(query: Tensor, gallery: Tensor, buffer: Tensor) -> Tensor:
    """``query (c, d) @ gallery (g, d).T`` written into the front of a flat reusable ``buffer``;
    returns the (c, g) view (reusing one buffer avoids page-faulting a fresh c x g block).

    A gallery of fewer than ``MIN_COLUMNS`` items is padded with zero rows: a BLAS multiplies
    such narrow products with kernels that can score two copies of one vector differently by
    their column (seen with MKL), which would break the tie rule.
    """
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    out = buffer[: num_query * num_gallery].view(num_query, num_gallery)
    if num_gallery >= MIN_COLUMNS:
        return torch.mm(query, gallery.T, out=out)
    padded = gallery.new_zeros(MIN_COLUMNS, gallery.shape[1])
    padded[:num_gallery] = gallery
    rows = max(1, num_query * num_gallery // MIN_COLUMNS)  # temporaries no larger than out
    for r0 in range(0, num_query, rows):
        out[r0 : r0 + rows] = torch.mm(query[r0 : r0 + rows], padded.T)[:, :num_gallery]
    return out


def mask_self(scores: Tensor, self_index: Tensor | None, col_offset: int) -> None:
    """Set ``scores[r, self_index[r] - col_offset] = -inf`` where that column lies in the block.

    scores: (c, g) block whose columns are gallery items ``col_offset .. col_offset + g - 1``;
    self_index: (c,) int64 gallery index of each row's own copy, -1 for none.
    """
    if self_index is None:
        return
    cols = self_index - col_offset
    rows = ((self_index >= 0) & (cols >= 0) & (cols < scores.shape[1])).nonzero().flatten()
    scores[rows, cols[rows]] = float("-inf")
