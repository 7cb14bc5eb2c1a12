// Graph::Create: a table of malformed graphs, each with its status and the field its message
// names; limits enforced before anything is allocated; the deterministic order; the plan's
// costs and what it keeps; backward skipped where nothing needs it.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/graph_test_models.h"
#include "tests/engine/graph_test_util.h"

namespace gradserve::engine::graph {
namespace {

using testing::SpecBuilder;

// x [2, 3] -> fc (Gemm, W [4, 3], b [4]) -> Relu -> y; MSE against t [2, 4].
GraphSpec Base() {
  SpecBuilder b;
  b.Input("x").Input("t").Param("W", {4, 3}).Param("b", {4});
  b.Node("Gemm", {"x", "W", "b"}, {"h"}, {{"transB", int64_t{1}}}, "fc");
  b.Node("Relu", {"h"}, {"y"}, {}, "act");
  return b.WithLoss("y", LossKind::kMse, "t");
}

PlanOptions BaseOptions() {
  PlanOptions options;
  options.dtype = DType::kFloat64;
  options.input_shapes = {{2, 3}, {2, 4}};
  return options;
}

struct Malformed {
  const char* name;
  std::function<void(GraphSpec&, PlanOptions&)> mutate;
  absl::StatusCode code;
  const char* message;  // A substring of the status message (the field it names).
};

std::ostream& operator<<(std::ostream& os, const Malformed& m) { return os << m.name; }

const auto kInvalid = absl::StatusCode::kInvalidArgument;
const auto kExhausted = absl::StatusCode::kResourceExhausted;

std::vector<Malformed> Table() {
  return {
      {"UnknownOp", [](GraphSpec& g, PlanOptions&) { g.nodes[1].op_type = "Conv"; }, kInvalid,
       "graph.nodes[1] (\"act\", Conv).op_type: unknown operator \"Conv\""},
      {"UndefinedInput", [](GraphSpec& g, PlanOptions&) { g.nodes[0].inputs[1] = "V"; }, kInvalid,
       "graph.nodes[0] (\"fc\", Gemm).inputs[1]: value \"V\" is not defined"},
      {"DoublyDefinedValue", [](GraphSpec& g, PlanOptions&) { g.nodes[1].outputs[0] = "x"; },
       kInvalid,
       "graph.nodes[1] (\"act\", Relu).outputs[0]: value \"x\" is already defined by "
       "graph.inputs[0]"},
      {"Cycle",
       [](GraphSpec& g, PlanOptions&) {
         g.nodes[0].inputs[0] = "y";  // fc reads act's output, act reads fc's.
       },
       kInvalid, "graph.nodes[0] (\"fc\", Gemm): is on a cycle"},
      {"ShapeMismatch",
       [](GraphSpec& g, PlanOptions&) {
         g.parameters[0].shape = {4, 5};
       },
       kInvalid,
       "graph.nodes[0] (\"fc\", Gemm).inputs[1] (\"W\"): shape [4, 5] does not match inputs[0] [2, "
       "3]"},
      {"BiasDoesNotBroadcast", [](GraphSpec& g, PlanOptions&) { g.parameters[1].shape = {3}; },
       kInvalid, "graph.nodes[0] (\"fc\", Gemm).inputs[2] (\"b\"): shape [3] does not broadcast"},
      {"AttributeOutOfRange",
       [](GraphSpec& g, PlanOptions&) { g.nodes[0].attributes[0].value = int64_t{2}; }, kInvalid,
       "graph.nodes[0] (\"fc\", Gemm).attributes.transB: must be 0 or 1"},
      {"AttributeOfTheWrongType",
       [](GraphSpec& g, PlanOptions&) { g.nodes[0].attributes[0].value = 1.0; }, kInvalid,
       "graph.nodes[0] (\"fc\", Gemm).attributes.transB: expected an int"},
      {"UnknownAttribute",
       [](GraphSpec& g, PlanOptions&) {
         g.nodes[1].attributes.push_back({"alpha", 0.1});
       },
       kInvalid, "graph.nodes[1] (\"act\", Relu).attributes.alpha: not an attribute of Relu"},
      {"TooManyInputs", [](GraphSpec& g, PlanOptions&) { g.nodes[1].inputs.push_back("x"); },
       kInvalid, "graph.nodes[1] (\"act\", Relu).inputs: Relu takes 1 to 1 inputs, got 2"},
      {"GeluApproximationUnknown",
       [](GraphSpec& g, PlanOptions&) {
         g.nodes[1].op_type = "Gelu";
         g.nodes[1].attributes.push_back({"approximate", std::string("erf")});
       },
       kInvalid,
       "graph.nodes[1] (\"act\", Gelu).attributes.approximate: expected \"none\" or \"tanh\""},
      {"UnusedParameter",
       [](GraphSpec& g, PlanOptions&) {
         g.parameters.push_back({"extra", {2}});
       },
       kInvalid, "graph.parameters[2] (\"extra\"): is never used by any node"},
      {"EmptyValueName", [](GraphSpec& g, PlanOptions&) { g.parameters[1].name = ""; }, kInvalid,
       "graph.parameters[1].name: empty"},
      {"OutputUndefined", [](GraphSpec& g, PlanOptions&) { g.outputs.push_back("z"); }, kInvalid,
       "graph.outputs[1]: value \"z\" is not defined"},
      {"OutputListedTwice", [](GraphSpec& g, PlanOptions&) { g.outputs.push_back("y"); }, kInvalid,
       "graph.outputs[1]: \"y\" is already graph.outputs[0]"},
      {"LossOutputNotAGraphOutput", [](GraphSpec& g, PlanOptions&) { g.loss.output = "h"; },
       kInvalid, "graph.loss.output: \"h\" is not one of graph.outputs"},
      {"LossTargetNotAnInput", [](GraphSpec& g, PlanOptions&) { g.loss.target = "W"; }, kInvalid,
       "graph.loss.target: \"W\" is not a graph input"},
      {"LossTargetWrongShape",
       [](GraphSpec&, PlanOptions& o) {
         o.input_shapes[1] = {2, 3};
       },
       kInvalid, "graph.loss.target: expected float64 [2, 4]"},
      {"CrossEntropyFloatTargets",
       [](GraphSpec& g, PlanOptions&) { g.loss.kind = LossKind::kCrossEntropy; }, kInvalid,
       "graph.loss.target: cross-entropy needs int64 class indices of shape [2]"},
      {"NonPositiveHuberDelta",
       [](GraphSpec& g, PlanOptions&) {
         g.loss.kind = LossKind::kHuber;
         g.loss.huber_delta = 0;
       },
       kInvalid, "graph.loss.huber_delta"},
      {"InputOfAnotherFloatDtype",
       [](GraphSpec& g, PlanOptions&) { g.inputs[0].dtype = DType::kFloat32; }, kInvalid,
       "graph.inputs[0].dtype: float32 input in a float64 call"},
      {"WrongNumberOfInputShapes", [](GraphSpec&, PlanOptions& o) { o.input_shapes.pop_back(); },
       kInvalid, "inputs: 1 tensors for 2 graph inputs"},
      {"NegativeInputSize",
       [](GraphSpec&, PlanOptions& o) {
         o.input_shapes[0] = {-2, 3};
       },
       kInvalid, "inputs[0].shape: negative size"},
      {"ConstantDataOfTheWrongLength",
       [](GraphSpec& g, PlanOptions&) {
         g.constants.push_back({"c", DType::kFloat64, {2, 2}, {1, 2, 3}, {}});
       },
       kInvalid, "graph.constants[0].data: expected 4 values for shape [2, 2], got 3"},
      {"ReshapeShapeNotAConstant",
       [](GraphSpec& g, PlanOptions& o) {
         g.inputs.push_back({"s", DType::kInt64});
         o.input_shapes.push_back({2});
         g.nodes.push_back({"r", "Reshape", {"y", "s"}, {"r_out"}, {}});
       },
       kInvalid, "graph.nodes[2] (\"r\", Reshape).inputs[1] (\"s\"): must be a constant"},
      {"ReshapeElementCountMismatch",
       [](GraphSpec& g, PlanOptions&) {
         g.constants.push_back({"s", DType::kInt64, {2}, {}, {3, 3}});
         g.nodes.push_back({"r", "Reshape", {"y", "s"}, {"r_out"}, {}});
       },
       kInvalid,
       "(\"r\", Reshape).inputs[1] (\"s\"): shape [3, 3] has 9 elements, inputs[0] [2, 4] has 8"},
      {"GatherConstantIndexOutOfRange",
       [](GraphSpec& g, PlanOptions&) {
         g.constants.push_back({"i", DType::kInt64, {1}, {}, {7}});
         g.nodes.push_back({"g", "Gather", {"y", "i"}, {"g_out"}, {}});
       },
       kInvalid, "(\"g\", Gather).inputs[1] (\"i\"): index 7 is out of range for axis 0 of size 2"},
      {"SoftmaxAxisOutOfRange",
       [](GraphSpec& g, PlanOptions&) {
         g.nodes.push_back({"s", "Softmax", {"y"}, {"s_out"}, {{"axis", int64_t{2}}}});
       },
       kInvalid, "(\"s\", Softmax).attributes.axis: axis 2 is out of range for rank 2"},
      {"WhereConditionNotBool",
       [](GraphSpec& g, PlanOptions&) {
         g.nodes.push_back({"w", "Where", {"y", "y", "y"}, {"w_out"}, {}});
       },
       kInvalid, "(\"w\", Where).inputs[0] (\"y\"): expected bool, got float64"},
      {"DropoutTrainingWithoutSeed",
       [](GraphSpec& g, PlanOptions&) {
         g.constants.push_back({"on", DType::kBool, {}, {}, {1}});
         g.nodes.push_back({"d", "Dropout", {"y", "", "on"}, {"d_out"}, {}});
       },
       kInvalid, "(\"d\", Dropout).attributes.seed: required when training_mode is true"},
      {"InputGradientOfAnIntInput",
       [](GraphSpec& g, PlanOptions& o) {
         g.inputs.push_back({"ids", DType::kInt64});
         o.input_shapes.push_back({2});
         o.input_gradients = {"ids"};
       },
       kInvalid, "input_gradients[0]: \"ids\" is not a floating graph input"},
      {"TooManyNodes", [](GraphSpec&, PlanOptions& o) { o.limits.max_nodes = 1; }, kExhausted,
       "graph.nodes: 2 nodes, over the limit of 1"},
      {"TooManyValues", [](GraphSpec&, PlanOptions& o) { o.limits.max_values = 5; }, kExhausted,
       "graph: 6 values"},
      {"TensorOverTheElementLimit",
       [](GraphSpec&, PlanOptions& o) {
         o.input_shapes[0] = {int64_t{1} << 40, int64_t{1} << 40};
       },
       kExhausted, "inputs[0].shape: shape [1099511627776, 1099511627776] has more than the limit"},
      {"ParameterOverTheElementLimit",
       [](GraphSpec& g, PlanOptions& o) {
         o.limits.max_tensor_elements = 16;
         g.parameters.push_back({"P", {5, 5}});
       },
       kExhausted, "graph.parameters[2].shape: shape [5, 5] has more than the limit of 16"},
      {"InferredShapeOverTheLimit",
       [](GraphSpec& g, PlanOptions& o) {
         o.limits.max_tensor_elements = 16;
         g.constants.push_back({"s", DType::kInt64, {3}, {}, {4, 1, 3}});
         g.nodes.push_back({"r", "Reshape", {"W", "s"}, {"W3"}, {}});
         g.nodes.push_back({"outer", "Mul", {"W3", "W"}, {"big"}, {}});  // [4, 4, 3]
       },
       kExhausted, "graph.nodes[3] (\"outer\", Mul).outputs[0]: shape [4, 4, 3] has more than"},
      {"RankOverTheLimit",
       [](GraphSpec&, PlanOptions& o) { o.input_shapes[0] = {1, 1, 1, 1, 1, 1, 1, 1, 2, 3}; },
       kExhausted, "inputs[0].shape: rank 10 is over the limit of 8"},
  };
}

class GraphMalformed : public ::testing::TestWithParam<Malformed> {};

TEST_P(GraphMalformed, IsRefusedWithItsStatusNamingTheField) {
  GraphSpec spec = Base();
  PlanOptions options = BaseOptions();
  ASSERT_TRUE(Graph::Create(spec, options).ok());
  GetParam().mutate(spec, options);
  const absl::StatusOr<Graph> graph = Graph::Create(spec, options);
  EXPECT_EQ(graph.status().code(), GetParam().code) << graph.status();
  EXPECT_THAT(std::string(graph.status().message()), ::testing::HasSubstr(GetParam().message));
}

INSTANTIATE_TEST_SUITE_P(Table, GraphMalformed, ::testing::ValuesIn(Table()),
                         [](const ::testing::TestParamInfo<Malformed>& info) {
                           return std::string(info.param.name);
                         });

TEST(GraphPlan, NodesInAnyOrderAreSortedLowestIndexFirst) {
  SpecBuilder b;
  b.Input("x").Input("t").Param("W", {3, 3});
  b.Node("Relu", {"m2"}, {"y"}, {}, "last");        // 0: needs 3
  b.Node("Tanh", {"x"}, {"a"}, {}, "first");        // 1: ready
  b.Node("Sigmoid", {"x"}, {"c"}, {}, "second");    // 2: ready
  b.Node("MatMul", {"a", "W"}, {"m1"}, {}, "mm1");  // 3: needs 1
  b.Node("Add", {"m1", "c"}, {"m2"}, {}, "add");    // 4: needs 3, 2
  // Kahn's algorithm taking the lowest ready index: 1, 2, 3, 4, 0.
  GraphSpec spec = b.WithLoss("y", LossKind::kMse, "t");
  spec.nodes[3].name = "mm1";
  PlanOptions options;
  options.dtype = DType::kFloat64;
  options.input_shapes = {{2, 3}, {2, 3}};
  const absl::StatusOr<Graph> graph = Graph::Create(spec, options);
  ASSERT_TRUE(graph.ok()) << graph.status();
  std::vector<int> order;
  for (const Step& step : graph->steps()) order.push_back(step.node);
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3, 4, 0}));
}

TEST(GraphPlan, BackwardSkipsWhatNoParameterOrRequestedInputNeeds) {
  SpecBuilder b;
  b.Input("x").Input("t").Param("W", {3, 3});
  b.Node("Tanh", {"x"}, {"a"});         // Input only: no backward unless dx is asked for.
  b.Node("MatMul", {"a", "W"}, {"m"});  // Reads a (for dW): a is kept.
  b.Node("Relu", {"m"}, {"y"});
  GraphSpec spec = b.WithLoss("y", LossKind::kMse, "t");
  PlanOptions options;
  options.dtype = DType::kFloat64;
  options.input_shapes = {{2, 3}, {2, 3}};
  absl::StatusOr<Graph> graph = Graph::Create(spec, options);
  ASSERT_TRUE(graph.ok()) << graph.status();
  EXPECT_FALSE(graph->steps()[0].backward);
  EXPECT_TRUE(graph->steps()[1].backward);
  EXPECT_TRUE(graph->values()[graph->steps()[0].outputs[0]].kept);
  EXPECT_FALSE(graph->values()[graph->steps()[0].outputs[0]].needs_grad);
  options.input_gradients = {"x"};
  graph = Graph::Create(spec, options);
  ASSERT_TRUE(graph.ok());
  EXPECT_TRUE(graph->steps()[0].backward);
}

TEST(GraphPlan, CostsAreKnownBeforeAnythingIsAllocatedAndBoundTheRun) {
  testing::GptConfig c;
  c.batch = 2, c.seq = 8, c.vocab = 16, c.d = 16, c.heads = 2;
  PlanOptions options;
  options.dtype = DType::kFloat64;
  options.input_shapes = {{c.batch, c.seq}, {c.batch, c.seq}};
  const GraphSpec spec = testing::GptSpec(c);
  absl::StatusOr<Graph> graph = Graph::Create(spec, options);
  ASSERT_TRUE(graph.ok()) << graph.status();
  const PlanCosts& costs = graph->costs();
  // The matrix products alone: per block 2 B T (3d d + d d + 8 d d) + attention 4 B T T d, plus
  // the head 2 B T V d; backward about twice that.
  const double bt = c.batch * c.seq;
  const double products =
      c.blocks * (2 * bt * 12 * c.d * c.d + 4 * bt * c.seq * c.d) + 2 * bt * c.vocab * c.d;
  EXPECT_GE(costs.forward_flops, products);
  EXPECT_LE(costs.forward_flops, 2 * products);
  EXPECT_GE(costs.backward_flops, 1.5 * products);
  EXPECT_GT(costs.kept_bytes, 0);
  EXPECT_GE(costs.peak_bytes, costs.kept_bytes);

  testing::Harness h(spec, options.input_shapes);
  ASSERT_TRUE(h.Plan().ok());
  h.Fill(1);
  absl::StatusOr<GraphRunResult> result = h.Run();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_GT(result->peak_bytes, 0);
  EXPECT_LE(result->peak_bytes, costs.peak_bytes);
}

TEST(GraphPlan, OnlyWhatSomeBackwardReadsIsKept) {
  SpecBuilder b;
  b.Input("x").Input("t").Param("W", {3, 3});
  b.Node("MatMul", {"x", "W"}, {"m"});  // Reads x (an input: not a kept buffer) and W.
  b.Node("Neg", {"m"}, {"n"});          // Reads nothing.
  b.Node("Relu", {"n"}, {"y"});         // Reads its output.
  absl::StatusOr<Graph> graph = Graph::Create(b.WithLoss("y", LossKind::kMse, "t"), [] {
    PlanOptions o;
    o.dtype = DType::kFloat64;
    o.input_shapes = {{2, 3}, {2, 3}};
    return o;
  }());
  ASSERT_TRUE(graph.ok()) << graph.status();
  std::vector<std::string> kept;
  for (const ValueInfo& v : graph->values()) {
    if (v.kept) kept.push_back(v.name);
  }
  EXPECT_EQ(kept, std::vector<std::string>{"y"});
  EXPECT_EQ(graph->costs().kept_bytes, 2 * 3 * 8);
}

// Planning is linear in the graph's size: a long chain with a long list of outputs plans in
// well under a second (a quadratic step would take minutes here).
TEST(GraphPlan, ALongGraphPlansQuickly) {
  constexpr int kNodes = 20000;
  SpecBuilder b;
  b.Input("x").Input("t");
  std::string previous = "x";
  std::vector<std::string> outputs;
  for (int i = 0; i < kNodes; ++i) {
    const std::string name = "v" + std::to_string(i);
    b.Node(i % 2 ? "Tanh" : "Neg", {previous}, {name});
    if (i % 4 == 0) outputs.push_back(name);
    previous = name;
  }
  GraphSpec spec = b.WithLoss(previous, LossKind::kMse, "t");
  outputs.push_back(previous);
  spec.outputs = outputs;
  PlanOptions options;
  options.dtype = DType::kFloat64;
  options.input_shapes = {{2}, {2}};
  options.input_gradients = {"x"};
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<Graph> graph = Graph::Create(spec, options);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(graph.ok()) << graph.status();
  EXPECT_EQ(graph->steps().size(), static_cast<size_t>(kNodes));
  EXPECT_LT(seconds, 5.0);
}

// Random small graphs (random ops, names, attributes and shapes, many of them malformed) either
// plan or are refused with INVALID_ARGUMENT; those that plan run to OK (or INVALID_ARGUMENT for
// an index out of range) twice with the same bits. Under ASan and TSan this is a small fuzzer.
TEST(GraphPlan, RandomGraphsPlanOrAreRefusedAndRunDeterministically) {
  // GRAPH_FUZZ_SEED and GRAPH_FUZZ_TRIALS run it longer by hand.
  const char* seed = std::getenv("GRAPH_FUZZ_SEED");
  const char* trials_env = std::getenv("GRAPH_FUZZ_TRIALS");
  const int trials = trials_env != nullptr ? std::atoi(trials_env) : 150;
  std::mt19937_64 rng(seed != nullptr ? std::strtoull(seed, nullptr, 10) : 2026);
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); };
  const std::vector<absl::string_view> ops = SupportedOps();
  const std::vector<std::string> attribute_names = {
      "axis",        "perm",        "transA",     "transB", "alpha", "beta",
      "epsilon",     "keepdims",    "axes",       "upper",  "seed",  "approximate",
      "num_outputs", "value_float", "value_ints", "bogus"};
  auto random_shape = [&] {
    Shape shape(pick(4));
    for (int64_t& d : shape) d = 1 + pick(3);
    return shape;
  };
  auto random_attribute = [&](const std::string& name) -> AttributeSpec {
    switch (pick(5)) {
      case 0:
        return {name, static_cast<int64_t>(pick(5)) - 2};
      case 1:
        return {name, 0.5 * pick(4)};
      case 2:
        return {name, std::string(pick(2) ? "tanh" : "none")};
      case 3: {
        std::vector<int64_t> v(1 + pick(3));
        for (int64_t& x : v) x = pick(4) - 1;
        return {name, v};
      }
      default:
        return {name, std::vector<double>{0.5, 1.0}};
    }
  };
  // The spec with a loss: sum(w * ReduceSum(last)), w a scalar input; parameters no node reads
  // (which would be refused as never used) left out.
  auto with_loss = [](GraphSpec spec, const std::string& last) {
    std::vector<ParameterSpec> used;
    for (const ParameterSpec& p : spec.parameters) {
      bool read = false;
      for (const NodeSpec& node : spec.nodes) {
        read =
            read || std::find(node.inputs.begin(), node.inputs.end(), p.name) != node.inputs.end();
      }
      if (read) used.push_back(p);
    }
    spec.parameters = used;
    spec.nodes.push_back({"sum", "ReduceSum", {last}, {"total"}, {{"keepdims", int64_t{0}}}});
    spec.inputs.push_back({"w", DType::kFloat64});
    spec.outputs = {"total"};
    spec.loss.kind = LossKind::kExternal;
    spec.loss.output = "total";
    spec.loss.target = "w";
    return spec;
  };
  int refused = 0, ran = 0;
  for (int trial = 0; trial < trials; ++trial) {
    GraphSpec spec;
    std::vector<std::string> names;  // Constants first, so that recent picks are float values.
    spec.constants.push_back({"c_ints", DType::kInt64, {2}, {}, {pick(3) - 1, pick(4) - 1}});
    spec.constants.push_back({"c_bool", DType::kBool, {2, 2}, {}, {1, 0, 1, 1}});
    spec.constants.push_back({"c_one", DType::kFloat64, {}, {1.5}, {}});
    for (const ConstantSpec& c : spec.constants) names.push_back(c.name);
    std::vector<Shape> input_shapes;
    spec.inputs.push_back({"ids", DType::kInt64});
    input_shapes.push_back({1 + pick(3)});
    names.push_back("ids");
    const int float_inputs = 1 + pick(2);
    for (int i = 0; i < float_inputs; ++i) {
      spec.inputs.push_back({"x" + std::to_string(i), DType::kFloat64});
      input_shapes.push_back(random_shape());
      names.push_back(spec.inputs.back().name);
    }
    for (int p = 0; p < 1 + pick(3); ++p) {
      spec.parameters.push_back({"p" + std::to_string(p), random_shape()});
      names.push_back(spec.parameters.back().name);
    }
    PlanOptions options;
    options.dtype = DType::kFloat64;
    options.input_shapes = input_shapes;
    options.input_shapes.push_back({});  // w
    if (pick(3) == 0) options.checkpoint = CheckpointMode::kSqrt;
    // Grow the graph a node at a time; a node that makes it invalid must be refused with
    // INVALID_ARGUMENT, and is dropped.
    std::string last = names.back();
    for (int attempt = 0; attempt < 12; ++attempt) {
      NodeSpec node;
      node.name = "n" + std::to_string(attempt);
      node.op_type = std::string(ops[pick(static_cast<int>(ops.size()))]);
      const OpInfo* info = FindOp(node.op_type);
      int arity = info->min_inputs + pick(std::min(info->max_inputs, 5) - info->min_inputs + 1);
      if (pick(10) == 0) arity = pick(4);  // Sometimes the wrong arity.
      if (pick(30) == 0) node.op_type = "NotAnOp";
      for (int j = 0; j < arity; ++j) {
        const int r = pick(40);
        const int recent = std::max(0, static_cast<int>(names.size()) - 1 - pick(3));
        node.inputs.push_back(r == 0   ? ""
                              : r == 1 ? "undefined"
                              : r < 30 ? names[recent]
                                       : names[pick(static_cast<int>(names.size()))]);
      }
      const int outs = node.op_type == "Split" ? 1 + pick(2) : 1;
      for (int o = 0; o < outs; ++o) node.outputs.push_back(node.name + "_" + std::to_string(o));
      for (int a = 0; a < pick(3); ++a) {
        node.attributes.push_back(
            random_attribute(attribute_names[pick(static_cast<int>(attribute_names.size()))]));
      }
      GraphSpec candidate = spec;
      candidate.nodes.push_back(node);
      const absl::Status status =
          Graph::Create(with_loss(candidate, node.outputs[0]), options).status();
      if (!status.ok()) {
        EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
        ++refused;
        continue;
      }
      spec = std::move(candidate);
      for (const std::string& o : node.outputs) names.push_back(o);
      last = node.outputs[0];
    }
    if (spec.nodes.empty()) continue;
    testing::Harness h(with_loss(spec, last), options.input_shapes);
    h.options_ = options;
    ASSERT_TRUE(h.Plan().ok()) << h.Plan();
    h.Fill(trial);
    std::vector<int64_t> ids(NumElements(input_shapes[0]));
    for (int64_t& v : ids) v = pick(5) - 2;
    h.SetInts("ids", ids);
    const int threads = 1 + pick(2);
    absl::StatusOr<GraphRunResult> first = h.Run(threads);
    if (!first.ok()) {  // A Gather index out of range.
      EXPECT_EQ(first.status().code(), absl::StatusCode::kInvalidArgument) << first.status();
      continue;
    }
    ++ran;
    // The plan's replay of the schedule bounds what the run held.
    EXPECT_LE(first->peak_bytes, h.graph().costs().peak_bytes);
    const auto grads = h.grads_;
    ASSERT_TRUE(h.Run(threads).ok());
    for (size_t p = 0; p < grads.size(); ++p) {
      ASSERT_EQ(grads[p].size(), h.grads_[p].size());
      EXPECT_EQ(std::memcmp(grads[p].data(), h.grads_[p].data(), sizeof(double) * grads[p].size()),
                0);
    }
  }
  // The generator must reach both the checks and the executor often enough to mean something.
  std::printf("random graphs: %d nodes refused, %d graphs ran\n", refused, ran);
  EXPECT_GT(refused, 2 * trials);
  EXPECT_GT(ran, trials / 3);
}

// ---- torch.onnx's shape arithmetic folds at plan time -----------------------------------------

bool Folded(const Graph& g, const std::string& name) {
  for (const ValueInfo& v : g.values()) {
    if (v.name == name) return v.kind == ValueKind::kConstant;
  }
  ADD_FAILURE() << "no value " << name;
  return false;
}

// x [B, T, C] -> Reshape(x, [B, 1, T * C]), the target computed from Shape(x) as torch.onnx
// exports a view with dynamic axes: every node but the Reshape folds, for each call's shapes.
TEST(GraphPlan, ShapeArithmeticFoldsToTheReshapeTargetOfEachInputShape) {
  SpecBuilder b;
  b.Input("x").Ints("zero", {}, {0}).Ints("one", {}, {1}).Ints("two", {}, {2});
  b.Ints("axes", {1}, {0}).Ints("unit", {1}, {1});
  b.Node("Shape", {"x"}, {"s"});
  b.Node("Gather", {"s", "zero"}, {"batch"});
  b.Node("Gather", {"s", "one"}, {"time"});
  b.Node("Gather", {"s", "two"}, {"channels"});
  b.Node("Mul", {"time", "channels"}, {"flat"});
  b.Node("Unsqueeze", {"batch", "axes"}, {"batch1"});
  b.Node("Unsqueeze", {"flat", "axes"}, {"flat1"});
  b.Node("Concat", {"batch1", "unit", "flat1"}, {"target"}, {{"axis", int64_t{0}}});
  b.Node("Reshape", {"x", "target"}, {"y"});
  const GraphSpec spec = b.WeightedSum("y");
  for (const auto& [in, out] :
       std::vector<std::pair<Shape, Shape>>{{{2, 3, 4}, {2, 1, 12}}, {{3, 1, 5}, {3, 1, 5}}}) {
    testing::Harness h(spec, {in, out});
    ASSERT_TRUE(h.Plan().ok()) << h.Plan();
    const Graph& g = h.graph();
    EXPECT_EQ(g.values()[g.output_value(0)].type.shape, out);
    ASSERT_EQ(g.steps().size(), 1u);  // The Reshape alone runs.
    EXPECT_EQ(g.spec().nodes[g.steps()[0].node].op_type, "Reshape");
    for (const char* v : {"s", "batch", "time", "channels", "flat", "batch1", "flat1", "target"}) {
      EXPECT_TRUE(Folded(g, v)) << v;
    }
    h.Fill(1);
    ASSERT_TRUE(h.Run().ok());
    EXPECT_EQ(h.outputs_[0], h.input("x"));
  }
}

// The GPT pattern: positions = Range(0, Shape(idx)[1], 1), read from wpe; idx an int64 input.
TEST(GraphPlan, PositionsFromARangeOverTheSequenceLengthFoldAndTrain) {
  SpecBuilder b;
  b.Input("idx", DType::kInt64).Param("wte", {10, 4}).Param("wpe", {8, 4});
  b.Ints("zero", {}, {0}).Ints("one", {}, {1});
  b.Node("Shape", {"idx"}, {"s"});
  b.Node("Gather", {"s", "one"}, {"t"});
  b.Node("Range", {"zero", "t", "one"}, {"positions"});
  b.Node("Gather", {"wpe", "positions"}, {"pos_emb"});
  b.Node("Gather", {"wte", "idx"}, {"tok_emb"});
  b.Node("Add", {"tok_emb", "pos_emb"}, {"y"});
  const GraphSpec spec = b.WeightedSum("y");
  for (const int64_t t : {3, 5}) {
    testing::Harness h(spec, {{2, t}, {2, t, 4}});
    ASSERT_TRUE(h.Plan().ok()) << h.Plan();
    const Graph& g = h.graph();
    for (const char* v : {"s", "t", "positions"}) EXPECT_TRUE(Folded(g, v)) << v;
    EXPECT_FALSE(Folded(g, "pos_emb"));  // Reads a parameter: runs per call.
    EXPECT_EQ(g.values()[g.output_value(0)].type.shape, (Shape{2, t, 4}));
    h.Fill(7);
    std::vector<int64_t> ids(2 * t);
    for (int64_t j = 0; j < 2 * t; ++j) ids[j] = (3 * j + 1) % 10;
    h.SetInts("idx", ids);
    ASSERT_TRUE(h.Run().ok());
    const std::vector<double>& wte = h.param("wte");
    const std::vector<double>& wpe = h.param("wpe");
    for (int64_t j = 0; j < 2 * t; ++j) {
      for (int64_t c = 0; c < 4; ++c) {
        EXPECT_EQ(h.outputs_[0][j * 4 + c], wte[ids[j] * 4 + c] + wpe[(j % t) * 4 + c]);
      }
    }
    EXPECT_GRADIENTS_MATCH(h);
  }
}

// A slice to the sequence length minus one, and attention's 1/sqrt(head_dim) from Cast(Shape).
TEST(GraphPlan, SliceEndsAndScalesFromShapesFold) {
  SpecBuilder b;
  b.Param("x", {2, 4});
  b.Ints("one", {}, {1}).Ints("ones", {1}, {1}).Ints("axes", {1}, {0}).Ints("starts", {1}, {0});
  b.Node("Shape", {"x"}, {"s"});
  b.Node("Gather", {"s", "one"}, {"width"});
  b.Node("Cast", {"width"}, {"width_f"}, {{"to", int64_t{1}}});
  b.Node("Sqrt", {"width_f"}, {"scale"});
  b.Node("Div", {"x", "scale"}, {"scaled"});
  b.Node("Unsqueeze", {"width", "axes"}, {"width1"});
  b.Node("Sub", {"width1", "ones"}, {"end"});
  b.Node("Slice", {"scaled", "starts", "end", "ones"}, {"y"});
  testing::Harness h(b.WeightedSum("y"), {{2, 3}});
  ASSERT_TRUE(h.Plan().ok()) << h.Plan();
  const Graph& g = h.graph();
  for (const char* v : {"s", "width", "width_f", "scale", "width1", "end"}) {
    EXPECT_TRUE(Folded(g, v)) << v;
  }
  EXPECT_EQ(g.steps().size(), 2u);  // Div, Slice.
  h.Fill(3);
  ASSERT_TRUE(h.Run().ok());
  const std::vector<double>& x = h.param("x");
  EXPECT_EQ(h.outputs_[0],
            (std::vector<double>{x[0] / 2, x[1] / 2, x[2] / 2, x[4] / 2, x[5] / 2, x[6] / 2}));
  EXPECT_GRADIENTS_MATCH(h);
}

// Expand to a shape made by ConstantOfShape-free arithmetic on Shape, as exports of
// `x.expand(b, -1, -1)` do: the broadcast's gradient sums over the new axis.
TEST(GraphPlan, ExpandToAFoldedShapeTrains) {
  SpecBuilder b;
  b.Input("h").Param("cls", {1, 1, 4}).Ints("zero", {}, {0}).Ints("axes", {1}, {0});
  b.Ints("rest", {2}, {1, 4});
  b.Node("Shape", {"h"}, {"s"});
  b.Node("Gather", {"s", "zero"}, {"batch"});
  b.Node("Unsqueeze", {"batch", "axes"}, {"batch1"});
  b.Node("Concat", {"batch1", "rest"}, {"target"}, {{"axis", int64_t{0}}});
  b.Node("Expand", {"cls", "target"}, {"tokens"});
  b.Node("Concat", {"tokens", "h"}, {"y"}, {{"axis", int64_t{1}}});
  testing::Harness h(b.WeightedSum("y"), {{3, 2, 4}, {3, 3, 4}}, {"h"});
  ASSERT_TRUE(h.Plan().ok()) << h.Plan();
  EXPECT_TRUE(Folded(h.graph(), "target"));
  EXPECT_EQ(h.graph().values()[h.graph().output_value(0)].type.shape, (Shape{3, 3, 4}));
  h.Fill(5);
  ASSERT_TRUE(h.Run().ok());
  EXPECT_GRADIENTS_MATCH(h);
}

TEST(GraphPlan, EveryRegisteredOpIsFoundByName) {
  const std::vector<absl::string_view> ops = SupportedOps();
  for (size_t i = 0; i < ops.size(); ++i) {
    ASSERT_NE(FindOp(std::string_view(ops[i].data(), ops[i].size())), nullptr) << ops[i];
    if (i > 0) {
      EXPECT_LT(ops[i - 1], ops[i]);
    }
  }
  EXPECT_EQ(FindOp("Conv"), nullptr);
}

}  // namespace
}  // namespace gradserve::engine::graph
