"""R@1 and MAP@R of a trained run with and without each re-ranking: the run's evaluation split
is embedded once, then evaluated plain, with k-reciprocal and with alpha-QE (defaults).

    PYTHONPATH=src .venv/bin/python benchmarks/rerank_run.py RUN [--split test|val]
"""

from __future__ import annotations

import argparse
import time

import torch

from deepmetric.engine.builders import build_eval_loader
from deepmetric.engine.inference import evaluation_set, load_model
from deepmetric.evaluation import evaluate, extract_embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run or checkpoint folder")
    parser.add_argument("--split", default="test", choices=("test", "val"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, model, checkpoint = load_model(args.run)
    eval_set = evaluation_set(cfg, args.split, checkpoint)
    loader = build_eval_loader(cfg, eval_set.dataset, False)
    emb, labels = extract_embeddings(model, loader, device=torch.device("cpu"))
    classes = len(set(labels.tolist()))
    print(f"{args.split}: {len(labels):,} images, {classes} classes ({checkpoint})")
    print("| re-ranking | R@1 | MAP@R | evaluation (s) |\n|---|---:|---:|---:|")
    for name in ("none", "k_reciprocal", "alpha_qe"):
        start = time.perf_counter()
        out = evaluate(emb, labels, recall_at=(1,), metrics=("recall", "map_at_r"), rerank=name)
        seconds = time.perf_counter() - start
        print(f"| {name} | {out['recall@1']:.4f} | {out['map@r']:.4f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
