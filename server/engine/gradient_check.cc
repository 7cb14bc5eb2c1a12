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

// Compares the analytic gradient of one tensor with central differences at its sampled
// entries: `values` is the float64 copy that `loss` (the float64 forward loss) reads, perturbed
// in place and restored. Appends one TensorCheck. CANCELLED once options.should_stop fires.
template <typename T, typename Loss>
absl::Status CheckTensor(std::string name, int layer_index, std::vector<double>& values,
                         const std::vector<T>& analytic, const Loss& loss, double atol,
                         const GradientCheckOptions& options, std::mt19937_64& rng,
                         std::vector<TensorCheck>* checks) {
  TensorCheck result;
  result.tensor = std::move(name);
  result.layer_index = layer_index;
  const double h = options.step;
  for (int64_t j :
       SampleIndices(static_cast<int64_t>(values.size()), options.samples_per_tensor, rng)) {
    if (options.should_stop && options.should_stop()) {
      return absl::CancelledError("the call was cancelled");
    }
    const double saved = values[j];
    values[j] = saved + h;
    ASSIGN_OR_RETURN(const double plus, loss());
    values[j] = saved - h;
    ASSIGN_OR_RETURN(const double minus, loss());
    values[j] = saved;
    const double numerical = (plus - minus) / (2 * h);
    const double a = static_cast<double>(analytic[j]);
    result.max_abs_error = std::max(result.max_abs_error, std::abs(a - numerical));
    result.max_rel_error = std::max(result.max_rel_error, RelativeError(a, numerical, atol));
    ++result.samples;
  }
  checks->push_back(std::move(result));
  return absl::OkStatus();
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

  const double atol = RelativeErrorFloor(ForwardLoss<double>(model, params64, batch64));
  std::mt19937_64 rng(options.seed);
  std::vector<TensorCheck> checks;
  auto loss = [&]() -> absl::StatusOr<double> {
    return ForwardLoss<double>(model, params64, batch64);
  };
  for (int l = 0; l < num_linear; ++l) {
    const int layer = model.linear_layer(l);
    RETURN_IF_ERROR(CheckTensor(absl::StrCat("parameters[", l, "].weight"), layer, weights[l],
                                weight_grads[l], loss, atol, options, rng, &checks));
    if (model.layer(layer).bias) {
      RETURN_IF_ERROR(CheckTensor(absl::StrCat("parameters[", l, "].bias"), layer, biases[l],
                                  bias_grads[l], loss, atol, options, rng, &checks));
    }
  }
  RETURN_IF_ERROR(CheckTensor("inputs", -1, inputs, input_grad, loss, atol, options, rng, &checks));
  return checks;
}

template absl::StatusOr<std::vector<TensorCheck>> CheckGradients<float>(
    const Model&, const CheckpointPlan&, std::span<const LinearParamsView<float>>,
    const BatchView<float>&, const GradientCheckOptions&);
template absl::StatusOr<std::vector<TensorCheck>> CheckGradients<double>(
    const Model&, const CheckpointPlan&, std::span<const LinearParamsView<double>>,
    const BatchView<double>&, const GradientCheckOptions&);

template <typename T>
absl::StatusOr<std::vector<TensorCheck>> CheckGraphGradients(
    const graph::Graph& graph, const graph::Graph& graph64, const graph::GraphInputs<T>& inputs,
    const std::vector<int>& input_gradients, const GradientCheckOptions& options) {
  const graph::GraphSpec& spec = graph.spec();
  const size_t num_parameters = spec.parameters.size();
  auto elements = [&graph](int value) { return graph.values()[value].elements; };

  // Analytic gradients in the call's dtype.
  std::vector<std::vector<T>> parameter_grads(num_parameters);
  graph::GraphOutputs<T> outputs;
  for (size_t p = 0; p < num_parameters; ++p) {
    parameter_grads[p].resize(elements(graph.parameter_value(p)));
    outputs.parameter_gradients.push_back(parameter_grads[p].data());
  }
  std::vector<std::vector<T>> input_grads(spec.inputs.size());
  if (!input_gradients.empty()) {
    outputs.input_gradients.assign(spec.inputs.size(), nullptr);
    for (int i : input_gradients) {
      input_grads[i].resize(elements(graph.input_value(i)));
      outputs.input_gradients[i] = input_grads[i].data();
    }
  }
  graph::GraphRunOptions run_options;
  run_options.threads = options.threads;
  run_options.should_stop = options.should_stop;
  run_options.dropout_seed = options.dropout_seed;
  RETURN_IF_ERROR(graph::RunGraph<T>(graph, inputs, outputs, run_options).status());

  // A float64 copy of everything floating the loss depends on (integer inputs read in place).
  std::vector<std::vector<double>> parameters(num_parameters), floats(spec.inputs.size());
  graph::GraphInputs<double> inputs64;
  for (size_t p = 0; p < num_parameters; ++p) {
    parameters[p] = ToDouble(inputs.parameters[p], elements(graph.parameter_value(p)));
    inputs64.parameters.push_back(parameters[p].data());
  }
  for (size_t i = 0; i < spec.inputs.size(); ++i) {
    if (!graph::IsFloat(spec.inputs[i].dtype)) {
      inputs64.inputs.push_back(inputs.inputs[i]);
      continue;
    }
    floats[i] = ToDouble(static_cast<const T*>(inputs.inputs[i]), elements(graph.input_value(i)));
    inputs64.inputs.push_back(floats[i].data());
  }
  graph::GraphRunOptions loss_options;
  loss_options.threads = options.threads;
  loss_options.dropout_seed = options.dropout_seed;
  auto loss = [&] { return graph::GraphForwardLoss<double>(graph64, inputs64, loss_options); };
  ASSIGN_OR_RETURN(const double unperturbed, loss());
  const double atol = RelativeErrorFloor(unperturbed);

  std::mt19937_64 rng(options.seed);
  std::vector<TensorCheck> checks;
  for (size_t p = 0; p < num_parameters; ++p) {
    RETURN_IF_ERROR(CheckTensor(spec.parameters[p].name, -1, parameters[p], parameter_grads[p],
                                loss, atol, options, rng, &checks));
  }
  for (int i : input_gradients) {
    RETURN_IF_ERROR(CheckTensor(spec.inputs[i].name, -1, floats[i], input_grads[i], loss, atol,
                                options, rng, &checks));
  }
  return checks;
}

template absl::StatusOr<std::vector<TensorCheck>> CheckGraphGradients<float>(
    const graph::Graph&, const graph::Graph&, const graph::GraphInputs<float>&,
    const std::vector<int>&, const GradientCheckOptions&);
template absl::StatusOr<std::vector<TensorCheck>> CheckGraphGradients<double>(
    const graph::Graph&, const graph::Graph&, const graph::GraphInputs<double>&,
    const std::vector<int>&, const GradientCheckOptions&);

}  // namespace gradserve::engine
