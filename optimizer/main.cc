// gradserve-optimizer: flags, logging, start-up (restoring checkpoints), and a stop on
// SIGINT/SIGTERM that checkpoints every run before exiting 0.
#include <grpc/grpc.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "google/protobuf/util/json_util.h"
#include "gradserve/client.h"
#include "optimizer/optimizer_service.h"
#include "server/service/listen_address.h"

namespace {

namespace opt = gradserve::optimizer;

absl::StatusOr<gradserve::optimizer::v1::RunSpec> ReadRunFile(const std::string& path) {
  std::ifstream file(path);
  if (!file) return absl::InvalidArgumentError("--run " + path + ": cannot be read");
  std::stringstream text;
  text << file.rdbuf();
  gradserve::optimizer::v1::RunSpec spec;
  const auto status = google::protobuf::util::JsonStringToMessage(text.str(), &spec);
  if (!status.ok()) {
    return absl::InvalidArgumentError(
        "--run " + path + ": not a RunSpec in protobuf JSON: " + std::string(status.message()));
  }
  return spec;
}

}  // namespace

int main(int argc, char** argv) {
  std::string listen = "127.0.0.1:50061";
  opt::OptimizerOptions options;
  std::vector<std::string> run_files;
  std::vector<std::string> targets = {"127.0.0.1:50051"};
  double step_timeout_seconds = 60;
  double grace_seconds = 10;
  std::string log_level = "info";
  std::string token_file;

  CLI::App app{
      "gradserve-optimizer: trains models on gradserve replicas "
      "(gradserve.optimizer.v1.OptimizerService)"};
  app.add_option("--listen", listen,
                 "address for gRPC: HOST:PORT, [IPV6]:PORT, or PORT / :PORT for 127.0.0.1:PORT; "
                 "0.0.0.0:PORT for every interface")
      ->capture_default_str();
  app.add_option("--state-dir", options.state_dir,
                 "directory of the runs' checkpoints (<run_id>.npz), restored at start-up; "
                 "default: none (nothing survives a restart)");
  app.add_option("--data-dir", options.environment.data_dir,
                 "directory the runs' data sets (.npy) are read from; default: none");
  app.add_option("--run", run_files,
                 "a RunSpec in protobuf JSON, created at start-up unless --state-dir holds its "
                 "checkpoint, which is resumed instead (repeatable)");
  app.add_option("--gradserve", targets,
                 "gradserve targets for runs that name none: HOST:PORT each (repeatable), or one "
                 "dns:///NAME:PORT resolving to every replica (round_robin)")
      ->capture_default_str();
  app.add_option("--shards", options.environment.default_shards,
                 "parts each batch is split into for runs that say none (0: one per target)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1024));
  app.add_option("--checkpoint-every", options.environment.checkpoint_every,
                 "steps between checkpoints for runs that say none")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  app.add_option("--step-timeout", step_timeout_seconds,
                 "seconds a step's gradients may take, retries on other replicas included")
      ->capture_default_str()
      ->check(CLI::Range(0.001, 86400.0));
  app.add_option("--shutdown-grace", grace_seconds,
                 "on SIGTERM, seconds for steps and calls in flight before the checkpoints are "
                 "written and the process exits")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, critical, off")
      ->capture_default_str()
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}));
  app.add_option("--log-every", options.log_every,
                 "background training logs a run's loss every this many steps (0: never)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40));
  app.add_option("--max-runs", options.max_runs, "runs this server holds at most")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 16));
  app.add_option("--max-memory-bytes", options.max_memory_bytes,
                 "parameters and optimizer state (float64) and data sets of all runs together; "
                 "a run that would exceed it is refused with RESOURCE_EXHAUSTED")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1} << 20, int64_t{1} << 50));
  app.add_option("--max-message-bytes", options.environment.max_message_bytes,
                 "largest message this server takes or sends, and sends to gradserve (a run's "
                 "parameters must fit one)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1} << 16, int64_t{2047} << 20));
  app.add_option("--gradserve-token-file", token_file,
                 "file holding the bearer token gradserve requires (default: the "
                 "GRADSERVE_AUTH_TOKEN environment variable, or none)");
  CLI11_PARSE(app, argc, argv);

  spdlog::set_level(spdlog::level::from_str(log_level));
  options.environment.default_targets = targets;
  options.environment.step_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(step_timeout_seconds * 1000));
  if (!token_file.empty()) {
    std::string error;
    if (!gradserve::client::ReadBearerTokenFile(token_file, &options.environment.gradserve_token,
                                                &error)) {
      spdlog::critical("--gradserve-token-file: {}", error);
      return 2;
    }
  } else if (const char* env = std::getenv("GRADSERVE_AUTH_TOKEN"); env != nullptr) {
    options.environment.gradserve_token = env;
  }
  absl::StatusOr<gradserve::service::HostPort> address =
      gradserve::service::ParseListenAddress(listen, "--listen");
  if (!address.ok()) {
    spdlog::critical("{}", std::string(address.status().message()));
    return 2;
  }
  std::vector<gradserve::optimizer::v1::RunSpec> runs;
  for (const std::string& path : run_files) {
    absl::StatusOr<gradserve::optimizer::v1::RunSpec> spec = ReadRunFile(path);
    if (!spec.ok()) {
      spdlog::critical("{}", std::string(spec.status().message()));
      return 2;
    }
    runs.push_back(*std::move(spec));
  }

  grpc_init();
  // The stop signals are taken synchronously below; every thread inherits the mask.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto service = std::make_unique<opt::OptimizerServiceImpl>(options);
  if (absl::Status status = service->Start(runs); !status.ok()) {
    spdlog::critical("{}", std::string(status.message()));
    return 2;
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address->ToString(), grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.environment.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.environment.max_message_bytes));
  builder.RegisterService(service.get());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    spdlog::critical("cannot listen on {}", address->ToString());
    return 1;
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus("gradserve.optimizer.v1.OptimizerService", true);
  spdlog::info(
      "gradserve-optimizer listening on {} (port {}); gradserve {}; state {}", address->ToString(),
      port, fmt::join(targets, ", "),
      options.state_dir.empty() ? std::string("not kept (no --state-dir)") : options.state_dir);

  int signal = 0;
  sigwait(&stop_signals, &signal);
  const auto grace = std::chrono::milliseconds(static_cast<int64_t>(grace_seconds * 1000));
  spdlog::info("received {}; stopping training, {} s for steps in flight, then checkpoints",
               signal == SIGINT ? "SIGINT" : "SIGTERM", grace_seconds);
  health->SetServingStatus(false);
  service->StopTraining(grace);
  server->Shutdown(std::chrono::system_clock::now() + grace);
  const bool saved = service->CheckpointAll();
  spdlog::info("stopped");
  spdlog::shutdown();
  // A trainer still inside a gradserve call past the grace must not hold the exit.
  std::_Exit(saved ? 0 : 1);
}
