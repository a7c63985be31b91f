// The small operations of a Llama-style decoder layer at decode, one call each, on CPU (float32 or bfloat16 rows).
//
// Why: a decode step of a small model at one row is mostly not its products. Through torch each layer runs
// ~35 small ops (RMS norm as six, rotary as fourteen, a gather of the context's K/V, SDPA, casts), each a
// dispatcher trip of a few microseconds and an allocation: ~12 ms of a 30 ms step of the default model
// (docs/BENCHMARKS.md, "Single-stream latency"). Here each is one pass over its rows:
//   add_rms_norm     h += delta (optional), out = RMSNorm(h) * w
//   rope_store       rotary on q and k in place, then k and v written into the paged KV pool
//   decode_attention every row's query heads over its own context, read in place through its block table
//   silu_mul         out = silu(gate) * up
//   gemv             y = x W^T (* per-row scales) for a few rows, W row-major in float32, bfloat16 or int8: the
//                    base model's products at one row, where oneDNN's call costs ~35 us however small the weight
//                    (so q, k and v, and gate and up, are one product each over weights stored side by side)
// Rounding follows transformers' eager modules step by step (each product of the bfloat16 forward is rounded
// to bfloat16 where theirs is), so the fast path and the eager one agree to a rounding step, not only in value.
// Arithmetic is float32; plain loops that the compiler vectorises (-O3 -march=native).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "numeric.h"
#include "vectors.h"

namespace {

using malora::BF16;
using malora::bf16_to_float;
using malora::F32;
using malora::float_to_bf16;

#if defined(MALORA_LANES)
typedef uint16_t VH __attribute__((vector_size(kLanes * 2)));
typedef int8_t VB __attribute__((vector_size(kLanes)));

inline VF vmax(VF a, VF b) { return a > b ? a : b; }
inline VF vmin(VF a, VF b) { return a < b ? a : b; }

inline VF vround(VF v) {  // to the nearest integer, ties to even
#if MALORA_LANES == 16
  return (VF)_mm512_roundscale_ps((Native)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif MALORA_LANES == 8
  return (VF)_mm256_round_ps((Native)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  return (VF)vrndnq_f32((Native)v);
#endif
}

inline float vmaximum(VF v) {
#if MALORA_LANES == 16
  return _mm512_reduce_max_ps((Native)v);
#else
  float best = v[0];
  for (int i = 1; i < kLanes; ++i) best = std::max(best, v[i]);
  return best;
#endif
}

// exp(x) per lane: 2^n * e^r with |r| <= ln2/2, a degree-6 polynomial for e^r (relative error ~2e-7, below
// float32's own rounding of what follows); inputs below -87 give 0, as the softmax's masked-out scores need.
inline VF vexp(VF x) {
  x = vmin(vmax(x, vset(-87.f)), vset(88.f));
  const VF n = vround(x * 1.44269504088896341f);
  VF r = vfma(n, vset(-0.693359375f), x);
  r = vfma(n, vset(2.12194440e-4f), r);
  VF p = vset(1.f / 720);
  p = vfma(p, r, vset(1.f / 120));
  p = vfma(p, r, vset(1.f / 24));
  p = vfma(p, r, vset(1.f / 6));
  p = vfma(p, r, vset(0.5f));
  p = vfma(p, r, vset(1.f));
  p = vfma(p, r, vset(1.f));
#if MALORA_LANES == 16
  return (VF)_mm512_scalef_ps((Native)p, (Native)n);
#else
  // p * 2^n through the exponent bits: n is in [-126, 127] and p in [0.7, 1.42], so the result stays normal.
  return (VF)((VI)p + (__builtin_convertvector(n, VI) << 23));
#endif
}

// kLanes bfloat16 values as float32. The intrinsics where GCC's own code for the generic form measured slower
// (decode attention 9% slower on AVX-512 through __builtin_convertvector).
inline VF widen_bf16(const uint16_t* p) {
#if MALORA_LANES == 16
  return (VF)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif MALORA_LANES == 8
  return (VF)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  return (VF)vshll_n_u16(vld1_u16(p), 16);
#endif
}

template <class D>
inline VF vload_rows(const typename D::T* p) {  // kLanes elements of the rows' dtype, as float32
  if constexpr (std::is_same_v<typename D::T, float>) {
    return vload(p);
  } else {
    return widen_bf16(p);
  }
}

template <class D>
inline VF vround_rows(VF v) {  // to what the rows' dtype holds (bfloat16: nearest even), as float32
  if constexpr (std::is_same_v<typename D::T, float>) {
    return v;
  } else {
    VU bits = (VU)v;
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (VF)(bits & 0xffff0000u);
  }
}

template <class D>
inline void vstore_rows(typename D::T* p, VF v) {  // v rounded to the dtype first
  if constexpr (std::is_same_v<typename D::T, float>) {
    vstore(p, v);
  } else {
    const VH h = __builtin_convertvector((VU)vround_rows<D>(v) >> 16, VH);
    std::memcpy(p, &h, sizeof h);
  }
}
#endif

// ---- gemv: y[r, o] = (sum_i x[r, i] W[o, i]) * scale[o] for a few rows of x ---------------------------------
// Weights stream from memory once per call (the point at one row); every row of x shares each loaded vector.
// Sums of products in float32, rounded once into y. Blocks are templates over J output rows and R rows of x, so
// their J x R accumulators stay in registers.

constexpr int kOutBlock = 8;  // output rows a block reads at once (measured: 4 streamed ~1.2x slower)

inline float weight_value(float v) { return v; }
inline float weight_value(uint16_t v) { return bf16_to_float(v); }
inline float weight_value(int8_t v) { return static_cast<float>(v); }

#if defined(MALORA_LANES)
template <class WT>
inline VF load_weights(const WT* p) {  // kLanes weights as float32
  if constexpr (std::is_same_v<WT, float>) {
    return vload(p);
  } else if constexpr (std::is_same_v<WT, uint16_t>) {
    return widen_bf16(p);
  } else {
#if MALORA_LANES == 16
    return (VF)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif MALORA_LANES == 8
    return (VF)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
    VB b;
    std::memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, VF);
#endif
  }
}

// Accumulators a block may hold in registers: 32 vector registers on AVX-512 and NEON (whose vectors are 4
// floats: 16 of them), 16 on AVX2.
#if MALORA_LANES == 8
constexpr int kAccumulators = 8;
#else
constexpr int kAccumulators = 16;
#endif
#else
constexpr int kAccumulators = 16;
#endif

// Output rows w[0..J) for R rows of x (float32, row stride ld_x): out[r * ld_out + j].
template <int J, int R, class WT>
void gemv_block_float(const float* x, int64_t ld_x, const WT* w, int64_t in, float* out, int64_t ld_out) {
  int64_t i = 0;
#if defined(MALORA_LANES)
  VF acc[J][R];
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = VF{};
  for (; i + kLanes <= in; i += kLanes) {
    VF xv[R];
    for (int r = 0; r < R; ++r) xv[r] = vload(x + r * ld_x + i);
    for (int j = 0; j < J; ++j) {
      // The next block's rows, one block ahead: each row is a short stream (576 int8 weights are 9 cache lines),
      // too short for the hardware prefetcher to ramp up on by itself.
      __builtin_prefetch(w + (J + j) * in + i, 0, 3);
      const VF wv = load_weights(w + j * in + i);
      for (int r = 0; r < R; ++r) acc[j][r] = vfma(wv, xv[r], acc[j][r]);
    }
  }
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) out[r * ld_out + j] = vsum(acc[j][r]);
#else
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) out[r * ld_out + j] = 0.f;
#endif
  for (; i < in; ++i)  // the tail (all of it in the scalar build)
    for (int j = 0; j < J; ++j)
      for (int r = 0; r < R; ++r) out[r * ld_out + j] += weight_value(w[j * in + i]) * x[r * ld_x + i];
}

#if defined(__AVX512BF16__)
// bfloat16 weights times bfloat16 rows: pairs of exact products summed in float32 by one instruction per 32
// weights, no widening; the tail through a masked load.
template <int J, int R>
void gemv_block_bf16(const uint16_t* x, int64_t ld_x, const uint16_t* w, int64_t in, float* out, int64_t ld_out) {
  __m512 acc[J][R];
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    __m512bh xv[R];
    for (int r = 0; r < R; ++r) xv[r] = (__m512bh)_mm512_loadu_si512(x + r * ld_x + i);
    for (int j = 0; j < J; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (J + j) * in + i), _MM_HINT_T0);  // as in gemv_block_float
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + j * in + i);
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv, xv[r]);
    }
  }
  if (i < in) {
    const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << (in - i)) - 1);
    __m512bh xv[R];
    for (int r = 0; r < R; ++r) xv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * ld_x + i);
    for (int j = 0; j < J; ++j) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + j * in + i);
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv, xv[r]);
    }
  }
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) out[r * ld_out + j] = _mm512_reduce_add_ps(acc[j][r]);
}
#endif

// Output rows [o0, o0 + count) for R rows of x: J at a time (J x R accumulators must fit the registers: on
// AVX-512 8 for one or two rows of x, 4 for more; on AVX2 8, 4, 2, 2), then one at a time.
template <int R, class XT, class WT>
void gemv_rows(const XT* x, int64_t ld_x, const WT* w, int64_t in, int64_t o0, int64_t count, float* out) {
  constexpr int fit = kAccumulators / R;
  constexpr int J = fit >= kOutBlock ? kOutBlock : fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
  for (int64_t j = 0; j < count;) {
    const WT* wj = w + (o0 + j) * in;
    float* oj = out + j;
    const bool full = count - j >= J;
    if constexpr (std::is_same_v<XT, float>) {
      if (full) gemv_block_float<J, R>(x, ld_x, wj, in, oj, kOutBlock);
      else gemv_block_float<1, R>(x, ld_x, wj, in, oj, kOutBlock);
    } else {
#if defined(__AVX512BF16__)
      if (full) gemv_block_bf16<J, R>(x, ld_x, wj, in, oj, kOutBlock);
      else gemv_block_bf16<1, R>(x, ld_x, wj, in, oj, kOutBlock);
#endif
    }
    j += full ? J : 1;
  }
}

// y [rows, out] (row stride ld_y, dtype D) = x [rows, in] (row stride ld_x, dtype D) W^T, W [out, in] of WT.
template <class D, class WT>
void gemv(const typename D::T* x, int64_t ld_x, const WT* w, const float* scales, const float* bias,
          typename D::T* y, int64_t ld_y, int64_t rows, int64_t in, int64_t out, int threads) {
  constexpr bool kPairs =  // bfloat16 rows and weights: the dot-product instruction on x as it is
#if defined(__AVX512BF16__)
      std::is_same_v<typename D::T, uint16_t> && std::is_same_v<WT, uint16_t>;
#else
      false;
#endif
  // Otherwise x as float32 once (a few KiB), so the inner loop reads one layout whatever the rows' dtype.
  std::vector<float> xf(kPairs ? 0 : static_cast<size_t>(rows * in));
  if (!kPairs)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < in; ++i) xf[r * in + i] = D::get(x[r * ld_x + i]);
  constexpr int64_t kChunk = 64;  // output rows per work item
  const int64_t chunks = (out + kChunk - 1) / kChunk;
  // A team only where the weight is large enough to pay for the fork (a few us).
  const int team = out * in >= (1 << 17) ? threads : 1;
#pragma omp parallel num_threads(team)
  {
    float partial[4 * kOutBlock];
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t first = c * kChunk, last = std::min(out, first + kChunk);
      for (int64_t o0 = first; o0 < last; o0 += kOutBlock) {
        const int64_t count = std::min<int64_t>(kOutBlock, last - o0);
        for (int64_t r0 = 0; r0 < rows; r0 += 4) {
          const int64_t n = std::min<int64_t>(4, rows - r0);
          auto block = [&](auto xr, int64_t ld) {
            switch (n) {
              case 1: gemv_rows<1>(xr, ld, w, in, o0, count, partial); break;
              case 2: gemv_rows<2>(xr, ld, w, in, o0, count, partial); break;
              case 3: gemv_rows<3>(xr, ld, w, in, o0, count, partial); break;
              default: gemv_rows<4>(xr, ld, w, in, o0, count, partial); break;
            }
          };
          if constexpr (kPairs) block(reinterpret_cast<const uint16_t*>(x) + r0 * ld_x, ld_x);
          else block(static_cast<const float*>(xf.data()) + r0 * in, in);
          for (int64_t r = 0; r < n; ++r)
            for (int64_t j = 0; j < count; ++j) {
              const float scaled = partial[r * kOutBlock + j] * (scales != nullptr ? scales[o0 + j] : 1.f);
              y[(r0 + r) * ld_y + o0 + j] = D::put(bias != nullptr ? scaled + bias[o0 + j] : scaled);
            }
        }
      }
    }
  }
}

template <class D>
void add_rms_norm(typename D::T* h, const typename D::T* delta, const typename D::T* weight, typename D::T* out,
                  int64_t rows, int64_t dim, float eps) {
  std::vector<float> row(dim);
  for (int64_t i = 0; i < rows; ++i) {
    typename D::T* hi = h + i * dim;
#if defined(MALORA_LANES)
    if (dim % kLanes == 0) {
      VF squares{};
      for (int64_t j = 0; j < dim; j += kLanes) {
        VF v = vload_rows<D>(hi + j);
        if (delta != nullptr) {
          v = vround_rows<D>(v + vload_rows<D>(delta + i * dim + j));
          vstore_rows<D>(hi + j, v);
        }
        vstore(row.data() + j, v);
        squares = vfma(v, v, squares);
      }
      const float inv = 1.f / std::sqrt(vsum(squares) / static_cast<float>(dim) + eps);
      for (int64_t j = 0; j < dim; j += kLanes)
        vstore_rows<D>(out + i * dim + j, vload_rows<D>(weight + j) * vround_rows<D>(vload(row.data() + j) * inv));
      continue;
    }
#endif
    float sum = 0.f;
    for (int64_t j = 0; j < dim; ++j) {
      float v = D::get(hi[j]);
      if (delta != nullptr) {  // the residual add, rounded as the model's own `residual + hidden` is
        v = D::round(v + D::get(delta[i * dim + j]));
        hi[j] = D::put(v);
      }
      row[j] = v;
      sum += v * v;
    }
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
    typename D::T* oi = out + i * dim;
    for (int64_t j = 0; j < dim; ++j) oi[j] = D::put(D::get(weight[j]) * D::round(row[j] * inv));
  }
}

template <class D>
void rotate(typename D::T* x, const typename D::T* cos, const typename D::T* sin, int64_t heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
#if defined(MALORA_LANES)
  if (half % kLanes == 0) {
    for (int64_t h = 0; h < heads; ++h) {
      typename D::T* xh = x + h * head_dim;
      for (int64_t j = 0; j < half; j += kLanes) {
        const VF lo = vload_rows<D>(xh + j), hi = vload_rows<D>(xh + half + j);
        const VF new_lo = vround_rows<D>(lo * vload_rows<D>(cos + j)) + vround_rows<D>(-hi * vload_rows<D>(sin + j));
        const VF new_hi = vround_rows<D>(hi * vload_rows<D>(cos + half + j))
                          + vround_rows<D>(lo * vload_rows<D>(sin + half + j));
        vstore_rows<D>(xh + j, new_lo);
        vstore_rows<D>(xh + half + j, new_hi);
      }
    }
    return;
  }
#endif
  for (int64_t h = 0; h < heads; ++h) {
    typename D::T* xh = x + h * head_dim;
    float rotated[512];
    for (int64_t j = 0; j < head_dim; ++j) {
      const float v = D::get(xh[j]);
      const float partner = j < half ? -D::get(xh[j + half]) : D::get(xh[j - half]);
      rotated[j] = D::round(D::round(v * D::get(cos[j])) + D::round(partner * D::get(sin[j])));
    }
    for (int64_t j = 0; j < head_dim; ++j) xh[j] = D::put(rotated[j]);
  }
}

template <class D>
void rope_store(typename D::T* q, typename D::T* k, const typename D::T* v, const typename D::T* cos,
                const typename D::T* sin, typename D::T* k_cache, typename D::T* v_cache, const int64_t* kv_indices,
                int64_t rows, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t ld_q, int64_t ld_kv) {
  const int64_t kv_width = kv_heads * head_dim;
  for (int64_t i = 0; i < rows; ++i) {
    rotate<D>(q + i * ld_q, cos + i * head_dim, sin + i * head_dim, heads, head_dim);
    rotate<D>(k + i * ld_kv, cos + i * head_dim, sin + i * head_dim, kv_heads, head_dim);
    std::memcpy(k_cache + kv_indices[i] * kv_width, k + i * ld_kv, kv_width * sizeof(typename D::T));
    std::memcpy(v_cache + kv_indices[i] * kv_width, v + i * ld_kv, kv_width * sizeof(typename D::T));
  }
}

#if defined(MALORA_LANES)
// attend_group with head_dim a multiple of kLanes (<= 256): keys and values read as vectors, exps kLanes at a time.
template <class D>
void attend_group_vectors(const typename D::T* q, const typename D::T* k_cache, const typename D::T* v_cache,
                          const int32_t* table, int64_t block_size, int64_t first, int64_t length, int64_t g,
                          int64_t group, int64_t kv_heads, int64_t head_dim, float scale, typename D::T* out,
                          std::vector<float>& scores) {
  constexpr int kMaxVectors = 256 / kLanes;
  const int64_t kv_width = kv_heads * head_dim, span = length - first, nv = head_dim / kLanes;
  const int64_t padded = (span + kLanes - 1) / kLanes * kLanes;
  scores.resize(static_cast<size_t>(group * padded));
  VF query[8][kMaxVectors];
  for (int64_t h = 0; h < group; ++h)
    for (int64_t v = 0; v < nv; ++v) query[h][v] = vload_rows<D>(q + (g * group + h) * head_dim + kLanes * v) * scale;
  for (int64_t p = first; p < length; ++p) {
    const typename D::T* key = k_cache + (static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size)
                                             * kv_width + g * head_dim;
    VF kv[kMaxVectors];
    for (int64_t v = 0; v < nv; ++v) kv[v] = vload_rows<D>(key + kLanes * v);
    for (int64_t h = 0; h < group; ++h) {
      VF acc = query[h][0] * kv[0];
      for (int64_t v = 1; v < nv; ++v) acc = vfma(query[h][v], kv[v], acc);
      scores[h * padded + p - first] = vsum(acc);
    }
  }
  float totals[8];
  for (int64_t h = 0; h < group; ++h) {
    float* s = scores.data() + h * padded;
    for (int64_t p = span; p < padded; ++p) s[p] = -INFINITY;
    VF best = vset(-INFINITY);
    for (int64_t p = 0; p < padded; p += kLanes) best = vmax(best, vload(s + p));
    const VF top = vset(vmaximum(best));
    VF sum{};
    for (int64_t p = 0; p < padded; p += kLanes) {
      const VF e = vexp(vload(s + p) - top);  // the padding's -inf gives 0
      sum += e;
      // SDPA's CPU kernel rounds the unnormalised weights to the rows' dtype before their product with V.
      vstore(s + p, vround_rows<D>(e));
    }
    totals[h] = vsum(sum);
  }
  VF acc[8][kMaxVectors];
  for (int64_t h = 0; h < group; ++h)
    for (int64_t v = 0; v < nv; ++v) acc[h][v] = VF{};
  for (int64_t p = first; p < length; ++p) {
    const typename D::T* value = v_cache + (static_cast<int64_t>(table[p / block_size]) * block_size
                                            + p % block_size) * kv_width + g * head_dim;
    VF vv[kMaxVectors];
    for (int64_t v = 0; v < nv; ++v) vv[v] = vload_rows<D>(value + kLanes * v);
    for (int64_t h = 0; h < group; ++h) {
      const VF w = vset(scores[h * padded + p - first]);
      for (int64_t v = 0; v < nv; ++v) acc[h][v] = vfma(w, vv[v], acc[h][v]);
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    const float inv = 1.f / totals[h];
    for (int64_t v = 0; v < nv; ++v) {
      const VF row = acc[h][v] * inv;
      for (int j = 0; j < kLanes; ++j) out[(g * group + h) * head_dim + kLanes * v + j] = D::put(row[j]);
    }
  }
}
#endif

// One row's `group` query heads that share KV head `g`, over keys [first, length) of its context.
template <class D>
void attend_group(const typename D::T* q, const typename D::T* k_cache, const typename D::T* v_cache,
                  const int32_t* table, int64_t block_size, int64_t first, int64_t length, int64_t g, int64_t group,
                  int64_t kv_heads, int64_t head_dim, float scale, typename D::T* out, std::vector<float>& scores) {
  const int64_t kv_width = kv_heads * head_dim, span = length - first;
  scores.resize(static_cast<size_t>(group * span));
  float query[8][256];
  for (int64_t h = 0; h < group; ++h)
    for (int64_t j = 0; j < head_dim; ++j) query[h][j] = D::get(q[(g * group + h) * head_dim + j]) * scale;
  std::vector<float> maxima(group, -INFINITY);
  for (int64_t p = first; p < length; ++p) {
    const typename D::T* key = k_cache + (static_cast<int64_t>(table[p / block_size]) * block_size + p % block_size)
                                             * kv_width + g * head_dim;
    float kf[256];
    for (int64_t j = 0; j < head_dim; ++j) kf[j] = D::get(key[j]);
    for (int64_t h = 0; h < group; ++h) {
      float dot = 0.f;
      for (int64_t j = 0; j < head_dim; ++j) dot += query[h][j] * kf[j];
      scores[h * span + p - first] = dot;
      maxima[h] = std::max(maxima[h], dot);
    }
  }
  float acc[8][256];
  std::vector<float> totals(group, 0.f);
  for (int64_t h = 0; h < group; ++h) {
    std::fill(acc[h], acc[h] + head_dim, 0.f);
    for (int64_t p = 0; p < span; ++p) {
      const float e = std::exp(scores[h * span + p] - maxima[h]);
      scores[h * span + p] = e;
      totals[h] += e;
    }
  }
  for (int64_t p = first; p < length; ++p) {
    const typename D::T* value = v_cache + (static_cast<int64_t>(table[p / block_size]) * block_size
                                            + p % block_size) * kv_width + g * head_dim;
    float vf[256];
    for (int64_t j = 0; j < head_dim; ++j) vf[j] = D::get(value[j]);
    for (int64_t h = 0; h < group; ++h) {
      // SDPA's CPU kernel rounds the unnormalised weights to the rows' dtype before their product with V.
      const float w = D::round(scores[h * span + p - first]);
      for (int64_t j = 0; j < head_dim; ++j) acc[h][j] += w * vf[j];
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    const float inv = 1.f / totals[h];
    for (int64_t j = 0; j < head_dim; ++j) out[(g * group + h) * head_dim + j] = D::put(acc[h][j] * inv);
  }
}

template <class D>
void decode_attention(const typename D::T* q, const typename D::T* k_cache, const typename D::T* v_cache,
                      const int32_t* tables, int64_t ld_table, const int64_t* lengths, int64_t rows, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t window, float scale,
                      int64_t ld_q, typename D::T* out, int threads) {
  const int64_t group = heads / kv_heads, tasks = rows * kv_heads;
  int64_t work = 0;
  for (int64_t i = 0; i < rows; ++i) work += lengths[i];
  // Fork a team only for enough keys to pay for it (a one-row step of a short context runs on this thread).
  const int team = work * heads * head_dim >= (1 << 18) ? threads : 1;
#pragma omp parallel num_threads(team)
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t i = t / kv_heads, g = t % kv_heads, length = lengths[i];
      const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0;
#if defined(MALORA_LANES)
      if (head_dim % kLanes == 0) {
        attend_group_vectors<D>(q + i * ld_q, k_cache, v_cache, tables + i * ld_table, block_size, first, length,
                                g, group, kv_heads, head_dim, scale, out + i * heads * head_dim, scores);
        continue;
      }
#endif
      attend_group<D>(q + i * ld_q, k_cache, v_cache, tables + i * ld_table, block_size, first, length,
                      g, group, kv_heads, head_dim, scale, out + i * heads * head_dim, scores);
    }
  }
}

template <class D>
void silu_mul(const typename D::T* gate, const typename D::T* up, typename D::T* out, int64_t rows, int64_t width,
              int64_t ld_in) {
  for (int64_t i = 0; i < rows; ++i) {
    int64_t j = 0;
#if defined(MALORA_LANES)
    for (; j + kLanes <= width; j += kLanes) {  // silu(g) = g / (1 + e^-g), rounded, then times up, rounded
      const VF g = vload_rows<D>(gate + i * ld_in + j);
      const VF activated = vround_rows<D>(g / (1.f + vexp(-g)));
      const VF row = activated * vload_rows<D>(up + i * ld_in + j);
      for (int k = 0; k < kLanes; ++k) out[i * width + j + k] = D::put(row[k]);
    }
#endif
    for (; j < width; ++j) {
      const float g = D::get(gate[i * ld_in + j]);
      const float activated = D::round(g / (1.f + std::exp(-g)));
      out[i * width + j] = D::put(activated * D::get(up[i * ld_in + j]));
    }
  }
}


// ---- a whole decoder layer in one call ------------------------------------------------------------------------

// The MALoRA delta kernel's entry point (`malora_delta` in malora_cpu.cpp, a library of its own), called through
// the address the caller passes: y[rows] += the delta of each row's adapter slot.
typedef int (*DeltaKernel)(const void* bank, const void* x, int64_t ldx, void* y, int64_t ldy, int rows_dtype,
                           const int64_t* order, const int64_t* items, int64_t n_items, int64_t block,
                           int64_t* counts, int64_t ld_counts, int num_threads);

struct DeltaCall {  // one adapted projection's delta this step: mirrors decode_ops.DeltaCall
  DeltaKernel kernel;  // null: no delta for this projection this step
  const void* bank;
  const int64_t* order;
  const int64_t* items;
  int64_t n_items, block;
  int64_t* counts;
  int64_t ld_counts;
  int64_t column;  // the projection's first column in its product's output
};

enum Projection { kQ, kK, kV, kO, kGate, kUp, kDown, kProjections };

// A block product's kernel: `malora_block_matmul` of the block library (blocks_cpu.cpp), passed by address.
typedef int (*BlockKernel)(const void* x, int64_t ld_x, const void* w, int64_t format, const float* bias, void* y,
                           int64_t ld_y, int64_t rows, int64_t in, int64_t out, int dtype, int threads);
constexpr int64_t kBlockWeights = 16;  // weight_dtype of a block weight: kBlockWeights + its ggml type id

// A product's weight: [out, in] of weight_dtype (0 float32, 1 bfloat16, 2 int8 with scales, kBlockWeights + t a
// GGUF block format t through block_kernel), bias or null; or, where n_parts > 0, parts side by side (a fused
// product over projections stored in different block formats), each writing its own columns.
struct Product {
  const void* weight;
  const float* scales;
  const float* bias;
  int64_t in, out;
  int64_t weight_dtype;
  BlockKernel block_kernel;
  const Product* parts;
  int64_t n_parts;
};

struct LayerArgs {  // fixed for the model's life: mirrors decode_ops.LayerArgs
  const void* input_norm;
  const void* post_norm;
  void* k_cache;
  void* v_cache;
  Product qkv, o, gate_up, down;
  double eps_in, eps_post, scale;
  int64_t heads, kv_heads, head_dim, intermediate, window;
};

struct StepArgs {  // per step: mirrors decode_ops.StepArgs
  void* hidden;  // [rows, dim], the residual stream, updated in place
  const void* cos;
  const void* sin;
  const int64_t* kv_indices;
  const int32_t* tables;
  const int64_t* lengths;
  // scratch, [rows, width] each: normed (dim), qkv, attended (heads * head_dim), o (dim), gate_up, activated
  void* normed;
  void* qkv;
  void* attended;
  void* o;
  void* gate_up;
  void* activated;
  int64_t rows, dim, ld_table, block_size;
};

template <class D>
void product(const Product& p, const typename D::T* x, typename D::T* y, int64_t ld_y, int64_t rows, int threads) {
  if (p.n_parts > 0) {
    int64_t column = 0;
    for (int64_t i = 0; i < p.n_parts; ++i) {
      product<D>(p.parts[i], x, y + column, ld_y, rows, threads);
      column += p.parts[i].out;
    }
  } else if (p.weight_dtype >= kBlockWeights) {  // shapes and formats were checked when the product was built
    p.block_kernel(x, p.in, p.weight, p.weight_dtype - kBlockWeights, p.bias, y, ld_y, rows, p.in, p.out,
                   std::is_same_v<typename D::T, float> ? 0 : 1, threads);
  } else if (p.weight_dtype == 0) {
    gemv<D>(x, p.in, static_cast<const float*>(p.weight), p.scales, p.bias, y, ld_y, rows, p.in, p.out, threads);
  } else if (p.weight_dtype == 1) {
    gemv<D>(x, p.in, static_cast<const uint16_t*>(p.weight), p.scales, p.bias, y, ld_y, rows, p.in, p.out, threads);
  } else {
    gemv<D>(x, p.in, static_cast<const int8_t*>(p.weight), p.scales, p.bias, y, ld_y, rows, p.in, p.out, threads);
  }
}

// Each adapted projection's delta into its columns of the product's output y (row stride ld_y), x its input.
template <class D>
int add_deltas(const DeltaCall* calls, std::initializer_list<int> which, const typename D::T* x, int64_t ld_x,
               typename D::T* y, int64_t ld_y, int threads) {
  if (calls == nullptr) return 0;
  constexpr int rows_dtype = std::is_same_v<typename D::T, float> ? 0 : 1;
  for (int p : which) {
    const DeltaCall& c = calls[p];
    if (c.kernel == nullptr) continue;
    const int status = c.kernel(c.bank, x, ld_x, y + c.column, ld_y, rows_dtype, c.order, c.items, c.n_items,
                                c.block, c.counts, c.ld_counts, threads);
    if (status != 0) return status;
  }
  return 0;
}

// The layer's sublayers as the per-op path runs them: `delta` (the previous layer's MLP output, or null for the
// first layer) is added into the residual stream first; the layer's own MLP output is left in `out_delta`.
// `calls` (kProjections of them, or null): the MALoRA deltas, each added right after its product. Returns the
// delta kernel's status (0: done).
template <class D>
int decode_layer(const LayerArgs& a, const StepArgs& s, const typename D::T* delta, typename D::T* out_delta,
                 const DeltaCall* calls, int threads) {
  using T = typename D::T;
  const int64_t rows = s.rows, q_width = a.heads * a.head_dim, kv_width = a.kv_heads * a.head_dim;
  T* hidden = static_cast<T*>(s.hidden);
  T* normed = static_cast<T*>(s.normed);
  T* qkv = static_cast<T*>(s.qkv);
  T* attended = static_cast<T*>(s.attended);
  T* gate_up = static_cast<T*>(s.gate_up);
  add_rms_norm<D>(hidden, delta, static_cast<const T*>(a.input_norm), normed, rows, s.dim, static_cast<float>(a.eps_in));
  product<D>(a.qkv, normed, qkv, a.qkv.out, rows, threads);
  int status = add_deltas<D>(calls, {kQ, kK, kV}, normed, s.dim, qkv, a.qkv.out, threads);
  if (status != 0) return status;
  rope_store<D>(qkv, qkv + q_width, qkv + q_width + kv_width, static_cast<const T*>(s.cos),
                static_cast<const T*>(s.sin), static_cast<T*>(a.k_cache), static_cast<T*>(a.v_cache), s.kv_indices, rows,
                a.heads, a.kv_heads, a.head_dim, a.qkv.out, a.qkv.out);
  decode_attention<D>(qkv, static_cast<const T*>(a.k_cache), static_cast<const T*>(a.v_cache), s.tables, s.ld_table,
                      s.lengths, rows, a.heads, a.kv_heads, a.head_dim, s.block_size, a.window,
                      static_cast<float>(a.scale), a.qkv.out, attended, threads);
  product<D>(a.o, attended, static_cast<T*>(s.o), a.o.out, rows, threads);
  status = add_deltas<D>(calls, {kO}, attended, q_width, static_cast<T*>(s.o), a.o.out, threads);
  if (status != 0) return status;
  add_rms_norm<D>(hidden, static_cast<const T*>(s.o), static_cast<const T*>(a.post_norm), normed, rows, s.dim,
                  static_cast<float>(a.eps_post));
  product<D>(a.gate_up, normed, gate_up, a.gate_up.out, rows, threads);
  status = add_deltas<D>(calls, {kGate, kUp}, normed, s.dim, gate_up, a.gate_up.out, threads);
  if (status != 0) return status;
  silu_mul<D>(gate_up, gate_up + a.intermediate, static_cast<T*>(s.activated), rows, a.intermediate, a.gate_up.out);
  product<D>(a.down, static_cast<const T*>(s.activated), out_delta, a.down.out, rows, threads);
  return add_deltas<D>(calls, {kDown}, static_cast<const T*>(s.activated), a.intermediate, out_delta, a.down.out,
                       threads);
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16. Every entry returns 0, or -1 for a dtype or shape it does not take.

int malora_add_rms_norm(void* h, const void* delta, const void* weight, void* out, int64_t rows, int64_t dim,
                        float eps, int dtype) {
  if (dtype == 0)
    add_rms_norm<F32>(static_cast<float*>(h), static_cast<const float*>(delta), static_cast<const float*>(weight),
                      static_cast<float*>(out), rows, dim, eps);
  else if (dtype == 1)
    add_rms_norm<BF16>(static_cast<uint16_t*>(h), static_cast<const uint16_t*>(delta),
                       static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(out), rows, dim, eps);
  else
    return -1;
  return 0;
}

int malora_rope_store(void* q, void* k, const void* v, const void* cos, const void* sin, void* k_cache,
                      void* v_cache, const int64_t* kv_indices, int64_t rows, int64_t heads, int64_t kv_heads,
                      int64_t head_dim, int64_t ld_q, int64_t ld_kv, int dtype) {
  if (head_dim > 512 || head_dim % 2) return -1;
  if (dtype == 0)
    rope_store<F32>(static_cast<float*>(q), static_cast<float*>(k), static_cast<const float*>(v),
                    static_cast<const float*>(cos), static_cast<const float*>(sin), static_cast<float*>(k_cache),
                    static_cast<float*>(v_cache), kv_indices, rows, heads, kv_heads, head_dim, ld_q, ld_kv);
  else if (dtype == 1)
    rope_store<BF16>(static_cast<uint16_t*>(q), static_cast<uint16_t*>(k), static_cast<const uint16_t*>(v),
                     static_cast<const uint16_t*>(cos), static_cast<const uint16_t*>(sin),
                     static_cast<uint16_t*>(k_cache), static_cast<uint16_t*>(v_cache), kv_indices, rows, heads, kv_heads,
                     head_dim, ld_q, ld_kv);
  else
    return -1;
  return 0;
}

int malora_decode_attention(const void* q, int64_t ld_q, const void* k_cache, const void* v_cache,
                            const int32_t* tables, int64_t ld_table, const int64_t* lengths, int64_t rows,
                            int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t window,
                            float scale, void* out, int dtype, int threads) {
  if (head_dim > 256 || kv_heads <= 0 || heads % kv_heads || heads / kv_heads > 8) return -1;
  if (dtype == 0)
    decode_attention<F32>(static_cast<const float*>(q), static_cast<const float*>(k_cache),
                          static_cast<const float*>(v_cache), tables, ld_table, lengths, rows, heads, kv_heads,
                          head_dim, block_size, window, scale, ld_q, static_cast<float*>(out), threads);
  else if (dtype == 1)
    decode_attention<BF16>(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k_cache),
                           static_cast<const uint16_t*>(v_cache), tables, ld_table, lengths, rows, heads, kv_heads,
                           head_dim, block_size, window, scale, ld_q, static_cast<uint16_t*>(out), threads);
  else
    return -1;
  return 0;
}

int malora_silu_mul(const void* gate, const void* up, void* out, int64_t rows, int64_t width, int64_t ld_in,
                    int dtype) {
  if (dtype == 0)
    silu_mul<F32>(static_cast<const float*>(gate), static_cast<const float*>(up), static_cast<float*>(out), rows,
                  width, ld_in);
  else if (dtype == 1)
    silu_mul<BF16>(static_cast<const uint16_t*>(gate), static_cast<const uint16_t*>(up), static_cast<uint16_t*>(out),
                   rows, width, ld_in);
  else
    return -1;
  return 0;
}

// weight_dtype: 0 float32, 1 bfloat16, 2 int8 (then `scales` [out] float32 multiply each output; else null);
// bias [out] float32 or null.
int malora_gemv(const void* x, int64_t ld_x, const void* w, int weight_dtype, const float* scales,
                const float* bias, void* y, int64_t ld_y, int64_t rows, int64_t in, int64_t out, int dtype,
                int threads) {
  if (rows < 0 || in < 1 || out < 0) return -1;
  auto run = [&](auto d) {
    using D = decltype(d);
    const auto* xt = static_cast<const typename D::T*>(x);
    auto* yt = static_cast<typename D::T*>(y);
    if (weight_dtype == 0)
      gemv<D>(xt, ld_x, static_cast<const float*>(w), scales, bias, yt, ld_y, rows, in, out, threads);
    else if (weight_dtype == 1)
      gemv<D>(xt, ld_x, static_cast<const uint16_t*>(w), scales, bias, yt, ld_y, rows, in, out, threads);
    else
      gemv<D>(xt, ld_x, static_cast<const int8_t*>(w), scales, bias, yt, ld_y, rows, in, out, threads);
  };
  if (weight_dtype < 0 || weight_dtype > 2) return -1;
  if (dtype == 0) run(F32{});
  else if (dtype == 1) run(BF16{});
  else return -1;
  return 0;
}

// Returns 0, -1 for a dtype it does not take, or the delta kernel's nonzero status.
int malora_decode_layer(const LayerArgs* layer, const StepArgs* step, const void* delta, void* out_delta,
                        const DeltaCall* calls, int dtype, int threads) {
  if (dtype == 0)
    return decode_layer<F32>(*layer, *step, static_cast<const float*>(delta), static_cast<float*>(out_delta), calls,
                             threads);
  if (dtype == 1)
    return decode_layer<BF16>(*layer, *step, static_cast<const uint16_t*>(delta), static_cast<uint16_t*>(out_delta),
                              calls, threads);
  return -1;
}

int malora_decode_abi_version() { return 5; }

// Floats per vector of the build's vector paths; 0 for the scalar build (its plain loops).
int malora_decode_lanes() {
#if defined(MALORA_LANES)
  return MALORA_LANES;
#else
  return 0;
#endif
}

}  // extern "C"
