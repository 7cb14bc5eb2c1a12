// Element-wise operators: unary activations, Add/Sub/Mul/Div with numpy broadcasting, Pow by a
// constant, Where and Dropout.
//
// The activations use the chain's formulas operation for operation (layers.cc), in a file
// compiled with the same flags, so a graph's Relu/Gelu/... rounds exactly as the chain's layer.
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "server/engine/elementwise_math.h"
#include "server/engine/graph/kernels.h"

namespace gradserve::engine::graph {
namespace {

constexpr double kTwoOverSqrtPi = 1.12837916709551257390;  // 2/sqrt(pi)

enum class Unary {
  kNeg,
  kRelu,
  kLeakyRelu,
  kSigmoid,
  kTanh,
  kGelu,
  kGeluTanh,
  kErf,
  kSqrt,
  kExp,
  kIdentity
};

class UnaryKernel final : public Kernel<UnaryKernel> {
 public:
  UnaryKernel(Unary kind, double alpha, int64_t n, int64_t element_bytes, bool differentiable)
      : kind_(kind), alpha_(alpha), n_(n), element_bytes_(element_bytes) {
    differentiable_ = differentiable ? 1u : 0u;
    if (kind == Unary::kIdentity) {
      passthrough_ = differentiable_;
      aliases_input_ = true;
    }
    switch (kind) {
      case Unary::kRelu:
      case Unary::kSigmoid:
      case Unary::kTanh:
      case Unary::kSqrt:
      case Unary::kExp:
        reads_outputs_ = 1;  // Differentiated from the output (as the chain's layers are).
        break;
      case Unary::kLeakyRelu:
      case Unary::kGelu:
      case Unary::kGeluTanh:
      case Unary::kErf:
        reads_inputs_ = 1;
        break;
      case Unary::kNeg:
      case Unary::kIdentity:
        break;
    }
    forward_flops_ = static_cast<double>(n) * (kind == Unary::kIdentity ? 0 : 4);
    backward_flops_ = static_cast<double>(n) * 4;
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    const T* in = static_cast<const T*>(a.in[0]);
    T* out = static_cast<T*>(a.out[0]);
    switch (kind_) {
      case Unary::kIdentity:
        std::memcpy(a.out[0], a.in[0], n_ * element_bytes_);
        break;
      case Unary::kNeg:
        ForEachElement(n_, [=](int64_t j) { out[j] = -in[j]; });
        break;
      case Unary::kRelu:
        ForEachElement(n_, [=](int64_t j) { out[j] = in[j] > T(0) ? in[j] : T(0); });
        break;
      case Unary::kLeakyRelu: {
        const T slope = static_cast<T>(alpha_);
        ForEachElement(n_, [=](int64_t j) { out[j] = in[j] > T(0) ? in[j] : in[j] * slope; });
        break;
      }
      case Unary::kSigmoid:
        ForEachElement(n_, [=](int64_t j) { out[j] = Sigmoid<T>(in[j]); });
        break;
      case Unary::kTanh:
        ForEachElement(n_, [=](int64_t j) { out[j] = Tanh<T>(in[j]); });
        break;
      case Unary::kGelu:
        ForEachElement(n_, [=](int64_t j) { out[j] = Gelu<T>(in[j]); });
        break;
      case Unary::kGeluTanh:
        ForEachElement(n_, [=](int64_t j) { out[j] = GeluTanh<T>(in[j]); });
        break;
      case Unary::kErf:
        ForEachElement(n_, [=](int64_t j) { out[j] = std::erf(in[j]); });
        break;
      case Unary::kSqrt:
        ForEachElement(n_, [=](int64_t j) { out[j] = std::sqrt(in[j]); });
        break;
      case Unary::kExp:
        ForEachElement(n_, [=](int64_t j) { out[j] = std::exp(in[j]); });
        break;
    }
    return absl::OkStatus();
  }

  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {
    const T* x = static_cast<const T*>(a.in[0]);
    const T* y = static_cast<const T*>(a.out[0]);
    const T* dy = a.dout[0];
    T* dx = a.din[0];
    if (dx == nullptr) return;
    switch (kind_) {
      case Unary::kIdentity:
        std::memcpy(dx, dy, sizeof(T) * n_);
        break;
      case Unary::kNeg:
        ForEachElement(n_, [=](int64_t j) { dx[j] = -dy[j]; });
        break;
      case Unary::kRelu:  // y = max(x, 0): dx = dy where y > 0.
        ForEachElement(n_, [=](int64_t j) { dx[j] = y[j] > T(0) ? dy[j] : T(0); });
        break;
      case Unary::kLeakyRelu: {  // y = x > 0 ? x : a x: dx = x > 0 ? dy : a dy.
        const T slope = static_cast<T>(alpha_);
        ForEachElement(n_, [=](int64_t j) { dx[j] = x[j] > T(0) ? dy[j] : dy[j] * slope; });
        break;
      }
      case Unary::kSigmoid:  // y = s(x): dx = dy (1 - y) y.
        ForEachElement(n_, [=](int64_t j) { dx[j] = dy[j] * (T(1) - y[j]) * y[j]; });
        break;
      case Unary::kTanh:  // y = tanh(x): dx = dy (1 - y^2).
        ForEachElement(n_, [=](int64_t j) { dx[j] = dy[j] * (T(1) - y[j] * y[j]); });
        break;
      case Unary::kGelu:  // y = x Phi(x): dx = dy (Phi(x) + x phi(x)).
        ForEachElement(n_, [=](int64_t j) { dx[j] = dy[j] * GeluDerivative<T>(x[j]); });
        break;
      case Unary::kGeluTanh:  // y = x/2 (1 + tanh(u)), u = c (x + k x^3).
        ForEachElement(n_, [=](int64_t j) { dx[j] = dy[j] * GeluTanhDerivative<T>(x[j]); });
        break;
      case Unary::kErf:  // dx = dy 2/sqrt(pi) e^(-x^2).
        ForEachElement(
            n_, [=](int64_t j) { dx[j] = dy[j] * (T(kTwoOverSqrtPi) * std::exp(-x[j] * x[j])); });
        break;
      case Unary::kSqrt:  // y = sqrt(x): dx = dy / (2 y).
        ForEachElement(n_, [=](int64_t j) { dx[j] = dy[j] / (T(2) * y[j]); });
        break;
      case Unary::kExp:  // y = e^x: dx = dy y.
        ForEachElement(n_, [=](int64_t j) { dx[j] = dy[j] * y[j]; });
        break;
    }
  }

 private:
  Unary kind_;
  double alpha_;
  int64_t n_;
  int64_t element_bytes_;
};

enum class Binary { kAdd, kSub, kMul, kDiv };

class BinaryKernel final : public Kernel<BinaryKernel> {
 public:
  BinaryKernel(Binary kind, const Shape& a, const Shape& b, const Shape& out)
      : kind_(kind),
        n_(NumElements(out)),
        a_full_(NumElements(a) == n_ && a.size() == out.size()),
        b_full_(NumElements(b) == n_ && b.size() == out.size()),
        forward_(out, {&a, &b}),
        dy_with_b_(out, {&out, &b}),
        dy_with_a_(out, {&out, &a}),
        reduce_a_(out, a),
        reduce_b_(out, b) {
    differentiable_ = 3;
    if (kind == Binary::kMul || kind == Binary::kDiv) reads_inputs_ = 3;
    // d(a + b)/da, d(a + b)/db and d(a - b)/da are dY itself where no axis is broadcast.
    if (kind == Binary::kAdd || kind == Binary::kSub) passthrough_ |= a_full_ ? 1u : 0u;
    if (kind == Binary::kAdd) passthrough_ |= b_full_ ? 2u : 0u;
    forward_flops_ = static_cast<double>(n_);
    backward_flops_ = 3.0 * static_cast<double>(n_);
    if (!a_full_ || !b_full_) workspace_elements_ = n_;
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& args) const {
    const T* a = static_cast<const T*>(args.in[0]);
    const T* b = static_cast<const T*>(args.in[1]);
    T* out = static_cast<T*>(args.out[0]);
    switch (kind_) {
      case Binary::kAdd:
        BinaryLoop(forward_, a, b, out, [](T x, T y) { return x + y; });
        break;
      case Binary::kSub:
        BinaryLoop(forward_, a, b, out, [](T x, T y) { return x - y; });
        break;
      case Binary::kMul:
        BinaryLoop(forward_, a, b, out, [](T x, T y) { return x * y; });
        break;
      case Binary::kDiv:
        BinaryLoop(forward_, a, b, out, [](T x, T y) { return x / y; });
        break;
    }
    return absl::OkStatus();
  }

  template <typename T>
  void Bwd(const BackwardArgs<T>& args) const {
    const T* a = static_cast<const T*>(args.in[0]);
    const T* b = static_cast<const T*>(args.in[1]);
    const T* dy = args.dout[0];
    std::vector<T> scratch;
    // dL/da and dL/db: the element-wise product term, then summed over broadcast axes.
    for (int side = 0; side < 2; ++side) {
      T* din = args.din[side];
      if (din == nullptr) continue;
      const bool full = side == 0 ? a_full_ : b_full_;
      const SumToShape& reduce = side == 0 ? reduce_a_ : reduce_b_;
      const double sign = kind_ == Binary::kSub && side == 1 ? -1.0 : 1.0;
      if (kind_ == Binary::kAdd || kind_ == Binary::kSub) {
        if (full && sign == 1.0) {
          std::memcpy(din, dy, sizeof(T) * n_);
        } else if (full) {
          ForEachElement(n_, [=](int64_t j) { din[j] = -dy[j]; });
        } else {
          reduce.Run(dy, din, sign);
        }
        continue;
      }
      T* term = din;
      if (!full) {
        scratch.resize(n_);
        term = scratch.data();
      }
      if (kind_ == Binary::kMul) {  // d(a b)/da = b, d(a b)/db = a.
        if (side == 0) {
          BinaryLoop(dy_with_b_, dy, b, term, [](T g, T y) { return g * y; });
        } else {
          BinaryLoop(dy_with_a_, dy, a, term, [](T g, T x) { return g * x; });
        }
      } else if (side == 0) {  // d(a / b)/da = 1 / b.
        BinaryLoop(dy_with_b_, dy, b, term, [](T g, T y) { return g / y; });
      } else {  // d(a / b)/db = -a / b^2: computed as -(dy a / b) / b over the broadcast.
        // a and b broadcast to the output with the forward layout; then times dy.
        BinaryLoop(forward_, a, b, term, [](T x, T y) { return -(x / y) / y; });
        ForEachElement(n_, [=](int64_t j) { term[j] = term[j] * dy[j]; });
      }
      if (!full) reduce.Run(term, din, 1.0);
    }
  }

 private:
  Binary kind_;
  int64_t n_;
  bool a_full_;
  bool b_full_;
  Broadcast forward_;
  Broadcast dy_with_b_;
  Broadcast dy_with_a_;
  SumToShape reduce_a_;
  SumToShape reduce_b_;
};

class PowKernel final : public Kernel<PowKernel> {
 public:
  PowKernel(double exponent, int64_t n) : p_(exponent), n_(n) {
    differentiable_ = 1;
    reads_inputs_ = 1;
    forward_flops_ = 10.0 * static_cast<double>(n);
    backward_flops_ = 12.0 * static_cast<double>(n);
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    const T* x = static_cast<const T*>(a.in[0]);
    T* y = static_cast<T*>(a.out[0]);
    const T p = static_cast<T>(p_);
    if (p_ == 2.0) {
      ForEachElement(n_, [=](int64_t j) { y[j] = x[j] * x[j]; });
    } else if (p_ == 1.0) {
      std::memcpy(y, x, sizeof(T) * n_);
    } else {
      ForEachElement(n_, [=](int64_t j) { y[j] = std::pow(x[j], p); });
    }
    return absl::OkStatus();
  }

  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {  // d(x^p)/dx = p x^(p-1).
    const T* x = static_cast<const T*>(a.in[0]);
    const T* dy = a.dout[0];
    T* dx = a.din[0];
    if (dx == nullptr) return;
    const T p = static_cast<T>(p_);
    if (p_ == 2.0) {
      ForEachElement(n_, [=](int64_t j) { dx[j] = dy[j] * (T(2) * x[j]); });
    } else if (p_ == 1.0) {
      std::memcpy(dx, dy, sizeof(T) * n_);
    } else {
      const T pm1 = static_cast<T>(p_ - 1.0);
      ForEachElement(n_, [=](int64_t j) { dx[j] = dy[j] * (p * std::pow(x[j], pm1)); });
    }
  }

 private:
  double p_;
  int64_t n_;
};

class WhereKernel final : public Kernel<WhereKernel> {
 public:
  WhereKernel(const Shape& c, const Shape& x, const Shape& y, const Shape& out)
      : n_(NumElements(out)), forward_(out, {&c, &x, &y}), reduce_x_(out, x), reduce_y_(out, y) {
    differentiable_ = 6;
    reads_inputs_ = 1;
    forward_flops_ = static_cast<double>(n_);
    backward_flops_ = 2.0 * static_cast<double>(n_);
    if (!reduce_x_.identity() || !reduce_y_.identity()) workspace_elements_ = n_;
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    const uint8_t* c = static_cast<const uint8_t*>(a.in[0]);
    const T* x = static_cast<const T*>(a.in[1]);
    const T* y = static_cast<const T*>(a.in[2]);
    T* out = static_cast<T*>(a.out[0]);
    Loop([&](int64_t o, int64_t oc, int64_t ox, int64_t oy) { out[o] = c[oc] ? x[ox] : y[oy]; });
    return absl::OkStatus();
  }

  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {
    const uint8_t* c = static_cast<const uint8_t*>(a.in[0]);
    const T* dy = a.dout[0];
    std::vector<T> scratch;
    for (int side = 0; side < 2; ++side) {
      T* din = a.din[1 + side];
      if (din == nullptr) continue;
      const SumToShape& reduce = side == 0 ? reduce_x_ : reduce_y_;
      T* term = din;
      if (!reduce.identity()) {
        scratch.resize(n_);
        term = scratch.data();
      }
      const bool take_true = side == 0;
      Loop([&](int64_t o, int64_t oc, int64_t, int64_t) {
        term[o] = (c[oc] != 0) == take_true ? dy[o] : T(0);
      });
      if (!reduce.identity()) reduce.Run(term, din, 1.0);
    }
  }

 private:
  // fn(output index, condition index, x index, y index) over the output, rows in parallel.
  template <typename Fn>
  void Loop(const Fn& fn) const {
    const int64_t inner = forward_.inner();
    const int64_t sc = forward_.inner_stride(0);
    const int64_t sx = forward_.inner_stride(1);
    const int64_t sy = forward_.inner_stride(2);
    ForEachIndex(forward_.rows(), n_ >= kParallelElements, [&](int64_t r) {
      const int64_t oc = forward_.Offset(r, 0);
      const int64_t ox = forward_.Offset(r, 1);
      const int64_t oy = forward_.Offset(r, 2);
      for (int64_t j = 0; j < inner; ++j) fn(r * inner + j, oc + j * sc, ox + j * sx, oy + j * sy);
    });
  }

  int64_t n_;
  Broadcast forward_;
  SumToShape reduce_x_;
  SumToShape reduce_y_;
};

// Note [Dropout masks]
// Element j of a Dropout node is kept iff u_j >= ratio, u_j uniform in [0, 1) from a hash of
// (the node's seed attribute, RunOptions' dropout seed, j): no random state, so the mask depends
// only on those three, whatever the thread count, and recomputing a segment (checkpointing)
// or the backward pass regenerates it instead of keeping it.
inline uint64_t SplitMix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

class DropoutKernel final : public Kernel<DropoutKernel> {
 public:
  DropoutKernel(double ratio, bool training, int64_t seed, int64_t n, bool has_mask)
      : ratio_(ratio), active_(training && ratio > 0), seed_(seed), n_(n), has_mask_(has_mask) {
    differentiable_ = 1;
    if (!active_) passthrough_ = 1;
    forward_flops_ = static_cast<double>(n);
    backward_flops_ = static_cast<double>(n);
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    const T* x = static_cast<const T*>(a.in[0]);
    T* y = static_cast<T*>(a.out[0]);
    uint8_t* mask = has_mask_ ? static_cast<uint8_t*>(a.out[1]) : nullptr;
    if (!active_) {
      std::memcpy(y, x, sizeof(T) * n_);
      if (mask != nullptr) std::memset(mask, 1, n_);
      return absl::OkStatus();
    }
    const T scale = static_cast<T>(1.0 / (1.0 - ratio_));
    const uint64_t base = Base(*a.call);
    ForEachIndex(n_, n_ >= kParallelElements / 4, [&](int64_t j) {
      const bool keep = Keep(base, j);
      y[j] = keep ? x[j] * scale : T(0);
      if (mask != nullptr) mask[j] = keep;
    });
    return absl::OkStatus();
  }

  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {
    const T* dy = a.dout[0];
    T* dx = a.din[0];
    if (dx == nullptr) return;
    if (!active_) {
      std::memcpy(dx, dy, sizeof(T) * n_);
      return;
    }
    const T scale = static_cast<T>(1.0 / (1.0 - ratio_));
    const uint64_t base = Base(*a.call);
    ForEachIndex(n_, n_ >= kParallelElements / 4,
                 [&](int64_t j) { dx[j] = Keep(base, j) ? dy[j] * scale : T(0); });
  }

 private:
  uint64_t Base(const CallContext& call) const {
    return SplitMix64(static_cast<uint64_t>(seed_) ^ SplitMix64(call.dropout_seed));
  }
  bool Keep(uint64_t base, int64_t j) const {
    const uint64_t h = SplitMix64(base + static_cast<uint64_t>(j) * 0xd1b54a32d192ed03ull);
    return static_cast<double>(h >> 11) * 0x1.0p-53 >= ratio_;
  }

  double ratio_;
  bool active_;
  int64_t seed_;
  int64_t n_;
  bool has_mask_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<OpKernel>> MakeUnary(OpContext& c, std::vector<ValueType>* out) {
  const std::string& op = c.node().op_type;
  if (op == "Identity") {
    if (c.input(0) == nullptr) return c.InputError(0, "required input is missing");
    RETURN_IF_ERROR(c.UnknownAttribute());
    out->push_back(*c.input(0));
    return std::make_unique<UnaryKernel>(Unary::kIdentity, 0, NumElements(c.input(0)->shape),
                                         DTypeSize(c.input(0)->dtype), IsFloat(c.input(0)->dtype));
  }
  RETURN_IF_ERROR(c.ExpectFloat(0));
  Unary kind = Unary::kNeg;
  double alpha = 0;
  if (op == "Neg") kind = Unary::kNeg;
  if (op == "Relu") kind = Unary::kRelu;
  if (op == "Sigmoid") kind = Unary::kSigmoid;
  if (op == "Tanh") kind = Unary::kTanh;
  if (op == "Erf") kind = Unary::kErf;
  if (op == "Sqrt") kind = Unary::kSqrt;
  if (op == "Exp") kind = Unary::kExp;
  if (op == "LeakyRelu") {
    kind = Unary::kLeakyRelu;
    ASSIGN_OR_RETURN(alpha, c.Float("alpha", 0.01));
    if (!std::isfinite(alpha)) return c.AttributeError("alpha", "must be finite");
  }
  if (op == "Gelu") {
    ASSIGN_OR_RETURN(const std::string approximate, c.String("approximate", "none"));
    if (approximate == "none") {
      kind = Unary::kGelu;
    } else if (approximate == "tanh") {
      kind = Unary::kGeluTanh;
    } else {
      return c.AttributeError(
          "approximate", absl::StrCat("expected \"none\" or \"tanh\", got \"", approximate, "\""));
    }
  }
  RETURN_IF_ERROR(c.UnknownAttribute());
  out->push_back(*c.input(0));
  return std::make_unique<UnaryKernel>(kind, alpha, NumElements(c.input(0)->shape),
                                       DTypeSize(c.input(0)->dtype), true);
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeBinary(OpContext& c, std::vector<ValueType>* out) {
  if (c.input(0) != nullptr && c.input(0)->dtype == DType::kInt64) {
    return MakeIntegerBinary(c, out);
  }
  RETURN_IF_ERROR(c.ExpectFloat(0));
  RETURN_IF_ERROR(c.ExpectFloat(1));
  RETURN_IF_ERROR(c.UnknownAttribute());
  const Shape& a = c.input(0)->shape;
  const Shape& b = c.input(1)->shape;
  ASSIGN_OR_RETURN(const Shape shape, c.BroadcastInputs());
  const std::string& op = c.node().op_type;
  const Binary kind = op == "Add"   ? Binary::kAdd
                      : op == "Sub" ? Binary::kSub
                      : op == "Mul" ? Binary::kMul
                                    : Binary::kDiv;
  out->push_back({c.input(0)->dtype, shape});
  return std::make_unique<BinaryKernel>(kind, a, b, shape);
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakePow(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(c.ExpectFloat(0));
  RETURN_IF_ERROR(c.UnknownAttribute());
  const ConstantValue* e = c.constant(1);
  if (e == nullptr || NumElements(e->shape) != 1) {
    return c.InputError(1, "the exponent must be a constant scalar (one element)");
  }
  const double p = IsFloat(e->dtype) ? e->floats[0] : static_cast<double>(e->ints[0]);
  if (!std::isfinite(p)) return c.InputError(1, "the exponent must be finite");
  out->push_back(*c.input(0));
  return std::make_unique<PowKernel>(p, NumElements(c.input(0)->shape));
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeWhere(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(c.ExpectDType(0, DType::kBool));
  RETURN_IF_ERROR(c.ExpectFloat(1));
  RETURN_IF_ERROR(c.ExpectFloat(2));
  RETURN_IF_ERROR(c.UnknownAttribute());
  Shape xy, shape;
  if (!BroadcastShapes(c.input(1)->shape, c.input(2)->shape, &xy)) {
    return c.InputError(
        2, absl::StrCat("shape ", ShapeString(c.input(2)->shape), " does not broadcast with ",
                        ShapeString(c.input(1)->shape), " (inputs[1])"));
  }
  if (!BroadcastShapes(c.input(0)->shape, xy, &shape)) {
    return c.InputError(0, absl::StrCat("shape ", ShapeString(c.input(0)->shape),
                                        " does not broadcast with ", ShapeString(xy)));
  }
  out->push_back({c.input(1)->dtype, shape});
  return std::make_unique<WhereKernel>(c.input(0)->shape, c.input(1)->shape, c.input(2)->shape,
                                       shape);
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeDropout(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(c.ExpectFloat(0));
  double ratio = 0.5;
  if (c.input(1) != nullptr) {
    const ConstantValue* r = c.constant(1);
    if (r == nullptr || !IsFloat(r->dtype) || NumElements(r->shape) != 1) {
      return c.InputError(1, "ratio must be a constant floating scalar");
    }
    ratio = r->floats[0];
  }
  if (!(ratio >= 0 && ratio < 1)) {
    return c.InputError(1, absl::StrCat("ratio must be in [0, 1), got ", ratio));
  }
  bool training = false;
  if (c.input(2) != nullptr) {
    const ConstantValue* t = c.constant(2);
    if (t == nullptr || t->dtype != DType::kBool || NumElements(t->shape) != 1) {
      return c.InputError(2, "training_mode must be a constant bool scalar");
    }
    training = t->ints[0] != 0;
  }
  bool has_seed = false;
  int64_t seed = 0;
  for (const AttributeSpec& a : c.node().attributes) has_seed |= a.name == "seed";
  ASSIGN_OR_RETURN(seed, c.Int("seed", 0));
  if (training && ratio > 0 && !has_seed) {
    return c.AttributeError("seed",
                            "required when training_mode is true (masks are deterministic)");
  }
  RETURN_IF_ERROR(c.UnknownAttribute());
  out->push_back(*c.input(0));
  if (c.num_outputs() > 1) out->push_back({DType::kBool, c.input(0)->shape});
  return std::make_unique<DropoutKernel>(ratio, training, seed, NumElements(c.input(0)->shape),
                                         c.num_outputs() > 1);
}

}  // namespace gradserve::engine::graph
