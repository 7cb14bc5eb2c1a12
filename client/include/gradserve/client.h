// gradserve C++ client: build requests from Eigen matrices or plain vectors, call the service,
// and read gradients back as matrices.
//
//   auto channel = gradserve::client::CreateChannel("127.0.0.1:50051");
//   gradserve::client::GradientClient client(channel);
//   v1::ComputeGradientsRequest request;
//   *request.mutable_model() = ModelBuilder().Linear(4, 2).ReLU().Mse().Build();
//   AddLinearParameters(weight, bias, &request);       // Eigen, nn.Linear layout
//   *request.mutable_inputs() = ToTensor(x);
//   *request.mutable_targets() = ToTensor(y);
//   v1::ComputeGradientsResponse response;
//   grpc::Status status = client.ComputeGradients(request, &response);
//   auto dW = ToMatrix<float>(response.gradients(0).weight());
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

struct ClientOptions {
  // Raised on both sides: gRPC's 4 MiB default is far below a model's gradients.
  int64_t max_message_bytes = int64_t{256} << 20;
  // Deadline of every call.
  std::chrono::milliseconds timeout{60000};
};

// One channel per process is the usual choice; "dns:///host:port" with
// ClientOptions works behind Kubernetes headless services (round_robin is set).
std::shared_ptr<grpc::Channel> CreateChannel(
    const std::string& target, const ClientOptions& options = {},
    std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials());

// Thin synchronous wrapper with a deadline on every call. Thread-safe.
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

 private:
  void SetDeadline(grpc::ClientContext* context) const;

  std::shared_ptr<grpc::Channel> channel_;  // Null when built from a stub.
  std::unique_ptr<v1::GradientService::StubInterface> stub_;
  ClientOptions options_;
};

}  // namespace gradserve::client

#endif  // GRADSERVE_CLIENT_CLIENT_H_
