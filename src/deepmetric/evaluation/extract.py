"""Embedding extraction: eval mode, no gradients, float32 output, optional AMP and flip TTA."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def extract_embeddings(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    flip: bool = False,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Embed every batch of ``loader`` with ``model`` in eval mode.

    Args:
        model: maps images (B, C, H, W) to embeddings (B, d). Its train/eval flags (of every
            submodule) are restored afterwards; it is not moved.
        loader: yields (images, labels) pairs (extra items after the labels are ignored).
        device: where images are sent (default: the model's device).
        amp_dtype: torch.bfloat16 / torch.float16 to run under autocast (the trainer maps
            ``train.amp`` to it: ``deepmetric.engine.amp_dtype``).
        flip: also embed the horizontally flipped images (last axis), average the two
            embeddings and L2-normalise the mean.
        progress: show a tqdm progress bar.

    Returns:
        embeddings (N, d) float32 and labels (N,) int64, both on the CPU, in loader order.
    """
    if amp_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"amp_dtype must be torch.bfloat16, torch.float16 or None: {amp_dtype}")
    device = _model_device(model) if device is None else torch.device(device)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    embeddings, labels = [], []
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="embedding", disable=not progress, leave=False):
                images, batch_labels = batch[0], batch[1]
                images = images.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    emb = model(images).float()
                    if flip:
                        emb = F.normalize(emb + model(images.flip(-1)).float(), dim=1)
                batch_labels = torch.as_tensor(batch_labels)
                if batch_labels.is_floating_point():
                    raise ValueError(f"labels must be integers, got dtype {batch_labels.dtype}")
                embeddings.append(emb.float().cpu())
                labels.append(batch_labels.reshape(-1).to(torch.int64).cpu())
    finally:
        for module, training in modes:
            module.training = training
    if not embeddings:
        raise ValueError("the loader yielded no batches")
    embeddings_t, labels_t = torch.cat(embeddings), torch.cat(labels)
    if labels_t.shape[0] != embeddings_t.shape[0]:
        raise ValueError(
            f"{labels_t.shape[0]} labels for {embeddings_t.shape[0]} embeddings: the loader must "
            "yield one label per image"
        )
    return embeddings_t, labels_t
