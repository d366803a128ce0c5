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

from fused_bnlstm.ops.common import BatchStatistics, Population, step_counts
from fused_bnlstm.ops.naive import bnlstm_layer_naive

__all__ = [
    "BACKENDS",
    "BatchStatistics",
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


def bnlstm_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Tensor | None = None,
    gamma_ih: Tensor | None = None,
    gamma_hh: Tensor | None = None,
    gamma_c: Tensor | None = None,
    beta_c: Tensor | None = None,
    *,
    lengths: Tensor | None = None,
    population: Population | None = None,
    use_batch_stats: bool = True,
    eps: float = 1e-5,
    normalization: str | None = "frame",
    backend: str = "reference",
) -> tuple[Tensor, Tensor, Tensor, BatchStatistics | None]:
    """One BN-LSTM layer in one direction.

    Args:
        x: [T, B, I] time-major input, zero beyond each row's length.
        h0, c0: [B, H] initial state.
        weight_ih: [4H, I]; weight_hh: [4H, H]; gate order i, f, g, o.
        bias: [4H] or None, added after normalization (the module passes ``bias_ih + bias_hh``).
        gamma_ih, gamma_hh: [4H]; gamma_c, beta_c: [H]. Frame-wise needs all four, sequence-wise
            ``gamma_ih`` only, ``normalization=None`` none.
        lengths: [B] int64 on the CPU, each in [1, T], or None when every row runs all T steps.
        population: statistics used where batch statistics are not (see ``Population``); required unless
            ``normalization`` is None.
        use_batch_stats: normalize with the batch's statistics (training, or
            ``track_running_stats=False``); otherwise with ``population``.
        eps: added to the variance.
        normalization: ``"frame"``, ``"sequence"`` or None.
        backend: ``"reference"``, ``"triton"`` or ``"cpp"`` (already resolved, see ``resolve_backend``).

    Returns:
        output [T, B, H] (zeros where t >= length), h_n and c_n [B, H] (each row's state at its last valid
        step), and the ``BatchStatistics`` used (None when no batch statistics were used).
    """
    _check_layer_inputs(x, h0, c0, weight_ih, weight_hh, lengths, population, normalization)
    if backend == "reference":
        layer = bnlstm_layer_naive
    else:
        module_name, function_name = _FUSED[backend]
        layer = getattr(importlib.import_module(f"fused_bnlstm.ops.{module_name}"), function_name)
    return layer(
        x, h0, c0, weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c,
        lengths, population, use_batch_stats, eps, normalization,
    )


def _check_layer_inputs(x, h0, c0, weight_ih, weight_hh, lengths, population, normalization):
    if x.dim() != 3:
        raise ValueError(f"bnlstm_layer: expected x of shape [T, B, I], got {tuple(x.shape)}")
    T, B, I = x.shape
    H = weight_hh.shape[1]
    if weight_ih.shape != (4 * H, I) or weight_hh.shape != (4 * H, H):
        raise ValueError(
            f"bnlstm_layer: expected weight_ih [{4 * H}, {I}] and weight_hh [{4 * H}, {H}], got "
            f"{list(weight_ih.shape)} and {list(weight_hh.shape)}"
        )
    for name, state in (("h0", h0), ("c0", c0)):
        if state.shape != (B, H):
            raise ValueError(f"bnlstm_layer: expected {name} of shape [{B}, {H}], got {list(state.shape)}")
    if lengths is not None:
        if lengths.dim() != 1 or lengths.shape[0] != B or lengths.dtype != torch.int64 or lengths.is_cuda:
            raise ValueError(f"bnlstm_layer: lengths must be a CPU int64 tensor of shape [{B}], got "
                             f"{lengths.dtype} {list(lengths.shape)} on {lengths.device}")
        if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"bnlstm_layer: every length must be in [1, T={T}], got min {int(lengths.min())} "
                             f"and max {int(lengths.max())}")
    if normalization not in ("frame", "sequence", None):
        raise ValueError(f"bnlstm_layer: normalization must be 'frame', 'sequence' or None, got {normalization!r}")
    if normalization is not None and population is None:
        raise ValueError("bnlstm_layer: population statistics are required unless normalization is None")
