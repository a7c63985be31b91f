// The MALoRA delta on CPU as one fused pass per block of tokens (float32).
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
// B^T are read, added straight into y's row. Plain C++ with GCC vector types: the compiler emits
// AVX-512 where the CPU has it, AVX2 pairs elsewhere. Threads come from the OpenMP runtime torch
// already loaded (libgomp.so.1), so there is one thread team, not two; where torch's runtime is
// another one, kernels/native.py builds this file without -fopenmp and the pragmas are ignored.

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef float vf_unaligned __attribute__((vector_size(64), aligned(4)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
inline vf splat(float v) { return vf{} + v; }
inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// The weights of one module for every slot, laid out for this kernel (kernels/native.py builds it).
struct Bank {
  // Per slot, at the start of its block of d_in * dp (d_max * up) elements, row-major with the slot's
  // own row length d + n (n r), unpadded: a product reads whole vectors of 16 from each row start,
  // running into the next row (or the block's unused tail), and ignores those columns of its output.
  // Rows of exactly the real width are what decode, bound by reading weights, needs.
  const float* sgt;      // [num_slots, d_in * dp]: [S; G]^T, columns 0..d-1 from S, d..d+n-1 from G
  const float* pt;       // [num_slots, d_max * up]: P^T, column t r + rho is row rho of P_t
  const float* bt;       // [num_slots, n_max, r_max, d_out]: every row of B_t^T contiguous
  const float* bias;     // [num_slots, n_max]
  const int32_t* meta;   // [num_slots, 4]: d, r, n, top_k (top_k 0: inactive slot)
  const float* fmeta;    // [num_slots, 3]: scale, 1 / router temperature, softmax-then-top-k (0 or 1)
  int64_t d_in, d_out, d_max, r_max, n_max, dp, up;  // dp, up: multiples of 16
};

// acc[R][CV] = x rows (R of them) times CV vectors of columns of w ([K, ldw]), stored to out.
template <int R, int CV>
inline void project_block(const float* const* xr, const float* w, int64_t ldw, int64_t K, float* out,
                          int64_t ldo) {
  vf acc[R][CV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) acc[r][c] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * ldw;
    vf wv[CV];
#pragma GCC unroll 4
    for (int c = 0; c < CV; ++c) wv[c] = load(wk + c * kLanes);
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

template <int CV>
void project_rows(const float* const* xr, int rows, const float* w, int64_t ldw, int64_t K, float* out,
                  int64_t ldo) {
  // 24 accumulators at most: 8 rows of up to 3 vectors, 6 rows of 4.
  constexpr int kRows = CV <= 3 ? 8 : 6;
  int i = 0;
  for (; i + kRows <= rows; i += kRows) project_block<kRows, CV>(xr + i, w, ldw, K, out + i * ldo, ldo);
  switch (rows - i) {
    case 0: break;
    case 1: project_block<1, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
    case 2: project_block<2, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
    case 3: project_block<3, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
    case 4: project_block<4, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
    case 5: project_block<5, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
    case 6: project_block<6, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
    default: project_block<7, CV>(xr + i, w, ldw, K, out + i * ldo, ldo); break;
  }
}

// out[i, 0:cols] = x[i] . w[:, 0:cols] for `rows` rows, w's rows ldw apart; cols is a multiple of
// kLanes and may exceed ldw (the columns past ldw read the next row: their outputs are not used).
void project(const float* const* xr, int rows, const float* w, int64_t ldw, int64_t K, int64_t cols, float* out,
             int64_t ldo) {
  for (int64_t c = 0; c < cols;) {
    const int64_t left = (cols - c) / kLanes;
    if (left >= 4) {
      project_rows<4>(xr, rows, w + c, ldw, K, out + c, ldo);
      c += 4 * kLanes;
    } else if (left == 3) {
      project_rows<3>(xr, rows, w + c, ldw, K, out + c, ldo);
      c += 3 * kLanes;
    } else if (left == 2) {
      project_rows<2>(xr, rows, w + c, ldw, K, out + c, ldo);
      c += 2 * kLanes;
    } else {
      project_rows<1>(xr, rows, w + c, ldw, K, out + c, ldo);
      c += kLanes;
    }
  }
}

// The chosen experts and their weights from the logits of one token (docs/malora.md: routing).
// Returns how many were chosen (the slot's top_k); chosen[j], weight[j] for j < that.
int route(const float* logits, const float* bias, int n, int k, float inv_temperature, bool softmax_first,
          float* scores, int* chosen, float* weight) {
  for (int e = 0; e < n; ++e) scores[e] = (logits[e] + bias[e]) * inv_temperature;
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
  return k;
}

// For R tokens that chose the same expert: y_t[0:d_out] += sum_rho coef_t[rho] * bt[rho][0:d_out].
// Each row of B_t^T is loaded once for R tokens (the product is bound by reading B, not by FMAs).
template <int R>
void up_project(float* const* y_rows, const float* const* coef, const float* bt, int64_t r, int64_t d_out) {
  constexpr int kChunk = 4;  // vectors of each y row per pass: R * kChunk accumulators
  int64_t c = 0;
  for (; c + kChunk * kLanes <= d_out; c += kChunk * kLanes) {
    vf acc[R][kChunk];
#pragma GCC unroll 4
    for (int t = 0; t < R; ++t)
#pragma GCC unroll 4
      for (int v = 0; v < kChunk; ++v) acc[t][v] = load(y_rows[t] + c + v * kLanes);
    for (int64_t rho = 0; rho < r; ++rho) {
      const float* row = bt + rho * d_out + c;
      vf b[kChunk];
#pragma GCC unroll 4
      for (int v = 0; v < kChunk; ++v) b[v] = load(row + v * kLanes);
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
      const vf b = load(bt + rho * d_out + c);
#pragma GCC unroll 4
      for (int t = 0; t < R; ++t) acc[t] += splat(coef[t][rho]) * b;
    }
#pragma GCC unroll 4
    for (int t = 0; t < R; ++t) store(y_rows[t] + c, acc[t]);
  }
  for (; c < d_out; ++c) {
    for (int t = 0; t < R; ++t) {
      float acc = y_rows[t][c];
      for (int64_t rho = 0; rho < r; ++rho) acc += coef[t][rho] * bt[rho * d_out + c];
      y_rows[t][c] = acc;
    }
  }
}

void up_project_all(float* const* y_rows, const float* const* coef, int count, const float* bt, int64_t r,
                    int64_t d_out) {
  int i = 0;
  for (; i + 4 <= count; i += 4) up_project<4>(y_rows + i, coef + i, bt, r, d_out);
  switch (count - i) {
    case 0: break;
    case 1: up_project<1>(y_rows + i, coef + i, bt, r, d_out); break;
    case 2: up_project<2>(y_rows + i, coef + i, bt, r, d_out); break;
    default: up_project<3>(y_rows + i, coef + i, bt, r, d_out); break;
  }
}

// Per-thread buffers, kept by each thread from call to call (a step calls the kernel once per adapted
// module); every element is written before it is read, so growing them is all `fit` does.
struct Scratch {
  std::vector<float> zl;            // [block, dp]: [z; logits] per token
  std::vector<float> u;             // [block, up]: P_t z for every expert t of the slot
  std::vector<float> coef;          // [block, k_max, r]: scale * w_t * (P_t z), per chosen expert
  std::vector<const float*> xrows;  // [block]
  std::vector<const float*> zrows;  // [block]
  std::vector<float> scores, weight;
  std::vector<int> chosen;
  // Tokens of the block by chosen expert: y rows and coefficient rows, [n_max][block].
  std::vector<float*> expert_y;
  std::vector<const float*> expert_coef;
  std::vector<int> expert_count;
  int64_t block = 0;  // tokens per work item at most: the stride of expert_y and expert_coef

  void fit(int64_t block_size, const Bank& bank) {
    block = block_size;
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

void run_item(const Bank& bank, const float* x, int64_t ldx, float* y, int64_t ldy, const int64_t* order,
              int32_t slot, int64_t start, int64_t end, int64_t* counts, int64_t ld_counts, Scratch& s) {
  const int32_t* meta = bank.meta + 4 * slot;
  const int d = meta[0], r = meta[1], n = meta[2], k = meta[3] < meta[2] ? meta[3] : meta[2];
  if (k <= 0) return;  // inactive slot: its tokens get no delta
  const float scale = bank.fmeta[3 * slot], inv_temperature = bank.fmeta[3 * slot + 1];
  const bool softmax_first = bank.fmeta[3 * slot + 2] != 0.0f;
  const int64_t dp = bank.dp, up = bank.up;
  const int rows = static_cast<int>(end - start);

  // [z; logits] = [S; G] x for the block's tokens, then u = P z for every expert (N r d is cheap).
  for (int i = 0; i < rows; ++i) s.xrows[i] = x + order[start + i] * ldx;
  // Columns computed: the real widths rounded up to whole vectors (see Bank.sgt for the rows' stride).
  const int64_t sg_cols = round_up(d + n), u_cols = round_up(n * r);
  project(s.xrows.data(), rows, bank.sgt + slot * bank.d_in * dp, d + n, bank.d_in, sg_cols, s.zl.data(), dp);
  for (int i = 0; i < rows; ++i) s.zrows[i] = s.zl.data() + i * dp;
  project(s.zrows.data(), rows, bank.pt + slot * bank.d_max * up, n * r, d, u_cols, s.u.data(), up);

  // Route every token; queue it under each chosen expert with its coefficients.
  const float* bias = bank.bias + slot * bank.n_max;
  for (int e = 0; e < n; ++e) s.expert_count[e] = 0;
  for (int i = 0; i < rows; ++i) {
    route(s.zl.data() + i * dp + d, bias, n, k, inv_temperature, softmax_first, s.scores.data(), s.chosen.data(),
          s.weight.data());
    float* y_row = y + order[start + i] * ldy;
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
  const float* bt_slot = bank.bt + slot * bank.n_max * bank.r_max * bank.d_out;
  for (int e = 0; e < n; ++e) {
    if (s.expert_count[e] == 0) continue;
    up_project_all(s.expert_y.data() + e * s.block, s.expert_coef.data() + e * s.block, s.expert_count[e],
                   bt_slot + e * bank.r_max * bank.d_out, r, bank.d_out);
  }
}

}  // namespace

extern "C" {

// Work items [n_items, 3] int64: (slot, start, end) over `order` (token rows of x and y grouped by
// slot), each at most `block` tokens. counts: null, or [num_slots, ld_counts] int64 that gets +1 per
// token and chosen expert.
int malora_delta_f32(const Bank* bank, const float* x, int64_t ldx, float* y, int64_t ldy, const int64_t* order,
                     const int64_t* items, int64_t n_items, int64_t block, int64_t* counts, int64_t ld_counts,
                     int num_threads) {
  (void)num_threads;  // unused where the file is built without OpenMP
#pragma omp parallel num_threads(n_items > 1 && num_threads > 1 ? num_threads : 1)
  {
    static thread_local Scratch scratch;
    scratch.fit(block, *bank);
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < n_items; ++q) {
      const int64_t* item = items + 3 * q;
      run_item(*bank, x, ldx, y, ldy, order, static_cast<int32_t>(item[0]), item[1], item[2], counts, ld_counts,
               scratch);
    }
  }
  return 0;
}

// One slot's parts of a Bank from the bank's padded slot tensors (float32, contiguous): S [d_max, d_in],
// G [n_max, d_in], P [n_max, r_max, d_max], router bias [n_max]; the slot's real d, r, n and routing.
//   sgt[c][j] = S[j][c] (j < d), G[j - d][c] (d <= j < d + n)    rows of d + n
//   pt[c][t r + rho] = P[t][rho][c] (c < d)                          rows of n r
//   bias[t] (t < n), meta = {d, r, n, top_k}, fmeta = {scale, 1 / temperature, softmax_first}
// Done here, not with torch ops: a swap writes every adapted module (210 on the default model) between
// two engine steps, and as torch ops this costs ~30 us a module.
int malora_pack_slot_f32(const float* S, const float* G, const float* P, const float* bias_src, int64_t d_in,
                         int64_t d_max, int64_t r_max, int64_t d, int64_t r, int64_t n, int64_t top_k, float scale,
                         float inv_temperature, float softmax_first, float* sgt, float* pt, float* bias,
                         int32_t* meta, float* fmeta) {
  for (int64_t c = 0; c < d_in; ++c) {
    float* row = sgt + c * (d + n);
    for (int64_t j = 0; j < d; ++j) row[j] = S[j * d_in + c];
    for (int64_t j = 0; j < n; ++j) row[d + j] = G[j * d_in + c];
  }
  for (int64_t c = 0; c < d; ++c) {
    float* row = pt + c * (n * r);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t rho = 0; rho < r; ++rho) row[t * r + rho] = P[(t * r_max + rho) * d_max + c];
  }
  for (int64_t t = 0; t < n; ++t) bias[t] = bias_src[t];
  meta[0] = static_cast<int32_t>(d);
  meta[1] = static_cast<int32_t>(r);
  meta[2] = static_cast<int32_t>(n);
  meta[3] = static_cast<int32_t>(top_k);
  fmeta[0] = scale;
  fmeta[1] = inv_temperature;
  fmeta[2] = softmax_first;
  return 0;
}

int malora_kernel_abi_version() { return 4; }

}  // extern "C"
