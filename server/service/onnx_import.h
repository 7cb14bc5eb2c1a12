// ONNX models (gradserve.v1.OnnxModel) -> the API's graph form (gradserve.v1.Graph), once per
// call or stream; everything after that (planning, validation of the batch, the run) is the
// graph path's.
//
// Note [ONNX import]
// A request with model.onnx is rewritten before anything else reads it: the file is parsed,
// checked by ONNX's own checker, and converted node for node into model.graph (same node
// indices, names, op types and attributes), its initializers into the graph's parameters and
// constants, and the parameters the request leaves out get the file's values. Converting to the
// API's form rather than straight to the engine's keeps one validation path for both: every
// check a hand-written graph gets, an imported one gets too, and the engine stays free of
// protobuf. Errors the graph path reports about the rewritten model are renamed back to the
// file's terms (RenameOnnxFields), so a user reads "model.onnx: graph.node[12] (...)".
//
// What the conversion decides:
//   - Opsets 13 to 17 of the default domain (the node signatures gradserve implements are those
//     of opset 17, and from 13 to 17 they did not change for the ops it supports); IR version
//     at most the ONNX library's.
//   - Every size is checked against the limits before anything is allocated from it: node and
//     value counts, each initializer's dims (rank, element count) against its bytes.
//   - Which initializers are trained (Note [Trainable initializers] in onnx_import.cc).
//   - Dropout in training mode gets a per-node seed (its index in the file), mixed with
//     options.dropout_seed by the engine; disable_dropout turns it into evaluation mode.
#ifndef GRADSERVE_SERVICE_ONNX_IMPORT_H_
#define GRADSERVE_SERVICE_ONNX_IMPORT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gradserve/v1/gradserve.pb.h"
#include "server/service/limits.h"

namespace gradserve::service {

namespace v1 = ::gradserve::v1;

// The lowest and highest opset of ONNX's default domain accepted.
inline constexpr int kMinOnnxOpset = 13;
inline constexpr int kMaxOnnxOpset = 17;

struct ImportedOnnx {
  // model.graph set (with model.loss copied); model.onnx cleared.
  v1::Model model;
  // The floating dtype the request computes in (OnnxModel.dtype, or the file's).
  v1::DType dtype = v1::DTYPE_FLOAT32;
  // The file's value of every graph parameter, in model.graph.parameters order, in `dtype`.
  std::vector<v1::NamedTensor> defaults;
  // Bytes the conversion holds (the graph and the defaults), for the memory budget.
  int64_t bytes = 0;
};

// Converts model.onnx (with model.loss) as Note [ONNX import] says. `dtype`: the stream's
// floating dtype, or DTYPE_UNSPECIFIED for a unary call (then OnnxModel.dtype or the file's).
absl::StatusOr<ImportedOnnx> ImportOnnx(const v1::Model& model, v1::DType dtype,
                                        const ServiceLimits& limits);

// Rewrites a request with model.onnx into its graph form in place: model.graph instead of
// model.onnx, and named_parameters completed with the file's values of those it left out.
// No-op for other requests.
absl::Status LowerOnnxRequest(v1::ComputeGradientsRequest* request, const ServiceLimits& limits);

// Errors about a rewritten request, in the file's terms: "model.graph.nodes[k] (...)" becomes
// "model.onnx: graph.node[k] (...)", "model.graph.loss_output" "model.onnx.loss_output",
// "model.graph.parameters[p]" "model.onnx: parameters[p]" (the trained initializers, in the
// order of named_gradients), and so on, wherever in the message they are.
absl::Status RenameOnnxFields(const absl::Status& status);

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_ONNX_IMPORT_H_
