// Forward pass, loss and reverse-mode backward pass over a Model, following a CheckpointPlan.
//
// The executor owns only the cache and workspace of one call; parameters, inputs and targets
// are read in place, and gradients are written into caller-provided buffers (the response's).
// A call is deterministic: the same inputs and thread count give the same bits, whatever the
// checkpoint plan.
#ifndef GRADSERVE_ENGINE_BACKPROP_H_
#define GRADSERVE_ENGINE_BACKPROP_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "server/engine/checkpoint.h"
#include "server/engine/layers.h"
#include "server/engine/losses.h"
#include "server/engine/model.h"

namespace gradserve::engine {

template <typename T>
struct BatchView {
  int64_t batch = 0;
  const T* inputs = nullptr;  // [batch, model.input_features()]
  LossTargets<T> targets;
};

template <typename T>
struct OutputsView {
  std::vector<LinearGradsView<T>> gradients;  // One per Linear layer, in model order.
  T* input_gradient = nullptr;  // [batch, input_features]; dx is computed only if set.
  T* output = nullptr;          // [batch, output_features]; written only if set.
};

struct RunOptions {
  // OpenMP threads for this call (GEMMs and element-wise loops).
  int threads = 1;
  // Polled between layers; returning true abandons the call with CANCELLED.
  std::function<bool()> should_stop;
};

// A norm is set iff the executor computed that gradient, so a caller can tell "not computed"
// from "computed, and 0": dL/d(output of layer i) for every i >= plan.lowest_backward_layer
// (always the last layer's, the loss gradient); dW and db for a Linear layer with them.
struct LayerDiagnostics {
  std::optional<double> weight_grad_norm;
  std::optional<double> bias_grad_norm;
  std::optional<double> output_grad_norm;  // ||dL/d(layer output)||
  double activation_norm = 0;              // ||layer output||
  int64_t non_finite_count = 0;
};

struct RunResult {
  double loss = 0;
  std::vector<LayerDiagnostics> diagnostics;  // One per layer.
  double forward_micros = 0;
  double backward_micros = 0;
  int64_t peak_activation_bytes = 0;  // Measured.
  int64_t layers_recomputed = 0;
};

// The norm of the finite values of data[0, n) and how many are NaN or +-Inf: the per-layer
// diagnostics, computed in a fixed order (the result depends only on the data).
struct NormAndNonFinite {
  double norm = 0;
  int64_t non_finite = 0;
};
template <typename T>
NormAndNonFinite Measure(const T* data, int64_t n);

// Sets the OpenMP team size of the calling thread until destroyed (the setting is per thread, so
// concurrent calls on other threads keep their own). Every engine entry point that computes
// holds one for the call's thread count.
class ScopedThreads {
 public:
  explicit ScopedThreads(int threads);
  ~ScopedThreads();
  ScopedThreads(const ScopedThreads&) = delete;
  ScopedThreads& operator=(const ScopedThreads&) = delete;

 private:
  int previous_;
};

// Runs forward, loss and backward. REQUIRES: every view sized as documented above for this
// model and batch (the service validates that), params.size() == model.num_linear().
// Returns CANCELLED if options.should_stop fired.
template <typename T>
absl::StatusOr<RunResult> RunBackprop(const Model& model, const CheckpointPlan& plan,
                                      std::span<const LinearParamsView<T>> params,
                                      const BatchView<T>& batch, const OutputsView<T>& outputs,
                                      const RunOptions& options);

// Forward pass and loss only, with LossValue's definition (used by finite differences).
template <typename T>
double ForwardLoss(const Model& model, std::span<const LinearParamsView<T>> params,
                   const BatchView<T>& batch);

}  // namespace gradserve::engine

#endif  // GRADSERVE_ENGINE_BACKPROP_H_
