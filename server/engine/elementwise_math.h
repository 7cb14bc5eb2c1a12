// exp, tanh and sigmoid for float that the compiler can vectorise, with results that do not
// depend on where a value sits in memory.
//
// Note [Vectorised element-wise math]
// glibc's scalar tanhf costs ~15 ns an element; in a 64-layer tanh network it took more time
// than every matrix product together. These functions are written in plain float arithmetic
// (no table, no branch the vectoriser cannot turn into a select, no libm call) so that an
// `omp simd` loop runs them 8 or 16 lanes at a time. Every lane and the scalar remainder do the
// same IEEE operations in the same order: layers.cc, which uses them, is compiled with
// -ffp-contract=off so that the compiler may not fuse a multiply and an add in one copy of the
// loop and not in the other. A value therefore gets the same bits wherever it sits, which
// checkpointing needs (it recomputes activations into other buffers and must reproduce them).
// Accuracy: a few ulp (tested against the double-precision std:: functions over a dense sweep
// of floats), the same order as PyTorch's own vectorised float kernels (SLEEF, 1 ulp). Float64
// keeps the scalar std:: functions: correctly rounded to the last digit is what float64
// callers compare against.
#ifndef GRADSERVE_ENGINE_ELEMENTWISE_MATH_H_
#define GRADSERVE_ENGINE_ELEMENTWISE_MATH_H_

#include <bit>
#include <cmath>
#include <cstdint>

namespace gradserve::engine {

// 2^n for an integer-valued n in [-126, 127], by writing the exponent bits.
inline float Pow2(int32_t n) { return std::bit_cast<float>((n + 127) << 23); }

// e^x (Cephes expf): x = n ln2 + r with |r| <= ln2/2, e^r by a degree-7 polynomial, then
// scaled by 2^n in two halves so that results down to denormals and up to FLT_MAX come out
// right. Overflows to +inf, underflows to 0, NaN stays NaN.
inline float ExpFloat(float x) {
  const bool is_nan = x != x;
  // Beyond these e^x is inf or 0 in float; clamping keeps n small. NaN goes through as 0.
  float clamped = x > 89.0f ? 89.0f : x;
  clamped = clamped < -104.0f ? -104.0f : clamped;
  clamped = is_nan ? 0.0f : clamped;
  // n = round(x / ln2): adding 1.5 * 2^23 leaves the rounded integer in the low mantissa bits
  // (round to nearest even, in plain SSE2 arithmetic, no rounding instruction needed).
  constexpr float kShifter = 12582912.0f;
  const float shifted = clamped * 1.44269504088896341f + kShifter;
  const float n = shifted - kShifter;
  const int32_t n_int = std::bit_cast<int32_t>(shifted) - std::bit_cast<int32_t>(kShifter);
  // r = x - n ln2, with ln2 split in two so that n * ln2_high is exact.
  const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = (p * (r * r) + r) + 1.0f;
  // 2^n as 2^(n/2) * 2^(n - n/2): each factor stays a normal float for n in [-150, 128].
  const int32_t half = n_int >> 1;
  const float y = e_r * Pow2(half) * Pow2(n_int - half);
  return is_nan ? x : y;
}

// tanh(x) (Cephes tanhf): an odd polynomial for |x| < 0.625, where 1 - 2 / (e^2|x| + 1) would
// cancel, that formula elsewhere. tanh(+-0) = +-0, tanh(+-inf) = +-1, NaN stays NaN.
inline float TanhFloat(float x) {
  const float a = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = (p * z) * x + x;
  const float e = ExpFloat(2.0f * a);  // +inf for large |x|: then 2 / (e + 1) is 0.
  const float large = std::copysign(1.0f - 2.0f / (e + 1.0f), x);
  const float y = a < 0.625f ? small : large;
  return (a == 0.0f || x != x) ? x : y;  // Keeps -0 and NaN as they are.
}

// 1 / (1 + e^-x), the formula the scalar kernel and PyTorch use.
inline float SigmoidFloat(float x) { return 1.0f / (1.0f + ExpFloat(-x)); }

// The element-wise functions the kernels call, by type: the vectorisable ones for float, the
// correctly rounded scalar ones for double.
template <typename T>
T Tanh(T x) {
  if constexpr (sizeof(T) == 4) {
    return TanhFloat(x);
  } else {
    return std::tanh(x);
  }
}

template <typename T>
T Sigmoid(T x) {
  if constexpr (sizeof(T) == 4) {
    return SigmoidFloat(x);
  } else {
    return T(1) / (T(1) + std::exp(-x));
  }
}

// GELU as PyTorch's kernels compute it, with the constants as they spell them, so float results
// round the same way. The chain's layers and the graph's Gelu both call these, in files compiled
// with -ffp-contract=off, so the two forms give the same bits.
inline constexpr double kSqrtHalf = 0.70710678118654752440;     // 1/sqrt(2)
inline constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/sqrt(2 pi)
inline constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2/pi)
inline constexpr double kGeluCubic = 0.044715;

// y = x Phi(x).
template <typename T>
T Gelu(T x) {
  return x * T(0.5) * (T(1) + std::erf(x * T(kSqrtHalf)));
}

// dy/dx = Phi(x) + x phi(x).
template <typename T>
T GeluDerivative(T x) {
  const T cdf = T(0.5) * (T(1) + std::erf(x * T(kSqrtHalf)));
  const T pdf = T(kInvSqrt2Pi) * std::exp(T(-0.5) * x * x);
  return cdf + x * pdf;
}

// y = x/2 (1 + tanh(u)), u = c (x + k x^3).
template <typename T>
T GeluTanh(T x) {
  const T inner = T(kSqrt2OverPi) * (x + T(kGeluCubic) * x * x * x);
  return T(0.5) * x * (T(1) + Tanh<T>(inner));
}

template <typename T>
T GeluTanhDerivative(T x) {
  const T x_sq = x * x;
  const T tanh_inner = Tanh<T>(T(kSqrt2OverPi) * (x + T(kGeluCubic) * x_sq * x));
  const T left_derivative = T(0.5) * (T(1) + tanh_inner);
  const T right_derivative = T(1) - tanh_inner * tanh_inner;
  const T inner_derivative = T(kSqrt2OverPi) * (T(1) + T(3 * kGeluCubic) * x_sq);
  return left_derivative + T(0.5) * x * right_derivative * inner_derivative;
}

}  // namespace gradserve::engine

#endif  // GRADSERVE_ENGINE_ELEMENTWISE_MATH_H_
