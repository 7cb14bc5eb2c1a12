#include "server/service/metrics_http.h"

#include <httplib.h>

#include <charconv>
#include <chrono>

#include "absl/strings/str_cat.h"

namespace gradserve::service {
namespace {

struct HostPort {
  std::string host;
  int port = 0;
};

absl::StatusOr<HostPort> ParseAddress(const std::string& address) {
  const auto invalid = [&address] {
    return absl::InvalidArgumentError(absl::StrCat(
        "metrics address \"", address, "\": expected HOST:PORT, [IPV6]:PORT, :PORT or PORT"));
  };
  HostPort out;
  std::string port;
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) {
    out.host = "127.0.0.1";
    port = address;
  } else {
    out.host = address.substr(0, colon);
    port = address.substr(colon + 1);
    if (out.host.size() >= 2 && out.host.front() == '[' && out.host.back() == ']') {
      out.host = out.host.substr(1, out.host.size() - 2);
    } else if (out.host.find(':') != std::string::npos) {
      return invalid();  // An IPv6 address needs its brackets.
    }
    if (out.host.empty()) out.host = "127.0.0.1";
  }
  const auto [end, error] = std::from_chars(port.data(), port.data() + port.size(), out.port);
  if (port.empty() || error != std::errc() || end != port.data() + port.size() || out.port < 0 ||
      out.port > 65535) {
    return invalid();
  }
  return out;
}

}  // namespace

MetricsHttpServer::MetricsHttpServer() = default;

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, std::function<std::string()> render) {
  absl::StatusOr<HostPort> host_port = ParseAddress(address);
  if (!host_port.ok()) return host_port.status();
  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer());
  server->http_ = std::make_unique<httplib::Server>();
  httplib::Server& http = *server->http_;
  // Scrapes are rare and quick: two threads, not one per core.
  http.new_task_queue = [] { return new httplib::ThreadPool(2); };
  http.Get("/metrics",
           [render = std::move(render)](const httplib::Request&, httplib::Response& response) {
             response.set_content(render(), kPrometheusContentType);
           });
  // GET (and HEAD) /metrics only: everything else is 404, whatever the method.
  http.set_pre_routing_handler([](const httplib::Request& request, httplib::Response& response) {
    if ((request.method == "GET" || request.method == "HEAD") && request.path == "/metrics") {
      return httplib::Server::HandlerResponse::Unhandled;
    }
    response.status = 404;
    response.set_content("not found: this server serves GET /metrics only\n", "text/plain");
    return httplib::Server::HandlerResponse::Handled;
  });
  if (host_port->port == 0) {
    server->port_ = http.bind_to_any_port(host_port->host);
    if (server->port_ <= 0) server->port_ = 0;
  } else if (http.bind_to_port(host_port->host, host_port->port)) {
    server->port_ = host_port->port;
  }
  if (server->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("could not listen for metrics on ", address,
                     " (address in use, or not an address of this machine?)"));
  }
  MetricsHttpServer* self = server.get();
  server->listener_ = std::thread([self] {
    self->http_->listen_after_bind();
    self->listener_done_ = true;
  });
  // stop() does nothing before the listener runs (this cpp-httplib has no wait_until_ready), so
  // wait for it: Stop() could otherwise leave the thread listening forever.
  while (!http.is_running() && !server->listener_done_)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return server;
}

MetricsHttpServer::~MetricsHttpServer() { Stop(); }

void MetricsHttpServer::Stop() {
  if (!listener_.joinable()) return;
  // stop() closes the listening socket; listen_after_bind() then returns once the thread pool
  // has finished the requests it holds.
  http_->stop();
  listener_.join();
}

}  // namespace gradserve::service
