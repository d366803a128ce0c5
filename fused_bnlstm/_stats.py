"""Population statistics: slots per time step, the BatchNorm1d-exact update, and exact re-estimation.

Every (layer, direction) of a frame-wise BNLSTM holds, per normalized quantity q in (ih, hh, c),
``running_mean_q`` / ``running_var_q`` of shape [max_length, F] and one ``num_batches_tracked`` [max_length]
(the three quantities are always updated together). Step t of a call with ``time_offset`` reads and updates
slot ``min(t + time_offset, max_length - 1)``. Each slot behaves as its own ``torch.nn.BatchNorm1d``:

    running_mean = (1 - momentum) * running_mean + momentum * batch_mean
    running_var  = (1 - momentum) * running_var  + momentum * batch_var * n / (n - 1)     # unbiased
    momentum=None: a cumulative average, factor 1 / num_batches_tracked

Steps are applied in time order; only the last slot can be hit more than once in a call (every step past
``max_length - 1``), and its repeated updates are applied in closed form.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor

from fused_bnlstm.ops import BatchStatistics

QUANTITIES = ("ih", "hh", "c")


def slot_indices(T: int, time_offset: int, num_slots: int) -> Tensor:
    """[T] int64 (CPU): the statistics slot each step reads, ``min(t + time_offset, num_slots - 1)``."""
    return (torch.arange(T) + time_offset).clamp_(max=num_slots - 1)


class RunningStats:
    """A view of one (layer, direction)'s running buffers: ``mean[q]``, ``var[q]`` and ``count``."""

    def __init__(self, mean: dict[str, Tensor], var: dict[str, Tensor], count: Tensor):
        self.mean, self.var, self.count = mean, var, count


# One lock for every module's buffer update: threads training one shared module must not interleave the
# read-modify-write of a slot (each update is a few in-place ops, so contention is negligible).
_UPDATE_LOCK = threading.Lock()


@torch.no_grad()
def apply_batch_statistics(running: RunningStats, first_slot: int, batch: BatchStatistics, momentum):
    """Fold a call's batch statistics into the running buffers, exactly as BatchNorm1d per slot would.

    Step t of the call updates slot ``min(first_slot + t, last)`` if it normalized over at least two rows
    (``batch.counts[t] >= 2``; its moments are NaN otherwise). In place, and without reading any device
    tensor back to the host (the masks are tensors; shapes, ``first_slot`` and, eagerly, ``batch.counts``, a
    CPU tensor, steer Python), so it runs the same on a CUDA graph, a meta-device model, shared memory and
    under ``torch.compile``.
    """
    T = batch.mean_ih.shape[0]
    last = running.count.shape[0] - 1
    # Steps [0, once) each hit their own slot, a contiguous range; the rest (when more than one) all hit the
    # last slot. A call that reaches the last slot at its last step only (max_length=T) updates it once.
    once = T if first_slot + T <= last + 1 else max(0, last - first_slot)
    tracing = torch.compiler.is_compiling()
    # (a traced graph has no threads to guard against, and dynamo cannot trace a lock)
    with contextlib.nullcontext() if tracing else _UPDATE_LOCK:
        rows = _same_rows(batch.counts) if not tracing and momentum is not None and once == T else 0
        if rows:
            _apply_uniform(running, first_slot, batch, float(momentum), rows)
        else:
            _apply_masked(running, first_slot, once, batch, momentum)


def _same_rows(counts: Tensor) -> int:
    """The number of rows every step normalized over where it is the same at every step and at least two,
    else 0: ``counts`` [T] int64 on the CPU (so reading it is no device sync)."""
    rows = counts.tolist()
    return rows[0] if rows[0] >= 2 and rows.count(rows[0]) == len(rows) else 0


def _apply_uniform(running: RunningStats, first_slot: int, batch: BatchStatistics, momentum: float, n: int):
    """The common eager case of ``apply_batch_statistics``: a fixed momentum, every step its own slot and
    over the same n >= 2 rows (no padding, nothing past ``max_length``). BatchNorm1d's update as three
    foreach calls over every buffer, the unbiasing n / (n - 1) a host scalar: the masked path below is
    about 25 small ops, 0.1-0.25 ms a call, 5 % of a training forward at T=64 B=32 H=128. ``n``: the rows."""
    T = batch.mean_ih.shape[0]
    means, batch_means, variances, batch_variances = [], [], [], []
    for q in running.mean:
        for rows, batch_rows, moment in ((means, batch_means, "mean"), (variances, batch_variances, "var")):
            value = getattr(running, moment)[q]
            rows.append(value[first_slot:first_slot + T])
            batch_rows.append(getattr(batch, f"{moment}_{q}").to(value.device, value.dtype))
    # running_mean = (1 - m) running_mean + m mean;  running_var = (1 - m) running_var + m var n / (n - 1)
    torch._foreach_lerp_(means, batch_means, momentum)
    torch._foreach_mul_(variances, 1.0 - momentum)
    torch._foreach_add_(variances, batch_variances, alpha=momentum * n / (n - 1))
    running.count[first_slot:first_slot + T] += 1


def _apply_masked(running: RunningStats, first_slot: int, once: int, batch: BatchStatistics, momentum):
    """``apply_batch_statistics`` in general: masks for the steps that did not update, the cumulative
    average (momentum None), and the steps past ``max_length`` folded into the last slot."""
    T = batch.mean_ih.shape[0]
    last = running.count.shape[0] - 1
    device = running.count.device
    n = batch.counts.to(device, non_blocking=True).unsqueeze(1)  # [T, 1] int64
    updates = n >= 2  # [T, 1]
    # BatchNorm1d keeps the unbiased variance: biased * n / (n - 1)
    unbias = n / (n - 1).clamp(min=1)  # [T, 1] float64
    count = running.count
    head = count[first_slot:first_slot + once]
    if momentum is None:
        # cumulative average: a slot's k-th update has factor 1 / k
        factor = 1.0 / (head + 1).unsqueeze(1)  # [once, 1]
    else:
        factor = torch.full((once, 1), float(momentum), device=device)
    for q in running.mean:
        for value, moment in ((running.mean[q], f"mean_{q}"), (running.var[q], f"var_{q}")):
            batch_value = getattr(batch, moment).to(device)
            if moment.startswith("var"):
                batch_value = batch_value * unbias.to(batch_value.dtype)
            if once:
                # the buffer's own dtype, as BatchNorm1d; steps that did not update (NaN moments) keep
                # the slot as it was
                rows = value[first_slot:first_slot + once]
                weight = (factor * updates[:once]).to(value.dtype)
                rows.lerp_(torch.where(updates[:once], batch_value[:once].to(value.dtype), rows), weight)
            if T > once:
                value[last] = _fold_repeated(value[last], batch_value[once:].to(torch.float64),
                                             updates[once:, 0], momentum, count[last])
    head += updates[:once, 0]
    if T > once:
        count[last] += updates[once:, 0].sum()


def _fold_repeated(value: Tensor, batches: Tensor, updates: Tensor, momentum, count_before: Tensor) -> Tensor:
    """Sequential BatchNorm updates of one slot with the rows of ``batches`` [k, F] where ``updates`` [k] is
    set, in closed form (float64); ``count_before`` is the slot's num_batches_tracked (a 0-d tensor)."""
    start = value.to(torch.float64)
    u = updates.to(torch.float64)  # [k]
    batches = torch.where(updates.unsqueeze(1), batches, 0.0)  # NaN moments of steps that did not update
    if momentum is None:
        # cumulative average: (n0 * r0 + sum(b)) / (n0 + k)
        n0 = count_before.to(torch.float64)
        total = n0 + u.sum()
        folded = (n0 * start + (u.unsqueeze(1) * batches).sum(0)) / total.clamp(min=1)
        folded = torch.where(u.sum() > 0, folded, start)
    else:
        # r <- (1 - m u_j) r + m u_j b_j for j = 1..k:  r_k = prod_j (1 - m u_j) r_0 + sum_j m u_j b_j prod_{l>j} (1 - m u_l)
        keep = 1.0 - float(momentum) * u  # [k]
        after = torch.cat([keep.flip(0).cumprod(0).flip(0)[1:], keep.new_ones(1)])  # prod_{l>j} keep_l
        folded = keep.prod() * start + ((float(momentum) * u * after).unsqueeze(1) * batches).sum(0)
    return folded.to(value.dtype)


class ExactAccumulator:
    """Pools batch statistics per slot over a pass of data, for the exact population statistics.

    For each slot it keeps the number of rows N, the sum of values and the sum of squares (float64), so
    the result is the mean and the unbiased variance over every frame that reached that slot, as if the
    whole pass had been one batch. Entries are keyed by the caller (one per module and direction).
    """

    def __init__(self):
        self.sums: dict[object, dict[str, Tensor]] = {}

    @torch.no_grad()
    def add(self, key, running: RunningStats, slots: Tensor, batch: BatchStatistics):
        S = int((batch.counts >= 2).sum())  # as in apply_batch_statistics: the updating steps are a prefix
        if S == 0:
            return
        device = running.count.device
        num_slots = running.count.shape[0]
        # consecutive slots from the call's first (synchronized statistics may run more steps than ``slots``)
        idx = slot_indices(S, int(slots[0]), num_slots).to(device)
        n = batch.counts[:S].to(device, torch.float64).unsqueeze(1)  # [S, 1]
        columns = {"rows": n, "batches": torch.ones_like(n)}
        for q in running.mean:
            mean = getattr(batch, f"mean_{q}")[:S].to(device, torch.float64)
            var = getattr(batch, f"var_{q}")[:S].to(device, torch.float64)
            columns[f"sum_{q}"] = n * mean
            columns[f"sumsq_{q}"] = n * (var + mean * mean)
        entry = self.sums.setdefault(key, {})
        for name, value in columns.items():
            total = entry.get(name, value.new_zeros(num_slots, value.shape[1]))
            # a slot hit by several steps (past max_length) counts its batch once
            entry[name] = total.index_add_(0, idx, value if name != "batches" else value / _hits(idx))

    @torch.no_grad()
    def all_reduce(self, entries, group) -> None:
        """Sum the pooled sums of every rank of the torch.distributed ``group`` in one collective, so that each
        rank holds those of one pass over the union of the ranks' data. ``entries``: (key, running) pairs in
        the same order on every rank; a key this rank never saw takes part with zeros."""
        import torch.distributed as dist

        parts = []
        for key, running in entries:
            entry = self.sums.setdefault(key, {})
            widths = {"rows": 1, "batches": 1}
            for q in running.mean:
                widths.update({f"sum_{q}": running.mean[q].shape[1], f"sumsq_{q}": running.mean[q].shape[1]})
            for name, width in widths.items():
                if name not in entry:
                    entry[name] = torch.zeros(running.count.shape[0], width, dtype=torch.float64,
                                              device=running.count.device)
                parts.append(entry[name])
        if not parts:
            return
        flat = torch.cat([part.reshape(-1) for part in parts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for part, total in zip(parts, flat.split([part.numel() for part in parts])):
            part.copy_(total.view_as(part))

    @torch.no_grad()
    def write(self, key, running: RunningStats):
        """Overwrite the slots this pass reached with the pooled statistics; others keep their values."""
        entry = self.sums.get(key)
        if entry is None:
            return
        rows = entry["rows"][:, 0]
        reached = (rows >= 2).nonzero().squeeze(1)
        N = rows[reached].unsqueeze(1)
        for q in running.mean:
            mean = entry[f"sum_{q}"][reached] / N
            var = (entry[f"sumsq_{q}"][reached] / N - mean * mean).clamp_(min=0) * N / (N - 1)
            running.mean[q][reached] = mean.to(running.mean[q].dtype)
            running.var[q][reached] = var.to(running.var[q].dtype)
        running.count[reached] = entry["batches"][reached, 0].round().to(running.count.dtype)


def _hits(idx: Tensor) -> Tensor:
    """[S, 1]: how many of the steps share each step's slot."""
    _, inverse, counts = torch.unique(idx, return_inverse=True, return_counts=True)
    return counts[inverse].unsqueeze(1).to(torch.float64)
