// Work sharing for the native kernels: the calling thread and helpers on XLA's intra-op pool.
#ifndef BATCHJAX_KERNELS_PARALLEL_H_
#define BATCHJAX_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace batchjax {

// Threads the work is shared among: the pool's, at most one per core.
inline int64_t NumThreads(xla::ffi::ThreadPool& pool) {
  return std::max<int64_t>(
      1, std::min<int64_t>(pool.num_threads(), std::thread::hardware_concurrency()));
}

// Runs worker(item) for every item in [0, items): make_worker() builds a thread's worker (its
// scratch) before its first item. Items are claimed through an atomic counter by the caller
// and by up to (threads - 1) helpers scheduled on the pool; the caller waits only until every
// item is done, so a helper that starts late claims nothing (and builds no worker), and a pool
// with no free thread leaves the caller to do everything itself.
template <typename MakeWorker>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, MakeWorker make_worker) {
  if (items <= 0) return;
  struct State {
    State(int64_t n, MakeWorker m) : items(n), make(std::move(m)) {}
    const int64_t items;
    MakeWorker make;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>(items, std::move(make_worker));
  auto drain = [](State& s) {
    std::optional<decltype(s.make())> worker;
    for (int64_t item; (item = s.next.fetch_add(1)) < s.items;) {
      if (!worker) worker.emplace(s.make());
      (*worker)(item);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(NumThreads(pool) - 1, items - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([state, drain] { drain(*state); });
  }
  drain(*state);
  while (state->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

}  // namespace batchjax

#endif  // BATCHJAX_KERNELS_PARALLEL_H_
