"""The ``deepmetric`` command (also ``python -m deepmetric``).

    deepmetric train --config configs/demo.yaml [--optim.lr=1e-4 --data.root PATH ...]
    deepmetric eval --checkpoint runs/x [--split test|val] [--out FILE.json] [--data.root PATH]
    deepmetric embed --checkpoint runs/x --images DIR_OR_LIST --out emb.npy
    deepmetric datasets check --dataset sop --root ~/data/Stanford_Online_Products
    deepmetric datasets check --config configs/folder.yaml --data.root ~/photos
    deepmetric index build --checkpoint runs/x --images GALLERY --out gallery.index
        [--threshold-far F | --threshold-precision P] [--calibration-images FOLDER]
    deepmetric index add|remove --index gallery.index --images MORE | --ids PATH ...
    deepmetric search --index gallery.index --images QUERIES --k 10 [--out hits.csv]
        [--threshold auto|VALUE]
    deepmetric export --checkpoint runs/x --format onnx|torchscript --out model.onnx
    deepmetric report --checkpoint runs/x [--split test|val] [--out report.html]
    deepmetric report --index gallery.index --images QUERIES [--out report.html]
    deepmetric tune --config PRESET --space SPACE.yaml --trials 30 [--out DIR] [--storage URL]
    deepmetric compare --configs A.yaml B.yaml --seeds 3 [--out DIR]

Exit status:

- 0: success.
- 2: a user or environment mistake, told in one line on stderr (no traceback) that names the
  file, key or flag and what to change: a bad config or override, a missing or damaged file
  (a checkpoint that fails its checksums), a data set problem, P x K asking for more classes
  than there are, images of different sizes without a resize option, a run that diverged
  (NaN or inf), a full disk, a run folder that cannot be written (checked before training).
- 75: ``train`` stopped by SIGTERM, SIGINT or SIGUSR1 after finishing its step and writing a
  checkpoint (the line printed says where); continue with ``--train.resume=auto``. ``tune``
  and ``compare`` likewise; run the same command again to continue.
- 1: a failed ``datasets check``, or an unexpected error, with its traceback: that is a bug.
- 130: interrupted (Ctrl-C) outside the training loop.

Imports: each command imports what it uses inside its branch, so that ``deepmetric --help``
and a mistyped flag answer without loading torch (about 2 s).
"""

from __future__ import annotations

import argparse
import errno
import sys
import traceback
from collections.abc import Sequence

__all__ = ["main"]

_OVERRIDES = (
    "Any other --section.key=value (or --section.key value) overrides the configuration, e.g. "
    "--optim.lr=3e-5 --data.root ~/data/CUB_200_2011 --train.iterations 100; values are "
    "read as YAML (null, true, [1, 2, 4])."
)


def _add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_OR_CKPT",
        help="run folder (uses best, else last) or checkpoint folder",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepmetric",
        description="Deep metric learning: train, evaluate and use embedding models.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        allow_abbrev=False,
        help="train a model from a YAML config",
        description="Train from a YAML config (presets in configs/). Writes a run folder with "
        "config.yaml, metrics.jsonl, loss/recall plots and checkpoints (last, best). SIGTERM, "
        "SIGINT or SIGUSR1 stop it after the current step with a checkpoint (exit status 75). "
        "Continue a run with --train.resume=auto (same --output.dir) or "
        "--train.resume=RUN_OR_CKPT. " + _OVERRIDES,
    )
    p.add_argument("--config", required=True, metavar="FILE", help="YAML configuration file")

    p = sub.add_parser(
        "eval",
        allow_abbrev=False,
        help="evaluate a checkpoint (Recall@K, MAP@R ...)",
        description="Embed the test split (or the run's class-disjoint validation split) with a "
        "checkpoint, print the retrieval metrics and write them as JSON. " + _OVERRIDES,
    )
    _add_checkpoint_argument(p)
    p.add_argument(
        "--split",
        default="test",
        choices=("test", "val"),
        help="test split (default) or the run's validation classes",
    )
    p.add_argument(
        "--out",
        metavar="FILE.json",
        help="where to write the metrics (default RUN/eval-SPLIT-iterN.json)",
    )

    p = sub.add_parser(
        "embed",
        allow_abbrev=False,
        help="embed a folder or list of images into a .npy file",
        description="Embed images with a checkpoint (test transform). Writes an N x d float32 "
        ".npy file and, beside it, a .txt file with the N image paths in the same order (--out "
        "a folder: FOLDER/embeddings.npy and FOLDER/embeddings.txt). " + _OVERRIDES,
    )
    _add_checkpoint_argument(p)
    p.add_argument(
        "--images",
        required=True,
        metavar="DIR_OR_LIST",
        help="folder (searched recursively) or text file with one image path a line",
    )
    p.add_argument(
        "--out", required=True, metavar="FILE.npy", help="output .npy file, or a folder for it"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")

    p = sub.add_parser(
        "index",
        allow_abbrev=False,
        help="build or update a gallery index (faiss) with a model",
        description="A gallery index: one folder with the faiss index, the items (paths, "
        "labels) and the fingerprint of the model and preprocessing that made them.",
    )
    isub = p.add_subparsers(dest="index_command", metavar="ACTION")
    b = isub.add_parser(
        "build",
        allow_abbrev=False,
        help="embed a gallery and index it",
        description="Embed every image of GALLERY (a folder, list file or CSV; labels from "
        "class folders, the list's second column or the CSV's label column) and write an "
        "index folder atomically. Exact search by default; --kind ivf|hnsw (above "
        "--approximate-above items when given) builds an approximate index and prints its "
        "recall against exact search. " + _OVERRIDES,
    )
    _add_checkpoint_argument(b)
    b.add_argument("--images", required=True, metavar="GALLERY", help="folder, list or CSV")
    b.add_argument("--out", required=True, metavar="INDEX", help="index folder to write")
    b.add_argument("--kind", default="flat", choices=("flat", "ivf", "hnsw"))
    b.add_argument(
        "--approximate-above",
        type=int,
        default=None,
        metavar="N",
        help="use --kind only for galleries of more than N items (exact below)",
    )
    b.add_argument("--nlist", type=int, help="ivf: number of lists (default 4 sqrt(N))")
    b.add_argument("--nprobe", type=int, help="ivf: lists searched (default nlist / 8, >= 8)")
    b.add_argument("--m", type=int, help="hnsw: links per node (default 32)")
    b.add_argument("--ef-search", type=int, help="hnsw: search depth (default 128)")
    b.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    target = b.add_mutually_exclusive_group()
    target.add_argument(
        "--threshold-far",
        type=float,
        metavar="F",
        help="calibrate the score threshold of search --threshold auto at this false accept "
        "rate over every pair of the run's validation classes (or --calibration-images)",
    )
    target.add_argument(
        "--threshold-precision",
        type=float,
        metavar="P",
        help="calibrate it at this pair precision instead",
    )
    b.add_argument(
        "--calibration-images",
        metavar="FOLDER",
        help="class folders to calibrate on (needed when the run has no validation classes; "
        "never the test classes)",
    )
    for action, text in (("add", "add images"), ("remove", "remove items by id (path)")):
        a = isub.add_parser(action, allow_abbrev=False, help=text, description=text + ".")
        a.add_argument("--index", required=True, metavar="INDEX", help="index folder")
        if action == "add":
            a.add_argument("--images", required=True, metavar="IMAGES", help="folder/list/CSV")
            a.add_argument("--batch-size", type=int, default=None)
        else:
            a.add_argument("--ids", nargs="+", required=True, metavar="ID", help="item paths")

    p = sub.add_parser(
        "search",
        allow_abbrev=False,
        help="the k nearest gallery items of query images",
        description="Embed the query images with the checkpoint recorded in the index (checked "
        "against its fingerprint) and print, or write as CSV / JSON, the k nearest gallery "
        "items of each with scores and labels.",
    )
    p.add_argument("--index", required=True, metavar="INDEX", help="index folder")
    p.add_argument("--images", required=True, metavar="QUERIES", help="image, folder or list")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--out", metavar="FILE.csv|FILE.json", help="write the results here")
    p.add_argument(
        "--checkpoint", default=None, help="embed with this checkpoint (must match the index)"
    )
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(
        "--threshold",
        metavar="auto|VALUE",
        help="list only items scoring >= this (auto: the index's calibrated threshold); a "
        "query without one is written as 'no match' (match false)",
    )
    p.add_argument(
        "--rerank",
        default="none",
        metavar="NAME",
        help="re-rank the lists: none (default), k_reciprocal or alpha_qe (exact search of "
        "the index's vectors; docs: re-ranking)",
    )
    p.add_argument(
        "--rerank-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of --rerank, repeated: k1, k2, lambda_value, candidates "
        "(k_reciprocal); alpha, n, dba (alpha_qe); e.g. --rerank-option k1=30",
    )

    p = sub.add_parser(
        "export",
        allow_abbrev=False,
        help="export the network to ONNX or TorchScript",
        description="Export the network (preprocessed float32 batch N x C x H x W -> N x d "
        "embeddings, dynamic batch) with its preprocessing in the file's metadata; checked "
        "against PyTorch on real images before it is written. " + _OVERRIDES,
    )
    _add_checkpoint_argument(p)
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    p.add_argument("--out", required=True, metavar="FILE", help="output file")
    p.add_argument(
        "--images", default=None, help="images for the check (default: the run's test split)"
    )

    p = sub.add_parser(
        "tune",
        allow_abbrev=False,
        help="search hyper-parameters with Optuna on class-disjoint validation data",
        description="Hyper-parameter search (Optuna: TPE, median pruning). Every trial is a "
        "deepmetric run of the preset with a point of the search space, scored on "
        "class-disjoint validation data only (eval.protocol=val; --folds K: K class-disjoint "
        "folds of the training classes, as in 'A Metric Learning Reality Check'). The study "
        "is stored in OUT/study.journal (several workers on one machine may share it) or in "
        "--storage; run the same command again to continue a stopped tune. Writes "
        "OUT/best.yaml (a ready preset), OUT/trials.csv and .md, OUT/importance.png. "
        "Search space format: docs/tune.md. " + _OVERRIDES,
    )
    p.add_argument("--config", required=True, metavar="PRESET", help="YAML preset to tune")
    p.add_argument("--space", required=True, metavar="SPACE.yaml", help="search space file")
    p.add_argument(
        "--trials", required=True, type=int, help="finished (complete or pruned) trials wanted"
    )
    p.add_argument("--out", metavar="DIR", help="tune folder (default runs/tune-PRESET)")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="database URL Optuna supports (e.g. postgresql+psycopg2://user:pw@host/db) to "
        "share the study between machines; default OUT/study.journal",
    )
    p.add_argument("--study", metavar="NAME", help="study name (default: the preset's stem)")
    p.add_argument(
        "--metric",
        default="map@r",
        help="validation metric maximised (default map@r; recall@1, r_precision)",
    )
    p.add_argument(
        "--folds", type=int, default=0, help="class-disjoint folds per trial (default 0: one split)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler (default 0)")
    p.add_argument("--no-prune", action="store_true", help="run every trial to its end")

    p = sub.add_parser(
        "compare",
        allow_abbrev=False,
        help="train configs with the same budget and seeds; table of mean and 95%% interval",
        description="Train each config with seeds 0..N-1 and the same iteration budget, score "
        "each run once (the best-on-validation checkpoint on the test split, or the last "
        "checkpoint on the config's evaluation split), and write OUT/compare.md, compare.csv, "
        "runs.csv and compare.png. Run it again to continue stopped runs. " + _OVERRIDES,
    )
    p.add_argument("--configs", required=True, nargs="+", metavar="CONFIG", help="YAML configs")
    p.add_argument("--seeds", type=int, default=3, help="seeds per config (default 3)")
    p.add_argument("--out", default="runs/compare", metavar="DIR", help="default runs/compare")

    p = sub.add_parser(
        "report",
        allow_abbrev=False,
        help="write a self-contained HTML report of a run or an index",
        description="One HTML file that opens offline. Of a run (--checkpoint): its metrics next "
        "to the untrained network's, the settings changed from its preset, training curves, "
        "per-class results, the worst and random queries with their top-k retrievals, a 2-D "
        "map of the embeddings (the split is embedded again with the checkpoint). Of an index "
        "(--index with --images): the query grids. " + _OVERRIDES,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="RUN_OR_CKPT", help="run or checkpoint folder")
    source.add_argument("--index", metavar="INDEX", help="index folder (needs --images)")
    p.add_argument("--images", metavar="QUERIES", help="with --index: query folder, list or CSV")
    p.add_argument("--split", default="test", choices=("test", "val"), help="default test")
    p.add_argument(
        "--out",
        metavar="FILE.html",
        help="default RUN/report.html (RUN/report-SPLIT.html for a split the run did not "
        "evaluate on), INDEX-report.html beside an index",
    )
    p.add_argument("--k", type=int, default=8, help="retrievals shown per query (default 8)")
    p.add_argument("--queries", type=int, default=10, help="queries per grid (default 10)")
    p.add_argument(
        "--map",
        default="pca",
        choices=("pca", "tsne"),
        help="2-D map: pca (default) or tsne (slower)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random samples")

    p = sub.add_parser(
        "datasets", allow_abbrev=False, help="data set utilities", description="Data set utilities."
    )
    dsub = p.add_subparsers(dest="datasets_command", metavar="ACTION")
    c = dsub.add_parser(
        "check",
        allow_abbrev=False,
        help="audit a data set: layout, images, duplicates, leakage, counts",
        description="Parse the annotation files; check that no image is listed twice or with "
        "two labels, that every image exists and is readable (--validate), that no "
        "byte-identical file is in both train and test (sha256 of every file); compare the "
        "counts with the official ones and summarise each split (images per class, "
        "single-image classes, sizes, modes). Data without a split of its own is split as a "
        "run would split it (--data.test_classes, --data.split_by, --data.split_seed). Exit "
        "status 0 when all is well (warnings allowed), 1 when a problem was found.",
    )
    c.add_argument("--dataset", help="cub, cars196, sop, inshop, list, folder, csv, npz, digits")
    c.add_argument("--root", default=None, help="the data set's root folder (or file)")
    c.add_argument(
        "--config", metavar="FILE", help="take the data section of a YAML config (a preset)"
    )
    c.add_argument(
        "--validate",
        default="header",
        choices=("none", "header", "decode"),
        help="header: headers and end markers, no truncated JPEG/PNG (default); decode: "
        "every pixel; none: the files exist",
    )
    c.add_argument(
        "--split",
        action="append",
        default=None,
        help="split to check (repeatable; default train and test)",
    )
    e = dsub.add_parser(
        "export",
        allow_abbrev=False,
        help="write a data set's images as files, a folder per class",
        description="Write every image of one split as OUT/<class>/<n>.png (array data sets "
        "such as digits or an npz file become image files that index build, search and the "
        "folder loader read).",
    )
    e.add_argument("--dataset", required=True, help="e.g. digits, npz")
    e.add_argument("--root", default=None, help="the data set's root folder (or file)")
    e.add_argument("--split", default="test", help="split to write (default test)")
    e.add_argument("--out", required=True, help="folder to create")
    return parser


def _check_data(args: argparse.Namespace, extra: list[str]) -> int:
    """``deepmetric datasets check``: the data section of --config (or the defaults) with
    --dataset, --root and --data.* overrides."""
    from deepmetric.config import ConfigError, check_options, load_config
    from deepmetric.data import RootRequiredError, check_dataset, find_source

    if args.dataset is None and args.config is None:
        raise ConfigError("datasets check: give --dataset NAME (and --root PATH) or --config FILE")
    not_data = [a for a in extra if a.startswith("--") and not a.startswith("--data.")]
    if not_data:
        raise ConfigError(f"datasets check: only --data.* overrides apply, got {not_data[0]}")
    overrides = list(extra)
    if args.dataset is not None:
        _check_dataset_name(args.dataset)
        overrides += ["--data.name", args.dataset]
    if args.root is not None:
        overrides += ["--data.root", args.root]
    cfg = load_config(args.config, overrides, validate=False)
    check_options(cfg)
    d = cfg.data
    source = find_source(d.name)
    options = dict(d.options)
    if source.image_files and (
        args.config is not None or any(a.startswith("--data.transform") for a in extra)
    ):
        from deepmetric.engine.builders import build_transforms

        # the run's transform: the check tells whether it leaves images of several sizes
        options["transform"] = build_transforms(cfg)[1]
    try:
        report = check_dataset(
            d.name,
            d.root,
            splits=args.split,
            validate=args.validate,
            progress=True,
            test_classes=d.test_classes,
            test_images=d.test_images,
            split_by=d.split_by,
            split_seed=d.split_seed,
            **options,
        )
    except RootRequiredError as e:  # the source reads a folder or file: none given
        flag = "--root" if args.config is None else "--data.root"
        raise ConfigError(
            f"{flag} is not given: {e.name} reads {e.expected}; add {flag} PATH"
        ) from None
    print(report)
    return 0 if report.ok else 1


def _run(argv: Sequence[str]) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(list(argv))
    if args.version:
        import deepmetric

        print(f"deepmetric {deepmetric.__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "datasets" and args.datasets_command is None:
        parser.parse_args(["datasets", "--help"])

    if args.command == "train":
        from deepmetric import distributed
        from deepmetric.config import load_config
        from deepmetric.engine import train
        from deepmetric.engine.preemption import EXIT_STOPPED

        cfg = load_config(args.config, extra)
        for note in cfg.notes:
            print(f"deepmetric: note: {note}", file=sys.stderr)
        summary = train(cfg, config_name=args.config)
        main_process = distributed.is_main_process()
        distributed.destroy_distributed()
        if summary.get("stopped_by"):
            return EXIT_STOPPED
        if main_process and cfg.output.report and summary["final"]:
            from deepmetric.report import report_run

            run_dir, split = summary["run_dir"], cfg.eval.protocol
            print(f"report: {report_run(run_dir, split=split, progress=cfg.train.progress)}")
        return 0

    if args.command == "eval":
        from deepmetric.engine import evaluate_checkpoint

        result = evaluate_checkpoint(args.checkpoint, extra, split=args.split, out=args.out)
        print(
            f"{result['split']} split of {result['data']} ({result['images']:,} images), "
            f"checkpoint {result['checkpoint']} (iteration {result['iteration']}):"
        )
        for key, value in result["metrics"].items():
            shown = (
                f"{value:,}"
                if isinstance(value, int)
                else (f"{value:.1f}" if key.endswith("_s") else f"{value:.4f}")
            )
            print(f"  {key:<30} {shown}")
        print(f"metrics written to {result['json']}")
        return 0

    if args.command == "embed":
        from deepmetric.engine import embed_images

        npy, txt, shape = embed_images(
            args.checkpoint, args.images, args.out, extra, batch_size=args.batch_size
        )
        print(
            f"embedded {shape[0]:,} images -> {npy} ({shape[0]} x {shape[1]} float32), "
            f"paths in {txt}"
        )
        return 0

    if args.command == "datasets" and args.datasets_command == "export":
        from deepmetric.data import build_dataset, write_folder

        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        dataset = build_dataset(args.dataset, args.root, args.split)
        count = write_folder(dataset, args.out)
        print(f"wrote {count:,} images of {dataset.num_classes:,} classes to {args.out}")
        return 0

    if args.command == "datasets":
        return _check_data(args, extra)

    if args.command == "index":
        return _index(parser, args, extra)

    if args.command == "search":
        return _search(args, extra)

    if args.command in ("tune", "compare"):
        return _tune_or_compare(args, extra)

    if args.command == "report":
        return _report(args, extra)

    if args.command == "export":
        from deepmetric.retrieval import export_model

        info = export_model(
            args.checkpoint, args.format, args.out, overrides=extra, images=args.images
        )
        meta = info["metadata"]
        print(
            f"exported {info['format']} -> {info['path']}: input {meta['input']['shape']} "
            f"float32 NCHW -> {meta['embedding_dim']}-d embeddings"
            + (" (L2-normalised)" if meta["l2_normalized"] else "")
        )
        print(f"preprocessing: {meta['preprocessing_text']}")
        print(
            f"checked: max |difference| from PyTorch {info['max_abs_diff']:.1e} on real images "
            f"at batch sizes {info['batch_sizes']}"
        )
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


def _index(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> int:
    """``deepmetric index build|add|remove``."""
    from deepmetric.retrieval import Retriever

    if args.index_command is None:
        parser.parse_args(["index", "--help"])
    if extra and args.index_command != "build":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.index_command == "build":
        options = {"nlist": args.nlist, "nprobe": args.nprobe, "m": args.m}
        options["ef_search"] = args.ef_search
        retriever = Retriever.build(
            args.checkpoint,
            args.images,
            kind=args.kind,
            approximate_above=args.approximate_above,
            options=options,
            overrides=extra,
            batch_size=args.batch_size,
            calibrate=_calibration(args),
        )
        path = retriever.save(args.out)
        m = retriever.manifest
        labelled = sum(label is not None for label in retriever.items.labels)
        print(
            f"indexed {m['count']:,} images ({labelled:,} labelled) -> {path}: "
            f"{m['index']['kind']}{' ' + str(m['index']['params']) if m['index']['params'] else ''}"
            f", {m['fingerprint']['embedding_dim']}-d, model {m['fingerprint']['checkpoint']}"
        )
        if "recall_vs_exact" in m:
            r = m["recall_vs_exact"]
            print(
                f"recall against exact search on {r['queries']:,} gallery items: "
                + ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("recall"))
            )
        if "threshold" in m:
            t = m["threshold"]
            rates = ", ".join(f"{k} {v:.4g}" for k, v in t["achieved"].items())
            print(
                f"threshold {t['value']:.4f} ({rates}; {t['pairs']['positive']:,} positive and "
                f"{t['pairs']['negative']:,} negative pairs) calibrated on {t['calibrated_on']}"
            )
        return 0
    retriever = Retriever.load(args.index)
    if args.index_command == "add":
        count = retriever.add(args.images, batch_size=args.batch_size)
        verb = "added"
    else:
        count = retriever.remove(args.ids)
        verb = "removed"
    retriever.save()
    print(f"{verb} {count:,} items; {args.index} holds {len(retriever.items):,}")
    return 0


def _calibration(args: argparse.Namespace) -> dict | None:
    """The ``calibrate`` arguments of ``index build``: a --threshold-far or
    --threshold-precision target, on --calibration-images or the run's validation classes."""
    from deepmetric.config import ConfigError

    if args.threshold_far is None and args.threshold_precision is None:
        if args.calibration_images is not None:
            raise ConfigError("--calibration-images: give the target, --threshold-far F")
        return None
    return {
        "source": args.calibration_images,
        "far": args.threshold_far,
        "precision": args.threshold_precision,
    }


def _tune_or_compare(args: argparse.Namespace, extra: list[str]) -> int:
    """``deepmetric tune`` / ``compare``; exit 75 when a signal stopped a run (kept)."""
    from deepmetric.engine.preemption import EXIT_STOPPED
    from deepmetric.tune import TuneStopped, compare, tune

    try:
        if args.command == "compare":
            compare(args.configs, seeds=args.seeds, out=args.out, overrides=extra)
            return 0
        tune(
            args.config,
            args.space,
            trials=args.trials,
            out=args.out,
            storage=args.storage,
            study_name=args.study,
            metric=args.metric,
            folds=args.folds,
            seed=args.seed,
            prune=not args.no_prune,
            overrides=extra,
        )
        return 0
    except TuneStopped as e:
        print(
            f"deepmetric: stopped by {e}; run the same command again to continue (finished "
            "runs are kept, the stopped one resumes from its checkpoint)",
            file=sys.stderr,
        )
        return EXIT_STOPPED


def _search(args: argparse.Namespace, extra: list[str]) -> int:
    """``deepmetric search``: print or write the k nearest gallery items of each query."""
    import csv
    import json
    from pathlib import Path

    from deepmetric.config import ConfigError, parse_overrides
    from deepmetric.evaluation.rerank import RerankError, check_rerank
    from deepmetric.retrieval import Retriever
    from deepmetric.retrieval.thresholds import parse_threshold, resolve_threshold

    if args.out and Path(args.out).suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"--out {args.out}: expected a .csv or .json file name")
    rerank_options: dict = {}
    for text in args.rerank_option:
        if "=" not in text:
            raise ConfigError(f"--rerank-option {text}: expected KEY=VALUE, e.g. k1=30")
        rerank_options.update(parse_overrides([f"--{text}"]))
    try:  # before anything is embedded
        check_rerank(args.rerank, rerank_options)
    except RerankError as e:
        flag = "--rerank:" if str(e).startswith("unknown re-ranking") else "--rerank-option"
        raise ConfigError(f"{flag} {e}") from None
    threshold = None if args.threshold is None else parse_threshold(args.threshold)
    retriever = Retriever.load(args.index)
    threshold = resolve_threshold(retriever.manifest, threshold, args.index)  # before embedding
    retriever.use_checkpoint(args.checkpoint, extra)
    try:
        result = retriever.search(
            args.images,
            args.k,
            threshold=threshold,
            rerank=args.rerank,
            rerank_options=rerank_options,
            batch_size=args.batch_size,
        )
    except RerankError as e:  # k1, n or candidates beyond the gallery
        raise ConfigError(f"--rerank {args.rerank}: {e}") from None
    rows = result.rows()
    if args.out is None:
        for i, (query, paths, scores, labels) in enumerate(
            zip(result.queries, result.paths, result.scores, result.labels)
        ):
            print(query)
            if result.match is not None and not result.match[i]:
                print(f"  no match (no item scores >= the threshold {threshold:.4f})")
            for rank, (p, s, label) in enumerate(zip(paths, scores, labels), 1):
                print(f"  {rank:>3}. {s:.4f}  {p}" + (f"  [{label}]" if label is not None else ""))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix.lower() == ".json":
        grouped = [
            {
                "query": q,
                "results": [{"path": p, "score": s, "label": lab} for p, s, lab in zip(*r)],
            }
            for q, *r in zip(result.queries, result.paths, result.scores, result.labels)
        ]
        if result.match is not None:  # "match": false and no results for a query without one
            grouped = [
                {"query": g["query"], "match": m, "results": g["results"]}
                for g, m in zip(grouped, result.match)
            ]
        tmp.write_text(json.dumps(grouped, indent=1) + "\n")
    else:
        fields = ["query", "rank", "path", "score", "label"]
        fields += ["match"] if result.match is not None else []
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    tmp.replace(out)
    print(f"{len(result.queries):,} queries x k={args.k} -> {out}")
    return 0


def _check_dataset_name(name: str) -> None:
    """ConfigError naming ``--dataset`` for an unknown data set name, with a near match."""
    from deepmetric.config import ConfigError
    from deepmetric.data import find_source

    try:
        find_source(name)
    except ValueError as e:
        raise ConfigError(f"--dataset {name}: {e}") from None


def _report(args: argparse.Namespace, extra: list[str]) -> int:
    """``deepmetric report``: the HTML report of a run or of query images in an index."""
    from deepmetric.config import ConfigError
    from deepmetric.report import ReportOptions, report_index, report_run

    if args.k < 1 or args.queries < 1:
        raise ConfigError(f"--k and --queries: expected >= 1, got {args.k} and {args.queries}")
    options = ReportOptions(k=args.k, queries=args.queries, map=args.map, seed=args.seed)
    if args.index is not None:
        if args.images is None:
            raise ConfigError("report --index: give the query images with --images QUERIES")
        path = report_index(args.index, args.images, out=args.out, overrides=extra, options=options)
    else:
        if args.images is not None:
            raise ConfigError("report --images: query images go with --index, not --checkpoint")
        path = report_run(
            args.checkpoint, split=args.split, out=args.out, overrides=extra, options=options
        )
    print(f"report written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from deepmetric.config import ConfigError
    from deepmetric.data import DatasetError
    from deepmetric.engine.checkpoint import CheckpointError
    from deepmetric.engine.divergence import TrainingDiverged
    from deepmetric.evaluation.rerank import RerankError
    from deepmetric.retrieval.export import ExportError
    from deepmetric.retrieval.index import IndexFileError

    return (
        ConfigError,
        CheckpointError,
        TrainingDiverged,
        DatasetError,
        IndexFileError,
        ExportError,
        RerankError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit status (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("deepmetric: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    except Exception as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {e.filename}" if e.filename else ""
            print(
                f"deepmetric: error: disk full{where} ({e.strerror}); free space", file=sys.stderr
            )
            return 2
        if isinstance(e, OSError) and e.errno == errno.EROFS:  # a mount made read-only
            where = f" {e.filename}" if e.filename else ""
            print(
                f"deepmetric: error: cannot write{where} (read-only file system): choose a "
                "writable folder (--output.dir, --out)",
                file=sys.stderr,
            )
            return 2
        if isinstance(e, _user_errors()):
            msg = str(e).strip()
            if "Original Traceback" in msg:  # raised in a DataLoader worker: its last line
                msg = msg.splitlines()[-1].split(": ", 1)[-1]
            msg = msg.replace("\n", " ")
            if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
                msg = f"{msg}: {e.filename}"
            print(f"deepmetric: error: {msg}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            f"deepmetric: internal error ({type(e).__name__}); this is a bug, please report "
            "it with the traceback above",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
