"""COCO dataset, targets and collation: tiny generated datasets plus the real coco_mini fixture."""

from __future__ import annotations

import copy
import functools
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from detrkit.data import Batch, CocoDetection, CocoFormatError, collate
from detrkit.transforms import eval_transforms, train_transforms

FIXTURE = Path(__file__).parent / "fixtures" / "coco_mini"
COLOR = (200, 100, 50)

# An 8 x 6 (w x h) mask filled on rows 1..3 and columns 1..4: the polygon [1,1, 5,1, 5,4, 1,4] rasterised by
# the COCO mask API (pixel (x, y) is inside when its centre region is; here exactly the 4 x 3 rectangle).
RECT = np.zeros((6, 8), dtype=bool)
RECT[1:4, 1:5] = True
# The same mask as COCO writes it: uncompressed counts alternate zeros/ones in column-major order (column 0 is
# 6 zeros, then column 1 starts with 1 more zero: 7; rows 1..3 are ones: 3; ...), compressed counts are the
# string pycocotools.mask.encode produces.
RECT_COUNTS = [7, 3, 3, 3, 3, 3, 3, 3, 20]
RECT_COMPRESSED = "73300000a0"


def ann(ann_id, image_id, category_id, bbox, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def write_dataset(
    root: Path,
    annotations: list[dict],
    *,
    images: list[tuple[int, int, int]] = ((1, 40, 30),),
    categories: list[int] = (1, 2),
    mode: str = "RGB",
    suffix: str = ".png",
    edit=None,
) -> tuple[Path, Path]:
    """Images ``(id, width, height)`` of constant colour and their COCO JSON; ``edit`` may alter the dict."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "images": [{"id": i, "file_name": f"{i:04d}{suffix}", "width": w, "height": h} for i, w, h in images],
        "categories": [{"id": c, "name": f"cat{c}"} for c in categories],
        "annotations": annotations,
    }
    for i, w, h in images:
        Image.new("RGB", (w, h), COLOR).convert(mode).save(image_dir / f"{i:04d}{suffix}")
    if edit is not None:
        edit(data)
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(data))
    return image_dir, ann_file


# ---------------------------------------------------------------- labels and ids


def test_category_ids_with_gaps_map_to_contiguous_labels(tmp_path):
    annotations = [ann(1, 1, 42, [0, 0, 10, 10]), ann(2, 1, 3, [5, 5, 10, 10]), ann(3, 1, 7, [1, 1, 4, 4])]
    ds = CocoDetection(*write_dataset(tmp_path, annotations, categories=[42, 3, 7]))
    assert ds.label_map.category_ids == (3, 7, 42)
    assert ds.num_classes == 3
    _, target = ds[0]
    assert target["labels"].tolist() == [2, 0, 1] and target["labels"].dtype == torch.int64


def test_ids_sorted_and_attributes(tmp_path):
    image_dir, ann_file = write_dataset(tmp_path, [], images=[(5, 8, 8), (2, 8, 8), (9, 8, 8)])
    ds = CocoDetection(image_dir, ann_file)
    assert ds.ids == [2, 5, 9] and len(ds) == 3
    assert ds.ann_file == ann_file and ds.image_dir == image_dir
    assert [ds[i][1]["image_id"] for i in range(3)] == [2, 5, 9]


# ---------------------------------------------------------------- targets


def test_boxes_converted_clamped_and_degenerate_dropped(tmp_path):
    annotations = [
        ann(1, 1, 1, [5, 6, 10, 12], area=77.0),  # inside: xyxy [5, 6, 15, 18]
        ann(2, 1, 2, [30, 20, 20, 20]),  # past the bottom-right corner: clamped to [30, 20, 40, 30]
        ann(3, 1, 1, [-5, -5, 10, 10]),  # past the top-left corner: clamped to [0, 0, 5, 5]
        ann(4, 1, 1, [10, 10, 0, 5]),  # zero width: dropped
        ann(5, 1, 1, [50, 5, 10, 10]),  # right of the image (w = 40): empty after clamping, dropped
        ann(6, 1, 1, [10, 10, -3, 4]),  # negative width: dropped
    ]
    ds = CocoDetection(*write_dataset(tmp_path, annotations))  # image 40 x 30
    raw = ds.load_target(0)
    expected = torch.tensor([[5.0, 6.0, 15.0, 18.0], [30.0, 20.0, 40.0, 30.0], [0.0, 0.0, 5.0, 5.0]])
    torch.testing.assert_close(raw["boxes"].as_subclass(torch.Tensor), expected)
    assert raw["boxes"].canvas_size == (30, 40)

    image, target = ds[0]
    assert target["labels"].tolist() == [0, 1, 0]
    # area: the annotation's when given, else the box's w * h from the file (before clamping)
    assert target["area"].tolist() == [77.0, 400.0, 100.0]
    # [5, 6, 15, 18] → cxcywh [10, 12, 10, 12] / [40, 30, 40, 30]
    torch.testing.assert_close(target["boxes"][0], torch.tensor([0.25, 0.4, 0.25, 0.4]))
    torch.testing.assert_close(target["boxes"][1], torch.tensor([35 / 40, 25 / 30, 10 / 40, 10 / 30]))
    assert target["boxes"].dtype == torch.float32 and type(target["boxes"]) is torch.Tensor


def test_crowd_objects_excluded(tmp_path):
    crowd_rle = {"size": [6, 8], "counts": RECT_COUNTS}
    annotations = [
        ann(1, 1, 1, [1, 1, 4, 3], iscrowd=1, segmentation=crowd_rle),
        ann(2, 1, 2, [0, 0, 2, 2], iscrowd=0, segmentation=[[0, 0, 2, 0, 2, 2, 0, 2]]),
    ]
    ds = CocoDetection(*write_dataset(tmp_path, annotations, images=[(1, 8, 6)]), return_masks=True)
    _, target = ds[0]
    assert target["labels"].tolist() == [1]
    assert target["iscrowd"].tolist() == [0]
    assert target["masks"].shape == (1, 6, 8)


def test_image_without_objects(tmp_path):
    image_dir, ann_file = write_dataset(tmp_path, [], images=[(1, 64, 48)])
    for transforms in (
        None,
        train_transforms(scales=(32,), max_size=64, crop_resize=(32,), crop_size=(16, 32)),
    ):
        ds = CocoDetection(image_dir, ann_file, transforms=transforms, return_masks=True)
        image, target = ds[0]
        assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
        assert target["iscrowd"].shape == target["area"].shape == (0,)
        assert target["masks"].shape == (0, *image.shape[-2:]) and target["masks"].dtype == torch.bool


def test_file_without_annotations_key(tmp_path):
    # COCO's image-info files (test-dev) list images and categories only.
    image_dir, ann_file = write_dataset(tmp_path, [], edit=lambda d: d.pop("annotations"))
    ds = CocoDetection(image_dir, ann_file)
    assert ds[0][1]["boxes"].shape == (0, 4)


def test_raw_sample_without_transforms(tmp_path):
    ds = CocoDetection(*write_dataset(tmp_path, [ann(1, 1, 1, [0, 0, 40, 30])]))
    image, target = ds[0]
    assert type(image) is torch.Tensor and image.dtype == torch.float32 and image.shape == (3, 30, 40)
    torch.testing.assert_close(image[:, 7, 9], torch.tensor(COLOR) / 255)
    assert target["orig_size"].tolist() == target["size"].tolist() == [30, 40]
    assert target["orig_size"].dtype == target["size"].dtype == torch.int64
    assert isinstance(target["image_id"], int) and target["image_id"] == 1
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))


def test_eval_transforms_sizes_and_boxes(tmp_path):
    ds = CocoDetection(
        *write_dataset(tmp_path, [ann(1, 1, 1, [4, 6, 8, 12])], images=[(1, 80, 60)]),
        transforms=eval_transforms(size=30, max_size=100),
    )
    image, target = ds[0]
    assert image.shape == (3, 30, 40)
    assert target["orig_size"].tolist() == [60, 80] and target["size"].tolist() == [30, 40]
    # normalised boxes do not change with a uniform resize: cxcywh [8, 12, 8, 12] / [80, 60, 80, 60]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.1, 0.2, 0.1, 0.2]]))


# ---------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("mode", "suffix"), [("L", ".png"), ("P", ".png"), ("RGBA", ".png"), ("CMYK", ".tif"), ("LA", ".png")]
)
def test_image_modes_converted_to_rgb(tmp_path, mode, suffix):
    image_dir, ann_file = write_dataset(tmp_path, [], images=[(1, 6, 4)], mode=mode, suffix=suffix)
    with Image.open(image_dir / f"0001{suffix}") as stored:
        assert stored.mode == mode
        expected = torch.tensor(stored.convert("RGB").getpixel((0, 0)), dtype=torch.float32) / 255
    ds = CocoDetection(image_dir, ann_file)
    assert ds.load_image(0).mode == "RGB"
    image, _ = ds[0]
    assert image.shape == (3, 4, 6)
    torch.testing.assert_close(image[:, 2, 3], expected)
    if mode == "L":  # grayscale: the same value in the three channels
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_rgba_alpha_is_discarded(tmp_path):
    image_dir, ann_file = write_dataset(tmp_path, [], images=[(1, 4, 4)])
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(image_dir / "0001.png")  # fully transparent
    image, _ = CocoDetection(image_dir, ann_file)[0]
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([10.0, 20.0, 30.0]) / 255)


def test_missing_image_file_names_the_file(tmp_path):
    image_dir, ann_file = write_dataset(tmp_path, [])
    (image_dir / "0001.png").unlink()
    ds = CocoDetection(image_dir, ann_file)  # the file is only needed when the sample is read
    with pytest.raises(FileNotFoundError, match="0001.png"):
        ds[0]


def test_unreadable_image_file_names_the_file(tmp_path):
    image_dir, ann_file = write_dataset(tmp_path, [])
    (image_dir / "0001.png").write_bytes(b"this is not an image")
    with pytest.raises(OSError, match="0001.png"):
        CocoDetection(image_dir, ann_file)[0]


def test_image_size_disagreeing_with_annotations(tmp_path):
    image_dir, ann_file = write_dataset(tmp_path, [])
    Image.new("RGB", (30, 40)).save(image_dir / "0001.png")  # rotated: 30 x 40 instead of 40 x 30
    with pytest.raises(ValueError, match=r"0001.png is 30x40 .* says 40x30"):
        CocoDetection(image_dir, ann_file)[0]


# ---------------------------------------------------------------- annotation file validation


def _set_ann(key, value):
    def edit(d):
        d["annotations"][0][key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("images"), "missing key 'images'"),
        (lambda d: d.pop("categories"), "missing key 'categories'"),
        (lambda d: d.update(categories=[]), "'categories' is empty"),
        (lambda d: d.update(images={}), "'images' must be a list"),
        (lambda d: d["annotations"][0].pop("bbox"), "missing 'bbox'"),
        (_set_ann("category_id", 99), "unknown category id 99"),
        (_set_ann("image_id", 123), "unknown image id 123"),
        (_set_ann("bbox", [1, 2, 3]), "bbox must be 4 finite numbers"),
        (_set_ann("bbox", [1, 2, "3", 4]), "bbox must be 4 finite numbers"),
        (_set_ann("bbox", [1, 2, math.inf, 4]), "bbox must be 4 finite numbers"),
        (_set_ann("iscrowd", 2), "iscrowd must be 0 or 1"),
        (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id 1"),
        (lambda d: d["categories"].append({"id": 1, "name": "again"}), "duplicate category id 1"),
        (lambda d: d["images"][0].pop("file_name"), "needs a string 'file_name'"),
    ],
)
def test_invalid_annotation_file(tmp_path, edit, message):
    image_dir, ann_file = write_dataset(tmp_path, [ann(1, 1, 1, [0, 0, 5, 5])], edit=edit)
    with pytest.raises(CocoFormatError, match=message) as info:
        CocoDetection(image_dir, ann_file)
    assert str(ann_file) in str(info.value)


def test_annotation_file_not_json_or_missing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CocoFormatError, match="bad.json: not valid JSON"):
        CocoDetection(tmp_path, bad)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        CocoDetection(tmp_path, tmp_path / "nowhere.json")


def test_masks_require_segmentation(tmp_path):
    paths = write_dataset(tmp_path, [ann(1, 1, 1, [0, 0, 5, 5])])
    CocoDetection(*paths)  # fine without masks
    with pytest.raises(CocoFormatError, match="no 'segmentation'"):
        CocoDetection(*paths, return_masks=True)


# ---------------------------------------------------------------- masks


def test_polygon_and_rle_masks_decoded(tmp_path):
    column = np.zeros((6, 8), dtype=bool)
    column[0:2, 6] = True  # column-major: 36 zeros, 2 ones, 10 zeros
    two_squares = np.zeros((6, 8), dtype=bool)
    two_squares[1:3, 1:3] = two_squares[3:5, 5:7] = True
    annotations = [
        ann(1, 1, 1, [1, 1, 4, 3], segmentation=[[1, 1, 5, 1, 5, 4, 1, 4]]),
        ann(2, 1, 1, [1, 1, 4, 3], segmentation={"size": [6, 8], "counts": RECT_COMPRESSED}),
        ann(3, 1, 2, [1, 1, 4, 3], segmentation={"size": [6, 8], "counts": RECT_COUNTS}),
        ann(4, 1, 2, [6, 0, 1, 2], segmentation={"size": [6, 8], "counts": [36, 2, 10]}),
        # two polygons of one object, and a 2-point "polygon" that encloses nothing (ignored)
        ann(
            5,
            1,
            2,
            [1, 1, 6, 4],
            segmentation=[[1, 1, 3, 1, 3, 3, 1, 3], [5, 3, 7, 3, 7, 5, 5, 5], [0, 0, 1, 1]],
        ),
    ]
    ds = CocoDetection(*write_dataset(tmp_path, annotations, images=[(1, 8, 6)]), return_masks=True)
    _, target = ds[0]
    masks = target["masks"]
    assert masks.dtype == torch.bool and masks.shape == (5, 6, 8)
    for i, expected in enumerate([RECT, RECT, RECT, column, two_squares]):
        assert torch.equal(masks[i], torch.from_numpy(expected)), i


def test_rle_size_must_match_image(tmp_path):
    annotations = [ann(1, 1, 1, [0, 0, 2, 2], segmentation={"size": [5, 8], "counts": [40]})]
    paths = write_dataset(tmp_path, annotations, images=[(1, 8, 6)])
    # refused when the dataset is built, not halfway through an epoch
    with pytest.raises(CocoFormatError, match=r"instances.json: .*annotation 1 of image 1 .*RLE size \[5, 8\]"):
        CocoDetection(*paths, return_masks=True)


def test_masks_follow_the_transforms(tmp_path):
    annotations = [ann(1, 1, 1, [1, 1, 4, 3], segmentation=[[1, 1, 5, 1, 5, 4, 1, 4]])]
    paths = write_dataset(tmp_path, annotations, images=[(1, 8, 6)])
    flip = CocoDetection(*paths, transforms=v2.RandomHorizontalFlip(p=1.0), return_masks=True)
    _, target = flip[0]
    assert torch.equal(target["masks"][0], torch.from_numpy(RECT[:, ::-1].copy()))
    # flipped box [3, 1, 7, 4] → cxcywh [5, 2.5, 4, 3] / [8, 6, 8, 6]
    torch.testing.assert_close(target["boxes"], torch.tensor([[5 / 8, 2.5 / 6, 0.5, 0.5]]))

    resized = CocoDetection(*paths, transforms=eval_transforms(size=12, max_size=100), return_masks=True)
    image, target = resized[0]
    assert image.shape == (3, 12, 16) and target["masks"].shape == (1, 12, 16)
    assert torch.equal(target["masks"][0], torch.from_numpy(RECT.repeat(2, axis=0).repeat(2, axis=1)))


# ---------------------------------------------------------------- collate


def sample(h: int, w: int, image_id: int, value: float = 1.0):
    target = {
        "boxes": torch.rand(2, 4),
        "labels": torch.tensor([0, 1]),
        "image_id": image_id,
        "orig_size": torch.tensor([h * 2, w * 2]),
        "size": torch.tensor([h, w]),
    }
    return torch.full((3, h, w), value), target


def test_collate_pads_to_multiple_of_32():
    batch = collate([sample(50, 70, 3, 1.0), sample(64, 33, 8, -2.0)])
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.pixel_values.shape == (2, 3, 64, 96)  # max h 64, max w 70 → 96
    assert batch.padding_mask.shape == (2, 64, 96) and batch.padding_mask.dtype == torch.bool
    # image 0: valid 50 x 70 top-left; True (padding) elsewhere
    assert not batch.padding_mask[0, :50, :70].any()
    assert batch.padding_mask[0, 50:].all() and batch.padding_mask[0, :, 70:].all()
    assert not batch.padding_mask[1, :64, :33].any() and batch.padding_mask[1, :, 33:].all()
    # content copied, zeros in the padding
    assert (batch.pixel_values[0, :, :50, :70] == 1).all() and (batch.pixel_values[1, :, :, :33] == -2).all()
    assert (batch.pixel_values[0][:, batch.padding_mask[0]] == 0).all()
    assert (batch.pixel_values[1][:, batch.padding_mask[1]] == 0).all()
    assert batch.orig_sizes.tolist() == [[100, 140], [128, 66]] and batch.orig_sizes.dtype == torch.int64
    assert batch.image_ids == [3, 8]
    assert batch.targets[1]["labels"].tolist() == [0, 1]


def test_collate_size_divisibility():
    assert collate([sample(64, 32, 1)]).pixel_values.shape == (1, 3, 64, 32)  # already multiples: no padding
    assert not collate([sample(64, 32, 1)]).padding_mask.any()
    assert collate([sample(50, 70, 1)], size_divisibility=1).pixel_values.shape == (1, 3, 50, 70)
    assert collate([sample(50, 70, 1)], size_divisibility=64).pixel_values.shape == (1, 3, 64, 128)
    with pytest.raises(ValueError, match="size_divisibility"):
        collate([sample(50, 70, 1)], size_divisibility=0)
    with pytest.raises(ValueError, match="at least one"):
        collate([])


def test_batch_to_moves_every_tensor():
    batch = collate([sample(10, 12, 1), sample(8, 8, 2)])
    moved = batch.to("meta")
    assert moved.pixel_values.is_meta and moved.padding_mask.is_meta and moved.orig_sizes.is_meta
    for t in moved.targets:
        assert all(v.is_meta for v in t.values() if isinstance(v, torch.Tensor))
        assert isinstance(t["image_id"], int)
    assert moved.image_ids == [1, 2] and not batch.pixel_values.is_meta  # the original is untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_pin_memory_and_to_cuda():
    batch = collate([sample(10, 12, 1)]).pin_memory()
    assert batch.pixel_values.is_pinned() and batch.targets[0]["boxes"].is_pinned()
    moved = batch.to("cuda", non_blocking=True)
    assert moved.pixel_values.is_cuda and moved.padding_mask.is_cuda and moved.targets[0]["labels"].is_cuda


def test_dataloader_with_partial_collate():
    collate_fn = functools.partial(collate, size_divisibility=64)
    pickle.loads(pickle.dumps(collate_fn))  # workers need it picklable
    ds = CocoDetection(
        FIXTURE / "images", FIXTURE / "annotations.json", transforms=eval_transforms(size=48, max_size=96)
    )
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_fn)
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 3, 2]
    for b in batches:
        assert b.pixel_values.shape[-2] % 64 == 0 and b.pixel_values.shape[-1] % 64 == 0
        for i, t in enumerate(b.targets):
            h, w = t["size"].tolist()
            assert min(h, w) == 48 and max(h, w) <= 96
            assert not b.padding_mask[i, :h, :w].any() and b.padding_mask[i].sum() == b.padding_mask[i].numel() - h * w
    assert [i for b in batches for i in b.image_ids] == ds.ids


# ---------------------------------------------------------------- real COCO fixture


def test_coco_mini_fixture_matches_json():
    data = json.loads((FIXTURE / "annotations.json").read_text())
    ds = CocoDetection(FIXTURE / "images", FIXTURE / "annotations.json", return_masks=True)
    assert len(ds) == len(data["images"]) == 8
    assert ds.num_classes == len(data["categories"]) == 80
    assert ds.ids == sorted(im["id"] for im in data["images"])
    images = {im["id"]: im for im in data["images"]}
    total = 0
    for i in range(len(ds)):
        image, target = ds[i]
        info = images[target["image_id"]]
        anns = [
            a
            for a in data["annotations"]
            if a["image_id"] == info["id"] and not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0
        ]
        total += len(anns)
        assert image.shape == (3, info["height"], info["width"])
        assert target["orig_size"].tolist() == [info["height"], info["width"]]
        assert target["labels"].tolist() == [ds.label_map.to_label(a["category_id"]) for a in anns]
        assert [ds.label_map.to_category_id(int(lbl)) for lbl in target["labels"]] == [a["category_id"] for a in anns]
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        torch.testing.assert_close(ds.load_target(i)["boxes"].as_subclass(torch.Tensor), xyxy)
        # COCO's area is the polygons' exact area; the rasterised masks come within a few percent of it.
        areas = target["masks"].flatten(1).sum(1).float()
        torch.testing.assert_close(areas, torch.tensor([a["area"] for a in anns]), rtol=0.05, atol=10)
    assert total == 17
    assert any(ds[i][1]["boxes"].shape == (0, 4) for i in range(len(ds)))  # 000000000508.jpg has no objects


def test_coco_mini_through_train_transforms():
    pipeline = train_transforms(scales=(64, 80, 96), max_size=160, crop_resize=(64, 80), crop_size=(48, 64))
    ds = CocoDetection(FIXTURE / "images", FIXTURE / "annotations.json", transforms=pipeline, return_masks=True)
    torch.manual_seed(0)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch.pixel_values.shape[0] == 8 and batch.pixel_values.shape[-1] % 32 == 0
    for t in batch.targets:
        n = len(t["labels"])
        assert t["boxes"].shape == (n, 4) and t["masks"].shape == (n, *t["size"].tolist())
        assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()


def test_dataset_does_not_mutate_targets_between_reads():
    ds = CocoDetection(FIXTURE / "images", FIXTURE / "annotations.json")
    first = copy.deepcopy(ds[0][1])
    ds[0]
    assert torch.equal(ds[0][1]["boxes"], first["boxes"])
