"""Detector architectures. Each is one file ending with its ``ARCHITECTURE`` declaration; the registry
(``architectures()``) is derived from those declarations. They share backbone, layers, heads, matcher, criterion
and engine.

Layer: models. May import ``config`` and the building blocks (backbone, position encodings, box ops,
postprocess, images, transforms, labels); never ``checkpoint``, ``convert``, ``engine`` or ``cli``.
"""

from __future__ import annotations

from .base import Detections, Detector
from .conditional_detr import ConditionalDETR
from .deformable_detr import DeformableDETR
from .detr import DETR
from .registry import (
    Architecture,
    architecture,
    architectures,
    build_model,
    check_config,
    fine_tuning_config,
    shape_fields,
)
from .yolos import YOLOS

__all__ = [
    "Architecture",
    "ConditionalDETR",
    "DETR",
    "DeformableDETR",
    "Detections",
    "Detector",
    "YOLOS",
    "architecture",
    "architectures",
    "build_model",
    "check_config",
    "fine_tuning_config",
    "shape_fields",
]
