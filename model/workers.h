// The helper threads meshlm's CPU kernels (qmatmul.cc, attention.cc) split a call's tasks with.
//
// Why not only XLA's intra-op pool: a task scheduled there starts late when the pool's other threads are
// asleep, which they are in a decode step, where each custom call waits for the one before it. Measured on
// a 2-core VM, the calling thread ran about 3 in 4 of a call's tasks itself, and a chain of 60 int8 matmuls
// of 32 rows took 1.4-2.3x as long per call as the same calls run side by side (docs/BENCHMARKS.md). These
// helpers spin for a short while (kSpin) after each call before they sleep, so the next call of a step finds
// them awake; while one call holds them, a call from another thread runs on XLA's pool as before.

#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MESHLM_PAUSE() _mm_pause()
#else
#define MESHLM_PAUSE() std::this_thread::yield()
#endif

namespace meshlm {

class Workers {
 public:
  using Fn = void (*)(void* context, int64_t task);

  // The process's helpers: `threads` - 1 of them (the caller is the other), made on first use.
  static Workers* get(int64_t threads) {
    static Workers* workers = new Workers(threads - 1);  // never destroyed: the threads are detached
    return workers;
  }

  // One call's tasks. A thread that arrives after the call has returned holds its own reference, finds no
  // task left and lets go.
  struct Job {
    Fn fn = nullptr;
    void* context = nullptr;
    int64_t total = 0;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };

  static void work(Job& job) {
    for (int64_t i; (i = job.next.fetch_add(1, std::memory_order_relaxed)) < job.total;) {
      job.fn(job.context, i);
      job.done.fetch_add(1, std::memory_order_release);
    }
  }

  // Runs fn(context, i) for i in [0, total) on the caller and the helpers; returns when all are done. False
  // (nothing run) when another call holds the helpers: the caller then schedules its tasks elsewhere.
  bool run(int64_t total, Fn fn, void* context) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    auto job = std::make_shared<Job>();
    job->fn = fn, job->context = context, job->total = total;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work(*job);
    while (job->done.load(std::memory_order_acquire) < total) std::this_thread::yield();  // a helper mid-task
    return true;
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(200);

  explicit Workers(int64_t helpers) {
    for (int64_t i = 0; i < helpers; ++i) std::thread([this] { loop(); }).detach();
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
        for (int i = 0; i < 64; ++i) MESHLM_PAUSE();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
      }
      if (job) work(*job);
    }
  }

  std::mutex busy_;   // held by the call that uses the helpers
  std::mutex mutex_;  // guards job_ and the sleep
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> job_;
};

// Runs fn(context, i) for i in [0, total) and returns when all are done: on the caller and the helpers, or,
// while another call holds those, on the caller and functions scheduled on `pool` (XLA's intra-op pool, an
// ffi::ThreadPool), which may start after the return and then find no task left.
template <class Pool>
void parallel_for(Pool& pool, int64_t total, Workers::Fn fn, void* context) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (total > 1 && threads > 1 && Workers::get(threads)->run(total, fn, context)) return;
  auto job = std::make_shared<Workers::Job>();
  job->fn = fn, job->context = context, job->total = total;
  for (int64_t h = 0; h < std::min(threads, total - 1); ++h) pool.Schedule([job] { Workers::work(*job); });
  Workers::work(*job);
  while (job->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

}  // namespace meshlm
