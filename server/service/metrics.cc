#include "server/service/metrics.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace gradserve::service {
namespace {

// Taken when the library is loaded, before main(): the process start for every purpose here.
const double kProcessStart =
    std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();

std::vector<double> MakeBounds() {
  std::vector<double> bounds;
  for (int exponent = -5; exponent <= 1; ++exponent) {
    for (double mantissa : {1.0, 2.0, 5.0}) bounds.push_back(mantissa * std::pow(10.0, exponent));
  }
  bounds.push_back(100.0);
  return bounds;
}

// A float as Prometheus reads it: shortest round-trip form, +Inf for infinity.
std::string PromFloat(double value) {
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (std::isnan(value)) return "NaN";
  for (int precision = 1; precision < 17; ++precision) {
    std::string text = absl::StrFormat("%.*g", precision, value);
    if (std::strtod(text.c_str(), nullptr) == value) return text;
  }
  return absl::StrFormat("%.17g", value);
}

}  // namespace

const char* PhaseName(Phase phase) {
  switch (phase) {
    case Phase::kTotal:
      return "total";
    case Phase::kQueue:
      return "queue";
    case Phase::kDecode:
      return "decode";
    case Phase::kCompute:
      return "compute";
    case Phase::kEncode:
      return "encode";
  }
  return "unknown";
}

std::string StatusCodeName(int code) {
  // absl::StatusCode and grpc::StatusCode share the canonical numbering and names.
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

const std::vector<double>& LatencyBucketBounds() {
  static const std::vector<double> bounds = MakeBounds();
  return bounds;
}

double HistogramSnapshot::Percentile(double q) const {
  if (count == 0) return 0;
  const std::vector<double>& bounds = LatencyBucketBounds();
  const double rank = std::clamp(q, 0.0, 1.0) * static_cast<double>(count);
  uint64_t below = 0;  // Samples in the buckets before bucket i.
  for (size_t i = 0; i < counts.size(); ++i) {
    if (counts[i] == 0 || static_cast<double>(below + counts[i]) < rank) {
      below += counts[i];
      continue;
    }
    double estimate = bounds.back();  // The +Inf bucket has no upper bound.
    if (i < bounds.size()) {
      const double lower = i == 0 ? 0.0 : bounds[i - 1];
      const double fraction = (rank - static_cast<double>(below)) / static_cast<double>(counts[i]);
      estimate = lower + (bounds[i] - lower) * fraction;
    }
    return std::clamp(estimate, min_seconds, std::max(min_seconds, max_seconds));
  }
  return max_seconds;  // Not reached: the last non-empty bucket holds rank <= count.
}

std::vector<uint64_t> HistogramSnapshot::Cumulative() const {
  std::vector<uint64_t> cumulative(counts.size());
  uint64_t running = 0;
  for (size_t i = 0; i < counts.size(); ++i) cumulative[i] = running += counts[i];
  return cumulative;
}

LatencyHistogram::LatencyHistogram()
    : buckets_(new std::atomic<uint64_t>[LatencyBucketBounds().size() + 1]) {
  for (size_t i = 0; i <= LatencyBucketBounds().size(); ++i) buckets_[i].store(0);
}

void LatencyHistogram::Record(double seconds) {
  seconds = std::max(seconds, 0.0);
  const std::vector<double>& bounds = LatencyBucketBounds();
  // The first bound >= seconds: bounds are inclusive upper limits ("le").
  const size_t bucket = std::lower_bound(bounds.begin(), bounds.end(), seconds) - bounds.begin();
  buckets_[bucket].fetch_add(1, std::memory_order_relaxed);
  const auto nanos = static_cast<uint64_t>(std::llround(std::min(seconds, 1e9) * 1e9));
  sum_nanos_.fetch_add(nanos, std::memory_order_relaxed);
  for (uint64_t min = min_nanos_.load(std::memory_order_relaxed);
       nanos < min && !min_nanos_.compare_exchange_weak(min, nanos, std::memory_order_relaxed);) {
  }
  for (uint64_t max = max_nanos_.load(std::memory_order_relaxed);
       nanos > max && !max_nanos_.compare_exchange_weak(max, nanos, std::memory_order_relaxed);) {
  }
  count_.fetch_add(1, std::memory_order_relaxed);
}

HistogramSnapshot LatencyHistogram::Snapshot() const {
  HistogramSnapshot snapshot;
  snapshot.counts.resize(LatencyBucketBounds().size() + 1);
  for (size_t i = 0; i < snapshot.counts.size(); ++i) {
    snapshot.counts[i] = buckets_[i].load(std::memory_order_relaxed);
  }
  // The buckets are the truth for count, so that +Inf == _count always holds in the exposition
  // even while other threads record.
  for (uint64_t c : snapshot.counts) snapshot.count += c;
  snapshot.sum_seconds = static_cast<double>(sum_nanos_.load(std::memory_order_relaxed)) * 1e-9;
  if (snapshot.count > 0) {
    const uint64_t min = min_nanos_.load(std::memory_order_relaxed);
    const uint64_t max = max_nanos_.load(std::memory_order_relaxed);
    // A sample counted in its bucket may not have reached min/max yet.
    snapshot.min_seconds = min == UINT64_MAX ? 0 : static_cast<double>(min) * 1e-9;
    snapshot.max_seconds = static_cast<double>(max) * 1e-9;
  }
  return snapshot;
}

uint64_t MethodSnapshot::calls() const {
  uint64_t total = 0;
  for (uint64_t c : calls_by_code) total += c;
  return total;
}

Metrics::Metrics(std::vector<std::string> methods) {
  for (std::string& name : methods) {
    methods_.push_back(std::make_unique<PerMethod>());
    methods_.back()->name = std::move(name);
  }
}

void Metrics::RecordCall(int method, int code, const CallTimes& times) {
  PerMethod& m = *methods_[method];
  m.calls_by_code[code >= 0 && code < kNumStatusCodes ? code : 2 /* UNKNOWN */].fetch_add(
      1, std::memory_order_relaxed);
  RecordPhases(method, times);
}

void Metrics::RecordPhases(int method, const CallTimes& times) {
  PerMethod& m = *methods_[method];
  for (int p = 0; p < kNumPhases; ++p) {
    if (times.seconds[p] >= 0) m.phases[p].Record(times.seconds[p]);
  }
}

MetricsSnapshot Metrics::Snapshot() const {
  MetricsSnapshot snapshot;
  for (const auto& m : methods_) {
    MethodSnapshot& out = snapshot.methods.emplace_back();
    out.method = m->name;
    for (int c = 0; c < kNumStatusCodes; ++c) {
      out.calls_by_code[c] = m->calls_by_code[c].load(std::memory_order_relaxed);
    }
    for (int p = 0; p < kNumPhases; ++p) out.phases[p] = m->phases[p].Snapshot();
  }
  snapshot.process_start_time_seconds = ProcessStartTimeSeconds();
  snapshot.uptime_seconds =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count() -
      snapshot.process_start_time_seconds;
  return snapshot;
}

double ProcessStartTimeSeconds() { return kProcessStart; }

std::string PrometheusText(const MetricsSnapshot& snapshot) {
  // Method names are identifiers and phase and code names fixed words, so no label value here
  // needs escaping.
  std::string out;
  absl::StrAppend(&out,
                  "# HELP gradserve_rpc_calls_total GradientService calls finished, by method "
                  "and gRPC status code.\n"
                  "# TYPE gradserve_rpc_calls_total counter\n");
  for (const MethodSnapshot& m : snapshot.methods) {
    for (int c = 0; c < kNumStatusCodes; ++c) {
      // OK always, so every method has a series from the start; other codes once they occur.
      if (c != 0 && m.calls_by_code[c] == 0) continue;
      absl::StrAppend(&out, "gradserve_rpc_calls_total{method=\"", m.method, "\",code=\"",
                      StatusCodeName(c), "\"} ", m.calls_by_code[c], "\n");
    }
  }
  absl::StrAppend(&out,
                  "# HELP gradserve_rpc_phase_seconds Latency of GradientService calls by "
                  "method and phase (total, queue, decode, compute, encode).\n"
                  "# TYPE gradserve_rpc_phase_seconds histogram\n");
  const std::vector<double>& bounds = LatencyBucketBounds();
  for (const MethodSnapshot& m : snapshot.methods) {
    for (int p = 0; p < kNumPhases; ++p) {
      const HistogramSnapshot& h = m.phases[p];
      const std::string labels = absl::StrCat("method=\"", m.method, "\",phase=\"",
                                              PhaseName(static_cast<Phase>(p)), "\"");
      const std::vector<uint64_t> cumulative = h.Cumulative();
      for (size_t i = 0; i < cumulative.size(); ++i) {
        absl::StrAppend(&out, "gradserve_rpc_phase_seconds_bucket{", labels, ",le=\"",
                        i < bounds.size() ? PromFloat(bounds[i]) : "+Inf", "\"} ", cumulative[i],
                        "\n");
      }
      absl::StrAppend(&out, "gradserve_rpc_phase_seconds_sum{", labels, "} ",
                      PromFloat(h.sum_seconds), "\n");
      absl::StrAppend(&out, "gradserve_rpc_phase_seconds_count{", labels, "} ", h.count, "\n");
    }
  }
  absl::StrAppend(&out,
                  "# HELP gradserve_calls_in_flight Calls received and not yet answered.\n"
                  "# TYPE gradserve_calls_in_flight gauge\n"
                  "gradserve_calls_in_flight ",
                  snapshot.calls_in_flight, "\n",
                  "# HELP gradserve_queue_length Calls waiting for compute cores.\n"
                  "# TYPE gradserve_queue_length gauge\n"
                  "gradserve_queue_length ",
                  snapshot.queue_length, "\n",
                  "# HELP gradserve_open_streams StreamGradients streams open.\n"
                  "# TYPE gradserve_open_streams gauge\n"
                  "gradserve_open_streams ",
                  snapshot.open_streams, "\n",
                  "# HELP gradserve_memory_in_use_bytes Bytes calls in flight hold against "
                  "max_memory_bytes.\n"
                  "# TYPE gradserve_memory_in_use_bytes gauge\n"
                  "gradserve_memory_in_use_bytes ",
                  snapshot.memory_in_use_bytes, "\n",
                  "# HELP gradserve_process_start_time_seconds Start time of the process since "
                  "the Unix epoch in seconds.\n"
                  "# TYPE gradserve_process_start_time_seconds gauge\n"
                  "gradserve_process_start_time_seconds ",
                  PromFloat(snapshot.process_start_time_seconds), "\n");
  return out;
}

}  // namespace gradserve::service
