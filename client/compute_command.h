// `gradclient compute`: one ComputeGradients call on an ONNX model with the batch in .npy files,
// the gradients written back as .npy files.
//
//   gradclient --target 127.0.0.1:50051 compute --onnx mlp.onnx --input x=x.npy
//       --loss-target y.npy --loss mse --out grads/
//
// reads the batch (--input NAME=FILE per graph input, --loss-target FILE for the loss target),
// sends the .onnx file as model.onnx with the file's initializer values (or --param NAME=FILE
// in their place), prints the loss and one line per gradient (name, shape, norm), and with
// --out DIR writes DIR/<initializer name>.npy per gradient ('/' in a name becomes '_'),
// DIR/loss.txt and, with --return-output, DIR/outputs/<graph output name>.npy.
#ifndef GRADSERVE_CLIENT_COMPUTE_COMMAND_H_
#define GRADSERVE_CLIENT_COMPUTE_COMMAND_H_

#include <CLI/CLI.hpp>
#include <cstdint>
#include <iosfwd>
#include <string>
#include <string_view>
#include <vector>

#include "gradserve/client.h"

namespace gradserve::client::compute {

struct ComputeOptions {
  std::string onnx_path;
  std::vector<std::string> inputs;  // NAME=FILE
  std::string loss_target_path;
  std::string loss_target_name;  // Empty: the server's default, "target".
  std::string loss_output;       // Empty: the file's only graph output.
  std::string loss = "mse";
  std::string reduction = "mean";
  std::string dtype;                // Empty: the floating .npy files' dtype (see --dtype's help).
  std::vector<std::string> params;  // NAME=FILE
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

// Reads the .onnx and .npy files `options` names into *request. false with the reason in
// *error (naming the file or flag) otherwise.
bool BuildRequest(const ComputeOptions& options, v1::ComputeGradientsRequest* request,
                  std::string* error);

// Builds the request, calls ComputeGradients and reports: the summary to `out`, errors to `err`
// (a failed call as "ComputeGradients failed: CODE_NAME: message"). Returns the process exit
// status: 0, 1 if the call or writing the results failed, 2 if the options or input files are
// unusable.
int RunCompute(GradientClient& client, const ComputeOptions& options, std::ostream& out,
               std::ostream& err);

}  // namespace gradserve::client::compute

#endif  // GRADSERVE_CLIENT_COMPUTE_COMMAND_H_
