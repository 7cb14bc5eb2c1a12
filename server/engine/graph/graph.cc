#include "server/engine/graph/graph.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <queue>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace gradserve::engine::graph {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", message));
}

// Rank, sizes and element count of a shape against the limits, without overflowing.
absl::Status CheckShape(const Shape& shape, const GraphLimits& limits, absl::string_view field) {
  if (static_cast<int64_t>(shape.size()) > limits.max_rank) {
    return absl::ResourceExhaustedError(
        absl::StrCat(field, ": rank ", shape.size(), " is over the limit of ", limits.max_rank));
  }
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return Invalid(field, absl::StrCat("negative size in ", ShapeString(shape)));
    if (d != 0 && n > limits.max_tensor_elements / d) {
      return absl::ResourceExhaustedError(absl::StrCat(field, ": shape ", ShapeString(shape),
                                                       " has more than the limit of ",
                                                       limits.max_tensor_elements, " elements"));
    }
    n *= d;
  }
  return absl::OkStatus();
}

std::string NodeWhere(const NodeSpec& node, int i) {
  return absl::StrCat("graph.nodes[", i, "] (\"", node.name, "\", ", node.op_type, ")");
}

// Constant data in the call's dtype (floats to T, int64 as is, bool as one byte each).
std::vector<uint64_t> ConstantBytes(const ConstantValue& c, DType float_dtype) {
  const int64_t n = NumElements(c.shape);
  const DType dtype = IsFloat(c.dtype) ? float_dtype : c.dtype;
  std::vector<uint64_t> storage((n * DTypeSize(dtype) + 7) / 8 + 1, 0);
  void* p = storage.data();
  for (int64_t j = 0; j < n; ++j) {
    switch (dtype) {
      case DType::kFloat32:
        static_cast<float*>(p)[j] = static_cast<float>(c.floats[j]);
        break;
      case DType::kFloat64:
        static_cast<double*>(p)[j] = c.floats[j];
        break;
      case DType::kInt64:
        static_cast<int64_t*>(p)[j] = c.ints[j];
        break;
      case DType::kBool:
        static_cast<uint8_t*>(p)[j] = c.ints[j] != 0;
        break;
    }
  }
  return storage;
}

// The permutation of a Transpose node (ONNX's default: the axes reversed).
std::vector<int64_t> TransposePerm(const NodeSpec& node, size_t rank) {
  for (const AttributeSpec& a : node.attributes) {
    if (a.name == "perm") {
      std::vector<int64_t> perm = std::get<std::vector<int64_t>>(a.value);
      for (int64_t& p : perm) p = p < 0 ? p + static_cast<int64_t>(rank) : p;
      return perm;
    }
  }
  std::vector<int64_t> perm(rank);
  for (size_t d = 0; d < rank; ++d) perm[d] = static_cast<int64_t>(rank - 1 - d);
  return perm;
}

// Plan-time data of a folded value (op.h's ConstantValue) from its bytes in the call's dtype.
ConstantValue ConstantFromBytes(const void* data, const ValueType& type) {
  ConstantValue c;
  c.dtype = type.dtype;
  c.shape = type.shape;
  const int64_t n = NumElements(type.shape);
  for (int64_t j = 0; j < n; ++j) {
    switch (type.dtype) {
      case DType::kFloat32:
        c.floats.push_back(static_cast<const float*>(data)[j]);
        break;
      case DType::kFloat64:
        c.floats.push_back(static_cast<const double*>(data)[j]);
        break;
      case DType::kInt64:
        c.ints.push_back(static_cast<const int64_t*>(data)[j]);
        break;
      case DType::kBool:
        c.ints.push_back(static_cast<const uint8_t*>(data)[j]);
        break;
    }
  }
  return c;
}

std::vector<int64_t> DenseStrides(const Shape& shape) {
  std::vector<int64_t> strides(shape.size(), 1);
  for (int d = static_cast<int>(shape.size()) - 2; d >= 0; --d) {
    strides[d] = strides[d + 1] * shape[d + 1];
  }
  return strides;
}

// The element strides of `to` as a reshape of a strided view (`from`, `strides`) with the same
// elements in the same order, if the view can be reshaped without a copy (numpy's rule: each
// group of axes whose sizes multiply to the same product must be contiguous within the view).
bool ReshapeStrides(const Shape& from, const std::vector<int64_t>& strides, const Shape& to,
                    std::vector<int64_t>* to_strides) {
  Shape os;
  std::vector<int64_t> ost;
  for (size_t d = 0; d < from.size(); ++d) {
    if (from[d] == 1) continue;
    os.push_back(from[d]);
    ost.push_back(strides[d]);
  }
  to_strides->assign(to.size(), 0);
  size_t oi = 0, ni = 0;
  while (ni < to.size()) {
    if (to[ni] == 1) {
      ++ni;
      continue;
    }
    if (oi >= os.size()) return false;
    int64_t op = os[oi], np = to[ni];
    size_t oj = oi, nj = ni;
    while (op != np) {
      if (op < np) {
        if (++oj >= os.size()) return false;
        op *= os[oj];
      } else {
        if (++nj >= to.size()) return false;
        np *= to[nj];
      }
    }
    for (size_t k = oi; k < oj; ++k) {
      if (ost[k] != ost[k + 1] * os[k + 1]) return false;
    }
    int64_t stride = ost[oj];
    for (size_t k = nj + 1; k-- > ni;) {
      (*to_strides)[k] = stride;
      stride *= to[k];
    }
    oi = oj + 1;
    ni = nj + 1;
  }
  return oi == os.size();
}

constexpr double kFoldFlops = 1e7;
constexpr int64_t kPlanTimeConstantElements = 4096;
constexpr int64_t kFoldElements = int64_t{1} << 22;

}  // namespace

// Note [Fusions]
// After inference, patterns that cost a pass over memory each are folded into one node. Two
// into the MatMul they touch, so that a Linear layer written as ONNX exports it (MatMul with a
// transposed weight, then Add of the bias) runs as the chain's Linear does:
//  * MatMul(Transpose(u, perm swapping the last two axes only), .) reads u in place, the Gemm
//    transposing it (either operand). The Transpose node is dropped if nothing else reads it.
//    Any other perm of rank >= 3 read only by the MatMul is split as (perm with its last two
//    entries swapped, then the swap): the node copies by the first, its value now stored in
//    that layout (the same elements: same norms), and the Gemm transposes. So attention's K^T
//    (perm 0, 2, 3, 1) moves rows of head_dim elements, not one element at a time.
//  * Split(x) whose pieces are each read only by a Reshape read only by a Transpose (attention's
//    heads: [B, T, 3d] -> q, k, v [B, T, d] -> [B, T, H, hd] -> [B, H, T, hd]): the Split
//    copies each such piece straight into the Transpose's output (a strided view of x, when the
//    Reshape needs no copy), and the Reshape and Transpose nodes are dropped. Copies: the same
//    bits.
//  * Add(MatMul(a, b), c) with c a bias over the last axis ([N], or [1, .., N]), where nothing
//    else reads the product and c is available before the MatMul: the MatMul writes c into its
//    output and accumulates the product onto it, defining the Add's output itself; dL/dc is the
//    column sums of dL/dY (as the chain's bias gradient). The product value is never computed.
//  * Softmax over the last axis of Where(constant mask, Mul(x, constant scalar) or x, constant
//    scalar) -- attention's scale and causal mask -- is one kernel (MakeMaskedSoftmax) giving
//    the same bits, storing neither the scores' scaled nor their masked copy.
// Values a fusion makes unnecessary are marked !materialized (diagnostics: value_norm 0, no
// grad_norm). The kept order of the remaining steps is unchanged. Each pattern is matched once
// per node: O(nodes).
void Graph::Fuse(const std::unordered_map<std::string_view, int>& by_name, Graph* g) {
  std::vector<ValueInfo>& values = g->values_;
  std::vector<Step>& steps = g->steps_;
  const GraphSpec& spec = g->spec_;
  std::vector<int> readers(values.size(), 0);
  for (const Step& step : steps) {
    for (int v : step.inputs) {
      if (v >= 0) ++readers[v];
    }
  }
  for (const std::string& name : spec.outputs) {
    if (auto it = by_name.find(name); it != by_name.end()) ++readers[it->second];
  }
  auto step_of = [&](int v) { return values[v].kind == ValueKind::kNode ? values[v].index : -1; };
  auto op_of = [&](int t) -> const std::string& { return spec.nodes[steps[t].node].op_type; };
  std::vector<bool> dead(steps.size(), false);
  std::vector<bool> trans_a(steps.size(), false), trans_b(steps.size(), false);
  std::vector<bool> bias(steps.size(), false);
  std::vector<bool> rewritten(steps.size(), false);         // Transposes copying by another perm...
  std::vector<std::vector<int64_t>> perm_of(steps.size());  // ... this one.
  auto rank2 = [&](int v) { return v >= 0 && values[v].type.shape.size() >= 2; };
  for (size_t t = 0; t < steps.size(); ++t) {
    if (op_of(t) != "MatMul" || !rank2(steps[t].inputs[0]) || !rank2(steps[t].inputs[1])) continue;
    for (int j = 0; j < 2; ++j) {
      const int v = steps[t].inputs[j];
      const int p = step_of(v);
      if (p < 0 || dead[p] || op_of(p) != "Transpose" || steps[p].inputs[0] < 0) continue;
      const int u = steps[p].inputs[0];
      const size_t rank = values[u].type.shape.size();
      if (rank < 2 || !IsFloat(values[u].type.dtype)) continue;
      const std::vector<int64_t> perm = TransposePerm(spec.nodes[steps[p].node], rank);
      bool swap = perm[rank - 1] == static_cast<int64_t>(rank - 2) &&
                  perm[rank - 2] == static_cast<int64_t>(rank - 1);
      for (size_t d = 0; d + 2 < rank; ++d) swap = swap && perm[d] == static_cast<int64_t>(d);
      if (!swap) {
        // Transpose(u, perm) = Transpose(Transpose(u, q), swap of the last two axes), q = perm
        // with its last two entries swapped: when only this MatMul reads it, the node copies by
        // q instead and the MatMul reads the copy transposed. Attention's K^T, perm (0, 2, 3,
        // 1) of [B, T, H, hd], then copies rows of hd elements instead of single elements.
        std::vector<int64_t> q = perm;
        std::swap(q[rank - 1], q[rank - 2]);
        bool identity = true;
        for (size_t d = 0; d < rank; ++d) identity = identity && q[d] == static_cast<int64_t>(d);
        if (identity || readers[v] != 1 || rewritten[p]) continue;
        const Shape& in = values[u].type.shape;
        Shape out(rank);
        for (size_t d = 0; d < rank; ++d) out[d] = in[q[d]];
        steps[p].kernel = MakeTransposeKernel(in, q, values[u].type.dtype);
        values[v].type.shape = out;
        rewritten[p] = true;
        perm_of[p] = q;
        (j == 0 ? trans_a : trans_b)[t] = true;
        continue;
      }
      steps[t].inputs[j] = u;
      (j == 0 ? trans_a : trans_b)[t] = true;
      ++readers[u];
      if (--readers[v] == 0) {
        dead[p] = true;
        values[v].materialized = false;
        --readers[u];
      }
    }
  }
  // Split pieces each read by a Reshape (an alias) read by a Transpose: the Split writes each
  // piece in the Transpose's layout (attention's Q, K and V heads from one [B, T, 3d] product).
  std::vector<int> reader_of(values.size(), -1);
  for (size_t t = 0; t < steps.size(); ++t) {
    if (dead[t]) continue;
    for (int v : steps[t].inputs) {
      if (v >= 0) reader_of[v] = static_cast<int>(t);
    }
  }
  auto sole_reader = [&](int v, const char* op) {
    const int r = reader_of[v];
    return readers[v] == 1 && r >= 0 && !dead[r] && op_of(r) == op ? r : -1;
  };
  for (size_t s = 0; s < steps.size(); ++s) {
    if (dead[s] || op_of(s) != "Split" || steps[s].inputs[0] < 0) continue;
    const int whole_v = steps[s].inputs[0];
    const Shape& whole = values[whole_v].type.shape;
    std::vector<int>& outs = steps[s].outputs;
    if (values[whole_v].elements == 0) continue;
    int axis = -1;  // The split axis: where the pieces differ from the whole.
    for (size_t d = 0; d < whole.size(); ++d) {
      if (values[outs[0]].type.shape[d] != whole[d]) axis = static_cast<int>(d);
    }
    if (axis < 0) continue;
    const std::vector<int64_t> whole_strides = DenseStrides(whole);
    std::vector<StridedPiece> pieces;
    int64_t start = 0;
    bool any = false;
    for (int& w : outs) {
      StridedPiece piece{values[w].type.shape, whole_strides, start * whole_strides[axis]};
      start += values[w].type.shape[axis];
      const int r = sole_reader(w, "Reshape");
      const int u = r < 0 ? -1 : steps[r].outputs[0];
      const int p = u < 0 ? -1 : sole_reader(u, "Transpose");
      std::vector<int64_t> reshaped;
      if (p < 0 || !ReshapeStrides(piece.shape, piece.strides, values[u].type.shape, &reshaped)) {
        pieces.push_back(std::move(piece));
        continue;
      }
      const int v = steps[p].outputs[0];
      const std::vector<int64_t> perm =
          rewritten[p] ? perm_of[p]
                       : TransposePerm(spec.nodes[steps[p].node], values[u].type.shape.size());
      piece.shape = values[v].type.shape;
      piece.strides.assign(perm.size(), 0);
      for (size_t d = 0; d < perm.size(); ++d) piece.strides[d] = reshaped[perm[d]];
      pieces.push_back(std::move(piece));
      dead[r] = dead[p] = true;
      values[w].materialized = false;
      values[u].materialized = false;
      values[v].index = static_cast<int>(s);
      w = v;
      any = true;
    }
    if (any) steps[s].kernel = MakeStridedSplit(whole, values[whole_v].type.dtype, pieces);
  }
  for (size_t t = 0; t < steps.size(); ++t) {
    if (op_of(t) != "Add") continue;
    for (int j = 0; j < 2; ++j) {
      const int v = steps[t].inputs[j];
      const int c = steps[t].inputs[1 - j];
      const int p = step_of(v);
      if (p < 0 || dead[p] || bias[p] || op_of(p) != "MatMul" || readers[v] != 1) continue;
      if (!rank2(steps[p].inputs[0]) || !rank2(steps[p].inputs[1])) continue;
      const Shape& y = values[v].type.shape;
      const Shape& cs = values[c].type.shape;
      bool is_bias = !cs.empty() && cs.size() <= y.size() && cs.back() == y.back() &&
                     NumElements(cs) == y.back() && values[steps[t].outputs[0]].type.shape == y;
      if (!is_bias || step_of(c) >= p) continue;
      steps[p].inputs.push_back(c);
      steps[p].outputs[0] = steps[t].outputs[0];
      values[steps[t].outputs[0]].index = p;
      values[v].materialized = false;
      bias[p] = true;
      dead[t] = true;
      break;
    }
  }
  // Softmax over the last axis of Where(constant mask, x [* constant scalar], constant scalar).
  auto constant_scalar = [&](int v) {
    return v >= 0 && values[v].kind == ValueKind::kConstant && IsFloat(values[v].type.dtype) &&
           NumElements(values[v].type.shape) == 1;
  };
  for (size_t t = 0; t < steps.size(); ++t) {
    if (dead[t] || op_of(t) != "Softmax") continue;
    const int v = steps[t].inputs[0];
    const Shape& shape = values[v].type.shape;
    const int rank = static_cast<int>(shape.size());
    int64_t axis = -1;
    for (const AttributeSpec& a : spec.nodes[steps[t].node].attributes) {
      if (a.name == "axis") axis = std::get<int64_t>(a.value);
    }
    if (rank == 0 || (axis != -1 && axis != rank - 1)) continue;
    const int w = step_of(v);
    if (w < 0 || dead[w] || op_of(w) != "Where" || readers[v] != 1) continue;
    const int mask = steps[w].inputs[0];
    int x = steps[w].inputs[1];
    const int fill = steps[w].inputs[2];
    const Shape& mask_shape = values[mask].type.shape;
    if (values[mask].kind != ValueKind::kConstant || !constant_scalar(fill) ||
        values[x].type.shape != shape || mask_shape.size() > shape.size() ||
        (!mask_shape.empty() && mask_shape.back() != shape.back() && mask_shape.back() != 1)) {
      continue;
    }
    int scale = -1;
    const int m = step_of(x);
    if (m >= 0 && !dead[m] && op_of(m) == "Mul" && readers[x] == 1) {
      for (int j = 0; j < 2; ++j) {
        const int a = steps[m].inputs[j], b = steps[m].inputs[1 - j];
        if (constant_scalar(b) && values[a].type.shape == shape && scale < 0) {
          dead[m] = true;
          values[x].materialized = false;
          scale = b;
          x = a;
        }
      }
    }
    dead[w] = true;
    values[v].materialized = false;
    steps[t].inputs = {x, scale, mask, fill};
    steps[t].kernel = MakeMaskedSoftmax(shape, mask_shape, scale >= 0);
  }
  // Rebuild the fused kernels, then drop the dead steps (indices shift down).
  for (size_t t = 0; t < steps.size(); ++t) {
    if (dead[t] || !(trans_a[t] || trans_b[t] || bias[t])) continue;
    steps[t].kernel = MakeFusedMatMul(values[steps[t].inputs[0]].type.shape, trans_a[t],
                                      values[steps[t].inputs[1]].type.shape, trans_b[t], bias[t]);
  }
  std::vector<Step> kept;
  for (size_t t = 0; t < steps.size(); ++t) {
    if (dead[t]) continue;
    for (int v : steps[t].outputs) values[v].index = static_cast<int>(kept.size());
    kept.push_back(std::move(steps[t]));
  }
  steps = std::move(kept);
}

int Graph::FindParameter(absl::string_view name) const {
  auto it = parameter_index_.find(std::string(name));
  return it == parameter_index_.end() ? -1 : it->second;
}

int Graph::FindInput(absl::string_view name) const {
  auto it = input_index_.find(std::string(name));
  return it == input_index_.end() ? -1 : it->second;
}

const void* Graph::constant_data(int v) const {
  return constant_storage_[constant_slot_[v]].data();
}

absl::StatusOr<Graph> Graph::Create(GraphSpec spec, const PlanOptions& options) {
  const GraphLimits& limits = options.limits;
  // Limits first, from the spec's sizes alone.
  if (static_cast<int64_t>(spec.nodes.size()) > limits.max_nodes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "graph.nodes: ", spec.nodes.size(), " nodes, over the limit of ", limits.max_nodes));
  }
  int64_t num_values =
      static_cast<int64_t>(spec.inputs.size() + spec.parameters.size() + spec.constants.size());
  for (const NodeSpec& node : spec.nodes) num_values += static_cast<int64_t>(node.outputs.size());
  if (num_values > limits.max_values) {
    return absl::ResourceExhaustedError(
        absl::StrCat("graph: ", num_values,
                     " values (inputs, parameters, constants and node outputs), over the "
                     "limit of ",
                     limits.max_values));
  }
  if (!IsFloat(options.dtype)) return Invalid("dtype", "must be float32 or float64");
  if (options.input_shapes.size() != spec.inputs.size()) {
    return Invalid("inputs", absl::StrCat(options.input_shapes.size(), " tensors for ",
                                          spec.inputs.size(), " graph inputs"));
  }

  Graph g;
  g.spec_ = std::move(spec);  // Moved, not copied, when the caller gives it up.
  g.dtype_ = options.dtype;
  const GraphSpec& s = g.spec_;
  std::vector<ValueInfo>& values = g.values_;
  values.reserve(num_values);
  std::unordered_map<std::string_view, int> by_name;
  std::vector<std::string> defined_by;  // The field that defined each value, for messages.
  auto define = [&](const std::string& name, std::string field, ValueInfo info) -> absl::Status {
    if (name.empty()) return Invalid(absl::StrCat(field, ".name"), "empty");
    auto [it, inserted] = by_name.emplace(name, static_cast<int>(values.size()));
    if (!inserted) {
      return Invalid(field, absl::StrCat("value \"", name, "\" is already defined by ",
                                         defined_by[it->second]));
    }
    info.name = name;
    values.push_back(std::move(info));
    defined_by.push_back(std::move(field));
    return absl::OkStatus();
  };

  // Plan-time data of constants (and folded Constant nodes), by value id.
  std::vector<ConstantValue> constant_values;
  constant_values.reserve(s.constants.size() + s.nodes.size());
  g.constant_slot_.assign(num_values, -1);
  std::vector<int> constant_of(num_values, -1);

  for (size_t i = 0; i < s.inputs.size(); ++i) {
    const InputSpec& in = s.inputs[i];
    const std::string field = absl::StrCat("graph.inputs[", i, "]");
    if (in.dtype == DType::kBool || (IsFloat(in.dtype) && in.dtype != options.dtype)) {
      return Invalid(absl::StrCat(field, ".dtype"),
                     absl::StrCat(DTypeName(in.dtype), " input in a ", DTypeName(options.dtype),
                                  " call (inputs are the call's float dtype or int64)"));
    }
    RETURN_IF_ERROR(
        CheckShape(options.input_shapes[i], limits, absl::StrCat("inputs[", i, "].shape")));
    ValueInfo v;
    v.type = {in.dtype, options.input_shapes[i]};
    v.kind = ValueKind::kInput;
    v.index = static_cast<int>(i);
    RETURN_IF_ERROR(define(in.name, field, std::move(v)));
    g.input_values_.push_back(static_cast<int>(values.size()) - 1);
    g.input_index_[in.name] = static_cast<int>(i);
  }
  for (size_t p = 0; p < s.parameters.size(); ++p) {
    const std::string field = absl::StrCat("graph.parameters[", p, "]");
    RETURN_IF_ERROR(CheckShape(s.parameters[p].shape, limits, absl::StrCat(field, ".shape")));
    ValueInfo v;
    v.type = {options.dtype, s.parameters[p].shape};
    v.kind = ValueKind::kParameter;
    v.index = static_cast<int>(p);
    RETURN_IF_ERROR(define(s.parameters[p].name, field, std::move(v)));
    g.parameter_values_.push_back(static_cast<int>(values.size()) - 1);
    g.parameter_index_[s.parameters[p].name] = static_cast<int>(p);
  }
  // Constants are held once, in the call's dtype (constant_storage_); ops that read one at plan
  // time (shapes, axes, exponents) see its values only if it is small.
  auto add_constant = [&](int value, ConstantValue c) {
    g.constant_slot_[value] = static_cast<int>(g.constant_storage_.size());
    g.constant_storage_.push_back(ConstantBytes(c, options.dtype));
    g.costs_.constant_bytes += static_cast<int64_t>(g.constant_storage_.back().size() * 8);
    constant_of[value] = static_cast<int>(constant_values.size());
    if (NumElements(c.shape) > kPlanTimeConstantElements) c.ints.clear(), c.floats.clear();
    constant_values.push_back(std::move(c));
  };
  for (size_t k = 0; k < s.constants.size(); ++k) {
    const ConstantSpec& c = s.constants[k];
    const std::string field = absl::StrCat("graph.constants[", k, "]");
    RETURN_IF_ERROR(CheckShape(c.shape, limits, absl::StrCat(field, ".shape")));
    const int64_t n = NumElements(c.shape);
    const size_t given = IsFloat(c.dtype) ? c.floats.size() : c.ints.size();
    if (static_cast<int64_t>(given) != n) {
      return Invalid(absl::StrCat(field, ".data"),
                     absl::StrCat("expected ", n, " values for shape ", ShapeString(c.shape),
                                  ", got ", given));
    }
    if (c.dtype == DType::kBool) {
      for (int64_t x : c.ints) {
        if (x != 0 && x != 1)
          return Invalid(absl::StrCat(field, ".data"), "bool values must be 0 or 1");
      }
    }
    ValueInfo v;
    v.type = {IsFloat(c.dtype) ? options.dtype : c.dtype, c.shape};
    v.kind = ValueKind::kConstant;
    v.index = static_cast<int>(k);
    RETURN_IF_ERROR(define(c.name, field, std::move(v)));
    add_constant(static_cast<int>(values.size()) - 1, {c.dtype, c.shape, c.ints, c.floats});
  }
  for (ConstantSpec& c : g.spec_.constants) {  // Converted above: not kept twice.
    std::vector<double>().swap(c.floats);
    std::vector<int64_t>().swap(c.ints);
  }

  // Node outputs; then every input reference resolved, and the edges of the sort.
  const int num_nodes = static_cast<int>(s.nodes.size());
  std::vector<const OpInfo*> ops(num_nodes);
  std::vector<int> num_outputs(num_nodes);
  std::vector<std::vector<int>> node_outputs(num_nodes);
  std::vector<int> producer;  // By value id: the producing node, -1 otherwise.
  for (int i = 0; i < num_nodes; ++i) {
    const NodeSpec& node = s.nodes[i];
    const std::string where = NodeWhere(node, i);
    ops[i] = FindOp(node.op_type);
    if (ops[i] == nullptr) {
      return Invalid(absl::StrCat(where, ".op_type"),
                     absl::StrCat("unknown operator \"", node.op_type,
                                  "\" (supported: ", absl::StrJoin(SupportedOps(), ", "), ")"));
    }
    // Trailing "" outputs are optional outputs left out.
    int outs = static_cast<int>(node.outputs.size());
    while (outs > 0 && node.outputs[outs - 1].empty()) --outs;
    num_outputs[i] = outs;
    const int ins = static_cast<int>(node.inputs.size());
    if (ins < ops[i]->min_inputs || ins > ops[i]->max_inputs) {
      return Invalid(absl::StrCat(where, ".inputs"),
                     absl::StrCat(node.op_type, " takes ", ops[i]->min_inputs, " to ",
                                  ops[i]->max_inputs, " inputs, got ", ins));
    }
    if (outs < ops[i]->min_outputs || outs > ops[i]->max_outputs) {
      return Invalid(absl::StrCat(where, ".outputs"),
                     absl::StrCat(node.op_type, " has ", ops[i]->min_outputs, " to ",
                                  ops[i]->max_outputs, " outputs, got ", outs));
    }
    for (int o = 0; o < outs; ++o) {
      ValueInfo v;
      v.kind = ValueKind::kNode;
      v.node = i;
      v.slot = o;
      RETURN_IF_ERROR(
          define(node.outputs[o], absl::StrCat(where, ".outputs[", o, "]"), std::move(v)));
      node_outputs[i].push_back(static_cast<int>(values.size()) - 1);
    }
  }
  producer.assign(values.size(), -1);
  for (int i = 0; i < num_nodes; ++i) {
    for (int v : node_outputs[i]) producer[v] = i;
  }
  std::vector<std::vector<int>> node_inputs(num_nodes);
  std::vector<int> indegree(num_nodes, 0);
  std::vector<std::vector<int>> consumers(num_nodes);
  for (int i = 0; i < num_nodes; ++i) {
    const NodeSpec& node = s.nodes[i];
    for (size_t j = 0; j < node.inputs.size(); ++j) {
      if (node.inputs[j].empty()) {
        node_inputs[i].push_back(-1);
        continue;
      }
      auto it = by_name.find(node.inputs[j]);
      if (it == by_name.end()) {
        return Invalid(absl::StrCat(NodeWhere(node, i), ".inputs[", j, "]"),
                       absl::StrCat("value \"", node.inputs[j],
                                    "\" is not defined (no graph input, parameter, constant or "
                                    "node output has that name)"));
      }
      node_inputs[i].push_back(it->second);
      if (const int p = producer[it->second]; p >= 0) {
        ++indegree[i];
        consumers[p].push_back(i);
      }
    }
  }

  // Kahn's algorithm, lowest spec index first among the ready nodes.
  std::vector<int> order;
  order.reserve(num_nodes);
  {
    std::priority_queue<int, std::vector<int>, std::greater<int>> ready;
    for (int i = 0; i < num_nodes; ++i) {
      if (indegree[i] == 0) ready.push(i);
    }
    while (!ready.empty()) {
      const int i = ready.top();
      ready.pop();
      order.push_back(i);
      for (int c : consumers[i]) {
        if (--indegree[c] == 0) ready.push(c);
      }
    }
  }
  if (static_cast<int>(order.size()) < num_nodes) {
    for (int i = 0; i < num_nodes; ++i) {
      if (indegree[i] > 0) {
        return Invalid(NodeWhere(s.nodes[i], i),
                       "is on a cycle (or depends on one): its inputs can never all be computed");
      }
    }
  }

  // Inference, in order. Constant nodes become constants.
  std::vector<int> step_of_node(num_nodes, -1);
  for (int i : order) {
    const NodeSpec& node = s.nodes[i];
    std::vector<const ValueType*> in_types;
    std::vector<const ConstantValue*> in_constants;
    for (int v : node_inputs[i]) {
      in_types.push_back(v < 0 ? nullptr : &values[v].type);
      const bool readable = v >= 0 && constant_of[v] >= 0 &&
                            NumElements(values[v].type.shape) <= kPlanTimeConstantElements;
      in_constants.push_back(readable ? &constant_values[constant_of[v]] : nullptr);
    }
    OpContext context(node, i, options.dtype, std::move(in_types), std::move(in_constants));
    if (node.op_type == "Constant") {
      ASSIGN_OR_RETURN(ConstantValue c, ConstantNodeValue(context));
      const int v = node_outputs[i][0];
      values[v].type = {IsFloat(c.dtype) ? options.dtype : c.dtype, c.shape};
      values[v].kind = ValueKind::kConstant;
      values[v].index = -1;
      add_constant(v, std::move(c));
      continue;
    }
    std::vector<ValueType> out_types;
    ASSIGN_OR_RETURN(std::unique_ptr<OpKernel> kernel, ops[i]->factory(context, &out_types));
    if (static_cast<int>(out_types.size()) != num_outputs[i]) {
      return absl::InternalError(absl::StrCat(context.where(), ": inferred ", out_types.size(),
                                              " outputs for ", num_outputs[i]));
    }
    for (int o = 0; o < num_outputs[i]; ++o) {
      RETURN_IF_ERROR(CheckShape(out_types[o].shape, limits,
                                 absl::StrCat(context.where(), ".outputs[", o, "]")));
    }
    // Note [Constant folding]: a node whose inputs are all constants (a causal mask made by
    // Trilu, a Where on constants...) is computed now, by its own kernel in the call's dtype,
    // and its outputs become constants: nothing to run per call, and they do not count as live
    // values between segments (Note [Graph checkpointing]). Only cheap nodes are folded, so
    // planning stays bounded; Dropout never is (its masks depend on the call). An input whose
    // data the kernel never reads (OpKernel::shape_only_inputs: Shape's) need not be constant,
    // since every value's shape is known here: torch.onnx's exports compute shapes from the
    // inputs' (Shape -> Gather -> Unsqueeze -> Concat -> Reshape), and the whole chain folds to
    // the constant shape Reshape needs, for each call's input shapes.
    bool foldable = node.op_type != "Dropout" && kernel->forward_flops() <= kFoldFlops;
    int64_t out_elements = 0;
    for (const ValueType& t : out_types) out_elements += NumElements(t.shape);
    foldable = foldable && out_elements <= kFoldElements;
    const uint32_t shape_only = kernel->shape_only_inputs();
    const auto reads_data = [&](size_t j) { return !InputBit(shape_only, j); };
    for (size_t j = 0; j < node_inputs[i].size(); ++j) {
      const int v = node_inputs[i][j];
      foldable = foldable && (v < 0 || constant_of[v] >= 0 || !reads_data(j));
    }
    if (foldable) {
      std::vector<std::vector<uint64_t>> buffers;
      std::vector<void*> out_ptrs;
      for (const ValueType& t : out_types) {
        buffers.emplace_back((NumElements(t.shape) * DTypeSize(t.dtype) + 7) / 8 + 1, 0);
        out_ptrs.push_back(buffers.back().data());
      }
      std::vector<const void*> in_ptrs;
      for (size_t j = 0; j < node_inputs[i].size(); ++j) {
        const int v = node_inputs[i][j];
        in_ptrs.push_back(v >= 0 && reads_data(j) ? g.constant_data(v) : nullptr);
      }
      std::vector<double> saved(kernel->saved_elements() + 1);
      const CallContext call;
      const absl::Status folded =
          options.dtype == DType::kFloat32
              ? kernel->Forward(ForwardArgs<float>{in_ptrs.data(), out_ptrs.data(),
                                                   reinterpret_cast<float*>(saved.data()), &call})
              : kernel->Forward(
                    ForwardArgs<double>{in_ptrs.data(), out_ptrs.data(), saved.data(), &call});
      RETURN_IF_ERROR(folded);
      for (int o = 0; o < num_outputs[i]; ++o) {
        const int v = node_outputs[i][o];
        values[v].type = out_types[o];
        values[v].kind = ValueKind::kConstant;
        values[v].index = -1;
        g.constant_slot_[v] = static_cast<int>(g.constant_storage_.size());
        g.costs_.constant_bytes += static_cast<int64_t>(buffers[o].size() * 8);
        constant_of[v] = static_cast<int>(constant_values.size());
        constant_values.push_back(
            NumElements(out_types[o].shape) <= kPlanTimeConstantElements
                ? ConstantFromBytes(buffers[o].data(), out_types[o])
                : ConstantValue{out_types[o].dtype, out_types[o].shape, {}, {}});
        g.constant_storage_.push_back(std::move(buffers[o]));
      }
      continue;
    }
    Step step;
    step.node = i;
    step.kernel = std::move(kernel);
    step.inputs = node_inputs[i];
    step.outputs = node_outputs[i];
    const int step_index = static_cast<int>(g.steps_.size());
    for (int o = 0; o < num_outputs[i]; ++o) {
      ValueInfo& v = values[step.outputs[o]];
      v.type = out_types[o];
      v.index = step_index;
    }
    step_of_node[i] = step_index;
    g.steps_.push_back(std::move(step));
  }
  for (ValueInfo& v : values) v.elements = NumElements(v.type.shape);
  if (options.fuse) Fuse(by_name, &g);
  for (size_t v = 0; v < values.size(); ++v) values[v].alias_root = static_cast<int>(v);
  for (const Step& step : g.steps_) {
    if (step.kernel->output_aliases_input() && step.inputs[0] >= 0) {
      values[step.outputs[0]].alias_root = values[step.inputs[0]].alias_root;
    }
  }

  // Uses in the forward pass.
  std::vector<int> uses(values.size(), 0);
  for (int t = 0; t < static_cast<int>(g.steps_.size()); ++t) {
    for (int v : g.steps_[t].inputs) {
      if (v < 0) continue;
      values[v].last_forward_use = t;
      ++uses[v];
    }
  }
  for (size_t p = 0; p < s.parameters.size(); ++p) {
    if (uses[g.parameter_values_[p]] == 0) {
      return Invalid(absl::StrCat("graph.parameters[", p, "] (\"", s.parameters[p].name, "\")"),
                     "is never used by any node");
    }
  }

  // Outputs and loss.
  std::unordered_map<int, int> output_seen;  // Value id -> output index.
  for (size_t o = 0; o < s.outputs.size(); ++o) {
    const std::string field = absl::StrCat("graph.outputs[", o, "]");
    auto it = by_name.find(s.outputs[o]);
    if (it == by_name.end()) {
      return Invalid(field, absl::StrCat("value \"", s.outputs[o], "\" is not defined"));
    }
    if (!output_seen.emplace(it->second, static_cast<int>(o)).second) {
      return Invalid(field, absl::StrCat("\"", s.outputs[o], "\" is already graph.outputs[",
                                         output_seen[it->second], "]"));
    }
    g.output_values_.push_back(it->second);
  }
  const GraphLossSpec& loss = s.loss;
  {
    auto it = std::find(s.outputs.begin(), s.outputs.end(), loss.output);
    if (it == s.outputs.end()) {
      return Invalid("graph.loss.output",
                     absl::StrCat("\"", loss.output, "\" is not one of graph.outputs"));
    }
    g.loss_output_ = g.output_values_[it - s.outputs.begin()];
    const ValueInfo& out = values[g.loss_output_];
    if (out.kind != ValueKind::kNode || !IsFloat(out.type.dtype)) {
      return Invalid(
          "graph.loss.output",
          absl::StrCat("\"", loss.output, "\" must be a floating value computed by a node"));
    }
    g.loss_target_input_ = g.FindInput(loss.target);
    if (g.loss_target_input_ < 0) {
      return Invalid("graph.loss.target",
                     absl::StrCat("\"", loss.target, "\" is not a graph input"));
    }
    const ValueType& target = values[g.input_values_[g.loss_target_input_]].type;
    const Shape& shape = out.type.shape;
    if (loss.kind == LossKind::kCrossEntropy) {
      if (shape.size() < 2) {
        return Invalid("graph.loss.output",
                       absl::StrCat("cross-entropy needs logits of rank >= 2 (classes last), got ",
                                    ShapeString(shape)));
      }
      const Shape expected(shape.begin(), shape.end() - 1);
      if (target.dtype != DType::kInt64 || target.shape != expected) {
        return Invalid(
            "graph.loss.target",
            absl::StrCat("cross-entropy needs int64 class indices of shape ", ShapeString(expected),
                         ", got ", DTypeName(target.dtype), " ", ShapeString(target.shape)));
      }
    } else if (target.dtype != options.dtype || target.shape != shape) {
      return Invalid("graph.loss.target",
                     absl::StrCat("expected ", DTypeName(options.dtype), " ", ShapeString(shape),
                                  " (the shape of graph.loss.output), got ",
                                  DTypeName(target.dtype), " ", ShapeString(target.shape)));
    }
    if (loss.kind == LossKind::kHuber &&
        !(loss.huber_delta > 0 && std::isfinite(loss.huber_delta))) {
      return Invalid("graph.loss.huber_delta", "must be positive and finite");
    }
  }
  g.input_grad_requested_.assign(s.inputs.size(), false);
  for (size_t r = 0; r < options.input_gradients.size(); ++r) {
    const int i = g.FindInput(options.input_gradients[r]);
    if (i < 0 || !IsFloat(s.inputs[i].dtype)) {
      return Invalid(
          absl::StrCat("input_gradients[", r, "]"),
          absl::StrCat("\"", options.input_gradients[r], "\" is not a floating graph input"));
    }
    g.input_grad_requested_[i] = true;
  }

  // Which values get a gradient: they depend on a parameter or requested input (forward) and
  // the loss depends on them (backward).
  std::vector<bool> depends(values.size(), false), on_path(values.size(), false);
  for (int v : g.parameter_values_) depends[v] = true;
  for (size_t i = 0; i < s.inputs.size(); ++i)
    depends[g.input_values_[i]] = g.input_grad_requested_[i];
  for (const Step& step : g.steps_) {
    bool any = false;
    for (size_t j = 0; j < step.inputs.size(); ++j) {
      const int v = step.inputs[j];
      if (v >= 0 && InputBit(step.kernel->differentiable_inputs(), j) && depends[v]) any = true;
    }
    for (int v : step.outputs) depends[v] = any && IsFloat(values[v].type.dtype);
  }
  on_path[g.loss_output_] = true;
  for (int t = static_cast<int>(g.steps_.size()) - 1; t >= 0; --t) {
    const Step& step = g.steps_[t];
    bool any = false;
    for (int v : step.outputs) any = any || on_path[v];
    if (!any) continue;
    for (size_t j = 0; j < step.inputs.size(); ++j) {
      const int v = step.inputs[j];
      if (v >= 0 && InputBit(step.kernel->differentiable_inputs(), j)) on_path[v] = true;
    }
  }
  for (size_t v = 0; v < values.size(); ++v) values[v].needs_grad = depends[v] && on_path[v];
  for (int t = 0; t < static_cast<int>(g.steps_.size()); ++t) {
    Step& step = g.steps_[t];
    for (size_t j = 0; j < step.inputs.size(); ++j) {
      const int v = step.inputs[j];
      if (v >= 0 && InputBit(step.kernel->differentiable_inputs(), j) && values[v].needs_grad) {
        step.backward = true;
      }
    }
    if (!step.backward) continue;
    // Keep what this backward reads.
    auto keep = [&](int v) {
      if (v < 0 || values[v].kind != ValueKind::kNode) return;
      values[v].kept = true;
      if (values[v].first_backward_use < 0) values[v].first_backward_use = t;
    };
    for (size_t j = 0; j < step.inputs.size(); ++j) {
      if (InputBit(step.kernel->backward_reads_inputs(), j)) keep(step.inputs[j]);
    }
    for (size_t o = 0; o < step.outputs.size(); ++o) {
      if (InputBit(step.kernel->backward_reads_outputs(), o)) keep(step.outputs[o]);
    }
  }

  RETURN_IF_ERROR(g.PlanSchedule(options));
  g.SimulateCosts();
  return g;
}

absl::Status Graph::PlanSchedule(const PlanOptions& options) {
  std::vector<ValueInfo>& values = values_;
  const int n = static_cast<int>(steps_.size());
  std::vector<bool> held(values.size(), false);
  for (int v : output_values_) held[v] = true;
  held[loss_output_] = true;
  auto is_node = [&](int v) {
    return values[v].kind == ValueKind::kNode && values[v].materialized;
  };

  // Cut points: after step t, the values produced at or before t that are still needed (read
  // later, or held to the loss) are exactly t's single output. A sweep: O(steps + values).
  std::vector<int> live_delta(n + 1, 0);
  auto death = [&](int v) {
    return held[v] ? n : std::max(values[v].index, values[v].last_forward_use);
  };
  for (size_t v = 0; v < values.size(); ++v) {
    if (!is_node(static_cast<int>(v))) continue;
    const int p = values[v].index;
    const int d = death(static_cast<int>(v));
    if (d > p) {
      ++live_delta[p];
      --live_delta[d];
    }
  }
  cut_points_.clear();
  int live = 0;
  for (int t = 0; t + 1 < n; ++t) {
    live += live_delta[t];
    if (live == 1 && steps_[t].outputs.size() == 1 && death(steps_[t].outputs[0]) > t) {
      cut_points_.push_back(t);
    }
  }

  // Segments: a boundary after every k-th cut point (k = 0: none).
  const int64_t cuts = static_cast<int64_t>(cut_points_.size());
  switch (options.checkpoint) {
    case CheckpointMode::kNone:
      BuildSchedule(0, held);
      return absl::OkStatus();
    case CheckpointMode::kSqrt:
      BuildSchedule(static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(cuts + 1)))),
                    held);
      return absl::OkStatus();
    case CheckpointMode::kEveryK:
      if (options.every_k < 1) return Invalid("checkpoint.every_k", "must be at least 1");
      BuildSchedule(options.every_k, held);
      return absl::OkStatus();
    case CheckpointMode::kMemoryBudget:
      break;
  }
  // MEMORY_BUDGET: the plan that recomputes least among those whose replayed peak fits: no
  // checkpointing, and a boundary every k cut points for k = 1, 2, 3, 4, 6, 8, 12, ... (about
  // 2 log2(cuts) candidates, SQRT's k among them, so it never recomputes more than SQRT when
  // SQRT fits). Each candidate costs one schedule and one replay: O(log(cuts) (steps + values)).
  if (options.memory_budget_bytes <= 0) {
    return Invalid("checkpoint.memory_budget_bytes", "must be positive");
  }
  std::vector<int64_t> candidates = {0};
  for (int64_t k = 1; k <= cuts; k = k < 4 ? k + 1 : k + k / 2) candidates.push_back(k);
  candidates.push_back(static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(cuts + 1)))));
  int64_t best_k = -1, best_recomputed = 0, least_peak = -1, least_k = 0;
  for (int64_t k : candidates) {
    if (k > cuts) continue;
    BuildSchedule(k, held);
    SimulateCosts();
    if (least_peak < 0 || costs_.peak_bytes < least_peak) {
      least_peak = costs_.peak_bytes;
      least_k = k;
    }
    if (costs_.peak_bytes <= options.memory_budget_bytes &&
        (best_k < 0 || costs_.steps_recomputed < best_recomputed)) {
      best_k = k;
      best_recomputed = costs_.steps_recomputed;
    }
  }
  if (best_k < 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("checkpoint.memory_budget_bytes: ", options.memory_budget_bytes,
                     " bytes is less than any plan needs (the least is ", least_peak,
                     " bytes, a segment every ", least_k, " cut points)"));
  }
  BuildSchedule(best_k, held);
  return absl::OkStatus();
}

// Segments with a boundary after every k-th cut point (none for k = 0), the last one stored,
// and when each buffer is released in each pass.
void Graph::BuildSchedule(int64_t k, const std::vector<bool>& held) {
  std::vector<ValueInfo>& values = values_;
  const int n = static_cast<int>(steps_.size());
  auto is_node = [&](int v) {
    return values[v].kind == ValueKind::kNode && values[v].materialized;
  };
  schedule_ = Schedule();
  costs_.steps_recomputed = 0;
  Schedule& sch = schedule_;
  int begin = 0;
  if (k > 0) {
    for (size_t c = static_cast<size_t>(k) - 1; c < cut_points_.size(); c += k) {
      sch.segments.push_back({begin, cut_points_[c] + 1, true});
      begin = cut_points_[c] + 1;
    }
  }
  sch.segments.push_back({begin, n, false});
  const int num_segments = static_cast<int>(sch.segments.size());
  sch.segment_of.assign(n, 0);
  for (int s = 0; s < num_segments; ++s) {
    for (int t = sch.segments[s].begin; t < sch.segments[s].end; ++t) sch.segment_of[t] = s;
    if (sch.segments[s].recompute) {
      costs_.steps_recomputed += sch.segments[s].end - sch.segments[s].begin;
    }
  }
  sch.release_after_forward.assign(n, {});
  sch.release_after_recompute.assign(n, {});
  sch.release_after_backward.assign(n, {});
  sch.release_after_segment.assign(num_segments, {});

  // The lowest step of its own segment whose backward reads each value (-1: none).
  std::vector<int> own_reader(values.size(), -1);
  for (int t = 0; t < n; ++t) {
    const Step& step = steps_[t];
    if (!step.backward) continue;
    auto note = [&](int v) {
      if (v < 0 || !is_node(v) || sch.segment_of[values[v].index] != sch.segment_of[t]) return;
      if (own_reader[v] < 0) own_reader[v] = t;
    };
    for (size_t j = 0; j < step.inputs.size(); ++j) {
      if (InputBit(step.kernel->backward_reads_inputs(), j)) note(step.inputs[j]);
    }
    for (size_t o = 0; o < step.outputs.size(); ++o) {
      if (InputBit(step.kernel->backward_reads_outputs(), o)) note(step.outputs[o]);
    }
  }
  for (size_t vi = 0; vi < values.size(); ++vi) {
    const int v = static_cast<int>(vi);
    if (!is_node(v)) continue;
    const ValueInfo& info = values[v];
    const int p = info.index;
    const int s = sch.segment_of[p];
    const Segment& seg = sch.segments[s];
    const bool boundary = s + 1 < num_segments && p == seg.end - 1;
    const int forward_end = std::max(info.last_forward_use, p);
    if (!seg.recompute) {
      if (boundary && sch.segments[s + 1].recompute) {
        // The next segment restarts from it: held until that segment's backward is done, or
        // later if this segment's backward reads it.
        if (own_reader[v] >= 0) {
          sch.release_after_backward[own_reader[v]].push_back(v);
        } else {
          sch.release_after_segment[s + 1].push_back(v);
        }
      } else if (info.kept) {
        sch.release_after_backward[info.first_backward_use].push_back(v);
      } else if (held[v]) {
        sch.release_after_loss.push_back(v);
      } else {
        sch.release_after_forward[forward_end].push_back(v);
      }
      continue;
    }
    // A recomputed segment: the first pass keeps only the boundary...
    if (boundary) {
      sch.release_after_segment[s + 1].push_back(v);
    } else if (held[v]) {
      sch.release_after_loss.push_back(v);
    } else {
      sch.release_after_forward[forward_end].push_back(v);
    }
    // ... and the rerun keeps what this segment's backward reads.
    if (own_reader[v] >= 0) {
      sch.release_after_backward[own_reader[v]].push_back(v);
    } else {
      sch.release_after_recompute[boundary ? p : forward_end].push_back(v);
    }
  }
}

// Replays the executor's schedule (executor.cc) on sizes alone: what it allocates and releases,
// in the same order, so the peak is exactly what a run will hold (op workspaces included as
// declared). Aliases share their root's buffer, free when its last holder is released.
void Graph::SimulateCosts() {
  const std::vector<ValueInfo>& values = values_;
  const Schedule& sch = schedule_;
  const int64_t t_size = DTypeSize(dtype_);
  auto bytes = [&](int v) { return values[v].elements * DTypeSize(values[v].type.dtype); };
  PlanCosts& costs = costs_;
  costs.forward_flops = costs.backward_flops = 0;
  costs.kept_bytes = costs.peak_bytes = 0;
  int64_t live = 0, peak = 0;
  std::vector<int> holders(values.size(), 0);
  auto hold = [&](int v) {
    const int root = values[v].alias_root;
    if (values[root].kind != ValueKind::kNode) return;
    if (holders[root]++ == 0) live += bytes(root);
  };
  auto drop = [&](int v) {
    const int root = values[v].alias_root;
    if (values[root].kind != ValueKind::kNode) return;
    if (--holders[root] == 0) live -= bytes(root);
  };
  // One forward step; `keep_saved`: its statistics stay for its backward.
  auto forward = [&](const Step& step, bool keep_saved, const std::vector<int>& release) {
    const int64_t saved = step.kernel->saved_elements() * t_size;
    for (int v : step.outputs) hold(v);
    live += saved;
    peak = std::max(peak, live + step.kernel->workspace_elements() * t_size);
    if (!keep_saved) live -= saved;
    for (int v : release) drop(v);
  };
  const int n = static_cast<int>(steps_.size());
  for (int t = 0; t < n; ++t) {
    const Step& step = steps_[t];
    costs.forward_flops += step.kernel->forward_flops();
    if (step.backward) costs.backward_flops += step.kernel->backward_flops();
    const bool recompute = sch.segments[sch.segment_of[t]].recompute;
    if (recompute) costs.backward_flops += step.kernel->forward_flops();
    forward(step, step.backward && !recompute, sch.release_after_forward[t]);
  }
  std::vector<bool> has_grad(values.size(), false);
  int64_t loss_grad = 0;
  if (values[loss_output_].needs_grad) {
    loss_grad = bytes(loss_output_);
    live += loss_grad;
    has_grad[loss_output_] = true;
  }
  peak = std::max(peak, live);
  for (int v : sch.release_after_loss) drop(v);
  costs.kept_bytes = live - loss_grad;
  for (int s = static_cast<int>(sch.segments.size()) - 1; s >= 0; --s) {
    const Segment& seg = sch.segments[s];
    if (seg.recompute) {
      for (int t = seg.begin; t < seg.end; ++t) {
        forward(steps_[t], steps_[t].backward, sch.release_after_recompute[t]);
      }
    }
    for (int t = seg.end - 1; t >= seg.begin; --t) {
      const Step& step = steps_[t];
      if (!step.backward) continue;
      int64_t transient = step.kernel->workspace_elements() * t_size;
      for (int v : step.outputs) {
        if (IsFloat(values[v].type.dtype) && !has_grad[v]) transient += bytes(v);  // Zeros.
      }
      bool handed = false;  // Output 0's gradient buffer passed through to an input.
      for (size_t j = 0; j < step.inputs.size(); ++j) {
        const int v = step.inputs[j];
        if (v < 0 || !InputBit(step.kernel->differentiable_inputs(), j) || !values[v].needs_grad) {
          continue;
        }
        if (has_grad[v]) {
          transient += bytes(v);  // A later contribution: scratch, then added.
          continue;
        }
        has_grad[v] = true;
        if (values[v].kind != ValueKind::kNode) continue;  // The caller's buffer.
        if (InputBit(step.kernel->gradient_passthrough(), j) && !handed &&
            has_grad[step.outputs[0]]) {
          handed = true;
          continue;
        }
        live += bytes(v);
      }
      peak = std::max(peak, live + transient);
      for (size_t o = 0; o < step.outputs.size(); ++o) {
        if (has_grad[step.outputs[o]] && !(o == 0 && handed)) live -= bytes(step.outputs[o]);
      }
      for (int v : sch.release_after_backward[t]) drop(v);
      live -= step.kernel->saved_elements() * t_size;
    }
    for (int v : sch.release_after_segment[s]) drop(v);
  }
  costs.peak_bytes = peak;
}

}  // namespace gradserve::engine::graph
