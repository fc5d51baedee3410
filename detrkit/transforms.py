"""DETR's data augmentation on ``torchvision.transforms.v2``.

A sample is ``(image, target)``: ``image`` a PIL image (or ``tv_tensors.Image``), ``target`` a dict whose
``boxes`` are ``tv_tensors.BoundingBoxes`` in absolute XYXY pixels with ``canvas_size=(H, W)``, ``masks``
(optional) a ``tv_tensors.Mask`` (N, H, W), one per box, and ``labels``/``iscrowd``/``area`` (and ``isthing``
for panoptic data) plain (N,) tensors. v2 moves boxes and masks with the image (the same resize, flip and crop);
plain tensors and other values pass through untouched. When a box is dropped, its mask and per-box fields go
with it (:func:`per_box_target_fields`).

The pipelines end with :class:`ConvertBoxesToNormalizedCxcywh`, which turns the ``BoundingBoxes`` into a
*plain* (N, 4) tensor of normalised (cx, cy, w, h). The rule the dataset relies on is therefore: a
``BoundingBoxes`` holds absolute pixels, a plain tensor holds normalised cxcywh.

Differences from the official DETR transforms (``facebookresearch/detr``, ``datasets/transforms.py``):

- Resizing uses DETR's own output-size rule (:func:`detr_resize_size`), not ``v2.Resize(size, max_size=...)``:
  when the longer side is capped, v2 floors the shorter side and sets the longer side to exactly ``max_size``,
  whereas DETR rounds the shorter side and floors the longer one (e.g. 100×400 at 800/1333: DETR gives
  333×1332, v2 333×1333). Matching DETR keeps input sizes identical to the reference implementations.
- Degenerate boxes are dropped by ``v2.SanitizeBoundingBoxes``, which removes boxes under 1 px wide or high
  (or 1 px² in area) in the final image; DETR's crop drops only boxes of zero width or height.
- Masks are resized with nearest-neighbour interpolation (v2's rule for ``Mask``), as DETR does. Objects are
  kept or dropped by their boxes, as in DETR: after a crop, an object whose box still meets the crop but whose
  (non-convex) mask does not keeps an empty mask, and a box is not shrunk to its cropped mask.
- ``area`` is passed through unchanged (the annotation's area in the original image's pixels); DETR rescales
  it with the image. Nothing in training reads it; evaluation reads areas from the annotation file.
- Randomness comes from torch's generator (``torch.manual_seed``), as in every v2 transform, not from
  Python's ``random``.

Layer: building blocks. Imports torch and torchvision only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# DETR's multi-scale training sizes for the shorter side (paper Sec. 4: shortest side 480 to 800 pixels).
DEFAULT_SCALES: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)

# Per-box target fields dropped together with degenerate boxes. Masks are not listed: SanitizeBoundingBoxes drops
# every tv_tensors.Mask along with the boxes by its type (a Mask returned as a "label" would lose that type).
_PER_BOX_FIELDS = ("labels", "iscrowd", "area", "isthing")


def detr_resize_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output ``(height, width)`` for resizing the shorter side to ``size``, DETR's rule.

    If the longer side would then exceed ``max_size``, the shorter side becomes
    ``round(max_size * short / long)`` and the longer side follows the aspect ratio, floored (so it may land
    one pixel under ``max_size``). This is ``get_size_with_aspect_ratio`` in the official DETR code, kept
    exactly so that image sizes, and hence model outputs, match the reference implementations.
    """
    if size <= 0:
        raise ValueError(f"resize size must be positive, got {size}")
    short, long = float(min(height, width)), float(max(height, width))
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class RandomShorterSideResize(v2.Transform):
    """Resize the shorter side to a size drawn from ``sizes``, the longer side capped at ``max_size``.

    DETR's ``RandomResize``; with a single size it is the deterministic evaluation resize. Output sizes follow
    :func:`detr_resize_size`; the resizing of image, boxes and masks is v2's ``F.resize``.
    """

    def __init__(self, sizes: Sequence[int], max_size: int | None = None, *, antialias: bool = True) -> None:
        super().__init__()
        sizes = [int(s) for s in sizes]
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"sizes must be a non-empty sequence of positive ints, got {sizes}")
        if max_size is not None and max_size <= 0:
            raise ValueError(f"max_size must be positive or None, got {max_size}")
        self.sizes = sizes
        self.max_size = max_size
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        # one size (evaluation) draws nothing: preprocessing must not advance the global RNG that dropout uses
        size = self.sizes[int(torch.randint(len(self.sizes), ()))] if len(self.sizes) > 1 else self.sizes[0]
        return {"size": list(detr_resize_size(height, width, size, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=self.antialias)


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose height and width are each uniform in ``[min_size, max_size]``.

    DETR's ``RandomSizeCrop``. Both bounds are clamped to the image, so an image smaller than ``min_size`` is
    cropped to its own size along that side (DETR would raise). Boxes are shifted and clipped to the crop by
    v2; boxes left outside are removed by a later ``SanitizeBoundingBoxes``.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def _draw(self, extent: int) -> int:
        high = min(extent, self.max_size)
        low = min(self.min_size, high)
        return int(torch.randint(low, high + 1, ()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_w = self._draw(width)
        crop_h = self._draw(height)
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def boxes_to_normalized_cxcywh(boxes: tv_tensors.BoundingBoxes) -> torch.Tensor:
    """Absolute boxes of any v2 format → plain float32 (N, 4) normalised (cx, cy, w, h) of their canvas."""
    height, width = boxes.canvas_size
    cxcywh = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
    return cxcywh.as_subclass(torch.Tensor).to(torch.float32) / scale


class ConvertBoxesToNormalizedCxcywh(v2.Transform):
    """``BoundingBoxes`` → plain (N, 4) normalised cxcywh tensor, the format the models and the loss use.

    Put it last: once boxes are a plain tensor, later v2 transforms no longer move them with the image.
    """

    _transformed_types = (tv_tensors.BoundingBoxes,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return boxes_to_normalized_cxcywh(inpt)


def per_box_target_fields(sample: Any) -> tuple[torch.Tensor, ...]:
    """``labels_getter`` for ``v2.SanitizeBoundingBoxes``: every per-box tensor of the target.

    Without it only ``labels`` would be filtered and ``iscrowd``/``area``/``isthing`` (panoptic data) would fall
    out of step with the boxes; ``masks`` (a ``tv_tensors.Mask``) are dropped by ``SanitizeBoundingBoxes`` itself.
    A module-level function (not a lambda) so that pipelines pickle into DataLoader workers.
    """
    target = sample[1] if isinstance(sample, (tuple, list)) and len(sample) == 2 else sample
    if not isinstance(target, dict):
        return ()
    return tuple(target[k] for k in _PER_BOX_FIELDS if isinstance(target.get(k), torch.Tensor) and target[k].ndim >= 1)


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def train_transforms(
    *,
    scales: Sequence[int] = DEFAULT_SCALES,
    max_size: int | None = 1333,
    crop_resize: Sequence[int] | None = (400, 500, 600),
    crop_size: tuple[int, int] = (384, 600),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """DETR's training augmentation (paper Sec. 4; ``make_coco_transforms("train")`` in the official code).

    Horizontal flip (p=0.5), then with equal probability either a multi-scale resize of the shorter side to
    one of ``scales`` (longer side ≤ ``max_size``), or a resize to one of ``crop_resize`` (uncapped, as in
    DETR), a random crop of ``crop_size = (min, max)`` and the same multi-scale resize. Boxes left empty by
    the crop are dropped with their labels, iscrowd, area and masks; the image is converted to float,
    normalised with ``mean``/``std``, and boxes become normalised cxcywh.

    ``crop_resize=None`` turns the crop branch off: every image then gets the multi-scale resize.

    For tiny images pick sizes to match, e.g. ``scales=(64, 80, 96), max_size=160, crop_resize=(64, 80),
    crop_size=(48, 64)``.
    """
    crop_min, crop_max = crop_size
    resize: v2.Transform = RandomShorterSideResize(scales, max_size)
    if crop_resize is not None:
        resize_crop_resize = v2.Compose(
            [
                RandomShorterSideResize(crop_resize),
                RandomSizeCrop(crop_min, crop_max),
                RandomShorterSideResize(scales, max_size),
            ]
        )
        resize = v2.RandomChoice([resize, resize_crop_resize], p=[0.5, 0.5])
    # The geometric steps work on the PIL image, so resizing is PIL's antialiased bilinear, as in the official
    # DETR; the tensor conversion comes after them.
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            resize,
            # After every geometric step, so it sees the final boxes (the crop clips them to the image).
            v2.SanitizeBoundingBoxes(labels_getter=per_box_target_fields),
            *_to_normalized_tensor(mean, std),
            ConvertBoxesToNormalizedCxcywh(),
        ]
    )


def eval_transforms(
    *,
    size: int = 800,
    max_size: int | None = 1333,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """DETR's evaluation preprocessing: shorter side to ``size`` (longer ≤ ``max_size``), normalise, cxcywh.

    No box is dropped: evaluation targets must stay complete even when a resize shrinks a box under a pixel.
    """
    return v2.Compose(
        [
            RandomShorterSideResize([size], max_size),
            *_to_normalized_tensor(mean, std),
            ConvertBoxesToNormalizedCxcywh(),
        ]
    )
