#include "server/service/gradient_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <random>

#include "absl/strings/str_cat.h"
#include "server/service/compute.h"
#include "server/service/stream.h"

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
      metrics_(
          {"ComputeGradients", "CheckGradients", "GetServerInfo", "GetStats", "StreamGradients"}),
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

void GradientServiceImpl::LogCall(Method method, grpc::CallbackServerContext* context,
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
}

void GradientServiceImpl::FinishCall(Method method, grpc::CallbackServerContext* context,
                                     grpc::ServerUnaryReactor* reactor,
                                     const std::string& request_id, size_t request_bytes,
                                     size_t response_bytes, const absl::Status& status,
                                     const CallTimes& times, spdlog::level::level_enum level) {
  LogCall(method, context, request_id, request_bytes, response_bytes, status, times, level);
  reactor->Finish(ToGrpcStatus(status));
}

int GradientServiceImpl::CoresFor(double flops) const {
  return flops >= options_.parallel_threshold_flops ? options_.threads : 1;
}

absl::Status GradientServiceImpl::QueueFullError() const {
  return absl::ResourceExhaustedError(
      absl::StrCat("server busy: ", options_.max_queue,
                   " calls already wait for compute (max_queue); retry with backoff"));
}

namespace {

// Polled between layers: the client went away or the deadline passed.
std::function<bool()> StopWhenDone(grpc::CallbackServerContext* context) {
  return [context] {
    return context->IsCancelled() || std::chrono::system_clock::now() > context->deadline();
  };
}

// The engine says CANCELLED for both; the deadline is the more useful answer when it passed.
absl::Status WithDeadline(absl::Status status, grpc::CallbackServerContext* context) {
  if (absl::IsCancelled(status) && std::chrono::system_clock::now() > context->deadline()) {
    return absl::DeadlineExceededError("the deadline passed while computing; it was abandoned");
  }
  return status;
}

// What one computation on the scheduler needs: its context (cores, cancellation) and its
// times, the queue wait from `queued` on, then the phases ComputeGradients & co. report.
class TimedCompute {
 public:
  TimedCompute(grpc::CallbackServerContext* context, int cores, Clock::time_point queued) {
    times_[Phase::kQueue] = Seconds(Clock::now() - queued);
    context_.threads = cores;
    context_.should_stop = StopWhenDone(context);
    context_.phase_times = &phases_;
  }
  TimedCompute(const TimedCompute&) = delete;
  TimedCompute& operator=(const TimedCompute&) = delete;

  const ComputeContext& context() const { return context_; }
  // The queue wait and the phases the computation reached.
  CallTimes times() const {
    CallTimes times = times_;
    times[Phase::kDecode] = phases_.decode;
    times[Phase::kCompute] = phases_.compute;
    times[Phase::kEncode] = phases_.encode;
    return times;
  }

 private:
  CallTimes times_;
  PhaseTimes phases_;
  ComputeContext context_;
};

}  // namespace

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
    const TimedCompute timed(context, cores, received);
    const absl::Status status = WithDeadline(compute(*request, timed.context(), response), context);
    CallTimes times = timed.times();
    // Sizes before the total: ByteSizeLong walks the whole response.
    const size_t request_bytes = request->ByteSizeLong();
    const size_t response_bytes = status.ok() ? response->ByteSizeLong() : 0;
    times[Phase::kTotal] = Seconds(Clock::now() - received);
    --calls_in_flight_;
    FinishCall(method, context, reactor, request_id, request_bytes, response_bytes, status, times);
  };
  ++calls_in_flight_;
  if (!scheduler_.TrySubmit(CoresFor(flops), std::move(run))) {
    --calls_in_flight_;
    CallTimes times;
    times[Phase::kTotal] = Seconds(Clock::now() - received);
    FinishCall(method, context, reactor, request_id, request->ByteSizeLong(), 0, QueueFullError(),
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
  for (int m : {kComputeGradients, kCheckGradients, kGetServerInfo, kGetStats, kStreamGradients}) {
    if (metrics_.method_name(m) == method) {
      metrics_.RecordCall(m, static_cast<int>(grpc::StatusCode::UNAUTHENTICATED), CallTimes());
    }
  }
}

MetricsSnapshot GradientServiceImpl::Stats() const {
  MetricsSnapshot snapshot = metrics_.Snapshot();
  snapshot.calls_in_flight = calls_in_flight_.load();
  snapshot.queue_length = scheduler_.queued();
  snapshot.open_streams = open_streams_.load();
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
  response->set_open_streams(snapshot.open_streams);
  response->set_process_start_time_seconds(snapshot.process_start_time_seconds);
  response->set_uptime_seconds(snapshot.uptime_seconds);
  CallTimes times;
  times[Phase::kTotal] = Seconds(Clock::now() - received);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  FinishCall(kGetStats, context, reactor, request_id, request->ByteSizeLong(),
             response->ByteSizeLong(), absl::OkStatus(), times);
  return reactor;
}

// One StreamGradients call. It reads a message, handles it (a step on the scheduler like a
// unary call, setup and chunks right here on the gRPC thread: they only move bytes), writes the
// answer if there is one, then reads the next message. One operation at a time, so the session
// is never touched by two threads at once and answers leave in the order steps came.
class GradientServiceImpl::StreamReactor final
    : public grpc::ServerBidiReactor<v1::StreamGradientsRequest, v1::StreamGradientsResponse> {
 public:
  StreamReactor(GradientServiceImpl* service, grpc::CallbackServerContext* context)
      : service_(service),
        context_(context),
        session_(service->options_.limits),
        started_(Clock::now()),
        request_id_(AssignRequestId(context)) {
    if (++service_->open_streams_ > service_->options_.limits.max_streams) {
      --service_->open_streams_;
      counted_ = false;
      End(absl::ResourceExhaustedError(absl::StrCat(
              "server busy: ", service_->options_.limits.max_streams,
              " streams are open (max_streams); retry with backoff or use unary calls")),
          spdlog::level::warn);
      return;
    }
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    // The client half-closed (every step sent has been answered by now) or went away.
    if (!ok) return End(absl::OkStatus());
    request_bytes_ += request_.ByteSizeLong();
    if (!request_.has_step()) {
      absl::StatusOr<bool> answered = session_.Handle(&request_, ComputeContext(), &response_);
      if (!answered.ok()) return End(answered.status());
      StartRead(&request_);
      return;
    }
    queued_ = Clock::now();
    ++service_->calls_in_flight_;
    if (!service_->scheduler_.TrySubmit(service_->CoresFor(session_.Cost(request_)),
                                        [this](int cores) { RunStep(cores); })) {
      --service_->calls_in_flight_;
      End(service_->QueueFullError(), spdlog::level::warn);
    }
  }

  void OnWriteDone(bool ok) override {
    if (!ok) return End(absl::CancelledError("the client went away"));
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  void RunStep(int cores) {
    const TimedCompute timed(context_, cores, queued_);
    response_.Clear();
    const absl::StatusOr<bool> answered = session_.Handle(&request_, timed.context(), &response_);
    service_->metrics_.RecordPhases(kStreamGradients, timed.times());
    --service_->calls_in_flight_;
    if (!answered.ok()) return End(WithDeadline(answered.status(), context_));
    if (!*answered) {
      StartRead(&request_);
      return;
    }
    response_bytes_ += response_.ByteSizeLong();
    StartWrite(&response_);
  }

  // Logs and counts the stream as one call and finishes it.
  void End(absl::Status status, spdlog::level::level_enum level = spdlog::level::info) {
    if (status.ok() && context_->IsCancelled()) {
      status = std::chrono::system_clock::now() > context_->deadline()
                   ? absl::DeadlineExceededError("the stream's deadline passed")
                   : absl::CancelledError("the client cancelled the stream");
    }
    CallTimes times;
    times[Phase::kTotal] = Seconds(Clock::now() - started_);
    service_->LogCall(kStreamGradients, context_, request_id_, request_bytes_, response_bytes_,
                      status, times, level);
    spdlog::debug("StreamGradients id={} messages={} steps={}", request_id_, session_.messages(),
                  session_.steps());
    // No longer open once its status is on the way (OnDone comes later, on another thread), so
    // a client that saw the status and opens a new stream finds the slot free.
    if (counted_) --service_->open_streams_;
    counted_ = false;
    Finish(ToGrpcStatus(status));
  }

  GradientServiceImpl* const service_;
  grpc::CallbackServerContext* const context_;
  StreamSession session_;
  const Clock::time_point started_;
  const std::string request_id_;
  bool counted_ = true;  // Whether this stream counts in open_streams_.
  Clock::time_point queued_;
  size_t request_bytes_ = 0;
  size_t response_bytes_ = 0;
  v1::StreamGradientsRequest request_;
  v1::StreamGradientsResponse response_;
};

grpc::ServerBidiReactor<v1::StreamGradientsRequest, v1::StreamGradientsResponse>*
GradientServiceImpl::StreamGradients(grpc::CallbackServerContext* context) {
  return new StreamReactor(this, context);
}

}  // namespace gradserve::service
