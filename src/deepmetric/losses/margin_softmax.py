"""Softmax over class proxies with normalised weights, without and with a margin on the
target class: normalized softmax (Zhai and Wu, "Classification is a Strong Baseline for Deep
Metric Learning", BMVC 2019), CosFace (Wang et al., "CosFace: Large Margin Cosine Loss for
Deep Face Recognition", CVPR 2018) and ArcFace (Deng et al., "ArcFace: Additive Angular
Margin Loss for Deep Face Recognition", CVPR 2019).

Each is a mean cross-entropy over the batch of logits s cos(theta_ic), theta_ic the angle
between embedding i and the proxy (class weight) of class c, the target class's logit
modified by the margin. Written on the whole (B, C) matrix of logits; the derivative is
written down (see :func:`~deepmetric.losses.proxies.softmax_cross_entropy`).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from .proxies import Proxies, ProxyLoss, cosine_loss, softmax_cross_entropy


def _normal_001(weight: Tensor, generator: torch.Generator) -> None:
    nn.init.normal_(weight, 0.0, 0.01, generator=generator)  # insightface's class centres


def _uniform_sqrt_d(weight: Tensor, generator: torch.Generator) -> None:
    bound = 1.0 / math.sqrt(weight.shape[1])  # the official code's class weights
    nn.init.uniform_(weight, -bound, bound, generator=generator)


class NormalizedSoftmaxLoss(ProxyLoss):
    """Normalized softmax: cross-entropy of the cosines divided by a temperature T,

        L = 1/B sum_i -log softmax_y( cos(x_i, w_c) / T over c = 1..C ),

    one proxy w_c per class, no bias. Mean over the B samples (``num_active`` = B).
    Defaults: temperature 0.05 (paper). Proxies initialised uniform in +-1/sqrt(d) (the
    official code). Equals PML's NormalizedSoftmaxLoss(temperature=T) with W = proxies^T.
    Embeddings must be L2-normalised.
    """

    def __init__(
        self, num_classes: int, embedding_dim: int, temperature: float = 0.05, seed: int = 0
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(num_classes, embedding_dim, seed=seed, init=_uniform_sqrt_d)
        self.temperature = float(temperature)

    def compute(self, emb: Tensor, labels: Tensor, proxies: Proxies) -> tuple[Tensor, Tensor]:
        value_and_grad = partial(softmax_cross_entropy, labels=labels)  # of the logits cos / T
        loss = cosine_loss(emb, proxies, 1.0 / self.temperature, value_and_grad)
        return loss, torch.tensor(emb.shape[0])


class _MarginSoftmaxLoss(ProxyLoss):
    """What CosFace and ArcFace share: scale s, margin m, one proxy per class initialised
    normal(0, 0.01) (insightface), the mean over the B samples. Subclasses write
    ``value_and_grad(labels, logits)``: the loss and its derivative in the (B, C) logits
    s cos theta, with the target's margin applied."""

    def __init__(
        self, num_classes: int, embedding_dim: int, scale: float, margin: float, seed: int
    ) -> None:
        super().__init__(num_classes, embedding_dim, seed=seed, init=_normal_001)
        self.scale, self.margin = float(scale), float(margin)

    def compute(self, emb: Tensor, labels: Tensor, proxies: Proxies) -> tuple[Tensor, Tensor]:
        loss = cosine_loss(emb, proxies, self.scale, partial(self.value_and_grad, labels))
        return loss, torch.tensor(emb.shape[0])

    def value_and_grad(self, labels: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class CosFaceLoss(_MarginSoftmaxLoss):
    """CosFace (large margin cosine loss): the target's cosine lowered by a margin m,

        L = 1/B sum_i -log( e^{s (cos theta_iy - m)}
                            / (e^{s (cos theta_iy - m)} + sum_{c != y} e^{s cos theta_ic}) ).

    Mean over the B samples. Defaults: scale s 64, margin m 0.35 (paper; insightface uses
    0.40). Proxies initialised normal(0, 0.01) (insightface). Equals PML's
    CosFaceLoss(margin=m, scale=s) with W = proxies^T. Embeddings must be L2-normalised.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        scale: float = 64.0,
        margin: float = 0.35,
        seed: int = 0,
    ) -> None:
        super().__init__(num_classes, embedding_dim, scale, margin, seed)

    def value_and_grad(self, labels: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """The loss and its derivative in the (B, C) logits s cos theta (overwritten)."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        target = logits[rows, labels] - self.scale * self.margin  # slope 1
        return softmax_cross_entropy(logits, labels, target)


class ArcFaceLoss(_MarginSoftmaxLoss):
    """ArcFace (additive angular margin): the target's angle widened by a margin m,

        L = 1/B sum_i -log( e^{s phi_i} / (e^{s phi_i} + sum_{c != y} e^{s cos theta_ic}) )
        phi_i = cos(theta_iy + m)           if theta_iy + m <= pi
                cos theta_iy - m sin m      otherwise (keeps phi decreasing in theta)

    (the second branch, where cos(theta + m) would rise again, as insightface's original
    code and PML). Mean over the B samples. Defaults: scale s 64, margin m 0.5 radians
    (paper); PML's ``margin`` is in degrees (28.6 = 0.5 rad), otherwise the same value and
    gradients. sin theta is computed as sqrt(max(1 - cos^2, 1e-9)), so the slope of
    cos(theta + m) in cos theta stays finite at theta = 0 (a plain acos or sqrt gives an
    infinite one there). Proxies initialised normal(0, 0.01) (insightface). Embeddings must
    be L2-normalised.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        scale: float = 64.0,
        margin: float = 0.5,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= margin < math.pi:
            raise ValueError(f"margin must be in [0, pi) radians, got {margin}")
        super().__init__(num_classes, embedding_dim, scale, margin, seed)

    def value_and_grad(self, labels: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """The loss and its derivative in the (B, C) logits s cos theta (overwritten)."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        cos_m, sin_m = math.cos(self.margin), math.sin(self.margin)
        cos = (logits[rows, labels] / self.scale).clamp(-1.0, 1.0)  # (B,) cos theta_iy
        sin = (1.0 - cos * cos).clamp(min=1e-9).sqrt()
        # theta + m <= pi  <=>  cos theta >= cos(pi - m) = -cos m
        inside = cos >= -cos_m
        phi = torch.where(inside, cos * cos_m - sin * sin_m, cos - self.margin * sin_m)
        # d phi / d cos theta: cos m + sin m cos theta / sin theta, or 1; the logits are
        # s cos theta, so the same slope in the logits
        slope = torch.where(inside, cos_m + sin_m * cos / sin, 1.0)
        return softmax_cross_entropy(logits, labels, self.scale * phi, slope)
