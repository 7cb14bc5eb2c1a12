// The operator interface: what one node of a planned graph does at plan time (check its inputs
// and attributes, infer its outputs), in the forward pass and in the backward pass.
//
// Each operator is one OpKernel subclass, made by its factory (OpFactory) once per node when a
// graph is planned. The factory validates everything about the node that can be known before a
// tensor exists (dtypes, shapes, attribute values, constant inputs such as Reshape's shape) and
// stores the shapes its loops need, so that Forward and Backward only move numbers. Ops are
// grouped by family, one file each: ops_elementwise.cc (unary, binary with broadcasting, Where,
// Dropout), ops_linalg.cc (Gemm, MatMul), ops_norm.cc (LayerNormalization, RMSNormalization,
// Softmax, ReduceMean/ReduceSum), ops_shape.cc (Transpose, Reshape, Split, Concat, Slice,
// Squeeze/Unsqueeze, Gather, Expand, Trilu, Identity, Constant), ops_integer.cc (Shape, Cast,
// Range, ConstantOfShape, Equal/Less/Greater, Not, int64 Add/Sub/Mul/Div).
//
// Operators (FindOp; ONNX opset 17 names, attributes and semantics unless said):
//   Add Sub Mul Div (numpy broadcasting; floating, or int64 with no gradient: Add/Sub/Mul wrap
//   on overflow, Div truncates toward zero and refuses a zero divisor)
//   Neg Relu LeakyRelu(alpha) Sigmoid Tanh Erf Sqrt Exp
//   Identity  Gelu(approximate "none"|"tanh": opset 20)  Pow (exponent a constant scalar)
//   Gemm(alpha, beta, transA, transB; C broadcast to [M, N])  MatMul (numpy, batched)
//   LayerNormalization(axis, epsilon; output Y only; Scale/B of the normalised shape exactly)
//   RMSNormalization(axis, epsilon: opset 23)  Softmax(axis, default -1)
//   ReduceMean(axes attribute, keepdims)  ReduceSum(axes constant input, keepdims,
//   noop_with_empty_axes)  Gather(axis; int64 indices, negative ones from the end)
//   Transpose(perm)  Reshape(constant shape; 0 and -1; allowzero 0 only)  Squeeze Unsqueeze
//   (constant axes)  Split(axis; constant split input, or num_outputs: opset 18, or equal parts
//   by output count)  Concat(axis)  Slice(constant starts/ends/axes/steps)  Where(bool
//   condition)  Trilu(upper; constant k)  Constant(value_float(s), value_int(s); tensor values
//   go in GraphSpec::constants)  Dropout(constant ratio and training_mode inputs; seed required
//   when training: masks are a hash of it, Note [Dropout masks]; optional bool mask output).
//   Expand(constant int64 shape; bidirectional broadcasting; the gradient sums over the
//   broadcast axes)
// Shape arithmetic and masks (no gradient unless said):
//   Shape(start, end: opset 15; any input, folded at plan time whatever it is, since only its
//   shape is read)  Cast(to: 1 FLOAT and 11 DOUBLE both mean the call's float dtype, so a
//   floating -> floating Cast is the identity and passes its gradient through; 7 INT64, 9 BOOL;
//   floating -> int64 truncates and refuses values out of int64's range; others refused)
//   Range(constant int64 scalars start, limit, delta)  ConstantOfShape(constant int64 shape;
//   `value` a one-element list, floats for the call's float dtype or ints for int64, since
//   attributes hold no tensors; default float 0)  Equal Less Greater (floating or int64, Equal
//   also bool; numpy broadcasting; bool output)  Not(bool).
// Shape-like inputs (Reshape's shape, Slice's starts, ...) must be constants, or computed from
// constants and Shape only (the planner folds such nodes).
//
// Buffers: every value is a contiguous row-major array of its dtype (T for floating values,
// int64_t, or uint8_t for bool). Forward writes every element of its outputs; Backward writes
// every element of each non-null din (overwriting: the executor sums fan-out, Note [Gradient
// accumulation] in executor.cc). Parameters and inputs may be unaligned caller memory.
#ifndef GRADSERVE_ENGINE_GRAPH_OP_H_
#define GRADSERVE_ENGINE_GRAPH_OP_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/string_view.h"
#include "server/engine/graph/spec.h"
#include "server/engine/status_macros.h"
#include "server/engine/types.h"

namespace gradserve::engine::graph {

int64_t NumElements(const Shape& shape);      // 1 for a scalar (rank 0).
std::string ShapeString(const Shape& shape);  // "[2, 3]"
absl::string_view DTypeName(DType dtype);     // "float32", "float64", "int64", "bool"
// Bytes per element at run time (bool is one byte).
int64_t DTypeSize(DType dtype);
inline bool IsFloat(DType dtype) { return dtype == DType::kFloat32 || dtype == DType::kFloat64; }

// A value's type as inferred at plan time.
struct ValueType {
  DType dtype = DType::kFloat32;
  Shape shape;
};

// The data of a constant, known at plan time: shape-like inputs (Reshape's shape, Slice's
// starts, ...) must be constants, and their values are read here.
struct ConstantValue {
  DType dtype = DType::kInt64;
  Shape shape;
  std::vector<int64_t> ints;   // kInt64, kBool
  std::vector<double> floats;  // floating dtypes
};

// Plan-time view of one node, handed to its factory.
class OpContext {
 public:
  OpContext(const NodeSpec& node, int node_index, DType float_dtype,
            std::vector<const ValueType*> inputs, std::vector<const ConstantValue*> constants);

  const NodeSpec& node() const { return node_; }
  DType float_dtype() const { return float_dtype_; }
  int num_inputs() const { return static_cast<int>(inputs_.size()); }
  // Null when the optional input is absent ("" in the spec, or past the end).
  const ValueType* input(int i) const { return i < num_inputs() ? inputs_[i] : nullptr; }
  // Non-null when input i is a constant (or a Constant node's output).
  const ConstantValue* constant(int i) const {
    return i < static_cast<int>(constants_.size()) ? constants_[i] : nullptr;
  }
  int num_outputs() const { return static_cast<int>(node_.outputs.size()); }

  // "graph.nodes[3] (\"attn.qkv\", MatMul)"
  const std::string& where() const { return where_; }
  // INVALID_ARGUMENT "<where>.inputs[i] (\"value\"): <message>", ".attributes.<name>: ", ": ".
  absl::Status InputError(int i, absl::string_view message) const;
  absl::Status AttributeError(absl::string_view name, absl::string_view message) const;
  absl::Status Error(absl::string_view message) const;

  // Input i must be present with this dtype (kFloat32 stands for "the call's float dtype").
  absl::Status ExpectFloat(int i) const;
  absl::Status ExpectDType(int i, DType dtype) const;
  // Input i must be a constant int64 tensor of rank <= 1; its values.
  absl::StatusOr<std::vector<int64_t>> ConstantInts(int i) const;
  // The numpy broadcast of inputs 0 and 1's shapes (INVALID_ARGUMENT naming input 1 if none).
  absl::StatusOr<Shape> BroadcastInputs() const;

  // Attribute readers: the default when absent, INVALID_ARGUMENT when of the wrong type. Each
  // read marks the attribute known; UnknownAttribute() names the first one no reader asked for.
  absl::StatusOr<int64_t> Int(absl::string_view name, int64_t default_value);
  absl::StatusOr<double> Float(absl::string_view name, double default_value);
  absl::StatusOr<std::string> String(absl::string_view name, absl::string_view default_value);
  // `present` (may be null) tells whether the attribute was given.
  absl::StatusOr<std::vector<int64_t>> Ints(absl::string_view name, bool* present);
  absl::StatusOr<std::vector<double>> Floats(absl::string_view name, bool* present);
  absl::Status UnknownAttribute() const;

 private:
  const AttributeSpec* Find(absl::string_view name);

  const NodeSpec& node_;
  DType float_dtype_;
  std::vector<const ValueType*> inputs_;
  std::vector<const ConstantValue*> constants_;
  std::vector<bool> read_;
  std::string where_;
};

// Per-call data every kernel may read.
struct CallContext {
  uint64_t dropout_seed = 0;  // Mixed into every Dropout node's own seed (RunOptions).
};

template <typename T>
struct ForwardArgs {
  const void* const* in;  // Per input slot; null where an optional input is absent.
  void* const* out;       // Per output slot.
  T* saved;               // saved_elements() of T, kept for Backward.
  const CallContext* call;
};

template <typename T>
struct BackwardArgs {
  const void* const* in;   // Forward inputs: valid where backward_reads_inputs() says.
  const void* const* out;  // Forward outputs: valid where backward_reads_outputs() says.
  const T* saved;
  const T* const* dout;  // dL/d(output i); zeros where no gradient arrived; null if not float.
  T* const* din;         // dL/d(input i) to write; null where nobody needs it.
  const CallContext* call;
};

// Bit j of a per-input or per-output mask (differentiable_inputs(), backward_reads_inputs(), ...):
// bit 31 stands for every input from the 31st on, since Concat takes any number of inputs.
inline bool InputBit(uint32_t mask, size_t j) { return (mask >> (j < 31 ? j : 31)) & 1u; }

class OpKernel {
 public:
  virtual ~OpKernel() = default;
  // Forward fails only on data errors (Gather's indices out of range): INVALID_ARGUMENT.
  virtual absl::Status Forward(const ForwardArgs<float>& args) const = 0;
  virtual absl::Status Forward(const ForwardArgs<double>& args) const = 0;
  virtual void Backward(const BackwardArgs<float>& args) const = 0;
  virtual void Backward(const BackwardArgs<double>& args) const = 0;

  // What Backward reads from the forward pass (bit i = slot i): only those values are kept.
  uint32_t backward_reads_inputs() const { return reads_inputs_; }
  uint32_t backward_reads_outputs() const { return reads_outputs_; }
  // Inputs that can receive a gradient (floating data inputs; not shapes, indices, masks).
  uint32_t differentiable_inputs() const { return differentiable_; }
  int64_t saved_elements() const { return saved_elements_; }
  // Estimated floating-point operations (multiply-adds count 2).
  double forward_flops() const { return forward_flops_; }
  double backward_flops() const { return backward_flops_; }
  // Temporary elements (of T) Forward or Backward allocates for themselves, at most.
  int64_t workspace_elements() const { return workspace_elements_; }
  // Bit i: dL/d(input i) is dL/d(output 0) itself (same shape, no arithmetic), so the executor
  // may hand the output's gradient buffer to the input instead of having Backward copy it.
  uint32_t gradient_passthrough() const { return passthrough_; }
  // Output 0 is input 0's bytes unchanged (Reshape, Squeeze, Unsqueeze, Identity): the executor
  // shares the buffer instead of running Forward.
  bool output_aliases_input() const { return aliases_input_; }
  // Bit i: Forward reads only input i's shape (known at plan time), never its data, so the
  // planner folds the node even when that input is not a constant (Shape), passing null there.
  uint32_t shape_only_inputs() const { return shape_only_; }

 protected:
  uint32_t reads_inputs_ = 0;
  uint32_t reads_outputs_ = 0;
  uint32_t differentiable_ = 0;
  int64_t saved_elements_ = 0;
  double forward_flops_ = 0;
  double backward_flops_ = 0;
  int64_t workspace_elements_ = 0;
  uint32_t passthrough_ = 0;
  bool aliases_input_ = false;
  uint32_t shape_only_ = 0;
};

// Implements the four virtual entry points with Derived::Fwd<T> / Derived::Bwd<T> templates.
template <typename Derived>
class Kernel : public OpKernel {
 public:
  absl::Status Forward(const ForwardArgs<float>& a) const final { return Self().Fwd(a); }
  absl::Status Forward(const ForwardArgs<double>& a) const final { return Self().Fwd(a); }
  void Backward(const BackwardArgs<float>& a) const final { Self().Bwd(a); }
  void Backward(const BackwardArgs<double>& a) const final { Self().Bwd(a); }

 private:
  const Derived& Self() const { return static_cast<const Derived&>(*this); }
};

// Validates a node and makes its kernel; fills `outputs` (one per node output).
using OpFactory = absl::StatusOr<std::unique_ptr<OpKernel>> (*)(OpContext& context,
                                                                std::vector<ValueType>* outputs);

struct OpInfo {
  std::string_view name;  // ONNX op_type
  int min_inputs;
  int max_inputs;
  int min_outputs;
  int max_outputs;
  OpFactory factory;
};

// The operator named op_type, or null.
const OpInfo* FindOp(std::string_view op_type);
// Every supported op_type, sorted (GetServerInfo can list them).
std::vector<absl::string_view> SupportedOps();

// Factories, one per op family file.
absl::StatusOr<std::unique_ptr<OpKernel>> MakeUnary(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeBinary(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakePow(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeWhere(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeDropout(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeGemm(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeMatMul(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeLayerNorm(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeRmsNorm(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeSoftmax(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeReduce(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeTranspose(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeReshape(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeSplit(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeConcat(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeSlice(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeGather(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeTrilu(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeConstant(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeExpand(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeShape(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeCast(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeRange(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeConstantOfShape(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeCompare(OpContext&, std::vector<ValueType>*);
absl::StatusOr<std::unique_ptr<OpKernel>> MakeNot(OpContext&, std::vector<ValueType>*);
// Add/Sub/Mul/Div of int64 operands (MakeBinary hands them over).
absl::StatusOr<std::unique_ptr<OpKernel>> MakeIntegerBinary(OpContext&, std::vector<ValueType>*);

// Planner fusions (Note [Fusions] in graph.cc): a MatMul of rank >= 2 operands a and b as
// stored, reading a (ta) or b (tb) transposed in its last two axes, with a bias [N] as input 2
// added to its output (bias). REQUIRES: shapes that MakeMatMul accepted, once transposed.
std::unique_ptr<OpKernel> MakeFusedMatMul(const Shape& a, bool ta, const Shape& b, bool tb,
                                          bool bias);

// Planner fusion: a Split whose piece k is the strided view of its input [whole] given by
// pieces[k] (element strides into the whole and an offset): a Split followed by a Reshape and
// a Transpose of each piece writes each piece in its final layout at once. The pieces must
// tile the whole.
struct StridedPiece {
  Shape shape;
  std::vector<int64_t> strides;
  int64_t offset = 0;
};
std::unique_ptr<OpKernel> MakeStridedSplit(const Shape& whole, DType dtype,
                                           const std::vector<StridedPiece>& pieces);

// Planner fusion: a Transpose of a value of shape `in` by `perm` (a valid permutation).
std::unique_ptr<OpKernel> MakeTransposeKernel(const Shape& in, const std::vector<int64_t>& perm,
                                              DType dtype);

// y = Softmax(Where(mask, x * scale, fill)) over x's last axis: inputs x, scale (a constant
// scalar; null if has_scale is false), mask (constant bool, broadcast to x, last axis x's or 1),
// fill (constant scalar). The same bits as the three nodes.
std::unique_ptr<OpKernel> MakeMaskedSoftmax(const Shape& x, const Shape& mask, bool has_scale);

// Constant nodes: the value their `value_*` attribute defines (the planner folds them into
// constants). REQUIRES: the node was accepted by MakeConstant.
absl::StatusOr<ConstantValue> ConstantNodeValue(OpContext& context);

}  // namespace gradserve::engine::graph

#endif  // GRADSERVE_ENGINE_GRAPH_OP_H_
