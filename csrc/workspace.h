// Large CPU buffers from a cache that outlives one call, bounded by the working set (see workspace.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace fused_bnlstm {

// Like at::empty on the CPU; buffers of 1 MiB or more come from the cache and return to it when freed.
// With FUSED_BNLSTM_CPU_POISON=1 in the environment every buffer comes filled with NaN (tests).
at::Tensor empty_workspace(at::IntArrayRef shape, const at::TensorOptions& options);

// A contiguous copy of src in a cached buffer (for internal temporaries such as transposes).
at::Tensor workspace_copy(const at::Tensor& src);

// Each op call starts with this: the working set the cache is bounded by is taken over the last calls.
void begin_workspace_call();

// Hand every cached block back to the OS.
void empty_cache();

// Bytes held in the cache now (not counting blocks in use).
size_t cached_bytes();

struct WorkspaceStats {
    size_t cached;       // bytes of free blocks held for reuse
    size_t in_use;       // bytes of blocks handed out and alive
    size_t working_set;  // most bytes in use at once over the recent calls: the bound on `cached`
    size_t limit;        // min(RAM / 8, 4 GiB): the bound on `cached` in any case
};
WorkspaceStats workspace_stats();

}  // namespace fused_bnlstm
