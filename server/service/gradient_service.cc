#include "server/service/gradient_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <random>

#include "absl/strings/str_cat.h"
#include "server/service/compute.h"

namespace gradserve::service {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration duration) { return std::chrono::duration<double>(duration).count(); }

// Milliseconds for the log line; "-" for a phase the call did not reach.
std::string Millis(double seconds) {
  return seconds < 0 ? "-" : fmt::format("{:.3f}", seconds * 1e3);
}

void ToProto(const HistogramSnapshot& histogram, v1::LatencySummary* out) {
  out->set_count(histogram.count);
  if (histogram.count == 0) return;
  out->set_sum_seconds(histogram.sum_seconds);
  out->set_p50_seconds(histogram.Percentile(0.50));
  out->set_p90_seconds(histogram.Percentile(0.90));
  out->set_p99_seconds(histogram.Percentile(0.99));
  out->set_min_seconds(histogram.min_seconds);
  out->set_max_seconds(histogram.max_seconds);
  for (double bound : LatencyBucketBounds()) out->add_bucket_upper_bounds_seconds(bound);
  for (uint64_t count : histogram.Cumulative()) out->add_bucket_cumulative_counts(count);
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl::StatusCode and grpc::StatusCode share the canonical numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

bool IsValidRequestId(std::string_view id) {
  if (id.empty() || id.size() > 128) return false;
  return std::all_of(id.begin(), id.end(), [](char c) { return c > 0x20 && c < 0x7f; });
}

std::string NewRequestId() {
  // One generator per thread, seeded once from the OS: no lock, no shared state.
  thread_local std::mt19937_64 generator([] {
    std::random_device device;
    return (static_cast<uint64_t>(device()) << 32) ^ device();
  }());
  return fmt::format("{:016x}", generator());
}

GradientServiceImpl::GradientServiceImpl(const ServiceOptions& options)
    : options_(options),
      metrics_({"ComputeGradients", "CheckGradients", "GetServerInfo", "GetStats"}),
      scheduler_(options.threads, options.max_queue) {}

std::string GradientServiceImpl::AssignRequestId(grpc::CallbackServerContext* context) {
  std::string id;
  const auto& metadata = context->client_metadata();
  if (const auto it = metadata.find(kRequestIdKey); it != metadata.end()) {
    const std::string_view given(it->second.data(), it->second.size());
    if (IsValidRequestId(given)) id = given;
  }
  if (id.empty()) id = NewRequestId();
  context->AddInitialMetadata(kRequestIdKey, id);
  return id;
}

void GradientServiceImpl::FinishCall(Method method, grpc::CallbackServerContext* context,
                                     grpc::ServerUnaryReactor* reactor,
                                     const std::string& request_id, size_t request_bytes,
                                     size_t response_bytes, const absl::Status& status,
                                     const CallTimes& times, spdlog::level::level_enum level) {
  const std::string& name = metrics_.method_name(method);
  spdlog::log(level,
              "{} id={} peer={} request_bytes={} response_bytes={} queue_ms={} decode_ms={} "
              "compute_ms={} encode_ms={} total_ms={} status={}{}{}",
              name, request_id, context->peer(), request_bytes, response_bytes,
              Millis(times[Phase::kQueue]), Millis(times[Phase::kDecode]),
              Millis(times[Phase::kCompute]), Millis(times[Phase::kEncode]),
              Millis(times[Phase::kTotal]), absl::StatusCodeToString(status.code()),
              status.ok() ? "" : " error=", std::string(status.message()));
  metrics_.RecordCall(method, static_cast<int>(status.code()), times);
  reactor->Finish(ToGrpcStatus(status));
}

template <typename Request, typename Response, typename Compute>
grpc::ServerUnaryReactor* GradientServiceImpl::Dispatch(Method method,
                                                        grpc::CallbackServerContext* context,
                                                        const Request* request, Response* response,
                                                        double flops, Compute compute) {
  const Clock::time_point received = Clock::now();
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::string request_id = AssignRequestId(context);
  auto run = [this, method, context, request, response, reactor, received, compute,
              request_id](int cores) {
    CallTimes times;
    times[Phase::kQueue] = Seconds(Clock::now() - received);
    PhaseTimes phases;
    ComputeContext compute_context;
    compute_context.threads = cores;
    compute_context.should_stop = [context] {
      return context->IsCancelled() || std::chrono::system_clock::now() > context->deadline();
    };
    compute_context.phase_times = &phases;
    absl::Status status = compute(*request, compute_context, response);
    if (absl::IsCancelled(status) && std::chrono::system_clock::now() > context->deadline()) {
      status = absl::DeadlineExceededError("the deadline passed while computing; it was abandoned");
    }
    times[Phase::kDecode] = phases.decode;
    times[Phase::kCompute] = phases.compute;
    times[Phase::kEncode] = phases.encode;
    // Sizes before the total: ByteSizeLong walks the whole response.
    const size_t request_bytes = request->ByteSizeLong();
    const size_t response_bytes = status.ok() ? response->ByteSizeLong() : 0;
    times[Phase::kTotal] = Seconds(Clock::now() - received);
    --calls_in_flight_;
    FinishCall(method, context, reactor, request_id, request_bytes, response_bytes, status, times);
  };
  ++calls_in_flight_;
  const int cores = flops >= options_.parallel_threshold_flops ? options_.threads : 1;
  if (!scheduler_.TrySubmit(cores, std::move(run))) {
    --calls_in_flight_;
    CallTimes times;
    times[Phase::kTotal] = Seconds(Clock::now() - received);
    FinishCall(method, context, reactor, request_id, request->ByteSizeLong(), 0,
               absl::ResourceExhaustedError(
                   absl::StrCat("server busy: ", options_.max_queue,
                                " calls already wait for compute (max_queue); retry with backoff")),
               times, spdlog::level::warn);  // The server is overloaded: say so louder.
  }
  return reactor;
}

grpc::ServerUnaryReactor* GradientServiceImpl::ComputeGradients(
    grpc::CallbackServerContext* context, const v1::ComputeGradientsRequest* request,
    v1::ComputeGradientsResponse* response) {
  return Dispatch(kComputeGradients, context, request, response, ComputeGradientsCost(*request),
                  [this](const v1::ComputeGradientsRequest& r, const ComputeContext& c,
                         v1::ComputeGradientsResponse* out) {
                    return service::ComputeGradients(r, options_.limits, c, out);
                  });
}

grpc::ServerUnaryReactor* GradientServiceImpl::CheckGradients(
    grpc::CallbackServerContext* context, const v1::CheckGradientsRequest* request,
    v1::CheckGradientsResponse* response) {
  return Dispatch(kCheckGradients, context, request, response, CheckGradientsCost(*request),
                  [this](const v1::CheckGradientsRequest& r, const ComputeContext& c,
                         v1::CheckGradientsResponse* out) {
                    return service::CheckGradients(r, options_.limits, c, out);
                  });
}

grpc::ServerUnaryReactor* GradientServiceImpl::GetServerInfo(
    grpc::CallbackServerContext* context, const v1::GetServerInfoRequest* request,
    v1::GetServerInfoResponse* response) {
  // Cheap and constant: answered on the reaction thread, so it works even when the queue is full.
  const Clock::time_point received = Clock::now();
  const std::string request_id = AssignRequestId(context);
  service::GetServerInfo(options_.limits, options_.threads, response);
  CallTimes times;
  times[Phase::kTotal] = Seconds(Clock::now() - received);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  FinishCall(kGetServerInfo, context, reactor, request_id, request->ByteSizeLong(),
             response->ByteSizeLong(), absl::OkStatus(), times);
  return reactor;
}

void GradientServiceImpl::RecordUnauthenticated(std::string_view method) {
  for (int m : {kComputeGradients, kCheckGradients, kGetServerInfo, kGetStats}) {
    if (metrics_.method_name(m) == method) {
      metrics_.RecordCall(m, static_cast<int>(grpc::StatusCode::UNAUTHENTICATED), CallTimes());
    }
  }
}

MetricsSnapshot GradientServiceImpl::Stats() const {
  MetricsSnapshot snapshot = metrics_.Snapshot();
  snapshot.calls_in_flight = calls_in_flight_.load();
  snapshot.queue_length = scheduler_.queued();
  return snapshot;
}

grpc::ServerUnaryReactor* GradientServiceImpl::GetStats(grpc::CallbackServerContext* context,
                                                        const v1::GetStatsRequest* request,
                                                        v1::GetStatsResponse* response) {
  // Like GetServerInfo, answered on the reaction thread: it reports on a full queue too.
  const Clock::time_point received = Clock::now();
  const std::string request_id = AssignRequestId(context);
  const MetricsSnapshot snapshot = Stats();
  for (const MethodSnapshot& method : snapshot.methods) {
    v1::MethodStats* out = response->add_methods();
    out->set_method(method.method);
    out->set_calls(method.calls());
    for (int code = 0; code < kNumStatusCodes; ++code) {
      if (method.calls_by_code[code] == 0) continue;
      v1::StatusCount* count = out->add_by_code();
      count->set_code(std::string(StatusCodeName(code)));
      count->set_calls(method.calls_by_code[code]);
    }
    ToProto(method.phases[static_cast<int>(Phase::kTotal)], out->mutable_total());
    ToProto(method.phases[static_cast<int>(Phase::kQueue)], out->mutable_queue());
    ToProto(method.phases[static_cast<int>(Phase::kDecode)], out->mutable_decode());
    ToProto(method.phases[static_cast<int>(Phase::kCompute)], out->mutable_compute());
    ToProto(method.phases[static_cast<int>(Phase::kEncode)], out->mutable_encode());
  }
  response->set_calls_in_flight(snapshot.calls_in_flight);
  response->set_queue_length(snapshot.queue_length);
  response->set_process_start_time_seconds(snapshot.process_start_time_seconds);
  response->set_uptime_seconds(snapshot.uptime_seconds);
  CallTimes times;
  times[Phase::kTotal] = Seconds(Clock::now() - received);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  FinishCall(kGetStats, context, reactor, request_id, request->ByteSizeLong(),
             response->ByteSizeLong(), absl::OkStatus(), times);
  return reactor;
}

}  // namespace gradserve::service
