// Eigen aliases and status helpers shared by the engine.
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

// Debian's abseil (20220623) ships no status macros; these are the two we need.
#define GRADSERVE_CONCAT_INNER_(a, b) a##b
#define GRADSERVE_CONCAT_(a, b) GRADSERVE_CONCAT_INNER_(a, b)

#define RETURN_IF_ERROR(expr)                           \
  do {                                                  \
    if (absl::Status status_ = (expr); !status_.ok()) { \
      return status_;                                   \
    }                                                   \
  } while (0)

#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(GRADSERVE_CONCAT_(statusor_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                           \
  if (!statusor.ok()) return statusor.status();     \
  lhs = std::move(statusor).value()

#endif  // GRADSERVE_ENGINE_TYPES_H_
