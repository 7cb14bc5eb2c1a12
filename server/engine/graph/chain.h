// The graph form of a chain model (model.h): each layer one node, so a chain can run on the
// graph executor, bit for bit as the chain executor computes it (tested).
#ifndef GRADSERVE_ENGINE_GRAPH_CHAIN_H_
#define GRADSERVE_ENGINE_GRAPH_CHAIN_H_

#include "server/engine/graph/spec.h"
#include "server/engine/model.h"

namespace gradserve::engine::graph {

// Names, as nn.Sequential's state_dict has them: input "input" [batch, in_features]; layer i's
// parameters "<i>.weight" [out, in] and "<i>.bias" [out]; the last layer's value "output"
// (the loss's output); the loss's target input "targets" ([batch, out] in `dtype`, or int64
// [batch] for cross-entropy; dL/d(output) for the external loss). Layer i's output is "<i>" and
// its node is named after the layer's name, or "<i>" without one.
//
// Linear -> Gemm (transB = 1, bias as C), ReLU -> Relu, LeakyReLU -> LeakyRelu (alpha = slope),
// Sigmoid, Tanh, GELU -> Gelu (approximate "none" or "tanh"), Identity.
// REQUIRES: model has at least one layer.
GraphSpec ChainToGraph(const ModelSpec& model, DType dtype);

}  // namespace gradserve::engine::graph

#endif  // GRADSERVE_ENGINE_GRAPH_CHAIN_H_
