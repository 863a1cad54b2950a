// meshlm's decode attention over a KV cache for XLA:CPU, called from JAX as an XLA custom call
// (model/attention_kernel.py). It computes what model/transformer.py's `cached_attention` computes:
//
//   out[b, t, h] = sum_s p[s] v[b, kv, s],  p = softmax_s(scale * q[b, t, h] . k[b, kv, s]),  kv = h / group
//
// over the keys s <= positions[b, t] and s < visible: each query sees its own position and those before it.
// Why a kernel: XLA:CPU runs the two small batched dots of a decode step's attention (3 query heads against
// a [cache_length, 64] matrix per row and kv head) at 3-10 GB/s and the softmax between them as separate
// passes, and it cannot stop at each row's length, so a step reads every slot of the cache, filled or not
// (docs/BENCHMARKS.md). This kernel reads each row's keys and values once, only as far as the row's longest
// query sees, and keeps the scores in cache between the two passes.
//
// Caches: float32 [batch, kv_heads, cache_length, head_dim], or int8 values of that shape with a float32
// scale per (row, kv head, position) (model/cache.py's Int8KV): the key scale multiplies the scores and the
// value scale the probabilities, as in the reference. One task per (row, kv head) on XLA's intra-op thread
// pool; within a task, every query of the kv head's group (and of each new position) shares each loaded key
// and value row.
//
// One portable source on 16-float GCC vector types, compiled for AVX-512, AVX2 + FMA and the baseline; the
// widest the CPU has is picked at run time (MESHLM_QKERNEL_ISA=avx2|baseline caps it, as for the matmul
// kernel). Requirements, checked by the caller and again here: head_dim a multiple of 16, heads a multiple of
// kv_heads. A query that sees no key (a position below 0) gets zeros.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define MESHLM_X86 1
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "workers.h"

namespace ffi = xla::ffi;

namespace {

#define MESHLM_INLINE inline __attribute__((always_inline))

struct Problem {
  const float* q;    // [batch, length, heads, dim]
  const void* k;     // [batch, kv_heads, cache, dim], float32 or int8
  const void* v;
  const float* ks;   // [batch, kv_heads, cache] for int8, else null
  const float* vs;
  const int32_t* positions;  // [batch, length]
  float* out;        // [batch, length, heads, dim]
  int64_t batch, length, heads, kv_heads, cache, dim, visible;
  float scale;
  bool int8;
};

// Vectors of W floats (GCC vector types: +, * and comparisons work lane by lane) and the one operation that
// differs per width: `sums`, the lane sums of W vectors at once as one vector. Each of its levels pairs two
// vectors and adds the two halves of every block of lanes, so W vectors take W - 1 shuffles-and-adds in all
// rather than a full reduction each. AVX2 has no two-source shuffle across its 128-bit halves, so its width
// uses `vhaddps` instead.
template <int W>
struct Simd;

template <>
struct Simd<16> {  // AVX-512
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  static MESHLM_INLINE V pair(V x, V y, I first, I second) {
    return __builtin_shuffle(x, y, first) + __builtin_shuffle(x, y, second);
  }
  static MESHLM_INLINE V sums(const V* part) {
    const I a16 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const I b16 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const I a8 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const I b8 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const I a4 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const I b4 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const I a2 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const I b2 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    V l1[8], l2[4], l3[2];
    for (int j = 0; j < 8; ++j) l1[j] = pair(part[2 * j], part[2 * j + 1], a16, b16);
    for (int j = 0; j < 4; ++j) l2[j] = pair(l1[2 * j], l1[2 * j + 1], a8, b8);
    for (int j = 0; j < 2; ++j) l3[j] = pair(l2[2 * j], l2[2 * j + 1], a4, b4);
    return pair(l3[0], l3[1], a2, b2);
  }
};

#if defined(__x86_64__) || defined(__i386__)
template <>
struct Simd<8> {  // AVX2
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  static inline __attribute__((target("avx2,fma"))) V sums(const V* part) {
    const __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(part[0], part[1]), _mm256_hadd_ps(part[2], part[3]));
    const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(part[4], part[5]), _mm256_hadd_ps(part[6], part[7]));
    // g0: vectors 0-3's sums over their low 128 bits, then over their high 128 bits; g1 the same for 4-7
    return _mm256_permute2f128_ps(g0, g1, 0x20) + _mm256_permute2f128_ps(g0, g1, 0x31);
  }
};
#endif

template <>
struct Simd<4> {  // SSE2, NEON and the rest
  typedef float V __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  static MESHLM_INLINE V pair(V x, V y, I first, I second) {
    return __builtin_shuffle(x, y, first) + __builtin_shuffle(x, y, second);
  }
  static MESHLM_INLINE V sums(const V* part) {
    const I a4 = {0, 1, 4, 5}, b4 = {2, 3, 6, 7}, a2 = {0, 2, 4, 6}, b2 = {1, 3, 5, 7};
    return pair(pair(part[0], part[1], a4, b4), pair(part[2], part[3], a4, b4), a2, b2);
  }
};

template <int W>
struct Ops {
  using V = typename Simd<W>::V;
  using I = typename Simd<W>::I;
  static MESHLM_INLINE V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static MESHLM_INLINE void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  static MESHLM_INLINE V splat(float x) { return V{} + x; }
  static MESHLM_INLINE float sum(V v) {
    float a[W];
    std::memcpy(a, &v, sizeof(v));
    for (int w = W / 2; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) a[i] += a[i + w];
    return a[0];
  }
  // exp(x) for x <= 0: 2^n * e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by Cephes' degree-6
  // polynomial (relative error about 1e-7). x is clamped at -87 so that 2^n stays a normal float: e^-87 is
  // 1.6e-38, nothing next to the 1 that the largest score contributes.
  static MESHLM_INLINE V exp_nonpositive(V x) {
    x = x < -87.0f ? splat(-87.0f) : x;
    const V magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const V n = (x * 1.44269504088896341f + magic) - magic;
    const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    V p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const I bits = (__builtin_convertvector(n, I) + 127) << 23;
    V two_n;
    std::memcpy(&two_n, &bits, sizeof(two_n));
    return p * two_n;
  }
};

struct Scratch {
  std::vector<int64_t> seen;
  std::vector<float> scores, keys, row, zeros, sums;
};

// One position's key or value row as floats: the cache's own row, or an int8 row converted into `buffer`.
MESHLM_INLINE const float* row_at(const Problem& p, const void* cache, int64_t index, float* buffer) {
  if (!p.int8) return static_cast<const float*>(cache) + index * p.dim;
  const int8_t* codes = static_cast<const int8_t*>(cache) + index * p.dim;
  for (int64_t d = 0; d < p.dim; ++d) buffer[d] = static_cast<float>(codes[d]);
  return buffer;
}

// One (row, kv head): every query of the group at every new position, over the keys each sees. Vecs: head_dim
// / W when it is one of the unrolled sizes, else 0 (a loop).
template <int W, int Vecs>
MESHLM_INLINE void attend(const Problem& p, int64_t task) {
  using O = Ops<W>;
  using V = typename O::V;
  const int64_t b = task / p.kv_heads, h = task % p.kv_heads;
  const int64_t group = p.heads / p.kv_heads, queries = p.length * group, dim = p.dim;
  const int64_t vecs = Vecs ? Vecs : dim / W;
  static thread_local Scratch m;
  m.seen.resize(p.length);
  int64_t most = 0;
  for (int64_t t = 0; t < p.length; ++t) {
    m.seen[t] = std::clamp<int64_t>(static_cast<int64_t>(p.positions[b * p.length + t]) + 1, 0, p.visible);
    most = std::max(most, m.seen[t]);
  }
  const int64_t stride = (most + W - 1) / W * W;
  m.scores.resize(std::max<int64_t>(1, queries * stride));
  m.keys.resize(W * dim);
  m.row.resize(dim);
  m.zeros.assign(dim, 0.0f);
  m.sums.resize(queries * dim);
  const int64_t base = (b * p.kv_heads + h) * p.cache;  // this (row, kv head)'s position 0
  // query i = (t, g): head h * group + g of position t; its vector in q and in out starts `at(i)` floats in
  auto at = [&](int64_t i) { return ((b * p.length + i / group) * p.heads + h * group + i % group) * dim; };

  for (int64_t s0 = 0; s0 < most; s0 += W) {  // scores, W keys at a time against every query
    const float* keys[W];
    float factor[W];
    for (int64_t j = 0; j < W; ++j) {
      const int64_t s = s0 + j;
      keys[j] = s < most ? row_at(p, p.k, base + s, m.keys.data() + j * dim) : m.zeros.data();
      factor[j] = s < most && p.int8 ? p.ks[base + s] * p.scale : p.scale;
    }
    const V factors = O::load(factor);
    for (int64_t i = 0; i < queries; ++i) {
      const float* q = p.q + at(i);
      V part[W];
      for (int j = 0; j < W; ++j) {
        V a = O::load(q) * O::load(keys[j]);
        for (int64_t c = 1; c < vecs; ++c) a += O::load(q + c * W) * O::load(keys[j] + c * W);
        part[j] = a;
      }
      O::store(m.scores.data() + i * stride + s0, Simd<W>::sums(part) * factors);
    }
  }
  for (int64_t i = 0; i < queries; ++i) {  // softmax over the keys query i sees; zeros past them
    float* x = m.scores.data() + i * stride;
    const int64_t n = m.seen[i / group];
    if (n == 0) {
      std::fill(x, x + stride, 0.0f);
      continue;
    }
    float peak = x[0];
    for (int64_t s = 1; s < n; ++s) peak = std::max(peak, x[s]);
    V total = O::splat(0.0f);
    for (int64_t s = 0; s < stride; s += W) {
      V e = O::exp_nonpositive(O::load(x + s) - peak);
      O::store(x + s, e);
      if (s + W > n) std::fill(x + std::max(s, n), x + s + W, 0.0f);  // lanes past the keys this query sees
      total += O::load(x + s);
    }
    const V denominator = O::splat(O::sum(total));
    for (int64_t s = 0; s < stride; s += W) O::store(x + s, O::load(x + s) / denominator);
    if (p.int8)
      for (int64_t s = 0; s < n; ++s) x[s] *= p.vs[base + s];
  }
  // out: the probability-weighted sum of the value rows, `block` queries at a time with their sums in
  // registers (each value row read once per block)
  constexpr int kRegisters = W == 16 ? 16 : 12;  // for the sums, of 32 (AVX-512) or 16 vector registers
  constexpr int kBlock = Vecs == 0 ? 1 : std::max(1, std::min(4, kRegisters / Vecs));
  constexpr int kHeld = Vecs == 0 ? 1 : Vecs;
  for (int64_t i0 = 0; i0 < queries; i0 += kBlock) {
    for (int64_t c0 = 0; c0 < vecs; c0 += kHeld) {  // (a loop only when head_dim is not an unrolled size)
      V acc[kBlock][kHeld];
      for (int j = 0; j < kBlock; ++j)
        for (int c = 0; c < kHeld; ++c) acc[j][c] = O::splat(0.0f);
      const float* w[kBlock];
      for (int j = 0; j < kBlock; ++j) w[j] = m.scores.data() + std::min(i0 + j, queries - 1) * stride;
      for (int64_t s = 0; s < most; ++s) {
        const float* value = row_at(p, p.v, base + s, m.row.data()) + c0 * W;
        for (int j = 0; j < kBlock; ++j) {
          const V weight = O::splat(w[j][s]);
          for (int c = 0; c < kHeld; ++c) acc[j][c] += weight * O::load(value + c * W);
        }
      }
      for (int j = 0; j < kBlock && i0 + j < queries; ++j)
        for (int c = 0; c < kHeld; ++c) O::store(p.out + at(i0 + j) + (c0 + c) * W, acc[j][c]);
    }
  }
}

template <int W>
MESHLM_INLINE void attend_any(const Problem& p, int64_t task) {
  switch (p.dim / W) {  // head_dim 64 and 128 with their loops unrolled; others by a loop
    case 64 / W: return attend<W, 64 / W>(p, task);
    case 128 / W: return attend<W, 128 / W>(p, task);
    default: return attend<W, 0>(p, task);
  }
}

#ifdef MESHLM_X86
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"), flatten))
void attend_avx512(const Problem& p, int64_t task) { attend_any<16>(p, task); }

__attribute__((target("avx2,fma"), flatten))
void attend_avx2(const Problem& p, int64_t task) { attend_any<8>(p, task); }
#endif

__attribute__((flatten)) void attend_baseline(const Problem& p, int64_t task) { attend_any<4>(p, task); }

struct Build {
  void (*run)(const Problem&, int64_t);
  const char* name;
};

Build pick_build() {
  const char* cap_env = std::getenv("MESHLM_QKERNEL_ISA");
  const std::string cap = cap_env ? cap_env : "";
  if (cap == "baseline") return {attend_baseline, "baseline"};
#ifdef MESHLM_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (cap != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return {attend_avx512, "avx512"};
  if (avx2) return {attend_avx2, "avx2"};
#endif
  return {attend_baseline, "baseline"};
}

const Build& build() {
  static const Build chosen = pick_build();
  return chosen;
}

ffi::Error attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::S32> positions,
                     ffi::ResultBuffer<ffi::F32> out, float scale, int64_t visible) {
  const auto qd = q.dimensions(), kd = k.dimensions(), pd = positions.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || pd.size() != 2)
    return ffi::Error::InvalidArgument("meshlm_attention: q and the cache must have 4 dimensions, positions 2");
  const int64_t batch = qd[0], length = qd[1], heads = qd[2], dim = qd[3], kv_heads = kd[1], cache = kd[2];
  if (kd[0] != batch || kd[3] != dim || v.dimensions().size() != 4 || v.dimensions()[0] != batch ||
      v.dimensions()[1] != kv_heads || v.dimensions()[2] != cache || v.dimensions()[3] != dim ||
      pd[0] != batch || pd[1] != length)
    return ffi::Error::InvalidArgument("meshlm_attention: q, k, v and positions do not match");
  if (dim % 16 || kv_heads == 0 || heads % kv_heads)
    return ffi::Error::InvalidArgument("meshlm_attention: head_dim must be a multiple of 16, heads of kv_heads");
  const bool int8 = k.element_type() == ffi::DataType::S8;
  if (k.element_type() != v.element_type() || (!int8 && k.element_type() != ffi::DataType::F32))
    return ffi::Error::InvalidArgument("meshlm_attention: the cache must be float32 or int8 (keys and values alike)");
  if (int8 && (k_scale.element_count() != static_cast<size_t>(batch * kv_heads * cache) ||
               v_scale.element_count() != k_scale.element_count()))
    return ffi::Error::InvalidArgument("meshlm_attention: an int8 cache needs a scale per row, kv head and position");
  Problem problem{q.typed_data(), k.untyped_data(), v.untyped_data(),
                        int8 ? k_scale.typed_data() : nullptr, int8 ? v_scale.typed_data() : nullptr,
                        positions.typed_data(), out->typed_data(), batch, length, heads, kv_heads, cache, dim,
                        std::min(visible, cache), scale, int8};
  const auto one = +[](void* context, int64_t task) { build().run(*static_cast<const Problem*>(context), task); };
  meshlm::parallel_for(pool, batch * kv_heads, one, &problem);  // one task per (row, kv head)
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MeshlmAttention, attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("visible"));

extern "C" __attribute__((visibility("default"))) const char* MeshlmAttentionBuild() { return build().name; }
