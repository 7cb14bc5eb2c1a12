// The optional Prometheus endpoint: GET /metrics over plain HTTP/1.1, served by cpp-httplib on
// its own threads (never gRPC's or the compute cores').
#ifndef GRADSERVE_SERVICE_METRICS_HTTP_H_
#define GRADSERVE_SERVICE_METRICS_HTTP_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace httplib {
class Server;
}

namespace gradserve::service {

// The exposition's Content-Type (Prometheus text format 0.0.4).
inline constexpr char kPrometheusContentType[] = "text/plain; version=0.0.4; charset=utf-8";

class MetricsHttpServer {
 public:
  // Binds `address` and serves GET /metrics with the text `render` returns, called once per
  // scrape on an HTTP thread (so it must be thread-safe); every other path or method gets 404.
  // `address` is HOST:PORT, [IPV6]:PORT, :PORT or PORT (see ParseListenAddress); without a host
  // it binds 127.0.0.1, and port 0 picks a free one (see port()). The port is not shared (no
  // SO_REUSEPORT). INVALID_ARGUMENT for an address that does not parse, UNAVAILABLE (naming the
  // address and the cause) if it cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::function<std::string()> render);
  // Stops.
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  int port() const { return port_; }
  // Stops listening, lets scrapes in progress finish and joins the threads. Idempotent.
  void Stop();

 private:
  MetricsHttpServer();

  std::unique_ptr<httplib::Server> http_;
  std::thread listener_;
  std::atomic<bool> listener_done_{false};
  int port_ = 0;
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_METRICS_HTTP_H_
