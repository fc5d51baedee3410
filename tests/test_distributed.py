"""Distributed training on 2 CPU processes with gloo: equivalence with one process, and a torchrun run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_engine import LISTENERS_ON, ROOT, tiny_overrides

from detrkit.config import ModelConfig, RunConfig
from detrkit.data import collate
from detrkit.demo import generate_shapes_dataset
from detrkit.engine import build_criterion, train_step
from detrkit.models import build_model

MODEL = ModelConfig(
    backbone="resnet18",
    trainable_stages=5,
    hidden_dim=32,
    num_heads=4,
    enc_layers=1,
    dec_layers=2,
    ffn_dim=64,
    num_queries=6,
    num_classes=3,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
)


def _samples():
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (h, w, n) in enumerate([(64, 80, 3), (96, 64, 1)]):
        # float64: the equivalence is exact in arithmetic; float32 rounding of 30-sized gradients would blur it
        image = torch.randn(3, h, w, generator=g, dtype=torch.float64)
        boxes = torch.rand(n, 4, generator=g) * 0.4 + 0.3
        target = {"boxes": boxes, "labels": torch.randint(0, 3, (n,), generator=g), "image_id": i}
        target["orig_size"] = target["size"] = torch.tensor([h, w])
        out.append((image, target))
    return out


def _step(model, samples):
    criterion = build_criterion(RunConfig(model=MODEL), 3)
    batch = collate(samples)
    losses = criterion(model(batch.pixel_values, batch.padding_mask), batch.targets)
    losses["loss"].backward()
    return losses


def _worker(rank: int, out: str) -> None:
    torch.manual_seed(0)
    model = build_model(MODEL).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    losses = _step(ddp, [_samples()[rank]])
    loss = losses["loss"].detach().clone()
    dist.all_reduce(loss)
    if rank == 0:
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss / 2, "grads": grads}, out)


def _workers(rank: int, port: int, outs: list[str]) -> None:
    """Both tests' workers in one pair of processes (each spawned process imports torch and the tests again)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _worker(rank, outs[0])
        _step_worker(rank, outs[1])
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_outputs(tmp_path_factory) -> list[Path]:
    """What rank 0 saved: ``_worker``'s gradients, then ``_step_worker``'s update."""
    outs = [tmp_path_factory.mktemp("ddp") / name for name in ("grads.pt", "step.pt")]
    mp.spawn(_workers, args=(_free_port(), [str(p) for p in outs]), nprocs=2, join=True)
    return outs


def test_two_processes_of_one_image_equal_one_process_of_two(ddp_outputs):
    torch.manual_seed(0)
    model = build_model(MODEL).double()
    losses = _step(model, _samples())
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ddp = torch.load(ddp_outputs[0], weights_only=True)
    assert torch.allclose(ddp["loss"], losses["loss"].detach(), atol=1e-5), (ddp["loss"], losses["loss"])
    assert ddp["grads"].keys() == single.keys()
    worst = max((ddp["grads"][n] - single[n]).abs().max().item() for n in single)
    scale = max(g.abs().max().item() for g in single.values())
    assert worst < 1e-5, (worst, scale, max(single, key=lambda n: (ddp["grads"][n] - single[n]).abs().max().item()))


def _equal_samples():
    """Four same-size images with two boxes each: every micro-batch normalises by the same box count."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(4):
        target = {"boxes": torch.rand(2, 4, generator=g) * 0.4 + 0.3, "labels": torch.randint(0, 3, (2,), generator=g)}
        target.update(image_id=i, orig_size=torch.tensor([64, 64]), size=torch.tensor([64, 64]))
        out.append((torch.randn(3, 64, 64, generator=g, dtype=torch.float64), target))
    return out


def _train_step(model, batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    criterion = build_criterion(RunConfig(model=MODEL), 3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train_step(batches, model=model, criterion=criterion, optimizer=optimizer, scaler=scaler, clip_max_norm=0.1)


def _step_worker(rank: int, out: str) -> None:
    torch.manual_seed(0)
    model = build_model(MODEL).double()
    mine = _equal_samples()[2 * rank : 2 * rank + 2]
    result = _train_step(torch.nn.parallel.DistributedDataParallel(model), [collate(mine[:1]), collate(mine[1:])])
    if rank == 0:
        torch.save({"stepped": result.stepped, "grad_norm": result.grad_norm, "model": model.state_dict()}, out)


def test_train_step_two_processes_accumulating_two_images_equal_one_process_of_four(ddp_outputs):
    """DDP with ``no_sync`` on the first micro-batch, the finite-loss agreement, clipping: the update of 2 processes
    × 2 micro-batches of 1 image is the update of one process on the 4 images at once."""
    torch.manual_seed(0)
    model = build_model(MODEL).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    single = _train_step(model, [collate(_equal_samples())])

    ddp = torch.load(ddp_outputs[1], weights_only=True)
    assert single.stepped and ddp["stepped"]
    assert abs(ddp["grad_norm"] - single.grad_norm) < 1e-5 * single.grad_norm
    moved = max((v - before[k]).abs().max().item() for k, v in model.state_dict().items())
    worst = max((v - ddp["model"][k]).abs().max().item() for k, v in model.state_dict().items())
    assert moved > 1e-4 and worst < 1e-6, (moved, worst)


def test_torchrun_trains_with_two_processes(tmp_path):
    shapes = generate_shapes_dataset(tmp_path / "data", num_train=8, num_val=4, min_side=48, max_side=64)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(_free_port()),
        "-m",
        "detrkit",
        "train",
        "demo",
        *tiny_overrides(shapes, run, "train.epochs=1", *LISTENERS_ON),  # every listener, on rank 0 alone
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    steps = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"step"' in x]
    # 8 images, batch 2 per process, 2 processes: 2 steps, each seeing 4 images
    assert [r["step"] for r in steps if r["type"] == "step"] == [1, 2]
    assert json.loads((run / "metrics.json").read_text()).keys() >= {"AP", "AP50"}
    assert (run / "model" / "model.safetensors").is_file()
    assert Path(run / "log.jsonl").read_text().count('"type": "epoch"') == 1  # rank 0 alone writes logs
