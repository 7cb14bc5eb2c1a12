// Checks analytic gradients against central finite differences in float64 (a gradcheck).
#ifndef GRADSERVE_ENGINE_GRADIENT_CHECK_H_
#define GRADSERVE_ENGINE_GRADIENT_CHECK_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "server/engine/backprop.h"
#include "server/engine/graph/executor.h"
#include "server/engine/graph/graph.h"

namespace gradserve::engine {

struct GradientCheckOptions {
  int samples_per_tensor = 16;  // Entries perturbed per tensor; smaller tensors are checked whole.
  double step = 1e-6;           // Central-difference step h.
  uint64_t seed = 0;            // Picks the entries.
  uint64_t dropout_seed = 0;    // Graph models: GraphRunOptions::dropout_seed of every pass.
  int threads = 1;
  // Polled before each perturbed pair of forward passes (and between layers of the analytic
  // pass); returning true abandons the check with CANCELLED.
  std::function<bool()> should_stop;
};

struct TensorCheck {
  // "parameters[i].weight", "parameters[i].bias" or "inputs"; a graph's parameter or input name.
  std::string tensor;
  int layer_index = -1;
  int samples = 0;
  double max_abs_error = 0;
  // RelativeError(a, n, RelativeErrorFloor(L)) over the entries checked.
  double max_rel_error = 0;
};

// Note [Relative error floor] (documented for callers with TensorCheck in gradserve.proto)
// An entry compares as |a - n| / max(|a|, |n|, atol) with atol = kRelativeAtol * max(1, |L|),
// a analytic, n the float64 central difference, L the unperturbed loss. n carries a rounding
// error of a few eps |L| / h (eps = 2.2e-16, h = 1e-6: ~2e-10 |L| measured on MLPs, LayerNorm
// and attention), so dividing by |a| or |n| alone turns entries near zero into large "relative
// errors" of correct gradients (3.5e-5 in float64 where PyTorch agrees to 1e-14). Below atol the
// error is measured on atol's scale instead: 1e-3 puts that noise at ~2e-7, so a correct float64
// gradient reports below 1e-6, while an entry wrong by 10% of atol still reports 0.1.
inline constexpr double kRelativeAtol = 1e-3;
inline double RelativeErrorFloor(double loss) {
  return kRelativeAtol * std::max(1.0, std::abs(loss));
}
inline double RelativeError(double analytic, double numerical, double atol) {
  return std::abs(analytic - numerical) / std::max({std::abs(analytic), std::abs(numerical), atol});
}

// Analytic gradients come from RunBackprop<T> with `plan`; numerical ones from ForwardLoss on a
// float64 copy of the parameters and batch. One TensorCheck per parameter tensor, then inputs.
template <typename T>
absl::StatusOr<std::vector<TensorCheck>> CheckGradients(const Model& model,
                                                        const CheckpointPlan& plan,
                                                        std::span<const LinearParamsView<T>> params,
                                                        const BatchView<T>& batch,
                                                        const GradientCheckOptions& options);

// The graph form: `graph` (planned in T) at `inputs`, against central differences of
// `graph64`, the same spec planned in float64 for the same input shapes (it may be `graph`
// itself when T is double). Every parameter is sampled, then the graph inputs listed in
// `input_gradients` (indices into GraphSpec::inputs, floating ones). One TensorCheck per
// parameter, named as it, then per checked input; layer_index is -1.
template <typename T>
absl::StatusOr<std::vector<TensorCheck>> CheckGraphGradients(
    const graph::Graph& graph, const graph::Graph& graph64, const graph::GraphInputs<T>& inputs,
    const std::vector<int>& input_gradients, const GradientCheckOptions& options);

}  // namespace gradserve::engine

#endif  // GRADSERVE_ENGINE_GRADIENT_CHECK_H_
