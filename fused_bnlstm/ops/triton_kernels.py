"""Triton kernels of the fused BN-LSTM layer (launched from ``fused_triton.py``, which documents the buffers).

Every kernel is time-major and one layer-direction. A step kernel owns a block of BH hidden units j for
all four gates (columns j, H + j, 2H + j, 3H + j of the gate axis) and **all** batch rows, so every batch
norm reduction over the rows stays inside the program. Statistics and accumulation are in ``ACC``
(float32, or float64 for float64 tensors); stores go out in each buffer's dtype. The BN backward used here
is derived in ``README.md`` beside this file.

Buffers (C-contiguous; "state" buffers hold the state *after* each step, index 0 the initial one):

    x_gates  [T, B, 4H]   frame: W_ih x_t (raw); otherwise the finished input branch u_t
    w_hh     [4H, H]      h     [T+1, B, H] (input dtype)     c [T+1, B, H] (ACC)
    a_hh     [T, B, 4H]   W_hh h_{t-1}, saved for backward (ACC)
    mean_*, var_* [T, 4H] / [T, H]   the moments each step normalized with (ACC)
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _moments(b_v, m_run2, n, use_batch, p_pop_mean, p_pop_var, o_col, m_col):
    """Per-column mean and biased variance of b_v [BB, BH] over the running rows, or the population's."""
    n_f = tl.maximum(n, 1).to(b_v.dtype)
    b_mean = tl.sum(tl.where(m_run2, b_v, 0.0), axis=0) / n_f  # [BH]
    b_dev = tl.where(m_run2, b_v - b_mean[None, :], 0.0)  # [BB, BH]
    b_var = tl.sum(b_dev * b_dev, axis=0) / n_f  # [BH]
    b_pop_mean = tl.load(p_pop_mean + o_col, mask=m_col, other=0.0).to(b_v.dtype)
    b_pop_var = tl.load(p_pop_var + o_col, mask=m_col, other=1.0).to(b_v.dtype)
    b_mean = tl.where(use_batch != 0, b_mean, b_pop_mean)
    b_var = tl.where(use_batch != 0, b_var, b_pop_var)
    return b_mean, b_var


@triton.jit
def _bn_backward(b_dxhat, b_xhat, b_rstd, m_run2, n, use_batch):
    """d(input) of xhat = (v - mean) * rstd given d(xhat) [BB, BH]; batch moments couple the running rows."""
    n_f = tl.maximum(n, 1).to(b_dxhat.dtype)
    b_dxhat = tl.where(m_run2, b_dxhat, 0.0)
    # [BH] means over the running rows of dxhat and dxhat * xhat
    b_mean_d = tl.sum(b_dxhat, axis=0) / n_f
    b_mean_dx = tl.sum(b_dxhat * b_xhat, axis=0) / n_f
    b_batch = b_rstd[None, :] * (b_dxhat - b_mean_d[None, :] - b_xhat * b_mean_dx[None, :])
    b_pop = b_rstd[None, :] * b_dxhat
    return tl.where(m_run2, tl.where(use_batch != 0, b_batch, b_pop), 0.0)


@triton.jit
def _bn_gate_fwd(b_a_hh, b_a_ih, k, t, m_run2, n, use_batch, eps, H, o_h, m_h, p_gamma_ih, p_gamma_hh,
                 p_pop_mean_ih, p_pop_var_ih, p_pop_mean_hh, p_pop_var_hh, p_mean_ih, p_var_ih, p_mean_hh, p_var_hh):
    """Gate k's gamma_hh * BN(a_hh) + gamma_ih * BN(a_ih) [BB, BH]; stores the moments it used at step t."""
    # [BH] offsets of gate k's columns in a [T, 4H] statistics row
    o_m = t * 4 * H + k * H + o_h
    b_mean, b_var = _moments(b_a_hh, m_run2, n, use_batch, p_pop_mean_hh + t * 4 * H + k * H,
                             p_pop_var_hh + t * 4 * H + k * H, o_h, m_h)
    tl.store(p_mean_hh + o_m, b_mean, mask=m_h)
    tl.store(p_var_hh + o_m, b_var, mask=m_h)
    b_gamma = tl.load(p_gamma_hh + k * H + o_h, mask=m_h, other=0.0).to(b_a_hh.dtype)
    b_gate = (b_gamma / tl.sqrt(b_var + eps))[None, :] * (b_a_hh - b_mean[None, :])
    b_mean, b_var = _moments(b_a_ih, m_run2, n, use_batch, p_pop_mean_ih + t * 4 * H + k * H,
                             p_pop_var_ih + t * 4 * H + k * H, o_h, m_h)
    tl.store(p_mean_ih + o_m, b_mean, mask=m_h)
    tl.store(p_var_ih + o_m, b_var, mask=m_h)
    b_gamma = tl.load(p_gamma_ih + k * H + o_h, mask=m_h, other=0.0).to(b_a_ih.dtype)
    return b_gate + (b_gamma / tl.sqrt(b_var + eps))[None, :] * (b_a_ih - b_mean[None, :])


@triton.jit
def _xhat(b_v, p_mean, p_var, o_m, m_h, eps):
    """(v - mean) * rstd [BB, BH] and rstd [BH] with the saved moments at offsets o_m."""
    b_rstd = 1.0 / tl.sqrt(tl.load(p_var + o_m, mask=m_h, other=1.0) + eps)
    return (b_v - tl.load(p_mean + o_m, mask=m_h, other=0.0)[None, :]) * b_rstd[None, :], b_rstd


@triton.jit
def _gate_pre(p_a_hh, p_x_gates, o_g, m_bh, k, t, eps, H, o_h, m_h, p_bias, p_gamma_ih, p_gamma_hh,
              p_mean_ih, p_var_ih, p_mean_hh, p_var_hh, FRAME: tl.constexpr, HAS_BIAS: tl.constexpr,
              ACC: tl.constexpr):
    """Gate k's pre-activation [BB, BH] at step t, recomputed from the saved a_hh, input branch and moments."""
    b_a_hh = tl.load(p_a_hh + o_g + k * H, mask=m_bh, other=0.0)
    b_a_ih = tl.load(p_x_gates + o_g + k * H, mask=m_bh, other=0.0).to(ACC)
    if FRAME:
        o_m = t * 4 * H + k * H + o_h
        b_xhat_hh, b_rstd_hh = _xhat(b_a_hh, p_mean_hh, p_var_hh, o_m, m_h, eps)
        b_xhat_ih, b_rstd_ih = _xhat(b_a_ih, p_mean_ih, p_var_ih, o_m, m_h, eps)
        b_pre = (tl.load(p_gamma_hh + k * H + o_h, mask=m_h, other=0.0).to(ACC)[None, :] * b_xhat_hh
                 + tl.load(p_gamma_ih + k * H + o_h, mask=m_h, other=0.0).to(ACC)[None, :] * b_xhat_ih)
    else:
        b_pre = b_a_hh + b_a_ih
    if HAS_BIAS:
        b_pre += tl.load(p_bias + k * H + o_h, mask=m_h, other=0.0).to(ACC)[None, :]
    return b_pre


@triton.jit
def _gate_bwd(b_dgate, p_a_hh, p_x_gates, o_g, m_bh, m_run2, n, use_batch, k, t, eps, H, o_h, m_h,
              p_gamma_ih, p_gamma_hh, p_mean_ih, p_var_ih, p_mean_hh, p_var_hh,
              p_da_hh, p_da_ih, p_dgamma_ih, p_dgamma_hh, p_dbias,
              FRAME: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """From gate k's d(pre-activation) [BB, BH]: da_hh, da_ih at step t and the parameter partial sums."""
    # [BH] this program's columns of gate k in the [4H] parameter vectors
    o_p = k * H + o_h
    if HAS_BIAS:
        tl.store(p_dbias + o_p, tl.load(p_dbias + o_p, mask=m_h, other=0.0) + tl.sum(b_dgate, axis=0), mask=m_h)
    if FRAME:
        o_m = t * 4 * H + o_p
        b_xhat, b_rstd = _xhat(tl.load(p_a_hh + o_g + k * H, mask=m_bh, other=0.0), p_mean_hh, p_var_hh, o_m, m_h,
                               eps)
        tl.store(p_dgamma_hh + o_p,
                 tl.load(p_dgamma_hh + o_p, mask=m_h, other=0.0) + tl.sum(b_dgate * b_xhat, axis=0), mask=m_h)
        b_gamma = tl.load(p_gamma_hh + o_p, mask=m_h, other=0.0).to(ACC)
        b_da_hh = _bn_backward(b_dgate * b_gamma[None, :], b_xhat, b_rstd, m_run2, n, use_batch)
        b_xhat, b_rstd = _xhat(tl.load(p_x_gates + o_g + k * H, mask=m_bh, other=0.0).to(ACC), p_mean_ih, p_var_ih,
                               o_m, m_h, eps)
        tl.store(p_dgamma_ih + o_p,
                 tl.load(p_dgamma_ih + o_p, mask=m_h, other=0.0) + tl.sum(b_dgate * b_xhat, axis=0), mask=m_h)
        b_gamma = tl.load(p_gamma_ih + o_p, mask=m_h, other=0.0).to(ACC)
        b_da_ih = _bn_backward(b_dgate * b_gamma[None, :], b_xhat, b_rstd, m_run2, n, use_batch)
    else:
        b_da_hh = b_dgate
        b_da_ih = b_dgate
    tl.store(p_da_hh + o_g + k * H, b_da_hh.to(p_da_hh.dtype.element_ty), mask=m_bh)
    tl.store(p_da_ih + o_g + k * H, b_da_ih.to(p_da_ih.dtype.element_ty), mask=m_bh)


@triton.jit(do_not_specialize=["t", "n", "use_batch", "B"])
def bnlstm_fwd_step_kernel(
    p_x_gates, p_w_hh, p_bias, p_gamma_ih, p_gamma_hh, p_gamma_c, p_beta_c,
    p_pop_mean_ih, p_pop_var_ih, p_pop_mean_hh, p_pop_var_hh, p_pop_mean_c, p_pop_var_c,
    p_lengths, p_h, p_c, p_out, p_a_hh,
    p_mean_ih, p_var_ih, p_mean_hh, p_var_hh, p_mean_c, p_var_c,
    t, n, use_batch, eps, B, H: tl.constexpr,
    FRAME: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
):
    """One time step t for hidden units [i_h * BH, (i_h + 1) * BH): gates, cell, BN(c), h."""
    i_h = tl.program_id(0).to(tl.int64)
    t = t.to(tl.int64)
    o_b = tl.arange(0, BB)
    o_h = i_h * BH + tl.arange(0, BH)
    m_b = o_b < B
    m_h = o_h < H
    b_len = tl.load(p_lengths + o_b, mask=m_b, other=0)
    # [BB, 1] rows still running at step t; [BB, BH] valid tile
    m_run2 = (m_b & (b_len > t))[:, None]
    m_bh = m_b[:, None] & m_h[None, :]

    # [BB, BH] per gate: a_hh = h_{t-1} W_hh^T for this program's columns of each gate
    b_a_i = tl.zeros([BB, BH], dtype=ACC)
    b_a_f = tl.zeros([BB, BH], dtype=ACC)
    b_a_g = tl.zeros([BB, BH], dtype=ACC)
    b_a_o = tl.zeros([BB, BH], dtype=ACC)
    p_h_prev = p_h + t * B * H
    for i_k in range(0, H, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < H
        # [BB, BK] h_{t-1}; [BK, BH] W_hh^T of gate i (the other gates sit H * H further each)
        b_hk = tl.load(p_h_prev + o_b[:, None] * H + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0)
        p_w = p_w_hh + o_h[None, :] * H + o_k[:, None]
        m_w = m_k[:, None] & m_h[None, :]
        b_a_i += tl.dot(b_hk, tl.load(p_w, mask=m_w, other=0.0), input_precision=PRECISION, out_dtype=ACC)
        b_a_f += tl.dot(b_hk, tl.load(p_w + H * H, mask=m_w, other=0.0), input_precision=PRECISION, out_dtype=ACC)
        b_a_g += tl.dot(b_hk, tl.load(p_w + 2 * H * H, mask=m_w, other=0.0), input_precision=PRECISION,
                        out_dtype=ACC)
        b_a_o += tl.dot(b_hk, tl.load(p_w + 3 * H * H, mask=m_w, other=0.0), input_precision=PRECISION,
                        out_dtype=ACC)

    # [BB, BH] offsets of gate i in a [B, 4H] row block at step t
    o_g = t * B * 4 * H + o_b[:, None] * 4 * H + o_h[None, :]
    tl.store(p_a_hh + o_g, b_a_i, mask=m_bh)
    tl.store(p_a_hh + o_g + H, b_a_f, mask=m_bh)
    tl.store(p_a_hh + o_g + 2 * H, b_a_g, mask=m_bh)
    tl.store(p_a_hh + o_g + 3 * H, b_a_o, mask=m_bh)
    b_x_i = tl.load(p_x_gates + o_g, mask=m_bh, other=0.0).to(ACC)
    b_x_f = tl.load(p_x_gates + o_g + H, mask=m_bh, other=0.0).to(ACC)
    b_x_g = tl.load(p_x_gates + o_g + 2 * H, mask=m_bh, other=0.0).to(ACC)
    b_x_o = tl.load(p_x_gates + o_g + 3 * H, mask=m_bh, other=0.0).to(ACC)

    if FRAME:
        # gates = gamma_hh * BN(a_hh) + gamma_ih * BN(a_ih); each step's moments are saved
        b_pre_i = _bn_gate_fwd(b_a_i, b_x_i, 0, t, m_run2, n, use_batch, eps, H, o_h, m_h, p_gamma_ih, p_gamma_hh,
                               p_pop_mean_ih, p_pop_var_ih, p_pop_mean_hh, p_pop_var_hh,
                               p_mean_ih, p_var_ih, p_mean_hh, p_var_hh)
        b_pre_f = _bn_gate_fwd(b_a_f, b_x_f, 1, t, m_run2, n, use_batch, eps, H, o_h, m_h, p_gamma_ih, p_gamma_hh,
                               p_pop_mean_ih, p_pop_var_ih, p_pop_mean_hh, p_pop_var_hh,
                               p_mean_ih, p_var_ih, p_mean_hh, p_var_hh)
        b_pre_g = _bn_gate_fwd(b_a_g, b_x_g, 2, t, m_run2, n, use_batch, eps, H, o_h, m_h, p_gamma_ih, p_gamma_hh,
                               p_pop_mean_ih, p_pop_var_ih, p_pop_mean_hh, p_pop_var_hh,
                               p_mean_ih, p_var_ih, p_mean_hh, p_var_hh)
        b_pre_o = _bn_gate_fwd(b_a_o, b_x_o, 3, t, m_run2, n, use_batch, eps, H, o_h, m_h, p_gamma_ih, p_gamma_hh,
                               p_pop_mean_ih, p_pop_var_ih, p_pop_mean_hh, p_pop_var_hh,
                               p_mean_ih, p_var_ih, p_mean_hh, p_var_hh)
    else:
        b_pre_i = b_a_i + b_x_i
        b_pre_f = b_a_f + b_x_f
        b_pre_g = b_a_g + b_x_g
        b_pre_o = b_a_o + b_x_o
    if HAS_BIAS:
        b_pre_i += tl.load(p_bias + o_h, mask=m_h, other=0.0).to(ACC)[None, :]
        b_pre_f += tl.load(p_bias + H + o_h, mask=m_h, other=0.0).to(ACC)[None, :]
        b_pre_g += tl.load(p_bias + 2 * H + o_h, mask=m_h, other=0.0).to(ACC)[None, :]
        b_pre_o += tl.load(p_bias + 3 * H + o_h, mask=m_h, other=0.0).to(ACC)[None, :]

    # [BB, BH] gate activations and the cell update
    b_i = tl.sigmoid(b_pre_i)
    b_f = tl.sigmoid(b_pre_f)
    b_g = 2.0 * tl.sigmoid(2.0 * b_pre_g) - 1.0
    b_o = tl.sigmoid(b_pre_o)
    o_s = t * B * H + o_b[:, None] * H + o_h[None, :]
    b_c_prev = tl.load(p_c + o_s, mask=m_bh, other=0.0)
    b_c = b_f * b_c_prev + b_i * b_g
    if FRAME:
        b_mean, b_var = _moments(b_c, m_run2, n, use_batch, p_pop_mean_c + t * H, p_pop_var_c + t * H, o_h, m_h)
        tl.store(p_mean_c + t * H + o_h, b_mean, mask=m_h)
        tl.store(p_var_c + t * H + o_h, b_var, mask=m_h)
        b_gamma = tl.load(p_gamma_c + o_h, mask=m_h, other=0.0).to(ACC)
        b_beta = tl.load(p_beta_c + o_h, mask=m_h, other=0.0).to(ACC)
        b_y = b_gamma[None, :] * (b_c - b_mean[None, :]) / tl.sqrt(b_var[None, :] + eps) + b_beta[None, :]
    else:
        b_y = b_c
    b_h = b_o * (2.0 * tl.sigmoid(2.0 * b_y) - 1.0)

    # finished rows keep their state and output zeros
    b_h_prev = tl.load(p_h + o_s, mask=m_bh, other=0.0)
    tl.store(p_h + o_s + B * H, tl.where(m_run2, b_h.to(b_h_prev.dtype), b_h_prev), mask=m_bh)
    tl.store(p_c + o_s + B * H, tl.where(m_run2, b_c, b_c_prev), mask=m_bh)
    tl.store(p_out + o_s, tl.where(m_run2, b_h, 0.0).to(p_out.dtype.element_ty), mask=m_bh)


@triton.jit(do_not_specialize=["t", "T", "n", "use_batch", "B"])
def bnlstm_bwd_step_kernel(
    p_x_gates, p_w_hh, p_bias, p_gamma_ih, p_gamma_hh, p_gamma_c, p_beta_c,
    p_mean_ih, p_var_ih, p_mean_hh, p_var_hh, p_mean_c, p_var_c,
    p_lengths, p_c, p_a_hh, p_dout, p_dh, p_dc, p_da_hh, p_da_ih,
    p_dgamma_ih, p_dgamma_hh, p_dbias, p_dgamma_c, p_dbeta_c,
    t, T, n, use_batch, eps, B, H: tl.constexpr,
    FRAME: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
):
    """Step t in reverse for hidden units [i_h * BH, (i_h + 1) * BH): dgates, BN backward, dc_{t-1}.

    ``p_dh`` / ``p_dc`` [B, H] (ACC) hold the gradient of the h / c state after step t + 1 on entry and
    after step t on exit, each program touching only its columns. The h-state gradient of rows still
    running at t + 1 comes from that step's da_hh [B, 4H] (written by the previous launch) times W_hh.
    Parameter gradients accumulate into the program's own columns: deterministic, no atomics.
    """
    i_h = tl.program_id(0).to(tl.int64)
    t = t.to(tl.int64)
    o_b = tl.arange(0, BB)
    o_h = i_h * BH + tl.arange(0, BH)
    m_b = o_b < B
    m_h = o_h < H
    b_len = tl.load(p_lengths + o_b, mask=m_b, other=0)
    m_run2 = (m_b & (b_len > t))[:, None]
    m_next2 = (m_b & (b_len > t + 1))[:, None]
    m_bh = m_b[:, None] & m_h[None, :]
    o_s = o_b[:, None] * H + o_h[None, :]

    # [BB, BH] gradient of the h state after step t
    b_dh = tl.load(p_dh + o_s, mask=m_bh, other=0.0)
    if t + 1 < T:
        b_acc = tl.zeros([BB, BH], dtype=ACC)
        p_da_next = p_da_hh + (t + 1) * B * 4 * H
        for i_k in range(0, 4 * H, BK):
            o_k = i_k + tl.arange(0, BK)
            m_k = o_k < 4 * H
            # [BB, BK] da_hh_{t+1}; [BK, BH] W_hh
            b_da = tl.load(p_da_next + o_b[:, None] * 4 * H + o_k[None, :], mask=m_b[:, None] & m_k[None, :],
                           other=0.0)
            b_w = tl.load(p_w_hh + o_k[:, None] * H + o_h[None, :], mask=m_k[:, None] & m_h[None, :], other=0.0)
            b_acc += tl.dot(b_da, b_w, input_precision=PRECISION, out_dtype=ACC)
        b_dh = tl.where(m_next2, b_acc, b_dh)
    tl.store(p_dh + o_s, b_dh, mask=m_bh)
    b_dout = tl.load(p_dout + t * B * H + o_s, mask=m_bh, other=0.0).to(ACC)
    b_dh = tl.where(m_run2, b_dh + b_dout, 0.0)

    # recompute the forward step from what it saved
    o_g = t * B * 4 * H + o_b[:, None] * 4 * H + o_h[None, :]
    b_i = tl.sigmoid(_gate_pre(p_a_hh, p_x_gates, o_g, m_bh, 0, t, eps, H, o_h, m_h, p_bias, p_gamma_ih, p_gamma_hh,
                               p_mean_ih, p_var_ih, p_mean_hh, p_var_hh, FRAME, HAS_BIAS, ACC))
    b_f = tl.sigmoid(_gate_pre(p_a_hh, p_x_gates, o_g, m_bh, 1, t, eps, H, o_h, m_h, p_bias, p_gamma_ih, p_gamma_hh,
                               p_mean_ih, p_var_ih, p_mean_hh, p_var_hh, FRAME, HAS_BIAS, ACC))
    b_g = 2.0 * tl.sigmoid(2.0 * _gate_pre(p_a_hh, p_x_gates, o_g, m_bh, 2, t, eps, H, o_h, m_h, p_bias, p_gamma_ih,
                                           p_gamma_hh, p_mean_ih, p_var_ih, p_mean_hh, p_var_hh, FRAME, HAS_BIAS,
                                           ACC)) - 1.0
    b_o = tl.sigmoid(_gate_pre(p_a_hh, p_x_gates, o_g, m_bh, 3, t, eps, H, o_h, m_h, p_bias, p_gamma_ih, p_gamma_hh,
                               p_mean_ih, p_var_ih, p_mean_hh, p_var_hh, FRAME, HAS_BIAS, ACC))
    b_c_prev = tl.load(p_c + t * B * H + o_s, mask=m_bh, other=0.0)
    b_c = tl.load(p_c + (t + 1) * B * H + o_s, mask=m_bh, other=0.0)
    if FRAME:
        b_xhat_c, b_rstd_c = _xhat(b_c, p_mean_c, p_var_c, t * H + o_h, m_h, eps)
        b_gamma_c = tl.load(p_gamma_c + o_h, mask=m_h, other=0.0).to(ACC)
        b_y = b_gamma_c[None, :] * b_xhat_c + tl.load(p_beta_c + o_h, mask=m_h, other=0.0).to(ACC)[None, :]
    else:
        b_y = b_c
    b_tanh_y = 2.0 * tl.sigmoid(2.0 * b_y) - 1.0

    # [BB, BH] h = o * tanh(y): gradients of o's pre-activation and of y
    b_do = b_dh * b_tanh_y * b_o * (1.0 - b_o)
    b_dy = b_dh * b_o * (1.0 - b_tanh_y * b_tanh_y)
    if FRAME:
        tl.store(p_dgamma_c + o_h, tl.load(p_dgamma_c + o_h, mask=m_h, other=0.0) + tl.sum(b_dy * b_xhat_c, axis=0),
                 mask=m_h)
        tl.store(p_dbeta_c + o_h, tl.load(p_dbeta_c + o_h, mask=m_h, other=0.0) + tl.sum(b_dy, axis=0), mask=m_h)
        b_dc_new = _bn_backward(b_dy * b_gamma_c[None, :], b_xhat_c, b_rstd_c, m_run2, n, use_batch)
    else:
        b_dc_new = b_dy
    b_dc_state = tl.load(p_dc + o_s, mask=m_bh, other=0.0)
    b_dc = tl.where(m_run2, b_dc_new + b_dc_state, 0.0)
    tl.store(p_dc + o_s, tl.where(m_run2, b_dc * b_f, b_dc_state), mask=m_bh)

    # [BB, BH] gradients of the four gate pre-activations (zero on finished rows), then per gate BN backward
    _gate_bwd(b_dc * b_g * b_i * (1.0 - b_i), p_a_hh, p_x_gates, o_g, m_bh, m_run2, n, use_batch, 0, t, eps, H, o_h,
              m_h, p_gamma_ih, p_gamma_hh, p_mean_ih, p_var_ih, p_mean_hh, p_var_hh, p_da_hh, p_da_ih, p_dgamma_ih,
              p_dgamma_hh, p_dbias, FRAME, HAS_BIAS, ACC)
    _gate_bwd(b_dc * b_c_prev * b_f * (1.0 - b_f), p_a_hh, p_x_gates, o_g, m_bh, m_run2, n, use_batch, 1, t, eps, H,
              o_h, m_h, p_gamma_ih, p_gamma_hh, p_mean_ih, p_var_ih, p_mean_hh, p_var_hh, p_da_hh, p_da_ih,
              p_dgamma_ih, p_dgamma_hh, p_dbias, FRAME, HAS_BIAS, ACC)
    _gate_bwd(b_dc * b_i * (1.0 - b_g * b_g), p_a_hh, p_x_gates, o_g, m_bh, m_run2, n, use_batch, 2, t, eps, H, o_h,
              m_h, p_gamma_ih, p_gamma_hh, p_mean_ih, p_var_ih, p_mean_hh, p_var_hh, p_da_hh, p_da_ih, p_dgamma_ih,
              p_dgamma_hh, p_dbias, FRAME, HAS_BIAS, ACC)
    _gate_bwd(b_do, p_a_hh, p_x_gates, o_g, m_bh, m_run2, n, use_batch, 3, t, eps, H, o_h, m_h, p_gamma_ih,
              p_gamma_hh, p_mean_ih, p_var_ih, p_mean_hh, p_var_hh, p_da_hh, p_da_ih, p_dgamma_ih, p_dgamma_hh,
              p_dbias, FRAME, HAS_BIAS, ACC)


@triton.jit(do_not_specialize=["n", "use_batch", "T", "B"])
def sequence_bn_fwd_kernel(
    p_a, p_u, p_gamma, p_pop_mean, p_pop_var, p_lengths, p_mean, p_var,
    n, use_batch, eps, T, B, F,
    ACC: tl.constexpr, BR: tl.constexpr, BF: tl.constexpr,
):
    """u = gamma * BN(a) for a [T*B, F] with one set of statistics over every valid frame (t < length)."""
    i_f = tl.program_id(0).to(tl.int64)
    o_f = i_f * BF + tl.arange(0, BF)
    m_f = o_f < F
    n_f = tl.maximum(n, 1).to(ACC)
    # [BF] two passes over the frames: the mean, then the centred sum of squares
    b_sum = tl.zeros([BF], dtype=ACC)
    i_r = 0
    while i_r * BR < T * B:
        o_r = i_r * BR + tl.arange(0, BR)
        i_r += 1
        m_r = (o_r < T * B) & (tl.load(p_lengths + o_r % B, mask=o_r < T * B, other=0) > o_r // B)
        b_a = tl.load(p_a + o_r[:, None] * F + o_f[None, :], mask=m_r[:, None] & m_f[None, :], other=0.0).to(ACC)
        b_sum += tl.sum(b_a, axis=0)
    b_mean = b_sum / n_f
    b_sq = tl.zeros([BF], dtype=ACC)
    i_r = 0
    while i_r * BR < T * B:
        o_r = i_r * BR + tl.arange(0, BR)
        i_r += 1
        m_r = (o_r < T * B) & (tl.load(p_lengths + o_r % B, mask=o_r < T * B, other=0) > o_r // B)
        m_rf = m_r[:, None] & m_f[None, :]
        b_a = tl.load(p_a + o_r[:, None] * F + o_f[None, :], mask=m_rf, other=0.0).to(ACC)
        b_dev = tl.where(m_rf, b_a - b_mean[None, :], 0.0)
        b_sq += tl.sum(b_dev * b_dev, axis=0)
    b_var = b_sq / n_f
    b_mean = tl.where(use_batch != 0, b_mean, tl.load(p_pop_mean + o_f, mask=m_f, other=0.0).to(ACC))
    b_var = tl.where(use_batch != 0, b_var, tl.load(p_pop_var + o_f, mask=m_f, other=1.0).to(ACC))
    tl.store(p_mean + o_f, b_mean, mask=m_f)
    tl.store(p_var + o_f, b_var, mask=m_f)
    b_scale = tl.load(p_gamma + o_f, mask=m_f, other=0.0).to(ACC) / tl.sqrt(b_var + eps)
    i_r = 0
    while i_r * BR < T * B:
        o_r = i_r * BR + tl.arange(0, BR)
        i_r += 1
        m_rf = (o_r < T * B)[:, None] & m_f[None, :]
        b_a = tl.load(p_a + o_r[:, None] * F + o_f[None, :], mask=m_rf, other=0.0).to(ACC)
        b_u = (b_a - b_mean[None, :]) * b_scale[None, :]
        tl.store(p_u + o_r[:, None] * F + o_f[None, :], b_u.to(p_u.dtype.element_ty), mask=m_rf)


@triton.jit(do_not_specialize=["n", "use_batch", "T", "B"])
def sequence_bn_bwd_kernel(
    p_a, p_du, p_da, p_gamma, p_mean, p_var, p_lengths, p_dgamma,
    n, use_batch, eps, T, B, F,
    ACC: tl.constexpr, BR: tl.constexpr, BF: tl.constexpr,
):
    """da and dgamma of u = gamma * BN(a) over the valid frames, from du [T*B, F] (zero on padding)."""
    i_f = tl.program_id(0).to(tl.int64)
    o_f = i_f * BF + tl.arange(0, BF)
    m_f = o_f < F
    n_f = tl.maximum(n, 1).to(ACC)
    b_mean = tl.load(p_mean + o_f, mask=m_f, other=0.0)
    b_rstd = 1.0 / tl.sqrt(tl.load(p_var + o_f, mask=m_f, other=1.0) + eps)
    b_gamma = tl.load(p_gamma + o_f, mask=m_f, other=0.0).to(ACC)
    # [BF] sums over the valid frames of du and du * xhat
    b_sum_du = tl.zeros([BF], dtype=ACC)
    b_sum_dux = tl.zeros([BF], dtype=ACC)
    i_r = 0
    while i_r * BR < T * B:
        o_r = i_r * BR + tl.arange(0, BR)
        i_r += 1
        m_r = (o_r < T * B) & (tl.load(p_lengths + o_r % B, mask=o_r < T * B, other=0) > o_r // B)
        m_rf = m_r[:, None] & m_f[None, :]
        b_xhat = (tl.load(p_a + o_r[:, None] * F + o_f[None, :], mask=m_rf, other=0.0).to(ACC)
                  - b_mean[None, :]) * b_rstd[None, :]
        b_du = tl.load(p_du + o_r[:, None] * F + o_f[None, :], mask=m_rf, other=0.0).to(ACC)
        b_sum_du += tl.sum(b_du, axis=0)
        b_sum_dux += tl.sum(tl.where(m_rf, b_du * b_xhat, 0.0), axis=0)
    tl.store(p_dgamma + o_f, b_sum_dux, mask=m_f)
    b_mean_d = tl.where(use_batch != 0, b_gamma * b_sum_du / n_f, 0.0)
    b_mean_dx = tl.where(use_batch != 0, b_gamma * b_sum_dux / n_f, 0.0)
    i_r = 0
    while i_r * BR < T * B:
        o_r = i_r * BR + tl.arange(0, BR)
        i_r += 1
        m_r = (o_r < T * B) & (tl.load(p_lengths + o_r % B, mask=o_r < T * B, other=0) > o_r // B)
        m_rf = m_r[:, None] & m_f[None, :]
        b_xhat = (tl.load(p_a + o_r[:, None] * F + o_f[None, :], mask=m_rf, other=0.0).to(ACC)
                  - b_mean[None, :]) * b_rstd[None, :]
        b_dxhat = b_gamma[None, :] * tl.load(p_du + o_r[:, None] * F + o_f[None, :], mask=m_rf, other=0.0).to(ACC)
        b_da = tl.where(m_rf, b_rstd[None, :] * (b_dxhat - b_mean_d[None, :] - b_xhat * b_mean_dx[None, :]), 0.0)
        tl.store(p_da + o_r[:, None] * F + o_f[None, :], b_da.to(p_da.dtype.element_ty),
                 mask=(o_r < T * B)[:, None] & m_f[None, :])
