"""Multi-Similarity loss with its hard-pair mining (Wang, Han, Huang, Dong, Scott, CVPR 2019)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._pairs import PairLoss, Pairs, masked_logsumexp

PRESETS = {
    # (alpha, beta, base, epsilon)
    "paper": (2.0, 50.0, 1.0, 0.1),
    "code": (2.0, 40.0, 0.5, 0.1),  # research-ms-loss / research-xbm configs
}


class MultiSimilarityLoss(PairLoss):
    """Multi-Similarity loss on cosine similarity S. Per anchor i, mining first:

        N_i' = {k in N_i : S_ik + epsilon > min_{p in P_i} S_ip}
        P_i' = {k in P_i : S_ik - epsilon < max_{n in N_i} S_in}

    then weighting:

        L_i = 1/alpha log(1 + sum_{P_i'} e^{-alpha (S_ik - base)})
            + 1/beta  log(1 + sum_{N_i'} e^{ beta (S_ik - base)})

    Mean over anchors whose mined sets are non-empty (P_i' is empty exactly when N_i' is);
    ``num_active`` = those anchors. The official code and PML divide by B instead (mined-out
    anchors count as 0): multiply by num_active / B to compare. Defaults alpha=2, beta=50,
    base (lambda) = 0.5, epsilon = 0.1 (PML's; the official code uses beta=40: preset="code").
    ``preset="paper"`` gives (2, 50, 1, 0.1). ``mining=False`` uses the full P_i and N_i.
    """

    active_unit = "anchors"

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        mining: bool = True,
        preset: str | None = None,
    ) -> None:
        super().__init__()
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
            alpha, beta, base, epsilon = PRESETS[preset]
        self.alpha, self.beta = float(alpha), float(beta)
        self.base, self.epsilon = float(base), float(epsilon)
        self.mining = mining

    def compute(self, pairs: Pairs) -> tuple[Tensor, Tensor]:
        sim, pos, neg = pairs.sim, pairs.pos, pairs.neg
        has_both = pos.any(1) & neg.any(1)
        if self.mining:
            sim_d = sim.detach()
            min_pos = torch.where(pos, sim_d, float("inf")).amin(1, keepdim=True)
            max_neg = torch.where(neg, sim_d, float("-inf")).amax(1, keepdim=True)
            pos = pos & (sim_d - self.epsilon < max_neg)
            neg = neg & (sim_d + self.epsilon > min_pos)
        valid = has_both & (pos.any(1) | neg.any(1))
        pos_term = masked_logsumexp(-self.alpha * (sim - self.base), pos, include_zero=True)
        neg_term = masked_logsumexp(self.beta * (sim - self.base), neg, include_zero=True)
        per_anchor = pos_term / self.alpha + neg_term / self.beta
        count = valid.sum()
        return torch.where(valid, per_anchor, 0.0).sum() / count.clamp(min=1), count
