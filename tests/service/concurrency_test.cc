// Many clients at once on a real server: every answer bit-identical to the serial one and none
// lost, for mixed small (one core) and large (all cores) calls.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <thread>

#include "gradserve/v1/gradserve.grpc.pb.h"
#include "server/service/compute.h"
#include "server/service/server.h"
#include "tests/service/test_requests.h"

namespace gradserve {
namespace {

namespace v1 = ::gradserve::v1;

// batch 64 through 256 -> 256 -> 256 -> 10: ~5e7 flops, over the scheduler's threshold.
v1::ComputeGradientsRequest LargeRequest() {
  std::mt19937 rng(17);
  v1::ComputeGradientsRequest request;
  const int64_t widths[] = {256, 256, 256, 10};
  for (int l = 0; l + 1 < 4; ++l) {
    v1::Linear* linear = request.mutable_model()->add_layers()->mutable_linear();
    linear->set_in_features(widths[l]);
    linear->set_out_features(widths[l + 1]);
    if (l + 2 < 4) request.mutable_model()->add_layers()->mutable_tanh();
    v1::LinearParameters* p = request.add_parameters();
    testing::SetTensor<float>(p->mutable_weight(),
                              testing::RandomValues<float>(widths[l] * widths[l + 1], rng),
                              {widths[l + 1], widths[l]});
    testing::SetTensor<float>(p->mutable_bias(), testing::RandomValues<float>(widths[l + 1], rng),
                              {widths[l + 1]});
  }
  request.mutable_model()->mutable_loss()->mutable_mse();
  testing::SetTensor<float>(request.mutable_inputs(), testing::RandomValues<float>(64 * 256, rng),
                            {64, 256});
  testing::SetTensor<float>(request.mutable_targets(), testing::RandomValues<float>(64 * 10, rng),
                            {64, 10});
  return request;
}

std::string Fingerprint(const v1::ComputeGradientsResponse& response) {
  const double loss = response.loss();
  std::string bytes(reinterpret_cast<const char*>(&loss), sizeof(loss));
  for (const auto& g : response.gradients()) bytes += g.weight().data() + g.bias().data();
  return bytes;
}

class ConcurrencyTest : public ::testing::TestWithParam<int> {
 protected:
  static void SetUpTestSuite() {
    spdlog::set_level(spdlog::level::warn);
    service::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.service.threads = 2;
    options.service.max_queue = 1000;
    auto server = service::GradServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() { delete server_; }
  static service::GradServer* server_;
};

service::GradServer* ConcurrencyTest::server_ = nullptr;

TEST_P(ConcurrencyTest, EveryAnswerIsBitIdenticalToTheSerialOne) {
  const int clients = GetParam();
  const v1::ComputeGradientsRequest requests[] = {testing::SeedRequest<float>(3), LargeRequest()};
  ASSERT_GE(service::ComputeGradientsCost(requests[1]), 2e7);
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::GradientService::NewStub(channel);
  std::string serial[2];
  int serial_threads[2];
  for (int r = 0; r < 2; ++r) {
    v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    ASSERT_TRUE(stub->ComputeGradients(&context, requests[r], &response).ok());
    serial[r] = Fingerprint(response);
    serial_threads[r] = response.stats().threads();
  }
  EXPECT_EQ(serial_threads[0], 1);  // Small: one core.
  EXPECT_EQ(serial_threads[1], 2);  // Large: every core.

  constexpr int kCallsPerClient = 6;
  std::atomic<int> ok{0}, different{0}, failed{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      for (int i = 0; i < kCallsPerClient; ++i) {
        const int r = (c + i) % 2;
        v1::ComputeGradientsResponse response;
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
        if (!stub->ComputeGradients(&context, requests[r], &response).ok()) {
          ++failed;
        } else if (Fingerprint(response) != serial[r]) {
          ++different;
        } else {
          ++ok;
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failed, 0);
  EXPECT_EQ(different, 0);
  EXPECT_EQ(ok, clients * kCallsPerClient);
}

INSTANTIATE_TEST_SUITE_P(Clients, ConcurrencyTest, ::testing::Values(1, 8, 32));

}  // namespace
}  // namespace gradserve
