"""Reading published DETR weights: ``transformers`` folders, official facebookresearch/detr ``.pth`` files and
Hugging Face Hub ids.

Each source's keys are renamed to detrkit's by a table of rules, its ``ModelConfig`` is derived from its
config (for ``.pth`` files from the tensor shapes), and the result is checked against the model that config
builds: a key no rule knows, a key the model lacks, a missing key or a wrong shape is an error, never a
silently dropped weight. Only tensors are read (safetensors, ``torch.load(weights_only=True)``): no code from
a checkpoint ever runs.

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

official facebookresearch/detr ``.pth`` (``{"model": state_dict, "args": Namespace, ...}``)
    ``backbone.0.body.*`` (torchvision names), ``backbone.1.{row,col}_embed`` (learned encodings),
    ``transformer.{encoder,decoder}.layers.N.{self_attn,multihead_attn}.{in_proj_weight,in_proj_bias}`` (q, k
    and v packed in one tensor) and ``.out_proj``, ``linear1``, ``linear2``, ``norm1..3``;
    ``transformer.decoder.norm``, ``query_embed``, ``input_proj``, ``class_embed``, ``bbox_embed.layers.N``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from .config import ModelConfig

StateDict = dict[str, Tensor]

# Blocks per stage and whether they are bottlenecks: the ResNets detrkit's backbone builds.
RESNET_LAYOUTS: dict[str, tuple[tuple[int, ...], bool]] = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}


# -- entry points --------------------------------------------------------------------------------------------
def load_published(path: str | Path) -> tuple[ModelConfig, StateDict]:
    """Read a published checkpoint: its ``ModelConfig`` and a state dict in detrkit's key layout.

    Args:
        path: a ``transformers`` folder (``config.json`` with ``"model_type": "detr"`` and
            ``model.safetensors`` or ``pytorch_model.bin``), or an official facebookresearch/detr ``.pth``.

    The config has ``mask_backbone_padding=False``, so outputs equal the reference implementation's on padded
    batches, and ``trainable_stages=3``. Weights do not record DC5 dilation: for ``.pth`` files it comes from
    the checkpoint's ``args`` when saved, else from ``dc5`` in the file name; else pass ``dilation=True`` to
    ``detrkit.load``.
    """
    path = Path(path)
    if path.is_dir():
        return _load_transformers_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        return _convert_state_file(load_file(str(path)), args=None, path=path)
    obj = _torch_load_tensors(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        return _convert_state_file(obj["model"], args=args if isinstance(args, dict) else None, path=path)
    if isinstance(obj, dict) and all(isinstance(v, Tensor) for v in obj.values()):
        return _convert_state_file(obj, args=None, path=path)
    raise ValueError(f"{path} holds neither a state dict nor {{'model': state_dict}} (found {_preview(obj)})")


def resolve_hub_id(repo_id: str, revision: str | None = None) -> Path:
    """Download a Hugging Face Hub model (or find it in the local cache) and return its snapshot folder, or
    the ``.pth`` file of a repository that holds a single official checkpoint and no ``config.json``.

    Fetches ``config.json`` and the safetensors weights; ``pytorch_model.bin`` only for a repository without
    safetensors. When the Hub cannot be reached the files come from the local Hugging Face cache. Needs the
    optional ``huggingface_hub`` package (``pip install "detrkit[hub]"``).
    """
    try:
        import huggingface_hub  # noqa: F401 - imported here only to report a clear error when it is missing
    except ImportError as e:
        raise ImportError(
            f"loading {repo_id!r} from the Hugging Face Hub needs the huggingface_hub package: "
            'pip install "detrkit[hub]" (or pass a local folder or file to detrkit.load)'
        ) from e
    folder = _snapshot(repo_id, revision, ["config.json", "*.safetensors", "*.safetensors.index.json"])
    if not any(folder.glob("*.safetensors")):
        folder = _snapshot(repo_id, revision, ["config.json", "pytorch_model.bin", "*.pth"])
    if not (folder / "config.json").is_file():
        pth = sorted(folder.glob("*.pth"))
        if len(pth) == 1:
            return pth[0]
        raise ValueError(f"Hub repository {repo_id!r} has no config.json and no single .pth checkpoint")
    return folder


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """``snapshot_download`` that falls back to the local cache when the Hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    kwargs: dict[str, Any] = {"revision": revision, "allow_patterns": patterns, "library_name": "detrkit"}
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        raise  # the Hub answered that the repository or revision does not exist (or is gated): no cache helps
    except Exception as online_error:  # no connection, a timeout, offline mode: use what is cached
        try:
            return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        except Exception as cache_error:
            raise OSError(
                f"cannot reach the Hugging Face Hub for {repo_id!r} ({online_error}) and it is not in the "
                f"local cache ({cache_error}); download it once while online, or pass a local folder"
            ) from online_error


# -- safe reading --------------------------------------------------------------------------------------------
def _safe_globals() -> contextlib.AbstractContextManager:
    """Allow ``argparse.Namespace`` in ``weights_only`` unpickling: official checkpoints keep their training
    ``args`` in one, and a Namespace is a plain bag of attributes (rebuilding it runs no code)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return safe_globals([argparse.Namespace]) if safe_globals is not None else contextlib.nullcontext()


def _torch_load_tensors(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with Namespace allowed: a pickle that needs any other Python global
    (a class, a function such as ``os.system``) is refused before anything runs, naming the global."""
    try:
        with _safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # raised by the weights-only unpickler, before it builds anything
        # Quote torch's reason, not its advice (which suggests weights_only=False, exactly what we refuse).
        found = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", str(e), flags=re.IGNORECASE)
        if found:
            raise ValueError(
                f"refusing to load {path}: unpickling it needs the Python global {found.group(1)}. detrkit "
                "reads only tensors and plain data (torch.load weights_only=True) and never runs code from a "
                "checkpoint; re-save it as torch.save({'model': model.state_dict()}, path) or as safetensors"
            ) from e
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        reason = found.group(1).strip() if found else "not a weights-only torch pickle"
        raise ValueError(f"cannot read {path} as a torch checkpoint of tensors: {reason}") from e
    except Exception as e:  # not a torch file, truncated, corrupted: the unpickler fails in many ways
        raise ValueError(f"cannot read {path} as a torch checkpoint: {type(e).__name__}: {e}") from e


def _read_transformers_weights(folder: Path) -> StateDict:
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state: StateDict = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(folder / shard)))
        return state
    if (folder / "pytorch_model.bin").is_file():
        obj = _torch_load_tensors(folder / "pytorch_model.bin")
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise ValueError(f"{folder / 'pytorch_model.bin'} does not hold a state dict of tensors")
        return obj
    raise FileNotFoundError(
        f"{folder} has a transformers config.json but no model.safetensors or pytorch_model.bin "
        "(TensorFlow and Flax weights are not read)"
    )


# -- renaming by rules ---------------------------------------------------------------------------------------
# A rule converts a key it matches in full into (detrkit key, tensor) pairs: a template for plain renames, or
# a function that may return None to say "not mine after all" (then the key counts as unknown).
Converter = Callable[[re.Match, Tensor], "list[tuple[str, Tensor]] | None"]
Rule = tuple[re.Pattern, "str | Converter"]


def _apply_rules(state: dict[str, Tensor], rules: list[Rule]) -> tuple[StateDict, list[str]]:
    """Rename every key by the first rule matching it. Returns the renamed dict and the keys no rule knows."""
    out: StateDict = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # BatchNorm's step counter: frozen BatchNorm has no use for it
        converted = None
        for pattern, target in rules:
            m = pattern.fullmatch(key)
            if m:
                converted = [(m.expand(target), tensor)] if isinstance(target, str) else target(m, tensor)
                break
        if converted is None:
            unknown.append(key)
            continue
        for new_key, new_tensor in converted:
            if new_key in out:
                raise ValueError(f"two checkpoint keys convert to {new_key}: the checkpoint mixes layouts")
            out[new_key] = new_tensor
    return out, unknown


# transformers
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


def _hf_resnet_block(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]]:
    """transformers ResNet ``stages.S.layers.B.layer.C`` is torchvision ``layer{S+1}.B.conv{C+1}`` and
    ``bn{C+1}``; its ``shortcut`` is torchvision's ``downsample`` (convolution 0, norm 1)."""
    stage, block, conv, kind, param = m.groups()
    prefix = f"layer{int(stage) + 1}.{block}"
    if conv is None:  # shortcut
        return [(f"{prefix}.downsample.{0 if kind == 'convolution' else 1}.{param}", t)]
    return [(f"{prefix}.{'conv' if kind == 'convolution' else 'bn'}{int(conv) + 1}.{param}", t)]


_HF_RESNET_RULES: list[Rule] = [
    (re.compile(r"embedder\.embedder\.convolution\.weight"), "conv1.weight"),
    (re.compile(r"embedder\.embedder\.normalization\.(\w+)"), r"bn1.\1"),
    (
        re.compile(
            r"encoder\.stages\.([0-3])\.layers\.(\d+)\.(?:layer\.([0-2])|shortcut)"
            r"\.(convolution|normalization)\.(\w+)"
        ),
        _hf_resnet_block,
    ),
]

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


# -- transformers folders ------------------------------------------------------------------------------------
def _load_transformers_folder(folder: Path) -> tuple[ModelConfig, StateDict]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is neither a detrkit nor a transformers model")
    hf = json.loads(config_file.read_text())
    if hf.get("format") == "detrkit":
        raise ValueError(f"{folder} is a detrkit folder: read it with detrkit.load")
    if hf.get("model_type") != "detr":
        raise ValueError(
            f"{config_file} describes a {hf.get('model_type')!r} model; detrkit converts transformers DETR "
            "checkpoints only (model_type 'detr', DetrForObjectDetection)"
        )
    config, state = convert_transformers(hf, _read_transformers_weights(folder), source=str(folder))
    # The image processor's resize travels with the model, so `predict` resizes the way the reference does.
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        size = json.loads(preprocessor.read_text()).get("size")
        if isinstance(size, dict) and "shortest_edge" in size and "longest_edge" in size:
            config = config.replace(image_size=int(size["shortest_edge"]), max_size=int(size["longest_edge"]))
    return config, state


def convert_transformers(
    hf_config: dict[str, Any], state: StateDict, *, source: str = "checkpoint"
) -> tuple[ModelConfig, StateDict]:
    """Convert a ``DetrForObjectDetection`` state dict and its ``config.json`` (as a dict) to detrkit.

    Reads the 4.x and 5.x layouts with a timm or a transformers ResNet backbone (see the module docstring).
    """
    if any(k.startswith(("detr.", "mask_head.", "bbox_attention.")) for k in state):
        raise ValueError(f"{source} is a DetrForSegmentation checkpoint; detrkit converts detection models only")
    renamed, unknown = _apply_rules(state, _HF_RULES)
    body = {k.removeprefix("<body>"): v for k, v in renamed.items() if k.startswith("<body>")}
    rest = {k: v for k, v in renamed.items() if not k.startswith("<body>")}
    if not body:
        raise ValueError(f"{source} has no backbone weights (model.backbone.conv_encoder.model.*)")

    kind, info = _hf_backbone_kind(hf_config, source)
    weights_kind = "resnet" if any(k.startswith("embedder.") for k in body) else "timm"
    if weights_kind != kind:
        described = {"resnet": "a transformers ResNet", "timm": "a timm ResNet"}
        raise ValueError(
            f"{source}: config.json describes {described[kind]} backbone, but the weights are {described[weights_kind]}"
        )
    if kind == "resnet":
        body, body_unknown = _apply_rules(body, _HF_RESNET_RULES)
        unknown += [f"model.backbone.conv_encoder.model.{k}" for k in body_unknown]
    name = _resnet_name(body, source)
    dilation = _check_hf_resnet(info, name, source) if kind == "resnet" else _check_timm(info, name, source)

    config = _hf_model_config(hf_config, backbone=name, dilation=dilation, state=rest, source=source)
    converted = {**{f"backbone.body.{k}": v for k, v in body.items()}, **rest}
    _check_against_model(config, converted, unknown=unknown, source=source)
    return config, converted


def _hf_backbone_kind(hf: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """The backbone a transformers DETR config builds: ``("timm", details)`` or ``("resnet", its config)``."""
    if hf.get("num_channels", 3) != 3:
        raise ValueError(f"{source}: only 3-channel (RGB) inputs are supported, not {hf['num_channels']}")
    bc = hf.get("backbone_config")
    if isinstance(bc, dict):
        if bc.get("model_type") == "resnet":
            return "resnet", bc
        if bc.get("model_type") == "timm_backbone":  # 5.x: the timm model is described by the sub-config
            return "timm", {
                "name": bc.get("backbone") or "resnet50",
                "output_stride": bc.get("output_stride"),
                "out_indices": bc.get("out_indices"),
                "num_channels": bc.get("num_channels", 3),
            }
        raise ValueError(f"{source}: backbone {bc.get('model_type')!r} is not supported; detrkit has ResNets only")
    if hf.get("use_timm_backbone", True):  # 4.x: timm unless told otherwise; DC5 from the top-level flag
        return "timm", {
            "name": hf.get("backbone") or "resnet50",
            "output_stride": 16 if hf.get("dilation") else None,
            "out_indices": None,
            "num_channels": 3,
        }
    return "resnet", {}  # 4.x without timm and without backbone_config: transformers' default ResNet-50


def _check_timm(info: dict[str, Any], name: str, source: str) -> bool:
    """Check a timm backbone is a plain ResNet (torchvision computes the same); returns ``dilation``."""
    # "resnet50", "resnet50.a1_in1k", "timm/resnet50.tv_in1k": a plain ResNet with a pretrained-weights tag.
    # Variants (resnet50d, seresnet50, resnext50_32x4d, ...) compute something else and are refused.
    timm_name = str(info["name"]).removeprefix("timm/").split(".")[0]
    if timm_name not in RESNET_LAYOUTS:
        raise ValueError(
            f"{source}: timm backbone {info['name']!r} is not supported; detrkit reproduces the plain "
            f"{', '.join(RESNET_LAYOUTS)}"
        )
    if timm_name != name:
        raise ValueError(f"{source}: config.json names backbone {info['name']!r} but the weights are a {name}")
    if info.get("num_channels", 3) != 3:
        raise ValueError(f"{source}: only 3-channel (RGB) inputs are supported")
    if info.get("out_indices") and list(info["out_indices"])[-1] != 4:
        raise ValueError(f"{source}: DETR reads the last ResNet stage; out_indices {info['out_indices']} do not")
    if info.get("output_stride") not in (None, 32, 16):
        raise ValueError(f"{source}: timm output_stride {info['output_stride']} is not supported (32, or 16: DC5)")
    return info.get("output_stride") == 16


def _check_hf_resnet(bc: dict[str, Any], name: str, source: str) -> bool:
    """Check a transformers ResNet computes what torchvision's ResNet of the same depth computes.

    With the defaults both put a bottleneck's stride on its 3x3 convolution ("ResNet v1.5") and a projection
    shortcut exactly where torchvision has a ``downsample``; stems and FrozenBatchNorm (eps 1e-5) are the
    same. The options refused below change the computation. Returns ``dilation``: always False, because
    transformers' ResNet ignores DETR's ``dilation`` option: the reference computes stride 32 whatever the
    config says.
    """
    if bc.get("downsample_in_bottleneck", False):
        raise ValueError(
            f"{source}: the ResNet has downsample_in_bottleneck=True (stride on the first 1x1 convolution, "
            "ResNet v1); torchvision's ResNet strides the 3x3 convolution and cannot reproduce it"
        )
    if bc.get("downsample_in_first_stage", False):
        raise ValueError(f"{source}: downsample_in_first_stage=True is a ResNet torchvision cannot reproduce")
    if bc.get("hidden_act", "relu") != "relu":
        raise ValueError(f"{source}: ResNet activation {bc['hidden_act']!r} is not supported (relu only)")
    if bc.get("num_channels", 3) != 3:
        raise ValueError(f"{source}: only 3-channel (RGB) inputs are supported")
    if bc.get("embedding_size", 64) != 64:
        raise ValueError(f"{source}: a ResNet stem of width {bc['embedding_size']} is not supported (64)")
    depths, bottleneck = RESNET_LAYOUTS[name]
    if "depths" in bc and tuple(bc["depths"]) != depths:
        raise ValueError(f"{source}: backbone_config depths {bc['depths']} disagree with the weights ({name})")
    if "layer_type" in bc and (bc["layer_type"] == "bottleneck") != bottleneck:
        raise ValueError(f"{source}: backbone_config layer_type {bc['layer_type']!r} disagrees with the weights")
    out = bc.get("out_features") or []
    if out and out[-1] != "stage4":
        raise ValueError(f"{source}: DETR reads the last ResNet stage; out_features {out} do not")
    return False


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


def _hf_model_config(
    hf: dict[str, Any], *, backbone: str, dilation: bool, state: StateDict, source: str
) -> ModelConfig:
    """``ModelConfig`` from a transformers ``DetrConfig`` dict; absent fields take DetrConfig's defaults."""
    hf = {**_DETR_CONFIG_DEFAULTS, **hf}
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
    num_classes = state["class_embed.weight"].shape[0] - 1
    category_ids = class_names = None
    id2label = {int(k): str(v) for k, v in (hf.get("id2label") or {}).items()}
    if id2label:
        if len(id2label) != num_classes:
            raise ValueError(f"{source}: id2label has {len(id2label)} labels but the class head {num_classes} classes")
        # The keys are the published model's contiguous labels (COCO: 0..90, "N/A" where COCO has no class).
        category_ids = tuple(sorted(id2label))
        class_names = tuple(id2label[i] for i in category_ids)
    return ModelConfig(
        arch="detr",
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
        nheads=hf["encoder_attention_heads"],
        enc_layers=hf["encoder_layers"],
        dec_layers=hf["decoder_layers"],
        dim_feedforward=hf["encoder_ffn_dim"],
        dropout=float(hf["dropout"]),
        attention_dropout=float(hf["attention_dropout"]),
        activation_dropout=float(hf["activation_dropout"]),
        num_queries=hf["num_queries"],
        aux_loss=bool(hf["auxiliary_loss"]),
    )


# -- official .pth files and bare state dicts ----------------------------------------------------------------
def _convert_state_file(
    state: dict[str, Any], *, args: dict[str, Any] | None, path: Path
) -> tuple[ModelConfig, StateDict]:
    """Dispatch a state dict read from a single file by its key layout."""
    if any(k.startswith("backbone.0.body.") for k in state):
        return convert_official(state, args=args, source=str(path), dilation_hint="dc5" in path.name.lower())
    if any(k.startswith("backbone.body.") for k in state):
        raise ValueError(
            f"{path} is a bare state dict in detrkit's layout, which does not record the architecture: save "
            "models with model.save_pretrained(folder) and load the folder, or build the model from its "
            "config and call model.load_state_dict"
        )
    if any(k.startswith(("model.backbone.", "class_labels_classifier.")) for k in state):
        raise ValueError(f"{path} holds transformers weights: load the folder with its config.json instead")
    if any(k.startswith("detr.") for k in state):
        raise ValueError(f"{path} is an official DETR segmentation checkpoint; detrkit converts detection only")
    raise ValueError(f"{path}: unrecognised checkpoint layout (keys: {_preview(state)})")


def convert_official(
    state: dict[str, Any],
    *,
    args: dict[str, Any] | None = None,
    source: str = "checkpoint",
    dilation_hint: bool = False,
) -> tuple[ModelConfig, StateDict]:
    """Convert an official facebookresearch/detr state dict; the config comes from tensor shapes and ``args``.

    ``args`` (the training arguments, when the checkpoint kept them) tell what weights cannot: the number of
    heads, DC5 dilation and dropout. Without them: 8 heads and dropout 0.1 (the official defaults), and
    ``dilation_hint``. The official class head is indexed by dataset category id (COCO: 91 classes, ids
    0..90), so labels are their own ids.
    """
    args = args or {}
    if "transformer.encoder.norm.weight" in state or args.get("pre_norm"):
        raise ValueError(f"{source} is a pre-norm DETR (--pre_norm); detrkit implements the post-norm transformer")
    if any(not isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source}: the state dict holds values that are not tensors")
    converted, unknown = _apply_rules(state, _OFFICIAL_RULES)
    for needed in ("class_embed.weight", "query_embed.weight", "transformer.encoder.0.ffn.linear1.weight"):
        if needed not in converted:
            raise ValueError(f"{source} has no {needed}: not a DETR detection checkpoint")
    body = {k.removeprefix("backbone.body."): v for k, v in converted.items() if k.startswith("backbone.body.")}
    name = _resnet_name(body, source)
    if args.get("backbone") and args["backbone"] != name:
        raise ValueError(f"{source}: args.backbone is {args['backbone']!r} but the weights are a {name}")
    ffn = {v.shape[0] for k, v in converted.items() if k.endswith("ffn.linear1.weight")}
    if len(ffn) != 1:
        raise ValueError(f"{source}: feed-forward widths differ between layers ({sorted(ffn)})")
    num_queries, hidden_dim = converted["query_embed.weight"].shape
    dropout = float(args.get("dropout", 0.1))
    config = ModelConfig(
        arch="detr",
        num_classes=converted["class_embed.weight"].shape[0] - 1,
        backbone=name,
        dilation=bool(args["dilation"]) if "dilation" in args else dilation_hint,
        trainable_stages=3,
        backbone_weights=None,
        mask_backbone_padding=False,
        position_embedding="learned" if "position_encoding.row_embed.weight" in converted else "sine",
        hidden_dim=int(hidden_dim),
        nheads=int(args.get("nheads", 8)),
        enc_layers=_count_layers(converted, "transformer.encoder."),
        dec_layers=_count_layers(converted, "transformer.decoder."),
        dim_feedforward=ffn.pop(),
        # the official layers use one rate everywhere: residual, attention weights and inside the FFN
        dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=dropout,
        num_queries=int(num_queries),
        aux_loss=bool(args.get("aux_loss", True)),
    )
    _check_against_model(config, converted, unknown=unknown, source=source)
    return config, converted


# -- shared checks -------------------------------------------------------------------------------------------
def _count_layers(state: StateDict, prefix: str) -> int:
    return len({k.removeprefix(prefix).split(".")[0] for k in state if k.startswith(prefix)})


def _resnet_name(body: StateDict, source: str) -> str:
    """Which torchvision ResNet a body state dict (torchvision names) is, from its blocks per stage."""
    blocks = tuple(len({k.split(".")[1] for k in body if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = any(k.endswith(".conv3.weight") for k in body)
    for name, layout in RESNET_LAYOUTS.items():
        if layout == (blocks, bottleneck):
            return name
    kind = "bottleneck" if bottleneck else "basic"
    raise ValueError(
        f"{source}: a ResNet with {list(blocks)} {kind} blocks per stage is none of {', '.join(RESNET_LAYOUTS)}"
    )


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """State dict shapes of the model ``config`` builds, built on the meta device (nothing allocated)."""
    from .models import build_model

    with torch.device("meta"):
        model = build_model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_against_model(config: ModelConfig, state: StateDict, *, unknown: list[str], source: str) -> None:
    """One error listing every key no rule converted, every converted key the model does not have, every model
    key the checkpoint lacks and every shape that differs."""
    expected = _expected_shapes(config)
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {expected[k]}"
        for k in sorted(state.keys() & expected.keys())
        if tuple(state[k].shape) != expected[k]
    ]
    problems = {
        "checkpoint keys detrkit does not know": sorted(unknown),
        "converted keys the model does not have": sorted(state.keys() - expected.keys()),
        "model keys missing from the checkpoint": sorted(expected.keys() - state.keys()),
        "shapes that differ": wrong,
    }
    lines = [f"  {len(items)} {title}:\n{_listing(items)}" for title, items in problems.items() if items]
    if lines:
        raise ValueError(f"cannot convert {source} (no weight is dropped silently):\n" + "\n".join(lines))


def _listing(items: list[str], limit: int = 40) -> str:
    shown = "\n".join(f"    {x}" for x in items[:limit])
    return shown + (f"\n    … and {len(items) - limit} more" if len(items) > limit else "")


def _preview(obj: Any, n: int = 8) -> str:
    if isinstance(obj, dict):
        keys = [str(k) for k in obj]
        return ", ".join(keys[:n]) + (", …" if len(keys) > n else "")
    return type(obj).__name__
