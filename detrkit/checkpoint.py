"""Building models with their weights and loading them safely: safetensors and ``torch.load(weights_only=True)``
only.

A detrkit model folder holds ``config.json`` (the ``ModelConfig``, label map included) and ``model.safetensors``
(written by ``files.save_pretrained``). ``load`` also reads published checkpoints through ``convert/``: a
``transformers`` folder or an official ``.pth``. ``build`` is ``models.build_model`` plus the backbone weights a
config names; ``init_from_weights`` builds a model for fine-tuning from saved or published weights.

Layer: io. May import ``config``, the building blocks, ``models`` and ``convert``; never ``engine`` or ``cli``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from . import convert
from .config import ModelConfig
from .files import FORMAT, FORMAT_VERSION, atomic_write, atomic_write_text, save_pretrained
from .models import Detector, build_model, fine_tuning_config

log = logging.getLogger("detrkit")

__all__ = ["atomic_write", "atomic_write_text", "build", "init_from_weights", "load", "save_pretrained"]


def build(config: ModelConfig) -> Detector:
    """A new model for ``config``: random weights, and the backbone's pre-trained weights when
    ``config.backbone_weights`` names them (torchvision's ImageNet ResNets, or a DeiT/ViT checkpoint for YOLOS)."""
    model = build_model(config)
    if config.backbone_weights:
        convert.init_backbone(model, config.backbone_weights)
    return model


def _looks_like_hub_id(name: str) -> bool:
    """``owner/name`` or ``owner/name@revision``, and not a path that merely does not exist yet."""
    repo = name.partition("@")[0]
    parts = repo.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not name.startswith((".", "/", "~"))
        and not Path(parts[0]).exists()
        and Path(repo).suffix == ""
    )


def _is_detrkit_folder(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("format") == FORMAT


def load(path: str | Path, *, map_location: str | torch.device = "cpu", **overrides: Any) -> Detector:
    """Load a detector from a detrkit folder, a ``transformers`` folder, an official ``.pth`` or a Hub id.

    ``overrides`` replace fields of the loaded ``ModelConfig`` (for instance ``mask_backbone_padding=True``).
    """
    p = Path(path)
    if p.is_dir() and _is_detrkit_folder(p):
        meta = json.loads((p / "config.json").read_text())
        if meta.get("format_version", 1) > FORMAT_VERSION:
            raise ValueError(f"{p} was written by a newer detrkit (format {meta['format_version']}); upgrade detrkit")
        config = ModelConfig.from_dict(meta["model"])
        state = load_file(str(p / "model.safetensors"))
    elif p.is_dir() or p.is_file():
        config, state = convert.load_published(p)
    elif _looks_like_hub_id(str(path)):
        repo_id, _, revision = str(path).partition("@")
        config, state = convert.load_published(convert.resolve_hub_id(repo_id, revision or None))
    else:
        raise FileNotFoundError(
            f"no model at {path}: expected a detrkit or transformers folder, an official .pth file, "
            "or a Hub id such as facebook/detr-resnet-50 (optionally @revision)"
        )
    if overrides:
        config = config.replace(**overrides)
    # the weights come from the file: building with the backbone's ImageNet weights would fetch (or read) them for
    # nothing, and fail when they are not at hand; the config keeps its record of them
    model = build_model(config.replace(backbone_weights=None))
    model.config = config
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in {path} do not fit the model: missing {sorted(missing)[:10]}{'…' if len(missing) > 10 else ''}"
            f", unexpected {sorted(unexpected)[:10]}{'…' if len(unexpected) > 10 else ''}"
        )
    return model.to(map_location).eval()


def init_from_weights(model_config: ModelConfig, weights: str) -> Detector:
    """Build the model for fine-tuning from published or saved ``weights``.

    The architecture (the fields and options its declaration says decide the weights) comes from the weights
    (``models.fine_tuning_config``); the class head is re-initialised when the class set differs.
    """
    source = load(weights)
    model = build_model(fine_tuning_config(model_config, source.config))
    state = source.state_dict()
    target = model.state_dict()
    reinit = [k for k in state if k in target and state[k].shape != target[k].shape]
    same_classes = source.config.category_ids == model.config.category_ids and not reinit
    if not same_classes:
        reinit = sorted({k for k in target if k.startswith("class_embed.")} | set(reinit))
    for k in reinit:
        state.pop(k, None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(reinit):
        raise ValueError(
            f"weights {weights} do not fit: missing {sorted(set(missing) - set(reinit))}, unexpected {unexpected}"
        )
    if reinit:
        log.warning(
            "fine-tuning from %s: the class head was re-initialised (%s): the weights have %d classes %s, "
            "the dataset has %d %s",
            weights,
            ", ".join(reinit),
            source.config.num_classes,
            list(source.config.category_ids or range(source.config.num_classes)),
            model.config.num_classes,
            list(model.config.category_ids or range(model.config.num_classes)),
        )
    return model
