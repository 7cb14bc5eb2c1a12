// gradclient bench's pure parts: the --shape parser, the request it builds, percentiles.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "client/bench_command.h"

namespace gradserve::client::bench {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string ParseError(std::string_view text) {
  std::string error;
  EXPECT_FALSE(ParseShape(text, &error).has_value()) << text;
  return error;
}

TEST(BenchShape, SeedIsTheDemoNetwork) {
  std::string error;
  const std::optional<ShapeSpec> spec = ParseShape("seed", &error);
  ASSERT_TRUE(spec.has_value()) << error;
  const v1::ComputeGradientsRequest request = BuildRequest(*spec, "none");
  ASSERT_EQ(request.model().layers_size(), 2);
  EXPECT_EQ(request.model().layers(0).linear().in_features(), 4);
  EXPECT_EQ(request.model().layers(0).linear().out_features(), 2);
  EXPECT_TRUE(request.model().layers(1).has_relu());
  EXPECT_TRUE(request.model().loss().has_mse());
  EXPECT_THAT(request.inputs().shape(), ElementsAre(8, 4));
  EXPECT_EQ(request.inputs().dtype(), v1::DTYPE_FLOAT32);
  EXPECT_THAT(request.targets().shape(), ElementsAre(8, 2));
  EXPECT_TRUE(request.options().return_input_gradient());
  EXPECT_EQ(spec->FlopsPerCall(), 6.0 * 8 * 4 * 2);
}

TEST(BenchShape, SpecBuildsActivationsBetweenLinearsAndClassTargets) {
  std::string error;
  const std::optional<ShapeSpec> spec =
      ParseShape("batch=3,layers=5x4x6x2,act=tanh,loss=cross_entropy,dtype=float64,seed=1", &error);
  ASSERT_TRUE(spec.has_value()) << error;
  const v1::ComputeGradientsRequest request = BuildRequest(*spec, "sqrt");
  // Linear, tanh, Linear, tanh, Linear (no activation after the last: out_act=none).
  ASSERT_EQ(request.model().layers_size(), 5);
  EXPECT_TRUE(request.model().layers(1).has_tanh());
  EXPECT_TRUE(request.model().layers(3).has_tanh());
  EXPECT_TRUE(request.model().layers(4).has_linear());
  ASSERT_EQ(request.parameters_size(), 3);
  EXPECT_THAT(request.parameters(1).weight().shape(), ElementsAre(6, 4));
  EXPECT_EQ(request.parameters(1).weight().data().size(), 6 * 4 * sizeof(double));
  EXPECT_EQ(request.targets().dtype(), v1::DTYPE_INT64);
  EXPECT_THAT(request.targets().shape(), ElementsAre(3));
  for (int i = 0; i < 3; ++i) {
    int64_t label;
    std::memcpy(&label, request.targets().data().data() + i * sizeof(int64_t), sizeof(label));
    EXPECT_GE(label, 0);
    EXPECT_LT(label, 2);
  }
  EXPECT_EQ(request.options().checkpointing().mode(), v1::Checkpointing::MODE_SQRT);
  EXPECT_FALSE(request.options().return_input_gradient());
  EXPECT_EQ(spec->FlopsPerCall(), 6.0 * 3 * (5 * 4 + 4 * 6 + 6 * 2));
}

TEST(BenchShape, SameSpecGivesSameBytes) {
  std::string error;
  const ShapeSpec spec = *ParseShape("batch=4,layers=3x3", &error);
  EXPECT_EQ(BuildRequest(spec, "none").SerializeAsString(),
            BuildRequest(spec, "none").SerializeAsString());
  ShapeSpec other = spec;
  other.seed = 8;
  EXPECT_NE(BuildRequest(spec, "none").SerializeAsString(),
            BuildRequest(other, "none").SerializeAsString());
}

TEST(BenchShape, ErrorsNameTheKey) {
  EXPECT_THAT(ParseError("layers=4x2"), HasSubstr("batch=B is required"));
  EXPECT_THAT(ParseError("batch=8"), HasSubstr("layers=W0xW1x... is required"));
  EXPECT_THAT(ParseError("batch=0,layers=4x2"), HasSubstr("batch: expected an integer"));
  EXPECT_THAT(ParseError("batch=8x,layers=4x2"), HasSubstr("batch: expected an integer"));
  EXPECT_THAT(ParseError("batch=8,layers=4"), HasSubstr("at least two widths"));
  EXPECT_THAT(ParseError("batch=8,layers=4x0"), HasSubstr("'0' in '4x0'"));
  EXPECT_THAT(ParseError("batch=8,layers=4x2,act=swish"), HasSubstr("act: expected one of"));
  EXPECT_THAT(ParseError("batch=8,layers=4x2,loss=nll"), HasSubstr("loss: expected one of"));
  EXPECT_THAT(ParseError("batch=8,layers=4x2,dtype=bf16"), HasSubstr("dtype: expected"));
  EXPECT_THAT(ParseError("batch=8,layers=4x2,colour=red"), HasSubstr("unknown key 'colour'"));
  EXPECT_THAT(ParseError("batch=8,,layers=4x2"), HasSubstr("expected key=value"));
  EXPECT_THAT(ParseError("batch=8,layers=4x1,loss=cross_entropy"), HasSubstr("2 classes"));
  EXPECT_THAT(ParseError("batch=1048576,layers=1024x1024"), HasSubstr("under 2 GiB"));
}

TEST(BenchPercentile, NearestRank) {
  const std::vector<int64_t> one_to_hundred = [] {
    std::vector<int64_t> v;
    for (int64_t i = 1; i <= 100; ++i) v.push_back(i);
    return v;
  }();
  EXPECT_EQ(Percentile(one_to_hundred, 50), 50);
  EXPECT_EQ(Percentile(one_to_hundred, 99), 99);
  EXPECT_EQ(Percentile(one_to_hundred, 100), 100);
  EXPECT_EQ(Percentile({7}, 50), 7);
  EXPECT_EQ(Percentile({1, 2, 3}, 50), 2);
  EXPECT_EQ(Percentile({1, 2, 3}, 99), 3);
}

}  // namespace
}  // namespace gradserve::client::bench
