#include "server/service/convert_graph.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <span>
#include <unordered_map>
#include <unordered_set>
#include <variant>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/engine/status_macros.h"
#include "server/service/convert.h"

namespace gradserve::service {
namespace {

namespace eg = ::gradserve::engine::graph;
using Clock = std::chrono::steady_clock;

constexpr size_t kMaxNameBytes = 256;

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

std::string DTypeName(int dtype) {
  return v1::DType_IsValid(dtype) ? v1::DType_Name(static_cast<v1::DType>(dtype))
                                  : absl::StrCat("unknown value ", dtype);
}

std::string ShapeString(std::span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

bool IsFloatDType(v1::DType dtype) {
  return dtype == v1::DTYPE_FLOAT32 || dtype == v1::DTYPE_FLOAT64;
}
bool IsIntDType(v1::DType dtype) { return dtype == v1::DTYPE_INT32 || dtype == v1::DTYPE_INT64; }

absl::Status CheckName(const std::string& name, const std::string& field) {
  if (name.empty()) return Invalid(field, "empty; every value needs a name");
  if (name.size() > kMaxNameBytes) {
    return Invalid(field, absl::StrCat("longer than ", kMaxNameBytes, " bytes"));
  }
  return absl::OkStatus();
}

// A tensor's shape and byte length (its dtype checked by the caller). Returns the elements.
absl::StatusOr<int64_t> CheckTensorBytes(const v1::Tensor& tensor, const std::string& field,
                                         const ServiceLimits& limits) {
  ASSIGN_OR_RETURN(const int64_t elements,
                   CheckShape({tensor.shape().data(), static_cast<size_t>(tensor.shape_size())},
                              field + ".shape", limits));
  const int64_t expected = elements * DTypeSize(tensor.dtype());
  if (static_cast<int64_t>(tensor.data().size()) != expected) {
    return Invalid(
        field + ".data",
        absl::StrCat("expected ", expected, " bytes (", elements, " ", DTypeName(tensor.dtype()),
                     " values of shape ",
                     ShapeString({tensor.shape().data(), static_cast<size_t>(tensor.shape_size())}),
                     "), got ", tensor.data().size()));
  }
  return elements;
}

template <typename T>
T LoadAt(const std::string& bytes, int64_t i) {
  T value;
  std::memcpy(&value, bytes.data() + i * sizeof(T), sizeof(T));
  return value;
}

// A constant tensor (from model.graph.constants or a Constant node's `t`) as engine data.
// `converted_bytes` counts what the constants converted so far hold: the engine keeps 8 bytes
// per element whatever the wire dtype (a 1-byte bool becomes an int64), so it is checked
// against max_activation_bytes before each allocation, or a 256 MiB request of bool constants
// could make the server allocate 2 GiB before any limit applied.
absl::StatusOr<eg::ConstantSpec> ToConstant(const std::string& name, const v1::Tensor& tensor,
                                            const std::string& field, const ServiceLimits& limits,
                                            int64_t* converted_bytes) {
  const v1::DType dtype = tensor.dtype();
  if (!IsFloatDType(dtype) && !IsIntDType(dtype) && dtype != v1::DTYPE_BOOL) {
    return Invalid(
        field + ".dtype",
        absl::StrCat("expected a floating, integer or bool dtype, got ", DTypeName(dtype)));
  }
  ASSIGN_OR_RETURN(const int64_t n, CheckTensorBytes(tensor, field, limits));
  *converted_bytes += n * 8;  // n <= max_tensor_elements: no overflow over max_graph_values.
  if (*converted_bytes > limits.max_activation_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat(field, ": the graph's constants would hold ", *converted_bytes,
                     " bytes once converted (8 per element), over max_activation_bytes (",
                     limits.max_activation_bytes, ")"));
  }
  eg::ConstantSpec c;
  c.name = name;
  c.shape.assign(tensor.shape().begin(), tensor.shape().end());
  const std::string& data = tensor.data();
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
    case v1::DTYPE_FLOAT64:
      c.dtype = dtype == v1::DTYPE_FLOAT32 ? eg::DType::kFloat32 : eg::DType::kFloat64;
      c.floats.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        c.floats[i] = dtype == v1::DTYPE_FLOAT32 ? LoadAt<float>(data, i) : LoadAt<double>(data, i);
      }
      break;
    case v1::DTYPE_INT32:
    case v1::DTYPE_INT64:
      c.dtype = eg::DType::kInt64;
      c.ints.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        c.ints[i] = dtype == v1::DTYPE_INT32 ? LoadAt<int32_t>(data, i) : LoadAt<int64_t>(data, i);
      }
      break;
    default:  // DTYPE_BOOL
      c.dtype = eg::DType::kBool;
      c.ints.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        const uint8_t b = static_cast<uint8_t>(data[i]);
        if (b > 1) {
          return Invalid(field + ".data",
                         absl::StrCat("bool values must be 0 or 1, got ", b, " at flat index ", i));
        }
        c.ints[i] = b;
      }
      break;
  }
  return c;
}

// The chain's loss (ToLossSpec), on the graph's output and target, with cross-entropy's
// ignore_index.
absl::StatusOr<eg::GraphLossSpec> ToGraphLoss(const v1::Model& model) {
  if (!model.has_loss()) return Invalid("model.loss", "required");
  ASSIGN_OR_RETURN(const engine::LossSpec chain, ToLossSpec(model.loss()));
  eg::GraphLossSpec loss;
  loss.kind = chain.kind;
  loss.reduction = chain.reduction;
  loss.huber_delta = chain.huber_delta;
  if (model.loss().cross_entropy().has_ignore_index()) {
    loss.ignore_index = model.loss().cross_entropy().ignore_index();
  }
  loss.output = model.graph().loss_output();
  loss.target = model.graph().loss_target();
  return loss;
}

v1::DType ToWireDType(eg::DType dtype) {
  switch (dtype) {
    case eg::DType::kFloat32:
      return v1::DTYPE_FLOAT32;
    case eg::DType::kFloat64:
      return v1::DTYPE_FLOAT64;
    case eg::DType::kInt64:
      return v1::DTYPE_INT64;
    case eg::DType::kBool:
      return v1::DTYPE_BOOL;
  }
  return v1::DTYPE_UNSPECIFIED;
}

// Sizes `tensor` as `shape` in `dtype` and returns its bytes for the engine to write.
void* AllocateTensor(v1::Tensor* tensor, v1::DType dtype, const eg::Shape& shape,
                     int64_t elements) {
  tensor->set_dtype(dtype);
  for (int64_t dim : shape) tensor->add_shape(dim);
  std::string* data = tensor->mutable_data();
  data->resize(elements * DTypeSize(dtype));
  return data->data();
}

}  // namespace

// Rank, sizes and element count of a shape against the limits. Returns the element count.
absl::StatusOr<int64_t> CheckShape(std::span<const int64_t> shape, const std::string& field,
                                   const ServiceLimits& limits) {
  if (static_cast<int64_t>(shape.size()) > limits.max_graph_rank) {
    return absl::ResourceExhaustedError(absl::StrCat(
        field, ": rank ", shape.size(), " exceeds max_graph_rank (", limits.max_graph_rank, ")"));
  }
  int64_t elements = 1;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] <= 0) {
      return Invalid(absl::StrCat(field, "[", d, "]"),
                     absl::StrCat("expected a positive size, got ", shape[d]));
    }
    // Checked before multiplying, so the product cannot overflow.
    if (shape[d] > limits.max_tensor_elements || elements * shape[d] > limits.max_tensor_elements) {
      return absl::ResourceExhaustedError(absl::StrCat(field, ": ", ShapeString(shape),
                                                       " has more than max_tensor_elements (",
                                                       limits.max_tensor_elements, ")"));
    }
    elements *= shape[d];
  }
  return elements;
}

eg::DType ToEngineDType(v1::DType dtype) {
  return dtype == v1::DTYPE_FLOAT64 ? eg::DType::kFloat64 : eg::DType::kFloat32;
}

v1::Model GraphSpecToModel(const eg::GraphSpec& spec, v1::DType float_dtype) {
  v1::Model model;
  v1::Graph* graph = model.mutable_graph();
  for (const eg::InputSpec& in : spec.inputs) {
    v1::GraphInput* out = graph->add_inputs();
    out->set_name(in.name);
    out->set_dtype(eg::IsFloat(in.dtype) ? float_dtype : ToWireDType(in.dtype));
  }
  for (const eg::ParameterSpec& p : spec.parameters) {
    v1::GraphParameter* out = graph->add_parameters();
    out->set_name(p.name);
    for (int64_t d : p.shape) out->add_shape(d);
  }
  // Floating constants travel as FLOAT64 (the spec holds them as doubles: no rounding).
  for (const eg::ConstantSpec& c : spec.constants) {
    v1::NamedTensor* out = graph->add_constants();
    out->set_name(c.name);
    v1::Tensor* t = out->mutable_tensor();
    for (int64_t d : c.shape) t->add_shape(d);
    std::string* data = t->mutable_data();
    if (c.dtype == eg::DType::kBool) {
      t->set_dtype(v1::DTYPE_BOOL);
      for (int64_t v : c.ints) data->push_back(static_cast<char>(v != 0));
    } else if (c.dtype == eg::DType::kInt64) {
      t->set_dtype(v1::DTYPE_INT64);
      data->resize(c.ints.size() * sizeof(int64_t));
      if (!c.ints.empty()) std::memcpy(data->data(), c.ints.data(), data->size());
    } else {
      t->set_dtype(v1::DTYPE_FLOAT64);
      data->resize(c.floats.size() * sizeof(double));
      if (!c.floats.empty()) std::memcpy(data->data(), c.floats.data(), data->size());
    }
  }
  for (const eg::NodeSpec& n : spec.nodes) {
    v1::Node* out = graph->add_nodes();
    out->set_name(n.name);
    out->set_op_type(n.op_type);
    for (const std::string& i : n.inputs) out->add_inputs(i);
    for (const std::string& o : n.outputs) out->add_outputs(o);
    for (const eg::AttributeSpec& a : n.attributes) {
      v1::Attribute* attr = out->add_attributes();
      attr->set_name(a.name);
      if (const auto* i = std::get_if<int64_t>(&a.value)) {
        attr->set_i(*i);
      } else if (const auto* f = std::get_if<double>(&a.value)) {
        attr->set_f(*f);
      } else if (const auto* str = std::get_if<std::string>(&a.value)) {
        attr->set_s(*str);
      } else if (const auto* ints = std::get_if<std::vector<int64_t>>(&a.value)) {
        attr->mutable_ints()->mutable_values()->Add(ints->begin(), ints->end());
      } else if (const auto* floats = std::get_if<std::vector<double>>(&a.value)) {
        attr->mutable_floats()->mutable_values()->Add(floats->begin(), floats->end());
      }
    }
  }
  for (const std::string& o : spec.outputs) graph->add_outputs(o);
  graph->set_loss_output(spec.loss.output);
  graph->set_loss_target(spec.loss.target);
  v1::Loss* loss = model.mutable_loss();
  loss->set_reduction(spec.loss.reduction == engine::Reduction::kSum ? v1::REDUCTION_SUM
                                                                     : v1::REDUCTION_MEAN);
  switch (spec.loss.kind) {
    case engine::LossKind::kMse:
      loss->mutable_mse();
      break;
    case engine::LossKind::kL1:
      loss->mutable_l1();
      break;
    case engine::LossKind::kHuber:
      loss->mutable_huber()->set_delta(spec.loss.huber_delta);
      break;
    case engine::LossKind::kCrossEntropy:
      loss->mutable_cross_entropy()->set_ignore_index(spec.loss.ignore_index);
      break;
    case engine::LossKind::kBceWithLogits:
      loss->mutable_bce_with_logits();
      break;
    case engine::LossKind::kExternal:
      loss->mutable_external();
      break;
  }
  return model;
}

absl::Status CheckModelForm(const v1::ComputeGradientsRequest& request) {
  if (request.model().has_graph() || request.model().has_onnx()) {
    if (request.model().has_graph() && request.model().has_onnx()) {
      return Invalid("model.onnx", "must be unset when model.graph is set");
    }
    if (request.model().layers_size() > 0) {
      return Invalid("model.layers",
                     "must be empty when model.graph is set (a model is either "
                     "a chain of layers or a graph)");
    }
    if (request.parameters_size() > 0) {
      return Invalid("parameters", "must be empty for a graph model (send named_parameters)");
    }
    if (request.has_inputs()) {
      return Invalid("inputs", "must be unset for a graph model (send graph_inputs)");
    }
    if (request.has_targets()) {
      return Invalid("targets",
                     "must be unset for a graph model (send the loss target in graph_inputs)");
    }
    if (request.has_output_gradient()) {
      return Invalid("output_gradient",
                     "must be unset for a graph model (send it in graph_inputs, named by "
                     "model.graph.loss_target)");
    }
    if (request.options().return_input_gradient()) {
      return Invalid("options.return_input_gradient",
                     "must be false for a graph model (name the inputs in "
                     "options.input_gradient_names)");
    }
    return absl::OkStatus();
  }
  if (request.named_parameters_size() > 0) {
    return Invalid("named_parameters", "only for graph models (model.graph)");
  }
  if (request.graph_inputs_size() > 0) {
    return Invalid("graph_inputs", "only for graph models (model.graph)");
  }
  if (request.options().input_gradient_names_size() > 0) {
    return Invalid("options.input_gradient_names",
                   "only for graph models (set options.return_input_gradient)");
  }
  if (request.model().loss().cross_entropy().has_ignore_index()) {
    return Invalid("model.loss.cross_entropy.ignore_index", "only for graph models");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<GraphPlanner>> GraphPlanner::Create(
    const v1::Model& model, const v1::ComputeOptions& options, const ServiceLimits& limits,
    bool cache) {
  const v1::Graph& graph = model.graph();
  // Limits first, from the counts alone.
  if (graph.nodes_size() > limits.max_graph_nodes) {
    return absl::ResourceExhaustedError(absl::StrCat("model.graph.nodes: ", graph.nodes_size(),
                                                     " nodes exceed max_graph_nodes (",
                                                     limits.max_graph_nodes, ")"));
  }
  int64_t values = int64_t{graph.inputs_size()} + graph.parameters_size() + graph.constants_size();
  for (const v1::Node& node : graph.nodes()) values += node.outputs_size();
  if (values > limits.max_graph_values) {
    return absl::ResourceExhaustedError(
        absl::StrCat("model.graph: ", values,
                     " values (inputs, parameters, constants and node outputs) exceed "
                     "max_graph_values (",
                     limits.max_graph_values, ")"));
  }
  std::unique_ptr<GraphPlanner> planner(new GraphPlanner());
  planner->cache_ = cache;
  eg::GraphSpec& spec = planner->spec_;
  spec.inputs.reserve(graph.inputs_size());
  for (int i = 0; i < graph.inputs_size(); ++i) {
    const v1::GraphInput& in = graph.inputs(i);
    const std::string field = absl::StrCat("model.graph.inputs[", i, "]");
    RETURN_IF_ERROR(CheckName(in.name(), field + ".name"));
    eg::InputSpec s;
    s.name = in.name();
    if (IsFloatDType(in.dtype())) {
      s.dtype = ToEngineDType(in.dtype());
    } else if (IsIntDType(in.dtype())) {
      s.dtype = eg::DType::kInt64;  // INT32 tensors are widened when they arrive.
    } else {
      return Invalid(field + ".dtype",
                     absl::StrCat("expected DTYPE_FLOAT32, DTYPE_FLOAT64, DTYPE_INT64 or "
                                  "DTYPE_INT32, got ",
                                  DTypeName(in.dtype())));
    }
    spec.inputs.push_back(std::move(s));
  }
  spec.parameters.reserve(graph.parameters_size());
  for (int p = 0; p < graph.parameters_size(); ++p) {
    const v1::GraphParameter& param = graph.parameters(p);
    const std::string field = absl::StrCat("model.graph.parameters[", p, "]");
    RETURN_IF_ERROR(CheckName(param.name(), field + ".name"));
    RETURN_IF_ERROR(CheckShape({param.shape().data(), static_cast<size_t>(param.shape_size())},
                               field + ".shape", limits)
                        .status());
    spec.parameters.push_back({param.name(), {param.shape().begin(), param.shape().end()}});
  }
  int64_t& constant_bytes = planner->constant_bytes_;
  for (int k = 0; k < graph.constants_size(); ++k) {
    const v1::NamedTensor& c = graph.constants(k);
    const std::string field = absl::StrCat("model.graph.constants[", k, "]");
    RETURN_IF_ERROR(CheckName(c.name(), field + ".name"));
    if (!c.has_tensor()) return Invalid(field + ".tensor", "required");
    ASSIGN_OR_RETURN(eg::ConstantSpec constant,
                     ToConstant(c.name(), c.tensor(), field + ".tensor", limits, &constant_bytes));
    spec.constants.push_back(std::move(constant));
    planner->constant_index_.push_back(k);
  }
  spec.nodes.reserve(graph.nodes_size());
  for (int n = 0; n < graph.nodes_size(); ++n) {
    const v1::Node& node = graph.nodes(n);
    const std::string field = absl::StrCat("model.graph.nodes[", n, "]");
    if (node.name().size() > kMaxNameBytes) {
      return Invalid(field + ".name", absl::StrCat("longer than ", kMaxNameBytes, " bytes"));
    }
    if (eg::FindOp(node.op_type()) == nullptr) {
      return Invalid(field + ".op_type",
                     absl::StrCat("unknown op \"", node.op_type().substr(0, 64),
                                  "\" (GetServerInfo.graph_ops lists the supported ones)"));
    }
    for (int o = 0; o < node.outputs_size(); ++o) {
      RETURN_IF_ERROR(CheckName(node.outputs(o), absl::StrCat(field, ".outputs[", o, "]")));
    }
    for (int i = 0; i < node.inputs_size(); ++i) {
      if (node.inputs(i).size() > kMaxNameBytes) {
        return Invalid(absl::StrCat(field, ".inputs[", i, "]"),
                       absl::StrCat("longer than ", kMaxNameBytes, " bytes"));
      }
    }
    eg::NodeSpec s;
    s.name = node.name();
    s.op_type = node.op_type();
    s.inputs.assign(node.inputs().begin(), node.inputs().end());
    s.outputs.assign(node.outputs().begin(), node.outputs().end());
    std::vector<std::pair<std::string, int>> attribute_index;
    std::unordered_set<std::string_view> seen;
    bool constant_tensor = false;
    for (int a = 0; a < node.attributes_size(); ++a) {
      const v1::Attribute& attr = node.attributes(a);
      const std::string afield =
          absl::StrCat(field, ".attributes[", a, "] (\"", attr.name().substr(0, 64), "\")");
      if (attr.name().empty() || attr.name().size() > kMaxNameBytes) {
        return Invalid(absl::StrCat(field, ".attributes[", a, "].name"),
                       "expected a non-empty name of at most 256 bytes");
      }
      if (!seen.insert(attr.name()).second) {
        return Invalid(afield, "given twice in this node");
      }
      eg::AttributeSpec as;
      as.name = attr.name();
      switch (attr.value_case()) {
        case v1::Attribute::kI:
          as.value = attr.i();
          break;
        case v1::Attribute::kF:
          as.value = attr.f();
          break;
        case v1::Attribute::kS:
          as.value = attr.s();
          break;
        case v1::Attribute::kInts:
          as.value = std::vector<int64_t>(attr.ints().values().begin(), attr.ints().values().end());
          break;
        case v1::Attribute::kFloats:
          as.value =
              std::vector<double>(attr.floats().values().begin(), attr.floats().values().end());
          break;
        case v1::Attribute::kT: {
          if (node.op_type() == "ConstantOfShape" && attr.name() == "value") {
            // The engine's attributes hold no tensors: its one element becomes a one-element
            // list, floats for a floating tensor and ints for an integer one (op.h).
            ASSIGN_OR_RETURN(
                const eg::ConstantSpec value,
                ToConstant(attr.name(), attr.t(), afield + ".t", limits, &constant_bytes));
            if (value.shape.size() > 1 || value.floats.size() + value.ints.size() != 1) {
              return Invalid(afield + ".t", "expected a one-element tensor");
            }
            if (value.dtype == eg::DType::kBool) {
              return Invalid(afield + ".t.dtype", "expected a floating or integer tensor");
            }
            if (eg::IsFloat(value.dtype)) {
              as.value = value.floats;
            } else {
              as.value = value.ints;
            }
            break;
          }
          if (node.op_type() != "Constant" || attr.name() != "value") {
            return Invalid(afield,
                           "tensor attributes are accepted only as Constant's and "
                           "ConstantOfShape's \"value\"");
          }
          if (node.outputs_size() != 1) {
            return Invalid(field + ".outputs", "a Constant node defines exactly one value");
          }
          if (node.attributes_size() != 1 || node.inputs_size() != 0) {
            return Invalid(field,
                           "a Constant node with a tensor value takes no inputs and no "
                           "other attribute");
          }
          ASSIGN_OR_RETURN(
              eg::ConstantSpec constant,
              ToConstant(node.outputs(0), attr.t(), afield + ".t", limits, &constant_bytes));
          spec.constants.push_back(std::move(constant));
          planner->constant_index_.push_back(-1);
          constant_tensor = true;
          break;
        }
        case v1::Attribute::VALUE_NOT_SET:
          return Invalid(afield, "no value set (expected one of i, f, s, ints, floats, t)");
      }
      if (constant_tensor) break;
      attribute_index.emplace_back(attr.name(), a);
      s.attributes.push_back(std::move(as));
    }
    if (constant_tensor) continue;  // Now a constant, defined under the node's output name.
    spec.nodes.push_back(std::move(s));
    planner->node_index_.push_back(n);
    planner->attribute_index_.push_back(std::move(attribute_index));
  }
  for (int o = 0; o < graph.outputs_size(); ++o) {
    RETURN_IF_ERROR(CheckName(graph.outputs(o), absl::StrCat("model.graph.outputs[", o, "]")));
  }
  spec.outputs.assign(graph.outputs().begin(), graph.outputs().end());
  if (graph.loss_output().empty()) return Invalid("model.graph.loss_output", "required");
  if (graph.loss_target().empty()) return Invalid("model.graph.loss_target", "required");
  ASSIGN_OR_RETURN(spec.loss, ToGraphLoss(model));

  eg::PlanOptions& base = planner->base_;
  ASSIGN_OR_RETURN(const engine::CheckpointOptions checkpoint,
                   ToCheckpointOptions(options.checkpointing()));
  base.checkpoint = checkpoint.mode;
  base.every_k = checkpoint.every_k;
  base.memory_budget_bytes = checkpoint.memory_budget_bytes;
  std::unordered_set<std::string_view> requested;
  for (int r = 0; r < options.input_gradient_names_size(); ++r) {
    if (!requested.insert(options.input_gradient_names(r)).second) {
      return Invalid(
          absl::StrCat("options.input_gradient_names[", r, "]"),
          absl::StrCat("\"", options.input_gradient_names(r).substr(0, 64), "\" is named twice"));
    }
    base.input_gradients.push_back(options.input_gradient_names(r));
  }
  // Duplicate names are the engine's to report (it names both definitions); the first wins here.
  for (size_t p = 0; p < spec.parameters.size(); ++p) {
    planner->parameter_index_.emplace(spec.parameters[p].name, static_cast<int>(p));
  }
  for (size_t i = 0; i < spec.inputs.size(); ++i) {
    planner->input_index_.emplace(spec.inputs[i].name, static_cast<int>(i));
  }
  base.limits.max_nodes = limits.max_graph_nodes;
  base.limits.max_values = limits.max_graph_values;
  base.limits.max_rank = limits.max_graph_rank;
  base.limits.max_tensor_elements = limits.max_tensor_elements;
  return planner;
}

// Note [Engine errors in API words]
// The engine names fields as its GraphSpec has them: "graph.nodes[k] (...)" with k a spec node
// index, ".attributes.NAME", "graph.constants[k]", "graph.loss.output", "input_gradients[r]".
// The API's names differ where the service converted: Constant nodes with a tensor value
// became constants, attributes are named by index and name, the loss's fields are the graph's.
absl::Status GraphPlanner::Rename(const absl::Status& status) const {
  if (status.ok()) return status;
  std::string message(status.message());
  auto starts = [&](absl::string_view prefix) { return absl::StartsWith(message, prefix); };
  if (starts("graph.nodes[")) {
    const size_t open = std::string_view("graph.nodes[").size();
    const size_t close = message.find(']', open);
    int k = -1;
    if (close != std::string::npos && absl::SimpleAtoi(message.substr(open, close - open), &k) &&
        k >= 0 && k < static_cast<int>(node_index_.size())) {
      std::string rest = message.substr(close + 1);
      // ".attributes.NAME: " -> ".attributes[i] (\"NAME\"): "
      const size_t at = rest.find(".attributes.");
      if (at != std::string::npos) {
        const size_t name_start = at + std::string_view(".attributes.").size();
        const size_t colon = rest.find(": ", name_start);
        if (colon != std::string::npos) {
          const std::string name = rest.substr(name_start, colon - name_start);
          for (const auto& [attr, index] : attribute_index_[k]) {
            if (attr == name) {
              rest = absl::StrCat(rest.substr(0, at), ".attributes[", index, "] (\"", name, "\")",
                                  rest.substr(colon));
              break;
            }
          }
        }
      }
      message = absl::StrCat("model.graph.nodes[", node_index_[k], "]", rest);
    } else {
      message = absl::StrCat("model.", message);
    }
  } else if (starts("graph.constants[")) {
    const size_t open = std::string_view("graph.constants[").size();
    const size_t close = message.find(']', open);
    int k = -1;
    if (close != std::string::npos && absl::SimpleAtoi(message.substr(open, close - open), &k) &&
        k >= 0 && k < static_cast<int>(constant_index_.size()) && constant_index_[k] >= 0) {
      message = absl::StrCat("model.graph.constants[", constant_index_[k], "]",
                             message.substr(close + 1));
    } else {
      message = absl::StrCat("model.", message);
    }
  } else if (starts("graph.loss.output")) {
    message = absl::StrCat("model.graph.loss_output", message.substr(17));
  } else if (starts("graph.loss.target")) {
    message = absl::StrCat("model.graph.loss_target", message.substr(17));
  } else if (starts("graph.loss.huber_delta")) {
    message = absl::StrCat("model.loss.huber.delta", message.substr(22));
  } else if (starts("graph")) {
    message = absl::StrCat("model.", message);
  } else if (starts("input_gradients[")) {
    message = absl::StrCat("options.input_gradient_names[", message.substr(16));
  } else if (starts("checkpoint.")) {
    message = absl::StrCat("options.checkpointing.", message.substr(11));
  }
  // Other nodes the message refers to ("is already defined by graph.nodes[0] ..."), by their
  // index in the request.
  static constexpr std::string_view kNodes = "graph.nodes[";
  for (size_t at = message.find(kNodes); at != std::string::npos;
       at = message.find(kNodes, at + kNodes.size())) {
    if (at >= 6 && message.compare(at - 6, 6, "model.") == 0) continue;
    const size_t open = at + kNodes.size();
    const size_t close = message.find(']', open);
    int k = -1;
    if (close == std::string::npos || !absl::SimpleAtoi(message.substr(open, close - open), &k) ||
        k < 0 || k >= static_cast<int>(node_index_.size())) {
      continue;
    }
    const std::string renamed = absl::StrCat("model.graph.nodes[", node_index_[k], "]");
    message.replace(at, close + 1 - at, renamed);
    at += renamed.size() - kNodes.size();
  }
  // Everything else the service checked before planning (input shapes, dtype).
  return absl::Status(status.code(), message);
}

absl::StatusOr<std::shared_ptr<const eg::Graph>> GraphPlanner::Plan(
    eg::DType dtype, const std::vector<eg::Shape>& input_shapes) {
  if (cache_) {
    auto it = plans_.find({dtype, input_shapes});
    if (it != plans_.end()) return it->second;
  } else if (spent_) {
    return absl::InternalError("a planner without a cache plans once");
  }
  eg::PlanOptions options = base_;
  options.dtype = dtype;
  options.input_shapes = input_shapes;
  eg::GraphSpec spec = cache_ ? spec_ : std::move(spec_);
  spent_ = !cache_;
  // The request's floating inputs were checked against their declared dtype; a plan in another
  // dtype (CheckGradients' float64 plan of a float32 call) reads them converted to it.
  for (eg::InputSpec& input : spec.inputs) {
    if (eg::IsFloat(input.dtype)) input.dtype = dtype;
  }
  absl::StatusOr<eg::Graph> graph = eg::Graph::Create(std::move(spec), options);
  if (!graph.ok()) return Rename(graph.status());
  ++plans_built_;
  auto plan = std::make_shared<const eg::Graph>(std::move(*graph));
  if (cache_) {
    if (plans_.size() >= kMaxCachedPlans) {
      plans_.erase(plan_order_.front());
      plan_order_.pop_front();
    }
    PlanKey key(dtype, input_shapes);
    plan_order_.push_back(key);
    plans_.emplace(std::move(key), plan);
  }
  return plan;
}

int GraphPlanner::FindParameter(const std::string& name) const {
  const auto it = parameter_index_.find(name);
  return it == parameter_index_.end() ? -1 : it->second;
}

int GraphPlanner::FindInput(const std::string& name) const {
  const auto it = input_index_.find(name);
  return it == input_index_.end() ? -1 : it->second;
}

absl::StatusOr<std::unique_ptr<GraphViews>> PrepareGraphRequest(
    const v1::ComputeGradientsRequest& request, const ServiceLimits& limits, GraphPlanner* planner,
    double flops_factor, int64_t* activation_bytes) {
  const eg::GraphSpec& spec = planner->spec();
  auto views = std::make_unique<GraphViews>();

  // The request's floating dtype: that of its floating tensors, which must agree.
  v1::DType dtype = v1::DTYPE_UNSPECIFIED;
  std::string dtype_from;
  auto agree = [&](v1::DType d, const std::string& field) -> absl::Status {
    if (dtype == v1::DTYPE_UNSPECIFIED) {
      dtype = d;
      dtype_from = field;
      return absl::OkStatus();
    }
    if (d != dtype) {
      return Invalid(field + ".dtype", absl::StrCat("expected ", DTypeName(dtype),
                                                    " (the request's floating dtype, "
                                                    "as ",
                                                    dtype_from, "), got ", DTypeName(d)));
    }
    return absl::OkStatus();
  };

  // Graph inputs: each declared input once, by name.
  std::vector<int> input_entry(spec.inputs.size(), -1);
  std::vector<eg::Shape> input_shapes(spec.inputs.size());
  for (int e = 0; e < request.graph_inputs_size(); ++e) {
    const v1::NamedTensor& named = request.graph_inputs(e);
    const std::string field = absl::StrCat("graph_inputs[", e, "]");
    const int i = planner->FindInput(named.name());
    if (i < 0) {
      return Invalid(field + ".name", absl::StrCat("\"", named.name().substr(0, 64),
                                                   "\" is not an input of model.graph"));
    }
    if (input_entry[i] >= 0) {
      return Invalid(field + ".name", absl::StrCat("\"", named.name(), "\" is also graph_inputs[",
                                                   input_entry[i], "]"));
    }
    input_entry[i] = e;
    const v1::Tensor& t = named.tensor();
    const v1::GraphInput& declared = request.model().graph().inputs(i);
    if (IsIntDType(declared.dtype())) {
      if (!IsIntDType(t.dtype())) {
        return Invalid(field + ".tensor.dtype",
                       absl::StrCat("expected DTYPE_INT64 or DTYPE_INT32 (model.graph.inputs[", i,
                                    "] is an integer input), got ", DTypeName(t.dtype())));
      }
    } else {
      if (!IsFloatDType(t.dtype())) {
        return Invalid(field + ".tensor.dtype",
                       absl::StrCat("expected ", DTypeName(declared.dtype()),
                                    " (model.graph.inputs[", i, "]), got ", DTypeName(t.dtype())));
      }
      if (t.dtype() != declared.dtype()) {
        return Invalid(field + ".tensor.dtype",
                       absl::StrCat("expected ", DTypeName(declared.dtype()),
                                    " (model.graph.inputs[", i, "]), got ", DTypeName(t.dtype())));
      }
      RETURN_IF_ERROR(agree(t.dtype(), field + ".tensor"));
    }
    RETURN_IF_ERROR(CheckTensorBytes(t, field + ".tensor", limits).status());
    input_shapes[i].assign(t.shape().begin(), t.shape().end());
  }
  for (size_t i = 0; i < spec.inputs.size(); ++i) {
    if (input_entry[i] < 0) {
      return Invalid("graph_inputs", absl::StrCat("missing \"", spec.inputs[i].name,
                                                  "\" (model.graph.inputs[", i, "])"));
    }
  }
  std::vector<int> parameter_entry(spec.parameters.size(), -1);
  for (int e = 0; e < request.named_parameters_size(); ++e) {
    const v1::NamedTensor& named = request.named_parameters(e);
    const std::string field = absl::StrCat("named_parameters[", e, "]");
    const int p = planner->FindParameter(named.name());
    if (p < 0) {
      return Invalid(field + ".name", absl::StrCat("\"", named.name().substr(0, 64),
                                                   "\" is not a parameter of model.graph"));
    }
    if (parameter_entry[p] >= 0) {
      return Invalid(field + ".name",
                     absl::StrCat("\"", named.name(), "\" is also named_parameters[",
                                  parameter_entry[p], "]"));
    }
    parameter_entry[p] = e;
    const v1::Tensor& t = named.tensor();
    if (!IsFloatDType(t.dtype())) {
      return Invalid(field + ".tensor.dtype", absl::StrCat("expected DTYPE_FLOAT32 or "
                                                           "DTYPE_FLOAT64, got ",
                                                           DTypeName(t.dtype())));
    }
    RETURN_IF_ERROR(agree(t.dtype(), field + ".tensor"));
    const eg::Shape& shape = spec.parameters[p].shape;
    if (!std::equal(t.shape().begin(), t.shape().end(), shape.begin(), shape.end())) {
      return Invalid(
          field + ".tensor.shape",
          absl::StrCat("expected ", ShapeString(shape), " (model.graph.parameters[", p, "], \"",
                       spec.parameters[p].name, "\"), got ",
                       ShapeString({t.shape().data(), static_cast<size_t>(t.shape_size())})));
    }
    RETURN_IF_ERROR(CheckTensorBytes(t, field + ".tensor", limits).status());
  }
  for (size_t p = 0; p < spec.parameters.size(); ++p) {
    if (parameter_entry[p] < 0) {
      return Invalid("named_parameters", absl::StrCat("missing \"", spec.parameters[p].name,
                                                      "\" (model.graph.parameters[", p, "])"));
    }
  }
  if (dtype == v1::DTYPE_UNSPECIFIED) dtype = v1::DTYPE_FLOAT32;  // Nothing floating was sent.
  views->dtype = dtype;

  // Plan: shapes, order, memory and FLOPs, before anything is allocated for the run.
  ASSIGN_OR_RETURN(views->graph, planner->Plan(ToEngineDType(dtype), input_shapes));
  const eg::Graph& graph = *views->graph;
  // The planner may have given its spec to the plan.
  const eg::GraphSpec& planned = graph.spec();
  const eg::PlanCosts& costs = graph.costs();
  const double flops = (costs.forward_flops + costs.backward_flops) * flops_factor;
  if (flops > limits.max_call_flops) {
    return absl::ResourceExhaustedError(
        absl::StrCat("model.graph: this call is planned at ", flops,
                     " floating-point operations, over max_call_flops (", limits.max_call_flops,
                     "); split the batch (the gradients of parts add up) or send fewer samples"));
  }
  if (costs.peak_bytes > limits.max_activation_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "model.graph: this batch needs ", costs.peak_bytes,
        " bytes of values, gradients and workspace at its peak, over max_activation_bytes (",
        limits.max_activation_bytes, "); send a smaller batch or use options.checkpointing"));
  }
  views->return_output = request.options().return_output();
  views->dropout_seed = request.options().dropout_seed();
  views->checkpoint_mode = planner->checkpoint_mode();
  for (const std::string& name : request.options().input_gradient_names()) {
    views->input_gradients.push_back(graph.FindInput(name));
  }
  const int64_t element = DTypeSize(dtype);
  int64_t output_bytes = 0;
  for (int i : views->input_gradients) {
    output_bytes += graph.values()[graph.input_value(i)].elements * element;
  }
  if (views->return_output) {
    for (size_t o = 0; o < planned.outputs.size(); ++o) {
      const eg::ValueInfo& v = graph.values()[graph.output_value(o)];
      output_bytes += v.elements * DTypeSize(ToWireDType(v.type.dtype));
    }
  }
  views->output_bytes = output_bytes;
  *activation_bytes = costs.peak_bytes + costs.constant_bytes + output_bytes;
  const eg::Shape& target_shape = input_shapes[graph.loss_target()];
  views->num_examples = target_shape.empty() ? 1 : target_shape[0];

  // Views, in place; then values (one pass over the data, after every size is known right).
  const bool check_finite = !request.options().allow_non_finite();
  views->inputs.resize(planned.inputs.size());
  for (size_t i = 0; i < planned.inputs.size(); ++i) {
    const v1::NamedTensor& named = request.graph_inputs(input_entry[i]);
    const v1::Tensor& t = named.tensor();
    const eg::ValueInfo& value = graph.values()[graph.input_value(i)];
    const int64_t n = value.elements;
    const eg::Shape& shape = value.type.shape;
    const std::string field = absl::StrCat("graph_inputs[", input_entry[i], "].tensor");
    switch (t.dtype()) {
      case v1::DTYPE_INT32: {
        std::vector<int64_t> wide(n);
        for (int64_t j = 0; j < n; ++j) wide[j] = LoadAt<int32_t>(t.data(), j);
        views->widened.push_back(std::move(wide));
        views->inputs[i] = views->widened.back().data();
        break;
      }
      case v1::DTYPE_INT64:
        views->inputs[i] = ViewData<int64_t>(t, &views->aligned_copies);
        break;
      case v1::DTYPE_FLOAT32: {
        const float* data = ViewData<float>(t, &views->aligned_copies);
        if (check_finite) RETURN_IF_ERROR(CheckFinite(data, shape, field));
        views->inputs[i] = data;
        break;
      }
      default: {
        const double* data = ViewData<double>(t, &views->aligned_copies);
        if (check_finite) RETURN_IF_ERROR(CheckFinite(data, shape, field));
        views->inputs[i] = data;
        break;
      }
    }
  }
  views->parameters.resize(planned.parameters.size());
  for (size_t p = 0; p < planned.parameters.size(); ++p) {
    const v1::Tensor& t = request.named_parameters(parameter_entry[p]).tensor();
    const eg::Shape& shape = graph.values()[graph.parameter_value(p)].type.shape;
    const std::string field = absl::StrCat("named_parameters[", parameter_entry[p], "].tensor");
    if (dtype == v1::DTYPE_FLOAT32) {
      const float* data = ViewData<float>(t, &views->aligned_copies);
      if (check_finite) RETURN_IF_ERROR(CheckFinite(data, shape, field));
      views->parameters[p] = data;
    } else {
      const double* data = ViewData<double>(t, &views->aligned_copies);
      if (check_finite) RETURN_IF_ERROR(CheckFinite(data, shape, field));
      views->parameters[p] = data;
    }
  }
  return views;
}

int64_t GraphLossDivisor(const v1::ComputeGradientsRequest& request) {
  const v1::Graph& graph = request.model().graph();
  const v1::Tensor* target = nullptr;
  for (const v1::NamedTensor& in : request.graph_inputs()) {
    if (in.name() == graph.loss_target()) target = &in.tensor();
  }
  if (target == nullptr) return 0;
  int64_t elements = 1;
  for (int64_t d : target->shape()) elements *= d;
  const v1::Loss& loss = request.model().loss();
  if (!loss.has_cross_entropy()) return elements;
  const int64_t ignore =
      loss.cross_entropy().has_ignore_index() ? loss.cross_entropy().ignore_index() : -100;
  int64_t counted = 0;
  for (int64_t j = 0; j < elements; ++j) {
    const int64_t value = target->dtype() == v1::DTYPE_INT32 ? LoadAt<int32_t>(target->data(), j)
                                                             : LoadAt<int64_t>(target->data(), j);
    counted += value != ignore;
  }
  return counted;
}

double GraphResponseBytes(const v1::ComputeGradientsRequest& request) {
  // Gradients as large as the parameters; input gradients at most as large as the inputs;
  // outputs, unknown before planning, are reserved with the activations once planned.
  double bytes = 65536;
  for (const v1::NamedTensor& p : request.named_parameters()) {
    bytes += 64.0 + p.name().size() + p.tensor().data().size();
  }
  bytes += 128.0 * request.model().graph().nodes_size();
  for (const v1::Node& node : request.model().graph().nodes()) {
    for (const std::string& out : node.outputs()) bytes += 64.0 + out.size() + node.name().size();
  }
  if (request.options().input_gradient_names_size() > 0) {
    for (const v1::NamedTensor& in : request.graph_inputs()) {
      bytes += 2.0 * in.tensor().data().size();  // INT32 -> float64 at most doubles.
    }
  }
  return bytes;
}

template <typename T>
absl::Status RunGraphRequest(const GraphViews& views, const eg::GraphRunOptions& options,
                             v1::ComputeGradientsResponse* response, double* compute_seconds) {
  const eg::Graph& graph = *views.graph;
  const eg::GraphSpec& spec = graph.spec();
  eg::GraphInputs<T> inputs;
  inputs.inputs = views.inputs;
  for (const void* p : views.parameters) inputs.parameters.push_back(static_cast<const T*>(p));
  eg::GraphOutputs<T> outputs;
  for (size_t p = 0; p < spec.parameters.size(); ++p) {
    v1::NamedTensor* g = response->add_named_gradients();
    g->set_name(spec.parameters[p].name);
    const eg::ValueInfo& v = graph.values()[graph.parameter_value(p)];
    outputs.parameter_gradients.push_back(static_cast<T*>(
        AllocateTensor(g->mutable_tensor(), views.dtype, v.type.shape, v.elements)));
  }
  if (!views.input_gradients.empty()) {
    outputs.input_gradients.assign(spec.inputs.size(), nullptr);
    for (int i : views.input_gradients) {
      v1::NamedTensor* g = response->add_input_gradients();
      g->set_name(spec.inputs[i].name);
      const eg::ValueInfo& v = graph.values()[graph.input_value(i)];
      outputs.input_gradients[i] = static_cast<T*>(
          AllocateTensor(g->mutable_tensor(), views.dtype, v.type.shape, v.elements));
    }
  }
  if (views.return_output) {
    for (size_t o = 0; o < spec.outputs.size(); ++o) {
      v1::NamedTensor* out = response->add_outputs();
      out->set_name(spec.outputs[o]);
      const eg::ValueInfo& v = graph.values()[graph.output_value(o)];
      outputs.outputs.push_back(AllocateTensor(out->mutable_tensor(), ToWireDType(v.type.dtype),
                                               v.type.shape, v.elements));
    }
  }
  const Clock::time_point start = Clock::now();
  absl::StatusOr<eg::GraphRunResult> run = eg::RunGraph<T>(graph, inputs, outputs, options);
  *compute_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (!run.ok()) return run.status();
  const eg::GraphRunResult& result = *run;

  response->set_loss(result.loss);
  for (size_t p = 0; p < spec.parameters.size(); ++p) {
    v1::ParameterDiagnostics* d = response->add_parameter_diagnostics();
    d->set_name(spec.parameters[p].name);
    d->set_grad_norm(result.parameter_grad_norms[p]);
    d->set_non_finite_count(result.parameter_non_finite[p]);
  }
  for (size_t n = 0; n < spec.nodes.size() && n < result.nodes.size(); ++n) {
    const eg::NodeSpec& node = spec.nodes[n];
    for (size_t o = 0; o < node.outputs.size() && o < result.nodes[n].size(); ++o) {
      const eg::ValueDiagnostics& vd = result.nodes[n][o];
      v1::ValueDiagnostics* d = response->add_value_diagnostics();
      d->set_node_name(node.name);
      d->set_op_type(node.op_type);
      d->set_value(node.outputs[o]);
      if (vd.grad_norm) d->set_grad_norm(*vd.grad_norm);  // Absent where not computed.
      d->set_value_norm(vd.value_norm);
      d->set_non_finite_count(vd.non_finite_count);
    }
  }
  v1::ComputeStats* stats = response->mutable_stats();
  stats->set_forward_micros(result.forward_micros);
  stats->set_backward_micros(result.backward_micros);
  stats->set_peak_activation_bytes(result.peak_bytes);
  stats->set_layers_recomputed(result.steps_recomputed);
  stats->set_num_examples(views.num_examples);
  stats->set_threads(options.threads);
  v1::CheckpointPlan* plan = stats->mutable_plan();
  const eg::Schedule& schedule = graph.schedule();
  plan->set_mode(ToProtoMode(views.checkpoint_mode));
  for (size_t s = 0; s < schedule.segments.size(); ++s) {
    const eg::Segment& segment = schedule.segments[s];
    plan->add_segment_starts(segment.begin);
    plan->add_segment_recomputed(segment.recompute);
    if (s + 1 < schedule.segments.size() && segment.end > segment.begin) {
      const eg::Step& last = graph.steps()[segment.end - 1];
      if (!last.outputs.empty()) plan->add_boundary_values(graph.values()[last.outputs[0]].name);
    }
  }
  plan->set_predicted_peak_bytes(graph.costs().peak_bytes);
  plan->set_budget_met(true);
  return absl::OkStatus();
}

template absl::Status RunGraphRequest<float>(const GraphViews&, const eg::GraphRunOptions&,
                                             v1::ComputeGradientsResponse*, double*);
template absl::Status RunGraphRequest<double>(const GraphViews&, const eg::GraphRunOptions&,
                                              v1::ComputeGradientsResponse*, double*);

}  // namespace gradserve::service
