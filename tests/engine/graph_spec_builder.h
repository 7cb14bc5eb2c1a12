// GraphSpec building for tests and benchmarks (no test framework here, so that
// bench/engine_bench.cc can build the same models as the tests: tests/engine/graph_test_models.h).
#ifndef GRADSERVE_TESTS_ENGINE_GRAPH_SPEC_BUILDER_H_
#define GRADSERVE_TESTS_ENGINE_GRAPH_SPEC_BUILDER_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "server/engine/graph/spec.h"

namespace gradserve::engine::graph::testing {

// Builds a GraphSpec in a few lines.
class SpecBuilder {
 public:
  SpecBuilder& Input(const std::string& name, DType dtype = DType::kFloat64) {
    spec_.inputs.push_back({name, dtype});
    return *this;
  }
  SpecBuilder& Param(const std::string& name, Shape shape) {
    spec_.parameters.push_back({name, std::move(shape)});
    return *this;
  }
  SpecBuilder& Floats(const std::string& name, Shape shape, std::vector<double> data) {
    spec_.constants.push_back({name, DType::kFloat64, std::move(shape), std::move(data), {}});
    return *this;
  }
  SpecBuilder& Ints(const std::string& name, Shape shape, std::vector<int64_t> data,
                    DType dtype = DType::kInt64) {
    spec_.constants.push_back({name, dtype, std::move(shape), {}, std::move(data)});
    return *this;
  }
  SpecBuilder& Node(const std::string& op, std::vector<std::string> inputs,
                    std::vector<std::string> outputs, std::vector<AttributeSpec> attributes = {},
                    std::string name = "") {
    NodeSpec node;
    node.name = name.empty() ? outputs.at(0) : name;
    node.op_type = op;
    node.inputs = std::move(inputs);
    node.outputs = std::move(outputs);
    node.attributes = std::move(attributes);
    spec_.nodes.push_back(std::move(node));
    return *this;
  }
  // Output `output`, loss = sum(output * w) with a float input "w" (the external loss).
  GraphSpec WeightedSum(const std::string& output) {
    spec_.inputs.push_back({"w", DType::kFloat64});
    spec_.outputs = {output};
    spec_.loss.kind = LossKind::kExternal;
    spec_.loss.output = output;
    spec_.loss.target = "w";
    return spec_;
  }
  GraphSpec WithLoss(const std::string& output, LossKind kind, const std::string& target,
                     Reduction reduction = Reduction::kMean, int64_t ignore_index = -100) {
    spec_.outputs = {output};
    spec_.loss.kind = kind;
    spec_.loss.reduction = reduction;
    spec_.loss.output = output;
    spec_.loss.target = target;
    spec_.loss.ignore_index = ignore_index;
    return spec_;
  }
  GraphSpec& spec() { return spec_; }

 private:
  GraphSpec spec_;
};

}  // namespace gradserve::engine::graph::testing

#endif  // GRADSERVE_TESTS_ENGINE_GRAPH_SPEC_BUILDER_H_
