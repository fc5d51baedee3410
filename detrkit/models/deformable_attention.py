"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, section 4.1, eq. 3).

Every query attends to ``P`` sampled points on each of ``L`` feature levels per head, at locations predicted from
the query around a reference point; the sampled values (bilinear, zero padding) are averaged with softmax weights
also predicted from the query.

Legend: B batch, Q queries, S = Σ h_l·w_l value tokens over the L levels, D width, nh heads, hd = D / nh head
width, L levels, P sampling points per level and head.

``ms_deform_attn_reference`` is the plain PyTorch version (one ``grid_sample`` per level, exportable to ONNX);
``ms_deform_attn`` dispatches to a faster formulation when it is applicable and to the reference otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMPLS = ("auto", "reference", "fast")

logger = logging.getLogger(__name__)


def _level_shapes(spatial_shapes: Tensor) -> list[tuple[int, int]]:
    # The only host read of tensor values: the level sizes fix every shape below. Under tracing they become
    # constants of the graph, as in the official export path.
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
    ONNX export or ``torch.compile``) and the reference otherwise. The fast path has no double backward.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference" or (impl == "auto" and not _fast_applicable(value)):
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
    if value.device.type != "cpu" or _kernel() is None:
        raise RuntimeError("the fast multi-scale deformable attention needs CPU tensors and a C++ compiler")
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
# do not depend on the thread count. Building with plain ``c++`` takes ~3 s, not the minute of a
# torch.utils.cpp_extension build, and the library is cached per source, flags and CPU.

_KERNEL_SOURCE = r"""

// Multi-scale deformable attention core on the CPU (forward and backward), called through ctypes.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <pthread.h>

namespace {

struct Problem {
  const void* value;       // (B, S, nh, hd)
  const int64_t* shapes;   // (L, 2) as (h, w)
  const int64_t* starts;   // (L,) first token of each level
  const void* loc;         // (B, Q, nh, L, P, 2) normalised (x, y)
  const void* attn;        // (B, Q, nh, L, P)
  const void* grad_out;    // (B, Q, nh, hd) or null
  void* out;               // (B, Q, nh, hd) or null
  void* grad_value;        // (B, S, nh, hd) zero-filled, or null
  void* grad_loc;          // (B, Q, nh, L, P, 2) zero-filled, or null
  void* grad_attn;         // (B, Q, nh, L, P) zero-filled, or null
  int64_t B, S, Q, nh, hd, L, P;
};

// Hot loops run on GCC/Clang vector extensions (32-byte vectors: AVX where the CPU has it, pairs of 16-byte
// registers otherwise): dot products are reductions, which compilers do not vectorise without -ffast-math.
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
template <typename T> struct Vec;
template <> struct Vec<float> { using type = f32x8; static constexpr int lanes = 8; };
template <> struct Vec<double> { using type = f64x4; static constexpr int lanes = 4; };

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Normalised coordinate -> pixel coordinate (cell centres at integers), rounded step by step as the reference
// does: 2·loc − 1 in PyTorch, then grid_sample's unnormalisation (grid + 1)·size/2 − 0.5, which PyTorch's
// vectorised CPU kernel evaluates as one fused multiply-add (found by probing the x86-64 wheels). Bilinear
// interpolation is continuous but its gradient jumps at integer pixel coordinates, so any other rounding picks
// other corners for points within an ulp of a cell border (thousands of them in a float32 encoder, and every
// point at initialisation, where offsets are whole cells) and their location gradients then differ by O(1).
template <typename T>
inline T to_pixel(T loc, int64_t size) {
  const T grid = T(2) * loc - T(1);
  return std::fma(grid + T(1), T(size) / T(2), T(-0.5));
}

// The corners of one sampling point that lie on the map: row offsets (elements from the (b, head) origin of value),
// bilinear weights, their derivatives in pixel x and y, and the point they belong to. Points are processed in
// chunks of kChunk so that this list lives on the stack whatever L·P is.
constexpr int64_t kChunk = 32;

template <typename T>
struct Taps {
  int64_t off[4 * kChunk];
  T w[4 * kChunk], dwx[4 * kChunk], dwy[4 * kChunk];
  int32_t point[4 * kChunk];
  int n = 0;

  // Appends the on-map corners of the point at pixel (x, y) of a level of size h×w whose first row is at `start`.
  // A point with no corner on the map adds nothing. x = −1 exactly still counts (unlike the official CUDA
  // kernel's test): its corner 0 has weight 0 but a nonzero gradient, as in grid_sample.
  inline void add(T x, T y, int64_t h, int64_t w, int64_t start, int64_t row_stride, int32_t p) {
    if (!(x >= T(-1) && y >= T(-1) && x < T(w) && y < T(h))) return;  // also false on NaN
    const T x0f = std::floor(x), y0f = std::floor(y);
    const int64_t x0 = int64_t(x0f), y0 = int64_t(y0f);
    const T fx = x - x0f, fy = y - y0f;
    const int64_t off00 = (start + y0 * w + x0) * row_stride;
    const bool in_x0 = x0 >= 0, in_x1 = x0 + 1 < w, in_y0 = y0 >= 0, in_y1 = y0 + 1 < h;
    if (in_y0 && in_x0) push(off00, (1 - fx) * (1 - fy), -(1 - fy), -(1 - fx), p);
    if (in_y0 && in_x1) push(off00 + row_stride, fx * (1 - fy), 1 - fy, -fx, p);
    if (in_y1 && in_x0) push(off00 + w * row_stride, (1 - fx) * fy, -fy, 1 - fx, p);
    if (in_y1 && in_x1) push(off00 + (w + 1) * row_stride, fx * fy, fy, fx, p);
  }

  inline void push(int64_t o, T wt, T dx, T dy, int32_t p) {
    off[n] = o;
    w[n] = wt;
    dwx[n] = dx;
    dwy[n] = dy;
    point[n] = p;
    ++n;
  }
};

// Sampling points [lp0, lp1) (level-major, as in attention_weights) of one (b, q, head) item into taps.
template <typename T>
inline void gather_taps(const Problem& pr, const T* loc_i, int64_t lp0, int64_t lp1, int64_t row_stride,
                        Taps<T>& taps) {
  taps.n = 0;
  for (int64_t l = lp0 / pr.P; l * pr.P < lp1; ++l) {
    const int64_t h = pr.shapes[2 * l], w = pr.shapes[2 * l + 1], start = pr.starts[l];
    const int64_t p0 = l * pr.P > lp0 ? l * pr.P : lp0, p1 = (l + 1) * pr.P < lp1 ? (l + 1) * pr.P : lp1;
    for (int64_t lp = p0; lp < p1; ++lp)
      taps.add(to_pixel(loc_i[2 * lp], w), to_pixel(loc_i[2 * lp + 1], h), h, w, start, row_stride,
               int32_t(lp - lp0));
  }
}

// HD > 0: head width known at compile time and a multiple of the vector width; HD == 0: any width, scalar loops.
template <typename T, int HD>
void forward_items(const Problem& pr, int64_t begin, int64_t end) {
  using V = typename Vec<T>::type;
  constexpr int lanes = Vec<T>::lanes, NV = HD / lanes;
  const T* value = static_cast<const T*>(pr.value);
  const T* loc = static_cast<const T*>(pr.loc);
  const T* attn = static_cast<const T*>(pr.attn);
  T* out = static_cast<T*>(pr.out);
  const int64_t hd = HD > 0 ? HD : pr.hd, nh = pr.nh, LP = pr.L * pr.P, Q = pr.Q, S = pr.S;
  const int64_t row_stride = nh * hd;
  Taps<T> taps;
  for (int64_t item = begin; item < end; ++item) {  // item = (b·Q + q)·nh + head
    const int64_t head = item % nh, b = item / (Q * nh);
    const T* origin = value + (b * S * nh + head) * hd;
    const T* loc_i = loc + item * LP * 2;
    const T* attn_i = attn + item * LP;
    T* out_i = out + item * hd;
    V acc[NV > 0 ? NV : 1] = {};
    if (HD == 0)
      for (int64_t c = 0; c < hd; ++c) out_i[c] = T(0);
    for (int64_t lp0 = 0; lp0 < LP; lp0 += kChunk) {
      const int64_t lp1 = lp0 + kChunk < LP ? lp0 + kChunk : LP;
      gather_taps(pr, loc_i, lp0, lp1, row_stride, taps);
      for (int j = 0; j < taps.n; ++j) {
        const T* row = origin + taps.off[j];
        const T wt = attn_i[lp0 + taps.point[j]] * taps.w[j];
        if (HD > 0) {
          for (int v = 0; v < NV; ++v) acc[v] += wt * load<V>(row + v * lanes);
        } else {
          for (int64_t c = 0; c < hd; ++c) out_i[c] += wt * row[c];
        }
      }
    }
    if (HD > 0)
      for (int v = 0; v < NV; ++v) store(out_i + v * lanes, acc[v]);
  }
}

// Units are (b, head) pairs: every write to grad_value of one unit lands in that unit's rows, so units run in
// parallel without atomics or per-thread copies, and the result does not depend on the thread count.
template <typename T, int HD>
void backward_units(const Problem& pr, int64_t begin, int64_t end) {
  using V = typename Vec<T>::type;
  constexpr int lanes = Vec<T>::lanes, NV = HD / lanes;
  const T* value = static_cast<const T*>(pr.value);
  const T* loc = static_cast<const T*>(pr.loc);
  const T* attn = static_cast<const T*>(pr.attn);
  const T* grad_out = static_cast<const T*>(pr.grad_out);
  T* grad_value = static_cast<T*>(pr.grad_value);
  T* grad_loc = static_cast<T*>(pr.grad_loc);
  T* grad_attn = static_cast<T*>(pr.grad_attn);
  const int64_t hd = HD > 0 ? HD : pr.hd, nh = pr.nh, LP = pr.L * pr.P, Q = pr.Q, S = pr.S;
  const int64_t row_stride = nh * hd;
  Taps<T> taps;
  T g_attn[kChunk], g_x[kChunk], g_y[kChunk];  // per point of the chunk: d loss / d (weight, pixel x, pixel y)
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / nh, head = unit % nh;
    const T* origin = value + (b * S * nh + head) * hd;
    T* g_origin = grad_value ? grad_value + (b * S * nh + head) * hd : nullptr;
    for (int64_t q = 0; q < Q; ++q) {
      const int64_t item = (b * Q + q) * nh + head;
      const T* go = grad_out + item * hd;
      const T* loc_i = loc + item * LP * 2;
      const T* attn_i = attn + item * LP;
      V go_v[NV > 0 ? NV : 1];
      for (int v = 0; v < NV; ++v) go_v[v] = load<V>(go + v * lanes);
      for (int64_t lp0 = 0; lp0 < LP; lp0 += kChunk) {
        const int64_t lp1 = lp0 + kChunk < LP ? lp0 + kChunk : LP;
        gather_taps(pr, loc_i, lp0, lp1, row_stride, taps);
        for (int64_t k = 0; k < lp1 - lp0; ++k) g_attn[k] = g_x[k] = g_y[k] = T(0);
        for (int j = 0; j < taps.n; ++j) {
          const T* row = origin + taps.off[j];
          const T a = attn_i[lp0 + taps.point[j]];
          T d;  // go · row
          if (HD > 0) {
            V s = go_v[0] * load<V>(row);
            for (int v = 1; v < NV; ++v) s += go_v[v] * load<V>(row + v * lanes);
            d = T(0);
            for (int i = 0; i < lanes; ++i) d += s[i];
            if (g_origin) {
              T* grow = g_origin + taps.off[j];
              const T wt = a * taps.w[j];
              for (int v = 0; v < NV; ++v) store(grow + v * lanes, load<V>(grow + v * lanes) + wt * go_v[v]);
            }
          } else {
            d = T(0);
            for (int64_t c = 0; c < hd; ++c) d += go[c] * row[c];
            if (g_origin) {
              T* grow = g_origin + taps.off[j];
              const T wt = a * taps.w[j];
              for (int64_t c = 0; c < hd; ++c) grow[c] += wt * go[c];
            }
          }
          const int p = taps.point[j];
          g_attn[p] += taps.w[j] * d;
          g_x[p] += taps.dwx[j] * d;
          g_y[p] += taps.dwy[j] * d;
        }
        for (int64_t lp = lp0; lp < lp1; ++lp) {
          const int64_t l = lp / pr.P, k = lp - lp0;
          if (grad_attn) grad_attn[item * LP + lp] = g_attn[k];
          if (grad_loc) {
            // pixel x = (2·loc_x − 1 + 1)·w/2 − 0.5, so d/d loc_x = w · d/dx.
            const T a = attn_i[lp];
            grad_loc[(item * LP + lp) * 2] = a * g_x[k] * T(pr.shapes[2 * l + 1]);
            grad_loc[(item * LP + lp) * 2 + 1] = a * g_y[k] * T(pr.shapes[2 * l]);
          }
        }
      }
    }
  }
}

using RangeFn = void (*)(const Problem&, int64_t, int64_t);

struct Task {
  RangeFn fn;
  const Problem* pr;
  int64_t begin, end;
};

void* run_task(void* arg) {
  const Task* t = static_cast<const Task*>(arg);
  t->fn(*t->pr, t->begin, t->end);
  return nullptr;
}

// Splits [0, n) into contiguous chunks over n_threads threads (the caller's thread runs the first). Threads are
// started per call: microseconds against milliseconds of work, and nothing spins between calls.
void parallel(RangeFn fn, const Problem& pr, int64_t n, int64_t n_threads) {
  constexpr int64_t kMaxThreads = 256;
  if (n_threads > n) n_threads = n;
  if (n_threads > kMaxThreads) n_threads = kMaxThreads;
  if (n_threads <= 1) {
    fn(pr, 0, n);
    return;
  }
  Task tasks[kMaxThreads];
  pthread_t threads[kMaxThreads];
  bool started[kMaxThreads] = {};
  for (int64_t i = 0; i < n_threads; ++i) tasks[i] = Task{fn, &pr, n * i / n_threads, n * (i + 1) / n_threads};
  for (int64_t i = 1; i < n_threads; ++i)
    started[i] = pthread_create(&threads[i], nullptr, run_task, &tasks[i]) == 0;
  run_task(&tasks[0]);
  for (int64_t i = 1; i < n_threads; ++i) {
    if (started[i])
      pthread_join(threads[i], nullptr);
    else
      run_task(&tasks[i]);  // could not start a thread: do its share here
  }
}

template <typename T>
RangeFn pick_forward(int64_t hd) {
  switch (hd) {
    case 16: return forward_items<T, 16>;
    case 32: return forward_items<T, 32>;
    case 64: return forward_items<T, 64>;
    default: return forward_items<T, 0>;
  }
}

template <typename T>
RangeFn pick_backward(int64_t hd) {
  switch (hd) {
    case 16: return backward_units<T, 16>;
    case 32: return backward_units<T, 32>;
    case 64: return backward_units<T, 64>;
    default: return backward_units<T, 0>;
  }
}

}  // namespace

extern "C" {

int msda_abi_version() { return 1; }

// dtype: 0 float32, 1 float64.
int msda_forward(const Problem* pr, int dtype, int64_t n_threads) {
  RangeFn fn = dtype == 0 ? pick_forward<float>(pr->hd) : dtype == 1 ? pick_forward<double>(pr->hd) : nullptr;
  if (!fn) return 1;
  parallel(fn, *pr, pr->B * pr->Q * pr->nh, n_threads);
  return 0;
}

int msda_backward(const Problem* pr, int dtype, int64_t n_threads) {
  RangeFn fn = dtype == 0 ? pick_backward<float>(pr->hd) : dtype == 1 ? pick_backward<double>(pr->hd) : nullptr;
  if (!fn) return 1;
  parallel(fn, *pr, pr->B * pr->nh, n_threads);
  return 0;
}

}  // extern "C"
"""

_KERNEL_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")
_KERNEL_FLAGS_PORTABLE = tuple(f for f in _KERNEL_FLAGS if f != "-march=native")  # for compilers without it
_KERNEL_ABI = 1


class _Problem(ctypes.Structure):
    # Mirrors ``struct Problem`` in _KERNEL_SOURCE, field for field.
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("value", "shapes", "starts", "loc", "attn", "grad_out", "out")),
        *((name, ctypes.c_void_p) for name in ("grad_value", "grad_loc", "grad_attn")),
        *((name, ctypes.c_int64) for name in ("B", "S", "Q", "nh", "hd", "L", "P")),
    ]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "detrkit" / "kernels"


def _cpu_id() -> str:
    # -march=native binaries are only valid on the CPU they were built for: key the cache on its feature flags.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile_kernel(cache_dir: Path, compiler: str | None) -> ctypes.CDLL | None:
    """Builds (or finds in ``cache_dir``) and loads the kernel library; None when that is not possible."""
    if compiler is None:
        return None
    key = "\n".join([_KERNEL_SOURCE, compiler, *_KERNEL_FLAGS, platform.machine(), _cpu_id()])
    lib_path = cache_dir / f"ms_deform_attn_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    try:
        if not lib_path.exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
                src = Path(tmp) / "ms_deform_attn.cpp"
                src.write_text(_KERNEL_SOURCE, encoding="utf-8")
                tmp_lib = Path(tmp) / "lib.so"
                for flags in (_KERNEL_FLAGS, _KERNEL_FLAGS_PORTABLE):
                    cmd = [compiler, *flags, str(src), "-o", str(tmp_lib)]
                    if subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0:
                        break
                else:
                    raise OSError(f"{compiler} could not build the kernel")
                # Atomic: a concurrent process sees the finished library or none.
                os.replace(tmp_lib, lib_path)
        lib = ctypes.CDLL(str(lib_path))
        if lib.msda_abi_version() != _KERNEL_ABI:
            return None
    except (OSError, subprocess.SubprocessError) as e:
        logger.debug("deformable attention kernel unavailable (%s); using the reference", e)
        return None
    for name in ("msda_forward", "msda_backward"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(_Problem), ctypes.c_int, ctypes.c_int64]
        fn.restype = ctypes.c_int
    return lib


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    """The kernel library, built once per process on first use (and once per machine thanks to the cache)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    return _compile_kernel(_cache_dir(), compiler)


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

    def __init__(self, dim: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if dim % n_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        self.dim = dim
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(dim, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's initialisation: at start every head samples a ring of points in its own direction."""
        nn.init.zeros_(self.sampling_offsets.weight)
        # Head k looks along angle 2πk/nh; scaling by the larger of |cos|, |sin| puts the first point on the
        # square ring one cell away, and point i (0-based) on the ring i + 1 cells away, on every level.
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
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
        impl: str = "auto",
    ) -> Tensor:
        """Args:
            query: ``(B, Q, D)``, position embedding already added.
            reference_points: ``(B, Q, L, 2)`` normalised (x, y) per level, or ``(B, Q, L, 4)`` normalised boxes
                (cx, cy, w, h); offsets then scale with the box (section 4.1, iterative box refinement).
            value: ``(B, S, D)``, the L levels flattened row-major and concatenated.
            spatial_shapes: ``(L, 2)`` int64, (h, w) of each level.
            padding_mask: ``(B, S)`` True on padding, or None.
            impl: core implementation, as in ``ms_deform_attn``.

        Returns:
            ``(B, Q, D)``.
        """
        b, q, _ = query.shape
        s = value.shape[1]
        nh, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
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
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2) as (w, h)
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
        out = ms_deform_attn(value, spatial_shapes, locations, weights, impl=impl)  # (B, Q, D)
        return self.output_proj(out)


__all__ = ["MultiScaleDeformableAttention", "ms_deform_attn", "ms_deform_attn_reference"]
