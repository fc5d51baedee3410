"""Resumable training checkpoints: ``checkpoints/step-XXXXXXXX.pt`` in the run directory.

A checkpoint is a dict read with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists and dicts: no
code is unpickled): ``format`` ("detrkit-train"), ``version``, ``config`` (the resolved ``RunConfig`` as a dict),
``model``, ``optimizer``, ``scaler`` and ``ema`` (None without EMA) state dicts, ``state`` (``TrainState``'s
fields), ``history`` (the epoch records so far) and ``rng`` (``state.capture_rng``). Weights-only exports for
inference are ``checkpoint.save_pretrained``'s folders, not these.

Layer: engine. Imports: torch, config, ``checkpoint.atomic_write`` (io layer) and ``state``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_write
from ..config import RunConfig
from .state import TrainState, capture_rng

CHECKPOINT_FORMAT = "detrkit-train"
CHECKPOINT_VERSION = 1


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
    """Load a checkpoint's state dicts into the run's components (``read_checkpoint`` checked the file)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        if ckpt["ema"] is None:
            raise ValueError(f"{path} was trained without EMA; resume with train.ema=false")
        ema.load_state_dict(ckpt["ema"])


def write_checkpoint(payload: dict[str, Any], directory: Path, *, step: int, keep_last: int) -> Path:
    """Write ``payload`` atomically as ``directory/step-XXXXXXXX.pt``, keeping the last ``keep_last`` files."""
    path = atomic_write(directory / f"step-{step:08d}.pt", lambda p: torch.save(payload, p))
    for old in sorted(directory.glob("step-*.pt"))[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint's payload; refuses files that are not one (weights-only exports, other tools')."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint file {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a detrkit training checkpoint (use train.init_weights for weights)")
    return ckpt


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("step-*.pt"))
    return found[-1] if found else None
