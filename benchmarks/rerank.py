"""Re-ranking cost: time and peak extra memory of ``evaluate`` with and without each
re-ranking, on synthetic clustered embeddings (SOP-like: classes of ~5 images, the query set
as its own gallery).

Each case runs in a fresh process (its peak RSS is its own): the embeddings are loaded from a
.npy file, the peak RSS before ``evaluate`` is subtracted from the peak after it ("extra"),
so the embeddings themselves are not counted. Cases: none, k_reciprocal (k1 20, k2 6,
lambda 0.3, 100 candidates), alpha_qe (alpha 3, n 2) and alpha_qe with DBA.

    PYTHONPATH=src .venv/bin/python benchmarks/rerank.py [--n 20000] [--dim 512] [--threads 2]
        [--noise 2.2] [--cases none,k_reciprocal,alpha_qe,alpha_qe+dba]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = {
    "none": ("none", {}),
    "k_reciprocal": ("k_reciprocal", {}),
    "alpha_qe": ("alpha_qe", {}),
    "alpha_qe+dba": ("alpha_qe", {"dba": True}),
}


def clustered(
    n: int, dim: int, per_class: int, seed: int, noise_scale: float = 2.2
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around n / per_class random Gaussian centres, Gaussian noise of
    ``noise_scale`` times their scale (at N = 20,000 x 512: R@1 1.0 at 1.6, 0.19 at 3)."""
    rng = np.random.default_rng(seed)
    classes = max(1, n // per_class)
    labels = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    noise = rng.standard_normal((n, dim)).astype(np.float32)
    x = centres[labels] + noise_scale * noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    import torch

    from deepmetric.evaluation import evaluate

    torch.set_num_threads(args.threads)
    data = np.load(args.data)
    x, labels = torch.from_numpy(data["x"]), torch.from_numpy(data["labels"])
    name, options = CASES[args.child]
    before = peak_rss_mib()
    start = time.perf_counter()
    result = evaluate(
        x, labels, recall_at=(1, 10), metrics=("recall", "map_at_r"), rerank=name,
        rerank_options=options,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    out = {
        "case": args.child,
        "seconds": seconds,
        "extra_mib": peak_rss_mib() - before,
        "recall@1": result["recall@1"],
        "map@r": result["map@r"],
    }
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="embeddings (SOP test: 60502)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--noise", type=float, default=2.2, help="noise / centre scale")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        x, labels = clustered(args.n, args.dim, args.per_class, seed=0, noise_scale=args.noise)
        data = Path(tmp) / "data.npz"
        np.savez(data, x=x, labels=labels)
        print(
            f"N = {args.n:,} x {args.dim}, classes of ~{args.per_class}, noise {args.noise}, "
            f"{args.threads} threads"
        )
        print("| re-ranking | evaluate time (s) | peak extra RSS (MiB) | R@1 | MAP@R |")
        print("|---|---:|---:|---:|---:|")
        for case in args.cases.split(","):
            command = [sys.executable, __file__, "--child", case, "--data", str(data)]
            command += ["--threads", str(args.threads)]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            r = json.loads(line.strip().splitlines()[-1])
            print(
                f"| {case} | {r['seconds']:.1f} | {r['extra_mib']:,.0f} | "
                f"{r['recall@1']:.4f} | {r['map@r']:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
