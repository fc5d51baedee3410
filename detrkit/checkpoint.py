"""Saving and loading weights safely: safetensors and ``torch.load(weights_only=True)`` only, atomic writes.

A detrkit model folder holds ``config.json`` (the ``ModelConfig``, label map included) and ``model.safetensors``.
``load`` also reads published checkpoints through ``convert/``: a ``transformers`` folder or an official ``.pth``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig

log = logging.getLogger("detrkit")

FORMAT = "detrkit"
FORMAT_VERSION = 1


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it and rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for a detrkit ``Detector``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict()}
    atomic_write_text(directory / "config.json", json.dumps(meta, indent=2) + "\n")
    return directory


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


def load(path: str | Path, *, map_location: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """Load a detector from a detrkit folder, a ``transformers`` folder, an official ``.pth`` or a Hub id.

    ``overrides`` replace fields of the loaded ``ModelConfig`` (for instance ``mask_backbone_padding=True``).
    """
    from . import convert
    from .models import build_model

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


# Fields that define the shape of a network's weights: when fine-tuning, they come from the weights.
ARCHITECTURE_FIELDS = (
    "arch",
    "backbone",
    "dilation",
    "feature_level",
    "position_embedding",
    "hidden_dim",
    "nheads",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "num_queries",
    "num_feature_levels",
    "enc_points",
    "dec_points",
    "box_refine",
    "two_stage",
    "patch_size",
    "pretrain_image_size",
    "mid_position_embeddings",
)


def init_from_weights(model_config: ModelConfig, weights: str) -> nn.Module:
    """Build the model for fine-tuning from published or saved ``weights``.

    The architecture comes from the weights; the class head is re-initialised when the class set differs.
    """
    from .models import build_model

    source = load(weights)
    arch = {k: getattr(source.config, k) for k in ARCHITECTURE_FIELDS}
    model = build_model(model_config.replace(**arch))
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
            "fine-tuning from %s: the class head was re-initialised (%s): the weights have %d classes, "
            "the dataset has %d",
            weights,
            ", ".join(reinit),
            source.config.num_classes,
            model.config.num_classes,
        )
    return model
