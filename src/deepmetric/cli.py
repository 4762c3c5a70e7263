"""The ``deepmetric`` command (also ``python -m deepmetric``).

    deepmetric train --config configs/demo.yaml [--optim.lr=1e-4 --data.root PATH ...]
    deepmetric eval --checkpoint runs/x [--split test|val] [--out FILE.json] [--data.root PATH]
    deepmetric embed --checkpoint runs/x --images DIR_OR_LIST --out emb.npy
    deepmetric datasets check --dataset sop --root ~/data/Stanford_Online_Products

Exit status:

- 0: success.
- 2: a user or environment mistake, told in one line on stderr (no traceback) that names the
  file, key or flag and what to change: a bad config or override, a missing or damaged file
  (a checkpoint that fails its checksums), a data set problem, P x K asking for more classes
  than there are, images of different sizes without a resize option, a run that diverged
  (NaN or inf), a full disk.
- 75: ``train`` stopped by SIGTERM, SIGINT or SIGUSR1 after finishing its step and writing a
  checkpoint (the line printed says where); continue with ``--train.resume=auto``.
- 1: a failed ``datasets check``, or an unexpected error, with its traceback: that is a bug.
- 130: interrupted (Ctrl-C) outside the training loop.
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
        "datasets", allow_abbrev=False, help="data set utilities", description="Data set utilities."
    )
    dsub = p.add_subparsers(dest="datasets_command", metavar="ACTION")
    c = dsub.add_parser(
        "check",
        allow_abbrev=False,
        help="validate a data set's layout, images and counts",
        description="Parse the annotation files, open every image, compare the counts with "
        "the official ones. Exit status 0 when all is well, 1 when a problem was found.",
    )
    c.add_argument(
        "--dataset", required=True, help="cub, cars196, sop, inshop, list, folder, csv, npz, digits"
    )
    c.add_argument("--root", default=None, help="the data set's root folder (or file)")
    c.add_argument(
        "--split",
        action="append",
        default=None,
        help="split to check (repeatable; default train and test)",
    )
    return parser


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
    if extra and args.command == "datasets":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "train":
        from deepmetric import distributed
        from deepmetric.config import load_config
        from deepmetric.engine import train
        from deepmetric.engine.preemption import EXIT_STOPPED

        cfg = load_config(args.config, extra)
        for note in cfg.notes:
            print(f"deepmetric: note: {note}", file=sys.stderr)
        summary = train(cfg, config_name=args.config)
        distributed.destroy_distributed()
        return EXIT_STOPPED if summary.get("stopped_by") else 0

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

    if args.command == "datasets":
        from deepmetric.data import check_dataset

        _check_dataset_name(args.dataset)
        report = check_dataset(args.dataset, args.root, splits=args.split)
        print(report)
        return 0 if report.ok else 1
    return 2  # pragma: no cover - argparse rejects unknown commands


def _check_dataset_name(name: str) -> None:
    """ConfigError naming ``--dataset`` for an unknown data set name, with a near match."""
    import difflib

    from deepmetric.config import ConfigError
    from deepmetric.data import DATASETS, canonical_name

    try:
        canonical_name(name)
    except ValueError:
        close = difflib.get_close_matches(name.lower(), sorted(DATASETS), n=1)
        hint = f" (did you mean --dataset {close[0]}?)" if close else ""
        raise ConfigError(
            f"--dataset {name}: unknown data set{hint}; expected one of "
            f"{', '.join(sorted(DATASETS))}"
        ) from None


def _user_errors() -> tuple[type[BaseException], ...]:
    from deepmetric.config import ConfigError
    from deepmetric.engine.checkpoint import CheckpointError
    from deepmetric.engine.divergence import TrainingDiverged

    errors: list[type[BaseException]] = [
        ConfigError,
        CheckpointError,
        TrainingDiverged,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    ]
    try:
        from deepmetric.data import DatasetError

        errors.append(DatasetError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


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
        if isinstance(e, _user_errors()):
            msg = str(e).strip().replace("\n", " ")
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
