// meshlm's quantised matmul for XLA:CPU, called from JAX as an XLA custom call (model/qkernel.py).
//
//   y[M, N] = x[M, K] @ W[K, N],  W given as codes with a scale (and a minimum) per group of `group` rows
//
// The formats are model/quant.py's: int8 codes [K, N] (int8 per channel: one group of K rows; q8_0: groups
// of 32), or 4-bit codes packed two per byte [K / 2, N] (in each group, byte j holds row j in its low nibble
// and row j + group/2 in its high nibble), with scale [K / group, N] and, for int4 and q4_1, offset [K / group,
// N]. Per group g of rows and each column n:
//
//   y[m, n] += scale[g, n] * sum_k x[m, k] * code[k, n]  +  offset[g, n] * sum_k x[m, k]     (k in group g)
//
// (q4_0 has no offset array: its codes are n - 8, so the second term is -8 * scale[g, n] * sum_k x[m, k].)
// The codes are turned into floats in registers and never written out: the weight is read once, in its
// quantised bytes, which is the point when a decode step is bound by memory bandwidth.
//
// Work is split by column tiles over XLA's intra-op thread pool. Within a tile a few rows of x share each
// loaded weight vector (register blocking). One portable source, written with GCC/Clang vector types, is
// compiled three times: for AVX-512 (64 columns x 4 rows per tile), AVX2 + FMA (16 x 4) and the x86-64 or
// other baseline (16 x 2); the widest the CPU has is picked once at run time. A CPU without AVX2 runs the
// baseline build (SSE2 on x86-64), slower but the same arithmetic.
//
// Requirements, checked by the caller (model/qkernel.py) and again here: float32 x and y, N a multiple of
// 16, K a multiple of the group, an even group for 4-bit codes.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Kind : int64_t { kInt8 = 0, kNibbleOffset = 1, kNibbleMinus8 = 2 };

struct Problem {
  const float* x;
  const void* codes;
  const float* scale;
  const float* offset;  // null for int8, q8_0 and q4_0
  const float* xsum;    // [M, groups] sums of x over each group (4-bit kinds), else null
  float* y;
  int64_t m, k, n, group, kind;
};

#define MESHLM_INLINE inline __attribute__((always_inline))

// Each instruction set is a struct of the few operations the kernel needs on a vector V of kLanes floats.
// (GCC's generic vector conversions from bytes are not vectorised, hence intrinsics here.)
struct Scalar {
  using V = float;
  static constexpr int kLanes = 1;
  static MESHLM_INLINE V load(const float* p) { return *p; }
  static MESHLM_INLINE void store(float* p, V v) { *p = v; }
  static MESHLM_INLINE V broadcast(float x) { return x; }
  static MESHLM_INLINE V bytes(const int8_t* p) { return static_cast<float>(*p); }
  static MESHLM_INLINE void nibbles(const uint8_t* p, V* lo, V* hi) {
    *lo = static_cast<float>(*p & 15);
    *hi = static_cast<float>(*p >> 4);
  }
};

#if defined(__x86_64__) || defined(__i386__)
#define MESHLM_X86 1
#define MESHLM_AVX512 inline __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define MESHLM_AVX2 inline __attribute__((target("avx2,fma")))
struct Avx512 {
  using V = __m512;
  static constexpr int kLanes = 16;
  static MESHLM_AVX512 V load(const float* p) { return _mm512_loadu_ps(p); }
  static MESHLM_AVX512 void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static MESHLM_AVX512 V broadcast(float x) { return _mm512_set1_ps(x); }
  static MESHLM_AVX512 V bytes(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static MESHLM_AVX512 void nibbles(const uint8_t* p, V* lo, V* hi) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), mask = _mm_set1_epi8(15);
    *lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)));
    *hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
  }
};
struct Avx2 {
  using V = __m256;
  static constexpr int kLanes = 8;
  static MESHLM_AVX2 V load(const float* p) { return _mm256_loadu_ps(p); }
  static MESHLM_AVX2 void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static MESHLM_AVX2 V broadcast(float x) { return _mm256_set1_ps(x); }
  static MESHLM_AVX2 V bytes(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static MESHLM_AVX2 void nibbles(const uint8_t* p, V* lo, V* hi) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), mask = _mm_set1_epi8(15);
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(b, mask)));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
  }
};
#endif

// A task: rows k0 .. k1 - 1 of the weight (whole groups for 4-bit codes) times the same rows of x, for
// columns n0 .. n1 - 1, added into `out` ([M, N], y itself or a partial sum that is added to y at the end).
struct Task {
  int64_t k0, k1, n0, n1;
  float* out;
};

constexpr int kRows = 4;            // rows of x that share each converted weight vector
constexpr int64_t kPanel = 512;     // columns per task when M > kRows (compute bound: tasks by columns)
constexpr int64_t kStream = 4096;   // columns per pass when M <= kRows (bandwidth bound: tasks by rows)

// Rows m0 .. m0 + MB - 1 of x against weight rows k0 .. k1 - 1, columns n0 .. n0 + width - 1 (a multiple of 16),
// added into out. The weight is read in blocks of 4 rows (2 rows of bytes for 4-bit codes) left to right: with
// tasks by rows, one task's bytes are one contiguous stretch of memory. The 4 rows' vectors are turned into
// floats once and shared by the MB rows of x; their sums per group go to `t` ([MB][width]), then scaled.
template <class Isa, int MB>
inline void panel(const Problem& p, int64_t m0, int64_t k0, int64_t k1, int64_t n0, int64_t width, float* out,
                  float* t_buffer) {
  using V = typename Isa::V;
  constexpr int L = Isa::kLanes;
  const int64_t k = p.k, n = p.n, g_rows = p.group, groups = p.k / p.group;
  float* t[MB];
  for (int r = 0; r < MB; ++r) t[r] = t_buffer + r * width;
  const float* x = p.x + m0 * k;
  for (int64_t g = k0 / g_rows; g * g_rows < k1; ++g) {
    const int64_t lo = std::max(k0, g * g_rows), hi = std::min(k1, (g + 1) * g_rows);
    for (int r = 0; r < MB; ++r) std::memset(t[r], 0, width * sizeof(float));
    if (p.kind == kInt8) {
      const int8_t* base = static_cast<const int8_t*>(p.codes) + n0;
      int64_t kk = lo;
      for (; kk + 4 <= hi; kk += 4) {
        const int8_t* row = base + kk * n;
        float xs[MB][4];
        for (int r = 0; r < MB; ++r)
          for (int i = 0; i < 4; ++i) xs[r][i] = x[r * k + kk + i];
        for (int64_t c = 0; c < width; c += L) {
          const V w0 = Isa::bytes(row + c), w1 = Isa::bytes(row + n + c);
          const V w2 = Isa::bytes(row + 2 * n + c), w3 = Isa::bytes(row + 3 * n + c);
          for (int r = 0; r < MB; ++r)
            Isa::store(t[r] + c, (Isa::load(t[r] + c) + Isa::broadcast(xs[r][0]) * w0 + Isa::broadcast(xs[r][1]) * w1) +
                                     (Isa::broadcast(xs[r][2]) * w2 + Isa::broadcast(xs[r][3]) * w3));
        }
      }
      for (; kk < hi; ++kk) {  // rows past the last block of 4
        const int8_t* row = base + kk * n;
        for (int64_t c = 0; c < width; c += L) {
          const V w0 = Isa::bytes(row + c);
          for (int r = 0; r < MB; ++r) Isa::store(t[r] + c, Isa::load(t[r] + c) + Isa::broadcast(x[r * k + kk]) * w0);
        }
      }
    } else {  // 4-bit codes: tasks hold whole groups
      const int64_t half = g_rows / 2;
      const uint8_t* base = static_cast<const uint8_t*>(p.codes) + g * half * n + n0;
      const float* xg = x + g * g_rows;
      int64_t j = 0;
      for (; j + 2 <= half; j += 2) {
        const uint8_t* row = base + j * n;
        float xs[MB][4];
        for (int r = 0; r < MB; ++r) {
          const float* xr = xg + r * k;
          xs[r][0] = xr[j], xs[r][1] = xr[j + half], xs[r][2] = xr[j + 1], xs[r][3] = xr[j + 1 + half];
        }
        for (int64_t c = 0; c < width; c += L) {
          V lo0, hi0, lo1, hi1;
          Isa::nibbles(row + c, &lo0, &hi0);
          Isa::nibbles(row + n + c, &lo1, &hi1);
          for (int r = 0; r < MB; ++r)
            Isa::store(t[r] + c, (Isa::load(t[r] + c) + Isa::broadcast(xs[r][0]) * lo0 + Isa::broadcast(xs[r][1]) * hi0) +
                                     (Isa::broadcast(xs[r][2]) * lo1 + Isa::broadcast(xs[r][3]) * hi1));
        }
      }
      for (; j < half; ++j) {  // an odd number of byte rows
        const uint8_t* row = base + j * n;
        for (int64_t c = 0; c < width; c += L) {
          V lo, hi;
          Isa::nibbles(row + c, &lo, &hi);
          for (int r = 0; r < MB; ++r)
            Isa::store(t[r] + c, Isa::load(t[r] + c) + Isa::broadcast(xg[r * k + j]) * lo +
                                     Isa::broadcast(xg[r * k + j + half]) * hi);
        }
      }
    }
    for (int64_t c = 0; c < width; c += L) {  // out += scale * t (+ the offset's share)
      const V s = Isa::load(p.scale + g * n + n0 + c);
      const V o = p.offset ? Isa::load(p.offset + g * n + n0 + c) : Isa::broadcast(0.0f);
      for (int r = 0; r < MB; ++r) {
        float* o_r = out + (m0 + r) * n + n0 + c;
        V acc = Isa::load(o_r) + s * Isa::load(t[r] + c);
        if (p.kind == kNibbleOffset) acc += o * Isa::broadcast(p.xsum[(m0 + r) * groups + g]);
        if (p.kind == kNibbleMinus8) acc -= Isa::broadcast(8.0f * p.xsum[(m0 + r) * groups + g]) * s;
        Isa::store(o_r, acc);
      }
    }
  }
}

template <class Isa>
inline void run_task(const Problem& p, const Task& task) {
  static thread_local std::vector<float> t_buffer;
  const int64_t wide = p.m > kRows ? kPanel : kStream;
  t_buffer.resize(kRows * std::min(wide, p.n));
  for (int64_t n0 = task.n0; n0 < task.n1; n0 += wide) {
    const int64_t width = std::min(wide, task.n1 - n0);
    int64_t m0 = 0;
    for (; m0 + kRows <= p.m; m0 += kRows) panel<Isa, kRows>(p, m0, task.k0, task.k1, n0, width, task.out, t_buffer.data());
    switch (p.m - m0) {
      case 3: panel<Isa, 3>(p, m0, task.k0, task.k1, n0, width, task.out, t_buffer.data()); break;
      case 2: panel<Isa, 2>(p, m0, task.k0, task.k1, n0, width, task.out, t_buffer.data()); break;
      case 1: panel<Isa, 1>(p, m0, task.k0, task.k1, n0, width, task.out, t_buffer.data()); break;
      default: break;
    }
  }
}

#ifdef MESHLM_X86
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"), flatten))
void task_avx512(const Problem& p, const Task& task) { run_task<Avx512>(p, task); }

__attribute__((target("avx2,fma"), flatten))
void task_avx2(const Problem& p, const Task& task) { run_task<Avx2>(p, task); }
#endif

void task_baseline(const Problem& p, const Task& task) { run_task<Scalar>(p, task); }

struct Build {
  void (*run)(const Problem&, const Task&);
  const char* name;
};

Build pick_build() {
#ifdef MESHLM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return {task_avx512, "avx512"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {task_avx2, "avx2"};
#endif
  return {task_baseline, "baseline"};
}

const Build& build() {
  static const Build chosen = pick_build();
  return chosen;
}

// Tasks are handed out one at a time from a shared counter to the calling thread and to tasks scheduled on
// XLA's intra-op pool. The caller waits until every task is done (not until every scheduled function has run:
// one that starts late finds nothing left and only touches `Shared`, which it co-owns).
struct Shared {
  Problem problem;
  std::vector<Task> tasks;
  std::vector<float> partial;  // [splits - 1, M, N] when tasks split K
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void work(Shared* s) {
  const Build& b = build();
  const int64_t total = static_cast<int64_t>(s->tasks.size());
  for (int64_t i; (i = s->next.fetch_add(1, std::memory_order_relaxed)) < total;) {
    b.run(s->problem, s->tasks[i]);
    s->done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error qmatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes,
                   ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::F32> y,
                   int64_t group, int64_t kind) {
  const auto xd = x.dimensions(), cd = codes.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("meshlm_qmatmul: x, codes, scale and y must be matrices");
  const int64_t m = xd[0], k = xd[1], n = yd[1];
  const bool nibbles = kind == kNibbleOffset || kind == kNibbleMinus8;
  if (kind < kInt8 || kind > kNibbleMinus8) return ffi::Error::InvalidArgument("meshlm_qmatmul: unknown kind");
  if (group <= 0 || k % group || (nibbles && group % 2) || n % 16 || yd[0] != m)
    return ffi::Error::InvalidArgument("meshlm_qmatmul: K must divide into groups (even for 4 bits), N by 16");
  const auto want = nibbles ? ffi::DataType::U8 : ffi::DataType::S8;
  if (codes.element_type() != want || cd[0] != (nibbles ? k / 2 : k) || cd[1] != n || sd[0] != k / group ||
      sd[1] != n)
    return ffi::Error::InvalidArgument("meshlm_qmatmul: codes or scale do not match x and y");
  const bool with_offset = kind == kNibbleOffset;
  if (with_offset && offset.element_count() != static_cast<size_t>(sd[0] * n))
    return ffi::Error::InvalidArgument("meshlm_qmatmul: offset does not match scale");

  const int64_t groups = k / group;
  std::vector<float> xsum;
  if (nibbles) {
    xsum.assign(m * groups, 0.0f);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const float* xr = x.typed_data() + r * k + g * group;
        float s = 0;
        for (int64_t j = 0; j < group; ++j) s += xr[j];
        xsum[r * groups + g] = s;
      }
  }
  auto shared = std::make_shared<Shared>();
  float* out = y->typed_data();
  std::memset(out, 0, m * n * sizeof(float));
  shared->problem = Problem{x.typed_data(), codes.untyped_data(), scale.typed_data(),
                            with_offset ? offset.typed_data() : nullptr, nibbles ? xsum.data() : nullptr,
                            out, m, k, n, group, kind};
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t splits = 1;
  if (m <= kRows) {  // bandwidth bound: each task streams a contiguous stretch of rows, all columns
    const int64_t units = nibbles ? groups : k / 4, per = nibbles ? group : 4;
    splits = std::min(threads, units);
    if (splits > 1) shared->partial.assign((splits - 1) * m * n, 0.0f);
    for (int64_t i = 0; i < splits; ++i) {
      const int64_t k0 = units * i / splits * per, k1 = i + 1 == splits ? k : units * (i + 1) / splits * per;
      shared->tasks.push_back({k0, k1, 0, n, i == 0 ? out : shared->partial.data() + (i - 1) * m * n});
    }
  } else {  // compute bound: tasks by panels of columns, all rows
    for (int64_t n0 = 0; n0 < n; n0 += kPanel) shared->tasks.push_back({0, k, n0, std::min(n, n0 + kPanel), out});
  }
  const int64_t total = static_cast<int64_t>(shared->tasks.size());
  const int64_t helpers = std::min(threads, total - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([shared] { work(shared.get()); });
  work(shared.get());
  while (shared->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
  for (int64_t i = 1; i < splits; ++i) {  // the other splits' partial sums
    const float* part = shared->partial.data() + (i - 1) * m * n;
    for (int64_t j = 0; j < m * n; ++j) out[j] += part[j];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshlmQMatmul, qmatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("kind"));

extern "C" __attribute__((visibility("default"))) const char* MeshlmQMatmulBuild() { return build().name; }
