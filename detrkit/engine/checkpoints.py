"""Resumable training checkpoints: ``checkpoints/step-XXXXXXXX.pt`` in the run directory.

A checkpoint is a dict read with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists and dicts: no
code is unpickled): ``format`` ("detrkit-train"), ``version``, ``config`` (the resolved ``RunConfig`` as a dict),
``model``, ``optimizer``, ``scaler`` and ``ema`` (None without EMA) state dicts, ``state`` (``TrainState``'s
fields), ``history`` (the epoch records so far) and ``rng`` (``state.capture_rng``). That is what an exact resume
needs and no more: the weights, AdamW's two moments per trainable parameter (together twice the trainable weights'
size), the EMA's average when ``train.ema`` is on; everything else is a few kilobytes. Weights-only exports for
inference are ``checkpoint.save_pretrained``'s folders, not these; ``detrkit.load`` also reads a checkpoint's
weights (the EMA's when present).

``read_checkpoint`` refuses, in a sentence naming the file, anything that is not such a checkpoint (a pickle that
needs code, a text, empty or truncated file, a safetensors export, another tool's checkpoint), and
``load_components`` weights of another model (another architecture, width, depth or class set), naming the config
fields that differ and the first keys with both shapes instead of a size-mismatch traceback.

Layer: engine. Imports: torch, config, ``models`` (its shape fields), io (``checkpoint.atomic_write``, the safe
reader of ``convert.common``), ``files`` (the format's name) and ``state``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_write
from ..config import RunConfig
from ..convert.common import describe_file, torch_load_tensors
from ..files import TRAIN_FORMAT, TRAIN_FORMAT_VERSION
from ..models import shape_fields
from .state import TrainState, capture_rng

CHECKPOINT_FORMAT = TRAIN_FORMAT
CHECKPOINT_VERSION = TRAIN_FORMAT_VERSION
# What every checkpoint holds, and the type of each entry ("ema" may also be None).
_ENTRIES: dict[str, type] = {
    "config": dict,
    "model": dict,
    "optimizer": dict,
    "scaler": dict,
    "state": dict,
    "rng": dict,
}


def checkpoint_payload(
    *,
    config: RunConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: nn.Module | None,
    state: TrainState,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """The checkpoint of a run now: its components' state dicts and the global random stream (the run's own,
    while ``fit`` runs)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "state": vars(state).copy(),
        "history": history,
        "rng": capture_rng(),
    }


def load_components(
    ckpt: dict[str, Any],
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: nn.Module | None,
) -> None:
    """Load a checkpoint's state dicts into the run's components (``read_checkpoint`` checked the file).

    Weights or optimizer state that do not fit the run's model are refused before anything is loaded, naming the
    model config fields that differ (``hidden_dim 64 (checkpoint) vs 32 (this run)``) and the first keys with
    both shapes. (``loop.Trainer`` compares the configs first and refuses another architecture or class set.)
    """
    saved = ckpt["config"].get("model")
    diffs = _differences(saved, model.config.to_dict() if hasattr(model, "config") else None)
    _check_state_fits(ckpt["model"], model.state_dict(), path, diffs)
    model.load_state_dict(ckpt["model"])
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        hint = f" (the model config differs: {', '.join(diffs)})" if diffs else ""
        raise ValueError(
            f"--resume {path}: the checkpoint's optimizer state does not fit this run's trainable parameters{hint}: "
            f"{e}; resume with the config it was trained with (config.yaml in its run folder)"
        ) from e
    try:
        scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, KeyError, RuntimeError) as e:
        amp = ckpt["config"].get("train", {}).get("amp")
        raise ValueError(
            f"--resume {path}: the checkpoint's fp16 loss-scaler state does not fit this run (it was trained with "
            f"train.amp={amp}): {e}"
        ) from e
    if ema is not None:
        if ckpt["ema"] is None:
            raise ValueError(f"{path} was trained without EMA; resume with train.ema=false")
        _check_state_fits(ckpt["ema"], ema.state_dict(), path, [], what="EMA weights")
        ema.load_state_dict(ckpt["ema"])


def _differences(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    """``"hidden_dim 64 (checkpoint) vs 32 (this run)"`` for each model config field that differs, the fields that
    decide the weights first."""
    if not isinstance(saved, dict) or current is None:
        return []
    try:
        first = [f for f in shape_fields(current["arch"]) if not f.startswith("options.")]
    except ValueError:
        first = []
    order = first + ["num_classes", "category_ids"] + sorted(current)
    fields = [k for k in dict.fromkeys(order) if k in current and k in saved and _plain(saved[k]) != _plain(current[k])]
    return [f"{k} {_plain(saved[k])} (checkpoint) vs {_plain(current[k])} (this run)" for k in fields]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_state_fits(
    state: dict[str, Any], expected: dict[str, torch.Tensor], path: Path, diffs: list[str], *, what: str = "weights"
) -> None:
    """One sentence naming what differs between a checkpoint's state dict and the run's: the config fields, then
    the first few keys with both shapes."""
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape
    ]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if not (wrong or missing or unexpected):
        return
    parts = [f"the model config differs: {', '.join(diffs)}"] if diffs else []
    if wrong:
        parts.append(f"{len(wrong)} shapes differ (checkpoint vs this run): {_first(wrong)}")
    if missing:
        parts.append(f"{len(missing)} keys of this run's model are missing: {_first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} keys are not in this run's model: {_first(unexpected)}")
    raise ValueError(
        f"--resume {path}: the checkpoint's {what} do not fit this run's model; " + "; ".join(parts) + ". Resume with "
        "the config the checkpoint was trained with (config.yaml in its run folder), or start a new run from its "
        f"weights with train.init_weights={path}"
    )


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def write_checkpoint(payload: dict[str, Any], directory: Path, *, step: int, keep_last: int) -> Path:
    """Write ``payload`` atomically as ``directory/step-XXXXXXXX.pt``, keeping the last ``keep_last`` files.

    Temporary files a killed process left behind (``.step-*.tmp``: only rank 0 writes here) are removed.
    """
    path = atomic_write(directory / f"step-{step:08d}.pt", lambda p: torch.save(payload, p))
    for old in sorted(directory.glob("step-*.pt"))[:-keep_last]:
        old.unlink(missing_ok=True)
    for stale in directory.glob(".step-*.tmp"):
        stale.unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint's payload; refuses, naming the file and what it is, files that are not one (weights-only
    exports, other tools' checkpoints, pickles that need code, empty, text or truncated files)."""
    if path.is_dir():
        latest = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        example = f" such as {latest}" if latest else ""
        raise ValueError(
            f"--resume {path} is a folder: give a checkpoint file{example} (checkpoints/step-*.pt of a run), or "
            "--resume auto to continue the run in train.output_dir"
        )
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint file {path}")
    what = describe_file(path)
    if what.startswith("a safetensors file"):
        raise ValueError(
            f"--resume {path} is not a detrkit training checkpoint: it is {what} (a weights-only export such as a "
            "run's model/ or best/), without the optimizer and training state a resume needs. Resume from a "
            f"run's checkpoints/step-*.pt, or start a new run from these weights with train.init_weights={path.parent}"
        )
    if not what.startswith(("a zip archive", "a Python pickle")):  # empty, text, truncated, ...
        raise ValueError(f"--resume {path} is not a detrkit training checkpoint: it is {what}")
    try:
        ckpt = torch_load_tensors(path)
    except ValueError as e:  # a pickle that needs code, a damaged archive: the message names the file
        raise ValueError(f"--resume: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = f"a dict with keys {_keys(ckpt)}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise ValueError(
            f"--resume {path} is not a detrkit training checkpoint (it holds {found}, without "
            f"'format': '{CHECKPOINT_FORMAT}'); use train.init_weights={path} to start a new run from weights"
        )
    version = ckpt.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ValueError(
            f"--resume {path} is a detrkit training checkpoint of version {version!r}; this detrkit reads versions "
            f"up to {CHECKPOINT_VERSION}: upgrade detrkit"
        )
    problems = [
        f"'{k}' is {type(ckpt.get(k)).__name__}, not {t.__name__}"
        for k, t in _ENTRIES.items()
        if not isinstance(ckpt.get(k), t)
    ]
    if ckpt.get("ema") is not None and not isinstance(ckpt["ema"], dict):
        problems.append(f"'ema' is {type(ckpt['ema']).__name__}, not dict or None")
    if isinstance(ckpt.get("state"), dict):
        known = {f.name for f in dataclasses.fields(TrainState)}
        problems += [f"'state' has the unknown field {k!r}" for k in ckpt["state"] if k not in known]
    if isinstance(ckpt.get("model"), dict):
        problems += [
            f"'model' holds a {type(v).__name__} at {k!r}" for k, v in ckpt["model"].items() if not _tensor(v)
        ][:3]
    if problems:
        raise ValueError(f"--resume {path} is a damaged detrkit training checkpoint: {'; '.join(problems)}")
    return ckpt


def _tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _keys(d: dict[Any, Any], n: int = 6) -> str:
    keys = [repr(k) for k in d]
    return ", ".join(keys[:n]) + (", …" if len(keys) > n else "") if keys else "(none)"


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("step-*.pt"))
    return found[-1] if found else None
