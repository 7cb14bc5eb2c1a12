// libFuzzer target: the StreamGradients protocol. The input is a StreamSequence (see
// stream_sequence.proto); its messages go through one service::StreamSession in order, as the
// gRPC reactor feeds them, until one fails (a failed session must not be used again).
//
// Beyond sanitizer reports it checks, after every message:
// * a refusal is INVALID_ARGUMENT or RESOURCE_EXHAUSTED and names the message by its index;
// * the session never holds more than max_stream_bytes;
// * an answer is well formed: step_index is the step's, micro_batches >= 1, tensors as long
//   as their shapes, one gradient per Linear layer;
// * a step that sends full parameters and its whole batch (no chunks, no accumulation)
//   answers with exactly the bits of the unary ComputeGradients call with the same model,
//   options, parameters and batch.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "fuzz/fuzz_common.h"
#include "server/service/compute.h"
#include "server/service/stream.h"
#include "stream_sequence.pb.h"

namespace {

using gradserve::fuzz::Check;
namespace v1 = ::gradserve::v1;
namespace service = ::gradserve::service;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  gradserve::fuzz::SilenceProtobufLogging();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  gradserve::fuzz::StreamSequence sequence;
  if (!sequence.ParseFromArray(data, static_cast<int>(size))) return -1;
  static const service::ServiceLimits limits = gradserve::fuzz::SmallLimits();

  service::StreamSession session(limits);
  const service::ComputeContext context;
  std::optional<v1::StreamSetup> setup;  // A copy of the accepted setup.
  bool chunks_since_step = false;
  bool accumulating = false;
  for (int i = 0; i < sequence.messages_size(); ++i) {
    v1::StreamGradientsRequest* message = sequence.mutable_messages(i);
    // Copied before Handle, which may move from it: a step the unary call can replay.
    std::optional<v1::StreamStep> replay;
    if (setup && message->has_step() &&
        (message->step().parameters_size() > 0 || message->step().named_parameters_size() > 0) &&
        !message->step().accumulate() && !chunks_since_step && !accumulating) {
      replay = message->step();
    }
    std::optional<v1::StreamSetup> setup_copy;
    if (message->has_setup()) setup_copy = message->setup();
    const bool is_chunk = message->has_chunk();
    const bool is_step = message->has_step();
    const bool accumulate = is_step && message->step().accumulate();

    v1::StreamGradientsResponse response;
    const absl::StatusOr<bool> answered = session.Handle(message, context, &response);
    if (!answered.ok()) {
      gradserve::fuzz::CheckRefusal(answered.status());
      Check(absl::StartsWith(answered.status().message(), absl::StrCat("message ", i, " (")),
            "the error does not name message " + std::to_string(i) + ": " +
                answered.status().ToString());
      return 0;
    }
    Check(session.held_bytes() <= limits.max_stream_bytes,
          absl::StrCat("the stream holds ", session.held_bytes(), " bytes, over the limit"));
    Check(session.messages() == i + 1, "messages() does not count the messages handled");
    if (setup_copy) setup = std::move(setup_copy);
    if (is_chunk) chunks_since_step = true;
    if (is_step) {
      chunks_since_step = false;
      accumulating = accumulate;
    }
    Check(*answered == (is_step && !accumulate), "answered a message that is not a final step");
    if (!*answered) continue;

    Check(response.step_index() == session.steps() - 1, "step_index is not the step's");
    Check(response.micro_batches() >= 1, "micro_batches < 1");
    const v1::ComputeGradientsResponse& result = response.result();
    const int64_t batch = result.stats().num_examples();
    Check(batch >= 1, "an answer without examples");
    if (setup->model().has_graph()) {
      gradserve::fuzz::CheckGraphResponse(setup->model(), setup->options(), setup->dtype(), result);
    } else {
      gradserve::fuzz::CheckComputeResponse(setup->model(), setup->options(), setup->dtype(), batch,
                                            result);
    }
    if (!replay) continue;
    Check(response.micro_batches() == 1, "a step outside an accumulation answered for several");
    v1::ComputeGradientsRequest unary;
    *unary.mutable_model() = setup->model();
    *unary.mutable_options() = setup->options();
    *unary.mutable_parameters() = replay->parameters();
    *unary.mutable_named_parameters() = replay->named_parameters();
    *unary.mutable_graph_inputs() = replay->graph_inputs();
    if (replay->has_inputs()) *unary.mutable_inputs() = replay->inputs();
    if (replay->has_targets()) *unary.mutable_targets() = replay->targets();
    if (replay->has_output_gradient()) *unary.mutable_output_gradient() = replay->output_gradient();
    v1::ComputeGradientsResponse expected;
    const absl::Status status = service::ComputeGradients(unary, limits, context, &expected);
    Check(status.ok(), "the stream answered a step the unary call refuses: " + status.ToString());
    Check(gradserve::fuzz::Deterministic(expected) == gradserve::fuzz::Deterministic(result),
          "the stream's answer differs from the unary call's");
  }
  return 0;
}
