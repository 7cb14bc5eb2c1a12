// LayerSpec shorthands shared by the engine tests.
#ifndef GRADSERVE_TESTS_ENGINE_LAYER_SPECS_H_
#define GRADSERVE_TESTS_ENGINE_LAYER_SPECS_H_

#include <cstdint>

#include "server/engine/model.h"

namespace gradserve::engine {

inline LayerSpec Linear(int64_t in, int64_t out, bool bias = true) {
  LayerSpec layer;
  layer.kind = LayerKind::kLinear;
  layer.in_features = in;
  layer.out_features = out;
  layer.bias = bias;
  return layer;
}

inline LayerSpec Activation(LayerKind kind, double slope = 0.01) {
  LayerSpec layer;
  layer.kind = kind;
  layer.negative_slope = slope;
  return layer;
}

}  // namespace gradserve::engine

#endif  // GRADSERVE_TESTS_ENGINE_LAYER_SPECS_H_
