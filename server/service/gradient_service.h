// The gRPC face of gradserve.v1.GradientService: a thin callback service that hands each call
// to the ComputeScheduler, maps the result to a gRPC status in one place, and logs and counts
// every call (Note [Call phases] in metrics.h) under a request id.
#ifndef GRADSERVE_SERVICE_GRADIENT_SERVICE_H_
#define GRADSERVE_SERVICE_GRADIENT_SERVICE_H_

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <thread>

#include "absl/status/status.h"
#include "gradserve/v1/gradserve.grpc.pb.h"
#include "server/service/compute.h"
#include "server/service/limits.h"
#include "server/service/memory.h"
#include "server/service/metrics.h"
#include "server/service/scheduler.h"

namespace gradserve::service {

// The one place an engine/service error becomes a gRPC status: canonical codes map one to one.
grpc::Status ToGrpcStatus(const absl::Status& status);

// The metadata key that carries a call's request id, both ways.
inline constexpr char kRequestIdKey[] = "x-request-id";
// True iff `id` may be used as a request id: 1 to 128 visible ASCII characters (0x21 .. 0x7e),
// so it can be logged and echoed in a header as is.
bool IsValidRequestId(std::string_view id);
// A fresh request id: 16 lowercase hex digits (64 random bits). Thread-safe.
std::string NewRequestId();

// A call served at its headers (Note [Admission at the headers]) and finished with `status`
// before its first read.
class RefusedCallAtHeaders final : public grpc::ServerGenericBidiReactor {
 public:
  explicit RefusedCallAtHeaders(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

struct ServiceOptions {
  ServiceLimits limits;
  // Cores for compute: a large call uses all of them, small calls one each (Note [Scheduling]).
  int threads = 1;
  // Calls estimated at fewer floating-point operations run on one core.
  double parallel_threshold_flops = 2e7;
  int max_queue = 64;  // Calls waiting for cores before RESOURCE_EXHAUSTED.
  // Calls one client (IP address) may have waiting: half the queue by default, so one client
  // cannot fill it (Note [Scheduling]).
  int max_queue_per_client = 32;
};

class GradientServiceImpl final : public v1::GradientService::CallbackService {
 public:
  explicit GradientServiceImpl(const ServiceOptions& options);
  ~GradientServiceImpl() override;

  // ComputeGradients and CheckGradients, whose messages can be large, are served as generic
  // calls, so that a call can be refused at its headers, before gRPC reads its message (Note
  // [Admission at the headers]). The server must route them here: true for their paths
  // ("/gradserve.v1.GradientService/ComputeGradients"); the methods' generated handlers are
  // never called.
  static bool ServesAtHeaders(std::string_view path);
  // A call whose path ServesAtHeaders: refused at once while shutting down or when its client's
  // share of the queue is full; otherwise its message is read and the call goes on like any.
  grpc::ServerGenericBidiReactor* StartCallAtHeaders(grpc::GenericCallbackServerContext* context);

  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest* request,
                                          v1::GetServerInfoResponse* response) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* context,
                                     const v1::GetStatsRequest* request,
                                     v1::GetStatsResponse* response) override;
  grpc::ServerBidiReactor<v1::StreamGradientsRequest, v1::StreamGradientsResponse>* StreamGradients(
      grpc::CallbackServerContext* context) override;

  // Counts a call of `method` ("ComputeGradients") that never reached this service because
  // AuthenticatingGradientService refused it: UNAUTHENTICATED, no latency. Thread-safe.
  void RecordUnauthenticated(std::string_view method);

  // Every counter, histogram and gauge now: what GetStats and the Prometheus endpoint report.
  // Thread-safe.
  MetricsSnapshot Stats() const;

  // Calls received in full and not yet answered (waiting for cores or computing).
  int calls_in_flight() const { return calls_in_flight_.load(); }
  // StreamGradients streams open now.
  int open_streams() const { return open_streams_.load(); }
  // Bytes calls in flight hold against max_memory_bytes (Note [Memory budget]).
  int64_t memory_in_use() const { return memory_.in_use(); }

  // Note [Shutdown]: from here on every new call and stream step gets UNAVAILABLE (which
  // clients retry, elsewhere) and streams waiting for their client's next message are ended
  // with UNAVAILABLE. Calls already accepted (waiting for cores or computing) go on.
  // Thread-safe, idempotent.
  void RefuseNewCalls();
  // Then, when the grace is over: calls still waiting for cores are dropped and calls still
  // computing stop at their next check (between layers), all with UNAVAILABLE. Thread-safe.
  void AbandonCalls();

 private:
  // The methods in the order the proto declares them; indices into metrics_.
  enum Method { kComputeGradients, kCheckGradients, kGetServerInfo, kGetStats, kStreamGradients };
  class StreamReactor;
  // A call served at its headers whose message is still arriving (Note [Admission at the
  // headers]): ended with UNAVAILABLE when shutdown begins.
  class ArrivingCall {
   public:
    virtual ~ArrivingCall() = default;
    // True exactly once per call: for the message's arrival or the shutdown, whichever comes
    // first; the other leaves the call alone.
    bool Claim() {
      bool expected = false;
      return claimed_.compare_exchange_strong(expected, true);
    }
    // Ends a call the shutdown claimed.
    virtual void EndClaimed(const absl::Status& status) = 0;

   private:
    std::atomic<bool> claimed_{false};
  };
  template <typename Request, typename Response>
  class UnaryCall;

  // Registers `call` as arriving, or ends it with UNAVAILABLE if the shutdown has begun.
  template <typename Call>
  Call* Arrive(Call* call);
  // For a call whose message `call` has read (`request_bytes` on the wire, at `received`):
  // checks what can be checked before queuing, then computes it on the scheduler with the cores
  // its cost deserves, and finishes the call with its status.
  template <typename Request, typename Response>
  void Dispatch(UnaryCall<Request, Response>* call, size_t request_bytes,
                std::chrono::steady_clock::time_point received);
  // Each method served at its headers: its cost estimate and its computation.
  static double CostOf(const v1::ComputeGradientsRequest& request);
  static double CostOf(const v1::CheckGradientsRequest& request);
  absl::Status Compute(v1::ComputeGradientsRequest* request, const ComputeContext& context,
                       v1::ComputeGradientsResponse* response) const;
  absl::Status Compute(v1::CheckGradientsRequest* request, const ComputeContext& context,
                       v1::CheckGradientsResponse* response) const;
  // Answers a cheap call right on the gRPC thread: fill() fills `response` unless the server is
  // shutting down (UNAVAILABLE); logged and counted like every call.
  template <typename Request, typename Response, typename Fill>
  grpc::ServerUnaryReactor* AnswerInline(Method method, grpc::CallbackServerContext* context,
                                         const Request* request, Response* response, Fill fill);
  // The call's request id: the client's if valid, else a new one.
  static std::string AssignRequestId(grpc::CallbackServerContext* context);
  // Sends the request id back: in the initial metadata, or in the trailers of a call refused
  // with UNAVAILABLE (so that clients may retry it). Once per call, before it finishes.
  static void EchoRequestId(grpc::CallbackServerContext* context, const std::string& request_id,
                            const absl::Status& status);
  // Logs the call's one line (at `level`) and counts it.
  void LogCall(Method method, grpc::CallbackServerContext* context, const std::string& request_id,
               size_t request_bytes, size_t response_bytes, const absl::Status& status,
               const CallTimes& times, spdlog::level::level_enum level = spdlog::level::info);
  // The cores a call of `flops` floating-point operations gets (Note [Scheduling]).
  int CoresFor(double flops) const;
  // The error a call refused by the scheduler gets.
  absl::Status AdmissionError(ComputeScheduler::Admission admission) const;
  // The error a call gets before it is queued: UNAVAILABLE while shutting down; over
  // max_call_flops, the error of `claimed_sizes` (if set: a size the request claims is over its
  // limit, so the caller learns which), else RESOURCE_EXHAUSTED; OK to go on.
  absl::Status CheckAdmissible(double flops,
                               const std::function<absl::Status()>& claimed_sizes = {}) const;
  // Stream bookkeeping (Note [Stream lifetime]): a stream's place among max_streams and its
  // client's max_streams_per_client; false (and nothing counted) if either is full.
  absl::Status OpenStream(const std::string& client);
  void CloseStream(const std::string& client);
  void RegisterStream(StreamReactor* stream);
  void UnregisterStream(StreamReactor* stream);
  // The sweeper: ends streams idle past stream_idle_seconds, and every waiting stream once
  // RefuseNewCalls was called.
  void SweepStreams();

  const ServiceOptions options_;
  std::atomic<int> calls_in_flight_{0};
  std::atomic<int> open_streams_{0};
  std::atomic<int64_t> calls_ended_{0};  // Every call logged or refused: the sweeper's clock.
  std::atomic<bool> refusing_{false};
  std::atomic<bool> abandoning_{false};
  Metrics metrics_;
  MemoryBudget memory_;

  // Calls whose message is still arriving, and the shutdown's flag, set under the same lock so
  // that every such call either is in the set when RefuseNewCalls sweeps it or sees the flag.
  std::mutex arriving_mutex_;
  std::set<ArrivingCall*> arriving_;

  std::mutex streams_mutex_;
  std::condition_variable sweep_;
  std::set<StreamReactor*> streams_;                  // Open streams.
  std::map<std::string, int64_t> streams_by_client_;  // Open streams per client.
  bool stop_sweeper_ = false;
  std::thread sweeper_;

  // Last: its destructor runs queued calls, which use the members above.
  ComputeScheduler scheduler_;
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_GRADIENT_SERVICE_H_
