"""Optimizer with real per-group learning rates, and the per-iteration learning-rate schedule.

Three parameter groups, each with its own ``lr`` and ``weight_decay`` (torch.optim reads
them; no ignored ``lr_mult`` keys): ``backbone``, ``head`` (every model parameter outside the
backbone) and ``loss`` (the loss's own parameters, e.g. the margin loss's learnable beta).
Each group also keeps its starting value in ``base_lr``; the schedule sets
``lr = base_lr * lr_factor(iteration)`` before every step, so the schedule's state is the
iteration number alone (nothing else to checkpoint).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepmetric.config import OptimConfig, ScheduleConfig

__all__ = ["build_optimizer", "lr_factor", "set_lr"]


def _trainable(params) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def build_optimizer(
    cfg: OptimConfig, model: nn.Module, criterion: nn.Module | None = None
) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over the groups backbone, head and loss (empty groups omitted).

    ``model`` should have ``backbone_parameters()`` (EmbeddingModel); without it every model
    parameter is in the head group. ``criterion``'s parameters form the loss group.
    """
    has_backbone = hasattr(model, "backbone_parameters")
    backbone = _trainable(model.backbone_parameters()) if has_backbone else []
    seen = {id(p) for p in backbone}
    head = [p for p in _trainable(model.parameters()) if id(p) not in seen]
    loss = _trainable(criterion.parameters()) if criterion is not None else []
    lr, wd = cfg.lr, cfg.weight_decay
    spec = [
        (
            "backbone",
            backbone,
            cfg.backbone_lr if cfg.backbone_lr is not None else lr,
            cfg.backbone_weight_decay if cfg.backbone_weight_decay is not None else wd,
        ),
        ("head", head, lr, wd),
        ("loss", loss, cfg.loss_lr if cfg.loss_lr is not None else lr, cfg.loss_weight_decay),
    ]
    groups = [
        {"name": name, "params": params, "lr": g_lr, "base_lr": g_lr, "weight_decay": g_wd}
        for name, params, g_lr, g_wd in spec
        if params
    ]
    if not groups:
        raise ValueError("nothing to optimise: no parameter requires a gradient")
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_factor(iteration: int, cfg: ScheduleConfig, total_iterations: int) -> float:
    """Multiplier of every group's ``base_lr`` for the step taken at ``iteration`` (0-based).

    Warm-up: linear from ``warmup_start_factor`` (iteration 0) to 1 (iteration
    ``warmup_iterations``), multiplying the schedule. Cosine decays over the iterations after
    the warm-up, reaching ``min_factor`` at the last one.
    """
    w = cfg.warmup_iterations
    if cfg.name == "none":
        factor = 1.0
    elif cfg.name == "step":
        factor = cfg.gamma ** (iteration // cfg.step_size)
    elif cfg.name == "multistep":
        factor = cfg.gamma ** sum(1 for m in cfg.milestones if iteration >= m)
    elif cfg.name == "cosine":
        span = max(1, total_iterations - w - 1)
        t = min(1.0, max(0, iteration - w) / span)
        factor = cfg.min_factor + (1.0 - cfg.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError(f"unknown schedule {cfg.name!r}")
    if w > 0 and iteration < w:
        factor *= cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * iteration / w
    return factor


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """``lr = base_lr * factor`` in every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
