"""YOLOS weights → detrkit: transformers' ``YolosForObjectDetection`` folders, and the DeiT/ViT ImageNet
checkpoints a new YOLOS starts from (``ModelConfig.backbone_weights``).

detrkit's ViT (``models/yolos.py``, under ``backbone.`` in a YOLOS) keeps timm's names: ``cls_token``,
``det_token``, ``pos_embed`` (1, 1 + g_h·g_w + Q, D), ``mid_pos_embed`` (L-1, 1 + g_h·g_w + Q, D),
``patch_embed``, ``blocks.N.{norm1, attn.{q,k,v,out}_proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``.

Key layouts (``N`` block):

transformers ``YolosForObjectDetection.save_pretrained`` (``config.json`` with ``"model_type": "yolos"``)
    ``vit.embeddings.{cls_token, detection_tokens, position_embeddings, patch_embeddings.projection}``;
    ``vit.encoder.layer.N.`` + ``attention.attention.{query,key,value}``, ``attention.output.dense``,
    ``intermediate.dense`` (fc1), ``output.dense`` (fc2), ``layernorm_before``, ``layernorm_after``;
    ``vit.encoder.mid_position_embeddings`` (L-1, 1, S, D) (in memory under ``vit.encoder.interpolation.``);
    ``vit.layernorm``; heads ``class_labels_classifier.layers.{0,1,2}``, ``bbox_predictor.layers.{0,1,2}``.
transformers ViT/DeiT (``vit.``/``deit.`` or no prefix): the same embeddings and layers on disk; 5.x in memory
    ``layers.N.attention.{q,k,v,o}_proj``, ``layers.N.mlp.{fc1,fc2}``; DeiT adds
    ``embeddings.distillation_token`` (its position embedding is second in the table).
timm / official DeiT ``.pth`` (``{"model": state_dict}``)
    ``cls_token``, ``pos_embed``, ``dist_token`` (distilled), ``patch_embed.proj``,
    ``blocks.N.{norm1, attn.qkv (q, k, v packed), attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``.

Layer: io. May import config, the building blocks, ``models`` and ``convert.common``.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..config import ModelConfig
from ..models.yolos import LAYER_NORM_EPS, resize_patch_embeddings
from .common import (
    Converter,
    Rule,
    StateDict,
    apply_rules,
    check_against_model,
    hf_labels,
    listing,
    preview,
    read_transformers_weights,
    torch_load_tensors,
)

log = logging.getLogger("detrkit")

# -- the ViT's layers in transformers' layouts ------------------------------------------------------------------
_HF_LAYER_PARTS = {
    # 4.x, and 5.x on disk
    "attention.attention.query": "attn.q_proj",
    "attention.attention.key": "attn.k_proj",
    "attention.attention.value": "attn.v_proj",
    "attention.output.dense": "attn.out_proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    # 5.x ViT/DeiT in memory
    "attention.q_proj": "attn.q_proj",
    "attention.k_proj": "attn.k_proj",
    "attention.v_proj": "attn.v_proj",
    "attention.o_proj": "attn.out_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def hf_vit_rules(src: str, dst: str) -> list[Rule]:
    """Rules for a transformers ViT/DeiT/YOLOS encoder whose keys start with ``src`` (a regex) → detrkit's ViT
    names under ``dst``. Position embeddings and extra tokens are the caller's."""

    def layer(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]] | None:
        index, part, param = m.groups()
        ours = _HF_LAYER_PARTS.get(part)
        return None if ours is None else [(f"{dst}blocks.{index}.{ours}.{param}", t)]

    return [
        (re.compile(src + r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)"), layer),
        (re.compile(src + r"embeddings\.cls_token"), f"{dst}cls_token"),
        (re.compile(src + r"embeddings\.patch_embeddings\.projection\.(weight|bias)"), dst + r"patch_embed.\1"),
        (re.compile(src + r"layernorm\.(weight|bias)"), dst + r"norm.\1"),
    ]


def _timm_qkv(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]]:
    """timm packs the q, k, v projections in ``attn.qkv``, in that order."""
    index, param = m.groups()
    if t.shape[0] % 3:
        raise ValueError(f"{m.group(0)} has {t.shape[0]} rows, not three equal q, k, v parts")
    # clone: separate storages, so the converted dict can be written with safetensors
    return [(f"blocks.{index}.attn.{p}_proj.{param}", c.clone()) for p, c in zip("qkv", t.chunk(3), strict=True)]


_TIMM_RULES: list[Rule] = [
    (re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)"), _timm_qkv),
    (re.compile(r"blocks\.(\d+)\.attn\.proj\.(weight|bias)"), r"blocks.\1.attn.out_proj.\2"),
    (re.compile(r"blocks\.(\d+)\.(?:norm1|norm2|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)"), r"\g<0>"),
    (re.compile(r"patch_embed\.proj\.(weight|bias)"), r"patch_embed.\1"),
    (re.compile(r"cls_token|norm\.(?:weight|bias)"), r"\g<0>"),
]

# ImageNet classification parts that a detector does not use (reported, not silently dropped).
_TIMM_UNUSED = re.compile(r"(?:head|head_dist|fc_norm|pre_logits)\..+")
_HF_UNUSED = re.compile(r"(?:classifier|cls_classifier|distillation_classifier)\..+|(?:.*\.)?pooler\..+|.*mask_token")


# -- transformers YolosForObjectDetection ------------------------------------------------------------------------
def _mid_position_embeddings(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]]:
    """transformers keeps a broadcast dimension: (L-1, 1, S, D) → (L-1, S, D)."""
    if t.dim() != 4 or t.shape[1] != 1:
        raise ValueError(f"{m.group(0)} has shape {tuple(t.shape)}, expected (layers - 1, 1, sequence, width)")
    return [("backbone.mid_pos_embed", t[:, 0].clone())]


_HF_RULES: list[Rule] = [
    *hf_vit_rules(r"vit\.", "backbone."),
    (re.compile(r"vit\.embeddings\.detection_tokens"), "backbone.det_token"),
    (re.compile(r"vit\.embeddings\.position_embeddings"), "backbone.pos_embed"),
    (re.compile(r"vit\.encoder\.(?:interpolation\.)?mid_position_embeddings"), _mid_position_embeddings),
    (re.compile(r"class_labels_classifier\.layers\.(\d+)\.(weight|bias)"), r"class_embed.layers.\1.\2"),
    (re.compile(r"bbox_predictor\.layers\.(\d+)\.(weight|bias)"), r"bbox_embed.layers.\1.\2"),
]

# transformers' YolosConfig defaults (4.x and 5.x), for config.json files that omit a field
_YOLOS_CONFIG_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "layer_norm_eps": 1e-12,
    "image_size": [512, 864],
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "num_detection_tokens": 100,
    "use_mid_position_embeddings": True,
}


def convert_transformers(
    hf_config: dict[str, Any], state: StateDict, *, source: str = "checkpoint"
) -> tuple[ModelConfig, StateDict]:
    """Convert a ``YolosForObjectDetection`` state dict and its ``config.json`` (as a dict) to detrkit.

    The config gets ``vit_padding="ignore"``: like transformers, padded patches are attended to, so outputs equal
    the reference's on padded batches too (``detrkit.load(path, vit_padding="mask")`` makes an image's outputs
    independent of its batch instead; see ``models/yolos.py``).
    """
    converted, unknown = apply_rules(state, _HF_RULES)
    config = _hf_model_config(hf_config, state=converted, source=source)
    check_against_model(config, converted, unknown=unknown, source=source)
    return config, converted


def _pair(value: Any, name: str, source: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"{source}: {name} must be an integer or [height, width], got {value!r}")


def _hf_model_config(hf: dict[str, Any], *, state: StateDict, source: str) -> ModelConfig:
    """``ModelConfig`` from a transformers ``YolosConfig`` dict; absent fields take YolosConfig's defaults."""
    hf = {**_YOLOS_CONFIG_DEFAULTS, **hf}
    if not hf["qkv_bias"]:
        raise ValueError(f"{source}: qkv_bias=False is not supported (detrkit's ViT has q, k, v biases)")
    if hf["hidden_act"] != "gelu":
        raise ValueError(f"{source}: activation {hf['hidden_act']!r} is not supported (exact gelu only)")
    if not math.isclose(float(hf["layer_norm_eps"]), LAYER_NORM_EPS, rel_tol=1e-6):
        raise ValueError(
            f"{source}: layer_norm_eps={hf['layer_norm_eps']} is not supported; detrkit's YOLOS uses "
            f"transformers' default {LAYER_NORM_EPS}"
        )
    if hf["num_channels"] != 3:
        raise ValueError(f"{source}: only 3-channel (RGB) inputs are supported, not {hf['num_channels']}")
    patch_h, patch_w = _pair(hf["patch_size"], "patch_size", source)
    if patch_h != patch_w:
        raise ValueError(f"{source}: non-square patches {patch_h}×{patch_w} are not supported")
    if "class_embed.layers.2.weight" not in state:
        raise ValueError(f"{source} has no class head (class_labels_classifier): a YolosModel without heads?")
    num_classes = state["class_embed.layers.2.weight"].shape[0] - 1
    category_ids, class_names = hf_labels(hf, num_classes, source)
    return ModelConfig(
        arch="yolos",
        backbone="vit",
        num_classes=num_classes,
        category_ids=category_ids,
        class_names=class_names,
        backbone_weights=None,
        hidden_dim=int(hf["hidden_size"]),
        num_heads=int(hf["num_attention_heads"]),
        enc_layers=int(hf["num_hidden_layers"]),
        ffn_dim=int(hf["intermediate_size"]),
        num_queries=int(hf["num_detection_tokens"]),
        patch_size=patch_h,
        pretrain_image_size=_pair(hf["image_size"], "image_size", source),
        mid_position_embeddings=bool(hf["use_mid_position_embeddings"]),
        vit_padding="ignore",
        dropout=float(hf["hidden_dropout_prob"]),
        attention_dropout=float(hf["attention_probs_dropout_prob"]),
        activation_dropout=0.0,  # transformers' ViT MLP has no dropout between its two layers
        class_loss="softmax",
        aux_loss=False,  # YOLOS has no auxiliary outputs (transformers' option only adds training losses)
    )


# -- DeiT/ViT ImageNet checkpoints → a new YOLOS's ViT ----------------------------------------------------------
def read_vit_checkpoint(path: str | Path) -> StateDict:
    """The tensors of a ViT/DeiT checkpoint: a ``.safetensors`` file, a ``.pth``/``.bin`` torch file (a state
    dict, or ``{"model": ...}`` / ``{"state_dict": ...}`` as DeiT releases them; read weights-only), or a
    transformers folder."""
    path = Path(path)
    if path.is_dir():
        return read_transformers_weights(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone_weights: no ViT/DeiT checkpoint at {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch_load_tensors(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict of tensors (found {preview(obj)})")
    return obj


def _vit_layout(state: StateDict, source: str) -> tuple[str, list[Rule], str, str | None, re.Pattern]:
    """Which layout a ViT checkpoint has: (name, rules, position-embedding key, distillation-token key, unused)."""
    if any(k.endswith("embeddings.detection_tokens") or k.startswith("backbone.det_token") for k in state):
        raise ValueError(
            f"{source} is a YOLOS detector, not an ImageNet ViT: fine-tune from it with train.init_weights "
            "(or detrkit.load it) instead of model.backbone_weights"
        )
    if "pos_embed" in state or any(k.startswith("blocks.") for k in state):
        return "timm", _TIMM_RULES, "pos_embed", "dist_token", _TIMM_UNUSED
    for key in state:
        m = re.fullmatch(r"(.*?)embeddings\.patch_embeddings\.projection\.weight", key)
        if m:
            prefix = m.group(1)
            rules = hf_vit_rules(re.escape(prefix), "")
            return (
                f"transformers ({prefix or 'no prefix'})",
                rules,
                f"{prefix}embeddings.position_embeddings",
                f"{prefix}embeddings.distillation_token",
                _HF_UNUSED,
            )
    raise ValueError(
        f"{source} is not a ViT/DeiT checkpoint in timm layout (cls_token, pos_embed, blocks.N...) or transformers "
        f"layout (vit.embeddings..., vit.encoder.layer.N...); keys: {preview(state)}"
    )


@torch.no_grad()
def init_vit_from_checkpoint(vit: nn.Module, path: str | Path) -> None:
    """Initialise a ``models.yolos.VisionTransformer`` from a DeiT/ViT ImageNet checkpoint, as YOLOS does
    (paper Sec. 2.1): the patch embedding, [CLS] token, blocks and final norm are copied; the [CLS] and patch
    position embeddings are copied with the patch grid resized (bicubic) from the checkpoint's square grid to
    the pre-training grid; the detection tokens, their position embeddings and the mid-layer position embeddings
    keep their random initialisation. A DeiT distillation token and its position embedding are dropped.

    Raises ``ValueError`` when the checkpoint does not fit (width, depth, MLP width or patch size differ, or a
    key is unknown); logs what was loaded, what is new and what the checkpoint had that is unused.
    """
    source = str(path)
    state = read_vit_checkpoint(path)
    layout, rules, pos_key, dist_key, unused_pattern = _vit_layout(state, source)
    if pos_key not in state:
        raise ValueError(f"{source} ({layout} layout) has no position embeddings ({pos_key})")
    pos = state.pop(pos_key)  # (1, extra + g·g, D)
    dist = state.pop(dist_key, None)
    unused = sorted(k for k in state if unused_pattern.fullmatch(k))
    converted, unknown = apply_rules({k: v for k, v in state.items() if k not in unused}, rules)

    expected = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    new = {"det_token", "pos_embed", "mid_pos_embed"}  # not in an ImageNet ViT (pos_embed is filled below)
    wrong = [
        f"{k}: checkpoint {tuple(converted[k].shape)}, model {expected[k]}"
        for k in sorted(converted.keys() & expected.keys())
        if tuple(converted[k].shape) != expected[k]
    ]
    problems = {
        "checkpoint keys detrkit does not know": unknown,
        "checkpoint weights the model does not have": sorted(converted.keys() - expected.keys()),
        "model weights missing from the checkpoint": sorted(expected.keys() - converted.keys() - new),
        "shapes that differ": wrong,
    }
    lines = [f"  {len(items)} {title}:\n{listing(items)}" for title, items in problems.items() if items]
    if lines:
        depth = len({k.split(".")[1] for k in converted if k.startswith("blocks.")})
        width = converted["cls_token"].shape[-1] if "cls_token" in converted else "?"
        raise ValueError(
            f"backbone_weights {source} ({layout} layout: width {width}, {depth} blocks) does not fit this "
            f"YOLOS's ViT (width {vit.pos_embed.shape[-1]}, {len(vit.blocks)} blocks): hidden_dim, enc_layers, "
            "ffn_dim and patch_size must match the checkpoint's:\n" + "\n".join(lines)
        )

    extra = 2 if dist is not None else 1  # [CLS] (and the distillation token) come before the patches
    if pos.dim() != 3 or pos.shape[-1] != vit.pos_embed.shape[-1]:
        raise ValueError(
            f"{source}: position embeddings of shape {tuple(pos.shape)} do not fit width {vit.pos_embed.shape[-1]}"
        )
    side = math.isqrt(pos.shape[1] - extra)
    if side * side != pos.shape[1] - extra:
        raise ValueError(
            f"{source}: {pos.shape[1] - extra} patch position embeddings are not a square grid (an ImageNet ViT's)"
        )
    patches = resize_patch_embeddings(pos[:, extra:].float(), (side, side), vit.grid)  # (1, g_h·g_w, D)
    vit.pos_embed[:, :1] = pos[:, :1]
    vit.pos_embed[:, 1 : 1 + patches.shape[1]] = patches
    vit.load_state_dict(converted, strict=False)

    depth = len(vit.blocks)
    not_loaded = ["det_token", "the detection tokens' position embeddings"]
    if getattr(vit, "mid_pos_embed", None) is not None:
        not_loaded.append("mid_pos_embed")
    dropped = unused + (["the distillation token and its position embedding"] if dist is not None else [])
    log.info(
        "initialised the YOLOS ViT from %s (%s layout): loaded patch_embed, cls_token, blocks 0-%d and norm, and "
        "the [CLS] and patch position embeddings (patch grid resized %d×%d → %d×%d); new (random): %s and the "
        "class and box heads; not used from the checkpoint: %s",
        source,
        layout,
        depth - 1,
        side,
        side,
        *vit.grid,
        ", ".join(not_loaded),
        ", ".join(dropped) or "nothing",
    )


CONVERTER = Converter(
    arch="yolos",
    transformers_model_types=("yolos",),
    convert_transformers=convert_transformers,
    init_backbone=lambda model, weights: init_vit_from_checkpoint(model.backbone, weights),
)
