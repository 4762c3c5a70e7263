"""Lifted Structure loss (Oh Song, Xiang, Jegelka, Savarese, "Deep Metric Learning via Lifted
Structured Feature Embedding", CVPR 2016) and Deep_Metric's variant."""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import masked_logsumexp
from .pairs import PairLoss, Pairs


class LiftedStructureLoss(PairLoss):
    """Lifted Structure loss.

    ``variant="original"`` (the paper), D = Euclidean distance, margin alpha = 1:

        R_i  = log sum_{k in N_i} e^{alpha - D_ik}
        J_ij = log(e^{R_i} + e^{R_j}) + D_ij
        L    = 1 / (2 |P|) * sum_{(i, j) in P} [J_ij]_+^2

    over the unordered positive pairs P of the batch that have a negative on either side
    (``num_active`` = |P|). With a reference set (memory, gathered batch) the reference's own
    negatives are not known, so J_ij = R_i + D_ij (anchor side only) over every (anchor,
    positive reference) pair. PML's LiftedStructureLoss(neg_margin=1, pos_margin=0) gives the
    same value in-batch; with references its j-side term indexes the wrong set.

    ``variant="modified"`` (Deep_Metric's LiftedStructure.py, github.com/bnu-wangxun/Deep_metric),
    cosine S, no margin, no hinge:

        L_i = 2/beta log sum_{P_i} e^{-beta S_ik} + 2/alpha log sum_{N_i} e^{alpha S_ik}

    mean over anchors with a positive and a negative; defaults alpha = 40, beta = 2.
    """

    def __init__(
        self,
        variant: str = "original",
        margin: float = 1.0,
        alpha: float = 40.0,
        beta: float = 2.0,
    ) -> None:
        super().__init__()
        if variant not in ("original", "modified"):
            raise ValueError(f"variant must be 'original' or 'modified', got {variant!r}")
        self.variant = variant
        self.margin = float(margin)
        self.alpha, self.beta = float(alpha), float(beta)
        self.active_unit = "pairs" if variant == "original" else "anchors"

    def compute(self, pairs: Pairs) -> tuple[Tensor, Tensor]:
        if self.variant == "modified":
            pos_term = masked_logsumexp(-self.beta * pairs.sim, pairs.pos)
            neg_term = masked_logsumexp(self.alpha * pairs.sim, pairs.neg)
            valid = pairs.pos.any(1) & pairs.neg.any(1)
            per_anchor = torch.where(
                valid, 2.0 / self.beta * pos_term + 2.0 / self.alpha * neg_term, 0.0
            )
            count = valid.sum()
            return per_anchor.sum() / count.clamp(min=1), count

        dist = pairs.distance()
        row_lse = masked_logsumexp(self.margin - dist, pairs.neg)  # R_i; ~-1e30 if no negative
        has_neg = pairs.neg.any(1)
        b, m = dist.shape
        if pairs.in_batch:
            upper = torch.ones(b, b, dtype=torch.bool, device=dist.device).triu(1)
            valid = pairs.pos & upper & (has_neg[:, None] | has_neg[None, :])
            neg_lse = torch.logaddexp(row_lse[:, None], row_lse[None, :])
        else:
            valid = pairs.pos & has_neg[:, None]
            neg_lse = row_lse[:, None].expand(b, m)
        j = torch.where(valid, neg_lse, 0.0) + dist
        per_pair = torch.where(valid, j.clamp(min=0).square(), 0.0)
        count = valid.sum()
        return per_pair.sum() / (2 * count.clamp(min=1)), count
