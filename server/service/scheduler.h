// Runs compute off gRPC's threads on a fixed set of cores without oversubscribing them.
//
// Note [Scheduling]
// Each call asks for a number of cores: one for a small call, all of them for a large one
// (see ComputeGradientsCost). The scheduler has one worker thread per core and starts the
// oldest waiting call as soon as enough cores are free, so small calls run side by side, one
// core each (inter-request parallelism), and a large call gets every core to itself as an
// OpenMP team (intra-request parallelism). Admission is first come, first served: a large call
// at the head waits for the cores to drain rather than being overtaken forever. The number of
// busy cores never exceeds the total, so OpenMP teams never fight each other for cores.
// A call's thread count depends only on the call itself, never on the load, so its result is
// bit-identical however busy the server is.
#ifndef GRADSERVE_SERVICE_SCHEDULER_H_
#define GRADSERVE_SERVICE_SCHEDULER_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace gradserve::service {

// Cores this process may use: the CPU affinity mask, lowered to the cgroup CPU quota when one
// is set (a container limited to 2 CPUs on a 64-core node gets 2, not 64). At least 1.
int AvailableCores();

class ComputeScheduler {
 public:
  // `cores` worker threads; at most `max_queue` calls wait for cores.
  ComputeScheduler(int cores, int max_queue);
  // Runs every call already accepted, then joins the workers.
  ~ComputeScheduler();
  ComputeScheduler(const ComputeScheduler&) = delete;
  ComputeScheduler& operator=(const ComputeScheduler&) = delete;

  // Queues `task`, to be run with `cores_wanted` cores (clamped to [1, cores()]); the task is
  // given the number of cores it holds. False (task dropped unrun) if the queue is full or the
  // scheduler is shutting down. Thread-safe.
  bool TrySubmit(int cores_wanted, std::function<void(int cores)> task);

  int cores() const { return cores_; }
  int max_queue() const { return max_queue_; }
  // Calls waiting for cores right now.
  int queued() const;

 private:
  struct Pending {
    int cores;
    std::function<void(int)> task;
  };
  void WorkerLoop();

  const int cores_;
  const int max_queue_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Pending> queue_;
  int free_cores_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_SCHEDULER_H_
