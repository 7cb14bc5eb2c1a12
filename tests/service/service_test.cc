// The service end to end over gRPC: a round trip of the full request and response, the
// standard health and reflection services, and a table of malformed requests that must each
// get the right status and a message naming the field, with the server still answering after.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "gradserve/v1/gradserve.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "server/service/server.h"
#include "tests/service/test_requests.h"

namespace gradserve {
namespace {

using ::testing::HasSubstr;
using testing::SeedRequest;
using testing::SetTensor;
namespace v1 = ::gradserve::v1;

class ServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    spdlog::set_level(spdlog::level::warn);  // One log line per call would drown the output.
    service::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.service.threads = 2;
    options.service.limits.max_message_bytes = 1 << 20;
    options.service.limits.max_layers = 64;
    options.service.limits.max_activation_bytes = 1 << 20;
    auto server = service::GradServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  void SetUp() override {
    channel_ = server_->InProcessChannel();
    stub_ = v1::GradientService::NewStub(channel_);
  }

  grpc::Status Compute(const v1::ComputeGradientsRequest& request,
                       v1::ComputeGradientsResponse* response) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return stub_->ComputeGradients(&context, request, response);
  }

  static service::GradServer* server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::GradientService::Stub> stub_;
};

service::GradServer* ServiceTest::server_ = nullptr;

template <typename T>
std::vector<T> Values(const v1::Tensor& tensor) {
  std::vector<T> values(tensor.data().size() / sizeof(T));
  std::memcpy(values.data(), tensor.data().data(), tensor.data().size());
  return values;
}

// The seed network's gradients worked out independently: z = x W^T + b, a = relu(z),
// L = mean((a - t)^2), delta = dL/dz; dW = delta^T x, db = sum_batch delta, dx = delta W.
TEST_F(ServiceTest, RoundTripMatchesClosedForm) {
  v1::ComputeGradientsRequest request = SeedRequest<double>();
  request.mutable_options()->set_return_input_gradient(true);
  request.mutable_options()->set_return_output(true);
  request.mutable_model()->mutable_layers(0)->set_name("fc1");
  v1::ComputeGradientsResponse response;
  ASSERT_TRUE(Compute(request, &response).ok());

  const auto w = Values<double>(request.parameters(0).weight());
  const auto b = Values<double>(request.parameters(0).bias());
  const auto x = Values<double>(request.inputs());
  const auto t = Values<double>(request.targets());
  std::vector<double> delta(16), output(16);
  double loss = 0;
  for (int n = 0; n < 8; ++n) {
    for (int o = 0; o < 2; ++o) {
      double z = b[o];
      for (int i = 0; i < 4; ++i) z += x[n * 4 + i] * w[o * 4 + i];
      const double a = z > 0 ? z : 0;
      output[n * 2 + o] = a;
      loss += (a - t[n * 2 + o]) * (a - t[n * 2 + o]) / 16;
      delta[n * 2 + o] = z > 0 ? 2 * (a - t[n * 2 + o]) / 16 : 0;
    }
  }
  EXPECT_NEAR(response.loss(), loss, 1e-14);
  const auto dw = Values<double>(response.gradients(0).weight());
  const auto db = Values<double>(response.gradients(0).bias());
  const auto dx = Values<double>(response.input_gradient());
  const auto out = Values<double>(response.output());
  for (int o = 0; o < 2; ++o) {
    double expected_db = 0;
    for (int n = 0; n < 8; ++n) expected_db += delta[n * 2 + o];
    EXPECT_NEAR(db[o], expected_db, 1e-14);
    for (int i = 0; i < 4; ++i) {
      double expected = 0;
      for (int n = 0; n < 8; ++n) expected += delta[n * 2 + o] * x[n * 4 + i];
      EXPECT_NEAR(dw[o * 4 + i], expected, 1e-14) << "dW[" << o << ", " << i << "]";
    }
  }
  for (int n = 0; n < 8; ++n) {
    for (int i = 0; i < 4; ++i) {
      double expected = 0;
      for (int o = 0; o < 2; ++o) expected += delta[n * 2 + o] * w[o * 4 + i];
      EXPECT_NEAR(dx[n * 4 + i], expected, 1e-14) << "dx[" << n << ", " << i << "]";
    }
    for (int o = 0; o < 2; ++o) EXPECT_DOUBLE_EQ(out[n * 2 + o], output[n * 2 + o]);
  }
  // Layout and metadata of the response.
  EXPECT_EQ(response.gradients(0).weight().dtype(), v1::DTYPE_FLOAT64);
  EXPECT_THAT(response.gradients(0).weight().shape(), ::testing::ElementsAre(2, 4));
  EXPECT_THAT(response.gradients(0).bias().shape(), ::testing::ElementsAre(2));
  EXPECT_THAT(response.input_gradient().shape(), ::testing::ElementsAre(8, 4));
  ASSERT_EQ(response.diagnostics_size(), 2);
  EXPECT_EQ(response.diagnostics(0).kind(), "linear");
  EXPECT_EQ(response.diagnostics(0).name(), "fc1");
  EXPECT_EQ(response.diagnostics(1).kind(), "relu");
  double dw_norm = 0;
  for (double v : dw) dw_norm += v * v;
  EXPECT_NEAR(response.diagnostics(0).weight_grad_norm(), std::sqrt(dw_norm), 1e-14);
  EXPECT_EQ(response.diagnostics(0).non_finite_count(), 0);
  EXPECT_EQ(response.stats().num_examples(), 8);
  EXPECT_EQ(response.stats().threads(), 1);  // A small call runs on one core.
  EXPECT_EQ(response.stats().plan().mode(), v1::Checkpointing::MODE_NONE);
  EXPECT_GT(response.stats().peak_activation_bytes(), 0);
}

TEST_F(ServiceTest, SameRequestGivesBitIdenticalResults) {
  v1::ComputeGradientsRequest request = SeedRequest<float>(5);
  request.mutable_options()->set_return_input_gradient(true);
  v1::ComputeGradientsResponse first, second;
  ASSERT_TRUE(Compute(request, &first).ok());
  ASSERT_TRUE(Compute(request, &second).ok());
  EXPECT_EQ(first.gradients(0).weight().data(), second.gradients(0).weight().data());
  EXPECT_EQ(first.gradients(0).bias().data(), second.gradients(0).bias().data());
  EXPECT_EQ(first.input_gradient().data(), second.input_gradient().data());
  EXPECT_EQ(first.loss(), second.loss());
}

TEST_F(ServiceTest, CheckpointingThroughTheApiIsBitIdentical) {
  v1::ComputeGradientsRequest request = SeedRequest<double>(9);
  // Deepen the seed net: Linear(4,2) ReLU, then 6 x (Linear(2,2) Tanh).
  std::mt19937 rng(3);
  for (int i = 0; i < 6; ++i) {
    v1::Linear* linear = request.mutable_model()->add_layers()->mutable_linear();
    linear->set_in_features(2);
    linear->set_out_features(2);
    request.mutable_model()->add_layers()->mutable_tanh();
    v1::LinearParameters* p = request.add_parameters();
    SetTensor<double>(p->mutable_weight(), testing::RandomValues<double>(4, rng), {2, 2});
    SetTensor<double>(p->mutable_bias(), testing::RandomValues<double>(2, rng), {2});
  }
  v1::ComputeGradientsResponse plain;
  ASSERT_TRUE(Compute(request, &plain).ok());
  request.mutable_options()->mutable_checkpointing()->set_mode(v1::Checkpointing::MODE_SQRT);
  v1::ComputeGradientsResponse sqrt;
  ASSERT_TRUE(Compute(request, &sqrt).ok());
  EXPECT_EQ(sqrt.stats().plan().mode(), v1::Checkpointing::MODE_SQRT);
  EXPECT_GT(sqrt.stats().layers_recomputed(), 0);
  EXPECT_LT(sqrt.stats().peak_activation_bytes(), plain.stats().peak_activation_bytes());
  EXPECT_EQ(sqrt.stats().peak_activation_bytes(), sqrt.stats().plan().predicted_peak_bytes());
  ASSERT_EQ(sqrt.gradients_size(), plain.gradients_size());
  for (int l = 0; l < plain.gradients_size(); ++l) {
    EXPECT_EQ(sqrt.gradients(l).weight().data(), plain.gradients(l).weight().data()) << l;
    EXPECT_EQ(sqrt.gradients(l).bias().data(), plain.gradients(l).bias().data()) << l;
  }
}

TEST_F(ServiceTest, CheckGradientsAgreesWithFiniteDifferences) {
  v1::CheckGradientsRequest request;
  *request.mutable_request() = SeedRequest<double>(11);
  request.set_samples_per_tensor(64);
  v1::CheckGradientsResponse response;
  grpc::ClientContext context;
  ASSERT_TRUE(stub_->CheckGradients(&context, request, &response).ok());
  ASSERT_EQ(response.checks_size(), 3);  // weight, bias, inputs
  EXPECT_EQ(response.checks(0).tensor(), "parameters[0].weight");
  EXPECT_EQ(response.checks(2).tensor(), "inputs");
  EXPECT_EQ(response.checks(0).samples(), 8);
  EXPECT_EQ(response.analytic_dtype(), v1::DTYPE_FLOAT64);
  EXPECT_LT(response.max_rel_error(), 1e-6);
  EXPECT_GT(response.max_abs_error(), 0);  // Finite differences are never exact.
}

TEST_F(ServiceTest, ServerInfoStatesLimitsAndCapabilities) {
  v1::GetServerInfoResponse info;
  grpc::ClientContext context;
  ASSERT_TRUE(stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.api(), "gradserve.v1");
  EXPECT_FALSE(info.version().empty());
  EXPECT_EQ(info.limits().max_message_bytes(), 1 << 20);
  EXPECT_EQ(info.limits().max_layers(), 64);
  // Every limit the API declares is reported, including ones added later.
  const google::protobuf::Reflection* reflection = info.limits().GetReflection();
  const google::protobuf::Descriptor* limits = v1::Limits::descriptor();
  for (int f = 0; f < limits->field_count(); ++f) {
    const google::protobuf::FieldDescriptor* field = limits->field(f);
    const double value = field->cpp_type() == google::protobuf::FieldDescriptor::CPPTYPE_DOUBLE
                             ? reflection->GetDouble(info.limits(), field)
                             : static_cast<double>(reflection->GetInt64(info.limits(), field));
    EXPECT_GT(value, 0) << field->name();
  }
  EXPECT_EQ(info.threads(), 2);
  EXPECT_THAT(info.layers(),
              ::testing::UnorderedElementsAre("linear", "relu", "leaky_relu", "sigmoid", "tanh",
                                              "gelu", "identity"));
  EXPECT_THAT(info.losses(),
              ::testing::UnorderedElementsAre("mse", "cross_entropy", "bce_with_logits", "huber",
                                              "l1", "external"));
  EXPECT_THAT(info.dtypes(), ::testing::ElementsAre(v1::DTYPE_FLOAT32, v1::DTYPE_FLOAT64));
  EXPECT_EQ(info.checkpoint_modes_size(), 4);
  // Names the kernel and, for oneDNN, an instruction set the engine knows by name.
  EXPECT_THAT(info.gemm_kernel(),
              ::testing::AnyOf(::testing::Eq("eigen"), ::testing::StartsWith("onednn ")));
  EXPECT_NE(info.gemm_kernel(), "onednn other");
}

TEST_F(ServiceTest, HealthReportsServingForServerAndService) {
  auto health = ::grpc::health::v1::Health::NewStub(channel_);
  for (const char* name : {"", "gradserve.v1.GradientService"}) {
    ::grpc::health::v1::HealthCheckRequest request;
    request.set_service(name);
    ::grpc::health::v1::HealthCheckResponse response;
    grpc::ClientContext context;
    ASSERT_TRUE(health->Check(&context, request, &response).ok()) << name;
    EXPECT_EQ(response.status(), ::grpc::health::v1::HealthCheckResponse::SERVING) << name;
  }
}

// A 64 MiB model (one 4096 x 4096 float32 Linear layer) through a server started with default
// options, over TCP, with the client library's channel: no flag anywhere.
TEST(DefaultLimits, SixtyFourMebibyteModelGoesThrough) {
  service::ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  auto server = service::GradServer::Start(options);
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = grpc::CreateCustomChannel("127.0.0.1:" + std::to_string((*server)->port()),
                                           grpc::InsecureChannelCredentials(), [] {
                                             grpc::ChannelArguments args;
                                             args.SetMaxReceiveMessageSize(-1);
                                             args.SetMaxSendMessageSize(-1);
                                             return args;
                                           }());
  auto stub = v1::GradientService::NewStub(channel);

  constexpr int64_t kWidth = 4096;
  v1::ComputeGradientsRequest request;
  v1::Linear* linear = request.mutable_model()->add_layers()->mutable_linear();
  linear->set_in_features(kWidth);
  linear->set_out_features(kWidth);
  linear->set_bias(false);
  request.mutable_model()->mutable_loss()->mutable_mse();
  std::vector<float> weight(kWidth * kWidth, 0.f);
  for (int64_t i = 0; i < kWidth; ++i) weight[i * kWidth + i] = 1.f;  // Identity matrix.
  SetTensor<float>(request.add_parameters()->mutable_weight(), weight, {kWidth, kWidth});
  SetTensor<float>(request.mutable_inputs(), std::vector<float>(kWidth, 1.f), {1, kWidth});
  SetTensor<float>(request.mutable_targets(), std::vector<float>(kWidth, 0.f), {1, kWidth});
  ASSERT_GE(request.ByteSizeLong(), size_t{64} << 20);

  v1::ComputeGradientsResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  const grpc::Status status = stub->ComputeGradients(&context, request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  // Output = x = ones, target 0: L = mean(1) = 1, dW = (2/4096) * ones.
  EXPECT_DOUBLE_EQ(response.loss(), 1.0);
  const auto dw = Values<float>(response.gradients(0).weight());
  ASSERT_EQ(dw.size(), weight.size());
  EXPECT_EQ(dw.front(), 2.f / kWidth);
  EXPECT_EQ(dw.back(), 2.f / kWidth);
}

// A request whose compute is abandoned when its deadline passes.
TEST_F(ServiceTest, ExpiredDeadlineEndsDeadlineExceeded) {
  v1::ComputeGradientsRequest request = SeedRequest<double>();
  v1::ComputeGradientsResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() - std::chrono::milliseconds(1));
  const grpc::Status status = stub_->ComputeGradients(&context, request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
}

struct BadRequest {
  const char* name;
  std::function<void(v1::ComputeGradientsRequest*)> mutate;
  grpc::StatusCode code;
  const char* message;  // Must appear in the status message.
};

void PrintTo(const BadRequest& bad, std::ostream* os) { *os << bad.name; }

class MalformedRequestTest : public ServiceTest,
                             public ::testing::WithParamInterface<BadRequest> {};

TEST_P(MalformedRequestTest, IsRefusedWithFieldNameAndServerKeepsServing) {
  const BadRequest& bad = GetParam();
  v1::ComputeGradientsRequest request = SeedRequest<float>();
  bad.mutate(&request);
  v1::ComputeGradientsResponse response;
  const grpc::Status status = Compute(request, &response);
  EXPECT_EQ(status.error_code(), bad.code) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr(bad.message));

  v1::ComputeGradientsResponse good;
  ASSERT_TRUE(Compute(SeedRequest<float>(), &good).ok());
  EXPECT_EQ(good.gradients_size(), 1);
}

using Request = v1::ComputeGradientsRequest;
constexpr auto kInvalid = grpc::StatusCode::INVALID_ARGUMENT;
constexpr auto kExhausted = grpc::StatusCode::RESOURCE_EXHAUSTED;

void SetFloat(v1::Tensor* tensor, int64_t index, float value) {
  std::memcpy(tensor->mutable_data()->data() + index * sizeof(float), &value, sizeof(float));
}

void UseCrossEntropy(Request* r, std::vector<int64_t> classes) {
  r->mutable_model()->mutable_loss()->mutable_cross_entropy();
  SetTensor<int64_t>(r->mutable_targets(), classes, {static_cast<int64_t>(classes.size())});
}

const BadRequest kBadRequests[] = {
    {"WrongInputByteLength", [](Request* r) { r->mutable_inputs()->mutable_data()->resize(100); },
     kInvalid, "inputs.data: expected 128 bytes"},
    {"WrongWeightByteLength",
     [](Request* r) { r->mutable_parameters(0)->mutable_weight()->mutable_data()->pop_back(); },
     kInvalid, "parameters[0].weight.data"},
    {"LayerWidthsDoNotChain",
     [](Request* r) {
       v1::Linear* l = r->mutable_model()->add_layers()->mutable_linear();
       l->set_in_features(3);
       l->set_out_features(5);
     },
     kInvalid, "model.layers[2].linear.in_features: expected 2"},
    {"FirstLayerDoesNotFitInputs",
     [](Request* r) {
       r->mutable_model()->mutable_layers(0)->mutable_linear()->set_in_features(5);
     },
     kInvalid, "model.layers[0].linear.in_features: expected 4 (the width of inputs)"},
    {"MissingParameters", [](Request* r) { r->clear_parameters(); }, kInvalid,
     "parameters: expected 1 entries"},
    {"MissingWeight", [](Request* r) { r->mutable_parameters(0)->clear_weight(); }, kInvalid,
     "parameters[0].weight: required"},
    {"MissingBias", [](Request* r) { r->mutable_parameters(0)->clear_bias(); }, kInvalid,
     "parameters[0].bias: required"},
    {"BiasForLayerWithoutBias",
     [](Request* r) { r->mutable_model()->mutable_layers(0)->mutable_linear()->set_bias(false); },
     kInvalid, "parameters[0].bias: must be unset"},
    {"WeightShapeTransposed",
     [](Request* r) {
       auto* w = r->mutable_parameters(0)->mutable_weight();
       w->set_shape(0, 4);
       w->set_shape(1, 2);
     },
     kInvalid, "parameters[0].weight.shape: expected [2, 4], got [4, 2]"},
    {"NegativeFeatures",
     [](Request* r) {
       r->mutable_model()->mutable_layers(0)->mutable_linear()->set_out_features(-2);
     },
     kInvalid, "model.layers[0].linear.out_features: expected a positive size, got -2"},
    {"HugeFeatures",
     [](Request* r) {
       r->mutable_model()->mutable_layers(0)->mutable_linear()->set_out_features(int64_t{1} << 40);
     },
     kExhausted, "max_features"},
    {"HugeBatchClaimedWithFewBytes",
     [](Request* r) { r->mutable_inputs()->set_shape(0, int64_t{1} << 40); }, kExhausted,
     "inputs.shape[0]: 1099511627776 exceeds max_batch"},
    {"ShapeOverflowingElementCount",
     [](Request* r) {
       r->mutable_inputs()->set_shape(0, int64_t{1} << 20);
       r->mutable_inputs()->set_shape(1, int64_t{1} << 20);
       r->mutable_model()->mutable_layers(0)->mutable_linear()->set_in_features(int64_t{1} << 20);
     },
     kExhausted, "max_tensor_elements"},
    {"EmptyBatch",
     [](Request* r) {
       r->mutable_inputs()->set_shape(0, 0);
       r->mutable_inputs()->clear_data();
     },
     kInvalid, "inputs.shape[0]: expected a positive size, got 0"},
    {"InputsRank3", [](Request* r) { r->mutable_inputs()->add_shape(1); }, kInvalid,
     "inputs.shape: expected rank 2"},
    {"UnknownDType", [](Request* r) { r->mutable_inputs()->set_dtype(static_cast<v1::DType>(99)); },
     kInvalid, "inputs.dtype: expected DTYPE_FLOAT32 or DTYPE_FLOAT64, got unknown value 99"},
    {"UnspecifiedDType", [](Request* r) { r->mutable_inputs()->set_dtype(v1::DTYPE_UNSPECIFIED); },
     kInvalid, "inputs.dtype"},
    {"MixedDTypes",
     [](Request* r) {
       SetTensor<double>(r->mutable_parameters(0)->mutable_weight(), std::vector<double>(8, 0.5),
                         {2, 4});
     },
     kInvalid, "parameters[0].weight.dtype: expected DTYPE_FLOAT32 (the dtype of inputs)"},
    {"UnknownReduction",
     [](Request* r) {
       r->mutable_model()->mutable_loss()->set_reduction(static_cast<v1::Reduction>(7));
     },
     kInvalid, "model.loss.reduction"},
    {"UnknownCheckpointMode",
     [](Request* r) {
       r->mutable_options()->mutable_checkpointing()->set_mode(
           static_cast<v1::Checkpointing::Mode>(9));
     },
     kInvalid, "options.checkpointing.mode: unknown value 9"},
    {"UnknownGeluApproximation",
     [](Request* r) {
       r->mutable_model()->mutable_layers(1)->mutable_gelu()->set_approximation(
           static_cast<v1::GELU::Approximation>(5));
     },
     kInvalid, "model.layers[1].gelu.approximation"},
    {"EveryKZero",
     [](Request* r) {
       r->mutable_options()->mutable_checkpointing()->set_mode(v1::Checkpointing::MODE_EVERY_K);
     },
     kInvalid, "options.checkpointing.every_k"},
    {"NegativeMemoryBudget",
     [](Request* r) {
       auto* c = r->mutable_options()->mutable_checkpointing();
       c->set_mode(v1::Checkpointing::MODE_MEMORY_BUDGET);
       c->set_memory_budget_bytes(-1);
     },
     kInvalid, "options.checkpointing.memory_budget_bytes"},
    {"NoModel", [](Request* r) { r->clear_model(); }, kInvalid, "model: required"},
    {"NoLayers", [](Request* r) { r->mutable_model()->clear_layers(); }, kInvalid,
     "model.layers: the model has no layers"},
    {"LayerWithoutKind", [](Request* r) { r->mutable_model()->mutable_layers(1)->clear_kind(); },
     kInvalid, "model.layers[1]: no layer kind set"},
    {"NoLoss", [](Request* r) { r->mutable_model()->clear_loss(); }, kInvalid,
     "model.loss: required"},
    {"TooManyLayers",
     [](Request* r) {
       for (int i = 0; i < 70; ++i) r->mutable_model()->add_layers()->mutable_identity();
     },
     kExhausted, "model.layers: 72 layers exceed max_layers (64)"},
    {"NoInputs", [](Request* r) { r->clear_inputs(); }, kInvalid, "inputs: required"},
    {"NoTargets", [](Request* r) { r->clear_targets(); }, kInvalid,
     "targets: required for the mse loss"},
    {"WrongTargetShape", [](Request* r) { r->mutable_targets()->set_shape(1, 3); }, kInvalid,
     "targets.shape: expected [8, 2], got [8, 3]"},
    {"ClassIndexOutOfRange",
     [](Request* r) {
       UseCrossEntropy(r, {0, 1, 1, 0, 0, 2, 1, 0});
     },
     kInvalid, "targets.data: class index 2 at [5] is out of range [0, 2)"},
    {"NegativeClassIndex",
     [](Request* r) {
       UseCrossEntropy(r, {0, 1, -1, 0, 0, 1, 1, 0});
     },
     kInvalid, "class index -1 at [2]"},
    {"FloatClassTargets",
     [](Request* r) { r->mutable_model()->mutable_loss()->mutable_cross_entropy(); }, kInvalid,
     "targets.dtype: expected DTYPE_INT64 or DTYPE_INT32"},
    {"ExternalLossWithoutOutputGradient",
     [](Request* r) {
       r->mutable_model()->mutable_loss()->mutable_external();
       r->clear_targets();
     },
     kInvalid, "output_gradient: required for the external loss"},
    {"ExternalLossWithTargets",
     [](Request* r) { r->mutable_model()->mutable_loss()->mutable_external(); }, kInvalid,
     "targets: must be unset for the external loss"},
    {"OutputGradientWithoutExternalLoss",
     [](Request* r) { *r->mutable_output_gradient() = r->targets(); }, kInvalid,
     "output_gradient: must be unset for the mse loss"},
    {"NanInInputs",
     [](Request* r) { SetFloat(r->mutable_inputs(), 13, std::numeric_limits<float>::quiet_NaN()); },
     kInvalid, "inputs.data: non-finite value nan at index [3, 1]"},
    {"InfInWeight",
     [](Request* r) {
       SetFloat(r->mutable_parameters(0)->mutable_weight(), 6,
                -std::numeric_limits<float>::infinity());
     },
     kInvalid, "parameters[0].weight.data: non-finite value inf at index [1, 2]"},
    {"NanInTargets",
     [](Request* r) { SetFloat(r->mutable_targets(), 0, std::numeric_limits<float>::quiet_NaN()); },
     kInvalid, "targets.data: non-finite value nan at index [0, 0]"},
    {"NonFiniteLeakySlope",
     [](Request* r) {
       r->mutable_model()->mutable_layers(1)->mutable_leaky_relu()->set_negative_slope(
           std::numeric_limits<double>::infinity());
     },
     kInvalid, "model.layers[1].leaky_relu.negative_slope"},
    {"NonPositiveHuberDelta",
     [](Request* r) { r->mutable_model()->mutable_loss()->mutable_huber()->set_delta(0); },
     kInvalid, "model.loss.huber.delta"},
    {"ActivationsOverLimit",
     [](Request* r) {
       // 8192 rows x 64 floats = 2 MiB of activations against a 1 MiB limit; the inputs
       // themselves are small (a 1-wide input).
       r->mutable_model()->mutable_layers(0)->mutable_linear()->set_in_features(1);
       r->mutable_model()->mutable_layers(0)->mutable_linear()->set_out_features(64);
       SetTensor<float>(r->mutable_inputs(), std::vector<float>(8192, 1.f), {8192, 1});
       SetTensor<float>(r->mutable_parameters(0)->mutable_weight(), std::vector<float>(64, 1.f),
                        {64, 1});
       SetTensor<float>(r->mutable_parameters(0)->mutable_bias(), std::vector<float>(64, 1.f),
                        {64});
     },
     kExhausted, "max_activation_bytes"},
};

INSTANTIATE_TEST_SUITE_P(Table, MalformedRequestTest, ::testing::ValuesIn(kBadRequests),
                         [](const auto& info) { return std::string(info.param.name); });

// Over TCP with a client that would send anything: the server's own receive limit refuses it.
TEST_F(ServiceTest, RequestOverMaxMessageBytesIsResourceExhausted) {
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(-1);
  auto channel = grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(server_->port()),
                                           grpc::InsecureChannelCredentials(), args);
  auto stub = v1::GradientService::NewStub(channel);
  Request request = SeedRequest<float>();
  SetTensor<float>(request.mutable_inputs(), std::vector<float>(1 << 19, 1.f), {1 << 17, 4});
  v1::ComputeGradientsResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  const grpc::Status status = stub->ComputeGradients(&context, request, &response);
  EXPECT_EQ(status.error_code(), kExhausted) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("larger than max"));
  grpc::ClientContext info_context;
  v1::GetServerInfoResponse info;
  EXPECT_TRUE(stub->GetServerInfo(&info_context, v1::GetServerInfoRequest(), &info).ok());
}

TEST_F(ServiceTest, NonFiniteInputIsComputedWhenAllowedAndCounted) {
  Request request = SeedRequest<float>();
  SetFloat(request.mutable_inputs(), 0, std::numeric_limits<float>::quiet_NaN());
  request.mutable_options()->set_allow_non_finite(true);
  v1::ComputeGradientsResponse response;
  ASSERT_TRUE(Compute(request, &response).ok());
  EXPECT_GT(response.diagnostics(0).non_finite_count(), 0);
}

// Issue 14: a Tanh reported ||dL/d(out)|| = 3.356 alone and 0.0 with a Linear after it, which
// reads as a vanished gradient; the backward pass had merely not reached it (nothing to train
// below the first Linear). A gradient norm not computed is now absent, never 0.
TEST_F(ServiceTest, DiagnosticsLeaveOutGradientNormsThatWereNotComputed) {
  std::mt19937 rng(14);
  const std::vector<double> x = testing::RandomValues<double>(32, rng);
  const std::vector<double> t = testing::RandomValues<double>(32, rng);

  // Tanh -> MSE: the loss gradient is always computed; ||2 (tanh(x) - t) / 32|| by hand.
  Request alone;
  alone.mutable_model()->add_layers()->mutable_tanh();
  alone.mutable_model()->mutable_loss()->mutable_mse();
  SetTensor<double>(alone.mutable_inputs(), x, {8, 4});
  SetTensor<double>(alone.mutable_targets(), t, {8, 4});
  v1::ComputeGradientsResponse response;
  ASSERT_TRUE(Compute(alone, &response).ok());
  double expected = 0;
  for (int i = 0; i < 32; ++i) expected += std::pow(2 * (std::tanh(x[i]) - t[i]) / 32, 2);
  ASSERT_EQ(response.diagnostics_size(), 1);
  ASSERT_TRUE(response.diagnostics(0).has_output_grad_norm());
  EXPECT_NEAR(response.diagnostics(0).output_grad_norm(), std::sqrt(expected), 1e-14);
  EXPECT_FALSE(response.diagnostics(0).has_weight_grad_norm());
  EXPECT_FALSE(response.diagnostics(0).has_bias_grad_norm());

  // Tanh -> Linear(4 -> 3) -> ReLU -> Linear(3 -> 2, no bias) -> MSE: the Tanh's output gradient
  // is dL/d(input of the first Linear), which only dx needs.
  Request chain;
  v1::Model* model = chain.mutable_model();
  model->add_layers()->mutable_tanh();
  v1::Linear* fc1 = model->add_layers()->mutable_linear();
  fc1->set_in_features(4);
  fc1->set_out_features(3);
  model->add_layers()->mutable_relu();
  v1::Linear* fc2 = model->add_layers()->mutable_linear();
  fc2->set_in_features(3);
  fc2->set_out_features(2);
  fc2->set_bias(false);
  model->mutable_loss()->mutable_mse();
  SetTensor<double>(chain.add_parameters()->mutable_weight(),
                    testing::RandomValues<double>(12, rng), {3, 4});
  SetTensor<double>(chain.mutable_parameters(0)->mutable_bias(),
                    testing::RandomValues<double>(3, rng), {3});
  SetTensor<double>(chain.add_parameters()->mutable_weight(), testing::RandomValues<double>(6, rng),
                    {2, 3});
  SetTensor<double>(chain.mutable_inputs(), x, {8, 4});
  SetTensor<double>(chain.mutable_targets(), std::vector<double>(t.begin(), t.begin() + 16),
                    {8, 2});
  for (bool dx : {false, true}) {
    SCOPED_TRACE(dx ? "with dx" : "without dx");
    chain.mutable_options()->set_return_input_gradient(dx);
    ASSERT_TRUE(Compute(chain, &response).ok());
    ASSERT_EQ(response.diagnostics_size(), 4);
    const v1::LayerDiagnostics& tanh = response.diagnostics(0);
    EXPECT_EQ(tanh.has_output_grad_norm(), dx);
    if (dx) {
      EXPECT_GT(tanh.output_grad_norm(), 0);
    }
    EXPECT_FALSE(tanh.has_weight_grad_norm());
    EXPECT_GT(tanh.activation_norm(), 0);
    for (int i = 1; i < 4; ++i) {
      const v1::LayerDiagnostics& d = response.diagnostics(i);
      EXPECT_TRUE(d.has_output_grad_norm()) << i;
      EXPECT_EQ(d.has_weight_grad_norm(), i != 2) << i;
      EXPECT_EQ(d.has_bias_grad_norm(), i == 1) << i;
    }
    EXPECT_GT(response.diagnostics(3).weight_grad_norm(), 0);
  }
}

TEST_F(ServiceTest, CheckGradientsNamesNestedFieldsAndSampleLimit) {
  v1::CheckGradientsRequest request;
  *request.mutable_request() = SeedRequest<float>();
  request.mutable_request()->mutable_inputs()->mutable_data()->resize(3);
  v1::CheckGradientsResponse response;
  {
    grpc::ClientContext context;
    const grpc::Status status = stub_->CheckGradients(&context, request, &response);
    EXPECT_EQ(status.error_code(), kInvalid);
    EXPECT_THAT(status.error_message(), HasSubstr("request.inputs.data"));
  }
  *request.mutable_request() = SeedRequest<float>();
  request.set_samples_per_tensor(-1);
  {
    grpc::ClientContext context;
    const grpc::Status status = stub_->CheckGradients(&context, request, &response);
    EXPECT_EQ(status.error_code(), kInvalid);
    EXPECT_THAT(status.error_message(), HasSubstr("samples_per_tensor"));
  }
}

}  // namespace
}  // namespace gradserve
