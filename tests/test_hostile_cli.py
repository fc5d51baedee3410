"""Hostile inputs to the config, the CLI, the run folder and interrupted runs (issue 14).

Every case asserts its outcome class, a clear error naming the key, option or file (``pytest.raises(...,
match=...)``, or the CLI's exit status 2 with the message on stderr) or a fix-up announced with its count, and the
state it leaves (``log.jsonl`` with each step once, no stale files, no overwritten outputs). Datasets, checkpoints
and weights files have their own corpus modules; the tiny runs here are ``test_engine.py``'s.
"""

from __future__ import annotations

import json
import logging
import math
import re
import urllib.error
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from PIL import Image
from test_engine import NO_EVAL, TINY_MODEL, shapes, tiny_config, tiny_overrides  # noqa: F401 - shapes is a fixture

import detrkit
from detrkit.cli import main
from detrkit.config import load_run_config
from detrkit.engine import Trainer, TrainingDiverged, setup_run
from detrkit.visualize import plot_curves

SHORT = ("train.epochs=1", "train.max_steps_per_epoch=2", NO_EVAL)  # 2 steps, no evaluation: a run in seconds


@pytest.fixture(autouse=True)
def _detrkit_logger():
    """``main()`` installs a stderr handler and stops propagation; put the logger back so caplog sees records."""
    logger = logging.getLogger("detrkit")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def logged_steps(run: Path) -> list[int]:
    return [r["step"] for r in records(run) if r["type"] == "step"]


def checkpoint_steps(run: Path) -> list[int]:
    return [int(p.stem.removeprefix("step-")) for p in sorted((run / "checkpoints").glob("step-*.pt"))]


# -- config: non-finite numbers and ranges, named by their key ------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=.inf", "train.lr must be a finite number, got inf"),
        ("train.lr_backbone=nan", "train.lr_backbone must be a finite number, got nan"),
        ("loss.weight_giou=.nan", "loss.weight_giou must be a finite number"),
        ("model.position_temperature=-.inf", "model.position_temperature must be a finite number"),
        ("model.options.width=.nan", "model.options.width must be a finite number"),
        ("train.epochs=.inf", "train.epochs must be an integer, got inf"),
        ("train.lr=0", r"train.lr must be > 0, got 0.0"),
        ("train.weight_decay=-1e-4", "train.weight_decay must be ≥ 0"),
        ("train.checkpoint_every_steps=-1", "train.checkpoint_every_steps must be ≥ 0, got -1"),
        ("train.max_steps_per_epoch=-5", "train.max_steps_per_epoch must be ≥ 0, got -5"),
        ("train.warmup_steps=-1", "train.warmup_steps must be ≥ 0"),
        ("train.min_lr_ratio=2", r"train.min_lr_ratio must be in \[0, 1\], got 2.0"),
        ("loss.eos_coef=0", r"loss.eos_coef must be in \(0, 1\], got 0.0"),
        ("loss.focal_alpha=1.5", r"loss.focal_alpha must be in \[0, 1\]"),
        ("model.dropout=1", r"model.dropout must be in \[0, 1\), got 1.0"),
        ("data.eval_size=0", "data.eval_size must be ≥ 1, got 0"),
        ("data.train_scales=[0,96]", r"data.train_scales must be ≥ 1, got \(0, 96\)"),
        ("train.lr=[", r"override 'train.lr=\[': the value is not valid YAML"),
        ("train.output_dir=", "train.output_dir must name the run folder"),
    ],
)
def test_bad_numbers_are_refused_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_run_config("demo", [override])


def test_cli_train_refuses_an_infinite_learning_rate(tmp_path, capsys):
    assert main(["train", "demo", "train.lr=.inf", f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert "train.lr must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_not_yaml_is_named(tmp_path):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x03PK\x00\xff" * 10)
    with pytest.raises(ValueError, match="weights.yaml: not a text file"):
        load_run_config(binary)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [1e-4\n")
    with pytest.raises(ValueError, match=r"broken.yaml: not valid YAML: .* at line \d+"):
        load_run_config(broken)


@pytest.mark.parametrize("device", ["cuda", "cuda:99", "gpu"], ids=["cuda", "index", "unknown"])
def test_a_device_the_machine_lacks_is_named(device, shapes, tmp_path):  # noqa: F811
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = tiny_config(shapes, tmp_path / "run", f"train.device={device}")
    expected = {"cuda": "no CUDA GPU", "cuda:99": "(no CUDA GPU|this machine has \\d+ CUDA GPU)", "gpu": "not a device"}
    with pytest.raises(ValueError, match=f"train.device={device}: {expected[device]}"):
        setup_run(config.train)
    with pytest.raises(ValueError, match=f"train.device={device}"):
        Trainer(config)


# -- the run folder: never two runs in one -----------------------------------------------------------------------
def test_a_used_run_folder_is_refused_then_replaced_with_overwrite(shapes, tmp_path, caplog):  # noqa: F811
    run = tmp_path / "run"
    Trainer(tiny_config(shapes, run, "train.epochs=1", "train.max_steps_per_epoch=3", "train.checkpoint_every_steps=1"))
    assert not run.exists()  # building a trainer writes nothing
    Trainer(
        tiny_config(shapes, run, "train.epochs=1", "train.max_steps_per_epoch=3", "train.checkpoint_every_steps=1")
    ).fit()
    before = (run / "log.jsonl").read_text()
    with pytest.raises(
        ValueError, match=r"already holds a run \(config.yaml, log.jsonl, checkpoints/.*--resume auto.*--overwrite"
    ):
        Trainer(tiny_config(shapes, run, *SHORT))
    assert (run / "log.jsonl").read_text() == before  # nothing touched
    with pytest.raises(ValueError, match="exclude each other"):
        Trainer(tiny_config(shapes, run, *SHORT), resume="auto", overwrite=True)

    with caplog.at_level(logging.WARNING, logger="detrkit"):
        Trainer(tiny_config(shapes, run, *SHORT), overwrite=True).fit()
    assert "removed the previous run's config.yaml, log.jsonl, checkpoints/" in caplog.text
    assert logged_steps(run) == [1, 2]  # the old run's 3 steps are gone, not mixed in
    assert checkpoint_steps(run) == [2]
    assert len([r for r in records(run) if r["type"] == "epoch"]) == 1


def test_a_run_folder_that_is_a_file_is_named(shapes, tmp_path):  # noqa: F811
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ValueError, match=r"train.output_dir .*run is a file, not a folder"):
        Trainer(tiny_config(shapes, tmp_path / "run", *SHORT))


def test_cli_train_into_a_used_folder_needs_resume_or_overwrite(shapes, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    args = ["train", "demo", *tiny_overrides(shapes, run, *SHORT)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{run} already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert main([*args, "--overwrite"]) == 0
    assert "removed the previous run's" in capsys.readouterr().err
    assert logged_steps(run) == [1, 2]


def test_resume_auto_refuses_the_checkpoint_of_another_model(shapes, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    Trainer(tiny_config(shapes, run, *SHORT)).fit()
    with pytest.raises(ValueError, match=r"checkpoint of another model: model.hidden_dim 32 there, 64 here"):
        Trainer(tiny_config(shapes, run, *SHORT, "model.hidden_dim=64"), resume="auto")
    with pytest.raises(ValueError, match=r"model.arch 'detr' there, 'conditional_detr' here"):
        Trainer(
            tiny_config(shapes, run, *SHORT, "model.arch=conditional_detr", "model.class_loss=focal"), resume="auto"
        )
    assert logged_steps(run) == [1, 2]  # the run is untouched
    other = tmp_path / "other"  # a folder with another run: a checkpoint from elsewhere would mix into its log
    other.mkdir()
    (other / "log.jsonl").write_text('{"type": "step", "epoch": 1, "step": 1, "loss": 3.0}\n')
    ckpt = str(run / "checkpoints" / "step-00000002.pt")
    with pytest.raises(ValueError, match=r"is not a checkpoint of the run in .*other, which holds another run"):
        Trainer(tiny_config(shapes, other, *SHORT), resume=ckpt)


def test_resume_with_a_changed_model_setting_is_announced(shapes, tmp_path, caplog):  # noqa: F811
    run = tmp_path / "run"
    Trainer(tiny_config(shapes, run, "train.max_steps_per_epoch=2", NO_EVAL)).fit()  # 2 epochs
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        trainer = Trainer(
            tiny_config(shapes, run, "train.max_steps_per_epoch=2", NO_EVAL, "model.dropout=0.0"), resume="auto"
        )
    assert "changed model settings: model.dropout 0.1 there, 0.0 here" in caplog.text
    assert trainer.state.global_step == 4


# -- interruptions: a resumed run logs each step once; stale temporary files are removed -------------------------
def test_resume_from_an_older_checkpoint_logs_each_step_once(shapes, tmp_path, caplog):  # noqa: F811
    run = tmp_path / "run"
    extra = ("train.epochs=1", "train.max_steps_per_epoch=4", "train.checkpoint_every_steps=2", NO_EVAL)
    Trainer(tiny_config(shapes, run, *extra)).fit()
    # as after a SIGKILL during step 4's checkpoint: the log is ahead of the latest checkpoint (step 2), the last
    # line is cut short, and the interrupted writes left their temporary files
    (run / "checkpoints" / "step-00000004.pt").unlink()
    (run / "model").rename(run / "model-old")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"type": "step", "epoch": 1, "st')
    (run / "checkpoints" / ".step-00000004.pt.k2j4h1.tmp").write_bytes(b"\0" * 1000)
    (run / ".config.yaml.a8c2.tmp").write_text("model:")
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        trainer = Trainer(tiny_config(shapes, run, *extra), resume="auto")
        assert trainer.state.global_step == 2
        trainer.fit()
    assert "removed 3 record(s) after step 2, where this run resumes, and 1 unreadable line(s)" in caplog.text
    assert "removed 2 stale temporary file(s)" in caplog.text
    assert logged_steps(run) == [1, 2, 3, 4]  # each step once
    assert [r["epoch"] for r in records(run) if r["type"] == "epoch"] == [1]
    assert not list(run.rglob("*.tmp"))


def test_resume_auto_without_a_checkpoint_starts_the_log_over(shapes, tmp_path, caplog):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"type": "step", "epoch": 1, "step": 1, "loss": 3.0}\n')  # killed before any
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        Trainer(tiny_config(shapes, run, *SHORT), resume="auto").fit()
    assert "removed 1 record(s) after step 0, where this run starts" in caplog.text
    assert logged_steps(run) == [1, 2]


# -- divergence: the TrainingDiverged message, no crash in the curves ------------------------------------------------
def test_divergence_ends_with_the_diverged_message_only(shapes, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps \(steps 2-4\).*train.lr.*No checkpoint"):
        Trainer(tiny_config(shapes, run, "train.lr=1e30", "train.epochs=1", "train.max_steps_per_epoch=4")).fit()
    assert not (run / "model").exists()  # nothing exported from diverged weights
    assert logged_steps(run) == [1, 2, 3, 4]


def test_cli_divergence_exits_with_the_message(shapes, tmp_path, capsys):  # noqa: F811
    overrides = tiny_overrides(
        shapes, tmp_path / "run", "train.lr=1e30", "train.epochs=1", "train.max_steps_per_epoch=4"
    )
    assert main(["train", "demo", *overrides]) == 2
    err = capsys.readouterr().err
    assert "update skipped" in err and "consecutive steps" in err
    assert "Traceback" not in err and "KeyError" not in err


def test_curves_cope_with_skipped_steps_and_a_cut_line(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [
        {"type": "step", "epoch": 1, "step": 1, "loss": math.nan, "lr": 1.0},  # skipped: only "loss", NaN
        {"type": "step", "epoch": 1, "step": 2, "loss": 2.0, "loss_ce": 1.0, "loss_bbox": 0.5, "loss_giou": 0.5},
        {"type": "step", "epoch": 1, "step": 3, "loss": math.nan},
        {"type": "epoch", "epoch": 1, "step": 3, "AP": 0.1, "AP50": 0.2, "AP75": 0.0},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "st')
    assert plot_curves(log, tmp_path / "curves.png").stat().st_size > 1000
    log.write_text(json.dumps(lines[0]) + "\n")  # no finite loss at all
    assert plot_curves(log, tmp_path / "nan.png").is_file()


# -- backbone weights offline ----------------------------------------------------------------------------------------
def _offline(monkeypatch, tmp_path):
    """torchvision's download fails as it does without a network (and nothing is read from the user's cache)."""
    import torchvision.models._api as api

    def fail(url, *args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(api, "load_state_dict_from_url", fail)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


IMAGENET = ("model.backbone_weights=IMAGENET1K_V1", "model.backbone_norm=frozen")


def test_offline_backbone_weights_give_the_fixes(shapes, tmp_path, monkeypatch):  # noqa: F811
    _offline(monkeypatch, tmp_path)
    with pytest.raises(ConnectionError, match=r"model.backbone_weights=IMAGENET1K_V1: could not download") as e:
        Trainer(tiny_config(shapes, tmp_path / "run", *SHORT, *IMAGENET))
    message = str(e.value)
    assert "resnet18-f37072fd.pth" in message and "offline" in message and "model.backbone_weights=null" in message
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in message


def test_cli_offline_backbone_weights_exit_cleanly(shapes, tmp_path, monkeypatch, capsys):  # noqa: F811
    _offline(monkeypatch, tmp_path)
    assert main(["train", "demo", *tiny_overrides(shapes, tmp_path / "run", *SHORT, *IMAGENET)]) == 2
    err = capsys.readouterr().err
    assert "seems to be offline" in err and "urlopen error" not in err and "Traceback" not in err


def test_init_weights_fetch_no_backbone_weights(shapes, tmp_path, monkeypatch):  # noqa: F811
    src = detrkit.build(load_run_config("demo", TINY_MODEL).model.replace(num_classes=3))
    src.save_pretrained(tmp_path / "src")
    _offline(monkeypatch, tmp_path)
    trainer = Trainer(
        tiny_config(shapes, tmp_path / "run", *SHORT, *IMAGENET, f"train.init_weights={tmp_path / 'src'}")
    )
    assert torch.equal(trainer.model.query_embed.weight, src.query_embed.weight)


def test_resume_fetches_no_backbone_weights(shapes, tmp_path, monkeypatch):  # noqa: F811
    import torchvision
    import torchvision.models._api as api

    # the first run gets its "ImageNet" weights from a stand-in download
    monkeypatch.setattr(api, "load_state_dict_from_url", lambda *a, **k: torchvision.models.resnet18().state_dict())
    run = tmp_path / "run"
    Trainer(tiny_config(shapes, run, *SHORT, *IMAGENET)).fit()
    _offline(monkeypatch, tmp_path)  # the checkpoint replaces every weight: resuming offline works
    trainer = Trainer(tiny_config(shapes, run, "train.max_steps_per_epoch=2", NO_EVAL, *IMAGENET), resume="auto")
    assert trainer.state.global_step == 2 and trainer.model.config.backbone_weights == "IMAGENET1K_V1"
    trainer.fit()
    assert logged_steps(run) == [1, 2, 3, 4]


def test_a_random_frozen_batchnorm_backbone_is_warned_about(shapes, tmp_path, caplog):  # noqa: F811
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        Trainer(tiny_config(shapes, tmp_path / "run", *SHORT, "model.backbone_norm=frozen"))
    assert caplog.text.count("normalise nothing") == 1 and "model.backbone_norm=batch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detrkit"):
        Trainer(tiny_config(shapes, tmp_path / "run", *SHORT))  # the tiny config's trainable BatchNorm
    assert "normalise nothing" not in caplog.text


# -- predict: options checked, one drawing per input in its format -------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "model"
    tiny_model(category_ids=(1, 3, 5), class_names=("circle", "square", "triangle")).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--threshold", "nan", r"argument --threshold: must be a number in \[0, 1\], got nan"),
        ("--threshold", "1.5", r"argument --threshold: must be a number in \[0, 1\]"),
        ("--threshold", "-0.1", r"argument --threshold: must be a number in \[0, 1\]"),
        ("--size", "0", "argument --size: must be ≥ 1, got 0"),
        ("--max-size", "-5", "argument --max-size: must be ≥ 1"),
        ("--batch-size", "0", "argument --batch-size: must be ≥ 1, got 0"),
        ("--batch-size", "two", "argument --batch-size: must be a whole number"),
    ],
)
def test_predict_options_are_checked(option, value, message, weights, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(image)
    with pytest.raises(SystemExit) as e:
        main(["predict", "--weights", str(weights), str(image), "--out", str(tmp_path / "out"), option, value])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_eval_batch_size_zero_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--annotations", "gt.json", "--results", "r.json", "--batch-size", "0"])
    assert e.value.code == 2 and "argument --batch-size: must be ≥ 1" in capsys.readouterr().err


def test_predict_keeps_every_input_apart_and_in_its_format(weights, tmp_path):
    for folder, name, size in (("a", "x.png", (40, 30)), ("b", "x.png", (30, 40)), ("b", "y.jpg", (32, 32))):
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.new("RGB", size, (200, 10, 10)).save(tmp_path / folder / name)
    (tmp_path / "b" / "z.bmp").parent.mkdir(exist_ok=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "b" / "z.bmp")
    out = tmp_path / "out"
    inputs = [str(tmp_path / "a" / "x.png"), str(tmp_path / "b"), str(tmp_path / "a" / "x.png")]  # one given twice
    assert main(["predict", "--weights", str(weights), *inputs, "--out", str(out), "--threshold", "0"]) == 0
    recs = json.loads((out / "detections.json").read_text())
    assert [r["image"] for r in recs] == [inputs[0], *(str(tmp_path / "b" / n) for n in ("x.png", "y.jpg", "z.bmp"))]
    assert [r["drawn"] for r in recs] == ["x.png", "x-1.png", "y.jpg", "z.png"]
    formats = {}
    for name in ("x.png", "x-1.png", "y.jpg", "z.png"):
        with Image.open(out / name) as im:
            formats[name] = (im.format, im.size)
    assert formats == {
        "x.png": ("PNG", (40, 30)),
        "x-1.png": ("PNG", (30, 40)),
        "y.jpg": ("JPEG", (32, 32)),
        "z.png": ("PNG", (20, 20)),
    }


def test_predict_refuses_to_draw_over_its_inputs(weights, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(image)
    assert main(["predict", "--weights", str(weights), str(image), "--out", str(tmp_path)]) == 2
    assert "would overwrite them" in capsys.readouterr().err
    with Image.open(image) as im:
        assert im.getpixel((0, 0)) == (1, 2, 3)


# -- eval --results: files that are not COCO results ---------------------------------------------------------------
@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", "r.json: not a JSON text file"),
        (b"image_id,score\n1,0.5\n", r"r.json: not valid JSON \(Expecting value at line 1, column 1\)"),
        (b'{"annotations": []}', "r.json: a COCO results file is a JSON list"),
        (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}]', r"r.json: record 0 lacks \['score'\]"),
        (b'[{"image_id": "1", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1}]', "record 0 has image_id '1'"),
        (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": NaN}]', "record 0 has score nan"),
        (b'[{"image_id": 1, "category_id": 1, "bbox": [0, "a", 5, 5], "score": 1}]', "record 0 has bbox"),
    ],
)
def test_eval_results_that_are_not_coco_results_are_named(content, message, shapes, tmp_path, capsys):  # noqa: F811
    results = tmp_path / "r.json"
    results.write_bytes(content)
    args = ["eval", "--results", str(results), "--annotations", str(shapes["val_annotations"])]
    assert main([*args, "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_eval_annotations_that_are_not_json_are_named(tmp_path):
    from detrkit.evaluation import evaluate_results_file

    bad = tmp_path / "gt.json"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not json")
    results = tmp_path / "results.json"
    results.write_text("[]")
    with pytest.raises(ValueError, match=r"gt.json is not a COCO annotation file: not valid JSON"):
        evaluate_results_file(bad, results)
    with pytest.raises(FileNotFoundError, match="no COCO annotation file"):
        evaluate_results_file(tmp_path / "missing.json", results)
