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

}  // namespace
#endif
