"""A run's state beyond its weights: the step counters (``TrainState``) and the random stream.

The random stream is the one dropout draws from (data order and augmentation have their own seeds, see
``sampling.py``). A run owns it: ``run_rng`` forks the global generators (torch CPU and CUDA, Python's ``random``,
NumPy), installs the run's states for the duration of a block and gives the caller's back afterwards, so training
is reproducible without leaving global state behind. The states travel in checkpoints as plain lists and tensors
(``capture_rng``), which ``torch.load(weights_only=True)`` reads.

Layer: engine. Imports: torch and NumPy only.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint (``vars(state)``) and restored on resume."""

    epoch: int = 0  # the epoch in progress (0-based)
    batches_done: int = 0  # batches of this epoch already trained on
    global_step: int = 0  # optimizer updates so far
    best_ap: float = -1.0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's ``random`` and NumPy's global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def capture_rng() -> dict[str, Any]:
    """The global generators' states, in the checkpoint's ``"rng"`` format."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": _python_rng_to_list(random.getstate()),
        "numpy": _numpy_rng_to_list(np.random.get_state()),
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the global generators to states from ``capture_rng``."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(_python_rng_from_list(rng["python"]))
    np.random.set_state(_numpy_rng_from_list(rng["numpy"]))


@contextmanager
def run_rng(*, seed: int | None = None, rng: dict[str, Any] | None = None) -> Iterator[None]:
    """Run a block on its own random stream, seeded with ``seed`` or set to ``rng`` (a ``capture_rng`` dict).

    Every global generator is restored on exit, even when the block raises.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                seed_everything(seed)
            if rng is not None:
                restore_rng(rng)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _python_rng_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_list(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _numpy_rng_to_list(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_rng_from_list(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
