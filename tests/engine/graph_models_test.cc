// Whole graphs: the graph form of a chain MLP bit-identical to the chain executor; a residual
// LayerNorm MLP and a GPT-2-style decoder against finite differences; fan-out, tied weights,
// cross-entropy with ignore_index; bit-identical reruns; cancellation.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/engine/backprop.h"
#include "server/engine/checkpoint.h"
#include "server/engine/graph/chain.h"
#include "tests/engine/graph_test_models.h"
#include "tests/engine/graph_test_util.h"

namespace gradserve::engine::graph {
namespace {

using testing::GptConfig;
using testing::GptSpec;
using testing::Harness;
using testing::ResidualMlpSpec;
using testing::SpecBuilder;

// ---- The chain as a graph -------------------------------------------------------------------

struct ChainCase {
  const char* name;
  LossKind loss;
  int threads;
  int64_t batch;
  int64_t width;  // Hidden width; large enough to take the parallel and oneDNN paths.
};

std::ostream& operator<<(std::ostream& os, const ChainCase& c) { return os << c.name; }

ModelSpec ChainMlp(int64_t in, int64_t width, int64_t out, LossKind loss) {
  ModelSpec m;
  auto linear = [](int64_t i, int64_t o, bool bias = true) {
    LayerSpec l;
    l.kind = LayerKind::kLinear;
    l.in_features = i;
    l.out_features = o;
    l.bias = bias;
    return l;
  };
  auto act = [](LayerKind kind) {
    LayerSpec l;
    l.kind = kind;
    l.negative_slope = 0.05;
    return l;
  };
  m.layers = {linear(in, width),          act(LayerKind::kReLU),       linear(width, width),
              act(LayerKind::kGelu),      linear(width, width, false), act(LayerKind::kTanh),
              act(LayerKind::kLeakyReLU), linear(width, width),        act(LayerKind::kSigmoid),
              act(LayerKind::kGeluTanh),  linear(width, out),          act(LayerKind::kIdentity)};
  m.loss.kind = loss;
  return m;
}

template <typename T>
void ExpectChainAndGraphBitIdentical(const ChainCase& c) {
  const int64_t in = 7, out = 5;
  const ModelSpec spec = ChainMlp(in, c.width, out, c.loss);
  absl::StatusOr<Model> model = Model::Create(spec, in);
  ASSERT_TRUE(model.ok()) << model.status();
  absl::StatusOr<CheckpointPlan> plan = PlanCheckpoints(*model, c.batch, sizeof(T), {});
  ASSERT_TRUE(plan.ok()) << plan.status();

  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> uniform(-1, 1);
  std::vector<std::vector<T>> params;
  std::vector<LinearParamsView<T>> views;
  for (int l = 0; l < model->num_linear(); ++l) {
    const LayerSpec& layer = model->layer(model->linear_layer(l));
    std::vector<T> w(layer.out_features * layer.in_features),
        b(layer.bias ? layer.out_features : 0);
    const double scale = 1.5 / std::sqrt(static_cast<double>(layer.in_features));
    for (T& x : w) x = static_cast<T>(scale * uniform(rng));
    for (T& x : b) x = static_cast<T>(0.3 * uniform(rng));
    params.push_back(std::move(w));
    params.push_back(std::move(b));
  }
  for (int l = 0; l < model->num_linear(); ++l) {
    views.push_back(
        {params[2 * l].data(), params[2 * l + 1].empty() ? nullptr : params[2 * l + 1].data()});
  }
  std::vector<T> x(c.batch * in), targets(c.batch * out);
  std::vector<int64_t> classes(c.batch);
  for (T& v : x) v = static_cast<T>(uniform(rng));
  for (T& v : targets) v = static_cast<T>(uniform(rng));
  for (int64_t& k : classes) k = static_cast<int64_t>(rng() % out);

  // The chain.
  std::vector<std::vector<T>> chain_grads;
  std::vector<LinearGradsView<T>> grad_views;
  for (const auto& p : params) chain_grads.emplace_back(p.size());
  for (int l = 0; l < model->num_linear(); ++l) {
    grad_views.push_back({chain_grads[2 * l].data(),
                          params[2 * l + 1].empty() ? nullptr : chain_grads[2 * l + 1].data()});
  }
  std::vector<T> chain_dx(x.size()), chain_out(c.batch * out);
  BatchView<T> batch;
  batch.batch = c.batch;
  batch.inputs = x.data();
  batch.targets.targets = targets.data();
  batch.targets.class_targets = classes.data();
  OutputsView<T> outputs{grad_views, chain_dx.data(), chain_out.data()};
  RunOptions run;
  run.threads = c.threads;
  absl::StatusOr<RunResult> chain = RunBackprop<T>(*model, *plan, views, batch, outputs, run);
  ASSERT_TRUE(chain.ok()) << chain.status();

  // The graph.
  const DType dtype = sizeof(T) == 4 ? DType::kFloat32 : DType::kFloat64;
  PlanOptions options;
  options.dtype = dtype;
  options.input_shapes = {{c.batch, in},
                          c.loss == LossKind::kCrossEntropy ? Shape{c.batch} : Shape{c.batch, out}};
  options.input_gradients = {"input"};
  absl::StatusOr<Graph> graph = Graph::Create(ChainToGraph(spec, dtype), options);
  ASSERT_TRUE(graph.ok()) << graph.status();
  GraphInputs<T> gin;
  gin.inputs = {x.data(), c.loss == LossKind::kCrossEntropy
                              ? static_cast<const void*>(classes.data())
                              : static_cast<const void*>(targets.data())};
  std::vector<std::vector<T>> graph_grads;
  GraphOutputs<T> gout;
  for (const auto& p : params) {
    if (p.empty()) continue;
    gin.parameters.push_back(p.data());
    graph_grads.emplace_back(p.size(), T(NAN));
  }
  for (auto& g : graph_grads) gout.parameter_gradients.push_back(g.data());
  std::vector<T> graph_dx(x.size(), T(NAN)), graph_out(chain_out.size(), T(NAN));
  gout.input_gradients = {graph_dx.data(), nullptr};
  gout.outputs = {graph_out.data()};
  GraphRunOptions grun;
  grun.threads = c.threads;
  absl::StatusOr<GraphRunResult> result = RunGraph<T>(*graph, gin, gout, grun);
  ASSERT_TRUE(result.ok()) << result.status();

  EXPECT_EQ(std::memcmp(&chain->loss, &result->loss, sizeof(double)), 0)
      << chain->loss << " vs " << result->loss;
  EXPECT_EQ(chain_out, graph_out);
  EXPECT_EQ(chain_dx, graph_dx);
  size_t g = 0;
  for (size_t p = 0; p < params.size(); ++p) {
    if (params[p].empty()) continue;
    EXPECT_EQ(chain_grads[p], graph_grads[g]) << graph->spec().parameters[g].name;
    ++g;
  }
}

class GraphChainEquivalence : public ::testing::TestWithParam<ChainCase> {};

TEST_P(GraphChainEquivalence, GraphFormOfAnMlpIsBitIdenticalToTheChainInFloat32) {
  ExpectChainAndGraphBitIdentical<float>(GetParam());
}

TEST_P(GraphChainEquivalence, GraphFormOfAnMlpIsBitIdenticalToTheChainInFloat64) {
  ExpectChainAndGraphBitIdentical<double>(GetParam());
}

INSTANTIATE_TEST_SUITE_P(
    Chains, GraphChainEquivalence,
    ::testing::Values(ChainCase{"MseOneThread", LossKind::kMse, 1, 6, 9},
                      ChainCase{"MseTwoThreads", LossKind::kMse, 2, 6, 9},
                      ChainCase{"CrossEntropyTwoThreads", LossKind::kCrossEntropy, 2, 5, 12},
                      ChainCase{"HuberLargeOneThread", LossKind::kHuber, 1, 96, 384},
                      ChainCase{"BceLargeTwoThreads", LossKind::kBceWithLogits, 2, 96, 384}),
    [](const ::testing::TestParamInfo<ChainCase>& info) { return std::string(info.param.name); });

// ---- Models against finite differences --------------------------------------------------------

TEST(GraphModels, PreNormResidualLayerNormMlpMatchesFiniteDifferencesWithInputGradient) {
  Harness h(ResidualMlpSpec(/*d=*/5, /*hidden=*/7, /*out=*/3, /*blocks=*/2), {{4, 5}, {4, 3}},
            {"x"});
  ASSERT_TRUE(h.Plan().ok()) << h.Plan();
  h.Fill(11, 0.8);
  ASSERT_TRUE(h.Run().ok());
  EXPECT_GRADIENTS_MATCH(h);
}

Harness MakeGpt(const GptConfig& c, uint64_t seed) {
  Harness h(GptSpec(c), {{c.batch, c.seq}, {c.batch, c.seq}});
  EXPECT_TRUE(h.Plan().ok()) << h.Plan();
  h.Fill(seed, 0.5);
  std::mt19937_64 rng(seed);
  std::vector<int64_t> ids(c.batch * c.seq), targets(c.batch * c.seq);
  for (int64_t& v : ids) v = static_cast<int64_t>(rng() % c.vocab);
  for (int64_t& v : targets) v = static_cast<int64_t>(rng() % c.vocab);
  targets[1] = c.ignore_index;  // Ignored positions contribute nothing.
  targets[c.seq] = c.ignore_index;
  h.SetInts("ids", ids);
  h.SetInts("targets", targets);
  return h;
}

TEST(GraphModels, TwoBlockGptDecoderWithTiedHeadMatchesFiniteDifferences) {
  Harness h = MakeGpt(GptConfig{}, 3);
  absl::StatusOr<GraphRunResult> result = h.Run();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(std::isfinite(result->loss));
  EXPECT_GRADIENTS_MATCH(h);
}

TEST(GraphModels, FusedAndUnfusedPlansAgreeAndBothMatchFiniteDifferences) {
  Harness fused = MakeGpt(GptConfig{}, 5);
  GptConfig c;
  Harness plain(GptSpec(c), {{c.batch, c.seq}, {c.batch, c.seq}});
  plain.options_.fuse = false;
  ASSERT_TRUE(plain.Plan().ok());
  plain.params_ = fused.params_;
  plain.floats_ = fused.floats_;
  plain.ints_ = fused.ints_;
  // Every Linear's weight Transpose is read in place by its MatMul, and its bias Add folded in
  // (4 per block); the tied head's Transpose too.
  // (and the attention's scale and mask folded into its Softmax: 2 per block; its heads' three
  // Reshapes and three Transposes written by the Split of q, k, v: 6 per block).
  const int linears = 4 * c.blocks;
  EXPECT_EQ(plain.graph().steps().size(),
            fused.graph().steps().size() + 2 * linears + 1 + 2 * c.blocks + 6 * c.blocks);
  for (const Step& step : fused.graph().steps()) {
    EXPECT_NE(fused.spec_.nodes[step.node].name, "lm_head");
  }
  absl::StatusOr<GraphRunResult> a = fused.Run();
  absl::StatusOr<GraphRunResult> b = plain.Run();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NEAR(a->loss, b->loss, 1e-14);
  for (size_t p = 0; p < fused.grads_.size(); ++p) {
    for (size_t j = 0; j < fused.grads_[p].size(); ++j) {
      ASSERT_NEAR(fused.grads_[p][j], plain.grads_[p][j], 1e-13) << fused.spec_.parameters[p].name;
    }
  }
  EXPECT_GRADIENTS_MATCH(plain);
}

// The attention pattern Softmax(Where(mask, scores * scale, -inf)) fused into one kernel gives
// the three nodes' bits, forward and backward, in float32 (and matches finite differences).
TEST(GraphModels, FusedMaskedSoftmaxIsBitIdenticalToItsThreeNodes) {
  auto spec = [](DType dtype) {
    SpecBuilder b;
    b.Input("w", dtype).Param("scores", {2, 3, 40, 40});
    std::vector<int64_t> ones(40 * 40, 1);
    b.Ints("ones", {40, 40}, ones, DType::kBool)
        .Node("Trilu", {"ones"}, {"causal"}, {{"upper", int64_t{0}}});
    b.Floats("scale", {}, {0.125}).Floats("neg_inf", {}, {-INFINITY});
    b.Node("Mul", {"scale", "scores"}, {"scaled"});
    b.Node("Where", {"causal", "scaled", "neg_inf"}, {"masked"});
    b.Node("Softmax", {"masked"}, {"probs"});
    b.Node("Mul", {"probs", "w"}, {"y"});
    GraphSpec g = b.spec();
    g.outputs = {"y", "probs"};
    g.loss.kind = LossKind::kExternal;
    g.loss.output = "y";
    g.loss.target = "w";
    // The external loss needs the target of y's shape; w is also a factor, so the loss is
    // sum(probs * w * w): fine for gradients.
    return g;
  };
  for (bool fuse : {true, false}) {
    Harness h(spec(DType::kFloat64), {{2, 3, 40, 40}});
    h.options_.fuse = fuse;
    ASSERT_TRUE(h.Plan().ok()) << h.Plan();
    EXPECT_EQ(h.graph().steps().size(), fuse ? 2u : 4u);
    h.Fill(21, 2.0);
    ASSERT_TRUE(h.Run(2).ok());
    EXPECT_GRADIENTS_MATCH(h);
  }
  std::vector<std::vector<float>> results[2];
  for (int fuse = 0; fuse < 2; ++fuse) {
    PlanOptions options;
    options.dtype = DType::kFloat32;
    options.input_shapes = {{2, 3, 40, 40}};
    options.fuse = fuse;
    GraphSpec g = spec(DType::kFloat32);
    absl::StatusOr<Graph> graph = Graph::Create(g, options);
    ASSERT_TRUE(graph.ok()) << graph.status();
    std::mt19937_64 rng(4);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::vector<float> scores(2 * 3 * 40 * 40), w(scores.size()), grad(scores.size()),
        y(scores.size()), probs(scores.size());
    for (float& v : scores) v = normal(rng);
    for (float& v : w) v = normal(rng);
    GraphInputs<float> in;
    in.inputs = {w.data()};
    in.parameters = {scores.data()};
    GraphOutputs<float> out;
    out.parameter_gradients = {grad.data()};
    out.outputs = {y.data(), probs.data()};
    GraphRunOptions run;
    run.threads = 2;
    ASSERT_TRUE(RunGraph<float>(*graph, in, out, run).ok());
    results[fuse] = {grad, probs};
  }
  EXPECT_EQ(results[0][1], results[1][1]);  // probs
  EXPECT_EQ(
      std::memcmp(results[0][0].data(), results[1][0].data(), sizeof(float) * results[0][0].size()),
      0);
}

TEST(GraphModels, ATransposeReadBySeveralNodesIsKept) {
  SpecBuilder b;
  b.Param("a", {3, 4}).Param("m", {3, 5});
  b.Node("Transpose", {"a"}, {"at"});    // [4, 3]
  b.Node("MatMul", {"at", "m"}, {"p"});  // Fused: reads a transposed...
  b.Node("Tanh", {"at"}, {"t"});         // ... but Tanh reads the Transpose.
  b.Node("ReduceSum", {"t"}, {"s"}, {{"keepdims", int64_t{1}}});
  b.Node("Mul", {"p", "s"}, {"y"});
  Harness h(b.WeightedSum("y"), {{4, 5}});
  ASSERT_TRUE(h.Plan().ok()) << h.Plan();
  EXPECT_EQ(h.graph().steps().size(), 5u);
  h.Fill(6);
  ASSERT_TRUE(h.Run().ok());
  EXPECT_GRADIENTS_MATCH(h);
}

// Attention's K^T as one Transpose (0, 2, 3, 1) of [B, T, H, hd]: the planner copies by
// (0, 2, 1, 3) and the MatMul reads the copy transposed. Same gradients (finite differences in
// float64), and in float32 the same bits as the unfused plan at 1 and 2 threads.
TEST(GraphModels, AnyTransposeIntoAMatMulCopiesRowsAndIsReadTransposed) {
  auto spec = [](DType dtype) {
    SpecBuilder b;
    b.Param("q", {2, 3, 128, 64}).Param("k4", {2, 128, 3, 64});
    b.Node("Transpose", {"k4"}, {"kt"}, {{"perm", std::vector<int64_t>{0, 2, 3, 1}}});
    b.Node("MatMul", {"q", "kt"}, {"y"});
    GraphSpec g = b.WeightedSum("y");
    g.inputs[0].dtype = dtype;  // "w"
    g.outputs = {"y"};
    return g;
  };
  Harness h(spec(DType::kFloat64), {{2, 3, 128, 128}});
  ASSERT_TRUE(h.Plan().ok()) << h.Plan();
  ASSERT_EQ(h.graph().steps().size(), 2u);
  const int kt = h.graph().steps()[1].inputs[1];
  EXPECT_EQ(h.graph().values()[kt].type.shape, (Shape{2, 3, 128, 64}));  // Copied by (0, 2, 1, 3).
  h.Fill(8);
  ASSERT_TRUE(h.Run().ok());
  EXPECT_GRADIENTS_MATCH(h);

  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(2 * 3 * 128 * 64), k4(q.size()), w(2 * 3 * 128 * 128);
  for (auto* v : {&q, &k4, &w}) {
    for (float& x : *v) x = normal(rng);
  }
  for (int threads : {1, 2}) {
    std::vector<float> results[2][3];
    for (int fuse = 0; fuse < 2; ++fuse) {
      PlanOptions options;
      options.dtype = DType::kFloat32;
      options.input_shapes = {{2, 3, 128, 128}};
      options.fuse = fuse;
      absl::StatusOr<Graph> graph = Graph::Create(spec(DType::kFloat32), options);
      ASSERT_TRUE(graph.ok()) << graph.status();
      std::vector<float>* r = results[fuse];
      r[0].resize(q.size()), r[1].resize(k4.size()), r[2].resize(w.size());
      GraphInputs<float> in;
      in.inputs = {w.data()};
      in.parameters = {q.data(), k4.data()};
      GraphOutputs<float> out;
      out.parameter_gradients = {r[0].data(), r[1].data()};
      out.outputs = {r[2].data()};
      GraphRunOptions run;
      run.threads = threads;
      ASSERT_TRUE(RunGraph<float>(*graph, in, out, run).ok());
    }
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(std::memcmp(results[0][i].data(), results[1][i].data(),
                            sizeof(float) * results[0][i].size()),
                0)
          << "tensor " << i << ", " << threads << " thread(s)";
    }
  }
}

// Split pieces each reshaped (no copy needed) and transposed are written by the Split in the
// Transpose's layout: the Reshapes and Transposes leave the plan, and the outputs and gradients
// are the unfused plan's bits. A piece whose Reshape would need a copy, or whose Reshape has
// another reader, keeps its nodes.
TEST(GraphModels, SplitPiecesReshapedAndTransposedAreWrittenInPlace) {
  SpecBuilder b;
  b.Param("x", {2, 6, 16}).Floats("w2", {1}, {1.5});
  b.Node("Split", {"x"}, {"p0", "p1", "p2", "p3"},
         {{"axis", int64_t{2}}, {"num_outputs", int64_t{4}}});  // [2, 6, 4] each
  b.Ints("s4", {4}, {2, 6, 2, 2}).Ints("s2", {2}, {12, 4}).Ints("s3", {3}, {2, 2, 12});
  b.Ints("flat", {1}, {-1});
  b.Node("Reshape", {"p0", "s4"}, {"r0"});
  b.Node("Transpose", {"r0"}, {"t0"}, {{"perm", std::vector<int64_t>{0, 2, 1, 3}}});
  b.Node("Reshape", {"p1", "s2"}, {"r1"});  // Merges [2, 6]: contiguous in x.
  b.Node("Transpose", {"r1"}, {"t1"}, {{"perm", std::vector<int64_t>{1, 0}}});
  b.Node("Reshape", {"p2", "s3"}, {"r2"});  // [2, 6, 4] -> [2, 2, 12] of a window: a copy.
  b.Node("Transpose", {"r2"}, {"t2"}, {{"perm", std::vector<int64_t>{2, 1, 0}}});
  b.Node("Reshape", {"p3", "s4"}, {"r3"});
  b.Node("Transpose", {"r3"}, {"t3"}, {{"perm", std::vector<int64_t>{3, 2, 1, 0}}});
  b.Node("Tanh", {"r3"}, {"t3b"});  // r3 has another reader: p3's nodes are kept.
  b.Node("Mul", {"t3", "w2"}, {"t3c"});
  std::vector<std::string> flat;
  for (const char* v : {"t0", "t1", "t2", "t3b", "t3c"}) {
    b.Node("Reshape", {v, "flat"}, {std::string(v) + "f"});
    flat.push_back(std::string(v) + "f");
  }
  b.Node("Concat", flat, {"all"}, {{"axis", int64_t{0}}});
  const GraphSpec spec = b.WeightedSum("all");
  Harness fused(spec, {{5 * 48}});
  Harness plain(spec, {{5 * 48}});
  plain.options_.fuse = false;
  ASSERT_TRUE(fused.Plan().ok()) << fused.Plan();
  ASSERT_TRUE(plain.Plan().ok());
  // p0's and p1's Reshape and Transpose are gone; p2 (a copying Reshape) and p3 keep theirs.
  EXPECT_EQ(plain.graph().steps().size(), fused.graph().steps().size() + 4);
  fused.Fill(12);
  plain.params_ = fused.params_;
  plain.floats_ = fused.floats_;
  ASSERT_TRUE(fused.Run().ok());
  ASSERT_TRUE(plain.Run().ok());
  EXPECT_EQ(fused.outputs_, plain.outputs_);
  EXPECT_EQ(fused.grads_, plain.grads_);
  EXPECT_GRADIENTS_MATCH(fused);
}

TEST(GraphModels, GptRunsAreBitIdenticalRunToRunInFloat32) {
  GptConfig c;
  c.batch = 4, c.seq = 32, c.vocab = 64, c.d = 64, c.heads = 4, c.blocks = 2;
  c.dtype = DType::kFloat32;
  const GraphSpec spec = GptSpec(c);
  PlanOptions options;
  options.dtype = DType::kFloat32;
  options.input_shapes = {{c.batch, c.seq}, {c.batch, c.seq}};
  absl::StatusOr<Graph> graph = Graph::Create(spec, options);
  ASSERT_TRUE(graph.ok()) << graph.status();
  std::mt19937_64 rng(9);
  std::uniform_real_distribution<float> uniform(-0.5f, 0.5f);
  std::vector<std::vector<float>> params;
  GraphInputs<float> in;
  for (const ParameterSpec& p : spec.parameters) {
    params.emplace_back(NumElements(p.shape));
    for (float& x : params.back()) x = uniform(rng);
    in.parameters.push_back(params.back().data());
  }
  std::vector<int64_t> ids(c.batch * c.seq), targets(c.batch * c.seq);
  for (int64_t& v : ids) v = static_cast<int64_t>(rng() % c.vocab);
  for (int64_t& v : targets) v = static_cast<int64_t>(rng() % c.vocab);
  in.inputs = {ids.data(), targets.data()};
  for (int threads : {1, 2}) {
    std::vector<std::vector<float>> first;
    double first_loss = 0;
    for (int run = 0; run < 3; ++run) {
      std::vector<std::vector<float>> grads;
      GraphOutputs<float> out;
      for (const auto& p : params) grads.emplace_back(p.size());
      for (auto& g : grads) out.parameter_gradients.push_back(g.data());
      GraphRunOptions options;
      options.threads = threads;
      absl::StatusOr<GraphRunResult> result = RunGraph<float>(*graph, in, out, options);
      ASSERT_TRUE(result.ok()) << result.status();
      EXPECT_LE(result->peak_bytes, graph->costs().peak_bytes);
      if (run == 0) {
        first = grads;
        first_loss = result->loss;
        continue;
      }
      EXPECT_EQ(std::memcmp(&first_loss, &result->loss, sizeof(double)), 0);
      for (size_t p = 0; p < grads.size(); ++p) {
        EXPECT_EQ(std::memcmp(first[p].data(), grads[p].data(), sizeof(float) * grads[p].size()), 0)
            << spec.parameters[p].name << " threads " << threads;
      }
    }
  }
}

// ---- Fan-out, tied weights, cross-entropy ---------------------------------------------------

TEST(GraphModels, FanOutAndAValueUsedTwiceByOneNodeSumTheirGradients) {
  SpecBuilder b;
  b.Param("a", {3, 4});
  b.Node("Tanh", {"a"}, {"t"}).Node("Mul", {"t", "t"}, {"sq"}).Node("Add", {"sq", "t"}, {"s"});
  b.Node("Sigmoid", {"t"}, {"u"}).Node("Mul", {"s", "u"}, {"y"});
  Harness h(b.WeightedSum("y"), {{3, 4}});
  ASSERT_TRUE(h.Plan().ok()) << h.Plan();
  h.Fill(2);
  ASSERT_TRUE(h.Run().ok());
  EXPECT_GRADIENTS_MATCH(h);
}

TEST(GraphModels, ParameterUsedTwiceGetsTheSumOfItsGradients) {
  SpecBuilder b;
  b.Input("x").Param("m", {4, 4}).Param("e", {6, 4});
  b.Ints("ids", {3}, {5, 0, 5});
  b.Node("Gather", {"e", "ids"}, {"emb"});  // e used as a table...
  b.Node("MatMul", {"emb", "m"}, {"h"}).Node("Relu", {"h"}, {"r"});
  b.Node("MatMul", {"r", "m"}, {"h2"});  // ... m used twice ...
  b.Node("Transpose", {"e"}, {"e_t"}, {{"perm", std::vector<int64_t>{1, 0}}});
  b.Node("MatMul", {"h2", "e_t"}, {"logits"});  // ... and e as a tied head.
  b.Node("Add", {"logits", "x"}, {"y"});
  Harness h(b.WeightedSum("y"), {{3, 6}, {3, 6}}, {"x"});
  ASSERT_TRUE(h.Plan().ok()) << h.Plan();
  h.Fill(4);
  ASSERT_TRUE(h.Run().ok());
  EXPECT_GRADIENTS_MATCH(h);
}

TEST(GraphModels, CrossEntropyOverRank3LogitsIgnoresIgnoreIndexAndMeansOverTheRest) {
  for (Reduction reduction : {Reduction::kMean, Reduction::kSum}) {
    SpecBuilder b;
    b.Input("targets", DType::kInt64).Param("z", {2, 3, 5}).Node("Identity", {"z"}, {"logits"});
    Harness h(b.WithLoss("logits", LossKind::kCrossEntropy, "targets", reduction, 3), {{2, 3}});
    ASSERT_TRUE(h.Plan().ok()) << h.Plan();
    h.Fill(8);
    const std::vector<int64_t> t = {0, 3, 4, 3, 1, 2};  // Class 3 is the ignore_index.
    h.SetInts("targets", t);
    absl::StatusOr<GraphRunResult> result = h.Run();
    ASSERT_TRUE(result.ok()) << result.status();
    double expected = 0;
    int counted = 0;
    for (int r = 0; r < 6; ++r) {
      if (t[r] == 3) {
        for (int j = 0; j < 5; ++j) EXPECT_EQ(h.grads_[0][r * 5 + j], 0.0);
        continue;
      }
      double s = 0;
      for (int j = 0; j < 5; ++j) s += std::exp(h.params_[0][r * 5 + j]);
      expected += std::log(s) - h.params_[0][r * 5 + t[r]];
      ++counted;
    }
    if (reduction == Reduction::kMean) expected /= counted;
    EXPECT_NEAR(result->loss, expected, 1e-13);
    EXPECT_GRADIENTS_MATCH(h);
  }
}

TEST(GraphModels, ClassTargetOutOfRangeIsInvalidArgumentBeforeComputing) {
  GptConfig c;
  Harness h = MakeGpt(c, 1);
  std::vector<int64_t> targets(c.batch * c.seq, 0);
  targets[2] = c.vocab;
  h.SetInts("targets", targets);
  const auto result = h.Run();
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(result.status().message()), ::testing::HasSubstr("class index 7"));
}

TEST(GraphModels, ShouldStopCancelsBetweenNodes) {
  Harness h = MakeGpt(GptConfig{}, 1);
  GraphOutputs<double> out;
  std::vector<std::vector<double>> grads;
  for (const auto& p : h.params_) grads.emplace_back(p.size());
  for (auto& g : grads) out.parameter_gradients.push_back(g.data());
  int polls = 0;
  GraphRunOptions options;
  options.should_stop = [&] { return ++polls > 5; };
  const auto result = RunGraph<double>(h.graph(), h.Inputs(), out, options);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled);
}

TEST(GraphModels, DiagnosticsNameEveryParameterAndNodeOutput) {
  Harness h = MakeGpt(GptConfig{}, 2);
  absl::StatusOr<GraphRunResult> result = h.Run();
  ASSERT_TRUE(result.ok());
  ASSERT_EQ(result->parameter_grad_norms.size(), h.spec_.parameters.size());
  for (size_t p = 0; p < h.grads_.size(); ++p) {
    double s = 0;
    for (double g : h.grads_[p]) s += g * g;
    EXPECT_NEAR(result->parameter_grad_norms[p], std::sqrt(s), 1e-12 * (1 + std::sqrt(s)));
  }
  ASSERT_EQ(result->nodes.size(), h.spec_.nodes.size());
  // The logits' gradient is the loss's; the Trilu mask (constants only) has none: unset, not 0.
  for (size_t n = 0; n < h.spec_.nodes.size(); ++n) {
    if (h.spec_.nodes[n].outputs[0] == "logits") {
      ASSERT_TRUE(result->nodes[n][0].grad_norm.has_value());
      EXPECT_GT(*result->nodes[n][0].grad_norm, 0);
    }
    if (h.spec_.nodes[n].op_type == "Trilu") {
      EXPECT_FALSE(result->nodes[n][0].grad_norm.has_value());
    }
  }
}

// ---- Checkpointing ---------------------------------------------------------------------------

struct Float32Gpt {
  GraphSpec spec;
  std::vector<std::vector<float>> params;
  std::vector<int64_t> ids, targets;
  GraphInputs<float> in;
};

Float32Gpt MakeFloat32Gpt(const GptConfig& c) {
  Float32Gpt g;
  g.spec = GptSpec(c);
  std::mt19937_64 rng(17);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  for (const ParameterSpec& p : g.spec.parameters) {
    g.params.emplace_back(NumElements(p.shape));
    for (float& x : g.params.back()) x = normal(rng);
  }
  g.ids.resize(c.batch * c.seq);
  g.targets.resize(c.batch * c.seq);
  for (int64_t& v : g.ids) v = static_cast<int64_t>(rng() % c.vocab);
  for (int64_t& v : g.targets) v = static_cast<int64_t>(rng() % c.vocab);
  g.targets[3] = c.ignore_index;
  for (const auto& p : g.params) g.in.parameters.push_back(p.data());
  g.in.inputs = {g.ids.data(), g.targets.data()};
  return g;
}

struct Float32Run {
  GraphRunResult result;
  std::vector<std::vector<float>> grads;
};

Float32Run RunFloat32(const Graph& graph, const Float32Gpt& g, int threads) {
  Float32Run r;
  GraphOutputs<float> out;
  for (const auto& p : g.params) r.grads.emplace_back(p.size(), NAN);
  for (auto& grad : r.grads) out.parameter_gradients.push_back(grad.data());
  GraphRunOptions options;
  options.threads = threads;
  absl::StatusOr<GraphRunResult> result = RunGraph<float>(graph, g.in, out, options);
  EXPECT_TRUE(result.ok()) << result.status();
  if (result.ok()) r.result = *result;
  return r;
}

struct CheckpointCase {
  const char* name;
  CheckpointMode mode;
  int64_t every_k;
  int threads;
};

std::ostream& operator<<(std::ostream& os, const CheckpointCase& c) { return os << c.name; }

class GraphCheckpointing : public ::testing::TestWithParam<CheckpointCase> {};

TEST_P(GraphCheckpointing, IsBitIdenticalToNoCheckpointingAndHoldsLess) {
  GptConfig c;
  c.batch = 2, c.seq = 16, c.vocab = 32, c.d = 32, c.heads = 4, c.blocks = 4;
  c.dtype = DType::kFloat32;
  const Float32Gpt g = MakeFloat32Gpt(c);
  PlanOptions options;
  options.dtype = DType::kFloat32;
  options.input_shapes = {{c.batch, c.seq}, {c.batch, c.seq}};
  absl::StatusOr<Graph> plain = Graph::Create(g.spec, options);
  options.checkpoint = GetParam().mode;
  options.every_k = GetParam().every_k;
  absl::StatusOr<Graph> checkpointed = Graph::Create(g.spec, options);
  ASSERT_TRUE(plain.ok() && checkpointed.ok()) << checkpointed.status();
  // A cut after the embeddings and after each residual Add (two per block), and after ln_f.
  EXPECT_GE(checkpointed->cut_points().size(), static_cast<size_t>(2 * c.blocks + 1));
  EXPECT_GT(checkpointed->schedule().segments.size(), 1u);
  EXPECT_GT(checkpointed->costs().steps_recomputed, 0);
  EXPECT_LT(checkpointed->costs().peak_bytes, plain->costs().peak_bytes);

  const Float32Run a = RunFloat32(*plain, g, GetParam().threads);
  const Float32Run b = RunFloat32(*checkpointed, g, GetParam().threads);
  EXPECT_EQ(std::memcmp(&a.result.loss, &b.result.loss, sizeof(double)), 0);
  for (size_t p = 0; p < a.grads.size(); ++p) {
    EXPECT_EQ(std::memcmp(a.grads[p].data(), b.grads[p].data(), sizeof(float) * a.grads[p].size()),
              0)
        << g.spec.parameters[p].name;
  }
  EXPECT_EQ(a.result.parameter_grad_norms, b.result.parameter_grad_norms);
  for (size_t n = 0; n < a.result.nodes.size(); ++n) {
    for (size_t o = 0; o < a.result.nodes[n].size(); ++o) {
      EXPECT_EQ(a.result.nodes[n][o].grad_norm, b.result.nodes[n][o].grad_norm) << n;
      EXPECT_EQ(a.result.nodes[n][o].value_norm, b.result.nodes[n][o].value_norm) << n;
    }
  }
  EXPECT_EQ(b.result.steps_recomputed, checkpointed->costs().steps_recomputed);
  EXPECT_LE(a.result.peak_bytes, plain->costs().peak_bytes);
  EXPECT_LE(b.result.peak_bytes, checkpointed->costs().peak_bytes);
  EXPECT_LT(b.result.peak_bytes, a.result.peak_bytes);
}

INSTANTIATE_TEST_SUITE_P(
    Modes, GraphCheckpointing,
    ::testing::Values(CheckpointCase{"SqrtOneThread", CheckpointMode::kSqrt, 0, 1},
                      CheckpointCase{"SqrtTwoThreads", CheckpointMode::kSqrt, 0, 2},
                      CheckpointCase{"EveryCutPoint", CheckpointMode::kEveryK, 1, 2},
                      CheckpointCase{"EveryThirdCutPoint", CheckpointMode::kEveryK, 3, 1}),
    [](const ::testing::TestParamInfo<CheckpointCase>& info) {
      return std::string(info.param.name);
    });

TEST(GraphCheckpointingModels, DropoutMasksAreRegeneratedWhenASegmentIsRecomputed) {
  // A residual MLP with training-mode Dropout in every block, in float64: SQRT equals NONE to
  // the bit and matches finite differences.
  auto spec = [] {
    GraphSpec g = ResidualMlpSpec(6, 10, 3, 4);
    g.constants.push_back({"ratio", DType::kFloat64, {}, {0.3}, {}});
    g.constants.push_back({"train", DType::kBool, {}, {}, {1}});
    std::vector<NodeSpec> dropouts;  // Appended after the loop: g.nodes must not grow in it.
    for (NodeSpec& node : g.nodes) {
      if (node.op_type != "Gelu") continue;
      const std::string raw = node.outputs[0] + ".raw";
      NodeSpec dropout{node.name + ".dropout",
                       "Dropout",
                       {raw, "ratio", "train"},
                       {node.outputs[0]},
                       {{"seed", int64_t{static_cast<int64_t>(dropouts.size()) + 1}}}};
      node.outputs[0] = raw;
      dropouts.push_back(dropout);
    }
    g.nodes.insert(g.nodes.end(), dropouts.begin(), dropouts.end());
    return g;
  }();
  Harness none(spec, {{5, 6}, {5, 3}});
  Harness sqrt(spec, {{5, 6}, {5, 3}});
  sqrt.options_.checkpoint = CheckpointMode::kSqrt;
  ASSERT_TRUE(none.Plan().ok()) << none.Plan();
  ASSERT_TRUE(sqrt.Plan().ok());
  EXPECT_GT(sqrt.graph().costs().steps_recomputed, 0);
  none.Fill(12, 0.8);
  sqrt.Fill(12, 0.8);
  ASSERT_TRUE(none.Run().ok());
  ASSERT_TRUE(sqrt.Run().ok());
  EXPECT_EQ(none.grads_, sqrt.grads_);
  EXPECT_GRADIENTS_MATCH(sqrt);
}

TEST(GraphCheckpointingModels, BadOptionsAndUnreachableBudgetsAreRefusedAtPlanTime) {
  PlanOptions options;
  options.dtype = DType::kFloat64;
  options.input_shapes = {{2, 3}, {2, 3}};
  options.checkpoint = CheckpointMode::kEveryK;
  options.every_k = 0;
  const GraphSpec spec = ResidualMlpSpec(3, 4, 3, 2);
  EXPECT_THAT(std::string(Graph::Create(spec, options).status().message()),
              ::testing::HasSubstr("checkpoint.every_k"));
  options.checkpoint = CheckpointMode::kMemoryBudget;
  options.memory_budget_bytes = 0;
  EXPECT_THAT(std::string(Graph::Create(spec, options).status().message()),
              ::testing::HasSubstr("checkpoint.memory_budget_bytes: must be positive"));
  options.memory_budget_bytes = 16;
  const absl::Status tiny = Graph::Create(spec, options).status();
  EXPECT_EQ(tiny.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(tiny.message()), ::testing::HasSubstr("the least is"));
}

TEST(GraphCheckpointingModels, MemoryBudgetNeverRecomputesMoreThanSqrtAtSqrtsPeak) {
  GptConfig c;
  c.batch = 2, c.seq = 16, c.vocab = 32, c.d = 32, c.heads = 4, c.blocks = 6;
  c.dtype = DType::kFloat32;
  const Float32Gpt g = MakeFloat32Gpt(c);
  PlanOptions options;
  options.dtype = DType::kFloat32;
  options.input_shapes = {{c.batch, c.seq}, {c.batch, c.seq}};
  absl::StatusOr<Graph> none = Graph::Create(g.spec, options);
  options.checkpoint = CheckpointMode::kSqrt;
  absl::StatusOr<Graph> sqrt = Graph::Create(g.spec, options);
  ASSERT_TRUE(none.ok() && sqrt.ok());
  options.checkpoint = CheckpointMode::kMemoryBudget;
  options.memory_budget_bytes = sqrt->costs().peak_bytes;
  absl::StatusOr<Graph> budget = Graph::Create(g.spec, options);
  ASSERT_TRUE(budget.ok()) << budget.status();
  EXPECT_LE(budget->costs().peak_bytes, sqrt->costs().peak_bytes);
  EXPECT_LE(budget->costs().steps_recomputed, sqrt->costs().steps_recomputed);
  // A budget that fits everything recomputes nothing.
  options.memory_budget_bytes = none->costs().peak_bytes;
  absl::StatusOr<Graph> roomy = Graph::Create(g.spec, options);
  ASSERT_TRUE(roomy.ok());
  EXPECT_EQ(roomy->costs().steps_recomputed, 0);
  // And it computes the same bits.
  const Float32Run a = RunFloat32(*none, g, 2);
  const Float32Run b = RunFloat32(*budget, g, 2);
  for (size_t p = 0; p < a.grads.size(); ++p) {
    EXPECT_EQ(std::memcmp(a.grads[p].data(), b.grads[p].data(), sizeof(float) * a.grads[p].size()),
              0);
  }
  EXPECT_LE(b.result.peak_bytes, budget->costs().peak_bytes);
}

}  // namespace
}  // namespace gradserve::engine::graph
