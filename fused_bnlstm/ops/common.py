"""Types and small helpers shared by every backend of the BN-LSTM layer op."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Population(NamedTuple):
    """Population statistics a layer-direction normalizes with when it does not use batch statistics.

    Frame-wise: one row per time step, the module having already resolved each step's slot
    (``min(t + time_offset, max_length - 1)``): ``*_ih``/``*_hh`` are [T, 4H], ``*_c`` are [T, H].
    Sequence-wise: ``mean_ih``/``var_ih`` are [1, 4H] and the others are None.
    The variances are the (unbiased) running variances, used as they are.
    """

    mean_ih: Tensor
    var_ih: Tensor
    mean_hh: Tensor | None = None
    var_hh: Tensor | None = None
    mean_c: Tensor | None = None
    var_c: Tensor | None = None


class BatchStatistics(NamedTuple):
    """Batch statistics a training call normalized with, detached, for the running-statistics update.

    ``counts`` [T] (int64, CPU) is the number of rows each step normalized over; a step with fewer than
    two used its population statistics instead and its moments are meaningless (NaN in the reference).
    Means and **biased** variances: frame-wise [T, 4H] / [T, H]; sequence-wise ``counts`` is [1] (all valid
    frames) and only ``mean_ih``/``var_ih`` [1, 4H] are set.
    """

    counts: Tensor
    mean_ih: Tensor
    var_ih: Tensor
    mean_hh: Tensor | None = None
    var_hh: Tensor | None = None
    mean_c: Tensor | None = None
    var_c: Tensor | None = None


def step_counts(lengths: Tensor | None, T: int, B: int) -> list[int]:
    """Rows still running at each step t (those with length > t), as python ints."""
    if lengths is None:
        return [B] * T
    steps = torch.arange(T).unsqueeze(1)  # [T, 1]
    return (lengths.cpu().unsqueeze(0) > steps).sum(1).tolist()
