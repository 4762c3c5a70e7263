"""Gradient caching: the gradients of one batch of B images with the activations of one chunk
in memory (Gao, Zhang, Han, Callan, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup", RepL4NLP 2021; the "multistage back-propagation" of Patel, Tolias, Matas,
"Recall@k Surrogate Loss with Large Batches and Similarity Mixup", CVPR 2022)::

    for each chunk c:  rng[c] = RNG state;  emb[c] = model(c)  without a graph     # pass 1
    E = cat(emb) as a leaf;  loss = loss_of(E);  scale(loss).backward()           # G = dL/dE
    for each chunk c:  restore rng[c];  model(c).backward(G[c])                   # pass 2

Pass 2 adds up, chunk by chunk, exactly the parameters' gradients of the loss on the whole
batch: the loss sees all B embeddings (and under torchrun the gathered global batch, as the
plain step does), and each chunk's second forward draws the same random numbers as its first
(dropout, stochastic depth). Exactness has two limits, both the plain step's too at a smaller
batch: BatchNorm in training mode normalises with each chunk's statistics (frozen BatchNorm,
``model.freeze_bn``, is exact), and its running statistics are updated once per chunk in
pass 1 (pass 2 restores them). Cost: one more forward of the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["chunked_backward"]


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed_rng(state: tuple[Tensor, Tensor | None], device: torch.device) -> Iterator[None]:
    """Run the body with the RNG as it was in ``state``; the RNG is left as it was before."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _no_sync_unless(last: bool, model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP: gradients are all-reduced once, with the last chunk's backward."""
    no_sync = getattr(model, "no_sync", None)
    return contextlib.nullcontext() if last or no_sync is None else no_sync()


def chunked_backward(
    model: nn.Module,
    images: Tensor,
    chunk_size: int,
    loss_of: Callable[[Tensor], Tensor],
    scale: Callable[[Tensor], Tensor],
    amp: torch.dtype | None = None,
) -> Tensor:
    """Back-propagate ``loss_of(model(images))`` into the parameters, ``chunk_size`` images
    at a time; returns the loss (detached).

    Args:
        model: the network (DDP-wrapped or not), in the mode it trains in.
        images: (B, C, H, W) this rank's batch.
        chunk_size: images per forward (the last chunk may be smaller).
        loss_of: (B, d) float32 embeddings -> scalar loss (gathering across ranks inside, as
            the plain step does); the loss's own parameters get their gradient here.
        scale: the loss scaling of AMP float16 (``GradScaler.scale``; identity otherwise),
            applied once: pass 2 back-propagates the already scaled gradient.
        amp: autocast dtype, or None.
    """
    chunks = images.split(chunk_size)
    states, parts = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state(chunk.device))
            with torch.autocast(chunk.device.type, dtype=amp, enabled=amp is not None):
                parts.append(model(chunk).float())
    embeddings = torch.cat(parts).requires_grad_()
    loss = loss_of(embeddings)
    scale(loss).backward()
    cached = embeddings.grad if embeddings.grad is not None else torch.zeros_like(embeddings)

    buffers = [b.clone() for b in model.buffers()]  # BatchNorm statistics after pass 1
    start = 0
    for i, (chunk, state) in enumerate(zip(chunks, states)):
        rows = slice(start, start + chunk.shape[0])
        start = rows.stop
        with _no_sync_unless(i == len(chunks) - 1, model), _replayed_rng(state, chunk.device):
            with torch.autocast(chunk.device.type, dtype=amp, enabled=amp is not None):
                out = model(chunk).float()
            out.backward(cached[rows])
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
    return loss.detach()
