#include "server/engine/gradient_check.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "server/engine/status_macros.h"

namespace gradserve::engine {
namespace {

// Distinct indices in [0, n): all of them if n <= count, else `count` chosen by Floyd's
// algorithm (no O(n) shuffle of a large tensor).
std::vector<int64_t> SampleIndices(int64_t n, int count, std::mt19937_64& rng) {
  std::vector<int64_t> indices;
  if (n <= count) {
    for (int64_t j = 0; j < n; ++j) indices.push_back(j);
    return indices;
  }
  std::set<int64_t> chosen;
  for (int64_t j = n - count; j < n; ++j) {
    const int64_t pick = std::uniform_int_distribution<int64_t>(0, j)(rng);
    chosen.insert(chosen.count(pick) ? j : pick);
  }
  return {chosen.begin(), chosen.end()};
}

template <typename T>
std::vector<double> ToDouble(const T* data, int64_t n) {
  return data == nullptr ? std::vector<double>{} : std::vector<double>(data, data + n);
}

}  // namespace

template <typename T>
absl::StatusOr<std::vector<TensorCheck>> CheckGradients(const Model& model,
                                                        const CheckpointPlan& plan,
                                                        std::span<const LinearParamsView<T>> params,
                                                        const BatchView<T>& batch,
                                                        const GradientCheckOptions& options) {
  // The finite-difference passes too run on the call's threads, not on the worker's default
  // team (every core), which would oversubscribe the cores other calls were given.
  const ScopedThreads threads(options.threads);
  const int64_t rows = batch.batch;
  const int num_linear = model.num_linear();

  // Analytic gradients in the request's dtype.
  std::vector<std::vector<T>> weight_grads(num_linear), bias_grads(num_linear);
  OutputsView<T> outputs;
  for (int l = 0; l < num_linear; ++l) {
    const LayerSpec& layer = model.layer(model.linear_layer(l));
    weight_grads[l].resize(layer.out_features * layer.in_features);
    if (layer.bias) bias_grads[l].resize(layer.out_features);
    outputs.gradients.push_back(
        {weight_grads[l].data(), layer.bias ? bias_grads[l].data() : nullptr});
  }
  std::vector<T> input_grad(rows * model.input_features());
  outputs.input_gradient = input_grad.data();
  RunOptions run_options;
  run_options.threads = options.threads;
  run_options.should_stop = options.should_stop;
  RETURN_IF_ERROR(RunBackprop<T>(model, plan, params, batch, outputs, run_options).status());

  // A float64 copy of everything the loss depends on.
  std::vector<std::vector<double>> weights(num_linear), biases(num_linear);
  std::vector<LinearParamsView<double>> params64(num_linear);
  for (int l = 0; l < num_linear; ++l) {
    const LayerSpec& layer = model.layer(model.linear_layer(l));
    weights[l] = ToDouble(params[l].weight, layer.out_features * layer.in_features);
    biases[l] = ToDouble(params[l].bias, layer.bias ? layer.out_features : 0);
    params64[l] = {weights[l].data(), layer.bias ? biases[l].data() : nullptr};
  }
  const int64_t out_elements = rows * model.output_features();
  std::vector<double> inputs = ToDouble(batch.inputs, rows * model.input_features());
  std::vector<double> targets = ToDouble(batch.targets.targets, out_elements);
  std::vector<double> output_gradient = ToDouble(batch.targets.output_gradient, out_elements);
  BatchView<double> batch64;
  batch64.batch = rows;
  batch64.inputs = inputs.data();
  batch64.targets.targets = batch.targets.targets ? targets.data() : nullptr;
  batch64.targets.class_targets = batch.targets.class_targets;
  batch64.targets.output_gradient =
      batch.targets.output_gradient ? output_gradient.data() : nullptr;

  std::mt19937_64 rng(options.seed);
  const double h = options.step;
  std::vector<TensorCheck> checks;
  bool stopped = false;
  auto check = [&](std::string name, int layer_index, std::vector<double>& values,
                   const std::vector<T>& analytic) {
    TensorCheck result;
    result.tensor = std::move(name);
    result.layer_index = layer_index;
    for (int64_t j :
         SampleIndices(static_cast<int64_t>(values.size()), options.samples_per_tensor, rng)) {
      if (stopped || (options.should_stop && options.should_stop())) {
        stopped = true;
        return;
      }
      const double saved = values[j];
      values[j] = saved + h;
      const double plus = ForwardLoss<double>(model, params64, batch64);
      values[j] = saved - h;
      const double minus = ForwardLoss<double>(model, params64, batch64);
      values[j] = saved;
      const double numerical = (plus - minus) / (2 * h);
      const double a = static_cast<double>(analytic[j]);
      const double abs_error = std::abs(a - numerical);
      const double scale = std::max(std::abs(a), std::abs(numerical));
      result.max_abs_error = std::max(result.max_abs_error, abs_error);
      if (scale > kRelativeFloor) {
        result.max_rel_error = std::max(result.max_rel_error, abs_error / scale);
      }
      ++result.samples;
    }
    checks.push_back(std::move(result));
  };
  for (int l = 0; l < num_linear; ++l) {
    const int layer = model.linear_layer(l);
    check(absl::StrCat("parameters[", l, "].weight"), layer, weights[l], weight_grads[l]);
    if (model.layer(layer).bias) {
      check(absl::StrCat("parameters[", l, "].bias"), layer, biases[l], bias_grads[l]);
    }
  }
  check("inputs", -1, inputs, input_grad);
  if (stopped) return absl::CancelledError("the call was cancelled");
  return checks;
}

template absl::StatusOr<std::vector<TensorCheck>> CheckGradients<float>(
    const Model&, const CheckpointPlan&, std::span<const LinearParamsView<float>>,
    const BatchView<float>&, const GradientCheckOptions&);
template absl::StatusOr<std::vector<TensorCheck>> CheckGradients<double>(
    const Model&, const CheckpointPlan&, std::span<const LinearParamsView<double>>,
    const BatchView<double>&, const GradientCheckOptions&);

}  // namespace gradserve::engine
