// Losses on the model output [batch, width], matching PyTorch's definitions and, for the
// gradient, the order in which its backward kernels round.
#ifndef GRADSERVE_ENGINE_LOSSES_H_
#define GRADSERVE_ENGINE_LOSSES_H_

#include <cstdint>

#include "server/engine/model.h"

namespace gradserve::engine {

// What a loss compares the output with; which pointer is used depends on the loss kind.
template <typename T>
struct LossTargets {
  const T* targets = nullptr;              // MSE, L1, Huber, BCE: [batch, width].
  const int64_t* class_targets = nullptr;  // Cross-entropy: [batch], each in [0, width).
  const T* output_gradient = nullptr;      // External: dL/d(output), [batch, width].
};

// Writes dL/d(output) into grad [batch, width] and returns the reduced loss, accumulated in
// double. External losses return 0 and copy the caller's output gradient.
template <typename T>
double LossGradient(const LossSpec& loss, int64_t batch, int64_t width, const T* output,
                    const LossTargets<T>& targets, T* grad);

// The loss alone, in double. For the external loss this is sum(output * output_gradient),
// whose gradient with respect to the output is exactly the caller's output gradient; finite
// differences of it check the backward pass.
template <typename T>
double LossValue(const LossSpec& loss, int64_t batch, int64_t width, const T* output,
                 const LossTargets<T>& targets);

// One row of cross-entropy's gradient: g[j] = softmax(z)[j] * weight, minus weight at
// `target` (cross_entropy.cc). The chain's LossGradient and the graph executor both call it, so
// they round alike.
template <typename T>
void CrossEntropyRowGradient(const T* z, int64_t width, int64_t target, T weight, T* g);

// One row's cross-entropy term, log(sum(exp(z))) - z[target], in double (cross_entropy.cc;
// shared by the chain's losses and the graph executor, as above).
template <typename T>
double CrossEntropyRowLoss(const T* z, int64_t width, int64_t target);

}  // namespace gradserve::engine

#endif  // GRADSERVE_ENGINE_LOSSES_H_
