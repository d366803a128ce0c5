"""The ``"cpp"`` backend: the compiled extension's fused CPU forward and backward of one BN-LSTM layer.

The kernels live in ``csrc/`` (``bnlstm_cpu.cpp``; buffer shapes in ``bnlstm.h``, the derivation and the
measured speed in ``csrc/README.md``). Per call: the input branch W_ih x as one GEMM over all steps; per
step one GEMM for W_hh h and one fused parallel pass for both batch norms, the gates, the cell update and
BN(c); backward the same in reverse, with the weight gradients as GEMMs over all steps after the loop.

Both passes are registered custom ops, ``torch.ops.fused_bnlstm.bnlstm_forward`` and ``bnlstm_backward``
(schemas in ``csrc/bnlstm.cpp``); this file registers their fake implementations and the forward's autograd
formula, so that ``torch.compile`` and ``torch.library.opcheck`` see them as ordinary operators.

The extension is imported lazily and optionally: where it was not built (``FUSED_BNLSTM_BUILD_EXTENSION=0``
or no compiler), the package still imports and ``available`` says why this backend cannot run.
This file reads top to bottom: the op's tensors by name, fake implementations, the autograd formula, the
public function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fused_bnlstm.ops.common import (BN_PARAMETERS, LayerConfig, LayerInput, LayerOutput, LayerParams, Population,
                                     finish_statistics, needs_reference_backward, pad_steps, reference_backward)

try:
    from fused_bnlstm import _C
except ImportError as _error:  # not built here: the package works without this backend
    _C = None
    _IMPORT_ERROR = str(_error)
else:
    _IMPORT_ERROR = ""

__all__ = ["available", "bnlstm_layer_cpp", "empty_cache"]

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


class SavedBuffers(NamedTuple):
    """The forward op's ``saved`` result, what backward reads (shapes in csrc/bnlstm.h; [0]-sized where a
    normalization has none)."""

    hs: Tensor  # [T + 1, B, H] states before each step, then h_n (with a projection: m_t, row 0 unused)
    cs: Tensor  # [T + 1, B, H]
    gates: Tensor  # [T, B, 4H] activations
    xhat_ih: Tensor  # [T, B, 4H] frame, sequence
    xhat_hh: Tensor  # [T, B, 4H] frame
    xhat_c: Tensor  # [T, B, H] frame
    tanh_c: Tensor  # [T, B, H]
    rstd_ih: Tensor  # [T, 4H] frame
    rstd_hh: Tensor  # [T, 4H] frame
    rstd_c: Tensor  # [T, H] frame
    seq_rstd: Tensor  # [4H] sequence
    rs: Tensor  # [T + 1, B, P] with a projection: the projected states r_t = W_hr m_t, r_0 = h0


def _weights(params: LayerParams, normalization: str | None) -> list[Tensor]:
    """The op's ``weights``: weight_ih, weight_hh, the batch-norm scales the normalization reads, then
    weight_hr with a projection."""
    projection = [params.weight_hr] if params.weight_hr is not None else []
    return [params.weight_ih, params.weight_hh, *(getattr(params, name) for name in BN_PARAMETERS[normalization]),
            *projection]


def _projected(weights: list[Tensor], normalization: str | None) -> bool:
    """Whether the op's ``weights`` end with weight_hr."""
    return len(weights) > 2 + len(BN_PARAMETERS[normalization])


def _moment_widths(H: int, normalization: str | None) -> tuple[int, ...]:
    """Widths of the op's ``moments`` (frame: mean/var of ih, hh, c; sequence: mean/var of ih)."""
    return {"frame": (4 * H,) * 4 + (H,) * 2, "sequence": (4 * H,) * 2, None: ()}[normalization]


# --- fake implementations: the shapes csrc/bnlstm.cpp allocates ----------------------------------------------


def _register_fakes() -> None:
    @torch.library.register_fake("fused_bnlstm::bnlstm_forward")
    def _forward_fake(x, h0, c0, weights, bias, lengths, counts, batch_stats, *options):
        _population, _eps, normalization, save, _group_name = options
        T, B, _ = x.shape
        H, P = weights[0].shape[0] // 4, h0.shape[1]
        new = x.new_empty
        rows = T if normalization == "frame" else 1
        moments = [new(rows, width) if any(batch_stats) else new(0)
                   for width in _moment_widths(H, normalization)]
        saved = []
        if save:
            frame, normalized = normalization == "frame", normalization is not None
            saved = [new(T + 1, B, H), new(T + 1, B, H), new(T, B, 4 * H),
                     new(T, B, 4 * H) if normalized else new(0), new(T, B, 4 * H) if frame else new(0),
                     new(T, B, H) if frame else new(0), new(T, B, H),
                     new(T, 4 * H) if frame else new(0), new(T, 4 * H) if frame else new(0),
                     new(T, H) if frame else new(0), new(4 * H) if normalization == "sequence" else new(0),
                     new(T + 1, B, P) if _projected(weights, normalization) else new(0)]
        return new(T, B, P), new(B, P), new(B, H), moments, saved

    @torch.library.register_fake("fused_bnlstm::bnlstm_backward")
    def _backward_fake(grad_output, grad_h_n, grad_c_n, x, weights, has_bias, *options):
        _lengths, _counts, _batch_stats, _saved, _normalization, need_dx, _group_name = options
        T, B, _ = x.shape
        H, P = weights[0].shape[0] // 4, weights[1].shape[1]
        new = x.new_empty
        grad_x = new(x.shape) if need_dx else new(0)
        grad_bias = new(4 * H) if has_bias else new(0)
        return grad_x, new(B, P), new(B, H), [torch.empty_like(w) for w in weights], grad_bias


# --- the autograd formula of bnlstm_forward: bnlstm_backward -------------------------------------------------


def _no_grad_like(arg):
    """The gradient of an argument nothing differentiates, in the structure autograd checks: an empty list
    or a list of tensors gets one None per entry, anything else None."""
    if isinstance(arg, (list, tuple)) and all(isinstance(a, Tensor) for a in arg):
        return [None] * len(arg)
    return None


class _ForBackward(NamedTuple):
    """What the forward op's autograd node keeps: the buffers its backward op reads, and the op's inputs for
    the reference's VJP (create_graph, torch.func)."""

    x: Tensor
    h0: Tensor
    c0: Tensor
    bias: Tensor | None
    lengths: Tensor | None
    buffers: SavedBuffers
    weights: list[Tensor]
    population: list[Tensor]


def _setup_context(ctx, inputs, output):
    x, h0, c0, weights, bias, lengths, counts, batch_stats, population, eps, normalization, save, group_name = inputs
    _, _, _, moments, saved = output
    ctx.mark_non_differentiable(*moments, *saved)
    ctx.set_materialize_grads(False)
    # The population's rows only where a step normalized with them (the reference's double backward reads
    # them there): a training call over full batches keeps none, so the module may hand in views of its
    # buffers, which its statistics update then changes in place (BNLSTM._population).
    kept = population if not all(batch_stats) else []
    ctx.save_for_backward(x, h0, c0, bias, lengths, *saved, *weights, *kept)
    ctx.list_sizes = (len(weights), len(kept))
    ctx.layer = dict(has_bias=bias is not None, counts=counts, batch_stats=batch_stats,
                     normalization=normalization, group_name=group_name)
    ctx.eps = eps
    ctx.no_grads = tuple(_no_grad_like(arg) for arg in (lengths, counts, batch_stats, population, eps,
                                                         normalization, save, group_name))


def _saved_for_backward(ctx) -> _ForBackward:
    tensors = iter(ctx.saved_tensors)

    def take(n):
        return [next(tensors) for _ in range(n)]

    x, h0, c0, bias, lengths = take(5)
    buffers = SavedBuffers(*take(len(SavedBuffers._fields)))
    n_weights, n_population = ctx.list_sizes
    return _ForBackward(x, h0, c0, bias, lengths, buffers, take(n_weights), take(n_population))


def _reference_grads(ctx, saved: _ForBackward, cotangents, needs_input_grad):
    """The backward op's results, computed through the reference (differentiable, batched cotangents)."""
    normalization = ctx.layer["normalization"]
    weight_names = ("weight_ih", "weight_hh", *BN_PARAMETERS[normalization],
                    *(("weight_hr",) if _projected(saved.weights, normalization) else ()))
    params = LayerParams(bias=saved.bias, **dict(zip(weight_names, saved.weights)))
    if saved.population:
        population = Population(*saved.population)
    elif normalization is not None:
        # every step used batch statistics (the forward kept no rows): stand-ins nobody reads
        T, H = len(ctx.layer["counts"]), saved.c0.shape[1]
        widths = [4 * H] * 4 + [H] * 2 if normalization == "frame" else [4 * H] * 2
        population = Population(*[saved.x.new_zeros(1, width).expand(T if normalization == "frame" else 1, width)
                                  for width in widths])
    else:
        population = None
    inputs = LayerInput(x=saved.x, h0=saved.h0, c0=saved.c0, lengths=saved.lengths,
                        counts=tuple(ctx.layer["counts"]), batch_stats=tuple(ctx.layer["batch_stats"]),
                        population=population)
    config = LayerConfig(normalization=normalization, eps=ctx.eps, use_batch_stats=any(inputs.batch_stats),
                         process_group=_process_group(ctx.layer["group_name"]))
    needs_x, needs_h0, needs_c0, needs_weights, needs_bias, *_ = needs_input_grad
    needs_params = dict(zip(weight_names, needs_weights), bias=needs_bias)
    needs = (needs_x, needs_h0, needs_c0, *(needs_params.get(name, False) for name in LayerParams._fields))
    grads = dict(zip(("x", "h0", "c0", *LayerParams._fields),
                     reference_backward(inputs=inputs, params=params, config=config, cotangents=cotangents,
                                        needs_input_grad=needs)))
    grad_weights = [grads[name] for name in weight_names]
    return grads["x"], grads["h0"], grads["c0"], grad_weights, grads["bias"]


def _backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_moments, _grad_saved, needs_input_grad=None):
    """The formula: ``bnlstm_backward``, or the reference's VJP where a graph of the gradients is wanted.
    ``needs_input_grad`` is in the op's argument order (x, h0, c0, [weights], bias, ...): ``ctx``'s own
    unless the caller's inputs are ordered otherwise (``_EagerForward``)."""
    saved = _saved_for_backward(ctx)
    needs_input_grad = ctx.needs_input_grad if needs_input_grad is None else needs_input_grad
    needs_x = needs_input_grad[0]
    if needs_reference_backward(grad_output, grad_h_n, grad_c_n):
        # a graph of the gradients is wanted (double backward): the kernels' backward is not differentiable
        grad_x, grad_h0, grad_c0, grad_weights, grad_bias = _reference_grads(
            ctx, saved, (grad_output, grad_h_n, grad_c_n), needs_input_grad)
    else:
        grad_x, grad_h0, grad_c0, grad_weights, grad_bias = torch.ops.fused_bnlstm.bnlstm_backward(
            grad_output=grad_output, grad_h_n=grad_h_n, grad_c_n=grad_c_n, x=saved.x, weights=saved.weights,
            lengths=saved.lengths, saved=list(saved.buffers), need_dx=needs_x, **ctx.layer,
        )
    # in the parameters' own (contiguous) layout: DDP's gradient buckets expect the parameter's strides
    grad_weights = [g.contiguous() if g is not None else None for g in grad_weights]
    return (grad_x if needs_x else None, grad_h0, grad_c0, grad_weights,
            grad_bias if ctx.layer["has_bias"] else None, *ctx.no_grads)


if _C is not None:
    _register_fakes()
    torch.library.register_autograd("fused_bnlstm::bnlstm_forward", _backward, setup_context=_setup_context)


class _EagerForward(torch.autograd.Function):
    """``bnlstm_forward`` with the formula above as its derivative, for eager calls that record a graph.

    The same ``_setup_context`` and ``_backward`` as the registered formula (which traced graphs and
    ``opcheck`` use), without torch.library's per-call wrapping around them (pytree flattening of every
    argument, default filling, the tensor-list adapter): 0.2-0.25 ms a call, as much as the kernels of a
    one-step layer at B=32, H=128. The differentiable tensors are positional (an autograd.Function sees no
    tensor inside a list); the results are flat: output, h_n, c_n, then the moments and the saved buffers.
    """

    @staticmethod
    def forward(ctx, arguments: dict, x, h0, c0, bias, *weights):
        # (ctx in forward, no setup_context: apply then skips binding the arguments through inspect per call)
        # below the Autograd key: straight to the CPU kernel, not through the registered formula again
        with torch._C._AutoDispatchBelowAutograd():
            output, h_n, c_n, moments, saved = torch.ops.fused_bnlstm.bnlstm_forward.default(
                x=x, h0=h0, c0=c0, bias=bias, weights=list(weights), **arguments)
        op_inputs = (x, h0, c0, list(weights), bias, *(arguments[name] for name in _OP_KEYWORDS))
        _setup_context(ctx, op_inputs, (output, h_n, c_n, moments, saved))
        return output, h_n, c_n, *moments, *saved

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, *_grad_moments_and_saved):
        _, needs_x, needs_h0, needs_c0, needs_bias, *needs_weights = ctx.needs_input_grad
        grad_x, grad_h0, grad_c0, grad_weights, grad_bias, *_ = _backward(
            ctx, grad_output, grad_h_n, grad_c_n, None, None,
            needs_input_grad=(needs_x, needs_h0, needs_c0, needs_weights, needs_bias))
        return None, grad_x, grad_h0, grad_c0, grad_bias, *grad_weights


# the op's arguments after x, h0, c0, weights and bias, in schema order
_OP_KEYWORDS = ("lengths", "counts", "batch_stats", "population", "eps", "normalization", "save", "group_name")


def _forward(arguments: dict):
    """``bnlstm_forward`` on ``forward_arguments``' dict: through ``_EagerForward`` when a graph is
    recorded, else the op itself (the registered formula then passes straight through)."""
    if not arguments["save"] or torch.compiler.is_compiling():
        # nothing to differentiate, or a traced graph (which takes the registered formula)
        return torch.ops.fused_bnlstm.bnlstm_forward(**arguments)
    rest = {name: arguments[name] for name in _OP_KEYWORDS}
    results = _EagerForward.apply(rest, arguments["x"], arguments["h0"], arguments["c0"], arguments["bias"],
                                  *arguments["weights"])
    moments_end = 3 + len(_moment_widths(arguments["c0"].shape[1], arguments["normalization"]))
    return (*results[:3], list(results[3:moments_end]), list(results[moments_end:]))


# --- the backend ---------------------------------------------------------------------------------------------


def _cast(value, dtype: torch.dtype):
    """A tensor, or each tensor of a NamedTuple (None kept), in ``dtype``."""
    if value is None or isinstance(value, Tensor):
        return value if value is None or value.dtype == dtype else value.to(dtype)
    if all(t is None or t.dtype == dtype for t in value):
        return value
    return type(value)(*(_cast(t, dtype) for t in value))


def forward_arguments(inputs: LayerInput, params: LayerParams, config: LayerConfig, save: bool) -> dict:
    """The keyword arguments of ``torch.ops.fused_bnlstm.bnlstm_forward`` for one prepared call (tensors in
    a dtype the kernels run; synchronized, x and the population already run over the group's steps)."""
    population = inputs.population
    group = config.process_group
    return dict(
        x=inputs.x, h0=inputs.h0, c0=inputs.c0, weights=_weights(params, config.normalization), bias=params.bias,
        lengths=inputs.lengths, counts=list(inputs.counts), batch_stats=list(inputs.batch_stats),
        population=[t for t in population if t is not None] if population is not None else [],
        eps=config.eps, normalization=config.normalization, save=save,
        group_name=group.group_name if group is not None else None,
    )


def _process_group(group_name: str | None):
    """The process group a synchronized call named (the reference's double backward needs the group)."""
    if group_name is None:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def bnlstm_layer_cpp(*, inputs: LayerInput, params: LayerParams, config: LayerConfig) -> LayerOutput:
    """One BN-LSTM layer-direction through the compiled CPU path.

    Argument and return conventions: ``fused_bnlstm.ops.bnlstm_layer``. Differentiable in ``x``, the states
    and every parameter, to any order (a backward asked to build a graph runs through the reference,
    ``common.reference_backward``, and so does the whole call inside a ``torch.func`` transform). float32 and float64 run in their own precision; other floating dtypes run in
    float32 and the results are cast back.
    """
    ok, reason = available(inputs.x.device)
    if not ok:
        raise RuntimeError(f"BNLSTM backend 'cpp' cannot run: {reason}")
    if not inputs.x.is_floating_point():
        raise TypeError(f"BNLSTM backend 'cpp' expects floating-point input, got {inputs.x.dtype}")
    if any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)
           for t in (inputs.x, inputs.h0, inputs.c0, *params)):
        # inside a torch.func transform (vmap, grad, jacrev, ...): compiled kernels cannot read its tensors,
        # and the reference is the same function, differentiable to any order
        from fused_bnlstm.ops.naive import bnlstm_layer_naive

        return bnlstm_layer_naive(inputs=inputs, params=params, config=config)
    dtype = inputs.x.dtype
    compute = dtype if dtype in _KERNEL_DTYPES else torch.float32
    run = inputs._replace(x=_cast(inputs.x, compute), h0=_cast(inputs.h0, compute), c0=_cast(inputs.c0, compute),
                          population=_cast(inputs.population, compute))
    params = _cast(params, compute)
    T = run.x.shape[0]
    if config.process_group is not None:
        # the group's steps (len(counts)): this rank's rows have finished on the ones past its own T
        x, population = pad_steps(run.x, run.population, len(run.counts))
        lengths = run.lengths if run.lengths is not None or len(run.counts) == T else \
            torch.full((x.shape[1],), T, dtype=torch.long)
        run = run._replace(x=x, population=population, lengths=lengths)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (run.x, run.h0, run.c0, *params))
    output, h_n, c_n, moments, _ = _forward(forward_arguments(run, params, config, save))
    if config.process_group is not None:
        output = output[:T]
    owned = any(inputs.batch_stats)
    if not owned:
        # No step normalized with batch statistics, so the op computed no moments. finish_statistics returns
        # None, or for frame-wise training (every step had fewer than two rows) marks every row NaN: copies
        # of the population's rows (which backward may still read) stand in.
        moments = list(run.population or ())
    stats = finish_statistics(inputs, config, moments, dtype, owned=owned)
    return LayerOutput(output.to(dtype), h_n.to(dtype), c_n.to(dtype), stats)
