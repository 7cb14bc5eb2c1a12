// ComputeScheduler: cores are never oversubscribed, calls start first come first served, a full
// queue refuses at once, and shutdown runs what was accepted.
#include "server/service/scheduler.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>

namespace gradserve::service {
namespace {

TEST(ComputeScheduler, NeverHoldsMoreCoresThanItHas) {
  constexpr int kCores = 3;
  std::atomic<int> busy{0}, most_busy{0}, ran{0}, wrong_grant{0};
  {
    ComputeScheduler scheduler(kCores, /*max_queue=*/1000);
    std::mt19937 rng(1);
    for (int i = 0; i < 300; ++i) {
      const int wanted = std::uniform_int_distribution<int>(1, kCores + 1)(rng);
      ASSERT_TRUE(scheduler.TrySubmit(wanted, [&, wanted](int cores) {
        if (cores != std::min(wanted, kCores)) ++wrong_grant;
        const int now = busy += cores;
        int seen = most_busy.load();
        while (now > seen && !most_busy.compare_exchange_weak(seen, now)) {
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        busy -= cores;
        ++ran;
      }));
    }
  }  // The destructor runs everything accepted.
  EXPECT_EQ(ran, 300);
  EXPECT_EQ(wrong_grant, 0);
  EXPECT_LE(most_busy, kCores);
  EXPECT_GE(most_busy, 2);  // Small calls did run side by side.
}

TEST(ComputeScheduler, FullQueueRefusesAtOnceAndRecovers) {
  ComputeScheduler scheduler(1, /*max_queue=*/2);
  std::atomic<bool> release{false};
  std::atomic<int> ran{0};
  auto blocker = [&](int) {
    while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    ++ran;
  };
  ASSERT_TRUE(scheduler.TrySubmit(1, blocker));
  while (scheduler.queued() != 0) std::this_thread::yield();  // The worker took it.
  EXPECT_TRUE(scheduler.TrySubmit(1, blocker));
  EXPECT_TRUE(scheduler.TrySubmit(1, blocker));
  EXPECT_FALSE(scheduler.TrySubmit(1, blocker));  // Two waiting: full.
  release = true;
  while (ran < 3) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_TRUE(scheduler.TrySubmit(1, [&](int) { ++ran; }));
  while (ran < 4) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

TEST(ComputeScheduler, LargeCallAtTheHeadIsNotOvertaken) {
  ComputeScheduler scheduler(2, /*max_queue=*/10);
  std::atomic<bool> release{false};
  std::vector<int> order;
  std::mutex order_mutex;
  auto record = [&](int id) {
    std::lock_guard<std::mutex> lock(order_mutex);
    order.push_back(id);
  };
  ASSERT_TRUE(scheduler.TrySubmit(1, [&](int) {
    while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    record(0);
  }));
  while (scheduler.queued() != 0) std::this_thread::yield();
  ASSERT_TRUE(scheduler.TrySubmit(2, [&](int) { record(1); }));  // Needs both cores.
  ASSERT_TRUE(scheduler.TrySubmit(1, [&](int) { record(2); }));  // Could fit now, must wait.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  {
    std::lock_guard<std::mutex> lock(order_mutex);
    EXPECT_TRUE(order.empty());
  }
  release = true;
  while (true) {
    std::lock_guard<std::mutex> lock(order_mutex);
    if (order.size() == 3) break;
  }
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2}));
}

TEST(AvailableCores, IsPositiveAndAtMostTheMachine) {
  EXPECT_GE(AvailableCores(), 1);
  EXPECT_LE(AvailableCores(), static_cast<int>(std::thread::hardware_concurrency()));
}

}  // namespace
}  // namespace gradserve::service
