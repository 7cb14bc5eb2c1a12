#include "gradserve/client.h"

#include <climits>

#include "grpc/health/v1/health.grpc.pb.h"

namespace gradserve::client {

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

std::shared_ptr<grpc::Channel> CreateChannel(
    const std::string& target, const ClientOptions& options,
    std::shared_ptr<grpc::ChannelCredentials> credentials) {
  grpc::ChannelArguments args;
  const int limit = static_cast<int>(std::min<int64_t>(options.max_message_bytes, INT_MAX));
  args.SetMaxReceiveMessageSize(limit);
  args.SetMaxSendMessageSize(limit);
  args.SetLoadBalancingPolicyName("round_robin");
  return grpc::CreateCustomChannel(target, credentials, args);
}

GradientClient::GradientClient(std::shared_ptr<grpc::Channel> channel, ClientOptions options)
    : channel_(channel), stub_(v1::GradientService::NewStub(channel)), options_(options) {}

GradientClient::GradientClient(std::unique_ptr<v1::GradientService::StubInterface> stub,
                               ClientOptions options)
    : stub_(std::move(stub)), options_(options) {}

void GradientClient::SetDeadline(grpc::ClientContext* context) const {
  context->set_deadline(std::chrono::system_clock::now() + options_.timeout);
}

grpc::Status GradientClient::ComputeGradients(const v1::ComputeGradientsRequest& request,
                                              v1::ComputeGradientsResponse* response) {
  grpc::ClientContext context;
  SetDeadline(&context);
  return stub_->ComputeGradients(&context, request, response);
}

grpc::Status GradientClient::CheckGradients(const v1::CheckGradientsRequest& request,
                                            v1::CheckGradientsResponse* response) {
  grpc::ClientContext context;
  SetDeadline(&context);
  return stub_->CheckGradients(&context, request, response);
}

grpc::Status GradientClient::GetServerInfo(v1::GetServerInfoResponse* response) {
  grpc::ClientContext context;
  SetDeadline(&context);
  return stub_->GetServerInfo(&context, v1::GetServerInfoRequest(), response);
}

grpc::Status GradientClient::Health(const std::string& service, bool* serving) {
  *serving = false;
  if (channel_ == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "no channel (client built from a stub)");
  }
  grpc::ClientContext context;
  SetDeadline(&context);
  ::grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  ::grpc::health::v1::HealthCheckResponse response;
  grpc::Status status =
      ::grpc::health::v1::Health::NewStub(channel_)->Check(&context, request, &response);
  *serving = status.ok() && response.status() == ::grpc::health::v1::HealthCheckResponse::SERVING;
  return status;
}

}  // namespace gradserve::client
