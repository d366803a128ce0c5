"""The BN-LSTM layer op on persistent Triton kernels: the whole sequence in one launch forward, one backward.

A column block is BH hidden units of all four gates (one gate-strided [BB, 4*BH] tile, as the per-step
kernels of ``triton_kernels.py``, whose ``@triton.jit`` helpers this file reuses) for **every** batch row,
so both batch norms and BN(c) stay inside the program that owns it. The kernels loop over T inside; one
kernel pair, three forms (``FORMS``):

- **registers** (``CARRY``): one program owns all 4H gate columns as one block (BH >= H). W_hh is loaded
  once before the time loop; h_t (forward) and da_hh_t (backward), c and dc, and the gamma / beta / bias
  gradient sums stay in registers as loop-carried tensors: no global round trip, no barrier. It fits one
  SM only for small H * B (``persistent_fits``, from the sm90 compile report in ``README.md``).
- **single**: one program walks every 16-unit column block at each step; h_{t-1} (forward) and
  da_hh_{t+1} (backward) are read back from global memory (L1/L2) after a CTA barrier, W_hh is streamed
  from L2 each step, the per-block states and sums live in their buffers.
- **grid**: the same kernel with ``NUM_PROGRAMS`` programs (at most one per SM, a cooperative launch), each
  walking blocks i_p, i_p + NUM_PROGRAMS, ...; h / da_hh are exchanged through L2 (``.cg`` loads) with one
  grid barrier per step (``_grid_barrier``: release / acquire atomics on a monotonic counter). With one
  program the barrier is only the CTA barrier: "single" is "grid" with one program, which is how the
  interpreter (it runs programs one after another) proves this path's arithmetic.

The input branch is hoisted into one GEMM before the loop (sequence-wise also normalized there); dW_ih,
dW_hh, dx and dh0 are GEMMs after the backward loop, as in ``fused_triton.py``. Conventions and the BN
backward derivation are in ``README.md`` beside this file.

Buffers (C-contiguous, layouts as ``triton_kernels.py``):

    x_gates [T, B, 4H]  frame: W_ih x (raw); otherwise the finished input branch
    w_hh    [4H, H]     h [T+1, B, H] (input dtype), c [T+1, B, H] (accumulation dtype); without SAVE
                        [2, B, H] each (step t reads slot t % 2, writes the other; the final state at T % 2)
    a_hh    [T, B, 4H]  W_hh h_{t-1} (accumulation dtype), saved for backward
    stats   [T, 18H]    the moments each step normalized with; pop [T, 18H] the population's (frame)
    steps   [T, 2]      int32: rows running at t, and whether t normalizes with batch statistics (frame)
    dstate  [2, B, H]   the h and c state gradients: dh_n, dc_n on entry, after step 0 on exit
    da      [., T, B, 4H]  da_hh, then (frame) da_ih
    dparams [14H]       d(affine) [10H] | dbias [4H] (zeros on entry), each block's program its columns
    sem     [1] int32   the grid barrier's counter, zero at launch
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_bnlstm.ops import triton_kernels as step_kernels
from fused_bnlstm.ops.common import (
    LayerConfig,
    LayerInput,
    LayerOutput,
    LayerParams,
    finish_statistics,
    needs_reference_backward,
    reference_backward,
)
from fused_bnlstm.ops.fused_triton import _legacy_batched, _moment_views, _pack_population, _precision, available
from fused_bnlstm.ops.triton_kernels import (
    _activate,
    _batch_norm,
    _bn_backward,
    _gate_columns,
    _join_gates,
    _load_vector,
    _split_gates,
    _tanh,
    _xhat,
)

__all__ = ["FORMS", "available", "bnlstm_layer_triton_persistent", "persistent_fits", "persistent_preferred"]

# "registers": one program, one tile, h carried in registers; "single": one program walking column blocks,
# h through memory; "grid": column blocks over up to one program per SM, one grid barrier per step
FORMS = ("registers", "single", "grid")

# hidden units per column block of the "single" and "grid" forms, and the reduction chunk of their dots
_BLOCK_H = 16
_BLOCK_K = 32
# rows / features per program of the sequence-wise input-branch kernels
_BLOCK_ROWS = 64
_BLOCK_FEATURES = 32
# the most rows a program holds: the sm90 compile of a [256, 64] block tile needs 120 KiB of shared memory
# forward (227 KiB exist) and spills 3.6 KiB a thread backward; 512 rows would not launch
_MAX_ROWS = 256
# the largest [BB, 4*BH] tile (elements) the "registers" form holds without spilling, from the sm90 report
_REGISTERS_TILE = {torch.float32: 4096, torch.bfloat16: 4096, torch.float16: 4096, torch.float64: 2048}
# warps of the "registers" form's one tile
_REGISTERS_WARPS = 8


@triton.jit
def _grid_barrier(p_sem, i_step, NUM_PROGRAMS: tl.constexpr):
    """Every program of the grid has finished step ``i_step`` (and its stores are visible) on return.

    A monotonic counter, never reset inside a launch (no reset race): each program adds 1 with release
    semantics, then spins with acquire loads until all ``NUM_PROGRAMS`` have arrived for this step. With
    one program it is only the CTA barrier that orders a step's stores before the next step's loads.
    The grid must be co-resident: launched with ``launch_cooperative_grid=True``.
    """
    tl.debug_barrier()
    if NUM_PROGRAMS > 1:
        tl.atomic_add(p_sem, 1, sem="release", scope="gpu")
        target = (i_step + 1) * NUM_PROGRAMS
        arrived = tl.atomic_add(p_sem, 0, sem="acquire", scope="gpu")
        while arrived < target:
            arrived = tl.atomic_add(p_sem, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _exchanged_dot(p_a, p_w, o_b, m_b, o_n, m_n, K: tl.constexpr, stride_k, stride_n, PRECISION: tl.constexpr,
                   BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    """[BB, BN] = A W over K chunks, A [B, K] written by other programs this launch (read through L2 with
    ``.cg``, never a stale L1 line) and W's element (k, n) at ``p_w + k * stride_k + n * stride_n``."""
    b_acc = tl.zeros([BB, BN], dtype=ACC)
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < K
        b_a = tl.load(p_a + o_b[:, None] * K + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0,
                      cache_modifier=".cg")
        b_w = tl.load(p_w + o_k[:, None] * stride_k + o_n[None, :] * stride_n,
                      mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_acc += tl.dot(b_a, b_w, input_precision=PRECISION, out_dtype=ACC)
    return b_acc


@triton.jit
def _normalize(b_v, m_run, n, use_batch, eps, p_pop, p_stats, o_col, m_col, V, BATCH: tl.constexpr):
    """xhat [BB, W] as ``_batch_norm`` (moments stored to ``p_stats``); without ``BATCH`` (no step of the
    call uses batch statistics: eval) with the population's moments only, no reduction over the rows."""
    if BATCH:
        b_xhat = _batch_norm(b_v, m_run, n, use_batch, eps, p_pop, p_stats, o_col, m_col, V)
    else:
        b_mean = tl.load(p_pop + o_col, mask=m_col, other=0.0).to(b_v.dtype)
        b_var = tl.load(p_pop + V + o_col, mask=m_col, other=1.0).to(b_v.dtype)
        tl.store(p_stats + o_col, b_mean, mask=m_col)
        tl.store(p_stats + V + o_col, b_var, mask=m_col)
        b_xhat = (b_v - b_mean[None, :]) / tl.sqrt(b_var + eps)[None, :]
    return b_xhat


@triton.jit
def _forward_block(b_a_hh, b_h_prev, b_c_prev, t, i_h, o_b, m_b, m_run, p_x_gates, p_bias, p_affine, p_pop, p_steps,
                   p_out, p_a_hh, p_stats, eps, B, H: tl.constexpr, FRAME: tl.constexpr, BATCH: tl.constexpr,
                   HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """Step t of hidden units [i_h * BH, (i_h + 1) * BH) given their a_hh = W_hh h_{t-1} tile [BB, 4*BH]:
    both batch norms, the gates, c_t, BN(c_t), h_t; stores the output row (and a_hh, the moments used).
    Returns the states after the step [BB, BH] (finished rows keep theirs)."""
    ACC = b_a_hh.dtype
    o_g, m_g, o_gate, o_h, m_h = _gate_columns(i_h, H, BH)
    m_s = m_b[:, None] & m_h[None, :]
    # [BB, 4*BH] offsets of the tile in a [T, B, 4H] buffer
    o_tile = t * B * 4 * H + o_b[:, None] * 4 * H + o_g[None, :]
    m_tile = m_b[:, None] & m_g[None, :]
    if SAVE:
        tl.store(p_a_hh + o_tile, b_a_hh, mask=m_tile)
    b_x = tl.load(p_x_gates + o_tile, mask=m_tile, other=0.0).to(ACC)
    if FRAME:
        n = tl.load(p_steps + 2 * t)
        use_batch = tl.load(p_steps + 2 * t + 1)
        p_pop_t = p_pop + t * 18 * H
        p_stats_t = p_stats + t * 18 * H
        b_z = _load_vector(p_affine + 4 * H, o_g, m_g, ACC) * _normalize(
            b_a_hh, m_run, n, use_batch, eps, p_pop_t + 4 * H, p_stats_t + 4 * H, o_g, m_g, 9 * H, BATCH)
        b_z += _load_vector(p_affine, o_g, m_g, ACC) * _normalize(
            b_x, m_run, n, use_batch, eps, p_pop_t, p_stats_t, o_g, m_g, 9 * H, BATCH)
    else:
        b_z = b_a_hh + b_x
    if HAS_BIAS:
        b_z += _load_vector(p_bias, o_g, m_g, ACC)
    # [BB, BH] the cell update on the block's hidden units
    b_i, b_f, b_g, b_o = _split_gates(_activate(b_z, o_gate), BB, BH)
    b_c = b_f * b_c_prev + b_i * b_g
    if FRAME:
        b_y = _load_vector(p_affine + 8 * H, o_h, m_h, ACC) * _normalize(
            b_c, m_run, n, use_batch, eps, p_pop_t + 8 * H, p_stats_t + 8 * H, o_h, m_h, 9 * H, BATCH)
        b_y += _load_vector(p_affine + 9 * H, o_h, m_h, ACC)
    else:
        b_y = b_c
    b_h = b_o * _tanh(b_y)
    tl.store(p_out + t * B * H + o_b[:, None] * H + o_h[None, :], tl.where(m_run, b_h, 0.0).to(p_out.dtype.element_ty),
             mask=m_s)
    return tl.where(m_run, b_h.to(b_h_prev.dtype), b_h_prev), tl.where(m_run, b_c, b_c_prev)


@triton.heuristics({
    "FRAME": lambda args: args["p_affine"] is not None,
    "HAS_BIAS": lambda args: args["p_bias"] is not None,
    "SAVE": lambda args: args["p_a_hh"] is not None,
})
@triton.jit(do_not_specialize=["T", "B"])
def bnlstm_persistent_fwd_kernel(
    p_x_gates, p_w_hh, p_bias, p_affine, p_pop, p_steps, p_lengths, p_h, p_c, p_out, p_a_hh, p_stats, p_sem,
    T, eps, B, H: tl.constexpr,
    FRAME: tl.constexpr, BATCH: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, CARRY: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, PRECISION: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
):
    """All T steps of every row: program i_p owns the column blocks i_p, i_p + NUM_PROGRAMS, ... of BH units.

    ``CARRY`` (one program, one block, BH >= H): W_hh^T [BH, 4*BH] is loaded once and h, c are loop-carried
    register tensors. Otherwise a step's blocks read h_{t-1} [B, H] from ``p_h`` (every column, written by
    every program the step before), write their slice of h_t, c_t, and a grid barrier ends the step.
    """
    i_p = tl.program_id(0).to(tl.int64)
    o_b = tl.arange(0, BB)
    m_b = o_b < B
    # [BB] each row's length, once
    b_len = tl.load(p_lengths + o_b, mask=m_b, other=0)
    # (while loops: the interpreter cannot range() over a runtime bound)
    t = tl.full([], 0, dtype=tl.int64)
    if CARRY:
        o_g, m_g, _, o_h, m_h = _gate_columns(0, H, BH)
        o_s = o_b[:, None] * H + o_h[None, :]
        m_s = m_b[:, None] & m_h[None, :]
        # [BH, 4*BH] all of W_hh^T, resident for the whole loop
        b_w = tl.load(p_w_hh + o_g[None, :] * H + o_h[:, None], mask=m_h[:, None] & m_g[None, :], other=0.0)
        # [BB, BH] the states before step 0: h in the input dtype (as the dot reads it), c in ACC
        b_h = tl.load(p_h + o_s, mask=m_s, other=0.0)
        b_c = tl.load(p_c + o_s, mask=m_s, other=0.0)
        while t < T:
            m_run = (m_b & (b_len > t))[:, None]
            b_a_hh = tl.dot(b_h, b_w, input_precision=PRECISION, out_dtype=p_c.dtype.element_ty)
            b_h, b_c = _forward_block(b_a_hh, b_h, b_c, t, 0, o_b, m_b, m_run, p_x_gates, p_bias, p_affine, p_pop,
                                      p_steps, p_out, p_a_hh, p_stats, eps, B, H, FRAME, BATCH, HAS_BIAS, SAVE, BB, BH)
            if SAVE:
                tl.store(p_h + (t + 1) * B * H + o_s, b_h, mask=m_s)
                tl.store(p_c + (t + 1) * B * H + o_s, b_c, mask=m_s)
            t += 1
        if not SAVE:
            tl.store(p_h + (T % 2) * B * H + o_s, b_h, mask=m_s)
            tl.store(p_c + (T % 2) * B * H + o_s, b_c, mask=m_s)
    else:
        while t < T:
            m_run = (m_b & (b_len > t))[:, None]
            # the state before step t and after it: rows t and t + 1 of the history, or the two slots
            o_prev = t * B * H if SAVE else (t % 2) * B * H
            o_next = (t + 1) * B * H if SAVE else ((t + 1) % 2) * B * H
            i_h = i_p
            while i_h < (H + BH - 1) // BH:
                o_g, m_g, _, o_h, m_h = _gate_columns(i_h, H, BH)
                o_s = o_b[:, None] * H + o_h[None, :]
                m_s = m_b[:, None] & m_h[None, :]
                b_a_hh = _exchanged_dot(p_h + o_prev, p_w_hh, o_b, m_b, o_g, m_g, H, 1, H, PRECISION, BB, 4 * BH, BK,
                                        p_c.dtype.element_ty)
                b_h, b_c = _forward_block(
                    b_a_hh, tl.load(p_h + o_prev + o_s, mask=m_s, other=0.0),
                    tl.load(p_c + o_prev + o_s, mask=m_s, other=0.0), t, i_h, o_b, m_b, m_run, p_x_gates, p_bias,
                    p_affine, p_pop, p_steps, p_out, p_a_hh, p_stats, eps, B, H, FRAME, BATCH, HAS_BIAS, SAVE, BB, BH)
                tl.store(p_h + o_next + o_s, b_h, mask=m_s)
                tl.store(p_c + o_next + o_s, b_c, mask=m_s)
                i_h += NUM_PROGRAMS
            _grid_barrier(p_sem, t, NUM_PROGRAMS)
            t += 1


@triton.jit
def _backward_block(b_dh_state, b_dc_state, b_c, b_c_prev, t, T, i_h, o_b, m_b, m_run, p_x_gates, p_bias, p_affine,
                    p_stats, p_steps, p_a_hh, p_dout, p_da, eps, B, H: tl.constexpr, FRAME: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """Step t in reverse for hidden units [i_h * BH, (i_h + 1) * BH), given the h- and c-state gradients
    after the step [BB, BH] (the h one complete) and c_t, c_{t-1}: the cell and BN backward of the block's
    tile, recomputed from what forward saved. Stores da_hh (and frame-wise da_ih) of the tile.

    Returns da_hh [BB, 4*BH] (in ``p_da``'s dtype), the c-state gradient before the step [BB, BH], and
    the step's parameter-gradient sums over the rows: dgamma_ih, dgamma_hh, dbias [4*BH], dgamma_c,
    dbeta_c [BH].
    """
    ACC = b_c.dtype
    o_g, m_g, o_gate, o_h, m_h = _gate_columns(i_h, H, BH)
    m_s = m_b[:, None] & m_h[None, :]
    b_dh = tl.load(p_dout + t * B * H + o_b[:, None] * H + o_h[None, :], mask=m_s, other=0.0).to(ACC)
    b_dh = tl.where(m_run, b_dh_state + b_dh, 0.0)

    # recompute the step's [BB, 4*BH] gate tile from what forward saved
    o_tile = t * B * 4 * H + o_b[:, None] * 4 * H + o_g[None, :]
    m_tile = m_b[:, None] & m_g[None, :]
    b_a_hh = tl.load(p_a_hh + o_tile, mask=m_tile, other=0.0)
    b_x = tl.load(p_x_gates + o_tile, mask=m_tile, other=0.0).to(ACC)
    if FRAME:
        n = tl.load(p_steps + 2 * t)
        use_batch = tl.load(p_steps + 2 * t + 1)
        p_stats_t = p_stats + t * 18 * H
        b_xhat_hh, b_rstd_hh = _xhat(b_a_hh, p_stats_t + 4 * H, o_g, m_g, 9 * H, eps)
        b_xhat_ih, b_rstd_ih = _xhat(b_x, p_stats_t, o_g, m_g, 9 * H, eps)
        b_gamma_hh = _load_vector(p_affine + 4 * H, o_g, m_g, ACC)
        b_gamma_ih = _load_vector(p_affine, o_g, m_g, ACC)
        b_z = b_gamma_hh * b_xhat_hh + b_gamma_ih * b_xhat_ih
    else:
        b_z = b_a_hh + b_x
    if HAS_BIAS:
        b_z += _load_vector(p_bias, o_g, m_g, ACC)
    b_act = _activate(b_z, o_gate)
    b_i, b_f, b_g, b_o = _split_gates(b_act, BB, BH)
    if FRAME:
        b_xhat_c, b_rstd_c = _xhat(b_c, p_stats_t + 8 * H, o_h, m_h, 9 * H, eps)
        b_gamma_c = _load_vector(p_affine + 8 * H, o_h, m_h, ACC)
        b_y = b_gamma_c * b_xhat_c + _load_vector(p_affine + 9 * H, o_h, m_h, ACC)
    else:
        b_y = b_c
    b_tanh_y = _tanh(b_y)

    # [BB, BH] h = o * tanh(y): the gradient of y, then of the cell (zero on finished rows)
    b_dy = b_dh * b_o * (1.0 - b_tanh_y * b_tanh_y)
    if FRAME:
        b_dc_new = _bn_backward(b_dy * b_gamma_c, b_xhat_c, b_rstd_c, m_run, n, use_batch)
        b_sum_dy_c = tl.sum(b_dy * b_xhat_c, axis=0)
    else:
        b_dc_new = b_dy
        b_sum_dy_c = tl.zeros([BH], dtype=ACC)
    b_dc = tl.where(m_run, b_dc_new + b_dc_state, 0.0)

    # [BB, 4*BH] gradient of each gate's activation, then of its pre-activation
    b_dact = _join_gates(b_dc * b_g, b_dc * b_c_prev, b_dc * b_i, b_dh * b_tanh_y, BB, BH)
    b_dz = b_dact * tl.where((o_gate == 2)[None, :], 1.0 - b_act * b_act, b_act * (1.0 - b_act))
    if FRAME:
        b_sum_dz_ih = tl.sum(b_dz * b_xhat_ih, axis=0)
        b_sum_dz_hh = tl.sum(b_dz * b_xhat_hh, axis=0)
        b_da_hh = _bn_backward(b_dz * b_gamma_hh, b_xhat_hh, b_rstd_hh, m_run, n, use_batch)
        b_da_ih = _bn_backward(b_dz * b_gamma_ih, b_xhat_ih, b_rstd_ih, m_run, n, use_batch)
        tl.store(p_da + T * B * 4 * H + o_tile, b_da_ih.to(p_da.dtype.element_ty), mask=m_tile)
    else:
        b_sum_dz_ih = tl.zeros([4 * BH], dtype=ACC)
        b_sum_dz_hh = tl.zeros([4 * BH], dtype=ACC)
        b_da_hh = b_dz
    b_da_hh = b_da_hh.to(p_da.dtype.element_ty)
    tl.store(p_da + o_tile, b_da_hh, mask=m_tile)
    return (b_da_hh, tl.where(m_run, b_dc * b_f, b_dc_state), b_sum_dz_ih, b_sum_dz_hh, tl.sum(b_dz, axis=0),
            b_sum_dy_c, tl.sum(b_dy, axis=0))


@triton.jit
def _store_sums(p_dparams, i_h, b_dgamma_ih, b_dgamma_hh, b_dbias, b_dgamma_c, b_dbeta_c, ACCUMULATE: tl.constexpr,
                H: tl.constexpr, FRAME: tl.constexpr, HAS_BIAS: tl.constexpr, BH: tl.constexpr):
    """Write (or with ``ACCUMULATE`` add) a block's parameter-gradient sums to ``p_dparams`` [14H]: only the
    program owning the block touches its columns (deterministic, no atomics)."""
    o_g, m_g, _, o_h, m_h = _gate_columns(i_h, H, BH)
    if FRAME:
        if ACCUMULATE:
            b_dgamma_ih += tl.load(p_dparams + o_g, mask=m_g, other=0.0)
            b_dgamma_hh += tl.load(p_dparams + 4 * H + o_g, mask=m_g, other=0.0)
            b_dgamma_c += tl.load(p_dparams + 8 * H + o_h, mask=m_h, other=0.0)
            b_dbeta_c += tl.load(p_dparams + 9 * H + o_h, mask=m_h, other=0.0)
        tl.store(p_dparams + o_g, b_dgamma_ih, mask=m_g)
        tl.store(p_dparams + 4 * H + o_g, b_dgamma_hh, mask=m_g)
        tl.store(p_dparams + 8 * H + o_h, b_dgamma_c, mask=m_h)
        tl.store(p_dparams + 9 * H + o_h, b_dbeta_c, mask=m_h)
    if HAS_BIAS:
        if ACCUMULATE:
            b_dbias += tl.load(p_dparams + 10 * H + o_g, mask=m_g, other=0.0)
        tl.store(p_dparams + 10 * H + o_g, b_dbias, mask=m_g)


@triton.jit
def _store_partial(p_part, b_da_hh, p_w_hh, i_h, o_b, m_b, H: tl.constexpr, PRECISION: tl.constexpr,
                   BB: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr):
    """A block's share of the next h-state gradient: da_hh [BB, 4*BH] (its gate columns) times the rows of
    W_hh [4*BH, H] of those columns, stored to ``p_part`` [B, H] in chunks of BN hidden units."""
    o_g, m_g, _, _, _ = _gate_columns(i_h, H, BH)
    for i_n in range(0, H, BN):
        o_n = i_n + tl.arange(0, BN)
        m_n = o_n < H
        # [4*BH, BN] W_hh[o_g, o_n]
        b_w = tl.load(p_w_hh + o_g[:, None] * H + o_n[None, :], mask=m_g[:, None] & m_n[None, :], other=0.0)
        b_part = tl.dot(b_da_hh, b_w, input_precision=PRECISION, out_dtype=ACC)
        tl.store(p_part + o_b[:, None] * H + o_n[None, :], b_part, mask=m_b[:, None] & m_n[None, :])


@triton.heuristics({
    "FRAME": lambda args: args["p_affine"] is not None,
    "HAS_BIAS": lambda args: args["p_bias"] is not None,
})
@triton.jit(do_not_specialize=["T", "B"])
def bnlstm_persistent_bwd_kernel(
    p_x_gates, p_w_hh, p_bias, p_affine, p_stats, p_steps, p_lengths, p_c, p_a_hh, p_dout, p_dstate, p_da,
    p_dparams, p_dpart, p_sem, T, eps, B, H: tl.constexpr,
    FRAME: tl.constexpr, HAS_BIAS: tl.constexpr, CARRY: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    PRECISION: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
):
    """All T steps in reverse; program i_p owns the column blocks i_p, i_p + NUM_PROGRAMS, ... of BH units.

    The h-state gradient of rows still running at t + 1 is da_hh_{t+1} W_hh. ``CARRY`` (one program, one
    block): da_hh_{t+1} [BB, 4*BH] is the previous iteration's register tile, W_hh [4*BH, BH] is loaded
    once, and dh, dc and the parameter-gradient sums stay in registers, written once at the end. Otherwise
    each block writes its partial da_hh_t[:, block columns] W_hh[block columns, :] [B, H] to ``p_dpart``
    ([2, NB, B, H], slot t % 2), and after the grid barrier a block sums the NB partials of its own columns
    in block order (deterministic): B * H values read a block instead of all of da_hh [B, 4H]. The state
    gradients live in ``p_dstate`` and the sums in ``p_dparams`` (zeros on entry), each block updating its
    own columns.
    """
    NB: tl.constexpr = (H + BH - 1) // BH
    i_p = tl.program_id(0).to(tl.int64)
    o_b = tl.arange(0, BB)
    m_b = o_b < B
    b_len = tl.load(p_lengths + o_b, mask=m_b, other=0)
    # int64: offsets such as T * B * 4H (da_ih after da_hh) can pass 2^31
    T = T.to(tl.int64)
    t = T - 1
    if CARRY:
        o_g, m_g, _, o_h, m_h = _gate_columns(0, H, BH)
        o_s = o_b[:, None] * H + o_h[None, :]
        m_s = m_b[:, None] & m_h[None, :]
        # [4*BH, BH] all of W_hh, resident for the whole loop
        b_w = tl.load(p_w_hh + o_g[:, None] * H + o_h[None, :], mask=m_g[:, None] & m_h[None, :], other=0.0)
        # [BB, BH] the h and c state gradients after step T - 1, carried backwards, and c_T
        b_dh_state = tl.load(p_dstate + o_s, mask=m_s, other=0.0)
        b_dc_state = tl.load(p_dstate + B * H + o_s, mask=m_s, other=0.0)
        b_c = tl.load(p_c + T * B * H + o_s, mask=m_s, other=0.0)
        # [BB, 4*BH] da_hh of the step after the one processed (none after T - 1: no row runs there)
        b_da_next = tl.zeros([BB, 4 * BH], dtype=p_da.dtype.element_ty)
        b_dgamma_ih = tl.zeros([4 * BH], dtype=b_c.dtype)
        b_dgamma_hh = tl.zeros([4 * BH], dtype=b_c.dtype)
        b_dbias = tl.zeros([4 * BH], dtype=b_c.dtype)
        b_dgamma_c = tl.zeros([BH], dtype=b_c.dtype)
        b_dbeta_c = tl.zeros([BH], dtype=b_c.dtype)
        while t >= 0:
            m_run = (m_b & (b_len > t))[:, None]
            m_next = (m_b & (b_len > t + 1))[:, None]
            b_dh_state = tl.where(m_next, tl.dot(b_da_next, b_w, input_precision=PRECISION, out_dtype=b_c.dtype),
                                  b_dh_state)
            b_c_prev = tl.load(p_c + t * B * H + o_s, mask=m_s, other=0.0)
            b_da_next, b_dc_state, b_ih, b_hh, b_b, b_gc, b_bc = _backward_block(
                b_dh_state, b_dc_state, b_c, b_c_prev, t, T, 0, o_b, m_b, m_run, p_x_gates, p_bias, p_affine, p_stats,
                p_steps, p_a_hh, p_dout, p_da, eps, B, H, FRAME, HAS_BIAS, BB, BH)
            b_dgamma_ih += b_ih
            b_dgamma_hh += b_hh
            b_dbias += b_b
            b_dgamma_c += b_gc
            b_dbeta_c += b_bc
            b_c = b_c_prev
            t -= 1
        tl.store(p_dstate + o_s, b_dh_state, mask=m_s)
        tl.store(p_dstate + B * H + o_s, b_dc_state, mask=m_s)
        _store_sums(p_dparams, 0, b_dgamma_ih, b_dgamma_hh, b_dbias, b_dgamma_c, b_dbeta_c, False, H, FRAME, HAS_BIAS,
                    BH)
    else:
        while t >= 0:
            m_run = (m_b & (b_len > t))[:, None]
            m_next = (m_b & (b_len > t + 1))[:, None]
            i_h = i_p
            while i_h < NB:
                o_h = i_h * BH + tl.arange(0, BH)
                m_h = o_h < H
                o_s = o_b[:, None] * H + o_h[None, :]
                m_s = m_b[:, None] & m_h[None, :]
                b_dh_state = tl.load(p_dstate + o_s, mask=m_s, other=0.0)
                if t + 1 < T:
                    # [BB, BH] da_hh_{t+1} W_hh[:, block]: the blocks' partials of step t + 1, in block order
                    p_part = p_dpart + ((t + 1) % 2) * NB * B * H
                    b_dh = tl.zeros([BB, BH], dtype=b_dh_state.dtype)
                    for j in range(NB):
                        b_dh += tl.load(p_part + j * B * H + o_s, mask=m_s, other=0.0, cache_modifier=".cg")
                    b_dh_state = tl.where(m_next, b_dh, b_dh_state)
                b_da_hh, b_dc_state, b_ih, b_hh, b_b, b_gc, b_bc = _backward_block(
                    b_dh_state, tl.load(p_dstate + B * H + o_s, mask=m_s, other=0.0),
                    tl.load(p_c + (t + 1) * B * H + o_s, mask=m_s, other=0.0),
                    tl.load(p_c + t * B * H + o_s, mask=m_s, other=0.0), t, T, i_h, o_b, m_b, m_run, p_x_gates, p_bias,
                    p_affine, p_stats, p_steps, p_a_hh, p_dout, p_da, eps, B, H, FRAME, HAS_BIAS, BB, BH)
                tl.store(p_dstate + o_s, b_dh_state, mask=m_s)
                tl.store(p_dstate + B * H + o_s, b_dc_state, mask=m_s)
                _store_sums(p_dparams, i_h, b_ih, b_hh, b_b, b_gc, b_bc, True, H, FRAME, HAS_BIAS, BH)
                if t > 0:
                    _store_partial(p_dpart + (t % 2) * NB * B * H + i_h * B * H, b_da_hh, p_w_hh, i_h, o_b, m_b, H,
                                   PRECISION, BB, BH, BK, b_dh_state.dtype)
                i_h += NUM_PROGRAMS
            _grid_barrier(p_sem, T - 1 - t, NUM_PROGRAMS)
            t -= 1


class _Run(NamedTuple):
    """What the launchers need besides tensors, all known on the host (no device reads)."""

    counts: tuple[int, ...]  # [T] rows still running at each step
    lengths: Tensor | None  # [B] int64 on the host (None: every row runs T steps)
    batch_stats: tuple[bool, ...]  # frame [T] / sequence [1]: whether batch statistics normalize
    eps: float
    normalization: str | None
    precision: str | None  # tl.dot input_precision of the recurrent dots
    form: str  # one of FORMS
    programs: int  # programs of the launch (1 but for "grid" on CUDA)
    block_h: int  # hidden units per column block
    num_warps: int


class _Saved(NamedTuple):
    """What the forward launch leaves for backward (besides x and the parameters)."""

    x_gates: Tensor  # [T, B, 4H]
    affine: Tensor | None  # [10H] gamma_ih | gamma_hh | gamma_c | beta_c, frame only
    steps: Tensor | None  # [T, 2] int32, frame only
    lengths: Tensor  # [B] int64 on the device
    a_ih: Tensor | None  # [T, B, 4H] the raw input branch, sequence only
    seq_stats: Tensor | None  # [2, 4H] the sequence moments used
    h: Tensor  # [T+1, B, H]
    c: Tensor  # [T+1, B, H]
    a_hh: Tensor  # [T, B, 4H]
    stats: Tensor | None  # [T, 18H], frame only


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _host_to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on the kernels' device without a host sync (an asynchronous copy from pinned memory)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _launch(run: _Run) -> dict:
    """The launch arguments both persistent kernels share."""
    return dict(CARRY=run.form == "registers", NUM_PROGRAMS=run.programs, PRECISION=run.precision, BH=run.block_h,
                BK=_BLOCK_K, num_warps=run.num_warps, **({"launch_cooperative_grid": True} if run.programs > 1 else {}))


def _sequence_bn_forward(*, a_ih: Tensor, u: Tensor, gamma_ih: Tensor, population: Tensor, lengths: Tensor,
                         run: _Run) -> Tensor:
    """u = gamma_ih * BN(a_ih) over every valid frame, into u [T, B, 4H]; returns the moments used [2, 4H]."""
    T, B, G = a_ih.shape
    seq_stats = torch.empty(2, G, dtype=_acc_dtype(a_ih.dtype), device=a_ih.device)
    step_kernels.sequence_bn_fwd_kernel[(triton.cdiv(G, _BLOCK_FEATURES),)](
        p_a=a_ih, p_u=u, p_gamma=gamma_ih, p_pop=population, p_lengths=lengths, p_stats=seq_stats,
        n=sum(run.counts), use_batch=int(run.batch_stats[0]), eps=run.eps, T=T, B=B, F=G,
        BR=_BLOCK_ROWS, BF=_BLOCK_FEATURES,
    )
    return seq_stats


def _sequence_bn_backward(*, a_ih: Tensor, du: Tensor, gamma_ih: Tensor, seq_stats: Tensor, lengths: Tensor,
                          run: _Run) -> tuple[Tensor, Tensor]:
    """da_ih [T, B, 4H] and dgamma_ih [4H] (accumulation dtype) from du [T, B, 4H]."""
    T, B, G = a_ih.shape
    da = torch.empty_like(du)
    dgamma = torch.empty(G, dtype=seq_stats.dtype, device=a_ih.device)
    step_kernels.sequence_bn_bwd_kernel[(triton.cdiv(G, _BLOCK_FEATURES),)](
        p_a=a_ih, p_du=du, p_da=da, p_gamma=gamma_ih, p_stats=seq_stats, p_lengths=lengths, p_dgamma=dgamma,
        n=sum(run.counts), use_batch=int(run.batch_stats[0]), eps=run.eps, T=T, B=B, F=G,
        BR=_BLOCK_ROWS, BF=_BLOCK_FEATURES,
    )
    return da, dgamma


def _layer_forward(*, x: Tensor, h0: Tensor, c0: Tensor, params: LayerParams, population: Tensor | None,
                   run: _Run, save: bool):
    """The hoisted input GEMM (sequence-wise normalized over every valid frame), then the one persistent
    launch. Returns out, h_n, c_n, the moments buffer (frame [T, 18H], sequence [2, 4H], else None) and,
    when ``save``, the ``_Saved`` backward reads."""
    T, B, _ = x.shape
    G = params.weight_hh.shape[0]
    H = G // 4
    frame = run.normalization == "frame"
    device, dtype, acc = x.device, x.dtype, _acc_dtype(x.dtype)
    if run.lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=device)
    else:
        lengths = _host_to_device(run.lengths, device)
    a_ih = torch.matmul(x, params.weight_ih.t())  # [T, B, 4H]
    seq_stats = None
    if run.normalization == "sequence":
        x_gates = torch.empty_like(a_ih)
        seq_stats = _sequence_bn_forward(a_ih=a_ih, u=x_gates, gamma_ih=params.gamma_ih, population=population,
                                         lengths=lengths, run=run)
    else:
        x_gates = a_ih
    affine = steps = None
    if frame:
        affine = torch.cat([params.gamma_ih, params.gamma_hh, params.gamma_c, params.beta_c])
        steps = _host_to_device(torch.tensor(list(zip(run.counts, run.batch_stats)), dtype=torch.int32), device)
    rows = T + 1 if save else 2
    h = torch.empty(rows, B, H, dtype=dtype, device=device)
    c = torch.empty(rows, B, H, dtype=acc, device=device)
    h[0] = h0
    c[0] = c0
    out = torch.empty(T, B, H, dtype=dtype, device=device)
    a_hh = torch.empty(T, B, G, dtype=acc, device=device) if save else None
    stats = torch.empty(T, 18 * H, dtype=acc, device=device) if frame else None
    bnlstm_persistent_fwd_kernel[(run.programs,)](
        p_x_gates=x_gates, p_w_hh=params.weight_hh, p_bias=params.bias, p_affine=affine, p_pop=population,
        p_steps=steps, p_lengths=lengths, p_h=h, p_c=c, p_out=out, p_a_hh=a_hh, p_stats=stats,
        p_sem=torch.zeros(1, dtype=torch.int32, device=device), T=T, eps=run.eps, B=B, H=H,
        BATCH=frame and any(run.batch_stats), BB=_block_rows(B), **_launch(run),
    )
    last = T if save else T % 2
    h_n, c_n = h[last].clone(), c[last].to(dtype, copy=True)
    moments = stats if frame else seq_stats
    if not save:
        return out, h_n, c_n, moments, None
    saved = _Saved(x_gates=x_gates, affine=affine, steps=steps, lengths=lengths,
                   a_ih=a_ih if seq_stats is not None else None, seq_stats=seq_stats, h=h, c=c, a_hh=a_hh,
                   stats=stats)
    return out, h_n, c_n, moments, saved


def _layer_backward(*, x: Tensor, params: LayerParams, saved: _Saved, cotangents: tuple[Tensor, Tensor, Tensor],
                    needs: tuple[bool, ...], run: _Run) -> tuple[Tensor | None, ...]:
    """The one reverse-time launch, then the weight, input and h0 gradients as GEMMs over all steps.
    ``needs`` and the result run over (x, h0, c0, *LayerParams); None where not needed or unused."""
    dout, dh_n, dc_n = cotangents
    T, B, _ = x.shape
    G = params.weight_hh.shape[0]
    H = G // 4
    frame = run.normalization == "frame"
    device, dtype = x.device, x.dtype
    # [2, B, H] dh_n, dc_n in; the state gradients after step 0 out
    dstate = torch.stack([dh_n, dc_n]).to(saved.c.dtype)
    da = torch.empty(2 if frame else 1, T, B, G, dtype=dtype, device=device)
    has_sums = frame or params.bias is not None
    # (the block-walking forms add each step's sums to it)
    dparams = torch.zeros(14 * H, dtype=saved.c.dtype, device=device) if has_sums else None
    # [2, NB, B, H] the blocks' partial h-state gradients, by step parity (block-walking forms)
    blocks = triton.cdiv(H, run.block_h)
    dpart = None if run.form == "registers" else torch.empty(2, blocks, B, H, dtype=saved.c.dtype, device=device)
    bnlstm_persistent_bwd_kernel[(run.programs,)](
        p_x_gates=saved.x_gates, p_w_hh=params.weight_hh, p_bias=params.bias, p_affine=saved.affine,
        p_stats=saved.stats, p_steps=saved.steps, p_lengths=saved.lengths, p_c=saved.c, p_a_hh=saved.a_hh,
        p_dout=dout.contiguous(), p_dstate=dstate, p_da=da, p_dparams=dparams, p_dpart=dpart,
        p_sem=torch.zeros(1, dtype=torch.int32, device=device), T=T, eps=run.eps, B=B, H=H,
        BB=_block_rows(B), **_launch(run),
    )
    da_hh, da_ih = da[0], da[-1]
    affine_grads = [None] * 4
    if frame:
        affine_grads = [dparams[:4 * H], dparams[4 * H:8 * H], dparams[8 * H:9 * H], dparams[9 * H:10 * H]]
    elif run.normalization == "sequence":
        da_ih, affine_grads[0] = _sequence_bn_backward(a_ih=saved.a_ih, du=da_ih, gamma_ih=params.gamma_ih,
                                                       seq_stats=saved.seq_stats, lengths=saved.lengths, run=run)
    dbias = dparams[10 * H:] if params.bias is not None else None
    dx = torch.matmul(da_ih, params.weight_ih) if needs[0] else None
    # every row runs step 0 (lengths >= 1): the h state before it gets da_hh_0 W_hh
    dh0 = torch.matmul(da_hh[0], params.weight_hh) if needs[1] else None
    dc0 = dstate[1] if needs[2] else None
    # [4H, I] and [4H, H]: sums over all T*B frames of da^T x and da^T h_{t-1}
    dW_ih = torch.matmul(da_ih.reshape(T * B, G).t(), x.reshape(T * B, -1)) if needs[3] else None
    dW_hh = torch.matmul(da_hh.reshape(T * B, G).t(), saved.h[:T].reshape(T * B, H)) if needs[4] else None
    cast = [None if g is None or not need else g.to(dtype)
            for g, need in zip((dh0, dc0, dbias, *affine_grads), (needs[1], needs[2], *needs[5:]))]
    grads = (dx, cast[0], cast[1], dW_ih, dW_hh, *cast[2:])
    # LayerParams fields the kernels do not read (weight_hr, refused) get no gradient
    return grads + (None,) * (len(needs) - len(grads))


class BNLSTMPersistentFunction(torch.autograd.Function):
    """One layer-direction on the persistent kernels: outputs out, h_n, c_n and the (non-differentiable)
    moments buffer. Arguments: the ``_Run``, the call's ``LayerInput`` and ``LayerConfig`` (for the
    reference's VJP), the packed population, then x, h0, c0 and the ``LayerParams`` tensors in order."""

    @staticmethod
    def forward(ctx, run, inputs, config, population, x, h0, c0, *params):
        params = LayerParams(*params)
        out, h_n, c_n, moments, saved = _layer_forward(x=x, h0=h0, c0=c0, params=params, population=population,
                                                       run=run, save=True)
        ctx.save_for_backward(x, h0, c0, *params, *saved)
        ctx.run, ctx.inputs, ctx.config = run, inputs, config
        if moments is not None:
            ctx.mark_non_differentiable(moments)
        return out, h_n, c_n, moments

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n, _):
        x, h0, c0, *tensors = ctx.saved_tensors
        split = len(LayerParams._fields)
        params = LayerParams(*tensors[:split])
        needs = ctx.needs_input_grad[4:]
        if needs_reference_backward(dout, dh_n, dc_n) or _legacy_batched(dout, dh_n, dc_n):
            # a graph of the gradients (double backward) or torch.func-batched cotangents: the reference's VJP
            grads = reference_backward(inputs=ctx.inputs._replace(x=x, h0=h0, c0=c0), params=params,
                                       config=ctx.config, cotangents=(dout, dh_n, dc_n), needs_input_grad=needs)
        else:
            grads = _layer_backward(x=x, params=params, saved=_Saved(*tensors[split:]),
                                    cotangents=(dout, dh_n, dc_n), needs=needs, run=ctx.run)
        return (None, None, None, None, *grads)


def _block_rows(B: int) -> int:
    return max(16, triton.next_power_of_2(B))


def _single_block_h(H: int) -> int:
    return max(16, triton.next_power_of_2(H))


def persistent_fits(B: int, H: int, dtype: torch.dtype) -> bool:
    """Whether the "registers" form (one program, one [BB, 4*BH] tile) fits one SM: compiled for sm90 with
    8 warps, both kernels stay within 255 registers a thread without spilling up to a tile of 4096
    elements (B = 64 with H <= 16, B = 32 with H <= 32); s-MNIST's H = 100 (a [64, 512] tile) needs 256-384
    KiB of shared memory and spills kilobytes a thread (the compile report in ``README.md``)."""
    return _block_rows(B) * 4 * _single_block_h(H) <= _REGISTERS_TILE.get(dtype, _REGISTERS_TILE[torch.float32])


def _block_warps(B: int) -> int:
    """Warps of the block forms: their [BB, 64] tile compiles without spills at B <= 64 with 8 (16 warps
    spilled in backward there); B = 128 and 256 spill about 1 KiB and 3.6 KiB a thread with 16."""
    return 8 if _block_rows(B) <= 64 else 16


def persistent_preferred(B: int, H: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The proposed choice between these kernels and the per-step launches of ``fused_triton.py`` (a
    prediction from the sm90 compile report, not a measurement; ``README.md``, Persistent kernels).

    Persistent on CUDA where its block tile holds without heavy spills (B <= 128) and its grid is at most one
    program per SM (H <= 16 * SMs): one grid barrier (about 1 us) replaces a launch per step (a CUDA-graph
    kernel boundary of about 1 us plus the prologue that reloads every parameter row). Per-step otherwise,
    and under the interpreter (both are proven there).
    """
    if device.type != "cuda":
        return False
    if persistent_fits(B, H, dtype):
        return True
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return _block_rows(B) <= 128 and triton.cdiv(H, _BLOCK_H) <= sms


def _plan_run(inputs: LayerInput, config: LayerConfig, dtype: torch.dtype, form: str | None) -> _Run:
    """The form (``form``, or the heuristic: "registers" where it fits, else "grid" on CUDA and "single" under
    the interpreter) and its launch shape."""
    x = inputs.x
    B, H, device = x.shape[1], inputs.c0.shape[1], x.device
    if form is None:
        form = "registers" if persistent_fits(B, H, dtype) else "grid" if device.type == "cuda" else "single"
    if form not in FORMS:
        raise ValueError(f"the persistent Triton form must be one of {', '.join(FORMS)}, got {form!r}")
    if form == "registers":
        programs, block_h, num_warps = 1, _single_block_h(H), _REGISTERS_WARPS
    else:
        programs, block_h, num_warps = 1, _BLOCK_H, _block_warps(B)
        if form == "grid" and device.type == "cuda":
            # at most one program per SM (the cooperative launch checks co-residency); programs walk the
            # blocks i_p, i_p + programs, ...
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            programs = min(triton.cdiv(H, _BLOCK_H), sms)
    return _Run(counts=inputs.counts, lengths=inputs.lengths, batch_stats=inputs.batch_stats, eps=float(config.eps),
                normalization=config.normalization, precision=_precision(dtype, device), form=form,
                programs=programs, block_h=block_h, num_warps=num_warps)


def bnlstm_layer_triton_persistent(*, inputs: LayerInput, params: LayerParams, config: LayerConfig,
                                   form: str | None = None) -> LayerOutput:
    """One BN-LSTM layer-direction in one persistent launch forward and one backward (``prepare_layer`` has
    checked the inputs). Returns as ``fused_bnlstm.ops.bnlstm_layer``.

    ``form`` (``FORMS``): ``"registers"`` (one program, one tile, W_hh, h and c on chip; ``persistent_fits``
    says where it compiles without spills), ``"single"`` (one program walking 16-unit column blocks, h
    through L1/L2), ``"grid"`` (up to one program per SM walking the blocks, one grid barrier per step; one
    program under the interpreter), or None for the heuristic: "registers" where it fits, else "grid" on
    CUDA and "single" under the interpreter.
    """
    x = inputs.x
    device = x.device
    ok, reason = available(device)
    if not ok:
        raise RuntimeError(f"the persistent Triton BN-LSTM backend cannot run on {device.type} tensors: {reason}")
    if config.process_group is not None:
        raise NotImplementedError("the persistent Triton backend has no synchronized statistics (process_group); "
                                  "use the reference backend")
    if params.weight_hr is not None:
        raise NotImplementedError("the persistent Triton backend has no projection (proj_size); use the reference "
                                  "backend")
    T, B, _ = x.shape
    if T == 0 or B == 0:
        raise ValueError(f"the persistent Triton backend needs T > 0 and B > 0, got T={T}, B={B}")
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x.dtype
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"the persistent Triton backend runs float32, float64, float16 and bfloat16, got {dtype}")
    if dtype == torch.bfloat16 and device.type == "cpu":
        raise TypeError("the Triton interpreter (CPU tensors) has no bfloat16; use float32, float64 or float16")

    if _block_rows(B) > _MAX_ROWS:
        raise ValueError(f"the persistent Triton backend holds every batch row in one program: B <= {_MAX_ROWS}, "
                         f"got B={B}; use the per-step 'triton' backend (or split the batch)")
    run = _plan_run(inputs, config, dtype, form)
    tensors = [None if v is None else v.to(dtype).contiguous() for v in (x, inputs.h0, inputs.c0, *params)]
    population = _pack_population(inputs.population, config.normalization)
    needs_grad = torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in tensors)
    # Triton launches on the current device: make it the tensors'
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with torch.autocast(device.type, enabled=False), on_device:
        if needs_grad:
            out, h_n, c_n, moments = BNLSTMPersistentFunction.apply(run, inputs, config, population, *tensors)
        else:
            out, h_n, c_n, moments, _ = _layer_forward(x=tensors[0], h0=tensors[1], c0=tensors[2],
                                                       params=LayerParams(*tensors[3:]), population=population,
                                                       run=run, save=False)
    stats = finish_statistics(inputs, config, _moment_views(moments, config.normalization), x.dtype)
    return LayerOutput(output=out, h_n=h_n, c_n=c_n, stats=stats)
