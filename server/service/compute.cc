#include "server/service/compute.h"

#include <chrono>
#include <functional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/engine/backprop.h"
#include "server/engine/gemm.h"
#include "server/engine/gradient_check.h"
#include "server/engine/status_macros.h"
#include "server/service/convert.h"
#include "server/service/convert_graph.h"
#include "server/service/onnx_import.h"

namespace gradserve::service {
namespace {

using engine::CheckpointMode;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration duration) { return std::chrono::duration<double>(duration).count(); }

// Sizes `tensor` for shape and returns its bytes as T*, for the engine to write into.
template <typename T>
T* AllocateTensor(v1::Tensor* tensor, v1::DType dtype, std::initializer_list<int64_t> shape) {
  tensor->set_dtype(dtype);
  int64_t elements = 1;
  for (int64_t dim : shape) {
    tensor->add_shape(dim);
    elements *= dim;
  }
  std::string* data = tensor->mutable_data();
  data->resize(elements * sizeof(T));
  return reinterpret_cast<T*>(data->data());
}

// The engine's checks as the answer's, chain and graph alike.
void WriteChecks(const std::vector<engine::TensorCheck>& checks, v1::DType dtype,
                 v1::CheckGradientsResponse* response) {
  for (const engine::TensorCheck& check : checks) {
    v1::TensorCheck* out = response->add_checks();
    out->set_tensor(check.tensor);
    out->set_layer_index(check.layer_index);
    out->set_samples(check.samples);
    out->set_max_abs_error(check.max_abs_error);
    out->set_max_rel_error(check.max_rel_error);
    response->set_max_abs_error(std::max(response->max_abs_error(), check.max_abs_error));
    response->set_max_rel_error(std::max(response->max_rel_error(), check.max_rel_error));
  }
  response->set_analytic_dtype(dtype);
}

// Upper bound of the response's size, so that a response the caller could not receive is
// refused before any compute.
int64_t ResponseBytes(const PreparedRequest& prepared) {
  const engine::Model& model = *prepared.model;
  const int64_t element = DTypeSize(prepared.dtype);
  int64_t bytes = 4096 + 128 * model.num_layers() + element * model.num_parameters();
  for (int i = 0; i < model.num_layers(); ++i) bytes += model.layer(i).name.size();  // Echoed.
  if (prepared.return_input_gradient) bytes += element * prepared.batch() * model.input_features();
  if (prepared.return_output) bytes += element * prepared.batch() * model.output_features();
  return bytes;
}

template <typename T>
absl::Status Run(const PreparedRequest& prepared, const ComputeContext& context,
                 v1::ComputeGradientsResponse* response) {
  // Encode is everything here but the engine: the output tensors it writes into, then the rest.
  const Clock::time_point encode_start = Clock::now();
  const engine::Model& model = *prepared.model;
  const TypedViews<T>& views = std::get<TypedViews<T>>(prepared.views);
  const int64_t batch = views.batch.batch;
  engine::OutputsView<T> outputs;
  for (int l = 0; l < model.num_linear(); ++l) {
    const engine::LayerSpec& layer = model.layer(model.linear_layer(l));
    v1::LinearGradients* grads = response->add_gradients();
    engine::LinearGradsView<T> view;
    view.weight = AllocateTensor<T>(grads->mutable_weight(), prepared.dtype,
                                    {layer.out_features, layer.in_features});
    if (layer.bias) {
      view.bias = AllocateTensor<T>(grads->mutable_bias(), prepared.dtype, {layer.out_features});
    }
    outputs.gradients.push_back(view);
  }
  if (prepared.return_input_gradient) {
    outputs.input_gradient = AllocateTensor<T>(response->mutable_input_gradient(), prepared.dtype,
                                               {batch, model.input_features()});
  }
  if (prepared.return_output) {
    outputs.output = AllocateTensor<T>(response->mutable_output(), prepared.dtype,
                                       {batch, model.output_features()});
  }
  engine::RunOptions options;
  options.threads = context.threads;
  options.should_stop = context.should_stop;
  const Clock::time_point compute_start = Clock::now();
  absl::StatusOr<engine::RunResult> run =
      engine::RunBackprop<T>(model, prepared.plan, views.params, views.batch, outputs, options);
  const Clock::time_point compute_end = Clock::now();
  if (context.phase_times != nullptr) {
    context.phase_times->compute = Seconds(compute_end - compute_start);
  }
  if (!run.ok()) return run.status();
  const engine::RunResult& result = *run;

  response->set_loss(result.loss);
  for (int i = 0; i < model.num_layers(); ++i) {
    const engine::LayerDiagnostics& d = result.diagnostics[i];
    v1::LayerDiagnostics* out = response->add_diagnostics();
    out->set_layer_index(i);
    out->set_kind(std::string(engine::LayerKindName(model.layer(i).kind)));
    out->set_name(model.layer(i).name);
    // Absent, not 0, where the engine computed no such gradient (Note [Diagnostics rule] in
    // the .proto): a 0 would read as a vanished gradient.
    if (d.weight_grad_norm) out->set_weight_grad_norm(*d.weight_grad_norm);
    if (d.bias_grad_norm) out->set_bias_grad_norm(*d.bias_grad_norm);
    if (d.output_grad_norm) out->set_output_grad_norm(*d.output_grad_norm);
    out->set_activation_norm(d.activation_norm);
    out->set_non_finite_count(d.non_finite_count);
  }
  v1::ComputeStats* stats = response->mutable_stats();
  stats->set_forward_micros(result.forward_micros);
  stats->set_backward_micros(result.backward_micros);
  stats->set_peak_activation_bytes(result.peak_activation_bytes);
  stats->set_layers_recomputed(result.layers_recomputed);
  stats->set_num_examples(batch);
  stats->set_threads(context.threads);
  v1::CheckpointPlan* plan = stats->mutable_plan();
  plan->set_mode(ToProtoMode(prepared.plan.mode));
  for (int s = 0; s < prepared.plan.num_segments(); ++s) {
    plan->add_segment_starts(prepared.plan.segment_starts[s]);
    plan->add_segment_recomputed(prepared.plan.segment_recomputed[s]);
  }
  plan->set_predicted_peak_bytes(prepared.plan.predicted_peak_bytes);
  plan->set_budget_met(prepared.plan.budget_met);
  plan->set_min_peak_bytes(prepared.plan.min_peak_bytes);
  if (context.phase_times != nullptr) {
    context.phase_times->encode =
        Seconds(compute_start - encode_start) + Seconds(Clock::now() - compute_end);
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status RunCheck(const PreparedRequest& prepared, const engine::GradientCheckOptions& options,
                      PhaseTimes* phase_times, v1::CheckGradientsResponse* response) {
  const TypedViews<T>& views = std::get<TypedViews<T>>(prepared.views);
  const Clock::time_point compute_start = Clock::now();
  absl::StatusOr<std::vector<engine::TensorCheck>> run =
      engine::CheckGradients<T>(*prepared.model, prepared.plan, views.params, views.batch, options);
  const Clock::time_point compute_end = Clock::now();
  if (phase_times != nullptr) phase_times->compute = Seconds(compute_end - compute_start);
  if (!run.ok()) return run.status();
  const std::vector<engine::TensorCheck>& checks = *run;
  WriteChecks(checks, prepared.dtype, response);
  if (phase_times != nullptr) phase_times->encode = Seconds(Clock::now() - compute_end);
  return absl::OkStatus();
}

// Adds `prefix` to the field an error message starts with.
absl::Status Prefixed(const absl::Status& status, absl::string_view prefix) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

// CheckGradients' own fields (chain and graph alike), validated into `options`.
absl::Status ReadCheckOptions(const v1::CheckGradientsRequest& request, const ServiceLimits& limits,
                              engine::GradientCheckOptions* options) {
  options->seed = request.seed();
  options->dropout_seed = request.request().options().dropout_seed();
  if (request.samples_per_tensor() < 0 || request.samples_per_tensor() > limits.max_check_samples) {
    return absl::InvalidArgumentError(absl::StrCat("samples_per_tensor: expected 0 .. ",
                                                   limits.max_check_samples, ", got ",
                                                   request.samples_per_tensor()));
  }
  if (request.samples_per_tensor() > 0) options->samples_per_tensor = request.samples_per_tensor();
  if (request.step() != 0) {
    if (!(request.step() > 0 && request.step() < 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("step: expected a value in (0, 1), got ", request.step()));
    }
    options->step = request.step();
  }
  return absl::OkStatus();
}

// Validates a CheckGradients request and fills `options` from it.
absl::StatusOr<std::unique_ptr<PreparedRequest>> PrepareCheck(
    const v1::CheckGradientsRequest& request, const ServiceLimits& limits,
    engine::GradientCheckOptions* options) {
  RETURN_IF_ERROR(ReadCheckOptions(request, limits, options));
  if (!request.has_request()) return absl::InvalidArgumentError("request: required");
  auto prepared = PrepareRequest(request.request(), limits, /*needs_input_gradient=*/true,
                                 options->should_stop);
  if (!prepared.ok()) return Prefixed(prepared.status(), "request.");
  return prepared;
}

template <typename T>
absl::Status RunGraphTimed(const GraphViews& views, const ComputeContext& context,
                           v1::ComputeGradientsResponse* response) {
  const Clock::time_point start = Clock::now();
  engine::graph::GraphRunOptions options;
  options.threads = context.threads;
  options.should_stop = context.should_stop;
  options.dropout_seed = views.dropout_seed;
  double compute = 0;
  const absl::Status status = RunGraphRequest<T>(views, options, response, &compute);
  if (context.phase_times != nullptr) {
    context.phase_times->compute = compute;
    if (status.ok()) context.phase_times->encode = Seconds(Clock::now() - start) - compute;
  }
  return status;
}

// The graph form of CheckGradients' request: `planner` (with a cache) plans it in the
// request's dtype and, for the numerical gradients, in float64.
template <typename T>
absl::Status RunGraphCheck(const GraphViews& views, GraphPlanner* planner,
                           const engine::GradientCheckOptions& options, PhaseTimes* phase_times,
                           v1::CheckGradientsResponse* response) {
  const engine::graph::Graph& graph = *views.graph;
  std::vector<engine::graph::Shape> shapes;
  for (size_t i = 0; i < graph.spec().inputs.size(); ++i) {
    shapes.push_back(graph.values()[graph.input_value(i)].type.shape);
  }
  ASSIGN_OR_RETURN(std::shared_ptr<const engine::graph::Graph> graph64,
                   planner->Plan(engine::graph::DType::kFloat64, shapes));
  engine::graph::GraphInputs<T> inputs;
  inputs.inputs = views.inputs;
  for (const void* p : views.parameters) inputs.parameters.push_back(static_cast<const T*>(p));
  const Clock::time_point compute_start = Clock::now();
  absl::StatusOr<std::vector<engine::TensorCheck>> run =
      engine::CheckGraphGradients<T>(graph, *graph64, inputs, views.input_gradients, options);
  const Clock::time_point compute_end = Clock::now();
  if (phase_times != nullptr) phase_times->compute = Seconds(compute_end - compute_start);
  if (!run.ok()) return run.status();
  WriteChecks(*run, views.dtype, response);
  if (phase_times != nullptr) phase_times->encode = Seconds(Clock::now() - compute_end);
  return absl::OkStatus();
}

// CheckGradients' passes per analytic pass, in analytic passes: one analytic pass, then two
// forward passes (a third of a full pass each) per sample of each tensor checked.
double CheckFlopsFactor(int samples, int tensors) { return 1 + 2.0 * samples * tensors / 3; }

// The tensors CheckGradients samples: each parameter tensor and dx (chain); each parameter and
// each input named in input_gradient_names (graph).
int CheckedTensors(const v1::ComputeGradientsRequest& request) {
  return IsGraphRequest(request)
             ? request.named_parameters_size() + request.options().input_gradient_names_size()
             : 2 * request.parameters_size() + 1;
}

absl::Status CheckGraph(const v1::CheckGradientsRequest& request, const ServiceLimits& limits,
                        const ComputeContext& context, engine::GradientCheckOptions options,
                        Clock::time_point decode_start, v1::CheckGradientsResponse* response) {
  auto decoded = [&] {
    if (context.phase_times != nullptr) {
      context.phase_times->decode = Seconds(Clock::now() - decode_start);
    }
  };
  if (absl::Status read = ReadCheckOptions(request, limits, &options); !read.ok()) {
    decoded();
    return read;
  }
  const v1::ComputeGradientsRequest& inner = request.request();
  absl::Status form = CheckModelForm(inner);
  absl::StatusOr<std::unique_ptr<GraphPlanner>> planner =
      form.ok() ? GraphPlanner::Create(inner.model(), inner.options(), limits, /*cache=*/true)
                : form;
  int64_t activation_bytes = 0;
  absl::StatusOr<std::unique_ptr<GraphViews>> views =
      planner.ok()
          ? PrepareGraphRequest(inner, limits, planner->get(),
                                CheckFlopsFactor(options.samples_per_tensor, CheckedTensors(inner)),
                                &activation_bytes)
          : planner.status();
  decoded();
  if (!views.ok()) return Prefixed(views.status(), "request.");
  // The float64 plan of a float32 call holds as much again, and its copies of the data.
  if ((*views)->dtype == v1::DTYPE_FLOAT32) activation_bytes *= 3;
  if (context.reserve_memory) RETURN_IF_ERROR(context.reserve_memory(activation_bytes));
  if ((*views)->dtype == v1::DTYPE_FLOAT32) {
    return RunGraphCheck<float>(**views, planner->get(), options, context.phase_times, response);
  }
  return RunGraphCheck<double>(**views, planner->get(), options, context.phase_times, response);
}

}  // namespace

absl::Status ComputeGraphGradients(const v1::ComputeGradientsRequest& request,
                                   const ServiceLimits& limits, const ComputeContext& context,
                                   GraphPlanner* planner, v1::ComputeGradientsResponse* response) {
  const Clock::time_point decode_start = Clock::now();
  int64_t activation_bytes = 0;
  absl::StatusOr<std::unique_ptr<GraphViews>> views =
      PrepareGraphRequest(request, limits, planner, 1, &activation_bytes);
  if (context.phase_times != nullptr) {
    context.phase_times->decode = Seconds(Clock::now() - decode_start);
  }
  if (!views.ok()) return views.status();
  const double bytes = GraphResponseBytes(request) + (*views)->output_bytes;
  if (bytes > limits.max_message_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("the response would need about ", bytes,
                                                     " bytes, over max_message_bytes (",
                                                     limits.max_message_bytes, ")"));
  }
  if (context.reserve_memory) RETURN_IF_ERROR(context.reserve_memory(activation_bytes));
  if ((*views)->dtype == v1::DTYPE_FLOAT32) return RunGraphTimed<float>(**views, context, response);
  return RunGraphTimed<double>(**views, context, response);
}

absl::Status ComputeGradients(const v1::ComputeGradientsRequest& request,
                              const ServiceLimits& limits, const ComputeContext& context,
                              v1::ComputeGradientsResponse* response) {
  if (request.model().has_onnx()) {
    v1::ComputeGradientsRequest copy = request;
    return ComputeGradients(&copy, limits, context, response);
  }
  if (IsGraphRequest(request)) {
    const Clock::time_point decode_start = Clock::now();
    RETURN_IF_ERROR(CheckModelForm(request));
    absl::StatusOr<std::unique_ptr<GraphPlanner>> planner =
        GraphPlanner::Create(request.model(), request.options(), limits, /*cache=*/false);
    if (!planner.ok()) {
      if (context.phase_times != nullptr) {
        context.phase_times->decode = Seconds(Clock::now() - decode_start);
      }
      return planner.status();
    }
    return ComputeGraphGradients(request, limits, context, planner->get(), response);
  }
  const Clock::time_point decode_start = Clock::now();
  absl::StatusOr<std::unique_ptr<PreparedRequest>> prepared_or =
      PrepareRequest(request, limits, /*needs_input_gradient=*/false, context.should_stop);
  const int64_t bytes = prepared_or.ok() ? ResponseBytes(**prepared_or) : 0;
  if (context.phase_times != nullptr) {
    context.phase_times->decode = Seconds(Clock::now() - decode_start);
  }
  if (!prepared_or.ok()) return prepared_or.status();
  const std::unique_ptr<PreparedRequest>& prepared = *prepared_or;
  if (bytes > limits.max_message_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("the response would need about ", bytes,
                                                     " bytes, over max_message_bytes (",
                                                     limits.max_message_bytes, ")"));
  }
  if (context.reserve_memory) {
    RETURN_IF_ERROR(context.reserve_memory(prepared->activation_bytes));
  }
  if (prepared->dtype == v1::DTYPE_FLOAT32) return Run<float>(*prepared, context, response);
  return Run<double>(*prepared, context, response);
}

namespace {

// Note [ONNX import]: converts the model in place, counting what the conversion holds and its
// time as decoding, then runs `compute` on the graph form; errors name the file's nodes.
absl::Status WithOnnxLowered(v1::ComputeGradientsRequest* request, const ServiceLimits& limits,
                             const ComputeContext& context,
                             const std::function<absl::Status()>& compute) {
  if (!request->model().has_onnx()) return compute();
  const Clock::time_point start = Clock::now();
  if (context.reserve_memory) {
    // The parsed file and its graph form, each about as large as the file.
    RETURN_IF_ERROR(
        context.reserve_memory(3 * static_cast<int64_t>(request->model().onnx().model().size())));
  }
  absl::Status lowered = LowerOnnxRequest(request, limits);
  const double seconds = Seconds(Clock::now() - start);
  if (!lowered.ok()) {
    if (context.phase_times != nullptr) context.phase_times->decode = seconds;
    return lowered;
  }
  const absl::Status status = compute();
  if (context.phase_times != nullptr) context.phase_times->decode += seconds;
  return RenameOnnxFields(status);
}

}  // namespace

absl::Status ComputeGradients(v1::ComputeGradientsRequest* request, const ServiceLimits& limits,
                              const ComputeContext& context,
                              v1::ComputeGradientsResponse* response) {
  return WithOnnxLowered(request, limits, context, [&] {
    return ComputeGradients(std::as_const(*request), limits, context, response);
  });
}

absl::Status CheckGradients(v1::CheckGradientsRequest* request, const ServiceLimits& limits,
                            const ComputeContext& context, v1::CheckGradientsResponse* response) {
  return WithOnnxLowered(request->mutable_request(), limits, context, [&] {
    return CheckGradients(std::as_const(*request), limits, context, response);
  });
}

absl::Status CheckGradients(const v1::CheckGradientsRequest& request, const ServiceLimits& limits,
                            const ComputeContext& context, v1::CheckGradientsResponse* response) {
  if (request.request().model().has_onnx()) {
    v1::CheckGradientsRequest copy = request;
    return CheckGradients(&copy, limits, context, response);
  }
  engine::GradientCheckOptions options;
  options.threads = context.threads;
  options.should_stop = context.should_stop;
  const Clock::time_point decode_start = Clock::now();
  if (IsGraphRequest(request.request())) {
    return CheckGraph(request, limits, context, options, decode_start, response);
  }
  absl::StatusOr<std::unique_ptr<PreparedRequest>> prepared =
      PrepareCheck(request, limits, &options);
  if (context.phase_times != nullptr) {
    context.phase_times->decode = Seconds(Clock::now() - decode_start);
  }
  if (!prepared.ok()) return prepared.status();
  if (context.reserve_memory) {
    RETURN_IF_ERROR(context.reserve_memory((*prepared)->activation_bytes));
  }
  if ((*prepared)->dtype == v1::DTYPE_FLOAT32) {
    return RunCheck<float>(**prepared, options, context.phase_times, response);
  }
  return RunCheck<double>(**prepared, options, context.phase_times, response);
}

double EstimatedFlops(const v1::Model& model, std::span<const v1::Tensor* const> batch) {
  auto size = [](int64_t d) { return std::max<double>(0, static_cast<double>(d)); };
  if (!model.has_graph()) {
    const double rows = !batch.empty() && batch[0]->shape_size() > 0 ? size(batch[0]->shape(0)) : 0;
    double multiply_adds = 0;
    for (const v1::Layer& layer : model.layers()) {
      if (!layer.has_linear()) continue;
      multiply_adds += size(layer.linear().in_features()) * size(layer.linear().out_features());
    }
    return 6 * rows * multiply_adds;
  }
  // An ONNX file is mostly its weights (float32, for a default export); before it is parsed,
  // its size is the estimate.
  double parameter_elements = static_cast<double>(model.onnx().model().size()) / 4;
  for (const v1::GraphParameter& p : model.graph().parameters()) {
    double n = 1;
    for (int64_t d : p.shape()) n *= size(d);
    parameter_elements += n;
  }
  double rows = 0;
  for (const v1::Tensor* t : batch) {
    double n = 1;
    for (int64_t d : t->shape()) n *= size(d);
    const bool floating = t->dtype() == v1::DTYPE_FLOAT32 || t->dtype() == v1::DTYPE_FLOAT64;
    if (floating && t->shape_size() > 0) n /= std::max(1.0, size(t->shape(t->shape_size() - 1)));
    rows = std::max(rows, n);
  }
  return 6 * rows * parameter_elements;
}

double ComputeGradientsCost(const v1::ComputeGradientsRequest& request) {
  std::vector<const v1::Tensor*> batch;
  if (IsGraphRequest(request)) {
    for (const v1::NamedTensor& in : request.graph_inputs()) batch.push_back(&in.tensor());
  } else {
    batch.push_back(&request.inputs());
  }
  return EstimatedFlops(request.model(), batch);
}

double CheckGradientsCost(const v1::CheckGradientsRequest& request) {
  const int samples = request.samples_per_tensor() > 0 ? request.samples_per_tensor() : 16;
  return ComputeGradientsCost(request.request()) *
         CheckFlopsFactor(samples, CheckedTensors(request.request()));
}

absl::Status CheckClaimedSizes(const v1::CheckGradientsRequest& request,
                               const ServiceLimits& limits) {
  return Prefixed(CheckClaimedSizes(request.request(), limits), "request.");
}

int64_t ResponseBytesBound(const v1::ComputeGradientsRequest& request,
                           const ServiceLimits& limits) {
  if (IsGraphRequest(request)) {
    // An ONNX file's parameters, not yet known, are at most its size, twice over in float64.
    return static_cast<int64_t>(
        std::min<double>(GraphResponseBytes(request) + 2.0 * request.model().onnx().model().size(),
                         limits.max_message_bytes));
  }
  // The gradients are as large as the parameters; the output and dx as large as the batch
  // times the widths claimed (not yet validated: the bound is clamped below).
  double bytes = 65536 + 256.0 * request.model().layers_size();
  for (const v1::LinearParameters& p : request.parameters()) {
    bytes += static_cast<double>(p.weight().data().size()) + p.bias().data().size();
  }
  const double element = 8;
  const double batch =
      request.inputs().shape_size() > 0 ? std::max<double>(0, request.inputs().shape(0)) : 0;
  if (request.options().return_input_gradient()) bytes += request.inputs().data().size();
  if (request.options().return_output()) {
    double out = 0;
    for (const v1::Layer& layer : request.model().layers()) {
      if (layer.has_linear()) out = std::max<double>(0, layer.linear().out_features());
    }
    if (out == 0 && request.inputs().shape_size() > 1) {
      out = std::max<double>(0, request.inputs().shape(1));
    }
    bytes += element * batch * out;
  }
  return static_cast<int64_t>(std::min<double>(bytes, limits.max_message_bytes));
}

int64_t ResponseBytesBound(const v1::CheckGradientsRequest& request, const ServiceLimits& limits) {
  // One TensorCheck per parameter tensor and dx (graphs: per parameter and input named).
  int64_t bytes = 65536 + 128 * (2 * int64_t{request.request().parameters_size()} + 1);
  for (const v1::NamedTensor& p : request.request().named_parameters()) {
    bytes += 128 + static_cast<int64_t>(p.name().size());
  }
  for (const std::string& name : request.request().options().input_gradient_names()) {
    bytes += 128 + static_cast<int64_t>(name.size());
  }
  return std::min<int64_t>(bytes, limits.max_message_bytes);
}

void GetServerInfo(const ServiceLimits& limits, int threads, v1::GetServerInfoResponse* response) {
  response->set_version(GRADSERVE_VERSION);
  response->set_api("gradserve.v1");
  // Named as the API names them: the fields of the Layer.kind and Loss.kind oneofs.
  for (const auto* descriptor : {v1::Layer::descriptor(), v1::Loss::descriptor()}) {
    const google::protobuf::OneofDescriptor* kind = descriptor->FindOneofByName("kind");
    for (int f = 0; f < kind->field_count(); ++f) {
      (descriptor == v1::Layer::descriptor() ? response->add_layers() : response->add_losses())
          ->assign(kind->field(f)->name());
    }
  }
  response->add_dtypes(v1::DTYPE_FLOAT32);
  response->add_dtypes(v1::DTYPE_FLOAT64);
  v1::Limits* out = response->mutable_limits();
  out->set_max_message_bytes(limits.max_message_bytes);
  out->set_max_tensor_elements(limits.max_tensor_elements);
  out->set_max_layers(limits.max_layers);
  out->set_max_batch(limits.max_batch);
  out->set_max_features(limits.max_features);
  out->set_max_activation_bytes(limits.max_activation_bytes);
  out->set_max_stream_bytes(limits.max_stream_bytes);
  out->set_max_streams(limits.max_streams);
  out->set_max_streams_per_client(limits.max_streams_per_client);
  out->set_stream_idle_seconds(limits.stream_idle_seconds);
  out->set_max_call_flops(limits.max_call_flops);
  out->set_max_call_seconds(limits.max_call_seconds);
  out->set_max_memory_bytes(limits.max_memory_bytes);
  out->set_max_graph_nodes(limits.max_graph_nodes);
  out->set_max_graph_values(limits.max_graph_values);
  out->set_max_graph_rank(limits.max_graph_rank);
  for (absl::string_view op : engine::graph::SupportedOps())
    response->add_graph_ops(std::string(op));
  response->set_threads(threads);
  response->set_gemm_kernel(engine::GemmKernel());
  for (auto mode : {v1::Checkpointing::MODE_NONE, v1::Checkpointing::MODE_EVERY_K,
                    v1::Checkpointing::MODE_SQRT, v1::Checkpointing::MODE_MEMORY_BUDGET}) {
    response->add_checkpoint_modes(mode);
  }
  response->set_onnx_min_opset(kMinOnnxOpset);
  response->set_onnx_max_opset(kMaxOnnxOpset);
}

}  // namespace gradserve::service
