// libFuzzer target: arbitrary bytes as a gradserve.v1.ComputeGradientsRequest, then
// service::ComputeGradients under small limits, exactly as the gRPC handler calls it.
//
// Beyond sanitizer reports it checks that a refusal is INVALID_ARGUMENT or RESOURCE_EXHAUSTED,
// that an answer is complete and well formed (one gradient per Linear layer with its shape,
// tensors as long as their shapes, dx and the output iff asked for; for a graph, one named
// gradient per parameter as declared), and that the same request computed twice gives the
// same bits. graph_fuzz looks harder at graph requests.
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
  v1::ComputeGradientsRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return -1;  // Not in the corpus.
  static const service::ServiceLimits limits = gradserve::fuzz::SmallLimits();

  const std::optional<v1::ComputeGradientsResponse> response =
      gradserve::fuzz::ComputeTwice(request, limits);
  if (!response) return 0;
  if (request.model().has_graph()) {
    gradserve::fuzz::CheckGraphResponse(request.model(), request.options(),
                                        gradserve::fuzz::GraphRequestDType(request), *response);
  } else {
    Check(request.inputs().shape_size() > 0, "accepted inputs without a shape");
    gradserve::fuzz::CheckComputeResponse(request.model(), request.options(),
                                          request.inputs().dtype(), request.inputs().shape(0),
                                          *response);
  }
  return 0;
}
