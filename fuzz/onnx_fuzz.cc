// libFuzzer target: arbitrary bytes as an ONNX file (OnnxModel.model), seeded with the
// committed torch.onnx.export test models (tests/data/onnx), imported and computed by
// service::ComputeGradients under small limits with a batch made up from the file's declared
// inputs and outputs.
//
// Beyond sanitizer reports it checks that a refusal is INVALID_ARGUMENT or RESOURCE_EXHAUSTED
// with a message, that the same file computed twice gives the same bits, and that an answer
// returns a gradient for every parameter the import found.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz/fuzz_common.h"
#include "onnx/onnx_pb.h"
#include "server/service/compute.h"
#include "server/service/onnx_import.h"

namespace {

using gradserve::fuzz::Check;
namespace v1 = ::gradserve::v1;
namespace service = ::gradserve::service;

// A declared tensor's shape with symbolic or unknown sizes as 2 and large ones capped at 8:
// small enough to compute at once, and right for the seeds' fixed sizes (5 features, 3 outputs).
std::vector<int64_t> ShapeOf(const onnx::ValueInfoProto& value) {
  std::vector<int64_t> shape;
  for (const auto& dim : value.type().tensor_type().shape().dim()) {
    shape.push_back(
        dim.has_dim_value() && dim.dim_value() > 0 ? std::min<int64_t>(dim.dim_value(), 8) : 2);
  }
  return shape;
}

v1::Tensor Zeros(v1::DType dtype, const std::vector<int64_t>& shape) {
  v1::Tensor t;
  t.set_dtype(dtype);
  int64_t n = 1;
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  t.mutable_data()->assign(n * gradserve::fuzz::ElementSize(dtype), '\0');
  return t;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  gradserve::fuzz::SilenceProtobufLogging();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const service::ServiceLimits limits = gradserve::fuzz::SmallLimits();
  v1::ComputeGradientsRequest request;
  request.mutable_model()->mutable_onnx()->set_model(reinterpret_cast<const char*>(data), size);
  // The batch: made up from the file's declarations where it parses, else none (the import
  // refuses the file first).
  onnx::ModelProto file;
  bool tokens = false;
  if (file.ParseFromArray(data, static_cast<int>(size))) {
    for (const onnx::ValueInfoProto& in : file.graph().input()) {
      const int type = in.type().tensor_type().elem_type();
      const bool integer = type == onnx::TensorProto::INT64 || type == onnx::TensorProto::INT32;
      tokens |= integer;
      v1::NamedTensor* named = request.add_graph_inputs();
      named->set_name(in.name());
      *named->mutable_tensor() = Zeros(integer ? v1::DTYPE_INT64 : v1::DTYPE_FLOAT32, ShapeOf(in));
    }
    if (file.graph().output_size() > 0) {
      std::vector<int64_t> shape = ShapeOf(file.graph().output(0));
      v1::NamedTensor* target = request.add_graph_inputs();
      target->set_name("target");
      if (tokens && !shape.empty()) shape.pop_back();  // Class ids for the logits' classes.
      *target->mutable_tensor() = Zeros(tokens ? v1::DTYPE_INT64 : v1::DTYPE_FLOAT32, shape);
    }
  }
  if (tokens) {
    request.mutable_model()->mutable_loss()->mutable_cross_entropy();
  } else {
    request.mutable_model()->mutable_loss()->mutable_mse();
  }
  const std::optional<v1::ComputeGradientsResponse> response =
      gradserve::fuzz::ComputeTwice(request, limits);
  if (!response) return 0;
  absl::StatusOr<service::ImportedOnnx> imported =
      service::ImportOnnx(request.model(), v1::DTYPE_UNSPECIFIED, limits);
  Check(imported.ok(), "an accepted file fails to import: " + imported.status().ToString());
  Check(response->named_gradients_size() == imported->model.graph().parameters_size(),
        "not one gradient per parameter of the file");
  for (int p = 0; p < response->named_gradients_size(); ++p) {
    Check(response->named_gradients(p).name() == imported->model.graph().parameters(p).name(),
          "gradients not in the file's parameter order");
  }
  return 0;
}
