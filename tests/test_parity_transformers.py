"""Parity with transformers' ``DetrForObjectDetection``: random weights written by ``save_pretrained`` (or in
the transformers 4.x layout), read by ``detrkit.load``, give the same outputs on a padded batch of two images
of different sizes.

Every case runs with ``auxiliary_loss=False`` (transformers' default, and the published checkpoints'). With
``auxiliary_loss=True`` transformers feeds each decoder layer the LayerNorm'ed output of the previous layer
(and norms the last output twice), whereas the official DETR, and detrkit, apply the decoder's final LayerNorm
only to the copies sent to the prediction heads; outputs then legitimately differ, and ``detrkit.load`` warns.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import detrkit

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

TOLERANCE = 1e-4  # float32, max abs difference of logits and of normalised boxes


def tiny_hf_kwargs(**overrides) -> dict:
    """The config of a tiny transformers DETR-family model (d_model 64, 4 heads, 2+2 layers, 12 queries)."""
    kwargs = dict(
        num_labels=3,
        id2label={0: "N/A", 1: "cat", 2: "dog"},
        label2id={"N/A": 0, "cat": 1, "dog": 2},
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_queries=12,
        use_pretrained_backbone=False,
    )
    kwargs.update(overrides)
    return kwargs


def _hf_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny transformers DETR (d_model 64, 2+2 layers) with every weight and buffer random."""
    kwargs = tiny_hf_kwargs(**overrides)
    torch.manual_seed(seed)
    model = transformers.DetrForObjectDetection(transformers.DetrConfig(**kwargs))
    _randomize_(model, seed)
    return model.eval()


@torch.no_grad()
def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random values for every tensor, so that a swapped or mis-mapped weight cannot go unnoticed
    (transformers initialises biases, BatchNorm statistics and LayerNorms to constants). Scales keep
    activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if "embeddings" in name:  # object queries and learned positions: O(1), so the queries differ clearly
            values = torch.randn(t.shape, generator=g)
        elif t.dim() == 1:
            positive = name.endswith(("running_var", ".weight"))  # variances and norm scales
            values = torch.rand(t.shape, generator=g) + 0.5 if positive else 0.1 * torch.randn(t.shape, generator=g)
        else:
            values = torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel())
        t.copy_(values)


def _padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of different sizes, zero-padded to 96×96; ``pixel_mask`` in transformers' polarity (1 is
    image). Sizes that are not multiples of 32 make the feature-map mask (a nearest-neighbour resize)
    non-trivial."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.zeros(2, 3, 96, 96)
    pixel_mask = torch.zeros(2, 96, 96, dtype=torch.long)
    for i, (h, w) in enumerate([(70, 96), (96, 60)]):
        pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        pixel_mask[i, :h, :w] = 1
    return pixel_values, pixel_mask


def _max_diffs(hf_model: torch.nn.Module, ours: torch.nn.Module) -> tuple[float, float]:
    pixel_values, pixel_mask = _padded_batch()
    with torch.no_grad():
        ref = hf_model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        out = ours(pixel_values, ~pixel_mask.bool())  # detrkit's padding_mask is True on padding
    assert out["pred_logits"].shape == ref.logits.shape
    logits = (out["pred_logits"] - ref.logits).abs().max().item()
    boxes = (out["pred_boxes"] - ref.pred_boxes).abs().max().item()
    print(f"max |Δ| logits {logits:.2e}, boxes {boxes:.2e}")  # figures for the docs: pytest -s
    return logits, boxes


def _assert_parity(hf_model: torch.nn.Module, folder) -> torch.nn.Module:
    ours = detrkit.load(folder)
    assert not ours.training
    logits, boxes = _max_diffs(hf_model, ours)
    assert logits <= TOLERANCE and boxes <= TOLERANCE, (logits, boxes)
    return ours


def test_timm_backbone(tmp_path):
    hf = _hf_model(use_timm_backbone=True, backbone="resnet18")
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["backbone_config"]["model_type"] == "timm_backbone"
    ours = _assert_parity(hf, tmp_path)
    c = ours.config
    assert (c.backbone, c.hidden_dim, c.num_heads, c.enc_layers, c.dec_layers) == ("resnet18", 64, 4, 2, 2)
    assert (c.ffn_dim, c.num_queries, c.num_classes) == (128, 12, 3)
    assert c.mask_backbone_padding is False and c.trainable_stages == 3
    assert ours.label_map.category_ids == (0, 1, 2) and ours.label_map.names == ("N/A", "cat", "dog")


def _resnet18_config() -> transformers.ResNetConfig:
    return transformers.ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], out_features=["stage4"]
    )


def test_transformers_resnet_backbone(tmp_path):
    """transformers' own ResNet. It has no DC5: with ``dilation=True`` the reference still computes stride 32,
    so the converted config says ``dilation=False``."""
    hf = _hf_model(backbone_config=_resnet18_config(), dilation=True)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["backbone_config"]["model_type"] == "resnet"
    ours = _assert_parity(hf, tmp_path)
    assert ours.config.backbone == "resnet18" and ours.config.dilation is False


@pytest.mark.slow
def test_transformers_resnet50_backbone(tmp_path):
    """Bottlenecks: transformers' ResNet strides the 3x3 convolution (downsample_in_bottleneck=False), as
    torchvision's does, and its shortcuts sit where torchvision has a downsample."""
    hf = _hf_model(use_timm_backbone=False)  # transformers' default ResNet-50 config
    hf.save_pretrained(tmp_path)
    assert _assert_parity(hf, tmp_path).config.backbone == "resnet50"


@pytest.mark.slow
def test_timm_resnet50_dc5(tmp_path):
    hf = _hf_model(use_timm_backbone=True, backbone="resnet50", dilation=True)
    hf.save_pretrained(tmp_path)
    ours = _assert_parity(hf, tmp_path)
    assert ours.config.backbone == "resnet50" and ours.config.dilation is True


def test_learned_position_embeddings(tmp_path):
    hf = _hf_model(use_timm_backbone=True, backbone="resnet18", position_embedding_type="learned")
    hf.save_pretrained(tmp_path)
    assert _assert_parity(hf, tmp_path).config.position_embedding == "learned"


def _as_transformers4(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.x in-memory names → the 4.x layout of the published checkpoints: the backbone (and the
    position embedding) inside ``model.backbone.conv_encoder`` (``model.backbone``), ``out_proj``, ``fc1``."""
    out = {}
    for key, value in state.items():
        key = key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
        key = key.replace("model.position_embedding.", "model.backbone.position_embedding.")
        key = key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc1.", ".fc1.").replace(".mlp.fc2.", ".fc2.")
        out[key] = value
    return out


@pytest.mark.parametrize("backbone", ["timm", "transformers"])
def test_transformers4_layout(tmp_path, backbone):
    """The layout of the published Hub checkpoints (transformers 4.x): config with ``use_timm_backbone`` (or a
    ResNet ``backbone_config``), weights in ``pytorch_model.bin`` with ``num_batches_tracked`` counters."""
    if backbone == "timm":
        hf = _hf_model(use_timm_backbone=True, backbone="resnet18", position_embedding_type="learned")
    else:
        hf = _hf_model(backbone_config=_resnet18_config())
    state = _as_transformers4(hf.state_dict())
    stem = "conv1.weight" if backbone == "timm" else "embedder.embedder.convolution.weight"
    assert f"model.backbone.conv_encoder.model.{stem}" in state
    assert "model.encoder.layers.0.self_attn.out_proj.weight" in state and "model.decoder.layers.1.fc2.bias" in state
    bn = next(k for k in state if k.endswith("running_mean"))
    state[bn.replace("running_mean", "num_batches_tracked")] = torch.tensor(0)
    torch.save(state, tmp_path / "pytorch_model.bin")

    cfg = hf.config.to_dict()
    if backbone == "timm":
        cfg.pop("backbone_config")
        cfg.update(use_timm_backbone=True, backbone="resnet18", backbone_config=None, use_pretrained_backbone=True)
    else:
        cfg["backbone_config"].update(out_features=["stage1", "stage2", "stage3", "stage4"], out_indices=[1, 2, 3, 4])
        cfg.update(use_timm_backbone=False, backbone=None)
    cfg["transformers_version"] = "4.40.0"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _assert_parity(hf, tmp_path)


def test_transformers5_in_memory_names(tmp_path):
    """Some tools save ``model.state_dict()`` as is: transformers 5.x in-memory names
    (``model.backbone.model``, ``o_proj``, ``mlp.fc1``) load too."""
    hf = _hf_model(use_timm_backbone=True, backbone="resnet18")
    hf.save_pretrained(tmp_path)
    state = hf.state_dict()
    assert "model.encoder.layers.0.self_attn.o_proj.weight" in state and "model.backbone.model.conv1.weight" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    _assert_parity(hf, tmp_path)


@pytest.mark.slow
def test_published_architecture(tmp_path):
    """facebook/detr-resnet-50's architecture (timm ResNet-50, d_model 256, 6+6 layers, 100 queries, 91 COCO
    labels with "N/A" entries), at 96 px."""
    id2label = {i: ("N/A" if i in (0, 12, 26) else f"class{i}") for i in range(91)}
    hf = _hf_model(
        use_timm_backbone=True,
        backbone="resnet50",
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        num_labels=91,
        d_model=256,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        num_queries=100,
    )
    hf.save_pretrained(tmp_path)
    ours = _assert_parity(hf, tmp_path)
    assert ours.config.num_classes == 91 and ours.class_embed.out_features == 92
    assert ours.label_map.category_ids == tuple(range(91))
    assert ours.label_map.names[12] == "N/A" and ours.label_map.names[1] == "class1"


def test_auxiliary_loss_warns(tmp_path):
    hf = _hf_model(use_timm_backbone=True, backbone="resnet18", auxiliary_loss=True)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="auxiliary_loss=True"):
        ours = detrkit.load(tmp_path)
    assert ours.config.aux_loss is True
