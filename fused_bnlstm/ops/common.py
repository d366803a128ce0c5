"""The layer op's contract, shared by every backend: what goes in, what comes out, one validation.

``bnlstm_layer`` (``ops/__init__.py``) takes the parameters as one bundle (``LayerParams``) and the
configuration as another (``LayerConfig``), runs ``prepare_layer`` once, and calls the chosen backend with
keywords: ``bnlstm_layer_<name>(inputs=LayerInput, params=LayerParams, config=LayerConfig) -> LayerOutput``.
A backend only computes; ``finish_statistics`` applies the one convention for the statistics it returns.
The table of these types is in ``ops/README.md``.
"""

from __future__ import annotations

from collections import namedtuple
from typing import NamedTuple

import torch
from torch import Tensor

NORMALIZATIONS = ("frame", "sequence", None)
# the parameters each normalization reads besides weight_ih, weight_hh and bias
BN_PARAMETERS = {"frame": ("gamma_ih", "gamma_hh", "gamma_c", "beta_c"), "sequence": ("gamma_ih",), None: ()}


class LayerParams(NamedTuple):
    """One layer-direction's parameters (gate order i, f, g, o)."""

    weight_ih: Tensor  # [4H, I]
    weight_hh: Tensor  # [4H, P]: P = H, or proj_size with a projection
    bias: Tensor | None = None  # [4H]: bias_ih + bias_hh, added after normalization
    gamma_ih: Tensor | None = None  # [4H], frame and sequence
    gamma_hh: Tensor | None = None  # [4H], frame
    gamma_c: Tensor | None = None  # [H], frame
    beta_c: Tensor | None = None  # [H], frame
    weight_hr: Tensor | None = None  # [P, H]: nn.LSTM's proj_size, h_t = W_hr (o * tanh(BN(c_t)))


class LayerConfig(NamedTuple):
    """How a call normalizes."""

    normalization: str | None = "frame"  # "frame", "sequence" or None
    eps: float = 1e-5
    # normalize with the batch's statistics (training, or track_running_stats=False), else the population's
    use_batch_stats: bool = True
    # synchronized statistics: batch statistics over the whole torch.distributed process group (the
    # module's sync mode; None = this process's rows only). Only the reference runs it.
    process_group: object | None = None


# The six moments a frame-wise layer-direction normalizes with, in this order everywhere (sequence-wise only
# the first two are set, the rest None).
MOMENTS = ("mean_ih", "var_ih", "mean_hh", "var_hh", "mean_c", "var_c")

Population = namedtuple("Population", MOMENTS, defaults=(None,) * 4)
Population.__doc__ = """Population statistics a layer-direction normalizes with when it does not use batch statistics.

    Frame-wise: one row per time step, the module having already resolved each step's slot
    (``min(t + time_offset, max_length - 1)``): ``*_ih``/``*_hh`` are [T, 4H], ``*_c`` are [T, H].
    Sequence-wise: ``mean_ih``/``var_ih`` are [1, 4H] and the others are None.
    The variances are the (unbiased) running variances, used as they are.
    """

BatchStatistics = namedtuple("BatchStatistics", ("counts", *MOMENTS), defaults=(None,) * 4)
BatchStatistics.__doc__ = """Batch statistics a training call normalized with, detached, for the running-statistics update.

    ``counts`` [T] (int64, CPU) is the number of rows each step normalized over; a step with fewer than
    two used its population statistics instead and its moments are NaN. Means and **biased** variances,
    shaped as ``Population``'s; sequence-wise ``counts`` is [1] (all valid frames) and only
    ``mean_ih``/``var_ih`` [1, 4H] are set.
    """


class LayerInput(NamedTuple):
    """What ``prepare_layer`` hands a backend, validated once."""

    x: Tensor  # [T, B, I], zero beyond each row's length
    h0: Tensor  # [B, P] (P = H without a projection)
    c0: Tensor  # [B, H]
    lengths: Tensor | None  # [B] int64 on the CPU, each in [1, T]; None: every row runs all T steps
    counts: tuple[int, ...]  # [T] rows still running at each step (host ints: no device sync)
    # frame: [T], whether step t normalizes with batch statistics (use_batch_stats and counts[t] >= 2);
    # sequence: [1] (use_batch_stats and at least two valid frames); no normalization: ()
    batch_stats: tuple[bool, ...]
    population: Population | None  # set unless normalization is None


class LayerOutput(NamedTuple):
    output: Tensor  # [T, B, P], zeros where t >= length
    h_n: Tensor  # [B, P], each row's state at its last valid step
    c_n: Tensor  # [B, H]
    stats: BatchStatistics | None  # None when no batch statistics were used


def step_counts(lengths: Tensor | None, T: int, B: int) -> tuple[int, ...]:
    """Rows still running at each step t (those with length > t), as host ints; ``lengths`` on the CPU."""
    if lengths is None:
        return (B,) * T
    steps = torch.arange(T).unsqueeze(1)  # [T, 1]
    return tuple((lengths.unsqueeze(0) > steps).sum(1).tolist())


def prepare_layer(x: Tensor, h0: Tensor, c0: Tensor, params: LayerParams, config: LayerConfig,
                  lengths: Tensor | None, population: Population | None) -> LayerInput:
    """Check one layer-direction's inputs (the one place they are checked) and derive the per-step plan."""
    if x.dim() != 3:
        raise ValueError(f"bnlstm_layer: expected x of shape [T, B, I], got {list(x.shape)}")
    T, B, I = x.shape
    H = params.weight_hh.shape[0] // 4
    P = params.weight_hr.shape[0] if params.weight_hr is not None else H
    if params.weight_ih.shape != (4 * H, I) or params.weight_hh.shape != (4 * H, P):
        raise ValueError(
            f"bnlstm_layer: expected weight_ih [{4 * H}, {I}] and weight_hh [{4 * H}, {P}], got "
            f"{list(params.weight_ih.shape)} and {list(params.weight_hh.shape)}"
        )
    if params.weight_hr is not None and (params.weight_hr.dim() != 2 or params.weight_hr.shape[1] != H):
        raise ValueError(f"bnlstm_layer: expected weight_hr [{P}, {H}], got {list(params.weight_hr.shape)}")
    for name, state, width in (("h0", h0, P), ("c0", c0, H)):
        if state.shape != (B, width):
            raise ValueError(f"bnlstm_layer: expected {name} of shape [{B}, {width}], got {list(state.shape)}")
    if config.normalization not in NORMALIZATIONS:
        raise ValueError(
            f"bnlstm_layer: normalization must be 'frame', 'sequence' or None, got {config.normalization!r}"
        )
    widths = {"bias": 4 * H, "gamma_ih": 4 * H, "gamma_hh": 4 * H, "gamma_c": H, "beta_c": H}
    for name in BN_PARAMETERS[config.normalization]:
        if getattr(params, name) is None:
            raise ValueError(f"bnlstm_layer: normalization={config.normalization!r} needs {name}")
    for name, width in widths.items():
        value = getattr(params, name)
        if value is not None and value.shape != (width,):
            raise ValueError(f"bnlstm_layer: expected {name} of shape [{width}], got {list(value.shape)}")
    if lengths is not None:
        if lengths.dim() != 1 or lengths.shape[0] != B or lengths.dtype != torch.int64 or lengths.device.type != "cpu":
            raise ValueError(f"bnlstm_layer: lengths must be a CPU int64 tensor of shape [{B}], got "
                             f"{lengths.dtype} {list(lengths.shape)} on {lengths.device}")
        if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"bnlstm_layer: every length must be in [1, T={T}], got min {int(lengths.min())} "
                             f"and max {int(lengths.max())}")
    if config.normalization is not None:
        if population is None:
            raise ValueError("bnlstm_layer: population statistics are required unless normalization is None")
        rows = T if config.normalization == "frame" else 1
        if population.mean_ih.shape[0] != rows:
            raise ValueError(f"bnlstm_layer: expected population statistics with {rows} rows, got "
                             f"{population.mean_ih.shape[0]}")

    counts = step_counts(lengths, T, B)
    if config.process_group is not None:
        # synchronized statistics: the group's rows at each step, over the group's longest sequence (len(counts)
        # may exceed this rank's T); every rule below reads them, so every rank takes the same branches
        from fused_bnlstm.distributed import global_counts

        counts = global_counts(counts, config.process_group, x.device)
    if config.normalization == "frame":
        batch_stats = tuple(config.use_batch_stats and n >= 2 for n in counts)
    elif config.normalization == "sequence":
        batch_stats = (config.use_batch_stats and sum(counts) >= 2,)
    else:
        batch_stats = ()
    return LayerInput(x=x, h0=h0, c0=c0, lengths=lengths, counts=counts, batch_stats=batch_stats,
                      population=population)


def pad_steps(x: Tensor, population: Population | None, steps: int) -> tuple[Tensor, Population | None]:
    """x [T, B, I] and a frame-wise population extended to ``steps`` rows: the steps the group runs after
    this rank's rows have all finished (no row of this rank reads them; zeros, and mean 0 / variance 1)."""
    extra = steps - x.shape[0]
    x = torch.cat([x, x.new_zeros(extra, *x.shape[1:])])
    if population is not None and population.mean_hh is not None:
        population = Population(*[
            torch.cat([p, p.new_full((extra, p.shape[1]), 1.0 if name.startswith("var") else 0.0)])
            for name, p in zip(Population._fields, population)
        ])
    return x, population


def finish_statistics(inputs: LayerInput, config: LayerConfig, moments, dtype: torch.dtype, *,
                      owned: bool = False) -> BatchStatistics | None:
    """The batch statistics a call returns: detached, in ``dtype``, NaN where a step used the population's.

    ``moments``: frame-wise the six [T, F] tensors (mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c; biased
    variances); sequence-wise the two [1, 4H] ones. Rows of steps that did not use batch statistics may hold
    anything. None when the call normalized with population statistics only (eval, no normalization, or
    fewer than two valid frames sequence-wise). ``owned``: the moments are the call's own tensors, which
    nothing else reads (the cpp op's outputs), so they are returned (and NaN-filled) in place instead of
    copied first (six [T, 4H]-sized copies were 4 % of a training forward at T=64 B=32 H=128).
    """
    if config.normalization is None or not config.use_batch_stats:
        return None
    if config.normalization == "sequence":
        if not inputs.batch_stats[0]:
            return None
        counts = torch.tensor([sum(inputs.counts)], dtype=torch.long)
        return BatchStatistics(counts, *[m.detach().to(dtype) for m in moments])
    T = len(inputs.counts)
    # (the same rows at every step, the common case: one fill, not a tensor built from T host ints)
    counts = (torch.full((T,), inputs.counts[0], dtype=torch.long) if inputs.counts.count(inputs.counts[0]) == T
              else torch.tensor(inputs.counts, dtype=torch.long))
    # rows only ever stop running, so the steps that fell back are a suffix [first, T): a device fill, no
    # host-to-device copy (the op may run inside a CUDA graph capture)
    first = inputs.batch_stats.index(False) if False in inputs.batch_stats else len(inputs.batch_stats)
    moments = [m.detach().to(dtype, copy=not owned) for m in moments]
    if first < len(inputs.batch_stats):
        for m in moments:
            m[first:] = float("nan")
    return BatchStatistics(counts, *moments)


def needs_reference_backward(*cotangents: Tensor | None) -> bool:
    """Whether a fused backward must hand over to ``reference_backward``: the caller asked for a graph of
    the gradients (``create_graph=True``: double backward, gradient penalties), or the cotangents are
    batched by a ``torch.func`` transform (``vmap``, ``is_grads_batched=True``, jacobians), which compiled
    kernels cannot read."""
    if torch.is_grad_enabled():
        return True
    functorch = torch._C._functorch
    # autograd.grad(is_grads_batched=True) batches with the legacy vmap, torch.func with the new one
    return any(g is not None and (functorch.is_functorch_wrapped_tensor(g) or functorch.is_legacy_batchedtensor(g))
               for g in cotangents)


def reference_backward(*, inputs: LayerInput, params: LayerParams, config: LayerConfig, cotangents,
                       needs_input_grad) -> tuple[Tensor | None, ...]:
    """The layer's vector-Jacobian product through the reference, differentiable to any order.

    A fused backend's ``backward`` calls this instead of its kernels when ``needs_reference_backward`` says
    so. ``inputs`` and ``params`` must hold the tensors the fused forward received (its saved inputs, with
    their autograd history), so the returned gradients stay connected to them. ``cotangents`` are those of
    (output, h_n, c_n); ``needs_input_grad`` is over (x, h0, c0, *params). Returns one gradient per entry of
    ``needs_input_grad`` (None where not needed).
    """
    from fused_bnlstm.ops.naive import bnlstm_layer_naive  # the reference imports this module

    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        wanted = [t for t, need in zip((inputs.x, inputs.h0, inputs.c0, *params), needs_input_grad)
                  if need and t is not None]
        # leaves that do not require grad yet (a fused forward saves its inputs detached from autograd's view)
        wanted = [t if t.requires_grad else t.detach().requires_grad_() for t in wanted]
        tensors = iter(wanted)
        rebuilt = [next(tensors) if need and t is not None else t
                   for t, need in zip((inputs.x, inputs.h0, inputs.c0, *params), needs_input_grad)]
        run = inputs._replace(x=rebuilt[0], h0=rebuilt[1], c0=rebuilt[2])
        out = bnlstm_layer_naive(inputs=run, params=LayerParams(*rebuilt[3:]), config=config)
        pairs = [(o, g) for o, g in zip(out[:3], cotangents) if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True,
                                    create_graph=create_graph)
    grads = iter(grads)
    return tuple(next(grads) if need and t is not None else None
                 for t, need in zip((inputs.x, inputs.h0, inputs.c0, *params), needs_input_grad))
