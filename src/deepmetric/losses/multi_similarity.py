"""Multi-Similarity loss with its hard-pair mining (Wang, Han, Huang, Dong, Scott, CVPR 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._pairs import PairLoss, Pairs, with_gradient

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
        with torch.no_grad():  # value and its derivative written down: see with_gradient
            sim, pos, neg = pairs.sim, pairs.pos, pairs.neg
            has_both = pos.any(1) & neg.any(1)
            if self.mining:
                min_pos = torch.where(pos, sim, float("inf")).amin(1, keepdim=True)
                max_neg = torch.where(neg, sim, float("-inf")).amax(1, keepdim=True)
                pos = pos & (sim - self.epsilon < max_neg)
                neg = neg & (sim + self.epsilon > min_pos)
            valid = has_both & (pos.any(1) | neg.any(1))
            count = valid.sum()
            weight = valid[:, None] / count.clamp(min=1).to(sim.dtype)  # (B, 1)
            # log(1 + sum e^x) per anchor over the mined positives and negatives
            x_pos = (sim - self.base).mul_(-self.alpha).masked_fill_(~pos, -1e30)
            x_neg = (sim - self.base).mul_(self.beta).masked_fill_(~neg, -1e30)
            log1p_pos = F.softplus(torch.logsumexp(x_pos, 1, keepdim=True))
            log1p_neg = F.softplus(torch.logsumexp(x_neg, 1, keepdim=True))
            value = ((log1p_pos / self.alpha + log1p_neg / self.beta) * weight).sum()
            # d L_i / d S_ij = -e^{x_ij} / (1 + sum_P' e^x) on P', e^{x_ij} / (1 + sum_N' e^x) on N'
            grad = x_neg.sub_(log1p_neg).exp_().sub_(x_pos.sub_(log1p_pos).exp_()).mul_(weight)
        return with_gradient(pairs.sim, value, grad), count
