"""The BN-LSTM layer op: one layer, one direction, over a padded time-major batch.

Backends (each computes the same function and the same gradients):

- ``"reference"``: ``naive.py``, a literal per-step loop in pure PyTorch; any device and dtype.
- ``"triton"``: ``fused_triton.py``, one fused Triton launch per time step; CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``.
- ``"cpp"``: ``fused_cpp.py``, the compiled extension in ``csrc/`` with a fused CPU path.

``bnlstm_layer`` is the one entry point; ``resolve_backend`` turns ``"auto"`` into a concrete choice.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from fused_bnlstm.ops.common import (
    NORMALIZATIONS,
    BatchStatistics,
    LayerConfig,
    LayerInput,
    LayerOutput,
    LayerParams,
    Population,
    prepare_layer,
    step_counts,
)
from fused_bnlstm.ops.naive import bnlstm_layer_naive

__all__ = [
    "BACKENDS",
    "NORMALIZATIONS",
    "BatchStatistics",
    "LayerConfig",
    "LayerInput",
    "LayerOutput",
    "LayerParams",
    "Population",
    "backend_available",
    "bnlstm_layer",
    "resolve_backend",
    "step_counts",
]

BACKENDS = ("reference", "triton", "cpp")

# backend name -> (module under fused_bnlstm.ops, function name)
_FUSED = {"triton": ("fused_triton", "bnlstm_layer_triton"), "cpp": ("fused_cpp", "bnlstm_layer_cpp")}


def backend_available(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device``, and if not, a sentence that says why."""
    if name == "reference":
        return True, ""
    if name not in _FUSED:
        return False, f"unknown backend {name!r}; expected one of {('auto',) + BACKENDS}"
    module_name, _ = _FUSED[name]
    try:
        module = importlib.import_module(f"fused_bnlstm.ops.{module_name}")
    except ImportError as error:
        return False, f"the {name!r} backend could not be imported ({error})"
    return module.available(device)


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn ``"auto"`` into the fastest backend available on ``device``; check an explicit choice."""
    if name == "auto":
        preferred = ("triton", "reference") if device.type == "cuda" else ("cpp", "reference")
        for candidate in preferred:
            if backend_available(candidate, device)[0]:
                return candidate
        return "reference"
    ok, reason = backend_available(name, device)
    if not ok:
        raise RuntimeError(f"BNLSTM backend {name!r} cannot run on {device.type} tensors: {reason}")
    return name


# Dynamo evaluates it eagerly and takes the result as a constant while tracing (it imports and probes).
# This is what torch.compiler.assume_constant_result sets; calling that would import torch._dynamo with
# the package, which triples its import time.
resolve_backend._dynamo_marked_constant = True


def bnlstm_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: LayerParams,
    *,
    lengths: Tensor | None = None,
    population: Population | None = None,
    config: LayerConfig = LayerConfig(),
    backend: str = "reference",
) -> LayerOutput:
    """One BN-LSTM layer in one direction.

    Args:
        x: [T, B, I] time-major input, zero beyond each row's length.
        h0, c0: [B, H] initial state.
        params: ``LayerParams``: weight_ih [4H, I], weight_hh [4H, H] (gate order i, f, g, o), bias [4H] or
            None (added after normalization; the module passes ``bias_ih + bias_hh``), gamma_ih, gamma_hh
            [4H], gamma_c, beta_c [H]. Frame-wise needs all four BN parameters, sequence-wise ``gamma_ih``
            only, ``normalization=None`` none.
        lengths: [B] int64 on the CPU, each in [1, T], or None when every row runs all T steps.
        population: statistics used where batch statistics are not (see ``Population``); required unless
            ``config.normalization`` is None.
        config: ``LayerConfig``: normalization (``"frame"``, ``"sequence"`` or None), eps, and
            use_batch_stats (normalize with the batch's statistics, else with ``population``).
        backend: ``"reference"``, ``"triton"`` or ``"cpp"`` (already resolved, see ``resolve_backend``).

    Returns:
        ``LayerOutput``: output [T, B, H] (zeros where t >= length), h_n and c_n [B, H] (each row's state at
        its last valid step), and the ``BatchStatistics`` used (None when no batch statistics were used).
    """
    if backend != "reference" and torch.onnx.is_in_onnx_export():
        # ONNX has no kernel of ours: the exported graph is the reference's steps
        backend = "reference"
    if backend != "reference" and torch.compiler.is_compiling() and config.process_group is not None:
        # the custom op's schema has no process group: a traced graph takes the reference's steps
        backend = "reference"
    if backend != "reference" and torch.compiler.is_compiling():
        # a traced graph holds the custom op (the reference is traced as it is: it is the decomposition)
        from fused_bnlstm.ops.registered import bnlstm_layer_registered

        return bnlstm_layer_registered(x=x, h0=h0, c0=c0, params=params, lengths=lengths, population=population,
                                       config=config, backend=backend)
    inputs = prepare_layer(x, h0, c0, params, config, lengths, population)
    return _backend_function(backend)(inputs=inputs, params=params, config=config)


def _backend_function(backend: str):
    if backend == "reference":
        return bnlstm_layer_naive
    module_name, function_name = _FUSED[backend]
    return getattr(importlib.import_module(f"fused_bnlstm.ops.{module_name}"), function_name)
