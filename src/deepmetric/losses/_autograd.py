"""Custom autograd functions the pair losses are built from (private to ``deepmetric.losses``).

Each backward below is written by hand; its derivation is given next to it together with the
test that compares it with autograd through the slow float64 loop oracles of
tests/loss_reference.py (values and gradients).

- :func:`gram`: S = X X^T for in-batch pairs, backward in one matmul.
- :func:`cross_similarity`: S = A R^T against a reference set.
- :func:`masked_logsumexp`: log-sum-exp over the masked entries of each row.
- :func:`with_gradient`: a scalar computed without autograd, made differentiable from its
  derivative in S, which the loss writes down.
- :func:`cosine_logits_loss`: a loss of the logits s cos(x_i, w_j) against normalised rows
  w_j (the proxy losses), from its derivative in the logits, which the loss writes down.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# CPU only: a gradient matrix of at least SPARSE_GRAD_MIN_SIZE entries with fewer than
# SPARSE_GRAD_DENSITY of them non-zero is multiplied as a sparse matrix (gain and the case it
# serves, a hinge loss against a cross-batch memory: benchmarks/RESULTS.md, "Special paths").
SPARSE_GRAD_DENSITY = 0.01
SPARSE_GRAD_MIN_SIZE = 2**18
# Every SPARSE_SAMPLE_STEP-th row is counted first; only a sample under twice the density
# threshold leads to the full count (dense gradients, NCA or MS, stop after 1/16 of a pass).
SPARSE_SAMPLE_STEP = 16


def grad_matmul(grad: Tensor, x: Tensor) -> Tensor:
    """grad (B, M) @ x (M, d), as a sparse product on the CPU when grad is mostly exact zeros.

    Hinge losses against a large reference set (contrastive, triplet, margin with a cross-batch
    memory) leave most entries of their gradient at exactly 0. GPUs always take the dense
    matmul (the count would cost a host sync).
    Checked by tests/test_losses.py::test_sparse_gradient_path_matches_reference.
    """
    if grad.device.type == "cpu" and grad.dim() == 2 and grad.numel() >= SPARSE_GRAD_MIN_SIZE:
        sample = grad[::SPARSE_SAMPLE_STEP]
        if int(torch.count_nonzero(sample)) < SPARSE_GRAD_DENSITY * sample.numel() * 2:
            if int(torch.count_nonzero(grad)) < SPARSE_GRAD_DENSITY * grad.numel():
                return torch.sparse.mm(grad.to_sparse(), x)
    return grad @ x


class _Gram(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x @ x.T

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # S_ij = <x_i, x_j>, so dL/dx_i = sum_j G_ij x_j + sum_j G_ji x_j: dL/dX = (G + G^T) X,
        # one matmul where autograd's x @ x.T takes two. G^T is copied contiguously before G
        # is added (a strided read of the transpose inside the addition is slow on the CPU).
        # Checked by tests/test_losses.py::test_matches_reference (in-batch cases, d/d embeddings).
        (x,) = ctx.saved_tensors
        return grad_matmul(grad.T.contiguous().add_(grad), x)


def gram(x: Tensor) -> Tensor:
    """(B, d) -> (B, B) similarities x x^T, differentiable in x."""
    return _Gram.apply(x)


class _CrossSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors: Tensor, refs: Tensor) -> Tensor:
        ctx.save_for_backward(anchors, refs)
        return anchors @ refs.T

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        # S = A R^T: dL/dA = G R and dL/dR = G^T A (autograd's own rule, here through
        # grad_matmul). Checked by tests/test_losses.py::test_matches_reference (cases with
        # references, d/d embeddings and d/d ref_emb).
        anchors, refs = ctx.saved_tensors
        grad_anchors = grad_matmul(grad, refs) if ctx.needs_input_grad[0] else None
        grad_refs = grad_matmul(grad.T, anchors) if ctx.needs_input_grad[1] else None
        return grad_anchors, grad_refs


def cross_similarity(anchors: Tensor, refs: Tensor) -> Tensor:
    """(B, d), (M, d) -> (B, M) similarities anchors refs^T, differentiable in both."""
    return _CrossSimilarity.apply(anchors, refs)


# masked_logsumexp clamps its shifted exponents below at EXP_FLOOR before exp: e^-80 ~ 2e-35
# relative to the largest term changes no float32 sum, and on the CPU exp of a far-negative
# input (a masked entry at -1e30, or an underflowing one) takes a slow path (gain, for a
# loss whose mask leaves out most entries against a cross-batch memory: benchmarks/RESULTS.md,
# "Special paths").
EXP_FLOOR = -80.0


def exp_nonpositive_(x: Tensor) -> Tensor:
    """In place e^x for exponents x <= 0 (already shifted by their maximum), clamped below at
    EXP_FLOOR."""
    return x.clamp_(min=EXP_FLOOR).exp_()


class _MaskedLogSumExp(torch.autograd.Function):
    """Forward in one reused (B, M) buffer, which then holds the masked softmax: the only
    tensor kept for backward (autograd's graph of the same operations keeps four)."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, dim: int) -> Tensor:
        off = ~mask
        buf = x.detach().masked_fill(off, -1e30)
        shift = buf.amax(dim, keepdim=True)  # masked maximum: exponents below are <= 0
        exp_nonpositive_(buf.sub_(shift)).masked_fill_(off, 0.0)
        total = buf.sum(dim, keepdim=True).clamp_(min=1e-30)
        ctx.save_for_backward(buf.div_(total))
        ctx.dim = dim
        return (total.log_() + shift).squeeze(dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        # L = log sum_{k in mask} e^{x_k}: dL/dx_j = e^{x_j} / sum_k e^{x_k} (the masked
        # softmax) on the mask, 0 off it. Checked by tests/test_losses.py::test_matches_reference
        # (the lifted configs).
        (softmax,) = ctx.saved_tensors
        return softmax * grad.unsqueeze(ctx.dim), None, None


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int = -1, include_zero: bool = False) -> Tensor:
    """log(sum_{mask} e^x) along ``dim``; with ``include_zero`` log(1 + sum_{mask} e^x).

    x: float tensor, mask: bool tensor of x's shape. Shifted by the (detached) masked maximum;
    masked terms are zeroed after the exp. A slice with no True entry gives about -1e30 (0 with
    ``include_zero``) and zero gradient: callers mark such slices invalid.
    """
    lse = _MaskedLogSumExp.apply(x, mask, dim)
    return F.softplus(lse) if include_zero else lse


class _WithGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sim: Tensor, value: Tensor, grad_sim: Tensor) -> Tensor:
        ctx.save_for_backward(grad_sim)
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        # chain rule: dL/dS = (upstream scalar gradient) x d value / dS. The derivative itself
        # is derived, and its oracle test named, in each loss that calls with_gradient.
        (grad_sim,) = ctx.saved_tensors
        return grad_sim * grad, None, None


def with_gradient(sim: Tensor, value: Tensor, grad_sim: Tensor) -> Tensor:
    """The 0-d ``value`` made differentiable in ``sim`` (B, M) with d value / d sim =
    ``grad_sim`` (B, M), both computed by the caller without autograd.

    For losses that are a sum of simple terms of each similarity, writing the derivative down
    takes a few full-matrix passes where autograd's graph of the same terms takes several times
    more time and memory.
    """
    return _WithGradient.apply(sim, value, grad_sim)


class _CosineLogitsLoss(torch.autograd.Function):
    """The loss ``value_and_grad(logits)`` of cosine logits s <x_i, w_j> / ||w_j||: one
    matmul forward, two back, and no normalised copy of W (the column scale is applied to
    the (B, N) logits, and the normalisation's backward is one projection of dL/dW)."""

    @staticmethod
    def forward(ctx, emb: Tensor, weight: Tensor, norms: Tensor, scale: float, value_and_grad):
        col = scale / norms.clamp(min=1e-12)  # (N,) s / ||w_j||
        logits = (emb @ weight.T).mul_(col)  # (B, N), handed over: the callee may reuse it
        value, grad = value_and_grad(logits)
        # G' = G c (columns scaled), in place: the callee's buffer, read only by backward
        ctx.save_for_backward(emb, weight, grad.mul_(col), norms)
        return value

    @staticmethod
    def backward(ctx, up: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        # logits_ij = c_j <x_i, w_j> with c_j = s / ||w_j||. With G = d value / d logits and
        # G' = G c (columns scaled):
        #   dL/dx_i = sum_j G'_ij w_j                                 = (G' W)_i
        #   dL/dw_j = sum_j G_ij c_j (x_i - <x_i, w_j> w_j / ||w_j||^2)
        #           = D_j - (<w_j, D_j> / ||w_j||^2) w_j,  D = G'^T X   (no radial part)
        # The upstream gradient multiplies the (B, d) factors, not the (B, N) G' (a fresh
        # B x N buffer would cost more than the rest of the backward but the matmuls).
        # Checked by tests/test_losses_proxy.py::test_matches_reference (d/d embeddings and
        # d/d proxies against autograd through the float64 loop oracles).
        emb, weight, grad, norms = ctx.saved_tensors
        d_emb = (grad @ weight).mul_(up) if ctx.needs_input_grad[0] else None
        d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = grad.T @ (emb * up)  # (N, d) D times the upstream gradient
            # row dot products as a batched (1 x d)(d x 1) product: no (N, d) temporary, and
            # 2-3x faster than linalg.vecdot on the CPU
            dots = torch.bmm(weight.unsqueeze(1), d_weight.unsqueeze(2)).view(-1)
            coef = dots / norms.clamp(min=1e-12).square()
            d_weight.addcmul_(weight, coef[:, None], value=-1.0)
        return d_emb, d_weight, None, None, None


def cosine_logits_loss(
    emb: Tensor, weight: Tensor, norms: Tensor, scale: float, value_and_grad
) -> Tensor:
    """``value`` of ``value_and_grad(logits) -> (value, grad)`` at the (B, N) logits
    ``scale * <emb_i, weight_j> / norms_j``, differentiable in ``emb`` (B, d) and ``weight``
    (N, d) through ``grad`` = d value / d logits, which the callee writes down.

    ``norms`` (N,): the rows' norms of ``weight``, computed by the caller without gradient.
    value_and_grad runs without autograd; it owns ``logits`` (it may overwrite them, e.g.
    reuse them as ``grad``).
    """
    return _CosineLogitsLoss.apply(emb, weight, norms, float(scale), value_and_grad)
