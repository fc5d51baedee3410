"""Running a detector over a COCO dataset and scoring it: ``evaluate_model``, the images of a COCO JSON
(``CocoImages``), the autocast of ``train.amp`` and a progress line.

The scoring itself lives in ``detrkit.scoring`` (no torch: ``detrkit eval --results`` starts without it) and
the error analysis in ``detrkit.analysis``; their public names are re-exported here (``CocoEvaluator``,
``evaluate_results_file``, ``write_metrics``, ...), so ``from detrkit.evaluation import ...`` keeps working.

Layer: evaluation (above io, below the engine). Imports ``distributed``, ``postprocess``, ``scoring`` and
``analysis`` at the top; ``evaluate_model`` and ``CocoImages`` import ``data``, ``images`` and ``models.base``
when called. Never imports the engine or the CLI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from detrkit import distributed as dist
from detrkit.postprocess import postprocess_instances, postprocess_panoptic
from detrkit.scoring import (
    BACKENDS,
    COCO_METRIC_KEYS,
    PANOPTIC_METRIC_KEYS,
    CocoEvaluator,
    CocoMetrics,
    PanopticEvaluator,
    _load_json_file,
    evaluate_panoptic,
    evaluate_results_file,
    masks_to_rle,
    per_class_metrics,
    write_metrics,
)

if TYPE_CHECKING:
    from detrkit.data import CocoDetection
    from detrkit.models import Detector

__all__ = [
    "BACKENDS",
    "COCO_METRIC_KEYS",
    "PANOPTIC_METRIC_KEYS",
    "TASKS",
    "CocoEvaluator",
    "CocoImages",
    "CocoMetrics",
    "PanopticEvaluator",
    "Progress",
    "amp_context",
    "evaluate_model",
    "evaluate_panoptic",
    "evaluate_results_file",
    "masks_to_rle",
    "per_class_metrics",
    "write_metrics",
]

log = logging.getLogger("detrkit")

#: What ``evaluate_model`` and ``detrkit eval --task`` evaluate.
TASKS = ("bbox", "segm", "panoptic")


class CocoImages(torch.utils.data.Dataset):
    """The images of a COCO-style JSON (instances or panoptic) without their targets, for running a model.

    Yields ``(image (3, H, W), target)`` with only ``image_id``, ``orig_size`` and ``size``, as ``collate`` and
    ``evaluate_model`` need them. With a panoptic JSON only the images that have an annotation entry are
    listed (those ``pq_compute`` scores).

    Args:
        image_dir: the folder the ``images`` entries' ``file_name`` are relative to.
        ann_file: the JSON.
        transforms: applied to each image tensor (``eval_transforms(...)``); None leaves it as read.
    """

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike, transforms: Any = None) -> None:
        data = _load_json_file(ann_file, "a COCO JSON")
        if not isinstance(data, Mapping) or not isinstance(data.get("images"), list):
            raise ValueError(f"{ann_file}: a COCO JSON with an 'images' list is needed")
        images = data["images"]
        annotations = data.get("annotations") or []
        if annotations and all(isinstance(a, Mapping) and "segments_info" in a for a in annotations):
            annotated = {a["image_id"] for a in annotations}
            images = [img for img in images if img.get("id") in annotated]
        self.image_dir = Path(image_dir)
        self.ann_file = os.fspath(ann_file)
        self.transforms = transforms
        self.images = sorted(images, key=lambda img: img["id"])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from detrkit.images import load_image_tensor

        info = self.images[index]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{self.ann_file}: image {info['id']}: no file {path}")
        image = load_image_tensor(path)  # (3, H0, W0) float in [0, 1]
        orig_size = torch.tensor(image.shape[-2:], dtype=torch.int64)
        if self.transforms is not None:
            image = self.transforms(image).as_subclass(torch.Tensor)
        target = {"image_id": int(info["id"]), "orig_size": orig_size, "size": torch.tensor(image.shape[-2:])}
        return image, target


# ------------------------------------------------------------------------------------------------------------
# Running a model over a dataset


@torch.inference_mode()
def evaluate_model(
    model: Detector,
    dataset: CocoDetection,
    *,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    amp: str = "none",
    progress: bool = False,
    task: str = "bbox",
    panoptic_gt_dir: str | os.PathLike | None = None,
    panoptic_output: str | os.PathLike | None = None,
    analysis: bool | Mapping[str, Any] = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COCO metrics of ``model`` on ``dataset`` (sharded across processes when distributed).

    Returns the metrics and the predictions (all processes' on rank 0): for ``task="bbox"`` and ``"segm"`` the 12
    ``COCO_METRIC_KEYS`` and a COCO results list (segm: RLE masks from ``postprocess_instances``); for
    ``"panoptic"`` the ``PANOPTIC_METRIC_KEYS`` and the panoptic JSON's annotations (``postprocess_panoptic``
    with its defaults). The model runs through ``Detector._inference_forward`` (honouring
    ``optimize_for_inference()``) under the ``amp`` autocast; segm and panoptic need its ``pred_masks``.

    Args:
        dataset: yields ``(image, target)`` with ``image_id``, ``orig_size`` and ``size`` and has an ``ann_file``
            (``CocoDetection``; for panoptic the panoptic JSON, e.g. ``CocoImages``).
        task: ``"bbox"``, ``"segm"`` or ``"panoptic"``.
        panoptic_gt_dir: the ground truth's PNG folder (default: ``ann_file`` without ``.json``).
        panoptic_output: where to keep the predicted panoptic JSON (its PNGs go in the folder of the same name
            without ``.json``); by default they live in a temporary folder while evaluated.
        analysis: bbox and segm: also run the error analysis (``detrkit.analysis.analyse``; a dict gives its
            options) on the main process; the metrics (a ``CocoMetrics``) then carry it as ``errors``, and
            always carry ``per_class``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    from torch.utils.data import DataLoader

    from detrkit.data import collate
    from detrkit.models.base import to_float

    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_shard(len(dataset)),
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),  # keeps the global RNG untouched
    )
    evaluator: CocoEvaluator | PanopticEvaluator
    if task == "panoptic":
        evaluator = PanopticEvaluator(dataset.ann_file, panoptic_gt_dir, output_json=panoptic_output)
    else:
        # a panoptic dataset evaluated by boxes: its segments as an instances ground truth
        gt = dataset.instances_gt() if hasattr(dataset, "instances_gt") else dataset.ann_file
        evaluator = CocoEvaluator(gt, iou_type=task)  # type: ignore[arg-type]
    every = max(1, len(loader) // 5)
    bar = Progress(len(loader), desc="eval", every=every, enabled=progress and dist.is_main_process())
    for batch in loader:
        batch = batch.to(device)
        with amp_context(device, amp):
            forward = getattr(model, "_inference_forward", model)  # honours optimize_for_inference()
            outputs = to_float(forward(batch.pixel_values, batch.padding_mask))
        if task == "bbox":
            results = model.postprocess(outputs, batch.orig_sizes, threshold=0.0, top_k=100)
        else:
            results = _mask_results(model, outputs, batch, task)
        evaluator.update({int(i): r for i, r in zip(batch.image_ids, results, strict=True)})
        bar.update(1, {})
    bar.close()
    evaluator.synchronize()
    metrics = evaluator.summarize()
    if analysis and task != "panoptic" and dist.is_main_process():
        assert isinstance(evaluator, CocoEvaluator)
        evaluator.analyse(**(dict(analysis) if isinstance(analysis, Mapping) else {}))
        metrics = evaluator.summarize()
    model.train(was_training)
    return metrics, evaluator.results()


def _mask_results(model: Detector, outputs: dict[str, Any], batch: Any, task: str) -> list[dict[str, Any]]:
    """``postprocess_instances`` (segm) or ``postprocess_panoptic`` of a batch, with the model's classes."""
    if outputs.get("pred_masks") is None:
        raise ValueError(
            f"--task {task} needs mask logits, but the model ({model.config.arch}) returns no 'pred_masks': "
            "evaluate a model built with masks=True"
        )
    sizes = {
        "orig_sizes": batch.orig_sizes,
        "image_sizes": torch.stack([torch.as_tensor(t["size"]) for t in batch.targets]),
        "padded_size": tuple(batch.pixel_values.shape[-2:]),
    }
    if task == "segm":
        return postprocess_instances(outputs, **sizes, label_map=model.label_map, top_k=100, focal=model.config.focal)
    threshold = getattr(model.config, "panoptic_threshold", 0.85)
    return postprocess_panoptic(
        outputs,
        **sizes,
        label_map=model.label_map,
        threshold=threshold,
        focal=model.config.focal,
        merge=getattr(model.config, "panoptic_merge", "reference"),
    )


def _shard(size: int) -> list[int]:
    """This process's indices, in order: padded to a multiple of the process count and split round-robin, as
    ``DistributedSampler(shuffle=False)`` does (``synchronize`` drops the repeated images)."""
    world = dist.world_size()
    total = -(-size // world) * world
    order = list(range(size))
    order += order[: total - size]
    return order[dist.rank() : total : world]


def amp_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The autocast of ``train.amp``: ``"none"``, ``"bf16"`` or ``"fp16"``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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
            stats_text = "  ".join(f"{k} {v}" for k, v in text.items())
            log.info("%s %d/%d  %s  eta %s", self.desc, self.n, self.total, stats_text, _format_time(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _format_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
