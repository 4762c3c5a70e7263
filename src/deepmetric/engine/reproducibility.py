"""Reproducibility: seeds, the global RNG states a checkpoint stores, and data loading whose
augmentations depend on (run seed, epoch, batch, position) only.

With :class:`SeededBatches` and :class:`SeededDataset` a resumed run sees the same augmented
images as an uninterrupted one, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SeededBatches",
    "SeededDataset",
    "capture_rng_state",
    "restore_rng_state",
    "seed_everything",
    "seed_worker",
]


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global RNG that third-party code uses
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, numpy, python) as tensors and plain
    containers, loadable with ``torch.load(weights_only=True)``."""
    np_state = np.random.get_state()  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNG states captured by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: numpy and python RNGs from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002
    random.seed(seed)


class SeededBatches:
    """Batch sampler wrapping a :class:`~deepmetric.samplers.PKSampler`: yields
    ``[(index, seed), ...]`` where ``seed`` comes from (run seed, epoch, batch, position).

    The sampler's position is (epoch, batch): :meth:`set_epoch` starts an epoch at any batch.
    """

    def __init__(self, sampler: Any, seed: int) -> None:
        self.sampler, self.seed = sampler, int(seed)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields epoch ``epoch``'s batches from ``start_batch`` on."""
        self.sampler.set_epoch(epoch, start_batch)
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b, batch in enumerate(self.sampler, start=self.start):
            seeds = np.random.SeedSequence([self.seed, self.epoch, b]).generate_state(
                len(batch), dtype=np.uint64
            )
            yield [(int(i), int(s)) for i, s in zip(batch, seeds)]


class SeededDataset(Dataset):
    """``dataset[(index, seed)]`` = ``dataset[index]`` with torch's CPU generator seeded by
    ``seed`` (the caller's generator state is restored afterwards). The DataLoader fetches a
    whole batch through ``__getitems__``: one save/restore per batch."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list[Any]:
        state = torch.get_rng_state()
        try:
            out = []
            for index, seed in items:
                torch.default_generator.manual_seed(seed)
                out.append(self.dataset[index])
            return out
        finally:
            torch.set_rng_state(state)
