// A computational graph as plain data: the engine-side mirror of the API's graph model.
//
// A GraphSpec names every tensor ("value"): the graph inputs (sent with each call), the
// trainable parameters (named as a PyTorch state_dict names them), the constants (non-trainable
// data carried in the spec) and the outputs of its nodes. Each node applies one operator, named
// and parameterised as ONNX opset 17 does ("MatMul", "LayerNormalization", ...; see ops.h for the
// list and the few later-opset names), to input values and defines its output values. Nodes may
// be listed in any order; Graph::Create (graph.h) sorts, validates and plans them.
//
// Nothing here is validated; Graph::Create does that, naming fields the way the API does:
// "graph.nodes[3]", "graph.constants[1].data", "graph.loss.target".
#ifndef GRADSERVE_ENGINE_GRAPH_SPEC_H_
#define GRADSERVE_ENGINE_GRAPH_SPEC_H_

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "server/engine/model.h"

namespace gradserve::engine::graph {

enum class DType { kFloat32, kFloat64, kInt64, kBool };

using Shape = std::vector<int64_t>;

// A graph input: its shape is given per call (PlanOptions::input_shapes). Floating inputs must
// have the call's dtype; int64 inputs hold indices (Gather) or class targets (the loss).
struct InputSpec {
  std::string name;
  DType dtype = DType::kFloat32;
};

// A trainable tensor. Its dtype is the call's floating dtype.
struct ParameterSpec {
  std::string name;  // e.g. "blocks.0.ln_1.weight"
  Shape shape;
};

// Non-trainable data. Floating constants (kFloat32/kFloat64, values in `floats`) are converted
// to the call's dtype; kInt64 and kBool constants hold their values in `ints` (bool: 0 or 1).
struct ConstantSpec {
  std::string name;
  DType dtype = DType::kFloat32;
  Shape shape;
  std::vector<double> floats;
  std::vector<int64_t> ints;
};

using AttributeValue =
    std::variant<int64_t, double, std::string, std::vector<int64_t>, std::vector<double>>;

struct AttributeSpec {
  std::string name;
  AttributeValue value;
};

struct NodeSpec {
  std::string name;                  // Free-form, for messages and diagnostics.
  std::string op_type;               // ONNX operator name, e.g. "Gemm".
  std::vector<std::string> inputs;   // Value names; "" = an optional input left out.
  std::vector<std::string> outputs;  // Value names this node defines.
  std::vector<AttributeSpec> attributes;
};

// The loss on one graph output. MSE, L1, Huber and BCE compare `output` with the float input
// `target` of the same shape (MEAN divides by its element count). Cross-entropy reads logits of
// rank >= 2 with the classes on the last axis and int64 class indices of the logits' shape
// without that axis (PyTorch's cross_entropy(logits.view(-1, V), target.view(-1))); positions
// whose target is `ignore_index` contribute nothing, and MEAN divides by the positions that are
// not ignored. kExternal: `target` is dL/d(output) itself (a pipeline stage), and the loss
// reported is sum(output * target).
struct GraphLossSpec {
  LossKind kind = LossKind::kMse;
  Reduction reduction = Reduction::kMean;
  double huber_delta = 1.0;
  int64_t ignore_index = -100;  // Cross-entropy only (PyTorch's default).
  std::string output;           // A graph output's value name.
  std::string target;           // A graph input's name.
};

struct GraphSpec {
  std::vector<InputSpec> inputs;
  std::vector<ParameterSpec> parameters;
  std::vector<ConstantSpec> constants;
  std::vector<NodeSpec> nodes;
  std::vector<std::string> outputs;  // Value names returned to the caller.
  GraphLossSpec loss;
};

}  // namespace gradserve::engine::graph

#endif  // GRADSERVE_ENGINE_GRAPH_SPEC_H_
