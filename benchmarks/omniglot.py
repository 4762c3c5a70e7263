"""Omniglot retrieval: deepmetric's trainer against a pytorch-metric-learning pipeline.

Both sides train the same network (deepmetric's Conv-4 + linear head, 128-d, same seeded
initialisation) with the same loss (Multi-Similarity alpha 2, beta 50, base 0.5 with its
epsilon = 0.1 mining), batch (64 = 16 characters x 4 drawings), optimizer (Adam 1e-3), data
pipeline (the same data set object: 28 x 28, ink bright) and iteration budget, on characters
0-763 of the Omniglot background set; both are evaluated with the same code on the unseen
characters 764-963 (deepmetric.evaluation: Recall@K, MAP@R; cross-checked with PML's
AccuracyCalculator: precision_at_1 and mean_average_precision_at_r).

- deepmetric: ``deepmetric.engine.train`` with ``configs/omniglot_multi_similarity.yaml``
  (PKSampler, the MS loss with built-in mining, per-iteration logging, one checkpoint at the end).
- PML: a plain loop with ``MultiSimilarityLoss`` + ``MultiSimilarityMiner`` and
  ``MPerClassSampler(m=4, batch_size=64)``.

``--loss NAME`` with a proxy loss (proxy_anchor, proxy_nca, soft_triple, normalized_softmax,
cosface, arcface; each with its paper defaults on both sides): random batches of 64 on both
sides (deepmetric ``sampler.name: random``; PML a shuffled DataLoader with drop_last), the
same initial proxies (deepmetric's, copied into PML's parameter), and Adam with the proxies in
their own group at ``--loss-lr`` (default 100 x the network's 1e-3, Proxy-Anchor's ratio).

Images/s = training images processed per second of training loop (data loading included,
evaluation and set-up excluded), after a short warm-up of the network; the pipeline that runs
first alternates between seeds. Prints a Markdown table.

``--pml-batches deepmetric`` feeds PML's loop deepmetric's batches (same images, same order),
so that a difference in the results comes from the loss and the loop, not the batch order.

Usage: .venv/bin/python benchmarks/omniglot.py [--iterations 2000] [--seeds 0]
       [--data ../shared/data/omniglot/images_background.npz] [--loss proxy_anchor]
       [--pml-batches deepmetric]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "omniglot_multi_similarity.yaml"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "omniglot" / "images_background.npz"


PROXY_LOSSES = (
    "proxy_anchor",
    "proxy_nca",
    "soft_triple",
    "normalized_softmax",
    "cosface",
    "arcface",
)


def omniglot_config(
    data: Path,
    iterations: int,
    seed: int,
    out: Path,
    loss: str = "multi_similarity",
    loss_lr=0.1,
    config: Path = CONFIG,
    extra: tuple[str, ...] = (),
):
    """``config`` (configs/omniglot_multi_similarity.yaml) with the benchmark's data path,
    budget, seed and run folder; a proxy loss with random batches of 64 and its proxies at
    ``loss_lr``; then the ``extra`` overrides (``--sampler.p=32`` ...)."""
    from deepmetric.config import load_config

    overrides = [
        f"--data.root={data}",
        f"--train.iterations={iterations}",
        f"--seed={seed}",
        f"--output.dir={out}",
        "--train.progress=false",
        "--eval.every=0",
        "--train.checkpoint_every=0",
        "--output.plots=false",
    ]
    if loss in PROXY_LOSSES:
        overrides += [
            f"--loss.name={loss}",
            "--sampler.name=random",
            "--sampler.batch_size=64",
            f"--optim.loss_lr={loss_lr}",
        ]
    return load_config(config, overrides + list(extra))


def pml_proxy_loss(cfg, num_classes: int, initial: torch.Tensor):
    """PML's version of the proxy loss ``cfg.loss.name`` with the config's parameters (each
    defaulting to the paper's, as deepmetric's), holding deepmetric's initial proxies
    ``initial`` (C K, d)."""
    import math

    from pytorch_metric_learning import losses

    name, dim, p = cfg.loss.name, cfg.model.embedding_dim, cfg.loss.params
    if name == "proxy_anchor":
        loss, weight = (
            losses.ProxyAnchorLoss(
                num_classes, dim, margin=p.get("delta", 0.1), alpha=p.get("alpha", 32)
            ),
            "proxies",
        )
    elif name == "proxy_nca":
        loss, weight = losses.ProxyNCALoss(num_classes, dim, softmax_scale=9.0), "proxies"
    elif name == "soft_triple":  # + the tau = 0.2 centre regulariser, as deepmetric's default
        from pytorch_metric_learning.regularizers import SparseCentersRegularizer

        loss = losses.SoftTripleLoss(
            num_classes,
            dim,
            centers_per_class=10,
            weight_regularizer=SparseCentersRegularizer(num_classes, 10),
            weight_reg_weight=0.2,
        )
        weight = "fc"
    elif name == "normalized_softmax":
        loss, weight = (
            losses.NormalizedSoftmaxLoss(num_classes, dim, temperature=p.get("temperature", 0.05)),
            "W",
        )
    elif name == "cosface":
        loss, weight = (
            losses.CosFaceLoss(
                num_classes, dim, margin=p.get("margin", 0.35), scale=p.get("scale", 64)
            ),
            "W",
        )
    elif name == "arcface":
        loss = losses.ArcFaceLoss(
            num_classes,
            dim,
            margin=math.degrees(p.get("margin", 0.5)),  # PML's margin is in degrees
            scale=p.get("scale", 64),
        )
        weight = "W"
    else:
        raise ValueError(name)
    param = getattr(loss, weight)
    with torch.no_grad():
        param.copy_(initial if weight == "proxies" else initial.T)
    return loss


def run_deepmetric(cfg) -> dict:
    """Train with deepmetric's engine; returns {"metrics", "images_per_s", "train_s"}."""
    from deepmetric.engine import train

    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(cfg, config_name=str(CONFIG))
    out = Path(cfg.output.dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = max(r["time_s"] for r in records if "loss" in r)
    batch = cfg.sampler.images_per_batch()
    return {
        "metrics": summary["final"],
        "train_s": train_s,
        "images_per_s": cfg.train.iterations * batch / train_s,
    }


def run_pml(cfg, iterations: int, seed: int, same_batches: bool = False) -> dict:
    """The same network, loss, batch, optimizer and data with PML's loss, miner, sampler;
    with ``same_batches`` PML's loop gets deepmetric's batches (its sampler and seeded
    loader), so that only the loss and the loop differ."""
    from pytorch_metric_learning import losses, miners, samplers
    from torch.utils.data import DataLoader

    from deepmetric.engine import (
        Evaluator,
        build_criterion,
        build_data,
        build_model_from_config,
        seed_everything,
    )
    from deepmetric.engine.builders import build_batches, build_train_loader

    seed_everything(seed)
    train_ds, eval_sets = build_data(cfg)
    model = build_model_from_config(cfg)  # same seeded initialisation as deepmetric's run
    batch = cfg.sampler.images_per_batch()
    groups = [{"params": list(model.parameters()), "lr": cfg.optim.lr}]
    if cfg.loss.name in PROXY_LOSSES:  # random batches; deepmetric's initial proxies
        initial = build_criterion(cfg, train_ds.num_classes).proxies.detach()
        loss_func = pml_proxy_loss(cfg, train_ds.num_classes, initial)
        miner = None
        groups.append({"params": list(loss_func.parameters()), "lr": cfg.optim.loss_lr})
        loader = DataLoader(
            train_ds,
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            generator=torch.Generator().manual_seed(seed),
        )
    else:
        sampler = samplers.MPerClassSampler(
            train_ds.labels.numpy(),
            m=cfg.sampler.k,
            batch_size=batch,
            length_before_new_iter=iterations * batch,
        )
        loader = DataLoader(
            train_ds,
            batch_size=batch,
            sampler=sampler,
            drop_last=True,
            num_workers=cfg.data.num_workers,
        )
        p = cfg.loss.params
        loss_func = losses.MultiSimilarityLoss(alpha=p["alpha"], beta=p["beta"], base=p["base"])
        miner = miners.MultiSimilarityMiner(epsilon=p["epsilon"])
    batches = None
    if same_batches:
        batches = build_batches(cfg, train_ds, rank=0, world_size=1)
        loader = build_train_loader(cfg, train_ds, batches, torch.device("cpu"))
    optimizer = torch.optim.Adam(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    model.train()
    start = time.perf_counter()
    done, epoch = 0, 0
    while done < iterations:  # epochs of the shuffled loader (one long one for MPerClass)
        if batches is not None:
            batches.set_epoch(epoch)
        epoch += 1
        for images, labels in loader:
            embeddings = model(images)
            if miner is None:
                loss = loss_func(embeddings, labels)
            else:
                loss = loss_func(embeddings, labels, miner(embeddings, labels))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == iterations:
                break
    train_s = time.perf_counter() - start
    es = eval_sets["val"]
    evaluator = Evaluator(cfg, {"val": es}, torch.device("cpu"), None, persistent_workers=False)
    metrics = evaluator.evaluate(model)["val"]
    return {
        "metrics": metrics,
        "train_s": train_s,
        "images_per_s": done * batch / train_s,
        "model": model,
        "eval_set": es,
    }


def speed_rounds(
    data: Path, rounds: int, iterations: int, tmp: Path, loss: str, loss_lr: float,
    config: Path = CONFIG, extra: tuple[str, ...] = (),
) -> dict[str, list[float]]:  # fmt: skip
    """Training images/s of both pipelines measured in alternating short runs (deepmetric,
    PML, deepmetric, PML, ...), so that a change in the machine's load hits both alike."""
    speeds: dict[str, list[float]] = {"deepmetric": [], "PML": []}
    for r in range(rounds):
        cfg = omniglot_config(
            data, iterations, 100 + r, tmp / f"speed{r}", loss, loss_lr, config, extra
        )
        order = ("deepmetric", "PML") if r % 2 == 0 else ("PML", "deepmetric")
        for name in order:
            result = (
                run_deepmetric(cfg) if name == "deepmetric" else run_pml(cfg, iterations, 100 + r)
            )
            speeds[name].append(result["images_per_s"])
    return speeds


def warm_up(cfg, steps: int = 30) -> None:
    """A few forward/backward passes of a throwaway Conv-4 at the benchmark's batch shape, so
    neither pipeline pays the one-time costs (kernel selection, allocator growth)."""
    from deepmetric.engine import build_model_from_config

    model = build_model_from_config(cfg)
    x = torch.randn(cfg.sampler.images_per_batch(), 1, 28, 28)
    for _ in range(steps):
        model(x).square().sum().backward()


def pml_accuracy(model, es, cfg) -> dict:
    """PML's AccuracyCalculator on the same embeddings (query = reference, self excluded)."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from deepmetric.engine import build_eval_loader
    from deepmetric.evaluation import extract_embeddings

    emb, labels = extract_embeddings(
        model, build_eval_loader(cfg, es.dataset, False), progress=False
    )
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count"
    )
    return calc.get_accuracy(emb, labels, emb, labels, ref_includes_query=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[0], help="accuracy runs (none: speed only)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--loss", default="multi_similarity", choices=("multi_similarity", *PROXY_LOSSES)
    )
    parser.add_argument(
        "--loss-lr", type=float, default=0.1, help="proxy losses: the proxies' Adam lr"
    )
    parser.add_argument(
        "--config", type=Path, default=CONFIG, help="default configs/omniglot_multi_similarity.yaml"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for both pipelines, e.g. --set sampler.p=32 (repeatable)",
    )
    parser.add_argument(
        "--speed-rounds",
        type=int,
        default=4,
        help="alternating short runs for the images/s comparison (0 = none)",
    )
    parser.add_argument("--speed-iterations", type=int, default=150)
    parser.add_argument(
        "--pml-batches",
        choices=("own", "deepmetric"),
        default="own",
        help="PML's loop draws its own batches (MPerClassSampler or a shuffled loader) or "
        "gets deepmetric's (the same images in the same order: only the loss and loop differ)",
    )
    parser.add_argument(
        "--order",
        choices=("alternate", "deepmetric-first", "pml-first"),
        default="alternate",
        help="which pipeline runs first (alternate: deepmetric first on even "
        "seeds, PML first on odd ones)",
    )
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"Omniglot file not found: {args.data} (see ../shared/data/omniglot/README.md)")

    extra = tuple(f"--{kv}" for kv in args.set)
    cfg = omniglot_config(
        args.data, args.iterations, 0, Path("unused"), args.loss, args.loss_lr, args.config, extra
    )  # the settings the table's header shows
    rows = []
    for seed in args.seeds:
        pml_first = args.order == "pml-first" or (args.order == "alternate" and seed % 2 == 1)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = omniglot_config(
                args.data,
                args.iterations,
                seed,
                Path(tmp) / "run",
                args.loss,
                args.loss_lr,
                args.config,
                extra,
            )
            warm_up(cfg)
            if pml_first:
                pml = run_pml(cfg, args.iterations, seed, args.pml_batches == "deepmetric")
            ours = run_deepmetric(cfg)
            if not pml_first:
                pml = run_pml(cfg, args.iterations, seed, args.pml_batches == "deepmetric")
            from deepmetric.engine import load_model

            _, our_model, _ = load_model(Path(tmp) / "run")
            check = {
                "deepmetric": pml_accuracy(our_model, pml["eval_set"], cfg),
                "PML": pml_accuracy(pml["model"], pml["eval_set"], cfg),
            }
        for name, r in (("deepmetric", ours), ("PML", pml)):
            m = r["metrics"]
            rows.append(
                (
                    seed,
                    name,
                    m["recall@1"],
                    m["recall@2"],
                    m["recall@4"],
                    m["recall@8"],
                    m["map@r"],
                    check[name]["precision_at_1"],
                    check[name]["mean_average_precision_at_r"],
                    r["images_per_s"],
                    r["train_s"],
                )
            )
            print(
                f"seed {seed} {name}: R@1 {m['recall@1']:.4f} MAP@R {m['map@r']:.4f} "
                f"{r['images_per_s']:.0f} img/s",
                file=sys.stderr,
                flush=True,
            )
    speeds: dict[str, list[float]] = {}
    if args.speed_rounds:
        warm_up(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            speeds = speed_rounds(
                args.data, args.speed_rounds, args.speed_iterations, Path(tmp), args.loss,
                args.loss_lr, args.config, extra,
            )  # fmt: skip

    print(
        f"Omniglot background set, train characters 0-763 (15,280 images), evaluate on "
        f"characters 764-963 (4,000 images, each against the other 3,999); "
        f"loss {args.loss}"
        + (
            f" (proxies' lr {args.loss_lr}), random batches of {cfg.sampler.images_per_batch()}"
            if args.loss in PROXY_LOSSES
            else f", batches of {cfg.sampler.images_per_batch()} = {cfg.sampler.p} x "
            f"{cfg.sampler.k}"
        )
        + (f"; config {args.config}" if args.config != CONFIG else "")
        + (f"; overrides {' '.join(args.set)}" if args.set else "")
        + ("; PML fed deepmetric's batches" if args.pml_batches == "deepmetric" else "")
        + f"; {args.iterations} iterations; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}.\n"
    )
    print(
        "| seed | pipeline | R@1 | R@2 | R@4 | R@8 | MAP@R | PML P@1 | PML MAP@R | "
        "train images/s | train s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        seed, name, *vals, ips, secs = row
        print(
            f"| {seed} | {name} | "
            + " | ".join(f"{v:.4f}" for v in vals)
            + f" | {ips:.0f} | {secs:.1f} |"
        )
    if speeds:
        print(
            f"\nTraining speed in {args.speed_rounds} alternating runs of "
            f"{args.speed_iterations} iterations (images/s, median [min, max]):\n"
        )
        print("| pipeline | images/s | runs |")
        print("|---|---|---|")
        for name, values in speeds.items():
            v = sorted(values)
            print(
                f"| {name} | {v[len(v) // 2]:.0f} [{v[0]:.0f}, {v[-1]:.0f}] | "
                + ", ".join(f"{x:.0f}" for x in values)
                + " |"
            )


if __name__ == "__main__":
    main()
