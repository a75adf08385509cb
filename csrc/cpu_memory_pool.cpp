// Scoped caching CPU allocator: see cpu_memory_pool.h and docs/memory-pool.md.
#include "cpu_memory_pool.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <cerrno>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

namespace robust_ops {
namespace {

// Blocks below this size are left to the default allocator: glibc serves them from its heap without faulting.
constexpr size_t kMinPooledBytes = size_t(64) << 10;
// 64-byte alignment like c10::alloc_cpu, so oneDNN and the vectorised kernels pick the same code paths.
constexpr size_t kAlignment = 64;
// A cached block serves a request of at least half its capacity (IMA's active sets shrink step by step).
constexpr size_t kMaxSlack = 2;

// Round up to 1/8 of the highest power of two below n: at most 12.5% waste, few distinct sizes.
size_t size_class(size_t n) {
  size_t top = size_t(1) << (63 - __builtin_clzll(n));
  size_t quantum = top >= 8 ? top / 8 : 1;
  return (n + quantum - 1) / quantum * quantum;
}

size_t cache_limit_bytes() {
  // ROBUST_OPS_CPU_POOL_LIMIT_MB caps what the pool keeps cached (default 4096 MB); blocks beyond it are freed.
  const char* env = std::getenv("ROBUST_OPS_CPU_POOL_LIMIT_MB");
  if (env == nullptr) return size_t(4096) << 20;
  char* end = nullptr;
  errno = 0;
  long long mb = std::strtoll(env, &end, 10);
  // A typo must not turn caching off (or cap it at a prefix) silently.
  TORCH_CHECK(end != env && *end == '\0' && errno == 0 && mb >= 0 && mb < (1LL << 43),
              "ROBUST_OPS_CPU_POOL_LIMIT_MB: expected a whole number of megabytes >= 0 (0 caches nothing), got '", env,
              "'");
  return size_t(mb) << 20;
}

// Every block is a plain posix_memalign pointer with no header, because memory crosses allocators: oneDNN (ideep)
// takes raw buffers with GetCPUAllocator()->raw_allocate and returns them with GetCPUAllocator()->raw_deallocate,
// which can be the default allocator's free() for a pool block (after the pool ended) or the pool's deleter for a
// default block (allocated before it began). Both are free()-able; the pool recognises its own blocks by address,
// and forgets all of them when it ends, so a later free of one of them is a plain free().
class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinPooledBytes) return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    size_t capacity = size_class(nbytes);
    void* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(capacity);
      if (it != free_.end() && it->first <= capacity * kMaxSlack) {
        block = it->second;
        capacity = it->first;
        cached_bytes_ -= capacity;
        free_.erase(it);
        ++hits_;
      } else if (depth_ > 0) {  // not the allocations of a tensor from an ended pool resizing (resize_)
        ++misses_;
      }
    }
    if (block == nullptr && posix_memalign(&block, kAlignment, capacity) != 0) {
      release_cached();  // out of memory: give the cache back and try once more
      TORCH_CHECK(posix_memalign(&block, kAlignment, capacity) == 0,
                  "robust_ops CPU memory pool: out of memory allocating ", nbytes, " bytes");
    }
    size_t in_use = 0, reserved = 0;
    bool recorded = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The outermost exit() may have run on another thread since the block was taken: it cleared owned_ and the
      // in-use count, so recording the block now would count it against the next pool (an unsigned underflow when
      // it dies there). Unrecorded, it is a plain posix_memalign block that delete_block frees.
      if (depth_ > 0) {
        owned_[block] = capacity;
        in_use_bytes_ += capacity;
        recorded = true;
      }
      in_use = in_use_bytes_;
      reserved = in_use_bytes_ + cached_bytes_;
    }
    // torch.profiler(profile_memory=True) sees pool blocks
    if (recorded) report(block, int64_t(capacity), in_use, reserved);
    return {block, block, &PoolAllocator::delete_block, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &PoolAllocator::delete_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  static PoolAllocator& instance() {
    static PoolAllocator* pool = [] {
      // fork() copies the maps as they are: the forking thread takes the lock first, so no other thread is halfway
      // through changing them (a child forked mid-insert crashed); both processes then release it.
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
      return new PoolAllocator();  // never destroyed: tensors may outlive static destructors
    }();
    return *pool;
  }

  bool enter() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (depth_ == 0) {
      // Only in place of PyTorch's default allocator, whose blocks free() releases: another library's allocator
      // (installed with SetCPUAllocator) stays as it is and the pool stays off.
      if (c10::GetCPUAllocator() != c10::GetDefaultCPUAllocator()) return false;
      const size_t limit = cache_limit_bytes();  // may throw: before the allocator is swapped
      c10::SetCPUAllocator(this, 0);
      if (c10::GetCPUAllocator() != this) return false;
      limit_ = limit;
    }
    ++depth_;
    return true;
  }

  void exit() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      TORCH_CHECK(depth_ > 0, "robust_ops CPU memory pool: exit without a matching enter");
      if (--depth_ > 0) return;
      c10::SetCPUAllocator(c10::GetDefaultCPUAllocator(), 0);
      owned_.clear();  // blocks still in use are freed with free() whoever releases them
      in_use_bytes_ = 0;
    }
    release_cached();
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {depth_, hits_, misses_, int64_t(cached_bytes_), int64_t(in_use_bytes_)};
  }

 private:
  static void report(void* block, int64_t delta, size_t in_use, size_t reserved) {
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(block, delta, in_use, reserved, c10::Device(c10::DeviceType::CPU));
  }

  static void delete_block(void* block) {
    if (block == nullptr) return;
    PoolAllocator& pool = instance();
    bool cached = false, ours = false;
    size_t capacity = 0, in_use = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      auto it = pool.owned_.find(block);
      if (it != pool.owned_.end()) {
        ours = true;
        capacity = it->second;
        pool.owned_.erase(it);
        pool.in_use_bytes_ -= capacity;
        if (pool.depth_ > 0 && pool.cached_bytes_ + capacity <= pool.limit_) {
          pool.free_.emplace(capacity, block);
          pool.cached_bytes_ += capacity;
          cached = true;
        }
        in_use = pool.in_use_bytes_;
        reserved = pool.in_use_bytes_ + pool.cached_bytes_;
      }
    }
    if (ours) report(block, -int64_t(capacity), in_use, reserved);
    if (!cached) std::free(block);  // a block the pool forgot, or a default-allocator block (c10::free_cpu is free())
  }

  void release_cached() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_bytes_ = 0;
    }
    for (auto& block : blocks) std::free(block.second);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;           // capacity -> cached block
  std::unordered_map<void*, size_t> owned_;     // live pool block -> capacity
  int64_t depth_ = 0, hits_ = 0, misses_ = 0;
  size_t cached_bytes_ = 0, in_use_bytes_ = 0, limit_ = 0;
};

}  // namespace

bool cpu_pool_enter() { return PoolAllocator::instance().enter(); }
void cpu_pool_exit() { PoolAllocator::instance().exit(); }
std::vector<int64_t> cpu_pool_stats() { return PoolAllocator::instance().stats(); }

}  // namespace robust_ops
