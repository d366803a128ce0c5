// The fused BN-LSTM layer on the CPU: the parameter structs that the step kernels read.
//
// One call runs one layer in one direction over a padded, time-major batch (see fused_bnlstm/ops).
// Sizes: T steps, B rows, I input features, H hidden units, G = 4H gate columns (order i, f, g, o).
// Every buffer is contiguous and row-major; "[T, B, 4H]" means element (t, b, c) at (t * B + b) * 4H + c.
// Pointers are void*; the kernels read tensors of the layer (inputs, states, gates, normalized values) as
// scalar_t and statistics (rstd_*, seq_*, the returned moments) and parameter gradients as
// acc_t = at::opmath_type<scalar_t> (float for float32 and any half type, double for float64).
// The derivation of the backward pass is in README.md.
#pragma once

#include <cstdint>

namespace fused_bnlstm {

enum class Normalization : int { kNone = 0, kFrame = 1, kSequence = 2 };

// Hidden units one kernel call handles at most; its per-column statistics live on the stack.
constexpr int64_t kBlock = 64;

// Where step t of hidden-unit chunk c0 starts in a [steps, B, 4H] step gradient laid out chunk-major
// (BackwardParams::da_chunked): chunk c0's [steps][B][4][w] block sits at c0 * 4 * steps * B, w = min(kBlock,
// H - c0), and step t's [B][4][w] rows inside it.
inline int64_t chunk_major_offset(int64_t steps, int64_t t, int64_t B, int64_t H, int64_t c0) {
    const int64_t w = H - c0 < kBlock ? H - c0 : kBlock;
    return c0 * 4 * steps * B + t * B * 4 * w;
}

// Rows running at step t: lengths[b] > t (every row when there are no lengths).
struct RowMask {
    const int64_t* lengths;  // [B] or nullptr
    bool operator()(int64_t b, int64_t t) const { return lengths == nullptr || lengths[b] > t; }
};

// What forward and backward share: sizes, the per-step plan, the batch-norm scales and the histories
// forward keeps for backward. Filled once by set_common_params (bnlstm.cpp).
struct StepParamsBase {
    int64_t T, B, I, H;
    Normalization norm;
    RowMask running;
    const int64_t* counts;       // [T] rows running at each step
    // Whether a step normalizes with batch statistics (else the population's): frame [T], sequence [1].
    const uint8_t* batch_stats;

    const void* gamma_ih;  // [4H] (frame, sequence)
    const void* gamma_hh;  // [4H] (frame)
    const void* gamma_c;   // [H]  (frame)

    // States h_t and c_t for t = 0..T (row t is the state before step t; finished rows keep theirs):
    // [T + 1, B, H] when forward saves for backward, else [2, B, H] used in turn.
    void* hs;
    void* cs;
    // Gate activations sigmoid(i), sigmoid(f), tanh(g), sigmoid(o): [T, B, 4H] when saved, else [B, 4H]
    // scratch (frame, sequence); for None they are written over the input branch (ForwardParams::a_ih).
    // gates (but not over the input branch), xhat_ih (frame), xhat_hh, xhat_c and tanh_c hold each step's
    // [B, 4H] / [B, H] chunk by chunk of kBlock hidden units (StepRows in bnlstm_kernels.inc): only the step
    // kernels read them; every other buffer here is row-major.
    void* gates;
    // Normalized input branch, [T, B, 4H]: frame-wise (saved) its own history; sequence-wise written over a_ih
    // (row-major, for sequence_backward's column passes).
    void* xhat_ih;
    void* xhat_hh;  // normalized recurrent branch (frame, saved): [T, B, 4H]
    void* xhat_c;   // normalized cell (frame, saved): [T, B, H]
    void* tanh_c;   // tanh(BN(c_t)) (frame) or tanh(c_t) (sequence, None), saved: [T, B, H]
    // acc_t: 1 / sqrt(var + eps) each step normalized with (frame, saved): [T, 4H], [T, 4H], [T, H];
    // sequence-wise the one [4H] of the input branch.
    void* rstd_ih;
    void* rstd_hh;
    void* rstd_c;
    void* seq_rstd;
};

struct ForwardParams : StepParamsBase {
    double eps;
    // Keep what backward needs: [T, ...] histories instead of per-step scratch.
    bool save;

    const void* bias;    // [4H] or nullptr
    const void* beta_c;  // [H]  (frame)
    // Population statistics (unbiased variances, used as they are) where batch statistics are not used.
    const void* pop_mean_ih;  // frame [T, 4H], sequence [1, 4H], or nullptr
    const void* pop_var_ih;
    const void* pop_mean_hh;  // frame [T, 4H] or nullptr
    const void* pop_var_hh;
    const void* pop_mean_c;   // frame [T, H] or nullptr
    const void* pop_var_c;

    // Input branch W_ih x_t: [T, B, 4H] (a_ih_step = B * 4H) or, when it is computed step by step and not
    // kept (nothing saved, or frame-wise, whose xhat_ih is its own buffer), one step's [B, 4H] (a_ih_step =
    // 0). Either from one GEMM over all steps before the loop or, with input_per_step, by the step's
    // parallel pass itself (brgemm, x [T, B, I] and w_ih [4H, I]). Sequence-wise the step kernel overwrites
    // it with xhat_ih, for None with the gate activations: what backward reads.
    void* a_ih;
    int64_t a_ih_step;
    bool input_per_step;
    // Whether the step's input branch (a step's scratch, computed per step) and recurrent branch are laid
    // out chunk by chunk (StepRows in bnlstm_kernels.inc): so where the step's brgemm calls write them.
    bool a_ih_chunked;
    bool a_hh_chunked;
    const void* x;
    const void* w_ih;
    // Recurrent branch W_hh h_{t-1} of the current step: [B, 4H] worth (one GEMM per step).
    const void* a_hh;
    // Sequence-wise mean of the input branch, computed before the loop (acc_t): [4H].
    void* seq_mean;
    // Batch statistics returned to the caller (acc_t; means and biased variances): frame [T, 4H], [T, 4H],
    // [T, H], written on the steps that normalize with batch statistics only; sequence [1, 4H] (ih only).
    // nullptr when not returned.
    void* mean_ih;
    void* var_ih;
    void* mean_hh;
    void* var_hh;
    void* mean_c;
    void* var_c;

    void* output;  // [T, B, H], zero where t >= length
};

struct BackwardParams : StepParamsBase {
    // Incoming gradients: output [T, B, H] (nullptr: zero); dh, dc [B, H] hold the gradient of h_n, c_n on
    // entry and of the state before the current step as the loop goes back (so dh0, dc0 at the end).
    const void* grad_output;
    void* dh;
    void* dc;
    // dh of the state before the current step, from the per-step GEMM: [B, H].
    void* dh_prev;
    // Gradient of W_hh h_{t-1} ([T, B, 4H]); zero on rows that were not running. For None it is also
    // the gradient of W_ih x_t, and for sequence-wise it first holds the gradient of the gate
    // pre-activations, from which d(W_ih x) is computed after the loop.
    void* da_hh;
    // Gradient of W_ih x_t (frame, sequence): [T, B, 4H]; zero on rows that were not running.
    void* da_ih;
    // da_hh and da_ih chunk-major over all steps instead of [T, B, 4H] (frame-wise, where the step loop may
    // split over threads; set by backward_cpu; chunk_major_offset), so that each task writes and the GEMM over
    // all steps reads one contiguous block.
    bool da_chunked;
    // Parameter gradients accumulated over steps (acc_t): [4H], [4H], [4H], [H], [H].
    void* dbias;
    void* dgamma_ih;
    void* dgamma_hh;
    void* dgamma_c;
    void* dbeta_c;

    // Synchronized statistics (a process group; bnlstm_cpu.cpp's plain loops): a frame-wise step with
    // batch statistics runs in three calls, the driver summing the batch-norm sums over the group between
    // them. Phase 0 runs the whole step on this call's own sums. Phase 1 stops after BN(c)'s sums and writes
    // them to sync_sums_c ([2, H], acc_t: the sums of d y and d y * xhat_c over the running rows); phase 2
    // reads them back (summed over the group), runs BN(c) and the cell backward, and writes the gate batch
    // norms' sums to sync_sums_gates ([3, 4H]: d z, d z * xhat_ih, d z * xhat_hh); phase 3 reads those back
    // and finishes d(W_ih x) and d(W_hh h). Sequence-wise, sequence_backward's phase 1 writes its sums to
    // sync_sums_gates ([2, 4H]: d z, d z * xhat_ih) and phase 3 reads them back. Parameter gradients are this
    // rank's own sums (DDP reduces them).
    int sync_phase;
    void* sync_sums_c;
    void* sync_sums_gates;
};

// The step kernels of one dtype (bnlstm_kernels.inc). A forward or backward call handles step t for hidden
// units [j0, j1) with j1 - j0 <= kBlock and every batch row; the sequence-wise calls handle gate columns
// [c0, c1) over every frame.
template <typename scalar_t>
struct StepKernelSet {
    void (*forward_step)(const ForwardParams& p, int64_t t, int64_t j0, int64_t j1);
    void (*backward_step)(const BackwardParams& p, int64_t t, int64_t j0, int64_t j1);
    void (*sequence_moments)(const ForwardParams& p, int64_t c0, int64_t c1);
    void (*sequence_backward)(const BackwardParams& p, int64_t c0, int64_t c1);
};

// The step kernels compiled for one instruction set, for each dtype; the driver picks one table at run time.
struct StepKernels {
    StepKernelSet<float> f32;
    StepKernelSet<double> f64;
    const char* isa;

    template <typename scalar_t>
    const StepKernelSet<scalar_t>& of() const;
};

template <>
inline const StepKernelSet<float>& StepKernels::of<float>() const { return f32; }
template <>
inline const StepKernelSet<double>& StepKernels::of<double>() const { return f64; }

// nullptr where the compiler could not target that instruction set (not x86-64 GCC).
const StepKernels* step_kernels_default();
const StepKernels* step_kernels_avx2();
const StepKernels* step_kernels_avx512();

}  // namespace fused_bnlstm
