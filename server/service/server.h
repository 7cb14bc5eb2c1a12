// Builds and runs the gRPC server: GradientService, the standard health service and server
// reflection, with message limits raised to ServiceLimits::max_message_bytes.
#ifndef GRADSERVE_SERVICE_SERVER_H_
#define GRADSERVE_SERVICE_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/service/gradient_service.h"

namespace gradserve::service {

struct ServerOptions {
  // host:port; port 0 picks a free one (see GradServer::port()).
  std::string listen_address = "127.0.0.1:50051";
  ServiceOptions service;
};

class GradServer {
 public:
  // Binds and starts serving. UNAVAILABLE if the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<GradServer>> Start(const ServerOptions& options);
  ~GradServer();

  int port() const { return port_; }
  // A channel to this server that skips the network stack (tests, benchmarks).
  std::shared_ptr<grpc::Channel> InProcessChannel();
  // Marks health NOT_SERVING, stops accepting calls, lets calls in flight finish for up to
  // `grace`, then cancels the rest. Idempotent.
  void Shutdown(std::chrono::milliseconds grace);

 private:
  GradServer() = default;

  std::unique_ptr<GradientServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  int64_t max_message_bytes_ = 0;
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_SERVER_H_
