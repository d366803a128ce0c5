"""The layer op as ``torch.library`` custom ops, so ``torch.compile`` and ``torch.export`` see one op per
layer and direction instead of tracing into a backend's host code.

``bnlstm_layer`` routes here while a graph is being traced (``torch.compiler.is_compiling()``) for the fused
backends; the reference is pure PyTorch and is traced as it is (it is the decomposition). Two ops:

- ``fused_bnlstm::layer`` runs ``bnlstm_layer`` on the named backend (eagerly, with real tensors: the
  per-step plan, checks and kernels all happen inside) and returns the output, the final state and the
  batch statistics as tensors of fixed arity;
- ``fused_bnlstm::layer_backward`` is its vector-Jacobian product: it runs the backend's forward again with
  autograd and its fused backward (recomputation, as activation checkpointing does: a compiled graph saves
  only the op's inputs, and pays one more forward of the layer in the backward).

Fake implementations give every output's shape from the inputs' shapes alone, so ``dynamic=True`` compiles
once for every T and B.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from fused_bnlstm.ops.common import BatchStatistics, LayerConfig, LayerOutput, LayerParams, Population

# normalization=None as a schema string
_NO_NORMALIZATION = "none"


def _config(normalization: str, eps: float, use_batch_stats: bool) -> LayerConfig:
    return LayerConfig(normalization=None if normalization == _NO_NORMALIZATION else normalization, eps=eps,
                       use_batch_stats=use_batch_stats)


def _population(population: list[Tensor]) -> Population | None:
    return Population(*population) if population else None


def _params(params: list[Tensor]) -> LayerParams:
    # absent parameters travel as empty tensors: a list holding None would hide every tensor in it from
    # autograd (torch.library treats such a list as one opaque argument)
    return LayerParams(*[p if p.numel() else None for p in params])


def _statistics_shapes(x: Tensor, c0: Tensor, config: LayerConfig) -> tuple[list[int], list[list[int]]]:
    """The counts' and moments' shapes a call returns (empty when it uses no batch statistics)."""
    T, H = x.shape[0], c0.shape[1]
    if config.normalization is None or not config.use_batch_stats:
        return [0], []
    if config.normalization == "sequence":
        return [1], [[1, 4 * H], [1, 4 * H]]
    return [T], [[T, 4 * H]] * 4 + [[T, H]] * 2


@torch.library.custom_op("fused_bnlstm::layer", mutates_args=())
def layer(x: Tensor, h0: Tensor, c0: Tensor, params: list[Tensor], lengths: Optional[Tensor],
          population: list[Tensor], normalization: str, eps: float, use_batch_stats: bool,
          backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    from fused_bnlstm.ops import bnlstm_layer  # the package imports this module

    config = _config(normalization, eps, use_batch_stats)
    out, h_n, c_n, stats = bnlstm_layer(x, h0, c0, _params(params), lengths=lengths,
                                        population=_population(population), config=config, backend=backend)
    counts_shape, moment_shapes = _statistics_shapes(x, c0, config)
    if not moment_shapes:
        return out, h_n, c_n, torch.zeros(0, dtype=torch.long), []
    if stats is None:  # sequence-wise with fewer than two valid frames: nothing to update with
        counts = torch.zeros(1, dtype=torch.long)
        moments = [x.new_full(shape, float("nan")) for shape in moment_shapes]
        return out, h_n, c_n, counts, moments
    # outputs of a custom op never alias its inputs
    moments = [m.clone() for m in stats[1:] if m is not None]
    return out, h_n, c_n, stats.counts.clone(), moments


@layer.register_fake
def _(x, h0, c0, params, lengths, population, normalization, eps, use_batch_stats, backend):
    config = _config(normalization, eps, use_batch_stats)
    T, B = x.shape[0], x.shape[1]
    counts_shape, moment_shapes = _statistics_shapes(x, c0, config)
    return (x.new_empty(T, B, h0.shape[1]), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            torch.empty(counts_shape, dtype=torch.long), [x.new_empty(shape) for shape in moment_shapes])


@torch.library.custom_op("fused_bnlstm::layer_backward", mutates_args=())
def layer_backward(cotangents: list[Tensor], x: Tensor, h0: Tensor, c0: Tensor, params: list[Tensor],
                   lengths: Optional[Tensor], population: list[Tensor], normalization: str, eps: float,
                   use_batch_stats: bool, backend: str) -> list[Tensor]:
    """Gradients of (x, h0, c0, *params); an empty tensor where a parameter is absent (empty)."""
    from fused_bnlstm.ops import bnlstm_layer

    with _autograd_inside_op(), torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t.numel() else None for t in (x, h0, c0, *params)]
        wanted = [t for t in leaves if t is not None]
        out = bnlstm_layer(leaves[0], leaves[1], leaves[2], LayerParams(*leaves[3:]), lengths=lengths,
                           population=_population(population), config=_config(normalization, eps, use_batch_stats),
                           backend=backend)
        grads = iter(torch.autograd.grad(out[:3], wanted, cotangents, allow_unused=True))
    # outputs of a custom op alias neither its inputs nor each other (a backend may hand back a cotangent)
    taken = {t.untyped_storage().data_ptr() for t in (*cotangents, x, h0, c0, *params) if t.numel()}
    result = []
    for leaf in leaves:
        if leaf is None:
            result.append(x.new_empty(0))
            continue
        grad = next(grads)
        grad = torch.zeros_like(leaf) if grad is None else grad
        if grad.untyped_storage().data_ptr() in taken:
            grad = grad.clone()
        taken.add(grad.untyped_storage().data_ptr())
        result.append(grad)
    return result


@contextlib.contextmanager
def _autograd_inside_op():
    """Record autograd graphs inside an op's implementation, which the dispatcher runs below autograd."""
    key = torch._C.DispatchKey.AutogradFunctionality
    excluded = torch._C._dispatch_tls_is_dispatch_key_excluded(key)
    torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        yield
    finally:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, excluded)


@layer_backward.register_fake
def _(cotangents, x, h0, c0, params, lengths, population, normalization, eps, use_batch_stats, backend):
    return [t.new_empty(t.shape) for t in (x, h0, c0, *params)]


def _setup_context(ctx, inputs, output):
    x, h0, c0, params, lengths, population, normalization, eps, use_batch_stats, backend = inputs
    ctx.save_for_backward(x, h0, c0, *params, *population, *([lengths] if lengths is not None else []))
    ctx.layout = (len(params), len(population), lengths is not None)
    ctx.options = (normalization, eps, use_batch_stats, backend)


def _backward(ctx, grad_out, grad_h_n, grad_c_n, grad_counts, grad_moments):
    n_params, n_population, has_lengths = ctx.layout
    saved = list(ctx.saved_tensors)
    x, h0, c0 = saved[:3]
    rest = iter(saved[3:])
    params = [next(rest) for _ in range(n_params)]
    population = [next(rest) for _ in range(n_population)]
    lengths = next(rest) if has_lengths else None
    cotangents = [g if g is not None else torch.zeros_like(like)
                  for g, like in ((grad_out, x.new_empty(x.shape[0], x.shape[1], h0.shape[1])), (grad_h_n, h0),
                                  (grad_c_n, c0))]
    grads = layer_backward(cotangents, x, h0, c0, params, lengths, population, *ctx.options)
    dx, dh0, dc0, *dparams = grads
    dparams = [g if p.numel() else None for g, p in zip(dparams, params)]
    return dx, dh0, dc0, dparams, None, [None] * n_population, None, None, None, None


layer.register_autograd(_backward, setup_context=_setup_context)


def bnlstm_layer_registered(*, x: Tensor, h0: Tensor, c0: Tensor, params: LayerParams, lengths: Tensor | None,
                            population: Population | None, config: LayerConfig, backend: str) -> LayerOutput:
    """``bnlstm_layer`` through the custom op (what a traced graph holds)."""
    normalization = _NO_NORMALIZATION if config.normalization is None else config.normalization
    pop = [p for p in population if p is not None] if population is not None else []
    present = [p if p is not None else x.new_empty(0) for p in params]
    out, h_n, c_n, counts, moments = layer(x, h0, c0, present, lengths, pop, normalization,
                                           float(config.eps), bool(config.use_batch_stats), backend)
    stats = BatchStatistics(counts, *moments) if moments else None
    return LayerOutput(output=out, h_n=h_n, c_n=c_n, stats=stats)
