// Cross-entropy's gradient, one row of logits at a time: shared by the chain's loss
// (losses.cc) and the graph executor, so that the graph form of a chain gets its bits.
//
// Compiled with -ffp-contract=off (Note [Vectorised element-wise math]): the vector lanes and
// the scalar remainder of each loop do the same operations, so a row's result does not depend
// on where it sits in memory.
#include <bit>
#include <cmath>
#include <cstdint>

#include "server/engine/elementwise_math.h"
#include "server/engine/losses.h"

namespace gradserve::engine {
namespace {

constexpr int kLanes = 8;

// max over z[0, n): each element into lane j % kLanes, then the lanes in order (max is exact, so
// only NaNs could tell orders apart, and a NaN makes the whole row NaN anyway).
float RowMax(const float* z, int64_t n) {
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = z[0];
  const int64_t full = n - n % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] = z[j + l] > lanes[l] ? z[j + l] : lanes[l];
  }
  for (int64_t j = full; j < n; ++j) lanes[0] = z[j] > lanes[0] ? z[j] : lanes[0];
  float max = lanes[0];
  for (int l = 1; l < kLanes; ++l) max = lanes[l] > max ? lanes[l] : max;
  return max;
}

// sum over e[0, n) in double, element j in lane j % kLanes, the lanes added in a fixed tree.
double RowSum(const float* e, int64_t n) {
  double lanes[kLanes] = {};
  const int64_t full = n - n % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(e[j + l]);
  }
  for (int64_t j = full; j < n; ++j) lanes[j - full] += static_cast<double>(e[j]);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// e^x in double for the float path's loss (x = z - max <= 0, or NaN): x = n ln2 + r with
// |r| <= ln2/2, e^r by its Taylor series to r^13 (truncation < 1e-17 relative), scaled by 2^n
// in two halves so that results down to denormals come out right. Plain arithmetic, so an `omp
// simd` loop runs it 8 lanes at a time; within a few ulp of std::exp.
double ExpDouble(double x) {
  const bool is_nan = x != x;
  double clamped = x > 709.0 ? 709.0 : x;
  clamped = clamped < -746.0 ? -746.0 : clamped;
  clamped = is_nan ? 0.0 : clamped;
  constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52: rounds to an integer.
  const double shifted = clamped * 1.4426950408889634 + kShifter;
  const double n = shifted - kShifter;
  const int64_t n_int = std::bit_cast<int64_t>(shifted) - std::bit_cast<int64_t>(kShifter);
  // ln2 split so that n * ln2_high is exact for |n| < 2^11.
  const double r = (clamped - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  const double e_r = (p * (r * r) + r) + 1.0;
  const int64_t half = n_int >> 1;
  const auto pow2 = [](int64_t k) { return std::bit_cast<double>((k + 1023) << 52); };
  const double y = e_r * pow2(half) * pow2(n_int - half);
  return is_nan ? x : y;
}

}  // namespace

// float: log(sum(e^(z - max))) + max - z[target] in double, e^ by ExpDouble eight lanes at a
// time, summed in eight fixed lanes. (One libm exp per logit cost a GPT-2 step's 1024 x 1024
// logits ~6 ms on one core.)
template <>
double CrossEntropyRowLoss<float>(const float* z, int64_t width, int64_t target) {
  const double max = RowMax(z, width);
  double lanes[kLanes] = {};
  const int64_t full = width - width % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] += ExpDouble(static_cast<double>(z[j + l]) - max);
  }
  for (int64_t j = full; j < width; ++j) {
    lanes[j - full] += ExpDouble(static_cast<double>(z[j]) - max);
  }
  const double sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                     ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  return max + std::log(sum) - static_cast<double>(z[target]);
}

// double: std::exp, summed in order (correctly rounded exps, what float64 callers compare
// against).
template <>
double CrossEntropyRowLoss<double>(const double* z, int64_t width, int64_t target) {
  double max = z[0];
  for (int64_t j = 1; j < width; ++j) max = z[j] > max ? z[j] : max;
  double sum = 0;
  for (int64_t j = 0; j < width; ++j) sum += std::exp(z[j] - max);
  return max + std::log(sum) - z[target];
}

// float: e^(z - max) by the vectorised ExpFloat, written into g and summed in double, then g
// scaled by weight / sum. (Three scalar libm exps per element, as log-sum-exp's form took, cost
// a GPT-2 step's 1024 x 1024 logits ~10 ms on one core; this is ~1 ms.)
template <>
void CrossEntropyRowGradient<float>(const float* z, int64_t width, int64_t target, float weight,
                                    float* g) {
  const float max = RowMax(z, width);
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) g[j] = ExpFloat(z[j] - max);
  const float scale = static_cast<float>(static_cast<double>(weight) / RowSum(g, width));
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) g[j] = g[j] * scale;
  g[target] -= weight;
}

// double: e^(z - log(sum(e^(z - max))) - max), correctly rounded std::exp throughout (what
// float64 callers compare against).
template <>
void CrossEntropyRowGradient<double>(const double* z, int64_t width, int64_t target, double weight,
                                     double* g) {
  double max = z[0];
  for (int64_t j = 1; j < width; ++j) max = z[j] > max ? z[j] : max;
  double sum = 0;
  for (int64_t j = 0; j < width; ++j) sum += std::exp(z[j] - max);
  const double log_sum = max + std::log(sum);
  for (int64_t j = 0; j < width; ++j) g[j] = std::exp(z[j] - log_sum) * weight;
  g[target] -= weight;
}

}  // namespace gradserve::engine
