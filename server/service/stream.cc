#include "server/service/stream.h"

#include <cmath>
#include <cstring>
#include <optional>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "server/engine/model.h"
#include "server/engine/status_macros.h"
#include "server/service/convert.h"

namespace gradserve::service {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// A TensorChunk.field, parsed.
struct FieldPath {
  enum Kind { kInputs, kTargets, kOutputGradient, kParameters, kParameterUpdate } kind;
  int index = 0;  // Linear layer, for the two parameter kinds.
  bool bias = false;
};

std::optional<FieldPath> ParseFieldPath(absl::string_view path, int num_linear) {
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
  }
  return conflict;  // Unreachable: every kind is handled above.
}

template <typename T>
T Load(const char* bytes, int64_t i) {
  T value;
  std::memcpy(&value, bytes + i * sizeof(T), sizeof(T));
  return value;
}

template <typename T>
void Store(char* bytes, int64_t i, T value) {
  std::memcpy(bytes + i * sizeof(T), &value, sizeof(T));
}

// Adds the elements of `values` (T, little-endian) times `weight` to `sums`.
template <typename T>
void AddWeighted(const std::string& values, double weight, std::vector<double>* sums) {
  for (size_t i = 0; i < sums->size(); ++i) {
    (*sums)[i] += weight * static_cast<double>(Load<T>(values.data(), i));
  }
}

// `sums` / divisor as a tensor of T with `shape`; returns the squared norm of what it wrote.
template <typename T>
double WriteTensor(const std::vector<double>& sums, double divisor, v1::DType dtype,
                   const google::protobuf::RepeatedField<int64_t>& shape, v1::Tensor* out) {
  out->set_dtype(dtype);
  *out->mutable_shape() = shape;
  std::string* data = out->mutable_data();
  data->resize(sums.size() * sizeof(T));
  double squared_norm = 0;
  for (size_t i = 0; i < sums.size(); ++i) {
    const T value = static_cast<T>(sums[i] / divisor);
    Store<T>(data->data(), i, value);
    squared_norm += static_cast<double>(value) * static_cast<double>(value);
  }
  return squared_norm;
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
  return bytes;
}

int64_t StreamSession::held_bytes() const {
  return ParameterBytes() + staged_bytes_ + accumulation_.bytes;
}

bool StreamSession::MeanReduction() const {
  const v1::Loss& loss = request_.model().loss();
  return !loss.has_external() && loss.reduction() != v1::REDUCTION_SUM;
}

double StreamSession::Cost(const v1::StreamGradientsRequest& message) const {
  if (!message.has_step()) return 0;
  const v1::Tensor* inputs = nullptr;
  if (message.step().has_inputs()) {
    inputs = &message.step().inputs();
  } else if (const auto it = staged_.find("inputs"); it != staged_.end()) {
    inputs = &it->second.tensor;
  }
  if (inputs == nullptr || inputs->shape_size() == 0) return 0;
  return 6 * std::max<double>(0, static_cast<double>(inputs->shape(0))) * multiply_adds_;
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
  return absl::Status(answered.status().code(), absl::StrCat("message ", index, " (", kind,
                                                             "): ", answered.status().message()));
}

absl::Status StreamSession::Setup(v1::StreamSetup* setup) {
  if (!setup->has_model()) return Invalid("setup.model", "required");
  ASSIGN_OR_RETURN(engine::ModelSpec spec, ToModelSpec(setup->model(), limits_));
  if (setup->dtype() != v1::DTYPE_FLOAT32 && setup->dtype() != v1::DTYPE_FLOAT64) {
    return Invalid("setup.dtype",
                   absl::StrCat("expected DTYPE_FLOAT32 or DTYPE_FLOAT64, got ",
                                v1::DType_IsValid(setup->dtype()) ? v1::DType_Name(setup->dtype())
                                                                  : absl::StrCat(setup->dtype())));
  }
  num_linear_ = 0;
  multiply_adds_ = 0;
  int64_t input_features = 0;
  for (const engine::LayerSpec& layer : spec.layers) {
    if (layer.kind != engine::LayerKind::kLinear) continue;
    if (num_linear_++ == 0) input_features = layer.in_features;
    multiply_adds_ += static_cast<double>(layer.in_features) * layer.out_features;
  }
  // Width mismatches fail here rather than at the first step. Layers before the first Linear
  // keep the width, so the inputs are as wide as it; a model without Linear layers takes any
  // width and is checked at each step.
  if (num_linear_ > 0) RETURN_IF_ERROR(engine::Model::Create(spec, input_features).status());
  // A model without Linear layers has no parameters to send: every step may go straight on.
  has_parameters_ = num_linear_ == 0;
  dtype_ = setup->dtype();
  request_.mutable_model()->Swap(setup->mutable_model());
  request_.mutable_options()->Swap(setup->mutable_options());
  set_up_ = true;
  return absl::OkStatus();
}

absl::Status StreamSession::Chunk(v1::TensorChunk* chunk) {
  const std::string& name = chunk->field();
  if (!ParseFieldPath(name, num_linear_)) {
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
    if (chunk->shape_size() == 0 || chunk->shape_size() > 2) {
      return Invalid(field + ".shape",
                     "the first chunk of a tensor must set its shape (rank 1 or 2)");
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
    const std::optional<FieldPath> path = ParseFieldPath(name, num_linear_);
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
  if (held_bytes() > limits_.max_stream_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("parameters: the stream would hold ", held_bytes(),
                     " bytes, over max_stream_bytes (", limits_.max_stream_bytes, ")"));
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
  const bool check_finite = !request_.options().allow_non_finite();
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
      const v1::Tensor& h = bias ? held.bias() : held.weight();
      const v1::Tensor& u = bias ? update.bias() : update.weight();
      if (u.dtype() != dtype_) {
        return Invalid(field + ".dtype",
                       absl::StrCat("expected ", v1::DType_Name(dtype_), " (the stream's dtype)"));
      }
      if (!SameShape(h, u) || u.data().size() != h.data().size()) {
        return Invalid(field, "expected the shape and byte length of the held parameter");
      }
      if (check_finite) {
        for (size_t i = 0; i < u.data().size() / sizeof(T); ++i) {
          if (!std::isfinite(Load<T>(u.data().data(), i))) {
            return Invalid(field + ".data",
                           absl::StrCat("non-finite value at flat index ", i,
                                        "; set options.allow_non_finite to compute anyway"));
          }
        }
      }
    }
  }
  for (int l = 0; l < num_linear_; ++l) {
    v1::LinearParameters* held = request_.mutable_parameters(l);
    const v1::LinearParameters& update = step.parameter_update(l);
    for (const bool bias : {false, true}) {
      if (!(bias ? held->has_bias() : held->has_weight())) continue;
      std::string* target = (bias ? held->mutable_bias() : held->mutable_weight())->mutable_data();
      const std::string& delta = (bias ? update.bias() : update.weight()).data();
      // p = p + u, rounded once in T: what a caller does to its own copy.
      for (size_t i = 0; i < target->size() / sizeof(T); ++i) {
        Store<T>(target->data(), i,
                 static_cast<T>(Load<T>(target->data(), i) + Load<T>(delta.data(), i)));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> StreamSession::Step(v1::StreamStep* step, const ComputeContext& context,
                                         v1::StreamGradientsResponse* response) {
  const int64_t step_index = steps_ - 1;
  RETURN_IF_ERROR(Unstage(step));
  const bool accumulating = accumulation_.micro_batches > 0;
  const bool sends_parameters = step->parameters_size() > 0;
  const bool sends_update = step->parameter_update_size() > 0;
  if (sends_parameters && sends_update) {
    return Invalid("parameter_update", "not together with parameters: send one or the other");
  }
  if (accumulating && (sends_parameters || sends_update)) {
    return Invalid(sends_parameters ? "parameters" : "parameter_update",
                   "the parameters cannot change during an accumulation (the gradients of "
                   "its micro-batches are summed)");
  }
  if (sends_parameters) {
    RETURN_IF_ERROR(TakeParameters(step));
  } else if (sends_update) {
    if (!has_parameters_) {
      return Invalid("parameter_update",
                     "the stream holds no parameters yet; send parameters on the first step");
    }
    RETURN_IF_ERROR(dtype_ == v1::DTYPE_FLOAT32 ? ApplyUpdate<float>(*step)
                                                : ApplyUpdate<double>(*step));
  } else if (!has_parameters_) {
    return Invalid("parameters", "required on the stream's first step");
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
  v1::ComputeGradientsResponse result;
  const absl::Status status = ComputeGradients(request_, limits_, context, &result);
  // The batch is not part of the stream's state.
  request_.clear_inputs();
  request_.clear_targets();
  request_.clear_output_gradient();
  RETURN_IF_ERROR(status);

  if (!step->accumulate() && !accumulating) {
    response->set_step_index(step_index);
    response->set_micro_batches(1);
    response->mutable_result()->Swap(&result);
    return true;
  }
  RETURN_IF_ERROR(Accumulate(&result));
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
// With MEAN reduction a micro-batch of n_i examples returns gradients averaged over its own
// examples, so the whole batch's gradient is sum_i(n_i * g_i) / sum_i(n_i) (the same holds for
// MSE/L1/Huber/BCE, which average over n_i * width elements: the width cancels). With SUM, and
// for the external loss (whose output gradient is used as given), it is sum_i(g_i). The sums
// are kept in float64 and rounded to the stream's dtype once, at the end; input gradients are
// per example, so micro-batch i's rows are scaled by n_i / sum(n) (MEAN) and concatenated.
absl::Status StreamSession::Accumulate(v1::ComputeGradientsResponse* result) {
  Accumulation& acc = accumulation_;
  const int64_t examples = result->stats().num_examples();
  const double weight = MeanReduction() ? static_cast<double>(examples) : 1.0;
  const int num_layers = result->diagnostics_size();
  if (acc.micro_batches == 0) {
    int64_t elements = 0;
    for (const v1::LinearGradients& g : result->gradients()) {
      elements += (g.weight().data().size() + g.bias().data().size()) / DTypeSize(dtype_);
    }
    const int64_t bytes = elements * static_cast<int64_t>(sizeof(double));
    if (held_bytes() + bytes > limits_.max_stream_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "accumulate: the float64 accumulator needs ", bytes, " bytes; the stream would hold ",
          held_bytes() + bytes, ", over max_stream_bytes (", limits_.max_stream_bytes, ")"));
    }
    acc.bytes = bytes;
    for (const v1::LinearGradients& g : result->gradients()) {
      acc.weights.emplace_back(g.weight().data().size() / DTypeSize(dtype_), 0.0);
      acc.biases.emplace_back(g.bias().data().size() / DTypeSize(dtype_), 0.0);
    }
    acc.output_grad_sq.assign(num_layers, 0.0);
    acc.activation_sq.assign(num_layers, 0.0);
    acc.non_finite.assign(num_layers, 0);
  }
  const int64_t row_bytes = result->input_gradient().data().size() + result->output().data().size();
  if (held_bytes() + row_bytes > limits_.max_stream_bytes ||
      ParameterBytes() + acc.row_bytes + row_bytes > limits_.max_message_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "accumulate: the input gradients and outputs of the micro-batches so far would exceed "
        "max_stream_bytes (",
        limits_.max_stream_bytes, ") or the answer max_message_bytes (", limits_.max_message_bytes,
        "); answer sooner or leave them out of the options"));
  }
  for (size_t l = 0; l < acc.weights.size(); ++l) {
    const v1::LinearGradients& g = result->gradients(l);
    if (dtype_ == v1::DTYPE_FLOAT32) {
      AddWeighted<float>(g.weight().data(), weight, &acc.weights[l]);
      AddWeighted<float>(g.bias().data(), weight, &acc.biases[l]);
    } else {
      AddWeighted<double>(g.weight().data(), weight, &acc.weights[l]);
      AddWeighted<double>(g.bias().data(), weight, &acc.biases[l]);
    }
  }
  for (int i = 0; i < num_layers; ++i) {
    const v1::LayerDiagnostics& d = result->diagnostics(i);
    acc.output_grad_sq[i] += weight * weight * d.output_grad_norm() * d.output_grad_norm();
    acc.activation_sq[i] += d.activation_norm() * d.activation_norm();
    acc.non_finite[i] += d.non_finite_count();
  }
  acc.weighted_loss += weight * result->loss();
  acc.examples += examples;
  acc.weights_of_batches.push_back(weight);
  acc.input_gradients.push_back(std::move(*result->mutable_input_gradient()->mutable_data()));
  acc.outputs.push_back(std::move(*result->mutable_output()->mutable_data()));
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
  const double divisor = MeanReduction() ? static_cast<double>(acc.examples) : 1.0;
  out->Swap(&acc.last);  // Labels, stats and plan; gradients, rows and norms replaced below.
  out->set_loss(acc.weighted_loss / divisor);
  std::vector<double> weight_sq(acc.weights.size()), bias_sq(acc.weights.size());
  for (size_t l = 0; l < acc.weights.size(); ++l) {
    v1::LinearGradients* g = out->mutable_gradients(l);
    weight_sq[l] =
        WriteTensor<T>(acc.weights[l], divisor, dtype_, g->weight().shape(), g->mutable_weight());
    if (g->has_bias()) {
      bias_sq[l] =
          WriteTensor<T>(acc.biases[l], divisor, dtype_, g->bias().shape(), g->mutable_bias());
    }
  }
  // Rows in arrival order; input gradients rescaled from their micro-batch's mean to the whole
  // batch's.
  for (const bool input_gradient : {true, false}) {
    v1::Tensor* tensor = input_gradient ? out->mutable_input_gradient() : out->mutable_output();
    const std::vector<std::string>& parts = input_gradient ? acc.input_gradients : acc.outputs;
    if (parts.front().empty()) {
      input_gradient ? out->clear_input_gradient() : out->clear_output();
      continue;
    }
    std::string data;
    for (size_t i = 0; i < parts.size(); ++i) {
      if (!input_gradient || acc.weights_of_batches[i] == divisor) {
        data += parts[i];
        continue;
      }
      const double scale = acc.weights_of_batches[i] / divisor;
      const size_t start = data.size();
      data.resize(start + parts[i].size());
      for (size_t j = 0; j < parts[i].size() / sizeof(T); ++j) {
        Store<T>(data.data() + start, j,
                 static_cast<T>(scale * static_cast<double>(Load<T>(parts[i].data(), j))));
      }
    }
    const int64_t width = tensor->shape(1);
    tensor->mutable_shape()->Set(0, static_cast<int64_t>(data.size() / sizeof(T)) / width);
    tensor->set_data(std::move(data));
  }
  for (int i = 0; i < out->diagnostics_size(); ++i) {
    v1::LayerDiagnostics* d = out->mutable_diagnostics(i);
    d->set_output_grad_norm(std::sqrt(acc.output_grad_sq[i]) / divisor);
    d->set_activation_norm(std::sqrt(acc.activation_sq[i]));
    d->set_non_finite_count(acc.non_finite[i]);
  }
  // Gradient norms of the combined gradients, per Linear layer in model order.
  for (int i = 0, l = 0; i < out->diagnostics_size() && l < static_cast<int>(weight_sq.size());
       ++i) {
    v1::LayerDiagnostics* d = out->mutable_diagnostics(i);
    if (d->kind() != "linear") continue;
    d->set_weight_grad_norm(std::sqrt(weight_sq[l]));
    d->set_bias_grad_norm(std::sqrt(bias_sq[l]));
    ++l;
  }
}

}  // namespace gradserve::service
