// Deadlines, cancellation and shutdown with calls in flight.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <malloc.h>
#include <spdlog/spdlog.h>

#include <functional>
#include <future>
#include <thread>

#include "gradserve/client.h"
#include "gradserve/v1/gradserve.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "server/service/server.h"
#include "tests/service/headers_only_call.h"
#include "tests/service/test_requests.h"

namespace gradserve {
namespace {

namespace v1 = ::gradserve::v1;

// batch 512 through four 1024-wide tanh layers: ~1.3e10 flops, tens of milliseconds per
// layer here, and ~10 MiB of cached activations.
v1::ComputeGradientsRequest SlowRequest() {
  std::mt19937 rng(23);
  constexpr int64_t kWidth = 1024, kBatch = 512, kLayers = 4;
  v1::ComputeGradientsRequest request;
  for (int l = 0; l < kLayers; ++l) {
    v1::Linear* linear = request.mutable_model()->add_layers()->mutable_linear();
    linear->set_in_features(kWidth);
    linear->set_out_features(kWidth);
    request.mutable_model()->add_layers()->mutable_tanh();
    v1::LinearParameters* p = request.add_parameters();
    std::vector<float> weight = testing::RandomValues<float>(kWidth * kWidth, rng);
    for (float& w : weight) w *= 0.03f;
    testing::SetTensor<float>(p->mutable_weight(), weight, {kWidth, kWidth});
    testing::SetTensor<float>(p->mutable_bias(), testing::RandomValues<float>(kWidth, rng),
                              {kWidth});
  }
  request.mutable_model()->mutable_loss()->mutable_mse();
  testing::SetTensor<float>(request.mutable_inputs(),
                            testing::RandomValues<float>(kBatch * kWidth, rng), {kBatch, kWidth});
  testing::SetTensor<float>(request.mutable_targets(),
                            testing::RandomValues<float>(kBatch * kWidth, rng), {kBatch, kWidth});
  return request;
}

// A server on a free loopback port with two compute threads, and whatever `adjust` changes.
std::unique_ptr<service::GradServer> StartServerWith(
    const std::function<void(service::ServerOptions*)>& adjust) {
  spdlog::set_level(spdlog::level::warn);
  service::ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.service.threads = 2;
  adjust(&options);
  auto server = service::GradServer::Start(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? std::move(*server) : nullptr;
}

std::unique_ptr<service::GradServer> StartServer(
    int threads = 2, int max_queue = service::ServiceOptions().max_queue,
    double max_call_flops = service::ServiceLimits().max_call_flops) {
  return StartServerWith([&](service::ServerOptions* options) {
    options->service.threads = threads;
    options->service.max_queue = max_queue;
    options->service.limits.max_call_flops = max_call_flops;
  });
}

std::unique_ptr<v1::GradientService::Stub> Connect(const service::GradServer& server) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  return v1::GradientService::NewStub(grpc::CreateCustomChannel(
      "127.0.0.1:" + std::to_string(server.port()), grpc::InsecureChannelCredentials(), args));
}

// Client and server share this process, and gRPC frees finished calls' messages
// asynchronously: the least heap in use over a second is the level the process settles to.
size_t SettledHeapInUse() {
  size_t least = SIZE_MAX;
  for (int i = 0; i < 50; ++i) {
    malloc_trim(0);
    least = std::min(least, mallinfo2().uordblks);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return least;
}

TEST(Lifecycle, DeadlineShorterThanComputeEndsDeadlineExceededAndFreesMemory) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto stub = Connect(*server);
  const v1::ComputeGradientsRequest request = SlowRequest();
  auto abandon = [&](int calls) {
    for (int i = 0; i < calls; ++i) {
      v1::ComputeGradientsResponse response;
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(30));
      const grpc::Status status = stub->ComputeGradients(&context, request, &response);
      EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
    }
    // Let the server notice and unwind the abandoned calls.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (server->calls_in_flight() > 0 && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  };
  abandon(5);  // Warm up: the channel, OpenMP's threads, gRPC's buffer pools.
  const size_t before = SettledHeapInUse();
  constexpr int kAbandoned = 20;
  abandon(kAbandoned);
  const size_t after = SettledHeapInUse();
  // Each call holds ~10 MiB of cache, as much workspace and its 20 MiB request, so leaking any
  // of it over twenty calls would leave 200 MiB or more. gRPC keeps some buffers for reuse: up
  // to ~28 MiB seen here, and the same after 40 calls as after 10 (bounded, not a leak).
  EXPECT_LT(after, before + (size_t{64} << 20))
      << "heap in use grew from " << before << " to " << after << " bytes";
}

// A client that cancels a call while it computes gets CANCELLED, and the server abandons the
// computation (it records the call as CANCELLED, not as a finished OK) and frees its slot.
TEST(Lifecycle, ClientCancelStopsTheComputation) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto stub = Connect(*server);
  const v1::ComputeGradientsRequest request = SlowRequest();
  grpc::ClientContext context;
  v1::ComputeGradientsResponse response;
  std::promise<grpc::Status> done;
  stub->async()->ComputeGradients(&context, &request, &response,
                                  [&done](grpc::Status status) { done.set_value(status); });
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (server->calls_in_flight() == 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(server->calls_in_flight(), 1);
  context.TryCancel();  // Within a millisecond or so of the start of a ~100 ms computation.
  EXPECT_EQ(done.get_future().get().error_code(), grpc::StatusCode::CANCELLED);
  const auto server_side = [&](grpc::StatusCode code) {
    return server->Stats().methods[0].calls_by_code[static_cast<int>(code)];
  };
  while (server_side(grpc::StatusCode::CANCELLED) + server_side(grpc::StatusCode::OK) == 0 &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(server->Stats().methods[0].method, "ComputeGradients");
  EXPECT_EQ(server_side(grpc::StatusCode::CANCELLED), 1u);
  EXPECT_EQ(server_side(grpc::StatusCode::OK), 0u);
  EXPECT_EQ(server->calls_in_flight(), 0);
}

// A gradient check polls its deadline between perturbed forward passes: this one would take
// hours (4096 samples of each tensor, two float64 forward passes of the slow request each).
TEST(Lifecycle, GradientCheckPastItsDeadlineIsAbandoned) {
  auto server = StartServer(2, service::ServiceOptions().max_queue, /*max_call_flops=*/1e18);
  ASSERT_NE(server, nullptr);
  auto stub = Connect(*server);
  v1::CheckGradientsRequest request;
  *request.mutable_request() = SlowRequest();
  request.set_samples_per_tensor(4096);
  v1::CheckGradientsResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  EXPECT_EQ(stub->CheckGradients(&context, request, &response).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (server->calls_in_flight() > 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(server->calls_in_flight(), 0) << "the check kept computing past its deadline";
}

TEST(Lifecycle, ShutdownLetsCallsInFlightFinishAndRefusesNewOnes) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto stub = Connect(*server);
  const v1::ComputeGradientsRequest request = SlowRequest();
  std::vector<std::future<grpc::Status>> in_flight;
  for (int i = 0; i < 3; ++i) {
    in_flight.push_back(std::async(std::launch::async, [&] {
      v1::ComputeGradientsResponse response;
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(300));
      grpc::Status status = stub->ComputeGradients(&context, request, &response);
      if (status.ok() && response.gradients_size() != 4) {
        return grpc::Status(grpc::StatusCode::INTERNAL, "incomplete response");
      }
      return status;
    }));
  }
  // Shutdown cancels calls whose request has not arrived in full; these have.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (server->calls_in_flight() < 3 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(server->calls_in_flight(), 3);
  // The grace only bounds the wait (Shutdown returns when the calls finish): generous, because
  // under a sanitizer on a busy 2-core machine three slow calls have taken over 30 s.
  std::thread shutdown([&] { server->Shutdown(std::chrono::seconds(300)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  {
    v1::GetServerInfoResponse info;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    const grpc::Status refused = stub->GetServerInfo(&context, v1::GetServerInfoRequest(), &info);
    // UNAVAILABLE, which clients' retry policy sends to another replica; not CANCELLED.
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE)
        << "a new call during shutdown: " << refused.error_message();
  }
  for (auto& call : in_flight) {
    const grpc::Status status = call.get();
    EXPECT_TRUE(status.ok()) << status.error_code() << " " << status.error_message();
  }
  shutdown.join();
}

// One core, room for one waiting call: of eight slow calls sent at once, the ones that find the
// queue full are refused at once with RESOURCE_EXHAUSTED, the others are answered, and the
// server answers normally afterwards.
TEST(Lifecycle, QueueOverflowIsRefusedAtOnceAndTheServerRecovers) {
  auto server = StartServer(/*threads=*/1, /*max_queue=*/1);
  ASSERT_NE(server, nullptr);
  auto stub = Connect(*server);
  const v1::ComputeGradientsRequest request = SlowRequest();
  std::vector<std::future<grpc::Status>> calls;
  for (int i = 0; i < 8; ++i) {
    calls.push_back(std::async(std::launch::async, [&] {
      v1::ComputeGradientsResponse response;
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
      return stub->ComputeGradients(&context, request, &response);
    }));
  }
  int ok = 0, refused = 0;
  for (auto& call : calls) {
    const grpc::Status status = call.get();
    if (status.ok()) {
      ++ok;
    } else {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
          << status.error_message();
      EXPECT_THAT(status.error_message(), ::testing::HasSubstr("max_queue"));
      ++refused;
    }
  }
  EXPECT_GE(ok, 1);
  EXPECT_GE(refused, 1);
  v1::ComputeGradientsResponse response;
  grpc::ClientContext context;
  EXPECT_TRUE(stub->ComputeGradients(&context, testing::SeedRequest<float>(), &response).ok());
}

// Note [Places held while a message arrives]: a client's calls hold their places in its share of
// the queue from their headers on, so calls over the share are refused before their messages
// are read (old code: read, parsed, then refused), and the places come back when calls end.
TEST(Lifecycle, CallsOverTheClientsShareAreRefusedAtTheirHeaders) {
  auto server = StartServerWith(
      [](service::ServerOptions* options) { options->service.max_queue_per_client = 2; });
  ASSERT_NE(server, nullptr);
  const std::string address = "127.0.0.1:" + std::to_string(server->port());
  const auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  constexpr char kMethod[] = "/gradserve.v1.GradientService/ComputeGradients";
  auto first = std::make_unique<testing::HeadersOnlyCall>(channel, kMethod);
  auto second = std::make_unique<testing::HeadersOnlyCall>(channel, kMethod);
  // Both wait for their messages, holding the client's two places.
  EXPECT_FALSE(first->EndsWithin(std::chrono::milliseconds(300)));
  EXPECT_FALSE(second->EndsWithin(std::chrono::milliseconds(1)));
  testing::HeadersOnlyCall third(channel, kMethod);
  ASSERT_TRUE(third.EndsWithin(std::chrono::seconds(10)))
      << "the third call waited for its message";
  EXPECT_EQ(third.status().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(third.status().error_message(), ::testing::HasSubstr("max_queue_per_client"));
  auto stub = Connect(*server);
  {
    v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    const grpc::Status status =
        stub->ComputeGradients(&context, testing::SeedRequest<float>(), &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  }
  // A call that ends gives its place back, once the server has seen it end.
  first.reset();
  grpc::Status status;
  for (int attempt = 0; attempt < 1000; ++attempt) {
    v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    status = stub->ComputeGradients(&context, testing::SeedRequest<float>(), &response);
    if (status.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(status.ok()) << status.error_message();
}

// Note [Shutdown]: a call whose message is still on the way when the shutdown begins would be
// refused once it arrived; it is refused at once with UNAVAILABLE (which clients retry), instead
// of being cancelled by gRPC at the end of the grace (CANCELLED: not retried, the work lost).
TEST(Lifecycle, CallStillArrivingWhenShutdownBeginsGetsUnavailable) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  const auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server->port()),
                                           grpc::InsecureChannelCredentials());
  testing::HeadersOnlyCall arriving(channel, "/gradserve.v1.GradientService/ComputeGradients");
  EXPECT_FALSE(arriving.EndsWithin(std::chrono::milliseconds(300)));
  std::thread shutdown([&] { server->Shutdown(std::chrono::seconds(30)); });
  const bool ended = arriving.EndsWithin(std::chrono::seconds(10));
  EXPECT_TRUE(ended) << "the arriving call was left to the end of the grace";
  if (ended) {
    EXPECT_EQ(arriving.status().error_code(), grpc::StatusCode::UNAVAILABLE)
        << arriving.status().error_message();
  }
  shutdown.join();
}

// A call served at its headers still answers a call that never sends its message, or sends
// bytes that are no request, with INVALID_ARGUMENT (gRPC's own handlers would have said
// INTERNAL or waited).
TEST(Lifecycle, CallWithoutAValidMessageIsInvalid) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  grpc::GenericStub stub(server->InProcessChannel());
  const std::string bad_bytes("\xff\xff\xff", 3);
  for (const std::string& method : {std::string("/gradserve.v1.GradientService/ComputeGradients"),
                                    std::string("/gradserve.v1.GradientService/CheckGradients")}) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    grpc::Slice slice(bad_bytes);
    const grpc::ByteBuffer request(&slice, 1);
    grpc::ByteBuffer response;
    std::promise<grpc::Status> done;
    stub.UnaryCall(&context, method, grpc::StubOptions(), &request, &response,
                   [&done](grpc::Status status) { done.set_value(std::move(status)); });
    const grpc::Status status = done.get_future().get();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << method;
    EXPECT_THAT(status.error_message(), ::testing::HasSubstr("not a valid gradserve.v1."));
  }
  // Headers, then a half-close without a message.
  class NoMessage final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
   public:
    explicit NoMessage(grpc::GenericStub* stub) {
      context_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
      stub->PrepareBidiStreamingCall(&context_, "/gradserve.v1.GradientService/ComputeGradients",
                                     grpc::StubOptions(), this);
      StartWritesDone();
      StartCall();
    }
    void OnDone(const grpc::Status& status) override { done.set_value(status); }
    std::promise<grpc::Status> done;

   private:
    grpc::ClientContext context_;
  };
  NoMessage call(&stub);
  const grpc::Status status = call.done.get_future().get();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), ::testing::HasSubstr("no request message"));
}

TEST(Lifecycle, DrainingReportsNotServingWhileStillAnswering) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server->port()),
                                     grpc::InsecureChannelCredentials());
  auto health = ::grpc::health::v1::Health::NewStub(channel);
  auto check = [&](const char* name) {
    ::grpc::health::v1::HealthCheckRequest request;
    request.set_service(name);
    ::grpc::health::v1::HealthCheckResponse response;
    grpc::ClientContext context;
    EXPECT_TRUE(health->Check(&context, request, &response).ok());
    return response.status();
  };
  EXPECT_EQ(check(""), ::grpc::health::v1::HealthCheckResponse::SERVING);
  server->StartDraining();
  EXPECT_EQ(check(""), ::grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(check("gradserve.v1.GradientService"),
            ::grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  auto stub = v1::GradientService::NewStub(channel);
  v1::ComputeGradientsResponse response;
  grpc::ClientContext context;
  EXPECT_TRUE(stub->ComputeGradients(&context, testing::SeedRequest<float>(), &response).ok());
}

// The hardening issue's planner attack: 1024 Linear layers of widths up to 2^20, an empty
// parameters entry per layer and a memory budget of one byte. The missing parameters are found
// before the (costly) checkpoint planner runs: INVALID_ARGUMENT in milliseconds, where it took
// 4-10 s of planning before. The deadline is ~1000x what the call needs.
v1::ComputeGradientsRequest PlannerAttack() {
  v1::ComputeGradientsRequest request;
  int64_t in = 1;
  for (int i = 0; i < 1024; ++i) {
    v1::Linear* linear = request.mutable_model()->add_layers()->mutable_linear();
    const int64_t out = int64_t{1} << (20 - i % 21);
    linear->set_in_features(in);
    linear->set_out_features(out);
    in = out;
    request.add_parameters();
  }
  request.mutable_model()->mutable_loss()->mutable_mse();
  testing::SetTensor<float>(request.mutable_inputs(), {1.0f}, {1, 1});
  auto* checkpointing = request.mutable_options()->mutable_checkpointing();
  checkpointing->set_mode(v1::Checkpointing::MODE_MEMORY_BUDGET);
  checkpointing->set_memory_budget_bytes(1);
  return request;
}

TEST(Lifecycle, MalformedRequestIsRefusedBeforeCheckpointPlanning) {
  auto server = StartServer(2, service::ServiceOptions().max_queue, /*max_call_flops=*/1e30);
  ASSERT_NE(server, nullptr);
  auto stub = Connect(*server);
  v1::ComputeGradientsResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(3));
  const grpc::Status status = stub->ComputeGradients(&context, PlannerAttack(), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_THAT(status.error_message(), ::testing::HasSubstr("parameters[0].weight"));
}

// At the default max_call_flops the same request is refused before it is even queued.
TEST(Lifecycle, CallOverMaxCallFlopsIsRefusedBeforeQueuing) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto stub = Connect(*server);
  for (const bool check : {false, true}) {
    grpc::ClientContext context;
    grpc::Status status;
    if (check) {
      // 4096 samples of each tensor of the slow request: hours of compute.
      v1::CheckGradientsRequest request;
      *request.mutable_request() = SlowRequest();
      request.set_samples_per_tensor(4096);
      v1::CheckGradientsResponse response;
      status = stub->CheckGradients(&context, request, &response);
    } else {
      v1::ComputeGradientsResponse response;
      status = stub->ComputeGradients(&context, PlannerAttack(), &response);
    }
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
    EXPECT_THAT(status.error_message(), ::testing::HasSubstr("max_call_flops"));
  }
  EXPECT_EQ(server->Stats().methods[0].calls_by_code[grpc::StatusCode::RESOURCE_EXHAUSTED], 1u);
  v1::ComputeGradientsResponse response;
  grpc::ClientContext context;
  EXPECT_TRUE(stub->ComputeGradients(&context, testing::SeedRequest<float>(), &response).ok());
}

// A call without a deadline is bounded by max_call_seconds: DEADLINE_EXCEEDED naming it, and
// the computation stops (calls_in_flight drops to 0) instead of running for hours.
TEST(Lifecycle, CallWithoutDeadlineStopsAtMaxCallSeconds) {
  auto server = StartServerWith([](service::ServerOptions* options) {
    options->service.limits.max_call_flops = 1e30;
    options->service.limits.max_call_seconds = 0.5;
  });
  ASSERT_NE(server, nullptr);
  auto stub = Connect(*server);
  v1::CheckGradientsRequest request;
  *request.mutable_request() = SlowRequest();
  request.set_samples_per_tensor(4096);  // Hours of compute.
  v1::CheckGradientsResponse response;
  grpc::ClientContext context;  // No deadline.
  const grpc::Status status = stub->CheckGradients(&context, request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
  EXPECT_THAT(status.error_message(), ::testing::HasSubstr("max_call_seconds"));
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (server->calls_in_flight() > 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(server->calls_in_flight(), 0);
}

// Shutdown loses nothing and keeps to its grace: with one call computing for hours and three
// waiting behind it on one core, every caller gets an answer, UNAVAILABLE (retryable) for
// those the grace could not fit; none gets CANCELLED, and Shutdown returns soon after the
// grace although hours of work were queued.
TEST(Lifecycle, ShutdownGraceBoundsTheExitAndEveryCallGetsUnavailable) {
  auto server = StartServer(/*threads=*/1, service::ServiceOptions().max_queue, 1e30);
  ASSERT_NE(server, nullptr);
  auto stub = Connect(*server);
  v1::CheckGradientsRequest request;
  *request.mutable_request() = SlowRequest();
  request.set_samples_per_tensor(4096);
  std::vector<std::future<grpc::Status>> calls;
  for (int i = 0; i < 4; ++i) {
    calls.push_back(std::async(std::launch::async, [&] {
      v1::CheckGradientsResponse response;
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(600));
      return stub->CheckGradients(&context, request, &response);
    }));
  }
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (server->calls_in_flight() < 4 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(server->calls_in_flight(), 4);
  const auto start = std::chrono::steady_clock::now();
  server->Shutdown(std::chrono::milliseconds(500));
  // The grace, then at most one layer of the call computing (milliseconds): 20 s is slack for
  // sanitizers on a loaded machine, not a performance bound; before, this took hours.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  for (auto& call : calls) {
    const grpc::Status status = call.get();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  }
}

// A call made after the drain on a connection that is already open gets UNAVAILABLE (gRPC's
// own shutdown would cancel it: CANCELLED, which a client cannot tell from its own cancel).
TEST(Lifecycle, CallAfterTheDrainOnAnOpenConnectionGetsUnavailable) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto stub = Connect(*server);
  {
    v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    ASSERT_TRUE(stub->ComputeGradients(&context, testing::SeedRequest<float>(), &response).ok());
  }
  // A slow call in flight keeps the shutdown in its grace.
  auto slow = std::async(std::launch::async, [&] {
    v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    return stub->ComputeGradients(&context, SlowRequest(), &response);
  });
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (server->calls_in_flight() < 1 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::thread shutdown([&] { server->Shutdown(std::chrono::seconds(60)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  v1::ComputeGradientsResponse response;
  grpc::ClientContext context;
  const grpc::Status status =
      stub->ComputeGradients(&context, testing::SeedRequest<float>(), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_TRUE(slow.get().ok());
  shutdown.join();
}

// The clients' channel policy (client/service_config.json): over two replicas, one of them
// shutting down (refusing with UNAVAILABLE), every call succeeds, retried on the other one;
// the same calls on a channel without the policy do fail.
TEST(Lifecycle, ClientRetriesUnavailableOnAnotherReplica) {
  auto refusing = StartServer();
  auto serving = StartServer();
  ASSERT_NE(refusing, nullptr);
  ASSERT_NE(serving, nullptr);
  refusing->RefuseNewCalls();
  const std::string target = "ipv4:127.0.0.1:" + std::to_string(refusing->port()) +
                             ",127.0.0.1:" + std::to_string(serving->port());
  const v1::ComputeGradientsRequest request = testing::SeedRequest<float>();
  auto failures = [&](std::shared_ptr<grpc::Channel> channel) {
    auto stub = v1::GradientService::NewStub(channel);
    int failed = 0;
    for (int i = 0; i < 20; ++i) {
      v1::ComputeGradientsResponse response;
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
      const grpc::Status status = stub->ComputeGradients(&context, request, &response);
      if (!status.ok()) {
        EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
        ++failed;
      }
    }
    return failed;
  };
  EXPECT_EQ(failures(client::CreateChannel(target)), 0);
  grpc::ChannelArguments no_retries;
  no_retries.SetLoadBalancingPolicyName("round_robin");
  EXPECT_GT(
      failures(grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), no_retries)),
      0);
}

// Note [Memory budget]: a call whose request and answer do not fit what calls in flight leave
// of max_memory_bytes is refused at once, naming the limit; what calls hold is released when
// they end, and the server answers normally afterwards.
TEST(Lifecycle, CallOverTheMemoryBudgetIsRefusedAndReservationsAreReleased) {
  auto server = StartServerWith(
      [](service::ServerOptions* options) { options->service.limits.max_memory_bytes = 8 << 20; });
  ASSERT_NE(server, nullptr);
  auto stub = Connect(*server);
  {
    // A small request whose answer (the output, 2000 x 1024) would take over 8 MiB.
    v1::ComputeGradientsRequest request;
    v1::Linear* linear = request.mutable_model()->add_layers()->mutable_linear();
    linear->set_in_features(4);
    linear->set_out_features(1024);
    linear->set_bias(false);
    request.mutable_model()->mutable_loss()->mutable_external();
    testing::SetTensor<float>(request.add_parameters()->mutable_weight(),
                              std::vector<float>(4 * 1024, 0.5f), {1024, 4});
    testing::SetTensor<float>(request.mutable_inputs(), std::vector<float>(2000 * 4, 1.0f),
                              {2000, 4});
    request.mutable_options()->set_return_output(true);
    v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    const grpc::Status status = stub->ComputeGradients(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
    EXPECT_THAT(status.error_message(), ::testing::HasSubstr("max_memory_bytes"));
  }
  for (int i = 0; i < 3; ++i) {
    v1::ComputeGradientsResponse response;
    grpc::ClientContext context;
    EXPECT_TRUE(stub->ComputeGradients(&context, testing::SeedRequest<float>(), &response).ok());
  }
  // Released in OnDone, just after the client has its answer.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (server->Stats().memory_in_use_bytes != 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(server->Stats().memory_in_use_bytes, 0);
}

// --also-listen: the same service on a second address, here IPv6 loopback beside IPv4.
TEST(Lifecycle, ServesOnEveryListenAddress) {
  auto server = StartServerWith(
      [](service::ServerOptions* options) { options->also_listen_addresses = {"[::1]:0"}; });
  ASSERT_NE(server, nullptr);
  ASSERT_EQ(server->also_ports().size(), 1u);
  for (const std::string& target : {"127.0.0.1:" + std::to_string(server->port()),
                                    "[::1]:" + std::to_string(server->also_ports()[0])}) {
    auto stub = v1::GradientService::NewStub(
        grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
    v1::GetServerInfoResponse info;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    EXPECT_TRUE(stub->GetServerInfo(&context, v1::GetServerInfoRequest(), &info).ok()) << target;
  }
}

}  // namespace
}  // namespace gradserve
