"""onnxruntime against detrkit's PyTorch inference, the same weights, per architecture.

Each architecture's preset (random weights, 91 classes) is exported with ``detrkit.models.export.export_onnx``
(dynamic shapes; the export's own exactness checks run first), then at each size the outputs of both are compared
(max |Δ logit|, printed on the row) before timing: batch 1, float32, contenders alternated in one process, medians
after a warm-up, PyTorch through ``Detector._inference_forward`` (detrkit's default inference path: BatchNorm folded
into channels-last oneDNN convolutions) with ``torch.set_num_threads(--threads)``, onnxruntime's CPU provider with
``--threads`` intra-op threads. ``--int8`` adds a row for the ``--quantize int8`` graph of each architecture.

    .venv/bin/python benchmarks/bench_onnx.py [--arch detr conditional_detr deformable_detr yolos]
        [--sizes 800x1216 512x512] [--runs 3] [--threads 2] [--int8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import detrkit
from detrkit.kernels import cpu_info
from detrkit.models.export import _session, export_onnx

PRESETS = {
    "detr": "detr_r50",
    "conditional_detr": "conditional_detr_r50",
    "deformable_detr": "deformable_detr_r50",
    "yolos": "yolos_s",
}


def _cpu() -> str:
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    bf16 = "avx512_bf16" in cpu_info()["flags"] or "amx_bf16" in cpu_info()["flags"]
    return f"{cpu_info()['model']}, {capability}{' +bf16' if bf16 else ''}"


def _medians(fns: dict, runs: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--sizes", nargs="+", default=["800x1216", "512x512"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--int8", action="store_true", help="also time the --quantize int8 graph")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    cpu = _cpu()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            torch.manual_seed(0)
            # the preset's architecture at 91 classes, random weights: no download
            model = detrkit.build(PRESETS[arch], num_classes=91, backbone_weights=None).eval()
            graphs = {"onnxruntime": Path(tmp, f"{arch}.onnx")}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = time.perf_counter()
                export_onnx(model, graphs["onnxruntime"], size=(512, 512))
                export_s = time.perf_counter() - t
                if args.int8:
                    graphs["onnxruntime int8"] = Path(tmp, f"{arch}-int8.onnx")
                    export_onnx(model, graphs["onnxruntime int8"], size=(512, 512), quantize="int8")
            for name, graph in graphs.items():
                session = _session(graph, threads=args.threads)
                for h, w in sizes:
                    g = torch.Generator().manual_seed(0)
                    x = torch.randn(1, 3, h, w, generator=g)
                    mask = torch.zeros(1, h, w, dtype=torch.bool)
                    feed = {"pixel_values": x.numpy(), "padding_mask": mask.numpy()}
                    with torch.inference_mode():
                        want = model._inference_forward(x, mask)["pred_logits"]
                    got = torch.from_numpy(session.run(["pred_logits"], feed)[0])
                    diff = float((got - want).abs().max())

                    def run_torch(model=model, x=x, mask=mask):
                        with torch.inference_mode():
                            model._inference_forward(x, mask)

                    def run_ort(session=session, feed=feed):
                        session.run(None, feed)

                    times = _medians({"torch": run_torch, "ort": run_ort}, args.runs)
                    print(
                        f"onnx {arch} {h}x{w}: {name} {times['ort'] * 1000:.0f} ms, detrkit PyTorch "
                        f"{times['torch'] * 1000:.0f} ms, ratio {times['ort'] / times['torch']:.2f} "
                        f"(max |Δ logit| {diff:.1e}; export {export_s:.0f} s; {args.threads} threads; CPU {cpu})",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
