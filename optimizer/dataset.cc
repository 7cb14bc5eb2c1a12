#include "optimizer/dataset.h"

#include <sys/stat.h>

#include <cstring>
#include <filesystem>
#include <random>

#include "absl/status/status.h"

namespace gradserve::optimizer {
namespace {

namespace npy = client::npy;
namespace gv1 = gradserve::v1;

bool IsFloating(npy::DType dtype) {
  return dtype == npy::DType::kFloat32 || dtype == npy::DType::kFloat64;
}

double ReadAsDouble(const npy::Array& array, int64_t index) {
  if (array.dtype == npy::DType::kFloat32) {
    float value;
    std::memcpy(&value, array.data.data() + index * 4, 4);
    return value;
  }
  double value;
  std::memcpy(&value, array.data.data() + index * 8, 8);
  return value;
}

int64_t ReadAsInt64(const npy::Array& array, int64_t index) {
  if (array.dtype == npy::DType::kInt32) {
    int32_t value;
    std::memcpy(&value, array.data.data() + index * 4, 4);
    return value;
  }
  int64_t value;
  std::memcpy(&value, array.data.data() + index * 8, 8);
  return value;
}

// Copies the rows `rows` of `array` into `out`, converted to `dtype` (a floating dtype for
// floating arrays, INT64 for integer ones).
void GatherRows(const npy::Array& array, const int64_t* rows, int64_t count, gv1::DType dtype,
                gv1::Tensor* out) {
  out->Clear();
  out->set_dtype(dtype);
  out->add_shape(count);
  int64_t row_elements = 1;
  for (size_t d = 1; d < array.shape.size(); ++d) {
    out->add_shape(array.shape[d]);
    row_elements *= array.shape[d];
  }
  const int64_t item = dtype == gv1::DTYPE_FLOAT32 ? 4 : 8;
  std::string* data = out->mutable_data();
  data->resize(count * row_elements * item);
  char* write = data->data();
  for (int64_t r = 0; r < count; ++r) {
    const int64_t first = rows[r] * row_elements;
    for (int64_t e = 0; e < row_elements; ++e, write += item) {
      if (dtype == gv1::DTYPE_INT64) {
        const int64_t value = ReadAsInt64(array, first + e);
        std::memcpy(write, &value, 8);
      } else if (dtype == gv1::DTYPE_FLOAT32) {
        const float value = static_cast<float>(ReadAsDouble(array, first + e));
        std::memcpy(write, &value, 4);
      } else {
        const double value = ReadAsDouble(array, first + e);
        std::memcpy(write, &value, 8);
      }
    }
  }
}

absl::StatusOr<npy::Array> ReadFile(const std::string& data_dir, const std::string& relative,
                                    const std::string& field, int64_t* budget) {
  if (data_dir.empty()) {
    return absl::InvalidArgumentError(field +
                                      ": this server has no --data-dir to read data sets from");
  }
  if (!IsContainedRelativePath(relative)) {
    return absl::InvalidArgumentError(field + ": \"" + relative +
                                      "\" must be a relative path without \"..\"");
  }
  const std::string path = data_dir + "/" + relative;
  struct stat info;
  if (::stat(path.c_str(), &info) != 0 || !S_ISREG(info.st_mode)) {
    return absl::InvalidArgumentError(field + ": \"" + relative + "\" is not a file under " +
                                      data_dir);
  }
  if (info.st_size > *budget) {
    return absl::ResourceExhaustedError(
        field + ": \"" + relative + "\" is " + std::to_string(info.st_size) +
        " bytes, more than the data-set limit left (" + std::to_string(*budget) + ")");
  }
  *budget -= info.st_size;
  std::string error;
  std::optional<npy::Array> array = npy::Read(path, &error);
  if (!array) return absl::InvalidArgumentError(field + ": " + error);
  if (array->shape.empty()) return absl::InvalidArgumentError(field + ": a 0-d array has no rows");
  return *std::move(array);
}

}  // namespace

bool IsContainedRelativePath(const std::string& path) {
  if (path.empty() || path.front() == '/') return false;
  for (const auto& part : std::filesystem::path(path)) {
    if (part == "..") return false;
  }
  return true;
}

absl::StatusOr<Dataset> Dataset::Load(const v1::Dataset& spec, const std::string& field,
                                      const std::string& data_dir, gv1::DType floating,
                                      int64_t max_bytes) {
  Dataset dataset;
  int64_t budget = max_bytes;
  absl::StatusOr<npy::Array> inputs = ReadFile(data_dir, spec.inputs(), field + ".inputs", &budget);
  if (!inputs.ok()) return inputs.status();
  absl::StatusOr<npy::Array> targets =
      ReadFile(data_dir, spec.targets(), field + ".targets", &budget);
  if (!targets.ok()) return targets.status();
  if (!IsFloating(inputs->dtype)) {
    return absl::InvalidArgumentError(field + ".inputs: " + npy::DTypeName(inputs->dtype) +
                                      ", expected float32 or float64");
  }
  if (targets->dtype == npy::DType::kBool) {
    return absl::InvalidArgumentError(field + ".targets: bool, expected float or int");
  }
  if (inputs->shape[0] != targets->shape[0]) {
    return absl::InvalidArgumentError(field + ": inputs have " + std::to_string(inputs->shape[0]) +
                                      " rows and targets " + std::to_string(targets->shape[0]));
  }
  dataset.size_ = inputs->shape[0];
  if (spec.batch_size() < 1 || spec.batch_size() > dataset.size_) {
    return absl::InvalidArgumentError(field + ".batch_size: " + std::to_string(spec.batch_size()) +
                                      " is not in 1.." + std::to_string(dataset.size_) +
                                      " (the data set's size)");
  }
  dataset.inputs_ = *std::move(inputs);
  dataset.targets_ = *std::move(targets);
  dataset.floating_ = floating;
  dataset.batch_size_ = spec.batch_size();
  dataset.seed_ = spec.shuffle_seed();
  return dataset;
}

const std::vector<int64_t>& Dataset::Permutation(int64_t epoch) {
  if (epoch == cached_epoch_) return permutation_;
  // Fisher-Yates on mt19937_64, whose output sequence the C++ standard fixes (unlike
  // std::shuffle's and the distributions'), so the order is the same on every platform.
  std::seed_seq seeds{static_cast<uint32_t>(seed_), static_cast<uint32_t>(seed_ >> 32),
                      static_cast<uint32_t>(epoch), static_cast<uint32_t>(epoch >> 32)};
  std::mt19937_64 random(seeds);
  permutation_.resize(size_);
  for (int64_t i = 0; i < size_; ++i) permutation_[i] = i;
  for (int64_t i = size_ - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(random() % static_cast<uint64_t>(i + 1));
    std::swap(permutation_[i], permutation_[j]);
  }
  cached_epoch_ = epoch;
  return permutation_;
}

void Dataset::Batch(int64_t step, gv1::Tensor* inputs, gv1::Tensor* targets) {
  const int64_t epoch = step / steps_per_epoch();
  const int64_t first = (step % steps_per_epoch()) * batch_size_;
  const int64_t* rows = Permutation(epoch).data() + first;
  GatherRows(inputs_, rows, batch_size_, floating_, inputs);
  GatherRows(targets_, rows, batch_size_, IsFloating(targets_.dtype) ? floating_ : gv1::DTYPE_INT64,
             targets);
}

}  // namespace gradserve::optimizer
