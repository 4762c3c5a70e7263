"""Multi-Similarity loss with its hard-pair mining (Wang, Han, Huang, Dong, Scott,
"Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning", CVPR 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autograd import with_gradient
from .pairs import PairLoss, Pairs

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
            sim = pairs.sim
            index, is_pos = pairs.same_lists.index, pairs.same_lists.positive  # (B, C) lists
            s_pos = sim.gather(1, index)  # (B, C)
            s_neg = pairs.fill_same(sim, float("-inf"))  # (B, M): negatives, -inf elsewhere
            inf = float("inf")
            min_pos = s_pos.masked_fill(~is_pos, inf).amin(1, keepdim=True)  # +inf: none
            max_neg = s_neg.amax(1, keepdim=True)  # -inf without negatives
            valid = (min_pos < inf) & (max_neg > -inf)  # (B, 1) both sets
            if self.mining:
                pos = is_pos & (s_pos - self.epsilon < max_neg)
                neg = s_neg > min_pos - self.epsilon  # (-inf entries never pass)
                # P' keeps the least positive if it keeps any, N' the largest negative:
                # the same comparisons on those entries tell whether either set is non-empty
                valid &= (min_pos - self.epsilon < max_neg) | (max_neg + self.epsilon > min_pos)
            else:
                pos, neg = is_pos, s_neg > -inf
            count = valid.sum()
            weight = valid / count.clamp(min=1).to(sim.dtype)  # (B, 1)
            # Exponents x = -alpha (S - base) on P', beta (S - base) on N', each shifted by
            # its row maximum m: the least mined positive is min_pos and the largest mined
            # negative is max_neg (mining keeps those whenever it keeps any), so
            # x - m = -alpha (S - min_pos) on P' and beta (S - max_neg) on N'.
            m_pos = -self.alpha * (min_pos - self.base)  # (B, 1) row shifts
            m_neg = self.beta * (max_neg - self.base)
            e_pos = torch.where(pos, (s_pos - min_pos).mul_(-self.alpha).exp_(), 0.0)  # (B, C)
            shift = max_neg.clamp(min=-1e30)  # finite: no -inf - -inf without negatives
            e_neg = (s_neg - shift).mul_(self.beta).exp_().mul_(neg)  # (B, M)
            # log(1 + sum e^x) = softplus(m + log sum e^(x - m)) per anchor and term
            log1p_pos = F.softplus(e_pos.sum(1, keepdim=True).log_().add_(m_pos))
            log1p_neg = F.softplus(e_neg.sum(1, keepdim=True).log_().add_(m_neg))
            value = torch.where(valid, log1p_pos / self.alpha + log1p_neg / self.beta, 0.0)
            value = (value * weight).sum()
            # With the mined sets fixed (mining is piecewise constant in S), chain rule through
            # 1/alpha log(1 + sum e^x), dx/dS = -alpha on P', and 1/beta log(1 + sum e^x),
            # dx/dS = beta on N':
            #   d L_i / d S_ij = -e^x / (1 + sum_P' e^x) on P',  e^x / (1 + sum_N' e^x) on N',
            # i.e. e^(x - m) times the row factor e^(m - log(1 + sum e^x)) (at most 1), times
            # each anchor's weight 1 / count. Oracle: tests/test_losses.py::test_matches_reference,
            # multi_similarity configs (values and gradients against
            # loss_reference.multi_similarity).
            coef_pos = (m_pos - log1p_pos).exp_().mul_(weight).neg_()
            coef_neg = (m_neg - log1p_neg).exp_().mul_(weight)
            grad = e_neg.mul_(coef_neg).scatter_add_(1, index, e_pos.mul_(coef_pos))
        return with_gradient(pairs.sim, value, grad), count
