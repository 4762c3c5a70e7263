"""Retrieval evaluation of a model on a run's evaluation sets, sharded across ranks.

Under torchrun every rank first takes rank 0's buffers (BatchNorm statistics: the copy a
checkpoint saves), then embeds a contiguous 1/W of every evaluation set; the embeddings are
gathered back in data-set order, rank 0 computes the metrics and broadcasts them, so every rank
returns the same numbers (and agrees on the best checkpoint). In one process it is a plain
embed-then-evaluate.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from deepmetric import distributed as dist
from deepmetric.config import Config, ConfigError, recall_at
from deepmetric.engine.builders import EvalSet, build_eval_loader
from deepmetric.evaluation import evaluate, extract_embeddings
from deepmetric.evaluation.open_set import (
    calibrate_threshold,
    held_out_classes,
    open_set_metrics,
)
from deepmetric.evaluation.registry import METRICS, check_metric_names
from deepmetric.evaluation.verification import PairScoreCounts, pair_score_counts

__all__ = ["Evaluator", "needs_calibration", "open_set_result", "retrieval_metrics"]

Embedded = tuple[Tensor, Tensor]  # embeddings (N, d), labels (N,)


def retrieval_metrics(
    emb: Tensor, labels: Tensor, eval_set: EvalSet, cfg: Config, calibration: Embedded | None = None
) -> dict:
    """``deepmetric.evaluation.evaluate`` of embeddings (N, d) in data-set order: queries
    against the gallery (In-Shop style masks), else every item against the rest. Returns the
    scalar metrics only (floats; counts as ints); with ``eval.open_set_fraction`` also the
    ``open_set/`` keys of :func:`open_set_result`."""
    kwargs = {
        "recall_at": recall_at(cfg),
        "metrics": tuple(cfg.eval.metrics),
        "rerank": cfg.eval.rerank,  # the retrieval metrics of the re-ranked lists
        "rerank_options": cfg.eval.rerank_options,
    }
    if eval_set.query is not None:
        q, g = eval_set.query, eval_set.gallery
        metrics = evaluate(emb[q], labels[q], emb[g], labels[g], **kwargs)
    else:
        metrics = evaluate(emb, labels, **kwargs)
    if cfg.eval.open_set_fraction > 0:
        metrics.update(open_set_result(emb, labels, eval_set, cfg, calibration))
    return {
        k: (v if isinstance(v, int) else float(v))
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.floating))
    }


def needs_calibration(cfg: Config) -> bool:
    """Open-set evaluation with ``eval.open_set_threshold: auto``: the threshold is calibrated
    on the validation classes."""
    return cfg.eval.open_set_fraction > 0 and cfg.eval.open_set_threshold == "auto"


def open_set_result(
    emb: Tensor, labels: Tensor, eval_set: EvalSet, cfg: Config, calibration: Embedded | None
) -> dict:
    """:func:`~deepmetric.evaluation.open_set.open_set_metrics` of an evaluation set whose
    ``eval.open_set_fraction`` of the gallery's classes (drawn with ``data.split_seed``) leave
    the gallery, at ``eval.open_set_threshold``: a score, or "auto" = calibrated at FAR
    ``eval.open_set_far`` on ``calibration``, the validation classes (never the test set)."""
    threshold = cfg.eval.open_set_threshold
    if threshold == "auto":
        if calibration is None:
            raise ConfigError(_NO_VALIDATION)
        try:  # a FAR that the validation pairs cannot resolve
            threshold = calibrate_threshold(*calibration, far=cfg.eval.open_set_far)["value"]
        except ValueError as e:
            raise ConfigError(f"eval.open_set_far={cfg.eval.open_set_far}: {e}") from None
    in_gallery = labels if eval_set.gallery is None else labels[eval_set.gallery]
    held_out = held_out_classes(
        in_gallery.unique().tolist(), cfg.eval.open_set_fraction, cfg.data.split_seed
    )
    return open_set_metrics(
        emb,
        labels,
        threshold,
        held_out=held_out,
        recall_at=recall_at(cfg),
        query=eval_set.query,
        gallery=eval_set.gallery,
    )


_NO_VALIDATION = (
    "eval.open_set_threshold=auto calibrates the threshold on the validation classes, but "
    "this evaluation has none (eval.protocol=test; the test classes are never used to "
    "calibrate): set --eval.protocol=val, or give a score, e.g. --eval.open_set_threshold=0.5"
)


class Evaluator:
    """Embeds and scores the evaluation sets ``{name: EvalSet}`` of a run.

    Each rank's loader covers its shard (``distributed.shard_indices``); loaders are built
    once (their workers persist across evaluations unless ``persistent_workers=False``).
    ``calibration``: the validation classes that an ``eval.open_set_threshold: auto`` is
    calibrated on when evaluating another set (the test split of an ``eval.protocol: val``
    run); without it the "val" set calibrates its own.
    """

    def __init__(
        self,
        cfg: Config,
        eval_sets: dict[str, EvalSet],
        device: torch.device,
        amp_dtype: torch.dtype | None,
        persistent_workers: bool = True,
        calibration: EvalSet | None = None,
    ) -> None:
        self.cfg, self.eval_sets = cfg, eval_sets
        self.device, self.amp_dtype = device, amp_dtype
        embedded = dict(eval_sets)
        if needs_calibration(cfg):  # the validation classes: given, else the val set itself
            if not 0 < cfg.eval.open_set_far < 1:
                far = cfg.eval.open_set_far
                raise ConfigError(f"eval.open_set_far: expected in (0, 1), got {far}")
            if calibration is None and "val" not in eval_sets:
                raise ConfigError(_NO_VALIDATION)
            if calibration is not None:
                embedded["calibration"] = calibration
        for name, es in embedded.items():
            if len(es.dataset) < dist.get_world_size():
                raise ConfigError(
                    f"the {name} set holds {len(es.dataset)} images, fewer than the "
                    f"{dist.get_world_size()} ranks that share its evaluation"
                )
        self.shards = {name: dist.shard_indices(len(es.dataset)) for name, es in embedded.items()}
        self.loaders = {
            name: build_eval_loader(cfg, Subset(es.dataset, self.shards[name]), persistent_workers)
            for name, es in embedded.items()
        }

    def evaluate(self, model: nn.Module, progress: bool = False) -> dict[str, dict]:
        """``{set name: metrics}``, identical on every rank; each metrics dict also holds
        ``eval_time_s`` (rank 0's). The model's train/eval mode is restored."""
        dist.broadcast_buffers(model)  # rank 0's BatchNorm statistics on every rank
        results = {}
        calibration = None  # the validation classes of an auto open-set threshold
        if "calibration" in self.loaders:
            calibration = self._embed(model, "calibration", progress)
        for name, eval_set in self.eval_sets.items():
            start = time.perf_counter()
            emb, labels = self._embed(model, name, progress)
            metrics = None
            if dist.is_main_process():
                own = (emb, labels) if name == "val" else None  # val calibrates on itself
                metrics = retrieval_metrics(
                    emb, labels, eval_set, self.cfg, calibration if calibration is not None else own
                )
                metrics["eval_time_s"] = round(time.perf_counter() - start, 3)
            results[name] = dist.broadcast_object(metrics)
        return results

    def _embed(self, model: nn.Module, name: str, progress: bool) -> Embedded:
        """Embeddings (N, d) and labels (N,) of a set in data-set order, on every rank."""
        emb, labels = extract_embeddings(
            model,
            self.loaders[name],
            device=self.device,
            amp_dtype=self.amp_dtype,
            flip=self.cfg.eval.flip,
            progress=progress,
        )
        return dist.gather_eval(emb, labels, self.shards[name])

    def _pair_counts(
        self, emb: Tensor, labels: Tensor, eval_set: EvalSet
    ) -> PairScoreCounts | None:
        """Under torchrun with verification metrics: every rank counts its share of the pairs
        (all hold the gathered embeddings) and the counts are summed; else None (evaluate
        counts them)."""
        names = check_metric_names(self.cfg.eval.metrics)
        if dist.get_world_size() == 1 or not any(METRICS[n].needs == "pairs" for n in names):
            return None
        share = {
            "shard": (dist.get_rank(), dist.get_world_size()),
            "all_reduce": dist.sum_over_ranks,
        }
        if eval_set.query is None:
            return pair_score_counts(emb, labels, **share)
        q, g = eval_set.query, eval_set.gallery
        return pair_score_counts(emb[q], labels[q], emb[g], labels[g], **share)
