// Gradient checkpointing: every mode gives the same bits as no checkpointing, the executor's
// measured peak and recomputation equal the plan's predictions, checkpointing saves memory, the
// memory-budget planner honours its budget, and bad options are named.
#include "server/engine/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/engine/backprop.h"
#include "server/engine/model.h"
#include "tests/engine/layer_specs.h"

namespace gradserve::engine {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kBatch = 16;

// 16 x (Linear 32 -> 32, Tanh): 32 layers.
ModelSpec TanhNetSpec() {
  ModelSpec spec;
  for (int i = 0; i < 16; ++i) {
    spec.layers.push_back(Linear(32, 32));
    spec.layers.push_back(Activation(LayerKind::kTanh));
  }
  spec.loss = {LossKind::kMse, Reduction::kMean};
  return spec;
}

// 32 layers mixing every kind, with changing widths and runs of element-wise layers, so that
// segment boundaries fall between layers whose backward reads the input and ones that read the
// output. If `activation_first`, the model starts with two element-wise layers.
ModelSpec MixedNetSpec(bool activation_first = false) {
  using K = LayerKind;
  ModelSpec spec;
  if (activation_first) {
    spec.layers = {Activation(K::kLeakyReLU, -0.1), Activation(K::kSigmoid)};
  }
  const std::vector<LayerSpec> body = {Linear(24, 32),
                                       Activation(K::kLeakyReLU, 0.1),
                                       Linear(32, 16),
                                       Activation(K::kGelu),
                                       Activation(K::kSigmoid),
                                       Linear(16, 32),
                                       Activation(K::kReLU),
                                       Activation(K::kIdentity),
                                       Linear(32, 24),
                                       Activation(K::kGeluTanh),
                                       Activation(K::kTanh),
                                       Linear(24, 32),
                                       Activation(K::kLeakyReLU, -0.2),
                                       Activation(K::kIdentity),
                                       Activation(K::kReLU),
                                       Linear(32, 16),
                                       Activation(K::kSigmoid),
                                       Activation(K::kLeakyReLU, 0.05),
                                       Linear(16, 16, false),
                                       Activation(K::kGelu),
                                       Activation(K::kIdentity),
                                       Linear(16, 32),
                                       Activation(K::kTanh),
                                       Activation(K::kReLU),
                                       Linear(32, 24),
                                       Activation(K::kGeluTanh),
                                       Linear(24, 32),
                                       Activation(K::kLeakyReLU, 0.01),
                                       Linear(32, 16),
                                       Activation(K::kIdentity)};
  spec.layers.insert(spec.layers.end(), body.begin(), body.end());
  while (spec.layers.size() < 31) spec.layers.push_back(Activation(K::kIdentity));
  spec.layers.push_back(Linear(16, 8));
  spec.loss = {LossKind::kCrossEntropy, Reduction::kMean};
  return spec;
}

template <typename T>
struct Outcome {
  CheckpointPlan plan;
  RunResult result;
  std::vector<std::vector<T>> weights, biases;
  std::vector<T> dx, output;
};

// A model with parameters and a batch of kBatch rows in T.
template <typename T>
class Net {
 public:
  static std::unique_ptr<Net> Create(const ModelSpec& spec, int64_t input_features, uint64_t seed) {
    absl::StatusOr<Model> model = Model::Create(spec, input_features);
    EXPECT_TRUE(model.ok()) << model.status();
    if (!model.ok()) return nullptr;
    return std::unique_ptr<Net>(new Net(*std::move(model), seed));
  }

  const Model& model() const { return model_; }

  absl::StatusOr<CheckpointPlan> Plan(const CheckpointOptions& options) const {
    return PlanCheckpoints(model_, kBatch, sizeof(T), options);
  }

  // Plans and runs; the outcome's buffers are poisoned beforehand.
  Outcome<T> Run(const CheckpointOptions& options, bool want_dx = true, int threads = 1) const {
    absl::StatusOr<CheckpointPlan> plan = Plan(options);
    EXPECT_TRUE(plan.ok()) << plan.status();
    if (!plan.ok()) return {};
    return RunPlan(*std::move(plan), want_dx, threads);
  }

  Outcome<T> RunPlan(CheckpointPlan plan, bool want_dx = true, int threads = 1) const {
    Outcome<T> outcome;
    outcome.plan = std::move(plan);
    OutputsView<T> outputs;
    outcome.weights.resize(model_.num_linear());
    outcome.biases.resize(model_.num_linear());
    for (int l = 0; l < model_.num_linear(); ++l) {
      outcome.weights[l].assign(weights_[l].size(), T(-7));
      outcome.biases[l].assign(biases_[l].size(), T(-7));
      outputs.gradients.push_back(
          {outcome.weights[l].data(), biases_[l].empty() ? nullptr : outcome.biases[l].data()});
    }
    outcome.dx.assign(inputs_.size(), T(-7));
    outcome.output.assign(kBatch * model_.output_features(), T(-7));
    if (want_dx) outputs.input_gradient = outcome.dx.data();
    outputs.output = outcome.output.data();
    std::vector<LinearParamsView<T>> params;
    for (int l = 0; l < model_.num_linear(); ++l) {
      params.push_back({weights_[l].data(), biases_[l].empty() ? nullptr : biases_[l].data()});
    }
    BatchView<T> batch;
    batch.batch = kBatch;
    batch.inputs = inputs_.data();
    if (model_.loss().kind == LossKind::kCrossEntropy) {
      batch.targets.class_targets = classes_.data();
    } else {
      batch.targets.targets = targets_.data();
    }
    RunOptions run_options;
    run_options.threads = threads;
    absl::StatusOr<RunResult> result =
        RunBackprop<T>(model_, outcome.plan, params, batch, outputs, run_options);
    EXPECT_TRUE(result.ok()) << result.status();
    if (result.ok()) outcome.result = *std::move(result);
    return outcome;
  }

 private:
  Net(Model model, uint64_t seed) : model_(std::move(model)) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0, 1);
    std::uniform_real_distribution<double> uniform(-1, 1);
    for (int l = 0; l < model_.num_linear(); ++l) {
      const LayerSpec& layer = model_.layer(model_.linear_layer(l));
      const double scale = std::sqrt(3.0 / layer.in_features);
      weights_.emplace_back();
      biases_.emplace_back();
      for (int64_t j = 0; j < layer.out_features * layer.in_features; ++j) {
        weights_[l].push_back(static_cast<T>(scale * uniform(rng)));
      }
      if (layer.bias) {
        for (int64_t j = 0; j < layer.out_features; ++j) {
          biases_[l].push_back(static_cast<T>(0.1 * uniform(rng)));
        }
      }
    }
    for (int64_t j = 0; j < kBatch * model_.input_features(); ++j) {
      inputs_.push_back(static_cast<T>(normal(rng)));
    }
    for (int64_t j = 0; j < kBatch * model_.output_features(); ++j) {
      targets_.push_back(static_cast<T>(normal(rng)));
    }
    std::uniform_int_distribution<int64_t> label(0, model_.output_features() - 1);
    for (int64_t b = 0; b < kBatch; ++b) classes_.push_back(label(rng));
  }

  Model model_;
  std::vector<std::vector<T>> weights_, biases_;
  std::vector<T> inputs_, targets_;
  std::vector<int64_t> classes_;
};

template <typename T>
::testing::AssertionResult SameBits(const std::string& what, const std::vector<T>& a,
                                    const std::vector<T>& b) {
  if (a.size() == b.size() &&
      (a.empty() || std::memcmp(a.data(), b.data(), sizeof(T) * a.size()) == 0)) {
    return ::testing::AssertionSuccess();
  }
  double max_diff = 0;
  for (size_t j = 0; j < std::min(a.size(), b.size()); ++j) {
    max_diff = std::max(max_diff, std::abs(static_cast<double>(a[j]) - b[j]));
  }
  return ::testing::AssertionFailure()
         << what << " is not bit-identical: max difference " << max_diff << " (sizes " << a.size()
         << ", " << b.size() << ")";
}

// Gradients, dx, output and loss bit-identical to the reference run.
template <typename T>
void ExpectSameBits(const Outcome<T>& reference, const Outcome<T>& run, bool compare_dx = true) {
  EXPECT_EQ(std::memcmp(&reference.result.loss, &run.result.loss, sizeof(double)), 0)
      << "loss is not bit-identical: max difference "
      << std::abs(reference.result.loss - run.result.loss);
  ASSERT_EQ(reference.weights.size(), run.weights.size());
  for (size_t l = 0; l < run.weights.size(); ++l) {
    EXPECT_TRUE(SameBits("parameters[" + std::to_string(l) + "].weight gradient",
                         reference.weights[l], run.weights[l]));
    EXPECT_TRUE(SameBits("parameters[" + std::to_string(l) + "].bias gradient", reference.biases[l],
                         run.biases[l]));
  }
  if (compare_dx) {
    EXPECT_TRUE(SameBits("input gradient", reference.dx, run.dx));
  }
  EXPECT_TRUE(SameBits("output", reference.output, run.output));
}

// The executor did what the plan predicted.
template <typename T>
void ExpectRunFollowsThePlan(const Outcome<T>& run) {
  EXPECT_EQ(run.result.peak_activation_bytes, run.plan.predicted_peak_bytes);
  EXPECT_EQ(run.result.layers_recomputed, run.plan.predicted_recomputed_layers);
}

std::string Describe(const CheckpointOptions& options) {
  std::ostringstream out;
  switch (options.mode) {
    case CheckpointMode::kNone:
      out << "NONE";
      break;
    case CheckpointMode::kEveryK:
      out << "EVERY_K(" << options.every_k << ")";
      break;
    case CheckpointMode::kSqrt:
      out << "SQRT";
      break;
    case CheckpointMode::kMemoryBudget:
      out << "MEMORY_BUDGET(" << options.memory_budget_bytes << " bytes)";
      break;
  }
  return out.str();
}

CheckpointOptions EveryK(int64_t k) { return {CheckpointMode::kEveryK, k, 0}; }
CheckpointOptions Budget(int64_t bytes) { return {CheckpointMode::kMemoryBudget, 0, bytes}; }
const CheckpointOptions kNone = {CheckpointMode::kNone, 0, 0};
const CheckpointOptions kSqrtMode = {CheckpointMode::kSqrt, 0, 0};

// The smallest peak any plan reaches: what a hopeless budget reports.
template <typename T>
int64_t MinimumPeak(const Net<T>& net) {
  absl::StatusOr<CheckpointPlan> plan = net.Plan(Budget(1));
  EXPECT_TRUE(plan.ok()) << plan.status();
  return plan.ok() ? plan->min_peak_bytes : 0;
}

// Every mode: NONE, EVERY_K for k in {1, 2, 3, 5, 8, L}, SQRT, and budgets from below the
// minimum to above NONE's peak.
template <typename T>
std::vector<CheckpointOptions> EveryMode(const Net<T>& net) {
  std::vector<CheckpointOptions> modes = {kNone, kSqrtMode};
  for (int64_t k : {1, 2, 3, 5, 8}) {
    if (k <= net.model().num_layers()) modes.push_back(EveryK(k));
  }
  modes.push_back(EveryK(net.model().num_layers()));
  const int64_t none = NoCheckpointPeakBytes(net.model(), kBatch, sizeof(T));
  const int64_t least = MinimumPeak(net);
  for (int64_t budget :
       {int64_t{1}, least - 1, least, least + (none - least) / 4, least + (none - least) / 2,
        least + 3 * (none - least) / 4, none - 1, none, 2 * none}) {
    if (budget > 0) modes.push_back(Budget(budget));
  }
  return modes;
}

template <typename T>
class CheckpointTest : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(CheckpointTest, FloatTypes);

TYPED_TEST(CheckpointTest, EveryModeGivesTheSameBitsAsNoneOnTheTanhNet) {
  auto net = Net<TypeParam>::Create(TanhNetSpec(), 32, 1);
  ASSERT_NE(net, nullptr);
  ASSERT_EQ(net->model().num_layers(), 32);
  const Outcome<TypeParam> none = net->Run(kNone);
  ExpectRunFollowsThePlan(none);
  EXPECT_EQ(none.result.layers_recomputed, 0);
  for (const CheckpointOptions& options : EveryMode(*net)) {
    SCOPED_TRACE(Describe(options));
    const Outcome<TypeParam> run = net->Run(options);
    ExpectSameBits(none, run);
    ExpectRunFollowsThePlan(run);
  }
}

TYPED_TEST(CheckpointTest, EveryModeGivesTheSameBitsAsNoneOnTheMixedNet) {
  auto net = Net<TypeParam>::Create(MixedNetSpec(), 24, 2);
  ASSERT_NE(net, nullptr);
  ASSERT_EQ(net->model().num_layers(), 32);
  const Outcome<TypeParam> none = net->Run(kNone);
  ExpectRunFollowsThePlan(none);
  for (const CheckpointOptions& options : EveryMode(*net)) {
    SCOPED_TRACE(Describe(options));
    const Outcome<TypeParam> run = net->Run(options);
    ExpectSameBits(none, run);
    ExpectRunFollowsThePlan(run);
  }
}

TYPED_TEST(CheckpointTest, EveryModeGivesTheSameBitsWithTwoThreads) {
  auto net = Net<TypeParam>::Create(MixedNetSpec(), 24, 3);
  ASSERT_NE(net, nullptr);
  const Outcome<TypeParam> none = net->Run(kNone, true, /*threads=*/2);
  for (const CheckpointOptions& options : EveryMode(*net)) {
    SCOPED_TRACE(Describe(options));
    const Outcome<TypeParam> run = net->Run(options, true, /*threads=*/2);
    ExpectSameBits(none, run);
    ExpectRunFollowsThePlan(run);
  }
}

TYPED_TEST(CheckpointTest, WithoutDxEveryModeGivesTheSameParameterGradients) {
  // The model starts with element-wise layers, and without dx nothing below the first Linear
  // needs a backward pass: the executor may skip recomputing there, so it can only do less
  // than the plan predicts.
  auto net = Net<TypeParam>::Create(MixedNetSpec(/*activation_first=*/true), 24, 4);
  ASSERT_NE(net, nullptr);
  const Outcome<TypeParam> none = net->Run(kNone, /*want_dx=*/false);
  for (const CheckpointOptions& options : EveryMode(*net)) {
    SCOPED_TRACE(Describe(options));
    const Outcome<TypeParam> run = net->Run(options, /*want_dx=*/false);
    ExpectSameBits(none, run, /*compare_dx=*/false);
    EXPECT_THAT(run.dx, ::testing::Each(TypeParam(-7)));  // Not requested, not written.
    EXPECT_LE(run.result.peak_activation_bytes, run.plan.predicted_peak_bytes);
    EXPECT_LE(run.result.layers_recomputed, run.plan.predicted_recomputed_layers);
  }
}

TYPED_TEST(CheckpointTest, SqrtAndShortSegmentsKeepLessThanNone) {
  auto net = Net<TypeParam>::Create(TanhNetSpec(), 32, 5);
  ASSERT_NE(net, nullptr);
  const Outcome<TypeParam> none = net->Run(kNone);
  const int64_t none_peak = none.result.peak_activation_bytes;
  // Tanh reads its output and Linear its input, so NONE keeps a_2, a_4, ..., a_32.
  EXPECT_EQ(none_peak, 16 * kBatch * 32 * static_cast<int64_t>(sizeof(TypeParam)));
  EXPECT_EQ(none_peak, NoCheckpointPeakBytes(net->model(), kBatch, sizeof(TypeParam)));

  const Outcome<TypeParam> sqrt = net->Run(kSqrtMode);
  EXPECT_LT(sqrt.result.peak_activation_bytes, none_peak);
  EXPECT_GT(sqrt.result.layers_recomputed, 0);
  // ceil(sqrt(32)) = 6: segments start at 0, 6, ..., 30.
  EXPECT_THAT(sqrt.plan.segment_starts, ::testing::ElementsAre(0, 6, 12, 18, 24, 30));
  // Not EVERY_K(1) or (2): each keeps every segment input, here every activation (k = 1,
  // twice NONE's peak) or exactly the activations NONE keeps (k = 2).
  for (int64_t k : {3, 5, 8}) {
    SCOPED_TRACE(Describe(EveryK(k)));
    const Outcome<TypeParam> run = net->Run(EveryK(k));
    EXPECT_LT(run.result.peak_activation_bytes, none_peak);
    EXPECT_GT(run.result.layers_recomputed, 0);
  }
  // One segment of every layer is NONE.
  const Outcome<TypeParam> whole = net->Run(EveryK(32));
  EXPECT_EQ(whole.result.peak_activation_bytes, none_peak);
  EXPECT_EQ(whole.result.layers_recomputed, 0);
}

TYPED_TEST(CheckpointTest, EveryPlanPredictsItsOwnPeak) {
  for (bool mixed : {false, true}) {
    auto net = mixed ? Net<TypeParam>::Create(MixedNetSpec(), 24, 6)
                     : Net<TypeParam>::Create(TanhNetSpec(), 32, 6);
    ASSERT_NE(net, nullptr);
    for (const CheckpointOptions& options : EveryMode(*net)) {
      SCOPED_TRACE(Describe(options));
      const Outcome<TypeParam> run = net->Run(options);
      EXPECT_EQ(run.plan.mode, options.mode);
      ASSERT_FALSE(run.plan.segment_starts.empty());
      EXPECT_EQ(run.plan.segment_starts.front(), 0);
      EXPECT_TRUE(std::is_sorted(run.plan.segment_starts.begin(), run.plan.segment_starts.end()));
      EXPECT_GT(run.plan.predicted_peak_bytes, 0);
      ExpectRunFollowsThePlan(run);
    }
  }
}

TYPED_TEST(CheckpointTest, BudgetPlansFitTheirBudgetAndRecomputeNoMoreThanSqrt) {
  for (bool mixed : {false, true}) {
    SCOPED_TRACE(mixed ? "mixed net" : "tanh net");
    auto net = mixed ? Net<TypeParam>::Create(MixedNetSpec(), 24, 7)
                     : Net<TypeParam>::Create(TanhNetSpec(), 32, 7);
    ASSERT_NE(net, nullptr);
    const int64_t none_peak = NoCheckpointPeakBytes(net->model(), kBatch, sizeof(TypeParam));
    const int64_t least = MinimumPeak(*net);
    absl::StatusOr<CheckpointPlan> sqrt = net->Plan(kSqrtMode);
    ASSERT_TRUE(sqrt.ok()) << sqrt.status();
    ASSERT_LT(least, none_peak);
    ASSERT_LE(least, sqrt->predicted_peak_bytes);
    const Outcome<TypeParam> none = net->Run(kNone);
    std::vector<int64_t> budgets = {least,
                                    sqrt->predicted_peak_bytes,
                                    sqrt->predicted_peak_bytes + 1,
                                    none_peak - 1,
                                    none_peak,
                                    none_peak + 1};
    for (int i = 1; i < 8; ++i) budgets.push_back(least + (none_peak - least) * i / 8);
    for (int64_t budget : budgets) {
      SCOPED_TRACE(Describe(Budget(budget)));
      const Outcome<TypeParam> run = net->Run(Budget(budget));
      ASSERT_TRUE(run.plan.budget_met);
      EXPECT_LE(run.plan.predicted_peak_bytes, budget);
      EXPECT_LE(run.result.peak_activation_bytes, budget);
      if (budget < none_peak) {
        EXPECT_LT(run.result.peak_activation_bytes, none_peak);
      }
      if (budget >= none_peak) {
        EXPECT_EQ(run.result.layers_recomputed, 0);
      }
      if (budget >= sqrt->predicted_peak_bytes) {
        EXPECT_LE(run.plan.predicted_recomputed_layers, sqrt->predicted_recomputed_layers);
      }
      ExpectSameBits(none, run);
      ExpectRunFollowsThePlan(run);
    }
  }
}

TYPED_TEST(CheckpointTest, MoreBudgetNeverMeansMoreRecomputation) {
  auto net = Net<TypeParam>::Create(MixedNetSpec(), 24, 8);
  ASSERT_NE(net, nullptr);
  const int64_t none_peak = NoCheckpointPeakBytes(net->model(), kBatch, sizeof(TypeParam));
  const int64_t least = MinimumPeak(*net);
  int64_t previous = std::numeric_limits<int64_t>::max();
  for (int i = 0; i <= 32; ++i) {
    const int64_t budget = least + (none_peak - least) * i / 32;
    absl::StatusOr<CheckpointPlan> plan = net->Plan(Budget(budget));
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_TRUE(plan->budget_met) << Describe(Budget(budget));
    EXPECT_LE(plan->predicted_recomputed_layers, previous) << Describe(Budget(budget));
    previous = plan->predicted_recomputed_layers;
  }
  EXPECT_EQ(previous, 0);  // At NONE's peak nothing is recomputed.
}

TYPED_TEST(CheckpointTest, BudgetBelowTheMinimumUsesTheLeanestPlan) {
  auto net = Net<TypeParam>::Create(TanhNetSpec(), 32, 9);
  ASSERT_NE(net, nullptr);
  const Outcome<TypeParam> none = net->Run(kNone);
  const int64_t least = MinimumPeak(*net);
  ASSERT_GT(least, 0);
  for (int64_t budget : {int64_t{1}, least / 2, least - 1}) {
    SCOPED_TRACE(Describe(Budget(budget)));
    const Outcome<TypeParam> run = net->Run(Budget(budget));
    EXPECT_FALSE(run.plan.budget_met);
    EXPECT_GT(run.plan.min_peak_bytes, budget);
    EXPECT_EQ(run.plan.min_peak_bytes, least);
    EXPECT_EQ(run.plan.predicted_peak_bytes, run.plan.min_peak_bytes);
    ExpectSameBits(none, run);
    ExpectRunFollowsThePlan(run);
  }
  // The minimum itself is met.
  absl::StatusOr<CheckpointPlan> at_least = net->Plan(Budget(least));
  ASSERT_TRUE(at_least.ok()) << at_least.status();
  EXPECT_TRUE(at_least->budget_met);
  EXPECT_LE(at_least->predicted_peak_bytes, least);
}

TYPED_TEST(CheckpointTest, ASingleLayerModelWorksUnderEveryMode) {
  ModelSpec spec;
  spec.layers = {Linear(5, 3)};
  spec.loss = {LossKind::kHuber, Reduction::kSum, 0.7};
  auto net = Net<TypeParam>::Create(spec, 5, 10);
  ASSERT_NE(net, nullptr);
  const Outcome<TypeParam> none = net->Run(kNone);
  // Linear reads only its input, which is the caller's: nothing is cached.
  EXPECT_EQ(none.result.peak_activation_bytes, 0);
  for (const CheckpointOptions& options : {kSqrtMode, EveryK(1), Budget(1), Budget(1000)}) {
    SCOPED_TRACE(Describe(options));
    const Outcome<TypeParam> run = net->Run(options);
    ExpectSameBits(none, run);
    ExpectRunFollowsThePlan(run);
    EXPECT_EQ(run.result.layers_recomputed, 0);
  }
}

TYPED_TEST(CheckpointTest, ArbitrarySegmentationsGiveTheSameBitsAndTheirPredictedPeak) {
  // The executor follows any plan literally, not only the planner's.
  auto net = Net<TypeParam>::Create(MixedNetSpec(), 24, 11);
  ASSERT_NE(net, nullptr);
  const Outcome<TypeParam> none = net->Run(kNone);
  const int num_layers = net->model().num_layers();
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 40; ++trial) {
    const double cut = std::uniform_real_distribution<double>(0.05, 0.6)(rng);
    std::vector<int> starts = {0};
    for (int i = 1; i < num_layers; ++i) {
      if (std::bernoulli_distribution(cut)(rng)) starts.push_back(i);
    }
    std::vector<bool> recomputed;
    for (size_t s = 0; s < starts.size(); ++s) {
      recomputed.push_back(s + 1 < starts.size() && std::bernoulli_distribution(0.6)(rng));
    }
    std::ostringstream description;
    for (size_t s = 0; s < starts.size(); ++s) {
      description << starts[s] << (recomputed[s] ? "r " : " ");
    }
    SCOPED_TRACE("segments " + description.str());
    const Outcome<TypeParam> run =
        net->RunPlan(MakeCheckpointPlan(net->model(), kBatch, sizeof(TypeParam),
                                        CheckpointMode::kMemoryBudget, starts, recomputed));
    ExpectSameBits(none, run);
    ExpectRunFollowsThePlan(run);
  }
}

// ---------------------------------------------------------------------------------------------
// The memory-budget planner against exhaustive search on small models.

struct Segmentation {
  std::vector<int> starts;
  std::vector<bool> recomputed;
};

// Every way to cut num_layers layers into segments, each stored or recomputed (the last one
// stored): 3^(num_layers - 1) of them.
std::vector<Segmentation> AllSegmentations(int num_layers) {
  std::vector<Segmentation> all;
  for (uint32_t cuts = 0; cuts < (1u << (num_layers - 1)); ++cuts) {
    Segmentation base;
    base.starts = {0};
    for (int i = 1; i < num_layers; ++i) {
      if (cuts >> (i - 1) & 1) base.starts.push_back(i);
    }
    const int segments = static_cast<int>(base.starts.size());
    for (uint32_t kinds = 0; kinds < (1u << (segments - 1)); ++kinds) {
      Segmentation s = base;
      for (int j = 0; j < segments; ++j)
        s.recomputed.push_back(j + 1 < segments && (kinds >> j & 1));
      all.push_back(std::move(s));
    }
  }
  return all;
}

// A random model of num_layers layers mixing every kind, with widths 1..6.
ModelSpec RandomSmallModel(std::mt19937_64& rng, int num_layers, int64_t input_features) {
  const LayerKind kinds[] = {LayerKind::kLinear,   LayerKind::kReLU,    LayerKind::kLeakyReLU,
                             LayerKind::kSigmoid,  LayerKind::kTanh,    LayerKind::kGelu,
                             LayerKind::kGeluTanh, LayerKind::kIdentity};
  ModelSpec spec;
  int64_t width = input_features;
  for (int i = 0; i < num_layers; ++i) {
    const LayerKind kind = kinds[std::uniform_int_distribution<int>(0, 7)(rng)];
    if (kind == LayerKind::kLinear) {
      const int64_t out = std::uniform_int_distribution<int64_t>(1, 6)(rng);
      spec.layers.push_back(Linear(width, out));
      width = out;
    } else {
      spec.layers.push_back(Activation(kind));
    }
  }
  return spec;
}

TEST(MemoryBudgetPlanner, RecomputesTheFewestLayersOfAnyPlanThatFits) {
  std::mt19937_64 rng(2024);
  for (int trial = 0; trial < 24; ++trial) {
    const int num_layers = 3 + trial % 7;  // 3 .. 9 layers: at most 3^8 plans.
    const ModelSpec spec = RandomSmallModel(rng, num_layers, 4);
    absl::StatusOr<Model> model = Model::Create(spec, 4);
    ASSERT_TRUE(model.ok()) << model.status();
    std::ostringstream kinds;
    for (const LayerSpec& layer : spec.layers) kinds << LayerKindName(layer.kind) << " ";
    SCOPED_TRACE("trial " + std::to_string(trial) + ": " + kinds.str());

    constexpr int64_t kRows = 2, kElement = 4;
    std::vector<CheckpointPlan> plans;
    int64_t least = std::numeric_limits<int64_t>::max();
    for (Segmentation& s : AllSegmentations(num_layers)) {
      plans.push_back(MakeCheckpointPlan(*model, kRows, kElement, CheckpointMode::kMemoryBudget,
                                         std::move(s.starts), std::move(s.recomputed)));
      least = std::min(least, plans.back().predicted_peak_bytes);
    }
    const int64_t none_peak = NoCheckpointPeakBytes(*model, kRows, kElement);
    for (int64_t budget = std::max<int64_t>(1, least - kElement); budget <= none_peak + kElement;
         budget += kElement) {
      SCOPED_TRACE(Describe(Budget(budget)));
      absl::StatusOr<CheckpointPlan> plan =
          PlanCheckpoints(*model, kRows, kElement, Budget(budget));
      ASSERT_TRUE(plan.ok()) << plan.status();
      if (budget < least) {
        EXPECT_FALSE(plan->budget_met);
        EXPECT_EQ(plan->min_peak_bytes, least);
        EXPECT_EQ(plan->predicted_peak_bytes, least);
        continue;
      }
      int64_t fewest = std::numeric_limits<int64_t>::max();
      for (const CheckpointPlan& candidate : plans) {
        if (candidate.predicted_peak_bytes <= budget) {
          fewest = std::min(fewest, candidate.predicted_recomputed_layers);
        }
      }
      EXPECT_TRUE(plan->budget_met);
      EXPECT_LE(plan->predicted_peak_bytes, budget);
      EXPECT_EQ(plan->predicted_recomputed_layers, fewest);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The planner's cost is bounded, and it can be stopped.

// The attacker's model: 1024 Linear layers whose widths cycle through 2^20 >> (i % 21).
Model AdversarialModel() {
  ModelSpec spec;
  for (int i = 0; i < 1024; ++i) {
    spec.layers.push_back(Linear(int64_t{1} << 20 >> (i % 21), int64_t{1} << 20 >> ((i + 1) % 21)));
  }
  absl::StatusOr<Model> model = Model::Create(spec, int64_t{1} << 20);
  EXPECT_TRUE(model.ok()) << model.status();
  return *std::move(model);
}

// The exact search spends more than a billion steps on this model at a mid budget (and the old
// planner ran it ~40 times when nothing fit); the bounded one stays within this many.
constexpr int64_t kAdversarialWorkBound = int64_t{1} << 25;

TEST(MemoryBudgetPlanner, BoundsItsWorkOnTheAdversarialModel) {
  const Model model = AdversarialModel();
  const int64_t none_peak = NoCheckpointPeakBytes(model, 1, 4);
  absl::StatusOr<CheckpointPlan> sqrt = PlanCheckpoints(model, 1, 4, kSqrtMode);
  ASSERT_TRUE(sqrt.ok()) << sqrt.status();
  for (int64_t budget : {int64_t{1}, none_peak / 64, none_peak / 16, sqrt->predicted_peak_bytes,
                         none_peak / 2, none_peak - 1}) {
    SCOPED_TRACE(Describe(Budget(budget)));
    absl::StatusOr<CheckpointPlan> plan = PlanCheckpoints(model, 1, 4, Budget(budget));
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_LE(plan->planner_work, kAdversarialWorkBound);
    EXPECT_GT(plan->planner_work, 0);
    if (budget == 1) {
      EXPECT_FALSE(plan->budget_met);
      EXPECT_EQ(plan->min_peak_bytes, plan->predicted_peak_bytes);
    }
    if (plan->budget_met) {
      EXPECT_LE(plan->predicted_peak_bytes, budget);
    }
    if (budget >= sqrt->predicted_peak_bytes) {
      EXPECT_TRUE(plan->budget_met);
      EXPECT_LE(plan->predicted_recomputed_layers, sqrt->predicted_recomputed_layers);
    }
    // The plan is what the replay of its segments predicts.
    const CheckpointPlan replay = MakeCheckpointPlan(
        model, 1, 4, CheckpointMode::kMemoryBudget, plan->segment_starts, plan->segment_recomputed);
    EXPECT_EQ(plan->predicted_peak_bytes, replay.predicted_peak_bytes);
    EXPECT_EQ(plan->predicted_recomputed_layers, replay.predicted_recomputed_layers);
  }
}

TEST(MemoryBudgetPlanner, ALeanerBudgetThanPossibleStillMeetsTheLeanestPeak) {
  const Model model = AdversarialModel();
  absl::StatusOr<CheckpointPlan> hopeless = PlanCheckpoints(model, 1, 4, Budget(1));
  ASSERT_TRUE(hopeless.ok()) << hopeless.status();
  const int64_t least = hopeless->min_peak_bytes;
  absl::StatusOr<CheckpointPlan> at_least = PlanCheckpoints(model, 1, 4, Budget(least));
  ASSERT_TRUE(at_least.ok()) << at_least.status();
  EXPECT_TRUE(at_least->budget_met);
  absl::StatusOr<CheckpointPlan> below = PlanCheckpoints(model, 1, 4, Budget(least - 1));
  ASSERT_TRUE(below.ok()) << below.status();
  EXPECT_FALSE(below->budget_met);
  EXPECT_EQ(below->min_peak_bytes, least);
}

TEST(MemoryBudgetPlanner, PollsShouldStopRegularlyAndStopsWhenAsked) {
  const Model model = AdversarialModel();
  const int64_t none_peak = NoCheckpointPeakBytes(model, 1, 4);
  for (int64_t budget : {int64_t{1}, none_peak / 2}) {
    SCOPED_TRACE(Describe(Budget(budget)));
    CheckpointOptions options = Budget(budget);
    int64_t polls = 0;
    options.should_stop = [&polls] {
      ++polls;
      return false;
    };
    absl::StatusOr<CheckpointPlan> plan = PlanCheckpoints(model, 1, 4, options);
    ASSERT_TRUE(plan.ok()) << plan.status();
    // At least once per layer of every search, so never more than ~a DP row apart.
    EXPECT_GE(polls, model.num_layers());
    EXPECT_LE(plan->planner_work / polls, int64_t{1} << 16) << polls << " polls";
    const int64_t all_polls = polls;
    for (int64_t stop_after : {int64_t{0}, int64_t{1}, all_polls / 2, all_polls - 1}) {
      SCOPED_TRACE(stop_after);
      int64_t seen = 0;
      options.should_stop = [&seen, stop_after] { return seen++ >= stop_after; };
      absl::StatusOr<CheckpointPlan> stopped = PlanCheckpoints(model, 1, 4, options);
      ASSERT_FALSE(stopped.ok());
      EXPECT_EQ(stopped.status().code(), absl::StatusCode::kCancelled) << stopped.status();
      EXPECT_EQ(seen, stop_after + 1);  // Stops at the first true, polls no further.
    }
  }
}

// EVERY_K for every k, as the planner must match or beat them.
std::vector<CheckpointPlan> UniformPlans(const Model& model, int64_t batch, int64_t element_bytes) {
  std::vector<CheckpointPlan> plans;
  for (int k = 1; k <= model.num_layers(); ++k) {
    absl::StatusOr<CheckpointPlan> plan = PlanCheckpoints(model, batch, element_bytes, EveryK(k));
    EXPECT_TRUE(plan.ok()) << plan.status();
    if (plan.ok()) plans.push_back(*std::move(plan));
  }
  return plans;
}

// The memory-budget search as it was before its cost was bounded (an unbucketed dynamic
// programme, plus every uniform plan): the oracle for the bounded planner on small models.
std::optional<CheckpointPlan> ReferenceBestPlanWithin(const Model& model, int64_t batch,
                                                      int64_t element_bytes, int64_t budget) {
  const int num_layers = model.num_layers();
  std::vector<int64_t> bytes(num_layers + 1, 0);
  for (int k = 1; k <= num_layers; ++k) bytes[k] = batch * model.width(k) * element_bytes;
  constexpr int64_t kInfinite = std::numeric_limits<int64_t>::max();
  struct Parent {
    int from = -1;
    bool from_recomputed = false;
    int from_cost = -1;
  };
  auto reads_output = [&](int layer) { return BackwardReadsOutput(model.layer(layer).kind); };
  auto reads_input = [&](int layer) { return BackwardReadsInput(model.layer(layer).kind); };
  std::vector<std::vector<std::vector<int64_t>>> min_prefix(
      num_layers + 1,
      std::vector<std::vector<int64_t>>(2, std::vector<int64_t>(num_layers + 1, kInfinite)));
  std::vector<std::vector<std::vector<Parent>>> parent(
      num_layers + 1, std::vector<std::vector<Parent>>(2, std::vector<Parent>(num_layers + 1)));
  min_prefix[0][0][0] = 0;
  min_prefix[0][1][0] = 0;
  for (int p = 0; p < num_layers; ++p) {
    for (int recomputed = 0; recomputed < 2; ++recomputed) {
      const std::vector<int64_t>& at_p = min_prefix[p][recomputed];
      int64_t interior_bytes = 0;
      int last_interior = p;
      for (int q = p + 1; q <= num_layers; ++q) {
        if (q - 1 > p && (reads_output(q - 2) || reads_input(q - 1))) {
          interior_bytes += bytes[q - 1];
          last_interior = q - 1;
        }
        const bool reads_end = reads_output(q - 1);
        for (int next = 0; next < 2; ++next) {
          if (q == num_layers && (recomputed || next)) continue;
          int64_t kept = recomputed ? 0 : interior_bytes;
          int64_t recomputed_bytes = recomputed ? interior_bytes : 0;
          int64_t carried_to_next = 0;
          int recompute_end = last_interior;
          if (q == num_layers) {
            if (reads_end) kept += bytes[q];
          } else if (next || reads_input(q) || (!recomputed && reads_end)) {
            (reads_end ? kept : carried_to_next) += bytes[q];
          } else if (reads_end) {
            recomputed_bytes += bytes[q];
            recompute_end = q;
          }
          const int64_t live = kept + recomputed_bytes;
          const int added_cost = recomputed ? recompute_end - p : 0;
          kept += carried_to_next;
          for (int c = 0; c + added_cost <= num_layers; ++c) {
            if (at_p[c] == kInfinite || at_p[c] + live > budget) continue;
            int64_t& target = min_prefix[q][next][c + added_cost];
            if (at_p[c] + kept < target) {
              target = at_p[c] + kept;
              parent[q][next][c + added_cost] = {p, recomputed == 1, c};
            }
          }
        }
      }
    }
  }
  std::optional<CheckpointPlan> best;
  auto consider = [&](CheckpointPlan plan) {
    if (plan.predicted_peak_bytes > budget) return;
    if (!best || plan.predicted_recomputed_layers < best->predicted_recomputed_layers) {
      best = std::move(plan);
    }
  };
  for (int c = 0; c <= num_layers; ++c) {
    if (min_prefix[num_layers][0][c] == kInfinite) continue;
    std::vector<int> starts;
    std::vector<bool> recomputed;
    for (int q = num_layers, next = 0, cost = c; q > 0;) {
      const Parent& from = parent[q][next][cost];
      starts.insert(starts.begin(), from.from);
      recomputed.insert(recomputed.begin(), from.from_recomputed);
      q = from.from;
      next = from.from_recomputed;
      cost = from.from_cost;
    }
    consider(MakeCheckpointPlan(model, batch, element_bytes, CheckpointMode::kMemoryBudget,
                                std::move(starts), std::move(recomputed)));
    break;
  }
  for (const CheckpointPlan& uniform : UniformPlans(model, batch, element_bytes)) {
    consider(uniform);
  }
  return best;
}

TEST(MemoryBudgetPlanner, MatchesTheExactSearchOnSmallModelsAndBeatsUniformPlansWhenBounded) {
  using K = LayerKind;
  const LayerKind kinds[] = {K::kLinear, K::kReLU, K::kTanh, K::kSigmoid, K::kIdentity};
  std::mt19937_64 rng(4242);
  constexpr int64_t kRows = 3, kElement = 4;
  for (int trial = 0; trial < 40; ++trial) {
    const int num_layers = std::uniform_int_distribution<int>(1, 40)(rng);
    ModelSpec spec;
    int64_t width = std::uniform_int_distribution<int64_t>(1, 64)(rng);
    const int64_t input_features = width;
    for (int i = 0; i < num_layers; ++i) {
      const LayerKind kind = kinds[std::uniform_int_distribution<int>(0, 4)(rng)];
      if (kind == K::kLinear) {
        const int64_t out = std::uniform_int_distribution<int64_t>(1, 64)(rng);
        spec.layers.push_back(Linear(width, out));
        width = out;
      } else {
        spec.layers.push_back(Activation(kind));
      }
    }
    absl::StatusOr<Model> model = Model::Create(spec, input_features);
    ASSERT_TRUE(model.ok()) << model.status();
    SCOPED_TRACE("trial " + std::to_string(trial) + ", " + std::to_string(num_layers) + " layers");
    const std::vector<CheckpointPlan> uniform = UniformPlans(*model, kRows, kElement);
    const int64_t none_peak = NoCheckpointPeakBytes(*model, kRows, kElement);
    absl::StatusOr<CheckpointPlan> hopeless = PlanCheckpoints(*model, kRows, kElement, Budget(1));
    ASSERT_TRUE(hopeless.ok()) << hopeless.status();
    const int64_t least = hopeless->budget_met ? 1 : hopeless->min_peak_bytes;
    for (int b = 0; b < 12; ++b) {
      const int64_t budget = std::max<int64_t>(
          1, std::uniform_int_distribution<int64_t>(least - least / 4, none_peak + 1)(rng));
      SCOPED_TRACE(Describe(Budget(budget)));
      const std::optional<CheckpointPlan> reference =
          ReferenceBestPlanWithin(*model, kRows, kElement, budget);
      absl::StatusOr<CheckpointPlan> exact =
          PlanCheckpoints(*model, kRows, kElement, Budget(budget));
      // A work limit of 1 forces the coarsest search: one cost bucket.
      CheckpointOptions bounded_options = Budget(budget);
      bounded_options.planner_work_limit = 1;
      absl::StatusOr<CheckpointPlan> bounded =
          PlanCheckpoints(*model, kRows, kElement, bounded_options);
      ASSERT_TRUE(exact.ok()) << exact.status();
      ASSERT_TRUE(bounded.ok()) << bounded.status();
      for (const CheckpointPlan* plan : {&*exact, &*bounded}) {
        EXPECT_EQ(plan->budget_met, reference.has_value());
        if (plan->budget_met) {
          EXPECT_LE(plan->predicted_peak_bytes, budget);
        } else {
          EXPECT_EQ(plan->min_peak_bytes, least);
          EXPECT_EQ(plan->predicted_peak_bytes, least);
        }
        for (const CheckpointPlan& every_k : uniform) {
          if (every_k.predicted_peak_bytes <= std::max(budget, least)) {
            EXPECT_LE(plan->predicted_recomputed_layers, every_k.predicted_recomputed_layers)
                << "EVERY_K(" << every_k.segment_starts.size() << " segments) recomputes less";
          }
        }
      }
      if (reference) {
        // Small models are always within the exact search's means.
        EXPECT_EQ(exact->predicted_recomputed_layers, reference->predicted_recomputed_layers);
        EXPECT_GE(bounded->predicted_recomputed_layers, reference->predicted_recomputed_layers);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Errors.

class CheckpointErrorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<Model> model = Model::Create(TanhNetSpec(), 32);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::make_unique<Model>(*std::move(model));
  }
  void ExpectInvalid(const CheckpointOptions& options, const std::string& field) {
    absl::StatusOr<CheckpointPlan> plan = PlanCheckpoints(*model_, kBatch, 8, options);
    ASSERT_FALSE(plan.ok()) << Describe(options) << " was accepted";
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument) << plan.status();
    EXPECT_THAT(std::string(plan.status().message()), HasSubstr(field));
  }
  std::unique_ptr<Model> model_;
};

TEST_F(CheckpointErrorTest, EveryKOutsideOneToTheLayerCountIsNamed) {
  for (int64_t k : {int64_t{0}, int64_t{-1}, int64_t{33}, int64_t{1} << 40}) {
    SCOPED_TRACE(k);
    ExpectInvalid(EveryK(k), "options.checkpointing.every_k");
  }
  for (int64_t k : {1, 32}) {
    EXPECT_TRUE(PlanCheckpoints(*model_, kBatch, 8, EveryK(k)).ok()) << "every_k " << k;
  }
}

TEST_F(CheckpointErrorTest, ANonPositiveMemoryBudgetIsNamed) {
  for (int64_t budget : {int64_t{0}, int64_t{-1}, std::numeric_limits<int64_t>::min()}) {
    SCOPED_TRACE(budget);
    ExpectInvalid(Budget(budget), "options.checkpointing.memory_budget_bytes");
  }
}

TEST_F(CheckpointErrorTest, OptionsOfOtherModesAreIgnored) {
  EXPECT_TRUE(PlanCheckpoints(*model_, kBatch, 8, {CheckpointMode::kNone, 0, -5}).ok());
  EXPECT_TRUE(PlanCheckpoints(*model_, kBatch, 8, {CheckpointMode::kSqrt, 999, 0}).ok());
  EXPECT_TRUE(PlanCheckpoints(*model_, kBatch, 8, {CheckpointMode::kEveryK, 4, -1}).ok());
  EXPECT_TRUE(PlanCheckpoints(*model_, kBatch, 8, {CheckpointMode::kMemoryBudget, 0, 1}).ok());
}

}  // namespace
}  // namespace gradserve::engine
