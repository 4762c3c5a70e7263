"""Small JPEG thumbnails as ``data:`` URIs, so that a report is one file that opens offline."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["Thumbnails", "thumbnail_uri", "to_pil"]


def to_pil(image: Any) -> Image.Image:
    """A PIL RGB image of a PIL image, or of a (C, H, W) float tensor / array in [0, 1]
    (C = 1 or 3: what ``load_image`` of a deepmetric data set returns)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array.transpose(1, 2, 0)
    array = np.clip(np.rint(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array).convert("RGB")


def thumbnail_uri(image: Any, size: int, quality: int = 75) -> str:
    """``data:image/jpeg;base64,...`` of ``image`` scaled to fit ``size`` x ``size`` (small
    images such as 32 x 32 digits are enlarged, so they can be seen)."""
    pil = to_pil(image)
    scale = size / max(pil.size)
    shape = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    if shape != pil.size:
        pil = pil.resize(shape, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    pil.save(buffer, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Thumbnails:
    """The thumbnails of a report, each image loaded and encoded once, within a byte budget.

    Args:
        load_image: key -> image (PIL, or a (C, H, W) tensor in [0, 1]).
        size: longest side in pixels; budget: total characters of the data URIs.
    """

    def __init__(self, load_image: Callable[[str], Any], size: int, budget: int) -> None:
        self.load_image, self.size, self.budget = load_image, size, budget
        self.uris: dict[str, str] = {}
        self.used = 0
        self.refused = 0  # images left out because the budget was spent

    def add(self, keys: Iterable[str], *, required: bool = True) -> None:
        """Encode the images of ``keys`` not yet encoded; beyond the budget, those that are not
        ``required`` are left out (counted in ``refused``)."""
        for key in keys:
            if key in self.uris:
                continue
            if not required and self.used >= self.budget:
                self.refused += 1
                continue
            uri = thumbnail_uri(self.load_image(key), self.size)
            self.uris[key] = uri
            self.used += len(uri)
