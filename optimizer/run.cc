#include "optimizer/run.h"

#include <cmath>
#include <cstring>
#include <random>
#include <unordered_map>
#include <unordered_set>

#include "absl/status/status.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "gradserve/client.h"
#include "server/service/onnx_import.h"

// Note [A step]
// A step reads the batch (the request's, or the data set's batch for the run's step number),
// rounds the float64 parameters to the run's dtype, sends model + parameters + batch to
// gradserve through the ShardedClient (split over the replicas, combined in float64 in part
// order, retried on another replica when one is unavailable), widens the gradients back to
// float64 and applies the update rule to every parameter. Nothing is changed until the
// gradients are in: a step that fails leaves the run as it was, so the caller (or the
// background trainer) can take it again. Because the batch of step s depends only on s, the
// combination on (seed, s) is fixed and the update is float64 arithmetic in a fixed order, a
// run restored from a checkpoint at step s computes the same parameters as one never
// interrupted, bit for bit.

namespace gradserve::optimizer {
namespace {

namespace gv1 = gradserve::v1;
namespace npy = client::npy;

constexpr int kRecentLosses = 100;

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

int64_t ElementCount(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t size : shape) count *= size;
  return count;
}

// The tensor's elements widened to float64, checked against `shape`.
absl::StatusOr<std::vector<double>> ToDoubles(const gv1::Tensor& tensor,
                                              const std::vector<int64_t>& shape,
                                              const std::string& field) {
  const std::vector<int64_t> got(tensor.shape().begin(), tensor.shape().end());
  if (got != shape) {
    return Invalid(field + ".shape: " + ShapeString(got) + ", expected " + ShapeString(shape));
  }
  const int64_t count = ElementCount(shape);
  std::vector<double> values(count);
  if (tensor.dtype() == gv1::DTYPE_FLOAT32) {
    if (tensor.data().size() != static_cast<size_t>(count) * 4) {
      return Invalid(field + ".data: " + std::to_string(tensor.data().size()) +
                     " bytes, expected " + std::to_string(count * 4));
    }
    for (int64_t i = 0; i < count; ++i) {
      float value;
      std::memcpy(&value, tensor.data().data() + i * 4, 4);
      values[i] = value;
    }
  } else if (tensor.dtype() == gv1::DTYPE_FLOAT64) {
    if (tensor.data().size() != static_cast<size_t>(count) * 8) {
      return Invalid(field + ".data: " + std::to_string(tensor.data().size()) +
                     " bytes, expected " + std::to_string(count * 8));
    }
    std::memcpy(values.data(), tensor.data().data(), count * 8);
  } else {
    return Invalid(field + ".dtype: " + gv1::DType_Name(tensor.dtype()) +
                   ", expected DTYPE_FLOAT32 or DTYPE_FLOAT64");
  }
  return values;
}

void ToTensor(const std::vector<double>& values, const std::vector<int64_t>& shape,
              gv1::DType dtype, gv1::Tensor* tensor) {
  tensor->set_dtype(dtype);
  tensor->mutable_shape()->Assign(shape.begin(), shape.end());
  std::string* data = tensor->mutable_data();
  if (dtype == gv1::DTYPE_FLOAT64) {
    data->assign(reinterpret_cast<const char*>(values.data()), values.size() * 8);
    return;
  }
  data->resize(values.size() * 4);
  for (size_t i = 0; i < values.size(); ++i) {
    const float value = static_cast<float>(values[i]);
    std::memcpy(data->data() + i * 4, &value, 4);
  }
}

npy::Array DoubleArray(const std::vector<double>& values, std::vector<int64_t> shape) {
  npy::Array array;
  array.dtype = npy::DType::kFloat64;
  array.shape = std::move(shape);
  array.data.assign(reinterpret_cast<const char*>(values.data()), values.size() * 8);
  return array;
}

std::string Serialized(const v1::RunSpec& spec) {
  std::string bytes;
  google::protobuf::io::StringOutputStream stream(&bytes);
  google::protobuf::io::CodedOutputStream coded(&stream);
  coded.SetSerializationDeterministic(true);
  spec.SerializeToCodedStream(&coded);
  coded.Trim();
  return bytes;
}

// The spec without what a restart may change.
v1::RunSpec TrajectoryOf(v1::RunSpec spec) {
  spec.clear_parameters();
  spec.clear_named_parameters();
  spec.clear_gradserve_targets();
  spec.clear_shards();
  spec.clear_max_steps();
  spec.clear_checkpoint_every();
  return spec;
}

absl::Status FromGrpc(const grpc::Status& status) {
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      "gradserve: " + status.error_message());
}

}  // namespace

bool IsValidRunId(const std::string& run_id) {
  if (run_id.empty() || run_id.size() > 64 || run_id.front() == '.') return false;
  for (char c : run_id) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-')) {
      return false;
    }
  }
  return true;
}

absl::Status Run::Prepare(const v1::RunSpec& spec, const RunEnvironment& environment) {
  if (!IsValidRunId(spec.run_id())) {
    return Invalid("spec.run_id: \"" + spec.run_id() +
                   "\" must be 1 to 64 of [A-Za-z0-9_.-], not starting with \".\"");
  }
  spec_ = spec;
  spec_.clear_parameters();
  spec_.clear_named_parameters();
  environment_ = environment;
  absl::StatusOr<UpdateRule> rule = MakeUpdateRule(spec.optimizer(), "spec.optimizer");
  if (!rule.ok()) return rule.status();
  rule_ = *rule;
  if (spec.max_steps() < 0) return Invalid("spec.max_steps: negative");
  if (spec.checkpoint_every() < 0) return Invalid("spec.checkpoint_every: negative");
  if (spec.shards() < 0 || spec.shards() > 1024) return Invalid("spec.shards: not in 0..1024");
  switch (spec.dtype()) {
    case gv1::DTYPE_UNSPECIFIED:
    case gv1::DTYPE_FLOAT32:
      dtype_ = gv1::DTYPE_FLOAT32;
      break;
    case gv1::DTYPE_FLOAT64:
      dtype_ = gv1::DTYPE_FLOAT64;
      break;
    default:
      return Invalid("spec.dtype: DTYPE_FLOAT32 or DTYPE_FLOAT64");
  }

  // The parameters' names and shapes (values: Create or Restore).
  const gv1::Model& model = spec.model();
  const int forms = (model.layers_size() > 0) + model.has_graph() + model.has_onnx();
  if (forms != 1) return Invalid("spec.model: exactly one of layers, graph and onnx must be set");
  model_ = model;
  chain_ = model.layers_size() > 0;
  int64_t total_bytes = 0;
  const int64_t item = dtype_ == gv1::DTYPE_FLOAT32 ? 4 : 8;
  const auto add_parameter = [&](std::string name, std::vector<int64_t> shape,
                                 const std::string& field) -> absl::Status {
    int64_t count = 1;
    for (int64_t size : shape) {
      // Each factor bounded first, so the product cannot overflow before it is compared.
      if (size < 1 || size > environment.max_message_bytes) {
        return Invalid(field + ": size " + std::to_string(size) + " is out of range");
      }
      count *= size;
      if (count > environment.max_message_bytes) break;
    }
    total_bytes += std::min(count, environment.max_message_bytes + 1) * item;
    if (total_bytes > environment.max_message_bytes) {
      return absl::ResourceExhaustedError(field +
                                          ": the parameters take more than --max-message-bytes (" +
                                          std::to_string(environment.max_message_bytes) +
                                          ") in the run's dtype, so no step could send them");
    }
    parameters_.push_back({std::move(name), std::move(shape), {}, {}});
    return absl::OkStatus();
  };
  if (chain_) {
    for (int l = 0; l < model.layers_size(); ++l) {
      if (!model.layers(l).has_linear()) continue;
      const gv1::Linear& linear = model.layers(l).linear();
      const std::string field = "spec.model.layers[" + std::to_string(l) + "].linear";
      absl::Status status = add_parameter(std::to_string(l) + ".weight",
                                          {linear.out_features(), linear.in_features()}, field);
      if (status.ok() && (!linear.has_bias() || linear.bias())) {
        status = add_parameter(std::to_string(l) + ".bias", {linear.out_features()}, field);
      }
      if (!status.ok()) return status;
    }
    input_name_.clear();
    target_name_.clear();
  } else {
    if (model.has_onnx()) {
      service::ServiceLimits limits;
      limits.max_message_bytes = environment.max_message_bytes;
      absl::StatusOr<service::ImportedOnnx> imported =
          service::ImportOnnx(model, spec.dtype(), limits);
      if (!imported.ok()) {
        return absl::Status(imported.status().code(),
                            "spec." + std::string(imported.status().message()));
      }
      model_ = imported->model;
      dtype_ = imported->dtype;
      for (const gv1::NamedTensor& value : imported->defaults) {
        const std::string field = "spec.model.onnx: initializer \"" + value.name() + "\"";
        absl::Status status = add_parameter(
            value.name(), {value.tensor().shape().begin(), value.tensor().shape().end()}, field);
        if (!status.ok()) return status;
        absl::StatusOr<std::vector<double>> values =
            ToDoubles(value.tensor(), parameters_.back().shape, field);
        if (!values.ok()) return values.status();
        parameters_.back().value = *std::move(values);
      }
    } else {
      for (int p = 0; p < model.graph().parameters_size(); ++p) {
        const gv1::GraphParameter& parameter = model.graph().parameters(p);
        absl::Status status =
            add_parameter(parameter.name(), {parameter.shape().begin(), parameter.shape().end()},
                          "spec.model.graph.parameters[" + std::to_string(p) + "]");
        if (!status.ok()) return status;
      }
    }
    input_name_ = spec.dataset().input_name().empty() ? "x" : spec.dataset().input_name();
    target_name_ = model_.graph().loss_target();
  }

  if (spec.has_dataset()) {
    absl::StatusOr<Dataset> dataset =
        Dataset::Load(spec.dataset(), "spec.dataset", environment.data_dir, dtype_,
                      environment.max_dataset_bytes);
    if (!dataset.ok()) return dataset.status();
    dataset_.emplace(*std::move(dataset));
  } else if (spec.max_steps() > 0) {
    return Invalid("spec.max_steps: background training needs spec.dataset");
  }

  // The replicas.
  std::vector<std::string> targets(spec.gradserve_targets().begin(),
                                   spec.gradserve_targets().end());
  if (targets.empty()) targets = environment.default_targets;
  if (targets.empty()) return Invalid("spec.gradserve_targets: empty, and no --gradserve either");
  client::ShardedClientOptions options;
  options.client.max_message_bytes = environment.max_message_bytes;
  options.client.timeout = environment.step_timeout;
  options.client.bearer_token = environment.gradserve_token;
  // A hung replica's part moves on to another replica while half the step's time is left.
  options.attempt_timeout = environment.step_timeout / 2;
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  client::ClientOptions channel_options = options.client;
  // One channel per replica: a part refused by one moves on to the next at once (the
  // ShardedClient's retry) rather than waiting out the channel's own retries there. One
  // channel over many replicas keeps them: they go to another replica.
  channel_options.retry_unavailable = targets.size() == 1;
  for (const std::string& target : targets) {
    channels.push_back(client::CreateChannel(target, channel_options));
  }
  shards_ = spec.shards() > 0 ? spec.shards() : environment.default_shards;
  if (shards_ <= 0) shards_ = static_cast<int>(channels.size());
  gradserve_ = channels.size() == 1
                   ? std::make_unique<client::ShardedClient>(channels[0], shards_, options)
                   : std::make_unique<client::ShardedClient>(std::move(channels), options);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Run>> Run::Create(const v1::RunSpec& spec,
                                                 const RunEnvironment& environment) {
  std::unique_ptr<Run> run(new Run());
  if (absl::Status status = run->Prepare(spec, environment); !status.ok()) return status;
  std::vector<Parameter>& parameters = run->parameters_;
  if (run->chain_) {
    if (spec.named_parameters_size() > 0) {
      return Invalid("spec.named_parameters: chain models take spec.parameters");
    }
    if (spec.parameters_size() == 0) {
      // nn.Linear's default: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)), drawn from a
      // generator per layer so that a layer's values do not depend on the others'.
      for (size_t p = 0; p < parameters.size(); ++p) {
        Parameter& parameter = parameters[p];
        const int64_t in =
            parameter.shape.size() == 2 ? parameter.shape[1] : parameters[p - 1].shape[1];
        const double bound = 1.0 / std::sqrt(static_cast<double>(in));
        std::seed_seq seeds{static_cast<uint32_t>(spec.init_seed()),
                            static_cast<uint32_t>(spec.init_seed() >> 32),
                            static_cast<uint32_t>(p)};
        std::mt19937_64 random(seeds);
        parameter.value.resize(ElementCount(parameter.shape));
        for (double& value : parameter.value) {
          const double unit = static_cast<double>(random() >> 11) * 0x1p-53;  // [0, 1)
          value = -bound + 2 * bound * unit;
        }
      }
    } else {
      int linear = 0;
      size_t p = 0;
      for (int l = 0; l < spec.model().layers_size(); ++l) {
        if (!spec.model().layers(l).has_linear()) continue;
        const std::string field = "spec.parameters[" + std::to_string(linear) + "]";
        if (linear >= spec.parameters_size()) {
          return Invalid("spec.parameters: " + std::to_string(spec.parameters_size()) +
                         " entries for more Linear layers; give one per layer or none");
        }
        const gv1::LinearParameters& given = spec.parameters(linear++);
        absl::StatusOr<std::vector<double>> weight =
            ToDoubles(given.weight(), parameters[p].shape, field + ".weight");
        if (!weight.ok()) return weight.status();
        parameters[p++].value = *std::move(weight);
        if (p < parameters.size() && parameters[p].name == std::to_string(l) + ".bias") {
          if (!given.has_bias()) return Invalid(field + ".bias: unset for a layer with a bias");
          absl::StatusOr<std::vector<double>> bias =
              ToDoubles(given.bias(), parameters[p].shape, field + ".bias");
          if (!bias.ok()) return bias.status();
          parameters[p++].value = *std::move(bias);
        } else if (given.has_bias()) {
          return Invalid(field + ".bias: set for a layer without a bias");
        }
      }
      if (linear != spec.parameters_size()) {
        return Invalid("spec.parameters: " + std::to_string(spec.parameters_size()) +
                       " entries for " + std::to_string(linear) + " Linear layers");
      }
    }
  } else {
    if (spec.parameters_size() > 0) {
      return Invalid("spec.parameters: graph and ONNX models take spec.named_parameters");
    }
    std::unordered_map<std::string, size_t> index;
    for (size_t p = 0; p < parameters.size(); ++p) index[parameters[p].name] = p;
    std::unordered_set<std::string> given;
    for (int i = 0; i < spec.named_parameters_size(); ++i) {
      const gv1::NamedTensor& named = spec.named_parameters(i);
      const std::string field =
          "spec.named_parameters[" + std::to_string(i) + "] (\"" + named.name() + "\")";
      auto found = index.find(named.name());
      if (found == index.end()) return Invalid(field + ": not a parameter of the model");
      if (!given.insert(named.name()).second) return Invalid(field + ": given twice");
      absl::StatusOr<std::vector<double>> values =
          ToDoubles(named.tensor(), parameters[found->second].shape, field + ".tensor");
      if (!values.ok()) return values.status();
      parameters[found->second].value = *std::move(values);
    }
    for (const Parameter& parameter : parameters) {
      if (parameter.value.empty()) {
        return Invalid("spec.named_parameters: no value for \"" + parameter.name + "\"");
      }
    }
  }
  return run;
}

absl::StatusOr<std::unique_ptr<Run>> Run::Restore(
    const std::map<std::string, npy::Array>& checkpoint, const std::string& where,
    const v1::RunSpec* operational, const RunEnvironment& environment) {
  const auto member = [&](const std::string& name) -> const npy::Array* {
    auto found = checkpoint.find(name);
    return found == checkpoint.end() ? nullptr : &found->second;
  };
  const auto bad = [&](const std::string& what) { return Invalid(where + ": " + what); };
  const npy::Array* spec_bytes = member("spec");
  if (spec_bytes == nullptr || spec_bytes->dtype != npy::DType::kUint8 ||
      spec_bytes->shape.size() != 1) {
    return bad("spec: missing, or not a uint8 array");
  }
  v1::RunSpec spec;
  if (!spec.ParseFromString(spec_bytes->data)) return bad("spec: not a RunSpec");
  if (operational != nullptr) {
    spec.mutable_gradserve_targets()->CopyFrom(operational->gradserve_targets());
    spec.set_shards(operational->shards());
    spec.set_max_steps(operational->max_steps());
    spec.set_checkpoint_every(operational->checkpoint_every());
  }
  std::unique_ptr<Run> run(new Run());
  if (absl::Status status = run->Prepare(spec, environment); !status.ok()) {
    return bad(std::string(status.message()));
  }
  const npy::Array* step = member("step");
  if (step == nullptr || step->dtype != npy::DType::kInt64 || !step->shape.empty()) {
    return bad("step: missing, or not an int64 scalar");
  }
  std::memcpy(&run->step_, step->data.data(), 8);
  if (run->step_ < 0) return bad("step: negative");
  const npy::Array* loss = member("loss");
  if (loss == nullptr || loss->dtype != npy::DType::kFloat64 || loss->shape.size() != 1 ||
      loss->shape[0] != run->step_) {
    return bad("loss: missing, or not float64 [step]");
  }
  run->losses_.resize(run->step_);
  if (run->step_ > 0) std::memcpy(run->losses_.data(), loss->data.data(), run->step_ * 8);
  const auto read = [&](const std::string& name, const Parameter& parameter,
                        std::vector<double>* out, bool required) -> absl::Status {
    const npy::Array* array = member(name);
    if (array == nullptr) return required ? bad(name + ": missing") : absl::OkStatus();
    if (array->dtype != npy::DType::kFloat64 || array->shape != parameter.shape) {
      return bad(name + ": expected float64 " + ShapeString(parameter.shape));
    }
    out->resize(ElementCount(parameter.shape));
    std::memcpy(out->data(), array->data.data(), out->size() * 8);
    return absl::OkStatus();
  };
  const bool stateful =
      run->step_ > 0 && (run->rule_.algorithm != Algorithm::kSgd || run->rule_.momentum != 0);
  const bool adam = run->rule_.algorithm != Algorithm::kSgd;
  for (Parameter& parameter : run->parameters_) {
    const std::string state = "state/" + parameter.name + "/";
    absl::Status status = read("param/" + parameter.name, parameter, &parameter.value, true);
    if (status.ok() && adam) {
      status = read(state + "exp_avg", parameter, &parameter.state.exp_avg, stateful);
      if (status.ok()) {
        status = read(state + "exp_avg_sq", parameter, &parameter.state.exp_avg_sq, stateful);
      }
    } else if (status.ok()) {
      status =
          read(state + "momentum_buffer", parameter, &parameter.state.momentum_buffer, stateful);
    }
    if (!status.ok()) return status;
  }
  return run;
}

bool Run::SameTrajectory(const v1::RunSpec& spec) const {
  return Serialized(TrajectoryOf(spec)) == Serialized(TrajectoryOf(spec_));
}

int64_t Run::checkpoint_every() const {
  return spec_.checkpoint_every() > 0 ? spec_.checkpoint_every() : environment_.checkpoint_every;
}

int64_t Run::MemoryBytes() const {
  int64_t elements = 0;
  for (const Parameter& parameter : parameters_) elements += ElementCount(parameter.shape);
  const int kept = rule_.algorithm != Algorithm::kSgd ? 3 : (rule_.momentum != 0 ? 2 : 1);
  return elements * kept * 8 + (dataset_ ? dataset_->bytes() : 0);
}

int64_t Run::step() const {
  std::lock_guard lock(state_mutex_);
  return step_;
}

absl::Status Run::BuildRequest(const v1::StepRequest& request, gv1::ComputeGradientsRequest* out) {
  const bool has_batch =
      request.has_inputs() || request.has_targets() || request.graph_inputs_size() > 0;
  *out->mutable_model() = model_;
  if (has_batch) {
    if (chain_ && request.graph_inputs_size() > 0) {
      return Invalid("graph_inputs: a chain model takes inputs and targets");
    }
    if (!chain_ && (request.has_inputs() || request.has_targets())) {
      return Invalid("inputs, targets: a graph model takes graph_inputs");
    }
    *out->mutable_inputs() = request.inputs();
    if (request.has_targets()) *out->mutable_targets() = request.targets();
    out->mutable_graph_inputs()->CopyFrom(request.graph_inputs());
  } else {
    if (!dataset_) {
      return absl::FailedPreconditionError(
          "the step carries no batch (inputs, targets, graph_inputs) and run \"" + spec_.run_id() +
          "\" has no data set");
    }
    gv1::Tensor inputs, targets;
    dataset_->Batch(step_, &inputs, &targets);
    if (chain_) {
      *out->mutable_inputs() = std::move(inputs);
      *out->mutable_targets() = std::move(targets);
    } else {
      gv1::NamedTensor* input = out->add_graph_inputs();
      input->set_name(input_name_);
      *input->mutable_tensor() = std::move(inputs);
      gv1::NamedTensor* target = out->add_graph_inputs();
      target->set_name(target_name_);
      *target->mutable_tensor() = std::move(targets);
    }
  }
  std::lock_guard lock(state_mutex_);
  if (chain_) {
    for (size_t p = 0; p < parameters_.size(); ++p) {
      const Parameter& parameter = parameters_[p];
      if (parameter.shape.size() == 2) {
        ToTensor(parameter.value, parameter.shape, dtype_, out->add_parameters()->mutable_weight());
      } else {
        ToTensor(parameter.value, parameter.shape, dtype_,
                 out->mutable_parameters(out->parameters_size() - 1)->mutable_bias());
      }
    }
  } else {
    for (const Parameter& parameter : parameters_) {
      gv1::NamedTensor* named = out->add_named_parameters();
      named->set_name(parameter.name);
      ToTensor(parameter.value, parameter.shape, dtype_, named->mutable_tensor());
    }
  }
  return absl::OkStatus();
}

absl::Status Run::Step(const v1::StepRequest& request, v1::StepResponse* response) {
  std::lock_guard step_lock(step_mutex_);
  if (request.has_expected_step() && request.expected_step() != step_) {
    return absl::FailedPreconditionError("run \"" + spec_.run_id() + "\" has taken " +
                                         std::to_string(step_) + " steps, not expected_step " +
                                         std::to_string(request.expected_step()));
  }
  gv1::ComputeGradientsRequest call;
  if (absl::Status status = BuildRequest(request, &call); !status.ok()) return status;
  gv1::ComputeGradientsResponse answer;
  client::ShardedCallStats stats;
  grpc::Status status = gradserve_->ComputeGradients(call, shards_, &answer, &stats);
  if (!status.ok()) return FromGrpc(status);

  // Every gradient widened and checked before anything changes.
  std::vector<std::vector<double>> gradients(parameters_.size());
  std::unordered_map<std::string, int> named;
  for (int g = 0; g < answer.named_gradients_size(); ++g)
    named[answer.named_gradients(g).name()] = g;
  int layer = 0;
  for (size_t p = 0; p < parameters_.size(); ++p) {
    const Parameter& parameter = parameters_[p];
    const gv1::Tensor* tensor = nullptr;
    if (chain_) {
      if (parameter.shape.size() == 2 && p > 0) ++layer;
      if (layer < answer.gradients_size()) {
        tensor = parameter.shape.size() == 2 ? &answer.gradients(layer).weight()
                                             : &answer.gradients(layer).bias();
      }
    } else if (auto found = named.find(parameter.name); found != named.end()) {
      tensor = &answer.named_gradients(found->second).tensor();
    }
    if (tensor == nullptr) {
      return absl::InternalError("gradserve: no gradient for \"" + parameter.name + "\"");
    }
    absl::StatusOr<std::vector<double>> values =
        ToDoubles(*tensor, parameter.shape, "gradserve's gradient of \"" + parameter.name + "\"");
    if (!values.ok()) return absl::InternalError(values.status().message());
    gradients[p] = *std::move(values);
  }

  v1::StepResponse result;
  result.set_loss(answer.loss());
  double total = 0;
  for (size_t p = 0; p < parameters_.size(); ++p) {
    double sum = 0;
    for (double g : gradients[p]) sum += g * g;
    total += sum;
    v1::GradientNorm* norm = result.add_gradient_norms();
    norm->set_name(parameters_[p].name);
    norm->set_norm(std::sqrt(sum));
  }
  result.set_gradient_norm(std::sqrt(total));
  result.set_bytes_sent(stats.bytes_sent);
  result.set_bytes_received(stats.bytes_received);

  std::lock_guard lock(state_mutex_);
  for (size_t p = 0; p < parameters_.size(); ++p) {
    ApplyUpdate(rule_, step_ + 1, gradients[p], parameters_[p].value, &parameters_[p].state);
  }
  ++step_;
  losses_.push_back(answer.loss());
  result.set_step(step_);
  last_step_ = result;
  *response = std::move(result);
  return absl::OkStatus();
}

v1::RunStatus Run::Status() const {
  std::lock_guard lock(state_mutex_);
  v1::RunStatus status;
  status.set_run_id(spec_.run_id());
  status.set_step(step_);
  status.set_max_steps(spec_.max_steps());
  if (last_step_) *status.mutable_last_step() = *last_step_;
  const size_t first = losses_.size() > kRecentLosses ? losses_.size() - kRecentLosses : 0;
  for (size_t i = first; i < losses_.size(); ++i) status.add_recent_losses(losses_[i]);
  return status;
}

v1::GetParametersResponse Run::Parameters() const {
  std::lock_guard lock(state_mutex_);
  v1::GetParametersResponse response;
  response.set_step(step_);
  for (const Parameter& parameter : parameters_) {
    gv1::NamedTensor* named = response.add_parameters();
    named->set_name(parameter.name);
    ToTensor(parameter.value, parameter.shape, gv1::DTYPE_FLOAT64, named->mutable_tensor());
  }
  return response;
}

NpzArrays Run::CheckpointArrays() const {
  std::lock_guard lock(state_mutex_);
  NpzArrays arrays;
  npy::Array spec;
  spec.dtype = npy::DType::kUint8;
  spec.data = Serialized(spec_);
  spec.shape = {static_cast<int64_t>(spec.data.size())};
  arrays.emplace_back("spec", std::move(spec));
  npy::Array step;
  step.dtype = npy::DType::kInt64;
  step.data.assign(reinterpret_cast<const char*>(&step_), 8);
  arrays.emplace_back("step", std::move(step));
  arrays.emplace_back("loss", DoubleArray(losses_, {static_cast<int64_t>(losses_.size())}));
  for (const Parameter& parameter : parameters_) {
    arrays.emplace_back("param/" + parameter.name, DoubleArray(parameter.value, parameter.shape));
    const std::string state = "state/" + parameter.name + "/";
    const auto add_state = [&](const char* name, const std::vector<double>& values) {
      if (!values.empty()) arrays.emplace_back(state + name, DoubleArray(values, parameter.shape));
    };
    add_state("momentum_buffer", parameter.state.momentum_buffer);
    add_state("exp_avg", parameter.state.exp_avg);
    add_state("exp_avg_sq", parameter.state.exp_avg_sq);
  }
  return arrays;
}

}  // namespace gradserve::optimizer
