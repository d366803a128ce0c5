// The fused BN-LSTM layer on the CPU: the time loops around the step kernels (bnlstm_kernels.h), the
// GEMMs, and the choice of kernels for this CPU.
//
// Forward, per step: one parallel pass over blocks of hidden units, every batch row inside; each task
// computes its columns of W_hh h_{t-1} (and of W_ih x_t, see bnlstm.cpp) with brgemm, then runs the step
// kernel: both gate-side batch norms, bias, gates, cell update, BN(c), h. Backward, per step in reverse:
// each task takes its columns of dh from the later step's GEMM, then the step's backward kernel. Without
// brgemm (float64, or a CPU/torch without it): one at::mm per step, then the pass. The weight gradients
// are GEMMs over all steps after the loop (gemm_tn / gemm_nn, called from bnlstm.cpp). Buffers: bnlstm.h.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "bnlstm.h"
#include "bnlstm_cpu.h"
#include "workspace.h"

// MKL's thread-local thread count, its C entry point (mkl_service.h maps mkl_set_num_threads_local to it;
// the lowercase symbol is the Fortran one, which takes a pointer): returns the previous count, 0 restoring
// the global one. Weak: not every torch build has MKL.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace fused_bnlstm {

namespace {

// oneDNN's brgemm micro-kernel through ATen: C[M, N] (+)= A[M, K] B[K, N], row-major with leading dimensions
// (torch builds since 2.6 declare the float32 one; use_brgemm() says whether it runs on this machine).
inline void brgemm_f32(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add_C,
                       const float* A, const float* B, float* C) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, A, B, C, false);
#else
    TORCH_CHECK(false, "fused_bnlstm: this torch has no float32 brgemm");
#endif
}

inline void brgemm_release_f32() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
    at::native::cpublas::brgemm_release(false);
#endif
}

// The widest instruction set this CPU runs, among those compiled; FUSED_BNLSTM_CPU_ISA=default, avx2 or
// avx512 asks for one (when this CPU has it), for tests and comparisons.
const StepKernels& kernels() {
    static const StepKernels* widest = [] {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
        __builtin_cpu_init();
        if (step_kernels_avx512() != nullptr && __builtin_cpu_supports("avx512f") &&
            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
            return step_kernels_avx512();
        }
        if (step_kernels_avx2() != nullptr && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
            return step_kernels_avx2();
        }
#endif
        return step_kernels_default();
    }();
    const char* env = std::getenv("FUSED_BNLSTM_CPU_ISA");
    if (env == nullptr) return *widest;
    const std::string asked(env);
    if (asked == "default") return *step_kernels_default();
    // Only an instruction set no wider than the one detected.
    if (asked == "avx2" && std::string(widest->isa) != "default") return *step_kernels_avx2();
    return *widest;
}

// Hidden units per parallel task. A step's pass is one fork-join, and a join waits for the slowest thread:
// on a loaded machine (other processes on the cores) a descheduled worker stalls every step for a time
// slice, milliseconds against microseconds of work. So the loops without SplitGuard (float64, no brgemm)
// split a step only when each task gets about 8 MFLOP of GEMM and pointwise work (csrc/README.md).
inline int64_t units_for_flops(double flops, int64_t B, int64_t H, int64_t I) {
    const double per_unit = 8.0 * double(std::max<int64_t>(B, 1)) * double(H + I) + 64.0 * double(B);
    return std::max<int64_t>(1, int64_t(flops / per_unit));
}
inline int64_t grain_size(int64_t B, int64_t H, int64_t I) { return units_for_flops(8e6, B, H, I); }

// The step loops on brgemm split finer, because SplitGuard stops them splitting on a loaded machine: tasks
// of about 1.5 MFLOP (a step of the default T=64 B=32 I=64 H=128 layer or of s-MNIST splits in two).
inline int64_t step_grain(int64_t B, int64_t H, int64_t I) { return units_for_flops(1.5e6, B, H, I); }

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// FUSED_BNLSTM_CPU_SPLIT=always or never pins the step loops' splitting (tests, measurements on a machine of
// one's own); auto, the default, leaves it to SplitGuard. Read per call.
enum class SplitMode { kAuto, kAlways, kNever };

SplitMode split_mode() {
    const char* env = std::getenv("FUSED_BNLSTM_CPU_SPLIT");
    if (env == nullptr) return SplitMode::kAuto;
    const std::string asked(env);
    if (asked == "always") return SplitMode::kAlways;
    if (asked == "never") return SplitMode::kNever;
    return SplitMode::kAuto;
}

// Whether a step loop splits its steps over threads. Splitting pays on idle cores and ruins a call on busy
// ones, where a join waits for a descheduled worker for a time slice. On the 2-core Xeon (training forward
// op, 2 threads, s-MNIST): 102-114 ms whole, 82-90 ms split on a quiet machine, 1243 ms split with one other
// busy process. So a loop keeps a balance of what its split steps saved or cost against the last step it
// ran whole (each call runs its first two steps whole for that); when splitting has cost more than two
// whole steps, every call of that loop (forward saving, forward not saving, backward: each has its own
// SplitState, as a split can pay in one and not in another) runs whole for a pause (5 ms, doubling with
// each such loss up to 2 s, halving after 256 split steps without one), then tries again. With the busy
// process the loops then run within a few percent of whole (csrc/README.md). The first pause is short
// because a quiet machine's one-off stall (a page fault, the workers' first wake-up after
// torch.set_num_threads) pauses too: at 50 ms that ran ten calls of the default shape whole.
constexpr int64_t kFirstPause = 5'000'000;  // ns

struct SplitState {
    std::atomic<int64_t> resume_at{0};  // steady-clock ns before which the loop runs whole
    std::atomic<int64_t> backoff{kFirstPause};  // the next pause
};

class SplitGuard {
public:
    SplitGuard(bool may_split, SplitState& state, SplitMode mode)
        : may_split_(may_split && mode != SplitMode::kNever), always_(mode == SplitMode::kAlways), state_(state) {}

    bool split() const {
        if (always_) return may_split_;
        return may_split_ && whole_steps_ >= 2 && now_ns() >= state_.resume_at.load(std::memory_order_relaxed);
    }

    void record(int64_t elapsed_ns, bool was_split) {
        if (always_) return;  // pinned: no balance, no pauses
        const bool after_split = last_split_;
        last_split_ = was_split;
        if (!was_split) {
            whole_ns_ = elapsed_ns;
            ++whole_steps_;
            return;
        }
        // The first split step after whole ones also wakes the workers (asleep after a few hundred
        // microseconds idle: 0.1-0.9 ms here), so only the steps after it are judged.
        if (!after_split) return;
        int64_t backoff = state_.backoff.load(std::memory_order_relaxed);
        // What splitting has saved (negative) or cost against running whole, remembering at most eight
        // steps' worth of savings: a quiet machine's hiccups (tens of microseconds) stay under it, a busy
        // one's stalls (a time slice, milliseconds, seen every 10-30 steps here) do not.
        balance_ns_ = std::max(balance_ns_ + elapsed_ns - whole_ns_, -8 * whole_ns_);
        if (balance_ns_ > 2 * whole_ns_) {
            balance_ns_ = 0;
            state_.resume_at.store(now_ns() + backoff, std::memory_order_relaxed);
            state_.backoff.store(std::min(2 * backoff, kMaxBackoff), std::memory_order_relaxed);
            clean_steps_ = 0;
        } else if (++clean_steps_ >= 256) {
            state_.backoff.store(std::max(backoff / 2, kMinBackoff), std::memory_order_relaxed);
            clean_steps_ = 0;
        }
    }

private:
    static constexpr int64_t kMinBackoff = kFirstPause, kMaxBackoff = 2'000'000'000;
    bool may_split_, always_;
    SplitState& state_;
    int64_t whole_ns_ = 0, whole_steps_ = 0, clean_steps_ = 0, balance_ns_ = 0;
    bool last_split_ = false;
};

// The loops' split states: forward saving (training), forward not saving (eval, inference), backward.
SplitState forward_split[2], backward_split;

// Whether a step loop has lately found splitting costlier than running whole (a loop is pausing its
// splits): the sign of other processes on the cores.
bool cores_busy() {
    const int64_t now = now_ns();
    for (const SplitState* s : {&forward_split[0], &forward_split[1], &backward_split}) {
        if (now < s->resume_at.load(std::memory_order_relaxed)) return true;
    }
    return false;
}

// Split [0, total) into parallel tasks of at least `grain`, each walked in kBlock pieces.
template <typename F>
void for_blocks(int64_t total, int64_t grain, const F& body) {
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; j += kBlock) body(j, std::min(end, j + kBlock));
    });
}

}  // namespace

// Whether a step's pass runs as one task by the unguarded rule (see grain_size): bnlstm.cpp then computes
// the input branch inside the step's pass. (Hoisted, its all-step GEMM runs on every thread, unguarded.)
bool step_on_one_thread(int64_t B, int64_t H, int64_t I) {
    return at::get_num_threads() == 1 || grain_size(B, H, I) >= H;
}

// Whether the per-step GEMMs run inside the step's parallel pass through oneDNN's brgemm micro-kernel
// (float32; 2-3x faster than at::mm at these sizes, and each task multiplies only its own columns), or as
// one at::mm per step before the pass. brgemm needs oneDNN's ukernel API (x86-64 with AVX-512 in torch's
// builds): it is probed once. FUSED_BNLSTM_CPU_BRGEMM=0 forces the at::mm path.
bool use_brgemm() {
    static const bool works = [] {
#ifndef CPUBLAS_BRGEMM_F32F32F32
        return false;
#endif
        try {
            const float a[2] = {2.0f, 1.0f}, b[2] = {3.0f, 4.0f};
            float c = 0.0f;
            brgemm_f32(1, 1, 2, 2, 1, 1, false, a, b, &c);
            brgemm_release_f32();
            return c == 10.0f;
        } catch (const std::exception&) {
            return false;
        }
    }();
    const char* env = std::getenv("FUSED_BNLSTM_CPU_BRGEMM");
    return works && !(env != nullptr && std::string(env) == "0");
}

namespace {

// A row-major [K, N] float32 matrix repacked so that every kBlock-wide column chunk is its own contiguous
// [K, width] block, at j0 * K: brgemm then streams B contiguously (about 20 % faster than strided column
// slices, measured). The step tasks work on whole chunks, so each GEMM call reads one block.
// With gate_chunks (W_hh [4H, H], K = 4H), the rows are taken in the order of the chunk-major gradient
// layout (BackwardParams::da_chunked): hidden-unit chunk by chunk, and in each chunk gate by gate.
at::Tensor pack_column_chunks(const float* src, int64_t K, int64_t N, bool gate_chunks = false) {
    at::Tensor packed = empty_workspace({K * N}, at::TensorOptions(at::kFloat));
    float* dst = packed.data_ptr<float>();
    // packed row r -> source row: identity, or for gate_chunks, chunk c0's row 4 * c0 + k * w + jj is W's
    // row k * H + c0 + jj (H = N, w = min(kBlock, H - c0))
    std::vector<int64_t> rows(K);
    for (int64_t r = 0; r < K; ++r) rows[r] = r;
    if (gate_chunks) {
        for (int64_t c0 = 0; c0 < N; c0 += kBlock) {
            const int64_t w = std::min(kBlock, N - c0);
            for (int64_t k = 0; k < 4; ++k)
                for (int64_t jj = 0; jj < w; ++jj) rows[4 * c0 + k * w + jj] = k * N + c0 + jj;
        }
    }
    for (int64_t j0 = 0; j0 < N; j0 += kBlock) {
        const int64_t w = std::min(kBlock, N - j0);
        float* block = dst + j0 * K;
        for (int64_t r = 0; r < K; ++r) std::memcpy(block + r * w, src + rows[r] * N + j0, w * sizeof(float));
    }
    return packed;
}

// W [groups * Hg, K] row-major (a weight as torch stores it, one gate after another) repacked as its
// transpose, chunk by chunk: gate g's kBlock-wide column chunk of W^T is a contiguous [K, width] block at
// j0 * groups * K + g * K * width, so a step task's blocks (every gate of its chunk) are one stream. One
// pass in tiles that stay in L1, instead of a transposed copy (W.t().contiguous(): 5.7 ms for W_hh at
// H=1000 on the Xeon) followed by the chunk copy (1.2 ms).
at::Tensor pack_transposed_chunks(const float* src, int64_t K, int64_t groups, int64_t Hg) {
    constexpr int64_t kTile = 16;  // rows of W^T per tile: [kTile, width] stays in L1 while `width` rows of W stream
    // From the workspace cache (as pack_column_chunks): 2 MiB pages for a weight streamed every step, and no
    // page faults per call (char-PTB eval 1.055-1.071x -> 1.014-1.054x nn.LSTM, generic 1.049-1.084x ->
    // 0.999-1.044x, alternating builds; below 1 MiB, the default shape's, it is a plain allocation).
    at::Tensor packed = empty_workspace({groups * K * Hg}, at::TensorOptions(at::kFloat));
    float* dst = packed.data_ptr<float>();
    for (int64_t j0 = 0; j0 < Hg; j0 += kBlock) {
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t w = std::min(kBlock, Hg - j0);
            const float* rows = src + (g * Hg + j0) * K;    // [w, K]: this chunk's rows of W
            float* block = dst + j0 * groups * K + g * K * w;  // [K, w]
            for (int64_t r0 = 0; r0 < K; r0 += kTile) {
                const int64_t r1 = std::min(K, r0 + kTile);
                for (int64_t c = 0; c < w; ++c) {
                    const float* row = rows + c * K;
                    for (int64_t r = r0; r < r1; ++r) block[r * w + c] = row[r];
                }
            }
        }
    }
    return packed;
}

// Parallel over kBlock chunks of the H hidden units, with the grain in units turned into chunks. Every step
// pass, forward and backward, splits this way: the chunked step histories (StepRows in bnlstm_kernels.inc)
// are laid out by these chunks.
template <typename F>
void for_chunks(int64_t H, int64_t grain, const F& body) {
    const int64_t chunks = (H + kBlock - 1) / kBlock;
    at::parallel_for(0, chunks, (grain + kBlock - 1) / kBlock, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) body(c * kBlock, std::min(H, (c + 1) * kBlock));
    });
}

// Asks for `rows` rows of n floats, ld apart, in L2 ahead of use. The forward asks for its chunk's c_{t-1}
// before the chunk's GEMMs: at large H the step's W_hh stream (16 MB at H=1000, 4 MB at 512, against 2 MB
// of L2 a core) has evicted the rows the step before wrote, and the cell update's loads of them, one 256-byte
// run every H floats, waited on L3 (18 % of the step pass's samples at char-PTB eval). Measured in one
// process, alternating (README.md item 22): eval char-PTB 1t -2.6 to -3.5 %, generic -2 to -3 %, at 2
// threads -2 to -3.5 %; none slower, the default shape (all in L2) -1 %.
inline void prefetch_rows(const float* base, int64_t rows, int64_t ld, int64_t n) {
    constexpr int64_t kLine = 64 / sizeof(float);
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < n; j += kLine) __builtin_prefetch(base + r * ld + j, 0, 2);
    }
}

// One step of a loop under `guard`: body's chunks split in tasks of `grain` units, or whole.
template <typename F>
void guarded_step(SplitGuard& guard, int64_t H, int64_t grain, const F& body) {
    const bool split = guard.split();
    const int64_t start = now_ns();
    for_chunks(H, split ? grain : H, body);
    guard.record(now_ns() - start, split);
}

}  // namespace

void forward_cpu(ForwardParams& p, at::Tensor& a_hh, const at::Tensor& hs, const at::Tensor& w_hh) {
    const int64_t B = p.B, H = p.H, G = 4 * H;
    if (a_hh.scalar_type() != at::kFloat || !step_brgemm(B, H, p.I)) {
        PlainLoop loop;
        loop.hs = hs;
        forward_plain_cpu(p, a_hh, w_hh, loop);
        return;
    }
    const StepKernelSet<float>& kern = kernels().of<float>();
    if (p.norm == Normalization::kSequence) {
        for_blocks(G, std::max<int64_t>(kBlock, grain_size(B, H, p.I)),
                   [&](int64_t c0, int64_t c1) { kern.sequence_moments(p, c0, c1); });
    }
    // W_hh^T [H, 4H] and W_ih^T [I, 4H] per chunk and gate: [H / kBlock][4][K][kBlock].
    const at::Tensor w_pack = pack_transposed_chunks(w_hh.data_ptr<float>(), H, 4, H);
    const at::Tensor wi_pack = p.input_per_step
        ? pack_transposed_chunks(static_cast<const float*>(p.w_ih), p.I, 4, H) : at::Tensor();
    const float* w = w_pack.data_ptr<float>();
    const float* wi = p.input_per_step ? wi_pack.data_ptr<float>() : nullptr;
    float* a = a_hh.data_ptr<float>();
    const int64_t I = p.I;
    // Each task's columns of both branches as one contiguous block (StepRows): two threads
    // writing interleaved 256-byte runs of a row fight over neighbouring lines.
    p.a_hh_chunked = true;
    p.a_ih_chunked = p.input_per_step && p.a_ih_step == 0;
    const float* hs_data = hs.data_ptr<float>();  // [T + 1, B, H] or [2, B, H]
    const float* c_data = static_cast<const float*>(p.cs);  // the same
    const int64_t split_grain = step_grain(B, H, I);
    SplitGuard guard(at::get_num_threads() > 1 && split_grain < H, forward_split[p.save ? 1 : 0],
                     split_mode());
    for (int64_t t = 0; t < p.T; ++t) {
        // (pointer arithmetic: a select() per step went through the dispatcher, 4 % of a
        // training step at T=64 B=32 H=128)
        const float* h = hs_data + (p.save ? t : (t & 1)) * B * H;
        const float* x = static_cast<const float*>(p.x) + t * B * I;
        float* a_ih = static_cast<float*>(p.a_ih) + t * p.a_ih_step;
        guarded_step(guard, H, split_grain, [&](int64_t j0, int64_t j1) {
            // This chunk's columns of W_hh h_{t-1} (and of W_ih x_t), gate by gate: [B, j1 - j0]
            // each, gate k at k * n of a [B][4][n] block (a_ih row-major where it is kept: at
            // k * H + j0 of its [B, 4H]).
            const int64_t n = j1 - j0;
            prefetch_rows(c_data + (p.save ? t : (t & 1)) * B * H + j0, B, H, n);
            float* ah = a + j0 * 4 * B;
            float* ai = p.a_ih_chunked ? a_ih + j0 * 4 * B : a_ih + j0;
            const int64_t ai_row = p.a_ih_chunked ? 4 * n : G, ai_gate = p.a_ih_chunked ? n : H;
            for (int64_t k = 0; k < 4; ++k) {
                brgemm_f32(B, n, H, H, n, 4 * n, false, h, w + j0 * 4 * H + k * H * n, ah + k * n);
                if (p.input_per_step) {
                    brgemm_f32(B, n, I, I, n, ai_row, false, x, wi + j0 * 4 * I + k * I * n,
                               ai + k * ai_gate);
                }
            }
            kern.forward_step(p, t, j0, j1);
        });
    }
    brgemm_release_f32();
}

namespace {

// Rows already finished at step t carry their state's gradient through the step unchanged:
// dh_out += dh_in on those rows, hidden units [j0, j1). dh_in, dh_out: [B, H].
template <typename scalar_t>
void pass_finished_rows(const BackwardParams& p, int64_t t, const scalar_t* dh_in, scalar_t* dh_out, int64_t j0,
                        int64_t j1) {
    if (p.running.lengths == nullptr) return;
    for (int64_t b = 0; b < p.B; ++b) {
        if (p.running(b, t)) continue;
        for (int64_t j = j0; j < j1; ++j) dh_out[b * p.H + j] += dh_in[b * p.H + j];
    }
}

// dh_{t-1} = d(W_hh h_{t-1}) W_hh for hidden units [j0, j1) (one chunk; brgemm), plus the finished rows'
// gradient. da: the step gradients of W_hh h ([T, B, 4H], or chunk-major: p.da_chunked); dh_in, dh_out: [B, H].
void recurrent_grad_block(const BackwardParams& p, int64_t t, const float* da, const float* w_pack,
                          const float* dh_in, float* dh_out, int64_t j0, int64_t j1) {
    const int64_t B = p.B, H = p.H, n = j1 - j0;
    const int64_t K = 4 * H;
    // w_pack: W_hh [4H, H] in column chunks, [H / kBlock][4H][kBlock] (pack_column_chunks), its rows in the
    // order of da's columns. The depth 4H is taken in blocks (accumulating into dh_out), so that a block of
    // da_t and of the weight chunk stay in L2 while the kernel walks the rows: at H=1000 the whole depth
    // (1 MB of each) ran 21 % slower (README.md). Chunk-major, a block is a chunk's [B, 4w] rows (one
    // stride), 4 * kBlock deep; else at most kStepDepth columns of the [B, 4H] rows.
    const float* w = w_pack + j0 * K;
    if (p.da_chunked) {
        for (int64_t c0 = 0; c0 < H; c0 += kBlock) {
            const int64_t w_c = std::min(kBlock, H - c0);
            const float* da_c = da + chunk_major_offset(p.T, t, B, H, c0);  // [B, 4 w_c]
            brgemm_f32(B, n, 4 * w_c, 4 * w_c, n, H, c0 > 0, da_c, w + 4 * c0 * n, dh_out + j0);
        }
    } else {
        constexpr int64_t kStepDepth = 512;
        const float* da_t = da + t * B * K;
        for (int64_t k0 = 0; k0 < K; k0 += kStepDepth) {
            brgemm_f32(B, n, std::min(kStepDepth, K - k0), K, n, H, k0 > 0, da_t + k0, w + k0 * n, dh_out + j0);
        }
    }
    pass_finished_rows(p, t, dh_in, dh_out, j0, j1);
}

}  // namespace

void backward_cpu(BackwardParams& p, at::Tensor& dh, at::Tensor& dh_prev, const at::Tensor& da_hh,
                  const at::Tensor& w_hh) {
    const int64_t B = p.B, H = p.H, G = 4 * H;
    if (da_hh.scalar_type() != at::kFloat || !step_brgemm(B, H, p.I)) {
        backward_plain_cpu(p, dh, dh_prev, da_hh, w_hh, PlainLoop{});
        return;
    }
    const StepKernelSet<float>& kern = kernels().of<float>();
    // One parallel pass per step: each task first takes its columns of dh from the previous
    // (later) step's GEMM, then runs the step's pointwise backward on the same columns.
    const int64_t split_grain = step_grain(B, H, p.I);
    const SplitMode mode = split_mode();
    const bool may_split = at::get_num_threads() > 1 && split_grain < H && mode != SplitMode::kNever;
    // Where steps may split, the frame-wise step gradients go chunk-major, so that each task
    // writes one block (row-major, two threads wrote interleaved 256-byte runs of every row, and
    // a split step cost what a whole one did); the GEMMs over all steps then run per chunk.
    // Measured at 2 threads (csrc/README.md): backward at H=128 5.1-6.3 -> 4.4-4.7 ms, at H=256
    // even, at H=512 190-196 -> 207-222 ms (8 chunks' GEMMs 10 ms slower than one's), hence
    // at most kGradientChunks chunks; and not while the cores are busy, when the steps run whole
    // and the per-chunk GEMMs' extra element-wise passes wait for descheduled workers
    // (forward+backward with a busy process 17-19 -> 21-25 ms).
    constexpr int64_t kGradientChunks = 4;
    p.da_chunked = may_split && (mode == SplitMode::kAlways || !cores_busy()) &&
                   p.norm == Normalization::kFrame && H <= kGradientChunks * kBlock;
    const at::Tensor w_pack = pack_column_chunks(w_hh.data_ptr<float>(), G, H, p.da_chunked);
    const float* w = w_pack.data_ptr<float>();
    const float* da = da_hh.data_ptr<float>();
    SplitGuard guard(may_split, backward_split, mode);
    for (int64_t t = p.T - 1; t >= 0; --t) {
        const bool first = t == p.T - 1;
        // Without a GEMM to run (the last step), dh already holds dL/dh_n.
        at::Tensor& cur = first ? dh : dh_prev;
        at::Tensor& other = first ? dh_prev : dh;
        p.dh = cur.data_ptr();
        p.dh_prev = other.data_ptr();
        guarded_step(guard, H, split_grain, [&](int64_t j0, int64_t j1) {
            if (!first) {
                recurrent_grad_block(p, t + 1, da, w, other.data_ptr<float>(), cur.data_ptr<float>(),
                                     j0, j1);
            }
            kern.backward_step(p, t, j0, j1);
        });
        if (!first) std::swap(dh, dh_prev);
    }
    // dh0 from the first step's GEMM.
    if (p.T > 0) {
        guarded_step(guard, H, split_grain, [&](int64_t j0, int64_t j1) {
            recurrent_grad_block(p, 0, da, w, dh.data_ptr<float>(), dh_prev.data_ptr<float>(), j0, j1);
        });
        std::swap(dh, dh_prev);
    }
    brgemm_release_f32();
    if (p.norm == Normalization::kSequence) {
        for_blocks(G, std::max<int64_t>(kBlock, grain_size(B, H, p.I)),
                   [&](int64_t c0, int64_t c1) { kern.sequence_backward(p, c0, c1); });
    }
}

// --- The plain loops: at::mm per step ------------------------------------------------------------------------
//
// float64, CPUs (or torch builds) without brgemm, a projection and synchronized statistics run these (PlainLoop
// in bnlstm_cpu.h): per step one at::mm for the recurrent branch, then the step pass over chunks of hidden units.
// The brgemm loops above pack W_hh for a recurrent depth of H and compute the input branch inside the pass; a
// projection's depth is P, and synchronized statistics need the step's sums before the pass.
//
// A projection: the recurrent GEMM reads r_{t-1} (depth P), and a GEMM after the pass projects m_t. Backward, the
// gradient of r_t on the running rows (dr_run[t], the output's gradient folded in) gives the kernel's dh,
// dm_t = dr_run[t] W_hr, and dW_hr is one GEMM over all steps afterwards (bnlstm.cpp).
//
// Synchronized statistics: every batch norm of a step with batch statistics normalizes over the running rows of
// every rank of the group, through torch's functional all-reduce, one collective at each reduction point.
// Forward, the input branch's sums of every step (or, sequence-wise, of every frame) in one collective before
// the loop; frame-wise per step those of W_hh h_{t-1}, then those of c_t. The kernels normalize with the summed
// moments as they would with a population's (ForwardParams' pop_* point at PlainLoop::given), and a step with
// batch statistics runs its pass twice: once for c_t, whose sums BN(c) needs, then again with them for h_t (the
// gates and c_t come out the same; the pass is cheap beside a collective). Backward, frame-wise per step in
// reverse: BN(c)'s sums [2, H], then the gates' [3, 4H] (the kernel's phases, BackwardParams::sync_phase);
// sequence-wise the gates' [2, 4H] once after the loop.

namespace {

// Sums `sums` over the process group named `group`, in place. Every rank makes the same calls in the same order.
void group_sum_(at::Tensor& sums, const std::string& group) {
    static const c10::OperatorHandle all_reduce =
        c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::all_reduce", "");
    static const auto wait = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("_c10d_functional::wait_tensor", "")
                                 .typed<at::Tensor(const at::Tensor&)>();
    std::vector<c10::IValue> stack{sums, std::string("sum"), group};
    all_reduce.callBoxed(&stack);
    sums.copy_(wait.call(stack[0].toTensor()));
}

// The moments over the group of the running rows, into PlainLoop::given: each call sums this rank's (sum, sum
// of squares) over the group and keeps the mean and biased variance (E[v^2] - E[v]^2, clamped at 0, as the
// reference's synchronized path).
class GroupMoments {
  public:
    GroupMoments(const ForwardParams& p, const PlainLoop& loop) : loop_(loop) {
        const auto options = loop.given[0].options();
        mask_ = loop.running.to(options.dtype()).unsqueeze(-1);  // [T, B, 1]
        counts_ = at::tensor(std::vector<int64_t>(p.counts, p.counts + p.T)).to(options.dtype()).unsqueeze(-1);
    }

    // values [B, F] at step t: rows t of given[k] (mean) and given[k + 1] (variance)
    void step(int k, int64_t t, const at::Tensor& values) const {
        keep(k, t, sums(values, mask_[t]), counts_[t]);
    }

    // values [T, B, F] of every step: their rows of given[k], given[k + 1] where the step takes batch statistics
    void every_step(int k, const at::Tensor& values) const {
        at::Tensor summed = sums(values, mask_);  // [2, T, F]
        for (int64_t t = 0; t < values.size(0); ++t) {
            if (loop_.batch_stats[t]) keep(k, t, summed.select(1, t), counts_[t]);
        }
    }

    // values [T, B, F] over every running frame (sequence-wise): row 0 of given[k], given[k + 1]
    void every_frame(int k, const at::Tensor& values) const {
        const int64_t frames = values.size(0) * values.size(1);
        keep(k, 0, sums(values.reshape({frames, -1}), mask_.reshape({frames, 1})), counts_.sum());
    }

  private:
    // this rank's (sum, sum of squares) over the rows where mask [..., B, 1] is 1, summed over the group
    at::Tensor sums(const at::Tensor& values, const at::Tensor& mask) const {
        const at::Tensor kept = values.to(mask.scalar_type()) * mask;
        at::Tensor summed = at::stack({kept.sum(-2), (kept * kept).sum(-2)});
        group_sum_(summed, loop_.group);
        return summed;
    }

    void keep(int k, int64_t t, const at::Tensor& summed, const at::Tensor& count) const {
        const at::Tensor n = count.clamp_min(1);
        const at::Tensor mean = summed[0] / n;
        loop_.given[k].select(0, t).copy_(mean);
        loop_.given[k + 1].select(0, t).copy_((summed[1] / n - mean * mean).clamp_min(0));
    }

    const PlainLoop& loop_;
    at::Tensor mask_, counts_;
};

// After step t's projection r_next = W_hr m_t over every row: finished rows keep r_prev and output zeros,
// running rows output r_next. r_prev, r_next, out: [B, P].
template <typename scalar_t>
void finish_projected_step(const RowMask& running, int64_t t, int64_t B, int64_t P, const scalar_t* r_prev,
                           scalar_t* r_next, scalar_t* out) {
    for (int64_t b = 0; b < B; ++b) {
        if (running(b, t)) {
            std::copy_n(r_next + b * P, P, out + b * P);
        } else {
            std::copy_n(r_prev + b * P, P, r_next + b * P);
            std::fill_n(out + b * P, P, scalar_t(0));
        }
    }
}

// The gradient of r_t that reaches m_t: dr on the rows running at step t (plus the output's gradient there),
// zero on finished rows (their r_t is r_{t-1}). dr, gout (or nullptr), dr_run: [B, P].
template <typename scalar_t>
void running_state_grad(const RowMask& running, int64_t t, int64_t B, int64_t P, const scalar_t* dr,
                        const scalar_t* gout, scalar_t* dr_run) {
    for (int64_t b = 0; b < B; ++b) {
        scalar_t* row = dr_run + b * P;
        if (!running(b, t)) {
            std::fill_n(row, P, scalar_t(0));
            continue;
        }
        for (int64_t k = 0; k < P; ++k) row[k] = dr[b * P + k] + (gout != nullptr ? gout[b * P + k] : scalar_t(0));
    }
}

// Rows already finished at step t carry their state's gradient through the step: out += in on those rows.
// in, out: [B, width].
template <typename scalar_t>
void carry_finished_grad(const RowMask& running, int64_t t, int64_t B, int64_t width, const scalar_t* in,
                         scalar_t* out) {
    if (running.lengths == nullptr) return;
    for (int64_t b = 0; b < B; ++b) {
        if (running(b, t)) continue;
        for (int64_t k = 0; k < width; ++k) out[b * width + k] += in[b * width + k];
    }
}

}  // namespace

void forward_plain_cpu(ForwardParams& p, at::Tensor& a_hh, const at::Tensor& w_hh, const PlainLoop& loop) {
    const int64_t B = p.B, H = p.H;
    const int64_t grain = grain_size(B, H, p.I);
    const at::Tensor w_hh_t = w_hh.t();                                           // [P, 4H]
    const at::Tensor w_hr_t = loop.projected() ? loop.w_hr.t() : at::Tensor();  // [H, P]
    const at::Tensor& states = loop.projected() ? loop.rs : loop.hs;             // what the recurrent GEMM reads
    std::optional<GroupMoments> group;
    if (loop.synced()) {
        group.emplace(p, loop);
        if (p.norm == Normalization::kSequence) group->every_frame(0, loop.a_ih);
        if (p.norm == Normalization::kFrame) group->every_step(0, loop.a_ih);
    }
    const bool frame_synced = loop.synced() && p.norm == Normalization::kFrame;
    AT_DISPATCH_FLOATING_TYPES(a_hh.scalar_type(), "bnlstm_forward_plain_cpu", [&] {
        const StepKernelSet<scalar_t>& kern = kernels().of<scalar_t>();
        if (p.norm == Normalization::kSequence) {
            for_blocks(4 * H, std::max<int64_t>(kBlock, grain),
                       [&](int64_t c0, int64_t c1) { kern.sequence_moments(p, c0, c1); });
        }
        const auto step_pass = [&](int64_t t) {
            for_chunks(H, grain, [&](int64_t j0, int64_t j1) { kern.forward_step(p, t, j0, j1); });
        };
        for (int64_t t = 0; t < p.T; ++t) {
            const int64_t prev = p.save ? t : (t & 1), next = p.save ? t + 1 : ((t + 1) & 1);
            at::mm_out(a_hh, states.select(0, prev), w_hh_t);
            if (frame_synced && loop.batch_stats[t]) {
                group->step(2, t, a_hh);
                step_pass(t);  // c_t (h_t with stale cell moments, written again below)
                group->step(4, t, loop.cs.select(0, next));
            }
            step_pass(t);
            if (loop.projected()) {
                at::Tensor r_next = loop.rs.select(0, next);
                at::mm_out(r_next, loop.hs.select(0, next), w_hr_t);
                finish_projected_step(p.running, t, B, w_hr_t.size(1), loop.rs.select(0, prev).data_ptr<scalar_t>(),
                                      r_next.data_ptr<scalar_t>(), loop.output.select(0, t).data_ptr<scalar_t>());
            }
        }
    });
}

void backward_plain_cpu(BackwardParams& p, at::Tensor& dstate, at::Tensor& dstate_prev, const at::Tensor& da_hh,
                        const at::Tensor& w_hh, const PlainLoop& loop) {
    const int64_t B = p.B, H = p.H, S = dstate.size(1);
    const int64_t grain = grain_size(B, H, p.I);
    const auto options = da_hh.options();
    // With a projection the kernel's dh (the gradient of m_t) and its scratch are buffers of their own; else it
    // reads dstate and uses dstate_prev as scratch until the step's GEMM fills it.
    at::Tensor dm = loop.projected() ? empty_workspace({B, H}, options) : at::Tensor();
    const at::Tensor scratch = loop.projected() ? empty_workspace({B, H}, options) : at::Tensor();
    // Synchronized: the batch norms' sums between the kernel's phases (BackwardParams::sync_phase)
    const bool frame = p.norm == Normalization::kFrame;
    const auto acc = options.dtype(at::toOpMathType(da_hh.scalar_type()));
    at::Tensor sums_c = loop.synced() && frame ? at::empty({2, H}, acc) : at::Tensor();
    at::Tensor sums_gates = loop.synced() ? at::empty({frame ? 3 : 2, 4 * H}, acc) : at::Tensor();
    p.sync_sums_c = sums_c.defined() ? sums_c.data_ptr() : nullptr;
    p.sync_sums_gates = sums_gates.defined() ? sums_gates.data_ptr() : nullptr;
    AT_DISPATCH_FLOATING_TYPES(da_hh.scalar_type(), "bnlstm_backward_plain_cpu", [&] {
        const StepKernelSet<scalar_t>& kern = kernels().of<scalar_t>();
        const auto step_pass = [&](int64_t t, int phase) {
            p.sync_phase = phase;
            for_chunks(H, grain, [&](int64_t j0, int64_t j1) { kern.backward_step(p, t, j0, j1); });
        };
        for (int64_t t = p.T - 1; t >= 0; --t) {
            if (loop.projected()) {
                // dr_run[t] is kept: dW_hr is one GEMM over all steps
                at::Tensor dr_run = loop.dr_run.select(0, t);
                const scalar_t* gout = loop.grad_output.defined()
                    ? loop.grad_output.select(0, t).data_ptr<scalar_t>() : nullptr;
                running_state_grad(p.running, t, B, S, dstate.data_ptr<scalar_t>(), gout, dr_run.data_ptr<scalar_t>());
                at::mm_out(dm, dr_run, loop.w_hr);  // [B, H]
            }
            p.dh = loop.projected() ? dm.data_ptr() : dstate.data_ptr();
            p.dh_prev = loop.projected() ? scratch.data_ptr() : dstate_prev.data_ptr();
            if (loop.synced() && frame && p.batch_stats[t]) {
                step_pass(t, 1);
                group_sum_(sums_c, loop.group);
                step_pass(t, 2);
                group_sum_(sums_gates, loop.group);
                step_pass(t, 3);
            } else {
                step_pass(t, 0);
            }
            // the gradient of the state before the step: d(W_hh state) W_hh, plus the finished rows' own
            at::mm_out(dstate_prev, da_hh.select(0, t), w_hh);
            carry_finished_grad(p.running, t, B, S, dstate.data_ptr<scalar_t>(), dstate_prev.data_ptr<scalar_t>());
            std::swap(dstate, dstate_prev);
        }
        if (p.norm == Normalization::kSequence) {
            const auto sequence_pass = [&](int phase) {
                p.sync_phase = phase;
                for_blocks(4 * H, std::max<int64_t>(kBlock, grain),
                           [&](int64_t c0, int64_t c1) { kern.sequence_backward(p, c0, c1); });
            };
            if (loop.synced() && p.batch_stats[0]) {
                sequence_pass(1);
                group_sum_(sums_gates, loop.group);
                sequence_pass(3);
            } else {
                sequence_pass(0);
            }
        }
        p.sync_phase = 0;
    });
}

const char* kernel_isa() { return kernels().isa; }

namespace {

constexpr int64_t kTileM = 128, kTileN = 256, kTileK = 256;

// The distinct shapes (M, N, K, lda, ldb, ldc, add_C) gemm_brgemm has asked oneDNN for: ATen keeps one
// generated kernel per shape and thread for the process's lifetime and cannot free them, so the shapes
// must come from a bounded set (see gemm_brgemm); counted for brgemm_shapes() and its test.
struct ShapeRegistry {
    std::mutex mutex;
    std::set<std::array<int64_t, 7>> gemm;
    std::set<std::array<int64_t, 3>> steps;  // (B, H, I) admitted to the per-step brgemm path
};

ShapeRegistry& shape_registry() {
    static ShapeRegistry* registry = new ShapeRegistry();  // never destroyed, like ATen's kernel cache
    return *registry;
}

void gemm_tile(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add_C, const float* A,
               const float* B, float* C) {
    ShapeRegistry& r = shape_registry();
    {
        std::lock_guard<std::mutex> lock(r.mutex);
        r.gemm.insert({M, N, K, lda, ldb, ldc, add_C});
    }
    brgemm_f32(M, N, K, lda, ldb, ldc, add_C, A, B, C);
}

// While alive, and while the cores are busy (cores_busy), the all-step GEMMs of this thread run on one
// thread: MKL's through its thread-local setting (where torch's MKL has one; a weak symbol, absent
// elsewhere), gemm_brgemm's as one task. Split over threads on busy cores, a GEMM waits for a descheduled
// worker as a split step does (default shape, 2 threads, one busy process: forward+backward 32 ms against
// 11.5 on 1 thread, 10.6-11.6 with this; README.md).
thread_local bool one_thread_gemms = false;

class AllStepGemmThreads {
public:
    AllStepGemmThreads() : active_(at::get_num_threads() > 1 && cores_busy()) {
        if (!active_) return;
        one_thread_gemms = true;
        if (MKL_Set_Num_Threads_Local != nullptr) mkl_before_ = MKL_Set_Num_Threads_Local(1);
    }
    ~AllStepGemmThreads() {
        if (!active_) return;
        one_thread_gemms = false;
        if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_before_);
    }
    AllStepGemmThreads(const AllStepGemmThreads&) = delete;
    AllStepGemmThreads& operator=(const AllStepGemmThreads&) = delete;

private:
    bool active_;
    int mkl_before_ = 0;  // 0: MKL's global setting
};

// n's largest power-of-two part (n >= 1).
inline int64_t power_of_two_below(int64_t n) {
    int64_t p = 1;
    while (p * 2 <= n) p *= 2;
    return p;
}

// C[M, N] = A[M, K] B[K, N] through brgemm: tiles of C in parallel, each summing its K blocks in order
// (deterministic for any number of threads). A's block (m0, k0) is at A + (k0 / kTileK) * a_panel + m0 * lda +
// k0 % kTileK: a_panel = kTileK for a row-major A (lda = its row length), M * kTileK for A stored as
// [K / kTileK][M][kTileK] panels (lda = kTileK, gemm_tn). B and C are row-major. The last tile's rows and
// the last block's depth are cut into power-of-two pieces, so that the kernel shapes depend on N and the
// model's widths only, never on M or K = T * B (each shape is a kernel oneDNN keeps forever, see ShapeRegistry).
void gemm_brgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, int64_t a_panel, const float* B,
                 int64_t ldb, float* C, int64_t ldc) {
    const int64_t tiles_m = (M + kTileM - 1) / kTileM, tiles_n = (N + kTileN - 1) / kTileN;
    const int64_t grain = one_thread_gemms ? tiles_m * tiles_n : 1;
    at::parallel_for(0, tiles_m * tiles_n, grain, [&](int64_t begin, int64_t end) {
        for (int64_t tile = begin; tile < end; ++tile) {
            const int64_t m0 = (tile / tiles_n) * kTileM, n0 = (tile % tiles_n) * kTileN;
            const int64_t nb = std::min(kTileN, N - n0);
            for (int64_t m = m0, mb; m < std::min(M, m0 + kTileM); m += mb) {
                mb = power_of_two_below(std::min(M, m0 + kTileM) - m);
                for (int64_t k = 0, kb; k < K; k += kb) {
                    kb = power_of_two_below(std::min(K, (k / kTileK + 1) * kTileK) - k);
                    const float* a = A + (k / kTileK) * a_panel + m * lda + k % kTileK;
                    gemm_tile(mb, nb, kb, lda, ldb, ldc, k > 0, a, B + k * ldb + n0, C + m * ldc + n0);
                }
            }
        }
        brgemm_release_f32();
    });
}

bool brgemm_applies(const at::Tensor& a, const at::Tensor& b) {
    return a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0 &&
           gemm_through_brgemm();
}

}  // namespace

// Whether the all-step GEMMs (input branch, weight gradients, dx) run as brgemm tiles (gemm_brgemm) or
// through at::mm (MKL's sgemm in torch's x86 builds). Measured side by side (README.md): on an Intel Xeon
// MKL was 10-25 % faster on the backward's GEMMs; on an AMD EPYC MKL takes a slower generic path and brgemm
// ran about 2x its speed. So at::mm on Intel CPUs, brgemm elsewhere; FUSED_BNLSTM_CPU_GEMM=brgemm or mm
// picks one (read per call).
bool gemm_through_brgemm() {
    static const bool intel = [] {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
        __builtin_cpu_init();
        return __builtin_cpu_is("intel") != 0;
#else
        return false;
#endif
    }();
    if (!use_brgemm()) return false;
    const char* env = std::getenv("FUSED_BNLSTM_CPU_GEMM");
    if (env != nullptr && std::string(env) == "brgemm") return true;
    if (env != nullptr && std::string(env) == "mm") return false;
    return !intel;
}

// a [M, K] b [K, N] through brgemm tiles or at::mm (gemm_through_brgemm).
at::Tensor gemm_nn(const at::Tensor& a, const at::Tensor& b) {
    const AllStepGemmThreads threads;
    if (!brgemm_applies(a, b)) return at::mm(a, b);
    const at::Tensor ac = a.contiguous(), bc = b.contiguous();
    at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options());
    gemm_brgemm(a.size(0), b.size(1), a.size(1), ac.data_ptr<float>(), ac.size(1), kTileK, bc.data_ptr<float>(),
                bc.size(1), c.data_ptr<float>(), c.size(1));
    return c;
}

// c = a b into a contiguous c [M, N].
void gemm_nn_out(at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
    const AllStepGemmThreads threads;
    if (!brgemm_applies(a, b)) {
        at::mm_out(c, a, b);
        return;
    }
    const at::Tensor ac = a.contiguous(), bc = b.contiguous();
    gemm_brgemm(a.size(0), b.size(1), a.size(1), ac.data_ptr<float>(), ac.size(1), kTileK, bc.data_ptr<float>(),
                bc.size(1), c.data_ptr<float>(), c.size(1));
}

// a^T b for a [R, P], b [R, Q] (R = T * B rows): the weight gradients. brgemm takes row-major operands
// only, so this computes (b^T a)^T with b transposed once ([Q, R], the smaller side here), into
// [R / kTileK][Q][kTileK] panels so that no kernel shape depends on R (gemm_brgemm).
at::Tensor gemm_tn(const at::Tensor& a, const at::Tensor& b) {
    // Through MKL the same orientation: (b^T a)^T ran 1.1-2.6x faster than a^T b where Q is small (Xeon,
    // 1 thread: s-MNIST's dW_hh [400, 50176] x [50176, 100] 48.7 -> 32.6 ms, char-PTB's dW_ih with Q = 50
    // 51 -> 20 ms, the default shape's 1.06 -> 0.98 ms) and the same at Q = 512-1000.
    const AllStepGemmThreads threads;
    if (!brgemm_applies(a, b)) return at::mm(b.t(), a).t().contiguous();
    const int64_t R = b.size(0), Q = b.size(1), P = a.size(1), full = R / kTileK;
    const at::Tensor ac = a.contiguous();
    at::Tensor panels = empty_workspace({(R + kTileK - 1) / kTileK, Q, kTileK}, b.options());
    if (full > 0) panels.narrow(0, 0, full).copy_(b.narrow(0, 0, full * kTileK).view({full, kTileK, Q}).transpose(1, 2));
    if (R > full * kTileK) panels.select(0, full).narrow(1, 0, R - full * kTileK).copy_(b.narrow(0, full * kTileK, R - full * kTileK).t());
    at::Tensor c = at::empty({Q, P}, a.options());
    gemm_brgemm(Q, P, R, panels.data_ptr<float>(), kTileK, Q * kTileK, ac.data_ptr<float>(), P, c.data_ptr<float>(), P);
    return c.t().contiguous();
}

// Whether the per-step GEMMs of a (B, H, I) call run through brgemm. Their kernel shapes depend on the
// batch size B (and the model's H, I), and oneDNN keeps each forever: the first kMaxStepShapes
// distinct (B, H, I) are admitted, later ones take the at::mm path (correct, slower) rather than grow
// that cache without bound.
bool step_brgemm(int64_t B, int64_t H, int64_t I) {
    constexpr size_t kMaxStepShapes = 16;
    if (!use_brgemm()) return false;
    ShapeRegistry& r = shape_registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    const std::array<int64_t, 3> shape = {B, H, I};
    if (r.steps.count(shape) > 0) return true;
    if (r.steps.size() >= kMaxStepShapes) return false;
    r.steps.insert(shape);
    return true;
}

std::pair<size_t, size_t> brgemm_shapes() {
    ShapeRegistry& r = shape_registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    return {r.gemm.size(), r.steps.size()};
}

}  // namespace fused_bnlstm
