"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, section 4.1, eq. 3).

Every query attends to ``P`` sampled points on each of ``L`` feature levels per head, at locations predicted from
the query around a reference point; the sampled values (bilinear, zero padding) are averaged with softmax weights
also predicted from the query.

Legend: B batch, Q queries, S = Σ h_l·w_l value tokens over the L levels, D width, nh heads, hd = D / nh head
width, L levels, P sampling points per level and head.

``ms_deform_attn_reference`` is the plain PyTorch version (one ``grid_sample`` per level, exportable to ONNX);
``ms_deform_attn`` dispatches to a compiled CPU kernel (``detrkit/kernels/ms_deform_attn.cpp``) when it is applicable
and to the reference otherwise; ``kernel_status()`` says which path runs and why.

Layer: models (a shared layer, not an architecture). May import the building blocks (``kernels``).
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels

IMPLS = ("auto", "reference", "fast", "gather")


def _level_shapes(spatial_shapes: Tensor | list[tuple[int, int]]) -> list[tuple[int, int]]:
    # The only host read of tensor values: the level sizes fix every shape below. Under tracing they become
    # constants of the graph, as in the official export path; a list of (h, w) (what Deformable DETR passes under
    # torch.export, symbolic sizes) keeps an exported graph valid at every input size.
    if not isinstance(spatial_shapes, Tensor):
        return [(h, w) for h, w in spatial_shapes]
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def ms_deform_attn_reference(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Multi-scale deformable attention core in plain PyTorch: one ``grid_sample`` per level.

    Bilinear sampling with zero padding and ``align_corners=False``: location (0, 0) is the top-left corner of the
    top-left cell, (1, 1) the bottom-right corner of the bottom-right cell, and cell centres sit at
    ``(i + 0.5) / w``; locations outside [0, 1] read zeros beyond the border.

    Args:
        value: ``(B, S, nh, hd)``, the L levels flattened row-major and concatenated along S.
        spatial_shapes: ``(L, 2)`` int64, (h, w) of each level; Σ h·w = S.
        sampling_locations: ``(B, Q, nh, L, P, 2)`` normalised (x, y).
        attention_weights: ``(B, Q, nh, L, P)``, usually a softmax over L·P.

    Returns:
        ``(B, Q, nh·hd)``.
    """
    b, _, nh, hd = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = _level_shapes(spatial_shapes)
    # grid_sample wants one dtype for input and grid; under autocast the locations may be wider than the values.
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    value_levels = value.to(dtype).split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations.to(dtype) - 1  # grid_sample's [-1, 1] convention
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = value_levels[level].flatten(2).transpose(1, 2).reshape(b * nh, hd, h, w)  # (B·nh, hd, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B·nh, Q, P, 2)
        sampled.append(
            F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B·nh, hd, Q, P)
    weights = attention_weights.to(dtype).transpose(1, 2).reshape(b * nh, 1, q, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (B·nh, hd, Q)
    return out.view(b, nh * hd, q).transpose(1, 2).contiguous()  # (B, Q, nh·hd)


def ms_deform_attn_gather(
    value: Tensor, spatial_shapes: Tensor | list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """``ms_deform_attn_reference`` with the bilinear sampling written as four row gathers per level instead of
    ``grid_sample``: the same arithmetic (``align_corners=False``, zeros outside the map), in operators every ONNX
    runtime implements (some, TensorRT among them, mis-handle GridSample). Same arguments and result; slower in
    PyTorch (it materialises the four corners' rows), so only export uses it (``detrkit export --msda gather``).
    """
    b, _, nh, hd = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = _level_shapes(spatial_shapes)
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    value_levels = value.to(dtype).split([h * w for h, w in shapes], dim=1)
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = value_levels[level].transpose(1, 2).flatten(0, 1)  # (B·nh, h·w, hd)
        loc = sampling_locations[:, :, :, level].to(dtype).transpose(1, 2).flatten(0, 1)  # (B·nh, Q, P, 2)
        # grid_sample's unnormalisation with align_corners=False: cell centres at integers
        x = loc[..., 0] * w - 0.5  # (B·nh, Q, P)
        y = loc[..., 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        level_out = None
        for dy, dx, weight in (
            (0, 0, (1 - fy) * (1 - fx)),
            (0, 1, (1 - fy) * fx),
            (1, 0, fy * (1 - fx)),
            (1, 1, fy * fx),
        ):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)  # corners off the map read zeros
            index = (yi.clamp(min=0, max=h - 1) * w + xi.clamp(min=0, max=w - 1)).long().flatten(1)  # (B·nh, Q·P)
            rows = v.gather(1, index[..., None].expand(-1, -1, hd))  # (B·nh, Q·P, hd)
            term = rows * (weight * inside.to(dtype)).flatten(1)[..., None]
            level_out = term if level_out is None else level_out + term
        sampled.append(level_out.view(b * nh, q, n_points, hd))
    weights = attention_weights.to(dtype).transpose(1, 2).reshape(b * nh, q, n_levels * n_points, 1)
    out = (torch.cat(sampled, dim=2) * weights).sum(2)  # (B·nh, Q, hd)
    return out.view(b, nh, q, hd).transpose(1, 2).reshape(b, q, nh * hd)  # (B, Q, nh·hd)


def _fast_applicable(value: Tensor) -> bool:
    # Export, tracing and torch.compile record the reference (grid_sample has ONNX and TorchScript support; an
    # opaque ctypes call has neither); the compiled kernel is CPU only.
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return False
    if torch.compiler.is_compiling():
        return False
    return value.device.type == "cpu" and _kernel() is not None


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    impl: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention core; same arguments and result as ``ms_deform_attn_reference``.

    ``impl``: ``"reference"`` forces the ``grid_sample`` version; ``"fast"`` the compiled CPU kernel (an error where
    it does not apply); ``"auto"`` the kernel where it applies (CPU tensors, a C++ compiler found, not under tracing,
    ONNX export or ``torch.compile``) and the reference otherwise; ``"gather"`` the reference's arithmetic without
    ``grid_sample`` (``ms_deform_attn_gather``, for export). The fast path has no double backward.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "gather":
        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)
    if impl == "reference" or (impl == "auto" and not _fast_applicable(value)):
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
    if value.device.type != "cpu" or _kernel() is None:
        raise RuntimeError(
            "the fast multi-scale deformable attention needs CPU tensors and its compiled kernel "
            "(kernel_status() or `detrkit doctor` say why it is unavailable)"
        )
    return _ms_deform_attn_fast(value, spatial_shapes, sampling_locations, attention_weights)


# ----------------------------------------------------------------------------------------------------------------
# Fast CPU path: a small C++ kernel (no torch headers), compiled on first use and called through ctypes.
#
# Why a kernel: per (batch, query, head) it reads the 4 corner rows of each of the L·P points once and sums them in
# registers, where grid_sample materialises (B·nh, hd, Q, L·P) samples before the weighted sum and scatters
# through a generic backward. A pure PyTorch embedding_bag formulation (the 4·L·P corners of every query and head
# as one bag, bilinear × attention weights as per-sample weights) was tried first: ~10 index/weight tensors of
# B·Q·nh·L·P·4 elements and a slow scatter backward made it 0.75x the reference's time forward but 1.5x forward +
# backward at the encoder shapes, so it was dropped; gathering the corner rows with index_select would materialise
# B·Q·nh·L·P·4·hd values (1.3 GB at those shapes). Measured on this project's 2-core CPU (float32, 800x1216 image,
# benchmarks/bench_deform_attn.py), fast / reference: encoder forward 57 / 1137 ms, encoder forward + backward
# 221 / 2506 ms, decoder (300 queries) forward 3.9 / 9.4 ms, forward + backward 13.4 / 45.6 ms.
# The backward writes value gradients without atomics by giving each thread whole (batch, head) pairs, so results
# do not depend on the thread count. The source is detrkit/kernels/ms_deform_attn.cpp; detrkit.kernels builds it
# once per machine (~3 s with plain ``c++``, not the minute of a torch.utils.cpp_extension build) and warns when it
# cannot.

_KERNEL_ABI = 1  # msda_abi_version() of detrkit/kernels/ms_deform_attn.cpp
# Completes the warning when the kernel is unavailable (figures from the comment above).
_FALLBACK = "multi-scale deformable attention (Deformable DETR) runs the grid_sample reference, 10-20x slower"


class _Problem(ctypes.Structure):
    # Mirrors ``struct Problem`` in ms_deform_attn.cpp, field for field; _check_library compares the layouts.
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("value", "shapes", "starts", "loc", "attn", "grad_out", "out")),
        *((name, ctypes.c_void_p) for name in ("grad_value", "grad_loc", "grad_attn")),
        *((name, ctypes.c_int64) for name in ("B", "S", "Q", "nh", "hd", "L", "P")),
    ]


def _check_library(lib: ctypes.CDLL) -> None:
    """Refuses a library whose ABI version or ``struct Problem`` layout differs from this file's (raises)."""
    if lib.msda_abi_version() != _KERNEL_ABI:
        raise kernels.KernelMismatchError(f"ABI version {lib.msda_abi_version()}, expected {_KERNEL_ABI}")
    lib.msda_problem_layout.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    lib.msda_problem_layout.restype = ctypes.c_int64
    buffer = (ctypes.c_int64 * 64)()
    theirs = list(buffer[: lib.msda_problem_layout(buffer, len(buffer))])
    ours = [ctypes.sizeof(_Problem), *(getattr(_Problem, name).offset for name, _ in _Problem._fields_)]
    if theirs != ours:
        raise kernels.KernelMismatchError(
            f"struct Problem has layout {theirs} in C++ and {ours} in ctypes (sizeof, then each field's offset)"
        )
    for name in ("msda_forward", "msda_backward"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(_Problem), ctypes.c_int, ctypes.c_int64]
        fn.restype = ctypes.c_int


@functools.cache
def _library() -> kernels.KernelLibrary:
    # Once per process, on first CPU use; the build itself happens once per machine (see detrkit/kernels).
    return kernels.load("ms_deform_attn", fallback=_FALLBACK, validate=_check_library)


def _kernel() -> ctypes.CDLL | None:
    """The kernel library, or None when the reference must run (no compiler, failed build, disabled)."""
    return _library().lib


def kernel_status() -> dict[str, str | None]:
    """Which path ``ms_deform_attn(impl="auto")`` takes for CPU tensors, and why (builds the kernel if needed).

    Keys: ``path`` ("cpu-kernel" or "reference"), ``reason`` ("built", "loaded from cache", "no compiler",
    "build failed", "disabled", "load failed", "incompatible"), ``detail`` (the library's path or the error),
    ``library``, ``compiler``, ``compiler_version``, ``command`` and ``compiler_output``. GPU tensors, tracing,
    export and ``torch.compile`` always take the reference.
    """
    return _library().status()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _problem(value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor, **outputs: Tensor) -> _Problem:
    b, s, nh, hd = value.shape
    _, q, _, n_levels, n_points, _ = loc.shape
    return _Problem(
        value=_ptr(value),
        shapes=_ptr(shapes),
        starts=_ptr(starts),
        loc=_ptr(loc),
        attn=_ptr(attn),
        **{k: _ptr(v) for k, v in outputs.items()},
        B=b,
        S=s,
        Q=q,
        nh=nh,
        hd=hd,
        L=n_levels,
        P=n_points,
    )


_KERNEL_DTYPES = {torch.float32: 0, torch.float64: 1}


class _MSDeformAttnFunction(torch.autograd.Function):
    # Inputs arrive contiguous, on the CPU, in float32 or float64 (see _ms_deform_attn_fast).

    @staticmethod
    def forward(ctx, value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
        b, _, nh, hd = value.shape
        out = value.new_empty(b, loc.shape[1], nh, hd)  # (B, Q, nh, hd)
        pr = _problem(value, shapes, starts, loc, attn, out=out)
        if _kernel().msda_forward(ctypes.byref(pr), _KERNEL_DTYPES[value.dtype], torch.get_num_threads()) != 0:
            raise RuntimeError("deformable attention kernel failed")
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        value, shapes, starts, loc, attn = ctx.saved_tensors
        need_value, _, _, need_loc, need_attn = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        # Zero-filled: the kernel only adds into grad_value and skips points that miss the map.
        grad_value = torch.zeros_like(value) if need_value else None
        grad_loc = torch.zeros_like(loc) if need_loc else None
        grad_attn = torch.zeros_like(attn) if need_attn else None
        if need_value or need_loc or need_attn:
            pr = _problem(
                value, shapes, starts, loc, attn, grad_out=grad_out, grad_value=grad_value, grad_loc=grad_loc,
                grad_attn=grad_attn,
            )  # fmt: skip
            if _kernel().msda_backward(ctypes.byref(pr), _KERNEL_DTYPES[value.dtype], torch.get_num_threads()) != 0:
                raise RuntimeError("deformable attention kernel failed")
        return grad_value, None, None, grad_loc, grad_attn


def _ms_deform_attn_fast(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    b, s, nh, hd = value.shape
    q = sampling_locations.shape[1]
    shapes = _level_shapes(spatial_shapes)
    # The kernel trusts these shapes with raw pointers: check them as the reference's reshapes would.
    n_levels = len(shapes)
    if sampling_locations.dim() != 6 or sampling_locations.shape[0] != b or sampling_locations.shape[2] != nh:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not fit value {tuple(value.shape)}"
        )
    if sampling_locations.shape[3] != n_levels or sampling_locations.shape[5] != 2:
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} does not fit {n_levels} levels")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights {tuple(attention_weights.shape)} does not fit the sampling locations")
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(f"spatial_shapes {shapes} do not add up to the {s} tokens of value")
    # Same dtype rule as the reference; half types (autocast) are computed in float32 and cast back.
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    compute = dtype if dtype in _KERNEL_DTYPES else torch.float32
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = _MSDeformAttnFunction.apply(
        value.to(compute).contiguous(),
        torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2),
        torch.tensor(starts, dtype=torch.int64),
        sampling_locations.to(compute).contiguous(),
        attention_weights.to(compute).contiguous(),
    )  # (B, Q, nh, hd)
    return out.view(b, q, nh * hd).to(dtype)


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention module (paper eq. 3), weights named as the official code and transformers.

    ``sampling_offsets`` and ``attention_weights`` are linear maps of the query to nh·L·P offsets (x, y) and logits;
    ``value_proj``/``output_proj`` project in and out of the heads.
    """

    def __init__(self, dim: int = 256, n_levels: int = 4, num_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.n_levels = n_levels
        self.num_heads = num_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(dim, num_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        # The core's implementation when forward() is not told (``ms_deform_attn``'s ``impl``); export sets it.
        self.impl = "auto"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: at start every head samples a ring of points in its own direction."""
        nn.init.zeros_(self.sampling_offsets.weight)
        # Head k looks along angle 2πk/nh; scaling by the larger of |cos|, |sin| puts the first point on the
        # square ring one cell away, and point i (0-based) on the ring i + 1 cells away, on every level.
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # (nh, 2)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid[:, None, None, :].repeat(1, self.n_levels, self.n_points, 1)  # (nh, L, P, 2)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        # Zero logits: uniform attention over the L·P points until training says otherwise.
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        padding_mask: Tensor | None = None,
        *,
        impl: str | None = None,
    ) -> Tensor:
        """Args:
            query: ``(B, Q, D)``, position embedding already added.
            reference_points: ``(B, Q, L, 2)`` normalised (x, y) per level, or ``(B, Q, L, 4)`` normalised boxes
                (cx, cy, w, h); offsets then scale with the box (section 4.1, iterative box refinement).
            value: ``(B, S, D)``, the L levels flattened row-major and concatenated.
            spatial_shapes: ``(L, 2)`` int64, (h, w) of each level (or a list of (h, w), as under export).
            padding_mask: ``(B, S)`` True on padding, or None.
            impl: core implementation, as in ``ms_deform_attn`` (default: ``self.impl``, "auto").

        Returns:
            ``(B, Q, D)``.
        """
        b, q, _ = query.shape
        s = value.shape[1]
        nh, n_levels, n_points = self.num_heads, self.n_levels, self.n_points
        value = self.value_proj(value)
        if padding_mask is not None:
            # Padded tokens must read as zeros, like the zero padding outside the map.
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, s, nh, self.dim // nh)  # (B, S, nh, hd)
        offsets = self.sampling_offsets(query).view(b, q, nh, n_levels, n_points, 2)  # (B, Q, nh, L, P, 2)
        weights = self.attention_weights(query).view(b, q, nh, n_levels * n_points)
        weights = F.softmax(weights, -1).view(b, q, nh, n_levels, n_points)  # (B, Q, nh, L, P)
        if reference_points.shape[-1] == 2:
            # Offsets are in cells of each level: divide by the level's (w, h) to normalise.
            if isinstance(spatial_shapes, Tensor):
                normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2) as (w, h)
            else:  # symbolic sizes under export: scalar tensors keep them out of the graph's constants
                normalizer = torch.stack(
                    [torch.stack([torch.scalar_tensor(w), torch.scalar_tensor(h)]) for h, w in spatial_shapes]
                ).to(device=offsets.device, dtype=offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # Offsets are relative to the box: P points spread over half its width and height.
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}")
        # locations: (B, Q, nh, L, P, 2)
        out = ms_deform_attn(value, spatial_shapes, locations, weights, impl=impl or self.impl)  # (B, Q, D)
        return self.output_proj(out)


__all__ = [
    "MultiScaleDeformableAttention",
    "kernel_status",
    "ms_deform_attn",
    "ms_deform_attn_gather",
    "ms_deform_attn_reference",
]
