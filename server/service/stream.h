// StreamGradients' protocol as a state machine over protobuf messages, with no gRPC in sight:
// the gRPC reactor feeds it one message at a time, and tests and fuzzers can drive it directly.
// The protocol itself is documented with StreamGradientsRequest in gradserve.proto.
//
// A stream holds what a caller would otherwise resend every step: the model and options (from
// the setup message), the current parameters, the tensors staged by chunks, and the gradients
// accumulated over micro-batches. Each step is assembled into a ComputeGradientsRequest the
// session owns and computed by the same ComputeGradients as a unary call, so a step answers
// bit-identically to the unary call with the same parameters and batch.
#ifndef GRADSERVE_SERVICE_STREAM_H_
#define GRADSERVE_SERVICE_STREAM_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gradserve/v1/gradserve.pb.h"
#include "server/service/compute.h"
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
    double weighted_loss = 0;
    std::vector<std::vector<double>> weights, biases;  // One per Linear layer.
    // Rows of input_gradient and output per micro-batch, as sent by ComputeGradients.
    std::vector<std::string> input_gradients, outputs;
    std::vector<double> weights_of_batches;             // The weight each micro-batch's sums got.
    std::vector<double> output_grad_sq, activation_sq;  // Per layer, weighted.
    std::vector<int64_t> non_finite;
    v1::ComputeGradientsResponse last;  // Diagnostics labels, stats and plan of the last.
    int64_t bytes = 0;                  // Everything above: held by the stream.
    int64_t row_bytes = 0;              // input_gradients and outputs: what the answer will carry.
  };

  absl::Status Setup(v1::StreamSetup* setup);
  absl::Status Chunk(v1::TensorChunk* chunk);
  absl::StatusOr<bool> Step(v1::StreamStep* step, const ComputeContext& context,
                            v1::StreamGradientsResponse* response);
  // Moves the staged tensors into `step`, which must leave their fields unset.
  absl::Status Unstage(v1::StreamStep* step);
  absl::Status TakeParameters(v1::StreamStep* step);
  template <typename T>
  absl::Status ApplyUpdate(const v1::StreamStep& step);
  // Adds one micro-batch's result (Note [Micro-batch accumulation]).
  absl::Status Accumulate(v1::ComputeGradientsResponse* result);
  template <typename T>
  void FinishAccumulation(v1::ComputeGradientsResponse* out);
  bool MeanReduction() const;
  int64_t ParameterBytes() const;

  const ServiceLimits limits_;
  bool set_up_ = false;
  v1::DType dtype_ = v1::DTYPE_UNSPECIFIED;
  int num_linear_ = 0;
  double multiply_adds_ = 0;  // Sum of in * out over Linear layers.
  // The model, options and held parameters; a step's batch is moved in and out around each
  // ComputeGradients call.
  v1::ComputeGradientsRequest request_;
  bool has_parameters_ = false;
  std::map<std::string, Staged> staged_;
  int64_t staged_bytes_ = 0;
  Accumulation accumulation_;
  int64_t messages_ = 0;
  int64_t steps_ = 0;
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_STREAM_H_
