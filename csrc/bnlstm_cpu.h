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

// The tensors of a projection (proj_size, LSTMP; the projected loops in bnlstm_cpu.cpp). The step kernels'
// h is m_t = o * tanh(BN(c_t)) [B, H]; the layer's state and output is r_t = W_hr m_t [B, P].
struct ProjectedStates {
    at::Tensor w_hr;         // [P, H]
    at::Tensor hs;           // m_t, the tensor behind StepParamsBase::hs (row 0 unused: no row is finished at 0)
    at::Tensor rs;           // r_t before each step, r_0 = h0: [T + 1, B, P] when saved, else [2, B, P]
    at::Tensor output;       // forward: [T, B, P], zero where t >= length
    at::Tensor grad_output;  // backward: [T, B, P], or undefined (zero)
    at::Tensor dr_run;       // backward: [T, B, P], the gradient of r_t on the rows running at step t, else 0
};

// Synchronized statistics (frame-wise; the synchronized loops in bnlstm_cpu.cpp). ForwardParams' pop_* point at
// `given` and its batch_stats at all-zero flags: the kernels normalize with these moments, which the loop
// fills (summed over the group) on the steps with batch statistics and the population's rows fill elsewhere.
struct SyncedStatistics {
    std::string group;             // the process group's name (torch.distributed's group_name)
    const uint8_t* batch_stats;    // [T] the steps that normalize with batch statistics
    at::Tensor running;            // [T, B] bool: the rows running at each step
    at::Tensor a_ih;               // [T, B, 4H] the input branch
    at::Tensor hs, cs;             // the tensors behind StepParamsBase::hs and cs
    std::array<at::Tensor, 6> given;  // mean_ih, var_ih, mean_hh, var_hh [T, 4H], mean_c, var_c [T, H]
};

void forward_cpu(ForwardParams& p, at::Tensor& a_hh, const at::Tensor& hs, const at::Tensor& w_hh);
void backward_cpu(BackwardParams& p, at::Tensor& dh, at::Tensor& dh_prev, const at::Tensor& da_hh,
                  const at::Tensor& w_hh);
// With a projection: a_hh [B, 4H] scratch, w_hh [4H, P]. Backward: dr [B, P] holds the gradient of h_n (r_T)
// on entry and that of h0 at the end.
void forward_projected_cpu(ForwardParams& p, at::Tensor& a_hh, const at::Tensor& w_hh, const ProjectedStates& proj);
void backward_projected_cpu(BackwardParams& p, at::Tensor& dr, const at::Tensor& da_hh, const at::Tensor& w_hh,
                            const ProjectedStates& proj);

void forward_sync_cpu(ForwardParams& p, at::Tensor& a_hh, const at::Tensor& w_hh, const SyncedStatistics& sync);
void backward_sync_cpu(BackwardParams& p, at::Tensor& dh, at::Tensor& dh_prev, const at::Tensor& da_hh,
                       const at::Tensor& w_hh, const std::string& group);

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
