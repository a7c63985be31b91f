// The native kernels checked from C++ against double-precision references, for builds Python cannot load here:
// tests/kernels/test_arm_cross.py compiles this with decode_cpu.cpp and malora_cpu.cpp for aarch64 (NEON, and the
// scalar build) and runs it under qemu-aarch64. Fresh random inputs each run (the seed is argv[1], printed on
// failure); outputs poisoned with NaN first, so an element a kernel does not write shows; odd sizes around the
// vector widths. Exit status 0 when every check passes; the last line says "N passed, N failed".

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

extern "C" {
int malora_gemv(const void* x, int64_t ld_x, const void* w, int weight_dtype, const float* scales, const float* bias,
                void* y, int64_t ld_y, int64_t rows, int64_t in, int64_t out, int dtype, int threads);
int malora_add_rms_norm(void* h, const void* delta, const void* weight, void* out, int64_t rows, int64_t dim,
                        float eps, int dtype);
int malora_silu_mul(const void* gate, const void* up, void* out, int64_t rows, int64_t width, int64_t ld_in,
                    int dtype);
int malora_decode_attention(const void* q, int64_t ld_q, const void* k_cache, const void* v_cache,
                            const int32_t* tables, int64_t ld_table, const int64_t* lengths, int64_t rows,
                            int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t window,
                            float scale, void* out, int dtype, int threads);
int malora_decode_lanes();
int malora_kernel_lanes();
struct Bank {  // mirrors malora_cpu.cpp
  const int64_t* addresses;
  const int32_t* meta;
  const float* fmeta;
  int64_t d_in, d_out, n_max, r_max, dp, up;
};
int malora_delta(const Bank* bank, const void* x, int64_t ldx, void* y, int64_t ldy, int rows_dtype,
                 const int64_t* order, const int64_t* items, int64_t n_items, int64_t block, int64_t* counts,
                 int64_t ld_counts, int num_threads);
}

namespace {

std::mt19937 rng;
int passed = 0, failed = 0;

std::vector<float> randn(size_t n, float std = 1.f) {
  std::normal_distribution<float> dist(0.f, std);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

uint16_t to_bf16(float f) {  // nearest even
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float from_bf16(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Rows as the kernel sees them: float32, or rounded to bfloat16 (then `values` holds what the bfloat16 rows hold).
struct Rows {
  int dtype;
  std::vector<float> values;
  std::vector<uint16_t> half;
  Rows(int dtype_, std::vector<float> v) : dtype(dtype_), values(std::move(v)) {
    if (dtype == 1) {
      half.resize(values.size());
      for (size_t i = 0; i < values.size(); ++i) values[i] = from_bf16(half[i] = to_bf16(values[i]));
    }
  }
  void* data() { return dtype == 1 ? static_cast<void*>(half.data()) : static_cast<void*>(values.data()); }
  float at(size_t i) const { return dtype == 1 ? from_bf16(half[i]) : values[i]; }
  void poison() {
    for (float& v : values) v = NAN;
    for (uint16_t& h : half) h = 0x7fc0;
  }
};

void check(const std::string& name, const Rows& got, const std::vector<double>& want, double tolerance,
           size_t first = 0, size_t count = SIZE_MAX) {
  count = std::min(count, want.size());
  double scale = 1e-6, error = 0;
  bool unwritten = false;
  for (size_t i = 0; i < count; ++i) scale = std::max(scale, std::fabs(want[i]));
  for (size_t i = 0; i < count; ++i) {
    const double g = got.at(first + i);
    if (std::isnan(g)) unwritten = true;
    else error = std::max(error, std::fabs(g - want[i]) / scale);
  }
  if (unwritten || error > tolerance) {
    ++failed;
    std::printf("FAILED %s: %s relative error %.3g (tolerance %.3g)\n", name.c_str(),
                unwritten ? "unwritten elements," : "", error, tolerance);
  } else {
    ++passed;
  }
}

double tolerance_of(int dtype) { return dtype == 1 ? 1.6e-2 : 2e-5; }

void check_gemv() {
  const int shapes[][3] = {{1, 1, 1}, {1, 33, 7}, {2, 31, 9}, {3, 576, 65}, {4, 64, 8}, {5, 577, 130}};
  for (int dtype = 0; dtype < 2; ++dtype)
    for (int wdtype = 0; wdtype < 3; ++wdtype)
      for (const auto& shape : shapes) {
        const int rows = shape[0], in = shape[1], out = shape[2];
        Rows x(dtype, randn(static_cast<size_t>(rows) * in));
        std::vector<float> raw = randn(static_cast<size_t>(out) * in), scales(out), bias = randn(out);
        std::vector<double> dense(raw.size());
        std::vector<uint16_t> w16(raw.size());
        std::vector<int8_t> w8(raw.size());
        for (int o = 0; o < out; ++o) {
          float top = 1e-30f;
          for (int i = 0; i < in; ++i) top = std::max(top, std::fabs(raw[o * in + i]));
          scales[o] = top / 127;
          for (int i = 0; i < in; ++i) {
            const size_t e = static_cast<size_t>(o) * in + i;
            w16[e] = to_bf16(raw[e]);
            w8[e] = static_cast<int8_t>(std::lround(raw[e] / scales[o]));
            dense[e] = wdtype == 0 ? raw[e] : wdtype == 1 ? from_bf16(w16[e]) : double(w8[e]) * scales[o];
          }
        }
        const void* w = wdtype == 0 ? static_cast<const void*>(raw.data())
                                    : wdtype == 1 ? static_cast<const void*>(w16.data()) : w8.data();
        const int ld_y = out + 5;  // a column range of a wider output: the columns around it stay poisoned
        Rows y(dtype, std::vector<float>(static_cast<size_t>(rows) * ld_y));
        y.poison();
        const int status = malora_gemv(x.data(), in, w, wdtype, wdtype == 2 ? scales.data() : nullptr,
                                       out % 2 ? bias.data() : nullptr, static_cast<char*>(y.data())
                                           + 2 * (dtype == 1 ? 2 : 4), ld_y, rows, in, out, dtype, 2);
        const std::string name = "gemv w" + std::to_string(wdtype) + " rows" + std::to_string(dtype) + " " +
                                 std::to_string(rows) + "x" + std::to_string(in) + "x" + std::to_string(out);
        for (int r = 0; r < rows; ++r) {
          std::vector<double> want(out);
          for (int o = 0; o < out; ++o) {
            double sum = out % 2 ? bias[o] : 0.0;
            for (int i = 0; i < in; ++i) sum += double(x.at(r * in + i)) * dense[static_cast<size_t>(o) * in + i];
            want[o] = sum;
          }
          check(name, y, want, status == 0 ? tolerance_of(dtype) : -1, static_cast<size_t>(r) * ld_y + 2, out);
          const bool kept = std::isnan(y.at(static_cast<size_t>(r) * ld_y)) &&
                            std::isnan(y.at(static_cast<size_t>(r) * ld_y + 1)) &&
                            std::isnan(y.at(static_cast<size_t>(r) * ld_y + out + 2));
          if (!kept) {
            ++failed;
            std::printf("FAILED %s: wrote outside its columns\n", name.c_str());
          }
        }
      }
}

void check_rms_norm_and_silu() {
  for (int dtype = 0; dtype < 2; ++dtype)
    for (int dim : {7, 64, 576}) {
      const int rows = 3;
      Rows h(dtype, randn(rows * dim)), delta(dtype, randn(rows * dim)), weight(dtype, randn(dim));
      Rows out(dtype, std::vector<float>(rows * dim));
      out.poison();
      std::vector<double> sums(rows * dim), want(rows * dim);
      for (int i = 0; i < rows * dim; ++i) sums[i] = double(h.at(i)) + delta.at(i);
      malora_add_rms_norm(h.data(), delta.data(), weight.data(), out.data(), rows, dim, 1e-5f, dtype);
      for (int r = 0; r < rows; ++r) {
        double squares = 0;
        for (int j = 0; j < dim; ++j) squares += sums[r * dim + j] * sums[r * dim + j];
        const double inv = 1 / std::sqrt(squares / dim + 1e-5);
        for (int j = 0; j < dim; ++j) want[r * dim + j] = sums[r * dim + j] * inv * weight.at(j);
      }
      check("add_rms_norm sum " + std::to_string(dim), h, sums, tolerance_of(dtype));
      check("add_rms_norm out " + std::to_string(dim), out, want, 2 * tolerance_of(dtype));
    }
  for (int dtype = 0; dtype < 2; ++dtype)
    for (int width : {5, 37, 64}) {
      const int rows = 2, ld = 2 * width;  // gate and up side by side, as the fused product writes them
      Rows both(dtype, randn(rows * ld, 3.f)), out(dtype, std::vector<float>(rows * width));
      out.poison();
      std::vector<double> want(rows * width);
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < width; ++j) {
          const double g = both.at(r * ld + j);
          want[r * width + j] = g / (1 + std::exp(-g)) * both.at(r * ld + width + j);
        }
      const char* base = static_cast<const char*>(both.data());
      malora_silu_mul(base, base + width * (dtype == 1 ? 2 : 4), out.data(), rows, width, ld, dtype);
      check("silu_mul " + std::to_string(width), out, want, 2 * tolerance_of(dtype));
    }
}

void check_attention() {
  const int block_size = 4, blocks = 16;
  for (int dtype = 0; dtype < 2; ++dtype)
    for (int head_dim : {12, 64})
      for (int window : {0, 5}) {
        const int rows = 2, heads = 4, kv_heads = 2, group = heads / kv_heads, kv_width = kv_heads * head_dim;
        const int64_t lengths[rows] = {1, 23};
        const int max_blocks = 8;
        std::vector<int32_t> tables(rows * max_blocks);
        for (int i = 0; i < rows * max_blocks; ++i) tables[i] = (i * 7 + 3) % blocks;  // scattered, distinct per row
        Rows q(dtype, randn(rows * heads * head_dim)), keys(dtype, randn(blocks * block_size * kv_width)),
            values(dtype, randn(blocks * block_size * kv_width));
        Rows out(dtype, std::vector<float>(rows * heads * head_dim));
        out.poison();
        const float scale = 1.f / std::sqrt(float(head_dim));
        malora_decode_attention(q.data(), heads * head_dim, keys.data(), values.data(), tables.data(), max_blocks,
                                lengths, rows, heads, kv_heads, head_dim, block_size, window, scale, out.data(),
                                dtype, 2);
        std::vector<double> want(rows * heads * head_dim);
        for (int r = 0; r < rows; ++r)
          for (int h = 0; h < heads; ++h) {
            const int g = h / group;
            const int64_t first = window > 0 ? std::max<int64_t>(0, lengths[r] - window) : 0;
            std::vector<double> scores;
            double top = -INFINITY;
            for (int64_t p = first; p < lengths[r]; ++p) {
              const int64_t slot = int64_t(tables[r * max_blocks + p / block_size]) * block_size + p % block_size;
              double dot = 0;
              for (int j = 0; j < head_dim; ++j)
                dot += double(q.at((r * heads + h) * head_dim + j)) * keys.at(slot * kv_width + g * head_dim + j);
              scores.push_back(dot * scale);
              top = std::max(top, dot * scale);
            }
            double total = 0;
            for (double& s : scores) total += (s = std::exp(s - top));
            for (int j = 0; j < head_dim; ++j) {
              double acc = 0;
              for (int64_t p = first; p < lengths[r]; ++p) {
                const int64_t slot = int64_t(tables[r * max_blocks + p / block_size]) * block_size + p % block_size;
                acc += scores[p - first] * values.at(slot * kv_width + g * head_dim + j);
              }
              want[(r * heads + h) * head_dim + j] = acc / total;
            }
          }
        check("attention d" + std::to_string(head_dim) + " window " + std::to_string(window), out, want,
              2 * tolerance_of(dtype));
      }
}

// One adapter slot (float32 weights) of d_in x d_out with N experts of rank r over a subspace of d, top-k routing,
// and a second slot left inactive; tokens on the adapter, on the inactive slot and on none (left as they were).
void check_delta() {
  for (int dtype = 0; dtype < 2; ++dtype)
    for (const int* shape : {(const int[]){37, 45, 5, 3, 4, 2}, (const int[]){64, 130, 8, 4, 6, 6},
                             (const int[]){9, 17, 3, 2, 1, 1}}) {
      const int d_in = shape[0], d_out = shape[1], d = shape[2], r = shape[3], n = shape[4], k = shape[5];
      const int tail = 16;
      std::vector<float> S = randn(d * d_in, 1 / std::sqrt(float(d_in))), G = randn(n * d_in, 1.f);
      std::vector<float> P = randn(n * r * d, 1 / std::sqrt(float(d))), B = randn(n * d_out * r), bias = randn(n);
      // The packed layout (kernels/packed.py): sgt [d_in, d + n], pt [d, n r], bias [n], bt [n r, d_out], tail.
      std::vector<float> buffer(d_in * (d + n) + d * n * r + n + n * r * d_out + tail, 0.f);
      float* sgt = buffer.data();
      float* pt = sgt + d_in * (d + n);
      float* bs = pt + d * n * r;
      float* bt = bs + n;
      for (int i = 0; i < d_in; ++i) {
        for (int j = 0; j < d; ++j) sgt[i * (d + n) + j] = S[j * d_in + i];
        for (int t = 0; t < n; ++t) sgt[i * (d + n) + d + t] = G[t * d_in + i];
      }
      for (int j = 0; j < d; ++j)
        for (int t = 0; t < n; ++t)
          for (int rho = 0; rho < r; ++rho) pt[j * n * r + t * r + rho] = P[(t * r + rho) * d + j];
      for (int t = 0; t < n; ++t) bs[t] = bias[t];
      for (int t = 0; t < n; ++t)
        for (int rho = 0; rho < r; ++rho)
          for (int o = 0; o < d_out; ++o) bt[(t * r + rho) * d_out + o] = B[(t * d_out + o) * r + rho];
      const float scale = 0.7f, inv_temperature = 1 / 1.3f;
      const int64_t addresses[8] = {int64_t(sgt), int64_t(pt), int64_t(bt), int64_t(bs), 0, 0, 0, 0};
      const int32_t meta[10] = {d, r, n, k, 0, 0, 0, 0, 0, 0};  // slot 1: top_k 0, inactive
      const float fmeta[6] = {scale, inv_temperature, 0.f, 0.f, 1.f, 0.f};
      auto up16 = [](int64_t v) { return (v + 15) / 16 * 16; };
      const Bank bank{addresses, meta, fmeta, d_in, d_out, n, r, up16(d + n), up16(n * r)};
      const int tokens = 7;
      Rows x(dtype, randn(tokens * d_in)), y(dtype, randn(tokens * d_out));
      std::vector<double> want(tokens * d_out);
      for (int i = 0; i < tokens * d_out; ++i) want[i] = y.at(i);
      // Tokens 0, 2, 3, 5, 6 on slot 0 (two work items), token 4 on the inactive slot 1, token 1 on none.
      const int64_t order[6] = {0, 2, 3, 5, 6, 4};
      const int64_t items[9] = {0, 0, 3, 0, 3, 5, 1, 5, 6};
      std::vector<int64_t> counts(2 * n, 0);
      const int status = malora_delta(&bank, x.data(), d_in, y.data(), d_out, dtype, order, items, 3, 64,
                                      counts.data(), n, 2);
      std::vector<int64_t> want_counts(2 * n, 0);
      for (int i : {0, 2, 3, 5, 6}) {
        std::vector<double> z(d), logits(n);
        for (int j = 0; j < d; ++j)
          for (int c = 0; c < d_in; ++c) z[j] += double(S[j * d_in + c]) * x.at(i * d_in + c);
        for (int t = 0; t < n; ++t) {
          for (int c = 0; c < d_in; ++c) logits[t] += double(G[t * d_in + c]) * x.at(i * d_in + c);
          logits[t] = (logits[t] + bias[t]) * inv_temperature;
        }
        std::vector<int> chosen;
        for (int j = 0; j < k; ++j) {  // ties to the lower index
          int best = -1;
          for (int t = 0; t < n; ++t)
            if (std::find(chosen.begin(), chosen.end(), t) == chosen.end() && (best < 0 || logits[t] > logits[best]))
              best = t;
          chosen.push_back(best);
          ++want_counts[best];
        }
        double total = 0;
        for (int t : chosen) total += std::exp(logits[t] - logits[chosen[0]]);
        for (int t : chosen) {
          const double w = scale * std::exp(logits[t] - logits[chosen[0]]) / total;
          for (int rho = 0; rho < r; ++rho) {
            double u = 0;
            for (int j = 0; j < d; ++j) u += double(P[(t * r + rho) * d + j]) * z[j];
            for (int o = 0; o < d_out; ++o) want[i * d_out + o] += w * u * B[(t * d_out + o) * r + rho];
          }
        }
      }
      const std::string name = "delta " + std::to_string(d_in) + "x" + std::to_string(d_out) + " N" +
                               std::to_string(n) + " k" + std::to_string(k) + " rows" + std::to_string(dtype);
      check(name, y, want, status == 0 ? 2 * tolerance_of(dtype) : -1);
      if (counts != want_counts) {
        ++failed;
        std::printf("FAILED %s: expert counts differ\n", name.c_str());
      }
    }
}

}  // namespace

int main(int argc, char** argv) {
  const unsigned seed = argc > 1 ? static_cast<unsigned>(std::strtoul(argv[1], nullptr, 10)) : std::random_device{}();
  rng.seed(seed);
  std::printf("native_check: seed %u, decode ops %d lanes, delta kernel %d lanes\n", seed, malora_decode_lanes(),
              malora_kernel_lanes());
  check_gemv();
  check_rms_norm_and_silu();
  check_attention();
  check_delta();
  std::printf("native_check: %d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
