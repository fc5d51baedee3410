"""Multi-scale deformable attention core: the fast CPU path against the ``grid_sample`` reference.

Shapes of an 800×1216 image through a ResNet's strides 8–64 (levels 100×152, 50×76, 25×38, 13×19: S = 20197),
nh 8, hd 32, L 4, P 4, batch 1, float32. Encoder: Q = S queries, one per token; decoder: Q = 300. Sampling
locations are what a trained model produces, not uniform noise: each query's reference point (its own cell centre
in the encoder, a random point in the decoder) plus the paper's initial offset pattern (a ring of 1..P cells per
head) with a cell of Gaussian jitter, so memory access is as local as in a real model. Same process, the two
contenders alternated run by run, medians after warm-up; forward+backward includes the gradients of value,
locations and weights. Before timing, each case checks that both agree.

    .venv/bin/python benchmarks/bench_deform_attn.py [--runs 7] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from detrkit.models.base import cpu_bf16
from detrkit.models.deformable_attention import _kernel, ms_deform_attn

LEVELS = ((100, 152), (50, 76), (25, 38), (13, 19))  # 800×1216 at strides 8, 16, 32, 64
HEADS, HEAD_DIM, POINTS = 8, 32, 4


def make_inputs(num_queries: int | None, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``value (1,S,nh,hd)``, ``spatial_shapes (L,2)``, ``locations (1,Q,nh,L,P,2)``, ``weights (1,Q,nh,L,P)``.

    ``num_queries`` None: the encoder, one query per token at its cell centre.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS)
    n_levels = len(LEVELS)
    s = int(shapes.prod(1).sum())
    if num_queries is None:
        centres = []
        for h, w in LEVELS:
            ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            centres.append(torch.stack([xs, ys], -1).reshape(-1, 2))
        ref = torch.cat(centres)  # (S, 2)
    else:
        ref = 0.05 + 0.9 * torch.rand(num_queries, 2, generator=g)  # (Q, 2)
    q = ref.shape[0]
    thetas = torch.arange(HEADS) * (2 * math.pi / HEADS)
    ring = torch.stack([thetas.cos(), thetas.sin()], -1)
    ring = ring / ring.abs().max(-1, keepdim=True).values  # (nh, 2)
    cells = ring[:, None, None, :] * torch.arange(1, POINTS + 1)[None, None, :, None]  # (nh, 1, P, 2)
    cells = cells + torch.randn(q, HEADS, n_levels, POINTS, 2, generator=g)  # (Q, nh, L, P, 2) in cells
    wh = shapes.flip(-1).float()  # (L, 2) as (w, h)
    loc = ref[:, None, None, None, :] + cells / wh[None, None, :, None, :]  # (Q, nh, L, P, 2)
    weights = torch.randn(q, HEADS, n_levels * POINTS, generator=g).softmax(-1).view(q, HEADS, n_levels, POINTS)
    value = torch.randn(1, s, HEADS, HEAD_DIM, generator=g)
    return value, shapes, loc[None], weights[None]


def time_alternating(
    a: Callable[[], object], b: Callable[[], object], *, runs: int, warmup: int
) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, called in turn."""
    for _ in range(warmup):
        a()
        b()
    times_a, times_b = [], []
    for _ in range(runs):
        for fn, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed calls of each contender per case")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="3 runs, 1 warm-up: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs, warmup = (3, 1) if args.quick else (args.runs, 2)
    if _kernel() is None:
        print("deform_attn: fast path unavailable (no C++ compiler), nothing to compare")
        return

    cases = [("encoder forward", None, False), ("encoder forward+backward", None, True)]
    cases += [("decoder forward", 300, False), ("decoder forward+backward", 300, True)]
    for name, num_queries, backward in cases:
        value, shapes, loc, weights = make_inputs(num_queries)
        grad = torch.randn(1, loc.shape[1], HEADS * HEAD_DIM)

        def run(impl: str, value=value, shapes=shapes, loc=loc, weights=weights, grad=grad, backward=backward):
            if not backward:
                with torch.no_grad():
                    return ms_deform_attn(value, shapes, loc, weights, impl=impl), ()
            inputs = [t.detach().requires_grad_() for t in (value, loc, weights)]
            out = ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2], impl=impl)
            out.backward(grad)
            return out, tuple(t.grad for t in inputs)

        (out_f, grads_f), (out_r, grads_r) = run("fast"), run("reference")
        diff = max((x - y).abs().max().item() for x, y in zip((out_f, *grads_f), (out_r, *grads_r), strict=True))
        s_fast, s_ref = time_alternating(
            lambda run=run: run("fast"), lambda run=run: run("reference"), runs=runs, warmup=warmup
        )
        print(
            f"deform_attn {name} 800x1216 q={loc.shape[1]} float32 batch=1: fast {1e3 * s_fast:.1f} ms, "
            f"reference {1e3 * s_ref:.1f} ms, ratio {s_fast / s_ref:.3f} (max |diff| {diff:.1e}) [{cpu_bf16()[1]}]",
            flush=True,
        )


if __name__ == "__main__":
    main()
