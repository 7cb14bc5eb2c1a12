// The int64 and bool operators torch.onnx's exports compute shapes and masks with: Shape, Cast,
// Range, ConstantOfShape, Equal/Less/Greater, Not, and the int64 forms of Add/Sub/Mul/Div
// (MakeBinary hands int64 operands to MakeIntegerBinary). A GPT export with dynamic axes reads
// its sequence length with Shape and rebuilds every Reshape's target from it; since Graph::Create
// knows every input's shape, all of that folds to constants at plan time (Note [Constant
// folding] in graph.cc). They also run per call where an input is not a constant (Equal on an
// int64 graph input), so none of them assumes it is folded. Only Cast between floating types
// has a gradient.
//
// Integer arithmetic never has undefined behaviour, whatever a request holds: Add, Sub and Mul
// wrap (two's complement, as numpy's int64 does), Div refuses a zero divisor and wraps
// INT64_MIN / -1, and float -> int64 casts refuse values that do not fit.
#include <algorithm>
#include <cstring>
#include <string>
#include <variant>

#include "absl/strings/str_cat.h"
#include "server/engine/graph/kernels.h"

namespace gradserve::engine::graph {
namespace {

class ShapeKernel final : public Kernel<ShapeKernel> {
 public:
  explicit ShapeKernel(std::vector<int64_t> dims) : dims_(std::move(dims)) { shape_only_ = 1; }
  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    if (!dims_.empty()) std::memcpy(a.out[0], dims_.data(), sizeof(int64_t) * dims_.size());
    return absl::OkStatus();
  }
  template <typename T>
  void Bwd(const BackwardArgs<T>&) const {}

 private:
  std::vector<int64_t> dims_;
};

// ONNX TensorProto dtype numbers Cast's `to` may name.
constexpr int64_t kOnnxFloat = 1;
constexpr int64_t kOnnxInt32 = 6;
constexpr int64_t kOnnxInt64 = 7;
constexpr int64_t kOnnxBool = 9;
constexpr int64_t kOnnxFloat16 = 10;
constexpr int64_t kOnnxDouble = 11;

// Between the engine's three kinds of value: floating (the call's dtype), int64, bool.
class CastKernel final : public Kernel<CastKernel> {
 public:
  CastKernel(DType from, DType to, int64_t n, std::string where)
      : from_(from), to_(to), n_(n), where_(std::move(where)) {
    if (from == to) {
      aliases_input_ = true;
      if (IsFloat(from)) differentiable_ = passthrough_ = 1;
    }
    forward_flops_ = static_cast<double>(n);
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    if (from_ == to_) {
      std::memcpy(a.out[0], a.in[0], n_ * DTypeSize(from_));
      return absl::OkStatus();
    }
    switch (from_) {
      case DType::kFloat32:
      case DType::kFloat64:
        return FromFloat(static_cast<const T*>(a.in[0]), a.out[0]);
      case DType::kInt64:
        To<T>(static_cast<const int64_t*>(a.in[0]), a.out[0]);
        break;
      case DType::kBool:
        To<T>(static_cast<const uint8_t*>(a.in[0]), a.out[0]);
        break;
    }
    return absl::OkStatus();
  }

  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {
    if (a.din[0] != nullptr) std::memcpy(a.din[0], a.dout[0], sizeof(T) * n_);
  }

 private:
  template <typename T>
  absl::Status FromFloat(const T* x, void* out) const {
    if (to_ == DType::kBool) {  // NaN is not zero, so true (as numpy and onnxruntime).
      uint8_t* y = static_cast<uint8_t*>(out);
      ForEachElement(n_, [=](int64_t j) { y[j] = x[j] != T(0); });
      return absl::OkStatus();
    }
    // Converting a double outside int64's range is undefined behaviour: [-2^63, 2^63) fits.
    constexpr double kLimit = 9223372036854775808.0;
    int64_t* y = static_cast<int64_t*>(out);
    for (int64_t j = 0; j < n_; ++j) {
      const double v = static_cast<double>(x[j]);
      if (!(v >= -kLimit && v < kLimit)) {
        return absl::InvalidArgumentError(absl::StrCat(
            where_, ".inputs[0]: value ", v, " at flat index ", j, " does not fit in an int64"));
      }
      y[j] = static_cast<int64_t>(v);  // Toward zero, as ONNX's Cast.
    }
    return absl::OkStatus();
  }

  template <typename T, typename E>
  void To(const E* x, void* out) const {
    if (to_ == DType::kBool) {
      uint8_t* y = static_cast<uint8_t*>(out);
      ForEachElement(n_, [=](int64_t j) { y[j] = x[j] != 0; });
    } else if (to_ == DType::kInt64) {
      int64_t* y = static_cast<int64_t*>(out);
      ForEachElement(n_, [=](int64_t j) { y[j] = static_cast<int64_t>(x[j]); });
    } else {
      T* y = static_cast<T*>(out);
      ForEachElement(n_, [=](int64_t j) { y[j] = static_cast<T>(x[j]); });
    }
  }

  DType from_, to_;
  int64_t n_;
  std::string where_;
};

// Writes values known at plan time (Range's, ConstantOfShape's), so it folds like a constant.
class FillKernel final : public Kernel<FillKernel> {
 public:
  // out[j] = start + j * delta for j < n (int64 wrapping: Range's values all fit, the last
  // step may not), or the floating `value` everywhere.
  FillKernel(DType dtype, int64_t n, int64_t start, int64_t delta, double value)
      : dtype_(dtype), n_(n), start_(start), delta_(delta), value_(value) {
    forward_flops_ = static_cast<double>(n);
  }
  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    if (dtype_ == DType::kInt64) {
      int64_t* y = static_cast<int64_t*>(a.out[0]);
      const uint64_t s = static_cast<uint64_t>(start_), d = static_cast<uint64_t>(delta_);
      ForEachElement(n_, [=](int64_t j) { y[j] = static_cast<int64_t>(s + d * j); });
    } else {
      T* y = static_cast<T*>(a.out[0]);
      const T v = static_cast<T>(value_);
      ForEachElement(n_, [=](int64_t j) { y[j] = v; });
    }
    return absl::OkStatus();
  }
  template <typename T>
  void Bwd(const BackwardArgs<T>&) const {}

 private:
  DType dtype_;
  int64_t n_, start_, delta_;
  double value_;
};

enum class Compare { kEqual, kLess, kGreater };

// A bool result per broadcast pair of floating, int64 or bool elements.
class CompareKernel final : public Kernel<CompareKernel> {
 public:
  CompareKernel(Compare kind, DType dtype, const Shape& a, const Shape& b, const Shape& out)
      : kind_(kind), dtype_(dtype), bc_(out, {&a, &b}) {
    forward_flops_ = static_cast<double>(NumElements(out));
  }
  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    uint8_t* y = static_cast<uint8_t*>(a.out[0]);
    switch (dtype_) {
      case DType::kFloat32:
      case DType::kFloat64:
        Run(static_cast<const T*>(a.in[0]), static_cast<const T*>(a.in[1]), y);
        break;
      case DType::kInt64:
        Run(static_cast<const int64_t*>(a.in[0]), static_cast<const int64_t*>(a.in[1]), y);
        break;
      case DType::kBool:
        Run(static_cast<const uint8_t*>(a.in[0]), static_cast<const uint8_t*>(a.in[1]), y);
        break;
    }
    return absl::OkStatus();
  }
  template <typename T>
  void Bwd(const BackwardArgs<T>&) const {}

 private:
  template <typename E>
  void Run(const E* a, const E* b, uint8_t* y) const {
    switch (kind_) {
      case Compare::kEqual:
        BinaryLoop(bc_, a, b, y, [](E u, E v) -> uint8_t { return u == v; });
        break;
      case Compare::kLess:
        BinaryLoop(bc_, a, b, y, [](E u, E v) -> uint8_t { return u < v; });
        break;
      case Compare::kGreater:
        BinaryLoop(bc_, a, b, y, [](E u, E v) -> uint8_t { return u > v; });
        break;
    }
  }

  Compare kind_;
  DType dtype_;
  Broadcast bc_;
};

class NotKernel final : public Kernel<NotKernel> {
 public:
  explicit NotKernel(int64_t n) : n_(n) { forward_flops_ = static_cast<double>(n); }
  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    const uint8_t* x = static_cast<const uint8_t*>(a.in[0]);
    uint8_t* y = static_cast<uint8_t*>(a.out[0]);
    ForEachElement(n_, [=](int64_t j) { y[j] = x[j] == 0; });
    return absl::OkStatus();
  }
  template <typename T>
  void Bwd(const BackwardArgs<T>&) const {}

 private:
  int64_t n_;
};

enum class IntOp { kAdd, kSub, kMul, kDiv };

class IntBinaryKernel final : public Kernel<IntBinaryKernel> {
 public:
  IntBinaryKernel(IntOp kind, const Shape& a, const Shape& b, const Shape& out, std::string where)
      : kind_(kind), b_elements_(NumElements(b)), bc_(out, {&a, &b}), where_(std::move(where)) {
    forward_flops_ = static_cast<double>(NumElements(out));
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& args) const {
    const int64_t* a = static_cast<const int64_t*>(args.in[0]);
    const int64_t* b = static_cast<const int64_t*>(args.in[1]);
    int64_t* y = static_cast<int64_t*>(args.out[0]);
    // Through uint64_t: wrapping is defined there, and int64_t's result is its bits (C++20).
    using U = uint64_t;
    switch (kind_) {
      case IntOp::kAdd:
        BinaryLoop(bc_, a, b, y, [](int64_t u, int64_t v) {
          return static_cast<int64_t>(static_cast<U>(u) + static_cast<U>(v));
        });
        break;
      case IntOp::kSub:
        BinaryLoop(bc_, a, b, y, [](int64_t u, int64_t v) {
          return static_cast<int64_t>(static_cast<U>(u) - static_cast<U>(v));
        });
        break;
      case IntOp::kMul:
        BinaryLoop(bc_, a, b, y, [](int64_t u, int64_t v) {
          return static_cast<int64_t>(static_cast<U>(u) * static_cast<U>(v));
        });
        break;
      case IntOp::kDiv:
        for (int64_t j = 0; j < b_elements_; ++j) {
          if (b[j] == 0) {
            return absl::InvalidArgumentError(
                absl::StrCat(where_, ".inputs[1]: integer division by zero (flat index ", j, ")"));
          }
        }
        // C++'s / truncates toward zero, as ONNX's integer Div; only INT64_MIN / -1 overflows.
        BinaryLoop(bc_, a, b, y, [](int64_t u, int64_t v) {
          return v == -1 ? static_cast<int64_t>(U{0} - static_cast<U>(u)) : u / v;
        });
        break;
    }
    return absl::OkStatus();
  }
  template <typename T>
  void Bwd(const BackwardArgs<T>&) const {}

 private:
  IntOp kind_;
  int64_t b_elements_;
  Broadcast bc_;
  std::string where_;
};

// Shapes past this many elements are refused before their product could overflow; the plan's
// limits (max_tensor_elements, far smaller) then apply to what is left.
constexpr int64_t kMaxElements = int64_t{1} << 62;

absl::StatusOr<Shape> ShapeInput(const OpContext& c, int i) {
  ASSIGN_OR_RETURN(const std::vector<int64_t> dims, c.ConstantInts(i));
  if (c.constant(i)->shape.size() != 1) {
    return c.InputError(i, "expected a 1-D shape, got a scalar");
  }
  int64_t n = 1;
  for (int64_t d : dims) {
    if (d < 0) return c.InputError(i, absl::StrCat("negative size in ", ShapeString(dims)));
    if (d != 0 && n > kMaxElements / d) {
      return c.InputError(i, absl::StrCat("shape ", ShapeString(dims), " has too many elements"));
    }
    n *= d;
  }
  return dims;
}

}  // namespace

absl::StatusOr<std::unique_ptr<OpKernel>> MakeShape(OpContext& c, std::vector<ValueType>* out) {
  if (c.input(0) == nullptr) return c.InputError(0, "required input is missing");
  const Shape& in = c.input(0)->shape;
  const int64_t rank = static_cast<int64_t>(in.size());
  ASSIGN_OR_RETURN(int64_t start, c.Int("start", 0));
  ASSIGN_OR_RETURN(int64_t end, c.Int("end", rank));
  RETURN_IF_ERROR(c.UnknownAttribute());
  // Opset 15: negative ends count from the back; both are then clamped to [0, rank].
  if (start < 0) start = std::max<int64_t>(0, start + rank);
  if (end < 0) end = std::max<int64_t>(0, end + rank);
  start = std::min(start, rank);
  end = std::clamp(end, start, rank);
  std::vector<int64_t> dims(in.begin() + start, in.begin() + end);
  out->push_back({DType::kInt64, {static_cast<int64_t>(dims.size())}});
  return std::make_unique<ShapeKernel>(std::move(dims));
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeCast(OpContext& c, std::vector<ValueType>* out) {
  if (c.input(0) == nullptr) return c.InputError(0, "required input is missing");
  bool present = false;
  for (const AttributeSpec& a : c.node().attributes) present |= a.name == "to";
  ASSIGN_OR_RETURN(const int64_t to, c.Int("to", 0));
  RETURN_IF_ERROR(c.UnknownAttribute());
  if (!present) return c.AttributeError("to", "required");
  DType dtype = DType::kInt64;
  switch (to) {
    case kOnnxFloat:
    case kOnnxDouble:  // A call computes in one floating dtype: both are that one.
      dtype = c.float_dtype();
      break;
    case kOnnxInt64:
      dtype = DType::kInt64;
      break;
    case kOnnxBool:
      dtype = DType::kBool;
      break;
    default: {
      // The engine has no int32 or half values: refused rather than silently widened.
      const absl::string_view name = to == kOnnxInt32     ? " (INT32)"
                                     : to == kOnnxFloat16 ? " (FLOAT16)"
                                                          : "";
      return c.AttributeError(
          "to", absl::StrCat(to, name,
                             " is not supported (supported: 1 FLOAT and 11 DOUBLE, both the "
                             "call's float dtype; 7 INT64; 9 BOOL)"));
    }
  }
  const ValueType& in = *c.input(0);
  out->push_back({dtype, in.shape});
  return std::make_unique<CastKernel>(in.dtype, dtype, NumElements(in.shape), c.where());
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeRange(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(c.UnknownAttribute());
  int64_t v[3];
  for (int i = 0; i < 3; ++i) {
    ASSIGN_OR_RETURN(const std::vector<int64_t> x, c.ConstantInts(i));
    if (x.size() != 1 || !c.constant(i)->shape.empty()) {
      return c.InputError(
          i, absl::StrCat("expected a scalar, got shape ", ShapeString(c.constant(i)->shape)));
    }
    v[i] = x[0];
  }
  const int64_t start = v[0], limit = v[1], delta = v[2];
  if (delta == 0) return c.InputError(2, "delta is 0");
  // max(ceil((limit - start) / delta), 0), in uint64_t: the span may not fit in an int64_t.
  uint64_t span = 0, step = 0;
  if (delta > 0 && limit > start) {
    span = static_cast<uint64_t>(limit) - static_cast<uint64_t>(start);
    step = static_cast<uint64_t>(delta);
  } else if (delta < 0 && limit < start) {
    span = static_cast<uint64_t>(start) - static_cast<uint64_t>(limit);
    step = uint64_t{0} - static_cast<uint64_t>(delta);
  }
  const uint64_t count = step == 0 ? 0 : span / step + (span % step != 0 ? 1 : 0);
  if (count > static_cast<uint64_t>(kMaxElements)) {
    return c.Error(absl::StrCat("Range(", start, ", ", limit, ", ", delta, ") has ", count,
                                " elements, too many"));
  }
  const int64_t n = static_cast<int64_t>(count);
  out->push_back({DType::kInt64, {n}});
  return std::make_unique<FillKernel>(DType::kInt64, n, start, delta, 0.0);
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeConstantOfShape(OpContext& c,
                                                              std::vector<ValueType>* out) {
  ASSIGN_OR_RETURN(const Shape shape, ShapeInput(c, 0));
  // ONNX's `value` is a one-element tensor; AttributeValue has none, so it comes as a
  // one-element list: floats (the call's float dtype) or ints (int64). Default: float 0.
  DType dtype = c.float_dtype();
  double value = 0;
  int64_t int_value = 0;
  for (const AttributeSpec& a : c.node().attributes) {
    if (a.name != "value") continue;
    if (std::holds_alternative<std::vector<int64_t>>(a.value)) {
      ASSIGN_OR_RETURN(const std::vector<int64_t> x, c.Ints("value", nullptr));
      if (x.size() != 1) return c.AttributeError("value", "expected one value");
      dtype = DType::kInt64;
      int_value = x[0];
    } else {
      ASSIGN_OR_RETURN(const std::vector<double> x, c.Floats("value", nullptr));
      if (x.size() != 1) return c.AttributeError("value", "expected one value");
      value = x[0];
    }
  }
  RETURN_IF_ERROR(c.UnknownAttribute());
  out->push_back({dtype, shape});
  // An int64 fill is Range's with step 0.
  return std::make_unique<FillKernel>(dtype, NumElements(shape), int_value, 0, value);
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeCompare(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(c.UnknownAttribute());
  for (int i = 0; i < 2; ++i) {
    if (c.input(i) == nullptr) return c.InputError(i, "required input is missing");
  }
  const std::string& op = c.node().op_type;
  const Compare kind = op == "Equal"  ? Compare::kEqual
                       : op == "Less" ? Compare::kLess
                                      : Compare::kGreater;
  const DType dtype = c.input(0)->dtype;
  if (dtype == DType::kBool && kind != Compare::kEqual) {
    return c.InputError(0, "expected a floating or int64 tensor, got bool");
  }
  RETURN_IF_ERROR(c.ExpectDType(1, dtype));
  const Shape& a = c.input(0)->shape;
  const Shape& b = c.input(1)->shape;
  ASSIGN_OR_RETURN(const Shape shape, c.BroadcastInputs());
  out->push_back({DType::kBool, shape});
  return std::make_unique<CompareKernel>(kind, dtype, a, b, shape);
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeNot(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(c.ExpectDType(0, DType::kBool));
  RETURN_IF_ERROR(c.UnknownAttribute());
  out->push_back(*c.input(0));
  return std::make_unique<NotKernel>(NumElements(c.input(0)->shape));
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeIntegerBinary(OpContext& c,
                                                            std::vector<ValueType>* out) {
  RETURN_IF_ERROR(c.ExpectDType(0, DType::kInt64));
  RETURN_IF_ERROR(c.ExpectDType(1, DType::kInt64));
  RETURN_IF_ERROR(c.UnknownAttribute());
  const Shape& a = c.input(0)->shape;
  const Shape& b = c.input(1)->shape;
  ASSIGN_OR_RETURN(const Shape shape, c.BroadcastInputs());
  const std::string& op = c.node().op_type;
  const IntOp kind = op == "Add"   ? IntOp::kAdd
                     : op == "Sub" ? IntOp::kSub
                     : op == "Mul" ? IntOp::kMul
                                   : IntOp::kDiv;
  if (kind == IntOp::kDiv) {  // A constant divisor is checked now, naming the node.
    if (const ConstantValue* k = c.constant(1)) {
      for (int64_t v : k->ints) {
        if (v == 0) return c.InputError(1, "integer division by zero");
      }
    }
  }
  out->push_back({DType::kInt64, shape});
  return std::make_unique<IntBinaryKernel>(kind, a, b, shape, c.where());
}

}  // namespace gradserve::engine::graph
