// The time loops and GEMMs of bnlstm_cpu.cpp, as bnlstm.cpp calls them (the parameter structs: bnlstm.h).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "bnlstm.h"

namespace fused_bnlstm {

// What the plain loops (at::mm per step, bnlstm_cpu.cpp) run besides the step kernels: a projection,
// synchronized statistics, both, or neither (float64, no brgemm).
struct PlainLoop {
    at::Tensor hs, cs;  // the tensors behind StepParamsBase::hs and cs ([T + 1, B, H] when saved, else [2, B, H])

    // A projection (proj_size, LSTMP), where w_hr is defined. The step kernels' h is then m_t = o * tanh(BN(c_t))
    // [B, H] (in hs, row 0 unused: no row is finished at step 0); the layer's state and output is r_t = W_hr m_t.
    at::Tensor w_hr;         // [P, H]
    at::Tensor rs;           // r_t before each step, r_0 = h0: [T + 1, B, P] when saved, else [2, B, P]
    at::Tensor output;       // forward: [T, B, P], zero where t >= length
    at::Tensor grad_output;  // backward: [T, B, P], or undefined (zero)
    at::Tensor dr_run;       // backward: [T, B, P], the gradient of r_t on the rows running at step t, else 0

    // Synchronized statistics, where group names a process group (torch.distributed's group_name). Forward,
    // ForwardParams' pop_* point at `given` and its batch_stats at all-zero flags: the kernels normalize with
    // these moments, which the loop fills (summed over the group) where a step takes batch statistics; the
    // population's rows fill the rest.
    std::string group;
    const uint8_t* batch_stats = nullptr;  // frame [T], sequence [1]: where batch statistics are taken
    at::Tensor running;                    // [T, B] bool: the rows running at each step
    at::Tensor a_ih;                       // [T, B, 4H] the input branch
    // frame: mean_ih, var_ih, mean_hh, var_hh [T, 4H], mean_c, var_c [T, H]; sequence: mean_ih, var_ih [1, 4H]
    std::array<at::Tensor, 6> given;

    bool projected() const { return w_hr.defined(); }
    bool synced() const { return !group.empty(); }
};

// The brgemm loops (float32 where oneDNN's brgemm runs), or the plain ones otherwise.
void forward_cpu(ForwardParams& p, at::Tensor& a_hh, const at::Tensor& hs, const at::Tensor& w_hh);
void backward_cpu(BackwardParams& p, at::Tensor& dh, at::Tensor& dh_prev, const at::Tensor& da_hh,
                  const at::Tensor& w_hh);
// a_hh [B, 4H] scratch, w_hh [4H, P]. Backward: dstate [B, P] (P = H without a projection) holds the gradient
// of h_n on entry and that of h0 at the end; dstate_prev is its partner buffer.
void forward_plain_cpu(ForwardParams& p, at::Tensor& a_hh, const at::Tensor& w_hh, const PlainLoop& loop);
void backward_plain_cpu(BackwardParams& p, at::Tensor& dstate, at::Tensor& dstate_prev, const at::Tensor& da_hh,
                        const at::Tensor& w_hh, const PlainLoop& loop);

const char* kernel_isa();
bool use_brgemm();
bool gemm_through_brgemm();
bool step_brgemm(int64_t B, int64_t H, int64_t I);
std::pair<size_t, size_t> brgemm_shapes();
bool step_on_one_thread(int64_t B, int64_t H, int64_t I);
at::Tensor gemm_nn(const at::Tensor& a, const at::Tensor& b);
at::Tensor gemm_tn(const at::Tensor& a, const at::Tensor& b);
void gemm_nn_out(at::Tensor& c, const at::Tensor& a, const at::Tensor& b);

}  // namespace fused_bnlstm
