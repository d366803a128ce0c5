"""Re-estimating population statistics in one pass over data, as Cooijmans et al. did for their numbers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from fused_bnlstm import _stats
from fused_bnlstm.distributed import default_group
from fused_bnlstm.modules import BNLSTM, BNLSTMCell


@torch.no_grad()
def update_population_statistics(loader: Iterable, model: nn.Module, device: torch.device | None = None,
                                 forward=None, *, pool_across_ranks: bool = True, process_group=None) -> None:
    """Recompute every BNLSTM / BNLSTMCell population statistic in ``model`` exactly, in one pass.

    Like ``torch.optim.swa_utils.update_bn``, but exact: for every statistics slot the result is the mean
    and the unbiased variance over *all* frames of *all* batches that reached that slot, pooled (not an
    average of per-batch estimates), computed in float64. The model runs in training mode (batch
    statistics, dropout as in training) under ``no_grad``; its mode is restored afterwards. Slots that no
    batch reached keep their values; ``num_batches_tracked`` becomes the number of batches per slot.

    Args:
        loader: an iterable of batches. A batch that is a tuple or list passes its first element to the
            model (``(inputs, targets)`` pairs), anything else is passed whole.
        model: any module containing BNLSTM or BNLSTMCell modules.
        device: if given, tensors of each batch are moved there first.
        forward: optional ``forward(model, batch)`` callable for models whose call is not ``model(x)``
            (a model driving a BNLSTMCell step by step, say).
        pool_across_ranks: under an initialized ``torch.distributed`` process group, sum the exact sums of
            every rank of ``process_group`` (default: the world) after the pass, in one collective, so that
            every rank ends with the statistics of one pass over the union of the ranks' data (each rank may
            see different batches, lengths and numbers of batches). Every rank of the group must then call
            this function; pass ``False`` to re-estimate from this rank's data alone (e.g. on rank 0 only).
            Layers in synchronized mode (``convert_sync_bnlstm``) see the group's statistics during the
            pass already and are not pooled again; their ranks must run the same number of batches.
        process_group: the group to pool over (default: the world).
    """
    layers = [m for m in model.modules() if isinstance(m, (BNLSTM, BNLSTMCell))
              and m.normalization is not None and m.track_running_stats]
    if not layers:
        return
    was_training = model.training
    accumulator = _stats.ExactAccumulator()
    with contextlib.ExitStack() as collecting:
        for layer in layers:
            collecting.enter_context(layer.collecting_statistics(accumulator))
        try:
            model.train()
            for batch in loader:
                if forward is not None:
                    forward(model, _to(batch, device))
                    continue
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(_to(inputs, device))
        finally:
            model.train(was_training)
    group = default_group(process_group) if pool_across_ranks else None
    if group is not None:
        _pool_across_ranks(accumulator, layers, group)
    for layer in layers:
        for suffix in layer._stats_suffixes:
            accumulator.write((id(layer), suffix), layer._running(suffix))


def _pool_across_ranks(accumulator: _stats.ExactAccumulator, layers, group) -> None:
    """Every rank's sums added up (one collective) and the longest sequence seen agreed (one more)."""
    pooled = [layer for layer in layers if not getattr(layer, "sync_statistics", False)]
    accumulator.all_reduce([((id(layer), suffix), layer._running(suffix)) for layer in pooled
                            for suffix in layer._stats_suffixes], group)
    steps = [layer.running_length for layer in layers if getattr(layer, "running_length", None) is not None]
    if steps:
        longest = torch.stack(steps)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
        for buffer, value in zip(steps, longest):
            buffer.copy_(value)


def _to(batch, device):
    if device is None:
        return batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(item, device) for item in batch)
    return batch.to(device) if hasattr(batch, "to") else batch
