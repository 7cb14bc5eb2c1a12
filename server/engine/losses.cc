#include "server/engine/losses.h"

#include <algorithm>
#include <cmath>

namespace gradserve::engine {
namespace {

double HuberTerm(double d, double delta) {
  const double z = std::abs(d);
  return z < delta ? 0.5 * z * z : delta * (z - 0.5 * delta);
}

// How many terms MEAN divides by: every element, except for cross-entropy (per row).
double MeanCount(const LossSpec& loss, int64_t batch, int64_t width) {
  return loss.kind == LossKind::kCrossEntropy ? static_cast<double>(batch)
                                              : static_cast<double>(batch) * width;
}

}  // namespace

template <typename T>
double LossValue(const LossSpec& loss, int64_t batch, int64_t width, const T* output,
                 const LossTargets<T>& targets) {
  const int64_t n = batch * width;
  double sum = 0;
  switch (loss.kind) {
    case LossKind::kMse:
      for (int64_t j = 0; j < n; ++j) {
        const double d = static_cast<double>(output[j]) - static_cast<double>(targets.targets[j]);
        sum += d * d;
      }
      break;
    case LossKind::kL1:
      for (int64_t j = 0; j < n; ++j) {
        sum += std::abs(static_cast<double>(output[j]) - static_cast<double>(targets.targets[j]));
      }
      break;
    case LossKind::kHuber:
      for (int64_t j = 0; j < n; ++j) {
        sum += HuberTerm(static_cast<double>(output[j]) - static_cast<double>(targets.targets[j]),
                         loss.huber_delta);
      }
      break;
    case LossKind::kBceWithLogits:
      for (int64_t j = 0; j < n; ++j) {
        const double z = output[j];
        const double y = targets.targets[j];
        sum += std::max(z, 0.0) - z * y + std::log1p(std::exp(-std::abs(z)));
      }
      break;
    case LossKind::kCrossEntropy:
      for (int64_t b = 0; b < batch; ++b) {
        const T* row = output + b * width;
        sum += CrossEntropyRowLoss(row, width, targets.class_targets[b]);
      }
      break;
    case LossKind::kExternal:
      for (int64_t j = 0; j < n; ++j) {
        sum += static_cast<double>(output[j]) * static_cast<double>(targets.output_gradient[j]);
      }
      return sum;
  }
  return loss.reduction == Reduction::kMean ? sum / MeanCount(loss, batch, width) : sum;
}

template <typename T>
double LossGradient(const LossSpec& loss, int64_t batch, int64_t width, const T* output,
                    const LossTargets<T>& targets, T* grad) {
  const int64_t n = batch * width;
  const bool mean = loss.reduction == Reduction::kMean;
  const double count = MeanCount(loss, batch, width);
  switch (loss.kind) {
    case LossKind::kMse: {  // L = sum (o - t)^2 [/ N]: dL/do = (o - t) * 2 [/ N].
      const T scale = static_cast<T>(mean ? 2.0 / count : 2.0);
      for (int64_t j = 0; j < n; ++j) grad[j] = (output[j] - targets.targets[j]) * scale;
      break;
    }
    case LossKind::kL1: {  // dL/do = sign(o - t) [/ N], sign(0) = 0.
      const T scale = mean ? T(1) / static_cast<T>(count) : T(1);
      for (int64_t j = 0; j < n; ++j) {
        const T d = output[j] - targets.targets[j];
        grad[j] = static_cast<T>((d > T(0)) - (d < T(0))) * scale;
      }
      break;
    }
    case LossKind::kHuber: {  // dL/do = clamp(o - t, -delta, delta) [/ N].
      const T scale = static_cast<T>(mean ? 1.0 / count : 1.0);
      const T delta = static_cast<T>(loss.huber_delta);
      for (int64_t j = 0; j < n; ++j) {
        const T d = output[j] - targets.targets[j];
        grad[j] = d <= -delta ? -scale * delta : d >= delta ? scale * delta : scale * d;
      }
      break;
    }
    case LossKind::kBceWithLogits:  // dL/dz = (sigmoid(z) - y) [/ N].
      for (int64_t j = 0; j < n; ++j) {
        const T d = T(1) / (T(1) + std::exp(-output[j])) - targets.targets[j];
        grad[j] = mean ? d / static_cast<T>(count) : d;
      }
      break;
    case LossKind::kCrossEntropy: {  // dL/dz = (softmax(z) - onehot(t)) [/ B].
      const T weight = mean ? T(1) / static_cast<T>(count) : T(1);
      for (int64_t b = 0; b < batch; ++b) {
        CrossEntropyRowGradient(output + b * width, width, targets.class_targets[b], weight,
                                grad + b * width);
      }
      break;
    }
    case LossKind::kExternal:
      std::copy(targets.output_gradient, targets.output_gradient + n, grad);
      return 0.0;
  }
  return LossValue(loss, batch, width, output, targets);
}

template double LossGradient<float>(const LossSpec&, int64_t, int64_t, const float*,
                                    const LossTargets<float>&, float*);
template double LossGradient<double>(const LossSpec&, int64_t, int64_t, const double*,
                                     const LossTargets<double>&, double*);
template double LossValue<float>(const LossSpec&, int64_t, int64_t, const float*,
                                 const LossTargets<float>&);
template double LossValue<double>(const LossSpec&, int64_t, int64_t, const double*,
                                  const LossTargets<double>&);

}  // namespace gradserve::engine
