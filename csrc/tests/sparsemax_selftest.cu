// Self-test of spade::sparsemax_rows against a float64 sort-based reference, for
// float32, bfloat16 and float16 scores (the dtypes the torch binding dispatches to).
// Needs a GPU: exits 77 ("skipped", the CTest convention) when none is present,
// 1 on a mismatch, 0 when every case passes.  Built by CMakeLists.txt.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <type_traits>
#include <vector>

#include "spade/sparsemax.h"

static double reference_tau(const std::vector<float>& row) {
  std::vector<double> s;
  for (float v : row) {
    if (std::isnan(v) || v == INFINITY) return NAN;
    if (v > -INFINITY) s.push_back(v);
  }
  if (s.empty()) return NAN;
  std::sort(s.begin(), s.end(), std::greater<double>());
  double csum = 0, tau = 0;
  for (size_t j = 0; j < s.size(); ++j) {
    csum += s[j];
    if (1 + (j + 1) * s[j] > csum) tau = (csum - 1) / (j + 1);
  }
  return tau;
}

static float to_float(float v) { return v; }
static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
static float to_float(__half v) { return __half2float(v); }
template <typename T>
static T from_float(float v);
template <>
float from_float<float>(float v) { return v; }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__half from_float<__half>(float v) { return __float2half(v); }

template <typename T>
static int run_case(int64_t rows, int64_t cols, float scale, std::mt19937& gen, const char* name) {
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<T> host(rows * cols);
  for (auto& v : host) v = from_float<T>(normal(gen));
  if (rows > 2) {
    host[1 * cols + cols / 2] = from_float<T>(NAN);                                // NaN row
    for (int64_t k = 0; k < cols; k += 3) host[2 * cols + k] = from_float<T>(-INFINITY);  // −inf entries
  }
  T *d_s, *d_out;
  float* d_tau;
  cudaMalloc(&d_s, host.size() * sizeof(T));
  cudaMalloc(&d_out, host.size() * sizeof(T));
  cudaMalloc(&d_tau, rows * sizeof(float));
  cudaMemcpy(d_s, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  if (spade::sparsemax_rows<T>(d_s, d_out, d_tau, rows, cols, cols, 0) != cudaSuccess) return 1;
  std::vector<T> out(host.size());
  std::vector<float> tau(rows);
  cudaMemcpy(out.data(), d_out, out.size() * sizeof(T), cudaMemcpyDeviceToHost);
  cudaMemcpy(tau.data(), d_tau, rows * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(d_s), cudaFree(d_out), cudaFree(d_tau);
  // The projection is rounded to T: bfloat16/float16 entries err by half an ulp of their size each.
  const double ulp = sizeof(T) == 4 ? 0.0 : (std::is_same<T, __half>::value ? 1.0 / 1024 : 1.0 / 128);
  const double tol = 1e-5 + 4e-7 * 4 * scale + ulp;
  double worst = 0, worst_sum = 0, sum_tol = tol;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> row(cols);
    for (int64_t k = 0; k < cols; ++k) row[k] = to_float(host[r * cols + k]);
    const double ref = reference_tau(row);
    if (std::isnan(ref) != std::isnan(tau[r])) return std::printf("row %lld: NaN mismatch\n", (long long)r), 1;
    if (std::isnan(ref)) continue;
    double sum = 0;
    int support = 0;
    for (int64_t k = 0; k < cols; ++k) {
      const double z = std::max(double(row[k]) - ref, 0.0), got = to_float(out[r * cols + k]);
      worst = std::max(worst, std::fabs(z - got));
      sum += got;
      support += got > 0;
    }
    worst_sum = std::max(worst_sum, std::fabs(sum - 1));
    sum_tol = std::max(sum_tol, tol * std::max(support, 1));
  }
  std::printf("%s rows %lld cols %lld scale %g: max error %.3g (tolerance %.3g), max |sum - 1| %.3g (%.3g)\n", name,
              (long long)rows, (long long)cols, scale, worst, tol, worst_sum, sum_tol);
  return worst <= tol && worst_sum <= sum_tol ? 0 : 1;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: sparsemax self-test skipped\n");
    return 77;
  }
  std::mt19937 gen(0);
  int failures = 0;
  for (int64_t cols : {1, 7, 129, 5000, 70000, 131072})
    for (float scale : {0.01f, 1.f, 30.f}) {
      failures += run_case<float>(5, cols, scale, gen, "float");
      failures += run_case<__nv_bfloat16>(5, cols, scale, gen, "bfloat16");
      failures += run_case<__half>(5, cols, scale, gen, "float16");
    }
  std::printf(failures ? "%d case(s) failed\n" : "all cases passed\n", failures);
  return failures ? 1 : 0;
}
