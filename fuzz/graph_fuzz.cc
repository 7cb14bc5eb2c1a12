// libFuzzer target: arbitrary bytes as a gradserve.v1.ComputeGradientsRequest, seeded with
// graph requests (an MLP, a residual LayerNorm block, a tiny GPT, and near-valid ones that
// each fail one check), then service::ComputeGradients under small limits.
//
// Beyond sanitizer reports it checks that a refusal is INVALID_ARGUMENT or RESOURCE_EXHAUSTED,
// that an answer to a graph is complete and well formed (CheckGraphResponse), that the same
// request computed twice gives the same bits, and that the model written back from the engine's
// spec (service::GraphSpecToModel, the conversion's other direction) computes the same bits:
// the two directions agree on every graph the service accepts.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz/fuzz_common.h"
#include "server/service/compute.h"
#include "server/service/convert_graph.h"

namespace {

using gradserve::fuzz::Check;
namespace v1 = ::gradserve::v1;
namespace service = ::gradserve::service;

// What the spec round trip must preserve: the loss and every tensor computed (diagnostics are
// by node, and a Constant node with a tensor value becomes a constant, so they may differ).
std::string Results(const v1::ComputeGradientsResponse& response) {
  v1::ComputeGradientsResponse kept;
  kept.set_loss(response.loss());
  *kept.mutable_named_gradients() = response.named_gradients();
  *kept.mutable_input_gradients() = response.input_gradients();
  *kept.mutable_outputs() = response.outputs();
  return gradserve::fuzz::Deterministic(kept);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  gradserve::fuzz::SilenceProtobufLogging();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  v1::ComputeGradientsRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return -1;  // Not in the corpus.
  static const service::ServiceLimits limits = gradserve::fuzz::SmallLimits();

  const std::optional<v1::ComputeGradientsResponse> response =
      gradserve::fuzz::ComputeTwice(request, limits);
  if (!response || !request.model().has_graph()) return 0;  // Chains: compute_gradients_fuzz.
  const v1::DType dtype = gradserve::fuzz::GraphRequestDType(request);
  gradserve::fuzz::CheckGraphResponse(request.model(), request.options(), dtype, *response);

  absl::StatusOr<std::unique_ptr<service::GraphPlanner>> planner =
      service::GraphPlanner::Create(request.model(), request.options(), limits, /*cache=*/false);
  Check(planner.ok(), "an accepted graph fails validation: " + planner.status().ToString());
  v1::ComputeGradientsRequest written = request;
  *written.mutable_model() = service::GraphSpecToModel((*planner)->spec(), dtype);
  // The declared integer dtypes are kept as sent (the spec widens INT32 to int64).
  for (int i = 0; i < request.model().graph().inputs_size(); ++i) {
    written.mutable_model()->mutable_graph()->mutable_inputs(i)->set_dtype(
        request.model().graph().inputs(i).dtype());
  }
  v1::ComputeGradientsResponse rewritten;
  const absl::Status written_status =
      service::ComputeGradients(written, limits, service::ComputeContext(), &rewritten);
  Check(written_status.ok(),
        "the model written back from its spec is refused: " + written_status.ToString());
  Check(Results(*response) == Results(rewritten),
        "the model written back from its spec computes different bits");
  return 0;
}
