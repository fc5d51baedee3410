"""Files written atomically, and the formats detrkit writes: the model folder (``config.json`` +
``model.safetensors``) and the name of the training checkpoint format (written by ``engine/checkpoints.py``).

Layer: config level (below the models, which save themselves through it). Imports nothing from detrkit.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save, save_file

FORMAT = "detrkit"
FORMAT_VERSION = 1
# Resumable training checkpoints (``checkpoints/step-*.pt``): named here so that ``detrkit.load`` (io) can read
# their weights without importing the engine that writes them.
TRAIN_FORMAT = "detrkit-train"
TRAIN_FORMAT_VERSION = 1


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it and rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never a truncated one. The rename replaces
    the directory entry: a file hard-linked to the old ``path`` keeps the old contents.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def link_or_copy(source: str | Path, path: str | Path) -> Path:
    """Make ``path`` the same file as ``source``: a hard link (no second copy on disk), or a copy where the file
    system refuses hard links. Atomic like ``atomic_write``: linked or copied under a temporary name, then renamed
    over ``path``."""
    source, path = Path(source), Path(path)

    def write(tmp: Path) -> None:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:  # another file system, FAT, some network shares
            shutil.copyfile(source, tmp)

    return atomic_write(path, write)


def _same_bytes(path: Path, data: bytes) -> bool:
    """Whether ``path`` holds exactly ``data`` (compared in chunks: no second copy in memory)."""
    if not path.is_file() or path.stat().st_size != len(data):
        return False
    view, chunk = memoryview(data), 1 << 24
    with open(path, "rb") as f:
        return all(f.read(chunk) == view[i : i + chunk] for i in range(0, len(data), chunk))


def save_pretrained(model: Any, directory: str | Path, *, same_as: str | Path | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for a detrkit ``Detector``.

    ``same_as``: a folder that may already hold the very same files (a run's ``best/`` when the final model is the
    best one); when its files are byte-identical to what would be written, they are hard-linked into
    ``directory`` instead (``link_or_copy``), so the weights are on disk once.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict()}
    config_text = json.dumps(meta, indent=2) + "\n"
    weights, config = directory / "model.safetensors", directory / "config.json"
    if same_as is None:
        atomic_write(weights, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    else:
        same_as = Path(same_as)
        data = save(state, metadata={"format": "pt"})
        if _same_bytes(same_as / "model.safetensors", data) and _same_bytes(
            same_as / "config.json", config_text.encode()
        ):
            link_or_copy(same_as / "model.safetensors", weights)
            link_or_copy(same_as / "config.json", config)
            return directory
        atomic_write(weights, lambda p: p.write_bytes(data))
    atomic_write_text(config, config_text)
    return directory
