// The step kernels compiled for AVX-512 (F, BW, VL, DQ) with AVX2 and FMA (GCC on x86-64; elsewhere none).
#define ISA_NAME "avx512"
#define KERNEL_NAMESPACE isa_avx512
#define KERNEL_TABLE step_kernels_avx512
#define KERNEL_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"
#include "bnlstm_kernels_isa.inc"
