"""COCO bbox evaluation: the 12 numbers pycocotools reports, computed by faster-coco-eval.

``CocoEvaluator`` collects post-processed predictions (``postprocess.py``'s output: absolute xyxy boxes,
dataset category ids) image by image, gathers them across processes, and scores them with the COCO protocol.
Two backends give the same numbers: ``"faster"`` (faster-coco-eval, a runtime dependency, C++ matching and
accumulation, about ten times faster) and ``"pycocotools"`` (the reference, a test dependency only).

What this module does on top of the libraries, and why:

* **Which images count.** Like the official DETR (``coco_eval.params.imgIds = img_ids``), only images passed
  to ``update`` are evaluated, so a run over part of a split is scored on that part; an updated image without
  detections still counts (its ground truth is missed). ``all_images=True`` scores every image of the
  annotations.
* **Defaults for ground truth.** pycocotools needs ``area`` and ``iscrowd`` on every ground-truth annotation:
  it reads ``g['area']`` to bin objects into small/medium/large and ``int(o['iscrowd'])`` in ``computeIoU``
  and ``evaluateImg``, and raises ``KeyError`` when either is missing (its ``_prepare`` alone treats a missing
  ``iscrowd`` as 0). Annotations written by hand or by other tools often lack them, so missing values get the
  ones pycocotools itself gives annotations it creates (``COCO.loadRes`` for boxes): ``area = w * h`` of the
  ``[x, y, w, h]`` box, computed with the same Python expression ``bbox[2] * bbox[3]``, and ``iscrowd = 0``.
  Present values are kept: COCO's own ``area`` is the segmentation mask's area, not the box's, and the
  published numbers depend on it.
* **No mutation.** Both libraries write into the records they are given (``ignore`` flags, ids turned into
  ints, ``area``/``id``/``segmentation`` on results), so the evaluator works on its own copy of every record.
* **Empty results.** ``pycocotools.COCO.loadRes`` fails on an empty list (it reads ``anns[0]``); an evaluation
  with no detections builds the empty result set directly and gives what the protocol defines: 0 for every
  metric whose area range holds ground truth, -1 where there is none. With no image to evaluate at all every
  metric is -1.
* **Distributed runs.** ``synchronize`` gathers every process's detections with ``all_gather_object`` and
  keeps one copy per image id (``DistributedSampler`` pads the last shards with repeated samples), rank 0
  evaluates and the result is broadcast, so every rank returns the same dict. A failure on rank 0 is broadcast
  too, so that other ranks raise instead of waiting forever.

``evaluate_model`` runs a detector over a dataset (sharded across processes) and feeds this evaluator; the CLI's
``eval`` command and the training engine both call it.

Layer: evaluation (above io, below the engine). Imports ``distributed`` at the top; ``evaluate_model`` imports
``data`` and ``models.base`` when called, so ``evaluate_results_file`` needs no model code. Never imports the
engine or the CLI.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import math
import numbers
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from detrkit import distributed as dist

if TYPE_CHECKING:
    from detrkit.data import CocoDetection
    from detrkit.models import Detector

__all__ = [
    "COCO_METRIC_KEYS",
    "CocoEvaluator",
    "Progress",
    "amp_context",
    "evaluate_model",
    "evaluate_results_file",
    "write_metrics",
]

log = logging.getLogger("detrkit")

#: The 12 numbers of ``COCOeval.summarize()``, in its order (``COCOeval.stats``).
COCO_METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

Backend = Literal["faster", "pycocotools"]
_BACKENDS = ("faster", "pycocotools")
_RESULT_KEYS = ("image_id", "category_id", "bbox", "score")
# Error messages name at most this many offending ids: enough to find the bug, short enough to read.
_MAX_IDS_SHOWN = 20

# Per image: (boxes (n, 4) COCO xywh, scores (n,), category ids (n,) int64).
_Detections = tuple[np.ndarray, np.ndarray, np.ndarray]


class CocoEvaluator:
    """Accumulates detections image by image and reports the 12 COCO bbox metrics.

    Typical use (every rank of a distributed run does the same)::

        evaluator = CocoEvaluator(dataset.ann_file)
        for batch in loader:
            results = postprocess(model(...), batch.orig_sizes, ...)
            evaluator.update(dict(zip(batch.image_ids, results)))
        metrics = evaluator.summarize()  # {"AP": ..., "AP50": ..., ...}, equal on every rank

    Args:
        coco_gt: path to a COCO instances JSON, or the already-loaded dict (left unchanged).
        iou_type: only ``"bbox"`` is supported.
        backend: ``"faster"`` (faster-coco-eval) or ``"pycocotools"`` (the reference; must be installed).
        all_images: evaluate every image of the annotations, not only the updated ones; images never updated
            then count as images without detections.
        verbose: let the library print its tables and progress lines (silenced by default).
    """

    def __init__(
        self,
        coco_gt: str | os.PathLike | Mapping[str, Any],
        *,
        iou_type: str = "bbox",
        backend: Backend = "faster",
        all_images: bool = False,
        verbose: bool = False,
    ) -> None:
        if iou_type != "bbox":
            raise ValueError(f"CocoEvaluator supports iou_type='bbox' only, got {iou_type!r}")
        _check_backend(backend)
        self.iou_type = iou_type
        self.backend = backend
        self.all_images = all_images
        self.verbose = verbose
        self._gt = _normalise_gt(_load_gt(coco_gt))
        self._image_ids = frozenset(img["id"] for img in self._gt["images"])
        self.reset()

    def reset(self) -> None:
        """Forget every detection (to evaluate again with the same annotations, e.g. after the next epoch)."""
        self._predictions: dict[int, _Detections] = {}
        self._synchronized = False
        self._metrics: dict[str, float] | None = None

    @property
    def image_ids(self) -> list[int]:
        """The ids of the images updated so far (after ``synchronize``: on every process), sorted."""
        return sorted(self._predictions)

    def update(self, predictions: Mapping[int, Mapping[str, Any]]) -> None:
        """Add the detections of some images.

        Args:
            predictions: ``{image_id: prediction}``, each prediction holding ``scores (n,)``, ``labels
                (n,)`` (dataset category ids, as ``postprocess`` returns them) and ``boxes (n, 4)`` absolute
                xyxy pixels at the original image size, as tensors (any device) or arrays. ``n`` may be 0: the
                image still counts.

        An image id seen before keeps its first detections: a ``DistributedSampler`` repeats samples to even
        out its shards, and a repeat carries the same detections.
        """
        if self._synchronized:
            # In a distributed run a late update on one rank would make it gather again alone and hang.
            raise RuntimeError("update() after synchronize()/summarize(): call reset() to start a new evaluation")
        if not isinstance(predictions, Mapping):
            raise TypeError(f"update() takes a dict {{image_id: prediction}}, got {type(predictions).__name__}")
        converted: dict[int, _Detections] = {}
        for key, prediction in predictions.items():
            image_id = _as_image_id(key)
            converted[image_id] = _convert_prediction(prediction, image_id)
        unknown = sorted(set(converted) - self._image_ids)
        if unknown:
            raise ValueError(f"image ids not in the ground truth: {_format_ids(unknown)}")
        for image_id, detections in converted.items():
            self._predictions.setdefault(image_id, detections)

    def synchronize(self) -> None:
        """Gather the detections of all processes (a no-op without ``torch.distributed``); idempotent.

        Every rank must call it (``summarize`` does), as it is a collective operation.
        """
        if self._synchronized:
            return
        if dist.world_size() > 1:
            gathered = dist.all_gather_objects(self._predictions)
            merged: dict[int, _Detections] = {}
            # Rank order makes the kept copy of a repeated image the same on every process.
            for part in gathered:
                for image_id, detections in (part or {}).items():
                    merged.setdefault(image_id, detections)
            self._predictions = merged
        self._synchronized = True

    def summarize(self) -> dict[str, float]:
        """Synchronise, evaluate and return ``{key: value}`` for the 12 ``COCO_METRIC_KEYS``.

        When distributed, rank 0 evaluates and broadcasts, so every rank returns the same dict. The result is
        cached until ``reset``.
        """
        self.synchronize()
        if self._metrics is None:
            self._metrics = _on_rank0_and_broadcast(self._compute_metrics)
        return dict(self._metrics)

    def results(self) -> list[dict[str, Any]]:
        """The accumulated detections as a COCO results list (``image_id, category_id, bbox [xywh], score``).

        Ordered by image id, then as given, whatever order the images came in (or which process had them): the
        order decides ties between equal scores, so a fixed order gives the same numbers every time.
        """
        return self._records(evaluation_fields=False)

    def _records(self, *, evaluation_fields: bool) -> list[dict[str, Any]]:
        """``results()``; with ``evaluation_fields`` each record also gets what ``loadRes`` would add for a bbox
        evaluation (``area`` w·h, 1-based ``id`` in this order, ``iscrowd`` 0), written at creation: one dict
        per detection is most of what evaluation costs beyond the library's C++ core."""
        records: list[dict[str, Any]] = []
        for image_id in sorted(self._predictions):
            boxes, scores, labels = self._predictions[image_id]
            columns = (boxes.tolist(), scores.tolist(), labels.tolist())
            if not evaluation_fields:
                records.extend(
                    {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                    for b, s, c in zip(*columns, strict=True)
                )
                continue
            # float64 products of the same values: equal to loadRes's bb[2] * bb[3] on Python floats
            areas = (boxes[:, 2].astype(np.float64) * boxes[:, 3]).tolist()
            first = len(records) + 1
            records.extend(
                {
                    "image_id": image_id,
                    "category_id": c,
                    "bbox": b,
                    "score": s,
                    "area": a,
                    "id": first + i,
                    "iscrowd": 0,
                }
                for i, (b, s, c, a) in enumerate(zip(*columns, areas, strict=True))
            )
        return records

    def _compute_metrics(self) -> dict[str, float]:
        with _gc_paused():
            labels = [p[2] for p in self._predictions.values()]
            _warn_unknown_categories(np.unique(np.concatenate(labels)).tolist() if labels else [], self._gt)
            image_ids = None if self.all_images else sorted(self._predictions)
            prepared = self.backend == "faster"
            results = self._records(evaluation_fields=prepared)
            return _coco_metrics(
                self._gt, results, image_ids=image_ids, backend=self.backend, verbose=self.verbose, prepared=prepared
            )


def evaluate_results_file(
    ann_file: str | os.PathLike | Mapping[str, Any],
    results_json: str | os.PathLike | list[Mapping[str, Any]],
    *,
    backend: Backend = "faster",
    verbose: bool = False,
) -> dict[str, float]:
    """Score an existing COCO results file against an annotation file, over every image of the annotations.

    Args:
        ann_file: COCO instances JSON (path or loaded dict, left unchanged).
        results_json: path to a JSON list of ``{image_id, category_id, bbox [x, y, w, h], score}``, or the
            list itself.
        backend: ``"faster"`` or ``"pycocotools"``.
        verbose: let the library print its tables.

    Returns:
        ``{key: value}`` for the 12 ``COCO_METRIC_KEYS``.

    Raises:
        ValueError: the results are not a list of such records, or name images that the annotations lack
            (pycocotools only asserts "Results do not correspond to current coco set"); the message says
            which.
    """
    _check_backend(backend)
    gt = _normalise_gt(_load_gt(ann_file))
    with _gc_paused():
        if isinstance(results_json, (str, os.PathLike)):
            source = os.fspath(results_json)
            raw = _read_results_json(source)
        else:
            source, raw = "results", results_json
        results = _validate_results(raw, source=source, image_ids={img["id"] for img in gt["images"]})
        _warn_unknown_categories({det["category_id"] for det in results}, gt)
        # A results file does not say which images were run (those without detections are absent), so the
        # whole annotation set is scored, as the COCO evaluation server does.
        return _coco_metrics(gt, results, image_ids=None, backend=backend, verbose=verbose)


def write_metrics(metrics: Mapping[str, float], path: str | os.PathLike) -> Path:
    """Write the 12 COCO metrics as JSON, atomically (a reader never sees a half-written file).

    Args:
        metrics: a dict holding at least the ``COCO_METRIC_KEYS`` (other keys are not written).
        path: the file to write, or an existing directory to write ``metrics.json`` into.

    Returns:
        The path written.
    """
    missing = [k for k in COCO_METRIC_KEYS if k not in metrics]
    if missing:
        raise KeyError(f"metrics lack {missing}; expected the keys {list(COCO_METRIC_KEYS)}")
    out = Path(path)
    if out.is_dir():
        out = out / "metrics.json"
    payload = {k: float(metrics[k]) for k in COCO_METRIC_KEYS}
    out.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file sits beside the target: os.replace is atomic only within one file system.
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


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
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COCO bbox metrics of ``model`` on ``dataset`` (sharded across processes when distributed).

    Returns the 12 metrics and the detections as a COCO results list (all processes' on rank 0). The model runs
    through ``Detector._inference_forward`` (honouring ``optimize_for_inference()``) under the ``amp`` autocast.
    """
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
    evaluator = CocoEvaluator(dataset.ann_file)
    every = max(1, len(loader) // 5)
    bar = Progress(len(loader), desc="eval", every=every, enabled=progress and dist.is_main_process())
    for batch in loader:
        batch = batch.to(device)
        with amp_context(device, amp):
            forward = getattr(model, "_inference_forward", model)  # honours optimize_for_inference()
            outputs = forward(batch.pixel_values, batch.padding_mask)
        results = model.postprocess(to_float(outputs), batch.orig_sizes, threshold=0.0, top_k=100)
        evaluator.update({int(i): r for i, r in zip(batch.image_ids, results, strict=True)})
        bar.update(1, {})
    bar.close()
    evaluator.synchronize()
    metrics = evaluator.summarize()
    model.train(was_training)
    return metrics, evaluator.results()


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


# ------------------------------------------------------------------------------------------------------------
# Ground truth and results


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _load_gt(coco_gt: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(coco_gt, (str, os.PathLike)):
        source = os.fspath(coco_gt)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no COCO annotation file {source}")
        try:
            with open(coco_gt, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{source} is not a COCO annotation file: not valid JSON ({e})") from e
    else:
        data, source = coco_gt, "ground truth"
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: a COCO annotation file is a JSON object, got {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(
            f"{source}: a COCO annotation file needs 'images', 'annotations' and 'categories'; missing {missing}"
        )
    return data


def _normalise_gt(gt: Mapping[str, Any]) -> dict[str, Any]:
    """A private copy of the records the evaluation reads, with COCO's defaults for ``area`` and ``iscrowd``.

    Records are copied one level deep: the libraries set keys on them but never write into nested lists.
    """
    annotations = []
    for ann in gt["annotations"]:
        ann = dict(ann)
        if "area" not in ann:
            bbox = ann["bbox"]
            ann["area"] = bbox[2] * bbox[3]  # the expression pycocotools' loadRes uses for box results
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
        annotations.append(ann)
    return {
        "info": dict(gt.get("info") or {}),
        "images": [dict(img) for img in gt["images"]],
        "annotations": annotations,
        "categories": [dict(cat) for cat in gt["categories"]],
    }


def _as_image_id(key: Any) -> int:
    if isinstance(key, torch.Tensor):
        key = key.item()
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)):
        raise TypeError(f"image ids must be integers, got {key!r} ({type(key).__name__})")
    return int(key)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.float()  # NumPy has no bfloat16, and half precision would lose box corners
        return value.cpu().numpy()
    return np.asarray(value)


def _convert_prediction(prediction: Mapping[str, Any], image_id: int) -> _Detections:
    """xyxy boxes to COCO xywh, checked and stored as compact arrays (cheap to gather across processes)."""
    try:
        boxes, scores, labels = (_to_numpy(prediction[k]) for k in ("boxes", "scores", "labels"))
    except (KeyError, TypeError):
        raise ValueError(f"image {image_id}: a prediction is a dict with 'boxes', 'scores' and 'labels'") from None
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    n = len(scores.reshape(-1))
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.ndim != 1 or labels.shape != (n,) or len(boxes) != n:
        raise ValueError(
            f"image {image_id}: expected boxes (n, 4), scores (n,), labels (n,); "
            f"got {tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}"
        )
    if boxes.dtype not in (np.float32, np.float64):
        boxes = boxes.astype(np.float32 if boxes.dtype == np.float16 else np.float64)
    if not (np.isfinite(boxes).all() and np.isfinite(scores.astype(np.float64)).all()):
        # COCOeval would sort and match NaNs in an order of its own; a non-finite output is a bug upstream.
        raise ValueError(f"image {image_id}: boxes and scores must be finite")
    # Width and height are taken in the boxes' own precision, as the official DETR's convert_to_xywh does on
    # its float32 tensors, so that the same model gives the same numbers here as there.
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    if not np.issubdtype(labels.dtype, np.integer):
        if n and not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"image {image_id}: labels must be integer category ids")
        labels = labels.astype(np.int64)
    return (
        xywh,
        scores.astype(np.float64 if scores.dtype == np.float64 else np.float32),
        labels.astype(np.int64),
    )


def _validate_results(raw: Any, *, source: str, image_ids: set[int]) -> list[dict[str, Any]]:
    """Check a loaded results list; copy each record's four fields (the libraries write into the records)."""
    if not isinstance(raw, list):
        raise ValueError(
            f"{source}: a COCO results file is a JSON list of {{image_id, category_id, bbox, score}} "
            f"records, got {type(raw).__name__}"
        )
    results = []
    for i, det in enumerate(raw):
        if not isinstance(det, Mapping):
            raise ValueError(f"{source}: record {i} is a {type(det).__name__}, not an object")
        missing = [k for k in _RESULT_KEYS if k not in det]
        if missing:
            raise ValueError(f"{source}: record {i} lacks {missing} (each record needs {list(_RESULT_KEYS)})")
        for key in ("image_id", "category_id"):
            if not _is_integer(det[key]):
                raise ValueError(f"{source}: record {i} has {key} {det[key]!r}; expected an integer")
        if not _is_finite_number(det["score"]):
            raise ValueError(f"{source}: record {i} has score {det['score']!r}; expected a finite number")
        bbox = det["bbox"]
        if (
            isinstance(bbox, (str, bytes))
            or not isinstance(bbox, Sequence)
            or len(bbox) != 4
            or not all(_is_finite_number(v) for v in bbox)
        ):
            raise ValueError(f"{source}: record {i} has bbox {bbox!r}; expected [x, y, width, height], finite numbers")
        results.append({k: det[k] for k in _RESULT_KEYS})
    unknown = sorted({det["image_id"] for det in results} - image_ids, key=str)
    if unknown:
        raise ValueError(f"{source}: image ids not in the ground truth: {_format_ids(unknown)}")
    return results


def _read_results_json(path: str) -> Any:
    """A results file's JSON; a file that is not JSON (or not text) is named, with where reading stopped."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not a JSON text file ({e.reason} at byte {e.start}); expected a COCO results list"
        ) from e
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected a COCO results list"
        ) from e


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _format_ids(ids: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in ids[:_MAX_IDS_SHOWN])
    return f"{shown} (and {len(ids) - _MAX_IDS_SHOWN} more)" if len(ids) > _MAX_IDS_SHOWN else shown


def _warn_unknown_categories(category_ids: Iterable[Any], gt: Mapping[str, Any]) -> None:
    # COCOeval scores the annotation file's categories only and drops other detections without a word; the
    # usual cause is contiguous model labels passed where dataset category ids belong, so say so.
    known = {cat["id"] for cat in gt["categories"]}
    unknown = sorted(set(category_ids) - known)
    if unknown:
        warnings.warn(
            f"detections with category ids not in the ground truth are ignored: {_format_ids(unknown)} "
            "(were contiguous labels passed instead of dataset category ids?)",
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------------------------
# Evaluation proper


def _coco_metrics(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    *,
    image_ids: list[int] | None,
    backend: Backend,
    verbose: bool,
    prepared: bool = False,
) -> dict[str, float]:
    """Run COCOeval on ``gt`` (a private, normalised copy) over ``image_ids`` (None: all images).

    ``prepared``: the records already hold ``area``, ``id`` and ``iscrowd`` (``CocoEvaluator._records``)."""
    if image_ids is not None and not image_ids:
        # Nothing to evaluate: COCOeval's arrays would stay at -1 (pycocotools reads every annotation first).
        return dict.fromkeys(COCO_METRIC_KEYS, -1.0)
    with _gc_paused():
        if backend == "faster":
            stats = _coco_stats_faster(gt, results, image_ids=image_ids, verbose=verbose, prepared=prepared)
        else:
            stats = _coco_stats_pycocotools(gt, results, image_ids=image_ids, verbose=verbose)
    return {k: float(v) for k, v in zip(COCO_METRIC_KEYS, stats[: len(COCO_METRIC_KEYS)], strict=True)}


def _coco_stats_faster(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    *,
    image_ids: list[int] | None,
    verbose: bool,
    prepared: bool = False,
) -> np.ndarray:
    from faster_coco_eval import COCO, COCOeval_faster

    printer: Callable[..., None] = print if verbose else _ignore
    with _quiet(verbose):
        # COCO() copies only the top-level dict and writes into the records: they are our private copy.
        coco_gt = COCO(gt, print_function=printer)
        coco_dt = _faster_results(coco_gt, results, printer) if results and prepared else coco_gt.loadRes(results)
        coco_eval = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=printer)
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.asarray(coco_eval.stats)


def _faster_results(coco_gt: Any, records: list[dict[str, Any]], printer: Callable[..., None]) -> Any:
    """The result set faster-coco-eval's ``loadRes`` builds from bbox records that already hold ``area``, ``id``
    and ``iscrowd``, without its per-record loop (which also adds a box-shaped polygon bbox evaluation never
    reads). Image and category ids were validated before."""
    from faster_coco_eval import COCO

    coco_dt = COCO(print_function=printer)
    coco_dt.dataset = {
        "info": dict(coco_gt.dataset.get("info", {})),
        "images": list(coco_gt.dataset["images"]),
        "categories": [dict(c) for c in coco_gt.dataset["categories"]],
        "annotations": records,
    }
    coco_dt.createIndex()
    return coco_dt


def _coco_stats_pycocotools(
    gt: dict[str, Any], results: list[dict[str, Any]], *, image_ids: list[int] | None, verbose: bool
) -> np.ndarray:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError(
            "backend='pycocotools' needs pycocotools, which detrkit installs only for its tests "
            "(pip install pycocotools); the default backend='faster' gives the same numbers"
        ) from e

    with _quiet(verbose):
        coco_gt = COCO()
        coco_gt.dataset = dict(gt)
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            # loadRes reads anns[0]; an empty result set is what it would build for a list without detections.
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(gt["images"]),
                "categories": [dict(c) for c in gt["categories"]],
                "annotations": [],
            }
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.asarray(coco_eval.stats)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause CPython's cyclic garbage collector while the evaluation builds its records.

    An evaluation creates millions of small dicts and lists (a record per detection, the libraries' indexes)
    that all live until it ends, and every collection of the oldest generation walks all of them again: on
    500k detections pausing it takes an evaluation from 10.7 s to 8.6 s. Nothing here creates reference
    cycles, so there is nothing to collect; the collector is switched back on as it was, even on errors.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _ignore(*args: Any, **kwargs: Any) -> None:
    """A print function that prints nothing."""


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence the libraries' ``print`` calls (pycocotools prints its tables and timings unconditionally)."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ------------------------------------------------------------------------------------------------------------
# Distributed helpers


def _on_rank0_and_broadcast(compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run ``compute`` on rank 0 only and give its result (or its failure) to every rank."""
    if dist.world_size() == 1:
        return compute()
    error: BaseException | None = None
    payload: tuple[str, Any] | None = None
    if dist.rank() == 0:
        try:
            payload = ("ok", compute())
        except Exception as e:  # re-raised below, once the other ranks are told
            error = e
            payload = ("error", f"{type(e).__name__}: {e}")
    payload = dist.broadcast_object(payload, src=0)
    if error is not None:
        raise error
    status, value = payload
    if status != "ok":
        raise RuntimeError(f"COCO evaluation failed on rank 0: {value}")
    return value
