// What the fuzz targets share: small limits, and the checks every answer must pass beyond
// "no sanitizer report". A failed check aborts, so libFuzzer keeps the input as a crash.
#ifndef GRADSERVE_FUZZ_FUZZ_COMMON_H_
#define GRADSERVE_FUZZ_FUZZ_COMMON_H_

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/stubs/logging.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "gradserve/v1/gradserve.pb.h"
#include "server/service/compute.h"
#include "server/service/limits.h"

namespace gradserve::fuzz {

namespace v1 = ::gradserve::v1;

// Small enough that any request that validates computes in milliseconds, even under ASan.
inline service::ServiceLimits SmallLimits() {
  service::ServiceLimits limits;
  limits.max_tensor_elements = 4096;
  limits.max_layers = 16;
  limits.max_batch = 64;
  limits.max_features = 64;
  limits.max_activation_bytes = int64_t{1} << 20;
  limits.max_message_bytes = int64_t{1} << 20;
  // CheckGradients runs two forward passes per sampled entry per tensor: keep it bounded.
  limits.max_check_samples = 8;
  limits.max_stream_bytes = int64_t{256} << 10;
  limits.max_streams = 1;
  // Graphs: a 2-block GPT fits (about 70 nodes and 130 values).
  limits.max_graph_nodes = 128;
  limits.max_graph_values = 512;
  limits.max_graph_rank = 4;
  return limits;
}

[[noreturn]] inline void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz check failed: %s\n", what.c_str());
  std::abort();
}

inline void Check(bool condition, const std::string& what) {
  if (!condition) Fail(what);
}

// Validation errors are INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a message; anything else
// (INTERNAL, UNKNOWN, an empty message, ...) is a bug.
inline void CheckRefusal(const absl::Status& status) {
  Check(status.code() == absl::StatusCode::kInvalidArgument ||
            status.code() == absl::StatusCode::kResourceExhausted,
        "unexpected status " + status.ToString());
  Check(!status.message().empty(), "an error without a message");
}

inline int64_t ElementSize(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
    case v1::DTYPE_INT32:
      return 4;
    case v1::DTYPE_FLOAT64:
    case v1::DTYPE_INT64:
      return 8;
    default:
      return 0;
  }
}

// A tensor the server sends is floating, rank 1 or 2, and exactly as long as its shape says.
inline void CheckTensor(const v1::Tensor& tensor, v1::DType dtype, const std::string& name) {
  Check(tensor.dtype() == dtype, name + ": dtype differs from the request's");
  Check(tensor.shape_size() == 1 || tensor.shape_size() == 2, name + ": rank not 1 or 2");
  int64_t elements = 1;
  for (int64_t dim : tensor.shape()) {
    Check(dim > 0, name + ": non-positive dimension");
    elements *= dim;
  }
  Check(static_cast<int64_t>(tensor.data().size()) == elements * ElementSize(dtype),
        name + ": data length " + std::to_string(tensor.data().size()) + " does not match shape");
}

// The parts of a response that must be the same on every run (everything but wall times).
inline std::string Deterministic(v1::ComputeGradientsResponse response) {
  response.mutable_stats()->clear_forward_micros();
  response.mutable_stats()->clear_backward_micros();
  std::string bytes;
  google::protobuf::io::StringOutputStream stream(&bytes);
  google::protobuf::io::CodedOutputStream coded(&stream);
  coded.SetSerializationDeterministic(true);
  response.SerializeToCodedStream(&coded);
  coded.Trim();
  return bytes;
}

// An answer to `request` (which ComputeGradients accepted) is complete and well formed.
inline void CheckComputeResponse(const v1::Model& model, const v1::ComputeOptions& options,
                                 v1::DType dtype, int64_t batch,
                                 const v1::ComputeGradientsResponse& response) {
  int linear = 0;
  for (const v1::Layer& layer : model.layers()) {
    if (!layer.has_linear()) continue;
    Check(linear < response.gradients_size(), "fewer gradients than Linear layers");
    const v1::LinearGradients& g = response.gradients(linear);
    const std::string name = "gradients[" + std::to_string(linear) + "]";
    CheckTensor(g.weight(), dtype, name + ".weight");
    Check(g.weight().shape_size() == 2 && g.weight().shape(0) == layer.linear().out_features() &&
              g.weight().shape(1) == layer.linear().in_features(),
          name + ".weight: shape is not [out, in]");
    const bool bias = !layer.linear().has_bias() || layer.linear().bias();
    Check(g.has_bias() == bias, name + ".bias: present iff the layer has a bias");
    if (bias) CheckTensor(g.bias(), dtype, name + ".bias");
    ++linear;
  }
  Check(response.gradients_size() == linear, "more gradients than Linear layers");
  Check(response.diagnostics_size() == model.layers_size(), "one diagnostics entry per layer");
  // Note [Diagnostics rule] in the .proto: a norm is present iff its gradient was computed.
  bool output_gradient_computed = options.return_input_gradient() || linear == 0;
  for (int i = 0; i < model.layers_size() && i < response.diagnostics_size(); ++i) {
    const v1::Layer& layer = model.layers(i);
    const v1::LayerDiagnostics& d = response.diagnostics(i);
    const std::string name = "diagnostics[" + std::to_string(i) + "]";
    output_gradient_computed = output_gradient_computed || layer.has_linear();
    Check(d.has_output_grad_norm() == (output_gradient_computed || i + 1 == model.layers_size()),
          name + ".output_grad_norm: present iff computed");
    Check(d.has_weight_grad_norm() == layer.has_linear(),
          name + ".weight_grad_norm: present iff a Linear layer");
    Check(d.has_bias_grad_norm() ==
              (layer.has_linear() && (!layer.linear().has_bias() || layer.linear().bias())),
          name + ".bias_grad_norm: present iff a Linear layer with bias");
  }
  Check(response.has_input_gradient() == options.return_input_gradient(),
        "input_gradient present iff asked for");
  if (response.has_input_gradient()) {
    CheckTensor(response.input_gradient(), dtype, "input_gradient");
    Check(response.input_gradient().shape(0) == batch, "input_gradient: rows != batch");
  }
  Check(response.has_output() == options.return_output(), "output present iff asked for");
  if (response.has_output()) {
    CheckTensor(response.output(), dtype, "output");
    Check(response.output().shape(0) == batch, "output: rows != batch");
  }
  Check(response.stats().num_examples() == batch, "stats.num_examples != batch");
}

// The request's floating dtype as the service takes it: that of its floating graph inputs and
// parameters (FLOAT32 if it sends none).
inline v1::DType GraphRequestDType(const v1::ComputeGradientsRequest& request) {
  for (const v1::NamedTensor& p : request.named_parameters()) return p.tensor().dtype();
  for (const v1::NamedTensor& in : request.graph_inputs()) {
    const v1::DType dtype = in.tensor().dtype();
    if (dtype == v1::DTYPE_FLOAT32 || dtype == v1::DTYPE_FLOAT64) return dtype;
  }
  return v1::DTYPE_FLOAT32;
}

// An answer to a graph request (which ComputeGradients accepted) is complete and well formed:
// one gradient and one diagnostic per declared parameter, named, shaped and typed as declared;
// one input gradient per name asked for; the outputs iff asked for.
inline void CheckGraphResponse(const v1::Model& model, const v1::ComputeOptions& options,
                               v1::DType dtype, const v1::ComputeGradientsResponse& response) {
  const v1::Graph& graph = model.graph();
  Check(response.gradients_size() == 0 && response.diagnostics_size() == 0,
        "a graph's answer with chain fields");
  Check(response.named_gradients_size() == graph.parameters_size(),
        "not one named gradient per parameter");
  Check(response.parameter_diagnostics_size() == graph.parameters_size(),
        "not one parameter diagnostic per parameter");
  for (int p = 0; p < graph.parameters_size(); ++p) {
    const v1::NamedTensor& g = response.named_gradients(p);
    const std::string name = "named_gradients[" + std::to_string(p) + "]";
    Check(g.name() == graph.parameters(p).name(), name + ": not the parameter's name");
    Check(response.parameter_diagnostics(p).name() == g.name(), name + ": diagnostic's name");
    Check(std::equal(g.tensor().shape().begin(), g.tensor().shape().end(),
                     graph.parameters(p).shape().begin(), graph.parameters(p).shape().end()),
          name + ": not the declared shape");
    Check(g.tensor().dtype() == dtype, name + ": dtype differs from the request's");
    int64_t elements = 1;
    for (int64_t dim : g.tensor().shape()) elements *= dim;
    Check(static_cast<int64_t>(g.tensor().data().size()) == elements * ElementSize(dtype),
          name + ": data length does not match shape");
  }
  Check(response.input_gradients_size() == options.input_gradient_names_size(),
        "not one input gradient per name asked for");
  for (int i = 0; i < response.input_gradients_size(); ++i) {
    Check(response.input_gradients(i).name() == options.input_gradient_names(i),
          "input gradients out of order");
    Check(response.input_gradients(i).tensor().dtype() == dtype, "input gradient dtype");
  }
  Check(response.outputs_size() == (options.return_output() ? graph.outputs_size() : 0),
        "outputs present iff asked for");
  Check(response.stats().num_examples() >= 1, "stats.num_examples < 1");
}

// ComputeGradients on `request` twice: nullopt if it is refused (with a refusal's status),
// else its answer, which must be the same bits both times.
inline std::optional<v1::ComputeGradientsResponse> ComputeTwice(
    const v1::ComputeGradientsRequest& request, const service::ServiceLimits& limits) {
  v1::ComputeGradientsResponse response;
  const absl::Status status =
      service::ComputeGradients(request, limits, service::ComputeContext(), &response);
  if (!status.ok()) {
    CheckRefusal(status);
    return std::nullopt;
  }
  v1::ComputeGradientsResponse again;
  Check(service::ComputeGradients(request, limits, service::ComputeContext(), &again).ok(),
        "the same request failed the second time");
  Check(Deterministic(response) == Deterministic(again), "the same request gave different bits");
  return response;
}

// libprotobuf logs every string field with invalid UTF-8 it refuses to parse: noise at
// thousands of inputs a second.
inline void SilenceProtobufLogging() {
  google::protobuf::SetLogHandler(
      [](google::protobuf::LogLevel, const char*, int, const std::string&) {});
}

}  // namespace gradserve::fuzz

#endif  // GRADSERVE_FUZZ_FUZZ_COMMON_H_
