// NumPy .npz archives (numpy.savez: a zip of .npy files, stored uncompressed), written so that a
// crash never leaves a torn file: the checkpoints of the optimizer service. The zip container
// is libzip's; the .npy members are client/npy's.
#ifndef GRADSERVE_OPTIMIZER_NPZ_H_
#define GRADSERVE_OPTIMIZER_NPZ_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "client/npy.h"

namespace gradserve::optimizer {

// Member name (without ".npy") -> array, as numpy.load(path) keys them.
using NpzArrays = std::vector<std::pair<std::string, client::npy::Array>>;

// Writes `arrays` to `path` atomically: into a temporary file in the same directory, fsynced,
// renamed over `path`, and the directory fsynced, so that after a crash `path` holds either
// its previous content or all of the new one.
absl::Status WriteNpzAtomically(const std::string& path, const NpzArrays& arrays);

// Reads every member of the .npz at `path`. Members larger than max_member_bytes, or more
// than max_members of them, are refused before they are read.
absl::StatusOr<std::map<std::string, client::npy::Array>> ReadNpz(const std::string& path,
                                                                  int64_t max_member_bytes,
                                                                  int64_t max_members);

}  // namespace gradserve::optimizer

#endif  // GRADSERVE_OPTIMIZER_NPZ_H_
