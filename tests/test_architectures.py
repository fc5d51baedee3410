"""Every architecture goes through the same engine: train, resume to the same weights, evaluate, save, load and
predict. One tiny configuration per architecture; the engine itself is tested in ``test_engine.py``."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_engine import final_weights, shapes, tiny_config  # noqa: F401 - shapes is a fixture

import detrkit
from detrkit.engine import Trainer
from detrkit.evaluation import COCO_METRIC_KEYS
from detrkit.models import architectures

# What each architecture needs on top of the tiny DETR of test_engine.py.
ARCH_OVERRIDES: dict[str, list[str]] = {
    "detr": [],
    "conditional_detr": [
        "model.arch=conditional_detr",
        "model.class_loss=focal",
        "loss.cost_class=2",
        "loss.weight_ce=2",
    ],
    "deformable_detr": [
        "model.arch=deformable_detr",
        "model.class_loss=focal",
        "model.num_feature_levels=2",
        "model.enc_points=2",
        "model.dec_points=2",
        "model.box_refine=true",
        "model.two_stage=true",
        "loss.cost_class=2",
        "loss.weight_ce=2",
    ],
    "yolos": [
        "model.arch=yolos",
        "model.backbone=vit",
        "model.aux_loss=false",
        "model.pretrain_image_size=[64,64]",
        "model.mid_position_embeddings=true",
    ],
}


def test_every_architecture_has_a_tiny_config():
    assert set(ARCH_OVERRIDES) >= set(architectures())


@pytest.mark.parametrize("arch", sorted(set(architectures()) & set(ARCH_OVERRIDES)))
def test_train_resume_evaluate_predict(arch, shapes, tmp_path):  # noqa: F811 - shapes is a fixture
    # a step schedule: the learning rate then does not depend on the number of epochs
    extra = [
        "train.deterministic=true",
        "train.schedule=step",
        "train.epochs=2",
        "train.max_steps_per_epoch=2",
        *ARCH_OVERRIDES[arch],
    ]
    metrics = Trainer(tiny_config(shapes, tmp_path / "a", *extra)).fit()
    assert set(metrics) == set(COCO_METRIC_KEYS)

    # stop after epoch 1, then resume from its checkpoint: the same final weights as the uninterrupted run
    Trainer(tiny_config(shapes, tmp_path / "b", *extra, "train.epochs=1")).fit()
    Trainer(tiny_config(shapes, tmp_path / "b", *extra), resume="auto").fit()
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    model = detrkit.load(tmp_path / "a" / "model")
    assert model.config.arch == arch
    image = Image.open(sorted(shapes["val_images"].glob("*.png"))[0])
    det = model.predict(image, threshold=0.0, top_k=5)
    assert len(det) == 5 and det.boxes.shape == (5, 4)
    assert set(det.labels.tolist()) <= set(model.label_map.category_ids)
