"""The detrkit command: help, predict, eval (weights and results files), convert, errors."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from PIL import Image

from detrkit.cli import build_parser, main
from detrkit.demo import generate_shapes_dataset
from detrkit.evaluation import COCO_METRIC_KEYS


@pytest.mark.parametrize(
    "command, options",
    [
        ("train", ["--resume", "--overwrite", "KEY=VALUE", "torchrun"]),
        ("eval", ["--weights", "--images", "--annotations", "--results", "--out", "metrics.json"]),
        ("predict", ["--weights", "--out", "--threshold", "IMAGE_OR_DIR", "detections.json", "--fast", "--bf16"]),
        ("convert", ["source", "dest"]),
        ("export", ["weights", "out", "--fixed-shape", "--msda", "--with-postprocess", "--quantize", "1e-4"]),
        ("demo", ["--out"]),
    ],
)
def test_help_lists_every_option(command, options, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in options:
        assert option in text
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=2, num_val=3, min_side=48, max_side=64)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "model"
    tiny_model(category_ids=(1, 3, 5), class_names=("circle", "square", "triangle")).save_pretrained(path)
    return path


def test_predict_writes_json_and_pictures(shapes, weights, tmp_path, capsys):
    out = tmp_path / "pred"
    extra = tmp_path / "gray.png"
    Image.new("L", (40, 30), 128).save(extra)
    assert (
        main(
            [
                "predict",
                "--weights",
                str(weights),
                str(shapes["val_images"]),
                str(extra),
                "--out",
                str(out),
                "--threshold",
                "0",
            ]
        )
        == 0
    )
    records = json.loads((out / "detections.json").read_text())
    assert len(records) == 4
    assert {d["name"] for r in records for d in r["detections"]} <= {"circle", "square", "triangle"}
    assert len(list(out.glob("*.png"))) == 4  # PNG inputs stay PNG (test_hostile_cli: names, formats)
    assert [r["drawn"] for r in records][-1] == "gray.png"
    with Image.open(out / "gray.png") as im:
        assert im.size == (40, 30) and im.format == "PNG"
    assert "detection(s)" in capsys.readouterr().out


def test_eval_with_weights_then_with_its_results_file(shapes, weights, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--weights", str(weights), "--images", str(shapes["val_images"])]
    assert main(args + ["--annotations", str(shapes["val_annotations"]), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == [*COCO_METRIC_KEYS, "per_class", "errors", "pr_curves"]  # issue 16: per class
    results = out / "results.json"
    assert json.loads(results.read_text())[0].keys() == {"image_id", "category_id", "bbox", "score"}
    out2 = tmp_path / "eval2"
    assert (
        main(["eval", "--results", str(results), "--annotations", str(shapes["val_annotations"]), "--out", str(out2)])
        == 0
    )
    assert json.loads((out2 / "metrics.json").read_text()) == metrics


def test_convert_round_trip(weights, tmp_path):
    assert main(["convert", str(weights), str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "model.safetensors").is_file()


def test_errors_are_short_and_named(tmp_path, weights, capsys):
    assert main(["predict", "--weights", str(weights), str(tmp_path / "nope.jpg")]) == 2
    assert "nope.jpg" in capsys.readouterr().err
    assert main(["eval", "--results", str(tmp_path / "r.json"), "--annotations", str(tmp_path / "gt.json")]) == 2
    assert "gt.json" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
