"""Adding an architecture touches its model file, its converter file, a preset and a line in the tests — nothing in
the engine, the config or the CLI. Shown here with a toy architecture whose two files live outside the package
(a temporary folder added to the search path of ``detrkit.models`` and ``detrkit.convert``): it builds, trains
through the engine, evaluates, saves, loads, predicts, fine-tunes from its own weights and converts "published"
weights, with no other change anywhere."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_engine import shapes, tiny_config  # noqa: F401 - shapes is a fixture

import detrkit
from detrkit import convert
from detrkit.engine import Trainer
from detrkit.evaluation import COCO_METRIC_KEYS
from detrkit.models import registry

TOY_MODEL = '''
"""A toy detector: one convolution, pooled, added to learned queries."""
from dataclasses import dataclass

from torch import nn

from detrkit.models.registry import Architecture
from detrkit.models.base import Detector


@dataclass(frozen=True)
class ToyOptions:
    width: int = 8


class Toy(Detector):
    def __init__(self, config):
        super().__init__(config)
        width = ARCHITECTURE.options_of(config).width
        self.backbone = nn.Conv2d(3, width, 3, padding=1)
        self.query_embed = nn.Embedding(config.num_queries, width)
        self.class_embed = nn.Linear(width, config.num_classes + 1)
        self.bbox_embed = nn.Linear(width, 4)

    def forward(self, pixel_values, padding_mask=None):
        self._check_inputs(pixel_values, padding_mask)
        pooled = self.backbone(pixel_values).mean((2, 3))  # (B, W)
        h = self.query_embed.weight[None] + pooled[:, None]  # (B, Q, W)
        return {"pred_logits": self.class_embed(h), "pred_boxes": self.bbox_embed(h).sigmoid()}


ARCHITECTURE = Architecture(
    name="toy", model=Toy, options=ToyOptions, shape_fields=("options.width",), defaults={"backbone": "conv"}
)
'''

TOY_CONVERTER = '''
"""transformers-style "toy" folders: keys prefixed with ``toy.``."""
from detrkit.config import ModelConfig
from detrkit.convert.common import Converter


def convert_transformers(hf_config, state, *, source):
    config = ModelConfig(
        arch="toy",
        backbone="conv",
        num_classes=hf_config["num_labels"],
        num_queries=hf_config["num_queries"],
        options={"width": hf_config["width"]},
    )
    return config, {k.removeprefix("toy."): v for k, v in state.items()}


CONVERTER = Converter(arch="toy", transformers_model_types=("toy",), convert_transformers=convert_transformers)
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy's model and converter files, found through the packages' search paths."""
    models_dir, convert_dir = tmp_path / "toy_models", tmp_path / "toy_convert"
    models_dir.mkdir()
    convert_dir.mkdir()
    (models_dir / "toy.py").write_text(textwrap.dedent(TOY_MODEL))
    (convert_dir / "toy_converter.py").write_text(textwrap.dedent(TOY_CONVERTER))
    monkeypatch.setattr(detrkit.models, "__path__", [*detrkit.models.__path__, str(models_dir)])
    monkeypatch.setattr(convert, "__path__", [*convert.__path__, str(convert_dir)])
    registry.architectures.cache_clear()
    convert.converters.cache_clear()
    yield
    registry.architectures.cache_clear()
    convert.converters.cache_clear()


def test_a_new_architecture_needs_only_its_own_files(toy, shapes, tmp_path, caplog):  # noqa: F811 - shapes is a fixture
    assert "toy" in registry.architectures()
    model = detrkit.build(arch="toy", num_classes=2, num_queries=3, options={"width": 4})
    assert model.backbone.out_channels == 4 and model.config.backbone == "conv"
    with pytest.raises(ValueError, match="unknown model.options for arch 'toy': depth"):
        detrkit.build(arch="toy", options={"depth": 2})
    with caplog.at_level("WARNING", logger="detrkit"):
        assert detrkit.build(arch="toy", box_refine=True).config.box_refine is False
    assert "arch 'toy' does not use box_refine=True (conditional_detr/deformable_detr/detr): reset" in caplog.text

    # the engine: train, evaluate, export, with the architecture's own option set from the command line
    toy_run = ["model.arch=toy", "model.backbone=conv", "model.options.width=6", "model.aux_loss=false"]
    metrics = Trainer(tiny_config(shapes, tmp_path / "run", *toy_run, "train.epochs=1")).fit()
    assert set(metrics) == set(COCO_METRIC_KEYS)
    trained = detrkit.load(tmp_path / "run" / "model")
    assert type(trained).__name__ == "Toy" and trained.query_embed.weight.shape[1] == 6
    image = Image.open(sorted(shapes["val_images"].glob("*.png"))[0])
    det = trained.predict(image, threshold=0.0, top_k=2)
    assert len(det) == 2 and set(det.labels.tolist()) <= set(trained.label_map.category_ids)

    # fine-tuning from its own weights: the shape-defining fields (here the option) come from the weights
    tuned = Trainer(
        tiny_config(
            shapes, tmp_path / "tuned", *toy_run[:2], "train.epochs=1", f"train.init_weights={tmp_path / 'run/model'}"
        )
    )
    assert tuned.model.query_embed.weight.shape[1] == 6
    torch.testing.assert_close(tuned.model.query_embed.weight, trained.query_embed.weight, rtol=0, atol=0)

    # "published" weights in a transformers-style folder convert through the toy's converter
    folder = tmp_path / "hf_toy"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "toy", "num_labels": 2, "num_queries": 3, "width": 5})
    )
    source = detrkit.build(arch="toy", num_classes=2, num_queries=3, options={"width": 5})
    save_file({f"toy.{k}": v.contiguous() for k, v in source.state_dict().items()}, str(folder / "model.safetensors"))
    loaded = detrkit.load(folder)
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x)["pred_logits"], source.eval()(x)["pred_logits"], rtol=0, atol=0)
