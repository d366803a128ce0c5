// The step kernels compiled for AVX2 and FMA (GCC on x86-64; elsewhere none).
#define ISA_NAME "avx2"
#define KERNEL_NAMESPACE isa_avx2
#define KERNEL_TABLE step_kernels_avx2
#define KERNEL_TARGET "avx2,fma"
#include "bnlstm_kernels_isa.inc"
