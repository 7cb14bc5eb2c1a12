#include "server/engine/layers.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "server/engine/elementwise_math.h"
#include "server/engine/gemm.h"
#include "server/engine/parallel_loops.h"
#include "server/engine/types.h"

namespace gradserve::engine {

template <typename T>
void LayerForward(const LayerSpec& layer, const LinearParamsView<T>& params, int64_t batch,
                  int64_t in_width, const T* in, T* out) {
  const int64_t n = batch * in_width;
  switch (layer.kind) {
    case LayerKind::kLinear: {
      // out [B, out] = in [B, in] * W^T [in, out] + b: the bias is written into every row first
      // and the product accumulated onto it, so the GEMM's epilogue adds it instead of a
      // separate pass over the output.
      const int64_t width = layer.out_features;
      if (params.bias != nullptr) {
        const T* bias = params.bias;
        ForEachIndex(batch, batch * width >= kParallelElements,
                     [=](int64_t r) { std::memcpy(out + r * width, bias, sizeof(T) * width); });
      }
      Gemm<T>(Op::kPlain, Op::kTransposed, batch, width, layer.in_features, in, params.weight, out,
              params.bias != nullptr ? Into::kAccumulate : Into::kOverwrite);
      return;
    }
    case LayerKind::kReLU:
      ForEachElement(n, [=](int64_t j) { out[j] = in[j] > T(0) ? in[j] : T(0); });
      return;
    case LayerKind::kLeakyReLU: {
      const T slope = static_cast<T>(layer.negative_slope);
      ForEachElement(n, [=](int64_t j) { out[j] = in[j] > T(0) ? in[j] : in[j] * slope; });
      return;
    }
    case LayerKind::kSigmoid:
      ForEachElement(n, [=](int64_t j) { out[j] = Sigmoid<T>(in[j]); });
      return;
    case LayerKind::kTanh:
      ForEachElement(n, [=](int64_t j) { out[j] = Tanh<T>(in[j]); });
      return;
    case LayerKind::kGelu:
      ForEachElement(n, [=](int64_t j) { out[j] = Gelu<T>(in[j]); });
      return;
    case LayerKind::kGeluTanh:
      ForEachElement(n, [=](int64_t j) { out[j] = GeluTanh<T>(in[j]); });
      return;
    case LayerKind::kIdentity:
      ForEachElement(n, [=](int64_t j) { out[j] = in[j]; });
      return;
  }
}

template <typename T>
void ElementwiseBackward(const LayerSpec& layer, int64_t batch, int64_t width, const T* input,
                         const T* output, T* grad) {
  const int64_t n = batch * width;
  switch (layer.kind) {
    case LayerKind::kReLU:  // y = max(x, 0): dx = dy where y > 0.
      ForEachElement(n, [=](int64_t j) { grad[j] = output[j] > T(0) ? grad[j] : T(0); });
      return;
    case LayerKind::kLeakyReLU: {  // y = x > 0 ? x : a x: dx = x > 0 ? dy : a dy.
      const T slope = static_cast<T>(layer.negative_slope);
      ForEachElement(n, [=](int64_t j) { grad[j] = input[j] > T(0) ? grad[j] : grad[j] * slope; });
      return;
    }
    case LayerKind::kSigmoid:  // y = s(x): dx = dy (1 - y) y.
      ForEachElement(n, [=](int64_t j) { grad[j] = grad[j] * (T(1) - output[j]) * output[j]; });
      return;
    case LayerKind::kTanh:  // y = tanh(x): dx = dy (1 - y^2).
      ForEachElement(n, [=](int64_t j) { grad[j] = grad[j] * (T(1) - output[j] * output[j]); });
      return;
    case LayerKind::kGelu:  // y = x Phi(x): dx = dy (Phi(x) + x phi(x)).
      ForEachElement(n, [=](int64_t j) { grad[j] = grad[j] * GeluDerivative<T>(input[j]); });
      return;
    case LayerKind::kGeluTanh:  // y = x/2 (1 + tanh(u)), u = c (x + k x^3).
      ForEachElement(n, [=](int64_t j) { grad[j] = grad[j] * GeluTanhDerivative<T>(input[j]); });
      return;
    case LayerKind::kIdentity:
    case LayerKind::kLinear:
      return;
  }
}

template <typename T>
void LinearBackward(const LayerSpec& layer, const LinearParamsView<T>& params, int64_t batch,
                    const T* input, const T* grad_out, const LinearGradsView<T>& grads,
                    T* grad_in) {
  const int64_t in = layer.in_features;
  const int64_t out = layer.out_features;
  // dW [out, in] = delta^T [out, B] * x [B, in]
  Gemm<T>(Op::kTransposed, Op::kPlain, out, in, batch, grad_out, input, grads.weight);
  if (grads.bias != nullptr) {
    // db [out] = sum over the batch of delta, accumulated in double (float32 sums over large
    // batches otherwise lose digits), each column from row 0 down: the team splits the
    // columns, never a column's sum, so the bits do not depend on the thread count.
    constexpr int64_t kColumns = 64;
    T* bias_grad = grads.bias;
    const int64_t blocks = (out + kColumns - 1) / kColumns;
    ForEachIndex(blocks, batch * out >= kParallelElements, [=](int64_t block) {
      const int64_t c0 = block * kColumns;
      const int64_t columns = std::min(kColumns, out - c0);
      double sum[kColumns] = {};
      for (int64_t b = 0; b < batch; ++b) {
        const T* row = grad_out + b * out + c0;
#pragma omp simd
        for (int64_t c = 0; c < columns; ++c) sum[c] += static_cast<double>(row[c]);
      }
      for (int64_t c = 0; c < columns; ++c) bias_grad[c0 + c] = static_cast<T>(sum[c]);
    });
  }
  if (grad_in != nullptr) {
    // dx [B, in] = delta [B, out] * W [out, in]
    Gemm<T>(Op::kPlain, Op::kPlain, batch, in, out, grad_out, params.weight, grad_in);
  }
}

#define GRADSERVE_INSTANTIATE_LAYERS(T)                                                            \
  template void LayerForward<T>(const LayerSpec&, const LinearParamsView<T>&, int64_t, int64_t,    \
                                const T*, T*);                                                     \
  template void ElementwiseBackward<T>(const LayerSpec&, int64_t, int64_t, const T*, const T*,     \
                                       T*);                                                        \
  template void LinearBackward<T>(const LayerSpec&, const LinearParamsView<T>&, int64_t, const T*, \
                                  const T*, const LinearGradsView<T>&, T*);
GRADSERVE_INSTANTIATE_LAYERS(float)
GRADSERVE_INSTANTIATE_LAYERS(double)
#undef GRADSERVE_INSTANTIATE_LAYERS

}  // namespace gradserve::engine
