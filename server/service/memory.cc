#include "server/service/memory.h"

#include <malloc.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"

namespace gradserve::service {

int64_t DefaultMaxMemoryBytes() {
  int64_t total = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
  // cgroup v2 "max" or a byte count; cgroup v1 a huge number when unset.
  for (const char* path :
       {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream file(path);
    std::string text;
    if (!(file >> text) || text == "max") continue;
    const int64_t limit = std::atoll(text.c_str());
    if (limit > 0 && limit < total) total = limit;
    break;
  }
  return total / 5 * 2;
}

void ConfigureAllocator() {
  // A fixed threshold also turns off glibc's adaptive one, which rises to 32 MiB after the first
  // large free and then keeps big blocks in the heap, where a trim cannot always reach them.
  mallopt(M_MMAP_THRESHOLD, 4 << 20);
  mallopt(M_TRIM_THRESHOLD, 16 << 20);
}

void ReturnFreeMemory() { malloc_trim(0); }

absl::Status MemoryBudget::Reserve(int64_t bytes, const char* what) {
  int64_t used = in_use_.load();
  while (used + bytes <= limit_) {
    if (in_use_.compare_exchange_weak(used, used + bytes)) return absl::OkStatus();
  }
  return absl::ResourceExhaustedError(absl::StrCat(
      "server memory busy: ", what, " needs ", bytes, " bytes and calls in flight hold ", used,
      " of max_memory_bytes (", limit_, "); retry with backoff, or send a smaller call"));
}

}  // namespace gradserve::service
