// gradserve-optimizer's pieces: the update rules against torch.optim's recurrences written out
// in closed form, .npz checkpoints (round trip, atomic replacement, corrupt files), the data
// set's batches, and whole runs on three in-process gradserve servers: sharded steps agree with
// one server's, and a run restored from its checkpoint continues bit for bit.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "optimizer/dataset.h"
#include "optimizer/npz.h"
#include "optimizer/optimizer_service.h"
#include "optimizer/run.h"
#include "optimizer/update_rule.h"
#include "server/service/server.h"

namespace gradserve::optimizer {
namespace {

namespace npy = client::npy;
namespace gv1 = gradserve::v1;
using ::testing::HasSubstr;
// Inside a fixture, plain "Run" is testing::Test::Run.
using TrainingRun = ::gradserve::optimizer::Run;

std::string TempDir(const std::string& name) {
  const std::string dir =
      ::testing::TempDir() + "/optimizer_test_" + name + "_" + std::to_string(::getpid());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

v1::OptimizerConfig Config(v1::OptimizerConfig::Algorithm algorithm, double lr) {
  v1::OptimizerConfig config;
  config.set_algorithm(algorithm);
  config.set_lr(lr);
  return config;
}

// ---- update rules -------------------------------------------------------------------------

TEST(UpdateRule, DefaultsAreTorchs) {
  absl::StatusOr<UpdateRule> adamw =
      MakeUpdateRule(Config(v1::OptimizerConfig::ALGORITHM_ADAMW, 1e-3), "optimizer");
  ASSERT_TRUE(adamw.ok()) << adamw.status();
  EXPECT_EQ(adamw->weight_decay, 0.01);
  EXPECT_EQ(adamw->beta1, 0.9);
  EXPECT_EQ(adamw->beta2, 0.999);
  EXPECT_EQ(adamw->eps, 1e-8);
  absl::StatusOr<UpdateRule> adam =
      MakeUpdateRule(Config(v1::OptimizerConfig::ALGORITHM_ADAM, 1e-3), "optimizer");
  ASSERT_TRUE(adam.ok());
  EXPECT_EQ(adam->weight_decay, 0.0);
}

TEST(UpdateRule, BadValuesNameTheirField) {
  const auto error = [](v1::OptimizerConfig config) {
    return std::string(MakeUpdateRule(config, "spec.optimizer").status().message());
  };
  EXPECT_THAT(error(Config(v1::OptimizerConfig::ALGORITHM_UNSPECIFIED, 0.1)),
              HasSubstr("spec.optimizer.algorithm"));
  EXPECT_THAT(error(Config(v1::OptimizerConfig::ALGORITHM_SGD, 0)), HasSubstr("spec.optimizer.lr"));
  EXPECT_THAT(error(Config(v1::OptimizerConfig::ALGORITHM_SGD, NAN)),
              HasSubstr("spec.optimizer.lr"));
  v1::OptimizerConfig momentum = Config(v1::OptimizerConfig::ALGORITHM_SGD, 0.1);
  momentum.set_momentum(1.0);
  EXPECT_THAT(error(momentum), HasSubstr("spec.optimizer.momentum"));
  v1::OptimizerConfig nesterov = Config(v1::OptimizerConfig::ALGORITHM_SGD, 0.1);
  nesterov.set_nesterov(true);
  EXPECT_THAT(error(nesterov), HasSubstr("spec.optimizer.nesterov"));
  v1::OptimizerConfig beta = Config(v1::OptimizerConfig::ALGORITHM_ADAM, 0.1);
  beta.set_beta2(1.0);
  EXPECT_THAT(error(beta), HasSubstr("spec.optimizer.beta2"));
  v1::OptimizerConfig mixed = Config(v1::OptimizerConfig::ALGORITHM_ADAM, 0.1);
  mixed.set_momentum(0.9);
  EXPECT_THAT(error(mixed), HasSubstr("momentum"));
}

TEST(UpdateRule, SgdWithMomentumFollowsTheHeavyBallRecurrence) {
  // A constant gradient g: buf_t = g (1 + m + ... + m^(t-1)) for dampening 0, so after T steps
  // p = p0 - lr g sum_t (1 - m^t) / (1 - m).
  v1::OptimizerConfig config = Config(v1::OptimizerConfig::ALGORITHM_SGD, 0.1);
  config.set_momentum(0.5);
  const UpdateRule rule = *MakeUpdateRule(config, "o");
  std::vector<double> value = {1.0, -2.0};
  const std::vector<double> gradient = {0.25, -1.0};
  ParameterState state;
  double expected_factor = 0;
  for (int t = 1; t <= 6; ++t) {
    ApplyUpdate(rule, t, gradient, value, &state);
    expected_factor += (1 - std::pow(0.5, t)) / 0.5;
  }
  for (int i = 0; i < 2; ++i) {
    const double p0 = i == 0 ? 1.0 : -2.0;
    EXPECT_NEAR(value[i], p0 - 0.1 * gradient[i] * expected_factor, 1e-15);
  }
  EXPECT_EQ(state.momentum_buffer.size(), 2u);
  EXPECT_TRUE(state.exp_avg.empty());
}

TEST(UpdateRule, PlainSgdKeepsNoStateAndWeightDecayAddsToTheGradient) {
  v1::OptimizerConfig config = Config(v1::OptimizerConfig::ALGORITHM_SGD, 0.5);
  config.set_weight_decay(0.1);
  const UpdateRule rule = *MakeUpdateRule(config, "o");
  std::vector<double> value = {2.0};
  ParameterState state;
  ApplyUpdate(rule, 1, std::vector<double>{1.0}, value, &state);
  EXPECT_DOUBLE_EQ(value[0], 2.0 - 0.5 * (1.0 + 0.1 * 2.0));
  EXPECT_TRUE(state.momentum_buffer.empty());
}

TEST(UpdateRule, AdamMovesEachParameterByAboutLrWhateverTheGradientsScale) {
  // With a constant gradient the bias-corrected moments are g and g^2 at every step, so each
  // step moves p by lr * g / (|g| + eps): about lr, for a gradient of 1e-3 as for one of 1e3.
  const UpdateRule rule = *MakeUpdateRule(Config(v1::OptimizerConfig::ALGORITHM_ADAM, 0.01), "o");
  std::vector<double> value = {0.0, 0.0};
  const std::vector<double> gradient = {1e-3, -1e3};
  ParameterState state;
  for (int t = 1; t <= 5; ++t) ApplyUpdate(rule, t, gradient, value, &state);
  EXPECT_NEAR(value[0], -0.05, 1e-6);
  EXPECT_NEAR(value[1], 0.05, 1e-9);
}

TEST(UpdateRule, AdamWDecaysTheParameterApartFromTheGradient) {
  v1::OptimizerConfig config = Config(v1::OptimizerConfig::ALGORITHM_ADAMW, 0.1);
  config.set_weight_decay(0.5);
  const UpdateRule rule = *MakeUpdateRule(config, "o");
  std::vector<double> value = {3.0};
  ParameterState state;
  ApplyUpdate(rule, 1, std::vector<double>{0.0}, value, &state);
  // A zero gradient: Adam's part is 0 / (0 + eps) = 0; only the decay acts.
  EXPECT_DOUBLE_EQ(value[0], 3.0 * (1 - 0.1 * 0.5));
  // Adam's L2 decay, by contrast, goes through the moments and moves p by about lr.
  config.set_algorithm(v1::OptimizerConfig::ALGORITHM_ADAM);
  std::vector<double> adam_value = {3.0};
  ParameterState adam_state;
  ApplyUpdate(*MakeUpdateRule(config, "o"), 1, std::vector<double>{0.0}, adam_value, &adam_state);
  EXPECT_NEAR(adam_value[0], 3.0 - 0.1, 1e-9);
}

// ---- .npz ---------------------------------------------------------------------------------

npy::Array Doubles(std::vector<double> values, std::vector<int64_t> shape) {
  npy::Array array;
  array.dtype = npy::DType::kFloat64;
  array.shape = std::move(shape);
  array.data.assign(reinterpret_cast<const char*>(values.data()), values.size() * 8);
  return array;
}

TEST(Npz, RoundTripsEveryMemberAndReplacesTheFileWhole) {
  const std::string dir = TempDir("npz");
  const std::string path = dir + "/run.npz";
  npy::Array bytes;
  bytes.dtype = npy::DType::kUint8;
  bytes.data = std::string("\x00\x01\xff spec", 8);
  bytes.shape = {8};
  NpzArrays arrays = {{"spec", bytes},
                      {"param/0.weight", Doubles({1.5, -2.25, 3e-300, 4}, {2, 2})},
                      {"loss", Doubles({}, {0})}};
  ASSERT_TRUE(WriteNpzAtomically(path, arrays).ok());
  arrays[1].second = Doubles({7, 8, 9, 10}, {2, 2});
  ASSERT_TRUE(WriteNpzAtomically(path, arrays).ok());
  absl::StatusOr<std::map<std::string, npy::Array>> read = ReadNpz(path, 1 << 20, 16);
  ASSERT_TRUE(read.ok()) << read.status();
  ASSERT_EQ(read->size(), 3u);
  for (const auto& [name, array] : arrays) {
    ASSERT_EQ(read->count(name), 1u) << name;
    EXPECT_EQ(read->at(name).dtype, array.dtype) << name;
    EXPECT_EQ(read->at(name).shape, array.shape) << name;
    EXPECT_EQ(read->at(name).data, array.data) << name;
  }
  // No temporary file is left beside it.
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    ++files;
    EXPECT_EQ(entry.path().filename(), "run.npz");
  }
  EXPECT_EQ(files, 1);
}

TEST(Npz, RefusesCorruptFilesAndMembersOverTheLimits) {
  const std::string dir = TempDir("npz_bad");
  const std::string path = dir + "/run.npz";
  ASSERT_TRUE(
      WriteNpzAtomically(path, {{"a", Doubles({1, 2, 3}, {3})}, {"b", Doubles({4}, {1})}}).ok());
  EXPECT_THAT(std::string(ReadNpz(path, 16, 16).status().message()), HasSubstr("a.npy"));
  EXPECT_THAT(std::string(ReadNpz(path, 1 << 20, 1).status().message()), HasSubstr("members"));
  // Cut off halfway: the zip's directory is gone.
  const auto size = std::filesystem::file_size(path);
  std::filesystem::resize_file(path, size / 2);
  EXPECT_FALSE(ReadNpz(path, 1 << 20, 16).ok());
  std::ofstream(path, std::ios::trunc) << "not a zip file";
  EXPECT_FALSE(ReadNpz(path, 1 << 20, 16).ok());
  EXPECT_FALSE(ReadNpz(dir + "/missing.npz", 1 << 20, 16).ok());
}

// ---- data sets ----------------------------------------------------------------------------

void WriteNpy(const std::string& path, const npy::Array& array) {
  std::string error;
  ASSERT_TRUE(npy::Write(path, array, &error)) << error;
}

// Rows 0..n-1 of x hold their own index in every column, y the index times 10.
std::string IndexDataset(int64_t rows, int64_t columns) {
  const std::string dir = TempDir("data");
  npy::Array x;
  x.dtype = npy::DType::kFloat32;
  x.shape = {rows, columns};
  npy::Array y;
  y.dtype = npy::DType::kInt32;
  y.shape = {rows};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < columns; ++c) {
      const float value = static_cast<float>(r);
      x.data.append(reinterpret_cast<const char*>(&value), 4);
    }
    const int32_t label = static_cast<int32_t>(r * 10);
    y.data.append(reinterpret_cast<const char*>(&label), 4);
  }
  WriteNpy(dir + "/x.npy", x);
  WriteNpy(dir + "/y.npy", y);
  return dir;
}

v1::Dataset DatasetSpec(int64_t batch, uint64_t seed) {
  v1::Dataset spec;
  spec.set_inputs("x.npy");
  spec.set_targets("y.npy");
  spec.set_batch_size(batch);
  spec.set_shuffle_seed(seed);
  return spec;
}

std::vector<int64_t> BatchRows(Dataset& dataset, int64_t step) {
  gv1::Tensor inputs, targets;
  dataset.Batch(step, &inputs, &targets);
  EXPECT_EQ(inputs.dtype(), gv1::DTYPE_FLOAT64);
  EXPECT_EQ(targets.dtype(), gv1::DTYPE_INT64);
  std::vector<int64_t> rows(inputs.shape(0));
  for (size_t r = 0; r < rows.size(); ++r) {
    double value;
    std::memcpy(&value, inputs.data().data() + r * inputs.shape(1) * 8, 8);
    int64_t label;
    std::memcpy(&label, targets.data().data() + r * 8, 8);
    rows[r] = static_cast<int64_t>(value);
    EXPECT_EQ(label, rows[r] * 10) << "inputs and targets must come from the same rows";
  }
  return rows;
}

TEST(DatasetTest, EachEpochVisitsEveryRowOnceInAnOrderFixedBySeedAndStep) {
  const std::string dir = IndexDataset(10, 3);
  auto dataset = Dataset::Load(DatasetSpec(3, 7), "d", dir, gv1::DTYPE_FLOAT64, 1 << 20);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(dataset->steps_per_epoch(), 3);  // 10 rows, batches of 3: row 10 % 3 left out
  for (int64_t epoch = 0; epoch < 3; ++epoch) {
    std::vector<int64_t> seen;
    for (int64_t s = 0; s < 3; ++s) {
      for (int64_t row : BatchRows(*dataset, epoch * 3 + s)) seen.push_back(row);
    }
    std::sort(seen.begin(), seen.end());
    EXPECT_EQ(std::unique(seen.begin(), seen.end()), seen.end()) << "epoch " << epoch;
    EXPECT_EQ(seen.size(), 9u);
  }
  // A fresh data set asked for step 7 first (a run restored at step 7) gives the same batch.
  auto restored = Dataset::Load(DatasetSpec(3, 7), "d", dir, gv1::DTYPE_FLOAT64, 1 << 20);
  const std::vector<int64_t> late = BatchRows(*restored, 7);
  EXPECT_EQ(late, BatchRows(*dataset, 7));
  // Epochs differ from one another, and so do seeds.
  EXPECT_NE(BatchRows(*dataset, 0), BatchRows(*dataset, 3));
  auto other = Dataset::Load(DatasetSpec(3, 8), "d", dir, gv1::DTYPE_FLOAT64, 1 << 20);
  EXPECT_NE(BatchRows(*other, 0), BatchRows(*dataset, 0));
}

TEST(DatasetTest, RefusesPathsOutsideTheDataDirectoryAndBadSizes) {
  const std::string dir = IndexDataset(4, 2);
  const auto error = [&](v1::Dataset spec, int64_t max_bytes = 1 << 20) {
    return std::string(
        Dataset::Load(spec, "spec.dataset", dir, gv1::DTYPE_FLOAT32, max_bytes).status().message());
  };
  v1::Dataset escape = DatasetSpec(2, 0);
  escape.set_inputs("../x.npy");
  EXPECT_THAT(error(escape), HasSubstr("spec.dataset.inputs"));
  v1::Dataset absolute = DatasetSpec(2, 0);
  absolute.set_targets("/etc/passwd");
  EXPECT_THAT(error(absolute), HasSubstr("spec.dataset.targets"));
  EXPECT_THAT(error(DatasetSpec(5, 0)), HasSubstr("spec.dataset.batch_size"));
  EXPECT_THAT(error(DatasetSpec(2, 0), 100), HasSubstr("limit"));
  EXPECT_THAT(std::string(Dataset::Load(DatasetSpec(2, 0), "d", "", gv1::DTYPE_FLOAT32, 1 << 20)
                              .status()
                              .message()),
              HasSubstr("--data-dir"));
}

// ---- runs on in-process gradserve servers -------------------------------------------------

class RunTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    spdlog::set_level(spdlog::level::warn);
    for (int i = 0; i < 3; ++i) {
      service::ServerOptions options;
      options.listen_address = "127.0.0.1:0";
      options.service.threads = 1;
      auto server = service::GradServer::Start(options);
      ASSERT_TRUE(server.ok()) << server.status();
      servers_.push_back(server->release());
    }
    data_dir_ = new std::string(TempDir("run_data"));
    std::mt19937_64 random(5);
    std::normal_distribution<double> normal;
    npy::Array x;
    x.dtype = npy::DType::kFloat64;
    x.shape = {96, 6};
    npy::Array y;
    y.dtype = npy::DType::kInt64;
    y.shape = {96};
    for (int r = 0; r < 96; ++r) {
      double sum = 0;
      for (int c = 0; c < 6; ++c) {
        const double value = normal(random);
        sum += (c % 2 ? value : -value);
        x.data.append(reinterpret_cast<const char*>(&value), 8);
      }
      const int64_t label = sum > 0.5 ? 2 : (sum > -0.5 ? 1 : 0);
      y.data.append(reinterpret_cast<const char*>(&label), 8);
    }
    WriteNpy(*data_dir_ + "/x.npy", x);
    WriteNpy(*data_dir_ + "/y.npy", y);
  }
  static void TearDownTestSuite() {
    for (service::GradServer* server : servers_) delete server;
    servers_.clear();
    delete data_dir_;
  }

  static RunEnvironment Environment(int replicas) {
    RunEnvironment environment;
    environment.data_dir = *data_dir_;
    for (int i = 0; i < replicas; ++i) {
      environment.default_targets.push_back("127.0.0.1:" + std::to_string(servers_[i]->port()));
    }
    return environment;
  }

  // A float64 MLP 6 -> 8 -> 3 on the data set, batches of 16.
  static v1::RunSpec Spec(v1::OptimizerConfig optimizer) {
    v1::RunSpec spec;
    spec.set_run_id("mlp");
    spec.set_dtype(gv1::DTYPE_FLOAT64);
    gv1::Model* model = spec.mutable_model();
    gv1::Linear* first = model->add_layers()->mutable_linear();
    first->set_in_features(6);
    first->set_out_features(8);
    model->add_layers()->mutable_tanh();
    gv1::Linear* second = model->add_layers()->mutable_linear();
    second->set_in_features(8);
    second->set_out_features(3);
    model->mutable_loss()->mutable_cross_entropy();
    model->mutable_loss()->set_reduction(gv1::REDUCTION_MEAN);
    spec.set_init_seed(11);
    *spec.mutable_optimizer() = optimizer;
    *spec.mutable_dataset() = DatasetSpec(16, 3);
    return spec;
  }

  static void Steps(TrainingRun& run, int count) {
    for (int i = 0; i < count; ++i) {
      v1::StepResponse response;
      absl::Status status = run.Step(v1::StepRequest(), &response);
      ASSERT_TRUE(status.ok()) << status;
    }
  }

  static std::vector<std::string> ParameterBytes(const TrainingRun& run) {
    std::vector<std::string> bytes;
    const v1::GetParametersResponse parameters = run.Parameters();
    for (const gv1::NamedTensor& named : parameters.parameters()) {
      bytes.push_back(named.tensor().data());
    }
    return bytes;
  }

  static std::vector<double> AllParameters(const TrainingRun& run) {
    std::vector<double> values;
    for (const std::string& data : ParameterBytes(run)) {
      const size_t first = values.size();
      values.resize(first + data.size() / 8);
      std::memcpy(values.data() + first, data.data(), data.size());
    }
    return values;
  }

  static inline std::vector<service::GradServer*> servers_;
  static inline std::string* data_dir_ = nullptr;
};

std::vector<v1::OptimizerConfig> EveryOptimizer() {
  v1::OptimizerConfig momentum = Config(v1::OptimizerConfig::ALGORITHM_SGD, 0.1);
  momentum.set_momentum(0.9);
  momentum.set_nesterov(true);
  v1::OptimizerConfig adamw = Config(v1::OptimizerConfig::ALGORITHM_ADAMW, 0.01);
  return {Config(v1::OptimizerConfig::ALGORITHM_SGD, 0.1), momentum,
          Config(v1::OptimizerConfig::ALGORITHM_ADAM, 0.01), adamw};
}

TEST_F(RunTest, RestoredFromItsCheckpointARunContinuesBitForBit) {
  const std::string state_dir = TempDir("resume");
  for (const v1::OptimizerConfig& optimizer : EveryOptimizer()) {
    SCOPED_TRACE(optimizer.ShortDebugString());
    auto straight = TrainingRun::Create(Spec(optimizer), Environment(3));
    ASSERT_TRUE(straight.ok()) << straight.status();
    Steps(**straight, 14);  // crosses an epoch (6 steps each)

    auto interrupted = TrainingRun::Create(Spec(optimizer), Environment(3));
    ASSERT_TRUE(interrupted.ok());
    Steps(**interrupted, 5);
    const std::string path = state_dir + "/mlp.npz";
    ASSERT_TRUE(WriteNpzAtomically(path, (*interrupted)->CheckpointArrays()).ok());
    Steps(**interrupted, 2);  // lost with the process
    interrupted->reset();
    auto arrays = ReadNpz(path, 1 << 20, 64);
    ASSERT_TRUE(arrays.ok()) << arrays.status();
    auto restored = TrainingRun::Restore(*arrays, path, nullptr, Environment(3));
    ASSERT_TRUE(restored.ok()) << restored.status();
    EXPECT_EQ((*restored)->step(), 5);
    Steps(**restored, 9);
    EXPECT_EQ(ParameterBytes(**restored), ParameterBytes(**straight));
    EXPECT_EQ((*restored)->Status().recent_losses_size(), 14);
    EXPECT_EQ((*restored)->Status().recent_losses(13), (*straight)->Status().recent_losses(13));
  }
}

TEST_F(RunTest, ThreeReplicasTrainAsOneServerDoes) {
  const v1::OptimizerConfig sgd = Config(v1::OptimizerConfig::ALGORITHM_SGD, 0.1);
  auto one = TrainingRun::Create(Spec(sgd), Environment(1));
  auto three = TrainingRun::Create(Spec(sgd), Environment(3));
  ASSERT_TRUE(one.ok() && three.ok());
  Steps(**one, 10);
  Steps(**three, 10);
  const std::vector<double> a = AllParameters(**one);
  const std::vector<double> b = AllParameters(**three);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-12 * (1 + std::abs(a[i])));
  // And the loss went down: the run trains.
  const v1::RunStatus status = (*three)->Status();
  EXPECT_LT(status.recent_losses(9), status.recent_losses(0));
  EXPECT_GT(status.last_step().bytes_sent(), 0);
  EXPECT_EQ(status.last_step().gradient_norms_size(), 4);
  EXPECT_EQ(status.last_step().gradient_norms(0).name(), "0.weight");
  EXPECT_EQ(status.last_step().gradient_norms(3).name(), "2.bias");
}

TEST_F(RunTest, ExpectedStepAndBatchlessStepsWithoutDataAreRefused) {
  v1::RunSpec spec = Spec(Config(v1::OptimizerConfig::ALGORITHM_SGD, 0.1));
  spec.clear_dataset();
  auto run = TrainingRun::Create(spec, Environment(2));
  ASSERT_TRUE(run.ok()) << run.status();
  v1::StepResponse response;
  EXPECT_TRUE(absl::IsFailedPrecondition((*run)->Step(v1::StepRequest(), &response)));
  v1::StepRequest request;
  request.set_expected_step(3);
  absl::Status status = (*run)->Step(request, &response);
  EXPECT_TRUE(absl::IsFailedPrecondition(status));
  EXPECT_THAT(std::string(status.message()), HasSubstr("has taken 0 steps"));
  // gradserve's own validation comes back with its code, marked as gradserve's.
  request.set_expected_step(0);
  request.mutable_inputs()->set_dtype(gv1::DTYPE_FLOAT64);
  request.mutable_inputs()->add_shape(2);
  request.mutable_inputs()->add_shape(5);  // the first layer takes 6
  request.mutable_inputs()->mutable_data()->resize(80);
  request.mutable_targets()->set_dtype(gv1::DTYPE_INT64);
  request.mutable_targets()->add_shape(2);
  request.mutable_targets()->mutable_data()->resize(16);
  status = (*run)->Step(request, &response);
  EXPECT_TRUE(absl::IsInvalidArgument(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("gradserve: "));
  EXPECT_EQ((*run)->step(), 0);
}

TEST_F(RunTest, SpecErrorsNameTheirField) {
  const auto error = [&](const v1::RunSpec& spec) {
    return std::string(TrainingRun::Create(spec, Environment(1)).status().message());
  };
  v1::RunSpec spec = Spec(Config(v1::OptimizerConfig::ALGORITHM_SGD, 0.1));
  spec.set_run_id("../evil");
  EXPECT_THAT(error(spec), HasSubstr("spec.run_id"));
  spec = Spec(Config(v1::OptimizerConfig::ALGORITHM_SGD, 0.1));
  spec.add_parameters();
  EXPECT_THAT(error(spec), HasSubstr("spec.parameters"));
  spec = Spec(Config(v1::OptimizerConfig::ALGORITHM_SGD, 0.1));
  spec.mutable_model()->mutable_layers(0)->mutable_linear()->set_out_features(int64_t{1} << 40);
  EXPECT_THAT(error(spec), HasSubstr("spec.model.layers[0].linear"));
  spec = Spec(Config(v1::OptimizerConfig::ALGORITHM_SGD, 0.1));
  spec.clear_dataset();
  spec.set_max_steps(10);
  EXPECT_THAT(error(spec), HasSubstr("spec.max_steps"));
}

TEST_F(RunTest, ServiceCreatesIdempotentlyAndChecksWhatCallersSend) {
  OptimizerOptions options;
  options.environment = Environment(2);
  options.state_dir = TempDir("service");
  OptimizerServiceImpl service(options);
  ASSERT_TRUE(service.Start({}).ok());
  grpc::ServerContext context;
  v1::CreateRunRequest create;
  *create.mutable_spec() = Spec(Config(v1::OptimizerConfig::ALGORITHM_ADAM, 0.01));
  v1::RunStatus status;
  ASSERT_TRUE(service.CreateRun(&context, &create, &status).ok());
  EXPECT_EQ(status.state(), v1::RunStatus::STATE_IDLE);
  EXPECT_TRUE(std::filesystem::exists(options.state_dir + "/mlp.npz"));
  // The same spec again (a client retrying after a lost answer) gets the run; another spec not.
  EXPECT_TRUE(service.CreateRun(&context, &create, &status).ok());
  create.mutable_spec()->mutable_optimizer()->set_lr(0.02);
  EXPECT_EQ(service.CreateRun(&context, &create, &status).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);

  v1::StepRequest step;
  step.set_run_id("mlp");
  v1::StepResponse response;
  ASSERT_TRUE(service.Step(&context, &step, &response).ok());
  EXPECT_EQ(response.step(), 1);
  step.set_run_id("nope");
  EXPECT_EQ(service.Step(&context, &step, &response).error_code(), grpc::StatusCode::NOT_FOUND);

  v1::SaveCheckpointRequest save;
  save.set_run_id("mlp");
  v1::SaveCheckpointResponse saved;
  ASSERT_TRUE(service.SaveCheckpoint(&context, &save, &saved).ok());
  EXPECT_EQ(saved.step(), 1);
  v1::DeleteRunRequest remove;
  remove.set_run_id("mlp");
  v1::DeleteRunResponse removed;
  ASSERT_TRUE(service.DeleteRun(&context, &remove, &removed).ok());
  EXPECT_FALSE(std::filesystem::exists(options.state_dir + "/mlp.npz"));
}

TEST_F(RunTest, RunsBeyondTheMemoryBudgetAreRefused) {
  OptimizerOptions options;
  options.environment = Environment(1);
  // The MLP's 59 parameters with Adam's two moments take 59 * 3 * 8 = 1416 bytes, its data set
  // 96 * 6 * 8 + 96 * 8 = 5376: room for one run, not two.
  options.max_memory_bytes = 8000;
  OptimizerServiceImpl service(options);
  ASSERT_TRUE(service.Start({}).ok());
  grpc::ServerContext context;
  v1::CreateRunRequest create;
  *create.mutable_spec() = Spec(Config(v1::OptimizerConfig::ALGORITHM_ADAM, 0.01));
  v1::RunStatus status;
  ASSERT_TRUE(service.CreateRun(&context, &create, &status).ok());
  create.mutable_spec()->set_run_id("second");
  const grpc::Status refused = service.CreateRun(&context, &create, &status);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  // Deleting the first frees its share.
  v1::DeleteRunRequest remove;
  remove.set_run_id("mlp");
  v1::DeleteRunResponse removed;
  ASSERT_TRUE(service.DeleteRun(&context, &remove, &removed).ok());
  EXPECT_TRUE(service.CreateRun(&context, &create, &status).ok());
}

// The run's status once its background training has stopped (or after 10 s).
v1::RunStatus StatusOnceTrained(OptimizerServiceImpl& service, const std::string& run_id) {
  grpc::ServerContext context;
  v1::GetRunRequest get;
  get.set_run_id(run_id);
  v1::RunStatus status;
  for (int i = 0; i < 2000; ++i) {
    EXPECT_TRUE(service.GetRun(&context, &get, &status).ok());
    if (status.state() != v1::RunStatus::STATE_TRAINING) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return status;
}

TEST_F(RunTest, BackgroundTrainingResumesAfterARestartAndStopsAtMaxSteps) {
  OptimizerOptions options;
  options.environment = Environment(3);
  options.environment.checkpoint_every = 4;
  options.state_dir = TempDir("background");
  v1::RunSpec spec = Spec(Config(v1::OptimizerConfig::ALGORITHM_ADAM, 0.01));
  spec.set_max_steps(10);
  {
    OptimizerServiceImpl service(options);
    ASSERT_TRUE(service.Start({spec}).ok());
    const v1::RunStatus status = StatusOnceTrained(service, "mlp");
    EXPECT_EQ(status.state(), v1::RunStatus::STATE_IDLE) << status.error();
    EXPECT_EQ(status.step(), 10);
    EXPECT_EQ(status.checkpoint_step(), 8);
    service.StopTraining(std::chrono::milliseconds(1000));
  }
  // Restarted with more steps to take: it resumes at the checkpoint (8), not at 0 or 10.
  spec.set_max_steps(12);
  OptimizerServiceImpl service(options);
  ASSERT_TRUE(service.Start({spec}).ok());
  const v1::RunStatus status = StatusOnceTrained(service, "mlp");
  EXPECT_EQ(status.step(), 12);
  EXPECT_EQ(status.recent_losses_size(), 12);
  // A different trajectory under the same id is refused at start-up.
  spec.mutable_optimizer()->set_lr(0.5);
  OptimizerServiceImpl other(options);
  EXPECT_THAT(std::string(other.Start({spec}).message()), HasSubstr("differs from its checkpoint"));
}

}  // namespace
}  // namespace gradserve::optimizer
