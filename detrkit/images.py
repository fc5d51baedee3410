"""Reading images of any common mode into RGB, and the inference-time resize, normalisation and padding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torch import Tensor


def read_rgb(path: str | Path) -> Image.Image:
    """Open ``path`` as an RGB PIL image. Grayscale, palette, CMYK and RGBA become RGB (alpha is dropped: COCO
    annotations refer to the colour channels). Missing or unreadable files raise an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise OSError(f"cannot read image file {path}: {e}") from e


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns when a palette image with transparency goes straight to RGB
    return im.convert("RGB")


def load_image_tensor(image: Any) -> Tensor:
    """A PIL image, a path, a ``(3,H,W)`` tensor (uint8, or float in [0, 1]) or an ``(H,W,3)`` uint8 array →
    ``(3,H,W)`` float32 in [0, 1]."""
    if isinstance(image, (str, Path)):
        image = read_rgb(image)
    if isinstance(image, Image.Image):
        return TF.to_dtype(TF.pil_to_tensor(to_rgb(image)), torch.float32, scale=True)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"a numpy image must be (H, W, 3) or (H, W), got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1)
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be (3, H, W), got shape {tuple(image.shape)}")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        if image.dtype == torch.uint8:
            return TF.to_dtype(image, torch.float32, scale=True)
        if not image.is_floating_point():
            raise ValueError(f"an image tensor must be uint8 or float in [0, 1], got {image.dtype}")
        return image.float()
    raise TypeError(f"cannot read an image from {type(image).__name__}: use a PIL image, a path, a tensor or an array")


def resized_shape(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """DETR's resize rule: shorter side to ``size`` unless the longer side would exceed ``max_size``."""
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if height <= width:
        return size, int(round(size * width / height))
    return int(round(size * height / width)), size


def pad_batch(images: Sequence[Tensor], size_divisibility: int = 32) -> tuple[Tensor, Tensor]:
    """Pad ``(3,h_i,w_i)`` images top-left into ``pixel_values (B,3,H,W)`` (zeros) and ``padding_mask (B,H,W)``
    (True on padding), H and W rounded up to a multiple of ``size_divisibility``."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    if size_divisibility > 1:
        h = int(math.ceil(h / size_divisibility) * size_divisibility)
        w = int(math.ceil(w / size_divisibility) * size_divisibility)
    pixel_values = images[0].new_zeros((len(images), 3, h, w))
    padding_mask = torch.ones((len(images), h, w), dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        pixel_values[i, :, : im.shape[1], : im.shape[2]].copy_(im)
        padding_mask[i, : im.shape[1], : im.shape[2]] = False
    return pixel_values, padding_mask


def collate_images(
    images: Sequence[Tensor],
    *,
    size: int,
    max_size: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    size_divisibility: int = 32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Inference preprocessing of ``(3,H,W)`` [0, 1] images: resize, normalise, pad.

    Returns ``pixel_values (B,3,H,W)``, ``padding_mask (B,H,W)`` and ``orig_sizes (B,2)`` as [h, w].
    """
    processed, orig = [], []
    for im in images:
        h, w = im.shape[-2:]
        orig.append((h, w))
        im = TF.resize(im, list(resized_shape(h, w, size, max_size)), antialias=True)
        processed.append(TF.normalize(im, list(mean), list(std)))
    pixel_values, padding_mask = pad_batch(processed, size_divisibility)
    return pixel_values, padding_mask, torch.tensor(orig, dtype=torch.long)
