#include "pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sched.h>

#include <fstream>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RG_PAUSE() _mm_pause()
#else
#define RG_PAUSE() std::this_thread::yield()
#endif

namespace rg_native {
namespace {

// How long an idle worker spins before sleeping: long enough to catch the next product of a decode
// step without a wake-up system call, short enough not to hold a core that the BLAS's own threads or
// another process want.
constexpr auto SPIN = std::chrono::microseconds(200);

int physical_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    std::set<std::pair<std::string, std::string>> cores;
    int cpus = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (!CPU_ISSET(cpu, &set)) continue;
      ++cpus;
      const std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
      std::ifstream core(base + "core_id"), package(base + "physical_package_id");
      std::string c, p;
      if (!(core >> c) || !(package >> p)) return cpus > 0 ? CPU_COUNT(&set) : 1;
      cores.insert({p, c});
    }
    if (!cores.empty()) return (int)cores.size();
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? (int)n : 1;
}

int default_threads() {
  if (const char* env = std::getenv("RG_MLX_NATIVE_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  return physical_cores();
}

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int threads() const { return (int)workers_.size() + 1; }

  // Whether it ran the tasks (false: busy, the caller must run them).
  bool run(int n, const std::function<void(int)>& task) {
    if (n >= (1 << 20)) return false;
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    task_.store(&task, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = ((ticket_.load(std::memory_order_relaxed) >> 40) + 1) & 0xFFFFFF;
    ticket_.store(gen << 40 | (uint64_t)n << 20, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    claim(gen);
    while (done_.load(std::memory_order_acquire) < n) RG_PAUSE();
    return true;
  }

 private:
  // The ticket holds the run's generation, its task count and the next task: a worker claims a task
  // only with a compare-and-swap on the whole ticket, so a straggler from an earlier run claims nothing,
  // and a successful claim means the run is not finished (its task and caller are live).
  void claim(uint64_t gen) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    while ((t >> 40) == gen && (t & 0xFFFFF) < ((t >> 20) & 0xFFFFF)) {
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
      (*task_.load(std::memory_order_relaxed))((int)(t & 0xFFFFF));
      done_.fetch_add(1, std::memory_order_release);
      t = ticket_.load(std::memory_order_acquire);
    }
  }

  void work() {
    uint64_t seen = 0;
    for (;;) {
      auto until = std::chrono::steady_clock::now() + SPIN;
      uint64_t gen = ticket_.load(std::memory_order_acquire) >> 40;
      for (int i = 0; gen == seen; ++i) {
        RG_PAUSE();
        gen = ticket_.load(std::memory_order_acquire) >> 40;
        if ((i & 255) == 255 && std::chrono::steady_clock::now() > until) break;
      }
      if (gen == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lock, [&] { return stop_ || (ticket_.load(std::memory_order_seq_cst) >> 40) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_relaxed);
        if (stop_) return;
        gen = ticket_.load(std::memory_order_acquire) >> 40;
      }
      seen = gen;
      claim(gen);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex busy_, mutex_;
  std::condition_variable wake_;
  bool stop_ = false;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int> done_{0}, sleeping_{0};
  std::atomic<const std::function<void(int)>*> task_{nullptr};
};

std::mutex pool_mutex;
Pool* pool = nullptr;  // never destroyed: its threads may be waiting when the process exits

Pool& get_pool() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (!pool) pool = new Pool(default_threads());
  return *pool;
}

}  // namespace

int pool_threads() { return get_pool().threads(); }

void set_pool_threads(int n) {
  std::lock_guard<std::mutex> lock(pool_mutex);
  delete pool;
  pool = new Pool(n > 0 ? n : default_threads());
}

void parallel_for(int n, const std::function<void(int)>& task) {
  if (n <= 1 || get_pool().threads() == 1 || !get_pool().run(n, task))
    for (int i = 0; i < n; ++i) task(i);
}

}  // namespace rg_native
