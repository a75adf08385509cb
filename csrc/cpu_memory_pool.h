// A scoped caching allocator for CPU tensors (semantics and measurements: docs/memory-pool.md).
//
// Why: every PGD step allocates the model's activations (tens to hundreds of MB) and frees them after the
// backward pass. glibc returns freed memory above its trim threshold to the OS, so the next step page-faults and
// the kernel zeroes every page again: measured here ~700k minor faults and ~15% of the CPU time of a 10-step PGD on
// resnet18 (batch 32, 1x64x64). While the pool is active, large CPU blocks freed by PyTorch are kept and handed to
// the next allocation of a similar size instead.
#pragma once
#include <cstdint>
#include <vector>

namespace robust_ops {

// Activates the pool (nested calls count); returns false when another allocator with a higher priority is installed
// as the CPU allocator, in which case nothing changes.
bool cpu_pool_enter();
// Ends one activation; the last one restores the previous CPU allocator and frees every cached block. Blocks still
// in use are freed to the system when their tensors die.
void cpu_pool_exit();
// [active depth, hits, misses, cached bytes, bytes in use from the pool]
std::vector<int64_t> cpu_pool_stats();

}  // namespace robust_ops
