#include "optimizer/update_rule.h"

#include <cmath>
#include <string>

#include "absl/status/status.h"

namespace gradserve::optimizer {
namespace {

absl::Status OutOfRange(const std::string& field, const char* name, double value,
                        const char* range) {
  return absl::InvalidArgumentError(field + "." + name + ": " + std::to_string(value) +
                                    " is not in " + range);
}

struct AdamConstants {
  double beta1, beta2, eps, step_size, bias_correction2_sqrt, weight_decay;
};

// Adam's update of n elements. Plain pointers the compiler may assume apart, so that the loop
// vectorises (sqrt and division included: IEEE-exact in any vector width, so the bits do not
// change); kL2 is a template argument rather than a test in the loop for the same reason.
template <bool kL2>
void AdamLoop(const AdamConstants& c, size_t n, const double* __restrict grad, double* __restrict p,
              double* __restrict m, double* __restrict v) {
  for (size_t i = 0; i < n; ++i) {
    // grad = grad.add(param, alpha=weight_decay)
    const double g = kL2 ? std::fma(p[i], c.weight_decay, grad[i]) : grad[i];
    // exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    m[i] = std::fma(g, 1 - c.beta1, m[i] * c.beta1);
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): ATen's kernel computes
    // self + value * t1 * t2, which GCC contracts to fma(value * t1, t2, self) in torch's build.
    v[i] = std::fma((1 - c.beta2) * g, g, v[i] * c.beta2);
    // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    const double denom = std::sqrt(v[i]) / c.bias_correction2_sqrt + c.eps;
    // param.addcdiv_(exp_avg, denom, value=-step_size)
    p[i] = p[i] + -c.step_size * m[i] / denom;
  }
}

}  // namespace

absl::StatusOr<UpdateRule> MakeUpdateRule(const v1::OptimizerConfig& config,
                                          const std::string& field) {
  UpdateRule rule;
  switch (config.algorithm()) {
    case v1::OptimizerConfig::ALGORITHM_SGD:
      rule.algorithm = Algorithm::kSgd;
      break;
    case v1::OptimizerConfig::ALGORITHM_ADAM:
      rule.algorithm = Algorithm::kAdam;
      break;
    case v1::OptimizerConfig::ALGORITHM_ADAMW:
      rule.algorithm = Algorithm::kAdamW;
      break;
    default:
      return absl::InvalidArgumentError(
          field + ".algorithm: unset or unknown (ALGORITHM_SGD, ALGORITHM_ADAM, ALGORITHM_ADAMW)");
  }
  rule.lr = config.lr();
  if (!(rule.lr > 0) || !std::isfinite(rule.lr))
    return OutOfRange(field, "lr", rule.lr, "(0, inf)");
  rule.weight_decay = config.has_weight_decay()
                          ? config.weight_decay()
                          : (rule.algorithm == Algorithm::kAdamW ? 0.01 : 0.0);
  if (!(rule.weight_decay >= 0) || !std::isfinite(rule.weight_decay)) {
    return OutOfRange(field, "weight_decay", rule.weight_decay, "[0, inf)");
  }
  if (rule.algorithm == Algorithm::kSgd) {
    rule.momentum = config.momentum();
    rule.dampening = config.dampening();
    rule.nesterov = config.nesterov();
    if (!(rule.momentum >= 0 && rule.momentum < 1)) {
      return OutOfRange(field, "momentum", rule.momentum, "[0, 1)");
    }
    if (!(rule.dampening >= 0 && rule.dampening <= 1)) {
      return OutOfRange(field, "dampening", rule.dampening, "[0, 1]");
    }
    if (rule.nesterov && (rule.momentum == 0 || rule.dampening != 0)) {
      return absl::InvalidArgumentError(field +
                                        ".nesterov: needs momentum > 0 and dampening 0 (as torch)");
    }
    return rule;
  }
  if (config.momentum() != 0 || config.dampening() != 0 || config.nesterov()) {
    return absl::InvalidArgumentError(field +
                                      ": momentum, dampening and nesterov are SGD's; Adam and "
                                      "AdamW take beta1 and beta2");
  }
  if (config.has_beta1()) rule.beta1 = config.beta1();
  if (config.has_beta2()) rule.beta2 = config.beta2();
  if (config.has_eps()) rule.eps = config.eps();
  if (!(rule.beta1 >= 0 && rule.beta1 < 1)) return OutOfRange(field, "beta1", rule.beta1, "[0, 1)");
  if (!(rule.beta2 >= 0 && rule.beta2 < 1)) return OutOfRange(field, "beta2", rule.beta2, "[0, 1)");
  if (!(rule.eps > 0) || !std::isfinite(rule.eps)) {
    return OutOfRange(field, "eps", rule.eps, "(0, inf)");
  }
  return rule;
}

// Each line names the torch 1.13 statement it mirrors (torch/optim/sgd.py, adam.py, adamw.py,
// _single_tensor_*). Tensor.add(other, alpha=a) is fmadd(other, a, self) in ATen's vectorised
// CPU kernel; mul_, addcmul_ and addcdiv_ are separate roundings, in the order written here.
void ApplyUpdate(const UpdateRule& rule, int64_t step, std::span<const double> gradient,
                 std::span<double> value, ParameterState* state) {
  const size_t n = value.size();
  if (rule.algorithm == Algorithm::kSgd) {
    const bool first = state->momentum_buffer.empty();
    if (rule.momentum != 0 && first) state->momentum_buffer.resize(n);
    for (size_t i = 0; i < n; ++i) {
      // d_p = d_p.add(param, alpha=weight_decay)
      double d =
          rule.weight_decay != 0 ? std::fma(value[i], rule.weight_decay, gradient[i]) : gradient[i];
      if (rule.momentum != 0) {
        double& buf = state->momentum_buffer[i];
        // buf = clone(d_p), then buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
        buf = first ? d : std::fma(d, 1 - rule.dampening, buf * rule.momentum);
        // nesterov: d_p = d_p.add(buf, alpha=momentum); else d_p = buf
        d = rule.nesterov ? std::fma(buf, rule.momentum, d) : buf;
      }
      // param.add_(d_p, alpha=-lr)
      value[i] = std::fma(d, -rule.lr, value[i]);
    }
    return;
  }
  if (state->exp_avg.empty()) {
    state->exp_avg.assign(n, 0.0);
    state->exp_avg_sq.assign(n, 0.0);
  }
  const double steps = static_cast<double>(step);
  const double bias_correction1 = 1 - std::pow(rule.beta1, steps);
  const double bias_correction2 = 1 - std::pow(rule.beta2, steps);
  const double step_size = rule.lr / bias_correction1;
  const double bias_correction2_sqrt = std::sqrt(bias_correction2);
  const bool adamw = rule.algorithm == Algorithm::kAdamW;
  double* __restrict p = value.data();
  if (adamw) {
    // param.mul_(1 - lr * weight_decay)
    const double decay = 1 - rule.lr * rule.weight_decay;
    for (size_t i = 0; i < n; ++i) p[i] *= decay;
  }
  const AdamConstants constants{
      rule.beta1, rule.beta2, rule.eps, step_size, bias_correction2_sqrt, rule.weight_decay};
  if (!adamw && rule.weight_decay != 0) {
    AdamLoop<true>(constants, n, gradient.data(), p, state->exp_avg.data(),
                   state->exp_avg_sq.data());
  } else {
    AdamLoop<false>(constants, n, gradient.data(), p, state->exp_avg.data(),
                    state->exp_avg_sq.data());
  }
}

}  // namespace gradserve::optimizer
