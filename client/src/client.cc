#include "gradserve/client.h"

#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <iterator>

#include "grpc/health/v1/health.grpc.pb.h"

namespace gradserve::client {
namespace {

bool ReadFile(const std::string& path, std::string* content, std::string* error) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    *error = "cannot read " + path + ": " + std::strerror(errno);
    return false;
  }
  content->assign(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
  if (file.bad()) {
    *error = "cannot read " + path;
    return false;
  }
  return true;
}

}  // namespace

ModelBuilder& ModelBuilder::Linear(int64_t in_features, int64_t out_features, bool bias) {
  v1::Linear* linear = model_.add_layers()->mutable_linear();
  linear->set_in_features(in_features);
  linear->set_out_features(out_features);
  linear->set_bias(bias);
  return *this;
}

ModelBuilder& ModelBuilder::ReLU() {
  model_.add_layers()->mutable_relu();
  return *this;
}

ModelBuilder& ModelBuilder::LeakyReLU(double negative_slope) {
  model_.add_layers()->mutable_leaky_relu()->set_negative_slope(negative_slope);
  return *this;
}

ModelBuilder& ModelBuilder::Sigmoid() {
  model_.add_layers()->mutable_sigmoid();
  return *this;
}

ModelBuilder& ModelBuilder::Tanh() {
  model_.add_layers()->mutable_tanh();
  return *this;
}

ModelBuilder& ModelBuilder::GELU(bool tanh_approximation) {
  model_.add_layers()->mutable_gelu()->set_approximation(
      tanh_approximation ? v1::GELU::APPROXIMATION_TANH : v1::GELU::APPROXIMATION_NONE);
  return *this;
}

ModelBuilder& ModelBuilder::Identity() {
  model_.add_layers()->mutable_identity();
  return *this;
}

ModelBuilder& ModelBuilder::Named(std::string name) {
  if (model_.layers_size() > 0) model_.mutable_layers()->rbegin()->set_name(std::move(name));
  return *this;
}

ModelBuilder& ModelBuilder::Mse(v1::Reduction reduction) {
  model_.mutable_loss()->mutable_mse();
  model_.mutable_loss()->set_reduction(reduction);
  return *this;
}

ModelBuilder& ModelBuilder::L1(v1::Reduction reduction) {
  model_.mutable_loss()->mutable_l1();
  model_.mutable_loss()->set_reduction(reduction);
  return *this;
}

ModelBuilder& ModelBuilder::Huber(double delta, v1::Reduction reduction) {
  model_.mutable_loss()->mutable_huber()->set_delta(delta);
  model_.mutable_loss()->set_reduction(reduction);
  return *this;
}

ModelBuilder& ModelBuilder::CrossEntropy(v1::Reduction reduction) {
  model_.mutable_loss()->mutable_cross_entropy();
  model_.mutable_loss()->set_reduction(reduction);
  return *this;
}

ModelBuilder& ModelBuilder::BceWithLogits(v1::Reduction reduction) {
  model_.mutable_loss()->mutable_bce_with_logits();
  model_.mutable_loss()->set_reduction(reduction);
  return *this;
}

ModelBuilder& ModelBuilder::External() {
  model_.mutable_loss()->mutable_external();
  return *this;
}

std::shared_ptr<grpc::ChannelCredentials> MakeChannelCredentials(const ClientOptions& options,
                                                                 std::string* error) {
  const TlsOptions& tls = options.tls;
  if (!tls.enabled) return grpc::InsecureChannelCredentials();
  if (tls.cert_file.empty() != tls.key_file.empty()) {
    *error = "a client certificate needs its private key and a key its certificate";
    return nullptr;
  }
  grpc::SslCredentialsOptions ssl;
  if (!tls.root_ca_file.empty() && !ReadFile(tls.root_ca_file, &ssl.pem_root_certs, error)) {
    return nullptr;
  }
  if (!tls.cert_file.empty() && (!ReadFile(tls.cert_file, &ssl.pem_cert_chain, error) ||
                                 !ReadFile(tls.key_file, &ssl.pem_private_key, error))) {
    return nullptr;
  }
  return grpc::SslCredentials(ssl);
}

bool ReadBearerTokenFile(const std::string& path, std::string* token, std::string* error) {
  if (!ReadFile(path, token, error)) return false;
  while (!token->empty() && (token->back() == '\n' || token->back() == '\r')) token->pop_back();
  if (token->empty()) {
    *error = "the token file " + path + " is empty";
    return false;
  }
  return true;
}

std::shared_ptr<grpc::Channel> CreateChannel(
    const std::string& target, const ClientOptions& options,
    std::shared_ptr<grpc::ChannelCredentials> credentials) {
  grpc::ChannelArguments args;
  const int limit = static_cast<int>(std::min<int64_t>(options.max_message_bytes, INT_MAX));
  args.SetMaxReceiveMessageSize(limit);
  args.SetMaxSendMessageSize(limit);
  args.SetLoadBalancingPolicyName("round_robin");
  if (!options.tls.server_name_override.empty()) {
    args.SetSslTargetNameOverride(options.tls.server_name_override);
  }
  if (credentials == nullptr) {
    std::string ignored;
    credentials = MakeChannelCredentials(options, &ignored);
  }
  // Null credentials give a channel whose calls all fail (INVALID_ARGUMENT), never plaintext.
  return grpc::CreateCustomChannel(target, credentials, args);
}

GradientClient::GradientClient(std::shared_ptr<grpc::Channel> channel, ClientOptions options)
    : channel_(channel), stub_(v1::GradientService::NewStub(channel)), options_(options) {}

GradientClient::GradientClient(std::unique_ptr<v1::GradientService::StubInterface> stub,
                               ClientOptions options)
    : stub_(std::move(stub)), options_(options) {}

void PrepareContext(const ClientOptions& options, grpc::ClientContext* context) {
  context->set_deadline(std::chrono::system_clock::now() + options.timeout);
  if (!options.bearer_token.empty()) {
    context->AddMetadata("authorization", "Bearer " + options.bearer_token);
  }
}

grpc::Status GradientClient::ComputeGradients(const v1::ComputeGradientsRequest& request,
                                              v1::ComputeGradientsResponse* response) {
  grpc::ClientContext context;
  PrepareContext(options_, &context);
  return stub_->ComputeGradients(&context, request, response);
}

grpc::Status GradientClient::CheckGradients(const v1::CheckGradientsRequest& request,
                                            v1::CheckGradientsResponse* response) {
  grpc::ClientContext context;
  PrepareContext(options_, &context);
  return stub_->CheckGradients(&context, request, response);
}

grpc::Status GradientClient::GetServerInfo(v1::GetServerInfoResponse* response) {
  grpc::ClientContext context;
  PrepareContext(options_, &context);
  return stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), response);
}

grpc::Status GradientClient::Health(const std::string& service, bool* serving) {
  *serving = false;
  if (channel_ == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "no channel (client built from a stub)");
  }
  grpc::ClientContext context;
  PrepareContext(options_, &context);
  ::grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  ::grpc::health::v1::HealthCheckResponse response;
  grpc::Status status =
      ::grpc::health::v1::Health::NewStub(channel_)->Check(&context, request, &response);
  *serving = status.ok() && response.status() == ::grpc::health::v1::HealthCheckResponse::SERVING;
  return status;
}

}  // namespace gradserve::client
