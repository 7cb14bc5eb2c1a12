#include "server/service/convert.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <span>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/engine/status_macros.h"
#include "server/service/onnx_import.h"

namespace gradserve::service {
namespace {

static_assert(std::endian::native == std::endian::little,
              "tensors are little-endian on the wire and viewed in place");

using engine::LayerKind;
using engine::LossKind;

std::string DTypeName(int dtype) {
  return v1::DType_IsValid(dtype) ? v1::DType_Name(static_cast<v1::DType>(dtype))
                                  : absl::StrCat("unknown value ", dtype);
}

std::string ShapeString(std::span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// "[3, 1]" for flat index 7 of a [4, 2] tensor.
std::string MultiIndex(int64_t flat, std::span<const int64_t> shape) {
  std::vector<int64_t> index(shape.size());
  for (int d = static_cast<int>(shape.size()) - 1; d >= 0; --d) {
    index[d] = flat % shape[d];
    flat /= shape[d];
  }
  return ShapeString(index);
}

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// Checks dtype, shape and byte length of `tensor` (field name `field`) against what the
// request needs, in that order, without touching its data. Returns the element count.
absl::StatusOr<int64_t> CheckTensor(const v1::Tensor& tensor, const std::string& field,
                                    std::span<const v1::DType> dtypes, absl::string_view dtype_why,
                                    std::span<const int64_t> expected_shape,
                                    const ServiceLimits& limits) {
  if (std::find(dtypes.begin(), dtypes.end(), tensor.dtype()) == dtypes.end()) {
    std::vector<std::string> names;
    for (v1::DType d : dtypes) names.push_back(v1::DType_Name(d));
    return Invalid(field + ".dtype", absl::StrCat("expected ", absl::StrJoin(names, " or "),
                                                  dtype_why, ", got ", DTypeName(tensor.dtype())));
  }
  const auto& shape = tensor.shape();
  if (shape.size() != static_cast<int>(expected_shape.size()) ||
      !std::equal(shape.begin(), shape.end(), expected_shape.begin())) {
    return Invalid(field + ".shape",
                   absl::StrCat("expected ", ShapeString(expected_shape), ", got ",
                                ShapeString({shape.data(), static_cast<size_t>(shape.size())})));
  }
  int64_t elements = 1;
  for (int64_t dim : expected_shape) elements *= dim;  // Dims were validated and are bounded.
  if (elements > limits.max_tensor_elements) {
    return absl::ResourceExhaustedError(absl::StrCat(field, ": ", elements,
                                                     " elements exceed max_tensor_elements (",
                                                     limits.max_tensor_elements, ")"));
  }
  const int64_t expected_bytes = elements * DTypeSize(tensor.dtype());
  if (static_cast<int64_t>(tensor.data().size()) != expected_bytes) {
    return Invalid(field + ".data",
                   absl::StrCat("expected ", expected_bytes, " bytes (", elements, " ",
                                DTypeName(tensor.dtype()), " values of shape ",
                                ShapeString(expected_shape), "), got ", tensor.data().size()));
  }
  return elements;
}

absl::Status CheckDimension(int64_t value, int64_t limit, const std::string& field,
                            absl::string_view limit_name) {
  if (value <= 0) {
    return Invalid(field, absl::StrCat("expected a positive size, got ", value));
  }
  if (value > limit) {
    return absl::ResourceExhaustedError(
        absl::StrCat(field, ": ", value, " exceeds ", limit_name, " (", limit, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<engine::LayerSpec> ToLayerSpec(const v1::Layer& layer, int index,
                                              const ServiceLimits& limits) {
  const std::string field = absl::StrCat("model.layers[", index, "]");
  engine::LayerSpec spec;
  spec.name = layer.name();
  switch (layer.kind_case()) {
    case v1::Layer::kLinear:
      spec.kind = LayerKind::kLinear;
      RETURN_IF_ERROR(CheckDimension(layer.linear().in_features(), limits.max_features,
                                     field + ".linear.in_features", "max_features"));
      RETURN_IF_ERROR(CheckDimension(layer.linear().out_features(), limits.max_features,
                                     field + ".linear.out_features", "max_features"));
      spec.in_features = layer.linear().in_features();
      spec.out_features = layer.linear().out_features();
      spec.bias = !layer.linear().has_bias() || layer.linear().bias();
      return spec;
    case v1::Layer::kRelu:
      spec.kind = LayerKind::kReLU;
      return spec;
    case v1::Layer::kLeakyRelu:
      spec.kind = LayerKind::kLeakyReLU;
      if (layer.leaky_relu().has_negative_slope()) {
        spec.negative_slope = layer.leaky_relu().negative_slope();
      }
      return spec;
    case v1::Layer::kSigmoid:
      spec.kind = LayerKind::kSigmoid;
      return spec;
    case v1::Layer::kTanh:
      spec.kind = LayerKind::kTanh;
      return spec;
    case v1::Layer::kGelu:
      switch (layer.gelu().approximation()) {
        case v1::GELU::APPROXIMATION_NONE:
          spec.kind = LayerKind::kGelu;
          return spec;
        case v1::GELU::APPROXIMATION_TANH:
          spec.kind = LayerKind::kGeluTanh;
          return spec;
        default:
          return Invalid(field + ".gelu.approximation",
                         absl::StrCat("expected APPROXIMATION_NONE or APPROXIMATION_TANH, got "
                                      "unknown value ",
                                      layer.gelu().approximation()));
      }
    case v1::Layer::kIdentity:
      spec.kind = LayerKind::kIdentity;
      return spec;
    case v1::Layer::KIND_NOT_SET:
      break;
  }
  return Invalid(field,
                 "no layer kind set (or a kind this server does not know; see "
                 "GetServerInfo.layers)");
}

template <typename T>
absl::Status FillViews(const v1::ComputeGradientsRequest& request, const ServiceLimits& limits,
                       PreparedRequest* prepared) {
  const engine::Model& model = *prepared->model;
  const int64_t batch = request.inputs().shape(0);
  const bool check_finite = !request.options().allow_non_finite();
  const v1::DType dtype = prepared->dtype;
  const v1::DType float_dtypes[] = {dtype};
  const std::string same_dtype = " (the dtype of inputs)";
  TypedViews<T> views;

  const int64_t input_shape[] = {batch, model.input_features()};
  views.batch.batch = batch;
  views.batch.inputs = ViewData<T>(request.inputs(), &prepared->aligned_copies);

  for (int l = 0; l < model.num_linear(); ++l) {
    const int layer_index = model.linear_layer(l);
    const engine::LayerSpec& layer = model.layer(layer_index);
    const v1::LinearParameters& p = request.parameters(l);
    const std::string field = absl::StrCat("parameters[", l, "]");
    engine::LinearParamsView<T> view;
    if (!p.has_weight()) {
      return Invalid(field + ".weight",
                     absl::StrCat("required for model.layers[", layer_index, "] (shape [",
                                  layer.out_features, ", ", layer.in_features, "])"));
    }
    const int64_t weight_shape[] = {layer.out_features, layer.in_features};
    RETURN_IF_ERROR(
        CheckTensor(p.weight(), field + ".weight", float_dtypes, same_dtype, weight_shape, limits)
            .status());
    view.weight = ViewData<T>(p.weight(), &prepared->aligned_copies);
    const int64_t bias_shape[] = {layer.out_features};
    if (layer.bias) {
      if (!p.has_bias()) {
        return Invalid(field + ".bias",
                       absl::StrCat("required: model.layers[", layer_index,
                                    "] has a bias (set linear.bias = false for none)"));
      }
      RETURN_IF_ERROR(
          CheckTensor(p.bias(), field + ".bias", float_dtypes, same_dtype, bias_shape, limits)
              .status());
      view.bias = ViewData<T>(p.bias(), &prepared->aligned_copies);
    } else if (p.has_bias()) {
      return Invalid(field + ".bias", absl::StrCat("must be unset: model.layers[", layer_index,
                                                   "] has linear.bias = false"));
    }
    views.params.push_back(view);
  }

  const LossKind loss = model.loss().kind;
  const std::string loss_name(engine::LossKindName(loss));
  const int64_t output_shape[] = {batch, model.output_features()};
  if (loss == LossKind::kExternal) {
    if (request.has_targets()) {
      return Invalid("targets", "must be unset for the external loss (send output_gradient)");
    }
    if (!request.has_output_gradient()) {
      return Invalid("output_gradient",
                     absl::StrCat("required for the external loss (dL/d(output), shape ",
                                  ShapeString(output_shape), ")"));
    }
    RETURN_IF_ERROR(CheckTensor(request.output_gradient(), "output_gradient", float_dtypes,
                                same_dtype, output_shape, limits)
                        .status());
    views.batch.targets.output_gradient =
        ViewData<T>(request.output_gradient(), &prepared->aligned_copies);
  } else {
    if (request.has_output_gradient()) {
      return Invalid("output_gradient",
                     absl::StrCat("must be unset for the ", loss_name,
                                  " loss (only the external loss takes an output gradient)"));
    }
    if (loss == LossKind::kCrossEntropy) {
      const int64_t target_shape[] = {batch};
      const v1::DType int_dtypes[] = {v1::DTYPE_INT64, v1::DTYPE_INT32};
      if (!request.has_targets()) {
        return Invalid("targets", absl::StrCat("required for the cross_entropy loss (class "
                                               "indices, DTYPE_INT64 or DTYPE_INT32, shape [",
                                               batch, "])"));
      }
      RETURN_IF_ERROR(CheckTensor(request.targets(), "targets", int_dtypes,
                                  " (class indices for cross_entropy)", target_shape, limits)
                          .status());
      const int64_t* classes;
      if (request.targets().dtype() == v1::DTYPE_INT32) {
        const int32_t* narrow = ViewData<int32_t>(request.targets(), &prepared->aligned_copies);
        prepared->widened_class_targets.assign(narrow, narrow + batch);
        classes = prepared->widened_class_targets.data();
      } else {
        classes = ViewData<int64_t>(request.targets(), &prepared->aligned_copies);
      }
      const int64_t num_classes = model.output_features();
      for (int64_t b = 0; b < batch; ++b) {
        if (classes[b] < 0 || classes[b] >= num_classes) {
          return Invalid("targets.data", absl::StrCat("class index ", classes[b], " at [", b,
                                                      "] is out of range [0, ", num_classes,
                                                      ") (the output width of the model)"));
        }
      }
      views.batch.targets.class_targets = classes;
    } else {
      if (!request.has_targets()) {
        return Invalid("targets",
                       absl::StrCat("required for the ", loss_name, " loss (", DTypeName(dtype),
                                    ", shape ", ShapeString(output_shape), ")"));
      }
      RETURN_IF_ERROR(
          CheckTensor(request.targets(), "targets", float_dtypes, same_dtype, output_shape, limits)
              .status());
      views.batch.targets.targets = ViewData<T>(request.targets(), &prepared->aligned_copies);
    }
  }

  // Values last: one pass over the data, after every size is known to be right.
  if (check_finite) {
    RETURN_IF_ERROR(CheckFinite(views.batch.inputs, input_shape, "inputs"));
    for (int l = 0; l < model.num_linear(); ++l) {
      const engine::LayerSpec& layer = model.layer(model.linear_layer(l));
      const int64_t weight_shape[] = {layer.out_features, layer.in_features};
      const int64_t bias_shape[] = {layer.out_features};
      const std::string field = absl::StrCat("parameters[", l, "]");
      RETURN_IF_ERROR(CheckFinite(views.params[l].weight, weight_shape, field + ".weight"));
      if (views.params[l].bias != nullptr) {
        RETURN_IF_ERROR(CheckFinite(views.params[l].bias, bias_shape, field + ".bias"));
      }
    }
    if (views.batch.targets.targets != nullptr) {
      RETURN_IF_ERROR(CheckFinite(views.batch.targets.targets, output_shape, "targets"));
    }
    if (views.batch.targets.output_gradient != nullptr) {
      RETURN_IF_ERROR(
          CheckFinite(views.batch.targets.output_gradient, output_shape, "output_gradient"));
    }
  }
  prepared->views = std::move(views);
  return absl::OkStatus();
}

}  // namespace

template <typename T>
const T* ViewData(const v1::Tensor& tensor, std::vector<std::unique_ptr<uint64_t[]>>* copies) {
  const char* bytes = tensor.data().data();
  if (reinterpret_cast<uintptr_t>(bytes) % alignof(T) == 0) {
    return reinterpret_cast<const T*>(bytes);
  }
  const size_t size = tensor.data().size();
  auto copy = std::make_unique<uint64_t[]>((size + 7) / 8);
  std::memcpy(copy.get(), bytes, size);
  copies->push_back(std::move(copy));
  return reinterpret_cast<const T*>(copies->back().get());
}

template <typename T>
absl::Status CheckFinite(const T* data, std::span<const int64_t> shape, const std::string& field) {
  int64_t n = 1;
  for (int64_t dim : shape) n *= dim;
  for (int64_t j = 0; j < n; ++j) {
    if (!std::isfinite(data[j])) {
      return Invalid(
          field + ".data",
          absl::StrCat("non-finite value ", std::isnan(data[j]) ? "nan" : "inf", " at index ",
                       MultiIndex(j, shape), "; set options.allow_non_finite to compute anyway"));
    }
  }
  return absl::OkStatus();
}

template const float* ViewData<float>(const v1::Tensor&, std::vector<std::unique_ptr<uint64_t[]>>*);
template const double* ViewData<double>(const v1::Tensor&,
                                        std::vector<std::unique_ptr<uint64_t[]>>*);
template const int64_t* ViewData<int64_t>(const v1::Tensor&,
                                          std::vector<std::unique_ptr<uint64_t[]>>*);
template const int32_t* ViewData<int32_t>(const v1::Tensor&,
                                          std::vector<std::unique_ptr<uint64_t[]>>*);
template absl::Status CheckFinite<float>(const float*, std::span<const int64_t>,
                                         const std::string&);
template absl::Status CheckFinite<double>(const double*, std::span<const int64_t>,
                                          const std::string&);

v1::Checkpointing::Mode ToProtoMode(engine::CheckpointMode mode) {
  switch (mode) {
    case engine::CheckpointMode::kNone:
      return v1::Checkpointing::MODE_NONE;
    case engine::CheckpointMode::kEveryK:
      return v1::Checkpointing::MODE_EVERY_K;
    case engine::CheckpointMode::kSqrt:
      return v1::Checkpointing::MODE_SQRT;
    case engine::CheckpointMode::kMemoryBudget:
      return v1::Checkpointing::MODE_MEMORY_BUDGET;
  }
  return v1::Checkpointing::MODE_UNSPECIFIED;
}

absl::StatusOr<engine::LossSpec> ToLossSpec(const v1::Loss& loss) {
  engine::LossSpec spec;
  switch (loss.reduction()) {
    case v1::REDUCTION_UNSPECIFIED:
    case v1::REDUCTION_MEAN:
      spec.reduction = engine::Reduction::kMean;
      break;
    case v1::REDUCTION_SUM:
      spec.reduction = engine::Reduction::kSum;
      break;
    default:
      return Invalid("model.loss.reduction",
                     absl::StrCat("expected REDUCTION_MEAN or REDUCTION_SUM, got unknown value ",
                                  loss.reduction()));
  }
  switch (loss.kind_case()) {
    case v1::Loss::kMse:
      spec.kind = LossKind::kMse;
      return spec;
    case v1::Loss::kCrossEntropy:
      spec.kind = LossKind::kCrossEntropy;
      return spec;
    case v1::Loss::kBceWithLogits:
      spec.kind = LossKind::kBceWithLogits;
      return spec;
    case v1::Loss::kHuber:
      spec.kind = LossKind::kHuber;
      if (loss.huber().has_delta()) spec.huber_delta = loss.huber().delta();
      return spec;
    case v1::Loss::kL1:
      spec.kind = LossKind::kL1;
      return spec;
    case v1::Loss::kExternal:
      spec.kind = LossKind::kExternal;
      return spec;
    case v1::Loss::KIND_NOT_SET:
      break;
  }
  return Invalid("model.loss",
                 "no loss kind set (or a kind this server does not know; see "
                 "GetServerInfo.losses)");
}

absl::StatusOr<engine::CheckpointOptions> ToCheckpointOptions(const v1::Checkpointing& c) {
  engine::CheckpointOptions options;
  options.every_k = c.every_k();
  options.memory_budget_bytes = c.memory_budget_bytes();
  switch (c.mode()) {
    case v1::Checkpointing::MODE_UNSPECIFIED:
    case v1::Checkpointing::MODE_NONE:
      options.mode = engine::CheckpointMode::kNone;
      return options;
    case v1::Checkpointing::MODE_EVERY_K:
      options.mode = engine::CheckpointMode::kEveryK;
      return options;
    case v1::Checkpointing::MODE_SQRT:
      options.mode = engine::CheckpointMode::kSqrt;
      return options;
    case v1::Checkpointing::MODE_MEMORY_BUDGET:
      options.mode = engine::CheckpointMode::kMemoryBudget;
      return options;
    default:
      return Invalid("options.checkpointing.mode",
                     absl::StrCat("unknown value ", c.mode(),
                                  "; expected MODE_NONE, MODE_EVERY_K, MODE_SQRT or "
                                  "MODE_MEMORY_BUDGET"));
  }
}

int64_t DTypeSize(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
    case v1::DTYPE_INT32:
      return 4;
    case v1::DTYPE_FLOAT64:
    case v1::DTYPE_INT64:
      return 8;
    case v1::DTYPE_BOOL:
      return 1;
    default:
      return 0;
  }
}

int64_t PreparedRequest::batch() const {
  return std::visit([](const auto& v) { return v.batch.batch; }, views);
}

absl::StatusOr<engine::ModelSpec> ToModelSpec(const v1::Model& model, const ServiceLimits& limits) {
  if (model.layers_size() == 0) {
    return Invalid("model.layers", "the model has no layers; expected at least one");
  }
  if (model.layers_size() > limits.max_layers) {
    return absl::ResourceExhaustedError(absl::StrCat("model.layers: ", model.layers_size(),
                                                     " layers exceed max_layers (",
                                                     limits.max_layers, ")"));
  }
  engine::ModelSpec spec;
  spec.layers.reserve(model.layers_size());
  for (int i = 0; i < model.layers_size(); ++i) {
    ASSIGN_OR_RETURN(engine::LayerSpec layer, ToLayerSpec(model.layers(i), i, limits));
    spec.layers.push_back(std::move(layer));
  }
  if (!model.has_loss()) return Invalid("model.loss", "required");
  ASSIGN_OR_RETURN(spec.loss, ToLossSpec(model.loss()));
  return spec;
}

namespace {

// inputs: present, floating, rank 2, within the limits and as long as its shape says.
absl::Status CheckInputs(const v1::ComputeGradientsRequest& request, const ServiceLimits& limits) {
  if (!request.has_inputs()) return Invalid("inputs", "required ([batch, in_features])");
  const v1::Tensor& inputs = request.inputs();
  const v1::DType float_dtypes[] = {v1::DTYPE_FLOAT32, v1::DTYPE_FLOAT64};
  if (inputs.dtype() != v1::DTYPE_FLOAT32 && inputs.dtype() != v1::DTYPE_FLOAT64) {
    return Invalid("inputs.dtype", absl::StrCat("expected DTYPE_FLOAT32 or DTYPE_FLOAT64, got ",
                                                DTypeName(inputs.dtype())));
  }
  if (inputs.shape_size() != 2) {
    return Invalid("inputs.shape",
                   absl::StrCat("expected rank 2 [batch, in_features], got ",
                                ShapeString({inputs.shape().data(),
                                             static_cast<size_t>(inputs.shape_size())})));
  }
  RETURN_IF_ERROR(
      CheckDimension(inputs.shape(0), limits.max_batch, "inputs.shape[0]", "max_batch"));
  RETURN_IF_ERROR(
      CheckDimension(inputs.shape(1), limits.max_features, "inputs.shape[1]", "max_features"));
  const int64_t input_shape[] = {inputs.shape(0), inputs.shape(1)};
  RETURN_IF_ERROR(CheckTensor(inputs, "inputs", float_dtypes, "", input_shape, limits).status());
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckClaimedSizes(const v1::ComputeGradientsRequest& request,
                               const ServiceLimits& limits) {
  if (!request.has_model()) return Invalid("model", "required");
  RETURN_IF_ERROR(CheckModelForm(request));
  if (request.model().has_onnx()) {
    ASSIGN_OR_RETURN(const ImportedOnnx imported,
                     ImportOnnx(request.model(), v1::DTYPE_UNSPECIFIED, limits));
    return RenameOnnxFields(
        GraphPlanner::Create(imported.model, request.options(), limits, /*cache=*/false).status());
  }
  if (IsGraphRequest(request)) {
    return GraphPlanner::Create(request.model(), request.options(), limits, /*cache=*/false)
        .status();
  }
  RETURN_IF_ERROR(ToModelSpec(request.model(), limits).status());
  return CheckInputs(request, limits);
}

absl::StatusOr<std::unique_ptr<PreparedRequest>> PrepareRequest(
    const v1::ComputeGradientsRequest& request, const ServiceLimits& limits,
    bool needs_input_gradient, std::function<bool()> should_stop) {
  if (!request.has_model()) return Invalid("model", "required");
  RETURN_IF_ERROR(CheckModelForm(request));
  if (IsGraphRequest(request)) {
    return absl::InternalError("graph requests are prepared by PrepareGraphRequest");
  }
  ASSIGN_OR_RETURN(engine::ModelSpec spec, ToModelSpec(request.model(), limits));

  RETURN_IF_ERROR(CheckInputs(request, limits));
  const v1::Tensor& inputs = request.inputs();
  auto prepared = std::make_unique<PreparedRequest>();
  prepared->dtype = inputs.dtype();
  ASSIGN_OR_RETURN(prepared->model, engine::Model::Create(std::move(spec), inputs.shape(1)));
  const engine::Model& model = *prepared->model;
  if (request.parameters_size() != model.num_linear()) {
    return Invalid("parameters",
                   absl::StrCat("expected ", model.num_linear(),
                                " entries (one per Linear layer, in model order), got ",
                                request.parameters_size()));
  }

  const int64_t batch = inputs.shape(0);
  const int64_t element_bytes = DTypeSize(prepared->dtype);
  ASSIGN_OR_RETURN(engine::CheckpointOptions checkpointing,
                   ToCheckpointOptions(request.options().checkpointing()));
  checkpointing.computes_input_gradient =
      request.options().return_input_gradient() || needs_input_gradient;
  checkpointing.should_stop = std::move(should_stop);
  // Two activations in flight and two gradient buffers, besides the cache.
  const int64_t workspace = 4 * batch * model.max_width() * element_bytes;
  auto over_activation_limit = [&](int64_t needed) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "inputs: this batch needs ", needed,
        " bytes of activations and workspace, over max_activation_bytes (",
        limits.max_activation_bytes, "); send a smaller batch or use options.checkpointing"));
  };
  // Everything that costs O(size of the message) comes before planning, which costs more.
  if (workspace > limits.max_activation_bytes) return over_activation_limit(workspace);
  prepared->return_input_gradient = request.options().return_input_gradient();
  prepared->return_output = request.options().return_output();
  if (prepared->dtype == v1::DTYPE_FLOAT32) {
    RETURN_IF_ERROR(FillViews<float>(request, limits, prepared.get()));
  } else {
    prepared->views = TypedViews<double>{};
    RETURN_IF_ERROR(FillViews<double>(request, limits, prepared.get()));
  }
  ASSIGN_OR_RETURN(prepared->plan,
                   engine::PlanCheckpoints(model, batch, element_bytes, checkpointing));
  const int64_t needed = prepared->plan.predicted_peak_bytes + workspace;
  if (needed > limits.max_activation_bytes) return over_activation_limit(needed);
  prepared->activation_bytes = needed;
  return prepared;
}

}  // namespace gradserve::service
