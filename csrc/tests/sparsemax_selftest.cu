// Self-test of spade::sparsemax_rows against a float64 sort-based reference.
// Needs a GPU: exits 77 ("skipped", the CTest convention) when none is present,
// 1 on a mismatch, 0 when every case passes.  Built by CMakeLists.txt.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "spade/sparsemax.cuh"

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

static int run_case(int64_t rows, int64_t cols, float scale, std::mt19937& gen) {
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<float> host(rows * cols);
  for (auto& v : host) v = normal(gen);
  if (rows > 2) {
    host[1 * cols + cols / 2] = NAN;                          // NaN row
    for (int64_t k = 0; k < cols; k += 3) host[2 * cols + k] = -INFINITY;  // −inf entries
  }
  float *d_s, *d_out, *d_tau;
  cudaMalloc(&d_s, host.size() * sizeof(float));
  cudaMalloc(&d_out, host.size() * sizeof(float));
  cudaMalloc(&d_tau, rows * sizeof(float));
  cudaMemcpy(d_s, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice);
  if (spade::sparsemax_rows<float>(d_s, d_out, d_tau, rows, cols, cols, 0) != cudaSuccess) return 1;
  std::vector<float> out(host.size()), tau(rows);
  cudaMemcpy(out.data(), d_out, out.size() * sizeof(float), cudaMemcpyDeviceToHost);
  cudaMemcpy(tau.data(), d_tau, rows * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(d_s), cudaFree(d_out), cudaFree(d_tau);
  double worst = 0;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> row(host.begin() + r * cols, host.begin() + (r + 1) * cols);
    const double ref = reference_tau(row);
    if (std::isnan(ref) != std::isnan(tau[r])) return std::printf("row %lld: NaN mismatch\n", (long long)r), 1;
    if (std::isnan(ref)) continue;
    double sum = 0;
    for (int64_t k = 0; k < cols; ++k) {
      const double z = std::max(double(row[k]) - ref, 0.0);
      worst = std::max(worst, std::fabs(z - out[r * cols + k]));
      sum += out[r * cols + k];
    }
    worst = std::max(worst, std::fabs(sum - 1));
  }
  const double tol = 1e-5 + 4e-7 * 4 * scale;
  std::printf("rows %lld cols %lld scale %g: max error %.3g (tolerance %.3g)\n", (long long)rows,
              (long long)cols, scale, worst, tol);
  return worst <= tol ? 0 : 1;
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
    for (float scale : {0.01f, 1.f, 30.f}) failures += run_case(5, cols, scale, gen);
  std::printf(failures ? "%d case(s) failed\n" : "all cases passed\n", failures);
  return failures ? 1 : 0;
}
