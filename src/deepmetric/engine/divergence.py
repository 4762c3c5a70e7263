"""Divergence guard: a NaN or inf loss, gradient, weight or BatchNorm statistic never reaches a
checkpoint.

Each step, :func:`~deepmetric.engine.trainer.train_step` calls :func:`check_step`, which reads
the loss and the gradient norm back in one host sync and raises :class:`NonFiniteStep` instead
of applying an update with NaN or inf in it; the model's embeddings are checked by the loss
itself. Before every checkpoint, :meth:`DivergenceGuard.check_state` scans the weights,
buffers, loss state and optimizer moments. ``train.on_nonfinite``:

- ``stop`` (default): the first non-finite step ends the run with :class:`TrainingDiverged`,
  one line naming the iteration, what was not finite and the last good checkpoint;
- ``skip``: the step is dropped (no update; the model's buffers, e.g. BatchNorm running
  statistics, are put back as they were before it) and training goes on; after
  ``train.max_nonfinite_in_row`` such steps in a row it stops as above.

Every rank takes the same decision: the loss and the gradients are the same on all ranks
(global loss, averaged gradients), and the state check is combined over ranks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from deepmetric import distributed as dist

__all__ = ["DivergenceGuard", "NonFiniteStep", "TrainingDiverged", "check_step"]


class NonFiniteStep(Exception):
    """A step that was not applied: its loss or a gradient is NaN or inf, or the model's
    embeddings cannot be used (NaN, inf, zero rows). The message says which."""


class TrainingDiverged(Exception):
    """Training produced NaN or inf; the message names the iteration, what was not finite,
    the last good checkpoint and what to change."""


def check_step(loss: Tensor, params: list[Tensor], gradients: bool = True) -> None:
    """After the backward pass: raise :class:`NonFiniteStep` when the loss or (``gradients``)
    the norm of the gradients of ``params`` is NaN or inf. One pass over the gradients, one
    host sync."""
    norm = loss.new_zeros(())
    if gradients:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads).to(loss.device)
    loss_value, norm_value = torch.stack([loss.detach().float(), norm.float()]).tolist()
    if not math.isfinite(loss_value):
        raise NonFiniteStep(f"the loss is {loss_value}")
    if not math.isfinite(norm_value):
        raise NonFiniteStep(f"the gradient norm is {norm_value} (loss {loss_value:.4g})")


class DivergenceGuard:
    """What the trainer does with a non-finite step or state (see the module docstring).

    Args:
        on_nonfinite: "stop" or "skip" (``train.on_nonfinite``).
        max_in_row: steps skipped in a row before stopping (``train.max_nonfinite_in_row``).
        lr: the configured learning rate, quoted in the advice.
        last_good: the last checkpoint known to be good (resumed from or written), if any.
    """

    def __init__(
        self, on_nonfinite: str, max_in_row: int, lr: float, last_good: Path | None = None
    ) -> None:
        self.skip = on_nonfinite == "skip"
        self.max_in_row, self.lr = max_in_row, lr
        self.last_good = last_good
        self.in_row = 0
        self._buffers: list[Tensor] = []

    def before_step(self, model: nn.Module) -> None:
        """With ``skip``: keep a copy of the model's buffers, to undo a dropped step's."""
        if self.skip:
            self._buffers = [b.detach().clone() for b in model.buffers()]

    def step_applied(self) -> None:
        self.in_row = 0

    def step_dropped(self, iteration: int, problem: NonFiniteStep, model: nn.Module) -> None:
        """Step ``iteration`` was not applied. ``stop``: raise :class:`TrainingDiverged`;
        ``skip``: restore the buffers, raise after ``max_in_row`` dropped steps in a row."""
        if not self.skip:
            raise self.diverged(iteration, str(problem))
        with torch.no_grad():
            for buffer, before in zip(model.buffers(), self._buffers):
                buffer.copy_(before)
        self.in_row += 1
        if self.in_row >= self.max_in_row:
            raise self.diverged(
                iteration,
                f"{problem}, {self.in_row} steps in a row "
                f"(--train.max_nonfinite_in_row={self.max_in_row})",
            )

    def check_state(self, nonfinite_tensor: str | None, iteration: int) -> None:
        """Before a checkpoint: raise :class:`TrainingDiverged` if this or any other rank
        found a non-finite tensor (``TrainState.nonfinite_tensor()``)."""
        if dist.max_over_ranks(nonfinite_tensor is not None):
            what = nonfinite_tensor or "a tensor on another rank"
            raise self.diverged(iteration, f"{what} holds NaN or inf (not saved)")

    def diverged(self, iteration: int, what: str) -> TrainingDiverged:
        """The one-line error: iteration, what, the last good checkpoint, what to change."""
        fix = f"a lower --optim.lr (now {self.lr:g}) or --optim.grad_clip=1"
        if self.last_good is None:
            where = f"no checkpoint was written before it; start again with {fix}"
        else:
            where = (
                f"last good checkpoint: {self.last_good}; continue from it with "
                f"--train.resume={self.last_good} and {fix}"
            )
        skip = "" if self.skip else ", or let training skip such steps: --train.on_nonfinite=skip"
        return TrainingDiverged(
            f"training diverged at iteration {iteration}: {what}; {where}{skip}"
        )
