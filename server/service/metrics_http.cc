#include "server/service/metrics_http.h"

#include <httplib.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "server/service/listen_address.h"

namespace gradserve::service {
namespace {

// Note [Slow metrics clients]
// cpp-httplib 0.11 serves each connection on one pool thread, and its read timeout bounds each
// recv(), not a request: a client sending one header byte a second (or idling between
// keep-alive requests) holds its thread for as long as it likes, and once every thread is held
// scrapes queue behind them for good (two such connections stopped every scrape when the pool
// had two threads). A larger pool alone only raises the number of connections an attacker
// needs. So each connection gets deadlines instead: the whole request must arrive within
// MetricsHttpOptions::request_timeout and the answer must be taken within response_timeout
// after that, whatever the pace of the bytes, and then the connection is closed. With that, a
// thread is held for a bounded time, and the pool (32 threads, idle ones cost a stack each) is
// larger than any handful of slow clients, so a scrape normally waits for nobody and at worst
// for one round of deadlines. One request per connection: keep-alive would let an idle
// connection hold a thread between requests, and a scrape every few seconds gains nothing from
// it. httplib has no per-request deadline of its own, hence this Stream and the override of
// process_and_close_socket (the hook httplib's own SSLServer overrides) around process_request.

using Clock = std::chrono::steady_clock;

// A connected socket whose reads stop at one deadline (or when `stopping` is set) and writes at
// another, and whose reads stop after max_read_bytes.
class DeadlineStream final : public httplib::Stream {
 public:
  DeadlineStream(int sock, Clock::time_point read_deadline, Clock::time_point write_deadline,
                 int64_t max_read_bytes, const std::atomic<bool>& stopping)
      : sock_(sock),
        read_deadline_(read_deadline),
        write_deadline_(write_deadline),
        read_budget_(max_read_bytes),
        stopping_(stopping) {}

  bool is_readable() const override { return buffered_ < filled_ || Wait(POLLIN, read_deadline_); }
  bool is_writable() const override { return Wait(POLLOUT, write_deadline_); }

  ssize_t read(char* ptr, size_t size) override {
    if (buffered_ == filled_) {
      buffered_ = filled_ = 0;
      const size_t want = static_cast<size_t>(
          std::min<int64_t>(static_cast<int64_t>(sizeof(buffer_)), read_budget_));
      if (want == 0) return -1;  // Over max_request_bytes.
      while (true) {
        if (!Wait(POLLIN, read_deadline_)) return -1;
        const ssize_t n = recv(sock_, buffer_, want, MSG_DONTWAIT);
        if (n > 0) {
          filled_ = static_cast<size_t>(n);
          read_budget_ -= n;
          break;
        }
        if (n == 0) return 0;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -1;
      }
    }
    const size_t n = std::min(size, filled_ - buffered_);
    std::copy_n(buffer_ + buffered_, n, ptr);
    buffered_ += n;
    return static_cast<ssize_t>(n);
  }

  ssize_t write(const char* ptr, size_t size) override {
    while (true) {
      if (!Wait(POLLOUT, write_deadline_)) return -1;
      const ssize_t n = send(sock_, ptr, size, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n >= 0) return n;
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -1;
    }
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    sockaddr_storage address{};
    socklen_t length = sizeof(address);
    if (getpeername(sock_, reinterpret_cast<sockaddr*>(&address), &length) == 0) {
      Numeric(address, length, ip, port);
    }
  }
  void get_local_ip_and_port(std::string& ip, int& port) const override {
    sockaddr_storage address{};
    socklen_t length = sizeof(address);
    if (getsockname(sock_, reinterpret_cast<sockaddr*>(&address), &length) == 0) {
      Numeric(address, length, ip, port);
    }
  }
  int socket() const override { return sock_; }

 private:
  // Waits until `events` is ready or the deadline passes; a read also stops waiting when the
  // server stops (polling in slices to notice), so that Stop() need not wait out a trickling
  // request, while an answer already being written still gets its time.
  bool Wait(short events, Clock::time_point deadline) const {
    while (events != POLLIN || !stopping_) {
      const auto left =
          std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return false;
      pollfd fd{sock_, events, 0};
      const int ready = poll(&fd, 1, static_cast<int>(std::min<int64_t>(left, 100)));
      if (ready > 0) return (fd.revents & (events | POLLHUP | POLLERR)) != 0;
      if (ready < 0 && errno != EINTR) return false;
    }
    return false;
  }

  static void Numeric(const sockaddr_storage& address, socklen_t length, std::string& ip,
                      int& port) {
    char host[NI_MAXHOST];
    char service[NI_MAXSERV];
    if (getnameinfo(reinterpret_cast<const sockaddr*>(&address), length, host, sizeof(host),
                    service, sizeof(service), NI_NUMERICHOST | NI_NUMERICSERV) == 0) {
      ip = host;
      port = std::atoi(service);
    }
  }

  const int sock_;
  const Clock::time_point read_deadline_;
  const Clock::time_point write_deadline_;
  int64_t read_budget_;
  const std::atomic<bool>& stopping_;
  char buffer_[4096];
  size_t buffered_ = 0;  // Bytes of buffer_ already handed out.
  size_t filled_ = 0;    // Bytes in buffer_.
};

// httplib::Server with one request per connection under DeadlineStream's deadlines.
class DeadlineHttpServer final : public httplib::Server {
 public:
  DeadlineHttpServer(const MetricsHttpOptions& options, const std::atomic<bool>& stopping)
      : options_(options), stopping_(stopping) {}

 private:
  bool process_and_close_socket(socket_t sock) override {
    const Clock::time_point start = Clock::now();
    DeadlineStream stream(sock, start + options_.request_timeout,
                          start + options_.request_timeout + options_.response_timeout,
                          options_.max_request_bytes, stopping_);
    bool connection_closed = false;
    const bool ok = process_request(stream, /*close_connection=*/true, connection_closed, nullptr);
    shutdown(sock, SHUT_RDWR);
    close(sock);
    return ok;
  }

  const MetricsHttpOptions options_;
  const std::atomic<bool>& stopping_;
};

}  // namespace

MetricsHttpServer::MetricsHttpServer() = default;

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, std::function<std::string()> render,
    const MetricsHttpOptions& options) {
  absl::StatusOr<HostPort> host_port = ParseListenAddress(address, "metrics address");
  if (!host_port.ok()) return host_port.status();
  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer());
  server->http_ = std::make_unique<DeadlineHttpServer>(options, server->stopping_);
  httplib::Server& http = *server->http_;
  const size_t threads = static_cast<size_t>(std::max(options.threads, 1));
  http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
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
  // has finished the connections it holds; stopping_ cuts short those still sending a request.
  stopping_ = true;
  http_->stop();
  listener_.join();
}

}  // namespace gradserve::service
