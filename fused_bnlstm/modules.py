"""``BNLSTM`` and ``BNLSTMCell``: drop-ins for ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` with recurrent BN.

The modules hold parameters, buffers and the backend choice, check their input in nn.LSTM's words, and
turn every input form (time-major, batch_first, unbatched, PackedSequence) into the one form the layer op
takes: a padded time-major batch with per-row lengths. The math lives in ``fused_bnlstm.ops``.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fused_bnlstm import _stats
from fused_bnlstm.distributed import global_sum
from fused_bnlstm.ops import (BACKENDS, NORMALIZATIONS, LayerConfig, LayerParams, Population, bnlstm_layer,
                              resolve_backend)

# The normalizations each fused backend synchronizes over a process group itself, and the backends that do so
# with a projection too; the reference runs the other synchronized calls (normalization=None takes no
# statistics: sync mode passes no group).
_SYNCHRONIZED = {"cpp": ("frame", "sequence"), "triton": ("frame",)}
_SYNCHRONIZED_WITH_PROJECTION = ("cpp",)
# statistics slots per layer-direction unless max_length says otherwise (see _PopulationStatsMixin)
DEFAULT_MAX_LENGTH = 256


class PopulationStatisticsWarning(UserWarning):
    """Eval on running averages that training calls moved since the last exact re-estimate."""


def _check_common_arguments(input_size, hidden_size, bias, momentum, eps, gamma_init, normalization,
                            track_running_stats, max_length, backend):
    """Constructor checks shared by BNLSTM and BNLSTMCell, in nn.LSTM's words where it has them."""
    if not isinstance(bias, bool):
        raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
    if not isinstance(input_size, int) or isinstance(input_size, bool):
        raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
    if input_size <= 0:
        raise ValueError("input_size must be greater than zero")
    if not isinstance(hidden_size, int) or isinstance(hidden_size, bool):
        raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
    if hidden_size <= 0:
        raise ValueError("hidden_size must be greater than zero")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of 'frame', 'sequence' or None, got {normalization!r}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a number greater than zero, got {eps!r}")
    if momentum is not None and (
        not isinstance(momentum, numbers.Real) or isinstance(momentum, bool) or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(f"momentum must be None or a number in [0, 1], got {momentum!r}")
    if not isinstance(gamma_init, numbers.Real) or isinstance(gamma_init, bool):
        raise TypeError(f"gamma_init should be a number, got: {type(gamma_init).__name__}")
    if not isinstance(track_running_stats, bool):
        raise TypeError(f"track_running_stats should be of type bool, got: {type(track_running_stats).__name__}")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= 0:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


class _PopulationStatsMixin:
    """Per-time-step running statistics buffers, shared by BNLSTM and BNLSTMCell.

    The buffers have ``max_length`` slots (default ``DEFAULT_MAX_LENGTH``), allocated once and only ever
    updated in place: they keep their identity and storage, so ``share_memory()``, threads, DDP's buffer
    broadcast and ``torch.inference_mode`` all see one set of tensors of one shape. Step ``t`` of a training
    call reads and trains slot ``min(t + time_offset, max_length - 1)``: steps past the end share the last
    slot (the paper's choice for long sequences). ``running_length`` is the longest training sequence seen
    (``T + time_offset``, at most ``max_length``); eval reads slot ``min(t + time_offset, running_length - 1)``
    (``max_length - 1`` before any training), so a sequence longer than any trained on reuses the statistics
    of the last step trained (the paper's T_max), whatever ``max_length`` is.
    """

    def _init_stats_state(self) -> None:
        self._stats_accumulator = None  # set by collecting_statistics
        self._stats_suffixes: list[str] = []  # one per layer-direction with buffers
        self._stats_from_training = False  # training calls moved the running averages since a re-estimate
        self._warned_stats_from_training = False
        self._warned_past_max_length = False
        # synchronized statistics across a torch.distributed group (fused_bnlstm.convert_sync_bnlstm)
        self.sync_statistics = False
        self.process_group = None

    def _sync_group(self, use_batch_stats: bool):
        """The process group every batch norm of this call spans (sync mode, see ``convert_sync_bnlstm``),
        or None to normalize over this process's rows only."""
        if not (self.sync_statistics and use_batch_stats and self.normalization is not None):
            return None
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return None
        return self.process_group if self.process_group is not None else torch.distributed.group.WORLD

    def _check_training_rows(self, rows: int, group, device) -> None:
        """BatchNorm1d's error for a training batch of one row (in sync mode, of the group's rows: one
        collective, so every rank decides alike)."""
        if group is not None:
            rows = global_sum(rows, group, device)
        if rows == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input size "
                             f"{torch.Size([rows, 4 * self.hidden_size])}")

    def _register_stats(self, suffix: str, gate_width: int, cell_width: int, factory_kwargs):
        if self.normalization is None:
            return
        slots = 1 if self.normalization == "sequence" else self.max_length
        for q, width in self._widths(gate_width, cell_width).items():
            tracked = self.track_running_stats
            self.register_buffer(
                f"running_mean_{q}{suffix}", torch.zeros(slots, width, **factory_kwargs) if tracked else None
            )
            self.register_buffer(
                f"running_var_{q}{suffix}", torch.ones(slots, width, **factory_kwargs) if tracked else None
            )
        count = torch.zeros(slots, dtype=torch.long, device=factory_kwargs["device"])
        self.register_buffer(f"num_batches_tracked{suffix}", count if self.track_running_stats else None)
        if not self._stats_suffixes and self.normalization == "frame" and self.track_running_stats:
            # the longest training sequence seen, T + time_offset, capped at max_length: eval's last slot
            running_length = torch.zeros((), dtype=torch.long, device=factory_kwargs["device"])
            self.register_buffer("running_length", running_length)
        self._stats_suffixes.append(suffix)

    def _widths(self, gate_width: int, cell_width: int) -> dict[str, int]:
        if self.normalization == "sequence":
            return {"ih": gate_width}
        return {"ih": gate_width, "hh": gate_width, "c": cell_width}

    def _quantities(self):
        return ("ih",) if self.normalization == "sequence" else _stats.QUANTITIES

    def _running(self, suffix: str) -> _stats.RunningStats:
        mean = {q: getattr(self, f"running_mean_{q}{suffix}") for q in self._quantities()}
        var = {q: getattr(self, f"running_var_{q}{suffix}") for q in self._quantities()}
        return _stats.RunningStats(mean, var, getattr(self, f"num_batches_tracked{suffix}"))

    def _buffer_names(self, suffix: str) -> list[str]:
        names = [f"running_{s}_{q}{suffix}" for q in self._quantities() for s in ("mean", "var")]
        return names + [f"num_batches_tracked{suffix}"]

    def reset_running_stats(self) -> None:
        """Population means to 0, variances to 1, counts to 0."""
        if self.normalization is None or not self.track_running_stats:
            return
        for suffix in self._stats_suffixes:
            running = self._running(suffix)
            for q in self._quantities():
                running.mean[q].zero_()
                running.var[q].fill_(1.0)
            running.count.zero_()
        if self.normalization == "frame":
            self.running_length.zero_()

    def _slots(self, T: int, time_offset: int, use_batch_stats: bool) -> Tensor:
        """[T] int64: the statistics slot each step reads (and, in training, updates).

        Batch statistics (training): ``min(t + time_offset, max_length - 1)``, on the CPU, built from host
        ints. Population statistics (eval): clamped to ``running_length - 1`` as well, on the buffers' device
        (no host sync; from host ints where the buffers are on the CPU and nothing traces).
        """
        if self.normalization != "frame":
            return torch.zeros(1, dtype=torch.long)
        if use_batch_stats or not self.track_running_stats:
            return _stats.slot_indices(T, time_offset, self.max_length)
        if self.running_length.device.type == "cpu" and not torch.compiler.is_compiling():
            # reading a CPU buffer is no sync: host ints, two small ops instead of four
            trained = int(self.running_length)
            return _stats.slot_indices(T, time_offset, trained if trained > 0 else self.max_length)
        # never trained (0): every step its own slot
        last = torch.where(self.running_length > 0, self.running_length, self.max_length) - 1
        steps = torch.arange(time_offset, time_offset + T, device=last.device)
        return torch.minimum(steps, last)

    @torch.no_grad()
    def _track_steps(self, steps: int) -> None:
        """Record a training call that reached ``steps`` steps (in place, no host sync)."""
        if self.normalization == "frame":
            self.running_length.clamp_(min=min(steps, self.max_length))

    def _warn_past_max_length(self, last_step: int) -> None:
        if self.normalization == "frame" and last_step >= self.max_length and not self._warned_past_max_length:
            self._warned_past_max_length = True
            warnings.warn(
                f"{type(self).__name__}: a training call reached step {last_step} (time_offset included) but "
                f"max_length={self.max_length}: steps from {self.max_length - 1} on share the last statistics "
                "slot (the paper's practice past T_max; expected on a stream with time_offset=position). For "
                "sequences of bounded length, pass max_length= the longest to give every step its own statistics.",
                stacklevel=5,
            )

    def _warn_if_running_averages_lag(self) -> None:
        """Once per module: an eval call on running averages that training calls updated since the last
        ``update_population_statistics`` (they lag the weights; see the README's "Training recipes")."""
        if torch.compiler.is_compiling():
            return
        if not self._stats_from_training or self._warned_stats_from_training:
            return
        self._warned_stats_from_training = True
        warnings.warn(
            f"{type(self).__name__}: eval on running averages (momentum={self.momentum}) that training updated "
            "while the weights moved. They lag the weights, and BN divides that lag by each step's standard "
            "deviation (about sqrt(eps) where every sequence starts alike). After training, call "
            "fused_bnlstm.update_population_statistics(train_loader, model) (forward= for a model called with a "
            "state); see the README's 'Training recipes'.",
            PopulationStatisticsWarning,
            stacklevel=5,
        )

    def _population(self, suffix: str, slots: Tensor, like: Tensor, *, unread: bool = False) -> Population | None:
        """The statistics each step falls back on (or uses in eval), one row per step. ``unread``: every step
        normalizes with batch statistics, so no backend reads these rows or keeps them for backward."""
        if self.normalization is None:
            return None
        if self.track_running_stats:
            running = self._running(suffix)
            kept = torch.is_grad_enabled() and not unread
            if not kept and slots.device.type == "cpu" and not torch.compiler.is_compiling():
                first, T = int(slots[0]), slots.shape[0]
                if int(slots[-1]) - first == T - 1:
                    # nothing keeps these rows past the call (no graph is recorded, or no step reads them):
                    # views of the slots (consecutive: slots only stop increasing at the last), not copies
                    # (six index_selects were 0.1 ms of a training call at T=64 B=32 H=128)
                    rows = {f"{s}_{q}": getattr(running, s)[q].narrow(0, first, T) for q in self._quantities()
                            for s in ("mean", "var")}
                    return Population(**rows)
            # a copy, not a view: the update after the call changes the buffers in place, and a backend's
            # backward may read what it normalized with
            idx = slots.to(running.count.device, non_blocking=True)
            rows = {f"{s}_{q}": getattr(running, s)[q].index_select(0, idx) for q in self._quantities()
                    for s in ("mean", "var")}
            return Population(**rows)
        # No population statistics: the fallback for steps with fewer than two rows is the identity
        # normalization (mean 0, variance 1), the value fresh running statistics would hold.
        H = self.hidden_size
        rows = {}
        for q, width in self._widths(4 * H, H).items():
            rows[f"mean_{q}"] = like.new_zeros(slots.shape[0], width)
            rows[f"var_{q}"] = like.new_ones(slots.shape[0], width)
        return Population(**rows)

    @contextlib.contextmanager
    def collecting_statistics(self, accumulator: _stats.ExactAccumulator):
        """Within the block, training calls add their batch statistics to ``accumulator`` (keyed by this
        module and each direction) instead of updating the running buffers; used by
        ``update_population_statistics``."""
        self._stats_accumulator = accumulator
        try:
            yield
        finally:
            self._stats_accumulator = None
        if any((id(self), suffix) in accumulator.sums for suffix in self._stats_suffixes):
            self._stats_from_training = False

    def _record_statistics(self, suffix: str, slots: Tensor, time_offset: int, stats) -> None:
        """Fold a training call's batch statistics into the buffers (or into a re-estimation pass);
        ``slots`` are the call's training slots, the first being ``min(time_offset, max_length - 1)``."""
        running = self._running(suffix)
        if self._stats_accumulator is not None:
            self._stats_accumulator.add((id(self), suffix), running, slots, stats)
        else:
            self._stats_from_training = True
            first_slot = min(time_offset, running.count.shape[0] - 1)
            _stats.apply_batch_statistics(running, first_slot, stats, self.momentum)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint with another number of slots (another max_length) takes its size: load it before
        # sharing the module (share_memory, DDP), as loading replaces the buffers then.
        if self.normalization == "frame" and self.track_running_stats:
            key = f"{prefix}num_batches_tracked{self._stats_suffixes[0]}"
            if key in state_dict and state_dict[key].dim() == 1 and state_dict[key].shape[0] != self.max_length:
                slots = state_dict[key].shape[0]
                for suffix in self._stats_suffixes:
                    for name in self._buffer_names(suffix):
                        old = getattr(self, name)
                        setattr(self, name, old.new_empty(slots, *old.shape[1:]))
                self.max_length = slots
            # checkpoints from before running_length: their buffers had grown to the longest sequence trained
            if f"{prefix}running_length" not in state_dict and key in state_dict:
                state_dict[f"{prefix}running_length"] = torch.tensor(state_dict[key].shape[0])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class BNLSTM(_PopulationStatsMixin, nn.Module):
    r"""A batch-normalized LSTM (Cooijmans et al., "Recurrent Batch Normalization", ICLR 2017).

    A drop-in for :class:`torch.nn.LSTM`: the same constructor arguments, attributes, input forms
    (time-major, ``batch_first``, unbatched, :class:`~torch.nn.utils.rnn.PackedSequence`), outputs, errors
    and parameter names, so an ``nn.LSTM`` state dict's weights load as they are. Per layer and direction,
    with gate order i, f, g, o::

        gates_t = BN(W_hh h_{t-1}; gamma_hh) + BN(W_ih x_t; gamma_ih) + b_ih + b_hh
        c_t     = sigmoid(f_t) * c_{t-1} + sigmoid(i_t) * tanh(g_t)
        h_t     = sigmoid(o_t) * tanh(BN(c_t; gamma_c, beta_c))

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional: as ``nn.LSTM``.
        proj_size: as ``nn.LSTM`` (LSTMP): ``h_t = W_hr (o_t * tanh(BN(c_t)))`` with ``weight_hr_l{k}``
            [proj_size, hidden_size], the recurrence and the output on the projected state (every backend).
        max_length: number of per-step statistics slots (default 256), allocated once. Training steps past
            it share the last slot (the paper's choice; a training call that gets there warns once); eval
            reads ``min(t + time_offset, last trained slot)``, so longer sequences than any trained on
            reuse the last trained step's statistics.
        momentum: running-statistics momentum as ``BatchNorm1d`` (``None``: cumulative average).
        eps: added to every variance.
        gamma_init: initial value of every gamma (the paper's 0.1).
        normalization: ``"frame"`` (per-step statistics, the paper), ``"sequence"`` (one BN of W_ih x over
            every valid frame, the paper's BN-e*), or ``None`` (a plain LSTM through the same code).
        track_running_stats: as ``BatchNorm1d``; ``False`` always normalizes with batch statistics.
        weight_dropout: DropConnect on every ``weight_hh`` in training (AWD-LSTM's weight drop): a fresh
            mask per forward call, shared by every step; the state dict is unchanged.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cpp"`` (see ``fused_bnlstm.ops``).

    Forward: ``output, (h_n, c_n) = bnlstm(input, hx=None, *, time_offset=0)``. ``time_offset`` is the
    index of the first step of ``input`` in the full sequence, so a long sequence run in chunks with the
    carried ``(h, c)`` (truncated BPTT) uses the same statistics slots as one full run. (A bidirectional
    layer reads its whole input backwards, so chunking one computes a different function, as it would with
    ``nn.LSTM``; the offset then applies to both directions' slots alike.)

    A training step at which fewer than two sequences are still running has no batch variance: it is
    normalized with that slot's population statistics as they stood at the start of the call (mean 0 and
    variance 1 with ``track_running_stats=False``) and does not update them. A training batch of one
    sequence raises ``BatchNorm1d``'s ValueError.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, *, max_length: int = DEFAULT_MAX_LENGTH, momentum: float | None = 0.1,
                 eps: float = 1e-5, gamma_init: float = 0.1, normalization: str | None = "frame",
                 track_running_stats: bool = True, weight_dropout: float = 0.0, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an element "
                "being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        _check_common_arguments(input_size, hidden_size, bias, momentum, eps, gamma_init, normalization,
                                track_running_stats, max_length, backend)
        if not isinstance(weight_dropout, numbers.Real) or isinstance(weight_dropout, bool) or not 0 <= weight_dropout < 1:
            raise ValueError(f"weight_dropout must be a number in [0, 1), got {weight_dropout!r}")
        if not isinstance(num_layers, int) or isinstance(num_layers, bool):
            raise TypeError(f"num_layers should be of type int, got: {type(num_layers).__name__}")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.max_length = max_length
        self.momentum = momentum
        self.eps = float(eps)
        self.gamma_init = float(gamma_init)
        self.normalization = normalization
        self.track_running_stats = track_running_stats
        self.backend = backend
        self.weight_dropout = float(weight_dropout)
        self._init_stats_state()

        factory_kwargs = {"device": device, "dtype": dtype}
        num_directions = 2 if bidirectional else 1
        gate_size = 4 * hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                real_hidden_size = proj_size if proj_size > 0 else hidden_size
                layer_input_size = input_size if layer == 0 else real_hidden_size * num_directions
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = {"weight_ih": (gate_size, layer_input_size), "weight_hh": (gate_size, real_hidden_size)}
                if bias:
                    shapes.update(bias_ih=(gate_size,), bias_hh=(gate_size,))
                if proj_size > 0:
                    shapes.update(weight_hr=(proj_size, hidden_size))
                names = []
                for name, shape in shapes.items():
                    self.register_parameter(name + suffix, nn.Parameter(torch.empty(shape, **factory_kwargs)))
                    names.append(name + suffix)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
                if normalization is not None:
                    bn_shapes = {"gamma_ih": (gate_size,)}
                    if normalization == "frame":
                        bn_shapes.update(gamma_hh=(gate_size,), gamma_c=(hidden_size,), beta_c=(hidden_size,))
                    for name, shape in bn_shapes.items():
                        self.register_parameter(name + suffix, nn.Parameter(torch.empty(shape, **factory_kwargs)))
                self._register_stats(suffix, gate_size, hidden_size, factory_kwargs)
        self.reset_parameters()

    def _suffixes(self):
        for layer in range(self.num_layers):
            for direction in range(2 if self.bidirectional else 1):
                yield layer, direction, f"_l{layer}" + ("_reverse" if direction == 1 else "")

    def reset_parameters(self) -> None:
        """Orthogonal W_ih and W_hh (per gate block), zero biases but a forget-gate bias of 1, gammas at
        ``gamma_init``, beta_c at 0, and fresh running statistics."""
        H = self.hidden_size
        with torch.no_grad():
            for _, _, suffix in self._suffixes():
                _reset_lstm_weights(self, suffix, H, self.gamma_init)
        self.reset_running_stats()

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """No-op, for code written against ``nn.LSTM`` (there is no cuDNN weight buffer here)."""

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        s += ", normalization={normalization!r}"
        if self.max_length != DEFAULT_MAX_LENGTH:
            s += ", max_length={max_length}"
        if self.weight_dropout != 0:
            s += ", weight_dropout={weight_dropout}"
        if self.backend != "auto":
            s += ", backend={backend!r}"
        return s.format(**self.__dict__)

    def forward(self, input, hx=None, *, time_offset: int = 0):
        x, lengths, packing, is_batched = self._as_padded(input)
        weight_dtype = self.weight_ih_l0.dtype
        if x.dtype != weight_dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), or convert model: model.to({x.dtype})"
            )
        if x.size(-1) != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.size(-1)}"
            )
        T, B = x.shape[0], x.shape[1]
        num_directions = 2 if self.bidirectional else 1
        h0, c0 = self._check_hidden(hx, is_batched, packing is not None, B, x, num_directions)
        if T == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if not isinstance(time_offset, int) or isinstance(time_offset, bool):
            raise TypeError(f"time_offset should be of type int, got: {type(time_offset).__name__}")
        if time_offset < 0:
            raise ValueError(f"time_offset must be >= 0, got {time_offset}")

        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats and self.normalization is not None:
            self._warn_if_running_averages_lag()
        update_stats = self.training and self.track_running_stats and self.normalization is not None
        group = self._sync_group(use_batch_stats)
        if self.normalization is not None and use_batch_stats and (B > 0 or group is not None):
            rows = B if self.normalization == "frame" else int(lengths.sum()) if lengths is not None else T * B
            self._check_training_rows(rows, group, x.device)
        backend = self._layer_backend(B, group, x.device)
        update_stats = update_stats and (B > 0 or group is not None)

        # Validation is over: from here on buffers may change.
        if update_stats:
            self._warn_past_max_length(T + time_offset - 1)
        slots = self._slots(T, time_offset, use_batch_stats)
        config = LayerConfig(normalization=self.normalization, eps=self.eps, use_batch_stats=use_batch_stats,
                             process_group=group)
        # every step normalizes over all B >= 2 rows with its batch's statistics (_check_training_rows): no
        # backend reads the population's rows or keeps them for backward
        full_batches = use_batch_stats and lengths is None and group is None
        reverse_index = _reverse_index(T, lengths, x.device) if self.bidirectional else None
        layer_input = x
        h_n, c_n, pending = [], [], []
        for layer in range(self.num_layers):
            directions = []
            for direction in range(num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                k = layer * num_directions + direction
                seq = layer_input if direction == 0 else _gather_time(layer_input, reverse_index)
                out, h, c, stats = bnlstm_layer(
                    seq, h0[k], c0[k], self._call_parameters(suffix), lengths=lengths,
                    population=self._population(suffix, slots, x, unread=full_batches), config=config,
                    backend=backend,
                )
                directions.append(out if direction == 0 else _gather_time(out, reverse_index))
                h_n.append(h)
                c_n.append(c)
                if update_stats and stats is not None:
                    pending.append((suffix, stats))
            layer_input = directions[0] if num_directions == 1 else torch.cat(directions, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)

        for suffix, stats in pending:
            self._record_statistics(suffix, slots, time_offset, stats)
        if update_stats:
            # in sync mode the group's longest sequence (the statistics cover it), so every rank agrees
            steps = max(T, pending[0][1].counts.shape[0]) if group is not None and pending else T
            self._track_steps(steps + time_offset)
        return self._pack_result(layer_input, torch.stack(h_n), torch.stack(c_n), packing, is_batched, input)

    def _call_parameters(self, suffix: str) -> LayerParams:
        """One layer-direction's parameters for this call: DropConnect on W_hh in training (AWD-LSTM's
        weight drop: one mask per call, shared by every step)."""
        params = _layer_parameters(self, suffix)
        if self.weight_dropout > 0 and self.training:
            params = params._replace(weight_hh=F.dropout(params.weight_hh, p=self.weight_dropout, training=True))
        return params

    @property
    def _flat_weights(self) -> list[Tensor]:
        """nn.LSTM's flat weight list, for code that reads it (weights in ``_flat_weights_names`` order)."""
        return [getattr(self, name) for name in self._flat_weights_names]

    @_flat_weights.setter
    def _flat_weights(self, value) -> None:
        raise AttributeError(
            "BNLSTM has no flat weight buffer to replace (it reads its parameters by name on every call). "
            "For DropConnect on the recurrent weights use BNLSTM(..., weight_dropout=p), or assign the dropped "
            "weight by name (e.g. module.weight_hh_l0 = dropped, after removing the parameter)."
        )

    def _as_padded(self, input):
        """Any input form -> (x [T, B, I] time-major, lengths [B] CPU int64 or None, packing, is_batched)."""
        if isinstance(input, PackedSequence):
            if input.data.dim() != 2:
                raise RuntimeError(f"input must have 2 dimensions, got {input.data.dim()}")
            x, lengths = pad_packed_sequence(input)  # original batch order
            if x.shape[0] > 0 and bool((lengths == x.shape[0]).all()):
                return x, None, input, True
            return x, lengths, input, True
        if not isinstance(input, Tensor):
            raise TypeError(f"BNLSTM: expected a Tensor or PackedSequence input, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"BNLSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        if not is_batched:
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        return x, None, None, is_batched

    def _layer_backend(self, B: int, group, device: torch.device) -> str:
        """The backend a call runs on: the reference for synchronized statistics a fused backend does not run
        (_SYNCHRONIZED), and for an empty batch (zero-sized outputs that still carry gradients, as nn.LSTM's do)
        unless synchronized: the ranks of a group all take one backend, with rows or without, so that their
        collectives match."""
        backend = resolve_backend(self.backend, device)
        if backend == "reference":
            return backend
        if group is not None:
            synchronized = self.normalization in _SYNCHRONIZED[backend] and (
                self.proj_size == 0 or backend in _SYNCHRONIZED_WITH_PROJECTION)
            return backend if synchronized else "reference"
        return backend if B > 0 else "reference"

    def _check_hidden(self, hx, is_batched, is_packed, B, x, num_directions):
        expected_c = (self.num_layers * num_directions, B, self.hidden_size)
        expected = (*expected_c[:2], self.proj_size) if self.proj_size > 0 else expected_c
        if hx is None:
            return x.new_zeros(expected), x.new_zeros(expected_c)
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("BNLSTM: hx must be a tuple (h_0, c_0) of tensors")
        h0, c0 = hx
        if not is_packed:
            if is_batched:
                if h0.dim() != 3 or c0.dim() != 3:
                    raise RuntimeError(
                        "For batched 3-D input, hx and cx should also be 3-D but got "
                        f"({h0.dim()}-D, {c0.dim()}-D) tensors"
                    )
            else:
                if h0.dim() != 2 or c0.dim() != 2:
                    raise RuntimeError(
                        "For unbatched 2-D input, hx and cx should also be 2-D but got "
                        f"({h0.dim()}-D, {c0.dim()}-D) tensors"
                    )
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        if h0.shape != expected:
            raise RuntimeError(f"Expected hidden[0] size {expected}, got {list(h0.shape)}")
        if c0.shape != expected_c:
            raise RuntimeError(f"Expected hidden[1] size {expected_c}, got {list(c0.shape)}")
        for name, value in (("hx", h0), ("cx", c0)):
            if value.dtype != x.dtype:
                raise ValueError(f"BNLSTM: {name} dtype ({value.dtype}) does not match input dtype ({x.dtype})")
        return h0, c0

    def _pack_result(self, output, h_n, c_n, packing, is_batched, input):
        if packing is not None:
            lengths = _lengths_from_batch_sizes(packing.batch_sizes)
            sorted_output = output.index_select(1, packing.sorted_indices) if packing.sorted_indices is not None \
                else output
            data = pack_padded_sequence(sorted_output, lengths, enforce_sorted=True).data
            packed = PackedSequence(data, packing.batch_sizes, packing.sorted_indices, packing.unsorted_indices)
            return packed, (h_n, c_n)
        if not is_batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)


class BNLSTMCell(_PopulationStatsMixin, nn.Module):
    r"""One BN-LSTM step, a drop-in for :class:`torch.nn.LSTMCell` with recurrent batch normalization.

    ``h_1, c_1 = cell(input, hx=None, time_step=0)``: ``time_step`` is the index of this step in the
    sequence and selects the statistics slot ``min(time_step, max_length - 1)``. Parameters ``weight_ih``
    [4H, I], ``weight_hh`` [4H, H], ``bias_ih``, ``bias_hh``, ``gamma_ih``, ``gamma_hh`` [4H], ``gamma_c``,
    ``beta_c`` [H]; buffers as one layer of :class:`BNLSTM` without the layer suffix. Only frame-wise
    normalization (or None) makes sense for a single step. Runs the reference op.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, *, max_length: int = DEFAULT_MAX_LENGTH,
                 momentum: float | None = 0.1, eps: float = 1e-5, gamma_init: float = 0.1,
                 normalization: str | None = "frame", track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        _check_common_arguments(input_size, hidden_size, bias, momentum, eps, gamma_init, normalization,
                                track_running_stats, max_length, "reference")
        if normalization == "sequence":
            raise ValueError("BNLSTMCell supports normalization='frame' or None; 'sequence' needs whole sequences")
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.max_length, self.momentum, self.eps = max_length, momentum, float(eps)
        self.gamma_init, self.normalization = float(gamma_init), normalization
        self.track_running_stats = track_running_stats
        self._init_stats_state()
        factory_kwargs = {"device": device, "dtype": dtype}
        G = 4 * hidden_size
        shapes = {"weight_ih": (G, input_size), "weight_hh": (G, hidden_size)}
        if bias:
            shapes.update(bias_ih=(G,), bias_hh=(G,))
        if normalization == "frame":
            shapes.update(gamma_ih=(G,), gamma_hh=(G,), gamma_c=(hidden_size,), beta_c=(hidden_size,))
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory_kwargs)))
        self._register_stats("", G, hidden_size, factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            _reset_lstm_weights(self, "", self.hidden_size, self.gamma_init)
        self.reset_running_stats()

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, bias={self.bias}, "
                f"normalization={self.normalization!r}")

    def forward(self, input: Tensor, hx=None, time_step: int = 0):
        if input.dim() not in (1, 2):
            raise ValueError(f"BNLSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"BNLSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        if input.dtype != self.weight_ih.dtype:
            raise ValueError(f"BNLSTMCell: input dtype ({input.dtype}) does not match weight dtype "
                             f"({self.weight_ih.dtype})")
        if input.size(-1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.size(-1)} expected {self.input_size}")
        if not isinstance(time_step, int) or isinstance(time_step, bool) or time_step < 0:
            raise ValueError(f"time_step must be an int >= 0, got {time_step!r}")
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        B = x.shape[0]
        if hx is None:
            h0 = c0 = x.new_zeros(B, self.hidden_size)
        else:
            h0, c0 = (hx[0], hx[1]) if is_batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
            # nn.LSTMCell's checks, in its order and words
            for idx, value in enumerate((h0, c0)):
                if value.size(0) != B or value.dim() != 2:
                    raise RuntimeError(f"Input batch size {B} doesn't match hidden{idx} batch size {value.size(0)}")
                if value.size(1) != self.hidden_size:
                    raise RuntimeError(f"hidden{idx} has inconsistent hidden_size: got {value.size(1)}, "
                                       f"expected {self.hidden_size}")
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats and self.normalization is not None:
            self._warn_if_running_averages_lag()
        group = self._sync_group(use_batch_stats)
        if self.normalization is not None and use_batch_stats and (B > 0 or group is not None):
            self._check_training_rows(B, group, x.device)
        update_stats = self.training and self.track_running_stats and self.normalization is not None
        if update_stats:
            self._warn_past_max_length(time_step)
        slots = self._slots(1, time_step, use_batch_stats)
        config = LayerConfig(normalization=self.normalization, eps=self.eps, use_batch_stats=use_batch_stats,
                             process_group=group)
        _, h, c, stats = bnlstm_layer(
            x.unsqueeze(0), h0, c0, _layer_parameters(self, ""), population=self._population("", slots, x),
            config=config, backend="reference",
        )
        if update_stats and stats is not None and (B > 0 or group is not None):
            self._record_statistics("", slots, time_step, stats)
        if update_stats:
            self._track_steps(time_step + 1)
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))


def _layer_parameters(module: nn.Module, suffix: str) -> LayerParams:
    """One layer-direction's parameters as the op takes them (the two biases summed: both follow the BNs)."""
    bias = None
    if module.bias:
        bias = getattr(module, "bias_ih" + suffix) + getattr(module, "bias_hh" + suffix)
    bn = {name: getattr(module, name + suffix, None) for name in ("gamma_ih", "gamma_hh", "gamma_c", "beta_c")}
    return LayerParams(weight_ih=getattr(module, "weight_ih" + suffix), weight_hh=getattr(module, "weight_hh" + suffix),
                       bias=bias, weight_hr=getattr(module, "weight_hr" + suffix, None), **bn)


def _reset_lstm_weights(module: nn.Module, suffix: str, H: int, gamma_init: float) -> None:
    """Orthogonal gate blocks, biases zero but the forget gate's 1 (on bias_ih), gammas, beta_c 0."""
    for name in ("weight_ih", "weight_hh"):
        weight = getattr(module, name + suffix)
        for block in weight.split(H, dim=0):
            # orthogonal_ needs a QR, which half precision lacks on the CPU: draw in float32, then copy
            block.copy_(nn.init.orthogonal_(torch.empty(block.shape, device=block.device)))
    if getattr(module, "weight_hr" + suffix, None) is not None:
        weight_hr = getattr(module, "weight_hr" + suffix)
        weight_hr.copy_(nn.init.orthogonal_(torch.empty(weight_hr.shape, device=weight_hr.device)))
    if getattr(module, "bias_ih" + suffix, None) is not None:
        getattr(module, "bias_ih" + suffix).zero_()
        getattr(module, "bias_ih" + suffix)[H:2 * H] = 1.0
        getattr(module, "bias_hh" + suffix).zero_()
    for name in ("gamma_ih", "gamma_hh", "gamma_c"):
        if getattr(module, name + suffix, None) is not None:
            getattr(module, name + suffix).fill_(gamma_init)
    if getattr(module, "beta_c" + suffix, None) is not None:
        getattr(module, "beta_c" + suffix).zero_()


def _reverse_index(T: int, lengths: Tensor | None, device) -> Tensor:
    """[T, B] (or [T, 1]) time index that reverses each row's valid part and leaves padding in place."""
    steps = torch.arange(T).unsqueeze(1)  # [T, 1]
    if lengths is None:
        return (T - 1 - steps).to(device)
    L = lengths.unsqueeze(0)  # [1, B]
    return torch.where(steps < L, L - 1 - steps, steps).to(device)


def _gather_time(seq: Tensor, index: Tensor) -> Tensor:
    """seq [T, B, F] reordered in time per row by index [T, B] or [T, 1]; an involution here."""
    if index.shape[1] == 1:
        return seq.flip(0)
    return seq.gather(0, index.unsqueeze(2).expand(-1, -1, seq.shape[2]))


def _lengths_from_batch_sizes(batch_sizes: Tensor) -> Tensor:
    """Sorted (descending) lengths [B] from a PackedSequence's batch_sizes [T]: row b runs while size > b."""
    B = int(batch_sizes[0]) if batch_sizes.numel() else 0
    return (batch_sizes.unsqueeze(0) > torch.arange(B).unsqueeze(1)).sum(1)

