// Products over a GGUF file's quantized blocks as they are stored: y = x W^T (+ bias), W [out, in] in one of
// llama.cpp's block formats, x and y float32 or bfloat16 rows. Weight-only: the blocks are de-quantized inside the
// kernel into float32 (a tile of a few output rows at a time, in L1) and multiplied by float32 activations, so the
// result is the float engine's on the de-quantized weights up to the order of summation. No float copy of the
// model is ever made.
//
// Formats (ggml's type ids, which the Python side passes as they are):
//   2 Q4_0  32 values in 18 bytes: fp16 d, 16 bytes of nibbles;              w = d (q - 8)
//   3 Q4_1  32 values in 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles;      w = d q + m
//   6 Q5_0  32 values in 22 bytes: fp16 d, 32 high bits, 16 bytes of nibbles; w = d (q - 16)
//   7 Q5_1  32 values in 24 bytes: fp16 d, fp16 m, 32 high bits, nibbles;    w = d q + m
//   8 Q8_0  32 values in 34 bytes: fp16 d, 32 int8;                          w = d q
//  12 Q4_K 256 values in 144 bytes: fp16 d, dmin, 8 six-bit (scale, min) pairs, 128 bytes of nibbles
//  13 Q5_K 256 values in 176 bytes: as Q4_K with 32 bytes of fifth bits
//  14 Q6_K 256 values in 210 bytes: 128 bytes of low nibbles, 64 of high pairs, 16 int8 scales, fp16 d
//
// Order of summation: each output is summed over `in` in vector lanes (lane l takes the columns = l mod lanes),
// tile by tile of KC columns, and the lanes are added at the end; it does not depend on how many rows x has nor
// on the thread count, so a row's result is the same in a batch of any size (seeded sampling relies on it).
// The scalar build (no vector type) sums each output in column order: the reference every vector level is
// tested against.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "numeric.h"
#include "vectors.h"

namespace {

using malora::BF16;
using malora::F32;
using malora::float_to_bf16;

inline float fp16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return malora::half_to_float(h);
}

// ---- de-quantizing one block into float32 ----------------------------------------------------------------------
// The 32-value formats as 16-lane generic vectors (GCC lowers them to two AVX2 registers, one AVX-512 register or
// four NEON ones); the scalar build and the K-quants as plain loops of fixed length.

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

#if defined(MALORA_LANES)
// In vectors of the level's own width: GCC lowers wider generic vectors (16 floats on AVX2) through the stack, which
// ran the AVX2 products 20x slower than these.
constexpr int kPerHalf = 16 / kLanes;  // vectors per 16 values of a block
typedef uint8_t U8x16 __attribute__((vector_size(16)));
inline VU lane_index() {  // {0, 1, ..., kLanes - 1}: folded to a constant
  VU v{};
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<uint32_t>(l);
  return v;
}

inline U8x16 bytes_at(const uint8_t* p) {
  U8x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 16 bytes as kPerHalf vectors of int32, zero- or sign-extended. Intrinsics: GCC's generic conversion of bytes went
// through scalar code (vcvtsi2ss per value) and ran the Q8_0 product 2x slower than a float32 one.
template <bool kSigned>
inline void widen(U8x16 v, VI* out) {
#if MALORA_LANES == 16
  out[0] = (VI)(kSigned ? _mm512_cvtepi8_epi32((__m128i)v) : _mm512_cvtepu8_epi32((__m128i)v));
#elif MALORA_LANES == 8
  const __m128i low = (__m128i)v, high = _mm_srli_si128(low, 8);
  out[0] = (VI)(kSigned ? _mm256_cvtepi8_epi32(low) : _mm256_cvtepu8_epi32(low));
  out[1] = (VI)(kSigned ? _mm256_cvtepi8_epi32(high) : _mm256_cvtepu8_epi32(high));
#else
  const uint8x16_t b = (uint8x16_t)v;
  if (kSigned) {
    const int16x8_t low = vmovl_s8(vget_low_s8(vreinterpretq_s8_u8(b))), high = vmovl_s8(vget_high_s8(vreinterpretq_s8_u8(b)));
    out[0] = (VI)vmovl_s16(vget_low_s16(low));
    out[1] = (VI)vmovl_s16(vget_high_s16(low));
    out[2] = (VI)vmovl_s16(vget_low_s16(high));
    out[3] = (VI)vmovl_s16(vget_high_s16(high));
  } else {
    const uint16x8_t low = vmovl_u8(vget_low_u8(b)), high = vmovl_u8(vget_high_u8(b));
    out[0] = (VI)vmovl_u16(vget_low_u16(low));
    out[1] = (VI)vmovl_u16(vget_high_u16(low));
    out[2] = (VI)vmovl_u16(vget_low_u16(high));
    out[3] = (VI)vmovl_u16(vget_high_u16(high));
  }
#endif
}

// out[0..16) = d * q + m from 16 integers in kPerHalf vectors.
inline void store_affine(float* out, const VI* q, float d, float m) {
  for (int i = 0; i < kPerHalf; ++i) vstore(out + i * kLanes, __builtin_convertvector(q[i], VF) * d + m);
}

// A 32-value block's nibbles: values [0, 16) in the low ones, [16, 32) in the high ones.
inline void nibbles(const uint8_t* p, VI* low, VI* high) {
  const U8x16 q = bytes_at(p);
  widen<false>(q & 15, low);
  widen<false>(q >> 4, high);
}

// The fifth bits of a Q5 block's values [first, first + 16), as 0 or 16, added into q.
inline void add_fifth_bits(uint32_t bits, uint32_t first, VI* q) {
  for (int i = 0; i < kPerHalf; ++i)
    q[i] |= (VI)((((VU{} + bits) >> (lane_index() + (first + i * kLanes))) & 1u) << 4);  // shifts < 32
}

inline void dequantize_q4_0(const uint8_t* b, float* out) {
  VI low[kPerHalf], high[kPerHalf];
  nibbles(b + 2, low, high);
  for (int i = 0; i < kPerHalf; ++i) {
    low[i] -= 8;
    high[i] -= 8;
  }
  const float d = fp16_at(b);
  store_affine(out, low, d, 0.f);
  store_affine(out + 16, high, d, 0.f);
}

inline void dequantize_q4_1(const uint8_t* b, float* out) {
  VI low[kPerHalf], high[kPerHalf];
  nibbles(b + 4, low, high);
  const float d = fp16_at(b), m = fp16_at(b + 2);
  store_affine(out, low, d, m);
  store_affine(out + 16, high, d, m);
}

inline void dequantize_q5_0(const uint8_t* b, float* out) {
  VI low[kPerHalf], high[kPerHalf];
  nibbles(b + 6, low, high);
  const uint32_t bits = u32_at(b + 2);
  add_fifth_bits(bits, 0, low);
  add_fifth_bits(bits, 16, high);
  for (int i = 0; i < kPerHalf; ++i) {
    low[i] -= 16;
    high[i] -= 16;
  }
  const float d = fp16_at(b);
  store_affine(out, low, d, 0.f);
  store_affine(out + 16, high, d, 0.f);
}

inline void dequantize_q5_1(const uint8_t* b, float* out) {
  VI low[kPerHalf], high[kPerHalf];
  nibbles(b + 8, low, high);
  const uint32_t bits = u32_at(b + 4);
  add_fifth_bits(bits, 0, low);
  add_fifth_bits(bits, 16, high);
  const float d = fp16_at(b), m = fp16_at(b + 2);
  store_affine(out, low, d, m);
  store_affine(out + 16, high, d, m);
}

inline void dequantize_q8_0(const uint8_t* b, float* out) {
  VI low[kPerHalf], high[kPerHalf];
  widen<true>(bytes_at(b + 2), low);
  widen<true>(bytes_at(b + 18), high);
  const float d = fp16_at(b);
  store_affine(out, low, d, 0.f);
  store_affine(out + 16, high, d, 0.f);
}
#else
inline void dequantize_q4_0(const uint8_t* b, float* out) {
  const float d = fp16_at(b);
  const uint8_t* q = b + 2;
  for (int j = 0; j < 16; ++j) {
    out[j] = d * static_cast<float>((q[j] & 0x0f) - 8);
    out[j + 16] = d * static_cast<float>((q[j] >> 4) - 8);
  }
}

inline void dequantize_q4_1(const uint8_t* b, float* out) {
  const float d = fp16_at(b), m = fp16_at(b + 2);
  const uint8_t* q = b + 4;
  for (int j = 0; j < 16; ++j) {
    out[j] = d * static_cast<float>(q[j] & 0x0f) + m;
    out[j + 16] = d * static_cast<float>(q[j] >> 4) + m;
  }
}

inline void dequantize_q5_0(const uint8_t* b, float* out) {
  const float d = fp16_at(b);
  const uint32_t high = u32_at(b + 2);
  const uint8_t* q = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int low = (q[j] & 0x0f) | static_cast<int>(((high >> j) << 4) & 0x10);
    const int up = (q[j] >> 4) | static_cast<int>((high >> (j + 12)) & 0x10);
    out[j] = d * static_cast<float>(low - 16);
    out[j + 16] = d * static_cast<float>(up - 16);
  }
}

inline void dequantize_q5_1(const uint8_t* b, float* out) {
  const float d = fp16_at(b), m = fp16_at(b + 2);
  const uint32_t high = u32_at(b + 4);
  const uint8_t* q = b + 8;
  for (int j = 0; j < 16; ++j) {
    const int low = (q[j] & 0x0f) | static_cast<int>(((high >> j) << 4) & 0x10);
    const int up = (q[j] >> 4) | static_cast<int>((high >> (j + 12)) & 0x10);
    out[j] = d * static_cast<float>(low) + m;
    out[j + 16] = d * static_cast<float>(up) + m;
  }
}

inline void dequantize_q8_0(const uint8_t* b, float* out) {
  const float d = fp16_at(b);
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(q[j]);
}
#endif

// The K-quants' sub-block j of 8: six-bit scale and min, packed in 12 bytes.
inline void scale_min_k4(int j, const uint8_t* s, int& scale, int& min) {
  if (j < 4) {
    scale = s[j] & 63;
    min = s[j + 4] & 63;
  } else {
    scale = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
    min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

inline void dequantize_q4_k(const uint8_t* b, float* out) {
  const float d = fp16_at(b), dmin = fp16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int part = 0; part < 4; ++part, q += 32, out += 64) {
    int s0, m0, s1, m1;
    scale_min_k4(2 * part, scales, s0, m0);
    scale_min_k4(2 * part + 1, scales, s1, m1);
    const float d0 = d * static_cast<float>(s0), n0 = dmin * static_cast<float>(m0);
    const float d1 = d * static_cast<float>(s1), n1 = dmin * static_cast<float>(m1);
    for (int l = 0; l < 32; ++l) {
      out[l] = d0 * static_cast<float>(q[l] & 0x0f) - n0;
      out[l + 32] = d1 * static_cast<float>(q[l] >> 4) - n1;
    }
  }
}

inline void dequantize_q5_k(const uint8_t* b, float* out) {
  const float d = fp16_at(b), dmin = fp16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* high = b + 16;
  const uint8_t* q = b + 48;
  for (int part = 0; part < 4; ++part, q += 32, out += 64) {
    int s0, m0, s1, m1;
    scale_min_k4(2 * part, scales, s0, m0);
    scale_min_k4(2 * part + 1, scales, s1, m1);
    const float d0 = d * static_cast<float>(s0), n0 = dmin * static_cast<float>(m0);
    const float d1 = d * static_cast<float>(s1), n1 = dmin * static_cast<float>(m1);
    const int bit0 = 2 * part, bit1 = 2 * part + 1;
    for (int l = 0; l < 32; ++l) {
      out[l] = d0 * static_cast<float>((q[l] & 0x0f) | (((high[l] >> bit0) & 1) << 4)) - n0;
      out[l + 32] = d1 * static_cast<float>((q[l] >> 4) | (((high[l] >> bit1) & 1) << 4)) - n1;
    }
  }
}

inline void dequantize_q6_k(const uint8_t* b, float* out) {
  const uint8_t* low = b;
  const uint8_t* high = b + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  const float d = fp16_at(b + 208);
  for (int half = 0; half < 2; ++half, low += 64, high += 32, scales += 8, out += 128) {
    for (int l = 0; l < 32; ++l) {
      const int group = l / 16;
      const int q1 = ((low[l] & 0x0f) | (((high[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((low[l + 32] & 0x0f) | (((high[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((low[l] >> 4) | (((high[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((low[l + 32] >> 4) | (((high[l] >> 6) & 3) << 4)) - 32;
      out[l] = d * static_cast<float>(scales[group]) * static_cast<float>(q1);
      out[l + 32] = d * static_cast<float>(scales[group + 2]) * static_cast<float>(q2);
      out[l + 64] = d * static_cast<float>(scales[group + 4]) * static_cast<float>(q3);
      out[l + 96] = d * static_cast<float>(scales[group + 6]) * static_cast<float>(q4);
    }
  }
}

// A format as a type: the product's loops are instantiated per format, so each block's de-quantization inlines.
template <int64_t kType, int kValues, int kBytes, void (*kDequantize)(const uint8_t*, float*)>
struct Blocks {
  static constexpr int64_t type = kType;
  static constexpr int values = kValues, bytes = kBytes;
  // Columns [first, first + count) of one stored row (both multiples of the block) into out.
  static void span(const uint8_t* row, int64_t first, int64_t count, float* out) {
    const uint8_t* block = row + first / values * bytes;
    for (int64_t done = 0; done < count; done += values, block += bytes) kDequantize(block, out + done);
  }
};

using Q4_0 = Blocks<2, 32, 18, dequantize_q4_0>;
using Q4_1 = Blocks<3, 32, 20, dequantize_q4_1>;
using Q5_0 = Blocks<6, 32, 22, dequantize_q5_0>;
using Q5_1 = Blocks<7, 32, 24, dequantize_q5_1>;
using Q8_0 = Blocks<8, 32, 34, dequantize_q8_0>;
using Q4_K = Blocks<12, 256, 144, dequantize_q4_k>;
using Q5_K = Blocks<13, 256, 176, dequantize_q5_k>;
using Q6_K = Blocks<14, 256, 210, dequantize_q6_k>;

// run(F{}) with F the format of ggml type id `type`; false for an id this library does not read.
template <class Run>
bool with_format(int64_t type, Run&& run) {
  switch (type) {
    case Q4_0::type: run(Q4_0{}); return true;
    case Q4_1::type: run(Q4_1{}); return true;
    case Q5_0::type: run(Q5_0{}); return true;
    case Q5_1::type: run(Q5_1{}); return true;
    case Q8_0::type: run(Q8_0{}); return true;
    case Q4_K::type: run(Q4_K{}); return true;
    case Q5_K::type: run(Q5_K{}); return true;
    case Q6_K::type: run(Q6_K{}); return true;
    default: return false;
  }
}

// ---- the product ------------------------------------------------------------------------------------------------
constexpr int kTileRows = 8;     // output rows de-quantized together
constexpr int64_t kTileK = 1024;  // columns per de-quantized tile at most: 8 x 1024 floats = 32 KiB
constexpr int64_t kRowBlock = 64;  // rows of x per pass over a tile (their float32 copy stays in L2)

#if defined(MALORA_LANES)
#if MALORA_LANES == 8
constexpr int kAccumulators = 8;  // AVX2: 16 registers, half of them for accumulators
#else
constexpr int kAccumulators = 16;  // AVX-512 and NEON: 32 registers
#endif

// Keeps v in a register from here on: GCC otherwise folds a vector it loaded into each multiply-add that reads it
// as a memory operand, loading it again for each (J x R loads a step where R + J do), which made the tile's
// products wait on loads.
inline void in_register(VF& v) {
#if defined(__x86_64__)
  asm("" : "+v"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
}

// acc[r][j] += w[j][0..k) * x[r][0..k), J rows of the de-quantized tile (row stride kTileK) times R rows of x.
template <int J, int R>
inline void dot_tile(const float* w, const float* x, int64_t ld_x, int64_t k, VF* acc, int ld_acc) {
  VF a[J][R];
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) a[j][r] = acc[r * ld_acc + j];
  for (int64_t i = 0; i < k; i += kLanes) {
    VF xv[R];
    for (int r = 0; r < R; ++r) {
      xv[r] = vload(x + r * ld_x + i);
      in_register(xv[r]);
    }
    for (int j = 0; j < J; ++j) {
      VF wv = vload(w + j * kTileK + i);
      in_register(wv);
      for (int r = 0; r < R; ++r) a[j][r] = vfma(wv, xv[r], a[j][r]);
    }
  }
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) acc[r * ld_acc + j] = a[j][r];
}

// R rows of x against the tile's `rows` output rows, J at a time so J x R accumulators fit the registers.
template <int R>
void dot_rows(const float* w, int rows, const float* x, int64_t ld_x, int64_t k, VF* acc) {
  constexpr int fit = kAccumulators / R;
  constexpr int J = fit >= kTileRows ? kTileRows : fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
  int j = 0;
  for (; j + J <= rows; j += J) dot_tile<J, R>(w + j * kTileK, x, ld_x, k, acc + j, kTileRows);
  for (; j < rows; ++j) dot_tile<1, R>(w + j * kTileK, x, ld_x, k, acc + j, kTileRows);
}
#endif

// y rows [m0, m0 + rows) x output rows [n0, n0 + tile_rows): the tile de-quantized kTileK columns at a time.
template <class D, class F>
void tile_product(const float* xf, int64_t in, const uint8_t* w, int64_t row_bytes, const float* bias, typename D::T* y, int64_t ld_y, int64_t m0, int64_t rows, int64_t n0,
                  int tile_rows, float* tile) {
#if defined(MALORA_LANES)
  VF acc[kRowBlock * kTileRows];
  for (int64_t i = 0; i < rows * kTileRows; ++i) acc[i] = VF{};
#else
  float acc[kRowBlock * kTileRows] = {};
#endif
  // Columns in even chunks of at most kTileK, each a whole number of blocks: a short last chunk would pay the
  // accumulators' loads and stores for a few products. The order of the sums does not depend on the chunks.
  const int64_t chunks = (in + kTileK - 1) / kTileK;
  const int64_t chunk = ((in + chunks - 1) / chunks + F::values - 1) / F::values * F::values;
  for (int64_t k0 = 0; k0 < in; k0 += chunk) {
    const int64_t k = std::min(chunk, in - k0);
    for (int j = 0; j < tile_rows; ++j) F::span(w + (n0 + j) * row_bytes, k0, k, tile + j * kTileK);
    const float* x = xf + m0 * in + k0;
#if defined(MALORA_LANES)
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) dot_rows<4>(tile, tile_rows, x + r * in, in, k, acc + r * kTileRows);
    switch (rows - r) {
      case 3: dot_rows<3>(tile, tile_rows, x + r * in, in, k, acc + r * kTileRows); break;
      case 2: dot_rows<2>(tile, tile_rows, x + r * in, in, k, acc + r * kTileRows); break;
      case 1: dot_rows<1>(tile, tile_rows, x + r * in, in, k, acc + r * kTileRows); break;
      default: break;
    }
#else
    for (int64_t r = 0; r < rows; ++r)
      for (int j = 0; j < tile_rows; ++j) {
        float sum = acc[r * kTileRows + j];
        for (int64_t i = 0; i < k; ++i) sum += tile[j * kTileK + i] * x[r * in + i];
        acc[r * kTileRows + j] = sum;
      }
#endif
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < tile_rows; ++j) {
#if defined(MALORA_LANES)
      const float sum = vsum(acc[r * kTileRows + j]);
#else
      const float sum = acc[r * kTileRows + j];
#endif
      y[(m0 + r) * ld_y + n0 + j] = D::put(bias != nullptr ? sum + bias[n0 + j] : sum);
    }
}

#if defined(MALORA_LANES)
// The same sums for a few rows of x (decode) without the tile: each block is de-quantized into registers and
// multiplied at once, so the weights pass through the core once with no store and reload (the tile's round trip
// through L1 cost more than the product at one row). J output rows x R rows of x, accumulated in the tile path's
// order (lane by lane along the row, the lanes summed at the end): a row's result is the same either way.
template <class F, int J, int R>
inline void fused_rows(const uint8_t* w, int64_t row_bytes, const float* x, int64_t in, float* sums) {
  VF acc[J][R];
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = VF{};
  alignas(64) float block[F::values];
  for (int64_t k0 = 0; k0 < in; k0 += F::values) {
    const uint8_t* b = w + k0 / F::values * F::bytes;
    for (int j = 0; j < J; ++j) {
      F::span(b + j * row_bytes, 0, F::values, block);
      for (int i = 0; i < F::values; i += kLanes) {
        const VF wv = vload(block + i);
        for (int r = 0; r < R; ++r) acc[j][r] = vfma(wv, vload(x + r * in + k0 + i), acc[j][r]);
      }
    }
  }
  for (int j = 0; j < J; ++j)
    for (int r = 0; r < R; ++r) sums[r * kTileRows + j] = vsum(acc[j][r]);
}

template <class F, int R>
void fused_tile(const uint8_t* w, int64_t row_bytes, const float* x, int64_t in, int tile_rows, float* sums) {
  constexpr int fit = kAccumulators / R;
  constexpr int J = fit >= kTileRows ? kTileRows : fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
  int j = 0;
  for (; j + J <= tile_rows; j += J) fused_rows<F, J, R>(w + j * row_bytes, row_bytes, x, in, sums + j);
  for (; j < tile_rows; ++j) fused_rows<F, 1, R>(w + j * row_bytes, row_bytes, x, in, sums + j);
}

// Up to 4 rows of x [m0, m0 + rows) against output rows [n0, n0 + tile_rows).
template <class D, class F>
void fused_product(const float* xf, int64_t in, const uint8_t* w, int64_t row_bytes, const float* bias,
                   typename D::T* y, int64_t ld_y, int64_t m0, int64_t rows, int64_t n0, int tile_rows) {
  float sums[4 * kTileRows];
  const uint8_t* tile = w + n0 * row_bytes;
  const float* x = xf + m0 * in;
  switch (rows) {
    case 1: fused_tile<F, 1>(tile, row_bytes, x, in, tile_rows, sums); break;
    case 2: fused_tile<F, 2>(tile, row_bytes, x, in, tile_rows, sums); break;
    case 3: fused_tile<F, 3>(tile, row_bytes, x, in, tile_rows, sums); break;
    default: fused_tile<F, 4>(tile, row_bytes, x, in, tile_rows, sums); break;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < tile_rows; ++j) {
      const float sum = sums[r * kTileRows + j];
      y[(m0 + r) * ld_y + n0 + j] = D::put(bias != nullptr ? sum + bias[n0 + j] : sum);
    }
}
#endif

// y [rows, out] (row stride ld_y) = x [rows, in] (row stride ld_x) W^T (+ bias), W [out, in] in blocks of `f`.
template <class D, class F>
void block_matmul(const typename D::T* x, int64_t ld_x, const uint8_t* w, const float* bias,
                  typename D::T* y, int64_t ld_y, int64_t rows, int64_t in, int64_t out, int threads) {
  const int64_t row_bytes = in / F::values * F::bytes;
  // x as contiguous float32 rows, which every tile reads as vectors: as it is where it already is, else one copy.
  std::vector<float> copy;
  const float* xf = nullptr;
  if constexpr (std::is_same_v<typename D::T, float>) {
    if (ld_x == in) xf = x;
  }
  if (xf == nullptr) {
    copy.resize(static_cast<size_t>(rows * in));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < in; ++i) copy[r * in + i] = D::get(x[r * ld_x + i]);
    xf = copy.data();
  }
  const int64_t tiles = (out + kTileRows - 1) / kTileRows;
  // A team only where the work pays for the fork (a few us).
  const int team = out * in * std::max<int64_t>(rows, 1) >= (1 << 17) ? threads : 1;
#pragma omp parallel num_threads(team)
  {
    std::vector<float> tile(kTileRows * kTileK);
    for (int64_t m0 = 0; m0 < rows; m0 += kRowBlock) {
      const int64_t count = std::min(kRowBlock, rows - m0);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * kTileRows;
        const int tile_rows = static_cast<int>(std::min<int64_t>(kTileRows, out - n0));
#if defined(MALORA_LANES)
        if (count <= 4) {
          fused_product<D, F>(xf, in, w, row_bytes, bias, y, ld_y, m0, count, n0, tile_rows);
          continue;
        }
#endif
        tile_product<D, F>(xf, in, w, row_bytes, bias, y, ld_y, m0, count, n0, tile_rows, tile.data());
      }
    }
  }
}

}  // namespace

extern "C" {

// Every entry returns 0, or -1 for a format, dtype or shape it does not take (`in` must be a multiple of the
// format's block). dtype: 0 float32, 1 bfloat16 (x and y).

int malora_block_matmul(const void* x, int64_t ld_x, const void* w, int64_t format, const float* bias, void* y,
                        int64_t ld_y, int64_t rows, int64_t in, int64_t out, int dtype, int threads) {
  if (rows < 0 || out < 0 || in < 1 || (dtype != 0 && dtype != 1)) return -1;
  int status = 0;
  const bool known = with_format(format, [&](auto f) {
    using F = decltype(f);
    if (in % F::values) {
      status = -1;
      return;
    }
    const auto* blocks = static_cast<const uint8_t*>(w);
    if (dtype == 0)
      block_matmul<F32, F>(static_cast<const float*>(x), ld_x, blocks, bias, static_cast<float*>(y), ld_y, rows,
                           in, out, threads);
    else
      block_matmul<BF16, F>(static_cast<const uint16_t*>(x), ld_x, blocks, bias, static_cast<uint16_t*>(y), ld_y,
                            rows, in, out, threads);
  });
  return known ? status : -1;
}

// out [count, in] (dtype) = the stored rows ids[0..count) of W [out_rows, in], de-quantized: an embedding lookup.
// Ids outside [0, out_rows) return -2 before anything is written.
int malora_block_rows(const void* w, int64_t format, int64_t in, int64_t out_rows, const int64_t* ids,
                      int64_t count, void* out, int dtype, int threads) {
  if (in < 1 || (dtype != 0 && dtype != 1)) return -1;
  for (int64_t i = 0; i < count; ++i)
    if (ids[i] < 0 || ids[i] >= out_rows) return -2;
  int status = 0;
  const bool known = with_format(format, [&](auto f) {
    using F = decltype(f);
    if (in % F::values) {
      status = -1;
      return;
    }
    const int64_t row_bytes = in / F::values * F::bytes;
    const int team = count * in >= (1 << 16) ? threads : 1;  // a whole weight (the wide products) in parallel
#pragma omp parallel num_threads(team)
    {
      std::vector<float> row(static_cast<size_t>(in));
#pragma omp for schedule(static)
      for (int64_t i = 0; i < count; ++i) {
        F::span(static_cast<const uint8_t*>(w) + ids[i] * row_bytes, 0, in, row.data());
        if (dtype == 0)
          std::memcpy(static_cast<float*>(out) + i * in, row.data(), in * sizeof(float));
        else
          for (int64_t c = 0; c < in; ++c) static_cast<uint16_t*>(out)[i * in + c] = float_to_bf16(row[c]);
      }
    }
  });
  return known ? status : -1;
}

// Values and bytes per block of a format (-1 for one this library does not read): the Python side checks its own
// table against these.
int malora_block_format(int64_t format, int64_t* values, int64_t* bytes) {
  *values = *bytes = 0;
  const bool known = with_format(format, [&](auto f) {
    *values = decltype(f)::values;
    *bytes = decltype(f)::bytes;
  });
  return known ? 0 : -1;
}

int malora_blocks_abi_version() { return 2; }

int malora_blocks_lanes() {
#if defined(MALORA_LANES)
  return MALORA_LANES;
#else
  return 0;
#endif
}

}  // extern "C"
