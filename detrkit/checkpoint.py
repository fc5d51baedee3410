"""Building models with their weights and loading them safely: safetensors and ``torch.load(weights_only=True)``
only.

A detrkit model folder holds ``config.json`` (the ``ModelConfig``, label map included) and ``model.safetensors``
(written by ``files.save_pretrained``). ``load`` also reads published checkpoints through ``convert/``: a
``transformers`` folder or an official ``.pth``; and what ``detrkit train`` writes: a run folder (its final
``model/``) and a training checkpoint (its EMA weights, else its trained ones). A file that is not what it should
be (truncated, not JSON, weights that disagree with ``config.json``) is refused in a sentence naming it.
``build`` is ``models.build_model`` plus the backbone weights a config names; ``init_from_weights`` builds a
model for fine-tuning from saved or published weights.

Layer: io. May import ``config``, the building blocks, ``models`` and ``convert``; never ``engine`` or ``cli``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import convert
from .config import ModelConfig, RunConfig
from .convert.common import read_json_object, read_safetensors, torch_load_tensors
from .files import (
    FORMAT,
    FORMAT_VERSION,
    TRAIN_FORMAT,
    TRAIN_FORMAT_VERSION,
    atomic_write,
    atomic_write_text,
    save_pretrained,
)
from .models import Detector, build_model, fine_tuning_config
from .models.denoising import TRAINING_ONLY_PREFIXES
from .models.segmentation import MASK_HEAD_PREFIXES

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
    return cfg.is_file() and read_json_object(cfg).get("format") == FORMAT


def _is_run_folder(path: Path) -> bool:
    """A ``detrkit train`` run folder (``model/``, ``best/``, ``checkpoints/``), not a model folder itself."""
    if (path / "config.json").is_file():
        return False
    return any((path / name / "config.json").is_file() for name in ("model", "best")) or (
        (path / "checkpoints").is_dir() and (path / "config.yaml").is_file()
    )


def _run_folder_model(run: Path) -> Path:
    """The model of a run folder: its final ``model/`` (announced); refused, with what there is, before the run
    completed (``best/`` is the best evaluation so far, a checkpoint the latest state: the user's choice)."""
    if _is_detrkit_folder(run / "model"):
        best = f"; {run / 'best'} holds the best-AP one" if (run / "best").is_dir() else ""
        log.info("%s is a training run folder: loading its final model, %s%s", run, run / "model", best)
        return run / "model"
    found = [str(run / "best") + " (the best evaluation so far)"] if _is_detrkit_folder(run / "best") else []
    checkpoints = sorted((run / "checkpoints").glob("step-*.pt"))
    if checkpoints:
        found.append(f"{checkpoints[-1]} (the latest training checkpoint)")
    raise ValueError(
        f"{run} is a training run folder without model/ (training has not completed)"
        + (f": load one of {', '.join(found)}" if found else ", and it holds no best/ or checkpoint to load")
    )


def _model_config(d: Any, source: str) -> ModelConfig:
    """A ``ModelConfig`` from a saved mapping, every field's type checked, errors naming ``source``."""
    if not isinstance(d, dict):
        raise ValueError(f"{source} has no model config (a 'model' object of ModelConfig fields)")
    try:
        return RunConfig.from_dict({"model": d}).model  # RunConfig checks and converts every field's type
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: invalid model config: {e}") from e


def _read_detrkit_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = folder / "config.json"
    meta = read_json_object(cfg)
    version = meta.get("format_version", 1)
    if not isinstance(version, int):
        raise ValueError(f"{cfg}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{folder} was written by a newer detrkit (format {version}); upgrade detrkit")
    config = _model_config(meta.get("model"), str(cfg))
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has a detrkit config.json but no model.safetensors")
    return config, read_safetensors(weights)


def _read_training_checkpoint(obj: dict[str, Any], path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A training checkpoint's model config and weights: the EMA's average when the run kept one (it is what the
    run evaluated and exported), else the trained weights."""
    version = obj.get("version")
    if not isinstance(version, int) or version > TRAIN_FORMAT_VERSION:
        raise ValueError(
            f"{path} is a training checkpoint of version {version!r}; this detrkit reads up to "
            f"{TRAIN_FORMAT_VERSION}: upgrade detrkit"
        )
    run_config = obj.get("config")
    config = _model_config(run_config.get("model") if isinstance(run_config, dict) else None, str(path))
    ema = obj.get("ema")
    if isinstance(ema, dict) and ema:
        state, which = {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}, "EMA"
    else:
        state, which = obj.get("model"), "trained"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is a damaged training checkpoint: its {which} weights are not a dict of tensors")
    step = obj.get("state", {}).get("global_step") if isinstance(obj.get("state"), dict) else None
    log.info("%s is a training checkpoint (step %s): loading its %s weights", path, step, which)
    return config, state


# Modules that DETR and Conditional DETR with query selection (``two_stage``) once built but never used (an unused
# parameter stalls DDP): weights saved then still hold them, and load without them.
UNUSED_BEFORE_SESSION_6 = ("transformer.ref_point_head.", "denoising.box_position.", "one_to_many_embed.")


def _check_fits(model: Detector, state: dict[str, torch.Tensor], path: Path) -> None:
    """One sentence naming the weights and the config that disagree, with the first few keys and both shapes."""
    expected = model.state_dict()
    wrong = [
        f"{k} {tuple(state[k].shape)} in the weights, {tuple(v.shape)} in the config"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if not (wrong or missing or unexpected):
        return
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shapes differ ({_first(wrong)})")
    if missing:
        parts.append(f"{len(missing)} keys of the model are missing from the weights ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} keys of the weights are not in the model ({_first(unexpected)})")
    source = f"{path / 'model.safetensors'} and {path / 'config.json'}" if path.is_dir() else f"the weights in {path}"
    raise ValueError(
        f"{source} do not describe the same model: " + "; ".join(parts) + ". Were the files of two models mixed, "
        "or config.json edited?"
    )


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def load(path: str | Path, *, map_location: str | torch.device = "cpu", **overrides: Any) -> Detector:
    """Load a detector from a detrkit folder, a ``transformers`` folder, an official ``.pth`` or a Hub id.

    Also a ``detrkit train`` run folder (its final ``model/``, announced) and a training checkpoint
    (``checkpoints/step-*.pt``: the EMA weights when the run kept an EMA, else the trained ones).
    ``overrides`` replace fields of the loaded ``ModelConfig`` (for instance ``mask_backbone_padding=True``).
    """
    p = Path(path)
    if p.is_dir() and _is_run_folder(p):
        p = _run_folder_model(p)
    if p.is_file() and p.name == "model.safetensors" and _is_detrkit_folder(p.parent):
        log.info("%s is the weights file of a detrkit model folder: loading the folder %s", p, p.parent)
        p = p.parent
    if p.is_dir() and _is_detrkit_folder(p):
        config, state = _read_detrkit_folder(p)
    elif p.is_dir() or (p.is_file() and p.suffix == ".safetensors"):
        config, state = convert.load_published(p)
    elif p.is_file():
        obj = torch_load_tensors(p)
        if isinstance(obj, dict) and obj.get("format") == TRAIN_FORMAT:
            config, state = _read_training_checkpoint(obj, p)
        else:
            config, state = convert.convert_file_object(obj, p)
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
    expected = model.state_dict()
    for k in [k for k in state if k.startswith(UNUSED_BEFORE_SESSION_6) and k not in expected]:
        state.pop(k)
    _check_fits(model, state, p)
    model.load_state_dict(state)
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
    # training-only queries (models/denoising.py): a run may turn them on over weights without them (they start
    # from scratch) or off over weights with them (dropped)
    for k in [k for k in state if k.startswith(TRAINING_ONLY_PREFIXES) and k not in target]:
        state.pop(k)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(TRAINING_ONLY_PREFIXES)]
    # a detector's weights fine-tuned with a mask head (the paper's second stage): the head starts from scratch
    stage_two = model.config.masks and not source.config.masks
    new_head = [k for k in missing if stage_two and k.startswith(MASK_HEAD_PREFIXES)]
    if new_head:
        log.info("fine-tuning from %s: the mask head is new (%d tensors, random)", weights, len(new_head))
    if unexpected or set(missing) - set(reinit) - set(new_head):
        raise ValueError(
            f"weights {weights} do not fit: missing {sorted(set(missing) - set(reinit) - set(new_head))}, "
            f"unexpected {unexpected}"
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
