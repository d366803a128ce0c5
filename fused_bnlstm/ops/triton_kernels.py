"""Triton kernels of the fused BN-LSTM layer: the per-step kernels (launched from ``fused_triton.py``, which
documents the calls) and the ``@triton.jit`` helpers they share with the persistent kernels of
``persistent_triton.py``.

Every kernel is time-major and one layer-direction. A step kernel owns a block of BH hidden units j for
all four gates and **all** batch rows, so every batch-norm reduction over the rows stays inside the
program. Its gate columns (j, H + j, 2H + j, 3H + j of the gate axis) form one gate-strided [BB, 4*BH]
tile: one dot per reduction chunk, and the moments, normalization, bias, gamma and activations run once
over the tile; the cell update splits it into its i, f, g, o blocks. Statistics and accumulation are in
the cell state's dtype (float32, or float64 for float64 tensors); stores go out in each buffer's dtype.
The BN backward used here is derived in ``README.md`` beside this file.

Shared with ``persistent_triton.py`` (public names; the underscored helpers are this file's own):
``gate_columns`` / ``hidden_units`` (a column block's offsets), ``load_states`` /
``store_states``, ``state_offset``, ``recurrent_dot`` (chunks of ``BLOCK_K``), ``forward_block`` and
``backward_block`` (one column block's step, forward and in reverse: everything but the recurrent dot and
where the states live), ``store_sums`` (a block's parameter-gradient sums) and the kernels' constexpr flags
(``FORWARD_FLAGS`` / ``BACKWARD_FLAGS``).

Buffers (C-contiguous; "state" buffers hold the state *after* each step, index 0 the initial one):

    x_gates   [T, B, 4H]  frame: W_ih x_t (raw); otherwise the finished input branch u_t
    w_hh      [4H, P]     h [T+1, B, H] (input dtype)       c [T+1, B, H] (accumulation dtype)
                          (without SAVE: [2, B, H] each, step t reads slot t % 2 and writes the other)
    r         [T+1, B, P] the state the recurrent dot reads, laid out as h: h itself (P = H), or with a
                          projection (``proj_size``) r_t = W_hr h_t, which the host writes between launches
    a_hh      [T, B, 4H]  W_hh r_{t-1}, saved for backward; None when nothing is saved
    affine    [10H]       gamma_ih | gamma_hh | gamma_c | beta_c (frame only)
    fold      [T, 14H]    eval, frame: scale of a_ih | scale of a_hh | shift of the gates [4H each], then
                          scale | shift of c [H each] (population moments, gamma, beta and bias folded)
    pop       [T, 18H]    a step's population moments: means of ih | hh | c ([4H | 4H | H]), then the
    stats     [T, 18H]    variances 9H further; stats: the moments each step normalized with
    dstate    [2, B, H]   the h and c state gradients the backward launches carry from step to step
    dout      [T, B, H]   the gradient of each step's output h_t (with a projection: h_t's whole gradient,
                          through r_t = W_hr h_t, formed by the host between launches)
    da        [., T, B, 4H]  da_hh, then (frame) da_ih
    dparams   [T, 14H]    per-step partial sums: d(affine) [10H] | dbias [4H], summed over T afterwards;
                          synchronized [T + 1, 14H], row T the group's sums of the step being run
"""

from __future__ import annotations

import triton
import triton.language as tl


# the reduction chunk of every recurrent dot (a global constexpr the kernels read, not a parameter)
BLOCK_K = tl.constexpr(32)


def _passed(name):
    """A ``@triton.heuristics`` flag: whether the launch passed tensor ``name`` (None where a mode has none)."""
    return lambda args: args[name] is not None


# the constexpr flags of the forward and backward kernels (per-step and persistent), from their optional tensors
FORWARD_FLAGS = {"FRAME": _passed("p_affine"), "HAS_BIAS": _passed("p_bias"), "SAVE": _passed("p_a_hh")}
BACKWARD_FLAGS = {"FRAME": _passed("p_affine"), "HAS_BIAS": _passed("p_bias")}
# the per-step backward kernel's own flag: it forms the h-state gradient from da_hh W_hh itself (no projection)
RECURRENT_FLAG = {"RECURRENT": _passed("p_w_hh")}


@triton.jit
def gate_columns(i_h, H, BH: tl.constexpr):
    """Column block i_h's [4*BH] columns of the [4H] gate axis (gate k's units at k * H + j): their offsets,
    whether each is inside the axis, and each column's gate k (0..3)."""
    o_j = tl.arange(0, 4 * BH)
    o_jh = i_h * BH + o_j % BH
    return (o_j // BH) * H + o_jh, o_jh < H, o_j // BH


@triton.jit
def hidden_units(i_h, H, BH: tl.constexpr):
    """Column block i_h's hidden units [i_h * BH, (i_h + 1) * BH) [BH] and whether each is inside [H]."""
    o_h = i_h * BH + tl.arange(0, BH)
    return o_h, o_h < H


@triton.jit
def load_states(p_h, p_c, o_s, m_s):
    """The h and c states [BB, BH] at a state tile's offsets (h in its buffer's dtype, c in the cell's)."""
    return tl.load(p_h + o_s, mask=m_s, other=0.0), tl.load(p_c + o_s, mask=m_s, other=0.0)


@triton.jit
def store_states(p_h, p_c, o_s, m_s, b_h, b_c):
    """The inverse of ``load_states``."""
    tl.store(p_h + o_s, b_h, mask=m_s)
    tl.store(p_c + o_s, b_c, mask=m_s)


@triton.jit
def _running_rows(p_lengths, o_first, B, t, BB: tl.constexpr):
    """A program's BB rows from o_first: offsets, inside the batch, and [BB, 1] still running at step t."""
    o_b = o_first + tl.arange(0, BB)
    m_b = o_b < B
    return o_b, m_b, (m_b & (tl.load(p_lengths + o_b, mask=m_b, other=0) > t))[:, None]


@triton.jit
def _split_gates(b_tile, BB: tl.constexpr, BH: tl.constexpr):
    """A [BB, 4*BH] gate tile as its i, f, g, o blocks [BB, BH]."""
    # [BB, BH, 2, 2]: gate k = 2p + q sits at [:, :, p, q]; split takes q, then p
    b_tile = tl.permute(tl.reshape(b_tile, [BB, 2, 2, BH]), (0, 3, 1, 2))
    b_even, b_odd = tl.split(b_tile)
    b_i, b_g = tl.split(b_even)
    b_f, b_o = tl.split(b_odd)
    return b_i, b_f, b_g, b_o


@triton.jit
def _join_gates(b_i, b_f, b_g, b_o, BB: tl.constexpr, BH: tl.constexpr):
    """The inverse of ``_split_gates``: four [BB, BH] blocks as one [BB, 4*BH] gate tile."""
    b_tile = tl.join(tl.join(b_i, b_g), tl.join(b_f, b_o))  # [BB, BH, p, q]
    return tl.reshape(tl.permute(b_tile, (0, 2, 3, 1)), [BB, 4 * BH])


@triton.jit
def _activate(b_z, o_gate):
    """sigmoid on the i, f, o columns, tanh on g's (tanh(z) = 2 sigmoid(2z) - 1): one sigmoid per tile."""
    b_s = tl.where(o_gate == 2, 2.0, 1.0)[None, :]
    return b_s * tl.sigmoid(b_s * b_z) - (b_s - 1.0)


@triton.jit
def _tanh(b_v):
    return 2.0 * tl.sigmoid(2.0 * b_v) - 1.0


@triton.jit
def _load_vector(p_v, o_col, m_col, dtype):
    """[1, W] a parameter vector's columns o_col, as a row to broadcast over a tile."""
    return tl.load(p_v + o_col, mask=m_col, other=0.0).to(dtype)[None, :]


@triton.jit
def _batch_norm(b_v, m_run, n, use_batch, eps, p_pop, p_stats, o_col, m_col, V, BATCH: tl.constexpr):
    """xhat [BB, W] of b_v normalized over the running rows, or with the population's moments.

    ``p_pop`` / ``p_stats`` point at one step's moments row (means at o_col, variances V further); the
    moments used are stored to ``p_stats``. Without ``BATCH`` (no step of the call uses batch statistics:
    eval) only the population's, with no reduction over the rows.
    """
    b_mean = tl.load(p_pop + o_col, mask=m_col, other=0.0).to(b_v.dtype)
    b_var = tl.load(p_pop + V + o_col, mask=m_col, other=1.0).to(b_v.dtype)
    if BATCH:
        n_f = tl.maximum(n, 1).to(b_v.dtype)
        b_batch_mean = tl.sum(tl.where(m_run, b_v, 0.0), axis=0) / n_f  # [W]
        b_dev = tl.where(m_run, b_v - b_batch_mean[None, :], 0.0)
        b_mean = tl.where(use_batch != 0, b_batch_mean, b_mean)
        b_var = tl.where(use_batch != 0, tl.sum(b_dev * b_dev, axis=0) / n_f, b_var)
    tl.store(p_stats + o_col, b_mean, mask=m_col)
    tl.store(p_stats + V + o_col, b_var, mask=m_col)
    return (b_v - b_mean[None, :]) / tl.sqrt(b_var + eps)[None, :]


@triton.jit
def _xhat(b_v, p_stats, o_col, m_col, V, eps):
    """(v - mean) * rstd [BB, W] and rstd [W] with the saved moments of one step (layout as ``_batch_norm``)."""
    b_rstd = 1.0 / tl.sqrt(tl.load(p_stats + V + o_col, mask=m_col, other=1.0) + eps)
    return (b_v - tl.load(p_stats + o_col, mask=m_col, other=0.0)[None, :]) * b_rstd[None, :], b_rstd


@triton.jit
def _bn_backward(b_dxhat, b_xhat, b_rstd, m_run, n, use_batch):
    """d(input) of xhat = (v - mean) * rstd given d(xhat) [BB, W]; batch moments couple the running rows."""
    n_f = tl.maximum(n, 1).to(b_dxhat.dtype)
    b_dxhat = tl.where(m_run, b_dxhat, 0.0)
    # [W] means over the running rows of dxhat and dxhat * xhat
    b_mean_d = tl.sum(b_dxhat, axis=0) / n_f
    b_mean_dx = tl.sum(b_dxhat * b_xhat, axis=0) / n_f
    return _bn_backward_given(b_dxhat, b_xhat, b_rstd, b_mean_d[None, :], b_mean_dx[None, :], m_run, use_batch)


@triton.jit
def _bn_backward_given(b_dxhat, b_xhat, b_rstd, b_mean_d, b_mean_dx, m_run, use_batch):
    """``_bn_backward`` given the means [1, W] of dxhat and dxhat * xhat over the rows the moments came from."""
    b_batch = b_rstd[None, :] * (b_dxhat - b_mean_d - b_xhat * b_mean_dx)
    b_pop = b_rstd[None, :] * b_dxhat
    return tl.where(m_run, tl.where(use_batch != 0, b_batch, b_pop), 0.0)


@triton.jit
def _bn_backward_synced(b_dv, b_gamma, b_xhat, b_rstd, p_sum_d, p_sum_dx, o_col, m_col, m_run, n, use_batch):
    """``_bn_backward`` of d(xhat) = b_dv * gamma [BB, W] over the whole process group: ``p_sum_d`` /
    ``p_sum_dx`` hold the group's sums of dv and dv * xhat [W] (gamma is per column, so it factors out)."""
    n_f = tl.maximum(n, 1).to(b_dv.dtype)
    b_mean_d = b_gamma * _load_vector(p_sum_d, o_col, m_col, b_dv.dtype) / n_f  # [1, W]
    b_mean_dx = b_gamma * _load_vector(p_sum_dx, o_col, m_col, b_dv.dtype) / n_f
    return _bn_backward_given(b_dv * b_gamma, b_xhat, b_rstd, b_mean_d, b_mean_dx, m_run, use_batch)


@triton.jit
def state_offset(t, B, H, SAVE: tl.constexpr):
    """Where the state after step t - 1 sits: row t of the [T+1, B, H] history, or slot t % 2 of two."""
    return t * B * H if SAVE else (t % 2) * B * H


@triton.jit
def recurrent_dot(p_a, p_w, o_b, m_b, o_n, m_n, K: tl.constexpr, stride_k, stride_n, PRECISION: tl.constexpr,
                  BB: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, CACHE: tl.constexpr):
    """[BB, BN] = A W over chunks of ``BLOCK_K``: A [B, K] row-major at ``p_a`` (rows o_b), W's element (k, n)
    at ``p_w + k * stride_k + n * stride_n`` (columns o_n). ``CACHE`` is A's load cache modifier: ``".cg"``
    where other programs of the same launch wrote A (read through L2, never a stale L1 line), else ``""``."""
    b_acc = tl.zeros([BB, BN], dtype=ACC)
    for i_k in range(0, K, BLOCK_K):
        o_k = i_k + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_a = tl.load(p_a + o_b[:, None] * K + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0,
                      cache_modifier=CACHE)
        b_w = tl.load(p_w + o_k[:, None] * stride_k + o_n[None, :] * stride_n, mask=m_k[:, None] & m_n[None, :],
                      other=0.0)
        b_acc += tl.dot(b_a, b_w, input_precision=PRECISION, out_dtype=ACC)
    return b_acc


@triton.jit
def _cell(b_z, o_gate, b_c_prev, BB: tl.constexpr, BH: tl.constexpr):
    """From the [BB, 4*BH] pre-activation tile and c_{t-1} [BB, BH]: the o gate and c_t [BB, BH]."""
    b_i, b_f, b_g, b_o = _split_gates(_activate(b_z, o_gate), BB, BH)
    return b_o, b_f * b_c_prev + b_i * b_g


@triton.jit
def _emit(b_o, b_y, b_h_prev, b_c, b_c_prev, m_run, p_out_t, o_s, m_s):
    """h_t = o * tanh(y): stores the output row [BB, BH] (zeros on finished rows) and returns the states
    after the step, finished rows keeping theirs."""
    b_h = b_o * _tanh(b_y)
    tl.store(p_out_t + o_s, tl.where(m_run, b_h, 0.0).to(p_out_t.dtype.element_ty), mask=m_s)
    return tl.where(m_run, b_h.to(b_h_prev.dtype), b_h_prev), tl.where(m_run, b_c, b_c_prev)


@triton.jit
def forward_block(b_a_hh, b_h_prev, b_c_prev, t, i_h, o_b, m_b, m_run, p_x_gates, p_bias, p_affine, p_pop, p_steps,
                  p_out, p_a_hh, p_stats, eps, B, H: tl.constexpr, FRAME: tl.constexpr, BATCH: tl.constexpr,
                  HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """Step t of column block i_h (hidden units [i_h * BH, (i_h + 1) * BH), rows o_b) given its a_hh =
    W_hh h_{t-1} tile [BB, 4*BH] and the states before the step [BB, BH]: both batch norms, the gates, c_t,
    BN(c_t), h_t. Stores the output row (and with ``SAVE`` a_hh, frame-wise the moments used); returns the
    states after the step, finished rows keeping theirs. The per-step and the persistent forward kernels
    both run a block's step through this."""
    ACC = b_a_hh.dtype
    o_g, m_g, o_gate = gate_columns(i_h, H, BH)
    o_h, m_h = hidden_units(i_h, H, BH)
    # [BB, 4*BH] offsets of the tile in a [T, B, 4H] buffer
    o_tile = t * B * 4 * H + o_b[:, None] * 4 * H + o_g[None, :]
    m_tile = m_b[:, None] & m_g[None, :]
    if SAVE:
        tl.store(p_a_hh + o_tile, b_a_hh, mask=m_tile)
    b_x = tl.load(p_x_gates + o_tile, mask=m_tile, other=0.0).to(ACC)
    if FRAME:
        # gates = gamma_hh * BN(a_hh) + gamma_ih * BN(a_ih), with the moments each step used saved
        n = tl.load(p_steps + 2 * t)
        use_batch = tl.load(p_steps + 2 * t + 1)
        p_pop_t = p_pop + t * 18 * H
        p_stats_t = p_stats + t * 18 * H
        b_z = _load_vector(p_affine + 4 * H, o_g, m_g, ACC) * _batch_norm(
            b_a_hh, m_run, n, use_batch, eps, p_pop_t + 4 * H, p_stats_t + 4 * H, o_g, m_g, 9 * H, BATCH)
        b_z += _load_vector(p_affine, o_g, m_g, ACC) * _batch_norm(
            b_x, m_run, n, use_batch, eps, p_pop_t, p_stats_t, o_g, m_g, 9 * H, BATCH)
    else:
        b_z = b_a_hh + b_x
    if HAS_BIAS:
        b_z += _load_vector(p_bias, o_g, m_g, ACC)
    b_o, b_c = _cell(b_z, o_gate, b_c_prev, BB, BH)
    if FRAME:
        b_y = _load_vector(p_affine + 8 * H, o_h, m_h, ACC) * _batch_norm(
            b_c, m_run, n, use_batch, eps, p_pop_t + 8 * H, p_stats_t + 8 * H, o_h, m_h, 9 * H, BATCH)
        b_y += _load_vector(p_affine + 9 * H, o_h, m_h, ACC)
    else:
        b_y = b_c
    o_s, m_s = o_b[:, None] * H + o_h[None, :], m_b[:, None] & m_h[None, :]
    return _emit(b_o, b_y, b_h_prev, b_c, b_c_prev, m_run, p_out + t * B * H, o_s, m_s)


@triton.jit
def backward_block(b_dh_state, b_dc_state, b_c, b_c_prev, t, T, i_h, o_b, m_b, m_run, p_x_gates, p_bias, p_affine,
                   p_stats, p_steps, p_a_hh, p_dout, p_da, eps, B, H: tl.constexpr, FRAME: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """Step t in reverse for column block i_h, given the h- and c-state gradients after the step [BB, BH]
    (the h one complete) and c_t, c_{t-1}: the cell and BN backward of the block's tile, recomputed from what
    forward saved. Stores da_hh (and frame-wise da_ih, T*B*4H further) of the tile.

    Returns da_hh [BB, 4*BH] (in ``p_da``'s dtype), the c-state gradient before the step [BB, BH], and
    the step's parameter-gradient sums over the rows: dgamma_ih, dgamma_hh, dbias [4*BH], dgamma_c,
    dbeta_c [BH] (zeros where the mode has no such parameter). Both backward kernels run a block through this.
    """
    o_h, m_h = hidden_units(i_h, H, BH)
    m_s = m_b[:, None] & m_h[None, :]
    b_dh = tl.load(p_dout + t * B * H + o_b[:, None] * H + o_h[None, :], mask=m_s, other=0.0).to(b_c.dtype)
    return _backward_tile(tl.where(m_run, b_dh_state + b_dh, 0.0), b_dc_state, b_c, b_c_prev, t, T, i_h, o_b, m_run,
                          p_x_gates, p_bias, p_affine, p_stats, p_steps, p_a_hh, p_da, p_da, eps, B, H, FRAME, HAS_BIAS,
                          0, BB, BH)


@triton.jit
def _backward_tile(b_dh, b_dc_state, b_c, b_c_prev, t, T, i_h, o_b, m_run, p_x_gates, p_bias, p_affine, p_stats,
                   p_steps, p_a_hh, p_sums, p_da, eps, B, H: tl.constexpr, FRAME: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PHASE: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr):
    """``backward_block`` given the step's whole h gradient b_dh [BB, BH] (zero on finished rows), in one of
    the phases of a step whose batch norms sum over a process group (``PHASE``; 0: not synchronized).

    Phase 1 only wants the BN(c) sums (the returned dgamma_c, dbeta_c: sum dy * xhat_c, sum dy), phase 2 the
    gates' (dgamma_ih, dgamma_hh, dbias: sum dz * xhat_ih, sum dz * xhat_hh, sum dz) given the group's BN(c)
    sums; neither stores da. Phase 3 finishes the step with the group's sums of both. ``p_sums`` [14H] holds
    the group's sums in the ``dparams`` layout (phases 2 and 3 read it)."""
    ACC = b_c.dtype
    m_b = o_b < B
    o_g, m_g, o_gate = gate_columns(i_h, H, BH)
    o_h, m_h = hidden_units(i_h, H, BH)

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
        if PHASE == 0:
            b_dc_new = _bn_backward(b_dy * b_gamma_c, b_xhat_c, b_rstd_c, m_run, n, use_batch)
        else:
            b_dc_new = _bn_backward_synced(b_dy, b_gamma_c, b_xhat_c, b_rstd_c, p_sums + 9 * H, p_sums + 8 * H, o_h,
                                           m_h, m_run, n, use_batch)
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
        if PHASE == 0:
            b_da_hh = _bn_backward(b_dz * b_gamma_hh, b_xhat_hh, b_rstd_hh, m_run, n, use_batch)
            b_da_ih = _bn_backward(b_dz * b_gamma_ih, b_xhat_ih, b_rstd_ih, m_run, n, use_batch)
        else:
            b_da_hh = _bn_backward_synced(b_dz, b_gamma_hh, b_xhat_hh, b_rstd_hh, p_sums + 10 * H, p_sums + 4 * H,
                                          o_g, m_g, m_run, n, use_batch)
            b_da_ih = _bn_backward_synced(b_dz, b_gamma_ih, b_xhat_ih, b_rstd_ih, p_sums + 10 * H, p_sums, o_g, m_g,
                                          m_run, n, use_batch)
        if PHASE == 0 or PHASE == 3:
            # da_ih sits T*B*4H (int64: it can pass 2^31) after da_hh
            tl.store(p_da + T.to(tl.int64) * B * 4 * H + o_tile, b_da_ih.to(p_da.dtype.element_ty), mask=m_tile)
    else:
        b_sum_dz_ih = tl.zeros([4 * BH], dtype=ACC)
        b_sum_dz_hh = tl.zeros([4 * BH], dtype=ACC)
        b_da_hh = b_dz
    b_da_hh = b_da_hh.to(p_da.dtype.element_ty)
    if PHASE == 0 or PHASE == 3:
        tl.store(p_da + o_tile, b_da_hh, mask=m_tile)
    return (b_da_hh, tl.where(m_run, b_dc * b_f, b_dc_state), b_sum_dz_ih, b_sum_dz_hh, tl.sum(b_dz, axis=0),
            b_sum_dy_c, tl.sum(b_dy, axis=0))


@triton.jit
def store_sums(p_dparams, i_h, b_dgamma_ih, b_dgamma_hh, b_dbias, b_dgamma_c, b_dbeta_c, ACCUMULATE: tl.constexpr,
               H: tl.constexpr, FRAME: tl.constexpr, HAS_BIAS: tl.constexpr, BH: tl.constexpr):
    """Write (or with ``ACCUMULATE`` add) column block i_h's parameter-gradient sums to a [14H] row
    d(affine) [10H] | dbias [4H] at ``p_dparams``: only the program owning the block touches its columns
    (deterministic, no atomics)."""
    o_g, m_g, _ = gate_columns(i_h, H, BH)
    o_h, m_h = hidden_units(i_h, H, BH)
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


@triton.heuristics({**FORWARD_FLAGS, **RECURRENT_FLAG})
@triton.jit(do_not_specialize=["t", "B"])
def bnlstm_fwd_step_kernel(
    p_x_gates, p_w_hh, p_bias, p_affine, p_pop, p_steps, p_lengths, p_h, p_r, p_c, p_out, p_a_hh, p_stats,
    t, eps, B, H: tl.constexpr, P: tl.constexpr,
    FRAME: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, RECURRENT: tl.constexpr,
    PRECISION: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
):
    """One time step t for column block i_h: W_hh r_{t-1} on its tile, then ``forward_block``.

    ``p_r`` [., B, P]: the recurrent state, ``p_h`` itself (P = H) or with a projection the projected one
    (laid out as ``p_h``). ``p_steps`` [T, 2] (int32, frame only): the rows running at each step, and whether
    the step normalizes with their batch moments (1) or the population's (0). Without ``p_w_hh``
    (``RECURRENT`` off: synchronized statistics, where the host forms W_hh r_{t-1} to sum its moments over
    the process group) the step's a_hh is read from ``p_a_hh`` instead of computed.
    """
    i_h = tl.program_id(0).to(tl.int64)
    t = t.to(tl.int64)
    o_b, m_b, m_run = _running_rows(p_lengths, 0, B, t, BB)
    o_g, m_g, _ = gate_columns(i_h, H, BH)
    o_h, m_h = hidden_units(i_h, H, BH)
    o_s, m_s = o_b[:, None] * H + o_h[None, :], m_b[:, None] & m_h[None, :]
    o_prev = state_offset(t, B, H, SAVE)
    if RECURRENT:
        b_a_hh = recurrent_dot(p_r + state_offset(t, B, P, SAVE), p_w_hh, o_b, m_b, o_g, m_g, P, 1, P, PRECISION,
                               BB, 4 * BH, p_c.dtype.element_ty, "")
    else:
        # [BB, 4*BH] of the host's a_hh [T, B, 4H]
        b_a_hh = tl.load(p_a_hh + t * B * 4 * H + o_b[:, None] * 4 * H + o_g[None, :],
                         mask=m_b[:, None] & m_g[None, :], other=0.0)
    b_h_prev, b_c_prev = load_states(p_h + o_prev, p_c + o_prev, o_s, m_s)
    b_h, b_c = forward_block(b_a_hh, b_h_prev, b_c_prev, t, i_h, o_b, m_b, m_run, p_x_gates, p_bias, p_affine, p_pop,
                             p_steps, p_out, p_a_hh, p_stats, eps, B, H, FRAME, True, HAS_BIAS, SAVE, BB, BH)
    o_next = state_offset(t + 1, B, H, SAVE)
    store_states(p_h + o_next, p_c + o_next, o_s, m_s, b_h, b_c)


@triton.heuristics({"FOLDED": _passed("p_fold"), "HAS_BIAS": _passed("p_bias")})
@triton.jit(do_not_specialize=["t", "B"])
def bnlstm_infer_step_kernel(
    p_x_gates, p_w_hh, p_bias, p_fold, p_lengths, p_h, p_r, p_c, p_out,
    t, B, H: tl.constexpr, P: tl.constexpr,
    FOLDED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr,
):
    """One step t that normalizes with no batch statistics and saves nothing (eval, inference).

    No reduction couples the rows, so programs tile the batch as well: program (i_h, i_b) owns hidden
    units [i_h * BH, (i_h + 1) * BH) of rows [i_b * BB, (i_b + 1) * BB). Frame-wise (``FOLDED``) both
    normalizations, gamma and the bias are the step's per-column affine maps from ``p_fold`` [T, 14H]:
    z = s_ih * a_ih + s_hh * a_hh + shift, y = s_c * c + shift_c. Otherwise the input branch is finished
    and z = a_hh + u (+ bias). States live in two slots [2, B, H]; the recurrent dot reads ``p_r`` [2, B, P]
    (``p_h`` itself, P = H, or the projected state, as in ``bnlstm_fwd_step_kernel``).
    """
    i_h = tl.program_id(0).to(tl.int64)
    t = t.to(tl.int64)
    o_b, m_b, m_run = _running_rows(p_lengths, tl.program_id(1).to(tl.int64) * BB, B, t, BB)
    o_g, m_g, o_gate = gate_columns(i_h, H, BH)
    o_h, m_h = hidden_units(i_h, H, BH)
    o_s, m_s = o_b[:, None] * H + o_h[None, :], m_b[:, None] & m_h[None, :]
    o_prev = state_offset(t, B, H, False)
    b_x = tl.load(p_x_gates + t * B * 4 * H + o_b[:, None] * 4 * H + o_g[None, :], mask=m_b[:, None] & m_g[None, :],
                  other=0.0).to(p_c.dtype.element_ty)
    b_a_hh = recurrent_dot(p_r + state_offset(t, B, P, False), p_w_hh, o_b, m_b, o_g, m_g, P, 1, P, PRECISION, BB,
                           4 * BH, b_x.dtype, "")
    if FOLDED:
        p_fold_t = p_fold + t * 14 * H
        b_z = (_load_vector(p_fold_t, o_g, m_g, b_x.dtype) * b_x
               + _load_vector(p_fold_t + 4 * H, o_g, m_g, b_x.dtype) * b_a_hh
               + _load_vector(p_fold_t + 8 * H, o_g, m_g, b_x.dtype))
    else:
        b_z = b_a_hh + b_x
    if HAS_BIAS:
        b_z += _load_vector(p_bias, o_g, m_g, b_z.dtype)
    b_h_prev, b_c_prev = load_states(p_h + o_prev, p_c + o_prev, o_s, m_s)
    b_o, b_c = _cell(b_z, o_gate, b_c_prev, BB, BH)
    if FOLDED:
        b_y = (_load_vector(p_fold_t + 12 * H, o_h, m_h, b_c.dtype) * b_c
               + _load_vector(p_fold_t + 13 * H, o_h, m_h, b_c.dtype))
    else:
        b_y = b_c
    b_h, b_c = _emit(b_o, b_y, b_h_prev, b_c, b_c_prev, m_run, p_out + t * B * H, o_s, m_s)
    o_next = state_offset(t + 1, B, H, False)
    store_states(p_h + o_next, p_c + o_next, o_s, m_s, b_h, b_c)


@triton.heuristics({**BACKWARD_FLAGS, **RECURRENT_FLAG})
@triton.jit(do_not_specialize=["t", "T", "B"])
def bnlstm_bwd_step_kernel(
    p_x_gates, p_w_hh, p_bias, p_affine, p_stats, p_steps, p_lengths, p_c, p_a_hh, p_dout, p_dstate, p_da,
    p_dparams, t, T, eps, B, H: tl.constexpr,
    FRAME: tl.constexpr, HAS_BIAS: tl.constexpr, RECURRENT: tl.constexpr, PHASE: tl.constexpr,
    PRECISION: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
):
    """Step t in reverse for column block i_h: the h-state gradient, then ``backward_block``.

    ``p_dstate`` [2, B, H] holds the gradients of the h and c states after step t + 1 on entry and after
    step t on exit, each program touching only its columns. The h-state gradient of rows still running at
    t + 1 comes from that step's da_hh [B, 4H] (written by the previous launch) times W_hh. With a projection
    (``p_w_hh`` None, ``RECURRENT`` off) the host has formed the whole h gradient in ``p_dout`` (through
    r_t = W_hr h_t, whose width the recurrent GEMM runs on) and keeps the h-state gradient at zero. Parameter
    gradients go to the step's row of ``p_dparams``, each program writing its own columns: deterministic,
    no atomics.

    Synchronized statistics run a step with batch statistics in three launches (``PHASE`` 1, 2, 3; 0 is one
    launch, not synchronized), the host all-reducing this rank's sums between them: phase 1 stores the
    h-state gradient (which phases 2 and 3 read instead of forming it again) and BN(c)'s sums, phase 2 the
    gates' sums, both in the step's ``p_dparams`` row; phase 3 reads the group's sums from row T of
    ``p_dparams`` [T + 1, 14H] and finishes the step. Parameter gradients stay this rank's own sums.
    """
    i_h = tl.program_id(0).to(tl.int64)
    t = t.to(tl.int64)
    o_b, m_b, m_run = _running_rows(p_lengths, 0, B, t, BB)
    o_h, m_h = hidden_units(i_h, H, BH)
    o_s, m_s = o_b[:, None] * H + o_h[None, :], m_b[:, None] & m_h[None, :]
    b_dh, b_dc = load_states(p_dstate, p_dstate + B * H, o_s, m_s)
    if RECURRENT and PHASE <= 1:
        if t + 1 < T:
            # [BB, BH] da_hh_{t+1} W_hh[:, block], over the 4H gate columns
            b_da_w = recurrent_dot(p_da + (t + 1) * B * 4 * H, p_w_hh, o_b, m_b, o_h, m_h, 4 * H, H, 1, PRECISION,
                                   BB, BH, b_dh.dtype, "")
            _, _, m_next = _running_rows(p_lengths, 0, B, t + 1, BB)
            b_dh = tl.where(m_next, b_da_w, b_dh)
    if PHASE == 1:
        tl.store(p_dstate + o_s, b_dh, mask=m_s)
    b_dout = tl.load(p_dout + t * B * H + o_s, mask=m_s, other=0.0).to(b_dh.dtype)
    # the group's sums, which phases 2 and 3 read (p_dparams may be None where nothing is synchronized)
    p_sums = p_da
    if PHASE != 0:
        p_sums = p_dparams + T * 14 * H
    _, b_dc, b_ih, b_hh, b_b, b_gc, b_bc = _backward_tile(
        tl.where(m_run, b_dh + b_dout, 0.0), b_dc, tl.load(p_c + (t + 1) * B * H + o_s, mask=m_s, other=0.0),
        tl.load(p_c + t * B * H + o_s, mask=m_s, other=0.0), t, T, i_h, o_b, m_run, p_x_gates, p_bias, p_affine,
        p_stats, p_steps, p_a_hh, p_sums, p_da, eps, B, H, FRAME, HAS_BIAS, PHASE, BB, BH)
    if PHASE == 0 or PHASE == 3:
        store_states(p_dstate, p_dstate + B * H, o_s, m_s, b_dh, b_dc)
    if FRAME or HAS_BIAS:
        # (synchronized, phase 2 keeps sum dz in the bias columns whether the layer has a bias or not)
        store_sums(p_dparams + t * 14 * H, i_h, b_ih, b_hh, b_b, b_gc, b_bc, False, H, FRAME, HAS_BIAS or PHASE == 2,
                   BH)


@triton.jit
def _rows(p_v, o_r, o_f, m_rf, F, dtype):
    """[BR, BF] rows o_r, columns o_f of a [T*B, F] buffer (zero outside m_rf), in ``dtype``."""
    return tl.load(p_v + o_r[:, None] * F + o_f[None, :], mask=m_rf, other=0.0).to(dtype)


@triton.jit
def _frame_rows(i_r, p_lengths, T, B, BR: tl.constexpr):
    """Block i_r of the [T*B] frame axis: row offsets (int64), in range, and valid (t < length)."""
    o_r = i_r * BR + tl.arange(0, BR).to(tl.int64)
    m_r = o_r < T * B
    return o_r, m_r, m_r & (tl.load(p_lengths + o_r % B, mask=m_r, other=0) > o_r // B)


@triton.jit(do_not_specialize=["n", "use_batch", "T", "B"])
def sequence_bn_fwd_kernel(
    p_a, p_u, p_gamma, p_pop, p_lengths, p_stats,
    n, use_batch, eps, T, B, F,
    BR: tl.constexpr, BF: tl.constexpr,
):
    """u = gamma * BN(a) for a [T*B, F] with one set of statistics over every valid frame (t < length).

    ``p_pop`` / ``p_stats`` [2, F]: the population's means and variances, and the ones used (stored).
    """
    i_f = tl.program_id(0).to(tl.int64)
    o_f = i_f * BF + tl.arange(0, BF)
    m_f = o_f < F
    n_f = tl.maximum(n, 1).to(p_stats.dtype.element_ty)
    # [BF] two passes over the frames: the mean, then the centred sum of squares
    b_sum = tl.zeros([BF], dtype=p_stats.dtype.element_ty)
    i_r = 0
    while i_r * BR < T * B:
        o_r, _, m_valid = _frame_rows(i_r, p_lengths, T, B, BR)
        b_sum += tl.sum(_rows(p_a, o_r, o_f, m_valid[:, None] & m_f[None, :], F, b_sum.dtype), axis=0)
        i_r += 1
    b_mean = b_sum / n_f
    b_sq = tl.zeros([BF], dtype=b_sum.dtype)
    i_r = 0
    while i_r * BR < T * B:
        o_r, _, m_valid = _frame_rows(i_r, p_lengths, T, B, BR)
        m_rf = m_valid[:, None] & m_f[None, :]
        b_dev = tl.where(m_rf, _rows(p_a, o_r, o_f, m_rf, F, b_sum.dtype) - b_mean[None, :], 0.0)
        b_sq += tl.sum(b_dev * b_dev, axis=0)
        i_r += 1
    b_var = b_sq / n_f
    b_mean = tl.where(use_batch != 0, b_mean, tl.load(p_pop + o_f, mask=m_f, other=0.0).to(b_sum.dtype))
    b_var = tl.where(use_batch != 0, b_var, tl.load(p_pop + F + o_f, mask=m_f, other=1.0).to(b_sum.dtype))
    tl.store(p_stats + o_f, b_mean, mask=m_f)
    tl.store(p_stats + F + o_f, b_var, mask=m_f)
    b_scale = tl.load(p_gamma + o_f, mask=m_f, other=0.0).to(b_sum.dtype) / tl.sqrt(b_var + eps)
    i_r = 0
    while i_r * BR < T * B:
        o_r, m_r, _ = _frame_rows(i_r, p_lengths, T, B, BR)
        m_rf = m_r[:, None] & m_f[None, :]
        b_u = (_rows(p_a, o_r, o_f, m_rf, F, b_sum.dtype) - b_mean[None, :]) * b_scale[None, :]
        tl.store(p_u + o_r[:, None] * F + o_f[None, :], b_u.to(p_u.dtype.element_ty), mask=m_rf)
        i_r += 1


@triton.jit(do_not_specialize=["n", "use_batch", "T", "B"])
def sequence_bn_bwd_kernel(
    p_a, p_du, p_da, p_gamma, p_stats, p_lengths, p_dgamma,
    n, use_batch, eps, T, B, F,
    BR: tl.constexpr, BF: tl.constexpr,
):
    """da and dgamma of u = gamma * BN(a) over the valid frames, from du [T*B, F] (zero on padding)."""
    i_f = tl.program_id(0).to(tl.int64)
    o_f = i_f * BF + tl.arange(0, BF)
    m_f = o_f < F
    n_f = tl.maximum(n, 1).to(p_stats.dtype.element_ty)
    b_mean = tl.load(p_stats + o_f, mask=m_f, other=0.0)
    b_rstd = 1.0 / tl.sqrt(tl.load(p_stats + F + o_f, mask=m_f, other=1.0) + eps)
    b_gamma = tl.load(p_gamma + o_f, mask=m_f, other=0.0).to(b_mean.dtype)
    # [BF] sums over the valid frames of du and du * xhat
    b_sum_du = tl.zeros([BF], dtype=b_mean.dtype)
    b_sum_dux = tl.zeros([BF], dtype=b_mean.dtype)
    i_r = 0
    while i_r * BR < T * B:
        o_r, _, m_valid = _frame_rows(i_r, p_lengths, T, B, BR)
        m_rf = m_valid[:, None] & m_f[None, :]
        b_xhat = (_rows(p_a, o_r, o_f, m_rf, F, b_mean.dtype) - b_mean[None, :]) * b_rstd[None, :]
        b_du = _rows(p_du, o_r, o_f, m_rf, F, b_mean.dtype)
        b_sum_du += tl.sum(b_du, axis=0)
        b_sum_dux += tl.sum(tl.where(m_rf, b_du * b_xhat, 0.0), axis=0)
        i_r += 1
    tl.store(p_dgamma + o_f, b_sum_dux, mask=m_f)
    b_mean_d = tl.where(use_batch != 0, b_gamma * b_sum_du / n_f, 0.0)
    b_mean_dx = tl.where(use_batch != 0, b_gamma * b_sum_dux / n_f, 0.0)
    i_r = 0
    while i_r * BR < T * B:
        o_r, m_r, m_valid = _frame_rows(i_r, p_lengths, T, B, BR)
        m_rf = m_valid[:, None] & m_f[None, :]
        b_xhat = (_rows(p_a, o_r, o_f, m_rf, F, b_mean.dtype) - b_mean[None, :]) * b_rstd[None, :]
        b_dxhat = b_gamma[None, :] * _rows(p_du, o_r, o_f, m_rf, F, b_mean.dtype)
        b_da = tl.where(m_rf, b_rstd[None, :] * (b_dxhat - b_mean_d[None, :] - b_xhat * b_mean_dx[None, :]), 0.0)
        tl.store(p_da + o_r[:, None] * F + o_f[None, :], b_da.to(p_da.dtype.element_ty),
                 mask=m_r[:, None] & m_f[None, :])
        i_r += 1
