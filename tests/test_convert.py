"""Conversion of published checkpoints: official facebookresearch/detr ``.pth`` files, safe unpickling, the
errors for checkpoints detrkit cannot reproduce, and Hub id resolution (mocked: no test touches the network).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

import detrkit
from detrkit import convert

TINY = dict(
    num_classes=5,
    backbone="resnet18",
    hidden_dim=64,
    num_heads=4,
    enc_layers=2,
    dec_layers=2,
    ffn_dim=128,
    num_queries=10,
    mask_backbone_padding=False,  # as converted checkpoints are
)


@torch.no_grad()
def _randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for every tensor (detrkit initialises BatchNorm buffers, LayerNorms and attention biases
    to constants, which would hide a swapped weight)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if "embed" in name and t.dim() == 2:
            t.copy_(torch.randn(t.shape, generator=g))
        elif t.dim() == 1:
            positive = name.endswith(("running_var", ".weight"))
            t.copy_(torch.rand(t.shape, generator=g) + 0.5 if positive else 0.1 * torch.randn(t.shape, generator=g))
        else:
            t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
    return model.eval()


def _to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """detrkit keys → the official facebookresearch/detr layout (written independently of convert.py)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("backbone.body."):
            out["backbone.0." + key.removeprefix("backbone.")] = value
        elif key.startswith("position_encoding."):
            out["backbone.1." + key.removeprefix("position_encoding.")] = value
        elif key.startswith("transformer.decoder_norm."):
            out["transformer.decoder.norm." + parts[-1]] = value
        elif key.startswith(("transformer.encoder.", "transformer.decoder.")):
            stack, index, rest = parts[1], parts[2], parts[3:]
            prefix = f"transformer.{stack}.layers.{index}."
            if rest[0] in ("self_attn", "cross_attn"):
                module = "self_attn" if rest[0] == "self_attn" else "multihead_attn"
                if rest[1] == "out_proj":
                    out[prefix + f"{module}.out_proj.{rest[2]}"] = value
                elif rest[1] == "q_proj":  # pack q, k, v as nn.MultiheadAttention does
                    qkv = [state[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
                    out[prefix + f"{module}.in_proj_{rest[2]}"] = torch.cat(qkv)
            elif rest[0] == "ffn":
                out[prefix + ".".join(rest[1:])] = value
            else:
                out[prefix + ".".join(rest)] = value
        else:
            out[key] = value
    return out


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.zeros(2, 3, 64, 64)
    padding_mask = torch.ones(2, 64, 64, dtype=torch.bool)
    for i, (h, w) in enumerate([(50, 64), (64, 40)]):
        pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        padding_mask[i, :h, :w] = False
    return pixel_values, padding_mask


def _assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pixel_values, padding_mask = _batch()
    with torch.no_grad():
        out_a, out_b = a(pixel_values, padding_mask), b(pixel_values, padding_mask)
    assert torch.equal(out_a["pred_logits"], out_b["pred_logits"])
    assert torch.equal(out_a["pred_boxes"], out_b["pred_boxes"])


# -- official .pth -------------------------------------------------------------------------------------------
def test_official_pth_with_args(tmp_path):
    source = _randomize_(detrkit.build(**TINY))
    args = argparse.Namespace(
        backbone="resnet18", dilation=False, position_embedding="sine", nheads=4, dropout=0.05, aux_loss=False
    )
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": _to_official(source.state_dict()), "args": args, "epoch": 3}, path)

    loaded = detrkit.load(path)
    c = loaded.config
    assert (c.backbone, c.hidden_dim, c.num_heads, c.enc_layers, c.dec_layers) == ("resnet18", 64, 4, 2, 2)
    assert (c.ffn_dim, c.num_queries, c.num_classes, c.position_embedding) == (128, 10, 5, "sine")
    assert (c.dropout, c.attention_dropout, c.activation_dropout, c.aux_loss) == (0.05, 0.05, 0.05, False)
    assert c.mask_backbone_padding is False and c.trainable_stages == 3 and c.dilation is False
    assert loaded.label_map.category_ids == tuple(range(5))  # official heads are indexed by category id
    _assert_same_outputs(source, loaded)


def test_official_bare_state_dict_dc5_from_file_name(tmp_path):
    """Without ``args``: 8 heads (the official default), DC5 from ``dc5`` in the file name (or
    ``detrkit.load(path, dilation=...)``), learned positions from the keys; a bare state dict (no
    ``{"model": ...}`` wrapper) is read too."""
    tiny = {**TINY, "backbone": "resnet50", "dilation": True, "num_heads": 8, "position_embedding": "learned"}
    source = _randomize_(detrkit.build(**tiny))
    path = tmp_path / "detr-r50-dc5-tiny.pth"
    torch.save(_to_official(source.state_dict()), path)

    loaded = detrkit.load(path)
    c = loaded.config
    assert (c.backbone, c.dilation, c.num_heads, c.position_embedding) == ("resnet50", True, 8, "learned")
    _assert_same_outputs(source, loaded)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    sd = _to_official(detrkit.build(**TINY).state_dict())
    torch.save({"model": sd, "args": Payload()}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pth.*system"):
        detrkit.load(path)
    assert not marker.exists()

    # the same protection for transformers folders that ship pytorch_model.bin
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "detr"}))
    torch.save({"x": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to load"):
        detrkit.load(folder)
    assert not marker.exists()


def test_unknown_keys_are_listed(tmp_path):
    sd = _to_official(detrkit.build(**TINY).state_dict())
    sd["transformer.encoder.layers.0.mystery.weight"] = torch.zeros(3)
    sd["extra_head.weight"] = torch.zeros(3)
    sd["backbone.0.body.layer1.0.bn1.num_batches_tracked"] = torch.tensor(7)  # dropped: not a weight
    path = tmp_path / "detr.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError) as err:
        detrkit.load(path)
    message = str(err.value)
    assert "2 checkpoint keys detrkit does not know" in message
    assert "transformer.encoder.layers.0.mystery.weight" in message and "extra_head.weight" in message
    assert "num_batches_tracked" not in message


def test_missing_and_mismatched_keys_are_listed(tmp_path):
    sd = _to_official(detrkit.build(**TINY).state_dict())
    del sd["transformer.decoder.layers.1.norm3.bias"]
    sd["class_embed.bias"] = torch.zeros(9)  # the weight says 5 classes + no-object
    path = tmp_path / "detr.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError) as err:
        detrkit.load(path)
    message = str(err.value)
    assert "missing from the checkpoint" in message and "transformer.decoder.1.norm3.bias" in message
    assert "shapes that differ" in message and "class_embed.bias: checkpoint (9,), model (6,)" in message


def test_pre_norm_is_refused(tmp_path):
    sd = _to_official(detrkit.build(**TINY).state_dict())
    sd["transformer.encoder.norm.weight"] = torch.ones(64)
    path = tmp_path / "detr.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match="pre-norm"):
        detrkit.load(path)


def test_bare_detrkit_state_dict_is_refused(tmp_path):
    model = detrkit.build(**TINY)
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    with pytest.raises(ValueError, match="save_pretrained"):
        detrkit.load(path)


def test_unsupported_backbone_depth(tmp_path):
    sd = _to_official(detrkit.build(**TINY).state_dict())
    sd = {k: v for k, v in sd.items() if not k.startswith("backbone.0.body.layer4.1.")}
    path = tmp_path / "detr.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"\[2, 2, 2, 1\] basic blocks"):
        detrkit.load(path)


def test_unreadable_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        detrkit.load(path)


# -- transformers folders ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny transformers DETR (timm ResNet-18) written by save_pretrained."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("timm")
    config = transformers.DetrConfig(
        use_timm_backbone=True,
        backbone="resnet18",
        use_pretrained_backbone=False,
        num_labels=2,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_queries=10,
    )
    folder = tmp_path_factory.mktemp("hf_detr")
    transformers.DetrForObjectDetection(config).save_pretrained(folder)
    return folder


def _edited_copy(src, dst, *, config=None, state=None):
    """Copy a transformers folder, editing config.json (a dict update) and/or the state dict (a function)."""
    from safetensors.torch import load_file

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


def test_transformers_folder_reads_preprocessor_size(hf_folder, tmp_path):
    folder = _edited_copy(hf_folder, tmp_path / "m")
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 512, "longest_edge": 900}}))
    config, state = convert.load_published(folder)
    assert (config.image_size, config.max_size) == (512, 900)
    assert set(state) == set(detrkit.build(config).state_dict())


def test_other_model_type_is_refused(hf_folder, tmp_path):
    folder = _edited_copy(hf_folder, tmp_path / "m", config={"model_type": "rt_detr"})
    with pytest.raises(ValueError, match="'rt_detr' model"):
        detrkit.load(folder)


def test_transformers_unknown_keys_are_listed(hf_folder, tmp_path):
    def add(sd):
        sd["model.encoder.layers.0.mystery.weight"] = torch.zeros(2)
        sd["model.encoder.layers.0.encoder_attn.q_proj.weight"] = torch.zeros(2)  # encoders have no cross-attn
        return sd

    with pytest.raises(ValueError) as err:
        detrkit.load(_edited_copy(hf_folder, tmp_path / "m", state=add))
    assert "model.encoder.layers.0.mystery.weight" in str(err.value)
    assert "model.encoder.layers.0.encoder_attn.q_proj.weight" in str(err.value)


def test_transformers_config_that_disagrees_with_weights(hf_folder, tmp_path):
    folder = _edited_copy(hf_folder, tmp_path / "m", config={"num_queries": 20})
    with pytest.raises(ValueError, match=r"query_embed\.weight: checkpoint \(10, 64\), model \(20, 64\)"):
        detrkit.load(folder)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"backbone_config": {"backbone": "seresnet18"}}, "'seresnet18' is not supported"),
        ({"backbone_config": {"backbone": "resnet34"}}, "weights are a resnet18"),
        ({"backbone_config": {"output_stride": 8}}, "output_stride 8"),
        ({"decoder_ffn_dim": 256}, "encoder_ffn_dim=128 but decoder_ffn_dim=256"),
        ({"activation_function": "gelu"}, "'gelu' is not supported"),
        ({"backbone_config": {"model_type": "resnet"}}, "weights are a timm ResNet"),
        ({"id2label": {"0": "a", "1": "b", "2": "c"}}, "id2label has 3 labels"),
    ],
)
def test_transformers_layouts_detrkit_cannot_reproduce(hf_folder, tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        detrkit.load(_edited_copy(hf_folder, tmp_path / "m", config=edit))


def test_transformers_resnet_with_stride_on_1x1_is_refused():
    """transformers' ResNet with ``downsample_in_bottleneck=True`` strides the first 1x1 convolution (ResNet
    v1): torchvision's ResNet cannot compute that."""
    resnet = {"model_type": "resnet", "downsample_in_bottleneck": True}
    with pytest.raises(ValueError, match="downsample_in_bottleneck"):
        convert.common.check_hf_resnet(resnet, "resnet50", "test")


# -- Hub ids -------------------------------------------------------------------------------------------------
def test_hub_needs_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(ImportError, match=r"detrkit\[hub\]"):
        convert.resolve_hub_id("facebook/detr-resnet-50")


def test_hub_falls_back_to_the_local_cache(monkeypatch, hf_folder):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if not local_files_only:
            raise ConnectionError("no network")
        return str(hf_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert convert.resolve_hub_id("someone/detr") == hf_folder
    assert calls == [False, True]
    model = detrkit.load("someone/detr")  # the Hub-id branch of detrkit.load goes through resolve_hub_id
    assert model.config.backbone == "resnet18"


def test_hub_offline_and_not_cached(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def fake_snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        raise ConnectionError("no network") if not local_files_only else FileNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(OSError, match="not in the local cache"):
        convert.resolve_hub_id("someone/detr")
