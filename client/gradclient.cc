// gradclient: talk to a gradserve server from the command line.
//   gradclient health [--service NAME] | info [--json] | stats [--json] | check
//             | demo [--dtype float32|float64]
//   gradclient compute --model mlp.json --input x.npy --loss-target y.npy [--params DIR] --out DIR
//   gradclient compute --model graph.txtpb --input x=x.npy --loss-target y.npy --params DIR
//   gradclient compute --onnx model.onnx --input NAME=FILE.npy --loss-target y.npy --out DIR
//   gradclient bench [--concurrency N] [--duration S] [--shape SPEC] ...
// Connection options, before or after the subcommand: --target HOST:PORT (127.0.0.1:50051),
// --timeout-ms, --tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name, --auth-token-file
// (or $GRADSERVE_AUTH_TOKEN). A failed call is reported with its status code by name
// ("ComputeGradients failed: INVALID_ARGUMENT: ...") and exit status 1; a model or .npy file
// that cannot be used exits 2 with the file named.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>

#include "client/bench_command.h"
#include "client/compute_command.h"
#include "client/stats_command.h"
#include "gradserve/client.h"

namespace {

namespace v1 = ::gradserve::v1;
using gradserve::client::FormatNorm;
using gradserve::client::GradientClient;
using gradserve::client::RowMajorMatrix;

int Fail(const char* what, const grpc::Status& status) {
  std::cerr << "gradclient: " << what << " failed: " << gradserve::client::FormatStatus(status)
            << "\n";
  return 1;
}

template <typename T>
void PrintMatrix(const char* name, const v1::Tensor& tensor) {
  const auto matrix = gradserve::client::ToMatrix<T>(tensor);
  if (!matrix) {
    std::cout << name << ": (unreadable tensor)\n";
    return;
  }
  std::cout << name << " [" << matrix->rows() << " x " << matrix->cols() << "]\n";
  const Eigen::IOFormat format(8, 0, ", ", "\n", "  [", "]");
  std::cout << matrix->format(format) << "\n";
}

// The network gradserve grows from: batch 8, Linear(4 -> 2) -> ReLU -> MSE, seeded data.
template <typename T>
v1::ComputeGradientsRequest DemoRequest() {
  std::mt19937 rng(7);
  std::normal_distribution<double> normal(0.0, 1.0);
  auto random = [&](int64_t rows, int64_t cols) {
    RowMajorMatrix<T> m(rows, cols);
    for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(normal(rng));
    return m;
  };
  v1::ComputeGradientsRequest request;
  *request.mutable_model() =
      gradserve::client::ModelBuilder().Linear(4, 2).Named("fc").ReLU().Mse().Build();
  const RowMajorMatrix<T> weight = random(2, 4);
  const RowMajorMatrix<T> bias = random(1, 2);
  gradserve::client::AddLinearParameters<T>(weight, {bias(0, 0), bias(0, 1)}, &request);
  *request.mutable_inputs() = gradserve::client::ToTensor(random(8, 4));
  *request.mutable_targets() = gradserve::client::ToTensor(random(8, 2));
  request.mutable_options()->set_return_input_gradient(true);
  return request;
}

template <typename T>
int RunDemo(GradientClient& client) {
  const v1::ComputeGradientsRequest request = DemoRequest<T>();
  v1::ComputeGradientsResponse response;
  if (grpc::Status status = client.ComputeGradients(request, &response); !status.ok()) {
    return Fail("ComputeGradients", status);
  }
  std::printf("model: Linear(4 -> 2) -> ReLU -> MSE (mean), batch 8, %s\n",
              v1::DType_Name(request.inputs().dtype()).c_str());
  std::printf("loss: %.10g\n", response.loss());
  PrintMatrix<T>("dL/dW", response.gradients(0).weight());
  PrintMatrix<T>("dL/db", response.gradients(0).bias());
  PrintMatrix<T>("dL/dx", response.input_gradient());
  std::printf("per-layer diagnostics:\n");
  for (const v1::LayerDiagnostics& d : response.diagnostics()) {
    std::printf("  [%d] %-8s |dW|=%s |db|=%s |dL/dout|=%s |out|=%.4g non-finite=%lld\n",
                d.layer_index(), d.kind().c_str(),
                FormatNorm(d.has_weight_grad_norm(), d.weight_grad_norm()).c_str(),
                FormatNorm(d.has_bias_grad_norm(), d.bias_grad_norm()).c_str(),
                FormatNorm(d.has_output_grad_norm(), d.output_grad_norm()).c_str(),
                d.activation_norm(), static_cast<long long>(d.non_finite_count()));
  }
  std::printf("forward %.1f us, backward %.1f us, %lld examples\n",
              response.stats().forward_micros(), response.stats().backward_micros(),
              static_cast<long long>(response.stats().num_examples()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string target = "127.0.0.1:50051";
  std::string dtype = "float32";
  int timeout_ms = 30000;
  CLI::App app{"gradclient: command-line client for gradserve"};
  app.footer(
      "The connection options (--target, --timeout-ms, --tls*, --auth-token-file) may also "
      "follow the subcommand: gradclient info --target HOST:PORT. Run gradclient SUBCOMMAND "
      "--help for a subcommand's options.");
  // Inherited by every subcommand added below: an option a subcommand does not know is offered
  // to the app, so the connection options work after the subcommand as well as before it.
  app.fallthrough();
  app.add_option("--target", target, "server address (host:port, dns:///host:port, ...)")
      ->capture_default_str();
  app.add_option("--timeout-ms", timeout_ms, "deadline of each call")->capture_default_str();
  gradserve::client::ClientOptions options;
  gradserve::client::TlsOptions& tls = options.tls;
  std::string auth_token_file;
  app.add_flag("--tls", tls.enabled,
               "connect with TLS, trusting the system's root CAs (implied by the --tls-* options)");
  app.add_option("--tls-ca", tls.root_ca_file, "PEM CA certificates that signed the server's");
  app.add_option("--tls-cert", tls.cert_file, "PEM client certificate chain, for mutual TLS");
  app.add_option("--tls-key", tls.key_file, "PEM private key of --tls-cert");
  app.add_option("--tls-server-name", tls.server_name_override,
                 "name to verify the server's certificate against instead of the target's host");
  app.add_option("--auth-token-file", auth_token_file,
                 "file holding the bearer token to send (default: $GRADSERVE_AUTH_TOKEN if set)");
  app.require_subcommand(1);
  CLI::App* health = app.add_subcommand(
      "health",
      "print the grpc.health.v1 status (SERVING, NOT_SERVING, SERVICE_UNKNOWN); exit 0 only if "
      "SERVING");
  std::string health_service;
  health
      ->add_option("--service", health_service,
                   "service name to check: \"\" is the whole server, "
                   "gradserve.v1.GradientService the gradient service")
      ->capture_default_str();
  CLI::App* info = app.add_subcommand("info", "print version, supported layers, limits");
  bool info_json = false;
  info->add_flag("--json", info_json,
                 "print GetServerInfo as one protobuf JSON object (the .proto's field names)");
  CLI::App* demo = app.add_subcommand(
      "demo", "send batch 8, Linear(4->2) -> ReLU -> MSE and print the loss and gradients");
  demo->add_option("--dtype", dtype)
      ->check(CLI::IsMember({"float32", "float64"}))
      ->capture_default_str();
  CLI::App* check = app.add_subcommand(
      "check", "verify the server's gradients on the demo network by finite differences");
  CLI::App* stats = app.add_subcommand(
      "stats", "print GetStats: calls by status code, latency percentiles per phase");
  bool stats_json = false;
  stats->add_flag("--json", stats_json,
                  "print GetStats as one protobuf JSON object (the .proto's field names)");
  gradserve::client::bench::BenchOptions bench_options;
  CLI::App* bench = gradserve::client::bench::AddBenchCommand(app, &bench_options);
  gradserve::client::compute::ComputeOptions compute_options;
  CLI::App* compute = gradserve::client::compute::AddComputeCommand(app, &compute_options);
  CLI11_PARSE(app, argc, argv);

  // With the connection options accepted after the subcommand, `compute --target y.npy` (the
  // loss target is --loss-target) would otherwise fail later as an unreachable server "y.npy".
  if (target.size() > 4 && target.compare(target.size() - 4, 4, ".npy") == 0) {
    std::cerr << "gradclient: --target " << target
              << ": --target is the server's address; the loss target file is --loss-target\n";
    return 2;
  }
  options.timeout = std::chrono::milliseconds(timeout_ms);
  tls.enabled = tls.enabled || !tls.root_ca_file.empty() || !tls.cert_file.empty() ||
                !tls.key_file.empty() || !tls.server_name_override.empty();
  std::string error;
  if (!auth_token_file.empty()) {
    if (!gradserve::client::ReadBearerTokenFile(auth_token_file, &options.bearer_token, &error)) {
      std::cerr << "gradclient: " << error << "\n";
      return 2;
    }
  } else if (const char* env = std::getenv("GRADSERVE_AUTH_TOKEN"); env != nullptr) {
    options.bearer_token = env;
    while (!options.bearer_token.empty() &&
           (options.bearer_token.back() == '\n' || options.bearer_token.back() == '\r')) {
      options.bearer_token.pop_back();
    }
  }
  const std::shared_ptr<grpc::ChannelCredentials> credentials =
      gradserve::client::MakeChannelCredentials(options, &error);
  if (credentials == nullptr) {
    std::cerr << "gradclient: " << error << "\n";
    return 2;
  }
  const std::shared_ptr<grpc::Channel> client_channel =
      gradserve::client::CreateChannel(target, options, credentials);
  GradientClient client(client_channel, options);

  if (health->parsed()) {
    gradserve::client::ServingStatus serving = gradserve::client::ServingStatus::kUnknown;
    grpc::Status status = client.CheckHealth(health_service, &serving);
    if (!status.ok()) return Fail("health", status);
    std::cout << gradserve::client::ServingStatusName(serving) << "\n";
    return serving == gradserve::client::ServingStatus::kServing ? 0 : 1;
  }
  if (info->parsed()) {
    v1::GetServerInfoResponse response;
    if (grpc::Status status = client.GetServerInfo(&response); !status.ok()) {
      return Fail("GetServerInfo", status);
    }
    if (info_json) {
      gradserve::client::PrintJson(response, std::cout);
    } else {
      std::cout << response.DebugString();
    }
    return 0;
  }
  if (stats->parsed()) {
    return gradserve::client::RunStatsCommand(client_channel, options, stats_json);
  }
  if (demo->parsed()) {
    return dtype == "float64" ? RunDemo<double>(client) : RunDemo<float>(client);
  }
  if (bench->parsed()) {
    return gradserve::client::bench::RunBench(target, options, credentials, bench_options);
  }
  if (compute->parsed()) {
    return gradserve::client::compute::RunCompute(client, compute_options, std::cout, std::cerr);
  }
  if (check->parsed()) {
    v1::CheckGradientsRequest request;
    *request.mutable_request() = DemoRequest<double>();
    v1::CheckGradientsResponse response;
    if (grpc::Status status = client.CheckGradients(request, &response); !status.ok()) {
      return Fail("CheckGradients", status);
    }
    for (const v1::TensorCheck& c : response.checks()) {
      std::printf("%-22s samples=%-4d max_abs=%.3g max_rel=%.3g\n", c.tensor().c_str(), c.samples(),
                  c.max_abs_error(), c.max_rel_error());
    }
    std::printf("max relative error %.3g\n", response.max_rel_error());
    return response.max_rel_error() < 1e-6 ? 0 : 1;
  }
  return 0;
}
