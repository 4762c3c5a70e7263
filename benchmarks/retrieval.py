"""Retrieval evaluation benchmark: deepmetric vs PML AccuracyCalculator vs plain faiss.

    python benchmarks/retrieval.py sop      # 60,502 x 512, SOP-like classes, exact metrics
    python benchmarks/retrieval.py scale    # 1,000,000 x 128, faiss-ivf vs exact on 10k queries
    python benchmarks/retrieval.py all
    python benchmarks/retrieval.py scale --ablate   # + gallery blocks against whole rows

Synthetic data (seeded): class centres are random unit vectors, items are centre + Gaussian
noise, L2-normalised, so the metrics are far from 0 and 1. The parent process writes the data
to .npy files; each measurement runs in its own subprocess that loads them, so the peak RSS
of one method (``resource.getrusage(RUSAGE_SELF).ru_maxrss``; psutil is not installed) is not
polluted by another. "extra" = peak RSS after the call minus peak RSS after loading the data
(interpreter, torch, faiss and the embeddings). torch and faiss use 2 threads.
The matmul floor is N^2 * d * 2 FLOPs at the best GFLOP/s of big float32 torch matmuls
(output buffer reused) measured in the same run. The machine may be shared: SOP methods run
``--repeats`` times interleaved and the best time is reported with all times and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

THREADS = 2
SOP_CLASSES, SOP_ITEMS, SOP_DIM, SOP_NOISE = 11_316, 60_502, 512, 2.25
SCALE_ITEMS, SCALE_DIM, SCALE_CLASS_SIZE, SCALE_NOISE = 1_000_000, 128, 10, 0.8
SCALE_SAMPLES = 10_000
SCALE_WIDER_NPROBE = (64, 256)  # besides the default 16


# ------------------------------------------------------------------------------------------
# data


def sop_class_sizes(rng: np.random.Generator) -> np.ndarray:
    """11,316 class sizes in 2..12 summing to 60,502 (mean 5.35, skewed to small classes)."""
    sizes = 2 + np.minimum(rng.poisson(3.35, SOP_CLASSES), 10)
    while sizes.sum() != SOP_ITEMS:
        i = rng.integers(SOP_CLASSES)
        if sizes.sum() < SOP_ITEMS and sizes[i] < 12:
            sizes[i] += 1
        elif sizes.sum() > SOP_ITEMS and sizes[i] > 2:
            sizes[i] -= 1
    sizes[np.argmax(sizes)] = 12  # the largest SOP class has 12 images
    sizes[np.argmin(sizes)] += SOP_ITEMS - sizes.sum()
    return sizes


def clustered(labels: np.ndarray, num_classes: int, dim: int, noise: float, seed: int):
    """float32 unit embeddings: centre[label] + noise * N(0, I/dim), built in row blocks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((labels.size, dim), np.float32)
    for start in range(0, labels.size, 100_000):
        rows = slice(start, start + 100_000)
        block = centres[labels[rows]]
        block += rng.standard_normal(block.shape, dtype=np.float32) * (noise / np.sqrt(dim))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[rows] = block
    return x


def make_sop(folder: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(SOP_CLASSES), sop_class_sizes(rng))
    rng.shuffle(labels)
    x = clustered(labels, SOP_CLASSES, SOP_DIM, SOP_NOISE, seed=1)
    np.save(folder / "sop_x.npy", x)
    np.save(folder / "sop_y.npy", labels.astype(np.int64))


def make_scale(folder: Path) -> None:
    num_classes = SCALE_ITEMS // SCALE_CLASS_SIZE
    labels = np.random.default_rng(2).permutation(np.arange(SCALE_ITEMS) % num_classes)
    x = clustered(labels, num_classes, SCALE_DIM, SCALE_NOISE, seed=3)
    np.save(folder / "scale_x.npy", x)
    np.save(folder / "scale_y.npy", labels.astype(np.int64))


# ------------------------------------------------------------------------------------------
# approximate search against exact search


def ann_agreement(
    query,
    gallery=None,
    k: int = 10,
    *,
    backend: str = "faiss-ivf",
    index_options: dict | None = None,
    num_samples: int = 10_000,
    seed: int = 0,
    exclude_self: bool | None = None,
    memory_budget_bytes: int = 2**30,
) -> dict:
    """How well an approximate index agrees with exact search, on a sample of queries.

    Builds the ``backend`` index over ``gallery`` (the query set when None, with the query's own
    item excluded by index), searches ``num_samples`` queries drawn without replacement
    (seeded), and compares with exact torch search of the same queries.

    Returns a dict: "recall@1" (fraction of sampled queries whose approximate first result is
    the exact nearest neighbour, by index), "top_k_agreement" (mean |approx top-k ∩ exact
    top-k| / k), "k", "num_samples", "build_s", "search_s", "exact_s" (seconds), and the
    tensors "sample_index" (S,), "approx_indices" (S, k), "exact_indices" (S, k).
    """
    import torch

    from deepmetric.evaluation import FaissSearcher, knn
    from deepmetric.evaluation.checks import APPROXIMATE_BACKENDS, as_embeddings

    if backend not in (*APPROXIMATE_BACKENDS, "faiss"):
        raise ValueError(f"backend must be a faiss backend, got {backend!r}")
    q = as_embeddings(query, "query")
    g = q if gallery is None else as_embeddings(gallery, "gallery")
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
    own = sample if exclude_self else None

    searcher = FaissSearcher(g, backend, index_options)
    start = time.perf_counter()
    _, approx_i = searcher.search(sample_q, k, own)
    search_s = time.perf_counter() - start

    start = time.perf_counter()
    _, exact_i = knn(sample_q, g, k, self_index=own, memory_budget_bytes=memory_budget_bytes)
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


# ------------------------------------------------------------------------------------------
# workers (one per subprocess)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(task: str, folder: Path) -> dict:
    import faiss
    import torch

    torch.set_num_threads(THREADS)
    faiss.omp_set_num_threads(THREADS)
    out: dict = {"task": task}
    if task == "floor":
        best = 0.0
        shapes = ((4096, 4096, 4096), (4096, SOP_DIM, 16384), (2048, SOP_DIM, 8192))
        for m, k, n in shapes:
            a, b = torch.randn(m, k), torch.randn(k, n)
            c = torch.empty(m, n)
            torch.mm(a, b, out=c)
            start = time.perf_counter()
            for _ in range(3):
                torch.mm(a, b, out=c)
            seconds = (time.perf_counter() - start) / 3
            gflops = 2 * m * k * n / seconds / 1e9
            out[f"gflops_{m}x{k}x{n}"] = gflops
            best = max(best, gflops)
        out["gflops"] = best
        return out

    prefix = "sop" if task.startswith("sop") else "scale"
    x = np.load(folder / f"{prefix}_x.npy")
    y = np.load(folder / f"{prefix}_y.npy")
    out["rss_loaded_mib"] = peak_mib()
    out["embeddings_mib"] = x.nbytes / 2**20
    start = time.perf_counter()
    if task == "sop_ours":
        from deepmetric.data import SOURCES
        from deepmetric.evaluation import evaluate

        result = evaluate(
            torch.from_numpy(x), torch.from_numpy(y), recall_at=SOURCES["sop"].recall_at,
            metrics=("recall", "map_at_r", "r_precision"),
        )  # fmt: skip
        out["metrics"] = result
    elif task == "sop_pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calculator = AccuracyCalculator(
            include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
            k="max_bin_count",
        )
        result = calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
        out["metrics"] = {
            "recall@1": result["precision_at_1"],
            "map@r": result["mean_average_precision_at_r"],
            "r_precision": result["r_precision"],
        }
    elif task == "sop_faiss":
        # what a plain exact search costs: IndexFlatIP, k = largest class (self + 11 others)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        _, neighbours = index.search(x, 13)
        first = np.where(neighbours[:, 0] == np.arange(len(x)), neighbours[:, 1], neighbours[:, 0])
        out["metrics"] = {"recall@1 (self dropped, no tie rule)": float((y[first] == y).mean())}
    elif task == "scale_ivf":
        report = ann_agreement(
            torch.from_numpy(x), None, k=10, backend="faiss-ivf", num_samples=SCALE_SAMPLES,
            seed=0,
        )  # fmt: skip
        sample = report["sample_index"].numpy()
        labels = torch.from_numpy(y)
        out["metrics"] = {
            key: report[key]
            for key in ("recall@1", "top_k_agreement", "k", "build_s", "search_s", "exact_s")
        }
        for name in ("approx", "exact"):
            first = report[f"{name}_indices"][:, 0]
            hit = (labels[first] == labels[sample]).double().mean().item()
            out["metrics"][f"label_recall@1_{name}"] = hit
        # the same index probed more widely: agreement against the same exact lists
        from deepmetric.evaluation import FaissSearcher

        exact = report["exact_indices"]
        for nprobe in SCALE_WIDER_NPROBE:
            searcher = FaissSearcher(torch.from_numpy(x), "faiss-ivf", {"nprobe": nprobe})
            begin = time.perf_counter()
            _, approx = searcher.search(torch.from_numpy(x[sample]), 10, report["sample_index"])
            seconds = time.perf_counter() - begin
            overlap = (approx[:, :, None] == exact[:, None, :]).any(dim=2).sum(dim=1)
            out["metrics"][f"nprobe{nprobe}"] = {
                "recall@1": (approx[:, 0] == exact[:, 0]).double().mean().item(),
                "top_k_agreement": (overlap.double() / 10).mean().item(),
                "label_recall@1": (labels[approx[:, 0]] == labels[sample]).double().mean().item(),
                "search_s": seconds,
            }
    elif task in ("scale_exact_blocks", "scale_exact_rows"):
        # the exact search of the sample, with and without gallery blocks (--ablate)
        from deepmetric.evaluation import knn
        from deepmetric.evaluation.blocks import plan_chunks
        from deepmetric.evaluation.exact import search_rows

        generator = torch.Generator().manual_seed(0)
        sample = torch.randperm(len(x), generator=generator)[:SCALE_SAMPLES].sort().values
        gallery, queries = torch.from_numpy(x), torch.from_numpy(x[sample.numpy()])
        start = time.perf_counter()  # the sample is not part of the measurement
        if task == "scale_exact_blocks":
            _, indices = knn(queries, gallery, 10, self_index=sample)
        else:
            rows, _ = plan_chunks(len(queries), len(gallery), 10, 2**30)
            _, indices, _ = search_rows(queries, gallery, 10, sample, rows)
        out["metrics"] = {"index_checksum": int(indices.sum())}
    else:
        raise ValueError(task)
    out["seconds"] = time.perf_counter() - start
    out["rss_peak_mib"] = peak_mib()
    out["extra_mib"] = out["rss_peak_mib"] - out["rss_loaded_mib"]
    return out


def run_worker(task: str, folder: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "_worker", task, str(folder)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{task} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


# ------------------------------------------------------------------------------------------
# reports


def best_of(runs: list[dict]) -> dict:
    """The fastest run, with the largest peak RSS and the list of all times."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["rss_peak_mib"] = max(r["rss_peak_mib"] for r in runs)
    best["extra_mib"] = max(r["extra_mib"] for r in runs)
    best["all_seconds"] = [round(r["seconds"], 1) for r in runs]
    return best


def report_sop(folder: Path, repeats: int) -> None:
    make_sop(folder)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"floor": [], "sop_ours": [], "sop_pml": [], "sop_faiss": []}
    for _ in range(repeats):  # interleaved, so that load from other jobs hits all alike
        for task in runs:
            runs[task].append(run_worker(task, folder))
    load_after = os.getloadavg()
    gflops = max(r["gflops"] for r in runs["floor"])
    flops = SOP_ITEMS**2 * SOP_DIM * 2
    floor_s = flops / (gflops * 1e9)
    ours, pml, plain = (best_of(runs[t]) for t in ("sop_ours", "sop_pml", "sop_faiss"))
    print(f"\nSOP scale: {SOP_ITEMS:,} x {SOP_DIM}, {SOP_CLASSES:,} classes (2-12 images)")
    print(f"matmul floor: {flops / 1e12:.2f} TFLOP at {gflops:.0f} GFLOP/s = {floor_s:.1f} s")
    print(f"best of {repeats} interleaved runs; 1-min load average before/after: "
          f"{load_before[0]:.1f} / {load_after[0]:.1f} (2 cores)")  # fmt: skip
    print("\n| method | time (s), best | all runs (s) | x floor | peak RSS (MiB) | "
          "extra beyond loaded data (MiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, r in (
        ("deepmetric evaluate (torch, exact, R@1/10/100/1000, MAP@R, R-prec)", ours),
        ('PML AccuracyCalculator(k="max_bin_count") (P@1, MAP@R, R-prec)', pml),
        ("faiss IndexFlatIP search, k=13 (no metrics)", plain),
    ):
        ratio = r["seconds"] / floor_s
        print(f"| {name} | {r['seconds']:.1f} | {r['all_seconds']} | {ratio:.2f} | "
              f"{r['rss_peak_mib']:.0f} | {r['extra_mib']:.0f} |")  # fmt: skip
    print(f"\nours / PML time: {ours['seconds'] / pml['seconds']:.2f}")
    print("\n| metric | deepmetric | PML |")
    print("|---|---|---|")
    for key, value in ours["metrics"].items():
        theirs = pml["metrics"].get(key)
        shown = "-" if theirs is None else f"{theirs:.6f}"
        mine = f"{value:.6f}" if isinstance(value, float) else str(value)
        print(f"| {key} | {mine} | {shown} |")


def report_scale(folder: Path) -> None:
    make_scale(folder)
    r = run_worker("scale_ivf", folder)
    m = r["metrics"]
    print(
        f"\nscale: {SCALE_ITEMS:,} x {SCALE_DIM}, faiss-ivf (nlist=1000, nprobe=16) vs exact "
        f"torch search on {SCALE_SAMPLES:,} sampled queries (self excluded), k={m['k']}"
    )
    print("\n| quantity | value |")
    print("|---|---|")
    rows = [
        ("Recall@1 agreement (approx first = exact NN)", f"{m['recall@1']:.4f}"),
        ("top-10 agreement", f"{m['top_k_agreement']:.4f}"),
        ("label Recall@1, approx / exact",
         f"{m['label_recall@1_approx']:.4f} / {m['label_recall@1_exact']:.4f}"),
        *(
            (f"with nprobe {n}: Recall@1 agreement / top-10 agreement / label Recall@1 / "
             "search s",
             f"{w['recall@1']:.4f} / {w['top_k_agreement']:.4f} / {w['label_recall@1']:.4f} / "
             f"{w['search_s']:.2f}")
            for n in SCALE_WIDER_NPROBE
            for w in [m[f"nprobe{n}"]]
        ),
        ("index build (train + add), s", f"{m['build_s']:.1f}"),
        ("approx search of the sample, s", f"{m['search_s']:.2f}"),
        ("exact search of the sample, s", f"{m['exact_s']:.1f}"),
        ("total, s", f"{r['seconds']:.1f}"),
        ("peak RSS / extra beyond loaded data, MiB",
         f"{r['rss_peak_mib']:.0f} / {r['extra_mib']:.0f}"),
    ]  # fmt: skip
    for name, value in rows:
        print(f"| {name} | {value} |")


def report_ablation(folder: Path) -> None:
    """knn's gallery blocks (BLOCK_COLUMNS) against whole gallery rows, same exact search."""
    if not (folder / "scale_x.npy").exists():
        make_scale(folder)
    blocks, rows = (run_worker(t, folder) for t in ("scale_exact_blocks", "scale_exact_rows"))
    assert blocks["metrics"] == rows["metrics"], "the two searches must return the same lists"
    print(f"\nexact search of {SCALE_SAMPLES:,} queries in {SCALE_ITEMS:,} x {SCALE_DIM}, k=10:")
    print("\n| gallery scored | time (s) | extra beyond loaded data (MiB) |")
    print("|---|---|---|")
    for name, r in (("in blocks of 8192 columns (knn)", blocks), ("as whole rows", rows)):
        print(f"| {name} | {r['seconds']:.1f} | {r['extra_mib']:.0f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        print(json.dumps(worker(sys.argv[2], Path(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=("sop", "scale", "all"))
    parser.add_argument("--repeats", type=int, default=2, help="interleaved SOP runs (best-of)")
    parser.add_argument(
        "--ablate", action="store_true", help="also time gallery blocks against whole rows"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.which in ("sop", "all"):
            report_sop(Path(tmp), args.repeats)
        if args.which in ("scale", "all"):
            report_scale(Path(tmp))
        if args.ablate:
            report_ablation(Path(tmp))


if __name__ == "__main__":
    main()
