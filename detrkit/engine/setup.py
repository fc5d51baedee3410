"""Everything a training run changes outside itself, in one call at the program's entry point.

``setup_run(config.train)`` joins the process group under ``torchrun``, picks the device, turns on deterministic
algorithms (and the cuBLAS workspace they need) for ``train.deterministic`` and seeds the global generators. The
CLI's ``train`` command, ``demo.py`` and tests call it before building a ``Trainer``; no constructor does.

The trainer does not depend on these seeds for reproducibility: it runs on its own random stream, seeded from
``train.seed`` (``state.run_rng``). The global seeds make what the caller does around it (building a model to
pass in, for instance) reproducible too.

Layer: engine. Imports: config, ``distributed`` and ``state``.
"""

from __future__ import annotations

import os

import torch

from .. import distributed as dist
from ..config import TrainConfig
from .state import seed_everything


def setup_run(train: TrainConfig) -> torch.device:
    """Set up the process for ``train``; returns the device this process trains on."""
    try:
        device = dist.init_from_env(train.device)
    except ValueError as e:
        raise ValueError(f"train.device={train.device}: {e}") from e
    if train.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS for determinism
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(train.seed)
    return device


def default_device(train: TrainConfig) -> torch.device:
    """The device ``setup_run`` picks, without changing anything (a ``Trainer`` built without a device)."""
    if dist.launched_by_torchrun() and not dist.is_distributed():
        raise RuntimeError(
            "launched by torchrun but no process group: call detrkit.engine.setup_run(config.train) first and pass "
            "its device to Trainer"
        )
    try:
        device = dist.resolve_device(train.device)
    except ValueError as e:
        raise ValueError(f"train.device={train.device}: {e}") from e
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
