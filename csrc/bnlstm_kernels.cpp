// The step kernels for the compiler's default instruction set (x86-64: SSE2), the fallback everywhere.
#define ISA_NAME "default"
#define KERNEL_NAMESPACE isa_default
#define KERNEL_TABLE step_kernels_default
#include "bnlstm_kernels_isa.inc"
