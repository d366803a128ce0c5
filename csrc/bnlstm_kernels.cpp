// The step kernels for the compiler's default instruction set (x86-64: SSE2), the fallback everywhere.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "bnlstm.h"

namespace fused_bnlstm {
namespace isa_default {
#define ISA_NAME "default"
#include "bnlstm_kernels.h"
#undef ISA_NAME
}  // namespace isa_default

const StepKernels* step_kernels_default() { return &isa_default::kTable; }

}  // namespace fused_bnlstm
