// Graph models (gradserve.v1.Graph) <-> the graph engine (server/engine/graph/), both ways:
// the model's graph into a GraphSpec, a request's named tensors into engine views, and a run's
// gradients, outputs and diagnostics into the response.
//
// Everything is validated before anything is allocated from the request's claimed sizes: names
// (non-empty, unique, declared), dtypes, shapes against the limits and against the bytes sent;
// then the engine plans the graph (shape inference, order, memory and FLOPs) and its errors are
// renamed to the API's fields ("graph.nodes[3]..." -> "model.graph.nodes[3]...", an attribute
// by its index and name, "graph.loss.target" -> "model.graph.loss_target"). Tensors are read in
// place from the request's bytes (copied only when misaligned, and INT32 ids widened to int64).
#ifndef GRADSERVE_SERVICE_CONVERT_GRAPH_H_
#define GRADSERVE_SERVICE_CONVERT_GRAPH_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "gradserve/v1/gradserve.pb.h"
#include "server/engine/graph/executor.h"
#include "server/engine/graph/graph.h"
#include "server/service/limits.h"

namespace gradserve::service {

namespace v1 = ::gradserve::v1;

// A graph request's tensors as the engine reads them. Pointers into the request (which must
// outlive this) or into the storage held here.
struct GraphViews {
  std::shared_ptr<const engine::graph::Graph> graph;
  v1::DType dtype = v1::DTYPE_UNSPECIFIED;
  std::vector<const void*> inputs;      // By graph input: const T* or const int64_t*.
  std::vector<const void*> parameters;  // By graph parameter: const T*.
  std::vector<int> input_gradients;     // Graph input indices, in input_gradient_names order.
  bool return_output = false;
  uint64_t dropout_seed = 0;
  engine::CheckpointMode checkpoint_mode = engine::CheckpointMode::kNone;
  // Bytes of the answer's outputs and input gradients, known once planned.
  int64_t output_bytes = 0;
  int64_t num_examples = 0;
  std::vector<std::vector<int64_t>> widened;  // INT32 graph inputs as int64.
  std::vector<std::unique_ptr<uint64_t[]>> aligned_copies;
};

// The validated structure of a model's graph (no tensors sent with a call needed), and its
// plans: one per tuple of input shapes, built on first use and kept if `cache` is set (a
// stream keeps them; a unary call plans once).
class GraphPlanner {
 public:
  // Validates model.graph and model.loss (field names as the API's) and the options' graph
  // fields. RESOURCE_EXHAUSTED for the graph limits.
  static absl::StatusOr<std::unique_ptr<GraphPlanner>> Create(const v1::Model& model,
                                                              const v1::ComputeOptions& options,
                                                              const ServiceLimits& limits,
                                                              bool cache);

  const engine::graph::GraphSpec& spec() const { return spec_; }
  // The plan for these shapes in `dtype`. Engine errors are renamed to the API's fields. A
  // planner without a cache gives its spec to the first plan and can plan only once.
  absl::StatusOr<std::shared_ptr<const engine::graph::Graph>> Plan(
      engine::graph::DType dtype, const std::vector<engine::graph::Shape>& input_shapes);
  // Plans built so far (a stream builds one per batch shape).
  int64_t plans_built() const { return plans_built_; }
  engine::CheckpointMode checkpoint_mode() const { return base_.checkpoint; }
  // The index in model.graph.parameters / inputs with this name, or -1.
  int FindParameter(const std::string& name) const;
  int FindInput(const std::string& name) const;
  // Bytes the spec's converted constants hold (8 per element).
  int64_t constant_bytes() const { return constant_bytes_; }
  // A cache keeps at most this many plans (the oldest goes first): a stream whose batches
  // change shape every step cannot pile plans up.
  static constexpr size_t kMaxCachedPlans = 8;

 private:
  GraphPlanner() = default;
  absl::Status Rename(const absl::Status& status) const;

  engine::graph::GraphSpec spec_;
  engine::graph::PlanOptions base_;
  bool cache_ = false;
  bool spent_ = false;
  // Spec node index -> model.graph.nodes index (Constant nodes with a tensor value become
  // constants), and each spec node's attribute indices in the request.
  std::vector<int> node_index_;
  std::vector<std::vector<std::pair<std::string, int>>> attribute_index_;
  std::vector<int> constant_index_;  // Spec constant -> model.graph.constants (-1: a node's).
  int64_t constant_bytes_ = 0;
  std::unordered_map<std::string, int> parameter_index_, input_index_;
  using PlanKey = std::pair<engine::graph::DType, std::vector<engine::graph::Shape>>;
  std::map<PlanKey, std::shared_ptr<const engine::graph::Graph>> plans_;
  std::deque<PlanKey> plan_order_;  // Oldest first.
  int64_t plans_built_ = 0;
};

// Whether a request is for a graph model (an ONNX model is one once imported).
inline bool IsGraphRequest(const v1::ComputeGradientsRequest& request) {
  return request.model().has_graph() || request.model().has_onnx();
}

// Validates a graph request's tensors and plans it with `planner` (made from request.model and
// request.options). Checks the plan's peak (activation_bytes) against max_activation_bytes and
// its FLOPs against max_call_flops (times `flops_factor`: CheckGradients' extra passes) before
// anything is allocated for the run.
absl::StatusOr<std::unique_ptr<GraphViews>> PrepareGraphRequest(
    const v1::ComputeGradientsRequest& request, const ServiceLimits& limits, GraphPlanner* planner,
    double flops_factor, int64_t* activation_bytes);

// Fields a graph request must leave unset, and a chain request's graph-only fields: the first
// one set, named.
absl::Status CheckModelForm(const v1::ComputeGradientsRequest& request);

// What a graph call's MEAN loss divides by: the loss target's elements, or for cross-entropy
// the target positions not equal to ignore_index (micro-batches are weighted by it). REQUIRES:
// a request PrepareGraphRequest accepted.
int64_t GraphLossDivisor(const v1::ComputeGradientsRequest& request);
// An upper bound of the bytes of a graph call's answer before its outputs are known.
double GraphResponseBytes(const v1::ComputeGradientsRequest& request);

// Runs a prepared graph request and fills `response` (named gradients, input gradients,
// outputs, diagnostics, stats, plan). `compute_micros` receives the engine's time.
template <typename T>
absl::Status RunGraphRequest(const GraphViews& views, const engine::graph::GraphRunOptions& options,
                             v1::ComputeGradientsResponse* response, double* compute_seconds);

// The other direction: the API's Model for an engine GraphSpec (its graph and loss), floating
// graph inputs declared as `float_dtype`, floating constants as FLOAT64 (exact: the spec holds
// doubles). GraphPlanner::Create of the result gives back the same spec.
v1::Model GraphSpecToModel(const engine::graph::GraphSpec& spec, v1::DType float_dtype);

engine::graph::DType ToEngineDType(v1::DType dtype);

// A shape's rank, sizes and element count against the graph limits, before anything is
// allocated from it: INVALID_ARGUMENT "FIELD[d]: expected a positive size", RESOURCE_EXHAUSTED
// for max_graph_rank and max_tensor_elements. Returns the element count.
absl::StatusOr<int64_t> CheckShape(std::span<const int64_t> shape, const std::string& field,
                                   const ServiceLimits& limits);

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_CONVERT_GRAPH_H_
