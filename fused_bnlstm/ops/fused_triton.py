"""The BN-LSTM layer op on fused Triton kernels: one launch per time step forward, one per step backward.

Layout of the computation (kernels in ``triton_kernels.py``; conventions and the BN backward derivation in
``README.md`` beside this file):

- The input branch is **hoisted**: ``a_ih = x W_ih^T`` for all T steps is one GEMM (cuBLAS through
  ``torch.matmul``) before the recurrence, as haste and cuDNN do: it does not depend on h, and one
  [T*B, I] x [I, 4H] GEMM is far better shaped than T small ones inside the step kernel. (Chosen on that
  ground; no GPU was lent when this was written, so it has not been timed against an in-kernel variant:
  ``benchmarks/gpu_check.sh`` times the layer as a whole.) Frame-wise, the step kernel normalizes it with
  the step's statistics; sequence-wise, one kernel normalizes it over every valid frame before the loop;
  with ``normalization=None`` it is added as is.
- Forward, one ``bnlstm_fwd_step_kernel`` launch per step t: a program owns BH hidden units of all four
  gates and every batch row, computes ``W_hh h_{t-1}`` for its columns, both batch norms over the rows
  still running (or the population statistics), the bias, the gates, c_t, BN(c_t) and h_t, and saves
  ``W_hh h_{t-1}`` and the moments it used.
- Backward, one ``bnlstm_bwd_step_kernel`` launch per step in reverse: the h-state gradient from the next
  step's ``da_hh @ W_hh`` (every column of it, written by the previous launch), then the elementwise and
  BN backward of the program's columns. dW_ih, dW_hh, dx and dh0 are GEMMs over all steps after the loop;
  gamma, beta and bias gradients are per-column sums each program accumulates over the steps into its own
  columns (deterministic, no atomics).

Statistics, accumulation and the cell state are float32 (float64 for float64 tensors); bf16 and fp16 run
the GEMMs in their dtype with float32 accumulation; under autocast the op computes in autocast's dtype.
fp32 recurrent GEMMs follow ``torch.backends.cuda.matmul.allow_tf32`` (off by default: IEEE fp32). A
program holds every batch row in registers, which suits the batch sizes recurrent models train with.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fused_bnlstm.ops.common import BatchStatistics, Population, step_counts

try:
    import triton
    import triton.language as tl

    from fused_bnlstm.ops import triton_kernels as kernels
except ImportError as error:
    triton = None
    _IMPORT_ERROR = error
else:
    _IMPORT_ERROR = None
    # triton reads TRITON_INTERPRET when the kernels are decorated, i.e. at this import
    _INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["available", "bnlstm_layer_triton"]

_NORMALIZATIONS = ("frame", "sequence", None)
# hidden units per program, reduction chunk of the recurrent GEMMs, rows / features per sequence-BN chunk
_BLOCK_H = 16
_BLOCK_K = 32
_BLOCK_ROWS = 64
_BLOCK_FEATURES = 32


def available(device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device``; if not, a sentence that says why."""
    if triton is None:
        return False, f"triton is not importable ({_IMPORT_ERROR}); install it with `pip install triton`"
    device = torch.device(device)
    if device.type == "cuda":
        if _INTERPRETED_AT_IMPORT:
            return False, ("the Triton kernels were loaded under TRITON_INTERPRET=1, which runs them on CPU "
                           "tensors only; unset it to run them on CUDA")
        return True, ""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1" and _INTERPRETED_AT_IMPORT:
            return True, ""
        return False, ("Triton kernels run on CUDA tensors, or on CPU tensors only under the Triton interpreter "
                       "(set TRITON_INTERPRET=1 before triton is first imported)")
    return False, f"Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), not on {device.type}"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype, device: torch.device):
    # fp32 recurrent GEMMs follow torch's matmul TF32 switch, as the reference's matmuls do; bf16 / fp16 as is
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if dtype in (torch.float32, torch.float64) else None


def _block_rows(B: int) -> int:
    return max(16, triton.next_power_of_2(B))


def _num_warps(B: int) -> int:
    # a program holds [BB, BH] tiles of every gate: more warps for more rows keep them in registers
    # (sm90, BH=16: no spills up to B=128; B=256 spills a little in backward)
    return min(16, max(4, _block_rows(B) // 8))


def _sequence_bn_forward(a_ih: Tensor, gamma_ih: Tensor, mean: Tensor, var: Tensor, lengths: Tensor, n_frames: int,
                         use_batch: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """u = gamma_ih * BN(a_ih) over every valid frame; returns u [T, B, 4H] and the moments used [4H]."""
    T, B, G = a_ih.shape
    acc = _acc_dtype(a_ih.dtype)
    u = torch.empty_like(a_ih)
    used_mean = torch.empty(G, dtype=acc, device=a_ih.device)
    used_var = torch.empty(G, dtype=acc, device=a_ih.device)
    grid = (triton.cdiv(G, _BLOCK_FEATURES),)
    kernels.sequence_bn_fwd_kernel[grid](
        p_a=a_ih, p_u=u, p_gamma=gamma_ih, p_pop_mean=mean, p_pop_var=var, p_lengths=lengths,
        p_mean=used_mean, p_var=used_var, n=n_frames, use_batch=int(use_batch), eps=eps, T=T, B=B, F=G,
        ACC=_tl_acc(a_ih.dtype), BR=_BLOCK_ROWS, BF=_BLOCK_FEATURES,
    )
    return u, used_mean, used_var


def _sequence_bn_backward(a_ih: Tensor, du: Tensor, gamma_ih: Tensor, mean: Tensor, var: Tensor, lengths: Tensor,
                          n_frames: int, use_batch: bool, eps: float) -> tuple[Tensor, Tensor]:
    """da_ih [T, B, 4H] and dgamma_ih [4H] (accumulation dtype) from du [T, B, 4H]."""
    T, B, G = a_ih.shape
    da = torch.empty_like(du)
    dgamma = torch.empty(G, dtype=_acc_dtype(a_ih.dtype), device=a_ih.device)
    grid = (triton.cdiv(G, _BLOCK_FEATURES),)
    kernels.sequence_bn_bwd_kernel[grid](
        p_a=a_ih, p_du=du, p_da=da, p_gamma=gamma_ih, p_mean=mean, p_var=var, p_lengths=lengths, p_dgamma=dgamma,
        n=n_frames, use_batch=int(use_batch), eps=eps, T=T, B=B, F=G,
        ACC=_tl_acc(a_ih.dtype), BR=_BLOCK_ROWS, BF=_BLOCK_FEATURES,
    )
    return da, dgamma


def _step_arguments(x_gates, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, c, a_hh, moments, lengths,
                    eps, frame) -> dict:
    """The launch arguments the forward and backward step kernels share."""
    B, G = x_gates.shape[1], x_gates.shape[2]
    dtype, device = x_gates.dtype, x_gates.device
    # pointers a mode never reads still need a live tensor (never an empty one)
    dummy = x_gates
    saved = moments or [dummy] * 6
    return dict(
        p_x_gates=x_gates, p_w_hh=weight_hh, p_bias=bias if bias is not None else dummy,
        p_gamma_ih=gamma_ih if frame else dummy, p_gamma_hh=gamma_hh if frame else dummy,
        p_gamma_c=gamma_c if frame else dummy, p_beta_c=beta_c if frame else dummy,
        p_mean_ih=saved[0], p_var_ih=saved[1], p_mean_hh=saved[2], p_var_hh=saved[3], p_mean_c=saved[4],
        p_var_c=saved[5], p_lengths=lengths, p_c=c, p_a_hh=a_hh, eps=eps, B=B, H=G // 4,
        FRAME=frame, HAS_BIAS=bias is not None, ACC=_tl_acc(dtype), PRECISION=_precision(dtype, device),
        BB=_block_rows(B), BH=_BLOCK_H, BK=_BLOCK_K, num_warps=_num_warps(B),
    )


def _forward(x_gates, h0, c0, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, pop, lengths, counts,
             use_batch_stats, eps, frame):
    """The recurrence, one launch per step. x_gates [T, B, 4H]: a_ih (frame) or the finished input branch.

    Returns output [T, B, H], the h states [T+1, B, H] (input dtype), the c states [T+1, B, H], W_hh h_{t-1}
    [T, B, 4H] and the moments each step used (mean_ih, var_ih, mean_hh, var_hh [T, 4H]; mean_c, var_c
    [T, H]; accumulation dtype; an empty list unless frame-wise).
    """
    T, B, G = x_gates.shape
    H = G // 4
    dtype, device = x_gates.dtype, x_gates.device
    acc = _acc_dtype(dtype)
    out = torch.empty(T, B, H, dtype=dtype, device=device)
    h = torch.empty(T + 1, B, H, dtype=dtype, device=device)
    c = torch.empty(T + 1, B, H, dtype=acc, device=device)
    h[0] = h0
    c[0] = c0
    a_hh = torch.empty(T, B, G, dtype=acc, device=device)
    moments = [torch.empty(T, w, dtype=acc, device=device) for w in (G, G, G, G, H, H)] if frame else []
    static = _step_arguments(x_gates, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, c, a_hh, moments,
                             lengths, eps, frame)
    static.update(
        p_pop_mean_ih=pop[0], p_pop_var_ih=pop[1], p_pop_mean_hh=pop[2], p_pop_var_hh=pop[3],
        p_pop_mean_c=pop[4], p_pop_var_c=pop[5], p_h=h, p_out=out,
    )
    grid = (triton.cdiv(H, _BLOCK_H),)
    for t in range(T):
        use_batch = use_batch_stats and counts[t] >= 2
        kernels.bnlstm_fwd_step_kernel[grid](t=t, n=counts[t], use_batch=int(use_batch), **static)
    return out, h, c, a_hh, moments


def _backward(dout, dh_n, dc_n, x_gates, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, c, a_hh, moments,
              lengths, counts, use_batch_stats, eps, frame):
    """Reverse-time launches. Returns da_hh, da_ih [T, B, 4H] (input dtype), the gradients of the h and c
    states before step 0 [B, H] (dh without the final da_hh_0 W_hh term) and the parameter sums (acc dtype).
    """
    T, B, G = x_gates.shape
    H = G // 4
    dtype, device = x_gates.dtype, x_gates.device
    acc = _acc_dtype(dtype)
    # [B, H] state gradients the kernels update in place: copies, never the incoming cotangents
    dh = dh_n.to(acc, memory_format=torch.contiguous_format, copy=True)
    dc = dc_n.to(acc, memory_format=torch.contiguous_format, copy=True)
    da_hh = torch.empty(T, B, G, dtype=dtype, device=device)
    da_ih = torch.empty(T, B, G, dtype=dtype, device=device)
    dgamma_ih = torch.zeros(G, dtype=acc, device=device)
    dgamma_hh = torch.zeros(G, dtype=acc, device=device)
    dbias = torch.zeros(G, dtype=acc, device=device)
    dgamma_c = torch.zeros(H, dtype=acc, device=device)
    dbeta_c = torch.zeros(H, dtype=acc, device=device)
    static = _step_arguments(x_gates, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, c, a_hh, moments,
                             lengths, eps, frame)
    static.update(
        p_dout=dout, p_dh=dh, p_dc=dc, p_da_hh=da_hh, p_da_ih=da_ih, p_dgamma_ih=dgamma_ih,
        p_dgamma_hh=dgamma_hh, p_dbias=dbias, p_dgamma_c=dgamma_c, p_dbeta_c=dbeta_c, T=T,
    )
    grid = (triton.cdiv(H, _BLOCK_H),)
    for t in range(T - 1, -1, -1):
        use_batch = use_batch_stats and counts[t] >= 2
        kernels.bnlstm_bwd_step_kernel[grid](t=t, n=counts[t], use_batch=int(use_batch), **static)
    return da_hh, da_ih, dh, dc, (dgamma_ih, dgamma_hh, dbias, dgamma_c, dbeta_c)


def _layer_forward(x, h0, c0, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, lengths, counts, pop,
                   use_batch_stats, eps, normalization):
    """The whole forward of one layer-direction: the hoisted input GEMM, the input branch's normalization
    (sequence-wise), then the recurrence. Returns out, h_n, c_n, the moments to return and what backward needs.
    """
    T = x.shape[0]
    # [T, B, 4H] the hoisted input branch: one GEMM over every step
    a_ih = torch.matmul(x, weight_ih.t())
    seq_moments = None
    if normalization == "sequence":
        n_frames = sum(counts)
        seq_batch = use_batch_stats and n_frames >= 2
        x_gates, seq_mean, seq_var = _sequence_bn_forward(a_ih, gamma_ih, pop[0], pop[1], lengths, n_frames,
                                                          seq_batch, eps)
        seq_moments = (seq_mean, seq_var, seq_batch)
    else:
        x_gates = a_ih
    out, h, c, a_hh, moments = _forward(x_gates, h0, c0, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c,
                                        pop, lengths, counts, use_batch_stats, eps, normalization == "frame")
    returned = moments if seq_moments is None else [seq_moments[0][None], seq_moments[1][None]]
    saved = (a_ih, x_gates, h, c, a_hh, *moments)
    return out, h[T].clone(), c[T].to(x.dtype, copy=True), returned, saved, seq_moments


def _layer_backward(dout, dh_n, dc_n, needs, x, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c,
                    lengths, a_ih, x_gates, h, c, a_hh, moments, counts, use_batch_stats, eps, normalization,
                    seq_moments):
    """The whole backward: reverse-time launches, then the weight, input and h0 gradients as GEMMs over all
    steps. Returns the gradients of (x, h0, c0, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c,
    beta_c), None where ``needs`` is false or the mode does not use the tensor.
    """
    T, B, _ = x.shape
    frame = normalization == "frame"
    da_hh, da_ih, dh, dc, sums = _backward(
        dout.contiguous(), dh_n, dc_n, x_gates, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, c, a_hh,
        moments, lengths, counts, use_batch_stats, eps, frame,
    )
    dgamma_ih, dgamma_hh, dbias, dgamma_c, dbeta_c = sums
    if normalization == "sequence":
        seq_mean, seq_var, seq_batch = seq_moments
        da_ih, dgamma_ih = _sequence_bn_backward(a_ih, da_ih, gamma_ih, seq_mean, seq_var, lengths, sum(counts),
                                                 seq_batch, eps)
    G = da_hh.shape[2]
    dx = torch.matmul(da_ih, weight_ih) if needs[0] else None
    # the h state before step 0 gets da_hh_0 W_hh on every row that runs at step 0 (all of them: lengths >= 1)
    dh0 = torch.where(lengths[:, None] > 0, torch.matmul(da_hh[0], weight_hh).to(dh.dtype), dh) if needs[1] else None
    # [4H, I] and [4H, H]: sums over all T*B frames of da^T x and da^T h_{t-1}
    dW_ih = torch.matmul(da_ih.reshape(T * B, G).t(), x.reshape(T * B, -1)) if needs[3] else None
    dW_hh = torch.matmul(da_hh.reshape(T * B, G).t(), h[:T].reshape(T * B, -1)) if needs[4] else None

    def cast(grad, like, need, used=True):
        return grad.to(like.dtype) if need and used and like is not None else None

    # parameters a mode does not use get no gradient, as with the reference
    return (dx, cast(dh0, x, needs[1]), cast(dc, x, needs[2]), dW_ih, dW_hh, cast(dbias, bias, needs[5]),
            cast(dgamma_ih, gamma_ih, needs[6], normalization is not None),
            cast(dgamma_hh, gamma_hh, needs[7], frame), cast(dgamma_c, gamma_c, needs[8], frame),
            cast(dbeta_c, beta_c, needs[9], frame))


class BNLSTMLayerFunction(torch.autograd.Function):
    """One layer-direction on the fused kernels; outputs out, h_n, c_n and the (non-differentiable) moments."""

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, lengths, counts,
                pop, use_batch_stats, eps, normalization):
        out, h_n, c_n, moments, saved, seq_moments = _layer_forward(
            x, h0, c0, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, lengths, counts, pop,
            use_batch_stats, eps, normalization,
        )
        ctx.save_for_backward(x, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, lengths, *saved)
        ctx.config = (counts, use_batch_stats, eps, normalization, seq_moments)
        ctx.mark_non_differentiable(*moments)
        return (out, h_n, c_n, *moments)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dh_n, dc_n, *_):
        (x, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, lengths, a_ih, x_gates, h, c, a_hh,
         *moments) = ctx.saved_tensors
        grads = _layer_backward(dout, dh_n, dc_n, ctx.needs_input_grad, x, weight_ih, weight_hh, bias, gamma_ih,
                                gamma_hh, gamma_c, beta_c, lengths, a_ih, x_gates, h, c, a_hh, moments, *ctx.config)
        return (*grads, None, None, None, None, None, None)


def bnlstm_layer_triton(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Tensor | None,
    gamma_ih: Tensor | None,
    gamma_hh: Tensor | None,
    gamma_c: Tensor | None,
    beta_c: Tensor | None,
    lengths: Tensor | None,
    population: Population | None,
    use_batch_stats: bool,
    eps: float,
    normalization: str | None,
) -> tuple[Tensor, Tensor, Tensor, BatchStatistics | None]:
    """One BN-LSTM layer-direction on the fused Triton kernels.

    Arguments and returns as ``fused_bnlstm.ops.bnlstm_layer`` (the reference ``bnlstm_layer_naive`` is the
    oracle this is tested against): output [T, B, H], h_n, c_n [B, H] and the ``BatchStatistics`` used.
    """
    ok, reason = available(x.device)
    if not ok:
        raise RuntimeError(f"the 'triton' BN-LSTM backend cannot run on {x.device.type} tensors: {reason}")
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of 'frame', 'sequence' or None, got {normalization!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be [T, B, I], got {list(x.shape)}")
    T, B, I = x.shape
    H = weight_hh.shape[1]
    if weight_ih.shape != (4 * H, I) or weight_hh.shape != (4 * H, H):
        raise ValueError(f"expected weight_ih [{4 * H}, {I}] and weight_hh [{4 * H}, {H}], got "
                         f"{list(weight_ih.shape)} and {list(weight_hh.shape)}")
    if h0.shape != (B, H) or c0.shape != (B, H):
        raise ValueError(f"expected h0 and c0 of shape [{B}, {H}], got {list(h0.shape)} and {list(c0.shape)}")
    needed = {"frame": ("gamma_ih", "gamma_hh", "gamma_c", "beta_c"), "sequence": ("gamma_ih",), None: ()}
    given = {"gamma_ih": gamma_ih, "gamma_hh": gamma_hh, "gamma_c": gamma_c, "beta_c": beta_c}
    for name in needed[normalization]:
        if given[name] is None:
            raise ValueError(f"normalization={normalization!r} needs {name}")
    if T == 0 or B == 0:
        raise ValueError(f"the 'triton' backend needs T > 0 and B > 0, got T={T}, B={B}")

    counts = step_counts(lengths, T, B)
    device = x.device
    lengths_dev = (torch.full((B,), T, dtype=torch.int64) if lengths is None else lengths.to(torch.int64))
    lengths_dev = lengths_dev.to(device)
    use_batch_stats = bool(use_batch_stats)
    frame = normalization == "frame"
    if normalization is None:
        pop = (x,) * 6
    else:
        fallback = not use_batch_stats or (frame and min(counts) < 2) or (
            normalization == "sequence" and sum(counts) < 2)
        if population is None:
            if fallback:
                raise ValueError("population statistics are needed: this call normalizes some step without "
                                 "batch statistics (eval, or fewer than two running rows)")
            G = 4 * H
            rows = T if frame else 1
            population = Population(x.new_zeros(rows, G), x.new_ones(rows, G), x.new_zeros(rows, G),
                                    x.new_ones(rows, G), x.new_zeros(rows, H), x.new_ones(rows, H))
        pop = tuple(p.contiguous() if p is not None else x for p in population)
        pop = pop + (x,) * (6 - len(pop))

    # one compute dtype for every operand: autocast's where it is on (as nn.LSTM under autocast), else x's;
    # casts and layout fixes happen here, differentiably, at the one boundary into the kernels
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x.dtype

    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"the 'triton' backend runs float32, float64, float16 and bfloat16, got {dtype}")
    if dtype == torch.bfloat16 and device.type == "cpu":
        raise TypeError("the Triton interpreter (CPU tensors) has no bfloat16; use float32, float64 or float16")

    def prepared(value):
        return value.to(dtype).contiguous() if value is not None else None

    with torch.autocast(device.type, enabled=False):
        out, h_n, c_n, *moments = BNLSTMLayerFunction.apply(
            *[prepared(v) for v in (x, h0, c0, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c)],
            lengths_dev, counts, pop, use_batch_stats, float(eps), normalization,
        )
    stats = None
    if frame and use_batch_stats:
        fell_back = (torch.tensor(counts) < 2).to(device)[:, None]  # [T, 1]
        stats = BatchStatistics(
            torch.tensor(counts, dtype=torch.long),
            *[m.to(x.dtype).masked_fill(fell_back, float("nan")) for m in moments],
        )
    elif normalization == "sequence" and use_batch_stats and sum(counts) >= 2:
        stats = BatchStatistics(torch.tensor([sum(counts)]), moments[0].to(x.dtype), moments[1].to(x.dtype))
    return out, h_n, c_n, stats
