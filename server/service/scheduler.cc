#include "server/service/scheduler.h"

#include <sched.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>

namespace gradserve::service {

int AvailableCores() {
  int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  cpu_set_t mask;
  if (sched_getaffinity(0, sizeof(mask), &mask) == 0) cores = std::max(1, CPU_COUNT(&mask));
  // cgroup v2: "max 100000" or "<quota> <period>"; cgroup v1: two files, quota -1 if unset.
  double quota = -1, period = 0;
  if (std::ifstream v2("/sys/fs/cgroup/cpu.max"); v2) {
    std::string quota_text;
    v2 >> quota_text >> period;
    if (quota_text != "max") quota = std::atof(quota_text.c_str());
  } else if (std::ifstream v1("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"); v1) {
    v1 >> quota;
    std::ifstream("/sys/fs/cgroup/cpu/cpu.cfs_period_us") >> period;
  }
  if (quota > 0 && period > 0) {
    cores = std::min(cores, std::max(1, static_cast<int>(std::ceil(quota / period))));
  }
  return cores;
}

ComputeScheduler::ComputeScheduler(int cores, int max_queue)
    : cores_(std::max(1, cores)), max_queue_(max_queue), free_cores_(cores_) {
  workers_.reserve(cores_);
  for (int i = 0; i < cores_; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ComputeScheduler::~ComputeScheduler() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

bool ComputeScheduler::TrySubmit(int cores_wanted, std::function<void(int)> task) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_ || static_cast<int>(queue_.size()) >= max_queue_) return false;
    queue_.push_back({std::clamp(cores_wanted, 1, cores_), std::move(task)});
  }
  changed_.notify_all();
  return true;
}

int ComputeScheduler::queued() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int>(queue_.size());
}

void ComputeScheduler::WorkerLoop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(lock, [this] {
      return (!queue_.empty() && queue_.front().cores <= free_cores_) ||
             (stopping_ && queue_.empty());
    });
    if (queue_.empty()) return;  // Stopping, and everything accepted has run.
    Pending next = std::move(queue_.front());
    queue_.pop_front();
    free_cores_ -= next.cores;
    lock.unlock();
    // Another worker may be able to start the new head right away.
    changed_.notify_all();
    next.task(next.cores);
    lock.lock();
    free_cores_ += next.cores;
    changed_.notify_all();
  }
}

}  // namespace gradserve::service
