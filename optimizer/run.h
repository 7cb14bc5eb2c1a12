// One training run: its spec, its parameters and optimizer state in float64, its data set, and
// the step that ties them to gradserve (Note [A step] in run.cc). No gRPC server code here: the
// service (optimizer_service.h) schedules runs, trains them in the background and checkpoints
// them.
#ifndef GRADSERVE_OPTIMIZER_RUN_H_
#define GRADSERVE_OPTIMIZER_RUN_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/npy.h"
#include "gradserve/optimizer/v1/optimizer.pb.h"
#include "gradserve/sharded_client.h"
#include "optimizer/dataset.h"
#include "optimizer/npz.h"
#include "optimizer/update_rule.h"

namespace gradserve::optimizer {

// What every run of one server shares.
struct RunEnvironment {
  // Data sets are read from under here; empty: runs may not name one.
  std::string data_dir;
  // The files of one data set together; the service lowers it to its memory budget's rest.
  int64_t max_dataset_bytes = int64_t{4} << 30;
  // Targets and parts for a spec that names none.
  std::vector<std::string> default_targets;
  int default_shards = 0;
  // Parameters sent to gradserve each step must fit one message.
  int64_t max_message_bytes = int64_t{256} << 20;
  // Deadline of one step's gradient call, retries on other replicas included.
  std::chrono::milliseconds step_timeout{60000};
  // The bearer token gradserve wants; empty: none.
  std::string gradserve_token;
  // Default checkpoint interval (RunSpec.checkpoint_every 0).
  int64_t checkpoint_every = 100;
};

// [A-Za-z0-9_.-]{1,64}, not starting with '.'.
bool IsValidRunId(const std::string& run_id);

class Run {
 public:
  // A new run at step 0, its parameters from the spec (or its seed, or the ONNX file).
  // INVALID_ARGUMENT naming the spec's field for anything the spec gets wrong.
  static absl::StatusOr<std::unique_ptr<Run>> Create(const v1::RunSpec& spec,
                                                     const RunEnvironment& environment);
  // A run from its checkpoint's arrays (ReadNpz). `operational`, if given, replaces the fields
  // that do not change the trajectory (targets, shards, max_steps, checkpoint_every): a --run
  // file may change them across a restart. `where` names the checkpoint in errors.
  static absl::StatusOr<std::unique_ptr<Run>> Restore(
      const std::map<std::string, client::npy::Array>& checkpoint, const std::string& where,
      const v1::RunSpec* operational, const RunEnvironment& environment);

  // Whether `spec` describes this run's trajectory: equal but for the initial parameters and
  // the operational fields.
  bool SameTrajectory(const v1::RunSpec& spec) const;

  // One step (Note [A step]) on the request's batch, or on the data set's next one. Steps are
  // taken one at a time; other calls (Status, Parameters, CheckpointArrays) read a consistent
  // state meanwhile.
  absl::Status Step(const v1::StepRequest& request, v1::StepResponse* response);

  // The state and, for the RunStatus, the fields a Run knows (not state or error).
  v1::RunStatus Status() const;
  int64_t step() const;
  bool has_dataset() const { return dataset_.has_value(); }
  const v1::RunSpec& spec() const { return spec_; }
  int64_t checkpoint_every() const;
  // What the run holds in memory: parameters and optimizer state in float64, and its data set.
  int64_t MemoryBytes() const;

  v1::GetParametersResponse Parameters() const;
  // The checkpoint's members (see optimizer.proto) at the current step.
  NpzArrays CheckpointArrays() const;

 private:
  struct Parameter {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<double> value;
    ParameterState state;
  };

  Run() = default;
  absl::Status Prepare(const v1::RunSpec& spec, const RunEnvironment& environment);
  // The gradserve request for a batch, parameters rounded to the run's dtype.
  absl::Status BuildRequest(const v1::StepRequest& request,
                            gradserve::v1::ComputeGradientsRequest* out);

  v1::RunSpec spec_;  // initial parameters cleared
  RunEnvironment environment_;
  UpdateRule rule_;
  gradserve::v1::DType dtype_ = gradserve::v1::DTYPE_FLOAT32;
  // What gradserve is sent as the model: the spec's, or the ONNX file imported once.
  gradserve::v1::Model model_;
  bool chain_ = true;
  std::string input_name_;
  std::string target_name_;
  std::unique_ptr<client::ShardedClient> gradserve_;
  int shards_ = 1;

  std::mutex step_mutex_;  // one step at a time; held for the whole step
  std::optional<Dataset> dataset_;

  mutable std::mutex state_mutex_;  // guards what follows; never held across a gradserve call
  std::vector<Parameter> parameters_;
  int64_t step_ = 0;
  std::vector<double> losses_;
  std::optional<v1::StepResponse> last_step_;
};

}  // namespace gradserve::optimizer

#endif  // GRADSERVE_OPTIMIZER_RUN_H_
