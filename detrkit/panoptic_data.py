"""COCO panoptic data: images, a JSON of segments per image and a folder of segment-id PNGs.

The format (cocodataset/panopticapi, used by COCO 2017 panoptic): the JSON has ``images`` and ``categories``
like an instances file, each category with ``isthing`` (1: countable "things", 0: amorphous "stuff"), and
``annotations``: one entry per image with its ``image_id``, the ``file_name`` of its PNG and ``segments_info``,
a list of ``{"id", "category_id", "iscrowd", "bbox", "area"}``. In the PNG the colour (R, G, B) of a pixel is the
id ``R + 256·G + 256²·B`` of the segment it belongs to; 0 is VOID (unlabelled, no segment). Every pixel belongs
to at most one segment, so segments never overlap. The PNG folder defaults to the JSON's path without ``.json``,
as panopticapi assumes (``annotations/panoptic_val2017.json`` → ``annotations/panoptic_val2017/``).

Target of one image, as returned by :class:`CocoPanoptic` (N segments, H×W the image after transforms), the
keys of :mod:`detrkit.data` plus ``isthing``:

- ``masks`` (N, H, W) bool: the pixels of each segment (``PNG == id``), transformed with the image as a
  ``tv_tensors.Mask``; VOID pixels belong to no mask
- ``boxes`` (N, 4) float32 normalised cxcywh: before transforms the tight box of each mask, as the reference
  (facebookresearch/detr ``datasets/coco_panoptic.py``) derives it, with pixel-edge corners (a mask on columns
  3..7 spans x 3 to 8), which is also the JSON's ``bbox`` as panopticapi writes it
- ``labels`` (N,) int64 contiguous (:class:`detrkit.labels.LabelMap` of the panoptic categories, with
  ``isthing``); ``isthing`` (N,) bool, the segment's category's flag
- ``iscrowd`` (N,) int64 from ``segments_info``; ``area`` (N,) float32: the JSON's ``area`` (pixels of the
  original image), the mask's pixel count when the JSON has none
- ``image_id``, ``orig_size`` (2,) and ``size`` (2,) as for detection

Crowd segments (a group of things, ``iscrowd=1``) are training targets by default, as in the reference, which
keeps every segment with its ``iscrowd`` flag (panopticapi's PQ then ignores predictions that fall on them);
``include_crowd=False`` leaves them out of the targets (their pixels then belong to no target, like VOID).

Checks: the JSON is checked entry by entry when the dataset is built and every problem is reported at once
(:class:`PanopticFormatError` naming the file, the image, the PNG and the segment): unknown images or categories,
categories without ``isthing``, an image with no or two annotation entries, duplicate segment ids in an image,
segment id 0 (VOID) or above 256³ - 1, a missing PNG or PNG folder. A PNG is checked when it is read: its size must
be the image's, and its ids must be exactly the ids of ``segments_info`` (an id in the PNG without a segment, or a
segment without a pixel, is refused). :meth:`CocoPanoptic.check_pngs` reads every PNG now and reports them all.
No segment is ever dropped without being asked for.

Layer: building blocks. May import ``data``, ``images``, ``labels`` and ``transforms``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from detrkit.data import (
    CocoFormatError,
    Issues,
    Sample,
    finalize_sample,
    index_images,
    inside_folder,
    is_int,
    is_number,
    load_coco_json,
    read_annotated_image,
)
from detrkit.images import read_header
from detrkit.labels import LabelMap

VOID = 0  # segment id of unlabelled pixels
MAX_SEGMENT_ID = 256**3 - 1  # the largest id three 8-bit channels hold


class PanopticFormatError(CocoFormatError):
    """A COCO panoptic JSON or PNG is invalid; the message names the file, the image and the segment."""


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) colours of a panoptic PNG → (H, W) int64 segment ids ``R + 256·G + 256²·B`` (0 = VOID)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids (0 ≤ id < 256³) → (H, W, 3) uint8 colours, the inverse of :func:`rgb_to_id`."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"segment ids must lie in [0, {MAX_SEGMENT_ID}], got [{ids.min()}, {ids.max()}]")
    return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def read_segment_ids(path: str | Path) -> np.ndarray:
    """The (H, W) int64 segment-id map of a panoptic PNG (RGB, or a palette of RGB colours).

    Raises :class:`PanopticFormatError` naming the file when it is missing, unreadable or of another mode (a
    grayscale or RGBA PNG is not a panoptic PNG: its colours cannot be read as ids without guessing).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":  # palette colours are exact RGB triples: converting them loses nothing
                im = im.convert("RGB")
            if im.mode != "RGB":
                raise PanopticFormatError(
                    f"panoptic PNG {path}: mode {im.mode!r}, expected RGB (segment id = R + 256·G + 256²·B)"
                )
            return rgb_to_id(np.asarray(im))
    except PanopticFormatError:
        raise
    except FileNotFoundError:
        raise PanopticFormatError(f"panoptic PNG not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError, truncated files, folders
        raise PanopticFormatError(f"cannot read panoptic PNG {path}: {e}") from e


@dataclass
class PanopticIndex:
    """A COCO panoptic JSON checked entry by entry (:func:`index_panoptic`).

    Attributes:
        images: image id → its ``images`` entry.
        annotations: image id → its ``annotations`` entry (``file_name`` of the PNG, ``segments_info``); empty
            when the file has no ``annotations`` (images without targets, like COCO's test-dev info).
        issues: every problem found (errors only: nothing in a panoptic file is fixed up).
    """

    ann_file: Path
    image_dir: Path
    png_dir: Path
    categories: list[dict[str, Any]]
    images: dict[int, dict[str, Any]]
    annotations: dict[int, dict[str, Any]]
    issues: Issues


def _segment_problems(segments: Any, category_ids: set[int], where: str) -> list[tuple[str, str]]:
    """``(kind, message)`` for what is wrong with the ``segments_info`` of one image."""
    if not isinstance(segments, list):
        return [("invalid annotation", f"{where}: segments_info must be a list, got {type(segments).__name__}")]
    problems = []
    seen: set[int] = set()
    for k, seg in enumerate(segments):
        if not isinstance(seg, dict) or not is_int(seg.get("id")):
            problems.append(("invalid segment", f"{where}: segments_info[{k}] needs an integer 'id', got {seg!r}"))
            continue
        name = f"{where}: segment {seg['id']}"
        if not VOID < seg["id"] <= MAX_SEGMENT_ID:
            problems.append(("invalid segment", f"{name}: id must lie in [1, {MAX_SEGMENT_ID}] (0 is VOID)"))
        if seg["id"] in seen:
            problems.append(("duplicate segment id", f"{name} appears twice in segments_info"))
        seen.add(seg["id"])
        if not (is_int(seg.get("category_id")) and seg["category_id"] in category_ids):
            problems.append(("unknown category id", f"{name} has unknown category id {seg.get('category_id')!r}"))
        if seg.get("iscrowd", 0) not in (0, 1):
            problems.append(("invalid segment", f"{name}: iscrowd must be 0 or 1, got {seg['iscrowd']!r}"))
        if "area" in seg and not is_number(seg["area"]):
            problems.append(("invalid segment", f"{name}: area must be a finite number, got {seg['area']!r}"))
    return problems


def index_panoptic(
    data: dict[str, Any], ann_file: str | Path, image_dir: str | Path, png_dir: str | Path
) -> PanopticIndex:
    """Check every category, image, annotation and segment entry of ``data`` (from
    :func:`detrkit.data.load_coco_json`) and that every PNG exists. Problems are collected, never raised here."""
    f, image_dir, png_dir = Path(ann_file), Path(image_dir), Path(png_dir)
    issues = Issues(f)
    for cat in data["categories"]:
        if cat.get("isthing") not in (0, 1):  # True/False compare equal to 1/0
            issues.add(
                "error",
                "category without isthing",
                f"category {cat['id']} ({cat.get('name')!r}) has isthing={cat.get('isthing')!r}",
                "Panoptic categories need 'isthing': 1 for things (countable objects), 0 for stuff",
            )
    category_ids = {c["id"] for c in data["categories"]}
    images, _ = index_images(data, image_dir, issues)
    annotations: dict[int, dict[str, Any]] = {}
    has_annotations = "annotations" in data
    if has_annotations and not png_dir.is_dir():
        issues.add(
            "error",
            "PNG folder",
            f"no such folder {png_dir}",
            "The PNGs are looked for in the JSON's path without '.json' unless png_dir is given",
        )
    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or not is_int(ann.get("image_id")):
            issues.add("error", "invalid annotation", f"annotations[{i}] needs an integer 'image_id', got {ann!r}")
            continue
        image_id = ann["image_id"]
        name = ann.get("file_name")
        where = f"image {image_id} (PNG {name!r})"
        if image_id not in images:
            issues.add("error", "unknown image id", f"annotations[{i}] refers to unknown image id {image_id}")
            continue
        if image_id in annotations:
            issues.add("error", "duplicate annotation", f"image {image_id} has more than one annotations entry")
            continue
        ok = True
        if not isinstance(name, str) or not name:
            issues.add("error", "invalid annotation", f"{where} needs the string 'file_name' of its PNG")
            ok = False
        elif not inside_folder(png_dir, name):
            issues.add("error", "file_name outside the PNG folder", f"{where}: file_name leaves {png_dir}")
            ok = False
        elif png_dir.is_dir() and not (png_dir / name).is_file():
            issues.add("error", "missing PNG", f"{where}: no file {png_dir / name}")
            ok = False
        problems = _segment_problems(ann.get("segments_info"), category_ids, where)
        for kind, message in problems:
            issues.add("error", kind, message)
        if ok and not problems:
            annotations[image_id] = ann
    if has_annotations:
        seen = {a.get("image_id") for a in data["annotations"] if isinstance(a, dict)}
        for image_id, im in images.items():
            if image_id not in seen:
                issues.add(
                    "error",
                    "image without annotation",
                    f"image {image_id} ({im.get('file_name')!r}) has no entry in annotations",
                    "Every image of a panoptic file needs its PNG and segments_info (an empty list if all VOID)",
                )
    return PanopticIndex(f, image_dir, png_dir, data["categories"], images, annotations, issues)


class CocoPanoptic(Dataset):
    """A folder of images, a COCO panoptic JSON and its folder of segment-id PNGs.

    Args:
        image_dir: folder the ``images`` entries' ``file_name`` are relative to.
        ann_file: COCO panoptic JSON.
        png_dir: folder of the PNGs named by the ``annotations`` entries; default: ``ann_file`` without its
            ``.json`` suffix, as panopticapi assumes.
        transforms: ``(image, target) -> (image, target)`` on v2 conventions, as for
            :class:`detrkit.data.CocoDetection` (masks are ``tv_tensors.Mask``, boxes ``BoundingBoxes``).
        include_crowd: crowd segments are targets (True, the reference's choice) or left out (False).

    Attributes:
        label_map: category id ↔ contiguous label, with ``isthing``, from the file's ``categories``.
        num_classes: number of categories K (things and stuff).
        ids: image ids, sorted; index ``i`` is image ``ids[i]``.
        index: the checked file (:class:`PanopticIndex`).

    Raises:
        PanopticFormatError: listing every invalid entry of the JSON (and, when a sample is read, what is wrong
            with its PNG).
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        png_dir: str | Path | None = None,
        transforms: Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]] | None = None,
        *,
        include_crowd: bool = True,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.png_dir = Path(png_dir) if png_dir is not None else self.ann_file.with_suffix("")
        self.transforms = transforms
        self.include_crowd = include_crowd
        data = load_coco_json(self.ann_file, kind="COCO panoptic")
        index = index_panoptic(data, self.ann_file, self.image_dir, self.png_dir)
        if index.issues.of("error"):
            raise PanopticFormatError(index.issues.message("error"))
        self.index = index
        self.label_map = LabelMap.from_coco_categories(index.categories)
        self.num_classes = self.label_map.num_classes
        self.ids: list[int] = sorted(index.images)

    def __len__(self) -> int:
        return len(self.ids)

    def instances_gt(self) -> dict[str, Any]:
        """The segments as a COCO instances ground truth (``images``, ``categories``, ``annotations`` with each
        segment's ``bbox``, ``area`` and ``iscrowd``), for box AP of things and stuff: what a detector trained on
        the panoptic categories (the paper's first stage, no mask head) is evaluated on."""
        data = load_coco_json(self.ann_file, kind="COCO panoptic")
        annotations = [
            {
                "id": int(seg["id"]),
                "image_id": int(ann["image_id"]),
                "category_id": int(seg["category_id"]),
                "bbox": [float(v) for v in seg["bbox"]],
                "area": float(seg["area"]),
                "iscrowd": int(seg.get("iscrowd", 0)),
            }
            for ann in data["annotations"]
            for seg in ann["segments_info"]
        ]
        for n, a in enumerate(annotations, start=1):  # segment ids repeat across images; annotation ids may not
            a["id"] = n
        return {"images": data["images"], "categories": data["categories"], "annotations": annotations}

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.index.images[self.ids[index]]["file_name"]

    def png_path(self, index: int) -> Path | None:
        """The panoptic PNG of sample ``index``, None for a file without annotations."""
        ann = self.index.annotations.get(self.ids[index])
        return self.png_dir / ann["file_name"] if ann is not None else None

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of sample ``index``, untransformed."""
        info = self.index.images[self.ids[index]]
        return read_annotated_image(self.image_path(index), info, self.ann_file)

    def image_size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of sample ``index``: the JSON's, else the file header's."""
        return self._image_size(index)

    def _image_size(self, index: int) -> tuple[int, int]:
        info = self.index.images[self.ids[index]]
        if is_int(info.get("height")) and is_int(info.get("width")):
            return info["height"], info["width"]
        header = read_header(self.image_path(index))
        return header.height, header.width

    def png_problems(
        self, index: int, ids: np.ndarray | None = None, image_size: tuple[int, int] | None = None
    ) -> list[str]:
        """What is wrong with the PNG of sample ``index``, each message naming the PNG, the image and the segment
        ids; empty when it matches the image's size and its ``segments_info``.

        Args:
            ids: the PNG's id map, if already read.
            image_size: ``(height, width)`` the PNG must have; default: the image's (JSON, else file header).
        """
        path = self.png_path(index)
        if path is None:
            return []
        image_id = self.ids[index]
        where = f"panoptic PNG {path} (image {image_id} of {self.ann_file})"
        if ids is None:
            try:
                ids = read_segment_ids(path)
            except PanopticFormatError as e:
                return [str(e)]
        problems = []
        height, width = image_size if image_size is not None else self._image_size(index)
        if ids.shape != (height, width):
            problems.append(f"{where} is {ids.shape[1]}x{ids.shape[0]} (w x h), the image {width}x{height}")
        declared = {s["id"] for s in self.index.annotations[image_id]["segments_info"]}
        present = set(np.unique(ids).tolist()) - {VOID}
        if present - declared:
            problems.append(f"{where}: ids {sorted(present - declared)} have pixels but no entry in segments_info")
        if declared - present:
            problems.append(f"{where}: segments {sorted(declared - present)} of segments_info have no pixel")
        return problems

    def check_pngs(self) -> None:
        """Read every PNG now and raise one :class:`PanopticFormatError` listing all their problems, if any
        (otherwise a bad PNG is found when its sample is first read)."""
        issues = Issues(self.ann_file)
        for i in range(len(self)):
            for problem in self.png_problems(i):
                issues.add("error", "PNG does not match segments_info", problem)
        if issues.of("error"):
            raise PanopticFormatError(issues.message("error"))

    def load_target(self, index: int, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """The target of sample ``index`` before transforms (see the module docstring), as the transforms
        receive it: ``boxes`` are ``tv_tensors.BoundingBoxes`` in absolute XYXY pixels, ``masks`` a uint8
        ``tv_tensors.Mask`` (N, H, W), in ``segments_info`` order.

        Args:
            image_size: ``(height, width)`` of the loaded image, which the PNG must have; default: the JSON's
                (else the image file header's).
        """
        image_id = self.ids[index]
        height, width = image_size if image_size is not None else self._image_size(index)
        ann = self.index.annotations.get(image_id)
        segments = ann["segments_info"] if ann is not None else []
        if not self.include_crowd:
            segments = [s for s in segments if not s.get("iscrowd", 0)]
        if ann is not None:
            ids = read_segment_ids(self.png_path(index))  # (H, W)
            problems = self.png_problems(index, ids, (height, width))
            if problems:
                raise PanopticFormatError("\n".join(problems))
            masks = ids[None] == np.array([s["id"] for s in segments], dtype=np.int64)[:, None, None]  # (N, H, W)
        else:
            masks = np.zeros((0, height, width), dtype=bool)
        mask_tensor = torch.from_numpy(masks)  # (N, H, W) bool
        # masks_to_boxes gives the last pixel's index as x2/y2; +1 makes them pixel edges, like COCO boxes.
        xyxy = masks_to_boxes(mask_tensor) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        labels = [self.label_map.to_label(s["category_id"]) for s in segments]
        isthing = self.label_map.isthing or ()
        return {
            "boxes": tv_tensors.BoundingBoxes(xyxy.reshape(-1, 4), format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": tv_tensors.Mask(mask_tensor.to(torch.uint8)),
            "isthing": torch.tensor([isthing[label] for label in labels], dtype=torch.bool),
            "iscrowd": torch.tensor([int(s.get("iscrowd", 0)) for s in segments], dtype=torch.int64),
            "area": torch.tensor(
                [float(s["area"]) if "area" in s else float(m.sum()) for s, m in zip(segments, masks, strict=True)],
                dtype=torch.float32,
            ),
            "image_id": image_id,
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor([height, width], dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> Sample:
        """``(image (3, H, W) float32, target)``; see the module docstring for the target's keys."""
        image = self.load_image(index)
        target = self.load_target(index, image_size=(image.height, image.width))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return finalize_sample(image, target)
