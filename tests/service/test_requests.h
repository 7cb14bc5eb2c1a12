// Requests shared by the service and client tests.
#ifndef GRADSERVE_TESTS_SERVICE_TEST_REQUESTS_H_
#define GRADSERVE_TESTS_SERVICE_TEST_REQUESTS_H_

#include <cstdint>
#include <random>
#include <vector>

#include "gradserve/v1/gradserve.pb.h"

namespace gradserve::testing {

namespace v1 = ::gradserve::v1;

template <typename T>
v1::DType DTypeOf() {
  return sizeof(T) == 4 ? v1::DTYPE_FLOAT32 : v1::DTYPE_FLOAT64;
}

template <typename T>
void SetTensor(v1::Tensor* tensor, const std::vector<T>& values, std::vector<int64_t> shape) {
  tensor->Clear();
  tensor->set_dtype(std::is_integral_v<T> ? (sizeof(T) == 4 ? v1::DTYPE_INT32 : v1::DTYPE_INT64)
                                          : DTypeOf<T>());
  for (int64_t dim : shape) tensor->add_shape(dim);
  tensor->set_data(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

template <typename T>
std::vector<T> RandomValues(int64_t n, std::mt19937& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> values(n);
  for (T& v : values) v = static_cast<T>(normal(rng));
  return values;
}

// The network gradserve grows from: batch 8, Linear(4 -> 2) -> ReLU -> MSE (mean).
template <typename T>
v1::ComputeGradientsRequest SeedRequest(uint32_t seed = 1) {
  std::mt19937 rng(seed);
  v1::ComputeGradientsRequest request;
  v1::Linear* linear = request.mutable_model()->add_layers()->mutable_linear();
  linear->set_in_features(4);
  linear->set_out_features(2);
  request.mutable_model()->add_layers()->mutable_relu();
  request.mutable_model()->mutable_loss()->mutable_mse();
  v1::LinearParameters* params = request.add_parameters();
  SetTensor<T>(params->mutable_weight(), RandomValues<T>(8, rng), {2, 4});
  SetTensor<T>(params->mutable_bias(), RandomValues<T>(2, rng), {2});
  SetTensor<T>(request.mutable_inputs(), RandomValues<T>(32, rng), {8, 4});
  SetTensor<T>(request.mutable_targets(), RandomValues<T>(16, rng), {8, 2});
  return request;
}

}  // namespace gradserve::testing

#endif  // GRADSERVE_TESTS_SERVICE_TEST_REQUESTS_H_
