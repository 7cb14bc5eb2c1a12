// A call that sends its headers and then nothing: no message, no half-close, until cancelled.
// What a client's call looks like to the server while its large message is still on the way.
#ifndef GRADSERVE_TESTS_SERVICE_HEADERS_ONLY_CALL_H_
#define GRADSERVE_TESTS_SERVICE_HEADERS_ONLY_CALL_H_

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <future>
#include <string>

namespace gradserve::testing {

class HeadersOnlyCall final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  // Starts a call of `method` ("/gradserve.v1.GradientService/ComputeGradients") on `channel`
  // with `token` (if not empty) as its bearer token and a deadline `seconds` away.
  HeadersOnlyCall(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                  const std::string& token = "", int seconds = 30)
      : stub_(channel), status_(done_.get_future()) {
    context_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
    if (!token.empty()) context_.AddMetadata("authorization", "Bearer " + token);
    stub_.PrepareBidiStreamingCall(&context_, method, grpc::StubOptions(), this);
    StartCall();
  }
  ~HeadersOnlyCall() override {
    context_.TryCancel();
    status_.wait();
  }

  // Whether the server ended the call within `timeout`.
  bool EndsWithin(std::chrono::milliseconds timeout) {
    return status_.wait_for(timeout) == std::future_status::ready;
  }
  // The call's status; waits for it.
  grpc::Status status() { return status_.get(); }
  void Cancel() { context_.TryCancel(); }

  void OnDone(const grpc::Status& status) override { done_.set_value(status); }

 private:
  grpc::GenericStub stub_;
  grpc::ClientContext context_;
  std::promise<grpc::Status> done_;
  std::shared_future<grpc::Status> status_;
};

}  // namespace gradserve::testing

#endif  // GRADSERVE_TESTS_SERVICE_HEADERS_ONLY_CALL_H_
