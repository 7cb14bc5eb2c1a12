// What a training loop adds up between gradient calls: parameter updates (p = p + u) and the
// float64 sums of micro-batch gradients (StreamGradients holds both for its caller). Engine
// operations on plain arrays, so the service only moves tensors in and out of messages.
//
// Tensors are raw little-endian arrays of T at any address: protobuf byte strings guarantee no
// alignment, so every element is read and written with memcpy (which compiles to plain loads).
#ifndef GRADSERVE_ENGINE_ACCUMULATE_H_
#define GRADSERVE_ENGINE_ACCUMULATE_H_

#include <cstdint>
#include <vector>

namespace gradserve::engine {

// parameters[i] = parameters[i] + update[i], rounded once in T: what a caller does to its own
// copy, so the two stay bit-identical step after step.
template <typename T>
void AddUpdate(void* parameters, const void* update, int64_t n);

// The index of the first NaN or +-Inf among n values of T, or -1.
template <typename T>
int64_t FirstNonFinite(const void* data, int64_t n);

// out[i] = T(scale * in[i]), computed in double (a micro-batch's input gradients rescaled from
// its own mean to the whole batch's).
template <typename T>
void ScaleInto(const void* in, int64_t n, double scale, void* out);

// Weighted sums of several gradient tensors in float64, rounded to the call's dtype once, when
// written (Note [Micro-batch accumulation] in server/service/stream.cc says which weights).
class GradientSums {
 public:
  GradientSums() = default;
  // One zero sum per tensor, of these element counts.
  explicit GradientSums(const std::vector<int64_t>& elements);

  int tensors() const { return static_cast<int>(sums_.size()); }
  int64_t elements(int t) const { return static_cast<int64_t>(sums_[t].size()); }
  int64_t bytes() const;  // What the sums hold.
  // sums[t] += weight * g, g holding elements(t) values of T.
  template <typename T>
  void Add(int t, const void* g, double weight);
  // out = T(sums[t] / divisor); returns the squared Euclidean norm of what it wrote.
  template <typename T>
  double Write(int t, double divisor, void* out) const;

 private:
  std::vector<std::vector<double>> sums_;
};

}  // namespace gradserve::engine

#endif  // GRADSERVE_ENGINE_ACCUMULATE_H_
