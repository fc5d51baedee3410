"""COCO bbox evaluation: detrkit's evaluation against pycocotools, on a synthetic COCO-sized validation run.

The data imitate COCO val2017 seen through DETR: 5000 images with 7 objects each on average (about 35k boxes
of every size range, 1% crowd regions, 80 categories with COCO's non-contiguous ids) and 100 detections per
image (500,000): jittered copies of the objects first, then low-scored background boxes. All drawn from a
fixed seed.

Two paths, each against pycocotools doing the same work, end to end (load + evaluate + summary):

* **engine** (what training and ``detrkit eval --weights`` run): from the annotation file and the post-processed
  predictions (absolute xyxy float32 tensors) to the 12 numbers. detrkit runs ``CocoEvaluator(ann_file)``,
  ``update``, ``summarize`` (the per-class numbers included); pycocotools runs what the official DETR does
  (``convert_to_xywh`` and ``tolist`` per image, ``COCO(ann_file)``, ``loadRes``, ``COCOeval`` restricted to the
  evaluated images).
* **results file**: from the annotation file and a COCO results JSON on disk. detrkit runs the command
  ``detrkit eval --results FILE --annotations ANN --no-analysis`` in a fresh process (Python's start-up, the
  imports, reading, scoring, the per-class table and ``metrics.json`` all counted); pycocotools runs
  ``COCO(ann_file)``, ``loadRes(FILE)``, ``COCOeval`` in this process.

Every run of a repeat alternates the sides (A B, then B A) so that changes in the machine's load hit both.
Reported: median wall time (and, on stderr, each run's wall and CPU time, the subprocess' included) with the
CPU's model. ``--backend`` picks the engine path's scoring library (default hotcoco; ``faster`` is the
fallback); the command always uses the default.

    python benchmarks/bench_coco_eval.py                # 5000 images, 3 runs each: ~5-10 min on 2 shared cores
    python benchmarks/bench_coco_eval.py --images 1000  # scaled down (7 boxes, 100 detections per image)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from detrkit.evaluation import COCO_METRIC_KEYS, CocoEvaluator

# COCO's 80 category ids: 1..90 without the ten that the 2017 release dropped.
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
DETECTIONS_PER_IMAGE = 100  # DETR keeps its 100 queries' boxes
OBJECTS_PER_IMAGE = 7.0  # COCO val2017: 36,781 boxes on 5000 images


def make_ground_truth(num_images: int, rng: np.random.Generator) -> dict:
    """A COCO instances dict with ~7 boxes per image, sides log-uniform in 4..400 px, ~1% crowd."""
    images, annotations = [], []
    widths = rng.integers(480, 641, num_images)
    heights = rng.integers(360, 481, num_images)
    counts = rng.poisson(OBJECTS_PER_IMAGE, num_images)
    for i in range(num_images):
        image_id = 100_000 + 3 * i  # sparse ids, as COCO's are
        width, height, n = int(widths[i]), int(heights[i]), int(counts[i])
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:012d}.jpg"})
        wh = np.exp(rng.uniform(np.log(4), np.log(min(400, height)), (n, 2)))
        xy = rng.uniform(0, 1, (n, 2)) * ([width, height] - wh)
        areas = wh.prod(1) * rng.uniform(0.5, 1.0, n)  # a mask covers less than its box
        cats = rng.choice(COCO_CATEGORY_IDS, n)
        crowd = rng.random(n) < 0.01
        for j in range(n):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cats[j]),
                    "bbox": [float(xy[j, 0]), float(xy[j, 1]), float(wh[j, 0]), float(wh[j, 1])],
                    "area": float(areas[j]),
                    "iscrowd": int(crowd[j]),
                }
            )
    categories = [{"id": c, "name": f"category_{c}", "supercategory": "thing"} for c in COCO_CATEGORY_IDS]
    return {"info": {"description": "detrkit synthetic benchmark"}, "images": images,
            "annotations": annotations, "categories": categories}  # fmt: skip


def make_predictions(gt: dict, rng: np.random.Generator) -> dict[int, dict[str, torch.Tensor]]:
    """100 detections per image as postprocess returns them: absolute xyxy float32, dataset category ids."""
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        by_image[ann["image_id"]].append(ann)
    predictions = {}
    for img in gt["images"]:
        anns = by_image[img["id"]]
        shown = np.array([a["category_id"] for a in anns], dtype=np.int64)
        # Up to 3 jittered copies of each object: a correct class most of the time, scores above the noise's.
        copies = rng.integers(1, 4, len(anns))
        src = np.repeat(np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4), copies, axis=0)
        src = src[:DETECTIONS_PER_IMAGE]
        k = len(src)
        x1y1 = src[:, :2] + rng.normal(0, 0.1, (k, 2)) * src[:, 2:]
        wh = np.maximum(src[:, 2:] * (1 + rng.normal(0, 0.1, (k, 2))), 1.0)
        cats = np.where(rng.random(k) < 0.85, np.repeat(shown, copies)[:k], rng.choice(COCO_CATEGORY_IDS, k))
        # The rest: background boxes with low scores. DETR labels each query with its most likely class, and
        # on background those are mostly classes the image shows: half of these labels come from its objects.
        m = DETECTIONS_PER_IMAGE - k
        noise_wh = np.exp(rng.uniform(np.log(4), np.log(300), (m, 2)))
        noise_xy = rng.uniform(0, 1, (m, 2)) * np.maximum([img["width"], img["height"]] - noise_wh, 0)
        noise_cats = rng.choice(COCO_CATEGORY_IDS, m)
        if len(shown):
            from_image = rng.random(m) < 0.5
            noise_cats[from_image] = rng.choice(shown, int(from_image.sum()))
        boxes = np.concatenate(
            [np.concatenate([x1y1, x1y1 + wh], 1), np.concatenate([noise_xy, noise_xy + noise_wh], 1)]
        )
        scores = np.concatenate([0.3 + 0.7 * rng.random(k), 0.4 * rng.random(m)])
        predictions[img["id"]] = {
            "boxes": torch.from_numpy(boxes.astype(np.float32)),
            "scores": torch.from_numpy(scores.astype(np.float32)),
            "labels": torch.from_numpy(np.concatenate([cats, noise_cats]).astype(np.int64)),
        }
    return predictions


def run_detrkit(ann_file: Path, predictions: dict[int, dict[str, torch.Tensor]], backend: str) -> dict[str, float]:
    evaluator = CocoEvaluator(ann_file, backend=backend)
    evaluator.update(predictions)
    return dict(evaluator.summarize())


def run_detrkit_cli(ann_file: Path, results_file: Path) -> dict[str, float]:
    """``detrkit eval --results`` in a new process; the numbers read back from its metrics.json."""
    out = results_file.parent / "eval"
    code = "import sys; from detrkit.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", code, "eval", "--annotations", str(ann_file), "--results", str(results_file)]
    done = subprocess.run([*command, "--out", str(out), "--no-analysis"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"detrkit eval failed: {done.stderr[-2000:]}")
    written = json.loads((out / "metrics.json").read_text())
    return {k: written[k] for k in COCO_METRIC_KEYS}


def run_pycocotools_file(ann_file: Path, results_file: Path) -> dict[str, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(ann_file))
        coco_dt = coco_gt.loadRes(str(results_file))
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {k: float(v) for k, v in zip(COCO_METRIC_KEYS, coco_eval.stats, strict=True)}


def official_results(predictions: dict[int, dict[str, torch.Tensor]]) -> list[dict]:
    """The official DETR's conversion to a COCO results list (``convert_to_xywh`` on float32, ``tolist``)."""
    results = []
    for image_id, p in predictions.items():
        x1, y1, x2, y2 = p["boxes"].unbind(1)
        boxes = torch.stack((x1, y1, x2 - x1, y2 - y1), dim=1).tolist()
        scores, labels = p["scores"].tolist(), p["labels"].tolist()
        results.extend(
            {"image_id": image_id, "category_id": labels[k], "bbox": box, "score": scores[k]}
            for k, box in enumerate(boxes)
        )
    return results


def _cpu_time() -> float:
    """CPU seconds of this process and of its finished children (the ``detrkit eval`` subprocess)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_pycocotools(ann_file: Path, predictions: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
    """What the official DETR's CocoEvaluator does, in one process."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = official_results(predictions)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(ann_file))
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = list(predictions)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {k: float(v) for k, v in zip(COCO_METRIC_KEYS, coco_eval.stats, strict=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="number of images (7 boxes, 100 dets each)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the reference figures use 2)")
    parser.add_argument("--backend", default="hotcoco", help="detrkit's scoring library: hotcoco (default) or faster")
    parser.add_argument("--paths", nargs="+", choices=("engine", "file"), default=["engine", "file"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    gt = make_ground_truth(args.images, rng)
    predictions = make_predictions(gt, rng)
    num_dets = sum(len(p["scores"]) for p in predictions.values())
    print(f"# {cpu_model()}, {os.cpu_count()} logical cores; {len(gt['images'])} images, "
          f"{len(gt['annotations'])} ground-truth boxes, {num_dets} detections", file=sys.stderr)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        ann_file = Path(tmp) / "instances.json"
        ann_file.write_text(json.dumps(gt))
        results_file = Path(tmp) / "results.json"
        results_file.write_text(json.dumps(official_results(predictions)))
        del gt
        sides = {
            "engine": {
                "detrkit": lambda: run_detrkit(ann_file, predictions, args.backend),
                "pycocotools": lambda: run_pycocotools(ann_file, predictions),
            },
            "file": {
                "detrkit": lambda: run_detrkit_cli(ann_file, results_file),
                "pycocotools": lambda: run_pycocotools_file(ann_file, results_file),
            },
        }
        times = {(p, s): [] for p in args.paths for s in ("detrkit", "pycocotools")}
        metrics: dict[tuple[str, str], dict[str, float]] = {}
        for r in range(args.repeats):
            for path in args.paths:
                for name in ("detrkit", "pycocotools") if r % 2 == 0 else ("pycocotools", "detrkit"):
                    start, cpu = time.perf_counter(), _cpu_time()
                    metrics[path, name] = sides[path][name]()
                    times[path, name].append(time.perf_counter() - start)
                    cpu = _cpu_time() - cpu
                    print(f"# run {r + 1} {path} {name}: {times[path, name][-1]:.2f} s wall, {cpu:.2f} s CPU",
                          file=sys.stderr)  # fmt: skip

    ok = True
    for path in args.paths:
        ours, ref = (statistics.median(times[path, k]) for k in ("detrkit", "pycocotools"))
        exact = metrics[path, "detrkit"] == metrics[path, "pycocotools"]
        ok &= exact
        label = f"CocoEvaluator, {args.backend}" if path == "engine" else "detrkit eval --results"
        print(f"# {path} metrics {json.dumps(metrics[path, 'detrkit'])}", file=sys.stderr)
        print(
            f"coco_eval {path} ({label}) {args.images} images {num_dets} dets on {cpu_model()}: "
            f"detrkit {ours:.2f} s, pycocotools {ref:.2f} s, speedup {ref / ours:.1f}×, bit-identical: {exact}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
