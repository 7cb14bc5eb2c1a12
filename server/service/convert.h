// Validation and conversion of gradserve.v1 requests into engine views.
//
// Every field is checked before anything is allocated from it: a claimed shape is checked
// against the limits and against the bytes actually sent. Tensors are then read in place from
// the request's byte strings (copied only if a string is not aligned for its element type).
// Errors name the field as the .proto does ("parameters[1].weight.shape") and say what was
// expected; limits give RESOURCE_EXHAUSTED with the size and the limit.
#ifndef GRADSERVE_SERVICE_CONVERT_H_
#define GRADSERVE_SERVICE_CONVERT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "gradserve/v1/gradserve.pb.h"
#include "server/engine/backprop.h"
#include "server/engine/checkpoint.h"
#include "server/engine/model.h"
#include "server/service/convert_graph.h"
#include "server/service/limits.h"

namespace gradserve::service {

namespace v1 = ::gradserve::v1;

template <typename T>
struct TypedViews {
  std::vector<engine::LinearParamsView<T>> params;  // One per Linear layer.
  engine::BatchView<T> batch;
};

// A validated request. Views point into the request (which must outlive this) or into the
// copies held here.
struct PreparedRequest {
  v1::DType dtype = v1::DTYPE_UNSPECIFIED;
  std::optional<engine::Model> model;
  engine::CheckpointPlan plan;
  std::variant<TypedViews<float>, TypedViews<double>> views;
  bool return_input_gradient = false;
  bool return_output = false;
  // Activations and workspace the plan needs (checked against max_activation_bytes).
  int64_t activation_bytes = 0;
  // Storage for anything that could not be viewed in place.
  std::vector<int64_t> widened_class_targets;
  std::vector<std::unique_ptr<uint64_t[]>> aligned_copies;

  int64_t batch() const;
};

// Validates `request` against `limits`. The returned object views request's bytes. The
// checkpoint plan covers dx if the request asks for it or needs_input_gradient is set. Every
// check that costs O(size of the request) runs before the checkpoint planner, which polls
// `should_stop` (if set) and returns CANCELLED when it says so.
absl::StatusOr<std::unique_ptr<PreparedRequest>> PrepareRequest(
    const v1::ComputeGradientsRequest& request, const ServiceLimits& limits,
    bool needs_input_gradient = false, std::function<bool()> should_stop = nullptr);

// The checks of PrepareRequest that cost O(layers): the model's layers and the inputs' shape
// against the limits. Run before a call is queued when its claimed sizes look too large, so the
// caller learns which size is at fault.
absl::Status CheckClaimedSizes(const v1::ComputeGradientsRequest& request,
                               const ServiceLimits& limits);

// The engine's description of a model, from the API's; validates kinds and enum values.
absl::StatusOr<engine::ModelSpec> ToModelSpec(const v1::Model& model, const ServiceLimits& limits);

// A pointer to the tensor's elements as T: in place when aligned for T, else into a copy
// appended to `copies` (protobuf byte strings guarantee no alignment). T: float, double,
// int64_t, int32_t. REQUIRES: the tensor's bytes were checked against its shape.
template <typename T>
const T* ViewData(const v1::Tensor& tensor, std::vector<std::unique_ptr<uint64_t[]>>* copies);

// INVALID_ARGUMENT naming `field`.data and the index (in `shape`) of the first NaN or +-Inf
// among the tensor's elements, if there is one. T: float, double.
template <typename T>
absl::Status CheckFinite(const T* data, std::span<const int64_t> shape, const std::string& field);

// Bytes per element on the wire (0 for DTYPE_UNSPECIFIED and unknown values).
int64_t DTypeSize(v1::DType dtype);

// The loss and the checkpointing options of either model form; validates kinds and enum
// values ("model.loss...", "options.checkpointing.mode").
absl::StatusOr<engine::LossSpec> ToLossSpec(const v1::Loss& loss);
absl::StatusOr<engine::CheckpointOptions> ToCheckpointOptions(const v1::Checkpointing& c);
// The other way, for the plan in the answer.
v1::Checkpointing::Mode ToProtoMode(engine::CheckpointMode mode);

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_CONVERT_H_
