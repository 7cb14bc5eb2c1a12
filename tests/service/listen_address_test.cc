// Listen addresses: the one parser behind --listen and --metrics-listen, and a port that is
// already taken failing the second server (no SO_REUSEPORT) with a message naming the address.
#include "server/service/listen_address.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <string>

#include "server/service/server.h"

namespace gradserve {
namespace {

using service::HostPort;
using service::ParseListenAddress;
using ::testing::HasSubstr;

TEST(ListenAddress, AcceptsPortHostPortAndBracketedIpv6) {
  struct Case {
    const char* address;
    const char* host;
    int port;
    const char* canonical;
  };
  for (const Case& c :
       {Case{"50062", "127.0.0.1", 50062, "127.0.0.1:50062"},
        Case{":50062", "127.0.0.1", 50062, "127.0.0.1:50062"},
        Case{"0", "127.0.0.1", 0, "127.0.0.1:0"},
        Case{"0.0.0.0:9464", "0.0.0.0", 9464, "0.0.0.0:9464"},
        Case{"localhost:65535", "localhost", 65535, "localhost:65535"},
        Case{"my-host_1.example:1", "my-host_1.example", 1, "my-host_1.example:1"},
        Case{"[::1]:50051", "::1", 50051, "[::1]:50051"}, Case{"[::]:0", "::", 0, "[::]:0"},
        Case{"[::ffff:127.0.0.1]:80", "::ffff:127.0.0.1", 80, "[::ffff:127.0.0.1]:80"}}) {
    SCOPED_TRACE(c.address);
    absl::StatusOr<HostPort> parsed = ParseListenAddress(c.address, "--listen");
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->host, c.host);
    EXPECT_EQ(parsed->port, c.port);
    EXPECT_EQ(parsed->ToString(), c.canonical);
  }
}

TEST(ListenAddress, RejectsGarbageNamingTheFlag) {
  for (const char* address : {"",
                              ":",
                              "host:",
                              "127.0.0.1:http",
                              "127.0.0.1:70000",
                              "127.0.0.1:-1",
                              "-1",
                              "+80",
                              "80 ",
                              " 80",
                              "::1:9090",
                              "[::1]",
                              "[]:80",
                              "[nothex]:80",
                              "a b:80",
                              "unix:/tmp/sock",
                              "127.0.0.1:80/x",
                              "host:80:81",
                              "[::1]:",
                              "99999999999999999999"}) {
    SCOPED_TRACE(address);
    absl::StatusOr<HostPort> parsed = ParseListenAddress(address, "--metrics-listen");
    ASSERT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(parsed.status().message(),
                HasSubstr(std::string("--metrics-listen \"") + address + "\""));
  }
}

service::ServerOptions LoopbackOptions() {
  service::ServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.service.threads = 1;
  return options;
}

TEST(ListenAddress, GrpcListenerTakesABarePortAndRejectsGarbage) {
  for (const char* address : {"0", ":0"}) {
    service::ServerOptions options = LoopbackOptions();
    options.listen_address = address;
    auto server = service::GradServer::Start(options);
    ASSERT_TRUE(server.ok()) << address << ": " << server.status();
    EXPECT_GT((*server)->port(), 0);
  }
  service::ServerOptions options = LoopbackOptions();
  options.listen_address = "localhost";  // A host without a port.
  auto server = service::GradServer::Start(options);
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(server.status().message(), HasSubstr("listen address \"localhost\""));
}

// Both listeners used to set SO_REUSEPORT, so a second server on a taken port started without
// a word and Linux gave it half of the new connections.
TEST(PortInUse, SecondGrpcServerOnTheSamePortFails) {
  spdlog::set_level(spdlog::level::off);
  auto first = service::GradServer::Start(LoopbackOptions());
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string port = std::to_string((*first)->port());
  for (const std::string& address : {"127.0.0.1:" + port, port}) {
    SCOPED_TRACE(address);
    service::ServerOptions options = LoopbackOptions();
    options.listen_address = address;
    auto second = service::GradServer::Start(options);
    ASSERT_EQ(second.status().code(), absl::StatusCode::kUnavailable) << second.status();
    EXPECT_THAT(second.status().message(),
                HasSubstr("127.0.0.1:" + port + " is already in use by another process"));
  }
  spdlog::set_level(spdlog::level::warn);
}

TEST(PortInUse, SecondMetricsListenerOnTheSamePortFails) {
  service::ServerOptions options = LoopbackOptions();
  options.metrics_listen_address = "127.0.0.1:0";
  auto first = service::GradServer::Start(options);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string port = std::to_string((*first)->metrics_port());
  for (const std::string& address : {"127.0.0.1:" + port, ":" + port}) {
    SCOPED_TRACE(address);
    options.metrics_listen_address = address;
    auto second = service::GradServer::Start(options);
    ASSERT_EQ(second.status().code(), absl::StatusCode::kUnavailable) << second.status();
    EXPECT_THAT(second.status().message(),
                HasSubstr("127.0.0.1:" + port + " is already in use by another process"));
  }
}

}  // namespace
}  // namespace gradserve
