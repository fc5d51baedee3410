"""Deformable DETR: parity with transformers' ``DeformableDetrForObjectDetection`` (plain, box refinement,
two-stage), official fundamentalvision/Deformable-DETR checkpoints, shapes, gradients, padding independence,
the loss (with two-stage proposals), persistence, the preset and a short training run through the engine.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import detrkit
from detrkit.config import LossConfig, RunConfig, load_run_config
from detrkit.criterion import SetCriterion
from detrkit.engine import param_groups
from detrkit.matcher import HungarianMatcher
from detrkit.models.deformable_detr import DeformableDETR, masked_group_norm

TOLERANCE = 1e-4  # float32, max abs difference of logits and of normalised boxes

TINY = dict(
    arch="deformable_detr",
    class_loss="focal",
    num_classes=3,
    backbone="resnet18",
    hidden_dim=64,
    num_heads=4,
    enc_layers=2,
    dec_layers=2,
    ffn_dim=128,
    num_queries=12,
)
VARIANTS = {
    "plain": {},
    "box_refine": {"box_refine": True},
    "two_stage": {"box_refine": True, "two_stage": True},
}


def tiny(variant: str = "plain", seed: int = 0, **overrides) -> DeformableDETR:
    torch.manual_seed(seed)
    return detrkit.build(**{**TINY, **VARIANTS[variant], **overrides})


@torch.no_grad()
def _randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for every tensor, so that a swapped or mis-mapped weight cannot go unnoticed (both
    libraries initialise biases, norms, BatchNorm statistics and box heads to constants). Scales keep
    activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if "embed" in name and t.dim() == 2 and "bbox" not in name and "class" not in name:
            values = torch.randn(t.shape, generator=g)  # queries, level and position embeddings: O(1)
        elif t.dim() == 1:
            positive = name.endswith(("running_var", ".weight"))  # variances and norm scales
            values = torch.rand(t.shape, generator=g) + 0.5 if positive else 0.1 * torch.randn(t.shape, generator=g)
        else:
            values = torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel())
        t.copy_(values)
    return model.eval()


def _padded_batch(seed: int = 0, size: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of different sizes, zero-padded to ``size``²; ``padding_mask`` True on padding. Sizes that are
    not multiples of the strides make every level's mask non-trivial."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.zeros(2, 3, size, size)
    padding_mask = torch.ones(2, size, size, dtype=torch.bool)
    for i, (h, w) in enumerate([(size * 3 // 4 - 2, size), (size, size * 2 // 3 - 4)]):
        pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        padding_mask[i, :h, :w] = False
    return pixel_values, padding_mask


# -- parity with transformers ---------------------------------------------------------------------------------
def _hf_model(variant: str, seed: int = 0, **overrides) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    kwargs = dict(
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "bird"},
        label2id={"cat": 0, "dog": 1, "bird": 2},
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_queries=12,
        two_stage_num_proposals=12,
        with_box_refine=variant != "plain",
        two_stage=variant == "two_stage",
        use_pretrained_backbone=False,
    )
    kwargs.update(overrides)
    if "backbone_config" not in kwargs:
        pytest.importorskip("timm")
        kwargs.update(use_timm_backbone=True, backbone="resnet18")
    torch.manual_seed(seed)
    model = transformers.DeformableDetrForObjectDetection(transformers.DeformableDetrConfig(**kwargs))
    return _randomize_(model, seed)


_HF_CACHE: dict[str, torch.nn.Module] = {}


def _cached_hf_model(variant: str) -> torch.nn.Module:
    """One transformers model per variant for the whole module (building one takes a second)."""
    if variant not in _HF_CACHE:
        _HF_CACHE[variant] = _hf_model(variant)
    return _HF_CACHE[variant]


def _max_diffs(hf_model: torch.nn.Module, ours: torch.nn.Module) -> dict[str, float]:
    pixel_values, padding_mask = _padded_batch()
    with torch.no_grad():
        ref = hf_model(pixel_values=pixel_values, pixel_mask=(~padding_mask).long())  # 1 on image
        out = ours(pixel_values, padding_mask)
    assert out["pred_logits"].shape == ref.logits.shape
    diffs = {
        "logits": (out["pred_logits"] - ref.logits).abs().max().item(),
        "boxes": (out["pred_boxes"] - ref.pred_boxes).abs().max().item(),
    }
    if "enc_outputs" in out:
        diffs["enc_logits"] = (out["enc_outputs"]["pred_logits"] - ref.enc_outputs_class).abs().max().item()
    print("max |Δ| " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))  # figures for the docs: pytest -s
    return diffs


def _assert_parity(hf_model: torch.nn.Module, folder) -> DeformableDETR:
    ours = detrkit.load(folder)
    assert isinstance(ours, DeformableDETR) and not ours.training
    diffs = _max_diffs(hf_model, ours)
    assert max(diffs.values()) <= TOLERANCE, diffs
    return ours


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_transformers(tmp_path, variant):
    hf = _cached_hf_model(variant)
    hf.save_pretrained(tmp_path)
    ours = _assert_parity(hf, tmp_path)
    c = ours.config
    assert (c.backbone, c.hidden_dim, c.num_heads, c.enc_layers, c.dec_layers) == ("resnet18", 64, 4, 2, 2)
    assert (c.ffn_dim, c.num_queries, c.num_classes, c.class_loss) == (128, 12, 3, "focal")
    assert (c.num_feature_levels, c.enc_points, c.dec_points) == (4, 4, 4)
    assert (c.box_refine, c.two_stage) == (variant != "plain", variant == "two_stage")
    assert c.mask_backbone_padding is False and c.trainable_stages == 3
    assert ours.label_map.names == ("cat", "dog", "bird")


def test_parity_transformers_resnet_and_learned_positions(tmp_path):
    """transformers' own ResNet (stages 2-4) and learned position embeddings."""
    transformers = pytest.importorskip("transformers")
    resnet = transformers.ResNetConfig(
        layer_type="basic",
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        out_features=["stage2", "stage3", "stage4"],
    )
    hf = _hf_model("box_refine", backbone_config=resnet, position_embedding_type="learned")
    hf.save_pretrained(tmp_path)
    assert _assert_parity(hf, tmp_path).config.position_embedding == "learned"


def _as_transformers4(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.x in-memory names → the 4.x layout of the published checkpoints: backbone inside
    ``conv_encoder``, ``out_proj``, ``fc1``; every head written under each of its names."""
    out = {}
    for key, value in state.items():
        key = key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
        key = key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc1.", ".fc1.").replace(".mlp.fc2.", ".fc2.")
        out[key] = value.clone()
    return out


def test_transformers4_layout(tmp_path):
    """``pytorch_model.bin`` with every copy of every head (``class_embed.I`` beside
    ``model.decoder.class_embed.I``, ``bbox_embed.I`` beside ``model.decoder.bbox_embed.I``) and a 4.x
    ``use_timm_backbone`` config."""
    hf = _cached_hf_model("two_stage")
    state = _as_transformers4(hf.state_dict())
    assert "model.decoder.layers.0.self_attn.out_proj.weight" in state
    assert "model.decoder.class_embed.2.weight" in state and "class_embed.2.weight" in state
    assert "model.decoder.bbox_embed.2.layers.0.weight" in state and "bbox_embed.2.layers.0.weight" in state
    torch.save(state, tmp_path / "pytorch_model.bin")
    cfg = hf.config.to_dict()
    cfg.pop("backbone_config")
    cfg.update(use_timm_backbone=True, backbone="resnet18", transformers_version="4.40.0")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _assert_parity(hf, tmp_path)


def _edited_copy(src, dst, *, config=None, state=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    for key, value in (config or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(src / "model.safetensors"))
    save_file(state(sd) if state else sd, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def hf_plain_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_deformable")
    _cached_hf_model("plain").save_pretrained(folder)
    return folder


def _differing_class_heads(sd):
    sd["class_embed.1.weight"] = sd["class_embed.0.weight"] + 1
    sd["class_embed.1.bias"] = sd["class_embed.0.bias"].clone()
    return sd


@pytest.mark.parametrize(
    ("edit", "state", "match"),
    [
        ({"backbone_config": {"out_indices": [4]}}, None, r"stages \[4\] for 4 feature levels"),
        ({"encoder_n_points": 2}, None, "sampling_offsets"),
        ({"decoder_ffn_dim": 256}, None, "encoder_ffn_dim=128 but decoder_ffn_dim=256"),
        ({"activation_function": "gelu"}, None, "'gelu' is not supported"),
        ({}, _differing_class_heads, "differs from head 0, but the model has no box refinement"),
    ],
)
def test_transformers_configs_detrkit_cannot_reproduce(hf_plain_folder, tmp_path, edit, state, match):
    with pytest.raises(ValueError, match=match):
        detrkit.load(_edited_copy(hf_plain_folder, tmp_path / "m", config=edit, state=state))


# -- official checkpoints --------------------------------------------------------------------------------------
_IN_OFFICIAL_TRANSFORMER = {
    "level_embed",
    "reference_points",
    "enc_output",
    "enc_output_norm",
    "pos_trans",
    "pos_trans_norm",
}


def _to_official(model: DeformableDETR) -> dict[str, torch.Tensor]:
    """detrkit keys → the official Deformable-DETR layout (written independently of convert/), heads
    duplicated as the official model's state dict has them."""
    c = model.config
    state = model.state_dict()
    num_pred = c.dec_layers + (1 if c.two_stage else 0)
    out: dict[str, torch.Tensor] = {}
    dec_norms = {"norm1": "norm2", "norm2": "norm1", "norm3": "norm3"}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("backbone.body."):
            out["backbone.0." + key.removeprefix("backbone.")] = value
        elif key.startswith("position_encoding."):
            out["backbone.1." + key.removeprefix("position_encoding.")] = value
        elif parts[0] in _IN_OFFICIAL_TRANSFORMER:
            out["transformer." + key] = value
        elif parts[0] in ("encoder", "decoder") and parts[1] == "layers":
            prefix = f"transformer.{parts[0]}.layers.{parts[2]}."
            rest = parts[3:]
            if rest[0] == "ffn":
                out[prefix + ".".join(rest[1:])] = value
            elif parts[0] == "decoder" and rest[0] == "self_attn":
                if rest[1] == "out_proj":
                    out[prefix + "self_attn.out_proj." + rest[2]] = value
                elif rest[1] == "q_proj":  # pack q, k, v as nn.MultiheadAttention does
                    qkv = [state[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
                    out[prefix + f"self_attn.in_proj_{rest[2]}"] = torch.cat(qkv)
            elif parts[0] == "decoder" and rest[0] in dec_norms:
                out[prefix + f"{dec_norms[rest[0]]}.{rest[1]}"] = value
            else:
                out[prefix + ".".join(rest)] = value
        elif key.startswith(("class_embed.", "decoder.bbox_embed.", "enc_class_embed.", "enc_bbox_embed.")):
            continue  # below
        else:
            out[key] = value
    # heads: index i per decoder layer (+1 for the encoder's proposals), shared or per layer
    for i in range(num_pred):
        enc = c.two_stage and i == c.dec_layers
        for kind, head in (("class", "class_embed"), ("bbox", "decoder.bbox_embed")):
            src = f"enc_{kind}_embed." if enc else (f"{head}.{i}." if c.box_refine else f"{head}.")
            for key, value in state.items():
                if key.startswith(src):
                    out[f"{kind}_embed.{i}.{key.removeprefix(src)}"] = value
                    if c.box_refine and (kind == "bbox" or c.two_stage):
                        out[f"transformer.decoder.{kind}_embed.{i}.{key.removeprefix(src)}"] = value
    return out


def _assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pixel_values, padding_mask = _padded_batch(size=64)
    with torch.no_grad():
        out_a, out_b = a(pixel_values, padding_mask), b(pixel_values, padding_mask)
    assert torch.equal(out_a["pred_logits"], out_b["pred_logits"])
    assert torch.equal(out_a["pred_boxes"], out_b["pred_boxes"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_checkpoint(tmp_path, variant):
    """The plain model as a bare state dict (no ``args``: the official defaults, 8 heads, apply); the others as
    ``{"model": ..., "args": Namespace}`` with 4 heads (two-stage: the number of queries is only in ``args``)."""
    num_heads = 8 if variant == "plain" else 4
    source = _randomize_(tiny(variant, mask_backbone_padding=False, num_classes=5, num_heads=num_heads))
    state = _to_official(source)
    assert "transformer.level_embed" in state and "class_embed.1.weight" in state
    path = tmp_path / "checkpoint.pth"
    if variant == "plain":
        torch.save(state, path)
    else:
        args = argparse.Namespace(nheads=4, num_queries=12, dilation=False, dropout=0.05, aux_loss=True)
        torch.save({"model": state, "args": args, "epoch": 49}, path)
    loaded = detrkit.load(path)
    c = loaded.config
    assert (c.box_refine, c.two_stage, c.num_queries, c.num_heads) == (
        variant != "plain",
        variant == "two_stage",
        12,
        num_heads,
    )
    assert (c.num_classes, c.class_loss, c.enc_points, c.dec_points, c.num_feature_levels) == (5, "focal", 4, 4, 4)
    assert c.mask_backbone_padding is False and c.dropout == (0.1 if variant == "plain" else 0.05)
    assert loaded.label_map.category_ids == tuple(range(5))  # official heads are indexed by category id
    _assert_same_outputs(source, loaded)


def test_official_heads_that_should_be_shared_but_differ(tmp_path):
    state = _to_official(tiny("box_refine"))
    state["transformer.decoder.bbox_embed.1.layers.0.bias"] = state["bbox_embed.1.layers.0.bias"] + 1
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="should be one head but differ"):
        detrkit.load(path)


# -- the model ------------------------------------------------------------------------------------------------
def _criterion(num_classes: int = 3) -> SetCriterion:
    lc = LossConfig(cost_class=2.0, weight_ce=2.0)
    matcher = HungarianMatcher(cost_class=lc.cost_class, cost_bbox=lc.cost_bbox, cost_giou=lc.cost_giou, focal=True)
    return SetCriterion(num_classes=num_classes, matcher=matcher, weight_ce=lc.weight_ce, focal=True)


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.4, 0.5]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.4]])},
    ]


@pytest.mark.parametrize(
    ("variant", "padded"), [("plain", True), ("box_refine", True), ("two_stage", True), ("two_stage", False)]
)
def test_forward_loss_and_gradients(variant, padded):
    """Shapes, the set loss (two-stage: with the proposals' term) and gradients reaching every trainable
    parameter. Randomised weights: at initialisation the zero box-head outputs and sampling-offset weights
    block some gradients, by design. The backbone is frozen (DETR's tests cover it), which keeps this fast."""
    model = _randomize_(tiny(variant, trainable_stages=0)).train()
    if padded:
        pixel_values, padding_mask = _padded_batch(size=64)
    else:
        pixel_values, padding_mask = torch.randn(2, 3, 64, 96), None
    out = model(pixel_values, padding_mask)
    assert out["pred_logits"].shape == (2, 12, 3) and out["pred_boxes"].shape == (2, 12, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == 1 and out["aux_outputs"][0]["pred_boxes"].shape == (2, 12, 4)
    if variant == "two_stage":
        s = sum(math.ceil(pixel_values.shape[2] / st) * math.ceil(pixel_values.shape[3] / st) for st in (8, 16, 32, 64))
        assert out["enc_outputs"]["pred_logits"].shape == (2, s, 3)
        assert out["enc_outputs"]["pred_boxes"].shape == (2, s, 4)
    else:
        assert "enc_outputs" not in out

    losses = _criterion()(out, _targets())
    assert torch.isfinite(losses["loss"])
    assert ("enc/loss_ce" in losses) == (variant == "two_stage")
    losses["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad, no_grad


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_do_not_depend_on_batch_padding(variant):
    """With ``mask_backbone_padding`` every step is padding-exact: backbone, GroupNorm statistics, the sampled
    values, reference points and (two-stage) the proposals."""
    model = _randomize_(tiny(variant))
    torch.manual_seed(1)
    x = torch.randn(1, 3, 50, 70)  # not multiples of any stride
    batch = torch.zeros(2, 3, 96, 128)
    batch[0, :, :50, :70] = x[0]
    batch[1] = torch.randn(3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[0] = True
    mask[0, :50, :70] = False
    with torch.no_grad():
        alone, batched = model(x), model(batch, mask)
    for key in ("pred_logits", "pred_boxes"):
        diff = (alone[key][0] - batched[key][0]).abs().max().item()
        assert diff <= 1e-4, (key, diff)


def test_reference_mode_depends_on_padding():
    """Off (published weights), GroupNorm sees the padding, as in the reference implementations."""
    model = _randomize_(tiny(mask_backbone_padding=False))
    x = torch.randn(1, 3, 64, 64)
    batch = torch.zeros(1, 3, 96, 96)
    batch[0, :, :64, :64] = x[0]
    mask = torch.ones(1, 96, 96, dtype=torch.bool)
    mask[0, :64, :64] = False
    with torch.no_grad():
        assert not torch.allclose(model(x)["pred_logits"], model(batch, mask)["pred_logits"], atol=1e-4)


@pytest.mark.parametrize("levels", [1, 2])
def test_fewer_feature_levels(levels):
    model = tiny(num_feature_levels=levels).eval()
    assert len(model.input_proj) == levels and model.backbone.return_levels == (2, 3, 4)[-levels:]
    with torch.no_grad():
        out = model(*_padded_batch(size=64))
    assert out["pred_boxes"].shape == (2, 12, 4)


def test_masked_group_norm():
    """Statistics over the valid cells equal GroupNorm of the image alone; a group of one value (C = 32 on a 1×1
    map, which F.group_norm refuses in training) normalises to the bias."""
    norm = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(1, 8, 5, 6)
    padded = torch.randn(1, 8, 7, 9)
    padded[..., :5, :6] = x
    valid = torch.zeros(1, 1, 7, 9)
    valid[..., :5, :6] = 1
    out = masked_group_norm(padded, norm, valid)
    assert torch.allclose(out[..., :5, :6], norm(x), atol=1e-5) and not out[..., 5:, :].any()
    single = torch.nn.GroupNorm(8, 8).train()
    torch.nn.init.normal_(single.bias)
    assert torch.equal(masked_group_norm(torch.randn(2, 8, 1, 1), single, None)[..., 0, 0], single.bias.expand(2, 8))


def test_initialisation():
    model = tiny("box_refine").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert abs(out["pred_logits"].sigmoid().mean().item() - 0.01) < 0.005  # focal prior
    heads = model.decoder.bbox_embed
    assert all(not h.layers[-1].weight.any() for h in heads)
    assert heads[0].layers[-1].bias.tolist() == [0, 0, -2, -2] and not heads[1].layers[-1].bias.any()
    two_stage = tiny("two_stage")
    assert (
        not two_stage.enc_bbox_embed.layers[-1].bias.any() and not two_stage.decoder.bbox_embed[0].layers[-1].bias.any()
    )


def test_lr_scale_for_offsets_and_reference_points():
    model = tiny()
    scaled = {n for n, _ in model.named_parameters() if model.lr_scale(n) != 1.0}
    assert "reference_points.weight" in scaled and "decoder.layers.1.cross_attn.sampling_offsets.bias" in scaled
    assert scaled == {n for n, _ in model.named_parameters() if "sampling_offsets" in n or "reference_points" in n}
    groups = param_groups(model, lr=2e-4, lr_backbone=1e-5)
    assert sorted(g["lr"] for g in groups) == pytest.approx([1e-5, 2e-5, 2e-4])
    assert sum(len(g["params"]) for g in groups if g["lr"] == pytest.approx(2e-5)) == len(scaled)


def test_invalid_configurations():
    with pytest.raises(ValueError, match="two_stage needs box_refine"):
        tiny(two_stage=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny(hidden_dim=48, num_heads=4)
    with pytest.raises(ValueError, match="top num_queries=300"):
        tiny("two_stage", num_queries=300).eval()(torch.randn(1, 3, 64, 64))


def test_save_pretrained_round_trip(tmp_path):
    model = _randomize_(tiny("two_stage"))
    model.save_pretrained(tmp_path)
    loaded = detrkit.load(tmp_path)
    assert loaded.config == model.config
    _assert_same_outputs(model, loaded)
    detections = loaded.predict(torch.rand(3, 60, 80), threshold=0.0, top_k=5)
    assert len(detections) == 5 and detections.boxes.shape == (5, 4)


def test_preset():
    run = load_run_config("deformable_detr_r50")
    m, lc, t = run.model, run.loss, run.train
    assert (m.arch, m.backbone, m.num_queries, m.ffn_dim, m.class_loss) == (
        "deformable_detr",
        "resnet50",
        300,
        1024,
        "focal",
    )
    assert m.backbone_weights == "IMAGENET1K_V1" and m.num_feature_levels == 4
    assert (lc.cost_class, lc.cost_bbox, lc.cost_giou, lc.weight_ce, lc.weight_bbox, lc.weight_giou) == (
        2,
        5,
        2,
        2,
        5,
        2,
    )
    assert (t.lr, t.lr_backbone, t.weight_decay, t.epochs, t.lr_drop_epochs, t.clip_max_norm, t.batch_size) == (
        2e-4,
        2e-5,
        1e-4,
        50,
        (40,),
        0.1,
        2,
    )
    assert run.data == load_run_config("detr_r50").data
    with torch.device("meta"):  # the full-size model, without allocating it or downloading ImageNet weights
        model = detrkit.build("deformable_detr_r50", backbone_weights=None)
    assert isinstance(model, DeformableDETR) and model.query_embed.weight.shape == (300, 512)


# -- training through the engine --------------------------------------------------------------------------------
def test_training_smoke(tmp_path):
    """A few steps of ``detrkit train`` with a tiny two-stage model on generated shapes."""
    from detrkit.demo import generate_shapes_dataset
    from detrkit.engine import Trainer

    data = generate_shapes_dataset(tmp_path / "shapes", num_train=4, num_val=2, min_side=48, max_side=64)
    overrides = [
        *(f"data.{k}={v}" for k, v in data.items()),
        "data.train_scales=[64]",
        "data.eval_size=64",
        "data.eval_max_size=80",
        "model.arch=deformable_detr",
        "model.class_loss=focal",
        "model.box_refine=true",
        "model.two_stage=true",
        "model.hidden_dim=32",
        "model.num_heads=4",
        "model.enc_layers=1",
        "model.dec_layers=2",
        "model.ffn_dim=64",
        "model.num_queries=6",
        "model.trainable_stages=0",  # a frozen backbone keeps the steps fast; the transformer still trains
        f"train.output_dir={tmp_path / 'run'}",
        "train.epochs=1",
        "train.batch_size=2",
        "train.log_every=1",
        "train.report=false",  # report.html and query statistics are test_report.py's
        "train.query_stats_images=0",
    ]
    config: RunConfig = load_run_config("demo", overrides)
    metrics = Trainer(config).fit()
    assert "AP" in metrics
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    loaded = detrkit.load(tmp_path / "run" / "model")
    assert loaded.config.two_stage and loaded.config.num_classes == 3
