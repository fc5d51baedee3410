"""Accuracy and time of detrkit's inference variants on a trained model and a COCO split.

Variants: ``reference`` (the backbone's modules one after the other: convolution, BatchNorm, ReLU), ``default``
(what ``detrkit.load`` gives: BatchNorm folded into channels-last convolutions, oneDNN post-ops on CPUs),
``optimize_for_inference()`` (the folding made permanent), and ``optimize_for_inference(bf16=True)``. Each line
gives AP/AP50 on the split, the evaluation's wall time, and the largest score and box differences against the
reference path over the top-10 detections of every image.

    .venv/bin/python benchmarks/bench_inference_variants.py --weights demo_run/run/model \\
        --images demo_run/data/val --annotations demo_run/data/val.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from unittest import mock

import torch

import detrkit
from detrkit.backbone import ResNetBackbone
from detrkit.data import CocoDetection
from detrkit.evaluation import evaluate_model
from detrkit.transforms import eval_transforms


def _top10(results: list[dict]) -> dict[int, list[dict]]:
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    return {k: sorted(v, key=lambda r: -r["score"])[:10] for k, v in by_image.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = detrkit.load(args.weights).eval()
    dataset = CocoDetection(
        args.images,
        args.annotations,
        transforms=eval_transforms(size=model.config.image_size, max_size=model.config.max_size),
    )
    variants = {
        "reference": (model, mock.patch.object(ResNetBackbone, "_conv_mode", lambda self, x: "modules")),
        "default": (model, None),
        "optimize_for_inference()": (copy.deepcopy(model).optimize_for_inference(), None),
        "optimize_for_inference(bf16=True)": (copy.deepcopy(model).optimize_for_inference(bf16=True), None),
    }
    ref = None
    for name, (m, patch) in variants.items():
        evaluate_model(m, dataset, batch_size=8)  # warm-up (kernel compilation, weight caches)
        with patch or contextlib.nullcontext():
            start = time.perf_counter()
            metrics, results = evaluate_model(m, dataset, batch_size=8)
            seconds = time.perf_counter() - start
        top = _top10(results)
        if ref is None:
            ref, diff = top, ""
        else:
            ds = db = 0.0
            for image_id, dets in ref.items():
                for a, b in zip(dets, top.get(image_id, []), strict=False):
                    ds = max(ds, abs(a["score"] - b["score"]))
                    db = max(db, max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"], strict=True)))
            diff = f", max |Δ score| {ds:.1e}, max |Δ box| {db:.1e} px (top 10 per image, rank by rank)"
        print(f"{name}: AP {metrics['AP']:.4f}, AP50 {metrics['AP50']:.4f}, eval {seconds:.1f} s{diff}", flush=True)


if __name__ == "__main__":
    main()
