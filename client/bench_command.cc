#include "client/bench_command.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <span>
#include <thread>

namespace gradserve::client::bench {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t kMaxBatch = int64_t{1} << 20;     // The server's default limits: a larger
constexpr int64_t kMaxFeatures = int64_t{1} << 20;  // spec would be refused anyway.
constexpr int64_t kMaxLayers = 1024;
// Protobuf cannot serialize a message of 2 GiB or more.
constexpr int64_t kMaxRequestBytes = (int64_t{2} << 30) - (int64_t{1} << 20);

constexpr std::array<std::string_view, 8> kActivations = {"relu", "leaky_relu", "sigmoid",  "tanh",
                                                          "gelu", "gelu_tanh",  "identity", "none"};
constexpr std::array<std::string_view, 5> kLosses = {"mse", "l1", "huber", "cross_entropy",
                                                     "bce_with_logits"};

template <size_t N>
bool OneOf(const std::array<std::string_view, N>& names, std::string_view value) {
  return std::find(names.begin(), names.end(), value) != names.end();
}

template <size_t N>
std::string JoinNames(const std::array<std::string_view, N>& names) {
  std::string out;
  for (std::string_view name : names) {
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

std::optional<int64_t> ParseInt(std::string_view text) {
  int64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

std::vector<std::string_view> Split(std::string_view text, char separator) {
  std::vector<std::string_view> parts;
  size_t begin = 0;
  while (true) {
    const size_t end = text.find(separator, begin);
    parts.push_back(text.substr(begin, end == std::string_view::npos ? end : end - begin));
    if (end == std::string_view::npos) return parts;
    begin = end + 1;
  }
}

std::string StatusCodeName(int code) {
  return gradserve::client::StatusCodeName(static_cast<grpc::StatusCode>(code));
}

void AddActivation(std::string_view name, ModelBuilder& builder) {
  if (name == "relu") builder.ReLU();
  if (name == "leaky_relu") builder.LeakyReLU();
  if (name == "sigmoid") builder.Sigmoid();
  if (name == "tanh") builder.Tanh();
  if (name == "gelu") builder.GELU(false);
  if (name == "gelu_tanh") builder.GELU(true);
  if (name == "identity") builder.Identity();
  // "none": no layer.
}

// Bytes of the tensors in the request the spec describes (the model and framing are small).
int64_t RequestTensorBytes(const ShapeSpec& spec) {
  const int64_t element = spec.dtype == "float64" ? 8 : 4;
  int64_t elements = 0;
  for (size_t i = 0; i + 1 < spec.widths.size(); ++i) {
    elements += spec.widths[i] * spec.widths[i + 1] + spec.widths[i + 1];
  }
  elements += spec.batch * spec.widths.front();
  const int64_t targets =
      spec.loss == "cross_entropy" ? spec.batch * 8 : spec.batch * spec.widths.back() * element;
  return elements * element + targets;
}

template <typename T>
v1::Tensor RandomTensor(std::mt19937_64& rng, std::initializer_list<int64_t> shape, double stddev) {
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  std::normal_distribution<double> normal(0.0, stddev);
  std::vector<T> values(static_cast<size_t>(count));
  for (T& v : values) v = static_cast<T>(normal(rng));
  return ToTensor<T>(std::span<const T>(values), shape);
}

template <typename T>
void FillTensors(const ShapeSpec& spec, v1::ComputeGradientsRequest* request) {
  std::mt19937_64 rng(spec.seed);
  for (size_t i = 0; i + 1 < spec.widths.size(); ++i) {
    const int64_t in = spec.widths[i];
    const int64_t out = spec.widths[i + 1];
    v1::LinearParameters* params = request->add_parameters();
    const double stddev = 1.0 / std::sqrt(static_cast<double>(in));
    *params->mutable_weight() = RandomTensor<T>(rng, {out, in}, stddev);
    *params->mutable_bias() = RandomTensor<T>(rng, {out}, stddev);
  }
  const int64_t batch = spec.batch;
  const int64_t out = spec.widths.back();
  *request->mutable_inputs() = RandomTensor<T>(rng, {batch, spec.widths.front()}, 1.0);
  if (spec.loss == "cross_entropy") {
    std::uniform_int_distribution<int64_t> label(0, out - 1);
    std::vector<int64_t> labels(static_cast<size_t>(batch));
    for (int64_t& l : labels) l = label(rng);
    *request->mutable_targets() = ToTensor(labels);
  } else if (spec.loss == "bce_with_logits") {
    std::uniform_real_distribution<double> unit(0.0, 1.0);
    std::vector<T> values(static_cast<size_t>(batch * out));
    for (T& v : values) v = static_cast<T>(unit(rng));
    *request->mutable_targets() = ToTensor<T>(std::span<const T>(values), {batch, out});
  } else {
    *request->mutable_targets() = RandomTensor<T>(rng, {batch, out}, 1.0);
  }
}

// Whether two responses carry bit-identical results: loss, dW, db, dx and output. Diagnostics
// are derived from those, and stats hold timings, so neither is compared.
bool SameResults(const v1::ComputeGradientsResponse& a, const v1::ComputeGradientsResponse& b,
                 std::string* difference) {
  const double loss_a = a.loss(), loss_b = b.loss();
  if (std::memcmp(&loss_a, &loss_b, sizeof(double)) != 0) {
    *difference = "loss differs";
    return false;
  }
  if (a.gradients_size() != b.gradients_size()) {
    *difference = "number of gradients differs";
    return false;
  }
  for (int i = 0; i < a.gradients_size(); ++i) {
    if (a.gradients(i).weight().data() != b.gradients(i).weight().data()) {
      *difference = "gradients[" + std::to_string(i) + "].weight differs";
      return false;
    }
    if (a.gradients(i).bias().data() != b.gradients(i).bias().data()) {
      *difference = "gradients[" + std::to_string(i) + "].bias differs";
      return false;
    }
  }
  if (a.input_gradient().data() != b.input_gradient().data()) {
    *difference = "input_gradient differs";
    return false;
  }
  if (a.output().data() != b.output().data()) {
    *difference = "output differs";
    return false;
  }
  return true;
}

double CpuSeconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  auto seconds = [](const timeval& t) { return t.tv_sec + t.tv_usec * 1e-6; };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

// Threads of this process (gRPC's pollers and callback executors included), from /proc.
int ThreadCount() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Threads:", 0) == 0) return std::atoi(line.c_str() + 8);
  }
  return 0;
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Note [Throughput]
// A closed loop at low rates (a large model: a few calls a second) completes only tens of calls
// in a window, so "completions / window" moves by a whole call with where the window's edges
// fall (10% at 10 calls). Each successful call instead counts by the fraction of its duration
// that lies inside the window: a call straddling the start or the end counts in part, and the
// calls in flight at the end are drained for that. At steady state the two agree; this one
// does not jump with the edges, and it stays right when calls complete in bursts.

// One in-flight call at a time. A slot's next call starts from the previous call's completion
// (the callback, or the poller that took it off the completion queue), so its own fields are
// only ever touched by one thread at a time (gRPC orders a call's start before its completion);
// the shared counters are atomics.
struct Slot {
  v1::GradientService::Stub* stub = nullptr;
  grpc::CompletionQueue* queue = nullptr;  // --api cq only.
  std::unique_ptr<grpc::ClientContext> context;
  std::unique_ptr<grpc::ClientAsyncResponseReader<v1::ComputeGradientsResponse>> reader;
  grpc::Status status;  // --api cq: Finish() writes it.
  v1::ComputeGradientsResponse response;
  Clock::time_point start;
  // Of the successful calls completed inside the window (a refusal's latency says nothing of
  // the service's).
  std::vector<int64_t> latencies_ns;
  // [start, end) of every successful call that ended after the window opened, in ns from the
  // window's start (drained calls included): the throughput counts their overlap with it.
  std::vector<std::pair<int64_t, int64_t>> ok_intervals_ns;
  std::array<int64_t, 17> errors{};
  int64_t mismatches = 0;
};

class Runner {
 public:
  Runner(const BenchOptions& options, const ClientOptions& client_options,
         const v1::ComputeGradientsRequest& request, const v1::ComputeGradientsResponse& reference,
         std::vector<std::unique_ptr<v1::GradientService::Stub>>& stubs)
      : options_(options),
        client_options_(client_options),
        request_(request),
        reference_(reference),
        slots_(static_cast<size_t>(options.concurrency)) {
    if (options.api == "cq") {
      for (int i = 0; i < options.threads; ++i) {
        queues_.push_back(std::make_unique<grpc::CompletionQueue>());
      }
    }
    for (size_t i = 0; i < slots_.size(); ++i) {
      slots_[i].stub = stubs[i % stubs.size()].get();
      if (!queues_.empty()) slots_[i].queue = queues_[i % queues_.size()].get();
      slots_[i].latencies_ns.reserve(1 << 12);
      slots_[i].ok_intervals_ns.reserve(1 << 12);
    }
  }

  // Runs warmup and measurement, showing progress; returns when every slot has stopped.
  void Run() {
    const bool tty = options_.progress && isatty(STDERR_FILENO);
    start_ = Clock::now();
    measure_start_ = start_ + std::chrono::duration_cast<Clock::duration>(
                                  std::chrono::duration<double>(options_.warmup_seconds));
    measure_end_ = measure_start_ + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(options_.duration_seconds));
    active_ = static_cast<int>(slots_.size());
    if (options_.warmup_seconds <= 0) cpu_at_start_ = CpuSeconds();
    std::vector<std::thread> pollers;
    for (auto& queue : queues_) {
      pollers.emplace_back([this, q = queue.get()] {
        void* tag;
        bool ok;
        while (q->Next(&tag, &ok)) {
          Slot* slot = static_cast<Slot*>(tag);
          OnDone(*slot, slot->status);
        }
      });
    }
    for (Slot& slot : slots_) StartCall(slot);

    bool cpu_start_taken = options_.warmup_seconds <= 0;
    bool cpu_end_taken = false;
    Clock::time_point next_tick = start_ + std::chrono::seconds(1);
    int64_t last_completed = 0;
    Clock::time_point last_tick = start_;
    std::unique_lock lock(mutex_);
    while (active_ > 0) {
      Clock::time_point wake = next_tick;
      if (!cpu_start_taken) wake = std::min(wake, measure_start_);
      if (!cpu_end_taken) wake = std::min(wake, measure_end_);
      done_.wait_until(lock, wake, [&] { return active_ == 0 || (stop_ && !cpu_end_taken); });
      const Clock::time_point now = Clock::now();
      if (!cpu_start_taken && now >= measure_start_) {
        cpu_at_start_ = CpuSeconds();
        cpu_start_taken = true;
      }
      if (!cpu_end_taken && (now >= measure_end_ || stop_.load())) {
        // The end of the window: no new calls from here on; those in flight drain.
        cpu_at_end_ = CpuSeconds();
        cpu_end_taken = true;
        stop_ = true;
      }
      if (now >= next_tick) {
        next_tick = now + std::chrono::seconds(1);
        if (options_.progress) PrintProgress(now, tty, &last_completed, &last_tick);
      }
    }
    if (!cpu_end_taken) cpu_at_end_ = CpuSeconds();
    if (tty) std::fprintf(stderr, "\n");
    lock.unlock();
    for (auto& queue : queues_) queue->Shutdown();  // Every call is done: the pollers drain.
    for (std::thread& poller : pollers) poller.join();
  }

  const std::vector<Slot>& slots() const { return slots_; }
  double cpu_seconds() const { return cpu_at_end_ - cpu_at_start_; }
  int64_t warmup_calls() const { return warmup_calls_.load(); }
  const std::string& first_mismatch() const { return first_mismatch_; }
  // The measurement window: up to the last recorded completion if --max-calls ended it.
  double window_seconds() const { return window_ns() * 1e-9; }

  // Successful calls done inside the window, counting a call that straddles an edge by the
  // fraction of its time inside (Note [Throughput]).
  double WeightedOkCalls() const {
    const int64_t window = window_ns();
    double calls = 0;
    for (const Slot& slot : slots_) {
      for (const auto& [start, end] : slot.ok_intervals_ns) {
        const int64_t overlap = std::min(end, window) - std::max<int64_t>(start, 0);
        if (end > start && overlap > 0) calls += static_cast<double>(overlap) / (end - start);
      }
    }
    return calls;
  }

 private:
  // One progress line: calls measured so far and the completion rate since the last line.
  void PrintProgress(Clock::time_point now, bool tty, int64_t* last_completed,
                     Clock::time_point* last_tick) {
    const int64_t completed = completed_.load();
    const double rate = (completed - *last_completed) / Seconds(now - *last_tick);
    const bool warming = now < measure_start_;
    const double elapsed = Seconds(now - (warming ? start_ : measure_start_));
    char line[200];
    std::snprintf(line, sizeof(line), "bench: %s %5.1f s  calls %lld  rate %.1f/s  errors %lld%s",
                  warming ? "warmup " : "measure", elapsed,
                  static_cast<long long>(measured_.load()), rate,
                  static_cast<long long>(error_calls_.load()), stop_.load() ? "  (draining)" : "");
    if (tty) {
      std::fprintf(stderr, "\r%s\033[K", line);
    } else {
      std::fprintf(stderr, "%s\n", line);
    }
    std::fflush(stderr);
    *last_completed = completed;
    *last_tick = now;
  }

  int64_t window_ns() const {
    const int64_t last_ns = max_calls_end_ns_.load();
    if (last_ns > 0) return last_ns;
    return std::chrono::nanoseconds(measure_end_ - measure_start_).count();
  }

  void StartCall(Slot& slot) {
    slot.reader.reset();
    slot.context = std::make_unique<grpc::ClientContext>();
    PrepareContext(client_options_, slot.context.get());  // Deadline, bearer token.
    slot.response.Clear();
    slot.start = Clock::now();
    if (slot.queue != nullptr) {
      slot.reader =
          slot.stub->PrepareAsyncComputeGradients(slot.context.get(), request_, slot.queue);
      slot.reader->StartCall();
      slot.reader->Finish(&slot.response, &slot.status, &slot);
      return;
    }
    slot.stub->async()->ComputeGradients(
        slot.context.get(), &request_, &slot.response,
        [this, &slot](grpc::Status status) { OnDone(slot, std::move(status)); });
  }

  // Runs on a gRPC callback thread or a poller: record, then start the slot's next call or stop.
  void OnDone(Slot& slot, grpc::Status status) {
    const Clock::time_point end = Clock::now();
    completed_.fetch_add(1, std::memory_order_relaxed);
    if (status.ok() && end > measure_start_) {
      slot.ok_intervals_ns.emplace_back(
          std::chrono::nanoseconds(slot.start - measure_start_).count(),
          std::chrono::nanoseconds(end - measure_start_).count());
    }
    if (end >= measure_start_ && end < measure_end_ && !stop_.load()) {
      const int64_t index = measured_.fetch_add(1);
      if (options_.max_calls == 0 || index < options_.max_calls) Record(slot, status, end);
      if (options_.max_calls > 0 && index + 1 >= options_.max_calls) {
        if (index + 1 == options_.max_calls) {
          max_calls_end_ns_ = std::chrono::nanoseconds(end - measure_start_).count();
        }
        stop_ = true;
        std::lock_guard lock(mutex_);  // Wake Run() to close the window now.
        done_.notify_all();
      }
    } else if (end < measure_start_) {
      warmup_calls_.fetch_add(1, std::memory_order_relaxed);
    }
    if (!stop_.load() && Clock::now() < measure_end_) {
      StartCall(slot);
      return;
    }
    std::lock_guard lock(mutex_);
    if (--active_ == 0) done_.notify_all();
  }

  void Record(Slot& slot, const grpc::Status& status, Clock::time_point end) {
    if (status.ok())
      slot.latencies_ns.push_back(std::chrono::nanoseconds(end - slot.start).count());
    const int code = static_cast<int>(status.error_code());
    ++slot.errors[code >= 0 && code < 17 ? code : static_cast<int>(grpc::StatusCode::UNKNOWN)];
    if (!status.ok()) {
      error_calls_.fetch_add(1, std::memory_order_relaxed);
      std::call_once(first_error_once_, [&] {
        std::fprintf(stderr, "\nbench: first error: %s: %s\n", StatusCodeName(code).c_str(),
                     status.error_message().c_str());
      });
      return;
    }
    if (options_.verify) {
      std::string difference;
      if (!SameResults(reference_, slot.response, &difference)) {
        ++slot.mismatches;
        std::call_once(first_mismatch_once_, [&] { first_mismatch_ = difference; });
      }
    }
  }

  const BenchOptions& options_;
  const ClientOptions& client_options_;
  const v1::ComputeGradientsRequest& request_;
  const v1::ComputeGradientsResponse& reference_;
  std::vector<Slot> slots_;

  Clock::time_point start_, measure_start_, measure_end_;
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> completed_{0};    // Every completion, warmup included (progress rate).
  std::atomic<int64_t> measured_{0};     // Completions inside the window.
  std::atomic<int64_t> error_calls_{0};  // Measured completions that failed.
  std::atomic<int64_t> warmup_calls_{0};
  std::atomic<int64_t> max_calls_end_ns_{0};
  std::once_flag first_error_once_, first_mismatch_once_;
  std::string first_mismatch_;
  double cpu_at_start_ = 0, cpu_at_end_ = 0;

  std::vector<std::unique_ptr<grpc::CompletionQueue>> queues_;  // --api cq: one per poller.

  std::mutex mutex_;
  std::condition_variable done_;
  int active_ = 0;  // Slots still issuing or in flight; guarded by mutex_.
};

std::shared_ptr<grpc::Channel> BenchChannel(const std::string& target,
                                            const ClientOptions& client_options,
                                            std::shared_ptr<grpc::ChannelCredentials> credentials,
                                            int index) {
  grpc::ChannelArguments args;
  const int limit = static_cast<int>(std::min<int64_t>(client_options.max_message_bytes, INT_MAX));
  args.SetMaxReceiveMessageSize(limit);
  args.SetMaxSendMessageSize(limit);
  // Channels with equal arguments share subchannels (and so one TCP connection) through gRPC's
  // global pool; a local pool and a distinct argument give each channel its own connection.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt("gradserve.bench_channel", index);
  if (!client_options.tls.server_name_override.empty()) {
    args.SetSslTargetNameOverride(client_options.tls.server_name_override);
  }
  return grpc::CreateCustomChannel(target, credentials, args);
}

}  // namespace

double ShapeSpec::FlopsPerCall() const {
  double sum = 0;
  for (size_t i = 0; i + 1 < widths.size(); ++i) {
    sum += static_cast<double>(widths[i]) * static_cast<double>(widths[i + 1]);
  }
  return 6.0 * static_cast<double>(batch) * sum;
}

std::string ShapeSpec::ToString() const {
  std::string layers;
  for (int64_t w : widths) layers += (layers.empty() ? "" : "x") + std::to_string(w);
  return "batch=" + std::to_string(batch) + ",layers=" + layers + ",act=" + act +
         ",out_act=" + out_act + ",loss=" + loss + ",dtype=" + dtype + ",dx=" + (dx ? "1" : "0") +
         ",seed=" + std::to_string(seed);
}

std::optional<ShapeSpec> ParseShape(std::string_view text, std::string* error) {
  ShapeSpec spec;
  if (text == "seed") {
    spec.batch = 8;
    spec.widths = {4, 2};
    spec.out_act = "relu";
    spec.dx = true;
    return spec;
  }
  auto fail = [&](std::string message) -> std::optional<ShapeSpec> {
    *error = std::move(message);
    return std::nullopt;
  };
  bool have_batch = false;
  for (std::string_view item : Split(text, ',')) {
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos) {
      return fail("expected key=value, got '" + std::string(item) + "' (or use --shape seed)");
    }
    const std::string_view key = item.substr(0, eq);
    const std::string_view value = item.substr(eq + 1);
    const std::string quoted = "'" + std::string(value) + "'";
    if (key == "batch") {
      const std::optional<int64_t> batch = ParseInt(value);
      if (!batch || *batch < 1 || *batch > kMaxBatch) {
        return fail("batch: expected an integer in [1, " + std::to_string(kMaxBatch) + "], got " +
                    quoted);
      }
      spec.batch = *batch;
      have_batch = true;
    } else if (key == "layers") {
      spec.widths.clear();
      for (std::string_view w : Split(value, 'x')) {
        const std::optional<int64_t> width = ParseInt(w);
        if (!width || *width < 1 || *width > kMaxFeatures) {
          return fail("layers: each width must be an integer in [1, " +
                      std::to_string(kMaxFeatures) + "], got '" + std::string(w) + "' in " +
                      quoted);
        }
        spec.widths.push_back(*width);
      }
      if (spec.widths.size() < 2) {
        return fail("layers: expected at least two widths IN x OUT (e.g. 784x10), got " + quoted);
      }
      if (static_cast<int64_t>(spec.widths.size()) - 1 > kMaxLayers / 2) {
        return fail("layers: at most " + std::to_string(kMaxLayers / 2) + " Linear layers, got " +
                    std::to_string(spec.widths.size() - 1));
      }
    } else if (key == "act" || key == "out_act") {
      if (!OneOf(kActivations, value)) {
        return fail(std::string(key) + ": expected one of " + JoinNames(kActivations) + ", got " +
                    quoted);
      }
      (key == "act" ? spec.act : spec.out_act) = std::string(value);
    } else if (key == "loss") {
      if (!OneOf(kLosses, value)) {
        return fail("loss: expected one of " + JoinNames(kLosses) + ", got " + quoted);
      }
      spec.loss = std::string(value);
    } else if (key == "dtype") {
      if (value != "float32" && value != "float64") {
        return fail("dtype: expected float32 or float64, got " + quoted);
      }
      spec.dtype = std::string(value);
    } else if (key == "dx") {
      if (value != "0" && value != "1") return fail("dx: expected 0 or 1, got " + quoted);
      spec.dx = value == "1";
    } else if (key == "seed") {
      const std::optional<int64_t> seed = ParseInt(value);
      if (!seed || *seed < 0) return fail("seed: expected a non-negative integer, got " + quoted);
      spec.seed = static_cast<uint64_t>(*seed);
    } else {
      return fail("unknown key '" + std::string(key) +
                  "' (expected batch, layers, act, out_act, loss, dtype, dx, seed)");
    }
  }
  if (!have_batch) return fail("batch=B is required");
  if (spec.widths.empty()) return fail("layers=W0xW1x... is required");
  if (spec.loss == "cross_entropy" && spec.widths.back() < 2) {
    return fail("loss=cross_entropy needs at least 2 classes (the last width)");
  }
  if (const int64_t bytes = RequestTensorBytes(spec); bytes > kMaxRequestBytes) {
    return fail("the request would hold " + std::to_string(bytes >> 20) +
                " MiB of tensors; a protobuf message must stay under 2 GiB");
  }
  return spec;
}

v1::ComputeGradientsRequest BuildRequest(const ShapeSpec& spec, const std::string& checkpoint) {
  v1::ComputeGradientsRequest request;
  ModelBuilder builder;
  for (size_t i = 0; i + 1 < spec.widths.size(); ++i) {
    builder.Linear(spec.widths[i], spec.widths[i + 1]).Named("fc" + std::to_string(i + 1));
    AddActivation(i + 2 < spec.widths.size() ? spec.act : spec.out_act, builder);
  }
  if (spec.loss == "mse") builder.Mse();
  if (spec.loss == "l1") builder.L1();
  if (spec.loss == "huber") builder.Huber();
  if (spec.loss == "cross_entropy") builder.CrossEntropy();
  if (spec.loss == "bce_with_logits") builder.BceWithLogits();
  *request.mutable_model() = builder.Build();
  if (spec.dtype == "float64") {
    FillTensors<double>(spec, &request);
  } else {
    FillTensors<float>(spec, &request);
  }
  request.mutable_options()->set_return_input_gradient(spec.dx);
  if (checkpoint == "sqrt") {
    request.mutable_options()->mutable_checkpointing()->set_mode(v1::Checkpointing::MODE_SQRT);
  }
  return request;
}

int64_t Percentile(const std::vector<int64_t>& sorted, double p) {
  const double rank = std::ceil(p / 100.0 * static_cast<double>(sorted.size()));
  const size_t index = static_cast<size_t>(std::max(rank, 1.0)) - 1;
  return sorted[std::min(index, sorted.size() - 1)];
}

CLI::App* AddBenchCommand(CLI::App& app, BenchOptions* options) {
  CLI::App* bench = app.add_subcommand(
      "bench",
      "load generator: keep N ComputeGradients calls in flight, report throughput and "
      "latency percentiles");
  bench->add_option("-c,--concurrency", options->concurrency, "calls kept in flight")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  bench->add_option("-d,--duration", options->duration_seconds, "measured seconds")
      ->check(CLI::Range(0.001, 86400.0))
      ->capture_default_str();
  bench->add_option("--warmup", options->warmup_seconds, "seconds before measuring (not recorded)")
      ->check(CLI::Range(0.0, 3600.0))
      ->capture_default_str();
  bench
      ->add_option("--max-calls", options->max_calls,
                   "stop after this many measured calls (0: the duration alone decides)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  bench
      ->add_option("--shape", options->shape,
                   "'seed' (batch 8, Linear 4->2, ReLU, MSE, with dx) or "
                   "batch=B,layers=W0xW1x...[,act=relu][,out_act=none][,loss=mse]"
                   "[,dtype=float32][,dx=0][,seed=7]")
      ->check([](const std::string& text) {
        std::string error;
        return ParseShape(text, &error) ? std::string() : error;
      })
      ->capture_default_str();
  bench->add_option("--checkpoint", options->checkpoint, "gradient checkpointing of each call")
      ->check(CLI::IsMember({"none", "sqrt"}))
      ->capture_default_str();
  bench
      ->add_option("--channels", options->channels,
                   "gRPC channels (one HTTP/2 connection each) the calls are spread over")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  bench->add_option("--api", options->api, "gRPC client API: callback, or cq (completion queues)")
      ->check(CLI::IsMember({"callback", "cq"}))
      ->capture_default_str();
  bench->add_option("--threads", options->threads, "--api cq: threads polling completion queues")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  bench->add_flag("--verify", options->verify,
                  "check every response's loss and gradients are bit-identical to the first's");
  bench->add_option("--json", options->json_path, "also write the results to this JSON file");
  bench->add_flag_callback(
      "--no-progress", [options] { options->progress = false; },
      "no once-a-second progress line on stderr");
  return bench;
}

int RunBench(const std::string& target, const ClientOptions& client_options,
             std::shared_ptr<grpc::ChannelCredentials> credentials, const BenchOptions& options) {
  std::string error;
  const std::optional<ShapeSpec> spec = ParseShape(options.shape, &error);
  if (!spec) {
    std::cerr << "bench: --shape: " << error << "\n";
    return 2;
  }
  if (options.channels > options.concurrency) {
    std::cerr << "bench: --channels " << options.channels << " exceeds --concurrency "
              << options.concurrency << " (a channel would carry no call)\n";
    return 2;
  }
  const v1::ComputeGradientsRequest request = BuildRequest(*spec, options.checkpoint);
  const double flops = spec->FlopsPerCall();

  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::unique_ptr<v1::GradientService::Stub>> stubs;
  for (int i = 0; i < options.channels; ++i) {
    channels.push_back(BenchChannel(target, client_options, credentials, i));
    stubs.push_back(v1::GradientService::NewStub(channels.back()));
  }
  // One call first: it fails fast on a wrong target or a request the server refuses, and its
  // response is the reference --verify compares with.
  v1::ComputeGradientsResponse reference;
  {
    grpc::ClientContext context;
    PrepareContext(client_options, &context);
    const grpc::Status status = stubs[0]->ComputeGradients(&context, request, &reference);
    if (!status.ok()) {
      std::cerr << "bench: first call to " << target
                << " failed: " << gradserve::client::FormatStatus(status) << "\n";
      return 1;
    }
  }
  for (size_t i = 1; i < channels.size(); ++i) {
    if (!channels[i]->WaitForConnected(std::chrono::system_clock::now() + client_options.timeout)) {
      std::cerr << "bench: channel " << i << " to " << target << " did not connect\n";
      return 1;
    }
  }

  Runner runner(options, client_options, request, reference, stubs);
  runner.Run();

  std::vector<int64_t> latencies;
  std::array<int64_t, 17> by_code{};
  int64_t mismatches = 0;
  for (const Slot& slot : runner.slots()) {
    latencies.insert(latencies.end(), slot.latencies_ns.begin(), slot.latencies_ns.end());
    for (size_t c = 0; c < by_code.size(); ++c) by_code[c] += slot.errors[c];
    mismatches += slot.mismatches;
  }
  std::sort(latencies.begin(), latencies.end());
  int64_t calls = 0;
  for (int64_t count : by_code) calls += count;
  const int64_t errors = calls - by_code[0];
  const double window = runner.window_seconds();
  const double completions_rate = window > 0 ? calls / window : 0;
  const double rate = window > 0 ? runner.WeightedOkCalls() / window : 0;
  const double cpu = runner.cpu_seconds();
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  auto us = [](int64_t ns) { return ns / 1000.0; };

  nlohmann::ordered_json json;
  json["target"] = target;
  json["shape"] = spec->ToString();
  json["checkpoint"] = options.checkpoint;
  json["concurrency"] = options.concurrency;
  json["channels"] = options.channels;
  json["warmup_s"] = options.warmup_seconds;
  json["warmup_calls"] = runner.warmup_calls();
  json["window_s"] = window;
  json["request_bytes"] = request.ByteSizeLong();
  json["response_bytes"] = reference.ByteSizeLong();
  json["flops_per_call"] = flops;
  json["calls"] = calls;
  json["ok"] = by_code[0];
  nlohmann::ordered_json errors_json = nlohmann::ordered_json::object();
  for (size_t c = 1; c < by_code.size(); ++c) {
    if (by_code[c] > 0) errors_json[std::string(StatusCodeName(static_cast<int>(c)))] = by_code[c];
  }
  json["errors"] = errors_json;
  json["calls_per_s"] = rate;
  json["completions_per_s"] = completions_rate;
  json["gflops_per_s"] = rate * flops / 1e9;
  if (!latencies.empty()) {
    double sum = 0;
    for (int64_t l : latencies) sum += static_cast<double>(l);
    json["latency_us"] = {
        {"min", us(latencies.front())},         {"p50", us(Percentile(latencies, 50))},
        {"p90", us(Percentile(latencies, 90))}, {"p99", us(Percentile(latencies, 99))},
        {"max", us(latencies.back())},          {"mean", sum / latencies.size() / 1000.0}};
  }
  json["client_cpu_s"] = cpu;
  json["client_cpu_percent_of_one_core"] = window > 0 ? 100.0 * cpu / window : 0;
  json["client_cpu_total_s"] = CpuSeconds();  // Since start-up: building the request included.
  json["cores"] = cores;
  json["client_threads"] = ThreadCount();
  json["verify"] = options.verify;
  if (options.verify) json["mismatches"] = mismatches;

  std::printf("target      %s\n", target.c_str());
  std::printf("shape       %s, checkpoint %s\n", spec->ToString().c_str(),
              options.checkpoint.c_str());
  std::printf("            request %zu B, response %zu B, %.4g FLOP/call (6*B*sum(in*out))\n",
              request.ByteSizeLong(), reference.ByteSizeLong(), flops);
  std::printf(
      "load        %d in flight over %d channel%s, %.2f s measured after %.2f s warmup "
      "(%lld calls)\n",
      options.concurrency, options.channels, options.channels == 1 ? "" : "s", window,
      options.warmup_seconds, static_cast<long long>(runner.warmup_calls()));
  std::printf("calls       %lld, errors %lld", static_cast<long long>(calls),
              static_cast<long long>(errors));
  for (const auto& [name, count] : errors_json.items()) {
    std::printf(" %s=%lld", name.c_str(), static_cast<long long>(count.get<int64_t>()));
  }
  std::printf("\n");
  if (flops >= 1e6) {
    std::printf("throughput  %.3f calls/s, %.2f GFLOP/s (completions/window: %.3f/s)\n", rate,
                rate * flops / 1e9, completions_rate);
  } else {
    std::printf("throughput  %.1f calls/s (completions/window: %.1f/s)\n", rate, completions_rate);
  }
  if (!latencies.empty()) {
    std::printf("latency us  p50 %.1f  p90 %.1f  p99 %.1f  max %.1f  (min %.1f, mean %.1f)\n",
                us(Percentile(latencies, 50)), us(Percentile(latencies, 90)),
                us(Percentile(latencies, 99)), us(latencies.back()), us(latencies.front()),
                json["latency_us"]["mean"].get<double>());
  }
  std::printf("client cpu  %.2f s in the window = %.0f%% of one core (%u cores), %d threads\n", cpu,
              window > 0 ? 100.0 * cpu / window : 0.0, cores, ThreadCount());
  if (options.verify) {
    std::printf("verify      %lld of %lld responses differ from the first%s%s\n",
                static_cast<long long>(mismatches), static_cast<long long>(by_code[0]),
                mismatches > 0 ? ": " : "", runner.first_mismatch().c_str());
  }
  std::fflush(stdout);

  if (!options.json_path.empty()) {
    std::ofstream out(options.json_path);
    out << json.dump(2) << "\n";
    if (!out) {
      std::cerr << "bench: could not write " << options.json_path << "\n";
      return 1;
    }
  }
  return calls > 0 && errors == 0 && mismatches == 0 ? 0 : 1;
}

}  // namespace gradserve::client::bench
