// Bearer-token authentication of gradserve.v1.GradientService calls: the token check, and the
// service wrapper that applies it to every method (Note [Bearer token check] in auth.cc).
#ifndef GRADSERVE_SERVICE_AUTH_H_
#define GRADSERVE_SERVICE_AUTH_H_

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <functional>
#include <map>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "gradserve/v1/gradserve.grpc.pb.h"
#include "server/service/gradient_service.h"

namespace gradserve::service {

// The status message of every refused call; it never says which part was wrong.
inline constexpr char kUnauthenticatedMessage[] = "missing or invalid bearer token";

// True iff a == b. The time taken depends on the lengths only, never on where the strings first
// differ, so timing a refusal does not reveal a prefix of the token.
bool ConstantTimeEquals(std::string_view a, std::string_view b);

// OK iff `metadata` (a call's client metadata) carries "authorization: Bearer <expected_token>";
// the scheme is case-insensitive (RFC 7235), the token is compared in constant time. Otherwise
// UNAUTHENTICATED with kUnauthenticatedMessage. REQUIRES: !expected_token.empty().
grpc::Status CheckBearerToken(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                              std::string_view expected_token);

// The token in `path`: its content minus trailing newlines. INVALID_ARGUMENT if the file cannot
// be read, is empty, or the token holds anything but visible ASCII (what a header value carries).
absl::StatusOr<std::string> ReadAuthTokenFile(const std::string& path);
// The same rules for a token from elsewhere (an environment variable); `source` names it.
absl::StatusOr<std::string> NormalizeAuthToken(std::string token, const std::string& source);

// GradientService behind a bearer-token check: every method checks the call's metadata first and
// finishes it with UNAUTHENTICATED, before anything is queued or computed, when the token is
// missing or wrong; otherwise it hands the call to `inner` unchanged. An empty token passes every
// call through. The server registers both this service and its generic_calls(), which serves the
// methods `inner` takes at their headers (Note [Admission at the headers]), so that their calls
// are refused before their message is read. A method added to the proto answers UNIMPLEMENTED
// (the generated default) until it is forwarded here: it fails closed, and
// SecurityTest.EveryMethodRefusesCallsWithoutToken says so. Other services on the server (health,
// reflection) do not pass through here and stay open. Thread-safe, like `inner`.
class AuthenticatingGradientService final
    // The methods GradientServiceImpl::ServesAtHeaders are unregistered (generic): their calls
    // reach generic_calls() at their headers.
    : public v1::GradientService::WithGenericMethod_ComputeGradients<
          v1::GradientService::WithGenericMethod_CheckGradients<
              v1::GradientService::CallbackService>> {
 public:
  // `inner` is not owned and must outlive this. `on_refused`, if set, is called with the method's
  // name ("ComputeGradients") for every call refused, on the gRPC thread (metrics count them).
  AuthenticatingGradientService(GradientServiceImpl* inner, std::string token,
                                std::function<void(const char* method)> on_refused = nullptr);

  // To register with the server next to this service
  // (ServerBuilder::RegisterCallbackGenericService).
  grpc::CallbackGenericService* generic_calls() { return &generic_calls_; }

  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest* request,
                                          v1::GetServerInfoResponse* response) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* context,
                                     const v1::GetStatsRequest* request,
                                     v1::GetStatsResponse* response) override;
  grpc::ServerBidiReactor<v1::StreamGradientsRequest, v1::StreamGradientsResponse>* StreamGradients(
      grpc::CallbackServerContext* context) override;

 private:
  // Every call of a method not registered with the server.
  class GenericCalls final : public grpc::CallbackGenericService {
   public:
    explicit GenericCalls(AuthenticatingGradientService* outer) : outer_(outer) {}
    grpc::ServerGenericBidiReactor* CreateReactor(
        grpc::GenericCallbackServerContext* context) override;

   private:
    AuthenticatingGradientService* const outer_;
  };

  // OK if the call may go on; otherwise UNAUTHENTICATED, logged and counted.
  grpc::Status Check(const char* method, grpc::CallbackServerContext* context) const;
  // nullptr if the call may go on; otherwise a reactor already finished with UNAUTHENTICATED.
  grpc::ServerUnaryReactor* Refuse(const char* method, grpc::CallbackServerContext* context) const;

  GradientServiceImpl* const inner_;
  const std::string token_;
  const std::function<void(const char* method)> on_refused_;
  GenericCalls generic_calls_{this};
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_AUTH_H_
