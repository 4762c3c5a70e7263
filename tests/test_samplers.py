"""Tests of deepmetric.samplers.PKSampler: P classes x K images per batch (Hermans, Beyer,
Leibe 2017, "In Defense of the Triplet Loss for Person Re-Identification")."""

from __future__ import annotations

import random
import time
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from deepmetric.samplers import PKSampler, RandomBatchSampler


def labels_from_sizes(sizes) -> np.ndarray:
    """(N,) labels, class c repeated sizes[c] times, then shuffled (labels need not be sorted)."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return labels[np.random.default_rng(123).permutation(len(labels))]


def epoch(sampler: PKSampler, e: int) -> list[list[int]]:
    sampler.set_epoch(e)
    return list(sampler)


def no_warning_sampler(*args, **kwargs) -> PKSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return PKSampler(*args, **kwargs)


IRREGULAR = [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17, 4, 4, 30, 6, 5, 9, 8, 7, 6]


# ---------------------------------------------------------------- batch structure, coverage
@pytest.mark.parametrize(("p", "k"), [(4, 2), (3, 4), (5, 3)])
def test_every_batch_is_p_distinct_classes_times_k(p: int, k: int) -> None:
    labels = labels_from_sizes(IRREGULAR)
    sampler = no_warning_sampler(labels, p, k, seed=1)
    for e in range(3):
        batches = epoch(sampler, e)
        assert len(batches) == len(sampler) > 0
        for batch in batches:
            assert len(batch) == p * k
            assert all(isinstance(i, int) for i in batch)
            groups = np.asarray(batch).reshape(p, k)
            group_labels = labels[groups]
            assert (group_labels == group_labels[:, :1]).all()  # K of one class per group
            assert len(set(group_labels[:, 0].tolist())) == p  # P distinct classes
            for g in groups:  # classes of >= K samples: no index twice in a chunk
                assert len(set(g.tolist())) == k


def test_each_sample_once_when_sizes_are_multiples_of_k() -> None:
    k, p = 4, 3
    sizes = [4, 8, 12, 4, 8, 16, 4, 4, 12, 8, 4, 20]
    labels = labels_from_sizes(sizes)
    sampler = no_warning_sampler(labels, p, k, seed=5)
    total_dropped = 0
    for e in range(10):
        counts = Counter(i for b in epoch(sampler, e) for i in b)
        assert max(counts.values()) == 1  # no padding needed: nothing twice
        assert len(counts) == len(labels) - k * sampler.dropped_chunks
        total_dropped += sampler.dropped_chunks
    assert total_dropped < 10 * sum(sizes) // k // 4  # only a tail is dropped


def test_irregular_sizes_cover_every_sample_except_dropped_chunks() -> None:
    k = 4
    labels = labels_from_sizes(IRREGULAR)
    sampler = no_warning_sampler(labels, 3, k, seed=2)
    for e in range(5):
        batches = epoch(sampler, e)
        counts = Counter(i for b in batches for i in b)
        assert len(counts) >= len(labels) - k * sampler.dropped_chunks
        assert max(counts.values()) <= 2  # a padding sample appears at most twice
        total_chunks = sum(-(-n // k) for n in IRREGULAR)
        assert len(batches) * 3 + sampler.dropped_chunks == total_chunks
        if sampler.dropped_chunks == 0:
            assert len(counts) == len(labels)


# ---------------------------------------------------------------- reproducibility
def test_same_seed_and_epoch_give_same_batches_and_epochs_differ() -> None:
    labels = labels_from_sizes(IRREGULAR)
    a = no_warning_sampler(labels, 4, 2, seed=7)
    b = no_warning_sampler(labels.tolist(), 4, 2, seed=7)
    assert epoch(a, 3) == epoch(b, 3)
    assert epoch(a, 0) == epoch(b, 0)
    assert epoch(a, 0) != epoch(a, 1)
    assert epoch(a, 0) != epoch(no_warning_sampler(labels, 4, 2, seed=8), 0)
    assert list(a) == epoch(a, 0)  # a second pass without set_epoch repeats the epoch


def test_independent_of_global_rng() -> None:
    labels = labels_from_sizes(IRREGULAR)
    results = []
    for s in (0, 1):
        torch.manual_seed(s)
        np.random.seed(s)  # noqa: NPY002 (the legacy global RNG is what must not matter)
        random.seed(s)
        results.append(epoch(no_warning_sampler(labels, 4, 2, seed=3), 2))
    assert results[0] == results[1]


@pytest.mark.parametrize("kind", ["tensor", "numpy", "list", "strings"])
def test_label_containers(kind: str) -> None:
    labels = labels_from_sizes(IRREGULAR)
    want = epoch(no_warning_sampler(labels, 4, 2), 0)
    if kind == "tensor":
        given = torch.as_tensor(labels)
    elif kind == "list":
        given = labels.tolist()
    elif kind == "strings":  # same order of classes when sorted: zero-padded names
        given = [f"class{c:03d}" for c in labels]
    else:
        given = labels
    assert epoch(no_warning_sampler(given, 4, 2), 0) == want


# ---------------------------------------------------------------- schedule distribution
def test_class_choice_is_successive_sampling_proportional_to_remaining_chunks() -> None:
    """Classes with 1, 2, 3 chunks, P = 2: the first batch is {a, b} with probability
    n_a/n * n_b/(n - n_a) + n_b/n * n_a/(n - n_b)."""
    labels = labels_from_sizes([2, 4, 6])  # K = 2: 1, 2, 3 chunks
    n_chunks, n = [1, 2, 3], 6
    want = {}
    for a in range(3):
        for b in range(a + 1, 3):
            na, nb = n_chunks[a], n_chunks[b]
            want[(a, b)] = na / n * nb / (n - na) + nb / n * na / (n - nb)
    sampler = no_warning_sampler(labels, 2, 2, seed=0)
    trials = 3000
    seen = Counter()
    for e in range(trials):
        sampler.set_epoch(e)
        first = next(iter(sampler))
        seen[tuple(sorted({int(labels[i]) for i in first}))] += 1
    for pair, prob in want.items():
        assert abs(seen[pair] / trials - prob) < 0.03, (pair, seen[pair] / trials, prob)


def test_rejection_fallback_keeps_distribution() -> None:
    """One class holds almost every chunk: the exact fallback draw must still pick the second
    class in proportion to its chunks (1 : 2 : 3)."""
    labels = labels_from_sizes([600, 2, 4, 6])  # K = 2: 300, 1, 2, 3 chunks
    sampler = no_warning_sampler(labels, 2, 2, seed=0)
    trials = 1500
    seen = Counter()
    for e in range(trials):
        sampler.set_epoch(e)
        first = next(iter(sampler))
        classes = {int(labels[i]) for i in first}
        if 0 in classes:
            seen[(classes - {0}).pop()] += 1
    total = sum(seen.values())
    assert total > 0.95 * trials
    for c, share in [(1, 1 / 6), (2, 2 / 6), (3, 3 / 6)]:
        assert abs(seen[c] / total - share) < 0.04, (c, seen[c] / total, share)


# ---------------------------------------------------------------- distributed
def test_ranks_get_disjoint_batches_of_equal_count() -> None:
    k, p, world = 2, 3, 3
    sizes = [2 * (1 + c % 5) for c in range(30)]  # multiples of K: no sample in two chunks
    labels = labels_from_sizes(sizes)
    single = no_warning_sampler(labels, p, k, seed=4)
    full = epoch(single, 1)
    per_rank = []
    for r in range(world):
        s = no_warning_sampler(labels, p, k, seed=4, num_replicas=world, rank=r)
        per_rank.append(epoch(s, 1))
        assert len(s) == len(full) // world
        assert per_rank[-1] == full[r : len(full) - len(full) % world : world]
        assert s.truncated_batches == len(full) % world
    assert len({len(b) for b in per_rank}) == 1
    seen = [set(i for b in batches for i in b) for batches in per_rank]
    for a in range(world):
        for b in range(a + 1, world):
            assert not seen[a] & seen[b]


# ---------------------------------------------------------------- small classes
def test_small_classes_replace_one_warning_and_complete_chunks() -> None:
    sizes = [1, 2, 3, 6, 7, 8, 9, 5]  # three classes below K = 4
    labels = labels_from_sizes(sizes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = PKSampler(labels, 3, 4, small_classes="replace")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "3 of 8 classes" in message and "1 have a single sample" in message
    small = {c for c, n in enumerate(sizes) if n < 4}
    for e in range(4):
        for batch in epoch(sampler, e):
            for g in np.asarray(batch).reshape(3, 4):
                c = int(labels[g[0]])
                if c in small:  # all of the class's samples, completed with replacement
                    assert set(g.tolist()) == set(np.flatnonzero(labels == c).tolist())


def test_small_classes_skip_one_warning_and_never_sampled() -> None:
    sizes = [1, 2, 3, 6, 7, 8, 9, 5]
    labels = labels_from_sizes(sizes)
    with pytest.warns(UserWarning, match=r"3 of 8 classes.*skipped \(6 samples") as record:
        sampler = PKSampler(labels, 3, 4, small_classes="skip")
    assert len(record) == 1
    for e in range(4):
        used = {int(labels[i]) for b in epoch(sampler, e) for i in b}
        assert used <= {3, 4, 5, 6, 7}


# ---------------------------------------------------------------- resume, DataLoader
def test_set_epoch_start_batch_resumes_the_tail() -> None:
    labels = labels_from_sizes(IRREGULAR)
    sampler = no_warning_sampler(labels, 4, 2, seed=9)
    full = epoch(sampler, 5)
    resumed = no_warning_sampler(labels, 4, 2, seed=9)
    resumed.set_epoch(5, start_batch=7)
    assert len(resumed) == len(full)
    assert list(resumed) == full[7:]
    assert list(resumed) == full  # start_batch applies to one pass only
    resumed.set_epoch(5, start_batch=len(full) + 3)
    assert list(resumed) == []


def test_dataloader_with_two_workers() -> None:
    labels = labels_from_sizes(IRREGULAR)
    dataset = TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    sampler = no_warning_sampler(labels, 4, 2, seed=11)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    want = epoch(sampler, 3)
    sampler.set_epoch(3)
    assert len(loader) == len(want)
    got = [(idx.tolist(), lab) for idx, lab in loader]
    assert [g[0] for g in got] == want
    for idx, lab in got:
        assert lab.tolist() == labels[idx].tolist()


# ---------------------------------------------------------------- errors and speed
def test_errors() -> None:
    labels = labels_from_sizes([4, 4, 4])
    with pytest.raises(ValueError, match="p"):
        PKSampler(labels, 0, 2)
    with pytest.raises(ValueError, match="k"):
        PKSampler(labels, 2, 1)
    with pytest.raises(ValueError, match="at least p=4 classes"):
        PKSampler(labels, 4, 2)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="only 2 are usable"):
        PKSampler(labels_from_sizes([4, 4, 1]), 3, 2, small_classes="skip")
    with pytest.raises(ValueError, match="rank"):
        PKSampler(labels, 2, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="rank"):
        PKSampler(labels, 2, 2, num_replicas=2, rank=-1)
    with pytest.raises(ValueError, match="num_replicas"):
        PKSampler(labels, 2, 2, num_replicas=0, rank=0)
    with pytest.raises(ValueError, match="small_classes"):
        PKSampler(labels, 2, 2, small_classes="drop")
    with pytest.raises(ValueError, match="empty"):
        PKSampler([], 2, 2)
    with pytest.raises(ValueError, match="one-dimensional"):
        PKSampler(np.zeros((4, 2)), 2, 2)
    with pytest.raises(ValueError, match="epoch"):
        PKSampler(labels, 2, 2).set_epoch(-1)


def test_sop_sized_epoch_is_fast() -> None:
    rng = np.random.default_rng(0)
    sizes = np.clip(2 + rng.poisson(3.3, size=11_318), 2, 12)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = PKSampler(labels, 16, 4)
    start = time.perf_counter()
    sampler.set_epoch(1)
    n = len(sampler)
    assert time.perf_counter() - start < 1.0
    assert n * 16 + sampler.dropped_chunks == sum(max(1, -(-int(s) // 4)) for s in sizes)


# ---------------------------------------------------------------- RandomBatchSampler
def test_random_batches_cover_an_epoch_once_and_drop_the_last_partial_batch() -> None:
    sampler = RandomBatchSampler(103, 10, seed=5)
    batches = epoch(sampler, 0)
    assert len(batches) == len(sampler) == 10 and all(len(b) == 10 for b in batches)
    seen = [i for b in batches for i in b]
    assert len(set(seen)) == 100 and set(seen) <= set(range(103))  # 3 indices left out
    labels = np.arange(103) % 7  # not class-balanced: batches hold what the shuffle gives
    assert len({tuple(sorted(Counter(labels[b]).values())) for b in batches}) > 1


def test_random_batches_seeded_per_epoch_and_independent_of_global_rng() -> None:
    a, b = RandomBatchSampler(50, 8, seed=1), RandomBatchSampler(50, 8, seed=1)
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002
    first = epoch(a, 3)
    torch.manual_seed(1)
    np.random.seed(1)  # noqa: NPY002
    assert epoch(b, 3) == first
    assert epoch(a, 4) != first and epoch(RandomBatchSampler(50, 8, seed=2), 3) != first


def test_random_batches_resume_inside_an_epoch() -> None:
    sampler = RandomBatchSampler(64, 5, seed=3)
    full = epoch(sampler, 2)
    sampler.set_epoch(2, start_batch=4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the next pass starts at batch 0 again
    assert len(sampler) == len(full) == 12


def test_random_batches_ranks_disjoint_equal_counts() -> None:
    one = epoch(RandomBatchSampler(100, 7, seed=9, num_replicas=1, rank=0), 1)  # 14 batches
    ranks = [epoch(RandomBatchSampler(100, 7, seed=9, num_replicas=3, rank=r), 1) for r in range(3)]
    assert [len(b) for b in ranks] == [4, 4, 4]  # 14 -> 12, a multiple of 3
    assert [b for trio in zip(*ranks) for b in trio] == one[:12]  # rank r: batches r, r + 3, ...
    assert len({i for b in ranks for batch in b for i in batch}) == 12 * 7


def test_random_batches_errors() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        RandomBatchSampler(10, 0)
    with pytest.raises(ValueError, match="num_samples"):
        RandomBatchSampler(0, 4)
    with pytest.raises(ValueError, match="rank"):
        RandomBatchSampler(10, 2, num_replicas=2, rank=2)
    assert len(RandomBatchSampler(10, 11)) == 0
