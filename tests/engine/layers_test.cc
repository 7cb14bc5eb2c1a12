// Golden checks against independent oracles: a worked Linear -> ReLU -> MSE example computed
// here with plain loops, each activation's forward value and derivative against its scalar
// formula, and each loss against its definition.
#include "server/engine/layers.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/engine/backprop.h"
#include "server/engine/checkpoint.h"
#include "server/engine/losses.h"
#include "server/engine/model.h"

namespace gradserve::engine {
namespace {

// Passes if every |actual[j] - expected[j]| <= rel_tol * max(|expected[j]|, abs_floor); on
// failure reports the worst entry and the max difference.
template <typename T>
::testing::AssertionResult AllClose(std::string_view what, std::span<const T> actual,
                                    std::span<const double> expected, double rel_tol,
                                    double abs_floor) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << what << ": size " << actual.size() << " != " << expected.size();
  }
  double max_diff = 0;
  double worst_ratio = 0;
  size_t worst = 0;
  for (size_t j = 0; j < actual.size(); ++j) {
    const double diff = std::abs(static_cast<double>(actual[j]) - expected[j]);
    const double ratio = diff / (rel_tol * std::max(std::abs(expected[j]), abs_floor));
    max_diff = std::max(max_diff, diff);
    if (!(ratio <= worst_ratio)) {
      worst_ratio = ratio;
      worst = j;
    }
  }
  if (worst_ratio <= 1) return ::testing::AssertionSuccess();
  std::ostringstream message;
  message.precision(17);
  message << what << ": max difference " << max_diff << "; worst at [" << worst << "] got "
          << static_cast<double>(actual[worst]) << ", expected " << expected[worst]
          << " (relative tolerance " << rel_tol << ")";
  return ::testing::AssertionFailure() << message.str();
}

// ---------------------------------------------------------------------------------------------
// The worked example: batch 8, in 4, out 2, Linear -> ReLU -> MSE (MEAN).

constexpr int64_t kBatch = 8;
constexpr int64_t kIn = 4;
constexpr int64_t kOut = 2;

struct WorkedExample {
  std::vector<double> x;  // [B, in]
  std::vector<double> w;  // [out, in]
  std::vector<double> b;  // [out]
  std::vector<double> t;  // [B, out]
};

// Seeded data whose pre-activations are all at least 0.05 away from the ReLU kink, so that
// float32 and float64 agree on the mask; both signs occur.
WorkedExample MakeWorkedExample() {
  for (uint64_t seed = 7;; ++seed) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> uniform(-1, 1);
    WorkedExample e;
    for (int64_t j = 0; j < kBatch * kIn; ++j) e.x.push_back(uniform(rng));
    for (int64_t j = 0; j < kOut * kIn; ++j) e.w.push_back(uniform(rng));
    for (int64_t j = 0; j < kOut; ++j) e.b.push_back(0.5 * uniform(rng));
    for (int64_t j = 0; j < kBatch * kOut; ++j) e.t.push_back(uniform(rng));
    bool far_from_kink = true;
    for (int64_t r = 0; r < kBatch; ++r) {
      for (int64_t o = 0; o < kOut; ++o) {
        double z = e.b[o];
        for (int64_t i = 0; i < kIn; ++i) z += e.x[r * kIn + i] * e.w[o * kIn + i];
        far_from_kink = far_from_kink && std::abs(z) > 0.05;
      }
    }
    if (far_from_kink) return e;
  }
}

// Everything the engine returns, computed with plain loops in double.
struct Reference {
  std::vector<double> z, a;  // [B, out]
  double loss = 0;
  std::vector<double> delta;  // dL/dz, [B, out]
  std::vector<double> dw;     // [out, in]
  std::vector<double> db;     // [out]
  std::vector<double> dx;     // [B, in]
  int positive = 0, negative = 0;
};

Reference ComputeReference(const WorkedExample& e) {
  Reference ref;
  ref.z.assign(kBatch * kOut, 0);
  ref.a.assign(kBatch * kOut, 0);
  // z = x W^T + b, a = relu(z).
  for (int64_t r = 0; r < kBatch; ++r) {
    for (int64_t o = 0; o < kOut; ++o) {
      double z = e.b[o];
      for (int64_t i = 0; i < kIn; ++i) z += e.x[r * kIn + i] * e.w[o * kIn + i];
      ref.z[r * kOut + o] = z;
      ref.a[r * kOut + o] = z > 0 ? z : 0;
      (z > 0 ? ref.positive : ref.negative) += 1;
    }
  }
  // L = mean((a - t)^2); dL/da = 2 (a - t) / N; delta = dL/dz = dL/da * [z > 0].
  const double n = kBatch * kOut;
  ref.delta.assign(kBatch * kOut, 0);
  for (int64_t j = 0; j < kBatch * kOut; ++j) {
    const double d = ref.a[j] - e.t[j];
    ref.loss += d * d / n;
    ref.delta[j] = ref.z[j] > 0 ? 2 * d / n : 0;
  }
  // dW = delta^T x, db = sum over the batch of delta, dx = delta W.
  ref.dw.assign(kOut * kIn, 0);
  ref.db.assign(kOut, 0);
  ref.dx.assign(kBatch * kIn, 0);
  for (int64_t r = 0; r < kBatch; ++r) {
    for (int64_t o = 0; o < kOut; ++o) {
      const double d = ref.delta[r * kOut + o];
      ref.db[o] += d;
      for (int64_t i = 0; i < kIn; ++i) {
        ref.dw[o * kIn + i] += d * e.x[r * kIn + i];
        ref.dx[r * kIn + i] += d * e.w[o * kIn + i];
      }
    }
  }
  return ref;
}

double Norm(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x * x;
  return std::sqrt(sum);
}

template <typename T>
std::vector<T> Cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <typename T>
struct WorkedRun {
  RunResult result;
  CheckpointPlan plan;
  std::vector<T> dw, db, dx, output;
};

template <typename T>
WorkedRun<T> RunWorkedExample(const WorkedExample& e) {
  ModelSpec spec;
  LayerSpec linear;
  linear.kind = LayerKind::kLinear;
  linear.in_features = kIn;
  linear.out_features = kOut;
  LayerSpec relu;
  relu.kind = LayerKind::kReLU;
  spec.layers = {linear, relu};
  spec.loss = {LossKind::kMse, Reduction::kMean};
  absl::StatusOr<Model> model = Model::Create(spec, kIn);
  EXPECT_TRUE(model.ok()) << model.status();

  const std::vector<T> x = Cast<T>(e.x), w = Cast<T>(e.w), b = Cast<T>(e.b), t = Cast<T>(e.t);
  WorkedRun<T> run;
  run.dw.assign(w.size(), T(-7));  // Poisoned: the engine must overwrite every entry.
  run.db.assign(b.size(), T(-7));
  run.dx.assign(x.size(), T(-7));
  run.output.assign(t.size(), T(-7));
  const std::vector<LinearParamsView<T>> params = {{w.data(), b.data()}};
  BatchView<T> batch;
  batch.batch = kBatch;
  batch.inputs = x.data();
  batch.targets.targets = t.data();
  OutputsView<T> outputs;
  outputs.gradients = {{run.dw.data(), run.db.data()}};
  outputs.input_gradient = run.dx.data();
  outputs.output = run.output.data();
  absl::StatusOr<CheckpointPlan> plan = PlanCheckpoints(*model, kBatch, sizeof(T), {});
  EXPECT_TRUE(plan.ok()) << plan.status();
  run.plan = *plan;
  absl::StatusOr<RunResult> result = RunBackprop<T>(*model, *plan, params, batch, outputs, {});
  EXPECT_TRUE(result.ok()) << result.status();
  run.result = *result;
  return run;
}

TEST(WorkedExample, DataExercisesBothSidesOfTheReLU) {
  const Reference ref = ComputeReference(MakeWorkedExample());
  EXPECT_GT(ref.positive, 0);
  EXPECT_GT(ref.negative, 0);
}

TEST(WorkedExample, Float64MatchesTheHandWrittenLoopsTo1e12) {
  const WorkedExample e = MakeWorkedExample();
  const Reference ref = ComputeReference(e);
  const WorkedRun<double> run = RunWorkedExample<double>(e);
  constexpr double kTol = 1e-12;
  EXPECT_NEAR(run.result.loss, ref.loss, kTol * std::abs(ref.loss))
      << "max difference " << std::abs(run.result.loss - ref.loss);
  EXPECT_TRUE(AllClose<double>("dW", run.dw, ref.dw, kTol, 1e-300));
  EXPECT_TRUE(AllClose<double>("db", run.db, ref.db, kTol, 1e-300));
  EXPECT_TRUE(AllClose<double>("dx", run.dx, ref.dx, kTol, 1e-300));
  EXPECT_TRUE(AllClose<double>("output", run.output, ref.a, kTol, 1e-300));
}

TEST(WorkedExample, Float32MatchesTheHandWrittenLoopsTo1e5) {
  WorkedExample e = MakeWorkedExample();
  // The reference solves the same problem the float32 run sees: the inputs rounded to float.
  for (auto* v : {&e.x, &e.w, &e.b, &e.t}) {
    for (double& value : *v) value = static_cast<float>(value);
  }
  const Reference ref = ComputeReference(e);
  const WorkedRun<float> run = RunWorkedExample<float>(e);
  constexpr double kTol = 1e-5;
  EXPECT_NEAR(run.result.loss, ref.loss, kTol * std::abs(ref.loss))
      << "max difference " << std::abs(run.result.loss - ref.loss);
  // Entries that cancel to nearly zero are compared against 1% of the tensor's scale.
  EXPECT_TRUE(AllClose<float>("dW", run.dw, ref.dw, kTol, 1e-2 * Norm(ref.dw)));
  EXPECT_TRUE(AllClose<float>("db", run.db, ref.db, kTol, 1e-2 * Norm(ref.db)));
  EXPECT_TRUE(AllClose<float>("dx", run.dx, ref.dx, kTol, 1e-2 * Norm(ref.dx)));
  EXPECT_TRUE(AllClose<float>("output", run.output, ref.a, kTol, 1e-2 * Norm(ref.a)));
}

TEST(WorkedExample, DiagnosticsAndMemoryMatchTheExample) {
  const WorkedExample e = MakeWorkedExample();
  const Reference ref = ComputeReference(e);
  const WorkedRun<double> run = RunWorkedExample<double>(e);
  const RunResult& r = run.result;
  ASSERT_EQ(r.diagnostics.size(), 2u);
  constexpr double kTol = 1e-12;
  // Layer 0 (Linear) outputs z and receives dL/dz; layer 1 (ReLU) outputs a.
  EXPECT_NEAR(r.diagnostics[0].activation_norm, Norm(ref.z), kTol * Norm(ref.z));
  EXPECT_NEAR(r.diagnostics[1].activation_norm, Norm(ref.a), kTol * Norm(ref.a));
  EXPECT_NEAR(r.diagnostics[0].output_grad_norm.value(), Norm(ref.delta), kTol * Norm(ref.delta));
  EXPECT_NEAR(r.diagnostics[0].weight_grad_norm.value(), Norm(ref.dw), kTol * Norm(ref.dw));
  EXPECT_NEAR(r.diagnostics[0].bias_grad_norm.value(), Norm(ref.db), kTol * Norm(ref.db));
  // The ReLU has no parameters; its output gradient is the loss's.
  EXPECT_FALSE(r.diagnostics[1].weight_grad_norm.has_value());
  EXPECT_FALSE(r.diagnostics[1].bias_grad_norm.has_value());
  EXPECT_TRUE(r.diagnostics[1].output_grad_norm.has_value());
  EXPECT_EQ(r.diagnostics[0].non_finite_count, 0);
  EXPECT_EQ(r.diagnostics[1].non_finite_count, 0);
  // Only a = relu(z) is cached (ReLU reads its output; the input x is read in place).
  const int64_t a_bytes = kBatch * kOut * sizeof(double);
  EXPECT_EQ(run.plan.predicted_peak_bytes, a_bytes);
  EXPECT_EQ(r.peak_activation_bytes, a_bytes);
  EXPECT_EQ(r.layers_recomputed, 0);
}

// ---------------------------------------------------------------------------------------------
// Activations against their scalar formulas.

struct ActivationCase {
  std::string name;
  LayerKind kind;
  double slope;                          // LeakyReLU only.
  double (*value)(double, double);       // f(x; slope)
  double (*derivative)(double, double);  // f'(x; slope)
};

constexpr double kPi = 3.14159265358979323846;

double GaussianCdf(double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); }
double GaussianPdf(double x) { return std::exp(-0.5 * x * x) / std::sqrt(2 * kPi); }
double GeluTanhInner(double x) { return std::sqrt(2 / kPi) * (x + 0.044715 * x * x * x); }

const ActivationCase kActivationCases[] = {
    {"ReLU", LayerKind::kReLU, 0, [](double x, double) { return std::max(x, 0.0); },
     // PyTorch's convention: the derivative at 0 is 0.
     [](double x, double) { return x > 0 ? 1.0 : 0.0; }},
    {"LeakyReLUDefault", LayerKind::kLeakyReLU, 0.01,
     [](double x, double s) { return x >= 0 ? x : s * x; },
     // At 0 PyTorch uses the negative slope.
     [](double x, double s) { return x > 0 ? 1.0 : s; }},
    {"LeakyReLUNegativeSlope", LayerKind::kLeakyReLU, -0.3,
     [](double x, double s) { return x >= 0 ? x : s * x; },
     [](double x, double s) { return x > 0 ? 1.0 : s; }},
    {"Sigmoid", LayerKind::kSigmoid, 0,
     [](double x, double) {
       return x >= 0 ? 1 / (1 + std::exp(-x)) : std::exp(x) / (1 + std::exp(x));
     },
     [](double x, double) {
       const double e = std::exp(-std::abs(x));
       return e / ((1 + e) * (1 + e));
     }},
    {"Tanh", LayerKind::kTanh, 0,
     [](double x, double) {
       return std::abs(x) > 20 ? std::copysign(1.0, x) : std::sinh(x) / std::cosh(x);
     },
     [](double x, double) { return 1 / (std::cosh(x) * std::cosh(x)); }},
    {"GeluExact", LayerKind::kGelu, 0, [](double x, double) { return x * GaussianCdf(x); },
     [](double x, double) { return GaussianCdf(x) + x * GaussianPdf(x); }},
    {"GeluTanh", LayerKind::kGeluTanh, 0,
     [](double x, double) { return 0.5 * x * (1 + std::tanh(GeluTanhInner(x))); },
     [](double x, double) {
       const double th = std::tanh(GeluTanhInner(x));
       const double inner_derivative = std::sqrt(2 / kPi) * (1 + 3 * 0.044715 * x * x);
       return 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * inner_derivative;
     }},
    {"Identity", LayerKind::kIdentity, 0, [](double x, double) { return x; },
     [](double, double) { return 1.0; }},
};

class ActivationTest : public ::testing::TestWithParam<ActivationCase> {
 protected:
  static std::vector<double> Inputs() {
    std::vector<double> x = {-30, -8, -3, -1.5, -1, -0.5, -1e-3, 0, 1e-3, 0.25, 0.7, 1, 2.5, 6, 30};
    std::mt19937_64 rng(3);
    std::normal_distribution<double> normal(0, 2);
    while (x.size() < 40) x.push_back(normal(rng));
    return x;
  }
  LayerSpec Layer() const {
    LayerSpec layer;
    layer.kind = GetParam().kind;
    layer.negative_slope = GetParam().slope;
    return layer;
  }
};

TEST_P(ActivationTest, ForwardMatchesTheScalarFormula) {
  const ActivationCase& c = GetParam();
  const std::vector<double> x = Inputs();
  std::vector<double> expected;
  for (double v : x) expected.push_back(c.value(v, c.slope));
  // Laid out as [5, 8] so a batch of several rows is exercised.
  std::vector<double> y(x.size(), -7);
  LayerForward<double>(Layer(), {}, 5, 8, x.data(), y.data());
  // Relative to max(|y|, 1): GELU's 1 + erf(x / sqrt 2) cancels for negative x, as PyTorch's.
  EXPECT_TRUE(AllClose<double>(c.name, y, expected, 1e-14, 1));

  const std::vector<float> xf(x.begin(), x.end());
  std::vector<double> expected_f;
  for (float v : xf) expected_f.push_back(c.value(v, static_cast<float>(c.slope)));
  std::vector<float> yf(x.size(), -7);
  LayerForward<float>(Layer(), {}, 5, 8, xf.data(), yf.data());
  EXPECT_TRUE(AllClose<float>(c.name + " float32", yf, expected_f, 1e-6, 1));
}

TEST_P(ActivationTest, BackwardMatchesTheScalarDerivative) {
  const ActivationCase& c = GetParam();
  const std::vector<double> x = Inputs();
  std::vector<double> y(x.size());
  LayerForward<double>(Layer(), {}, 5, 8, x.data(), y.data());
  // dy varies per entry so that a backward pass ignoring it would fail.
  std::vector<double> grad(x.size()), expected;
  for (size_t j = 0; j < x.size(); ++j) {
    grad[j] = 0.5 + 0.1 * static_cast<double>(j);
    expected.push_back(grad[j] * c.derivative(x[j], c.slope));
  }
  ElementwiseBackward<double>(Layer(), 5, 8, x.data(), y.data(), grad.data());
  EXPECT_TRUE(AllClose<double>(c.name, grad, expected, 1e-13, 1));
}

INSTANTIATE_TEST_SUITE_P(EveryActivation, ActivationTest, ::testing::ValuesIn(kActivationCases),
                         [](const auto& info) { return info.param.name; });

// ---------------------------------------------------------------------------------------------
// Losses against their definitions.

struct LossData {
  static constexpr int64_t kRows = 3;
  static constexpr int64_t kCols = 4;
  // Includes large logits: BCE and cross-entropy must not overflow.
  std::vector<double> output = {0.3, -1.2, 2.0, 0.05, -40, 35, 1.5, -0.7, 0.9, 0.1, -2.2, 60};
  std::vector<double> targets = {0.1, 0.4, -0.5, 0.05, 0.0, 1.0, 2.6, 0.3, 1.0, 0.0, 0.5, 1.0};
  std::vector<int64_t> classes = {2, 0, 3};
  std::vector<double> output_gradient = {0.5, -1, 2, 0.25, 1, -3, 0.5, 0.75, -0.5, 1, 1.5, -2};
};

double ExpectedLoss(const LossSpec& loss, const LossData& d) {
  const int64_t n = LossData::kRows * LossData::kCols;
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double o = d.output[j], t = d.targets[j], r = o - t;
    switch (loss.kind) {
      case LossKind::kMse:
        sum += r * r;
        break;
      case LossKind::kL1:
        sum += std::abs(r);
        break;
      case LossKind::kHuber:
        sum += std::abs(r) <= loss.huber_delta
                   ? 0.5 * r * r
                   : loss.huber_delta * (std::abs(r) - 0.5 * loss.huber_delta);
        break;
      case LossKind::kBceWithLogits: {
        // -[t log s(o) + (1 - t) log(1 - s(o))], with log s(o) = -log1p(exp(-o)).
        const double log_s = o >= 0 ? -std::log1p(std::exp(-o)) : o - std::log1p(std::exp(o));
        const double log_1ms = o >= 0 ? -o - std::log1p(std::exp(-o)) : -std::log1p(std::exp(o));
        sum += -(t * log_s + (1 - t) * log_1ms);
        break;
      }
      case LossKind::kExternal:
        sum += o * d.output_gradient[j];
        break;
      case LossKind::kCrossEntropy:
        break;
    }
  }
  if (loss.kind == LossKind::kCrossEntropy) {
    for (int64_t r = 0; r < LossData::kRows; ++r) {
      const double* z = &d.output[r * LossData::kCols];
      const double m = *std::max_element(z, z + LossData::kCols);
      double s = 0;
      for (int64_t j = 0; j < LossData::kCols; ++j) s += std::exp(z[j] - m);
      sum += m + std::log(s) - z[d.classes[r]];
    }
    return loss.reduction == Reduction::kMean ? sum / LossData::kRows : sum;
  }
  if (loss.kind == LossKind::kExternal) return sum;  // Reduction is ignored.
  return loss.reduction == Reduction::kMean ? sum / n : sum;
}

TEST(Losses, ValuesMatchTheirDefinitions) {
  const LossData d;
  LossTargets<double> targets;
  targets.targets = d.targets.data();
  targets.class_targets = d.classes.data();
  targets.output_gradient = d.output_gradient.data();
  for (LossKind kind : {LossKind::kMse, LossKind::kL1, LossKind::kHuber, LossKind::kCrossEntropy,
                        LossKind::kBceWithLogits, LossKind::kExternal}) {
    for (Reduction reduction : {Reduction::kMean, Reduction::kSum}) {
      LossSpec loss{kind, reduction, 0.8};
      SCOPED_TRACE(::testing::Message() << LossKindName(kind) << " "
                                        << (reduction == Reduction::kMean ? "mean" : "sum"));
      const double expected = ExpectedLoss(loss, d);
      const double value =
          LossValue<double>(loss, LossData::kRows, LossData::kCols, d.output.data(), targets);
      ASSERT_TRUE(std::isfinite(value));
      EXPECT_NEAR(value, expected, 1e-13 * std::max(1.0, std::abs(expected)))
          << "max difference " << std::abs(value - expected);
      std::vector<double> grad(d.output.size());
      const double returned = LossGradient<double>(loss, LossData::kRows, LossData::kCols,
                                                   d.output.data(), targets, grad.data());
      // The external loss has no value of its own: the API returns 0.
      EXPECT_EQ(returned, kind == LossKind::kExternal ? 0.0 : value);
      for (double g : grad) EXPECT_TRUE(std::isfinite(g));
    }
  }
}

TEST(Losses, HuberCoversBothBranchesInTheTestData) {
  const LossData d;
  int quadratic = 0, linear = 0;
  for (size_t j = 0; j < d.output.size(); ++j) {
    (std::abs(d.output[j] - d.targets[j]) <= 0.8 ? quadratic : linear) += 1;
  }
  EXPECT_GT(quadratic, 0);
  EXPECT_GT(linear, 0);
}

TEST(Losses, GradientsAtTheKinksFollowPyTorch) {
  // L1 at a zero residual: 0. Huber at |d| == delta: +-delta.
  const std::vector<double> output = {1.0, 2.5, -0.5};
  const std::vector<double> targets = {1.0, 2.0, 0.0};
  LossTargets<double> t;
  t.targets = targets.data();
  std::vector<double> grad(3);
  LossGradient<double>({LossKind::kL1, Reduction::kSum, 1.0}, 1, 3, output.data(), t, grad.data());
  EXPECT_THAT(grad, ::testing::ElementsAre(0.0, 1.0, -1.0));
  LossGradient<double>({LossKind::kHuber, Reduction::kSum, 0.5}, 1, 3, output.data(), t,
                       grad.data());
  EXPECT_THAT(grad, ::testing::ElementsAre(0.0, 0.5, -0.5));
}

TEST(Losses, ExternalGradientIsTheCallersOutputGradientWhateverTheReduction) {
  const LossData d;
  LossTargets<double> targets;
  targets.output_gradient = d.output_gradient.data();
  for (Reduction reduction : {Reduction::kMean, Reduction::kSum}) {
    std::vector<double> grad(d.output.size(), -7);
    LossGradient<double>({LossKind::kExternal, reduction, 1.0}, LossData::kRows, LossData::kCols,
                         d.output.data(), targets, grad.data());
    EXPECT_EQ(grad, d.output_gradient);
  }
}

}  // namespace
}  // namespace gradserve::engine
