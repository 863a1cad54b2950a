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
// The weight is read once, in its quantised bytes, which is the point when a decode step is bound by memory
// bandwidth. Two paths:
//   - int8 activations (the default; model/quant.py): each row of x is quantised once per call, in blocks of
//     32 along K (d = max |x| * (1 / 127), codes round(x * (1 / d))), and the products of codes are summed
//     exactly in int32 per block, then scaled by d and the weight's scale. On AVX-512 VNNI, `vpdpbusd` adds
//     4 byte products per 32-bit lane; 4 weight rows are interleaved in registers so that a lane holds one
//     column's 4 rows. Its operand must be unsigned, so int8 codes are flipped to w + 128 and 128 * sum(x codes)
//     is taken off. On AVX2, `vpmaddubsw` then `vpmaddwd`, int8 codes taken as |w| times x with w's sign so
//     that no 16-bit pair sum saturates.
//   - float activations: the codes are turned into floats in registers and never written out.
//
// Work is split into tasks over XLA's intra-op thread pool: up to 4 rows of x (bandwidth bound), by stretches
// of K whose partial sums are added; above that, by panels of columns times blocks of rows, about 4 tasks
// per thread. Within a panel a few rows of x share each loaded weight vector (register blocking). One portable source, written with GCC/Clang vector types, is
// compiled three times: for AVX-512 (64 columns x 4 rows per tile), AVX2 + FMA (16 x 4) and the x86-64 or
// other baseline (16 x 2); the widest the CPU has is picked once at run time. A CPU without AVX2 runs the
// baseline build (SSE2 on x86-64), slower but the same arithmetic.
//
// Requirements, checked by the caller (model/qkernel.py) and again here: float32 x and y, N a multiple of
// 16, K a multiple of the group, an even group for 4-bit codes; for int8 activations, K and the group
// multiples of 32. MESHLM_QKERNEL_ISA=avx2|baseline caps the build (tests run each build on one CPU).

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "workers.h"

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
  // The integer path (int8 activations): x as int8 codes in blocks of kBlock along K, each block's scale and
  // the sum of its codes; null on the float path.
  const int8_t* qx;  // [M, K]
  const float* xd;   // [M, K / kBlock]
  const int32_t* qsum;  // [M, K / kBlock]
};

constexpr int64_t kBlock = 32;  // activations are quantised in blocks of 32 along K (llama.cpp's Q8_0 blocks)

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

// The integer path's operations on a vector I of 4 * kCols / 4 int32 lanes (kCols bytes): weight rows are
// loaded kCols bytes at a time, 4 rows at once are interleaved so that each 32-bit lane holds one column's 4
// consecutive rows, and a dot product adds, per lane, those 4 bytes times 4 activation bytes. Interleaving
// works within 128-bit lanes, so the lanes of W[j] hold columns 16 * (i / 4) + 4 * j + i % 4; `natural`
// puts 4 such vectors back in column order.
struct Avx512Vnni {
  using I = __m512i;
  using V = __m512;
  static constexpr int kCols = 64, kLanes = 16, kRows = 4;
  static constexpr bool kUnsignedOnly = true;  // the dot takes unsigned weight bytes: int8 codes are flipped
#define MESHLM_VNNI inline __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
  static MESHLM_VNNI I load(const void* p) { return _mm512_loadu_si512(p); }
  static MESHLM_VNNI I low_nibbles(I b) { return _mm512_and_si512(b, _mm512_set1_epi8(15)); }
  static MESHLM_VNNI I high_nibbles(I b) { return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(15)); }
  static MESHLM_VNNI I flip(I b) { return _mm512_xor_si512(b, _mm512_set1_epi8(-128)); }
  static MESHLM_VNNI void interleave(const I r[4], I w[4]) {
    const I a = _mm512_unpacklo_epi8(r[0], r[1]), b = _mm512_unpackhi_epi8(r[0], r[1]);
    const I c = _mm512_unpacklo_epi8(r[2], r[3]), d = _mm512_unpackhi_epi8(r[2], r[3]);
    w[0] = _mm512_unpacklo_epi16(a, c), w[1] = _mm512_unpackhi_epi16(a, c);
    w[2] = _mm512_unpacklo_epi16(b, d), w[3] = _mm512_unpackhi_epi16(b, d);
  }
  static MESHLM_VNNI I broadcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  static MESHLM_VNNI I zero() { return _mm512_setzero_si512(); }
  static MESHLM_VNNI I dot_unsigned(I acc, I w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }
  static MESHLM_VNNI I dot_signed(I acc, I w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }  // unused
  static MESHLM_VNNI void natural(const I v[4], I n[4]) {
    const I t0 = _mm512_shuffle_i32x4(v[0], v[1], 0x44), t1 = _mm512_shuffle_i32x4(v[0], v[1], 0xEE);
    const I t2 = _mm512_shuffle_i32x4(v[2], v[3], 0x44), t3 = _mm512_shuffle_i32x4(v[2], v[3], 0xEE);
    n[0] = _mm512_shuffle_i32x4(t0, t2, 0x88), n[1] = _mm512_shuffle_i32x4(t0, t2, 0xDD);
    n[2] = _mm512_shuffle_i32x4(t1, t3, 0x88), n[3] = _mm512_shuffle_i32x4(t1, t3, 0xDD);
  }
  // t[0 .. kCols) += float(n - correction) * d, n in column order
  static MESHLM_VNNI void add_scaled(float* t, const I n[4], int32_t correction, float d) {
    const I c = _mm512_set1_epi32(correction);
    const V s = _mm512_set1_ps(d);
    for (int j = 0; j < 4; ++j)
      _mm512_storeu_ps(t + 16 * j, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(n[j], c)), s,
                                                   _mm512_loadu_ps(t + 16 * j)));
  }
  // out[0 .. kCols) += float(n - correction) * d * scale (+ offset * xs, or - 8 * xs * scale): a whole group in
  // one block, added straight into the output
  static MESHLM_VNNI void add_block(float* out, const I n[4], int32_t correction, float d, const float* scale,
                                    const float* offset, float xs, int64_t kind) {
    const I c = _mm512_set1_epi32(correction);
    const V dv = _mm512_set1_ps(d), x = _mm512_set1_ps(kind == kNibbleMinus8 ? -8.0f * xs : xs);
    for (int j = 0; j < 4; ++j) {
      const V s = _mm512_loadu_ps(scale + 16 * j);
      V acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(n[j], c)), _mm512_mul_ps(s, dv),
                              _mm512_loadu_ps(out + 16 * j));
      if (kind == kNibbleOffset) acc = _mm512_fmadd_ps(_mm512_loadu_ps(offset + 16 * j), x, acc);
      if (kind == kNibbleMinus8) acc = _mm512_fmadd_ps(s, x, acc);
      _mm512_storeu_ps(out + 16 * j, acc);
    }
  }
  // out[0 .. width) += scale * t + offset * xs (or - 8 * xs * scale); returns how many columns it did
  static MESHLM_VNNI int64_t finish(float* out, const float* t, const float* scale, const float* offset, float xs,
                                    int64_t kind, int64_t width) {
    const V x = _mm512_set1_ps(kind == kNibbleMinus8 ? -8.0f * xs : xs);
    int64_t c = 0;
    for (; c + 16 <= width; c += 16) {
      const V s = _mm512_loadu_ps(scale + c);
      V acc = _mm512_fmadd_ps(s, _mm512_loadu_ps(t + c), _mm512_loadu_ps(out + c));
      if (kind == kNibbleOffset) acc = _mm512_fmadd_ps(_mm512_loadu_ps(offset + c), x, acc);
      if (kind == kNibbleMinus8) acc = _mm512_fmadd_ps(s, x, acc);
      _mm512_storeu_ps(out + c, acc);
    }
    return c;
  }
};

struct Avx2Int {
  using I = __m256i;
  using V = __m256;
  static constexpr int kCols = 32, kLanes = 8, kRows = 2;
  static constexpr bool kUnsignedOnly = false;  // int8 codes: |w| times x with w's sign (no 16-bit overflow)
  static MESHLM_AVX2 I load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static MESHLM_AVX2 I low_nibbles(I b) { return _mm256_and_si256(b, _mm256_set1_epi8(15)); }
  static MESHLM_AVX2 I high_nibbles(I b) { return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(15)); }
  static MESHLM_AVX2 I flip(I b) { return _mm256_xor_si256(b, _mm256_set1_epi8(-128)); }
  static MESHLM_AVX2 void interleave(const I r[4], I w[4]) {
    const I a = _mm256_unpacklo_epi8(r[0], r[1]), b = _mm256_unpackhi_epi8(r[0], r[1]);
    const I c = _mm256_unpacklo_epi8(r[2], r[3]), d = _mm256_unpackhi_epi8(r[2], r[3]);
    w[0] = _mm256_unpacklo_epi16(a, c), w[1] = _mm256_unpackhi_epi16(a, c);
    w[2] = _mm256_unpacklo_epi16(b, d), w[3] = _mm256_unpackhi_epi16(b, d);
  }
  static MESHLM_AVX2 I broadcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  static MESHLM_AVX2 I zero() { return _mm256_setzero_si256(); }
  // unsigned weight bytes (4-bit codes, at most 15): pairs of products fit in 16 bits
  static MESHLM_AVX2 I dot_unsigned(I acc, I w, I x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
  }
  // signed weight bytes: |w| (at most 128) times x (at most 127 in magnitude) with w's sign
  static MESHLM_AVX2 I dot_signed(I acc, I w, I x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)),
                                                   _mm256_set1_epi16(1)));
  }
  static MESHLM_AVX2 void natural(const I v[4], I n[4]) {
    n[0] = _mm256_permute2x128_si256(v[0], v[1], 0x20), n[1] = _mm256_permute2x128_si256(v[2], v[3], 0x20);
    n[2] = _mm256_permute2x128_si256(v[0], v[1], 0x31), n[3] = _mm256_permute2x128_si256(v[2], v[3], 0x31);
  }
  static MESHLM_AVX2 void add_scaled(float* t, const I n[4], int32_t correction, float d) {
    const I c = _mm256_set1_epi32(correction);
    const V s = _mm256_set1_ps(d);
    for (int j = 0; j < 4; ++j)
      _mm256_storeu_ps(t + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(n[j], c)), s,
                                                  _mm256_loadu_ps(t + 8 * j)));
  }
  static MESHLM_AVX2 void add_block(float* out, const I n[4], int32_t correction, float d, const float* scale,
                                    const float* offset, float xs, int64_t kind) {
    const I c = _mm256_set1_epi32(correction);
    const V dv = _mm256_set1_ps(d), x = _mm256_set1_ps(kind == kNibbleMinus8 ? -8.0f * xs : xs);
    for (int j = 0; j < 4; ++j) {
      const V s = _mm256_loadu_ps(scale + 8 * j);
      V acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(n[j], c)), _mm256_mul_ps(s, dv),
                              _mm256_loadu_ps(out + 8 * j));
      if (kind == kNibbleOffset) acc = _mm256_fmadd_ps(_mm256_loadu_ps(offset + 8 * j), x, acc);
      if (kind == kNibbleMinus8) acc = _mm256_fmadd_ps(s, x, acc);
      _mm256_storeu_ps(out + 8 * j, acc);
    }
  }
  static MESHLM_AVX2 int64_t finish(float* out, const float* t, const float* scale, const float* offset, float xs,
                                    int64_t kind, int64_t width) {
    const V x = _mm256_set1_ps(kind == kNibbleMinus8 ? -8.0f * xs : xs);
    int64_t c = 0;
    for (; c + 8 <= width; c += 8) {
      const V s = _mm256_loadu_ps(scale + c);
      V acc = _mm256_fmadd_ps(s, _mm256_loadu_ps(t + c), _mm256_loadu_ps(out + c));
      if (kind == kNibbleOffset) acc = _mm256_fmadd_ps(_mm256_loadu_ps(offset + c), x, acc);
      if (kind == kNibbleMinus8) acc = _mm256_fmadd_ps(s, x, acc);
      _mm256_storeu_ps(out + c, acc);
    }
    return c;
  }
};
#endif

// A task: rows k0 .. k1 - 1 of the weight (whole groups for 4-bit codes) times the same rows of x's rows m0 ..
// m1 - 1, for columns n0 .. n1 - 1, added into `out` ([M, N], y itself or a partial sum that is added to y at
// the end).
struct Task {
  int64_t k0, k1, n0, n1;
  float* out;
  int64_t m0, m1;
};

constexpr int kRows = 4;            // rows of x that share each converted weight vector
constexpr int64_t kPanel = 512;     // columns per task at most when M > kRows (compute bound: tasks by columns)
constexpr int64_t kUnit = 64;       // ... in whole vectors of the widest build (AVX-512: 64 columns)
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
    int64_t m0 = task.m0;
    for (; m0 + kRows <= task.m1; m0 += kRows) panel<Isa, kRows>(p, m0, task.k0, task.k1, n0, width, task.out, t_buffer.data());
    switch (task.m1 - m0) {
      case 3: panel<Isa, 3>(p, m0, task.k0, task.k1, n0, width, task.out, t_buffer.data()); break;
      case 2: panel<Isa, 2>(p, m0, task.k0, task.k1, n0, width, task.out, t_buffer.data()); break;
      case 1: panel<Isa, 1>(p, m0, task.k0, task.k1, n0, width, task.out, t_buffer.data()); break;
      default: break;
    }
  }
}


// ---- The integer path: int8 activations (quantised once per call, in blocks of kBlock along K) times the
// weight's codes, summed exactly in int32 over each block, then scaled. No weight is turned into a float.

struct ScalarInt {
  static constexpr int kCols = 0, kRows = 4;  // every column by the scalar loop below
};

// The code of weight row kk, column col: signed for int8 kinds, 0..15 for 4-bit ones.
MESHLM_INLINE int32_t code_at(const Problem& p, int64_t kk, int64_t col) {
  if (p.kind == kInt8) return static_cast<const int8_t*>(p.codes)[kk * p.n + col];
  const int64_t half = p.group / 2, j = kk % p.group;
  const uint8_t b = static_cast<const uint8_t*>(p.codes)[(kk / p.group * half + j % half) * p.n + col];
  return j < half ? b & 15 : b >> 4;
}

// Weight rows kk .. kk + 3 at columns col .. col + kCols - 1, as bytes (4-bit codes unpacked; in a group, byte
// row j holds row j in its low nibble and row j + group / 2 in its high one, and 4 rows never straddle).
template <class Isa, bool Int8>
MESHLM_INLINE void rows4(const Problem& p, int64_t kk, int64_t col, typename Isa::I r[4]) {
  if constexpr (Int8) {
    const int8_t* base = static_cast<const int8_t*>(p.codes) + kk * p.n + col;
    for (int i = 0; i < 4; ++i) r[i] = Isa::load(base + i * p.n);
  } else {
    const int64_t half = p.group / 2, j = kk % p.group;
    const uint8_t* base = static_cast<const uint8_t*>(p.codes) + (kk / p.group * half + j % half) * p.n + col;
    if (j < half)
      for (int i = 0; i < 4; ++i) r[i] = Isa::low_nibbles(Isa::load(base + i * p.n));
    else
      for (int i = 0; i < 4; ++i) r[i] = Isa::high_nibbles(Isa::load(base + i * p.n));
  }
}

// As panel() above, on the integer path: rows m0 .. m0 + MB - 1 of x, weight rows k0 .. k1 - 1 (whole blocks),
// columns n0 .. n0 + width - 1 added into out. Per block and row of x, t += d * (the block's integer dot).
template <class Isa, int MB, bool Int8>
inline void panel_int(const Problem& p, int64_t m0, int64_t k0, int64_t k1, int64_t n0, int64_t width, float* out,
                      float* t_buffer) {
  constexpr int C = Isa::kCols;
  const int64_t k = p.k, n = p.n, blocks = p.k / kBlock;
  float* t[MB];
  for (int r = 0; r < MB; ++r) t[r] = t_buffer + r * width;
  const int64_t simd = C > 0 ? width / (C > 0 ? C : 1) * C : 0;  // columns the vector loop takes
  // A group of one block (q8_0, q4_0, q4_1, int4:32) with no columns left for the scalar loop: each block's
  // products go straight into the output; else they are summed over the group's blocks in t, then scaled.
  const bool one_block = p.group == kBlock && C > 0 && simd == width;
  for (int64_t g = k0 / p.group; g * p.group < k1; ++g) {
    const int64_t lo = std::max(k0, g * p.group), hi = std::min(k1, (g + 1) * p.group);
    if (!one_block)
      for (int r = 0; r < MB; ++r) std::memset(t[r], 0, width * sizeof(float));
    float xs[MB] = {};  // the group's sum of the dequantised activations (4-bit kinds' offset term)
    for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
      const int64_t b = b0 / kBlock;
      if constexpr (C > 0) {
        using I = typename Isa::I;
        for (int64_t c = 0; c < simd; c += C) {
          I acc[MB][4];
          for (int r = 0; r < MB; ++r)
            for (int j = 0; j < 4; ++j) acc[r][j] = Isa::zero();
          for (int64_t kk = b0; kk < b0 + kBlock; kk += 4) {
            I rows[4], w[4];
            rows4<Isa, Int8>(p, kk, n0 + c, rows);
            Isa::interleave(rows, w);
            if constexpr (Int8 && Isa::kUnsignedOnly)
              for (int j = 0; j < 4; ++j) w[j] = Isa::flip(w[j]);  // w + 128, corrected below
            for (int r = 0; r < MB; ++r) {
              const I xb = Isa::broadcast4(p.qx + (m0 + r) * k + kk);
              for (int j = 0; j < 4; ++j)
                acc[r][j] = Int8 && !Isa::kUnsignedOnly ? Isa::dot_signed(acc[r][j], w[j], xb)
                                                        : Isa::dot_unsigned(acc[r][j], w[j], xb);
            }
          }
          for (int r = 0; r < MB; ++r) {
            I nat[4];
            Isa::natural(acc[r], nat);
            const int64_t rb = (m0 + r) * blocks + b;
            const int32_t correction = Int8 && Isa::kUnsignedOnly ? 128 * p.qsum[rb] : 0;
            if (one_block)
              Isa::add_block(out + (m0 + r) * n + n0 + c, nat, correction, p.xd[rb], p.scale + g * n + n0 + c,
                             p.offset ? p.offset + g * n + n0 + c : nullptr, p.xd[rb] * static_cast<float>(p.qsum[rb]),
                             p.kind);
            else
              Isa::add_scaled(t[r] + c, nat, correction, p.xd[rb]);
          }
        }
      }
      for (int64_t c = one_block ? width : simd; c < width; ++c)  // the columns the vector loop left (all of them
        for (int r = 0; r < MB; ++r) {                            // in the baseline build), added to t
          const int8_t* xq = p.qx + (m0 + r) * k;
          int32_t sum = 0;
          for (int64_t kk = b0; kk < b0 + kBlock; ++kk) sum += code_at(p, kk, n0 + c) * xq[kk];
          t[r][c] += static_cast<float>(sum) * p.xd[(m0 + r) * blocks + b];
        }
      for (int r = 0; r < MB; ++r) xs[r] += p.xd[(m0 + r) * blocks + b] * static_cast<float>(p.qsum[(m0 + r) * blocks + b]);
    }
    if (one_block) continue;
    const float* scale = p.scale + g * n + n0;
    const float* offset = p.offset ? p.offset + g * n + n0 : nullptr;
    for (int r = 0; r < MB; ++r) {  // out += scale * t (+ the offset's share)
      float* o_r = out + (m0 + r) * n + n0;
      int64_t c = 0;
      if constexpr (C > 0) c = Isa::finish(o_r, t[r], scale, offset, xs[r], p.kind, width);
      for (; c < width; ++c) {
        float v = scale[c] * t[r][c];
        if (p.kind == kNibbleOffset) v += offset[c] * xs[r];
        if (p.kind == kNibbleMinus8) v -= 8.0f * xs[r] * scale[c];
        o_r[c] += v;
      }
    }
  }
}

template <class Isa, bool Int8>
inline void run_task_int(const Problem& p, const Task& task) {
  static thread_local std::vector<float> t_buffer;
  constexpr int R = Isa::kRows;
  const int64_t wide = p.m > kRows ? kPanel : kStream;
  t_buffer.resize(R * std::min(wide, p.n));
  for (int64_t n0 = task.n0; n0 < task.n1; n0 += wide) {
    const int64_t width = std::min(wide, task.n1 - n0);
    int64_t m0 = task.m0;
    for (; m0 + R <= task.m1; m0 += R) panel_int<Isa, R, Int8>(p, m0, task.k0, task.k1, n0, width, task.out, t_buffer.data());
    switch (task.m1 - m0) {
      case 3: panel_int<Isa, 3, Int8>(p, m0, task.k0, task.k1, n0, width, task.out, t_buffer.data()); break;
      case 2: panel_int<Isa, 2, Int8>(p, m0, task.k0, task.k1, n0, width, task.out, t_buffer.data()); break;
      case 1: panel_int<Isa, 1, Int8>(p, m0, task.k0, task.k1, n0, width, task.out, t_buffer.data()); break;
      default: break;
    }
  }
}

template <class Isa>
inline void run_task_int(const Problem& p, const Task& task) {
  if (p.kind == kInt8)
    run_task_int<Isa, true>(p, task);
  else
    run_task_int<Isa, false>(p, task);
}

#ifdef MESHLM_X86
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"), flatten))
void task_avx512(const Problem& p, const Task& task) { run_task<Avx512>(p, task); }

__attribute__((target("avx2,fma"), flatten))
void task_avx2(const Problem& p, const Task& task) { run_task<Avx2>(p, task); }
#endif

void task_baseline(const Problem& p, const Task& task) { run_task<Scalar>(p, task); }

#ifdef MESHLM_X86
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma"), flatten))
void task_int_vnni(const Problem& p, const Task& task) { run_task_int<Avx512Vnni>(p, task); }

__attribute__((target("avx2,fma"), flatten))
void task_int_avx2(const Problem& p, const Task& task) { run_task_int<Avx2Int>(p, task); }
#endif

void task_int_baseline(const Problem& p, const Task& task) { run_task_int<ScalarInt>(p, task); }

struct Build {
  void (*run)(const Problem&, const Task&);      // the float path
  void (*run_int)(const Problem&, const Task&);  // the integer path
  const char* name;
};

// MESHLM_QKERNEL_ISA=avx2|baseline caps the build (tests run every build this CPU can on it).
Build pick_build() {
  const char* cap_env = std::getenv("MESHLM_QKERNEL_ISA");
  const std::string cap = cap_env ? cap_env : "";
  if (cap == "baseline") return {task_baseline, task_int_baseline, "baseline"};
#ifdef MESHLM_X86
  __builtin_cpu_init();
  if (cap == "avx2" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return {task_avx2, task_int_avx2, "avx2"};
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    if (__builtin_cpu_supports("avx512vnni")) return {task_avx512, task_int_vnni, "avx512-vnni"};
    return {task_avx512, avx2 ? task_int_avx2 : task_int_baseline, "avx512"};  // integer dots as on AVX2
  }
  if (avx2) return {task_avx2, task_int_avx2, "avx2"};
#endif
  return {task_baseline, task_int_baseline, "baseline"};
}

const Build& build() {
  static const Build chosen = pick_build();
  return chosen;
}

// A call's problem and tasks (model/workers.h's parallel_for hands the tasks out).
struct Call {
  Problem problem;
  std::vector<Task> tasks;
  std::vector<float> partial;  // [splits - 1, M, N] when tasks split K
};

ffi::Error qmatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes,
                   ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::F32> y,
                   int64_t group, int64_t kind, int64_t int8_activations) {
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
  if (int8_activations && (k % kBlock || group % kBlock))
    return ffi::Error::InvalidArgument("meshlm_qmatmul: int8 activations need K and the group in blocks of 32");
  // int8 activations: per row and block of 32, d = max |x| * (1 / 127) and codes round(x * (1 / d)) (to
  // nearest, ties to even: what model/quant.py's quantize_activations computes, so both see the same codes)
  const int64_t blocks = k / kBlock;
  std::vector<int8_t> x_codes;
  std::vector<float> x_scale;
  std::vector<int32_t> x_sums;
  if (int8_activations) {
    x_codes.resize(m * k), x_scale.resize(m * blocks), x_sums.resize(m * blocks);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t b = 0; b < blocks; ++b) {
        const float* xr = x.typed_data() + r * k + b * kBlock;
        float peak = 0.0f;
        for (int64_t j = 0; j < kBlock; ++j) peak = std::max(peak, std::fabs(xr[j]));
        const float d = peak * (1.0f / 127.0f), inverse = d > 0.0f ? 1.0f / d : 0.0f;
        int32_t sum = 0;
        for (int64_t j = 0; j < kBlock; ++j) {
          const int32_t q = static_cast<int32_t>(std::nearbyint(xr[j] * inverse));
          x_codes[r * k + b * kBlock + j] = static_cast<int8_t>(q);
          sum += q;
        }
        x_scale[r * blocks + b] = d, x_sums[r * blocks + b] = sum;
      }
  }
  std::vector<float> xsum;
  if (nibbles && !int8_activations) {
    xsum.assign(m * groups, 0.0f);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const float* xr = x.typed_data() + r * k + g * group;
        float s = 0;
        for (int64_t j = 0; j < group; ++j) s += xr[j];
        xsum[r * groups + g] = s;
      }
  }
  Call call;
  float* out = y->typed_data();
  std::memset(out, 0, m * n * sizeof(float));
  call.problem = Problem{x.typed_data(), codes.untyped_data(), scale.typed_data(),
                            with_offset ? offset.typed_data() : nullptr, nibbles ? xsum.data() : nullptr,
                            out, m, k, n, group, kind,
                            int8_activations ? x_codes.data() : nullptr, int8_activations ? x_scale.data() : nullptr,
                            int8_activations ? x_sums.data() : nullptr};
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t splits = 1;
  if (m <= kRows) {  // bandwidth bound: each task streams a contiguous stretch of rows, all columns
    const int64_t per = nibbles ? group : int8_activations ? kBlock : 4, units = k / per;
    splits = std::min(threads, units);
    if (splits > 1) call.partial.assign((splits - 1) * m * n, 0.0f);
    for (int64_t i = 0; i < splits; ++i) {
      const int64_t k0 = units * i / splits * per, k1 = i + 1 == splits ? k : units * (i + 1) / splits * per;
      call.tasks.push_back({k0, k1, 0, n, i == 0 ? out : call.partial.data() + (i - 1) * m * n, 0, m});
    }
  } else {  // compute bound: tasks by panels of columns (whole vectors, at most kPanel wide) and blocks of rows
    // Panels alone leave threads idle where N has few panels (576 columns: 512 + 64; 192: one), so rows are
    // split too until there are about 4 tasks per thread, as equal as whole vectors and blocks of rows allow.
    const int64_t units = (n + kUnit - 1) / kUnit, panels = (units * kUnit + kPanel - 1) / kPanel;
    const int64_t row_blocks = (m + kRows - 1) / kRows;
    const int64_t chunks = std::min(row_blocks, std::max<int64_t>(1, (4 * threads + panels - 1) / panels));
    for (int64_t i = 0; i < panels; ++i) {
      const int64_t n0 = units * i / panels * kUnit, n1 = std::min(n, units * (i + 1) / panels * kUnit);
      for (int64_t j = 0; j < chunks; ++j)
        call.tasks.push_back({0, k, n0, n1, out, row_blocks * j / chunks * kRows,
                                 std::min(m, row_blocks * (j + 1) / chunks * kRows)});
    }
  }
  const auto one = +[](void* context, int64_t i) {
    const Call* c = static_cast<const Call*>(context);
    (c->problem.qx ? build().run_int : build().run)(c->problem, c->tasks[i]);
  };
  meshlm::parallel_for(pool, static_cast<int64_t>(call.tasks.size()), one, &call);
  for (int64_t i = 1; i < splits; ++i) {  // the other splits' partial sums
    const float* part = call.partial.data() + (i - 1) * m * n;
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
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("int8_activations"));

extern "C" __attribute__((visibility("default"))) const char* MeshlmQMatmulBuild() { return build().name; }
