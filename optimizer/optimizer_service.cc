#include "optimizer/optimizer_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>

namespace gradserve::optimizer {

// Note [Checkpoints]
// A run is written to <state-dir>/<run_id>.npz when it is created (step 0, so that a restart
// knows it), after every checkpoint_every-th step, on SaveCheckpoint and when the server stops.
// WriteNpzAtomically makes each write all-or-nothing, and a run's writes are serialised by its
// checkpoint mutex. A step is applied in memory before it is written, so a SIGKILL loses the
// steps since the last checkpoint (at most checkpoint_every); a restart restores the run at
// that step and, as the batch of a step is a function of the step number, retakes the lost
// steps exactly as they were first taken. A caller driving steps itself reads GetRun.step
// after a restart (or sends expected_step) to know where to resume.

namespace {

constexpr auto kMinBackoff = std::chrono::milliseconds(100);
constexpr auto kMaxBackoff = std::chrono::milliseconds(5000);
// A checkpoint holds spec, step, loss and at most four arrays per parameter.
constexpr int64_t kMaxCheckpointMembers = 4 * (int64_t{1} << 20) + 3;

grpc::Status ToGrpc(const absl::Status& status) {
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

// Failures a later attempt of the same step may not meet: a replica restarting or overloaded.
bool Retryable(const absl::Status& status) {
  return absl::IsUnavailable(status) || absl::IsCancelled(status) ||
         absl::IsDeadlineExceeded(status) || absl::IsResourceExhausted(status) ||
         absl::IsAborted(status);
}

}  // namespace

struct OptimizerServiceImpl::Entry {
  std::unique_ptr<Run> run;
  std::mutex checkpoint_mutex;  // one write of this run's file at a time

  mutable std::mutex mutex;  // guards what follows (StatusOf reads it through a const Entry)
  std::condition_variable wake;
  v1::RunStatus::State state = v1::RunStatus::STATE_IDLE;
  std::string error;
  int64_t checkpoint_step = 0;
  bool stop = false;
  bool trainer_done = true;
  std::thread trainer;
};

OptimizerServiceImpl::OptimizerServiceImpl(OptimizerOptions options)
    : options_(std::move(options)) {}

OptimizerServiceImpl::~OptimizerServiceImpl() { StopTraining(std::chrono::milliseconds(0)); }

std::string OptimizerServiceImpl::CheckpointPath(const std::string& run_id) const {
  return options_.state_dir + "/" + run_id + ".npz";
}

absl::Status OptimizerServiceImpl::Start(const std::vector<v1::RunSpec>& runs) {
  std::map<std::string, const v1::RunSpec*> specs;
  for (const v1::RunSpec& spec : runs) specs[spec.run_id()] = &spec;
  std::vector<std::string> restored;
  if (!options_.state_dir.empty()) {
    std::error_code error;
    std::filesystem::create_directories(options_.state_dir, error);
    if (error) {
      return absl::FailedPreconditionError("--state-dir " + options_.state_dir + ": " +
                                           error.message());
    }
    std::vector<std::filesystem::path> files;
    for (const auto& item : std::filesystem::directory_iterator(options_.state_dir, error)) {
      const std::filesystem::path& path = item.path();
      if (path.extension() == ".npz" && IsValidRunId(path.stem().string())) files.push_back(path);
    }
    if (error) return absl::FailedPreconditionError("--state-dir: " + error.message());
    std::sort(files.begin(), files.end());
    for (const std::filesystem::path& path : files) {
      const std::string run_id = path.stem().string();
      absl::StatusOr<std::map<std::string, client::npy::Array>> arrays =
          ReadNpz(path.string(), options_.environment.max_message_bytes, kMaxCheckpointMembers);
      if (!arrays.ok()) return arrays.status();
      auto given = specs.find(run_id);
      absl::StatusOr<std::unique_ptr<Run>> run =
          Run::Restore(*arrays, path.string(), given == specs.end() ? nullptr : given->second,
                       EnvironmentForNewRun());
      if (!run.ok()) return run.status();
      if ((*run)->spec().run_id() != run_id) {
        return absl::FailedPreconditionError(path.string() + " holds run \"" +
                                             (*run)->spec().run_id() + "\"");
      }
      if (given != specs.end() && !(*run)->SameTrajectory(*given->second)) {
        return absl::FailedPreconditionError(
            "--run \"" + run_id + "\" differs from its checkpoint " + path.string() +
            " in more than gradserve_targets, shards, max_steps and checkpoint_every: move the "
            "checkpoint away to start the run afresh, or give the run another id");
      }
      const int64_t step = (*run)->step();
      if (absl::Status status = AddRun(*std::move(run), false, nullptr); !status.ok()) {
        return status;
      }
      {
        std::shared_ptr<Entry> entry = runs_.at(run_id);
        std::lock_guard lock(entry->mutex);
        entry->checkpoint_step = step;
      }
      spdlog::info("run {}: restored at step {} from {}", run_id, step, path.string());
      restored.push_back(run_id);
    }
  }
  for (const v1::RunSpec& spec : runs) {
    if (std::find(restored.begin(), restored.end(), spec.run_id()) != restored.end()) continue;
    absl::StatusOr<std::unique_ptr<Run>> run = Run::Create(spec, EnvironmentForNewRun());
    if (!run.ok()) return run.status();
    if (absl::Status status = AddRun(*std::move(run), true, nullptr); !status.ok()) return status;
    spdlog::info("run {}: created", spec.run_id());
  }
  return absl::OkStatus();
}

absl::Status OptimizerServiceImpl::AddRun(std::unique_ptr<Run> run, bool write_checkpoint,
                                          v1::RunStatus* status) {
  auto entry = std::make_shared<Entry>();
  entry->run = std::move(run);
  const std::string run_id = entry->run->spec().run_id();
  {
    std::lock_guard lock(mutex_);
    if (stopped_) return absl::UnavailableError("the server is shutting down");
    if (runs_.count(run_id) > 0) {
      return absl::AlreadyExistsError("run \"" + run_id + "\" was created meanwhile");
    }
    if (static_cast<int>(runs_.size()) >= options_.max_runs) {
      return absl::ResourceExhaustedError("this server holds --max-runs " +
                                          std::to_string(options_.max_runs) +
                                          " runs already; delete one first");
    }
    const int64_t bytes = entry->run->MemoryBytes();
    if (bytes > options_.max_memory_bytes - memory_bytes_) {
      return absl::ResourceExhaustedError(
          "run \"" + run_id + "\" needs " + std::to_string(bytes) +
          " bytes for its parameters, optimizer state and data set; --max-memory-bytes " +
          std::to_string(options_.max_memory_bytes) + " leaves " +
          std::to_string(options_.max_memory_bytes - memory_bytes_));
    }
    memory_bytes_ += bytes;
    runs_[run_id] = entry;
  }
  if (write_checkpoint && !options_.state_dir.empty()) {
    int64_t step = 0;
    if (absl::Status written = WriteCheckpoint(*entry, &step); !written.ok()) {
      std::lock_guard lock(mutex_);
      runs_.erase(run_id);
      memory_bytes_ -= entry->run->MemoryBytes();
      return written;
    }
  }
  StartTrainer(entry);
  if (status != nullptr) *status = StatusOf(*entry);
  return absl::OkStatus();
}

RunEnvironment OptimizerServiceImpl::EnvironmentForNewRun() const {
  RunEnvironment environment = options_.environment;
  std::lock_guard lock(mutex_);
  environment.max_dataset_bytes = std::max<int64_t>(
      0, std::min(environment.max_dataset_bytes, options_.max_memory_bytes - memory_bytes_));
  return environment;
}

std::shared_ptr<OptimizerServiceImpl::Entry> OptimizerServiceImpl::Find(const std::string& run_id,
                                                                        grpc::Status* error) const {
  std::lock_guard lock(mutex_);
  auto found = runs_.find(run_id);
  if (found == runs_.end()) {
    *error = grpc::Status(grpc::StatusCode::NOT_FOUND, "no run \"" + run_id + "\"");
    return nullptr;
  }
  return found->second;
}

v1::RunStatus OptimizerServiceImpl::StatusOf(const Entry& entry) const {
  v1::RunStatus status = entry.run->Status();
  std::lock_guard lock(entry.mutex);
  status.set_state(entry.state);
  status.set_error(entry.error);
  status.set_checkpoint_step(entry.checkpoint_step);
  return status;
}

absl::Status OptimizerServiceImpl::WriteCheckpoint(Entry& entry, int64_t* step) {
  std::lock_guard lock(entry.checkpoint_mutex);
  const NpzArrays arrays = entry.run->CheckpointArrays();
  int64_t saved_step = 0;
  for (const auto& [name, array] : arrays) {
    if (name == "step") std::memcpy(&saved_step, array.data.data(), 8);
  }
  if (absl::Status status = WriteNpzAtomically(CheckpointPath(entry.run->spec().run_id()), arrays);
      !status.ok()) {
    spdlog::error("run {}: checkpoint at step {} failed: {}", entry.run->spec().run_id(),
                  saved_step, std::string(status.message()));
    return status;
  }
  std::lock_guard state_lock(entry.mutex);
  entry.checkpoint_step = saved_step;
  *step = saved_step;
  return absl::OkStatus();
}

absl::Status OptimizerServiceImpl::StepAndCheckpoint(Entry& entry, const v1::StepRequest& request,
                                                     v1::StepResponse* response) {
  if (absl::Status status = entry.run->Step(request, response); !status.ok()) return status;
  if (!options_.state_dir.empty() && response->step() % entry.run->checkpoint_every() == 0) {
    int64_t step = 0;
    // The step stands even if its checkpoint cannot be written (logged); the next one retries.
    (void)WriteCheckpoint(entry, &step);
  }
  return absl::OkStatus();
}

void OptimizerServiceImpl::StartTrainer(const std::shared_ptr<Entry>& entry) {
  const Run& run = *entry->run;
  if (!run.has_dataset() || run.step() >= run.spec().max_steps()) return;
  std::lock_guard lock(entry->mutex);
  entry->state = v1::RunStatus::STATE_TRAINING;
  entry->trainer_done = false;
  // The thread holds the entry alive until it returns, even if DeleteRun drops it meanwhile.
  entry->trainer = std::thread([this, entry] { Train(*entry); });
}

void OptimizerServiceImpl::Train(Entry& entry) {
  const std::string& run_id = entry.run->spec().run_id();
  const int64_t max_steps = entry.run->spec().max_steps();
  std::chrono::milliseconds backoff = kMinBackoff;
  const auto finish = [&](v1::RunStatus::State state, std::string error) {
    std::lock_guard lock(entry.mutex);
    entry.state = state;
    entry.error = std::move(error);
    entry.trainer_done = true;
    entry.wake.notify_all();
  };
  while (true) {
    {
      std::lock_guard lock(entry.mutex);
      if (entry.stop) break;
    }
    if (entry.run->step() >= max_steps) {
      spdlog::info("run {}: reached max_steps {}", run_id, max_steps);
      break;
    }
    v1::StepResponse response;
    absl::Status status = StepAndCheckpoint(entry, v1::StepRequest(), &response);
    if (status.ok()) {
      backoff = kMinBackoff;
      if (options_.log_every > 0 && response.step() % options_.log_every == 0) {
        spdlog::info("run {} step {} loss {:.6g} grad_norm {:.4g}", run_id, response.step(),
                     response.loss(), response.gradient_norm());
      }
      continue;
    }
    if (!Retryable(status)) {
      spdlog::error("run {}: step {} failed, training stopped: {}", run_id, entry.run->step() + 1,
                    std::string(status.message()));
      finish(v1::RunStatus::STATE_FAILED, std::string(status.message()));
      return;
    }
    spdlog::warn("run {}: step {} will be retried in {} ms: {}", run_id, entry.run->step() + 1,
                 backoff.count(), std::string(status.message()));
    std::unique_lock lock(entry.mutex);
    entry.wake.wait_for(lock, backoff, [&] { return entry.stop; });
    backoff = std::min(backoff * 2, kMaxBackoff);
  }
  finish(v1::RunStatus::STATE_IDLE, "");
}

void OptimizerServiceImpl::StopTrainer(Entry& entry, std::chrono::milliseconds grace) {
  std::unique_lock lock(entry.mutex);
  entry.stop = true;
  entry.wake.notify_all();
  if (!entry.trainer.joinable()) return;
  // A trainer stuck in a gradserve call past the grace is left to the process's exit; its
  // step, not applied yet, is simply not in the checkpoint.
  if (entry.wake.wait_for(lock, grace, [&] { return entry.trainer_done; })) {
    lock.unlock();
    entry.trainer.join();
  } else {
    spdlog::warn("run {}: its step in flight did not end within the grace; left unapplied",
                 entry.run->spec().run_id());
    entry.trainer.detach();
  }
}

void OptimizerServiceImpl::StopTraining(std::chrono::milliseconds grace) {
  std::vector<std::shared_ptr<Entry>> entries;
  {
    std::lock_guard lock(mutex_);
    stopped_ = true;
    for (const auto& [id, entry] : runs_) entries.push_back(entry);
  }
  const auto deadline = std::chrono::steady_clock::now() + grace;
  for (const auto& entry : entries) {
    const auto left = std::max(std::chrono::milliseconds(0),
                               std::chrono::duration_cast<std::chrono::milliseconds>(
                                   deadline - std::chrono::steady_clock::now()));
    StopTrainer(*entry, left);
  }
}

bool OptimizerServiceImpl::CheckpointAll() {
  if (options_.state_dir.empty()) return true;
  std::vector<std::shared_ptr<Entry>> entries;
  {
    std::lock_guard lock(mutex_);
    for (const auto& [id, entry] : runs_) entries.push_back(entry);
  }
  bool all = true;
  for (const auto& entry : entries) {
    int64_t step = 0;
    if (WriteCheckpoint(*entry, &step).ok()) {
      spdlog::info("run {}: checkpoint at step {}", entry->run->spec().run_id(), step);
    } else {
      all = false;
    }
  }
  return all;
}

grpc::Status OptimizerServiceImpl::CreateRun(grpc::ServerContext*,
                                             const v1::CreateRunRequest* request,
                                             v1::RunStatus* response) {
  const v1::RunSpec& spec = request->spec();
  grpc::Status missing;
  if (std::shared_ptr<Entry> existing = Find(spec.run_id(), &missing)) {
    if (!existing->run->SameTrajectory(spec)) {
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS,
                          "run \"" + spec.run_id() + "\" exists with a different spec");
    }
    *response = StatusOf(*existing);
    return grpc::Status::OK;
  }
  {
    std::lock_guard lock(mutex_);
    if (static_cast<int>(runs_.size()) >= options_.max_runs) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          "this server holds --max-runs " + std::to_string(options_.max_runs) +
                              " runs already; delete one first");
    }
  }
  absl::StatusOr<std::unique_ptr<Run>> run = Run::Create(spec, EnvironmentForNewRun());
  if (!run.ok()) return ToGrpc(run.status());
  if (absl::Status status = AddRun(*std::move(run), true, response); !status.ok()) {
    return ToGrpc(status);
  }
  spdlog::info("run {}: created", spec.run_id());
  return grpc::Status::OK;
}

grpc::Status OptimizerServiceImpl::Step(grpc::ServerContext*, const v1::StepRequest* request,
                                        v1::StepResponse* response) {
  grpc::Status error;
  std::shared_ptr<Entry> entry = Find(request->run_id(), &error);
  if (entry == nullptr) return error;
  {
    std::lock_guard lock(mutex_);
    if (stopped_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is stopping");
  }
  {
    std::lock_guard lock(entry->mutex);
    if (entry->state == v1::RunStatus::STATE_TRAINING) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "run \"" + request->run_id() +
                              "\" is training in the background until max_steps; Step is for "
                              "runs that are idle");
    }
  }
  return ToGrpc(StepAndCheckpoint(*entry, *request, response));
}

grpc::Status OptimizerServiceImpl::GetRun(grpc::ServerContext*, const v1::GetRunRequest* request,
                                          v1::RunStatus* response) {
  grpc::Status error;
  std::shared_ptr<Entry> entry = Find(request->run_id(), &error);
  if (entry == nullptr) return error;
  *response = StatusOf(*entry);
  return grpc::Status::OK;
}

grpc::Status OptimizerServiceImpl::ListRuns(grpc::ServerContext*, const v1::ListRunsRequest*,
                                            v1::ListRunsResponse* response) {
  std::lock_guard lock(mutex_);
  for (const auto& [id, entry] : runs_) response->add_run_ids(id);
  return grpc::Status::OK;
}

grpc::Status OptimizerServiceImpl::GetParameters(grpc::ServerContext*,
                                                 const v1::GetParametersRequest* request,
                                                 v1::GetParametersResponse* response) {
  grpc::Status error;
  std::shared_ptr<Entry> entry = Find(request->run_id(), &error);
  if (entry == nullptr) return error;
  *response = entry->run->Parameters();
  return grpc::Status::OK;
}

grpc::Status OptimizerServiceImpl::SaveCheckpoint(grpc::ServerContext*,
                                                  const v1::SaveCheckpointRequest* request,
                                                  v1::SaveCheckpointResponse* response) {
  if (options_.state_dir.empty()) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "this server was started without --state-dir");
  }
  grpc::Status error;
  std::shared_ptr<Entry> entry = Find(request->run_id(), &error);
  if (entry == nullptr) return error;
  int64_t step = 0;
  if (absl::Status status = WriteCheckpoint(*entry, &step); !status.ok()) return ToGrpc(status);
  response->set_step(step);
  response->set_path(CheckpointPath(request->run_id()));
  return grpc::Status::OK;
}

grpc::Status OptimizerServiceImpl::DeleteRun(grpc::ServerContext*,
                                             const v1::DeleteRunRequest* request,
                                             v1::DeleteRunResponse*) {
  std::shared_ptr<Entry> entry;
  {
    std::lock_guard lock(mutex_);
    auto found = runs_.find(request->run_id());
    if (found == runs_.end()) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "no run \"" + request->run_id() + "\"");
    }
    entry = found->second;
    runs_.erase(found);
    memory_bytes_ -= entry->run->MemoryBytes();
  }
  StopTrainer(*entry, options_.environment.step_timeout);
  if (!options_.state_dir.empty()) {
    std::lock_guard lock(entry->checkpoint_mutex);
    std::remove(CheckpointPath(request->run_id()).c_str());
  }
  spdlog::info("run {}: deleted", request->run_id());
  return grpc::Status::OK;
}

}  // namespace gradserve::optimizer
