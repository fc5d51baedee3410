"""DETR (facebookresearch/detr and transformers' ``DetrForObjectDetection``) weights → detrkit.

Key layouts (``N`` transformer layer, ``S`` ResNet stage 0-3, ``B`` block, ``C`` convolution 0-2 of a block):

transformers, ``DetrForObjectDetection.save_pretrained`` (``config.json`` with ``"model_type": "detr"``)
    timm backbone (4.x ``"use_timm_backbone": true``; 5.x ``backbone_config.model_type == "timm_backbone"``):
        ``model.backbone.conv_encoder.model.{conv1,bn1,layerS.B.{convC,bnC,downsample.0,downsample.1}}`` in
        torchvision's names. 5.x writes this legacy name to disk too (it renames when saving); its in-memory
        ``state_dict()`` has ``model.backbone.model.*``, which is accepted as well.
    transformers ResNet backbone (``backbone_config.model_type == "resnet"``):
        ``model.backbone.conv_encoder.model.embedder.embedder.{convolution,normalization}`` (the stem) and
        ``...model.encoder.stages.S.layers.B.{layer.C,shortcut}.{convolution,normalization}``.
    learned position embeddings: 4.x ``model.backbone.position_embedding.{row,column}_embeddings``, 5.x
        ``model.position_embedding.{row,column}_embeddings``.
    transformer: ``model.{encoder,decoder}.layers.N.`` + ``self_attn.{q,k,v,out}_proj``, ``encoder_attn.*``
        (the decoder's cross-attention), ``self_attn_layer_norm``, ``encoder_attn_layer_norm``,
        ``final_layer_norm``, ``fc1``, ``fc2`` (5.x in memory: ``o_proj``, ``mlp.fc1``, ``mlp.fc2``);
        ``model.decoder.layernorm``, ``model.input_projection``, ``model.query_position_embeddings``.
    heads: ``class_labels_classifier``, ``bbox_predictor.layers.{0,1,2}``.
    ``DetrForSegmentation``: all of the above under ``detr.``, and the mask head beside it (``M`` 1-5, ``A`` 1-3):
        ``bbox_attention.{q_linear,k_linear}``, ``mask_head.{layM,gnM,adapterA,out_lay}`` on disk (4.x, and 5.x,
        which renames back when saving); 5.x in memory: ``bbox_attention.{q_proj,k_proj}``,
        ``mask_head.{conv1,conv2}.{conv,norm}``, ``mask_head.fpn_stages.{0,1,2}.{fpn_adapter,refine.conv,
        refine.norm}``, ``mask_head.output_conv``. The backbone returns its four stages (``out_indices`` 1-4).

official facebookresearch/detr ``.pth`` (``{"model": state_dict, "args": Namespace, ...}``)
    ``backbone.0.body.*`` (torchvision names), ``backbone.1.{row,col}_embed`` (learned encodings),
    ``transformer.{encoder,decoder}.layers.N.{self_attn,multihead_attn}.{in_proj_weight,in_proj_bias}`` (q, k
    and v packed in one tensor) and ``.out_proj``, ``linear1``, ``linear2``, ``norm1..3``;
    ``transformer.decoder.norm``, ``query_embed``, ``input_proj``, ``class_embed``, ``bbox_embed.layers.N``.
    panoptic (``DETRsegm``: ``detr-r50-panoptic-*.pth``, ...): all of the above under ``detr.``, and
    ``bbox_attention.{q_linear,k_linear}``, ``mask_head.{layM,gnM,adapterA,out_lay}`` (the names 4.x kept).

Layer: io. May import config, the building blocks, ``models`` and ``convert.common``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import ModelConfig
from .common import (
    Converter,
    Rule,
    StateDict,
    apply_rules,
    check_against_model,
    count_layers,
    hf_labels,
    hf_resnet_body,
    resnet_name,
)

# -- transformers -----------------------------------------------------------------------------------------
_HF_PARTS = {
    "encoder": {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"},
    "decoder": {
        "self_attn_layer_norm": "norm1",
        "encoder_attn_layer_norm": "norm2",
        "final_layer_norm": "norm3",
    },
}
_HF_ATTN = {
    "encoder": {"self_attn": "self_attn"},
    "decoder": {"self_attn": "self_attn", "encoder_attn": "cross_attn"},
}
_HF_PROJ = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "out_proj": "out_proj",
    "o_proj": "out_proj",
}


def _hf_layer(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]] | None:
    """``model.{encoder,decoder}.layers.N.<part>.<param>`` → ``transformer.{encoder,decoder}.N.<ours>``."""
    stack, index, part, param = m.groups()
    ours = _HF_PARTS[stack].get(part)
    fc = re.fullmatch(r"(?:mlp\.)?fc([12])", part)  # 4.x, and 5.x on disk: fc1; 5.x in memory: mlp.fc1
    module, _, proj = part.partition(".")
    if fc:
        ours = f"ffn.linear{fc.group(1)}"
    elif module in _HF_ATTN[stack] and proj in _HF_PROJ:
        ours = f"{_HF_ATTN[stack][module]}.{_HF_PROJ[proj]}"
    return None if ours is None else [(f"transformer.{stack}.{index}.{ours}.{param}", t)]


_HF_RULES: list[Rule] = [
    (re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)"), _hf_layer),
    (re.compile(r"model\.decoder\.layernorm\.(weight|bias)"), r"transformer.decoder_norm.\1"),
    (re.compile(r"model\.query_position_embeddings\.weight"), "query_embed.weight"),
    (re.compile(r"model\.input_projection\.(weight|bias)"), r"input_proj.\1"),
    # 4.x keeps the position embedding inside its backbone wrapper (DetrConvModel); 5.x on the model
    (
        re.compile(r"model\.(?:backbone\.)?position_embedding\.row_embeddings\.weight"),
        "position_encoding.row_embed.weight",
    ),
    (
        re.compile(r"model\.(?:backbone\.)?position_embedding\.column_embeddings\.weight"),
        "position_encoding.col_embed.weight",
    ),
    (re.compile(r"class_labels_classifier\.(weight|bias)"), r"class_embed.\1"),
    (re.compile(r"bbox_predictor\.layers\.(\d+)\.(weight|bias)"), r"bbox_embed.layers.\1.\2"),
    # the backbone body: its names are mapped next, once we know which ResNet implementation wrote them
    (re.compile(r"model\.backbone\.(?:conv_encoder\.)?model\.(.+)"), r"<body>\1"),
]


# the mask head: facebookresearch/detr's names (which transformers 4.x kept, and 5.x writes to disk), then
# transformers 5.x in memory. detrkit's: blocks 0-4 (3×3 convolution + GroupNorm), adapters 0-2, out_conv.
MASK_RULES: list[Rule] = [
    (re.compile(r"bbox_attention\.([qk])_(?:linear|proj)\.(weight|bias)"), r"bbox_attention.\1_proj.\2"),
    (
        re.compile(r"mask_head\.(lay|gn)([1-5])\.(weight|bias)"),
        lambda m, t: [(f"mask_head.blocks.{int(m[2]) - 1}.{'conv' if m[1] == 'lay' else 'norm'}.{m[3]}", t)],
    ),
    (
        re.compile(r"mask_head\.conv([12])\.(conv|norm)\.(weight|bias)"),
        lambda m, t: [(f"mask_head.blocks.{int(m[1]) - 1}.{m[2]}.{m[3]}", t)],
    ),
    (
        re.compile(r"mask_head\.fpn_stages\.([0-2])\.refine\.(conv|norm)\.(weight|bias)"),
        lambda m, t: [(f"mask_head.blocks.{int(m[1]) + 2}.{m[2]}.{m[3]}", t)],
    ),
    (
        re.compile(r"mask_head\.adapter([1-3])\.(weight|bias)"),
        lambda m, t: [(f"mask_head.adapters.{int(m[1]) - 1}.{m[2]}", t)],
    ),
    (re.compile(r"mask_head\.fpn_stages\.([0-2])\.fpn_adapter\.(weight|bias)"), r"mask_head.adapters.\1.\2"),
    (re.compile(r"mask_head\.(?:out_lay|output_conv)\.(weight|bias)"), r"mask_head.out_conv.\1"),
]


def split_segmentation(state: StateDict, wrapper: str) -> tuple[StateDict, bool]:
    """A segmentation checkpoint keeps its detector under ``wrapper`` (``detr.``, ``conditional_detr.``) beside
    ``bbox_attention.*`` and ``mask_head.*``: returns the state with that prefix removed, and whether it has the
    mask head. Other state dicts come back as they are."""
    masks = any(k.startswith(("bbox_attention.", "mask_head.")) for k in state)
    if not masks and not any(k.startswith(wrapper) for k in state):
        return state, False
    return {k.removeprefix(wrapper): v for k, v in state.items()}, masks


# official facebookresearch/detr
_OFFICIAL_ATTN = {"self_attn": "self_attn", "multihead_attn": "cross_attn"}


def _official_attention(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]]:
    """``nn.MultiheadAttention`` packs the q, k, v projections in ``in_proj_{weight,bias}``, in that order."""
    stack, index, module, which, param = m.groups()
    prefix = f"transformer.{stack}.{index}.{_OFFICIAL_ATTN[module]}"
    if which == "out_proj.":
        return [(f"{prefix}.out_proj.{param}", t)]
    if t.shape[0] % 3:
        raise ValueError(f"{m.group(0)} has {t.shape[0]} rows, not three equal q, k, v parts")
    # clone: separate storages, so the converted dict can be written with safetensors
    return [(f"{prefix}.{p}_proj.{param}", c.clone()) for p, c in zip("qkv", t.chunk(3), strict=True)]


_OFFICIAL_RULES: list[Rule] = [
    (re.compile(r"backbone\.0\.body\.(.+)"), r"backbone.body.\1"),
    (re.compile(r"backbone\.1\.(row|col)_embed\.weight"), r"position_encoding.\1_embed.weight"),
    (
        re.compile(
            r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|multihead_attn)"
            r"\.(in_proj_|out_proj\.)(weight|bias)"
        ),
        _official_attention,
    ),
    (
        re.compile(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.linear([12])\.(weight|bias)"),
        r"transformer.\1.\2.ffn.linear\3.\4",
    ),
    (
        re.compile(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(norm[123])\.(weight|bias)"),
        r"transformer.\1.\2.\3.\4",
    ),
    (re.compile(r"transformer\.decoder\.norm\.(weight|bias)"), r"transformer.decoder_norm.\1"),
    (re.compile(r"query_embed\.weight|(?:input_proj|class_embed)\.(?:weight|bias)"), r"\g<0>"),
    (re.compile(r"bbox_embed\.layers\.(\d+)\.(weight|bias)"), r"\g<0>"),
]


def convert_transformers(
    hf_config: dict[str, Any],
    state: StateDict,
    *,
    source: str = "checkpoint",
    arch: str = "detr",
    rules: list[Rule] | None = None,
) -> tuple[ModelConfig, StateDict]:
    """Convert a ``DetrForObjectDetection`` or ``DetrForSegmentation`` state dict and its ``config.json`` (as a
    dict) to detrkit; a segmentation checkpoint gives a ``masks=True`` model.

    Reads the 4.x and 5.x layouts with a timm or a transformers ResNet backbone (see the module docstring).
    ``arch`` and ``rules`` let single-scale relatives with DETR's backbone and encoder (Conditional DETR) reuse it:
    their rules for what differs come before DETR's. A segmentation model keeps its detector under ``{arch}.``.
    """
    state, masks = split_segmentation(state, f"{arch}.")
    renamed, unknown = apply_rules(state, (rules or []) + _HF_RULES + MASK_RULES)
    rest = {k: v for k, v in renamed.items() if not k.startswith("<body>")}
    body, name, dilation, _, _ = hf_resnet_body(hf_config, renamed, unknown, source)

    config = _hf_model_config(hf_config, backbone=name, dilation=dilation, state=rest, source=source, arch=arch)
    config = config.replace(masks=masks)
    converted = {**{f"backbone.body.{k}": v for k, v in body.items()}, **rest}
    check_against_model(config, converted, unknown=unknown, source=source)
    return config, converted


# transformers' DetrConfig defaults (the same in 4.x and 5.x), for config.json files that omit a field
_DETR_CONFIG_DEFAULTS: dict[str, Any] = {
    "d_model": 256,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_ffn_dim": 2048,
    "decoder_ffn_dim": 2048,
    "num_queries": 100,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "auxiliary_loss": False,
    "position_embedding_type": "sine",
}


# what other single-scale configs default differently (ConditionalDetrConfig: 300 queries)
_CONFIG_DEFAULTS_BY_ARCH: dict[str, dict[str, Any]] = {"conditional_detr": {"num_queries": 300}}
# sigmoid (focal) class heads have K outputs, softmax heads K+1
_FOCAL_ARCHS = ("conditional_detr",)


def _hf_model_config(
    hf: dict[str, Any], *, backbone: str, dilation: bool, state: StateDict, source: str, arch: str = "detr"
) -> ModelConfig:
    """``ModelConfig`` from a transformers ``DetrConfig`` dict; absent fields take DetrConfig's defaults."""
    hf = {**_DETR_CONFIG_DEFAULTS, **_CONFIG_DEFAULTS_BY_ARCH.get(arch, {}), **hf}
    focal = arch in _FOCAL_ARCHS
    for enc, dec in (
        ("encoder_ffn_dim", "decoder_ffn_dim"),
        ("encoder_attention_heads", "decoder_attention_heads"),
    ):
        if hf[enc] != hf[dec]:
            raise ValueError(f"{source}: {enc}={hf[enc]} but {dec}={hf[dec]}; detrkit needs them equal")
    if hf.get("activation_function", "relu") != "relu":
        raise ValueError(f"{source}: activation {hf['activation_function']!r} is not supported (relu only)")
    if hf["auxiliary_loss"]:
        # With auxiliary_loss on, transformers feeds each decoder layer the LayerNorm'ed output of the
        # previous one (and norms the last twice); the official DETR and detrkit norm only the head inputs.
        warnings.warn(
            f"{source} has auxiliary_loss=True: transformers then applies the decoder's final LayerNorm "
            "between decoder layers, the official DETR and detrkit do not: outputs differ from transformers'",
            stacklevel=4,
        )
    if "class_embed.weight" not in state:
        raise ValueError(f"{source} has no class head (class_labels_classifier): a DetrModel without heads?")
    num_classes = state["class_embed.weight"].shape[0] - (0 if focal else 1)
    category_ids, class_names = hf_labels(hf, num_classes, source)
    return ModelConfig(
        arch=arch,
        class_loss="focal" if focal else "softmax",
        num_classes=num_classes,
        category_ids=category_ids,
        class_names=class_names,
        backbone=backbone,
        dilation=dilation,
        trainable_stages=3,
        backbone_weights=None,
        mask_backbone_padding=False,
        position_embedding=hf["position_embedding_type"],
        hidden_dim=hf["d_model"],
        num_heads=hf["encoder_attention_heads"],
        enc_layers=hf["encoder_layers"],
        dec_layers=hf["decoder_layers"],
        ffn_dim=hf["encoder_ffn_dim"],
        dropout=float(hf["dropout"]),
        attention_dropout=float(hf["attention_dropout"]),
        activation_dropout=float(hf["activation_dropout"]),
        num_queries=hf["num_queries"],
        aux_loss=bool(hf["auxiliary_loss"]),
    )


# -- official .pth files -----------------------------------------------------------------------------------
def is_official(state: StateDict) -> bool:
    return any(k.startswith(("backbone.0.body.", "detr.backbone.0.body.")) for k in state)


def convert_official_file(
    state: StateDict, *, args: dict[str, Any] | None, source: str, path: Path
) -> tuple[ModelConfig, StateDict]:
    return convert_official(state, args=args, source=source, dilation_hint="dc5" in path.name.lower())


def convert_official(
    state: dict[str, Any],
    *,
    args: dict[str, Any] | None = None,
    source: str = "checkpoint",
    dilation_hint: bool = False,
    arch: str = "detr",
    rules: list[Rule] | None = None,
) -> tuple[ModelConfig, StateDict]:
    """Convert an official facebookresearch/detr state dict; the config comes from tensor shapes and ``args``.

    ``args`` (the training arguments, when the checkpoint kept them) tell what weights cannot: the number of
    heads, DC5 dilation and dropout. Without them: 8 heads and dropout 0.1 (the official defaults), and
    ``dilation_hint``. The official class head is indexed by dataset category id (COCO: 91 classes, ids
    0..90; COCO panoptic: 250, ids 0..249), so labels are their own ids. A panoptic checkpoint (``DETRsegm``:
    the detector under ``detr.``, the mask head beside it) gives a ``masks=True`` model.
    """
    args = args or {}
    state, masks = split_segmentation(state, "detr.")
    if "transformer.encoder.norm.weight" in state or args.get("pre_norm"):
        raise ValueError(f"{source} is a pre-norm DETR (--pre_norm); detrkit implements the post-norm transformer")
    if any(not isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source}: the state dict holds values that are not tensors")
    converted, unknown = apply_rules(state, (rules or []) + _OFFICIAL_RULES + MASK_RULES)
    focal = arch in _FOCAL_ARCHS
    for needed in ("class_embed.weight", "query_embed.weight", "transformer.encoder.0.ffn.linear1.weight"):
        if needed not in converted:
            raise ValueError(f"{source} has no {needed}: not a DETR detection checkpoint")
    body = {k.removeprefix("backbone.body."): v for k, v in converted.items() if k.startswith("backbone.body.")}
    name = resnet_name(body, source)
    if args.get("backbone") and args["backbone"] != name:
        raise ValueError(f"{source}: args.backbone is {args['backbone']!r} but the weights are a {name}")
    ffn = {v.shape[0] for k, v in converted.items() if k.endswith("ffn.linear1.weight")}
    if len(ffn) != 1:
        raise ValueError(f"{source}: feed-forward widths differ between layers ({sorted(ffn)})")
    num_queries, hidden_dim = converted["query_embed.weight"].shape
    dropout = float(args.get("dropout", 0.1))
    config = ModelConfig(
        arch=arch,
        class_loss="focal" if focal else "softmax",
        num_classes=converted["class_embed.weight"].shape[0] - (0 if focal else 1),
        backbone=name,
        dilation=bool(args["dilation"]) if "dilation" in args else dilation_hint,
        trainable_stages=3,
        backbone_weights=None,
        mask_backbone_padding=False,
        position_embedding="learned" if "position_encoding.row_embed.weight" in converted else "sine",
        hidden_dim=int(hidden_dim),
        num_heads=int(args.get("nheads", 8)),
        enc_layers=count_layers(converted, "transformer.encoder."),
        dec_layers=count_layers(converted, "transformer.decoder."),
        ffn_dim=ffn.pop(),
        # the official layers use one rate everywhere: residual, attention weights and inside the FFN
        dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=dropout,
        num_queries=int(num_queries),
        aux_loss=bool(args.get("aux_loss", True)),
        masks=masks,
    )
    check_against_model(config, converted, unknown=unknown, source=source)
    return config, converted


CONVERTER = Converter(
    arch="detr",
    transformers_model_types=("detr",),
    convert_transformers=convert_transformers,
    is_official=is_official,
    convert_official_file=convert_official_file,
)
