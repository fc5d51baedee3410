"""What a training run is made of, built from its config: datasets, model config, criterion, optimizer, scaler, EMA.

Each builder is a function of the config (and what it needs besides); none changes global state.

Layer: engine. Imports: config, the building blocks (criterion, matcher, data, doctor, transforms), models,
``checkpoint`` (io) and ``schedule``.
"""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path

import torch
from torch import nn

from .. import distributed as dist
from ..checkpoint import build, init_from_weights
from ..config import ModelConfig, RunConfig, TrainConfig
from ..criterion import SetCriterion
from ..data import CocoDetection
from ..doctor import check_loaded_dataset
from ..matcher import HungarianMatcher
from ..models import Detector
from ..models.base import check_half_precision
from ..panoptic_data import CocoPanoptic
from ..transforms import eval_transforms, train_transforms
from .schedule import param_groups

log = logging.getLogger("detrkit")


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
        mask_loss=getattr(config.model, "masks", False),  # dice + focal on pred_masks (DETR Sec. 4.4)
        weight_mask=lc.weight_mask,
        weight_dice=lc.weight_dice,
        iou_aware=lc.iou_aware,
        weight_one_to_many=lc.weight_one_to_many,
    )


def build_datasets(config: RunConfig) -> tuple[CocoDetection, CocoDetection | None]:
    """The train split and the val split (None without ``data.val_annotations``), with the same categories."""
    train_set, val_set = build_train_dataset(config), build_val_dataset(config)
    if val_set is not None and val_set.label_map != train_set.label_map:
        raise ValueError(
            f"the val annotations ({config.data.val_annotations}) have different categories from the train "
            f"annotations ({config.data.train_annotations}): ids {list(val_set.label_map.category_ids)} "
            f"vs {list(train_set.label_map.category_ids)}"
        )
    return train_set, val_set


def build_train_dataset(config: RunConfig) -> CocoDetection | CocoPanoptic:
    d = config.data
    tf = train_transforms(
        scales=d.train_scales,
        max_size=d.train_max_size,
        crop_resize=d.crop_resize if d.random_crop else None,
        crop_size=d.crop_size,
    )
    return _open_split(config, "train", tf)


def build_val_dataset(config: RunConfig) -> CocoDetection | CocoPanoptic | None:
    if not config.data.val_annotations:
        return None
    return _open_split(config, "val", eval_transforms(size=config.data.eval_size, max_size=config.data.eval_max_size))


def _open_split(config: RunConfig, split: str, transforms) -> CocoDetection | CocoPanoptic:
    """A split in the config's ``data.format``: instances (with their masks when the model has a mask head) or
    panoptic (things and stuff as masks, with their PNG folder)."""
    d = config.data
    images, annotations = getattr(d, f"{split}_images"), getattr(d, f"{split}_annotations")
    _require_files(images, annotations, split)
    if d.format == "coco_panoptic":
        pngs = getattr(d, f"{split}_panoptic_pngs") or None
        return CocoPanoptic(images, annotations, png_dir=pngs, transforms=transforms)
    masks = config.model.masks  # the segmentations are decoded only for a model with a mask head
    return _checked(CocoDetection(images, annotations, transforms=transforms, return_masks=masks), config, split)


def _checked(dataset: CocoDetection, config: RunConfig, split: str) -> CocoDetection:
    """``dataset`` once ``detrkit doctor``'s checks pass: every image header read (fast: no decoding), so a bad
    image stops the run now rather than an hour into an epoch; warnings announced (rank 0), errors refused."""
    d = config.data
    report = check_loaded_dataset(
        dataset, num_queries=config.model.num_queries, image_size=d.eval_size, max_size=d.eval_max_size
    )
    if not report.ok:
        raise ValueError(
            f"data.{split}: the dataset has errors (`detrkit doctor` prints the full report):\n"
            + report.issues.message("error")
        )
    if dist.is_main_process():
        for issue in report.warnings:  # the fix-ups were announced when the dataset was built
            log.warning("%s: %s", report.annotations, issue.format())
    return dataset


def _require_files(images: str, annotations: str, split: str) -> None:
    if not images or not annotations:
        raise ValueError(f"data.{split}_images and data.{split}_annotations must be set in the config")
    if not Path(images).is_dir():
        raise FileNotFoundError(f"data.{split}_images: no such folder {images}")
    if not Path(annotations).is_file():
        raise FileNotFoundError(f"data.{split}_annotations: no such file {annotations}")


def model_config_for_data(config: RunConfig, dataset: CocoDetection) -> ModelConfig:
    """The config's model with the dataset's classes and the evaluation resize (``predict`` resizes the same way)."""
    lm = dataset.label_map
    return config.model.replace(
        num_classes=lm.num_classes,
        category_ids=lm.category_ids,
        class_names=lm.names,
        class_isthing=lm.isthing,
        image_size=config.data.eval_size,
        max_size=config.data.eval_max_size,
    )


def wrap_distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when a process group is up, else ``model`` itself."""
    if not dist.is_distributed():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def build_optimizer(model: nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # fused: one kernel per step instead of a dozen passes over every parameter (CPU and CUDA; what
    # transformers' Trainer also defaults to)
    fused = device.type in ("cpu", "cuda")
    groups = param_groups(model, train.lr, train.lr_backbone)
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, fused=fused)


def build_scaler(train: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """fp16 loss scaling on CUDA; a disabled scaler (a no-op) otherwise."""
    if train.amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; use train.amp=bf16 on the CPU")
    if train.amp == "bf16":  # refused where the GPU lacks it, a warning where the CPU emulates it
        check_half_precision(torch.bfloat16, device, autocast=True)
    return torch.amp.GradScaler(device.type, enabled=train.amp == "fp16" and device.type == "cuda")


def build_ema(model: nn.Module, train: TrainConfig) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the weights and buffers (``train.ema``), or None."""
    if not train.ema:
        return None
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(train.ema_decay), use_buffers=True
    )


# What a failed download raises (urllib's URLError for DNS/refused connections; timeouts and resets directly).
_NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError)


def build_for_training(model_config: ModelConfig, train: TrainConfig, *, resuming: bool) -> Detector:
    """The run's model before its first step: fine-tuned from ``train.init_weights``, or built for ``model_config``.

    The backbone's pre-trained weights (``model.backbone_weights``) are fetched only when they are used: not with
    ``train.init_weights``, whose weights replace the backbone's, nor when a checkpoint will replace every weight
    (the run's config still records them). A failed download names the weights, the cause and the fixes.
    """
    if train.init_weights:
        return init_from_weights(model_config.replace(backbone_weights=None), train.init_weights)
    if resuming and model_config.backbone_weights:
        model = build(model_config.replace(backbone_weights=None))
        model.config = model.config.replace(backbone_weights=model_config.backbone_weights)
        return model
    try:
        return build(model_config)
    except _NETWORK_ERRORS as e:
        raise ConnectionError(_offline_message(model_config, e)) from e


def _offline_message(config: ModelConfig, error: Exception) -> str:
    import torchvision

    reason = getattr(error, "reason", error)
    try:
        url = torchvision.models.get_model_weights(config.backbone)[config.backbone_weights].url
        what, file = f"torchvision's {config.backbone} {config.backbone_weights} weights", url.rsplit("/", 1)[-1]
    except (KeyError, ValueError, AttributeError):
        what, file = f"the backbone weights {config.backbone_weights}", "the weights file"
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"model.backbone_weights={config.backbone_weights}: could not download {what} ({reason}); this machine "
        f"seems to be offline. Either train the backbone from scratch with model.backbone_weights=null "
        f"model.backbone_norm=batch, or put {file} in torch's hub cache ({cache}/) and run again."
    )


def warn_random_frozen_batchnorm(model: Detector, train: TrainConfig) -> None:
    """Frozen BatchNorm keeps the statistics it was built with: a random backbone's are 0 and 1, so its layers
    normalise nothing (DETR freezes them because ImageNet weights bring real ones)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    if frozen and not model.config.backbone_weights and not train.init_weights:
        log.warning(
            "the backbone has no pre-trained weights (model.backbone_weights=null) and frozen BatchNorm "
            "(model.backbone_norm=frozen): random frozen statistics normalise nothing and training suffers. Use "
            "model.backbone_norm=batch to train it from scratch, or ImageNet weights "
            "(model.backbone_weights=IMAGENET1K_V1)"
        )
