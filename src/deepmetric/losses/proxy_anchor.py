"""Proxy-Anchor loss (Kim, Kim, Cho, Kwak, "Proxy Anchor Loss for Deep Metric Learning",
CVPR 2020)."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from .proxies import Proxies, ProxyLoss, cosine_loss


class ProxyAnchorLoss(ProxyLoss):
    """Proxy-Anchor loss on cosine similarity s(x, p): every proxy is an anchor,

        L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} e^{-alpha (s(x, p) - delta)})
          + 1/C    sum_{p = 1..C} log(1 + sum_{x in X_p-} e^{ alpha (s(x, p) + delta)})

    X_p+ / X_p- = the batch samples of / not of class p, P+ = the proxies with at least one
    positive in the batch. A class absent from the batch adds nothing to the first sum and
    is not counted in |P+|; its negative term counts (divided by all C), as in the official
    code and PML. ``num_active`` = |P+| (proxies). Defaults: alpha 32, delta 0.1 (paper).
    Proxies initialised kaiming-normal (fan_out, std sqrt(2 / C)) as the official code.
    Computed in log space (no overflow at any alpha). Equals PML's ProxyAnchorLoss(margin=
    delta, alpha=alpha) with the same proxies. Embeddings must be L2-normalised.
    """

    active_unit = "proxies"

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        alpha: float = 32.0,
        delta: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_dim,
            seed=seed,
            init=lambda w, g: nn.init.kaiming_normal_(w, mode="fan_out", generator=g),
        )
        self.alpha, self.delta = float(alpha), float(delta)

    def compute(self, emb: Tensor, labels: Tensor, proxies: Proxies) -> tuple[Tensor, Tensor]:
        count = (torch.bincount(labels, minlength=self.num_classes) > 0).sum()  # |P+|
        value_and_grad = partial(self.value_and_grad, labels, count)
        return cosine_loss(emb, proxies, self.alpha, value_and_grad), count

    def value_and_grad(
        self, labels: Tensor, count: Tensor, logits: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The loss and its derivative in the (B, C) logits alpha s(x_i, p_c) (overwritten)."""
        b, c = logits.shape
        rows = torch.arange(b, device=logits.device)
        shift = self.alpha * self.delta
        # positives: x_i = -alpha (s_iy - delta) per sample, summed per class; each log(1 + sum
        # e^x) computed as m + log(e^-m + sum e^(x - m)), m = max(0, class maximum)
        x_pos = shift - logits[rows, labels]  # (B,)
        m_pos = torch.zeros(c, dtype=x_pos.dtype, device=logits.device)
        m_pos.scatter_reduce_(0, labels, x_pos, "amax")  # includes the 0
        e_pos = (x_pos - m_pos[labels]).exp_()
        denom_pos = (-m_pos).exp_().index_add_(0, labels, e_pos)  # e^-m (1 + sum e^x)
        pos_value = (m_pos + denom_pos.log()).sum() / count  # absent classes: log 1 = 0
        # negatives: u_ic = alpha (s_ic + delta) over the samples of other classes, per proxy
        # (column), the same way with m = max(0, column maximum)
        logits[rows, labels] = -math.inf  # the positives out
        m_neg = (logits.amax(0) + shift).clamp_(min=0.0)  # (C,); a column without negatives: 0
        e_neg = logits.sub_(m_neg - shift).exp_()  # e^(u - m), 0 at the positives
        denom_neg = (-m_neg).exp_().add_(e_neg.sum(0))  # e^-m (1 + sum e^u)
        neg_value = (m_neg + denom_neg.log()).sum() / c
        # d log(1 + sum e^x) / d x_j = e^x_j / (1 + sum e^x) = e^(x_j - m) / denom, and
        # dx/dlogit = -1 on the positives, +1 on the negatives; each sum divided by |P+| or C.
        # Oracle: tests/test_losses_proxy.py::test_matches_reference, proxy_anchor configs
        # (values and gradients against loss_reference.proxy_anchor).
        grad = e_neg.mul_((1.0 / (c * denom_neg))[None, :])  # (B, C)
        grad[rows, labels] = -e_pos / (denom_pos[labels] * count)
        return pos_value + neg_value, grad
