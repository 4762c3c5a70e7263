"""ProxyNCA++ (Teh, DeVries, Taylor, "ProxyNCA++: Revisiting and Revitalizing Proxy
Neighborhood Component Analysis", ECCV 2020) and the original ProxyNCA (Movshovitz-Attias,
Toshev, Leung, Ioffe, Singh, "No Fuss Distance Metric Learning using Proxies", ICCV 2017)."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from .proxies import Proxies, ProxyLoss, cosine_loss, softmax_cross_entropy

VARIANTS = ("plus_plus", "original")


class ProxyNCALoss(ProxyLoss):
    """ProxyNCA on squared Euclidean distances of unit vectors, d_ic = ||x_i - p_c / ||p_c||||^2
    = 2 - 2 cos(x_i, p_c), with a temperature T:

        plus_plus: L = 1/B sum_i -log( e^{-d_iy / T} / sum_{c = 1..C}  e^{-d_ic / T} )
        original:  L = 1/B sum_i -log( e^{-d_iy / T} / sum_{c != y}   e^{-d_ic / T} )

    ProxyNCA++ keeps the positive proxy in the denominator (a softmax over all proxies); the
    original ProxyNCA leaves it out (needs C >= 2; its loss is unbounded below). Since
    -d/T = (2 cos - 2) / T, this is a cross-entropy of the logits 2 cos / T. Mean over the B
    samples (``num_active`` = B). Defaults: T = 1/9 (ProxyNCA++'s scaling 3 of x and p, i.e.
    -||3x - 3p||^2), variant plus_plus. Proxies initialised normal / 8 (ProxyNCA++ code).
    plus_plus equals PML's ProxyNCALoss(softmax_scale=1/T) except that PML drops the samples
    whose positive probability underflows to 0 (a large scale, a far proxy) from the mean,
    where this computes their loss in log space. Embeddings must be L2-normalised.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        temperature: float = 1.0 / 9.0,
        variant: str = "plus_plus",
        seed: int = 0,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(
            num_classes,
            embedding_dim,
            seed=seed,
            init=lambda w, g: nn.init.normal_(w, 0.0, 1.0 / 8.0, generator=g),
        )
        if variant == "original" and num_classes < 2:
            raise ValueError("variant 'original' leaves the positive proxy out: needs >= 2 classes")
        self.temperature, self.variant = float(temperature), variant

    def compute(self, emb: Tensor, labels: Tensor, proxies: Proxies) -> tuple[Tensor, Tensor]:
        exclude = self.variant == "original"  # of the logits 2 cos / T:
        value_and_grad = partial(softmax_cross_entropy, labels=labels, exclude_target=exclude)
        loss = cosine_loss(emb, proxies, 2.0 / self.temperature, value_and_grad)
        return loss, torch.tensor(emb.shape[0])
