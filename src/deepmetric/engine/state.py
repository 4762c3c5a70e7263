""":class:`TrainState`: exactly what a checkpoint holds and what resume restores."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from deepmetric.config import ConfigError
from deepmetric.engine.checkpoint import load_checkpoint, save_checkpoint
from deepmetric.engine.reproducibility import capture_rng_state, restore_rng_state
from deepmetric.evaluation import metric_of_key

__all__ = ["CheckpointMismatch", "TrainState"]


class CheckpointMismatch(ConfigError):
    """The checkpoint's tensors do not fit the configured model, loss or optimizer;
    ``config_text`` is the checkpoint's config (to tell the user what changed)."""

    def __init__(self, message: str, config_text: str) -> None:
        super().__init__(message)
        self.config_text = config_text


@dataclass
class TrainState:
    """The state of a training run: the objects that change during training and the counters.

    A checkpoint holds ``model``'s weights (model.safetensors) and, in state.pt, the
    ``state_dict()`` of each object of :attr:`OBJECTS`, the values of :attr:`COUNTERS` and
    the global RNG states:

    - ``optimizer``: moments and each parameter group's learning rates;
    - ``criterion``: the loss's parameters and state through its own ``state_dict()`` (the
      margin loss's beta and sampling generator; the cross-batch memory's buffers);
    - ``scaler``: the fp16 GradScaler;
    - ``iteration``: optimizer steps taken (the learning-rate schedule is a function of it);
    - ``epoch``, ``batch_in_epoch``: the sampler's position;
    - ``best``: ``{"metric", "value", "iteration", "split"}`` of the best evaluation so far;
    - ``start_metrics``: the untrained network's metrics (``eval.at_start``).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    iteration: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: dict[str, Any] = field(default_factory=dict)
    start_metrics: dict[str, float] = field(default_factory=dict)

    OBJECTS: ClassVar[tuple[str, ...]] = ("optimizer", "criterion", "scaler")
    COUNTERS: ClassVar[tuple[str, ...]] = (
        "iteration",
        "epoch",
        "batch_in_epoch",
        "best",
        "start_metrics",
    )

    def save(
        self, run_dir: Path, config_text: str, links: tuple[str, ...], keep_last: int = 2
    ) -> Path:
        """Write checkpoint ``iteration`` atomically, point ``links`` at it and keep the
        ``keep_last`` newest (see :func:`~deepmetric.engine.checkpoint.save_checkpoint`)."""
        state: dict[str, Any] = {name: getattr(self, name).state_dict() for name in self.OBJECTS}
        state.update({name: getattr(self, name) for name in self.COUNTERS})
        state["rng"] = capture_rng_state()
        weights = self.model.state_dict()
        return save_checkpoint(
            run_dir, self.iteration, weights, state, config_text, links, keep_last
        )

    def nonfinite_tensor(self) -> str | None:
        """The name of the first model weight or buffer (BatchNorm statistics included), loss
        tensor (memory, parameters) or optimizer moment holding NaN or inf; None when every
        one is finite. One pass over the state (a host sync per tensor): call it before saving."""
        named = [(f"model {k}", v) for k, v in self.model.state_dict().items()]
        named += [(f"loss {k}", v) for k, v in self.criterion.state_dict().items()]
        for index, moments in self.optimizer.state_dict()["state"].items():
            named += [(f"optimizer {k} of parameter {index}", v) for k, v in moments.items()]
        for name, value in named:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                if not bool(torch.isfinite(value).all()):
                    return name
        return None

    def load(self, path: str | os.PathLike) -> str:
        """Restore everything from the checkpoint folder ``path`` (every file checked against
        its manifest); returns the checkpoint's config text."""
        weights, state, config_text = load_checkpoint(path, ())
        missing = [k for k in (*self.OBJECTS, *self.COUNTERS, "rng") if k not in state]
        if missing:
            raise ConfigError(
                f"{path}: the checkpoint's state.pt lacks {', '.join(missing)} (written by "
                "another version of deepmetric); start a new run or resume with that version"
            )
        try:
            self.model.load_state_dict(weights)
            for name in self.OBJECTS:
                getattr(self, name).load_state_dict(state[name])
        except (RuntimeError, ValueError, KeyError) as e:  # load_state_dict's shape/key errors
            first = str(e).strip().splitlines()[0]
            raise CheckpointMismatch(
                f"{path}: the checkpoint does not fit the configured model, loss or optimizer "
                f"({first})",
                config_text,
            ) from None
        for name in self.COUNTERS:
            setattr(self, name, state[name])
        restore_rng_state(state["rng"])
        return config_text

    def update_best(self, metrics: dict[str, float], metric: str, split: str) -> bool:
        """Record ``metrics[metric]`` (a result key, ``eval.select_metric``) at this iteration
        if it beats the best so far: higher, or lower for a metric whose record says lower is
        better. NaN never does."""
        value = metrics.get(metric)
        if value is None or math.isnan(value):
            return False
        best = self.best.get("value")
        if best is not None:
            record = metric_of_key(metric)
            lower_is_better = record is not None and not record.higher_is_better
            if (value >= best) if lower_is_better else (value <= best):
                return False
        self.best = {"metric": metric, "value": value, "iteration": self.iteration, "split": split}
        return True
