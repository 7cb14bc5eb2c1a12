// Test helpers for the graph engine: a spec builder, a harness that owns a graph's data, runs it
// and checks its gradients against central finite differences in float64.
//
// Note [Finite-difference floor]
// Each checked entry reports |a - n| / max(|a|, |n|, atol), a = analytic, n = numeric (central
// differences, step kFdStep, of the float64 forward loss L), atol = kFdAtol * max(1, |L|). The
// numeric gradient's rounding error is about eps |L| / h ~ 2e-16 |L| / 1e-6 = 2e-10 |L| and its
// truncation error h^2 |L'''| / 6 ~ 1e-13, so entries far below |L| are compared on the scale
// of |L|: a correct gradient reports below ~1e-5 (typically 1e-9..1e-7), a wrong one O(1).
// kFdTolerance is the pass mark.
#ifndef GRADSERVE_TESTS_ENGINE_GRAPH_TEST_UTIL_H_
#define GRADSERVE_TESTS_ENGINE_GRAPH_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "server/engine/graph/executor.h"
#include "server/engine/graph/graph.h"
#include "tests/engine/graph_spec_builder.h"

namespace gradserve::engine::graph::testing {

inline constexpr double kFdStep = 1e-6;
inline constexpr double kFdAtol = 1e-4;
inline constexpr double kFdTolerance = 1e-5;

struct FdReport {
  double max_rel_error = 0;
  std::string worst;  // "tensor[index]: analytic a, numeric n"
  int checked = 0;
};

// Owns a float64 graph's data; plans, runs and finite-differences it.
class Harness {
 public:
  Harness(GraphSpec spec, std::vector<Shape> input_shapes,
          std::vector<std::string> input_gradients = {})
      : spec_(std::move(spec)) {
    options_.dtype = DType::kFloat64;
    options_.input_shapes = std::move(input_shapes);
    options_.input_gradients = std::move(input_gradients);
  }

  absl::Status Plan() {
    auto graph = Graph::Create(spec_, options_);
    if (!graph.ok()) return graph.status();
    graph_ = std::make_unique<Graph>(std::move(*graph));
    return absl::OkStatus();
  }
  const Graph& graph() const { return *graph_; }

  // Parameters ~ scale U(-1, 1), float inputs ~ N(0, 1); int64 inputs are zeros until SetInts.
  void Fill(uint64_t seed, double scale = 1.0) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> uniform(-1, 1);
    std::normal_distribution<double> normal(0, 1);
    params_.clear();
    for (const ParameterSpec& p : spec_.parameters) {
      std::vector<double> v(NumElements(p.shape));
      for (double& x : v) x = scale * uniform(rng);
      params_.push_back(std::move(v));
    }
    floats_.assign(spec_.inputs.size(), {});
    ints_.assign(spec_.inputs.size(), {});
    for (size_t i = 0; i < spec_.inputs.size(); ++i) {
      const int64_t n = NumElements(options_.input_shapes[i]);
      if (spec_.inputs[i].dtype == DType::kInt64) {
        ints_[i].assign(n, 0);
      } else {
        floats_[i].resize(n);
        for (double& x : floats_[i]) x = normal(rng);
      }
    }
  }
  void SetInts(const std::string& input, std::vector<int64_t> data) {
    ints_[graph_->FindInput(input)] = std::move(data);
  }
  std::vector<double>& param(const std::string& name) {
    return params_[graph_->FindParameter(name)];
  }
  std::vector<double>& input(const std::string& name) { return floats_[graph_->FindInput(name)]; }

  GraphInputs<double> Inputs() const {
    GraphInputs<double> in;
    for (size_t i = 0; i < spec_.inputs.size(); ++i) {
      in.inputs.push_back(spec_.inputs[i].dtype == DType::kInt64
                              ? static_cast<const void*>(ints_[i].data())
                              : static_cast<const void*>(floats_[i].data()));
    }
    for (const auto& p : params_) in.parameters.push_back(p.data());
    return in;
  }

  // Runs forward and backward; gradients land in grads_ / input_grads_, outputs in outputs_.
  absl::StatusOr<GraphRunResult> Run(int threads = 1) {
    grads_.clear();
    for (const auto& p : params_) grads_.emplace_back(p.size(), std::nan(""));
    input_grads_.assign(spec_.inputs.size(), {});
    GraphOutputs<double> out;
    for (auto& g : grads_) out.parameter_gradients.push_back(g.data());
    for (size_t i = 0; i < spec_.inputs.size(); ++i) {
      if (graph_->input_gradient_requested(static_cast<int>(i))) {
        input_grads_[i].assign(floats_[i].size(), std::nan(""));
      }
      out.input_gradients.push_back(input_grads_[i].empty() ? nullptr : input_grads_[i].data());
    }
    outputs_.clear();
    for (size_t o = 0; o < spec_.outputs.size(); ++o) {
      const ValueInfo& v = graph_->values()[graph_->output_value(static_cast<int>(o))];
      outputs_.emplace_back(v.elements);
      out.outputs.push_back(outputs_.back().data());
    }
    GraphRunOptions options;
    options.threads = threads;
    return RunGraph<double>(*graph_, Inputs(), out, options);
  }

  double Loss() const {
    GraphRunOptions options;
    auto loss = GraphForwardLoss<double>(*graph_, Inputs(), options);
    EXPECT_TRUE(loss.ok()) << loss.status();
    return loss.ok() ? *loss : std::nan("");
  }

  // Central differences of every (or up to `samples` random) entries of every parameter and
  // requested input, against the last Run's gradients (Note [Finite-difference floor]).
  FdReport Check(int samples = 48, uint64_t seed = 1) {
    FdReport report;
    std::mt19937_64 rng(seed);
    const double atol = kFdAtol * std::max(1.0, std::abs(Loss()));
    auto check = [&](const std::string& name, std::vector<double>& x,
                     const std::vector<double>& g) {
      std::vector<int64_t> entries;
      const int64_t n = static_cast<int64_t>(x.size());
      if (n <= samples) {
        for (int64_t j = 0; j < n; ++j) entries.push_back(j);
      } else {
        std::uniform_int_distribution<int64_t> pick(0, n - 1);
        for (int s = 0; s < samples; ++s) entries.push_back(pick(rng));
      }
      for (int64_t j : entries) {
        const double saved = x[j];
        x[j] = saved + kFdStep;
        const double up = Loss();
        x[j] = saved - kFdStep;
        const double down = Loss();
        x[j] = saved;
        const double numeric = (up - down) / (2 * kFdStep);
        const double analytic = g[j];
        const double error =
            std::abs(analytic - numeric) / std::max({std::abs(analytic), std::abs(numeric), atol});
        ++report.checked;
        if (!(error <= report.max_rel_error)) {
          report.max_rel_error = std::isnan(error) ? INFINITY : error;
          std::ostringstream s;
          s << name << "[" << j << "]: analytic " << analytic << ", numeric " << numeric;
          report.worst = s.str();
        }
      }
    };
    for (size_t p = 0; p < params_.size(); ++p)
      check(spec_.parameters[p].name, params_[p], grads_[p]);
    for (size_t i = 0; i < spec_.inputs.size(); ++i) {
      if (!input_grads_[i].empty()) check(spec_.inputs[i].name, floats_[i], input_grads_[i]);
    }
    return report;
  }

  GraphSpec spec_;
  PlanOptions options_;
  std::unique_ptr<Graph> graph_;
  std::vector<std::vector<double>> params_, floats_, grads_, input_grads_, outputs_;
  std::vector<std::vector<int64_t>> ints_;
};

#define EXPECT_GRADIENTS_MATCH(harness)                                                 \
  do {                                                                                  \
    const ::gradserve::engine::graph::testing::FdReport report_ = (harness).Check();    \
    EXPECT_GT(report_.checked, 0);                                                      \
    EXPECT_LE(report_.max_rel_error, ::gradserve::engine::graph::testing::kFdTolerance) \
        << "max relative error " << report_.max_rel_error << " at " << report_.worst;   \
  } while (0)

}  // namespace gradserve::engine::graph::testing

#endif  // GRADSERVE_TESTS_ENGINE_GRAPH_TEST_UTIL_H_
