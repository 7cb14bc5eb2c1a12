// Gradient checkpointing: which activations the forward pass keeps, and what the backward pass
// recomputes.
//
// Note [Checkpoint schedule]
// The layers are cut into segments [start_s, end_s). A segment is either *stored* (the forward
// pass keeps every activation its backward pass reads) or *recomputed* (the forward pass keeps
// only its input a_{start_s}, and only if the segment reads it or has something to recompute;
// just before the segment's backward pass, its forward pass runs again from that input and
// keeps what the backward pass reads). An activation is released
// after the backward pass of the lowest-numbered segment that reads it. The plan below spells
// the whole schedule out, so that the executor follows it literally and the planner can predict
// the peak of cached bytes exactly by replaying it (PredictPeak). Recomputation reruns the same
// code on the same data, so every plan gives bit-identical gradients.
//
// Cached bytes count activations the engine allocates to keep; a_0, the caller's input, is read
// in place and costs nothing. Transient buffers (the two activations in flight during a
// forward pass, the two gradient buffers) are workspace, not cache.
#ifndef GRADSERVE_ENGINE_CHECKPOINT_H_
#define GRADSERVE_ENGINE_CHECKPOINT_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "server/engine/model.h"

namespace gradserve::engine {

enum class CheckpointMode { kNone, kEveryK, kSqrt, kMemoryBudget };

struct CheckpointOptions {
  CheckpointMode mode = CheckpointMode::kNone;
  int64_t every_k = 0;              // kEveryK: 1 .. num_layers.
  int64_t memory_budget_bytes = 0;  // kMemoryBudget: > 0.
  // Without dx, layers below the first Linear layer get no backward pass, so nothing needs
  // keeping for them.
  bool computes_input_gradient = true;
  // kMemoryBudget: polled between planning steps (at most ~1 ms apart); returning true abandons
  // planning with CANCELLED. Empty: never stop.
  std::function<bool()> should_stop = nullptr;
  // kMemoryBudget: the work (in planner steps, see Note [Bounded budget planning]) above which the
  // planner gives up the exact optimum for a bounded approximation. The default keeps planning
  // well under 100 ms for any model; tests lower it to exercise the bounded path.
  int64_t planner_work_limit = kDefaultPlannerWorkLimit;

  static constexpr int64_t kDefaultPlannerWorkLimit = int64_t{1} << 24;
};

// The lowest layer whose backward pass runs: 0 with dx, else the first Linear layer (0 if none).
int LowestBackwardLayer(const Model& model, bool computes_input_gradient);

struct CheckpointPlan {
  CheckpointMode mode = CheckpointMode::kNone;
  std::vector<int> segment_starts;       // Ascending, first is 0.
  std::vector<bool> segment_recomputed;  // Parallel to segment_starts.
  // Layers below this one have no backward pass (see CheckpointOptions).
  int lowest_backward_layer = 0;

  // The schedule derived from the segments (see Note [Checkpoint schedule]); indexed by
  // activation k in [0, num_layers] or by segment.
  std::vector<bool> keep_in_forward;  // a_k is cached by the forward pass.
  std::vector<int> release_after;     // Segment after whose backward a_k is freed; -1: unused.
  std::vector<int> recompute_end;     // Per segment: rerun layers [start, recompute_end).
  std::vector<bool> recompute_keeps;  // a_k is cached while its segment is recomputed.

  int64_t predicted_peak_bytes = 0;
  int64_t predicted_recomputed_layers = 0;
  // kMemoryBudget: whether predicted_peak_bytes fits the budget; if not, the plan is the
  // leanest one and min_peak_bytes is its peak.
  bool budget_met = true;
  int64_t min_peak_bytes = 0;
  // kMemoryBudget: the planner steps spent (deterministic; see Note [Bounded budget planning]).
  int64_t planner_work = 0;

  int num_segments() const { return static_cast<int>(segment_starts.size()); }
  int segment_end(int s, int num_layers) const {
    return s + 1 < num_segments() ? segment_starts[s + 1] : num_layers;
  }
};

// Builds the plan for a batch of `batch` rows of element_bytes-sized values. INVALID_ARGUMENT
// names "options.checkpointing.*" for a bad every_k or budget; CANCELLED if options.should_stop
// fired. kMemoryBudget returns, among the plans that fit the budget, one recomputing no more
// layers than any uniform (EVERY_K, SQRT) plan that fits, and the fewest of all plans when the
// model is small enough for the exact search; if nothing fits, the leanest plan, with
// budget_met = false and min_peak_bytes its peak. Its cost is bounded whatever the model and
// budget (Note [Bounded budget planning]).
absl::StatusOr<CheckpointPlan> PlanCheckpoints(const Model& model, int64_t batch,
                                               int64_t element_bytes,
                                               const CheckpointOptions& options);

// Derives the schedule and predictions for explicit segments. REQUIRES: starts ascending,
// starts[0] == 0, every start < num_layers, recomputed.size() == starts.size().
CheckpointPlan MakeCheckpointPlan(const Model& model, int64_t batch, int64_t element_bytes,
                                  CheckpointMode mode, std::vector<int> starts,
                                  std::vector<bool> recomputed, int lowest_backward_layer = 0);

// Bytes of cached activations the unconstrained plan (kNone) holds at its peak.
int64_t NoCheckpointPeakBytes(const Model& model, int64_t batch, int64_t element_bytes);

}  // namespace gradserve::engine

#endif  // GRADSERVE_ENGINE_CHECKPOINT_H_
