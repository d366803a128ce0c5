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
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_bnlstm.ops.common import LayerConfig, LayerInput, LayerOutput, LayerParams, finish_statistics


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_moments(value: Tensor, mask: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Mean and biased variance (statistics dtype) over the rows of ``value`` [B, F] where ``mask`` [B] is set."""
    value = value.to(_stats_dtype(value.dtype))
    weight = mask.to(value.dtype).unsqueeze(1)  # [B, 1]
    mean = (value * weight).sum(0) / count
    var = ((value - mean) ** 2 * weight).sum(0) / count
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
    # [T, B]: the rows still running at each step
    steps = torch.arange(T, device=x.device).unsqueeze(1)
    running = steps < (lengths.to(x.device) if lengths is not None else T)
    h, c = inputs.h0, inputs.c0
    outputs = []
    moments = []

    if config.normalization == "sequence":
        # BN-e*: one normalization of W_ih x over every valid (t, b) frame; W_hh h and c stay raw.
        a_ih = x @ weight_ih.t()  # [T, B, 4H]
        G = a_ih.shape[2]
        if inputs.batch_stats[0]:
            mean_ih, var_ih = _masked_moments(a_ih.reshape(T * B, G), running.reshape(T * B), sum(inputs.counts))
        else:
            mean_ih, var_ih = pop.mean_ih[0], pop.var_ih[0]
        moments = [mean_ih[None], var_ih[None]]
        normed_ih = _normalize(a_ih, mean_ih, var_ih, params.gamma_ih, None, eps)  # [T, B, 4H]

    for t in range(T):
        active = running[t]  # [B]
        a_hh = h @ weight_hh.t()  # [B, 4H]
        if config.normalization == "frame":
            a_ih = x[t] @ weight_ih.t()  # [B, 4H]
            if inputs.batch_stats[t]:
                mean_ih, var_ih = _masked_moments(a_ih, active, inputs.counts[t])
                mean_hh, var_hh = _masked_moments(a_hh, active, inputs.counts[t])
            else:
                # Fewer than two running rows has no batch variance: use the slot's population statistics.
                mean_ih, var_ih = pop.mean_ih[t], pop.var_ih[t]
                mean_hh, var_hh = pop.mean_hh[t], pop.var_hh[t]
            gates = _normalize(a_hh, mean_hh, var_hh, params.gamma_hh, None, eps) + _normalize(
                a_ih, mean_ih, var_ih, params.gamma_ih, None, eps
            )
        elif config.normalization == "sequence":
            gates = a_hh + normed_ih[t]
        else:
            gates = a_hh + x[t] @ weight_ih.t()
        if bias is not None:
            gates = gates + bias

        i, f, g, o = gates.chunk(4, dim=1)  # each [B, H]
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if config.normalization == "frame":
            if inputs.batch_stats[t]:
                mean_c, var_c = _masked_moments(c_new, active, inputs.counts[t])
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

    output = torch.stack(outputs) if T > 0 else x.new_zeros(0, B, inputs.h0.shape[1])
    if config.normalization == "frame" and config.use_batch_stats:
        # [T, F] per quantity; finish_statistics puts NaN on the steps that used population statistics
        moments = [torch.stack([step[k].to(x.dtype) for step in moments]) for k in range(6)]
    stats = finish_statistics(inputs, config, moments, x.dtype)
    return LayerOutput(output=output, h_n=h, c_n=c, stats=stats)
