"""DETR augmentation on torchvision v2: hand-computed boxes through every step."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from detrkit.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConvertBoxesToNormalizedCxcywh,
    RandomShorterSideResize,
    RandomSizeCrop,
    detr_resize_size,
    eval_transforms,
    per_box_target_fields,
    train_transforms,
)


def make_sample(
    height: int, width: int, boxes: list[list[float]], *, color=(255, 0, 128), masks: bool = False
) -> tuple[Image.Image, dict]:
    """A constant-colour PIL image and a v2 target with absolute XYXY boxes (masks: the boxes filled)."""
    n = len(boxes)
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=(height, width),
        ),
        "labels": torch.arange(n, dtype=torch.int64),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
        "area": torch.arange(n, dtype=torch.float32) + 100,
        "image_id": 7,
    }
    if masks:
        m = torch.zeros((n, height, width), dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            m[i, int(y1) : int(y2), int(x1) : int(x2)] = 1
        target["masks"] = tv_tensors.Mask(m)
    return Image.new("RGB", (width, height), color), target


def plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


# ---------------------------------------------------------------- resize rule


@pytest.mark.parametrize(
    ("hw", "size", "max_size", "expected"),
    [
        ((480, 640), 800, 1333, (800, 1066)),  # shorter side to 800, longer floored: int(800 * 640 / 480)
        ((640, 480), 800, None, (1066, 800)),  # portrait
        ((800, 1000), 800, 1333, (800, 1000)),  # already there
        # capped: 4 * 800 > 1333 → short = round(1333 * 100 / 400) = round(333.25) = 333,
        # long = int(333 * 4) = 1332 (v2.Resize(800, max_size=1333) would give 333 x 1333)
        ((100, 400), 800, 1333, (333, 1332)),
        # tiny: 1.5 * 32 = 48 > 40 → short = round(40 * 64 / 96) = round(26.67) = 27, long = int(27 * 1.5)
        ((64, 96), 32, 40, (27, 40)),
        ((300, 100), 64, 150, (150, 50)),  # capped portrait: short = round(150 / 3) = 50, long = int(50 * 3)
    ],
)
def test_detr_resize_size(hw, size, max_size, expected):
    assert detr_resize_size(*hw, size, max_size) == expected


def test_resize_with_max_size_cap_moves_boxes():
    # 50 x 200 (h x w), shorter side to 100 would make the longer 400 > 300: capped, scale 1.5 on both axes.
    image, target = make_sample(50, 200, [[10, 5, 30, 25]])
    out_image, out = RandomShorterSideResize([100], max_size=300)(image, target)
    assert out_image.size == (300, 75)  # PIL: (w, h)
    assert out["boxes"].canvas_size == (75, 300)
    torch.testing.assert_close(plain(out["boxes"]), torch.tensor([[15.0, 7.5, 45.0, 37.5]]))
    # Plain tensors in the target pass through untouched.
    assert out["labels"] is target["labels"] and out["area"] is target["area"]


def test_random_resize_draws_every_size():
    t = RandomShorterSideResize([16, 20, 24])
    seen = set()
    torch.manual_seed(0)
    for _ in range(60):
        image, _ = t(*make_sample(40, 60, []))
        seen.add(image.height)
    assert seen == {16, 20, 24}


# ---------------------------------------------------------------- flip


def test_horizontal_flip_boxes_and_masks():
    image, target = make_sample(50, 100, [[10, 5, 30, 25]], masks=True)
    image.putpixel((0, 0), (0, 255, 0))
    out_image, out = v2.RandomHorizontalFlip(p=1.0)(image, target)
    # x1' = W - x2 = 70, x2' = W - x1 = 90
    torch.testing.assert_close(plain(out["boxes"]), torch.tensor([[70.0, 5.0, 90.0, 25.0]]))
    assert out_image.getpixel((99, 0)) == (0, 255, 0)
    assert out["masks"][0, 5:25, 70:90].all() and out["masks"][0].sum() == 20 * 20


# ---------------------------------------------------------------- crop


def test_crop_clips_partial_boxes_and_drops_outside_ones():
    boxes = [
        [35, 25, 45, 35],  # inside the crop
        [20, 10, 50, 40],  # partly outside: clipped to the crop
        [80, 80, 95, 95],  # fully outside: dropped
        [5, 60, 31, 65],  # 1 px of it inside the crop (x 30..31): kept
    ]
    image, target = make_sample(100, 100, boxes, masks=True)
    crop = RandomSizeCrop(10, 100)
    # The region itself is random; fix it to check the arithmetic: rows 20..70, columns 30..70.
    crop.make_params = lambda flat_inputs: {"top": 20, "left": 30, "height": 50, "width": 40}
    pipeline = v2.Compose([crop, v2.SanitizeBoundingBoxes(labels_getter=per_box_target_fields)])
    out_image, out = pipeline(image, target)

    assert out_image.size == (40, 50)
    assert out["boxes"].canvas_size == (50, 40)
    expected = torch.tensor([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 20.0, 20.0], [0.0, 40.0, 1.0, 45.0]])
    torch.testing.assert_close(plain(out["boxes"]), expected)
    # Every per-box field loses the same (third) entry.
    assert out["labels"].tolist() == [0, 1, 3]
    assert out["area"].tolist() == [100.0, 101.0, 103.0]
    assert out["iscrowd"].tolist() == [0, 0, 0]
    assert out["masks"].shape == (3, 50, 40)
    assert out["masks"][1, 0:20, 0:20].all() and out["masks"][1].sum() == 400


def test_random_size_crop_region_within_bounds():
    crop = RandomSizeCrop(30, 50)
    torch.manual_seed(0)
    sizes = set()
    for _ in range(200):
        p = crop.make_params([Image.new("RGB", (80, 40))])  # w = 80, h = 40
        assert 30 <= p["height"] <= 40 and 30 <= p["width"] <= 50  # height clamped to the image
        assert 0 <= p["top"] <= 40 - p["height"] and 0 <= p["left"] <= 80 - p["width"]
        sizes.add((p["height"], p["width"]))
    assert {h for h, _ in sizes} == set(range(30, 41))
    # An image smaller than min_size is cropped to its own size, not an error.
    p = crop.make_params([Image.new("RGB", (20, 10))])
    assert (p["height"], p["width"], p["top"], p["left"]) == (10, 20, 0, 0)


def test_random_size_crop_rejects_bad_bounds():
    with pytest.raises(ValueError, match="min_size"):
        RandomSizeCrop(50, 30)


# ---------------------------------------------------------------- normalised cxcywh


def test_convert_boxes_to_normalized_cxcywh():
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 100.0, 50.0]]), format="XYXY", canvas_size=(50, 100)
    )
    out = ConvertBoxesToNormalizedCxcywh()({"boxes": boxes, "labels": torch.tensor([1, 2])})
    assert type(out["boxes"]) is torch.Tensor and out["boxes"].dtype == torch.float32
    # cx = 20 / 100, cy = 15 / 50, w = 20 / 100, h = 20 / 50
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4], [0.5, 0.5, 1.0, 1.0]]))


# ---------------------------------------------------------------- whole pipelines


def expected_pixel(color):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(color, IMAGENET_MEAN, IMAGENET_STD, strict=True)])


def test_eval_transforms_hand_computed():
    image, target = make_sample(50, 100, [[10, 5, 30, 25]])
    out_image, out = eval_transforms(size=25, max_size=60)(image, target)
    assert out_image.shape == (3, 25, 50) and out_image.dtype == torch.float32
    torch.testing.assert_close(out_image[:, 3, 7], expected_pixel((255, 0, 128)), atol=1e-4, rtol=0)
    # Resized x0.5: [5, 2.5, 15, 12.5] → cxcywh [10, 7.5, 10, 10] / [50, 25, 50, 25]
    torch.testing.assert_close(plain(out["boxes"]), torch.tensor([[0.2, 0.3, 0.2, 0.4]]))
    assert out["labels"].tolist() == [0] and out["image_id"] == 7


def test_eval_transforms_keep_sub_pixel_boxes():
    # A 1 px box shrinks to 0.25 px at 1/4 scale; evaluation must not drop ground truth.
    image, target = make_sample(80, 80, [[10, 10, 11, 11]])
    _, out = eval_transforms(size=20, max_size=100)(image, target)
    assert out["boxes"].shape == (1, 4)


def test_train_transforms_hand_computed_whatever_the_draw():
    # Chosen so every random branch gives the same answer: one scale, a crop at least as large as the image,
    # and a box symmetric about the vertical centre line (the flip leaves it in place).
    image, target = make_sample(50, 100, [[40, 10, 60, 30]], masks=True)
    pipeline = train_transforms(scales=(25,), max_size=1000, crop_resize=(25,), crop_size=(200, 200))
    for seed in range(8):
        torch.manual_seed(seed)
        out_image, out = pipeline(image, {**target})
        assert out_image.shape == (3, 25, 50)
        torch.testing.assert_close(out_image[:, 0, 0], expected_pixel((255, 0, 128)), atol=1e-4, rtol=0)
        # x0.5: [20, 5, 30, 15] → cxcywh [25, 10, 10, 10] / [50, 25, 50, 25]
        torch.testing.assert_close(plain(out["boxes"]), torch.tensor([[0.5, 0.4, 0.2, 0.4]]))
        assert out["masks"].shape == (1, 25, 50) and out["masks"][0, 5:15, 20:30].all()


def test_train_transforms_keep_fields_consistent_on_tiny_images():
    boxes = [[2, 2, 20, 30], [30, 5, 60, 25], [50, 40, 63, 47], [0, 0, 64, 48]]
    image, target = make_sample(48, 64, boxes, masks=True)
    pipeline = train_transforms(scales=(32, 40, 48), max_size=80, crop_resize=(32, 40), crop_size=(16, 32))
    dropped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out_image, out = pipeline(image, {**target})
        h, w = out_image.shape[-2:]
        # Shorter side one of the scales unless the longer side hit the cap (elongated crops).
        assert max(h, w) <= 80 and (min(h, w) in (32, 40, 48) or max(h, w) >= 76)
        n = out["boxes"].shape[0]
        dropped += n < 4
        assert out["labels"].shape == out["iscrowd"].shape == out["area"].shape == (n,)
        assert out["masks"].shape == (n, h, w)
        b = out["boxes"]
        assert type(b) is torch.Tensor and ((b >= 0) & (b <= 1)).all() and (b[:, 2:] > 0).all()
        # Each mask is its box filled, so its extent must agree with the box. Nearest-neighbour mask resizing
        # rounds edges to a pixel of the intermediate image, and the last resize can upscale a 16 px crop 3x.
        for box, mask, label in zip(b, out["masks"], out["labels"], strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert len(ys) > 0
            x1, y1 = (box[0] - box[2] / 2) * w, (box[1] - box[3] / 2) * h
            x2, y2 = (box[0] + box[2] / 2) * w, (box[1] + box[3] / 2) * h
            mask_box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert torch.allclose(mask_box, torch.stack([x1, y1, x2, y2]), atol=3.5), (seed, int(label))
    assert dropped > 0  # some crops removed boxes


def test_train_transforms_without_crop():
    image, target = make_sample(48, 64, [[0, 0, 4, 4], [60, 44, 64, 48]])
    pipeline = train_transforms(scales=(24, 32), max_size=100, crop_resize=None)
    for seed in range(10):
        torch.manual_seed(seed)
        out_image, out = pipeline(image, {**target})
        assert out_image.shape[-2] in (24, 32) and out["boxes"].shape == (2, 4)  # never cropped away


def test_pipelines_pickle():
    # DataLoader workers receive the dataset, transforms included, by pickling.
    for pipeline in (train_transforms(), eval_transforms()):
        pickle.loads(pickle.dumps(pipeline))


def test_eval_preprocessing_leaves_the_global_rng_alone():
    """Evaluation between epochs must not shift the dropout randomness of the epochs after it (a run resumed
    after an evaluation would otherwise differ from one that never stopped)."""
    image = torch.rand(3, 50, 70)
    state = torch.get_rng_state()
    eval_transforms(size=64, max_size=80)(image)
    assert torch.equal(state, torch.get_rng_state())
