"""The calibrated score threshold of an index: "a match, or nothing we know?".

``Retriever.calibrate`` chooses it on labelled calibration data that is never the test
classes: the validation classes of the index's run (``eval.protocol: val``; rebuilt from the
run's saved config exactly as its training carved them) or a folder of class folders given by
the user. It is stored in the manifest under ``"threshold"``::

    {"value": 0.7132,                               # a query matches when best score >= value
     "target": {"far": 0.001},                      # or {"precision": 0.99}
     "achieved": {"far": 0.00098, "tar": 0.83},     # or {"precision", "recall"}: exact, at value
     "pairs": {"positive": 32130, "negative": 32536},
     "calibrated_on": "validation classes of runs/x (361 images, 2 classes)",
     "model": "<sha256 of the weights that embedded them>"}

``search(threshold="auto")`` reads it; an index without one is a one-line error saying how to
calibrate.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from deepmetric.config import Config, ConfigError
from deepmetric.engine.builders import build_eval_loader
from deepmetric.engine.checkpoint import run_dir_of
from deepmetric.engine.devices import amp_dtype
from deepmetric.engine.inference import evaluation_set
from deepmetric.evaluation import extract_embeddings
from deepmetric.evaluation.open_set import calibrate_threshold
from deepmetric.retrieval.index import IndexFileError

__all__ = [
    "calibration_record",
    "label_codes",
    "parse_threshold",
    "resolve_threshold",
    "validation_embeddings",
]

HOW_TO_CALIBRATE = (
    "build it again with deepmetric index build ... --threshold-far F (or "
    "--threshold-precision P), or pass a score: --threshold VALUE"
)


def parse_threshold(text: str) -> float | str:
    """``--threshold``: "auto" or a finite number, else ConfigError naming the flag."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"--threshold: expected a number or 'auto', got {text!r}")
    return value


def resolve_threshold(
    manifest: dict[str, Any], threshold: float | str | None, where: Any
) -> float | None:
    """The score of ``threshold``: None (no threshold), a number, or "auto" (the manifest's
    calibrated value; IndexFileError naming ``where`` and how to calibrate when it has none)."""
    if threshold is None:
        return None
    if threshold == "auto":
        record = manifest.get("threshold")
        if record is None:
            raise IndexFileError(
                f"{where or 'this index'} has no calibrated threshold (built before thresholds "
                f"existed, or without --threshold-far): {HOW_TO_CALIBRATE}"
            )
        return float(record["value"])
    if isinstance(threshold, str) or not math.isfinite(threshold):
        raise ConfigError(f"threshold: expected a number or 'auto', got {threshold!r}")
    return float(threshold)


def validation_embeddings(
    cfg: Config, model: nn.Module, checkpoint: Path, *, batch_size: int | None, progress: bool
) -> tuple[np.ndarray, list[int], str]:
    """(embeddings (N, d), labels (N,), "validation classes of RUN") of the class-disjoint
    validation split of a run trained with ``eval.protocol: val``, rebuilt from its config
    (the test split is not read); ConfigError when the run has none."""
    run = run_dir_of(checkpoint)
    if cfg.eval.protocol != "val":
        raise ConfigError(
            f"{run} was trained with eval.protocol={cfg.eval.protocol}: it has no validation "
            "classes to calibrate a threshold on (and the test classes must not be used); pass "
            "--calibration-images FOLDER (a folder of class folders)"
        )
    eval_set = evaluation_set(cfg, "val", checkpoint)
    if batch_size is not None:
        cfg = copy.deepcopy(cfg)
        cfg.eval.batch_size = batch_size
    device = next(model.parameters()).device
    emb, labels = extract_embeddings(
        model,
        build_eval_loader(cfg, eval_set.dataset, persistent=False),
        device=device,
        amp_dtype=amp_dtype(cfg.train.amp, device),
        flip=cfg.eval.flip,
        progress=progress,
    )
    return emb.numpy(), labels.tolist(), f"validation classes of {run}"


def label_codes(labels: Sequence[Any], source: str) -> np.ndarray:
    """(N,) int64 codes of the calibration labels; ConfigError naming ``source`` when a
    label is missing or there are fewer than 2 classes (checked before embedding)."""
    if any(label is None for label in labels):
        raise ConfigError(f"{source}: calibration needs a label for every image (class folders)")
    classes, codes = np.unique(np.asarray([str(x) for x in labels]), return_inverse=True)
    if len(classes) < 2:
        raise ConfigError(
            f"{source}: calibration needs images of at least 2 classes (class sub-folders), "
            f"got {len(classes)}"
        )
    return codes.astype(np.int64)


def calibration_record(
    embeddings: np.ndarray,
    labels: Sequence[Any],
    *,
    far: float | None,
    precision: float | None,
    source: str,
    model: str | None,
) -> dict[str, Any]:
    """:func:`~deepmetric.evaluation.open_set.calibrate_threshold` of labelled embeddings
    (N, d), with ``calibrated_on`` (``source``, images and classes) and ``model`` (sha256 of
    the weights that embedded them). ConfigError naming the flag for a target the pairs cannot
    resolve."""
    codes = label_codes(labels, source)
    flag = "--threshold-far" if far is not None else "--threshold-precision"
    try:  # the targets' one-line ValueErrors, e.g. too few negative pairs for the FAR
        record = calibrate_threshold(embeddings, codes, far=far, precision=precision)
    except ValueError as e:
        raise ConfigError(f"{flag} {far if far is not None else precision:g}: {e}") from None
    images = f"{len(codes):,} images, {int(codes.max()) + 1:,} classes"
    return {**record, "calibrated_on": f"{source} ({images})", "model": model}
