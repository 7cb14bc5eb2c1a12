// Call metrics of the service: per method, calls by final status code and latency histograms
// per phase; the current load; Prometheus text exposition of all of it. No gRPC or protobuf
// here: GradientServiceImpl records into a Metrics and converts its snapshots for GetStats.
//
// Note [Call phases]
// ~~~~~~~~~~~~~~~~~~
// A call through the compute queue (ComputeGradients, CheckGradients) is timed in phases:
//   total    handler start -> just before Finish. The handler starts once gRPC has received and
//            parsed the whole request, so wire time and protobuf parsing are not included;
//   queue    handler start -> a worker starts the call (waiting for cores);
//   decode   validating the request and building the engine's model and views (PrepareRequest);
//   compute  the engine (forward + backward, or the gradient check);
//   encode   filling the response message: allocating the tensors the engine writes into, then
//            the scalars, diagnostics and stats. gRPC serializes the message after Finish, on
//            its own thread; that is not measured.
// total - (queue + decode + compute + encode) is the service's own overhead (logging, status
// mapping). A call that fails validation has queue and decode but no compute or encode sample;
// a call refused because the queue is full has only total. Cheap calls answered on the gRPC
// thread (GetServerInfo, GetStats) have only total. A call refused for its bearer token never
// reaches the service: it is counted (UNAUTHENTICATED) with no phase at all.
// A StreamGradients stream is one call: its total is the stream's lifetime, recorded when it
// ends; each step adds one sample to queue, decode, compute and encode (setup and chunks are
// handled on the gRPC thread and add none).
#ifndef GRADSERVE_SERVICE_METRICS_H_
#define GRADSERVE_SERVICE_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace gradserve::service {

enum class Phase { kTotal = 0, kQueue, kDecode, kCompute, kEncode };
inline constexpr int kNumPhases = 5;
// "total", "queue", "decode", "compute", "encode".
const char* PhaseName(Phase phase);

// Bucket upper bounds in seconds, inclusive, ascending: 1, 2, 5 x 10^k from 10 us to 100 s
// (22 bounds, three per decade), plus an implicit +Inf bucket.
const std::vector<double>& LatencyBucketBounds();

// A point-in-time copy of one histogram.
struct HistogramSnapshot {
  // counts[i]: samples in bucket i alone (not cumulative); one more entry than
  // LatencyBucketBounds(), the last for samples above the largest bound.
  std::vector<uint64_t> counts;
  uint64_t count = 0;
  double sum_seconds = 0;
  // The smallest and largest sample; 0 with no samples.
  double min_seconds = 0;
  double max_seconds = 0;

  // The q-quantile (0 <= q <= 1) in seconds, 0 with no samples. The rank q * count is located
  // in the cumulative counts and interpolated linearly between the bucket's lower bound (the
  // previous bound, 0 for the first bucket) and its upper bound, as Prometheus's
  // histogram_quantile does; a rank in the +Inf bucket takes the largest finite bound. The
  // result is then clamped to [min_seconds, max_seconds], which makes it exact for one sample
  // and never beyond what was seen.
  double Percentile(double q) const;
  // counts made cumulative: entry i counts the samples <= bound i; the last equals `count`.
  std::vector<uint64_t> Cumulative() const;
};

// A latency histogram with fixed log-spaced buckets. Record is lock-free (three relaxed atomic
// adds, and a compare-exchange only when a sample is a new minimum or maximum) and thread-safe; a
// Snapshot taken while others record may be off by the calls in progress, never torn within one
// counter.
class LatencyHistogram {
 public:
  LatencyHistogram();
  void Record(double seconds);
  HistogramSnapshot Snapshot() const;

 private:
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;
  std::atomic<uint64_t> count_{0};
  std::atomic<uint64_t> sum_nanos_{0};
  std::atomic<uint64_t> min_nanos_{UINT64_MAX};
  std::atomic<uint64_t> max_nanos_{0};
};

// Durations of the phases of one call (Note [Call phases]); a negative value means the call
// did not reach that phase and records no sample.
struct CallTimes {
  std::array<double, kNumPhases> seconds = {-1, -1, -1, -1, -1};
  double& operator[](Phase phase) { return seconds[static_cast<int>(phase)]; }
  double operator[](Phase phase) const { return seconds[static_cast<int>(phase)]; }
};

inline constexpr int kNumStatusCodes = 17;  // gRPC's canonical codes, OK (0) .. UNAUTHENTICATED.
// "OK", "CANCELLED", ... for 0 .. 16; "UNKNOWN" otherwise.
std::string StatusCodeName(int code);

struct MethodSnapshot {
  std::string method;
  std::array<uint64_t, kNumStatusCodes> calls_by_code{};
  std::array<HistogramSnapshot, kNumPhases> phases;
  uint64_t calls() const;
};

struct MetricsSnapshot {
  std::vector<MethodSnapshot> methods;
  int calls_in_flight = 0;
  int queue_length = 0;
  int open_streams = 0;
  int64_t memory_in_use_bytes = 0;
  double process_start_time_seconds = 0;  // Unix time.
  double uptime_seconds = 0;
};

// The service's metrics registry: a fixed set of methods, named at construction, each with a
// counter per status code and a histogram per phase. Thread-safe and lock-free on the recording
// path; nothing allocates after construction.
class Metrics {
 public:
  explicit Metrics(std::vector<std::string> methods);

  // Counts one finished call of methods[method] with gRPC status `code` and records the phases
  // it reached. REQUIRES: 0 <= method < number of methods.
  void RecordCall(int method, int code, const CallTimes& times);
  // Records the phases without counting a call: one step of a stream, whose call is counted
  // (with its total time) when the stream ends.
  void RecordPhases(int method, const CallTimes& times);

  const std::string& method_name(int method) const { return methods_[method]->name; }

  // Counters and histograms now; the gauges (in flight, queue) are the caller's to fill in.
  MetricsSnapshot Snapshot() const;

 private:
  struct PerMethod {
    std::string name;
    std::array<std::atomic<uint64_t>, kNumStatusCodes> calls_by_code{};
    std::array<LatencyHistogram, kNumPhases> phases;
  };
  std::vector<std::unique_ptr<PerMethod>> methods_;
};

// When this process started (approximately: when this library was loaded), Unix seconds.
double ProcessStartTimeSeconds();

// `snapshot` in the Prometheus text exposition format, version 0.0.4:
//   gradserve_rpc_calls_total{method,code}                    counter
//   gradserve_rpc_phase_seconds{method,phase}                 histogram (_bucket{le}, _sum, _count)
//   gradserve_calls_in_flight, gradserve_queue_length         gauges
//   gradserve_process_start_time_seconds                      gauge
// Every method's histograms are written even with no samples (all zero), and its OK counter, so
// series do not appear out of nowhere; other status codes appear once a call ends with them.
std::string PrometheusText(const MetricsSnapshot& snapshot);

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_METRICS_H_
