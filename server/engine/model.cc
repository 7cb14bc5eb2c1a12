#include "server/engine/model.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace gradserve::engine {

std::string_view LayerKindName(LayerKind kind) {
  switch (kind) {
    case LayerKind::kLinear:
      return "linear";
    case LayerKind::kReLU:
      return "relu";
    case LayerKind::kLeakyReLU:
      return "leaky_relu";
    case LayerKind::kSigmoid:
      return "sigmoid";
    case LayerKind::kTanh:
      return "tanh";
    case LayerKind::kGelu:
    case LayerKind::kGeluTanh:
      return "gelu";
    case LayerKind::kIdentity:
      return "identity";
  }
  return "unknown";
}

std::string_view LossKindName(LossKind kind) {
  switch (kind) {
    case LossKind::kMse:
      return "mse";
    case LossKind::kL1:
      return "l1";
    case LossKind::kHuber:
      return "huber";
    case LossKind::kCrossEntropy:
      return "cross_entropy";
    case LossKind::kBceWithLogits:
      return "bce_with_logits";
    case LossKind::kExternal:
      return "external";
  }
  return "unknown";
}

// Linear reads its input for dW. ReLU, Sigmoid and Tanh differentiate from their output
// (saving the output is what the next Linear needs anyway); LeakyReLU (a negative slope makes
// the output's sign ambiguous) and GELU need the input.
bool BackwardReadsInput(LayerKind kind) {
  return kind == LayerKind::kLinear || kind == LayerKind::kLeakyReLU || kind == LayerKind::kGelu ||
         kind == LayerKind::kGeluTanh;
}

bool BackwardReadsOutput(LayerKind kind) {
  return kind == LayerKind::kReLU || kind == LayerKind::kSigmoid || kind == LayerKind::kTanh;
}

absl::StatusOr<Model> Model::Create(ModelSpec spec, int64_t input_features) {
  if (spec.layers.empty()) {
    return absl::InvalidArgumentError(
        "model.layers: the model has no layers; expected at least one");
  }
  if (input_features <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("inputs.shape[1]: expected a positive width, got ", input_features));
  }
  Model model;
  const int num_layers = static_cast<int>(spec.layers.size());
  model.widths_.reserve(num_layers + 1);
  model.widths_.push_back(input_features);
  model.linear_index_.assign(num_layers, -1);
  for (int i = 0; i < num_layers; ++i) {
    const LayerSpec& layer = spec.layers[i];
    const int64_t width = model.widths_.back();
    switch (layer.kind) {
      case LayerKind::kLinear: {
        const std::string field = absl::StrCat("model.layers[", i, "].linear");
        if (layer.in_features <= 0 || layer.out_features <= 0) {
          const bool bad_in = layer.in_features <= 0;
          return absl::InvalidArgumentError(absl::StrCat(
              field, bad_in ? ".in_features" : ".out_features", ": expected a positive width, got ",
              bad_in ? layer.in_features : layer.out_features));
        }
        if (layer.in_features != width) {
          return absl::InvalidArgumentError(absl::StrCat(
              field, ".in_features: expected ", width,
              i == 0 ? " (the width of inputs)"
                     : absl::StrCat(" (the output width of model.layers[", i - 1, "])"),
              ", got ", layer.in_features));
        }
        model.linear_index_[i] = static_cast<int>(model.linear_layers_.size());
        model.linear_layers_.push_back(i);
        model.num_parameters_ +=
            layer.out_features * layer.in_features + (layer.bias ? layer.out_features : 0);
        model.widths_.push_back(layer.out_features);
        break;
      }
      case LayerKind::kLeakyReLU:
        if (!std::isfinite(layer.negative_slope)) {
          return absl::InvalidArgumentError(absl::StrCat(
              "model.layers[", i, "].leaky_relu.negative_slope: expected a finite number, got ",
              layer.negative_slope));
        }
        model.widths_.push_back(width);
        break;
      default:
        model.widths_.push_back(width);
        break;
    }
  }
  if (spec.loss.kind == LossKind::kHuber &&
      !(spec.loss.huber_delta > 0 && std::isfinite(spec.loss.huber_delta))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model.loss.huber.delta: expected a finite number > 0, got ", spec.loss.huber_delta));
  }
  if (spec.loss.kind == LossKind::kCrossEntropy && model.widths_.back() < 1) {
    return absl::InvalidArgumentError("model.loss.cross_entropy: the output has no classes");
  }
  model.max_width_ = *std::max_element(model.widths_.begin(), model.widths_.end());
  model.activation_needed_.assign(num_layers + 1, false);
  for (int i = 0; i < num_layers; ++i) {
    if (BackwardReadsInput(spec.layers[i].kind)) model.activation_needed_[i] = true;
    if (BackwardReadsOutput(spec.layers[i].kind)) model.activation_needed_[i + 1] = true;
  }
  model.spec_ = std::move(spec);
  return model;
}

}  // namespace gradserve::engine
