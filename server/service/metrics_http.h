// The optional Prometheus endpoint: GET /metrics over plain HTTP/1.1, served by cpp-httplib on
// its own threads (never gRPC's or the compute cores').
#ifndef GRADSERVE_SERVICE_METRICS_HTTP_H_
#define GRADSERVE_SERVICE_METRICS_HTTP_H_

#include <atomic>
#include <chrono>
#include <cstdint>
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

// How the endpoint holds out against slow or idle clients (Note [Slow metrics clients] in
// metrics_http.cc). The defaults are what GradServer uses; tests shorten the timeouts.
struct MetricsHttpOptions {
  // Threads serving connections, one connection each: this many slow clients at once still
  // leave a scrape waiting for nobody.
  int threads = 32;
  // A connection must deliver its whole request (request line and headers) within this long of
  // a thread taking it up, however it trickles; then it is closed.
  std::chrono::milliseconds request_timeout{5000};
  // And must take the whole answer within this long of the request's deadline.
  std::chrono::milliseconds response_timeout{5000};
  // Bytes a request (request line, headers, any body) may have; then it is closed.
  int64_t max_request_bytes = 64 << 10;
};

class MetricsHttpServer {
 public:
  // Binds `address` and serves GET /metrics with the text `render` returns, called once per
  // scrape on an HTTP thread (so it must be thread-safe); every other path or method gets 404.
  // One request per connection ("Connection: close"). `address` is HOST:PORT, [IPV6]:PORT,
  // :PORT or PORT (see ParseListenAddress); without a host it binds 127.0.0.1, and port 0 picks
  // a free one (see port()). The port is not shared (no SO_REUSEPORT). INVALID_ARGUMENT for an
  // address that does not parse, UNAVAILABLE (naming the address and the cause) if it cannot be
  // bound.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::function<std::string()> render,
      const MetricsHttpOptions& options = {});
  // Stops.
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  int port() const { return port_; }
  // Stops listening, lets scrapes in progress finish, closes connections still sending their
  // request and joins the threads. Idempotent.
  void Stop();

 private:
  MetricsHttpServer();

  std::unique_ptr<httplib::Server> http_;
  std::thread listener_;
  std::atomic<bool> listener_done_{false};
  std::atomic<bool> stopping_{false};  // Read by the connections' threads.
  int port_ = 0;
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_METRICS_HTTP_H_
