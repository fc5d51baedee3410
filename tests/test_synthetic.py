"""The textured synthetic dataset (detrkit/synthetic.py, `detrkit demo --dataset textured`) and the doctor's
"unlikely to learn in its budget" warning (issue 18)."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from detrkit import doctor, synthetic
from detrkit.cli import main
from detrkit.config import load_run_config
from detrkit.demo import DEMO_DATASETS
from detrkit.synthetic import (
    HARD,
    MIN_VISIBLE,
    SHAPE_IDS,
    TexturedSpec,
    compose,
    generate_textured_dataset,
    rasterize,
    render_image,
    unit_shape,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"min_side": 64, "max_side": 80}  # fast; the default is 128-160
SIDES = {"min_side": 120, "max_side": 150}  # near the default: the size span is the default's


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return generate_textured_dataset(tmp_path_factory.mktemp("textured"), num_train=40, num_val=4, seed=3, **SIDES)


def _pixel_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


# -- the generator ----------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_other_seed_other_data_and_params_stamp(tmp_path, dataset):
    again = generate_textured_dataset(tmp_path / "a", num_train=40, num_val=4, seed=3, **SIDES)
    for key in ("train_annotations", "val_annotations"):
        assert again[key].read_bytes() == dataset[key].read_bytes()
    for key in ("train_images", "val_images"):
        names = sorted(p.name for p in dataset[key].iterdir())
        assert names == sorted(p.name for p in again[key].iterdir()) and names
        assert all((again[key] / n).read_bytes() == (dataset[key] / n).read_bytes() for n in names)
    other = generate_textured_dataset(tmp_path / "b", num_train=3, num_val=0, seed=4, **SMALL)
    same_count = generate_textured_dataset(tmp_path / "c", num_train=3, num_val=0, seed=3, **SMALL)
    assert other["train_annotations"].read_bytes() != same_count["train_annotations"].read_bytes()
    # a second call with the same parameters reuses the files; other parameters regenerate them
    stamp = tmp_path / "a" / "params.json"
    before = (stamp.stat().st_mtime_ns, again["train_annotations"].stat().st_mtime_ns)
    generate_textured_dataset(tmp_path / "a", num_train=40, num_val=4, seed=3, **SIDES)
    assert (stamp.stat().st_mtime_ns, again["train_annotations"].stat().st_mtime_ns) == before
    generate_textured_dataset(tmp_path / "a", num_train=2, num_val=1, seed=3, **SIDES)
    assert len(json.loads(again["train_annotations"].read_text())["images"]) == 2


def test_coco_file_categories_boxes_inside_and_sizes_span(dataset):
    spec = TexturedSpec()
    data = json.loads(dataset["train_annotations"].read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == sorted(spec.categories.items())
    assert len(data["categories"]) == len(spec.classes) >= 6  # twice the demo's shapes
    images = {im["id"]: im for im in data["images"]}
    per_image = {i: 0 for i in images}
    short, relative = [], []
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        with Image.open(dataset["train_images"] / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"]) and f.mode == "RGB"
        assert SIDES["min_side"] <= min(im["width"], im["height"]) <= max(im["width"], im["height"]) <= 150
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"] and w >= 2 and h >= 2
        assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h + 1e-6
        per_image[ann["image_id"]] += 1
        short.append(min(w, h))
        relative.append(max(w, h) / min(im["width"], im["height"]))
    assert 1 <= min(per_image.values()) and max(per_image.values()) == spec.max_objects
    # log-uniform sizes: some near the smallest, some near the largest
    assert min(short) <= 1.2 * spec.min_size and max(relative) >= 0.8 * spec.max_fraction
    assert {a["category_id"] for a in data["annotations"]} == set(spec.categories)


def test_json_is_what_the_renderer_annotated(dataset):
    """Image 1's annotations are the annotated objects of its render, in drawing order (the same random stream)."""
    rng = np.random.default_rng(3)
    w, h = (int(v) for v in rng.integers(SIDES["min_side"], SIDES["max_side"] + 1, size=2))
    pixels, objects = render_image(rng, w, h)
    data = json.loads(dataset["train_annotations"].read_text())
    anns = [a for a in data["annotations"] if a["image_id"] == 1]
    assert [(a["category_id"], a["bbox"]) for a in anns] == [(o.category_id, o.bbox) for o in objects if o.annotated]
    assert np.array_equal(np.asarray(Image.open(dataset["train_images"] / "train_00000.png")), pixels)


def test_rasterize_covers_the_polygon():
    square = np.array([[10.0, 12.0], [20.0, 12.0], [20.0, 22.0], [10.0, 22.0]])
    alpha, (x0, y0) = rasterize([square], [], 40, 30)
    assert (x0, y0) == (10, 12) and alpha.shape == (10, 10) and alpha.min() == 1.0  # on the grid: exact
    hole = np.array([[13.0, 15.0], [17.0, 15.0], [17.0, 19.0], [13.0, 19.0]])
    ring, _ = rasterize([square], [hole], 40, 30)
    assert 84 - 16 / synthetic.SUPERSAMPLE <= ring.sum() <= 84 and ring[5, 5] == 0.0  # a hole: a sub-pixel wider
    triangle = np.array([[3.3, 4.1], [30.7, 9.2], [12.2, 25.9]])  # off the grid: anti-aliased edges
    alpha, (x0, y0) = rasterize([triangle], [], 40, 30)
    area = 0.5 * abs((30.7 - 3.3) * (25.9 - 4.1) - (12.2 - 3.3) * (9.2 - 4.1))
    perimeter = sum(np.hypot(*(triangle[i] - triangle[i - 1])) for i in range(3))
    assert area <= alpha.sum() <= area + perimeter / synthetic.SUPERSAMPLE  # at most a sub-pixel wider
    assert (x0, y0) == (3, 4) and alpha.shape == (22, 28) and ((alpha > 0) & (alpha < 1)).any() and alpha.max() == 1.0


@pytest.mark.parametrize("kind", list(SHAPE_IDS))
def test_box_is_tight_around_the_visible_shape(kind):
    """Each class alone (white on black): the box is that of the pixels it covers at least half of."""
    rng = np.random.default_rng(5)
    alpha, (x0, y0) = rasterize(*synthetic._place(rng, kind, 96, 80, HARD), 96, 80)
    white = np.full((*alpha.shape, 3), 255.0)
    image, (obj,) = compose(np.zeros((80, 96, 3)), [(SHAPE_IDS[kind], x0, y0, alpha, white)])
    assert obj.annotated and obj.visible_fraction == 1.0
    assert obj.bbox == _pixel_box(image[..., 0] >= 128)
    assert 1 <= obj.bbox[0] and obj.bbox[0] + obj.bbox[2] <= 95  # inside, with the 1-px margin


def test_occluded_objects_lose_their_box_or_their_annotation():
    h, w = 40, 60
    below = np.zeros((h, w), np.float32)
    below[10:30, 10:30] = 1  # a 20x20 square
    cover = np.zeros((h, w), np.float32)
    cover[10:30, 16:50] = 1  # hides its right 14 columns: 30% visible
    red, green = np.zeros((h, w, 3)), np.zeros((h, w, 3))
    red[..., 0], green[..., 1] = 255, 255
    image, (a, b) = compose(np.zeros((h, w, 3)), [(1, 0, 0, below, red), (2, 0, 0, cover, green)])
    assert a.visible_fraction == pytest.approx(0.3) and not a.annotated and b.annotated
    assert a.bbox == _pixel_box(image[..., 0] > 0) == [10.0, 10.0, 6.0, 20.0]  # the visible part's box
    partly = np.zeros((h, w), np.float32)
    partly[10:30, 24:50] = 1  # hides 6 of 20 columns: 70% visible, still annotated, its box shrinks
    image, (a, _) = compose(np.zeros((h, w, 3)), [(1, 0, 0, below, red), (2, 0, 0, partly, green)])
    assert a.annotated and a.bbox == _pixel_box(image[..., 0] > 0) == [10.0, 10.0, 14.0, 20.0]


@pytest.mark.parametrize("spec", [TexturedSpec(), HARD], ids=["default", "hard"])
def test_rendered_images_drop_exactly_the_mostly_hidden_objects(spec):
    rng = np.random.default_rng(0)
    dropped = kept = 0
    for _ in range(40):
        _, objects = render_image(rng, 72, 64, spec)
        for obj in objects:
            assert obj.annotated == (obj.visible_fraction >= MIN_VISIBLE and obj.bbox is not None)
            dropped += not obj.annotated
            kept += obj.annotated
    assert kept > 50 and dropped >= 1  # free placements do hide some objects; most stay visible


def test_unit_shapes_and_bad_arguments(tmp_path):
    rng = np.random.default_rng(0)
    for kind in SHAPE_IDS:
        polygons, _ = unit_shape(kind, rng)
        radius = np.hypot(*np.concatenate(polygons).T).max()
        assert 0.99 <= radius <= 1.05  # circumradius about 1 (the cross: 1.04): sizes are comparable across classes
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        unit_shape("blob", rng)
    with pytest.raises(ValueError, match="min_side"):
        generate_textured_dataset(tmp_path, min_side=16)
    with pytest.raises(ValueError, match="max_objects"):
        TexturedSpec(max_objects=0)
    with pytest.raises(ValueError, match="classes must be distinct names"):
        TexturedSpec(classes=("circle", "blob"))
    two = generate_textured_dataset(
        tmp_path / "two", num_train=6, num_val=0, spec=TexturedSpec(classes=("ring", "star"))
    )
    data = json.loads(two["train_annotations"].read_text())
    assert [c["id"] for c in data["categories"]] == [7, 9]  # ids stay SHAPE_IDS' whichever classes are drawn
    assert {a["category_id"] for a in data["annotations"]} == {7, 9}


def test_demo_textured_overrides_make_a_valid_config():
    """`detrkit demo --dataset textured`: the demo preset with the data's sizes and queries, user overrides last."""
    _, overrides, _ = DEMO_DATASETS["textured"]
    config = load_run_config("demo", [*overrides, "model.num_queries=40"])
    demo = load_run_config("demo", [])
    assert config.model.num_queries == 40 and config.data.eval_size == 128 and config.data.train_scales == (128,)
    assert config.model.replace(num_queries=demo.model.num_queries) == demo.model  # otherwise the demo's model
    assert load_run_config("demo", overrides).model.num_queries >= 3 * TexturedSpec().max_objects
    with pytest.raises(SystemExit):
        main(["demo", "--dataset", "coco"])


# -- "unlikely to learn in its budget" ----------------------------------------------------------------------------
def _config(*overrides: str):
    return load_run_config("demo", ["model.arch=detr", "model.class_loss=softmax", *overrides])


def test_budget_warning_when_and_only_when_the_readme_says_so():
    c = _config()
    text = doctor.budget_warning(c.model, c.train, 750)
    assert text.startswith("unlikely to learn in 750 optimizer steps: DETR from scratch")
    assert "AP50 0.053 after 750 steps" in text and "model.two_stage=true" in text and "3000" in text
    assert doctor.budget_warning(c.model, c.train, 2999) is not None
    assert doctor.budget_warning(c.model, c.train, 3000) is None  # enough steps
    # query selection: a softer warning, below the shortest schedule measured to reach AP50 0.6
    c = _config("model.two_stage=true")
    text = doctor.budget_warning(c.model, c.train, 750)
    assert text.startswith("short schedule for DETR from scratch with query selection: 750 optimizer steps")
    assert "AP50 0.326 with a 750-step schedule and 0.638 with a 1750-step one" in text
    assert doctor.budget_warning(c.model, c.train, 1749) is not None
    assert doctor.budget_warning(c.model, c.train, 1750) is None
    c = _config("model.two_stage=true", "model.arch=conditional_detr")
    assert doctor.budget_warning(c.model, c.train, 1249).startswith("short schedule for Conditional DETR")
    assert doctor.budget_warning(c.model, c.train, 1250) is None
    c = _config("model.two_stage=true", "model.backbone_weights=IMAGENET1K_V1")
    assert doctor.budget_warning(c.model, c.train, 100) is None
    for overrides in (
        ["model.backbone_weights=IMAGENET1K_V1"],
        ["train.init_weights=some/folder"],
        ["model.arch=deformable_detr"],  # the demo preset itself
    ):
        c = _config(*overrides)
        assert doctor.budget_warning(c.model, c.train, 100) is None, overrides
    c = load_run_config("demo", ["model.arch=conditional_detr"])
    assert "Conditional DETR from scratch" in doctor.budget_warning(c.model, c.train, 500)
    yolos = c.model.replace(arch="yolos", backbone="vit", two_stage=False)
    text = doctor.budget_warning(yolos, c.train, 500)
    assert "AP50 0.007" in text and "DeiT" in text and "two_stage" not in text


def test_budget_figures_are_the_readmes():
    """Every figure the warning quotes is stated in the README, and the README states the rule."""
    readme = (ROOT / "README.md").read_text()
    figures = [
        *doctor.SLOW_FROM_SCRATCH_AP50.values(),
        *doctor.QUERY_SELECTION_AP50.values(),
        *(ap50 for _, ap50 in doctor.QUERY_SELECTION_GOAL.values()),
        doctor.DEMO_PRESET_AP50,
    ]
    for ap50 in figures:
        assert re.search(rf"\| {ap50:.3f}\b|\*\*{ap50:.3f}\*\*", readme), ap50  # in a table of measurements
    assert f"{doctor.MEASURED_STEPS} steps" in readme
    assert f"{doctor.BUDGET_FACTOR * doctor.MEASURED_STEPS} optimizer steps" in readme


def test_planned_steps_count_as_the_engine_does():
    from detrkit.engine.sampling import EpochSampler, batches_per_epoch

    for n, batch, accum, cap in ((2000, 8, 1, 0), (103, 4, 3, 0), (500, 2, 2, 7), (17, 8, 1, 0)):
        c = _config(f"train.batch_size={batch}", f"train.grad_accum_steps={accum}", f"train.max_steps_per_epoch={cap}")
        engine = batches_per_epoch(EpochSampler(n, shuffle=True, seed=0), c.train) // accum * c.train.epochs
        assert doctor.planned_steps(c.train, n) == engine


def test_doctor_and_train_print_the_warning(tmp_path, capsys, monkeypatch):
    logger = logging.getLogger("detrkit")  # main() adds a handler on this test's stderr: undo it afterwards
    for name in ("handlers", "propagate", "level"):
        monkeypatch.setattr(logger, name, list(logger.handlers) if name == "handlers" else getattr(logger, name))
    paths = generate_textured_dataset(
        tmp_path / "data", num_train=16, num_val=2, spec=TexturedSpec(max_objects=3), **SMALL
    )
    data = [f"data.{k}={v}" for k, v in paths.items()]
    args = ["doctor", "demo", *data, "model.arch=detr", "model.class_loss=softmax"]
    assert main(["demo", "--task", "panoptic", "--dataset", "textured"]) == 2  # refused before anything runs
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "budget    4 optimizer steps on one process (2 epochs of 16 images, batch 8 x 1 accumulation)" in out
    assert "  warning unlikely to learn in 4 optimizer steps: DETR from scratch" in out
    assert main([*args, "model.two_stage=true"]) == 0
    out = capsys.readouterr().out
    assert "unlikely to learn" not in out and "  warning short schedule for DETR from scratch" in out
    steps = math.ceil(doctor.BUDGET_FACTOR * doctor.MEASURED_STEPS / 2)  # 2 steps per epoch
    assert main([*args, f"train.epochs={steps}"]) == 0
    assert "unlikely to learn" not in capsys.readouterr().out

    # train logs it once with its start line (the engine's ProgressLog listener), counted as the trainer does
    from detrkit.engine.listeners import ProgressLog

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    config = _config()
    trainer = SimpleNamespace(
        is_main=True,
        model=SimpleNamespace(config=config.model, num_parameters=lambda trainable_only: 1e6),
        train_set=[None] * 16,
        steps_per_epoch=2,
        config=config,
        device="cpu",
    )
    ProgressLog().on_fit_start(trainer)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("unlikely to learn in 4 optimizer steps")
    records.clear()
    trainer.config = _config("model.two_stage=true", "model.backbone_weights=IMAGENET1K_V1")
    trainer.model.config = trainer.config.model
    ProgressLog().on_fit_start(trainer)
    assert not [r for r in records if r.levelno == logging.WARNING]
    logger.removeHandler(handler)
