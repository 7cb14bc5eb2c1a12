#include "gradserve/client.h"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string_view>

#include "grpc/health/v1/health.grpc.pb.h"
#include "service_config.h"  // Generated from client/service_config.json.

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
  // round_robin over every address the target resolves to, and calls refused with UNAVAILABLE
  // (a replica shutting down) retried on another one: client/service_config.json.
  args.SetServiceConfigJSON(internal::kServiceConfigJson);
  if (!options.retry_unavailable) args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
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

const char* StatusCodeName(grpc::StatusCode code) {
  // Spelled out rather than borrowed from absl so that the installed package needs no absl.
  static constexpr const char* kNames[] = {"OK",
                                           "CANCELLED",
                                           "UNKNOWN",
                                           "INVALID_ARGUMENT",
                                           "DEADLINE_EXCEEDED",
                                           "NOT_FOUND",
                                           "ALREADY_EXISTS",
                                           "PERMISSION_DENIED",
                                           "RESOURCE_EXHAUSTED",
                                           "FAILED_PRECONDITION",
                                           "ABORTED",
                                           "OUT_OF_RANGE",
                                           "UNIMPLEMENTED",
                                           "INTERNAL",
                                           "UNAVAILABLE",
                                           "DATA_LOSS",
                                           "UNAUTHENTICATED"};
  const int index = static_cast<int>(code);
  if (index >= 0 && index < static_cast<int>(std::size(kNames))) return kNames[index];
  thread_local std::string other;
  other = "CODE_" + std::to_string(index);
  return other.c_str();
}

std::string FormatStatus(const grpc::Status& status) {
  std::string text = StatusCodeName(status.error_code());
  if (!status.error_message().empty()) text += ": " + status.error_message();
  return text;
}

std::string FormatNorm(bool present, double value) {
  if (!present) return "-";
  char text[32];
  std::snprintf(text, sizeof(text), "%.4g", value);
  return text;
}

const char* ServingStatusName(ServingStatus status) {
  switch (status) {
    case ServingStatus::kServing:
      return "SERVING";
    case ServingStatus::kNotServing:
      return "NOT_SERVING";
    case ServingStatus::kServiceUnknown:
      return "SERVICE_UNKNOWN";
    case ServingStatus::kUnknown:
      break;
  }
  return "UNKNOWN";
}

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
  ServingStatus status = ServingStatus::kUnknown;
  grpc::Status result = CheckHealth(service, &status);
  *serving = status == ServingStatus::kServing;
  // Callers of this older form saw an unknown name as the call's NOT_FOUND; keep that.
  if (result.ok() && status == ServingStatus::kServiceUnknown) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service");
  }
  return result;
}

grpc::Status GradientClient::CheckHealth(const std::string& service, ServingStatus* status) {
  *status = ServingStatus::kUnknown;
  if (channel_ == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "no channel (client built from a stub)");
  }
  grpc::ClientContext context;
  PrepareContext(options_, &context);
  ::grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  ::grpc::health::v1::HealthCheckResponse response;
  grpc::Status result =
      ::grpc::health::v1::Health::NewStub(channel_)->Check(&context, request, &response);
  if (result.error_code() == grpc::StatusCode::NOT_FOUND) {
    *status = ServingStatus::kServiceUnknown;
    return grpc::Status::OK;
  }
  if (!result.ok()) return result;
  switch (response.status()) {
    case ::grpc::health::v1::HealthCheckResponse::SERVING:
      *status = ServingStatus::kServing;
      break;
    case ::grpc::health::v1::HealthCheckResponse::NOT_SERVING:
      *status = ServingStatus::kNotServing;
      break;
    case ::grpc::health::v1::HealthCheckResponse::SERVICE_UNKNOWN:
      *status = ServingStatus::kServiceUnknown;
      break;
    default:
      break;
  }
  return result;
}

std::unique_ptr<GradientStream> GradientClient::OpenStream(const v1::StreamSetup& setup,
                                                           std::chrono::milliseconds timeout,
                                                           int64_t chunk_bytes) {
  auto context = std::make_unique<grpc::ClientContext>();
  ClientOptions options = options_;
  options.timeout = timeout;
  PrepareContext(options, context.get());
  std::unique_ptr<GradientStream::ReaderWriter> stream = stub_->StreamGradients(context.get());
  v1::StreamGradientsRequest message;
  *message.mutable_setup() = setup;
  // A failed write means the stream already ended; Step reports its status.
  stream->Write(message);
  return std::make_unique<GradientStream>(std::move(context), std::move(stream), chunk_bytes);
}

GradientStream::GradientStream(std::unique_ptr<grpc::ClientContext> context,
                               std::unique_ptr<ReaderWriter> stream, int64_t chunk_bytes)
    : context_(std::move(context)),
      stream_(std::move(stream)),
      chunk_bytes_(std::max<int64_t>(1, chunk_bytes)) {}

GradientStream::~GradientStream() {
  if (!final_status_) Finish();
}

grpc::Status GradientStream::Fail() {
  if (!final_status_) final_status_ = stream_->Finish();
  return *final_status_;
}

bool GradientStream::SendChunks(const std::string& field, v1::Tensor* tensor) {
  const std::string& data = tensor->data();
  for (size_t offset = 0; offset < data.size(); offset += chunk_bytes_) {
    v1::StreamGradientsRequest message;
    v1::TensorChunk* chunk = message.mutable_chunk();
    chunk->set_field(field);
    if (offset == 0) {
      chunk->set_dtype(tensor->dtype());
      *chunk->mutable_shape() = tensor->shape();
    }
    chunk->set_data(data.data() + offset, std::min<size_t>(chunk_bytes_, data.size() - offset));
    if (!stream_->Write(message)) return false;
  }
  return true;
}

bool GradientStream::SendLargeTensorsAsChunks(v1::StreamStep* step) {
  const auto large = [this](const v1::Tensor& tensor) {
    return static_cast<int64_t>(tensor.data().size()) > chunk_bytes_;
  };
  if (step->has_inputs() && large(step->inputs())) {
    if (!SendChunks("inputs", step->mutable_inputs())) return false;
    step->clear_inputs();
  }
  if (step->has_targets() && large(step->targets())) {
    if (!SendChunks("targets", step->mutable_targets())) return false;
    step->clear_targets();
  }
  if (step->has_output_gradient() && large(step->output_gradient())) {
    if (!SendChunks("output_gradient", step->mutable_output_gradient())) return false;
    step->clear_output_gradient();
  }
  for (const char* list : {"parameters", "parameter_update"}) {
    auto* entries = std::string_view(list) == "parameters" ? step->mutable_parameters()
                                                           : step->mutable_parameter_update();
    for (int l = 0; l < entries->size(); ++l) {
      v1::LinearParameters* entry = entries->Mutable(l);
      const std::string prefix = std::string(list) + "[" + std::to_string(l) + "]";
      if (entry->has_weight() && large(entry->weight())) {
        if (!SendChunks(prefix + ".weight", entry->mutable_weight())) return false;
        entry->clear_weight();
      }
      if (entry->has_bias() && large(entry->bias())) {
        if (!SendChunks(prefix + ".bias", entry->mutable_bias())) return false;
        entry->clear_bias();
      }
    }
  }
  return true;
}

grpc::Status GradientStream::Step(v1::StreamStep step, v1::StreamGradientsResponse* response) {
  if (final_status_) return *final_status_;
  const bool answered = !step.accumulate();
  if (!SendLargeTensorsAsChunks(&step)) return Fail();
  v1::StreamGradientsRequest message;
  *message.mutable_step() = std::move(step);
  if (!stream_->Write(message)) return Fail();
  if (answered && !stream_->Read(response)) return Fail();
  return grpc::Status::OK;
}

grpc::Status GradientStream::Finish() {
  if (final_status_) return *final_status_;
  stream_->WritesDone();
  final_status_ = stream_->Finish();
  return *final_status_;
}

}  // namespace gradserve::client
