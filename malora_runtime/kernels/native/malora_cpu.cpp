// The MALoRA delta on CPU as one fused pass per block of tokens (float32 arithmetic).
//
// Semantics (see malora_runtime/kernels/dispatch.py):
//   for each token i of a work item (slot s, a run of `order`):
//     [z; logits] = [S; G][s] x[i]                       one pass over x[i]
//     T, w        = route(logits + bias[s])              top-k, ties to the lower index
//     y[i]       += scale[s] * sum_{t in T} w_t B[s, t] (P[s, t] z)
//
// Why a native kernel: on the CPU the delta is many small products (a few dozen tokens per adapter),
// where torch's batched ops pay for gathering x, scattering into y and a dozen intermediate tensors.
// Here each token's row of x is read once, [S; G] x is a register-blocked product over the gathered
// rows, routing and P z stay in a small per-thread buffer, and only the k chosen experts' rows of
// B^T are read, added straight into y's row. Plain C++ with GCC vector types of one register of the level the
// library is built for (-march per level, cpu_features.py): 16 floats on AVX-512, 8 on AVX2, 4 on NEON; the
// register blocking follows the register count (32 on AVX-512 and NEON, 16 on AVX2). Threads come from the
// OpenMP runtime torch already loaded (libgomp.so.1), so there is one thread team, not two; where torch's runtime is
// another one, kernels/native.py builds this file without -fopenmp and the pragmas are ignored.
//
// Weights are read where they lie: each slot's adapter module is one packed buffer of its own (see
// kernels/packed.py), in its own dtype (float32, bfloat16 or float16), converted to float32 as it is
// loaded. Decode reads every weight once per token, so half-precision weights halve what it reads.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "numeric.h"
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegisters = 32;
#elif defined(__AVX2__)
constexpr int kLanes = 8, kRegisters = 16;
#elif defined(__ARM_NEON) && defined(__aarch64__)
constexpr int kLanes = 4, kRegisters = 32;
#else
constexpr int kLanes = 16, kRegisters = 32;  // the portable build: GCC lowers the vectors to what the target has
#endif
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef float vf_unaligned __attribute__((vector_size(kLanes * 4), aligned(4)));
typedef uint16_t vh_unaligned __attribute__((vector_size(kLanes * 2), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
// A broadcast. `v - 0` folds to the broadcast (it is v for every v); `vf{} + v` does not (0 + -0 is +0), so it
// cost an add per use, and a loop of lane stores measured 4x slower on AVX-512.
inline vf splat(float v) { return v - vf{}; }

using malora::half_to_float;

// How each weight dtype is read: a vector of kLanes (from any address) and one element, as float32.
struct Float32 {
  using T = float;
  static vf vec(const float* p) { return load(p); }
  static float one(float v) { return v; }
};

struct BFloat16 {  // the high half of a float32
  using T = uint16_t;
  static vf vec(const uint16_t* p) {  // intrinsics where GCC's code for the generic form is slower (1.45x, AVX2)
#if defined(__AVX512F__)
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                                 16);
#elif defined(__AVX2__)
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
    vh_unaligned half;
    std::memcpy(&half, p, sizeof half);
    return (vf)(__builtin_convertvector(half, vu) << 16);  // a vector cast: the same bits, no aliasing
#endif
  }
  static float one(uint16_t v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
};

// float32 -> bfloat16, round to nearest even (NaN stays a quiet NaN), kLanes at a time.
inline void store_bf16(uint16_t* p, vf v) {
  const vu bits = (vu)v;
  const vu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const vu nan = (bits & 0x7fffffffu) > 0x7f800000u;  // all ones where v is NaN
  const vu out = (nan & ((bits >> 16) | 0x40u)) | (~nan & rounded);
  *reinterpret_cast<vh_unaligned*>(p) = __builtin_convertvector(out, vh_unaligned);
}

inline uint16_t one_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

struct Float16 {
  using T = uint16_t;
  static vf vec(const uint16_t* p) {
#if defined(__AVX512F__)
    const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return reinterpret_cast<const vf&>(v);
#elif defined(__AVX2__) && defined(__F16C__)
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return reinterpret_cast<const vf&>(v);
#else
    vf v;
    for (int i = 0; i < kLanes; ++i) v[i] = half_to_float(p[i]);
    return v;
#endif
  }
  static float one(uint16_t v) { return half_to_float(v); }
};

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// One module's slot table (kernels/slot_bank.py keeps it; kernels/native builds this descriptor).
struct Bank {
  // Per slot, the addresses of its packed module's parts (kernels/packed.py): [S; G]^T [d_in, d + n],
  // P^T [d, n r], B^T [n r, d_out] and the router bias [n], rows unpadded. A product reads whole vectors
  // of kLanes (<= 16) from each row's start, running into the next row (or the next part, or the buffer's tail)
  // and ignoring those columns of its output: rows of exactly the real width are what decode needs.
  const int64_t* addresses;  // [num_slots, 4]: sgt, pt, bt, bias
  const int32_t* meta;       // [num_slots, 5]: d, r, n, top_k (0: inactive slot), dtype (0 f32, 1 bf16, 2 f16)
  const float* fmeta;        // [num_slots, 3]: scale, 1 / router temperature, softmax-then-top-k (0 or 1)
  int64_t d_in, d_out, n_max, r_max, dp, up;  // maxima over the active slots; dp, up multiples of 16
};

// acc[R][CV] = x rows (R of them) times CV vectors of columns of w ([K, ldw]), stored to out.
template <class W, int R, int CV>
inline void project_block(const float* const* xr, const typename W::T* w, int64_t ldw, int64_t K, float* out,
                          int64_t ldo) {
  vf acc[R][CV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) acc[r][c] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const typename W::T* wk = w + k * ldw;
    vf wv[CV];
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) wv[c] = W::vec(wk + c * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf xb = splat(xr[r][k]);
#pragma GCC unroll 4
      for (int c = 0; c < CV; ++c) acc[r][c] += xb * wv[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) store(out + r * ldo + c * kLanes, acc[r][c]);
}

template <class W, int CV>
void project_rows(const float* const* xr, int rows, const typename W::T* w, int64_t ldw, int64_t K, float* out,
                  int64_t ldo) {
  // As many rows as accumulators fit beside the CV weight vectors and a broadcast: with 32 registers 8 rows of
  // up to 3 vectors, 6 of 4; with 16 (AVX2) 8 rows of 1, 6 of 2, 3 of 3, 2 of 4.
  constexpr int kFit = (kRegisters - CV - 2) / CV;
  constexpr int kRows = kFit >= 8 ? 8 : kFit;
  int i = 0;
  for (; i + kRows <= rows; i += kRows) project_block<W, kRows, CV>(xr + i, w, ldw, K, out + i * ldo, ldo);
  switch (rows - i) {
    case 0: break;
    case 1: project_block<W, 1, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
    case 2: project_block<W, 2, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
    case 3: project_block<W, 3, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
    case 4: project_block<W, 4, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
    case 5: project_block<W, 5, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
    case 6: project_block<W, 6, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
    default: project_block<W, 7, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
  }
}

// out[i, 0:cols] = x[i] . w[:, 0:cols] for `rows` rows, w's rows ldw apart; cols is a multiple of
// kLanes and may exceed ldw (the columns past ldw read the next row: their outputs are not used).
template <class W>
void project(const float* const* xr, int rows, const typename W::T* w, int64_t ldw, int64_t K, int64_t cols,
             float* out, int64_t ldo) {
  for (int64_t c = 0; c < cols;) {
    const int64_t left = (cols - c) / kLanes;
    if (left >= 4) {
      project_rows<W, 4>(xr, rows, w + c, ldw, K, out + c, ldo);
      c += 4 * kLanes;
    } else if (left == 3) {
      project_rows<W, 3>(xr, rows, w + c, ldw, K, out + c, ldo);
      c += 3 * kLanes;
    } else if (left == 2) {
      project_rows<W, 2>(xr, rows, w + c, ldw, K, out + c, ldo);
      c += 2 * kLanes;
    } else {
      project_rows<W, 1>(xr, rows, w + c, ldw, K, out + c, ldo);
      c += kLanes;
    }
  }
}

// The chosen experts and their weights from the scaled logits of one token (docs/malora.md: routing).
// chosen[j], weight[j] for j < k.
void route(const float* scores, int n, int k, bool softmax_first, int* chosen, float* weight) {
  for (int j = 0; j < k; ++j) {  // k rounds of a first-maximum scan: ties go to the lower index
    int best = -1;
    for (int e = 0; e < n; ++e) {
      bool taken = false;
      for (int q = 0; q < j; ++q) taken |= chosen[q] == e;
      if (!taken && (best < 0 || scores[e] > scores[best])) best = e;
    }
    chosen[j] = best;
  }
  const float top = scores[chosen[0]];
  float total = 0.0f;
  for (int j = 0; j < k; ++j) {
    weight[j] = std::exp(scores[chosen[j]] - top);
    total += weight[j];
  }
  if (softmax_first) {  // softmax over all n, not renormalised over the chosen k
    total = 0.0f;
    for (int e = 0; e < n; ++e) total += std::exp(scores[e] - top);
  }
  const float inv_total = 1.0f / total;
  for (int j = 0; j < k; ++j) weight[j] *= inv_total;
}

// For R tokens that chose the same expert: y_t[0:d_out] += sum_rho coef_t[rho] * bt[rho][0:d_out].
// Each row of B_t^T is loaded once for R tokens (the product is bound by reading B, not by FMAs).
template <class W, int R>
void up_project(float* const* y_rows, const float* const* coef, const typename W::T* bt, int64_t r, int64_t d_out) {
  constexpr int kChunk = kRegisters >= 32 ? 4 : 2;  // vectors of each y row per pass: R * kChunk accumulators
  int64_t c = 0;
  for (; c + kChunk * kLanes <= d_out; c += kChunk * kLanes) {
    vf acc[R][kChunk];
#pragma GCC unroll 4
    for (int t = 0; t < R; ++t)
#pragma GCC unroll 4
      for (int v = 0; v < kChunk; ++v) acc[t][v] = load(y_rows[t] + c + v * kLanes);
    for (int64_t rho = 0; rho < r; ++rho) {
      const typename W::T* row = bt + rho * d_out + c;
      vf b[kChunk];
#pragma GCC unroll 4
      for (int v = 0; v < kChunk; ++v) b[v] = W::vec(row + v * kLanes);
#pragma GCC unroll 4
      for (int t = 0; t < R; ++t) {
        const vf s = splat(coef[t][rho]);
#pragma GCC unroll 4
        for (int v = 0; v < kChunk; ++v) acc[t][v] += s * b[v];
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < R; ++t)
#pragma GCC unroll 4
      for (int v = 0; v < kChunk; ++v) store(y_rows[t] + c + v * kLanes, acc[t][v]);
  }
  for (; c + kLanes <= d_out; c += kLanes) {
    vf acc[R];
#pragma GCC unroll 4
    for (int t = 0; t < R; ++t) acc[t] = load(y_rows[t] + c);
    for (int64_t rho = 0; rho < r; ++rho) {
      const vf b = W::vec(bt + rho * d_out + c);
#pragma GCC unroll 4
      for (int t = 0; t < R; ++t) acc[t] += splat(coef[t][rho]) * b;
    }
#pragma GCC unroll 4
    for (int t = 0; t < R; ++t) store(y_rows[t] + c, acc[t]);
  }
  for (; c < d_out; ++c) {  // the last d_out % kLanes columns: B's last row ends the buffer's bt part exactly
    for (int t = 0; t < R; ++t) {
      float acc = y_rows[t][c];
      for (int64_t rho = 0; rho < r; ++rho) acc += coef[t][rho] * W::one(bt[rho * d_out + c]);
      y_rows[t][c] = acc;
    }
  }
}

template <class W>
void up_project_all(float* const* y_rows, const float* const* coef, int count, const typename W::T* bt, int64_t r,
                    int64_t d_out) {
  int i = 0;
  for (; i + 4 <= count; i += 4) up_project<W, 4>(y_rows + i, coef + i, bt, r, d_out);
  switch (count - i) {
    case 0: break;
    case 1: up_project<W, 1>(y_rows + i, coef + i, bt, r, d_out); break;
    case 2: up_project<W, 2>(y_rows + i, coef + i, bt, r, d_out); break;
    default: up_project<W, 3>(y_rows + i, coef + i, bt, r, d_out); break;
  }
}

// Per-thread buffers, kept by each thread from call to call (a step calls the kernel once per adapted
// module); every element is written before it is read, so growing them is all `fit` does.
struct Scratch {
  std::vector<float> zl;            // [block, dp]: [z; logits] per token
  std::vector<float> u;             // [block, up]: P_t z for every expert t of the slot
  std::vector<float> coef;          // [block, n_max, r_max]: scale * w_t * (P_t z), per chosen expert
  std::vector<const float*> xrows;  // [block]
  std::vector<const float*> zrows;  // [block]
  std::vector<float> scores, weight;
  std::vector<int> chosen;
  // Tokens of the block by chosen expert: y rows and coefficient rows, [n_max][block].
  std::vector<float*> expert_y;
  std::vector<const float*> expert_coef;
  std::vector<int> expert_count;
  std::vector<float> xbuf, ybuf;  // bfloat16 activations: [block, d_in] widened x, [block, d_out] delta
  int64_t block = 0;  // tokens per work item at most: the stride of expert_y and expert_coef

  void fit(int64_t block_size, const Bank& bank, bool bf16_rows) {
    block = block_size;
    if (bf16_rows) {
      grow(xbuf, block * bank.d_in);
      grow(ybuf, block * bank.d_out);
    }
    grow(zl, block * bank.dp);
    grow(u, block * bank.up);
    grow(coef, block * bank.n_max * bank.r_max);
    grow(xrows, block);
    grow(zrows, block);
    grow(scores, bank.n_max);
    grow(weight, bank.n_max);
    grow(chosen, bank.n_max);
    grow(expert_y, bank.n_max * block);
    grow(expert_coef, bank.n_max * block);
    grow(expert_count, bank.n_max);
  }

  template <typename T>
  static void grow(std::vector<T>& buffer, int64_t size) {
    if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  }
};

// Activations x and y: float32 rows, read and added to in place; or bfloat16 rows, x widened once per token into
// the scratch, the delta accumulated there in float32 and added into y's row with one rounding per element.
template <class W, class A>
void run_item(const Bank& bank, const void* x_any, int64_t ldx, void* y_any, int64_t ldy, const int64_t* order,
              int32_t slot, int64_t start, int64_t end, int64_t* counts, int64_t ld_counts, Scratch& s) {
  using T = typename W::T;
  using X = typename A::T;
  constexpr bool kBf16Rows = !std::is_same<X, float>::value;
  const X* x = static_cast<const X*>(x_any);
  X* y = static_cast<X*>(y_any);
  const int32_t* meta = bank.meta + 5 * slot;
  const int d = meta[0], r = meta[1], n = meta[2], k = meta[3] < meta[2] ? meta[3] : meta[2];
  const float scale = bank.fmeta[3 * slot], inv_temperature = bank.fmeta[3 * slot + 1];
  const bool softmax_first = bank.fmeta[3 * slot + 2] != 0.0f;
  const int64_t* address = bank.addresses + 4 * slot;
  const T* sgt = reinterpret_cast<const T*>(address[0]);
  const T* pt = reinterpret_cast<const T*>(address[1]);
  const T* bt = reinterpret_cast<const T*>(address[2]);
  const T* bias = reinterpret_cast<const T*>(address[3]);
  const int64_t dp = bank.dp, up = bank.up;
  const int rows = static_cast<int>(end - start);

  // [z; logits] = [S; G] x for the block's tokens, then u = P z for every expert (N r d is cheap).
  const int64_t d_in = bank.d_in, d_out = bank.d_out;
  for (int i = 0; i < rows; ++i) {
    const X* row = x + order[start + i] * ldx;
    if constexpr (kBf16Rows) {
      float* wide = s.xbuf.data() + i * d_in;
      int64_t c = 0;
      for (; c + kLanes <= d_in; c += kLanes) store(wide + c, A::vec(row + c));
      for (; c < d_in; ++c) wide[c] = A::one(row[c]);
      s.xrows[i] = wide;
    } else {
      s.xrows[i] = row;
    }
  }
  // Columns computed: the real widths rounded up to whole vectors (see Bank for the rows' stride).
  const int64_t sg_cols = round_up(d + n), u_cols = round_up(n * r);
  project<W>(s.xrows.data(), rows, sgt, d + n, bank.d_in, sg_cols, s.zl.data(), dp);
  for (int i = 0; i < rows; ++i) s.zrows[i] = s.zl.data() + i * dp;
  project<W>(s.zrows.data(), rows, pt, n * r, d, u_cols, s.u.data(), up);

  // Route every token; queue it under each chosen expert with its coefficients.
  for (int e = 0; e < n; ++e) s.expert_count[e] = 0;
  for (int i = 0; i < rows; ++i) {
    const float* logits = s.zl.data() + i * dp + d;
    for (int e = 0; e < n; ++e) s.scores[e] = (logits[e] + W::one(bias[e])) * inv_temperature;
    route(s.scores.data(), n, k, softmax_first, s.chosen.data(), s.weight.data());
    float* y_row;
    if constexpr (kBf16Rows) {
      y_row = s.ybuf.data() + i * d_out;
      std::memset(y_row, 0, sizeof(float) * d_out);
    } else {
      y_row = y + order[start + i] * ldy;
    }
    for (int j = 0; j < k; ++j) {
      const int e = s.chosen[j];
      const float w = scale * s.weight[j];
      const float* u = s.u.data() + i * up + e * r;
      float* c = s.coef.data() + (i * bank.n_max + j) * bank.r_max;
      for (int rho = 0; rho < r; ++rho) c[rho] = w * u[rho];
      const int64_t q = e * s.block + s.expert_count[e]++;
      s.expert_y[q] = y_row;
      s.expert_coef[q] = c;
    }
    if (counts != nullptr) {  // other threads count other tokens of the same slot
      for (int j = 0; j < k; ++j) __atomic_fetch_add(counts + slot * ld_counts + s.chosen[j], 1, __ATOMIC_RELAXED);
    }
  }

  // y += the chosen experts' B_t (coefficients), expert by expert: B_t's rows are read once per block.
  for (int e = 0; e < n; ++e) {
    if (s.expert_count[e] == 0) continue;
    up_project_all<W>(s.expert_y.data() + e * s.block, s.expert_coef.data() + e * s.block, s.expert_count[e],
                      bt + static_cast<int64_t>(e) * r * bank.d_out, r, bank.d_out);
  }
  if constexpr (kBf16Rows) {  // y += delta, rounded once per element
    for (int i = 0; i < rows; ++i) {
      X* row = y + order[start + i] * ldy;
      const float* delta = s.ybuf.data() + i * d_out;
      int64_t c = 0;
      for (; c + kLanes <= d_out; c += kLanes) store_bf16(row + c, A::vec(row + c) + load(delta + c));
      for (; c < d_out; ++c) row[c] = one_bf16(A::one(row[c]) + delta[c]);
    }
  }
}

}  // namespace

extern "C" {

// Work items [n_items, 3] int64: (slot, start, end) over `order` (token rows of x and y grouped by
// slot), each at most `block` tokens. x and y: rows of float32 (rows_dtype 0) or bfloat16 (1), strides in
// elements. counts: null, or [num_slots, ld_counts] int64 that gets +1 per token and chosen expert.
// Returns 0, or 1 when a slot has an unknown dtype code (nothing is written for its tokens).
int malora_delta(const Bank* bank, const void* x, int64_t ldx, void* y, int64_t ldy, int rows_dtype,
                 const int64_t* order, const int64_t* items, int64_t n_items, int64_t block, int64_t* counts,
                 int64_t ld_counts, int num_threads) {
  (void)num_threads;  // unused where the file is built without OpenMP
  if (rows_dtype != 0 && rows_dtype != 1) return 2;
  int status = 0;
#pragma omp parallel num_threads(n_items > 1 && num_threads > 1 ? num_threads : 1)
  {
    static thread_local Scratch scratch;
    scratch.fit(block, *bank, rows_dtype == 1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < n_items; ++q) {
      const int64_t* item = items + 3 * q;
      const int32_t slot = static_cast<int32_t>(item[0]);
      const int32_t* meta = bank->meta + 5 * slot;
      if (meta[3] <= 0) continue;  // inactive slot: its tokens get no delta
      const int weights = meta[4] >= 0 && meta[4] <= 2 ? meta[4] : -1;
      if (weights < 0) {
        __atomic_store_n(&status, 1, __ATOMIC_RELAXED);
        continue;
      }
      // One instantiation per (weight dtype, activation dtype): 3 x 2.
      const int which = weights * 2 + rows_dtype;
      const int64_t a = item[1], b = item[2];
      switch (which) {
        case 0: run_item<Float32, Float32>(*bank, x, ldx, y, ldy, order, slot, a, b, counts, ld_counts, scratch); break;
        case 1: run_item<Float32, BFloat16>(*bank, x, ldx, y, ldy, order, slot, a, b, counts, ld_counts, scratch); break;
        case 2: run_item<BFloat16, Float32>(*bank, x, ldx, y, ldy, order, slot, a, b, counts, ld_counts, scratch); break;
        case 3: run_item<BFloat16, BFloat16>(*bank, x, ldx, y, ldy, order, slot, a, b, counts, ld_counts, scratch);
                break;
        case 4: run_item<Float16, Float32>(*bank, x, ldx, y, ldy, order, slot, a, b, counts, ld_counts, scratch); break;
        default: run_item<Float16, BFloat16>(*bank, x, ldx, y, ldy, order, slot, a, b, counts, ld_counts, scratch);
      }
    }
  }
  return status;
}

int malora_kernel_abi_version() { return 6; }

// Floats per vector of the build (GCC vector types of one register of its level).
int malora_kernel_lanes() { return kLanes; }

}  // extern "C"
