// Every graph operator on its own: the inferred shape, the forward pass against a naive float64
// reference, and the backward pass against finite differences (Note [Finite-difference floor]
// in graph_test_util.h), with numpy broadcasting cases; all operands are parameters, so every
// operand's gradient is checked, and the loss is sum(w * y) for a random w.
#include <cctype>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/graph_test_util.h"

namespace gradserve::engine::graph {
namespace {

using testing::Harness;
using testing::SpecBuilder;
using Data = std::vector<std::vector<double>>;

std::vector<int64_t> Unravel(int64_t flat, const Shape& shape) {
  std::vector<int64_t> index(shape.size());
  for (int d = static_cast<int>(shape.size()) - 1; d >= 0; --d) {
    index[d] = flat % shape[d];
    flat /= shape[d];
  }
  return index;
}

// The flat index in `operand` (right-aligned, size-1 axes broadcast) of an output index.
int64_t Operand(const std::vector<int64_t>& out_index, const Shape& operand) {
  int64_t flat = 0;
  const size_t offset = out_index.size() - operand.size();
  for (size_t d = 0; d < operand.size(); ++d) {
    flat = flat * operand[d] + (operand[d] == 1 ? 0 : out_index[d + offset]);
  }
  return flat;
}

struct OpCase {
  std::string name;
  std::vector<std::pair<std::string, Shape>> params;  // Float operands, all trainable.
  std::function<void(SpecBuilder&)> build;            // Defines "y" (and any constants).
  Shape expected;
  std::function<std::vector<double>(const Data&)> reference;  // Null: shape and gradients only.
  std::function<void(Data&)> prepare;                         // Adjusts the random parameters.
  int threads = 1;
  // The large cases' losses sum ~40,000 terms, whose rounding puts ~1e-9 of noise on every
  // numeric gradient: entries of ~1e-6 then report ~1e-5 (Note [Finite-difference floor]).
  double fd_tolerance = testing::kFdTolerance;
};

std::ostream& operator<<(std::ostream& os, const OpCase& c) { return os << c.name; }

// y = op(inputs...) with attributes: one node.
std::function<void(SpecBuilder&)> One(std::string op, std::vector<std::string> inputs,
                                      std::vector<AttributeSpec> attributes = {}) {
  return [=](SpecBuilder& b) { b.Node(op, inputs, {"y"}, attributes); };
}

std::function<std::vector<double>(const Data&)> UnaryRef(std::function<double(double)> f) {
  return [=](const Data& d) {
    std::vector<double> y;
    for (double x : d[0]) y.push_back(f(x));
    return y;
  };
}

std::function<std::vector<double>(const Data&)> BinaryRef(Shape a, Shape b, Shape out,
                                                          std::function<double(double, double)> f) {
  return [=](const Data& d) {
    std::vector<double> y(NumElements(out));
    for (int64_t j = 0; j < static_cast<int64_t>(y.size()); ++j) {
      const auto index = Unravel(j, out);
      y[j] = f(d[0][Operand(index, a)], d[1][Operand(index, b)]);
    }
    return y;
  };
}

void Positive(Data& d) {
  for (double& x : d[0]) x = 0.5 + std::abs(x);
}
void PositiveB(Data& d) {
  for (double& x : d[1]) x = 0.75 + std::abs(x);
}

OpCase Binary(std::string op, Shape a, Shape b, Shape out,
              std::function<double(double, double)> f) {
  std::string name = op;
  for (const Shape* s : {&a, &b}) {
    name += "_";
    for (int64_t d : *s) name += std::to_string(d) + "x";
    if (s->empty()) name += "scalar";
  }
  OpCase c{name, {{"a", a}, {"b", b}}, One(op, {"a", "b"}), out, BinaryRef(a, b, out, f), nullptr};
  if (op == "Div") c.prepare = PositiveB;
  return c;
}

// Naive matrix product over broadcast batches: a [..., m, k], b [..., k, n].
std::vector<double> NaiveMatMul(const std::vector<double>& a, const Shape& as,
                                const std::vector<double>& b, const Shape& bs, const Shape& out) {
  const int64_t m = as[as.size() - 2], k = as.back(), n = bs.back();
  const Shape a_batch(as.begin(), as.end() - 2), b_batch(bs.begin(), bs.end() - 2);
  const Shape out_batch(out.begin(), out.end() - 2);
  std::vector<double> y(NumElements(out), 0.0);
  for (int64_t bi = 0; bi < NumElements(out_batch); ++bi) {
    const auto index = Unravel(bi, out_batch);
    const int64_t ia = Operand(index, a_batch), ib = Operand(index, b_batch);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t p = 0; p < k; ++p) s += a[(ia * m + i) * k + p] * b[(ib * k + p) * n + j];
        y[(bi * m + i) * n + j] = s;
      }
    }
  }
  return y;
}

OpCase MatMul(Shape a, Shape b, Shape out) {
  std::string name = "MatMul";
  for (const Shape* s : {&a, &b}) {
    name += "_";
    for (int64_t d : *s) name += std::to_string(d) + "x";
  }
  auto ref = [=](const Data& d) {
    Shape as = a, bs = b, os = out;
    if (as.size() == 1) as.insert(as.begin(), 1), os.insert(os.end() - (b.size() == 1 ? 0 : 1), 1);
    if (bs.size() == 1) bs.push_back(1), os.push_back(1);
    return NaiveMatMul(d[0], as, d[1], bs, os);
  };
  return {name, {{"a", a}, {"b", b}}, One("MatMul", {"a", "b"}), out, ref, nullptr};
}

// Gemm reference: alpha op(A) op(B) + beta C.
OpCase Gemm(std::string name, int64_t m, int64_t n, int64_t k, bool ta, bool tb, double alpha,
            double beta, Shape c) {
  std::vector<std::pair<std::string, Shape>> params = {{"a", ta ? Shape{k, m} : Shape{m, k}},
                                                       {"b", tb ? Shape{n, k} : Shape{k, n}}};
  std::vector<std::string> inputs = {"a", "b"};
  const bool has_c = c.size() != 1 || c[0] != -1;
  if (has_c) {
    params.push_back({"c", c});
    inputs.push_back("c");
  }
  std::vector<AttributeSpec> attributes = {{"transA", int64_t{ta}}, {"transB", int64_t{tb}}};
  if (alpha != 1.0) attributes.push_back({"alpha", alpha});
  if (beta != 1.0) attributes.push_back({"beta", beta});
  auto ref = [=](const Data& d) {
    std::vector<double> y(m * n);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t p = 0; p < k; ++p) {
          s += d[0][ta ? p * m + i : i * k + p] * d[1][tb ? j * k + p : p * n + j];
        }
        y[i * n + j] = alpha * s + (has_c ? beta * d[2][Operand({i, j}, c)] : 0.0);
      }
    }
    return y;
  };
  return {name, params, One("Gemm", inputs, attributes), {m, n}, ref, nullptr};
}

// Normalisation over the trailing axes from `axis`; rms drops the mean.
std::function<std::vector<double>(const Data&)> NormRef(Shape x, int axis, bool rms, bool bias) {
  return [=](const Data& d) {
    int64_t n = 1;
    for (size_t a = axis; a < x.size(); ++a) n *= x[a];
    std::vector<double> y(d[0].size());
    for (size_t r = 0; r < d[0].size() / n; ++r) {
      double mean = 0, var = 0;
      for (int64_t j = 0; j < n; ++j) mean += d[0][r * n + j] / n;
      if (rms) mean = 0;
      for (int64_t j = 0; j < n; ++j) var += std::pow(d[0][r * n + j] - mean, 2) / n;
      for (int64_t j = 0; j < n; ++j) {
        y[r * n + j] =
            (d[0][r * n + j] - mean) / std::sqrt(var + 1e-5) * d[1][j] + (bias ? d[2][j] : 0.0);
      }
    }
    return y;
  };
}

std::function<std::vector<double>(const Data&)> SoftmaxRef(Shape x, int axis) {
  return [=](const Data& d) {
    std::vector<double> y(d[0].size());
    int64_t inner = 1;
    for (size_t a = axis + 1; a < x.size(); ++a) inner *= x[a];
    const int64_t len = x[axis];
    for (size_t o = 0; o < d[0].size() / (len * inner); ++o) {
      for (int64_t i = 0; i < inner; ++i) {
        double s = 0;
        for (int64_t j = 0; j < len; ++j) s += std::exp(d[0][(o * len + j) * inner + i]);
        for (int64_t j = 0; j < len; ++j) {
          y[(o * len + j) * inner + i] = std::exp(d[0][(o * len + j) * inner + i]) / s;
        }
      }
    }
    return y;
  };
}

std::vector<OpCase> Cases() {
  std::vector<OpCase> cases;
  const Shape s34 = {3, 4};
  auto unary = [&](std::string op, std::function<double(double)> f,
                   std::vector<AttributeSpec> attributes = {}, std::string suffix = "") {
    cases.push_back(
        {op + suffix, {{"a", s34}}, One(op, {"a"}, attributes), s34, UnaryRef(f), nullptr});
  };
  unary("Neg", [](double x) { return -x; });
  unary("Relu", [](double x) { return x > 0 ? x : 0; });
  unary("LeakyRelu", [](double x) { return x > 0 ? x : 0.2 * x; }, {{"alpha", 0.2}});
  unary("Sigmoid", [](double x) { return 1 / (1 + std::exp(-x)); });
  unary("Tanh", [](double x) { return std::tanh(x); });
  unary("Gelu", [](double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); });
  unary(
      "Gelu",
      [](double x) {
        return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
      },
      {{"approximate", std::string("tanh")}}, "Tanh");
  unary("Erf", [](double x) { return std::erf(x); });
  unary("Exp", [](double x) { return std::exp(x); });
  unary("Identity", [](double x) { return x; });
  cases.push_back({"Sqrt",
                   {{"a", s34}},
                   One("Sqrt", {"a"}),
                   s34,
                   UnaryRef([](double x) { return std::sqrt(x); }),
                   Positive});
  for (double p : {2.0, 3.0, 0.5}) {
    OpCase c{"Pow" + std::to_string(static_cast<int>(p * 10)),
             {{"a", s34}},
             [p](SpecBuilder& b) {
               b.Floats("p", {}, {p}).Node("Pow", {"a", "p"}, {"y"});
             },
             s34,
             UnaryRef([p](double x) { return std::pow(x, p); }),
             nullptr};
    if (p == 0.5) c.prepare = Positive;
    cases.push_back(c);
  }
  const auto add = [](double x, double y) { return x + y; };
  const auto sub = [](double x, double y) { return x - y; };
  const auto mul = [](double x, double y) { return x * y; };
  const auto div = [](double x, double y) { return x / y; };
  cases.push_back(Binary("Add", {2, 3}, {2, 3}, {2, 3}, add));
  cases.push_back(Binary("Add", {4, 3}, {3}, {4, 3}, add));              // A bias.
  cases.push_back(Binary("Add", {2, 1, 4}, {2, 3, 4}, {2, 3, 4}, add));  // [B,1,T] vs [B,H,T].
  cases.push_back(Binary("Add", {3, 1}, {1, 4}, {3, 4}, add));           // Both broadcast.
  cases.push_back(Binary("Sub", {2, 3}, {}, {2, 3}, sub));               // A scalar.
  cases.push_back(Binary("Sub", {1, 3}, {2, 3}, {2, 3}, sub));
  cases.push_back(Binary("Mul", {2, 3}, {2, 3}, {2, 3}, mul));
  cases.push_back(Binary("Mul", {2, 3, 4}, {4}, {2, 3, 4}, mul));
  cases.push_back(Binary("Mul", {}, {2, 3}, {2, 3}, mul));
  cases.push_back(Binary("Mul", {2, 1, 4}, {2, 3, 1}, {2, 3, 4}, mul));
  cases.push_back(Binary("Div", {2, 3}, {2, 3}, {2, 3}, div));
  cases.push_back(Binary("Div", {2, 3, 4}, {3, 1}, {2, 3, 4}, div));
  cases.push_back(Binary("Div", {4}, {3, 4}, {3, 4}, div));
  cases.push_back(Gemm("GemmLinear", 5, 3, 4, false, true, 1, 1, {3}));
  cases.push_back(Gemm("GemmTransA", 5, 3, 4, true, false, 1, 1, {5, 3}));
  cases.push_back(Gemm("GemmAlphaBetaColumn", 5, 3, 4, false, false, 0.5, 2, {5, 1}));
  cases.push_back(Gemm("GemmNoC", 2, 3, 4, true, true, 1, 1, {-1}));
  cases.push_back(Gemm("GemmScalarC", 2, 3, 4, false, true, 1.5, 1, {}));
  cases.push_back(MatMul({3, 4}, {4, 5}, {3, 5}));
  cases.push_back(MatMul({2, 3, 4}, {4, 5}, {2, 3, 5}));
  cases.push_back(MatMul({2, 3, 4}, {2, 4, 5}, {2, 3, 5}));
  cases.push_back(MatMul({2, 1, 3, 4}, {3, 4, 2}, {2, 3, 3, 2}));
  cases.push_back(MatMul({3, 4}, {2, 4, 5}, {2, 3, 5}));
  cases.push_back(MatMul({4}, {4, 5}, {5}));
  cases.push_back(MatMul({2, 3, 4}, {4}, {2, 3}));
  cases.push_back({"LayerNormLastAxis",
                   {{"a", {3, 5}}, {"s", {5}}, {"bias", {5}}},
                   One("LayerNormalization", {"a", "s", "bias"}),
                   {3, 5},
                   NormRef({3, 5}, 1, false, true),
                   nullptr});
  cases.push_back({"LayerNormAxis1NoBias",
                   {{"a", {2, 3, 4}}, {"s", {3, 4}}},
                   One("LayerNormalization", {"a", "s"}, {{"axis", int64_t{1}}}),
                   {2, 3, 4},
                   NormRef({2, 3, 4}, 1, false, false),
                   nullptr});
  cases.push_back({"RMSNormalization",
                   {{"a", {3, 5}}, {"s", {5}}},
                   One("RMSNormalization", {"a", "s"}),
                   {3, 5},
                   NormRef({3, 5}, 1, true, false),
                   nullptr});
  cases.push_back({"SoftmaxLastAxis",
                   {{"a", {3, 5}}},
                   One("Softmax", {"a"}),
                   {3, 5},
                   SoftmaxRef({3, 5}, 1),
                   nullptr});
  cases.push_back({"SoftmaxAxis1",
                   {{"a", {2, 3, 4}}},
                   One("Softmax", {"a"}, {{"axis", int64_t{1}}}),
                   {2, 3, 4},
                   SoftmaxRef({2, 3, 4}, 1),
                   nullptr});
  cases.push_back({"ReduceSumAxis1",
                   {{"a", {2, 3, 4}}},
                   [](SpecBuilder& b) {
                     b.Ints("axes", {1}, {1}).Node("ReduceSum", {"a", "axes"}, {"y"});
                   },
                   {2, 1, 4},
                   [](const Data& d) {
                     std::vector<double> y(8, 0.0);
                     for (int64_t j = 0; j < 24; ++j) y[(j / 12) * 4 + j % 4] += d[0][j];
                     return y;
                   },
                   nullptr});
  cases.push_back({"ReduceSumAll",
                   {{"a", {2, 3}}},
                   One("ReduceSum", {"a"}, {{"keepdims", int64_t{0}}}),
                   {},
                   [](const Data& d) {
                     double s = 0;
                     for (double x : d[0]) s += x;
                     return std::vector<double>{s};
                   },
                   nullptr});
  cases.push_back(
      {"ReduceMeanAxes02",
       {{"a", {2, 3, 4}}},
       One("ReduceMean", {"a"}, {{"axes", std::vector<int64_t>{0, -1}}, {"keepdims", int64_t{0}}}),
       {3},
       [](const Data& d) {
         std::vector<double> y(3, 0.0);
         for (int64_t j = 0; j < 24; ++j) y[(j / 4) % 3] += d[0][j] / 8;
         return y;
       },
       nullptr});
  cases.push_back({"GatherRepeatedAndNegative",
                   {{"a", {5, 3}}},
                   [](SpecBuilder& b) {
                     b.Ints("i", {2, 3}, {0, 4, 4, -1, 2, 0}).Node("Gather", {"a", "i"}, {"y"});
                   },
                   {2, 3, 3},
                   [](const Data& d) {
                     const std::vector<int64_t> idx = {0, 4, 4, 4, 2, 0};
                     std::vector<double> y;
                     for (int64_t i : idx) {
                       for (int c = 0; c < 3; ++c) y.push_back(d[0][i * 3 + c]);
                     }
                     return y;
                   },
                   nullptr});
  cases.push_back(
      {"GatherAxis1",
       {{"a", {2, 4}}},
       [](SpecBuilder& b) {
         b.Ints("i", {3}, {2, 0, 2}).Node("Gather", {"a", "i"}, {"y"}, {{"axis", int64_t{1}}});
       },
       {2, 3},
       [](const Data& d) {
         return std::vector<double>{d[0][2], d[0][0], d[0][2], d[0][6], d[0][4], d[0][6]};
       },
       nullptr});
  auto transpose_ref = [](Shape in, std::vector<int64_t> perm) {
    return [=](const Data& d) {
      Shape out(in.size());
      for (size_t a = 0; a < in.size(); ++a) out[a] = in[perm[a]];
      std::vector<double> y(d[0].size());
      for (int64_t j = 0; j < static_cast<int64_t>(y.size()); ++j) {
        const auto o = Unravel(j, out);
        std::vector<int64_t> i(in.size());
        for (size_t a = 0; a < in.size(); ++a) i[perm[a]] = o[a];
        int64_t flat = 0;
        for (size_t a = 0; a < in.size(); ++a) flat = flat * in[a] + i[a];
        y[j] = d[0][flat];
      }
      return y;
    };
  };
  cases.push_back({"TransposeLastTwo",
                   {{"a", {2, 3, 4}}},
                   One("Transpose", {"a"}, {{"perm", std::vector<int64_t>{0, 2, 1}}}),
                   {2, 4, 3},
                   transpose_ref({2, 3, 4}, {0, 2, 1}),
                   nullptr});
  cases.push_back({"TransposeHeads",
                   {{"a", {2, 3, 4, 5}}},
                   One("Transpose", {"a"}, {{"perm", std::vector<int64_t>{0, 2, 1, 3}}}),
                   {2, 4, 3, 5},
                   transpose_ref({2, 3, 4, 5}, {0, 2, 1, 3}),
                   nullptr});
  cases.push_back({"TransposeDefaultReverses",
                   {{"a", {2, 3, 4}}},
                   One("Transpose", {"a"}),
                   {4, 3, 2},
                   transpose_ref({2, 3, 4}, {2, 1, 0}),
                   nullptr});
  auto same = [](const Data& d) { return d[0]; };
  cases.push_back({"ReshapeZeroAndMinusOne",
                   {{"a", {2, 3, 4}}},
                   [](SpecBuilder& b) {
                     b.Ints("s", {2}, {0, -1}).Node("Reshape", {"a", "s"}, {"y"});
                   },
                   {2, 12},
                   same,
                   nullptr});
  cases.push_back({"Unsqueeze",
                   {{"a", {3, 4}}},
                   [](SpecBuilder& b) {
                     b.Ints("ax", {2}, {0, -1}).Node("Unsqueeze", {"a", "ax"}, {"y"});
                   },
                   {1, 3, 4, 1},
                   same,
                   nullptr});
  cases.push_back({"Squeeze",
                   {{"a", {3, 1, 4}}},
                   [](SpecBuilder& b) {
                     b.Ints("ax", {1}, {1}).Node("Squeeze", {"a", "ax"}, {"y"});
                   },
                   {3, 4},
                   same,
                   nullptr});
  cases.push_back({"SplitSizesThenConcatReversed",
                   {{"a", {4, 6}}},
                   [](SpecBuilder& b) {
                     b.Ints("sizes", {2}, {2, 4})
                         .Node("Split", {"a", "sizes"}, {"p", "q"}, {{"axis", int64_t{1}}})
                         .Node("Concat", {"q", "p"}, {"y"}, {{"axis", int64_t{1}}});
                   },
                   {4, 6},
                   [](const Data& d) {
                     std::vector<double> y;
                     for (int r = 0; r < 4; ++r) {
                       for (int c = 2; c < 6; ++c) y.push_back(d[0][r * 6 + c]);
                       for (int c = 0; c < 2; ++c) y.push_back(d[0][r * 6 + c]);
                     }
                     return y;
                   },
                   nullptr});
  cases.push_back({"SplitNumOutputsOneUnused",
                   {{"a", {4, 3}}},
                   [](SpecBuilder& b) {
                     b.Node("Split", {"a"}, {"p", "y"}, {{"num_outputs", int64_t{2}}});
                   },
                   {2, 3},
                   [](const Data& d) { return std::vector<double>(d[0].begin() + 6, d[0].end()); },
                   nullptr});
  cases.push_back({"Concat",
                   {{"a", {2, 3}}, {"b", {2, 2}}},
                   One("Concat", {"a", "b"}, {{"axis", int64_t{-1}}}),
                   {2, 5},
                   [](const Data& d) {
                     return std::vector<double>{d[0][0], d[0][1], d[0][2], d[1][0], d[1][1],
                                                d[0][3], d[0][4], d[0][5], d[1][2], d[1][3]};
                   },
                   nullptr});
  // More pieces than a 32-bit input mask has bits: every one of them gets its gradient.
  {
    std::vector<std::pair<std::string, Shape>> pieces;
    std::vector<std::string> names;
    for (int k = 0; k < 40; ++k) {
      pieces.push_back({"p" + std::to_string(k), {1, 2}});
      names.push_back(pieces.back().first);
    }
    cases.push_back({"ConcatOfFortyPieces",
                     pieces,
                     One("Concat", names, {{"axis", int64_t{0}}}),
                     {40, 2},
                     [](const Data& d) {
                       std::vector<double> y;
                       for (const auto& piece : d) y.insert(y.end(), piece.begin(), piece.end());
                       return y;
                     },
                     nullptr});
  }
  cases.push_back({"SliceStepsAndClamping",
                   {{"a", {5, 6}}},
                   [](SpecBuilder& b) {
                     b.Ints("st", {2}, {1, -2})
                         .Ints("en", {2}, {5, 100})
                         .Ints("ax", {2}, {0, 1})
                         .Ints("sp", {2}, {2, 1})
                         .Node("Slice", {"a", "st", "en", "ax", "sp"}, {"y"});
                   },
                   {2, 2},
                   [](const Data& d) {
                     return std::vector<double>{d[0][10], d[0][11], d[0][22], d[0][23]};
                   },
                   nullptr});
  cases.push_back({"SliceNegativeStep",
                   {{"a", {5}}},
                   [](SpecBuilder& b) {
                     b.Ints("st", {1}, {-1})
                         .Ints("en", {1}, {0})
                         .Ints("ax", {1}, {0})
                         .Ints("sp", {1}, {-2})
                         .Node("Slice", {"a", "st", "en", "ax", "sp"}, {"y"});
                   },
                   {2},
                   [](const Data& d) {
                     return std::vector<double>{d[0][4], d[0][2]};
                   },
                   nullptr});
  cases.push_back({"WhereBroadcastScalar",
                   {{"a", {3, 4}}, {"b", {}}},
                   [](SpecBuilder& b) {
                     b.Ints("m", {3, 4}, {1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0}, DType::kBool)
                         .Node("Where", {"m", "a", "b"}, {"y"});
                   },
                   {3, 4},
                   [](const Data& d) {
                     const std::vector<int> m = {1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0};
                     std::vector<double> y;
                     for (int j = 0; j < 12; ++j) y.push_back(m[j] ? d[0][j] : d[1][0]);
                     return y;
                   },
                   nullptr});
  auto trilu_ref = [](Shape in, bool upper, int64_t k) {
    return [=](const Data& d) {
      std::vector<double> y(d[0].size());
      const int64_t rows = in[in.size() - 2], cols = in.back();
      for (int64_t j = 0; j < static_cast<int64_t>(y.size()); ++j) {
        const int64_t r = (j / cols) % rows, c = j % cols;
        y[j] = (upper ? c - r >= k : c - r <= k) ? d[0][j] : 0.0;
      }
      return y;
    };
  };
  cases.push_back({"TriluUpper",
                   {{"a", {3, 4}}},
                   One("Trilu", {"a"}),
                   {3, 4},
                   trilu_ref({3, 4}, true, 0),
                   nullptr});
  cases.push_back(
      {"TriluLowerBatchedK",
       {{"a", {2, 3, 3}}},
       [](SpecBuilder& b) {
         b.Ints("k", {}, {-1}).Node("Trilu", {"a", "k"}, {"y"}, {{"upper", int64_t{0}}});
       },
       {2, 3, 3},
       trilu_ref({2, 3, 3}, false, -1),
       nullptr});
  cases.push_back(
      {"DropoutOffIsIdentity", {{"a", {3, 4}}}, One("Dropout", {"a"}), {3, 4}, same, nullptr});
  // Both mean the call's float dtype: the identity, its gradient passed through.
  cases.push_back({"CastToFloat",
                   {{"a", {3, 4}}},
                   One("Cast", {"a"}, {{"to", int64_t{1}}}),
                   {3, 4},
                   same,
                   nullptr});
  cases.push_back({"CastToDouble",
                   {{"a", {3, 4}}},
                   One("Cast", {"a"}, {{"to", int64_t{11}}}),
                   {3, 4},
                   same,
                   nullptr});
  auto expand = [&](std::string name, Shape a, std::vector<int64_t> target, Shape out) {
    cases.push_back({name,
                     {{"a", a}},
                     [=](SpecBuilder& b) {
                       b.Ints("shape", {static_cast<int64_t>(target.size())}, target)
                           .Node("Expand", {"a", "shape"}, {"y"});
                     },
                     out,
                     [=](const Data& d) {
                       std::vector<double> y(NumElements(out));
                       for (int64_t j = 0; j < static_cast<int64_t>(y.size()); ++j) {
                         y[j] = d[0][Operand(Unravel(j, out), a)];
                       }
                       return y;
                     },
                     nullptr});
  };
  expand("ExpandBroadcastsInnerAndNewAxes", {3, 1}, {2, 3, 4}, {2, 3, 4});
  expand("ExpandBroadcastsOuterAxis", {1, 4}, {3, 4}, {3, 4});
  expand("ExpandKeepsTheInputsLargerAxes", {2, 3}, {1, 1, 1}, {1, 2, 3});
  expand("ExpandScalar", {}, {2, 2}, {2, 2});
  // A mask computed by Equal on constants folds to a bool constant that Where reads.
  cases.push_back({"WhereOnAFoldedEqualMask",
                   {{"a", {2, 3}}, {"b", {}}},
                   [](SpecBuilder& b) {
                     b.Ints("ids", {2, 3}, {0, 4, 0, 5, 5, 0})
                         .Ints("zero", {}, {0})
                         .Node("Equal", {"ids", "zero"}, {"pad"})
                         .Node("Where", {"pad", "b", "a"}, {"y"});
                   },
                   {2, 3},
                   [](const Data& d) {
                     const std::vector<int> pad = {1, 0, 1, 0, 0, 1};
                     std::vector<double> y;
                     for (int j = 0; j < 6; ++j) y.push_back(pad[j] ? d[1][0] : d[0][j]);
                     return y;
                   },
                   nullptr});
  cases.push_back({"DropoutTraining",
                   {{"a", {4, 8}}},
                   [](SpecBuilder& b) {
                     b.Floats("r", {}, {0.25})
                         .Ints("t", {}, {1}, DType::kBool)
                         .Node("Dropout", {"a", "r", "t"}, {"y"}, {{"seed", int64_t{7}}});
                   },
                   {4, 8},
                   nullptr,
                   nullptr});
  return cases;
}

class GraphOp : public ::testing::TestWithParam<OpCase> {};

TEST_P(GraphOp, ForwardMatchesReferenceAndBackwardMatchesFiniteDifferences) {
  const OpCase& c = GetParam();
  SpecBuilder b;
  for (const auto& [name, shape] : c.params) b.Param(name, shape);
  c.build(b);
  Harness h(b.WeightedSum("y"), {c.expected});
  ASSERT_TRUE(h.Plan().ok()) << h.Plan();
  const ValueInfo& y = h.graph().values()[h.graph().output_value(0)];
  EXPECT_EQ(y.type.shape, c.expected);
  h.Fill(42);
  if (c.prepare) c.prepare(h.params_);
  ASSERT_TRUE(h.Run(c.threads).ok());
  if (c.reference) {
    const std::vector<double> expected = c.reference(h.params_);
    ASSERT_EQ(expected.size(), h.outputs_[0].size());
    double max_error = 0;
    for (size_t j = 0; j < expected.size(); ++j) {
      max_error = std::max(max_error, std::abs(expected[j] - h.outputs_[0][j]) /
                                          std::max(1.0, std::abs(expected[j])));
    }
    EXPECT_LE(max_error, 1e-12) << "max forward error " << max_error;
  }
  const testing::FdReport report = h.Check();
  EXPECT_GT(report.checked, 0);
  EXPECT_LE(report.max_rel_error, c.fd_tolerance)
      << "max relative error " << report.max_rel_error << " at " << report.worst;
}

// Sizes past the parallel threshold (kernels.h: 32768 elements), on two threads: the parallel
// paths against the same naive references, and against finite differences of the serial ones
// (the harness's forward passes run on one thread).
std::vector<OpCase> LargeCases() {
  std::vector<OpCase> cases;
  const auto add = [](double x, double y) { return x + y; };
  const auto mul = [](double x, double y) { return x * y; };
  const auto div = [](double x, double y) { return x / y; };
  cases.push_back(Binary("Add", {256, 160}, {160}, {256, 160}, add));
  cases.push_back(Binary("Mul", {64, 1, 640}, {64, 3, 1}, {64, 3, 640}, mul));
  cases.push_back(Binary("Div", {128, 320}, {128, 1}, {128, 320}, div));
  cases.push_back({"GeluLarge",
                   {{"a", {256, 160}}},
                   One("Gelu", {"a"}),
                   {256, 160},
                   UnaryRef([](double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }),
                   nullptr});
  cases.push_back({"SoftmaxLarge",
                   {{"a", {256, 160}}},
                   One("Softmax", {"a"}),
                   {256, 160},
                   SoftmaxRef({256, 160}, 1),
                   nullptr});
  cases.push_back({"SoftmaxAxis1Large",
                   {{"a", {16, 64, 40}}},
                   One("Softmax", {"a"}, {{"axis", int64_t{1}}}),
                   {16, 64, 40},
                   SoftmaxRef({16, 64, 40}, 1),
                   nullptr});
  cases.push_back({"LayerNormLarge",
                   {{"a", {256, 160}}, {"s", {160}}, {"bias", {160}}},
                   One("LayerNormalization", {"a", "s", "bias"}),
                   {256, 160},
                   NormRef({256, 160}, 1, false, true),
                   nullptr});
  cases.push_back({"RMSNormLarge",
                   {{"a", {256, 160}}, {"s", {160}}},
                   One("RMSNormalization", {"a", "s"}),
                   {256, 160},
                   NormRef({256, 160}, 1, true, false),
                   nullptr});
  cases.push_back({"ReduceSumAxis0Large",
                   {{"a", {400, 100}}},
                   [](SpecBuilder& b) {
                     b.Ints("axes", {1}, {0}).Node("ReduceSum", {"a", "axes"}, {"y"});
                   },
                   {1, 100},
                   [](const Data& d) {
                     std::vector<double> y(100, 0.0);
                     for (int64_t j = 0; j < 40000; ++j) y[j % 100] += d[0][j];
                     return y;
                   },
                   nullptr});
  std::vector<int64_t> indices(400);
  for (int i = 0; i < 400; ++i) indices[i] = (i * 7) % 300 - (i % 5 == 0 ? 300 : 0);
  cases.push_back({"GatherLarge",
                   {{"a", {300, 128}}},
                   [indices](SpecBuilder& b) {
                     b.Ints("i", {400}, indices).Node("Gather", {"a", "i"}, {"y"});
                   },
                   {400, 128},
                   [indices](const Data& d) {
                     std::vector<double> y;
                     for (int64_t i : indices) {
                       const int64_t r = i < 0 ? i + 300 : i;
                       for (int c = 0; c < 128; ++c) y.push_back(d[0][r * 128 + c]);
                     }
                     return y;
                   },
                   nullptr});
  cases.push_back({"TransposeLarge",
                   {{"a", {64, 32, 24}}},
                   One("Transpose", {"a"}, {{"perm", std::vector<int64_t>{2, 0, 1}}}),
                   {24, 64, 32},
                   [](const Data& d) {
                     std::vector<double> y(d[0].size());
                     for (int64_t j = 0; j < static_cast<int64_t>(y.size()); ++j) {
                       const auto o = Unravel(j, {24, 64, 32});
                       y[j] = d[0][(o[1] * 32 + o[2]) * 24 + o[0]];
                     }
                     return y;
                   },
                   nullptr});
  std::vector<int64_t> mask(200 * 200);
  for (size_t j = 0; j < mask.size(); ++j) mask[j] = j % 3 == 0;
  cases.push_back(
      {"WhereLarge",
       {{"a", {200, 200}}, {"b", {200, 1}}},
       [mask](SpecBuilder& b) {
         b.Ints("m", {200, 200}, mask, DType::kBool).Node("Where", {"m", "a", "b"}, {"y"});
       },
       {200, 200},
       [mask](const Data& d) {
         std::vector<double> y;
         for (int64_t j = 0; j < 40000; ++j) y.push_back(mask[j] ? d[0][j] : d[1][j / 200]);
         return y;
       },
       nullptr});
  cases.push_back({"SplitConcatLarge",
                   {{"a", {200, 300}}},
                   [](SpecBuilder& b) {
                     b.Node("Split", {"a"}, {"p", "q"},
                            {{"axis", int64_t{1}}, {"num_outputs", int64_t{2}}})
                         .Node("Concat", {"q", "p"}, {"y"}, {{"axis", int64_t{0}}});
                   },
                   {400, 150},
                   [](const Data& d) {
                     std::vector<double> y;
                     for (int half : {1, 0}) {
                       for (int r = 0; r < 200; ++r) {
                         for (int c = 0; c < 150; ++c) y.push_back(d[0][r * 300 + half * 150 + c]);
                       }
                     }
                     return y;
                   },
                   nullptr});
  cases.push_back(MatMul({8, 64, 48}, {8, 48, 64}, {8, 64, 64}));
  cases.push_back(Gemm("GemmLinearLarge", 256, 160, 64, false, true, 1, 1, {160}));
  for (OpCase& c : cases) {
    c.threads = 2;
    c.fd_tolerance = 1e-4;
    if (c.name.find("Large") == std::string::npos) c.name += "_Large";
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(LargeOps, GraphOp, ::testing::ValuesIn(LargeCases()),
                         [](const ::testing::TestParamInfo<OpCase>& info) {
                           return info.param.name;
                         });

INSTANTIATE_TEST_SUITE_P(Ops, GraphOp, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<OpCase>& info) {
                           return info.param.name;
                         });

TEST(GraphDropout, SameSeedSameMaskKeptFractionAndScale) {
  SpecBuilder b;
  b.Param("a", {64, 64}).Floats("r", {}, {0.25}).Ints("t", {}, {1}, DType::kBool);
  b.Node("Dropout", {"a", "r", "t"}, {"y", "mask"}, {{"seed", int64_t{7}}});
  GraphSpec spec = b.WeightedSum("y");
  spec.outputs.push_back("mask");
  Harness h(spec, {{64, 64}});
  ASSERT_TRUE(h.Plan().ok());
  h.Fill(3);
  for (double& x : h.params_[0]) x = 1.0;
  ASSERT_TRUE(h.Run().ok());
  const std::vector<double> first = h.outputs_[0];
  int64_t kept = 0;
  const uint8_t* mask = reinterpret_cast<const uint8_t*>(h.outputs_[1].data());
  for (size_t j = 0; j < first.size(); ++j) {
    ASSERT_TRUE(first[j] == 0.0 || first[j] == 1.0 / 0.75) << first[j];
    EXPECT_EQ(mask[j] != 0, first[j] != 0.0);
    kept += first[j] != 0.0;
  }
  EXPECT_NEAR(static_cast<double>(kept) / first.size(), 0.75, 0.03);
  ASSERT_TRUE(h.Run(2).ok());
  EXPECT_EQ(h.outputs_[0], first);  // Same seed, other thread count: same mask.
}

TEST(GraphGather, IndexOutOfRangeFromAnInputIsInvalidArgument) {
  SpecBuilder b;
  b.Input("ids", DType::kInt64).Param("table", {4, 2}).Node("Gather", {"table", "ids"}, {"y"});
  Harness h(b.WeightedSum("y"), {{3}, {3, 2}});
  ASSERT_TRUE(h.Plan().ok());
  h.Fill(1);
  h.SetInts("ids", {0, 4, 1});
  const auto result = h.Run();
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(result.status().message()), ::testing::HasSubstr("index 4"));
}

// ---- Int64 and bool ops: no gradient, so checked by their values ------------------------------

// The values `names` of a graph built by `build` (its nodes first, so graph.nodes[0] is the
// first it adds), as int64 (bools as 0/1) or floats, and whether each was folded at plan time.
// The loss is on its own parameter (y = -p), since these ops have no gradient.
struct Evaluated {
  absl::Status status;
  std::map<std::string, std::vector<int64_t>> ints;
  std::map<std::string, std::vector<double>> floats;
  std::map<std::string, Shape> shapes;
  std::map<std::string, bool> folded;
};

Evaluated Evaluate(SpecBuilder b, std::vector<Shape> input_shapes,
                   const std::vector<std::string>& names,
                   const std::vector<std::pair<std::string, std::vector<int64_t>>>& ints = {}) {
  b.Param("p", {1}).Node("Neg", {"p"}, {"y"});
  GraphSpec spec = b.WeightedSum("y");
  for (const std::string& n : names) spec.outputs.push_back(n);
  input_shapes.push_back({1});
  Harness h(spec, input_shapes);
  Evaluated e;
  e.status = h.Plan();
  if (!e.status.ok()) return e;
  h.Fill(1);
  for (const auto& [name, data] : ints) h.SetInts(name, data);
  const absl::StatusOr<GraphRunResult> run = h.Run();
  if (!run.ok()) {
    e.status = run.status();
    return e;
  }
  for (size_t o = 0; o < names.size(); ++o) {
    const ValueInfo& v = h.graph().values()[h.graph().output_value(static_cast<int>(o) + 1)];
    const void* data = h.outputs_[o + 1].data();
    e.folded[names[o]] = v.kind == ValueKind::kConstant;
    e.shapes[names[o]] = v.type.shape;
    if (v.type.dtype == DType::kInt64) {
      const int64_t* p = static_cast<const int64_t*>(data);
      e.ints[names[o]].assign(p, p + v.elements);
    } else if (v.type.dtype == DType::kBool) {
      const uint8_t* p = static_cast<const uint8_t*>(data);
      e.ints[names[o]].assign(p, p + v.elements);
    } else {
      const double* p = static_cast<const double*>(data);
      e.floats[names[o]].assign(p, p + v.elements);
    }
  }
  return e;
}

constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

// Two's complement wrapping, as the ops compute (uint64_t arithmetic is defined).
int64_t Wrap(uint64_t x) { return static_cast<int64_t>(x); }

TEST(GraphIntegerOps, ArithmeticBroadcastsWrapsAndTruncatesFoldedAndPerCall) {
  const std::vector<int64_t> a = {7, kMin, kMax, -7, -9, 0};
  const std::vector<int64_t> b = {2, -1, 3};
  std::map<std::string, std::vector<int64_t>> expected;
  for (int j = 0; j < 6; ++j) {
    const uint64_t x = static_cast<uint64_t>(a[j]), y = static_cast<uint64_t>(b[j % 3]);
    expected["add"].push_back(Wrap(x + y));
    expected["sub"].push_back(Wrap(x - y));
    expected["mul"].push_back(Wrap(x * y));
    expected["div"].push_back(b[j % 3] == -1 ? Wrap(0 - x) : a[j] / b[j % 3]);
  }
  EXPECT_EQ(expected["div"], (std::vector<int64_t>{3, kMin, kMax / 3, -3, 9, 0}));
  for (const bool folded : {true, false}) {
    SpecBuilder sb;
    if (folded) {
      sb.Ints("a", {2, 3}, a);
    } else {
      sb.Input("a", DType::kInt64);
    }
    sb.Ints("b", {3}, b);
    for (const char* op : {"Add", "Sub", "Mul", "Div"}) {
      std::string out = op;
      out[0] = static_cast<char>(std::tolower(out[0]));
      sb.Node(op, {"a", "b"}, {out});
    }
    const Evaluated e = folded ? Evaluate(sb, {}, {"add", "sub", "mul", "div"})
                               : Evaluate(sb, {{2, 3}}, {"add", "sub", "mul", "div"}, {{"a", a}});
    ASSERT_TRUE(e.status.ok()) << e.status;
    for (const char* out : {"add", "sub", "mul", "div"}) {
      EXPECT_EQ(e.ints.at(out), expected[out]) << out << (folded ? " folded" : " per call");
      EXPECT_EQ(e.shapes.at(out), (Shape{2, 3}));
      EXPECT_EQ(e.folded.at(out), folded) << out;
    }
  }
}

TEST(GraphIntegerOps, DivisionByZeroIsInvalidArgumentNamingTheNode) {
  {  // A constant divisor: refused when planned.
    SpecBuilder sb;
    sb.Ints("a", {2}, {4, 5}).Ints("b", {2}, {1, 0}).Node("Div", {"a", "b"}, {"q"});
    const Evaluated e = Evaluate(sb, {}, {"q"});
    EXPECT_EQ(e.status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(e.status.message()),
                ::testing::HasSubstr(
                    "graph.nodes[0] (\"q\", Div).inputs[1] (\"b\"): integer division by zero"));
  }
  {  // A divisor folded from other nodes' outputs (b - b).
    SpecBuilder sb;
    sb.Ints("a", {2}, {4, 5}).Ints("b", {2}, {1, 3});
    sb.Node("Sub", {"b", "b"}, {"zero"}).Node("Div", {"a", "zero"}, {"q"});
    const Evaluated e = Evaluate(sb, {}, {"q"});
    EXPECT_EQ(e.status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(e.status.message()),
                ::testing::HasSubstr("graph.nodes[1] (\"q\", Div).inputs[1]"));
  }
  {  // A divisor read per call: the run fails.
    SpecBuilder sb;
    sb.Input("ids", DType::kInt64).Ints("a", {}, {9}).Node("Div", {"a", "ids"}, {"q"});
    const Evaluated e = Evaluate(sb, {{3}}, {"q"}, {{"ids", {3, 0, 1}}});
    EXPECT_EQ(e.status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(e.status.message()),
                ::testing::HasSubstr("graph.nodes[0] (\"q\", Div).inputs[1]: integer division by "
                                     "zero (flat index 1)"));
  }
}

TEST(GraphIntegerOps, ShapeReadsOnlyShapesAndFoldsWhateverItsInput) {
  SpecBuilder sb;
  sb.Input("x").Input("ids", DType::kInt64);
  sb.Node("Shape", {"x"}, {"all"});
  sb.Node("Shape", {"x"}, {"tail"}, {{"start", int64_t{1}}});
  sb.Node("Shape", {"x"}, {"head"}, {{"end", int64_t{-1}}});
  sb.Node("Shape", {"x"}, {"middle"}, {{"start", int64_t{-2}}, {"end", int64_t{-1}}});
  sb.Node("Shape", {"x"}, {"none"}, {{"start", int64_t{2}}, {"end", int64_t{1}}});
  sb.Node("Shape", {"ids"}, {"ids_shape"});
  sb.Node("Relu", {"x"}, {"h"}).Node("Shape", {"h"}, {"node_shape"});
  const std::vector<std::string> names = {"all",  "tail",      "head",      "middle",
                                          "none", "ids_shape", "node_shape"};
  const Evaluated e = Evaluate(sb, {{2, 3, 5}, {4, 1}}, names);
  ASSERT_TRUE(e.status.ok()) << e.status;
  EXPECT_EQ(e.ints.at("all"), (std::vector<int64_t>{2, 3, 5}));
  EXPECT_EQ(e.ints.at("tail"), (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(e.ints.at("head"), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(e.ints.at("middle"), (std::vector<int64_t>{3}));
  EXPECT_EQ(e.ints.at("none"), (std::vector<int64_t>{}));
  EXPECT_EQ(e.ints.at("ids_shape"), (std::vector<int64_t>{4, 1}));
  EXPECT_EQ(e.ints.at("node_shape"), (std::vector<int64_t>{2, 3, 5}));
  for (const std::string& n : names) EXPECT_TRUE(e.folded.at(n)) << n;
}

TEST(GraphIntegerOps, CastBetweenFloatInt64AndBool) {
  SpecBuilder sb;
  sb.Ints("i", {4}, {3, -2, 0, 5}).Ints("m", {2}, {1, 0}, DType::kBool);
  sb.Floats("f", {5}, {1.75, -2.5, 0.0, -0.25, std::nan("")});
  sb.Node("Cast", {"i"}, {"i_float"}, {{"to", int64_t{1}}});
  sb.Node("Cast", {"i"}, {"i_bool"}, {{"to", int64_t{9}}});
  sb.Node("Cast", {"i"}, {"i_int"}, {{"to", int64_t{7}}});
  sb.Node("Cast", {"m"}, {"m_int"}, {{"to", int64_t{7}}});
  sb.Node("Cast", {"m"}, {"m_double"}, {{"to", int64_t{11}}});
  sb.Node("Cast", {"f"}, {"f_bool"}, {{"to", int64_t{9}}});
  sb.Node("Slice", {"f", "zero", "four"}, {"finite"});
  sb.Ints("zero", {1}, {0}).Ints("four", {1}, {4});
  sb.Node("Cast", {"finite"}, {"f_int"}, {{"to", int64_t{7}}});
  // Per call: a float input to int64 (truncated toward zero).
  sb.Input("x").Node("Cast", {"x"}, {"x_int"}, {{"to", int64_t{7}}});
  const std::vector<std::string> names = {"i_float",  "i_bool", "i_int", "m_int",
                                          "m_double", "f_bool", "f_int", "x_int"};
  const Evaluated e = Evaluate(sb, {{3}}, names);
  ASSERT_TRUE(e.status.ok()) << e.status;
  EXPECT_EQ(e.floats.at("i_float"), (std::vector<double>{3, -2, 0, 5}));
  EXPECT_EQ(e.ints.at("i_bool"), (std::vector<int64_t>{1, 1, 0, 1}));
  EXPECT_EQ(e.ints.at("i_int"), (std::vector<int64_t>{3, -2, 0, 5}));
  EXPECT_EQ(e.ints.at("m_int"), (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(e.floats.at("m_double"), (std::vector<double>{1, 0}));
  EXPECT_EQ(e.ints.at("f_bool"), (std::vector<int64_t>{1, 1, 0, 1, 1}));  // NaN is true.
  EXPECT_EQ(e.ints.at("f_int"), (std::vector<int64_t>{1, -2, 0, 0}));
  EXPECT_FALSE(e.folded.at("x_int"));
  for (const std::string& n : names) {
    EXPECT_EQ(e.folded.at(n), n != "x_int") << n;
  }
}

TEST(GraphIntegerOps, CastRefusesUnsupportedTypesAndValuesOutOfRange) {
  for (const auto& [to, message] : std::vector<std::pair<int64_t, std::string>>{
           {6, "attributes.to: 6 (INT32) is not supported"},
           {10, "attributes.to: 10 (FLOAT16) is not supported"},
           {2, "attributes.to: 2 is not supported"}}) {
    SpecBuilder sb;
    sb.Ints("i", {2}, {1, 2}).Node("Cast", {"i"}, {"c"}, {{"to", to}});
    const Evaluated e = Evaluate(sb, {}, {"c"});
    EXPECT_EQ(e.status.code(), absl::StatusCode::kInvalidArgument) << to;
    EXPECT_THAT(std::string(e.status.message()),
                ::testing::HasSubstr("graph.nodes[0] (\"c\", Cast)." + message));
  }
  {
    SpecBuilder sb;
    sb.Ints("i", {2}, {1, 2}).Node("Cast", {"i"}, {"c"});
    EXPECT_THAT(std::string(Evaluate(sb, {}, {"c"}).status.message()),
                ::testing::HasSubstr("attributes.to: required"));
  }
  for (const double bad : {std::nan(""), 1e19, -1e300, double{INFINITY}}) {
    SpecBuilder sb;
    sb.Floats("f", {2}, {1.0, bad}).Node("Cast", {"f"}, {"c"}, {{"to", int64_t{7}}});
    const Evaluated e = Evaluate(sb, {}, {"c"});
    EXPECT_EQ(e.status.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(e.status.message()),
                ::testing::HasSubstr("graph.nodes[0] (\"c\", Cast).inputs[0]: value "));
    EXPECT_THAT(std::string(e.status.message()), ::testing::HasSubstr("does not fit in an int64"));
  }
}

TEST(GraphIntegerOps, RangeCountsAsOnnxAndRefusesBadSteps) {
  SpecBuilder sb;
  sb.Ints("zero", {}, {0}).Ints("five", {}, {5}).Ints("two", {}, {2}).Ints("minus_two", {}, {-2});
  sb.Node("Range", {"zero", "five", "two"}, {"up"});
  sb.Node("Range", {"five", "zero", "minus_two"}, {"down"});
  sb.Node("Range", {"five", "zero", "two"}, {"empty"});
  const Evaluated e = Evaluate(sb, {}, {"up", "down", "empty"});
  ASSERT_TRUE(e.status.ok()) << e.status;
  EXPECT_EQ(e.ints.at("up"), (std::vector<int64_t>{0, 2, 4}));
  EXPECT_EQ(e.ints.at("down"), (std::vector<int64_t>{5, 3, 1}));
  EXPECT_EQ(e.ints.at("empty"), (std::vector<int64_t>{}));
  EXPECT_EQ(e.shapes.at("empty"), (Shape{0}));
  EXPECT_TRUE(e.folded.at("up"));

  struct Bad {
    std::vector<int64_t> start_limit_delta;
    std::string message;
  };
  for (const Bad& bad : std::vector<Bad>{
           {{0, 5, 0}, "graph.nodes[0] (\"r\", Range).inputs[2] (\"d\"): delta is 0"},
           {{kMin, kMax, 1}, "graph.nodes[0] (\"r\", Range): Range(" + std::to_string(kMin)}}) {
    SpecBuilder b;
    b.Ints("s", {}, {bad.start_limit_delta[0]})
        .Ints("l", {}, {bad.start_limit_delta[1]})
        .Ints("d", {}, {bad.start_limit_delta[2]})
        .Node("Range", {"s", "l", "d"}, {"r"});
    const Evaluated r = Evaluate(b, {}, {"r"});
    EXPECT_EQ(r.status.code(), absl::StatusCode::kInvalidArgument) << r.status;
    EXPECT_THAT(std::string(r.status.message()), ::testing::HasSubstr(bad.message));
  }
  {  // Past the plan's element limit (but countable): RESOURCE_EXHAUSTED from the shape check.
    SpecBuilder b;
    b.Ints("s", {}, {0}).Ints("l", {}, {int64_t{1} << 40}).Ints("d", {}, {1});
    b.Node("Range", {"s", "l", "d"}, {"r"});
    EXPECT_EQ(Evaluate(b, {}, {"r"}).status.code(), absl::StatusCode::kResourceExhausted);
  }
  {  // Limits read per call are refused: the output's size must be known when planning.
    SpecBuilder b;
    b.Input("n", DType::kInt64).Ints("s", {}, {0}).Ints("d", {}, {1});
    b.Node("Range", {"s", "n", "d"}, {"r"});
    const Evaluated r = Evaluate(b, {{}}, {"r"});
    EXPECT_EQ(r.status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(r.status.message()),
                ::testing::HasSubstr("inputs[1] (\"n\"): must be a constant"));
  }
}

TEST(GraphIntegerOps, ComparisonsBroadcastFoldedAndPerCall) {
  SpecBuilder sb;
  sb.Floats("f", {2, 2}, {1.0, 2.0, 3.0, std::nan("")}).Floats("g", {2}, {1.0, 3.0});
  sb.Ints("i", {3}, {-1, 0, 1}).Ints("zero", {}, {0});
  sb.Ints("m", {2}, {1, 0}, DType::kBool).Ints("n", {2}, {1, 1}, DType::kBool);
  sb.Node("Equal", {"f", "g"}, {"f_eq"});
  sb.Node("Less", {"f", "g"}, {"f_lt"});
  sb.Node("Greater", {"f", "g"}, {"f_gt"});
  sb.Node("Equal", {"i", "zero"}, {"i_eq"});
  sb.Node("Less", {"i", "zero"}, {"i_lt"});
  sb.Node("Greater", {"i", "zero"}, {"i_gt"});
  sb.Node("Equal", {"m", "n"}, {"b_eq"});
  sb.Node("Not", {"m"}, {"not_m"});
  sb.Input("ids", DType::kInt64).Node("Equal", {"ids", "zero"}, {"ids_pad"});
  sb.Node("Not", {"ids_pad"}, {"ids_kept"});
  const std::vector<std::string> names = {"f_eq", "f_lt", "f_gt",  "i_eq",    "i_lt",
                                          "i_gt", "b_eq", "not_m", "ids_pad", "ids_kept"};
  const Evaluated e = Evaluate(sb, {{2, 2}}, names, {{"ids", {0, 7, 0, -3}}});
  ASSERT_TRUE(e.status.ok()) << e.status;
  EXPECT_EQ(e.ints.at("f_eq"), (std::vector<int64_t>{1, 0, 0, 0}));  // NaN equals nothing.
  EXPECT_EQ(e.ints.at("f_lt"), (std::vector<int64_t>{0, 1, 0, 0}));
  EXPECT_EQ(e.ints.at("f_gt"), (std::vector<int64_t>{0, 0, 1, 0}));
  EXPECT_EQ(e.ints.at("i_eq"), (std::vector<int64_t>{0, 1, 0}));
  EXPECT_EQ(e.ints.at("i_lt"), (std::vector<int64_t>{1, 0, 0}));
  EXPECT_EQ(e.ints.at("i_gt"), (std::vector<int64_t>{0, 0, 1}));
  EXPECT_EQ(e.ints.at("b_eq"), (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(e.ints.at("not_m"), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(e.ints.at("ids_pad"), (std::vector<int64_t>{1, 0, 1, 0}));
  EXPECT_EQ(e.ints.at("ids_kept"), (std::vector<int64_t>{0, 1, 0, 1}));
  EXPECT_EQ(e.shapes.at("f_eq"), (Shape{2, 2}));
  EXPECT_TRUE(e.folded.at("f_eq"));
  EXPECT_FALSE(e.folded.at("ids_pad"));
  EXPECT_FALSE(e.folded.at("ids_kept"));

  SpecBuilder mixed;
  mixed.Ints("i", {1}, {0}).Floats("g", {1}, {0.0}).Node("Equal", {"i", "g"}, {"eq"});
  EXPECT_THAT(std::string(Evaluate(mixed, {}, {"eq"}).status.message()),
              ::testing::HasSubstr("graph.nodes[0] (\"eq\", Equal).inputs[1] (\"g\"): expected "
                                   "int64, got float64"));
}

TEST(GraphIntegerOps, ConstantOfShapeFillsAnInt64OrFloatValue) {
  SpecBuilder sb;
  sb.Input("x").Node("Shape", {"x"}, {"s"});
  sb.Node("ConstantOfShape", {"s"}, {"zeros"});
  sb.Node("ConstantOfShape", {"s"}, {"sevens"}, {{"value", std::vector<int64_t>{7}}});
  sb.Node("ConstantOfShape", {"s"}, {"halves"}, {{"value", std::vector<double>{0.5}}});
  sb.Ints("empty", {0}, {})
      .Node("ConstantOfShape", {"empty"}, {"scalar"}, {{"value", std::vector<int64_t>{-4}}});
  const Evaluated e = Evaluate(sb, {{2, 3}}, {"zeros", "sevens", "halves", "scalar"});
  ASSERT_TRUE(e.status.ok()) << e.status;
  EXPECT_EQ(e.floats.at("zeros"), std::vector<double>(6, 0.0));
  EXPECT_EQ(e.ints.at("sevens"), std::vector<int64_t>(6, 7));
  EXPECT_EQ(e.floats.at("halves"), std::vector<double>(6, 0.5));
  EXPECT_EQ(e.shapes.at("halves"), (Shape{2, 3}));
  EXPECT_EQ(e.ints.at("scalar"), std::vector<int64_t>{-4});
  EXPECT_EQ(e.shapes.at("scalar"), Shape{});
  EXPECT_TRUE(e.folded.at("sevens"));

  for (const auto& [shape, value, message] :
       std::vector<std::tuple<std::vector<int64_t>, AttributeValue, std::string>>{
           {{2, -1}, std::vector<int64_t>{1}, "inputs[0] (\"shape\"): negative size in [2, -1]"},
           {{2}, std::vector<int64_t>{1, 2}, "attributes.value: expected one value"},
           {{2}, int64_t{1}, "attributes.value: expected a list of floats"}}) {
    SpecBuilder b;
    b.Ints("shape", {static_cast<int64_t>(shape.size())}, shape)
        .Node("ConstantOfShape", {"shape"}, {"c"}, {{"value", value}});
    const Evaluated r = Evaluate(b, {}, {"c"});
    EXPECT_EQ(r.status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(r.status.message()), ::testing::HasSubstr(message));
  }
}

TEST(GraphIntegerOps, Int64GatherUnsqueezeConcatOnFoldedValues) {
  SpecBuilder sb;
  sb.Input("x").Node("Shape", {"x"}, {"s"});
  sb.Ints("one", {}, {1}).Ints("last", {1}, {-1}).Ints("axes", {1}, {0}).Ints("pick", {2}, {2, 0});
  sb.Node("Gather", {"s", "one"}, {"t"});        // Scalar index: a scalar.
  sb.Node("Gather", {"s", "pick"}, {"picked"});  // 1-D indices.
  sb.Node("Unsqueeze", {"t", "axes"}, {"t1"});
  sb.Node("Concat", {"last", "t1", "picked"}, {"cat"}, {{"axis", int64_t{0}}});
  const Evaluated e = Evaluate(sb, {{2, 3, 5}}, {"t", "picked", "t1", "cat"});
  ASSERT_TRUE(e.status.ok()) << e.status;
  EXPECT_EQ(e.ints.at("t"), std::vector<int64_t>{3});
  EXPECT_EQ(e.shapes.at("t"), Shape{});
  EXPECT_EQ(e.ints.at("picked"), (std::vector<int64_t>{5, 2}));
  EXPECT_EQ(e.ints.at("t1"), std::vector<int64_t>{3});
  EXPECT_EQ(e.shapes.at("t1"), Shape{1});
  EXPECT_EQ(e.ints.at("cat"), (std::vector<int64_t>{-1, 3, 5, 2}));
  for (const char* n : {"t", "picked", "t1", "cat"}) EXPECT_TRUE(e.folded.at(n)) << n;
}

}  // namespace
}  // namespace gradserve::engine::graph
