// Forward and backward kernels of each layer kind, on row-major [batch, width] buffers.
//
// Each forward writes the layer's output; each backward turns dL/d(output) into dL/d(input)
// (and, for Linear, accumulates nothing: dW and db are written, not added). What a backward
// reads from the forward pass is fixed by BackwardReadsInput/BackwardReadsOutput in model.h.
// The element-wise kernels compute every element with the same operations, vectorised or not,
// so a value does not depend on where it sits in memory (checkpointing recomputes into other
// buffers and must reproduce every bit); see Note [Vectorised element-wise math].
#ifndef GRADSERVE_ENGINE_LAYERS_H_
#define GRADSERVE_ENGINE_LAYERS_H_

#include <cstdint>

#include "server/engine/model.h"

namespace gradserve::engine {

// Views of one Linear layer's parameters in nn.Linear layout. bias is null iff the layer has
// none.
template <typename T>
struct LinearParamsView {
  const T* weight = nullptr;  // [out, in]
  const T* bias = nullptr;    // [out]
};

template <typename T>
struct LinearGradsView {
  T* weight = nullptr;  // [out, in]
  T* bias = nullptr;    // [out]; null iff the layer has no bias.
};

// out[batch, width(i+1)] = layer_i(in[batch, width(i)]). params is used by Linear only.
// `in` and `out` must not overlap.
template <typename T>
void LayerForward(const LayerSpec& layer, const LinearParamsView<T>& params, int64_t batch,
                  int64_t in_width, const T* in, T* out);

// Element-wise layers: grad (dL/d(output), [batch, width]) becomes dL/d(input) in place.
// `input` / `output` are the forward activations, read as BackwardReads* says (the other may be
// null).
template <typename T>
void ElementwiseBackward(const LayerSpec& layer, int64_t batch, int64_t width, const T* input,
                         const T* output, T* grad);

// Linear: grad_out [batch, out] -> dW = grad_out^T input, db = sum over the batch of grad_out,
// and, if grad_in is not null, grad_in [batch, in] = grad_out W.
template <typename T>
void LinearBackward(const LayerSpec& layer, const LinearParamsView<T>& params, int64_t batch,
                    const T* input, const T* grad_out, const LinearGradsView<T>& grads, T* grad_in);

}  // namespace gradserve::engine

#endif  // GRADSERVE_ENGINE_LAYERS_H_
