// The C++ client library: tensor conversions, the model builder, and GradientClient against
// the generated gMock stub (no server).
#include "gradserve/client.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "gradserve/v1/gradserve_mock.grpc.pb.h"

namespace gradserve::client {
namespace {

using ::testing::_;
using ::testing::DoAll;
using ::testing::ElementsAre;
using ::testing::Invoke;
using ::testing::Return;

TEST(ClientTensor, EigenMatrixRoundTripsRowMajor) {
  Eigen::MatrixXd column_major(2, 3);
  column_major << 1, 2, 3, 4, 5, 6;
  const v1::Tensor tensor = ToTensor(column_major);
  EXPECT_EQ(tensor.dtype(), v1::DTYPE_FLOAT64);
  EXPECT_THAT(tensor.shape(), ElementsAre(2, 3));
  ASSERT_EQ(tensor.data().size(), 6 * sizeof(double));
  double second;  // Row-major on the wire: element [0, 1] comes second.
  std::memcpy(&second, tensor.data().data() + sizeof(double), sizeof(double));
  EXPECT_EQ(second, 2.0);
  const auto back = ToMatrix<double>(tensor);
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(*back, column_major);
}

TEST(ClientTensor, VectorBecomesRankOneAndReadsBackAsARow) {
  const v1::Tensor tensor = ToTensor(std::vector<float>{1.5f, -2.f});
  EXPECT_EQ(tensor.dtype(), v1::DTYPE_FLOAT32);
  EXPECT_THAT(tensor.shape(), ElementsAre(2));
  const auto row = ToMatrix<float>(tensor);
  ASSERT_TRUE(row.has_value());
  EXPECT_EQ(row->rows(), 1);
  EXPECT_EQ((*row)(0, 1), -2.f);
  EXPECT_EQ(ToTensor(std::vector<int64_t>{3}).dtype(), v1::DTYPE_INT64);
}

TEST(ClientTensor, ToMatrixRefusesWrongDTypeOrLength) {
  v1::Tensor tensor = ToTensor(std::vector<float>{1.f, 2.f});
  EXPECT_FALSE(ToMatrix<double>(tensor).has_value());
  tensor.mutable_data()->pop_back();
  EXPECT_FALSE(ToMatrix<float>(tensor).has_value());
}

TEST(ClientModelBuilder, BuildsLayersLossAndNames) {
  const v1::Model model = ModelBuilder()
                              .Linear(4, 8, /*bias=*/false)
                              .Named("fc1")
                              .GELU(/*tanh_approximation=*/true)
                              .LeakyReLU(0.2)
                              .Linear(8, 3)
                              .CrossEntropy(v1::REDUCTION_SUM)
                              .Build();
  ASSERT_EQ(model.layers_size(), 4);
  EXPECT_EQ(model.layers(0).name(), "fc1");
  EXPECT_FALSE(model.layers(0).linear().bias());
  EXPECT_EQ(model.layers(1).gelu().approximation(), v1::GELU::APPROXIMATION_TANH);
  EXPECT_DOUBLE_EQ(model.layers(2).leaky_relu().negative_slope(), 0.2);
  EXPECT_TRUE(model.layers(3).linear().bias());
  EXPECT_TRUE(model.loss().has_cross_entropy());
  EXPECT_EQ(model.loss().reduction(), v1::REDUCTION_SUM);
}

TEST(ClientStatus, CodesAreNamedAsGrpcNamesThem) {
  EXPECT_STREQ(StatusCodeName(grpc::StatusCode::OK), "OK");
  EXPECT_STREQ(StatusCodeName(grpc::StatusCode::INVALID_ARGUMENT), "INVALID_ARGUMENT");
  EXPECT_STREQ(StatusCodeName(grpc::StatusCode::RESOURCE_EXHAUSTED), "RESOURCE_EXHAUSTED");
  EXPECT_STREQ(StatusCodeName(grpc::StatusCode::UNAUTHENTICATED), "UNAUTHENTICATED");
  EXPECT_STREQ(StatusCodeName(static_cast<grpc::StatusCode>(42)), "CODE_42");
  EXPECT_EQ(FormatStatus(grpc::Status(grpc::StatusCode::UNAVAILABLE, "draining")),
            "UNAVAILABLE: draining");
  EXPECT_EQ(FormatStatus(grpc::Status(grpc::StatusCode::CANCELLED, "")), "CANCELLED");
  EXPECT_STREQ(ServingStatusName(ServingStatus::kServiceUnknown), "SERVICE_UNKNOWN");
  EXPECT_STREQ(ServingStatusName(ServingStatus::kNotServing), "NOT_SERVING");
}

TEST(ClientCalls, PassRequestThroughWithADeadlineAndReturnTheStatus) {
  auto stub = std::make_unique<v1::MockGradientServiceStub>();
  v1::ComputeGradientsResponse canned;
  canned.set_loss(0.25);
  std::chrono::system_clock::time_point deadline;
  EXPECT_CALL(*stub, ComputeGradients(_, _, _))
      .WillOnce(
          DoAll(Invoke([&](grpc::ClientContext* context, const v1::ComputeGradientsRequest& request,
                           v1::ComputeGradientsResponse* response) {
                  deadline = context->deadline();
                  EXPECT_EQ(request.model().layers_size(), 2);
                  *response = canned;
                }),
                Return(grpc::Status::OK)));
  EXPECT_CALL(*stub, GetServerInfo(_, _, _))
      .WillOnce(Return(grpc::Status(grpc::StatusCode::UNAVAILABLE, "down")));
  ClientOptions options;
  options.timeout = std::chrono::seconds(5);
  GradientClient client(std::move(stub), options);

  v1::ComputeGradientsRequest request;
  *request.mutable_model() = ModelBuilder().Linear(4, 2).ReLU().Mse().Build();
  v1::ComputeGradientsResponse response;
  const auto before = std::chrono::system_clock::now();
  ASSERT_TRUE(client.ComputeGradients(request, &response).ok());
  EXPECT_EQ(response.loss(), 0.25);
  EXPECT_GT(deadline, before + std::chrono::seconds(4));
  EXPECT_LT(deadline, before + std::chrono::seconds(6));

  v1::GetServerInfoResponse info;
  EXPECT_EQ(client.GetServerInfo(&info).error_code(), grpc::StatusCode::UNAVAILABLE);
}

}  // namespace
}  // namespace gradserve::client
