// Gemm and MatMul: every product goes through the engine's Gemm (gemm.h), so a graph's Linear
// layer (Gemm, transB = 1) rounds exactly as the chain's.
#include <omp.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "server/engine/gemm.h"
#include "server/engine/graph/kernels.h"

namespace gradserve::engine::graph {
namespace {

Op OpOf(bool transposed) { return transposed ? Op::kTransposed : Op::kPlain; }

// Y [M, N] = alpha op(A) op(B) + beta C, C broadcast to [M, N].
class GemmKernel final : public Kernel<GemmKernel> {
 public:
  GemmKernel(int64_t m, int64_t n, int64_t k, bool trans_a, bool trans_b, double alpha, double beta,
             const Shape* c_shape)
      : m_(m),
        n_(n),
        k_(k),
        ta_(trans_a),
        tb_(trans_b),
        alpha_(alpha),
        beta_(beta),
        has_c_(c_shape != nullptr) {
    differentiable_ = 7;
    reads_inputs_ = 3;  // A for dB, B for dA.
    const Shape out = {m, n};
    if (has_c_) {
      c_shape_ = *c_shape;
      c_to_out_ = Broadcast(out, {&out, c_shape});
      reduce_c_ = SumToShape(out, *c_shape);
    }
    forward_flops_ = 2.0 * m * n * k;
    backward_flops_ = 4.0 * m * n * k;
    if (alpha != 1.0) workspace_elements_ = m * n;
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& args) const {
    const T* a = static_cast<const T*>(args.in[0]);
    const T* b = static_cast<const T*>(args.in[1]);
    const T* c = has_c_ ? static_cast<const T*>(args.in[2]) : nullptr;
    T* y = static_cast<T*>(args.out[0]);
    if (c != nullptr && alpha_ == 1.0) {
      // As the chain's Linear: C written into Y first, the product accumulated onto it.
      FillC(c, y);
      Gemm<T>(OpOf(ta_), OpOf(tb_), m_, n_, k_, a, b, y, Into::kAccumulate);
      return absl::OkStatus();
    }
    Gemm<T>(OpOf(ta_), OpOf(tb_), m_, n_, k_, a, b, y, Into::kOverwrite);
    if (alpha_ != 1.0) {
      const T alpha = static_cast<T>(alpha_);
      ForEachElement(m_ * n_, [=](int64_t j) { y[j] = y[j] * alpha; });
    }
    if (c != nullptr) {
      const T beta = static_cast<T>(beta_);
      BinaryLoop(c_to_out_, y, c, y, [=](T p, T v) { return p + beta * v; });
    }
    return absl::OkStatus();
  }

  template <typename T>
  void Bwd(const BackwardArgs<T>& args) const {
    const T* a = static_cast<const T*>(args.in[0]);
    const T* b = static_cast<const T*>(args.in[1]);
    const T* dy = args.dout[0];
    std::vector<T> scaled;
    const T* g = dy;  // alpha dY
    if (alpha_ != 1.0 && (args.din[0] != nullptr || args.din[1] != nullptr)) {
      scaled.resize(m_ * n_);
      const T alpha = static_cast<T>(alpha_);
      T* s = scaled.data();
      ForEachElement(m_ * n_, [=](int64_t j) { s[j] = dy[j] * alpha; });
      g = s;
    }
    if (T* da = args.din[0]) {
      if (!ta_) {  // dA [M, K] = G op(B)^T
        Gemm<T>(Op::kPlain, tb_ ? Op::kPlain : Op::kTransposed, m_, k_, n_, g, b, da);
      } else {  // A is [K, M]: dA = op(B) G^T
        Gemm<T>(tb_ ? Op::kTransposed : Op::kPlain, Op::kTransposed, k_, m_, n_, b, g, da);
      }
    }
    if (T* db = args.din[1]) {
      if (!tb_) {  // dB [K, N] = op(A)^T G
        Gemm<T>(ta_ ? Op::kPlain : Op::kTransposed, Op::kPlain, k_, n_, m_, a, g, db);
      } else {  // B is [N, K]: dB = G^T op(A) (the chain's dW = delta^T x)
        Gemm<T>(Op::kTransposed, ta_ ? Op::kTransposed : Op::kPlain, n_, k_, m_, g, a, db);
      }
    }
    if (T* dc = has_c_ ? args.din[2] : nullptr) reduce_c_.Run(dy, dc, beta_);
  }

 private:
  template <typename T>
  void FillC(const T* c, T* y) const {
    if (beta_ == 1.0 && NumElements(c_shape_) == n_ && n_ > 1) {  // A bias row, as the chain.
      const int64_t width = n_;
      ForEachIndex(m_, m_ * n_ >= kParallelElements,
                   [=](int64_t r) { std::memcpy(y + r * width, c, sizeof(T) * width); });
      return;
    }
    const T beta = static_cast<T>(beta_);
    BinaryLoop(c_to_out_, y, c, y, [=](T, T v) { return beta * v; });
  }

  int64_t m_, n_, k_;
  bool ta_, tb_;
  double alpha_, beta_;
  bool has_c_;
  Shape c_shape_;
  Broadcast c_to_out_;
  SumToShape reduce_c_;
};

// numpy matmul: [..., M, K] x [..., K, N] -> [..., M, N], batch axes broadcast; a 1-D A is a
// row [1, K] and a 1-D B a column [K, 1], their unit axis dropped from the output.
// Planner fusions (Note [Fusions] in graph.cc) add: A or B stored transposed in its last two
// axes (ta, tb: a Transpose feeding the MatMul, read in place by the Gemm), and a bias [N]
// (an Add after it) written into Y before the product is accumulated onto it, as the chain's
// Linear layer does.
class MatMulKernel final : public Kernel<MatMulKernel> {
 public:
  MatMulKernel(int64_t m, int64_t n, int64_t k, const Shape& batch_a, const Shape& batch_b,
               const Shape& batch_out, bool ta = false, bool tb = false, bool bias = false)
      : m_(m), n_(n), k_(k), ta_(ta), tb_(tb), bias_(bias) {
    differentiable_ = bias ? 7 : 3;
    reads_inputs_ = 3;
    batches_ = NumElements(batch_out);
    a_batches_ = NumElements(batch_a);
    b_batches_ = NumElements(batch_b);
    // Each output batch's A and B batch index, computed per batch from the batch axes (broadcast
    // axes have stride 0): nothing sized by the batch count is held by the plan.
    const int rank = static_cast<int>(batch_out.size());
    int64_t sa = 1, sb = 1;
    batch_dims_.resize(rank);
    a_strides_.assign(rank, 0);
    b_strides_.assign(rank, 0);
    for (int d = rank - 1; d >= 0; --d) {
      batch_dims_[d] = batch_out[d];
      const int da = d - (rank - static_cast<int>(batch_a.size()));
      const int db = d - (rank - static_cast<int>(batch_b.size()));
      if (da >= 0) {
        if (batch_a[da] != 1) a_strides_[d] = sa;
        sa *= batch_a[da];
      }
      if (db >= 0) {
        if (batch_b[db] != 1) b_strides_[d] = sb;
        sb *= batch_b[db];
      }
    }
    // x [..., M, K] W [K, N] (W shared by every batch, A not transposed): one product over all
    // batches' rows.
    one_product_ = b_batches_ == 1 && a_batches_ == batches_ && !ta_;
    if (bias) bias_reduce_ = SumToShape({batches_ * m, n}, {n});
    forward_flops_ = 2.0 * batches_ * m * n * k;
    backward_flops_ = 2.0 * forward_flops_;
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& args) const {
    const T* a = static_cast<const T*>(args.in[0]);
    const T* b = static_cast<const T*>(args.in[1]);
    T* y = static_cast<T*>(args.out[0]);
    Into into = Into::kOverwrite;
    if (bias_) {
      const T* bias = static_cast<const T*>(args.in[2]);
      const int64_t n = n_;
      ForEachIndex(batches_ * m_, batches_ * m_ * n_ >= kParallelElements,
                   [=](int64_t r) { std::memcpy(y + r * n, bias, sizeof(T) * n); });
      into = Into::kAccumulate;
    }
    const Op op_a = OpOf(ta_), op_b = OpOf(tb_);
    if (one_product_) {
      Gemm<T>(op_a, op_b, batches_ * m_, n_, k_, a, b, y, into);
      return absl::OkStatus();
    }
    ForBatches(/*writes_private_slices=*/true, [&](int64_t i) {
      Gemm<T>(op_a, op_b, m_, n_, k_, a + AIndex(i) * m_ * k_, b + BIndex(i) * k_ * n_,
              y + i * m_ * n_, into);
    });
    return absl::OkStatus();
  }

  template <typename T>
  void Bwd(const BackwardArgs<T>& args) const {
    const T* a = static_cast<const T*>(args.in[0]);
    const T* b = static_cast<const T*>(args.in[1]);
    const T* dy = args.dout[0];
    const int64_t m = m_, n = n_, k = k_;
    // dA_i = dY_i op(B_i)^T (stored [M, K], or [K, M] when A is transposed: op(B_i) dY_i^T),
    // summed over the batches A was broadcast to.
    auto da_product = [&](int64_t rows, const T* g, const T* bi, T* dai, Into into) {
      if (!ta_) {
        Gemm<T>(Op::kPlain, tb_ ? Op::kPlain : Op::kTransposed, rows, k, n, g, bi, dai, into);
      } else {
        Gemm<T>(tb_ ? Op::kTransposed : Op::kPlain, Op::kTransposed, k, rows, n, bi, g, dai, into);
      }
    };
    // dB_i = op(A_i)^T dY_i (stored [K, N], or [N, K] when B is transposed: dY_i^T op(A_i)).
    auto db_product = [&](int64_t rows, const T* ai, const T* g, T* dbi, Into into) {
      if (!tb_) {
        Gemm<T>(ta_ ? Op::kPlain : Op::kTransposed, Op::kPlain, k, n, rows, ai, g, dbi, into);
      } else {
        Gemm<T>(Op::kTransposed, ta_ ? Op::kTransposed : Op::kPlain, n, k, rows, g, ai, dbi, into);
      }
    };
    if (T* da = args.din[0]) {
      if (one_product_) {
        da_product(batches_ * m, dy, b, da, Into::kOverwrite);
      } else {
        Accumulate(/*a_side=*/true, a_batches_ == batches_, [&](int64_t i, Into into) {
          da_product(m, dy + i * m * n, b + BIndex(i) * k * n, da + AIndex(i) * m * k, into);
        });
      }
    }
    if (T* db = args.din[1]) {
      if (one_product_) {  // One product over all rows.
        db_product(batches_ * m, a, dy, db, Into::kOverwrite);
      } else {
        Accumulate(/*a_side=*/false, b_batches_ == batches_, [&](int64_t i, Into into) {
          db_product(m, a + AIndex(i) * m * k, dy + i * m * n, db + BIndex(i) * k * n, into);
        });
      }
    }
    if (T* dbias = bias_ ? args.din[2] : nullptr) bias_reduce_.Run(dy, dbias, 1.0);
  }

 private:
  // Small products run one per thread, batches split across the team (each product then runs
  // on one thread: Gemm inside a parallel region does not nest); large ones one after another,
  // each on the whole team. Either way the split is fixed by the shapes and the thread count.
  template <typename Fn>
  void ForBatches(bool writes_private_slices, const Fn& fn) const {
    const bool per_thread = writes_private_slices && batches_ > 1 &&
                            m_ * n_ * k_ < (int64_t{1} << 22) && omp_get_max_threads() > 1;
    if (per_thread) {
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < batches_; ++i) fn(i);
    } else {
      for (int64_t i = 0; i < batches_; ++i) fn(i);
    }
  }

  // fn(i, into) for each output batch i: the operand's slice index[i] is overwritten by its
  // first contribution and accumulated onto by later ones, in ascending i (a fixed order).
  template <typename Fn>
  void Accumulate(bool a_side, bool one_to_one, const Fn& fn) const {
    if (one_to_one) {
      ForBatches(true, [&](int64_t i) { fn(i, Into::kOverwrite); });
      return;
    }
    std::vector<bool> written(a_side ? a_batches_ : b_batches_, false);
    for (int64_t i = 0; i < batches_; ++i) {
      const int64_t slice = a_side ? AIndex(i) : BIndex(i);
      fn(i, written[slice] ? Into::kAccumulate : Into::kOverwrite);
      written[slice] = true;
    }
  }

  int64_t Index(int64_t i, const std::vector<int64_t>& strides) const {
    int64_t index = 0;
    for (int d = static_cast<int>(batch_dims_.size()) - 1; d >= 0; --d) {
      index += (i % batch_dims_[d]) * strides[d];
      i /= batch_dims_[d];
    }
    return index;
  }
  int64_t AIndex(int64_t i) const { return Index(i, a_strides_); }
  int64_t BIndex(int64_t i) const { return Index(i, b_strides_); }

  int64_t m_, n_, k_;
  bool ta_, tb_, bias_;
  bool one_product_ = false;
  int64_t batches_ = 1, a_batches_ = 1, b_batches_ = 1;
  std::vector<int64_t> batch_dims_, a_strides_, b_strides_;
  SumToShape bias_reduce_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<OpKernel>> MakeGemm(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(c.ExpectFloat(0));
  RETURN_IF_ERROR(c.ExpectFloat(1));
  ASSIGN_OR_RETURN(const double alpha, c.Float("alpha", 1.0));
  ASSIGN_OR_RETURN(const double beta, c.Float("beta", 1.0));
  ASSIGN_OR_RETURN(const int64_t trans_a, c.Int("transA", 0));
  ASSIGN_OR_RETURN(const int64_t trans_b, c.Int("transB", 0));
  RETURN_IF_ERROR(c.UnknownAttribute());
  if (!std::isfinite(alpha)) return c.AttributeError("alpha", "must be finite");
  if (!std::isfinite(beta)) return c.AttributeError("beta", "must be finite");
  if (trans_a != 0 && trans_a != 1) return c.AttributeError("transA", "must be 0 or 1");
  if (trans_b != 0 && trans_b != 1) return c.AttributeError("transB", "must be 0 or 1");
  const Shape& a = c.input(0)->shape;
  const Shape& b = c.input(1)->shape;
  if (a.size() != 2)
    return c.InputError(0, absl::StrCat("expected rank 2, got shape ", ShapeString(a)));
  if (b.size() != 2)
    return c.InputError(1, absl::StrCat("expected rank 2, got shape ", ShapeString(b)));
  const int64_t m = trans_a ? a[1] : a[0];
  const int64_t k = trans_a ? a[0] : a[1];
  const int64_t kb = trans_b ? b[1] : b[0];
  const int64_t n = trans_b ? b[0] : b[1];
  if (k != kb) {
    return c.InputError(1, absl::StrCat("shape ", ShapeString(b), " does not match inputs[0] ",
                                        ShapeString(a), " (transA=", trans_a, ", transB=", trans_b,
                                        "): inner dimensions ", k, " and ", kb));
  }
  const Shape y = {m, n};
  const Shape* c_shape = nullptr;
  if (c.input(2) != nullptr) {
    RETURN_IF_ERROR(c.ExpectFloat(2));
    c_shape = &c.input(2)->shape;
    Shape broadcast;
    if (c_shape->size() > 2 || !BroadcastShapes(*c_shape, y, &broadcast) || broadcast != y) {
      return c.InputError(2, absl::StrCat("shape ", ShapeString(*c_shape),
                                          " does not broadcast to the output ", ShapeString(y)));
    }
  }
  out->push_back({c.input(0)->dtype, y});
  return std::make_unique<GemmKernel>(m, n, k, trans_a, trans_b, alpha, beta, c_shape);
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeMatMul(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(c.ExpectFloat(0));
  RETURN_IF_ERROR(c.ExpectFloat(1));
  RETURN_IF_ERROR(c.UnknownAttribute());
  const Shape& a = c.input(0)->shape;
  const Shape& b = c.input(1)->shape;
  if (a.empty()) return c.InputError(0, "MatMul needs rank >= 1, got a scalar");
  if (b.empty()) return c.InputError(1, "MatMul needs rank >= 1, got a scalar");
  const bool a_vector = a.size() == 1;
  const bool b_vector = b.size() == 1;
  const int64_t m = a_vector ? 1 : a[a.size() - 2];
  const int64_t k = a.back();
  const int64_t kb = b_vector ? b[0] : b[b.size() - 2];
  const int64_t n = b_vector ? 1 : b.back();
  if (k != kb) {
    return c.InputError(1, absl::StrCat("shape ", ShapeString(b), " does not match inputs[0] ",
                                        ShapeString(a), ": inner dimensions ", k, " and ", kb));
  }
  const Shape batch_a(a.begin(), a.end() - (a_vector ? 1 : 2));
  const Shape batch_b(b.begin(), b.end() - (b_vector ? 1 : 2));
  Shape batch;
  if (!BroadcastShapes(batch_a, batch_b, &batch)) {
    return c.InputError(1,
                        absl::StrCat("batch axes of ", ShapeString(b),
                                     " do not broadcast with those of inputs[0] ", ShapeString(a)));
  }
  Shape y = batch;
  if (!a_vector) y.push_back(m);
  if (!b_vector) y.push_back(n);
  out->push_back({c.input(0)->dtype, y});
  return std::make_unique<MatMulKernel>(m, n, k, batch_a, batch_b, batch);
}

std::unique_ptr<OpKernel> MakeFusedMatMul(const Shape& a, bool ta, const Shape& b, bool tb,
                                          bool bias) {
  const int64_t m = ta ? a.back() : a[a.size() - 2];
  const int64_t k = ta ? a[a.size() - 2] : a.back();
  const int64_t n = tb ? b[b.size() - 2] : b.back();
  const Shape batch_a(a.begin(), a.end() - 2);
  const Shape batch_b(b.begin(), b.end() - 2);
  Shape batch;
  BroadcastShapes(batch_a, batch_b, &batch);
  return std::make_unique<MatMulKernel>(m, n, k, batch_a, batch_b, batch, ta, tb, bias);
}

}  // namespace gradserve::engine::graph
