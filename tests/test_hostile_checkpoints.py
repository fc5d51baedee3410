"""Hostile and broken checkpoints: every bad file given to ``--resume`` or ``detrkit.load`` is refused in a sentence
naming the file and what is wrong with it (never a traceback, never code from a pickle run); run folders and
training checkpoints load; ``optimize_for_inference(compile=True)``; what a run writes to disk.

Each case asserts its outcome class: the error type and a message naming the file and the problem, or the loaded
result.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

import detrkit
from detrkit.config import RunConfig, load_run_config
from detrkit.demo import generate_shapes_dataset
from detrkit.engine import Trainer
from detrkit.engine.checkpoints import load_components, read_checkpoint, write_checkpoint
from detrkit.files import save_pretrained

# The tiny DETR of test_engine.py, on the demo preset's data settings.
TINY_MODEL = [
    "model.arch=detr",
    "model.box_refine=false",  # the demo preset refines boxes (Deformable DETR); these tests train plain DETR
    "model.class_loss=softmax",
    "loss.cost_class=1",
    "loss.weight_ce=1",
    "model.backbone=resnet18",
    "model.trainable_stages=5",
    "model.hidden_dim=32",
    "model.num_heads=4",
    "model.enc_layers=1",
    "model.dec_layers=2",
    "model.ffn_dim=64",
    "model.num_queries=6",
]


def overrides(shapes: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        *(f"data.{k}={v}" for k, v in shapes.items()),
        "data.train_scales=[48]",
        "data.train_max_size=64",
        "data.random_crop=false",
        "data.eval_size=48",
        "data.eval_max_size=64",
        "data.num_workers=0",
        *TINY_MODEL,
        f"train.output_dir={out}",
        "train.epochs=1",
        "train.batch_size=2",
        "train.lr=1e-3",
        "train.lr_backbone=1e-3",
        "train.log_every=1",
        "train.report=false",  # report.html and query statistics are test_report.py's
        "train.query_stats_images=0",
        *extra,
    ]


def config(shapes, out, *extra) -> RunConfig:
    return load_run_config("demo", overrides(shapes, out, *extra))


class _Malicious:
    """Unpickling this runs ``touch <marker>``: a stand-in for any code a hostile checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def detrkit_log():
    """The ``detrkit`` logger's records (caplog misses them once the CLI turned propagation off)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("detrkit")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=2, min_side=48, max_side=64)


@pytest.fixture(scope="module")
def run(shapes, tmp_path_factory) -> Path:
    """A completed tiny run with EMA: ``model/``, ``best/`` (the last evaluation is the best) and a checkpoint."""
    out = tmp_path_factory.mktemp("run") / "run"
    Trainer(config(shapes, out, "train.ema=true", "train.ema_decay=0.5")).fit()
    return out


@pytest.fixture(scope="module")
def checkpoint(run) -> Path:
    return sorted((run / "checkpoints").glob("step-*.pt"))[-1]


@pytest.fixture(scope="module")
def other_checkpoints(shapes, tmp_path_factory) -> dict[str, Path]:
    """Training checkpoints of other models (written before any step): another architecture, another width."""
    root = tmp_path_factory.mktemp("other")
    deformable = [o for o in overrides(shapes, root / "deformable") if not o.startswith(("model.arch", "model.class"))]
    runs = {
        "deformable_detr": load_run_config("demo", [*deformable, "model.num_feature_levels=1"]),
        "hidden_dim_64": config(shapes, root / "wide", "model.hidden_dim=64"),
    }
    found = {}
    for name, cfg in runs.items():
        found[name] = Trainer(cfg).save_checkpoint()
    return found


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "model"
    tiny_model().save_pretrained(path)
    return path


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _resume(shapes, tmp_path: Path, path: Path) -> Trainer:
    return Trainer(config(shapes, tmp_path / "new-run"), resume=str(path))


# -- --resume with files that are not a detrkit training checkpoint -------------------------------------------------
def test_resume_refuses_a_pickle_that_runs_code(shapes, tmp_path):
    marker, bad = tmp_path / "PWNED", tmp_path / "evil.pt"
    torch.save({"format": "detrkit-train", "model": _Malicious(marker)}, bad)
    with pytest.raises(
        ValueError, match=r"refusing to load .*evil\.pt: unpickling it needs the Python global \w+\.system"
    ):
        _resume(shapes, tmp_path, bad)
    assert not marker.exists()


def test_resume_refuses_a_text_file(shapes, tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("step 1000: loss 0.3\n")
    with pytest.raises(
        ValueError, match=r"notes\.pt is not a detrkit training checkpoint: .* a text file .*'step 1000"
    ):
        _resume(shapes, tmp_path, bad)


def test_resume_refuses_a_truncated_checkpoint(shapes, checkpoint, tmp_path):
    bad = tmp_path / "step-00000004.pt"
    bad.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"step-00000004\.pt is not a detrkit training checkpoint: .*truncated"):
        _resume(shapes, tmp_path, bad)


def test_resume_refuses_an_empty_file(shapes, tmp_path):
    bad = tmp_path / "empty.pt"
    bad.touch()
    with pytest.raises(
        ValueError, match=r"empty\.pt is not a detrkit training checkpoint: .*an empty file \(0 bytes\)"
    ):
        _resume(shapes, tmp_path, bad)


def test_resume_refuses_a_safetensors_export(shapes, run, tmp_path):
    weights = run / "model" / "model.safetensors"
    with pytest.raises(
        ValueError, match=r"model\.safetensors is not a detrkit training checkpoint: it is a safetensors"
    ):
        _resume(shapes, tmp_path, weights)
    with pytest.raises(ValueError, match=r"train\.init_weights="):
        _resume(shapes, tmp_path, weights)


def test_resume_refuses_another_tools_checkpoint(shapes, tmp_path):
    bad = tmp_path / "official.pth"
    torch.save({"model": {"backbone.0.body.conv1.weight": torch.zeros(1)}}, bad)
    with pytest.raises(
        ValueError, match=r"official\.pth is not a detrkit training checkpoint \(it holds a dict with keys"
    ):
        _resume(shapes, tmp_path, bad)


def test_resume_refuses_a_folder(shapes, run, tmp_path):
    with pytest.raises(ValueError, match=r"is a folder: give a checkpoint file such as .*step-\d+\.pt"):
        _resume(shapes, tmp_path, run)


def test_resume_refuses_another_architecture(shapes, other_checkpoints, tmp_path):
    path = other_checkpoints["deformable_detr"]
    with pytest.raises(ValueError, match=rf"{re.escape(path.name)}.*deformable_detr.*detr"):
        _resume(shapes, tmp_path, path)


def test_resume_refuses_another_width(shapes, other_checkpoints, tmp_path):
    path = other_checkpoints["hidden_dim_64"]
    with pytest.raises(ValueError, match=rf"{re.escape(path.name)}.*hidden_dim 64.*32"):
        _resume(shapes, tmp_path, path)


def test_checkpoint_weights_that_do_not_fit_name_config_and_shapes(shapes, other_checkpoints):
    """``load_components`` alone (whatever the trainer checks before it): fields, then keys with both shapes."""
    path = other_checkpoints["hidden_dim_64"]
    model = detrkit.build(**{**tiny_model().config.to_dict(), "num_queries": 6})
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(
        ValueError, match=r"hidden_dim 64 \(checkpoint\) vs 32 \(this run\).* shapes differ .*\(64,.*\(32,"
    ):
        load_components(
            read_checkpoint(path),
            path,
            model=model,
            optimizer=optimizer,
            scaler=torch.amp.GradScaler(enabled=False),
            ema=None,
        )


def test_cli_resume_with_a_malicious_pickle_is_one_clear_line(shapes, tmp_path, capsys):
    from detrkit.cli import main

    marker, bad = tmp_path / "PWNED", tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"model": _Malicious(marker)}))  # pickle.dump's own format, protocol 4
    # in this process (main() is what `python -m detrkit` runs; an exception it let through would fail the test
    # here instead of printing a traceback): main() installs its stderr handler, put the logger back after
    logger = logging.getLogger("detrkit")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        code = main(["train", "demo", *overrides(shapes, tmp_path / "r"), "--resume", str(bad)])
    finally:
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert re.search(r"refusing to load .*evil\.pt: unpickling it needs the Python global \w+\.system", stderr)
    assert "Traceback" not in stderr and "weights_only=False" not in stderr
    assert not marker.exists()


# -- detrkit.load with broken folders and files ---------------------------------------------------------------------
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_load_refuses_a_pickle_that_runs_code(tmp_path, how):
    marker, bad = tmp_path / "PWNED", tmp_path / "detr-r50.pth"
    payload = {"model": {"x": torch.zeros(1)}, "args": _Malicious(marker)}
    torch.save(payload, bad) if how == "torch.save" else bad.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=r"refusing to load .*detr-r50\.pth: unpickling it needs .*\.system"):
        detrkit.load(bad)
    assert not marker.exists()


def test_load_a_truncated_safetensors(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(
        ValueError, match=r"model\.safetensors as safetensors weights: it is a truncated safetensors file"
    ):
        detrkit.load(bad)


def test_load_a_config_that_is_not_json(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    (bad / "config.json").write_text('{"format": "detrkit", "model": {"arch": "detr",,}}')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON: .* at line 1, column \d+"):
        detrkit.load(bad)


def test_load_a_config_without_model(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    (bad / "config.json").write_text(json.dumps({"format": "detrkit", "format_version": 1}))
    with pytest.raises(ValueError, match=r"config\.json has no model config"):
        detrkit.load(bad)


def test_load_a_config_with_wrong_types(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    meta = json.loads((bad / "config.json").read_text())
    meta["model"]["hidden_dim"] = "thirty-two"
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config\.json: invalid model config: model\.hidden_dim must be an integer"):
        detrkit.load(bad)


def test_load_weights_that_disagree_with_config(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    meta = json.loads((bad / "config.json").read_text())
    meta["model"]["num_queries"] = 10
    (bad / "config.json").write_text(json.dumps(meta))
    pattern = r"model\.safetensors and .*config\.json do not describe the same model: 1 shapes differ \(query_embed"
    with pytest.raises(ValueError, match=pattern + r"\.weight \(8, 32\) in the weights, \(10, 32\) in the config"):
        detrkit.load(bad)


def test_load_a_folder_without_weights(folder, tmp_path):
    bad = _copy(folder, tmp_path)
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has a detrkit config\.json but no model\.safetensors"):
        detrkit.load(bad)


def test_load_a_text_file(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_text("<html>404 Not Found</html>")
    with pytest.raises(ValueError, match=r"cannot read .*weights\.pth as a torch checkpoint: it is a text file"):
        detrkit.load(bad)


# -- detrkit.load with what `detrkit train` writes ------------------------------------------------------------------
def test_load_a_run_folder_loads_its_final_model(run, detrkit_log):
    model = detrkit.load(run)
    assert any("training run folder: loading its final model" in r.getMessage() for r in detrkit_log)
    final = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    assert len(model.predict(torch.rand(3, 40, 50), threshold=0.0, top_k=2)) == 2


def test_load_an_unfinished_run_folder_lists_what_there_is(run, tmp_path):
    unfinished = Path(shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("model")))
    with pytest.raises(ValueError, match=r"training run folder without model/ .*: load one of .*best .*step-\d+\.pt"):
        detrkit.load(unfinished)


def test_load_a_training_checkpoint_takes_its_ema_weights(checkpoint, detrkit_log):
    model = detrkit.load(checkpoint)
    assert any("loading its EMA weights" in r.getMessage() for r in detrkit_log)
    ckpt = torch.load(checkpoint, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["ema"][f"module.{k}"]), k
    assert any(not torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())  # EMA ≠ trained


def test_load_a_training_checkpoint_without_ema(other_checkpoints):
    model = detrkit.load(other_checkpoints["hidden_dim_64"])
    assert model.config.hidden_dim == 64 and model.config.arch == "detr"


# -- optimize_for_inference(compile=True) ---------------------------------------------------------------------------
def test_compiled_model_keeps_eval_state_dict_and_predict(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # fast: no codegen
    model = tiny_model().optimize_for_inference(compile=True)
    plain = tiny_model().optimize_for_inference()
    assert model.state_dict().keys() == plain.state_dict().keys()  # no RecursionError, no compiled copy inside
    assert model.eval() is model
    assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in model.modules())
    image = torch.rand(3, 50, 70)
    dets, ref = model.predict(image, threshold=0.0, top_k=3), plain.predict(image, threshold=0.0, top_k=3)
    torch.testing.assert_close(dets.boxes, ref.boxes)


# -- what a run writes to disk --------------------------------------------------------------------------------------
def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def test_a_run_writes_each_tensor_once(run, checkpoint):
    """The checkpoint holds the weights, the EMA's and AdamW's two moments per trainable weight, and nothing twice;
    ``model/`` is ``best/`` hard-linked when they are identical."""
    ckpt = torch.load(checkpoint, weights_only=True)
    weights, trainable = _nbytes(ckpt["model"]), _nbytes([p for p in tiny_model().parameters()])
    moments = _nbytes([(s["exp_avg"], s["exp_avg_sq"]) for s in ckpt["optimizer"]["state"].values()])
    assert moments <= 2 * weights and _nbytes(ckpt["ema"]) <= weights + 64
    assert moments >= 2 * trainable * 0.5  # the moments exist (trainable_stages=5: nearly every weight)
    assert checkpoint.stat().st_size <= _nbytes(ckpt) * 1.01 + 200_000  # no hidden copies beyond the tensors
    assert os.path.samefile(run / "model" / "model.safetensors", run / "best" / "model.safetensors")
    assert os.path.samefile(run / "model" / "config.json", run / "best" / "config.json")
    inodes = {(p.stat().st_dev, p.stat().st_ino): p.stat().st_size for p in run.rglob("*") if p.is_file()}
    export = (run / "model" / "model.safetensors").stat().st_size
    assert sum(inodes.values()) <= checkpoint.stat().st_size + export + 1_000_000
    assert not list(run.rglob("*.tmp"))


def test_exports_link_only_identical_files_and_copy_without_hard_links(tmp_path, monkeypatch):
    a, b = tiny_model(), tiny_model(num_queries=5)
    best = save_pretrained(a, tmp_path / "best")
    save_pretrained(a, tmp_path / "model", same_as=best)
    assert os.path.samefile(tmp_path / "model" / "model.safetensors", best / "model.safetensors")
    save_pretrained(b, tmp_path / "other", same_as=best)  # different weights: written, not linked
    assert not os.path.samefile(tmp_path / "other" / "model.safetensors", best / "model.safetensors")
    save_pretrained(b, best)  # rewriting best/ replaces its files: model/ keeps the weights it had
    assert detrkit.load(tmp_path / "model").config.num_queries == 8
    assert detrkit.load(best).config.num_queries == 5

    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    save_pretrained(b, tmp_path / "copied", same_as=best)  # a file system without hard links: a copy
    copied = tmp_path / "copied" / "model.safetensors"
    assert not os.path.samefile(copied, best / "model.safetensors")
    assert copied.read_bytes() == (best / "model.safetensors").read_bytes()


def test_checkpoint_writer_removes_temporaries_a_crash_left(tmp_path):
    stale = tmp_path / ".step-00000003.pt.k2j4.tmp"
    stale.write_bytes(b"half a checkpoint")
    write_checkpoint({"format": "detrkit-train"}, tmp_path, step=4, keep_last=2)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000004.pt"]
