"""One optimizer update, as a function: ``train_step(batches, ...) -> StepResult``.

It runs forward, loss and backward over the micro-batches of one update (gradient accumulation), agrees with the
other processes on whether every loss was finite, then unscales, clips, steps the optimizer (through the fp16
scaler) and updates the EMA. It reads no config, keeps no state of its own, writes no file and logs nothing: the
loop (``loop.py``) decides what a skipped update means, and listeners report it.

Layer: engine. Imports: torch, ``distributed``, ``data.Batch``, the matcher's error type, ``models.base.to_float`` and
``evaluation.amp_context``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed as dist
from ..data import Batch
from ..evaluation import amp_context
from ..matcher import NonFiniteCostError
from ..models.base import to_float


@dataclass
class StepResult:
    losses: dict[str, float]  # each scalar the criterion returned, averaged over the micro-batches
    grad_norm: float  # total gradient norm before clipping; NaN when the update was skipped before unscaling
    stepped: bool  # whether the optimizer changed the weights


def train_step(
    batches: Sequence[Batch],
    *,
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    clip_max_norm: float = 0.0,
    amp: str = "none",
) -> StepResult:
    """One update from the micro-batches ``batches`` (their mean gradient; one micro-batch without accumulation).

    ``model`` may be wrapped in ``DistributedDataParallel``: gradients are then synchronised on the last
    micro-batch only. A non-finite loss on any process (or a matching cost the matcher cannot use) skips the update
    on every process, leaving weights, optimizer state and EMA untouched; gradients are cleared either way.
    """
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    device = next(module.parameters()).device
    per_batch: list[dict[str, float]] = []
    poisoned = False
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = last or not isinstance(model, nn.parallel.DistributedDataParallel)
        with nullcontext() if sync else model.no_sync():
            losses = _losses(model, criterion, batch.to(device), amp)
            loss = losses["loss"]
            if _all_finite(loss):  # every process must agree, or DDP would wait forever
                scaler.scale(loss / len(batches)).backward()
            else:
                poisoned = True
        per_batch.append({k: float(v.detach()) for k, v in losses.items() if v.dim() == 0})
    stepped, grad_norm = False, math.nan
    if not poisoned:
        stepped, grad_norm = _update(module, optimizer, scaler, clip_max_norm)
    optimizer.zero_grad(set_to_none=True)
    if stepped and ema is not None:
        ema.update_parameters(module)
    return StepResult(losses=_mean(per_batch), grad_norm=grad_norm, stepped=stepped)


def _losses(model: nn.Module, criterion: nn.Module, batch: Batch, amp: str) -> dict[str, torch.Tensor]:
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    # denoising queries are noised copies of the targets (models/denoising.py): only such models take them
    kwargs = {"targets": batch.targets} if getattr(module, "trains_with_targets", False) else {}
    with amp_context(batch.pixel_values.device, amp):
        outputs = model(batch.pixel_values, batch.padding_mask, **kwargs)
    try:
        return criterion(to_float(outputs), batch.targets)
    except NonFiniteCostError:  # NaN/inf predictions: the matcher cannot run; skip like a NaN loss
        return {"loss": torch.tensor(float("nan"), device=batch.pixel_values.device)}


def _update(
    module: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip_max_norm: float
) -> tuple[bool, float]:
    """Unscale, clip and step; returns (stepped, gradient norm before clipping)."""
    scaler.unscale_(optimizer)
    params = [p for p in module.parameters() if p.grad is not None]
    if clip_max_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_max_norm))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    if not (math.isfinite(grad_norm) or scaler.is_enabled()):
        return False, grad_norm
    scaler.step(optimizer)  # with fp16 the scaler skips non-finite steps itself
    scaler.update()
    return math.isfinite(grad_norm), grad_norm


def _all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process."""
    flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
    if dist.is_distributed():
        torch.distributed.all_reduce(flag)
    return bool(flag.item() == 0)


def _mean(per_batch: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for losses in per_batch for k in losses)  # a skipped micro-batch has only "loss" (NaN)
    return {k: sum(losses.get(k, math.nan) for losses in per_batch) / len(per_batch) for k in keys}
