"""Multi-scale deformable attention: the fast path equals the reference, the module equals transformers'."""

from __future__ import annotations

import ctypes
import json
import math
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from detrkit import kernels
from detrkit.cli import main
from detrkit.models import deformable_attention as da
from detrkit.models.deformable_attention import MultiScaleDeformableAttention, ms_deform_attn, ms_deform_attn_reference

needs_kernel = pytest.mark.skipif(da._kernel() is None, reason="no C++ compiler: the fast path is unavailable")


def make_inputs(batch, shapes, queries, heads, head_dim, points, *, dtype=torch.float32, spread=1.0, seed=0):
    """``value (B,S,nh,hd)``, ``spatial_shapes (L,2)``, ``locations (B,Q,nh,L,P,2)``, ``weights (B,Q,nh,L,P)``.

    Locations are uniform over ``spread`` times the map, centred on it (spread > 1 puts points outside).
    """
    g = torch.Generator().manual_seed(seed)
    n_levels = len(shapes)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(batch, s, heads, head_dim, generator=g, dtype=dtype)
    loc = (torch.rand(batch, queries, heads, n_levels, points, 2, generator=g, dtype=dtype) - 0.5) * spread + 0.5
    weights = torch.rand(batch, queries, heads, n_levels, points, generator=g, dtype=dtype)
    return value, torch.tensor(shapes, dtype=torch.int64), loc, weights


def values_and_grads(fn, value, shapes, loc, weights, grad=None):
    inputs = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    out = fn(inputs[0], shapes, inputs[1], inputs[2])
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, inputs, grad))


def fast(*args):
    return ms_deform_attn(*args, impl="fast")


CASES = {
    "three levels with 1x1": (2, [(6, 5), (3, 3), (1, 1)], 7, 2, 8, 3),
    "one level, one point, hd 32": (1, [(4, 4)], 5, 1, 32, 1),
    "1-wide and 1-high levels, odd hd": (2, [(1, 1), (1, 7), (5, 1)], 9, 3, 5, 2),
    "paper sizes, small map": (1, [(8, 12), (4, 6), (2, 3), (1, 2)], 11, 8, 32, 4),
}


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("spread", [1.0, 3.0, 1e4], ids=["inside", "around", "far-outside"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fast_equals_reference(case, spread, dtype):
    args = make_inputs(*case, dtype=dtype, spread=spread)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, a, b in zip(
        ("out", "grad value", "grad loc", "grad weights"),
        values_and_grads(fast, *args),
        values_and_grads(ms_deform_attn_reference, *args),
        strict=True,
    ):
        # Location gradients scale with the map size (d loc = w · d pixel): compare relative to it.
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=tol * scale, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


@needs_kernel
def test_fast_equals_reference_at_init_on_cell_borders():
    # At init every offset is a whole number of cells from a cell centre, so sampling points sit on integer pixel
    # coordinates, where the bilinear gradient jumps: the kernel must round coordinates as the reference does to
    # pick the same corners, or the location gradients differ by O(1).
    levels = [(20, 30), (10, 15), (5, 8), (3, 4)]
    shapes = torch.tensor(levels)
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(dim=64, n_levels=4, num_heads=8, n_points=4)
    centres = []
    for h, w in levels:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    ref = torch.cat(centres)[None, :, None, :].expand(1, -1, 4, 2)  # (1, S, L, 2): each token's own centre
    value = torch.randn(1, ref.shape[1], 64)
    results = []
    for impl in ("fast", "reference"):
        module.zero_grad()
        out = module(value, ref, value, shapes, impl=impl)
        out.backward(torch.ones_like(out))
        results.append([out, *(p.grad.clone() for p in module.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4 * max(1.0, b.abs().max().item()), rtol=1e-4)


def test_far_outside_reads_zero():
    value, shapes, loc, weights = make_inputs(1, [(3, 4), (1, 1)], 4, 2, 4, 2, dtype=torch.float64)
    loc = loc + 50.0  # every point 50 maps away
    for impl in ("reference", "fast") if da._kernel() is not None else ("reference",):
        out, gv, gl, gw = values_and_grads(
            lambda *a, impl=impl: ms_deform_attn(*a, impl=impl), value, shapes, loc, weights
        )
        for t in (out, gv, gl, gw):
            assert torch.count_nonzero(t) == 0


@pytest.mark.parametrize("head_dim", [4, 16])  # the kernel's generic loops and its vector loops
@pytest.mark.parametrize("impl", ["reference", pytest.param("fast", marks=needs_kernel)])
def test_gradcheck(impl, head_dim):
    value, shapes, loc, weights = make_inputs(
        2, [(4, 3), (2, 2), (1, 1)], 3, 2, head_dim, 2, dtype=torch.float64, spread=1.5
    )
    inputs = [t.requires_grad_() for t in (value, loc, weights)]
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, shapes, loc, w, impl=impl), inputs)


@needs_kernel
def test_fast_needs_no_grad_for_every_input():
    value, shapes, loc, weights = make_inputs(1, [(4, 5), (2, 2)], 6, 2, 8, 2, dtype=torch.float64)
    loc.requires_grad_()
    ms_deform_attn(value, shapes, loc, weights, impl="fast").sum().backward()
    ref_loc = loc.detach().requires_grad_()
    ms_deform_attn_reference(value, shapes, ref_loc, weights).sum().backward()
    torch.testing.assert_close(loc.grad, ref_loc.grad)


def copy_into_transformers(module: MultiScaleDeformableAttention):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention,
    )

    config = transformers.DeformableDetrConfig(
        d_model=module.dim, num_feature_levels=module.n_levels, disable_custom_kernels=True
    )
    theirs = DeformableDetrMultiscaleDeformableAttention(config, num_heads=module.num_heads, n_points=module.n_points)
    theirs.load_state_dict(module.state_dict())  # same names, same shapes
    return theirs


def random_module(dim=64, n_levels=3, num_heads=4, n_points=2) -> MultiScaleDeformableAttention:
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(dim, n_levels, num_heads, n_points)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)  # away from the init, where zero weights would hide a mix-up
    return module


@pytest.mark.parametrize("coords", [2, 4])
@pytest.mark.parametrize("impl", ["reference", pytest.param("fast", marks=needs_kernel)])
def test_module_matches_transformers(impl, coords):
    ours = random_module()
    theirs = copy_into_transformers(ours)
    shapes = torch.tensor([[8, 6], [4, 3], [1, 1]])
    s = int(shapes.prod(1).sum())
    g = torch.Generator().manual_seed(2)
    value, query = torch.randn(2, s, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    ref = torch.rand(2, 5, 3, coords, generator=g)
    padding_mask = torch.zeros(2, s, dtype=torch.bool)
    padding_mask[1, 20:48] = True
    out = ours(query, ref, value, shapes, padding_mask, impl=impl)
    expected, _ = theirs(
        query,
        attention_mask=~padding_mask,  # transformers' mask is True on valid tokens
        encoder_hidden_states=value,
        reference_points=ref,
        spatial_shapes=shapes,
        spatial_shapes_list=[tuple(hw) for hw in shapes.tolist()],
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_padding_is_not_read():
    module = random_module()
    shapes = torch.tensor([[8, 6], [4, 3], [1, 1]])
    s = int(shapes.prod(1).sum())
    g = torch.Generator().manual_seed(3)
    value, query, ref = torch.randn(1, s, 64, generator=g), torch.randn(1, 5, 64, generator=g), torch.rand(1, 5, 3, 2)
    padding_mask = torch.rand(1, s, generator=g) < 0.3
    changed = value.masked_fill(padding_mask[..., None], 1e3)
    torch.testing.assert_close(
        module(query, ref, changed, shapes, padding_mask), module(query, ref, value, shapes, padding_mask)
    )


def test_init_pattern():
    module = MultiScaleDeformableAttention(dim=256, n_levels=4, num_heads=8, n_points=4)
    assert torch.count_nonzero(module.sampling_offsets.weight) == 0
    bias = module.sampling_offsets.bias.view(8, 4, 4, 2)
    for k in range(8):
        direction = torch.tensor([math.cos(2 * math.pi * k / 8), math.sin(2 * math.pi * k / 8)])
        direction = direction / direction.abs().max()  # on the unit square ring
        for p in range(4):
            torch.testing.assert_close(bias[k, :, p], direction.expand(4, 2) * (p + 1))
    for layer in (module.attention_weights, module.value_proj, module.output_proj):
        assert torch.count_nonzero(layer.bias) == 0
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    bound = math.sqrt(6 / (256 + 256))  # xavier_uniform
    for layer in (module.value_proj, module.output_proj):
        assert layer.weight.abs().max() <= bound and layer.weight.std() > bound / 3


def test_init_matches_transformers():
    torch.manual_seed(0)
    ours = MultiScaleDeformableAttention(dim=64, n_levels=3, num_heads=4, n_points=2)
    theirs = copy_into_transformers(ours)
    transformers = pytest.importorskip("transformers")
    model = transformers.DeformableDetrModel.__mro__[1]  # DeformableDetrPreTrainedModel
    config = transformers.DeformableDetrConfig(d_model=64, num_feature_levels=3)
    model(config)._init_weights(theirs)
    for name in ("sampling_offsets.bias", "sampling_offsets.weight", "attention_weights.weight"):
        torch.testing.assert_close(ours.state_dict()[name], theirs.state_dict()[name])


@pytest.mark.parametrize("impl", ["reference", pytest.param("fast", marks=needs_kernel)])
def test_bf16_autocast(impl):
    module = random_module()
    shapes = torch.tensor([[8, 6], [4, 3], [1, 1]])
    s = int(shapes.prod(1).sum())
    g = torch.Generator().manual_seed(4)
    value, query, ref = torch.randn(1, s, 64, generator=g), torch.randn(1, 5, 64, generator=g), torch.rand(1, 5, 3, 4)
    expected = module(query, ref, value, shapes, impl="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(query, ref, value, shapes, impl=impl)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_bf16_values_through_core():
    value, shapes, loc, weights = make_inputs(1, [(6, 5), (3, 3), (1, 1)], 7, 2, 8, 3)
    expected = ms_deform_attn_reference(value, shapes, loc, weights)
    for impl in ("reference", "fast") if da._kernel() is not None else ("reference",):
        out = ms_deform_attn(value.bfloat16(), shapes, loc.bfloat16(), weights.bfloat16(), impl=impl)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)


def test_forced_reference_and_unavailable_fast_path(monkeypatch):
    args = make_inputs(1, [(4, 4), (2, 2)], 3, 2, 4, 2)
    expected = ms_deform_attn_reference(*args)

    def boom(*_):
        raise AssertionError("fast path used")

    monkeypatch.setattr(da, "_ms_deform_attn_fast", boom)
    torch.testing.assert_close(ms_deform_attn(*args, impl="reference"), expected)
    monkeypatch.setattr(da, "_kernel", lambda: None)  # as without a compiler
    torch.testing.assert_close(ms_deform_attn(*args), expected)
    with pytest.raises(RuntimeError, match="fast"):
        ms_deform_attn(*args, impl="fast")
    with pytest.raises(ValueError, match="impl"):
        ms_deform_attn(*args, impl="cuda")


@needs_kernel
def test_auto_uses_fast_path(monkeypatch):
    args = make_inputs(1, [(4, 4), (2, 2)], 3, 2, 4, 2)
    calls = []
    real = da._ms_deform_attn_fast
    monkeypatch.setattr(da, "_ms_deform_attn_fast", lambda *a: calls.append(1) or real(*a))
    ms_deform_attn(*args)
    assert calls == [1]


class _WithShapes(torch.nn.Module):
    # Export and tracing take tensors as inputs; the level sizes are constants of a deployed model.
    def __init__(self, module: MultiScaleDeformableAttention, shapes: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.shapes = shapes

    def forward(self, query, reference_points, value):
        return self.module(query, reference_points, value, self.shapes)


def export_case():
    module = random_module().eval()
    shapes = torch.tensor([[8, 6], [4, 3], [1, 1]])
    g = torch.Generator().manual_seed(5)
    value, query = torch.randn(1, int(shapes.prod(1).sum()), 64, generator=g), torch.randn(1, 5, 64, generator=g)
    ref = torch.rand(1, 5, 3, 2, generator=g)
    return _WithShapes(module, shapes), (query, ref, value), module(query, ref, value, shapes, impl="reference")


def forbid_fast_path(monkeypatch):
    def boom(*_):
        raise AssertionError("fast path used")

    monkeypatch.setattr(da, "_ms_deform_attn_fast", boom)


def test_export_and_tracing_use_reference(monkeypatch):
    wrapped, inputs, expected = export_case()
    forbid_fast_path(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; still what older ONNX exports run on
        # check_trace re-runs the module outside tracing, where the fast path is right to run.
        traced = torch.jit.trace(wrapped, inputs, check_trace=False)
    torch.testing.assert_close(traced(*inputs), expected)
    exported = torch.export.export(wrapped, inputs)
    torch.testing.assert_close(exported.module()(*inputs), expected)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    torch.testing.assert_close(wrapped(*inputs), expected)


def test_onnx_export(monkeypatch, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    wrapped, inputs, _ = export_case()
    forbid_fast_path(monkeypatch)
    torch.onnx.export(wrapped, inputs, tmp_path / "msda.onnx")
    assert (tmp_path / "msda.onnx").stat().st_size > 0


@pytest.fixture
def fresh_kernel():
    # _library() is loaded once per process: forget it before the test and after (the next test reloads the
    # session's library from the session cache, set in conftest).
    da._library.cache_clear()
    yield
    da._library.cache_clear()


def fake_compiler(path: Path, script: str) -> Path:
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return path


def kernel_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, kernels.KernelUnavailableWarning)]


def test_failed_build_warns_once_with_compiler_output(tmp_path, monkeypatch, fresh_kernel):
    cxx = fake_compiler(tmp_path / "bad-c++", 'echo "ms_deform_attn.cpp:1: error: simulated failure 4711" >&2; exit 1')
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("DETRKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DETRKIT_DISABLE_KERNELS", raising=False)
    args = make_inputs(1, [(4, 4), (2, 2)], 3, 2, 4, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a second warning must show, not be deduplicated
        out = ms_deform_attn(*args)
        ms_deform_attn(*args)
        status = da.kernel_status()
    torch.testing.assert_close(out, ms_deform_attn_reference(*args))
    [message] = kernel_warnings(caught)
    for text in ("simulated failure 4711", "grid_sample reference", "10-20x slower", "build failed", "To fix"):
        assert text in message
    assert status["path"] == "reference" and status["reason"] == kernels.BUILD_FAILED
    assert "simulated failure 4711" in status["compiler_output"] and str(cxx) in status["command"]
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))
    assert [p.suffix for p in (tmp_path / "cache" / "kernels").glob("*.failed")] == [".failed"]
    with pytest.raises(RuntimeError, match="kernel_status"):
        ms_deform_attn(*args, impl="fast")


@pytest.mark.parametrize(
    "env, reason, warns",
    [
        ({"CXX": "/nonexistent/c++"}, kernels.NO_COMPILER, True),
        ({"DETRKIT_DISABLE_KERNELS": "1"}, kernels.DISABLED, False),
    ],
)
def test_no_compiler_and_disabled(env, reason, warns, tmp_path, monkeypatch, fresh_kernel):
    monkeypatch.setenv("DETRKIT_CACHE_DIR", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = da.kernel_status()
    assert status["path"] == "reference" and status["reason"] == reason
    assert len(kernel_warnings(caught)) == (1 if warns else 0)
    if warns:
        assert "/nonexistent/c++" in kernel_warnings(caught)[0]
    assert not list(tmp_path.rglob("*.so"))


@needs_kernel
def test_session_kernel_builds_into_temporary_cache_without_warnings(kernel_cache):
    status = da.kernel_status()
    assert status["path"] == "cpu-kernel" and status["reason"] in (kernels.BUILT, kernels.CACHED)
    assert Path(status["library"]).parent == kernel_cache / "kernels"  # not the user's ~/.cache
    assert "-Wall -Wextra" in status["command"]
    assert "warning" not in status["compiler_output"].lower(), status["compiler_output"]


@needs_kernel
def test_mismatched_struct_is_refused(monkeypatch):
    class Shorter(ctypes.Structure):
        _fields_ = da._Problem._fields_[:-1]  # P dropped on the Python side only

    monkeypatch.setattr(da, "_Problem", Shorter)
    result = kernels.build(
        "ms_deform_attn", cache=kernels.cache_dir(), compiler=kernels.find_compiler(), validate=da._check_library
    )
    assert result.lib is None and result.reason == kernels.INCOMPATIBLE
    assert "layout" in result.detail


# Run by two processes at once: both import torch, then start loading the kernel at the same moment.
_CONCURRENT_CHILD = """
import json, sys, time
from pathlib import Path
import torch
from detrkit.models import deformable_attention as da
mine, other = Path(sys.argv[1]), Path(sys.argv[2])
mine.touch()
deadline = time.time() + 120
while not other.exists() and time.time() < deadline:
    time.sleep(0.005)
status = da.kernel_status()
g = torch.Generator().manual_seed(0)
args = (torch.randn(1, 20, 2, 8, generator=g), torch.tensor([[4, 5]]), torch.rand(1, 3, 2, 1, 2, 2, generator=g),
        torch.rand(1, 3, 2, 1, 2, generator=g))
torch.testing.assert_close(da.ms_deform_attn(*args, impl="fast"), da.ms_deform_attn_reference(*args))
print(json.dumps(status))
"""


@needs_kernel
def test_concurrent_builds_make_one_library(tmp_path):
    # As DDP ranks starting together: one compiles, the other waits on the lock and loads the same library.
    builds = tmp_path / "builds.txt"
    real = shlex.join(kernels.find_compiler())
    cxx = fake_compiler(
        tmp_path / "counting-c++",
        f'case " $* " in *" -shared "*) echo build >> {shlex.quote(str(builds))}; sleep 1;; esac\nexec {real} "$@"',
    )
    env = {**os.environ, "CXX": str(cxx), "DETRKIT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("DETRKIT_DISABLE_KERNELS", None)
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT_CHILD, str(ready[i]), str(ready[1 - i])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    statuses = [json.loads(out.splitlines()[-1]) for out, _ in results]
    assert [s["path"] for s in statuses] == ["cpu-kernel", "cpu-kernel"]
    assert sorted(s["reason"] for s in statuses) == [kernels.BUILT, kernels.CACHED]
    assert builds.read_text().splitlines() == ["build"]  # one compilation, not one per process
    cache = tmp_path / "cache" / "kernels"
    assert len(list(cache.glob("*.so"))) == 1 and statuses[0]["library"] == statuses[1]["library"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary build left behind


def test_doctor_prints_active_path(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    status = da.kernel_status()
    [line] = [line for line in out.splitlines() if line.startswith("deformable attn")]
    assert f"{status['path']} on CPU tensors ({status['reason']}" in line
    for name in ("detrkit", "python", "torch", "torchvision", "cpu capability", "native bf16", "cuda"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert torch.__version__ in out


def test_bad_reference_points():
    module = random_module()
    shapes = torch.tensor([[8, 6], [4, 3], [1, 1]])
    with pytest.raises(ValueError, match="2 or 4"):
        module(torch.randn(1, 5, 64), torch.rand(1, 5, 3, 3), torch.randn(1, 63, 64), shapes)


@needs_kernel
def test_fast_path_checks_shapes():
    # The kernel indexes raw memory: inconsistent shapes must fail in Python, not read out of bounds.
    value, shapes, loc, weights = make_inputs(1, [(4, 4), (2, 2)], 3, 2, 4, 2)
    with pytest.raises(ValueError, match="tokens"):
        ms_deform_attn(value[:, :-1], shapes, loc, weights, impl="fast")
    with pytest.raises(ValueError, match="levels"):
        ms_deform_attn(value[:, :16], shapes[:1], loc, weights, impl="fast")
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, shapes, loc, weights[..., :1], impl="fast")
