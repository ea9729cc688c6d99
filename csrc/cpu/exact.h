// CPU twin of spade/exact.cuh: exact sparsemax codes over one row's
// candidate set.  D is recomputed directly (float64 accumulation), scores are
// taken relative to the nearest candidate, τ is exact (Michelot), and the
// support is written sorted by value descending, zero padded to `width`.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "select.h"

namespace spade::cpu {

template <typename T>
void exact_codes_row(const T* x, const T* A, int64_t d, const int64_t* cand, int64_t width, T lam, T* values,
                     int64_t* indices, int64_t& support_size, T* dist, std::vector<T>& D, std::vector<T>& s,
                     std::vector<std::pair<T, int64_t>>& support) {
  const T inf = std::numeric_limits<T>::infinity();
  D.assign(width, inf);
  T dmin = inf;
  for (int64_t j = 0; j < width; ++j) {
    if (cand[j] < 0) continue;
    const T* a = A + cand[j] * d;
    double acc = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      const double diff = static_cast<double>(x[i]) - static_cast<double>(a[i]);
      acc += diff * diff;
    }
    D[j] = static_cast<T>(acc);
    dmin = std::min(dmin, D[j]);
  }
  support.clear();
  if (dmin < inf) {
    for (int64_t j = 0; j < width; ++j)
      if (D[j] < inf) support.emplace_back(-lam * (D[j] - dmin), j);
    s.resize(support.size());  // (the caller's buffers: no allocation per row)
    for (size_t i = 0; i < support.size(); ++i) s[i] = support[i].first;
    const T tau = buffer_tau(s.data(), static_cast<int64_t>(s.size()));
    support.erase(std::remove_if(support.begin(), support.end(), [&](const auto& p) { return !(p.first > tau); }),
                  support.end());
    for (auto& p : support) p.first -= tau;
    std::sort(support.begin(), support.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  }
  support_size = static_cast<int64_t>(support.size());
  for (int64_t r = 0; r < width; ++r) {
    const bool in = r < support_size;
    values[r] = in ? support[r].first : T(0);
    indices[r] = in ? cand[support[r].second] : 0;
    dist[r] = in ? D[support[r].second] : T(0);
  }
}

}  // namespace spade::cpu
