"""COCO scoring by hotcoco: the 12 numbers and the per-class numbers equal pycocotools' float for float (real COCO
annotations with crowd regions, ties, more than 100 detections per image, bbox and segm), results files read by
the fast path or the Python reader give the same numbers and the same errors, the fallback to faster-coco-eval,
and a results-file evaluation that never imports torch."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detrkit import scoring
from detrkit.scoring import COCO_METRIC_KEYS, CocoEvaluator, CocoMetrics, evaluate_results_file, write_metrics

COCO = pytest.importorskip("pycocotools.coco").COCO
COCOeval = pytest.importorskip("pycocotools.cocoeval").COCOeval
mask_utils = pytest.importorskip("pycocotools.mask")

COCO128 = Path(__file__).resolve().parents[2] / "shared/data/coco128/annotations/instances_train2017.json"


@pytest.fixture(scope="module")
def coco128() -> dict:
    if not COCO128.exists():
        pytest.skip(f"the shared COCO annotations are absent: {COCO128}")
    return json.loads(COCO128.read_text())


def jittered_results(gt: dict, seed: int, *, crowded: int = 2) -> list[dict]:
    """COCO bbox results: jittered objects (1-3 per object, 10% with another class, 15% missed), background
    boxes, scores rounded to 2 decimals (ties), and 130 detections on the first ``crowded`` images (> maxDets)."""
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in gt["categories"]]
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        by_image[ann["image_id"]].append(ann)
    results = []
    for n, img in enumerate(gt["images"]):
        for ann in by_image[img["id"]]:
            if rng.random() < 0.15:
                continue
            x, y, w, h = ann["bbox"]
            for _ in range(int(rng.integers(1, 4))):
                j = rng.normal(0, 0.1, 4) * [w, h, w, h]
                label = ann["category_id"] if rng.random() < 0.9 else int(rng.choice(cat_ids))
                box = [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)]
                results.append(
                    {"image_id": img["id"], "category_id": label, "bbox": box, "score": 0.3 + 0.7 * rng.random()}
                )
        extra = 130 if n < crowded else int(rng.integers(0, 10))
        shown = [a["category_id"] for a in by_image[img["id"]]] or cat_ids
        for _ in range(extra):
            w, h = np.exp(rng.uniform(np.log(4), np.log(min(300, img["width"], img["height"])), 2))
            x, y = rng.uniform(0, img["width"] - w), rng.uniform(0, img["height"] - h)
            label = int(rng.choice(shown)) if rng.random() < 0.5 else int(rng.choice(cat_ids))
            results.append(
                {"image_id": img["id"], "category_id": label, "bbox": [x, y, w, h], "score": 0.5 * rng.random()}
            )
    for r in results:
        r["score"] = round(float(r["score"]), 2)
        r["bbox"] = [float(v) for v in r["bbox"]]
    return results


def pycocotools_eval(gt: dict, results: list[dict], iou_type: str = "bbox", image_ids=None, cat_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        coco_eval = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        if cat_ids is not None:
            coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def stats(coco_eval) -> dict[str, float]:
    return {k: float(v) for k, v in zip(COCO_METRIC_KEYS, coco_eval.stats, strict=True)}


def as_predictions(results: list[dict]) -> dict[int, dict[str, np.ndarray]]:
    """Results records back as post-processed predictions (xyxy float64, as the records hold them)."""
    out: dict[int, dict[str, list]] = {}
    for r in results:
        p = out.setdefault(r["image_id"], {"boxes": [], "scores": [], "labels": []})
        x, y, w, h = r["bbox"]
        p["boxes"].append([x, y, x + w, y + h])
        p["scores"].append(r["score"])
        p["labels"].append(r["category_id"])
    return {i: {k: np.asarray(v, dtype=np.int64 if k == "labels" else np.float64) for k, v in p.items()}
            for i, p in out.items()}  # fmt: skip


def test_hotcoco_equals_pycocotools_exactly_on_real_coco(coco128: dict, tmp_path: Path) -> None:
    results = jittered_results(coco128, seed=0)
    assert any(a["iscrowd"] for a in coco128["annotations"])
    expected = pycocotools_eval(coco128, results)
    # every image: a results file, read by hotcoco itself and by the Python reader
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    fast = evaluate_results_file(COCO128, path)
    ground_truth = scoring._GroundTruth(COCO128, iou_type="bbox", backend="hotcoco")
    assert ground_truth._hotcoco is not None and ground_truth._dict is None  # both files read by hotcoco itself
    assert scoring._hotcoco_results_file(ground_truth, str(path)) is not None
    assert dict(fast) == stats(expected)  # the very same floats
    assert dict(evaluate_results_file(COCO128, results)) == stats(expected)
    assert 0.2 < fast["AP"] < 0.9 and fast["APs"] > 0 and fast["APl"] > 0
    np.testing.assert_array_equal(fast.precision, expected.eval["precision"])
    np.testing.assert_array_equal(fast.recall, expected.eval["recall"])

    # part of the images through the evaluator: xyxy predictions, only the updated images count
    updated = sorted({r["image_id"] for r in results})[::2]
    evaluator = CocoEvaluator(COCO128)
    evaluator.update({i: p for i, p in as_predictions(results).items() if i in updated})
    kept = [r for r in results if r["image_id"] in set(updated)]
    xyxy_back = [{**r, "bbox": d["bbox"]} for r, d in zip(kept, evaluator.results(), strict=True)]
    assert dict(evaluator.summarize()) == stats(pycocotools_eval(coco128, xyxy_back, image_ids=updated))


def test_per_class_equals_pycocotools_per_category(coco128: dict) -> None:
    results = jittered_results(coco128, seed=1)
    metrics = evaluate_results_file(COCO128, results)
    names = {c["id"]: c["name"] for c in coco128["categories"]}
    assert len(metrics.per_class) == len(coco128["categories"])
    objects = {c: 0 for c in names}
    for ann in coco128["annotations"]:
        objects[ann["category_id"]] += not ann["iscrowd"]
    crowd_class = next(a["category_id"] for a in coco128["annotations"] if a["iscrowd"])
    absent = next(c for c in names if objects[c] == 0)
    common = sorted(names, key=lambda c: -objects[c])[:3]
    for cat_id in {*common, crowd_class, absent}:
        row = metrics.per_class[names[cat_id]]
        assert row["category_id"] == cat_id and row["instances"] == objects[cat_id]
        expected = stats(pycocotools_eval(coco128, results, cat_ids=[cat_id]))
        assert {k: row[k] for k in COCO_METRIC_KEYS} == expected, names[cat_id]
    assert set(metrics.per_class[names[absent]][k] for k in COCO_METRIC_KEYS) == {-1.0}
    assert metrics.per_class[names[common[0]]]["AP"] > 0


def test_segm_equals_pycocotools_exactly(coco128: dict) -> None:
    """Masks: the objects' own masks shifted by a few pixels, some with another class, ties in score."""
    gt = copy.deepcopy(coco128)
    gt["images"] = gt["images"][:40]
    ids = {img["id"] for img in gt["images"]}
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in ids]
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    rng = np.random.default_rng(2)
    cat_ids = [c["id"] for c in gt["categories"]]
    results, predictions = [], {i: {"masks": [], "scores": [], "labels": []} for i in ids}
    for ann in gt["annotations"]:
        h, w = sizes[ann["image_id"]]
        seg = ann["segmentation"]
        rle = mask_utils.frPyObjects(seg, h, w)
        mask = mask_utils.decode(mask_utils.merge(rle) if isinstance(rle, list) else rle).astype(bool)
        for _ in range(int(rng.integers(1, 3))):
            shifted = np.roll(mask, tuple(rng.integers(-4, 5, 2)), axis=(0, 1))
            label = ann["category_id"] if rng.random() < 0.9 else int(rng.choice(cat_ids))
            score = round(float(rng.random()), 2)
            p = predictions[ann["image_id"]]
            p["masks"].append(shifted)
            p["scores"].append(score)
            p["labels"].append(label)
    evaluator = CocoEvaluator(COCO128, iou_type="segm")
    for image_id, p in predictions.items():
        h, w = sizes[image_id]
        evaluator.update(
            {image_id: {"masks": np.array(p["masks"], dtype=bool).reshape(-1, h, w),
                        "scores": np.array(p["scores"]), "labels": np.array(p["labels"], dtype=np.int64)}}
        )  # fmt: skip
    results = evaluator.results()
    metrics = evaluator.summarize()
    expected = pycocotools_eval(gt, results, iou_type="segm", image_ids=sorted(ids))
    assert dict(metrics) == stats(expected)
    assert 0.1 < metrics["AP"] < 0.95
    np.testing.assert_array_equal(metrics.precision, expected.eval["precision"])
    faster = CocoEvaluator(COCO128, iou_type="segm", backend="faster")
    faster.update({i: {"masks": np.zeros((0,) + sizes[i], bool), "scores": [], "labels": []} for i in ids})
    assert faster.summarize()["AP"] == 0.0


def test_results_files_the_fast_path_must_not_accept(coco128: dict, tmp_path: Path) -> None:
    image_id = coco128["images"][0]["id"]
    good = {"image_id": image_id, "category_id": 1, "bbox": [1.0, 2.0, 30.0, 40.0], "score": 0.5}
    path = tmp_path / "r.json"

    def evaluate(content: str):
        path.write_text(content)
        return evaluate_results_file(COCO128, path)

    # hotcoco reads these without complaint; the Python reader names what is wrong
    with pytest.raises(ValueError, match=r"record 1 lacks \['score'\]"):
        evaluate(json.dumps([good, {k: v for k, v in good.items() if k != "score"}]))
    with pytest.raises(ValueError, match=r"record 1 lacks \['bbox'\]"):
        evaluate(json.dumps([good, {k: v for k, v in good.items() if k != "bbox"}]))
    with pytest.raises(ValueError, match="a COCO results file is a JSON list"):
        evaluate("{}")
    with pytest.raises(ValueError, match="image ids not in the ground truth: 7"):
        evaluate(json.dumps([good, {**good, "image_id": 7}]))
    # hotcoco refuses these in its own words; the message names the record
    with pytest.raises(ValueError, match="record 0 has score nan"):
        evaluate(json.dumps([{**good, "score": float("nan")}]))  # JSON's NaN extension, as json.dumps writes it
    with pytest.raises(ValueError, match="record 0 has image_id True"):
        evaluate('[{"image_id": true, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]')
    with pytest.warns(UserWarning, match="category ids not in the ground truth are ignored: 12, 1000"):
        metrics = evaluate(json.dumps([good, {**good, "category_id": 1000}, {**good, "category_id": 12}]))
    assert dict(metrics) == stats(pycocotools_eval(coco128, [good]))
    assert dict(evaluate("[]")) == dict(evaluate_results_file(COCO128, [], backend="pycocotools"))


def test_without_hotcoco_faster_coco_eval_gives_the_same_numbers(
    coco128: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = jittered_results(coco128, seed=3, crowded=0)
    expected = dict(evaluate_results_file(COCO128, results))
    monkeypatch.setitem(sys.modules, "hotcoco", None)
    scoring._hotcoco_importable.cache_clear()
    try:
        with pytest.warns(UserWarning, match="hotcoco cannot be imported .* faster-coco-eval"):
            evaluator = CocoEvaluator(COCO128)
        assert evaluator.backend == "faster"
        evaluator.update(as_predictions(results))
        assert evaluator.summarize() == pytest.approx(
            dict(evaluate_results_file(COCO128, results, backend="pycocotools")), abs=1e-12
        )
        assert dict(evaluate_results_file(COCO128, results)) == pytest.approx(expected, abs=1e-12)
    finally:
        scoring._hotcoco_importable.cache_clear()


def test_metrics_carry_per_class_into_metrics_json_and_across_processes(coco128: dict, tmp_path: Path) -> None:
    metrics = evaluate_results_file(COCO128, jittered_results(coco128, seed=4, crowded=0))
    assert isinstance(metrics, CocoMetrics) and list(metrics) == list(COCO_METRIC_KEYS)
    # pickled as torch.distributed's broadcast_object pickles it
    back = pickle.loads(pickle.dumps(metrics))
    assert back == metrics and back.per_class == metrics.per_class
    np.testing.assert_array_equal(back.precision, metrics.precision)
    assert metrics.copy().per_class is metrics.per_class

    written = json.loads(write_metrics(metrics, tmp_path).read_text())
    assert {k: written[k] for k in COCO_METRIC_KEYS} == dict(metrics)
    assert written["per_class"] == metrics.per_class and "errors" not in written
    curves = written["pr_curves"]
    assert len(curves["recall"]) == 101 and curves["recall"][50] == 0.5
    person = metrics.precision[0, :, metrics.category_names.index("person"), 0, 2]
    assert curves["iou_0.50"]["person"] == pytest.approx(person.tolist(), abs=5e-5)
    assert np.mean(curves["iou_0.50"]["overall"]) == pytest.approx(metrics["AP50"], abs=1e-4)
    assert "person" in curves["iou_0.75"] and len(curves["iou_0.50"]) <= len(metrics.per_class) + 1
    plain = {**dict(metrics), "per_class": {"a": {"AP": 0.5}}}
    assert json.loads(write_metrics(plain, tmp_path / "p.json").read_text())["per_class"] == {"a": {"AP": 0.5}}

    with pytest.raises(ValueError, match="K = 3 categories"):
        scoring.per_class_metrics(metrics.precision, metrics.recall, [1, 2, 3], ["a", "b", "c"])


def test_hotcoco_verbose_prints_its_table(coco128: dict, capfd: pytest.CaptureFixture[str]) -> None:
    results = jittered_results(coco128, seed=5, crowded=0)[:200]
    evaluate_results_file(COCO128, results)
    assert "Average Precision" not in capfd.readouterr().out
    evaluate_results_file(COCO128, results, verbose=True)
    assert "IoU=0.50:0.95 | area=   all | maxDets=100" in capfd.readouterr().out


def test_results_file_evaluation_and_help_never_import_torch(coco128: dict, tmp_path: Path) -> None:
    gt = {**coco128, "images": coco128["images"][:24]}
    gt["annotations"] = [a for a in coco128["annotations"] if a["image_id"] in {i["id"] for i in gt["images"]}]
    annotations, results = tmp_path / "gt.json", tmp_path / "results.json"
    annotations.write_text(json.dumps(gt))
    results.write_text(json.dumps(jittered_results(gt, seed=6, crowded=0)))
    code = f"""
import sys
from detrkit.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
assert main(["eval", "--annotations", {str(annotations)!r}, "--results", {str(results)!r},
             "--out", {str(tmp_path / "eval")!r}]) == 0
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "transformers"))
print("IMPORTED", heavy)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "IMPORTED []" in done.stdout, done.stdout[-2000:]
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "person" in written["per_class"] and written["errors"]["overall"]["counts"]["correct"] > 0
    assert {p.name for p in (tmp_path / "eval").iterdir()} >= {"pr_curves.png", "errors.png", "confusion.png"}
