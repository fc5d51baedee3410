"""COCO-format detection data: the dataset, its targets and the batch collation.

The annotation file is read with plain ``json`` and validated once, up front, so a malformed file fails when
the dataset is built (naming the file and the offending entry) rather than halfway through an epoch.

Target of one image, as returned by :class:`CocoDetection` (N objects kept, H×W the image after transforms):

- ``boxes`` (N, 4) float32: normalised (cx, cy, w, h) relative to the transformed image
- ``labels`` (N,) int64: contiguous labels 0..K-1 (see :class:`detrkit.labels.LabelMap`)
- ``image_id`` int; ``orig_size`` (2,) int64 [h, w] of the file as loaded; ``size`` (2,) int64 [H, W]
- ``iscrowd`` (N,) int64 (all zero: crowd regions are not training objects); ``area`` (N,) float32, the
  annotation's ``area`` in original-image pixels
- ``masks`` (N, H, W) bool, only with ``return_masks=True``

Layer: building blocks. May import ``images``, ``labels`` and ``transforms``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from detrkit.images import pad_batch, read_rgb
from detrkit.labels import LabelMap
from detrkit.transforms import boxes_to_normalized_cxcywh

Sample = tuple[torch.Tensor, dict[str, Any]]


class CocoFormatError(ValueError):
    """The annotation file is not valid COCO instances JSON; the message names the file and the entry."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _decode_segmentation(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """COCO ``segmentation`` (polygons, uncompressed or compressed RLE) → (height, width) uint8 mask."""
    # Imported here: only mask users pay for the extension module.
    from faster_coco_eval.core import mask as mask_utils

    if isinstance(segmentation, list):
        # Polygons are flat [x1, y1, x2, y2, ...] lists. Fewer than 3 points enclose nothing, and a 4-number
        # list would be read as a *box* by frPyObjects, so such polygons are skipped.
        polygons = [[float(v) for v in p] for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise CocoFormatError(
                f"{where}: RLE size {list(segmentation['size'])} does not match the image [h, w] = [{height}, {width}]"
            )
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE (COCO uses it for crowd regions)
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(counts, (str, bytes)):  # compressed RLE string, decodable as is
            rle = {"size": [height, width], "counts": counts}
        else:
            raise CocoFormatError(f"{where}: RLE counts must be a list or a string, got {type(counts).__name__}")
    else:
        raise CocoFormatError(f"{where}: segmentation must be a list of polygons or an RLE dict")
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


class CocoDetection(Dataset):
    """A folder of images and a COCO instances JSON file.

    Args:
        image_dir: folder the images' ``file_name`` entries are relative to.
        ann_file: COCO instances JSON (``images``, ``categories`` and normally ``annotations``; a file without
            ``annotations``, like COCO's test-dev image info, gives images without objects).
        transforms: ``(image, target) -> (image, target)`` on v2 conventions, e.g.
            :func:`detrkit.transforms.train_transforms`. It receives a PIL RGB image and the target of
            :meth:`load_target`. ``None`` returns the image as floats in [0, 1] at its own size.
        return_masks: also decode instance masks (``masks`` in the target).

    Attributes:
        label_map: category id ↔ contiguous label, from the file's ``categories`` (sorted by id).
        num_classes: number of categories K in the file.
        ids: image ids, sorted; index ``i`` of the dataset is image ``ids[i]``.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transforms: Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]] | None = None,
        return_masks: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.return_masks = return_masks
        images, categories, annotations = self._read_ann_file()
        self.label_map = LabelMap.from_coco_categories(categories)
        self.num_classes = self.label_map.num_classes
        self._images: dict[int, dict[str, Any]] = {int(im["id"]): im for im in images}
        self._annotations: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in self._images}
        for ann in annotations:
            if not return_masks:  # polygons are most of a COCO file's memory; drop them when unused
                ann = {k: v for k, v in ann.items() if k != "segmentation"}
            self._annotations[int(ann["image_id"])].append(ann)
        self.ids: list[int] = sorted(self._images)

    # ---------------------------------------------------------------- annotation file
    def _read_ann_file(self) -> tuple[list[dict], list[dict], list[dict]]:
        """Load and validate the JSON; every error names the file (and the entry)."""
        f = self.ann_file
        try:
            with open(f, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise FileNotFoundError(f"annotation file not found: {f}") from None
        except json.JSONDecodeError as e:
            raise CocoFormatError(f"{f}: not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise CocoFormatError(f"{f}: expected a JSON object at the top level, got {type(data).__name__}")
        for key in ("images", "categories"):
            if key not in data:
                raise CocoFormatError(
                    f"{f}: missing key {key!r} (a COCO instances file has images, categories and annotations)"
                )
            if not isinstance(data[key], list):
                raise CocoFormatError(f"{f}: {key!r} must be a list, got {type(data[key]).__name__}")
        annotations = data.get("annotations", [])
        if not isinstance(annotations, list):
            raise CocoFormatError(f"{f}: 'annotations' must be a list, got {type(annotations).__name__}")

        categories = data["categories"]
        if not categories:
            raise CocoFormatError(f"{f}: 'categories' is empty; the number of classes comes from it")
        category_ids: set[int] = set()
        for i, cat in enumerate(categories):
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                raise CocoFormatError(f"{f}: categories[{i}] needs an integer 'id', got {cat!r}")
            if cat["id"] in category_ids:
                raise CocoFormatError(f"{f}: duplicate category id {cat['id']}")
            category_ids.add(cat["id"])

        image_ids: set[int] = set()
        for i, im in enumerate(data["images"]):
            if not isinstance(im, dict) or not _is_int(im.get("id")):
                raise CocoFormatError(f"{f}: images[{i}] needs an integer 'id', got {im!r}")
            if not isinstance(im.get("file_name"), str):
                raise CocoFormatError(f"{f}: image {im['id']} needs a string 'file_name'")
            for key in ("width", "height"):
                if key in im and not (_is_int(im[key]) and im[key] > 0):
                    raise CocoFormatError(f"{f}: image {im['id']} has {key}={im[key]!r}, not a positive int")
            if im["id"] in image_ids:
                raise CocoFormatError(f"{f}: duplicate image id {im['id']}")
            image_ids.add(im["id"])

        for i, ann in enumerate(annotations):
            if not isinstance(ann, dict):
                raise CocoFormatError(f"{f}: annotations[{i}] must be an object, got {type(ann).__name__}")
            where = f"{f}: annotation {ann.get('id', f'#{i}')}"
            for key in ("image_id", "category_id", "bbox"):
                if key not in ann:
                    raise CocoFormatError(f"{where} is missing {key!r}")
            if ann["image_id"] not in image_ids:
                raise CocoFormatError(f"{where} refers to unknown image id {ann['image_id']!r}")
            if ann["category_id"] not in category_ids:
                raise CocoFormatError(
                    f"{where} refers to unknown category id {ann['category_id']!r} (known: {sorted(category_ids)})"
                )
            bbox = ann["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                raise CocoFormatError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            if ann.get("iscrowd", 0) not in (0, 1):
                raise CocoFormatError(f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
            if "area" in ann and not _is_number(ann["area"]):
                raise CocoFormatError(f"{where}: area must be a finite number, got {ann['area']!r}")
            if self.return_masks and not ann.get("iscrowd", 0) and "segmentation" not in ann:
                raise CocoFormatError(f"{where} has no 'segmentation' (needed with return_masks=True)")
        return data["images"], categories, annotations

    # ---------------------------------------------------------------- loading
    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._images[self.ids[index]]["file_name"]

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of sample ``index``, untransformed (see :func:`detrkit.images.read_rgb`)."""
        path = self.image_path(index)
        image = read_rgb(path)
        info = self._images[self.ids[index]]
        expected = (info.get("width", image.width), info.get("height", image.height))
        if image.size != expected:
            # Boxes would be silently misaligned (often an EXIF-rotated export); better to stop here.
            raise ValueError(
                f"image file {path} is {image.width}x{image.height} (w x h) but {self.ann_file} says "
                f"{expected[0]}x{expected[1]}"
            )
        return image

    def load_target(self, index: int, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """The target of sample ``index`` before transforms, as the transforms receive it.

        Boxes are ``tv_tensors.BoundingBoxes`` (N, 4) in absolute XYXY pixels, clamped to the image; crowd
        objects and boxes empty after clamping are left out. ``masks``: uint8 ``tv_tensors.Mask`` (N, H, W).

        Args:
            image_size: ``(height, width)`` of the loaded image; when not given, the annotation file's, or the
                image file header's if the file has none.
        """
        image_id = self.ids[index]
        if image_size is None:
            info = self._images[image_id]
            if "width" in info and "height" in info:
                image_size = (info["height"], info["width"])
            else:
                image = self.load_image(index)
                image_size = (image.height, image.width)
        height, width = image_size

        # Crowd regions are not objects to detect: DETR trains without them (evaluation reads them from the
        # annotation file, where COCOeval uses them to ignore detections).
        anns = [a for a in self._annotations[image_id] if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        xyxy = F.convert_bounding_box_format(
            xywh, old_format=tv_tensors.BoundingBoxFormat.XYWH, new_format=tv_tensors.BoundingBoxFormat.XYXY
        )
        boxes = tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(height, width))
        boxes = F.clamp_bounding_boxes(boxes)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        anns = [a for a, k in zip(anns, keep.tolist(), strict=True) if k]

        target: dict[str, Any] = {
            "boxes": tv_tensors.wrap(boxes[keep], like=boxes),
            "labels": torch.tensor([self.label_map.to_label(a["category_id"]) for a in anns], dtype=torch.int64),
            "image_id": image_id,
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor([height, width], dtype=torch.int64),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
            "area": torch.tensor(
                [float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns], dtype=torch.float32
            ),
        }
        if self.return_masks:
            masks = np.zeros((len(anns), height, width), dtype=np.uint8)
            for i, ann in enumerate(anns):
                where = f"{self.ann_file}: annotation {ann.get('id', '?')} (image {image_id})"
                masks[i] = _decode_segmentation(ann["segmentation"], height, width, where)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        return target

    def __getitem__(self, index: int) -> Sample:
        """``(image (3, H, W) float32, target)``; see the module docstring for the target's keys."""
        image = self.load_image(index)
        target = self.load_target(index, image_size=(image.height, image.width))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return _finalize(image, target)


def _finalize(image: Any, target: dict[str, Any]) -> Sample:
    """Bring a (possibly transformed) sample to the model's conventions whatever the transforms left.

    Images become float tensors (uint8/PIL scaled to [0, 1]); boxes still in ``BoundingBoxes`` (absolute
    pixels) become normalised cxcywh, plain tensors are taken as already normalised (the pipelines' last
    step); tv_tensors are unwrapped so that downstream code sees plain tensors.
    """
    if not isinstance(image, torch.Tensor):
        image = F.to_image(image)
    if not image.is_floating_point():
        image = F.to_dtype(image, torch.float32, scale=True)
    image = image.as_subclass(torch.Tensor)

    target = dict(target)
    boxes = target["boxes"]
    if isinstance(boxes, tv_tensors.BoundingBoxes):
        boxes = boxes_to_normalized_cxcywh(boxes)
    target["boxes"] = boxes.as_subclass(torch.Tensor).to(torch.float32)
    if "masks" in target:
        target["masks"] = target["masks"].as_subclass(torch.Tensor).bool()
    target["size"] = torch.tensor(image.shape[-2:], dtype=torch.int64)
    return image, target


@dataclass
class Batch:
    """A padded batch.

    Attributes:
        pixel_values: (B, 3, H, W) images, top-left aligned, zero in the padding (zero after normalisation, as
            in the official DETR).
        padding_mask: (B, H, W) bool, True on padding.
        targets: one target dict per image (masks, if any, stay at each image's own unpadded size).
        orig_sizes: (B, 2) int64 [h, w] of the files as loaded, for post-processing.
        image_ids: the images' ids.
    """

    pixel_values: torch.Tensor
    padding_mask: torch.Tensor
    targets: list[dict[str, Any]]
    orig_sizes: torch.Tensor
    image_ids: list[int]

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(
            pixel_values=fn(self.pixel_values),
            padding_mask=fn(self.padding_mask),
            targets=[{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in self.targets],
            orig_sizes=fn(self.orig_sizes),
            image_ids=list(self.image_ids),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor, target tensors included, on ``device``."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``, which otherwise leaves custom batch types unpinned."""
        return self._map_tensors(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return len(self.image_ids)


def collate(samples: Sequence[Sample], size_divisibility: int = 32) -> Batch:
    """Pad ``(image, target)`` samples into a :class:`Batch`.

    Images are placed top-left in a zero canvas of the batch's largest height and width, each rounded up to a
    multiple of ``size_divisibility`` (the backbone's stride, so an image's valid feature cells do not depend
    on its batch-mates; 1 disables the rounding). Use as ``DataLoader(..., collate_fn=collate)`` or with
    ``functools.partial(collate, size_divisibility=64)``.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if not (isinstance(size_divisibility, int) and size_divisibility >= 1):
        raise ValueError(f"size_divisibility must be an int >= 1, got {size_divisibility!r}")
    images = [s[0] for s in samples]
    targets = [s[1] for s in samples]
    channels = {img.shape[0] for img in images}
    if any(img.ndim != 3 for img in images) or len(channels) != 1:
        raise ValueError(f"collate needs (C, H, W) images with one C, got shapes {[tuple(i.shape) for i in images]}")

    pixel_values, padding_mask = pad_batch(images, size_divisibility)  # (B, C, H, W), (B, H, W)
    return Batch(
        pixel_values=pixel_values,
        padding_mask=padding_mask,
        targets=targets,
        orig_sizes=torch.stack([torch.as_tensor(t["orig_size"], dtype=torch.int64) for t in targets]),
        image_ids=[int(t["image_id"]) for t in targets],
    )
