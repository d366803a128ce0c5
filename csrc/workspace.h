// Large CPU buffers from a cache that outlives one call (see workspace.cpp for why).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace fused_bnlstm {

// Like at::empty on the CPU; buffers of 1 MiB or more come from the cache and return to it when freed.
// With FUSED_BNLSTM_CPU_POISON=1 in the environment every buffer comes filled with NaN (tests).
at::Tensor empty_workspace(at::IntArrayRef shape, const at::TensorOptions& options);

// A contiguous copy of src in a cached buffer (for internal temporaries such as transposes).
at::Tensor workspace_copy(const at::Tensor& src);

// Hand every cached block back to the OS.
void empty_cache();

// Bytes held in the cache now (not counting blocks in use).
size_t cached_bytes();

}  // namespace fused_bnlstm
