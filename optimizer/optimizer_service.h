// gradserve.optimizer.v1.OptimizerService: the runs of one server, their background training
// and their checkpoints (Note [Checkpoints] in optimizer_service.cc).
#ifndef GRADSERVE_OPTIMIZER_OPTIMIZER_SERVICE_H_
#define GRADSERVE_OPTIMIZER_OPTIMIZER_SERVICE_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "gradserve/optimizer/v1/optimizer.grpc.pb.h"
#include "optimizer/run.h"

namespace gradserve::optimizer {

struct OptimizerOptions {
  RunEnvironment environment;
  // Checkpoints go here as <run_id>.npz; empty: none are written or restored.
  std::string state_dir;
  int max_runs = 64;
  // Parameters, optimizer state and data sets of all runs together (Run::MemoryBytes).
  int64_t max_memory_bytes = int64_t{4} << 30;
  // Background training logs a run's loss every this many steps.
  int64_t log_every = 10;
};

class OptimizerServiceImpl final : public v1::OptimizerService::Service {
 public:
  explicit OptimizerServiceImpl(OptimizerOptions options);
  ~OptimizerServiceImpl() override;

  // At start-up, before serving: restores every checkpoint in the state directory, then
  // creates each of `runs` that none restored (a restored run with the same id must describe
  // the same trajectory; its operational fields are taken from the spec). Starts background
  // training where a run has a data set and steps left.
  absl::Status Start(const std::vector<v1::RunSpec>& runs);
  // Stops background training (each trainer finishes the step it is in, waiting at most
  // `grace`) and refuses steps from then on.
  void StopTraining(std::chrono::milliseconds grace);
  // Writes every run's checkpoint; false if any could not be written (each is logged).
  bool CheckpointAll();

  grpc::Status CreateRun(grpc::ServerContext* context, const v1::CreateRunRequest* request,
                         v1::RunStatus* response) override;
  grpc::Status Step(grpc::ServerContext* context, const v1::StepRequest* request,
                    v1::StepResponse* response) override;
  grpc::Status GetRun(grpc::ServerContext* context, const v1::GetRunRequest* request,
                      v1::RunStatus* response) override;
  grpc::Status ListRuns(grpc::ServerContext* context, const v1::ListRunsRequest* request,
                        v1::ListRunsResponse* response) override;
  grpc::Status GetParameters(grpc::ServerContext* context, const v1::GetParametersRequest* request,
                             v1::GetParametersResponse* response) override;
  grpc::Status SaveCheckpoint(grpc::ServerContext* context,
                              const v1::SaveCheckpointRequest* request,
                              v1::SaveCheckpointResponse* response) override;
  grpc::Status DeleteRun(grpc::ServerContext* context, const v1::DeleteRunRequest* request,
                         v1::DeleteRunResponse* response) override;

 private:
  struct Entry;

  absl::Status AddRun(std::unique_ptr<Run> run, bool write_checkpoint, v1::RunStatus* status);
  // The environment for a new run: its data set may take what the memory budget has left.
  RunEnvironment EnvironmentForNewRun() const;
  std::shared_ptr<Entry> Find(const std::string& run_id, grpc::Status* error) const;
  // A step, then the checkpoint if the step count calls for one.
  absl::Status StepAndCheckpoint(Entry& entry, const v1::StepRequest& request,
                                 v1::StepResponse* response);
  absl::Status WriteCheckpoint(Entry& entry, int64_t* step);
  std::string CheckpointPath(const std::string& run_id) const;
  void StartTrainer(const std::shared_ptr<Entry>& entry);
  void Train(Entry& entry);
  void StopTrainer(Entry& entry, std::chrono::milliseconds grace);
  v1::RunStatus StatusOf(const Entry& entry) const;

  const OptimizerOptions options_;
  mutable std::mutex mutex_;  // guards runs_ and stopped_
  std::map<std::string, std::shared_ptr<Entry>> runs_;
  int64_t memory_bytes_ = 0;  // of the runs in runs_
  bool stopped_ = false;
};

}  // namespace gradserve::optimizer

#endif  // GRADSERVE_OPTIMIZER_OPTIMIZER_SERVICE_H_
