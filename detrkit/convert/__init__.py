"""Reading published weights: ``transformers`` folders, the official repositories' ``.pth`` files and Hugging
Face Hub ids. One module per architecture (``detr.py``, ...) holds its key-renaming rules and config derivation
and ends with its ``CONVERTER`` declaration; the dispatch tables here are derived from those declarations.
``common.py`` holds what they share. Only tensors are read (safetensors, ``torch.load(weights_only=True)``): no
code from a checkpoint ever runs.

Layer: io. May import ``config``, the building blocks and ``models``; never ``checkpoint``, ``engine`` or ``cli``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import pkgutil
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import ModelConfig
from ..files import TRAIN_FORMAT
from .common import (
    Converter,
    StateDict,
    preview,
    read_json_object,
    read_safetensors,
    read_transformers_weights,
    torch_load_tensors,
)


@functools.cache
def converters() -> dict[str, Converter]:
    """Every converter declared by a module of this package (``CONVERTER = Converter(...)``), by arch."""
    found: dict[str, Converter] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        converter = getattr(module, "CONVERTER", None)
        if isinstance(converter, Converter):
            found[converter.arch] = converter
    return found


def transformers_converters() -> dict[str, Converter]:
    """transformers ``model_type`` → its converter."""
    return {t: c for c in converters().values() for t in c.transformers_model_types}


def official_converters() -> list[Converter]:
    """Converters of official ``.pth`` layouts, in the order their layouts are tried (most specific first)."""
    found = [c for c in converters().values() if c.is_official is not None]
    return sorted(found, key=lambda c: (-c.official_priority, c.arch))


# -- entry points --------------------------------------------------------------------------------------------
def load_published(path: str | Path) -> tuple[ModelConfig, StateDict]:
    """Read a published checkpoint: its ``ModelConfig`` and a state dict in detrkit's key layout.

    Args:
        path: a ``transformers`` folder (``config.json`` with ``"model_type": "detr"`` and
            ``model.safetensors`` or ``pytorch_model.bin``), or an official facebookresearch/detr ``.pth``;
            segmentation models too (``DetrForSegmentation``, ``detr-r50-panoptic-*.pth``: ``masks=True``).

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
        return _convert_state_file(read_safetensors(path), args=None, path=path)
    return convert_file_object(torch_load_tensors(path), path)


def convert_file_object(obj: Any, path: Path) -> tuple[ModelConfig, StateDict]:
    """``load_published`` for what ``torch_load_tensors(path)`` returned (callers that read the file once)."""
    if isinstance(obj, dict) and obj.get("format") == TRAIN_FORMAT:
        raise ValueError(f"{path} is a detrkit training checkpoint, not published weights: read it with detrkit.load")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        args = obj.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        return _convert_state_file(obj["model"], args=args if isinstance(args, dict) else None, path=path)
    if isinstance(obj, dict) and all(isinstance(v, Tensor) for v in obj.values()):
        return _convert_state_file(obj, args=None, path=path)
    raise ValueError(f"{path} holds neither a state dict nor {{'model': state_dict}} (found {preview(obj)})")


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


# -- transformers folders ------------------------------------------------------------------------------------
def _load_transformers_folder(folder: Path) -> tuple[ModelConfig, StateDict]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is neither a detrkit nor a transformers model")
    hf = read_json_object(config_file)
    if hf.get("format") == "detrkit":
        raise ValueError(f"{folder} is a detrkit folder: read it with detrkit.load")
    known = transformers_converters()
    converter = known.get(hf.get("model_type"))
    if converter is None:
        raise ValueError(
            f"{config_file} describes a {hf.get('model_type')!r} model; detrkit converts transformers "
            f"checkpoints of model_type {', '.join(map(repr, sorted(known)))}"
        )
    config, state = converter.convert_transformers(hf, read_transformers_weights(folder), source=str(folder))
    # The image processor's resize travels with the model, so `predict` resizes the way the reference does.
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        size = read_json_object(preprocessor).get("size")
        if isinstance(size, dict) and "shortest_edge" in size and "longest_edge" in size:
            config = config.replace(image_size=int(size["shortest_edge"]), max_size=int(size["longest_edge"]))
    return config, state


# -- official .pth files and bare state dicts ----------------------------------------------------------------
def _convert_state_file(
    state: dict[str, Any], *, args: dict[str, Any] | None, path: Path
) -> tuple[ModelConfig, StateDict]:
    """Dispatch a state dict read from a single file by its key layout."""
    for converter in official_converters():
        if converter.is_official(state):
            return converter.convert_official_file(state, args=args, source=str(path), path=path)
    if any(k.startswith("backbone.body.") for k in state):
        raise ValueError(
            f"{path} is a bare state dict in detrkit's layout, which does not record the architecture: save "
            "models with model.save_pretrained(folder) and load the folder, or build the model from its "
            "config and call model.load_state_dict"
        )
    transformers_keys = ("model.backbone.", "class_labels_classifier.", "detr.model.", "conditional_detr.model.")
    if any(k.startswith(transformers_keys) for k in state):
        raise ValueError(f"{path} holds transformers weights: load the folder with its config.json instead")
    raise ValueError(f"{path}: unrecognised checkpoint layout (keys: {preview(state)})")


def init_backbone(model, weights: str) -> None:
    """Initialise a freshly built model's backbone from ``weights`` (``ModelConfig.backbone_weights``) where its
    architecture's converter reads them (YOLOS: a DeiT/ViT checkpoint); ResNets load torchvision's weights
    themselves, so nothing is done for them."""
    converter = converters().get(model.config.arch)
    if converter is not None and converter.init_backbone is not None:
        converter.init_backbone(model, weights)
