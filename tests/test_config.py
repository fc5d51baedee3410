"""Run configs: YAML presets, dotted overrides, validation with the key named, round trips."""

from __future__ import annotations

import pytest

from detrkit.config import PRESETS_DIR, DataConfig, ModelConfig, RunConfig, TrainConfig, load_run_config
from detrkit.models import check_config


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_presets_load_and_round_trip(preset, tmp_path):
    cfg = load_run_config(preset)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_run_config(path) == cfg


def test_paper_recipe_preset():
    cfg = load_run_config("detr_r50")
    t = cfg.train
    assert (t.lr, t.lr_backbone, t.weight_decay, t.batch_size, t.clip_max_norm) == (1e-4, 1e-5, 1e-4, 2, 0.1)
    assert (t.epochs, t.lr_drop_epochs) == (500, (400,))
    assert load_run_config("detr_r50_150ep").train.lr_drop_epochs == (100,)
    m = cfg.model
    assert (m.backbone, m.hidden_dim, m.enc_layers, m.dec_layers, m.num_heads, m.ffn_dim, m.num_queries) == (
        "resnet50",
        256,
        6,
        6,
        8,
        2048,
        100,
    )
    assert cfg.data.train_scales[0] == 480 and cfg.data.train_scales[-1] == 800 and cfg.data.random_crop


def test_overrides_are_typed():
    cfg = load_run_config(
        "demo", ["train.lr=3e-4", "data.train_scales=[96,112]", "model.aux_loss=false", "train.init_weights=x"]
    )
    assert cfg.train.lr == 3e-4 and cfg.data.train_scales == (96, 112) and cfg.model.aux_loss is False
    assert cfg.train.init_weights == "x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("train.epochs=abc", "train.epochs must be an integer"),
        ("train.epochs=1.5", "train.epochs must be an integer"),
        ("model.aux_loss=3", "model.aux_loss must be true or false"),
        ("train.amp=fp8", "train.amp must be"),
        ("model.backbone=vgg", "unknown backbone 'vgg' for deformable_detr"),
        ("model.arch=rtdetr", "unknown arch 'rtdetr'; known: conditional_detr, deformable_detr, detr, yolos"),
        ("model.options.depth=2", "arch 'deformable_detr' has no options"),
        ("train.epochs", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    # the config layer checks keys and types; the architecture's declaration checks what is its own
    with pytest.raises(ValueError, match=message):
        check_config(load_run_config("demo", [override]).model)


def test_renamed_fields_still_read():
    """config.json files and overrides written before nheads/dim_feedforward were renamed keep working."""
    del_new = {k: v for k, v in ModelConfig().to_dict().items() if k not in ("num_heads", "ffn_dim")}
    old = ModelConfig.from_dict({**del_new, "nheads": 4, "dim_feedforward": 64})
    assert (old.num_heads, old.ffn_dim) == (4, 64)
    cfg = load_run_config("demo", ["model.nheads=2", "model.dim_feedforward=32"])
    assert (cfg.model.num_heads, cfg.model.ffn_dim) == (2, 32)
    with pytest.raises(ValueError, match="both 'nheads' and its new name 'num_heads'"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "nheads": 4})


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ValueError, match="bad.yaml.*train.epochz"):
        load_run_config(p)
    with pytest.raises(FileNotFoundError, match="presets: .*demo"):
        load_run_config(tmp_path / "missing.yaml")


def test_dataclass_validation():
    with pytest.raises(ValueError):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError):
        DataConfig(crop_size=(600, 384))
    with pytest.raises(ValueError, match="category_ids"):
        ModelConfig(num_classes=3, category_ids=(1, 2))
    assert RunConfig.from_dict(RunConfig().to_dict()) == RunConfig()


def test_fine_tuning_takes_what_decides_the_weights_from_them():
    from detrkit.models import fine_tuning_config

    run = load_run_config("demo").model  # Deformable DETR with box refinement, trainable BatchNorm, 5 stages
    weights = ModelConfig(arch="detr", backbone="resnet50", hidden_dim=64, num_heads=4, feature_level=3)
    c = fine_tuning_config(run, weights)
    assert (c.arch, c.backbone, c.hidden_dim, c.num_heads, c.feature_level) == ("detr", "resnet50", 64, 4, 3)
    assert (c.box_refine, c.num_feature_levels) == (False, ModelConfig().num_feature_levels)  # not DETR's
    assert c.backbone_norm == "frozen"  # changes the state dict's keys: from the weights
    assert c.trainable_stages == run.trainable_stages == 5  # how to train, not what the weights are: the run's
    assert c.num_classes == run.num_classes
