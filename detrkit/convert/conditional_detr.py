"""Conditional DETR (Atten4Vis/ConditionalDETR and transformers' ``ConditionalDetrForObjectDetection``) → detrkit.

Backbone, encoder, query embeddings, input projection and heads have DETR's keys (see ``detr.py``); what differs
is the decoder (``N`` decoder layer):

transformers (``config.json`` with ``"model_type": "conditional_detr"``)
    on disk (5.x renames to this legacy layout when saving; 4.x writes it too):
        ``model.decoder.layers.N.{sa,ca}_{qcontent,qpos,kcontent,kpos,v}_proj``, ``ca_qpos_sine_proj``,
        ``self_attn.out_proj``, ``encoder_attn.out_proj``, ``{self_attn,encoder_attn,final}_layer_norm``, ``fc1``,
        ``fc2``;
    5.x in memory: ``model.decoder.layers.N.{self_attn,encoder_attn}.{q_content,q_pos,k_content,k_pos,v,
        q_pos_sine,o}_proj``, ``mlp.fc1``, ``mlp.fc2``;
    ``model.decoder.{query_scale,ref_point_head}.layers.M``, ``model.decoder.layernorm``.
official ``.pth`` (``{"model": state_dict, "args": Namespace}``)
    ``transformer.decoder.layers.N.{sa,ca}_*_proj``, ``self_attn.out_proj``, ``cross_attn.out_proj``,
    ``linear1``, ``linear2``, ``norm1..3``; ``transformer.decoder.{query_scale,ref_point_head}.layers.M``,
    ``transformer.decoder.norm``.

Only the first decoder layer has a cross-attention ``qpos`` projection (the others never use one), in both layouts.
The class head is a sigmoid head: K outputs, no no-object class.

Layer: io. May import config, the building blocks, ``models`` and ``convert.common`` / ``convert.detr``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from . import detr
from .common import Converter, Rule, StateDict

_PROJ = {
    "qcontent": "q_content",
    "qpos": "q_pos",
    "kcontent": "k_content",
    "kpos": "k_pos",
    "v": "v",
    "qpos_sine": "q_pos_sine",
}
_MODULE = {"sa": "self_attn", "ca": "cross_attn", "self_attn": "self_attn", "encoder_attn": "cross_attn"}
_PARTS = {
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "norm3",
    "fc1": "ffn.linear1",
    "mlp.fc1": "ffn.linear1",
    "fc2": "ffn.linear2",
    "mlp.fc2": "ffn.linear2",
}

_DECODER_SHARED: list[Rule] = [
    (
        re.compile(r"(?:model|transformer)\.decoder\.(query_scale|ref_point_head)\.layers\.(\d+)\.(weight|bias)"),
        r"transformer.\1.layers.\2.\3",
    ),
]

HF_RULES: list[Rule] = [
    # legacy (on disk): sa_qcontent_proj, ca_qpos_sine_proj, ...
    (
        re.compile(
            r"model\.decoder\.layers\.(\d+)\.(sa|ca)_(qcontent|qpos|kcontent|kpos|v|qpos_sine)_proj\.(weight|bias)"
        ),
        lambda m, t: [(f"transformer.decoder.{m[1]}.{_MODULE[m[2]]}.{_PROJ[m[3]]}.{m[4]}", t)],
    ),
    # 5.x in memory: self_attn.q_content_proj, encoder_attn.q_pos_sine_proj, ...
    (
        re.compile(
            r"model\.decoder\.layers\.(\d+)\.(self_attn|encoder_attn)"
            r"\.(q_content|q_pos|k_content|k_pos|v|q_pos_sine)_proj\.(weight|bias)"
        ),
        lambda m, t: [(f"transformer.decoder.{m[1]}.{_MODULE[m[2]]}.{m[3]}.{m[4]}", t)],
    ),
    (
        re.compile(r"model\.decoder\.layers\.(\d+)\.(self_attn|encoder_attn)\.(?:out|o)_proj\.(weight|bias)"),
        lambda m, t: [(f"transformer.decoder.{m[1]}.{_MODULE[m[2]]}.out_proj.{m[3]}", t)],
    ),
    (
        re.compile(
            r"model\.decoder\.layers\.(\d+)\.(self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm"
            r"|fc1|fc2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
        ),
        lambda m, t: [(f"transformer.decoder.{m[1]}.{_PARTS[m[2]]}.{m[3]}", t)],
    ),
    *_DECODER_SHARED,
]

OFFICIAL_RULES: list[Rule] = [
    (
        re.compile(
            r"transformer\.decoder\.layers\.(\d+)\.(sa|ca)_(qcontent|qpos|kcontent|kpos|v|qpos_sine)_proj"
            r"\.(weight|bias)"
        ),
        lambda m, t: [(f"transformer.decoder.{m[1]}.{_MODULE[m[2]]}.{_PROJ[m[3]]}.{m[4]}", t)],
    ),
    (
        re.compile(r"transformer\.decoder\.layers\.(\d+)\.cross_attn\.out_proj\.(weight|bias)"),
        r"transformer.decoder.\1.cross_attn.out_proj.\2",
    ),
    *_DECODER_SHARED,
]


def convert_transformers(
    hf_config: dict[str, Any], state: StateDict, *, source: str = "checkpoint"
) -> tuple[ModelConfig, StateDict]:
    """Convert a ``ConditionalDetrForObjectDetection`` or ``ConditionalDetrForSegmentation`` (the detector under
    ``conditional_detr.``, DETR's mask head beside it: a ``masks=True`` model) state dict and its ``config.json``.

    transformers' segmentation class predicts boxes without the reference points (its forward is DETR's); the
    converted model predicts them from the reference points, as the detection class and the paper do, so its boxes
    are those of ``ConditionalDetrForObjectDetection`` with the same weights.
    """
    return detr.convert_transformers(hf_config, state, source=source, arch="conditional_detr", rules=HF_RULES)


def is_official(state: StateDict) -> bool:
    # a DETRsegm of Atten4Vis/ConditionalDETR would keep the detector under ``detr.``
    prefixes = ("transformer.decoder.ref_point_head.", "detr.transformer.decoder.ref_point_head.")
    return any(k.startswith(prefixes) for k in state)


def convert_official_file(
    state: StateDict, *, args: dict[str, Any] | None, source: str, path: Path
) -> tuple[ModelConfig, StateDict]:
    """An official Atten4Vis/ConditionalDETR checkpoint; DC5 from ``args`` or ``dc5`` in the file name."""
    return detr.convert_official(
        state,
        args=args,
        source=source,
        dilation_hint="dc5" in path.name.lower(),
        arch="conditional_detr",
        rules=OFFICIAL_RULES,
    )


CONVERTER = Converter(
    arch="conditional_detr",
    transformers_model_types=("conditional_detr",),
    convert_transformers=convert_transformers,
    is_official=is_official,
    convert_official_file=convert_official_file,
    official_priority=10,  # its keys also pass detr.is_official
)
