#include "server/service/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <climits>

#include "absl/strings/str_cat.h"

namespace gradserve::service {
namespace {

constexpr char kServiceName[] = "gradserve.v1.GradientService";

int ClampToInt(int64_t bytes) { return static_cast<int>(std::min<int64_t>(bytes, INT_MAX)); }

}  // namespace

absl::StatusOr<std::unique_ptr<GradServer>> GradServer::Start(const ServerOptions& options) {
  grpc::EnableDefaultHealthCheckService(true);
  // Debian links with --as-needed: without this call the reflection library is dropped.
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  std::unique_ptr<GradServer> server(new GradServer());
  server->service_ = std::make_unique<GradientServiceImpl>(options.service);
  server->max_message_bytes_ = options.service.limits.max_message_bytes;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, grpc::InsecureServerCredentials(),
                           &server->port_);
  builder.SetMaxReceiveMessageSize(ClampToInt(server->max_message_bytes_));
  builder.SetMaxSendMessageSize(ClampToInt(server->max_message_bytes_));
  builder.RegisterService(server->service_.get());
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("could not listen on ", options.listen_address,
                     " (address in use, or not an address of this machine?)"));
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

void GradServer::Shutdown(std::chrono::milliseconds grace) {
  if (server_ == nullptr) return;
  if (grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService()) {
    health->SetServingStatus("", false);
    health->SetServingStatus(kServiceName, false);
  }
  server_->Shutdown(std::chrono::system_clock::now() + grace);
  server_->Wait();
  server_.reset();
}

}  // namespace gradserve::service
