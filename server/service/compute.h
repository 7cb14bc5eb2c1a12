// The service's three operations as plain functions of protobuf messages: no gRPC server in
// sight, so tests and fuzzers can call them directly.
#ifndef GRADSERVE_SERVICE_COMPUTE_H_
#define GRADSERVE_SERVICE_COMPUTE_H_

#include <functional>

#include "absl/status/status.h"
#include "gradserve/v1/gradserve.pb.h"
#include "server/service/limits.h"

namespace gradserve::service {

namespace v1 = ::gradserve::v1;

struct ComputeContext {
  int threads = 1;
  // Polled between layers; true abandons the call (CANCELLED).
  std::function<bool()> should_stop;
};

// Validates and computes; on error `response` is left in an unspecified state.
absl::Status ComputeGradients(const v1::ComputeGradientsRequest& request,
                              const ServiceLimits& limits, const ComputeContext& context,
                              v1::ComputeGradientsResponse* response);

absl::Status CheckGradients(const v1::CheckGradientsRequest& request, const ServiceLimits& limits,
                            const ComputeContext& context, v1::CheckGradientsResponse* response);

void GetServerInfo(const ServiceLimits& limits, int threads, v1::GetServerInfoResponse* response);

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_COMPUTE_H_
