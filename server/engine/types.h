// Eigen aliases shared by the engine (the status macros are in status_macros.h).
//
// Every matrix in gradserve is row-major, matching the wire format (and PyTorch's contiguous
// tensors), so a request's bytes can be viewed in place with a Map.
#ifndef GRADSERVE_ENGINE_TYPES_H_
#define GRADSERVE_ENGINE_TYPES_H_

#include <Eigen/Core>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace gradserve::engine {

template <typename T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Views over memory the engine does not own (request and response buffers). Unaligned because
// protobuf byte strings guarantee no SIMD alignment.
template <typename T>
using MatrixMap = Eigen::Map<Matrix<T>, Eigen::Unaligned>;
template <typename T>
using ConstMatrixMap = Eigen::Map<const Matrix<T>, Eigen::Unaligned>;

}  // namespace gradserve::engine

#endif  // GRADSERVE_ENGINE_TYPES_H_
