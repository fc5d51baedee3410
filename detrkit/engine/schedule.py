"""Learning rates: the optimizer's parameter groups and the schedule, a pure function of the optimizer step.

There is no scheduler state: resuming at step ``s`` needs nothing but ``s``.

Layer: engine. Imports: config and models (for ``Detector.lr_scale``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..config import RunConfig
from ..models import Detector


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
