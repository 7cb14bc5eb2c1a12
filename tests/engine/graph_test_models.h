// Whole models as GraphSpecs, written as an ONNX export of the PyTorch modules would write
// them: a pre-norm residual LayerNorm MLP and a GPT-2-style decoder. Free of the test framework:
// bench/engine_bench.cc builds its case (e) with GptSpec too.
#ifndef GRADSERVE_TESTS_ENGINE_GRAPH_TEST_MODELS_H_
#define GRADSERVE_TESTS_ENGINE_GRAPH_TEST_MODELS_H_

#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "tests/engine/graph_spec_builder.h"

namespace gradserve::engine::graph::testing {

// y = x @ W^T + b for x of any rank >= 2, W in nn.Linear layout [out, in] (MatMul with the
// transposed weight, then Add: what torch.onnx exports for a Linear on a 3-D input).
inline std::string Linear(SpecBuilder& b, const std::string& prefix, const std::string& x,
                          int64_t in, int64_t out) {
  b.Param(prefix + ".weight", {out, in}).Param(prefix + ".bias", {out});
  b.Node("Transpose", {prefix + ".weight"}, {prefix + ".weight_t"},
         {{"perm", std::vector<int64_t>{1, 0}}});
  b.Node("MatMul", {x, prefix + ".weight_t"}, {prefix + ".mm"});
  b.Node("Add", {prefix + ".mm", prefix + ".bias"}, {prefix + ".out"});
  return prefix + ".out";
}

inline std::string LayerNorm(SpecBuilder& b, const std::string& prefix, const std::string& x,
                             int64_t d) {
  b.Param(prefix + ".weight", {d}).Param(prefix + ".bias", {d});
  b.Node("LayerNormalization", {x, prefix + ".weight", prefix + ".bias"}, {prefix + ".out"});
  return prefix + ".out";
}

// x [batch, d] -> blocks of x + fc2(gelu(fc1(ln(x)))) -> ln_f -> head [batch, out]; MSE loss
// against float input "targets".
inline GraphSpec ResidualMlpSpec(int64_t d, int64_t hidden, int64_t out, int blocks,
                                 DType dtype = DType::kFloat64) {
  SpecBuilder b;
  b.Input("x", dtype).Input("targets", dtype);
  std::string x = "x";
  for (int l = 0; l < blocks; ++l) {
    const std::string p = absl::StrCat("blocks.", l);
    const std::string h = LayerNorm(b, p + ".ln", x, d);
    b.Param(p + ".fc1.weight", {hidden, d}).Param(p + ".fc1.bias", {hidden});
    b.Node("Gemm", {h, p + ".fc1.weight", p + ".fc1.bias"}, {p + ".fc1"}, {{"transB", int64_t{1}}});
    b.Node("Gelu", {p + ".fc1"}, {p + ".act"});
    b.Param(p + ".fc2.weight", {d, hidden}).Param(p + ".fc2.bias", {d});
    b.Node("Gemm", {p + ".act", p + ".fc2.weight", p + ".fc2.bias"}, {p + ".fc2"},
           {{"transB", int64_t{1}}});
    b.Node("Add", {x, p + ".fc2"}, {p + ".residual"});
    x = p + ".residual";
  }
  const std::string h = LayerNorm(b, "ln_f", x, d);
  b.Param("head.weight", {out, d}).Param("head.bias", {out});
  b.Node("Gemm", {h, "head.weight", "head.bias"}, {"y"}, {{"transB", int64_t{1}}});
  return b.WithLoss("y", LossKind::kMse, "targets");
}

struct GptConfig {
  int64_t batch = 2, seq = 4, vocab = 7, d = 8, heads = 2;
  int blocks = 2;
  DType dtype = DType::kFloat64;
  int64_t ignore_index = -1;
};

// GPT-2: token + position embeddings (Gather), pre-norm blocks of causal multi-head
// self-attention and a GELU MLP with residual Adds, a final LayerNorm and an LM head tied to the
// token embedding (MatMul with wte transposed); cross-entropy over [B, T, V] logits against int64
// "targets" [B, T] with ignore_index. Input "ids" int64 [B, T].
inline GraphSpec GptSpec(const GptConfig& c) {
  SpecBuilder b;
  const int64_t d = c.d, hd = c.d / c.heads, t = c.seq;
  b.Input("ids", DType::kInt64).Input("targets", DType::kInt64);
  b.Param("wte.weight", {c.vocab, d}).Param("wpe.weight", {t, d});
  std::vector<int64_t> positions(t), mask(t * t);
  for (int64_t i = 0; i < t; ++i) positions[i] = i;
  for (int64_t i = 0; i < t * t; ++i) mask[i] = 1;
  b.Ints("positions", {t}, positions).Ints("ones", {t, t}, mask, DType::kBool);
  b.Ints("tril_k", {}, {0});
  b.Node("Trilu", {"ones", "tril_k"}, {"causal"}, {{"upper", int64_t{0}}});
  b.Floats("neg_inf", {}, {-std::numeric_limits<double>::infinity()});
  b.Floats("scale", {}, {1.0 / std::sqrt(static_cast<double>(hd))});
  b.Ints("split_heads", {4}, {0, 0, c.heads, hd}).Ints("merge_heads", {3}, {0, 0, d});
  b.Node("Gather", {"wte.weight", "ids"}, {"tok_emb"});
  b.Node("Gather", {"wpe.weight", "positions"}, {"pos_emb"});
  b.Node("Add", {"tok_emb", "pos_emb"}, {"x0"});
  std::string x = "x0";
  for (int l = 0; l < c.blocks; ++l) {
    const std::string p = absl::StrCat("h.", l);
    const std::string h = LayerNorm(b, p + ".ln_1", x, d);
    const std::string qkv = Linear(b, p + ".attn.c_attn", h, d, 3 * d);
    b.Node("Split", {qkv}, {p + ".q", p + ".k", p + ".v"},
           {{"axis", int64_t{2}}, {"num_outputs", int64_t{3}}});
    for (const char* n : {"q", "k", "v"}) {
      b.Node("Reshape", {p + "." + n, "split_heads"}, {p + "." + n + "4"});
    }
    const std::vector<int64_t> heads_first = {0, 2, 1, 3};
    b.Node("Transpose", {p + ".q4"}, {p + ".qh"}, {{"perm", heads_first}});
    b.Node("Transpose", {p + ".k4"}, {p + ".kt"}, {{"perm", std::vector<int64_t>{0, 2, 3, 1}}});
    b.Node("Transpose", {p + ".v4"}, {p + ".vh"}, {{"perm", heads_first}});
    b.Node("MatMul", {p + ".qh", p + ".kt"}, {p + ".scores"});
    b.Node("Mul", {p + ".scores", "scale"}, {p + ".scaled"});
    b.Node("Where", {"causal", p + ".scaled", "neg_inf"}, {p + ".masked"});
    b.Node("Softmax", {p + ".masked"}, {p + ".probs"}, {{"axis", int64_t{-1}}});
    b.Node("MatMul", {p + ".probs", p + ".vh"}, {p + ".ctx"});
    b.Node("Transpose", {p + ".ctx"}, {p + ".ctx_t"}, {{"perm", heads_first}});
    b.Node("Reshape", {p + ".ctx_t", "merge_heads"}, {p + ".ctx_m"});
    const std::string proj = Linear(b, p + ".attn.c_proj", p + ".ctx_m", d, d);
    b.Node("Add", {x, proj}, {p + ".res1"});
    const std::string h2 = LayerNorm(b, p + ".ln_2", p + ".res1", d);
    const std::string fc = Linear(b, p + ".mlp.c_fc", h2, d, 4 * d);
    b.Node("Gelu", {fc}, {p + ".gelu"}, {{"approximate", std::string("tanh")}});
    const std::string out = Linear(b, p + ".mlp.c_proj", p + ".gelu", 4 * d, d);
    b.Node("Add", {p + ".res1", out}, {p + ".res2"});
    x = p + ".res2";
  }
  const std::string hf = LayerNorm(b, "ln_f", x, d);
  b.Node("Transpose", {"wte.weight"}, {"lm_head"}, {{"perm", std::vector<int64_t>{1, 0}}});
  b.Node("MatMul", {hf, "lm_head"}, {"logits"});
  return b.WithLoss("logits", LossKind::kCrossEntropy, "targets", Reduction::kMean, c.ignore_index);
}

}  // namespace gradserve::engine::graph::testing

#endif  // GRADSERVE_TESTS_ENGINE_GRAPH_TEST_MODELS_H_
