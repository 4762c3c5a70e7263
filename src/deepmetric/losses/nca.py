"""Neighbourhood Components Analysis loss (Goldberger et al. 2004), similarity form."""

from __future__ import annotations

import torch
from torch import Tensor

from ._pairs import PairLoss, Pairs, with_gradient


class NCALoss(PairLoss):
    """NCA with a softmax scale s on cosine similarity:

        L_i = -( LSE_{j in P_i}(s S_ij) - LSE_{k != i}(s S_ik) )

    i.e. minus the log of the probability that anchor i picks a same-class neighbour; the loss
    falls as same-class neighbours get closer. Mean over anchors with at least one positive;
    ``num_active`` = those anchors. Computed in log space, so large scales never drop an
    anchor. On unit vectors this equals PML's NCALoss(softmax_scale=s / 2) (which uses squared
    Euclidean distance); PML drops anchors whose positive probability underflows to 0, we do not.
    Default s = 16 (the seed's class default; the paper's unscaled form is s = 2).
    """

    active_unit = "anchors"

    def __init__(self, scale: float = 16.0) -> None:
        super().__init__()
        self.scale = float(scale)

    def compute(self, pairs: Pairs) -> tuple[Tensor, Tensor]:
        valid = pairs.pos.any(1)
        count = valid.sum()
        with torch.no_grad():  # value and its derivative written down: see with_gradient
            logits_all = pairs.without_self(self.scale * pairs.sim, -1e30, inplace=True)  # k != i
            logits_pos = logits_all.masked_fill(pairs.neg, -1e30)  # positives only
            best_pos = logits_pos.argmax(1, keepdim=True)
            log_p_all = torch.log_softmax(logits_all, 1)  # log p_ik over k != i
            log_p_pos = torch.log_softmax(logits_pos, 1)  # log p_ik within the positives
            weight = valid[:, None] / count.clamp(min=1).to(pairs.sim.dtype)  # (B, 1)
            # L_i = LSE_all - LSE_pos = log_p_pos[i, j] - log_p_all[i, j] for any positive j;
            # the best positive keeps both terms far from underflow
            per_anchor = log_p_pos.gather(1, best_pos) - log_p_all.gather(1, best_pos)
            value = (per_anchor * weight).sum()
            # d L_i / d S_ij = s * (softmax over k != i  -  softmax over the positives)
            grad = log_p_all.exp_().sub_(log_p_pos.exp_()).mul_(self.scale * weight)
        return with_gradient(pairs.sim, value, grad), count
