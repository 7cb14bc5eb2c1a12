#include "server/engine/checkpoint.h"

#include <algorithm>
#include <array>
#include <cassert>
#include <functional>
#include <limits>
#include <optional>

#include "absl/strings/str_cat.h"

namespace gradserve::engine {
namespace {

std::vector<int64_t> ActivationBytes(const Model& model, int64_t batch, int64_t element_bytes) {
  std::vector<int64_t> bytes(model.num_layers() + 1, 0);
  for (int k = 1; k <= model.num_layers(); ++k) {
    bytes[k] = batch * model.width(k) * element_bytes;
  }
  return bytes;  // bytes[0] stays 0: the input is read in place.
}

// Replays the schedule the executor follows and returns {peak bytes, layers recomputed}.
std::pair<int64_t, int64_t> PredictPeak(const CheckpointPlan& plan, const Model& model,
                                        const std::vector<int64_t>& bytes,
                                        const std::vector<int>& segment_of_layer) {
  const int num_layers = model.num_layers();
  int64_t live = 0;
  for (int k = 1; k <= num_layers; ++k) {
    if (plan.keep_in_forward[k]) live += bytes[k];
  }
  std::vector<int64_t> recomputed_bytes(plan.num_segments(), 0);
  std::vector<int64_t> released_bytes(plan.num_segments(), 0);
  for (int k = 1; k <= num_layers; ++k) {
    if (plan.recompute_keeps[k]) recomputed_bytes[segment_of_layer[k - 1]] += bytes[k];
    if (plan.release_after[k] >= 0 && (plan.keep_in_forward[k] || plan.recompute_keeps[k])) {
      released_bytes[plan.release_after[k]] += bytes[k];
    }
  }
  int64_t peak = live;
  int64_t recomputed = 0;
  for (int s = plan.num_segments() - 1; s >= 0; --s) {
    recomputed += plan.recompute_end[s] - plan.segment_starts[s];
    live += recomputed_bytes[s];
    peak = std::max(peak, live);
    live -= released_bytes[s];
  }
  return {peak, recomputed};
}

constexpr int64_t kInfinite = std::numeric_limits<int64_t>::max();
// The most DP states (24 bytes each) one budget search allocates: 12 MiB.
constexpr int64_t kMaxBudgetStates = int64_t{1} << 19;

// The work one PlanCheckpoints call has done and the caller's stop signal; see
// Note [Bounded budget planning].
class PlanningMeter {
 public:
  explicit PlanningMeter(const std::function<bool()>& should_stop) : should_stop_(should_stop) {}
  void Add(int64_t steps) { work_ += steps; }
  // Polls the caller; once it has said stop, stays stopped.
  bool Stop() {
    if (!stopped_ && should_stop_ && should_stop_()) stopped_ = true;
    return stopped_;
  }
  bool stopped() const { return stopped_; }
  int64_t work() const { return work_; }

 private:
  const std::function<bool()>& should_stop_;
  int64_t work_ = 0;
  bool stopped_ = false;
};

// What every budget search over one model shares.
struct BudgetProblem {
  BudgetProblem(const Model& model, int64_t batch, int64_t element_bytes, int lowest)
      : model(model),
        batch(batch),
        element_bytes(element_bytes),
        lowest(lowest),
        bytes(ActivationBytes(model, batch, element_bytes)),
        reads_input_(model.num_layers(), false),
        reads_output_(model.num_layers(), false),
        interior_before(model.num_layers() + 1, 0) {
    // Looked up in the search's innermost loops: a table, not a call per lookup.
    for (int i = lowest; i < model.num_layers(); ++i) {
      reads_input_[i] = BackwardReadsInput(model.layer(i).kind);
      reads_output_[i] = BackwardReadsOutput(model.layer(i).kind);
    }
    for (int k = 1; k < model.num_layers(); ++k) {
      interior_before[k + 1] =
          interior_before[k] + (reads_output(k - 1) || reads_input(k) ? bytes[k] : 0);
    }
  }
  bool reads_output(int layer) const { return reads_output_[layer]; }
  bool reads_input(int layer) const { return reads_input_[layer]; }
  // The bytes of the interior activations a_k, p < k < q, segment [p, q) keeps or recomputes.
  int64_t interior(int p, int q) const { return interior_before[q] - interior_before[p + 1]; }

  const Model& model;
  const int64_t batch;
  const int64_t element_bytes;
  const int lowest;
  const std::vector<int64_t> bytes;
  std::vector<char> reads_input_, reads_output_;  // Per layer, false below lowest.
  std::vector<int64_t> interior_before;           // [k]: interior bytes of a_1 .. a_{k-1}.
};

struct Segments {
  std::vector<int> starts;
  std::vector<bool> recomputed;
};

struct BudgetSearch {
  std::optional<Segments> segments;  // nullopt: nothing fits (or the caller stopped us).
  // The least peak above the budget that the search turned down (or a lower bound on it): no
  // plan peaks in (budget, least_rejected). See Note [Bounded budget planning].
  int64_t least_rejected = kInfinite;
};

// Segment choice for a memory budget by dynamic programming over segment boundaries, exact for
// the schedule PredictPeak replays.
//
// While segment s is processed in the backward pass, the cached bytes are those the forward pass
// kept for segments <= s (an activation belongs to the lowest segment that reads it) plus what
// s recomputes; the peak is the largest of these sums. Segments are added left to right. How a
// boundary activation a_q is treated depends on both segments that touch it (the one ending at
// q may read it as its output; the one starting at q keeps it if it is recomputed, or if it is
// stored and its first layer reads its input), so each step also fixes the type of the next
// segment. State (p, next, c): segments cover [0, p), the segment starting at p is recomputed
// iff next, and they recompute c layers; min_prefix is the least number of kept bytes carried
// into the rest of the pass. Carrying fewer bytes never hurts later segments, and later costs do
// not depend on them, so keeping the minimum per state is exact; the chosen plan is re-checked
// with the replay all the same.
//
// The cost axis c in [0, L] is cut into `cost_buckets` buckets of equal width, each keeping only
// its entry with the least prefix: one bucket per cost is the exact search, a single bucket the
// cost-free feasibility test (Note [Bounded budget planning]).
BudgetSearch PlanForBudget(const BudgetProblem& problem, int64_t budget, int cost_buckets,
                           PlanningMeter& meter) {
  const Model& model = problem.model;
  const std::vector<int64_t>& bytes = problem.bytes;
  const int num_layers = model.num_layers();
  const int width = (num_layers + cost_buckets) / cost_buckets;  // ceil((L + 1) / buckets)
  const int buckets = (num_layers + width) / width;
  struct Entry {
    int64_t prefix = kInfinite;  // min_prefix.
    int cost = 0;
    int from = -1;  // The state this one was reached from: (from, from_recomputed, from_bucket).
    int from_bucket = 0;
    bool from_recomputed = false;
  };
  // [p][next][bucket]; p == num_layers is the end (next unused, always false).
  std::vector<Entry> states(static_cast<size_t>(num_layers + 1) * 2 * buckets);
  auto at = [&](int p, int next) {
    return states.data() + (static_cast<size_t>(p) * 2 + next) * buckets;
  };
  meter.Add(static_cast<int64_t>(states.size()));
  BudgetSearch search;
  auto reject = [&](int64_t peak) {
    search.least_rejected = std::min(search.least_rejected, peak);
  };
  at(0, 0)[0].prefix = 0;
  at(0, 1)[0].prefix = 0;
  std::vector<int> frontier;
  frontier.reserve(buckets);
  for (int p = 0; p < num_layers; ++p) {
    if (meter.Stop()) return {};
    for (int recomputed = 0; recomputed < 2; ++recomputed) {
      // Only states that carry fewer bytes than every cheaper one at p can lead anywhere better.
      const Entry* at_p = at(p, recomputed);
      frontier.clear();
      for (int b = 0; b < buckets; ++b) {
        if (at_p[b].prefix < (frontier.empty() ? kInfinite : at_p[frontier.back()].prefix)) {
          frontier.push_back(b);
        }
      }
      meter.Add(buckets);
      if (frontier.empty()) continue;
      const int64_t least_at_p = at_p[frontier.back()].prefix;
      // Interior activations a_k, p < k < q, of the segment [p, q): kept by a stored segment,
      // recomputed (the last at last_interior) by a recomputed one.
      int last_interior = p;
      for (int q = p + 1; q <= num_layers; ++q) {
        if (q - 1 > p && (problem.reads_output(q - 2) || problem.reads_input(q - 1))) {
          last_interior = q - 1;
        }
        const int64_t interior_bytes = problem.interior(p, q);
        if (least_at_p + interior_bytes > budget) {
          reject(least_at_p + interior_bytes);  // Longer segments only add interior bytes.
          break;
        }
        const bool reads_end = problem.reads_output(q - 1);
        for (int next = 0; next < 2; ++next) {
          if (q == num_layers && (recomputed || next)) continue;  // The last segment is stored.
          // Beyond the carried prefix: what the forward pass keeps for [p, q) (for the rest of
          // the pass, until [p, q) is processed), what [p, q) recomputes (only while it is
          // processed), and the boundary a_q when it belongs to the next segment.
          int64_t kept = recomputed ? 0 : interior_bytes;
          int64_t recomputed_bytes = recomputed ? interior_bytes : 0;
          int64_t carried_to_next = 0;
          int recompute_end = last_interior;
          if (q == num_layers) {
            if (reads_end) kept += bytes[q];
          } else if (next || problem.reads_input(q) || (!recomputed && reads_end)) {
            (reads_end ? kept : carried_to_next) += bytes[q];
          } else if (reads_end) {  // Only a recomputed segment gets here.
            recomputed_bytes += bytes[q];
            recompute_end = q;
          }
          const int64_t live = kept + recomputed_bytes;
          if (least_at_p + live > budget) {
            reject(least_at_p + live);
            continue;
          }
          const int added_cost = recomputed ? recompute_end - p : 0;
          kept += carried_to_next;
          meter.Add(static_cast<int64_t>(frontier.size()));
          Entry* targets = at(q, next);
          for (int b : frontier) {
            const Entry& from = at_p[b];
            const int cost = from.cost + added_cost;
            if (cost > num_layers || from.prefix + live > budget) continue;
            const int64_t prefix = from.prefix + kept;
            Entry& target = targets[cost / width];
            if (prefix < target.prefix || (prefix == target.prefix && cost < target.cost)) {
              target = {prefix, cost, p, b, recomputed == 1};
            }
          }
        }
      }
    }
  }
  const Entry* at_end = at(num_layers, 0);
  int best = -1;
  for (int b = 0; b < buckets; ++b) {
    if (at_end[b].prefix != kInfinite && (best < 0 || at_end[b].cost < at_end[best].cost)) {
      best = b;
    }
  }
  if (best < 0) return search;
  Segments segments;
  for (int q = num_layers, next = 0, b = best; q > 0;) {
    const Entry& entry = at(q, next)[b];
    segments.starts.push_back(entry.from);
    segments.recomputed.push_back(entry.from_recomputed);
    q = entry.from;
    next = entry.from_recomputed;
    b = entry.from_bucket;
  }
  std::reverse(segments.starts.begin(), segments.starts.end());
  std::reverse(segments.recomputed.begin(), segments.recomputed.end());
  search.segments = std::move(segments);
  return search;
}

// How many cost buckets PlanForBudget can afford at `budget` within work_limit steps: one per
// cost (exact) if it can. Bounds its transitions by ignoring the carried prefix: from p, the
// segments [p, q) whose interior alone fits the budget.
int AffordableCostBuckets(const BudgetProblem& problem, int64_t budget, int64_t work_limit) {
  const int num_layers = problem.model.num_layers();
  int64_t transitions = 0;
  for (int p = 0, q = 1; p < num_layers; ++p) {
    q = std::max(q, p + 1);
    while (q < num_layers && problem.interior(p, q + 1) <= budget) ++q;
    transitions += 4 * (q - p);  // (recomputed, next) for q' in (p, q].
  }
  // Per bucket: the transitions, plus allocating and scanning the states.
  const int64_t per_bucket = transitions + 4 * static_cast<int64_t>(num_layers + 1);
  const int64_t by_memory = kMaxBudgetStates / (2 * static_cast<int64_t>(num_layers + 1));
  return static_cast<int>(
      std::clamp<int64_t>(std::min(work_limit / per_bucket, by_memory), 1, num_layers + 1));
}
CheckpointPlan UniformPlan(const Model& model, int64_t batch, int64_t element_bytes,
                           CheckpointMode mode, int64_t every_k, int lowest) {
  std::vector<int> starts;
  std::vector<bool> recomputed;
  for (int64_t start = 0; start < model.num_layers(); start += every_k) {
    starts.push_back(static_cast<int>(start));
    recomputed.push_back(start + every_k < model.num_layers());  // The last segment is kept.
  }
  return MakeCheckpointPlan(model, batch, element_bytes, mode, std::move(starts),
                            std::move(recomputed), lowest);
}

// The plan with the least recomputation (then the least memory) among the budget DP's and every
// uniform segmentation's that fit `budget`; nullopt if none fits or the caller stopped us.
std::optional<CheckpointPlan> BestPlanWithin(const BudgetProblem& problem, int64_t budget,
                                             int64_t work_limit, PlanningMeter& meter) {
  const Model& model = problem.model;
  std::optional<CheckpointPlan> best;
  auto consider = [&](CheckpointPlan plan) {
    meter.Add(model.num_layers());
    if (plan.predicted_peak_bytes > budget) return;
    if (!best || plan.predicted_recomputed_layers < best->predicted_recomputed_layers ||
        (plan.predicted_recomputed_layers == best->predicted_recomputed_layers &&
         plan.predicted_peak_bytes < best->predicted_peak_bytes)) {
      best = std::move(plan);
    }
  };
  const int buckets = AffordableCostBuckets(problem, budget, work_limit);
  BudgetSearch search = PlanForBudget(problem, budget, buckets, meter);
  // Every bucket count finds a plan whenever one fits (Note [Bounded budget planning]).
  if (!search.segments) return std::nullopt;
  consider(MakeCheckpointPlan(model, problem.batch, problem.element_bytes,
                              CheckpointMode::kMemoryBudget, std::move(search.segments->starts),
                              std::move(search.segments->recomputed), problem.lowest));
  for (int k = 1; k <= model.num_layers(); ++k) {
    if (meter.Stop()) return std::nullopt;
    consider(UniformPlan(model, problem.batch, problem.element_bytes, CheckpointMode::kMemoryBudget,
                         k, problem.lowest));
  }
  return best;
}

// Among the plans that fit `budget`, the least recomputation; if none fits, the leanest plan.
absl::StatusOr<CheckpointPlan> PlanForMemoryBudget(const BudgetProblem& problem, int64_t budget,
                                                   int64_t unconstrained_peak,
                                                   const CheckpointOptions& options) {
  const Model& model = problem.model;
  PlanningMeter meter(options.should_stop);
  auto cancelled = [] { return absl::CancelledError("checkpoint planning was stopped"); };
  // Whether anything fits at all is the cheap question; ask it first.
  BudgetSearch feasible = PlanForBudget(problem, budget, /*cost_buckets=*/1, meter);
  if (meter.stopped()) return cancelled();
  int64_t target = budget;
  if (!feasible.segments) {
    // Nothing fits: find the leanest peak. Feasibility is monotone in the budget, and a failed
    // search also rules out every peak below its least_rejected.
    int64_t infeasible =
        std::max(budget, std::min(feasible.least_rejected, unconstrained_peak) - 1);
    int64_t leanest = unconstrained_peak;
    while (leanest - infeasible > 1) {
      if (meter.Stop()) return cancelled();
      const int64_t mid = infeasible + (leanest - infeasible) / 2;
      BudgetSearch search = PlanForBudget(problem, mid, /*cost_buckets=*/1, meter);
      if (meter.stopped()) return cancelled();
      if (search.segments) {
        const int64_t peak =
            MakeCheckpointPlan(model, problem.batch, problem.element_bytes,
                               CheckpointMode::kMemoryBudget, std::move(search.segments->starts),
                               std::move(search.segments->recomputed), problem.lowest)
                .predicted_peak_bytes;
        meter.Add(model.num_layers());
        assert(peak <= mid);  // The search is exact for the replay.
        leanest = std::min(peak, mid);
      } else {
        infeasible = std::max(mid, search.least_rejected - 1);
      }
    }
    target = leanest;
  }
  std::optional<CheckpointPlan> plan =
      BestPlanWithin(problem, target, options.planner_work_limit, meter);
  if (meter.stopped()) return cancelled();
  assert(plan.has_value());
  if (!feasible.segments) {
    plan->budget_met = false;
    plan->min_peak_bytes = plan->predicted_peak_bytes;
  }
  plan->planner_work = meter.work();
  return *std::move(plan);
}

}  // namespace

int LowestBackwardLayer(const Model& model, bool computes_input_gradient) {
  return computes_input_gradient || model.num_linear() == 0 ? 0 : model.linear_layer(0);
}

CheckpointPlan MakeCheckpointPlan(const Model& model, int64_t batch, int64_t element_bytes,
                                  CheckpointMode mode, std::vector<int> starts,
                                  std::vector<bool> recomputed, int lowest_backward_layer) {
  const int num_layers = model.num_layers();
  CheckpointPlan plan;
  plan.mode = mode;
  plan.segment_starts = std::move(starts);
  plan.segment_recomputed = std::move(recomputed);
  plan.lowest_backward_layer = lowest_backward_layer;
  const int num_segments = plan.num_segments();

  std::vector<int> segment_of_layer(num_layers);
  for (int s = 0; s < num_segments; ++s) {
    for (int i = plan.segment_starts[s]; i < plan.segment_end(s, num_layers); ++i) {
      segment_of_layer[i] = s;
    }
  }
  // The activations layer i's backward pass reads (none below the lowest backward layer).
  auto reads = [&](int i) -> std::array<int, 2> {
    const LayerKind kind = model.layer(i).kind;
    if (i < lowest_backward_layer) return {-1, -1};
    return {BackwardReadsInput(kind) ? i : -1, BackwardReadsOutput(kind) ? i + 1 : -1};
  };
  plan.keep_in_forward.assign(num_layers + 1, false);
  plan.release_after.assign(num_layers + 1, -1);
  plan.recompute_keeps.assign(num_layers + 1, false);
  plan.recompute_end.assign(num_segments, 0);
  auto read_by = [&](int k, int s) {
    plan.release_after[k] = plan.release_after[k] < 0 ? s : std::min(plan.release_after[k], s);
  };
  for (int i = 0; i < num_layers; ++i) {
    const int s = segment_of_layer[i];
    for (int k : reads(i)) {
      if (k < 0) continue;
      read_by(k, s);
      // A recomputed segment reads its own input from the cache, like a stored one.
      if (!plan.segment_recomputed[s] || k == plan.segment_starts[s]) {
        plan.keep_in_forward[k] = true;
      }
    }
  }
  // Last to first: whether segment s+1 keeps its input a_{end_s} is settled before segment s
  // decides whether it must recompute it.
  for (int s = num_segments - 1; s >= 0; --s) {
    const int start = plan.segment_starts[s];
    plan.recompute_end[s] = start;
    if (!plan.segment_recomputed[s]) continue;
    for (int i = start; i < plan.segment_end(s, num_layers); ++i) {
      for (int k : reads(i)) {
        if (k > start && !plan.keep_in_forward[k]) {
          plan.recompute_keeps[k] = true;
          plan.recompute_end[s] = std::max(plan.recompute_end[s], k);
        }
      }
    }
    if (plan.recompute_end[s] > start) {
      read_by(start, s);
      plan.keep_in_forward[start] = true;
    }
  }
  plan.keep_in_forward[0] = false;  // The caller's input is always at hand.
  const std::vector<int64_t> bytes = ActivationBytes(model, batch, element_bytes);
  std::tie(plan.predicted_peak_bytes, plan.predicted_recomputed_layers) =
      PredictPeak(plan, model, bytes, segment_of_layer);
  plan.min_peak_bytes = 0;
  return plan;
}

int64_t NoCheckpointPeakBytes(const Model& model, int64_t batch, int64_t element_bytes) {
  return MakeCheckpointPlan(model, batch, element_bytes, CheckpointMode::kNone, {0}, {false})
      .predicted_peak_bytes;
}

absl::StatusOr<CheckpointPlan> PlanCheckpoints(const Model& model, int64_t batch,
                                               int64_t element_bytes,
                                               const CheckpointOptions& options) {
  const int num_layers = model.num_layers();
  const int lowest = LowestBackwardLayer(model, options.computes_input_gradient);
  switch (options.mode) {
    case CheckpointMode::kNone:
      return MakeCheckpointPlan(model, batch, element_bytes, CheckpointMode::kNone, {0}, {false},
                                lowest);
    case CheckpointMode::kEveryK:
      if (options.every_k < 1 || options.every_k > num_layers) {
        return absl::InvalidArgumentError(
            absl::StrCat("options.checkpointing.every_k: expected 1 .. ", num_layers,
                         " (the number of layers) for MODE_EVERY_K, got ", options.every_k));
      }
      return UniformPlan(model, batch, element_bytes, CheckpointMode::kEveryK, options.every_k,
                         lowest);
    case CheckpointMode::kSqrt: {
      int64_t k = 1;
      while (k * k < num_layers) ++k;
      return UniformPlan(model, batch, element_bytes, CheckpointMode::kSqrt, k, lowest);
    }
    case CheckpointMode::kMemoryBudget: {
      const int64_t budget = options.memory_budget_bytes;
      if (budget <= 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "options.checkpointing.memory_budget_bytes: expected > 0 for MODE_MEMORY_BUDGET, got ",
            budget));
      }
      CheckpointPlan unconstrained = MakeCheckpointPlan(
          model, batch, element_bytes, CheckpointMode::kMemoryBudget, {0}, {false}, lowest);
      if (unconstrained.predicted_peak_bytes <= budget) return unconstrained;
      return PlanForMemoryBudget(BudgetProblem(model, batch, element_bytes, lowest), budget,
                                 unconstrained.predicted_peak_bytes, options);
    }
  }
  return absl::InvalidArgumentError("options.checkpointing.mode: unknown mode");
}

}  // namespace gradserve::engine
