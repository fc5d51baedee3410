"""COCO-format detection data: the dataset, its targets and the batch collation.

The annotation file is read with plain ``json`` and validated once, up front, so a malformed file fails when
the dataset is built rather than halfway through an epoch. Every entry is checked and every problem reported at
once (:class:`Issues`): what cannot be used is refused with a :class:`CocoFormatError` naming the file, the entry
(image id, annotation id, ``file_name``) and the field, e.g. duplicate image or annotation ids, unknown image or
category ids, a bbox that is not 4 finite numbers, a ``file_name`` leaving the image folder. Boxes that can be
repaired are, and the repair is announced in one warning per dataset with counts and examples (:func:`fix_boxes`):
boxes of zero or negative width/height or lying outside the image are dropped, boxes reaching past the border are
clipped. With ``return_masks=True`` the segmentations are checked the same way (:func:`fix_segmentations`).
Image pixels are read in the stored grid, EXIF orientation ignored (see :mod:`detrkit.images`).

Target of one image, as returned by :class:`CocoDetection` (N objects kept, H×W the image after transforms):

- ``boxes`` (N, 4) float32: normalised (cx, cy, w, h) relative to the transformed image
- ``labels`` (N,) int64: contiguous labels 0..K-1 (see :class:`detrkit.labels.LabelMap`)
- ``image_id`` int; ``orig_size`` (2,) int64 [h, w] of the file as loaded; ``size`` (2,) int64 [H, W]
- ``iscrowd`` (N,) int64 (all zero: crowd regions are not training objects); ``area`` (N,) float32, the
  annotation's ``area`` in original-image pixels
- ``masks`` (N, H, W) bool, only with ``return_masks=True``: one per box, same order, at the transformed
  image's size (transformed with the image as a ``tv_tensors.Mask``: nearest-neighbour resizing, flips, crops)

Layer: building blocks. May import ``images``, ``labels`` and ``transforms``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from detrkit.images import pad_batch, read_header, read_rgb
from detrkit.labels import LabelMap
from detrkit.transforms import boxes_to_normalized_cxcywh

Sample = tuple[torch.Tensor, dict[str, Any]]
log = logging.getLogger("detrkit")


def is_number(v: Any) -> bool:
    """A finite JSON number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v: Any) -> bool:
    """A JSON integer (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)


class CocoFormatError(ValueError):
    """The annotation file is not valid COCO instances JSON; the message names the file and the entry."""


# Boxes reaching less than this many pixels past the image border are clipped without a word: exporters round.
CLIP_TOLERANCE = 1.0
MAX_EXAMPLES = 3  # examples quoted per kind of problem


@dataclass
class Issue:
    """One kind of problem in a dataset: how many entries have it, the first few, and what was done or to do.

    ``severity`` is ``"error"`` (the dataset is refused), ``"fix-up"`` (done, and announced) or ``"warning"``.
    """

    severity: str
    kind: str
    hint: str = ""
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The kind, the count and the examples."""
        shown = "; ".join(self.examples)
        if self.count > len(self.examples):
            shown += f"; and {self.count - len(self.examples)} more"
        return f"{self.kind} ({self.count}): {shown}"

    def format(self) -> str:
        return self.summary() + (f". {self.hint}" if self.hint else "")


class Issues:
    """The problems found in one dataset, grouped by kind in the order first seen."""

    def __init__(self, source: str | Path) -> None:
        self.source = str(source)
        self._by_kind: dict[str, Issue] = {}

    def add(self, severity: str, kind: str, example: str, hint: str = "") -> None:
        issue = self._by_kind.setdefault(kind, Issue(severity, kind, hint))
        issue.count += 1
        if len(issue.examples) < MAX_EXAMPLES:
            issue.examples.append(example)

    def copy(self) -> Issues:
        new = Issues(self.source)
        for kind, issue in self._by_kind.items():
            new._by_kind[kind] = dataclasses.replace(issue, examples=list(issue.examples))
        return new

    def __iter__(self) -> Iterator[Issue]:
        return iter(self._by_kind.values())

    def of(self, severity: str) -> list[Issue]:
        return [i for i in self if i.severity == severity]

    def count(self, kind: str) -> int:
        issue = self._by_kind.get(kind)
        return issue.count if issue else 0

    def message(self, severity: str) -> str:
        """One line per kind of ``severity``, each starting with the file's name."""
        return "\n".join(f"{self.source}: {issue.format()}" for issue in self.of(severity))

    def raise_errors(self) -> None:
        """Raise a :class:`CocoFormatError` listing every error found, if any."""
        if self.of("error"):
            raise CocoFormatError(self.message("error"))

    def announce(self) -> None:
        """Log the fix-ups as one warning (the total, then each kind with its count and examples)."""
        fixups = self.of("fix-up")
        if fixups:
            total = sum(i.count for i in fixups)
            lines = "\n  ".join(i.format() for i in fixups)
            log.warning("%s: %d annotation(s) fixed up:\n  %s", self.source, total, lines)


# Kinds of fix-ups (the keys of Issues, reported by `detrkit doctor` too).
DROPPED_EMPTY = "dropped: zero or negative width/height"
DROPPED_OUTSIDE = "dropped: lies outside the image"
CLIPPED = "clipped to the image"


def _annotation_where(ann: dict[str, Any], index: int | None, image: dict[str, Any] | None = None) -> str:
    """How an annotation is named in messages: its id, else its position (or just "an annotation without id")."""
    if "id" in ann:
        name = f"annotation {ann['id']}"
    else:
        name = f"annotations[{index}] (no id)" if index is not None else "an annotation without id"
    if image is not None:
        name += f" of image {image['id']} ({image.get('file_name')!r})"
    return name


def inside_folder(image_dir: str | Path, file_name: str) -> bool:
    """Whether ``image_dir / file_name`` stays inside ``image_dir``, lexically (a symlink inside is fine)."""
    root = os.path.abspath(image_dir)
    target = os.path.abspath(os.path.join(root, file_name))
    return target != root and os.path.commonpath([root, target]) == root


def load_coco_json(ann_file: str | Path, *, kind: str = "COCO instances") -> dict[str, Any]:
    """Read a COCO instances (or panoptic: ``kind`` names it in messages) file and check its top-level structure
    and its categories (which everything else depends on); raises ``FileNotFoundError`` or
    :class:`CocoFormatError` naming the file."""
    f = Path(ann_file)
    try:
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {f}") from None
    except IsADirectoryError:
        raise CocoFormatError(f"{f}: is a folder, not a {kind} JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{f}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CocoFormatError(f"{f}: expected a JSON object at the top level, got {type(data).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            raise CocoFormatError(f"{f}: missing key {key!r} (a {kind} file has images, categories and annotations)")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{f}: {key!r} must be a list, got {type(data[key]).__name__}")
    if not isinstance(data.get("annotations", []), list):
        raise CocoFormatError(f"{f}: 'annotations' must be a list, got {type(data['annotations']).__name__}")
    if not data["categories"]:
        raise CocoFormatError(f"{f}: 'categories' is empty; the number of classes comes from it")
    category_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not is_int(cat.get("id")):
            raise CocoFormatError(f"{f}: categories[{i}] needs an integer 'id', got {cat!r}")
        if cat["id"] in category_ids:
            raise CocoFormatError(f"{f}: duplicate category id {cat['id']}")
        category_ids.add(cat["id"])
    return data


@dataclass
class CocoIndex:
    """A COCO instances file checked entry by entry (:func:`index_coco`).

    Attributes:
        images: image id → its entry (every entry with an integer id).
        annotations: image id → its annotations (crowd ones included), in file order.
        unreadable: ids of images whose ``file_name`` is missing, invalid or leaves the image folder (never read).
        issues: what is wrong (errors) and what was fixed up (after :func:`fix_boxes`).
        num_annotations: annotations in the file.
    """

    ann_file: Path
    image_dir: Path
    categories: list[dict[str, Any]]
    images: dict[int, dict[str, Any]]
    annotations: dict[int, list[dict[str, Any]]]
    unreadable: set[int]
    issues: Issues
    num_annotations: int

    def json_size(self, image_id: int) -> tuple[int, int] | None:
        """``(height, width)`` of an image as the JSON gives it, or None when it gives none (or an invalid one)."""
        im = self.images[image_id]
        h, w = im.get("height"), im.get("width")
        return (h, w) if is_int(h) and is_int(w) and h > 0 and w > 0 else None


def index_images(
    data: dict[str, Any], image_dir: str | Path, issues: Issues
) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """Check the ``images`` entries of ``data``: ``(image id → entry, ids of images that cannot be read)``.

    Problems are added to ``issues``. Shared by the instances and the panoptic datasets.
    """
    image_dir = Path(image_dir)
    images: dict[int, dict[str, Any]] = {}
    unreadable: set[int] = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not is_int(im.get("id")):
            issues.add("error", "invalid image entry", f"images[{i}] needs an integer 'id', got {im!r}")
            continue
        where = f"image {im['id']}"
        if im["id"] in images:
            issues.add("error", "duplicate image id", f"duplicate image id {im['id']}", "Image ids must be unique")
            continue
        images[im["id"]] = im
        name = im.get("file_name")
        if not isinstance(name, str) or not name:
            issues.add("error", "invalid image entry", f"{where} needs a string 'file_name', got {name!r}")
            unreadable.add(im["id"])
        elif not inside_folder(image_dir, name):
            issues.add(
                "error",
                "file_name outside the image folder",
                f"{where} has file_name {name!r}, which leaves {image_dir}",
                "file_name must be a path inside the image folder (no '..' or absolute path leading out of it)",
            )
            unreadable.add(im["id"])
        for key in ("width", "height"):
            if key in im and not (is_int(im[key]) and im[key] > 0):
                issues.add("error", "invalid image entry", f"{where} has {key}={im[key]!r}, not a positive int")
    return images, unreadable


def index_coco(
    data: dict[str, Any], ann_file: str | Path, image_dir: str | Path, *, return_masks: bool = False
) -> CocoIndex:
    """Check every image and annotation entry of ``data`` (from :func:`load_coco_json`) and group the annotations
    by image. Problems are collected in ``issues`` (all of them, not only the first), never raised here.
    The segmentations themselves are checked against the image sizes by :func:`fix_segmentations`."""
    f, image_dir = Path(ann_file), Path(image_dir)
    issues = Issues(f)
    category_ids = {c["id"] for c in data["categories"]}
    images, unreadable = index_images(data, image_dir, issues)

    annotations: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in images}
    raw = data.get("annotations", [])
    seen_ids: dict[int, int] = {}  # annotation id → times seen
    for i, ann in enumerate(raw):
        if not isinstance(ann, dict):
            issues.add("error", "invalid annotation", f"annotations[{i}] must be an object, got {type(ann).__name__}")
            continue
        where = _annotation_where(ann, i)
        missing = [key for key in ("image_id", "category_id", "bbox") if key not in ann]
        if missing:
            issues.add("error", "invalid annotation", f"{where} is missing {missing[0]!r}")
            continue
        if "id" in ann:
            if not is_int(ann["id"]):
                issues.add("error", "invalid annotation", f"{where}: id must be an integer")
            else:
                seen_ids[ann["id"]] = seen_ids.get(ann["id"], 0) + 1
        ok = True
        if not (is_int(ann["image_id"]) and ann["image_id"] in images):
            issues.add("error", "unknown image id", f"{where} refers to unknown image id {ann['image_id']!r}")
            ok = False
        if not (is_int(ann["category_id"]) and ann["category_id"] in category_ids):
            issues.add(
                "error",
                "unknown category id",
                f"{where} refers to unknown category id {ann['category_id']!r}",
                f"known category ids: {sorted(category_ids)}",
            )
            ok = False
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
            issues.add("error", "invalid bbox", f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            ok = False
        if ann.get("iscrowd", 0) not in (0, 1):
            issues.add("error", "invalid annotation", f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
            ok = False
        if "area" in ann and not is_number(ann["area"]):
            issues.add("error", "invalid annotation", f"{where}: area must be a finite number, got {ann['area']!r}")
            ok = False
        if return_masks and not ann.get("iscrowd", 0) and "segmentation" not in ann:
            issues.add("error", "invalid annotation", f"{where} has no 'segmentation' (needed with return_masks=True)")
            ok = False
        if ok:
            if not return_masks:  # polygons are most of a COCO file's memory; drop them when unused
                ann = {k: v for k, v in ann.items() if k != "segmentation"}
            annotations[ann["image_id"]].append(ann)
    for ann_id, times in seen_ids.items():
        if times > 1:
            issues.add(
                "error",
                "duplicate annotation id",
                f"annotation id {ann_id} is used {times} times",
                "Annotation ids must be unique: COCO evaluation keys annotations by id, duplicates distort it",
            )
    return CocoIndex(f, image_dir, data["categories"], images, annotations, unreadable, issues, len(raw))


def fix_boxes(index: CocoIndex, sizes: dict[int, tuple[int, int]]) -> None:
    """Drop and clip the boxes of ``index`` against the image sizes (``(height, width)`` by image id), counting
    each fix-up in ``index.issues``. Crowd annotations (never training objects) and images without a size are
    left as they are.

    - width or height ≤ 0: dropped (nothing to learn);
    - nothing left inside the image: dropped;
    - reaching more than ``CLIP_TOLERANCE`` pixels past the border: kept, clipped to the image when loaded.
    """
    for image_id, anns in index.annotations.items():
        if image_id not in sizes:
            continue
        height, width = sizes[image_id]
        image = index.images[image_id]
        kept = []
        for ann in anns:
            if ann.get("iscrowd", 0):
                kept.append(ann)
                continue
            x, y, w, h = ann["bbox"]
            where = f"{_annotation_where(ann, None, image)}: bbox {ann['bbox']}"
            if w <= 0 or h <= 0:
                index.issues.add("fix-up", DROPPED_EMPTY, where)
                continue
            if min(x + w, width) <= max(x, 0) or min(y + h, height) <= max(y, 0):
                index.issues.add("fix-up", DROPPED_OUTSIDE, f"{where} in a {width}x{height} image")
                continue
            t = CLIP_TOLERANCE
            if x < -t or y < -t or x + w > width + t or y + h > height + t:
                index.issues.add("fix-up", CLIPPED, f"{where} in a {width}x{height} image")
            kept.append(ann)
        index.annotations[image_id] = kept


# Kinds of mask fix-ups (``return_masks=True``), reported like the box fix-ups.
IGNORED_SHORT_POLYGON = "polygon part with fewer than 3 points ignored"
DROPPED_EMPTY_SEGMENTATION = "dropped: empty segmentation"


def _check_segmentation(segmentation: Any, height: int, width: int) -> tuple[str | None, int, bool]:
    """Check a COCO ``segmentation`` against an image of ``height`` × ``width`` pixels, without rasterising it.

    Returns ``(error, short_parts, empty)``: why it cannot be used (None when it can), how many polygon parts have
    fewer than 3 points, and whether nothing is left to rasterise (no polygon of 3 or more points, an empty list,
    an RLE without a foreground pixel).
    """
    if isinstance(segmentation, list):
        short = 0
        for k, part in enumerate(segmentation):
            if not (isinstance(part, list) and len(part) % 2 == 0 and all(is_number(v) for v in part)):
                return f"polygon {k} is not a flat list [x1, y1, x2, y2, ...] of finite numbers", 0, False
            short += len(part) < 6
        return None, short, short == len(segmentation)
    if not (isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation):
        return "segmentation must be a list of polygons or an RLE dict with 'size' and 'counts'", 0, False
    size, counts = segmentation["size"], segmentation["counts"]
    if not (isinstance(size, list) and size == [height, width]):
        return f"RLE size {size!r} does not match the image [h, w] = [{height}, {width}]", 0, False
    if isinstance(counts, list):  # uncompressed RLE: run lengths alternating background/foreground, column-major
        if not all(is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
            return f"RLE counts must be non-negative ints adding up to h * w = {height * width}", 0, False
        return None, 0, sum(counts[1::2]) == 0
    if isinstance(counts, (str, bytes)):  # compressed RLE: its area is read without decoding the mask
        from faster_coco_eval.core import mask as mask_utils

        try:
            area = int(mask_utils.area({"size": [height, width], "counts": counts}))
        except (ValueError, TypeError, RuntimeError) as e:  # malformed strings raise RuntimeError
            return f"RLE counts cannot be read: {e}", 0, False
        return None, 0, area == 0
    return f"RLE counts must be a list or a string, got {type(counts).__name__}", 0, False


def fix_segmentations(index: CocoIndex, sizes: dict[int, tuple[int, int]]) -> None:
    """Check the ``segmentation`` of every non-crowd annotation of ``index`` against its image's size
    (``(height, width)`` by image id), before any mask is decoded; errors and fix-ups go to ``index.issues``.

    - not polygons nor RLE, a polygon of an odd number of (or non-finite) coordinates, an RLE of another size or
      whose counts do not cover the image: error;
    - a polygon part of fewer than 3 points (a point or a line: no area, and pycocotools would read a 4-number
      part as a box): ignored, the object keeps its other parts;
    - nothing left (an empty list, only such parts, an RLE of zeros): the object is dropped, box included (a box
      without a mask is no target for a mask head).

    Crowd annotations are left as they are: they are never training objects.
    """
    for image_id, anns in index.annotations.items():
        if image_id not in sizes:
            continue
        height, width = sizes[image_id]
        image = index.images[image_id]
        kept = []
        for ann in anns:
            if ann.get("iscrowd", 0):
                kept.append(ann)
                continue
            where = _annotation_where(ann, None, image)
            error, short, empty = _check_segmentation(ann["segmentation"], height, width)
            if error is not None:
                index.issues.add("error", "invalid segmentation", f"{where}: {error}")
                kept.append(ann)  # refused with the others; kept so that one problem is reported once
                continue
            if empty:
                index.issues.add("fix-up", DROPPED_EMPTY_SEGMENTATION, where)
                continue
            if short:
                index.issues.add("fix-up", IGNORED_SHORT_POLYGON, f"{where}: {short} part(s)")
            kept.append(ann)
        index.annotations[image_id] = kept


def _decode_segmentation(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """COCO ``segmentation`` (polygons, uncompressed or compressed RLE) → (height, width) uint8 mask.

    Polygon parts are united, as pycocotools' ``annToMask`` does; parts of fewer than 3 points are skipped (see
    :func:`fix_segmentations`, which has checked everything else when the dataset was built). ``where`` names the
    file and the annotation in errors.
    """
    # Imported here: only mask users pay for the extension module.
    from faster_coco_eval.core import mask as mask_utils

    error, _, _ = _check_segmentation(segmentation, height, width)
    if error is not None:  # an image whose size differs from the one the dataset was checked with
        raise CocoFormatError(f"{where}: {error}")
    try:
        if isinstance(segmentation, list):
            # 4-number parts would be read as boxes by frPyObjects, and fewer than 3 points enclose nothing.
            polygons = [[float(v) for v in p] for p in segmentation if len(p) >= 6]
            if not polygons:
                return np.zeros((height, width), dtype=np.uint8)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE (COCO writes crowd regions this way)
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:  # compressed RLE, decodable as is
            rle = {"size": [height, width], "counts": segmentation["counts"]}
        return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CocoFormatError(f"{where}: segmentation cannot be decoded: {e}") from e


def size_mismatch_message(
    path: Path, ann_file: Path, image_id: int, actual: tuple[int, int], expected: tuple[int, int]
) -> str:
    """Why an image whose stored size (w, h) differs from its JSON entry's is refused, and what to do."""
    text = (
        f"image file {path} is {actual[0]}x{actual[1]} (w x h) but {ann_file} says {expected[0]}x{expected[1]} "
        f"(image {image_id}): the boxes would not line up with the pixels."
    )
    orientation = 1
    try:
        orientation = read_header(path).orientation
    except (OSError, ValueError):
        pass
    if actual == expected[::-1] and orientation in (5, 6, 7, 8):
        return text + (
            f" The JSON's size is the one a viewer shows after the file's EXIF rotation (orientation {orientation}), "
            "which detrkit never applies (COCO boxes are in the stored pixel grid). If the boxes were drawn on the "
            "rotated picture, save the image rotated (PIL.ImageOps.exif_transpose) and drop the tag; otherwise "
            "correct width/height in the JSON"
        )
    return text + " Correct width/height in the JSON, or replace the file with the one that was annotated"


def read_annotated_image(path: Path, info: dict[str, Any], ann_file: Path) -> Image.Image:
    """The RGB PIL image of the ``images`` entry ``info`` of ``ann_file``, stored at ``path``; an image whose size
    differs from the entry's width/height is refused (:func:`size_mismatch_message`)."""
    image = read_rgb(path)
    expected = (info.get("width", image.width), info.get("height", image.height))
    if image.size != expected:
        # Boxes would be silently misaligned (often an EXIF-rotated export); better to stop here.
        raise ValueError(size_mismatch_message(path, ann_file, info["id"], image.size, expected))
    return image


class CocoDetection(Dataset):
    """A folder of images and a COCO instances JSON file.

    Args:
        image_dir: folder the images' ``file_name`` entries are relative to.
        ann_file: COCO instances JSON (``images``, ``categories`` and normally ``annotations``; a file without
            ``annotations``, like COCO's test-dev image info, gives images without objects).
        transforms: ``(image, target) -> (image, target)`` on v2 conventions, e.g.
            :func:`detrkit.transforms.train_transforms`. It receives a PIL RGB image and the target of
            :meth:`load_target`. ``None`` returns the image as floats in [0, 1] at its own size.
        return_masks: also decode instance masks (``masks`` in the target) from each object's ``segmentation``:
            polygons (one or several parts, united), uncompressed RLE (``counts`` a list) or compressed RLE
            (``counts`` a string). Every segmentation is checked when the dataset is built
            (:func:`fix_segmentations`): an object without a ``segmentation`` or with an invalid one refuses the
            file; polygon parts of fewer than 3 points are ignored, and an object left with an empty segmentation
            is dropped, box included (both announced in the fix-up warning). Crowd objects need none.

    Attributes:
        label_map: category id ↔ contiguous label, from the file's ``categories`` (sorted by id).
        num_classes: number of categories K in the file.
        ids: image ids, sorted; index ``i`` of the dataset is image ``ids[i]``.
        index: the checked file (:class:`CocoIndex`): its fix-ups are in ``index.issues``.

    Raises:
        CocoFormatError: listing every invalid entry of the file (nothing is read until all are fixed).
        FileNotFoundError, OSError: an image the JSON gives no width/height for is missing or unreadable (its
            header is read when the dataset is built).
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
        index = index_coco(load_coco_json(self.ann_file), self.ann_file, self.image_dir, return_masks=return_masks)
        index.issues.raise_errors()
        self.label_map = LabelMap.from_coco_categories(index.categories)
        self.num_classes = self.label_map.num_classes
        self._images: dict[int, dict[str, Any]] = index.images
        # (height, width) of every image: the JSON's, else the file header's (read now, so that the boxes of
        # every image are checked here, before training starts)
        self._sizes: dict[int, tuple[int, int]] = {}
        for image_id, info in self._images.items():
            size = index.json_size(image_id)
            if size is None:
                header = read_header(self.image_dir / info["file_name"])
                size = (header.height, header.width)
            self._sizes[image_id] = size
        if return_masks:
            fix_segmentations(index, self._sizes)
            index.issues.raise_errors()
        fix_boxes(index, self._sizes)
        index.issues.announce()
        self.index = index
        self._annotations: dict[int, list[dict[str, Any]]] = index.annotations
        self.ids: list[int] = sorted(self._images)

    # ---------------------------------------------------------------- loading
    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._images[self.ids[index]]["file_name"]

    def image_size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of sample ``index`` as stored (the JSON's, else the file header's), read no pixels."""
        return self._sizes[self.ids[index]]

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of sample ``index``, untransformed (see :func:`detrkit.images.read_rgb`)."""
        return read_annotated_image(self.image_path(index), self._images[self.ids[index]], self.ann_file)

    def load_target(self, index: int, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """The target of sample ``index`` before transforms, as the transforms receive it.

        Boxes are ``tv_tensors.BoundingBoxes`` (N, 4) in absolute XYXY pixels, clamped to the image; crowd
        objects are left out, and so are the boxes :func:`fix_boxes` dropped (announced when the dataset was
        built). ``masks``: uint8 ``tv_tensors.Mask`` (N, H, W), one per box (``return_masks=True``).

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
        return finalize_sample(image, target)


def finalize_sample(image: Any, target: dict[str, Any]) -> Sample:
    """Bring a (possibly transformed) sample to the model's conventions whatever the transforms left (the last
    step of every dataset's ``__getitem__``).

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
