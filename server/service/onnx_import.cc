#include "server/service/onnx_import.h"

#include <cmath>
#include <cstring>
#include <exception>
#include <span>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "onnx/checker.h"
#include "onnx/onnx_pb.h"
#include "server/engine/graph/op.h"
#include "server/engine/status_macros.h"
#include "server/service/convert_graph.h"

namespace gradserve::service {
namespace {

namespace eg = ::gradserve::engine::graph;
using ::onnx::TensorProto;

constexpr size_t kMaxNameBytes = 256;

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// A name from the file, safe to print: escaped, and cut.
std::string Quoted(const std::string& name) {
  return absl::StrCat("\"", absl::CHexEscape(name.substr(0, 64)), name.size() > 64 ? "..." : "",
                      "\"");
}

std::string TensorTypeName(int type) {
  return TensorProto::DataType_IsValid(type)
             ? TensorProto::DataType_Name(static_cast<TensorProto::DataType>(type))
             : absl::StrCat("unknown type ", type);
}

bool IsOnnxFloat(int type) { return type == TensorProto::FLOAT || type == TensorProto::DOUBLE; }

// The bytes per element of the ONNX types an initializer may have, or 0 for the others.
int ElementBytes(int type) {
  switch (type) {
    case TensorProto::FLOAT:
    case TensorProto::INT32:
      return 4;
    case TensorProto::DOUBLE:
    case TensorProto::INT64:
      return 8;
    case TensorProto::BOOL:
      return 1;
    default:
      return 0;
  }
}

// A tensor of the file (an initializer, or a Constant's value) checked against the limits and
// against its own data before any of it is read: dims, then the element count the data holds.
absl::StatusOr<int64_t> CheckOnnxTensor(const TensorProto& t, const std::string& field,
                                        const ServiceLimits& limits) {
  if (t.data_location() == TensorProto::EXTERNAL || t.external_data_size() > 0) {
    return Invalid(field,
                   "stored outside the file (external data); export with the weights "
                   "inside the file (models under 2 GB are by default)");
  }
  if (t.has_segment()) return Invalid(field, "segmented tensors are not supported");
  if (ElementBytes(t.data_type()) == 0) {
    return Invalid(field, absl::StrCat("data type ", TensorTypeName(t.data_type()),
                                       " is not supported (FLOAT, DOUBLE, INT64, INT32, BOOL)"));
  }
  ASSIGN_OR_RETURN(
      const int64_t elements,
      CheckShape({t.dims().data(), static_cast<size_t>(t.dims_size())}, field + ".dims", limits));
  int64_t held = -1;
  const char* where = "";
  if (t.has_raw_data()) {
    const int64_t bytes = static_cast<int64_t>(t.raw_data().size());
    if (bytes % ElementBytes(t.data_type()) == 0) held = bytes / ElementBytes(t.data_type());
    where = "raw_data";
  } else {
    switch (t.data_type()) {
      case TensorProto::FLOAT:
        held = t.float_data_size(), where = "float_data";
        break;
      case TensorProto::DOUBLE:
        held = t.double_data_size(), where = "double_data";
        break;
      case TensorProto::INT64:
        held = t.int64_data_size(), where = "int64_data";
        break;
      default:
        held = t.int32_data_size(), where = "int32_data";
        break;
    }
  }
  if (held != elements) {
    return Invalid(field, absl::StrCat("its ", where, " holds ",
                                       held < 0 ? absl::StrCat(t.raw_data().size(), " bytes")
                                                : absl::StrCat(held, " elements"),
                                       ", but its dims [", absl::StrJoin(t.dims(), ", "), "] say ",
                                       elements, " ", TensorTypeName(t.data_type()), " elements"));
  }
  return elements;
}

// Element i of a checked tensor, as double (floating types) or int64 (the others).
template <typename T>
T LoadRaw(const std::string& raw, int64_t i) {
  T v;
  std::memcpy(&v, raw.data() + i * sizeof(T), sizeof(T));
  return v;
}

double FloatAt(const TensorProto& t, int64_t i) {
  if (t.data_type() == TensorProto::FLOAT) {
    return t.has_raw_data() ? LoadRaw<float>(t.raw_data(), i) : t.float_data(static_cast<int>(i));
  }
  return t.has_raw_data() ? LoadRaw<double>(t.raw_data(), i) : t.double_data(static_cast<int>(i));
}

int64_t IntAt(const TensorProto& t, int64_t i) {
  switch (t.data_type()) {
    case TensorProto::INT64:
      return t.has_raw_data() ? LoadRaw<int64_t>(t.raw_data(), i)
                              : t.int64_data(static_cast<int>(i));
    case TensorProto::INT32:
      return t.has_raw_data() ? LoadRaw<int32_t>(t.raw_data(), i)
                              : t.int32_data(static_cast<int>(i));
    default:  // BOOL
      return t.has_raw_data() ? (t.raw_data()[i] != 0) : (t.int32_data(static_cast<int>(i)) != 0);
  }
}

// A checked tensor as the API's: floating data in `float_dtype`, INT32 and INT64 as INT64, BOOL
// as BOOL.
void ToApiTensor(const TensorProto& t, int64_t elements, v1::DType float_dtype, v1::Tensor* out) {
  out->mutable_shape()->Assign(t.dims().begin(), t.dims().end());
  std::string* data = out->mutable_data();
  if (IsOnnxFloat(t.data_type())) {
    out->set_dtype(float_dtype);
    if (float_dtype == v1::DTYPE_FLOAT32) {
      data->resize(elements * sizeof(float));
      for (int64_t i = 0; i < elements; ++i) {
        const float v = static_cast<float>(FloatAt(t, i));
        std::memcpy(data->data() + i * sizeof(float), &v, sizeof(float));
      }
    } else {
      data->resize(elements * sizeof(double));
      for (int64_t i = 0; i < elements; ++i) {
        const double v = FloatAt(t, i);
        std::memcpy(data->data() + i * sizeof(double), &v, sizeof(double));
      }
    }
  } else if (t.data_type() == TensorProto::BOOL) {
    out->set_dtype(v1::DTYPE_BOOL);
    data->resize(elements);
    for (int64_t i = 0; i < elements; ++i) (*data)[i] = static_cast<char>(IntAt(t, i));
  } else {
    out->set_dtype(v1::DTYPE_INT64);
    data->resize(elements * sizeof(int64_t));
    for (int64_t i = 0; i < elements; ++i) {
      const int64_t v = IntAt(t, i);
      std::memcpy(data->data() + i * sizeof(int64_t), &v, sizeof(int64_t));
    }
  }
}

// Inputs of a node through which no gradient flows (bit i: input i), so that a value read only
// through them cannot be trained: comparisons and shape reads take nothing back, and shape-like
// inputs (Reshape's shape, Gather's indices, Where's condition...) are not differentiable.
uint32_t NonDifferentiableInputs(const ::onnx::NodeProto& node) {
  static const std::unordered_set<std::string_view> kNone = {
      "Shape",           "Size",     "Equal", "Less", "Greater", "LessOrEqual", "Not",
      "GreaterOrEqual",  "And",      "Or",    "Xor",  "Range",   "ArgMax",      "ArgMin",
      "ConstantOfShape", "Constant", "IsNaN", "IsInf"};
  static const std::unordered_set<std::string_view> kFirstOnly = {
      "Reshape",   "Squeeze",    "Unsqueeze", "Slice",  "Expand", "Tile", "Split",
      "ReduceSum", "ReduceMean", "Dropout",   "Gather", "Trilu",  "Pow"};
  const std::string& op = node.op_type();
  if (kNone.contains(op)) return ~0u;
  if (op == "Cast") {
    for (const auto& a : node.attribute()) {
      if (a.name() == "to" && !IsOnnxFloat(static_cast<int>(a.i()))) return ~0u;
    }
    return 0;
  }
  if (op == "Where") return 1u;
  if (kFirstOnly.contains(op)) return ~1u;
  return 0;
}

// The attribute as the API's: INT, FLOAT, STRING, INTS, FLOATS and a TENSOR (Constant's value).
absl::Status ToApiAttribute(const ::onnx::AttributeProto& a, const std::string& field,
                            const ServiceLimits& limits, v1::Attribute* out) {
  if (!a.ref_attr_name().empty()) {
    return Invalid(field, "attribute references (functions) are not supported");
  }
  out->set_name(a.name());
  switch (a.type()) {
    case ::onnx::AttributeProto::INT:
      out->set_i(a.i());
      return absl::OkStatus();
    case ::onnx::AttributeProto::FLOAT:
      out->set_f(a.f());
      return absl::OkStatus();
    case ::onnx::AttributeProto::STRING:
      out->set_s(a.s());
      return absl::OkStatus();
    case ::onnx::AttributeProto::INTS:
      out->mutable_ints()->mutable_values()->Assign(a.ints().begin(), a.ints().end());
      return absl::OkStatus();
    case ::onnx::AttributeProto::FLOATS:
      out->mutable_floats()->mutable_values()->Assign(a.floats().begin(), a.floats().end());
      return absl::OkStatus();
    case ::onnx::AttributeProto::TENSOR: {
      ASSIGN_OR_RETURN(const int64_t elements, CheckOnnxTensor(a.t(), field + ".t", limits));
      // Floating constants keep their own precision: the engine converts them to the call's.
      const v1::DType dtype =
          a.t().data_type() == TensorProto::FLOAT ? v1::DTYPE_FLOAT32 : v1::DTYPE_FLOAT64;
      ToApiTensor(a.t(), elements, dtype, out->mutable_t());
      return absl::OkStatus();
    }
    default:
      return Invalid(field, absl::StrCat("attribute type ",
                                         ::onnx::AttributeProto::AttributeType_IsValid(a.type())
                                             ? ::onnx::AttributeProto::AttributeType_Name(a.type())
                                             : absl::StrCat(a.type()),
                                         " is not supported (subgraphs, strings lists and "
                                         "sparse tensors are not)"));
  }
}

v1::DType ToApiFloat(int onnx_type) {
  return onnx_type == TensorProto::DOUBLE ? v1::DTYPE_FLOAT64 : v1::DTYPE_FLOAT32;
}

}  // namespace

// Note [Trainable initializers]
// ONNX does not say which initializers are weights and which are buffers (a causal mask, a
// position table): torch.onnx.export writes both as initializers. Trained are the floating
// initializers that (1) OnnxModel.frozen does not name, (2) hold only finite values (an
// additive mask holds -inf; a weight never does), and (3) some differentiable path leads from
// to the loss output (a 0/1 mask read through Equal, or read only for its shape, has none). The
// others are constants. For PyTorch exports this gives exactly named_parameters(); a finite
// float buffer added into the computation (rare) would be trained too unless named in frozen,
// which the Python helper from_torch fills from the module's buffers.
absl::StatusOr<ImportedOnnx> ImportOnnx(const v1::Model& model, v1::DType dtype,
                                        const ServiceLimits& limits) {
  const v1::OnnxModel& onnx = model.onnx();
  if (onnx.model().empty()) return Invalid("model.onnx.model", "required (the .onnx file's bytes)");
  ::onnx::ModelProto file;
  if (!file.ParseFromString(onnx.model())) {
    return Invalid("model.onnx.model",
                   "not a serialized ONNX ModelProto (truncated, or not an .onnx file)");
  }
  if (file.ir_version() < 3 || file.ir_version() > ::onnx::IR_VERSION) {
    return Invalid("model.onnx.model",
                   absl::StrCat("IR version ", file.ir_version(), " is not supported (3 to ",
                                static_cast<int>(::onnx::IR_VERSION), ")"));
  }
  int64_t opset = -1;
  for (const ::onnx::OperatorSetIdProto& o : file.opset_import()) {
    if (o.domain().empty() || o.domain() == "ai.onnx") opset = o.version();
  }
  if (opset < 0) {
    return Invalid("model.onnx.model", "imports no opset of ONNX's default domain");
  }
  if (opset < kMinOnnxOpset || opset > kMaxOnnxOpset) {
    return Invalid("model.onnx.model",
                   absl::StrCat("opset ", opset, " is not supported: export with opset_version=",
                                kMinOnnxOpset, " to ", kMaxOnnxOpset));
  }
  const ::onnx::GraphProto& graph = file.graph();
  // Limits first, from the counts alone.
  if (graph.node_size() > limits.max_graph_nodes) {
    return absl::ResourceExhaustedError(absl::StrCat("model.onnx: ", graph.node_size(),
                                                     " nodes exceed max_graph_nodes (",
                                                     limits.max_graph_nodes, ")"));
  }
  int64_t values = int64_t{graph.input_size()} + graph.initializer_size() + 1;
  for (const ::onnx::NodeProto& node : graph.node()) values += node.output_size();
  if (values > limits.max_graph_values) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "model.onnx: ", values, " values exceed max_graph_values (", limits.max_graph_values, ")"));
  }
  if (graph.sparse_initializer_size() > 0) {
    return Invalid("model.onnx: graph.sparse_initializer", "sparse initializers are not supported");
  }
  std::vector<int64_t> initializer_elements(graph.initializer_size());
  for (int i = 0; i < graph.initializer_size(); ++i) {
    const std::string field = absl::StrCat("model.onnx: graph.initializer[", i, "] (",
                                           Quoted(graph.initializer(i).name()), ")");
    ASSIGN_OR_RETURN(initializer_elements[i], CheckOnnxTensor(graph.initializer(i), field, limits));
  }
  // ONNX's own checker: the structure, every node against its schema (attributes, input and
  // output counts), names defined before use. It reads only the message (no external data: see
  // CheckOnnxTensor), and throws on the first error.
  try {
    ::onnx::checker::check_model(file);
  } catch (const std::exception& e) {
    std::string what = e.what();
    if (what.size() > 1024) what = what.substr(0, 1024) + "...";
    return Invalid("model.onnx.model", absl::StrCat("rejected by ONNX's checker: ", what));
  }

  // The compute dtype: the stream's, the request's choice, or the file's.
  v1::DType float_dtype = dtype;
  if (onnx.dtype() != v1::DTYPE_UNSPECIFIED) {
    if (onnx.dtype() != v1::DTYPE_FLOAT32 && onnx.dtype() != v1::DTYPE_FLOAT64) {
      return Invalid("model.onnx.dtype", "expected DTYPE_FLOAT32 or DTYPE_FLOAT64");
    }
    if (float_dtype != v1::DTYPE_UNSPECIFIED && onnx.dtype() != float_dtype) {
      return Invalid("model.onnx.dtype", "must be unset or the stream's dtype");
    }
    float_dtype = onnx.dtype();
  }
  if (float_dtype == v1::DTYPE_UNSPECIFIED) {
    for (const TensorProto& t : graph.initializer()) {
      if (IsOnnxFloat(t.data_type())) {
        float_dtype = ToApiFloat(t.data_type());
        break;
      }
    }
  }
  if (float_dtype == v1::DTYPE_UNSPECIFIED) {
    for (const ::onnx::ValueInfoProto& in : graph.input()) {
      if (IsOnnxFloat(in.type().tensor_type().elem_type())) {
        float_dtype = ToApiFloat(in.type().tensor_type().elem_type());
        break;
      }
    }
  }
  if (float_dtype == v1::DTYPE_UNSPECIFIED) float_dtype = v1::DTYPE_FLOAT32;

  // Every name the file defines, for the loss target's.
  std::unordered_map<std::string_view, int> initializer_index;
  for (int i = 0; i < graph.initializer_size(); ++i) {
    initializer_index.emplace(graph.initializer(i).name(), i);
  }
  std::unordered_set<std::string_view> batch_named(onnx.batch_inputs().begin(),
                                                   onnx.batch_inputs().end());
  std::unordered_set<std::string_view> input_names;
  for (const ::onnx::ValueInfoProto& in : graph.input()) input_names.insert(in.name());
  for (int b = 0; b < onnx.batch_inputs_size(); ++b) {
    if (!input_names.contains(onnx.batch_inputs(b))) {
      return Invalid(absl::StrCat("model.onnx.batch_inputs[", b, "]"),
                     absl::StrCat(Quoted(onnx.batch_inputs(b)), " is not an input of the file"));
    }
  }
  std::unordered_set<std::string_view> frozen;
  for (int f = 0; f < onnx.frozen_size(); ++f) {
    if (!initializer_index.contains(onnx.frozen(f))) {
      return Invalid(absl::StrCat("model.onnx.frozen[", f, "]"),
                     absl::StrCat(Quoted(onnx.frozen(f)), " is not an initializer of the file"));
    }
    frozen.insert(onnx.frozen(f));
  }

  // The loss's output and target.
  std::string loss_output = onnx.loss_output();
  if (loss_output.empty()) {
    if (graph.output_size() != 1) {
      std::vector<std::string> names;
      for (const auto& o : graph.output()) names.push_back(Quoted(o.name()));
      return Invalid("model.onnx.loss_output",
                     absl::StrCat("required: the file has ", graph.output_size(), " outputs (",
                                  absl::StrJoin(names, ", "), "); name the one the loss reads"));
    }
    loss_output = graph.output(0).name();
  }
  bool loss_output_found = false;
  for (const auto& o : graph.output()) loss_output_found |= o.name() == loss_output;
  if (!loss_output_found) {
    return Invalid("model.onnx.loss_output",
                   absl::StrCat(Quoted(loss_output), " is not an output of the file"));
  }
  const std::string loss_target = onnx.loss_target().empty() ? "target" : onnx.loss_target();
  if (loss_target.size() > kMaxNameBytes) {
    return Invalid("model.onnx.loss_target", "longer than 256 bytes");
  }
  bool target_clash = initializer_index.contains(loss_target) || input_names.contains(loss_target);
  for (const ::onnx::NodeProto& node : graph.node()) {
    for (const std::string& out : node.output()) target_clash |= out == loss_target;
  }
  if (target_clash) {
    return Invalid(
        "model.onnx.loss_target",
        absl::StrCat(Quoted(loss_target),
                     " is already a value of the file; name the loss target another way"));
  }

  // Note [Trainable initializers]: which values a differentiable path leads from to the loss.
  std::unordered_map<std::string_view, int> producer;
  for (int n = 0; n < graph.node_size(); ++n) {
    for (const std::string& out : graph.node(n).output()) producer.emplace(out, n);
  }
  std::unordered_set<std::string_view> reaches_loss = {loss_output};
  std::vector<std::string_view> pending = {loss_output};
  std::vector<bool> visited(graph.node_size(), false);
  while (!pending.empty()) {
    const auto it = producer.find(pending.back());
    pending.pop_back();
    if (it == producer.end() || visited[it->second]) continue;
    visited[it->second] = true;
    const ::onnx::NodeProto& node = graph.node(it->second);
    const uint32_t blocked = NonDifferentiableInputs(node);
    for (int i = 0; i < node.input_size(); ++i) {
      if (i < 32 && (blocked >> i & 1u)) continue;
      if (reaches_loss.insert(node.input(i)).second) pending.push_back(node.input(i));
    }
  }
  std::unordered_set<std::string_view> used;
  for (const ::onnx::NodeProto& node : graph.node()) {
    for (const std::string& in : node.input()) used.insert(in);
  }

  ImportedOnnx result;
  result.dtype = float_dtype;
  *result.model.mutable_loss() = model.loss();
  v1::Graph& out = *result.model.mutable_graph();
  // Inputs: the batch, then the loss target.
  for (int i = 0; i < graph.input_size(); ++i) {
    const ::onnx::ValueInfoProto& in = graph.input(i);
    if (initializer_index.contains(in.name()) && !batch_named.contains(in.name())) continue;
    const std::string field =
        absl::StrCat("model.onnx: graph.input[", i, "] (", Quoted(in.name()), ")");
    if (!in.type().has_tensor_type()) return Invalid(field, "expected a tensor input");
    const int type = in.type().tensor_type().elem_type();
    v1::GraphInput* declared = out.add_inputs();
    declared->set_name(in.name());
    if (IsOnnxFloat(type)) {
      declared->set_dtype(float_dtype);
    } else if (type == TensorProto::INT64 || type == TensorProto::INT32) {
      declared->set_dtype(v1::DTYPE_INT64);
    } else {
      return Invalid(field, absl::StrCat("element type ", TensorTypeName(type),
                                         " is not supported (FLOAT, DOUBLE, INT64, INT32)"));
    }
  }
  v1::GraphInput* target = out.add_inputs();
  target->set_name(loss_target);
  target->set_dtype(model.loss().has_cross_entropy() ? v1::DTYPE_INT64 : float_dtype);

  // Initializers: trained ones become parameters (with the file's values as defaults), the rest
  // constants; unused ones are dropped (nothing to train, nothing to read).
  for (int i = 0; i < graph.initializer_size(); ++i) {
    const TensorProto& t = graph.initializer(i);
    if (!used.contains(t.name()) || batch_named.contains(t.name())) continue;
    const int64_t elements = initializer_elements[i];
    bool trained =
        IsOnnxFloat(t.data_type()) && !frozen.contains(t.name()) && reaches_loss.contains(t.name());
    for (int64_t j = 0; trained && j < elements; ++j) trained = std::isfinite(FloatAt(t, j));
    if (trained) {
      v1::GraphParameter* p = out.add_parameters();
      p->set_name(t.name());
      p->mutable_shape()->Assign(t.dims().begin(), t.dims().end());
      v1::NamedTensor& value = result.defaults.emplace_back();
      value.set_name(t.name());
      ToApiTensor(t, elements, float_dtype, value.mutable_tensor());
      result.bytes += static_cast<int64_t>(value.tensor().data().size());
    } else {
      v1::NamedTensor* c = out.add_constants();
      c->set_name(t.name());
      ToApiTensor(t, elements, ToApiFloat(t.data_type()), c->mutable_tensor());
      result.bytes += static_cast<int64_t>(c->tensor().data().size());
    }
  }

  // Nodes, one for one (same indices: errors name the file's nodes).
  for (int n = 0; n < graph.node_size(); ++n) {
    const ::onnx::NodeProto& node = graph.node(n);
    const std::string where =
        absl::StrCat("model.onnx: graph.node[", n, "] (", Quoted(node.name()), ", ",
                     absl::CHexEscape(node.op_type().substr(0, 64)), ", opset ", opset, ")");
    if (!node.domain().empty() && node.domain() != "ai.onnx") {
      return Invalid(where, absl::StrCat("domain ", Quoted(node.domain()),
                                         " is not supported (only ONNX's default domain)"));
    }
    if (eg::FindOp(node.op_type()) == nullptr) {
      return Invalid(where,
                     "this operator is not supported (GetServerInfo.graph_ops lists "
                     "those that are)");
    }
    if (node.name().size() > kMaxNameBytes) {
      return Invalid(where, "its name is longer than 256 bytes");
    }
    v1::Node* converted = out.add_nodes();
    converted->set_name(node.name());
    converted->set_op_type(node.op_type());
    converted->mutable_inputs()->Assign(node.input().begin(), node.input().end());
    converted->mutable_outputs()->Assign(node.output().begin(), node.output().end());
    bool has_seed = false;
    for (int a = 0; a < node.attribute_size(); ++a) {
      const ::onnx::AttributeProto& attribute = node.attribute(a);
      has_seed |= attribute.name() == "seed";
      RETURN_IF_ERROR(ToApiAttribute(
          attribute, absl::StrCat(where, ".attribute[", a, "] (", Quoted(attribute.name()), ")"),
          limits, converted->add_attributes()));
    }
    if (node.op_type() == "Dropout") {
      if (onnx.disable_dropout()) {
        // Without its training_mode input, Dropout is the identity (ONNX's default mode).
        if (converted->inputs_size() > 2) converted->mutable_inputs()->RemoveLast();
      } else if (!has_seed) {
        // Masks are a hash of this seed and options.dropout_seed (Note [Dropout masks]).
        v1::Attribute* seed = converted->add_attributes();
        seed->set_name("seed");
        seed->set_i(n);
      }
    }
  }
  for (const ::onnx::ValueInfoProto& o : graph.output()) out.add_outputs(o.name());
  out.set_loss_output(loss_output);
  out.set_loss_target(loss_target);
  result.bytes += static_cast<int64_t>(out.ByteSizeLong());
  return result;
}

absl::Status LowerOnnxRequest(v1::ComputeGradientsRequest* request, const ServiceLimits& limits) {
  if (!request->model().has_onnx()) return absl::OkStatus();
  if (request->model().layers_size() > 0 || request->model().has_graph()) {
    return Invalid("model", "exactly one of layers, graph and onnx must be set");
  }
  ASSIGN_OR_RETURN(ImportedOnnx imported,
                   ImportOnnx(request->model(), v1::DTYPE_UNSPECIFIED, limits));
  std::unordered_set<std::string> sent;
  for (int e = 0; e < request->named_parameters_size(); ++e) {
    const v1::NamedTensor& named = request->named_parameters(e);
    if (named.tensor().dtype() != imported.dtype) {
      return Invalid(absl::StrCat("named_parameters[", e, "].tensor.dtype"),
                     absl::StrCat("expected ", v1::DType_Name(imported.dtype),
                                  " (the dtype model.onnx computes in: model.onnx.dtype, or the "
                                  "file's)"));
    }
    sent.insert(named.name());
  }
  for (v1::NamedTensor& value : imported.defaults) {
    if (!sent.contains(value.name())) request->add_named_parameters()->Swap(&value);
  }
  request->mutable_model()->Swap(&imported.model);
  return absl::OkStatus();
}

absl::Status RenameOnnxFields(const absl::Status& status) {
  if (status.ok()) return status;
  const std::string message =
      absl::StrReplaceAll(status.message(), {{"model.graph.nodes[", "model.onnx: graph.node["},
                                             {"model.graph.parameters[", "model.onnx: parameters["},
                                             {"model.graph.constants[", "model.onnx: constants["},
                                             {"model.graph.inputs[", "model.onnx: inputs["},
                                             {"model.graph.loss_output", "model.onnx.loss_output"},
                                             {"model.graph.loss_target", "model.onnx.loss_target"},
                                             {"model.graph", "model.onnx"}});
  return absl::Status(status.code(), message);
}

}  // namespace gradserve::service
