// gradserve: flags, logging, server start, and a clean exit on SIGINT/SIGTERM.
#include <grpc/grpc.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <csignal>
#include <thread>

#include "server/service/server.h"

int main(int argc, char** argv) {
  using gradserve::service::ServerOptions;
  ServerOptions options;
  auto& limits = options.service.limits;
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  options.service.threads_per_call = cores;
  std::string log_level = "info";
  double grace_seconds = 10;

  CLI::App app{"gradserve: neural-network gradients over gRPC (gradserve.v1.GradientService)"};
  app.add_option("--listen", options.listen_address,
                 "host:port to listen on; 0.0.0.0:PORT for every interface")
      ->capture_default_str();
  app.add_option("--threads", options.service.threads_per_call, "OpenMP threads one call may use")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  app.add_option("--workers", options.service.workers, "calls computed at once")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  app.add_option("--max-queue", options.service.max_queue,
                 "calls waiting for a worker before new ones get RESOURCE_EXHAUSTED")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--max-message-bytes", limits.max_message_bytes,
                 "largest request or response (gRPC's own default is 4 MiB)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1} << 16, int64_t{2047} << 20));
  app.add_option("--max-tensor-elements", limits.max_tensor_elements)->capture_default_str();
  app.add_option("--max-layers", limits.max_layers)->capture_default_str();
  app.add_option("--max-batch", limits.max_batch)->capture_default_str();
  app.add_option("--max-features", limits.max_features)->capture_default_str();
  app.add_option("--max-activation-bytes", limits.max_activation_bytes,
                 "activation memory one call may use")
      ->capture_default_str();
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, critical or off")
      ->capture_default_str()
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}));
  app.add_option("--shutdown-grace", grace_seconds,
                 "seconds calls in flight get to finish after SIGTERM")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
  CLI11_PARSE(app, argc, argv);

  spdlog::set_level(spdlog::level::from_str(log_level));
  // One grpc_init for the life of the process: avoids a slow ~Server() at exit.
  grpc_init();

  // Block the stop signals in every thread (gRPC's and OpenMP's inherit this mask) and take
  // them synchronously below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto server = gradserve::service::GradServer::Start(options);
  if (!server.ok()) {
    spdlog::critical("{}", std::string(server.status().message()));
    return 1;
  }
  spdlog::info(
      "gradserve {} listening on {} (port {}); threads per call {}, workers {}, "
      "max message {} bytes",
      GRADSERVE_VERSION, options.listen_address, (*server)->port(),
      options.service.threads_per_call, options.service.workers, limits.max_message_bytes);

  int signal = 0;
  sigwait(&stop_signals, &signal);
  spdlog::info("received {}; draining (grace {} s)", signal == SIGINT ? "SIGINT" : "SIGTERM",
               grace_seconds);
  (*server)->Shutdown(std::chrono::milliseconds(static_cast<int64_t>(grace_seconds * 1000)));
  server->reset();
  grpc_shutdown();
  spdlog::info("stopped");
  return 0;
}
