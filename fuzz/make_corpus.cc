// Writes the fuzz targets' seed corpus: valid requests covering every layer kind, loss,
// dtype, option and checkpoint mode, and near-valid ones that fail one check each, all within
// the fuzz targets' small limits. Run once by fuzz/make_corpus.sh, which commits its output
// under fuzz/corpus/; the seeds are deterministic (fixed RNG seeds).
//
//   fuzz_make_corpus OUT_DIR     writes OUT_DIR/{compute_gradients,check_gradients,stream,graph}/
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "stream_sequence.pb.h"
#include "tests/engine/graph_test_models.h"
#include "tests/service/graph_test_requests.h"
#include "tests/service/test_requests.h"

namespace {

namespace v1 = ::gradserve::v1;
using gradserve::testing::DTypeOf;
using gradserve::testing::RandomValues;
using gradserve::testing::SetTensor;

enum class Loss { kMse, kL1, kHuber, kCrossEntropy64, kCrossEntropy32, kBce, kExternal };

// A model from a spec such as "L4x8 relu L8x3n": Linear layers "L<in>x<out>" (suffix n: no
// bias) and activations "relu", "leaky", "sigmoid", "tanh", "gelu", "gelu_tanh", "identity".
v1::Model MakeModel(const std::string& spec, Loss loss, v1::Reduction reduction) {
  v1::Model model;
  std::istringstream words(spec);
  for (std::string word; words >> word;) {
    v1::Layer* layer = model.add_layers();
    if (word[0] == 'L') {
      v1::Linear* linear = layer->mutable_linear();
      const size_t x = word.find('x');
      linear->set_in_features(std::stoll(word.substr(1, x - 1)));
      linear->set_out_features(std::stoll(word.substr(x + 1)));
      if (word.back() == 'n') linear->set_bias(false);
    } else if (word == "relu") {
      layer->mutable_relu();
    } else if (word == "leaky") {
      layer->mutable_leaky_relu()->set_negative_slope(0.2);
    } else if (word == "sigmoid") {
      layer->mutable_sigmoid();
    } else if (word == "tanh") {
      layer->mutable_tanh();
    } else if (word == "gelu") {
      layer->mutable_gelu();
    } else if (word == "gelu_tanh") {
      layer->mutable_gelu()->set_approximation(v1::GELU::APPROXIMATION_TANH);
    } else if (word == "identity") {
      layer->mutable_identity();
    }
    if (model.layers_size() == 1) layer->set_name("first");
  }
  v1::Loss* l = model.mutable_loss();
  switch (loss) {
    case Loss::kMse:
      l->mutable_mse();
      break;
    case Loss::kL1:
      l->mutable_l1();
      break;
    case Loss::kHuber:
      l->mutable_huber()->set_delta(0.5);
      break;
    case Loss::kCrossEntropy64:
    case Loss::kCrossEntropy32:
      l->mutable_cross_entropy();
      break;
    case Loss::kBce:
      l->mutable_bce_with_logits();
      break;
    case Loss::kExternal:
      l->mutable_external();
      break;
  }
  l->set_reduction(reduction);
  return model;
}

// Input and output widths of a model (activation-only models keep `width`).
std::pair<int64_t, int64_t> Widths(const v1::Model& model, int64_t width) {
  int64_t in = -1, out = width;
  for (const v1::Layer& layer : model.layers()) {
    if (!layer.has_linear()) continue;
    if (in < 0) in = layer.linear().in_features();
    out = layer.linear().out_features();
  }
  return {in < 0 ? width : in, out};
}

template <typename T>
void AddParameters(const v1::Model& model, std::mt19937& rng,
                   google::protobuf::RepeatedPtrField<v1::LinearParameters>* params) {
  for (const v1::Layer& layer : model.layers()) {
    if (!layer.has_linear()) continue;
    const int64_t in = layer.linear().in_features(), out = layer.linear().out_features();
    v1::LinearParameters* p = params->Add();
    SetTensor<T>(p->mutable_weight(), RandomValues<T>(in * out, rng), {out, in});
    if (!layer.linear().has_bias() || layer.linear().bias()) {
      SetTensor<T>(p->mutable_bias(), RandomValues<T>(out, rng), {out});
    }
  }
}

// Targets (or the output gradient) for `loss` on a [batch, out] output.
template <typename T>
void AddTargets(Loss loss, int64_t batch, int64_t out, std::mt19937& rng, v1::Tensor* targets,
                v1::Tensor* output_gradient) {
  switch (loss) {
    case Loss::kCrossEntropy64:
    case Loss::kCrossEntropy32: {
      std::vector<int64_t> classes(batch);
      for (int64_t& c : classes) c = std::uniform_int_distribution<int64_t>(0, out - 1)(rng);
      if (loss == Loss::kCrossEntropy64) {
        SetTensor<int64_t>(targets, classes, {batch});
      } else {
        SetTensor<int32_t>(targets, std::vector<int32_t>(classes.begin(), classes.end()), {batch});
      }
      break;
    }
    case Loss::kBce: {
      std::vector<T> values(batch * out);
      for (T& v : values) v = static_cast<T>(std::uniform_real_distribution<double>(0, 1)(rng));
      SetTensor<T>(targets, values, {batch, out});
      break;
    }
    case Loss::kExternal:
      SetTensor<T>(output_gradient, RandomValues<T>(batch * out, rng), {batch, out});
      break;
    default:
      SetTensor<T>(targets, RandomValues<T>(batch * out, rng), {batch, out});
  }
}

template <typename T>
v1::ComputeGradientsRequest MakeRequest(const std::string& spec, Loss loss, int64_t batch,
                                        uint32_t seed, v1::Reduction reduction = v1::REDUCTION_MEAN,
                                        int64_t width = 3) {
  std::mt19937 rng(seed);
  v1::ComputeGradientsRequest request;
  *request.mutable_model() = MakeModel(spec, loss, reduction);
  const auto [in, out] = Widths(request.model(), width);
  AddParameters<T>(request.model(), rng, request.mutable_parameters());
  SetTensor<T>(request.mutable_inputs(), RandomValues<T>(batch * in, rng), {batch, in});
  AddTargets<T>(loss, batch, out, rng, request.mutable_targets(),
                request.mutable_output_gradient());
  if (loss != Loss::kExternal) request.clear_output_gradient();
  if (loss == Loss::kExternal) request.clear_targets();
  return request;
}

class Writer {
 public:
  explicit Writer(std::filesystem::path dir) : dir_(std::move(dir)) {
    std::filesystem::create_directories(dir_);
  }
  void Write(const std::string& name, const google::protobuf::MessageLite& message) {
    std::ofstream out(dir_ / name, std::ios::binary);
    message.SerializeToOstream(&out);
    ++count_;
  }
  int count() const { return count_; }

 private:
  std::filesystem::path dir_;
  int count_ = 0;
};

template <typename T>
void SetOne(v1::Tensor* tensor, int64_t index, T value) {
  std::string* data = tensor->mutable_data();
  std::memcpy(data->data() + index * sizeof(T), &value, sizeof(T));
}

// ComputeGradientsRequests: the valid ones also seed check_gradients and stream.
std::vector<std::pair<std::string, v1::ComputeGradientsRequest>> ValidRequests() {
  std::vector<std::pair<std::string, v1::ComputeGradientsRequest>> all;
  all.emplace_back("seed_f32", gradserve::testing::SeedRequest<float>());
  all.emplace_back("seed_f64", gradserve::testing::SeedRequest<double>());
  all.emplace_back("mse_sum_f32",
                   MakeRequest<float>("L4x5 tanh L5x2", Loss::kMse, 6, 2, v1::REDUCTION_SUM));
  all.emplace_back("l1_f64", MakeRequest<double>("L3x4 sigmoid L4x2n", Loss::kL1, 5, 3));
  all.emplace_back("huber_f32", MakeRequest<float>("L4x4 leaky L4x3", Loss::kHuber, 4, 4));
  all.emplace_back("ce_int64_f32",
                   MakeRequest<float>("L6x8 gelu L8x8 relu L8x4", Loss::kCrossEntropy64, 7, 5));
  all.emplace_back("ce_int32_f64", MakeRequest<double>("L5x6 gelu_tanh L6x3", Loss::kCrossEntropy32,
                                                       4, 6, v1::REDUCTION_SUM));
  all.emplace_back("bce_f64", MakeRequest<double>("L4x3 identity L3x2", Loss::kBce, 3, 7));
  all.emplace_back("external_f32", MakeRequest<float>("relu L4x3 tanh", Loss::kExternal, 2, 8));
  all.emplace_back("activations_only_f64",
                   MakeRequest<double>("tanh relu", Loss::kMse, 3, 9, v1::REDUCTION_MEAN, 5));
  {
    auto r =
        MakeRequest<float>("L4x6 relu L6x6 tanh L6x6 relu L6x6 sigmoid L6x2", Loss::kMse, 8, 10);
    r.mutable_options()->set_return_input_gradient(true);
    r.mutable_options()->set_return_output(true);
    all.emplace_back("deep_dx_output_f32", r);
    r.mutable_options()->mutable_checkpointing()->set_mode(v1::Checkpointing::MODE_EVERY_K);
    r.mutable_options()->mutable_checkpointing()->set_every_k(3);
    all.emplace_back("every_k_f32", r);
    r.mutable_options()->mutable_checkpointing()->set_mode(v1::Checkpointing::MODE_SQRT);
    all.emplace_back("sqrt_f32", r);
    r.mutable_options()->mutable_checkpointing()->set_mode(v1::Checkpointing::MODE_MEMORY_BUDGET);
    r.mutable_options()->mutable_checkpointing()->set_memory_budget_bytes(600);
    all.emplace_back("memory_budget_f32", r);
  }
  {
    auto r = MakeRequest<double>("L3x3 relu L3x2", Loss::kMse, 4, 11);
    r.mutable_options()->set_allow_non_finite(true);
    SetOne<double>(r.mutable_inputs(), 2, std::numeric_limits<double>::quiet_NaN());
    all.emplace_back("allow_non_finite_f64", r);
  }
  return all;
}

// Graph requests: the engine tests' models (tests/engine/graph_test_models.h) as the API's
// graphs, within the fuzz targets' small limits. They also seed check_gradients and stream.
namespace eg = ::gradserve::engine::graph;

std::vector<std::pair<std::string, v1::ComputeGradientsRequest>> ValidGraphRequests() {
  using gradserve::testing::GraphRequest;
  std::vector<std::pair<std::string, v1::ComputeGradientsRequest>> all;
  all.emplace_back("mlp_gemm_f32", gradserve::testing::GraphSeedRequest<float>());
  {
    // ONNX's Linear: Transpose, MatMul, Add; input gradient and outputs asked for.
    eg::testing::SpecBuilder b;
    b.Input("input", eg::DType::kFloat64).Input("targets", eg::DType::kFloat64);
    std::string x = eg::testing::Linear(b, "0", "input", 4, 6);
    b.Node("Tanh", {x}, {"1"});
    x = eg::testing::Linear(b, "2", "1", 6, 3);
    auto r = GraphRequest<double>(b.WithLoss(x, gradserve::engine::LossKind::kMse, "targets"),
                                  {{5, 4}, {5, 3}}, 3);
    r.mutable_options()->add_input_gradient_names("input");
    r.mutable_options()->set_return_output(true);
    all.emplace_back("mlp_matmul_f64", r);
  }
  all.emplace_back("residual_ln_f64", GraphRequest<double>(eg::testing::ResidualMlpSpec(4, 6, 2, 1),
                                                           {{3, 4}, {3, 2}}, 5));
  {
    auto r = GraphRequest<float>(eg::testing::ResidualMlpSpec(4, 6, 2, 3, eg::DType::kFloat32),
                                 {{3, 4}, {3, 2}}, 6);
    r.mutable_options()->mutable_checkpointing()->set_mode(v1::Checkpointing::MODE_SQRT);
    all.emplace_back("residual_ln_sqrt_f32", r);
  }
  eg::testing::GptConfig gpt;
  gpt.blocks = 1;
  gpt.dtype = eg::DType::kFloat32;
  {
    auto r = GraphRequest<float>(eg::testing::GptSpec(gpt), {{2, 4}, {2, 4}}, 7, gpt.vocab, 0.5);
    r.mutable_options()->set_return_output(true);
    all.emplace_back("gpt_f32", r);
    r.mutable_options()->mutable_checkpointing()->set_mode(v1::Checkpointing::MODE_MEMORY_BUDGET);
    r.mutable_options()->mutable_checkpointing()->set_memory_budget_bytes(20000);
    all.emplace_back("gpt_memory_budget_f32", r);
  }
  {
    gpt.blocks = 2;
    gpt.dtype = eg::DType::kFloat64;
    auto r = GraphRequest<double>(eg::testing::GptSpec(gpt), {{2, 4}, {2, 4}}, 8, gpt.vocab, 0.5);
    // INT32 ids and targets, two of the targets ignored.
    for (int i = 0; i < 2; ++i) {
      v1::Tensor* t = r.mutable_graph_inputs(i)->mutable_tensor();
      std::vector<int32_t> narrow(8);
      for (int j = 0; j < 8; ++j) {
        int64_t v;
        std::memcpy(&v, t->data().data() + 8 * j, 8);
        narrow[j] = static_cast<int32_t>(i == 1 && (j == 2 || j == 5) ? gpt.ignore_index : v);
      }
      SetTensor<int32_t>(t, narrow, {2, 4});
      r.mutable_model()->mutable_graph()->mutable_inputs(i)->set_dtype(v1::DTYPE_INT32);
    }
    all.emplace_back("gpt_ignore_int32_f64", r);
  }
  {
    // A Constant node holding a tensor: y = relu(fc(x)) * 2.
    auto r = gradserve::testing::GraphSeedRequest<double>();
    v1::Graph* g = r.mutable_model()->mutable_graph();
    g->mutable_nodes(1)->set_outputs(0, "h");
    v1::Node* constant = g->add_nodes();
    constant->set_op_type("Constant");
    constant->add_outputs("two");
    v1::Attribute* value = constant->add_attributes();
    value->set_name("value");
    SetTensor<double>(value->mutable_t(), {2.0}, {});
    v1::Node* mul = g->add_nodes();
    mul->set_op_type("Mul");
    mul->add_inputs("h");
    mul->add_inputs("two");
    mul->add_outputs("output");
    all.emplace_back("constant_node_f64", r);
  }
  return all;
}

void WriteGraphCorpus(Writer& w) {
  for (const auto& [name, request] : ValidGraphRequests()) w.Write(name, request);
  const v1::ComputeGradientsRequest base = gradserve::testing::GraphSeedRequest<float>();
  auto bad = [&](const std::string& name,
                 const std::function<void(v1::ComputeGradientsRequest*)>& change) {
    v1::ComputeGradientsRequest r = base;
    change(&r);
    w.Write("bad_" + name, r);
  };
  auto graph = [](v1::ComputeGradientsRequest* r) { return r->mutable_model()->mutable_graph(); };
  bad("unknown_op", [&](auto* r) { graph(r)->mutable_nodes(1)->set_op_type("Relu6"); });
  bad("undefined_input", [&](auto* r) { graph(r)->mutable_nodes(1)->set_inputs(0, "nope"); });
  bad("cycle", [&](auto* r) { graph(r)->mutable_nodes(0)->set_inputs(0, "output"); });
  bad("defined_twice", [&](auto* r) { graph(r)->mutable_nodes(1)->set_outputs(0, "0"); });
  bad("attribute_kind",
      [&](auto* r) { graph(r)->mutable_nodes(0)->mutable_attributes(0)->set_f(1.0); });
  bad("shape_mismatch", [&](auto* r) {
    graph(r)->mutable_parameters(0)->set_shape(1, 3);
    SetTensor<float>(r->mutable_named_parameters(0)->mutable_tensor(), std::vector<float>(6, 1.f),
                     {2, 3});
  });
  bad("missing_parameter", [](auto* r) { r->mutable_named_parameters()->RemoveLast(); });
  bad("unknown_parameter", [](auto* r) { r->mutable_named_parameters(0)->set_name("w"); });
  bad("rank_over_limit", [&](auto* r) {
    for (int i = 0; i < 4; ++i) graph(r)->mutable_parameters(1)->add_shape(1);
  });
  bad("huge_claimed_batch", [](auto* r) {
    r->mutable_graph_inputs(0)->mutable_tensor()->set_shape(0, int64_t{1} << 40);
  });
  bad("bool_constant_out_of_range", [&](auto* r) {
    v1::NamedTensor* c = graph(r)->add_constants();
    c->set_name("mask");
    c->mutable_tensor()->set_dtype(v1::DTYPE_BOOL);
    c->mutable_tensor()->add_shape(1);
    c->mutable_tensor()->set_data(std::string(1, '\x07'));
  });
  bad("layers_and_graph", [](auto* r) { r->mutable_model()->add_layers()->mutable_relu(); });
}

void WriteComputeCorpus(Writer& w) {
  for (const auto& [name, request] : ValidRequests()) w.Write(name, request);
  const v1::ComputeGradientsRequest base = gradserve::testing::SeedRequest<float>();
  auto bad = [&](const std::string& name,
                 const std::function<void(v1::ComputeGradientsRequest*)>& change) {
    v1::ComputeGradientsRequest r = base;
    change(&r);
    w.Write("bad_" + name, r);
  };
  bad("weight_shape", [](auto* r) {
    r->mutable_parameters(0)->mutable_weight()->set_shape(0, 4);
    r->mutable_parameters(0)->mutable_weight()->set_shape(1, 2);
  });
  bad("short_data", [](auto* r) { r->mutable_inputs()->mutable_data()->resize(31); });
  bad("dtype_mix", [](auto* r) { r->mutable_targets()->set_dtype(v1::DTYPE_FLOAT64); });
  bad("nan_input", [](auto* r) {
    SetOne<float>(r->mutable_inputs(), 5, std::numeric_limits<float>::infinity());
  });
  bad("no_loss", [](auto* r) { r->mutable_model()->clear_loss(); });
  bad("no_params", [](auto* r) { r->clear_parameters(); });
  bad("unknown_enum", [](auto* r) {
    r->mutable_model()->mutable_loss()->set_reduction(static_cast<v1::Reduction>(7));
  });
  bad("widths",
      [](auto* r) { r->mutable_model()->mutable_layers(0)->mutable_linear()->set_in_features(5); });
  bad("batch_over_limit", [](auto* r) {
    std::mt19937 rng(1);
    SetTensor<float>(r->mutable_inputs(), RandomValues<float>(65 * 4, rng), {65, 4});
    SetTensor<float>(r->mutable_targets(), RandomValues<float>(65 * 2, rng), {65, 2});
  });
  bad("negative_dim", [](auto* r) { r->mutable_inputs()->set_shape(0, -8); });
  bad("empty_layer", [](auto* r) { r->mutable_model()->add_layers(); });
  bad("every_k_zero", [](auto* r) {
    r->mutable_options()->mutable_checkpointing()->set_mode(v1::Checkpointing::MODE_EVERY_K);
  });
  bad("budget_negative", [](auto* r) {
    r->mutable_options()->mutable_checkpointing()->set_mode(v1::Checkpointing::MODE_MEMORY_BUDGET);
    r->mutable_options()->mutable_checkpointing()->set_memory_budget_bytes(-1);
  });
  bad("bias_on_biasless",
      [](auto* r) { r->mutable_model()->mutable_layers(0)->mutable_linear()->set_bias(false); });
  {
    v1::ComputeGradientsRequest r = MakeRequest<float>("L3x4 L4x3", Loss::kCrossEntropy64, 3, 12);
    SetOne<int64_t>(r.mutable_targets(), 1, 3);
    w.Write("bad_class_index", r);
  }
}

void WriteCheckCorpus(Writer& w) {
  for (const auto& [name, request] : ValidGraphRequests()) {
    if (name.find("gpt") != std::string::npos) continue;  // Kept small: two passes a sample.
    v1::CheckGradientsRequest check;
    *check.mutable_request() = request;
    check.set_samples_per_tensor(2);
    w.Write("graph_" + name, check);
  }
  int i = 0;
  for (const auto& [name, request] : ValidRequests()) {
    v1::CheckGradientsRequest check;
    *check.mutable_request() = request;
    check.set_samples_per_tensor(1 + i % 8);
    check.set_seed(i);
    if (i % 3 == 1) check.set_step(1e-4);
    w.Write(name, check);
    ++i;
  }
  v1::CheckGradientsRequest base;
  *base.mutable_request() = gradserve::testing::SeedRequest<double>();
  auto bad = [&](const std::string& name,
                 const std::function<void(v1::CheckGradientsRequest*)>& change) {
    v1::CheckGradientsRequest r = base;
    change(&r);
    w.Write("bad_" + name, r);
  };
  bad("samples_negative", [](auto* r) { r->set_samples_per_tensor(-1); });
  bad("samples_over_limit", [](auto* r) { r->set_samples_per_tensor(9); });
  bad("step_one", [](auto* r) { r->set_step(1); });
  bad("step_nan", [](auto* r) { r->set_step(std::numeric_limits<double>::quiet_NaN()); });
  bad("no_request", [](auto* r) { r->clear_request(); });
  bad("nested_shape", [](auto* r) { r->mutable_request()->mutable_inputs()->add_shape(1); });
}

// Stream messages.
v1::StreamGradientsRequest Setup(const v1::ComputeGradientsRequest& like) {
  v1::StreamGradientsRequest m;
  *m.mutable_setup()->mutable_model() = like.model();
  *m.mutable_setup()->mutable_options() = like.options();
  m.mutable_setup()->set_dtype(like.inputs().dtype());
  return m;
}

v1::StreamGradientsRequest Step(const v1::ComputeGradientsRequest& like, bool parameters,
                                bool accumulate = false) {
  v1::StreamGradientsRequest m;
  v1::StreamStep* step = m.mutable_step();
  if (parameters) *step->mutable_parameters() = like.parameters();
  if (like.has_inputs()) *step->mutable_inputs() = like.inputs();
  if (like.has_targets()) *step->mutable_targets() = like.targets();
  if (like.has_output_gradient()) *step->mutable_output_gradient() = like.output_gradient();
  step->set_accumulate(accumulate);
  return m;
}

// An update of the same shapes as the parameters: -0.01 * the parameters themselves.
template <typename T>
v1::StreamGradientsRequest Update(const v1::ComputeGradientsRequest& like) {
  v1::StreamGradientsRequest m = Step(like, false);
  for (const v1::LinearParameters& p : like.parameters()) {
    v1::LinearParameters* u = m.mutable_step()->add_parameter_update();
    for (const bool bias : {false, true}) {
      if (bias && !p.has_bias()) continue;
      v1::Tensor* t = bias ? u->mutable_bias() : u->mutable_weight();
      *t = bias ? p.bias() : p.weight();
      for (size_t i = 0; i < t->data().size() / sizeof(T); ++i) {
        T v;
        std::memcpy(&v, t->data().data() + i * sizeof(T), sizeof(T));
        v = static_cast<T>(-0.01 * v);
        std::memcpy(t->mutable_data()->data() + i * sizeof(T), &v, sizeof(T));
      }
    }
  }
  return m;
}

// `tensor` as chunks of at most `piece` bytes for `field`.
void AddChunks(const std::string& field, const v1::Tensor& tensor, size_t piece,
               gradserve::fuzz::StreamSequence* seq) {
  for (size_t start = 0; start < tensor.data().size() || start == 0; start += piece) {
    v1::TensorChunk* chunk = seq->add_messages()->mutable_chunk();
    chunk->set_field(field);
    if (start == 0) {
      chunk->set_dtype(tensor.dtype());
      *chunk->mutable_shape() = tensor.shape();
    }
    chunk->set_data(tensor.data().substr(start, piece));
    if (tensor.data().empty()) break;
  }
}

void WriteStreamCorpus(Writer& w) {
  {
    // A graph: parameters by name, an update of one of them, then two accumulated micro-batches.
    const v1::ComputeGradientsRequest g = gradserve::testing::GraphRequest<double>(
        eg::testing::ResidualMlpSpec(4, 6, 2, 1), {{3, 4}, {3, 2}}, 9);
    gradserve::fuzz::StreamSequence seq;
    v1::StreamGradientsRequest* setup = seq.add_messages();
    *setup->mutable_setup()->mutable_model() = g.model();
    setup->mutable_setup()->set_dtype(v1::DTYPE_FLOAT64);
    for (int s = 0; s < 4; ++s) {
      v1::StreamStep* step = seq.add_messages()->mutable_step();
      *step->mutable_graph_inputs() = g.graph_inputs();
      if (s == 0) *step->mutable_named_parameters() = g.named_parameters();
      if (s == 1) {
        v1::NamedTensor* u = step->add_named_parameter_update();
        *u = g.named_parameters(0);  // p + p: any update of the right shape.
      }
      step->set_accumulate(s == 2);
    }
    w.Write("graph_update_accumulate_f64", seq);
  }
  using Seq = gradserve::fuzz::StreamSequence;
  // Setup and one step for every valid request.
  for (const auto& [name, request] : ValidRequests()) {
    Seq seq;
    *seq.add_messages() = Setup(request);
    *seq.add_messages() = Step(request, true);
    w.Write("one_step_" + name, seq);
  }
  const auto f32 = MakeRequest<float>("L4x5 tanh L5x3", Loss::kCrossEntropy64, 4, 20);
  const auto f64 = MakeRequest<double>("L3x4 relu L4x2", Loss::kMse, 3, 21);
  const auto f64b = MakeRequest<double>("L3x4 relu L4x2", Loss::kMse, 5, 22);
  {
    Seq seq;  // A short SGD loop: parameters, then updates.
    *seq.add_messages() = Setup(f32);
    *seq.add_messages() = Step(f32, true);
    *seq.add_messages() = Update<float>(f32);
    *seq.add_messages() = Update<float>(f32);
    w.Write("sgd_loop_f32", seq);
  }
  {
    Seq seq;  // Micro-batches: two accumulate, one answers; then another plain step.
    auto dx = f64;
    dx.mutable_options()->set_return_input_gradient(true);
    dx.mutable_options()->set_return_output(true);
    auto dxb = f64b;
    *dxb.mutable_options() = dx.options();
    *seq.add_messages() = Setup(dx);
    *seq.add_messages() = Step(dx, true, true);
    *seq.add_messages() = Step(dxb, false, true);
    *seq.add_messages() = Step(dx, false);
    *seq.add_messages() = Step(dxb, false);
    w.Write("accumulate_f64", seq);
  }
  {
    Seq seq;  // Everything chunked: parameters, inputs, targets.
    *seq.add_messages() = Setup(f64);
    for (int l = 0; l < f64.parameters_size(); ++l) {
      AddChunks("parameters[" + std::to_string(l) + "].weight", f64.parameters(l).weight(), 40,
                &seq);
      AddChunks("parameters[" + std::to_string(l) + "].bias", f64.parameters(l).bias(), 40, &seq);
    }
    AddChunks("inputs", f64.inputs(), 32, &seq);
    AddChunks("targets", f64.targets(), 32, &seq);
    seq.add_messages()->mutable_step();
    // Then an update sent in chunks.
    const v1::StreamGradientsRequest update = Update<double>(f64);
    for (int l = 0; l < f64.parameters_size(); ++l) {
      AddChunks("parameter_update[" + std::to_string(l) + "].weight",
                update.step().parameter_update(l).weight(), 64, &seq);
    }
    v1::StreamStep* step = seq.add_messages()->mutable_step();
    *step->mutable_inputs() = f64.inputs();
    *step->mutable_targets() = f64.targets();
    for (int l = 0; l < f64.parameters_size(); ++l) {
      *step->add_parameter_update()->mutable_bias() = update.step().parameter_update(l).bias();
    }
    w.Write("chunks_f64", seq);
  }
  // Protocol errors, one each.
  auto bad = [&](const std::string& name, std::vector<v1::StreamGradientsRequest> messages) {
    Seq seq;
    for (auto& m : messages) *seq.add_messages() = std::move(m);
    w.Write("bad_" + name, seq);
  };
  bad("step_before_setup", {Step(f32, true)});
  bad("second_setup", {Setup(f32), Setup(f32)});
  bad("update_before_parameters", {Setup(f32), Update<float>(f32)});
  bad("no_parameters_first", {Setup(f32), Step(f32, false)});
  bad("parameters_during_accumulation", {Setup(f32), Step(f32, true, true), Step(f32, true)});
  bad("wrong_dtype", {Setup(f32), Step(f64, true)});
  bad("empty_message", {Setup(f32), v1::StreamGradientsRequest()});
  {
    v1::StreamGradientsRequest both = Update<float>(f32);
    *both.mutable_step()->mutable_parameters() = f32.parameters();
    bad("parameters_and_update", {Setup(f32), both});
  }
  {
    v1::StreamGradientsRequest chunk;
    chunk.mutable_chunk()->set_field("parameters[7].weight");
    chunk.mutable_chunk()->set_dtype(v1::DTYPE_FLOAT32);
    chunk.mutable_chunk()->add_shape(2);
    bad("chunk_unknown_field", {Setup(f32), chunk});
    chunk.mutable_chunk()->set_field("inputs");
    chunk.mutable_chunk()->set_data(std::string(4, '\0'));
    bad("chunk_incomplete", {Setup(f32), chunk, Step(f32, true)});
    chunk.mutable_chunk()->clear_data();
    chunk.mutable_chunk()->set_data(std::string(8, '\0'));
    bad("chunk_and_whole", {Setup(f32), chunk, Step(f32, true)});
    chunk.mutable_chunk()->clear_shape();
    chunk.mutable_chunk()->add_shape(64);
    chunk.mutable_chunk()->add_shape(64);
    chunk.mutable_chunk()->set_dtype(v1::DTYPE_FLOAT64);
    // 32 KiB promised per field: the ninth field passes max_stream_bytes (256 KiB).
    std::vector<v1::StreamGradientsRequest> messages = {Setup(f32)};
    for (const char* field : {"inputs", "targets", "output_gradient", "parameters[0].weight",
                              "parameters[0].bias", "parameters[1].weight", "parameters[1].bias",
                              "parameter_update[0].weight", "parameter_update[0].bias"}) {
      chunk.mutable_chunk()->set_field(field);
      messages.push_back(chunk);
    }
    bad("chunk_over_stream_bytes", messages);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const std::filesystem::path out = argv[1];
  Writer compute(out / "compute_gradients"), check(out / "check_gradients"), stream(out / "stream"),
      graph(out / "graph");
  WriteComputeCorpus(compute);
  WriteCheckCorpus(check);
  WriteStreamCorpus(stream);
  WriteGraphCorpus(graph);
  std::printf(
      "wrote %d compute_gradients, %d check_gradients, %d stream and %d graph seeds to %s\n",
      compute.count(), check.count(), stream.count(), graph.count(), out.c_str());
  return 0;
}
