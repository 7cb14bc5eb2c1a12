// Engine benchmarks (Google Benchmark): forward + backward through engine::RunBackprop<float>,
// the machine's FMA peak, Eigen's best GEMM, and a per-component profile of each step.
//
//   gradserve_engine_bench --benchmark_filter='^(engine|peak|gemm)/' --benchmark_format=json
//   gradserve_engine_bench --benchmark_filter='^profile/'
//
// Benchmark names:
//   engine/<case>/threads:<t>   one RunBackprop call (forward, loss, backward, dx) per iteration
//   peak/fma/threads:<t>        a register-only loop of independent FMA chains on every thread
//   gemm/engine1024/threads:<t> C = A * B, float32 1024x1024x1024, row-major, through
//                               engine::Gemm (the engine's kernel: oneDNN in a default build;
//                               label "onednn <isa>" or "eigen")
//   gemm/eigen1024/threads:<t>  the same product on Eigen's own kernel, for comparison
//   profile/<case>/<part>/threads:<t>  one part of a step, for the breakdown (see below)
//   profile/omp_fork_join/threads:<t>   an empty OpenMP parallel region
// Counters (per iteration unless said): flops (nominal, 6*B*in*out per Linear; GFLOP/s is
// flops / real_time), peak_bytes and recomputed (RunResult), forward_us / backward_us (RunResult),
// allocs (calls to malloc/calloc/realloc in the whole process), minflt (minor page faults).
//
// Cases (float32, dx computed, parameters ~ N(0, 1/in), inputs ~ N(0, 1)):
//   a         batch 8, Linear 4->2, MSE
//   b         batch 256, 784-1024-1024-10, ReLU between, cross-entropy
//   c         batch 1024, eight Linear 1024x1024 each followed by ReLU, MSE
//   d         batch 128, 64 x (Linear 256x256, Tanh), MSE
//   d_sqrt    d with CheckpointMode::kSqrt
//   d_budget  d with kMemoryBudget, budget = d_sqrt's predicted peak
//   e         GPT-2-style decoder (tests/engine/graph_test_models.h's GptSpec): batch 8, T = 128,
//             vocabulary 1024, d = 256, 4 heads, 4 blocks, tied LM head, cross-entropy; through
//             graph::RunGraph<float>. Parameters and token ids from a hash of their index (Note
//             [Case (e) data]), so bench/peers.py builds the same numbers and compares losses.
//             Extra counters: loss, grad_norm (all parameter gradients), flops from the plan,
//             and op_us:<OpType>, each op type's summed forward + backward node time. Its
//             workspace is kept between steps, as a training stream's would be.
#include <benchmark/benchmark.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/resource.h>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "server/engine/backprop.h"
#include "server/engine/checkpoint.h"
#include "server/engine/gemm.h"
#include "server/engine/graph/executor.h"
#include "server/engine/graph/graph.h"
#include "server/engine/layers.h"
#include "server/engine/losses.h"
#include "server/engine/model.h"
#include "tests/engine/graph_test_models.h"

// Counting allocator hooks: every malloc/calloc/realloc in the process goes through these (and
// on to glibc's own), so a benchmark can report allocations per step. One relaxed atomic
// increment per call.
namespace {
std::atomic<int64_t> g_allocations{0};
}
extern "C" {
void* __libc_malloc(size_t size);
void* __libc_calloc(size_t count, size_t size);
void* __libc_realloc(void* ptr, size_t size);
void* malloc(size_t size) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_malloc(size);
}
void* calloc(size_t count, size_t size) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_calloc(count, size);
}
void* realloc(void* ptr, size_t size) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_realloc(ptr, size);
}
}

namespace gradserve::bench {
namespace {

namespace eng = ::gradserve::engine;
using Counter = benchmark::Counter;

int64_t MinorFaults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

// Allocations and page faults over a benchmark's timed loop, reported per iteration.
class ProcessCounters {
 public:
  ProcessCounters()
      : allocations_(g_allocations.load(std::memory_order_relaxed)), faults_(MinorFaults()) {}
  void Report(benchmark::State& state) const {
    state.counters["allocs"] =
        Counter(static_cast<double>(g_allocations.load(std::memory_order_relaxed) - allocations_),
                Counter::kAvgIterations);
    state.counters["minflt"] =
        Counter(static_cast<double>(MinorFaults() - faults_), Counter::kAvgIterations);
  }

 private:
  int64_t allocations_;
  int64_t faults_;
};

// ---------------------------------------------------------------------------------------------
// The cases.

struct CaseSpec {
  std::string name;
  int64_t batch = 0;
  std::vector<int64_t> widths;  // Linear(widths[0] -> widths[1]), ...
  eng::LayerKind act = eng::LayerKind::kReLU;
  bool act_after_last = false;
  eng::LossKind loss = eng::LossKind::kMse;
  eng::CheckpointMode checkpoint = eng::CheckpointMode::kNone;
};

std::vector<CaseSpec> Cases() {
  std::vector<int64_t> c_widths(9, 1024);
  std::vector<int64_t> d_widths(65, 256);
  return {
      {"a", 8, {4, 2}, eng::LayerKind::kReLU, false, eng::LossKind::kMse},
      {"b", 256, {784, 1024, 1024, 10}, eng::LayerKind::kReLU, false, eng::LossKind::kCrossEntropy},
      {"c", 1024, c_widths, eng::LayerKind::kReLU, true, eng::LossKind::kMse},
      {"d", 128, d_widths, eng::LayerKind::kTanh, true, eng::LossKind::kMse},
      {"d_sqrt", 128, d_widths, eng::LayerKind::kTanh, true, eng::LossKind::kMse,
       eng::CheckpointMode::kSqrt},
      {"d_budget", 128, d_widths, eng::LayerKind::kTanh, true, eng::LossKind::kMse,
       eng::CheckpointMode::kMemoryBudget},
  };
}

double NominalFlops(const CaseSpec& spec) {
  double sum = 0;
  for (size_t i = 0; i + 1 < spec.widths.size(); ++i) {
    sum += static_cast<double>(spec.widths[i]) * static_cast<double>(spec.widths[i + 1]);
  }
  return 6.0 * static_cast<double>(spec.batch) * sum;
}

std::vector<float> Normal(int64_t n, double stddev, std::mt19937_64& rng) {
  std::normal_distribution<double> dist(0.0, stddev);
  std::vector<float> values(n);
  for (float& v : values) v = static_cast<float>(dist(rng));
  return values;
}

// Everything one RunBackprop call needs, built once per benchmark.
struct Problem {
  CaseSpec spec;
  std::optional<eng::Model> model;
  eng::CheckpointPlan plan;
  std::vector<std::vector<float>> weights, biases, weight_grads, bias_grads;
  std::vector<eng::LinearParamsView<float>> params;
  std::vector<float> inputs, targets, input_gradient;
  std::vector<int64_t> class_targets;
  eng::BatchView<float> batch;
  eng::OutputsView<float> outputs;

  explicit Problem(const CaseSpec& case_spec) : spec(case_spec) {
    eng::ModelSpec model_spec;
    const int num_linear = static_cast<int>(spec.widths.size()) - 1;
    for (int l = 0; l < num_linear; ++l) {
      eng::LayerSpec linear;
      linear.kind = eng::LayerKind::kLinear;
      linear.in_features = spec.widths[l];
      linear.out_features = spec.widths[l + 1];
      model_spec.layers.push_back(linear);
      if (l + 1 < num_linear || spec.act_after_last) {
        eng::LayerSpec act;
        act.kind = spec.act;
        model_spec.layers.push_back(act);
      }
    }
    model_spec.loss.kind = spec.loss;
    auto created = eng::Model::Create(model_spec, spec.widths.front());
    if (!created.ok()) std::abort();
    model.emplace(std::move(created).value());

    std::mt19937_64 rng(7);
    for (int l = 0; l < num_linear; ++l) {
      const int64_t in = spec.widths[l], out = spec.widths[l + 1];
      weights.push_back(Normal(in * out, 1.0 / std::sqrt(static_cast<double>(in)), rng));
      biases.push_back(Normal(out, 0.1, rng));
      weight_grads.emplace_back(in * out);
      bias_grads.emplace_back(out);
    }
    for (int l = 0; l < num_linear; ++l) {
      params.push_back({weights[l].data(), biases[l].data()});
      outputs.gradients.push_back({weight_grads[l].data(), bias_grads[l].data()});
    }
    const int64_t in_width = spec.widths.front(), out_width = spec.widths.back();
    inputs = Normal(spec.batch * in_width, 1.0, rng);
    input_gradient.resize(spec.batch * in_width);
    outputs.input_gradient = input_gradient.data();
    batch.batch = spec.batch;
    batch.inputs = inputs.data();
    if (spec.loss == eng::LossKind::kCrossEntropy) {
      std::uniform_int_distribution<int64_t> cls(0, out_width - 1);
      for (int64_t b = 0; b < spec.batch; ++b) class_targets.push_back(cls(rng));
      batch.targets.class_targets = class_targets.data();
    } else {
      targets = Normal(spec.batch * out_width, 1.0, rng);
      batch.targets.targets = targets.data();
    }

    eng::CheckpointOptions options;
    options.mode = spec.checkpoint;
    if (spec.checkpoint == eng::CheckpointMode::kMemoryBudget) {
      // The budget SQRT's plan needs: the planner should then recompute no more than SQRT does.
      eng::CheckpointOptions sqrt;
      sqrt.mode = eng::CheckpointMode::kSqrt;
      options.memory_budget_bytes = Plan(sqrt).predicted_peak_bytes;
    }
    plan = Plan(options);
  }

  eng::CheckpointPlan Plan(const eng::CheckpointOptions& options) const {
    auto planned = eng::PlanCheckpoints(*model, spec.batch, sizeof(float), options);
    if (!planned.ok()) std::abort();
    return std::move(planned).value();
  }

  eng::RunResult Run(int threads) const {
    eng::RunOptions options;
    options.threads = threads;
    auto result = eng::RunBackprop<float>(*model, plan, params, batch, outputs, options);
    if (!result.ok()) std::abort();
    return std::move(result).value();
  }
};

// One Problem per case, built on first use and kept: building (c) draws ~8M random numbers.
const Problem& CachedProblem(const CaseSpec& spec) {
  static std::map<std::string, std::unique_ptr<Problem>> cache;
  std::unique_ptr<Problem>& problem = cache[spec.name];
  if (problem == nullptr) problem = std::make_unique<Problem>(spec);
  return *problem;
}

void BM_Engine(benchmark::State& state, const CaseSpec& spec, int threads) {
  const Problem& problem = CachedProblem(spec);
  problem.Run(threads);  // Warm: first-touch of the parameters and gradients.
  double forward_us = 0, backward_us = 0, loss = 0;
  int64_t peak = 0, recomputed = 0;
  const ProcessCounters counters;
  for (auto _ : state) {
    const eng::RunResult result = problem.Run(threads);
    forward_us += result.forward_micros;
    backward_us += result.backward_micros;
    peak = result.peak_activation_bytes;
    recomputed = result.layers_recomputed;
    loss = result.loss;
  }
  counters.Report(state);
  state.counters["flops"] = Counter(NominalFlops(spec));
  state.counters["GFLOPs"] = Counter(NominalFlops(spec) * 1e-9, Counter::kIsIterationInvariantRate);
  state.counters["forward_us"] = Counter(forward_us, Counter::kAvgIterations);
  state.counters["backward_us"] = Counter(backward_us, Counter::kAvgIterations);
  state.counters["peak_bytes"] = Counter(static_cast<double>(peak));
  state.counters["predicted_peak_bytes"] =
      Counter(static_cast<double>(problem.plan.predicted_peak_bytes));
  state.counters["none_peak_bytes"] = Counter(
      static_cast<double>(eng::NoCheckpointPeakBytes(*problem.model, spec.batch, sizeof(float))));
  state.counters["recomputed"] = Counter(static_cast<double>(recomputed));
  state.counters["segments"] = Counter(problem.plan.num_segments());
  state.counters["budget_bytes"] = Counter(static_cast<double>(
      spec.checkpoint == eng::CheckpointMode::kMemoryBudget ? problem.plan.predicted_peak_bytes
                                                            : 0));
  state.counters["threads"] = Counter(threads);
  benchmark::DoNotOptimize(loss);
}

// ---------------------------------------------------------------------------------------------
// Case (e): a GPT-2-style decoder through the graph engine.
//
// Note [Case (e) data]
// Every parameter and token id comes from splitmix64's finaliser of a key, (tensor + 1) << 32 |
// element, so that bench/peers.py (GptData) computes the same numbers with numpy's uint64
// arithmetic and the two sides can compare their losses at the same weights. Tensor t is the
// t-th parameter in GptSpec order; the ids are tensor 1000, the targets tensor 1001. A parameter
// element is u = top 24 bits / 2^24 in [0, 1), scaled to U(-a, a) with a = 0.02 sqrt(3) (std
// 0.02, GPT-2's init scale) in double and rounded to float once; LayerNorm weights are 1.

uint64_t SplitMix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t DataKey(uint64_t tensor, uint64_t element) { return ((tensor + 1) << 32) | element; }

namespace gr = ::gradserve::engine::graph;

gr::testing::GptConfig GptCase() {
  gr::testing::GptConfig c;
  c.batch = 8, c.seq = 128, c.vocab = 1024, c.d = 256, c.heads = 4, c.blocks = 4;
  c.dtype = gr::DType::kFloat32;
  return c;
}

struct GptProblem {
  gr::testing::GptConfig config = GptCase();
  gr::GraphSpec spec = gr::testing::GptSpec(config);
  std::optional<gr::Graph> graph;
  std::vector<std::vector<float>> params, grads;
  std::vector<int64_t> ids, targets;
  gr::GraphInputs<float> in;
  gr::GraphOutputs<float> out;

  GptProblem() {
    gr::PlanOptions options;
    options.dtype = gr::DType::kFloat32;
    options.input_shapes = {{config.batch, config.seq}, {config.batch, config.seq}};
    absl::StatusOr<gr::Graph> created = gr::Graph::Create(spec, options);
    if (!created.ok()) std::abort();
    graph.emplace(std::move(created).value());
    const double half_width = 0.02 * std::sqrt(3.0);
    for (size_t t = 0; t < spec.parameters.size(); ++t) {
      const gr::ParameterSpec& p = spec.parameters[t];
      std::vector<float> values(gr::NumElements(p.shape));
      const bool ln_weight = p.name.find("ln") != std::string::npos && p.name.ends_with(".weight");
      for (size_t i = 0; i < values.size(); ++i) {
        const double u = static_cast<double>(SplitMix(DataKey(t, i)) >> 40) * 0x1p-24;
        values[i] = ln_weight ? 1.0f : static_cast<float>((2.0 * u - 1.0) * half_width);
      }
      params.push_back(std::move(values));
      grads.emplace_back(params.back().size());
    }
    for (size_t t = 0; t < params.size(); ++t) {
      in.parameters.push_back(params[t].data());
      out.parameter_gradients.push_back(grads[t].data());
    }
    const int64_t tokens = config.batch * config.seq;
    for (int64_t i = 0; i < tokens; ++i) {
      ids.push_back(static_cast<int64_t>(SplitMix(DataKey(1000, i)) % config.vocab));
      targets.push_back(static_cast<int64_t>(SplitMix(DataKey(1001, i)) % config.vocab));
    }
    in.inputs = {ids.data(), targets.data()};
  }
};

void BM_Gpt(benchmark::State& state, int threads) {
  static GptProblem* problem = new GptProblem();  // Built once, shared by both thread counts.
  gr::GraphRunOptions run;
  run.threads = threads;
  // The workspace a training stream keeps between steps, over the 64 MB a one-off call keeps:
  // StreamGradients plans once per batch shape and can size it so. Twice the plan's peak (86
  // MB here), since the pool reuses a free buffer for a request of up to half its size and so
  // holds more than the peak; with the peak alone ~4k pages a step are faulted in afresh, with
  // the default ~10k.
  run.retained_workspace_bytes =
      std::max(run.retained_workspace_bytes, 2 * problem->graph->costs().peak_bytes);
  const auto step = [&] {
    absl::StatusOr<gr::GraphRunResult> result =
        gr::RunGraph<float>(*problem->graph, problem->in, problem->out, run);
    if (!result.ok()) std::abort();
    return std::move(result).value();
  };
  gr::GraphRunResult first = step();  // Warm-up: the workspace pool fills.
  const gr::GraphSpec& spec = problem->spec;
  std::map<std::string, double> op_micros;
  double forward_us = 0, backward_us = 0;
  const ProcessCounters counters;
  for (auto _ : state) {
    const gr::GraphRunResult result = step();
    forward_us += result.forward_micros;
    backward_us += result.backward_micros;
    for (size_t n = 0; n < spec.nodes.size(); ++n) {
      op_micros[spec.nodes[n].op_type] +=
          result.node_forward_micros[n] + result.node_backward_micros[n];
    }
  }
  counters.Report(state);
  double grad_sq = 0;
  for (double norm : first.parameter_grad_norms) grad_sq += norm * norm;
  const double flops =
      problem->graph->costs().forward_flops + problem->graph->costs().backward_flops;
  state.counters["flops"] = Counter(flops);
  state.counters["GFLOPs"] = Counter(flops * 1e-9, Counter::kIsIterationInvariantRate);
  state.counters["loss"] = Counter(first.loss);
  state.counters["grad_norm"] = Counter(std::sqrt(grad_sq));
  state.counters["forward_us"] = Counter(forward_us, Counter::kAvgIterations);
  state.counters["backward_us"] = Counter(backward_us, Counter::kAvgIterations);
  state.counters["peak_bytes"] = Counter(static_cast<double>(first.peak_bytes));
  state.counters["predicted_peak_bytes"] =
      Counter(static_cast<double>(problem->graph->costs().peak_bytes));
  for (const auto& [op, micros] : op_micros) {
    state.counters["op_us:" + op] = Counter(micros, Counter::kAvgIterations);
  }
  state.counters["threads"] = Counter(threads);
}

// ---------------------------------------------------------------------------------------------
// FMA peak: kChains independent accumulators, each updated by one FMA per inner step, so the
// loop is bound by FMA throughput rather than latency (4-cycle latency x 2 ports needs >= 8).

constexpr int kChains = 16;
constexpr int64_t kFmaSteps = 1 << 22;

__attribute__((target("avx512f"))) double FmaLoop512(int64_t steps) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(static_cast<float>(c) * 0.01f);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-6f);
  for (int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
  }
  __m512 sum = acc[0];
  for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[c]);
  // A store rather than _mm512_reduce_add_ps, whose GCC 12 expansion warns (GCC bug 105593).
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sum);
  double total = 0;
  for (float v : lanes) total += v;
  return total;
}

__attribute__((target("avx2,fma"))) double FmaLoop256(int64_t steps) {
  __m256 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_ps(static_cast<float>(c) * 0.01f);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-6f);
  for (int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
  }
  __m256 sum = acc[0];
  for (int c = 1; c < kChains; ++c) sum = _mm256_add_ps(sum, acc[c]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  double total = 0;
  for (float v : lanes) total += v;
  return total;
}

bool HasAvx512() { return __builtin_cpu_supports("avx512f"); }

void BM_FmaPeak(benchmark::State& state, int threads) {
  const bool wide = HasAvx512();
  const int lanes = wide ? 16 : 8;
  double sink = 0;
  for (auto _ : state) {
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    sink += wide ? FmaLoop512(kFmaSteps) : FmaLoop256(kFmaSteps);
  }
  benchmark::DoNotOptimize(sink);
  const double flops = 2.0 * lanes * kChains * static_cast<double>(kFmaSteps) * threads;
  state.counters["flops"] = Counter(flops);
  state.counters["GFLOPs"] = Counter(flops * 1e-9, Counter::kIsIterationInvariantRate);
  state.counters["vector_bits"] = Counter(wide ? 512 : 256);
  state.counters["threads"] = Counter(threads);
  state.SetLabel(wide ? "avx512f" : "avx2+fma");
}

// ---------------------------------------------------------------------------------------------
// The 1024^3 GEMM, through the engine and on Eigen's own kernel: row-major float matrices,
// OpenMP team of `threads`.

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

void BM_EngineGemm(benchmark::State& state, int64_t n, int threads) {
  const eng::ScopedThreads scoped(threads);
  RowMatrix a = RowMatrix::Random(n, n), b = RowMatrix::Random(n, n), c(n, n);
  const auto product = [&] {
    eng::Gemm<float>(eng::Op::kPlain, eng::Op::kPlain, n, n, n, a.data(), b.data(), c.data());
  };
  product();
  for (auto _ : state) {
    product();
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * n * n * n;
  state.counters["flops"] = Counter(flops);
  state.counters["GFLOPs"] = Counter(flops * 1e-9, Counter::kIsIterationInvariantRate);
  state.counters["threads"] = Counter(threads);
  state.SetLabel(eng::GemmBackend(n, n, n) == std::string("onednn") ? eng::GemmKernel() : "eigen");
}

void BM_EigenGemm(benchmark::State& state, int64_t n, int threads) {
  const eng::ScopedThreads scoped(threads);
  RowMatrix a = RowMatrix::Random(n, n), b = RowMatrix::Random(n, n), c(n, n);
  c.noalias() = a * b;
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * n * n * n;
  state.counters["flops"] = Counter(flops);
  state.counters["GFLOPs"] = Counter(flops * 1e-9, Counter::kIsIterationInvariantRate);
  state.counters["threads"] = Counter(threads);
}

// ---------------------------------------------------------------------------------------------
// Profile: the parts of one step, each run over every layer of a case exactly as the engine
// does it (same engine functions on buffers of the same shapes), so that their times add up to
// (nearly) the whole step and the remainder is the executor's own overhead.
//   linear_fwd   LayerForward of every Linear (GEMM x*W^T, then the bias added row by row)
//   gemm         only the three products per Linear (x*W^T, delta^T*x, delta*W), engine::Gemm
//   linear_bwd   LinearBackward of every Linear (dW GEMM, db summed in double, dx GEMM)
//   act          LayerForward + ElementwiseBackward of every activation layer
//   loss         LossGradient
//   diag         the executor's diagnostics: a norm + non-finite count (one thread, in double,
//                sixteen lanes) over every activation, every dL/da and every dW, db
//                (engine::Measure itself)

// The executor's own diagnostics pass, summed into one number the optimiser cannot drop.
template <typename T>
double MeasureLike(const T* data, int64_t n) {
  const engine::NormAndNonFinite m = engine::Measure(data, n);
  return m.norm + static_cast<double>(m.non_finite);
}

struct ProfileBuffers {
  // acts[k]: a_k, [batch, width(k)], k in [0, L]; grads[k]: dL/da_k.
  std::vector<std::vector<float>> acts, grads;
  std::vector<float> scratch;
};

// Per case, built once: activations from a real forward pass (realistic tanh/ReLU outputs) and
// random gradients.
ProfileBuffers& CachedBuffers(const CaseSpec& spec, const Problem& problem) {
  static std::map<std::string, std::unique_ptr<ProfileBuffers>> cache;
  std::unique_ptr<ProfileBuffers>& buffers = cache[spec.name];
  if (buffers != nullptr) return *buffers;
  buffers = std::make_unique<ProfileBuffers>();
  const eng::Model& model = *problem.model;
  const int64_t rows = spec.batch;
  std::mt19937_64 rng(11);
  for (int k = 0; k <= model.num_layers(); ++k) {
    buffers->acts.push_back(k == 0 ? problem.inputs : std::vector<float>(rows * model.width(k)));
    buffers->grads.push_back(Normal(rows * model.width(k), 1e-3, rng));
  }
  for (int i = 0; i < model.num_layers(); ++i) {
    const int linear = model.linear_index(i);
    eng::LayerForward<float>(
        model.layer(i), linear < 0 ? eng::LinearParamsView<float>{} : problem.params[linear], rows,
        model.width(i), buffers->acts[i].data(), buffers->acts[i + 1].data());
  }
  buffers->scratch.resize(rows * model.max_width());
  return *buffers;
}

void BM_Profile(benchmark::State& state, const CaseSpec& spec, const std::string& part,
                int threads) {
  const Problem& problem = CachedProblem(spec);
  const eng::Model& model = *problem.model;
  const int num_layers = model.num_layers();
  const int64_t rows = spec.batch;
  ProfileBuffers& buffers = CachedBuffers(spec, problem);
  std::vector<float>& scratch = buffers.scratch;
  const eng::ScopedThreads scoped(threads);

  std::function<void()> body;
  if (part == "linear_fwd") {
    body = [&] {
      for (int i = 0; i < num_layers; ++i) {
        const int linear = model.linear_index(i);
        if (linear < 0) continue;
        eng::LayerForward<float>(model.layer(i), problem.params[linear], rows, model.width(i),
                                 buffers.acts[i].data(), scratch.data());
      }
    };
  } else if (part == "gemm") {
    body = [&] {
      for (int i = 0; i < num_layers; ++i) {
        const int linear = model.linear_index(i);
        if (linear < 0) continue;
        const int64_t in = model.width(i), out = model.width(i + 1);
        eng::Gemm<float>(eng::Op::kPlain, eng::Op::kTransposed, rows, out, in,
                         buffers.acts[i].data(), problem.weights[linear].data(), scratch.data());
        eng::Gemm<float>(eng::Op::kTransposed, eng::Op::kPlain, out, in, rows,
                         buffers.grads[i + 1].data(), buffers.acts[i].data(),
                         problem.outputs.gradients[linear].weight);
        eng::Gemm<float>(eng::Op::kPlain, eng::Op::kPlain, rows, in, out,
                         buffers.grads[i + 1].data(), problem.weights[linear].data(),
                         buffers.grads[i].data());
      }
    };
  } else if (part == "linear_bwd") {
    body = [&] {
      for (int i = num_layers - 1; i >= 0; --i) {
        const int linear = model.linear_index(i);
        if (linear < 0) continue;
        eng::LinearBackward<float>(model.layer(i), problem.params[linear], rows,
                                   buffers.acts[i].data(), buffers.grads[i + 1].data(),
                                   problem.outputs.gradients[linear], scratch.data());
      }
    };
  } else if (part == "act") {
    body = [&] {
      for (int i = 0; i < num_layers; ++i) {
        if (model.linear_index(i) >= 0) continue;
        eng::LayerForward<float>(model.layer(i), {}, rows, model.width(i), buffers.acts[i].data(),
                                 scratch.data());
      }
      for (int i = num_layers - 1; i >= 0; --i) {
        if (model.linear_index(i) >= 0) continue;
        std::copy(buffers.grads[i + 1].begin(), buffers.grads[i + 1].end(), scratch.begin());
        eng::ElementwiseBackward<float>(model.layer(i), rows, model.width(i),
                                        buffers.acts[i].data(), buffers.acts[i + 1].data(),
                                        scratch.data());
      }
    };
  } else if (part == "loss") {
    body = [&] {
      benchmark::DoNotOptimize(eng::LossGradient<float>(model.loss(), rows, model.output_features(),
                                                        buffers.acts[num_layers].data(),
                                                        problem.batch.targets, scratch.data()));
    };
  } else if (part == "diag") {
    body = [&] {
      double sink = 0;
      for (int i = 0; i < num_layers; ++i) {
        sink += MeasureLike(buffers.acts[i + 1].data(), rows * model.width(i + 1));
        sink += MeasureLike(buffers.grads[i + 1].data(), rows * model.width(i + 1));
        const int linear = model.linear_index(i);
        if (linear < 0) continue;
        sink += MeasureLike(problem.outputs.gradients[linear].weight,
                            model.width(i) * model.width(i + 1));
        sink += MeasureLike(problem.outputs.gradients[linear].bias, model.width(i + 1));
      }
      benchmark::DoNotOptimize(sink);
    };
  } else {
    state.SkipWithError("unknown part");
    return;
  }
  body();
  const ProcessCounters counters;
  for (auto _ : state) {
    body();
    benchmark::ClobberMemory();
  }
  counters.Report(state);
  state.counters["threads"] = Counter(threads);
}

// The cost of waking an OpenMP team: an empty parallel region (what a small parallel GEMM or
// element-wise loop pays on top of its work).
void BM_OmpForkJoin(benchmark::State& state, int threads) {
  const eng::ScopedThreads scoped(threads);
  int sink = 0;
  for (auto _ : state) {
#pragma omp parallel
    { benchmark::DoNotOptimize(sink); }
  }
  state.counters["threads"] = Counter(threads);
}

void RegisterAll() {
  for (const CaseSpec& spec : Cases()) {
    for (int threads : {1, 2}) {
      const std::string name = "engine/" + spec.name + "/threads:" + std::to_string(threads);
      benchmark::RegisterBenchmark(name.c_str(), BM_Engine, spec, threads)
          ->UseRealTime()
          ->Unit(spec.name == "a" ? benchmark::kMicrosecond : benchmark::kMillisecond);
    }
  }
  for (int threads : {1, 2}) {
    benchmark::RegisterBenchmark(("engine/e/threads:" + std::to_string(threads)).c_str(), BM_Gpt,
                                 threads)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  for (int threads : {1, 2}) {
    benchmark::RegisterBenchmark(("peak/fma/threads:" + std::to_string(threads)).c_str(),
                                 BM_FmaPeak, threads)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("gemm/engine1024/threads:" + std::to_string(threads)).c_str(),
                                 BM_EngineGemm, int64_t{1024}, threads)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("gemm/eigen1024/threads:" + std::to_string(threads)).c_str(),
                                 BM_EigenGemm, int64_t{1024}, threads)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  for (int threads : {1, 2}) {
    benchmark::RegisterBenchmark(
        ("profile/omp_fork_join/threads:" + std::to_string(threads)).c_str(), BM_OmpForkJoin,
        threads)
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
  }
  for (const CaseSpec& spec : Cases()) {
    if (spec.checkpoint != eng::CheckpointMode::kNone) continue;
    for (const char* part : {"linear_fwd", "gemm", "linear_bwd", "act", "loss", "diag"}) {
      if (spec.name == "a" && std::string(part) == "act") continue;  // (a) has no activation.
      for (int threads : {1, 2}) {
        const std::string name =
            "profile/" + spec.name + "/" + part + "/threads:" + std::to_string(threads);
        benchmark::RegisterBenchmark(name.c_str(), BM_Profile, spec, std::string(part), threads)
            ->UseRealTime()
            ->Unit(spec.name == "a" ? benchmark::kMicrosecond : benchmark::kMillisecond);
      }
    }
  }
}

}  // namespace
}  // namespace gradserve::bench

int main(int argc, char** argv) {
  gradserve::bench::RegisterAll();
  benchmark::AddCustomContext("eigen", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                           std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                           std::to_string(EIGEN_MINOR_VERSION) + ", " +
                                           Eigen::SimdInstructionSetsInUse());
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
