#include "server/service/stream.h"

#include <cmath>
#include <cstring>
#include <optional>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "server/engine/model.h"
#include "server/engine/status_macros.h"
#include "server/service/convert.h"
#include "server/service/onnx_import.h"

namespace gradserve::service {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// A TensorChunk.field, parsed.
struct FieldPath {
  enum Kind {
    kInputs,
    kTargets,
    kOutputGradient,
    kParameters,
    kParameterUpdate,
    kNamedParameters,
    kNamedParameterUpdate,
    kGraphInputs,
  } kind;
  int index = 0;  // Linear layer, for the two chain parameter kinds.
  bool bias = false;
  std::string name{};  // The parameter or input, for the graph kinds.
};

// Graph models: "named_parameters[NAME]", "named_parameter_update[NAME]" or
// "graph_inputs[NAME]", NAME (verbatim up to the final ']') a declared parameter or input.
std::optional<FieldPath> ParseGraphFieldPath(absl::string_view path,
                                             const engine::graph::GraphSpec& spec) {
  FieldPath field;
  if (absl::ConsumePrefix(&path, "named_parameters[")) {
    field.kind = FieldPath::kNamedParameters;
  } else if (absl::ConsumePrefix(&path, "named_parameter_update[")) {
    field.kind = FieldPath::kNamedParameterUpdate;
  } else if (absl::ConsumePrefix(&path, "graph_inputs[")) {
    field.kind = FieldPath::kGraphInputs;
  } else {
    return std::nullopt;
  }
  if (!absl::ConsumeSuffix(&path, "]")) return std::nullopt;
  bool declared = false;
  if (field.kind == FieldPath::kGraphInputs) {
    for (const engine::graph::InputSpec& in : spec.inputs) declared |= in.name == path;
  } else {
    for (const engine::graph::ParameterSpec& p : spec.parameters) declared |= p.name == path;
  }
  if (!declared) return std::nullopt;
  field.name = std::string(path);
  return field;
}

std::optional<FieldPath> ParseFieldPath(absl::string_view path, int num_linear,
                                        const GraphPlanner* planner) {
  if (planner != nullptr) return ParseGraphFieldPath(path, planner->spec());
  if (path == "inputs") return FieldPath{FieldPath::kInputs};
  if (path == "targets") return FieldPath{FieldPath::kTargets};
  if (path == "output_gradient") return FieldPath{FieldPath::kOutputGradient};
  FieldPath field;
  if (absl::ConsumePrefix(&path, "parameters[")) {
    field.kind = FieldPath::kParameters;
  } else if (absl::ConsumePrefix(&path, "parameter_update[")) {
    field.kind = FieldPath::kParameterUpdate;
  } else {
    return std::nullopt;
  }
  const size_t close = path.find(']');
  if (close == absl::string_view::npos || close == 0 || close > 9) return std::nullopt;
  // Digits only: SimpleAtoi would also take a sign or spaces.
  for (char c : path.substr(0, close)) {
    if (c < '0' || c > '9') return std::nullopt;
  }
  if (!absl::SimpleAtoi(path.substr(0, close), &field.index) || field.index >= num_linear) {
    return std::nullopt;
  }
  path.remove_prefix(close + 1);
  if (path == ".weight") return field;
  if (path == ".bias") {
    field.bias = true;
    return field;
  }
  return std::nullopt;
}

// The tensor of `step` that `path` names, created if need be. Fails if the step set it itself.
absl::StatusOr<v1::Tensor*> StepTensor(v1::StreamStep* step, const FieldPath& path,
                                       const std::string& name) {
  const absl::Status conflict =
      Invalid(name, "sent both in chunks and in the step; leave the field unset in the step");
  switch (path.kind) {
    case FieldPath::kInputs:
      if (step->has_inputs()) return conflict;
      return step->mutable_inputs();
    case FieldPath::kTargets:
      if (step->has_targets()) return conflict;
      return step->mutable_targets();
    case FieldPath::kOutputGradient:
      if (step->has_output_gradient()) return conflict;
      return step->mutable_output_gradient();
    case FieldPath::kParameters:
    case FieldPath::kParameterUpdate: {
      auto* list = path.kind == FieldPath::kParameters ? step->mutable_parameters()
                                                       : step->mutable_parameter_update();
      while (list->size() <= path.index) list->Add();
      v1::LinearParameters* entry = list->Mutable(path.index);
      if (path.bias ? entry->has_bias() : entry->has_weight()) return conflict;
      return path.bias ? entry->mutable_bias() : entry->mutable_weight();
    }
    case FieldPath::kNamedParameters:
    case FieldPath::kNamedParameterUpdate:
    case FieldPath::kGraphInputs: {
      auto* list = path.kind == FieldPath::kNamedParameters ? step->mutable_named_parameters()
                   : path.kind == FieldPath::kNamedParameterUpdate
                       ? step->mutable_named_parameter_update()
                       : step->mutable_graph_inputs();
      for (const v1::NamedTensor& entry : *list) {
        if (entry.name() == path.name) return conflict;
      }
      v1::NamedTensor* entry = list->Add();
      entry->set_name(path.name);
      return entry->mutable_tensor();
    }
  }
  return conflict;  // Unreachable: every kind is handled above.
}

bool SameShape(const v1::Tensor& a, const v1::Tensor& b) {
  return a.shape_size() == b.shape_size() &&
         std::equal(a.shape().begin(), a.shape().end(), b.shape().begin());
}

}  // namespace

int64_t StreamSession::ParameterBytes() const {
  int64_t bytes = 0;
  for (const v1::LinearParameters& p : request_.parameters()) {
    bytes += p.weight().data().size() + p.bias().data().size();
  }
  for (const v1::NamedTensor& p : request_.named_parameters()) bytes += p.tensor().data().size();
  return bytes;
}

int64_t StreamSession::held_bytes() const {
  return ParameterBytes() + staged_bytes_ + accumulation_.bytes + model_bytes_;
}

bool StreamSession::MeanReduction() const {
  const v1::Loss& loss = request_.model().loss();
  return !loss.has_external() && loss.reduction() != v1::REDUCTION_SUM;
}

double StreamSession::Cost(const v1::StreamGradientsRequest& message) const {
  if (!message.has_step()) return 0;
  const v1::StreamStep& step = message.step();
  std::vector<const v1::Tensor*> batch;
  if (planner_ != nullptr) {
    for (const v1::NamedTensor& in : step.graph_inputs()) batch.push_back(&in.tensor());
    for (const auto& [name, staged] : staged_) {
      if (absl::StartsWith(name, "graph_inputs[")) batch.push_back(&staged.tensor);
    }
  } else if (step.has_inputs()) {
    batch.push_back(&step.inputs());
  } else if (const auto it = staged_.find("inputs"); it != staged_.end()) {
    batch.push_back(&it->second.tensor);
  }
  return EstimatedFlops(request_.model(), batch);
}

absl::StatusOr<bool> StreamSession::Handle(v1::StreamGradientsRequest* message,
                                           const ComputeContext& context,
                                           v1::StreamGradientsResponse* response) {
  const int64_t index = messages_++;
  absl::string_view kind = "empty";
  absl::StatusOr<bool> answered = false;
  if (!set_up_ && !message->has_setup()) {
    answered = absl::InvalidArgumentError(
        "the first message of a stream must be setup (the model, dtype and options)");
  }
  switch (message->kind_case()) {
    case v1::StreamGradientsRequest::kSetup:
      kind = "setup";
      if (set_up_) {
        answered = Invalid("setup", "only the first message of a stream may be setup");
      } else if (absl::Status status = Setup(message->mutable_setup()); !status.ok()) {
        answered = status;
      }
      break;
    case v1::StreamGradientsRequest::kStep:
      kind = "step";
      if (answered.ok()) {
        ++steps_;
        answered = Step(message->mutable_step(), context, response);
      }
      break;
    case v1::StreamGradientsRequest::kChunk:
      kind = "chunk";
      if (answered.ok()) {
        if (absl::Status status = Chunk(message->mutable_chunk()); !status.ok()) answered = status;
      }
      break;
    case v1::StreamGradientsRequest::KIND_NOT_SET:
      answered = Invalid("kind",
                         "expected setup, step or chunk (none set, or one this server "
                         "does not know)");
      break;
  }
  if (answered.ok()) return answered;
  // Note [ONNX import]: the stream holds the file's graph form; errors name the file's nodes.
  const absl::Status status = onnx_ ? RenameOnnxFields(answered.status()) : answered.status();
  return absl::Status(status.code(),
                      absl::StrCat("message ", index, " (", kind, "): ", status.message()));
}

absl::Status StreamSession::Setup(v1::StreamSetup* setup) {
  if (!setup->has_model()) return Invalid("setup.model", "required");
  if (setup->model().has_graph() || setup->model().has_onnx()) {
    RETURN_IF_ERROR(SetupGraph(setup));
  } else {
    ASSIGN_OR_RETURN(engine::ModelSpec spec, ToModelSpec(setup->model(), limits_));
    if (setup->dtype() != v1::DTYPE_FLOAT32 && setup->dtype() != v1::DTYPE_FLOAT64) {
      return Invalid("setup.dtype", absl::StrCat("expected DTYPE_FLOAT32 or DTYPE_FLOAT64, got ",
                                                 v1::DType_IsValid(setup->dtype())
                                                     ? v1::DType_Name(setup->dtype())
                                                     : absl::StrCat(setup->dtype())));
    }
    num_linear_ = 0;
    int64_t input_features = 0;
    for (const engine::LayerSpec& layer : spec.layers) {
      if (layer.kind != engine::LayerKind::kLinear) continue;
      if (num_linear_++ == 0) input_features = layer.in_features;
    }
    // Width mismatches fail here rather than at the first step. Layers before the first Linear
    // keep the width, so the inputs are as wide as it; a model without Linear layers takes any
    // width and is checked at each step.
    if (num_linear_ > 0) RETURN_IF_ERROR(engine::Model::Create(spec, input_features).status());
    // A model without Linear layers has no parameters to send: every step may go straight on.
    has_parameters_ = num_linear_ == 0;
  }
  dtype_ = setup->dtype();
  request_.mutable_model()->Swap(setup->mutable_model());
  request_.mutable_options()->Swap(setup->mutable_options());
  if (planner_ != nullptr) {
    // The planner holds the constants, converted; the stream keeps the rest of the model.
    request_.mutable_model()->mutable_graph()->clear_constants();
    model_bytes_ =
        static_cast<int64_t>(request_.model().ByteSizeLong()) + planner_->constant_bytes();
    RETURN_IF_ERROR(CheckHeldBytes("setup.model", " for the graph"));
  }
  if (onnx_) {
    // The stream starts with the file's values; steps may replace any of them by name.
    for (v1::NamedTensor& value : onnx_defaults_) request_.add_named_parameters()->Swap(&value);
    onnx_defaults_.clear();
    has_parameters_ = true;
    RETURN_IF_ERROR(CheckHeldBytes("setup.model.onnx", " for the file's parameters"));
  }
  set_up_ = true;
  return absl::OkStatus();
}

// Note [Graph streams]
// A graph is validated once, here (GraphPlanner::Create: names, ops, attributes, constants,
// limits), and planned once per tuple of graph input shapes: the planner keeps the plans for
// the steps that bring the same shapes (all of a training loop's steps but maybe its last,
// smaller batch). Each step then only checks its tensors against the plan it reuses.
absl::Status StreamSession::SetupGraph(v1::StreamSetup* setup_message) {
  const v1::StreamSetup& setup = *setup_message;
  if (setup.dtype() != v1::DTYPE_FLOAT32 && setup.dtype() != v1::DTYPE_FLOAT64) {
    return Invalid("setup.dtype",
                   absl::StrCat("expected DTYPE_FLOAT32 or DTYPE_FLOAT64, got ",
                                v1::DType_IsValid(setup.dtype()) ? v1::DType_Name(setup.dtype())
                                                                 : absl::StrCat(setup.dtype())));
  }
  if (setup.model().has_onnx()) {
    if (setup.model().has_graph()) {
      return Invalid("setup.model.onnx", "must be unset when model.graph is set");
    }
    if (setup.model().layers_size() > 0) {
      return Invalid("setup.model.layers", "must be empty when model.onnx is set");
    }
    absl::StatusOr<ImportedOnnx> imported = ImportOnnx(setup.model(), setup.dtype(), limits_);
    if (!imported.ok()) {
      return absl::Status(imported.status().code(),
                          absl::StrCat("setup.", imported.status().message()));
    }
    setup_message->mutable_model()->Swap(&imported->model);
    onnx_defaults_ = std::move(imported->defaults);
    onnx_ = true;
  }
  const v1::Model& model = setup.model();
  if (model.layers_size() > 0) {
    return Invalid("setup.model.layers", "must be empty when model.graph is set");
  }
  if (setup.options().return_input_gradient()) {
    return Invalid("setup.options.return_input_gradient",
                   "must be false for a graph model (name the inputs in "
                   "options.input_gradient_names)");
  }
  absl::StatusOr<std::unique_ptr<GraphPlanner>> planner =
      GraphPlanner::Create(model, setup.options(), limits_, /*cache=*/true);
  if (!planner.ok()) {
    return absl::Status(planner.status().code(),
                        absl::StrCat("setup.", planner.status().message()));
  }
  for (int i = 0; i < model.graph().inputs_size(); ++i) {
    const v1::DType dtype = model.graph().inputs(i).dtype();
    if ((dtype == v1::DTYPE_FLOAT32 || dtype == v1::DTYPE_FLOAT64) && dtype != setup.dtype()) {
      return Invalid(absl::StrCat("setup.model.graph.inputs[", i, "].dtype"),
                     absl::StrCat("expected ", v1::DType_Name(setup.dtype()),
                                  " (the stream's dtype), got ", v1::DType_Name(dtype)));
    }
  }
  planner_ = std::move(*planner);
  // A graph without parameters has none to send: every step may go straight on.
  has_parameters_ = planner_->spec().parameters.empty();
  return absl::OkStatus();
}

absl::Status StreamSession::Chunk(v1::TensorChunk* chunk) {
  const std::string& name = chunk->field();
  if (planner_ != nullptr && !ParseFieldPath(name, 0, planner_.get())) {
    return Invalid("chunk.field",
                   absl::StrCat("expected named_parameters[NAME], named_parameter_update[NAME] "
                                "or graph_inputs[NAME] with NAME a parameter or input of the "
                                "model's graph, got \"",
                                absl::CHexEscape(name.substr(0, 64)), "\""));
  }
  if (planner_ == nullptr && !ParseFieldPath(name, num_linear_, nullptr)) {
    return Invalid("chunk.field",
                   absl::StrCat("expected inputs, targets, output_gradient, parameters[i].weight, "
                                "parameters[i].bias, parameter_update[i].weight or "
                                "parameter_update[i].bias with i < ",
                                num_linear_, " (the model's Linear layers), got \"",
                                absl::CHexEscape(name.substr(0, 64)), "\""));
  }
  const std::string field = absl::StrCat("chunk \"", name, "\"");
  auto it = staged_.find(name);
  if (it == staged_.end()) {
    // The first chunk of this tensor: its header says how many bytes to expect.
    const v1::DType dtype = chunk->dtype();
    if (dtype != v1::DTYPE_FLOAT32 && dtype != v1::DTYPE_FLOAT64 && dtype != v1::DTYPE_INT32 &&
        dtype != v1::DTYPE_INT64) {
      return Invalid(field + ".dtype", "the first chunk of a tensor must set a dtype");
    }
    if (planner_ == nullptr && (chunk->shape_size() == 0 || chunk->shape_size() > 2)) {
      return Invalid(field + ".shape",
                     "the first chunk of a tensor must set its shape (rank 1 or 2)");
    }
    if (planner_ != nullptr &&
        (chunk->shape_size() == 0 || chunk->shape_size() > limits_.max_graph_rank)) {
      return Invalid(field + ".shape",
                     absl::StrCat("the first chunk of a tensor must set its shape (rank 1 to ",
                                  limits_.max_graph_rank, ")"));
    }
    int64_t elements = 1;
    for (int64_t dim : chunk->shape()) {
      if (dim <= 0) return Invalid(field + ".shape", absl::StrCat("expected sizes > 0, got ", dim));
      // Checked before multiplying, so the product cannot overflow.
      if (dim > limits_.max_tensor_elements || elements * dim > limits_.max_tensor_elements) {
        return absl::ResourceExhaustedError(absl::StrCat(
            field, ".shape: more than max_tensor_elements (", limits_.max_tensor_elements, ")"));
      }
      elements *= dim;
    }
    const int64_t expected = elements * DTypeSize(dtype);
    // Counted in full now, before the bytes arrive, so a stream cannot promise more than it
    // may hold.
    if (held_bytes() + expected > limits_.max_stream_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          field, ": staging ", expected, " more bytes would hold ", held_bytes() + expected,
          ", over max_stream_bytes (", limits_.max_stream_bytes, ")"));
    }
    Staged staged;
    staged.expected_bytes = expected;
    staged.tensor.set_dtype(dtype);
    *staged.tensor.mutable_shape() = chunk->shape();
    it = staged_.emplace(name, std::move(staged)).first;
    staged_bytes_ += expected;
  } else if (chunk->dtype() != v1::DTYPE_UNSPECIFIED || chunk->shape_size() > 0) {
    return Invalid(field, "only the first chunk of a tensor sets dtype and shape");
  }
  Staged& staged = it->second;
  std::string* data = staged.tensor.mutable_data();
  if (static_cast<int64_t>(data->size() + chunk->data().size()) > staged.expected_bytes) {
    return Invalid(field + ".data",
                   absl::StrCat("more bytes than the shape holds: ", staged.expected_bytes,
                                " expected, ", data->size() + chunk->data().size(), " sent"));
  }
  if (data->empty()) {
    data->swap(*chunk->mutable_data());  // The first piece moves; later ones are appended.
  } else {
    data->append(chunk->data());
  }
  return absl::OkStatus();
}

absl::Status StreamSession::Unstage(v1::StreamStep* step) {
  for (auto& [name, staged] : staged_) {
    const int64_t arrived = staged.tensor.data().size();
    if (arrived != staged.expected_bytes) {
      return Invalid(name, absl::StrCat("staged by chunks but incomplete: ", arrived, " of ",
                                        staged.expected_bytes, " bytes arrived"));
    }
    const std::optional<FieldPath> path = ParseFieldPath(name, num_linear_, planner_.get());
    ASSIGN_OR_RETURN(v1::Tensor * tensor, StepTensor(step, *path, name));
    tensor->Swap(&staged.tensor);
  }
  staged_.clear();
  staged_bytes_ = 0;
  return absl::OkStatus();
}

absl::Status StreamSession::TakeParameters(v1::StreamStep* step) {
  if (step->parameters_size() != num_linear_) {
    return Invalid("parameters", absl::StrCat("expected ", num_linear_,
                                              " entries (one per Linear layer, in model order), "
                                              "got ",
                                              step->parameters_size()));
  }
  request_.mutable_parameters()->Swap(step->mutable_parameters());
  has_parameters_ = true;
  return CheckHeldBytes("parameters");
}

// The index of the graph parameter `named` (entry e of the step's list `list`) names; refused
// if unknown or named by an earlier entry (entry[p] says which).
absl::StatusOr<int> StreamSession::NamedParameter(const v1::NamedTensor& named,
                                                  absl::string_view list, int e,
                                                  std::vector<int>* entry) const {
  const std::string field = absl::StrCat(list, "[", e, "].name");
  const int p = planner_->FindParameter(named.name());
  if (p < 0) {
    return Invalid(field, absl::StrCat("\"", absl::CHexEscape(named.name().substr(0, 64)),
                                       "\" is not a parameter of model.graph"));
  }
  if ((*entry)[p] >= 0) {
    return Invalid(field,
                   absl::StrCat("\"", named.name(), "\" is also ", list, "[", (*entry)[p], "]"));
  }
  (*entry)[p] = e;
  return p;
}

absl::Status StreamSession::TakeNamedParameters(v1::StreamStep* step) {
  const engine::graph::GraphSpec& spec = planner_->spec();
  std::vector<int> entry(spec.parameters.size(), -1);
  for (int e = 0; e < step->named_parameters_size(); ++e) {
    const v1::NamedTensor& named = step->named_parameters(e);
    const std::string field = absl::StrCat("named_parameters[", e, "]");
    ASSIGN_OR_RETURN(const int p, NamedParameter(named, "named_parameters", e, &entry));
    RETURN_IF_ERROR(CheckHeldShape(named.tensor(), spec.parameters[p].shape, field + ".tensor"));
  }
  if (onnx_) {
    // The others keep what the stream holds (the file's values at first).
    for (size_t p = 0; p < spec.parameters.size(); ++p) {
      if (entry[p] < 0) continue;
      request_.mutable_named_parameters(static_cast<int>(p))
          ->mutable_tensor()
          ->Swap(step->mutable_named_parameters(entry[p])->mutable_tensor());
    }
    return CheckHeldBytes("named_parameters");
  }
  for (size_t p = 0; p < spec.parameters.size(); ++p) {
    if (entry[p] < 0) {
      return Invalid("named_parameters", absl::StrCat("missing \"", spec.parameters[p].name,
                                                      "\" (model.graph.parameters[", p,
                                                      "]); every parameter is sent, by name"));
    }
  }
  // Held in model.graph.parameters order, so that gradients and updates find them by index.
  request_.clear_named_parameters();
  for (size_t p = 0; p < spec.parameters.size(); ++p) {
    v1::NamedTensor* held = request_.add_named_parameters();
    held->set_name(spec.parameters[p].name);
    held->mutable_tensor()->Swap(step->mutable_named_parameters(entry[p])->mutable_tensor());
  }
  has_parameters_ = true;
  return CheckHeldBytes("named_parameters");
}

absl::Status StreamSession::CheckHeldBytes(absl::string_view field, absl::string_view what) const {
  if (held_bytes() <= limits_.max_stream_bytes) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(field, ": the stream would hold ", held_bytes(),
                                                   " bytes", what, ", over max_stream_bytes (",
                                                   limits_.max_stream_bytes, ")"));
}

absl::Status StreamSession::CheckHeldShape(const v1::Tensor& tensor,
                                           const std::vector<int64_t>& shape,
                                           const std::string& field) const {
  if (tensor.dtype() != dtype_) {
    return Invalid(field + ".dtype",
                   absl::StrCat("expected ", v1::DType_Name(dtype_), " (the stream's dtype)"));
  }
  if (!std::equal(tensor.shape().begin(), tensor.shape().end(), shape.begin(), shape.end())) {
    return Invalid(field + ".shape",
                   absl::StrCat("expected [", absl::StrJoin(shape, ", "), "], got [",
                                absl::StrJoin(tensor.shape(), ", "), "]"));
  }
  int64_t elements = 1;
  for (int64_t d : shape) elements *= d;  // Declared shapes are within max_tensor_elements.
  if (static_cast<int64_t>(tensor.data().size()) != elements * DTypeSize(dtype_)) {
    return Invalid(field + ".data", absl::StrCat("expected ", elements * DTypeSize(dtype_),
                                                 " bytes, got ", tensor.data().size()));
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status StreamSession::CheckUpdate(const v1::Tensor& held, const v1::Tensor& update,
                                        const std::string& field) const {
  if (update.dtype() != dtype_) {
    return Invalid(field + ".dtype",
                   absl::StrCat("expected ", v1::DType_Name(dtype_), " (the stream's dtype)"));
  }
  if (!SameShape(held, update) || update.data().size() != held.data().size()) {
    return Invalid(field, "expected the shape and byte length of the held parameter");
  }
  if (!request_.options().allow_non_finite()) {
    const int64_t bad =
        engine::FirstNonFinite<T>(update.data().data(), update.data().size() / sizeof(T));
    if (bad >= 0) {
      return Invalid(field + ".data",
                     absl::StrCat("non-finite value at flat index ", bad,
                                  "; set options.allow_non_finite to compute anyway"));
    }
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status StreamSession::ApplyUpdate(const v1::StreamStep& step) {
  if (step.parameter_update_size() != num_linear_) {
    return Invalid("parameter_update",
                   absl::StrCat("expected ", num_linear_,
                                " entries (one per Linear layer, in model order), got ",
                                step.parameter_update_size()));
  }
  // Everything is checked before anything is added: a failed update leaves no half-updated
  // parameters behind (the stream ends anyway, but the rule is cheap to keep).
  for (int l = 0; l < num_linear_; ++l) {
    const v1::LinearParameters& held = request_.parameters(l);
    const v1::LinearParameters& update = step.parameter_update(l);
    for (const bool bias : {false, true}) {
      const std::string field =
          absl::StrCat("parameter_update[", l, "]", bias ? ".bias" : ".weight");
      const bool held_has = bias ? held.has_bias() : held.has_weight();
      const bool update_has = bias ? update.has_bias() : update.has_weight();
      if (held_has != update_has) {
        return Invalid(field, held_has ? "required: the held parameters have this tensor"
                                       : "must be unset: the held parameters have no such tensor");
      }
      if (!held_has) continue;
      RETURN_IF_ERROR(CheckUpdate<T>(bias ? held.bias() : held.weight(),
                                     bias ? update.bias() : update.weight(), field));
    }
  }
  for (int l = 0; l < num_linear_; ++l) {
    v1::LinearParameters* held = request_.mutable_parameters(l);
    const v1::LinearParameters& update = step.parameter_update(l);
    for (const bool bias : {false, true}) {
      if (!(bias ? held->has_bias() : held->has_weight())) continue;
      std::string* target = (bias ? held->mutable_bias() : held->mutable_weight())->mutable_data();
      engine::AddUpdate<T>(target->data(), (bias ? update.bias() : update.weight()).data().data(),
                           target->size() / sizeof(T));
    }
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status StreamSession::ApplyNamedUpdate(const v1::StreamStep& step) {
  std::vector<int> parameter(step.named_parameter_update_size());
  std::vector<int> entry(request_.named_parameters_size(), -1);
  // Everything is checked before anything is added, as for the chain.
  for (int e = 0; e < step.named_parameter_update_size(); ++e) {
    const v1::NamedTensor& named = step.named_parameter_update(e);
    const std::string field = absl::StrCat("named_parameter_update[", e, "]");
    ASSIGN_OR_RETURN(const int p, NamedParameter(named, "named_parameter_update", e, &entry));
    parameter[e] = p;
    RETURN_IF_ERROR(
        CheckUpdate<T>(request_.named_parameters(p).tensor(), named.tensor(), field + ".tensor"));
  }
  for (int e = 0; e < step.named_parameter_update_size(); ++e) {
    std::string* target =
        request_.mutable_named_parameters(parameter[e])->mutable_tensor()->mutable_data();
    engine::AddUpdate<T>(target->data(), step.named_parameter_update(e).tensor().data().data(),
                         target->size() / sizeof(T));
  }
  return absl::OkStatus();
}

absl::Status StreamSession::ChangeParameters(v1::StreamStep* step) {
  const bool graph = planner_ != nullptr;
  const bool accumulating = accumulation_.micro_batches > 0;
  const bool sends_parameters =
      graph ? step->named_parameters_size() > 0 : step->parameters_size() > 0;
  const bool sends_update =
      graph ? step->named_parameter_update_size() > 0 : step->parameter_update_size() > 0;
  const char* parameters_field = graph ? "named_parameters" : "parameters";
  const char* update_field = graph ? "named_parameter_update" : "parameter_update";
  if (sends_parameters && sends_update) {
    return Invalid(update_field,
                   absl::StrCat("not together with ", parameters_field, ": send one or the other"));
  }
  if (accumulating && (sends_parameters || sends_update)) {
    return Invalid(sends_parameters ? parameters_field : update_field,
                   "the parameters cannot change during an accumulation (the gradients of "
                   "its micro-batches are summed)");
  }
  if (sends_parameters) return graph ? TakeNamedParameters(step) : TakeParameters(step);
  if (sends_update) {
    if (!has_parameters_) {
      return Invalid(update_field, absl::StrCat("the stream holds no parameters yet; send ",
                                                parameters_field, " on the first step"));
    }
    if (graph) {
      return dtype_ == v1::DTYPE_FLOAT32 ? ApplyNamedUpdate<float>(*step)
                                         : ApplyNamedUpdate<double>(*step);
    }
    return dtype_ == v1::DTYPE_FLOAT32 ? ApplyUpdate<float>(*step) : ApplyUpdate<double>(*step);
  }
  if (!has_parameters_) return Invalid(parameters_field, "required on the stream's first step");
  return absl::OkStatus();
}

absl::Status StreamSession::TakeBatch(v1::StreamStep* step) {
  if (planner_ != nullptr) {
    // Checked against the graph (names, dtypes, shapes) by the call itself.
    request_.mutable_graph_inputs()->Swap(step->mutable_graph_inputs());
    return absl::OkStatus();
  }
  if (!step->has_inputs()) return Invalid("inputs", "required ([batch, in_features])");
  if (step->inputs().dtype() != dtype_) {
    return Invalid("inputs.dtype",
                   absl::StrCat("expected ", v1::DType_Name(dtype_), " (the stream's dtype)"));
  }
  request_.mutable_inputs()->Swap(step->mutable_inputs());
  if (step->has_targets()) request_.mutable_targets()->Swap(step->mutable_targets());
  if (step->has_output_gradient()) {
    request_.mutable_output_gradient()->Swap(step->mutable_output_gradient());
  }
  return absl::OkStatus();
}

namespace {

// The fields of the other model form: a graph's stream takes named tensors only, a chain's
// positional ones only.
absl::Status CheckStepForm(const v1::StreamStep& step, bool graph) {
  if (graph) {
    if (step.parameters_size() > 0) {
      return Invalid("parameters", "a graph model's stream takes named_parameters");
    }
    if (step.parameter_update_size() > 0) {
      return Invalid("parameter_update", "a graph model's stream takes named_parameter_update");
    }
    if (step.has_inputs() || step.has_targets() || step.has_output_gradient()) {
      return Invalid(step.has_inputs()    ? "inputs"
                     : step.has_targets() ? "targets"
                                          : "output_gradient",
                     "a graph model's stream takes its batch in graph_inputs");
    }
    return absl::OkStatus();
  }
  if (step.named_parameters_size() > 0) {
    return Invalid("named_parameters", "only for graph models (model.graph)");
  }
  if (step.named_parameter_update_size() > 0) {
    return Invalid("named_parameter_update", "only for graph models (model.graph)");
  }
  if (step.graph_inputs_size() > 0) {
    return Invalid("graph_inputs", "only for graph models (model.graph)");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<bool> StreamSession::Step(v1::StreamStep* step, const ComputeContext& context,
                                         v1::StreamGradientsResponse* response) {
  const int64_t step_index = steps_ - 1;
  RETURN_IF_ERROR(CheckStepForm(*step, planner_ != nullptr));
  RETURN_IF_ERROR(Unstage(step));
  const bool accumulating = accumulation_.micro_batches > 0;
  RETURN_IF_ERROR(ChangeParameters(step));
  RETURN_IF_ERROR(TakeBatch(step));
  request_.mutable_options()->set_dropout_seed(
      step->has_dropout_seed() ? step->dropout_seed() : static_cast<uint64_t>(step_index));
  v1::ComputeGradientsResponse result;
  const absl::Status status =
      planner_ != nullptr
          ? ComputeGraphGradients(request_, limits_, context, planner_.get(), &result)
          : ComputeGradients(request_, limits_, context, &result);
  // The weight of this micro-batch in the sums: what its MEAN divided by, up to a factor common
  // to all micro-batches (Note [Micro-batch accumulation]).
  double weight = 1;
  if (status.ok() && (step->accumulate() || accumulating) && MeanReduction()) {
    weight = planner_ != nullptr ? static_cast<double>(GraphLossDivisor(request_))
                                 : static_cast<double>(result.stats().num_examples());
  }
  // The batch is not part of the stream's state.
  request_.clear_inputs();
  request_.clear_targets();
  request_.clear_output_gradient();
  request_.clear_graph_inputs();
  RETURN_IF_ERROR(status);

  if (!step->accumulate() && !accumulating) {
    response->set_step_index(step_index);
    response->set_micro_batches(1);
    response->mutable_result()->Swap(&result);
    return true;
  }
  RETURN_IF_ERROR(Accumulate(&result, weight));
  if (step->accumulate()) return false;
  response->set_step_index(step_index);
  response->set_micro_batches(accumulation_.micro_batches);
  if (dtype_ == v1::DTYPE_FLOAT32) {
    FinishAccumulation<float>(response->mutable_result());
  } else {
    FinishAccumulation<double>(response->mutable_result());
  }
  accumulation_ = Accumulation();
  return true;
}

// Note [Micro-batch accumulation]
// With MEAN reduction a micro-batch returns gradients averaged over its own N_i terms, so the
// whole batch's gradient is sum_i(N_i * g_i) / sum_i(N_i). For a chain N_i is taken as its
// examples n_i (MSE/L1/Huber/BCE average over n_i * width elements: the width cancels); for a
// graph it is the MEAN's own divisor (the loss target's elements, or for cross-entropy the
// positions not ignored), since a graph's micro-batches may differ in more than their first
// axis. With SUM, and for the external loss (whose output gradient is used as given), it is
// sum_i(g_i). The sums are kept in float64 and rounded to the stream's dtype once, at the end
// (engine::GradientSums); input gradients are per example, so micro-batch i's rows are scaled
// by N_i / sum(N) (MEAN) and concatenated along the first axis, as are outputs.
absl::Status StreamSession::Accumulate(v1::ComputeGradientsResponse* result, double weight) {
  Accumulation& acc = accumulation_;
  const bool graph = planner_ != nullptr;
  const int64_t examples = result->stats().num_examples();
  // The gradients summed: chain weight and bias per Linear layer; graph parameters in order.
  std::vector<const std::string*> gradients;
  if (graph) {
    for (const v1::NamedTensor& g : result->named_gradients())
      gradients.push_back(&g.tensor().data());
  } else {
    for (const v1::LinearGradients& g : result->gradients()) {
      gradients.push_back(&g.weight().data());
      gradients.push_back(&g.bias().data());
    }
  }
  // The per-example tensors, concatenated.
  std::vector<v1::Tensor*> rows;
  if (graph) {
    for (v1::NamedTensor& t : *result->mutable_input_gradients())
      rows.push_back(t.mutable_tensor());
    for (v1::NamedTensor& t : *result->mutable_outputs()) rows.push_back(t.mutable_tensor());
  } else {
    rows = {result->mutable_input_gradient(), result->mutable_output()};
  }
  const int num_diagnostics = graph ? result->value_diagnostics_size() : result->diagnostics_size();
  if (acc.micro_batches == 0) {
    std::vector<int64_t> elements;
    for (const std::string* g : gradients) {
      elements.push_back(static_cast<int64_t>(g->size()) / DTypeSize(dtype_));
    }
    int64_t bytes = 0;
    for (int64_t n : elements) bytes += n * static_cast<int64_t>(sizeof(double));
    if (held_bytes() + bytes > limits_.max_stream_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "accumulate: the float64 accumulator needs ", bytes, " bytes; the stream would hold ",
          held_bytes() + bytes, ", over max_stream_bytes (", limits_.max_stream_bytes, ")"));
    }
    acc.sums = engine::GradientSums(elements);
    acc.bytes = bytes;
    acc.rows.assign(rows.size(), {});
    acc.output_grad_sq.assign(num_diagnostics, 0.0);
    acc.activation_sq.assign(num_diagnostics, 0.0);
    acc.non_finite.assign(num_diagnostics, 0);
    acc.parameter_non_finite.assign(graph ? result->parameter_diagnostics_size() : 0, 0);
  } else if (graph) {
    // Concatenated along the first axis: the rest of each shape must not change.
    const v1::ComputeGradientsResponse& first = acc.last;
    for (size_t k = 0; k < rows.size(); ++k) {
      const int inputs = first.input_gradients_size();
      const v1::NamedTensor& before =
          static_cast<int>(k) < inputs ? first.input_gradients(k) : first.outputs(k - inputs);
      const v1::Tensor& now = *rows[k];
      if (before.tensor().shape_size() != now.shape_size() ||
          !std::equal(before.tensor().shape().begin() + std::min(1, now.shape_size()),
                      before.tensor().shape().end(),
                      now.shape().begin() + std::min(1, now.shape_size()))) {
        return Invalid("accumulate",
                       absl::StrCat("\"", before.name(), "\" of this micro-batch has shape [",
                                    absl::StrJoin(now.shape(), ", "), "], the previous one's [",
                                    absl::StrJoin(before.tensor().shape(), ", "),
                                    "]: micro-batches are concatenated along their first axis "
                                    "only; leave it out of the options or answer sooner"));
      }
    }
  }
  int64_t row_bytes = 0;
  for (const v1::Tensor* t : rows) row_bytes += static_cast<int64_t>(t->data().size());
  if (held_bytes() + row_bytes > limits_.max_stream_bytes ||
      ParameterBytes() + acc.row_bytes + row_bytes > limits_.max_message_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "accumulate: the input gradients and outputs of the micro-batches so far would exceed "
        "max_stream_bytes (",
        limits_.max_stream_bytes, ") or the answer max_message_bytes (", limits_.max_message_bytes,
        "); answer sooner or leave them out of the options"));
  }
  for (size_t t = 0; t < gradients.size(); ++t) {
    if (dtype_ == v1::DTYPE_FLOAT32) {
      acc.sums.Add<float>(static_cast<int>(t), gradients[t]->data(), weight);
    } else {
      acc.sums.Add<double>(static_cast<int>(t), gradients[t]->data(), weight);
    }
  }
  // A norm absent from a micro-batch's answer (not computed) adds nothing; whether the combined
  // answer has it is the last micro-batch's say (every micro-batch of a stream computes the
  // same gradients).
  for (int i = 0; i < num_diagnostics; ++i) {
    double grad_norm, value_norm;
    int64_t non_finite;
    if (graph) {
      const v1::ValueDiagnostics& d = result->value_diagnostics(i);
      grad_norm = d.grad_norm();
      value_norm = d.value_norm();
      non_finite = d.non_finite_count();
    } else {
      const v1::LayerDiagnostics& d = result->diagnostics(i);
      grad_norm = d.output_grad_norm();
      value_norm = d.activation_norm();
      non_finite = d.non_finite_count();
    }
    acc.output_grad_sq[i] += weight * weight * grad_norm * grad_norm;
    acc.activation_sq[i] += value_norm * value_norm;
    acc.non_finite[i] += non_finite;
  }
  for (size_t p = 0; p < acc.parameter_non_finite.size(); ++p) {
    acc.parameter_non_finite[p] += result->parameter_diagnostics(p).non_finite_count();
  }
  // A micro-batch whose every position is ignored (cross-entropy) weighs 0 and its loss is NaN.
  if (weight != 0) acc.weighted_loss += weight * result->loss();
  acc.weight += weight;
  acc.examples += examples;
  acc.weights_of_batches.push_back(weight);
  for (size_t k = 0; k < rows.size(); ++k) {
    acc.rows[k].push_back(std::move(*rows[k]->mutable_data()));
  }
  acc.bytes += row_bytes;
  acc.row_bytes += row_bytes;
  // Times and recomputation add up; the peak is the largest (micro-batches run one by one).
  v1::ComputeStats* stats = acc.last.mutable_stats();
  const double forward = stats->forward_micros() + result->stats().forward_micros();
  const double backward = stats->backward_micros() + result->stats().backward_micros();
  const int64_t recomputed = stats->layers_recomputed() + result->stats().layers_recomputed();
  const int64_t peak =
      std::max(stats->peak_activation_bytes(), result->stats().peak_activation_bytes());
  acc.last.Swap(result);
  stats = acc.last.mutable_stats();
  stats->set_forward_micros(forward);
  stats->set_backward_micros(backward);
  stats->set_layers_recomputed(recomputed);
  stats->set_peak_activation_bytes(peak);
  stats->set_num_examples(acc.examples);
  ++acc.micro_batches;
  return absl::OkStatus();
}

template <typename T>
void StreamSession::FinishAccumulation(v1::ComputeGradientsResponse* out) {
  Accumulation& acc = accumulation_;
  const bool graph = planner_ != nullptr;
  const double divisor = MeanReduction() ? acc.weight : 1.0;
  out->Swap(&acc.last);  // Labels, stats and plan; gradients, rows and norms replaced below.
  out->set_loss(acc.weighted_loss / divisor);
  std::vector<double> squared_norms(acc.sums.tensors(), 0.0);
  for (int t = 0; t < acc.sums.tensors(); ++t) {
    v1::Tensor* g;
    if (graph) {
      g = out->mutable_named_gradients(t)->mutable_tensor();
    } else {
      v1::LinearGradients* layer = out->mutable_gradients(t / 2);
      if (t % 2 == 1 && !layer->has_bias()) continue;
      g = t % 2 == 0 ? layer->mutable_weight() : layer->mutable_bias();
    }
    g->mutable_data()->resize(acc.sums.elements(t) * sizeof(T));
    squared_norms[t] = acc.sums.Write<T>(t, divisor, g->mutable_data()->data());
  }
  // Rows in arrival order; input gradients rescaled from their micro-batch's mean to the whole
  // batch's.
  const int inputs = graph ? out->input_gradients_size() : 1;
  for (size_t k = 0; k < acc.rows.size(); ++k) {
    const int index = static_cast<int>(k);
    v1::Tensor* tensor =
        graph ? (index < inputs ? out->mutable_input_gradients(index)->mutable_tensor()
                                : out->mutable_outputs(index - inputs)->mutable_tensor())
              : (index == 0 ? out->mutable_input_gradient() : out->mutable_output());
    const bool scaled = index < inputs;
    const std::vector<std::string>& parts = acc.rows[k];
    if (!graph && parts.front().empty()) {
      index == 0 ? out->clear_input_gradient() : out->clear_output();
      continue;
    }
    std::string data;
    for (size_t i = 0; i < parts.size(); ++i) {
      if (!scaled || acc.weights_of_batches[i] == divisor) {
        data += parts[i];
        continue;
      }
      const size_t start = data.size();
      data.resize(start + parts[i].size());
      engine::ScaleInto<T>(parts[i].data(), parts[i].size() / sizeof(T),
                           acc.weights_of_batches[i] / divisor, data.data() + start);
    }
    // The first axis grows; a scalar (a graph output of rank 0) becomes one entry per
    // micro-batch.
    const int64_t element = DTypeSize(tensor->dtype());
    if (tensor->shape_size() == 0) {
      tensor->add_shape(static_cast<int64_t>(parts.size()));
    } else {
      int64_t row = element;
      for (int d = 1; d < tensor->shape_size(); ++d) row *= tensor->shape(d);
      tensor->mutable_shape()->Set(0, static_cast<int64_t>(data.size()) / row);
    }
    tensor->set_data(std::move(data));
  }
  if (graph) {
    for (int i = 0; i < out->value_diagnostics_size(); ++i) {
      v1::ValueDiagnostics* d = out->mutable_value_diagnostics(i);
      if (d->has_grad_norm()) d->set_grad_norm(std::sqrt(acc.output_grad_sq[i]) / divisor);
      d->set_value_norm(std::sqrt(acc.activation_sq[i]));
      d->set_non_finite_count(acc.non_finite[i]);
    }
    for (int p = 0; p < out->parameter_diagnostics_size(); ++p) {
      v1::ParameterDiagnostics* d = out->mutable_parameter_diagnostics(p);
      d->set_grad_norm(std::sqrt(squared_norms[p]));
      d->set_non_finite_count(acc.parameter_non_finite[p]);
    }
    return;
  }
  for (int i = 0; i < out->diagnostics_size(); ++i) {
    v1::LayerDiagnostics* d = out->mutable_diagnostics(i);
    if (d->has_output_grad_norm()) {
      d->set_output_grad_norm(std::sqrt(acc.output_grad_sq[i]) / divisor);
    }
    d->set_activation_norm(std::sqrt(acc.activation_sq[i]));
    d->set_non_finite_count(acc.non_finite[i]);
  }
  // Gradient norms of the combined gradients, per Linear layer in model order.
  for (int i = 0, l = 0; i < out->diagnostics_size() && 2 * l < acc.sums.tensors(); ++i) {
    v1::LayerDiagnostics* d = out->mutable_diagnostics(i);
    if (d->kind() != "linear") continue;
    d->set_weight_grad_norm(std::sqrt(squared_norms[2 * l]));
    if (d->has_bias_grad_norm()) d->set_bias_grad_norm(std::sqrt(squared_norms[2 * l + 1]));
    ++l;
  }
}

}  // namespace gradserve::service
