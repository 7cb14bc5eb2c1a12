#include "server/engine/checkpoint.h"

#include <algorithm>
#include <array>
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
std::optional<std::pair<std::vector<int>, std::vector<bool>>> PlanForBudget(
    const Model& model, const std::vector<int64_t>& bytes, int64_t budget, int lowest) {
  const int num_layers = model.num_layers();
  constexpr int64_t kInfinite = std::numeric_limits<int64_t>::max();
  struct Parent {
    int from = -1;
    bool from_recomputed = false;
    int from_cost = -1;
  };
  auto reads_output = [&](int layer) {
    return layer >= lowest && BackwardReadsOutput(model.layer(layer).kind);
  };
  auto reads_input = [&](int layer) {
    return layer >= lowest && BackwardReadsInput(model.layer(layer).kind);
  };
  // [p][next][c]; p == num_layers is the end (next unused, always false).
  std::vector<std::vector<std::vector<int64_t>>> min_prefix(
      num_layers + 1,
      std::vector<std::vector<int64_t>>(2, std::vector<int64_t>(num_layers + 1, kInfinite)));
  std::vector<std::vector<std::vector<Parent>>> parent(
      num_layers + 1, std::vector<std::vector<Parent>>(2, std::vector<Parent>(num_layers + 1)));
  min_prefix[0][0][0] = 0;
  min_prefix[0][1][0] = 0;
  for (int p = 0; p < num_layers; ++p) {
    for (int recomputed = 0; recomputed < 2; ++recomputed) {
      // Only states that carry fewer bytes than every cheaper one at p can lead anywhere better.
      const std::vector<int64_t>& at_p = min_prefix[p][recomputed];
      std::vector<int> frontier;
      for (int c = 0; c <= num_layers; ++c) {
        if (at_p[c] < (frontier.empty() ? kInfinite : at_p[frontier.back()])) frontier.push_back(c);
      }
      if (frontier.empty()) continue;
      const int64_t least_at_p = at_p[frontier.back()];
      // Interior activations a_k, p < k < q, of the segment [p, q): kept by a stored segment,
      // recomputed (the last at last_interior) by a recomputed one.
      int64_t interior_bytes = 0;
      int last_interior = p;
      for (int q = p + 1; q <= num_layers; ++q) {
        if (q - 1 > p && (reads_output(q - 2) || reads_input(q - 1))) {
          interior_bytes += bytes[q - 1];
          last_interior = q - 1;
        }
        if (least_at_p + interior_bytes > budget) break;
        const bool reads_end = reads_output(q - 1);
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
          } else if (next || reads_input(q) || (!recomputed && reads_end)) {
            (reads_end ? kept : carried_to_next) += bytes[q];
          } else if (reads_end) {  // Only a recomputed segment gets here.
            recomputed_bytes += bytes[q];
            recompute_end = q;
          }
          const int64_t live = kept + recomputed_bytes;
          if (least_at_p + live > budget) continue;
          const int added_cost = recomputed ? recompute_end - p : 0;
          kept += carried_to_next;
          for (int c : frontier) {
            const int64_t prefix = at_p[c];
            if (c + added_cost > num_layers || prefix + live > budget) continue;
            int64_t& target = min_prefix[q][next][c + added_cost];
            if (prefix + kept < target) {
              target = prefix + kept;
              parent[q][next][c + added_cost] = {p, recomputed == 1, c};
            }
          }
        }
      }
    }
  }
  int best_cost = -1;
  for (int c = 0; c <= num_layers; ++c) {
    if (min_prefix[num_layers][0][c] != kInfinite) {
      best_cost = c;
      break;
    }
  }
  if (best_cost < 0) return std::nullopt;
  std::vector<int> starts;
  std::vector<bool> recomputed;
  for (int q = num_layers, next = 0, c = best_cost; q > 0;) {
    const Parent& from = parent[q][next][c];
    starts.push_back(from.from);
    recomputed.push_back(from.from_recomputed);
    q = from.from;
    next = from.from_recomputed;
    c = from.from_cost;
  }
  std::reverse(starts.begin(), starts.end());
  std::reverse(recomputed.begin(), recomputed.end());
  return std::make_pair(std::move(starts), std::move(recomputed));
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
// uniform segmentation's that fit `budget`; nullopt if none fits.
std::optional<CheckpointPlan> BestPlanWithin(const Model& model, int64_t batch,
                                             int64_t element_bytes,
                                             const std::vector<int64_t>& bytes, int64_t budget,
                                             int lowest) {
  std::optional<CheckpointPlan> best;
  auto consider = [&](CheckpointPlan plan) {
    if (plan.predicted_peak_bytes > budget) return;
    if (!best || plan.predicted_recomputed_layers < best->predicted_recomputed_layers ||
        (plan.predicted_recomputed_layers == best->predicted_recomputed_layers &&
         plan.predicted_peak_bytes < best->predicted_peak_bytes)) {
      best = std::move(plan);
    }
  };
  if (auto segments = PlanForBudget(model, bytes, budget, lowest)) {
    consider(MakeCheckpointPlan(model, batch, element_bytes, CheckpointMode::kMemoryBudget,
                                std::move(segments->first), std::move(segments->second), lowest));
  }
  for (int k = 1; k <= model.num_layers(); ++k) {
    consider(UniformPlan(model, batch, element_bytes, CheckpointMode::kMemoryBudget, k, lowest));
  }
  return best;
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
      const std::vector<int64_t> bytes = ActivationBytes(model, batch, element_bytes);
      if (auto plan = BestPlanWithin(model, batch, element_bytes, bytes, budget, lowest))
        return *plan;
      // Nothing fits: find the leanest plan (feasibility is monotone in the budget).
      int64_t infeasible = budget;
      int64_t feasible = unconstrained.predicted_peak_bytes;
      while (feasible - infeasible > 1) {
        const int64_t mid = infeasible + (feasible - infeasible) / 2;
        if (BestPlanWithin(model, batch, element_bytes, bytes, mid, lowest)) {
          feasible = mid;
        } else {
          infeasible = mid;
        }
      }
      CheckpointPlan leanest =
          *BestPlanWithin(model, batch, element_bytes, bytes, feasible, lowest);
      leanest.budget_met = false;
      leanest.min_peak_bytes = leanest.predicted_peak_bytes;
      return leanest;
    }
  }
  return absl::InvalidArgumentError("options.checkpointing.mode: unknown mode");
}

}  // namespace gradserve::engine
