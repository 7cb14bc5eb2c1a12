// gradserve C++ client: build requests from Eigen matrices or plain vectors, call the service,
// and read gradients back as matrices.
//
//   auto channel = gradserve::client::CreateChannel("127.0.0.1:50051");  // plaintext
//   (TLS, mutual TLS and a bearer token: set ClientOptions::tls and ::bearer_token.)
//   gradserve::client::GradientClient client(channel);
//   v1::ComputeGradientsRequest request;
//   *request.mutable_model() = ModelBuilder().Linear(4, 2).ReLU().Mse().Build();
//   AddLinearParameters(weight, bias, &request);       // Eigen, nn.Linear layout
//   *request.mutable_inputs() = ToTensor(x);
//   *request.mutable_targets() = ToTensor(y);
//   v1::ComputeGradientsResponse response;
//   grpc::Status status = client.ComputeGradients(request, &response);
//   auto dW = ToMatrix<float>(response.gradients(0).weight());
//
// A training loop without resending the model: client.OpenStream(setup, timeout), then
// stream->Step(step, &answer) per batch (see GradientStream).
#ifndef GRADSERVE_CLIENT_CLIENT_H_
#define GRADSERVE_CLIENT_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <Eigen/Core>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "gradserve/v1/gradserve.grpc.pb.h"
#include "gradserve/v1/gradserve.pb.h"

namespace gradserve::client {

namespace v1 = ::gradserve::v1;

template <typename T>
using RowMajorMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <typename T>
constexpr v1::DType DTypeOf() {
  if constexpr (std::is_same_v<T, float>) return v1::DTYPE_FLOAT32;
  if constexpr (std::is_same_v<T, double>) return v1::DTYPE_FLOAT64;
  if constexpr (std::is_same_v<T, int32_t>) return v1::DTYPE_INT32;
  if constexpr (std::is_same_v<T, int64_t>) return v1::DTYPE_INT64;
}

// A tensor of `shape` holding a copy of data[0 .. product(shape)), row-major.
template <typename T>
v1::Tensor ToTensor(std::span<const T> data, std::initializer_list<int64_t> shape) {
  v1::Tensor tensor;
  tensor.set_dtype(DTypeOf<T>());
  for (int64_t dim : shape) tensor.add_shape(dim);
  tensor.set_data(reinterpret_cast<const char*>(data.data()), data.size_bytes());
  return tensor;
}

// A rank-1 tensor from a vector (a bias, class targets).
template <typename T>
v1::Tensor ToTensor(const std::vector<T>& values) {
  return ToTensor<T>(std::span<const T>(values), {static_cast<int64_t>(values.size())});
}

// A rank-2 tensor from any Eigen matrix expression (column-major ones are reordered).
template <typename Derived>
v1::Tensor ToTensor(const Eigen::MatrixBase<Derived>& matrix) {
  using T = typename Derived::Scalar;
  const RowMajorMatrix<T> row_major = matrix;
  return ToTensor<T>(std::span<const T>(row_major.data(), row_major.size()),
                     {row_major.rows(), row_major.cols()});
}

// The tensor as a matrix: rank 2 as is, rank 1 as a single row. nullopt if the dtype is not
// T's or the byte length does not match the shape.
template <typename T>
std::optional<RowMajorMatrix<T>> ToMatrix(const v1::Tensor& tensor) {
  if (tensor.dtype() != DTypeOf<T>() || tensor.shape_size() < 1 || tensor.shape_size() > 2) {
    return std::nullopt;
  }
  const int64_t rows = tensor.shape_size() == 2 ? tensor.shape(0) : 1;
  const int64_t cols = tensor.shape(tensor.shape_size() - 1);
  if (rows < 0 || cols < 0 ||
      tensor.data().size() != static_cast<size_t>(rows * cols) * sizeof(T)) {
    return std::nullopt;
  }
  RowMajorMatrix<T> matrix(rows, cols);
  std::memcpy(matrix.data(), tensor.data().data(), tensor.data().size());
  return matrix;
}

// Appends one Linear layer's parameters (nn.Linear layout: weight [out, in], bias [out]; pass
// an empty bias for a layer without one).
template <typename T>
void AddLinearParameters(const RowMajorMatrix<T>& weight, const std::vector<T>& bias,
                         v1::ComputeGradientsRequest* request) {
  v1::LinearParameters* params = request->add_parameters();
  *params->mutable_weight() = ToTensor(weight);
  if (!bias.empty()) *params->mutable_bias() = ToTensor(bias);
}

// Fluent construction of a v1::Model.
class ModelBuilder {
 public:
  ModelBuilder& Linear(int64_t in_features, int64_t out_features, bool bias = true);
  ModelBuilder& ReLU();
  ModelBuilder& LeakyReLU(double negative_slope = 0.01);
  ModelBuilder& Sigmoid();
  ModelBuilder& Tanh();
  ModelBuilder& GELU(bool tanh_approximation = false);
  ModelBuilder& Identity();
  // Names the layer added last (shown in diagnostics).
  ModelBuilder& Named(std::string name);

  ModelBuilder& Mse(v1::Reduction reduction = v1::REDUCTION_MEAN);
  ModelBuilder& L1(v1::Reduction reduction = v1::REDUCTION_MEAN);
  ModelBuilder& Huber(double delta = 1.0, v1::Reduction reduction = v1::REDUCTION_MEAN);
  ModelBuilder& CrossEntropy(v1::Reduction reduction = v1::REDUCTION_MEAN);
  ModelBuilder& BceWithLogits(v1::Reduction reduction = v1::REDUCTION_MEAN);
  ModelBuilder& External();

  const v1::Model& Build() const { return model_; }

 private:
  v1::Model model_;
};

// Transport security of the channel. Off (plaintext) unless `enabled`.
struct TlsOptions {
  bool enabled = false;
  // PEM file of the CA certificates trusted to sign the server's certificate; empty: the system's
  // roots (gRPC's default, overridable with GRPC_DEFAULT_SSL_ROOTS_FILE_PATH).
  std::string root_ca_file;
  // PEM files of this client's certificate chain and private key, for servers that require
  // mutual TLS. Both or neither.
  std::string cert_file;
  std::string key_file;
  // Verify the server's certificate against this name instead of the target's host (tests, or
  // addressing a server by IP when its certificate names only a DNS name).
  std::string server_name_override;
};

struct ClientOptions {
  // Raised on both sides: gRPC's 4 MiB default is far below a model's gradients.
  int64_t max_message_bytes = int64_t{256} << 20;
  // Deadline of every call.
  std::chrono::milliseconds timeout{60000};
  TlsOptions tls;
  // Retry a call refused with UNAVAILABLE on this channel, as client/service_config.json says
  // (up to 4 more times, ~1.5 s in all). Off for a channel to one replica of several that a
  // ShardedClient drives: it moves a failed part to the next replica at once, which a channel
  // still retrying the replica that is down would delay.
  bool retry_unavailable = true;
  // Sent as "authorization: Bearer <token>" metadata with every call (health checks too, which
  // the server does not require it for); empty: none. Per-call metadata rather than gRPC call
  // credentials, which gRPC refuses to send over a plaintext channel.
  std::string bearer_token;
};

// The channel credentials `options.tls` describes, reading its PEM files now: insecure when TLS
// is off. nullptr, with the reason in *error, if a file cannot be read or cert/key come alone.
std::shared_ptr<grpc::ChannelCredentials> MakeChannelCredentials(const ClientOptions& options,
                                                                 std::string* error);

// The bearer token in `path`: its content minus trailing newlines. false, with the reason in
// *error, if the file cannot be read or is empty.
bool ReadBearerTokenFile(const std::string& path, std::string* token, std::string* error);

// What GradientClient does to the context of every call: options.timeout from now as the
// deadline, options.bearer_token (if set) as "authorization" metadata. For callers that use a
// stub of their own.
void PrepareContext(const ClientOptions& options, grpc::ClientContext* context);

// The canonical name of a gRPC status code ("INVALID_ARGUMENT"; "CODE_<n>" for a number outside
// the canonical 17): error messages read by people and scripts name the code, not its number.
const char* StatusCodeName(grpc::StatusCode code);
// "CODE_NAME: message" (just the name if the message is empty).
std::string FormatStatus(const grpc::Status& status);

// A diagnostics norm for people: "%.4g", or "-" when the field is absent because the server did
// not compute that gradient (Note [Diagnostics rule] in gradserve.proto) — never a 0 that would
// read as a vanished gradient.
std::string FormatNorm(bool present, double value);

// What a grpc.health.v1 Check answered for one service name.
enum class ServingStatus { kUnknown, kServing, kNotServing, kServiceUnknown };
// "UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN": the names grpc.health.v1 uses.
const char* ServingStatusName(ServingStatus status);

// One channel per process is the usual choice; "dns:///host:port" with
// ClientOptions works behind Kubernetes headless services: the channel balances calls
// round_robin over every address and retries a call refused with UNAVAILABLE (a replica
// shutting down) up to 4 more times with backoff, on another replica (client/service_config.json).
// `credentials`: nullptr means MakeChannelCredentials(options); if that fails, every call on the
// channel fails with INVALID_ARGUMENT (call MakeChannelCredentials yourself to get the reason).
// options.tls.server_name_override is applied either way.
std::shared_ptr<grpc::Channel> CreateChannel(
    const std::string& target, const ClientOptions& options = {},
    std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr);

// One StreamGradients stream (see the protocol in gradserve.proto): the model was sent when it
// was opened; each Step sends a batch with parameters or an update and, unless it accumulates,
// waits for its answer. Tensors larger than chunk_bytes are sent ahead as TensorChunks, so a
// step may carry tensors larger than the server's message limit. Not thread-safe: one training
// loop drives one stream.
class GradientStream {
 public:
  using ReaderWriter =
      grpc::ClientReaderWriterInterface<v1::StreamGradientsRequest, v1::StreamGradientsResponse>;
  GradientStream(std::unique_ptr<grpc::ClientContext> context, std::unique_ptr<ReaderWriter> stream,
                 int64_t chunk_bytes);
  ~GradientStream();  // Finishes the stream if Finish was not called.

  // Sends `step` (chunking its large tensors) and, if !step.accumulate(), reads its answer into
  // *response. Any error ends the stream: the status is the server's (e.g. INVALID_ARGUMENT
  // naming the message and field), and later calls return it again.
  grpc::Status Step(v1::StreamStep step, v1::StreamGradientsResponse* response);
  // Half-closes and returns the stream's final status; unanswered accumulation is dropped.
  grpc::Status Finish();

 private:
  // Sends every tensor of `step` larger than chunk_bytes_ as chunks and clears it in the step.
  bool SendLargeTensorsAsChunks(v1::StreamStep* step);
  bool SendChunks(const std::string& field, v1::Tensor* tensor);
  grpc::Status Fail();

  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<ReaderWriter> stream_;
  const int64_t chunk_bytes_;
  std::optional<grpc::Status> final_status_;
};

// Thin synchronous wrapper with a deadline (and options.bearer_token, if set) on every call.
// Thread-safe.
class GradientClient {
 public:
  explicit GradientClient(std::shared_ptr<grpc::Channel> channel, ClientOptions options = {});
  // For tests: any stub, e.g. v1::MockGradientServiceStub.
  explicit GradientClient(std::unique_ptr<v1::GradientService::StubInterface> stub,
                          ClientOptions options = {});

  grpc::Status ComputeGradients(const v1::ComputeGradientsRequest& request,
                                v1::ComputeGradientsResponse* response);
  grpc::Status CheckGradients(const v1::CheckGradientsRequest& request,
                              v1::CheckGradientsResponse* response);
  grpc::Status GetServerInfo(v1::GetServerInfoResponse* response);
  // grpc.health.v1 Check for `service` ("" for the whole server); *serving is true iff SERVING.
  grpc::Status Health(const std::string& service, bool* serving);
  // grpc.health.v1 Check for `service`, with the answer in *status. A name the server does not
  // report is kServiceUnknown with an OK status (gRPC's health service answers it NOT_FOUND);
  // other failures are returned with *status = kUnknown.
  grpc::Status CheckHealth(const std::string& service, ServingStatus* status);

  // Opens a StreamGradients stream and sends `setup`. The stream's deadline is `timeout` from
  // now (a stream has one deadline for its whole life, not one per step; a training loop may
  // want hours); options.bearer_token is sent. Tensors above `chunk_bytes` travel as chunks.
  // A setup the server rejects surfaces as the status of the first Step.
  std::unique_ptr<GradientStream> OpenStream(const v1::StreamSetup& setup,
                                             std::chrono::milliseconds timeout,
                                             int64_t chunk_bytes = int64_t{4} << 20);

 private:
  std::shared_ptr<grpc::Channel> channel_;  // Null when built from a stub.
  std::unique_ptr<v1::GradientService::StubInterface> stub_;
  ClientOptions options_;
};

}  // namespace gradserve::client

#endif  // GRADSERVE_CLIENT_CLIENT_H_
