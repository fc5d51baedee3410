"""The run folder (``train.output_dir``): what a run writes there, and whether a new run may start in it.

A folder that holds a run is never mixed with another: a new run there is refused unless it resumes that run or
replaces it, and a resumed checkpoint must be of the same model.

Layer: engine. Imports: config, ``distributed`` and ``models`` (for the fields that decide the weights).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..config import ModelConfig
from ..models import shape_fields

log = logging.getLogger("detrkit")


# What a run writes into its folder (train.output_dir). A folder holding any of them holds a run: a new run there
# is refused unless it resumes that run or replaces it (``Trainer(resume=..., overwrite=...)``).
RUN_OUTPUTS = (
    *("config.yaml", "log.jsonl", "checkpoints", "metrics.json", "curves.png", "best", "model", "tensorboard"),
    *("query_stats.json", "report.html", "metrics_segm.json", "pr_curves.png", "errors.png", "confusion.png"),
)


def run_outputs(run_dir: Path) -> list[str]:
    """The run outputs already in ``run_dir`` (folders with a trailing ``/``; empty ones do not count)."""
    found = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(f"{name}/" if path.is_dir() else name)
    return found


def check_run_dir(run_dir: Path, *, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds another (the two would mix in ``log.jsonl``, the curves
    and the checkpoints that ``--resume auto`` picks), unless asked to continue it or to replace it."""
    if resume and overwrite:
        raise ValueError(
            f"resume and overwrite exclude each other: --resume continues the run in {run_dir}, --overwrite replaces it"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"train.output_dir {run_dir} is a file, not a folder: choose another train.output_dir")
    used = dist.broadcast_object(run_outputs(run_dir) if dist.is_main_process() else [])  # rank 0's file system
    if used and not resume and not overwrite:
        raise ValueError(
            f"{run_dir} already holds a run ({', '.join(used)}): pass --resume auto to continue it, or --overwrite "
            "to replace it (or choose another train.output_dir)"
        )
    if used and resume and resume != "auto" and Path(resume).resolve().parent != (run_dir / "checkpoints").resolve():
        raise ValueError(
            f"--resume {resume} is not a checkpoint of the run in {run_dir}, which holds another run "
            f"({', '.join(used)}): resume into the checkpoint's own run folder, or into a new train.output_dir"
        )


def check_same_model(saved: dict[str, Any], current: ModelConfig, path: Path) -> None:
    """Refuse a checkpoint of another model (architecture, shape-deciding fields, classes), naming each
    difference; announce other model settings that changed since it was written."""
    try:
        before = ModelConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        before = dict(saved)
    now = current.to_dict()
    keys = [k for k in now if k != "options"]
    options = sorted(set(before.get("options") or {}) | set(now["options"]), key=str)
    changed = [k for k in keys if before.get(k) != now[k]]
    changed += [f"options.{k}" for k in options if (before.get("options") or {}).get(k) != now["options"].get(k)]
    if not changed:
        return
    decisive = {"arch", "num_classes", "category_ids"} | set(shape_fields(current.arch))

    def value(config: dict[str, Any], key: str) -> Any:
        return (config.get("options") or {}).get(key[8:]) if key.startswith("options.") else config.get(key)

    def listed(keys: list[str]) -> str:
        return "; ".join(f"model.{k} {value(before, k)!r} there, {value(now, k)!r} here" for k in keys)

    refused = [k for k in changed if k in decisive]
    if refused:
        raise ValueError(
            f"{path} is a checkpoint of another model: {listed(refused)}. Resume with the config it was trained "
            "with (its run's config.yaml), or start a new run: --overwrite, or another train.output_dir"
        )
    log.warning("resuming %s with changed model settings: %s", path, listed(changed))
