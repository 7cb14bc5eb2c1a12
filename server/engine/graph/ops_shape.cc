// Operators that move data without arithmetic (Transpose, Reshape, Squeeze, Unsqueeze, Split,
// Concat, Slice, Gather, Expand, Trilu, Constant). Their forward passes work on any dtype (they
// copy elements of DTypeSize bytes), so int64 and bool values can be reshaped and masked too; their
// backward passes move gradients back the same way (Gather's and Expand's add them up).
#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>

#include "absl/container/inlined_vector.h"
#include "absl/strings/str_cat.h"
#include "server/engine/graph/kernels.h"

namespace gradserve::engine::graph {
namespace {

std::vector<int64_t> DenseStrides(const Shape& shape) {
  std::vector<int64_t> strides(shape.size(), 1);
  for (int d = static_cast<int>(shape.size()) - 2; d >= 0; --d) {
    strides[d] = strides[d + 1] * shape[d + 1];
  }
  return strides;
}

// dst[dst_offset + sum_d i_d dst_stride_d] = src[src_offset + sum_d i_d src_stride_d] for every
// multi-index i of `shape`, axes coalesced where both sides allow; rows in parallel, the inner
// axis a memcpy when both strides are 1.
class StridedCopy {
 public:
  StridedCopy() = default;
  StridedCopy(const Shape& shape_in, const std::vector<int64_t>& src_strides_in, int64_t src_offset,
              const std::vector<int64_t>& dst_strides_in, int64_t dst_offset)
      : src_offset_(src_offset), dst_offset_(dst_offset) {
    Shape shape = shape_in;
    std::vector<int64_t> src_strides = src_strides_in, dst_strides = dst_strides_in;
    const int rank = static_cast<int>(shape.size());
    if (rank > 2 && src_strides[rank - 1] == 1 && dst_strides[rank - 1] == 1) {
      // Rows copied whole: walk the other axes in the strided side's memory order (the dense
      // side's if both are), so that reads and writes each run as a few sequential streams. A
      // Split writing attention's heads [B, H, T, hd] from [B, T, 3d] otherwise reads one row
      // of hd every 3d elements, a cache miss per row.
      const bool src_dense = src_strides == DenseStrides(shape);
      const std::vector<int64_t>& key = src_dense ? dst_strides : src_strides;
      std::vector<int> order(rank - 1);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return key[x] > key[y]; });
      for (int d = 0; d + 1 < rank; ++d) {
        shape[d] = shape_in[order[d]];
        src_strides[d] = src_strides_in[order[d]];
        dst_strides[d] = dst_strides_in[order[d]];
      }
    }
    for (size_t d = 0; d < shape.size(); ++d) {
      if (shape[d] == 1) continue;
      if (!sizes_.empty() && src_.back() == src_strides[d] * shape[d] &&
          dst_.back() == dst_strides[d] * shape[d]) {
        sizes_.back() *= shape[d];
        src_.back() = src_strides[d];
        dst_.back() = dst_strides[d];
        continue;
      }
      sizes_.push_back(shape[d]);
      src_.push_back(src_strides[d]);
      dst_.push_back(dst_strides[d]);
    }
    if (sizes_.empty()) {
      sizes_ = {1};
      src_ = {1};
      dst_ = {1};
    }
    for (size_t d = 0; d + 1 < sizes_.size(); ++d) rows_ *= sizes_[d];
    elements_ = NumElements(shape);
  }

  void Run(const void* src, void* dst, int64_t element_bytes) const {
    if (elements_ == 0) return;
    switch (element_bytes) {
      case 1:
        return RunTyped(static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst));
      case 4:
        return RunTyped(static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst));
      default:
        return RunTyped(static_cast<const uint64_t*>(src), static_cast<uint64_t*>(dst));
    }
  }

 private:
  template <typename E>
  void RunTyped(const E* src, E* dst) const {
    const int64_t inner = sizes_.back();
    const int64_t si = src_.back();
    const int64_t di = dst_.back();
    const int outer_rank = static_cast<int>(sizes_.size()) - 1;
    // A transpose (one side strided along the inner axis): copy in square tiles between the
    // inner axis and the outer axis that is contiguous on the strided side, so both sides are
    // read and written a cache line at a time.
    int tiled = -1;
    if (si != 1 || di != 1) {
      for (int d = 0; d < outer_rank; ++d) {
        if ((si != 1 && src_[d] == 1) || (di != 1 && dst_[d] == 1)) tiled = d;
      }
    }
    if (tiled >= 0) {
      constexpr int64_t kTile = 32;
      const int64_t rows = sizes_[tiled];
      const int64_t others = rows_ / rows;
      const int64_t row_tiles = (rows + kTile - 1) / kTile;
      const int64_t sp = src_[tiled], dp = dst_[tiled];
      ForEachIndex(others * row_tiles, elements_ >= kParallelElements, [&](int64_t task) {
        int64_t rest = task / row_tiles;
        const int64_t i0 = (task % row_tiles) * kTile;
        int64_t so = src_offset_, dof = dst_offset_;
        for (int d = outer_rank - 1; d >= 0; --d) {
          if (d == tiled) continue;
          const int64_t i = rest % sizes_[d];
          rest /= sizes_[d];
          so += i * src_[d];
          dof += i * dst_[d];
        }
        const int64_t i1 = std::min(rows, i0 + kTile);
        for (int64_t j0 = 0; j0 < inner; j0 += kTile) {
          const int64_t j1 = std::min(inner, j0 + kTile);
          for (int64_t i = i0; i < i1; ++i) {
            for (int64_t j = j0; j < j1; ++j)
              dst[dof + i * dp + j * di] = src[so + i * sp + j * si];
          }
        }
      });
      return;
    }
    // Rows in blocks, each block's first row index decomposed once and the rest walked as an
    // odometer: short rows (attention heads' 64 elements) would otherwise pay more for the
    // divisions than for the copy.
    constexpr int64_t kRowsPerTask = 64;
    const int64_t tasks = (rows_ + kRowsPerTask - 1) / kRowsPerTask;
    ForEachIndex(tasks, elements_ >= kParallelElements, [&](int64_t task) {
      const int64_t r0 = task * kRowsPerTask;
      const int64_t r1 = std::min(rows_, r0 + kRowsPerTask);
      absl::InlinedVector<int64_t, 8> index(outer_rank, 0);
      int64_t so = src_offset_, dof = dst_offset_, rest = r0;
      for (int d = outer_rank - 1; d >= 0; --d) {
        index[d] = rest % sizes_[d];
        rest /= sizes_[d];
        so += index[d] * src_[d];
        dof += index[d] * dst_[d];
      }
      for (int64_t r = r0; r < r1; ++r) {
        if (si == 1 && di == 1) {
          std::memcpy(dst + dof, src + so, sizeof(E) * inner);
        } else {
          for (int64_t j = 0; j < inner; ++j) dst[dof + j * di] = src[so + j * si];
        }
        for (int d = outer_rank - 1; d >= 0; --d) {
          so += src_[d];
          dof += dst_[d];
          if (++index[d] < sizes_[d]) break;
          so -= src_[d] * sizes_[d];
          dof -= dst_[d] * sizes_[d];
          index[d] = 0;
        }
      }
    });
  }

 private:
  std::vector<int64_t> sizes_, src_, dst_;
  int64_t src_offset_ = 0, dst_offset_ = 0;
  int64_t rows_ = 1;
  int64_t elements_ = 0;
};

// Reshape, Squeeze, Unsqueeze: the same elements in the same order.
class CopyKernel final : public Kernel<CopyKernel> {
 public:
  CopyKernel(int64_t n, int64_t element_bytes, bool differentiable) : bytes_(n * element_bytes) {
    differentiable_ = differentiable ? 1 : 0;
    passthrough_ = differentiable_;
    aliases_input_ = true;
  }
  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    std::memcpy(a.out[0], a.in[0], bytes_);
    return absl::OkStatus();
  }
  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {
    if (a.din[0] != nullptr) std::memcpy(a.din[0], a.dout[0], bytes_);
  }

 private:
  int64_t bytes_;
};

class TransposeKernel final : public Kernel<TransposeKernel> {
 public:
  TransposeKernel(const Shape& in, const std::vector<int64_t>& perm, int64_t element_bytes,
                  bool differentiable)
      : element_bytes_(element_bytes) {
    differentiable_ = differentiable ? 1 : 0;
    const std::vector<int64_t> in_strides = DenseStrides(in);
    Shape out(in.size());
    std::vector<int64_t> src(in.size());
    for (size_t d = 0; d < in.size(); ++d) {
      out[d] = in[perm[d]];
      src[d] = in_strides[perm[d]];
    }
    forward_ = StridedCopy(out, src, 0, DenseStrides(out), 0);
    // Backward: dIn[perm[d] axis] walks dOut's axis d.
    const std::vector<int64_t> out_strides = DenseStrides(out);
    std::vector<int64_t> back(in.size());
    for (size_t d = 0; d < in.size(); ++d) back[perm[d]] = out_strides[d];
    backward_ = StridedCopy(in, back, 0, in_strides, 0);
  }
  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    forward_.Run(a.in[0], a.out[0], element_bytes_);
    return absl::OkStatus();
  }
  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {
    if (a.din[0] != nullptr) backward_.Run(a.dout[0], a.din[0], sizeof(T));
  }

 private:
  int64_t element_bytes_;
  StridedCopy forward_, backward_;
};

// Split, Concat and Slice: each piece is a strided window of the whole. `whole_is_input`:
// Split and Slice (pieces are outputs), Concat (pieces are inputs).
class PiecesKernel final : public Kernel<PiecesKernel> {
 public:
  PiecesKernel(bool whole_is_input, int64_t whole_elements, std::vector<StridedCopy> to_piece,
               std::vector<StridedCopy> to_whole, int64_t element_bytes, bool differentiable,
               int num_pieces)
      : whole_is_input_(whole_is_input),
        whole_elements_(whole_elements),
        to_piece_(std::move(to_piece)),
        to_whole_(std::move(to_whole)),
        element_bytes_(element_bytes) {
    // Every piece: bit 31 stands for the pieces from the 31st on (InputBit).
    differentiable_ = !differentiable    ? 0
                      : whole_is_input   ? 1u
                      : num_pieces >= 32 ? ~0u
                                         : (1u << num_pieces) - 1;
  }
  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    for (size_t p = 0; p < to_piece_.size(); ++p) {
      if (whole_is_input_) {
        to_piece_[p].Run(a.in[0], a.out[p], element_bytes_);
      } else {
        to_whole_[p].Run(a.in[p], a.out[0], element_bytes_);
      }
    }
    return absl::OkStatus();
  }
  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {
    for (size_t p = 0; p < to_piece_.size(); ++p) {
      if (whole_is_input_) {
        if (a.din[0] == nullptr) return;
        if (p == 0 && !covers_whole_) std::memset(a.din[0], 0, sizeof(T) * whole_elements_);
        to_whole_[p].Run(a.dout[p], a.din[0], sizeof(T));
      } else if (a.din[p] != nullptr) {
        to_piece_[p].Run(a.dout[0], a.din[p], sizeof(T));
      }
    }
  }
  bool covers_whole_ = false;  // The pieces tile the whole (Split): no zero fill needed.

 private:
  bool whole_is_input_;
  int64_t whole_elements_;
  std::vector<StridedCopy> to_piece_, to_whole_;
  int64_t element_bytes_;
};

// The window [start, start + size) of `axis` of `whole`, as copies both ways.
void AxisWindow(const Shape& whole, int64_t axis, int64_t start, int64_t size,
                std::vector<StridedCopy>* to_piece, std::vector<StridedCopy>* to_whole) {
  Shape piece = whole;
  piece[axis] = size;
  const std::vector<int64_t> ws = DenseStrides(whole);
  const std::vector<int64_t> ps = DenseStrides(piece);
  to_piece->emplace_back(piece, ws, start * ws[axis], ps, 0);
  to_whole->emplace_back(piece, ps, 0, ws, start * ws[axis]);
}

// out[o, i, :] = data[o, indices[i], :] for data [outer, n, inner].
class GatherKernel final : public Kernel<GatherKernel> {
 public:
  GatherKernel(int64_t outer, int64_t n, int64_t inner, int64_t count, int64_t element_bytes,
               bool differentiable, std::string where)
      : outer_(outer),
        n_(n),
        inner_(inner),
        count_(count),
        element_bytes_(element_bytes),
        where_(std::move(where)) {
    differentiable_ = differentiable ? 1 : 0;
    reads_inputs_ = 2;  // The indices.
    forward_flops_ = static_cast<double>(outer * count * inner);
    backward_flops_ = forward_flops_;
    workspace_elements_ = 0;
  }

  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    const int64_t* idx = static_cast<const int64_t*>(a.in[1]);
    for (int64_t i = 0; i < count_; ++i) {
      if (idx[i] < -n_ || idx[i] >= n_) {
        return absl::InvalidArgumentError(absl::StrCat(where_, ".inputs[1]: index ", idx[i],
                                                       " at position ", i, " is out of range [",
                                                       -n_, ", ", n_, ")"));
      }
    }
    const char* data = static_cast<const char*>(a.in[0]);
    char* out = static_cast<char*>(a.out[0]);
    const int64_t row = inner_ * element_bytes_;
    ForEachIndex(outer_ * count_, outer_ * count_ * inner_ >= kParallelElements, [&](int64_t t) {
      const int64_t o = t / count_;
      int64_t k = idx[t % count_];
      if (k < 0) k += n_;
      std::memcpy(out + t * row, data + (o * n_ + k) * row, row);
    });
    return absl::OkStatus();
  }

  // Scatter-add without atomics: the positions are bucketed by the row they read (a counting
  // sort, positions ascending within a row), then each row of dData, in parallel, sums its
  // positions' gradient rows in ascending position order (zero if none).
  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {
    T* dd = a.din[0];
    if (dd == nullptr) return;
    const int64_t* idx = static_cast<const int64_t*>(a.in[1]);
    const T* dy = a.dout[0];
    std::vector<int64_t> start(n_ + 1, 0), order(count_);
    for (int64_t i = 0; i < count_; ++i) ++start[(idx[i] < 0 ? idx[i] + n_ : idx[i]) + 1];
    for (int64_t r = 0; r < n_; ++r) start[r + 1] += start[r];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < count_; ++i) order[fill[idx[i] < 0 ? idx[i] + n_ : idx[i]]++] = i;
    const int64_t inner = inner_;
    ForEachIndex(outer_ * n_, outer_ * std::max(n_, count_) * inner >= kParallelElements,
                 [&](int64_t t) {
                   const int64_t o = t / n_;
                   const int64_t r = t % n_;
                   T* dst = dd + t * inner;
                   const int64_t begin = start[r], end = start[r + 1];
                   if (begin == end) {
                     std::memset(dst, 0, sizeof(T) * inner);
                     return;
                   }
                   const T* first = dy + (o * count_ + order[begin]) * inner;
                   std::memcpy(dst, first, sizeof(T) * inner);
                   for (int64_t p = begin + 1; p < end; ++p) {
                     const T* src = dy + (o * count_ + order[p]) * inner;
#pragma omp simd
                     for (int64_t j = 0; j < inner; ++j) dst[j] += src[j];
                   }
                 });
  }

 private:
  int64_t outer_, n_, inner_, count_, element_bytes_;
  std::string where_;
};

// out = in broadcast to out's shape; the gradient sums dOut over the broadcast axes.
class ExpandKernel final : public Kernel<ExpandKernel> {
 public:
  ExpandKernel(const Shape& in, const Shape& out, int64_t element_bytes, bool differentiable)
      : n_(NumElements(out)),
        element_bytes_(element_bytes),
        forward_(out, {&in}),
        reduce_(out, in) {
    differentiable_ = differentiable ? 1 : 0;
    if (NumElements(in) == n_) {  // Only size-1 axes added: the same bytes.
      aliases_input_ = true;
      passthrough_ = differentiable_;
    }
    backward_flops_ = static_cast<double>(n_);
  }
  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    switch (element_bytes_) {
      case 1:
        Run(static_cast<const uint8_t*>(a.in[0]), static_cast<uint8_t*>(a.out[0]));
        break;
      case 4:
        Run(static_cast<const uint32_t*>(a.in[0]), static_cast<uint32_t*>(a.out[0]));
        break;
      default:
        Run(static_cast<const uint64_t*>(a.in[0]), static_cast<uint64_t*>(a.out[0]));
        break;
    }
    return absl::OkStatus();
  }
  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {
    if (a.din[0] != nullptr) reduce_.Run(a.dout[0], a.din[0], 1.0);
  }

 private:
  template <typename E>
  void Run(const E* in, E* out) const {
    const int64_t inner = forward_.inner();
    const int64_t stride = forward_.inner_stride(0);
    ForEachIndex(forward_.rows(), n_ >= kParallelElements, [&](int64_t r) {
      const E* src = in + forward_.Offset(r, 0);
      E* dst = out + r * inner;
      if (stride == 0) {
        std::fill(dst, dst + inner, *src);
      } else {
        std::memcpy(dst, src, sizeof(E) * inner);
      }
    });
  }

  int64_t n_;
  int64_t element_bytes_;
  Broadcast forward_;
  SumToShape reduce_;
};

// Trilu over the last two axes [..., rows, cols]: keeps j - i >= k (upper) or <= k (lower).
class TriluKernel final : public Kernel<TriluKernel> {
 public:
  TriluKernel(int64_t matrices, int64_t rows, int64_t cols, int64_t k, bool upper,
              int64_t element_bytes, bool differentiable)
      : matrices_(matrices),
        rows_(rows),
        cols_(cols),
        k_(k),
        upper_(upper),
        element_bytes_(element_bytes) {
    differentiable_ = differentiable ? 1 : 0;
  }
  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>& a) const {
    Run(a.in[0], a.out[0], element_bytes_);
    return absl::OkStatus();
  }
  template <typename T>
  void Bwd(const BackwardArgs<T>& a) const {
    if (a.din[0] != nullptr) Run(a.dout[0], a.din[0], sizeof(T));
  }

 private:
  void Run(const void* in, void* out, int64_t bytes) const {
    const char* src = static_cast<const char*>(in);
    char* dst = static_cast<char*>(out);
    const int64_t cols = cols_;
    ForEachIndex(matrices_ * rows_, matrices_ * rows_ * cols_ >= kParallelElements, [&](int64_t t) {
      const int64_t i = t % rows_;
      // Kept columns: [lo, hi).
      int64_t lo = upper_ ? i + k_ : 0;
      int64_t hi = upper_ ? cols : i + k_ + 1;
      lo = std::clamp<int64_t>(lo, 0, cols);
      hi = std::clamp<int64_t>(hi, lo, cols);
      const char* s = src + t * cols * bytes;
      char* d = dst + t * cols * bytes;
      std::memset(d, 0, lo * bytes);
      std::memcpy(d + lo * bytes, s + lo * bytes, (hi - lo) * bytes);
      std::memset(d + hi * bytes, 0, (cols - hi) * bytes);
    });
  }
  int64_t matrices_, rows_, cols_, k_;
  bool upper_;
  int64_t element_bytes_;
};

class NoKernel final : public Kernel<NoKernel> {
 public:
  template <typename T>
  absl::Status Fwd(const ForwardArgs<T>&) const {
    return absl::OkStatus();
  }
  template <typename T>
  void Bwd(const BackwardArgs<T>&) const {}
};

absl::Status InputPresent(const OpContext& c, int i) {
  return c.input(i) == nullptr ? c.InputError(i, "required input is missing") : absl::OkStatus();
}

absl::StatusOr<int64_t> Axis(const OpContext& c, int64_t axis, int64_t rank, bool attribute,
                             int input) {
  if (axis < -rank || axis >= rank) {
    const std::string message = absl::StrCat("axis ", axis, " is out of range for rank ", rank);
    return attribute ? c.AttributeError("axis", message) : c.InputError(input, message);
  }
  return axis < 0 ? axis + rank : axis;
}

}  // namespace

std::unique_ptr<OpKernel> MakeStridedSplit(const Shape& whole, DType dtype,
                                           const std::vector<StridedPiece>& pieces) {
  std::vector<StridedCopy> to_piece, to_whole;
  for (const StridedPiece& p : pieces) {
    const std::vector<int64_t> dense = DenseStrides(p.shape);
    to_piece.emplace_back(p.shape, p.strides, p.offset, dense, 0);
    to_whole.emplace_back(p.shape, dense, 0, p.strides, p.offset);
  }
  auto kernel = std::make_unique<PiecesKernel>(true, NumElements(whole), std::move(to_piece),
                                               std::move(to_whole), DTypeSize(dtype),
                                               IsFloat(dtype), static_cast<int>(pieces.size()));
  kernel->covers_whole_ = true;
  return kernel;
}

std::unique_ptr<OpKernel> MakeTransposeKernel(const Shape& in, const std::vector<int64_t>& perm,
                                              DType dtype) {
  return std::make_unique<TransposeKernel>(in, perm, DTypeSize(dtype), IsFloat(dtype));
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeTranspose(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(InputPresent(c, 0));
  const Shape& in = c.input(0)->shape;
  bool present = false;
  ASSIGN_OR_RETURN(std::vector<int64_t> perm, c.Ints("perm", &present));
  RETURN_IF_ERROR(c.UnknownAttribute());
  const int64_t rank = static_cast<int64_t>(in.size());
  if (!present) {  // ONNX default: reverse the axes.
    perm.resize(rank);
    for (int64_t d = 0; d < rank; ++d) perm[d] = rank - 1 - d;
  }
  if (static_cast<int64_t>(perm.size()) != rank) {
    return c.AttributeError("perm", absl::StrCat("has ", perm.size(), " entries for rank ", rank));
  }
  std::vector<bool> seen(rank, false);
  for (int64_t& p : perm) {
    if (p < -rank || p >= rank)
      return c.AttributeError("perm", absl::StrCat("axis ", p, " is out of range"));
    if (p < 0) p += rank;
    if (seen[p]) return c.AttributeError("perm", absl::StrCat("axis ", p, " is repeated"));
    seen[p] = true;
  }
  Shape shape(rank);
  for (int64_t d = 0; d < rank; ++d) shape[d] = in[perm[d]];
  const DType dtype = c.input(0)->dtype;
  out->push_back({dtype, shape});
  return std::make_unique<TransposeKernel>(in, perm, DTypeSize(dtype), IsFloat(dtype));
}

// Reshape, Squeeze and Unsqueeze.
absl::StatusOr<std::unique_ptr<OpKernel>> MakeReshape(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(InputPresent(c, 0));
  const std::string& op = c.node().op_type;
  const Shape& in = c.input(0)->shape;
  const int64_t rank = static_cast<int64_t>(in.size());
  const int64_t n = NumElements(in);
  Shape shape;
  if (op == "Reshape") {
    ASSIGN_OR_RETURN(const int64_t allowzero, c.Int("allowzero", 0));
    if (allowzero != 0) return c.AttributeError("allowzero", "only allowzero = 0 is supported");
    ASSIGN_OR_RETURN(const std::vector<int64_t> target, c.ConstantInts(1));
    int infer = -1;
    int64_t known = 1;
    for (size_t d = 0; d < target.size(); ++d) {
      int64_t size = target[d];
      if (size == 0) {
        if (static_cast<int64_t>(d) >= rank) {
          return c.InputError(1, absl::StrCat("entry ", d, " is 0 (copy) but inputs[0] ",
                                              ShapeString(in), " has no axis ", d));
        }
        size = in[d];
      } else if (size == -1) {
        if (infer >= 0) return c.InputError(1, "more than one -1");
        infer = static_cast<int>(d);
        size = 1;
      } else if (size < 0) {
        return c.InputError(1, absl::StrCat("entry ", d, " is ", size));
      }
      // Sizes a request may claim could overflow the product (and wrap back to n).
      if (known > 0 && size > std::numeric_limits<int64_t>::max() / known) {
        return c.InputError(
            1, absl::StrCat("shape ", ShapeString(target), " has more elements than inputs[0] ",
                            ShapeString(in), " (", n, ")"));
      }
      shape.push_back(size);
      known *= size;
    }
    if (infer >= 0) {
      if (known == 0 || n % known != 0) {
        return c.InputError(1, absl::StrCat("cannot infer the -1 of ", ShapeString(target),
                                            " for inputs[0] of shape ", ShapeString(in)));
      }
      shape[infer] = n / known;
    } else if (known != n) {
      return c.InputError(1, absl::StrCat("shape ", ShapeString(target), " has ", known,
                                          " elements, inputs[0] ", ShapeString(in), " has ", n));
    }
  } else {
    std::vector<int64_t> axes;
    if (c.input(1) != nullptr) {
      ASSIGN_OR_RETURN(axes, c.ConstantInts(1));
    }
    const bool unsqueeze = op == "Unsqueeze";
    const int64_t out_rank = unsqueeze ? rank + static_cast<int64_t>(axes.size()) : rank;
    std::vector<bool> marked(out_rank, false);
    for (int64_t axis : axes) {
      if (axis < -out_rank || axis >= out_rank) {
        return c.InputError(1, absl::StrCat("axis ", axis, " is out of range for rank ", out_rank));
      }
      const int64_t a = axis < 0 ? axis + out_rank : axis;
      if (marked[a]) return c.InputError(1, absl::StrCat("axis ", axis, " is repeated"));
      marked[a] = true;
      if (!unsqueeze && in[a] != 1) {
        return c.InputError(1, absl::StrCat("axis ", axis, " of inputs[0] ", ShapeString(in),
                                            " has size ", in[a], ", not 1"));
      }
    }
    if (unsqueeze) {
      if (axes.empty()) return c.InputError(1, "Unsqueeze needs axes");
      for (int64_t d = 0, k = 0; d < out_rank; ++d) shape.push_back(marked[d] ? 1 : in[k++]);
    } else {
      for (int64_t d = 0; d < rank; ++d) {
        const bool drop = axes.empty() ? in[d] == 1 : static_cast<bool>(marked[d]);
        if (!drop) shape.push_back(in[d]);
      }
    }
  }
  RETURN_IF_ERROR(c.UnknownAttribute());
  const DType dtype = c.input(0)->dtype;
  out->push_back({dtype, shape});
  return std::make_unique<CopyKernel>(n, DTypeSize(dtype), IsFloat(dtype));
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeSplit(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(InputPresent(c, 0));
  const Shape& in = c.input(0)->shape;
  ASSIGN_OR_RETURN(int64_t axis, c.Int("axis", 0));
  bool has_num = false;
  int64_t num_outputs = 0;
  for (const AttributeSpec& a : c.node().attributes) has_num |= a.name == "num_outputs";
  ASSIGN_OR_RETURN(num_outputs, c.Int("num_outputs", 0));
  RETURN_IF_ERROR(c.UnknownAttribute());
  ASSIGN_OR_RETURN(axis, Axis(c, axis, static_cast<int64_t>(in.size()), true, 0));
  const int pieces = c.num_outputs();
  std::vector<int64_t> sizes;
  if (c.input(1) != nullptr) {
    if (has_num)
      return c.AttributeError("num_outputs", "give either split (inputs[1]) or num_outputs");
    ASSIGN_OR_RETURN(sizes, c.ConstantInts(1));
    if (static_cast<int>(sizes.size()) != pieces) {
      return c.InputError(1, absl::StrCat("has ", sizes.size(), " sizes for ", pieces, " outputs"));
    }
    int64_t total = 0;
    for (int64_t s : sizes) {
      if (s < 0) return c.InputError(1, absl::StrCat("size ", s, " is negative"));
      total += s;
    }
    if (total != in[axis]) {
      return c.InputError(1, absl::StrCat("sizes add up to ", total, ", axis ", axis, " of ",
                                          ShapeString(in), " has ", in[axis]));
    }
  } else {
    // Equal pieces (num_outputs is opset 18's attribute; opset 17 splits by the output count),
    // the last one smaller if the axis does not divide.
    if (has_num && num_outputs != pieces) {
      return c.AttributeError("num_outputs", absl::StrCat("is ", num_outputs, " but the node has ",
                                                          pieces, " outputs"));
    }
    const int64_t each = (in[axis] + pieces - 1) / pieces;
    for (int p = 0; p < pieces; ++p) {
      sizes.push_back(std::max<int64_t>(0, std::min(each, in[axis] - p * each)));
    }
  }
  std::vector<StridedCopy> to_piece, to_whole;
  int64_t start = 0;
  const DType dtype = c.input(0)->dtype;
  for (int p = 0; p < pieces; ++p) {
    AxisWindow(in, axis, start, sizes[p], &to_piece, &to_whole);
    Shape piece = in;
    piece[axis] = sizes[p];
    out->push_back({dtype, piece});
    start += sizes[p];
  }
  auto kernel =
      std::make_unique<PiecesKernel>(true, NumElements(in), std::move(to_piece),
                                     std::move(to_whole), DTypeSize(dtype), IsFloat(dtype), pieces);
  kernel->covers_whole_ = true;
  return kernel;
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeConcat(OpContext& c, std::vector<ValueType>* out) {
  ASSIGN_OR_RETURN(int64_t axis, c.Int("axis", 0));
  bool has_axis = false;
  for (const AttributeSpec& a : c.node().attributes) has_axis |= a.name == "axis";
  RETURN_IF_ERROR(c.UnknownAttribute());
  if (!has_axis) return c.AttributeError("axis", "required");
  for (int i = 0; i < c.num_inputs(); ++i) RETURN_IF_ERROR(InputPresent(c, i));
  const ValueType& first = *c.input(0);
  ASSIGN_OR_RETURN(axis, Axis(c, axis, static_cast<int64_t>(first.shape.size()), true, 0));
  Shape whole = first.shape;
  whole[axis] = 0;
  for (int i = 0; i < c.num_inputs(); ++i) {
    const ValueType& v = *c.input(i);
    Shape expect = first.shape;
    expect[axis] = v.shape.size() == first.shape.size() ? v.shape[axis] : -1;
    if (v.dtype != first.dtype || v.shape != expect) {
      return c.InputError(i, absl::StrCat(DTypeName(v.dtype), " ", ShapeString(v.shape),
                                          " does not match inputs[0] ", DTypeName(first.dtype), " ",
                                          ShapeString(first.shape), " outside axis ", axis));
    }
    whole[axis] += v.shape[axis];
  }
  std::vector<StridedCopy> to_piece, to_whole;
  int64_t start = 0;
  for (int i = 0; i < c.num_inputs(); ++i) {
    AxisWindow(whole, axis, start, c.input(i)->shape[axis], &to_piece, &to_whole);
    start += c.input(i)->shape[axis];
  }
  out->push_back({first.dtype, whole});
  return std::make_unique<PiecesKernel>(false, NumElements(whole), std::move(to_piece),
                                        std::move(to_whole), DTypeSize(first.dtype),
                                        IsFloat(first.dtype), c.num_inputs());
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeSlice(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(InputPresent(c, 0));
  RETURN_IF_ERROR(c.UnknownAttribute());
  const Shape& in = c.input(0)->shape;
  const int64_t rank = static_cast<int64_t>(in.size());
  ASSIGN_OR_RETURN(const std::vector<int64_t> starts, c.ConstantInts(1));
  ASSIGN_OR_RETURN(const std::vector<int64_t> ends, c.ConstantInts(2));
  std::vector<int64_t> axes, steps;
  if (c.input(3) != nullptr) {
    ASSIGN_OR_RETURN(axes, c.ConstantInts(3));
  } else {
    for (size_t i = 0; i < starts.size(); ++i) axes.push_back(static_cast<int64_t>(i));
  }
  if (c.input(4) != nullptr) {
    ASSIGN_OR_RETURN(steps, c.ConstantInts(4));
  } else {
    steps.assign(starts.size(), 1);
  }
  if (ends.size() != starts.size()) return c.InputError(2, "ends and starts differ in length");
  if (axes.size() != starts.size()) return c.InputError(3, "axes and starts differ in length");
  if (steps.size() != starts.size()) return c.InputError(4, "steps and starts differ in length");
  std::vector<int64_t> first(rank, 0), step(rank, 1);
  Shape shape = in;
  std::vector<bool> seen(rank, false);
  for (size_t i = 0; i < starts.size(); ++i) {
    int64_t axis = axes[i];
    if (axis < -rank || axis >= rank) {
      return c.InputError(3, absl::StrCat("axis ", axis, " is out of range for rank ", rank));
    }
    if (axis < 0) axis += rank;
    if (seen[axis]) return c.InputError(3, absl::StrCat("axis ", axis, " is repeated"));
    seen[axis] = true;
    const int64_t dim = in[axis];
    const int64_t s = steps[i];
    if (s == 0) return c.InputError(4, "a step is 0");
    // ONNX clamping: negative starts/ends count from the end, then clamp to the valid range.
    int64_t b = starts[i] < 0 ? starts[i] + dim : starts[i];
    int64_t e = ends[i] < 0 ? ends[i] + dim : ends[i];
    if (s > 0) {
      b = std::clamp<int64_t>(b, 0, dim);
      e = std::clamp<int64_t>(e, 0, dim);
      shape[axis] = e > b ? (e - b + s - 1) / s : 0;
    } else {
      b = std::clamp<int64_t>(b, 0, dim - 1);
      e = std::clamp<int64_t>(e, -1, dim - 1);
      shape[axis] = b > e ? (b - e - s - 1) / (-s) : 0;
    }
    first[axis] = b;
    step[axis] = s;
  }
  const std::vector<int64_t> strides = DenseStrides(in);
  std::vector<int64_t> src(rank);
  int64_t offset = 0;
  for (int64_t d = 0; d < rank; ++d) {
    src[d] = strides[d] * step[d];
    offset += first[d] * strides[d];
  }
  std::vector<StridedCopy> to_piece, to_whole;
  to_piece.emplace_back(shape, src, offset, DenseStrides(shape), 0);
  to_whole.emplace_back(shape, DenseStrides(shape), 0, src, offset);
  const DType dtype = c.input(0)->dtype;
  out->push_back({dtype, shape});
  return std::make_unique<PiecesKernel>(true, NumElements(in), std::move(to_piece),
                                        std::move(to_whole), DTypeSize(dtype), IsFloat(dtype), 1);
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeGather(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(InputPresent(c, 0));
  RETURN_IF_ERROR(c.ExpectDType(1, DType::kInt64));
  ASSIGN_OR_RETURN(int64_t axis, c.Int("axis", 0));
  RETURN_IF_ERROR(c.UnknownAttribute());
  const Shape& data = c.input(0)->shape;
  const Shape& indices = c.input(1)->shape;
  if (data.empty()) return c.InputError(0, "expected rank >= 1, got a scalar");
  ASSIGN_OR_RETURN(axis, Axis(c, axis, static_cast<int64_t>(data.size()), true, 0));
  if (const ConstantValue* k = c.constant(1)) {  // Constant indices are checked now.
    for (int64_t v : k->ints) {
      if (v < -data[axis] || v >= data[axis]) {
        return c.InputError(1, absl::StrCat("index ", v, " is out of range for axis ", axis,
                                            " of size ", data[axis]));
      }
    }
  }
  Shape shape(data.begin(), data.begin() + axis);
  shape.insert(shape.end(), indices.begin(), indices.end());
  shape.insert(shape.end(), data.begin() + axis + 1, data.end());
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= data[d];
  for (size_t d = axis + 1; d < data.size(); ++d) inner *= data[d];
  const DType dtype = c.input(0)->dtype;
  out->push_back({dtype, shape});
  return std::make_unique<GatherKernel>(outer, data[axis], inner, NumElements(indices),
                                        DTypeSize(dtype), IsFloat(dtype), c.where());
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeExpand(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(InputPresent(c, 0));
  RETURN_IF_ERROR(c.UnknownAttribute());
  ASSIGN_OR_RETURN(const std::vector<int64_t> target, c.ConstantInts(1));
  if (c.constant(1)->shape.size() != 1)
    return c.InputError(1, "expected a 1-D shape, got a scalar");
  const Shape& in = c.input(0)->shape;
  // Expand broadcasts both ways (a 1 in `target` keeps the input's size), so the sizes the
  // request gives only matter where the input's are 1: bounded by the plan's element limit.
  for (int64_t d : target) {
    if (d < 0) return c.InputError(1, absl::StrCat("negative size in ", ShapeString(target)));
  }
  Shape shape;
  if (!BroadcastShapes(in, target, &shape)) {
    return c.InputError(1, absl::StrCat("shape ", ShapeString(target), " does not broadcast with ",
                                        ShapeString(in), " (inputs[0])"));
  }
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d != 0 && n > (int64_t{1} << 62) / d) {
      return c.InputError(1, absl::StrCat("shape ", ShapeString(shape), " has too many elements"));
    }
    n *= d;
  }
  const DType dtype = c.input(0)->dtype;
  out->push_back({dtype, shape});
  return std::make_unique<ExpandKernel>(in, shape, DTypeSize(dtype), IsFloat(dtype));
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeTrilu(OpContext& c, std::vector<ValueType>* out) {
  RETURN_IF_ERROR(InputPresent(c, 0));
  ASSIGN_OR_RETURN(const int64_t upper, c.Int("upper", 1));
  RETURN_IF_ERROR(c.UnknownAttribute());
  if (upper != 0 && upper != 1) return c.AttributeError("upper", "must be 0 or 1");
  const Shape& in = c.input(0)->shape;
  if (in.size() < 2)
    return c.InputError(0, absl::StrCat("expected rank >= 2, got ", ShapeString(in)));
  int64_t k = 0;
  if (c.input(1) != nullptr) {
    ASSIGN_OR_RETURN(const std::vector<int64_t> ks, c.ConstantInts(1));
    if (ks.size() != 1) return c.InputError(1, "k must be a single value");
    k = ks[0];
  }
  const int64_t rows = in[in.size() - 2];
  const int64_t cols = in.back();
  const DType dtype = c.input(0)->dtype;
  out->push_back(*c.input(0));
  return std::make_unique<TriluKernel>(NumElements(in) / std::max<int64_t>(1, rows * cols), rows,
                                       cols, k, upper == 1, DTypeSize(dtype), IsFloat(dtype));
}

absl::StatusOr<ConstantValue> ConstantNodeValue(OpContext& c) {
  ConstantValue v;
  int given = 0;
  for (const AttributeSpec& a : c.node().attributes) {
    if (a.name == "value_float") {
      ASSIGN_OR_RETURN(const double x, c.Float(a.name, 0));
      v = {DType::kFloat32, {}, {}, {x}};
    } else if (a.name == "value_floats") {
      ASSIGN_OR_RETURN(std::vector<double> x, c.Floats(a.name, nullptr));
      v = {DType::kFloat32, {static_cast<int64_t>(x.size())}, {}, std::move(x)};
    } else if (a.name == "value_int") {
      ASSIGN_OR_RETURN(const int64_t x, c.Int(a.name, 0));
      v = {DType::kInt64, {}, {x}, {}};
    } else if (a.name == "value_ints") {
      ASSIGN_OR_RETURN(std::vector<int64_t> x, c.Ints(a.name, nullptr));
      v = {DType::kInt64, {static_cast<int64_t>(x.size())}, std::move(x), {}};
    } else {
      continue;
    }
    ++given;
  }
  RETURN_IF_ERROR(c.UnknownAttribute());
  if (given != 1) {
    return c.Error(
        "needs exactly one of value_float, value_floats, value_int, value_ints (tensor values "
        "go in graph.constants)");
  }
  return v;
}

absl::StatusOr<std::unique_ptr<OpKernel>> MakeConstant(OpContext& c, std::vector<ValueType>* out) {
  ASSIGN_OR_RETURN(const ConstantValue v, ConstantNodeValue(c));
  out->push_back({IsFloat(v.dtype) ? c.float_dtype() : v.dtype, v.shape});
  return std::make_unique<NoKernel>();
}

}  // namespace gradserve::engine::graph
