#include "server/engine/backprop.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "absl/container/inlined_vector.h"

namespace gradserve::engine {

namespace {

struct SumOfSquares {
  double sum = 0;         // Of the finite values.
  double non_finite = 0;  // Counted in double: the same vector width as the sums.
};

// Eight doubles; GCC and clang lower it to whatever vectors the target has (one zmm register
// with AVX-512, four xmm with SSE2), lane by lane the same IEEE operations either way.
using Double8 = double __attribute__((vector_size(64)));
using Float16 = float __attribute__((vector_size(64)));

// Whether every lane is +-0 (a NaN lane is not).
bool IsAllZero(const Double8& v) {
  double lanes[8];
  std::memcpy(lanes, &v, sizeof(lanes));
  bool zero = true;
  for (double x : lanes) zero = zero && x == 0.0;
  return zero;
}

// Sixteen running sums, element j always in sum j % 16, added up in a fixed order at the end:
// the additions are not one serial chain, so they run as two vectors of eight, and the result
// still depends only on the data. (v - v is 0 exactly for finite v, NaN for NaN and +-Inf.)
template <typename T>
SumOfSquares SumSquares(const T* data, int64_t n) {
  constexpr int kLanes = 16;
  const Double8 zero = {};
  const Double8 one = zero + 1.0;
  Double8 sums[2] = {};
  Double8 non_finite[2] = {};
  // v - v summed: NaN in some lane iff some value was not finite. Counting them lane by lane
  // costs a compare, a select and an add per eight values, so that pass runs only then.
  Double8 check[2] = {};
  const int64_t full = n - n % kLanes;
  // Loaded through a pointer, not returned: without AVX-512 a function returning a Double8
  // would have a different ABI in each build, which GCC warns about (-Wpsabi). Floats are read
  // sixteen at a time and split; read eight at a time, GCC converts them a quarter at a time.
  const auto load = [data](int64_t j, Double8* v) {
    if constexpr (std::is_same_v<T, float>) {
#ifdef __AVX512F__
      // GCC's tuning for some AVX-512 CPUs (Zen 4) converts in 128-bit pieces otherwise.
      const __m512 f = _mm512_loadu_ps(data + j);
      v[0] = (Double8)_mm512_cvtps_pd(_mm512_castps512_ps256(f));
      v[1] = (Double8)_mm512_cvtps_pd(
          _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
#else
      Float16 f;
      std::memcpy(&f, data + j, sizeof(f));
      v[0] =
          __builtin_convertvector(__builtin_shufflevector(f, f, 0, 1, 2, 3, 4, 5, 6, 7), Double8);
      v[1] = __builtin_convertvector(__builtin_shufflevector(f, f, 8, 9, 10, 11, 12, 13, 14, 15),
                                     Double8);
#endif
    } else {
      std::memcpy(v, data + j, 2 * sizeof(Double8));
    }
  };
  for (int64_t j = 0; j < full; j += kLanes) {
    Double8 v[2];
    load(j, v);
    for (int half = 0; half < 2; ++half) {
      const Double8 d = v[half] - v[half];
      sums[half] += d == zero ? v[half] * v[half] : zero;
      check[half] += d;
    }
  }
  if (!IsAllZero(check[0] + check[1])) {
    for (int64_t j = 0; j < full; j += kLanes) {
      Double8 v[2];
      load(j, v);
      for (int half = 0; half < 2; ++half) {
        non_finite[half] += (v[half] - v[half]) == zero ? zero : one;
      }
    }
  }
  double lane_sums[kLanes];
  double lane_non_finite[kLanes];
  std::memcpy(lane_sums, sums, sizeof(lane_sums));
  std::memcpy(lane_non_finite, non_finite, sizeof(lane_non_finite));
  for (int64_t j = full; j < n; ++j) {
    const double v = data[j];
    const bool finite = (v - v) == 0.0;
    lane_sums[j - full] += finite ? v * v : 0.0;
    lane_non_finite[j - full] += finite ? 0.0 : 1.0;
  }
  SumOfSquares total;
  for (int lane = 0; lane < kLanes; ++lane) {
    total.sum += lane_sums[lane];
    total.non_finite += lane_non_finite[lane];
  }
  return total;
}

}  // namespace

// Blocks of a fixed size, measured across the OpenMP team and added up in block order: the
// split does not depend on the thread count, so neither do the bits.
template <typename T>
NormAndNonFinite Measure(const T* data, int64_t n) {
  constexpr int64_t kBlock = int64_t{1} << 13;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  if (blocks <= 1) {
    const SumOfSquares s = SumSquares(data, n);
    return {std::sqrt(s.sum), static_cast<int64_t>(s.non_finite)};
  }
  absl::InlinedVector<SumOfSquares, 64> partial(blocks);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    partial[b] = SumSquares(data + b * kBlock, std::min(kBlock, n - b * kBlock));
  }
  SumOfSquares total;
  for (const SumOfSquares& s : partial) {
    total.sum += s.sum;
    total.non_finite += s.non_finite;
  }
  return {std::sqrt(total.sum), static_cast<int64_t>(total.non_finite)};
}

namespace {

using Clock = std::chrono::steady_clock;

double MicrosSince(Clock::time_point start) {
  return std::chrono::duration<double, std::micro>(Clock::now() - start).count();
}

// Note [Workspace]
// A call's buffers (cached activations, two transient activation buffers, two gradient
// buffers) come from a workspace its thread keeps between calls: the scheduler's workers each
// serve a stream of calls, and one of similar size to the last allocates nothing. A buffer only
// grows, and its contents are left as they are (every element is written before it is read:
// the engine's tests pass with every buffer poisoned with NaN). Calls that need more than
// kRetainedWorkspaceBytes get fresh buffers and free them on release, so checkpointing's saving
// stays real and no thread pins a huge call's memory. The bytes a call counts and reports are
// the ones it uses either way.
inline constexpr int64_t kRetainedWorkspaceBytes = int64_t{64} << 20;

// Buffers are Eigen-allocated, 64-byte aligned, as the executor's always were. (A first
// workspace on malloc's 16-byte alignment exposed that Eigen's tiniest products rounded by
// address: gradient-check answers changed with the worker that served them. TinyGemm in
// gemm.cc removed that, and gemm_test checks every product path at every alignment.)
template <typename T>
class GrowingBuffer {
 public:
  T* Get(int64_t n) {
    if (n > storage_.size()) storage_.resize(n);  // Not zeroed.
    return storage_.data();
  }
  void Free() { storage_.resize(0); }

 private:
  Eigen::Matrix<T, Eigen::Dynamic, 1> storage_;
};

template <typename T>
struct Workspace {
  std::vector<GrowingBuffer<T>> cache;  // Indexed by activation k.
  GrowingBuffer<T> transient[2];
  GrowingBuffer<T> grad[2];
  bool in_use = false;
};

// Note [Executor]
// One call's state. Activations a_k live either in the cache (kept, counted in live_bytes_) or
// in one of two transient buffers; act_[k] points at wherever a_k currently is (a_0 at the
// caller's input). Backward walks the plan's segments from last to first, recomputing a
// segment's forward pass first when the plan says so, and ping-pongs dL/da between two gradient
// buffers.
template <typename T>
class Executor {
 public:
  Executor(const Model& model, const CheckpointPlan& plan,
           std::span<const LinearParamsView<T>> params, const BatchView<T>& batch,
           const OutputsView<T>& outputs, const RunOptions& options)
      : model_(model),
        plan_(plan),
        params_(params),
        batch_(batch),
        outputs_(outputs),
        options_(options),
        num_layers_(model.num_layers()),
        cache_size_(num_layers_ + 1, 0),
        act_(num_layers_ + 1, nullptr) {
    thread_local Workspace<T> thread_workspace;
    const int64_t buffer_bytes = plan.predicted_peak_bytes + 4 * batch.batch * model.max_width() *
                                                                 static_cast<int64_t>(sizeof(T));
    // A call nested in another on this thread (none today) gets buffers of its own.
    retain_ = buffer_bytes <= kRetainedWorkspaceBytes && !thread_workspace.in_use;
    ws_ = retain_ ? &thread_workspace : &own_workspace_;
    ws_->in_use = true;
    if (static_cast<int>(ws_->cache.size()) < num_layers_ + 1) ws_->cache.resize(num_layers_ + 1);
  }
  ~Executor() { ws_->in_use = false; }
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  absl::StatusOr<RunResult> Run() {
    if (outputs_.input_gradient != nullptr && plan_.lowest_backward_layer != 0) {
      return absl::FailedPreconditionError(
          "dx was asked for, but the checkpoint plan was made without it "
          "(CheckpointOptions::computes_input_gradient)");
    }
    RunResult result;
    result.diagnostics.resize(num_layers_);
    const int64_t rows = batch_.batch;
    const int64_t workspace = rows * model_.max_width();
    for (int t = 0; t < 2; ++t) transient_[t] = ws_->transient[t].Get(workspace);

    auto start = Clock::now();
    act_[0] = batch_.inputs;
    for (int i = 0; i < num_layers_; ++i) {
      if (Stopped()) return absl::CancelledError("the call was cancelled");
      const int k = i + 1;
      T* out = plan_.keep_in_forward[k] ? Keep(k) : Transient(act_[i]);
      RunLayer(i, out);
      const NormAndNonFinite m = Measure(out, rows * model_.width(k));
      result.diagnostics[i].activation_norm = m.norm;
      result.diagnostics[i].non_finite_count += m.non_finite;
    }
    const T* output = act_[num_layers_];
    const int64_t out_width = model_.output_features();
    if (outputs_.output != nullptr) {
      std::memcpy(outputs_.output, output, sizeof(T) * rows * out_width);
    }
    grad_[0] = ws_->grad[0].Get(workspace);
    grad_[1] = ws_->grad[1].Get(workspace);
    T* grad = grad_[0];
    result.loss = LossGradient(model_.loss(), rows, out_width, output, batch_.targets, grad);
    result.forward_micros = MicrosSince(start);

    start = Clock::now();
    const int lowest_layer = plan_.lowest_backward_layer;
    for (int s = plan_.num_segments() - 1; s >= 0; --s) {
      const int start_layer = plan_.segment_starts[s];
      const int end_layer = plan_.segment_end(s, num_layers_);
      if (end_layer <= lowest_layer) break;
      for (int i = start_layer; i < plan_.recompute_end[s]; ++i) {
        if (Stopped()) return absl::CancelledError("the call was cancelled");
        const int k = i + 1;
        RunLayer(i, plan_.recompute_keeps[k] ? Keep(k) : Transient(act_[i]));
        ++result.layers_recomputed;
      }
      for (int i = end_layer - 1; i >= std::max(start_layer, lowest_layer); --i) {
        if (Stopped()) return absl::CancelledError("the call was cancelled");
        grad = BackwardLayer(i, grad, &result.diagnostics[i]);
      }
      for (int k = 1; k <= num_layers_; ++k) {
        if (plan_.release_after[k] == s) Release(k);
      }
    }
    if (outputs_.input_gradient != nullptr) {
      std::memcpy(outputs_.input_gradient, grad, sizeof(T) * rows * model_.input_features());
    }
    result.backward_micros = MicrosSince(start);
    result.peak_activation_bytes = peak_bytes_;
    return result;
  }

 private:
  bool Stopped() const { return options_.should_stop && options_.should_stop(); }

  T* Keep(int k) {
    cache_size_[k] = batch_.batch * model_.width(k);
    live_bytes_ += static_cast<int64_t>(sizeof(T)) * cache_size_[k];
    peak_bytes_ = std::max(peak_bytes_, live_bytes_);
    return ws_->cache[k].Get(cache_size_[k]);
  }

  void Release(int k) {
    if (cache_size_[k] == 0) return;
    live_bytes_ -= static_cast<int64_t>(sizeof(T)) * cache_size_[k];
    cache_size_[k] = 0;
    if (!retain_) ws_->cache[k].Free();
    act_[k] = nullptr;
  }

  // A transient buffer that does not hold `in`.
  T* Transient(const T* in) { return in == transient_[0] ? transient_[1] : transient_[0]; }

  LinearParamsView<T> ParamsOf(int layer) const {
    const int linear = model_.linear_index(layer);
    return linear < 0 ? LinearParamsView<T>{} : params_[linear];
  }

  void RunLayer(int i, T* out) {
    LayerForward<T>(model_.layer(i), ParamsOf(i), batch_.batch, model_.width(i), act_[i], out);
    act_[i + 1] = out;
  }

  // grad holds dL/da_{i+1}; returns where dL/da_i now is.
  T* BackwardLayer(int i, T* grad, LayerDiagnostics* diagnostics) {
    const LayerSpec& layer = model_.layer(i);
    const int64_t rows = batch_.batch;
    const NormAndNonFinite g = Measure(grad, rows * model_.width(i + 1));
    diagnostics->output_grad_norm = g.norm;
    diagnostics->non_finite_count += g.non_finite;
    if (layer.kind != LayerKind::kLinear) {
      ElementwiseBackward<T>(layer, rows, model_.width(i), act_[i], act_[i + 1], grad);
      return grad;
    }
    const int linear = model_.linear_index(i);
    const LinearGradsView<T>& grads = outputs_.gradients[linear];
    const bool wants_grad_in =
        i > plan_.lowest_backward_layer || outputs_.input_gradient != nullptr;
    T* grad_in = grad == grad_[0] ? grad_[1] : grad_[0];
    LinearBackward<T>(layer, params_[linear], rows, act_[i], grad, grads,
                      wants_grad_in ? grad_in : nullptr);
    const NormAndNonFinite w = Measure(grads.weight, layer.out_features * layer.in_features);
    diagnostics->weight_grad_norm = w.norm;
    diagnostics->non_finite_count += w.non_finite;
    if (grads.bias != nullptr) {
      const NormAndNonFinite b = Measure(grads.bias, layer.out_features);
      diagnostics->bias_grad_norm = b.norm;
      diagnostics->non_finite_count += b.non_finite;
    }
    return grad_in;
  }

  const Model& model_;
  const CheckpointPlan& plan_;
  std::span<const LinearParamsView<T>> params_;
  const BatchView<T>& batch_;
  const OutputsView<T>& outputs_;
  const RunOptions& options_;
  const int num_layers_;
  std::vector<int64_t> cache_size_;  // Elements of a_k held in the cache; 0 if none.
  std::vector<const T*> act_;
  Workspace<T>* ws_ = nullptr;  // Note [Workspace]
  Workspace<T> own_workspace_;
  bool retain_ = false;
  T* transient_[2] = {};
  T* grad_[2] = {};
  int64_t live_bytes_ = 0;
  int64_t peak_bytes_ = 0;
};

}  // namespace

ScopedThreads::ScopedThreads(int threads) : previous_(omp_get_max_threads()) {
  omp_set_num_threads(std::max(1, threads));
}

ScopedThreads::~ScopedThreads() { omp_set_num_threads(previous_); }

template <typename T>
absl::StatusOr<RunResult> RunBackprop(const Model& model, const CheckpointPlan& plan,
                                      std::span<const LinearParamsView<T>> params,
                                      const BatchView<T>& batch, const OutputsView<T>& outputs,
                                      const RunOptions& options) {
  ScopedThreads threads(options.threads);
  return Executor<T>(model, plan, params, batch, outputs, options).Run();
}

template <typename T>
double ForwardLoss(const Model& model, std::span<const LinearParamsView<T>> params,
                   const BatchView<T>& batch) {
  const int64_t workspace = batch.batch * model.max_width();
  using Buffer = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  Buffer buffers[2] = {Buffer(workspace), Buffer(workspace)};
  const T* in = batch.inputs;
  for (int i = 0; i < model.num_layers(); ++i) {
    T* out = buffers[i % 2].data();
    const int linear = model.linear_index(i);
    LayerForward<T>(model.layer(i), linear < 0 ? LinearParamsView<T>{} : params[linear],
                    batch.batch, model.width(i), in, out);
    in = out;
  }
  return LossValue(model.loss(), batch.batch, model.output_features(), in, batch.targets);
}

template absl::StatusOr<RunResult> RunBackprop<float>(const Model&, const CheckpointPlan&,
                                                      std::span<const LinearParamsView<float>>,
                                                      const BatchView<float>&,
                                                      const OutputsView<float>&, const RunOptions&);
template absl::StatusOr<RunResult> RunBackprop<double>(const Model&, const CheckpointPlan&,
                                                       std::span<const LinearParamsView<double>>,
                                                       const BatchView<double>&,
                                                       const OutputsView<double>&,
                                                       const RunOptions&);
template NormAndNonFinite Measure<float>(const float*, int64_t);
template NormAndNonFinite Measure<double>(const double*, int64_t);
template double ForwardLoss<float>(const Model&, std::span<const LinearParamsView<float>>,
                                   const BatchView<float>&);
template double ForwardLoss<double>(const Model&, std::span<const LinearParamsView<double>>,
                                    const BatchView<double>&);

}  // namespace gradserve::engine
