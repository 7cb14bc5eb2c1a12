#include "server/service/scheduler.h"

#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <utility>

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

std::string ClientKey(const std::string& peer) {
  // "ipv4:1.2.3.4:5678" and "ipv6:[::1]:5678": drop the port, keep the address.
  if (peer.rfind("ipv4:", 0) == 0 || peer.rfind("ipv6:", 0) == 0) {
    const size_t colon = peer.rfind(':');
    if (colon > 4) return peer.substr(0, colon);
  }
  return peer;
}

ComputeScheduler::ComputeScheduler(const Options& options)
    : options_([&] {
        Options o = options;
        o.cores = std::max(1, o.cores);
        o.max_queue = std::max(0, o.max_queue);
        o.max_queue_per_client = std::clamp(o.max_queue_per_client, 0, o.max_queue);
        return o;
      }()),
      free_cores_(options_.cores) {
  workers_.reserve(options_.cores + 1);
  for (int i = 0; i < options_.cores; ++i) {
    workers_.emplace_back([this] { MainLoop(/*team=*/false); });
  }
  // The service's multi-core calls each want every core, so they run one at a time: one thread
  // (Note [Small-call lane]) runs them all.
  if (options_.cores > 1) workers_.emplace_back([this] { MainLoop(/*team=*/true); });
  if (options_.small_lane) workers_.emplace_back([this] { SmallLaneLoop(); });
}

ComputeScheduler::~ComputeScheduler() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

ComputeScheduler::Place& ComputeScheduler::Place::operator=(Place&& other) noexcept {
  if (this != &other) {
    GiveBack();
    scheduler_ = std::exchange(other.scheduler_, nullptr);
    client_ = std::move(other.client_);
  }
  return *this;
}

void ComputeScheduler::Place::GiveBack() {
  if (scheduler_ == nullptr) return;
  std::lock_guard<std::mutex> lock(scheduler_->mutex_);
  scheduler_->ForgetPlace(client_);
  scheduler_ = nullptr;
}

void ComputeScheduler::ForgetPlace(const std::string& client) {
  const auto it = places_.find(client);
  if (--it->second == 0) places_.erase(it);
}

ComputeScheduler::Admission ComputeScheduler::Reserve(const std::string& client, Place* place) {
  std::vector<Call> dropped;
  Admission admission = Admission::kAccepted;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    admission = Admit(client, /*check_share=*/true, &dropped);
    if (admission == Admission::kAccepted) {
      ++places_[client];
      place->scheduler_ = this;
      place->client_ = client;
    }
  }
  DropAbandoned(&dropped);
  return admission;
}

ComputeScheduler::Admission ComputeScheduler::TrySubmit(Call call, Place* place) {
  std::vector<Call> dropped;
  Admission admission = Admission::kAccepted;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const bool placed =
        place != nullptr && place->scheduler_ == this && place->client_ == call.client;
    if (placed) {
      ForgetPlace(call.client);
      place->scheduler_ = nullptr;
    }
    admission = Admit(call.client, /*check_share=*/!placed, &dropped);
    if (admission == Admission::kAccepted) {
      call.cores = std::clamp(call.cores, 1, options_.cores);
      std::deque<Call>& calls = queues_[call.client];
      if (calls.empty()) turn_.push_back(call.client);
      calls.push_back(std::move(call));
      ++queued_;
    }
  }
  if (place != nullptr) place->GiveBack();  // A place held for another client.
  DropAbandoned(&dropped);
  if (admission == Admission::kAccepted) changed_.notify_all();
  return admission;
}

ComputeScheduler::Admission ComputeScheduler::Admit(const std::string& client, bool check_share,
                                                    std::vector<Call>* dropped) {
  if (stopping_) return Admission::kStopping;
  const auto share_full = [&] {
    return check_share && QueuedFor(client) >= options_.max_queue_per_client;
  };
  // Calls nobody waits for any more give their places back before anyone is refused.
  if (queued_ >= options_.max_queue || share_full()) RemoveAbandoned(dropped);
  if (queued_ >= options_.max_queue) return Admission::kQueueFull;
  if (share_full()) return Admission::kClientQueueFull;
  return Admission::kAccepted;
}

void ComputeScheduler::DropAbandoned(std::vector<Call>* dropped) {
  Drop(dropped, absl::DeadlineExceededError(
                    "the call was abandoned (deadline passed or cancelled) while it waited "
                    "for cores"));
}

int ComputeScheduler::DropQueued(const absl::Status& status) {
  std::vector<Call> dropped;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [client, calls] : queues_) {
      for (Call& call : calls) dropped.push_back(std::move(call));
    }
    queues_.clear();
    turn_.clear();
    queued_ = 0;
  }
  changed_.notify_all();
  const int count = static_cast<int>(dropped.size());
  Drop(&dropped, status);
  return count;
}

int ComputeScheduler::queued() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return queued_;
}

void ComputeScheduler::Drop(std::vector<Call>* calls, const absl::Status& status) {
  for (Call& call : *calls) {
    if (call.drop) call.drop(status);
  }
  calls->clear();
}

void ComputeScheduler::RunOrDrop(Call& call) {
  if (call.abandoned && call.abandoned()) {
    std::vector<Call> dropped;
    dropped.push_back(std::move(call));
    DropAbandoned(&dropped);
    return;
  }
  call.run(call.cores);
}

void ComputeScheduler::RemoveAbandoned(std::vector<Call>* dropped) {
  for (auto it = queues_.begin(); it != queues_.end();) {
    std::deque<Call>& calls = it->second;
    for (auto call = calls.begin(); call != calls.end();) {
      if (call->abandoned && call->abandoned()) {
        dropped->push_back(std::move(*call));
        call = calls.erase(call);
        --queued_;
      } else {
        ++call;
      }
    }
    if (calls.empty()) {
      turn_.erase(std::find(turn_.begin(), turn_.end(), it->first));
      it = queues_.erase(it);
    } else {
      ++it;
    }
  }
}

int ComputeScheduler::QueuedFor(const std::string& client) const {
  const auto queue = queues_.find(client);
  const auto places = places_.find(client);
  return (queue == queues_.end() ? 0 : static_cast<int>(queue->second.size())) +
         (places == places_.end() ? 0 : places->second);
}

ComputeScheduler::Call* ComputeScheduler::NextInTurn() {
  if (turn_.empty()) return nullptr;
  return &queues_.at(turn_.front()).front();
}

ComputeScheduler::Call ComputeScheduler::Take(std::deque<std::string>::iterator client,
                                              std::deque<Call>::iterator call) {
  const std::string name = *client;
  std::deque<Call>& calls = queues_.at(name);
  Call taken = std::move(*call);
  calls.erase(call);
  --queued_;
  turn_.erase(client);
  if (calls.empty()) {
    queues_.erase(name);
  } else {
    turn_.push_back(name);
  }
  return taken;
}

bool ComputeScheduler::SmallLaneHasWork() const {
  if (small_lane_busy_ || queued_ == 0) return false;
  // Only while a multi-core call runs or waits for cores: otherwise the main lane starts small
  // calls as soon as a core frees, and a third thread would only slow the other two down.
  const Call& next = queues_.at(turn_.front()).front();
  const bool multi_core_waits = next.cores > 1 && next.cores > free_cores_;
  if (multi_core_running_ == 0 && !multi_core_waits) return false;
  if (next.cores == 1 && free_cores_ >= 1) return false;  // The main lane takes it now.
  for (const std::string& client : turn_) {
    for (const Call& call : queues_.at(client)) {
      if (call.cores == 1) return true;
    }
  }
  return false;
}

ComputeScheduler::Call ComputeScheduler::TakeForSmallLane() {
  for (auto client = turn_.begin(); client != turn_.end(); ++client) {
    std::deque<Call>& calls = queues_.at(*client);
    for (auto it = calls.begin(); it != calls.end(); ++it) {
      if (it->cores == 1) return Take(client, it);
    }
  }
  std::abort();  // REQUIRES: SmallLaneHasWork().
}

void ComputeScheduler::MainLoop(bool team) {
  // Note [Small-call lane]: the team's master and the OpenMP threads it starts (they inherit
  // it) yield to the one-core threads when both want a core. Raising one's own nice value
  // needs no privilege; failing to would only cost the small calls some latency.
  if (team) setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), options_.team_nice);
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(lock, [this, team] {
      const Call* next = NextInTurn();
      return (next != nullptr && (next->cores > 1) == team && next->cores <= free_cores_) ||
             (stopping_ && queued_ == 0);
    });
    if (queued_ == 0) return;  // Stopping, and everything accepted has run.
    Call call = Take(turn_.begin(), queues_.at(turn_.front()).begin());
    const int cores = call.cores;
    free_cores_ -= cores;
    if (cores > 1) ++multi_core_running_;
    lock.unlock();
    // Another worker may be able to start the new head right away.
    changed_.notify_all();
    RunOrDrop(call);
    call = Call();  // Its captures (the request, the reactor) go before the cores come back.
    lock.lock();
    free_cores_ += cores;
    if (cores > 1) --multi_core_running_;
    changed_.notify_all();
  }
}

void ComputeScheduler::SmallLaneLoop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(lock, [this] { return SmallLaneHasWork() || stopping_; });
    if (!SmallLaneHasWork()) {
      if (stopping_) return;  // The main lane runs whatever is left.
      continue;
    }
    Call call = TakeForSmallLane();
    small_lane_busy_ = true;
    lock.unlock();
    changed_.notify_all();
    RunOrDrop(call);
    call = Call();
    lock.lock();
    small_lane_busy_ = false;
    changed_.notify_all();
  }
}

}  // namespace gradserve::service
