"""Contrastive loss (Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an
Invariant Mapping", CVPR 2006), in similarity or distance form."""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import with_gradient
from .pairs import PairLoss, Pairs

REDUCTIONS = ("mean", "sum_over_batch")


class ContrastiveLoss(PairLoss):
    """Pairwise margin loss over every positive and negative pair.

    ``form="similarity"`` (the form of Deep_Metric, research-xbm and the Multi-Similarity
    paper, Wang et al. CVPR 2019), S = cosine:
        positive pair: [pos_margin - S]_+  (pos_margin = 1 gives Deep_Metric's 1 - S)
        negative pair: [S - neg_margin]_+  (neg_margin = 0.5)
    ``form="distance"`` (Hadsell's form), D = Euclidean distance of unit vectors:
        positive pair: 1/2 [D - pos_margin]_+^2  (pos_margin = 0 gives 1/2 D^2)
        negative pair: 1/2 [neg_margin - D]_+^2  (neg_margin = 1)

    ``reduction="mean"``: mean over all valid pairs (positive and negative alike);
    ``num_active`` = that number of pairs. ``reduction="sum_over_batch"``: sum over pairs / B,
    as Deep_Metric (github.com/bnu-wangxun/Deep_metric) and research-xbm do (grows with the
    number of references).
    PML's ContrastiveLoss differs on purpose: it uses non-squared distance hinges and averages
    each part over its non-zero terms only.
    """

    def __init__(
        self,
        form: str = "similarity",
        pos_margin: float | None = None,
        neg_margin: float | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if form not in ("similarity", "distance"):
            raise ValueError(f"form must be 'similarity' or 'distance', got {form!r}")
        if reduction == "seed":
            raise ValueError(
                "reduction='seed' is now called 'sum_over_batch' (sum over pairs / B, "
                "Deep_Metric's reduction)"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.form = form
        self.reduction = reduction
        if form == "similarity":
            self.pos_margin = 1.0 if pos_margin is None else float(pos_margin)
            self.neg_margin = 0.5 if neg_margin is None else float(neg_margin)
        else:
            self.pos_margin = 0.0 if pos_margin is None else float(pos_margin)
            self.neg_margin = 1.0 if neg_margin is None else float(neg_margin)

    def compute(self, pairs: Pairs) -> tuple[Tensor, Tensor]:
        num_pairs = pairs.num_pairs()
        n = pairs.sim.shape[0] if self.reduction == "sum_over_batch" else num_pairs.clamp(min=1)
        scale = torch.as_tensor(n, dtype=pairs.sim.dtype, device=pairs.sim.device).reciprocal()
        with torch.no_grad():  # value and its derivative written down: see with_gradient
            sim = pairs.sim
            index, is_pos = pairs.same_lists.index, pairs.same_lists.positive  # (B, C) lists
            # every pair's term as if it were negative, then the positives' terms swapped in
            # through the (B, C) lists; own slots: no pair
            if self.form == "similarity":
                hinge = sim - self.neg_margin
                s_pos = sim.gather(1, index)
                delta = (self.pos_margin - s_pos) - (s_pos - self.neg_margin)
            else:
                dist = pairs.distance()
                hinge = self.neg_margin - dist
                d_pos = dist.gather(1, index)
                delta = (d_pos - self.pos_margin) - (self.neg_margin - d_pos)
            hinge.scatter_add_(1, index, torch.where(is_pos, delta, 0.0))
            hinge = pairs.without_self(hinge, 0.0, inplace=True).clamp_(min=0)
            # Derivative of L = scale * sum of the terms, h = each pair's hinge (>= 0):
            # similarity form: d[S - m]_+/dS = +1 and d[m - S]_+/dS = -1 where h > 0;
            # distance form, with dD/dS = -1/D (D = sqrt(2 - 2S)):
            #   d(1/2 [m - D]_+^2)/dS = -h dD/dS = +h/D,  d(1/2 [D - m]_+^2)/dS = -h/D,
            #   set to 0 where D is clamped (duplicates), as autograd gives through
            #   Pairs.distance() in the other losses.
            # Written with the negative pair's sign everywhere, then flipped on the positives.
            # Oracle: tests/test_losses.py::test_matches_reference, contrastive configs (values
            # and gradients against loss_reference.contrastive).
            if self.form == "similarity":
                value = hinge.sum() * scale
                grad = hinge.sign_().mul_(scale)
            else:
                value = 0.5 * hinge.square().sum() * scale
                grad = hinge.div_(dist).mul_(scale).masked_fill_(dist <= 1e-6, 0.0)
            grad.scatter_add_(1, index, torch.where(is_pos, -2.0 * grad.gather(1, index), 0.0))
        return with_gradient(pairs.sim, value, grad), num_pairs
