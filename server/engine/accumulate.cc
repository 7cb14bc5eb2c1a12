#include "server/engine/accumulate.h"

#include <cmath>
#include <cstring>

namespace gradserve::engine {
namespace {

template <typename T>
T Load(const void* bytes, int64_t i) {
  T value;
  std::memcpy(&value, static_cast<const char*>(bytes) + i * sizeof(T), sizeof(T));
  return value;
}

template <typename T>
void Store(void* bytes, int64_t i, T value) {
  std::memcpy(static_cast<char*>(bytes) + i * sizeof(T), &value, sizeof(T));
}

}  // namespace

template <typename T>
void AddUpdate(void* parameters, const void* update, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    Store<T>(parameters, i, static_cast<T>(Load<T>(parameters, i) + Load<T>(update, i)));
  }
}

template <typename T>
int64_t FirstNonFinite(const void* data, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(Load<T>(data, i))) return i;
  }
  return -1;
}

template <typename T>
void ScaleInto(const void* in, int64_t n, double scale, void* out) {
  for (int64_t i = 0; i < n; ++i) {
    Store<T>(out, i, static_cast<T>(scale * static_cast<double>(Load<T>(in, i))));
  }
}

GradientSums::GradientSums(const std::vector<int64_t>& elements) {
  sums_.reserve(elements.size());
  for (int64_t n : elements) sums_.emplace_back(n, 0.0);
}

int64_t GradientSums::bytes() const {
  int64_t bytes = 0;
  for (const std::vector<double>& s : sums_)
    bytes += static_cast<int64_t>(s.size() * sizeof(double));
  return bytes;
}

template <typename T>
void GradientSums::Add(int t, const void* g, double weight) {
  std::vector<double>& sums = sums_[t];
  for (size_t i = 0; i < sums.size(); ++i) sums[i] += weight * static_cast<double>(Load<T>(g, i));
}

template <typename T>
double GradientSums::Write(int t, double divisor, void* out) const {
  const std::vector<double>& sums = sums_[t];
  double squared_norm = 0;
  for (size_t i = 0; i < sums.size(); ++i) {
    const T value = static_cast<T>(sums[i] / divisor);
    Store<T>(out, i, value);
    squared_norm += static_cast<double>(value) * static_cast<double>(value);
  }
  return squared_norm;
}

#define GRADSERVE_INSTANTIATE_(T)                                  \
  template void AddUpdate<T>(void*, const void*, int64_t);         \
  template int64_t FirstNonFinite<T>(const void*, int64_t);        \
  template void ScaleInto<T>(const void*, int64_t, double, void*); \
  template void GradientSums::Add<T>(int, const void*, double);    \
  template double GradientSums::Write<T>(int, double, void*) const;
GRADSERVE_INSTANTIATE_(float)
GRADSERVE_INSTANTIATE_(double)
#undef GRADSERVE_INSTANTIATE_

}  // namespace gradserve::engine
