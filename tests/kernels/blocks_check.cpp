// tests/kernels/test_native_check.py builds this with blocks_cpu.cpp for aarch64 (NEON, and the scalar build) and
// runs it under qemu. Its cases come from a file the test writes: random GGUF blocks, rows of x, and the float64
// products and de-quantized rows that gguf-py's own numpy code gives (an implementation independent of ours).
// Per case: the product at every row count from 1 up, into a poisoned output a column range of a wider one; one
// stored row looked up.
//
// File: int64 case count; per case int64 format, rows, in, out, has_bias, then out*row_bytes block bytes (the
// test passes row_bytes), rows*in float32 x, out float32 bias (if any), rows*out float64 products, in float64
// values of stored row 0.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

extern "C" {
int malora_block_matmul(const void* x, int64_t ld_x, const void* w, int64_t format, const float* bias, void* y,
                        int64_t ld_y, int64_t rows, int64_t in, int64_t out, int dtype, int threads);
int malora_block_rows(const void* w, int64_t format, int64_t in, int64_t out_rows, const int64_t* ids,
                      int64_t count, void* out, int dtype, int threads);
int malora_block_format(int64_t format, int64_t* values, int64_t* bytes);
int malora_blocks_lanes();
}

namespace {

int passed = 0, failed = 0;

template <class T>
bool read(std::FILE* f, T* data, size_t count) {
  return std::fread(data, sizeof(T), count, f) == count;
}

void verdict(const std::string& name, double error, bool unwritten, bool outside) {
  if (unwritten || outside || !(error <= 2e-5)) {
    ++failed;
    std::printf("FAILED %s: relative error %.3g%s%s\n", name.c_str(), error, unwritten ? ", unwritten elements" : "",
                outside ? ", wrote outside its columns" : "");
  } else {
    ++passed;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  std::FILE* f = std::fopen(argv[1], "rb");
  int64_t cases = 0;
  if (f == nullptr || !read(f, &cases, 1)) return 2;
  std::printf("blocks_check: %lld cases, %d lanes\n", static_cast<long long>(cases), malora_blocks_lanes());
  for (int64_t c = 0; c < cases; ++c) {
    int64_t head[5];
    if (!read(f, head, 5)) return 2;
    const int64_t format = head[0], rows = head[1], in = head[2], out = head[3], has_bias = head[4];
    int64_t values = 0, bytes = 0;
    if (malora_block_format(format, &values, &bytes) != 0) return 3;
    std::vector<uint8_t> blocks(static_cast<size_t>(out * (in / values) * bytes));
    std::vector<float> x(static_cast<size_t>(rows * in)), bias(has_bias ? out : 0);
    std::vector<double> want(static_cast<size_t>(rows * out)), row0(static_cast<size_t>(in));
    if (!read(f, blocks.data(), blocks.size()) || !read(f, x.data(), x.size()) || !read(f, bias.data(), bias.size()) ||
        !read(f, want.data(), want.size()) || !read(f, row0.data(), row0.size()))
      return 2;
    const std::string name = "format " + std::to_string(format) + " " + std::to_string(in) + "x" +
                             std::to_string(out);
    double scale = 1e-6;
    for (double v : want) scale = std::max(scale, std::fabs(v));
    for (int64_t n = 1; n <= rows; ++n) {  // every row count: the few-row path and the tiled one
      const int64_t ld = out + 3;
      std::vector<float> y(static_cast<size_t>(n * ld), NAN);
      const int status = malora_block_matmul(x.data(), in, blocks.data(), format, has_bias ? bias.data() : nullptr,
                                             y.data() + 1, ld, n, in, out, 0, 2);
      double error = status == 0 ? 0 : INFINITY;
      bool unwritten = false, outside = false;
      for (int64_t r = 0; r < n; ++r) {
        outside |= !std::isnan(y[r * ld]) || !std::isnan(y[r * ld + out + 1]) || !std::isnan(y[r * ld + out + 2]);
        for (int64_t o = 0; o < out; ++o) {
          const float got = y[r * ld + 1 + o];
          unwritten |= std::isnan(got);
          error = std::max(error, std::fabs(got - want[r * out + o]) / scale);
        }
      }
      verdict(name + " rows " + std::to_string(n), error, unwritten, outside);
    }
    std::vector<float> looked(static_cast<size_t>(in), NAN);
    const int64_t id = 0;
    const int status = malora_block_rows(blocks.data(), format, in, out, &id, 1, looked.data(), 0, 2);
    double error = status == 0 ? 0 : INFINITY, top = 1e-6;
    for (double v : row0) top = std::max(top, std::fabs(v));
    bool unwritten = false;
    for (int64_t i = 0; i < in; ++i) {
      unwritten |= std::isnan(looked[i]);
      error = std::max(error, std::fabs(looked[i] - row0[i]) / top);
    }
    verdict(name + " row lookup", error, unwritten, false);
  }
  std::printf("blocks_check: %d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
