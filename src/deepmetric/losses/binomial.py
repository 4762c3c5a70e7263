"""Binomial deviance loss (Yi, Lei, Liao, Li, "Deep Metric Learning for Person
Re-identification", ICPR 2014)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .pairs import PairLoss, Pairs


class BinomialDevianceLoss(PairLoss):
    """Binomial deviance on cosine similarity S.

        positive pair: softplus(-scale_pos * (S - threshold))
        negative pair: softplus(scale_pos * neg_cost * (S - threshold))

    Defaults are the paper's: scale_pos (alpha) = 2, threshold (lambda, the paper's beta) =
    0.5, neg_cost (C) = 25, so negatives are scaled by alpha * C = 50.

    ``weighting="batch"`` (paper): mean over positive pairs + mean over negative pairs of the
    batch, an empty set contributing 0; ``num_active`` = number of pairs.
    ``weighting="per_anchor"`` (Deep_Metric, github.com/bnu-wangxun/Deep_metric): per anchor,
    mean over its positives + mean over its negatives, averaged over anchors that have both
    (Deep_Metric divides by B instead); ``num_active`` = those anchors. Deep_Metric's settings
    are scale_pos=2, neg_cost=20, weighting="per_anchor" (its alpha = 40 is
    scale_pos * neg_cost).
    """

    def __init__(
        self,
        scale_pos: float = 2.0,
        threshold: float = 0.5,
        neg_cost: float = 25.0,
        weighting: str = "batch",
    ) -> None:
        super().__init__()
        if weighting not in ("batch", "per_anchor"):
            raise ValueError(f"weighting must be 'batch' or 'per_anchor', got {weighting!r}")
        self.scale_pos = float(scale_pos)
        self.threshold = float(threshold)
        self.neg_cost = float(neg_cost)
        self.weighting = weighting
        self.active_unit = "pairs" if weighting == "batch" else "anchors"

    def compute(self, pairs: Pairs) -> tuple[Tensor, Tensor]:
        shifted = pairs.sim - self.threshold
        pos_loss = torch.where(pairs.pos, F.softplus(-self.scale_pos * shifted), 0.0)
        neg_loss = torch.where(pairs.neg, F.softplus(self.scale_pos * self.neg_cost * shifted), 0.0)
        if self.weighting == "batch":
            num_pos, num_neg = pairs.pos.sum(), pairs.neg.sum()
            loss = pos_loss.sum() / num_pos.clamp(min=1) + neg_loss.sum() / num_neg.clamp(min=1)
            return loss, num_pos + num_neg
        num_pos, num_neg = pairs.pos.sum(1), pairs.neg.sum(1)
        valid = (num_pos > 0) & (num_neg > 0)
        per_anchor = pos_loss.sum(1) / num_pos.clamp(min=1) + neg_loss.sum(1) / num_neg.clamp(min=1)
        count = valid.sum()
        return torch.where(valid, per_anchor, 0.0).sum() / count.clamp(min=1), count
