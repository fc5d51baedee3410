"""detrkit: end-to-end transformer object detection, the DETR family in plain PyTorch.

Public API: ``detrkit.build`` (a new model from a config), ``detrkit.load`` (saved or published weights) and the
model's ``predict``.

The names are imported when first used (PEP 562 ``__getattr__``): ``import detrkit`` and the ``detrkit`` command
do not import torch until a command or a name needs it (``detrkit --help`` and ``detrkit eval --results`` never
do).

Layer: the package root (the public API); re-exports from every layer below the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import load
    from .config import LossConfig, ModelConfig, load_run_config  # noqa: F401
    from .labels import LabelMap
    from .models import Detections, Detector, architecture  # noqa: F401
    from .models.onnx_detector import OnnxDetector  # noqa: F401

__version__ = "0.1.0"

# name -> the module that defines it, imported on first use
_LAZY = {
    "load": "detrkit.checkpoint",
    "LossConfig": "detrkit.config",
    "ModelConfig": "detrkit.config",
    "load_run_config": "detrkit.config",
    "LabelMap": "detrkit.labels",
    "Detections": "detrkit.models",
    "Detector": "detrkit.models",
    "architecture": "detrkit.models",
    "OnnxDetector": "detrkit.models.onnx_detector",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'detrkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def build(
    config: ModelConfig | dict[str, Any] | str | None = None, *, label_map: LabelMap | None = None, **overrides: Any
) -> Detector:
    """Build a detector with random weights (and the backbone's pre-trained weights when the config names them).

    ``config`` is a ``ModelConfig``, a dict of its fields, or the name (or path) of a run config whose ``model``
    section is used, e.g. ``"conditional_detr_r50"``; ``overrides`` replace fields. Without ``config``, the
    defaults are DETR's, or those the architecture named by ``arch=`` declares (``detrkit.build(arch="yolos")``).
    With ``label_map`` (for instance ``dataset.label_map``) the class count and the category ids and names come
    from the dataset.
    """
    from .checkpoint import build as _build
    from .config import ModelConfig, load_run_config
    from .models import architecture

    if config is None:
        config = ModelConfig()
        if "arch" in overrides:
            config = config.replace(arch=overrides["arch"], **architecture(overrides["arch"]).defaults)
    elif isinstance(config, str):
        config = load_run_config(config).model
    elif isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    if label_map is not None:
        overrides = {
            "num_classes": label_map.num_classes,
            "category_ids": label_map.category_ids,
            "class_names": label_map.names,
            "class_isthing": label_map.isthing,
            **overrides,
        }
    if overrides:
        config = config.replace(**overrides)
    return _build(config)


__all__ = [
    "Detections",
    "Detector",
    "LabelMap",
    "LossConfig",
    "ModelConfig",
    "OnnxDetector",
    "build",
    "load",
    "__version__",
]
