// Graph models through the service's compute functions (compute.h): the graph form of an MLP
// bit-identical to its chain form, a residual LayerNorm MLP and a GPT-2-style decoder bit-
// identical to the engine's own RunGraph and passing CheckGradients, the plan's costs feeding
// the memory reservation and the FLOPs limit, GetServerInfo's graph fields.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <cstring>
#include <functional>
#include <limits>

#include "gradserve/v1/gradserve.grpc.pb.h"
#include "server/engine/graph/chain.h"
#include "server/engine/graph/executor.h"
#include "server/service/compute.h"
#include "server/service/convert.h"
#include "server/service/server.h"
#include "server/service/stream.h"
#include "tests/engine/graph_test_models.h"
#include "tests/service/graph_test_requests.h"

namespace gradserve {
namespace {

namespace eg = ::gradserve::engine::graph;
namespace v1 = ::gradserve::v1;
using testing::GraphRequest;
using ::testing::HasSubstr;
using testing::SetTensor;

service::ServiceLimits Limits() {
  service::ServiceLimits limits;
  limits.max_activation_bytes = 64 << 20;
  return limits;
}

service::ComputeContext Context() {
  service::ComputeContext context;
  context.threads = 1;
  return context;
}

const v1::Tensor& Named(const google::protobuf::RepeatedPtrField<v1::NamedTensor>& list,
                        const std::string& name) {
  for (const v1::NamedTensor& t : list) {
    if (t.name() == name) return t.tensor();
  }
  ADD_FAILURE() << "no tensor named " << name;
  static const v1::Tensor kEmpty;
  return kEmpty;
}

void ExpectSameBits(const v1::Tensor& a, const v1::Tensor& b, const std::string& what) {
  EXPECT_EQ(a.dtype(), b.dtype()) << what;
  EXPECT_TRUE(std::equal(a.shape().begin(), a.shape().end(), b.shape().begin(), b.shape().end()))
      << what;
  EXPECT_EQ(a.data(), b.data()) << what << ": bits differ";
}

// A chain's answer and its graph form's (parameters "<i>.weight", "<i>.bias" in layer order):
// the same loss and gradient bits, diagnostics named as the gradients.
void ExpectChainEqualsGraph(const v1::ComputeGradientsResponse& chain,
                            const v1::ComputeGradientsResponse& graph, int linear_layers) {
  EXPECT_EQ(chain.loss(), graph.loss());
  ASSERT_EQ(graph.named_gradients_size(), 2 * linear_layers);
  for (int l = 0; l < linear_layers; ++l) {
    ExpectSameBits(chain.gradients(l).weight(), graph.named_gradients(2 * l).tensor(),
                   absl::StrCat("layer ", l, " weight"));
    ExpectSameBits(chain.gradients(l).bias(), graph.named_gradients(2 * l + 1).tensor(),
                   absl::StrCat("layer ", l, " bias"));
    EXPECT_EQ(graph.parameter_diagnostics(2 * l).name(), graph.named_gradients(2 * l).name());
  }
}

// A chain with every layer kind and its graph form (engine::graph::ChainToGraph's names).
template <typename T>
class ChainAndGraph : public ::testing::Test {};
using Dtypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(ChainAndGraph, Dtypes);

TYPED_TEST(ChainAndGraph, MlpGradientsAreBitIdentical) {
  using T = TypeParam;
  std::mt19937 rng(7);
  v1::ComputeGradientsRequest chain;
  v1::Model* model = chain.mutable_model();
  const int64_t widths[] = {6, 16, 12, 3};
  for (int l = 0; l < 3; ++l) {
    v1::Linear* linear = model->add_layers()->mutable_linear();
    linear->set_in_features(widths[l]);
    linear->set_out_features(widths[l + 1]);
    v1::LinearParameters* p = chain.add_parameters();
    SetTensor<T>(p->mutable_weight(), testing::RandomValues<T>(widths[l] * widths[l + 1], rng),
                 {widths[l + 1], widths[l]});
    SetTensor<T>(p->mutable_bias(), testing::RandomValues<T>(widths[l + 1], rng), {widths[l + 1]});
    if (l == 0) model->add_layers()->mutable_gelu();
    if (l == 1) model->add_layers()->mutable_tanh();
  }
  model->mutable_loss()->mutable_mse();
  SetTensor<T>(chain.mutable_inputs(), testing::RandomValues<T>(10 * 6, rng), {10, 6});
  SetTensor<T>(chain.mutable_targets(), testing::RandomValues<T>(10 * 3, rng), {10, 3});
  chain.mutable_options()->set_return_input_gradient(true);
  chain.mutable_options()->set_return_output(true);

  const service::ServiceLimits limits = Limits();
  absl::StatusOr<engine::ModelSpec> spec = service::ToModelSpec(chain.model(), limits);
  ASSERT_TRUE(spec.ok()) << spec.status();
  const eg::GraphSpec graph_spec =
      eg::ChainToGraph(*spec, testing::DTypeOf<T>() == v1::DTYPE_FLOAT32 ? eg::DType::kFloat32
                                                                         : eg::DType::kFloat64);
  v1::ComputeGradientsRequest graph;
  *graph.mutable_model() = service::GraphSpecToModel(graph_spec, testing::DTypeOf<T>());
  for (int l = 0; l < 3; ++l) {
    const int layer = l == 0 ? 0 : l == 1 ? 2 : 4;
    v1::NamedTensor* w = graph.add_named_parameters();
    w->set_name(absl::StrCat(layer, ".weight"));
    *w->mutable_tensor() = chain.parameters(l).weight();
    v1::NamedTensor* b = graph.add_named_parameters();
    b->set_name(absl::StrCat(layer, ".bias"));
    *b->mutable_tensor() = chain.parameters(l).bias();
  }
  v1::NamedTensor* x = graph.add_graph_inputs();
  x->set_name("input");
  *x->mutable_tensor() = chain.inputs();
  v1::NamedTensor* y = graph.add_graph_inputs();
  y->set_name("targets");
  *y->mutable_tensor() = chain.targets();
  graph.mutable_options()->add_input_gradient_names("input");
  graph.mutable_options()->set_return_output(true);

  v1::ComputeGradientsResponse from_chain, from_graph;
  ASSERT_TRUE(service::ComputeGradients(chain, limits, Context(), &from_chain).ok());
  const absl::Status status = service::ComputeGradients(graph, limits, Context(), &from_graph);
  ASSERT_TRUE(status.ok()) << status;
  ExpectChainEqualsGraph(from_chain, from_graph, 3);
  ExpectSameBits(from_chain.input_gradient(), Named(from_graph.input_gradients(), "input"), "dx");
  ExpectSameBits(from_chain.output(), Named(from_graph.outputs(), "output"), "output");
  EXPECT_EQ(from_graph.stats().num_examples(), 10);
  EXPECT_GT(from_graph.value_diagnostics_size(), 0);
}

// Runs `request`'s graph directly on the engine, as the service should.
template <typename T>
std::vector<std::vector<T>> DirectGradients(const eg::GraphSpec& spec,
                                            const v1::ComputeGradientsRequest& request,
                                            double* loss) {
  eg::PlanOptions options;
  options.dtype = sizeof(T) == 4 ? eg::DType::kFloat32 : eg::DType::kFloat64;
  eg::GraphInputs<T> inputs;
  for (const v1::NamedTensor& in : request.graph_inputs()) {
    options.input_shapes.emplace_back(in.tensor().shape().begin(), in.tensor().shape().end());
    inputs.inputs.push_back(in.tensor().data().data());
  }
  for (const v1::NamedTensor& p : request.named_parameters()) {
    inputs.parameters.push_back(reinterpret_cast<const T*>(p.tensor().data().data()));
  }
  absl::StatusOr<eg::Graph> graph = eg::Graph::Create(spec, options);
  EXPECT_TRUE(graph.ok()) << graph.status();
  std::vector<std::vector<T>> grads;
  eg::GraphOutputs<T> outputs;
  for (const v1::NamedTensor& p : request.named_parameters()) {
    grads.emplace_back(p.tensor().data().size() / sizeof(T));
  }
  for (auto& g : grads) outputs.parameter_gradients.push_back(g.data());
  eg::GraphRunOptions run;
  auto result = eg::RunGraph<T>(*graph, inputs, outputs, run);
  EXPECT_TRUE(result.ok()) << result.status();
  *loss = result.ok() ? result->loss : 0;
  return grads;
}

template <typename T>
void ExpectMatchesEngineAndChecks(const eg::GraphSpec& spec, v1::ComputeGradientsRequest request,
                                  double max_rel_error) {
  const service::ServiceLimits limits = Limits();
  v1::ComputeGradientsResponse response;
  const absl::Status status = service::ComputeGradients(request, limits, Context(), &response);
  ASSERT_TRUE(status.ok()) << status;
  double loss = 0;
  const std::vector<std::vector<T>> direct = DirectGradients<T>(spec, request, &loss);
  EXPECT_EQ(response.loss(), loss);
  ASSERT_EQ(response.named_gradients_size(), static_cast<int>(spec.parameters.size()));
  for (size_t p = 0; p < spec.parameters.size(); ++p) {
    const v1::NamedTensor& g = response.named_gradients(p);
    EXPECT_EQ(g.name(), spec.parameters[p].name);
    ASSERT_EQ(g.tensor().data().size(), direct[p].size() * sizeof(T));
    EXPECT_EQ(std::memcmp(g.tensor().data().data(), direct[p].data(), g.tensor().data().size()), 0)
        << g.name() << ": bits differ from RunGraph's";
  }

  v1::CheckGradientsRequest check;
  *check.mutable_request() = std::move(request);
  check.set_samples_per_tensor(4);
  v1::CheckGradientsResponse checked;
  const absl::Status check_status = service::CheckGradients(check, limits, Context(), &checked);
  ASSERT_TRUE(check_status.ok()) << check_status;
  ASSERT_EQ(checked.checks_size(), static_cast<int>(spec.parameters.size()));
  for (const v1::TensorCheck& c : checked.checks()) EXPECT_GT(c.samples(), 0) << c.tensor();
  std::printf("max relative error %.3g, max absolute error %.3g (%s)\n", checked.max_rel_error(),
              checked.max_abs_error(), sizeof(T) == 4 ? "float32" : "float64");
  EXPECT_LT(checked.max_rel_error(), max_rel_error);
}

TEST(GraphService, ResidualLayerNormMlpMatchesEngineAndChecks) {
  const eg::GraphSpec spec = eg::testing::ResidualMlpSpec(5, 7, 3, 2, eg::DType::kFloat64);
  ExpectMatchesEngineAndChecks<double>(
      spec, GraphRequest<double>(spec, {{4, 5}, {4, 3}}, /*seed=*/3), 1e-6);
  const eg::GraphSpec spec32 = eg::testing::ResidualMlpSpec(5, 7, 3, 2, eg::DType::kFloat32);
  ExpectMatchesEngineAndChecks<float>(spec32, GraphRequest<float>(spec32, {{4, 5}, {4, 3}}, 3),
                                      1e-2);
}

TEST(GraphService, GptMatchesEngineAndChecks) {
  eg::testing::GptConfig config;
  const eg::GraphSpec spec = eg::testing::GptSpec(config);
  ExpectMatchesEngineAndChecks<double>(
      spec,
      GraphRequest<double>(spec, {{config.batch, config.seq}, {config.batch, config.seq}}, 5,
                           config.vocab, 0.5),
      1e-6);
}

TEST(GraphService, InputGradientsAndInt32IdsAreAccepted) {
  eg::testing::GptConfig config;
  const eg::GraphSpec spec = eg::testing::GptSpec(config);
  v1::ComputeGradientsRequest request = GraphRequest<double>(
      spec, {{config.batch, config.seq}, {config.batch, config.seq}}, 5, config.vocab, 0.5);
  v1::ComputeGradientsResponse wide;
  ASSERT_TRUE(service::ComputeGradients(request, Limits(), Context(), &wide).ok());
  // The same ids as INT32 (the input declared INT32): the same bits.
  for (int i = 0; i < 2; ++i) {
    v1::Tensor* t = request.mutable_graph_inputs(i)->mutable_tensor();
    std::vector<int64_t> ids(t->data().size() / 8);
    std::memcpy(ids.data(), t->data().data(), t->data().size());
    SetTensor<int32_t>(t, std::vector<int32_t>(ids.begin(), ids.end()), {config.batch, config.seq});
    request.mutable_model()->mutable_graph()->mutable_inputs(i)->set_dtype(v1::DTYPE_INT32);
  }
  v1::ComputeGradientsResponse narrow;
  const absl::Status status = service::ComputeGradients(request, Limits(), Context(), &narrow);
  ASSERT_TRUE(status.ok()) << status;
  for (int p = 0; p < wide.named_gradients_size(); ++p) {
    ExpectSameBits(wide.named_gradients(p).tensor(), narrow.named_gradients(p).tensor(),
                   wide.named_gradients(p).name());
  }
}

TEST(GraphService, PlanPeakIsReservedAndFlopsAreLimited) {
  const eg::GraphSpec spec = eg::testing::ResidualMlpSpec(5, 7, 3, 2, eg::DType::kFloat64);
  v1::ComputeGradientsRequest request = GraphRequest<double>(spec, {{4, 5}, {4, 3}});
  service::ComputeContext context = Context();
  int64_t reserved = -1;
  context.reserve_memory = [&](int64_t bytes) {
    reserved = bytes;
    return absl::OkStatus();
  };
  v1::ComputeGradientsResponse response;
  ASSERT_TRUE(service::ComputeGradients(request, Limits(), context, &response).ok());
  EXPECT_GE(reserved, response.stats().plan().predicted_peak_bytes());
  EXPECT_GT(response.stats().plan().predicted_peak_bytes(), 0);

  service::ServiceLimits limits = Limits();
  limits.max_activation_bytes = response.stats().plan().predicted_peak_bytes() - 1;
  v1::ComputeGradientsResponse refused;
  absl::Status status = service::ComputeGradients(request, limits, context, &refused);
  EXPECT_TRUE(absl::IsResourceExhausted(status)) << status;
  EXPECT_THAT(status.message(), HasSubstr("max_activation_bytes"));

  limits = Limits();
  limits.max_call_flops = 100;
  status = service::ComputeGradients(request, limits, context, &refused);
  EXPECT_TRUE(absl::IsResourceExhausted(status)) << status;
  EXPECT_THAT(status.message(), HasSubstr("max_call_flops"));
  // The estimate before planning is one cost function with the chain's.
  EXPECT_GT(service::ComputeGradientsCost(request), 0);
}

TEST(GraphService, CheckpointedGraphIsBitIdenticalAndNamesBoundaries) {
  eg::testing::GptConfig config;
  config.blocks = 3;
  const eg::GraphSpec spec = eg::testing::GptSpec(config);
  v1::ComputeGradientsRequest request = GraphRequest<float>(
      spec, {{config.batch, config.seq}, {config.batch, config.seq}}, 9, config.vocab, 0.5);
  v1::ComputeGradientsResponse plain, sqrt;
  ASSERT_TRUE(service::ComputeGradients(request, Limits(), Context(), &plain).ok());
  request.mutable_options()->mutable_checkpointing()->set_mode(v1::Checkpointing::MODE_SQRT);
  const absl::Status status = service::ComputeGradients(request, Limits(), Context(), &sqrt);
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(sqrt.stats().plan().mode(), v1::Checkpointing::MODE_SQRT);
  EXPECT_GT(sqrt.stats().plan().boundary_values_size(), 0);
  EXPECT_EQ(sqrt.stats().plan().boundary_values_size() + 1,
            sqrt.stats().plan().segment_starts_size());
  EXPECT_GT(sqrt.stats().layers_recomputed(), 0);
  for (int p = 0; p < plain.named_gradients_size(); ++p) {
    ExpectSameBits(plain.named_gradients(p).tensor(), sqrt.named_gradients(p).tensor(),
                   plain.named_gradients(p).name());
  }
}

// Graph calls stop as chain calls do: the compute context's should_stop (which the gRPC layer
// fires at the deadline, at max_call_seconds, on cancellation or shutdown) is polled between
// nodes, and by CheckGradients between perturbed passes.
TEST(GraphService, CallsStopWhenTheirContextSaysSo) {
  eg::testing::GptConfig config;
  const eg::GraphSpec spec = eg::testing::GptSpec(config);
  const v1::ComputeGradientsRequest request = GraphRequest<double>(
      spec, {{config.batch, config.seq}, {config.batch, config.seq}}, 5, config.vocab, 0.5);
  for (int after : {0, 10}) {
    SCOPED_TRACE(after);
    service::ComputeContext context = Context();
    int polls = 0;
    context.should_stop = [&polls, after] { return polls++ >= after; };
    v1::ComputeGradientsResponse response;
    const absl::Status status = service::ComputeGradients(request, Limits(), context, &response);
    EXPECT_TRUE(absl::IsCancelled(status)) << status;
    EXPECT_LT(polls, 100);  // Stopped at once, not after the whole graph.
    v1::CheckGradientsRequest check;
    *check.mutable_request() = request;
    v1::CheckGradientsResponse checked;
    polls = 0;
    const absl::Status check_status = service::CheckGradients(check, Limits(), context, &checked);
    EXPECT_TRUE(absl::IsCancelled(check_status)) << check_status;
  }
}

TEST(GraphService, ServerInfoListsGraphOpsAndLimits) {
  v1::GetServerInfoResponse info;
  service::GetServerInfo(Limits(), 1, &info);
  EXPECT_THAT(info.graph_ops(), ::testing::Contains("MatMul"));
  EXPECT_THAT(info.graph_ops(), ::testing::Contains("LayerNormalization"));
  EXPECT_EQ(info.onnx_min_opset(), 13);
  EXPECT_EQ(info.onnx_max_opset(), 17);
  EXPECT_THAT(info.graph_ops(), ::testing::Contains("Shape"));
  EXPECT_EQ(info.graph_ops_size(), static_cast<int>(eg::SupportedOps().size()));
  EXPECT_EQ(info.limits().max_graph_nodes(), Limits().max_graph_nodes);
  EXPECT_EQ(info.limits().max_graph_rank(), Limits().max_graph_rank);
}

// ConstantOfShape's `value` arrives as ONNX writes it, a one-element tensor attribute; the
// engine's attributes hold no tensors, so the service passes it on as a one-element list: the
// same gradients as a request that sent the list.
TEST(GraphService, ConstantOfShapeTakesItsValueAsATensorAttribute) {
  eg::testing::SpecBuilder b;
  b.Input("x").Input("targets").Param("w", {4}).Ints("unit", {1}, {1});
  b.Node("Shape", {"x"}, {"s"});
  b.Node("ConstantOfShape", {"s"}, {"halves"}, {{"value", std::vector<double>{0.5}}});
  b.Node("ConstantOfShape", {"unit"}, {"three"}, {{"value", std::vector<int64_t>{3}}});
  b.Node("Cast", {"three"}, {"three_f"}, {{"to", int64_t{1}}});
  b.Node("Mul", {"x", "w"}, {"xw"});
  b.Node("Mul", {"xw", "three_f"}, {"xw3"});
  b.Node("Add", {"xw3", "halves"}, {"y"});
  const eg::GraphSpec spec = b.WithLoss("y", engine::LossKind::kMse, "targets");
  const v1::ComputeGradientsRequest lists = GraphRequest<double>(spec, {{2, 3, 4}, {2, 3, 4}});
  v1::ComputeGradientsResponse expected;
  const absl::Status status = service::ComputeGradients(lists, Limits(), Context(), &expected);
  ASSERT_TRUE(status.ok()) << status;

  v1::ComputeGradientsRequest tensors = lists;
  v1::Graph* g = tensors.mutable_model()->mutable_graph();
  SetTensor<float>(g->mutable_nodes(1)->mutable_attributes(0)->mutable_t(), {0.5f}, {1});
  SetTensor<int64_t>(g->mutable_nodes(2)->mutable_attributes(0)->mutable_t(), {3}, {});
  v1::ComputeGradientsResponse response;
  const absl::Status converted = service::ComputeGradients(tensors, Limits(), Context(), &response);
  ASSERT_TRUE(converted.ok()) << converted;
  ExpectSameBits(expected.named_gradients(0).tensor(), response.named_gradients(0).tensor(), "w");

  SetTensor<float>(g->mutable_nodes(1)->mutable_attributes(0)->mutable_t(), {0.5f, 1.0f}, {2});
  const absl::Status two = service::ComputeGradients(tensors, Limits(), Context(), &response);
  EXPECT_EQ(two.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(two.message()),
              HasSubstr("model.graph.nodes[1].attributes[0] (\"value\").t: expected a "
                        "one-element tensor"));
}

const v1::ValueDiagnostics& ValueNamed(const v1::ComputeGradientsResponse& response,
                                       const std::string& value) {
  for (const v1::ValueDiagnostics& d : response.value_diagnostics()) {
    if (d.value() == value) return d;
  }
  ADD_FAILURE() << "no diagnostics for " << value;
  static const v1::ValueDiagnostics kEmpty;
  return kEmpty;
}

// Issue 14, as for the chain: ||dL/d(value)|| is absent where the backward pass did not compute
// it (nothing trainable upstream, or the loss does not depend on the value), never 0; a
// parameter the loss does not reach has a gradient of zeros, and reports 0.
TEST(GraphService, DiagnosticsLeaveOutGradientNormsThatWereNotComputed) {
  eg::testing::SpecBuilder b;
  b.Input("x").Input("targets").Param("w", {4, 2}).Param("u", {4});
  b.Node("Tanh", {"x"}, {"h"});
  b.Node("MatMul", {"h", "w"}, {"y"});
  b.Node("Mul", {"x", "u"}, {"side"});
  eg::GraphSpec spec = b.WithLoss("y", engine::LossKind::kMse, "targets");
  spec.outputs.push_back("side");
  v1::ComputeGradientsRequest request = GraphRequest<double>(spec, {{8, 4}, {8, 2}});
  for (bool dx : {false, true}) {
    SCOPED_TRACE(dx ? "with dL/dx" : "without dL/dx");
    if (dx) request.mutable_options()->add_input_gradient_names("x");
    v1::ComputeGradientsResponse response;
    const absl::Status status = service::ComputeGradients(request, Limits(), Context(), &response);
    ASSERT_TRUE(status.ok()) << status;
    EXPECT_EQ(ValueNamed(response, "h").has_grad_norm(), dx);
    if (dx) {
      EXPECT_GT(ValueNamed(response, "h").grad_norm(), 0);
    }
    EXPECT_GT(ValueNamed(response, "h").value_norm(), 0);
    ASSERT_TRUE(ValueNamed(response, "y").has_grad_norm());
    EXPECT_GT(ValueNamed(response, "y").grad_norm(), 0);
    EXPECT_FALSE(ValueNamed(response, "side").has_grad_norm());
    ASSERT_EQ(response.parameter_diagnostics_size(), 2);
    EXPECT_GT(response.parameter_diagnostics(0).grad_norm(), 0);
    EXPECT_EQ(response.parameter_diagnostics(1).name(), "u");
    EXPECT_EQ(response.parameter_diagnostics(1).grad_norm(), 0);
  }
}

// Issue 11: a correct float64 chain gradient reported 3.5e-5 relative error from entries near
// zero; with the floor it reports what the numerical gradient's rounding allows.
TEST(CheckGradientsFloor, CorrectChainGradientReportsSmallRelativeError) {
  std::mt19937 rng(11);
  v1::CheckGradientsRequest check;
  v1::ComputeGradientsRequest* request = check.mutable_request();
  v1::Model* model = request->mutable_model();
  const int64_t widths[] = {16, 32, 32, 4};
  for (int l = 0; l < 3; ++l) {
    v1::Linear* linear = model->add_layers()->mutable_linear();
    linear->set_in_features(widths[l]);
    linear->set_out_features(widths[l + 1]);
    v1::LinearParameters* p = request->add_parameters();
    SetTensor<double>(p->mutable_weight(),
                      testing::RandomValues<double>(widths[l] * widths[l + 1], rng),
                      {widths[l + 1], widths[l]});
    SetTensor<double>(p->mutable_bias(), testing::RandomValues<double>(widths[l + 1], rng),
                      {widths[l + 1]});
    if (l < 2) model->add_layers()->mutable_relu();
  }
  model->mutable_loss()->mutable_mse();
  SetTensor<double>(request->mutable_inputs(), testing::RandomValues<double>(64 * 16, rng),
                    {64, 16});
  SetTensor<double>(request->mutable_targets(), testing::RandomValues<double>(64 * 4, rng),
                    {64, 4});
  check.set_samples_per_tensor(64);
  v1::CheckGradientsResponse response;
  const absl::Status status = service::CheckGradients(check, Limits(), Context(), &response);
  ASSERT_TRUE(status.ok()) << status;
  std::printf("chain float64: max relative error %.3g\n", response.max_rel_error());
  EXPECT_LT(response.max_rel_error(), 1e-6);
}

// ---------------------------------------------------------------------------------------------
// StreamGradients with graphs (StreamSession, no gRPC): the model validated once and planned
// once per batch shape, parameters sent and updated by name, micro-batches summed by name.

v1::StreamGradientsRequest GraphSetup(const v1::ComputeGradientsRequest& like, v1::DType dtype) {
  v1::StreamGradientsRequest message;
  *message.mutable_setup()->mutable_model() = like.model();
  *message.mutable_setup()->mutable_options() = like.options();
  message.mutable_setup()->set_dtype(dtype);
  return message;
}

// A step with `request`'s batch; its parameters too if `parameters`.
v1::StreamGradientsRequest GraphStep(const v1::ComputeGradientsRequest& request, bool parameters,
                                     bool accumulate = false) {
  v1::StreamGradientsRequest message;
  v1::StreamStep* step = message.mutable_step();
  *step->mutable_graph_inputs() = request.graph_inputs();
  if (parameters) *step->mutable_named_parameters() = request.named_parameters();
  step->set_accumulate(accumulate);
  return message;
}

// p = p + u in T, on a request's named parameters: what the caller does to its own copy.
template <typename T>
void AddInPlace(v1::ComputeGradientsRequest* request, const std::string& name,
                const v1::Tensor& update) {
  for (v1::NamedTensor& p : *request->mutable_named_parameters()) {
    if (p.name() != name) continue;
    std::string* data = p.mutable_tensor()->mutable_data();
    for (size_t i = 0; i < data->size() / sizeof(T); ++i) {
      T a, b;
      std::memcpy(&a, data->data() + i * sizeof(T), sizeof(T));
      std::memcpy(&b, update.data().data() + i * sizeof(T), sizeof(T));
      a = a + b;
      std::memcpy(data->data() + i * sizeof(T), &a, sizeof(T));
    }
  }
}

TEST(GraphStream, StepsEqualUnaryCallsWithUpdatesByNameAndThePlanIsReused) {
  const eg::GraphSpec spec = eg::testing::ResidualMlpSpec(5, 8, 3, 2, eg::DType::kFloat32);
  v1::ComputeGradientsRequest request = GraphRequest<float>(spec, {{6, 5}, {6, 3}}, 31);
  request.mutable_options()->add_input_gradient_names("x");
  request.mutable_options()->set_return_output(true);
  service::StreamSession session(Limits());
  v1::StreamGradientsResponse response;
  v1::StreamGradientsRequest setup = GraphSetup(request, v1::DTYPE_FLOAT32);
  ASSERT_TRUE(session.Handle(&setup, Context(), &response).ok());
  std::mt19937 rng(5);
  for (int s = 0; s < 6; ++s) {
    SCOPED_TRACE(s);
    // Step 3 brings a batch of another size: a second plan, kept; the others reuse the first.
    v1::ComputeGradientsRequest batch = request;
    if (s == 3) {
      const v1::ComputeGradientsRequest other = GraphRequest<float>(spec, {{2, 5}, {2, 3}}, 40);
      *batch.mutable_graph_inputs() = other.graph_inputs();
    }
    v1::StreamGradientsRequest step = GraphStep(batch, s == 0);
    if (s > 0) {
      // An update of two parameters by name: the others stay as they are.
      for (const char* name : {"blocks.1.fc2.weight", "ln_f.bias"}) {
        v1::NamedTensor* u = step.mutable_step()->add_named_parameter_update();
        u->set_name(name);
        for (const v1::NamedTensor& p : request.named_parameters()) {
          if (p.name() != name) continue;
          const int64_t n = static_cast<int64_t>(p.tensor().data().size() / sizeof(float));
          SetTensor<float>(u->mutable_tensor(), testing::RandomValues<float>(n, rng),
                           {p.tensor().shape().begin(), p.tensor().shape().end()});
        }
        AddInPlace<float>(&request, name, u->tensor());
        AddInPlace<float>(&batch, name, u->tensor());
      }
    }
    absl::StatusOr<bool> answered = session.Handle(&step, Context(), &response);
    ASSERT_TRUE(answered.ok()) << answered.status();
    ASSERT_TRUE(*answered);
    v1::ComputeGradientsResponse unary;
    ASSERT_TRUE(service::ComputeGradients(batch, Limits(), Context(), &unary).ok());
    EXPECT_EQ(response.result().loss(), unary.loss());
    ASSERT_EQ(response.result().named_gradients_size(), unary.named_gradients_size());
    for (int p = 0; p < unary.named_gradients_size(); ++p) {
      ExpectSameBits(unary.named_gradients(p).tensor(),
                     response.result().named_gradients(p).tensor(),
                     unary.named_gradients(p).name());
    }
    ExpectSameBits(Named(unary.input_gradients(), "x"),
                   Named(response.result().input_gradients(), "x"), "dx");
    ExpectSameBits(Named(unary.outputs(), "y"), Named(response.result().outputs(), "y"), "y");
  }
  EXPECT_EQ(session.plans_built(), 2);
}

// Micro-batches of a GPT with ignored targets: summed by name, weighted by the positions each
// one's MEAN counted, they answer as one call on the whole batch (to float64 rounding).
TEST(GraphStream, AccumulatedMicroBatchesEqualOneCallOnTheWholeBatch) {
  eg::testing::GptConfig config;
  config.batch = 4;
  const eg::GraphSpec spec = eg::testing::GptSpec(config);
  v1::ComputeGradientsRequest whole = GraphRequest<double>(
      spec, {{config.batch, config.seq}, {config.batch, config.seq}}, 12, config.vocab, 0.5);
  // Ignore some targets, unevenly between the micro-batches (3 in the first half, 1 after).
  v1::Tensor* targets = whole.mutable_graph_inputs(1)->mutable_tensor();
  for (int64_t position : {0, 1, 5, 13}) {
    const int64_t ignored = config.ignore_index;
    std::memcpy(targets->mutable_data()->data() + position * 8, &ignored, 8);
  }
  whole.mutable_options()->set_return_output(true);
  v1::ComputeGradientsResponse expected;
  ASSERT_TRUE(service::ComputeGradients(whole, Limits(), Context(), &expected).ok());

  service::StreamSession session(Limits());
  v1::StreamGradientsResponse response;
  v1::StreamGradientsRequest setup = GraphSetup(whole, v1::DTYPE_FLOAT64);
  ASSERT_TRUE(session.Handle(&setup, Context(), &response).ok());
  const int64_t half = config.batch / 2 * config.seq * 8;  // Bytes of half the ids.
  for (int m = 0; m < 2; ++m) {
    v1::ComputeGradientsRequest part = whole;
    for (v1::NamedTensor& in : *part.mutable_graph_inputs()) {
      in.mutable_tensor()->set_shape(0, config.batch / 2);
      in.mutable_tensor()->set_data(in.tensor().data().substr(m * half, half));
    }
    v1::StreamGradientsRequest step = GraphStep(part, m == 0, /*accumulate=*/m == 0);
    absl::StatusOr<bool> answered = session.Handle(&step, Context(), &response);
    ASSERT_TRUE(answered.ok()) << answered.status();
    EXPECT_EQ(*answered, m == 1);
  }
  EXPECT_EQ(response.micro_batches(), 2);
  const v1::ComputeGradientsResponse& summed = response.result();
  EXPECT_NEAR(summed.loss(), expected.loss(), 1e-12 * std::abs(expected.loss()));
  ASSERT_EQ(summed.named_gradients_size(), expected.named_gradients_size());
  for (int p = 0; p < expected.named_gradients_size(); ++p) {
    EXPECT_EQ(summed.named_gradients(p).name(), expected.named_gradients(p).name());
    const std::string& a = summed.named_gradients(p).tensor().data();
    const std::string& b = expected.named_gradients(p).tensor().data();
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size() / 8; ++i) {
      double x, y;
      std::memcpy(&x, a.data() + 8 * i, 8);
      std::memcpy(&y, b.data() + 8 * i, 8);
      EXPECT_NEAR(x, y, 1e-12 * (1 + std::abs(y)))
          << summed.named_gradients(p).name() << "[" << i << "]";
    }
    EXPECT_NEAR(summed.parameter_diagnostics(p).grad_norm(),
                expected.parameter_diagnostics(p).grad_norm(),
                1e-12 * (1 + expected.parameter_diagnostics(p).grad_norm()));
  }
  // Combining micro-batches keeps which norms are present: the causal mask's, say, stays absent.
  ASSERT_EQ(summed.value_diagnostics_size(), expected.value_diagnostics_size());
  int absent = 0;
  for (int i = 0; i < expected.value_diagnostics_size(); ++i) {
    EXPECT_EQ(summed.value_diagnostics(i).has_grad_norm(),
              expected.value_diagnostics(i).has_grad_norm())
        << expected.value_diagnostics(i).value();
    absent += !expected.value_diagnostics(i).has_grad_norm();
  }
  EXPECT_GT(absent, 0);
  // The logits of both micro-batches, in order, as the whole batch's.
  const v1::Tensor& logits = Named(summed.outputs(), "logits");
  EXPECT_EQ(logits.shape(0), config.batch);
  EXPECT_EQ(logits.data(), Named(expected.outputs(), "logits").data());
  EXPECT_EQ(summed.stats().num_examples(), config.batch);
}

// A residual MLP with a training-mode Dropout after every Gelu (node seeds 1, 2, ...).
eg::GraphSpec DropoutMlpSpec() {
  eg::GraphSpec g = eg::testing::ResidualMlpSpec(5, 8, 3, 2, eg::DType::kFloat32);
  g.constants.push_back({"ratio", eg::DType::kFloat64, {}, {0.5}, {}});
  g.constants.push_back({"train", eg::DType::kBool, {}, {}, {1}});
  std::vector<eg::NodeSpec> dropouts;
  for (eg::NodeSpec& node : g.nodes) {
    if (node.op_type != "Gelu") continue;
    const std::string raw = node.outputs[0] + ".raw";
    dropouts.push_back({node.name + ".dropout",
                        "Dropout",
                        {raw, "ratio", "train"},
                        {node.outputs[0]},
                        {{"seed", int64_t{static_cast<int64_t>(dropouts.size()) + 1}}}});
    node.outputs[0] = raw;
  }
  g.nodes.insert(g.nodes.end(), dropouts.begin(), dropouts.end());
  return g;
}

// Fresh masks per call are the caller's choice (options.dropout_seed); the same seed gives the
// same bits. A stream without dropout_seed on its steps uses the step's index, so its steps
// draw fresh masks and equal unary calls with those seeds.
TEST(GraphDropout, SeedPerCallAndPerStreamStep) {
  v1::ComputeGradientsRequest request = GraphRequest<float>(DropoutMlpSpec(), {{6, 5}, {6, 3}}, 17);
  auto call = [&](uint64_t seed) {
    v1::ComputeGradientsRequest r = request;
    r.mutable_options()->set_dropout_seed(seed);
    v1::ComputeGradientsResponse response;
    EXPECT_TRUE(service::ComputeGradients(r, Limits(), Context(), &response).ok());
    return response;
  };
  const v1::ComputeGradientsResponse seed0 = call(0), again = call(0), seed1 = call(1);
  EXPECT_EQ(seed0.loss(), again.loss());
  EXPECT_NE(seed0.loss(), seed1.loss());
  ExpectSameBits(seed0.named_gradients(0).tensor(), again.named_gradients(0).tensor(), "seed 0");
  EXPECT_NE(seed0.named_gradients(0).tensor().data(), seed1.named_gradients(0).tensor().data());

  service::StreamSession session(Limits());
  v1::StreamGradientsResponse response;
  v1::StreamGradientsRequest setup = GraphSetup(request, v1::DTYPE_FLOAT32);
  ASSERT_TRUE(session.Handle(&setup, Context(), &response).ok());
  const uint64_t explicit_seed = 7;
  for (int s = 0; s < 3; ++s) {
    SCOPED_TRACE(s);
    v1::StreamGradientsRequest step = GraphStep(request, s == 0);
    if (s == 2) step.mutable_step()->set_dropout_seed(explicit_seed);
    absl::StatusOr<bool> answered = session.Handle(&step, Context(), &response);
    ASSERT_TRUE(answered.ok()) << answered.status();
    const v1::ComputeGradientsResponse unary = call(s == 2 ? explicit_seed : s);
    EXPECT_EQ(response.result().loss(), unary.loss());
    ExpectSameBits(unary.named_gradients(0).tensor(), response.result().named_gradients(0).tensor(),
                   "first parameter");
  }
}

TEST(GraphStream, NamedTensorsArriveInChunksAndErrorsNameTheField) {
  const eg::GraphSpec spec = eg::testing::ResidualMlpSpec(4, 6, 2, 1, eg::DType::kFloat64);
  const v1::ComputeGradientsRequest request = GraphRequest<double>(spec, {{3, 4}, {3, 2}}, 8);
  service::StreamSession session(Limits());
  v1::StreamGradientsResponse response;
  v1::StreamGradientsRequest setup = GraphSetup(request, v1::DTYPE_FLOAT64);
  ASSERT_TRUE(session.Handle(&setup, Context(), &response).ok());
  // blocks.0.fc1.weight [6, 4] in two chunks; the rest of the step whole.
  v1::StreamGradientsRequest step = GraphStep(request, true);
  v1::Tensor whole;
  for (int p = 0; p < step.step().named_parameters_size(); ++p) {
    if (step.step().named_parameters(p).name() != "blocks.0.fc1.weight") continue;
    whole = step.step().named_parameters(p).tensor();
    step.mutable_step()->mutable_named_parameters()->DeleteSubrange(p, 1);
    break;
  }
  for (int c = 0; c < 2; ++c) {
    v1::StreamGradientsRequest chunk;
    chunk.mutable_chunk()->set_field("named_parameters[blocks.0.fc1.weight]");
    if (c == 0) {
      chunk.mutable_chunk()->set_dtype(whole.dtype());
      *chunk.mutable_chunk()->mutable_shape() = whole.shape();
    }
    chunk.mutable_chunk()->set_data(whole.data().substr(c * 96, 96));
    ASSERT_TRUE(session.Handle(&chunk, Context(), &response).ok());
  }
  absl::StatusOr<bool> answered = session.Handle(&step, Context(), &response);
  ASSERT_TRUE(answered.ok()) << answered.status();
  v1::ComputeGradientsResponse unary;
  ASSERT_TRUE(service::ComputeGradients(request, Limits(), Context(), &unary).ok());
  EXPECT_EQ(response.result().loss(), unary.loss());

  // An update naming no parameter ends the stream naming the message and the field.
  v1::StreamGradientsRequest bad = GraphStep(request, false);
  v1::NamedTensor* u = bad.mutable_step()->add_named_parameter_update();
  u->set_name("blocks.0.fc3.weight");
  answered = session.Handle(&bad, Context(), &response);
  EXPECT_TRUE(absl::IsInvalidArgument(answered.status())) << answered.status();
  EXPECT_THAT(answered.status().message(),
              HasSubstr("message 4 (step): named_parameter_update[0].name: "
                        "\"blocks.0.fc3.weight\" is not a parameter"));

  // A chain's fields on a graph's stream, and a graph's chunk path that names nothing.
  service::StreamSession other(Limits());
  setup = GraphSetup(request, v1::DTYPE_FLOAT64);
  ASSERT_TRUE(other.Handle(&setup, Context(), &response).ok());
  v1::StreamGradientsRequest chunk;
  chunk.mutable_chunk()->set_field("named_parameters[nope]");
  answered = other.Handle(&chunk, Context(), &response);
  EXPECT_THAT(answered.status().message(), HasSubstr("message 1 (chunk): chunk.field"));
}

// ---------------------------------------------------------------------------------------------
// Over gRPC: a server with small graph limits, a table of malformed graph requests, and graph
// answers bit-identical to the engine's and to the chain form's.

class GraphGrpcTest : public ::testing::Test {
 protected:
  static service::ServiceLimits ServerLimits() {
    service::ServiceLimits limits;
    limits.max_message_bytes = 4 << 20;
    limits.max_activation_bytes = 1 << 20;
    limits.max_graph_nodes = 128;
    limits.max_graph_values = 256;
    limits.max_graph_rank = 6;
    return limits;
  }
  static void SetUpTestSuite() {
    spdlog::set_level(spdlog::level::warn);
    service::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.service.threads = 2;
    options.service.limits = ServerLimits();
    auto server = service::GradServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override { stub_ = v1::GradientService::NewStub(server_->InProcessChannel()); }

  grpc::Status Compute(const v1::ComputeGradientsRequest& request,
                       v1::ComputeGradientsResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    return stub_->ComputeGradients(&context, request, response);
  }
  grpc::Status Check(const v1::CheckGradientsRequest& request,
                     v1::CheckGradientsResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    return stub_->CheckGradients(&context, request, response);
  }

  static service::GradServer* server_;
  std::unique_ptr<v1::GradientService::Stub> stub_;
};

service::GradServer* GraphGrpcTest::server_ = nullptr;

// The chain form of a three-layer MLP and its graph form as a user would write it (ONNX-style:
// Transpose + MatMul + Add for each Linear, parameters named as nn.Sequential's state_dict):
// over gRPC, both give the same bits, which are also RunGraph's own.
TEST_F(GraphGrpcTest, MlpOverGrpcIsBitIdenticalToTheChainAndToTheEngine) {
  std::mt19937 rng(21);
  v1::ComputeGradientsRequest chain;
  const int64_t widths[] = {5, 9, 7, 2};
  eg::testing::SpecBuilder b;
  b.Input("input", eg::DType::kFloat64).Input("targets", eg::DType::kFloat64);
  std::string x = "input";
  for (int l = 0; l < 3; ++l) {
    v1::Linear* linear = chain.mutable_model()->add_layers()->mutable_linear();
    linear->set_in_features(widths[l]);
    linear->set_out_features(widths[l + 1]);
    v1::LinearParameters* p = chain.add_parameters();
    SetTensor<double>(p->mutable_weight(),
                      testing::RandomValues<double>(widths[l] * widths[l + 1], rng),
                      {widths[l + 1], widths[l]});
    SetTensor<double>(p->mutable_bias(), testing::RandomValues<double>(widths[l + 1], rng),
                      {widths[l + 1]});
    x = eg::testing::Linear(b, absl::StrCat(2 * l), x, widths[l], widths[l + 1]);
    if (l < 2) {
      chain.mutable_model()->add_layers()->mutable_relu();
      b.Node("Relu", {x}, {absl::StrCat(2 * l + 1)});
      x = absl::StrCat(2 * l + 1);
    }
  }
  chain.mutable_model()->mutable_loss()->mutable_mse();
  SetTensor<double>(chain.mutable_inputs(), testing::RandomValues<double>(6 * 5, rng), {6, 5});
  SetTensor<double>(chain.mutable_targets(), testing::RandomValues<double>(6 * 2, rng), {6, 2});
  const eg::GraphSpec spec = b.WithLoss(x, engine::LossKind::kMse, "targets");

  v1::ComputeGradientsRequest graph;
  *graph.mutable_model() = service::GraphSpecToModel(spec, v1::DTYPE_FLOAT64);
  for (int l = 0; l < 3; ++l) {
    v1::NamedTensor* w = graph.add_named_parameters();
    w->set_name(absl::StrCat(2 * l, ".weight"));
    *w->mutable_tensor() = chain.parameters(l).weight();
    v1::NamedTensor* bias = graph.add_named_parameters();
    bias->set_name(absl::StrCat(2 * l, ".bias"));
    *bias->mutable_tensor() = chain.parameters(l).bias();
  }
  v1::NamedTensor* in = graph.add_graph_inputs();
  in->set_name("input");
  *in->mutable_tensor() = chain.inputs();
  v1::NamedTensor* targets = graph.add_graph_inputs();
  targets->set_name("targets");
  *targets->mutable_tensor() = chain.targets();

  v1::ComputeGradientsResponse from_chain, from_graph;
  ASSERT_TRUE(Compute(chain, &from_chain).ok());
  const grpc::Status status = Compute(graph, &from_graph);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ExpectChainEqualsGraph(from_chain, from_graph, 3);
  double loss = 0;
  const std::vector<std::vector<double>> direct = DirectGradients<double>(spec, graph, &loss);
  EXPECT_EQ(from_graph.loss(), loss);
  for (size_t p = 0; p < direct.size(); ++p) {
    const std::string& bytes = from_graph.named_gradients(p).tensor().data();
    ASSERT_EQ(bytes.size(), direct[p].size() * sizeof(double));
    EXPECT_EQ(std::memcmp(bytes.data(), direct[p].data(), bytes.size()), 0)
        << spec.parameters[p].name;
  }
  // Diagnostics by name: one per parameter, one per node output.
  ASSERT_EQ(from_graph.parameter_diagnostics_size(), 6);
  EXPECT_EQ(from_graph.parameter_diagnostics(4).name(), "4.weight");
  EXPECT_GT(from_graph.parameter_diagnostics(4).grad_norm(), 0);
  int outputs = 0;
  for (const eg::NodeSpec& node : spec.nodes) outputs += static_cast<int>(node.outputs.size());
  EXPECT_EQ(from_graph.value_diagnostics_size(), outputs);
}

// A residual LayerNorm MLP in float64: every parameter sampled, and the relative errors of a
// correct gradient small (Note [Relative error floor]).
TEST_F(GraphGrpcTest, CheckGradientsOnAResidualLayerNormGraphReportsSmallErrors) {
  const eg::GraphSpec spec = eg::testing::ResidualMlpSpec(6, 10, 3, 2, eg::DType::kFloat64);
  v1::CheckGradientsRequest check;
  *check.mutable_request() = GraphRequest<double>(spec, {{5, 6}, {5, 3}}, /*seed=*/17);
  check.mutable_request()->mutable_options()->add_input_gradient_names("x");
  check.set_samples_per_tensor(32);
  v1::CheckGradientsResponse response;
  const grpc::Status status = Check(check, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.checks_size(), static_cast<int>(spec.parameters.size()) + 1);
  for (size_t p = 0; p < spec.parameters.size(); ++p) {
    EXPECT_EQ(response.checks(p).tensor(), spec.parameters[p].name);
    EXPECT_GT(response.checks(p).samples(), 0);
  }
  EXPECT_EQ(response.checks(spec.parameters.size()).tensor(), "x");
  EXPECT_EQ(response.analytic_dtype(), v1::DTYPE_FLOAT64);
  EXPECT_LT(response.max_rel_error(), 1e-6);
}

struct BadGraph {
  const char* name;
  std::function<void(v1::ComputeGradientsRequest*)> mutate;
  grpc::StatusCode code;
  const char* message;  // Must appear in the status message: the field it names.
  bool gpt = false;     // Mutates the GPT request instead of the Gemm + Relu one.
};

void PrintTo(const BadGraph& bad, std::ostream* os) { *os << bad.name; }

v1::ComputeGradientsRequest GptRequest() {
  const eg::testing::GptConfig config;
  return GraphRequest<float>(eg::testing::GptSpec(config),
                             {{config.batch, config.seq}, {config.batch, config.seq}}, 5,
                             config.vocab, 0.5);
}

class MalformedGraphTest : public GraphGrpcTest, public ::testing::WithParamInterface<BadGraph> {};

TEST_P(MalformedGraphTest, IsRefusedNamingTheFieldAndServerKeepsServing) {
  const BadGraph& bad = GetParam();
  v1::ComputeGradientsRequest request = bad.gpt ? GptRequest() : testing::GraphSeedRequest<float>();
  bad.mutate(&request);
  v1::ComputeGradientsResponse response;
  const grpc::Status status = Compute(request, &response);
  EXPECT_EQ(status.error_code(), bad.code) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr(bad.message));
  // Every refusal comes before the activations are reserved, i.e. before anything is
  // allocated for the run (the same request through compute.h, counting reservations).
  service::ComputeContext context = Context();
  int reservations = 0;
  context.reserve_memory = [&](int64_t) {
    ++reservations;
    return absl::OkStatus();
  };
  const absl::Status direct =
      service::ComputeGradients(request, ServerLimits(), context, &response);
  EXPECT_EQ(static_cast<int>(direct.code()), static_cast<int>(bad.code)) << direct;
  EXPECT_EQ(reservations, 0);

  v1::ComputeGradientsResponse good;
  ASSERT_TRUE(Compute(testing::GraphSeedRequest<float>(), &good).ok());
  EXPECT_EQ(good.named_gradients_size(), 2);
}

using Request = v1::ComputeGradientsRequest;
constexpr auto kInvalid = grpc::StatusCode::INVALID_ARGUMENT;
constexpr auto kExhausted = grpc::StatusCode::RESOURCE_EXHAUSTED;

v1::Graph* G(Request* r) { return r->mutable_model()->mutable_graph(); }

const BadGraph kBadGraphs[] = {
    // The model's form.
    {"LayersAndGraph", [](Request* r) { r->mutable_model()->add_layers()->mutable_relu(); },
     kInvalid, "model.layers: must be empty when model.graph is set"},
    {"ChainInputsOnAGraph", [](Request* r) { r->mutable_inputs()->set_dtype(v1::DTYPE_FLOAT32); },
     kInvalid, "inputs: must be unset for a graph model"},
    {"ReturnInputGradientOnAGraph",
     [](Request* r) { r->mutable_options()->set_return_input_gradient(true); }, kInvalid,
     "options.return_input_gradient"},
    {"NoLoss", [](Request* r) { r->mutable_model()->clear_loss(); }, kInvalid, "model.loss"},
    // Declarations.
    {"EmptyInputName", [](Request* r) { G(r)->mutable_inputs(0)->clear_name(); }, kInvalid,
     "model.graph.inputs[0].name"},
    {"UnspecifiedInputDType",
     [](Request* r) { G(r)->mutable_inputs(1)->set_dtype(v1::DTYPE_UNSPECIFIED); }, kInvalid,
     "model.graph.inputs[1].dtype"},
    {"NonPositiveParameterSize", [](Request* r) { G(r)->mutable_parameters(1)->set_shape(0, 0); },
     kInvalid, "model.graph.parameters[1].shape[0]"},
    {"ConstantBoolOutOfRange",
     [](Request* r) {
       v1::NamedTensor* c = G(r)->add_constants();
       c->set_name("mask");
       c->mutable_tensor()->set_dtype(v1::DTYPE_BOOL);
       c->mutable_tensor()->add_shape(2);
       c->mutable_tensor()->set_data(std::string("\x01\x02", 2));
     },
     kInvalid, "model.graph.constants[0].tensor.data"},
    {"ValueDefinedTwice", [](Request* r) { G(r)->mutable_nodes(1)->set_outputs(0, "0"); }, kInvalid,
     "model.graph.nodes[1] (\"act\", Relu).outputs[0]: value \"0\" is already defined by "
     "model.graph.nodes[0] (\"fc\", Gemm).outputs[0]"},
    {"EmptyOutputName", [](Request* r) { G(r)->mutable_nodes(1)->set_outputs(0, ""); }, kInvalid,
     "model.graph.nodes[1].outputs[0]"},
    // Nodes.
    {"UnknownOp", [](Request* r) { G(r)->mutable_nodes(1)->set_op_type("Relu6"); }, kInvalid,
     "model.graph.nodes[1].op_type: unknown op \"Relu6\""},
    {"UndefinedInput", [](Request* r) { G(r)->mutable_nodes(1)->set_inputs(0, "nope"); }, kInvalid,
     "model.graph.nodes[1] (\"act\", Relu).inputs[0]"},
    {"Cycle", [](Request* r) { G(r)->mutable_nodes(0)->set_inputs(0, "output"); }, kInvalid,
     "model.graph.nodes[0] (\"fc\", Gemm)"},
    {"TooManyInputs", [](Request* r) { G(r)->mutable_nodes(1)->add_inputs("input"); }, kInvalid,
     "model.graph.nodes[1] (\"act\", Relu).inputs"},
    {"UnknownAttribute",
     [](Request* r) {
       v1::Attribute* a = G(r)->mutable_nodes(0)->add_attributes();
       a->set_name("transC");
       a->set_i(1);
     },
     kInvalid, "model.graph.nodes[0] (\"fc\", Gemm).attributes[1] (\"transC\")"},
    {"AttributeOfTheWrongKind",
     [](Request* r) { G(r)->mutable_nodes(0)->mutable_attributes(0)->set_f(1.0); }, kInvalid,
     "model.graph.nodes[0] (\"fc\", Gemm).attributes[0] (\"transB\")"},
    {"AttributeWithoutValue",
     [](Request* r) { G(r)->mutable_nodes(0)->mutable_attributes(0)->clear_value(); }, kInvalid,
     "model.graph.nodes[0].attributes[0] (\"transB\")"},
    {"AttributeTwice",
     [](Request* r) { *G(r)->mutable_nodes(0)->add_attributes() = G(r)->nodes(0).attributes(0); },
     kInvalid, "model.graph.nodes[0].attributes[1] (\"transB\"): given twice"},
    {"TensorAttributeOutsideConstant",
     [](Request* r) {
       v1::Attribute* a = G(r)->mutable_nodes(0)->add_attributes();
       a->set_name("alpha");
       a->mutable_t()->set_dtype(v1::DTYPE_FLOAT32);
     },
     kInvalid, "model.graph.nodes[0].attributes[1] (\"alpha\")"},
    {"ShapesDoNotMatch",
     [](Request* r) {
       // Declared and sent as [2, 3]: consistent with itself, not with the Gemm's input.
       G(r)->mutable_parameters(0)->set_shape(1, 3);
       SetTensor<float>(r->mutable_named_parameters(0)->mutable_tensor(),
                        std::vector<float>(6, 0.5f), {2, 3});
     },
     kInvalid, "model.graph.nodes[0] (\"fc\", Gemm).inputs[1]"},
    {"AttentionProjectionOfTheWrongWidth",
     [](Request* r) {
       // h.0.attn.c_attn.weight [24, 8] declared and sent as [24, 9]: its MatMul is named.
       for (v1::GraphParameter& p : *G(r)->mutable_parameters()) {
         if (p.name() == "h.0.attn.c_attn.weight") p.set_shape(1, 9);
       }
       for (v1::NamedTensor& p : *r->mutable_named_parameters()) {
         if (p.name() == "h.0.attn.c_attn.weight") {
           SetTensor<float>(p.mutable_tensor(), std::vector<float>(24 * 9, 0.1f), {24, 9});
         }
       }
     },
     kInvalid, "MatMul).inputs[1] (\"h.0.attn.c_attn.weight_t\")", /*gpt=*/true},
    {"ReshapeToAShapeWhoseSizeOverflows",
     [](Request* r) {
       // [2^62 + 8, 4] has 2^64 + 32 elements: a product wrapping to the input's 32. Found by
       // graph_fuzz (signed overflow in the planner).
       v1::NamedTensor* c = G(r)->add_constants();
       c->set_name("huge_shape");
       SetTensor<int64_t>(c->mutable_tensor(), {(int64_t{1} << 62) + 8, 4}, {2});
       v1::Node* n = G(r)->add_nodes();
       n->set_name("flatten");
       n->set_op_type("Reshape");
       n->add_inputs("input");
       n->add_inputs("huge_shape");
       n->add_outputs("reshaped");
     },
     kInvalid, "model.graph.nodes[2] (\"flatten\", Reshape).inputs[1] (\"huge_shape\")"},
    {"UnusedParameter",
     [](Request* r) {
       v1::GraphParameter* p = G(r)->add_parameters();
       p->set_name("spare");
       p->add_shape(3);
       v1::NamedTensor* t = r->add_named_parameters();
       t->set_name("spare");
       SetTensor<float>(t->mutable_tensor(), std::vector<float>(3, 1.f), {3});
     },
     kInvalid, "model.graph.parameters[2] (\"spare\")"},
    {"LossOutputNotAnOutput", [](Request* r) { G(r)->set_loss_output("0"); }, kInvalid,
     "model.graph.loss_output"},
    {"LossTargetNotAnInput", [](Request* r) { G(r)->set_loss_target("0"); }, kInvalid,
     "model.graph.loss_target"},
    // Tensors sent with the call.
    {"MissingNamedParameter", [](Request* r) { r->mutable_named_parameters()->RemoveLast(); },
     kInvalid, "named_parameters: missing \"0.bias\""},
    {"UnknownNamedParameter",
     [](Request* r) { r->mutable_named_parameters(0)->set_name("0.weights"); }, kInvalid,
     "named_parameters[0].name: \"0.weights\" is not a parameter"},
    {"ParameterSentTwice", [](Request* r) { *r->add_named_parameters() = r->named_parameters(0); },
     kInvalid, "named_parameters[2].name"},
    {"ParameterOfTheWrongShape",
     [](Request* r) {
       SetTensor<float>(r->mutable_named_parameters(0)->mutable_tensor(),
                        std::vector<float>(8, 1.f), {4, 2});
     },
     kInvalid, "named_parameters[0].tensor.shape: expected [2, 4]"},
    {"MissingGraphInput", [](Request* r) { r->mutable_graph_inputs()->RemoveLast(); }, kInvalid,
     "graph_inputs: missing \"targets\""},
    {"WrongInputByteLength",
     [](Request* r) { r->mutable_graph_inputs(0)->mutable_tensor()->mutable_data()->resize(100); },
     kInvalid, "graph_inputs[0].tensor.data: expected 128 bytes"},
    {"MixedDTypes",
     [](Request* r) {
       SetTensor<double>(r->mutable_named_parameters(1)->mutable_tensor(),
                         std::vector<double>(2, 1.0), {2});
     },
     kInvalid, "named_parameters[1].tensor.dtype"},
    {"NanInInputs",
     [](Request* r) {
       const float nan = std::numeric_limits<float>::quiet_NaN();
       std::memcpy(r->mutable_graph_inputs(0)->mutable_tensor()->mutable_data()->data() + 12, &nan,
                   sizeof(nan));
     },
     kInvalid, "graph_inputs[0].tensor.data: non-finite value nan at index [0, 3]"},
    {"InputGradientOfAnUnknownInput",
     [](Request* r) { r->mutable_options()->add_input_gradient_names("x"); }, kInvalid,
     "options.input_gradient_names[0]"},
    {"UnknownCheckpointMode",
     [](Request* r) {
       r->mutable_options()->mutable_checkpointing()->set_mode(
           static_cast<v1::Checkpointing::Mode>(42));
     },
     kInvalid, "options.checkpointing.mode"},
    {"EveryKZero",
     [](Request* r) {
       r->mutable_options()->mutable_checkpointing()->set_mode(v1::Checkpointing::MODE_EVERY_K);
     },
     kInvalid, "options.checkpointing.every_k"},
    // Limits, each before anything is allocated (the server's: 128 nodes, 256 values, rank 6,
    // 1 MiB of activations).
    {"TooManyNodes",
     [](Request* r) {
       for (int i = 0; i < 127; ++i) {
         v1::Node* n = G(r)->add_nodes();
         n->set_op_type("Identity");
         n->add_inputs("output");
         n->add_outputs(absl::StrCat("copy", i));
       }
     },
     kExhausted, "model.graph.nodes: 129 nodes exceed max_graph_nodes (128)"},
    {"TooManyValues",
     [](Request* r) {
       v1::Node* n = G(r)->add_nodes();
       n->set_op_type("Split");
       n->add_inputs("output");
       for (int i = 0; i < 300; ++i) n->add_outputs(absl::StrCat("part", i));
     },
     kExhausted, "max_graph_values (256)"},
    {"RankOverTheLimit",
     [](Request* r) {
       v1::GraphParameter* p = G(r)->mutable_parameters(1);
       for (int i = 0; i < 6; ++i) p->add_shape(1);
     },
     kExhausted, "model.graph.parameters[1].shape: rank 7 exceeds max_graph_rank (6)"},
    {"HugeParameterClaimedWithFewBytes",
     [](Request* r) {
       G(r)->mutable_parameters(0)->set_shape(0, int64_t{1} << 40);
       r->mutable_named_parameters(0)->mutable_tensor()->set_shape(0, int64_t{1} << 40);
     },
     kExhausted, "model.graph.parameters[0].shape"},
    {"HugeBatchClaimedWithFewBytes",
     [](Request* r) {
       r->mutable_graph_inputs(0)->mutable_tensor()->set_shape(0, int64_t{1} << 30);
     },
     kExhausted, "graph_inputs[0].tensor.shape"},
    {"ActivationsOverTheLimit",
     [](Request* r) {
       // 65536 rows: the plan's peak is over 1 MiB; refused once planned, before running.
       SetTensor<float>(r->mutable_graph_inputs(0)->mutable_tensor(),
                        std::vector<float>(65536 * 4, 0.5f), {65536, 4});
       SetTensor<float>(r->mutable_graph_inputs(1)->mutable_tensor(),
                        std::vector<float>(65536 * 2, 0.5f), {65536, 2});
     },
     kExhausted, "max_activation_bytes"},
    {"ConstantsOverTheLimit",
     [](Request* r) {
       // 160 Ki bools: 160 KiB sent, 1.25 MiB once held as int64.
       v1::NamedTensor* c = G(r)->add_constants();
       c->set_name("mask");
       c->mutable_tensor()->set_dtype(v1::DTYPE_BOOL);
       c->mutable_tensor()->add_shape(160 << 10);
       c->mutable_tensor()->set_data(std::string(160 << 10, '\x01'));
     },
     kExhausted, "model.graph.constants[0].tensor: the graph's constants would hold"},
};

INSTANTIATE_TEST_SUITE_P(Table, MalformedGraphTest, ::testing::ValuesIn(kBadGraphs),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace gradserve
