// The service's three operations as plain functions of protobuf messages: no gRPC server in
// sight, so tests and fuzzers can call them directly.
#ifndef GRADSERVE_SERVICE_COMPUTE_H_
#define GRADSERVE_SERVICE_COMPUTE_H_

#include <functional>
#include <span>

#include "absl/status/status.h"
#include "gradserve/v1/gradserve.pb.h"
#include "server/service/limits.h"

namespace gradserve::service {

namespace v1 = ::gradserve::v1;

// Seconds a call spent validating and converting the request (decode), in the engine (compute)
// and filling the response (encode); see Note [Call phases] in metrics.h. A phase the call did
// not reach stays negative: a request that fails validation has decode only, a call abandoned
// in the engine decode and compute.
struct PhaseTimes {
  double decode = -1;
  double compute = -1;
  double encode = -1;
};

struct ComputeContext {
  int threads = 1;
  // Polled between layers; true abandons the call (CANCELLED).
  std::function<bool()> should_stop;
  // If set, receives the call's phase durations.
  PhaseTimes* phase_times = nullptr;
  // If set, called once the plan knows the activations and workspace the computation needs
  // (Note [Memory budget]); an error is the call's answer. Held until the call ends.
  std::function<absl::Status(int64_t bytes)> reserve_memory;
};

// Validates and computes; on error `response` is left in an unspecified state.
absl::Status ComputeGradients(const v1::ComputeGradientsRequest& request,
                              const ServiceLimits& limits, const ComputeContext& context,
                              v1::ComputeGradientsResponse* response);
// The same, for a request it may rewrite: an ONNX model is converted to its graph in place
// (Note [ONNX import]) rather than in a copy of the request.
absl::Status ComputeGradients(v1::ComputeGradientsRequest* request, const ServiceLimits& limits,
                              const ComputeContext& context,
                              v1::ComputeGradientsResponse* response);

class GraphPlanner;

// ComputeGradients for a graph model whose structure `planner` has validated (from
// request.model and request.options): a stream passes its planner, which keeps one plan per
// tuple of input shapes.
absl::Status ComputeGraphGradients(const v1::ComputeGradientsRequest& request,
                                   const ServiceLimits& limits, const ComputeContext& context,
                                   GraphPlanner* planner, v1::ComputeGradientsResponse* response);

absl::Status CheckGradients(const v1::CheckGradientsRequest& request, const ServiceLimits& limits,
                            const ComputeContext& context, v1::CheckGradientsResponse* response);
absl::Status CheckGradients(v1::CheckGradientsRequest* request, const ServiceLimits& limits,
                            const ComputeContext& context, v1::CheckGradientsResponse* response);

void GetServerInfo(const ServiceLimits& limits, int threads, v1::GetServerInfoResponse* response);

// Note [Call cost]
// The one estimate of the floating-point operations of a gradient call, from the model and
// the batch as sent (before validation), forward and backward: 6 * batch * in * out per Linear
// layer of a chain (`batch` holds its inputs); 6 * rows * parameter elements for a graph
// (`batch` holds its graph inputs; rows = the most of any floating input's elements over its
// last axis, or of an integer input's elements), the same count for a graph of Linears. Unary
// calls and stream steps both use it, to choose between one core and all of them (Note
// [Scheduling]) and to refuse calls over max_call_flops before they are queued; a graph's plan
// then counts its FLOPs exactly (attention included) and is checked against max_call_flops
// again before it runs. A malformed request gets some estimate and then fails validation.
double EstimatedFlops(const v1::Model& model, std::span<const v1::Tensor* const> batch);
// EstimatedFlops of the request; CheckGradients adds its perturbed forward passes.
double ComputeGradientsCost(const v1::ComputeGradientsRequest& request);
double CheckGradientsCost(const v1::CheckGradientsRequest& request);

// CheckClaimedSizes (convert.h) of the request a CheckGradients call checks, its fields named
// "request.*".
absl::Status CheckClaimedSizes(const v1::CheckGradientsRequest& request,
                               const ServiceLimits& limits);

// An upper bound of the answer's size from the request as sent (before validation), at most
// max_message_bytes (a larger answer is refused before any compute): what a call reserves
// for its answer (Note [Memory budget]).
int64_t ResponseBytesBound(const v1::ComputeGradientsRequest& request, const ServiceLimits& limits);
int64_t ResponseBytesBound(const v1::CheckGradientsRequest& request, const ServiceLimits& limits);

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_COMPUTE_H_
