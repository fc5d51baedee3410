"""Error analysis: each TIDE error type on a hand-built image where it is known, what fixing it is worth checked
against pycocotools' AP50 of the hand-fixed detections, agreement with hotcoco's independent TIDE code on random
data, the confusion matrix counted by hand, and the pictures."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detrkit.analysis import ERROR_TYPES, format_errors, save_plots
from detrkit.scoring import CocoEvaluator, evaluate_results_file

COCO = pytest.importorskip("pycocotools.coco").COCO
COCOeval = pytest.importorskip("pycocotools.cocoeval").COCOeval

A, B = 1, 2


def box(x: float, y: float, w: float = 40, h: float = 40) -> list[float]:
    return [float(x), float(y), float(w), float(h)]


def hand_built() -> tuple[dict, list[dict]]:
    """Two images. Image 1 holds class-A objects a1..a5, a class-B object b1 and a class-A crowd region; image 2
    holds nothing. Each detection is one known case."""
    objects = {
        "a1": (A, box(10, 10)),
        "a2": (A, box(100, 10)),
        "a3": (A, box(10, 150)),
        "a4": (A, box(150, 150)),  # found by nothing: missed
        "b1": (B, box(100, 100)),
        "a5": (A, box(150, 80)),  # found late (so that the false positives ranked above it cost AP)
    }
    annotations = [
        {"id": i + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for i, (c, b) in enumerate(objects.values())
    ]
    annotations.append({"id": 99, "image_id": 1, "category_id": A, "bbox": box(150, 10), "area": 1600.0, "iscrowd": 1})
    gt = {
        "images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
        "annotations": annotations,
        "categories": [{"id": A, "name": "a"}, {"id": B, "name": "b"}],
    }
    detections = {
        "tp_a1": (1, A, box(10, 10), 0.9),
        "dupe": (1, A, box(12, 10), 0.8),  # IoU 0.905 with a1, which tp_a1 took
        "loc": (1, A, box(120, 10), 0.85),  # IoU 1/3 with a2, which nothing found
        "cls": (1, B, box(10, 150), 0.7),  # a3 exactly, with the wrong class
        "tp_b1": (1, B, box(100, 100), 0.95),
        "both": (1, A, box(120, 100), 0.6),  # IoU 1/3 with b1 (another class), nothing of its own
        "bkg": (1, B, box(60, 60, 20, 20), 0.5),  # overlaps nothing
        "crowd": (1, A, box(152, 12, 30, 30), 0.55),  # inside the crowd region: ignored
        "bkg_empty": (2, A, box(10, 10), 0.4),  # an image without objects
        "tp_a5": (1, A, box(150, 80), 0.3),
    }
    results = [
        {"image_id": i, "category_id": c, "bbox": b, "score": s, "name": n} for n, (i, c, b, s) in detections.items()
    ]
    return gt, results


def ap50(gt: dict, results: list[dict]) -> float:
    """pycocotools' AP50 (mean over classes with objects)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        records = [{k: v for k, v in r.items() if k != "name"} for r in results]
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(records), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return float(coco_eval.stats[1])


def test_each_error_type_on_a_hand_built_image() -> None:
    gt, results = hand_built()
    plain = [{k: v for k, v in r.items() if k != "name"} for r in results]
    errors = evaluate_results_file(gt, plain, analysis=True).errors
    overall = errors["overall"]
    assert overall["counts"] == {"correct": 3, "cls": 1, "loc": 1, "both": 1, "dupe": 1, "bkg": 2, "miss": 1}
    assert overall["objects"] == 6
    assert errors["per_class"]["a"]["counts"] == {
        "correct": 2, "cls": 0, "loc": 1, "both": 1, "dupe": 1, "bkg": 1, "miss": 1,
    }  # fmt: skip
    assert errors["per_class"]["b"]["counts"]["cls"] == 1 and errors["per_class"]["b"]["counts"]["bkg"] == 1

    # What fixing each type is worth, against pycocotools on the detections (or objects) fixed by hand.
    base = ap50(gt, results)
    assert overall["AP50"] == pytest.approx(base, abs=1e-12)
    named = {r["name"]: r for r in results}
    a2 = next(a["bbox"] for a in gt["annotations"] if a["id"] == 2)

    def without(*names: str) -> list[dict]:
        return [r for r in results if r["name"] not in names]

    fixed = {
        "dupe": (gt, without("dupe")),
        "loc": (gt, [{**r, "bbox": a2} if r["name"] == "loc" else r for r in results]),
        "cls": (gt, [{**r, "category_id": A} if r["name"] == "cls" else r for r in results]),
        "both": (gt, without("both")),
        "bkg": (gt, without("bkg", "bkg_empty")),
        "miss": ({**gt, "annotations": [a for a in gt["annotations"] if a["id"] != 4]}, results),
    }
    for kind, (fixed_gt, fixed_results) in fixed.items():
        expected = ap50(fixed_gt, fixed_results) - base
        assert overall["dAP50"][kind] == pytest.approx(expected, abs=1e-12), kind
        assert expected > 0, kind  # every fix is worth something here: the cases are not vacuous
    false_positives = ("dupe", "loc", "cls", "both", "bkg", "bkg_empty")
    assert overall["dAP50_oracle"]["FP"] == pytest.approx(ap50(gt, without(*false_positives)) - base, abs=1e-12)
    unmatched = {2, 3, 4}  # a2, a3, a4
    no_fn = {**gt, "annotations": [a for a in gt["annotations"] if a["id"] not in unmatched]}
    assert overall["dAP50_oracle"]["FN"] == pytest.approx(ap50(no_fn, results) - base, abs=1e-12)
    assert named["crowd"]["score"] > named["bkg"]["score"]  # ranked among them, and still not an error


def test_confusion_matrix_counted_by_hand() -> None:
    gt, results = hand_built()
    plain = [{k: v for k, v in r.items() if k != "name"} for r in results]
    confusion = evaluate_results_file(gt, plain, analysis={"score_threshold": 0.5}).errors["confusion"]
    assert confusion["labels"] == ["a", "b", "background"]
    # score >= 0.5: tp_b1 -> (b, b); tp_a1 -> (a, a); loc, dupe and both find no free object of IoU >= 0.5 ->
    # (background, a); cls finds a3 -> (a, b); bkg -> (background, b); crowd is ignored; a2, a4 and a5 (its
    # detection scores 0.3) are missed.
    assert confusion["matrix"] == [[1, 1, 3], [0, 1, 0], [3, 1, 0]]
    lower = evaluate_results_file(gt, plain, analysis={"score_threshold": 0.0}).errors["confusion"]
    assert lower["matrix"][2][0] == 4  # bkg_empty (0.4) counts now
    # By default the threshold is the best F1 of all detections: 2·TP / (detections + 6 objects) peaks at the
    # two best detections (both correct): 4 / 8.
    best = evaluate_results_file(gt, plain, analysis=True).errors["confusion"]
    assert best["score_threshold"] == 0.9
    assert best["matrix"] == [[1, 0, 4], [0, 1, 0], [0, 0, 0]]


def test_agrees_with_hotcoco_tide_on_random_detections() -> None:
    """hotcoco's TIDE (Rust, written independently of this module) gives the same counts and ΔAP. Without crowd
    regions: hotcoco types detections against them too, where TIDE (and this module) leaves them out."""
    hotcoco = pytest.importorskip("hotcoco")
    rng = np.random.default_rng(0)
    images, annotations, results = [], [], []
    for image_id in range(1, 41):
        images.append({"id": image_id, "width": 300, "height": 300})
        for _ in range(int(rng.integers(0, 6))):
            b = [*rng.uniform(0, 200, 2), *rng.uniform(10, 100, 2)]
            cat = int(rng.integers(1, 5))
            crowd = 0
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": b, "area": b[2] * b[3], "iscrowd": crowd})  # fmt: skip
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0, 0.25, 4) * [b[2], b[3], b[2], b[3]]
                label = cat if rng.random() < 0.8 else int(rng.integers(1, 5))
                box_ = [b[0] + jitter[0], b[1] + jitter[1], max(b[2] + jitter[2], 2), max(b[3] + jitter[3], 2)]
                results.append({"image_id": image_id, "category_id": label, "bbox": box_,
                                "score": round(float(rng.random()), 2)})  # fmt: skip
        for _ in range(int(rng.integers(0, 4))):
            b = [*rng.uniform(0, 250, 2), *rng.uniform(5, 50, 2)]
            results.append({"image_id": image_id, "category_id": int(rng.integers(1, 5)), "bbox": b,
                            "score": round(float(rng.random()) * 0.5, 2)})  # fmt: skip
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 5)]}  # fmt: skip
    ours = evaluate_results_file(gt, results, analysis=True).errors["overall"]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = hotcoco.COCO(gt)
        theirs_eval = hotcoco.COCOeval(coco_gt, coco_gt.load_res(copy.deepcopy(results)), "bbox")
        theirs_eval.evaluate()
    theirs = theirs_eval.tide_errors(pos_thr=0.5, bg_thr=0.1)
    assert ours["AP50"] == pytest.approx(theirs["ap_base"], abs=1e-12)
    for kind in ERROR_TYPES:
        name = {"cls": "Cls", "loc": "Loc", "both": "Both", "dupe": "Dupe", "bkg": "Bkg", "miss": "Miss"}[kind]
        assert ours["counts"][kind] == theirs["counts"][name], kind
        assert ours["dAP50"][kind] == pytest.approx(theirs["delta_ap"][name], abs=1e-9), kind
    for kind in ("FP", "FN"):
        assert ours["dAP50_oracle"][kind] == pytest.approx(theirs["delta_ap"][kind], abs=1e-9), kind
    assert min(ours["counts"].values()) > 0  # every type occurs


def test_evaluator_analysis_per_class_ap50_is_the_coco_per_class_ap50(tmp_path: Path) -> None:
    gt, results = hand_built()
    evaluator = CocoEvaluator(gt)
    predictions: dict[int, dict[str, list]] = {}
    for r in results:
        p = predictions.setdefault(r["image_id"], {"boxes": [], "scores": [], "labels": []})
        x, y, w, h = r["bbox"]
        p["boxes"].append([x, y, x + w, y + h])
        p["scores"].append(r["score"])
        p["labels"].append(r["category_id"])
    evaluator.update({i: {k: np.asarray(v) for k, v in p.items()} for i, p in predictions.items()})
    errors = evaluator.analyse()
    metrics = evaluator.summarize()
    assert metrics.errors == errors
    for name, row in errors["per_class"].items():
        assert row["AP50"] == metrics.per_class[name]["AP50"]
    assert "dAP50" in format_errors(errors) and "miss" in format_errors(errors)

    paths = save_plots(metrics, tmp_path)
    assert [p.name for p in paths] == ["pr_curves.png", "errors.png", "confusion.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200
            assert len(np.unique(np.asarray(image.convert("L")))) > 5  # something is drawn

    with pytest.raises(ValueError, match="bg_thr <= pos_thr"):
        evaluator.analyse(pos_thr=0.1, bg_thr=0.5)
    json.dumps(errors, allow_nan=False)  # metrics.json-ready
