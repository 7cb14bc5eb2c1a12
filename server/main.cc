// gradserve: flags, logging, server start, and a clean exit on SIGINT/SIGTERM.
#include <grpc/grpc.h>
#include <grpc/support/log.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdlib>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/str_replace.h"
#include "server/engine/gemm.h"
#include "server/service/auth.h"
#include "server/service/listen_address.h"
#include "server/service/memory.h"
#include "server/service/server.h"

namespace {

// Checks that the TLS flags fit together and fills security->auth_token from --auth-token-file
// or, without it, from GRADSERVE_AUTH_TOKEN. The certificate files are read by GradServer::Start.
absl::Status ResolveSecurity(const std::string& token_file,
                             gradserve::service::SecurityOptions* security) {
  if (security->tls_cert_file.empty() != security->tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together: give both or neither");
  }
  if (!security->tls_client_ca_file.empty() && security->tls_cert_file.empty()) {
    return absl::InvalidArgumentError(
        "--tls-client-ca (mutual TLS) needs TLS: give --tls-cert and --tls-key too");
  }
  absl::StatusOr<std::string> token;
  if (!token_file.empty()) {
    token = gradserve::service::ReadAuthTokenFile(token_file);
  } else if (const char* env = std::getenv("GRADSERVE_AUTH_TOKEN"); env != nullptr) {
    // Set but empty is refused rather than read as "no token": it is usually a variable that
    // failed to expand, and failing open would serve without authentication.
    token = gradserve::service::NormalizeAuthToken(env, "GRADSERVE_AUTH_TOKEN");
  } else {
    return absl::OkStatus();
  }
  if (!token.ok()) return token.status();
  security->auth_token = *std::move(token);
  return absl::OkStatus();
}

// Parses the address `flag` gave and rewrites it in full (HOST:PORT), as the start-up lines
// then show it.
absl::Status ResolveAddress(const char* flag, std::string* address) {
  absl::StatusOr<gradserve::service::HostPort> parsed =
      gradserve::service::ParseListenAddress(*address, flag);
  if (!parsed.ok()) return parsed.status();
  *address = parsed->ToString();
  return absl::OkStatus();
}

// gRPC's own log lines go to spdlog at debug level, one line each. Every gRPC failure an
// operator must act on reaches us as a status (a port that cannot be bound, a certificate gRPC
// refuses, a failed call) and is logged once, in our words, naming the address or call; gRPC's
// lines are its internals' view of the same failure (an error tree over many lines on stderr)
// and would bury that line. --log-level debug shows them, with GRPC_VERBOSITY choosing which.
void LogGrpcThroughSpdlog(gpr_log_func_args* args) {
  spdlog::debug("grpc {}:{}: {}", args->file, args->line,
                absl::StrReplaceAll(args->message, {{"\n", " "}, {"\r", ""}}));
}

}  // namespace

int main(int argc, char** argv) {
  gradserve::service::ConfigureAllocator();
  using gradserve::service::ServerOptions;
  ServerOptions options;
  auto& limits = options.service.limits;
  options.service.threads = gradserve::service::AvailableCores();
  limits.max_memory_bytes = gradserve::service::DefaultMaxMemoryBytes();
  std::string log_level = "info";
  double grace_seconds = 10;
  double drain_seconds = 0;
  std::string auth_token_file;

  CLI::App app{"gradserve: neural-network gradients over gRPC (gradserve.v1.GradientService)"};
  app.add_option("--listen", options.listen_address,
                 "address for gRPC: HOST:PORT, [IPV6]:PORT, or PORT / :PORT for 127.0.0.1:PORT; "
                 "0.0.0.0:PORT for every interface; a port in use is an error")
      ->capture_default_str();
  app.add_option("--also-listen", options.also_listen_addresses,
                 "another address to serve on, in the forms of --listen (repeatable), e.g. "
                 "[::1]:50051 beside 127.0.0.1:50051");
  app.add_option("--threads", options.service.threads,
                 "cores for compute: a large call uses all of them as one OpenMP team, small "
                 "calls run side by side on one each (default: the cores this process may use, "
                 "cgroup quota included)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  app.add_option("--parallel-threshold-flops", options.service.parallel_threshold_flops,
                 "calls estimated below this many floating-point operations run on one core")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e18));
  app.add_option("--max-queue", options.service.max_queue,
                 "calls waiting for cores before new ones get RESOURCE_EXHAUSTED")
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
  app.add_option("--max-graph-nodes", limits.max_graph_nodes, "nodes of a graph model")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  app.add_option("--max-graph-values", limits.max_graph_values,
                 "values of a graph model: inputs, parameters, constants and node outputs")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 26));
  app.add_option("--max-graph-rank", limits.max_graph_rank, "rank of any value of a graph model")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{16}));
  app.add_option("--max-activation-bytes", limits.max_activation_bytes,
                 "activation memory one call may use")
      ->capture_default_str();
  app.add_option("--max-stream-bytes", limits.max_stream_bytes,
                 "state one StreamGradients stream may hold: parameters, accumulator, chunks")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  app.add_option("--max-streams", limits.max_streams, "StreamGradients streams open at once")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  app.add_option("--max-queue-per-client", options.service.max_queue_per_client,
                 "calls one client (IP address) may have waiting for cores")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--max-streams-per-client", limits.max_streams_per_client,
                 "StreamGradients streams one client (IP address) may hold open")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  app.add_option("--stream-idle-seconds", limits.stream_idle_seconds,
                 "a stream waiting this long for its client's next message is closed")
      ->capture_default_str()
      ->check(CLI::Range(0.01, 1e6));
  app.add_option("--max-call-flops", limits.max_call_flops,
                 "largest estimated compute of one call (6*batch*in*out per Linear layer; "
                 "CheckGradients adds its samples' forward passes); larger calls are refused")
      ->capture_default_str()
      ->check(CLI::Range(1.0, 1e30));
  app.add_option("--max-call-seconds", limits.max_call_seconds,
                 "longest a call (or stream step) may take, queue included: the deadline of "
                 "calls without one, and a cap on later ones")
      ->capture_default_str()
      ->check(CLI::Range(0.001, 1e7));
  app.add_option("--max-memory-bytes", limits.max_memory_bytes,
                 "memory all calls together may hold: requests, answers until taken, "
                 "activations, streams' state; gRPC's own buffers get as much again (default: 40% "
                 "of the container's memory limit, or of the machine's memory)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1} << 20, int64_t{1} << 50));
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, critical or off")
      ->capture_default_str()
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}));
  app.add_option("--drain-delay", drain_seconds,
                 "seconds between SIGTERM and refusing new calls, with health NOT_SERVING, so "
                 "load balancers stop routing here first (set it above the probe period)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
  app.add_option("--shutdown-grace", grace_seconds,
                 "seconds calls in flight get to finish after SIGTERM")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
  app.add_option("--tls-cert", options.security.tls_cert_file,
                 "PEM certificate chain of the server: serve TLS (with --tls-key)");
  app.add_option("--tls-key", options.security.tls_key_file, "PEM private key of --tls-cert");
  app.add_option("--tls-client-ca", options.security.tls_client_ca_file,
                 "PEM CA certificates: mutual TLS, clients must present a certificate they signed");
  app.add_option("--auth-token-file", auth_token_file,
                 "file holding the bearer token every GradientService call must carry (trailing "
                 "newline ignored; default: $GRADSERVE_AUTH_TOKEN if set; health stays open)");
  app.add_option("--metrics-listen", options.metrics_listen_address,
                 "address of a Prometheus endpoint, GET /metrics over plain HTTP, no token, in "
                 "the forms of --listen (a bare port binds 127.0.0.1; default: none)");
  CLI11_PARSE(app, argc, argv);

  spdlog::set_level(spdlog::level::from_str(log_level));
  gpr_set_log_function(LogGrpcThroughSpdlog);
  // Configuration errors exit 2 before anything starts.
  absl::Status status = ResolveSecurity(auth_token_file, &options.security);
  if (status.ok()) status = ResolveAddress("--listen", &options.listen_address);
  for (std::string& address : options.also_listen_addresses) {
    if (status.ok()) status = ResolveAddress("--also-listen", &address);
  }
  if (status.ok() && !options.metrics_listen_address.empty()) {
    status = ResolveAddress("--metrics-listen", &options.metrics_listen_address);
  }
  if (!status.ok()) {
    spdlog::critical("{}", std::string(status.message()));
    return 2;
  }
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
    // INVALID_ARGUMENT: a certificate or key file that cannot be used, like the errors above;
    // UNAVAILABLE: an address that cannot be bound (a port in use, say).
    return absl::IsInvalidArgument(server.status()) ? 2 : 1;
  }
  spdlog::info(
      "gradserve {} listening on {} (port {}); {} compute threads, calls under {:g} flops "
      "on one, max message {} bytes, float32 GEMMs on {}",
      GRADSERVE_VERSION, options.listen_address, (*server)->port(), options.service.threads,
      options.service.parallel_threshold_flops, limits.max_message_bytes,
      gradserve::engine::GemmKernel());
  spdlog::info(
      "limits: memory {} bytes for all calls, {:g} flops and {:g} s a call, {} waiting calls "
      "({} a client), {} streams ({} a client, closed after {:g} s idle)",
      limits.max_memory_bytes, limits.max_call_flops, limits.max_call_seconds,
      options.service.max_queue, options.service.max_queue_per_client, limits.max_streams,
      limits.max_streams_per_client, limits.stream_idle_seconds);

  if ((*server)->metrics_port() != 0) {
    spdlog::info("Prometheus metrics on http://{}/metrics (port {})",
                 options.metrics_listen_address, (*server)->metrics_port());
  }

  const auto& security = options.security;
  const bool tls = !security.tls_cert_file.empty();
  spdlog::info("security: {}; bearer token {}",
               !tls                                  ? "plaintext (no TLS)"
               : security.tls_client_ca_file.empty() ? "TLS"
                                                     : "mutual TLS (client certificates required)",
               security.auth_token.empty() ? "off" : "required (health and reflection exempt)");
  if (!tls && !security.auth_token.empty()) {
    spdlog::warn(
        "the bearer token travels in plaintext: use TLS unless a trusted network or a "
        "TLS-terminating proxy protects this port");
  }

  int signal = 0;
  sigwait(&stop_signals, &signal);
  spdlog::info(
      "received {}; health NOT_SERVING, refusing new calls in {} s, then {} s for "
      "calls in flight",
      signal == SIGINT ? "SIGINT" : "SIGTERM", drain_seconds, grace_seconds);
  (*server)->StartDraining();
  std::this_thread::sleep_for(
      std::chrono::milliseconds(static_cast<int64_t>(drain_seconds * 1000)));
  (*server)->Shutdown(std::chrono::milliseconds(static_cast<int64_t>(grace_seconds * 1000)));
  server->reset();
  grpc_shutdown();
  spdlog::info("stopped");
  return 0;
}
