"""Conditional DETR: the spatial query, the per-head [content, spatial] concatenation, parity with transformers'
``ConditionalDetrForObjectDetection`` (random weights, saved, loaded by ``detrkit.load``) and the official
Atten4Vis/ConditionalDETR checkpoint layout."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import detrkit
from detrkit.models.conditional_detr import ConditionalCrossAttention
from detrkit.models.layers import inverse_sigmoid
from detrkit.position_encoding import SinePositionEncoding, sine_embed_points

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

TOLERANCE = 1e-4


def tiny(**overrides) -> torch.nn.Module:
    kwargs = dict(
        arch="conditional_detr",
        backbone="resnet18",
        hidden_dim=64,
        num_heads=4,
        enc_layers=1,
        dec_layers=3,
        ffn_dim=64,
        num_queries=9,
        num_classes=3,
        class_loss="focal",
    )
    kwargs.update(overrides)
    return detrkit.build(**kwargs)


# -- the spatial query ---------------------------------------------------------------------------------------
def test_point_embedding_matches_the_feature_map_encoding():
    """A reference point at the (normalised) position of a feature-map cell gets the cell's sine encoding: the
    spatial parts of query and key then agree where the query points."""
    h, w = 5, 7
    pos = SinePositionEncoding(32)((1, h, w), None)  # (1, 64, h, w)
    i, j = 2, 4  # cell (row 2, column 4): the encoding's normalised position is ((j+1)/w, (i+1)/h)
    point = torch.tensor([(j + 1) / w, (i + 1) / h])
    torch.testing.assert_close(sine_embed_points(point, 32), pos[0, :, i, j], atol=1e-4, rtol=0)


def test_spatial_query_is_scaled_after_the_first_layer(monkeypatch):
    """Layer 1 gets the plain sine embedding of the reference point; later layers get it scaled element-wise
    by ``query_scale`` of the decoder state."""
    m = tiny().eval()
    seen = []
    for layer in m.transformer.decoder:
        layer.cross_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[2].clone()))
    scales = []
    m.transformer.query_scale.register_forward_hook(lambda mod, args, out: scales.append(out.clone()))
    with torch.no_grad():
        m(torch.randn(1, 3, 64, 64))
    ref = m.transformer.ref_point_head(m.query_embed.weight[None]).sigmoid()
    sine = sine_embed_points(ref, 32)
    assert len(seen) == 3 and len(scales) == 2
    torch.testing.assert_close(seen[0], sine)
    torch.testing.assert_close(seen[1], sine * scales[0])
    torch.testing.assert_close(seen[2], sine * scales[1])


def test_cross_attention_concatenates_content_and_position_per_head(monkeypatch):
    """Queries and keys are per head [content (hd), spatial (hd)]: SDPA sees 2·hd channels for queries and keys,
    hd for values; only the first layer has (and uses) the learned query-position projection."""
    dim, nh, b, q, s = 32, 4, 2, 5, 11
    shapes = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(qs, ks, vs, **kwargs):
        shapes.append((tuple(qs.shape), tuple(ks.shape), tuple(vs.shape)))
        return real_sdpa(qs, ks, vs, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    first = ConditionalCrossAttention(dim, nh, 0.0, first=True)
    later = ConditionalCrossAttention(dim, nh, 0.0, first=False)
    assert first.q_pos is not None and later.q_pos is None
    args = [torch.randn(b, q, dim), torch.randn(b, q, dim), torch.randn(b, q, dim)]
    memory, pos = torch.randn(b, s, dim), torch.randn(b, s, dim)
    out = later(*args, memory, pos, None)
    assert out.shape == (b, q, dim)
    assert shapes == [((b, nh, q, 2 * dim // nh), (b, nh, s, 2 * dim // nh), (b, nh, s, dim // nh))]

    # per head h: logits = (q_content_h · k_content_h + q_spatial_h · k_pos_h) / sqrt(2·hd), written out
    tgt, query_pos, query_sine = args
    hd = dim // nh
    qc = later.q_content(tgt).view(b, q, nh, hd)
    qs = later.q_pos_sine(query_sine).view(b, q, nh, hd)
    kc = later.k_content(memory).view(b, s, nh, hd)
    kp = later.k_pos(pos).view(b, s, nh, hd)
    v = later.v(memory).view(b, s, nh, hd)
    logits = (torch.einsum("bqhd,bshd->bhqs", qc, kc) + torch.einsum("bqhd,bshd->bhqs", qs, kp)) / math.sqrt(2 * hd)
    expected = torch.einsum("bhqs,bshd->bqhd", logits.softmax(-1), v).reshape(b, q, dim)
    torch.testing.assert_close(out, later.out_proj(expected), atol=1e-5, rtol=1e-5)


def test_boxes_are_offsets_from_the_reference_point():
    """With the paper's init (last box layer zero) every box starts centred on its query's reference point,
    half the image in size."""
    m = tiny().eval()
    with torch.no_grad():
        out = m(torch.randn(1, 3, 64, 64))
        ref = m.transformer.ref_point_head(m.query_embed.weight).sigmoid()
    torch.testing.assert_close(out["pred_boxes"][0, :, :2], ref)
    torch.testing.assert_close(out["pred_boxes"][0, :, 2:], torch.full((9, 2), 0.5))
    assert out["pred_logits"].shape == (1, 9, 3) and len(out["aux_outputs"]) == 2
    torch.testing.assert_close(inverse_sigmoid(torch.tensor([0.25])).sigmoid(), torch.tensor([0.25]))


def test_forward_backward_with_padding_and_criterion():
    from detrkit.config import LossConfig, RunConfig
    from detrkit.engine import build_criterion

    m = tiny().train()
    x = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    out = m(x, mask)
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]
    run = RunConfig(model=m.config, loss=LossConfig(cost_class=2.0, weight_ce=2.0))
    criterion = build_criterion(run, m.config.num_classes)
    losses = criterion(out, targets)
    losses["loss"].backward()
    assert math.isfinite(losses["loss"].item())
    assert m.transformer.decoder[2].cross_attn.q_pos_sine.weight.grad is not None


def test_padding_does_not_change_an_images_outputs():
    m = tiny(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0).eval()
    small = torch.randn(1, 3, 64, 64)
    batch = torch.zeros(2, 3, 96, 128)
    batch[0, :, :64, :64] = small[0]
    batch[1] = torch.randn(3, 96, 128)
    mask = torch.ones(2, 96, 128, dtype=torch.bool)
    mask[0, :64, :64] = False
    mask[1] = False
    with torch.no_grad():
        alone = m(small)
        padded = m(batch, mask)
    assert (alone["pred_logits"][0] - padded["pred_logits"][0]).abs().max() < 1e-4
    assert (alone["pred_boxes"][0] - padded["pred_boxes"][0]).abs().max() < 1e-4


def test_build_from_preset_and_round_trip(tmp_path):
    m = detrkit.build("conditional_detr_r50", backbone_weights=None, num_classes=4)
    assert type(m).__name__ == "ConditionalDETR" and m.config.num_queries == 300 and m.config.focal
    small = tiny()
    small.save_pretrained(tmp_path / "m")
    loaded = detrkit.load(tmp_path / "m")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["pred_boxes"], small.eval()(x)["pred_boxes"])


# -- parity with transformers --------------------------------------------------------------------------------
def _hf_model(seed: int = 0, **overrides) -> torch.nn.Module:
    from test_parity_transformers import _randomize_

    kwargs = dict(
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "bird"},
        label2id={"cat": 0, "dog": 1, "bird": 2},
        d_model=64,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_queries=12,
        use_pretrained_backbone=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.ConditionalDetrForObjectDetection(transformers.ConditionalDetrConfig(**kwargs))
    _randomize_(model, seed)
    return model.eval()


def _assert_parity(hf_model, folder) -> torch.nn.Module:
    from test_parity_transformers import _max_diffs

    ours = detrkit.load(folder)
    logits, boxes = _max_diffs(hf_model, ours)
    assert logits <= TOLERANCE and boxes <= TOLERANCE, (logits, boxes)
    return ours


def test_parity_timm_backbone(tmp_path):
    hf = _hf_model(use_timm_backbone=True, backbone="resnet18")
    hf.save_pretrained(tmp_path)
    ours = _assert_parity(hf, tmp_path)
    c = ours.config
    assert (c.arch, c.class_loss, c.num_classes, c.num_queries, c.dec_layers) == ("conditional_detr", "focal", 3, 12, 3)
    assert ours.label_map.names == ("cat", "dog", "bird")


def test_parity_transformers_resnet_and_in_memory_names(tmp_path):
    from test_parity_transformers import _resnet18_config

    hf = _hf_model(backbone_config=_resnet18_config())
    hf.save_pretrained(tmp_path)
    _assert_parity(hf, tmp_path)
    state = hf.state_dict()  # 5.x in-memory names: self_attn.q_content_proj, encoder_attn.o_proj, mlp.fc1
    assert "model.decoder.layers.0.encoder_attn.q_pos_sine_proj.weight" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    _assert_parity(hf, tmp_path)


def test_refuses_an_unknown_model_type(tmp_path):
    hf = _hf_model(use_timm_backbone=True, backbone="resnet18")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "dab_detr"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'dab_detr'"):
        detrkit.load(tmp_path)


# -- official checkpoints ------------------------------------------------------------------------------------
def _to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """detrkit keys → the Atten4Vis/ConditionalDETR layout, written out independently of convert/."""
    out = {}
    proj = {"q_content": "qcontent", "q_pos": "qpos", "k_content": "kcontent", "k_pos": "kpos", "v": "v"}
    proj["q_pos_sine"] = "qpos_sine"
    for k, v in state.items():
        parts = k.split(".")
        if k.startswith("backbone.body."):
            out["backbone.0.body." + k.removeprefix("backbone.body.")] = v
        elif k.startswith("transformer.encoder."):
            _, _, n, module, *rest = parts
            if module == "self_attn":
                kind, param = rest
                if kind == "out_proj":
                    out[f"transformer.encoder.layers.{n}.self_attn.out_proj.{param}"] = v
                else:  # q/k/v packed in in_proj, in that order
                    key = f"transformer.encoder.layers.{n}.self_attn.in_proj_{param}"
                    out.setdefault(key, [None] * 3)["qkv".index(kind[0])] = v
            elif module == "ffn":
                out[f"transformer.encoder.layers.{n}.{rest[0]}.{rest[1]}"] = v
            else:
                out[f"transformer.encoder.layers.{n}.{module}.{rest[0]}"] = v
        elif k.startswith("transformer.decoder."):
            _, _, n, module, *rest = parts
            prefix = f"transformer.decoder.layers.{n}"
            if module in ("self_attn", "cross_attn"):
                kind, param = rest
                if kind == "out_proj":
                    out[f"{prefix}.{module}.out_proj.{param}"] = v
                else:
                    out[f"{prefix}.{'sa' if module == 'self_attn' else 'ca'}_{proj[kind]}_proj.{param}"] = v
            elif module == "ffn":
                out[f"{prefix}.{rest[0]}.{rest[1]}"] = v
            else:
                out[f"{prefix}.{module}.{rest[0]}"] = v
        elif k.startswith("transformer.decoder_norm."):
            out["transformer.decoder.norm." + parts[-1]] = v
        elif k.startswith(("transformer.query_scale.", "transformer.ref_point_head.")):
            out["transformer.decoder." + k.removeprefix("transformer.")] = v
        else:  # query_embed, input_proj, class_embed, bbox_embed
            out[k] = v
    return {k: torch.cat(v) if isinstance(v, list) else v for k, v in out.items()}


def test_official_checkpoint(tmp_path):
    import argparse

    ours = tiny(mask_backbone_padding=False).eval()
    official = _to_official(ours.state_dict())
    assert "transformer.decoder.layers.0.ca_qpos_proj.weight" in official
    assert "transformer.decoder.layers.1.ca_qpos_proj.weight" not in official
    args = argparse.Namespace(backbone="resnet18", nheads=4, dilation=False, dropout=0.1, aux_loss=True)
    torch.save({"model": official, "args": args}, tmp_path / "conditional_detr_r18.pth")
    loaded = detrkit.load(tmp_path / "conditional_detr_r18.pth")
    c = loaded.config
    assert (c.arch, c.class_loss, c.num_classes, c.num_queries, c.num_heads) == ("conditional_detr", "focal", 3, 9, 4)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["pred_logits"], ours(x)["pred_logits"])
        torch.testing.assert_close(loaded(x)["pred_boxes"], ours(x)["pred_boxes"])
