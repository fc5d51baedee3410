"""What reports a training run and writes its files: the ``Listener`` hooks and the default listeners.

The ``Trainer`` calls each hook on every listener, in list order; ``default_listeners`` builds the list once, when
the trainer is built. Files open in ``on_fit_start`` and close in ``on_close``, which runs however ``fit`` ends.

- ``RunFolder``: before anything is written, removes a replaced run's outputs (``overwrite``) and the temporary
  files of writes a crash cut short.
- ``ProgressLog``: the start line (and ``doctor.budget_warning``), and a bar (or a log line every
  ``train.log_every`` steps) per epoch.
- ``Evaluation``: COCO metrics on the val split, added to the epoch record; ``metrics.json``; ``best/``.
- ``JsonlLog``: ``log.jsonl``, one JSON object per step and per epoch (each once: a resumed run first drops the
  records after its checkpoint).
- ``TensorBoard``: ``tensorboard/`` (``train.tensorboard``).
- ``Checkpoints``: ``config.yaml``; ``checkpoints/`` every ``train.checkpoint_every_steps``, each epoch and on a
  stop signal; ``model/`` when training completes (hard links to ``best/``'s files when they are identical).
- ``Curves``: ``curves.png`` when training completes.
- ``QueryStats``: ``query_stats.json``, which query the matcher gives each object of a fixed probe set of
  training images, at the start and every quarter epoch (``train.query_stats_images``).
- ``Report``: ``report.html`` when training completes (``train.report``; ``detrkit.report``).
- ``StopOnSignal``: Ctrl-C/SIGTERM ask the trainer to stop after the current step (a second signal stops at once).

Only rank 0 writes files; evaluation and signals run on every process.

Layer: engine. Imports: ``report``, ``evaluation``, ``analysis``, ``visualize``, ``checkpoint``, ``config``, ``data``,
``doctor``, ``transforms``, ``models``, ``distributed`` (all below the engine) and ``state``; never ``loop`` (the
``TrainerView`` protocol below says what a listener may use).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import distributed as dist
from ..analysis import save_plots
from ..checkpoint import atomic_write_text, save_pretrained
from ..config import RunConfig
from ..data import CocoDetection
from ..doctor import budget_warning
from ..evaluation import COCO_METRIC_KEYS, PANOPTIC_METRIC_KEYS, Progress, evaluate_model, write_metrics
from ..models import Detector
from .run_folder import run_outputs
from .state import TrainState

log = logging.getLogger("detrkit")

Record = dict[str, Any]  # a log.jsonl line: {"type": "step" | "epoch", "epoch", "step", ...}


class TrainerView(Protocol):
    """What listeners see of ``loop.Trainer`` (a protocol: the loop imports this module, not the reverse)."""

    config: RunConfig
    run_dir: Path
    is_main: bool
    device: torch.device
    model: Detector
    criterion: torch.nn.Module
    train_set: CocoDetection
    val_set: CocoDetection | None
    steps_per_epoch: int
    state: TrainState
    metrics: dict[str, float]

    @property
    def stop_signal(self) -> int | None: ...
    def request_stop(self, signum: int) -> None: ...
    def eval_model(self) -> Detector: ...
    def export(self, name: str) -> Path | None: ...
    def save_checkpoint(self) -> Path | None: ...


class Listener:
    """Hooks of a training run; each does nothing unless overridden."""

    def on_fit_start(self, trainer: TrainerView) -> None:
        """``fit()`` begins (a new run or a resumed one)."""

    def on_epoch_start(self, trainer: TrainerView, epoch: int, steps: int) -> None:
        """Epoch ``epoch`` (0-based) begins or resumes, with ``steps`` updates left in it."""

    def on_step_end(self, trainer: TrainerView, record: Record) -> None:
        """An update ended (applied or skipped); ``record`` is its log line."""

    def on_epoch_end(self, trainer: TrainerView, record: Record) -> None:
        """An epoch ended; listeners may add entries to ``record`` for the ones after them (evaluation does)."""

    def on_stop(self, trainer: TrainerView) -> None:
        """A stop signal ends the run after this step (every process agrees)."""

    def on_complete(self, trainer: TrainerView) -> None:
        """Every epoch is trained."""

    def on_close(self, trainer: TrainerView) -> None:
        """``fit()`` returns or raises: release files and handlers."""


def default_listeners(trainer: TrainerView, *, overwrite: bool = False) -> list[Listener]:
    """The listeners of a run, in the order they are called: the run folder prepared before anything is written,
    evaluation before the logs that record its metrics, logs before checkpoints."""
    t, run_dir, main = trainer.config.train, trainer.run_dir, trainer.is_main
    listeners: list[Listener] = [RunFolder(run_dir, overwrite=overwrite, enabled=main), ProgressLog(), Evaluation()]
    listeners.append(JsonlLog(run_dir / "log.jsonl", enabled=main))
    if t.tensorboard and main:
        listeners.append(TensorBoard(run_dir / "tensorboard"))
    listeners += [Checkpoints(), Curves(enabled=main)]
    if t.query_stats_images and main:
        listeners.append(QueryStats(run_dir / "query_stats.json", images=t.query_stats_images))
    if t.report and main:
        listeners.append(Report())
    listeners.append(StopOnSignal())
    return listeners


class RunFolder(Listener):
    """Prepares the run folder when ``fit`` starts: ``overwrite`` removes the previous run's outputs (once, so a
    second ``fit`` continues this run); stale ``.*.tmp`` files, which a write killed mid-way leaves behind (the
    atomic writes remove their own on errors, but nothing can on SIGKILL), are removed. Both are announced."""

    # The temporary files of the run's atomic writes (``files.atomic_write``: ``.{name}.XXXXXXXX.tmp`` beside the
    # file), by folder; only these go, whatever else the folder holds.
    STALE = {
        "": (
            ".config.yaml.*.tmp",
            ".log.jsonl.*.tmp",
            ".metrics.json.*.tmp",
            ".query_stats.json.*.tmp",
            ".report.html.*.tmp",
        ),
        "checkpoints": (".step-*.pt.*.tmp",),
        "best": (".config.json.*.tmp", ".model.safetensors.*.tmp"),
        "model": (".config.json.*.tmp", ".model.safetensors.*.tmp"),
    }

    def __init__(self, run_dir: Path, *, overwrite: bool, enabled: bool) -> None:
        self.run_dir, self.overwrite, self.enabled = run_dir, overwrite, enabled

    def on_fit_start(self, trainer: TrainerView) -> None:
        if not self.enabled:
            return
        if self.overwrite:
            self.overwrite = False
            old = run_outputs(self.run_dir)
            for name in old:
                path = self.run_dir / name.rstrip("/")
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            if old:
                log.warning("overwrite: removed the previous run's %s from %s", ", ".join(old), self.run_dir)
        stale = sorted(
            path
            for folder, patterns in self.STALE.items()
            for pattern in patterns
            for path in (self.run_dir / folder).glob(pattern)
            if path.is_file()
        )
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.warning(
                "removed %d stale temporary file(s) left in %s by an interrupted write: %s",
                len(stale),
                self.run_dir,
                ", ".join(str(p.relative_to(self.run_dir)) for p in stale),
            )


class ProgressLog(Listener):
    def __init__(self) -> None:
        self.bar: Progress | None = None

    def on_fit_start(self, trainer: TrainerView) -> None:
        if trainer.is_main:
            log.info(
                "training %s (%s) on %d images, %d steps per epoch, %d epochs, device %s, %d process(es)",
                trainer.model.config.arch,
                f"{trainer.model.num_parameters(trainable_only=True) / 1e6:.1f}M trainable parameters",
                len(trainer.train_set),
                trainer.steps_per_epoch,
                trainer.config.train.epochs,
                trainer.device,
                dist.world_size(),
            )
            steps = trainer.steps_per_epoch * trainer.config.train.epochs
            if warning := budget_warning(trainer.model.config, trainer.config.train, steps):
                log.warning("%s", warning)

    def on_epoch_start(self, trainer: TrainerView, epoch: int, steps: int) -> None:
        t = trainer.config.train
        self.bar = Progress(steps, desc=f"epoch {epoch + 1}/{t.epochs}", every=t.log_every, enabled=trainer.is_main)

    def on_step_end(self, trainer: TrainerView, record: Record) -> None:
        if self.bar is not None:
            self.bar.update(1, {"loss": record["loss"], "lr": record["lr"], "img/s": record["images_per_s"]})

    def on_epoch_end(self, trainer: TrainerView, record: Record) -> None:
        self._close()

    def on_stop(self, trainer: TrainerView) -> None:
        self._close()

    def on_close(self, trainer: TrainerView) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Evaluation(Listener):
    """Evaluates every ``train.eval_every`` epochs and after the last; keeps the best model in ``best/``.

    What is evaluated follows the data: COCO instances give box AP (and mask AP, as ``segm_*`` keys and
    ``metrics_segm.json``, when the model has a mask head); COCO panoptic data gives PQ/SQ/RQ for a model with a
    mask head, and box AP of the segments (things and stuff) for a detector. The best model is the one with the
    highest AP, or PQ.
    """

    def on_epoch_end(self, trainer: TrainerView, record: Record) -> None:
        t, epoch = trainer.config.train, record["epoch"]
        due = (t.eval_every and epoch % t.eval_every == 0) or epoch == t.epochs
        if trainer.val_set is None or not due:
            return
        # panoptic data: PQ for a model with a mask head; box AP of its segments for a detector (the first stage)
        masks = trainer.model.config.masks
        panoptic = trainer.config.data.format == "coco_panoptic" and masks
        task = "panoptic" if panoptic else "bbox"
        # after the last epoch also the error analysis and its pictures (the report shows them)
        final = epoch == t.epochs and task == "bbox"
        metrics = self._evaluate(trainer, task, analysis=final)
        keys = PANOPTIC_METRIC_KEYS if panoptic else COCO_METRIC_KEYS
        record.update({k: metrics[k] for k in keys})
        segm = None
        if masks and trainer.config.data.format == "coco":
            segm = self._evaluate(trainer, "segm")
            record.update({f"segm_{k}": segm[k] for k in COCO_METRIC_KEYS})
        trainer.metrics = metrics
        if not trainer.is_main:
            return
        write_metrics(metrics, trainer.run_dir / "metrics.json")
        if final:
            save_plots(metrics, trainer.run_dir)
        if segm is not None:
            write_metrics(segm, trainer.run_dir / "metrics_segm.json")
        if panoptic:
            log.info("epoch %d: PQ %.4f  SQ %.4f  RQ %.4f", epoch, metrics["PQ"], metrics["SQ"], metrics["RQ"])
        else:
            log.info("epoch %d: AP %.4f  AP50 %.4f  AP75 %.4f", epoch, metrics["AP"], metrics["AP50"], metrics["AP75"])
        score = metrics["PQ"] if panoptic else metrics["AP"]
        if score > trainer.state.best_ap:
            trainer.state.best_ap = score
            trainer.export("best")

    @staticmethod
    def _evaluate(trainer: TrainerView, task: str, analysis: bool = False) -> dict[str, float]:
        t = trainer.config.train
        metrics, _ = evaluate_model(
            trainer.eval_model(),
            trainer.val_set,
            batch_size=t.batch_size,
            device=trainer.device,
            num_workers=trainer.config.data.num_workers,
            amp=t.amp,
            task=task,
            panoptic_gt_dir=getattr(trainer.val_set, "png_dir", None) if task == "panoptic" else None,
            analysis=analysis,
        )
        return metrics


class JsonlLog(Listener):
    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.file = None

    def on_fit_start(self, trainer: TrainerView) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_records_after(trainer.state)
            self.file = open(self.path, "a")  # noqa: SIM115 - closed in on_close()

    def _drop_records_after(self, state: TrainState) -> None:
        """Keep the records up to where this run starts or resumes (its checkpoint's step and epoch): those after
        it come from steps that will run again (a resume from an earlier checkpoint than the log's end), or from
        a run started over; kept, they would be logged twice. Lines a crash cut short are dropped too."""
        if not self.path.is_file():
            return
        kept, later, broken = [], 0, 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                if record["type"] == "step":
                    after = record["step"] > state.global_step
                else:
                    after = record["epoch"] > state.epoch  # an epoch record's "epoch" counts the epochs done
            except (ValueError, TypeError, KeyError):
                broken += line.strip() != ""
                continue
            later += after
            if not after:
                kept.append(line + "\n")
        if later or broken:
            atomic_write_text(self.path, "".join(kept))
            where = "starts" if state.global_step == 0 else "resumes"
            log.warning(
                "%s: removed %d record(s) after step %d, where this run %s%s",
                self.path,
                later,
                state.global_step,
                where,
                f", and {broken} unreadable line(s) (a write cut short)" if broken else "",
            )

    def on_step_end(self, trainer: TrainerView, record: Record) -> None:
        self._write(record)

    def on_epoch_end(self, trainer: TrainerView, record: Record) -> None:
        self._write(record)

    def on_close(self, trainer: TrainerView) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _write(self, record: Record) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


class TensorBoard(Listener):
    STEP_KEYS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "lr")

    def __init__(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError(
                "train.tensorboard=true needs the tensorboard package: pip install 'detrkit[tensorboard]'"
            ) from e
        self.directory, self.writer_class, self.writer = directory, SummaryWriter, None

    def on_fit_start(self, trainer: TrainerView) -> None:
        self.writer = self.writer_class(str(self.directory))

    def on_step_end(self, trainer: TrainerView, record: Record) -> None:
        for k in self.STEP_KEYS:
            if k in record:
                self.writer.add_scalar(f"train/{k}", record[k], record["step"])

    def on_epoch_end(self, trainer: TrainerView, record: Record) -> None:
        for k, v in record.items():
            if k not in ("type", "epoch", "step") and isinstance(v, (int, float)):
                self.writer.add_scalar(f"epoch/{k}", v, record["epoch"])

    def on_close(self, trainer: TrainerView) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Checkpoints(Listener):
    """The run directory's ``config.yaml``, resumable checkpoints, and the final ``model/`` export."""

    def on_fit_start(self, trainer: TrainerView) -> None:
        if trainer.is_main:
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(trainer.run_dir / "config.yaml", trainer.config.to_yaml())

    def on_step_end(self, trainer: TrainerView, record: Record) -> None:
        every = trainer.config.train.checkpoint_every_steps
        if every and record["step"] % every == 0:
            trainer.save_checkpoint()

    def on_epoch_end(self, trainer: TrainerView, record: Record) -> None:
        trainer.save_checkpoint()

    def on_stop(self, trainer: TrainerView) -> None:
        trainer.save_checkpoint()

    def on_complete(self, trainer: TrainerView) -> None:
        # When the last evaluation was the best, model/ would repeat best/ byte for byte: hard-link its files.
        if trainer.is_main:
            save_pretrained(trainer.eval_model(), trainer.run_dir / "model", same_as=trainer.run_dir / "best")


class Curves(Listener):
    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled

    def on_complete(self, trainer: TrainerView) -> None:
        if self.enabled:
            from ..visualize import plot_curves

            plot_curves(trainer.run_dir / "log.jsonl", trainer.run_dir / "curves.png")


class QueryStats(Listener):
    """Records which query the Hungarian matcher assigns to each object of a fixed probe set of training images
    (evenly spaced over the split, with the evaluation transforms: no augmentation, so a change of query is the
    model's, not the crop's), when training starts, every quarter epoch (no more often than every 20 steps) and
    at epoch ends: ``query_stats.json``. The report draws how stable the assignment is and how the objects spread
    over the queries (issue 16; DN-DETR's "instability" is measured the same way).

    Cost: one forward pass of the model in eval mode over the probe images per record, no gradient; it draws
    nothing from the random streams, so training is unchanged (the resume tests hold with it on).

    File: ``{"num_queries": Q, "image_ids": [...], "objects": [[image_id, index, category_id], ...],
    "records": [{"epoch": fraction of epochs done, "step": s, "query": [one per object, -1 if unmatched]}]}``.
    """

    def __init__(self, path: Path, *, images: int) -> None:
        self.path, self.images = path, images
        self.probe: Any = None
        self.indices: list[int] = []
        self.stats: dict[str, Any] = {}
        self.every = 1

    def on_fit_start(self, trainer: TrainerView) -> None:
        import copy

        from ..transforms import eval_transforms

        d = trainer.config.data
        self.probe = copy.copy(trainer.train_set)  # the same images and annotations, without augmentation
        self.probe.transforms = eval_transforms(size=d.eval_size, max_size=d.eval_max_size)
        n = len(self.probe)
        count = min(self.images, n)
        self.indices = sorted({round(i * n / count) for i in range(count)})
        # every quarter epoch, but no more often than every 20 steps: records would cost tiny runs (tests) more
        # than their steps
        steps = max(trainer.steps_per_epoch, 1)
        self.every = max(math.ceil(steps / 4), min(steps, 20))
        self.stats = self._read(trainer.state.global_step)
        if not self.stats["records"] or self.stats["records"][-1]["step"] < trainer.state.global_step:
            self._record(trainer)

    def _read(self, step: int) -> dict[str, Any]:
        """The records up to ``step`` of an earlier part of this run (a resume), or a new file's header."""
        if self.path.is_file():
            try:
                stats = json.loads(self.path.read_text())
                stats["records"] = [r for r in stats["records"] if r["step"] <= step]
                return stats
            except (ValueError, KeyError, TypeError):
                log.warning("%s is not readable: query statistics start over", self.path)
        return {"num_queries": None, "image_ids": [], "objects": [], "records": []}

    def on_step_end(self, trainer: TrainerView, record: Record) -> None:
        # counted within the epoch, so that the checks fall at the same places in every epoch; its end is next
        done = trainer.state.batches_done // trainer.config.train.grad_accum_steps
        if done % self.every == 0 and done < trainer.steps_per_epoch:
            self._record(trainer)

    def on_epoch_end(self, trainer: TrainerView, record: Record) -> None:
        if not self.stats["records"] or self.stats["records"][-1]["step"] < record["step"]:
            self._record(trainer)

    @torch.no_grad()
    def _record(self, trainer: TrainerView) -> None:
        from ..data import collate
        from ..models.base import to_float

        model, criterion = trainer.model, trainer.criterion
        # the loss's own matching of the last layer (``SetCriterion.match``), or its matcher's
        match = getattr(criterion, "match", None) or getattr(criterion, "matcher", None)
        if match is None:
            if self.images:
                log.warning("query statistics off: the criterion (%s) has no matcher", type(criterion).__name__)
                self.images = 0
            return
        was_training = model.training
        model.eval()
        objects, queries, image_ids, num_queries = [], [], [], None
        try:
            batch_size = trainer.config.train.batch_size
            for start in range(0, len(self.indices), batch_size):
                batch = collate([self.probe[i] for i in self.indices[start : start + batch_size]])
                batch = batch.to(trainer.device)
                outputs = to_float(model(batch.pixel_values, batch.padding_mask))
                num_queries = int(outputs["pred_logits"].shape[1])
                for target, (pred, tgt) in zip(batch.targets, match(outputs, batch.targets), strict=True):
                    assigned = [-1] * len(target["labels"])
                    for p, t in zip(pred.tolist(), tgt.tolist(), strict=True):
                        assigned[t] = p
                    image_id = int(target["image_id"])
                    image_ids.append(image_id)
                    labels = trainer.train_set.label_map.category_ids
                    objects += [[image_id, j, labels[int(c)]] for j, c in enumerate(target["labels"].tolist())]
                    queries += assigned
        finally:
            model.train(was_training)
        s = trainer.state
        if self.stats["objects"] and self.stats["objects"] != objects:
            self.stats = {"num_queries": None, "image_ids": [], "objects": [], "records": []}  # another probe set
        self.stats.update(num_queries=num_queries, image_ids=image_ids, objects=objects)
        epoch = s.epoch + s.batches_done / max(trainer.steps_per_epoch * trainer.config.train.grad_accum_steps, 1)
        self.stats["records"].append({"epoch": round(epoch, 4), "step": s.global_step, "query": queries})
        atomic_write_text(self.path, json.dumps(self.stats))


class Report(Listener):
    """``report.html`` (``detrkit.report.write_report``) when training completes. A failure to write it is
    logged, not raised: the run itself succeeded, and ``detrkit report RUN_DIR`` can write it again."""

    def on_complete(self, trainer: TrainerView) -> None:
        from ..report import write_report

        try:
            path = write_report(
                trainer.run_dir,
                model=trainer.eval_model(),
                device=trainer.device,
                batch_size=trainer.config.train.batch_size,
            )
        except Exception as e:  # noqa: BLE001 - a report is not worth losing a finished run over
            log.warning(
                "report.html could not be written (%s: %s); try: detrkit report %s",
                type(e).__name__,
                e,
                trainer.run_dir,
            )
            return
        log.info("report: %s", path)


class StopOnSignal(Listener):
    """SIGINT/SIGTERM ask the trainer to stop after the current step; a second one raises ``KeyboardInterrupt``.

    The trainer agrees on the stop with the other processes (torchrun forwards signals, but they may land between
    steps), so every process stops after the same step.
    """

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: TrainerView) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread

        def handler(signum, frame):  # noqa: ARG001
            if trainer.stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            trainer.request_stop(signum)
            if trainer.is_main:
                log.warning("signal %d received: saving a checkpoint after this step (again to stop at once)", signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, handler)

    def on_stop(self, trainer: TrainerView) -> None:
        if trainer.is_main:
            log.warning(
                "stopped by signal %s after step %d; resume with --resume auto",
                trainer.stop_signal or "on another process",
                trainer.state.global_step,
            )

    def on_close(self, trainer: TrainerView) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        self.previous = {}
