"""ONNX export of detrkit detectors, exact or refused.

``export_onnx(model, path)`` writes a graph with the PyTorch model's contract: inputs ``pixel_values (B,3,H,W)``
float32 and ``padding_mask (B,H,W)`` bool (True on padding); outputs ``pred_logits (B,Q,C)``, ``pred_boxes (B,Q,4)``
(normalised cxcywh of the unpadded image) and, with a mask head, ``pred_masks (B,Q,H/4,W/4)``. Batch, height and
width are dynamic by default (H and W multiples of 32, the backbone's stride, as ``collate`` and ``predict`` pad
them); ``dynamic=False`` fixes them to the export size.

Exact or refused: the graph is written to a temporary file, run in onnxruntime at the export size, at another size
and on a padded batch of two, and compared with the PyTorch model on the same inputs; only when every output is
within ``tolerance`` (1e-4) is it renamed to ``path``. A graph that differs raises ``ExportMismatchError`` and no
file is left. (The exporter is ``torch.export``'s: sizes stay symbolic through the models' shape arithmetic; the
models take their general, padded path while exporting, ``backbone.exporting()``.)

Options: ``msda="gather"`` writes Deformable DETR's sampling with gathers instead of GridSample
(``ms_deform_attn_gather``); ``with_postprocess`` adds ``orig_sizes (B,2)`` [h, w] as an input and ``scores
(B,k)``, ``labels (B,k)`` (dataset category ids) and ``boxes (B,k,4)`` (absolute xyxy) as outputs, the top k of
``postprocess.postprocess``; ``quantize="int8"`` quantizes the weights of the transformer's matrix products
(onnxruntime dynamic quantization) and keeps the heads, attention-score products and deformable sampling in float.

The model's ``ModelConfig`` travels in the file's metadata (``detrkit.config``), so ``OnnxDetector`` needs nothing
else. Legend: B batch, Q queries, C logits per query, k detections kept per image.

Layer: models (a tool over every architecture; imports ``deformable_attention``, ``config``, ``files`` and the
building blocks; ``onnx`` and ``onnxruntime`` lazily).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..box_ops import box_cxcywh_to_xyxy
from ..files import atomic_write
from .deformable_attention import MultiScaleDeformableAttention

log = logging.getLogger("detrkit")

MSDA_EXPORTS = {"grid_sample": "reference", "gather": "gather"}
STRIDE = 32  # padded sizes are multiples of the backbone's stride (collate, predict)
DEFAULT_TOLERANCE = 1e-4
METADATA_PREFIX = "detrkit."


class ExportMismatchError(RuntimeError):
    """The exported graph's outputs differ from the PyTorch model's: the file was not written."""


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and checked: ``checks`` maps a check's description (inputs' shape) to the max
    |onnxruntime - PyTorch| of each output (of the float graph; with ``quantize``, ``quantized_checks`` the int8
    graph's)."""

    path: Path
    inputs: list[str]
    outputs: list[str]
    dynamic: bool
    size: tuple[int, int]
    checks: dict[str, dict[str, float]] = field(default_factory=dict)
    quantized_checks: dict[str, dict[str, float]] = field(default_factory=dict)  # the int8 graph's, not enforced
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max((d for c in self.checks.values() for d in c.values()), default=0.0)


class _Graph(nn.Module):
    """What is exported: the model's forward as a tuple of named outputs (+ the in-graph post-processing)."""

    def __init__(self, model: nn.Module, outputs: list[str], postprocess_top_k: int | None) -> None:
        super().__init__()
        self.model = model
        self.raw_outputs = outputs
        self.top_k = postprocess_top_k
        self.focal = bool(model.config.focal)
        self.register_buffer("category_ids", torch.tensor(model.label_map.category_ids, dtype=torch.int64))

    def forward(self, pixel_values: Tensor, padding_mask: Tensor, orig_sizes: Tensor | None = None) -> tuple:
        out = self.model(pixel_values, padding_mask)
        raw = tuple(out[k] for k in self.raw_outputs)
        if self.top_k is None:
            return raw
        scores, labels, boxes = postprocess_in_graph(
            out["pred_logits"], out["pred_boxes"], orig_sizes, self.category_ids, self.top_k, self.focal
        )
        return (scores, labels, boxes, *raw)


def postprocess_in_graph(
    logits: Tensor, boxes: Tensor, orig_sizes: Tensor, category_ids: Tensor, top_k: int, focal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``postprocess.postprocess`` without the threshold, in fixed shapes an exported graph can hold.

    Args: ``logits (B,Q,C)``, ``boxes (B,Q,4)`` normalised cxcywh, ``orig_sizes (B,2)`` [h, w] pixels,
    ``category_ids (K,)`` contiguous label → dataset category id. Returns ``scores (B,k)`` sorted, best first,
    ``labels (B,k)`` category ids and ``boxes (B,k,4)`` absolute xyxy clamped to the image; k = min(top_k, Q·K)
    for sigmoid models (the best (query, class) pairs), min(top_k, Q) for softmax ones (the best queries).
    """
    num_queries, num_logits = logits.shape[1], logits.shape[2]
    if focal:
        prob = logits.float().sigmoid().flatten(1)  # (B, Q·K)
        scores, flat_idx = prob.topk(min(top_k, num_queries * num_logits), dim=1)  # (B, k)
        query_idx, labels = flat_idx // num_logits, flat_idx % num_logits
    else:
        prob = logits.float().softmax(-1)[..., :-1]  # (B, Q, K): no-object dropped
        best, best_label = prob.max(-1)  # (B, Q)
        scores, query_idx = best.topk(min(top_k, num_queries), dim=1)  # (B, k)
        labels = best_label.gather(1, query_idx)
    picked = boxes.float().gather(1, query_idx[..., None].expand(-1, -1, 4))  # (B, k, 4)
    height, width = orig_sizes.to(picked.dtype).unbind(1)  # (B,), (B,)
    scale = torch.stack([width, height, width, height], dim=1)[:, None, :]  # (B, 1, 4)
    xyxy = torch.minimum(box_cxcywh_to_xyxy(picked).clamp(min=0) * scale, scale)  # (B, k, 4)
    return scores, category_ids[labels], xyxy


@contextlib.contextmanager
def _export_settings(model: nn.Module, msda: str) -> Iterator[None]:
    """The model in eval mode with deformable attention's core set to ``msda``'s implementation; restored after
    (the exporter's own train/eval toggling included)."""
    attn = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    saved = [m.impl for m in attn]
    was_training = model.training
    model.eval()
    for m in attn:
        m.impl = MSDA_EXPORTS[msda]
    try:
        yield
    finally:
        for m, impl in zip(attn, saved, strict=True):
            m.impl = impl
        model.train(was_training)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    size: tuple[int, int] | None = None,
    dynamic: bool = True,
    batch_size: int = 1,
    msda: str = "grid_sample",
    with_postprocess: bool = False,
    top_k: int = 100,
    quantize: str | None = None,
    opset: int = 18,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportReport:
    """Export ``model`` (a detrkit ``Detector``, float32, CPU) to an ONNX file at ``path``; see the module docstring.

    Args:
        size: (H, W) of the example input, multiples of 32 (default: the model's ``image_size`` square, rounded up).
        dynamic: batch, height and width dynamic (H and W multiples of 32, at least 64); False fixes them to
            ``batch_size`` × ``size``.
        msda: Deformable DETR's sampling: ``"grid_sample"`` or ``"gather"``.
        with_postprocess: add ``orig_sizes`` input and ``scores``, ``labels``, ``boxes`` outputs (top ``top_k``).
        quantize: None or ``"int8"`` (weights of the transformer's MatMul/Gemm; checked at a loose tolerance).
        check: run the exactness checks (onnxruntime needed); False writes the graph unchecked.
        tolerance: largest accepted max |onnxruntime - PyTorch| of any output.

    Returns an ``ExportReport``; raises ``ExportMismatchError`` (no file written) when a check fails.
    """
    started = time.perf_counter()
    path = Path(path)
    if msda not in MSDA_EXPORTS:
        raise ValueError(f"msda must be one of {sorted(MSDA_EXPORTS)}, got {msda!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be ≥ 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        raise ValueError(
            f"export_onnx exports a float32 CPU model, got {param.dtype} on {param.device}: call model.float().cpu() "
            "first"
        )
    if size is None:
        side = -(-int(model.config.image_size) // STRIDE) * STRIDE
        size = (side, side)
    size = (int(size[0]), int(size[1]))
    if any(s % STRIDE or s < 2 * STRIDE for s in size):
        raise ValueError(f"size must be two multiples of {STRIDE}, each at least {2 * STRIDE} (H, W), got {size}")
    _require("onnx", "onnxscript")
    if check or quantize:
        _require("onnxruntime")

    raw = ["pred_logits", "pred_boxes"] + (["pred_masks"] if model.config.masks else [])
    inputs = ["pixel_values", "padding_mask"] + (["orig_sizes"] if with_postprocess else [])
    outputs = (["scores", "labels", "boxes"] if with_postprocess else []) + raw
    graph = _Graph(model, raw, top_k if with_postprocess else None).eval()  # a fresh module starts in train mode
    # A batch of 2: torch.export fixes dimensions of size 1 (broadcasting rules), so B=1 could not stay dynamic.
    example = _example_inputs(size, [size] * (2 if dynamic else batch_size), with_postprocess, seed=0)
    dynamic_shapes = None
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=1024)
        height = STRIDE * torch.export.Dim("height_32", min=2, max=1024)
        width = STRIDE * torch.export.Dim("width_32", min=2, max=1024)
        dynamic_shapes = [{0: batch, 2: height, 3: width}, {0: batch, 1: height, 2: width}]
        if with_postprocess:
            dynamic_shapes.append({0: batch})
    report = ExportReport(path, inputs, outputs, dynamic, size)

    def write(tmp: Path) -> None:
        with _export_settings(model, msda), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's progress and deprecation chatter
            program = torch.onnx.export(
                graph,
                tuple(example),
                None,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=tuple(dynamic_shapes) if dynamic_shapes else None,
                dynamo=True,
                opset_version=opset,
                optimize=False,  # onnxscript's optimizer broke Deformable DETR's graph; onnxruntime optimises anyway
                verbose=False,
            )
        proto = program.model_proto
        _set_metadata(proto, model, report, msda=msda, top_k=top_k if with_postprocess else None, quantize=quantize)
        _save(proto, tmp)
        if check:
            _check(graph, model, msda, tmp, report, batch_size, with_postprocess, tolerance)
        if quantize:
            _quantize_int8(tmp)
            if check:
                _check(graph, model, msda, tmp, report, batch_size, with_postprocess, tolerance, quantized=True)

    atomic_write(path, write)
    report.seconds = time.perf_counter() - started
    return report


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install 'detrkit[onnx]'")


def _save(proto: Any, path: Path) -> None:
    import onnx

    onnx.save_model(proto, str(path))


def _set_metadata(
    proto: Any, model: nn.Module, report: ExportReport, *, msda: str, top_k: int | None, quantize: str | None
) -> None:
    """The config and the contract in the file's metadata: ``OnnxDetector`` reads them back."""
    meta = {
        "config": json.dumps(model.config.to_dict()),
        "inputs": json.dumps(report.inputs),
        "outputs": json.dumps(report.outputs),
        "dynamic": json.dumps(report.dynamic),
        "size": json.dumps(list(report.size)),
        "msda": msda,
        "postprocess_top_k": json.dumps(top_k),
        "quantize": json.dumps(quantize),
        "size_divisibility": json.dumps(STRIDE),
    }
    stale = [p for p in proto.metadata_props if p.key.startswith(METADATA_PREFIX)]
    for prop in stale:
        proto.metadata_props.remove(prop)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value
    proto.producer_name = "detrkit"


def _example_inputs(
    canvas: tuple[int, int], images: list[tuple[int, int]], with_postprocess: bool, *, seed: int
) -> list[Tensor]:
    """``pixel_values (B,3,H,W)`` random normal on the ``canvas`` (H, W) and ``padding_mask (B,H,W)``: image i covers
    ``images[i]`` (h, w) at the top-left, zeros and True beyond, as ``pad_batch`` leaves them; with
    ``with_postprocess``, ``orig_sizes (B,2)`` (sizes unrelated to the canvas, as originals are)."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(len(images), 3, *canvas, generator=g)
    padding_mask = torch.ones(len(images), *canvas, dtype=torch.bool)
    for i, (h, w) in enumerate(images):
        padding_mask[i, :h, :w] = False
    pixel_values = pixel_values.masked_fill(padding_mask[:, None], 0.0)
    example = [pixel_values, padding_mask]
    if with_postprocess:
        example.append(torch.tensor([[2 * h - 7, 2 * w + 5] for h, w in images]))
    return example


def _check_cases(size: tuple[int, int], dynamic: bool, batch_size: int) -> list[tuple[tuple[int, int], list]]:
    """(canvas, image sizes) of each check: the export size, another size, a padded batch of two; for a
    fixed-shape graph, its shape unpadded and with padded images."""
    h, w = size
    smaller = (max(h - STRIDE, STRIDE), max(w - 2 * STRIDE, STRIDE))
    if not dynamic:
        return [
            (size, [size] * batch_size),
            (size, [size] + [smaller] * (batch_size - 1) if batch_size > 1 else [smaller]),
        ]
    other = (h + STRIDE, w + 2 * STRIDE) if h == w else (w, h)
    canvas = (max(h, other[0]), max(w, other[1]))
    return [(size, [size]), (other, [other]), (canvas, [canvas, (canvas[0] - 2 * STRIDE, canvas[1] - STRIDE)])]


def _check(
    graph: _Graph,
    model: nn.Module,
    msda: str,
    onnx_path: Path,
    report: ExportReport,
    batch_size: int,
    with_postprocess: bool,
    tolerance: float,
    *,
    quantized: bool = False,
) -> None:
    """Run the written graph in onnxruntime on each check's inputs and compare with PyTorch; raise on a
    difference above ``tolerance`` (a quantized graph is only measured, into ``report.quantized_checks``)."""
    try:
        session = _session(onnx_path)
    except Exception as e:  # onnxruntime's own exception types: the graph is invalid or uses what it lacks
        raise ExportMismatchError(
            f"ONNX export refused: onnxruntime cannot load the exported graph ({e}). Nothing was written to "
            f"{report.path}. This is a bug in detrkit's export of {model.config.arch}; please report it."
        ) from e
    for i, (canvas, images) in enumerate(_check_cases(report.size, report.dynamic, batch_size)):
        inputs = _example_inputs(canvas, images, with_postprocess, seed=1 + i)
        padded = [f"{h}x{w}" for h, w in images if (h, w) != canvas]
        name = f"batch {len(images)} at {canvas[0]}x{canvas[1]}" + (f" (padded: {', '.join(padded)})" if padded else "")
        try:
            got = session.run(report.outputs, {k: v.numpy() for k, v in zip(report.inputs, inputs, strict=True)})
        except Exception as e:  # e.g. a size fixed in the graph that this check's inputs do not have
            raise ExportMismatchError(
                f"ONNX export refused: onnxruntime fails on {name}: {e}. Nothing was written to {report.path}."
            ) from e
        got = {k: torch.from_numpy(v) for k, v in zip(report.outputs, got, strict=True)}
        with _export_settings(model, msda), torch.no_grad():
            want = dict(zip(report.outputs, graph(*inputs), strict=True))
        diffs = _compare(got, want, inputs[-1] if with_postprocess else None, tolerance)
        (report.quantized_checks if quantized else report.checks)[name] = diffs
        bad = {k: d for k, d in diffs.items() if not d <= tolerance}  # NaN is bad too
        if bad and not quantized:
            detail = ", ".join(f"{k} {d:.3g}" for k, d in bad.items())
            raise ExportMismatchError(
                f"ONNX export refused: onnxruntime differs from PyTorch by more than {tolerance:g} on {name}: "
                f"max |Δ| {detail}. Nothing was written to {report.path}. This is a bug in detrkit's export of "
                f"{model.config.arch}; please report it with this message."
            )


def _compare(
    got: dict[str, Tensor], want: dict[str, Tensor], orig_sizes: Tensor | None, tolerance: float
) -> dict[str, float]:
    """Max |Δ| per output. The post-processed outputs are compared up to the order of detections whose scores
    tie within ``tolerance`` (top-k may order near-equal scores differently): each detection must have a
    counterpart with the same label, a score within ``tolerance`` and the same box (relative to the image)."""
    diffs: dict[str, float] = {}
    for k, w in want.items():
        g = got[k]
        if g.shape != w.shape:
            diffs[k] = float("inf")
        elif k in ("scores", "labels", "boxes"):
            continue
        else:
            diffs[k] = float((g.double() - w.double()).abs().max()) if w.numel() else 0.0
    if "scores" in want and orig_sizes is not None:
        scale = orig_sizes.flip(1).repeat(1, 2).double()[:, None, :]  # (B, 1, 4) as (w, h, w, h)
        g_s, w_s = got["scores"].double(), want["scores"].double()
        diffs["scores"] = float((g_s - w_s).abs().max())  # both sorted: swaps among ties keep this small
        g_b, w_b = got["boxes"].double() / scale, want["boxes"].double() / scale
        # (B, k, k): ORT detection i against PyTorch detection j
        close = (g_s[:, :, None] - w_s[:, None, :]).abs() <= tolerance
        close &= got["labels"][:, :, None] == want["labels"][:, None, :]
        box_diff = (g_b[:, :, None, :] - w_b[:, None, :, :]).abs().amax(-1)  # (B, k, k)
        best = box_diff.masked_fill(~close, float("inf")).amin(-1)  # (B, k)
        diffs["boxes"] = float(best.max()) if best.numel() else 0.0
        diffs["labels"] = 0.0 if bool(close.any(-1).all()) else float("inf")
    return diffs


def _session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -- INT8 -----------------------------------------------------------------------------------------------------------
# Quantized: matrix products whose second operand is a weight (an initializer, possibly transposed) inside the
# transformer. Kept in float, following what keeps DETR-family accuracy: products of two activations (attention
# scores and attention-weighted values), the class and box heads, and deformable attention's sampling offsets and
# attention-weight predictors (their outputs are coordinates and softmax logits, where an 8-bit step moves a point).
_FLOAT_KEEP = ("class_embed", "bbox_embed", "sampling_offsets", "attention_weights", "reference_points", "enc_output")


def _fold_weight_transposes(proto: Any) -> dict[str, str]:
    """Replace each Transpose of an initializer (how the exporter writes ``nn.Linear``'s ``x @ W.T``) by the
    transposed initializer, named as its output. Returns new name → the parameter's name."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    consumers: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    kept, sources = [], {}
    for node in proto.graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            sources[node.output[0]] = node.input[0]
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            array = numpy_helper.to_array(inits[node.input[0]])
            proto.graph.initializer.append(numpy_helper.from_array(array.transpose(perm).copy(), node.output[0]))
            consumers[node.input[0]] -= 1
            continue
        kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    unused = [i for i in proto.graph.initializer if consumers.get(i.name, 0) == 0 and i.name in inits]
    for init in unused:
        proto.graph.initializer.remove(init)
    return sources


def _quantize_int8(path: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(path))
    sources = _fold_weight_transposes(proto)  # the quantizer recognises weights only as initializers
    initializers = {i.name for i in proto.graph.initializer}

    def weight_of(node: Any) -> str | None:
        name = node.input[1] if len(node.input) > 1 else ""
        return sources.get(name, name) if name in initializers else None

    keep, quantized = [], []
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        weight = weight_of(node)
        if weight is None or any(part in weight for part in _FLOAT_KEEP):
            keep.append(node.name)
        else:
            quantized.append(node.name)
    if not quantized:
        raise ValueError("--quantize int8: no weight matrix product found to quantize")
    source = path.with_name(path.name + ".float")
    onnx.save_model(proto, str(source))
    try:
        quantize_dynamic(
            str(source),
            str(path),
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=keep,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        src_meta = {p.key: p.value for p in proto.metadata_props}
        out = onnx.load(str(path))
        del out.metadata_props[:]
        for key, value in src_meta.items():
            entry = out.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(out, str(path))
    finally:
        source.unlink(missing_ok=True)
    log.info("int8: %d matrix products quantized, %d kept in float", len(quantized), len(keep))
