// Cross-entropy's row functions (cross_entropy.cc): the float path's vectorised exps give the
// loss to double accuracy and the gradient to float accuracy against the double path, the
// special rows behave, and a row's bits do not depend on where it sits in memory.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "server/engine/losses.h"

namespace gradserve::engine {
namespace {

std::vector<float> Row(std::mt19937_64& rng, int64_t width, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> z(width);
  for (float& v : z) v = normal(rng);
  return z;
}

TEST(CrossEntropyRow, FloatMatchesDoubleOnTheSameLogits) {
  std::mt19937_64 rng(5);
  double worst_loss = 0, worst_grad = 0;
  for (int64_t width : {1, 2, 7, 8, 9, 31, 64, 1000, 1024}) {
    for (float scale : {0.01f, 1.0f, 30.0f, 300.0f}) {
      const std::vector<float> z = Row(rng, width, scale);
      const std::vector<double> zd(z.begin(), z.end());
      const int64_t target = static_cast<int64_t>(rng() % width);
      const double loss = CrossEntropyRowLoss(z.data(), width, target);
      const double exact = CrossEntropyRowLoss(zd.data(), width, target);
      worst_loss = std::max(worst_loss, std::abs(loss - exact) / std::max(1.0, std::abs(exact)));
      std::vector<float> g(width);
      std::vector<double> gd(width);
      CrossEntropyRowGradient(z.data(), width, target, 0.5f, g.data());
      CrossEntropyRowGradient(zd.data(), width, target, 0.5, gd.data());
      for (int64_t j = 0; j < width; ++j) {
        worst_grad = std::max(worst_grad, std::abs(g[j] - gd[j]) / std::max(1e-6, std::abs(gd[j])));
      }
    }
  }
  EXPECT_LT(worst_loss, 1e-14);
  EXPECT_LT(worst_grad, 1e-5);
}

TEST(CrossEntropyRow, MaskedAndNonFiniteLogits) {
  const float inf = std::numeric_limits<float>::infinity();
  // -inf logits take no probability; the loss is that of the finite ones.
  const std::vector<float> z = {1.0f, -inf, 2.0f, -inf};
  const std::vector<double> zd = {1.0, 2.0};
  EXPECT_NEAR(CrossEntropyRowLoss(z.data(), 4, 2), CrossEntropyRowLoss(zd.data(), 2, 1), 1e-15);
  std::vector<float> g(4);
  CrossEntropyRowGradient(z.data(), 4, 0, 1.0f, g.data());
  EXPECT_EQ(g[1], 0.0f);
  EXPECT_EQ(g[3], 0.0f);
  EXPECT_NEAR(g[0] + g[2], 0.0f, 1e-7);
  // A NaN logit makes the row's loss and gradient NaN.
  const std::vector<float> bad = {0.0f, std::nanf(""), 1.0f};
  EXPECT_TRUE(std::isnan(CrossEntropyRowLoss(bad.data(), 3, 0)));
  CrossEntropyRowGradient(bad.data(), 3, 0, 1.0f, g.data());
  EXPECT_TRUE(std::isnan(g[0]) && std::isnan(g[2]));
}

TEST(CrossEntropyRow, SameBitsAtEveryAddress) {
  std::mt19937_64 rng(6);
  const int64_t width = 77;  // Vector body and scalar remainder both used.
  const std::vector<float> z = Row(rng, width, 5.0f);
  double loss0 = 0;
  std::vector<float> g0(width);
  for (int offset = 0; offset < 16; ++offset) {
    std::vector<float> zs(width + 16), gs(width + 16);
    std::memcpy(zs.data() + offset, z.data(), sizeof(float) * width);
    const double loss = CrossEntropyRowLoss(zs.data() + offset, width, 3);
    CrossEntropyRowGradient(zs.data() + offset, width, 3, 0.25f, gs.data() + offset);
    if (offset == 0) {
      loss0 = loss;
      std::memcpy(g0.data(), gs.data(), sizeof(float) * width);
      continue;
    }
    EXPECT_EQ(std::memcmp(&loss, &loss0, sizeof(double)), 0) << "offset " << offset;
    EXPECT_EQ(std::memcmp(gs.data() + offset, g0.data(), sizeof(float) * width), 0)
        << "offset " << offset;
  }
}

}  // namespace
}  // namespace gradserve::engine
