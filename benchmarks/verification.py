"""Verification metrics against the retrieval evaluation of the same set: time (interleaved in
one process, ratio per round) and peak extra memory (each in a fresh process: its peak RSS
above the RSS before the call, Linux's VmHWM reset), on synthetic clustered embeddings
(SOP-like: classes of ~5 images, the query set as its own gallery).

"retrieval" is ``evaluate`` with the config's default metrics (recall, map_at_r, r_precision
at Recall@1, 10, 100, 1000 as for SOP); "verification" is ``evaluate(metrics=["verification"])``
(ROC AUC, EER, TAR@FAR 1e-1 .. 1e-5 over all N (N - 1) / 2 pairs). Also printed: how many
counting passes the verification needed (1 when the bins guessed before the first pass were
enough).

    PYTHONPATH=src .venv/bin/python benchmarks/verification.py [--n 60502] [--dim 512]
        [--threads 2] [--rounds 2] [--noise 2.2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from rerank import clustered

CASES = {
    "retrieval": {
        "metrics": ("recall", "map_at_r", "r_precision"),
        "recall_at": (1, 10, 100, 1000),
    },
    "verification": {"metrics": ("verification",), "recall_at": (1,)},
}


def run_case(emb, labels, case: str) -> tuple[float, dict]:
    from deepmetric.evaluation import evaluate

    start = time.perf_counter()
    out = evaluate(emb, labels, **CASES[case])
    return time.perf_counter() - start, out


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """One case in this process: its peak RSS above the loaded embeddings."""
    import torch

    torch.set_num_threads(args.threads)
    data = np.load(args.data)
    emb, labels = torch.from_numpy(data["emb"]), torch.from_numpy(data["labels"])
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) restarts here
    seconds, _ = run_case(emb, labels, args.child)
    after = _status_mib("VmHWM")
    print(json.dumps({"case": args.child, "seconds": seconds, "extra_mib": after - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60502)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--noise", type=float, default=2.2)
    parser.add_argument("--child", choices=list(CASES))
    parser.add_argument("--data")
    parser.add_argument("--memory-only", action="store_true", help="skip the timed rounds")
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    from deepmetric.evaluation import verification

    torch.set_num_threads(args.threads)
    emb, labels = clustered(args.n, args.dim, 5, seed=0, noise_scale=args.noise)
    print(
        f"N = {args.n:,} x {args.dim}, {args.n * (args.n - 1) // 2:,} pairs, {args.threads} threads"
    )
    passes = []
    original = verification._Pairs.count

    def counted(self, *a, **k):  # count the counting passes (not the row sample)
        if k.get("rows") is None:
            passes.append(1)
        return original(self, *a, **k)

    verification._Pairs.count = counted
    x, y = torch.from_numpy(emb), torch.from_numpy(labels)
    for r in range(0 if args.memory_only else args.rounds):
        t_ret, ret = run_case(x, y, "retrieval")
        passes.clear()
        t_ver, ver = run_case(x, y, "verification")
        print(
            f"round {r + 1}: retrieval {t_ret:.1f} s, verification {t_ver:.1f} s "
            f"(ratio {t_ver / t_ret:.2f}; {len(passes)} counting pass(es))"
        )
    verification._Pairs.count = original
    if not args.memory_only:
        print(f"  recall@1 {ret['recall@1']:.4f}  map@r {ret['map@r']:.4f}")
        keys = ["roc_auc", "eer", *(k for k in ver if k.startswith("tar@"))]
        print("  " + "  ".join(f"{k} {ver[k]:.4f}" for k in keys))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "emb.npz"
        np.savez(data, emb=emb, labels=labels)
        for case in CASES:
            command = [sys.executable, __file__, "--child", case, "--data", str(data)]
            command += ["--threads", str(args.threads)]
            out = json.loads(
                subprocess.run(command, check=True, capture_output=True, text=True).stdout
            )
            print(f"{case}: peak extra memory {out['extra_mib']:.0f} MiB ({out['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
