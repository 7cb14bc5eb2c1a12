// The model: an ordered stack of layers followed by a loss, validated once.
//
// A ModelSpec is plain data mirroring gradserve.v1.Model. Model::Create checks that the widths
// chain from the inputs through every layer and precomputes what execution needs (activation
// widths, which activations each backward step reads, where the parameters of each Linear
// layer are), so that executing a model never discovers a shape error.
//
// Indexing used across the engine: layer i (0-based) maps activation a_i to a_{i+1}; a_0 is
// the caller's input and a_L the model output, for L layers.
#ifndef GRADSERVE_ENGINE_MODEL_H_
#define GRADSERVE_ENGINE_MODEL_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "server/engine/types.h"

namespace gradserve::engine {

enum class LayerKind { kLinear, kReLU, kLeakyReLU, kSigmoid, kTanh, kGelu, kGeluTanh, kIdentity };

// Name as used in the API's Layer.kind oneof ("linear", "relu", ...); kGeluTanh is "gelu".
std::string_view LayerKindName(LayerKind kind);

struct LayerSpec {
  LayerKind kind = LayerKind::kIdentity;
  int64_t in_features = 0;       // kLinear only.
  int64_t out_features = 0;      // kLinear only.
  bool bias = true;              // kLinear only.
  double negative_slope = 0.01;  // kLeakyReLU only.
  std::string name;              // Free-form label for diagnostics.
};

enum class LossKind { kMse, kL1, kHuber, kCrossEntropy, kBceWithLogits, kExternal };
enum class Reduction { kMean, kSum };

std::string_view LossKindName(LossKind kind);

struct LossSpec {
  LossKind kind = LossKind::kMse;
  Reduction reduction = Reduction::kMean;
  double huber_delta = 1.0;  // kHuber only.
};

struct ModelSpec {
  std::vector<LayerSpec> layers;
  LossSpec loss;
};

// Whether layer kind's backward pass reads its input a_i / its output a_{i+1}.
bool BackwardReadsInput(LayerKind kind);
bool BackwardReadsOutput(LayerKind kind);

// An immutable, validated model for inputs of a given width. Thread-safe to share.
class Model {
 public:
  // Validates spec for inputs with input_features columns. Errors (INVALID_ARGUMENT) name the
  // field as the API does, e.g. "model.layers[2].linear.in_features".
  static absl::StatusOr<Model> Create(ModelSpec spec, int64_t input_features);

  const ModelSpec& spec() const { return spec_; }
  int num_layers() const { return static_cast<int>(spec_.layers.size()); }
  const LayerSpec& layer(int i) const { return spec_.layers[i]; }
  const LossSpec& loss() const { return spec_.loss; }

  // Columns of activation a_k, k in [0, num_layers()].
  int64_t width(int k) const { return widths_[k]; }
  int64_t input_features() const { return widths_.front(); }
  int64_t output_features() const { return widths_.back(); }
  int64_t max_width() const { return max_width_; }

  // Linear layers are numbered 0.. in model order; their parameters and gradients use it.
  int num_linear() const { return static_cast<int>(linear_layers_.size()); }
  int linear_layer(int linear_index) const { return linear_layers_[linear_index]; }
  // -1 for layers that are not Linear.
  int linear_index(int layer) const { return linear_index_[layer]; }
  // Number of trainable scalars (all weights and biases).
  int64_t num_parameters() const { return num_parameters_; }

  // True if the backward pass of some layer reads activation a_k.
  bool activation_needed(int k) const { return activation_needed_[k]; }

 private:
  Model() = default;

  ModelSpec spec_;
  std::vector<int64_t> widths_;
  int64_t max_width_ = 0;
  std::vector<int> linear_layers_;
  std::vector<int> linear_index_;
  std::vector<bool> activation_needed_;
  int64_t num_parameters_ = 0;
};

}  // namespace gradserve::engine

#endif  // GRADSERVE_ENGINE_MODEL_H_
