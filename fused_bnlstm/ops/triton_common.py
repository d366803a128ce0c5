"""Host-side pieces both Triton backends share: the per-step launches (``fused_triton.py``) and the
persistent kernels (``persistent_triton.py``).

- whether the kernels can run on a device (``available``), what a call computes in (``compute_dtype``,
  ``acc_dtype``) and the recurrent dots' float32 precision (``recurrent_precision``, ``PRECISION_ENV``);
- the refusals both share (``check_call``);
- the layouts the kernels read and write (``pack_population``, ``moment_views``, ``device_steps``; see
  ``triton_kernels.py``) and a host tensor's sync-free copy to the device (``host_to_device``);
- the sequence-wise input branch before and after the recurrence (``sequence_bn_forward`` /
  ``sequence_bn_backward``) and the gradients that are GEMMs over all steps once a backward loop has run
  (``gradients_after_loop``).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from fused_bnlstm.ops.common import LayerConfig, LayerInput, LayerParams, Population

try:
    import triton

    from fused_bnlstm.ops import triton_kernels as kernels
except ImportError as error:
    triton = kernels = None
    _IMPORT_ERROR = error
else:
    _IMPORT_ERROR = None
    # triton reads TRITON_INTERPRET when the kernels are decorated, i.e. at this import
    _INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = [
    "PRECISIONS", "PRECISION_ENV", "acc_dtype", "available", "block_rows", "check_call", "compute_dtype",
    "device_steps",
    "gradients_after_loop", "host_to_device", "moment_views", "pack_population", "recurrent_precision",
    "sequence_bn_backward", "sequence_bn_forward",
]

# the float32 recurrent-GEMM precision switch (see ``recurrent_precision``)
PRECISION_ENV = "FUSED_BNLSTM_TRITON_PRECISION"
PRECISIONS = ("auto", "ieee", "tf32", "tf32x3")

# rows / features per program of the sequence-wise input-branch kernels
_BLOCK_ROWS = 64
_BLOCK_FEATURES = 32


def available(device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device``; if not, a sentence that says why."""
    if triton is None:
        return False, f"triton is not importable ({_IMPORT_ERROR}); install it with `pip install triton`"
    device = torch.device(device)
    if device.type == "cuda":
        if _INTERPRETED_AT_IMPORT:
            return False, ("the Triton kernels were loaded under TRITON_INTERPRET=1, which runs them on CPU "
                           "tensors only; unset it to run them on CUDA")
        return True, ""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1" and _INTERPRETED_AT_IMPORT:
            return True, ""
        return False, ("Triton kernels run on CUDA tensors, or on CPU tensors only under the Triton interpreter "
                       "(set TRITON_INTERPRET=1 before triton is first imported)")
    return False, f"Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), not on {device.type}"


def check_call(name: str, inputs: LayerInput, params: LayerParams, config: LayerConfig, *,
               projection: bool = False, synchronized: bool = False) -> None:
    """What a Triton backend (``name`` in the messages) refuses: a device it cannot run on, synchronized
    statistics unless it runs them (``synchronized``: the per-step launches do, frame-wise and without
    normalization, without a projection; the persistent kernels do not), a projection unless it runs one
    (``projection``: the per-step launches do, the persistent kernels do not), an empty sequence, an empty
    batch (except in a synchronized call, where a rank without rows still takes part in every collective),
    lengths inside a caller's CUDA graph capture."""
    device = inputs.x.device
    ok, reason = available(device)
    if not ok:
        raise RuntimeError(f"the {name} BN-LSTM backend cannot run on {device.type} tensors: {reason}")
    group = config.process_group
    if group is not None and not synchronized:
        raise NotImplementedError(f"the {name} backend has no synchronized statistics (process_group); use the "
                                  f"reference backend")
    if group is not None and (config.normalization == "sequence" or params.weight_hr is not None):
        raise NotImplementedError(f"the {name} backend synchronizes frame-wise statistics without a projection; "
                                  f"the reference backend runs sequence-wise and projected ones")
    if params.weight_hr is not None and not projection:
        raise NotImplementedError(f"the {name} backend has no projection (proj_size); use the reference backend")
    T, B, _ = inputs.x.shape
    if T == 0 or (B == 0 and group is None):
        raise ValueError(f"the {name} backend needs T > 0 and B > 0, got T={T}, B={B}")
    if inputs.lengths is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"inside a CUDA graph capture the {name} backend takes full-length batches only "
                           f"(lengths=None): a replay would read the lengths from a host buffer that is gone")


def compute_dtype(name: str, x: Tensor) -> torch.dtype:
    """The one dtype a call computes in: autocast's where it is on (as ``nn.LSTM`` under autocast), else x's;
    refused unless the kernels run it there."""
    device = x.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x.dtype
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"the {name} backend runs float32, float64, float16 and bfloat16, got {dtype}")
    if dtype == torch.bfloat16 and device.type == "cpu":
        raise TypeError("the Triton interpreter (CPU tensors) has no bfloat16; use float32, float64 or float16")
    return dtype


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics, accumulation and the cell state: float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cudnn_rnn_uses_tf32() -> bool:
    """Whether ``nn.LSTM`` (cuDNN's RNN) runs float32 as TF32 here: torch's per-operator setting where it
    has one (``torch.backends.cudnn.rnn.fp32_precision``, unset levels inherit), else ``cudnn.allow_tf32``."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is None:
        return bool(torch.backends.cudnn.allow_tf32)
    for setting in (rnn.fp32_precision, torch.backends.cudnn.fp32_precision,
                    getattr(torch.backends, "fp32_precision", "none")):
        if setting != "none":
            return setting == "tf32"
    return False


def recurrent_precision(dtype: torch.dtype, device: torch.device) -> str | None:
    """The ``tl.dot`` input precision of the recurrent GEMMs.

    float32: ``FUSED_BNLSTM_TRITON_PRECISION`` (``auto`` by default): ``auto`` does what ``nn.LSTM`` does on
    the same device, TF32 on CUDA where cuDNN's RNN would use it (torch's default) and IEEE otherwise;
    ``ieee``, ``tf32`` and ``tf32x3`` (three TF32 products, close to IEEE on tensor cores) force one.
    float64: IEEE. bf16 / fp16: None, their own tensor-core path with float32 accumulation.
    """
    if dtype in (torch.float16, torch.bfloat16):
        return None
    if dtype == torch.float64:
        return "ieee"
    setting = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    if setting not in PRECISIONS:
        raise ValueError(f"{PRECISION_ENV} must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting != "auto":
        return setting
    return "tf32" if device.type == "cuda" and _cudnn_rnn_uses_tf32() else "ieee"


def block_rows(B: int) -> int:
    """BB: the rows a program of the training kernels holds (every row of the batch, a power of two)."""
    return max(16, triton.next_power_of_2(B))


def host_to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on the kernels' device without a host sync: an asynchronous copy from pinned memory
    (the caching host allocator keeps the pinned block alive until the copy has run)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def device_steps(counts: tuple[int, ...], batch_stats: tuple[bool, ...], out: Tensor) -> Tensor:
    """The frame-wise per-step plan as the kernels read it, into ``out`` [T, 2] int32 (rows running, batch
    statistics (1) or the population's (0)): two fills when every step is alike (no padding; nothing to
    copy, so a caller's CUDA graph capture holds), else host ints copied without a sync."""
    if len(set(counts)) == 1 and len(set(batch_stats)) == 1:
        out[:, 0] = counts[0]
        out[:, 1] = int(batch_stats[0])
        return out
    host = torch.tensor(list(zip(counts, batch_stats)), dtype=torch.int32)
    return out.copy_(host.pin_memory() if out.device.type == "cuda" else host, non_blocking=True)


def pack_population(population: Population | None, normalization: str | None) -> Tensor | None:
    """The population's moments in the kernels' layout: frame [T, 18H] (means of ih | hh | c, then the
    variances), sequence [2, 4H] (means, then variances)."""
    if normalization == "frame":
        p = population
        return torch.cat([p.mean_ih, p.mean_hh, p.mean_c, p.var_ih, p.var_hh, p.var_c], dim=1).contiguous()
    if normalization == "sequence":
        return torch.cat([population.mean_ih, population.var_ih]).contiguous()
    return None


def moment_views(moments: Tensor | None, normalization: str | None) -> tuple[Tensor, ...] | None:
    """The kernels' moments buffer as ``finish_statistics`` takes it: frame [T, 18H] as (mean_ih, var_ih,
    mean_hh, var_hh, mean_c, var_c) [T, 4H] / [T, H]; sequence [2, 4H] as (mean_ih, var_ih) [1, 4H]."""
    if moments is None:
        return None
    if normalization == "sequence":
        return moments[0:1], moments[1:2]
    H = moments.shape[1] // 18
    mean, var = moments[:, :9 * H], moments[:, 9 * H:]
    return (mean[:, :4 * H], var[:, :4 * H], mean[:, 4 * H:8 * H], var[:, 4 * H:8 * H], mean[:, 8 * H:],
            var[:, 8 * H:])


def sequence_bn_forward(*, a_ih: Tensor, u: Tensor, gamma_ih: Tensor, population: Tensor, lengths: Tensor,
                        counts: tuple[int, ...], use_batch: bool, eps: float) -> Tensor:
    """u = gamma_ih * BN(a_ih) over every valid frame, into u [T, B, 4H]: with the batch's moments over
    ``sum(counts)`` frames (``use_batch``) or the population's [2, 4H]. Returns the moments used [2, 4H]."""
    T, B, G = a_ih.shape
    seq_stats = torch.empty(2, G, dtype=acc_dtype(a_ih.dtype), device=a_ih.device)
    kernels.sequence_bn_fwd_kernel[(triton.cdiv(G, _BLOCK_FEATURES),)](
        p_a=a_ih, p_u=u, p_gamma=gamma_ih, p_pop=population, p_lengths=lengths, p_stats=seq_stats,
        n=sum(counts), use_batch=int(use_batch), eps=eps, T=T, B=B, F=G, BR=_BLOCK_ROWS, BF=_BLOCK_FEATURES,
    )
    return seq_stats


def sequence_bn_backward(*, a_ih: Tensor, du: Tensor, gamma_ih: Tensor, seq_stats: Tensor, lengths: Tensor,
                         counts: tuple[int, ...], use_batch: bool, eps: float) -> tuple[Tensor, Tensor]:
    """da_ih [T, B, 4H] and dgamma_ih [4H] (accumulation dtype) from du [T, B, 4H], ``seq_stats`` being
    what ``sequence_bn_forward`` returned."""
    T, B, G = a_ih.shape
    da = torch.empty_like(du)
    dgamma = torch.empty(G, dtype=seq_stats.dtype, device=a_ih.device)
    kernels.sequence_bn_bwd_kernel[(triton.cdiv(G, _BLOCK_FEATURES),)](
        p_a=a_ih, p_du=du, p_da=da, p_gamma=gamma_ih, p_stats=seq_stats, p_lengths=lengths, p_dgamma=dgamma,
        n=sum(counts), use_batch=int(use_batch), eps=eps, T=T, B=B, F=G, BR=_BLOCK_ROWS, BF=_BLOCK_FEATURES,
    )
    return da, dgamma


def gradients_after_loop(*, da_hh: Tensor, da_ih: Tensor, dc0: Tensor, x: Tensor, h: Tensor, params: LayerParams,
                         sums: Tensor | None, dgamma_ih: Tensor | None, frame: bool, needs: tuple[bool, ...],
                         projection: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor | None, ...]:
    """The gradients over (x, h0, c0, *LayerParams) once a reverse loop has left da_hh, da_ih [T, B, 4H]
    (da_ih already through the sequence-wise BN), the c-state gradient before step 0 and the parameter
    sums [14H] (d(affine) [10H] | dbias [4H], summed over the steps; None without frame BN and bias).
    ``dgamma_ih``: sequence-wise, from ``sequence_bn_backward``. dx, dh0, dW_ih and dW_hh are GEMMs over all
    T*B frames (h: the states the recurrent GEMM read [T+1, B, P]); None where not needed or unused; cast to
    x's dtype. ``projection``: (dr [T, B, P], m [T, B, H]), the gradients of the projected states r_t and the
    unprojected outputs m_t (zero on finished rows), whose product over all frames is dW_hr."""
    T, B, _ = x.shape
    G = params.weight_hh.shape[0]
    H = G // 4
    affine = [dgamma_ih, None, None, None]
    if frame:
        affine = [sums[:4 * H], sums[4 * H:8 * H], sums[8 * H:9 * H], sums[9 * H:10 * H]]
    dbias = sums[10 * H:] if params.bias is not None else None
    dx = torch.matmul(da_ih, params.weight_ih) if needs[0] else None
    # every row runs step 0 (lengths >= 1): the h state before it gets da_hh_0 W_hh
    dh0 = torch.matmul(da_hh[0], params.weight_hh) if needs[1] else None
    # [4H, I] and [4H, P]: sums over all T*B frames of da^T x and da^T h_{t-1} (r_{t-1} with a projection); the
    # widths spelled out, as a synchronized rank may have no rows (B = 0)
    dW_ih = torch.matmul(da_ih.reshape(T * B, G).t(), x.reshape(T * B, x.shape[2])) if needs[3] else None
    dW_hh = torch.matmul(da_hh.reshape(T * B, G).t(), h[:T].reshape(T * B, h.shape[2])) if needs[4] else None
    cast = [None if g is None or not need else g.to(x.dtype, copy=True)
            for g, need in zip((dh0, dc0, dbias, *affine), (needs[1], needs[2], *needs[5:]))]
    dW_hr = None
    if projection is not None and needs[10]:
        dr, m = projection
        # [P, H]: r_t = W_hr m_t on the rows running at t, the only rows where m is not zero
        dW_hr = torch.matmul(dr.reshape(T * B, dr.shape[2]).t(), m.reshape(T * B, H))
    return (dx, cast[0], cast[1], dW_ih, dW_hh, *cast[2:], dW_hr)
