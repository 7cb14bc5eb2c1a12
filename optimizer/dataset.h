// A run's data set: two .npy files of examples, read once, and the batch of any step as a
// function of (shuffle seed, step) alone, so that training resumed from a checkpoint sees the
// batches an uninterrupted run would have.
#ifndef GRADSERVE_OPTIMIZER_DATASET_H_
#define GRADSERVE_OPTIMIZER_DATASET_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/npy.h"
#include "gradserve/optimizer/v1/optimizer.pb.h"
#include "gradserve/v1/gradserve.pb.h"

namespace gradserve::optimizer {

class Dataset {
 public:
  // Reads spec.inputs and spec.targets under data_dir (relative paths without ".."; the files'
  // bytes count against max_bytes together). `floating` is the dtype batches are sent in.
  // INVALID_ARGUMENT naming `field` (e.g. "spec.dataset.inputs") for a bad path, file or size.
  static absl::StatusOr<Dataset> Load(const v1::Dataset& spec, const std::string& field,
                                      const std::string& data_dir, gradserve::v1::DType floating,
                                      int64_t max_bytes);

  // Examples and steps per epoch.
  int64_t size() const { return size_; }
  int64_t steps_per_epoch() const { return size_ / batch_size_; }
  // Memory the examples take.
  int64_t bytes() const { return static_cast<int64_t>(inputs_.data.size() + targets_.data.size()); }

  // The batch of step `step` (0 for a run's first): rows of epoch step / steps_per_epoch's
  // permutation. The inputs in the run's floating dtype; integer targets as INT64, floating
  // ones in the floating dtype.
  void Batch(int64_t step, gradserve::v1::Tensor* inputs, gradserve::v1::Tensor* targets);

 private:
  Dataset() = default;
  const std::vector<int64_t>& Permutation(int64_t epoch);

  client::npy::Array inputs_;
  client::npy::Array targets_;
  gradserve::v1::DType floating_ = gradserve::v1::DTYPE_FLOAT32;
  int64_t size_ = 0;
  int64_t batch_size_ = 0;
  uint64_t seed_ = 0;
  int64_t cached_epoch_ = -1;
  std::vector<int64_t> permutation_;
};

// Whether `path` is a relative path that stays below the directory it is joined to (no "..",
// not absolute, not empty). Also for the file names of checkpoints.
bool IsContainedRelativePath(const std::string& path);

}  // namespace gradserve::optimizer

#endif  // GRADSERVE_OPTIMIZER_DATASET_H_
