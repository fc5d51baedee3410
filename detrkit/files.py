"""Files written atomically, and the detrkit model folder format (``config.json`` + ``model.safetensors``).

Layer: config level (below the models, which save themselves through it). Imports nothing from detrkit.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

FORMAT = "detrkit"
FORMAT_VERSION = 1


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it and rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never a truncated one.
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


def save_pretrained(model: Any, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for a detrkit ``Detector``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict()}
    atomic_write_text(directory / "config.json", json.dumps(meta, indent=2) + "\n")
    return directory
