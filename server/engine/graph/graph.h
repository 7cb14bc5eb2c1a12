// Graph plans: a validated, shape-inferred, topologically sorted GraphSpec for one call's
// input shapes and dtype, with its memory and FLOP costs known before any tensor exists.
//
// Overview of the graph engine (server/engine/graph/):
//   spec.h       GraphSpec, plain data mirroring the API.
//   graph.h      Graph::Create: validation, shape/dtype inference, order, costs (this file).
//   op.h         the operator interface; ops_*.cc one file per op family (forward + backward).
//   kernels.h    broadcasting and deterministic reductions shared by the ops.
//   executor.h   RunGraph: forward, loss, backward into caller buffers, diagnostics.
//   chain.h      the GraphSpec of a chain ModelSpec (the chain as a graph, bit-identical).
//
// Note [Graph plan]
// Create walks the spec once: it checks limits first (from the spec's sizes alone), defines
// every value (inputs, parameters, constants, node outputs; each name once), sorts the nodes
// with Kahn's algorithm taking the lowest spec index among the ready nodes (so the order is a
// function of the spec, whatever order the nodes come in), then, in that order, has each op's
// factory check its inputs and attributes and infer its outputs' dtypes and shapes. Constant
// nodes, and cheap nodes whose inputs are all constants (or read only for their shapes, as
// Shape's), are folded into constants (Note [Constant folding] in graph.cc); Transposes and
// bias Adds around MatMuls are fused into them (Note [Fusions]). It then decides which values
// need a gradient (those that depend on a parameter or on a requested input, and on which the
// loss depends), which nodes run backward, which forward values are kept for backward (only
// what some backward reads), the checkpoint segments (Note [Graph checkpointing]) and when
// each buffer is released; replaying that schedule on sizes gives the peak memory the executor
// will hold. Cost: O(nodes + values + edges) plus each op's shape work, and a log factor for
// the ready queue. Nothing the plan holds grows with the data's sizes (only with the spec's),
// except folded constants, which count in PlanCosts::constant_bytes.
#ifndef GRADSERVE_ENGINE_GRAPH_GRAPH_H_
#define GRADSERVE_ENGINE_GRAPH_GRAPH_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "server/engine/checkpoint.h"
#include "server/engine/graph/op.h"
#include "server/engine/graph/spec.h"

namespace gradserve::engine::graph {

// Checked before anything is allocated from the spec (RESOURCE_EXHAUSTED when exceeded).
struct GraphLimits {
  int64_t max_nodes = 100'000;
  int64_t max_values = 400'000;  // inputs + parameters + constants + node outputs
  int64_t max_rank = 8;
  int64_t max_tensor_elements = int64_t{1} << 26;
};

struct PlanOptions {
  DType dtype = DType::kFloat32;  // The call's floating dtype: kFloat32 or kFloat64.
  // Note [Fusions] in graph.cc: a Transpose of the last two axes feeding a MatMul is read in
  // place, and an Add of a bias [N] after a MatMul is done by it. Same values to rounding (the
  // bias is added first, as the chain's Linear does).
  bool fuse = true;
  // Note [Graph checkpointing]: kNone, kSqrt, kEveryK (every_k cut points per segment) or
  // kMemoryBudget (the least recomputation whose peak_bytes fits memory_budget_bytes).
  CheckpointMode checkpoint = CheckpointMode::kNone;
  int64_t every_k = 0;
  int64_t memory_budget_bytes = 0;
  std::vector<Shape> input_shapes;           // One per GraphSpec::inputs, in order.
  std::vector<std::string> input_gradients;  // Floating inputs whose dL/d(input) is wanted.
  GraphLimits limits;
};

enum class ValueKind { kInput, kParameter, kConstant, kNode };

struct ValueInfo {
  std::string name;
  ValueType type;
  int64_t elements = 0;
  ValueKind kind = ValueKind::kNode;
  int index = -1;  // Input, parameter or constant index; for kNode the producing step.
  int node = -1;   // kNode: the GraphSpec node that defines it (diagnostics are by node).
  int slot = 0;    // kNode: which output of that node.
  // False for a node output a fusion made unnecessary (Note [Fusions] in graph.cc): it is never
  // computed: its value_norm stays 0 and it has no grad_norm.
  bool materialized = true;
  bool needs_grad = false;      // dL/d(value) is computed in the backward pass.
  bool kept = false;            // A node output kept from the forward pass for some backward.
  int last_forward_use = -1;    // Last step reading it in the forward pass (-1: none).
  int first_backward_use = -1;  // Lowest step whose backward reads it (released after it).
  // The value whose buffer this one shares (itself if none): Reshape, Squeeze, Unsqueeze and
  // Identity outputs alias their input, transitively.
  int alias_root = -1;
};

// One node in execution order.
struct Step {
  int node = -1;  // Index in GraphSpec::nodes.
  std::unique_ptr<OpKernel> kernel;
  std::vector<int> inputs;   // Value ids; -1 where an optional input is absent.
  std::vector<int> outputs;  // Value ids.
  bool backward = false;     // Runs in the backward pass.
};

// Note [Graph checkpointing]
// The steps are cut into segments at cut points: a step after which exactly one node value --
// its own single output -- is still needed (every path from the inputs to the loss passes
// through it, like the residual stream between blocks; parameters, inputs and constants are
// always at hand). A recomputed segment keeps nothing from its first forward pass except that
// boundary value; its backward pass first reruns its forward from the previous boundary (same
// kernels, same bits: Dropout masks come from hashes, every kernel rounds the same wherever its
// buffers sit), keeping what its backward reads. The last segment is always stored. kSqrt puts
// a boundary after every ceil(sqrt(cut points + 1))-th cut point, kEveryK after every k-th;
// kNone is one stored segment; kMemoryBudget tries none and a bounded set of k (graph.cc) and
// takes the least recomputation whose replayed peak fits the budget (RESOURCE_EXHAUSTED, with
// the least peak any of them reaches, if none does). The schedule says when each buffer is
// released in each pass.
struct Segment {
  int begin = 0;  // Steps [begin, end).
  int end = 0;
  bool recompute = false;
};

struct Schedule {
  std::vector<Segment> segments;
  std::vector<int> segment_of;  // By step.
  // By step: node values free after its forward in the first pass, after its forward when its
  // segment is recomputed, and after its backward; by segment: free once its backward is done.
  std::vector<std::vector<int>> release_after_forward, release_after_recompute,
      release_after_backward, release_after_segment;
  std::vector<int> release_after_loss;  // Graph outputs and the loss's input, unless kept.
};

struct PlanCosts {
  double forward_flops = 0;
  double backward_flops = 0;
  int64_t kept_bytes = 0;        // Forward values (and op statistics) kept for backward.
  int64_t peak_bytes = 0;        // Most bytes of values, gradients and workspace live at once.
  int64_t constant_bytes = 0;    // Constants converted to the call's dtype, held by the plan.
  int64_t steps_recomputed = 0;  // Forward steps the backward pass reruns.
};

// Immutable after Create; thread-safe to share between concurrent runs.
class Graph {
 public:
  // Validates `spec` for these input shapes. INVALID_ARGUMENT names the field as the API does
  // ("graph.nodes[3] (\"attn.qkv\", MatMul).inputs[1] (\"w\"): shape [64, 32] does not match
  // ..."); RESOURCE_EXHAUSTED for a limit.
  // Pass the spec as an rvalue to avoid copying its constants.
  static absl::StatusOr<Graph> Create(GraphSpec spec, const PlanOptions& options);

  Graph(Graph&&) = default;
  Graph& operator=(Graph&&) = default;

  // The spec as given, except the constants' data (held once, converted: constant_data).
  const GraphSpec& spec() const { return spec_; }
  DType dtype() const { return dtype_; }
  const std::vector<ValueInfo>& values() const { return values_; }
  const std::vector<Step>& steps() const { return steps_; }
  const PlanCosts& costs() const { return costs_; }

  // Value ids of inputs, parameters, graph outputs and the loss's output and target.
  int input_value(int i) const { return input_values_[i]; }
  int parameter_value(int p) const { return parameter_values_[p]; }
  int output_value(int o) const { return output_values_[o]; }
  int loss_output() const { return loss_output_; }
  int loss_target() const { return loss_target_input_; }  // An input index.
  bool input_gradient_requested(int i) const { return input_grad_requested_[i]; }
  // The index in GraphSpec::parameters / inputs with this name, or -1 (a hash lookup).
  int FindParameter(absl::string_view name) const;
  int FindInput(absl::string_view name) const;
  // Bytes of constant (or folded Constant node) value v in the call's dtype.
  const void* constant_data(int v) const;
  const Schedule& schedule() const { return schedule_; }
  // Steps after which a segment boundary may go (Note [Graph checkpointing]).
  const std::vector<int>& cut_points() const { return cut_points_; }

 private:
  Graph() = default;
  static void Fuse(const std::unordered_map<std::string_view, int>& by_name, Graph* g);
  absl::Status PlanSchedule(const PlanOptions& options);
  void BuildSchedule(int64_t k, const std::vector<bool>& held);
  void SimulateCosts();

  GraphSpec spec_;
  DType dtype_ = DType::kFloat32;
  std::vector<ValueInfo> values_;
  std::vector<Step> steps_;
  std::vector<int> input_values_, parameter_values_, output_values_;
  std::unordered_map<std::string, int> input_index_, parameter_index_;  // By name.
  std::vector<bool> input_grad_requested_;
  Schedule schedule_;
  std::vector<int> cut_points_;
  int loss_output_ = -1;
  int loss_target_input_ = -1;
  std::vector<std::vector<uint64_t>> constant_storage_;  // By constant index (8-byte aligned).
  std::vector<int> constant_slot_;                       // Value id -> storage index.
  PlanCosts costs_;
};

}  // namespace gradserve::engine::graph

#endif  // GRADSERVE_ENGINE_GRAPH_GRAPH_H_
