// Memory the service accounts for, and memory it gives back.
//
// Note [Memory budget]
// gRPC hands a handler a request it has already received in full, and keeps a response until
// the client has read it; neither is bounded by per-call limits alone (64 queued calls of
// 256 MiB, or six clients that never read their 240 MiB answers, exceed any container). So every
// GradientService call reserves, against one budget (max_memory_bytes), what it will hold: its
// request and an upper bound of its answer when it arrives (refused with RESOURCE_EXHAUSTED if
// that does not fit, and the request is freed at once), then its activations and workspace once
// the plan knows them. The reservation is released when gRPC is done with the call (OnDone):
// after the client took the answer, or the call was cancelled. What gRPC buffers before a
// handler runs is bounded by its ResourceQuota, set to the same size (a smaller quota made gRPC
// close innocent clients' idle connections under a flood, to reclaim memory). So the resident
// memory stays below about: the process at start + 2 * max_memory_bytes, which the default
// (40% of the memory limit) keeps within the limit.
// Freed memory goes back to the system: buffers of 4 MiB and more are unmapped when freed
// (ConfigureAllocator), and after every 64 MiB released the service's sweeper thread trims
// glibc's heaps (gRPC's receive buffers are many small blocks that would otherwise stay).
#ifndef GRADSERVE_SERVICE_MEMORY_H_
#define GRADSERVE_SERVICE_MEMORY_H_

#include <atomic>
#include <cstdint>

#include "absl/status/status.h"

namespace gradserve::service {

// 40% of the memory this process may use: the cgroup memory limit if one is set (a container),
// else the machine's physical memory (Note [Memory budget]).
int64_t DefaultMaxMemoryBytes();

// Makes glibc's malloc give large freed blocks back to the system: buffers of 4 MiB and more
// are mapped and unmapped one by one instead of the heap growing to the largest call ever seen.
// Call once at start, before other threads allocate.
void ConfigureAllocator();

// Returns the free memory glibc holds in its heaps to the system (malloc_trim). Costs a pass
// over the heaps: call it after calls that held a lot, not after every call.
void ReturnFreeMemory();

class MemoryBudget {
 public:
  explicit MemoryBudget(int64_t limit) : limit_(limit) {}
  MemoryBudget(const MemoryBudget&) = delete;
  MemoryBudget& operator=(const MemoryBudget&) = delete;

  // Reserves `bytes` if they fit; else RESOURCE_EXHAUSTED saying what `what` needed and what is
  // held. Thread-safe.
  absl::Status Reserve(int64_t bytes, const char* what);
  void Release(int64_t bytes) {
    in_use_ -= bytes;
    released_since_trim_ += bytes;
  }
  // True (and the count starts over) once `bytes` or more were released since it last said so:
  // time to ReturnFreeMemory. Thread-safe.
  bool ReleasedAtLeast(int64_t bytes) {
    if (released_since_trim_.load() < bytes) return false;
    released_since_trim_ = 0;
    return true;
  }

  int64_t in_use() const { return in_use_.load(); }
  int64_t limit() const { return limit_; }

 private:
  const int64_t limit_;
  std::atomic<int64_t> in_use_{0};
  std::atomic<int64_t> released_since_trim_{0};
};

// What one call or stream holds against a MemoryBudget, given back by Release() or on
// destruction. Used by one thread at a time (the calls that change it are ordered by gRPC and
// the scheduler); the count is atomic only because TSan cannot see gRPC's ordering.
class MemoryReservation {
 public:
  explicit MemoryReservation(MemoryBudget* budget) : budget_(budget) {}
  ~MemoryReservation() { Release(); }
  MemoryReservation(const MemoryReservation&) = delete;
  MemoryReservation& operator=(const MemoryReservation&) = delete;

  // Holds `bytes` more; RESOURCE_EXHAUSTED (and nothing more held) if they do not fit.
  absl::Status Add(int64_t bytes, const char* what) {
    if (absl::Status fits = budget_->Reserve(bytes, what); !fits.ok()) return fits;
    bytes_ += bytes;
    return absl::OkStatus();
  }
  // Holds exactly `bytes`, more or fewer than now; as Add when it grows.
  absl::Status Set(int64_t bytes, const char* what) {
    const int64_t held = bytes_.load();
    if (bytes > held) return Add(bytes - held, what);
    budget_->Release(held - bytes);
    bytes_ = bytes;
    return absl::OkStatus();
  }
  void Release() { budget_->Release(bytes_.exchange(0)); }

 private:
  MemoryBudget* const budget_;
  std::atomic<int64_t> bytes_{0};
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_MEMORY_H_
