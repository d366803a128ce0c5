"""The ``"cpp"`` backend: the compiled extension's fused CPU forward and backward of one BN-LSTM layer.

The kernels live in ``csrc/`` (``bnlstm_cpu.cpp``; buffer shapes in ``bnlstm.h``, the derivation and the
measured speed in ``csrc/README.md``). Per call: the input branch W_ih x as one GEMM over all steps; per
step one GEMM for W_hh h and one fused parallel pass for both batch norms, the gates, the cell update and
BN(c); backward the same in reverse, with the weight gradients as GEMMs over all steps after the loop.

The extension is imported lazily and optionally: where it was not built (``FUSED_BNLSTM_BUILD_EXTENSION=0``
or no compiler), the package still imports and ``available`` says why this backend cannot run.
This file reads top to bottom: launchers, the autograd Function (no math of its own), the public function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fused_bnlstm.ops.common import BatchStatistics, Population

try:
    from fused_bnlstm import _C
except ImportError as _error:  # not built here: the package works without this backend
    _C = None
    _IMPORT_ERROR = str(_error)
else:
    _IMPORT_ERROR = ""

__all__ = ["available", "bnlstm_layer_cpp", "empty_cache"]

# normalization -> the code csrc/bnlstm.cpp takes
_NORMALIZATION_CODES = {None: 0, "frame": 1, "sequence": 2}
# dtypes the kernels are compiled for; others run in float32 and are cast back
_KERNEL_DTYPES = (torch.float32, torch.float64)


def available(device) -> tuple[bool, str]:
    """Whether the compiled CPU path can run on ``device``, and if not, a sentence that says why."""
    device = torch.device(device)
    if _C is None:
        return False, (
            "the compiled extension fused_bnlstm._C is not built (reinstall with "
            "`pip install --no-build-isolation -e .` and without FUSED_BNLSTM_BUILD_EXTENSION=0; "
            f"import error: {_IMPORT_ERROR})"
        )
    if device.type != "cpu":
        return False, f"the compiled extension has a CPU path only, got a {device.type} tensor"
    return True, ""


def empty_cache() -> None:
    """Hand the CPU buffers the extension caches between calls back to the OS (see csrc/workspace.cpp)."""
    if _C is not None:
        _C.empty_cache()


def _population_tensors(population: Population | None) -> list[Tensor | None]:
    if population is None:
        return [None] * 6
    return [population.mean_ih, population.var_ih, population.mean_hh, population.var_hh, population.mean_c,
            population.var_c]


def _forward(x, h0, c0, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, lengths, pop,
             use_batch_stats, eps, normalization, save):
    """Launch the fused forward. Returns (output, h_n, c_n, statistics or None, saved buffers or None)."""
    results = _C.bnlstm_forward_cpu(
        x, h0, c0, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, lengths, *pop,
        use_batch_stats=use_batch_stats, eps=eps, normalization=_NORMALIZATION_CODES[normalization], save=save,
    )
    output, h_n, c_n, counts, mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c = results[:10]
    stats = None
    if normalization == "frame" and use_batch_stats:
        stats = BatchStatistics(counts, mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c)
    elif normalization == "sequence" and mean_ih is not None:
        stats = BatchStatistics(counts, mean_ih, var_ih)
    return output, h_n, c_n, stats, (results[10:] if save else None)


def _backward(grad_output, grad_h_n, grad_c_n, x, weight_ih, weight_hh, gamma_ih, gamma_hh, gamma_c, has_bias,
              lengths, saved, use_batch_stats, normalization, need_dx):
    """Launch the fused backward. Returns [dx, dh0, dc0, dW_ih, dW_hh, dbias, dgamma_ih, dgamma_hh,
    dgamma_c, dbeta_c] (None where absent or not asked for)."""
    return _C.bnlstm_backward_cpu(
        grad_output, grad_h_n, grad_c_n, x, weight_ih, weight_hh, gamma_ih, gamma_hh, gamma_c, has_bias,
        lengths, *saved, use_batch_stats=use_batch_stats, normalization=_NORMALIZATION_CODES[normalization],
        need_dx=need_dx,
    )


class BNLSTMLayerCppFunction(torch.autograd.Function):
    """Autograd glue: the forward launcher with the buffers backward needs, and the backward launcher."""

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, lengths,
                pop_mean_ih, pop_var_ih, pop_mean_hh, pop_var_hh, pop_mean_c, pop_var_c, use_batch_stats, eps,
                normalization):
        pop = [pop_mean_ih, pop_var_ih, pop_mean_hh, pop_var_hh, pop_mean_c, pop_var_c]
        output, h_n, c_n, stats, saved = _forward(
            x, h0, c0, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, lengths, pop,
            use_batch_stats, eps, normalization, save=True,
        )
        ctx.save_for_backward(x, weight_ih, weight_hh, gamma_ih, gamma_hh, gamma_c, lengths, *saved)
        ctx.has_bias = bias is not None
        ctx.use_batch_stats = use_batch_stats
        ctx.normalization = normalization
        stat_tensors = tuple(t for t in stats if t is not None) if stats is not None else ()
        ctx.mark_non_differentiable(*stat_tensors)
        return (output, h_n, c_n) + stat_tensors

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, grad_h_n, grad_c_n, *unused_stat_grads):
        x, weight_ih, weight_hh, gamma_ih, gamma_hh, gamma_c, lengths, *saved = ctx.saved_tensors
        grads = _backward(
            grad_output, grad_h_n, grad_c_n, x, weight_ih, weight_hh, gamma_ih, gamma_hh, gamma_c, ctx.has_bias,
            lengths, saved, ctx.use_batch_stats, ctx.normalization, need_dx=ctx.needs_input_grad[0],
        )
        # One entry per forward argument: the ten differentiable inputs, then lengths, population, flags.
        return (*grads, None, None, None, None, None, None, None, None, None, None)


def bnlstm_layer_cpp(
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
    """One BN-LSTM layer-direction through the compiled CPU path.

    Argument and return conventions: ``fused_bnlstm.ops.bnlstm_layer``. Differentiable in every tensor
    argument but ``lengths`` and ``population`` (once: no double backward). float32 and float64 run in their
    own precision; other floating dtypes run in float32 and the results are cast back.
    """
    ok, reason = available(x.device)
    if not ok:
        raise RuntimeError(f"BNLSTM backend 'cpp' cannot run: {reason}")
    if normalization not in _NORMALIZATION_CODES:
        raise ValueError(f"normalization must be one of 'frame', 'sequence' or None, got {normalization!r}")
    if not x.is_floating_point():
        raise TypeError(f"BNLSTM backend 'cpp' expects floating-point input, got {x.dtype}")
    dtype = x.dtype
    compute = dtype if dtype in _KERNEL_DTYPES else torch.float32
    params = [h0, c0, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c]
    params = [p.to(compute) if p is not None else None for p in params]
    pop = [p.to(compute) if p is not None else None for p in _population_tensors(population)]
    lengths = lengths.to("cpu", torch.int64) if lengths is not None else None
    x_c = x.to(compute)
    args = (x_c, *params, lengths, *pop, bool(use_batch_stats), float(eps), normalization)

    differentiable = [x_c, *params]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        output, h_n, c_n, *stat_tensors = BNLSTMLayerCppFunction.apply(*args)
        stats = None
        if stat_tensors:
            stats = BatchStatistics(*stat_tensors)
    else:
        output, h_n, c_n, stats, _ = _forward(*args[:11], pop, *args[17:], save=False)
    if compute != dtype:
        output, h_n, c_n = output.to(dtype), h_n.to(dtype), c_n.to(dtype)
        if stats is not None:
            stats = BatchStatistics(*[t.to(dtype) if t is not None and t.is_floating_point() else t for t in stats])
    return output, h_n, c_n, stats
