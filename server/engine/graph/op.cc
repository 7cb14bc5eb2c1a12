#include "server/engine/graph/op.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/engine/graph/kernels.h"

namespace gradserve::engine::graph {

int64_t NumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(const Shape& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
    case DType::kInt64:
      return "int64";
    case DType::kBool:
      return "bool";
  }
  return "unknown";
}

int64_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
    case DType::kInt64:
      return 8;
    case DType::kBool:
      return 1;
  }
  return 8;
}

OpContext::OpContext(const NodeSpec& node, int node_index, DType float_dtype,
                     std::vector<const ValueType*> inputs,
                     std::vector<const ConstantValue*> constants)
    : node_(node),
      float_dtype_(float_dtype),
      inputs_(std::move(inputs)),
      constants_(std::move(constants)),
      read_(node.attributes.size(), false),
      where_(absl::StrCat("graph.nodes[", node_index, "] (\"", node.name, "\", ", node.op_type,
                          ")")) {}

absl::Status OpContext::InputError(int i, absl::string_view message) const {
  const std::string name = i < static_cast<int>(node_.inputs.size()) ? node_.inputs[i] : "";
  return absl::InvalidArgumentError(
      absl::StrCat(where_, ".inputs[", i, "] (\"", name, "\"): ", message));
}

absl::Status OpContext::AttributeError(absl::string_view name, absl::string_view message) const {
  return absl::InvalidArgumentError(absl::StrCat(where_, ".attributes.", name, ": ", message));
}

absl::Status OpContext::Error(absl::string_view message) const {
  return absl::InvalidArgumentError(absl::StrCat(where_, ": ", message));
}

absl::Status OpContext::ExpectFloat(int i) const {
  const ValueType* v = input(i);
  if (v == nullptr) return InputError(i, "required input is missing");
  if (!IsFloat(v->dtype)) {
    return InputError(i, absl::StrCat("expected a floating tensor, got ", DTypeName(v->dtype)));
  }
  return absl::OkStatus();
}

absl::Status OpContext::ExpectDType(int i, DType dtype) const {
  const ValueType* v = input(i);
  if (v == nullptr) return InputError(i, "required input is missing");
  if (v->dtype != dtype) {
    return InputError(i,
                      absl::StrCat("expected ", DTypeName(dtype), ", got ", DTypeName(v->dtype)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> OpContext::ConstantInts(int i) const {
  RETURN_IF_ERROR(ExpectDType(i, DType::kInt64));
  const ConstantValue* c = constant(i);
  if (c == nullptr) return InputError(i, "must be a constant (graph.constants or a Constant node)");
  if (c->shape.size() > 1) {
    return InputError(
        i, absl::StrCat("expected a scalar or 1-D constant, got shape ", ShapeString(c->shape)));
  }
  return c->ints;
}

absl::StatusOr<Shape> OpContext::BroadcastInputs() const {
  const Shape& a = input(0)->shape;
  const Shape& b = input(1)->shape;
  Shape shape;
  if (!BroadcastShapes(a, b, &shape)) {
    return InputError(1, absl::StrCat("shape ", ShapeString(b), " does not broadcast with ",
                                      ShapeString(a), " (inputs[0])"));
  }
  return shape;
}

const AttributeSpec* OpContext::Find(absl::string_view name) {
  for (size_t a = 0; a < node_.attributes.size(); ++a) {
    if (node_.attributes[a].name == name) {
      read_[a] = true;
      return &node_.attributes[a];
    }
  }
  return nullptr;
}

absl::StatusOr<int64_t> OpContext::Int(absl::string_view name, int64_t default_value) {
  const AttributeSpec* a = Find(name);
  if (a == nullptr) return default_value;
  if (const int64_t* v = std::get_if<int64_t>(&a->value)) return *v;
  return AttributeError(name, "expected an int");
}

absl::StatusOr<double> OpContext::Float(absl::string_view name, double default_value) {
  const AttributeSpec* a = Find(name);
  if (a == nullptr) return default_value;
  if (const double* v = std::get_if<double>(&a->value)) return *v;
  return AttributeError(name, "expected a float");
}

absl::StatusOr<std::string> OpContext::String(absl::string_view name,
                                              absl::string_view default_value) {
  const AttributeSpec* a = Find(name);
  if (a == nullptr) return std::string(default_value);
  if (const std::string* v = std::get_if<std::string>(&a->value)) return *v;
  return AttributeError(name, "expected a string");
}

absl::StatusOr<std::vector<int64_t>> OpContext::Ints(absl::string_view name, bool* present) {
  const AttributeSpec* a = Find(name);
  if (present != nullptr) *present = a != nullptr;
  if (a == nullptr) return std::vector<int64_t>{};
  if (const auto* v = std::get_if<std::vector<int64_t>>(&a->value)) return *v;
  return AttributeError(name, "expected a list of ints");
}

absl::StatusOr<std::vector<double>> OpContext::Floats(absl::string_view name, bool* present) {
  const AttributeSpec* a = Find(name);
  if (present != nullptr) *present = a != nullptr;
  if (a == nullptr) return std::vector<double>{};
  if (const auto* v = std::get_if<std::vector<double>>(&a->value)) return *v;
  return AttributeError(name, "expected a list of floats");
}

absl::Status OpContext::UnknownAttribute() const {
  for (size_t a = 0; a < node_.attributes.size(); ++a) {
    if (!read_[a]) {
      return absl::InvalidArgumentError(
          absl::StrCat(where_, ".attributes.", node_.attributes[a].name, ": not an attribute of ",
                       node_.op_type, " (or not supported)"));
    }
  }
  return absl::OkStatus();
}

namespace {

constexpr int kMany = 1 << 20;

// Sorted by name (FindOp binary-searches).
constexpr OpInfo kOps[] = {
    {"Add", 2, 2, 1, 1, &MakeBinary},
    {"Cast", 1, 1, 1, 1, &MakeCast},
    {"Concat", 1, kMany, 1, 1, &MakeConcat},
    {"Constant", 0, 0, 1, 1, &MakeConstant},
    {"ConstantOfShape", 1, 1, 1, 1, &MakeConstantOfShape},
    {"Div", 2, 2, 1, 1, &MakeBinary},
    {"Dropout", 1, 3, 1, 2, &MakeDropout},
    {"Equal", 2, 2, 1, 1, &MakeCompare},
    {"Erf", 1, 1, 1, 1, &MakeUnary},
    {"Exp", 1, 1, 1, 1, &MakeUnary},
    {"Expand", 2, 2, 1, 1, &MakeExpand},
    {"Gather", 2, 2, 1, 1, &MakeGather},
    {"Gelu", 1, 1, 1, 1, &MakeUnary},
    {"Gemm", 2, 3, 1, 1, &MakeGemm},
    {"Greater", 2, 2, 1, 1, &MakeCompare},
    {"Identity", 1, 1, 1, 1, &MakeUnary},
    {"LayerNormalization", 2, 3, 1, 1, &MakeLayerNorm},
    {"LeakyRelu", 1, 1, 1, 1, &MakeUnary},
    {"Less", 2, 2, 1, 1, &MakeCompare},
    {"MatMul", 2, 2, 1, 1, &MakeMatMul},
    {"Mul", 2, 2, 1, 1, &MakeBinary},
    {"Neg", 1, 1, 1, 1, &MakeUnary},
    {"Not", 1, 1, 1, 1, &MakeNot},
    {"Pow", 2, 2, 1, 1, &MakePow},
    {"RMSNormalization", 2, 2, 1, 1, &MakeRmsNorm},
    {"Range", 3, 3, 1, 1, &MakeRange},
    {"ReduceMean", 1, 1, 1, 1, &MakeReduce},
    {"ReduceSum", 1, 2, 1, 1, &MakeReduce},
    {"Relu", 1, 1, 1, 1, &MakeUnary},
    {"Reshape", 2, 2, 1, 1, &MakeReshape},
    {"Shape", 1, 1, 1, 1, &MakeShape},
    {"Sigmoid", 1, 1, 1, 1, &MakeUnary},
    {"Slice", 3, 5, 1, 1, &MakeSlice},
    {"Softmax", 1, 1, 1, 1, &MakeSoftmax},
    {"Split", 1, 2, 1, kMany, &MakeSplit},
    {"Sqrt", 1, 1, 1, 1, &MakeUnary},
    {"Squeeze", 1, 2, 1, 1, &MakeReshape},
    {"Sub", 2, 2, 1, 1, &MakeBinary},
    {"Tanh", 1, 1, 1, 1, &MakeUnary},
    {"Transpose", 1, 1, 1, 1, &MakeTranspose},
    {"Trilu", 1, 2, 1, 1, &MakeTrilu},
    {"Unsqueeze", 2, 2, 1, 1, &MakeReshape},
    {"Where", 3, 3, 1, 1, &MakeWhere},
};

}  // namespace

const OpInfo* FindOp(std::string_view op_type) {
  const auto* it =
      std::lower_bound(std::begin(kOps), std::end(kOps), op_type,
                       [](const OpInfo& op, std::string_view n) { return op.name < n; });
  return it != std::end(kOps) && it->name == op_type ? it : nullptr;
}

std::vector<absl::string_view> SupportedOps() {
  std::vector<absl::string_view> names;
  for (const OpInfo& op : kOps) names.emplace_back(op.name.data(), op.name.size());
  return names;
}

}  // namespace gradserve::engine::graph
