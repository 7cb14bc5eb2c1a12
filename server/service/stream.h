// StreamGradients' protocol as a state machine over protobuf messages, with no gRPC in sight:
// the gRPC reactor feeds it one message at a time, and tests and fuzzers can drive it directly.
// The protocol itself is documented with StreamGradientsRequest in gradserve.proto.
//
// A stream holds what a caller would otherwise resend every step: the model and options (from
// the setup message), the current parameters, the tensors staged by chunks, and the gradients
// accumulated over micro-batches; for a graph model, also the model validated and its plans
// (Note [Graph streams] in stream.cc). Each step is assembled into a ComputeGradientsRequest
// the session owns and computed by the same code as a unary call (ComputeGradients, or
// ComputeGraphGradients with the kept planner), so a step answers bit-identically to the unary
// call with the same parameters and batch. Parameter updates and micro-batch sums are engine
// operations (server/engine/accumulate.h); the session only moves tensors.
#ifndef GRADSERVE_SERVICE_STREAM_H_
#define GRADSERVE_SERVICE_STREAM_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gradserve/v1/gradserve.pb.h"
#include "server/engine/accumulate.h"
#include "server/service/compute.h"
#include "server/service/convert_graph.h"
#include "server/service/limits.h"

namespace gradserve::service {

class StreamSession {
 public:
  explicit StreamSession(const ServiceLimits& limits) : limits_(limits) {}

  // Handles the stream's next message, which it may move from. Returns true if it filled
  // `response` (to be sent before the next message is handled), false if the message is not
  // answered (setup, chunks, accumulating steps). Any error ends the stream: its message names
  // the message ("message 3 (step): inputs.shape: ...") and the session must not be used again.
  // Not thread-safe; the reactor hands it one message at a time.
  absl::StatusOr<bool> Handle(v1::StreamGradientsRequest* message, const ComputeContext& context,
                              v1::StreamGradientsResponse* response);

  // Floating-point operations Handle(message) will take (Note [Scheduling]); 0 for messages
  // that compute nothing (setup, chunks), which the reactor handles on its own thread.
  double Cost(const v1::StreamGradientsRequest& message) const;

  // Bytes the stream holds between messages (counted against limits.max_stream_bytes).
  int64_t held_bytes() const;
  // Messages handled so far, and steps among them.
  int64_t messages() const { return messages_; }
  int64_t steps() const { return steps_; }
  // Graph models: plans built so far (one per tuple of graph input shapes and dtype).
  int64_t plans_built() const { return planner_ ? planner_->plans_built() : 0; }

 private:
  // A tensor arriving in chunks.
  struct Staged {
    v1::Tensor tensor;  // dtype, shape and the bytes so far.
    int64_t expected_bytes = 0;
  };
  // Gradients of the micro-batches since the last answer, summed in float64.
  struct Accumulation {
    int micro_batches = 0;
    int64_t examples = 0;
    double weight = 0;  // Sum of the micro-batches' weights (the MEAN's divisor).
    double weighted_loss = 0;
    // Chain: per Linear layer its weight, then its bias (empty without one). Graph: per
    // parameter, in model.graph.parameters order.
    engine::GradientSums sums;
    // Per-example tensors, concatenated along their first axis in the answer: chain
    // input_gradient then output; graph input_gradients then outputs, in the order of the first
    // micro-batch's answer. [tensor][micro-batch] bytes.
    std::vector<std::vector<std::string>> rows;
    std::vector<double> weights_of_batches;  // The weight each micro-batch's sums got.
    // Per layer (chain) or per value diagnostic (graph): weighted squared gradient norms,
    // squared value norms, non-finite counts.
    std::vector<double> output_grad_sq, activation_sq;
    std::vector<int64_t> non_finite;
    std::vector<int64_t> parameter_non_finite;  // Graph: per parameter, summed.
    v1::ComputeGradientsResponse last;          // Diagnostics labels, stats and plan of the last.
    int64_t bytes = 0;                          // Everything above: held by the stream.
    int64_t row_bytes = 0;                      // `rows`: what the answer will carry.
  };

  absl::Status Setup(v1::StreamSetup* setup);
  absl::Status SetupGraph(v1::StreamSetup* setup);
  absl::Status Chunk(v1::TensorChunk* chunk);
  absl::StatusOr<bool> Step(v1::StreamStep* step, const ComputeContext& context,
                            v1::StreamGradientsResponse* response);
  // Moves the staged tensors into `step`, which must leave their fields unset.
  absl::Status Unstage(v1::StreamStep* step);
  // The parameters of `step` become the held ones; the update of `step` is added to them.
  absl::Status ChangeParameters(v1::StreamStep* step);
  absl::Status TakeParameters(v1::StreamStep* step);
  absl::Status TakeNamedParameters(v1::StreamStep* step);
  absl::StatusOr<int> NamedParameter(const v1::NamedTensor& named, absl::string_view list, int e,
                                     std::vector<int>* entry) const;
  template <typename T>
  absl::Status ApplyUpdate(const v1::StreamStep& step);
  template <typename T>
  absl::Status ApplyNamedUpdate(const v1::StreamStep& step);
  // RESOURCE_EXHAUSTED naming `field` once what the stream holds is over max_stream_bytes.
  absl::Status CheckHeldBytes(absl::string_view field, absl::string_view what = "") const;
  // A named parameter sent whole: the stream's dtype, its declared shape, its byte length.
  absl::Status CheckHeldShape(const v1::Tensor& tensor, const std::vector<int64_t>& shape,
                              const std::string& field) const;
  // An update of a held parameter: the stream's dtype, the held shape, finite values.
  template <typename T>
  absl::Status CheckUpdate(const v1::Tensor& held, const v1::Tensor& update,
                           const std::string& field) const;
  // Moves the step's batch into request_ (Step clears it after the call).
  absl::Status TakeBatch(v1::StreamStep* step);
  // Adds one micro-batch's result (Note [Micro-batch accumulation]).
  absl::Status Accumulate(v1::ComputeGradientsResponse* result, double weight);
  template <typename T>
  void FinishAccumulation(v1::ComputeGradientsResponse* out);
  bool MeanReduction() const;
  int64_t ParameterBytes() const;

  const ServiceLimits limits_;
  bool set_up_ = false;
  v1::DType dtype_ = v1::DTYPE_UNSPECIFIED;
  int num_linear_ = 0;
  // Graph models: the model validated once at set-up, and its plans (one per tuple of input
  // shapes, built on first use and kept).
  std::unique_ptr<GraphPlanner> planner_;
  int64_t model_bytes_ = 0;  // Graph models: the model and its converted constants, held.
  // The model, options and held parameters; a step's batch is moved in and out around each
  // ComputeGradients call.
  v1::ComputeGradientsRequest request_;
  bool has_parameters_ = false;
  // An ONNX model (Note [ONNX import]): steps may send any subset of the parameters, and
  // errors name the file's nodes. The file's values wait here between import and set-up.
  bool onnx_ = false;
  std::vector<v1::NamedTensor> onnx_defaults_;
  std::map<std::string, Staged> staged_;
  int64_t staged_bytes_ = 0;
  Accumulation accumulation_;
  int64_t messages_ = 0;
  int64_t steps_ = 0;
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_STREAM_H_
