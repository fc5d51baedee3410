"""The bundled demo: a synthetic COCO-format dataset of coloured shapes, trained and evaluated in minutes on a CPU.

The dataset is written as ordinary image files and a COCO instances JSON, exactly like a user's data, and goes
through the same code paths as any other dataset. :func:`generate_panoptic_shapes` writes the same shapes over a
sky/ground background in COCO panoptic format (plus the things' instance masks), for the segmentation demo.

Layer: entry points. May import every layer below the CLI (it drives the engine).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .synthetic import HARD, TexturedSpec, dataset_paths, generate_textured_dataset, is_complete

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


Shape = tuple[int, float, float, float, np.ndarray, list[float]]  # category id, x, y, side, colour, [x, y, w, h]


def _place_shapes(rng: np.random.Generator, w: int, h: int) -> list[Shape]:
    """Draw 1–4 shapes for a ``w`` × ``h`` image from ``rng``, in drawing order (later ones on top).

    A shape covers at most ``MAX_COVERED`` of the box of a shape placed before it and differs in colour from each
    of them by ``MIN_COLOR_DISTANCE``; a shape that finds no such place in ``PLACEMENT_TRIES`` tries is left out.
    """
    placed: list[Shape] = []
    for _ in range(int(rng.integers(1, 5))):
        cid = int(rng.choice(list(SHAPES)))
        for _ in range(PLACEMENT_TRIES):
            s = float(rng.uniform(0.15, 0.45) * min(w, h))
            x = float(rng.uniform(0, w - s))
            y = float(rng.uniform(0, h - s))
            color = rng.integers(0, 140, size=3)  # darker than the background
            box = _shape_box(SHAPES[cid], x, y, s)
            if all(
                _covered(old[5], box) <= MAX_COVERED and np.abs(color - old[4]).sum() >= MIN_COLOR_DISTANCE
                for old in placed
            ):
                break
        else:
            continue  # no room left for another shape in this image
        placed.append((cid, x, y, s, color, box))
    return placed


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
    paths = dataset_paths(root)
    stamp = root / "params.json"
    if is_complete(stamp, params, paths):
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
            for cid, x, y, s, color, box in _place_shapes(rng, w, h):
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


# The panoptic variant's "stuff": the part of the background above the horizon and the part below it.
STUFF = {10: "sky", 12: "ground"}
CATEGORY_COLORS = {1: (220, 20, 60), 3: (0, 0, 142), 5: (0, 130, 0), 10: (70, 130, 180), 12: (150, 100, 60)}
HORIZON_VOID_ROWS = 2  # rows left unlabelled (VOID) where sky meets ground, as COCO leaves unclear borders
SEGMENT_ID_BASE = 100_000  # segment id = SEGMENT_ID_BASE * category id + n: ids that use all three PNG channels


def _panoptic_image(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """One image of the panoptic demo: ``(pixels (h, w, 3) uint8, segment ids (h, w) int64, [(id, category id)])``.

    Sky above a horizon drawn at 30–70 % of the height, textured ground below it, ``HORIZON_VOID_ROWS`` of VOID
    between them, then the shapes of :func:`_place_shapes`, each painted into the pixels and into the id map
    through one rasterised mask, so that the map is exact. Segments hidden by later shapes are left out.
    """
    horizon = int(rng.integers(round(0.3 * h), round(0.7 * h) + 1))
    sky = rng.integers((150, 185, 220), (190, 225, 256))  # bright: every shape (channels < 140) stands out
    ground = rng.integers((185, 160, 130), (235, 205, 165))
    rows = np.arange(h)[:, None, None]
    stripes = np.where(rows % 6 < 2, -18, 0)  # the ground's texture: furrows, plus stronger noise
    pixels = np.where(
        rows < horizon,
        sky + rng.integers(-6, 7, size=(h, w, 3)),
        ground + stripes + rng.integers(-25, 26, size=(h, w, 3)),
    )
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    ids = np.zeros((h, w), dtype=np.int64)
    segments = []
    top = horizon - HORIZON_VOID_ROWS // 2
    for rows_of, cid in ((slice(0, top), 10), (slice(top + HORIZON_VOID_ROWS, h), 12)):
        segments.append((SEGMENT_ID_BASE * cid + len(segments) + 1, cid))
        ids[rows_of] = segments[-1][0]
    for cid, x, y, s, color, _ in _place_shapes(rng, w, h):
        mask = Image.new("L", (w, h))
        _draw_shape(ImageDraw.Draw(mask), SHAPES[cid], x, y, s, (255,))
        inside = np.asarray(mask) > 0
        pixels[inside] = color
        segments.append((SEGMENT_ID_BASE * cid + len(segments) + 1, cid))
        ids[inside] = segments[-1][0]
    present = set(np.unique(ids).tolist())
    return pixels, ids, [seg for seg in segments if seg[0] in present]


def generate_panoptic_shapes(
    root: str | Path,
    num_train: int = 2000,
    num_val: int = 100,
    *,
    min_side: int = 96,
    max_side: int = 160,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the panoptic demo dataset: the shapes of :func:`generate_shapes_dataset` ("things": circle, square,
    triangle) over "stuff" (sky above a horizon, ground below), in COCO panoptic format, plus a COCO instances
    file of the things with exact RLE masks (for mask AP).

    Layout under ``root``::

        params.json                           the parameters (nothing is regenerated when they match)
        train/train_00000.png ...             images (RGB)
        val/val_00000.png ...
        annotations/panoptic_train.json       COCO panoptic: images, categories (with isthing), annotations
        annotations/panoptic_train/*.png      segment-id PNGs (id = R + 256·G + 256²·B, 0 = VOID), named as
                                              the images; the folder is the JSON's path without .json
        annotations/instances_train.json      COCO instances of the things: compressed RLE masks, bbox and
                                              area of the visible pixels
        annotations/panoptic_val.json, annotations/panoptic_val/, annotations/instances_val.json

    Categories: circle 1, square 3, triangle 5 (things), sky 10, ground 12 (stuff). Every pixel is sky, ground, a
    shape, or VOID (the ``HORIZON_VOID_ROWS`` rows between sky and ground that no shape covers). Segment ids are
    ``SEGMENT_ID_BASE * category_id + n`` (n = 1, 2, ... in drawing order within the image); ``bbox`` and
    ``area`` are the exact pixel extent and count, as panopticapi writes them; no segment is a crowd. A shape
    entirely hidden by later ones has no segment. Deterministic for a given seed.

    Returns:
        ``{split}_images``, ``{split}_panoptic`` (JSON), ``{split}_panoptic_pngs`` (folder) and
        ``{split}_instances`` (JSON) for ``split`` in train, val.
    """
    from faster_coco_eval.core import mask as mask_utils

    from .panoptic_data import id_to_rgb

    root = Path(root)
    params = {
        "kind": "panoptic",
        "version": DEMO_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "min_side": min_side,
        "max_side": max_side,
        "seed": seed,
    }
    paths = {}
    for split in ("train", "val"):
        paths[f"{split}_images"] = root / split
        paths[f"{split}_panoptic"] = root / "annotations" / f"panoptic_{split}.json"
        paths[f"{split}_panoptic_pngs"] = root / "annotations" / f"panoptic_{split}"
        paths[f"{split}_instances"] = root / "annotations" / f"instances_{split}.json"
    stamp = root / "params.json"
    if is_complete(stamp, params, paths):
        return paths
    rng = np.random.default_rng(seed)
    categories = [
        {"id": cid, "name": name, "supercategory": "shape" if cid in SHAPES else "background"}
        | {"isthing": int(cid in SHAPES), "color": list(CATEGORY_COLORS[cid])}
        for cid, name in sorted({**SHAPES, **STUFF}.items())
    ]
    thing_categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in SHAPES.items()]
    for split, count in (("train", num_train), ("val", num_val)):
        for folder in (paths[f"{split}_images"], paths[f"{split}_panoptic_pngs"]):
            folder.mkdir(parents=True, exist_ok=True)
        images, panoptic, instances = [], [], []
        for i in range(count):
            w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
            pixels, ids, segments = _panoptic_image(rng, w, h)
            name = f"{split}_{i:05d}.png"
            Image.fromarray(pixels).save(paths[f"{split}_images"] / name)
            Image.fromarray(id_to_rgb(ids)).save(paths[f"{split}_panoptic_pngs"] / name)
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
            segments_info = []
            for segment_id, cid in segments:
                mask = ids == segment_id
                ys, xs = np.nonzero(mask)
                x0, y0 = int(xs.min()), int(ys.min())
                bbox = [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]
                info = {"id": segment_id, "category_id": cid, "iscrowd": 0, "bbox": bbox, "area": int(mask.sum())}
                segments_info.append(info)
                if cid in SHAPES:
                    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                    counts = rle["counts"]
                    rle = {"size": [h, w], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
                    instances.append(
                        {"id": len(instances) + 1, "image_id": i + 1, "segmentation": rle}
                        | {k: info[k] for k in ("category_id", "bbox", "area", "iscrowd")}
                    )
            panoptic.append({"image_id": i + 1, "file_name": name, "segments_info": segments_info})
        paths[f"{split}_panoptic"].write_text(
            json.dumps({"images": images, "annotations": panoptic, "categories": categories})
        )
        paths[f"{split}_instances"].write_text(
            json.dumps({"images": images, "annotations": instances, "categories": thing_categories})
        )
    stamp.write_text(json.dumps(params))
    return paths


# What ``detrkit demo --dataset NAME`` trains on: the generator, the overrides of the demo preset that fit the data
# (given before the user's, which win) and the summary's description. The textured images are 128-160 px a side
# (synthetic.py): a 128-px input, 3x the most objects of an image as queries (what `doctor` suggests), and 2.5x the
# shapes demo's steps: six classes of textured shapes are told apart later (README, "A second dataset").
def _textured(spec: TexturedSpec, epochs: int) -> tuple:
    overrides = ["data.train_scales=[128]", "data.train_max_size=160", "data.eval_size=128", "data.eval_max_size=160"]
    what = f"{len(spec.classes)} classes, 1-{spec.max_objects} per image, {spec.min_size:.0f} px to "
    return (
        functools.partial(generate_textured_dataset, spec=spec),
        [*overrides, f"model.num_queries={3 * spec.max_objects}", f"train.epochs={epochs}"],
        f"textured synthetic shapes ({what}{spec.max_fraction:.0%} of the image)",
    )


DEMO_DATASETS = {
    "shapes": (generate_shapes_dataset, [], "synthetic shapes (circle, square, triangle)"),
    "textured": _textured(TexturedSpec(), epochs=5),
    "textured_hard": _textured(HARD, epochs=2),
}


def run_demo(
    out_dir: Path = Path("demo_run"), overrides: list[str] | None = None, dataset: str = "shapes"
) -> dict[str, float]:
    """Generate the data (``dataset``: a key of ``DEMO_DATASETS``), train the ``demo`` preset, evaluate, draw val
    predictions and print a summary."""
    from .checkpoint import load
    from .config import load_run_config
    from .engine import Trainer, setup_run
    from .visualize import draw_detections, save_image

    if dataset not in DEMO_DATASETS:
        raise ValueError(f"demo dataset must be one of {', '.join(DEMO_DATASETS)}, got {dataset!r}")
    generate, dataset_overrides, description = DEMO_DATASETS[dataset]
    start = time.perf_counter()
    out_dir = Path(out_dir)
    paths = generate(out_dir / "data")
    data_overrides = [f"data.{k}={v}" for k, v in paths.items()] + [f"train.output_dir={out_dir / 'run'}"]
    config = load_run_config("demo", data_overrides + dataset_overrides + list(overrides or []))
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
        save_image(draw_detections(path, det, min_side=256), pred_dir / path.name)  # enlarged: labels need room
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
    print(f"detrkit demo — {arch} on {description}")
    print(f"  {'AP':>8} {'AP50':>8} {'AP75':>8} {'APs':>8} {'APm':>8} {'APl':>8}")
    print("  " + " ".join(f"{metrics.get(k, float('nan')):8.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
    print(f"  time: {total / 60:.1f} min ({train_time / 60:.1f} min data + training + evaluation)")
    print(f"  run directory: {run}  (metrics.json, curves.png, log.jsonl, model/, predictions/)")
    _print_report(run)
    return metrics


def _print_report(run: Path) -> None:
    """The report's path (training writes it when it completes), or how to write it."""
    report = run / "report.html"
    if report.is_file():
        print(f"  report: {report.resolve()}  (open it in a browser: curves, gallery, attention, queries)")
    else:
        print(f"  no report.html was written (see the log); write it with: detrkit report {run}")


def run_panoptic_demo(out_dir: Path = Path("demo_run_panoptic"), overrides: list[str] | None = None) -> dict:
    """The panoptic demo: generate the panoptic shapes data, train the ``demo_panoptic`` preset (Deformable DETR
    with a mask head, jointly), then report PQ (val panoptic), mask AP and box AP (val instances of the things),
    draw val panoptic predictions and print a summary. Returns ``{"panoptic": ..., "segm": ..., "bbox": ...}``."""
    from .checkpoint import load
    from .config import load_run_config
    from .data import CocoDetection
    from .engine import Trainer, setup_run
    from .evaluation import evaluate_model, write_metrics
    from .transforms import eval_transforms
    from .visualize import draw_panoptic, save_image

    start = time.perf_counter()
    out_dir = Path(out_dir)
    paths = generate_panoptic_shapes(out_dir / "data")
    data_overrides = [
        f"data.train_images={paths['train_images']}",
        f"data.train_annotations={paths['train_panoptic']}",
        f"data.val_images={paths['val_images']}",
        f"data.val_annotations={paths['val_panoptic']}",
        f"train.output_dir={out_dir / 'run'}",
    ]
    config = load_run_config("demo_panoptic", data_overrides + list(overrides or []))
    log.info("demo: synthetic panoptic data in %s (%.1f s); training the demo_panoptic config", out_dir / "data",
             time.perf_counter() - start)  # fmt: skip
    panoptic = Trainer(config, device=setup_run(config.train), overwrite=True).fit()
    run = Path(config.train.output_dir)
    model = load(run / "model")
    things = CocoDetection(
        paths["val_images"],
        paths["val_instances"],
        transforms=eval_transforms(size=config.data.eval_size, max_size=config.data.eval_max_size),
    )
    metrics = {"panoptic": panoptic}
    for task in ("segm", "bbox"):
        metrics[task], _ = evaluate_model(model, things, batch_size=config.train.batch_size, task=task)
        write_metrics(metrics[task], run / f"metrics_{task}.json")
    from .report import write_report

    write_report(run, model=model, batch_size=config.train.batch_size)  # again: with the mask and box AP files
    val_images = sorted(Path(paths["val_images"]).glob("*.png"))[:8]
    for path, seg in zip(val_images, model.predict_panoptic(val_images), strict=True):
        save_image(draw_panoptic(path, seg["segments"], seg["segments_info"]), run / "predictions" / path.name)
    total = time.perf_counter() - start
    print()
    print("detrkit demo --task panoptic — Deformable DETR + mask head on synthetic shapes over sky and ground")
    print("  " + "  ".join(f"{k} {panoptic.get(k, float('nan')):.3f}" for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")))
    print(f"  mask AP {metrics['segm']['AP']:.3f}  AP50 {metrics['segm']['AP50']:.3f}   "
          f"box AP {metrics['bbox']['AP']:.3f}  AP50 {metrics['bbox']['AP50']:.3f}  (things)")  # fmt: skip
    print(f"  time: {total / 60:.1f} min (data + training + evaluation)")
    print(f"  run directory: {run}  (metrics.json = PQ, metrics_segm.json, metrics_bbox.json, model/, predictions/)")
    _print_report(run)
    return metrics
