"""Neighbourhood Components Analysis loss (Goldberger, Roweis, Hinton, Salakhutdinov,
"Neighbourhood Components Analysis", NIPS 2004), similarity form."""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import with_gradient
from .pairs import PairLoss, Pairs


class NCALoss(PairLoss):
    """NCA with a softmax scale s on cosine similarity:

        L_i = -( LSE_{j in P_i}(s S_ij) - LSE_{k != i}(s S_ik) )

    i.e. minus the log of the probability that anchor i picks a same-class neighbour; the loss
    falls as same-class neighbours get closer. Mean over anchors with at least one positive;
    ``num_active`` = those anchors. Computed in log space, so large scales never drop an
    anchor. On unit vectors this equals PML's NCALoss(softmax_scale=s / 2) (which uses squared
    Euclidean distance); PML drops anchors whose positive probability underflows to 0, we do not.
    Default s = 16 (Deep_Metric's class default; the paper's unscaled form is s = 2).
    """

    active_unit = "anchors"

    def __init__(self, scale: float = 16.0) -> None:
        super().__init__()
        self.scale = float(scale)

    def compute(self, pairs: Pairs) -> tuple[Tensor, Tensor]:
        index, is_pos = pairs.same_lists.index, pairs.same_lists.positive  # (B, C) lists
        valid = is_pos.any(1)
        count = valid.sum()
        with torch.no_grad():  # value and its derivative written down: see with_gradient
            logits = pairs.without_self(self.scale * pairs.sim, -1e30, inplace=True)  # k != i
            p_all = torch.softmax(logits, 1)  # p_ik over k != i
            # LSE over k != i read off the softmax at the row's largest logit, where
            # p = e^(x_max - LSE) >= 1/M never underflows
            lse_all = logits.amax(1) - p_all.amax(1).log()
            logits_pos = logits.gather(1, index).masked_fill_(~is_pos, float("-inf"))
            lse_pos = torch.logsumexp(logits_pos, 1)  # -inf for anchors without positives
            p_pos = torch.where(is_pos, (logits_pos - lse_pos[:, None]).exp(), 0.0)
            weight = valid / count.clamp(min=1).to(pairs.sim.dtype)  # (B,)
            value = torch.where(valid, (lse_all - lse_pos) * weight, 0.0).sum()
            # L_i = LSE_{k != i}(s S_ik) - LSE_{j in P_i}(s S_ij), and d LSE_k(x_k) / d x_j is
            # the softmax p_j, so d L_i / d S_ij = s (p_all_ij - p_pos_ij), p_pos = 0 off P_i;
            # each anchor weighted by 1 / count (the mean over valid anchors).
            # Oracle: tests/test_losses.py::test_matches_reference, nca configs (values and
            # gradients against loss_reference.nca).
            coef = (self.scale * weight)[:, None]
            grad = p_all.mul_(coef).scatter_add_(1, index, p_pos.mul_(-coef))
        return with_gradient(pairs.sim, value, grad), count
