"""Cross-batch memory step and P x K sampler epoch: deepmetric vs pytorch-metric-learning.

Part 1, XBM step = enqueue a batch of 64 + loss of the batch against the full memory +
backward, for deepmetric ``CrossBatchMemory(batch_loss=False)`` (one memory term, like PML's
wrapper, whose memory also contains the current batch) and PML 2.9.0 ``CrossBatchMemory``
wrapping the same loss configuration:

- contrastive: deepmetric ``contrastive`` (similarity form, [1 - S]_+ / [S - 0.5]_+, mean over
  pairs) vs PML ``ContrastiveLoss(pos_margin=1, neg_margin=0.5, distance=CosineSimilarity())``
  (AvgNonZero reducer);
- multi_similarity: deepmetric ``multi_similarity`` (alpha 2, beta 50, base 0.5, epsilon 0.1,
  mining) vs PML ``MultiSimilarityLoss(2, 50, 0.5)`` with ``MultiSimilarityMiner(0.1)``.

The loss definitions differ slightly (reductions): this is a timing comparison. Memory sizes
8,192 and 55,000, dims 128 and 512, memory pre-filled, labels SOP-like (about 5 samples per
class), batch 16 classes x 4. The two implementations alternate step by step in one process,
``torch.set_num_threads(2)``; median and minimum milliseconds (the minimum is the robust
figure when other processes share the CPU).

Peak memory: each (implementation, loss, M, d) runs in a fresh subprocess with
``MALLOC_MMAP_THRESHOLD_=65536`` (every large tensor is its own mmap, returned to the OS when
freed, so resident memory follows the live tensors). After setup and two warm-up steps the
peak resident set (VmHWM) is reset through ``/proc/self/clear_refs``; one more step runs and
``VmHWM - VmRSS(before the step)`` is the step's transient peak, beyond the persistent buffer.
It is compared with the buffer size M x d x 4 B and with one B x M float32 matrix.

Part 2, sampler: one epoch of ``PKSampler(labels, p=16, k=4)`` (set_epoch + list) on SOP-sized
labels (11,318 classes, 2..12 samples each, 59,551 samples) vs PML
``MPerClassSampler(labels, m=4, batch_size=64, length_before_new_iter=<same number of
samples>)`` materialised with ``list(iter(...))``. Median over epochs.

    PYTHONPATH=src .venv/bin/python benchmarks/xbm.py [--steps 25] [--quick]
    PYTHONPATH=src .venv/bin/python benchmarks/xbm.py --ablate sparse_grad   # ours only

``--ablate NAME`` times deepmetric's step alone with one special path of its losses (or the
unit-norm check) switched on and off step by step (contrastive, multi-similarity, batch-hard
triplet, modified lifted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

B, P, K = 64, 16, 4


# deepmetric losses in the XBM step: the two compared with PML, plus two used by --ablate
OUR_LOSSES = {
    "contrastive": ("contrastive", {"pos_margin": 1.0, "neg_margin": 0.5}),
    "multi_similarity": (
        "multi_similarity",
        {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1},
    ),
    "triplet_hard": ("triplet", {"mining": "hard"}),
    "lifted_modified": ("lifted", {"variant": "modified"}),
}


def make_ours(loss_name: str, size: int, dim: int):
    from deepmetric.losses import build_loss
    from deepmetric.memory import CrossBatchMemory

    name, hparams = OUR_LOSSES[loss_name]
    return CrossBatchMemory(build_loss(name, **hparams), size=size, dim=dim, batch_loss=False)


def make_pml(loss_name: str, size: int, dim: int):
    from pytorch_metric_learning import losses, miners
    from pytorch_metric_learning.distances import CosineSimilarity

    if loss_name == "contrastive":
        loss = losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, distance=CosineSimilarity())
        miner = None
    else:
        loss = losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
        miner = miners.MultiSimilarityMiner(epsilon=0.1)
    return losses.CrossBatchMemory(loss, embedding_size=dim, memory_size=size, miner=miner)


def prefill(impl: str, xbm, size: int, dim: int, gen: torch.Generator) -> int:
    """Fill the whole memory with random unit vectors of ~size/5 classes; returns #classes."""
    classes = max(size // 5, P)
    emb = F.normalize(torch.randn(size, dim, generator=gen), dim=1)
    labels = torch.randint(0, classes, (size,), generator=gen)
    if impl == "ours":
        xbm.enqueue(emb, labels)
    else:
        xbm.add_to_memory(emb, labels, size)
        assert xbm.has_been_filled
    return classes


def make_batch(classes: int, dim: int, gen: torch.Generator):
    cls = torch.randperm(classes, generator=gen)[:P]
    y = cls.repeat_interleave(K)
    x = F.normalize(torch.randn(B, dim, generator=gen), dim=1).requires_grad_(True)
    return x, y


def one_step(xbm, x, y) -> None:
    loss = xbm(x, y)
    loss.backward()


def time_steps(loss_name: str, size: int, dim: int, steps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    impls = {"ours": make_ours(loss_name, size, dim), "pml": make_pml(loss_name, size, dim)}
    classes = 0
    for name, xbm in impls.items():
        classes = prefill(name, xbm, size, dim, gen)
    times = {name: [] for name in impls}
    for step in range(steps + 2):
        x, y = make_batch(classes, dim, gen)
        for name, xbm in impls.items():
            xi = x.detach().clone().requires_grad_(True)
            start = time.perf_counter()
            one_step(xbm, xi, y)
            if step >= 2:  # two warm-up steps
                times[name].append(time.perf_counter() - start)
    return {
        **{name: 1e3 * statistics.median(t) for name, t in times.items()},
        **{name + "_min": 1e3 * min(t) for name, t in times.items()},
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure_memory_here(impl: str, loss_name: str, size: int, dim: int) -> int:
    """Transient peak bytes of one step (run in a fresh process, see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    xbm = make_ours(loss_name, size, dim) if impl == "ours" else make_pml(loss_name, size, dim)
    classes = prefill(impl, xbm, size, dim, gen)
    for _ in range(2):
        one_step(xbm, *make_batch(classes, dim, gen))
    x, y = make_batch(classes, dim, gen)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kib("VmRSS")
    one_step(xbm, x, y)
    return 1024 * (_status_kib("VmHWM") - before)


def measure_memory(impl: str, loss_name: str, size: int, dim: int) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    cmd = [sys.executable, __file__, "--memory-child", impl, loss_name, str(size), str(dim)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def sop_like_labels(seed: int = 0) -> np.ndarray:
    """11,318 classes of 2..12 samples (mean ~5.26), 59,551 samples, like SOP's train split."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(2 + rng.poisson(3.26, size=11_318), 2, 12)
    while sizes.sum() != 59_551:  # nudge random classes to the exact total
        c = rng.integers(len(sizes))
        step = 1 if sizes.sum() < 59_551 else -1
        if 2 <= sizes[c] + step <= 12:
            sizes[c] += step
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return labels[rng.permutation(len(labels))]


def time_samplers(epochs: int) -> dict:
    from pytorch_metric_learning.samplers import MPerClassSampler

    from deepmetric.samplers import PKSampler

    labels = sop_like_labels()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = PKSampler(labels, P, K, seed=0)
    build = time.perf_counter() - start
    ours_t, pml_t, n_samples = [], [], 0
    pml = None
    for e in range(epochs):
        start = time.perf_counter()
        ours.set_epoch(e)
        batches = list(ours)
        ours_t.append(time.perf_counter() - start)
        n_samples = len(batches) * P * K
        if pml is None:
            start = time.perf_counter()
            pml = MPerClassSampler(labels, m=K, batch_size=B, length_before_new_iter=n_samples)
            pml_build = time.perf_counter() - start
        start = time.perf_counter()
        idx = list(iter(pml))
        pml_t.append(time.perf_counter() - start)
        assert len(idx) == n_samples - n_samples % B
    return {
        "samples": len(labels),
        "classes": len(np.unique(labels)),
        "epoch_samples": n_samples,
        "ours_ms": 1e3 * statistics.median(ours_t),
        "ours_build_ms": 1e3 * build,
        "pml_ms": 1e3 * statistics.median(pml_t),
        "pml_build_ms": 1e3 * pml_build,
    }


def time_ablation(name: str, loss_name: str, size: int, dim: int, steps: int) -> dict:
    """deepmetric's XBM step with the switch ``name`` on and off, alternating step by step on
    one memory (see benchmarks/losses.py, ``ablation_switches``)."""
    from losses import interleaved

    gen = torch.Generator().manual_seed(0)
    xbm = make_ours(loss_name, size, dim)
    classes = prefill("ours", xbm, size, dim, gen)

    def step() -> None:
        x, y = make_batch(classes, dim, gen)
        one_step(xbm, x, y)

    return interleaved(name, step, steps)


def ablate(name: str, sizes: list[int], dims: list[int], steps: int) -> None:
    from losses import ratio_row

    print(f"## --ablate {name}: XBM step with / without it, ms median (min)")
    print("| what | with | without | with / without |")
    print("|---|---:|---:|---:|")
    for loss_name in OUR_LOSSES:
        for size in sizes:
            for dim in dims:
                times = time_ablation(name, loss_name, size, dim, steps)
                print(ratio_row(f"{loss_name}, M = {size}, d = {dim}", times), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="timed steps per config")
    parser.add_argument("--epochs", type=int, default=5, help="timed sampler epochs")
    parser.add_argument("--quick", action="store_true", help="smallest sizes only, 3 steps")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory runs")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument(
        "--ablate",
        choices=["sparse_grad", "exp_floor", "norm_check"],
        help="time deepmetric's step with and without a special path of its losses, then exit",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.memory_child:
        impl, loss_name, size, dim = args.memory_child
        print(measure_memory_here(impl, loss_name, int(size), int(dim)))
        return

    sizes, dims, steps = (
        ([8192], [128], 3) if args.quick else ([8192, 55_000], [128, 512], args.steps)
    )
    if args.ablate:
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        ablate(args.ablate, sizes, dims, steps)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return
    rows = []
    print(
        "| loss | M | d | ours ms median (min) | PML ms median (min) | ours/PML median (min) "
        "| buffer MB | B x M x 4 MB | ours step peak MB | PML step peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for loss_name in ("contrastive", "multi_similarity"):  # the two with a PML counterpart
        for size in sizes:
            for dim in dims:
                t = time_steps(loss_name, size, dim, steps)
                mem = {"ours": float("nan"), "pml": float("nan")}
                if not args.no_memory:
                    mem = {i: measure_memory(i, loss_name, size, dim) / 2**20 for i in mem}
                row = dict(
                    loss=loss_name,
                    M=size,
                    d=dim,
                    ours_ms=t["ours"],
                    pml_ms=t["pml"],
                    ours_min_ms=t["ours_min"],
                    pml_min_ms=t["pml_min"],
                    buffer_mb=size * dim * 4 / 2**20,
                    bm_mb=B * size * 4 / 2**20,
                    ours_peak_mb=mem["ours"],
                    pml_peak_mb=mem["pml"],
                )
                rows.append(row)
                print(
                    f"| {loss_name} | {size} | {dim} | {t['ours']:.1f} ({t['ours_min']:.1f}) | "
                    f"{t['pml']:.1f} ({t['pml_min']:.1f}) | {t['ours'] / t['pml']:.2f} "
                    f"({t['ours_min'] / t['pml_min']:.2f}) | {row['buffer_mb']:.1f} | "
                    f"{row['bm_mb']:.1f} | {mem['ours']:.1f} | {mem['pml']:.1f} |",
                    flush=True,
                )
    s = time_samplers(2 if args.quick else args.epochs)
    print()
    print("| sampler | build ms | epoch ms | ratio ours/PML |")
    print("|---|---|---|---|")
    print(
        f"| deepmetric PKSampler(p=16, k=4) | {s['ours_build_ms']:.1f} | {s['ours_ms']:.1f} "
        f"| {s['ours_ms'] / s['pml_ms']:.3f} |"
    )
    print(
        f"| PML MPerClassSampler(m=4, batch_size=64) | {s['pml_build_ms']:.1f} | "
        f"{s['pml_ms']:.1f} | |"
    )
    print(
        f"({s['samples']} samples, {s['classes']} classes, {s['epoch_samples']} samples per epoch)"
    )
    print(json.dumps({"xbm": rows, "sampler": s}))


if __name__ == "__main__":
    main()
