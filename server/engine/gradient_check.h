// Checks analytic gradients against central finite differences in float64 (a gradcheck).
#ifndef GRADSERVE_ENGINE_GRADIENT_CHECK_H_
#define GRADSERVE_ENGINE_GRADIENT_CHECK_H_

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "server/engine/backprop.h"

namespace gradserve::engine {

struct GradientCheckOptions {
  int samples_per_tensor = 16;  // Entries perturbed per tensor; smaller tensors are checked whole.
  double step = 1e-6;           // Central-difference step h.
  uint64_t seed = 0;            // Picks the entries.
  int threads = 1;
  // Polled before each perturbed pair of forward passes (and between layers of the analytic
  // pass); returning true abandons the check with CANCELLED.
  std::function<bool()> should_stop;
};

struct TensorCheck {
  std::string tensor;  // "parameters[i].weight", "parameters[i].bias" or "inputs".
  int layer_index = -1;
  int samples = 0;
  double max_abs_error = 0;
  // |a - n| / max(|a|, |n|), over entries where that denominator exceeds kRelativeFloor.
  double max_rel_error = 0;
};

inline constexpr double kRelativeFloor = 1e-12;

// Analytic gradients come from RunBackprop<T> with `plan`; numerical ones from ForwardLoss on a
// float64 copy of the parameters and batch. One TensorCheck per parameter tensor, then inputs.
template <typename T>
absl::StatusOr<std::vector<TensorCheck>> CheckGradients(const Model& model,
                                                        const CheckpointPlan& plan,
                                                        std::span<const LinearParamsView<T>> params,
                                                        const BatchView<T>& batch,
                                                        const GradientCheckOptions& options);

}  // namespace gradserve::engine

#endif  // GRADSERVE_ENGINE_GRADIENT_CHECK_H_
