"""DETR-R50 inference and training step: detrkit against transformers' ``DetrForObjectDetection``, same weights.

The transformers model (random init, native ResNet-50 backbone) is saved and loaded by detrkit, so both compute the
same function (checked before timing). Same process, A and B alternated, medians after warm-up, float32,
``torch.set_num_threads(--threads)``. Inference under ``torch.inference_mode()``; the training step is forward +
loss with 5 boxes per image + backward + AdamW at batch 2, 512×512, backbone stages 2–4 trainable.

    .venv/bin/python benchmarks/bench_detr.py [--runs 5] [--threads 2] [--skip-train]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

import detrkit
from detrkit.config import RunConfig
from detrkit.engine import build_criterion


def _median_times(fns: dict[str, callable], runs: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up (allocations, oneDNN primitives)
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true", help="time inference only")
    parser.add_argument("--skip-inference", action="store_true", help="time the training step only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf = transformers.DetrForObjectDetection(transformers.DetrConfig(use_timm_backbone=False, num_labels=91)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = detrkit.load(tmp).eval()

    for h, w in () if args.skip_inference else ((800, 1216), (512, 512)):
        x = torch.randn(1, 3, h, w)
        with torch.inference_mode():
            diff = (hf(pixel_values=x).logits - ours(x)["pred_logits"]).abs().max().item()

            def run_ours(x=x):
                with torch.inference_mode():
                    ours(x)

            def run_hf(x=x):
                with torch.inference_mode():
                    hf(pixel_values=x)

            t = _median_times({"detrkit": run_ours, "transformers": run_hf}, args.runs)
        print(
            f"detr_r50 inference {h}x{w} batch=1: detrkit {t['detrkit'] * 1e3:.0f} ms, "
            f"transformers {t['transformers'] * 1e3:.0f} ms, ratio {t['detrkit'] / t['transformers']:.2f} "
            f"(max |logit diff| {diff:.1e})",
            flush=True,
        )
    if args.skip_train:
        return

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 512, 512, generator=g)
    boxes = [torch.rand(5, 4, generator=g) * 0.4 + 0.3 for _ in range(2)]
    labels = [torch.randint(0, 91, (5,), generator=g) for _ in range(2)]
    ours.train()
    hf.train()
    # transformers' freezing looks for parameter names its own ResNet does not use, so its whole CNN ends up
    # frozen; train stages 2-4 on both sides, as the DETR recipe does.
    for name, p in hf.model.backbone.named_parameters():
        if any(f"encoder.stages.{i}." in name for i in (1, 2, 3)):
            p.requires_grad_(True)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert n_ours == n_hf, (n_ours, n_hf)
    criterion = build_criterion(RunConfig(model=ours.config), ours.config.num_classes)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
    opt_hf = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)
    hf_labels = [{"class_labels": c, "boxes": b} for c, b in zip(labels, boxes, strict=True)]
    our_targets = [{"labels": c, "boxes": b} for c, b in zip(labels, boxes, strict=True)]

    def step_ours():
        loss = criterion(ours(x), our_targets)["loss"]
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()

    def step_hf():
        loss = hf(pixel_values=x, labels=hf_labels).loss
        opt_hf.zero_grad()
        loss.backward()
        opt_hf.step()

    t = _median_times({"detrkit": step_ours, "transformers": step_hf}, args.runs)
    print(
        f"detr_r50 train step 512x512 batch=2: detrkit {t['detrkit']:.2f} s, transformers {t['transformers']:.2f} s, "
        f"ratio {t['detrkit'] / t['transformers']:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
