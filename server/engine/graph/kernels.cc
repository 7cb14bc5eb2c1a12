#include "server/engine/graph/kernels.h"

namespace gradserve::engine::graph {

bool BroadcastShapes(const Shape& a, const Shape& b, Shape* out) {
  const size_t rank = std::max(a.size(), b.size());
  out->assign(rank, 1);
  for (size_t i = 0; i < rank; ++i) {
    const int64_t da = i < rank - a.size() ? 1 : a[i - (rank - a.size())];
    const int64_t db = i < rank - b.size() ? 1 : b[i - (rank - b.size())];
    if (da != db && da != 1 && db != 1) return false;
    (*out)[i] = da == 1 ? db : da;
  }
  return true;
}

Broadcast::Broadcast(const Shape& out, const std::vector<const Shape*>& operands) {
  const int rank = static_cast<int>(out.size());
  const int num = static_cast<int>(operands.size());
  // Per output axis (size > 1 only): each operand's element stride, 0 where it broadcasts.
  std::vector<int64_t> sizes;
  std::vector<std::array<int64_t, 3>> strides;
  std::array<int64_t, 3> running = {1, 1, 1};
  std::vector<std::array<int64_t, 3>> per_axis(rank, {0, 0, 0});
  for (int d = rank - 1; d >= 0; --d) {
    for (int k = 0; k < num; ++k) {
      const Shape& s = *operands[k];
      const int offset = rank - static_cast<int>(s.size());
      const int64_t size = d >= offset ? s[d - offset] : 1;
      per_axis[d][k] = size == 1 ? 0 : running[k];
      running[k] *= size;
    }
  }
  for (int d = 0; d < rank; ++d) {
    if (out[d] == 1) continue;
    if (!sizes.empty()) {
      // Merge into the previous (outer) axis when every operand walks both as one.
      bool merge = true;
      for (int k = 0; k < num; ++k) {
        if (strides.back()[k] != per_axis[d][k] * out[d]) merge = false;
      }
      if (merge) {
        sizes.back() *= out[d];
        strides.back() = per_axis[d];
        continue;
      }
    }
    sizes.push_back(out[d]);
    strides.push_back(per_axis[d]);
  }
  if (sizes.empty()) {
    sizes.push_back(1);
    strides.push_back({0, 0, 0});
  }
  sizes_ = sizes;
  strides_ = strides;
  rows_ = 1;
  for (size_t d = 0; d + 1 < sizes_.size(); ++d) rows_ *= sizes_[d];
}

SumToShape::SumToShape(const Shape& full, const Shape& reduced) {
  const int rank = static_cast<int>(full.size());
  const int offset = rank - static_cast<int>(reduced.size());
  dst_elements_ = NumElements(reduced);
  identity_ = true;
  int64_t stride = 1;
  std::vector<Group> reversed;
  for (int d = rank - 1; d >= 0; --d) {
    const int64_t size = full[d];
    const int64_t dst_size = d >= offset ? reduced[d - offset] : 1;
    if (size != 1) {
      const bool is_reduced = dst_size == 1;
      if (is_reduced) identity_ = false;
      if (!reversed.empty() && reversed.back().reduced == is_reduced) {
        reversed.back().size *= size;  // Contiguous in the source, adjacent in the destination.
      } else {
        reversed.push_back({size, stride, is_reduced});
      }
    }
    stride *= size;
  }
  groups_.assign(reversed.rbegin(), reversed.rend());
  if (groups_.empty()) groups_.push_back({1, 1, false});
}

}  // namespace gradserve::engine::graph
