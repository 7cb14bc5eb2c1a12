// `gradclient compute` against the generated gMock stub: the request it builds from .npy files,
// the files it writes, and how it reports a failed call (no server; the real one is in
// tests/e2e/compute_onnx.sh).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "client/compute_command.h"
#include "client/npy.h"
#include "gradserve/v1/gradserve_mock.grpc.pb.h"

namespace gradserve::client::compute {
namespace {

using ::testing::_;
using ::testing::DoAll;
using ::testing::HasSubstr;
using ::testing::Invoke;
using ::testing::Return;

class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "gradserve-compute-test-XXXXXX").string();
    path_ = mkdtemp(pattern.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string File(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

template <typename T>
std::string Bytes(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

template <typename T>
std::string SaveNpy(const TempDir& dir, const std::string& name, npy::DType dtype,
                    std::vector<int64_t> shape, const std::vector<T>& values) {
  const std::string path = dir.File(name);
  std::string error;
  EXPECT_TRUE(npy::Write(path, {dtype, std::move(shape), Bytes(values)}, &error)) << error;
  return path;
}

v1::NamedTensor Named(const std::string& name, const std::vector<float>& values) {
  v1::NamedTensor named;
  named.set_name(name);
  named.mutable_tensor()->set_dtype(v1::DTYPE_FLOAT32);
  named.mutable_tensor()->add_shape(static_cast<int64_t>(values.size()));
  named.mutable_tensor()->set_data(Bytes(values));
  return named;
}

// A model file, x (float64), target (float32) and ids (int64) in `dir`.
ComputeOptions Options(const TempDir& dir) {
  std::ofstream(dir.File("m.onnx"), std::ios::binary) << "not really onnx";
  ComputeOptions options;
  options.onnx_path = dir.File("m.onnx");
  options.inputs = {"x=" + SaveNpy<double>(dir, "x.npy", npy::DType::kFloat64, {2}, {1.5, -2}),
                    "ids=" + SaveNpy<int64_t>(dir, "ids.npy", npy::DType::kInt64, {2}, {3, 4})};
  options.loss_target_path = SaveNpy<float>(dir, "y.npy", npy::DType::kFloat32, {2}, {0.5f, 1});
  return options;
}

TEST(ComputeCommand, NpyFileNameMapsSlashes) {
  EXPECT_EQ(NpyFileName("blocks.0.ln_1.weight"), "blocks.0.ln_1.weight.npy");
  EXPECT_EQ(NpyFileName("/net/Gemm_output_0"), "_net_Gemm_output_0.npy");
}

TEST(ComputeCommand, BuildsTheOnnxRequestInOneFloatingDtype) {
  TempDir dir;
  ComputeOptions options = Options(dir);
  options.dtype = "float32";
  options.loss = "cross_entropy";
  options.reduction = "sum";
  options.frozen = {"mask"};
  options.disable_dropout = true;
  options.dropout_seed = 9;
  options.return_output = true;
  options.params = {"w=" + SaveNpy<double>(dir, "w.npy", npy::DType::kFloat64, {1}, {0.25})};
  v1::ComputeGradientsRequest request;
  std::string error;
  ASSERT_TRUE(BuildRequest(options, &request, &error)) << error;

  const v1::OnnxModel& onnx = request.model().onnx();
  EXPECT_EQ(onnx.model(), "not really onnx");
  EXPECT_EQ(onnx.dtype(), v1::DTYPE_FLOAT32);
  EXPECT_EQ(onnx.loss_target(), "");  // The server's default, "target".
  EXPECT_THAT(onnx.frozen(), testing::ElementsAre("mask"));
  EXPECT_TRUE(onnx.disable_dropout());
  EXPECT_TRUE(request.model().loss().has_cross_entropy());
  EXPECT_EQ(request.model().loss().reduction(), v1::REDUCTION_SUM);
  EXPECT_EQ(request.options().dropout_seed(), 9u);
  EXPECT_TRUE(request.options().return_output());

  ASSERT_EQ(request.graph_inputs_size(), 3);
  EXPECT_EQ(request.graph_inputs(0).name(), "x");
  EXPECT_EQ(request.graph_inputs(0).tensor().dtype(), v1::DTYPE_FLOAT32);
  EXPECT_EQ(request.graph_inputs(0).tensor().data(), Bytes<float>({1.5f, -2}));
  EXPECT_EQ(request.graph_inputs(1).name(), "ids");
  EXPECT_EQ(request.graph_inputs(1).tensor().dtype(), v1::DTYPE_INT64);
  EXPECT_EQ(request.graph_inputs(1).tensor().data(), Bytes<int64_t>({3, 4}));
  EXPECT_EQ(request.graph_inputs(2).name(), "target");
  EXPECT_EQ(request.graph_inputs(2).tensor().dtype(), v1::DTYPE_FLOAT32);
  ASSERT_EQ(request.named_parameters_size(), 1);
  EXPECT_EQ(request.named_parameters(0).name(), "w");
  EXPECT_EQ(request.named_parameters(0).tensor().data(), Bytes<float>({0.25f}));
}

TEST(ComputeCommand, DtypeDefaultsToTheFilesOwnAndMixedFilesNeedTheFlag) {
  TempDir dir;
  ComputeOptions options = Options(dir);
  v1::ComputeGradientsRequest request;
  std::string error;
  EXPECT_FALSE(BuildRequest(options, &request, &error));
  EXPECT_THAT(error, HasSubstr("mix float64"));
  EXPECT_THAT(error, HasSubstr("choose one with --dtype"));

  options.loss_target_path = SaveNpy<double>(dir, "y64.npy", npy::DType::kFloat64, {2}, {0.5, 1});
  options.loss_target_name = "y";
  request.Clear();
  ASSERT_TRUE(BuildRequest(options, &request, &error)) << error;
  EXPECT_EQ(request.model().onnx().dtype(), v1::DTYPE_FLOAT64);
  EXPECT_EQ(request.model().onnx().loss_target(), "y");
  EXPECT_EQ(request.graph_inputs(2).name(), "y");
}

TEST(ComputeCommand, RefusesBadArgumentsNamingThem) {
  TempDir dir;
  ComputeOptions options = Options(dir);
  options.dtype = "float64";
  v1::ComputeGradientsRequest request;
  std::string error;
  options.inputs.push_back("noequals.npy");
  EXPECT_FALSE(BuildRequest(options, &request, &error));
  EXPECT_THAT(error, HasSubstr("--input \"noequals.npy\": expected NAME=FILE.npy"));
  options.inputs.back() = "target=" + dir.File("x.npy");
  EXPECT_FALSE(BuildRequest(options, &request, &error));
  EXPECT_THAT(error, HasSubstr("is given twice (it is also the loss target's name)"));
  options.inputs.back() = "z=" + dir.File("missing.npy");
  EXPECT_FALSE(BuildRequest(options, &request, &error));
  EXPECT_THAT(error, HasSubstr("missing.npy: cannot open"));
}

TEST(ComputeCommand, WritesGradientsOutputsAndLoss) {
  TempDir dir;
  ComputeOptions options = Options(dir);
  options.dtype = "float32";
  options.return_output = true;
  options.out_dir = dir.File("out/nested");
  auto stub = std::make_unique<v1::MockGradientServiceStub>();
  EXPECT_CALL(*stub, ComputeGradients(_, _, _))
      .WillOnce(DoAll(Invoke([](grpc::ClientContext*, const v1::ComputeGradientsRequest&,
                                v1::ComputeGradientsResponse* response) {
                        response->set_loss(0.5);
                        *response->add_named_gradients() = Named("fc.weight", {3, 4});
                        *response->add_named_gradients() = Named("/attn/w", {1});
                        *response->add_outputs() = Named("y", {7, 8});
                      }),
                      Return(grpc::Status::OK)));
  GradientClient client(std::move(stub));
  std::ostringstream out, err;
  ASSERT_EQ(RunCompute(client, options, out, err), 0) << err.str();
  EXPECT_THAT(out.str(), HasSubstr("loss 0.5 (float32, 2 gradients)"));
  EXPECT_THAT(out.str(), HasSubstr("  fc.weight  [2]  norm 5\n"));

  std::string error;
  const std::optional<npy::Array> weight = npy::Read(dir.File("out/nested/fc.weight.npy"), &error);
  ASSERT_TRUE(weight) << error;
  EXPECT_EQ(weight->data, Bytes<float>({3, 4}));
  EXPECT_TRUE(npy::Read(dir.File("out/nested/_attn_w.npy"), &error)) << error;
  EXPECT_TRUE(npy::Read(dir.File("out/nested/outputs/y.npy"), &error)) << error;
  std::ifstream loss(dir.File("out/nested/loss.txt"));
  double value = 0;
  loss >> value;
  EXPECT_EQ(value, 0.5);
}

TEST(ComputeCommand, NamesThatMapToOneFileAreNotWrittenOverEachOther) {
  TempDir dir;
  ComputeOptions options = Options(dir);
  options.dtype = "float32";
  options.out_dir = dir.File("out");
  auto stub = std::make_unique<v1::MockGradientServiceStub>();
  EXPECT_CALL(*stub, ComputeGradients(_, _, _))
      .WillOnce(DoAll(Invoke([](grpc::ClientContext*, const v1::ComputeGradientsRequest&,
                                v1::ComputeGradientsResponse* response) {
                        *response->add_named_gradients() = Named("a/b", {1});
                        *response->add_named_gradients() = Named("a_b", {2});
                      }),
                      Return(grpc::Status::OK)));
  GradientClient client(std::move(stub));
  std::ostringstream out, err;
  EXPECT_EQ(RunCompute(client, options, out, err), 1);
  EXPECT_THAT(err.str(), HasSubstr("\"a/b\" and \"a_b\" would both be written to"));
  EXPECT_FALSE(std::filesystem::exists(dir.File("out/a_b.npy")));
}

TEST(ComputeCommand, FailedCallPrintsTheCodeNameAndMessage) {
  TempDir dir;
  ComputeOptions options = Options(dir);
  options.dtype = "float32";
  auto stub = std::make_unique<v1::MockGradientServiceStub>();
  EXPECT_CALL(*stub, ComputeGradients(_, _, _))
      .WillOnce(Return(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "model.onnx: bad node")));
  GradientClient client(std::move(stub));
  std::ostringstream out, err;
  EXPECT_EQ(RunCompute(client, options, out, err), 1);
  EXPECT_EQ(err.str(),
            "gradclient: ComputeGradients failed: INVALID_ARGUMENT: model.onnx: bad node\n");
}

}  // namespace
}  // namespace gradserve::client::compute
