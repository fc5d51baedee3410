"""The mask head (``detrkit/models/segmentation.py``) on DETR, Conditional DETR and Deformable DETR: shapes, padding
independence, gradients, ``freeze_detector``, persistence; and loading published segmentation weights with parity:
transformers' ``DetrForSegmentation`` / ``ConditionalDetrForSegmentation`` (5.x ``save_pretrained``, the 4.x Hub
layout with timm keys, 5.x in-memory names) and the official facebookresearch/detr panoptic ``.pth`` layout.

Parity runs on a padded batch of two images of different sizes with random values in every tensor: logits and
boxes within 1e-4, mask logits within 1e-3 (``pytest -s`` prints the measured differences).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import detrkit
from detrkit.config import ModelConfig
from detrkit.models import fine_tuning_config
from detrkit.models.registry import check_config
from detrkit.models.segmentation import MASK_HEAD_PREFIXES, AttentionMaps

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

TOLERANCE = 1e-4  # logits and normalised boxes
MASK_TOLERANCE = 1e-3  # mask logits

# d_model 64 with 8 heads: the first mask-head block has 72 channels, a multiple of the reference's 8 groups
SMALL = dict(backbone="resnet18", hidden_dim=64, num_heads=8, enc_layers=1, dec_layers=2, ffn_dim=64, num_queries=6)
SMALL_NUM_CLASSES = 3
ARCHS = {"detr": {}, "conditional_detr": {"class_loss": "focal"}, "deformable_detr": {"num_feature_levels": 2}}


def small(arch: str = "detr", seed: int = 0, **overrides) -> detrkit.Detector:
    torch.manual_seed(seed)
    config = {**SMALL, "num_classes": SMALL_NUM_CLASSES, "arch": arch, "masks": True, **ARCHS[arch], **overrides}
    return detrkit.build(**config)


def _alone_and_padded(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 70×90 image alone, and the same image top-left in a 96×128 batch beside a full-size one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 70, 90, generator=g)
    xb = torch.zeros(2, 3, 96, 128)
    xb[0, :, :70, :90] = x[0]
    xb[1] = torch.randn(3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[0] = True
    mask[0, :70, :90] = False
    return x, xb, mask


# -- the model -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_shapes_and_padding_independence(arch):
    """``pred_masks (B,Q,ceil(H/4),ceil(W/4))`` of the padded input; an image's masks do not depend on the padding
    its batch adds (detrkit's padding-exact mode), on the image's cells."""
    model = small(arch).eval()
    x, xb, mask = _alone_and_padded()
    with torch.no_grad():
        alone, batched = model(x), model(xb, mask)
    assert alone["pred_masks"].shape == (1, 6, 18, 23)
    assert batched["pred_masks"].shape == (2, 6, 24, 32)
    assert all("pred_masks" not in aux for aux in batched["aux_outputs"])
    diff = (alone["pred_masks"][0] - batched["pred_masks"][0, :, :18, :23]).abs().max().item()
    assert diff <= 1e-4, diff
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(alone[key][0], batched[key][0], atol=1e-4), key


def test_reference_mode_depends_on_padding():
    """With ``mask_backbone_padding=False`` (published weights) the head computes as the references do, GroupNorm
    over the padded map included: the masks then change with the padding."""
    model = small(mask_backbone_padding=False).eval()
    x, xb, mask = _alone_and_padded()
    with torch.no_grad():
        diff = (model(x)["pred_masks"][0] - model(xb, mask)["pred_masks"][0, :, :18, :23]).abs().max()
    assert diff > 1e-3


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradients_reach_every_trainable_parameter(arch):
    """A loss on the masks alone trains the mask head, every backbone stage (layer1-3 through the FPN) and the
    input projection."""
    model = small(arch, trainable_stages=5).train()
    _, xb, mask = _alone_and_padded()
    out = model(xb[:, :, :64, :64], mask[:, :64, :64])
    out["pred_masks"].sigmoid().mean().backward()
    reached = ("bbox_attention.", "mask_head.", "backbone.", "input_proj.")
    params = [(n, p) for n, p in model.named_parameters() if n.startswith(reached)]
    assert all(p.requires_grad for _, p in params)
    assert [n for n, p in params if p.grad is None or not p.grad.any()] == []


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_mask_head_leaves_detection_unchanged(arch):
    """Built last: a seeded build with masks has the detector of the same build without, and its outputs."""
    with_masks = small(arch).eval()
    without = small(arch, masks=False).eval()
    detector = with_masks.state_dict()
    assert {k for k in detector if not k.startswith(MASK_HEAD_PREFIXES)} == set(without.state_dict())
    assert all(torch.equal(v, detector[k]) for k, v in without.state_dict().items())
    _, xb, mask = _alone_and_padded()
    with torch.no_grad():
        a, b = with_masks(xb, mask), without(xb, mask)
    assert "pred_masks" not in b
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_freeze_detector_trains_only_the_mask_head():
    model = small(freeze_detector=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(MASK_HEAD_PREFIXES) for n in trainable)
    assert {n for n, _ in model.named_parameters() if n.startswith(MASK_HEAD_PREFIXES)} == set(trainable)
    with pytest.raises(ValueError, match="needs masks=True"):
        ModelConfig(freeze_detector=True)


def test_attention_maps_sum_to_one_over_heads_and_positions():
    """The reference's softmax runs over every head and position of a query together; padded cells get none."""
    torch.manual_seed(0)
    attention = AttentionMaps(16, 4)
    padding = torch.zeros(2, 3, 5, dtype=torch.bool)
    padding[0, 2:] = True
    maps = attention(torch.randn(2, 7, 16), torch.randn(2, 15, 16), (3, 5), padding)  # (B, Q, nh, h, w)
    assert maps.shape == (2, 7, 4, 3, 5)
    torch.testing.assert_close(maps.sum(dim=(2, 3, 4)), torch.ones(2, 7))
    assert (maps[0, :, :, 2:] == 0).all() and (maps[1] > 0).all()


def test_widths_that_are_not_multiples_of_eight_build():
    """The reference's GroupNorm(8) needs widths divisible by 8; fewer groups otherwise (36 channels: 6)."""
    model = small(hidden_dim=32, num_heads=4)
    assert model.mask_head.blocks[0].norm.num_groups == 6 and model.mask_head.blocks[4].norm.num_groups == 2
    with pytest.raises(ValueError, match="hidden_dim ≥ 16"):
        small(hidden_dim=8, num_heads=2)


def test_save_load_round_trip_with_class_isthing(tmp_path):
    model = small("conditional_detr", class_isthing=(True, False, True)).eval()
    assert model.label_map.isthing == (True, False, True)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert json.dumps(saved).count("class_isthing") == 1
    loaded = detrkit.load(tmp_path / "m")
    assert loaded.config.masks is True and loaded.config.class_isthing == (True, False, True)
    assert loaded.label_map.isthing == (True, False, True)
    _, xb, mask = _alone_and_padded()
    with torch.no_grad():
        a, b = model(xb, mask), loaded(xb, mask)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.equal(a[key], b[key]), key


def test_config_fields():
    with pytest.raises(ValueError, match="class_isthing has 2 entries but num_classes is 3"):
        ModelConfig(num_classes=3, class_isthing=(True, False))
    config = ModelConfig(num_classes=2, class_isthing=[True, False], masks=True)
    assert config.class_isthing == (True, False) and config.to_dict()["class_isthing"] == [True, False]
    assert ModelConfig.from_dict(config.to_dict()) == config
    # a field of the ResNet architectures only: reset on YOLOS (with a warning)
    assert check_config(ModelConfig(arch="yolos", backbone="vit", masks=True)).masks is False


def test_stage_two_fine_tuning_keeps_the_mask_head():
    """The paper's second stage: a mask head trained on a detector's weights. ``masks`` decides the weights, but a
    run may add the head over weights without it (it trains from scratch); the weights' other shape fields win."""
    run = ModelConfig(masks=True, freeze_detector=True, hidden_dim=128)
    weights = ModelConfig(masks=False, hidden_dim=64, num_heads=8)
    c = fine_tuning_config(run, weights)
    assert (c.masks, c.freeze_detector, c.hidden_dim) == (True, True, 64)
    assert fine_tuning_config(ModelConfig(), ModelConfig(masks=True)).masks is True


# -- parity with transformers ----------------------------------------------------------------------------------
def _resnet18(out_features=("stage1", "stage2", "stage3", "stage4")) -> transformers.ResNetConfig:
    return transformers.ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], out_features=list(out_features)
    )


def _hf_segmentation(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A small transformers segmentation model (d_model 64, 8 heads, 2+2 layers) with every tensor random."""
    from test_parity_transformers import _randomize_, tiny_hf_kwargs

    labels = {"id2label": {0: "cat", 1: "dog", 2: "sky"}, "label2id": {"cat": 0, "dog": 1, "sky": 2}}
    kwargs = tiny_hf_kwargs(**{**labels, "encoder_attention_heads": 8, "decoder_attention_heads": 8, **overrides})
    torch.manual_seed(seed)
    if arch == "detr":
        model = transformers.DetrForSegmentation(transformers.DetrConfig(**kwargs))
    else:
        model = transformers.ConditionalDetrForSegmentation(transformers.ConditionalDetrConfig(**kwargs))
    _randomize_(model, seed)
    return model.eval()


def _max_diffs(hf_model: torch.nn.Module, ours: torch.nn.Module, arch: str, num_queries: int = 12) -> dict[str, float]:
    from test_parity_transformers import _padded_batch

    pixel_values, pixel_mask = _padded_batch()  # 96×96: images of 70×96 and 96×60
    with torch.no_grad():
        ref = hf_model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        out = ours(pixel_values, ~pixel_mask.bool())  # detrkit's padding_mask is True on padding
        ref_boxes = ref.pred_boxes
        if arch == "conditional_detr":
            # transformers' ConditionalDetrForSegmentation leaves the reference points out of its boxes; its
            # detection model (the same weights, wrapped) adds them, as the paper and detrkit do
            ref_boxes = hf_model.conditional_detr(pixel_values=pixel_values, pixel_mask=pixel_mask).pred_boxes
    assert out["pred_masks"].shape == ref.pred_masks.shape == (2, num_queries, 24, 24)
    diffs = {
        "logits": (out["pred_logits"] - ref.logits).abs().max().item(),
        "boxes": (out["pred_boxes"] - ref_boxes).abs().max().item(),
        "masks": (out["pred_masks"] - ref.pred_masks).abs().max().item(),
    }
    print(arch, {k: f"{v:.2e}" for k, v in diffs.items()}, f"mask logits up to {ref.pred_masks.abs().max():.1f}")
    return diffs


def _assert_parity(hf_model: torch.nn.Module, folder, arch: str, num_queries: int = 12) -> detrkit.Detector:
    ours = detrkit.load(folder)
    assert ours.config.arch == arch and ours.config.masks is True and ours.config.mask_backbone_padding is False
    d = _max_diffs(hf_model, ours, arch, num_queries)
    assert d["logits"] <= TOLERANCE and d["boxes"] <= TOLERANCE and d["masks"] <= MASK_TOLERANCE, d
    return ours


@pytest.mark.parametrize("arch", ["detr", "conditional_detr"])
def test_parity_transformers5_save_pretrained(tmp_path, arch):
    hf = _hf_segmentation(arch, backbone_config=_resnet18(), use_timm_backbone=False)
    hf.save_pretrained(tmp_path)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert "mask_head.lay1.weight" in on_disk and "bbox_attention.q_linear.weight" in on_disk  # 5.x renames back
    ours = _assert_parity(hf, tmp_path, arch)
    assert ours.label_map.names == ("cat", "dog", "sky") and ours.config.class_isthing is None


@pytest.mark.parametrize("arch", ["detr", "conditional_detr"])
def test_parity_transformers5_in_memory_names(tmp_path, arch):
    """``state_dict()`` as transformers 5.x holds it: ``mask_head.conv1.conv``, ``fpn_stages.N.refine``,
    ``bbox_attention.q_proj``, ``<arch>.model.backbone.model``."""
    hf = _hf_segmentation(arch, seed=1, backbone_config=_resnet18(), use_timm_backbone=False)
    hf.save_pretrained(tmp_path)
    state = hf.state_dict()
    assert "mask_head.fpn_stages.2.refine.norm.weight" in state and "bbox_attention.k_proj.bias" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    _assert_parity(hf, tmp_path, arch)


@pytest.mark.parametrize("arch", ["detr", "conditional_detr"])
def test_parity_transformers4_hub_layout(tmp_path, arch):
    """The layout of ``facebook/detr-resnet-50-panoptic`` (transformers 4.x): ``use_timm_backbone`` in the config,
    timm keys ``<arch>.model.backbone.conv_encoder.model.*``, the mask head's ``lay1``/``gn1``/``adapter1``/``out_lay``
    and ``q_linear``, in ``pytorch_model.bin`` with ``num_batches_tracked`` counters."""
    hf = _hf_segmentation(arch, seed=2, use_timm_backbone=True, backbone="resnet18")
    saved = tmp_path / "saved"
    hf.save_pretrained(saved)
    state = load_file(str(saved / "model.safetensors"))  # 5.x writes the 4.x names
    assert f"{arch}.model.backbone.conv_encoder.model.layer1.0.conv1.weight" in state
    assert "mask_head.out_lay.bias" in state and f"{arch}.model.encoder.layers.0.fc1.weight" in state
    bn = next(k for k in state if k.endswith("running_mean"))
    state[bn.replace("running_mean", "num_batches_tracked")] = torch.tensor(0)
    folder = tmp_path / "hub4"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    cfg = hf.config.to_dict()
    assert cfg["backbone_config"]["out_indices"] == [1, 2, 3, 4]
    cfg.pop("backbone_config")
    cfg.update(use_timm_backbone=True, backbone="resnet18", backbone_config=None, use_pretrained_backbone=True)
    cfg.update(transformers_version="4.40.0", architectures=[type(hf).__name__])
    (folder / "config.json").write_text(json.dumps(cfg))
    _assert_parity(hf, folder, arch)


@pytest.mark.slow
def test_parity_published_panoptic_architecture(tmp_path):
    """facebook/detr-resnet-50-panoptic's architecture (timm ResNet-50, d_model 256, 8 heads, 6+6 layers, 100
    queries, 250 labels): the mask head's full widths (264 channels, adapters from 1024/512/256), at 96 px."""
    id2label = {i: f"class{i}" for i in range(250)}
    hf = _hf_segmentation(
        "detr",
        use_timm_backbone=True,
        backbone="resnet50",
        num_labels=250,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        d_model=256,
        encoder_layers=6,
        decoder_layers=6,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        num_queries=100,
    )
    hf.save_pretrained(tmp_path)
    ours = _assert_parity(hf, tmp_path, "detr", num_queries=100)
    assert ours.config.num_classes == 250 and ours.mask_head.adapters[0].in_channels == 1024


# -- official .pth ---------------------------------------------------------------------------------------------
def _official_mask_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """detrkit's mask-head keys → facebookresearch/detr's ``DETRsegm`` names (written independently of convert/)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("bbox_attention."):
            out[f"bbox_attention.{parts[1][0]}_linear.{parts[2]}"] = value
        elif key.startswith("mask_head.blocks."):
            out[f"mask_head.{'lay' if parts[3] == 'conv' else 'gn'}{int(parts[2]) + 1}.{parts[4]}"] = value
        elif key.startswith("mask_head.adapters."):
            out[f"mask_head.adapter{int(parts[2]) + 1}.{parts[3]}"] = value
        elif key.startswith("mask_head.out_conv."):
            out[f"mask_head.out_lay.{parts[2]}"] = value
    return out


def _official_segmentation(source: detrkit.Detector, arch: str) -> dict[str, torch.Tensor]:
    if arch == "detr":
        from test_convert import _to_official
    else:
        from test_conditional_detr import _to_official
    state = source.state_dict()
    detector = {k: v for k, v in state.items() if not k.startswith(MASK_HEAD_PREFIXES)}
    official = {f"detr.{k}": v for k, v in _to_official(detector).items()}
    return {**official, **_official_mask_head(state)}


@pytest.mark.parametrize("arch", ["detr", "conditional_detr"])
def test_official_panoptic_pth(tmp_path, arch):
    from test_convert import _randomize_

    source = _randomize_(small(arch, mask_backbone_padding=False))
    state = _official_segmentation(source, arch)
    assert "detr.backbone.0.body.conv1.weight" in state and "mask_head.gn5.bias" in state
    args = argparse.Namespace(backbone="resnet18", nheads=8, dilation=False, dropout=0.1, aux_loss=True, masks=True)
    path = tmp_path / "detr-r18-panoptic-tiny.pth"
    torch.save({"model": state, "args": args, "epoch": 1}, path)

    loaded = detrkit.load(path)
    c = loaded.config
    assert (c.arch, c.masks, c.num_heads, c.num_classes, c.mask_backbone_padding) == (arch, True, 8, 3, False)
    _, xb, mask = _alone_and_padded()
    with torch.no_grad():
        a, b = source(xb, mask), loaded(xb, mask)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.equal(a[key], b[key]), key


def test_official_panoptic_pth_lists_what_does_not_fit(tmp_path):
    from test_convert import _randomize_

    state = _official_segmentation(_randomize_(small(mask_backbone_padding=False)), "detr")
    del state["mask_head.adapter2.weight"]
    state["mask_head.lay9.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "detr-panoptic.pth")
    with pytest.raises(ValueError) as err:
        detrkit.load(tmp_path / "detr-panoptic.pth")
    assert "mask_head.lay9.weight" in str(err.value) and "mask_head.adapters.1.weight" in str(err.value)
