#include "server/engine/checkpoint.h"

#include <algorithm>
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

// Segment choice for a memory budget by dynamic programming over segment boundaries.
//
// min_prefix[p][c]: the least memory that segments covering layers [0, p) keep for the rest of
// the pass, over all segmentations whose recomputation costs c layers and whose peaks so far fit
// the budget. Extending by a segment [p, q) either stores it (keeps what its backward pass reads)
// or recomputes it (keeps only a_p; while it is recomputed, what it reads is live too). Fewer
// kept bytes never hurt later segments, so keeping only the minimum per (p, c) is exact for this
// cost model; the chosen plan is then re-checked with the exact replay.
std::optional<std::pair<std::vector<int>, std::vector<bool>>> PlanForBudget(
    const Model& model, const std::vector<int64_t>& bytes, int64_t budget) {
  const int num_layers = model.num_layers();
  constexpr int64_t kInfinite = std::numeric_limits<int64_t>::max();
  struct Parent {
    int from = -1;
    int from_cost = -1;
    bool recomputed = false;
  };
  std::vector<std::vector<int64_t>> min_prefix(num_layers + 1,
                                               std::vector<int64_t>(num_layers + 1, kInfinite));
  std::vector<std::vector<Parent>> parent(num_layers + 1, std::vector<Parent>(num_layers + 1));
  min_prefix[0][0] = 0;
  for (int p = 0; p < num_layers; ++p) {
    int64_t least_at_p = kInfinite;
    for (int c = 0; c <= num_layers; ++c) least_at_p = std::min(least_at_p, min_prefix[p][c]);
    if (least_at_p == kInfinite) continue;
    int64_t stored_bytes = 0;  // Activations in [p, q] read by layers in [p, q).
    int64_t inner_bytes = 0;   // The same, excluding a_p.
    int last_read = p;         // Highest activation index read so far (a_p if none).
    bool counted_end = false;  // Whether a_{q-1} is already in the sums.
    for (int q = p + 1; q <= num_layers; ++q) {
      const LayerKind kind = model.layer(q - 1).kind;
      if (BackwardReadsInput(kind) && !counted_end) {
        stored_bytes += bytes[q - 1];
        if (q - 1 > p) inner_bytes += bytes[q - 1];
        last_read = std::max(last_read, q - 1);
      }
      counted_end = false;
      if (BackwardReadsOutput(kind)) {
        stored_bytes += bytes[q];
        inner_bytes += bytes[q];
        last_read = q;
        counted_end = true;
      }
      if (least_at_p + std::min(stored_bytes, bytes[p] + inner_bytes) > budget) break;
      const int recompute_cost = last_read - p;
      for (int c = 0; c <= num_layers; ++c) {
        const int64_t kept = min_prefix[p][c];
        if (kept == kInfinite) continue;
        if (kept + stored_bytes <= budget && kept + stored_bytes < min_prefix[q][c]) {
          min_prefix[q][c] = kept + stored_bytes;
          parent[q][c] = {p, c, false};
        }
        const int cost = c + recompute_cost;
        if (q < num_layers && cost <= num_layers && kept + bytes[p] + inner_bytes <= budget &&
            kept + bytes[p] < min_prefix[q][cost]) {
          min_prefix[q][cost] = kept + bytes[p];
          parent[q][cost] = {p, c, true};
        }
      }
    }
  }
  int best_cost = -1;
  for (int c = 0; c <= num_layers; ++c) {
    if (min_prefix[num_layers][c] != kInfinite) {
      best_cost = c;
      break;
    }
  }
  if (best_cost < 0) return std::nullopt;
  std::vector<int> starts;
  std::vector<bool> recomputed;
  for (int q = num_layers, c = best_cost; q > 0;) {
    const Parent& from = parent[q][c];
    starts.push_back(from.from);
    recomputed.push_back(from.recomputed);
    q = from.from;
    c = from.from_cost;
  }
  std::reverse(starts.begin(), starts.end());
  std::reverse(recomputed.begin(), recomputed.end());
  return std::make_pair(std::move(starts), std::move(recomputed));
}

CheckpointPlan UniformPlan(const Model& model, int64_t batch, int64_t element_bytes,
                           CheckpointMode mode, int64_t every_k) {
  std::vector<int> starts;
  std::vector<bool> recomputed;
  for (int64_t start = 0; start < model.num_layers(); start += every_k) {
    starts.push_back(static_cast<int>(start));
    recomputed.push_back(start + every_k < model.num_layers());  // The last segment is kept.
  }
  return MakeCheckpointPlan(model, batch, element_bytes, mode, std::move(starts),
                            std::move(recomputed));
}

// The plan with the least recomputation (then the least memory) among the budget DP's and every
// uniform segmentation's that fit `budget`; nullopt if none fits.
std::optional<CheckpointPlan> BestPlanWithin(const Model& model, int64_t batch,
                                             int64_t element_bytes,
                                             const std::vector<int64_t>& bytes, int64_t budget) {
  std::optional<CheckpointPlan> best;
  auto consider = [&](CheckpointPlan plan) {
    if (plan.predicted_peak_bytes > budget) return;
    if (!best || plan.predicted_recomputed_layers < best->predicted_recomputed_layers ||
        (plan.predicted_recomputed_layers == best->predicted_recomputed_layers &&
         plan.predicted_peak_bytes < best->predicted_peak_bytes)) {
      best = std::move(plan);
    }
  };
  if (auto segments = PlanForBudget(model, bytes, budget)) {
    consider(MakeCheckpointPlan(model, batch, element_bytes, CheckpointMode::kMemoryBudget,
                                std::move(segments->first), std::move(segments->second)));
  }
  for (int k = 1; k <= model.num_layers(); ++k) {
    consider(UniformPlan(model, batch, element_bytes, CheckpointMode::kMemoryBudget, k));
  }
  return best;
}

}  // namespace

CheckpointPlan MakeCheckpointPlan(const Model& model, int64_t batch, int64_t element_bytes,
                                  CheckpointMode mode, std::vector<int> starts,
                                  std::vector<bool> recomputed) {
  const int num_layers = model.num_layers();
  CheckpointPlan plan;
  plan.mode = mode;
  plan.segment_starts = std::move(starts);
  plan.segment_recomputed = std::move(recomputed);
  const int num_segments = plan.num_segments();

  std::vector<int> segment_of_layer(num_layers);
  for (int s = 0; s < num_segments; ++s) {
    for (int i = plan.segment_starts[s]; i < plan.segment_end(s, num_layers); ++i) {
      segment_of_layer[i] = s;
    }
  }
  plan.keep_in_forward.assign(num_layers + 1, false);
  plan.release_after.assign(num_layers + 1, -1);
  plan.recompute_keeps.assign(num_layers + 1, false);
  plan.recompute_end.assign(num_segments, 0);
  auto read_by = [&](int k, int s) {
    plan.release_after[k] = plan.release_after[k] < 0 ? s : std::min(plan.release_after[k], s);
  };
  for (int i = 0; i < num_layers; ++i) {
    const int s = segment_of_layer[i];
    const LayerKind kind = model.layer(i).kind;
    for (int k : {BackwardReadsInput(kind) ? i : -1, BackwardReadsOutput(kind) ? i + 1 : -1}) {
      if (k < 0) continue;
      read_by(k, s);
      if (!plan.segment_recomputed[s]) plan.keep_in_forward[k] = true;
    }
  }
  for (int s = 0; s < num_segments; ++s) {
    const int start = plan.segment_starts[s];
    plan.recompute_end[s] = start;
    if (!plan.segment_recomputed[s]) continue;
    read_by(start, s);
    plan.keep_in_forward[start] = true;
  }
  plan.keep_in_forward[0] = false;  // The caller's input is always at hand.
  for (int s = 0; s < num_segments; ++s) {
    if (!plan.segment_recomputed[s]) continue;
    const int start = plan.segment_starts[s];
    for (int i = start; i < plan.segment_end(s, num_layers); ++i) {
      const LayerKind kind = model.layer(i).kind;
      for (int k : {BackwardReadsInput(kind) ? i : -1, BackwardReadsOutput(kind) ? i + 1 : -1}) {
        if (k > start && !plan.keep_in_forward[k]) {
          plan.recompute_keeps[k] = true;
          plan.recompute_end[s] = std::max(plan.recompute_end[s], k);
        }
      }
    }
  }
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
  switch (options.mode) {
    case CheckpointMode::kNone:
      return MakeCheckpointPlan(model, batch, element_bytes, CheckpointMode::kNone, {0}, {false});
    case CheckpointMode::kEveryK:
      if (options.every_k < 1 || options.every_k > num_layers) {
        return absl::InvalidArgumentError(absl::StrCat(
            "options.checkpointing.every_k: expected 1 .. ", num_layers,
            " (the number of layers) for MODE_EVERY_K, got ", options.every_k));
      }
      return UniformPlan(model, batch, element_bytes, CheckpointMode::kEveryK, options.every_k);
    case CheckpointMode::kSqrt: {
      int64_t k = 1;
      while (k * k < num_layers) ++k;
      return UniformPlan(model, batch, element_bytes, CheckpointMode::kSqrt, k);
    }
    case CheckpointMode::kMemoryBudget: {
      const int64_t budget = options.memory_budget_bytes;
      if (budget <= 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "options.checkpointing.memory_budget_bytes: expected > 0 for MODE_MEMORY_BUDGET, got ",
            budget));
      }
      CheckpointPlan unconstrained = MakeCheckpointPlan(
          model, batch, element_bytes, CheckpointMode::kMemoryBudget, {0}, {false});
      if (unconstrained.predicted_peak_bytes <= budget) return unconstrained;
      const std::vector<int64_t> bytes = ActivationBytes(model, batch, element_bytes);
      if (auto plan = BestPlanWithin(model, batch, element_bytes, bytes, budget)) return *plan;
      // Nothing fits: find the leanest plan (feasibility is monotone in the budget).
      int64_t infeasible = budget;
      int64_t feasible = unconstrained.predicted_peak_bytes;
      while (feasible - infeasible > 1) {
        const int64_t mid = infeasible + (feasible - infeasible) / 2;
        if (BestPlanWithin(model, batch, element_bytes, bytes, mid)) {
          feasible = mid;
        } else {
          infeasible = mid;
        }
      }
      CheckpointPlan leanest = *BestPlanWithin(model, batch, element_bytes, bytes, feasible);
      leanest.budget_met = false;
      leanest.min_peak_bytes = leanest.predicted_peak_bytes;
      return leanest;
    }
  }
  return absl::InvalidArgumentError("options.checkpointing.mode: unknown mode");
}

}  // namespace gradserve::engine
