"""The BN-LSTM layer op on fused Triton kernels: one launch per time step forward, one per step backward.

Layout of the computation (kernels and their buffers in ``triton_kernels.py``; conventions and the BN
backward derivation in ``README.md`` beside this file):

- The input branch is **hoisted**: ``a_ih = x W_ih^T`` for all T steps is one GEMM (cuBLAS through
  ``torch.matmul``) before the recurrence, as haste and cuDNN do: it does not depend on h, and one
  [T*B, I] x [I, 4H] GEMM is far better shaped than T small ones inside the step kernel. Frame-wise, the
  step kernel normalizes it with the step's statistics; sequence-wise, one kernel normalizes it over every
  valid frame before the loop; with ``normalization=None`` it is added as is.
- Forward, one ``bnlstm_fwd_step_kernel`` launch per step t: a program owns BH hidden units of all four
  gates as one gate-strided [B, 4*BH] tile and every batch row, computes ``W_hh h_{t-1}`` for its columns
  (one dot per reduction chunk), both batch norms over the rows still running (or the population
  statistics), the bias, the gates, c_t, BN(c_t) and h_t, and saves ``W_hh h_{t-1}`` and the moments it
  used.
- Backward, one ``bnlstm_bwd_step_kernel`` launch per step in reverse: the h-state gradient from the next
  step's ``da_hh @ W_hh`` (every column of it, written by the previous launch), then the elementwise and
  BN backward of the program's tile. dW_ih, dW_hh, dx and dh0 are GEMMs over all steps after the loop;
  gamma, beta and bias gradients are per-step partial rows each program writes for its own columns,
  summed over the steps once after the loop (deterministic, no atomics).

- Without gradients and without batch statistics (eval, inference) one ``bnlstm_infer_step_kernel`` launch
  per step: the population moments, gamma, beta and the bias folded into one scale and shift per column
  and step, programs tiled over rows as well as columns, nothing saved.

- With a projection (LSTMP, ``proj_size``; ``weight_hr`` [P, H]) the step kernels' h is the unprojected
  m_t = o * tanh(BN(c_t)) and their recurrent dot reads a second history r [., B, P] with depth P. Between
  two forward launches one GEMM and a select on the host give r_t = W_hr m_t on the running rows (the
  output row), finished rows keeping r_{t-1}. In backward the host forms, before each launch, the gradient
  of r_t (the output's, plus step t + 1's da_hh W_hh, whose width P the kernel's column blocks do not own)
  and m_t's gradient dr_t W_hr, which the kernel reads as its output gradient; dW_hr is one GEMM after the
  loop. Without a projection r is h itself and the kernels run as before.

- Synchronized statistics (``LayerConfig.process_group``, frame-wise): the input branch's moments of every
  step in one all-reduce before the loop; per step the host forms a_hh and all-reduces its sums, and the
  forward kernel reads that a_hh and the group's moments (launched twice: c_t, then h_t after c_t's
  all-reduce); backward, three launches per step (the kernel's ``PHASE``) around two all-reduces of the step's
  sums. Never captured, never persistent; ``README.md`` beside this file has the details.

- On CUDA the step loops are captured as CUDA graphs per workspace and replayed (``_Workspace``;
  ``FUSED_BNLSTM_TRITON_GRAPHS=0`` launches every step from Python instead); a projection's host steps are
  captured with the launches.

Statistics, accumulation and the cell state are float32 (float64 for float64 tensors); bf16 and fp16 run
the GEMMs in their dtype with float32 accumulation; under autocast the op computes in autocast's dtype.
fp32 recurrent GEMMs follow ``nn.LSTM`` on the same device (TF32 on CUDA where cuDNN's RNN uses it) unless
``FUSED_BNLSTM_TRITON_PRECISION`` says otherwise (``triton_common.recurrent_precision``). A training
program holds every batch row of its columns in registers, which suits the batch sizes recurrent models
train with (B <= 512). No call reads a device tensor back to the host: the per-step plan is host ints
(``LayerInput.counts``).

``bnlstm_layer_triton`` is the backend's entry for both variants: these per-step launches, or the
persistent kernels of ``persistent_triton.py`` (the whole sequence in one launch), as ``variant`` chooses
(``FUSED_BNLSTM_TRITON_VARIANT``: ``auto``, ``step``, ``persistent``; a projection always runs per step).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import warnings
import weakref
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from fused_bnlstm.ops.common import (
    LayerConfig,
    LayerInput,
    LayerOutput,
    LayerParams,
    Population,
    finish_statistics,
    needs_reference_backward,
    pad_steps,
    reference_backward,
)
from fused_bnlstm.ops.naive import masked_moments
from fused_bnlstm.ops.triton_common import (
    PRECISION_ENV,
    PRECISIONS,
    acc_dtype,
    available,
    block_rows,
    check_call,
    compute_dtype,
    device_steps,
    gradients_after_loop,
    host_to_device,
    moment_views,
    pack_population,
    recurrent_precision,
    sequence_bn_backward,
    sequence_bn_forward,
    triton,
)

if triton is not None:
    from fused_bnlstm.ops import persistent_triton
    from fused_bnlstm.ops import triton_kernels as kernels

__all__ = ["GRAPHS_ENV", "PRECISION_ENV", "PRECISIONS", "VARIANT_ENV", "VARIANTS", "available", "bnlstm_layer_triton"]

# step loops replayed as CUDA graphs: 1 (default) or 0
GRAPHS_ENV = "FUSED_BNLSTM_TRITON_GRAPHS"

# which kernels a call runs (``_variant``): "auto" (default), "step" (a launch per step, this file) or
# "persistent" (the whole sequence in one launch, ``persistent_triton.py``)
VARIANT_ENV = "FUSED_BNLSTM_TRITON_VARIANT"
VARIANTS = ("auto", "step", "persistent")

# hidden units per program (the recurrent dots reduce in chunks of ``triton_kernels.BLOCK_K``)
_BLOCK_H = 16
# rows per program of the inference kernel, which tiles the batch
_INFER_ROWS = 32
# the most rows one program of the training kernels holds: sm90 compiles of BB = 512 need up to 216 KiB of
# shared memory (fp32 TF32 forward) of the 227 KiB there are; BB = 1024 needs 408 KiB and cannot launch
_MAX_ROWS = {torch.float64: 256}
_MAX_ROWS_DEFAULT = 512
# released workspaces kept for later calls of the same shapes (each holds its buffers and captured graphs)
_MAX_IDLE_WORKSPACES = 8


class _Plan(NamedTuple):
    """Everything of a call but the differentiable tensors: the per-step plan as host ints (no device
    reads), the configuration, and what a backward through the reference needs."""

    counts: tuple[int, ...]  # [T] rows still running at each step
    lengths: Tensor | None  # [B] int64 on the host (None: every row runs T steps)
    batch_stats: tuple[bool, ...]  # frame [T] / sequence [1]: whether batch statistics normalize
    use_batch_stats: bool  # training (or no running statistics): batch statistics are returned
    eps: float
    normalization: str | None
    precision: str | None  # tl.dot input_precision of the recurrent GEMMs
    population: Population | None  # as prepare_layer handed it, for ``reference_backward``
    group: object | None = None  # synchronized statistics: the torch.distributed process group


class _Operands(NamedTuple):
    """The tensors both step kernels read, in the kernels' layout (``triton_kernels.py``), and what the host
    steps of a projection read between the launches."""

    x_gates: Tensor  # [T, B, 4H] frame: W_ih x (raw); otherwise the finished input branch
    weight_hh: Tensor  # [4H, P] (P = H without a projection)
    bias: Tensor | None  # [4H]
    affine: Tensor | None  # [10H] gamma_ih | gamma_hh | gamma_c | beta_c, frame only
    steps: Tensor | None  # [T, 2] int32 rows running and batch statistics (1) or not (0) per step, frame only
    lengths: Tensor  # [B] int64 on the device
    weight_hr: Tensor | None  # [P, H] the projection, or None
    running: Tensor | None  # [T, B, 1] bool, the rows running at each step (projection or synchronized only)


class _Recurrence(NamedTuple):
    """What the forward step launches leave."""

    out: Tensor  # [T, B, P] the layer's output
    h: Tensor  # [T+1, B, H] the kernels' h states (input dtype); [2, B, H] when nothing is saved
    c: Tensor  # [T+1, B, H] c states (accumulation dtype); [2, B, H] when nothing is saved
    r: Tensor  # [T+1, B, P] the states the recurrent dot reads (rows as h): h itself without a projection
    m: Tensor  # [T, B, H] the kernels' output rows (zero on finished rows): out itself without a projection
    a_hh: Tensor | None = None  # [T, B, 4H] W_hh r_{t-1} (accumulation dtype), saved for backward
    stats: Tensor | None = None  # [T, 18H] the moments each step used (frame)


class _Saved(NamedTuple):
    """What forward keeps for backward besides the ``_Operands``."""

    x: Tensor  # [T, B, I]
    weight_ih: Tensor  # [4H, I]
    gamma_ih: Tensor | None  # [4H], read by the sequence-BN backward
    a_ih: Tensor | None  # [T, B, 4H] the raw input branch, sequence only
    seq_stats: Tensor | None  # [2, 4H] the sequence moments used (means, then variances)
    h: Tensor  # [T+1, B, P] the states the recurrent GEMM read (``_Recurrence.r``)
    c: Tensor
    a_hh: Tensor
    stats: Tensor | None
    m: Tensor | None  # [T, B, H] with a projection, the kernels' output rows m_t (zero on finished rows)


class _Gradients(NamedTuple):
    """What the backward step launches leave."""

    da: Tensor  # [2, T, B, 4H] da_hh, da_ih (frame); [1, T, B, 4H] da_hh = da_ih otherwise
    dstate: Tensor  # [2, B, H] the h and c state gradients after step 0's launch
    dparams: Tensor | None  # [T, 14H] per-step partial sums: d(affine) [10H] | dbias [4H]
    dr: Tensor | None  # [T+1, B, P] with a projection, the gradients of the projected states r_t


def _num_warps(B: int) -> int:
    # a program holds a [BB, 4*BH] tile: more warps for more rows keep it in registers
    return min(16, max(4, block_rows(B) // 8))


def _step_launch(B: int, H: int, plan: _Plan) -> dict:
    """The launch arguments every step of both directions shares."""
    return dict(eps=plan.eps, B=B, H=H, PRECISION=plan.precision, BB=block_rows(B), BH=_BLOCK_H,
                num_warps=_num_warps(B))


def _graphs_enabled(device: torch.device) -> bool:
    """Whether the step loops replay as CUDA graphs: on CUDA unless ``FUSED_BNLSTM_TRITON_GRAPHS=0``, and
    never while the caller captures a graph itself (its capture then records the launches)."""
    return (device.type == "cuda" and os.environ.get(GRAPHS_ENV, "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


def _capture(launches: Callable[[], None]) -> Callable[[], None]:
    """Capture ``launches`` (which touch only a workspace's buffers) as a CUDA graph; returns its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        launches()
    return graph.replay


class _Workspace:
    """The buffers of one layer call and, with graphs, the step loops captured on them.

    Without a key (graphs off): ``empty`` allocates, ``take`` passes a tensor through and ``run`` launches.
    With a key (shapes, dtypes, modes): the workspace serves one call at a time and goes back to the pool
    for later calls of the same key. ``empty`` and ``take`` hand out its fixed buffers (``take`` copies the
    call's tensor in), and ``run`` launches eagerly the first time (that compiles), captures the launches
    as a CUDA graph the second time and replays it from then on. A graph bakes in every pointer and
    scalar: the launches it replays read and write these buffers only.
    """

    def __init__(self, key=None):
        self.key = key
        self.buffers: dict[str, Tensor] = {}
        self.replays: dict[str, Callable[[], None]] = {}
        self.runs: collections.Counter = collections.Counter()

    def empty(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.key is None:
            return torch.empty(shape, dtype=dtype, device=device)
        if name not in self.buffers:
            self.buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return self.buffers[name]

    def take(self, name: str, tensor: Tensor | None) -> Tensor | None:
        if self.key is None or tensor is None:
            return tensor
        return self.empty(name, tensor.shape, tensor.dtype, tensor.device).copy_(tensor)

    def take_host(self, name: str, host: Tensor, device: torch.device) -> Tensor:
        """A host tensor on the device without a host sync (an asynchronous copy from pinned memory)."""
        if self.key is None:
            return host_to_device(host, device)
        source = host.pin_memory() if device.type == "cuda" else host
        return self.empty(name, host.shape, host.dtype, device).copy_(source, non_blocking=True)

    def run(self, phase: str, launches: Callable[[], None]) -> None:
        if self.key is None:
            launches()
            return
        if phase not in self.replays:
            self.runs[phase] += 1
            if self.runs[phase] == 1:
                launches()
                return
            try:
                self.replays[phase] = _capture(launches)
            except RuntimeError as error:
                # a capture the driver refuses: this phase keeps launching step by step
                warnings.warn(f"fused_bnlstm: capturing the Triton step loop as a CUDA graph failed ({error}); "
                              f"launching each step instead (set {GRAPHS_ENV}=0 to skip the attempt)")
                self.replays[phase] = launches
        self.replays[phase]()


class _WorkspacePool:
    """Released workspaces by key, the least recently used dropped past ``_MAX_IDLE_WORKSPACES``."""

    def __init__(self):
        self.idle: collections.OrderedDict[int, _Workspace] = collections.OrderedDict()
        self.lock = threading.Lock()

    def acquire(self, key) -> _Workspace:
        with self.lock:
            for ident, workspace in self.idle.items():
                if workspace.key == key:
                    del self.idle[ident]
                    return workspace
        return _Workspace(key)

    def release(self, workspace: _Workspace) -> None:
        if workspace.key is None:
            return
        with self.lock:
            self.idle[id(workspace)] = workspace
            while len(self.idle) > _MAX_IDLE_WORKSPACES:
                self.idle.popitem(last=False)


_WORKSPACES = _WorkspacePool()


def _workspace_for(*, x: Tensor, params: LayerParams, plan: _Plan, population: Tensor | None,
                   save: bool) -> _Workspace:
    """A pooled workspace where graphs are on, else a plain one; the key is everything a graph bakes in."""
    if not _graphs_enabled(x.device) or plan.group is not None:
        # (synchronized statistics: the loops call collectives between the launches, never captured)
        return _Workspace()
    projection = None if params.weight_hr is None else params.weight_hr.shape
    key = (x.device, x.shape[:2], params.weight_hh.shape, projection, x.dtype,
           None if population is None else population.dtype, params.bias is not None, plan.normalization,
           plan.use_batch_stats, plan.eps, plan.precision, save)
    return _WORKSPACES.acquire(key)


def _state_buffers(*, workspace: _Workspace, operands: _Operands, h0: Tensor, c0: Tensor,
                   rows: int) -> _Recurrence:
    """The buffers a forward loop writes, the initial states in row 0 of ``rows`` (T + 1, or two slots).

    With a projection the kernels' h (m_t) only feeds its own step's output: its row 0 is zeros (a finished
    row's kept m is never read), r [rows, B, P] starts at h0 and the kernels' output rows m [T, B, H] are
    projected into out [T, B, P] between the launches."""
    T, B, G = operands.x_gates.shape
    H = G // 4
    dtype, device = operands.x_gates.dtype, operands.x_gates.device
    h = workspace.empty("h", (rows, B, H), dtype, device)
    c = workspace.empty("c", (rows, B, H), acc_dtype(dtype), device)
    c[0] = c0
    out = workspace.empty("out", (T, B, h0.shape[1]), dtype, device)
    if operands.weight_hr is None:
        h[0] = h0
        return _Recurrence(out=out, h=h, c=c, r=h, m=out)
    h[0] = 0
    r = workspace.empty("r", (rows, B, h0.shape[1]), dtype, device)
    r[0] = h0
    return _Recurrence(out=out, h=h, c=c, r=r, m=workspace.empty("m", (T, B, H), dtype, device))


def _project(*, rec: _Recurrence, operands: _Operands, t: int) -> None:
    """After step t's launch of a projected layer: the output row out[t] = W_hr m_t [B, P] (zero on finished
    rows, as m_t is) and r_t = out[t] on the rows running at t, finished rows keeping r_{t-1}."""
    if operands.weight_hr is None:
        return
    # r's rows before and after step t: t and t + 1 of T + 1, or slots t % 2 and the other of two
    rows = rec.r.shape[0]
    torch.matmul(rec.m[t], operands.weight_hr.t(), out=rec.out[t])
    torch.where(operands.running[t], rec.out[t], rec.r[t % rows], out=rec.r[(t + 1) % rows])


class _ForwardSync(NamedTuple):
    """What a synchronized forward loop reads besides the ``_Operands``: the group's moments stand in as the
    population (the kernels normalize with them as they would with population statistics)."""

    population: Tensor  # [T, 18H] the call's population rows, the group's moments written over the batch steps'
    steps: Tensor  # [T, 2] int32 the plan with every step's batch-statistics flag off
    running: Tensor  # [T, B] bool, the rows running at each step
    counts: Tensor  # [T, 1] the group's rows at each step (accumulation dtype, at least 1)
    weight_hh_t: Tensor  # [P, 4H] W_hh^T in the accumulation dtype, for the host's a_hh


def _put_moments(population: Tensor, offset: int, moments: tuple[Tensor, Tensor]) -> None:
    """Write (mean, var) [..., F] into population rows [..., 18H] (layout in ``triton_kernels.py``) at the
    quantity starting at column ``offset`` (ih 0, hh 4H, c 8H)."""
    mean, var = moments
    H = population.shape[-1] // 18
    population[..., offset:offset + mean.shape[-1]] = mean
    population[..., 9 * H + offset:9 * H + offset + var.shape[-1]] = var


def _forward_sync(*, operands: _Operands, population: Tensor, plan: _Plan) -> _ForwardSync:
    """Before a synchronized loop: the input branch's group moments of every step with batch statistics in
    one all-reduce [2, T', 4H] (those steps are a prefix: rows only stop running)."""
    T, B, G = operands.x_gates.shape
    acc, device = acc_dtype(operands.x_gates.dtype), operands.x_gates.device
    counts = host_to_device(torch.tensor(plan.counts, dtype=acc).clamp_min(1).unsqueeze(1), device)
    steps = operands.steps.clone()
    steps[:, 1] = 0
    sync = _ForwardSync(population=population.clone(), steps=steps, running=operands.running[..., 0], counts=counts,
                        weight_hh_t=operands.weight_hh.to(acc).t())
    first = plan.batch_stats.index(False) if False in plan.batch_stats else T
    if first > 0:
        moments = masked_moments(operands.x_gates[:first], sync.running[:first], counts[:first], plan.group)
        _put_moments(sync.population[:first], 0, moments)
    return sync


def _synced_step(*, rec: _Recurrence, sync: _ForwardSync, plan: _Plan, t: int, launch: Callable[[int], None]):
    """Step t of a synchronized loop: a_hh = r_{t-1} W_hh^T [B, 4H] on the host; with batch statistics its
    group moments [2, 4H], a launch that gives c_t, c_t's group moments [2, H], and a second launch for h_t
    (the first used the old c moments; the gates and c_t come out the same)."""
    torch.matmul(rec.r[t].to(sync.weight_hh_t.dtype), sync.weight_hh_t, out=rec.a_hh[t])
    if not plan.batch_stats[t]:
        launch(t)
        return
    H = rec.c.shape[2]
    _put_moments(sync.population[t], 4 * H, masked_moments(rec.a_hh[t], sync.running[t], sync.counts[t], plan.group))
    launch(t)
    _put_moments(sync.population[t], 8 * H, masked_moments(rec.c[t + 1], sync.running[t], sync.counts[t], plan.group))
    launch(t)


def _recurrence_forward(*, workspace: _Workspace, operands: _Operands, h0: Tensor, c0: Tensor,
                        population: Tensor | None, plan: _Plan, save: bool) -> _Recurrence:
    """The recurrence, one launch per step; ``save`` keeps the state history and a_hh for backward.

    Frame-wise with a process group (``plan.group``) the loop is synchronized (``_forward_sync``,
    ``_synced_step``): the state history and a_hh are kept whatever ``save`` says, and the kernels read the
    host's a_hh and normalize with the group's moments."""
    T, B, G = operands.x_gates.shape
    H = G // 4
    acc, device = acc_dtype(operands.x_gates.dtype), operands.x_gates.device
    sync = None
    if plan.group is not None and operands.affine is not None:
        sync = _forward_sync(operands=operands, population=population, plan=plan)
        save = True
    rec = _state_buffers(workspace=workspace, operands=operands, h0=h0, c0=c0, rows=T + 1 if save else 2)
    a_hh = workspace.empty("a_hh", (T, B, G), acc, device) if save else None
    stats = workspace.empty("stats", (T, 18 * H), acc, device) if operands.affine is not None else None
    rec = rec._replace(a_hh=a_hh, stats=stats)
    launch = _step_launch(B, H, plan)
    grid = (triton.cdiv(H, _BLOCK_H),)

    def step(t):
        kernels.bnlstm_fwd_step_kernel[grid](
            p_x_gates=operands.x_gates, p_w_hh=operands.weight_hh if sync is None else None, p_bias=operands.bias,
            p_affine=operands.affine, p_pop=population if sync is None else sync.population,
            p_steps=operands.steps if sync is None else sync.steps, p_lengths=operands.lengths, p_h=rec.h, p_r=rec.r,
            p_c=rec.c, p_out=rec.m, p_a_hh=a_hh, p_stats=stats, t=t, P=rec.r.shape[2], **launch,
        )

    def launches():
        for t in range(T):
            if sync is None:
                step(t)
            else:
                _synced_step(rec=rec, sync=sync, plan=plan, t=t, launch=step)
            if operands.weight_hr is not None:
                _project(rec=rec, operands=operands, t=t)

    workspace.run("forward", launches)
    return rec


def _recurrence_infer(*, workspace: _Workspace, operands: _Operands, h0: Tensor, c0: Tensor,
                      fold: Tensor | None, plan: _Plan) -> _Recurrence:
    """The recurrence without batch statistics and without saving: programs tile columns and rows, the
    states live in two slots, frame-wise normalization is the folded per-step affine map ``fold``."""
    T, B, G = operands.x_gates.shape
    H = G // 4
    rec = _state_buffers(workspace=workspace, operands=operands, h0=h0, c0=c0, rows=2)
    grid = (triton.cdiv(H, _BLOCK_H), triton.cdiv(B, _INFER_ROWS))
    bias = None if fold is not None else operands.bias

    def launches():
        for t in range(T):
            kernels.bnlstm_infer_step_kernel[grid](
                p_x_gates=operands.x_gates, p_w_hh=operands.weight_hh, p_bias=bias, p_fold=fold,
                p_lengths=operands.lengths, p_h=rec.h, p_r=rec.r, p_c=rec.c, p_out=rec.m, t=t, B=B, H=H,
                P=rec.r.shape[2], PRECISION=plan.precision, BB=_INFER_ROWS, BH=_BLOCK_H, num_warps=4,
            )
            if operands.weight_hr is not None:
                _project(rec=rec, operands=operands, t=t)

    workspace.run("forward", launches)
    return rec


def _fold_population(*, params: LayerParams, population: Tensor, eps: float) -> Tensor:
    """Frame-wise normalization with population moments as per-step affine maps, in the accumulation dtype:
    [T, 14H] = scale of a_ih | scale of a_hh | shift of the gates (bias included) [4H each], scale | shift
    of c [H each], where scale = gamma / sqrt(var + eps) and shift = beta - mean * scale."""
    acc = acc_dtype(params.weight_hh.dtype)
    H = params.gamma_c.shape[0]
    mean, var = population.to(acc).split(9 * H, dim=1)  # [T, 9H] each: ih | hh | c
    gamma = torch.cat([params.gamma_ih, params.gamma_hh, params.gamma_c]).to(acc)
    scale = gamma * torch.rsqrt(var + eps)  # [T, 9H]
    shift = -(mean * scale)
    shift_gates = shift[:, :4 * H] + shift[:, 4 * H:8 * H]
    if params.bias is not None:
        shift_gates = shift_gates + params.bias.to(acc)
    shift_c = shift[:, 8 * H:] + params.beta_c.to(acc)
    return torch.cat([scale[:, :8 * H], shift_gates, scale[:, 8 * H:], shift_c], dim=1).contiguous()


def _project_backward(*, operands: _Operands, t: int, da_hh: Tensor, dout: Tensor, dr: Tensor,
                      dh: Tensor) -> None:
    """With a projection, before step t's backward launch: dr[t], the gradient of r_t [B, P], then the
    whole gradient of m_t, dh[t] = dr[t] W_hr [B, H] (the kernel reads its running rows only).

    r_t fed step t + 1's recurrent GEMM on the rows running there (da_hh_{t+1} W_hh, the launch before this
    one having written da_hh_{t+1}) and was carried on unchanged by the rows finished there (dr[t + 1];
    dr[T] holds h_n's cotangent); on the rows running at t it is also the output row."""
    carry = dr[t + 1]
    if t + 1 < dout.shape[0]:
        carry = torch.where(operands.running[t + 1], torch.matmul(da_hh[t + 1], operands.weight_hh), carry)
    torch.where(operands.running[t], carry + dout[t], carry, out=dr[t])
    torch.matmul(dr[t], operands.weight_hr, out=dh[t])


def _all_reduce_row(dparams: Tensor, t: int, columns: slice, group) -> None:
    """The group's sums of step t's ``dparams`` row (this rank's) over ``columns``, into the scratch row T."""
    sums = dparams[t, columns].clone()
    torch.distributed.all_reduce(sums, group=group)
    dparams[-1, columns] = sums


def _recurrence_backward(*, workspace: _Workspace, operands: _Operands, saved: _Saved,
                         cotangents: tuple[Tensor, Tensor, Tensor], plan: _Plan) -> _Gradients:
    """Reverse-time launches over what ``_recurrence_forward`` saved (with a projection, each launch after
    ``_project_backward``'s host steps).

    Synchronized (frame-wise with ``plan.group``), a step with batch statistics runs in three launches
    (``bnlstm_bwd_step_kernel``'s ``PHASE``) around two all-reduces of this rank's sums from the step's
    ``dparams`` row into a scratch row T: BN(c)'s (sum dy * xhat_c, sum dy) [2H], then the whole row [14H]
    (the gates' sum dz * xhat_ih, sum dz * xhat_hh and sum dz, and BN(c)'s again)."""
    dout, dh_n, dc_n = cotangents
    T, B, G = operands.x_gates.shape
    H = G // 4
    dtype, device = operands.x_gates.dtype, operands.x_gates.device
    frame = operands.affine is not None
    synced = frame and plan.group is not None
    # [2, B, H] the state gradients the launches update in place: a copy, never the incoming cotangents
    dstate = workspace.empty("dstate", (2, B, H), saved.c.dtype, device)
    dstate[1] = dc_n
    da = workspace.empty("da", (2 if frame else 1, T, B, G), dtype, device)
    has_sums = frame or operands.bias is not None
    dparams = workspace.empty("dparams", (T + synced, 14 * H), saved.c.dtype, device) if has_sums else None
    if synced:
        # (the scratch row: phase 1 reads it before anything is reduced into it, for nothing it keeps)
        dparams[T] = 0
    dout = workspace.take("dout", dout.contiguous())
    # without a projection the kernel forms the h-state gradient itself (da_hh_{t+1} W_hh) and reads the
    # output's gradient; with one it reads m_t's whole gradient dh (its h-state gradient stays zero) and
    # p_w_hh None turns its recurrent dot off
    dr, dh, weight_hh = None, dout, operands.weight_hh
    if operands.weight_hr is None:
        dstate[0] = dh_n
    else:
        dstate[0] = 0
        dr = workspace.empty("dr", (T + 1, B, dh_n.shape[1]), dtype, device)
        dr[T] = dh_n
        dh, weight_hh = workspace.empty("dh", (T, B, H), dtype, device), None
    launch = _step_launch(B, H, plan)
    grid = (triton.cdiv(H, _BLOCK_H),)

    def step(t, phase):
        kernels.bnlstm_bwd_step_kernel[grid](
            p_x_gates=operands.x_gates, p_w_hh=weight_hh, p_bias=operands.bias, p_affine=operands.affine,
            p_stats=saved.stats, p_steps=operands.steps, p_lengths=operands.lengths, p_c=saved.c, p_a_hh=saved.a_hh,
            p_dout=dh, p_dstate=dstate, p_da=da, p_dparams=dparams, t=t, T=T, PHASE=phase, **launch,
        )

    def launches():
        for t in range(T - 1, -1, -1):
            if dr is not None:
                _project_backward(operands=operands, t=t, da_hh=da[0], dout=dout, dr=dr, dh=dh)
            if not (synced and plan.batch_stats[t]):
                step(t, 0)
                continue
            step(t, 1)
            _all_reduce_row(dparams, t, slice(8 * H, 10 * H), plan.group)
            step(t, 2)
            _all_reduce_row(dparams, t, slice(None), plan.group)
            step(t, 3)

    workspace.run("backward", launches)
    return _Gradients(da=da, dstate=dstate, dparams=None if dparams is None else dparams[:T], dr=dr)


def _layer_forward(*, x: Tensor, h0: Tensor, c0: Tensor, params: LayerParams, plan: _Plan,
                   population: Tensor | None, workspace: _Workspace, save: bool):
    """The hoisted input GEMM, the input branch's normalization (sequence-wise), then the recurrence.

    Returns out, h_n, c_n (never a workspace buffer), the moments buffer to return statistics from (frame
    [T, 18H], sequence [2, 4H], else None), and, when ``save``, the ``_Operands`` and ``_Saved`` backward
    needs.
    """
    T, B, _ = x.shape
    G = params.weight_hh.shape[0]
    frame = plan.normalization == "frame"
    device = x.device
    x_gates = workspace.empty("x_gates", (T, B, G), x.dtype, device)
    if plan.lengths is None:
        lengths = workspace.empty("lengths", (B,), torch.int64, device).fill_(T)
    else:
        lengths = workspace.take_host("lengths", plan.lengths, device)
    running = None
    if params.weight_hr is not None or plan.group is not None:
        # [T, B, 1] the rows running at each step, which a projection's host steps select and a synchronized
        # loop sums over
        step_index = torch.arange(T, device=device).unsqueeze(1)
        running = torch.lt(step_index, lengths, out=workspace.empty("running", (T, B), torch.bool, device))
        running = running.unsqueeze(2)
    seq_stats = None
    if plan.normalization == "sequence":
        # [T, B, 4H] the hoisted input branch, one GEMM over every step, then BN over every valid frame
        a_ih = torch.matmul(x, params.weight_ih.t())
        seq_stats = sequence_bn_forward(a_ih=a_ih, u=x_gates, gamma_ih=params.gamma_ih, population=population,
                                        lengths=lengths, counts=plan.counts, use_batch=plan.batch_stats[0],
                                        eps=plan.eps)
    else:
        a_ih = torch.matmul(x, params.weight_ih.t(), out=x_gates)
    # nothing to save and no batch statistics to use or return: the inference kernel
    infer = not save and (not frame or not plan.use_batch_stats)
    affine = steps = None
    if frame and not infer:
        affine = workspace.take("affine", torch.cat([params.gamma_ih, params.gamma_hh, params.gamma_c,
                                                     params.beta_c]))
        steps = device_steps(plan.counts, plan.batch_stats, workspace.empty("steps", (T, 2), torch.int32, device))
    operands = _Operands(x_gates=x_gates, weight_hh=workspace.take("weight_hh", params.weight_hh),
                         bias=workspace.take("bias", params.bias), affine=affine, steps=steps, lengths=lengths,
                         weight_hr=workspace.take("weight_hr", params.weight_hr), running=running)
    if infer:
        fold = _fold_population(params=params, population=population, eps=plan.eps) if frame else None
        rec = _recurrence_infer(workspace=workspace, operands=operands, h0=h0, c0=c0,
                                fold=workspace.take("fold", fold), plan=plan)
    else:
        rec = _recurrence_forward(workspace=workspace, operands=operands, h0=h0, c0=c0,
                                  population=workspace.take("pop", population) if frame else None, plan=plan,
                                  save=save)
    # the state after the last step: row T of the history (kept when saving, and by a synchronized loop), or
    # slot T % 2 of two
    last = T if rec.r.shape[0] == T + 1 else T % 2
    h_n, c_n = rec.r[last].clone(), rec.c[last].to(x.dtype, copy=True)
    # a workspace that outlives this call hands out copies
    out = rec.out if workspace.key is None else rec.out.clone()
    moments = rec.stats if frame else seq_stats
    if moments is not None and workspace.key is not None:
        moments = moments.clone()
    if not save:
        return out, h_n, c_n, moments, None, None
    saved = _Saved(x=x, weight_ih=params.weight_ih, gamma_ih=params.gamma_ih,
                   a_ih=a_ih if seq_stats is not None else None, seq_stats=seq_stats, h=rec.r, c=rec.c,
                   a_hh=rec.a_hh, stats=rec.stats, m=None if params.weight_hr is None else rec.m)
    return out, h_n, c_n, moments, operands, saved


def _layer_backward(*, workspace: _Workspace, operands: _Operands, saved: _Saved,
                    cotangents: tuple[Tensor, Tensor, Tensor], needs: tuple[bool, ...],
                    plan: _Plan) -> tuple[Tensor | None, ...]:
    """The whole backward: reverse-time launches, then the weight, input and h0 gradients as GEMMs over all
    steps. ``needs`` and the result run over (x, h0, c0, *LayerParams); None where not needed or unused.
    """
    grads = _recurrence_backward(workspace=workspace, operands=operands, saved=saved, cotangents=cotangents,
                                 plan=plan)
    da_ih, dgamma_ih = grads.da[-1], None
    if plan.normalization == "sequence":
        da_ih, dgamma_ih = sequence_bn_backward(a_ih=saved.a_ih, du=da_ih, gamma_ih=saved.gamma_ih,
                                                seq_stats=saved.seq_stats, lengths=operands.lengths,
                                                counts=plan.counts, use_batch=plan.batch_stats[0], eps=plan.eps)
    params = LayerParams(weight_ih=saved.weight_ih, weight_hh=operands.weight_hh, bias=operands.bias)
    return gradients_after_loop(da_hh=grads.da[0], da_ih=da_ih, dc0=grads.dstate[1], x=saved.x, h=saved.h,
                                params=params, sums=None if grads.dparams is None else grads.dparams.sum(0),
                                dgamma_ih=dgamma_ih, frame=plan.normalization == "frame", needs=needs,
                                projection=None if grads.dr is None else (grads.dr[:-1], saved.m))


class BNLSTMLayerFunction(torch.autograd.Function):
    """One layer-direction on the fused kernels: outputs out, h_n, c_n and the (non-differentiable) moments
    buffer. Arguments: the ``_Plan`` and the packed population, then x, h0, c0 and the ``LayerParams``
    tensors in order. The backward runs the fused kernels, or the reference's VJP where the caller wants a
    differentiable backward (``create_graph``) or batches the cotangents (``torch.func``)."""

    @staticmethod
    def forward(ctx, plan, population, x, h0, c0, *params):
        layer_params = LayerParams(*params)
        workspace = _workspace_for(x=x, params=layer_params, plan=plan, population=population, save=True)
        out, h_n, c_n, moments, operands, saved = _layer_forward(
            x=x, h0=h0, c0=c0, params=layer_params, plan=plan, population=population, workspace=workspace,
            save=True,
        )
        # the workspace (whose buffers backward reads) goes back to the pool when autograd frees the saved
        # tensors: after backward, or with the graph when backward never runs
        token = torch.empty(0)
        weakref.finalize(token, _WORKSPACES.release, workspace)
        ctx.save_for_backward(*operands, *saved, token, x, h0, c0, *params)
        ctx.plan, ctx.workspace = plan, workspace
        if moments is not None:
            ctx.mark_non_differentiable(moments)
        return out, h_n, c_n, moments

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n, _):
        tensors = ctx.saved_tensors
        n_operands, n_saved = len(_Operands._fields), len(_Saved._fields)
        x, h0, c0, *params = tensors[n_operands + n_saved + 1:]
        plan = ctx.plan
        if needs_reference_backward(dout, dh_n, dc_n):
            inputs = LayerInput(x=x, h0=h0, c0=c0, lengths=plan.lengths, counts=plan.counts,
                                batch_stats=plan.batch_stats, population=plan.population)
            config = LayerConfig(normalization=plan.normalization, eps=plan.eps, use_batch_stats=plan.use_batch_stats,
                                 process_group=plan.group)
            grads = reference_backward(inputs=inputs, params=LayerParams(*params), config=config,
                                       cotangents=(dout, dh_n, dc_n), needs_input_grad=ctx.needs_input_grad[2:])
        else:
            grads = _layer_backward(workspace=ctx.workspace, operands=_Operands(*tensors[:n_operands]),
                                    saved=_Saved(*tensors[n_operands:n_operands + n_saved]),
                                    cotangents=(dout, dh_n, dc_n), needs=ctx.needs_input_grad[2:], plan=plan)
        return (None, None, *grads)


def variant(B: int, H: int, dtype: torch.dtype, device: torch.device, projection: bool = False,
            synchronized: bool = False) -> str:
    """Which kernels a call runs, ``"step"`` or ``"persistent"``: ``FUSED_BNLSTM_TRITON_VARIANT`` (``auto`` by
    default) names one, or ``auto`` takes ``persistent_triton.persistent_preferred`` on CUDA (a prediction
    from the sm90 compile report, ``README.md``) and the per-step launches elsewhere (the interpreter proves
    both; on the CPU it runs the per-step ones unless told otherwise). A call with a projection
    (``projection``) runs the per-step launches whatever the setting: the persistent kernels have none; so
    does a synchronized call (``synchronized``: a process group's statistics), whose collectives go between
    the per-step launches."""
    setting = os.environ.get(VARIANT_ENV, "auto").strip().lower() or "auto"
    if setting not in VARIANTS:
        raise ValueError(f"{VARIANT_ENV} must be one of {', '.join(VARIANTS)}, got {setting!r}")
    if projection or synchronized:
        return "step"
    if setting != "auto":
        return setting
    preferred = device.type == "cuda" and persistent_triton.persistent_preferred(B, H, dtype, device)
    return "persistent" if preferred else "step"


def bnlstm_layer_triton(*, inputs: LayerInput, params: LayerParams, config: LayerConfig) -> LayerOutput:
    """One BN-LSTM layer-direction on the fused Triton kernels (``prepare_layer`` has checked the inputs):
    the per-step launches of this file or the persistent kernels, as ``variant`` says.

    Returns as ``fused_bnlstm.ops.bnlstm_layer`` (the reference ``bnlstm_layer_naive`` is the oracle this is
    tested against): output [T, B, P], h_n [B, P], c_n [B, H] (P = proj_size with a projection, else H) and
    the ``BatchStatistics`` used.
    """
    check_call("'triton'", inputs, params, config, projection=True, synchronized=True)
    x = inputs.x
    device = x.device
    T, B, _ = x.shape
    # one compute dtype for every operand; casts and layout fixes happen below, differentiably, at the one
    # boundary into the kernels
    dtype = compute_dtype("'triton'", x)
    group = config.process_group
    if variant(B, inputs.c0.shape[1], dtype, device, projection=params.weight_hr is not None,
               synchronized=group is not None) == "persistent":
        return persistent_triton.bnlstm_layer_triton_persistent(inputs=inputs, params=params, config=config)
    if group is not None:
        # the group's steps (len(counts)): this rank's rows have finished on the ones past its own T
        x, padded_population = pad_steps(x, inputs.population, len(inputs.counts))
        lengths = inputs.lengths
        if lengths is None and x.shape[0] > T:
            lengths = torch.full((B,), T, dtype=torch.int64)
        inputs = inputs._replace(x=x, lengths=lengths, population=padded_population)

    tensors = [None if v is None else v.to(dtype).contiguous() for v in (x, inputs.h0, inputs.c0, *params)]
    plan = _Plan(counts=inputs.counts, lengths=inputs.lengths, batch_stats=inputs.batch_stats,
                 use_batch_stats=bool(config.use_batch_stats), eps=float(config.eps),
                 normalization=config.normalization, precision=recurrent_precision(dtype, device),
                 population=inputs.population, group=group)
    population = pack_population(inputs.population, config.normalization)
    needs_grad = torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in tensors)
    max_rows = _MAX_ROWS.get(dtype, _MAX_ROWS_DEFAULT)
    if B > max_rows and (needs_grad or (config.normalization == "frame" and config.use_batch_stats)):
        raise ValueError(
            f"the 'triton' backend holds every batch row of a step in one program when it trains: B <= "
            f"{max_rows} for {dtype}, got B={B}; split the batch or use backend='reference' (eval and "
            f"inference without gradients tile the batch and have no such limit)"
        )
    # Triton launches on the current device: make it the tensors'
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with torch.autocast(device.type, enabled=False), on_device:
        if needs_grad:
            out, h_n, c_n, moments = BNLSTMLayerFunction.apply(plan, population, *tensors)
        else:
            params = LayerParams(*tensors[3:])
            workspace = _workspace_for(x=tensors[0], params=params, plan=plan, population=population, save=False)
            out, h_n, c_n, moments, _, _ = _layer_forward(
                x=tensors[0], h0=tensors[1], c0=tensors[2], params=params, plan=plan, population=population,
                workspace=workspace, save=False,
            )
            _WORKSPACES.release(workspace)
    # (synchronized: this rank's steps of the group's, every one of which the backward reaches)
    out = out[:T]
    stats = finish_statistics(inputs, config, moment_views(moments, config.normalization), x.dtype)
    return LayerOutput(output=out, h_n=h_n, c_n=c_n, stats=stats)
