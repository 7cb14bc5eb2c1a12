// Analytic gradients (RunBackprop) against central finite differences of the forward loss, in
// float64, for every layer kind, every loss and both reductions, and for random deep stacks;
// the engine's own CheckGradients on the same cases; and determinism across repeated calls.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/engine/backprop.h"
#include "server/engine/checkpoint.h"
#include "server/engine/gradient_check.h"
#include "server/engine/layers.h"
#include "server/engine/losses.h"
#include "server/engine/model.h"
#include "tests/engine/layer_specs.h"

namespace gradserve::engine {
namespace {

// NOTE: finite differences across a kink (ReLU and LeakyReLU at 0, L1 at a zero residual, Huber
// at |residual| == delta) measure the wrong derivative. Test data are resampled until every
// such value is at least kKinkMargin away from its kink, and every finite difference checks that
// its largest perturbation, 3 kStep, moved no value across one.
constexpr double kKinkMargin = 2e-2;
constexpr double kStep = 3e-3;

// Pass criterion for analytic vs numerical: relative error below kMaxRelError where
// max(|a|, |n|) > kRelativeFloorForTest, absolute error below kMaxAbsError elsewhere.
constexpr double kMaxRelError = 1e-6;
constexpr double kRelativeFloorForTest = 1e-7;
constexpr double kMaxAbsError = 1e-8;

constexpr int64_t kBatch = 3;

bool HasKinkAtZero(LayerKind kind) {
  return kind == LayerKind::kReLU || kind == LayerKind::kLeakyReLU;
}

// A model with float64 parameters and a batch, all owned here.
class Problem {
 public:
  Problem(Model model, int64_t batch) : model_(std::move(model)), batch_(batch) {}

  const Model& model() const { return model_; }
  int64_t batch() const { return batch_; }

  // Draws parameters and data from `seed`: inputs ~ N(0, 1), weights scaled so that
  // pre-activations stay O(1), targets suited to the loss.
  void Fill(uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0, 1);
    std::uniform_real_distribution<double> uniform(-1, 1);
    const int num_linear = model_.num_linear();
    weights_.assign(num_linear, {});
    biases_.assign(num_linear, {});
    for (int l = 0; l < num_linear; ++l) {
      const LayerSpec& layer = model_.layer(model_.linear_layer(l));
      const double scale = 1.5 * std::sqrt(3.0 / layer.in_features);
      for (int64_t j = 0; j < layer.out_features * layer.in_features; ++j) {
        weights_[l].push_back(scale * uniform(rng));
      }
      if (layer.bias) {
        for (int64_t j = 0; j < layer.out_features; ++j) biases_[l].push_back(0.5 * uniform(rng));
      }
    }
    inputs_.clear();
    for (int64_t j = 0; j < batch_ * model_.input_features(); ++j) inputs_.push_back(normal(rng));
    const int64_t out = batch_ * model_.output_features();
    targets_.clear();
    output_gradient_.clear();
    classes_.clear();
    for (int64_t j = 0; j < out; ++j) {
      targets_.push_back(model_.loss().kind == LossKind::kBceWithLogits ? 0.5 * (1 + uniform(rng))
                                                                        : normal(rng));
      output_gradient_.push_back(normal(rng));
    }
    std::uniform_int_distribution<int64_t> label(0, model_.output_features() - 1);
    for (int64_t b = 0; b < batch_; ++b) classes_.push_back(label(rng));
  }

  std::vector<LinearParamsView<double>> Params() const {
    std::vector<LinearParamsView<double>> params;
    for (int l = 0; l < model_.num_linear(); ++l) {
      params.push_back({weights_[l].data(), biases_[l].empty() ? nullptr : biases_[l].data()});
    }
    return params;
  }

  BatchView<double> Batch() const {
    BatchView<double> batch;
    batch.batch = batch_;
    batch.inputs = inputs_.data();
    switch (model_.loss().kind) {
      case LossKind::kCrossEntropy:
        batch.targets.class_targets = classes_.data();
        break;
      case LossKind::kExternal:
        batch.targets.output_gradient = output_gradient_.data();
        break;
      default:
        batch.targets.targets = targets_.data();
        break;
    }
    return batch;
  }

  // Every differentiable scalar the loss depends on, by tensor name, for perturbation.
  std::vector<std::pair<std::string, std::vector<double>*>> Tensors() {
    std::vector<std::pair<std::string, std::vector<double>*>> tensors;
    for (int l = 0; l < model_.num_linear(); ++l) {
      tensors.push_back({"parameters[" + std::to_string(l) + "].weight", &weights_[l]});
      if (!biases_[l].empty()) {
        tensors.push_back({"parameters[" + std::to_string(l) + "].bias", &biases_[l]});
      }
    }
    tensors.push_back({"inputs", &inputs_});
    return tensors;
  }

  // Forward pass in the test, checking that every ReLU / LeakyReLU input and every L1 / Huber
  // residual is at least `margin` away from its kink. An exact zero that a ReLU produced (and
  // that Identity, ReLU, LeakyReLU, Tanh or GELU, all with f(0) = 0, carried on) stays exactly
  // zero under small perturbations, so it is not a kink crossing.
  struct KinkReport {
    bool clear = true;
    int below_kink = 0;  // Kink-layer inputs < 0 (or L1 residuals < 0, Huber |d| < delta).
    int above_kink = 0;
  };
  KinkReport CheckKinks(double margin) const {
    KinkReport report;
    Traverse(margin, &report, nullptr);
    return report;
  }

  // Which side of its kink each kink-sensitive value is on.
  std::vector<int8_t> KinkSides() const {
    std::vector<int8_t> sides;
    Traverse(0, nullptr, &sides);
    return sides;
  }

 private:
  void Traverse(double margin, KinkReport* report, std::vector<int8_t>* sides) const {
    auto visit = [&](double distance, bool below) {
      if (report != nullptr) {
        if (distance < margin) report->clear = false;
        (below ? report->below_kink : report->above_kink) += 1;
      }
      if (sides != nullptr) sides->push_back(below ? -1 : 1);
    };
    std::vector<double> a = inputs_;
    std::vector<bool> stable_zero(a.size(), false);
    const std::vector<LinearParamsView<double>> params = Params();
    for (int i = 0; i < model_.num_layers(); ++i) {
      const LayerSpec& layer = model_.layer(i);
      if (HasKinkAtZero(layer.kind)) {
        for (size_t j = 0; j < a.size(); ++j) {
          if (!stable_zero[j]) visit(std::abs(a[j]), a[j] < 0);
        }
      }
      std::vector<double> out(batch_ * model_.width(i + 1));
      const int linear = model_.linear_index(i);
      LayerForward<double>(layer, linear < 0 ? LinearParamsView<double>{} : params[linear], batch_,
                           model_.width(i), a.data(), out.data());
      if (layer.kind == LayerKind::kLinear || layer.kind == LayerKind::kSigmoid) {
        stable_zero.assign(out.size(), false);
      } else if (layer.kind == LayerKind::kReLU ||
                 (layer.kind == LayerKind::kLeakyReLU && layer.negative_slope == 0)) {
        for (size_t j = 0; j < a.size(); ++j) stable_zero[j] = stable_zero[j] || a[j] < 0;
      }
      a = std::move(out);
    }
    const LossSpec& loss = model_.loss();
    if (loss.kind == LossKind::kL1) {
      for (size_t j = 0; j < a.size(); ++j) {
        visit(std::abs(a[j] - targets_[j]), a[j] < targets_[j]);
      }
    } else if (loss.kind == LossKind::kHuber) {
      for (size_t j = 0; j < a.size(); ++j) {
        const double residual = std::abs(a[j] - targets_[j]);
        visit(std::abs(residual - loss.huber_delta), residual < loss.huber_delta);
      }
    }
  }

  Model model_;
  int64_t batch_;
  std::vector<std::vector<double>> weights_, biases_;
  std::vector<double> inputs_, targets_, output_gradient_;
  std::vector<int64_t> classes_;
};

// A problem for spec whose data keep kKinkMargin away from every kink, drawn from seeds derived
// from `seed`; null (with a test failure) if none of many draws does.
std::unique_ptr<Problem> MakeProblem(const ModelSpec& spec, int64_t input_features, uint64_t seed,
                                     int64_t batch = kBatch) {
  absl::StatusOr<Model> model = Model::Create(spec, input_features);
  if (!model.ok()) {
    ADD_FAILURE() << model.status();
    return nullptr;
  }
  auto problem = std::make_unique<Problem>(*std::move(model), batch);
  for (uint64_t attempt = 0; attempt < 1000; ++attempt) {
    problem->Fill(seed * 1000003 + attempt);
    if (problem->CheckKinks(kKinkMargin).clear) return problem;
  }
  ADD_FAILURE() << "no data at least " << kKinkMargin << " away from every kink";
  return nullptr;
}

// Sixth-order central difference of ForwardLoss<double> with respect to *value:
// f' ~ (45 (f(x+h) - f(x-h)) - 9 (f(x+2h) - f(x-2h)) + (f(x+3h) - f(x-3h))) / 60h.
double NumericalDerivative(const Problem& problem, double* value) {
  const double saved = *value;
  const std::vector<int8_t> sides = problem.KinkSides();
  auto loss_at = [&](double offset) {
    *value = saved + offset;
    return ForwardLoss<double>(problem.model(), problem.Params(), problem.Batch());
  };
  double differences[3];
  for (int m = 1; m <= 3; ++m) differences[m - 1] = loss_at(m * kStep) - loss_at(-m * kStep);
  for (double offset : {-3 * kStep, 3 * kStep}) {
    *value = saved + offset;
    EXPECT_TRUE(problem.KinkSides() == sides)
        << "a perturbation of " << offset << " moves a value across a kink";
  }
  *value = saved;
  return (45 * differences[0] - 9 * differences[1] + differences[2]) / (60 * kStep);
}

// Applies the pass criterion to every entry; on failure prints the max differences and the
// first failing entry.
::testing::AssertionResult GradientsAgree(const std::string& tensor,
                                          const std::vector<double>& analytic,
                                          const std::vector<double>& numerical) {
  if (analytic.size() != numerical.size()) {
    return ::testing::AssertionFailure() << tensor << ": sizes differ";
  }
  double max_rel = 0, max_abs = 0;
  int64_t first_bad = -1;
  for (size_t j = 0; j < analytic.size(); ++j) {
    const double a = analytic[j], n = numerical[j];
    const double diff = std::abs(a - n);
    const double magnitude = std::max(std::abs(a), std::abs(n));
    max_abs = std::max(max_abs, diff);
    bool ok;
    if (magnitude > kRelativeFloorForTest) {
      max_rel = std::max(max_rel, diff / magnitude);
      ok = diff / magnitude < kMaxRelError;
    } else {
      ok = diff < kMaxAbsError;
    }
    if (!ok && first_bad < 0) first_bad = static_cast<int64_t>(j);
  }
  if (first_bad < 0) return ::testing::AssertionSuccess();
  std::ostringstream message;
  message.precision(17);
  message << tensor << ": max relative difference " << max_rel << ", max absolute difference "
          << max_abs << "; first failing entry [" << first_bad << "]: analytic "
          << analytic[first_bad] << ", numerical " << numerical[first_bad];
  return ::testing::AssertionFailure() << message.str();
}

struct Analytic {
  RunResult result;
  std::vector<std::vector<double>> weights, biases;
  std::vector<double> inputs, output;
};

// RunBackprop in float64 with every output requested.
Analytic RunAnalytic(const Problem& problem, const CheckpointOptions& checkpointing = {},
                     int threads = 1, bool want_input_gradient = true) {
  const Model& model = problem.model();
  Analytic analytic;
  OutputsView<double> outputs;
  analytic.weights.resize(model.num_linear());
  analytic.biases.resize(model.num_linear());
  for (int l = 0; l < model.num_linear(); ++l) {
    const LayerSpec& layer = model.layer(model.linear_layer(l));
    analytic.weights[l].assign(layer.out_features * layer.in_features, -7.0);
    if (layer.bias) analytic.biases[l].assign(layer.out_features, -7.0);
    outputs.gradients.push_back(
        {analytic.weights[l].data(), layer.bias ? analytic.biases[l].data() : nullptr});
  }
  analytic.inputs.assign(problem.batch() * model.input_features(), -7.0);
  analytic.output.assign(problem.batch() * model.output_features(), -7.0);
  if (want_input_gradient) outputs.input_gradient = analytic.inputs.data();
  outputs.output = analytic.output.data();
  absl::StatusOr<CheckpointPlan> plan =
      PlanCheckpoints(model, problem.batch(), sizeof(double), checkpointing);
  EXPECT_TRUE(plan.ok()) << plan.status();
  if (!plan.ok()) return analytic;
  RunOptions options;
  options.threads = threads;
  absl::StatusOr<RunResult> result =
      RunBackprop<double>(model, *plan, problem.Params(), problem.Batch(), outputs, options);
  EXPECT_TRUE(result.ok()) << result.status();
  if (result.ok()) analytic.result = *std::move(result);
  return analytic;
}

// The analytic gradients in the order of Problem::Tensors().
std::vector<const std::vector<double>*> InTensorOrder(const Analytic& analytic) {
  std::vector<const std::vector<double>*> tensors;
  for (size_t l = 0; l < analytic.weights.size(); ++l) {
    tensors.push_back(&analytic.weights[l]);
    if (!analytic.biases[l].empty()) tensors.push_back(&analytic.biases[l]);
  }
  tensors.push_back(&analytic.inputs);
  return tensors;
}

// The whole finite-difference comparison for one problem: every entry of every weight, bias
// and input gradient.
void ExpectGradientsMatchFiniteDifferences(Problem& problem) {
  const Analytic analytic = RunAnalytic(problem);
  const std::vector<const std::vector<double>*> computed = InTensorOrder(analytic);
  const auto tensors = problem.Tensors();
  ASSERT_EQ(computed.size(), tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) {
    const auto& [name, values] = tensors[t];
    std::vector<double> numerical;
    for (double& value : *values) numerical.push_back(NumericalDerivative(problem, &value));
    EXPECT_TRUE(GradientsAgree(name, *computed[t], numerical));
    // Guard against a vacuous pass (both sides identically zero).
    double largest = 0;
    for (double n : numerical) largest = std::max(largest, std::abs(n));
    EXPECT_GT(largest, 1e-6) << name << ": every numerical derivative is ~0";
  }
}

// ---------------------------------------------------------------------------------------------
// One parameterised suite over every layer kind and every loss, with both reductions.

struct GradientCase {
  std::string name;
  ModelSpec spec;
  int64_t input_features = 4;
};

std::string ReductionName(Reduction r) { return r == Reduction::kMean ? "Mean" : "Sum"; }

std::vector<GradientCase> LayerCases() {
  struct Kind {
    std::string name;
    LayerSpec layer;
  };
  const Kind activations[] = {
      {"ReLU", Activation(LayerKind::kReLU)},
      {"LeakyReLU", Activation(LayerKind::kLeakyReLU, 0.01)},
      {"LeakyReLUNegativeSlope", Activation(LayerKind::kLeakyReLU, -0.5)},
      {"LeakyReLUZeroSlope", Activation(LayerKind::kLeakyReLU, 0.0)},
      {"Sigmoid", Activation(LayerKind::kSigmoid)},
      {"Tanh", Activation(LayerKind::kTanh)},
      {"GeluExact", Activation(LayerKind::kGelu)},
      {"GeluTanh", Activation(LayerKind::kGeluTanh)},
      {"Identity", Activation(LayerKind::kIdentity)},
  };
  std::vector<GradientCase> cases;
  for (Reduction reduction : {Reduction::kMean, Reduction::kSum}) {
    // The activation first (dx flows straight through it) and between two Linear layers.
    for (const Kind& kind : activations) {
      GradientCase c;
      c.name = kind.name + "_" + ReductionName(reduction);
      c.spec.layers = {kind.layer, Linear(4, 5), kind.layer, Linear(5, 3)};
      c.spec.loss = {LossKind::kMse, reduction};
      cases.push_back(c);
    }
    for (bool bias : {true, false}) {
      GradientCase c;
      c.name =
          std::string(bias ? "LinearWithBias_" : "LinearWithoutBias_") + ReductionName(reduction);
      c.spec.layers = {Linear(4, 5, bias), Activation(LayerKind::kTanh), Linear(5, 5, bias),
                       Linear(5, 3, bias)};
      c.spec.loss = {LossKind::kMse, reduction};
      cases.push_back(c);
    }
  }
  return cases;
}

std::vector<GradientCase> LossCases() {
  const std::pair<std::string, LossKind> losses[] = {
      {"Mse", LossKind::kMse},
      {"L1", LossKind::kL1},
      {"Huber", LossKind::kHuber},
      {"CrossEntropy", LossKind::kCrossEntropy},
      {"BceWithLogits", LossKind::kBceWithLogits},
      {"External", LossKind::kExternal},
  };
  std::vector<GradientCase> cases;
  for (const auto& [name, kind] : losses) {
    for (Reduction reduction : {Reduction::kMean, Reduction::kSum}) {
      GradientCase c;
      c.name = name + "Loss_" + ReductionName(reduction);
      c.spec.layers = {Linear(4, 5), Activation(LayerKind::kTanh), Linear(5, 3)};
      c.spec.loss = {kind, reduction, 0.5};
      cases.push_back(c);
    }
  }
  return cases;
}

std::vector<GradientCase> AllCases() {
  std::vector<GradientCase> cases = LayerCases();
  for (GradientCase& c : LossCases()) cases.push_back(std::move(c));
  return cases;
}

TEST(GradientCases, CoverEveryLayerKindEveryLossAndBothReductions) {
  std::set<LayerKind> kinds;
  std::set<std::pair<LossKind, Reduction>> losses;
  bool linear_without_bias = false, negative_slope = false;
  for (const GradientCase& c : AllCases()) {
    for (const LayerSpec& layer : c.spec.layers) {
      kinds.insert(layer.kind);
      linear_without_bias |= layer.kind == LayerKind::kLinear && !layer.bias;
      negative_slope |= layer.kind == LayerKind::kLeakyReLU && layer.negative_slope < 0;
    }
    losses.insert({c.spec.loss.kind, c.spec.loss.reduction});
  }
  EXPECT_EQ(kinds.size(), 8u);
  EXPECT_EQ(losses.size(), 12u);
  EXPECT_TRUE(linear_without_bias);
  EXPECT_TRUE(negative_slope);
}

class GradientTest : public ::testing::TestWithParam<GradientCase> {};

TEST_P(GradientTest, AnalyticGradientsMatchFiniteDifferences) {
  for (uint64_t seed : {1, 2}) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed);
    std::unique_ptr<Problem> problem =
        MakeProblem(GetParam().spec, GetParam().input_features, seed);
    ASSERT_NE(problem, nullptr);
    ExpectGradientsMatchFiniteDifferences(*problem);
  }
}

TEST_P(GradientTest, DataExerciseBothSidesOfEveryKink) {
  std::unique_ptr<Problem> problem = MakeProblem(GetParam().spec, GetParam().input_features, 1);
  ASSERT_NE(problem, nullptr);
  const Problem::KinkReport report = problem->CheckKinks(kKinkMargin);
  EXPECT_TRUE(report.clear);
  bool has_kink = problem->model().loss().kind == LossKind::kL1 ||
                  problem->model().loss().kind == LossKind::kHuber;
  for (const LayerSpec& layer : GetParam().spec.layers) has_kink |= HasKinkAtZero(layer.kind);
  if (has_kink) {
    EXPECT_GT(report.below_kink, 0);
    EXPECT_GT(report.above_kink, 0);
  } else {
    EXPECT_EQ(report.below_kink + report.above_kink, 0);
  }
}

TEST_P(GradientTest, ReportedLossEqualsTheForwardLoss) {
  std::unique_ptr<Problem> problem = MakeProblem(GetParam().spec, GetParam().input_features, 1);
  ASSERT_NE(problem, nullptr);
  const Analytic analytic = RunAnalytic(*problem);
  const double forward = ForwardLoss<double>(problem->model(), problem->Params(), problem->Batch());
  if (problem->model().loss().kind == LossKind::kExternal) {
    EXPECT_EQ(analytic.result.loss, 0.0);  // No loss of its own.
  } else {
    EXPECT_NEAR(analytic.result.loss, forward, 1e-14 * std::abs(forward))
        << "max difference " << std::abs(analytic.result.loss - forward);
  }
}

TEST_P(GradientTest, EngineGradientCheckReportsSmallErrors) {
  std::unique_ptr<Problem> problem = MakeProblem(GetParam().spec, GetParam().input_features, 3);
  ASSERT_NE(problem, nullptr);
  absl::StatusOr<CheckpointPlan> plan =
      PlanCheckpoints(problem->model(), kBatch, sizeof(double), {});
  ASSERT_TRUE(plan.ok()) << plan.status();
  GradientCheckOptions options;
  options.samples_per_tensor = 1000;  // Every entry.
  options.step = 1e-5;
  absl::StatusOr<std::vector<TensorCheck>> checks =
      CheckGradients<double>(problem->model(), *plan, problem->Params(), problem->Batch(), options);
  ASSERT_TRUE(checks.ok()) << checks.status();
  const auto tensors = problem->Tensors();
  ASSERT_EQ(checks->size(), tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) {
    const TensorCheck& check = (*checks)[t];
    EXPECT_EQ(check.tensor, tensors[t].first);
    EXPECT_EQ(check.samples, static_cast<int>(tensors[t].second->size())) << check.tensor;
    // Second-order differences with h = 1e-5 are good to ~1e-9 absolute here; a wrong
    // gradient is off by O(1) relative.
    EXPECT_LT(check.max_abs_error, 1e-8)
        << check.tensor << ": max difference " << check.max_abs_error;
    EXPECT_LT(check.max_rel_error, 1e-4)
        << check.tensor << ": max relative difference " << check.max_rel_error;
  }
}

INSTANTIATE_TEST_SUITE_P(EveryLayerAndLoss, GradientTest, ::testing::ValuesIn(AllCases()),
                         [](const auto& info) { return info.param.name; });

// ---------------------------------------------------------------------------------------------
// Random deep stacks: every layer kind at least once, 8-12 layers, one loss per seed.

constexpr int kDeepStackSeeds = 12;

GradientCase RandomStack(int seed) {
  std::mt19937_64 rng(1000 + seed);
  std::vector<LayerKind> kinds = {LayerKind::kLinear,   LayerKind::kReLU,    LayerKind::kLeakyReLU,
                                  LayerKind::kSigmoid,  LayerKind::kTanh,    LayerKind::kGelu,
                                  LayerKind::kGeluTanh, LayerKind::kIdentity};
  const int num_layers = std::uniform_int_distribution<int>(8, 12)(rng);
  while (static_cast<int>(kinds.size()) < num_layers) {
    // Extra layers are Linear half of the time, so widths change along the stack.
    const int pick = std::uniform_int_distribution<int>(0, 13)(rng);
    kinds.push_back(pick < 8 ? kinds[pick] : LayerKind::kLinear);
  }
  std::shuffle(kinds.begin(), kinds.end(), rng);
  const double slopes[] = {0.01, -0.4, 0.2, 1.5};
  GradientCase c;
  c.input_features = std::uniform_int_distribution<int64_t>(2, 5)(rng);
  int64_t width = c.input_features;
  for (LayerKind kind : kinds) {
    if (kind == LayerKind::kLinear) {
      const int64_t out = std::uniform_int_distribution<int64_t>(2, 5)(rng);
      c.spec.layers.push_back(Linear(width, out, std::bernoulli_distribution(0.7)(rng)));
      width = out;
    } else {
      c.spec.layers.push_back(
          Activation(kind, slopes[std::uniform_int_distribution<int>(0, 3)(rng)]));
    }
  }
  const LossKind losses[] = {LossKind::kMse,           LossKind::kL1,
                             LossKind::kHuber,         LossKind::kCrossEntropy,
                             LossKind::kBceWithLogits, LossKind::kExternal};
  c.spec.loss.kind = losses[seed % 6];
  c.spec.loss.reduction = (seed / 6) % 2 == 0 ? Reduction::kMean : Reduction::kSum;
  c.spec.loss.huber_delta = std::uniform_real_distribution<double>(0.3, 1.2)(rng);
  c.name = "Seed" + std::to_string(seed);
  return c;
}

TEST(DeepStacks, CoverEveryLayerKindEveryLossAndBothReductions) {
  std::set<std::pair<LossKind, Reduction>> losses;
  for (int seed = 0; seed < kDeepStackSeeds; ++seed) {
    const GradientCase c = RandomStack(seed);
    std::set<LayerKind> kinds;
    for (const LayerSpec& layer : c.spec.layers) kinds.insert(layer.kind);
    EXPECT_EQ(kinds.size(), 8u) << c.name;
    EXPECT_GE(c.spec.layers.size(), 8u);
    EXPECT_LE(c.spec.layers.size(), 12u);
    losses.insert({c.spec.loss.kind, c.spec.loss.reduction});
  }
  EXPECT_EQ(losses.size(), 12u);
}

class DeepStackTest : public ::testing::TestWithParam<int> {};

TEST_P(DeepStackTest, AnalyticGradientsMatchFiniteDifferences) {
  const GradientCase c = RandomStack(GetParam());
  std::unique_ptr<Problem> problem = MakeProblem(c.spec, c.input_features, GetParam());
  ASSERT_NE(problem, nullptr);
  ExpectGradientsMatchFiniteDifferences(*problem);
}

TEST_P(DeepStackTest, EngineGradientCheckAgreesInFloat64AndFloat32) {
  const GradientCase c = RandomStack(GetParam());
  std::unique_ptr<Problem> problem = MakeProblem(c.spec, c.input_features, GetParam());
  ASSERT_NE(problem, nullptr);
  const Model& model = problem->model();
  absl::StatusOr<CheckpointPlan> plan64 = PlanCheckpoints(model, kBatch, 8, {});
  ASSERT_TRUE(plan64.ok()) << plan64.status();
  GradientCheckOptions options;
  options.samples_per_tensor = 8;
  options.step = 1e-5;
  options.seed = GetParam();
  absl::StatusOr<std::vector<TensorCheck>> checks64 =
      CheckGradients<double>(model, *plan64, problem->Params(), problem->Batch(), options);
  ASSERT_TRUE(checks64.ok()) << checks64.status();
  for (const TensorCheck& check : *checks64) {
    EXPECT_GT(check.samples, 0);
    EXPECT_LE(check.samples, 8);
    EXPECT_LT(check.max_abs_error, 1e-8)
        << check.tensor << ": max difference " << check.max_abs_error;
  }

  // The same problem in float32: analytic gradients in float, numerical ones in float64 from
  // the float values, so the errors are float32 rounding, ~1e-7 relative.
  std::vector<std::vector<float>> weights, biases;
  std::vector<LinearParamsView<float>> params;
  const std::vector<LinearParamsView<double>> params64 = problem->Params();
  for (int l = 0; l < model.num_linear(); ++l) {
    const LayerSpec& layer = model.layer(model.linear_layer(l));
    weights.emplace_back(params64[l].weight,
                         params64[l].weight + layer.out_features * layer.in_features);
    biases.emplace_back(params64[l].bias, params64[l].bias + (layer.bias ? layer.out_features : 0));
  }
  for (int l = 0; l < model.num_linear(); ++l) {
    params.push_back({weights[l].data(), biases[l].empty() ? nullptr : biases[l].data()});
  }
  const BatchView<double> batch64 = problem->Batch();
  const int64_t in = kBatch * model.input_features(), out = kBatch * model.output_features();
  std::vector<float> inputs(batch64.inputs, batch64.inputs + in);
  std::vector<float> targets, output_gradient;
  if (batch64.targets.targets) {
    targets.assign(batch64.targets.targets, batch64.targets.targets + out);
  }
  if (batch64.targets.output_gradient) {
    output_gradient.assign(batch64.targets.output_gradient, batch64.targets.output_gradient + out);
  }
  BatchView<float> batch32;
  batch32.batch = kBatch;
  batch32.inputs = inputs.data();
  batch32.targets.targets = targets.empty() ? nullptr : targets.data();
  batch32.targets.class_targets = batch64.targets.class_targets;
  batch32.targets.output_gradient = output_gradient.empty() ? nullptr : output_gradient.data();
  absl::StatusOr<CheckpointPlan> plan32 = PlanCheckpoints(model, kBatch, 4, {});
  ASSERT_TRUE(plan32.ok()) << plan32.status();
  absl::StatusOr<std::vector<TensorCheck>> checks32 =
      CheckGradients<float>(model, *plan32, params, batch32, options);
  ASSERT_TRUE(checks32.ok()) << checks32.status();
  ASSERT_EQ(checks32->size(), checks64->size());
  for (const TensorCheck& check : *checks32) {
    EXPECT_LT(check.max_abs_error, 1e-5)
        << check.tensor << ": max difference " << check.max_abs_error;
  }
}

INSTANTIATE_TEST_SUITE_P(Seeds, DeepStackTest, ::testing::Range(0, kDeepStackSeeds),
                         [](const auto& info) { return "Seed" + std::to_string(info.param); });

// ---------------------------------------------------------------------------------------------
// Determinism: large enough that both the GEMMs and the element-wise loops use the OpenMP team.

std::unique_ptr<Problem> LargeProblem() {
  ModelSpec spec;
  spec.layers = {Linear(32, 128), Activation(LayerKind::kGelu), Linear(128, 128),
                 Activation(LayerKind::kLeakyReLU, -0.2), Linear(128, 10)};
  spec.loss = {LossKind::kCrossEntropy, Reduction::kMean};
  absl::StatusOr<Model> model = Model::Create(spec, 32);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  auto problem = std::make_unique<Problem>(*std::move(model), 256);  // 256 x 128 = 2^15.
  problem->Fill(42);
  return problem;
}

::testing::AssertionResult BitIdentical(const std::string& what, const std::vector<double>& a,
                                        const std::vector<double>& b) {
  if (a.size() == b.size() &&
      (a.empty() || std::memcmp(a.data(), b.data(), sizeof(double) * a.size()) == 0)) {
    return ::testing::AssertionSuccess();
  }
  double max_diff = 0;
  for (size_t j = 0; j < std::min(a.size(), b.size()); ++j) {
    max_diff = std::max(max_diff, std::abs(a[j] - b[j]));
  }
  return ::testing::AssertionFailure() << what << " differs: max difference " << max_diff
                                       << " (sizes " << a.size() << ", " << b.size() << ")";
}

void ExpectBitIdentical(const Analytic& a, const Analytic& b, bool compare_inputs = true) {
  EXPECT_EQ(std::memcmp(&a.result.loss, &b.result.loss, sizeof(double)), 0)
      << "loss differs: max difference " << std::abs(a.result.loss - b.result.loss);
  for (size_t l = 0; l < a.weights.size(); ++l) {
    EXPECT_TRUE(BitIdentical("weight " + std::to_string(l), a.weights[l], b.weights[l]));
    EXPECT_TRUE(BitIdentical("bias " + std::to_string(l), a.biases[l], b.biases[l]));
  }
  if (compare_inputs) {
    EXPECT_TRUE(BitIdentical("input gradient", a.inputs, b.inputs));
  }
  EXPECT_TRUE(BitIdentical("output", a.output, b.output));
}

TEST(Determinism, TheSameCallTwiceWithTwoThreadsGivesTheSameBits) {
  std::unique_ptr<Problem> problem = LargeProblem();
  ASSERT_NE(problem, nullptr);
  const Analytic first = RunAnalytic(*problem, {}, /*threads=*/2);
  const Analytic second = RunAnalytic(*problem, {}, /*threads=*/2);
  ASSERT_GT(first.result.loss, 0);
  ExpectBitIdentical(first, second);
}

TEST(Determinism, CheckpointedCallsWithTwoThreadsGiveTheSameBitsAsPlainOnes) {
  std::unique_ptr<Problem> problem = LargeProblem();
  ASSERT_NE(problem, nullptr);
  const Analytic plain = RunAnalytic(*problem, {}, /*threads=*/2);
  const Analytic sqrt = RunAnalytic(*problem, {CheckpointMode::kSqrt}, /*threads=*/2);
  EXPECT_GT(sqrt.result.layers_recomputed, 0);
  ExpectBitIdentical(plain, sqrt);
}

TEST(Determinism, ParameterGradientsDoNotDependOnWhetherDxIsRequested) {
  std::unique_ptr<Problem> problem = LargeProblem();
  ASSERT_NE(problem, nullptr);
  const Analytic with_dx = RunAnalytic(*problem, {}, 2, /*want_input_gradient=*/true);
  const Analytic without_dx = RunAnalytic(*problem, {}, 2, /*want_input_gradient=*/false);
  ExpectBitIdentical(with_dx, without_dx, /*compare_inputs=*/false);
  // Not requested: the buffer keeps its poison.
  EXPECT_THAT(without_dx.inputs, ::testing::Each(-7.0));
}

// The scheduler gives a check a number of cores; its finite-difference passes must not spread
// over more (they once ran on the worker thread's default team, every core).
TEST(GradientCheckThreads, FiniteDifferencePassesKeepToTheCallsThreads) {
  std::unique_ptr<Problem> problem = LargeProblem();
  ASSERT_NE(problem, nullptr);
  absl::StatusOr<CheckpointPlan> plan =
      PlanCheckpoints(problem->model(), problem->batch(), sizeof(double), {});
  ASSERT_TRUE(plan.ok()) << plan.status();
  const ScopedThreads worker_default(4);  // The worker's default team: larger than the call's.
  int most_threads_seen = 0;
  int polls = 0;
  GradientCheckOptions options;
  options.samples_per_tensor = 2;
  options.threads = 1;
  options.should_stop = [&] {
    ++polls;
    most_threads_seen = std::max(most_threads_seen, omp_get_max_threads());
    return false;
  };
  absl::StatusOr<std::vector<TensorCheck>> checks =
      CheckGradients<double>(problem->model(), *plan, problem->Params(), problem->Batch(), options);
  ASSERT_TRUE(checks.ok()) << checks.status();
  EXPECT_GT(polls, 10);
  EXPECT_EQ(most_threads_seen, 1);
  EXPECT_EQ(omp_get_max_threads(), 4) << "the caller's setting is restored";
}

// ---------------------------------------------------------------------------------------------
// Diagnostics: Measure splits long tensors into blocks across the OpenMP team.

template <typename T>
void ExpectMeasureMatchesALongDoubleSum(int64_t n) {
  SCOPED_TRACE(::testing::Message() << n << " values of " << sizeof(T) << " bytes");
  std::mt19937_64 rng(n);
  std::normal_distribution<double> normal(0, 3);
  std::vector<T> data(n);
  for (T& v : data) v = static_cast<T>(normal(rng));
  // Non-finite values in the first, a middle and the last block, and in the sixteen-lane tail.
  int64_t planted = 0;
  for (int64_t j : {int64_t{0}, n / 2, n - 1, n - n % 16 - 1}) {
    if (std::isfinite(data[j])) ++planted;
    data[j] = (j % 3 == 0) ? std::numeric_limits<T>::quiet_NaN()
                           : (j % 3 == 1 ? std::numeric_limits<T>::infinity()
                                         : -std::numeric_limits<T>::infinity());
  }
  long double sum = 0;
  for (T v : data) {
    if (std::isfinite(v)) sum += static_cast<long double>(v) * v;
  }
  const auto measure_on = [&](int threads) {
    const ScopedThreads team(threads);
    return Measure(data.data(), n);
  };
  const NormAndNonFinite one = measure_on(1);
  const NormAndNonFinite two = measure_on(2);
  EXPECT_EQ(one.non_finite, planted);
  EXPECT_NEAR(one.norm, std::sqrt(static_cast<double>(sum)), 1e-13 * std::sqrt(double(sum)));
  EXPECT_EQ(std::memcmp(&one.norm, &two.norm, sizeof(double)), 0) << "1 vs 2 threads";
  EXPECT_EQ(one.non_finite, two.non_finite);
}

TEST(Diagnostics, MeasureMatchesALongDoubleSumWithinAndAcrossBlocks) {
  for (int64_t n :
       {int64_t{17}, int64_t{1000}, int64_t{8192}, int64_t{3 * 8192 + 21}, int64_t{100003}}) {
    ExpectMeasureMatchesALongDoubleSum<float>(n);
    ExpectMeasureMatchesALongDoubleSum<double>(n);
  }
}

}  // namespace
}  // namespace gradserve::engine
