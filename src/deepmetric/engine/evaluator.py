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

__all__ = ["Evaluator", "retrieval_metrics"]


def retrieval_metrics(emb: Tensor, labels: Tensor, eval_set: EvalSet, cfg: Config) -> dict:
    """``deepmetric.evaluation.evaluate`` of embeddings (N, d) in data-set order: queries
    against the gallery (In-Shop style masks), else every item against the rest. Returns the
    scalar metrics only (floats; counts as ints)."""
    kwargs = {"recall_at": recall_at(cfg), "metrics": tuple(cfg.eval.metrics)}
    if eval_set.query is not None:
        q, g = eval_set.query, eval_set.gallery
        metrics = evaluate(emb[q], labels[q], emb[g], labels[g], **kwargs)
    else:
        metrics = evaluate(emb, labels, **kwargs)
    return {
        k: (v if isinstance(v, int) else float(v))
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.floating))
    }


class Evaluator:
    """Embeds and scores the evaluation sets ``{name: EvalSet}`` of a run.

    Each rank's loader covers its shard (``distributed.shard_indices``); loaders are built
    once (their workers persist across evaluations unless ``persistent_workers=False``).
    """

    def __init__(
        self,
        cfg: Config,
        eval_sets: dict[str, EvalSet],
        device: torch.device,
        amp_dtype: torch.dtype | None,
        persistent_workers: bool = True,
    ) -> None:
        self.cfg, self.eval_sets = cfg, eval_sets
        self.device, self.amp_dtype = device, amp_dtype
        for name, es in eval_sets.items():
            if len(es.dataset) < dist.get_world_size():
                raise ConfigError(
                    f"the {name} set holds {len(es.dataset)} images, fewer than the "
                    f"{dist.get_world_size()} ranks that share its evaluation"
                )
        self.shards = {name: dist.shard_indices(len(es.dataset)) for name, es in eval_sets.items()}
        self.loaders = {
            name: build_eval_loader(cfg, Subset(es.dataset, self.shards[name]), persistent_workers)
            for name, es in eval_sets.items()
        }

    def evaluate(self, model: nn.Module, progress: bool = False) -> dict[str, dict]:
        """``{set name: metrics}``, identical on every rank; each metrics dict also holds
        ``eval_time_s`` (rank 0's). The model's train/eval mode is restored."""
        dist.broadcast_buffers(model)  # rank 0's BatchNorm statistics on every rank
        results = {}
        for name, eval_set in self.eval_sets.items():
            start = time.perf_counter()
            emb, labels = extract_embeddings(
                model,
                self.loaders[name],
                device=self.device,
                amp_dtype=self.amp_dtype,
                flip=self.cfg.eval.flip,
                progress=progress,
            )
            emb, labels = dist.gather_eval(emb, labels, self.shards[name])
            metrics = None
            if dist.is_main_process():
                metrics = retrieval_metrics(emb, labels, eval_set, self.cfg)
                metrics["eval_time_s"] = round(time.perf_counter() - start, 3)
            results[name] = dist.broadcast_object(metrics)
        return results
