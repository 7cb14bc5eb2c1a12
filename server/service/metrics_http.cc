#include "server/service/metrics_http.h"

#include <httplib.h>
#include <sys/socket.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "server/service/listen_address.h"

namespace gradserve::service {
MetricsHttpServer::MetricsHttpServer() = default;

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, std::function<std::string()> render) {
  absl::StatusOr<HostPort> host_port = ParseListenAddress(address, "metrics address");
  if (!host_port.ok()) return host_port.status();
  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer());
  server->http_ = std::make_unique<httplib::Server>();
  httplib::Server& http = *server->http_;
  // Scrapes are rare and quick: two threads, not one per core.
  http.new_task_queue = [] { return new httplib::ThreadPool(2); };
  // httplib's default sets SO_REUSEPORT, with which a second server on this port would start
  // and take half of the scrapes; SO_REUSEADDR only lets a restart bind over TIME_WAIT.
  http.set_socket_options([](socket_t sock) {
    const int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
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
    if (std::string why = DescribeBindFailure(*host_port); !why.empty()) {
      return absl::UnavailableError(absl::StrCat("could not listen for metrics: ", why));
    }
    return absl::UnavailableError(
        absl::StrCat("could not listen for metrics on ", host_port->ToString()));
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
