// The GEMM behind every Linear layer (Note [GEMM backend]): products against a float64
// reference for every transpose combination and shapes on both sides of the backend switch;
// the promise the engine's determinism rests on (for a given thread count, bits independent of
// operand alignment); float32 backprop through layers large enough for oneDNN, against float64
// finite differences and across checkpoint plans. CTest also runs these with oneDNN held to its
// AVX2 and SSE4.1 kernels (DNNL_MAX_CPU_ISA), the code other CPUs get.
#include "server/engine/gemm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "server/engine/backprop.h"
#include "server/engine/gradient_check.h"
#include "server/engine/types.h"
#include "tests/engine/layer_specs.h"

namespace gradserve::engine {
namespace {

std::vector<float> RandomFloats(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1, 1);
  std::vector<float> values(n);
  for (float& v : values) v = uniform(rng);
  return values;
}

// op(x) as a float64 [rows, cols] matrix, x stored as op says.
Matrix<double> Operand(const float* x, Op op, int64_t rows, int64_t cols) {
  if (op == Op::kPlain) return ConstMatrixMap<float>(x, rows, cols).cast<double>();
  return ConstMatrixMap<float>(x, cols, rows).transpose().cast<double>();
}

struct Shape {
  int64_t m, n, k;
};

// Below and above the switch to oneDNN (m n k = 2^19), odd sizes, degenerate rows and columns,
// the products of the benchmark models, and products split across the team by rows and by
// columns into uneven blocks (Note [Split GEMMs] in gemm.cc: m n k >= 2^22).
constexpr Shape kShapes[] = {{8, 2, 4},       {64, 64, 64},   {128, 64, 64},   {257, 129, 65},
                             {1, 4096, 300},  {300, 1, 4096}, {1024, 10, 256}, {128, 256, 256},
                             {1000, 200, 30}, {33, 4099, 40}};

// CTest's reduced-ISA runs name the kernel they expect, so a DNNL_MAX_CPU_ISA that oneDNN
// ignored would not pass as a check of the other CPUs' code.
TEST(Gemm, RunsOnTheInstructionSetCTestAskedFor) {
  const char* expected = std::getenv("GRADSERVE_EXPECT_ONEDNN_ISA");
  if (expected != nullptr) {
    EXPECT_STREQ(OneDnnIsa(), expected);
  } else {
    // Elsewhere: no oneDNN in this build, or one of the instruction sets the benchmarks name.
    EXPECT_STRNE(OneDnnIsa(), "other");
  }
}

TEST(Gemm, EveryShapeAndTransposeMatchesAFloat64Product) {
  ScopedThreads threads(2);
  for (const Shape& s : kShapes) {
    for (Op op_a : {Op::kPlain, Op::kTransposed}) {
      for (Op op_b : {Op::kPlain, Op::kTransposed}) {
        SCOPED_TRACE(::testing::Message()
                     << s.m << "x" << s.n << "x" << s.k << " op_a " << static_cast<int>(op_a)
                     << " op_b " << static_cast<int>(op_b) << " on " << GemmBackend(s.m, s.n, s.k));
        const std::vector<float> a = RandomFloats(s.m * s.k, s.m + 7 * s.k);
        const std::vector<float> b = RandomFloats(s.k * s.n, s.n + 11 * s.k);
        std::vector<float> c(s.m * s.n, std::nanf(""));  // Every entry must be written.
        Gemm<float>(op_a, op_b, s.m, s.n, s.k, a.data(), b.data(), c.data());
        const Matrix<double> a64 = Operand(a.data(), op_a, s.m, s.k);
        const Matrix<double> b64 = Operand(b.data(), op_b, s.k, s.n);
        const Matrix<double> exact = a64 * b64;
        // A float32 dot product of length k is off by at most ~k eps sum|a_i b_i|.
        const Matrix<double> scale = a64.cwiseAbs() * b64.cwiseAbs();
        const double eps = std::ldexp(1.0, -23);
        int64_t wrong = 0;
        double worst = 0;
        for (int64_t i = 0; i < s.m; ++i) {
          for (int64_t j = 0; j < s.n; ++j) {
            const double error = std::abs(c[i * s.n + j] - exact(i, j));
            const double bound = s.k * eps * scale(i, j) + 1e-30;
            if (!(error <= bound)) ++wrong;
            worst = std::max(worst, error / bound);
          }
        }
        EXPECT_EQ(wrong, 0) << "worst error / bound " << worst;
      }
    }
  }
}

template <typename T>
void ExpectBitsIndependentOfAlignment(const Shape& s, Op op_a, Op op_b) {
  const std::vector<float> a32 = RandomFloats(s.m * s.k, 1);
  const std::vector<float> b32 = RandomFloats(s.k * s.n, 2);
  const std::vector<T> a(a32.begin(), a32.end()), b(b32.begin(), b32.end());
  std::vector<T> reference(s.m * s.n);
  Gemm<T>(op_a, op_b, s.m, s.n, s.k, a.data(), b.data(), reference.data());
  // Operands and result shifted across every SIMD alignment up to 64 bytes, as the bytes of a
  // request and the buffers of a response land wherever the allocator puts them.
  constexpr int kMaxShift = 16;
  for (int shift : {1, 2, 3, 4, 8, 12}) {
    std::vector<T> a_shifted(a.size() + kMaxShift), b_shifted(b.size() + kMaxShift);
    std::vector<T> c(s.m * s.n + kMaxShift);
    std::memcpy(a_shifted.data() + shift, a.data(), sizeof(T) * a.size());
    std::memcpy(b_shifted.data() + shift, b.data(), sizeof(T) * b.size());
    Gemm<T>(op_a, op_b, s.m, s.n, s.k, a_shifted.data() + shift, b_shifted.data() + shift,
            c.data() + shift);
    EXPECT_EQ(std::memcmp(c.data() + shift, reference.data(), sizeof(T) * s.m * s.n), 0)
        << sizeof(T) << "-byte values, everything shifted by " << shift << " elements";
  }
}

// The same product with the same thread count gives the same bits wherever its operands and
// result sit. (Across thread counts it need not: oneDNN's AVX2 kernels split some shapes
// differently.) Shapes for each path: oneDNN, Eigen's GEMM and GEMV, and the tiny products
// Eigen would evaluate coefficient by coefficient.
TEST(Gemm, BitsDoNotDependOnOperandAlignment) {
  constexpr Shape kShapesByPath[] = {
      {1024, 256, 512}, {128, 256, 256}, {4, 1024, 2048}, {2048, 8, 512}, {64, 64, 64}, {17, 33, 9},
      {1, 64, 64},      {64, 1, 64},     {64, 64, 1},     {8, 2, 4},      {5, 7, 6},    {3, 9, 7}};
  for (const Shape& s : kShapesByPath) {
    for (Op op_a : {Op::kPlain, Op::kTransposed}) {
      for (Op op_b : {Op::kPlain, Op::kTransposed}) {
        for (int threads : {1, 2}) {
          SCOPED_TRACE(::testing::Message()
                       << s.m << "x" << s.n << "x" << s.k << " op_a " << static_cast<int>(op_a)
                       << " op_b " << static_cast<int>(op_b) << ", " << threads << " threads");
          ScopedThreads team(threads);
          ExpectBitsIndependentOfAlignment<float>(s, op_a, op_b);
          ExpectBitsIndependentOfAlignment<double>(s, op_a, op_b);
        }
      }
    }
  }
}

// A float32 problem whose Linear layers all take the oneDNN path at batch 128.
struct Float32Problem {
  explicit Float32Problem(Model m) : model(std::move(m)) {}

  Model model;
  int64_t batch = 128;
  std::vector<std::vector<float>> weights, biases;
  std::vector<float> inputs;
  std::vector<int64_t> classes;

  static Float32Problem Make() {
    ModelSpec spec;
    spec.layers = {Linear(64, 256),  Activation(LayerKind::kTanh),
                   Linear(256, 256), Activation(LayerKind::kGelu),
                   Linear(256, 192), Activation(LayerKind::kSigmoid),
                   Linear(192, 32)};
    spec.loss = {LossKind::kCrossEntropy, Reduction::kMean};
    absl::StatusOr<Model> model = Model::Create(spec, 64);
    EXPECT_TRUE(model.ok()) << model.status();
    Float32Problem problem(*std::move(model));
    uint64_t seed = 5;
    for (int l = 0; l < problem.model.num_linear(); ++l) {
      const LayerSpec& layer = problem.model.layer(problem.model.linear_layer(l));
      std::vector<float> w = RandomFloats(layer.out_features * layer.in_features, ++seed);
      const float scale = 2.0f / std::sqrt(static_cast<float>(layer.in_features));
      for (float& v : w) v *= scale;
      problem.weights.push_back(std::move(w));
      problem.biases.push_back(RandomFloats(layer.out_features, ++seed));
    }
    problem.inputs = RandomFloats(problem.batch * 64, ++seed);
    for (int64_t r = 0; r < problem.batch; ++r) problem.classes.push_back((r * 7) % 32);
    return problem;
  }

  std::vector<LinearParamsView<float>> Params() const {
    std::vector<LinearParamsView<float>> params;
    for (size_t l = 0; l < weights.size(); ++l)
      params.push_back({weights[l].data(), biases[l].data()});
    return params;
  }

  BatchView<float> Batch() const {
    BatchView<float> view;
    view.batch = batch;
    view.inputs = inputs.data();
    view.targets.class_targets = classes.data();
    return view;
  }
};

TEST(Float32Backprop, LargeLayersPassTheFloat64GradientCheck) {
  const Float32Problem problem = Float32Problem::Make();
  ASSERT_STREQ(GemmBackend(problem.batch, 256, 256), GemmBackend(1024, 1024, 1024))
      << "the problem is meant to take the large-product path";
  absl::StatusOr<CheckpointPlan> plan = PlanCheckpoints(problem.model, problem.batch, 4, {});
  ASSERT_TRUE(plan.ok()) << plan.status();
  GradientCheckOptions options;
  options.samples_per_tensor = 12;
  options.step = 1e-4;
  options.threads = 2;
  absl::StatusOr<std::vector<TensorCheck>> checks =
      CheckGradients<float>(problem.model, *plan, problem.Params(), problem.Batch(), options);
  ASSERT_TRUE(checks.ok()) << checks.status();
  ASSERT_EQ(checks->size(), 2u * problem.weights.size() + 1);
  for (const TensorCheck& check : *checks) {
    EXPECT_GT(check.samples, 0) << check.tensor;
    // float32 analytic gradients against float64 finite differences: float32 rounding.
    EXPECT_LT(check.max_abs_error, 2e-6) << check.tensor;
  }
}

TEST(Float32Backprop, CheckpointedAndPlainRunsGiveTheSameBits) {
  const Float32Problem problem = Float32Problem::Make();
  const auto run = [&](const CheckpointOptions& checkpointing, int threads) {
    std::vector<std::vector<float>> grads;
    OutputsView<float> outputs;
    for (const auto& w : problem.weights) grads.emplace_back(w.size(), -7.0f);
    for (const auto& b : problem.biases) grads.emplace_back(b.size(), -7.0f);
    const size_t layers = problem.weights.size();
    for (size_t l = 0; l < layers; ++l) {
      outputs.gradients.push_back({grads[l].data(), grads[layers + l].data()});
    }
    grads.emplace_back(problem.inputs.size(), -7.0f);
    outputs.input_gradient = grads.back().data();
    absl::StatusOr<CheckpointPlan> plan =
        PlanCheckpoints(problem.model, problem.batch, 4, checkpointing);
    EXPECT_TRUE(plan.ok()) << plan.status();
    RunOptions options;
    options.threads = threads;
    absl::StatusOr<RunResult> result = RunBackprop<float>(problem.model, *plan, problem.Params(),
                                                          problem.Batch(), outputs, options);
    EXPECT_TRUE(result.ok()) << result.status();
    if (result.ok()) grads.push_back({static_cast<float>(result->loss)});
    return grads;
  };
  for (int threads : {1, 2}) {
    const auto plain = run({}, threads);
    ASSERT_EQ(plain.size(), 2 * problem.weights.size() + 2);
    EXPECT_EQ(plain, run({CheckpointMode::kSqrt}, threads)) << "SQRT, " << threads << " threads";
    EXPECT_EQ(plain, run({CheckpointMode::kEveryK, 1}, threads))
        << "every layer recomputed, " << threads << " threads";
  }
}

}  // namespace
}  // namespace gradserve::engine
