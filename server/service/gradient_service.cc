#include "server/service/gradient_service.h"

#include <spdlog/spdlog.h>

#include <chrono>

#include "server/service/compute.h"

namespace gradserve::service {
namespace {

using Clock = std::chrono::steady_clock;

double MillisSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl::StatusCode and grpc::StatusCode share the canonical numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

GradientServiceImpl::GradientServiceImpl(const ServiceOptions& options)
    : options_(options), pool_(options.workers, options.max_queue) {}

template <typename Request, typename Response, typename Compute>
grpc::ServerUnaryReactor* GradientServiceImpl::Dispatch(const char* method,
                                                        grpc::CallbackServerContext* context,
                                                        const Request* request, Response* response,
                                                        Compute compute) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const Clock::time_point received = Clock::now();
  auto run = [this, method, context, request, response, reactor, received, compute] {
    const double queued_ms = MillisSince(received);
    ComputeContext compute_context;
    compute_context.threads = options_.threads_per_call;
    compute_context.should_stop = [context] {
      return context->IsCancelled() || std::chrono::system_clock::now() > context->deadline();
    };
    absl::Status status = compute(*request, compute_context, response);
    if (absl::IsCancelled(status) && std::chrono::system_clock::now() > context->deadline()) {
      status = absl::DeadlineExceededError("the deadline passed while computing; it was abandoned");
    }
    spdlog::info(
        "{} peer={} request_bytes={} response_bytes={} queued_ms={:.3f} total_ms={:.3f} "
        "status={}{}{}",
        method, context->peer(), request->ByteSizeLong(),
        status.ok() ? response->ByteSizeLong() : 0, queued_ms, MillisSince(received),
        absl::StatusCodeToString(status.code()),
        status.ok() ? "" : " error=", std::string(status.message()));
    reactor->Finish(ToGrpcStatus(status));
  };
  if (!pool_.TrySubmit(run)) {
    spdlog::warn("{} peer={} refused: queue full ({} waiting)", method, context->peer(),
                 options_.max_queue);
    reactor->Finish(
        grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                     "server busy: " + std::to_string(options_.max_queue) +
                         " calls already wait for compute (max_queue); retry with backoff"));
  }
  return reactor;
}

grpc::ServerUnaryReactor* GradientServiceImpl::ComputeGradients(
    grpc::CallbackServerContext* context, const v1::ComputeGradientsRequest* request,
    v1::ComputeGradientsResponse* response) {
  return Dispatch("ComputeGradients", context, request, response,
                  [this](const v1::ComputeGradientsRequest& r, const ComputeContext& c,
                         v1::ComputeGradientsResponse* out) {
                    return service::ComputeGradients(r, options_.limits, c, out);
                  });
}

grpc::ServerUnaryReactor* GradientServiceImpl::CheckGradients(
    grpc::CallbackServerContext* context, const v1::CheckGradientsRequest* request,
    v1::CheckGradientsResponse* response) {
  return Dispatch("CheckGradients", context, request, response,
                  [this](const v1::CheckGradientsRequest& r, const ComputeContext& c,
                         v1::CheckGradientsResponse* out) {
                    return service::CheckGradients(r, options_.limits, c, out);
                  });
}

grpc::ServerUnaryReactor* GradientServiceImpl::GetServerInfo(
    grpc::CallbackServerContext* context, const v1::GetServerInfoRequest* /*request*/,
    v1::GetServerInfoResponse* response) {
  // Cheap and constant: answered on the reaction thread, so it works even when the queue is full.
  service::GetServerInfo(options_.limits, options_.threads_per_call, response);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace gradserve::service
