"""The ``Trainer``: builds a run from its config, drives ``train_step`` over epochs, and tells listeners.

The trainer owns the run's state (``TrainState``, the random stream, the epoch history), applies the learning-rate
schedule, and enforces the divergence policy (``train.max_nonfinite_steps`` skipped updates in a row raise
``TrainingDiverged``). What is reported and written, and when, belongs to the listeners (``listeners.py``).

A run directory holds ``config.yaml`` (the resolved config), ``log.jsonl`` (one JSON object per step and per
epoch), ``checkpoints/step-XXXXXXXX.pt`` (resumable training state, the last ``keep_last`` kept), ``best/`` and
``model/`` (slim weights-only exports: ``config.json`` + ``model.safetensors``), ``metrics.json`` and
``curves.png``.

Determinism: data order and augmentation depend only on ``(seed, epoch, index)`` (``sampling.py``); the model's
initialisation and dropout draw from the run's own random stream, seeded from ``train.seed`` and saved in every
checkpoint (``state.py``); the learning rate is a function of the step (``schedule.py``). A run resumed from any
checkpoint therefore continues exactly as the uninterrupted run would have.

Layer: engine. Imports: config, data, models, ``checkpoint`` (io) and the engine's other modules.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from ..config import RunConfig
from ..models import Detector
from .builders import (
    build_criterion,
    build_datasets,
    build_ema,
    build_for_training,
    build_optimizer,
    build_scaler,
    model_config_for_data,
    warn_random_frozen_batchnorm,
    wrap_distributed,
)
from .checkpoints import checkpoint_payload, latest_checkpoint, load_components, read_checkpoint, write_checkpoint
from .listeners import Listener, default_listeners
from .run_folder import check_run_dir, check_same_model
from .sampling import EpochSampler, SeededDataset, aspect_ratio_groups, batches_per_epoch, epoch_updates
from .schedule import lr_factor
from .setup import default_device
from .state import TrainState, capture_rng, run_rng
from .step import StepResult, train_step

log = logging.getLogger("detrkit")


class TrainingDiverged(RuntimeError):
    """Raised after too many consecutive non-finite losses."""


class Trainer:
    """Trains ``config`` end to end. ``fit()`` returns the final metrics (empty without a val split).

    Args:
        config: the resolved run configuration.
        device: where to train: ``setup_run(config.train)``'s result; by default ``train.device`` resolved.
        resume: a checkpoint path, ``"auto"`` (the run directory's latest, if any) or None. A checkpoint of a
            run with another model (architecture, shapes, classes) is refused, naming the difference.
        overwrite: replace the run already in ``train.output_dir`` (its outputs are removed when ``fit`` starts).
            A run folder that holds a run is refused unless ``resume`` or ``overwrite`` is given.
        model: an already built model (tests); by default built from the config and the training data.
        listeners: what reports the run and writes its files; by default ``default_listeners(trainer)``.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        device: torch.device | None = None,
        resume: str | None = None,
        overwrite: bool = False,
        model: Detector | None = None,
        listeners: Sequence[Listener] | None = None,
    ) -> None:
        t = config.train
        self.device = device if device is not None else default_device(t)
        self.is_main = dist.is_main_process()
        self.run_dir = Path(t.output_dir)
        check_run_dir(self.run_dir, resume=resume, overwrite=overwrite)  # before any data is read
        self.train_set, self.val_set = build_datasets(config)
        resume_from = self._checkpoint_to_resume(resume)
        with run_rng(seed=t.seed):  # the run's own random stream: the initialisation now, dropout in fit()
            if model is None:
                model_config = model_config_for_data(config, self.train_set)
                model = build_for_training(model_config, t, resuming=resume_from is not None)
                if self.is_main:
                    warn_random_frozen_batchnorm(model, t)
            self.rng: dict[str, Any] = capture_rng()
        self.model: Detector = model.to(self.device)
        self.config = RunConfig(model=self.model.config, data=config.data, loss=config.loss, train=t)
        self.criterion = build_criterion(self.config, self.model.config.num_classes).to(self.device)
        self.ddp_model = wrap_distributed(self.model, self.device)
        self.optimizer = build_optimizer(self.model, t, self.device)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.scaler = build_scaler(t, self.device)
        self.ema = build_ema(self.model, t)
        self.sampler = EpochSampler(
            len(self.train_set),
            shuffle=True,
            seed=t.seed,
            rank=dist.rank(),
            world_size=dist.world_size(),
            groups=aspect_ratio_groups(self.train_set) if config.data.group_by_aspect_ratio else None,
            batch_size=t.batch_size,
        )
        self.seeded = SeededDataset(self.train_set, t.seed)
        self.batches_per_epoch = batches_per_epoch(self.sampler, t)
        self.steps_per_epoch = self.batches_per_epoch // t.grad_accum_steps
        self.state = TrainState()
        self.history: list[dict[str, Any]] = []  # the epoch records, saved in checkpoints
        self.metrics: dict[str, float] = {}  # the latest evaluation's (the Evaluation listener sets them)
        self._stop_signal: int | None = None
        self._set_lr()
        self.listeners = default_listeners(self, overwrite=overwrite) if listeners is None else list(listeners)
        if resume_from is not None:
            self.load_checkpoint(resume_from)

    # -- the model, checkpoints and stopping ----------------------------------------------------------------------
    def eval_model(self) -> Detector:
        """The model that is evaluated and exported: the EMA's average when ``train.ema`` is on."""
        return self.ema.module if self.ema is not None else self.model

    def export(self, name: str) -> Path | None:
        """Slim weights-only export (``config.json`` + ``model.safetensors``) of the evaluated model (rank 0)."""
        if not self.is_main:
            return None
        return self.eval_model().save_pretrained(self.run_dir / name)

    def save_checkpoint(self) -> Path | None:
        """Write the resumable training state atomically and keep the last ``keep_last`` (rank 0 only)."""
        if not self.is_main:
            return None
        payload = checkpoint_payload(
            config=self.config,
            model=self.model,
            optimizer=self.optimizer,
            scaler=self.scaler,
            ema=self.ema,
            state=self.state,
            history=self.history,
        )
        directory, t = self.run_dir / "checkpoints", self.config.train
        return write_checkpoint(payload, directory, step=self.state.global_step, keep_last=t.keep_last)

    def load_checkpoint(self, path: Path) -> None:
        ckpt = read_checkpoint(path)
        check_same_model(ckpt.get("config", {}).get("model", {}), self.model.config, path)
        load_components(ckpt, path, model=self.model, optimizer=self.optimizer, scaler=self.scaler, ema=self.ema)
        self.state = TrainState(**ckpt["state"])
        self._set_lr()
        self.history = list(ckpt.get("history", []))
        self.rng = ckpt["rng"]
        if self.is_main:
            log.info("resumed from %s (epoch %d, step %d)", path, self.state.epoch + 1, self.state.global_step)

    def _checkpoint_to_resume(self, resume: str | None) -> Path | None:
        """The checkpoint ``resume`` names: a path, the run directory's latest for ``"auto"``, or None."""
        if not resume:
            return None
        path = latest_checkpoint(self.run_dir / "checkpoints") if resume == "auto" else Path(resume)
        if path is None and self.is_main:
            log.info("resume=auto: no checkpoint in %s, starting a new run", self.run_dir / "checkpoints")
        return path

    @property
    def stop_signal(self) -> int | None:
        """The signal that asked this process to stop, if any."""
        return self._stop_signal

    def request_stop(self, signum: int) -> None:
        """Stop after the current step, with a checkpoint (every process stops at the same step)."""
        self._stop_signal = signum

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train the remaining epochs; returns the latest evaluation's metrics (empty without a val split)."""
        with run_rng(rng=self.rng):
            try:
                self._notify("on_fit_start")
                if self._train_epochs():
                    self._notify("on_complete")
            finally:
                self.rng = capture_rng()
                self._notify("on_close")
        return self.metrics

    def _train_epochs(self) -> bool:
        """Train until the last epoch; False when a stop signal ended the run first."""
        s = self.state
        while s.epoch < self.config.train.epochs:
            stats = self._train_epoch()
            if stats is None:
                return False
            if s.epoch + 1 == self.config.train.epochs:
                self._check_the_end_is_finite()
            s.epoch += 1
            s.batches_done = 0
            record = {"type": "epoch", "epoch": s.epoch, "step": s.global_step, **stats}
            # in the history before the listeners see it: what they add (the metrics) is checkpointed with it
            self.history.append(record)
            self._notify("on_epoch_end", record)
        return True

    def _train_epoch(self) -> dict[str, float] | None:
        """Train on the rest of the epoch in progress. Returns its mean losses (``train_loss``, ...), or None
        when a stop signal interrupted it (after the listeners saved a checkpoint)."""
        t, s = self.config.train, self.state
        remaining = self.batches_per_epoch - s.batches_done
        self.ddp_model.train()
        self.criterion.train()
        self._notify("on_epoch_start", s.epoch, remaining // t.grad_accum_steps)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # per term: a skipped update has only "loss" (NaN), not every term
        images = 0
        start = time.perf_counter()
        updates_left = epoch_updates(
            self.seeded,
            self.sampler,
            t,
            epoch=s.epoch,
            skip=s.batches_done,
            count=remaining,
            num_workers=self.config.data.num_workers,
        )
        for batches in updates_left:
            result = train_step(
                batches,
                model=self.ddp_model,
                criterion=self.criterion,
                optimizer=self.optimizer,
                scaler=self.scaler,
                ema=self.ema,
                clip_max_norm=t.clip_max_norm,
                amp=t.amp,
            )
            s.batches_done += len(batches)
            images += sum(b.pixel_values.shape[0] for b in batches) * dist.world_size()
            self._count_step(result.stepped)
            for k, v in result.losses.items():
                if math.isfinite(v):
                    sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
            self._notify("on_step_end", self._step_record(result, images / max(time.perf_counter() - start, 1e-9)))
            if _any_process(self._stop_signal is not None, self.device):  # all processes stop at the same step
                self._notify("on_stop")
                return None
        return {f"train_{k}": v / counts[k] for k, v in sums.items()}

    def _count_step(self, stepped: bool) -> None:
        """Advance the step and the learning rate; the divergence policy for skipped updates."""
        s, t = self.state, self.config.train
        if stepped:
            s.nonfinite_in_a_row = 0
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
                checkpoints = self.run_dir / "checkpoints"
                raise TrainingDiverged(_diverged_message(s.nonfinite_in_a_row, s.global_step + 1, checkpoints))
        s.global_step += 1
        self._set_lr()

    def _check_the_end_is_finite(self) -> None:
        """A run that ends on a streak of skipped updates has diverged too: its last weights gave non-finite
        losses until the end. The streak that stops a run is ``max_nonfinite_steps`` long, more than a short
        run's last steps; at the end, ``END_STREAK`` are enough (a single bad last batch is not a divergence)."""
        s, t = self.state, self.config.train
        if s.nonfinite_in_a_row >= min(t.max_nonfinite_steps, END_STREAK):
            raise TrainingDiverged(_diverged_message(s.nonfinite_in_a_row, s.global_step, self.run_dir / "checkpoints"))

    def _step_record(self, result: StepResult, images_per_s: float) -> dict[str, Any]:
        s = self.state
        lr = self.optimizer.param_groups[0]["lr"]  # the next step's: the schedule moved on after this one
        record = {"type": "step", "epoch": s.epoch + 1, "step": s.global_step, "lr": lr, "grad_norm": result.grad_norm}
        return {**record, **result.losses, "images_per_s": images_per_s}

    def _set_lr(self) -> None:
        """The schedule is a pure function of the step, so resuming needs nothing but the step."""
        factor = lr_factor(self.state.global_step, config=self.config, steps_per_epoch=self.steps_per_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def _notify(self, event: str, *args: Any) -> None:
        for listener in self.listeners:
            getattr(listener, event)(self, *args)


# Skipped updates in a row that end a run as diverged (the policy's streak, train.max_nonfinite_steps, if smaller).
END_STREAK = 3


def _any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any process (torchrun forwards signals, but they may land between steps)."""
    if not dist.is_distributed():
        return flag
    t = torch.tensor([float(flag)], device=device)  # NCCL reduces only device tensors
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _diverged_message(in_a_row: int, last_step: int, checkpoints: Path) -> str:
    latest = latest_checkpoint(checkpoints)
    first_bad = last_step - in_a_row + 1
    if latest is None:
        where = "No checkpoint was written yet."
    else:
        step = int(latest.stem.removeprefix("step-")) if latest.stem.removeprefix("step-").isdigit() else -1
        before = ", before the first skipped step" if 0 <= step < first_bad else ""
        where = (
            f"The latest checkpoint, {latest}, is from step {step}{before}; after the fix, resume with --resume auto."
        )
    return (
        f"{in_a_row} consecutive steps (steps {first_bad}-{last_step}) had a non-finite loss or gradient; training "
        "stopped. Check: the learning rate (train.lr, train.warmup_steps), gradient clipping (train.clip_max_norm), "
        "mixed precision (try train.amp=none or bf16 instead of fp16), and the annotations (boxes with zero or "
        f"negative size). {where}"
    )
