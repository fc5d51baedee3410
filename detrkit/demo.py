"""The bundled demo: a synthetic COCO-format dataset of coloured shapes, trained and evaluated in minutes on a CPU.

The dataset is written as ordinary image files and a COCO instances JSON, exactly like a user's data, and goes
through the same code paths as any other dataset.

Layer: entry points. May import every layer below the CLI (it drives the engine).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger("detrkit")

# Category ids are deliberately not 0..K-1: the label mapping is part of what the demo exercises.
SHAPES = {1: "circle", 3: "square", 5: "triangle"}
DEMO_VERSION = 2
# A shape may cover at most this fraction of the box of a shape drawn before it: overlaps stay, but no object is
# hidden almost entirely (its annotation would then be unlearnable noise).
MAX_COVERED = 0.35
MIN_COLOR_DISTANCE = 60  # between a shape's colour and those of the shapes before it in the image
PLACEMENT_TRIES = 30


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, s: float, color: tuple) -> list[float]:
    """Draw one shape of size ``s`` with top-left corner (x, y); return its tight [x, y, w, h] box."""
    if kind == "circle":
        draw.ellipse([x, y, x + s, y + s], fill=color)
        return [x, y, s, s]
    if kind == "square":
        draw.rectangle([x, y, x + s, y + s], fill=color)
        return [x, y, s, s]
    h = s * math.sqrt(3) / 2  # equilateral triangle, apex up
    draw.polygon([(x + s / 2, y), (x, y + h), (x + s, y + h)], fill=color)
    return [x, y, s, h]


def _shape_box(kind: str, x: float, y: float, s: float) -> list[float]:
    """The tight [x, y, w, h] box of the shape ``_draw_shape`` draws."""
    return [x, y, s, s * math.sqrt(3) / 2 if kind == "triangle" else s]


def _covered(below: list[float], above: list[float]) -> float:
    """Fraction of box ``below`` ([x, y, w, h]) that box ``above`` overlaps."""
    iw = min(below[0] + below[2], above[0] + above[2]) - max(below[0], above[0])
    ih = min(below[1] + below[3], above[1] + above[3]) - max(below[1], above[1])
    return max(iw, 0.0) * max(ih, 0.0) / (below[2] * below[3])


def generate_shapes_dataset(
    root: str | Path,
    *,
    num_train: int = 2000,
    num_val: int = 100,
    min_side: int = 96,
    max_side: int = 160,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``root/{train,val}/*.png`` and ``root/annotations/{train,val}.json`` (COCO instances format).

    Deterministic for a given seed. Each image has 1–4 shapes (circle, square, triangle) of random colours and
    sizes on a noisy background, some overlapping (a shape covers at most ``MAX_COVERED`` of the box of a shape
    beneath it, and the shapes of an image differ in colour, so that every annotated object stays visible).
    Returns the paths for a run config's ``data`` section. Regenerates nothing when a complete dataset with the
    same parameters is already there.
    """
    root = Path(root)
    params = {
        "version": DEMO_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "min_side": min_side,
        "max_side": max_side,
        "seed": seed,
    }
    paths = {
        "train_images": root / "train",
        "train_annotations": root / "annotations" / "train.json",
        "val_images": root / "val",
        "val_annotations": root / "annotations" / "val.json",
    }
    stamp = root / "params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params and all(p.exists() for p in paths.values()):
        return paths
    rng = np.random.default_rng(seed)
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in SHAPES.items()]
    for split, count in (("train", num_train), ("val", num_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
            base = rng.integers(150, 256, size=3)
            noise = rng.integers(-20, 21, size=(h, w, 3))
            canvas = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
            img = Image.fromarray(canvas)
            draw = ImageDraw.Draw(img)
            drawn: list[tuple[list[float], np.ndarray]] = []  # (box, colour) of the shapes so far
            for _ in range(int(rng.integers(1, 5))):
                cid = int(rng.choice(list(SHAPES)))
                for _ in range(PLACEMENT_TRIES):
                    s = float(rng.uniform(0.15, 0.45) * min(w, h))
                    x = float(rng.uniform(0, w - s))
                    y = float(rng.uniform(0, h - s))
                    color = rng.integers(0, 140, size=3)  # darker than the background
                    box = _shape_box(SHAPES[cid], x, y, s)
                    if all(
                        _covered(old, box) <= MAX_COVERED and np.abs(color - c).sum() >= MIN_COLOR_DISTANCE
                        for old, c in drawn
                    ):
                        break
                else:
                    continue  # no room left for another shape in this image
                drawn.append((box, color))
                _draw_shape(draw, SHAPES[cid], x, y, s, tuple(int(c) for c in color))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": cid,
                        "bbox": [round(v, 2) for v in box],
                        "area": round(box[2] * box[3], 2),
                        "iscrowd": 0,
                    }
                )
            name = f"{split}_{i:05d}.png"
            img.save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        ann_path = root / "annotations" / f"{split}.json"
        ann_path.parent.mkdir(parents=True, exist_ok=True)
        ann_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    stamp.write_text(json.dumps(params))
    return paths


def run_demo(out_dir: Path = Path("demo_run"), overrides: list[str] | None = None) -> dict[str, float]:
    """Generate the data, train the ``demo`` preset, evaluate, draw val predictions and print a summary."""
    from .checkpoint import load
    from .config import load_run_config
    from .engine import Trainer, setup_run
    from .visualize import draw_detections, save_image

    start = time.perf_counter()
    out_dir = Path(out_dir)
    paths = generate_shapes_dataset(out_dir / "data")
    data_overrides = [f"data.{k}={v}" for k, v in paths.items()] + [f"train.output_dir={out_dir / 'run'}"]
    config = load_run_config("demo", data_overrides + list(overrides or []))
    log.info(
        "demo: synthetic data in %s (%.1f s); training the demo config",
        out_dir / "data",
        time.perf_counter() - start,
    )
    # the demo is re-runnable: it regenerates its data and replaces an earlier demo run (announced)
    metrics = Trainer(config, device=setup_run(config.train), overwrite=True).fit()
    train_time = time.perf_counter() - start

    model = load(Path(config.train.output_dir) / "model")
    val_images = sorted(Path(config.data.val_images).glob("*.png"))[:8]
    pred_dir = Path(config.train.output_dir) / "predictions"
    # focal (sigmoid) scores of a model trained for minutes are modest: draw from 0.3 so the pictures show what it finds
    for path, det in zip(val_images, model.predict(val_images, threshold=0.3), strict=True):
        save_image(draw_detections(path, det), pred_dir / path.name)
    total = time.perf_counter() - start
    run = Path(config.train.output_dir)
    print()
    names = {
        "detr": "DETR",
        "conditional_detr": "Conditional DETR",
        "deformable_detr": "Deformable DETR",
        "yolos": "YOLOS",
    }
    arch = names.get(config.model.arch, config.model.arch)
    print(f"detrkit demo — {arch} on synthetic shapes (circle, square, triangle)")
    print(f"  {'AP':>8} {'AP50':>8} {'AP75':>8} {'APs':>8} {'APm':>8} {'APl':>8}")
    print("  " + " ".join(f"{metrics.get(k, float('nan')):8.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
    print(f"  time: {total / 60:.1f} min ({train_time / 60:.1f} min data + training + evaluation)")
    print(f"  run directory: {run}  (metrics.json, curves.png, log.jsonl, model/, predictions/)")
    return metrics
