// Builds and runs the gRPC server: GradientService, the standard health service and server
// reflection, with message limits raised to ServiceLimits::max_message_bytes, over plaintext,
// TLS or mutual TLS, with an optional bearer token on GradientService calls.
#ifndef GRADSERVE_SERVICE_SERVER_H_
#define GRADSERVE_SERVICE_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/service/auth.h"
#include "server/service/gradient_service.h"
#include "server/service/metrics_http.h"

namespace gradserve::service {

// Transport security and authentication. All empty: plaintext, no token (the default).
struct SecurityOptions {
  // PEM files of the server's certificate chain and private key: TLS on. Both or neither.
  std::string tls_cert_file;
  std::string tls_key_file;
  // PEM file of the CA certificates client certificates must chain to: mutual TLS, where a client
  // without a valid certificate fails the handshake. Requires TLS.
  std::string tls_client_ca_file;
  // The bearer token every GradientService call must carry ("authorization: Bearer <token>");
  // empty: no check. Health and reflection stay open (see AuthenticatingGradientService).
  std::string auth_token;
};

// How long connections live and what each may carry.
struct ConnectionOptions {
  // Calls (HTTP/2 streams) open at once on one connection; more wait in the client.
  int max_concurrent_streams = 64;
  // The server pings an idle connection this often and drops it if no answer comes in time:
  // clients that vanished without closing free what they held.
  int keepalive_ms = 60'000;
  int keepalive_timeout_ms = 20'000;
  // A connection without calls for this long is closed (GOAWAY; clients reconnect as needed).
  int max_idle_ms = 10 * 60'000;
  // Every connection is closed after this long, with max_age_grace_ms for its calls to end: a
  // client that never reads its answers holds them no longer, and clients re-resolve and
  // rebalance across replicas (Kubernetes scale-out).
  int max_age_ms = 30 * 60'000;
  int max_age_grace_ms = 5 * 60'000;
};

struct ServerOptions {
  // HOST:PORT, [IPV6]:PORT, :PORT or PORT (see ParseListenAddress); without a host it binds
  // 127.0.0.1, and port 0 picks a free one (see GradServer::port()). Loopback by default:
  // serving every interface (0.0.0.0:PORT) is an explicit choice.
  std::string listen_address = "127.0.0.1:50051";
  // More addresses to serve on, in the same forms (e.g. [::1]:50051 beside 127.0.0.1:50051).
  std::vector<std::string> also_listen_addresses;
  SecurityOptions security;
  ServiceOptions service;
  ConnectionOptions connections;
  // Address of the Prometheus endpoint (GET /metrics over plain HTTP), in the same forms as
  // listen_address; empty: none (the default). Port 0 picks a free one (see
  // GradServer::metrics_port()). Not behind the bearer token or TLS: bind it where only the
  // scraper can reach it.
  std::string metrics_listen_address;
};

class GradServer {
 public:
  // Binds and starts serving. INVALID_ARGUMENT if the security options do not fit together, a
  // certificate or key file cannot be read or holds no PEM block, or an address does not parse;
  // UNAVAILABLE, naming the address and the cause, if an address cannot be bound (neither
  // listener shares its port: a port another process listens on fails here), or if gRPC
  // rejects the certificate and key.
  static absl::StatusOr<std::unique_ptr<GradServer>> Start(const ServerOptions& options);
  ~GradServer();

  int port() const { return port_; }
  // The ports of ServerOptions::also_listen_addresses, in their order.
  const std::vector<int>& also_ports() const { return also_ports_; }
  // The Prometheus endpoint's port; 0 if there is none.
  int metrics_port() const { return metrics_http_ == nullptr ? 0 : metrics_http_->port(); }
  // What GetStats reports.
  MetricsSnapshot Stats() const { return service_->Stats(); }
  // Calls received in full and not yet answered.
  int calls_in_flight() const;
  // A channel to this server that skips the network stack (tests, benchmarks). It bypasses TLS;
  // the bearer token is still checked.
  std::shared_ptr<grpc::Channel> InProcessChannel();
  // Marks health NOT_SERVING ("" and the service) while still serving calls, so that load
  // balancers stop sending new ones before the server stops accepting them.
  void StartDraining();
  // What Shutdown does first: every new call gets UNAVAILABLE from here on (Note [Shutdown]).
  void RefuseNewCalls() { service_->RefuseNewCalls(); }
  // Marks health NOT_SERVING, stops accepting calls, lets calls in flight finish for up to
  // `grace`, then cancels the rest, and stops the metrics endpoint last (scrapes see the drain).
  // Idempotent.
  void Shutdown(std::chrono::milliseconds grace);

 private:
  GradServer() = default;

  std::unique_ptr<GradientServiceImpl> service_;
  std::unique_ptr<AuthenticatingGradientService> authenticated_service_;  // Wraps service_.
  std::unique_ptr<grpc::Server> server_;
  // After service_: destroyed first, as it reads service_'s metrics.
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  int port_ = 0;
  std::vector<int> also_ports_;
  int64_t max_message_bytes_ = 0;
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_SERVER_H_
