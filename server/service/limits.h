// Limits the service enforces on every request, with their defaults.
#ifndef GRADSERVE_SERVICE_LIMITS_H_
#define GRADSERVE_SERVICE_LIMITS_H_

#include <cstdint>

namespace gradserve::service {

struct ServiceLimits {
  // Largest message either way. gRPC's default is 4 MiB; gradients of a 64 MiB model must pass
  // without a flag, so the default is 256 MiB (protobuf cannot exceed 2 GiB).
  int64_t max_message_bytes = int64_t{256} << 20;
  int64_t max_tensor_elements = int64_t{1} << 26;  // 64 Mi elements (256 MiB of float32).
  int64_t max_layers = 1024;
  int64_t max_batch = int64_t{1} << 20;
  int64_t max_features = int64_t{1} << 20;
  // Cached activations plus workspace of one request.
  int64_t max_activation_bytes = int64_t{2} << 30;
  // CheckGradients: at most this many entries perturbed per tensor.
  int64_t max_check_samples = 4096;
  // State one StreamGradients stream holds between messages: parameters, accumulator, chunks.
  // Together with max_streams it bounds what streams can pin (16 GiB at the defaults, though a
  // stream only holds what its client actually sent).
  int64_t max_stream_bytes = int64_t{1} << 30;
  int64_t max_streams = 16;
  // Streams one client (IP address) may hold open: max_streams is not one client's to take.
  int64_t max_streams_per_client = 4;
  // A stream that waits this long for its client's next message is ended (DEADLINE_EXCEEDED),
  // freeing its place and state: idle streams cannot lock others out.
  double stream_idle_seconds = 60;
  // Largest estimated compute of one call (ComputeGradientsCost, CheckGradientsCost), refused
  // with RESOURCE_EXHAUSTED before it is queued. 1e13 is about a minute on two cores.
  double max_call_flops = 1e13;
  // Longest a call may compute: the deadline of calls that bring none, and a cap on those that
  // bring a later one (a stream's steps each). DEADLINE_EXCEEDED past it.
  double max_call_seconds = 300;
  // Memory all calls together may hold: requests, answers until the client took them,
  // activations (Note [Memory budget]). main() sets DefaultMaxMemoryBytes().
  int64_t max_memory_bytes = int64_t{4} << 30;
  // Graph models: most nodes, most values (inputs, parameters, constants, node outputs) and the
  // highest rank of any value; checked from the request's counts before anything is planned.
  int64_t max_graph_nodes = 100'000;
  int64_t max_graph_values = 400'000;
  int64_t max_graph_rank = 8;
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_LIMITS_H_
