"""detrkit: end-to-end transformer object detection, the DETR family in plain PyTorch.

Public API: ``detrkit.build`` (a new model from a config), ``detrkit.load`` (saved or published weights) and the
model's ``predict``.

Layer: the package root (the public API); re-exports from every layer below the CLI.
"""

from __future__ import annotations

from typing import Any

from .checkpoint import build as _build
from .checkpoint import load
from .config import LossConfig, ModelConfig, load_run_config
from .labels import LabelMap
from .models import Detections, Detector, architecture

__version__ = "0.1.0"


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


__all__ = ["Detections", "Detector", "LabelMap", "LossConfig", "ModelConfig", "build", "load", "__version__"]
