#include "gradserve/sharded_client.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>

namespace gradserve::client {
namespace {

int64_t ElementBytes(v1::DType dtype) {
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

grpc::Status Invalid(const std::string& message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
}

// Bytes of one row of `tensor` (one index of its first axis), checking that its data matches
// its shape so that slicing by rows cannot read past it.
grpc::Status RowBytes(const v1::Tensor& tensor, const std::string& field, int64_t* row_bytes) {
  const int64_t element = ElementBytes(tensor.dtype());
  if (element == 0) return Invalid(field + ": unsupported dtype");
  if (tensor.shape_size() < 1 || tensor.shape(0) < 1) {
    return Invalid(field + ": needs a leading (batch) axis of size >= 1 to be split");
  }
  int64_t elements = 1;
  for (int64_t dim : tensor.shape()) {
    if (dim < 1 || elements > std::numeric_limits<int64_t>::max() / dim) {
      return Invalid(field + ": bad shape");
    }
    elements *= dim;
  }
  if (static_cast<int64_t>(tensor.data().size()) / element != elements ||
      static_cast<int64_t>(tensor.data().size()) % element != 0) {
    return Invalid(field + ": data size does not match the shape and dtype");
  }
  *row_bytes = static_cast<int64_t>(tensor.data().size()) / tensor.shape(0);
  return grpc::Status::OK;
}

// A tensor to split along axis 0 and where each part's slice of it goes.
struct SplitField {
  const v1::Tensor* tensor;
  int64_t row_bytes;
};

v1::Tensor Slice(const SplitField& field, int64_t begin, int64_t rows) {
  v1::Tensor slice;
  slice.set_dtype(field.tensor->dtype());
  slice.add_shape(rows);
  for (int d = 1; d < field.tensor->shape_size(); ++d) slice.add_shape(field.tensor->shape(d));
  slice.set_data(field.tensor->data().data() + begin * field.row_bytes, rows * field.row_bytes);
  return slice;
}

bool IsGraph(const v1::Model& model) { return model.has_graph() || model.has_onnx(); }

// Graph cross-entropy under MEAN divides by the positions not ignored, not by the batch: the
// weight a part must get. nullopt when the weight is stats.num_examples.
std::optional<int64_t> CountedPositions(const v1::ComputeGradientsRequest& part) {
  const v1::Model& model = part.model();
  if (!IsGraph(model) || !model.loss().has_cross_entropy()) return std::nullopt;
  std::string target_name =
      model.has_graph() ? model.graph().loss_target() : model.onnx().loss_target();
  if (model.has_onnx() && target_name.empty()) target_name = "target";
  const int64_t ignore_index = model.loss().cross_entropy().has_ignore_index()
                                   ? model.loss().cross_entropy().ignore_index()
                                   : -100;
  for (const v1::NamedTensor& input : part.graph_inputs()) {
    if (input.name() != target_name) continue;
    const std::string& data = input.tensor().data();
    int64_t counted = 0;
    if (input.tensor().dtype() == v1::DTYPE_INT64) {
      for (size_t offset = 0; offset + 8 <= data.size(); offset += 8) {
        int64_t value;
        std::memcpy(&value, data.data() + offset, 8);
        counted += value != ignore_index;
      }
    } else if (input.tensor().dtype() == v1::DTYPE_INT32) {
      for (size_t offset = 0; offset + 4 <= data.size(); offset += 4) {
        int32_t value;
        std::memcpy(&value, data.data() + offset, 4);
        counted += value != ignore_index;
      }
    } else {
      return std::nullopt;  // Not a class target: the server refuses the request anyway.
    }
    return counted;
  }
  return std::nullopt;
}

// Sum over parts of weight * tensor, in float64, in part order; then one write back in the
// first part's dtype.
class TensorSum {
 public:
  explicit TensorSum(const v1::Tensor& first) : first_(first) {}

  bool Add(const v1::Tensor& tensor, double weight, std::string* error) {
    if (tensor.dtype() != first_.dtype() ||
        !std::equal(tensor.shape().begin(), tensor.shape().end(), first_.shape().begin(),
                    first_.shape().end()) ||
        tensor.data().size() != first_.data().size()) {
      *error = "dtype or shape differs from shard 0's";
      return false;
    }
    const std::string& data = tensor.data();
    if (tensor.dtype() == v1::DTYPE_FLOAT64) {
      Accumulate<double>(data, weight);
    } else if (tensor.dtype() == v1::DTYPE_FLOAT32) {
      Accumulate<float>(data, weight);
    } else {
      *error = "not a floating tensor";
      return false;
    }
    return true;
  }

  v1::Tensor Result(double divisor) const {
    v1::Tensor result;
    result.set_dtype(first_.dtype());
    *result.mutable_shape() = first_.shape();
    if (first_.dtype() == v1::DTYPE_FLOAT64) {
      Write<double>(divisor, &result);
    } else {
      Write<float>(divisor, &result);
    }
    return result;
  }

 private:
  template <typename T>
  void Accumulate(const std::string& data, double weight) {
    sum_.resize(data.size() / sizeof(T), 0.0);
    for (size_t j = 0; j < sum_.size(); ++j) {
      T value;
      std::memcpy(&value, data.data() + j * sizeof(T), sizeof(T));
      sum_[j] += weight * static_cast<double>(value);
    }
  }

  template <typename T>
  void Write(double divisor, v1::Tensor* result) const {
    std::string* data = result->mutable_data();
    data->resize(first_.data().size());
    for (size_t j = 0; j < data->size() / sizeof(T); ++j) {
      const T value = static_cast<T>(j < sum_.size() ? sum_[j] / divisor : 0.0);
      std::memcpy(data->data() + j * sizeof(T), &value, sizeof(T));
    }
  }

  const v1::Tensor& first_;
  std::vector<double> sum_;
};

}  // namespace

struct ShardedClient::Part {
  int index = 0;
  int count = 0;
  int64_t begin = 0;
  int64_t rows = 0;
  v1::ComputeGradientsRequest request;
  v1::ComputeGradientsResponse response;
  grpc::Status status;
  ShardedCallStats stats;
};

ShardedClient::ShardedClient(std::vector<std::shared_ptr<grpc::Channel>> channels,
                             ShardedClientOptions options)
    : default_shards_(static_cast<int>(channels.size())), options_(std::move(options)) {
  for (const auto& channel : channels) stubs_.push_back(v1::GradientService::NewStub(channel));
}

ShardedClient::ShardedClient(std::shared_ptr<grpc::Channel> channel, int default_shards,
                             ShardedClientOptions options)
    : default_shards_(default_shards), options_(std::move(options)) {
  stubs_.push_back(v1::GradientService::NewStub(channel));
}

ShardedClient::ShardedClient(std::vector<std::unique_ptr<v1::GradientService::StubInterface>> stubs,
                             ShardedClientOptions options)
    : stubs_(std::move(stubs)),
      default_shards_(static_cast<int>(stubs_.size())),
      options_(std::move(options)) {}

grpc::Status ShardedClient::ComputeGradients(const v1::ComputeGradientsRequest& request,
                                             v1::ComputeGradientsResponse* response) {
  return ComputeGradients(request, default_shards_, response);
}

void ShardedClient::RunPart(Part* part, std::chrono::system_clock::time_point deadline) const {
  std::chrono::duration<double, std::milli> backoff = options_.initial_backoff;
  const int attempts = std::max(1, options_.max_attempts);
  for (int attempt = 0; attempt < attempts; ++attempt) {
    // The part's first attempt and each retry on another replica than the one that failed.
    auto& stub = stubs_[(part->index + attempt) % stubs_.size()];
    grpc::ClientContext context;
    context.set_deadline(
        std::min(deadline, std::chrono::system_clock::now() + options_.attempt_timeout));
    if (!options_.client.bearer_token.empty()) {
      context.AddMetadata("authorization", "Bearer " + options_.client.bearer_token);
    }
    part->response.Clear();
    part->status = stub->ComputeGradients(&context, part->request, &part->response);
    ++part->stats.attempts;
    part->stats.bytes_sent += static_cast<int64_t>(part->request.ByteSizeLong());
    part->stats.bytes_received += static_cast<int64_t>(part->response.ByteSizeLong());
    const auto now = std::chrono::system_clock::now();
    const bool retryable =
        part->status.error_code() == grpc::StatusCode::UNAVAILABLE ||
        part->status.error_code() == grpc::StatusCode::CANCELLED ||
        (part->status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED && now < deadline);
    if (!retryable || attempt + 1 == attempts) return;
    const auto wait = std::chrono::duration_cast<std::chrono::system_clock::duration>(backoff);
    if (now + wait >= deadline) return;
    std::this_thread::sleep_for(wait);
    backoff *= options_.backoff_multiplier;
  }
}

grpc::Status ShardedClient::ComputeGradients(const v1::ComputeGradientsRequest& request, int shards,
                                             v1::ComputeGradientsResponse* response,
                                             ShardedCallStats* stats) {
  response->Clear();
  if (stats != nullptr) *stats = {};
  if (stubs_.empty()) return Invalid("ShardedClient: no channels");
  if (shards < 1) return Invalid("ShardedClient: shards must be >= 1");
  const v1::ComputeOptions& compute = request.options();
  if (compute.return_output() || compute.return_input_gradient() ||
      compute.input_gradient_names_size() > 0) {
    return Invalid(
        "ShardedClient does not combine per-row results: options.return_output, "
        "return_input_gradient and input_gradient_names must be unset");
  }

  // The tensors to split, each checked against the batch size.
  const bool graph = IsGraph(request.model());
  std::vector<SplitField> fields;
  std::vector<std::string> field_names;
  const auto add_field = [&](const v1::Tensor& tensor, const std::string& name) {
    int64_t row_bytes = 0;
    grpc::Status status = RowBytes(tensor, name, &row_bytes);
    if (status.ok()) {
      fields.push_back({&tensor, row_bytes});
      field_names.push_back(name);
    }
    return status;
  };
  if (graph) {
    for (int i = 0; i < request.graph_inputs_size(); ++i) {
      const v1::NamedTensor& input = request.graph_inputs(i);
      grpc::Status status = add_field(
          input.tensor(), "graph_inputs[" + std::to_string(i) + "] (\"" + input.name() + "\")");
      if (!status.ok()) return status;
    }
  } else {
    if (!request.has_inputs()) return Invalid("inputs: unset, nothing to split");
    for (const auto& [set, tensor, name] :
         {std::tuple{request.has_inputs(), &request.inputs(), "inputs"},
          std::tuple{request.has_targets(), &request.targets(), "targets"},
          std::tuple{request.has_output_gradient(), &request.output_gradient(),
                     "output_gradient"}}) {
      if (!set) continue;
      grpc::Status status = add_field(*tensor, name);
      if (!status.ok()) return status;
    }
  }
  if (fields.empty()) return Invalid("graph_inputs: empty, nothing to split");
  const int64_t batch = fields[0].tensor->shape(0);
  for (size_t f = 1; f < fields.size(); ++f) {
    if (fields[f].tensor->shape(0) != batch) {
      return Invalid(field_names[f] + ": leading size " +
                     std::to_string(fields[f].tensor->shape(0)) + " differs from " +
                     field_names[0] + "'s " + std::to_string(batch) +
                     " (every split tensor's first axis is the batch)");
    }
  }

  // The parts: contiguous, the first batch % count one row larger.
  const int count = static_cast<int>(std::min<int64_t>(shards, batch));
  v1::ComputeGradientsRequest base = request;
  base.clear_inputs();
  base.clear_targets();
  base.clear_output_gradient();
  base.clear_graph_inputs();
  std::vector<Part> parts(count);
  int64_t begin = 0;
  for (int i = 0; i < count; ++i) {
    Part& part = parts[i];
    part.index = i;
    part.count = count;
    part.begin = begin;
    part.rows = batch / count + (i < batch % count ? 1 : 0);
    begin += part.rows;
    part.request = base;
    if (graph) {
      for (int f = 0; f < request.graph_inputs_size(); ++f) {
        v1::NamedTensor* input = part.request.add_graph_inputs();
        input->set_name(request.graph_inputs(f).name());
        *input->mutable_tensor() = Slice(fields[f], part.begin, part.rows);
      }
    } else {
      size_t f = 0;
      *part.request.mutable_inputs() = Slice(fields[f++], part.begin, part.rows);
      if (request.has_targets()) {
        *part.request.mutable_targets() = Slice(fields[f++], part.begin, part.rows);
      }
      if (request.has_output_gradient()) {
        *part.request.mutable_output_gradient() = Slice(fields[f++], part.begin, part.rows);
      }
    }
  }

  const auto deadline = std::chrono::system_clock::now() + options_.client.timeout;
  {
    std::vector<std::thread> threads;
    threads.reserve(count - 1);
    for (int i = 1; i < count; ++i) {
      threads.emplace_back([this, &parts, i, deadline] { RunPart(&parts[i], deadline); });
    }
    RunPart(&parts[0], deadline);
    for (std::thread& thread : threads) thread.join();
  }
  if (stats != nullptr) {
    for (const Part& part : parts) {
      stats->bytes_sent += part.stats.bytes_sent;
      stats->bytes_received += part.stats.bytes_received;
      stats->attempts += part.stats.attempts;
    }
  }
  const auto part_name = [](const Part& part) {
    return "shard " + std::to_string(part.index) + " of " + std::to_string(part.count) + " (rows " +
           std::to_string(part.begin) + ".." + std::to_string(part.begin + part.rows - 1) + ")";
  };
  for (const Part& part : parts) {
    if (!part.status.ok()) {
      return grpc::Status(part.status.error_code(),
                          part_name(part) + ": " + part.status.error_message(),
                          part.status.error_details());
    }
  }

  // One part is the plain call: its answer as is, bit for bit (weighing by n and dividing by n
  // again could change the last bit).
  if (count == 1) {
    *response = std::move(parts[0].response);
    return grpc::Status::OK;
  }

  // Weights: n_i for MEAN, 1 for SUM and for an external loss (its gradient is used as given).
  const v1::Loss& loss = request.model().loss();
  const bool mean = !loss.has_external() && loss.reduction() != v1::REDUCTION_SUM;
  std::vector<double> weights(count, 1.0);
  double total_weight = mean ? 0.0 : 1.0;
  int64_t num_examples = 0;
  for (int i = 0; i < count; ++i) {
    num_examples += parts[i].response.stats().num_examples();
    if (!mean) continue;
    const std::optional<int64_t> counted = CountedPositions(parts[i].request);
    weights[i] = static_cast<double>(counted ? *counted : parts[i].response.stats().num_examples());
    total_weight += weights[i];
  }
  // A part whose every position is ignored has a NaN loss and zero gradients: left out, it
  // adds nothing, as in one call over the whole batch.
  const auto counts = [&](int i) { return !mean || weights[i] > 0; };

  const v1::ComputeGradientsResponse& first = parts[0].response;
  std::string error;
  const auto disagree = [&](const std::string& what, int i) {
    return grpc::Status(grpc::StatusCode::INTERNAL,
                        "ShardedClient: " + what + " of " + part_name(parts[i]) + ": " + error);
  };
  const auto combine = [&](const auto& tensor_of, const std::string& what,
                           v1::Tensor* out) -> grpc::Status {
    TensorSum sum(tensor_of(0));
    for (int i = 0; i < count; ++i) {
      if (counts(i) && !sum.Add(tensor_of(i), weights[i], &error)) return disagree(what, i);
    }
    *out = sum.Result(total_weight);
    return grpc::Status::OK;
  };

  double loss_sum = 0.0;
  for (int i = 0; i < count; ++i) {
    if (counts(i)) loss_sum += weights[i] * parts[i].response.loss();
  }
  response->set_loss(total_weight > 0 ? loss_sum / total_weight
                                      : std::numeric_limits<double>::quiet_NaN());

  for (int l = 0; l < first.gradients_size(); ++l) {
    for (int i = 1; i < count; ++i) {
      if (parts[i].response.gradients_size() != first.gradients_size()) {
        error = "a different number of layer gradients";
        return disagree("gradients", i);
      }
    }
    const std::string what = "gradients[" + std::to_string(l) + "]";
    v1::LinearGradients* out = response->add_gradients();
    grpc::Status status =
        combine([&](int i) -> const v1::Tensor& { return parts[i].response.gradients(l).weight(); },
                what + ".weight", out->mutable_weight());
    if (!status.ok()) return status;
    if (first.gradients(l).has_bias()) {
      status =
          combine([&](int i) -> const v1::Tensor& { return parts[i].response.gradients(l).bias(); },
                  what + ".bias", out->mutable_bias());
      if (!status.ok()) return status;
    }
  }

  // Named gradients by name, in shard 0's order (the model's parameter order).
  std::vector<std::unordered_map<std::string, int>> by_name(count);
  for (int i = 0; i < count; ++i) {
    const auto& named = parts[i].response.named_gradients();
    if (named.size() != first.named_gradients_size()) {
      error = "a different number of named gradients";
      return disagree("named_gradients", i);
    }
    for (int g = 0; g < named.size(); ++g) by_name[i][named[g].name()] = g;
  }
  for (const v1::NamedTensor& named : first.named_gradients()) {
    const std::string& name = named.name();
    for (int i = 0; i < count; ++i) {
      if (by_name[i].count(name) == 0) {
        error = "no gradient for \"" + name + "\"";
        return disagree("named_gradients", i);
      }
    }
    v1::NamedTensor* out = response->add_named_gradients();
    out->set_name(name);
    grpc::Status status = combine(
        [&](int i) -> const v1::Tensor& {
          return parts[i].response.named_gradients(by_name[i][name]).tensor();
        },
        "named_gradients[\"" + name + "\"]", out->mutable_tensor());
    if (!status.ok()) return status;
  }
  response->mutable_stats()->set_num_examples(num_examples);
  return grpc::Status::OK;
}

}  // namespace gradserve::client
