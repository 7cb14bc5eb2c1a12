// The transport floor: a gRPC callback-API server whose one method sends back as many bytes as
// it is asked for (copied from the request, as an echo does). bench/run.sh starts it next to
// gradserve and times both from one client.
//
//   gradserve_echo_server [--listen 127.0.0.1:0]
//
// Prints "echo listening on 127.0.0.1:0 (port N)" once serving; SIGTERM or SIGINT stops it.
#include <grpc/grpc.h>
#include <grpcpp/grpcpp.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>

#include "echo/echo.grpc.pb.h"

namespace {

constexpr int kMaxMessageBytes = 256 << 20;

class EchoService final : public gradserve::bench::Echo::CallbackService {
  grpc::ServerUnaryReactor* Echo(grpc::CallbackServerContext* context,
                                 const gradserve::bench::EchoRequest* request,
                                 gradserve::bench::EchoReply* reply) override {
    const std::string& in = request->payload();
    if (request->reply_bytes() < 0) {
      reply->set_payload(in);
    } else {
      const size_t n = static_cast<size_t>(request->reply_bytes());
      std::string* out = reply->mutable_payload();
      out->assign(in, 0, std::min(n, in.size()));
      out->resize(n, '\0');
    }
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::string listen = "127.0.0.1:0";
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--listen") == 0 && i + 1 < argc) {
      listen = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--listen HOST:PORT]\n", argv[0]);
      return 2;
    }
  }
  // Stop on SIGTERM/SIGINT: block them here (threads gRPC starts inherit the mask) and wait.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  grpc_init();  // Held for the whole process (see shared notes: ~Server() can otherwise stall).
  EchoService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::fprintf(stderr, "echo: cannot listen on %s\n", listen.c_str());
    return 1;
  }
  std::printf("echo listening on %s (port %d)\n", listen.c_str(), port);
  std::fflush(stdout);

  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  server->Wait();
  return 0;
}
