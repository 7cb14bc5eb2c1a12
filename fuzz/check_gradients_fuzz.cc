// libFuzzer target: arbitrary bytes as a gradserve.v1.CheckGradientsRequest, then
// service::CheckGradients under small limits (at most 8 samples per tensor
// when it asks; 16 when it leaves samples_per_tensor 0).
//
// Beyond sanitizer reports it checks that a refusal is INVALID_ARGUMENT or RESOURCE_EXHAUSTED
// and that an answer has one check per parameter tensor plus one for the inputs, each with a
// sample count within the limit, and maxima that are the maxima of the checks.
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_common.h"
#include "server/service/compute.h"

namespace {

using gradserve::fuzz::Check;
namespace v1 = ::gradserve::v1;
namespace service = ::gradserve::service;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  gradserve::fuzz::SilenceProtobufLogging();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  v1::CheckGradientsRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return -1;
  static const service::ServiceLimits limits = gradserve::fuzz::SmallLimits();

  v1::CheckGradientsResponse response;
  const absl::Status status =
      service::CheckGradients(request, limits, service::ComputeContext(), &response);
  if (!status.ok()) {
    gradserve::fuzz::CheckRefusal(status);
    return 0;
  }
  const v1::ComputeGradientsRequest& inner = request.request();
  if (inner.model().has_graph()) {
    // Every parameter, then the inputs named.
    Check(response.checks_size() ==
              inner.model().graph().parameters_size() + inner.options().input_gradient_names_size(),
          "not one check per graph parameter plus the inputs named");
    for (int p = 0; p < inner.model().graph().parameters_size(); ++p) {
      Check(response.checks(p).tensor() == inner.model().graph().parameters(p).name(),
            "a graph check not named as its parameter");
    }
    Check(response.analytic_dtype() == gradserve::fuzz::GraphRequestDType(inner), "analytic_dtype");
  } else {
    int tensors = 1;  // The inputs.
    for (const v1::Layer& layer : inner.model().layers()) {
      if (!layer.has_linear()) continue;
      tensors += (!layer.linear().has_bias() || layer.linear().bias()) ? 2 : 1;
    }
    Check(response.checks_size() == tensors, "not one check per parameter tensor plus inputs");
    Check(response.analytic_dtype() == inner.inputs().dtype(), "analytic_dtype");
  }
  double max_abs = 0, max_rel = 0;
  for (const v1::TensorCheck& check : response.checks()) {
    // samples_per_tensor 0 means 16, whatever the limit on what a caller may ask for.
    Check(
        check.samples() >= 1 && check.samples() <= std::max<int64_t>(16, limits.max_check_samples),
        "samples outside 1 .. max(16, max_check_samples)");
    Check(!(check.max_abs_error() < 0) && !(check.max_rel_error() < 0), "negative error");
    max_abs = std::max(max_abs, check.max_abs_error());
    max_rel = std::max(max_rel, check.max_rel_error());
  }
  // std::max skips a NaN second argument here as it does in the service.
  Check(response.max_abs_error() == max_abs, "max_abs_error is not the maximum of the checks");
  Check(response.max_rel_error() == max_rel, "max_rel_error is not the maximum of the checks");
  return 0;
}
