// The fused BN-LSTM layer on the CPU: the parameter structs that the step kernels read.
//
// One call runs one layer in one direction over a padded, time-major batch (see fused_bnlstm/ops).
// Sizes: T steps, B rows, I input features, H hidden units, G = 4H gate columns (order i, f, g, o).
// Every buffer is contiguous and row-major; "[T, B, 4H]" means element (t, b, c) at (t * B + b) * 4H + c.
// Pointers are void* and cast to scalar_t (float or double) inside the kernels; statistics and parameter
// gradients accumulate in at::opmath_type<scalar_t>. The derivation of the backward pass is in README.md.
#pragma once

#include <cstdint>

namespace fused_bnlstm {

enum class Normalization : int { kNone = 0, kFrame = 1, kSequence = 2 };

// Hidden units one kernel call handles at most; its per-column statistics live on the stack.
constexpr int64_t kBlock = 64;

// Rows running at step t: lengths[b] > t (every row when there are no lengths).
struct RowMask {
    const int64_t* lengths;  // [B] or nullptr
    bool operator()(int64_t b, int64_t t) const { return lengths == nullptr || lengths[b] > t; }
};

struct ForwardParams {
    int64_t T, B, I, H;
    Normalization norm;
    double eps;
    // Keep what backward needs: [T, ...] histories instead of per-step scratch.
    bool save;
    RowMask running;
    const int64_t* counts;      // [T] rows running at each step
    const uint8_t* step_batch;  // [T] 1 where step t normalizes with batch statistics (frame-wise)
    bool seq_batch;             // sequence-wise: normalize W_ih x with the batch's statistics

    // Parameters.
    const void* bias;      // [4H] or nullptr
    const void* gamma_ih;  // [4H] (frame, sequence)
    const void* gamma_hh;  // [4H] (frame)
    const void* gamma_c;   // [H]  (frame)
    const void* beta_c;    // [H]  (frame)
    // Population statistics (unbiased variances, used as they are) where batch statistics are not used.
    const void* pop_mean_ih;  // frame [T, 4H], sequence [1, 4H], or nullptr
    const void* pop_var_ih;
    const void* pop_mean_hh;  // frame [T, 4H] or nullptr
    const void* pop_var_hh;
    const void* pop_mean_c;   // frame [T, H] or nullptr
    const void* pop_var_c;

    // Input branch W_ih x_t: [T, B, 4H] (a_ih_step = B * 4H) or, when nothing is saved and it is computed
    // step by step, one step's [B, 4H] (a_ih_step = 0). Either from one GEMM over all steps before the loop
    // or, with input_per_step, by the step's parallel pass itself (brgemm, x [T, B, I] and w_ih_t [I, 4H]).
    // The step kernel overwrites it in place: with the normalized input branch xhat_ih (frame, sequence)
    // or with the gate activations (None), which is what backward reads.
    void* a_ih;
    int64_t a_ih_step;
    bool input_per_step;
    const void* x;
    const void* w_ih_t;
    // Recurrent branch W_hh h_{t-1} of the current step: [B, 4H] (one GEMM per step).
    const void* a_hh;
    // Gate activations sigmoid(i), sigmoid(f), tanh(g), sigmoid(o): [T, B, 4H] when save (frame,
    // sequence), else [B, 4H] scratch; unused for None when save (they live in a_ih).
    void* gates;
    // Normalized recurrent branch (frame, save): [T, B, 4H].
    void* xhat_hh;
    // Normalized cell (frame, save): [T, B, H].
    void* xhat_c;
    // tanh(BN(c_t)) (frame) or tanh(c_t) (sequence, None), save: [T, B, H].
    void* tanh_c;
    // 1 / sqrt(var + eps) each step normalized with (frame, save): [T, 4H], [T, 4H], [T, H].
    void* rstd_ih;
    void* rstd_hh;
    void* rstd_c;
    // Sequence-wise statistics, computed before the loop: mean and 1 / sqrt(var + eps), [4H].
    void* seq_mean;
    void* seq_rstd;
    // Batch statistics returned to the caller (frame, batch statistics): means and biased variances,
    // [T, 4H], [T, 4H], [T, H]; steps that use population statistics hold NaN. nullptr when not returned.
    void* mean_ih;
    void* var_ih;
    void* mean_hh;
    void* var_hh;
    void* mean_c;
    void* var_c;

    // States: h_t and c_t for t = 0..T (row t is the state before step t; finished rows keep theirs):
    // [T + 1, B, H] when save, else [2, B, H] used in turn.
    void* hs;
    void* cs;
    void* output;  // [T, B, H], zero where t >= length
};

struct BackwardParams {
    int64_t T, B, I, H;
    Normalization norm;
    RowMask running;
    const int64_t* counts;      // [T]
    const uint8_t* step_batch;  // [T]
    bool seq_batch;

    const void* gamma_ih;  // [4H] (frame, sequence)
    const void* gamma_hh;  // [4H] (frame)
    const void* gamma_c;   // [H]  (frame)

    // Saved by forward (see ForwardParams): hs, cs [T + 1, B, H]; gates [T, B, 4H] (the a_ih buffer for
    // None); xhat_ih [T, B, 4H] (frame, sequence); xhat_hh [T, B, 4H], xhat_c [T, B, H] (frame);
    // tanh_c [T, B, H]; rstd_ih, rstd_hh [T, 4H], rstd_c [T, H] (frame); seq_rstd [4H] (sequence).
    const void* hs;
    const void* cs;
    const void* gates;
    const void* xhat_ih;
    const void* xhat_hh;
    const void* xhat_c;
    const void* tanh_c;
    const void* rstd_ih;
    const void* rstd_hh;
    const void* rstd_c;
    const void* seq_rstd;

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
    // Parameter gradients accumulated over steps, opmath type: [4H], [4H], [4H], [H], [H].
    void* dbias;
    void* dgamma_ih;
    void* dgamma_hh;
    void* dgamma_c;
    void* dbeta_c;
};

// The step kernels (bnlstm_kernels.h), compiled once per instruction set and picked at run time.
// A forward or backward call handles step t for hidden units [j0, j1) with j1 - j0 <= kBlock and every
// batch row; the sequence-wise calls handle gate columns [c0, c1) over every frame.
struct StepKernels {
    void (*forward_f32)(const ForwardParams& p, int64_t t, int64_t j0, int64_t j1);
    void (*forward_f64)(const ForwardParams& p, int64_t t, int64_t j0, int64_t j1);
    void (*backward_f32)(const BackwardParams& p, int64_t t, int64_t j0, int64_t j1);
    void (*backward_f64)(const BackwardParams& p, int64_t t, int64_t j0, int64_t j1);
    void (*sequence_moments_f32)(const ForwardParams& p, int64_t c0, int64_t c1);
    void (*sequence_moments_f64)(const ForwardParams& p, int64_t c0, int64_t c1);
    void (*sequence_backward_f32)(const BackwardParams& p, int64_t c0, int64_t c1);
    void (*sequence_backward_f64)(const BackwardParams& p, int64_t c0, int64_t c1);
    const char* isa;
};

// nullptr where the compiler could not target that instruction set (not x86-64 GCC).
const StepKernels* step_kernels_default();
const StepKernels* step_kernels_avx2();
const StepKernels* step_kernels_avx512();

}  // namespace fused_bnlstm
