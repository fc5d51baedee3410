"""COCO bbox evaluation: the 12 numbers equal pycocotools' on the same detections, in one process or two."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from detrkit.evaluation import COCO_METRIC_KEYS, CocoEvaluator, evaluate_results_file, write_metrics

COCO = pytest.importorskip("pycocotools.coco").COCO
COCOeval = pytest.importorskip("pycocotools.cocoeval").COCOeval

COCO128_ANNOTATIONS = Path(__file__).resolve().parents[2] / "shared/data/coco128/annotations/instances_train2017.json"
# Non-contiguous, as COCO's are: the evaluator must never assume ids 0..K-1.
CATEGORY_IDS = (2, 5, 11, 17, 90)


# ------------------------------------------------------------------------------------------------------------
# Synthetic data


def make_gt(seed: int, num_images: int = 60) -> dict:
    """Small/medium/large boxes, crowd regions, images without ground truth, non-contiguous image ids."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num_images):
        width, height = int(rng.integers(320, 800)), int(rng.integers(240, 640))
        image_id = 1000 + 7 * i
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg"})
        if i % 6 == 5:
            continue  # an image without ground truth: every detection on it is a false positive
        for _ in range(int(rng.integers(1, 9))):
            # Log-uniform sides from 4 to 400 px put objects in all three COCO area ranges.
            w, h = np.exp(rng.uniform(np.log(4), np.log(min(400, width, height)), 2))
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            crowd = int(rng.random() < 0.08)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice(CATEGORY_IDS)),
                    "bbox": [float(x), float(y), float(w), float(h)],
                    # A mask covers less than its box, as in COCO, so `area` and w*h disagree.
                    "area": float(w * h * rng.uniform(0.5, 1.0)),
                    "iscrowd": crowd,
                    "segmentation": [[x, y, x + w, y, x + w, y + h]],
                }
            )
    categories = [{"id": c, "name": f"class_{c}", "supercategory": "thing"} for c in CATEGORY_IDS]
    return {
        "info": {"description": "synthetic"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def make_predictions(gt: dict, seed: int, *, many_on_first: int = 150) -> dict[int, dict[str, torch.Tensor]]:
    """Jittered ground truth (some with a wrong class) plus random false positives, as float32 tensors.

    Scores are rounded to two decimals so that ties occur (their order decides matches), and the first image
    gets more than 100 detections so that the maxDets=100 cut matters.
    """
    rng = np.random.default_rng(seed)
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        by_image[ann["image_id"]].append(ann)
    predictions = {}
    for n_img, img in enumerate(gt["images"]):
        boxes, scores, labels = [], [], []
        for ann in by_image[img["id"]]:
            if rng.random() < 0.15:
                continue  # missed
            x, y, w, h = ann["bbox"]
            for _ in range(int(rng.integers(1, 3))):
                jitter = rng.normal(0.0, 0.08, 4) * [w, h, w, h]
                x1, y1 = x + jitter[0], y + jitter[1]
                boxes.append([x1, y1, x1 + max(w + jitter[2], 1.0), y1 + max(h + jitter[3], 1.0)])
                scores.append(0.3 + 0.7 * rng.random())
                labels.append(ann["category_id"] if rng.random() < 0.9 else int(rng.choice(CATEGORY_IDS)))
        n_random = many_on_first if n_img == 0 else int(rng.integers(0, 8))
        for _ in range(n_random):
            w, h = np.exp(rng.uniform(np.log(4), np.log(min(300, img["width"], img["height"])), 2))
            x1, y1 = rng.uniform(0, img["width"] - w), rng.uniform(0, img["height"] - h)
            boxes.append([x1, y1, x1 + w, y1 + h])
            scores.append(0.6 * rng.random())
            labels.append(int(rng.choice(CATEGORY_IDS)))
        predictions[img["id"]] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(np.round(scores, 2), dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
    return predictions


def to_coco_results(predictions: dict[int, dict[str, torch.Tensor]]) -> list[dict]:
    """The reference conversion: the official DETR's convert_to_xywh on float32 tensors, then ``tolist``."""
    results = []
    for image_id in sorted(predictions):
        p = predictions[image_id]
        x1, y1, x2, y2 = p["boxes"].unbind(-1)
        xywh = torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1).tolist()
        results += [
            {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
            for b, s, c in zip(xywh, p["scores"].tolist(), p["labels"].tolist(), strict=True)
        ]
    return results


def pycocotools_metrics(gt: dict, results: list[dict], image_ids: list[int] | None = None) -> dict[str, float]:
    """pycocotools itself, used as its users do (on copies: it writes into what it is given)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        else:  # loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {k: float(v) for k, v in zip(COCO_METRIC_KEYS, coco_eval.stats, strict=True)}


def assert_metrics_equal(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert list(actual) == list(COCO_METRIC_KEYS)
    for key in COCO_METRIC_KEYS:
        assert actual[key] == pytest.approx(expected[key], abs=1e-6, rel=0), (key, actual, expected)


@pytest.fixture(scope="module")
def synthetic() -> tuple[dict, dict[int, dict[str, torch.Tensor]], list[int]]:
    gt = make_gt(seed=0)
    predictions = make_predictions(gt, seed=1)
    image_ids = [img["id"] for img in gt["images"]]
    for image_id in image_ids[3:6]:
        predictions[image_id] = {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0),
        }
    # The last 8 images are never updated: they must not count unless all_images=True.
    updated = image_ids[:-8]
    return gt, {i: predictions[i] for i in updated}, updated


@pytest.fixture
def gt_file(tmp_path: Path, synthetic) -> Path:
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(synthetic[0]))
    return path


# ------------------------------------------------------------------------------------------------------------
# Parity with pycocotools


@pytest.mark.parametrize("backend", ["hotcoco", "faster", "pycocotools"])
def test_synthetic_matches_pycocotools(gt_file: Path, synthetic, backend: str) -> None:
    gt, predictions, updated = synthetic
    evaluator = CocoEvaluator(gt_file, backend=backend)
    # Updated in shuffled batches: the numbers must not depend on the order images arrive in.
    order = list(predictions)
    np.random.default_rng(2).shuffle(order)
    for start in range(0, len(order), 4):
        evaluator.update({i: predictions[i] for i in order[start : start + 4]})
    results = to_coco_results(predictions)
    assert evaluator.results() == results
    assert evaluator.image_ids == sorted(updated)

    metrics = evaluator.summarize()
    expected = pycocotools_metrics(gt, results, image_ids=updated)
    assert_metrics_equal(metrics, expected)
    # Not a vacuous comparison: every area range holds objects; the detector is neither perfect nor useless.
    assert 0.2 < metrics["AP"] < 0.9 and all(metrics[k] > 0 for k in ("APs", "APm", "APl", "ARs", "ARm", "ARl"))

    everything = CocoEvaluator(gt_file, backend=backend, all_images=True)
    everything.update(predictions)
    all_metrics = everything.summarize()
    assert_metrics_equal(all_metrics, pycocotools_metrics(gt, results))
    assert all_metrics["AR100"] < metrics["AR100"]  # the images never updated hold missed objects


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_more_synthetic_draws_match_pycocotools(seed: int) -> None:
    gt = make_gt(seed=seed, num_images=30)
    predictions = make_predictions(gt, seed=seed + 100, many_on_first=120)
    evaluator = CocoEvaluator(gt)
    evaluator.update(predictions)
    expected = pycocotools_metrics(gt, to_coco_results(predictions), image_ids=list(predictions))
    assert_metrics_equal(evaluator.summarize(), expected)


def test_coco128_jittered_ground_truth_matches_pycocotools() -> None:
    if not COCO128_ANNOTATIONS.exists():
        pytest.skip(f"the shared COCO annotations are absent: {COCO128_ANNOTATIONS}")
    gt = json.loads(COCO128_ANNOTATIONS.read_text())
    predictions = make_predictions(gt, seed=3, many_on_first=0)
    evaluator = CocoEvaluator(COCO128_ANNOTATIONS)
    evaluator.update(predictions)
    metrics = evaluator.summarize()
    assert_metrics_equal(metrics, pycocotools_metrics(gt, to_coco_results(predictions), image_ids=list(predictions)))
    assert 0.2 < metrics["AP"] < 0.95


def test_perfect_detections_give_ap_one(synthetic) -> None:
    gt = synthetic[0]
    predictions: dict[int, dict] = {img["id"]: {"boxes": [], "scores": [], "labels": []} for img in gt["images"]}
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        p = predictions[ann["image_id"]]
        p["boxes"].append([x, y, x + w, y + h])
        p["scores"].append(1.0)
        p["labels"].append(ann["category_id"])
    evaluator = CocoEvaluator(gt)
    evaluator.update({i: {k: np.asarray(v, dtype=np.float64) for k, v in p.items()} for i, p in predictions.items()})
    metrics = evaluator.summarize()
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
        assert metrics[key] == 1.0, key


def test_empty_detections_give_zero_and_minus_one(synthetic) -> None:
    gt = synthetic[0]
    image_ids = [img["id"] for img in gt["images"]]
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    # Only images without ground truth: no area range holds any object, so every metric is -1 ...
    no_gt_ids = sorted(set(image_ids) - {a["image_id"] for a in gt["annotations"]})
    for ids in (image_ids, no_gt_ids[:2]):
        for backend in ("hotcoco", "faster", "pycocotools"):
            evaluator = CocoEvaluator(gt, backend=backend)
            evaluator.update(dict.fromkeys(ids, empty))
            assert_metrics_equal(evaluator.summarize(), pycocotools_metrics(gt, [], image_ids=ids))
    assert set(pycocotools_metrics(gt, [], image_ids=image_ids).values()) == {0.0}
    assert set(pycocotools_metrics(gt, [], image_ids=no_gt_ids[:2]).values()) == {-1.0}

    # ... and with no image updated at all there is nothing to score.
    assert set(CocoEvaluator(gt).summarize().values()) == {-1.0}
    assert_metrics_equal(CocoEvaluator(gt, all_images=True).summarize(), pycocotools_metrics(gt, []))


def test_ground_truth_defaults_and_no_mutation(synthetic) -> None:
    gt = copy.deepcopy(synthetic[0])
    predictions = synthetic[1]
    for ann in gt["annotations"]:
        del ann["area"], ann["iscrowd"]
    untouched = copy.deepcopy(gt)

    # pycocotools itself cannot evaluate such a file ...
    with pytest.raises(KeyError):
        pycocotools_metrics(gt, to_coco_results(predictions))

    # ... so the defaults are those it gives the annotations it creates (loadRes): area = w*h, iscrowd = 0.
    filled = copy.deepcopy(gt)
    for ann in filled["annotations"]:
        ann["area"], ann["iscrowd"] = ann["bbox"][2] * ann["bbox"][3], 0
    expected = pycocotools_metrics(filled, to_coco_results(predictions), image_ids=list(predictions))
    for backend in ("hotcoco", "faster", "pycocotools"):
        evaluator = CocoEvaluator(gt, backend=backend)
        evaluator.update(predictions)
        assert_metrics_equal(evaluator.summarize(), expected)
        assert gt == untouched

    evaluate_results_file(gt, to_coco_results(predictions))
    assert gt == untouched


def test_update_checks_and_lifecycle(synthetic) -> None:
    gt, predictions, _ = synthetic
    first = next(iter(predictions))
    evaluator = CocoEvaluator(gt)
    with pytest.raises(ValueError, match="not in the ground truth: 5, 6"):
        evaluator.update({5: predictions[first], 6: predictions[first]})
    with pytest.raises(ValueError, match=r"expected boxes \(n, 4\)"):
        evaluator.update({first: {"boxes": torch.zeros(3, 5), "scores": torch.zeros(3), "labels": torch.zeros(3)}})
    with pytest.raises(ValueError, match="'boxes', 'scores' and 'labels'"):
        evaluator.update({first: {"boxes": torch.zeros(0, 4)}})
    with pytest.raises(TypeError, match="image ids must be integers"):
        evaluator.update({"a": predictions[first]})

    # A repeated image (DistributedSampler padding) keeps its first detections.
    evaluator.update({first: predictions[first]})
    evaluator.update({torch.tensor(first): {"boxes": torch.zeros(0, 4), "scores": [], "labels": []}})
    assert len(evaluator.results()) == len(predictions[first]["scores"])

    metrics = evaluator.summarize()
    assert evaluator.summarize() == metrics
    with pytest.raises(RuntimeError, match="reset"):
        evaluator.update({first: predictions[first]})
    evaluator.reset()
    assert evaluator.results() == [] and set(evaluator.summarize().values()) == {-1.0}

    with pytest.raises(ValueError, match="bbox"):
        CocoEvaluator(gt, iou_type="keypoints")
    with pytest.raises(ValueError, match="backend"):
        CocoEvaluator(gt, backend="torchmetrics")  # type: ignore[arg-type]


def test_half_precision_and_cuda_style_inputs_convert(synthetic) -> None:
    gt = synthetic[0]
    image_id = gt["images"][0]["id"]
    boxes = torch.tensor([[10.25, 20.5, 50.75, 90.0]], dtype=torch.bfloat16)
    evaluator = CocoEvaluator(gt)
    evaluator.update({image_id: {"boxes": boxes, "scores": torch.tensor([0.5]), "labels": torch.tensor([2.0])}})
    (det,) = evaluator.results()
    x1, y1, x2, y2 = boxes.float()[0].tolist()
    assert det == {"image_id": image_id, "category_id": 2, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 0.5}


def test_unknown_categories_warn(synthetic) -> None:
    gt = synthetic[0]
    image_id = gt["images"][0]["id"]
    evaluator = CocoEvaluator(gt)
    evaluator.update({image_id: {"boxes": [[0, 0, 10, 10]], "scores": [0.9], "labels": [0]}})
    with pytest.warns(UserWarning, match="category ids not in the ground truth are ignored: 0"):
        evaluator.summarize()


def test_missing_pycocotools_is_a_clear_import_error(synthetic, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    evaluator = CocoEvaluator(synthetic[0], backend="pycocotools", all_images=True)
    with pytest.raises(ImportError, match="backend=.hotcoco. gives the same numbers"):
        evaluator.summarize()


# ------------------------------------------------------------------------------------------------------------
# Results files and metrics files


def test_results_file_round_trip(tmp_path: Path, gt_file: Path, synthetic) -> None:
    gt, predictions, _ = synthetic
    evaluator = CocoEvaluator(gt_file, all_images=True)
    evaluator.update(predictions)
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(evaluator.results()))
    metrics = evaluate_results_file(gt_file, results_path)
    assert_metrics_equal(metrics, evaluator.summarize())
    assert_metrics_equal(metrics, pycocotools_metrics(gt, json.loads(results_path.read_text())))
    assert_metrics_equal(evaluate_results_file(gt_file, results_path, backend="pycocotools"), metrics)

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert_metrics_equal(evaluate_results_file(gt_file, empty), pycocotools_metrics(gt, []))


def test_results_file_errors(tmp_path: Path, gt_file: Path, synthetic) -> None:
    image_id = synthetic[0]["images"][0]["id"]
    good = {"image_id": image_id, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5}

    def write(content: object) -> Path:
        path = tmp_path / "results.json"
        path.write_text(json.dumps(content))
        return path

    with pytest.raises(ValueError, match="JSON list of .* got dict"):
        evaluate_results_file(gt_file, write({"annotations": [good]}))
    with pytest.raises(ValueError, match=r"record 1 lacks \['score'\]"):
        evaluate_results_file(gt_file, write([good, {k: v for k, v in good.items() if k != "score"}]))
    with pytest.raises(ValueError, match=r"record 0 has bbox \[1, 2, 3\]"):
        evaluate_results_file(gt_file, write([{**good, "bbox": [1, 2, 3]}]))
    with pytest.raises(ValueError, match="image ids not in the ground truth: 3, 99999"):
        evaluate_results_file(gt_file, write([good, {**good, "image_id": 99999}, {**good, "image_id": 3}]))


def test_write_metrics(tmp_path: Path) -> None:
    metrics = {k: i / 12 for i, k in enumerate(COCO_METRIC_KEYS)} | {"epoch": 3}
    path = write_metrics(metrics, tmp_path / "run" / "metrics.json")
    assert json.loads(path.read_text()) == {k: metrics[k] for k in COCO_METRIC_KEYS}
    assert write_metrics(metrics, tmp_path / "run") == path  # a directory gets metrics.json
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temporary file left
    with pytest.raises(KeyError, match="AR100"):
        write_metrics({k: v for k, v in metrics.items() if k != "AR100"}, path)


# ------------------------------------------------------------------------------------------------------------
# Distributed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, gt_path: str, shards: list, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        evaluator = CocoEvaluator(gt_path)
        for image_id, prediction in shards[rank]:
            evaluator.update({image_id: prediction})
        out = {"metrics": evaluator.summarize(), "ids": evaluator.image_ids}

        # A failure on rank 0 reaches every rank instead of leaving the others waiting for the broadcast.
        failing = CocoEvaluator(gt_path)
        if rank == 0:
            failing._compute_metrics = lambda: 1 / 0  # type: ignore[method-assign]
        try:
            failing.summarize()
        except (ZeroDivisionError, RuntimeError) as e:
            out["error"] = f"{type(e).__name__}: {e}"
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_two_processes_match_single_process(tmp_path: Path, gt_file: Path, synthetic) -> None:
    _, predictions, updated = synthetic
    items = [(i, {k: v.numpy() for k, v in p.items()}) for i, p in predictions.items()]
    # Interleaved like DistributedSampler, the first image repeated at the end of rank 1's shard (padding).
    shards = [items[0::2], items[1::2] + [items[0]]]

    context = torch.multiprocessing.spawn(
        _distributed_worker,
        args=(2, _free_port(), str(gt_file), shards, str(tmp_path)),
        nprocs=2,
        join=False,
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the distributed evaluation did not finish in 120 s")

    single = CocoEvaluator(gt_file)
    single.update(predictions)
    expected = single.summarize()
    outs = [json.loads(Path(tmp_path, f"rank{rank}.json").read_text()) for rank in range(2)]
    for out in outs:
        assert out["ids"] == sorted(updated)
        assert out["metrics"] == expected  # the very same floats on every rank
    assert outs[0]["error"] == "ZeroDivisionError: division by zero"
    assert outs[1]["error"] == "RuntimeError: COCO evaluation failed on rank 0: ZeroDivisionError: division by zero"


@pytest.fixture(autouse=True)
def _no_stray_output(capfd: pytest.CaptureFixture[str]):
    """The libraries' tables and timings stay silent unless verbose=True."""
    yield
    out = capfd.readouterr().out
    assert "Average Precision" not in out and "DONE" not in out, out


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_verbose_prints_the_table(synthetic, backend: str, capfd: pytest.CaptureFixture[str]) -> None:
    CocoEvaluator(synthetic[0], backend=backend, all_images=True, verbose=True).summarize()
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in capfd.readouterr().out
