// The vectorisable float exp/tanh/sigmoid (Note [Vectorised element-wise math]): accurate to a
// few ulp over the whole float range that matters, exact at the special values, and the same
// bits whether a value is computed in a vector lane or in the scalar remainder of a loop.
#include "server/engine/elementwise_math.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "server/engine/layers.h"
#include "server/engine/model.h"

namespace gradserve::engine {
namespace {

// Distance in units in the last place between a float result and the exact (double) value.
double UlpError(float got, double exact) {
  if (std::isinf(exact) || std::abs(exact) > std::numeric_limits<float>::max()) {
    return std::isinf(got) && (got > 0) == (exact > 0) ? 0 : INFINITY;
  }
  const float rounded = static_cast<float>(exact);
  const double ulp =
      std::max<double>(std::nextafter(std::abs(rounded), INFINITY) - std::abs(rounded),
                       std::numeric_limits<float>::denorm_min());
  return std::abs(static_cast<double>(got) - exact) / ulp;
}

// Every 97th float between -limit and limit (about 22 million values for tanh), so every
// binade and every branch of each function is visited densely.
template <typename Fn, typename Exact>
double MaxUlpError(float limit, Fn fn, Exact exact, float* worst_at) {
  double worst = 0;
  const uint32_t top = std::bit_cast<uint32_t>(limit);
  for (uint32_t bits = 0; bits <= top; bits += 97) {
    for (const float x : {std::bit_cast<float>(bits), -std::bit_cast<float>(bits)}) {
      const double error = UlpError(fn(x), exact(static_cast<double>(x)));
      if (error > worst) {
        worst = error;
        *worst_at = x;
      }
    }
  }
  return worst;
}

TEST(ElementwiseMath, TanhFloatIsWithinTwoUlp) {
  float at = 0;
  const double worst = MaxUlpError(
      20.0f, TanhFloat, [](double x) { return std::tanh(x); }, &at);
  std::printf("tanh: max %.3f ulp at %.9g\n", worst, at);
  EXPECT_LE(worst, 2.0) << "at " << at;
}

TEST(ElementwiseMath, ExpFloatIsWithinTwoUlpIncludingDenormalsAndOverflow) {
  float at = 0;
  const double worst = MaxUlpError(
      88.5f, ExpFloat, [](double x) { return std::exp(x); }, &at);
  std::printf("exp: max %.3f ulp at %.9g\n", worst, at);
  EXPECT_LE(worst, 2.0) << "at " << at;
  EXPECT_EQ(ExpFloat(89.0f), INFINITY);
  EXPECT_EQ(ExpFloat(1000.0f), INFINITY);
  EXPECT_EQ(ExpFloat(-1000.0f), 0.0f);
  EXPECT_GT(ExpFloat(-100.0f), 0.0f);  // A denormal, not flushed to zero.
  EXPECT_NEAR(ExpFloat(-100.0f), std::exp(-100.0), 2 * std::numeric_limits<float>::denorm_min());
}

TEST(ElementwiseMath, SigmoidFloatIsWithinThreeUlp) {
  float at = 0;
  const double worst = MaxUlpError(
      30.0f, SigmoidFloat, [](double x) { return 1 / (1 + std::exp(-x)); }, &at);
  std::printf("sigmoid: max %.3f ulp at %.9g\n", worst, at);
  EXPECT_LE(worst, 3.0) << "at " << at;
}

TEST(ElementwiseMath, SpecialValues) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(TanhFloat(nan)));
  EXPECT_TRUE(std::isnan(ExpFloat(nan)));
  EXPECT_TRUE(std::isnan(SigmoidFloat(nan)));
  EXPECT_EQ(TanhFloat(INFINITY), 1.0f);
  EXPECT_EQ(TanhFloat(-INFINITY), -1.0f);
  EXPECT_TRUE(std::signbit(TanhFloat(-0.0f)));
  EXPECT_FALSE(std::signbit(TanhFloat(0.0f)));
  EXPECT_EQ(ExpFloat(0.0f), 1.0f);
  EXPECT_EQ(ExpFloat(-INFINITY), 0.0f);
  EXPECT_EQ(ExpFloat(INFINITY), INFINITY);
  EXPECT_EQ(SigmoidFloat(0.0f), 0.5f);
  EXPECT_EQ(SigmoidFloat(INFINITY), 1.0f);
  EXPECT_EQ(SigmoidFloat(-INFINITY), 0.0f);
}

// A layer's output for an element does not depend on its offset in the buffer: the same values
// placed at every offset 0..31 (vector body or scalar remainder, aligned or not) give the same
// bits as computing each value alone.
TEST(ElementwiseMath, LayerOutputsDoNotDependOnPosition) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> values(101);
  for (float& v : values) v = normal(rng);
  for (const LayerKind kind : {LayerKind::kTanh, LayerKind::kSigmoid, LayerKind::kGeluTanh}) {
    LayerSpec layer;
    layer.kind = kind;
    std::vector<float> alone(values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      LayerForward<float>(layer, {}, 1, 1, &values[i], &alone[i]);
    }
    for (int offset = 0; offset < 32; ++offset) {
      std::vector<float> in(offset + values.size()), out(in.size());
      std::copy(values.begin(), values.end(), in.begin() + offset);
      LayerForward<float>(layer, {}, 1, static_cast<int64_t>(values.size()), in.data() + offset,
                          out.data() + offset);
      ASSERT_EQ(std::memcmp(out.data() + offset, alone.data(), alone.size() * sizeof(float)), 0)
          << LayerKindName(kind) << " at offset " << offset;
    }
  }
}

}  // namespace
}  // namespace gradserve::engine
