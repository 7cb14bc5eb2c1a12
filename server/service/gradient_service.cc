#include "server/service/gradient_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/engine/status_macros.h"
#include "server/engine/types.h"
#include "server/service/compute.h"
#include "server/service/convert.h"
#include "server/service/stream.h"

namespace gradserve::service {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration duration) { return std::chrono::duration<double>(duration).count(); }

absl::Status ShuttingDownError() {
  return absl::UnavailableError(
      "the server is shutting down; retry the call (another replica will answer it)");
}

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
      memory_(options.limits.max_memory_bytes),
      scheduler_(ComputeScheduler::Options{.cores = options.threads,
                                           .max_queue = options.max_queue,
                                           .max_queue_per_client = options.max_queue_per_client}) {
  sweeper_ = std::thread([this] { SweepStreams(); });
}

GradientServiceImpl::~GradientServiceImpl() {
  {
    std::lock_guard<std::mutex> lock(streams_mutex_);
    stop_sweeper_ = true;
  }
  sweep_.notify_all();
  sweeper_.join();
}

std::string GradientServiceImpl::AssignRequestId(grpc::CallbackServerContext* context) {
  std::string id;
  const auto& metadata = context->client_metadata();
  if (const auto it = metadata.find(kRequestIdKey); it != metadata.end()) {
    const std::string_view given(it->second.data(), it->second.size());
    if (IsValidRequestId(given)) id = given;
  }
  if (id.empty()) id = NewRequestId();
  return id;
}

void GradientServiceImpl::EchoRequestId(grpc::CallbackServerContext* context,
                                        const std::string& request_id, const absl::Status& status) {
  // gRPC clients retry only calls whose answer carried no initial metadata (a "trailers-only"
  // answer): a call refused with UNAVAILABLE gets its id in the trailers, so that the caller's
  // retry policy can send it to another replica.
  if (absl::IsUnavailable(status)) {
    context->AddTrailingMetadata(kRequestIdKey, request_id);
  } else {
    context->AddInitialMetadata(kRequestIdKey, request_id);
  }
}

void GradientServiceImpl::LogCall(Method method, grpc::CallbackServerContext* context,
                                  const std::string& request_id, size_t request_bytes,
                                  size_t response_bytes, const absl::Status& status,
                                  const CallTimes& times, spdlog::level::level_enum level) {
  ++calls_ended_;
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

int GradientServiceImpl::CoresFor(double flops) const {
  return flops >= options_.parallel_threshold_flops ? options_.threads : 1;
}

absl::Status GradientServiceImpl::AdmissionError(ComputeScheduler::Admission admission) const {
  switch (admission) {
    case ComputeScheduler::Admission::kAccepted:
      return absl::OkStatus();
    case ComputeScheduler::Admission::kQueueFull:
      return absl::ResourceExhaustedError(
          absl::StrCat("server busy: ", options_.max_queue,
                       " calls already wait for compute (max_queue); retry with backoff"));
    case ComputeScheduler::Admission::kClientQueueFull:
      return absl::ResourceExhaustedError(absl::StrCat(
          "server busy for this client: ", options_.max_queue_per_client,
          " of its calls already wait for compute (max_queue_per_client); retry with backoff"));
    case ComputeScheduler::Admission::kStopping:
      break;
  }
  return ShuttingDownError();
}

absl::Status GradientServiceImpl::CheckAdmissible(
    double flops, const std::function<absl::Status()>& claimed_sizes) const {
  if (refusing_) return ShuttingDownError();
  if (flops > options_.limits.max_call_flops) {
    if (claimed_sizes) RETURN_IF_ERROR(claimed_sizes());
    return absl::ResourceExhaustedError(
        absl::StrCat("this call is estimated at ", fmt::format("{:.3g}", flops),
                     " floating-point operations, over max_call_flops (",
                     fmt::format("{:.3g}", options_.limits.max_call_flops),
                     "); split the batch (the gradients of parts add up) or send fewer samples"));
  }
  return absl::OkStatus();
}

void GradientServiceImpl::RefuseNewCalls() {
  std::vector<ArrivingCall*> claimed;
  {
    std::lock_guard<std::mutex> lock(arriving_mutex_);
    if (refusing_.exchange(true)) return;
    // Calls whose message is still on the way would be refused once it is here: refused now,
    // they need not wait for it, and none is left for gRPC's shutdown to cancel.
    for (ArrivingCall* call : arriving_) {
      if (call->Claim()) claimed.push_back(call);
    }
    arriving_.clear();
  }
  for (ArrivingCall* call : claimed) call->EndClaimed(ShuttingDownError());
  sweep_.notify_all();  // Streams waiting for their client end now.
}

void GradientServiceImpl::AbandonCalls() {
  RefuseNewCalls();
  abandoning_ = true;
  const int dropped = scheduler_.DropQueued(ShuttingDownError());
  if (dropped > 0) {
    spdlog::warn("shutdown grace over: {} calls still waiting for compute got UNAVAILABLE",
                 dropped);
  }
}

namespace {

// Why a call stopped early: the caller cancelled, the deadline (the caller's or
// max_call_seconds) passed, or the server is shutting down and abandoned it.
class CallLimits {
 public:
  CallLimits(grpc::CallbackServerContext* context, double max_call_seconds,
             const std::atomic<bool>* abandoning, Clock::time_point start = Clock::now())
      : context_(context), abandoning_(abandoning), max_call_seconds_(max_call_seconds) {
    const auto cap = start + std::chrono::duration_cast<Clock::duration>(
                                 std::chrono::duration<double>(max_call_seconds));
    const auto client_left = context->deadline() - std::chrono::system_clock::now();
    // A call without a deadline has system_clock's maximum: the cap decides.
    capped_ = client_left > cap - Clock::now();
    deadline_ =
        capped_ ? cap : Clock::now() + std::chrono::duration_cast<Clock::duration>(client_left);
  }

  // Polled between layers (and by the planner): true abandons the computation.
  bool ShouldStop() const {
    return context_->IsCancelled() || Clock::now() > deadline_ || abandoning_->load();
  }
  // The status of a computation that stopped (the engine says CANCELLED for all of these).
  absl::Status Why(absl::Status status) const {
    if (!absl::IsCancelled(status)) return status;
    if (abandoning_->load()) return ShuttingDownError();
    if (Clock::now() > deadline_) {
      return absl::DeadlineExceededError(
          capped_ ? absl::StrCat("the call ran past max_call_seconds (",
                                 fmt::format("{:g}", max_call_seconds_), " s) and was abandoned")
                  : std::string("the deadline passed; the call was abandoned"));
    }
    return status;
  }

 private:
  grpc::CallbackServerContext* const context_;
  const std::atomic<bool>* const abandoning_;
  const double max_call_seconds_;
  Clock::time_point deadline_;
  bool capped_ = false;
};

// What one computation on the scheduler needs: its context (cores, cancellation) and its
// times, the queue wait from `queued` on, then the phases ComputeGradients & co. report.
class TimedCompute {
 public:
  TimedCompute(const CallLimits* limits, int cores, Clock::time_point queued) {
    times_[Phase::kQueue] = Seconds(Clock::now() - queued);
    context_.threads = cores;
    context_.should_stop = [limits] { return limits->ShouldStop(); };
    context_.phase_times = &phases_;
  }
  TimedCompute(const TimedCompute&) = delete;
  TimedCompute& operator=(const TimedCompute&) = delete;

  const ComputeContext& context() const { return context_; }
  void set_reserve_memory(std::function<absl::Status(int64_t)> reserve) {
    context_.reserve_memory = std::move(reserve);
  }
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

// Note [Admission at the headers]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// gRPC starts a unary callback handler only once the whole request has arrived and been parsed,
// so every check a handler makes comes after the server has received, buffered and parsed up to
// max_message_bytes. Under attack that work was the damage: eight clients without a token sending
// 200 MiB requests took an innocent client's p99 from 1.5 ms to over a second (and RSS up by
// 2 GB), and a client sending 80 calls of 12 MB at once, refused for its share of the queue,
// took it to 17 ms. So ComputeGradients and CheckGradients, the methods whose messages can be
// large, are served as generic calls (grpc::CallbackGenericService): their reactor exists once
// the headers are in, and a call that would be refused whatever its message says (no valid token,
// the server shutting down, its client's share of the queue full) is finished before its first
// read. The client then stops sending (gRPC resets the stream), and the server has read at most
// one flow-control window of it. A call let through holds its place in its client's queue from its
// headers on (Note [Places held while a message arrives] in scheduler.h), is read and parsed like
// gRPC would, and goes on exactly as before. The generated handlers of these methods stay
// registered as generic (Service::MarkMethodGeneric), so reflection and the health service still
// describe GradientService as a whole.

// One ComputeGradients or CheckGradients call (Note [Admission at the headers]): reads its one
// message, parses it and hands it to Dispatch. Holds its place in its client's queue until it is
// queued, and its memory reservation until gRPC is done with the call (the client took the
// answer, or the call ended otherwise).
template <typename Request, typename Response>
class GradientServiceImpl::UnaryCall final : public grpc::ServerGenericBidiReactor,
                                             public ArrivingCall {
 public:
  UnaryCall(GradientServiceImpl* service, Method method,
            grpc::GenericCallbackServerContext* context, std::string request_id,
            ComputeScheduler::Place place)
      : service_(service),
        method_(method),
        context_(context),
        request_id_(std::move(request_id)),
        place_(std::move(place)),
        memory_(&service->memory_) {
    StartRead(&buffer_);
  }

  // Whether the call was registered as arriving: false if the shutdown had begun (nothing then
  // is registered), and the caller must end it.
  bool RegisterArriving() {
    std::lock_guard<std::mutex> lock(service_->arriving_mutex_);
    if (service_->refusing_) return false;
    service_->arriving_.insert(this);
    return true;
  }

  grpc::CallbackServerContext* context() const { return context_; }
  const Request& request() const { return request_; }
  Request* mutable_request() { return &request_; }
  Response* response() { return &response_; }
  ComputeScheduler::Place* place() { return &place_; }
  // Adds to what this call holds; RESOURCE_EXHAUSTED (nothing added) if it does not fit.
  absl::Status Reserve(int64_t bytes, const char* what) { return memory_.Add(bytes, what); }

  void OnReadDone(bool ok) override {
    const Clock::time_point received = Clock::now();
    if (!Claim()) return;  // The shutdown ended it.
    {
      std::lock_guard<std::mutex> lock(service_->arriving_mutex_);
      service_->arriving_.erase(this);
    }
    if (!ok) {
      // The client went away while sending its message, or half-closed without one.
      return Answer(context_->IsCancelled()
                        ? absl::CancelledError("the client cancelled the call before its "
                                               "message arrived")
                        : absl::InvalidArgumentError("the call carried no request message"),
                    0, 0, received, spdlog::level::warn);
    }
    const size_t request_bytes = buffer_.Length();
    // The message is here; its parsed copy is about to be (Note [Memory budget]).
    if (absl::Status fits = Reserve(static_cast<int64_t>(request_bytes), "this call's request");
        !fits.ok()) {
      return Answer(fits, request_bytes, 0, received, spdlog::level::warn);
    }
    // What gRPC's handler would have done: parse, and free the received bytes.
    if (!grpc::SerializationTraits<Request>::Deserialize(&buffer_, &request_).ok()) {
      return Answer(absl::InvalidArgumentError(absl::StrCat("the request is not a valid ",
                                                            Request::descriptor()->full_name(),
                                                            " message (protobuf binary encoding)")),
                    request_bytes, 0, received, spdlog::level::warn);
    }
    service_->Dispatch(this, request_bytes, received);
  }

  // Logs and counts the call, and sends its answer: the response if `status` is OK, else the
  // error. Once per call.
  void Answer(const absl::Status& status, size_t request_bytes, size_t response_bytes,
              const CallTimes& times, spdlog::level::level_enum level = spdlog::level::info) {
    place_.GiveBack();
    EchoRequestId(context_, request_id_, status);
    service_->LogCall(method_, context_, request_id_, request_bytes, response_bytes, status, times,
                      level);
    if (!status.ok()) return Finish(ToGrpcStatus(status));
    bool own_buffer = false;
    const grpc::Status serialized =
        grpc::SerializationTraits<Response>::Serialize(response_, &buffer_, &own_buffer);
    if (!serialized.ok()) return Finish(serialized);
    response_.Clear();  // The bytes are in buffer_ now; the answer's memory stays reserved.
    finished_.store(true, std::memory_order_release);
    StartWriteAndFinish(&buffer_, grpc::WriteOptions(), grpc::Status::OK);
  }
  void Finish(const grpc::Status& status) {
    finished_.store(true, std::memory_order_release);
    grpc::ServerGenericBidiReactor::Finish(status);
  }
  void EndClaimed(const absl::Status& status) override {
    Answer(status, 0, 0, started_, spdlog::level::warn);
  }

  // A call that ends before its computation: its total time is from `received` to now.
  void Answer(const absl::Status& status, size_t request_bytes, size_t response_bytes,
              Clock::time_point received, spdlog::level::level_enum level) {
    CallTimes times;
    times[Phase::kTotal] = Seconds(Clock::now() - received);
    Answer(status, request_bytes, response_bytes, times, level);
  }

  // The reservation ends with it. The request and the answer are freed once this returns; the
  // sweeper gives what glibc keeps of them back to the system (Note [Memory budget]).
  void OnDone() override {
    // gRPC runs this after the Finish, maybe on another thread, ordered by its own
    // synchronization, which ThreadSanitizer cannot see in the uninstrumented library: this
    // acquire pairs with the release before Finish, so that it sees every write made to the
    // call (the request parsed on one thread, the answer built on another) before it is freed.
    (void)finished_.load(std::memory_order_acquire);
    delete this;
  }

 private:
  GradientServiceImpl* const service_;
  const Method method_;
  grpc::GenericCallbackServerContext* const context_;
  const Clock::time_point started_ = Clock::now();
  const std::string request_id_;
  ComputeScheduler::Place place_;
  MemoryReservation memory_;
  grpc::ByteBuffer buffer_;  // The request as it arrived, then the answer as it leaves.
  std::atomic<bool> finished_{false};
  Request request_;
  Response response_;
};

namespace {

constexpr char kComputeGradientsPath[] = "/gradserve.v1.GradientService/ComputeGradients";
constexpr char kCheckGradientsPath[] = "/gradserve.v1.GradientService/CheckGradients";

}  // namespace

bool GradientServiceImpl::ServesAtHeaders(std::string_view path) {
  return path == kComputeGradientsPath || path == kCheckGradientsPath;
}

double GradientServiceImpl::CostOf(const v1::ComputeGradientsRequest& request) {
  return ComputeGradientsCost(request);
}
double GradientServiceImpl::CostOf(const v1::CheckGradientsRequest& request) {
  return CheckGradientsCost(request);
}
absl::Status GradientServiceImpl::Compute(v1::ComputeGradientsRequest* request,
                                          const ComputeContext& context,
                                          v1::ComputeGradientsResponse* response) const {
  return service::ComputeGradients(request, options_.limits, context, response);
}
absl::Status GradientServiceImpl::Compute(v1::CheckGradientsRequest* request,
                                          const ComputeContext& context,
                                          v1::CheckGradientsResponse* response) const {
  return service::CheckGradients(request, options_.limits, context, response);
}

grpc::ServerGenericBidiReactor* GradientServiceImpl::StartCallAtHeaders(
    grpc::GenericCallbackServerContext* context) {
  const Clock::time_point arrived = Clock::now();
  const bool compute = context->method() == kComputeGradientsPath;
  if (!compute && context->method() != kCheckGradientsPath) {
    return new RefusedCallAtHeaders(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, ""));
  }
  const Method method = compute ? kComputeGradients : kCheckGradients;
  std::string request_id = AssignRequestId(context);
  ComputeScheduler::Place place;
  absl::Status admitted = refusing_ ? ShuttingDownError() : absl::OkStatus();
  if (admitted.ok()) {
    admitted = AdmissionError(scheduler_.Reserve(ClientKey(context->peer()), &place));
  }
  if (!admitted.ok()) {
    EchoRequestId(context, request_id, admitted);
    CallTimes times;
    times[Phase::kTotal] = Seconds(Clock::now() - arrived);
    LogCall(method, context, request_id, 0, 0, admitted, times, spdlog::level::warn);
    return new RefusedCallAtHeaders(ToGrpcStatus(admitted));
  }
  if (compute) {
    return Arrive(new UnaryCall<v1::ComputeGradientsRequest, v1::ComputeGradientsResponse>(
        this, method, context, std::move(request_id), std::move(place)));
  }
  return Arrive(new UnaryCall<v1::CheckGradientsRequest, v1::CheckGradientsResponse>(
      this, method, context, std::move(request_id), std::move(place)));
}

template <typename Call>
Call* GradientServiceImpl::Arrive(Call* call) {
  if (!call->RegisterArriving() && call->Claim()) call->EndClaimed(ShuttingDownError());
  return call;
}

template <typename Request, typename Response>
void GradientServiceImpl::Dispatch(UnaryCall<Request, Response>* call, size_t request_bytes,
                                   Clock::time_point received) {
  grpc::CallbackServerContext* const context = call->context();
  const Request* request = &call->request();
  const double flops = CostOf(*request);
  auto refuse = [&](const absl::Status& status) {
    // Overload, limits, shutdown: say so louder.
    call->Answer(status, request_bytes, 0, received, spdlog::level::warn);
  };
  const auto claimed_sizes = [this, request] {
    return CheckClaimedSizes(*request, options_.limits);
  };
  if (absl::Status admissible = CheckAdmissible(flops, claimed_sizes); !admissible.ok()) {
    return refuse(admissible);
  }
  // The request is already counted (UnaryCall); the answer will be (Note [Memory budget]).
  if (absl::Status fits =
          call->Reserve(ResponseBytesBound(*request, options_.limits), "this call's answer");
      !fits.ok()) {
    return refuse(fits);
  }

  auto limits = std::make_shared<const CallLimits>(context, options_.limits.max_call_seconds,
                                                   &abandoning_, received);
  ComputeScheduler::Call queued;
  queued.client = ClientKey(context->peer());
  queued.cores = CoresFor(flops);
  queued.run = [this, call, received, request_bytes, limits](int cores) {
    TimedCompute timed(limits.get(), cores, received);
    timed.set_reserve_memory([call](int64_t bytes) {
      return call->Reserve(bytes, "this call's activations and workspace");
    });
    const absl::Status status =
        limits->Why(Compute(call->mutable_request(), timed.context(), call->response()));
    CallTimes times = timed.times();
    // Before the total: ByteSizeLong walks the whole response.
    const size_t response_bytes = status.ok() ? call->response()->ByteSizeLong() : 0;
    times[Phase::kTotal] = Seconds(Clock::now() - received);
    --calls_in_flight_;
    call->Answer(status, request_bytes, response_bytes, times);
  };
  // Dropped unrun: shutdown, or nobody waits for it any more.
  queued.drop = [this, call, received, request_bytes, limits](const absl::Status& status) {
    CallTimes times;
    times[Phase::kQueue] = times[Phase::kTotal] = Seconds(Clock::now() - received);
    --calls_in_flight_;
    call->Answer(absl::IsDeadlineExceeded(status)
                     ? limits->Why(absl::CancelledError("the client cancelled the call"))
                     : status,
                 request_bytes, 0, times);
  };
  queued.abandoned = [limits] { return limits->ShouldStop(); };
  ++calls_in_flight_;
  if (const auto admission = scheduler_.TrySubmit(std::move(queued), call->place());
      admission != ComputeScheduler::Admission::kAccepted) {
    --calls_in_flight_;
    return refuse(AdmissionError(admission));
  }
}

template <typename Request, typename Response, typename Fill>
grpc::ServerUnaryReactor* GradientServiceImpl::AnswerInline(Method method,
                                                            grpc::CallbackServerContext* context,
                                                            const Request* request,
                                                            Response* response, Fill fill) {
  const Clock::time_point received = Clock::now();
  const std::string request_id = AssignRequestId(context);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Status status = refusing_ ? ShuttingDownError() : absl::OkStatus();
  if (status.ok()) fill();
  CallTimes times;
  times[Phase::kTotal] = Seconds(Clock::now() - received);
  EchoRequestId(context, request_id, status);
  LogCall(method, context, request_id, request->ByteSizeLong(),
          status.ok() ? response->ByteSizeLong() : 0, status, times);
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

grpc::ServerUnaryReactor* GradientServiceImpl::GetServerInfo(
    grpc::CallbackServerContext* context, const v1::GetServerInfoRequest* request,
    v1::GetServerInfoResponse* response) {
  // Cheap and constant: answered on the reaction thread, so it works even when the queue is full.
  return AnswerInline(kGetServerInfo, context, request, response, [this, response] {
    service::GetServerInfo(options_.limits, options_.threads, response);
    response->mutable_limits()->set_max_queue(options_.max_queue);
    response->mutable_limits()->set_max_queue_per_client(options_.max_queue_per_client);
  });
}

void GradientServiceImpl::RecordUnauthenticated(std::string_view method) {
  ++calls_ended_;
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
  snapshot.memory_in_use_bytes = memory_.in_use();
  return snapshot;
}

grpc::ServerUnaryReactor* GradientServiceImpl::GetStats(grpc::CallbackServerContext* context,
                                                        const v1::GetStatsRequest* request,
                                                        v1::GetStatsResponse* response) {
  // Like GetServerInfo, answered on the reaction thread: it reports on a full queue too.
  return AnswerInline(kGetStats, context, request, response, [this, response] {
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
    response->set_memory_in_use_bytes(snapshot.memory_in_use_bytes);
    response->set_process_start_time_seconds(snapshot.process_start_time_seconds);
    response->set_uptime_seconds(snapshot.uptime_seconds);
  });
}

// One StreamGradients call. It reads a message, handles it (a step on the scheduler like a
// unary call, setup and chunks right here on the gRPC thread: they only move bytes), writes the
// answer if there is one, then reads the next message. One operation at a time, so the session
// is never touched by two threads at once and answers leave in the order steps came.
//
// Note [Stream lifetime]
// Besides the reactor's own callbacks, one other thread may end a stream: the sweeper, while the
// stream waits for its client's next message (idle past stream_idle_seconds, or the server is
// shutting down). Who goes on is settled by one compare-and-swap on state_: the sweeper moves
// kWaitingForClient to kEnded, OnReadDone moves it to kHandling; the loser does nothing more.
// The sweeper finds streams in a registry and holds a reference while it ends one, so OnDone
// (which unregisters, then drops gRPC's reference) never deletes a stream under its feet.
class GradientServiceImpl::StreamReactor final
    : public grpc::ServerBidiReactor<v1::StreamGradientsRequest, v1::StreamGradientsResponse> {
 public:
  enum State { kWaitingForClient, kHandling, kEnded };

  StreamReactor(GradientServiceImpl* service, grpc::CallbackServerContext* context)
      : service_(service),
        context_(context),
        client_(ClientKey(context->peer())),
        session_(service->options_.limits),
        session_memory_(&service->memory_),
        started_(Clock::now()),
        request_id_(AssignRequestId(context)) {
    absl::Status opened = service_->refusing_ ? ShuttingDownError() : service_->OpenStream(client_);
    EchoRequestId(context, request_id_, opened);
    if (!opened.ok()) {
      counted_ = false;
      registered_ = false;
      state_ = kHandling;
      End(opened, spdlog::level::warn);
      return;
    }
    service_->RegisterStream(this);
    Read();
  }

  void OnReadDone(bool ok) override {
    State expected = kWaitingForClient;
    if (!state_.compare_exchange_strong(expected, kHandling)) return;  // The sweeper ended it.
    // The client half-closed (every step sent has been answered by now) or went away.
    if (!ok) return End(absl::OkStatus());
    if (service_->refusing_) return End(ShuttingDownError());
    request_bytes_ += request_.ByteSizeLong();
    if (!request_.has_step()) {
      absl::StatusOr<bool> answered = session_.Handle(&request_, ComputeContext(), &response_);
      if (!answered.ok()) return End(answered.status());
      if (absl::Status held = HoldSessionMemory(); !held.ok()) return End(held);
      return Read();
    }
    const double flops = session_.Cost(request_);
    if (absl::Status admissible = service_->CheckAdmissible(flops); !admissible.ok()) {
      return End(admissible, spdlog::level::warn);
    }
    queued_ = Clock::now();
    step_limits_.emplace(context_, service_->options_.limits.max_call_seconds,
                         &service_->abandoning_, queued_);
    ComputeScheduler::Call call;
    call.client = client_;
    call.cores = service_->CoresFor(flops);
    call.run = [this](int cores) { RunStep(cores); };
    call.drop = [this](const absl::Status& status) {
      --service_->calls_in_flight_;
      End(absl::IsDeadlineExceeded(status)
              ? step_limits_->Why(absl::CancelledError("the client cancelled the stream"))
              : status);
    };
    call.abandoned = [this] { return step_limits_->ShouldStop(); };
    ++service_->calls_in_flight_;
    if (const auto admission = service_->scheduler_.TrySubmit(std::move(call));
        admission != ComputeScheduler::Admission::kAccepted) {
      --service_->calls_in_flight_;
      End(service_->AdmissionError(admission), spdlog::level::warn);
    }
  }

  void OnWriteDone(bool ok) override {
    if (!ok) return End(absl::CancelledError("the client went away"));
    Read();
  }

  void OnDone() override {
    if (registered_) service_->UnregisterStream(this);
    session_memory_.Release();
    Unref();
  }

  // The sweeper's side (Note [Stream lifetime]). Called with the registry locked: true if this
  // stream waited for its client since before `idle_since` (or at all, when `all`) and is now
  // the sweeper's to end; it then holds a reference for the sweeper.
  bool ClaimIfWaiting(Clock::time_point idle_since, bool all) {
    // Not while Read() is between setting the state and issuing the read; try_lock, as a
    // reactor thread may hold read_mutex_ and want the registry (End -> CloseStream).
    std::unique_lock<std::recursive_mutex> lock(read_mutex_, std::try_to_lock);
    if (!lock.owns_lock() || state_.load() != kWaitingForClient) return false;
    if (!all && waiting_since_.load() > idle_since) return false;
    State expected = kWaitingForClient;
    if (!state_.compare_exchange_strong(expected, kEnded)) return false;
    ++refs_;
    return true;
  }
  // Ends a stream claimed by ClaimIfWaiting and drops the sweeper's reference.
  void EndClaimed(const absl::Status& status) {
    End(status, spdlog::level::warn);
    Unref();
  }

 private:
  // The state and the read it announces change together under read_mutex_, so the sweeper
  // never finishes a stream whose read is not issued yet (reads must not start after Finish).
  // Recursive: should gRPC run OnReadDone inline inside StartRead, it may Read() again.
  void Read() {
    std::lock_guard<std::recursive_mutex> lock(read_mutex_);
    waiting_since_ = Clock::now();
    state_ = kWaitingForClient;
    StartRead(&request_);
  }

  // Keeps this stream's reservation equal to what its session holds (Note [Memory budget]).
  absl::Status HoldSessionMemory() {
    return session_memory_.Set(session_.held_bytes(), "this stream's state");
  }

  void RunStep(int cores) {
    TimedCompute timed(&*step_limits_, cores, queued_);
    MemoryReservation step_memory(&service_->memory_);
    timed.set_reserve_memory([&step_memory](int64_t bytes) {
      return step_memory.Add(bytes, "this step's activations and workspace");
    });
    response_.Clear();
    const absl::StatusOr<bool> answered = session_.Handle(&request_, timed.context(), &response_);
    step_memory.Release();
    service_->metrics_.RecordPhases(kStreamGradients, timed.times());
    --service_->calls_in_flight_;
    if (!answered.ok()) return End(step_limits_->Why(answered.status()));
    if (absl::Status held = HoldSessionMemory(); !held.ok()) return End(held);
    if (!*answered) return Read();
    response_bytes_ += response_.ByteSizeLong();
    StartWrite(&response_);
  }

  // Logs and counts the stream as one call and finishes it.
  void End(absl::Status status, spdlog::level::level_enum level = spdlog::level::info) {
    state_ = kEnded;
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
    if (counted_) service_->CloseStream(client_);
    counted_ = false;
    Finish(ToGrpcStatus(status));
  }

  void Unref() {
    if (--refs_ == 0) delete this;
  }

  GradientServiceImpl* const service_;
  grpc::CallbackServerContext* const context_;
  const std::string client_;
  StreamSession session_;
  MemoryReservation session_memory_;  // What the session holds, against the service's budget.
  const Clock::time_point started_;
  const std::string request_id_;
  bool counted_ = true;     // Whether this stream counts among the open ones.
  bool registered_ = true;  // Whether the sweeper knows it.
  std::atomic<State> state_{kHandling};
  std::atomic<Clock::time_point> waiting_since_{Clock::time_point()};
  std::atomic<int> refs_{1};  // gRPC's (until OnDone), and the sweeper's while it ends it.
  std::recursive_mutex read_mutex_;
  Clock::time_point queued_;
  std::optional<CallLimits> step_limits_;  // The step being computed.
  size_t request_bytes_ = 0;
  size_t response_bytes_ = 0;
  v1::StreamGradientsRequest request_;
  v1::StreamGradientsResponse response_;
};

absl::Status GradientServiceImpl::OpenStream(const std::string& client) {
  std::lock_guard<std::mutex> lock(streams_mutex_);
  if (open_streams_.load() >= options_.limits.max_streams) {
    return absl::ResourceExhaustedError(
        absl::StrCat("server busy: ", options_.limits.max_streams,
                     " streams are open (max_streams); retry with backoff or use unary calls"));
  }
  int64_t& mine = streams_by_client_[client];
  if (mine >= options_.limits.max_streams_per_client) {
    if (mine == 0) streams_by_client_.erase(client);
    return absl::ResourceExhaustedError(
        absl::StrCat("this client already has ", options_.limits.max_streams_per_client,
                     " streams open (max_streams_per_client); close one, or use unary calls"));
  }
  ++mine;
  ++open_streams_;
  return absl::OkStatus();
}

void GradientServiceImpl::CloseStream(const std::string& client) {
  std::lock_guard<std::mutex> lock(streams_mutex_);
  --open_streams_;
  if (const auto it = streams_by_client_.find(client);
      it != streams_by_client_.end() && --it->second <= 0) {
    streams_by_client_.erase(it);
  }
}

void GradientServiceImpl::RegisterStream(StreamReactor* stream) {
  std::lock_guard<std::mutex> lock(streams_mutex_);
  streams_.insert(stream);
}

void GradientServiceImpl::UnregisterStream(StreamReactor* stream) {
  std::lock_guard<std::mutex> lock(streams_mutex_);
  streams_.erase(stream);
}

namespace {
constexpr int64_t kTrimAfterReleasedBytes = int64_t{64} << 20;
}  // namespace

void GradientServiceImpl::SweepStreams() {
  const auto idle = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(options_.limits.stream_idle_seconds));
  // Often enough that a stream ends within a few percent of its idle limit (and at once on
  // shutdown), rarely enough to cost nothing.
  const auto period = std::clamp<Clock::duration>(idle / 20, std::chrono::milliseconds(10),
                                                  std::chrono::seconds(1));
  Clock::time_point last_trim = Clock::now();
  int64_t ended_at_last_trim = 0;
  std::unique_lock<std::mutex> lock(streams_mutex_);
  while (!stop_sweeper_) {
    // While shutting down, streams that finish a step are ended as soon as they wait again.
    sweep_.wait_for(lock, refusing_ ? std::chrono::milliseconds(10) : period);
    if (stop_sweeper_) break;
    const bool all = refusing_.load();
    const Clock::time_point idle_since = Clock::now() - idle;
    std::vector<StreamReactor*> claimed;
    for (StreamReactor* stream : streams_) {
      if (stream->ClaimIfWaiting(idle_since, all)) claimed.push_back(stream);
    }
    lock.unlock();
    // gRPC's receive buffers are many small blocks spread over its threads' heaps, which glibc
    // keeps after they are freed; returned here, off every call's path: after large releases,
    // and once calls have stopped (refused calls, unauthenticated ones, release nothing we count).
    const int64_t ended = calls_ended_.load();
    const bool quiet = calls_in_flight_.load() == 0 && ended != ended_at_last_trim;
    if (memory_.ReleasedAtLeast(kTrimAfterReleasedBytes) ||
        (quiet && Clock::now() - last_trim > std::chrono::seconds(2))) {
      ReturnFreeMemory();
      last_trim = Clock::now();
      ended_at_last_trim = ended;
    }
    for (StreamReactor* stream : claimed) {
      stream->EndClaimed(all ? ShuttingDownError()
                             : absl::DeadlineExceededError(absl::StrCat(
                                   "the stream waited over stream_idle_seconds (",
                                   fmt::format("{:g}", options_.limits.stream_idle_seconds),
                                   " s) for its next message and was closed; open a new one")));
    }
    lock.lock();
  }
}

grpc::ServerBidiReactor<v1::StreamGradientsRequest, v1::StreamGradientsResponse>*
GradientServiceImpl::StreamGradients(grpc::CallbackServerContext* context) {
  return new StreamReactor(this, context);
}

}  // namespace gradserve::service
