"""DETR model: shapes, padding independence, gradients, variants, persistence and predict."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from torchvision.ops.misc import FrozenBatchNorm2d

import detrkit
from detrkit.backbone import ResNetBackbone
from detrkit.position_encoding import LearnedPositionEncoding, SinePositionEncoding


def _padded_pair(x_small: torch.Tensor, big_hw=(160, 128)):
    """The small image top-left in a batch beside a larger random image, padded to a multiple of 32."""
    h, w = x_small.shape[-2:]
    hp, wp = big_hw
    xb = torch.zeros(2, 3, hp, wp)
    xb[0, :, :h, :w] = x_small[0]
    xb[1] = torch.randn(3, hp, wp)
    mask = torch.ones(2, hp, wp, dtype=torch.bool)
    mask[0, :h, :w] = False
    mask[1] = False
    return xb, mask


def test_output_shapes_and_aux():
    m = tiny_model().eval()
    out = m(torch.randn(2, 3, 64, 96))
    assert out["pred_logits"].shape == (2, 8, 4)  # K + 1 with no-object
    assert out["pred_boxes"].shape == (2, 8, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == 1
    assert out["aux_outputs"][0]["pred_logits"].shape == (2, 8, 4)
    assert "aux_outputs" not in tiny_model(aux_loss=False).eval()(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_outputs_do_not_depend_on_batch_padding(backbone):
    m = tiny_model(backbone=backbone).eval()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 70, 90)  # odd sizes: not multiples of the stride
    with torch.no_grad():
        alone = m(x)
        xb, mask = _padded_pair(x)
        batched = m(xb, mask)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(alone[key][0], batched[key][0], atol=1e-4), (
            key,
            (alone[key][0] - batched[key][0]).abs().max(),
        )


def test_reference_backbone_mode_does_depend_on_padding():
    """The option exists for parity with published weights; it must really change the computation."""
    m = tiny_model(mask_backbone_padding=False).eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        xb, mask = _padded_pair(x)
        diff = (m(x)["pred_logits"][0] - m(xb, mask)["pred_logits"][0]).abs().max()
    assert diff > 1e-4


def test_gradients_reach_every_trainable_parameter():
    m = tiny_model(trainable_stages=5, dropout=0.0).train()
    with torch.no_grad():  # move the zero-initialised attention biases off zero, as one training step would
        for name, p in m.named_parameters():
            if name.endswith("proj.bias"):
                p.add_(0.1 * torch.randn_like(p))
    xb, mask = _padded_pair(torch.randn(1, 3, 64, 64), (96, 96))
    out = m(xb, mask)
    loss = out["pred_logits"].sum() + out["pred_boxes"].sum()
    loss = loss + sum(a["pred_logits"].sum() + a["pred_boxes"].sum() for a in out["aux_outputs"])
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    # The first decoder layer's input is all zeros (paper, A.3): its self-attention values are all equal, so the
    # query/key projections and the value weight get no gradient there, in the official DETR as here.
    inert = {
        f"transformer.decoder.0.self_attn.{p}"
        for p in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight")
    }
    assert set(missing) <= inert, set(missing) - inert


def test_trainable_stages_freeze_the_rest():
    m = tiny_model(trainable_stages=3)
    trainable = {n.split(".")[2] for n, p in m.named_parameters() if n.startswith("backbone.") and p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert not any(p.requires_grad for p in tiny_model(trainable_stages=0).backbone.parameters())


def test_dilation_halves_the_last_stride():
    bb = ResNetBackbone("resnet50", dilation=True, return_levels=(2, 3, 4))
    feats = bb(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f, _ in feats] == [8, 4, 4]
    assert bb.num_channels == (512, 1024, 2048)
    with pytest.raises(ValueError, match="bottleneck"):
        ResNetBackbone("resnet18", dilation=True)


def test_multi_level_outputs_and_masks():
    bb = ResNetBackbone("resnet18", return_levels=(2, 3, 4))
    mask = torch.zeros(1, 96, 64, dtype=torch.bool)
    mask[:, 70:, :] = True
    feats = bb(torch.randn(1, 3, 96, 64), mask)
    for (f, m), stride in zip(feats, (8, 16, 32), strict=True):
        assert m.shape == (1, *f.shape[-2:])
        assert int((~m[0, :, 0]).sum()) == -(-70 // stride)  # ceil(70 / stride) valid rows


def test_sine_encoding_normalises_by_valid_extent():
    enc = SinePositionEncoding(16)
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, :, 3:] = True  # image 1 is 4x3
    pos = enc((2, 4, 6), mask)
    assert pos.shape == (2, 32, 4, 6)
    small = enc((1, 4, 3), None)
    assert torch.allclose(pos[1, :, :, :3], small[0], atol=1e-6)


def test_learned_encoding_and_its_limit():
    m = tiny_model(position_embedding="learned").eval()
    assert m(torch.randn(1, 3, 64, 64))["pred_boxes"].shape == (1, 8, 4)
    with pytest.raises(ValueError, match="learned position encoding"):
        LearnedPositionEncoding(8)((1, 60, 4), None)


def test_bad_inputs_have_clear_errors():
    m = tiny_model().eval()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="padding_mask"):
        m(torch.randn(1, 3, 64, 64), torch.zeros(1, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        m(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="unknown backbone"):
        detrkit.build(backbone="resnet7")
    with pytest.raises(ValueError, match="divisible"):
        detrkit.build(hidden_dim=30, num_heads=4)


def test_save_pretrained_round_trip(tmp_path):
    m = tiny_model(category_ids=(2, 7, 9), class_names=("a", "b", "c")).eval()
    m.save_pretrained(tmp_path / "w")
    meta = json.loads((tmp_path / "w" / "config.json").read_text())
    assert meta["format"] == "detrkit" and meta["model"]["category_ids"] == [2, 7, 9]
    m2 = detrkit.load(tmp_path / "w")
    assert m2.config == m.config
    assert m2.label_map.names == ("a", "b", "c")
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(m(x)["pred_logits"], m2(x)["pred_logits"])
    assert not list(tmp_path.joinpath("w").glob("*.tmp"))  # atomic writes leave no temporaries


def test_predict_accepts_paths_pil_tensors_and_arrays(tmp_path):
    m = tiny_model(category_ids=(2, 7, 9), class_names=("a", "b", "c")).eval()
    rgb = np.random.default_rng(0).integers(0, 255, size=(50, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    inputs = [
        tmp_path / "x.png",
        str(tmp_path / "gray.png"),
        Image.fromarray(rgb),
        torch.from_numpy(rgb).permute(2, 0, 1),
        rgb,
    ]
    dets = m.predict(inputs, threshold=0.0, top_k=5)
    assert len(dets) == 5
    for d in dets:
        assert d.boxes.shape == (5, 4) and len(d.names) == 5
        assert set(d.labels.tolist()) <= {2, 7, 9}
        assert (d.boxes[:, 2] <= 70 + 1e-4).all() and (d.boxes[:, 3] <= 50 + 1e-4).all()
        assert (d.scores[:-1] >= d.scores[1:]).all()
    # the same picture gives the same detections whatever form it came in
    assert torch.allclose(dets[0].boxes, dets[2].boxes, atol=1e-4)
    assert torch.allclose(dets[0].boxes, dets[3].boxes, atol=1e-4)
    single = m.predict(tmp_path / "x.png", threshold=0.0, top_k=5)
    assert torch.allclose(single.scores, dets[0].scores, atol=1e-5)
    assert m.training is False
    with pytest.raises(FileNotFoundError, match="nope.png"):
        m.predict(tmp_path / "nope.png")


def test_focal_classification_option():
    m = tiny_model(class_loss="focal").eval()
    out = m(torch.randn(1, 3, 64, 64))
    assert out["pred_logits"].shape == (1, 8, 3)  # K sigmoid logits, no no-object class
    assert torch.allclose(out["pred_logits"].sigmoid().mean(), torch.tensor(0.01), atol=0.01)  # prior at init
    det = m.predict(torch.rand(3, 40, 50), threshold=0.0, top_k=5)
    assert len(det) == 5 and set(det.labels.tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="class_loss"):
        tiny_model(class_loss="hinge")


def test_low_temperature_keeps_every_sine_channel_position_dependent():
    mask = torch.zeros(1, 6, 9, dtype=torch.bool)
    paper = SinePositionEncoding(32)((1, 6, 9), mask)
    low = SinePositionEncoding(32, temperature=20)((1, 6, 9), mask)
    spread = lambda pos: pos[0].flatten(1).std(1)  # noqa: E731 - per-channel variation over the map
    assert (spread(paper) < 0.05).sum() > 30  # most of the paper's 64 channels are nearly constant on 6x9 cells
    assert (spread(low) < 0.05).sum() < 8
    m = tiny_model(position_temperature=20.0)
    assert m.position_encoding.temperature == 20.0


def test_loading_saved_weights_does_not_fetch_backbone_weights(tmp_path):
    """A model trained from ImageNet weights records them in its config; loading it takes every weight from the
    file and must not download (or read) the ImageNet weights again: this machine is offline."""
    m = tiny_model()
    m.config = m.config.replace(backbone_weights="IMAGENET1K_V1")
    m.save_pretrained(tmp_path / "m")
    loaded = detrkit.load(tmp_path / "m")
    assert loaded.config.backbone_weights == "IMAGENET1K_V1"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["pred_boxes"], m.eval()(x)["pred_boxes"])


def _random_batchnorm_(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affines, so that folding them is really exercised."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.backbone.modules():
            if getattr(mod, "running_var", None) is not None:
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))


@pytest.mark.parametrize("norm", ["frozen", "batch"])
def test_optimize_for_inference_keeps_outputs(norm):
    """BatchNorm folded into the convolutions + channels-last: the same outputs up to float rounding, padding
    included; bf16 autocast stays close."""
    m = tiny_model(backbone_norm=norm).eval()
    _random_batchnorm_(m)
    x = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    with torch.no_grad():
        ref = m(x, mask)
    fast = copy.deepcopy(m).optimize_for_inference()
    assert not any(isinstance(mod, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)) for mod in fast.modules())
    assert not any(p.requires_grad for p in fast.parameters())
    with torch.no_grad():
        out = fast._inference_forward(x, mask)
    for k in ("pred_logits", "pred_boxes"):
        assert (out[k] - ref[k]).abs().max() < 1e-4, k
    with torch.no_grad():
        low = copy.deepcopy(m).optimize_for_inference(bf16=True)._inference_forward(x, mask)
    assert low["pred_boxes"].dtype == torch.float32
    assert (low["pred_boxes"] - ref["pred_boxes"]).abs().max() < 0.05
    dets = fast.predict(torch.rand(3, 50, 70), threshold=0.0, top_k=3)
    assert len(dets) == 3


def test_folding_needs_eval_mode():
    m = tiny_model(backbone_norm="batch").train()
    with pytest.raises(RuntimeError, match="eval"):
        m.backbone.fold_batchnorm()
