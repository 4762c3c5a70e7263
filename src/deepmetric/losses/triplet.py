"""Triplet margin loss with semi-hard (Schroff, Kalenichenko, Philbin, "FaceNet", CVPR 2015),
batch-hard (Hermans, Beyer, Leibe, "In Defense of the Triplet Loss for Person
Re-Identification", 2017) or all-triplet mining."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .pairs import PairLoss, Pairs, unit_distance

MININGS = ("semihard", "hard", "all")


class TripletLoss(PairLoss):
    """Triplet loss [d_ap - d_an + margin]_+ on Euclidean distance d = D (or D^2, ``squared``).

    ``mining="semihard"`` (FaceNet, exactly as TensorFlow Addons' triplet_semihard_loss): for
    every positive pair (a, p) the negative with the smallest d_an among those with
    d_an > d_ap; where none is farther than the positive, the farthest negative. Mean over all
    positive pairs whose anchor has a negative (zero-loss pairs count); ``num_active`` = those
    pairs. One sort of each anchor's negatives and a binary search per pair: no B x M x M tensor.

    ``mining="hard"`` (batch-hard, Hermans et al. 2017): per anchor
    [max_p d_ap - min_n d_an + margin]_+, mean over anchors with a positive and a negative.

    ``mining="all"``: every (a, p, n); ``reduce_all="nonzero"`` averages over triplets with
    positive loss (PML's TripletMarginLoss default reducer), ``"all"`` over all valid triplets;
    ``num_active`` = the triplets averaged over. Computed in O(B M log M) from sorted negative
    distances and their prefix sums (the sum over n of [t - d_an]_+ is cnt * t - sum of the cnt
    smallest d_an), so B = 1024 never builds B x M x M.

    ``soft=True`` replaces the hinge by softplus(d_ap - d_an) (Hermans' soft margin; margin
    unused); available with "semihard" and "hard".
    Defaults: margin 0.2, non-squared distance.
    """

    def __init__(
        self,
        margin: float = 0.2,
        mining: str = "semihard",
        squared: bool = False,
        soft: bool = False,
        reduce_all: str = "nonzero",
    ) -> None:
        super().__init__()
        if mining not in MININGS:
            raise ValueError(f"mining must be one of {MININGS}, got {mining!r}")
        if reduce_all not in ("nonzero", "all"):
            raise ValueError(f"reduce_all must be 'nonzero' or 'all', got {reduce_all!r}")
        if soft and mining == "all":
            raise ValueError("soft=True is available with mining='semihard' or 'hard'")
        self.margin = float(margin)
        self.mining = mining
        self.squared = squared
        self.soft = soft
        self.reduce_all = reduce_all
        self.active_unit = {"semihard": "pairs", "hard": "anchors", "all": "triplets"}[mining]

    def _hinge(self, x: Tensor) -> Tensor:
        return F.softplus(x) if self.soft else (x + self.margin).clamp(min=0)

    def _distance(self, sim: Tensor) -> Tensor:
        return (2.0 - 2.0 * sim).clamp(min=0) if self.squared else unit_distance(sim)

    def compute(self, pairs: Pairs) -> tuple[Tensor, Tensor]:
        if self.mining == "hard":
            # mined without gradient: the farthest positive is the least similar, the closest
            # negative the most similar; distances (and gradient) for those 2 B entries only
            with torch.no_grad():
                sim = pairs.sim.detach()
                index, is_pos = pairs.same_lists.index, pairs.same_lists.positive  # (B, C) lists
                pos_sim = sim.gather(1, index).masked_fill_(~is_pos, float("inf"))
                least_pos, slot = pos_sim.min(1, keepdim=True)
                hardest_pos = index.gather(1, slot)
                most_neg, hardest_neg = pairs.fill_same(sim, float("-inf")).max(1, keepdim=True)
                valid = ((least_pos < float("inf")) & (most_neg > float("-inf")))[:, 0]
            dist = self._distance(pairs.sim.gather(1, torch.cat([hardest_pos, hardest_neg], 1)))
            per_anchor = torch.where(valid, self._hinge(dist[:, 0] - dist[:, 1]), 0.0)
            count = valid.sum()
            return per_anchor.sum() / count.clamp(min=1), count

        index, is_pos = pairs.same_lists.index, pairs.same_lists.positive  # (B, C) lists
        num_neg = pairs.sim.shape[1] - pairs.same_lists.num_same[:, None]  # (B, 1)
        dist = self._distance(pairs.sim)
        # Each anchor's negative distances in ascending order (non-negatives pushed to the end).
        sorted_neg, order = pairs.fill_same(dist.detach(), float("inf")).sort(1)
        valid_pair = is_pos & (num_neg > 0)  # (B, C): positive pairs whose anchor has a negative
        d_ap = dist.gather(1, index)  # (B, C)

        if self.mining == "semihard":
            # First negative strictly farther than the positive; else the farthest negative.
            first_farther = torch.searchsorted(sorted_neg, d_ap.detach(), right=True)
            rank = torch.where(first_farther < num_neg, first_farther, num_neg - 1).clamp(min=0)
            d_an = dist.gather(1, order.gather(1, rank))
            per_pair = self._hinge(d_ap - d_an)
            count = valid_pair.sum()
            return torch.where(valid_pair, per_pair, 0.0).sum() / count.clamp(min=1), count

        # mining == "all": for threshold t = d_ap + margin, sum_n [t - d_an]_+ over negatives
        # with d_an < t equals cnt * t - (sum of the cnt smallest negative distances).
        sorted_dist = dist.gather(1, order)  # differentiable, same order as sorted_neg
        sorted_dist = torch.where(torch.isfinite(sorted_neg), sorted_dist, 0.0)
        prefix = F.pad(sorted_dist.cumsum(1), (1, 0))  # prefix[:, c] = sum of c smallest
        threshold = d_ap + self.margin
        cnt = torch.searchsorted(sorted_neg, threshold.detach(), right=False)
        cnt = torch.minimum(cnt, num_neg)
        per_pair = cnt * threshold - prefix.gather(1, cnt)
        total = torch.where(valid_pair, per_pair, 0.0).sum()
        if self.reduce_all == "nonzero":
            count = torch.where(valid_pair, cnt, 0).sum()
        else:
            count = torch.where(valid_pair, num_neg, 0).sum()
        return total / count.clamp(min=1), count
