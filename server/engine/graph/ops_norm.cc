// Row-wise operators: LayerNormalization, RMSNormalization, Softmax, ReduceMean and ReduceSum.
//
// LayerNorm and RMSNorm keep per-row statistics (mean and 1/std, llm.c's cache) instead of the
// normalised input; their backward is one pass per row for dX and one pass per column block for
// dScale/dB (each column summed down the rows in order, so no atomics and no thread-count
// dependence). Row sums use eight fixed lanes (element j in lane j % 8, added up in lane order):
// vectorisable, and the same bits wherever a row sits in memory.
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "server/engine/elementwise_math.h"
#include "server/engine/graph/kernels.h"

namespace gradserve::engine::graph {
namespace {

// sum over j of f(j), in double, eight fixed lanes.
template <typename F>
double LaneSum(int64_t n, const F& f) {
  double lanes[8] = {};
  const int64_t full = n - n % 8;
  for (int64_t j = 0; j < full; j += 8) {
#pragma omp simd
    for (int l = 0; l < 8; ++l) lanes[l] += f(j + l);
  }
  for (int64_t j = full; j < n; ++j) lanes[j - full] += f(j);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// LaneSum over j in [lo, hi) only, each j still in lane j % 8: the same bits as LaneSum(hi, f)
// when f(j) is +0 for j < lo.
template <typename F>
double LaneSumRange(int64_t lo, int64_t hi, const F& f) {
  double lanes[8] = {};
  int64_t j = lo;
  for (; j < hi && j % 8 != 0; ++j) lanes[j % 8] += f(j);
  for (; j + 8 <= hi; j += 8) {
#pragma omp simd
    for (int l = 0; l < 8; ++l) lanes[l] += f(j + l);
  }
  for (; j < hi; ++j) lanes[j % 8] += f(j);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

template <typename T>
T ExpOf(T x) {
  if constexpr (sizeof(T) == 4) {
    return ExpFloat(x);
  } else {
    return std::exp(x);
  }
}

// Splits [rows, d] into rows in parallel when there is enough work.
template <typename Fn>
void ForRows(int64_t rows, int64_t d, const Fn& fn) {
  ForEachIndex(rows, rows * d >= kParallelElements, fn);
}

// dScale[c] = sum over rows of dy * xhat, dB[c] = sum over rows of dy: column blocks in
// parallel, each column summed down the rows in order, in double.
template <typename T, typename XHat>
void ColumnSums(int64_t rows, int64_t d, const T* dy, const XHat& xhat, T* dscale, T* dbias) {
  constexpr int64_t kColumns = 64;
  const int64_t blocks = (d + kColumns - 1) / kColumns;
  ForEachIndex(blocks, rows * d >= kParallelElements, [&](int64_t block) {
    const int64_t c0 = block * kColumns;
    const int64_t width = std::min(kColumns, d - c0);
    double s[kColumns] = {};
    double b[kColumns] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const T* g = dy + r * d + c0;
      for (int64_t c = 0; c < width; ++c) {
        s[c] += static_cast<double>(g[c]) * static_cast<double>(xhat(r, c0 + c));
        b[c] += static_cast<double>(g[c]);
      }
    }
    for (int64_t c = 0; c < width; ++c) {
      if (dscale != nullptr) dscale[c0 + c] = static_cast<T>(s[c]);
      if (dbias != nullptr) dbias[c0 + c] = static_cast<T>(b[c]);
    }
  });
}

// LayerNormalization (rms = false) and RMSNormalization (rms = true) over the trailing axes
// from `axis`: x is [rows, d], scale and bias [d]. saved: mean [rows] then rstd [rows].
class NormKernel final : public Kernel<NormKernel> {
 public:
  NormKernel(bool rms, int64_t rows, int64_t d, double epsilon, bool has_bias)
      : rms_(rms), rows_(rows), d_(d), epsilon_(epsilon), has_bias_(has_bias) {
    differentiable_ = has_bias ? 7 : 3;
    reads_inputs_ = 3;  // x and scale (the bias's gradient needs neither)
    saved_elements_ = 2 * rows;
    forward_flops_ = 8.0 * rows * d;
    backward_flops_ = 14.0 * rows * d;
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    const T* x = static_cast<const T*>(a.in[0]);
    const T* scale = static_cast<const T*>(a.in[1]);
    const T* bias = has_bias_ ? static_cast<const T*>(a.in[2]) : nullptr;
    T* y = static_cast<T*>(a.out[0]);
    T* mean_out = a.saved;
    T* rstd_out = a.saved + rows_;
    const int64_t d = d_;
    ForRows(rows_, d, [&](int64_t r) {
      const T* xr = x + r * d;
      T* yr = y + r * d;
      double mean = 0;
      if (!rms_) mean = LaneSum(d, [&](int64_t j) { return static_cast<double>(xr[j]); }) / d;
      const double var = LaneSum(d,
                                 [&](int64_t j) {
                                   const double v = static_cast<double>(xr[j]) - mean;
                                   return v * v;
                                 }) /
                         d;
      const T m = static_cast<T>(mean);
      const T rstd = static_cast<T>(1.0 / std::sqrt(var + epsilon_));
      mean_out[r] = m;
      rstd_out[r] = rstd;
      if (bias != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) yr[j] = (xr[j] - m) * rstd * scale[j] + bias[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) yr[j] = (xr[j] - m) * rstd * scale[j];
      }
    });
    return absl::OkStatus();
  }

  // xhat = (x - mean) rstd, g = dy scale:
  // dx = rstd (g - mean(g) - xhat mean(g xhat)) (LayerNorm; RMSNorm drops the mean(g) term).
  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {
    const T* x = static_cast<const T*>(a.in[0]);
    const T* scale = static_cast<const T*>(a.in[1]);
    const T* dy = a.dout[0];
    const T* mean = a.saved;
    const T* rstd = a.saved + rows_;
    const int64_t d = d_;
    if (T* dx = a.din[0]) {
      ForRows(rows_, d, [&](int64_t r) {
        const T* xr = x + r * d;
        const T* gr = dy + r * d;
        T* dxr = dx + r * d;
        const T m = mean[r];
        const T s = rstd[r];
        const double sum_g =
            rms_ ? 0.0
                 : LaneSum(d, [&](int64_t j) { return static_cast<double>(gr[j] * scale[j]); });
        const double sum_gx = LaneSum(d, [&](int64_t j) {
          return static_cast<double>(gr[j] * scale[j]) * static_cast<double>((xr[j] - m) * s);
        });
        const T mean_g = static_cast<T>(sum_g / d);
        const T mean_gx = static_cast<T>(sum_gx / d);
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          const T xhat = (xr[j] - m) * s;
          dxr[j] = s * ((gr[j] * scale[j] - mean_g) - xhat * mean_gx);
        }
      });
    }
    T* dscale = a.din[1];
    T* dbias = has_bias_ ? a.din[2] : nullptr;
    if (dscale != nullptr || dbias != nullptr) {
      ColumnSums(
          rows_, d, dy, [&](int64_t r, int64_t c) { return (x[r * d + c] - mean[r]) * rstd[r]; },
          dscale, dbias);
    }
  }

 private:
  bool rms_;
  int64_t rows_, d_;
  double epsilon_;
  bool has_bias_;
};

// Softmax along one axis: x viewed as [outer, length, inner].
class SoftmaxKernel final : public Kernel<SoftmaxKernel> {
 public:
  SoftmaxKernel(int64_t outer, int64_t length, int64_t inner)
      : outer_(outer), length_(length), inner_(inner) {
    differentiable_ = 1;
    reads_outputs_ = 1;  // dx = y (dy - sum(dy y))
    forward_flops_ = 12.0 * outer * length * inner;
    backward_flops_ = 4.0 * outer * length * inner;
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    const T* x = static_cast<const T*>(a.in[0]);
    T* y = static_cast<T*>(a.out[0]);
    const int64_t n = length_;
    const int64_t inner = inner_;
    if (inner == 1) {  // The last axis: one fused pass per row.
      ForRows(outer_, n, [&](int64_t r) {
        const T* xr = x + r * n;
        T* yr = y + r * n;
        T max = xr[0];
        for (int64_t j = 1; j < n; ++j) max = xr[j] > max ? xr[j] : max;
        if (max == -std::numeric_limits<T>::infinity()) max = T(0);  // An all -inf row: NaN.
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) yr[j] = ExpOf<T>(xr[j] - max);
        const T inv = static_cast<T>(1.0 / LaneSum(n, [&](int64_t j) { return double(yr[j]); }));
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) yr[j] = yr[j] * inv;
      });
      return absl::OkStatus();
    }
    ForRows(outer_ * inner, n, [&](int64_t t) {
      const int64_t o = t / inner;
      const int64_t i = t % inner;
      const T* xr = x + o * n * inner + i;
      T* yr = y + o * n * inner + i;
      T max = xr[0];
      for (int64_t j = 1; j < n; ++j) max = xr[j * inner] > max ? xr[j * inner] : max;
      if (max == -std::numeric_limits<T>::infinity()) max = T(0);
      double sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        yr[j * inner] = ExpOf<T>(xr[j * inner] - max);
        sum += yr[j * inner];
      }
      const T inv = static_cast<T>(1.0 / sum);
      for (int64_t j = 0; j < n; ++j) yr[j * inner] = yr[j * inner] * inv;
    });
    return absl::OkStatus();
  }

  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {
    const T* y = static_cast<const T*>(a.out[0]);
    const T* dy = a.dout[0];
    T* dx = a.din[0];
    if (dx == nullptr) return;
    const int64_t n = length_;
    const int64_t inner = inner_;
    if (inner == 1) {
      ForRows(outer_, n, [&](int64_t r) {
        const T* yr = y + r * n;
        const T* gr = dy + r * n;
        T* dxr = dx + r * n;
        const T dot = static_cast<T>(
            LaneSum(n, [&](int64_t j) { return static_cast<double>(gr[j] * yr[j]); }));
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) dxr[j] = yr[j] * (gr[j] - dot);
      });
      return;
    }
    ForRows(outer_ * inner, n, [&](int64_t t) {
      const int64_t base = (t / inner) * n * inner + t % inner;
      double sum = 0;
      for (int64_t j = 0; j < n; ++j)
        sum += static_cast<double>(dy[base + j * inner] * y[base + j * inner]);
      const T dot = static_cast<T>(sum);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t p = base + j * inner;
        dx[p] = y[p] * (dy[p] - dot);
      }
    });
  }

 private:
  int64_t outer_, length_, inner_;
};

// Planner fusion (Note [Fusions] in graph.cc): y = Softmax(Where(mask, x * scale, fill)) over
// the last axis, the masked, scaled attention scores of a transformer, in one pass per row.
// Inputs: x, scale (a constant scalar, or absent), mask (a constant bool broadcast to x, its
// last axis x's or 1), fill (a constant scalar). Every element gets the operations the three
// unfused nodes would give it, in the same order, so the results are the same bits; the scores
// x and the masked, scaled ones are never stored, and nothing but y is kept for backward.
class MaskedSoftmaxKernel final : public Kernel<MaskedSoftmaxKernel> {
 public:
  MaskedSoftmaxKernel(const Shape& x, const Shape& mask, bool has_scale)
      : n_(x.back()),
        rows_(NumElements(x) / std::max<int64_t>(1, x.back())),
        has_scale_(has_scale) {
    differentiable_ = 1;
    reads_inputs_ = 4 | (has_scale ? 2 : 0);  // The mask, the scale.
    reads_outputs_ = 1;
    forward_flops_ = 14.0 * rows_ * n_;
    backward_flops_ = 6.0 * rows_ * n_;
    // Each row's mask row: x's leading axes mapped onto the mask's (right-aligned, size-1 axes
    // broadcast).
    const int rank = static_cast<int>(x.size());
    const int mrank = static_cast<int>(mask.size());
    lead_.assign(x.begin(), x.end() - 1);
    mask_strides_.assign(rank - 1, 0);
    int64_t stride = mrank > 0 ? mask.back() : 1;
    for (int d = rank - 2; d >= 0; --d) {
      const int md = d - (rank - mrank);
      if (md < 0) break;
      if (mask[md] != 1) mask_strides_[d] = stride;
      stride *= mask[md];
    }
    mask_inner_ = mrank > 0 && mask.back() == n_ ? 1 : 0;
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    const T* x = static_cast<const T*>(a.in[0]);
    const T scale = has_scale_ ? *static_cast<const T*>(a.in[1]) : T(1);
    const uint8_t* mask = static_cast<const uint8_t*>(a.in[2]);
    const T fill = *static_cast<const T*>(a.in[3]);
    T* y = static_cast<T*>(a.out[0]);
    const int64_t n = n_;
    const bool fill_is_minus_inf = fill == -std::numeric_limits<T>::infinity();
    // Where(mask, x * scale, fill), then the Softmax kernel's last-axis pass on it, in place.
    const auto general = [&](int64_t r) {
      const T* xr = x + r * n;
      const uint8_t* mr = mask + MaskRow(r);
      T* yr = y + r * n;
      if (has_scale_) {
        for (int64_t j = 0; j < n; ++j) yr[j] = mr[j * mask_inner_] ? xr[j] * scale : fill;
      } else {
        for (int64_t j = 0; j < n; ++j) yr[j] = mr[j * mask_inner_] ? xr[j] : fill;
      }
      T max = yr[0];
      for (int64_t j = 1; j < n; ++j) max = yr[j] > max ? yr[j] : max;
      if (max == -std::numeric_limits<T>::infinity()) max = T(0);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) yr[j] = ExpOf<T>(yr[j] - max);
      const T inv = static_cast<T>(1.0 / LaneSum(n, [&](int64_t j) { return double(yr[j]); }));
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) yr[j] = yr[j] * inv;
    };
    ForEachIndex(rows_, rows_ * n >= kParallelElements, [&](int64_t r) {
      const T* xr = x + r * n;
      const uint8_t* mr = mask + MaskRow(r);
      T* yr = y + r * n;
      if (fill_is_minus_inf && mask_inner_ == 1) {
        // Masked with -inf: outside the mask row's first and last kept entries every element
        // comes out exactly 0 (e^-inf), adds +0 to its lane's sum and changes no maximum, so
        // only [lo, hi) is computed (half of a causal mask's row on average); same bits.
        int64_t lo = 0, hi = n;
        while (lo < n && !mr[lo]) ++lo;
        while (hi > lo && !mr[hi - 1]) --hi;
        if (lo < hi) {
          for (int64_t j = 0; j < lo; ++j) yr[j] = T(0);
          for (int64_t j = hi; j < n; ++j) yr[j] = T(0);
          for (int64_t j = lo; j < hi; ++j) yr[j] = mr[j] ? xr[j] * scale : fill;
          T max = yr[lo];
          for (int64_t j = lo + 1; j < hi; ++j) max = yr[j] > max ? yr[j] : max;
          // An all -inf row (NaN out, below) and a NaN first entry (which the full row's scan
          // would have skipped) take the general path.
          if (max == -std::numeric_limits<T>::infinity() || max != max) return general(r);
#pragma omp simd
          for (int64_t j = lo; j < hi; ++j) yr[j] = ExpOf<T>(yr[j] - max);
          const T inv =
              static_cast<T>(1.0 / LaneSumRange(lo, hi, [&](int64_t j) { return double(yr[j]); }));
          if (inv != inv) return general(r);  // A NaN in the row: NaN everywhere, as there.
#pragma omp simd
          for (int64_t j = lo; j < hi; ++j) yr[j] = yr[j] * inv;
          return;
        }
      }
      general(r);
    });
    return absl::OkStatus();
  }

  // Softmax's backward, then Where's (zero where masked), then Mul's (times the scale).
  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {
    T* dx = a.din[0];
    if (dx == nullptr) return;
    const T scale = has_scale_ ? *static_cast<const T*>(a.in[1]) : T(1);
    const uint8_t* mask = static_cast<const uint8_t*>(a.in[2]);
    const T* y = static_cast<const T*>(a.out[0]);
    const T* dy = a.dout[0];
    const int64_t n = n_;
    ForEachIndex(rows_, rows_ * n >= kParallelElements, [&](int64_t r) {
      const T* yr = y + r * n;
      const T* gr = dy + r * n;
      const uint8_t* mr = mask + MaskRow(r);
      T* dxr = dx + r * n;
      const T dot =
          static_cast<T>(LaneSum(n, [&](int64_t j) { return static_cast<double>(gr[j] * yr[j]); }));
      if (has_scale_) {
        for (int64_t j = 0; j < n; ++j) {
          dxr[j] = (mr[j * mask_inner_] ? yr[j] * (gr[j] - dot) : T(0)) * scale;
        }
      } else {
        for (int64_t j = 0; j < n; ++j) dxr[j] = mr[j * mask_inner_] ? yr[j] * (gr[j] - dot) : T(0);
      }
    });
  }

 private:
  int64_t MaskRow(int64_t r) const {
    int64_t offset = 0;
    for (int d = static_cast<int>(lead_.size()) - 1; d >= 0; --d) {
      offset += (r % lead_[d]) * mask_strides_[d];
      r /= lead_[d];
    }
    return offset;
  }

  int64_t n_, rows_;
  bool has_scale_;
  Shape lead_;
  std::vector<int64_t> mask_strides_;
  int64_t mask_inner_ = 1;
};

// ReduceSum / ReduceMean: out = scale * sum over the reduced axes (kept as 1s in `kept`).
class ReduceKernel final : public Kernel<ReduceKernel> {
 public:
  ReduceKernel(const Shape& in, const Shape& kept, double scale)
      : n_(NumElements(in)), scale_(scale), reduce_(in, kept), expand_(in, {&kept, &kept}) {
    differentiable_ = 1;
    forward_flops_ = static_cast<double>(n_);
    backward_flops_ = static_cast<double>(n_);
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    reduce_.Run(static_cast<const T*>(a.in[0]), static_cast<T*>(a.out[0]), scale_);
    return absl::OkStatus();
  }

  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {  // dx = scale dy, broadcast back.
    T* dx = a.din[0];
    if (dx == nullptr) return;
    const T scale = static_cast<T>(scale_);
    const T* dy = a.dout[0];
    if (scale_ == 1.0) {
      BinaryLoop(expand_, dy, dy, dx, [](T g, T) { return g; });
    } else {
      BinaryLoop(expand_, dy, dy, dx, [=](T g, T) { return g * scale; });
    }
  }

 private:
  int64_t n_;
  double scale_;
  SumToShape reduce_;
  Broadcast expand_;
};

absl::StatusOr<int64_t> NormalizeAxis(OpContext& c, absl::string_view name, int64_t axis,
                                      int64_t rank) {
  if (axis < -rank || axis >= rank) {
    return c.AttributeError(name, absl::StrCat("axis ", axis, " is out of range for rank ", rank));
  }
  return axis < 0 ? axis + rank : axis;
}

}  // namespace

absl::StatusOr<std::unique_ptr<OpKernel>> MakeLayerNorm(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(c.ExpectFloat(0));
  RETURN_IF_ERROR(c.ExpectFloat(1));
  ASSIGN_OR_RETURN(int64_t axis, c.Int("axis", -1));
  ASSIGN_OR_RETURN(const double epsilon, c.Float("epsilon", 1e-5));
  ASSIGN_OR_RETURN(const int64_t stash_type, c.Int("stash_type", 1));
  RETURN_IF_ERROR(c.UnknownAttribute());
  (void)stash_type;  // Statistics are computed in double and kept in the call's dtype.
  if (c.num_outputs() > 1) {
    return c.Error("only the first output (Y) is supported; Mean and InvStdDev are not");
  }
  const Shape& x = c.input(0)->shape;
  const int64_t rank = static_cast<int64_t>(x.size());
  if (rank == 0) return c.InputError(0, "expected rank >= 1, got a scalar");
  ASSIGN_OR_RETURN(axis, NormalizeAxis(c, "axis", axis, rank));
  if (!(epsilon > 0) || !std::isfinite(epsilon)) {
    return c.AttributeError("epsilon", "must be positive and finite");
  }
  const Shape normalized(x.begin() + axis, x.end());
  const bool rms = c.node().op_type == "RMSNormalization";
  for (int i = 1; i < (rms ? 2 : 3); ++i) {
    if (c.input(i) == nullptr) continue;
    RETURN_IF_ERROR(c.ExpectFloat(i));
    if (c.input(i)->shape != normalized) {
      return c.InputError(
          i, absl::StrCat("shape ", ShapeString(c.input(i)->shape),
                          " does not match the normalized axes of inputs[0] ", ShapeString(x),
                          " from axis ", axis, ": expected ", ShapeString(normalized)));
    }
  }
  out->push_back(*c.input(0));
  const int64_t d = NumElements(normalized);
  return std::make_unique<NormKernel>(rms, NumElements(x) / std::max<int64_t>(d, 1), d, epsilon,
                                      !rms && c.input(2) != nullptr);
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeRmsNorm(OpContext& c, std::vector<ValueType>* out) {
  return MakeLayerNorm(c, out);
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeSoftmax(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(c.ExpectFloat(0));
  ASSIGN_OR_RETURN(int64_t axis, c.Int("axis", -1));
  RETURN_IF_ERROR(c.UnknownAttribute());
  const Shape& x = c.input(0)->shape;
  const int64_t rank = static_cast<int64_t>(x.size());
  if (rank == 0) return c.InputError(0, "expected rank >= 1, got a scalar");
  ASSIGN_OR_RETURN(axis, NormalizeAxis(c, "axis", axis, rank));
  if (x[axis] == 0) return c.InputError(0, "the softmax axis is empty");
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= x[d];
  for (int64_t d = axis + 1; d < rank; ++d) inner *= x[d];
  out->push_back(*c.input(0));
  return std::make_unique<SoftmaxKernel>(outer, x[axis], inner);
}

std::unique_ptr<OpKernel> MakeMaskedSoftmax(const Shape& x, const Shape& mask, bool has_scale) {
  return std::make_unique<MaskedSoftmaxKernel>(x, mask, has_scale);
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeReduce(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(c.ExpectFloat(0));
  const bool mean = c.node().op_type == "ReduceMean";
  ASSIGN_OR_RETURN(const int64_t keepdims, c.Int("keepdims", 1));
  std::vector<int64_t> axes;
  int64_t noop = 0;
  if (mean) {  // opset 17: axes is an attribute of ReduceMean...
    ASSIGN_OR_RETURN(axes, c.Ints("axes", nullptr));
  } else {  // ... and an optional constant input of ReduceSum.
    ASSIGN_OR_RETURN(noop, c.Int("noop_with_empty_axes", 0));
    if (c.input(1) != nullptr) {
      ASSIGN_OR_RETURN(axes, c.ConstantInts(1));
    }
  }
  RETURN_IF_ERROR(c.UnknownAttribute());
  if (keepdims != 0 && keepdims != 1) return c.AttributeError("keepdims", "must be 0 or 1");
  const Shape& x = c.input(0)->shape;
  const int64_t rank = static_cast<int64_t>(x.size());
  std::vector<bool> reduced(rank, axes.empty() && noop == 0);
  for (int64_t axis : axes) {
    if (axis < -rank || axis >= rank) {
      const std::string message = absl::StrCat("axis ", axis, " is out of range for rank ", rank);
      return mean ? c.AttributeError("axes", message) : c.InputError(1, message);
    }
    const int64_t a = axis < 0 ? axis + rank : axis;
    if (reduced[a]) {
      return mean ? c.AttributeError("axes", absl::StrCat("axis ", axis, " is repeated"))
                  : c.InputError(1, absl::StrCat("axis ", axis, " is repeated"));
    }
    reduced[a] = true;
  }
  Shape kept, shape;
  int64_t count = 1;
  for (int64_t d = 0; d < rank; ++d) {
    kept.push_back(reduced[d] ? 1 : x[d]);
    if (reduced[d]) count *= x[d];
    if (!reduced[d] || keepdims) shape.push_back(reduced[d] ? 1 : x[d]);
  }
  out->push_back({c.input(0)->dtype, shape});
  const double scale = mean ? 1.0 / static_cast<double>(std::max<int64_t>(count, 1)) : 1.0;
  return std::make_unique<ReduceKernel>(x, kept, scale);
}

}  // namespace gradserve::engine::graph
