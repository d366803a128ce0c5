"""The reference BN-LSTM layer: a literal per-time-step loop of Cooijmans et al.'s equations.

Pure PyTorch, any device and dtype, differentiable by autograd (to any order). It is the CPU fallback and
the oracle that every fused backend is held to, output by output and gradient by gradient. Speed is not a
goal here; being obviously right is.

One call runs one layer in one direction over a time-major, padded batch (the module reverses the valid
part of each sequence for the backward direction before calling, so a backend only ever runs forwards):

    a_ih = W_ih x_t                      a_hh = W_hh h_{t-1}                          # [B, 4H]
    gates = BN(a_hh; gamma_hh) + BN(a_ih; gamma_ih) + b                               # [B, 4H]
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)                                 # [B, H]
    h_t = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))                                 # [B, H]
    h_t = W_hr h_t  (with a projection, nn.LSTM's proj_size; the recurrence runs on it) # [B, P]

BN statistics are taken over the rows still running at step t (lengths > t). A finished row keeps its
(h, c) and writes zeros to the output. Batch norms compute in float32 for half-precision tensors (as the
fused backends do), so an all-zero h0 (variance 0) gives finite gradients in float16 too. See
``fused_bnlstm/ops/README.md`` for the conventions shared by all backends.

Synchronized statistics (``config.process_group`` set, ``fused_bnlstm.convert_sync_bnlstm``): every batch
norm runs over the running rows of every rank of the group. ``inputs.counts`` are then the group's counts over
its longest sequence; a rank runs all of those steps (with no rows once its own have finished), the input
branch's moments for every step are all-reduced in one collective before the loop and the recurrent and cell
moments in one collective each per step, as (sum, sum of squares) through a differentiable all-reduce, so
the backward's batch reductions are summed over the group too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_bnlstm.distributed import all_reduce_sum
from fused_bnlstm.ops.common import LayerConfig, LayerInput, LayerOutput, LayerParams, finish_statistics, pad_steps


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_moments(value: Tensor, mask: Tensor, count, group=None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (statistics dtype) over the rows of ``value`` [..., B, F] where ``mask``
    [..., B] is set; ``count`` (an int, or a tensor [..., 1]) is the number of such rows, over the whole
    ``group`` when one is given (synchronized statistics; the Triton backend's host sums take this too)."""
    value = value.to(_stats_dtype(value.dtype))
    weight = mask.to(value.dtype).unsqueeze(-1)  # [..., B, 1]
    if group is None:
        mean = (value * weight).sum(-2) / count
        var = ((value - mean.unsqueeze(-2)) ** 2 * weight).sum(-2) / count
        return mean, var
    # [2, ..., F]: this rank's sum and sum of squares, summed over the group in one collective
    sums = all_reduce_sum(torch.stack([(value * weight).sum(-2), (value * value * weight).sum(-2)]), group)
    mean = sums[0] / count
    var = (sums[1] / count - mean * mean).clamp(min=0)
    return mean, var


def _normalize(value: Tensor, mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor | None, eps: float) -> Tensor:
    """gamma * (value - mean) / sqrt(var + eps) (+ beta), computed in the statistics dtype, cast back."""
    acc = _stats_dtype(value.dtype)
    out = gamma.to(acc) * (value.to(acc) - mean.to(acc)) * torch.rsqrt(var.to(acc) + eps)
    if beta is not None:
        out = out + beta.to(acc)
    return out.to(value.dtype)


def bnlstm_layer_naive(*, inputs: LayerInput, params: LayerParams, config: LayerConfig) -> LayerOutput:
    """Run one layer-direction. Argument and return conventions: ``fused_bnlstm.ops.bnlstm_layer``."""
    x, lengths, pop = inputs.x, inputs.lengths, inputs.population
    T, B, _ = x.shape
    weight_ih, weight_hh, bias = params.weight_ih, params.weight_hh, params.bias
    eps = config.eps
    group = config.process_group
    # steps to run: T, or in sync mode the group's longest sequence (this rank's rows stop at T)
    steps_run = len(inputs.counts)
    if group is not None:
        x, pop = pad_steps(x, pop, steps_run)
    # [T, B]: the rows still running at each step
    steps = torch.arange(steps_run, device=x.device).unsqueeze(1)
    running = (steps < (lengths.to(x.device) if lengths is not None else T)).expand(steps_run, B)
    h, c = inputs.h0, inputs.c0
    outputs = []
    moments = []
    # [T, B, 4H]: the input branch does not depend on h
    a_ih = x @ weight_ih.t()
    G = a_ih.shape[2]
    # per-step views taken once: indexing a_ih[t] in the loop would give every step's backward a zero
    # gradient of the whole sequence (quadratic in T); unbind's backward stacks them once
    a_ih_steps = a_ih.unbind(0)

    if config.normalization == "sequence":
        # BN-e*: one normalization of W_ih x over every valid (t, b) frame; W_hh h and c stay raw.
        if inputs.batch_stats[0]:
            mean_ih, var_ih = masked_moments(a_ih.reshape(-1, G), running.reshape(-1), sum(inputs.counts), group)
        else:
            mean_ih, var_ih = pop.mean_ih[0], pop.var_ih[0]
        moments = [mean_ih[None], var_ih[None]]
        normed_ih = _normalize(a_ih, mean_ih, var_ih, params.gamma_ih, None, eps).unbind(0)  # T x [B, 4H]
    elif config.normalization == "frame" and group is not None and any(inputs.batch_stats):
        # sync mode: the input branch's moments of every step in one collective before the recurrence
        counts = torch.tensor(inputs.counts, device=x.device).clamp(min=1).unsqueeze(1)  # [T, 1]
        synced_ih = masked_moments(a_ih, running, counts, group)  # mean, var [T, 4H]

    for t in range(steps_run):
        active = running[t]  # [B]
        a_hh = h @ weight_hh.t()  # [B, 4H]
        if config.normalization == "frame":
            if inputs.batch_stats[t]:
                if group is None:
                    mean_ih, var_ih = masked_moments(a_ih_steps[t], active, inputs.counts[t])
                else:
                    mean_ih, var_ih = synced_ih[0][t], synced_ih[1][t]
                mean_hh, var_hh = masked_moments(a_hh, active, inputs.counts[t], group)
            else:
                # Fewer than two running rows has no batch variance: use the slot's population statistics.
                mean_ih, var_ih = pop.mean_ih[t], pop.var_ih[t]
                mean_hh, var_hh = pop.mean_hh[t], pop.var_hh[t]
            gates = _normalize(a_hh, mean_hh, var_hh, params.gamma_hh, None, eps) + _normalize(
                a_ih_steps[t], mean_ih, var_ih, params.gamma_ih, None, eps
            )
        elif config.normalization == "sequence":
            gates = a_hh + normed_ih[t]
        else:
            gates = a_hh + a_ih_steps[t]
        if bias is not None:
            gates = gates + bias

        i, f, g, o = gates.chunk(4, dim=1)  # each [B, H]
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if config.normalization == "frame":
            if inputs.batch_stats[t]:
                mean_c, var_c = masked_moments(c_new, active, inputs.counts[t], group)
            else:
                mean_c, var_c = pop.mean_c[t], pop.var_c[t]
            moments.append((mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c))
            h_new = torch.sigmoid(o) * torch.tanh(_normalize(c_new, mean_c, var_c, params.gamma_c, params.beta_c, eps))
        else:
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if params.weight_hr is not None:
            h_new = h_new @ params.weight_hr.t()  # [B, P]

        keep = active.unsqueeze(1)  # [B, 1]
        outputs.append(torch.where(keep, h_new, torch.zeros_like(h_new)))
        h = torch.where(keep, h_new, h)
        c = torch.where(keep, c_new, c)

    # (sync mode: a slice of every step's output, so the backward reaches every step's collectives)
    output = torch.stack(outputs)[:T] if steps_run > 0 else x.new_zeros(0, B, inputs.h0.shape[1])
    if config.normalization == "frame" and config.use_batch_stats:
        # [T, F] per quantity; finish_statistics puts NaN on the steps that used population statistics
        moments = [torch.stack([step[k].to(x.dtype) for step in moments]) for k in range(6)]
    stats = finish_statistics(inputs, config, moments, x.dtype)
    return LayerOutput(output=output, h_n=h, c_n=c, stats=stats)
