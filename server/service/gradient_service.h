// The gRPC face of gradserve.v1.GradientService: a thin callback service that hands each call
// to the ComputePool, maps the result to a gRPC status in one place and logs one line per call.
#ifndef GRADSERVE_SERVICE_GRADIENT_SERVICE_H_
#define GRADSERVE_SERVICE_GRADIENT_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "gradserve/v1/gradserve.grpc.pb.h"
#include "server/service/compute_pool.h"
#include "server/service/limits.h"

namespace gradserve::service {

// The one place an engine/service error becomes a gRPC status: canonical codes map one to one.
grpc::Status ToGrpcStatus(const absl::Status& status);

struct ServiceOptions {
  ServiceLimits limits;
  int threads_per_call = 1;  // OpenMP threads one call may use.
  int workers = 1;           // Calls computed at once.
  int max_queue = 64;        // Calls waiting for a worker before RESOURCE_EXHAUSTED.
};

class GradientServiceImpl final : public v1::GradientService::CallbackService {
 public:
  explicit GradientServiceImpl(const ServiceOptions& options);

  grpc::ServerUnaryReactor* ComputeGradients(grpc::CallbackServerContext* context,
                                             const v1::ComputeGradientsRequest* request,
                                             v1::ComputeGradientsResponse* response) override;
  grpc::ServerUnaryReactor* CheckGradients(grpc::CallbackServerContext* context,
                                           const v1::CheckGradientsRequest* request,
                                           v1::CheckGradientsResponse* response) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest* request,
                                          v1::GetServerInfoResponse* response) override;

 private:
  // Runs `compute` on the pool and finishes the call with its status.
  template <typename Request, typename Response, typename Compute>
  grpc::ServerUnaryReactor* Dispatch(const char* method, grpc::CallbackServerContext* context,
                                     const Request* request, Response* response, Compute compute);

  const ServiceOptions options_;
  ComputePool pool_;  // Last: its destructor runs queued calls, which use the members above.
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_GRADIENT_SERVICE_H_
