// One SGD step on a 2-layer MLP whose gradients come from a gradserve server.
//   train_step [HOST:PORT]
#include <cstdio>
#include <random>

#include "gradserve/client.h"

namespace gc = gradserve::client;

int main(int argc, char** argv) {
  const std::string target = argc > 1 ? argv[1] : "127.0.0.1:50051";
  gc::GradientClient client(gc::CreateChannel(target));

  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 0.5f);
  auto random = [&](int rows, int cols) {
    gc::RowMajorMatrix<float> m(rows, cols);
    for (int i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
    return m;
  };
  gc::RowMajorMatrix<float> w1 = random(16, 4), w2 = random(3, 16);
  std::vector<float> b1(16, 0.f), b2(3, 0.f);
  const gc::RowMajorMatrix<float> x = random(32, 4);
  std::vector<int64_t> labels(32);
  for (int i = 0; i < 32; ++i) labels[i] = i % 3;

  for (int step = 0; step < 5; ++step) {
    gradserve::v1::ComputeGradientsRequest request;
    *request.mutable_model() =
        gc::ModelBuilder().Linear(4, 16).ReLU().Linear(16, 3).CrossEntropy().Build();
    gc::AddLinearParameters(w1, b1, &request);
    gc::AddLinearParameters(w2, b2, &request);
    *request.mutable_inputs() = gc::ToTensor(x);
    *request.mutable_targets() = gc::ToTensor(labels);
    gradserve::v1::ComputeGradientsResponse response;
    const grpc::Status status = client.ComputeGradients(request, &response);
    if (!status.ok()) {
      std::fprintf(stderr, "ComputeGradients: %s\n", status.error_message().c_str());
      return 1;
    }
    std::printf("step %d loss %.6f\n", step, response.loss());
    // SGD, lr 0.5: the optimizer lives with the caller.
    w1 -= 0.5f * *gc::ToMatrix<float>(response.gradients(0).weight());
    w2 -= 0.5f * *gc::ToMatrix<float>(response.gradients(1).weight());
    const auto db1 = *gc::ToMatrix<float>(response.gradients(0).bias());
    const auto db2 = *gc::ToMatrix<float>(response.gradients(1).bias());
    for (int i = 0; i < 16; ++i) b1[i] -= 0.5f * db1(0, i);
    for (int i = 0; i < 3; ++i) b2[i] -= 0.5f * db2(0, i);
  }
  return 0;
}
