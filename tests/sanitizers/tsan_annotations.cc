// ThreadSanitizer builds only: tells TSan about two kinds of happens-before edge that Debian's
// uninstrumented abseil and gRPC libraries create but TSan cannot see:
//
// 1. absl::Mutex and absl::CondVar, which gRPC uses for all of its locking (gpr_mu and
//    grpc::internal::Mutex are absl::Mutex in gRPC 1.51).
// 2. gRPC's completion-queue contract: a batch started with grpc_call_start_batch (or a call
//    requested with grpc_server_request_[registered_]call) under a tag completes, and its tag
//    comes out of grpc_completion_queue_next/pluck, after it was started. Between the two,
//    gRPC hands the batch over through lock-free queues inside libgrpc. Without this edge, every
//    callback (a unary reactor's completion, a stream's OnReadDone/OnWriteDone, a callback
//    client's done callback) looks like it races with the code that started its operation.
//
// Why: Debian's abseil is not TSan-instrumented, so absl::Mutex's lock and unlock (atomics and
// futexes inside libabsl_synchronization.so) are invisible to TSan. Data handed from one thread
// to another under such a mutex -- a response our compute thread fills and gRPC's thread then
// serialises, a reactor gRPC binds on one thread after Finish was called on another -- then
// looks like a race in *our* instrumented code, hundreds of reports per test, none real.
//
// How: this file defines the public absl::Mutex / absl::CondVar entry points and those four
// gRPC core functions, as gRPC's C++ library and our code call them. Linked into the executable,
// its definitions come first in the dynamic symbol lookup, so every call from any library lands
// here; each forwards to the real function in libabsl_synchronization.so (dlsym RTLD_NEXT) and adds
// __tsan_release before a mutex is given up and __tsan_acquire after it is taken, keyed by the
// mutex's address -- exactly what an instrumented absl does with its ABSL_TSAN_MUTEX_* annotations.
// It adds synchronisation TSan should have seen and removes none, so it can hide no race that
// locking does not prevent. gRPC's lock-free paths (atomics inside libgrpc) stay invisible; see
// tests/sanitizers/tsan.supp.
#include <dlfcn.h>
#include <grpc/grpc.h>

#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

// The mangled names below spell abseil's inline namespace, Debian 12's "debian3".
#define GRADSERVE_STRINGIFY_(x) #x
#define GRADSERVE_STRINGIFY(x) GRADSERVE_STRINGIFY_(x)
static_assert(std::string_view(GRADSERVE_STRINGIFY(ABSL_OPTION_INLINE_NAMESPACE_NAME)) == "debian3",
              "abseil's inline namespace changed: update the mangled names in this file");

extern "C" {
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}

namespace {

// The real function, `symbol` (mangled) in the next object after this executable.
template <typename Fn>
Fn Real(const char* symbol) {
  void* f = dlsym(RTLD_NEXT, symbol);
  if (f == nullptr) {
    std::fprintf(stderr, "tsan_absl_annotations: %s not found: %s\n", symbol, dlerror());
    std::abort();
  }
  return reinterpret_cast<Fn>(f);
}

#define REAL(type, mangled)                     \
  static const auto real = Real<type>(mangled); \
  (void)0

void Acquire(const void* mu) { __tsan_acquire(const_cast<void*>(mu)); }
void Release(const void* mu) { __tsan_release(const_cast<void*>(mu)); }

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex4LockEv");
  real(this);
  Acquire(this);
}

void Mutex::ReaderLock() {
  REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex10ReaderLockEv");
  real(this);
  Acquire(this);
}

bool Mutex::TryLock() {
  REAL(bool (*)(Mutex*), "_ZN4absl7debian35Mutex7TryLockEv");
  const bool locked = real(this);
  if (locked) Acquire(this);
  return locked;
}

bool Mutex::ReaderTryLock() {
  REAL(bool (*)(Mutex*), "_ZN4absl7debian35Mutex13ReaderTryLockEv");
  const bool locked = real(this);
  if (locked) Acquire(this);
  return locked;
}

void Mutex::Unlock() {
  REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex6UnlockEv");
  Release(this);
  real(this);
}

void Mutex::ReaderUnlock() {
  REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex12ReaderUnlockEv");
  Release(this);
  real(this);
}

void Mutex::LockWhen(const Condition& cond) {
  REAL(void (*)(Mutex*, const Condition&), "_ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE");
  real(this, cond);
  Acquire(this);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  REAL(void (*)(Mutex*, const Condition&),
       "_ZN4absl7debian35Mutex14ReaderLockWhenERKNS0_9ConditionE");
  real(this, cond);
  Acquire(this);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  REAL(bool (*)(Mutex*, const Condition&, absl::Duration),
       "_ZN4absl7debian35Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  const bool met = real(this, cond, timeout);
  Acquire(this);  // Held on return either way.
  return met;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  REAL(bool (*)(Mutex*, const Condition&, absl::Time),
       "_ZN4absl7debian35Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  const bool met = real(this, cond, deadline);
  Acquire(this);
  return met;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  REAL(bool (*)(Mutex*, const Condition&, absl::Duration),
       "_ZN4absl7debian35Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  const bool met = real(this, cond, timeout);
  Acquire(this);
  return met;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  REAL(bool (*)(Mutex*, const Condition&, absl::Time),
       "_ZN4absl7debian35Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  const bool met = real(this, cond, deadline);
  Acquire(this);
  return met;
}

// Await and CondVar waits give the mutex up while they wait and hold it again on return.
void Mutex::Await(const Condition& cond) {
  REAL(void (*)(Mutex*, const Condition&), "_ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE");
  Release(this);
  real(this, cond);
  Acquire(this);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  REAL(bool (*)(Mutex*, const Condition&, absl::Duration),
       "_ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Release(this);
  const bool met = real(this, cond, timeout);
  Acquire(this);
  return met;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  REAL(bool (*)(Mutex*, const Condition&, absl::Time),
       "_ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Release(this);
  const bool met = real(this, cond, deadline);
  Acquire(this);
  return met;
}

void CondVar::Wait(Mutex* mu) {
  REAL(void (*)(CondVar*, Mutex*), "_ZN4absl7debian37CondVar4WaitEPNS0_5MutexE");
  Release(mu);
  real(this, mu);
  Acquire(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  REAL(bool (*)(CondVar*, Mutex*, absl::Duration),
       "_ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  Release(mu);
  const bool timed_out = real(this, mu, timeout);
  Acquire(mu);
  return timed_out;
}

bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  REAL(bool (*)(CondVar*, Mutex*, absl::Time),
       "_ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  Release(mu);
  const bool timed_out = real(this, mu, deadline);
  Acquire(mu);
  return timed_out;
}

ABSL_NAMESPACE_END
}  // namespace absl

// gRPC core: the completion-queue edges.
extern "C" {

grpc_call_error grpc_call_start_batch(grpc_call* call, const grpc_op* ops, size_t nops, void* tag,
                                      void* reserved) {
  REAL(grpc_call_error(*)(grpc_call*, const grpc_op*, size_t, void*, void*),
       "grpc_call_start_batch");
  Release(tag);
  return real(call, ops, nops, tag, reserved);
}

grpc_call_error grpc_server_request_call(grpc_server* server, grpc_call** call,
                                         grpc_call_details* details,
                                         grpc_metadata_array* request_metadata,
                                         grpc_completion_queue* cq_bound_to_call,
                                         grpc_completion_queue* cq_for_notification,
                                         void* tag_new) {
  REAL(grpc_call_error(*)(grpc_server*, grpc_call**, grpc_call_details*, grpc_metadata_array*,
                          grpc_completion_queue*, grpc_completion_queue*, void*),
       "grpc_server_request_call");
  Release(tag_new);
  return real(server, call, details, request_metadata, cq_bound_to_call, cq_for_notification,
              tag_new);
}

grpc_call_error grpc_server_request_registered_call(grpc_server* server, void* registered_method,
                                                    grpc_call** call, gpr_timespec* deadline,
                                                    grpc_metadata_array* request_metadata,
                                                    grpc_byte_buffer** optional_payload,
                                                    grpc_completion_queue* cq_bound_to_call,
                                                    grpc_completion_queue* cq_for_notification,
                                                    void* tag_new) {
  REAL(
      grpc_call_error(*)(grpc_server*, void*, grpc_call**, gpr_timespec*, grpc_metadata_array*,
                         grpc_byte_buffer**, grpc_completion_queue*, grpc_completion_queue*, void*),
      "grpc_server_request_registered_call");
  Release(tag_new);
  return real(server, registered_method, call, deadline, request_metadata, optional_payload,
              cq_bound_to_call, cq_for_notification, tag_new);
}

grpc_event grpc_completion_queue_next(grpc_completion_queue* cq, gpr_timespec deadline,
                                      void* reserved) {
  REAL(grpc_event(*)(grpc_completion_queue*, gpr_timespec, void*), "grpc_completion_queue_next");
  const grpc_event event = real(cq, deadline, reserved);
  if (event.type == GRPC_OP_COMPLETE) Acquire(event.tag);
  return event;
}

grpc_event grpc_completion_queue_pluck(grpc_completion_queue* cq, void* tag, gpr_timespec deadline,
                                       void* reserved) {
  REAL(grpc_event(*)(grpc_completion_queue*, void*, gpr_timespec, void*),
       "grpc_completion_queue_pluck");
  const grpc_event event = real(cq, tag, deadline, reserved);
  if (event.type == GRPC_OP_COMPLETE) Acquire(event.tag);
  return event;
}

}  // extern "C"
