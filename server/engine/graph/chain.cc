#include "server/engine/graph/chain.h"

#include "absl/strings/str_cat.h"

namespace gradserve::engine::graph {

GraphSpec ChainToGraph(const ModelSpec& model, DType dtype) {
  GraphSpec g;
  g.inputs.push_back({"input", dtype});
  const bool class_targets = model.loss.kind == LossKind::kCrossEntropy;
  g.inputs.push_back({"targets", class_targets ? DType::kInt64 : dtype});
  std::string previous = "input";
  const int num_layers = static_cast<int>(model.layers.size());
  for (int i = 0; i < num_layers; ++i) {
    const LayerSpec& layer = model.layers[i];
    NodeSpec node;
    node.name = layer.name.empty() ? absl::StrCat(i) : layer.name;
    node.inputs = {previous};
    node.outputs = {i + 1 == num_layers ? std::string("output") : absl::StrCat(i)};
    switch (layer.kind) {
      case LayerKind::kLinear: {
        node.op_type = "Gemm";
        const std::string weight = absl::StrCat(i, ".weight");
        g.parameters.push_back({weight, {layer.out_features, layer.in_features}});
        node.inputs.push_back(weight);
        if (layer.bias) {
          const std::string bias = absl::StrCat(i, ".bias");
          g.parameters.push_back({bias, {layer.out_features}});
          node.inputs.push_back(bias);
        }
        node.attributes.push_back({"transB", int64_t{1}});
        break;
      }
      case LayerKind::kReLU:
        node.op_type = "Relu";
        break;
      case LayerKind::kLeakyReLU:
        node.op_type = "LeakyRelu";
        node.attributes.push_back({"alpha", layer.negative_slope});
        break;
      case LayerKind::kSigmoid:
        node.op_type = "Sigmoid";
        break;
      case LayerKind::kTanh:
        node.op_type = "Tanh";
        break;
      case LayerKind::kGelu:
        node.op_type = "Gelu";
        break;
      case LayerKind::kGeluTanh:
        node.op_type = "Gelu";
        node.attributes.push_back({"approximate", std::string("tanh")});
        break;
      case LayerKind::kIdentity:
        node.op_type = "Identity";
        break;
    }
    previous = node.outputs[0];
    g.nodes.push_back(std::move(node));
  }
  g.outputs = {"output"};
  g.loss.kind = model.loss.kind;
  g.loss.reduction = model.loss.reduction;
  g.loss.huber_delta = model.loss.huber_delta;
  g.loss.output = "output";
  g.loss.target = "targets";
  return g;
}

}  // namespace gradserve::engine::graph
