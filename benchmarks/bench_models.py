"""Whole-model inference and training step: detrkit against transformers, the same weights, per architecture.

For each architecture a randomly initialised transformers model (native ResNet-50 backbone for the CNN models,
YOLOS-S for YOLOS) is saved and loaded by detrkit, so both compute the same function; the outputs are compared
before timing (max |logit diff| on every line). Same process, contenders alternated, medians after a warm-up,
float32, ``torch.set_num_threads(--threads)``.

- inference: batch 1 at 800×1216 and 512×512 under ``torch.inference_mode()``: transformers and detrkit as
  loaded (its default inference path: BatchNorm folded into channels-last convolutions with oneDNN post-ops;
  float32, so the same outputs up to rounding).
- training step: forward + loss (5 boxes per image) + backward + AdamW at batch 2, 512×512; ResNet stages 2–4
  trainable on both sides (the papers' recipe), every ViT weight for YOLOS.
- ``--memory``: peak RSS of each contender alone, each in its own process (inference at 800×1216, training step);
  with ``--bf16`` also detrkit's bfloat16 paths.
- ``--bf16``: detrkit against itself, float32 and bfloat16 autocast (``optimize_for_inference(bf16=True)``, the
  path of ``predict|eval --bf16``; ``train.amp=bf16`` for the training step), with transformers' float32 timed in
  the same alternation, each line naming the CPU and whether it has native bf16 (without it bf16 is emulated and
  slower: the figure says so rather than hiding it).

    .venv/bin/python benchmarks/bench_models.py [--arch detr conditional_detr deformable_detr yolos] [--runs 5]
        [--threads 2] [--skip-train] [--skip-inference] [--memory] [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

import detrkit
from detrkit.config import LossConfig, RunConfig
from detrkit.engine import build_criterion
from detrkit.models import architectures
from detrkit.models.base import cpu_bf16

ARCHS = ("detr", "conditional_detr", "deformable_detr", "yolos", "detr_panoptic")
# Rows that are an architecture with an option: inference only (the segmentation model against DetrForSegmentation)
VARIANTS = {"detr_panoptic": "detr"}


def hf_model(arch: str) -> torch.nn.Module:
    """The transformers model of ``arch`` at its published size (91 COCO labels), random weights."""
    import transformers  # here, not at the top: the memory children of detrkit must not pay for its import

    torch.manual_seed(0)
    if arch == "detr":
        return transformers.DetrForObjectDetection(transformers.DetrConfig(use_timm_backbone=False, num_labels=91))
    if arch == "detr_panoptic":  # detr-resnet-50-panoptic's architecture: 250 panoptic labels, the mask head
        resnet = transformers.ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"])  # the FPN's too
        cfg = transformers.DetrConfig(use_timm_backbone=False, backbone_config=resnet, num_labels=250)
        return transformers.DetrForSegmentation(cfg)
    if arch == "conditional_detr":
        cfg = transformers.ConditionalDetrConfig(use_timm_backbone=False, num_labels=91)
        return transformers.ConditionalDetrForObjectDetection(cfg)
    if arch == "deformable_detr":
        # transformers' default native-ResNet config reads stage 4 only; the published models read stages 2-4
        resnet = transformers.ResNetConfig(out_features=["stage2", "stage3", "stage4"])
        cfg = transformers.DeformableDetrConfig(use_timm_backbone=False, backbone_config=resnet, num_labels=91)
        return transformers.DeformableDetrForObjectDetection(cfg)
    if arch == "yolos":  # YOLOS-S (hustvl/yolos-small's architecture)
        cfg = transformers.YolosConfig(
            hidden_size=384,
            num_attention_heads=6,
            intermediate_size=1536,
            image_size=[800, 1333],
            use_mid_position_embeddings=False,
            num_labels=91,
        )
        return transformers.YolosForObjectDetection(cfg)
    raise ValueError(arch)


def _median_times(fns: dict[str, Callable[[], None]], runs: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up (allocations, oneDNN primitives)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _no_grad(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` under ``torch.inference_mode()``, as the inference timings call it."""

    def timed() -> None:
        with torch.inference_mode():
            fn()

    return timed


def _load_pair(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    hf = hf_model(arch).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = detrkit.load(tmp).eval()
    return hf, ours


def bench_inference(arch: str, runs: int) -> None:
    hf, ours = _load_pair(arch)
    for h, w in ((800, 1216), (512, 512)):
        x = torch.randn(1, 3, h, w)
        with torch.inference_mode():
            ref, out = hf(pixel_values=x), ours(x)
            diff = (ref.logits - out["pred_logits"]).abs().max().item()
            if "pred_masks" in out:  # the segmentation model: its masks too
                diff = max(diff, (ref.pred_masks - out["pred_masks"]).abs().max().item())

        t = _median_times(
            {
                "detrkit": _no_grad(lambda x=x: ours(x)),
                "transformers": _no_grad(lambda x=x: hf(pixel_values=x)),
            },
            runs,
        )
        print(
            f"{arch} inference {h}x{w} batch=1: detrkit {t['detrkit'] * 1e3:.0f} ms, "
            f"transformers {t['transformers'] * 1e3:.0f} ms, ratio {t['detrkit'] / t['transformers']:.2f} "
            f"(max |logit{' and mask' if arch in VARIANTS else ''} diff| {diff:.1e}) [{cpu_bf16()[1]}]",
            flush=True,
        )


def _models(arch: str, keep: str, weights: str | None) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(transformers, detrkit) models of ``arch``. With ``weights`` (a folder the parent saved the transformers
    model to) only the ``keep`` contender is built, the other is None: a memory child then holds one library's
    model and imports, as a user's process would (detrkit never imports transformers)."""
    if weights is None:
        return _load_pair(arch)
    if keep == "detrkit":
        return None, detrkit.load(weights).eval()
    return hf_model(arch).eval(), None  # the same seeded initialisation the parent saved


def _training_setup(
    arch: str, keep: str = "both", *, bf16: bool = False, weights: str | None = None
) -> tuple[Callable[[], None], Callable[[], None]]:
    """Training steps of both contenders; ``keep="detrkit"``/``"transformers"`` builds only that one's (the other
    step is a no-op), for memory measurements (``weights``: see :func:`_models`). ``bf16``: detrkit's forward and
    loss under bfloat16 autocast, as the engine runs them with ``train.amp=bf16``."""
    hf, ours = _models(arch, keep, weights)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 512, 512, generator=g)
    boxes = [torch.rand(5, 4, generator=g) * 0.4 + 0.3 for _ in range(2)]
    labels = [torch.randint(0, 91, (5,), generator=g) for _ in range(2)]
    step_ours = step_hf = lambda: None  # noqa: E731
    if hf is not None:
        hf.train()
        if arch == "yolos":
            for p in hf.parameters():
                p.requires_grad_(True)
        else:
            # transformers' freezing looks for parameter names its own ResNet does not use, so its whole CNN ends
            # up frozen; train stages 2-4 on both sides, as the papers' recipes do.
            for name, p in hf.model.backbone.named_parameters():
                p.requires_grad_(any(f"encoder.stages.{i}." in name for i in (1, 2, 3)))
        # fused AdamW on both sides: detrkit's engine and transformers' Trainer (torch >= 2.8) both default to it
        opt_hf = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4, fused=True)
        hf_labels = [{"class_labels": c, "boxes": b} for c, b in zip(labels, boxes, strict=True)]

        def step_hf() -> None:
            value = hf(pixel_values=x, labels=hf_labels).loss
            opt_hf.zero_grad()
            value.backward()
            opt_hf.step()

    if ours is not None:
        ours.train()
        loss = LossConfig() if not ours.config.focal else LossConfig(cost_class=2.0, weight_ce=2.0)
        criterion = build_criterion(RunConfig(model=ours.config, loss=loss), ours.config.num_classes)
        opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4, fused=True)
        our_targets = [{"labels": c, "boxes": b} for c, b in zip(labels, boxes, strict=True)]

        def step_ours() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                value = criterion(ours(x), our_targets)["loss"]
            opt_ours.zero_grad()
            value.backward()
            opt_ours.step()

    if hf is not None and ours is not None:
        n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
        n_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad)
        assert n_ours == n_hf, (n_ours, n_hf)
    if keep == "detrkit":  # the other closure, and with it the other model, is freed on return
        return step_ours, lambda: None
    if keep == "transformers":
        return (lambda: None), step_hf
    return step_ours, step_hf


def bench_bf16(arch: str, runs: int, *, train: bool) -> None:
    """detrkit float32 against detrkit bfloat16 autocast, with transformers' float32 timed in the same alternation
    (the issue's targets compare against it): inference at 800×1216 and, with ``train``, the training step of
    ``bench_training``."""
    native, detail = cpu_bf16()
    cpu = f"{detail}, {'native' if native else 'emulated'} bf16"
    hf, ours = _load_pair(arch)
    fp32 = copy.deepcopy(ours).optimize_for_inference()
    bf16 = ours.optimize_for_inference(bf16=True)
    x = torch.randn(1, 3, 800, 1216)
    mask = torch.zeros(1, 800, 1216, dtype=torch.bool)
    with torch.inference_mode():
        diff = fp32._inference_forward(x, mask)["pred_logits"] - bf16._inference_forward(x, mask)["pred_logits"]
        diff = diff.abs().max().item()

    t = _median_times(
        {
            "float32": _no_grad(lambda m=fp32: m._inference_forward(x, mask)),
            "bf16": _no_grad(lambda m=bf16: m._inference_forward(x, mask)),
            "transformers": _no_grad(lambda m=hf: m(pixel_values=x)),
        },
        runs,
    )
    print(
        f"{arch} inference 800x1216 batch=1 bf16 autocast: float32 {t['float32'] * 1e3:.0f} ms, bf16 "
        f"{t['bf16'] * 1e3:.0f} ms, ratio {t['bf16'] / t['float32']:.2f}; transformers float32 "
        f"{t['transformers'] * 1e3:.0f} ms, bf16 / transformers {t['bf16'] / t['transformers']:.2f} "
        f"(max |logit diff| {diff:.1e}; {cpu})",
        flush=True,
    )
    del fp32, bf16, hf
    if not train:
        return
    step_fp32, _ = _training_setup(arch, keep="detrkit")
    step_bf16, step_hf = _training_setup(arch, bf16=True)
    t = _median_times({"float32": step_fp32, "bf16": step_bf16, "transformers": step_hf}, runs)
    print(
        f"{arch} train step 512x512 batch=2 bf16 autocast: float32 {t['float32']:.2f} s, bf16 {t['bf16']:.2f} s, "
        f"ratio {t['bf16'] / t['float32']:.2f}; transformers float32 {t['transformers']:.2f} s, "
        f"bf16 / transformers {t['bf16'] / t['transformers']:.2f} ({cpu})",
        flush=True,
    )


def bench_training(arch: str, runs: int) -> None:
    step_ours, step_hf = _training_setup(arch)
    t = _median_times({"detrkit": step_ours, "transformers": step_hf}, runs)
    print(
        f"{arch} train step 512x512 batch=2: detrkit {t['detrkit']:.2f} s, transformers {t['transformers']:.2f} s, "
        f"ratio {t['detrkit'] / t['transformers']:.2f} [{cpu_bf16()[1]}]",
        flush=True,
    )


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ``getrusage``: Linux keeps ru_maxrss across ``execve``, so a
    child would report its parent's peak."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak_rss_child(arch: str, contender: str, task: str, weights: str) -> None:
    """Run one contender twice and print its peak RSS in MiB as JSON. Only that contender's library is imported
    and only its model built (detrkit loads ``weights``, the folder the parent saved transformers' model to); the
    high-water mark is reset (``/proc/self/clear_refs``) before the two runs."""
    library, _, precision = contender.partition("-")  # "detrkit-bf16": predict|eval --bf16, train.amp=bf16
    if task == "inference":
        hf, ours = _models(arch, library, weights)
        model = {"transformers": hf, "detrkit": ours}[library]
        del hf, ours
        if precision == "bf16":
            model.optimize_for_inference(bf16=True)
        x = torch.randn(1, 3, 800, 1216)
        mask = torch.zeros(1, 800, 1216, dtype=torch.bool)

        def step() -> None:
            with torch.inference_mode():
                if library == "transformers":
                    model(pixel_values=x)
                elif precision == "bf16":
                    model._inference_forward(x, mask)
                else:
                    model(x)

    else:
        step_ours, step_hf = _training_setup(arch, keep=library, bf16=precision == "bf16", weights=weights)
        step = step_ours if library == "detrkit" else step_hf
        del step_ours, step_hf
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(2):
        step()
    print(json.dumps({"peak_rss_mib": _peak_rss_mib()}))


def bench_memory(arch: str, threads: int, *, bf16: bool = False) -> None:
    """Peak RSS of each contender in its own process; ``bf16`` adds detrkit under bfloat16 autocast (the
    ``--bf16`` inference path and ``train.amp=bf16``) against transformers' float32."""
    contenders = ("detrkit", "transformers", *(("detrkit-bf16",) if bf16 else ()))
    with tempfile.TemporaryDirectory() as weights:
        hf_model(arch).save_pretrained(weights)
        for task in ("inference", "train"):
            peaks = {}
            for contender in contenders:
                cmd = [sys.executable, __file__, "--child", arch, contender, task, weights, "--threads", str(threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                peaks[contender] = json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]
            what = "inference 800x1216 batch=1" if task == "inference" else "train step 512x512 batch=2"
            print(
                f"{arch} peak RSS {what}: detrkit {peaks['detrkit']:.0f} MiB, "
                f"transformers {peaks['transformers']:.0f} MiB, ratio {peaks['detrkit'] / peaks['transformers']:.2f}"
                + (
                    f"; detrkit bf16 {peaks['detrkit-bf16']:.0f} MiB, ratio "
                    f"{peaks['detrkit-bf16'] / peaks['transformers']:.2f}"
                    if bf16
                    else ""
                )
                + f" [{cpu_bf16()[1]}]",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true", help="time inference only")
    parser.add_argument("--skip-inference", action="store_true", help="time the training step only")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS, one process per contender")
    parser.add_argument("--bf16", action="store_true", help="also detrkit float32 against bf16 autocast")
    parser.add_argument("--child", nargs=4, metavar=("ARCH", "CONTENDER", "TASK", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        _peak_rss_child(*args.child)
        return
    for arch in args.arch:
        if VARIANTS.get(arch, arch) not in architectures():
            print(f"{arch}: not implemented in this detrkit, skipped", flush=True)
            continue
        if not args.skip_inference:
            bench_inference(arch, args.runs)
        if arch in VARIANTS:
            continue
        if not args.skip_train:
            bench_training(arch, args.runs)
        if args.memory:
            bench_memory(arch, args.threads, bf16=args.bf16)
        if args.bf16:
            bench_bf16(arch, args.runs, train=not args.skip_train)


if __name__ == "__main__":
    main()
