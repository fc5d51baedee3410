"""Deformable DETR (fundamentalvision/Deformable-DETR and transformers' ``DeformableDetrForObjectDetection``)
weights → detrkit.

Key layouts (``N`` transformer layer, ``I`` head index: one per decoder layer, plus one for the encoder's
proposals in two-stage models, ``M`` MLP layer, ``V`` input projection of level V):

transformers (``config.json`` with ``"model_type": "deformable_detr"``)
    backbone: as DETR's (``model.backbone.conv_encoder.model.*``, timm or transformers ResNet; 5.x in memory
        ``model.backbone.model.*``), with stages 2-4 (``out_indices`` [2, 3, 4]) for multi-scale models.
    ``model.input_proj.V.{0,1}`` (convolution, GroupNorm), ``model.level_embed``,
    ``model.query_position_embeddings`` (position and content halves), ``model.reference_points``; two-stage:
    ``model.enc_output``, ``model.enc_output_norm``, ``model.pos_trans``, ``model.pos_trans_norm``.
    encoder: ``model.encoder.layers.N.self_attn.{sampling_offsets,attention_weights,value_proj,output_proj}``,
        ``self_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm`` (5.x in memory: ``mlp.fc1``).
    decoder: ``model.decoder.layers.N.self_attn.{q,k,v,out}_proj`` (5.x in memory ``o_proj``),
        ``self_attn_layer_norm``, ``encoder_attn.*`` (deformable cross-attention), ``encoder_attn_layer_norm``,
        ``fc1``, ``fc2``, ``final_layer_norm``.
    heads: ``class_embed.I``, ``bbox_embed.I.layers.M``; with box refinement the box heads (also) as
        ``model.decoder.bbox_embed.I``, two-stage the class heads (also) as ``model.decoder.class_embed.I``.
        Heads that are one shared module (the class head without two-stage in 5.x, every head of a model
        without box refinement) may be written once, as index 0.

official fundamentalvision/Deformable-DETR ``.pth`` (``{"model": state_dict, "args": Namespace, ...}``)
    ``backbone.0.body.*`` (torchvision names), ``backbone.1.{row,col}_embed`` (learned encodings),
    ``input_proj.V.{0,1}``, ``query_embed``, ``transformer.level_embed``, ``transformer.reference_points``;
    two-stage ``transformer.{enc_output,enc_output_norm,pos_trans,pos_trans_norm}``;
    ``transformer.encoder.layers.N.{self_attn.*,norm1,linear1,linear2,norm2}``;
    ``transformer.decoder.layers.N.{cross_attn.*,norm1,self_attn.{in_proj_weight,in_proj_bias,out_proj},norm2,
    linear1,linear2,norm3}`` (``norm2`` follows the self-attention, ``norm1`` the cross-attention);
    ``class_embed.I``, ``bbox_embed.I.layers.M``, repeated as ``transformer.decoder.{bbox,class}_embed.I`` when
    the decoder uses them. Without box refinement every index holds the same (shared) head.

Layer: io. May import config, the building blocks, ``models`` and ``convert.common``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig
from ..models.deformable_detr import BACKBONE_LEVELS
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

_ATTN = r"(sampling_offsets|attention_weights|value_proj|output_proj)"


def _head_rules(prefix: str) -> list[Rule]:
    """Rules that tag every class/box head key with where it came from, for ``_resolve_heads``."""
    p = re.escape(prefix)
    return [
        (re.compile(rf"({p})?class_embed\.(\d+)\.(weight|bias)"), r"<head>class|\1|\2|\3"),
        (re.compile(rf"({p})?bbox_embed\.(\d+)\.(layers\.\d+\.(?:weight|bias))"), r"<head>bbox|\1|\2|\3"),
    ]


# -- transformers ---------------------------------------------------------------------------------------------
_HF_ENC = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"}
_HF_DEC = {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3"}

_HF_RULES: list[Rule] = [
    (
        re.compile(rf"model\.encoder\.layers\.(\d+)\.self_attn\.{_ATTN}\.(weight|bias)"),
        r"encoder.layers.\1.self_attn.\2.\3",
    ),
    (
        re.compile(rf"model\.decoder\.layers\.(\d+)\.encoder_attn\.{_ATTN}\.(weight|bias)"),
        r"decoder.layers.\1.cross_attn.\2.\3",
    ),
    (
        re.compile(r"model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)"),
        r"decoder.layers.\1.self_attn.\2_proj.\3",
    ),
    (
        re.compile(r"model\.decoder\.layers\.(\d+)\.self_attn\.(?:out|o)_proj\.(weight|bias)"),
        r"decoder.layers.\1.self_attn.out_proj.\2",
    ),
    (
        re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(?:mlp\.)?fc([12])\.(weight|bias)"),
        r"\1.layers.\2.ffn.linear\3.\4",
    ),
    (
        re.compile(r"model\.encoder\.layers\.(\d+)\.(self_attn_layer_norm|final_layer_norm)\.(weight|bias)"),
        lambda m, t: [(f"encoder.layers.{m[1]}.{_HF_ENC[m[2]]}.{m[3]}", t)],
    ),
    (
        re.compile(r"model\.decoder\.layers\.(\d+)\.(\w+_layer_norm)\.(weight|bias)"),
        lambda m, t: [(f"decoder.layers.{m[1]}.{_HF_DEC[m[2]]}.{m[3]}", t)] if m[2] in _HF_DEC else None,
    ),
    (re.compile(r"model\.input_proj\.(\d+)\.([01])\.(weight|bias)"), r"input_proj.\1.\2.\3"),
    (re.compile(r"model\.level_embed"), "level_embed"),
    (re.compile(r"model\.query_position_embeddings\.weight"), "query_embed.weight"),
    (
        re.compile(r"model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.(weight|bias)"),
        r"\1.\2",
    ),
    # 4.x keeps the learned position embedding inside its backbone wrapper; 5.x on the model
    (
        re.compile(r"model\.(?:backbone\.)?position_embedding\.(row|column)_embeddings\.weight"),
        lambda m, t: [(f"position_encoding.{'row' if m[1] == 'row' else 'col'}_embed.weight", t)],
    ),
    *_head_rules("model.decoder."),
    (re.compile(r"model\.backbone\.(?:conv_encoder\.)?model\.(.+)"), r"<body>\1"),
]

# transformers' DeformableDetrConfig defaults, for config.json files that omit a field
_HF_DEFAULTS: dict[str, Any] = {
    "d_model": 256,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_ffn_dim": 1024,
    "decoder_ffn_dim": 1024,
    "num_queries": 300,
    "two_stage_num_proposals": 300,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "auxiliary_loss": False,
    "position_embedding_type": "sine",
    "num_feature_levels": 4,
    "encoder_n_points": 4,
    "decoder_n_points": 4,
    "with_box_refine": False,
    "two_stage": False,
}


def convert_transformers(
    hf_config: dict[str, Any], state: StateDict, *, source: str = "checkpoint"
) -> tuple[ModelConfig, StateDict]:
    """Convert a ``DeformableDetrForObjectDetection`` state dict and its ``config.json`` (as a dict) to detrkit.

    Reads plain, ``with_box_refine`` and ``two_stage`` models, 4.x and 5.x layouts, timm or transformers ResNet
    backbones (see the module docstring).
    """
    hf = {**_HF_DEFAULTS, **hf_config}
    for enc, dec in (
        ("encoder_ffn_dim", "decoder_ffn_dim"),
        ("encoder_attention_heads", "decoder_attention_heads"),
    ):
        if hf[enc] != hf[dec]:
            raise ValueError(f"{source}: {enc}={hf[enc]} but {dec}={hf[dec]}; detrkit needs them equal")
    if hf["activation_function"] != "relu":
        raise ValueError(f"{source}: activation {hf['activation_function']!r} is not supported (relu only)")
    if hf["position_embedding_type"] not in ("sine", "learned"):
        raise ValueError(f"{source}: position_embedding_type {hf['position_embedding_type']!r} is not supported")
    two_stage, box_refine = bool(hf["two_stage"]), bool(hf["with_box_refine"])
    n_levels = int(hf["num_feature_levels"])

    renamed, unknown = apply_rules(state, _HF_RULES)
    body, name, dilation, kind, info = hf_resnet_body(hf_config, renamed, unknown, source)
    _check_hf_levels(kind, info, n_levels, source)

    dec_layers = int(hf["decoder_layers"])
    heads, rest = _resolve_heads(
        renamed, dec_layers=dec_layers, box_refine=box_refine, two_stage=two_stage, source=source
    )
    rest = {k: v for k, v in rest.items() if not k.startswith("<body>")}
    converted = {**{f"backbone.body.{k}": v for k, v in body.items()}, **rest, **heads}
    num_classes = _num_classes(converted, source)

    category_ids, class_names = hf_labels(hf, num_classes, source)
    config = ModelConfig(
        arch="deformable_detr",
        class_loss="focal",
        num_classes=num_classes,
        category_ids=category_ids,
        class_names=class_names,
        backbone=name,
        dilation=dilation,
        trainable_stages=3,
        backbone_weights=None,
        mask_backbone_padding=False,
        position_embedding=hf["position_embedding_type"],
        hidden_dim=int(hf["d_model"]),
        num_heads=int(hf["encoder_attention_heads"]),
        enc_layers=int(hf["encoder_layers"]),
        dec_layers=dec_layers,
        ffn_dim=int(hf["encoder_ffn_dim"]),
        dropout=float(hf["dropout"]),
        attention_dropout=float(hf["attention_dropout"]),
        activation_dropout=float(hf["activation_dropout"]),
        num_queries=int(hf["two_stage_num_proposals"] if two_stage else hf["num_queries"]),
        aux_loss=bool(hf["auxiliary_loss"]),
        num_feature_levels=n_levels,
        enc_points=int(hf["encoder_n_points"]),
        dec_points=int(hf["decoder_n_points"]),
        box_refine=box_refine,
        two_stage=two_stage,
    )
    check_against_model(config, converted, unknown=unknown, source=source)
    return config, converted


def _check_hf_levels(kind: str, info: dict[str, Any], n_levels: int, source: str) -> None:
    """The backbone stages feeding the transformer must be the ones detrkit uses: 2-4 for multi-scale models
    (3 and 4 for two levels), 4 alone for single-scale ones."""
    expected = list(BACKBONE_LEVELS[-min(n_levels, len(BACKBONE_LEVELS)) :])
    if kind == "timm":
        # 4.x configs do not record them: transformers then picks [2, 3, 4] (multi-scale) or [4]
        stages = list(info.get("out_indices") or ([2, 3, 4] if n_levels > 1 else [4]))
    else:
        # DeformableDetrConfig's default ResNet returns stage4 only
        out = info.get("out_features") or [f"stage{i}" for i in info.get("out_indices") or [4]]
        stages = [int(s.removeprefix("stage")) for s in out if re.fullmatch(r"stage\d", s)]
    if stages != expected:
        raise ValueError(
            f"{source}: the transformer reads ResNet stages {stages} for {n_levels} feature levels; detrkit reads "
            f"stages {expected} (and adds strided convolutions for further levels)"
        )


# -- official .pth files ------------------------------------------------------------------------------------
def _official_self_attention(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]]:
    """The decoder's ``nn.MultiheadAttention`` packs the q, k, v projections in ``in_proj_{weight,bias}``."""
    index, which, param = m.groups()
    prefix = f"decoder.layers.{index}.self_attn"
    if which == "out_proj.":
        return [(f"{prefix}.out_proj.{param}", t)]
    if t.shape[0] % 3:
        raise ValueError(f"{m.group(0)} has {t.shape[0]} rows, not three equal q, k, v parts")
    # clone: separate storages, so the converted dict can be written with safetensors
    return [(f"{prefix}.{p}_proj.{param}", c.clone()) for p, c in zip("qkv", t.chunk(3), strict=True)]


_OFFICIAL_DEC_NORMS = {"norm2": "norm1", "norm1": "norm2", "norm3": "norm3"}  # official: norm2 after self-attn

_OFFICIAL_RULES: list[Rule] = [
    (re.compile(r"backbone\.0\.body\.(.+)"), r"backbone.body.\1"),
    (re.compile(r"backbone\.1\.(row|col)_embed\.weight"), r"position_encoding.\1_embed.weight"),
    (re.compile(r"input_proj\.(\d+)\.([01])\.(weight|bias)"), r"\g<0>"),
    (re.compile(r"query_embed\.weight"), r"\g<0>"),
    (re.compile(r"transformer\.level_embed"), "level_embed"),
    (
        re.compile(
            r"transformer\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.(weight|bias)"
        ),
        r"\1.\2",
    ),
    (
        re.compile(rf"transformer\.encoder\.layers\.(\d+)\.self_attn\.{_ATTN}\.(weight|bias)"),
        r"encoder.layers.\1.self_attn.\2.\3",
    ),
    (re.compile(r"transformer\.encoder\.layers\.(\d+)\.(norm[12])\.(weight|bias)"), r"encoder.layers.\1.\2.\3"),
    (
        re.compile(rf"transformer\.decoder\.layers\.(\d+)\.cross_attn\.{_ATTN}\.(weight|bias)"),
        r"decoder.layers.\1.cross_attn.\2.\3",
    ),
    (
        re.compile(r"transformer\.decoder\.layers\.(\d+)\.self_attn\.(in_proj_|out_proj\.)(weight|bias)"),
        _official_self_attention,
    ),
    (
        re.compile(r"transformer\.decoder\.layers\.(\d+)\.(norm[123])\.(weight|bias)"),
        lambda m, t: [(f"decoder.layers.{m[1]}.{_OFFICIAL_DEC_NORMS[m[2]]}.{m[3]}", t)],
    ),
    (
        re.compile(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.linear([12])\.(weight|bias)"),
        r"\1.layers.\2.ffn.linear\3.\4",
    ),
    *_head_rules("transformer.decoder."),
]


def is_official(state: StateDict) -> bool:
    return "transformer.level_embed" in state


def convert_official_file(
    state: StateDict, *, args: dict[str, Any] | None, source: str, path: Path
) -> tuple[ModelConfig, StateDict]:
    """An official fundamentalvision/Deformable-DETR checkpoint; DC5 from ``args`` or ``dc5`` in the file name."""
    return convert_official(state, args=args, source=source, dilation_hint="dc5" in path.name.lower())


def convert_official(
    state: dict[str, Any],
    *,
    args: dict[str, Any] | None = None,
    source: str = "checkpoint",
    dilation_hint: bool = False,
) -> tuple[ModelConfig, StateDict]:
    """Convert an official Deformable DETR state dict; the config comes from tensor shapes and ``args``.

    Box refinement and two-stage are read from the keys (refinement: the decoder holds the box heads, or they
    differ between layers; two-stage: ``transformer.enc_output``). ``args`` (the training arguments, when the
    checkpoint kept them) tell what weights cannot: the number of heads (sampling points follow from it),
    two-stage's number of queries, DC5 dilation and dropout. Without them: 8 heads, 300 queries and dropout 0.1
    (the official defaults), and ``dilation_hint``. The official class head is indexed by dataset category id
    (COCO: 91 classes, ids 0..90), so labels are their own ids.
    """
    args = args or {}
    if any(not isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source}: the state dict holds values that are not tensors")
    if args.get("masks"):
        raise ValueError(f"{source} is a segmentation checkpoint (--masks); detrkit converts detection models only")
    renamed, unknown = apply_rules(state, _OFFICIAL_RULES)
    for needed in ("level_embed", "encoder.layers.0.ffn.linear1.weight", "decoder.layers.0.ffn.linear1.weight"):
        if needed not in renamed:
            raise ValueError(f"{source} has no {needed}: not a Deformable DETR detection checkpoint")
    two_stage = "enc_output.weight" in renamed
    dec_layers = count_layers(renamed, "decoder.layers.")
    box_refine = any(k.startswith("<head>bbox|transformer.decoder.|") for k in renamed) or _heads_differ(renamed)
    if "with_box_refine" in args and bool(args["with_box_refine"]) != box_refine:
        raise ValueError(f"{source}: args.with_box_refine={args['with_box_refine']} but the weights say {box_refine}")
    if "two_stage" in args and bool(args["two_stage"]) != two_stage:
        raise ValueError(f"{source}: args.two_stage={args['two_stage']} but the weights say {two_stage}")
    if two_stage and not box_refine:
        raise ValueError(
            f"{source} is a two-stage model without box refinement, which detrkit does not implement (the "
            "published two-stage models all refine boxes)"
        )
    heads, converted = _resolve_heads(
        renamed, dec_layers=dec_layers, box_refine=box_refine, two_stage=two_stage, source=source
    )
    converted.update(heads)

    body = {k.removeprefix("backbone.body."): v for k, v in converted.items() if k.startswith("backbone.body.")}
    name = resnet_name(body, source)
    if args.get("backbone") and args["backbone"] != name:
        raise ValueError(f"{source}: args.backbone is {args['backbone']!r} but the weights are a {name}")
    ffn = {v.shape[0] for k, v in converted.items() if k.endswith("ffn.linear1.weight")}
    if len(ffn) != 1:
        raise ValueError(f"{source}: feed-forward widths differ between layers ({sorted(ffn)})")
    n_levels, hidden_dim = converted["level_embed"].shape
    num_heads = int(args.get("nheads", 8))
    enc_points = _points(converted, "encoder.layers.0.self_attn", num_heads, n_levels, source)
    dec_points = _points(converted, "decoder.layers.0.cross_attn", num_heads, n_levels, source)
    if two_stage:
        num_queries = int(args.get("num_queries", 300))
    else:
        num_queries = int(converted["query_embed.weight"].shape[0])
    dropout = float(args.get("dropout", 0.1))
    config = ModelConfig(
        arch="deformable_detr",
        class_loss="focal",
        num_classes=_num_classes(converted, source),
        backbone=name,
        dilation=bool(args["dilation"]) if "dilation" in args else dilation_hint,
        trainable_stages=3,
        backbone_weights=None,
        mask_backbone_padding=False,
        position_embedding="learned" if "position_encoding.row_embed.weight" in converted else "sine",
        hidden_dim=int(hidden_dim),
        num_heads=num_heads,
        enc_layers=count_layers(converted, "encoder.layers."),
        dec_layers=dec_layers,
        ffn_dim=ffn.pop(),
        # the official layers use one rate everywhere: residual, attention weights and inside the FFN
        dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=dropout,
        num_queries=num_queries,
        aux_loss=bool(args.get("aux_loss", True)),
        num_feature_levels=int(n_levels),
        enc_points=enc_points,
        dec_points=dec_points,
        box_refine=box_refine,
        two_stage=two_stage,
    )
    check_against_model(config, converted, unknown=unknown, source=source)
    return config, converted


def _points(state: StateDict, prefix: str, num_heads: int, n_levels: int, source: str) -> int:
    """Sampling points per head and level, from ``attention_weights`` (nh·L·P outputs)."""
    key = f"{prefix}.attention_weights.weight"
    if key not in state:
        return 4
    rows = state[key].shape[0]
    if rows % (num_heads * n_levels):
        raise ValueError(
            f"{source}: {key} has {rows} outputs, not a multiple of {num_heads} heads × {n_levels} levels "
            "(pass the checkpoint's args, with num_heads, or re-save it with them)"
        )
    return rows // (num_heads * n_levels)


def _num_classes(converted: StateDict, source: str) -> int:
    for key in ("class_embed.weight", "class_embed.0.weight"):
        if key in converted:
            return int(converted[key].shape[0])
    raise ValueError(f"{source} has no class head (class_embed): a model without detection heads?")


# -- heads ----------------------------------------------------------------------------------------------------
def _gather_heads(renamed: StateDict) -> tuple[dict[tuple[str, int, str], list[tuple[str, Tensor]]], StateDict]:
    """Split ``<head>`` keys (kind, index, parameter → [(source key, tensor)]) from the rest."""
    heads: dict[tuple[str, int, str], list[tuple[str, Tensor]]] = {}
    rest: StateDict = {}
    for key, value in renamed.items():
        if not key.startswith("<head>"):
            rest[key] = value
            continue
        kind, prefix, index, param = key.removeprefix("<head>").split("|")
        source_key = f"{prefix}{kind}_embed.{index}.{param}"
        heads.setdefault((kind, int(index), param), []).append((source_key, value))
    return heads, rest


def _heads_differ(renamed: StateDict) -> bool:
    """Whether the checkpoint's per-layer heads hold different values (box refinement clones them)."""
    heads, _ = _gather_heads(renamed)
    for (kind, index, param), copies in heads.items():
        first = heads.get((kind, 0, param))
        if index and first and not torch.equal(copies[0][1], first[0][1]):
            return True
    return False


def _resolve_heads(
    renamed: StateDict, *, dec_layers: int, box_refine: bool, two_stage: bool, source: str
) -> tuple[StateDict, StateDict]:
    """The checkpoint's per-index class and box heads → detrkit's ``class_embed``, ``decoder.bbox_embed`` (one
    module, or one per layer with box refinement) and, two-stage, ``enc_class_embed`` and ``enc_bbox_embed``
    (the extra last index). Copies of one head under several names must be equal; a checkpoint that writes a
    shared head once (index 0 only) stands for all indices. Returns (heads, the other keys)."""
    heads, rest = _gather_heads(renamed)
    num_pred = dec_layers + (1 if two_stage else 0)
    out: StateDict = {}
    targets = {"class": "class_embed", "bbox": "decoder.bbox_embed"}
    for (kind, index, param), copies in sorted(heads.items()):
        (first_key, value), *others = copies
        for other_key, other in others:
            if other.shape != value.shape or not torch.equal(other, value):
                raise ValueError(f"{source}: {first_key} and {other_key} should be one head but differ")
        if index >= num_pred:
            raise ValueError(
                f"{source}: {first_key} is head {index}, but {dec_layers} decoder layers"
                f"{' and the two-stage proposal head' if two_stage else ''} need {num_pred}"
            )
        if not box_refine:  # one shared head: every index must hold the same values
            if index == 0:
                out[f"{targets[kind]}.{param}"] = value
            else:
                base = heads.get((kind, 0, param))
                if base is None or not torch.equal(base[0][1], value):
                    raise ValueError(
                        f"{source}: {first_key} differs from head 0, but the model has no box refinement "
                        "(its heads are shared between layers)"
                    )
            continue
        if two_stage and index == dec_layers:
            out[f"enc_{kind}_embed.{param}"] = value
        else:
            out[f"{targets[kind]}.{index}.{param}"] = value
    if box_refine:
        # transformers 5.x writes a head that is tied across layers once, as index 0
        for kind in ("class", "bbox"):
            present = {index for (k, index, _) in heads if k == kind}
            if present == {0} and num_pred > 1:
                for (k, _, param), copies in list(heads.items()):
                    if k != kind:
                        continue
                    value = copies[0][1]
                    for i in range(1, dec_layers):
                        out[f"{targets[kind]}.{i}.{param}"] = value.clone()
                    if two_stage:
                        out[f"enc_{kind}_embed.{param}"] = value.clone()
    return out, rest


CONVERTER = Converter(
    arch="deformable_detr",
    transformers_model_types=("deformable_detr",),
    convert_transformers=convert_transformers,
    is_official=is_official,
    convert_official_file=convert_official_file,
    official_priority=10,  # its keys also pass detr.is_official
)
