// ShardedClient against three in-process servers on loopback ports: a batch split in parts
// answers as one call on the whole batch (chain and graph models, MEAN and SUM, cross-entropy
// with ignored positions), whatever order the parts arrive in, around a replica that is down,
// and with the failing part named in the status.
#include "gradserve/sharded_client.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <thread>

#include "gradserve/v1/gradserve_mock.grpc.pb.h"
#include "server/service/server.h"
#include "tests/engine/graph_test_models.h"
#include "tests/service/graph_test_requests.h"
#include "tests/service/test_requests.h"

namespace gradserve::client {
namespace {

namespace eg = ::gradserve::engine::graph;
namespace gt = ::gradserve::testing;
using ::testing::_;
using ::testing::HasSubstr;
using ::testing::Invoke;
using ::testing::Return;

std::vector<double> Doubles(const v1::Tensor& tensor) {
  std::vector<double> values(tensor.data().size() / sizeof(double));
  std::memcpy(values.data(), tensor.data().data(), tensor.data().size());
  return values;
}

// Every element within `relative` of the reference, relative to the reference's largest
// magnitude (elements near 0 come out of sums that cancel).
void ExpectTensorNear(const v1::Tensor& actual, const v1::Tensor& expected, double relative,
                      const std::string& what) {
  ASSERT_EQ(actual.dtype(), expected.dtype()) << what;
  ASSERT_TRUE(std::equal(actual.shape().begin(), actual.shape().end(), expected.shape().begin(),
                         expected.shape().end()))
      << what;
  const std::vector<double> a = Doubles(actual), e = Doubles(expected);
  ASSERT_EQ(a.size(), e.size()) << what;
  double scale = 0;
  for (double v : e) scale = std::max(scale, std::abs(v));
  ASSERT_GT(scale, 0) << what;
  for (size_t j = 0; j < a.size(); ++j) {
    EXPECT_NEAR(a[j], e[j], relative * scale) << what << "[" << j << "]";
  }
}

void ExpectSameAnswer(const v1::ComputeGradientsResponse& actual,
                      const v1::ComputeGradientsResponse& expected, double relative = 1e-12) {
  EXPECT_NEAR(actual.loss(), expected.loss(), relative * std::abs(expected.loss()));
  EXPECT_EQ(actual.stats().num_examples(), expected.stats().num_examples());
  ASSERT_EQ(actual.gradients_size(), expected.gradients_size());
  for (int l = 0; l < expected.gradients_size(); ++l) {
    ExpectTensorNear(actual.gradients(l).weight(), expected.gradients(l).weight(), relative,
                     "gradients[" + std::to_string(l) + "].weight");
    EXPECT_EQ(actual.gradients(l).has_bias(), expected.gradients(l).has_bias());
    if (expected.gradients(l).has_bias()) {
      ExpectTensorNear(actual.gradients(l).bias(), expected.gradients(l).bias(), relative,
                       "gradients[" + std::to_string(l) + "].bias");
    }
  }
  ASSERT_EQ(actual.named_gradients_size(), expected.named_gradients_size());
  for (int g = 0; g < expected.named_gradients_size(); ++g) {
    EXPECT_EQ(actual.named_gradients(g).name(), expected.named_gradients(g).name());
    ExpectTensorNear(actual.named_gradients(g).tensor(), expected.named_gradients(g).tensor(),
                     relative, expected.named_gradients(g).name());
  }
}

// The bits of what ShardedClient combines.
std::string GradientBits(const v1::ComputeGradientsResponse& response) {
  const double loss = response.loss();
  std::string bits(reinterpret_cast<const char*>(&loss), sizeof(double));
  for (const auto& g : response.gradients()) bits += g.SerializeAsString();
  for (const auto& g : response.named_gradients()) bits += g.SerializeAsString();
  return bits;
}

// An MLP 5 -> 8 tanh -> 3 in float64 on a batch of 10 rows.
v1::ComputeGradientsRequest ChainRequest(v1::Reduction reduction, bool cross_entropy = false) {
  std::mt19937 rng(7);
  v1::ComputeGradientsRequest request;
  ModelBuilder model;
  model.Linear(5, 8).Tanh().Linear(8, 3);
  if (cross_entropy) {
    model.CrossEntropy(reduction);
  } else {
    model.Mse(reduction);
  }
  *request.mutable_model() = model.Build();
  for (const auto& [in, out] : {std::pair{5, 8}, std::pair{8, 3}}) {
    v1::LinearParameters* params = request.add_parameters();
    gt::SetTensor<double>(params->mutable_weight(), gt::RandomValues<double>(in * out, rng),
                          {out, in});
    gt::SetTensor<double>(params->mutable_bias(), gt::RandomValues<double>(out, rng), {out});
  }
  gt::SetTensor<double>(request.mutable_inputs(), gt::RandomValues<double>(50, rng), {10, 5});
  if (cross_entropy) {
    std::vector<int64_t> classes(10);
    for (int64_t& c : classes) c = std::uniform_int_distribution<int64_t>(0, 2)(rng);
    gt::SetTensor<int64_t>(request.mutable_targets(), classes, {10});
  } else {
    gt::SetTensor<double>(request.mutable_targets(), gt::RandomValues<double>(30, rng), {10, 3});
  }
  return request;
}

class ShardedClientTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    spdlog::set_level(spdlog::level::warn);
    for (int i = 0; i < 3; ++i) {
      service::ServerOptions options;
      options.listen_address = "127.0.0.1:0";
      options.service.threads = 1;
      auto server = service::GradServer::Start(options);
      ASSERT_TRUE(server.ok()) << server.status();
      servers_.push_back(server->release());
    }
  }
  static void TearDownTestSuite() {
    for (service::GradServer* server : servers_) delete server;
    servers_.clear();
  }

  static std::shared_ptr<grpc::Channel> ChannelTo(int port) {
    return CreateChannel("127.0.0.1:" + std::to_string(port));
  }
  static std::vector<std::shared_ptr<grpc::Channel>> Replicas() {
    std::vector<std::shared_ptr<grpc::Channel>> channels;
    for (service::GradServer* server : servers_) channels.push_back(ChannelTo(server->port()));
    return channels;
  }
  // One server's answer to the whole batch.
  static v1::ComputeGradientsResponse Reference(const v1::ComputeGradientsRequest& request) {
    GradientClient client(ChannelTo(servers_[0]->port()));
    v1::ComputeGradientsResponse response;
    const grpc::Status status = client.ComputeGradients(request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }
  static v1::ComputeGradientsResponse Sharded(ShardedClient& client,
                                              const v1::ComputeGradientsRequest& request,
                                              int shards) {
    v1::ComputeGradientsResponse response;
    const grpc::Status status = client.ComputeGradients(request, shards, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }

  static std::vector<service::GradServer*> servers_;
};

std::vector<service::GradServer*> ShardedClientTest::servers_;

TEST_F(ShardedClientTest, ChainBatchInThreePartsMatchesOneCall) {
  ShardedClient client(Replicas());
  for (const v1::Reduction reduction : {v1::REDUCTION_MEAN, v1::REDUCTION_SUM}) {
    for (const bool cross_entropy : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "reduction " << reduction << " ce " << cross_entropy);
      const v1::ComputeGradientsRequest request = ChainRequest(reduction, cross_entropy);
      const v1::ComputeGradientsResponse sharded = Sharded(client, request, 3);
      ExpectSameAnswer(sharded, Reference(request));
      EXPECT_EQ(sharded.stats().num_examples(), 10);
    }
  }
}

TEST_F(ShardedClientTest, OneChannelWithAShardCountSplitsToo) {
  ShardedClient client(ChannelTo(servers_[1]->port()), 4);
  const v1::ComputeGradientsRequest request = ChainRequest(v1::REDUCTION_MEAN);
  v1::ComputeGradientsResponse response;
  ASSERT_TRUE(client.ComputeGradients(request, &response).ok());
  ExpectSameAnswer(response, Reference(request));
}

TEST_F(ShardedClientTest, GraphBatchInThreePartsMatchesOneCall) {
  ShardedClient client(Replicas());
  const eg::GraphSpec spec = eg::testing::ResidualMlpSpec(4, 8, 3, /*blocks=*/2);
  for (const v1::Reduction reduction : {v1::REDUCTION_MEAN, v1::REDUCTION_SUM}) {
    SCOPED_TRACE(::testing::Message() << "reduction " << reduction);
    v1::ComputeGradientsRequest request = gt::GraphRequest<double>(spec, {{10, 4}, {10, 3}}, 3);
    request.mutable_model()->mutable_loss()->set_reduction(reduction);
    const v1::ComputeGradientsResponse sharded = Sharded(client, request, 3);
    ASSERT_GT(sharded.named_gradients_size(), 0);
    ExpectSameAnswer(sharded, Reference(request));
  }
}

// MEAN cross-entropy divides by the positions not ignored: parts weigh by those, and a part
// whose every position is ignored (NaN loss on its own) adds nothing.
TEST_F(ShardedClientTest, GraphCrossEntropyWeighsPartsByPositionsNotIgnored) {
  ShardedClient client(Replicas());
  eg::testing::GptConfig config;
  config.batch = 5;
  config.ignore_index = -1;
  const eg::GraphSpec spec = eg::testing::GptSpec(config);
  v1::ComputeGradientsRequest request = gt::GraphRequest<double>(
      spec, {{config.batch, config.seq}, {config.batch, config.seq}}, 5, config.vocab);
  // Parts of 2, 2 and 1 rows: ignore one position of the first and all of the last.
  for (v1::NamedTensor& input : *request.mutable_graph_inputs()) {
    if (input.name() != "targets") continue;
    std::vector<int64_t> targets(config.batch * config.seq);
    std::memcpy(targets.data(), input.tensor().data().data(), input.tensor().data().size());
    targets[1] = -1;
    for (int64_t t = 0; t < config.seq; ++t) targets[4 * config.seq + t] = -1;
    gt::SetTensor<int64_t>(input.mutable_tensor(), targets, {config.batch, config.seq});
  }
  const v1::ComputeGradientsResponse sharded = Sharded(client, request, 3);
  ASSERT_TRUE(std::isfinite(sharded.loss()));
  ExpectSameAnswer(sharded, Reference(request));
}

TEST_F(ShardedClientTest, OneShardIsBitIdenticalToAPlainCall) {
  ShardedClient client(Replicas());
  const v1::ComputeGradientsRequest request = ChainRequest(v1::REDUCTION_MEAN);
  EXPECT_EQ(GradientBits(Sharded(client, request, 1)), GradientBits(Reference(request)));
}

// Replicas answering after different delays: the parts arrive in opposite orders, the result
// is the same bits.
TEST_F(ShardedClientTest, ResultDoesNotDependOnArrivalOrder) {
  const auto delayed_replicas = [](std::vector<int> delays_ms) {
    std::vector<std::unique_ptr<v1::GradientService::StubInterface>> stubs;
    for (size_t i = 0; i < servers_.size(); ++i) {
      auto stub = std::make_unique<v1::MockGradientServiceStub>();
      std::shared_ptr<v1::GradientService::Stub> real =
          v1::GradientService::NewStub(ChannelTo(servers_[i]->port()));
      const int delay = delays_ms[i];
      EXPECT_CALL(*stub, ComputeGradients(_, _, _))
          .WillRepeatedly(Invoke([real, delay](grpc::ClientContext* context,
                                               const v1::ComputeGradientsRequest& request,
                                               v1::ComputeGradientsResponse* response) {
            std::this_thread::sleep_for(std::chrono::milliseconds(delay));
            return real->ComputeGradients(context, request, response);
          }));
      stubs.push_back(std::move(stub));
    }
    return stubs;
  };
  ShardedClient first_arrives_last(delayed_replicas({300, 150, 0}));
  ShardedClient first_arrives_first(delayed_replicas({0, 150, 300}));
  const eg::GraphSpec spec = eg::testing::ResidualMlpSpec(4, 8, 3, /*blocks=*/1);
  const v1::ComputeGradientsRequest request =
      gt::GraphRequest<double>(spec, {{10, 4}, {10, 3}}, 11);
  const std::string bits = GradientBits(Sharded(first_arrives_last, request, 3));
  EXPECT_EQ(GradientBits(Sharded(first_arrives_first, request, 3)), bits);
  EXPECT_EQ(GradientBits(Sharded(first_arrives_last, request, 3)), bits);
}

TEST_F(ShardedClientTest, PartForAReplicaThatIsDownIsRetriedOnTheNext) {
  int closed_port = 0;
  {
    service::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    auto server = service::GradServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    closed_port = (*server)->port();
  }
  std::vector<std::shared_ptr<grpc::Channel>> channels = Replicas();
  channels[0] = ChannelTo(closed_port);
  ShardedClient client(channels);
  const v1::ComputeGradientsRequest request = ChainRequest(v1::REDUCTION_MEAN);
  ExpectSameAnswer(Sharded(client, request, 3), Reference(request));
}

// Replicas that answer UNAVAILABLE, CANCELLED (one shutting down as the call reaches it) or
// DEADLINE_EXCEEDED (an attempt deadline shorter than the call's): the part moves to the next
// one, and each part's answer is counted once.
TEST(ShardedClientRetry, MovesToTheNextReplicaAndCountsEachPartOnce) {
  for (const grpc::StatusCode code : {grpc::StatusCode::UNAVAILABLE, grpc::StatusCode::CANCELLED,
                                      grpc::StatusCode::DEADLINE_EXCEEDED}) {
    SCOPED_TRACE(::testing::Message() << "code " << code);
    auto failing = std::make_unique<v1::MockGradientServiceStub>();
    auto serving = std::make_unique<v1::MockGradientServiceStub>();
    EXPECT_CALL(*failing, ComputeGradients(_, _, _)).WillOnce(Return(grpc::Status(code, "no")));
    EXPECT_CALL(*serving, ComputeGradients(_, _, _))
        .Times(2)
        .WillRepeatedly(Invoke([](grpc::ClientContext*, const v1::ComputeGradientsRequest& request,
                                  v1::ComputeGradientsResponse* response) {
          // A loss of the part's size: the combined MEAN loss tells which parts were counted.
          response->set_loss(static_cast<double>(request.inputs().shape(0)));
          response->mutable_stats()->set_num_examples(request.inputs().shape(0));
          return grpc::Status::OK;
        }));
    std::vector<std::unique_ptr<v1::GradientService::StubInterface>> stubs;
    stubs.push_back(std::move(failing));
    stubs.push_back(std::move(serving));
    ShardedClientOptions options;
    options.attempt_timeout = std::chrono::milliseconds(100);
    options.initial_backoff = std::chrono::milliseconds(1);
    ShardedClient client(std::move(stubs), options);
    v1::ComputeGradientsResponse response;
    ASSERT_TRUE(client.ComputeGradients(ChainRequest(v1::REDUCTION_MEAN), 2, &response).ok());
    EXPECT_EQ(response.stats().num_examples(), 10);
    EXPECT_DOUBLE_EQ(response.loss(), 5.0);  // (5 * 5 + 5 * 5) / 10.
  }
}

TEST(ShardedClientRetry, GivesUpAfterMaxAttemptsNamingThePart) {
  auto down = std::make_unique<v1::MockGradientServiceStub>();
  EXPECT_CALL(*down, ComputeGradients(_, _, _))
      .Times(3)
      .WillRepeatedly(Return(grpc::Status(grpc::StatusCode::UNAVAILABLE, "connection refused")));
  std::vector<std::unique_ptr<v1::GradientService::StubInterface>> stubs;
  stubs.push_back(std::move(down));
  ShardedClientOptions options;
  options.max_attempts = 3;
  options.initial_backoff = std::chrono::milliseconds(1);
  ShardedClient client(std::move(stubs), options);
  v1::ComputeGradientsResponse response;
  const grpc::Status status = client.ComputeGradients(ChainRequest(v1::REDUCTION_MEAN), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(status.error_message(), HasSubstr("shard 0 of 1 (rows 0..9): connection refused"));
}

TEST_F(ShardedClientTest, InvalidPartFailsTheCallNamingIt) {
  ShardedClient client(Replicas());
  v1::ComputeGradientsRequest request = ChainRequest(v1::REDUCTION_MEAN, /*cross_entropy=*/true);
  std::vector<int64_t> classes(10, 0);
  classes[5] = 99;  // Rows 4..6 are part 1 of 3.
  gt::SetTensor<int64_t>(request.mutable_targets(), classes, {10});
  v1::ComputeGradientsResponse response;
  const grpc::Status status = client.ComputeGradients(request, 3, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("shard 1 of 3 (rows 4..6)"));
}

TEST_F(ShardedClientTest, RefusesABatchItCannotSplit) {
  ShardedClient client(Replicas());
  v1::ComputeGradientsRequest request = ChainRequest(v1::REDUCTION_MEAN);
  std::mt19937 rng(1);
  gt::SetTensor<double>(request.mutable_targets(), gt::RandomValues<double>(27, rng), {9, 3});
  v1::ComputeGradientsResponse response;
  grpc::Status status = client.ComputeGradients(request, 3, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("targets: leading size 9"));

  request = ChainRequest(v1::REDUCTION_MEAN);
  request.mutable_options()->set_return_output(true);
  EXPECT_EQ(client.ComputeGradients(request, 3, &response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(client.ComputeGradients(ChainRequest(v1::REDUCTION_MEAN), 0, &response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

}  // namespace
}  // namespace gradserve::client
