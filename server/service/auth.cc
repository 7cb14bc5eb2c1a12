#include "server/service/auth.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace gradserve::service {

// Note [Bearer token check]
// ~~~~~~~~~~~~~~~~~~~~~~~~~
// The token has to be checked on every GradientService call, over plaintext as well as TLS
// (behind a TLS-terminating proxy, on loopback), while the health service stays open for load
// balancers. gRPC 1.51 offers three places for such a check:
//
//  - A server interceptor (grpc::experimental::ServerInterceptorFactoryInterface) sees the
//    metadata but cannot end a call with a status of its own: Hijack() is for client-side
//    interceptors only (grpcpp/support/interceptor.h), and the one lever it has, TryCancel(),
//    reaches the client as CANCELLED while the handler still runs (grpc/grpc#24017).
//  - An AuthMetadataProcessor answers UNAUTHENTICATED properly but is only installed on secure
//    server credentials, so it cannot guard a plaintext port, and it runs for every service,
//    health included.
//  - The handlers themselves. This is what we do, in one wrapper class instead of inside
//    GradientServiceImpl: the wrapper is what the server registers, so authentication stays out
//    of the compute path, and a method nobody forwarded here fails closed (UNIMPLEMENTED).
//
// The check runs on the gRPC reaction thread before the call is queued, so a refused call
// costs no compute. For ComputeGradients and CheckGradients, whose messages can be large, it
// runs on the call's headers, before its message is read (Note [Admission at the headers] in
// gradient_service.cc): a unary callback handler would only start once the whole message had
// arrived and been parsed. The other methods' messages are small (bounded by max_message_bytes
// all the same).

bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  // Visit max(|a|, |b|) bytes whatever they hold and fold every difference into one word: no
  // early exit. Only the lengths (not secret here: the token's length) affect the time.
  const size_t n = std::max(a.size(), b.size());
  size_t diff = a.size() ^ b.size();
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<size_t>(x ^ y);
  }
  return diff == 0;
}

grpc::Status CheckBearerToken(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                              std::string_view expected_token) {
  const grpc::Status refused(grpc::StatusCode::UNAUTHENTICATED, kUnauthenticatedMessage);
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) return refused;
  std::string_view value(it->second.data(), it->second.size());
  constexpr std::string_view kScheme = "bearer ";
  if (value.size() < kScheme.size() ||
      !absl::EqualsIgnoreCase(absl::string_view(value.data(), kScheme.size()),
                              absl::string_view(kScheme.data(), kScheme.size()))) {
    return refused;
  }
  value.remove_prefix(kScheme.size());
  while (!value.empty() && value.front() == ' ') value.remove_prefix(1);
  return ConstantTimeEquals(value, expected_token) ? grpc::Status::OK : refused;
}

absl::StatusOr<std::string> NormalizeAuthToken(std::string token, const std::string& source) {
  while (!token.empty() && (token.back() == '\n' || token.back() == '\r')) token.pop_back();
  if (token.empty()) return absl::InvalidArgumentError(absl::StrCat(source, " is empty"));
  // A header value: visible ASCII. Spaces would be ambiguous after "Bearer ". Never echo it.
  for (const char c : token) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": a token may hold only visible ASCII characters (no spaces)"));
    }
  }
  return token;
}

absl::StatusOr<std::string> ReadAuthTokenFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read the token file ", path, ": ", std::strerror(errno)));
  }
  std::string content((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (file.bad()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read the token file ", path));
  }
  return NormalizeAuthToken(std::move(content), absl::StrCat("the token file ", path));
}

AuthenticatingGradientService::AuthenticatingGradientService(
    GradientServiceImpl* inner, std::string token,
    std::function<void(const char* method)> on_refused)
    : inner_(inner), token_(std::move(token)), on_refused_(std::move(on_refused)) {}

grpc::Status AuthenticatingGradientService::Check(const char* method,
                                                  grpc::CallbackServerContext* context) const {
  if (token_.empty()) return grpc::Status::OK;
  grpc::Status status = CheckBearerToken(context->client_metadata(), token_);
  if (status.ok()) return status;
  spdlog::warn("{} peer={} refused: {}", method, context->peer(), status.error_message());
  if (on_refused_) on_refused_(method);
  return status;
}

grpc::ServerUnaryReactor* AuthenticatingGradientService::Refuse(
    const char* method, grpc::CallbackServerContext* context) const {
  grpc::Status status = Check(method, context);
  if (status.ok()) return nullptr;
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

namespace {

// A stream finished before its first read: gRPC has no default bidi reactor.
class RefusedStream final
    : public grpc::ServerBidiReactor<v1::StreamGradientsRequest, v1::StreamGradientsResponse> {
 public:
  explicit RefusedStream(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::ServerBidiReactor<v1::StreamGradientsRequest, v1::StreamGradientsResponse>*
AuthenticatingGradientService::StreamGradients(grpc::CallbackServerContext* context) {
  if (grpc::Status status = Check("StreamGradients", context); !status.ok()) {
    return new RefusedStream(status);
  }
  return inner_->StreamGradients(context);
}

grpc::ServerGenericBidiReactor* AuthenticatingGradientService::GenericCalls::CreateReactor(
    grpc::GenericCallbackServerContext* context) {
  const std::string& path = context->method();
  if (!GradientServiceImpl::ServesAtHeaders(path)) {
    // What gRPC answers for a method no service registered.
    return new RefusedCallAtHeaders(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, ""));
  }
  const std::string method = path.substr(path.rfind('/') + 1);
  if (grpc::Status status = outer_->Check(method.c_str(), context); !status.ok()) {
    return new RefusedCallAtHeaders(status);
  }
  return outer_->inner_->StartCallAtHeaders(context);
}

grpc::ServerUnaryReactor* AuthenticatingGradientService::GetServerInfo(
    grpc::CallbackServerContext* context, const v1::GetServerInfoRequest* request,
    v1::GetServerInfoResponse* response) {
  if (grpc::ServerUnaryReactor* refused = Refuse("GetServerInfo", context)) return refused;
  return inner_->GetServerInfo(context, request, response);
}

grpc::ServerUnaryReactor* AuthenticatingGradientService::GetStats(
    grpc::CallbackServerContext* context, const v1::GetStatsRequest* request,
    v1::GetStatsResponse* response) {
  if (grpc::ServerUnaryReactor* refused = Refuse("GetStats", context)) return refused;
  return inner_->GetStats(context, request, response);
}

}  // namespace gradserve::service
