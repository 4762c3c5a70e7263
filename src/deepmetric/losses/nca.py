"""Neighbourhood Components Analysis loss (Goldberger et al. 2004), similarity form."""

from __future__ import annotations

import torch
from torch import Tensor

from ._pairs import PairLoss, Pairs, masked_logsumexp


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
        logits = self.scale * pairs.sim
        log_pos = masked_logsumexp(logits, pairs.pos)
        log_all = torch.logsumexp(pairs.without_self(logits, -1e30), 1)
        valid = pairs.pos.any(1)
        per_anchor = torch.where(valid, log_all - log_pos, 0.0)
        count = valid.sum()
        return per_anchor.sum() / count.clamp(min=1), count
