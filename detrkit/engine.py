"""The training engine shared by every architecture: data order, optimisation, checkpoints, evaluation, logging.

A run directory holds ``config.yaml`` (the resolved config), ``log.jsonl`` (one JSON object per step and per epoch),
``checkpoints/step-XXXXXXXX.pt`` (resumable training state, the last ``keep_last`` kept), ``best/`` and ``model/``
(slim weights-only exports: ``config.json`` + ``model.safetensors``), ``metrics.json`` and ``curves.png``.

Determinism: the order of samples in epoch ``e`` is a permutation seeded by ``(seed, e)``; each sample's
augmentation is seeded by ``(seed, e, index)`` in a forked RNG, so neither depends on how many steps ran before; the
global RNG (dropout) is saved in every checkpoint. A run resumed from any checkpoint therefore continues exactly as
the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from . import distributed as dist
from .checkpoint import atomic_write, atomic_write_text, init_from_weights
from .config import ModelConfig, RunConfig
from .criterion import SetCriterion
from .data import CocoDetection, collate
from .evaluation import COCO_METRIC_KEYS, CocoEvaluator, write_metrics
from .matcher import HungarianMatcher, NonFiniteCostError
from .models import Detector, build_model
from .models.base import to_float as _to_float
from .transforms import eval_transforms, train_transforms

log = logging.getLogger("detrkit")

CHECKPOINT_FORMAT = "detrkit-train"


class TrainingDiverged(RuntimeError):
    """Raised after too many consecutive non-finite losses."""


# ---------------------------------------------------------------------------------------------------------------
# Data order and augmentation seeds


class EpochSampler(Sampler[int]):
    """A deterministic, resumable, optionally sharded sampler.

    Epoch ``e`` visits a permutation seeded by ``(seed, e)`` (or the natural order when ``shuffle`` is off), padded
    to a multiple of the number of processes and split round-robin as ``DistributedSampler`` does. ``skip`` drops
    the first indices of this process's share, to resume mid-epoch.
    """

    def __init__(self, size: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = math.ceil(self.size / self.world_size) * self.world_size
        order += order[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.skip :])

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size) - self.skip


class SeededDataset(Dataset):
    """Seeds each sample's random augmentation with ``(seed, epoch, index)`` inside a forked RNG.

    The global RNGs (torch and Python's ``random``) are left as they were, so data loading never changes the
    random stream that dropout and the rest of training see, in the main process or in workers.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed)
                random.seed(item_seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks


def build_criterion(config: RunConfig, num_classes: int) -> SetCriterion:
    lc, focal = config.loss, config.model.focal
    matcher = HungarianMatcher(
        cost_class=lc.cost_class,
        cost_bbox=lc.cost_bbox,
        cost_giou=lc.cost_giou,
        focal=focal,
        focal_alpha=lc.focal_alpha,
        focal_gamma=lc.focal_gamma,
    )
    return SetCriterion(
        num_classes=num_classes,
        matcher=matcher,
        eos_coef=lc.eos_coef,
        weight_ce=lc.weight_ce,
        weight_bbox=lc.weight_bbox,
        weight_giou=lc.weight_giou,
        focal=focal,
        focal_alpha=lc.focal_alpha,
        focal_gamma=lc.focal_gamma,
    )


def build_train_dataset(config: RunConfig) -> CocoDetection:
    d = config.data
    _require_files(d.train_images, d.train_annotations, "train")
    tf = train_transforms(
        scales=d.train_scales,
        max_size=d.train_max_size,
        crop_resize=d.crop_resize if d.random_crop else None,
        crop_size=d.crop_size,
    )
    return CocoDetection(d.train_images, d.train_annotations, transforms=tf)


def build_val_dataset(config: RunConfig) -> CocoDetection | None:
    d = config.data
    if not d.val_annotations:
        return None
    _require_files(d.val_images, d.val_annotations, "val")
    return CocoDetection(
        d.val_images,
        d.val_annotations,
        transforms=eval_transforms(size=d.eval_size, max_size=d.eval_max_size),
    )


def _require_files(images: str, annotations: str, split: str) -> None:
    if not images or not annotations:
        raise ValueError(f"data.{split}_images and data.{split}_annotations must be set in the config")
    if not Path(images).is_dir():
        raise FileNotFoundError(f"data.{split}_images: no such folder {images}")
    if not Path(annotations).is_file():
        raise FileNotFoundError(f"data.{split}_annotations: no such file {annotations}")


def param_groups(model: nn.Module, lr: float, lr_backbone: float) -> list[dict[str, Any]]:
    """AdamW groups: the backbone trains at ``lr_backbone`` (DETR section 4), everything else at ``lr`` times the
    model's ``lr_scale(name)`` (Deformable DETR trains its sampling offsets and reference points at 0.1×)."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            if name.startswith("backbone."):
                group_lr = lr_backbone
            else:
                group_lr = lr * (model.lr_scale(name) if isinstance(model, Detector) else 1.0)
            groups.setdefault(group_lr, []).append(p)
    # the main group first: the logged learning rate is param_groups[0]'s
    order = sorted(groups, key=lambda g: g != lr)
    return [{"params": groups[g], "lr": g} for g in order]


def lr_factor(step: int, *, config: RunConfig, steps_per_epoch: int) -> float:
    """Learning-rate multiplier after ``step`` optimizer updates."""
    t = config.train
    total = max(1, t.epochs * steps_per_epoch)
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        progress = min(1.0, (step - t.warmup_steps) / max(1, total - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    epoch = step // max(1, steps_per_epoch)
    return t.lr_drop_factor ** sum(epoch >= e for e in t.lr_drop_epochs)


def model_config_for_data(config: RunConfig, dataset: CocoDetection) -> ModelConfig:
    lm = dataset.label_map
    return config.model.replace(
        num_classes=lm.num_classes,
        category_ids=lm.category_ids,
        class_names=lm.names,
        image_size=config.data.eval_size,
        max_size=config.data.eval_max_size,
    )


# ---------------------------------------------------------------------------------------------------------------
# Progress and logs


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise a log line every ``every`` steps."""

    def __init__(self, total: int, *, desc: str, every: int, enabled: bool) -> None:
        self.total, self.desc, self.every, self.enabled = total, desc, every, enabled
        self.bar = None
        self.start = time.perf_counter()
        self.n = 0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)

    def update(self, n: int, stats: dict[str, float]) -> None:
        self.n += n
        if not self.enabled:
            return
        text = {k: f"{v:.4g}" for k, v in stats.items()}
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(text, refresh=False)
        elif self.n % self.every == 0 or self.n == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / self.n * (self.total - self.n)
            log.info(
                "%s %d/%d  %s  eta %s",
                self.desc,
                self.n,
                self.total,
                "  ".join(f"{k} {v}" for k, v in text.items()),
                _fmt_time(eta),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class JsonlLog:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.file = open(path, "a") if enabled else None  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def evaluate(
    model: Detector,
    dataset: CocoDetection,
    *,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    amp: str = "none",
    progress: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COCO bbox metrics of ``model`` on ``dataset`` (sharded across processes when distributed).

    Returns the 12 metrics and the detections as a COCO results list (all processes' on rank 0).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sampler = EpochSampler(len(dataset), shuffle=False, seed=0, rank=dist.rank(), world_size=dist.world_size())
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),  # keeps the global RNG untouched
    )
    evaluator = CocoEvaluator(dataset.ann_file)
    bar = Progress(
        len(loader), desc="eval", every=max(1, len(loader) // 5), enabled=progress and dist.is_main_process()
    )
    for batch in loader:
        batch = batch.to(device)
        with _autocast(device, amp):
            forward = getattr(model, "_inference_forward", model)  # honours optimize_for_inference()
            outputs = forward(batch.pixel_values, batch.padding_mask)
        outputs = _to_float(outputs)
        results = model.postprocess(outputs, batch.orig_sizes, threshold=0.0, top_k=100)
        evaluator.update({int(i): r for i, r in zip(batch.image_ids, results, strict=True)})
        bar.update(1, {})
    bar.close()
    evaluator.synchronize()
    metrics = evaluator.summarize()
    model.train(was_training)
    return metrics, evaluator.results()


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (0-based)
    batches_done: int = 0  # batches of this epoch already trained on
    global_step: int = 0  # optimizer updates so far
    best_ap: float = -1.0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0


class Trainer:
    """Trains ``config`` end to end. ``fit()`` returns the final metrics (empty without a val split).

    Args:
        config: the resolved run configuration.
        resume: a checkpoint path, ``"auto"`` (the run directory's latest, if any) or None.
        model: an already built model (tests); by default built from the config and the training data.
    """

    def __init__(self, config: RunConfig, *, resume: str | None = None, model: Detector | None = None) -> None:
        self.config = config
        t = config.train
        self.device = dist.init_from_env(t.device)
        self.is_main = dist.is_main_process()
        self.run_dir = Path(t.output_dir)
        if t.deterministic:
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS for determinism
                torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed % 2**32)

        self.train_set = build_train_dataset(config)
        self.val_set = build_val_dataset(config)
        if self.val_set is not None and self.val_set.label_map != self.train_set.label_map:
            raise ValueError(
                f"the val annotations ({config.data.val_annotations}) have different categories from the train "
                f"annotations ({config.data.train_annotations}): ids {list(self.val_set.label_map.category_ids)} "
                f"vs {list(self.train_set.label_map.category_ids)}"
            )
        model_config = model_config_for_data(config, self.train_set)
        if model is None:
            model = init_from_weights(model_config, t.init_weights) if t.init_weights else build_model(model_config)
        self.model: Detector = model.to(self.device)
        self.config = config = RunConfig(model=self.model.config, data=config.data, loss=config.loss, train=t)
        self.criterion = build_criterion(config, self.model.config.num_classes).to(self.device)

        self.ddp_model: nn.Module = self.model
        if dist.is_distributed():
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        # fused: one kernel per step instead of a dozen passes over every parameter (CPU and CUDA; what
        # transformers' Trainer also defaults to)
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, t.lr, t.lr_backbone), lr=t.lr, weight_decay=t.weight_decay, fused=fused
        )
        self.sampler = EpochSampler(
            len(self.train_set), shuffle=True, seed=t.seed, rank=dist.rank(), world_size=dist.world_size()
        )
        self.seeded = SeededDataset(self.train_set, t.seed)
        batches = len(self.sampler) // t.batch_size
        if t.max_steps_per_epoch:
            batches = min(batches, t.max_steps_per_epoch * t.grad_accum_steps)
        if batches < t.grad_accum_steps:
            raise ValueError(
                f"the training split has {len(self.train_set)} images: fewer than one update of "
                f"{t.batch_size} × {t.grad_accum_steps} per process; lower train.batch_size or train.grad_accum_steps"
            )
        self.batches_per_epoch = batches - batches % t.grad_accum_steps
        self.steps_per_epoch = self.batches_per_epoch // t.grad_accum_steps
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16" and self.device.type == "cuda")
        if t.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a CUDA device; use train.amp=bf16 on the CPU")
        self.ema = None
        if t.ema:
            self.ema = torch.optim.swa_utils.AveragedModel(
                self.model,
                multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t.ema_decay),
                use_buffers=True,
            )
        self.state = TrainState()
        self._set_lr()
        self.history: list[dict[str, Any]] = []
        self._epoch_stats: dict[str, float] = {}
        self._stop_signal: int | None = None
        if resume:
            path = self.latest_checkpoint() if resume == "auto" else Path(resume)
            if path is not None:
                self.load_checkpoint(path)
            elif self.is_main:
                log.info("resume=auto: no checkpoint in %s, starting a new run", self.run_dir / "checkpoints")

    # -- checkpoints --------------------------------------------------------------------------------------------
    def eval_model(self) -> Detector:
        return self.ema.module if self.ema is not None else self.model

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.run_dir / "checkpoints").glob("step-*.pt"))
        return found[-1] if found else None

    def save_checkpoint(self) -> Path | None:
        """Write the resumable training state atomically and keep the last ``keep_last`` (rank 0 only)."""
        if not self.is_main:
            return None
        s = self.state
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "state": vars(s).copy(),
            "history": self.history,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": _python_rng_to_list(random.getstate()),
                "numpy": _numpy_rng_to_list(np.random.get_state()),
            },
        }
        ckpt_dir = self.run_dir / "checkpoints"
        path = atomic_write(ckpt_dir / f"step-{s.global_step:08d}.pt", lambda p: torch.save(payload, p))
        for old in sorted(ckpt_dir.glob("step-*.pt"))[: -self.config.train.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint file {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a detrkit training checkpoint (use train.init_weights for weights)")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt["ema"] is None:
                raise ValueError(f"{path} was trained without EMA; resume with train.ema=false")
            self.ema.load_state_dict(ckpt["ema"])
        self.state = TrainState(**ckpt["state"])
        self._set_lr()
        self.history = list(ckpt.get("history", []))
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(_python_rng_from_list(rng["python"]))
        np.random.set_state(_numpy_rng_from_list(rng["numpy"]))
        if self.is_main:
            log.info("resumed from %s (epoch %d, step %d)", path, self.state.epoch + 1, self.state.global_step)

    def export(self, name: str) -> Path | None:
        """Slim weights-only export (``config.json`` + ``model.safetensors``) of the evaluated model."""
        if not self.is_main:
            return None
        return self.eval_model().save_pretrained(self.run_dir / name)

    # -- the loop -----------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        t = self.config.train
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", self.config.to_yaml())
        self.jsonl = JsonlLog(self.run_dir / "log.jsonl", self.is_main)
        self.tb = None
        if t.tensorboard and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(
                    "train.tensorboard=true needs the tensorboard package: pip install 'detrkit[tensorboard]'"
                ) from e

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        previous = self._install_signal_handlers()
        metrics: dict[str, float] = {}
        try:
            if self.is_main:
                log.info(
                    "training %s (%s) on %d images, %d steps per epoch, %d epochs, device %s, %d process(es)",
                    self.model.config.arch,
                    f"{self.model.num_parameters(trainable_only=True) / 1e6:.1f}M trainable parameters",
                    len(self.train_set),
                    self.steps_per_epoch,
                    t.epochs,
                    self.device,
                    dist.world_size(),
                )
            while self.state.epoch < t.epochs:
                epoch = self.state.epoch
                finished = self.train_one_epoch(epoch)
                if not finished:
                    break
                self.state.epoch += 1
                self.state.batches_done = 0
                record: dict[str, Any] = {"type": "epoch", "epoch": epoch + 1, "step": self.state.global_step}
                record.update(self._epoch_stats)
                last = self.state.epoch == t.epochs
                if self.val_set is not None and ((t.eval_every and (epoch + 1) % t.eval_every == 0) or last):
                    metrics, _ = evaluate(
                        self.eval_model(),
                        self.val_set,
                        batch_size=t.batch_size,
                        device=self.device,
                        num_workers=self.config.data.num_workers,
                        amp=t.amp,
                    )
                    record.update({k: metrics[k] for k in COCO_METRIC_KEYS})
                    if self.is_main:
                        write_metrics(metrics, self.run_dir / "metrics.json")
                        log.info(
                            "epoch %d: AP %.4f  AP50 %.4f  AP75 %.4f",
                            epoch + 1,
                            metrics["AP"],
                            metrics["AP50"],
                            metrics["AP75"],
                        )
                        if metrics["AP"] > self.state.best_ap:
                            self.state.best_ap = metrics["AP"]
                            self.export("best")
                self.history.append(record)
                self.jsonl.write(record)
                if self.tb is not None:
                    for k, v in record.items():
                        if k not in ("type", "epoch", "step") and isinstance(v, (int, float)):
                            self.tb.add_scalar(f"epoch/{k}", v, epoch + 1)
                self.save_checkpoint()
            else:
                self.export("model")
                if self.is_main:
                    self.plot()
        finally:
            self._restore_signal_handlers(previous)
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
        return metrics

    def train_one_epoch(self, epoch: int) -> bool:
        """Train on the rest of ``epoch``; False when a stop signal interrupted it (after saving)."""
        t = self.config.train
        s = self.state
        self.sampler.set_epoch(epoch, skip=s.batches_done * t.batch_size)
        self.seeded.epoch = epoch
        loader = DataLoader(
            self.seeded,
            batch_size=t.batch_size,
            sampler=self.sampler,
            collate_fn=collate,
            num_workers=self.config.data.num_workers,
            generator=torch.Generator().manual_seed(t.seed + epoch),  # keeps the global RNG untouched
            persistent_workers=False,
            drop_last=True,
        )
        self.ddp_model.train()
        self.criterion.train()
        remaining = self.batches_per_epoch - s.batches_done
        bar = Progress(
            remaining // t.grad_accum_steps,
            desc=f"epoch {epoch + 1}/{t.epochs}",
            every=t.log_every,
            enabled=self.is_main,
        )
        sums: dict[str, float] = {}
        updates = 0
        accum: list[dict[str, float]] = []
        poisoned = False
        tic = time.perf_counter()
        images = 0
        for i, batch in enumerate(loader):
            if i >= remaining:
                break
            batch = batch.to(self.device)
            micro = (s.batches_done % t.grad_accum_steps) + 1
            last_micro = micro == t.grad_accum_steps
            sync = last_micro or not dist.is_distributed()
            ctx = nullcontext() if sync else self.ddp_model.no_sync()
            with ctx:
                with _autocast(self.device, t.amp):
                    outputs = self.ddp_model(batch.pixel_values, batch.padding_mask)
                try:
                    losses = self.criterion(_to_float(outputs), batch.targets)
                except NonFiniteCostError:  # NaN/inf predictions: the matcher cannot run; skip like a NaN loss
                    losses = {"loss": torch.tensor(float("nan"), device=self.device)}
                loss = losses["loss"]
                finite = _all_finite(loss)  # every process must agree, or DDP would wait forever
                if finite:
                    self.scaler.scale(loss / t.grad_accum_steps).backward()
                else:
                    poisoned = True
            accum.append({k: float(v.detach()) for k, v in losses.items() if v.dim() == 0})
            s.batches_done += 1
            images += batch.pixel_values.shape[0] * dist.world_size()
            if not last_micro:
                continue
            stepped = False
            grad_norm = float("nan")
            if not poisoned:
                self.scaler.unscale_(self.optimizer)
                params = [p for p in self.model.parameters() if p.grad is not None]
                if t.clip_max_norm > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.clip_max_norm))
                else:
                    grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
                if math.isfinite(grad_norm) or self.scaler.is_enabled():
                    self.scaler.step(self.optimizer)  # with fp16 the scaler skips non-finite steps itself
                    self.scaler.update()
                    stepped = math.isfinite(grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
            poisoned = False
            if stepped:
                s.nonfinite_in_a_row = 0
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
            else:
                s.nonfinite_in_a_row += 1
                s.nonfinite_total += 1
                if self.is_main:
                    log.warning(
                        "step %d: non-finite loss or gradient, update skipped (%d in a row, %d in total)",
                        s.global_step + 1,
                        s.nonfinite_in_a_row,
                        s.nonfinite_total,
                    )
                if s.nonfinite_in_a_row >= t.max_nonfinite_steps:
                    raise TrainingDiverged(
                        f"{s.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient; training "
                        "stopped. Check: the learning rate (train.lr, train.warmup_steps), gradient clipping "
                        "(train.clip_max_norm), mixed precision (try train.amp=none or bf16 instead of fp16), and "
                        "the annotations (boxes with zero or negative size). The last good checkpoint in "
                        f"{self.run_dir / 'checkpoints'} is intact; resume from it with --resume auto."
                    )
            s.global_step += 1
            self._set_lr()
            updates += 1
            keys = dict.fromkeys(k for a in accum for k in a)  # a skipped micro-batch has only "loss" (NaN)
            step_stats = {k: sum(a.get(k, math.nan) for a in accum) / len(accum) for k in keys}
            accum = []
            for k, v in step_stats.items():
                sums[k] = sums.get(k, 0.0) + v
            elapsed = time.perf_counter() - tic
            lr = self.optimizer.param_groups[0]["lr"]
            record = {
                "type": "step",
                "epoch": epoch + 1,
                "step": s.global_step,
                "lr": lr,
                "grad_norm": grad_norm,
            }
            record.update(step_stats)
            record["images_per_s"] = images / max(elapsed, 1e-9)
            self.jsonl.write(record)
            if self.tb is not None:
                for k in ("loss", "loss_ce", "loss_bbox", "loss_giou", "lr"):
                    if k in record:
                        self.tb.add_scalar(f"train/{k}", record[k], s.global_step)
            bar.update(1, {"loss": step_stats["loss"], "lr": lr, "img/s": record["images_per_s"]})
            if t.checkpoint_every_steps and s.global_step % t.checkpoint_every_steps == 0:
                self.save_checkpoint()
            if _any_process(self._stop_signal is not None, self.device):  # all processes stop at the same step
                bar.close()
                self.save_checkpoint()
                if self.is_main:
                    log.warning(
                        "stopped by signal %s after step %d; resume with --resume auto",
                        self._stop_signal or "on another process",
                        s.global_step,
                    )
                return False
        bar.close()
        self._epoch_stats = {f"train_{k}": v / max(1, updates) for k, v in sums.items()}
        return True

    def _set_lr(self) -> None:
        """The schedule is a pure function of the step, so resuming needs nothing but the step."""
        factor = lr_factor(self.state.global_step, config=self.config, steps_per_epoch=self.steps_per_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    # -- signals and plots --------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        if not _in_main_thread():
            return previous

        def handler(signum, frame):  # noqa: ARG001
            if self._stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.is_main:
                log.warning("signal %d received: saving a checkpoint after this step (again to stop at once)", signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)

    def plot(self) -> Path | None:
        from .visualize import plot_curves

        return plot_curves(self.run_dir / "log.jsonl", self.run_dir / "curves.png")


def _all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process."""
    flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
    if dist.is_distributed():
        torch.distributed.all_reduce(flag)
    return bool(flag.item() == 0)


def _any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any process (torchrun forwards signals, but they may land between steps)."""
    if not dist.is_distributed():
        return flag
    t = torch.tensor([float(flag)], device=device)  # NCCL reduces only device tensors
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _python_rng_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _numpy_rng_to_list(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_rng_from_list(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _python_rng_from_list(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
