"""Batch samplers: P x K class-balanced batches (:class:`PKSampler`) and plain random batches
(:class:`RandomBatchSampler`, at the end of this module).

``PKSampler`` yields batches of P distinct classes x K samples each, covering every sample
about once per epoch, reproducibly from ``(seed, epoch)`` and independently of torch's and
numpy's global random state. Use it as ``DataLoader(dataset, batch_sampler=sampler)`` and call
``sampler.set_epoch(epoch)`` before each epoch.

One epoch, generated from ``numpy.random.default_rng(SeedSequence([seed, epoch]))``:

1. Each class is shuffled and cut into chunks of K. A class with n_c >= K samples gives
   ceil(n_c / K) chunks; its last, partial chunk is completed with other samples of the same
   class (drawn at random from those not already in that chunk), so every sample appears and
   no chunk repeats an index.
2. A class with n_c < K: ``small_classes="replace"`` gives one chunk holding all its n_c
   samples plus K - n_c more drawn with replacement from the class (a repeated image is a
   legitimate positive; a class of one sample never yields a non-trivial positive);
   ``"skip"`` leaves the class out. Either way one warning at construction counts them.
3. Batches: while at least P classes have chunks left, pick P distinct classes with
   probability proportional to their remaining chunks (successive sampling without
   replacement, i.e. the first class with probability n_c / n, the next among the others
   with probability proportional to theirs, ...) and pop a uniformly random remaining chunk
   of each. Chunks left when fewer than P classes remain are dropped (counted in
   ``dropped_chunks``).

Step 3 is exact, not an approximation: a chunk drawn uniformly from the pool of remaining
chunks belongs to class c with probability n_c / n, and redrawing when its class is already in
the batch (rejection) gives the successive-sampling probabilities over the other classes. With
a swap-remove pool each draw costs O(1) expected, so an epoch costs O(N log N) for the
shuffle plus O(number of chunks) for the schedule, never O(C) per batch. If a batch needs many
consecutive rejections (one class holds most of the remaining chunks) the draw falls back to
an exact O(remaining chunks) masked draw, so the distribution is unchanged.

Distributed: every rank builds the same global batch list, truncates it to a multiple of the
world size W, and rank r takes batches r, r + W, ...: disjoint batches, equal counts. The
number of batches can differ slightly between epochs (how many chunks are dropped at the end
is random); ``len()`` is exact for the epoch set by ``set_epoch``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["PKSampler", "RandomBatchSampler"]

_MAX_REJECTIONS = 32


def _labels_to_numpy(labels: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().cpu().numpy()
    else:
        arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("labels is empty")
    return arr


def _default_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if int(num_replicas) < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= int(rank) < int(num_replicas):
        raise ValueError(f"rank must be in [0, {int(num_replicas) - 1}], got {rank}")
    return int(num_replicas), int(rank)


class _EpochBatchSampler(torch.utils.data.Sampler):
    """What both batch samplers share: the epoch's generator from (seed, epoch), the
    ``set_epoch(epoch, start_batch)`` protocol, and the split of the global batch list among
    the ranks. Subclasses write ``_epoch_batches(epoch)`` (with :meth:`_shard`) and
    ``__len__``.

    Attributes: ``truncated_batches``: global batches of the last generated epoch cut to make
    the count a multiple of ``num_replicas``.
    """

    def __init__(self, seed: int, num_replicas: int | None, rank: int | None) -> None:
        self.seed = int(seed)
        self.num_replicas, self.rank = _default_replicas(num_replicas, rank)
        self.epoch = 0
        self._start_batch = 0
        self.truncated_batches = 0

    def _generator(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed % 2**64, int(epoch)]))

    def _shard(self, batches: np.ndarray) -> list[list[int]]:
        """This rank's batches of the (num global batches, batch size) index array: the list
        truncated to a multiple of the world size W, then rank r takes r, r + W, ..."""
        w = self.num_replicas
        usable = len(batches) - len(batches) % w
        self.truncated_batches = len(batches) - usable
        return batches[self.rank : usable : w].tolist()

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch of the next iteration, which starts at this rank's batch
        ``start_batch`` (resume after ``start_batch`` batches were consumed)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if int(start_batch) < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.epoch = int(epoch)
        self._start_batch = int(start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches of the current epoch, from ``start_batch`` on (then from 0)."""
        batches = self._epoch_batches(self.epoch)
        start, self._start_batch = self._start_batch, 0
        return iter(batches[start:])


class PKSampler(_EpochBatchSampler):
    """Batch sampler of P distinct classes x K samples (see the module docstring).

    Args:
        labels: (N,) class of each dataset index; tensor, numpy array or list (any hashable,
            sortable values: ints or strings).
        p: classes per batch (>= 1). k: samples per class (>= 2). A batch has P*K indices,
            grouped by class (K consecutive indices share a class).
        seed: base seed; the epoch's generator is seeded from (seed, epoch).
        small_classes: what to do with classes of fewer than K samples, "replace" or "skip".
        num_replicas, rank: distributed world size and this rank; default from
            torch.distributed when initialised, else 1 and 0.

    Attributes (of the last generated epoch): ``dropped_chunks``: chunks left unscheduled
    when fewer than P classes had chunks left; ``truncated_batches``: global batches cut to
    make the count a multiple of ``num_replicas``.
    """

    def __init__(
        self,
        labels: torch.Tensor | np.ndarray | Sequence,
        p: int,
        k: int,
        *,
        seed: int = 0,
        small_classes: str = "replace",
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if int(p) < 1:
            raise ValueError(f"p (classes per batch) must be >= 1, got {p}")
        if int(k) < 2:
            raise ValueError(
                f"k (samples per class) must be >= 2 so that every anchor has a positive, got {k}"
            )
        if small_classes not in ("replace", "skip"):
            raise ValueError(f"small_classes must be 'replace' or 'skip', got {small_classes!r}")
        super().__init__(seed, num_replicas, rank)
        self.p = int(p)
        self.k = int(k)
        self.small_classes = small_classes

        arr = _labels_to_numpy(labels)
        _, inverse, counts = np.unique(arr, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        small = counts < self.k
        n_small = int(small.sum())
        if n_small:
            n_single = int((counts == 1).sum())
            if small_classes == "replace":
                what = "each gives one chunk completed by drawing with replacement" + (
                    f"; {n_single} have a single sample (no real positive)" if n_single else ""
                )
            else:
                what = f"skipped ({int(counts[small].sum())} samples left out)"
            warnings.warn(
                f"PKSampler: {n_small} of {len(counts)} classes have fewer than k={self.k} "
                f"samples: {what}",
                stacklevel=2,
            )
        keep = ~small if small_classes == "skip" else np.ones_like(small)
        if int(keep.sum()) < self.p:
            raise ValueError(
                f"PKSampler needs at least p={self.p} classes, but only {int(keep.sum())} are "
                f"usable ({len(counts)} classes, small_classes={small_classes!r}, k={self.k})"
            )
        # Kept classes re-indexed 0..C'-1; members sorted by class (stable: by index within).
        new_id = np.cumsum(keep) - 1
        sample_keep = keep[inverse]
        idx = np.flatnonzero(sample_keep)
        cls = new_id[inverse[idx]]
        order = np.argsort(cls, kind="stable")
        self._members = idx[order]  # (N',) dataset indices grouped by class
        self._member_class = cls[order]  # (N',) class of each member
        self._sizes = counts[keep].astype(np.int64)  # (C',)
        self._starts = np.concatenate(([0], np.cumsum(self._sizes)[:-1]))  # (C',)
        self._num_chunks = np.maximum(-(-self._sizes // self.k), 1)  # (C',) ceil(n_c / K)
        self.num_classes = len(self._sizes)

        self._cache: tuple[int, list[list[int]]] | None = None
        self.dropped_chunks = 0

    # ------------------------------------------------------------------ epoch generation
    def _chunks(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """All chunks of the epoch: (T, K) dataset indices and (T,) class of each chunk."""
        k = self.k
        sizes, starts, nchunks = self._sizes, self._starts, self._num_chunks
        # Shuffle within each class: sort by (class, uniform key).
        keys = rng.random(len(self._members))
        shuffled = self._members[np.lexsort((keys, self._member_class))]
        slots_per_class = nchunks * k
        slot_class = np.repeat(np.arange(len(sizes)), slots_per_class)
        slot_start = np.concatenate(([0], np.cumsum(slots_per_class)[:-1]))
        j = np.arange(len(slot_class)) - np.repeat(slot_start, slots_per_class)
        n = sizes[slot_class]
        # Slot j of a class holds its j-th shuffled sample; padding slots (j >= n_c) of a
        # class with n_c >= K take samples 0, 1, ... (not in the last chunk, since the class
        # has >= 2 chunks); padding of a small class is drawn with replacement.
        pos = np.where(j < n, j, j - n)
        pad_small = (j >= n) & (n < k)
        if pad_small.any():
            pos[pad_small] = rng.integers(0, n[pad_small])
        chunks = shuffled[starts[slot_class] + pos].reshape(-1, k)
        chunk_class = np.repeat(np.arange(len(sizes)), nchunks)
        return chunks, chunk_class

    def _schedule(self, chunk_class: np.ndarray, rng: np.random.Generator) -> list[int]:
        """Chunk ids in batch order (len = P x number of batches); sets ``dropped_chunks``."""
        p = self.p
        cc = chunk_class.tolist()
        remaining = self._num_chunks.tolist()
        classes_left = len(remaining)
        pool = list(range(len(cc)))  # ids of the chunks not yet scheduled, in [0, n)
        n = len(pool)
        block = max(1024, n)
        rand = rng.random(block).tolist()
        r = 0
        out: list[int] = []
        while classes_left >= p:
            chosen: set[int] = set()
            rejections = 0
            while len(chosen) < p:
                if r == block:
                    rand, r = rng.random(block).tolist(), 0
                j = int(rand[r] * n)
                r += 1
                c = cc[pool[j]]
                if c in chosen:
                    rejections += 1
                    if rejections < _MAX_REJECTIONS:
                        continue
                    # Exact fallback: a uniform chunk among those of classes not chosen yet.
                    live = np.asarray(pool[:n])
                    ok = np.flatnonzero(~np.isin(chunk_class[live], list(chosen)))
                    j = int(ok[rng.integers(len(ok))])
                    c = cc[pool[j]]
                rejections = 0
                chosen.add(c)
                out.append(pool[j])
                n -= 1
                pool[j] = pool[n]
                remaining[c] -= 1
                if remaining[c] == 0:
                    classes_left -= 1
        self.dropped_chunks = n
        return out

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch`` (cached), each a list of P*K dataset indices."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = self._generator(epoch)
        chunks, chunk_class = self._chunks(rng)
        order = np.asarray(self._schedule(chunk_class, rng), dtype=np.int64)
        batches = chunks[order].reshape(-1, self.p * self.k)  # (num global batches, P*K)
        mine = self._shard(batches)
        self._cache = (epoch, mine)
        return mine

    def __len__(self) -> int:
        """Number of batches of the current epoch on this rank (whole epoch, even when
        resuming at ``start_batch``)."""
        return len(self._epoch_batches(self.epoch))


class RandomBatchSampler(_EpochBatchSampler):
    """Batch sampler of random, not class-balanced batches: each epoch is a random permutation
    of the N indices cut into batches of ``batch_size``, the last partial batch dropped (the
    proxy papers' ``shuffle=True, drop_last=True``).

    Same protocol as :class:`PKSampler`: the permutation comes from
    ``numpy.random.default_rng(SeedSequence([seed, epoch]))`` (independent of the global random
    state), ``set_epoch(epoch, start_batch)`` resumes inside an epoch, and under distributed
    training every rank builds the same global batch list, truncates it to a multiple of the
    world size W, and rank r takes batches r, r + W, ... (disjoint batches, equal counts).

    Args:
        num_samples: N, the data set's length.
        batch_size: indices per batch (on each rank).
        seed: base seed; the epoch's generator is seeded from (seed, epoch).
        num_replicas, rank: distributed world size and this rank; default from
            torch.distributed when initialised, else 1 and 0.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(seed, num_replicas, rank)
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, each a list of ``batch_size`` indices."""
        order = self._generator(epoch).permutation(self.num_samples)
        n = self.num_samples // self.batch_size
        return self._shard(order[: n * self.batch_size].reshape(n, self.batch_size))

    def __len__(self) -> int:
        """Number of batches of an epoch on this rank (the same for every epoch)."""
        usable = self.num_samples // self.batch_size
        return (usable - usable % self.num_replicas) // self.num_replicas
