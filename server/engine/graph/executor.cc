#include "server/engine/graph/executor.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "server/engine/graph/kernels.h"
#include "server/engine/losses.h"

namespace gradserve::engine::graph {
namespace {

using Clock = std::chrono::steady_clock;

double MicrosSince(Clock::time_point start) {
  return std::chrono::duration<double, std::micro>(Clock::now() - start).count();
}

// Cross-entropy over logits [rows, classes] with ignore_index (PyTorch semantics): MEAN divides
// by the rows not ignored. With every row ignored, MEAN gives NaN (0/0, as PyTorch does) and
// zero gradients. Rows run in parallel; their terms are added in row order.
template <typename T>
double CrossEntropy(const GraphLossSpec& loss, int64_t rows, int64_t classes, const T* z,
                    const int64_t* targets, T* grad) {
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) count += targets[r] != loss.ignore_index;
  const bool mean = loss.reduction == Reduction::kMean;
  const T weight = mean ? T(1) / static_cast<T>(static_cast<double>(count)) : T(1);
  std::vector<double> terms(rows, 0.0);
  ForEachIndex(rows, rows * classes >= kParallelElements / 8, [&](int64_t r) {
    const T* zr = z + r * classes;
    const int64_t t = targets[r];
    if (t == loss.ignore_index) {
      if (grad != nullptr) std::memset(grad + r * classes, 0, sizeof(T) * classes);
      return;
    }
    terms[r] = CrossEntropyRowLoss(zr, classes, t);
    // dL/dz = (softmax(z) - onehot(t)) [/ count], as the chain's loss computes it.
    if (grad != nullptr) CrossEntropyRowGradient(zr, classes, t, weight, grad + r * classes);
  });
  double sum = 0;
  for (double term : terms) sum += term;
  return mean ? sum / static_cast<double>(count) : sum;
}

// The loss on the graph's loss output; writes dL/d(output) into grad if not null.
template <typename T>
double Loss(const Graph& graph, const T* output, const void* target, T* grad) {
  const GraphLossSpec& loss = graph.spec().loss;
  const ValueInfo& out = graph.values()[graph.loss_output()];
  const int64_t width = out.type.shape.empty() ? 1 : out.type.shape.back();
  const int64_t rows = width == 0 ? 0 : out.elements / width;
  if (loss.kind == LossKind::kCrossEntropy) {
    return CrossEntropy(loss, rows, width, output, static_cast<const int64_t*>(target), grad);
  }
  LossSpec spec;
  spec.kind = loss.kind;
  spec.reduction = loss.reduction;
  spec.huber_delta = loss.huber_delta;
  LossTargets<T> targets;
  if (loss.kind == LossKind::kExternal) {
    targets.output_gradient = static_cast<const T*>(target);
  } else {
    targets.targets = static_cast<const T*>(target);
  }
  if (grad == nullptr) return LossValue(spec, rows, width, output, targets);
  const double value = LossGradient(spec, rows, width, output, targets, grad);
  // The external loss reports sum(output * dL/d(output)), as its finite differences see it.
  return loss.kind == LossKind::kExternal ? LossValue(spec, rows, width, output, targets) : value;
}

absl::Status CheckTargets(const Graph& graph, const void* target) {
  const GraphLossSpec& loss = graph.spec().loss;
  if (loss.kind != LossKind::kCrossEntropy) return absl::OkStatus();
  const ValueInfo& out = graph.values()[graph.loss_output()];
  const int64_t classes = out.type.shape.back();
  const int64_t rows = classes == 0 ? 0 : out.elements / classes;
  const int64_t* t = static_cast<const int64_t*>(target);
  for (int64_t r = 0; r < rows; ++r) {
    if (t[r] != loss.ignore_index && (t[r] < 0 || t[r] >= classes)) {
      return absl::InvalidArgumentError(
          absl::StrCat("inputs[", graph.loss_target(), "] (\"", loss.target, "\"): class index ",
                       t[r], " at position ", r, " is out of range [0, ", classes,
                       ") and is not ignore_index ", loss.ignore_index));
    }
  }
  return absl::OkStatus();
}

// Buffers of one run, reused within it (best fit by size), 64-byte aligned. Counts the bytes
// asked for, as the plan's simulation does.
class BufferPool {
 public:
  BufferPool() = default;
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;
  ~BufferPool() {
    for (auto& [size, p] : free_) std::free(p);
    for (auto& [p, size] : used_) std::free(p);
  }

  void* Acquire(int64_t bytes) {
    const int64_t size = std::max<int64_t>(64, (bytes + 63) / 64 * 64);
    void* p = nullptr;
    auto it = free_.lower_bound(size);
    if (it != free_.end() && it->first <= 2 * size) {
      p = it->second;
      used_.emplace(p, it->first);
      free_.erase(it);
    } else {
      p = std::aligned_alloc(64, size);
      if (p == nullptr) throw std::bad_alloc();
      used_.emplace(p, size);
    }
    live_[p] = bytes;
    live_bytes_ += bytes;
    peak_bytes_ = std::max(peak_bytes_, live_bytes_);
    return p;
  }

  void Release(const void* cp) {
    void* p = const_cast<void*>(cp);
    auto it = used_.find(p);
    if (it == used_.end()) return;
    free_.emplace(it->second, p);
    used_.erase(it);
    auto live = live_.find(p);
    live_bytes_ -= live->second;
    live_.erase(live);
  }

  int64_t peak_bytes() const { return peak_bytes_; }

  // Ends a run: every buffer becomes free (kept for the next run), then the largest free ones
  // are returned to the system until at most `retain` bytes are kept.
  void EndRun(int64_t retain) {
    for (auto& [p, size] : used_) free_.emplace(size, p);
    used_.clear();
    live_.clear();
    live_bytes_ = 0;
    peak_bytes_ = 0;
    int64_t total = 0;
    for (auto& [size, p] : free_) total += size;
    while (total > retain && !free_.empty()) {
      auto last = std::prev(free_.end());
      total -= last->first;
      std::free(last->second);
      free_.erase(last);
    }
  }
  bool in_use = false;

 private:
  std::multimap<int64_t, void*> free_;
  std::map<void*, int64_t> used_;
  std::map<void*, int64_t> live_;
  int64_t live_bytes_ = 0;
  int64_t peak_bytes_ = 0;
};

// Note [Gradient accumulation]
// The backward pass walks the steps in reverse plan order. dL/dv for a value used by several
// nodes (fan-out, a parameter used twice as with tied weights) is the sum of one contribution
// per use: the first contribution computed -- from the consumer latest in plan order, and within
// one node the lowest input slot -- is written straight into dL/dv's buffer (the caller's, for a
// parameter or input); each later one is computed into a scratch buffer and added, g = g + c.
// So the sum runs in reverse plan order of the uses, the same order every run and every thread
// count. Parameters (and requested inputs) no contribution reaches get zeros.
template <typename T>
class Executor {
 public:
  Executor(const Graph& graph, const GraphInputs<T>& inputs, const GraphOutputs<T>* outputs,
           const GraphRunOptions& options)
      : graph_(graph),
        inputs_(inputs),
        outputs_(outputs),
        options_(options),
        values_(graph.values()),
        data_(values_.size(), nullptr),
        buffer_(values_.size(), nullptr),
        holders_(values_.size(), 0),
        grad_(values_.size(), nullptr),
        saved_(graph.steps().size(), nullptr) {
    call_.dropout_seed = options.dropout_seed;
    thread_local BufferPool thread_pool;
    retain_ = graph.costs().peak_bytes <= options.retained_workspace_bytes && !thread_pool.in_use;
    pool_ = retain_ ? &thread_pool : &own_pool_;
    pool_->in_use = true;
  }
  ~Executor() {
    pool_->EndRun(retain_ ? options_.retained_workspace_bytes : 0);
    pool_->in_use = false;
  }
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  absl::StatusOr<GraphRunResult> Run() {
    const bool backward = outputs_ != nullptr;
    GraphRunResult result;
    const GraphSpec& spec = graph_.spec();
    RETURN_IF_ERROR(CheckBuffers());
    const void* target = inputs_.inputs[graph_.loss_target()];
    RETURN_IF_ERROR(CheckTargets(graph_, target));
    result.node_forward_micros.assign(spec.nodes.size(), 0.0);
    result.node_backward_micros.assign(spec.nodes.size(), 0.0);
    if (backward) {
      result.nodes.resize(spec.nodes.size());
      for (size_t n = 0; n < spec.nodes.size(); ++n)
        result.nodes[n].resize(spec.nodes[n].outputs.size());
    }
    for (size_t v = 0; v < values_.size(); ++v) {
      const ValueInfo& info = values_[v];
      if (info.kind == ValueKind::kInput) data_[v] = inputs_.inputs[info.index];
      if (info.kind == ValueKind::kParameter) data_[v] = inputs_.parameters[info.index];
      if (info.kind == ValueKind::kConstant) data_[v] = graph_.constant_data(static_cast<int>(v));
    }

    auto start = Clock::now();
    const std::vector<Step>& steps = graph_.steps();
    const Schedule& schedule = graph_.schedule();
    for (size_t t = 0; t < steps.size(); ++t) {
      if (Stopped()) return absl::CancelledError("the call was cancelled");
      const bool stored = !schedule.segments[schedule.segment_of[t]].recompute;
      RETURN_IF_ERROR(ForwardStep(static_cast<int>(t), backward && steps[t].backward && stored,
                                  backward ? &result : nullptr, schedule.release_after_forward[t]));
    }
    const int loss_v = graph_.loss_output();
    const T* output = static_cast<const T*>(data_[loss_v]);
    if (backward && values_[loss_v].needs_grad) {
      grad_[loss_v] = static_cast<T*>(pool_->Acquire(Bytes(loss_v)));
    }
    const auto loss_start = Clock::now();
    result.loss = Loss(graph_, output, target, grad_[loss_v]);
    result.loss_micros = MicrosSince(loss_start);
    if (backward) {
      for (size_t o = 0; o < outputs_->outputs.size(); ++o) {
        if (outputs_->outputs[o] == nullptr) continue;
        const int v = graph_.output_value(static_cast<int>(o));
        std::memcpy(outputs_->outputs[o], data_[v], Bytes(v));
      }
    }
    for (int v : schedule.release_after_loss) ReleaseValue(v);
    result.forward_micros = MicrosSince(start);
    if (!backward) return result;

    // Segments from last to first (Note [Graph checkpointing] in graph.h): a recomputed one
    // reruns its forward pass first, keeping what its backward reads.
    start = Clock::now();
    param_written_.assign(spec.parameters.size(), false);
    input_written_.assign(spec.inputs.size(), false);
    for (int s = static_cast<int>(schedule.segments.size()) - 1; s >= 0; --s) {
      const Segment& segment = schedule.segments[s];
      if (segment.recompute) {
        for (int t = segment.begin; t < segment.end; ++t) {
          if (Stopped()) return absl::CancelledError("the call was cancelled");
          RETURN_IF_ERROR(
              ForwardStep(t, steps[t].backward, nullptr, schedule.release_after_recompute[t]));
          ++result.steps_recomputed;
        }
      }
      for (int t = segment.end - 1; t >= segment.begin; --t) {
        const Step& step = steps[t];
        if (!step.backward) continue;
        if (Stopped()) return absl::CancelledError("the call was cancelled");
        const auto node_start = Clock::now();
        RETURN_IF_ERROR(BackwardStep(t, &result));
        result.node_backward_micros[step.node] += MicrosSince(node_start);
      }
      for (int v : schedule.release_after_segment[s]) ReleaseValue(v);
    }
    // Tensors nothing reached: zeros.
    for (size_t p = 0; p < spec.parameters.size(); ++p) {
      T* g = outputs_->parameter_gradients[p];
      const int64_t n = values_[graph_.parameter_value(static_cast<int>(p))].elements;
      if (!param_written_[p]) std::memset(g, 0, sizeof(T) * n);
      const NormAndNonFinite m = Measure(g, n);
      result.parameter_grad_norms.push_back(m.norm);
      result.parameter_non_finite.push_back(m.non_finite);
    }
    for (size_t i = 0; i < spec.inputs.size(); ++i) {
      if (!graph_.input_gradient_requested(static_cast<int>(i)) || input_written_[i]) continue;
      std::memset(outputs_->input_gradients[i], 0,
                  sizeof(T) * values_[graph_.input_value(static_cast<int>(i))].elements);
    }
    result.backward_micros = MicrosSince(start);
    result.peak_bytes = pool_->peak_bytes();
    return result;
  }

 private:
  bool Stopped() const { return options_.should_stop && options_.should_stop(); }

  // The caller's buffers are sized by the service; this checks only that each one is there.
  absl::Status CheckBuffers() const {
    const GraphSpec& spec = graph_.spec();
    if (inputs_.inputs.size() != spec.inputs.size() ||
        inputs_.parameters.size() != spec.parameters.size()) {
      return absl::InvalidArgumentError("one buffer per graph input and parameter is required");
    }
    for (size_t i = 0; i < spec.inputs.size(); ++i) {
      if (inputs_.inputs[i] == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("inputs[", i, "]: no data"));
      }
    }
    if (outputs_ == nullptr) return absl::OkStatus();
    if (outputs_->parameter_gradients.size() != spec.parameters.size()) {
      return absl::InvalidArgumentError("one gradient buffer per parameter is required");
    }
    for (size_t i = 0; i < spec.inputs.size(); ++i) {
      if (graph_.input_gradient_requested(static_cast<int>(i)) &&
          (outputs_->input_gradients.size() != spec.inputs.size() ||
           outputs_->input_gradients[i] == nullptr)) {
        return absl::InvalidArgumentError(
            absl::StrCat("inputs[", i, "]: its gradient was planned but has no buffer"));
      }
    }
    if (!outputs_->outputs.empty() && outputs_->outputs.size() != spec.outputs.size()) {
      return absl::InvalidArgumentError("outputs: one buffer (or null) per graph output");
    }
    return absl::OkStatus();
  }

  // Step t's forward pass into fresh buffers (or sharing its input's, for an alias); measures
  // its outputs into `result` if set (the first pass of a run with backward); keeps its
  // statistics if `keep_saved`; then releases `release`.
  absl::Status ForwardStep(int t, bool keep_saved, GraphRunResult* result,
                           const std::vector<int>& release) {
    const Step& step = graph_.steps()[t];
    absl::InlinedVector<const void*, 4> in;
    absl::InlinedVector<void*, 2> out;
    for (int v : step.inputs) in.push_back(v < 0 ? nullptr : data_[v]);
    if (step.kernel->output_aliases_input()) {  // Shares its input's buffer: nothing to run.
      const int v = step.outputs[0];
      data_[v] = data_[step.inputs[0]];
      Hold(v);
      for (int r : release) ReleaseValue(r);
      return absl::OkStatus();
    }
    for (int v : step.outputs) {
      void* p = pool_->Acquire(Bytes(v));
      data_[v] = p;
      buffer_[v] = p;
      Hold(v);
      out.push_back(p);
    }
    const int64_t saved = step.kernel->saved_elements();
    if (saved > 0) saved_[t] = static_cast<T*>(pool_->Acquire(saved * sizeof(T)));
    const ForwardArgs<T> args{in.data(), out.data(), saved_[t], &call_};
    const auto node_start = Clock::now();
    RETURN_IF_ERROR(step.kernel->Forward(args));
    if (result != nullptr) {
      result->node_forward_micros[step.node] = MicrosSince(node_start);
      for (size_t o = 0; o < step.outputs.size(); ++o) {
        const int v = step.outputs[o];
        if (!IsFloat(values_[v].type.dtype)) continue;
        const NormAndNonFinite m = Measure(static_cast<const T*>(data_[v]), values_[v].elements);
        ValueDiagnostics& d = result->nodes[values_[v].node][values_[v].slot];
        d.value_norm = m.norm;
        d.non_finite_count += m.non_finite;
      }
    }
    if (saved > 0 && !keep_saved) ReleaseSaved(t);
    for (int v : release) ReleaseValue(v);
    return absl::OkStatus();
  }
  int64_t Bytes(int v) const { return values_[v].elements * DTypeSize(values_[v].type.dtype); }

  // Buffers are counted by the values holding them (a value and its aliases).
  void Hold(int v) {
    const int root = values_[v].alias_root;
    if (values_[root].kind == ValueKind::kNode) ++holders_[root];
  }
  void ReleaseValue(int v) {
    if (values_[v].kind != ValueKind::kNode || data_[v] == nullptr) return;
    data_[v] = nullptr;
    const int root = values_[v].alias_root;
    if (values_[root].kind == ValueKind::kNode && --holders_[root] == 0) {
      pool_->Release(buffer_[root]);
      buffer_[root] = nullptr;
    }
  }
  void ReleaseSaved(int t) {
    if (saved_[t] == nullptr) return;
    pool_->Release(saved_[t]);
    saved_[t] = nullptr;
  }

  absl::Status BackwardStep(int t, GraphRunResult* result) {
    const Step& step = graph_.steps()[t];
    const OpKernel& kernel = *step.kernel;
    absl::InlinedVector<const void*, 4> in;
    absl::InlinedVector<const void*, 2> out;
    absl::InlinedVector<const T*, 2> dout;
    absl::InlinedVector<T*, 4> din;
    absl::InlinedVector<void*, 4> zeros;
    for (int v : step.inputs) in.push_back(v < 0 ? nullptr : data_[v]);
    for (size_t o = 0; o < step.outputs.size(); ++o) {
      const int v = step.outputs[o];
      out.push_back(data_[v]);
      if (!IsFloat(values_[v].type.dtype)) {
        dout.push_back(nullptr);
      } else if (grad_[v] != nullptr) {
        // dL/dv is complete: every consumer ran before its producer.
        const NormAndNonFinite m = Measure(grad_[v], values_[v].elements);
        ValueDiagnostics& d = result->nodes[values_[v].node][values_[v].slot];
        d.grad_norm = m.norm;
        d.non_finite_count += m.non_finite;
        dout.push_back(grad_[v]);
      } else {
        void* z = pool_->Acquire(Bytes(v));
        std::memset(z, 0, Bytes(v));
        zeros.push_back(z);
        dout.push_back(static_cast<const T*>(z));
      }
    }
    // Where each input's contribution goes (Note [Gradient accumulation]).
    struct Pending {
      T* scratch;
      T* into;
      int64_t n;
    };
    absl::InlinedVector<Pending, 2> pending;
    bool handed = false;  // Output 0's gradient buffer passed through to an input.
    for (size_t j = 0; j < step.inputs.size(); ++j) {
      const int v = step.inputs[j];
      if (v < 0 || !InputBit(kernel.differentiable_inputs(), j) || !values_[v].needs_grad) {
        din.push_back(nullptr);
        continue;
      }
      const ValueInfo& info = values_[v];
      T* target = nullptr;
      bool first = false;
      if (info.kind == ValueKind::kParameter) {
        target = outputs_->parameter_gradients[info.index];
        first = !param_written_[info.index];
        param_written_[info.index] = true;
      } else if (info.kind == ValueKind::kInput) {
        target = outputs_->input_gradients[info.index];
        first = !input_written_[info.index];
        input_written_[info.index] = true;
      } else {
        first = grad_[v] == nullptr;
        const int out0 = step.outputs[0];
        if (first && InputBit(kernel.gradient_passthrough(), j) && !handed &&
            grad_[out0] != nullptr) {
          // dL/d(input) is dL/d(output) bit for bit: the buffer changes hands, no copy.
          handed = true;
          grad_[v] = grad_[out0];
          din.push_back(nullptr);
          continue;
        }
        if (first) grad_[v] = static_cast<T*>(pool_->Acquire(Bytes(v)));
        target = grad_[v];
      }
      if (first) {
        din.push_back(target);
      } else {
        T* scratch = static_cast<T*>(pool_->Acquire(Bytes(v)));
        pending.push_back({scratch, target, info.elements});
        din.push_back(scratch);
      }
    }
    const BackwardArgs<T> args{in.data(), out.data(), saved_[t], dout.data(), din.data(), &call_};
    kernel.Backward(args);
    for (const Pending& p : pending) {
      T* into = p.into;
      const T* c = p.scratch;
      ForEachElement(p.n, [=](int64_t j) { into[j] = into[j] + c[j]; });
      pool_->Release(p.scratch);
    }
    for (void* z : zeros) pool_->Release(z);
    for (size_t o = 0; o < step.outputs.size(); ++o) {
      const int v = step.outputs[o];
      if (grad_[v] != nullptr && !(o == 0 && handed)) pool_->Release(grad_[v]);
      grad_[v] = nullptr;
    }
    for (int v : graph_.schedule().release_after_backward[t]) ReleaseValue(v);
    ReleaseSaved(t);
    return absl::OkStatus();
  }

  const Graph& graph_;
  const GraphInputs<T>& inputs_;
  const GraphOutputs<T>* outputs_;  // Null: forward and loss only.
  const GraphRunOptions& options_;
  const std::vector<ValueInfo>& values_;
  CallContext call_;
  BufferPool own_pool_;
  BufferPool* pool_ = nullptr;  // own_pool_ or the thread's (retained between runs).
  bool retain_ = false;
  std::vector<const void*> data_;
  std::vector<void*> buffer_;  // By root value: the pool buffer it owns.
  std::vector<int> holders_;   // By root value: values holding its buffer.
  std::vector<T*> grad_;
  std::vector<T*> saved_;
  std::vector<bool> param_written_, input_written_;
};

}  // namespace

template <typename T>
absl::StatusOr<GraphRunResult> RunGraph(const Graph& graph, const GraphInputs<T>& inputs,
                                        const GraphOutputs<T>& outputs,
                                        const GraphRunOptions& options) {
  ScopedThreads threads(options.threads);
  return Executor<T>(graph, inputs, &outputs, options).Run();
}

template <typename T>
absl::StatusOr<double> GraphForwardLoss(const Graph& graph, const GraphInputs<T>& inputs,
                                        const GraphRunOptions& options) {
  ScopedThreads threads(options.threads);
  ASSIGN_OR_RETURN(const GraphRunResult result, Executor<T>(graph, inputs, nullptr, options).Run());
  return result.loss;
}

template absl::StatusOr<GraphRunResult> RunGraph<float>(const Graph&, const GraphInputs<float>&,
                                                        const GraphOutputs<float>&,
                                                        const GraphRunOptions&);
template absl::StatusOr<GraphRunResult> RunGraph<double>(const Graph&, const GraphInputs<double>&,
                                                         const GraphOutputs<double>&,
                                                         const GraphRunOptions&);
template absl::StatusOr<double> GraphForwardLoss<float>(const Graph&, const GraphInputs<float>&,
                                                        const GraphRunOptions&);
template absl::StatusOr<double> GraphForwardLoss<double>(const Graph&, const GraphInputs<double>&,
                                                         const GraphRunOptions&);

}  // namespace gradserve::engine::graph
