// A fixed set of worker threads with a bounded queue: compute never runs on a gRPC reaction
// thread, and a burst beyond the queue is refused at once instead of piling up.
#ifndef GRADSERVE_SERVICE_COMPUTE_POOL_H_
#define GRADSERVE_SERVICE_COMPUTE_POOL_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace gradserve::service {

class ComputePool {
 public:
  // Starts `workers` threads; at most `max_queue` tasks wait for one.
  ComputePool(int workers, int max_queue);
  // Runs every task already accepted, then joins the workers.
  ~ComputePool();
  ComputePool(const ComputePool&) = delete;
  ComputePool& operator=(const ComputePool&) = delete;

  // Queues `task`; false (and `task` dropped unrun) if the queue is full or the pool is
  // shutting down. Thread-safe.
  bool TrySubmit(std::function<void()> task);

  int workers() const { return static_cast<int>(threads_.size()); }
  int max_queue() const { return max_queue_; }

 private:
  void WorkerLoop();

  const int max_queue_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_COMPUTE_POOL_H_
