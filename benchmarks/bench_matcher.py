"""Hungarian matching: detrkit's ``HungarianMatcher`` against transformers' DETR / Deformable DETR matchers.

Same inputs, same process, A and B alternated run by run so that a noisy shared machine slows both alike;
medians of ``--runs`` timed calls after warm-up. Batch 8, 20 targets per image, costs 1/5/2 (DETR) and 2/5/2
focal (Deformable DETR), 91 classes. Before timing, each case checks that both matchers return the same
assignment.

    .venv/bin/python benchmarks/bench_matcher.py [--runs 31] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher
from transformers.loss.loss_for_object_detection import HungarianMatcher as TransformersHungarianMatcher

from detrkit.matcher import HungarianMatcher
from detrkit.models.base import cpu_bf16

NUM_CLASSES = 91  # COCO's max id + 1, as the official DETR heads


def make_case(
    num_queries: int, *, batch: int, targets: int, focal: bool, device: torch.device, seed: int = 0
) -> tuple[dict, list[dict], dict, list[dict]]:
    """Random predictions and targets, in detrkit's and transformers' key names."""
    g = torch.Generator().manual_seed(seed)
    num_logits = NUM_CLASSES if focal else NUM_CLASSES + 1
    logits = torch.randn(batch, num_queries, num_logits, generator=g)
    boxes = torch.rand(batch, num_queries, 4, generator=g)  # (cx, cy, w, h) in [0, 1): a model's sigmoid output
    tgts = []
    for _ in range(batch):
        cxcy = 0.2 + 0.6 * torch.rand(targets, 2, generator=g)
        wh = 0.02 + 0.3 * torch.rand(targets, 2, generator=g)
        tgts.append(
            {
                "labels": torch.randint(0, NUM_CLASSES, (targets,), generator=g),
                "boxes": torch.cat([cxcy, wh], 1),
            }
        )
    ours_out = {"pred_logits": logits.to(device), "pred_boxes": boxes.to(device)}
    ours_tgt = [{k: v.to(device) for k, v in t.items()} for t in tgts]
    theirs_out = {"logits": ours_out["pred_logits"], "pred_boxes": ours_out["pred_boxes"]}
    theirs_tgt = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in ours_tgt]
    return ours_out, ours_tgt, theirs_out, theirs_tgt


def time_alternating(
    a: Callable[[], object], b: Callable[[], object], *, runs: int, warmup: int = 5
) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, called in turn."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        a()
        b()
    times_a, times_b = [], []
    for _ in range(runs):
        for fn, times in ((a, times_a), (b, times_b)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=31, help="timed calls of each matcher per case (>= 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--targets", type=int, default=20, help="targets per image")
    args = parser.parse_args()
    if args.runs < 7:
        parser.error("--runs must be at least 7")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    cases = [(100, False), (300, False), (900, False), (300, True)]
    for num_queries, focal in cases:
        if focal:
            ours = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal=True)
            theirs = DeformableDetrHungarianMatcher(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)
        else:
            ours = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
            theirs = TransformersHungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
        o_out, o_tgt, t_out, t_tgt = make_case(
            num_queries, batch=args.batch, targets=args.targets, focal=focal, device=device
        )
        for (pi, ti), (pj, tj) in zip(ours(o_out, o_tgt), theirs(t_out, t_tgt), strict=True):
            if not (torch.equal(pi, pj) and torch.equal(ti, tj)):
                raise SystemExit(f"matchers disagree at q={num_queries} focal={focal}")
        s_ours, s_theirs = time_alternating(
            functools.partial(ours, o_out, o_tgt), functools.partial(theirs, t_out, t_tgt), runs=args.runs
        )
        name = f"matcher q={num_queries}{' focal' if focal else ''} batch={args.batch}"
        print(
            f"{name}: detrkit {1e3 * s_ours:.2f} ms, transformers {1e3 * s_theirs:.2f} ms, "
            f"ratio {s_ours / s_theirs:.3f} [{cpu_bf16()[1]}]"
        )


if __name__ == "__main__":
    main()
