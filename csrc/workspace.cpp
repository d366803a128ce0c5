// A cache of the large CPU buffers the layer allocates on every call (the [T, B, 4H] histories).
//
// Fresh pages cost a page fault each on first touch: at T=784, B=64, H=100 a training call touches about
// 480 MB of new buffers, and the faults took longer than the arithmetic. Blocks here are 2 MiB-aligned,
// advised as transparent huge pages, and go back to this cache (not to the OS) when their tensor dies, so
// the next call of the same shape reuses them. The cache holds at most min(RAM / 8, 4 GiB);
// FUSED_BNLSTM_CPU_CACHE=0 turns it off and empty_cache() hands every cached block back.

#include "workspace.h"

#include <unistd.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <string>

namespace fused_bnlstm {

namespace {

constexpr size_t kAlignment = size_t(2) << 20;  // one huge page
constexpr size_t kSmallest = size_t(1) << 20;   // smaller buffers come from at::empty

struct Cache {
    std::mutex mutex;
    std::multimap<size_t, void*> blocks;  // bytes -> free block
    size_t cached = 0;
    size_t limit = 0;
};

Cache& cache() {
    // Never destroyed: tensors may die after static destructors have run.
    static Cache* instance = [] {
        auto* c = new Cache();
        const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
        const size_t ram = (pages > 0 && page > 0) ? size_t(pages) * size_t(page) : (size_t(8) << 30);
        c->limit = std::min(ram / 8, size_t(4) << 30);
        return c;
    }();
    return *instance;
}

bool enabled() {
    const char* env = std::getenv("FUSED_BNLSTM_CPU_CACHE");
    return !(env != nullptr && std::string(env) == "0");
}

void give_back(void* block, size_t bytes) {
    Cache& c = cache();
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        if (c.cached + bytes <= c.limit) {
            c.blocks.emplace(bytes, block);
            c.cached += bytes;
            return;
        }
    }
    std::free(block);
}

// FUSED_BNLSTM_CPU_POISON=1 (read at each call; for tests): every buffer is handed out filled with NaN, so
// an element no kernel wrote shows up in the results instead of a stale value.
at::Tensor poisoned(at::Tensor t) {
    const char* env = std::getenv("FUSED_BNLSTM_CPU_POISON");
    if (env != nullptr && std::string(env) == "1" && t.is_floating_point()) t.fill_(NAN);
    return t;
}

at::Tensor cached_empty(at::IntArrayRef shape, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (const int64_t s : shape) numel *= s;
    const size_t nbytes = size_t(numel) * options.dtype().itemsize();
    if (nbytes < kSmallest || !enabled()) return at::empty(shape, options);
    size_t bytes = (nbytes + kAlignment - 1) / kAlignment * kAlignment;
    void* block = nullptr;
    {
        Cache& c = cache();
        std::lock_guard<std::mutex> lock(c.mutex);
        // The smallest cached block that fits, unless it wastes more than a quarter.
        auto it = c.blocks.lower_bound(bytes);
        if (it != c.blocks.end() && it->first <= bytes + bytes / 4) {
            bytes = it->first;
            block = it->second;
            c.cached -= bytes;
            c.blocks.erase(it);
        }
    }
    if (block == nullptr) {
        block = std::aligned_alloc(kAlignment, bytes);
        if (block == nullptr) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
        // Best effort: fewer, larger page faults on first touch.
        madvise(block, bytes, MADV_HUGEPAGE);
#endif
    }
    return at::from_blob(block, shape, [bytes](void* p) { give_back(p, bytes); }, options);
}

}  // namespace

at::Tensor empty_workspace(at::IntArrayRef shape, const at::TensorOptions& options) {
    return poisoned(cached_empty(shape, options));
}

at::Tensor workspace_copy(const at::Tensor& src) {
    at::Tensor copy = empty_workspace(src.sizes(), src.options());
    copy.copy_(src);
    return copy;
}

void empty_cache() {
    Cache& c = cache();
    std::multimap<size_t, void*> blocks;
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        blocks.swap(c.blocks);
        c.cached = 0;
    }
    for (auto& entry : blocks) std::free(entry.second);
}

size_t cached_bytes() {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    return c.cached;
}

}  // namespace fused_bnlstm
