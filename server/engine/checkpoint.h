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
//
// Note [Bounded budget planning]
// PlanCheckpoints runs on request threads, so a MEMORY_BUDGET plan must cost a bounded amount of
// CPU whatever the model (up to the service's 1024 layers) and budget. The exact search (the
// dynamic programme over states (p, next, c) in checkpoint.cc) costs O(L^2) transitions times a
// frontier of up to L + 1 costs: over a billion steps for 1024 layers at a mid budget.
//  * Feasibility first. With the cost axis collapsed to a single bucket the same programme keeps
//    only the least carried prefix per (p, next), which is all feasibility depends on: it is an
//    exact, O(L^2)-at-worst test of "does any plan peak within B?". More generally, whatever the
//    bucketing, the entry with the least prefix of every state survives (it wins its bucket), so
//    every bucketed search finds a plan whenever one fits.
//  * The leanest peak, when nothing fits, is the least B passing that test. The test is monotone
//    in B; a passing search's plan peaks at some P <= B, so P becomes the new upper bound; a
//    failing one records the least peak it turned down, R (a lower bound on every peak it could
//    not reach), and no plan peaks in (B, R): any such plan's segments would each have passed the
//    check from a state carrying no more than the plan does. So bisection jumps past whole ranges,
//    and ~30 cheap searches replace the ~50 full planning rounds (each O(L^3) plus L uniform
//    plans) it used to take.
//  * The least recomputation, once the target peak is known, comes from one search whose cost
//    axis is cut into as many equal-width buckets as options.planner_work_limit affords (the
//    transitions are bounded up front by the segments whose interior alone fits the budget).
//    One bucket per cost is the exact search, chosen whenever affordable (every model the tests
//    compare exhaustively, 128-layer models at any budget). Coarser buckets keep the least prefix
//    per bucket, rounding costs up, so the plan may recompute more than the optimum; every uniform
//    plan (EVERY_K for each k, SQRT among them) is compared too, so the result never recomputes
//    more than any uniform plan that fits.
//  * Work is counted deterministically (CheckpointPlan::planner_work: states allocated and
//    scanned, transitions times frontier entries, layers replayed), so the choice between exact
//    and bucketed never depends on the clock, and tests bound work, not time. should_stop is
//    polled once per DP row (p) and per uniform plan: a row costs at most 4 L frontier steps.
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

  static constexpr int64_t kDefaultPlannerWorkLimit = int64_t{1} << 23;
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
