"""Reading images of any common mode into RGB, reading image headers, and padding images into a batch.

One rule for every reader (training, evaluation, ``predict``, ``detrkit doctor``): the **stored pixel grid** is the
image. The EXIF orientation tag is never applied: COCO annotations (and most tools that write COCO files) are in
the stored grid, so rotating an image by its tag would misalign every box. ``predict`` follows the same rule, so
its boxes are in the stored grid of the file too (a phone photo shown upright by a viewer is detected, and drawn,
as stored: sideways when its tag says 90°).

Layer: building blocks. Imports torch, torchvision, numpy and Pillow only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor

# PIL's modes for 16-bit grayscale (PNG, TIFF); older Pillow versions open 16-bit PNGs as "I".
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
EXIF_ORIENTATION = 0x0112  # the TIFF/EXIF tag; values 5-8 mean a 90° or 270° rotation (width and height swap)


class ImageTooLargeError(ValueError):
    """An image over Pillow's decompression-bomb limit; the message names the file and what to do."""


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding the pixels (:func:`read_header`).

    Attributes:
        width, height: the stored pixel grid's size (the one detrkit uses).
        mode: Pillow's mode (``RGB``, ``L``, ``I;16`` ...).
        format: Pillow's format name (``PNG``, ``JPEG`` ...).
        orientation: the EXIF orientation tag (1 when absent): 2-8 mean a viewer flips or rotates the picture.
    """

    width: int
    height: int
    mode: str
    format: str
    orientation: int = 1

    @property
    def swaps_sides(self) -> bool:
        """True when the EXIF tag rotates by 90° or 270°: a viewer shows the image as height × width."""
        return self.orientation in (5, 6, 7, 8)

    @property
    def sixteen_bit(self) -> bool:
        return self.mode in SIXTEEN_BIT_MODES or (self.mode == "I" and self.format == "PNG")


def _too_large(path: Path, error: Exception) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"image file {path} is too large to decode safely: {error} Downscale it (detrkit resizes images to about "
        f"800 x 1333 pixels anyway), or, if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS before reading it "
        f"(Pillow refuses twice that, now {2 * Image.MAX_IMAGE_PIXELS} pixels, as a possible decompression bomb)"
    )


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is metadata detrkit ignores anyway, not a reason to refuse the image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def read_header(path: str | Path) -> ImageHeader:
    """The header of an image file (size, mode, EXIF orientation), without decoding its pixels.

    Raises ``FileNotFoundError``, ``OSError`` (not an image / unreadable header) or :class:`ImageTooLargeError`,
    each naming the file. A file whose pixel data is truncated passes here (only the header is read).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            return ImageHeader(im.width, im.height, im.mode, im.format or "", _orientation(im))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise _too_large(path, e) from None
    except (OSError, SyntaxError, ValueError) as e:  # includes UnidentifiedImageError and folders
        raise OSError(f"cannot read image file {path}: {e}") from e


def read_rgb(path: str | Path) -> Image.Image:
    """Open an image file as an RGB PIL image; a missing, unreadable or too large file raises an error naming it.

    Conversions (:func:`to_rgb`): grayscale (8-bit, 16-bit, 1-bit) is replicated into the three channels, 16-bit
    values scaled to 8 bits (÷257); palette, CMYK and other colour modes go through Pillow's conversion. Alpha
    (RGBA, LA, palette transparency) is *discarded* (the stored colours of transparent pixels show) rather than
    composited onto a background: COCO has no transparent images, and any choice of background would be arbitrary.

    The EXIF orientation tag is deliberately ignored (the module docstring says why), here and in ``predict``.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now, inside the try, so truncated files are reported here
            return to_rgb(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise _too_large(path, e) from None
    except (OSError, SyntaxError, ValueError) as e:  # includes UnidentifiedImageError and truncated files
        raise OSError(f"cannot read image file {path}: {e}") from e


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as an RGB image (see :func:`read_rgb` for the conversions); ``ValueError`` for a mode Pillow cannot
    convert."""
    if im.mode == "RGB":
        return im
    if im.mode in SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
        # Pillow's own conversion clips these to 0..255 (a 16-bit image comes out almost white): scale instead.
        return Image.fromarray(_gray_to_uint8(im)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns when a palette image with transparency goes straight to RGB
    try:
        return im.convert("RGB")
    except ValueError:  # premultiplied modes (La, RGBa) convert only through RGBA
        try:
            return im.convert("RGBA").convert("RGB")
        except ValueError as e:
            raise ValueError(f"cannot convert image mode {im.mode!r} to RGB: {e}") from e


def _gray_to_uint8(im: Image.Image) -> np.ndarray:
    """A one-channel 16-bit, 32-bit integer or float image → (H, W) uint8.

    16-bit images (``I;16*``, and PNGs opened as ``I``) are divided by 257, so 0..65535 maps onto 0..255 exactly.
    Otherwise the values' range decides: floats within [0, 1] are multiplied by 255, values within 0..255 kept,
    within 0..65535 taken as 16-bit, larger ones divided by the image's maximum / 255.
    """
    a = np.nan_to_num(np.asarray(im).astype(np.float32))  # (H, W)
    top = float(a.max()) if a.size else 0.0
    if im.mode in SIXTEEN_BIT_MODES or (im.mode == "I" and im.format == "PNG"):
        scale = 257.0
    elif im.mode == "F" and top <= 1.0:
        scale = 1 / 255
    elif top <= 255:
        scale = 1.0
    elif top <= 65535:
        scale = 257.0
    else:
        scale = top / 255
    return np.clip(np.rint(a / scale), 0, 255).astype(np.uint8)


def load_image_tensor(image: Any) -> Tensor:
    """A PIL image, a path, a ``(3,H,W)`` tensor (uint8, or float in [0, 1]) or an ``(H,W,3)`` uint8 array →
    ``(3,H,W)`` float32 in [0, 1]. Paths and PIL images go through :func:`read_rgb`'s rules (stored pixel grid,
    EXIF orientation ignored; 16-bit scaled; alpha discarded)."""
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
