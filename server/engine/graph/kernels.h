// Low-level loops shared by the graph operators (the parallel loops are the chain's, from
// parallel_loops.h): numpy broadcasting and the deterministic reduction of a broadcast gradient
// back to its operand's shape.
//
// Every loop here is parallel over the index it writes (OpenMP static schedules, no atomics)
// and, where it sums, sums each result in a fixed order that does not depend on the thread
// count or on where the buffers sit, so results are bit-identical run to run.
#ifndef GRADSERVE_ENGINE_GRAPH_KERNELS_H_
#define GRADSERVE_ENGINE_GRAPH_KERNELS_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#include "server/engine/graph/op.h"
#include "server/engine/parallel_loops.h"  // The chain's loops: a graph's pass runs as its layer.

namespace gradserve::engine::graph {

// numpy broadcasting of up to three operands to an output shape, with dimensions coalesced:
// the output is rows() x inner() (row-major, dense); operand k's element for output (r, j) is
// at Offset(r, k) + j * inner_stride(k), inner_stride 1 or 0 (broadcast along the inner axis).
class Broadcast {
 public:
  Broadcast() = default;
  Broadcast(const Shape& out, const std::vector<const Shape*>& operands);

  int64_t rows() const { return rows_; }
  int64_t inner() const { return sizes_.back(); }
  int64_t inner_stride(int k) const { return strides_.back()[k]; }
  int64_t Offset(int64_t row, int k) const {
    int64_t offset = 0;
    for (int d = static_cast<int>(sizes_.size()) - 2; d >= 0; --d) {
      const int64_t i = row % sizes_[d];
      row /= sizes_[d];
      offset += i * strides_[d][k];
    }
    return offset;
  }

 private:
  std::vector<int64_t> sizes_{1};
  std::vector<std::array<int64_t, 3>> strides_{{0, 0, 0}};
  int64_t rows_ = 1;
};

// The shape numpy broadcasting gives a and b, or false if they do not broadcast.
bool BroadcastShapes(const Shape& a, const Shape& b, Shape* out);

// out[i] = f(a[i], b[i]) with a and b broadcast as `bc` (operands 0 and 1) says. U is T but
// for comparisons (bool results, one byte each).
template <typename T, typename U, typename F>
void BinaryLoop(const Broadcast& bc, const T* a, const T* b, U* out, const F& f) {
  constexpr int64_t kChunk = int64_t{1} << 14;
  const int64_t inner = bc.inner();
  const int64_t chunks = (inner + kChunk - 1) / kChunk;
  const int64_t sa = bc.inner_stride(0);
  const int64_t sb = bc.inner_stride(1);
  ForEachIndex(bc.rows() * chunks, bc.rows() * inner >= kParallelElements, [&](int64_t t) {
    const int64_t r = t / chunks;
    const int64_t c0 = (t % chunks) * kChunk;
    const int64_t n = std::min(kChunk, inner - c0);
    const T* pa = a + bc.Offset(r, 0) + c0 * sa;
    const T* pb = b + bc.Offset(r, 1) + c0 * sb;
    U* po = out + r * inner + c0;
    if (sa != 0 && sb != 0) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) po[j] = f(pa[j], pb[j]);
    } else if (sa != 0) {
      const T vb = *pb;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) po[j] = f(pa[j], vb);
    } else if (sb != 0) {
      const T va = *pa;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) po[j] = f(va, pb[j]);
    } else {
      const U v = f(*pa, *pb);
      for (int64_t j = 0; j < n; ++j) po[j] = v;
    }
  });
}

// Sums a dense tensor of shape `full` over the axes where `reduced` (right-aligned, rank <=
// full's) has size 1 and `full` does not: dst (reduced's elements) = scale * sums. Each sum runs
// in double over the source in ascending index order, whatever the thread count; results are
// rounded to T once. (A [rows, C] -> [C] reduction is the chain's bias gradient, bit for bit.)
class SumToShape {
 public:
  SumToShape() = default;
  SumToShape(const Shape& full, const Shape& reduced);

  bool identity() const { return identity_; }
  template <typename T>
  void Run(const T* src, T* dst, double scale) const;

 private:
  struct Group {
    int64_t size;
    int64_t src_stride;
    bool reduced;
  };
  bool identity_ = true;
  int64_t dst_elements_ = 1;
  std::vector<Group> groups_;  // Coalesced, outermost first.
};

template <typename T>
void SumToShape::Run(const T* src, T* dst, double scale) const {
  if (identity_) {
    if (scale == 1.0) {
      std::memcpy(dst, src, sizeof(T) * dst_elements_);
    } else {
      const T s = static_cast<T>(scale);
      for (int64_t j = 0; j < dst_elements_; ++j) dst[j] = src[j] * s;
    }
    return;
  }
  const int num_groups = static_cast<int>(groups_.size());
  const Group& last = groups_.back();
  // The outer groups' multi-indices: kept ones come from the destination index, reduced ones
  // are walked in row-major order (an odometer), so every sum runs in ascending source order.
  std::vector<int> outer_kept, outer_reduced;
  for (int g = 0; g + 1 < num_groups; ++g) {
    (groups_[g].reduced ? outer_reduced : outer_kept).push_back(g);
  }
  int64_t reduced_count = 1;
  for (int g : outer_reduced) reduced_count *= groups_[g].size;
  const auto kept_offset = [&](int64_t o) {
    int64_t offset = 0;
    for (int i = static_cast<int>(outer_kept.size()) - 1; i >= 0; --i) {
      const Group& group = groups_[outer_kept[i]];
      offset += (o % group.size) * group.src_stride;
      o /= group.size;
    }
    return offset;
  };
  const auto reduced_offset = [&](int64_t r) {
    int64_t offset = 0;
    for (int i = static_cast<int>(outer_reduced.size()) - 1; i >= 0; --i) {
      const Group& group = groups_[outer_reduced[i]];
      offset += (r % group.size) * group.src_stride;
      r /= group.size;
    }
    return offset;
  };
  const int64_t work = dst_elements_ * reduced_count * (last.reduced ? last.size : 1);
  const bool parallel = work >= kParallelElements;
  if (!last.reduced) {
    // Inner axis kept: column blocks, each summed down the reduced rows (the bias gradient).
    constexpr int64_t kColumns = 64;
    const int64_t columns = last.size;
    const int64_t blocks = (columns + kColumns - 1) / kColumns;
    const int64_t outer = dst_elements_ / columns;
    ForEachIndex(outer * blocks, parallel, [&](int64_t task) {
      const int64_t o = task / blocks;
      const int64_t c0 = (task % blocks) * kColumns;
      const int64_t width = std::min(kColumns, columns - c0);
      double sum[kColumns] = {};
      const T* base = src + kept_offset(o) + c0;
      for (int64_t r = 0; r < reduced_count; ++r) {
        const T* row = base + reduced_offset(r);
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) sum[c] += static_cast<double>(row[c]);
      }
      T* out = dst + o * columns + c0;
      if (scale == 1.0) {
        for (int64_t c = 0; c < width; ++c) out[c] = static_cast<T>(sum[c]);
      } else {
        for (int64_t c = 0; c < width; ++c) out[c] = static_cast<T>(sum[c] * scale);
      }
    });
  } else {
    // Inner axis reduced: each destination element sums its rows' contiguous runs.
    const int64_t run = last.size;
    ForEachIndex(dst_elements_, parallel, [&](int64_t o) {
      const T* base = src + kept_offset(o);
      double sum = 0;
      for (int64_t r = 0; r < reduced_count; ++r) {
        const T* p = base + reduced_offset(r);
        for (int64_t j = 0; j < run; ++j) sum += static_cast<double>(p[j]);
      }
      dst[o] = static_cast<T>(scale == 1.0 ? sum : sum * scale);
    });
  }
}

}  // namespace gradserve::engine::graph

#endif  // GRADSERVE_ENGINE_GRAPH_KERNELS_H_
