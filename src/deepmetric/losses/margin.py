"""Margin loss with distance-weighted negative sampling (Wu, Manmatha, Smola, Kraehenbuehl,
"Sampling Matters in Deep Embedding Learning", ICCV 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .pairs import PairLoss, Pairs, unit_distance


class MarginLoss(PairLoss):
    """Margin loss on Euclidean distance D of unit vectors, y = +1 positive / -1 negative:

        l(i, j) = [margin + y_ij (D_ij - beta_i)]_+
        L = (sum of l + nu * sum of beta_i over the pairs) / #{pairs with l > 0}

    For every positive pair (a, p) of the batch one negative n is drawn for the anchor with
    probability proportional to q(d)^-1, the inverse density of distances between uniform
    points on the (dim-1)-sphere, q(d) ~ d^(dim-2) (1 - d^2/4)^((dim-3)/2), with d clamped
    below at ``cutoff`` and weight 0 for negatives at D >= ``nonzero_loss_cutoff`` (they give
    no loss); a row without any such negative draws uniformly among its negatives. Sampling
    uses the module's own seeded generator; indices carry no gradient, the loss is
    differentiable through D. ``last_triplets`` holds the (anchor, positive, negative) indices
    of the last call; ``num_active`` = pairs with non-zero loss (the divisor).

    beta is an ``nn.Parameter`` of this module (one global value, or one per training class
    with ``num_classes``), so ``parameters()`` returns it and the optimiser must include it
    (the trainer puts it in its own parameter group). Defaults follow the paper and PML:
    margin 0.2, beta 1.2, nu 0.
    """

    def __init__(
        self,
        margin: float = 0.2,
        beta: float = 1.2,
        nu: float = 0.0,
        learn_beta: bool = True,
        num_classes: int | None = None,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.margin, self.nu = float(margin), float(nu)
        self.cutoff, self.nonzero_loss_cutoff = float(cutoff), float(nonzero_loss_cutoff)
        self.num_classes = num_classes
        init = torch.full((1 if num_classes is None else int(num_classes),), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(init)
        else:
            self.register_buffer("beta", init)
        self.seed = int(seed)
        self.generator: torch.Generator | None = None
        self.last_triplets: tuple[Tensor, Tensor, Tensor] | None = None

    def _get_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        return self.generator

    def get_extra_state(self) -> dict:
        """The sampling generator's state, kept in ``state_dict()`` so a resumed run draws
        the same negatives (None before the first call)."""
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        """Restore the generator saved by :meth:`get_extra_state` (on beta's device)."""
        self.generator = None
        if state["generator"] is not None:
            self.generator = torch.Generator(device=self.beta.device)
            self.generator.set_state(state["generator"])

    def sample_weights(self, dist: Tensor, neg: Tensor, dim: int) -> Tensor:
        """(B, M) unnormalised sampling weights of the negatives from distances (B, M) of
        ``dim``-dimensional unit vectors."""
        with torch.no_grad():  # in log space, shifted by the row maximum: float32 suffices
            d = dist.clamp(min=self.cutoff)
            log_w = (2.0 - dim) * d.log() - (dim - 3) / 2.0 * (1.0 - d.square() / 4).clamp_(
                min=1e-8
            ).log_()
            allowed = neg & (dist < self.nonzero_loss_cutoff)
            log_w.masked_fill_(~allowed, float("-inf"))
            row_max = log_w.amax(1, keepdim=True)
            weights = log_w.sub_(row_max).exp_().masked_fill_(~allowed, 0.0)  # NaN rows: empty
            empty = ~allowed.any(1, keepdim=True)
            return torch.where(empty, neg.to(weights.dtype), weights)

    def compute(self, pairs: Pairs) -> tuple[Tensor, Tensor]:
        # sampled without gradient; distances and their gradient only for the chosen pairs
        dist = unit_distance(pairs.sim.detach())
        pos, neg = pairs.pos, pairs.neg
        has_neg = neg.any(1)
        pos = pos & has_neg[:, None]  # an anchor without negatives forms no triplet
        anchor, positive = pos.nonzero(as_tuple=True)
        if anchor.numel() > 0:
            weights = self.sample_weights(dist, neg, pairs.dim)
            weights = torch.where(has_neg[:, None], weights, 1.0)  # rows never used
            max_pos = int(pos.sum(1).max())
            draws = torch.multinomial(
                weights, max_pos, replacement=True, generator=self._get_generator(dist.device)
            )
            slot = (pos.cumsum(1) - 1)[anchor, positive]  # k-th positive of its anchor
            negative = draws[anchor, slot]
        else:
            negative = anchor
        self.last_triplets = (anchor, positive, negative)

        if self.num_classes is None:
            beta = self.beta.expand(anchor.shape[0])
        else:
            anchor_labels = pairs.labels[anchor]
            if anchor_labels.numel() and int(anchor_labels.max()) >= self.num_classes:
                raise ValueError(
                    f"label {int(anchor_labels.max())} out of range for num_classes="
                    f"{self.num_classes} per-class betas"
                )
            beta = self.beta[anchor_labels]
        d_ap = unit_distance(pairs.sim[anchor, positive])
        d_an = unit_distance(pairs.sim[anchor, negative])
        pos_loss = (self.margin + d_ap - beta).clamp(min=0)
        neg_loss = (self.margin - d_an + beta).clamp(min=0)
        count = (pos_loss > 0).sum() + (neg_loss > 0).sum()
        total = pos_loss.sum() + neg_loss.sum() + self.nu * 2.0 * beta.sum()
        return total / count.clamp(min=1), count
