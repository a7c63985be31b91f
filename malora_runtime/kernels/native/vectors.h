// The vector paths' register: one of the widest instruction set a library is built for (the build picks the level:
// -march per level, `cpu_features.py`), as GCC vector types, so one source serves AVX-512 (16 floats), AVX2 with FMA
// (8) and NEON (4); the operations GCC has no operator for (fused multiply-add here) are intrinsics. A build with
// none of them (the scalar level) leaves MALORA_LANES undefined and its sources take their plain loops: the
// reference every vector level is tested against. Each library is one translation unit, so what is defined here is
// internal to it.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#if defined(__AVX512F__)
#define MALORA_LANES 16
#elif defined(__AVX2__) && defined(__FMA__)
#define MALORA_LANES 8
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define MALORA_LANES 4
#endif

#if defined(MALORA_LANES)
namespace {

constexpr int kLanes = MALORA_LANES;
typedef float VF __attribute__((vector_size(kLanes * 4)));
typedef int32_t VI __attribute__((vector_size(kLanes * 4)));
typedef uint32_t VU __attribute__((vector_size(kLanes * 4)));
#if MALORA_LANES == 16
typedef __m512 Native;
#elif MALORA_LANES == 8
typedef __m256 Native;
#else
typedef float32x4_t Native;
#endif

inline VF vload(const float* p) {  // from any address
  VF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void vstore(float* p, VF v) { std::memcpy(p, &v, sizeof v); }

inline VF vfma(VF a, VF b, VF c) {  // a * b + c, rounded once
#if MALORA_LANES == 16
  return (VF)_mm512_fmadd_ps((Native)a, (Native)b, (Native)c);
#elif MALORA_LANES == 8
  return (VF)_mm256_fmadd_ps((Native)a, (Native)b, (Native)c);
#else
  return (VF)vfmaq_f32((Native)c, (Native)a, (Native)b);
#endif
}


inline VF vset(float v) {  // a broadcast (`VF{} + v` is an add: 0 + v is not v for v = -0, so it is not folded)
#if MALORA_LANES == 16
  return (VF)_mm512_set1_ps(v);
#elif MALORA_LANES == 8
  return (VF)_mm256_set1_ps(v);
#else
  return (VF)vdupq_n_f32(v);
#endif
}

// The lanes' sum, in one fixed order (an output's rounding does not depend on anything but its inputs).
inline float vsum(VF v) {
#if MALORA_LANES == 16
  return _mm512_reduce_add_ps((Native)v);
#elif MALORA_LANES == 8
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128((Native)v), _mm256_extractf128_ps((Native)v, 1));
  const __m128 pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
#else
  return vaddvq_f32((Native)v);
#endif
}

}  // namespace
#endif
