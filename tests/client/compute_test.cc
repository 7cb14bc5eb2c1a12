// `gradclient compute` against the generated gMock stub: the request it builds from .npy files,
// the files it writes, and how it reports a failed call (no server; the real one is in
// tests/e2e/gradclient.sh).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>
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

// --- --model: chain and graph models in JSON or text format ---------------------------------

constexpr char kMlpJson[] = R"({"layers": [{"linear": {"in_features": 2, "out_features": 3}},
  {"relu": {}}, {"linear": {"in_features": 3, "out_features": 1, "bias": false}}],
  "loss": {"mse": {}}})";
constexpr char kMlpText[] = R"(# a comment first
layers { linear { in_features: 2 out_features: 3 } }
layers { relu {} }
layers { linear { in_features: 3 out_features: 1 bias: false } }
loss { mse {} })";

std::string WriteText(const TempDir& dir, const std::string& name, const std::string& text) {
  std::ofstream(dir.File(name)) << text;
  return dir.File(name);
}

// The chain MLP above as a model file, x [2, 2] float64 and y [2, 1] float64.
ComputeOptions ChainOptions(const TempDir& dir) {
  ComputeOptions options;
  options.model_path = WriteText(dir, "mlp.json", kMlpJson);
  options.inputs = {SaveNpy<double>(dir, "x.npy", npy::DType::kFloat64, {2, 2}, {1, 2, 3, 4})};
  options.loss_target_path = SaveNpy<double>(dir, "y.npy", npy::DType::kFloat64, {2, 1}, {5, 6});
  return options;
}

TEST(ComputeModel, ReadsJsonAndTextFormatByExtensionOrContent) {
  TempDir dir;
  v1::Model json, text, sniffed_json, sniffed_text;
  std::string error;
  ASSERT_TRUE(ReadModelFile(WriteText(dir, "m.json", kMlpJson), &json, &error)) << error;
  ASSERT_TRUE(ReadModelFile(WriteText(dir, "m.txtpb", kMlpText), &text, &error)) << error;
  ASSERT_TRUE(ReadModelFile(WriteText(dir, "m1.model", kMlpJson), &sniffed_json, &error)) << error;
  ASSERT_TRUE(ReadModelFile(WriteText(dir, "m2.model", kMlpText), &sniffed_text, &error)) << error;
  EXPECT_EQ(json.layers_size(), 3);
  EXPECT_TRUE(json.loss().has_mse());
  for (const v1::Model* other : {&text, &sniffed_json, &sniffed_text}) {
    EXPECT_EQ(json.SerializeAsString(), other->SerializeAsString());
  }
}

TEST(ComputeModel, ModelFileErrorsNameTheFileAndWhere) {
  TempDir dir;
  v1::Model model;
  std::string error;
  EXPECT_FALSE(
      ReadModelFile(WriteText(dir, "bad.json", R"({"layers": [{"lineer": {}}]})"), &model, &error));
  EXPECT_THAT(error, HasSubstr("bad.json: not a gradserve.v1.Model in protobuf JSON: "));
  EXPECT_THAT(error, HasSubstr("lineer"));
  EXPECT_FALSE(ReadModelFile(WriteText(dir, "bad.pbtxt", "layers {\n  relu {}\n  tanh {\n"), &model,
                             &error));
  EXPECT_THAT(error,
              HasSubstr("bad.pbtxt: not a gradserve.v1.Model in protobuf text format: "
                        "line 3 column 8: Field \"tanh\" is specified along with field \"relu\""));
  EXPECT_FALSE(ReadModelFile(dir.File("none.json"), &model, &error));
  EXPECT_THAT(error, HasSubstr("none.json: cannot open the model file"));

  ComputeOptions options = ChainOptions(dir);
  options.model_path = WriteText(dir, "empty.txtpb", "loss { mse {} }");
  v1::ComputeGradientsRequest request;
  EXPECT_FALSE(BuildRequest(options, &request, &error));
  EXPECT_THAT(error, HasSubstr("empty.txtpb: the model has neither layers nor a graph"));
  options.model_path = WriteText(dir, "noloss.txtpb", "layers { relu {} }");
  EXPECT_FALSE(BuildRequest(options, &request, &error));
  EXPECT_THAT(error, HasSubstr("noloss.txtpb: the model has no loss"));
  options.loss = "l1";  // ... which --loss supplies.
  EXPECT_TRUE(BuildRequest(options, &request, &error)) << error;
  EXPECT_TRUE(request.model().loss().has_l1());
}

TEST(ComputeModel, ChainParametersAreNamedAsNnSequentialNamesThem) {
  v1::Model model;
  std::string error;
  TempDir dir;
  ASSERT_TRUE(ReadModelFile(WriteText(dir, "m.json", kMlpJson), &model, &error)) << error;
  using Shapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;
  EXPECT_EQ(ChainParameterShapes(model),
            (Shapes{{"0.weight", {3, 2}}, {"0.bias", {3}}, {"2.weight", {1, 3}}}));
}

TEST(ComputeModel, BuildsAChainRequestFromNamedParameterFiles) {
  TempDir dir;
  ComputeOptions options = ChainOptions(dir);
  options.params = {
      "2.weight=" + SaveNpy<double>(dir, "w2.npy", npy::DType::kFloat64, {1, 3}, {7, 8, 9}),
      "0.weight=" +
          SaveNpy<double>(dir, "w0.npy", npy::DType::kFloat64, {3, 2}, {1, 2, 3, 4, 5, 6})};
  options.params_dir = dir.File("pdir");
  std::filesystem::create_directory(options.params_dir);
  SaveNpy<double>(dir, "pdir/0.bias.npy", npy::DType::kFloat64, {3}, {-1, -2, -3});
  options.return_input_gradient = true;
  options.reduction = "sum";
  options.checkpoint = "every:2";
  v1::ComputeGradientsRequest request;
  std::string error;
  ASSERT_TRUE(BuildRequest(options, &request, &error)) << error;
  EXPECT_EQ(request.model().loss().reduction(), v1::REDUCTION_SUM);
  ASSERT_EQ(request.parameters_size(), 2);
  EXPECT_EQ(request.parameters(0).weight().data(), Bytes<double>({1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(request.parameters(0).bias().data(), Bytes<double>({-1, -2, -3}));
  EXPECT_EQ(request.parameters(1).weight().data(), Bytes<double>({7, 8, 9}));
  EXPECT_FALSE(request.parameters(1).has_bias());
  EXPECT_EQ(request.inputs().data(), Bytes<double>({1, 2, 3, 4}));
  EXPECT_THAT(request.inputs().shape(), testing::ElementsAre(2, 2));
  EXPECT_EQ(request.targets().data(), Bytes<double>({5, 6}));
  EXPECT_TRUE(request.options().return_input_gradient());
  EXPECT_EQ(request.options().checkpointing().mode(), v1::Checkpointing::MODE_EVERY_K);
  EXPECT_EQ(request.options().checkpointing().every_k(), 2);
  EXPECT_EQ(request.graph_inputs_size(), 0);

  // Unknown names, wrong shapes and partial sets are refused before any call.
  options.params.push_back("3.weight=" + dir.File("w2.npy"));
  EXPECT_FALSE(BuildRequest(options, &request, &error));
  EXPECT_THAT(error, HasSubstr("the model has no parameter \"3.weight\" (it has: 0.weight [3, 2], "
                               "0.bias [3], 2.weight [1, 3])"));
  options.params.back() = "2.weight=" + dir.File("w0.npy");
  options.params.erase(options.params.begin());
  EXPECT_FALSE(BuildRequest(options, &request, &error));
  EXPECT_THAT(error, HasSubstr("w0.npy: shape [3, 2], but the model's 2.weight is [1, 3]"));
  options.params = {};
  options.params_dir = dir.File("pdir");
  EXPECT_FALSE(BuildRequest(options, &request, &error));
  EXPECT_THAT(error, HasSubstr("parameters missing: 0.weight [3, 2], 2.weight [1, 3]"));
}

TEST(ComputeModel, AChainWithoutParametersIsInitializedFromTheSeed) {
  TempDir dir;
  ComputeOptions options = ChainOptions(dir);
  options.dtype = "float32";
  options.init_seed = 5;
  v1::ComputeGradientsRequest a, b, c;
  BuildInfo info;
  std::string error;
  ASSERT_TRUE(BuildRequest(options, &a, &error, &info)) << error;
  ASSERT_TRUE(BuildRequest(options, &b, &error)) << error;
  options.init_seed = 6;
  ASSERT_TRUE(BuildRequest(options, &c, &error)) << error;
  EXPECT_EQ(a.SerializeAsString(), b.SerializeAsString());
  EXPECT_NE(a.parameters(0).weight().data(), c.parameters(0).weight().data());
  ASSERT_EQ(info.initialized.size(), 3u);
  EXPECT_EQ(info.initialized[0].first, "0.weight");
  EXPECT_EQ(info.initialized[0].second.data(), a.parameters(0).weight().data());
  EXPECT_EQ(a.inputs().dtype(), v1::DTYPE_FLOAT32);
  EXPECT_EQ(a.parameters(0).weight().dtype(), v1::DTYPE_FLOAT32);
  // U(-1/sqrt(in), 1/sqrt(in)) as nn.Linear: in = 2 for layer 0, 3 for layer 2.
  for (const auto& [tensor, in] :
       {std::pair{&a.parameters(0).weight(), 2.0}, std::pair{&a.parameters(0).bias(), 2.0},
        std::pair{&a.parameters(1).weight(), 3.0}}) {
    std::vector<float> values(tensor->data().size() / sizeof(float));
    std::memcpy(values.data(), tensor->data().data(), tensor->data().size());
    for (const float v : values) {
      EXPECT_LE(std::abs(v), 1 / std::sqrt(in));
      EXPECT_NE(v, 0.0f);
    }
  }
}

TEST(ComputeModel, ExternalLossTakesTheOutputGradient) {
  TempDir dir;
  ComputeOptions options = ChainOptions(dir);
  options.loss = "external";
  v1::ComputeGradientsRequest request;
  std::string error;
  EXPECT_FALSE(BuildRequest(options, &request, &error));
  EXPECT_THAT(error, HasSubstr("the external loss takes --output-gradient"));
  options.output_gradient_path = options.loss_target_path;
  options.loss_target_path.clear();
  ASSERT_TRUE(BuildRequest(options, &request, &error)) << error;
  EXPECT_EQ(request.output_gradient().data(), Bytes<double>({5, 6}));
  EXPECT_FALSE(request.has_targets());
}

TEST(ComputeModel, BuildsAGraphRequestInTheGraphsDtype) {
  TempDir dir;
  ComputeOptions options;
  options.model_path = WriteText(dir, "g.txtpb", R"(graph {
    inputs { name: "x" dtype: DTYPE_FLOAT32 }  inputs { name: "y" dtype: DTYPE_FLOAT32 }
    parameters { name: "fc.weight" shape: [1, 2] }  parameters { name: "fc.bias" shape: 1 }
    nodes { op_type: "Gemm" inputs: ["x", "fc.weight", "fc.bias"] outputs: "out"
            attributes { name: "transB" i: 1 } }
    outputs: "out"  loss_output: "out"  loss_target: "y" }
    loss { mse {} })");
  // numpy's default float64 files, converted to the float32 the graph declares.
  options.inputs = {"x=" + SaveNpy<double>(dir, "x.npy", npy::DType::kFloat64, {1, 2}, {1, 2})};
  options.loss_target_path = SaveNpy<double>(dir, "y.npy", npy::DType::kFloat64, {1, 1}, {3});
  options.params_dir = dir.File("p");
  std::filesystem::create_directory(options.params_dir);
  SaveNpy<double>(dir, "p/fc.weight.npy", npy::DType::kFloat64, {1, 2}, {0.5, 0.25});
  options.params = {"fc.bias=" + SaveNpy<float>(dir, "b.npy", npy::DType::kFloat32, {1}, {2})};
  options.return_input_gradient = true;
  v1::ComputeGradientsRequest request;
  std::string error;
  ASSERT_TRUE(BuildRequest(options, &request, &error)) << error;
  ASSERT_EQ(request.named_parameters_size(), 2);
  EXPECT_EQ(request.named_parameters(0).name(), "fc.weight");  // The graph's order.
  EXPECT_EQ(request.named_parameters(0).tensor().data(), Bytes<float>({0.5f, 0.25f}));
  EXPECT_EQ(request.named_parameters(1).tensor().data(), Bytes<float>({2}));
  ASSERT_EQ(request.graph_inputs_size(), 2);
  EXPECT_EQ(request.graph_inputs(0).name(), "x");
  EXPECT_EQ(request.graph_inputs(0).tensor().data(), Bytes<float>({1, 2}));
  EXPECT_EQ(request.graph_inputs(1).name(), "y");
  EXPECT_EQ(request.graph_inputs(1).tensor().dtype(), v1::DTYPE_FLOAT32);
  EXPECT_THAT(request.options().input_gradient_names(), testing::ElementsAre("x"));

  options.params_dir.clear();
  options.params.clear();
  EXPECT_FALSE(BuildRequest(options, &request, &error));
  EXPECT_THAT(error, HasSubstr("parameters missing: fc.weight [1, 2], fc.bias [1]"));
  options.frozen = {"fc.bias"};
  EXPECT_FALSE(BuildRequest(options, &request, &error));
  EXPECT_THAT(error, HasSubstr("--frozen applies to --onnx models only"));
}

TEST(ComputeModel, WritesChainGradientsUnderStateDictNames) {
  TempDir dir;
  ComputeOptions options = ChainOptions(dir);
  options.out_dir = dir.File("out");
  options.return_input_gradient = true;
  auto stub = std::make_unique<v1::MockGradientServiceStub>();
  EXPECT_CALL(*stub, ComputeGradients(_, _, _))
      .WillOnce(DoAll(Invoke([](grpc::ClientContext*, const v1::ComputeGradientsRequest&,
                                v1::ComputeGradientsResponse* response) {
                        response->set_loss(0.1);
                        auto tensor = [](std::vector<int64_t> shape,
                                         const std::vector<double>& values) {
                          v1::Tensor t;
                          t.set_dtype(v1::DTYPE_FLOAT64);
                          for (const int64_t d : shape) t.add_shape(d);
                          t.set_data(Bytes(values));
                          return t;
                        };
                        v1::LinearGradients* g0 = response->add_gradients();
                        *g0->mutable_weight() = tensor({3, 2}, {1, 2, 3, 4, 5, 6});
                        *g0->mutable_bias() = tensor({3}, {7, 8, 9});
                        *response->add_gradients()->mutable_weight() = tensor({1, 3}, {3, 0, 4});
                        *response->mutable_input_gradient() = tensor({2, 2}, {1, 1, 1, 1});
                        v1::LayerDiagnostics* d = response->add_diagnostics();
                        d->set_layer_index(0);
                        d->set_kind("linear");
                        d->set_weight_grad_norm(9.5);
                      }),
                      Return(grpc::Status::OK)));
  GradientClient client(std::move(stub));
  std::ostringstream out, err;
  ASSERT_EQ(RunCompute(client, options, out, err), 0) << err.str();
  EXPECT_THAT(out.str(), HasSubstr("initialized 3 parameters as torch.nn.Linear does"));
  EXPECT_THAT(out.str(), HasSubstr("loss 0.1 (float64, 3 gradients)"));
  EXPECT_THAT(out.str(), HasSubstr("  2.weight        [1, 3]  norm 5\n"));
  EXPECT_THAT(out.str(), HasSubstr("  d/d input_gradient  [2, 2]  norm 2\n"));
  EXPECT_THAT(out.str(), HasSubstr("[0] linear     |dW|=9.5"));

  std::string error;
  for (const auto& [file, bytes] : {std::pair{"0.weight.npy", Bytes<double>({1, 2, 3, 4, 5, 6})},
                                    std::pair{"0.bias.npy", Bytes<double>({7, 8, 9})},
                                    std::pair{"2.weight.npy", Bytes<double>({3, 0, 4})},
                                    std::pair{"input_gradient.npy", Bytes<double>({1, 1, 1, 1})}}) {
    const std::optional<npy::Array> array = npy::Read(dir.File("out/") + file, &error);
    ASSERT_TRUE(array) << error;
    EXPECT_EQ(array->data, bytes) << file;
  }
  EXPECT_TRUE(npy::Read(dir.File("out/params/0.weight.npy"), &error)) << error;
  EXPECT_TRUE(npy::Read(dir.File("out/params/2.weight.npy"), &error)) << error;
  std::ifstream loss(dir.File("out/loss.txt"));
  std::string text;
  std::getline(loss, text);
  EXPECT_EQ(text, "0.10000000000000001");  // %.17g: the double itself, for byte comparisons.
}

}  // namespace
}  // namespace gradserve::client::compute
