"""ONNX export (issue 13): exact or refused, at any input size, for every architecture; the gather-based deformable
sampling, post-processing in the graph, ``OnnxDetector``/``predict --backend onnxruntime`` and half precision.

Fast tier: the export-only code paths against their eager twins (no exporter), one real export of a tiny YOLOS
shared by several tests, and the refusal path. ``slow``: one real export per other architecture and option, each
shared by the tests of that model."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from PIL import Image

import detrkit
from detrkit import cli
from detrkit.models import architectures
from detrkit.models import export as export_module
from detrkit.models.deformable_attention import ms_deform_attn_gather, ms_deform_attn_reference
from detrkit.models.export import ExportMismatchError, export_onnx, postprocess_in_graph
from detrkit.models.yolos import bicubic_resize_matrix
from detrkit.postprocess import postprocess

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL = 1e-4
SIZE = (64, 96)

# Tiny models, one per architecture and option (TINY of conftest.py with these overrides).
ARCHS = {
    "detr": {},
    "detr_masks": {"masks": True},
    "conditional_detr": {"arch": "conditional_detr", "class_loss": "focal"},
    "deformable_detr": {
        "arch": "deformable_detr",
        "class_loss": "focal",
        "num_feature_levels": 2,
        "enc_points": 2,
        "dec_points": 2,
    },
    "yolos": {
        "arch": "yolos",
        "backbone": "vit",
        "aux_loss": False,
        "pretrain_image_size": [64, 64],
        "mid_position_embeddings": True,
    },
    # padded patches as image content (transformers' behaviour): one resize for the padded grid, in the graph
    "yolos_ignore_padding": {"arch": "yolos", "backbone": "vit", "aux_loss": False, "vit_padding": "ignore"},
}
TWO_STAGE = {"box_refine": True, "two_stage": True, "num_feature_levels": 3}


def build(name: str, seed: int = 0, **overrides) -> detrkit.Detector:
    torch.manual_seed(seed)
    return detrkit.build(**{**TINY, "dec_layers": 1, **ARCHS[name], **overrides}).eval()


def padded_batch(seed: int = 0, canvas=(96, 128), second=(64, 64)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, *canvas, generator=g)
    mask = torch.ones(2, *canvas, dtype=torch.bool)
    mask[0] = False
    mask[1, : second[0], : second[1]] = False
    return pixel_values.masked_fill(mask[:, None], 0.0), mask


def image(seed: int = 0, size=(70, 90)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(*size, 3) * 255).astype("uint8"))


# -- the export-only code paths, eagerly -----------------------------------------------------------------------------
def test_gather_sampling_equals_grid_sample():
    torch.manual_seed(0)
    shapes = torch.tensor([[6, 9], [3, 5], [1, 1]])
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(2, s, 4, 8, dtype=torch.float64)
    # points inside, outside (reading zeros) and across the borders, plus exact cell centres and corners
    loc = torch.rand(2, 7, 4, 3, 5, 2, dtype=torch.float64) * 1.6 - 0.3
    loc[0, 0, 0, 0, 0] = torch.tensor([0.5 / 9, 0.5 / 6])
    loc[0, 0, 0, 0, 1] = torch.tensor([0.0, 1.0])
    loc[0, 0, 0, 1, 2] = torch.tensor([1.0, 0.0])
    weights = torch.rand(2, 7, 4, 3, 5, dtype=torch.float64)
    ref = ms_deform_attn_reference(value, shapes, loc, weights)
    assert torch.allclose(ms_deform_attn_gather(value, shapes, loc, weights), ref, atol=1e-12)
    # the list form of the level sizes (what Deformable DETR passes under export) gives the same
    as_list = [(6, 9), (3, 5), (1, 1)]
    assert torch.allclose(ms_deform_attn_gather(value, as_list, loc, weights), ref, atol=1e-12)
    assert torch.allclose(ms_deform_attn_reference(value, as_list, loc, weights), ref, atol=1e-12)


@pytest.mark.parametrize("size", [(4, 6), (3, 4), (8, 12), (1, 1), (2, 9), (12, 3)])
def test_bicubic_resize_matrix_is_interpolate(size):
    torch.manual_seed(0)
    table = torch.randn(4, 6, 5)  # (g_h, g_w, D)
    rows = bicubic_resize_matrix(14, 4, torch.tensor([size[0]]))[0]
    cols = bicubic_resize_matrix(13, 6, torch.tensor([size[1]]))[0]
    out = torch.einsum("hy,yxd,wx->hwd", rows, table, cols)
    ref = F.interpolate(table.permute(2, 0, 1)[None], size=size, mode="bicubic", align_corners=False)[0]
    assert torch.allclose(out[: size[0], : size[1]], ref.permute(1, 2, 0), atol=1e-5)
    assert out[size[0] :].abs().max() == 0 and out[:, size[1] :].abs().max() == 0  # zero beyond the image


@pytest.mark.parametrize("focal", [False, True])
def test_postprocess_in_graph_equals_postprocess(focal):
    torch.manual_seed(0)
    logits = torch.randn(3, 8, 4 if focal else 5)
    boxes = torch.rand(3, 8, 4) * 0.8 + 0.1
    sizes = torch.tensor([[480, 640], [100, 37], [64, 64]])
    ids = torch.tensor([3, 7, 11, 12])
    scores, labels, xyxy = postprocess_in_graph(logits, boxes, sizes, ids, 5, focal)
    from detrkit.labels import LabelMap

    ref = postprocess(
        {"pred_logits": logits, "pred_boxes": boxes},
        sizes,
        label_map=LabelMap(ids.tolist(), ["a", "b", "c", "d"]),
        top_k=5,
        focal=focal,
    )
    for i, r in enumerate(ref):
        assert torch.equal(scores[i], r["scores"]) and torch.equal(labels[i], r["labels"])
        assert torch.equal(xyxy[i], r["boxes"])


@pytest.mark.parametrize("name", ["detr_masks", "deformable_detr", "yolos"])
def test_export_paths_equal_the_eager_ones(name, monkeypatch):
    # What the models compute while exporting (masking always on, symbolic level sizes, YOLOS's matrix resize)
    # equals what they compute eagerly, on a padded batch and on one without padding.
    model = build(name, **({"mask_backbone_padding": True} if name != "yolos" else {}))
    with torch.no_grad():
        batches = [padded_batch(), (torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))]
        want = [model(*b) for b in batches]
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        got = [model(*b) for b in batches]
    for g, w in zip(got, want, strict=True):
        for k in ("pred_logits", "pred_boxes", "pred_masks"):
            if k in w:
                assert torch.allclose(g[k], w[k], atol=1e-5), k


# -- one real export shared by several tests -------------------------------------------------------------------------
# YOLOS: the cheapest architecture to export (no CNN), softmax classes and a label map of its own.
LABELS = {"category_ids": (2, 5, 9), "class_names": ("circle", "square", "triangle"), "enc_layers": 2}


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A tiny softmax YOLOS with its label map, exported dynamic with the post-processing in the graph."""
    model = build("yolos", **LABELS)
    path = tmp_path_factory.mktemp("onnx") / "yolos.onnx"
    report = model.export_onnx(path, size=SIZE, with_postprocess=True, top_k=6)
    return model, path, report


def test_export_is_checked_at_three_sizes(tiny_onnx):
    model, path, report = tiny_onnx
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    assert report.inputs == ["pixel_values", "padding_mask", "orig_sizes"]
    assert report.outputs == ["scores", "labels", "boxes", "pred_logits", "pred_boxes"]
    names = list(report.checks)
    assert names[0] == "batch 1 at 64x96" and names[1] == "batch 1 at 96x64" and names[2].startswith("batch 2")
    assert 0 <= report.max_abs_diff <= TOL


def test_onnx_graph_runs_at_sizes_it_was_not_checked_at(tiny_onnx):
    model, path, _ = tiny_onnx
    session = export_module._session(path)
    pixel_values, padding_mask = padded_batch(seed=3, canvas=(160, 64), second=(96, 40))
    sizes = torch.tensor([[320, 128], [200, 90]])
    got = session.run(None, {"pixel_values": pixel_values.numpy(), "padding_mask": padding_mask.numpy(),
                             "orig_sizes": sizes.numpy()})  # fmt: skip
    with torch.no_grad():
        want = model(pixel_values, padding_mask)
    assert np.abs(got[3] - want["pred_logits"].numpy()).max() <= TOL
    assert np.abs(got[4] - want["pred_boxes"].numpy()).max() <= TOL
    ref = postprocess(want, sizes, label_map=model.label_map, top_k=6)
    assert set(got[1].ravel().tolist()) <= {2, 5, 9}
    for i, r in enumerate(ref):
        assert np.abs(got[0][i] - r["scores"].numpy()).max() <= TOL
        assert np.abs(got[2][i] - r["boxes"].numpy()).max() <= TOL * 320


def test_onnx_detector_predicts_what_pytorch_predicts(tiny_onnx):
    model, path, _ = tiny_onnx
    onnx_model = detrkit.OnnxDetector(path)
    assert onnx_model.label_map.names == model.label_map.names and onnx_model.config == model.config
    images = [image(0), image(1, (50, 120)), image(2, (90, 40))]
    want = model.predict(images, threshold=0.0, top_k=5, batch_size=2)
    got = onnx_model.predict(images, threshold=0.0, top_k=5, batch_size=2)
    for g, w in zip(got, want, strict=True):
        assert g.names == w.names and torch.equal(g.labels, w.labels)
        assert torch.allclose(g.scores, w.scores, atol=TOL) and torch.allclose(g.boxes, w.boxes, atol=1e-2)


def test_predict_backend_onnxruntime(tiny_onnx, tmp_path, capsys):
    model, path, _ = tiny_onnx
    image(0).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["predict", str(tmp_path / "a.png"), "--weights", str(path), "--out", str(out), "--threshold", "0"]
    assert cli.main([*args, "--backend", "onnxruntime"]) == 0
    onnx_records = json.loads((out / "detections.json").read_text())
    model.save_pretrained(tmp_path / "model")
    args[3] = str(tmp_path / "model")
    assert cli.main(args) == 0
    torch_records = json.loads((out / "detections.json").read_text())
    got, want = onnx_records[0]["detections"], torch_records[0]["detections"]
    assert [d["name"] for d in got] == [d["name"] for d in want] and len(got) > 0
    # scores are rounded to 4 decimals in the JSON
    assert all(abs(a["score"] - b["score"]) <= 1e-4 + 1e-4 for a, b in zip(got, want, strict=True))
    assert cli.main([*args[:2], "--weights", str(path), "--out", str(out), "--backend", "onnxruntime", "--bf16"]) == 2


def test_a_graph_that_differs_is_refused(tiny_onnx, tmp_path, monkeypatch):
    # A wrong graph: another model's (same architecture, other weights) in place of this one's export.
    model, path, _ = tiny_onnx
    import onnx

    wrong = onnx.load(str(path))

    class Program:
        model_proto = wrong

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Program())
    other = build("yolos", seed=1, **LABELS)
    target = tmp_path / "other.onnx"
    with pytest.raises(ExportMismatchError, match="differs from PyTorch by more than 0.0001 on batch 1 at 64x96"):
        other.export_onnx(target, size=SIZE, with_postprocess=True, top_k=6)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_a_graph_onnxruntime_cannot_run_is_refused(tiny_onnx, tmp_path, monkeypatch):
    # A broken graph (a node dropped, its output left undefined: what onnxscript's optimizer once did to Deformable
    # DETR) must not be written either.
    model, path, _ = tiny_onnx
    import onnx

    broken = onnx.load(str(path))
    del broken.graph.node[len(broken.graph.node) // 2]

    class Program:
        model_proto = broken

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Program())
    with pytest.raises(ExportMismatchError, match="cannot load the exported graph"):
        model.export_onnx(tmp_path / "m.onnx", size=SIZE, with_postprocess=True, top_k=6)
    assert list(tmp_path.iterdir()) == []


def test_bad_export_arguments_are_refused(tmp_path):
    model = build("detr")
    with pytest.raises(ValueError, match="multiples of 32"):
        export_onnx(model, tmp_path / "a.onnx", size=(64, 90))
    with pytest.raises(ValueError, match="msda"):
        export_onnx(model, tmp_path / "a.onnx", msda="bilinear")
    with pytest.raises(ValueError, match="float32 CPU model"):
        export_onnx(build("detr").half(), tmp_path / "a.onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnx_detector_refuses_foreign_files(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="not an ONNX model"):
        detrkit.OnnxDetector(tmp_path / "x.onnx")
    with pytest.raises(FileNotFoundError):
        detrkit.OnnxDetector(tmp_path / "missing.onnx")


# -- half precision -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_predict(name, dtype):
    model = build(name)
    want = model.predict(image(), threshold=0.0, top_k=5)
    got = model.to(dtype).predict(image(), threshold=0.0, top_k=5)
    assert got.scores.dtype == torch.float32 and len(got) == 5
    assert torch.allclose(got.scores, want.scores, atol=0.02)  # rounding of 8 (bf16) or 11 (fp16) mantissa bits


def test_bf16_warns_where_the_cpu_emulates_it(monkeypatch):
    from detrkit.models import base

    monkeypatch.setattr(base, "cpu_info", lambda: {"model": "Some CPU", "flags": {"avx2", "fma"}})
    with pytest.warns(UserWarning, match="Some CPU.*emulated"):
        build("detr").optimize_for_inference(bf16=True)
    monkeypatch.setattr(base, "cpu_info", lambda: {"model": "Some CPU", "flags": {"avx512f", "avx512_bf16"}})
    assert base.cpu_bf16()[0]


# -- the other architectures and options (slow: 5-50 s each) ---------------------------------------------------------
# Each model is exported once (``exported``) and every test of that model reads the same file. A variant carries the
# options of its architecture at once where they do not exclude each other: DETR and Deformable DETR export with their
# mask head (a superset of the plain graph), Deformable DETR's box refinement, two-stage and post-processing go with
# the gather sampling (grid_sample: the masks export). Fixed shapes take the cheapest model, and the int8 test
# quantizes the Deformable DETR export again (the same exporter call, replayed: ``test_export_int8``).
EXPORTS = {  # name: (ARCHS entry, build overrides, export options)
    "detr_masks": ("detr_masks", {}, {}),
    "conditional_detr": ("conditional_detr", {}, {}),
    "deformable_detr_masks": ("deformable_detr", {"masks": True}, {}),
    "deformable_detr_two_stage_gather": ("deformable_detr", TWO_STAGE, {"msda": "gather", "with_postprocess": True}),
    "yolos_ignore_padding": ("yolos_ignore_padding", {}, {}),
    "yolos_fixed_shape": ("yolos", {}, {"dynamic": False, "batch_size": 2}),
}


@dataclass
class Exported:
    model: detrkit.Detector
    path: Path
    report: export_module.ExportReport
    call: tuple  # (args, kwargs, returned program) of the exporter call, for test_export_int8's replay


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name)``: EXPORTS[name]'s model exported (once per module) and the file's ``Exported``."""
    done: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in done:
            arch, overrides, options = EXPORTS[name]
            model = build(arch, **overrides)
            path = tmp_path_factory.mktemp(name) / "m.onnx"
            calls = []
            real = torch.onnx.export

            def spy(*args, **kwargs):
                program = real(*args, **kwargs)
                calls.append((args, kwargs, program))
                return program

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(torch.onnx, "export", spy)
                report = export_onnx(model, path, size=SIZE, **options)
            done[name] = Exported(model, path, report, calls[0])
        return done[name]

    yield get
    done.clear()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_predicts_what_pytorch_predicts(name, exported):
    e = exported(name)
    assert len(e.report.checks) >= 2 and e.report.max_abs_diff <= TOL
    onnx_model = detrkit.OnnxDetector(e.path)
    images = [image(0), image(1, (50, 120))]
    want = e.model.predict(images, threshold=0.0, top_k=5)
    got = onnx_model.predict(images, threshold=0.0, top_k=5)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.labels, w.labels) and torch.allclose(g.scores, w.scores, atol=TOL)
        assert (g.masks is None) == (w.masks is None)
        if w.masks is not None:
            assert (g.masks != w.masks).float().mean() < 1e-3


def test_every_architecture_and_option_is_exported():
    exported_archs = {ARCHS[arch].get("arch", "detr") for arch, _, _ in EXPORTS.values()}
    assert exported_archs == set(architectures())
    assert any(ARCHS[arch].get("masks") or o.get("masks") for arch, o, _ in EXPORTS.values())
    for option in ("msda", "with_postprocess", "dynamic"):
        assert any(option in options for _, _, options in EXPORTS.values()), option


@pytest.mark.slow
def test_export_deformable_with_gather_sampling(exported):
    import onnx

    e = exported("deformable_detr_two_stage_gather")
    assert e.report.inputs[-1] == "orig_sizes" and e.report.outputs[:3] == ["scores", "labels", "boxes"]
    ops = {n.op_type for n in onnx.load(str(e.path)).graph.node}
    assert "GridSample" not in ops and "GatherElements" in ops


@pytest.mark.slow
def test_export_fixed_shape(exported):
    import onnx

    e = exported("yolos_fixed_shape")
    dims = [d.dim_value for d in onnx.load(str(e.path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, *SIZE] and not e.report.dynamic


@pytest.mark.slow
def test_export_int8(exported, tmp_path, monkeypatch):
    import onnx

    # quantize="int8" calls the exporter exactly as the float export of the same model did (checked here), then
    # checks, quantizes and checks again: the recorded graph stands in for a second identical trace.
    e = exported("deformable_detr_masks")
    args, kwargs, program = e.call

    def replay(graph, example, f=None, **options):
        assert graph.model is e.model and f is None
        assert len(example) == len(args[1]) and all(torch.equal(a, b) for a, b in zip(example, args[1], strict=True))
        assert repr(options) == repr(kwargs)
        return program

    monkeypatch.setattr(torch.onnx, "export", replay)
    report = export_onnx(e.model, tmp_path / "q.onnx", size=SIZE, quantize="int8")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    assert math.isfinite(report.max_abs_diff)
