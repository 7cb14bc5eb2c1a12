// Graph requests for the service tests: an engine GraphSpec (tests/engine/graph_test_models.h)
// written as the API's Graph (service::GraphSpecToModel), with random named parameters and
// inputs.
#ifndef GRADSERVE_TESTS_SERVICE_GRAPH_TEST_REQUESTS_H_
#define GRADSERVE_TESTS_SERVICE_GRAPH_TEST_REQUESTS_H_

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gradserve/v1/gradserve.pb.h"
#include "server/engine/graph/spec.h"
#include "server/service/convert_graph.h"
#include "tests/service/test_requests.h"

namespace gradserve::testing {

namespace eg = ::gradserve::engine::graph;

// A request for `spec` with random parameters (U(-1, 1) * scale) and float inputs (N(0, 1));
// integer inputs are uniform in [0, int_range).
template <typename T>
v1::ComputeGradientsRequest GraphRequest(const eg::GraphSpec& spec,
                                         const std::vector<std::vector<int64_t>>& input_shapes,
                                         uint32_t seed = 1, int64_t int_range = 2,
                                         double scale = 1.0) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> uniform(-1, 1);
  std::normal_distribution<double> normal(0, 1);
  v1::ComputeGradientsRequest request;
  *request.mutable_model() = service::GraphSpecToModel(spec, DTypeOf<T>());
  for (const eg::ParameterSpec& p : spec.parameters) {
    int64_t n = 1;
    for (int64_t d : p.shape) n *= d;
    std::vector<T> values(n);
    for (T& v : values) v = static_cast<T>(scale * uniform(rng));
    v1::NamedTensor* named = request.add_named_parameters();
    named->set_name(p.name);
    SetTensor<T>(named->mutable_tensor(), values, p.shape);
  }
  for (size_t i = 0; i < spec.inputs.size(); ++i) {
    int64_t n = 1;
    for (int64_t d : input_shapes[i]) n *= d;
    v1::NamedTensor* named = request.add_graph_inputs();
    named->set_name(spec.inputs[i].name);
    if (spec.inputs[i].dtype == eg::DType::kInt64) {
      std::uniform_int_distribution<int64_t> pick(0, int_range - 1);
      std::vector<int64_t> values(n);
      for (int64_t& v : values) v = pick(rng);
      SetTensor<int64_t>(named->mutable_tensor(), values, input_shapes[i]);
    } else {
      std::vector<T> values(n);
      for (T& v : values) v = static_cast<T>(normal(rng));
      SetTensor<T>(named->mutable_tensor(), values, input_shapes[i]);
    }
  }
  return request;
}

// The graph form of SeedRequest: x [8, 4] -> Gemm(4 -> 2, transB) -> Relu -> MSE against
// "targets" [8, 2], parameters "0.weight" and "0.bias" (nn.Sequential's names).
template <typename T>
v1::ComputeGradientsRequest GraphSeedRequest(uint32_t seed = 1) {
  const v1::ComputeGradientsRequest chain = SeedRequest<T>(seed);
  v1::ComputeGradientsRequest request;
  v1::Graph* g = request.mutable_model()->mutable_graph();
  request.mutable_model()->mutable_loss()->mutable_mse();
  v1::GraphInput* x = g->add_inputs();
  x->set_name("input");
  x->set_dtype(DTypeOf<T>());
  v1::GraphInput* y = g->add_inputs();
  y->set_name("targets");
  y->set_dtype(DTypeOf<T>());
  v1::GraphParameter* w = g->add_parameters();
  w->set_name("0.weight");
  w->add_shape(2);
  w->add_shape(4);
  v1::GraphParameter* b = g->add_parameters();
  b->set_name("0.bias");
  b->add_shape(2);
  v1::Node* gemm = g->add_nodes();
  gemm->set_name("fc");
  gemm->set_op_type("Gemm");
  for (const char* in : {"input", "0.weight", "0.bias"}) gemm->add_inputs(in);
  gemm->add_outputs("0");
  v1::Attribute* trans = gemm->add_attributes();
  trans->set_name("transB");
  trans->set_i(1);
  v1::Node* relu = g->add_nodes();
  relu->set_name("act");
  relu->set_op_type("Relu");
  relu->add_inputs("0");
  relu->add_outputs("output");
  g->add_outputs("output");
  g->set_loss_output("output");
  g->set_loss_target("targets");
  auto named = [](v1::NamedTensor* out, const char* name, const v1::Tensor& t) {
    out->set_name(name);
    *out->mutable_tensor() = t;
  };
  named(request.add_named_parameters(), "0.weight", chain.parameters(0).weight());
  named(request.add_named_parameters(), "0.bias", chain.parameters(0).bias());
  named(request.add_graph_inputs(), "input", chain.inputs());
  named(request.add_graph_inputs(), "targets", chain.targets());
  return request;
}

}  // namespace gradserve::testing

#endif  // GRADSERVE_TESTS_SERVICE_GRAPH_TEST_REQUESTS_H_
