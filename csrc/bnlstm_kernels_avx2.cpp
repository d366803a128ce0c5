// The step kernels compiled for AVX2 (GCC on x86-64; elsewhere this file defines no kernels). Only the code
// after the pragma is compiled for AVX2: the standard headers come first, and the driver calls these
// kernels only on a CPU that has the instructions (bnlstm_cpu.cpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "bnlstm.h"

namespace fused_bnlstm {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#define ISA_NAME "avx2"
#include "bnlstm_kernels.h"
#undef ISA_NAME
}  // namespace isa_avx2
#pragma GCC pop_options

const StepKernels* step_kernels_avx2() { return &isa_avx2::kTable; }
#else
const StepKernels* step_kernels_avx2() { return nullptr; }
#endif

}  // namespace fused_bnlstm
