"""Detector architectures. Each is one file; they share backbone, heads, matcher, criterion and engine."""

from __future__ import annotations

from ..config import ModelConfig
from .base import Detections, Detector
from .conditional_detr import ConditionalDETR
from .deformable_detr import DeformableDETR
from .detr import DETR
from .yolos import YOLOS

MODEL_CLASSES: dict[str, type[Detector]] = {
    "detr": DETR,
    "conditional_detr": ConditionalDETR,
    "deformable_detr": DeformableDETR,
    "yolos": YOLOS,
}


def build_model(config: ModelConfig) -> Detector:
    if config.arch not in MODEL_CLASSES:
        raise ValueError(f"arch {config.arch!r} has no model class; known: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[config.arch](config)


__all__ = [
    "ConditionalDETR",
    "DETR",
    "DeformableDETR",
    "Detections",
    "Detector",
    "MODEL_CLASSES",
    "YOLOS",
    "build_model",
]
