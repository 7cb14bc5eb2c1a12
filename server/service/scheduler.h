// Runs compute off gRPC's threads on a fixed set of cores, fairly between clients.
//
// Note [Scheduling]
// Each call asks for a number of cores: one for a small call, all of them for a large one
// (see ComputeGradientsCost). The *main lane* (one worker thread per core for one-core calls,
// one more for multi-core calls) starts the next call as soon as enough cores are free, so small
// calls run side by side, one core each (inter-request parallelism), and a large call gets every
// core to itself as an OpenMP team (intra-request parallelism). A call's thread count depends only
// on the call itself, never on the load, so its result is bit-identical however busy the server is.
//
// Whose call is next: every client (the caller's IP address, see ClientKey) has its own queue,
// and the main lane takes the clients' oldest calls in turn (round robin), so a client with 30
// calls queued delays another client's call by at most one of its own. The call whose turn it
// is waits for the cores it needs and is not overtaken on the main lane, so a large call is
// never starved by a stream of small ones. One client may hold at most max_queue_per_client of
// the max_queue waiting places.
//
// Note [Small-call lane]
// Round robin alone does not help a small call stuck behind a large call that holds every core
// for seconds (a CheckGradients with thousands of samples, a huge batch). Three ways out were
// weighed: (1) the large call yields its cores between layers — but one layer of a large call
// can take hundreds of milliseconds, and a team must be torn down and rebuilt at each yield;
// (2) keep a core back for small calls — it halves every large call's speed on a 2-core
// machine, all the time; (3) one extra worker, the *small lane*, that runs waiting one-core
// calls while a multi-core call runs or waits for cores. (3) is what we do: the operating
// system time-slices the small call against the team (at its ~ms granularity), so a small call
// waits for other small calls only, while the large call loses at most one core's worth of
// time, and only while small calls are actually waiting. Thread counts are unchanged, so
// results stay bit-identical. At most cores + 1 threads compute at once.
// The OS shares a core fairly between equals, which still lets a team slow a small call several
// times over (and gRPC's threads, receiving a flood of requests, as much). So multi-core calls
// run on a thread of their own (only one runs at a time, as each wants every core) at nice 10,
// and so do the OpenMP threads it starts: when a small call and a team want the same core, the
// small call gets it. A large call then runs at full speed whenever nothing else is waiting for
// a core, which is almost always; on a machine shared with other programs it yields to them.
//
// Note [Places held while a message arrives]
// A client's share of the queue is claimed when its call's headers arrive, before its message is
// read (Reserve): a client that sends 80 calls of 12 MB at once has 32 of them read, and the other
// 48 are refused at their headers instead of after gRPC has received, buffered and parsed 580 MB
// for nothing (on a 2-core machine that work alone took the other clients' latency past 10x).
// The place is the call's until it is queued (TrySubmit) or it ends. Only max_queue_per_client
// counts these places: max_queue counts calls received in full, so that many clients sending
// slowly cannot lock everyone out of the queue.
#ifndef GRADSERVE_SERVICE_SCHEDULER_H_
#define GRADSERVE_SERVICE_SCHEDULER_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"

namespace gradserve::service {

// Cores this process may use: the CPU affinity mask, lowered to the cgroup CPU quota when one
// is set (a container limited to 2 CPUs on a 64-core node gets 2, not 64). At least 1.
int AvailableCores();

// Who a call is accounted to for fairness: the IP address of a gRPC peer string
// ("ipv4:10.0.0.7:53122" -> "ipv4:10.0.0.7", "ipv6:[::1]:5000" -> "ipv6:[::1]"); other peers
// (in-process, unix sockets) as given.
std::string ClientKey(const std::string& peer);

class ComputeScheduler {
 public:
  struct Options {
    int cores = 1;
    int max_queue = 64;             // Calls waiting for cores, all clients together.
    int max_queue_per_client = 32;  // Calls one client may have waiting.
    bool small_lane = true;         // Note [Small-call lane].
    int team_nice = 10;             // Nice value of multi-core calls' threads (ibid.).
  };
  // What happened to a call offered to TrySubmit.
  enum class Admission { kAccepted, kQueueFull, kClientQueueFull, kStopping };

  // A call: `run` is given the number of cores it holds; `drop` (optional) is called instead if
  // the call is dropped unrun (DropQueued); `abandoned` (optional) says the caller no longer
  // wants it (deadline passed, cancelled): such a call is dropped with DEADLINE_EXCEEDED instead
  // of run, and frees its place in the queue when the queue is full.
  struct Call {
    std::string client;
    int cores = 1;
    std::function<void(int cores)> run;
    std::function<void(const absl::Status&)> drop;
    std::function<bool()> abandoned;
  };

  // A place in one client's queue, held for a call whose message is still arriving (Note
  // [Places held while a message arrives]); given back when destroyed unless TrySubmit took it.
  class Place {
   public:
    Place() = default;
    Place(Place&& other) noexcept { *this = std::move(other); }
    Place& operator=(Place&& other) noexcept;
    ~Place() { GiveBack(); }
    bool held() const { return scheduler_ != nullptr; }
    void GiveBack();

   private:
    friend class ComputeScheduler;
    ComputeScheduler* scheduler_ = nullptr;
    std::string client_;
  };

  explicit ComputeScheduler(const Options& options);
  // Runs every call still queued, then joins the workers.
  ~ComputeScheduler();
  ComputeScheduler(const ComputeScheduler&) = delete;
  ComputeScheduler& operator=(const ComputeScheduler&) = delete;

  // Holds a place in `client`'s queue in `place` (which must hold none) if its share allows
  // one and the queue is not full now; anything but kAccepted: no place is held. Thread-safe.
  Admission Reserve(const std::string& client, Place* place);

  // Queues `call` (its cores clamped to [1, cores()]). Anything but kAccepted: the call was not
  // taken and none of its callbacks will be called. `place` (optional) is given back whatever
  // the outcome; if it held one for call.client, the client's share is not checked again.
  // Thread-safe.
  Admission TrySubmit(Call call, Place* place = nullptr);

  // Drops every call still waiting, calling its `drop` with `status` (on this thread); calls
  // already running are not affected. Returns how many were dropped. Thread-safe.
  int DropQueued(const absl::Status& status);

  int cores() const { return options_.cores; }
  const Options& options() const { return options_; }
  // Calls waiting for cores right now.
  int queued() const;

 private:
  // A main-lane worker: of the calls whose turn it is, the one-core ones, or (`team`) the
  // multi-core ones.
  void MainLoop(bool team);
  void SmallLaneLoop();
  // REQUIRES: mutex_ held. The call whose turn it is on the main lane, if any.
  Call* NextInTurn();
  // REQUIRES: mutex_ held. Removes `call` from the queue of `client` (an entry of turn_), which
  // has had its turn: it goes to the back of the turn order, or leaves it if nothing is left.
  Call Take(std::deque<std::string>::iterator client, std::deque<Call>::iterator call);
  // REQUIRES: mutex_ held. Calls `client` has waiting, and places it holds (Reserve).
  int QueuedFor(const std::string& client) const;
  // REQUIRES: mutex_ held. Whether the small lane may run a call now, and which: the oldest
  // one-core call of the first client in turn order that has one.
  bool SmallLaneHasWork() const;
  Call TakeForSmallLane();
  // REQUIRES: mutex_ held. Whether a call of `client` may join the queue now (with its share
  // checked, or not when it holds a place); abandoned calls it removes go to `dropped`.
  Admission Admit(const std::string& client, bool check_share, std::vector<Call>* dropped);
  // REQUIRES: mutex_ held. One place of `client` less.
  void ForgetPlace(const std::string& client);
  // Drops calls removed as abandoned (DEADLINE_EXCEEDED). Without mutex_ held.
  static void DropAbandoned(std::vector<Call>* dropped);
  // REQUIRES: mutex_ held. Moves abandoned calls out of the queues into `dropped`.
  void RemoveAbandoned(std::vector<Call>* dropped);
  static void Drop(std::vector<Call>* calls, const absl::Status& status);
  // Runs `call` unless it was abandoned while it waited.
  static void RunOrDrop(Call& call);

  const Options options_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::map<std::string, std::deque<Call>> queues_;  // Clients with calls waiting.
  std::deque<std::string> turn_;                    // Those clients, in turn order.
  std::map<std::string, int> places_;               // Places held, by client (Reserve).
  int queued_ = 0;
  int free_cores_;
  int multi_core_running_ = 0;  // Main-lane calls holding more than one core.
  bool small_lane_busy_ = false;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace gradserve::service

#endif  // GRADSERVE_SERVICE_SCHEDULER_H_
