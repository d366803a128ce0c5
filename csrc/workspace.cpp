// A cache of the large CPU buffers the layer allocates on every call (the [T, B, 4H] histories).
//
// Fresh pages cost a page fault each on first touch: at T=784, B=64, H=100 a training call touches about
// 480 MB of new buffers, and the faults took longer than the arithmetic. Blocks here are 2 MiB-aligned,
// advised as transparent huge pages, and go back to this cache (not to the OS) when their tensor dies, so
// the next call of the same shape reuses them.
//
// Bounded by what can be reused: the free blocks held never exceed the working set, the most bytes of
// blocks in use at once during the last kWindow op calls (nor min(RAM / 8, 4 GiB)); past that the least
// recently returned blocks go back to the OS (munmap). So calls whose shapes keep changing (growing T)
// hold at most about twice their working set, in use plus cached, and a shape not seen for kWindow calls
// releases its blocks once the working set shrinks. FUSED_BNLSTM_CPU_CACHE=0 turns the cache off;
// empty_cache() hands every cached block back.

#include "workspace.h"

#include <unistd.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <vector>

namespace fused_bnlstm {

namespace {

constexpr size_t kAlignment = size_t(2) << 20;  // one huge page
constexpr size_t kSmallest = size_t(1) << 20;   // smaller buffers come from at::empty
constexpr size_t kWindow = 32;                  // op calls the working set is taken over

struct FreeBlock {
    void* ptr;
    uint64_t returned;  // when it came back (a tick), for least-recently-returned eviction
};

struct Cache {
    std::mutex mutex;
    std::multimap<size_t, FreeBlock> blocks;  // bytes -> free block
    size_t cached = 0;                        // bytes of free blocks
    size_t in_use = 0;                        // bytes of blocks handed out and alive
    size_t call_peak = 0;                     // most bytes in use since the current op call began
    std::array<size_t, kWindow> peaks{};      // call_peak of the last kWindow calls
    uint64_t calls = 0;
    uint64_t tick = 0;
    size_t limit = 0;  // min(RAM / 8, 4 GiB)

    // The most bytes in use at once over the last kWindow calls, the current one included.
    size_t working_set() const { return std::max(call_peak, *std::max_element(peaks.begin(), peaks.end())); }
    size_t cap() const { return std::min(limit, working_set()); }
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

// bytes (a multiple of kAlignment) of fresh memory at a kAlignment boundary, straight from the OS so that
// unmap_block returns it (a heap allocation freed may stay in the process).
void* map_block(size_t bytes) {
#if defined(__linux__)
    const size_t span = bytes + kAlignment;
    void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) throw std::bad_alloc();
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kAlignment - 1) / kAlignment * kAlignment;
    if (aligned > start) munmap(raw, aligned - start);
    const uintptr_t end = aligned + bytes;
    if (start + span > end) munmap(reinterpret_cast<void*>(end), start + span - end);
    void* block = reinterpret_cast<void*>(aligned);
#if defined(MADV_HUGEPAGE)
    madvise(block, bytes, MADV_HUGEPAGE);  // best effort: fewer, larger page faults on first touch
#endif
    return block;
#else
    void* block = std::aligned_alloc(kAlignment, bytes);
    if (block == nullptr) throw std::bad_alloc();
    return block;
#endif
}

void unmap_block(void* block, size_t bytes) {
#if defined(__linux__)
    munmap(block, bytes);
#else
    (void)bytes;
    std::free(block);
#endif
}

// Take the least recently returned free blocks out of the cache until it holds at most `cap` bytes;
// the caller unmaps them outside the lock. Caller holds the lock.
void evict_to(Cache& c, size_t cap, std::vector<std::pair<void*, size_t>>& evicted) {
    while (c.cached > cap) {
        auto oldest = c.blocks.begin();
        for (auto it = c.blocks.begin(); it != c.blocks.end(); ++it) {
            if (it->second.returned < oldest->second.returned) oldest = it;
        }
        evicted.emplace_back(oldest->second.ptr, oldest->first);
        c.cached -= oldest->first;
        c.blocks.erase(oldest);
    }
}

void unmap_all(const std::vector<std::pair<void*, size_t>>& blocks) {
    for (const auto& [block, bytes] : blocks) unmap_block(block, bytes);
}

void give_back(void* block, size_t bytes) {
    Cache& c = cache();
    std::vector<std::pair<void*, size_t>> evicted;
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        c.in_use -= bytes;
        c.blocks.emplace(bytes, FreeBlock{block, ++c.tick});
        c.cached += bytes;
        evict_to(c, c.cap(), evicted);
    }
    unmap_all(evicted);
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
            block = it->second.ptr;
            c.cached -= bytes;
            c.blocks.erase(it);
        }
        c.in_use += bytes;
        c.call_peak = std::max(c.call_peak, c.in_use);
    }
    if (block == nullptr) {
        try {
            block = map_block(bytes);
        } catch (...) {
            Cache& c = cache();
            std::lock_guard<std::mutex> lock(c.mutex);
            c.in_use -= bytes;
            throw;
        }
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

void begin_workspace_call() {
    Cache& c = cache();
    std::vector<std::pair<void*, size_t>> evicted;
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        c.peaks[c.calls % kWindow] = c.call_peak;
        ++c.calls;
        c.call_peak = c.in_use;
        evict_to(c, c.cap(), evicted);
    }
    unmap_all(evicted);
}

void empty_cache() {
    Cache& c = cache();
    std::vector<std::pair<void*, size_t>> evicted;
    {
        std::lock_guard<std::mutex> lock(c.mutex);
        evict_to(c, 0, evicted);
    }
    unmap_all(evicted);
}

size_t cached_bytes() {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    return c.cached;
}

WorkspaceStats workspace_stats() {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    return {c.cached, c.in_use, c.working_set(), c.limit};
}

}  // namespace fused_bnlstm
