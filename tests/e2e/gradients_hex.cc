// The C++ client's side of the cross-language test (tests/e2e/cross_language.py): one fixed
// ComputeGradients request, in float64 and in float32, sent with gradserve::client, and the
// answer's raw bytes printed as hex in the format client/node/bin/gradients-hex.js defines
// (its header is the specification: the model, the data formula and the line format).
//
//   gradients_hex --target 127.0.0.1:50051
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "gradserve/client.h"

namespace {

namespace v1 = ::gradserve::v1;
using gradserve::client::RowMajorMatrix;

constexpr int kBatch = 5;
constexpr int kLayers[3][2] = {{4, 8}, {8, 8}, {8, 3}};  // {in, out}

// value(s, i) = ((37 i + 11 s) mod 101) / 50 - 1: exact integers, then one correctly rounded
// float64 division and subtraction, rounded once more to T for float32.
template <typename T>
RowMajorMatrix<T> Filled(int salt, int64_t rows, int64_t cols) {
  RowMajorMatrix<T> m(rows, cols);
  for (int64_t i = 0; i < m.size(); ++i) {
    const double v = static_cast<double>((37 * i + 11 * salt) % 101) / 50.0 - 1.0;
    m.data()[i] = static_cast<T>(v);
  }
  return m;
}

template <typename T>
v1::ComputeGradientsRequest Request() {
  v1::ComputeGradientsRequest request;
  *request.mutable_model() = gradserve::client::ModelBuilder()
                                 .Linear(4, 8)
                                 .Tanh()
                                 .Linear(8, 8)
                                 .ReLU()
                                 .Linear(8, 3)
                                 .Mse(v1::REDUCTION_MEAN)
                                 .Build();
  for (int k = 0; k < 3; ++k) {
    const int in = kLayers[k][0], out = kLayers[k][1];
    const RowMajorMatrix<T> bias = Filled<T>(3 + 2 * k, 1, out);
    gradserve::client::AddLinearParameters<T>(
        Filled<T>(2 + 2 * k, out, in), std::vector<T>(bias.data(), bias.data() + out), &request);
  }
  *request.mutable_inputs() = gradserve::client::ToTensor(Filled<T>(0, kBatch, 4));
  *request.mutable_targets() = gradserve::client::ToTensor(Filled<T>(1, kBatch, 3));
  request.mutable_options()->set_return_input_gradient(true);
  return request;
}

std::string Hex(const std::string& bytes) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

void PrintLine(const char* kase, const std::string& name, const v1::Tensor& tensor) {
  std::string shape;
  for (int i = 0; i < tensor.shape_size(); ++i) {
    shape += (i ? "x" : "") + std::to_string(tensor.shape(i));
  }
  std::printf("%s %s %s %s %s\n", kase, name.c_str(), v1::DType_Name(tensor.dtype()).c_str(),
              shape.c_str(), Hex(tensor.data()).c_str());
}

template <typename T>
bool Run(gradserve::client::GradientClient& client, const char* kase) {
  v1::ComputeGradientsResponse response;
  const grpc::Status status = client.ComputeGradients(Request<T>(), &response);
  if (!status.ok()) {
    std::fprintf(stderr, "gradients_hex: %s ComputeGradients: %s\n", kase,
                 status.error_message().c_str());
    return false;
  }
  // The loss as the 8 little-endian bytes of a double (this test runs on x86-64, little-endian).
  v1::Tensor loss;
  loss.set_dtype(v1::DTYPE_FLOAT64);
  loss.add_shape(1);
  const double value = response.loss();
  loss.set_data(reinterpret_cast<const char*>(&value), sizeof value);
  PrintLine(kase, "loss", loss);
  for (int k = 0; k < response.gradients_size(); ++k) {
    PrintLine(kase, "gradients[" + std::to_string(k) + "].weight", response.gradients(k).weight());
    PrintLine(kase, "gradients[" + std::to_string(k) + "].bias", response.gradients(k).bias());
  }
  PrintLine(kase, "input_gradient", response.input_gradient());
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || std::strcmp(argv[1], "--target") != 0) {
    std::fprintf(stderr, "usage: %s --target HOST:PORT\n", argv[0]);
    return 2;
  }
  gradserve::client::GradientClient client(gradserve::client::CreateChannel(argv[2]));
  return Run<double>(client, "float64") && Run<float>(client, "float32") ? 0 : 1;
}
