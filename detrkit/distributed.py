"""Thin helpers over ``torch.distributed`` for runs launched by ``torchrun`` (one machine or many).

Nothing here changes global state beyond what ``init_process_group`` itself does: no patched ``print``, no
environment edits. Every helper is a no-op in a single process.

Layer: building blocks. Imports torch only.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def resolve_device(device: str) -> torch.device:
    """``device`` ("auto", "cpu", "cuda", "cuda:1", ...) as a ``torch.device`` this machine has.

    Raises ``ValueError`` saying what is missing (callers name their option): a device string torch does not
    know, CUDA without a GPU (or in a CPU-only build of torch), or a GPU index beyond the machine's count.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError("not a device torch knows (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda} build of torch" if torch.version.cuda else "CPU-only build of torch"
            raise ValueError(f"no CUDA GPU is available on this machine ({build}); use cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return dev


def init_from_env(device: str = "auto") -> torch.device:
    """Pick the device and, under ``torchrun``, join the process group (NCCL on GPUs, gloo on CPUs).

    Returns the device this process computes on; ``resolve_device``'s errors for one the machine lacks.
    """
    dev = resolve_device(device)
    if launched_by_torchrun() and not is_distributed():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if dev.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"torchrun local rank {local_rank} needs cuda:{local_rank}, but this machine has "
                    f"{torch.cuda.device_count()} CUDA GPU(s): start at most that many processes per machine"
                )
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    elif dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over processes (a copy; ``t`` itself is unchanged)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world_size()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
