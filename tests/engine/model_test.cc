// Model::Create: width chaining, Linear numbering, which activations a backward pass reads, and
// the INVALID_ARGUMENT errors that name the offending field.
#include "server/engine/model.h"

#include <cmath>
#include <limits>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/layer_specs.h"

namespace gradserve::engine {
namespace {

using ::testing::HasSubstr;

constexpr LayerKind kAllLayerKinds[] = {
    LayerKind::kLinear, LayerKind::kReLU, LayerKind::kLeakyReLU, LayerKind::kSigmoid,
    LayerKind::kTanh,   LayerKind::kGelu, LayerKind::kGeluTanh,  LayerKind::kIdentity};

LayerSpec LeakyReLU(double slope) {
  LayerSpec layer = Activation(LayerKind::kLeakyReLU);
  layer.negative_slope = slope;
  return layer;
}

ModelSpec Spec(std::vector<LayerSpec> layers, LossKind loss = LossKind::kMse) {
  ModelSpec spec;
  spec.layers = std::move(layers);
  spec.loss.kind = loss;
  return spec;
}

// Expects INVALID_ARGUMENT whose message contains every one of `parts`.
void ExpectInvalidArgument(const absl::StatusOr<Model>& model, std::vector<std::string> parts) {
  ASSERT_FALSE(model.ok()) << "expected an error mentioning " << parts.front();
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument) << model.status();
  for (const std::string& part : parts) {
    EXPECT_THAT(std::string(model.status().message()), HasSubstr(part));
  }
}

TEST(ModelCreate, ChainsWidthsFromTheInputsThroughEveryLayer) {
  absl::StatusOr<Model> model =
      Model::Create(Spec({Linear(3, 5), Activation(LayerKind::kReLU), Linear(5, 2, false),
                          Activation(LayerKind::kTanh), Activation(LayerKind::kIdentity)}),
                    3);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->num_layers(), 5);
  const std::vector<int64_t> expected_widths = {3, 5, 5, 2, 2, 2};
  for (int k = 0; k <= model->num_layers(); ++k) {
    EXPECT_EQ(model->width(k), expected_widths[k]) << "activation a_" << k;
  }
  EXPECT_EQ(model->input_features(), 3);
  EXPECT_EQ(model->output_features(), 2);
  EXPECT_EQ(model->max_width(), 5);
}

TEST(ModelCreate, ActivationOnlyModelsKeepTheInputWidth) {
  absl::StatusOr<Model> model = Model::Create(
      Spec({Activation(LayerKind::kSigmoid), Activation(LayerKind::kGelu)}, LossKind::kL1), 7);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->width(0), 7);
  EXPECT_EQ(model->width(1), 7);
  EXPECT_EQ(model->width(2), 7);
  EXPECT_EQ(model->num_linear(), 0);
  EXPECT_EQ(model->num_parameters(), 0);
}

TEST(ModelCreate, NumbersLinearLayersInModelOrder) {
  absl::StatusOr<Model> model =
      Model::Create(Spec({Linear(3, 5), Activation(LayerKind::kReLU), Linear(5, 4, false),
                          Activation(LayerKind::kTanh), Linear(4, 2)}),
                    3);
  ASSERT_TRUE(model.ok()) << model.status();
  ASSERT_EQ(model->num_linear(), 3);
  EXPECT_EQ(model->linear_layer(0), 0);
  EXPECT_EQ(model->linear_layer(1), 2);
  EXPECT_EQ(model->linear_layer(2), 4);
  const std::vector<int> expected_index = {0, -1, 1, -1, 2};
  for (int i = 0; i < model->num_layers(); ++i) {
    EXPECT_EQ(model->linear_index(i), expected_index[i]) << "layer " << i;
  }
  // (5*3 + 5) + (4*5, no bias) + (2*4 + 2).
  EXPECT_EQ(model->num_parameters(), 20 + 20 + 10);
}

TEST(ModelCreate, MarksExactlyTheActivationsSomeBackwardPassReads) {
  // Layer i maps a_i to a_{i+1}. Linear, LeakyReLU and both GELUs read their input; ReLU,
  // Sigmoid and Tanh read their output; Identity reads nothing.
  absl::StatusOr<Model> model = Model::Create(Spec({Linear(2, 3),                      // reads a_0
                                                    Activation(LayerKind::kReLU),      // reads a_2
                                                    Activation(LayerKind::kIdentity),  // -
                                                    Activation(LayerKind::kSigmoid),   // reads a_4
                                                    LeakyReLU(0.1),                    // reads a_4
                                                    Activation(LayerKind::kGelu),      // reads a_5
                                                    Activation(LayerKind::kIdentity),  // -
                                                    Activation(LayerKind::kGeluTanh),  // reads a_7
                                                    Activation(LayerKind::kTanh),      // reads a_9
                                                    Activation(LayerKind::kIdentity)}),
                                              2);
  ASSERT_TRUE(model.ok()) << model.status();
  const std::vector<bool> expected = {true,  false, true,  false, true, true,
                                      false, true,  false, true,  false};
  ASSERT_EQ(static_cast<int>(expected.size()), model->num_layers() + 1);
  for (int k = 0; k <= model->num_layers(); ++k) {
    EXPECT_EQ(model->activation_needed(k), expected[k]) << "activation a_" << k;
  }
}

TEST(BackwardReads, EveryKindReadsItsInputOrItsOutputOrNothing) {
  struct Expected {
    LayerKind kind;
    bool input;
    bool output;
  };
  const Expected table[] = {
      {LayerKind::kLinear, true, false},    {LayerKind::kReLU, false, true},
      {LayerKind::kLeakyReLU, true, false}, {LayerKind::kSigmoid, false, true},
      {LayerKind::kTanh, false, true},      {LayerKind::kGelu, true, false},
      {LayerKind::kGeluTanh, true, false},  {LayerKind::kIdentity, false, false},
  };
  for (const Expected& e : table) {
    EXPECT_EQ(BackwardReadsInput(e.kind), e.input) << LayerKindName(e.kind);
    EXPECT_EQ(BackwardReadsOutput(e.kind), e.output) << LayerKindName(e.kind);
  }
}

TEST(LayerKindName, UsesTheApiOneofNames) {
  EXPECT_EQ(LayerKindName(LayerKind::kLinear), "linear");
  EXPECT_EQ(LayerKindName(LayerKind::kReLU), "relu");
  EXPECT_EQ(LayerKindName(LayerKind::kLeakyReLU), "leaky_relu");
  EXPECT_EQ(LayerKindName(LayerKind::kSigmoid), "sigmoid");
  EXPECT_EQ(LayerKindName(LayerKind::kTanh), "tanh");
  EXPECT_EQ(LayerKindName(LayerKind::kGelu), "gelu");
  EXPECT_EQ(LayerKindName(LayerKind::kGeluTanh), "gelu");
  EXPECT_EQ(LayerKindName(LayerKind::kIdentity), "identity");
  for (LayerKind kind : kAllLayerKinds) EXPECT_NE(LayerKindName(kind), "unknown");
}

TEST(LossKindName, UsesTheApiOneofNames) {
  EXPECT_EQ(LossKindName(LossKind::kMse), "mse");
  EXPECT_EQ(LossKindName(LossKind::kL1), "l1");
  EXPECT_EQ(LossKindName(LossKind::kHuber), "huber");
  EXPECT_EQ(LossKindName(LossKind::kCrossEntropy), "cross_entropy");
  EXPECT_EQ(LossKindName(LossKind::kBceWithLogits), "bce_with_logits");
  EXPECT_EQ(LossKindName(LossKind::kExternal), "external");
}

TEST(ModelCreate, KeepsTheSpecItWasGiven) {
  ModelSpec spec = Spec({Linear(2, 3, false), LeakyReLU(-0.25)}, LossKind::kHuber);
  spec.layers[0].name = "fc1";
  spec.loss.reduction = Reduction::kSum;
  spec.loss.huber_delta = 0.5;
  absl::StatusOr<Model> model = Model::Create(spec, 2);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->layer(0).name, "fc1");
  EXPECT_FALSE(model->layer(0).bias);
  EXPECT_EQ(model->layer(1).negative_slope, -0.25);
  EXPECT_EQ(model->loss().kind, LossKind::kHuber);
  EXPECT_EQ(model->loss().reduction, Reduction::kSum);
  EXPECT_EQ(model->loss().huber_delta, 0.5);
}

TEST(ModelCreate, RejectsAModelWithoutLayers) {
  ExpectInvalidArgument(Model::Create(Spec({}), 3), {"model.layers"});
}

TEST(ModelCreate, RejectsInputsWithoutColumns) {
  ExpectInvalidArgument(Model::Create(Spec({Activation(LayerKind::kReLU)}), 0),
                        {"inputs.shape[1]"});
  ExpectInvalidArgument(Model::Create(Spec({Activation(LayerKind::kReLU)}), -2),
                        {"inputs.shape[1]"});
}

TEST(ModelCreate, NamesTheFirstLinearWhenItDoesNotMatchTheInputs) {
  ExpectInvalidArgument(Model::Create(Spec({Linear(5, 3)}), 4),
                        {"model.layers[0].linear.in_features", "expected 4", "got 5"});
}

TEST(ModelCreate, NamesTheLinearWhoseInFeaturesBreakTheChain) {
  ExpectInvalidArgument(
      Model::Create(Spec({Linear(4, 3), Activation(LayerKind::kReLU), Linear(4, 2)}), 4),
      {"model.layers[2].linear.in_features", "expected 3", "model.layers[1]", "got 4"});
}

TEST(ModelCreate, NamesTheNonPositiveLinearWidth) {
  ExpectInvalidArgument(
      Model::Create(Spec({Linear(4, 3), Activation(LayerKind::kTanh), Linear(3, 0)}), 4),
      {"model.layers[2].linear.out_features", "got 0"});
  ExpectInvalidArgument(Model::Create(Spec({Linear(4, -1)}), 4),
                        {"model.layers[0].linear.out_features", "got -1"});
  ExpectInvalidArgument(Model::Create(Spec({Activation(LayerKind::kTanh), Linear(0, 3)}), 4),
                        {"model.layers[1].linear.in_features", "got 0"});
}

TEST(ModelCreate, RejectsANonFiniteLeakySlope) {
  for (double slope :
       {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
        -std::numeric_limits<double>::infinity()}) {
    SCOPED_TRACE(slope);
    ExpectInvalidArgument(Model::Create(Spec({Linear(2, 2), LeakyReLU(slope)}), 2),
                          {"model.layers[1].leaky_relu.negative_slope"});
  }
}

TEST(ModelCreate, AcceptsAnyFiniteLeakySlope) {
  for (double slope : {0.01, 0.0, -0.5, 3.0}) {
    absl::StatusOr<Model> model = Model::Create(Spec({LeakyReLU(slope)}), 2);
    EXPECT_TRUE(model.ok()) << "slope " << slope << ": " << model.status();
  }
}

TEST(ModelCreate, RejectsAHuberDeltaThatIsNotAPositiveNumber) {
  for (double delta : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN(),
                       std::numeric_limits<double>::infinity()}) {
    SCOPED_TRACE(delta);
    ModelSpec spec = Spec({Linear(2, 2)}, LossKind::kHuber);
    spec.loss.huber_delta = delta;
    ExpectInvalidArgument(Model::Create(spec, 2), {"model.loss.huber.delta"});
  }
}

TEST(ModelCreate, IgnoresTheHuberDeltaOfOtherLosses) {
  ModelSpec spec = Spec({Linear(2, 2)}, LossKind::kMse);
  spec.loss.huber_delta = 0;
  absl::StatusOr<Model> model = Model::Create(spec, 2);
  EXPECT_TRUE(model.ok()) << model.status();
}

}  // namespace
}  // namespace gradserve::engine
