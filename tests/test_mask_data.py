"""Masks through the data pipeline: COCO instance masks decoded as pycocotools decodes them, masks moved by the
augmentation exactly like their boxes, and the COCO panoptic format (the demo generator → CocoPanoptic round trip,
and the errors bad panoptic files get, each naming the file and the entry)."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from detrkit.data import CocoDetection, CocoFormatError, _decode_segmentation, collate
from detrkit.demo import generate_panoptic_shapes, generate_shapes_dataset
from detrkit.panoptic_data import CocoPanoptic, PanopticFormatError, id_to_rgb, rgb_to_id
from detrkit.transforms import RandomShorterSideResize, per_box_target_fields, train_transforms

# pycocotools 2.0.11 on NumPy 2 warns about a copy keyword on every decode
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")
mask_utils = pytest.importorskip("pycocotools.mask")
COCO = pytest.importorskip("pycocotools.coco").COCO

FIXTURE = Path(__file__).parent / "fixtures" / "coco_mini"
COCO128 = Path(__file__).resolve().parents[2] / "shared/data/coco128"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    """The panoptic demo data, small."""
    root = tmp_path_factory.mktemp("panoptic_shapes")
    return generate_panoptic_shapes(root, 6, 2, min_side=48, max_side=64, seed=1)


def write_instances(root: Path, annotations: list[dict], width: int = 40, height: int = 30) -> tuple[Path, Path]:
    """One constant image of ``width`` × ``height`` and a COCO instances JSON with ``annotations`` (categories 1, 2)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(root / "images" / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": width, "height": height}],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
        "annotations": annotations,
    }
    (root / "instances.json").write_text(json.dumps(data))
    return root / "images", root / "instances.json"


def ann(ann_id: int, segmentation, bbox=(1, 1, 10, 10), category_id: int = 1, **extra) -> dict:
    return {
        "id": ann_id,
        "image_id": 1,
        "category_id": category_id,
        "bbox": list(bbox),
        "segmentation": segmentation,
        **extra,
    }


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a (h, w) mask: run lengths, column-major, starting with a background run."""
    flat = mask.T.reshape(-1).astype(np.int64)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def absolute_xyxy(target: dict) -> torch.Tensor:
    """A finalised target's normalised cxcywh boxes → absolute (x1, y1, x2, y2) pixels of its image."""
    h, w = target["size"].tolist()
    cx, cy, bw, bh = (target["boxes"] * torch.tensor([w, h, w, h])).unbind(-1)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool → (N, 4) pixel-edge xyxy boxes of the masks (computed here, not with the code under test)."""
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def png_ids(path: Path) -> np.ndarray:
    """A panoptic PNG's segment ids, read independently of detrkit: R + 256·G + 256²·B."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


# ---------------------------------------------------------------- COCO instance masks


def test_polygons_and_rle_decode_like_pycocotools(tmp_path):
    rng = np.random.default_rng(0)
    blob = np.zeros((30, 40), dtype=np.uint8)
    blob[5:20, 8:30] = rng.random((15, 22)) > 0.3  # ragged: many runs
    blob[0, 0] = blob[29, 39] = 1  # runs touching both ends of the column-major order
    compressed = mask_utils.encode(np.asfortranarray(blob))
    compressed["counts"] = compressed["counts"].decode("ascii")
    annotations = [
        ann(1, [[2.5, 3.0, 20.25, 4.0, 11.0, 17.5]]),  # one part, fractional coordinates
        # three parts, two of them overlapping: the object's mask is their union
        ann(2, [[1, 1, 9, 1, 9, 9, 1, 9], [5, 5, 14, 5, 14, 14, 5, 14], [30, 20, 38, 20, 34, 28]]),
        ann(3, uncompressed_rle(blob), category_id=2),
        ann(4, compressed, category_id=2),
        ann(5, [[0, 0, 39.9, 0, 39.9, 29.9, 0, 29.9]]),  # the whole image
    ]
    image_dir, ann_file = write_instances(tmp_path, annotations)
    masks = CocoDetection(image_dir, ann_file, return_masks=True).load_target(0)["masks"]
    coco = COCO(str(ann_file))
    assert masks.shape == (5, 30, 40)
    for i, a in enumerate(annotations):
        expected = torch.from_numpy(coco.annToMask(coco.loadAnns(a["id"])[0]))
        assert torch.equal(masks[i].as_subclass(torch.Tensor), expected), a["id"]
    assert torch.equal(masks[2].as_subclass(torch.Tensor), torch.from_numpy(blob))


def _check_against_pycocotools(image_dir: Path, ann_file: Path, image_ids: list[int] | None = None) -> int:
    """Every decoded mask of the file (crowd regions through the same decoder) equals ``annToMask``; returns how
    many were compared."""
    coco = COCO(str(ann_file))
    ds = CocoDetection(image_dir, ann_file, return_masks=True)
    compared = 0
    for i, image_id in enumerate(ds.ids):
        if image_ids is not None and image_id not in image_ids:
            continue
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        kept = [a for a in anns if not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        masks = ds.load_target(i)["masks"].as_subclass(torch.Tensor)
        assert masks.shape[0] == len(kept)
        for mask, a in zip(masks, kept, strict=True):
            assert torch.equal(mask, torch.from_numpy(coco.annToMask(a)).bool()), a["id"]
        info = coco.loadImgs(image_id)[0]
        for a in anns:
            if a["iscrowd"]:  # uncompressed RLE in real files
                decoded = _decode_segmentation(a["segmentation"], info["height"], info["width"], "crowd")
                assert np.array_equal(decoded, coco.annToMask(a)), a["id"]
        compared += len(anns)
    return compared


def test_real_coco_masks_decode_like_pycocotools():
    assert _check_against_pycocotools(FIXTURE / "images", FIXTURE / "annotations.json") == 17


@pytest.mark.skipif(not COCO128.is_dir(), reason="needs ../shared/data/coco128")
def test_coco128_masks_decode_like_pycocotools():
    ann_file = COCO128 / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    # every image with a multi-part polygon or a crowd region (uncompressed RLE), plus a few plain ones
    chosen = {a["image_id"] for a in data["annotations"] if a["iscrowd"] or len(a["segmentation"]) > 1}
    chosen |= {im["id"] for im in data["images"][:4]}
    assert _check_against_pycocotools(COCO128 / "train2017", ann_file, sorted(chosen)) > 100


def test_short_and_empty_segmentations_are_fixed_up_and_announced(tmp_path, caplog):
    zeros = {"size": [30, 40], "counts": [1200]}
    annotations = [
        ann(1, [[1, 1, 9, 1, 9, 9, 1, 9], [3, 3, 5, 5]]),  # a 2-point part: ignored, the square stays
        ann(2, []),  # empty
        ann(3, [[0, 0, 2, 2]]),  # only a 2-point "polygon" (4 numbers, which pycocotools would read as a box)
        ann(4, zeros),  # RLE without a pixel
        ann(5, [[20, 20, 30, 20, 30, 28]], category_id=2),
    ]
    image_dir, ann_file = write_instances(tmp_path, annotations)
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        ds = CocoDetection(image_dir, ann_file, return_masks=True)
    text = caplog.text
    assert "4 annotation(s) fixed up" in text
    assert "polygon part with fewer than 3 points ignored (1): annotation 1 of image 1" in text
    assert "dropped: empty segmentation (3): annotation 2 of image 1" in text and "annotation 3" in text
    image, target = ds[0]
    assert target["labels"].tolist() == [0, 1] and target["masks"].shape == (2, 30, 40)
    assert target["masks"][0].sum() == 64  # the 8 x 8 square of annotation 1
    # without masks nothing is dropped: detection does not read segmentations
    assert len(CocoDetection(image_dir, ann_file)[0][1]["labels"]) == 5


@pytest.mark.parametrize(
    "segmentation, message",
    [
        ([[1, 1, 9, 1, 9]], r"polygon 0 is not a flat list"),
        ([[1, 1, 9, 1, 9, "x"]], r"polygon 0 is not a flat list"),
        ([[1, 1, 9, 1, 9, float("nan")]], r"polygon 0 is not a flat list"),
        ({"size": [30, 40], "counts": [10, 5]}, r"RLE counts must be non-negative ints adding up to h \* w = 1200"),
        ({"size": [30, 40], "counts": [1300, -100]}, r"RLE counts must be non-negative"),
        ({"size": [40, 30], "counts": [1200]}, r"RLE size \[40, 30\] does not match the image \[h, w\] = \[30, 40\]"),
        ({"size": [30, 40], "counts": "a"}, r"RLE counts cannot be read: RLE string is malformed"),
        ({"size": [30, 40], "counts": 7}, r"RLE counts must be a list or a string"),
        ("polygon", r"segmentation must be a list of polygons or an RLE dict"),
    ],
)
def test_invalid_segmentations_are_refused_naming_the_annotation(tmp_path, segmentation, message):
    annotations = [ann(1, [[1, 1, 9, 1, 9, 9]]), ann(7, segmentation)]
    paths = write_instances(tmp_path, annotations)
    with pytest.raises(CocoFormatError, match=r"instances.json: invalid segmentation \(1\): annotation 7 of image 1 "):
        CocoDetection(*paths, return_masks=True)
    with pytest.raises(CocoFormatError, match=message):
        CocoDetection(*paths, return_masks=True)
    CocoDetection(*paths)  # detection alone never reads segmentations


def test_compressed_rle_of_the_wrong_length_is_refused_when_read(tmp_path):
    # Its area can be read without decoding (so the dataset is built), its length only by decoding it.
    annotations = [ann(1, [[1, 1, 9, 1, 9, 9]]), ann(7, {"size": [30, 40], "counts": "zzzz"})]
    ds = CocoDetection(*write_instances(tmp_path, annotations), return_masks=True)
    with pytest.raises(CocoFormatError, match=r"instances.json: annotation 7 \(image 1\): segmentation cannot be"):
        ds[0]


def test_crowd_regions_are_not_targets_and_need_no_valid_segmentation(tmp_path):
    annotations = [ann(1, [[1, 1, 9, 1, 9, 9]]), ann(2, "anything", iscrowd=1), ann(3, [[20, 20, 30, 20, 30, 28]])]
    ds = CocoDetection(*write_instances(tmp_path, annotations), return_masks=True)
    _, target = ds[0]
    assert target["masks"].shape[0] == len(target["labels"]) == 2 and target["iscrowd"].tolist() == [0, 0]


# ---------------------------------------------------------------- masks move with their boxes


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("size", [37, 48, 97])  # down, none, up
def test_masks_follow_flips_and_resizes_like_boxes(shapes, flip, size):
    steps = [v2.RandomHorizontalFlip(p=1.0)] if flip else []
    transforms = v2.Compose([*steps, RandomShorterSideResize([size], max_size=200)])
    instances = CocoDetection(
        shapes["train_images"], shapes["train_instances"], transforms=transforms, return_masks=True
    )
    panoptic = CocoPanoptic(shapes["train_images"], shapes["train_panoptic"], transforms=transforms)
    for ds in (instances, panoptic):
        for i in range(len(ds)):
            image, target = ds[i]
            before = ds.load_target(i)
            n = len(target["labels"])
            assert target["masks"].dtype == torch.bool and target["masks"].shape == (n, *image.shape[-2:])
            # before transforms a box is its mask's pixel extent exactly
            masks = before["masks"].as_subclass(torch.Tensor).bool()
            torch.testing.assert_close(mask_boxes(masks), before["boxes"].as_subclass(torch.Tensor), atol=0, rtol=0)
            # the masks are the reference's: flipped, then resized nearest-neighbour (facebookresearch/detr
            # datasets/transforms.py: interpolate(mode="nearest") > 0.5)
            expected = masks.flip(-1) if flip else masks
            expected = torch.nn.functional.interpolate(expected[:, None].float(), size=image.shape[-2:], mode="nearest")
            assert torch.equal(target["masks"], expected[:, 0] > 0.5)
            # and their extents stay on the boxes: within 1 px, plus for downscaling the input rows and columns
            # nearest-neighbour sampling skips (a triangle's apex, a circle's leftmost column may vanish)
            scale = size / min(masks.shape[-2:])
            tolerance = 1.0 if scale >= 1 else 1.0 + 2 * scale
            torch.testing.assert_close(mask_boxes(target["masks"]), absolute_xyxy(target), atol=tolerance, rtol=0)


def test_crop_drops_masks_with_their_boxes(shapes):
    crop = (30, 26)
    sanitize = v2.SanitizeBoundingBoxes(labels_getter=per_box_target_fields)
    ds = CocoPanoptic(shapes["train_images"], shapes["train_panoptic"], transforms=None)
    dropped = 0
    for i in range(len(ds)):
        image = ds.load_image(i)
        before = ds.load_target(i, (image.height, image.width))
        _, after = sanitize(*v2.CenterCrop(crop)(image, before))
        # the expected result, computed directly: the crop window of every mask, objects whose clipped box is
        # at least 1 px wide and high kept (SanitizeBoundingBoxes' rule)
        top, left = round((image.height - crop[0]) / 2), round((image.width - crop[1]) / 2)
        window = before["masks"][:, top : top + crop[0], left : left + crop[1]].as_subclass(torch.Tensor)
        boxes = before["boxes"].as_subclass(torch.Tensor) - torch.tensor([left, top, left, top])
        boxes = boxes.clamp(min=0).minimum(torch.tensor([crop[1], crop[0], crop[1], crop[0]]))
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        dropped += int((~keep).sum())
        assert isinstance(after["masks"], tv_tensors.Mask)
        assert torch.equal(after["masks"].as_subclass(torch.Tensor), window[keep])
        torch.testing.assert_close(after["boxes"].as_subclass(torch.Tensor), boxes[keep])
        for key in ("labels", "isthing", "iscrowd", "area"):
            assert torch.equal(after[key], before[key][keep]), key
    assert dropped > 0  # the crop did drop objects


def test_train_transforms_keep_masks_aligned(shapes):
    pipeline = train_transforms(scales=(40, 48, 56), max_size=96, crop_resize=(40, 48), crop_size=(24, 36))
    for ds in (
        CocoPanoptic(shapes["train_images"], shapes["train_panoptic"], transforms=pipeline),
        CocoDetection(shapes["train_images"], shapes["train_instances"], transforms=pipeline, return_masks=True),
    ):
        for seed in range(6):
            torch.manual_seed(seed)
            for i in range(len(ds)):
                image, t = ds[i]
                n = len(t["labels"])
                assert t["boxes"].shape == (n, 4) and t["masks"].shape == (n, *image.shape[-2:])
                assert t["masks"].dtype == torch.bool and len(t["iscrowd"]) == len(t["area"]) == n
                if "isthing" in t:
                    assert t["isthing"].shape == (n,) and t["isthing"].dtype == torch.bool
                # A mask stays inside its box (a crop may leave a box larger than its cropped mask), up to the
                # rounding of two nearest-neighbour resizes, the second one enlarging the first's by up to 56/24.
                for mask, box in zip(t["masks"], absolute_xyxy(t), strict=True):
                    if mask.any():
                        mb = mask_boxes(mask[None])[0]
                        assert (mb[:2] >= box[:2] - 3.5).all() and (mb[2:] <= box[2:] + 3.5).all()


def test_collate_keeps_masks_unpadded(shapes):
    ds = CocoPanoptic(shapes["train_images"], shapes["train_panoptic"])
    ds = pickle.loads(pickle.dumps(ds))  # DataLoader workers receive a pickled dataset
    batch = collate([ds[i] for i in range(3)])
    assert batch.pixel_values.shape[-1] % 32 == 0
    for t in batch.targets:
        n = len(t["labels"])
        assert t["masks"].shape == (n, *t["size"].tolist()) and t["masks"].dtype == torch.bool
        assert t["isthing"].shape == (n,)
    moved = batch.to("meta")
    assert all(t["masks"].is_meta for t in moved.targets)


# ---------------------------------------------------------------- COCO panoptic: the demo data round trip


@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_round_trip(shapes, split):
    data = json.loads(shapes[f"{split}_panoptic"].read_text())
    categories = {c["id"]: c for c in data["categories"]}
    entries = {a["image_id"]: a for a in data["annotations"]}
    ds = CocoPanoptic(shapes[f"{split}_images"], shapes[f"{split}_panoptic"])
    assert ds.png_dir == shapes[f"{split}_panoptic_pngs"]  # the JSON's path without .json
    coco = COCO(str(shapes[f"{split}_instances"]))
    void_pixels = 0
    for i, image_id in enumerate(ds.ids):
        image, target = ds[i]
        entry = entries[image_id]
        ids = png_ids(shapes[f"{split}_panoptic_pngs"] / entry["file_name"])
        segments = entry["segments_info"]
        assert image.shape[-2:] == ids.shape and target["size"].tolist() == list(ids.shape)
        # the masks are the PNG's segments exactly, in segments_info order; VOID is no segment
        masks = target["masks"]
        assert masks.shape == (len(segments), *ids.shape)
        for mask, seg in zip(masks, segments, strict=True):
            assert torch.equal(mask, torch.from_numpy(ids == seg["id"]))
        assert masks.sum(0).max() <= 1
        assert torch.equal(masks.any(0), torch.from_numpy(ids != 0))
        void_pixels += int((ids == 0).sum())
        # boxes: the masks' pixel extents, which are the JSON's bbox; areas: the JSON's, the pixel counts
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (s["bbox"] for s in segments)], dtype=torch.float32)
        torch.testing.assert_close(absolute_xyxy(target), xyxy.reshape(-1, 4), atol=1e-4, rtol=0)
        assert target["area"].tolist() == [s["area"] for s in segments] == masks.sum((1, 2)).tolist()
        assert [ds.label_map.to_category_id(lbl) for lbl in target["labels"]] == [s["category_id"] for s in segments]
        assert target["isthing"].tolist() == [bool(categories[s["category_id"]]["isthing"]) for s in segments]
        assert target["iscrowd"].tolist() == [0] * len(segments)
        assert {"sky", "ground"} & {categories[s["category_id"]]["name"] for s in segments}
        # the instances file holds the things, with the same masks
        things = [mask for mask, s in zip(masks, segments, strict=True) if categories[s["category_id"]]["isthing"]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(things) > 0
        for mask, a in zip(things, anns, strict=True):
            assert torch.equal(torch.from_numpy(coco.annToMask(a)).bool(), mask)
    assert void_pixels > 0  # the rows between sky and ground


def test_label_map_carries_isthing(shapes):
    ds = CocoPanoptic(shapes["val_images"], shapes["val_panoptic"])
    assert ds.label_map.category_ids == (1, 3, 5, 10, 12) and ds.num_classes == 5
    assert ds.label_map.names == ("circle", "square", "triangle", "sky", "ground")
    assert ds.label_map.isthing == (True, True, True, False, False)
    assert type(ds.label_map).from_dict(ds.label_map.to_dict()) == ds.label_map


def test_segment_ids_and_colours_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536, 256**3 - 1]])
    assert np.array_equal(rgb_to_id(id_to_rgb(ids)), ids)
    assert id_to_rgb(ids)[1, 1].tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="segment ids must lie in"):
        id_to_rgb(np.array([256**3]))


def test_generators_are_deterministic_and_detection_output_unchanged(tmp_path, shapes):
    again = generate_panoptic_shapes(tmp_path / "again", 6, 2, min_side=48, max_side=64, seed=1)
    for key in ("train_panoptic", "train_instances", "val_panoptic"):
        assert again[key].read_bytes() == shapes[key].read_bytes(), key
    for name in ("train_00000.png", "train_00005.png"):
        assert (again["train_panoptic_pngs"] / name).read_bytes() == (shapes["train_panoptic_pngs"] / name).read_bytes()
        assert np.array_equal(
            np.asarray(Image.open(again["train_images"] / name)), np.asarray(Image.open(shapes["train_images"] / name))
        )
    # the detection demo's data (and so its published figures) are what they were before the panoptic variant
    paths = generate_shapes_dataset(tmp_path / "detection", num_train=3, num_val=1, min_side=48, max_side=64)
    annotations, pixels = hashlib.sha256(), hashlib.sha256()
    for split in ("train", "val"):
        annotations.update(paths[f"{split}_annotations"].read_bytes())
        for f in sorted(paths[f"{split}_images"].glob("*.png")):
            pixels.update(np.asarray(Image.open(f)).tobytes())
    assert annotations.hexdigest() == "7e7e0c2fb38370a958f183e048cf33e87035fb353283148693af7b0f43d4a50e"
    assert pixels.hexdigest() == "be4c0924820b1d3c4317ba2de248e68d3fc5fb19f04a59bc354b9baad1bed43c"


# ---------------------------------------------------------------- COCO panoptic: bad input


@pytest.fixture
def editable(shapes, tmp_path):
    """A copy of the demo's train split: ``(image_dir, ann_file, png_dir, data)``; ``save(data)`` rewrites it."""
    image_dir = shutil.copytree(shapes["train_images"], tmp_path / "images")
    png_dir = shutil.copytree(shapes["train_panoptic_pngs"], tmp_path / "panoptic")
    ann_file = tmp_path / "panoptic.json"
    data = json.loads(shapes["train_panoptic"].read_text())
    return image_dir, ann_file, png_dir, data


def save(ann_file: Path, data: dict) -> Path:
    ann_file.write_text(json.dumps(data))
    return ann_file


def test_png_dir_default_and_override(editable, tmp_path):
    image_dir, ann_file, png_dir, data = editable
    save(ann_file, data)
    assert len(CocoPanoptic(image_dir, ann_file)) == 6  # panoptic.json → panoptic/
    moved = shutil.move(png_dir, tmp_path / "elsewhere")
    with pytest.raises(PanopticFormatError, match=r"panoptic.json: PNG folder \(1\): no such folder .*panoptic\b"):
        CocoPanoptic(image_dir, ann_file)
    ds = CocoPanoptic(image_dir, ann_file, png_dir=moved)
    assert ds.png_path(0).parent == Path(moved) and len(ds[0][1]["labels"]) > 0


def test_id_in_png_without_segment(editable):
    image_dir, ann_file, _, data = editable
    removed = data["annotations"][2]["segments_info"].pop(1)
    ds = CocoPanoptic(image_dir, save(ann_file, data))
    ds[0]  # other images are fine
    with pytest.raises(
        PanopticFormatError,
        match=rf"train_00002.png \(image 3 of .*panoptic.json\): ids \[{removed['id']}\] have pixels but no entry",
    ):
        ds[2]


def test_segment_without_pixels(editable):
    image_dir, ann_file, _, data = editable
    data["annotations"][1]["segments_info"].append(
        {"id": 4242, "category_id": 3, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1}
    )
    ds = CocoPanoptic(image_dir, save(ann_file, data))
    with pytest.raises(
        PanopticFormatError,
        match=r"train_00001.png \(image 2 of .*\): segments \[4242\] of segments_info have no pixel",
    ):
        ds[1]


def test_check_pngs_reports_every_bad_png(editable):
    image_dir, ann_file, png_dir, data = editable
    data["annotations"][1]["segments_info"].pop(0)
    data["annotations"][4]["segments_info"].pop(0)
    ds = CocoPanoptic(image_dir, save(ann_file, data))
    with pytest.raises(
        PanopticFormatError, match=r"PNG does not match segments_info \(2\).*train_00001.png.*train_00004.png"
    ):
        ds.check_pngs()


def test_missing_png(editable):
    image_dir, ann_file, png_dir, data = editable
    (png_dir / "train_00003.png").unlink()
    with pytest.raises(
        PanopticFormatError,
        match=r"panoptic.json: missing PNG \(1\): image 4 \(PNG 'train_00003.png'\): no file .*train_00003.png",
    ):
        CocoPanoptic(image_dir, save(ann_file, data))


def test_unknown_category_and_duplicate_segment_ids_are_all_reported(editable):
    image_dir, ann_file, _, data = editable
    segments = data["annotations"][0]["segments_info"]
    segments[0]["category_id"] = 99
    segments[2]["id"] = segments[1]["id"]
    with pytest.raises(PanopticFormatError) as error:
        CocoPanoptic(image_dir, save(ann_file, data))
    text = str(error.value)
    where = "image 1 (PNG 'train_00000.png')"
    assert f"unknown category id (1): {where}: segment {segments[0]['id']} has unknown category id 99" in text
    assert f"duplicate segment id (1): {where}: segment {segments[1]['id']} appears twice" in text


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["categories"][3].pop("isthing"), r"category without isthing \(1\): category 10 \('sky'\)"),
        (
            lambda d: d["annotations"][0]["segments_info"][0].update(id=0),
            r"segment 0: id must lie in \[1, 16777215\] \(0 is VOID\)",
        ),
        (lambda d: d["annotations"].pop(5), r"image without annotation \(1\): image 6 \('train_00005.png'\)"),
        (
            lambda d: d["annotations"].append(dict(d["annotations"][0])),
            r"duplicate annotation \(1\): image 1 has more than one",
        ),
        (
            lambda d: d["annotations"][0].update(image_id=77),
            r"unknown image id \(1\): annotations\[0\] refers to unknown image id 77",
        ),
        (lambda d: d["annotations"][0].update(file_name="../x.png"), r"image 1 \(PNG '../x.png'\): file_name leaves"),
        (lambda d: d["annotations"][0]["segments_info"][0].update(iscrowd=2), r"iscrowd must be 0 or 1"),
    ],
)
def test_invalid_panoptic_json(editable, edit, message):
    image_dir, ann_file, _, data = editable
    edit(data)
    with pytest.raises(PanopticFormatError, match=r"panoptic.json: (.|\n)*" + message):
        CocoPanoptic(image_dir, save(ann_file, data))


def test_png_of_another_size_or_mode(editable):
    image_dir, ann_file, png_dir, data = editable
    ds = CocoPanoptic(image_dir, save(ann_file, data))
    rgb = np.asarray(Image.open(png_dir / "train_00000.png"))
    Image.fromarray(rgb[:-1]).save(png_dir / "train_00000.png")
    with pytest.raises(PanopticFormatError, match=r"train_00000.png \(image 1 of .*\) is \d+x\d+ \(w x h\), the image"):
        ds[0]
    Image.fromarray(rgb[..., 0]).save(png_dir / "train_00001.png")  # grayscale
    with pytest.raises(PanopticFormatError, match=r"panoptic PNG .*train_00001.png: mode 'L', expected RGB"):
        ds[1]


def test_crowd_segments(editable):
    image_dir, ann_file, _, data = editable
    data["annotations"][0]["segments_info"][2]["iscrowd"] = 1
    save(ann_file, data)
    _, kept = CocoPanoptic(image_dir, ann_file)[0]
    _, left_out = CocoPanoptic(image_dir, ann_file, include_crowd=False)[0]
    # the reference's default: a crowd segment is a target, flagged; include_crowd=False leaves it out
    assert kept["iscrowd"].tolist()[2] == 1 and kept["iscrowd"].sum() == 1
    assert len(left_out["labels"]) == len(kept["labels"]) - 1 and left_out["iscrowd"].sum() == 0
    keep = torch.arange(len(kept["labels"])) != 2
    assert torch.equal(left_out["masks"], kept["masks"][keep])
    assert torch.equal(left_out["labels"], kept["labels"][keep])
