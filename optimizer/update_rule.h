// The optimizers' update rules, in float64, with torch.optim's formulas (PyTorch 1.13, the
// single-tensor implementation CPU tensors use). Where PyTorch's x86 kernels fuse a multiply
// and an add (Tensor.add_ with alpha, addcmul_), std::fma does the same, so the parameters
// match torch.optim's bit for bit given the same gradients (bench/optimizer_crosscheck.py).
// No gRPC here: the rules are plain functions of spans.
#ifndef GRADSERVE_OPTIMIZER_UPDATE_RULE_H_
#define GRADSERVE_OPTIMIZER_UPDATE_RULE_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "gradserve/optimizer/v1/optimizer.pb.h"

namespace gradserve::optimizer {

enum class Algorithm { kSgd, kAdam, kAdamW };

// OptimizerConfig with every default filled in.
struct UpdateRule {
  Algorithm algorithm = Algorithm::kSgd;
  double lr = 0;
  double momentum = 0;
  double dampening = 0;
  bool nesterov = false;
  double weight_decay = 0;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
};

// The rule `config` describes; INVALID_ARGUMENT naming the field (under `field`, e.g.
// "spec.optimizer") if a value is out of its range.
absl::StatusOr<UpdateRule> MakeUpdateRule(const v1::OptimizerConfig& config,
                                          const std::string& field);

// One parameter's optimizer state, named as torch.optim's state_dict names it. Each vector is
// empty until the rule that keeps it has taken its first step.
struct ParameterState {
  std::vector<double> momentum_buffer;  // SGD with momentum
  std::vector<double> exp_avg;          // Adam, AdamW
  std::vector<double> exp_avg_sq;       // Adam, AdamW
};

// Applies step number `step` (1 for the first) of `rule` to `value` given its gradient.
// REQUIRES: gradient.size() == value.size(), step >= 1, and every non-empty vector of *state
// that size.
void ApplyUpdate(const UpdateRule& rule, int64_t step, std::span<const double> gradient,
                 std::span<double> value, ParameterState* state);

}  // namespace gradserve::optimizer

#endif  // GRADSERVE_OPTIMIZER_UPDATE_RULE_H_
