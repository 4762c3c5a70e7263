"""Cross-Batch Memory (XBM; Wang, Zhang, Huang, Scott, CVPR 2020).

A ring buffer of detached embeddings from recent batches serves as an extra reference set for
any pair-based loss. One call (one training step) does, with ``t`` the iteration counter::

    if t < start_iteration:  L = loss(X, y)                          # warm-up: in-batch only
    else:
        slots = enqueue(X, y)                                         # current batch first
        L_mem = loss(X, y, ref_emb=F[:filled], ref_labels=Y[:filled], self_index=slots)
        L = loss(X, y) + weight * L_mem      # or weight * L_mem when batch_loss=False
    t += 1

Each anchor's own copy in the memory is excluded by its slot (``self_index``), never by
value, so genuine duplicates stay positives. The other members of the current batch are in
the memory as detached copies: their pairs count in both terms (as in the official trainer);
the memory term passes gradient to the anchor side only.

Distributed training: the training engine all-gathers the batch (with gradient) and calls the
memory with the *global* batch, in rank order, on every rank. Every rank therefore enqueues the
same rows into the same slots, keeps an identical memory, and computes the same global loss;
nothing distributed happens in this module.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from deepmetric.losses import EmbeddingError, PairLoss, ProxyLoss, check_unit_norms, row_norms


class CrossBatchMemory(nn.Module):
    """Wrap a pair-based loss with a cross-batch memory of past embeddings.

    Args:
        loss: a deepmetric pair-based loss (an ``nn.Module`` with the signature
            ``loss(embeddings, labels, ref_emb=None, ref_labels=None, self_index=None)`` and a
            ``num_active`` attribute). It becomes a child module, so ``parameters()`` includes
            its parameters (e.g. the margin loss's learnable beta). With a deepmetric loss
            (a ``PairLoss``) every row must be a unit vector: rows are checked as they are
            written (see :meth:`enqueue`), not re-read at every step.
        size: M, number of memory slots (>= the batch size).
        dim: d, embedding dimension.
        start_iteration: calls before this one use the in-batch loss only and leave the memory
            empty (the official trainer's warm-up).
        weight: factor of the memory term.
        batch_loss: keep the in-batch term after ``start_iteration`` (official trainer); False
            uses the memory term alone (the paper's pseudo-code).

    State (registered buffers, so ``state_dict()`` holds them and ``.to(device)`` moves them):
        ``memory_emb`` (M, d) float32, ``memory_labels`` (M,) int64, ``ptr`` (next slot to
        write), ``filled`` (number of valid slots; the valid ones are ``[0, filled)``),
        ``iteration`` (number of calls so far). All 0-d int64.

    Every call is one training step: it advances the iteration counter and (from
    ``start_iteration`` on) writes the batch into the memory. Do not call it for validation.
    Call ``backward()`` on a step's loss before the next call: the next enqueue overwrites the
    buffer in place, which the memory term's graph reads (PyTorch then raises instead of
    returning a wrong gradient). Gradient accumulation over micro-batches works as usual
    (forward, backward, forward, backward, ..., optimiser step).
    """

    def __init__(
        self,
        loss: nn.Module,
        size: int,
        dim: int,
        start_iteration: int = 0,
        weight: float = 1.0,
        batch_loss: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(loss, nn.Module):
            raise TypeError(f"loss must be an nn.Module (a deepmetric loss), got {type(loss)}")
        if isinstance(loss, ProxyLoss):
            raise ValueError(
                f"{type(loss).__name__} is a proxy loss: it compares embeddings with class "
                "proxies, has no pairs and takes no reference set, so a cross-batch memory "
                "cannot add anything to it; use a pair-based loss"
            )
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if int(start_iteration) < 0:
            raise ValueError(f"start_iteration must be >= 0, got {start_iteration}")
        self.loss = loss
        self.size = int(size)
        self.dim = int(dim)
        self.start_iteration = int(start_iteration)
        self.weight = float(weight)
        self.batch_loss = bool(batch_loss)
        # A deepmetric pair loss assumes unit vectors: each row is checked once, when it is
        # written, and the memory term skips the loss's own check of all M rows every step.
        self.unit_rows = isinstance(loss, PairLoss)
        self.register_buffer("memory_emb", torch.zeros(self.size, self.dim, dtype=torch.float32))
        self.register_buffer("memory_labels", torch.zeros(self.size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        # Python mirrors of the three counters: reading a device tensor would synchronise
        # the GPU every step. The buffers are written from them; load_state_dict refreshes them.
        self._ptr = 0
        self._filled = 0
        self._iteration = 0
        self.num_active = torch.zeros((), dtype=torch.long)

    @property
    def active_unit(self) -> str:
        """What ``num_active`` counts (the wrapped loss's unit)."""
        return getattr(self.loss, "active_unit", "items")

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, start_iteration={self.start_iteration}, "
            f"weight={self.weight}, batch_loss={self.batch_loss}"
        )

    def _apply(self, fn, *args, **kwargs):
        # Module.to(dtype) / .half() cast every floating buffer; the memory stays float32
        # (a half-precision memory would degrade every stored embedding for good).
        before = self.memory_emb
        super()._apply(fn, *args, **kwargs)
        if self.memory_emb.dtype != torch.float32:
            self.memory_emb = before.to(device=self.memory_emb.device, dtype=torch.float32)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_counters()

    def _sync_counters(self) -> None:
        """Refresh the Python counters from the buffers (one device read, at load time)."""
        self._ptr = int(self.ptr)
        self._filled = int(self.filled)
        self._iteration = int(self.iteration)
        if not (0 <= self._ptr < self.size and 0 <= self._filled <= self.size):
            raise ValueError(
                f"inconsistent memory state: ptr={self._ptr}, filled={self._filled}, "
                f"size={self.size}"
            )

    def reset(self) -> None:
        """Empty the memory and restart the iteration counter (keeps the allocation)."""
        self.memory_emb.zero_()
        self.memory_labels.zero_()
        self._ptr = self._filled = self._iteration = 0
        self.ptr.fill_(0)
        self.filled.fill_(0)
        self.iteration.fill_(0)

    def _check_batch(self, embeddings: Tensor, labels: Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"embeddings must be (B, {self.dim}), got shape {tuple(embeddings.shape)}"
            )
        b = embeddings.shape[0]
        if labels.dim() != 1 or labels.shape[0] != b:
            raise ValueError(f"labels must be (B,) with B = {b}, got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        if b < 1:
            raise ValueError("empty batch")
        if b > self.size:
            raise ValueError(
                f"batch size {b} exceeds the memory size {self.size}: the memory must hold at "
                "least one whole batch (use size >= batch size; with distributed training the "
                "global batch)"
            )
        if embeddings.device != self.memory_emb.device:
            raise ValueError(
                f"embeddings are on {embeddings.device} but the memory is on "
                f"{self.memory_emb.device}; move the memory with .to(device)"
            )

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Write a batch into the next B slots (FIFO, wrapping around modulo M).

        embeddings: (B, d), any float dtype; stored detached as float32. labels: (B,) integer.
        Returns the (B,) int64 slots written, on the memory's device: ``slots[i]`` holds row i.
        Raises ValueError, writing nothing, for NaN or inf, or (when the wrapped loss is a
        deepmetric pair loss) rows that are not unit vectors, so that a bad batch never
        poisons the memory for later steps.
        """
        self._check_batch(embeddings, labels)
        if self.unit_rows:
            norms = row_norms(embeddings.to(torch.float32))
            low, high = torch.stack(torch.aminmax(norms)).tolist()  # one host sync
            finite = math.isfinite(low + high)
        else:
            finite = bool(torch.isfinite(embeddings).all())
        if not finite:
            raise EmbeddingError("embeddings contain NaN or inf", "; not written to the memory")
        if self.unit_rows:
            check_unit_norms("embeddings", low, high)
        b = embeddings.shape[0]
        device = self.memory_emb.device
        slots = torch.arange(self._ptr, self._ptr + b, device=device) % self.size
        self.memory_emb.index_copy_(0, slots, embeddings.detach().to(torch.float32))
        self.memory_labels.index_copy_(0, slots, labels.detach().to(torch.long))
        self._ptr = (self._ptr + b) % self.size
        self._filled = min(self._filled + b, self.size)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)
        return slots

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """One training step. embeddings (B, d) L2-normalised, labels (B,) -> scalar loss.

        Sets ``num_active`` to the in-batch plus memory active counts (the memory term's
        alone with ``batch_loss=False``; the in-batch one during warm-up).
        """
        self._check_batch(embeddings, labels)
        if self._iteration < self.start_iteration:
            total = self.loss(embeddings, labels)
            num_active = _active(self.loss, total)
        else:
            num_active = torch.zeros((), dtype=torch.long, device=embeddings.device)
            batch_loss = None
            if self.batch_loss:
                batch_loss = self.loss(embeddings, labels)
                num_active = _active(self.loss, batch_loss)
            slots = self.enqueue(embeddings, labels)
            n = self._filled
            checked = {"check_ref_norms": False} if self.unit_rows else {}  # see __init__
            mem_loss = self.loss(
                embeddings,
                labels,
                ref_emb=self.memory_emb[:n],
                ref_labels=self.memory_labels[:n],
                self_index=slots,
                **checked,
            )
            num_active = num_active + _active(self.loss, mem_loss)
            total = self.weight * mem_loss
            if batch_loss is not None:
                total = batch_loss + total
        self._iteration += 1
        self.iteration.fill_(self._iteration)
        self.num_active = num_active
        return total


def _active(loss: nn.Module, value: Tensor) -> Tensor:
    """The wrapped loss's ``num_active`` after its last call (0-d long, detached)."""
    n = getattr(loss, "num_active", None)
    if n is None:
        return torch.zeros((), dtype=torch.long, device=value.device)
    return torch.as_tensor(n).detach().to(device=value.device, dtype=torch.long)
