"""Images per second of a real training run on real COCO images: detrkit against the official training loops
(facebookresearch/detr, fundamentalvision/Deformable-DETR) and transformers' ``Trainer``, same images, same batch,
same number of steps.

The full benchmark, in one line (a quiet machine: the figures are wall-clock throughput; the official trees are
read from /tmp/detr_official and /tmp/deformable_official unless ``--official``/``--official-deformable`` say
otherwise: check them out from their bare snapshots, ``git --work-tree=/tmp/detr_official --git-dir=<bare repo>
checkout HEAD -- .``):

    .venv/bin/python benchmarks/bench_train_real.py

Run time on the quiet 2-core Zen 4: 42 min (session 8; 6 runs of 2 warm-up + 16 timed steps at full size, each in
its own process with 30-60 s of start-up; a step takes ~4-11 s for DETR on every side, ~10-32 s for detrkit's
Deformable DETR, ~15-67 s for transformers' and the official one, whose deformable attention is ``grid_sample`` on
a CPU). Smoke run: ``--steps 2 --warmup 1 --max-size 320`` (all sizes scaled by 320/1333).

What each contender runs (each alone in its own process, one after the other, ``--repeats`` rounds alternated):

- **detrkit**: ``detrkit.engine.Trainer`` (what ``detrkit train`` runs, its default listeners included) with the
  ``detr_r50`` / ``deformable_detr_r50`` preset pointed at ``--data``: batch 2, the presets' DETR augmentation
  (flip; multi-scale resize, shorter side 480-800, longer ≤ 1333, or resize-crop-resize), aspect-ratio grouped
  batches, ``data.num_workers`` as the preset says (2). Offline: ``model.backbone_weights=null`` (random ResNet-50;
  the speed is the same). The query-statistics probe (``train.query_stats_images``, a no-gradient pass over 32
  images every quarter epoch) is turned off: an epoch capped at a few steps would run it several times inside the
  timed window, where a COCO epoch of 59k steps runs it 4 times.
- **official**: the authors' repository imported from its tree (``--official PATH``, ``$DETR_OFFICIAL`` or
  /tmp/detr_official for DETR; ``--official-deformable PATH``, ``$DEFORMABLE_DETR_OFFICIAL`` or
  /tmp/deformable_official for Deformable DETR; a row without its tree is skipped and says so): its
  ``build_model``, ``build_dataset("train")`` (``make_coco_transforms``:
  the same augmentation), ``utils.collate_fn``, ``RandomSampler``/``BatchSampler`` and AdamW param groups as its
  ``main.py`` builds them, with its argument defaults (batch 2; lr 1e-4 / 1e-5 for DETR, 2e-4 / 2e-5 / 0.1× for
  Deformable DETR; clip 0.1; 2 workers; ``--device cpu``), then its own ``train_one_epoch``. Monkeypatched, only
  what stops it on an offline CPU with torchvision 0.29: ``models.backbone.is_main_process`` returns False (its
  ``Backbone`` then builds ResNet-50 with ``pretrained=False`` instead of downloading ImageNet weights); for
  Deformable DETR also (a) ``torchvision.__version__`` reads "9.9" while its ``util/misc.py`` is imported (that
  file's ``float(__version__[:3])`` reads 0.29 as 0.2 and imports helpers torchvision removed), (b) an empty
  ``MultiScaleDeformableAttention`` module stands in for the CUDA-only compiled op and ``MSDeformAttnFunction``
  runs the repository's own PyTorch version (``ms_deform_attn_core_pytorch``, ``grid_sample``), and (c) its data
  prefetcher runs with ``prefetch=False`` (the ``True`` path needs CUDA streams). DETR's snapshot reads the
  torchvision version with ``packaging`` and needs only the first patch. Tried with facebookresearch/detr 29901c5
  and fundamentalvision/Deformable-DETR 11169a6.
- **transformers**: ``DetrForObjectDetection`` / ``DeformableDetrForObjectDetection``, random init, native
  ResNet-50 (no download), the presets' sizes (aux loss on; Deformable: 4 levels, 300 queries, FFN 1024, class
  cost 2), ResNet stages 2-4 trainable as in the other two (transformers' own freezing misses its ResNet's
  parameter names and would freeze the whole CNN), trained by ``transformers.Trainer`` (batch 2, 2 data-loader
  workers, lr 1e-4 / 2e-4 constant, weight decay 1e-4, gradient clipping 0.1, its default fused AdamW, no logging
  or saving). Augmentation, the closest its image processor does: horizontal flip (p 0.5) and
  ``DetrImageProcessor`` / ``DeformableDetrImageProcessor`` resizing with the shorter side drawn from DETR's
  scales (longer ≤ 1333); no random-crop branch (half of DETR's images take it; their final sizes are drawn from
  the same scales). Batches padded by the processor's ``pad`` to the batch's largest image.

Measured: wall time from the end of step ``--warmup`` to the end of step ``--warmup + --steps`` (data loading
included, model building and worker start-up excluded); images/s = steps × batch / that time. Also per run: the
padded batch's pixels per image (what the model computes on: each contender draws its own augmentation and order,
and detrkit groups batches by aspect ratio) and the training process's peak RSS (VmHWM; data-loader workers are
separate processes, not counted). ``ratio`` is detrkit's images/s over the other's (> 1: detrkit is faster).

    .venv/bin/python benchmarks/bench_train_real.py [--arch detr_r50 deformable_detr_r50] [--steps 16]
        [--warmup 2] [--max-size 1333] [--repeats 1] [--threads N] [--data DIR] [--official PATH]
        [--official-deformable PATH] [--contenders detrkit official transformers] [--detrkit-override key=value]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

ARCHS = ("detr_r50", "deformable_detr_r50")
CONTENDERS = ("detrkit", "official", "transformers")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"
# DETR's augmentation sizes (paper section 4; make_coco_transforms in the official code), for max_size 1333
DETR_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
DETR_CROP_RESIZE = (400, 500, 600)
DETR_CROP = (384, 600)
FULL_MAX_SIZE = 1333


def augmentation_sizes(max_size: int) -> dict[str, Any]:
    """DETR's sizes, scaled by ``max_size / 1333`` for quick runs (all three contenders get the same numbers)."""
    f = max_size / FULL_MAX_SIZE

    def scaled(values: tuple[int, ...]) -> list[int]:
        return [max(8, round(v * f)) for v in values]

    return {
        "scales": scaled(DETR_SCALES),
        "max_size": max_size,
        "crop_resize": scaled(DETR_CROP_RESIZE),
        "crop": scaled(DETR_CROP),
    }


# -- measurement shared by the contenders ------------------------------------------------------------------------
class StepClock:
    """Wall-clock times of step ends and the padded input size of every forward pass."""

    def __init__(self, warmup: int, steps: int, batch_size: int) -> None:
        self.warmup, self.steps, self.batch_size = warmup, steps, batch_size
        self.ends: list[float] = []  # ends[k]: the end of step k + 1
        self.pixels: list[int] = []  # H × W of each padded batch, one per forward pass

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())

    def watch(self, model: Any) -> None:
        """Record the padded (H, W) of every training forward pass of ``model``."""

        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("pixel_values")
            x = getattr(x, "tensors", x)  # the official code's NestedTensor
            if module.training and x is not None:
                self.pixels.append(int(x.shape[-2] * x.shape[-1]))

        model.register_forward_pre_hook(hook, with_kwargs=True)

    def result(self) -> dict[str, Any]:
        if len(self.ends) < self.warmup + self.steps:
            raise RuntimeError(f"only {len(self.ends)} steps ran, {self.warmup + self.steps} needed")
        seconds = self.ends[self.warmup + self.steps - 1] - self.ends[self.warmup - 1]
        timed = self.pixels[self.warmup : self.warmup + self.steps]
        return {
            "images_per_s": self.steps * self.batch_size / seconds,
            "seconds": seconds,
            "step_seconds": [
                b - a for a, b in itertools.pairwise(self.ends[self.warmup - 1 : self.warmup + self.steps])
            ],
            "padded_px_per_image": statistics.mean(timed) if timed else float("nan"),
            "peak_rss_mib": peak_rss_mib(),
        }


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- detrkit ------------------------------------------------------------------------------------------------------
def run_detrkit(arch: str, args: argparse.Namespace, clock: StepClock) -> None:
    import dataclasses

    from detrkit.config import TrainConfig, load_run_config
    from detrkit.engine import Listener, Trainer, setup_run

    sizes = augmentation_sizes(args.max_size)
    data = Path(args.data)
    overrides = [
        f"data.train_images={data / 'train2017'}",
        f"data.train_annotations={data / 'annotations' / 'instances_train2017.json'}",
        "data.val_images=",
        "data.val_annotations=",
        f"data.train_scales={sizes['scales']}",
        f"data.train_max_size={sizes['max_size']}",
        f"data.crop_resize={sizes['crop_resize']}",
        f"data.crop_size={sizes['crop']}",
        "model.backbone_weights=null",
        "train.epochs=1",
        f"train.batch_size={args.batch_size}",  # the presets' is 2, the default here
        f"train.max_steps_per_epoch={args.warmup + args.steps}",
        "train.device=cpu",
        f"train.output_dir={args.workdir}/detrkit_{arch}",
    ]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if "query_stats_images" in fields:
        overrides.append("train.query_stats_images=0")
    if "report" in fields:  # written after the last step, outside the timed window: it would only add run time
        overrides.append("train.report=false")
    config = load_run_config(arch, overrides + list(args.detrkit_override))

    class Clock(Listener):
        def on_step_end(self, trainer: Any, record: dict[str, Any]) -> None:
            clock.step_end()

    device = setup_run(config.train)
    trainer = Trainer(config, device=device, overwrite=True)
    trainer.listeners.insert(0, Clock())  # first: the step's end, before any listener's own work
    clock.watch(trainer.model)
    trainer.fit()


# -- facebookresearch/detr ----------------------------------------------------------------------------------------
class _TimedLoader:
    """The first ``count`` batches of ``loader``; asking for batch k + 1 marks the end of step k."""

    def __init__(self, loader: Any, count: int, clock: StepClock) -> None:
        self.loader, self.count, self.clock = loader, count, clock

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        batches = iter(self.loader)
        for i in range(self.count):
            if i:
                self.clock.step_end()  # before waiting for the next batch, as the other contenders' clocks
            yield next(batches)
        self.clock.step_end()


def _official_transforms(T: Any, sizes: dict[str, Any]) -> Any:
    """The official ``make_coco_transforms("train")`` structure built from the official ``T`` module with scaled
    sizes (quick runs only; at full size the repositories' own function runs untouched)."""
    scales, max_size = sizes["scales"], sizes["max_size"]
    return T.Compose(
        [
            T.RandomHorizontalFlip(),
            T.RandomSelect(
                T.RandomResize(scales, max_size=max_size),
                T.Compose(
                    [
                        T.RandomResize(sizes["crop_resize"]),
                        T.RandomSizeCrop(*sizes["crop"]),
                        T.RandomResize(scales, max_size=max_size),
                    ]
                ),
            ),
            T.Compose([T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]),
        ]
    )


def run_official(arch: str, args: argparse.Namespace, clock: StepClock) -> None:
    """facebookresearch/detr (``detr_r50``) or fundamentalvision/Deformable-DETR (``deformable_detr_r50``): its
    model, criterion, dataset and loader built as its ``main.py`` builds them, then its ``train_one_epoch``."""
    root = Path(args.official if arch == "detr_r50" else args.official_deformable)
    sys.path.insert(0, str(root))
    import numpy as np
    import torch
    import torchvision
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    deformable = arch == "deformable_detr_r50"
    if deformable:
        # Blockers on a CPU with torchvision 0.29, each replaced by the repository's own CPU path or a no-op:
        # (1) util/misc.py reads float(torchvision.__version__[:3]), "0.2" for 0.29, and imports helpers that
        # torchvision removed long ago; it sees a version of the right order while it is imported.
        real_version = torchvision.__version__
        torchvision.__version__ = "9.9"
        try:
            import util.misc  # noqa: F401
        finally:
            torchvision.__version__ = real_version
        # (2) the compiled MultiScaleDeformableAttention op is CUDA-only (its CPU source throws "Not implemented
        # on cpu"): an empty module satisfies the import, and the op runs the repository's own PyTorch version.
        sys.modules.setdefault("MultiScaleDeformableAttention", types.ModuleType("MultiScaleDeformableAttention"))
        from models.ops.functions import ms_deform_attn_func as msda

        def core(value, shapes, level_start, locations, weights, im2col_step):  # noqa: ANN001, ANN202
            return msda.ms_deform_attn_core_pytorch(value, shapes, locations, weights)

        msda.MSDeformAttnFunction.apply = staticmethod(core)

    import datasets.coco as official_coco  # noqa: I001 (the snapshot's modules, from sys.path)
    import datasets.transforms as T
    import engine as official_engine
    import main as official_main
    import models.backbone as official_backbone
    import util.misc as utils
    from datasets import build_dataset
    from models import build_model

    # Offline: pretrained=is_main_process() would download torchvision's ImageNet ResNet-50.
    official_backbone.is_main_process = lambda: False
    if deformable:
        # (3) train_one_epoch prefetches on a CUDA stream; its prefetcher's prefetch=False path is the CPU one.
        prefetcher = official_engine.data_prefetcher
        official_engine.data_prefetcher = lambda loader, device, prefetch=True: prefetcher(loader, device, False)
    if args.max_size != FULL_MAX_SIZE:
        sizes = augmentation_sizes(args.max_size)
        official_coco.make_coco_transforms = lambda image_set: _official_transforms(T, sizes)
    a = official_main.get_args_parser().parse_args(
        ["--coco_path", str(args.data), "--device", "cpu", "--batch_size", str(args.batch_size)]
    )
    a.distributed = False
    # main.py's set-up, in its order
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    random.seed(a.seed)
    model, criterion, _ = build_model(a)
    named = list(model.named_parameters())
    if deformable:  # main.py's three groups: backbone, sampling offsets/reference points (0.1 lr), the rest

        def matches(name: str, keywords: list[str]) -> bool:
            return any(k in name for k in keywords)

        param_dicts = [
            {
                "params": [
                    p
                    for n, p in named
                    if not matches(n, a.lr_backbone_names)
                    and not matches(n, a.lr_linear_proj_names)
                    and p.requires_grad
                ],
                "lr": a.lr,
            },
            {
                "params": [p for n, p in named if matches(n, a.lr_backbone_names) and p.requires_grad],
                "lr": a.lr_backbone,
            },
            {
                "params": [p for n, p in named if matches(n, a.lr_linear_proj_names) and p.requires_grad],
                "lr": a.lr * a.lr_linear_proj_mult,
            },
        ]
    else:
        param_dicts = [
            {"params": [p for n, p in named if "backbone" not in n and p.requires_grad]},
            {"params": [p for n, p in named if "backbone" in n and p.requires_grad], "lr": a.lr_backbone},
        ]
    optimizer = torch.optim.AdamW(param_dicts, lr=a.lr, weight_decay=a.weight_decay)
    dataset = build_dataset(image_set="train", args=a)
    batches = BatchSampler(RandomSampler(dataset), a.batch_size, drop_last=True)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=utils.collate_fn, num_workers=a.num_workers)
    clock.watch(model)
    with contextlib.redirect_stdout(io.StringIO()):  # its MetricLogger prints every 10 steps
        official_engine.train_one_epoch(
            model, criterion, _TimedLoader(loader, args.warmup + args.steps, clock), optimizer, torch.device("cpu"),
            0, a.clip_max_norm,
        )  # fmt: skip


# -- transformers -------------------------------------------------------------------------------------------------
class HFCocoTrain:
    """COCO images through transformers' image processor: flip (p 0.5) and a shorter side drawn from DETR's
    scales, unpadded; ``collate`` pads a batch with the processor's ``pad``."""

    def __init__(self, data: Path, processor: Any, sizes: dict[str, Any]) -> None:
        coco = json.loads((data / "annotations" / "instances_train2017.json").read_text())
        self.labels = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
        self.images = sorted(coco["images"], key=lambda im: im["id"])
        self.annotations: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        for ann in coco["annotations"]:
            self.annotations[ann["image_id"]].append(ann)
        self.folder, self.processor, self.sizes = data / "train2017", processor, sizes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        info = self.images[index]
        image = Image.open(self.folder / info["file_name"]).convert("RGB")
        anns = []
        flip = random.random() < 0.5
        for a in self.annotations[info["id"]]:
            x, y, w, h = a["bbox"]
            anns.append(
                {
                    **a,
                    "category_id": self.labels[a["category_id"]],
                    "bbox": [image.width - x - w if flip else x, y, w, h],
                }
            )
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        size = {"shortest_edge": random.choice(self.sizes["scales"]), "longest_edge": self.sizes["max_size"]}
        out = self.processor(
            images=image,
            annotations={"image_id": info["id"], "annotations": anns},
            size=size,
            do_pad=False,
            return_tensors="pt",
        )
        return {"pixel_values": out["pixel_values"][0], "labels": dict(out["labels"][0])}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        height = max(s["pixel_values"].shape[1] for s in samples)
        width = max(s["pixel_values"].shape[2] for s in samples)
        images, masks, labels = [], [], []
        for s in samples:
            image, mask, label = self.processor.pad(s["pixel_values"], (height, width), s["labels"])
            images.append(image)
            masks.append(mask)
            labels.append(label)
        return {"pixel_values": torch.stack(images), "pixel_mask": torch.stack(masks), "labels": labels}


def run_transformers(arch: str, args: argparse.Namespace, clock: StepClock) -> None:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if arch == "detr_r50":
        cfg = transformers.DetrConfig(use_timm_backbone=False, num_labels=80, auxiliary_loss=True)
        model = transformers.DetrForObjectDetection(cfg)
        processor = transformers.DetrImageProcessor()
        lr = 1e-4
    else:
        resnet = transformers.ResNetConfig(out_features=["stage2", "stage3", "stage4"])
        cfg = transformers.DeformableDetrConfig(
            use_timm_backbone=False, backbone_config=resnet, num_labels=80, auxiliary_loss=True, class_cost=2
        )
        model = transformers.DeformableDetrForObjectDetection(cfg)
        processor = transformers.DeformableDetrImageProcessor()
        lr = 2e-4
    for name, p in model.model.backbone.named_parameters():
        p.requires_grad_(any(f"encoder.stages.{i}." in name for i in (1, 2, 3)))
    dataset = HFCocoTrain(Path(args.data), processor, augmentation_sizes(args.max_size))

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            clock.step_end()

    training_args = transformers.TrainingArguments(
        output_dir=f"{args.workdir}/transformers_{arch}",
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=lr,
        weight_decay=1e-4,
        max_grad_norm=0.1,
        lr_scheduler_type="constant",
        dataloader_num_workers=2,
        remove_unused_columns=False,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=42,
    )
    trainer = transformers.Trainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=dataset.collate, callbacks=[Clock()]
    )
    clock.watch(model)
    trainer.train()


RUNNERS = {"detrkit": run_detrkit, "official": run_official, "transformers": run_transformers}


# -- the parent: one process per run ------------------------------------------------------------------------------
def cpu_tag(threads: int | None) -> str:
    """The CPU, its capability and native bf16, as every benchmark line names them."""
    import torch

    from detrkit.kernels import cpu_info

    cpu = cpu_info()
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    bf16 = "native bf16" if cpu["flags"] & {"avx512_bf16", "amx_bf16", "bf16"} else "no native bf16"
    n = threads or torch.get_num_threads()
    return f"{cpu['model']}, {capability}, {bf16}, {os.cpu_count()} cores, {n} threads, torch {torch.__version__}"


def run_child(contender: str, arch: str, args: argparse.Namespace) -> dict[str, Any] | str:
    """One run in its own process: its result, or why it did not run."""
    cmd = [sys.executable, __file__, "--child", contender, arch, "--workdir", args.workdir]
    for name in ("steps", "warmup", "max_size", "batch_size", "data", "official", "official_deformable", "threads"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    for item in args.detrkit_override:
        cmd += ["--detrkit-override", item]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        return "failed (exit {}): {}".format(proc.returncode, " | ".join(tail))
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    parser.add_argument("--max-size", type=int, default=FULL_MAX_SIZE, help="longer side cap; DETR's sizes scale")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all runs, alternated; medians printed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--data", default=os.environ.get("DETRKIT_COCO"), help=f"COCO folder (default {DEFAULT_DATA})")
    parser.add_argument(
        "--official",
        default=os.environ.get("DETR_OFFICIAL", "/tmp/detr_official"),
        help="facebookresearch/detr tree (its row is skipped when absent)",
    )
    parser.add_argument(
        "--official-deformable",
        default=os.environ.get("DEFORMABLE_DETR_OFFICIAL", "/tmp/deformable_official"),
        help="fundamentalvision/Deformable-DETR tree (its row is skipped when absent)",
    )
    parser.add_argument("--detrkit-override", action="append", default=[], help="extra detrkit key=value")
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("CONTENDER", "ARCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.max_size < 64 or args.batch_size < 1:
        parser.error("--max-size must be ≥ 64 and --batch-size ≥ 1")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be ≥ 1 (the clock starts at the end of the last warm-up step)")
    data = Path(args.data or DEFAULT_DATA)
    if not (data / "annotations" / "instances_train2017.json").is_file() or not (data / "train2017").is_dir():
        if args.data is None:  # `make bench` on a checkout without the shared data: nothing to measure, not an error
            print(f"bench_train_real: skipped: no coco128 at {data} (--data DIR names a COCO folder)")
            return 0
        parser.error(f"--data {data}: needs train2017/ and annotations/instances_train2017.json (COCO layout)")
    args.data = str(data)
    images = len(json.loads((data / "annotations" / "instances_train2017.json").read_text())["images"])
    if (args.warmup + args.steps) * args.batch_size > images:
        parser.error(f"{args.warmup} + {args.steps} steps of {args.batch_size} need more than {data}'s {images} images")

    if args.child:
        contender, arch = args.child
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        clock = StepClock(args.warmup, args.steps, args.batch_size)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result line
            RUNNERS[contender](arch, args, clock)
        print(json.dumps(clock.result()))
        return 0

    snapshots = {  # arch -> (the official tree, a file only it has, its name, the option that names the tree)
        "detr_r50": (args.official, "models/detr.py", "facebookresearch/detr", "--official"),
        "deformable_detr_r50": (
            args.official_deformable,
            "models/deformable_detr.py",
            "fundamentalvision/Deformable-DETR",
            "--official-deformable",
        ),
    }
    print(f"# {cpu_tag(args.threads)}; load average {os.getloadavg()[0]:.1f}; {platform.python_version()}", flush=True)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    failures: dict[tuple[str, str], str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_real_") as workdir:
        args.workdir = workdir
        for _ in range(args.repeats):
            for arch in args.arch:
                for contender in args.contenders:
                    key = (arch, contender)
                    tree, marker, name, how = snapshots[arch]
                    if contender == "official" and not (tree and (Path(tree) / marker).is_file()):
                        failures[key] = f"skipped: no {name} tree at {tree} ({how} PATH names it)"
                        continue
                    out = run_child(contender, arch, args)
                    if isinstance(out, str):
                        failures[key] = out
                    else:
                        results.setdefault(key, []).append(out)
                        steps = " ".join(f"{t:.1f}" for t in out["step_seconds"])
                        print(
                            f"# {arch} {contender}: {out['images_per_s']:.3f} images/s, steps (s): {steps}",
                            file=sys.stderr,
                        )
    what = (
        f"train {data.name} batch={args.batch_size} max_size={args.max_size} "
        f"({args.steps} steps after {args.warmup} warm-up{f', median of {args.repeats}' if args.repeats > 1 else ''})"
    )
    tag = cpu_tag(args.threads)
    for arch in args.arch:
        ours = results.get((arch, "detrkit"))
        ours_ips = statistics.median(r["images_per_s"] for r in ours) if ours else None
        for contender in args.contenders:
            runs = results.get((arch, contender))
            if not runs:
                print(f"{arch} {what}: {contender} {failures.get((arch, contender), 'no result')}", flush=True)
                continue
            ips = statistics.median(r["images_per_s"] for r in runs)
            px = statistics.median(r["padded_px_per_image"] for r in runs) / 1e6
            rss = statistics.median(r["peak_rss_mib"] for r in runs) / 1024
            ratio = "" if contender == "detrkit" or ours_ips is None else f", ratio {ours_ips / ips:.2f}"
            print(
                f"{arch} {what}: {contender} {ips:.3f} images/s{ratio} "
                f"({px:.2f} Mpx/image padded, peak RSS {rss:.2f} GiB) [{tag}]",
                flush=True,
            )
    failed = [k for k, v in failures.items() if v.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
