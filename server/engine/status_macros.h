// RETURN_IF_ERROR and ASSIGN_OR_RETURN for absl::Status / absl::StatusOr.
//
// Debian's abseil (20220623) ships no status macros; these are the two we need. They live apart
// from the Eigen aliases (types.h) so that code which only propagates errors, the service's
// included, does not pull in Eigen for them.
#ifndef GRADSERVE_ENGINE_STATUS_MACROS_H_
#define GRADSERVE_ENGINE_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

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

#endif  // GRADSERVE_ENGINE_STATUS_MACROS_H_
