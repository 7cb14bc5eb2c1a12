// `gradclient bench`: a closed-loop load generator for ComputeGradients.
//
// It keeps --concurrency calls in flight with gRPC's callback API (no thread per call; or, with
// --api cq, completion queues polled by --threads threads), spread round-robin over --channels
// channels (one HTTP/2 connection each), all sending one request built once from a shape spec.
// After --warmup seconds it records every completion for --duration seconds (or --max-calls
// completions), then prints calls, errors by status code, throughput (successful calls per
// second; calls straddling the window's edges count in part, see Note [Throughput] in the .cc),
// exact latency percentiles of the successful calls and the generator's own CPU time (so a
// saturated client is visible), and with --json FILE writes the same as JSON.
//
//   gradclient --target 127.0.0.1:50051 bench --concurrency 16 --duration 10 --shape seed
//   gradclient bench --shape batch=512,layers=1024x1024x1024x1024,act=relu,loss=mse -c 8
#ifndef GRADSERVE_CLIENT_BENCH_COMMAND_H_
#define GRADSERVE_CLIENT_BENCH_COMMAND_H_

#include <grpcpp/grpcpp.h>

#include <CLI/CLI.hpp>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gradserve/client.h"

namespace gradserve::client::bench {

// The request a benchmark sends, parsed from --shape.
//
// "seed" is gradclient demo's network: batch 8, Linear(4 -> 2) -> ReLU -> MSE, float32, with dx.
// Otherwise comma-separated key=value pairs, in any order:
//   batch=B          rows, >= 1 (required)
//   layers=W0xW1x..  feature widths, >= 2 of them: Linear(W0 -> W1), Linear(W1 -> W2), ...
//                    (required)
//   act=NAME         activation after every Linear but the last: relu (default), leaky_relu,
//                    sigmoid, tanh, gelu, gelu_tanh, none
//   out_act=NAME     activation after the last Linear; default none
//   loss=NAME        mse (default), l1, huber, cross_entropy (INT64 class targets),
//                    bce_with_logits
//   dtype=NAME       float32 (default) or float64
//   dx=0|1           also request dL/d(inputs); default 0
//   seed=N           seed of the random parameters, inputs and targets; default 7
struct ShapeSpec {
  int64_t batch = 0;
  std::vector<int64_t> widths;
  std::string act = "relu";
  std::string out_act = "none";
  std::string loss = "mse";
  std::string dtype = "float32";
  bool dx = false;
  uint64_t seed = 7;

  // Floating-point operations per call as 6 * batch * sum(in * out) over the Linear layers
  // (forward 2, backward 4: dW and dx), the usual dense-training count.
  double FlopsPerCall() const;
  // Canonical spelling, e.g. "batch=8,layers=4x2,act=relu,out_act=relu,loss=mse,...".
  std::string ToString() const;
};

// Parses --shape. On error returns nullopt and sets *error to a message naming the key.
// REQUIRES: error != nullptr.
std::optional<ShapeSpec> ParseShape(std::string_view text, std::string* error);

// Builds the request for `spec`: parameters ~ N(0, 1/in) per layer (so activations neither
// vanish nor explode with depth), inputs ~ N(0, 1), targets to match the loss, all drawn from
// a generator seeded with spec.seed, so the same spec gives the same bytes on every run.
// checkpoint is "none" or "sqrt".
v1::ComputeGradientsRequest BuildRequest(const ShapeSpec& spec, const std::string& checkpoint);

// Exact percentile by nearest rank (the smallest value with at least p% of values <= it).
// REQUIRES: sorted is ascending and non-empty; 0 < p <= 100.
int64_t Percentile(const std::vector<int64_t>& sorted, double p);

struct BenchOptions {
  int concurrency = 1;
  double duration_seconds = 10;
  double warmup_seconds = 1;
  int64_t max_calls = 0;  // 0: no limit, the duration alone ends the run.
  std::string shape = "seed";
  std::string checkpoint = "none";
  int channels = 1;
  std::string api = "callback";  // Or "cq": async stubs on completion queues.
  int threads = 1;               // Threads polling completion queues (api "cq"), one queue each.
  bool verify = false;
  std::string json_path;  // Empty: no JSON.
  bool progress = true;
};

// Adds the `bench` subcommand and its options (stored into *options) to app.
// REQUIRES: options outlives app's parsing.
CLI::App* AddBenchCommand(CLI::App& app, BenchOptions* options);

// Runs the benchmark against target with `credentials` (MakeChannelCredentials'); every call
// is prepared by PrepareContext(client_options) (deadline, bearer token), and
// client_options.tls.server_name_override and max_message_bytes apply to every channel. Results go
// to stdout (and options.json_path), progress to stderr. Returns the process exit status: 0 if
// every measured call succeeded (and, with verify, matched the first response), 1 otherwise, 2 on a
// usage error.
int RunBench(const std::string& target, const ClientOptions& client_options,
             std::shared_ptr<grpc::ChannelCredentials> credentials, const BenchOptions& options);

}  // namespace gradserve::client::bench

#endif  // GRADSERVE_CLIENT_BENCH_COMMAND_H_
