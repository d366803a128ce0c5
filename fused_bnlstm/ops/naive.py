"""The reference BN-LSTM layer: a literal per-time-step loop of Cooijmans et al.'s equations.

Pure PyTorch, any device and dtype, differentiable by autograd. It is the CPU fallback and the oracle
that every fused backend is held to, output by output and gradient by gradient. Speed is not a goal here;
being obviously right is.

One call runs one layer in one direction over a time-major, padded batch (the module reverses the valid
part of each sequence for the backward direction before calling, so a backend only ever runs forwards):

    a_ih = W_ih x_t                      a_hh = W_hh h_{t-1}                          # [B, 4H]
    gates = BN(a_hh; gamma_hh) + BN(a_ih; gamma_ih) + b                               # [B, 4H]
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)                                 # [B, H]
    h_t = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))                                 # [B, H]

BN statistics are taken over the rows still running at step t (lengths > t). A finished row keeps its
(h, c) and writes zeros to the output. See ``fused_bnlstm/ops/README.md`` for the conventions shared by
all backends (population statistics, the fewer-than-two-rows policy, what is returned).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_bnlstm.ops.common import BatchStatistics, Population, step_counts


def _masked_moments(value: Tensor, mask: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over the rows of ``value`` [B, F] where ``mask`` [B] is set."""
    weight = mask.to(value.dtype).unsqueeze(1)  # [B, 1]
    mean = (value * weight).sum(0) / count
    var = ((value - mean) ** 2 * weight).sum(0) / count
    return mean, var


def _normalize(value: Tensor, mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor | None, eps: float):
    out = gamma * (value - mean) * torch.rsqrt(var + eps)
    return out if beta is None else out + beta


def bnlstm_layer_naive(
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
    """Run one layer-direction. Argument and return conventions: ``fused_bnlstm.ops.bnlstm_layer``."""
    T, B, _ = x.shape
    H = weight_hh.shape[1]
    counts = step_counts(lengths, T, B)  # python ints, rows running at each step
    # [T, B]: the rows still running at each step
    steps = torch.arange(T, device=x.device).unsqueeze(1)
    running = steps < (lengths.to(x.device) if lengths is not None else T)
    h, c = h0, c0
    outputs = []

    if normalization == "sequence":
        # BN-e*: one normalization of W_ih x over every valid (t, b) frame; W_hh h and c stay raw.
        a_ih = x @ weight_ih.t()  # [T, B, 4H]
        frames = running.expand(T, B).reshape(T * B)  # [T*B]
        n_frames = sum(counts)
        if use_batch_stats and n_frames >= 2:
            mean_ih, var_ih = _masked_moments(a_ih.reshape(T * B, 4 * H), frames, n_frames)
            stats = BatchStatistics(torch.tensor([n_frames]), mean_ih.detach()[None], var_ih.detach()[None])
        else:
            mean_ih, var_ih = population.mean_ih[0], population.var_ih[0]
            stats = None
        normed_ih = _normalize(a_ih, mean_ih, var_ih, gamma_ih, None, eps)  # [T, B, 4H]

    batch_moments = []
    for t in range(T):
        active = running[t]  # [B]
        n = counts[t]
        a_hh = h @ weight_hh.t()  # [B, 4H]
        if normalization == "frame":
            a_ih = x[t] @ weight_ih.t()  # [B, 4H]
            if use_batch_stats and n >= 2:
                mean_ih, var_ih = _masked_moments(a_ih, active, n)
                mean_hh, var_hh = _masked_moments(a_hh, active, n)
            else:
                # Fewer than two running rows has no batch variance: use the slot's population statistics.
                mean_ih, var_ih = population.mean_ih[t], population.var_ih[t]
                mean_hh, var_hh = population.mean_hh[t], population.var_hh[t]
            gates = _normalize(a_hh, mean_hh, var_hh, gamma_hh, None, eps) + _normalize(
                a_ih, mean_ih, var_ih, gamma_ih, None, eps
            )
        elif normalization == "sequence":
            gates = a_hh + normed_ih[t]
        else:
            gates = a_hh + x[t] @ weight_ih.t()
        if bias is not None:
            gates = gates + bias

        i, f, g, o = gates.chunk(4, dim=1)  # each [B, H]
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if normalization == "frame":
            if use_batch_stats and n >= 2:
                mean_c, var_c = _masked_moments(c_new, active, n)
                batch_moments.append((mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c))
            else:
                mean_c, var_c = population.mean_c[t], population.var_c[t]
                batch_moments.append(None)
            h_new = torch.sigmoid(o) * torch.tanh(_normalize(c_new, mean_c, var_c, gamma_c, beta_c, eps))
        else:
            h_new = torch.sigmoid(o) * torch.tanh(c_new)

        keep = active.unsqueeze(1)  # [B, 1]
        outputs.append(torch.where(keep, h_new, torch.zeros_like(h_new)))
        h = torch.where(keep, h_new, h)
        c = torch.where(keep, c_new, c)

    output = torch.stack(outputs) if T > 0 else x.new_zeros(0, B, H)
    if normalization == "frame":
        stats = _stack_frame_moments(batch_moments, counts, H, x) if use_batch_stats else None
    elif normalization is None:
        stats = None
    return output, h, c, stats


def _stack_frame_moments(batch_moments, counts, H, x) -> BatchStatistics:
    """Per-step batch moments as [T, F] tensors; steps that used population statistics hold NaN."""
    widths = (4 * H, 4 * H, 4 * H, 4 * H, H, H)
    columns = [[] for _ in widths]
    for moments in batch_moments:
        for k, width in enumerate(widths):
            value = moments[k].detach() if moments is not None else x.new_full((width,), float("nan"))
            columns[k].append(value)
    stacked = [torch.stack(column) if column else x.new_zeros(0, w) for column, w in zip(columns, widths)]
    return BatchStatistics(torch.tensor(counts, dtype=torch.long), *stacked)

