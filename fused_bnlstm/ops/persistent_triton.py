"""The BN-LSTM layer op on persistent Triton kernels: the whole sequence in one launch forward, one backward.

A column block is BH hidden units of all four gates (one gate-strided [BB, 4*BH] tile, as in the per-step
kernels: ``triton_kernels.forward_block`` / ``backward_block`` run a block's step in both) for **every**
batch row, so both batch norms and BN(c) stay inside the program that owns it. The kernels loop over T inside; one
kernel pair, three forms (``FORMS``):

- **registers** (``CARRY``, which the kernels derive: BH >= H): one program owns all 4H gate columns as one
  block. W_hh is loaded
  once before the time loop; h_t (forward) and da_hh_t (backward), c and dc, and the gamma / beta / bias
  gradient sums stay in registers as loop-carried tensors: no global round trip, no barrier. It fits one
  SM only for small H * B (``persistent_fits``, from the sm90 compile report in ``README.md``).
- **single**: one program walks every 16-unit column block at each step; h_{t-1} (forward) and
  da_hh_{t+1} (backward) are read back from global memory (L1/L2) after a CTA barrier, W_hh is streamed
  from L2 each step, the per-block states and sums live in their buffers.
- **grid**: the same kernel with ``NUM_PROGRAMS`` programs (at most one per SM, a cooperative launch),
  each walking blocks i_p, i_p + NUM_PROGRAMS, ...; h / da_hh are exchanged through L2 (``.cg`` loads) with one
  grid barrier per step (``_grid_barrier``: release / acquire atomics on a monotonic counter). With one
  program the barrier is only the CTA barrier: "single" is "grid" with one program, which is how the
  interpreter (it runs programs one after another) proves this path's arithmetic. (With H <= 16 one block
  covers H, and both run as "registers".)
- Where every program owns one block (``OWN_BLOCK``: at most as many blocks as programs, as at every paper
  shape on an H100, 7 / 32 / 63 blocks on 132 SMs), the forward keeps the block's c and h in registers
  across the time loop (c written each step only where backward keeps its history); only h crosses
  programs. The interpreter proves that path with "single" at 8-unit blocks and H <= 8 (one block on one
  program, too narrow for the "registers" form's dot, the tests' setting). The backward keeps its block
  states in memory (``bnlstm_persistent_bwd_kernel`` says why).

The input branch is hoisted into one GEMM before the loop (sequence-wise also normalized there); dW_ih,
dW_hh, dx and dh0 are GEMMs after the backward loop; those host steps are ``triton_common.py``'s, shared
with ``fused_triton.py``, which dispatches here (``FUSED_BNLSTM_TRITON_VARIANT``, ``persistent_preferred``).
Conventions and the BN backward derivation are in ``README.md`` beside this file.

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

from fused_bnlstm.ops import triton_common
from fused_bnlstm.ops.common import (
    LayerConfig,
    LayerInput,
    LayerOutput,
    LayerParams,
    finish_statistics,
    needs_reference_backward,
    reference_backward,
)
from fused_bnlstm.ops.triton_common import available
from fused_bnlstm.ops.triton_kernels import (
    BACKWARD_FLAGS,
    BLOCK_K,
    FORWARD_FLAGS,
    backward_block,
    forward_block,
    gate_columns,
    hidden_units,
    load_states,
    recurrent_dot,
    state_offset,
    store_states,
    store_sums,
)

__all__ = ["FORMS", "available", "bnlstm_layer_triton_persistent", "persistent_fits", "persistent_preferred"]

# "registers": one program, one tile, h carried in registers; "single": one program walking column blocks,
# h through memory; "grid": column blocks over up to one program per SM, one grid barrier per step
FORMS = ("registers", "single", "grid")

# hidden units per column block of the "single" and "grid" forms (their dots reduce in chunks of BLOCK_K)
_BLOCK_H = 16
# the most rows a program holds: the sm90 compile of a [256, 64] block tile needs 120 KiB of shared memory
# forward (227 KiB exist) and spills 3.6 KiB a thread backward; 512 rows would not launch
_MAX_ROWS = 256
# the largest [BB, 4*BH] tile (elements) the "registers" form holds without spilling, from the sm90 report
_REGISTERS_TILE = {torch.float32: 4096, torch.bfloat16: 2048, torch.float16: 2048, torch.float64: 2048}
# and the widest block it holds: W_hh^T [BH, 4*BH] stays resident (fp32 32 x 32, a 4096 tile, spilled)
_REGISTERS_MAX_BH = 16
# warps of the "registers" form's one tile
_REGISTERS_WARPS = 8


@triton.jit
def _grid_barrier(p_sem, i_step, NUM_PROGRAMS: tl.constexpr):
    """Every program of the grid has finished step ``i_step`` (and its stores are visible) on return.

    A monotonic counter, never reset inside a launch (no reset race): each program adds 1 with release
    semantics, then spins with acquire loads until all ``NUM_PROGRAMS`` have arrived for this step. With
    one program it is only the CTA barrier that orders a step's stores before the next step's loads.
    The grid must be co-resident: launched with ``launch_cooperative_grid=True``. (A constexpr, not
    ``tl.num_programs``: the runtime count costs the sm90 backward 9 registers a thread and a spill.)
    """
    tl.debug_barrier()
    if NUM_PROGRAMS > 1:
        tl.atomic_add(p_sem, 1, sem="release", scope="gpu")
        target = (i_step + 1) * NUM_PROGRAMS
        arrived = tl.atomic_add(p_sem, 0, sem="acquire", scope="gpu")
        while arrived < target:
            arrived = tl.atomic_add(p_sem, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.heuristics(FORWARD_FLAGS)
@triton.jit(do_not_specialize=["T", "B"])
def bnlstm_persistent_fwd_kernel(
    p_x_gates, p_w_hh, p_bias, p_affine, p_pop, p_steps, p_lengths, p_h, p_c, p_out, p_a_hh, p_stats, p_sem,
    T, eps, B, H: tl.constexpr,
    FRAME: tl.constexpr, BATCH: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, PRECISION: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
):
    """All T steps of every row: program i_p owns the column blocks i_p, i_p + NUM_PROGRAMS, ... of BH units.

    ``CARRY`` (one block covers H, and is at least 16 wide for its dot: the "registers" form): W_hh^T
    [BH, 4*BH] is loaded once and h, c are loop-carried register tensors. Otherwise a step's blocks read h_{t-1} [B, H] from ``p_h`` (every
    column, written by every program the step before), write their slice of h_t, and a grid barrier ends the
    step; ``OWN_BLOCK`` (one block a program) carries the block's h and c in registers, else each block
    reads its states back and writes c_t as well.
    ``BATCH``: some step of the call normalizes with batch statistics (off: no reduction over the rows).
    """
    CARRY: tl.constexpr = BH >= H and BH >= 16
    NB: tl.constexpr = (H + BH - 1) // BH
    OWN_BLOCK: tl.constexpr = NB <= NUM_PROGRAMS
    i_p = tl.program_id(0).to(tl.int64)
    o_b = tl.arange(0, BB)
    m_b = o_b < B
    # [BB] each row's length, once
    b_len = tl.load(p_lengths + o_b, mask=m_b, other=0)
    # (while loops: the interpreter cannot range() over a runtime bound)
    t = tl.full([], 0, dtype=tl.int64)
    if CARRY:
        o_g, m_g, _ = gate_columns(0, H, BH)
        o_h, m_h = hidden_units(0, H, BH)
        o_s, m_s = o_b[:, None] * H + o_h[None, :], m_b[:, None] & m_h[None, :]
        # [BH, 4*BH] all of W_hh^T, resident for the whole loop
        b_w = tl.load(p_w_hh + o_g[None, :] * H + o_h[:, None], mask=m_h[:, None] & m_g[None, :], other=0.0)
        # [BB, BH] the states before step 0: h in the input dtype (as the dot reads it), c in ACC
        b_h, b_c = load_states(p_h, p_c, o_s, m_s)
        while t < T:
            m_run = (m_b & (b_len > t))[:, None]
            b_a_hh = tl.dot(b_h, b_w, input_precision=PRECISION, out_dtype=p_c.dtype.element_ty)
            b_h, b_c = forward_block(b_a_hh, b_h, b_c, t, 0, o_b, m_b, m_run, p_x_gates, p_bias, p_affine, p_pop,
                                     p_steps, p_out, p_a_hh, p_stats, eps, B, H, FRAME, BATCH, HAS_BIAS, SAVE, BB, BH)
            if SAVE:
                store_states(p_h + (t + 1) * B * H, p_c + (t + 1) * B * H, o_s, m_s, b_h, b_c)
            t += 1
        if not SAVE:
            store_states(p_h + (T % 2) * B * H, p_c + (T % 2) * B * H, o_s, m_s, b_h, b_c)
    elif OWN_BLOCK:
        # block i_p (the launch has one program a block): its states before step 0, then carried
        o_g, m_g, _ = gate_columns(i_p, H, BH)
        o_h, m_h = hidden_units(i_p, H, BH)
        o_s, m_s = o_b[:, None] * H + o_h[None, :], m_b[:, None] & m_h[None, :]
        b_h, b_c = load_states(p_h, p_c, o_s, m_s)
        while t < T:
            m_run = (m_b & (b_len > t))[:, None]
            o_prev = state_offset(t, B, H, SAVE)
            o_next = state_offset(t + 1, B, H, SAVE)
            b_h, b_c = forward_block(
                recurrent_dot(p_h + o_prev, p_w_hh, o_b, m_b, o_g, m_g, H, 1, H, PRECISION, BB, 4 * BH,
                              p_c.dtype.element_ty, ".cg"),
                b_h, b_c, t, i_p, o_b, m_b, m_run, p_x_gates, p_bias, p_affine, p_pop, p_steps, p_out, p_a_hh,
                p_stats, eps, B, H, FRAME, BATCH, HAS_BIAS, SAVE, BB, BH)
            # h_t for every program's next dot; c_t only into backward's history
            if SAVE:
                store_states(p_h + o_next, p_c + o_next, o_s, m_s, b_h, b_c)
            else:
                tl.store(p_h + o_next + o_s, b_h, mask=m_s)
            _grid_barrier(p_sem, t, NUM_PROGRAMS)
            t += 1
        if not SAVE:
            tl.store(p_c + (T % 2) * B * H + o_s, b_c, mask=m_s)
    else:
        while t < T:
            m_run = (m_b & (b_len > t))[:, None]
            # the state before step t and after it: rows t and t + 1 of the history, or the two slots
            o_prev = state_offset(t, B, H, SAVE)
            o_next = state_offset(t + 1, B, H, SAVE)
            i_h = i_p
            while i_h < (H + BH - 1) // BH:
                o_g, m_g, _ = gate_columns(i_h, H, BH)
                o_h, m_h = hidden_units(i_h, H, BH)
                o_s, m_s = o_b[:, None] * H + o_h[None, :], m_b[:, None] & m_h[None, :]
                b_h, b_c = load_states(p_h + o_prev, p_c + o_prev, o_s, m_s)
                b_h, b_c = forward_block(
                    recurrent_dot(p_h + o_prev, p_w_hh, o_b, m_b, o_g, m_g, H, 1, H, PRECISION, BB, 4 * BH,
                                  p_c.dtype.element_ty, ".cg"),
                    b_h, b_c, t, i_h, o_b, m_b, m_run, p_x_gates, p_bias, p_affine, p_pop, p_steps, p_out, p_a_hh,
                    p_stats, eps, B, H, FRAME, BATCH, HAS_BIAS, SAVE, BB, BH)
                store_states(p_h + o_next, p_c + o_next, o_s, m_s, b_h, b_c)
                i_h += NUM_PROGRAMS
            _grid_barrier(p_sem, t, NUM_PROGRAMS)
            t += 1


@triton.jit
def _store_partial(p_part, b_da_hh, p_w_hh, i_h, o_b, m_b, H: tl.constexpr, PRECISION: tl.constexpr,
                   BH: tl.constexpr, ACC: tl.constexpr):
    """A block's share of the next h-state gradient: da_hh [BB, 4*BH] (its gate columns) times the rows of
    W_hh [4*BH, H] of those columns, stored to ``p_part`` [B, H] in chunks of BLOCK_K hidden units."""
    o_g, m_g, _ = gate_columns(i_h, H, BH)
    for i_n in range(0, H, BLOCK_K):
        o_n = i_n + tl.arange(0, BLOCK_K)
        m_n = o_n < H
        # [4*BH, BLOCK_K] W_hh[o_g, o_n]
        b_w = tl.load(p_w_hh + o_g[:, None] * H + o_n[None, :], mask=m_g[:, None] & m_n[None, :], other=0.0)
        b_part = tl.dot(b_da_hh, b_w, input_precision=PRECISION, out_dtype=ACC)
        tl.store(p_part + o_b[:, None] * H + o_n[None, :], b_part, mask=m_b[:, None] & m_n[None, :])


@triton.heuristics(BACKWARD_FLAGS)
@triton.jit(do_not_specialize=["T", "B"])
def bnlstm_persistent_bwd_kernel(
    p_x_gates, p_w_hh, p_bias, p_affine, p_stats, p_steps, p_lengths, p_c, p_a_hh, p_dout, p_dstate, p_da,
    p_dparams, p_dpart, p_sem, T, eps, B, H: tl.constexpr,
    FRAME: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_PROGRAMS: tl.constexpr, PRECISION: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr,
):
    """All T steps in reverse; program i_p owns the column blocks i_p, i_p + NUM_PROGRAMS, ... of BH units.

    The h-state gradient of rows still running at t + 1 is da_hh_{t+1} W_hh. ``CARRY`` (one block covers H,
    one program, at least 16 wide: the "registers" form): da_hh_{t+1} [BB, 4*BH] is the previous iteration's register tile, W_hh
    [4*BH, BH] is loaded once, and dh, dc and the parameter-gradient sums stay in registers, written once at
    the end. Otherwise each block writes its partial da_hh_t[:, block columns] W_hh[block columns, :] [B, H]
    to ``p_dpart`` ([2, NB, B, H], slot t % 2), and after the grid barrier a block sums the NB partials of its
    own columns in block order (deterministic): B * H values read a block instead of all of da_hh [B, 4H].
    The state gradients live in ``p_dstate`` and the sums in ``p_dparams`` (zeros on entry), each block
    updating its own columns every step, even where a program owns one block: carrying its dh and dc in
    registers across the loop (as the forward carries h and c) spilled 16 bytes a thread on sm90 at B = 64
    (ptxas; 88 with the sums as well), against none this way.
    """
    CARRY: tl.constexpr = BH >= H and BH >= 16
    NB: tl.constexpr = (H + BH - 1) // BH
    i_p = tl.program_id(0).to(tl.int64)
    o_b = tl.arange(0, BB)
    m_b = o_b < B
    b_len = tl.load(p_lengths + o_b, mask=m_b, other=0)
    # int64: offsets such as T * B * 4H (da_ih after da_hh) can pass 2^31
    T = T.to(tl.int64)
    t = T - 1
    if CARRY:
        o_g, m_g, _ = gate_columns(0, H, BH)
        o_h, m_h = hidden_units(0, H, BH)
        o_s, m_s = o_b[:, None] * H + o_h[None, :], m_b[:, None] & m_h[None, :]
        # [4*BH, BH] all of W_hh, resident for the whole loop
        b_w = tl.load(p_w_hh + o_g[:, None] * H + o_h[None, :], mask=m_g[:, None] & m_h[None, :], other=0.0)
        # [BB, BH] the h and c state gradients after step T - 1, carried backwards, and c_T
        b_dh_state, b_dc_state = load_states(p_dstate, p_dstate + B * H, o_s, m_s)
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
            b_da_next, b_dc_state, b_ih, b_hh, b_b, b_gc, b_bc = backward_block(
                b_dh_state, b_dc_state, b_c, b_c_prev, t, T, 0, o_b, m_b, m_run, p_x_gates, p_bias, p_affine, p_stats,
                p_steps, p_a_hh, p_dout, p_da, eps, B, H, FRAME, HAS_BIAS, BB, BH)
            b_dgamma_ih += b_ih
            b_dgamma_hh += b_hh
            b_dbias += b_b
            b_dgamma_c += b_gc
            b_dbeta_c += b_bc
            b_c = b_c_prev
            t -= 1
        store_states(p_dstate, p_dstate + B * H, o_s, m_s, b_dh_state, b_dc_state)
        if FRAME or HAS_BIAS:
            store_sums(p_dparams, 0, b_dgamma_ih, b_dgamma_hh, b_dbias, b_dgamma_c, b_dbeta_c, False, H, FRAME,
                       HAS_BIAS, BH)
    else:
        while t >= 0:
            m_run = (m_b & (b_len > t))[:, None]
            m_next = (m_b & (b_len > t + 1))[:, None]
            i_h = i_p
            while i_h < NB:
                o_h, m_h = hidden_units(i_h, H, BH)
                o_s, m_s = o_b[:, None] * H + o_h[None, :], m_b[:, None] & m_h[None, :]
                b_dh_state, b_dc_state = load_states(p_dstate, p_dstate + B * H, o_s, m_s)
                if t + 1 < T:
                    # [BB, BH] da_hh_{t+1} W_hh[:, block]: the blocks' partials of step t + 1, in block order
                    p_part = p_dpart + ((t + 1) % 2) * NB * B * H
                    b_dh = tl.zeros([BB, BH], dtype=b_dh_state.dtype)
                    for j in range(NB):
                        b_dh += tl.load(p_part + j * B * H + o_s, mask=m_s, other=0.0, cache_modifier=".cg")
                    b_dh_state = tl.where(m_next, b_dh, b_dh_state)
                b_da_hh, b_dc_state, b_ih, b_hh, b_b, b_gc, b_bc = backward_block(
                    b_dh_state, b_dc_state, tl.load(p_c + (t + 1) * B * H + o_s, mask=m_s, other=0.0),
                    tl.load(p_c + t * B * H + o_s, mask=m_s, other=0.0), t, T, i_h, o_b, m_b, m_run, p_x_gates, p_bias,
                    p_affine, p_stats, p_steps, p_a_hh, p_dout, p_da, eps, B, H, FRAME, HAS_BIAS, BB, BH)
                store_states(p_dstate, p_dstate + B * H, o_s, m_s, b_dh_state, b_dc_state)
                if FRAME or HAS_BIAS:
                    store_sums(p_dparams, i_h, b_ih, b_hh, b_b, b_gc, b_bc, True, H, FRAME, HAS_BIAS, BH)
                if t > 0:
                    _store_partial(p_dpart + (t % 2) * NB * B * H + i_h * B * H, b_da_hh, p_w_hh, i_h, o_b, m_b, H,
                                   PRECISION, BH, b_dh_state.dtype)
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


def _launch(run: _Run) -> dict:
    """The launch arguments both persistent kernels share."""
    return dict(NUM_PROGRAMS=run.programs, PRECISION=run.precision, BH=run.block_h, num_warps=run.num_warps,
                **({"launch_cooperative_grid": True} if run.programs > 1 else {}))


def _layer_forward(*, x: Tensor, h0: Tensor, c0: Tensor, params: LayerParams, population: Tensor | None,
                   run: _Run, save: bool):
    """The hoisted input GEMM (sequence-wise normalized over every valid frame), then the one persistent
    launch. Returns out, h_n, c_n, the moments buffer (frame [T, 18H], sequence [2, 4H], else None) and,
    when ``save``, the ``_Saved`` backward reads."""
    T, B, _ = x.shape
    G = params.weight_hh.shape[0]
    H = G // 4
    frame = run.normalization == "frame"
    device, dtype, acc = x.device, x.dtype, triton_common.acc_dtype(x.dtype)
    if run.lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=device)
    else:
        lengths = triton_common.host_to_device(run.lengths, device)
    a_ih = torch.matmul(x, params.weight_ih.t())  # [T, B, 4H]
    seq_stats = None
    if run.normalization == "sequence":
        x_gates = torch.empty_like(a_ih)
        seq_stats = triton_common.sequence_bn_forward(a_ih=a_ih, u=x_gates, gamma_ih=params.gamma_ih,
                                                      population=population, lengths=lengths, counts=run.counts,
                                                      use_batch=run.batch_stats[0], eps=run.eps)
    else:
        x_gates = a_ih
    affine = steps = None
    if frame:
        affine = torch.cat([params.gamma_ih, params.gamma_hh, params.gamma_c, params.beta_c])
        steps = torch.empty(T, 2, dtype=torch.int32, device=device)
        steps = triton_common.device_steps(run.counts, run.batch_stats, steps)
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
        BATCH=frame and any(run.batch_stats), BB=triton_common.block_rows(B), **_launch(run),
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
    device = x.device
    # [2, B, H] dh_n, dc_n in; the state gradients after step 0 out
    dstate = torch.stack([dh_n, dc_n]).to(saved.c.dtype)
    da = torch.empty(2 if frame else 1, T, B, G, dtype=x.dtype, device=device)
    has_sums = frame or params.bias is not None
    # (zeros: a program walking several blocks adds each step's sums to it)
    dparams = torch.zeros(14 * H, dtype=saved.c.dtype, device=device) if has_sums else None
    # [2, NB, B, H] the blocks' partial h-state gradients, by step parity (all but the "registers" form)
    blocks = triton.cdiv(H, run.block_h)
    dpart = None if blocks == 1 and run.block_h >= 16 else torch.empty(2, blocks, B, H, dtype=saved.c.dtype,
                                                                        device=device)
    bnlstm_persistent_bwd_kernel[(run.programs,)](
        p_x_gates=saved.x_gates, p_w_hh=params.weight_hh, p_bias=params.bias, p_affine=saved.affine,
        p_stats=saved.stats, p_steps=saved.steps, p_lengths=saved.lengths, p_c=saved.c, p_a_hh=saved.a_hh,
        p_dout=dout.contiguous(), p_dstate=dstate, p_da=da, p_dparams=dparams, p_dpart=dpart,
        p_sem=torch.zeros(1, dtype=torch.int32, device=device), T=T, eps=run.eps, B=B, H=H,
        BB=triton_common.block_rows(B), **_launch(run),
    )
    da_ih, dgamma_ih = da[-1], None
    if run.normalization == "sequence":
        da_ih, dgamma_ih = triton_common.sequence_bn_backward(
            a_ih=saved.a_ih, du=da_ih, gamma_ih=params.gamma_ih, seq_stats=saved.seq_stats, lengths=saved.lengths,
            counts=run.counts, use_batch=run.batch_stats[0], eps=run.eps)
    return triton_common.gradients_after_loop(da_hh=da[0], da_ih=da_ih, dc0=dstate[1], x=x, h=saved.h,
                                              params=params, sums=dparams, dgamma_ih=dgamma_ih, frame=frame,
                                              needs=needs)


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
        if needs_reference_backward(dout, dh_n, dc_n):
            # a graph of the gradients (double backward) or torch.func-batched cotangents: the reference's VJP
            grads = reference_backward(inputs=ctx.inputs._replace(x=x, h0=h0, c0=c0), params=params,
                                       config=ctx.config, cotangents=(dout, dh_n, dc_n), needs_input_grad=needs)
        else:
            grads = _layer_backward(x=x, params=params, saved=_Saved(*tensors[split:]),
                                    cotangents=(dout, dh_n, dc_n), needs=needs, run=ctx.run)
        return (None, None, None, None, *grads)


def _single_block_h(H: int) -> int:
    return max(16, triton.next_power_of_2(H))


def persistent_fits(B: int, H: int, dtype: torch.dtype) -> bool:
    """Whether the "registers" form (one program, one [BB, 4*BH] tile) fits one SM: compiled for sm90 with
    8 warps, both kernels stay within 255 registers a thread without spilling for H <= 16 and B <= 64 in
    float32, B <= 32 in bfloat16 / float16 (the backward spilled 184-192 bytes a thread at float32 32 x 32
    and bfloat16 64 x 16); s-MNIST's H = 100 (a [64, 512] tile) needs 256-384 KiB of shared memory and
    spills kilobytes a thread (the compile report in ``README.md``)."""
    block_h = _single_block_h(H)
    tile = triton_common.block_rows(B) * 4 * block_h
    return block_h <= _REGISTERS_MAX_BH and tile <= _REGISTERS_TILE.get(dtype, _REGISTERS_TILE[torch.float32])


def _block_warps(B: int) -> int:
    """Warps of the block forms: their [BB, 64] tile compiles without spills at B <= 64 with 8 (16 warps
    spilled in backward there); B = 128 and 256 spill about 1 KiB and 3.6 KiB a thread with 16."""
    return 8 if triton_common.block_rows(B) <= 64 else 16


def persistent_preferred(B: int, H: int, dtype: torch.dtype, device: torch.device) -> bool:
    """The choice ``fused_triton.variant`` makes between these kernels and the per-step launches under
    ``FUSED_BNLSTM_TRITON_VARIANT=auto``: the one-program "registers" form on CUDA where it fits
    (``persistent_fits``), per-step otherwise and under the interpreter.

    The "grid" form is predicted faster than per-step launches at every paper shape (README.md, Persistent
    kernels), but its software grid barrier assumes every program is resident at once, which a Triton launch
    does not guarantee (another kernel or an MPS/MIG share holding SMs would make it spin forever). Until a GPU
    run has shown it co-resident and faster, it runs only when asked for (``FUSED_BNLSTM_TRITON_VARIANT=
    persistent``): a hang is the one outcome worse than a slow step.
    """
    return device.type == "cuda" and persistent_fits(B, H, dtype)


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
                normalization=config.normalization, precision=triton_common.recurrent_precision(dtype, device),
                form=form, programs=programs, block_h=block_h, num_warps=num_warps)


def bnlstm_layer_triton_persistent(*, inputs: LayerInput, params: LayerParams, config: LayerConfig,
                                   form: str | None = None) -> LayerOutput:
    """One BN-LSTM layer-direction in one persistent launch forward and one backward (``prepare_layer`` has
    checked the inputs). Returns as ``fused_bnlstm.ops.bnlstm_layer``; ``bnlstm_layer_triton`` dispatches
    here (``FUSED_BNLSTM_TRITON_VARIANT``).

    ``form`` (``FORMS``): ``"registers"`` (one program, one tile, W_hh, h and c on chip; ``persistent_fits``
    says where it compiles without spills), ``"single"`` (one program walking 16-unit column blocks, h
    through L1/L2), ``"grid"`` (up to one program per SM walking the blocks, one grid barrier per step; one
    program under the interpreter), or None for the heuristic: "registers" where it fits, else "grid" on
    CUDA and "single" under the interpreter.
    """
    name = "persistent Triton"
    triton_common.check_call(name, inputs, params, config)
    x = inputs.x
    device = x.device
    dtype = triton_common.compute_dtype(name, x)
    B = x.shape[1]
    if triton_common.block_rows(B) > _MAX_ROWS:
        raise ValueError(f"the persistent Triton backend holds every batch row in one program: B <= {_MAX_ROWS}, "
                         f"got B={B}; use the per-step 'triton' backend (or split the batch)")
    run = _plan_run(inputs, config, dtype, form)
    tensors = [None if v is None else v.to(dtype).contiguous() for v in (x, inputs.h0, inputs.c0, *params)]
    population = triton_common.pack_population(inputs.population, config.normalization)
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
    stats = finish_statistics(inputs, config, triton_common.moment_views(moments, config.normalization), x.dtype)
    return LayerOutput(output=out, h_n=h_n, c_n=c_n, stats=stats)
