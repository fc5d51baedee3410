"""The training step alone: ``train_step`` is a function of its arguments, with no file I/O and no logging."""

from __future__ import annotations

import builtins
import logging
import os

import pytest
import torch
from conftest import tiny_model

from detrkit.config import RunConfig
from detrkit.data import collate
from detrkit.engine import build_criterion, train_step

NO_DROPOUT = dict(trainable_stages=5, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def _samples(n: int = 2, boxes: int = 2):
    """``n`` float64 images of one size with ``boxes`` boxes each: every micro-batch then normalises its loss by
    the same box count and class-weight total, so the mean of their losses is the loss of their concatenation."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        image = torch.randn(3, 64, 64, generator=g, dtype=torch.float64)
        target = {
            "boxes": torch.rand(boxes, 4, generator=g, dtype=torch.float64) * 0.4 + 0.3,
            "labels": torch.randint(0, 3, (boxes,), generator=g),
            "image_id": i,
        }
        target["orig_size"] = target["size"] = torch.tensor([64, 64])
        out.append((image, target))
    return out


def _setup(optimizer: str = "sgd"):
    model = tiny_model(**NO_DROPOUT).double().train()
    criterion = build_criterion(RunConfig(model=model.config), model.config.num_classes).train()
    if optimizer == "sgd":  # the update is a multiple of the gradient: no Adam normalisation to amplify rounding
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, criterion, opt, scaler


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _NaNLoss(torch.nn.Module):
    """A criterion whose ``loss`` is NaN on the calls listed in ``bad`` (1-based)."""

    def __init__(self, inner: torch.nn.Module, bad: set[int]) -> None:
        super().__init__()
        self.inner, self.bad, self.calls = inner, bad, 0

    def forward(self, outputs, targets):
        self.calls += 1
        losses = self.inner(outputs, targets)
        if self.calls in self.bad:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


def test_accumulating_two_micro_batches_equals_one_step_on_their_concatenation():
    samples = _samples()
    results, weights = [], []
    for batches in ([collate(samples)], [collate(samples[:1]), collate(samples[1:])]):
        model, criterion, opt, scaler = _setup()
        before = _weights(model)
        results.append(train_step(batches, model=model, criterion=criterion, optimizer=opt, scaler=scaler))
        weights.append(_weights(model))
    whole, accumulated = results
    assert whole.stepped and accumulated.stepped
    assert abs(whole.losses["loss"] - accumulated.losses["loss"]) < 1e-9
    assert abs(whole.grad_norm - accumulated.grad_norm) < 1e-6 * whole.grad_norm
    moved = max((weights[0][k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-1  # the step did something, so the comparison below means something
    # the criterion runs in float32 (``to_float``): the two losses agree to float32 rounding, not float64's
    worst = max((weights[0][k] - weights[1][k]).abs().max().item() for k in before)
    assert worst < 1e-6, worst


def test_accumulation_averages_rather_than_sums():
    """The same micro-batch twice is the same step as once: gradients are divided by the number of micro-batches."""
    sample = _samples(1)
    weights = []
    for batches in ([collate(sample)], [collate(sample), collate(sample)]):
        model, criterion, opt, scaler = _setup()
        train_step(batches, model=model, criterion=criterion, optimizer=opt, scaler=scaler)
        weights.append(_weights(model))
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-9


@pytest.mark.parametrize("bad", [{1}, {2}], ids=["nan-first-micro-batch", "nan-last-micro-batch"])
def test_a_nan_loss_skips_the_update_without_touching_anything(bad, caplog):
    model, criterion, opt, scaler = _setup("adamw")
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5), use_buffers=True
    )
    before, ema_before = _weights(model), _weights(ema)
    samples = _samples()
    caplog.set_level(logging.DEBUG)
    result = train_step(
        [collate(samples[:1]), collate(samples[1:])],
        model=model,
        criterion=_NaNLoss(criterion, bad),
        optimizer=opt,
        scaler=scaler,
        ema=ema,
        clip_max_norm=0.1,
    )
    assert not result.stepped
    assert result.losses["loss"] != result.losses["loss"]  # NaN: the mean includes the poisoned micro-batch
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    assert all(torch.equal(ema_before[k], v) for k, v in _weights(ema).items())
    assert not opt.state  # AdamW never stepped: no moments, no step count
    assert all(p.grad is None for p in model.parameters())  # the good micro-batch's gradients are dropped
    assert not caplog.records  # reporting a skipped update is the loop's business

    # the same objects then train normally: nothing was left half-done
    good = train_step([collate(samples)], model=model, criterion=criterion, optimizer=opt, scaler=scaler, ema=ema)
    assert good.stepped and any(not torch.equal(before[k], v) for k, v in _weights(model).items())


def test_train_step_writes_no_file_and_logs_nothing(tmp_path, monkeypatch, caplog):
    model, criterion, opt, scaler = _setup("adamw")
    ema = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    writes: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            writes.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    def spy_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            writes.append(str(path))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    caplog.set_level(logging.DEBUG)
    samples = _samples()
    for _ in range(2):
        result = train_step(
            [collate(samples[:1]), collate(samples[1:])],
            model=model,
            criterion=criterion,
            optimizer=opt,
            scaler=scaler,
            ema=ema,
            clip_max_norm=0.1,
            amp="bf16",
        )
        assert result.stepped
    assert writes == []
    assert list(tmp_path.iterdir()) == []
    assert not caplog.records


def test_bf16_training_warns_where_the_cpu_emulates_it(monkeypatch):
    """``train.amp=bf16`` on a CPU without native bf16 runs, slower than float32: the engine says so."""
    import warnings

    from detrkit.config import TrainConfig
    from detrkit.engine.builders import build_scaler
    from detrkit.models import base

    monkeypatch.setattr(base, "cpu_bf16", lambda: (False, "Test CPU (avx2; bf16 flags: none)"))
    with pytest.warns(UserWarning, match="Test CPU .* is emulated"):
        build_scaler(TrainConfig(amp="bf16"), torch.device("cpu"))
    monkeypatch.setattr(base, "cpu_bf16", lambda: (True, "Test CPU (avx512; bf16 flags: avx512_bf16)"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not build_scaler(TrainConfig(amp="bf16"), torch.device("cpu")).is_enabled()
        build_scaler(TrainConfig(amp="none"), torch.device("cpu"))
