"""Machinery shared by the proxy-based losses: :class:`ProxyLoss` (the proxies, the common
call and its checks), :func:`cosine_loss` and :func:`softmax_cross_entropy`.

A proxy loss compares each embedding with learnable class proxies (K per class, row
``c K + k`` of ``proxies`` is centre k of class c) instead of with other embeddings, so it
needs no positive pair in the batch and takes no reference set. The proxies are an
``nn.Parameter`` of the loss: an optimiser must include them (the trainer's ``loss``
parameter group, ``optim.loss_lr`` / ``optim.loss_weight_decay``) and the loss's
``state_dict()`` holds them. They stay in their own dtype (float32): each call computes in
float32 (float64 for float64 input) from a copy, never casting the parameter in place, and
with autocast off.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._autograd import cosine_logits_loss
from .pairs import check_inputs, check_unit_norms, row_norms


class Proxies(NamedTuple):
    """The proxies of one call: ``weight`` (C K, d) in the call's dtype (a copy of the
    parameter when the dtypes differ) and its detached row ``norms`` (C K,)."""

    weight: Tensor
    norms: Tensor


class ProxyLoss(nn.Module):
    """Base of every proxy loss: the proxies, one call signature, input checks, active count.

    Args:
        num_classes: C, one label per class, labels in ``0..C-1`` (the trainer passes the
            training split's number of classes).
        embedding_dim: d.
        proxies_per_class: K.
        seed: the proxies' initialisation is drawn from a generator seeded with it (the same
            proxies on every rank of a distributed run).
        init: fills the (C K, d) float32 tensor in place from the generator (each loss uses
            its paper's initialisation; the scale only matters through the optimiser, since
            every loss normalises the proxies).

    Subclasses implement ``compute(embeddings, labels, proxies) -> (loss, num_active)``;
    after each call ``num_active`` holds the number of items the loss was averaged over and
    ``active_unit`` names them.
    """

    active_unit = "samples"

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        proxies_per_class: int = 1,
        *,
        seed: int = 0,
        init: Callable[[Tensor, torch.Generator], object],
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("embedding_dim", embedding_dim),
            ("proxies_per_class", proxies_per_class),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.proxies_per_class = proxies_per_class
        self.seed = int(seed)
        weight = torch.empty(num_classes * proxies_per_class, embedding_dim)
        init(weight, torch.Generator().manual_seed(self.seed))
        self.proxies = nn.Parameter(weight)
        self.num_active = torch.zeros((), dtype=torch.long)

    def extra_repr(self) -> str:
        k = f", proxies_per_class={self.proxies_per_class}" if self.proxies_per_class > 1 else ""
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}{k}"

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        self_index: Tensor | None = None,
    ) -> Tensor:
        """embeddings (B, d) L2-normalised, labels (B,) in ``0..C-1``. Returns a scalar loss
        (float32, or float64 for float64 input). Raises ValueError for malformed inputs, NaN
        or inf (in the embeddings or the proxies), rows that are not unit vectors, labels
        out of range, or a reference set (proxy losses take none)."""
        if ref_emb is not None or ref_labels is not None or self_index is not None:
            raise ValueError(
                f"{type(self).__name__} compares embeddings with its class proxies and takes "
                "no reference set (ref_emb, ref_labels, self_index): a cross-batch memory or "
                "a gathered reference set does not apply to it"
            )
        check_inputs(embeddings, labels, None, None, None)
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings have {embeddings.shape[1]} columns, the proxies "
                f"embedding_dim={self.embedding_dim}"
            )
        dtype = torch.promote_types(embeddings.dtype, self.proxies.dtype)
        dtype = torch.promote_types(dtype, torch.float32)  # float32, or float64 in tests
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = embeddings.to(dtype)
            weight = self.proxies.to(dtype)  # a copy when the dtypes differ: never in place
            proxies = Proxies(weight, row_norms(weight))
            self.check_values(emb, labels, proxies.norms)
            loss, num_active = self.compute(emb, labels, proxies)
        self.num_active = num_active.detach()
        return loss

    def check_values(self, emb: Tensor, labels: Tensor, proxy_norms: Tensor) -> None:
        """NaN / inf, unit norms and the label range, read back in one host sync."""
        norms = row_norms(emb)
        stats = [*torch.aminmax(norms), proxy_norms.sum(), *torch.aminmax(labels)]
        low, high, proxy_sum, label_min, label_max = torch.stack(
            [s.double() for s in stats]
        ).tolist()
        if not math.isfinite(low + high):
            raise ValueError(
                "embeddings contain NaN or inf (check the model output / learning rate)"
            )
        if not math.isfinite(proxy_sum):
            raise ValueError(
                f"the proxies of {type(self).__name__} contain NaN or inf (the optimiser "
                "diverged: lower the loss parameters' learning rate, optim.loss_lr)"
            )
        check_unit_norms("embeddings", low, high)
        if label_min < 0 or label_max >= self.num_classes:
            raise ValueError(
                f"labels must lie in [0, num_classes={self.num_classes}), got "
                f"{int(label_min)}..{int(label_max)}: the loss holds one set of proxies per "
                "class, built for num_classes classes"
            )

    def compute(self, emb: Tensor, labels: Tensor, proxies: Proxies) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def cosine_loss(
    emb: Tensor,
    proxies: Proxies,
    scale: float,
    value_and_grad: Callable[[Tensor], tuple[Tensor, Tensor]],
) -> Tensor:
    """The loss ``value_and_grad(logits) -> (value, d value / d logits)`` of the (B, C K)
    logits ``scale * cos(x_i, p_j)``, differentiable in the embeddings (B, d, unit rows)
    and the proxies. value_and_grad runs without autograd and owns ``logits`` (it may
    overwrite them); see :func:`~deepmetric.losses._autograd.cosine_logits_loss`."""
    return cosine_logits_loss(emb, proxies.weight, proxies.norms, scale, value_and_grad)


def softmax_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    target: Tensor | None = None,
    target_slope: Tensor | None = None,
    exclude_target: bool = False,
) -> tuple[Tensor, Tensor]:
    """Mean over the B rows of the cross-entropy of logits z (B, C) with the target class
    ``labels`` (B,), and its derivative in ``logits`` (no autograd; ``logits`` are
    overwritten):

        L = 1/B sum_i ( LSE_c z_ic - z_iy )           z_iy replaced by target_i when given;
                                                       exclude_target: LSE over c != y only

    target (B,): the target logits (a margin applied to z_iy); target_slope (B,): their
    derivative d target_i / d z_iy (None = 1). ``exclude_target`` (needs C >= 2) leaves the
    target class out of the log-sum-exp, as in the original ProxyNCA.
    """
    b, c = logits.shape
    rows = torch.arange(b, device=logits.device)
    z = logits
    z_y = z[rows, labels] if target is None else target
    if exclude_target:
        z[rows, labels] = -math.inf
    elif target is not None:
        z[rows, labels] = target
    log_p = torch.log_softmax(z, 1)  # (B, C), computed in log space: never -inf by underflow
    if exclude_target:
        # LSE_{c != y} z_c = z_j - log_p_j for any j != y (here j = y + 1 mod C)
        other = (labels + 1) % c
        rows_loss = z[rows, other] - log_p[rows, other] - z_y
    else:
        rows_loss = -log_p[rows, labels]
    value = rows_loss.mean()
    # d L / d z_ic = (p_ic - [c = y_i]) / B with p the softmax (p_iy = 0 with
    # exclude_target); the target's entry times d target / d z_iy. Oracle:
    # tests/test_losses_proxy.py::test_matches_reference (values and gradients).
    grad = log_p.exp_()
    grad_y = grad[rows, labels] - 1.0
    if target_slope is not None:
        grad_y = grad_y * target_slope
    grad[rows, labels] = grad_y
    return value, grad.mul_(1.0 / b)
