// A persistent pool of worker threads, one per physical core (the caller counts as one), for splitting a
// product over the cores without creating threads per call.
#pragma once

#include <functional>

namespace rg_native {

// Threads a product may use (workers + the calling thread).
int pool_threads();
// Resize the pool (n >= 1; 0: one per physical core, or RG_MLX_NATIVE_THREADS).
void set_pool_threads(int n);
// Run task(i) for i in [0, n) over the pool and the calling thread; returns when all are done. Tasks
// are claimed dynamically. If the pool is busy (another MLX stream's thread is using it), the caller
// runs all tasks itself.
void parallel_for(int n, const std::function<void(int)>& task);

}  // namespace rg_native
