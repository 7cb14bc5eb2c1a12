// `gradclient compute`: one ComputeGradients call on a model file with the batch in .npy files,
// the gradients written back as .npy files.
//
//   gradclient compute --model mlp.json --input x.npy --loss-target y.npy --out grads/
//   gradclient compute --model block.txtpb --input x=x.npy --loss-target y.npy --params p/
//   gradclient compute --onnx mlp.onnx --input x=x.npy --loss-target y.npy --out grads/
//
// The model is a gradserve.v1.Model in protobuf JSON or text format (a chain of `layers` or a
// `graph`), or an ONNX file. The batch: a chain model's one input (--input FILE) and its targets
// (--loss-target FILE, or --output-gradient FILE for the external loss); a graph's or ONNX
// file's inputs by name (--input NAME=FILE), the loss target under the graph's loss_target.
// Parameters are named as a PyTorch state_dict names them: "<layer index>.weight" and
// "<layer index>.bias" for a chain (the index in `layers`, as nn.Sequential numbers its
// children), the declared names for a graph, the initializer names for ONNX; given one by one
// (--param NAME=FILE) or as a directory of NAME.npy files (--params DIR). A chain model given
// none is initialized as torch.nn.Linear initializes itself, from --init-seed.
//
// Prints the loss, one line per gradient (name, shape, norm) and the per-layer (per-value for
// graphs) diagnostics; with --out DIR writes DIR/<name>.npy per gradient ('/' in a name becomes
// '_'), DIR/loss.txt (%.17g), DIR/input_gradient.npy (chain) or DIR/input_gradients/<name>.npy
// with --return-input-gradient, DIR/outputs/<name>.npy with --return-output, and
// DIR/params/<name>.npy for parameters it initialized. The gradient files hold the server's
// bytes as they came.
#ifndef GRADSERVE_CLIENT_COMPUTE_COMMAND_H_
#define GRADSERVE_CLIENT_COMPUTE_COMMAND_H_

#include <CLI/CLI.hpp>
#include <cstdint>
#include <iosfwd>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gradserve/client.h"

namespace gradserve::client::compute {

struct ComputeOptions {
  std::string model_path;  // A gradserve.v1.Model, JSON or text format; or:
  std::string onnx_path;
  std::vector<std::string> inputs;  // NAME=FILE; a chain model's one FILE
  std::string loss_target_path;
  std::string output_gradient_path;  // A chain model's dL/d(output) for the external loss.
  std::string loss_target_name;      // Empty: the server's default, "target".
  std::string loss_output;           // Empty: the file's only graph output.
  std::string loss;                  // Empty: the model file's loss; "mse" for ONNX.
  std::string reduction;             // Empty: the model file's; "mean" for ONNX.
  std::string dtype;                 // Empty: the floating .npy files' dtype (see --dtype's help).
  std::vector<std::string> params;   // NAME=FILE
  std::string params_dir;            // DIR/<NpyFileName(name)> per parameter
  uint64_t init_seed = 0;            // For a chain model given no parameters.
  bool return_input_gradient = false;
  std::string checkpoint;  // "", "none", "sqrt", "every:K", "budget:BYTES"
  std::vector<std::string> frozen;
  std::vector<std::string> batch_inputs;
  bool disable_dropout = false;
  uint64_t dropout_seed = 0;
  bool return_output = false;
  std::string out_dir;  // Empty: print only.
};

// Adds the `compute` subcommand and its options (stored into *options) to app.
// REQUIRES: options outlives app's parsing.
CLI::App* AddComputeCommand(CLI::App& app, ComputeOptions* options);

// The file name a tensor called `name` is written to: the name with every '/' replaced by '_'
// (ONNX names such as "/net/Gemm_output_0" would otherwise be paths), plus ".npy".
std::string NpyFileName(std::string_view name);

// Reads a gradserve.v1.Model from `path`: protobuf JSON if the name ends in .json, text format
// if it ends in .txtpb, .textproto, .pbtxt or .prototxt, and otherwise JSON if the first
// non-blank character is '{' (a text-format message cannot start with one), text format if not.
// false with "PATH: ..." (the parser's line and column) in *error otherwise.
bool ReadModelFile(const std::string& path, v1::Model* model, std::string* error);

// The parameter names and shapes a chain model takes, in request order: "<i>.weight" [out, in]
// and, unless the layer has none, "<i>.bias" [out] for the Linear layer at index i of `layers`.
std::vector<std::pair<std::string, std::vector<int64_t>>> ChainParameterShapes(
    const v1::Model& model);

// What BuildRequest made besides the request: parameters it initialized (for --out DIR/params).
struct BuildInfo {
  std::vector<std::pair<std::string, v1::Tensor>> initialized;
};

// Reads the model and .npy files `options` names into *request. false with the reason in
// *error (naming the file or flag) otherwise.
bool BuildRequest(const ComputeOptions& options, v1::ComputeGradientsRequest* request,
                  std::string* error, BuildInfo* info = nullptr);

// Builds the request, calls ComputeGradients and reports: the summary to `out`, errors to `err`
// (a failed call as "ComputeGradients failed: CODE_NAME: message"). Returns the process exit
// status: 0, 1 if the call or writing the results failed, 2 if the options or input files are
// unusable.
int RunCompute(GradientClient& client, const ComputeOptions& options, std::ostream& out,
               std::ostream& err);

}  // namespace gradserve::client::compute

#endif  // GRADSERVE_CLIENT_COMPUTE_COMMAND_H_
