"""SoftTriple loss (Qian, Shang, Sun, Hu, Li, Jin, "SoftTriple Loss: Deep Metric Learning
Without Triplet Sampling", ICCV 2019)."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .proxies import Proxies, ProxyLoss, cosine_loss, softmax_cross_entropy


def _uniform(weight: Tensor, generator: torch.Generator) -> None:
    """uniform(+-1/sqrt(C K)) on the (C K, d) centres: the official code's
    kaiming_uniform(a=sqrt(5)) on its d x C K matrix (fan_in C K)."""
    bound = 1.0 / math.sqrt(weight.shape[0])
    nn.init.uniform_(weight, -bound, bound, generator=generator)


class SoftTripleLoss(ProxyLoss):
    """SoftTriple: K centres w_ck per class; the similarity of sample i to class c is the
    softmax(1/gamma)-weighted mean of its K centre cosines s_ick = cos(x_i, w_ck),

        S_ic = sum_k softmax_k(s_ick / gamma) s_ick
        L = 1/B sum_i -log softmax_y( lambda (S_ic - delta [c = y_i]) over c )  +  tau R
        R = sum_c sum_{k < k'} sqrt(2 + 1e-5 - 2 <w_ck, w_ck'>) / (C K (K - 1))

    (centres normalised; R pulls each class's centres together and is the official code's,
    added when tau > 0 and K > 1). Mean over the B samples (``num_active`` = B).
    Defaults (paper): K = ``centers_per_class`` 10, lambda = ``scale`` 20, gamma 0.1,
    delta = ``margin`` 0.01, tau 0.2. Centres initialised uniform in +-1/sqrt(C K) (the
    official code's kaiming_uniform(a=sqrt(5)) on the d x C K matrix); row c K + k of
    ``proxies`` is centre k of class c. With tau = 0 equals PML's SoftTripleLoss(la=lambda,
    gamma, margin=delta, centers_per_class=K) with fc = proxies^T; PML has no R term (its
    SparseCentersRegularizer adds R with the smallest float instead of 1e-5 under the root).
    The authors' advice: keep K below the images per class; lower lambda and K on NaN.
    Embeddings must be L2-normalised.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        centers_per_class: int = 10,
        scale: float = 20.0,
        gamma: float = 0.1,
        margin: float = 0.01,
        tau: float = 0.2,
        seed: int = 0,
    ) -> None:
        if isinstance(centers_per_class, bool) or not isinstance(centers_per_class, int):
            raise ValueError(
                f"centers_per_class must be an integer >= 1, got {centers_per_class!r}"
            )
        if centers_per_class < 1:
            raise ValueError(f"centers_per_class must be an integer >= 1, got {centers_per_class}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        super().__init__(num_classes, embedding_dim, centers_per_class, seed=seed, init=_uniform)
        self.scale, self.gamma = float(scale), float(gamma)
        self.margin, self.tau = float(margin), float(tau)

    def compute(self, emb: Tensor, labels: Tensor, proxies: Proxies) -> tuple[Tensor, Tensor]:
        loss = cosine_loss(emb, proxies, 1.0, partial(self.value_and_grad, labels))
        c, k = self.num_classes, self.proxies_per_class
        if self.tau > 0 and k > 1:
            centres = F.normalize(proxies.weight, dim=1).view(c, k, -1)
            gram = centres @ centres.transpose(1, 2)  # (C, K, K) centre cosines
            upper = torch.triu_indices(k, k, 1, device=emb.device)
            dist = (2.0 + 1e-5 - 2.0 * gram[:, upper[0], upper[1]]).sqrt()
            loss = loss + self.tau * dist.sum() / (c * k * (k - 1))
        return loss, torch.tensor(emb.shape[0])

    def value_and_grad(self, labels: Tensor, sims: Tensor) -> tuple[Tensor, Tensor]:
        """The classification term and its derivative in the (B, C K) centre cosines."""
        b, c, k = sims.shape[0], self.num_classes, self.proxies_per_class
        rows = torch.arange(b, device=sims.device)
        s = sims.view(b, c, k)
        # softmax over the K centres, written out (torch.softmax over a last dimension of 10
        # takes 3x longer on the CPU); shifted by each class's largest cosine
        weights = (s - s.amax(2, keepdim=True)).mul_(1.0 / self.gamma).exp_()  # (B, C, K)
        weights.div_(weights.sum(2, keepdim=True))
        relaxed = (weights * s).sum(2)  # (B, C) S_ic
        target = self.scale * (relaxed[rows, labels] - self.margin)
        value, grad_logits = softmax_cross_entropy(relaxed * self.scale, labels, target)
        # S_ic = sum_k p_k s_k with p = softmax(s / gamma): dS/ds_j = p_j + sum_k s_k
        # dp_k/ds_j = p_j (1 + (s_j - S) / gamma); times g = dL/dS = lambda dL/dlogit, in
        # place of the cosines: p (g + (s - S) g / gamma). Oracle:
        # tests/test_losses_proxy.py::test_matches_reference, soft_triple configs.
        g = (self.scale * grad_logits)[:, :, None]  # (B, C, 1)
        grad = s.sub_(relaxed[:, :, None]).mul_(g / self.gamma).add_(g).mul_(weights)
        return value, grad.view(b, c * k)
