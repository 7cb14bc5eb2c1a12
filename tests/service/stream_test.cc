// StreamGradients: a training loop on one stream answers exactly as the same loop of unary
// calls; micro-batches accumulate to the whole batch's gradients; chunked tensors arrive whole;
// every protocol error ends the stream with a status naming the message and the field.
#include "server/service/stream.h"

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <cmath>
#include <cstring>
#include <random>

#include "gradserve/client.h"
#include "gradserve/v1/gradserve.grpc.pb.h"
#include "server/service/compute.h"
#include "server/service/server.h"
#include "tests/service/test_requests.h"

namespace gradserve {
namespace {

using testing::DTypeOf;
using ::testing::HasSubstr;
using testing::RandomValues;
using testing::SetTensor;
namespace v1 = ::gradserve::v1;

template <typename T>
std::vector<T> Values(const v1::Tensor& tensor) {
  std::vector<T> values(tensor.data().size() / sizeof(T));
  std::memcpy(values.data(), tensor.data().data(), tensor.data().size());
  return values;
}

// A small classifier: 12 -> 16 tanh -> 16 relu -> 5, cross-entropy (or MSE on 5 outputs).
v1::Model Classifier(bool cross_entropy, v1::Reduction reduction) {
  v1::Model model;
  const int widths[] = {12, 16, 16, 5};
  for (int l = 0; l < 3; ++l) {
    v1::Linear* linear = model.add_layers()->mutable_linear();
    linear->set_in_features(widths[l]);
    linear->set_out_features(widths[l + 1]);
    if (l == 0) model.add_layers()->mutable_tanh();
    if (l == 1) model.add_layers()->mutable_relu();
  }
  if (cross_entropy) {
    model.mutable_loss()->mutable_cross_entropy();
  } else {
    model.mutable_loss()->mutable_mse();
  }
  model.mutable_loss()->set_reduction(reduction);
  return model;
}

template <typename T>
void RandomParameters(const v1::Model& model, std::mt19937& rng,
                      google::protobuf::RepeatedPtrField<v1::LinearParameters>* params) {
  params->Clear();
  for (const v1::Layer& layer : model.layers()) {
    if (!layer.has_linear()) continue;
    const int64_t in = layer.linear().in_features(), out = layer.linear().out_features();
    v1::LinearParameters* p = params->Add();
    std::vector<T> weight = RandomValues<T>(in * out, rng);
    for (T& w : weight) w = static_cast<T>(w / std::sqrt(static_cast<T>(in)));
    SetTensor<T>(p->mutable_weight(), weight, {out, in});
    SetTensor<T>(p->mutable_bias(), RandomValues<T>(out, rng), {out});
  }
}

// Inputs [batch, 12] and targets for Classifier.
template <typename T>
void RandomBatch(bool cross_entropy, int64_t batch, std::mt19937& rng, v1::Tensor* inputs,
                 v1::Tensor* targets) {
  SetTensor<T>(inputs, RandomValues<T>(batch * 12, rng), {batch, 12});
  if (cross_entropy) {
    std::vector<int64_t> classes(batch);
    for (int64_t& c : classes) c = std::uniform_int_distribution<int64_t>(0, 4)(rng);
    SetTensor<int64_t>(targets, classes, {batch});
  } else {
    SetTensor<T>(targets, RandomValues<T>(batch * 5, rng), {batch, 5});
  }
}

v1::StreamGradientsRequest SetupMessage(const v1::Model& model, v1::DType dtype,
                                        const v1::ComputeOptions& options = {}) {
  v1::StreamGradientsRequest message;
  *message.mutable_setup()->mutable_model() = model;
  message.mutable_setup()->set_dtype(dtype);
  *message.mutable_setup()->mutable_options() = options;
  return message;
}

class StreamTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    spdlog::set_level(spdlog::level::warn);
    service::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.service.threads = 2;
    options.service.limits.max_message_bytes = 64 << 10;
    options.service.limits.max_stream_bytes = 4 << 20;
    options.service.limits.max_streams = 4;
    auto server = service::GradServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override { stub_ = v1::GradientService::NewStub(server_->InProcessChannel()); }

  static grpc::ClientContext* NewContext(std::unique_ptr<grpc::ClientContext>* holder) {
    *holder = std::make_unique<grpc::ClientContext>();
    (*holder)->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    return holder->get();
  }

  static service::GradServer* server_;
  std::unique_ptr<v1::GradientService::Stub> stub_;
};

service::GradServer* StreamTest::server_ = nullptr;

// The test: a 100-step SGD loop on one stream, sending only the update after the first
// step, answers bit-identically to 100 unary calls that send everything each time.
TEST_F(StreamTest, HundredStepsOnOneStreamEqualHundredUnaryCalls) {
  using T = float;
  const v1::Model model = Classifier(/*cross_entropy=*/true, v1::REDUCTION_MEAN);
  v1::ComputeOptions options;
  options.set_return_input_gradient(true);
  std::mt19937 rng(7);
  v1::ComputeGradientsRequest unary;  // The caller's own copy of everything.
  *unary.mutable_model() = model;
  *unary.mutable_options() = options;
  RandomParameters<T>(model, rng, unary.mutable_parameters());

  std::unique_ptr<grpc::ClientContext> context;
  auto stream = stub_->StreamGradients(NewContext(&context));
  ASSERT_TRUE(stream->Write(SetupMessage(model, DTypeOf<T>(), options)));
  const T learning_rate = 0.05f;
  google::protobuf::RepeatedPtrField<v1::LinearParameters> pending_update;
  double first_loss = 0, last_loss = 0;
  for (int step = 0; step < 100; ++step) {
    v1::StreamGradientsRequest message;
    v1::StreamStep* stream_step = message.mutable_step();
    RandomBatch<T>(true, 16, rng, unary.mutable_inputs(), unary.mutable_targets());
    *stream_step->mutable_inputs() = unary.inputs();
    *stream_step->mutable_targets() = unary.targets();
    if (step == 0) {
      *stream_step->mutable_parameters() = unary.parameters();
    } else {
      *stream_step->mutable_parameter_update() = pending_update;
    }
    v1::ComputeGradientsResponse expected;
    {
      grpc::ClientContext unary_context;
      ASSERT_TRUE(stub_->ComputeGradients(&unary_context, unary, &expected).ok());
    }
    ASSERT_TRUE(stream->Write(message));
    v1::StreamGradientsResponse answer;
    ASSERT_TRUE(stream->Read(&answer)) << "step " << step;
    EXPECT_EQ(answer.step_index(), step);
    EXPECT_EQ(answer.micro_batches(), 1);
    const v1::ComputeGradientsResponse& got = answer.result();
    ASSERT_EQ(got.loss(), expected.loss()) << "step " << step;
    ASSERT_EQ(got.gradients_size(), expected.gradients_size());
    for (int l = 0; l < got.gradients_size(); ++l) {
      ASSERT_EQ(got.gradients(l).weight().data(), expected.gradients(l).weight().data())
          << "step " << step << " layer " << l;
      ASSERT_EQ(got.gradients(l).bias().data(), expected.gradients(l).bias().data());
    }
    ASSERT_EQ(got.input_gradient().data(), expected.input_gradient().data());
    ASSERT_EQ(got.diagnostics_size(), expected.diagnostics_size());
    for (int i = 0; i < got.diagnostics_size(); ++i) {
      EXPECT_EQ(got.diagnostics(i).output_grad_norm(), expected.diagnostics(i).output_grad_norm());
    }
    if (step == 0) first_loss = got.loss();
    last_loss = got.loss();

    // SGD on the caller's copy; the stream gets the same step as an update with the next batch.
    pending_update.Clear();
    for (int l = 0; l < got.gradients_size(); ++l) {
      v1::LinearParameters* held = unary.mutable_parameters(l);
      v1::LinearParameters* update = pending_update.Add();
      for (const bool bias : {false, true}) {
        const v1::Tensor& grad = bias ? got.gradients(l).bias() : got.gradients(l).weight();
        v1::Tensor* param = bias ? held->mutable_bias() : held->mutable_weight();
        std::vector<T> delta = Values<T>(grad), values = Values<T>(*param);
        for (size_t i = 0; i < delta.size(); ++i) {
          delta[i] = -learning_rate * delta[i];
          values[i] = values[i] + delta[i];
        }
        const std::vector<int64_t> shape(param->shape().begin(), param->shape().end());
        SetTensor<T>(param, values, shape);
        SetTensor<T>(bias ? update->mutable_bias() : update->mutable_weight(), delta, shape);
      }
    }
  }
  ASSERT_TRUE(stream->WritesDone());
  const grpc::Status status = stream->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  // The parameters really moved (the loop trained something), so the updates were applied.
  EXPECT_NE(first_loss, last_loss);
}

// Micro-batches of 5, 3 and 8 examples answer as one call on the 16 examples, for both
// reductions and both kinds of target, in float64 to rounding.
TEST_F(StreamTest, AccumulatedMicroBatchesEqualOneCallOnTheWholeBatch) {
  using T = double;
  for (const bool cross_entropy : {true, false}) {
    for (const v1::Reduction reduction : {v1::REDUCTION_MEAN, v1::REDUCTION_SUM}) {
      SCOPED_TRACE(::testing::Message() << "cross_entropy=" << cross_entropy
                                        << " reduction=" << v1::Reduction_Name(reduction));
      const v1::Model model = Classifier(cross_entropy, reduction);
      v1::ComputeOptions options;
      options.set_return_input_gradient(true);
      options.set_return_output(true);
      std::mt19937 rng(11);
      v1::ComputeGradientsRequest whole;
      *whole.mutable_model() = model;
      *whole.mutable_options() = options;
      RandomParameters<T>(model, rng, whole.mutable_parameters());
      RandomBatch<T>(cross_entropy, 16, rng, whole.mutable_inputs(), whole.mutable_targets());
      v1::ComputeGradientsResponse expected;
      {
        grpc::ClientContext unary_context;
        ASSERT_TRUE(stub_->ComputeGradients(&unary_context, whole, &expected).ok());
      }

      std::unique_ptr<grpc::ClientContext> context;
      auto stream = stub_->StreamGradients(NewContext(&context));
      ASSERT_TRUE(stream->Write(SetupMessage(model, DTypeOf<T>(), options)));
      const std::vector<T> inputs = Values<T>(whole.inputs());
      const int64_t target_width = cross_entropy ? 1 : 5;
      int64_t row = 0;
      const int64_t sizes[] = {5, 3, 8};
      for (int m = 0; m < 3; ++m) {
        v1::StreamGradientsRequest message;
        v1::StreamStep* step = message.mutable_step();
        if (m == 0) *step->mutable_parameters() = whole.parameters();
        const int64_t n = sizes[m];
        SetTensor<T>(step->mutable_inputs(),
                     std::vector<T>(inputs.begin() + row * 12, inputs.begin() + (row + n) * 12),
                     {n, 12});
        if (cross_entropy) {
          const std::vector<int64_t> classes = Values<int64_t>(whole.targets());
          SetTensor<int64_t>(step->mutable_targets(),
                             std::vector<int64_t>(classes.begin() + row, classes.begin() + row + n),
                             {n});
        } else {
          const std::vector<T> targets = Values<T>(whole.targets());
          SetTensor<T>(step->mutable_targets(),
                       std::vector<T>(targets.begin() + row * target_width,
                                      targets.begin() + (row + n) * target_width),
                       {n, 5});
        }
        step->set_accumulate(m < 2);
        row += n;
        ASSERT_TRUE(stream->Write(message));
      }
      v1::StreamGradientsResponse answer;
      ASSERT_TRUE(stream->Read(&answer));
      EXPECT_EQ(answer.step_index(), 2);
      EXPECT_EQ(answer.micro_batches(), 3);
      const v1::ComputeGradientsResponse& got = answer.result();
      EXPECT_EQ(got.stats().num_examples(), 16);
      EXPECT_NEAR(got.loss(), expected.loss(), 1e-12 * std::abs(expected.loss()));
      auto expect_close = [](const v1::Tensor& a, const v1::Tensor& b, const char* what) {
        ASSERT_EQ(a.shape_size(), b.shape_size()) << what;
        for (int d = 0; d < a.shape_size(); ++d) EXPECT_EQ(a.shape(d), b.shape(d)) << what;
        const std::vector<T> x = Values<T>(a), y = Values<T>(b);
        ASSERT_EQ(x.size(), y.size()) << what;
        for (size_t i = 0; i < x.size(); ++i) {
          ASSERT_NEAR(x[i], y[i], 1e-12 * (1 + std::abs(y[i]))) << what << " [" << i << "]";
        }
      };
      for (int l = 0; l < got.gradients_size(); ++l) {
        expect_close(got.gradients(l).weight(), expected.gradients(l).weight(), "weight");
        expect_close(got.gradients(l).bias(), expected.gradients(l).bias(), "bias");
      }
      expect_close(got.input_gradient(), expected.input_gradient(), "input_gradient");
      expect_close(got.output(), expected.output(), "output");
      for (int i = 0; i < got.diagnostics_size(); ++i) {
        const v1::LayerDiagnostics &a = got.diagnostics(i), &b = expected.diagnostics(i);
        // Combining micro-batches keeps which norms are present (Note [Diagnostics rule]).
        EXPECT_EQ(a.has_weight_grad_norm(), b.has_weight_grad_norm()) << i;
        EXPECT_EQ(a.has_bias_grad_norm(), b.has_bias_grad_norm()) << i;
        EXPECT_EQ(a.has_output_grad_norm(), b.has_output_grad_norm()) << i;
        EXPECT_NEAR(a.weight_grad_norm(), b.weight_grad_norm(), 1e-10 * (1 + b.weight_grad_norm()));
        EXPECT_NEAR(a.output_grad_norm(), b.output_grad_norm(), 1e-10 * (1 + b.output_grad_norm()));
        EXPECT_NEAR(a.activation_norm(), b.activation_norm(), 1e-10 * (1 + b.activation_norm()));
      }
      ASSERT_TRUE(stream->WritesDone());
      EXPECT_TRUE(stream->Finish().ok());
    }
  }
}

// This server takes messages of at most 64 KiB; a 300x128 float64 batch (300 KiB) and a 16x128
// weight arrive in 10000-byte chunks and give what one in-process call with everything in one
// message gives. (Answers are not chunked: the gradients here fit a message.)
TEST_F(StreamTest, TensorsLargerThanAMessageArriveInChunks) {
  using T = double;
  v1::Model model;
  v1::Linear* linear = model.add_layers()->mutable_linear();
  linear->set_in_features(128);
  linear->set_out_features(16);
  model.add_layers()->mutable_gelu();
  linear = model.add_layers()->mutable_linear();
  linear->set_in_features(16);
  linear->set_out_features(2);
  model.mutable_loss()->mutable_mse();
  std::mt19937 rng(3);
  v1::ComputeGradientsRequest whole;
  *whole.mutable_model() = model;
  RandomParameters<T>(model, rng, whole.mutable_parameters());
  SetTensor<T>(whole.mutable_inputs(), RandomValues<T>(300 * 128, rng), {300, 128});
  SetTensor<T>(whole.mutable_targets(), RandomValues<T>(300 * 2, rng), {300, 2});
  ASSERT_GT(whole.inputs().data().size(), size_t{64} << 10);
  v1::ComputeGradientsResponse expected;
  ASSERT_TRUE(service::ComputeGradients(whole, service::ServiceLimits(), service::ComputeContext(),
                                        &expected)
                  .ok());

  std::unique_ptr<grpc::ClientContext> context;
  auto stream = stub_->StreamGradients(NewContext(&context));
  ASSERT_TRUE(stream->Write(SetupMessage(model, DTypeOf<T>())));
  auto send_chunks = [&](const std::string& field, const v1::Tensor& tensor) {
    const std::string& data = tensor.data();
    for (size_t offset = 0; offset < data.size(); offset += 10000) {
      v1::StreamGradientsRequest message;
      v1::TensorChunk* chunk = message.mutable_chunk();
      chunk->set_field(field);
      if (offset == 0) {
        chunk->set_dtype(tensor.dtype());
        *chunk->mutable_shape() = tensor.shape();
      }
      chunk->set_data(data.substr(offset, 10000));
      ASSERT_TRUE(stream->Write(message));
    }
  };
  send_chunks("parameters[0].weight", whole.parameters(0).weight());
  send_chunks("inputs", whole.inputs());
  v1::StreamGradientsRequest message;
  v1::StreamStep* step = message.mutable_step();
  // parameters[0].bias and parameters[1] travel in the step itself; the chunked weight fills
  // the hole left in parameters[0].
  *step->mutable_parameters() = whole.parameters();
  step->mutable_parameters(0)->clear_weight();
  *step->mutable_targets() = whole.targets();
  ASSERT_TRUE(stream->Write(message));
  v1::StreamGradientsResponse answer;
  ASSERT_TRUE(stream->Read(&answer));
  EXPECT_EQ(answer.result().loss(), expected.loss());
  for (int l = 0; l < 2; ++l) {
    EXPECT_EQ(answer.result().gradients(l).weight().data(), expected.gradients(l).weight().data());
    EXPECT_EQ(answer.result().gradients(l).bias().data(), expected.gradients(l).bias().data());
  }
  ASSERT_TRUE(stream->WritesDone());
  EXPECT_TRUE(stream->Finish().ok());
}

// The C++ client's GradientStream chunks what does not fit a message by itself, and reports the
// server's status once a step fails.
TEST_F(StreamTest, ClientLibraryChunksLargeTensorsAndReportsErrors) {
  using T = double;
  const v1::Model model = Classifier(/*cross_entropy=*/false, v1::REDUCTION_MEAN);
  std::mt19937 rng(9);
  v1::ComputeGradientsRequest whole;
  *whole.mutable_model() = model;
  RandomParameters<T>(model, rng, whole.mutable_parameters());
  RandomBatch<T>(false, 2000, rng, whole.mutable_inputs(), whole.mutable_targets());
  ASSERT_GT(whole.inputs().data().size(), size_t{64} << 10);  // Over this server's limit.
  v1::ComputeGradientsResponse expected;
  ASSERT_TRUE(service::ComputeGradients(whole, service::ServiceLimits(), service::ComputeContext(),
                                        &expected)
                  .ok());

  client::GradientClient gradient_client(server_->InProcessChannel());
  v1::StreamSetup setup;
  *setup.mutable_model() = model;
  setup.set_dtype(v1::DTYPE_FLOAT64);
  auto stream = gradient_client.OpenStream(setup, std::chrono::seconds(60), /*chunk_bytes=*/16000);
  v1::StreamStep step;
  *step.mutable_parameters() = whole.parameters();
  *step.mutable_inputs() = whole.inputs();
  *step.mutable_targets() = whole.targets();
  v1::StreamGradientsResponse answer;
  grpc::Status status = stream->Step(step, &answer);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(answer.result().loss(), expected.loss());
  EXPECT_EQ(answer.result().gradients(0).weight().data(), expected.gradients(0).weight().data());

  step.clear_parameters();
  step.mutable_inputs()->set_shape(1, 11);  // Wrong width: the stream ends.
  status = stream->Step(step, &answer);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("inputs"));
  EXPECT_EQ(stream->Step(step, &answer).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

// An error ends the stream with a status naming the message and the field; the server goes on
// serving other streams.
TEST_F(StreamTest, ProtocolErrorEndsTheStreamWithItsStatus) {
  std::unique_ptr<grpc::ClientContext> context;
  auto stream = stub_->StreamGradients(NewContext(&context));
  v1::StreamGradientsRequest message;
  message.mutable_step();
  ASSERT_TRUE(stream->Write(message));
  v1::StreamGradientsResponse answer;
  EXPECT_FALSE(stream->Read(&answer));
  const grpc::Status status = stream->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("message 0 (step)"));
  EXPECT_THAT(status.error_message(), HasSubstr("must be setup"));

  // A fresh stream works.
  auto again = stub_->StreamGradients(NewContext(&context));
  ASSERT_TRUE(again->Write(SetupMessage(Classifier(true, v1::REDUCTION_MEAN), v1::DTYPE_FLOAT32)));
  ASSERT_TRUE(again->WritesDone());
  EXPECT_TRUE(again->Finish().ok());
}

// A stream whose deadline passes while it waits for the client ends DEADLINE_EXCEEDED, is
// counted as such, and no longer counts as open.
TEST_F(StreamTest, IdleStreamPastItsDeadlineIsClosed) {
  const auto count_deadline_exceeded = [] {
    for (const service::MethodSnapshot& m : server_->Stats().methods) {
      if (m.method == "StreamGradients") {
        return m.calls_by_code[static_cast<int>(grpc::StatusCode::DEADLINE_EXCEEDED)];
      }
    }
    return uint64_t{0};
  };
  const uint64_t before = count_deadline_exceeded();
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  auto stream = stub_->StreamGradients(&context);
  ASSERT_TRUE(stream->Write(SetupMessage(Classifier(true, v1::REDUCTION_MEAN), v1::DTYPE_FLOAT32)));
  v1::StreamGradientsResponse answer;
  EXPECT_FALSE(stream->Read(&answer));  // Blocks until the deadline ends the stream.
  EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // The server side ends on its own thread, just after the client sees the status.
  for (int tries = 0;
       tries < 500 && (server_->Stats().open_streams > 0 || count_deadline_exceeded() == before);
       ++tries) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(server_->Stats().open_streams, 0);
  EXPECT_EQ(count_deadline_exceeded(), before + 1);
}

// Past max_streams (4 here) a new stream is refused at once; closing one makes room.
TEST_F(StreamTest, StreamsBeyondTheLimitAreRefused) {
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts(5);
  std::vector<std::unique_ptr<
      grpc::ClientReaderWriter<v1::StreamGradientsRequest, v1::StreamGradientsResponse>>>
      streams;
  const v1::StreamGradientsRequest setup =
      SetupMessage(Classifier(true, v1::REDUCTION_MEAN), v1::DTYPE_FLOAT32);
  for (int i = 0; i < 4; ++i) {
    streams.push_back(stub_->StreamGradients(NewContext(&contexts[i])));
    // A message both ways is not needed to hold a stream open; wait until the server counts it.
    ASSERT_TRUE(streams.back()->Write(setup));
  }
  for (int tries = 0; tries < 500 && server_->Stats().open_streams < 4; ++tries) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(server_->Stats().open_streams, 4);
  auto refused = stub_->StreamGradients(NewContext(&contexts[4]));
  refused->Write(setup);  // May fail: the server may have finished the stream already.
  const grpc::Status status = refused->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(status.error_message(), HasSubstr("max_streams"));
  for (auto& stream : streams) {
    ASSERT_TRUE(stream->WritesDone());
    EXPECT_TRUE(stream->Finish().ok());
  }
}

// The protocol's errors, one message sequence each, straight on the session.
struct ProtocolCase {
  const char* name;
  std::function<std::vector<v1::StreamGradientsRequest>()> messages;
  absl::StatusCode code;
  std::vector<std::string> message_parts;
};

v1::StreamGradientsRequest StepWith(std::function<void(v1::StreamStep*)> fill) {
  v1::StreamGradientsRequest message;
  fill(message.mutable_step());
  return message;
}

v1::StreamGradientsRequest ChunkOf(const std::string& field, v1::DType dtype,
                                   std::vector<int64_t> shape, std::string data) {
  v1::StreamGradientsRequest message;
  message.mutable_chunk()->set_field(field);
  message.mutable_chunk()->set_dtype(dtype);
  for (int64_t dim : shape) message.mutable_chunk()->add_shape(dim);
  message.mutable_chunk()->set_data(std::move(data));
  return message;
}

// A valid first step for Classifier(MSE) in float32, batch 4.
void FillValidStep(v1::StreamStep* step) {
  std::mt19937 rng(5);
  RandomParameters<float>(Classifier(false, v1::REDUCTION_MEAN), rng, step->mutable_parameters());
  RandomBatch<float>(false, 4, rng, step->mutable_inputs(), step->mutable_targets());
}

std::vector<ProtocolCase> ProtocolCases() {
  const v1::Model model = Classifier(false, v1::REDUCTION_MEAN);
  const auto setup = [model] { return SetupMessage(model, v1::DTYPE_FLOAT32); };
  const auto valid = [] { return StepWith(FillValidStep); };
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  return {
      {"step before setup",
       [=] { return std::vector{valid()}; },
       kInvalid,
       {"message 0 (step)", "must be setup"}},
      {"empty message",
       [=] {
         return std::vector{setup(), v1::StreamGradientsRequest()};
       },
       kInvalid,
       {"message 1 (empty)", "expected setup, step or chunk"}},
      {"second setup",
       [=] {
         return std::vector{setup(), setup()};
       },
       kInvalid,
       {"message 1 (setup)", "only the first message"}},
      {"setup without dtype",
       [=] { return std::vector{SetupMessage(model, v1::DTYPE_UNSPECIFIED)}; },
       kInvalid,
       {"message 0 (setup)", "setup.dtype"}},
      {"setup with widths that do not chain",
       [=] {
         v1::Model bad = model;
         bad.mutable_layers(2)->mutable_linear()->set_in_features(15);
         return std::vector{SetupMessage(bad, v1::DTYPE_FLOAT32)};
       },
       kInvalid,
       {"message 0 (setup)", "model.layers[2]"}},
      {"first step without parameters",
       [=] {
         return std::vector{setup(), StepWith([](v1::StreamStep* s) {
                              FillValidStep(s);
                              s->clear_parameters();
                            })};
       },
       kInvalid,
       {"message 1 (step)", "parameters: required on the stream's first step"}},
      {"update before any parameters",
       [=] {
         return std::vector{setup(), StepWith([](v1::StreamStep* s) {
                              FillValidStep(s);
                              s->mutable_parameter_update()->Swap(s->mutable_parameters());
                            })};
       },
       kInvalid,
       {"message 1 (step)", "parameter_update", "holds no parameters"}},
      {"parameters and update together",
       [=] {
         return std::vector{setup(), StepWith([](v1::StreamStep* s) {
                              FillValidStep(s);
                              *s->mutable_parameter_update() = s->parameters();
                            })};
       },
       kInvalid,
       {"parameter_update: not together with parameters"}},
      {"update of the wrong shape",
       [=] {
         return std::vector{setup(), valid(), StepWith([](v1::StreamStep* s) {
                              FillValidStep(s);
                              s->mutable_parameter_update()->Swap(s->mutable_parameters());
                              s->mutable_parameter_update(1)->mutable_weight()->set_shape(0, 15);
                            })};
       },
       kInvalid,
       {"message 2 (step)", "parameter_update[1].weight"}},
      {"non-finite update",
       [=] {
         return std::vector{
             setup(), valid(), StepWith([](v1::StreamStep* s) {
               FillValidStep(s);
               s->mutable_parameter_update()->Swap(s->mutable_parameters());
               const float nan = std::nanf("");
               std::memcpy(s->mutable_parameter_update(2)->mutable_bias()->mutable_data()->data(),
                           &nan, sizeof nan);
             })};
       },
       kInvalid,
       {"parameter_update[2].bias.data", "non-finite"}},
      {"new parameters during an accumulation",
       [=] {
         return std::vector{setup(), StepWith([](v1::StreamStep* s) {
                              FillValidStep(s);
                              s->set_accumulate(true);
                            }),
                            valid()};
       },
       kInvalid,
       {"message 2 (step)", "cannot change during an accumulation"}},
      {"inputs of another dtype",
       [=] {
         return std::vector{setup(), StepWith([](v1::StreamStep* s) {
                              FillValidStep(s);
                              s->mutable_inputs()->set_dtype(v1::DTYPE_FLOAT64);
                            })};
       },
       kInvalid,
       {"inputs.dtype", "the stream's dtype"}},
      {"a step's own validation",
       [=] {
         return std::vector{setup(), StepWith([](v1::StreamStep* s) {
                              FillValidStep(s);
                              s->mutable_targets()->set_shape(1, 4);
                            })};
       },
       kInvalid,
       {"message 1 (step)", "targets.shape"}},
      {"chunk of an unknown field",
       [=] {
         return std::vector{setup(), ChunkOf("weights", v1::DTYPE_FLOAT32, {1}, "abcd")};
       },
       kInvalid,
       {"message 1 (chunk)", "chunk.field"}},
      {"chunk of a layer the model does not have",
       [=] {
         return std::vector{setup(),
                            ChunkOf("parameters[3].weight", v1::DTYPE_FLOAT32, {1}, "abcd")};
       },
       kInvalid,
       {"chunk.field", "i < 3"}},
      {"first chunk without a shape",
       [=] {
         return std::vector{setup(), ChunkOf("inputs", v1::DTYPE_FLOAT32, {}, "abcd")};
       },
       kInvalid,
       {"chunk \"inputs\".shape"}},
      {"later chunk that sets a shape again",
       [=] {
         return std::vector{setup(), ChunkOf("inputs", v1::DTYPE_FLOAT32, {4, 12}, "abcd"),
                            ChunkOf("inputs", v1::DTYPE_FLOAT32, {4, 12}, "abcd")};
       },
       kInvalid,
       {"message 2 (chunk)", "only the first chunk"}},
      {"chunks with more bytes than the shape",
       [=] {
         return std::vector{setup(), ChunkOf("inputs", v1::DTYPE_FLOAT32, {1, 2}, "abcdef"),
                            ChunkOf("inputs", v1::DTYPE_UNSPECIFIED, {}, "ghij")};
       },
       kInvalid,
       {"message 2 (chunk)", "more bytes than the shape holds"}},
      {"step with an incomplete chunked tensor",
       [=] {
         return std::vector{setup(), ChunkOf("inputs", v1::DTYPE_FLOAT32, {4, 12}, "abcd"),
                            StepWith([](v1::StreamStep* s) {
                              FillValidStep(s);
                              s->clear_inputs();
                            })};
       },
       kInvalid,
       {"message 2 (step)", "incomplete: 4 of 192 bytes"}},
      {"field sent both in chunks and in the step",
       [=] {
         return std::vector{setup(),
                            ChunkOf("inputs", v1::DTYPE_FLOAT32, {4, 12}, std::string(192, '\0')),
                            valid()};
       },
       kInvalid,
       {"inputs: sent both in chunks and in the step"}},
      {"chunks beyond max_stream_bytes",
       [=] {
         return std::vector{setup(),
                            ChunkOf("inputs", v1::DTYPE_FLOAT64, {1024, 1024}, "abcdefgh")};
       },
       absl::StatusCode::kResourceExhausted,
       {"message 1 (chunk)", "max_stream_bytes"}},
      {"chunk shape beyond max_tensor_elements",
       [=] {
         return std::vector{setup(), ChunkOf("inputs", v1::DTYPE_FLOAT32,
                                             {int64_t{1} << 40, int64_t{1} << 40}, "")};
       },
       absl::StatusCode::kResourceExhausted,
       {"max_tensor_elements"}},
  };
}

TEST(StreamProtocol, EveryErrorNamesTheMessageAndTheField) {
  service::ServiceLimits limits;
  limits.max_stream_bytes = 1 << 20;
  for (const ProtocolCase& c : ProtocolCases()) {
    SCOPED_TRACE(c.name);
    service::StreamSession session(limits);
    std::vector<v1::StreamGradientsRequest> messages = c.messages();
    absl::Status last;
    size_t handled = 0;
    for (v1::StreamGradientsRequest& message : messages) {
      v1::StreamGradientsResponse response;
      absl::StatusOr<bool> answered =
          session.Handle(&message, service::ComputeContext(), &response);
      ++handled;
      if (!answered.ok()) {
        last = answered.status();
        break;
      }
    }
    EXPECT_EQ(handled, messages.size()) << "an earlier message failed: " << last;
    EXPECT_EQ(last.code(), c.code) << last;
    for (const std::string& part : c.message_parts) {
      EXPECT_THAT(std::string(last.message()), HasSubstr(part));
    }
  }
}

// A model without Linear layers has no parameters: its steps need none.
TEST(StreamProtocol, ModelWithoutParametersStreamsWithoutThem) {
  service::StreamSession session{service::ServiceLimits()};
  v1::Model model;
  model.add_layers()->mutable_tanh();
  model.mutable_loss()->mutable_mse();
  v1::StreamGradientsRequest setup = SetupMessage(model, v1::DTYPE_FLOAT64);
  v1::StreamGradientsResponse response;
  ASSERT_TRUE(session.Handle(&setup, {}, &response).ok());
  std::mt19937 rng(1);
  v1::StreamGradientsRequest step = StepWith([&rng](v1::StreamStep* s) {
    SetTensor<double>(s->mutable_inputs(), RandomValues<double>(6, rng), {2, 3});
    SetTensor<double>(s->mutable_targets(), RandomValues<double>(6, rng), {2, 3});
  });
  absl::StatusOr<bool> answered = session.Handle(&step, {}, &response);
  ASSERT_TRUE(answered.ok()) << answered.status();
  EXPECT_TRUE(*answered);
  EXPECT_GT(response.result().loss(), 0);
}

// What a stream holds is what its client sent, and is released as steps consume it.
TEST(StreamProtocol, HeldBytesCountParametersAndStagedChunks) {
  service::StreamSession session{service::ServiceLimits()};
  v1::StreamGradientsRequest setup =
      SetupMessage(Classifier(false, v1::REDUCTION_MEAN), v1::DTYPE_FLOAT32);
  v1::StreamGradientsResponse response;
  ASSERT_TRUE(session.Handle(&setup, {}, &response).ok());
  EXPECT_EQ(session.held_bytes(), 0);
  v1::StreamGradientsRequest chunk = ChunkOf("inputs", v1::DTYPE_FLOAT32, {4, 12}, "abcd");
  ASSERT_TRUE(session.Handle(&chunk, {}, &response).ok());
  EXPECT_EQ(session.held_bytes(), 4 * 12 * 4);  // Counted in full from the first chunk.
  v1::StreamGradientsRequest rest =
      ChunkOf("inputs", v1::DTYPE_UNSPECIFIED, {}, std::string(4 * 12 * 4 - 4, '\0'));
  ASSERT_TRUE(session.Handle(&rest, {}, &response).ok());
  v1::StreamGradientsRequest step = StepWith([](v1::StreamStep* s) {
    FillValidStep(s);
    s->clear_inputs();
  });
  absl::StatusOr<bool> answered = session.Handle(&step, {}, &response);
  ASSERT_TRUE(answered.ok()) << answered.status();
  EXPECT_TRUE(*answered);
  const int64_t parameters = (12 * 16 + 16 + 16 * 16 + 16 + 16 * 5 + 5) * 4;
  EXPECT_EQ(session.held_bytes(), parameters);
  EXPECT_EQ(session.steps(), 1);
  EXPECT_EQ(session.messages(), 4);
}

}  // namespace
}  // namespace gradserve

namespace gradserve {
namespace {

// Streams on a shared server: idle ones are closed, one client cannot hold them all, and
// shutdown ends the ones waiting for their client with UNAVAILABLE, which clients may retry.
class StreamHardeningTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);
    service::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.service.threads = 2;
    options.service.limits.max_streams = 8;
    options.service.limits.max_streams_per_client = 2;
    options.service.limits.stream_idle_seconds = 0.3;
    auto server = service::GradServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    stub_ = v1::GradientService::NewStub(server_->InProcessChannel());
  }

  using Stream = grpc::ClientReaderWriter<v1::StreamGradientsRequest, v1::StreamGradientsResponse>;
  std::unique_ptr<Stream> Open(grpc::ClientContext* context) {
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    auto stream = stub_->StreamGradients(context);
    stream->Write(SetupMessage(Classifier(true, v1::REDUCTION_MEAN), v1::DTYPE_FLOAT32));
    return stream;
  }
  void WaitForOpenStreams(int n) {
    for (int tries = 0; tries < 1000 && server_->Stats().open_streams != n; ++tries) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  std::unique_ptr<service::GradServer> server_;
  std::unique_ptr<v1::GradientService::Stub> stub_;
};

TEST_F(StreamHardeningTest, StreamIdlePastStreamIdleSecondsIsClosed) {
  grpc::ClientContext context;
  auto stream = Open(&context);
  v1::StreamGradientsResponse answer;
  EXPECT_FALSE(stream->Read(&answer));  // Blocks until the server closes the idle stream.
  const grpc::Status status = stream->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_THAT(status.error_message(), HasSubstr("stream_idle_seconds"));
  WaitForOpenStreams(0);
  EXPECT_EQ(server_->Stats().open_streams, 0);
}

TEST_F(StreamHardeningTest, OneClientCannotHoldEveryStream) {
  grpc::ClientContext first, second, third;
  auto a = Open(&first);
  auto b = Open(&second);
  WaitForOpenStreams(2);
  ASSERT_EQ(server_->Stats().open_streams, 2);
  auto c = Open(&third);
  const grpc::Status refused = c->Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(refused.error_message(), HasSubstr("max_streams_per_client"));
  for (auto* stream : {a.get(), b.get()}) {
    ASSERT_TRUE(stream->WritesDone());
    EXPECT_TRUE(stream->Finish().ok());
  }
}

TEST_F(StreamHardeningTest, ShutdownEndsWaitingStreamsWithUnavailable) {
  grpc::ClientContext context;
  auto stream = Open(&context);
  WaitForOpenStreams(1);
  ASSERT_EQ(server_->Stats().open_streams, 1);
  const auto start = std::chrono::steady_clock::now();
  std::thread shutdown([&] { server_->Shutdown(std::chrono::seconds(60)); });
  const grpc::Status status = stream->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  shutdown.join();
  // The grace only bounds the wait: with nothing left in flight, shutdown does not use it.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
}

}  // namespace
}  // namespace gradserve
