// ONNX import (server/service/onnx_import.h) through the service's compute functions: the
// committed torch.onnx.export test models (tests/data/onnx, made by export_models.py) against
// PyTorch autograd's committed gradients, streams, parameter overrides, and a table of files
// the server must refuse with a clear status naming the node.
#include "server/service/onnx_import.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gradserve/v1/gradserve.pb.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "onnx/onnx_pb.h"
#include "server/service/compute.h"
#include "server/service/stream.h"

namespace gradserve::service {
namespace {

namespace v1 = ::gradserve::v1;
using ::testing::HasSubstr;
using json = nlohmann::json;

const std::filesystem::path kData = GRADSERVE_ONNX_TEST_DATA;

std::string ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

// A reference tensor of the JSON as the API's, floating ones in `dtype`.
v1::Tensor ToTensor(const json& t, v1::DType dtype) {
  v1::Tensor out;
  for (int64_t d : t["shape"]) out.add_shape(d);
  std::string* data = out.mutable_data();
  if (t["dtype"] == "int64") {
    out.set_dtype(v1::DTYPE_INT64);
    for (int64_t v : t["data"]) data->append(reinterpret_cast<const char*>(&v), sizeof(v));
  } else if (dtype == v1::DTYPE_FLOAT32) {
    out.set_dtype(dtype);
    for (double v : t["data"]) {
      const float f = static_cast<float>(v);
      data->append(reinterpret_cast<const char*>(&f), sizeof(f));
    }
  } else {
    out.set_dtype(dtype);
    for (double v : t["data"]) data->append(reinterpret_cast<const char*>(&v), sizeof(v));
  }
  return out;
}

std::vector<double> Values(const v1::Tensor& t) {
  std::vector<double> out;
  const size_t n = t.data().size() / (t.dtype() == v1::DTYPE_FLOAT32 ? 4 : 8);
  for (size_t i = 0; i < n; ++i) {
    if (t.dtype() == v1::DTYPE_FLOAT32) {
      float f;
      std::memcpy(&f, t.data().data() + 4 * i, 4);
      out.push_back(f);
    } else {
      double d;
      std::memcpy(&d, t.data().data() + 8 * i, 8);
      out.push_back(d);
    }
  }
  return out;
}

struct Case {
  json reference;
  std::string precision;  // "float32" or "float64"
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.reference["model"].get<std::string>() << " " << c.precision;
}

v1::ComputeGradientsRequest ReferenceRequest(const Case& c) {
  const json& ref = c.reference;
  const v1::DType dtype = c.precision == "float32" ? v1::DTYPE_FLOAT32 : v1::DTYPE_FLOAT64;
  v1::ComputeGradientsRequest request;
  v1::Model* model = request.mutable_model();
  model->mutable_onnx()->set_model(ReadFile(kData / ref[c.precision]["file"].get<std::string>()));
  model->mutable_onnx()->set_disable_dropout(ref["options"].value("disable_dropout", false));
  if (ref["loss"] == "mse") {
    model->mutable_loss()->mutable_mse();
  } else {
    model->mutable_loss()->mutable_cross_entropy();
  }
  for (const auto& [name, t] : ref["inputs"].items()) {
    v1::NamedTensor* in = request.add_graph_inputs();
    in->set_name(name);
    *in->mutable_tensor() = ToTensor(t, dtype);
  }
  v1::NamedTensor* target = request.add_graph_inputs();
  target->set_name("target");
  *target->mutable_tensor() = ToTensor(ref["target"], dtype);
  return request;
}

std::vector<Case> ReferenceCases() {
  std::vector<Case> cases;
  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(kData)) {
    if (entry.path().extension() == ".json") files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  for (const auto& path : files) {
    const json ref = json::parse(ReadFile(path));
    cases.push_back({ref, "float64"});
    cases.push_back({ref, "float32"});
  }
  return cases;
}

class OnnxReference : public ::testing::TestWithParam<Case> {};

// The file sent as-is returns PyTorch's loss and gradients, by initializer name.
TEST_P(OnnxReference, MatchesPyTorchAutograd) {
  const Case& c = GetParam();
  const double tolerance = c.precision == "float64" ? 1e-9 : 1e-4;
  v1::ComputeGradientsResponse response;
  const absl::Status status =
      ComputeGradients(ReferenceRequest(c), ServiceLimits(), ComputeContext(), &response);
  ASSERT_TRUE(status.ok()) << status;
  const json& want = c.reference[c.precision];
  ASSERT_EQ(response.named_gradients_size(), static_cast<int>(want["gradients"].size()));
  for (const v1::NamedTensor& g : response.named_gradients()) {
    ASSERT_TRUE(want["gradients"].contains(g.name())) << g.name();
    const json& w = want["gradients"][g.name()];
    EXPECT_EQ(std::vector<int64_t>(g.tensor().shape().begin(), g.tensor().shape().end()),
              w["shape"].get<std::vector<int64_t>>())
        << g.name();
    const std::vector<double> got = Values(g.tensor());
    const std::vector<double> expected = w["data"].get<std::vector<double>>();
    ASSERT_EQ(got.size(), expected.size()) << g.name();
    double scale = 1e-30, worst = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      scale = std::max(scale, std::abs(expected[i]));
      worst = std::max(worst, std::abs(got[i] - expected[i]));
    }
    EXPECT_LE(worst / scale, tolerance) << g.name();
  }
  const double loss = want["loss"];
  EXPECT_LE(std::abs(response.loss() - loss) / std::abs(loss), tolerance);
}

// A stream imports the file once and holds its values: its first step answers as the unary
// call, bit for bit; a later step replacing one parameter by name answers as a unary call
// sending it.
TEST_P(OnnxReference, StreamHoldsTheFilesParameters) {
  const Case& c = GetParam();
  const v1::ComputeGradientsRequest unary = ReferenceRequest(c);
  v1::ComputeGradientsResponse expected;
  ASSERT_TRUE(ComputeGradients(unary, ServiceLimits(), ComputeContext(), &expected).ok());

  StreamSession session{ServiceLimits()};
  v1::StreamGradientsRequest setup;
  *setup.mutable_setup()->mutable_model() = unary.model();
  setup.mutable_setup()->set_dtype(c.precision == "float32" ? v1::DTYPE_FLOAT32
                                                            : v1::DTYPE_FLOAT64);
  v1::StreamGradientsResponse answer;
  ASSERT_TRUE(session.Handle(&setup, ComputeContext(), &answer).ok());
  v1::StreamGradientsRequest step;
  *step.mutable_step()->mutable_graph_inputs() = unary.graph_inputs();
  answer.Clear();
  absl::StatusOr<bool> answered = session.Handle(&step, ComputeContext(), &answer);
  ASSERT_TRUE(answered.ok()) << answered.status();
  ASSERT_TRUE(*answered);
  EXPECT_EQ(answer.result().loss(), expected.loss());
  ASSERT_EQ(answer.result().named_gradients_size(), expected.named_gradients_size());
  for (int p = 0; p < expected.named_gradients_size(); ++p) {
    EXPECT_EQ(answer.result().named_gradients(p).tensor().data(),
              expected.named_gradients(p).tensor().data());
  }

  // Halve the first parameter, on the stream and in a unary call.
  const v1::NamedTensor& first = expected.named_gradients(0);
  v1::ComputeGradientsRequest with_override = unary;
  ASSERT_TRUE(LowerOnnxRequest(&with_override, ServiceLimits()).ok());
  v1::NamedTensor replaced;
  for (const v1::NamedTensor& p : with_override.named_parameters()) {
    if (p.name() == first.name()) replaced = p;
  }
  ASSERT_EQ(replaced.name(), first.name());
  std::string* data = replaced.mutable_tensor()->mutable_data();
  if (replaced.tensor().dtype() == v1::DTYPE_FLOAT32) {
    for (size_t i = 0; i < data->size(); i += 4) {
      float f;
      std::memcpy(&f, data->data() + i, 4);
      f *= 0.5f;
      std::memcpy(data->data() + i, &f, 4);
    }
  } else {
    for (size_t i = 0; i < data->size(); i += 8) {
      double d;
      std::memcpy(&d, data->data() + i, 8);
      d *= 0.5;
      std::memcpy(data->data() + i, &d, 8);
    }
  }
  v1::ComputeGradientsRequest unary_override = unary;
  *unary_override.add_named_parameters() = replaced;
  v1::ComputeGradientsResponse expected_override;
  ASSERT_TRUE(
      ComputeGradients(unary_override, ServiceLimits(), ComputeContext(), &expected_override).ok());
  EXPECT_NE(expected_override.loss(), expected.loss());
  v1::StreamGradientsRequest step2;
  *step2.mutable_step()->mutable_graph_inputs() = unary.graph_inputs();
  *step2.mutable_step()->add_named_parameters() = replaced;
  v1::StreamGradientsResponse answer2;
  answered = session.Handle(&step2, ComputeContext(), &answer2);
  ASSERT_TRUE(answered.ok()) << answered.status();
  EXPECT_EQ(answer2.result().loss(), expected_override.loss());
}

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  return info.param.reference["model"].get<std::string>() + "_" + info.param.precision;
}

INSTANTIATE_TEST_SUITE_P(CommittedModels, OnnxReference, ::testing::ValuesIn(ReferenceCases()),
                         CaseName);

// Buffers are constants, not parameters: the causal masks of both decoders (one additive with
// -inf, one 0/1 read through Equal) get no gradient, and frozen holds any initializer constant.
TEST(OnnxImport, TrainsWeightsNotBuffers) {
  v1::Model model;
  model.mutable_onnx()->set_model(ReadFile(kData / "mlp.onnx"));
  model.mutable_loss()->mutable_mse();
  absl::StatusOr<ImportedOnnx> imported = ImportOnnx(model, v1::DTYPE_UNSPECIFIED, ServiceLimits());
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_EQ(imported->dtype, v1::DTYPE_FLOAT32);
  EXPECT_EQ(imported->model.graph().parameters_size(), 14);
  model.mutable_onnx()->add_frozen("net.0.weight");
  imported = ImportOnnx(model, v1::DTYPE_UNSPECIFIED, ServiceLimits());
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_EQ(imported->model.graph().parameters_size(), 13);
  EXPECT_EQ(imported->model.graph().constants(0).name(), "net.0.weight");
  // The file's dtype can be overridden: float32 weights computed in float64.
  model.mutable_onnx()->set_dtype(v1::DTYPE_FLOAT64);
  imported = ImportOnnx(model, v1::DTYPE_UNSPECIFIED, ServiceLimits());
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_EQ(imported->defaults[0].tensor().dtype(), v1::DTYPE_FLOAT64);
}

// Dropout in the file runs seeded: the same dropout_seed gives the same gradients, another
// seed others; disable_dropout matches the reference (PyTorch with dropout off).
TEST(OnnxImport, DropoutIsSeededOrOff) {
  const json ref = json::parse(ReadFile(kData / "dropout_mlp.json"));
  v1::ComputeGradientsRequest request = ReferenceRequest({ref, "float64"});
  request.mutable_model()->mutable_onnx()->set_disable_dropout(false);
  auto loss_with_seed = [&](uint64_t seed) {
    v1::ComputeGradientsRequest r = request;
    r.mutable_options()->set_dropout_seed(seed);
    v1::ComputeGradientsResponse response;
    const absl::Status status = ComputeGradients(r, ServiceLimits(), ComputeContext(), &response);
    EXPECT_TRUE(status.ok()) << status;
    return response.loss();
  };
  EXPECT_EQ(loss_with_seed(1), loss_with_seed(1));
  EXPECT_NE(loss_with_seed(1), loss_with_seed(2));
  const double off = ref["float64"]["loss"];
  EXPECT_NE(loss_with_seed(1), off);
}

// CheckGradients takes an ONNX model as ComputeGradients does: every parameter the file trains
// is sampled against central differences.
TEST(OnnxImport, CheckGradientsSamplesEveryParameterOfTheFile) {
  const json ref = json::parse(ReadFile(kData / "residual_mlp.json"));
  v1::CheckGradientsRequest check;
  *check.mutable_request() = ReferenceRequest({ref, "float64"});
  check.set_samples_per_tensor(4);
  v1::CheckGradientsResponse response;
  const absl::Status status = CheckGradients(check, ServiceLimits(), ComputeContext(), &response);
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(response.checks_size(), static_cast<int>(ref["float64"]["gradients"].size()));
  EXPECT_LT(response.max_rel_error(), 1e-6);
}

// --- Files the server refuses: each with its status and the node or field it names. ---

onnx::ModelProto LoadModel(const std::string& file) {
  onnx::ModelProto model;
  EXPECT_TRUE(model.ParseFromString(ReadFile(kData / file)));
  return model;
}

absl::Status Send(const std::string& bytes, const std::string& loss = "mse") {
  v1::ComputeGradientsRequest request;
  request.mutable_model()->mutable_onnx()->set_model(bytes);
  if (loss == "mse") {
    request.mutable_model()->mutable_loss()->mutable_mse();
  } else {
    request.mutable_model()->mutable_loss()->mutable_cross_entropy();
  }
  // A batch for mlp.onnx: x [2, 5], target [2, 3].
  for (const auto& [name, shape] : std::vector<std::pair<std::string, std::vector<int64_t>>>{
           {"x", {2, 5}}, {"target", {2, 3}}}) {
    v1::NamedTensor* in = request.add_graph_inputs();
    in->set_name(name);
    in->mutable_tensor()->set_dtype(v1::DTYPE_FLOAT32);
    for (int64_t d : shape) in->mutable_tensor()->add_shape(d);
    in->mutable_tensor()->mutable_data()->assign(4 * shape[0] * shape[1], '\0');
  }
  v1::ComputeGradientsResponse response;
  return ComputeGradients(request, ServiceLimits(), ComputeContext(), &response);
}

struct Refusal {
  const char* what;
  std::function<std::string()> file;
  absl::StatusCode code;
  std::vector<std::string> says;  // Substrings the message must contain.
};

std::string Serialized(const onnx::ModelProto& model) { return model.SerializeAsString(); }

TEST(OnnxImport, RefusesWhatItCannotDifferentiate) {
  const std::vector<Refusal> table = {
      {"an unknown op",
       [] {
         onnx::ModelProto m = LoadModel("mlp.onnx");
         m.mutable_graph()->mutable_node(1)->set_op_type("Softplus");
         return Serialized(m);
       },
       absl::StatusCode::kInvalidArgument,
       {"model.onnx", "graph.node[1]", "Softplus", "opset 17", "not supported"}},
      {"an op of another domain",
       [] {
         onnx::ModelProto m = LoadModel("mlp.onnx");
         m.mutable_graph()->mutable_node(1)->set_domain("com.microsoft");
         auto* opset = m.add_opset_import();
         opset->set_domain("com.microsoft");
         opset->set_version(1);
         return Serialized(m);
       },
       absl::StatusCode::kInvalidArgument,
       {"graph.node[1]", "com.microsoft"}},
      {"a file from a newer opset",
       [] {
         onnx::ModelProto m = LoadModel("mlp.onnx");
         m.mutable_opset_import(0)->set_version(18);
         return Serialized(m);
       },
       absl::StatusCode::kInvalidArgument,
       {"model.onnx.model", "opset 18", "opset_version=13 to 17"}},
      {"a file from an older opset",
       [] {
         onnx::ModelProto m = LoadModel("mlp.onnx");
         m.mutable_opset_import(0)->set_version(11);
         return Serialized(m);
       },
       absl::StatusCode::kInvalidArgument,
       {"opset 11"}},
      {"truncated bytes",
       [] {
         const std::string bytes = ReadFile(kData / "mlp.onnx");
         return bytes.substr(0, bytes.size() / 2);
       },
       absl::StatusCode::kInvalidArgument,
       {"model.onnx.model", "not a serialized ONNX ModelProto"}},
      {"not ONNX at all",
       [] { return std::string("GIF89a\x01\x02\x03", 9) + " not a model"; },
       absl::StatusCode::kInvalidArgument,
       {"model.onnx.model"}},
      {"an initializer whose bytes do not match its shape",
       [] {
         onnx::ModelProto m = LoadModel("mlp.onnx");
         m.mutable_graph()->mutable_initializer(0)->set_dims(0, 9);
         return Serialized(m);
       },
       absl::StatusCode::kInvalidArgument,
       {"graph.initializer[0] (\"net.0.weight\")", "raw_data holds 35 elements", "[9, 5]"}},
      {"an initializer claiming 2^62 elements",
       [] {
         onnx::ModelProto m = LoadModel("mlp.onnx");
         m.mutable_graph()->mutable_initializer(0)->set_dims(0, int64_t{1} << 31);
         m.mutable_graph()->mutable_initializer(0)->set_dims(1, int64_t{1} << 31);
         return Serialized(m);
       },
       absl::StatusCode::kResourceExhausted,
       {"graph.initializer[0]", "max_tensor_elements"}},
      {"external data",
       [] {
         onnx::ModelProto m = LoadModel("mlp.onnx");
         auto* t = m.mutable_graph()->mutable_initializer(0);
         t->clear_raw_data();
         t->set_data_location(onnx::TensorProto::EXTERNAL);
         auto* entry = t->add_external_data();
         entry->set_key("location");
         entry->set_value("/etc/passwd");
         return Serialized(m);
       },
       absl::StatusCode::kInvalidArgument,
       {"graph.initializer[0]", "external data"}},
      {"a shape the fold cannot resolve",
       [] {
         // Reshape to a shape computed from the batch's data, not its shape.
         onnx::ModelProto m = LoadModel("mlp.onnx");
         onnx::GraphProto* g = m.mutable_graph();
         onnx::NodeProto* cast = g->add_node();
         cast->set_op_type("Cast");
         cast->set_name("/dyn/Cast");
         cast->add_input("y");
         cast->add_output("/dyn/shape");
         auto* to = cast->add_attribute();
         to->set_name("to");
         to->set_type(onnx::AttributeProto::INT);
         to->set_i(onnx::TensorProto::INT64);
         onnx::NodeProto* reshape = g->add_node();
         reshape->set_op_type("Reshape");
         reshape->set_name("/dyn/Reshape");
         reshape->add_input("y");
         reshape->add_input("/dyn/shape");
         reshape->add_output("z");
         g->mutable_output(0)->set_name("z");
         return Serialized(m);
       },
       absl::StatusCode::kInvalidArgument,
       {"model.onnx: graph.node[", "/dyn/Reshape", "Reshape", "constant"}},
      {"a node reading an undefined value",
       [] {
         onnx::ModelProto m = LoadModel("mlp.onnx");
         m.mutable_graph()->mutable_node(2)->set_input(0, "nowhere");
         return Serialized(m);
       },
       absl::StatusCode::kInvalidArgument,
       {"ONNX's checker", "nowhere"}},
  };
  for (const Refusal& r : table) {
    SCOPED_TRACE(r.what);
    const absl::Status status = Send(r.file());
    EXPECT_EQ(status.code(), r.code) << status;
    for (const std::string& s : r.says) EXPECT_THAT(status.message(), HasSubstr(s));
  }
}

// The request's own fields: loss output and target names, frozen and dtype.
TEST(OnnxImport, NamesTheRequestsFields) {
  const std::string bytes = ReadFile(kData / "mlp.onnx");
  auto send = [&](const std::function<void(v1::OnnxModel*)>& edit) {
    v1::Model model;
    model.mutable_onnx()->set_model(bytes);
    model.mutable_loss()->mutable_mse();
    edit(model.mutable_onnx());
    return ImportOnnx(model, v1::DTYPE_UNSPECIFIED, ServiceLimits()).status();
  };
  EXPECT_THAT(send([](v1::OnnxModel* m) { m->set_loss_output("logits"); }).message(),
              HasSubstr("model.onnx.loss_output: \"logits\" is not an output"));
  EXPECT_THAT(send([](v1::OnnxModel* m) { m->set_loss_target("x"); }).message(),
              HasSubstr("model.onnx.loss_target: \"x\" is already a value"));
  EXPECT_THAT(send([](v1::OnnxModel* m) { m->add_frozen("nope"); }).message(),
              HasSubstr("model.onnx.frozen[0]: \"nope\" is not an initializer"));
  EXPECT_THAT(send([](v1::OnnxModel* m) { m->set_dtype(v1::DTYPE_INT64); }).message(),
              HasSubstr("model.onnx.dtype"));
  EXPECT_THAT(send([](v1::OnnxModel* m) { m->add_batch_inputs("nope"); }).message(),
              HasSubstr("model.onnx.batch_inputs[0]"));
  // A parameter sent in another dtype than the file computes in.
  v1::ComputeGradientsRequest request;
  request.mutable_model()->mutable_onnx()->set_model(bytes);
  request.mutable_model()->mutable_loss()->mutable_mse();
  v1::NamedTensor* p = request.add_named_parameters();
  p->set_name("net.0.bias");
  p->mutable_tensor()->set_dtype(v1::DTYPE_FLOAT64);
  EXPECT_THAT(LowerOnnxRequest(&request, ServiceLimits()).message(),
              HasSubstr("named_parameters[0].tensor.dtype: expected DTYPE_FLOAT32"));
}

// The graph limits apply to the imported graph before anything is converted.
TEST(OnnxImport, LimitsApplyBeforeConversion) {
  ServiceLimits limits;
  limits.max_graph_nodes = 5;
  v1::Model model;
  model.mutable_onnx()->set_model(ReadFile(kData / "gpt_tied.onnx"));
  model.mutable_loss()->mutable_cross_entropy();
  const absl::Status status = ImportOnnx(model, v1::DTYPE_UNSPECIFIED, limits).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted) << status;
  EXPECT_THAT(status.message(), HasSubstr("max_graph_nodes"));
}

}  // namespace
}  // namespace gradserve::service
