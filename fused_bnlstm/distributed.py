"""Synchronized batch statistics across a ``torch.distributed`` process group (in the spirit of SyncBatchNorm).

Under ``DistributedDataParallel`` each rank normalizes over its own rows, as ``BatchNorm1d`` does. With
``convert_sync_bnlstm(model)`` every per-step batch norm of every BNLSTM / BNLSTMCell in ``model`` normalizes
over the *global* batch of the process group instead: training on N ranks with B rows each then computes the
outputs, gradients and running statistics of one process with the N * B rows concatenated.

How (the reference op, ``ops/naive.py``, with ``LayerConfig.process_group`` set; design and cost in
``ops/README.md``, "Synchronized statistics"):

- ``global_counts``: the group agrees on its longest sequence (one all-reduce MAX) and on the rows running at
  each step (one all-reduce SUM of the [T] counts). Every rank then runs that many steps (a rank whose rows
  have all finished takes part with zero rows), and every rule that reads counts (fewer than two rows: use
  the population's statistics; the returned counts) reads the global ones, so all ranks take the same branch
  and issue the same collectives.
- ``all_reduce_sum``: the moments are all-reduced as (sum, sum of squares) with the global count known;
  the collective is differentiable (its backward all-reduces the gradient), so the backward's two batch
  reductions per normalization are global as well.

Every rank of the group must run the same model on every training call (as with SyncBatchNorm): the
collectives are matched by order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def convert_sync_bnlstm(module: nn.Module, process_group=None) -> nn.Module:
    """Turn on synchronized statistics for every ``BNLSTM`` and ``BNLSTMCell`` in ``module`` (in place).

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: training calls then normalize over the rows of
    every rank of ``process_group`` (default: the whole world), while evaluation keeps using the population
    statistics and needs no communication. Sync mode takes effect only while ``torch.distributed`` is
    initialized; it runs the reference backend. Returns ``module``.
    """
    from fused_bnlstm.modules import BNLSTM, BNLSTMCell

    for layer in module.modules():
        if isinstance(layer, (BNLSTM, BNLSTMCell)):
            layer.sync_statistics = True
            layer.process_group = process_group
    return module


def default_group(process_group=None):
    """``process_group``, or the default group when torch.distributed is initialized; else None."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group, differentiable to any order: the gradient of every rank's copy of the sum is
    the sum of the gradients, which is the same all-reduce (``torch.distributed.nn.functional.all_reduce``,
    without its deprecation warning on every call)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(tensor: Tensor, group) -> Tensor:
    """The sum of ``tensor`` over every rank of ``group`` (a new tensor), differentiable."""
    return _AllReduceSum.apply(tensor, group)


@torch.no_grad()
def global_counts(counts: tuple[int, ...], group, device) -> tuple[int, ...]:
    """The rows running at each step over the whole group, for the group's longest sequence.

    ``counts``: this rank's rows running at each of its T steps. Two collectives: the longest T (MAX), then
    the counts padded with zeros to it (SUM). Host ints, as ``LayerInput.counts``.
    """
    steps = torch.tensor([len(counts)], dtype=torch.long, device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=group)
    total = torch.zeros(int(steps), dtype=torch.long, device=device)
    total[: len(counts)] = torch.tensor(counts, dtype=torch.long)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return tuple(total.tolist())


@torch.no_grad()
def global_sum(value: int, group, device) -> int:
    """An int summed over the group (one collective)."""
    total = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return int(total)
