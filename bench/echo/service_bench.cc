// End-to-end latency of ComputeGradients through a running gradserve against a bare gRPC echo
// of the same number of bytes each way, one call in flight, the two interleaved in blocks so
// that both see the same machine.
//
//   gradserve_service_bench --gradserve 127.0.0.1:P --echo 127.0.0.1:Q [--calls a=2000,b=60]
//                           [--block 20] [--json FILE]
//
// Cases (the same networks as the engine benchmarks, float32, with dx):
//   a  batch=8,layers=4x2,loss=mse
//   b  batch=256,layers=784x1024x1024x10,act=relu,loss=cross_entropy
// For each case: warm both channels, then alternate `block` echo calls and `block`
// ComputeGradients calls until each has `calls` measured ones. The echo request carries as many
// payload bytes as the serialized ComputeGradients request and asks for as many as its response.
// Reports p50/p90 of each, and the median of the server's own compute time (stats forward +
// backward) and threads.
#include <grpc/grpc.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "client/bench_command.h"
#include "echo/echo.grpc.pb.h"
#include "gradserve/client.h"

namespace {

namespace gc = ::gradserve::client;
using Clock = std::chrono::steady_clock;
constexpr int kMaxMessageBytes = 256 << 20;

double Quantile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double pos = q * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(pos);
  const size_t hi = std::min(lo + 1, values.size() - 1);
  return values[lo] + (values[hi] - values[lo]) * (pos - static_cast<double>(lo));
}

struct CaseResult {
  std::vector<double> echo_us, e2e_us, compute_us;
  int threads = 0;
  size_t request_bytes = 0, response_bytes = 0;
};

int Fail(const std::string& what, const grpc::Status& status) {
  std::fprintf(stderr, "service_bench: %s failed: %s %s\n", what.c_str(),
               std::to_string(status.error_code()).c_str(), status.error_message().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string gradserve_target, echo_target, json_path;
  std::map<std::string, int> calls = {{"a", 2000}, {"b", 60}};
  int block = 20;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "service_bench: %s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--gradserve") {
      gradserve_target = value();
    } else if (arg == "--echo") {
      echo_target = value();
    } else if (arg == "--json") {
      json_path = value();
    } else if (arg == "--block") {
      block = std::max(1, std::stoi(value()));
    } else if (arg == "--calls") {
      calls.clear();
      std::string list = value();
      size_t start = 0;
      while (start < list.size()) {
        size_t end = list.find(',', start);
        if (end == std::string::npos) end = list.size();
        const std::string item = list.substr(start, end - start);
        const size_t eq = item.find('=');
        if (eq == std::string::npos) {
          std::fprintf(stderr, "service_bench: --calls takes case=N,...\n");
          return 2;
        }
        calls[item.substr(0, eq)] = std::stoi(item.substr(eq + 1));
        start = end + 1;
      }
    } else {
      std::fprintf(stderr,
                   "usage: %s --gradserve HOST:PORT --echo HOST:PORT [--calls a=N,b=N] "
                   "[--block K] [--json FILE]\n",
                   argv[0]);
      return 2;
    }
  }
  if (gradserve_target.empty() || echo_target.empty()) {
    std::fprintf(stderr, "service_bench: --gradserve and --echo are required\n");
    return 2;
  }
  const std::map<std::string, std::string> shapes = {
      {"a", "batch=8,layers=4x2,loss=mse,dx=1"},
      {"b", "batch=256,layers=784x1024x1024x10,act=relu,loss=cross_entropy,dx=1"},
  };

  grpc_init();
  gc::ClientOptions options;
  options.timeout = std::chrono::milliseconds(60000);
  gc::GradientClient client(gc::CreateChannel(gradserve_target, options), options);
  grpc::ChannelArguments echo_args;
  echo_args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  echo_args.SetMaxSendMessageSize(kMaxMessageBytes);
  auto echo_stub = gradserve::bench::Echo::NewStub(
      grpc::CreateCustomChannel(echo_target, grpc::InsecureChannelCredentials(), echo_args));

  nlohmann::json out = nlohmann::json::object();
  for (const auto& [name, n] : calls) {
    auto shape_it = shapes.find(name);
    if (shape_it == shapes.end()) {
      std::fprintf(stderr, "service_bench: unknown case %s\n", name.c_str());
      return 2;
    }
    std::string error;
    const auto spec = gc::bench::ParseShape(shape_it->second, &error);
    if (!spec) {
      std::fprintf(stderr, "service_bench: %s\n", error.c_str());
      return 2;
    }
    const gc::v1::ComputeGradientsRequest request = gc::bench::BuildRequest(*spec, "none");
    CaseResult r;
    r.request_bytes = request.ByteSizeLong();

    auto gradserve_call = [&](bool record) -> grpc::Status {
      gc::v1::ComputeGradientsResponse response;
      const auto start = Clock::now();
      grpc::Status status = client.ComputeGradients(request, &response);
      const double us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
      if (!status.ok()) return status;
      r.response_bytes = response.ByteSizeLong();
      r.threads = response.stats().threads();
      if (record) {
        r.e2e_us.push_back(us);
        r.compute_us.push_back(response.stats().forward_micros() +
                               response.stats().backward_micros());
      }
      return status;
    };
    // Warm the gradserve channel (first large calls on a new channel are slower) and learn the
    // response's size.
    const int warm = std::max(3, std::min(n / 10, 50));
    for (int i = 0; i < warm; ++i) {
      if (auto status = gradserve_call(false); !status.ok())
        return Fail("ComputeGradients", status);
    }
    gradserve::bench::EchoRequest echo_request;
    echo_request.set_payload(std::string(r.request_bytes, 'x'));
    echo_request.set_reply_bytes(static_cast<int64_t>(r.response_bytes));
    auto echo_call = [&](bool record) -> grpc::Status {
      gradserve::bench::EchoReply reply;
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
      const auto start = Clock::now();
      grpc::Status status = echo_stub->Echo(&context, echo_request, &reply);
      const double us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
      if (status.ok() && record) r.echo_us.push_back(us);
      return status;
    };
    for (int i = 0; i < warm; ++i) {
      if (auto status = echo_call(false); !status.ok()) return Fail("Echo", status);
    }
    while (static_cast<int>(r.e2e_us.size()) < n || static_cast<int>(r.echo_us.size()) < n) {
      for (int i = 0; i < block && static_cast<int>(r.echo_us.size()) < n; ++i) {
        if (auto status = echo_call(true); !status.ok()) return Fail("Echo", status);
      }
      for (int i = 0; i < block && static_cast<int>(r.e2e_us.size()) < n; ++i) {
        if (auto status = gradserve_call(true); !status.ok()) {
          return Fail("ComputeGradients", status);
        }
      }
    }
    out[name] = {
        {"shape", shape_it->second},
        {"calls", n},
        {"request_bytes", r.request_bytes},
        {"response_bytes", r.response_bytes},
        {"server_threads", r.threads},
        {"echo_p50_us", Quantile(r.echo_us, 0.5)},
        {"echo_p90_us", Quantile(r.echo_us, 0.9)},
        {"e2e_p50_us", Quantile(r.e2e_us, 0.5)},
        {"e2e_p90_us", Quantile(r.e2e_us, 0.9)},
        {"server_compute_p50_us", Quantile(r.compute_us, 0.5)},
    };
    std::fprintf(stderr,
                 "service %s: %zu B up, %zu B down; echo p50 %.1f us, ComputeGradients p50 %.1f "
                 "us (server compute %.1f us on %d threads)\n",
                 name.c_str(), r.request_bytes, r.response_bytes, Quantile(r.echo_us, 0.5),
                 Quantile(r.e2e_us, 0.5), Quantile(r.compute_us, 0.5), r.threads);
  }
  if (json_path.empty()) {
    std::printf("%s\n", out.dump(2).c_str());
  } else {
    std::ofstream(json_path) << out.dump(2) << "\n";
  }
  return 0;
}
