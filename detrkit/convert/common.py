"""What every converter shares: safe reading of tensors, renaming by rules, the ResNet backbone layouts of
transformers, timm and torchvision, and the final check of a converted state dict against the model its config
builds (a key no rule knows, a key the model lacks, a missing key or a wrong shape is an error, never a silently
dropped weight), and the ``Converter`` declaration each converter module ends with.

Layer: io. May import ``config``, the building blocks and ``models``; never ``checkpoint``, ``engine`` or ``cli``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..config import ModelConfig
from ..models import build_model

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class Converter:
    """How one architecture's published weights become detrkit's, declared once at the end of its converter module
    (``CONVERTER = Converter(...)``); ``detrkit.convert`` derives its dispatch tables from these declarations.

    Args:
        arch: the ``ModelConfig.arch`` the converted weights load into.
        transformers_model_types: ``model_type`` values of transformers ``config.json`` files it converts.
        convert_transformers: ``(hf_config: dict, state, *, source) -> (ModelConfig, state)``.
        is_official: whether a state dict read from a single file (an official ``.pth``) has this layout.
        convert_official_file: ``(state, *, args, source, path) -> (ModelConfig, state)``.
        official_priority: layouts are tried highest first; a layout that another's test also accepts (every
            official repository of the family starts its keys with ``backbone.0.body.``) needs a higher one.
        init_backbone: ``(model, weights) -> None``: initialises a freshly built model's backbone from
            ``ModelConfig.backbone_weights`` when the model itself cannot (ResNets load torchvision's weights
            themselves; a YOLOS ViT reads a DeiT checkpoint here).
    """

    arch: str
    transformers_model_types: tuple[str, ...] = ()
    convert_transformers: Callable[..., tuple[ModelConfig, StateDict]] | None = None
    is_official: Callable[[StateDict], bool] | None = None
    convert_official_file: Callable[..., tuple[ModelConfig, StateDict]] | None = None
    official_priority: int = 0
    init_backbone: Callable[[nn.Module, str], None] | None = None


# Blocks per stage and whether they are bottlenecks: the ResNets detrkit's backbone builds.
RESNET_LAYOUTS: dict[str, tuple[tuple[int, ...], bool]] = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}


# -- safe reading --------------------------------------------------------------------------------------------
# Every file detrkit reads goes through these: tensors only (no pickled code runs), and a file that is not what was
# expected (empty, truncated, text, another format) is named and described in a sentence, never a parser's traceback.
_PLAIN_PICKLE_GLOBALS = ("torch.", "collections.OrderedDict", "argparse.Namespace", "_codecs.encode", "builtins.set")


def safe_globals() -> contextlib.AbstractContextManager:
    """Allow ``argparse.Namespace`` in ``weights_only`` unpickling: official checkpoints keep their training
    ``args`` in one, and a Namespace is a plain bag of attributes (rebuilding it runs no code)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return safe_globals([argparse.Namespace]) if safe_globals is not None else contextlib.nullcontext()


def describe_file(path: Path) -> str:
    """What ``path`` holds, in words, judged from its bytes without unpickling anything: "an empty file (0 bytes)",
    "a truncated safetensors file (...)", "a text file starting '...'", ... For messages about a file that is not
    what was expected."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        if zipfile.is_zipfile(path):
            return f"a zip archive such as torch.save writes ({size:,} bytes)"
        return (
            f"a truncated or corrupted zip archive ({size:,} bytes, without the directory a complete torch.save "
            "file ends with: an interrupted copy, download or save?)"
        )
    layout = _safetensors_layout(path, head, size)
    if layout is not None:
        return layout
    if head[:1] == b"\x80":
        return f"a Python pickle ({size:,} bytes)"
    text = head.decode("utf-8", errors="ignore") if head else ""
    if text and len(text.encode()) >= len(head) - 3 and all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        kind = "a JSON or text file" if first.startswith(("{", "[")) else "a text file"
        return f"{kind} ({size:,} bytes) starting {first!r}"
    return f"a file of unknown format ({size:,} bytes starting {head[:8]!r})"


def _safetensors_layout(path: Path, head: bytes, size: int) -> str | None:
    """How a safetensors file looks (complete, truncated), or None when ``head`` is not one's: 8 bytes of header
    length, a JSON header, then the tensors' bytes at the offsets the header lists."""
    if len(head) < 10 or head[8:9] != b"{":
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if length > 100_000_000:
        return None
    if 8 + length > size:
        return f"a truncated safetensors file ({size:,} bytes, shorter than its own header of {length:,} bytes)"
    with open(path, "rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(length))
            end = max([0] + [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"a corrupted safetensors file ({size:,} bytes; its header is not the JSON it should be)"
    expected = 8 + length + end
    if size < expected:
        return f"a truncated safetensors file ({size:,} of the {expected:,} bytes its header describes)"
    if size > expected:
        return f"a corrupted safetensors file ({size - expected:,} bytes more than its header describes)"
    return f"a safetensors file of {len(header) - ('__metadata__' in header)} tensors"


def pickle_globals(path: Path) -> list[str]:
    """The Python globals (classes, functions) the pickles at the start of ``path`` would import, read with
    ``pickletools`` (which parses opcodes and executes nothing). For naming what a refused pickle needs."""
    found: list[str] = []
    strings: list[str] = []
    with open(path, "rb") as f:
        try:
            for _ in range(5):  # legacy torch.save files are several pickles in a row
                for op, arg, _pos in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
        except Exception:  # noqa: BLE001 - the end of the pickles, or garbage: what was found so far is the answer
            pass
    return list(dict.fromkeys(found))


def _refuse_code(path: Path, name: str) -> ValueError:
    return ValueError(
        f"refusing to load {path}: unpickling it needs the Python global {name}. detrkit reads only tensors and "
        "plain data (torch.load weights_only=True) and never runs code from a checkpoint; re-save it as "
        "torch.save({'model': model.state_dict()}, path) or as safetensors"
    )


def torch_load_tensors(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with Namespace allowed: a pickle that needs any other Python global
    (a class, a function such as ``os.system``) is refused before anything runs, naming the global; a file that
    is not a torch checkpoint (empty, truncated, text, ...) is described."""
    try:
        with safe_globals(), warnings.catch_warnings():
            # pickle.dump's protocols 4-5: torch warns it may not parse them; what it cannot parse is reported below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # raised by the weights-only unpickler, before it builds anything
        # Quote torch's reason, not its advice (which suggests weights_only=False, exactly what we refuse).
        found = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", str(e), flags=re.IGNORECASE)
        if found:
            raise _refuse_code(path, found.group(1)) from e
        # A pickle torch's reader does not parse (pickle.dump's protocol 4 and 5): name what it would import.
        foreign = [g for g in pickle_globals(path) if not g.startswith(_PLAIN_PICKLE_GLOBALS)]
        if foreign:
            raise _refuse_code(path, ", ".join(foreign[:3])) from e
        what = describe_file(path)
        if not what.startswith(("a zip archive", "a Python pickle")):  # text read as opcodes, say
            raise ValueError(f"cannot read {path} as a torch checkpoint: it is {what}") from e
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        reason = found.group(1).strip() if found else "not a weights-only torch pickle"
        raise ValueError(
            f"cannot read {path} as a torch checkpoint of tensors: it is {what} that torch's weights-only reader "
            f"does not parse ({reason}); re-save it with torch.save or as safetensors"
        ) from e
    except Exception as e:  # not a torch file, truncated, corrupted: the unpickler fails in many ways
        what = describe_file(path)
        if what.startswith(("a zip archive", "a Python pickle")):  # the right kind of file, broken inside
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            reason = "it ends early (truncated?)" if isinstance(e, EOFError) else f"{type(e).__name__}: {first_line}"
            raise ValueError(f"cannot read {path} as a torch checkpoint: it is {what}, and {reason}") from e
        raise ValueError(f"cannot read {path} as a torch checkpoint: it is {what}") from e


def read_safetensors(path: Path) -> StateDict:
    """A safetensors file's tensors; a missing, truncated or foreign file is named and described."""
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' own error type is a Rust exception: catch whatever it raises
        what = describe_file(path)
        detail = f" ({e})" if what.startswith("a safetensors file") else ""
        raise ValueError(f"cannot read {path} as safetensors weights: it is {what}{detail}") from e


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object (``config.json``), or an error naming the file, the line and the column."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a JSON text file: it is {describe_file(path)}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not the object of settings expected")
    return obj


def read_transformers_weights(folder: Path) -> StateDict:
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state: StateDict = {}
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object (tensor name → shard file)")
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(folder / str(shard)))
        return state
    if (folder / "pytorch_model.bin").is_file():
        obj = torch_load_tensors(folder / "pytorch_model.bin")
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
RuleFunction = Callable[[re.Match, Tensor], "list[tuple[str, Tensor]] | None"]
Rule = tuple[re.Pattern, "str | RuleFunction"]


def apply_rules(state: dict[str, Tensor], rules: list[Rule]) -> tuple[StateDict, list[str]]:
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


# transformers' ResNet backbone, renamed to torchvision's names
def _hf_resnet_block(m: re.Match, t: Tensor) -> list[tuple[str, Tensor]]:
    """transformers ResNet ``stages.S.layers.B.layer.C`` is torchvision ``layer{S+1}.B.conv{C+1}`` and
    ``bn{C+1}``; its ``shortcut`` is torchvision's ``downsample`` (convolution 0, norm 1)."""
    stage, block, conv, kind, param = m.groups()
    prefix = f"layer{int(stage) + 1}.{block}"
    if conv is None:  # shortcut
        return [(f"{prefix}.downsample.{0 if kind == 'convolution' else 1}.{param}", t)]
    return [(f"{prefix}.{'conv' if kind == 'convolution' else 'bn'}{int(conv) + 1}.{param}", t)]


HF_RESNET_RULES: list[Rule] = [
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


# -- transformers backbones ---------------------------------------------------------------------------------
def hf_backbone_kind(hf: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
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


def check_timm(info: dict[str, Any], name: str, source: str) -> bool:
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


def check_hf_resnet(bc: dict[str, Any], name: str, source: str) -> bool:
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


def hf_resnet_body(
    hf_config: dict[str, Any], renamed: StateDict, unknown: list[str], source: str
) -> tuple[StateDict, str, bool, str, dict[str, Any]]:
    """The backbone of a renamed transformers state dict (keys ``<body>...``) in torchvision's names.

    Checks that ``config.json`` and the weights describe the same ResNet (timm or transformers' own), appends the
    body keys no rule knows to ``unknown``, and returns ``(body, resnet name, dilation, kind, backbone info)``.
    """
    body = {k.removeprefix("<body>"): v for k, v in renamed.items() if k.startswith("<body>")}
    if not body:
        raise ValueError(f"{source} has no backbone weights (model.backbone.conv_encoder.model.*)")
    kind, info = hf_backbone_kind(hf_config, source)
    weights_kind = "resnet" if any(k.startswith("embedder.") for k in body) else "timm"
    if weights_kind != kind:
        described = {"resnet": "a transformers ResNet", "timm": "a timm ResNet"}
        raise ValueError(
            f"{source}: config.json describes {described[kind]} backbone, but the weights are {described[weights_kind]}"
        )
    if kind == "resnet":
        body, body_unknown = apply_rules(body, HF_RESNET_RULES)
        unknown += [f"model.backbone.conv_encoder.model.{k}" for k in body_unknown]
    name = resnet_name(body, source)
    dilation = check_hf_resnet(info, name, source) if kind == "resnet" else check_timm(info, name, source)
    return body, name, dilation, kind, info


# -- shared checks -------------------------------------------------------------------------------------------
def count_layers(state: StateDict, prefix: str) -> int:
    return len({k.removeprefix(prefix).split(".")[0] for k in state if k.startswith(prefix)})


def resnet_name(body: StateDict, source: str) -> str:
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


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """State dict shapes of the model ``config`` builds, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = build_model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_against_model(config: ModelConfig, state: StateDict, *, unknown: list[str], source: str) -> None:
    """One error listing every key no rule converted, every converted key the model does not have, every model
    key the checkpoint lacks and every shape that differs."""
    expected = expected_shapes(config)
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
    lines = [f"  {len(items)} {title}:\n{listing(items)}" for title, items in problems.items() if items]
    if lines:
        raise ValueError(f"cannot convert {source} (no weight is dropped silently):\n" + "\n".join(lines))


def listing(items: list[str], limit: int = 40) -> str:
    shown = "\n".join(f"    {x}" for x in items[:limit])
    return shown + (f"\n    … and {len(items) - limit} more" if len(items) > limit else "")


def preview(obj: Any, n: int = 8) -> str:
    if isinstance(obj, dict):
        keys = [str(k) for k in obj]
        return ", ".join(keys[:n]) + (", …" if len(keys) > n else "")
    return type(obj).__name__


def hf_labels(
    hf_config: dict[str, Any], num_classes: int, source: str
) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """``(category_ids, class_names)`` from a transformers ``id2label`` (None, None without one).

    The keys are the published model's contiguous labels (COCO: 0..90, "N/A" where COCO has no class).
    """
    id2label = {int(k): str(v) for k, v in (hf_config.get("id2label") or {}).items()}
    if not id2label:
        return None, None
    if len(id2label) != num_classes:
        raise ValueError(f"{source}: id2label has {len(id2label)} labels but the class head {num_classes} classes")
    category_ids = tuple(sorted(id2label))
    return category_ids, tuple(id2label[i] for i in category_ids)
