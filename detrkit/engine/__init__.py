"""The training engine shared by every architecture: a pure training step, the loop around it, and listeners.

- ``step.py``: ``train_step`` (one optimizer update, no I/O) and ``StepResult``.
- ``loop.py``: ``Trainer`` (epochs, state, learning rate, divergence policy) and ``TrainingDiverged``.
- ``listeners.py``: logs, TensorBoard, checkpoints, evaluation, curves, signals.
- ``setup.py``: ``setup_run``, everything global (process group, determinism, seeds), called at entry points.
- ``builders.py``, ``sampling.py``, ``schedule.py``, ``state.py``, ``checkpoints.py``: the parts.

The engine knows nothing about architectures: it builds the model with ``checkpoint.build`` and reads outputs
only through the criterion and ``Detector.postprocess``.

Layer: engine. May import config, the building blocks, models, io (``checkpoint``) and ``evaluation``; never
``cli``.
"""

from __future__ import annotations

from .builders import (
    build_criterion,
    build_datasets,
    build_train_dataset,
    build_val_dataset,
    model_config_for_data,
)
from .checkpoints import CHECKPOINT_FORMAT
from .listeners import Listener, default_listeners
from .loop import Trainer, TrainingDiverged
from .sampling import EpochSampler, SeededDataset
from .schedule import lr_factor, param_groups
from .setup import setup_run
from .state import TrainState
from .step import StepResult, train_step

__all__ = [
    "CHECKPOINT_FORMAT",
    "EpochSampler",
    "Listener",
    "SeededDataset",
    "StepResult",
    "TrainState",
    "Trainer",
    "TrainingDiverged",
    "build_criterion",
    "build_datasets",
    "build_train_dataset",
    "build_val_dataset",
    "default_listeners",
    "lr_factor",
    "model_config_for_data",
    "param_groups",
    "setup_run",
    "train_step",
]
