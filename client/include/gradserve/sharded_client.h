// Data-parallel gradients: one ComputeGradientsRequest's batch split across replicas, the
// answers combined as if one server had computed the whole batch.
//
//   ClientOptions per_replica;
//   per_replica.retry_unavailable = false;  // the ShardedClient moves a failed part itself
//   std::vector<std::shared_ptr<grpc::Channel>> replicas;
//   for (const std::string& address : addresses) {
//     replicas.push_back(CreateChannel(address, per_replica));
//   }
//   gradserve::client::ShardedClient sharded(replicas);
//   grpc::Status status = sharded.ComputeGradients(request, /*shards=*/3, &response);
//
// or, behind a DNS name resolving to every replica (round_robin spreads the parts):
//   gradserve::client::ShardedClient sharded(CreateChannel("dns:///gradserve:50051"), 4);
//   sharded.ComputeGradients(request, &response);  // 4 shards
#ifndef GRADSERVE_CLIENT_SHARDED_CLIENT_H_
#define GRADSERVE_CLIENT_SHARDED_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "gradserve/client.h"
#include "gradserve/v1/gradserve.grpc.pb.h"
#include "gradserve/v1/gradserve.pb.h"

namespace gradserve::client {

struct ShardedClientOptions {
  // max_message_bytes is not read (the channels are made already). client.timeout is the
  // deadline of the whole ComputeGradients call, retries and backoff included; the bearer
  // token goes with every part.
  ClientOptions client;
  // Deadline of each attempt of one part, capped by client.timeout. Shorter than it, a part
  // that hits it (a stuck replica) is retried on the next channel while time remains.
  std::chrono::milliseconds attempt_timeout{60000};
  // Attempts per part (the first included) for UNAVAILABLE, CANCELLED and DEADLINE_EXCEEDED.
  int max_attempts = 4;
  // Wait before the second attempt; each later wait is `backoff_multiplier` times longer.
  std::chrono::milliseconds initial_backoff{50};
  double backoff_multiplier = 2.0;
};

// Splits a batch along its first axis into contiguous parts, computes them concurrently on the
// replicas and combines the answers in float64, always in part order (0, 1, 2, ...), so the
// result is the same bits whatever order the answers arrive in. Thread-safe.
//
// Splitting: chain models split inputs, targets and output_gradient; graph and ONNX models
// split every graph input, all of which must share the leading size (the batch; for the loss
// target too: its leading axis is the batch). Parameters go whole to every part. A batch of B
// rows in k parts gives the first B % k parts one row more than the others; k above B is
// lowered to B (an empty part would be an invalid request).
//
// Combining: REDUCTION_SUM (and ExternalLoss, whose output gradient is used as given) adds the
// parts' losses and gradients; MEAN weighs part i by n_i, sum_i(n_i x_i) / sum_i(n_i), with
// n_i = stats.num_examples, except for graph cross-entropy, where n_i is the positions of the
// part's target not equal to ignore_index (MEAN divides by those): parts with none are left
// out, and if no position is left at all the loss is NaN and the gradients 0, as in PyTorch.
// The result is written back in the request's dtype (that of the first part's gradients).
//
// The response holds loss, gradients (chain: per Linear layer) or named_gradients (in the
// first part's order), and stats.num_examples (the sum). Everything else is left empty:
// diagnostics, the other stats, and per-row results (options.return_output,
// return_input_gradient and input_gradient_names are refused with INVALID_ARGUMENT). With one
// part (shards = 1, or a batch of one row) the response is that call's, whole and unchanged.
//
// Retries: a part that fails with UNAVAILABLE or CANCELLED, or DEADLINE_EXCEEDED while the
// call's deadline is still ahead, is sent again to the next channel (part i starts on channel i mod
// channels), after initial_backoff, then twice as long, ..., up to max_attempts. Each part's answer
// is counted once: the first attempt to succeed. Any other error, or a part out of attempts, fails
// the whole call with that part's status code and a message naming the part
// ("shard 1 of 3 (rows 4..6): ..."); with several failed parts, the lowest-numbered one.
// CANCELLED is retried because the client never cancels a part itself: it comes from a replica
// that is shutting down (gRPC cancels a call that reaches the server as it stops), and a
// gradient call is a pure function of its request, safe to send again.
// What one ComputeGradients call moved, every part and attempt counted: serialized message
// bytes (without gRPC's and HTTP/2's framing).
struct ShardedCallStats {
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
  // Calls made: the parts, plus one per retry.
  int attempts = 0;
};

class ShardedClient {
 public:
  // One channel per replica.
  explicit ShardedClient(std::vector<std::shared_ptr<grpc::Channel>> channels,
                         ShardedClientOptions options = {});
  // One channel whose load balancer spreads calls over the replicas (round_robin over a DNS
  // name), and the number of parts ComputeGradients(request, response) makes.
  ShardedClient(std::shared_ptr<grpc::Channel> channel, int default_shards,
                ShardedClientOptions options = {});
  // For tests: any stubs, e.g. v1::MockGradientServiceStub, one per replica.
  explicit ShardedClient(std::vector<std::unique_ptr<v1::GradientService::StubInterface>> stubs,
                         ShardedClientOptions options = {});

  // `request` split into `shards` parts (>= 1). INVALID_ARGUMENT, before anything is sent, if
  // the batch cannot be split (no batch, leading sizes that differ, data not matching a shape).
  // `stats`, if not null, is filled in whatever the outcome.
  grpc::Status ComputeGradients(const v1::ComputeGradientsRequest& request, int shards,
                                v1::ComputeGradientsResponse* response,
                                ShardedCallStats* stats = nullptr);
  // In default_shards parts: the channel count, or the number given with the one channel.
  grpc::Status ComputeGradients(const v1::ComputeGradientsRequest& request,
                                v1::ComputeGradientsResponse* response);

 private:
  struct Part;
  void RunPart(Part* part, std::chrono::system_clock::time_point deadline) const;

  std::vector<std::unique_ptr<v1::GradientService::StubInterface>> stubs_;
  int default_shards_;
  ShardedClientOptions options_;
};

}  // namespace gradserve::client

#endif  // GRADSERVE_CLIENT_SHARDED_CLIENT_H_
