#include "server/service/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/resource_quota.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <iterator>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/service/listen_address.h"

namespace gradserve::service {
namespace {

constexpr char kServiceName[] = "gradserve.v1.GradientService";

int ClampToInt(int64_t bytes) { return static_cast<int>(std::min<int64_t>(bytes, INT_MAX)); }

// The content of a PEM file; `what` names it in errors. Only the form is checked here (a PEM
// block is present): gRPC parses the certificates and keys themselves when the port is bound.
absl::StatusOr<std::string> ReadPemFile(const char* what, const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": cannot read ", path, ": ", std::strerror(errno)));
  }
  std::string pem((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (file.bad()) return absl::InvalidArgumentError(absl::StrCat(what, ": cannot read ", path));
  if (!absl::StrContains(pem, "-----BEGIN ")) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", path, " holds no PEM block"));
  }
  return pem;
}

// Plaintext when no certificate is given; TLS with one; mutual TLS with a client CA as well.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const SecurityOptions& security) {
  if (security.tls_cert_file.empty() != security.tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        "a TLS certificate needs its private key and a key its certificate: set both or neither");
  }
  if (security.tls_cert_file.empty()) {
    if (!security.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "a client CA (mutual TLS) needs TLS: set the server certificate and key too");
    }
    return grpc::InsecureServerCredentials();
  }
  absl::StatusOr<std::string> cert = ReadPemFile("TLS certificate", security.tls_cert_file);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPemFile("TLS private key", security.tls_key_file);
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions ssl(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  ssl.pem_key_cert_pairs.push_back({*std::move(key), *std::move(cert)});
  if (!security.tls_client_ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadPemFile("TLS client CA", security.tls_client_ca_file);
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *std::move(ca);
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::unique_ptr<GradServer>> GradServer::Start(const ServerOptions& options) {
  grpc::EnableDefaultHealthCheckService(true);
  // Debian links with --as-needed: without this call the reflection library is dropped.
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  absl::StatusOr<HostPort> listen = ParseListenAddress(options.listen_address, "listen address");
  if (!listen.ok()) return listen.status();
  std::vector<HostPort> also_listen;
  for (const std::string& address : options.also_listen_addresses) {
    absl::StatusOr<HostPort> parsed = ParseListenAddress(address, "also-listen address");
    if (!parsed.ok()) return parsed.status();
    also_listen.push_back(*std::move(parsed));
  }
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      ServerCredentials(options.security);
  if (!credentials.ok()) return credentials.status();

  std::unique_ptr<GradServer> server(new GradServer());
  server->service_ = std::make_unique<GradientServiceImpl>(options.service);
  // Registered in place of service_, with or without a token, so that every GradientService
  // method goes through it (Note [Bearer token check]).
  GradientServiceImpl* service = server->service_.get();
  server->authenticated_service_ = std::make_unique<AuthenticatingGradientService>(
      service, options.security.auth_token,
      [service](const char* method) { service->RecordUnauthenticated(method); });
  server->max_message_bytes_ = options.service.limits.max_message_bytes;
  grpc::ServerBuilder builder;
  // Without SO_REUSEPORT a second server on a busy port fails to bind, instead of starting and
  // silently taking half of the calls (Linux spreads connections over every SO_REUSEPORT
  // listener of the same user).
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  // What gRPC buffers before a handler runs (requests arriving, answers not yet read) is
  // bounded by its quota; the service accounts for the rest (Note [Memory budget]).
  grpc::ResourceQuota quota("gradserve");
  quota.Resize(static_cast<size_t>(options.service.limits.max_memory_bytes));
  builder.SetResourceQuota(quota);
  const ConnectionOptions& connections = options.connections;
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, connections.max_concurrent_streams);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, connections.keepalive_ms);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, connections.keepalive_timeout_ms);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, connections.max_idle_ms);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, connections.max_age_ms);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, connections.max_age_grace_ms);
  builder.AddListeningPort(listen->ToString(), *credentials, &server->port_);
  std::vector<int>& also_ports = server->also_ports_;
  also_ports.assign(also_listen.size(), 0);
  for (size_t i = 0; i < also_listen.size(); ++i) {
    builder.AddListeningPort(also_listen[i].ToString(), *credentials, &also_ports[i]);
  }
  builder.SetMaxReceiveMessageSize(ClampToInt(server->max_message_bytes_));
  builder.SetMaxSendMessageSize(ClampToInt(server->max_message_bytes_));
  builder.RegisterService(server->authenticated_service_.get());
  builder.RegisterCallbackGenericService(server->authenticated_service_->generic_calls());
  server->server_ = builder.BuildAndStart();
  const bool some_port_failed =
      server->port_ == 0 || std::find(also_ports.begin(), also_ports.end(), 0) != also_ports.end();
  if (server->server_ == nullptr || some_port_failed) {
    // gRPC says only that no port could be added: find out whether an address is the cause.
    server->server_.reset();
    also_listen.insert(also_listen.begin(), *listen);
    for (const HostPort& address : also_listen) {
      if (std::string why = DescribeBindFailure(address); !why.empty()) {
        return absl::UnavailableError(absl::StrCat("could not listen for gRPC calls: ", why));
      }
    }
    const bool tls = !options.security.tls_cert_file.empty();
    return absl::UnavailableError(
        absl::StrCat("could not listen on ", listen->ToString(),
                     tls ? " (a TLS certificate and key gRPC cannot use together?)" : ""));
  }
  if (!options.metrics_listen_address.empty()) {
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> metrics = MetricsHttpServer::Start(
        options.metrics_listen_address, [service] { return PrometheusText(service->Stats()); });
    if (!metrics.ok()) return metrics.status();  // ~GradServer stops the gRPC server.
    server->metrics_http_ = *std::move(metrics);
  }
  grpc::HealthCheckServiceInterface* health = server->server_->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus(kServiceName, true);
  return server;
}

GradServer::~GradServer() { Shutdown(std::chrono::milliseconds(0)); }

std::shared_ptr<grpc::Channel> GradServer::InProcessChannel() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(ClampToInt(max_message_bytes_));
  args.SetMaxSendMessageSize(ClampToInt(max_message_bytes_));
  return server_->InProcessChannel(args);
}

int GradServer::calls_in_flight() const { return service_->calls_in_flight(); }

void GradServer::StartDraining() {
  if (server_ == nullptr) return;
  if (grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService()) {
    health->SetServingStatus("", false);
    health->SetServingStatus(kServiceName, false);
  }
}

void GradServer::Shutdown(std::chrono::milliseconds grace) {
  // Note [Shutdown]. gRPC's own Shutdown cancels calls that arrive on open connections after it
  // began (the client sees CANCELLED and cannot tell whether to retry), so the service refuses
  // new calls itself with UNAVAILABLE, which clients' retry policy sends to another replica,
  // while the calls in flight get the grace. Only when they are done (or the grace is over) does
  // gRPC shut down, by which time clients have seen the health change and the refusals.
  if (server_ == nullptr) return;
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  const Clock::time_point end = start + grace;
  // Calls still running when this much of the grace is left are abandoned (they end with
  // UNAVAILABLE at their next check), so that their status is sent before gRPC cancels them.
  const auto abandon_at =
      end - std::min<Clock::duration>(std::chrono::milliseconds(250), grace / 2);
  // Refusals keep going at least this long even when nothing is in flight: a client's call sent
  // just before the refusals began still gets UNAVAILABLE, not gRPC's CANCELLED.
  const auto refuse_until =
      start + std::min<Clock::duration>(std::chrono::milliseconds(500), grace);
  StartDraining();
  service_->RefuseNewCalls();
  while (Clock::now() < abandon_at &&
         (Clock::now() < refuse_until || service_->calls_in_flight() > 0 ||
          service_->open_streams() > 0)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  service_->AbandonCalls();
  while (Clock::now() < end && (service_->calls_in_flight() > 0 || service_->open_streams() > 0)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  server_->Shutdown(std::chrono::system_clock::now() +
                    std::max<Clock::duration>(Clock::duration::zero(), end - Clock::now()));
  server_->Wait();
  server_.reset();
  if (metrics_http_ != nullptr) metrics_http_->Stop();
}

}  // namespace gradserve::service
