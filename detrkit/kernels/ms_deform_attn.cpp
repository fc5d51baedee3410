// Multi-scale deformable attention core on the CPU (forward and backward), called through ctypes.
//
// Built by detrkit/kernels/__init__.py on first use (plain `c++ -O3 -march=native -Wall -Wextra`, no torch
// headers) and called from detrkit/models/deformable_attention.py, which also holds the grid_sample reference this
// kernel must match. `struct Problem` is mirrored there as a ctypes.Structure: msda_problem_layout() reports this
// side's layout so that a mismatch is refused before any pointer is read.
//
// Check by hand: c++ -O3 -march=native -std=c++17 -shared -fPIC -pthread -Wall -Wextra ms_deform_attn.cpp -o /tmp/k.so
#include <cmath>
#include <cstddef>
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

// sizeof(Problem), then the offset of each field in declaration order, into out[0 .. n); returns how many values
// there are (18), so that the caller can also tell a field added or removed on one side only.
int64_t msda_problem_layout(int64_t* out, int64_t n) {
  const int64_t layout[] = {
      int64_t(sizeof(Problem)),
      int64_t(offsetof(Problem, value)),
      int64_t(offsetof(Problem, shapes)),
      int64_t(offsetof(Problem, starts)),
      int64_t(offsetof(Problem, loc)),
      int64_t(offsetof(Problem, attn)),
      int64_t(offsetof(Problem, grad_out)),
      int64_t(offsetof(Problem, out)),
      int64_t(offsetof(Problem, grad_value)),
      int64_t(offsetof(Problem, grad_loc)),
      int64_t(offsetof(Problem, grad_attn)),
      int64_t(offsetof(Problem, B)),
      int64_t(offsetof(Problem, S)),
      int64_t(offsetof(Problem, Q)),
      int64_t(offsetof(Problem, nh)),
      int64_t(offsetof(Problem, hd)),
      int64_t(offsetof(Problem, L)),
      int64_t(offsetof(Problem, P)),
  };
  constexpr int64_t count = sizeof(layout) / sizeof(layout[0]);
  for (int64_t i = 0; i < n && i < count; ++i) out[i] = layout[i];
  return count;
}

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
