// Runs a planned Graph: forward in plan order, the loss, and the backward pass in reverse,
// writing gradients into caller-provided buffers.
//
// Parameters and inputs are read in place (caller memory at any address aligned to its element
// type, as for the chain); gradients are written into the caller's buffers by parameter (and
// requested input) index in GraphSpec order (Graph::FindParameter maps names). A run is
// deterministic: the same plan, data and thread count give the same bits, whatever the
// checkpoint segments (Note [Gradient accumulation] in executor.cc says in which order fan-out
// and tied-weight gradients are summed). Thread-safe: concurrent runs may share one Graph.
#ifndef GRADSERVE_ENGINE_GRAPH_EXECUTOR_H_
#define GRADSERVE_ENGINE_GRAPH_EXECUTOR_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "server/engine/backprop.h"
#include "server/engine/graph/graph.h"

namespace gradserve::engine::graph {

template <typename T>
struct GraphInputs {
  std::vector<const void*> inputs;   // One per GraphSpec::inputs: const T* or const int64_t*.
  std::vector<const T*> parameters;  // One per GraphSpec::parameters.
};

template <typename T>
struct GraphOutputs {
  std::vector<T*> parameter_gradients;  // One per parameter; all required.
  std::vector<T*> input_gradients;      // Empty, or one per input: set for requested inputs.
  std::vector<void*> outputs;           // Empty, or one per graph output: written where set.
};

struct GraphRunOptions : RunOptions {
  // Mixed into every Dropout node's seed (Note [Dropout masks] in ops_elementwise.cc): change it
  // per training step for fresh masks; the same value reproduces the same masks.
  uint64_t dropout_seed = 0;
  // A run whose plan peaks at most this many bytes takes its buffers from a pool its thread
  // keeps between runs (a training loop then allocates, and page-faults, nothing after its
  // first step); larger runs allocate fresh buffers and free them (Note [Workspace] in
  // backprop.cc, whose limit this default matches). What a thread keeps is at most this.
  int64_t retained_workspace_bytes = int64_t{64} << 20;
};

struct ValueDiagnostics {
  double value_norm = 0;  // ||value||
  // ||dL/d(value)||; unset where the backward pass computed no gradient for it (the value is
  // not floating, the loss does not depend on it, it depends on no parameter or requested
  // input, or a fusion made it unnecessary).
  std::optional<double> grad_norm;
  int64_t non_finite_count = 0;  // NaN/Inf in the value and in its gradient.
};

struct GraphRunResult {
  double loss = 0;
  std::vector<double> parameter_grad_norms;   // By parameter.
  std::vector<int64_t> parameter_non_finite;  // By parameter, in the gradient.
  // By node (GraphSpec order), one per output.
  std::vector<std::vector<ValueDiagnostics>> nodes;
  // By node (GraphSpec order): time in its forward and its backward pass (profiling).
  std::vector<double> node_forward_micros, node_backward_micros;
  double forward_micros = 0;  // Including the loss.
  double loss_micros = 0;
  double backward_micros = 0;
  int64_t peak_bytes = 0;        // Measured: buffers held at once (values, gradients, statistics).
  int64_t steps_recomputed = 0;  // Forward steps rerun by checkpointing.
};

// Forward, loss and backward. REQUIRES: buffers sized as the plan's values say. Returns
// CANCELLED if options.should_stop fired (polled between nodes), INVALID_ARGUMENT for data the
// plan could not check (a class target or Gather index out of range).
template <typename T>
absl::StatusOr<GraphRunResult> RunGraph(const Graph& graph, const GraphInputs<T>& inputs,
                                        const GraphOutputs<T>& outputs,
                                        const GraphRunOptions& options);

// The loss alone (forward pass only), in double: what finite differences differentiate.
template <typename T>
absl::StatusOr<double> GraphForwardLoss(const Graph& graph, const GraphInputs<T>& inputs,
                                        const GraphRunOptions& options);

}  // namespace gradserve::engine::graph

#endif  // GRADSERVE_ENGINE_GRAPH_EXECUTOR_H_
