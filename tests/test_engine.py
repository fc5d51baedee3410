"""Training engine: run directory, resume after SIGKILL, signals, non-finite losses, EMA/AMP, fine-tuning, global state.

The training step alone is tested in ``test_train_step.py``.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from detrkit.config import RunConfig, load_run_config
from detrkit.demo import generate_shapes_dataset
from detrkit.engine import Trainer, TrainingDiverged, setup_run
from detrkit.evaluation import COCO_METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]

# A tiny DETR on the demo preset's data settings (the demo itself trains another architecture).
TINY_MODEL = [
    "model.arch=detr",
    "model.box_refine=false",  # the demo preset refines boxes (Deformable DETR); these tests train plain DETR
    "model.class_loss=softmax",
    "loss.cost_class=1",
    "loss.weight_ce=1",
    "model.backbone=resnet18",
    "model.trainable_stages=5",
    "model.hidden_dim=32",
    "model.nheads=4",
    "model.enc_layers=1",
    "model.dec_layers=2",
    "model.dim_feedforward=64",
    "model.num_queries=6",
    "model.dropout=0.1",
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=4, min_side=48, max_side=64)


# report.html and query_stats.json cost a tiny run more than its training: off unless a test is about them
# (test_report.py) or about every listener (LISTENERS_ON).
LISTENERS_ON = ("train.report=true", "train.query_stats_images=32")
# No validation set: no evaluation, and none of the last evaluation's analysis plots (seconds of matplotlib), for
# tests whose assertions do not involve evaluation.
NO_EVAL = "data.val_annotations=null"


def tiny_overrides(shapes: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        *(f"data.{k}={v}" for k, v in shapes.items()),
        "data.train_scales=[48,64]",
        "data.train_max_size=80",
        "data.crop_resize=[48]",
        "data.crop_size=[32,48]",
        "data.eval_size=64",
        "data.eval_max_size=80",
        "data.num_workers=0",
        *TINY_MODEL,
        f"train.output_dir={out}",
        "train.epochs=2",
        "train.batch_size=2",
        "train.lr=1e-3",
        "train.lr_backbone=1e-3",
        "train.log_every=1",
        "train.report=false",
        "train.query_stats_images=0",
        *extra,
    ]


def tiny_config(shapes, out, *extra) -> RunConfig:
    return load_run_config("demo", tiny_overrides(shapes, out, *extra))


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def test_run_directory(shapes, tmp_path):
    run = tmp_path / "run"
    metrics = Trainer(tiny_config(shapes, run, "train.keep_last=2", "train.checkpoint_every_steps=1")).fit()
    assert set(metrics) == set(COCO_METRIC_KEYS)
    written = json.loads((run / "metrics.json").read_text())
    assert written.keys() == {*COCO_METRIC_KEYS, "per_class", "pr_curves", "errors"}  # errors: after the last epoch
    assert set(written["errors"]["overall"]["dAP50"]) == {"cls", "loc", "both", "dupe", "bkg", "miss"}
    assert all((run / name).stat().st_size > 1000 for name in ("pr_curves.png", "errors.png", "confusion.png"))
    assert load_run_config(run / "config.yaml").model.num_classes == 3  # derived from the data
    assert len(list((run / "checkpoints").glob("step-*.pt"))) == 2  # keep_last
    for name in ("model", "best"):
        assert (run / name / "config.json").is_file() and (run / name / "model.safetensors").is_file()
    assert (run / "curves.png").stat().st_size > 1000
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert len(epochs) == 2 and "AP" in epochs[-1] and "train_loss" in epochs[-1]
    assert all(k in steps[0] for k in ("loss", "loss_ce", "loss_bbox", "loss_giou", "lr", "images_per_s"))
    ckpt = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)  # loads safely
    assert ckpt["state"]["global_step"] == 8 and ckpt["config"]["model"]["num_classes"] == 3


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "detrkit", *args]


def _wait_for_step(log: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file():
            for line in log.read_text().splitlines():
                if (
                    line.endswith("}")
                    and json.loads(line).get("step", 0) >= step
                    and json.loads(line)["type"] == "step"
                ):
                    return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.stderr.read()}")
        time.sleep(0.005)
    raise AssertionError("timed out waiting for training to progress")


def test_resume_after_sigkill_matches_uninterrupted_run(shapes, tmp_path):
    # query statistics on: they draw nothing from the run's random stream, so resuming holds with them recording
    extra = ("train.deterministic=true", "train.epochs=3", LISTENERS_ON[1], NO_EVAL)
    # the uninterrupted run writes checkpoints at epoch ends only (134 MB each, weights and AdamW moments): writing
    # them changes nothing in training, which this comparison would show too
    Trainer(tiny_config(shapes, tmp_path / "a", *extra)).fit()

    run_b = tmp_path / "b"
    cmd = _cli("train", "demo", *tiny_overrides(shapes, run_b, *extra, "train.checkpoint_every_steps=1"))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_b / "log.jsonl", 6, proc)  # mid-epoch 2 (4 steps per epoch)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_b / "model").exists()
    resumed = subprocess.run(cmd + ["--resume", "auto"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    logged = [json.loads(line) for line in (run_b / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["type"] == "step"] == list(range(1, 13))  # each step once
    a, b = final_weights(tmp_path / "a"), final_weights(run_b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_saves_a_resumable_checkpoint(shapes, tmp_path):
    run = tmp_path / "run"
    cmd = _cli("train", "demo", *tiny_overrides(shapes, run, "train.epochs=50"))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run / "log.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by signal" in err
    ckpts = sorted((run / "checkpoints").glob("step-*.pt"))
    assert ckpts
    state = torch.load(ckpts[-1], weights_only=True)["state"]
    assert state["global_step"] >= 2


class _Poisoned(torch.nn.Module):
    """Wraps a criterion so that chosen calls return a NaN loss."""

    def __init__(self, inner, bad_calls):
        super().__init__()
        self.inner, self.bad_calls, self.calls = inner, set(bad_calls), 0

    def forward(self, outputs, targets):
        self.calls += 1
        losses = self.inner(outputs, targets)
        if self.calls in self.bad_calls or "all" in self.bad_calls:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


def test_nonfinite_losses_are_skipped_then_stop_training(shapes, tmp_path):
    trainer = Trainer(tiny_config(shapes, tmp_path / "a", "train.epochs=1", NO_EVAL))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.criterion = _Poisoned(trainer.criterion, {1})
    trainer.fit()
    assert trainer.state.nonfinite_total == 1 and trainer.state.global_step == 4
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())

    run = tmp_path / "b"
    trainer = Trainer(tiny_config(shapes, run, "train.epochs=3", "train.max_nonfinite_steps=3"))
    trainer.criterion = _Poisoned(trainer.criterion, set(range(5, 100)))  # epoch 1 trains, then NaN for ever
    with pytest.raises(TrainingDiverged, match="learning rate"):
        trainer.fit()
    ckpts = sorted((run / "checkpoints").glob("step-*.pt"))
    assert [p.name for p in ckpts] == ["step-00000004.pt"]  # the last good checkpoint, intact
    assert torch.load(ckpts[0], weights_only=True)["state"]["nonfinite_total"] == 0


def test_tensorboard_logs(shapes, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(shapes, run, "train.tensorboard=true", "train.epochs=1", "train.max_steps_per_epoch=2")).fit()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.gpu
def test_fp16_with_loss_scaling_on_gpu(shapes, tmp_path):
    trainer = Trainer(tiny_config(shapes, tmp_path / "run", "train.device=cuda", "train.amp=fp16", "train.epochs=1"))
    assert trainer.scaler.is_enabled()
    trainer.fit()
    assert trainer.state.global_step == 4


def test_fp16_needs_a_gpu(shapes, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Trainer(tiny_config(shapes, tmp_path / "run", "train.amp=fp16", "train.device=cpu"))


def test_ema_bf16_and_accumulation(shapes, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(
        shapes,
        run,
        "train.ema=true",
        "train.ema_decay=0.5",
        "train.amp=bf16",
        "train.grad_accum_steps=2",
        "train.epochs=1",
    )
    trainer = Trainer(cfg)
    trainer.fit()
    assert trainer.state.global_step == 2  # 4 batches, 2 per update
    exported = final_weights(run)
    ema = trainer.ema.module.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    raw = trainer.model.state_dict()
    assert any(not torch.equal(exported[k], raw[k]) for k in exported if exported[k].is_floating_point())


def test_fine_tuning_reinitialises_a_different_class_head(shapes, tmp_path, caplog):
    import detrkit

    src = detrkit.build(
        load_run_config("demo", TINY_MODEL).model.replace(
            num_classes=5, category_ids=(1, 2, 3, 4, 5), class_names=tuple("abcde")
        )
    )
    src.save_pretrained(tmp_path / "src")
    trainer = Trainer(tiny_config(shapes, tmp_path / "run", f"train.init_weights={tmp_path / 'src'}", "train.epochs=1"))
    assert "class head was re-initialised" in caplog.text
    assert trainer.model.class_embed.out_features == 4  # 3 shapes + no-object
    assert torch.equal(trainer.model.query_embed.weight, src.query_embed.weight)


def test_resume_refuses_other_files(shapes, tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"model": {}}, bad)
    with pytest.raises(ValueError, match="not a detrkit training checkpoint"):
        Trainer(tiny_config(shapes, tmp_path / "run"), resume=str(bad))
    with pytest.raises(FileNotFoundError):
        Trainer(tiny_config(shapes, tmp_path / "run"), resume=str(tmp_path / "missing.pt"))


def test_missing_data_paths_are_named(tmp_path):
    cfg = load_run_config("demo", [f"data.train_images={tmp_path}/nope", f"data.train_annotations={tmp_path}/a.json"])
    with pytest.raises(FileNotFoundError, match="nope"):
        Trainer(cfg)


def _global_state() -> tuple:
    return (
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state()[1].copy(),
        torch.are_deterministic_algorithms_enabled(),
    )


def test_trainer_changes_no_global_state_and_ignores_the_global_seed(shapes, tmp_path):
    """The run draws on its own random stream (seeded by train.seed): what the caller's generators hold neither
    changes the weights nor is changed by training. Everything global is ``setup_run``'s."""
    extra = ("train.deterministic=true", "train.epochs=1", "train.max_steps_per_epoch=2")
    weights = []
    for i, caller_seed in enumerate((1, 2)):
        torch.manual_seed(caller_seed)
        before = _global_state()
        # every listener in the first run (evaluation, the report, query statistics); the second compares weights
        # without them
        listeners = LISTENERS_ON if i == 0 else (NO_EVAL,)
        trainer = Trainer(tiny_config(shapes, tmp_path / str(i), *extra, *listeners))
        trainer.fit()
        after = _global_state()
        assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
        assert not before[3] and not after[3]  # train.deterministic is setup_run's to apply
        weights.append(final_weights(tmp_path / str(i)))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # dropout 0.1: the stream matters


def test_setup_run_does_the_global_part(shapes, tmp_path):
    try:
        device = setup_run(tiny_config(shapes, tmp_path, "train.deterministic=true", "train.seed=7").train)
        assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.initial_seed() == 7 and random.random() == random.Random(7).random()
    finally:
        torch.use_deterministic_algorithms(False)


def test_without_listeners_the_trainer_writes_nothing(shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(shapes, run, "train.epochs=1", "train.max_steps_per_epoch=2"), listeners=[])
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.fit() == {}  # evaluation is a listener too
    assert trainer.state.global_step == 2 and trainer.state.epoch == 1
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert list(tmp_path.iterdir()) == []
