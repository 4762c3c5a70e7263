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
            p_all = torch.softmax(logits_all, 1)  # p_ik over k != i
            p_pos = torch.softmax(logits_pos, 1)  # p_ik within the positives
            # L_i = LSE_all - LSE_pos, each LSE read off its softmax at the row's largest
            # logit (x_j - log p_j there; p_j >= 1/M, so it never underflows)
            best_all = logits_all.argmax(1, keepdim=True)
            best_pos = logits_pos.argmax(1, keepdim=True)
            lse_all = logits_all.gather(1, best_all) - p_all.gather(1, best_all).log()
            lse_pos = logits_pos.gather(1, best_pos) - p_pos.gather(1, best_pos).log()
            weight = valid[:, None] / count.clamp(min=1).to(pairs.sim.dtype)  # (B, 1)
            value = ((lse_all - lse_pos) * weight).sum()
            # d L_i / d S_ij = s * (softmax over k != i  -  softmax over the positives)
            grad = p_all.sub_(p_pos).mul_(self.scale * weight)
        return with_gradient(pairs.sim, value, grad), count
