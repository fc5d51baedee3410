"""Reading images of any common mode into RGB, and padding images into a batch.

Layer: building blocks. Imports torch, torchvision and Pillow only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor


def read_rgb(path: str | Path) -> Image.Image:
    """Open an image file as an RGB PIL image; a missing or unreadable file raises an error naming it.

    Grayscale, palette, CMYK and RGBA files become RGB. For RGBA this *discards* the alpha channel (the stored
    colours of transparent pixels show) rather than compositing onto a background: COCO has no transparent
    images, and any choice of background would be arbitrary.

    The EXIF orientation tag is deliberately ignored: COCO annotations (and most tools that write COCO files)
    are in the stored pixel grid, so rotating the image by its EXIF tag would misalign every box.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now, inside the try, so truncated files are reported here
            return to_rgb(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:  # includes UnidentifiedImageError and truncated files
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


def pad_batch(images: Sequence[Tensor], size_divisibility: int = 32) -> tuple[Tensor, Tensor]:
    """Pad ``(C,h_i,w_i)`` images top-left into ``pixel_values (B,C,H,W)`` (zeros) and ``padding_mask (B,H,W)``
    (True on padding), H and W rounded up to a multiple of ``size_divisibility`` (the backbone's stride, so an
    image's valid feature cells do not depend on its batch-mates)."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    if size_divisibility > 1:
        h = int(math.ceil(h / size_divisibility) * size_divisibility)
        w = int(math.ceil(w / size_divisibility) * size_divisibility)
    pixel_values = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    padding_mask = torch.ones((len(images), h, w), dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        pixel_values[i, :, : im.shape[1], : im.shape[2]].copy_(im)
        padding_mask[i, : im.shape[1], : im.shape[2]] = False
    return pixel_values, padding_mask
