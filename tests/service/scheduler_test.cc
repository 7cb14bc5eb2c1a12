// ComputeScheduler: cores are never oversubscribed beyond the small-call lane, clients take
// turns, one client cannot fill the queue, a full queue refuses at once, calls nobody waits for
// are dropped unrun, and shutdown runs or drops what was accepted.
#include "server/service/scheduler.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <random>
#include <thread>

namespace gradserve::service {
namespace {

using Admission = ComputeScheduler::Admission;
using std::chrono::milliseconds;

ComputeScheduler::Options Opts(int cores, int max_queue, int per_client = 1 << 20,
                               bool small_lane = true) {
  return {.cores = cores,
          .max_queue = max_queue,
          .max_queue_per_client = per_client,
          .small_lane = small_lane};
}

ComputeScheduler::Call MakeCall(std::string client, int cores, std::function<void(int)> run) {
  ComputeScheduler::Call call;
  call.client = std::move(client);
  call.cores = cores;
  call.run = std::move(run);
  return call;
}

// A task that blocks until released, and can tell whether it started.
struct Gate {
  std::atomic<bool> open{false};
  std::atomic<int> started{0};
  std::function<void(int)> Blocker() {
    return [this](int) {
      ++started;
      while (!open) std::this_thread::sleep_for(milliseconds(1));
    };
  }
  void WaitStarted(int n) {
    while (started < n) std::this_thread::sleep_for(milliseconds(1));
  }
};

// Records the order calls ran in.
struct Order {
  std::mutex mutex;
  std::vector<int> ids;
  std::function<void(int)> Record(int id) {
    return [this, id](int) {
      std::lock_guard<std::mutex> lock(mutex);
      ids.push_back(id);
    };
  }
  std::vector<int> WaitFor(size_t n) {
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(mutex);
        if (ids.size() >= n) return ids;
      }
      std::this_thread::sleep_for(milliseconds(1));
    }
  }
};

// Runs `n` calls of random widths up to `max_wanted` from three clients and returns the most
// cores that were busy at once. Every call must be granted min(wanted, cores) cores.
int MostCoresBusy(int cores, int max_wanted, int n, bool small_lane = true) {
  std::atomic<int> busy{0}, most_busy{0}, ran{0}, wrong_grant{0};
  {
    ComputeScheduler scheduler(Opts(cores, 1000, 1000, small_lane));
    std::mt19937 rng(2);
    for (int i = 0; i < n; ++i) {
      const int wanted = std::uniform_int_distribution<int>(1, max_wanted)(rng);
      EXPECT_EQ(scheduler.TrySubmit(
                    MakeCall(std::to_string(i % 3), wanted,
                             [&](int granted) {
                               const int now = busy += granted;
                               int seen = most_busy.load();
                               while (now > seen && !most_busy.compare_exchange_weak(seen, now)) {
                               }
                               std::this_thread::sleep_for(std::chrono::microseconds(300));
                               busy -= granted;
                               ++ran;
                             })),
                Admission::kAccepted);
    }
  }
  EXPECT_EQ(ran, n);
  EXPECT_EQ(wrong_grant, 0);
  return most_busy;
}

TEST(ComputeScheduler, NeverHoldsMoreCoresThanItHasWithoutTheSmallLane) {
  const int most_busy = MostCoresBusy(/*cores=*/3, /*max_wanted=*/4, 300, /*small_lane=*/false);
  EXPECT_LE(most_busy, 3);
  EXPECT_GE(most_busy, 2);  // Small calls did run side by side.
}

TEST(ComputeScheduler, TheSmallLaneAddsAtMostOneCore) {
  EXPECT_LE(MostCoresBusy(/*cores=*/2, /*max_wanted=*/2, 300), 3);
}

TEST(ComputeScheduler, OneCoreCallsAloneNeverUseTheSmallLane) {
  EXPECT_LE(MostCoresBusy(/*cores=*/2, /*max_wanted=*/1, 300), 2);
}

TEST(ComputeScheduler, FullQueueRefusesAtOnceAndRecovers) {
  Gate gate;
  ComputeScheduler scheduler(Opts(1, /*max_queue=*/2, 2, /*small_lane=*/false));
  std::atomic<int> ran{0};
  auto blocker = [&](int cores) {
    gate.Blocker()(cores);
    ++ran;
  };
  ASSERT_EQ(scheduler.TrySubmit(MakeCall("a", 1, blocker)), Admission::kAccepted);
  gate.WaitStarted(1);
  EXPECT_EQ(scheduler.TrySubmit(MakeCall("a", 1, blocker)), Admission::kAccepted);
  EXPECT_EQ(scheduler.TrySubmit(MakeCall("b", 1, blocker)), Admission::kAccepted);
  EXPECT_EQ(scheduler.TrySubmit(MakeCall("c", 1, blocker)), Admission::kQueueFull);
  gate.open = true;
  while (ran < 3) std::this_thread::sleep_for(milliseconds(1));
  EXPECT_EQ(scheduler.TrySubmit(MakeCall("c", 1, [&](int) { ++ran; })), Admission::kAccepted);
  while (ran < 4) std::this_thread::sleep_for(milliseconds(1));
}

TEST(ComputeScheduler, OneClientCannotFillTheQueue) {
  Gate gate;
  ComputeScheduler scheduler(Opts(1, /*max_queue=*/8, /*per_client=*/3));
  ASSERT_EQ(scheduler.TrySubmit(MakeCall("hog", 1, gate.Blocker())), Admission::kAccepted);
  gate.WaitStarted(1);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(scheduler.TrySubmit(MakeCall("hog", 1, [](int) {})), Admission::kAccepted);
  }
  EXPECT_EQ(scheduler.TrySubmit(MakeCall("hog", 1, [](int) {})), Admission::kClientQueueFull);
  EXPECT_EQ(scheduler.TrySubmit(MakeCall("other", 1, [](int) {})), Admission::kAccepted);
  EXPECT_EQ(scheduler.queued(), 4);
  gate.open = true;
}

TEST(ComputeScheduler, ClientsTakeTurns) {
  Gate gate;
  ComputeScheduler scheduler(Opts(1, 100, 100, /*small_lane=*/false));
  Order order;
  ASSERT_EQ(scheduler.TrySubmit(MakeCall("a", 1, gate.Blocker())), Admission::kAccepted);
  gate.WaitStarted(1);
  for (int i = 1; i <= 4; ++i) scheduler.TrySubmit(MakeCall("a", 1, order.Record(i)));
  scheduler.TrySubmit(MakeCall("b", 1, order.Record(100)));
  scheduler.TrySubmit(MakeCall("b", 1, order.Record(101)));
  gate.open = true;
  // First come first served would run 1 2 3 4 100 101: a and b alternate instead.
  EXPECT_EQ(order.WaitFor(6), (std::vector<int>{1, 100, 2, 101, 3, 4}));
}

TEST(ComputeScheduler, LargeCallWhoseTurnItIsIsNotOvertakenOnTheMainLane) {
  Gate gate;
  ComputeScheduler scheduler(Opts(2, 10, 10, /*small_lane=*/false));
  Order order;
  ASSERT_EQ(scheduler.TrySubmit(MakeCall("a", 1, gate.Blocker())), Admission::kAccepted);
  gate.WaitStarted(1);
  ASSERT_EQ(scheduler.TrySubmit(MakeCall("a", 2, order.Record(1))), Admission::kAccepted);
  ASSERT_EQ(scheduler.TrySubmit(MakeCall("a", 1, order.Record(2))), Admission::kAccepted);
  std::this_thread::sleep_for(milliseconds(20));
  EXPECT_TRUE(order.WaitFor(0).empty());  // One core is free, yet the small call waits.
  gate.open = true;
  EXPECT_EQ(order.WaitFor(2), (std::vector<int>{1, 2}));
}

TEST(ComputeScheduler, SmallCallRunsBesideALargeCallHoldingEveryCore) {
  Gate gate;
  ComputeScheduler scheduler(Opts(2, 10));
  std::atomic<bool> small_ran{false};
  ASSERT_EQ(scheduler.TrySubmit(MakeCall("big", 2, gate.Blocker())), Admission::kAccepted);
  gate.WaitStarted(1);
  // Another large call waits for the cores; the small one must not wait behind both.
  ASSERT_EQ(scheduler.TrySubmit(MakeCall("big", 2, [](int) {})), Admission::kAccepted);
  ASSERT_EQ(scheduler.TrySubmit(MakeCall("small", 1,
                                         [&](int cores) {
                                           EXPECT_EQ(cores, 1);
                                           small_ran = true;
                                         })),
            Admission::kAccepted);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!small_ran && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(milliseconds(1));
  }
  EXPECT_TRUE(small_ran) << "the small call waited for the large one to finish";
  EXPECT_EQ(gate.started, 1);  // The large call still runs.
  gate.open = true;
}

TEST(ComputeScheduler, AbandonedCallsAreDroppedUnrunAndGiveTheirPlacesBack) {
  Gate gate;
  ComputeScheduler scheduler(Opts(1, /*max_queue=*/2, 2, /*small_lane=*/false));
  ASSERT_EQ(scheduler.TrySubmit(MakeCall("a", 1, gate.Blocker())), Admission::kAccepted);
  gate.WaitStarted(1);
  std::atomic<bool> gone{false};
  std::atomic<int> ran{0}, dropped{0};
  for (int i = 0; i < 2; ++i) {
    ComputeScheduler::Call call = MakeCall("a", 1, [&](int) { ++ran; });
    call.abandoned = [&] { return gone.load(); };
    call.drop = [&](const absl::Status& status) {
      EXPECT_TRUE(absl::IsDeadlineExceeded(status)) << status;
      ++dropped;
    };
    ASSERT_EQ(scheduler.TrySubmit(std::move(call)), Admission::kAccepted);
  }
  EXPECT_EQ(scheduler.TrySubmit(MakeCall("b", 1, [&](int) { ++ran; })), Admission::kQueueFull);
  gone = true;  // Their callers gave up: the places are free again.
  EXPECT_EQ(scheduler.TrySubmit(MakeCall("b", 1, [&](int) { ++ran; })), Admission::kAccepted);
  EXPECT_EQ(dropped, 2);
  gate.open = true;
  while (ran < 1) std::this_thread::sleep_for(milliseconds(1));
  EXPECT_EQ(ran, 1);
}

TEST(ComputeScheduler, CallAbandonedWhileWaitingIsDroppedInsteadOfRun) {
  Gate gate;
  ComputeScheduler scheduler(Opts(1, 4, 4, /*small_lane=*/false));
  ASSERT_EQ(scheduler.TrySubmit(MakeCall("a", 1, gate.Blocker())), Admission::kAccepted);
  gate.WaitStarted(1);
  std::atomic<bool> ran{false}, dropped{false}, gone{false};
  ComputeScheduler::Call call = MakeCall("a", 1, [&](int) { ran = true; });
  call.abandoned = [&] { return gone.load(); };
  call.drop = [&](const absl::Status&) { dropped = true; };
  ASSERT_EQ(scheduler.TrySubmit(std::move(call)), Admission::kAccepted);
  gone = true;
  gate.open = true;
  while (!dropped && !ran) std::this_thread::sleep_for(milliseconds(1));
  EXPECT_TRUE(dropped);
  EXPECT_FALSE(ran);
}

TEST(ComputeScheduler, DropQueuedDropsEveryWaitingCallAndRefusesNone) {
  Gate gate;
  ComputeScheduler scheduler(Opts(1, 10));
  ASSERT_EQ(scheduler.TrySubmit(MakeCall("a", 1, gate.Blocker())), Admission::kAccepted);
  gate.WaitStarted(1);
  std::atomic<int> ran{0}, dropped{0};
  for (int i = 0; i < 5; ++i) {
    ComputeScheduler::Call call = MakeCall(std::to_string(i % 2), 1, [&](int) { ++ran; });
    call.drop = [&](const absl::Status& status) {
      EXPECT_TRUE(absl::IsUnavailable(status));
      ++dropped;
    };
    ASSERT_EQ(scheduler.TrySubmit(std::move(call)), Admission::kAccepted);
  }
  EXPECT_EQ(scheduler.DropQueued(absl::UnavailableError("shutting down")), 5);
  EXPECT_EQ(dropped, 5);
  EXPECT_EQ(scheduler.queued(), 0);
  gate.open = true;
  EXPECT_EQ(scheduler.TrySubmit(MakeCall("a", 1, [&](int) { ++ran; })), Admission::kAccepted);
  while (ran < 1) std::this_thread::sleep_for(milliseconds(1));
  EXPECT_EQ(ran, 1);
}

// Note [Places held while a message arrives].
TEST(ComputeScheduler, PlacesCountTowardTheClientsShareUntilQueuedOrGivenBack) {
  Gate gate;
  ComputeScheduler scheduler(Opts(/*cores=*/1, /*max_queue=*/8, /*per_client=*/2));
  ASSERT_EQ(scheduler.TrySubmit(MakeCall("a", 1, gate.Blocker())), Admission::kAccepted);
  gate.WaitStarted(1);  // Running, so no longer waiting: "a" has its whole share.
  ComputeScheduler::Place first, second, third;
  EXPECT_EQ(scheduler.Reserve("a", &first), Admission::kAccepted);
  EXPECT_EQ(scheduler.Reserve("a", &second), Admission::kAccepted);
  EXPECT_TRUE(second.held());
  EXPECT_EQ(scheduler.Reserve("a", &third), Admission::kClientQueueFull);
  EXPECT_FALSE(third.held());
  EXPECT_EQ(scheduler.TrySubmit(MakeCall("a", 1, [](int) {})), Admission::kClientQueueFull);
  EXPECT_EQ(scheduler.Reserve("b", &third), Admission::kAccepted);  // Another client's share.
  // A call holding a place is queued in it; its share is not checked again.
  EXPECT_EQ(scheduler.TrySubmit(MakeCall("a", 1, [](int) {}), &first), Admission::kAccepted);
  EXPECT_FALSE(first.held());
  EXPECT_EQ(scheduler.queued(), 1);  // Places are not queued calls.
  EXPECT_EQ(scheduler.Reserve("a", &first), Admission::kClientQueueFull);
  second.GiveBack();
  EXPECT_EQ(scheduler.Reserve("a", &first), Admission::kAccepted);
  { ComputeScheduler::Place moved = std::move(first); }  // Destroyed: given back.
  EXPECT_EQ(scheduler.Reserve("a", &second), Admission::kAccepted);
  gate.open = true;
}

TEST(ClientKey, IsThePeersAddressWithoutItsPort) {
  EXPECT_EQ(ClientKey("ipv4:10.0.0.7:53122"), "ipv4:10.0.0.7");
  EXPECT_EQ(ClientKey("ipv6:[::1]:5000"), "ipv6:[::1]");
  EXPECT_EQ(ClientKey("ipv4:127.0.0.1:1"), ClientKey("ipv4:127.0.0.1:2"));
  EXPECT_NE(ClientKey("ipv4:127.0.0.1:1"), ClientKey("ipv4:127.0.0.2:1"));
  EXPECT_EQ(ClientKey("unix:/tmp/socket"), "unix:/tmp/socket");
}

TEST(AvailableCores, IsPositiveAndAtMostTheMachine) {
  EXPECT_GE(AvailableCores(), 1);
  EXPECT_LE(AvailableCores(), static_cast<int>(std::thread::hardware_concurrency()));
}

}  // namespace
}  // namespace gradserve::service
