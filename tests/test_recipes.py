"""The README's "Training recipes", each run as written: streams, re-estimation on stateful models, saving.

Chunks of one bounded sequence (``time_offset`` within the sequence, chunked == one full run) are tested in
tests/test_module.py::test_chunked_run_with_time_offset_equals_full_run; here is the unbounded stream.
"""

import copy
import io
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_bnlstm import BNLSTM, update_population_statistics

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.stateful_lm import CarryState, batchify, chunks  # noqa: E402

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny shapes: intra-op threads only add overhead here (tens of ms per op on a loaded machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stats_buffers(model):
    return {name: buf for name, buf in model.named_buffers() if "running_" in name or "num_batches" in name}


# Evaluating after training: re-estimate, do not trust the running averages


def test_eval_after_training_on_sequences_that_start_alike_needs_the_re_estimate():
    """examples/README.md section 4 in miniature: every sequence starts blank, so c at step 0 is the same
    for all of them (batch variance 0); eval divides the running mean's lag behind the weights by
    sqrt(eps). The exact re-estimate at the final weights gives eval == the batch-statistics run."""
    torch.manual_seed(0)
    model = BNLSTM(2, 4, max_length=6, backend="reference", dtype=DTYPE)
    x = torch.randn(6, 256, 2, dtype=DTYPE)
    x[0] = 0
    target = torch.randn(256, 4, dtype=DTYPE)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-2)
    for _ in range(30):
        out, _ = model(x)
        loss = (out[-1] - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        batch_out, _ = copy.deepcopy(model)(x)  # training mode: this batch's statistics
        exact = copy.deepcopy(model)
        update_population_statistics([x], exact)
        assert exact.running_var_c_l0[0].max() == 0  # the same c_0 for every sequence
        err_running = (copy.deepcopy(model).eval()(x)[0] - batch_out).abs().max().item()
        err_exact = (exact.eval()(x)[0] - batch_out).abs().max().item()
    assert err_exact < 0.05  # only the unbiased variance's n / (n - 1) separates them
    assert err_running > 10 * err_exact


# A stream: truncated BPTT with the state carried


def test_stream_of_1000_chunks_keeps_buffers_fixed_and_warns_once():
    torch.manual_seed(0)
    L, B, I, H, max_length = 2, 2, 2, 3, 8
    model = BNLSTM(I, H, max_length=max_length, backend="reference", dtype=DTYPE)
    buffers = {name: (buf.shape, buf.data_ptr()) for name, buf in model.named_buffers()}
    size = len(pickle.dumps(model.state_dict()))
    hidden = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            for k in range(1000):
                x = torch.randn(L, B, I, dtype=DTYPE)
                _, hidden = model(x, hidden, time_offset=k * L)  # position in the stream
                assert {name: (buf.shape, buf.data_ptr()) for name, buf in model.named_buffers()} == buffers
    past = [w for w in caught if "share the last statistics slot" in str(w.message)]
    assert len(past) == 1, [str(w.message) for w in caught]
    assert int(model.running_length) == max_length
    counts = model.num_batches_tracked_l0
    # positions 0 .. max_length - 2 each once; every later position of the stream in the last slot
    assert counts[:-1].tolist() == [1] * (max_length - 1)
    assert int(counts[-1]) == 1000 * L - (max_length - 1)
    assert len(pickle.dumps(model.state_dict())) == size
    # eval past the stream positions trained reads the last slot
    model.eval()
    with torch.no_grad():
        out, _ = model(torch.randn(L, B, I, dtype=DTYPE), hidden, time_offset=10**6)
    assert torch.isfinite(out).all()


# Population statistics for a model called with a state (forward=)


class _StreamModel(nn.Module):
    """A stateful model called as ``model(x, hidden, time_offset=...)`` (the README's shape)."""

    def __init__(self, I=2, H=3, max_length=16):
        super().__init__()
        self.rnn = BNLSTM(I, H, max_length=max_length, backend="reference", dtype=DTYPE)
        self.readout = nn.Linear(H, 2, dtype=DTYPE)

    def forward(self, x, hidden=None, time_offset=0):
        output, hidden = self.rnn(x, hidden, time_offset=time_offset)
        return self.readout(output), hidden


def _randomized(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _stream(T=12, B=64, I=2, seed=0):
    # a drifting input, so the state keeps changing along the stream
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, I, generator=g, dtype=DTYPE) + torch.linspace(0, 2, T, dtype=DTYPE)[:, None, None]


def _chunked(x, L):
    return [(x[p:p + L], None, p) for p in range(0, x.shape[0], L)]  # (input, target, position)


def test_update_population_statistics_carrying_the_state_equals_one_pass_over_the_whole_sequence():
    model = _randomized(_StreamModel())
    x = _stream()
    carried, whole = copy.deepcopy(model), copy.deepcopy(model)
    update_population_statistics(_chunked(x, 4), carried, forward=CarryState())
    update_population_statistics([x], whole)  # the hand computation: one batch, the whole sequence at once
    for name, value in _stats_buffers(whole.rnn).items():
        torch.testing.assert_close(getattr(carried.rnn, name), value, msg=name)
    # the (x,) pattern restarts every chunk from a zero state at offset 0: other statistics
    restart = copy.deepcopy(model)
    update_population_statistics([(chunk,) for chunk, _, _ in _chunked(x, 4)], restart)
    assert not torch.allclose(restart.rnn.running_mean_hh_l0[:4], whole.rnn.running_mean_hh_l0[:4])


def test_carried_statistics_beat_restarting_every_chunk_when_evaluating_a_stream():
    """Eval mode on a stream (state carried) matches the batch-statistics run closely only with statistics
    re-estimated the way the stream is evaluated."""
    model = _randomized(_StreamModel())
    x = _stream(B=512)
    with torch.no_grad():
        target, _ = copy.deepcopy(model)(x)  # training mode: the batch statistics of these very rows

    def eval_stream(m):
        m.eval()
        outs, hidden = [], None
        with torch.no_grad():
            for chunk, _, position in _chunked(x, 4):
                out, hidden = m(chunk, hidden, time_offset=position)
                outs.append(out)
        return torch.cat(outs)

    carried, restart = copy.deepcopy(model), copy.deepcopy(model)
    update_population_statistics(_chunked(x, 4), carried, forward=CarryState())
    update_population_statistics([(chunk,) for chunk, _, _ in _chunked(x, 4)], restart)
    err_carried = (eval_stream(carried) - target).abs().max().item()
    err_restart = (eval_stream(restart) - target).abs().max().item()
    # carried: only the unbiased-variance factor n / (n - 1) separates population and batch statistics
    assert err_carried < 1e-2
    assert err_restart > 10 * err_carried


def test_stateful_lm_example_pieces():
    stream = batchify(torch.arange(23), 4)  # 5 positions x 4 columns, the remainder dropped
    assert stream.shape == (5, 4) and stream[:, 1].tolist() == [5, 6, 7, 8, 9]
    pieces = list(chunks(stream, 2))
    assert [p for _, _, p in pieces] == [0, 2]  # the last position only ever is a target
    assert torch.equal(pieces[1][1], stream[3:5])


# Saving and loading


def _trained():
    torch.manual_seed(0)
    model = BNLSTM(3, 4, num_layers=2, max_length=6, backend="reference", dtype=DTYPE)
    for _ in range(3):
        model(torch.randn(5, 4, 3, dtype=DTYPE))
    return model.eval()


def test_whole_model_round_trip_with_weights_only_false():
    model = _trained()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(9, 2, 3, dtype=DTYPE)  # longer than trained: the last trained slot
    torch.testing.assert_close(loaded(x), model(x))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)


def test_state_dict_round_trip_with_weights_only_true():
    model = _trained()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = BNLSTM(3, 4, num_layers=2, max_length=6, backend="reference", dtype=DTYPE)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(9, 2, 3, dtype=DTYPE)
    torch.testing.assert_close(fresh.eval()(x), model(x))


def test_whole_model_with_weights_only_true_fails_as_nn_lstm_does_and_safe_globals_fix_it():
    errors = {}
    for cls, kwargs in ((nn.LSTM, {}), (BNLSTM, {"backend": "reference"})):
        buf = io.BytesIO()
        torch.save(cls(3, 4, **kwargs), buf)
        buf.seek(0)
        with pytest.raises(pickle.UnpicklingError) as info:
            torch.load(buf, weights_only=True)
        errors[cls] = info.value
        buf.seek(0)
        with torch.serialization.safe_globals([cls]):
            assert type(torch.load(buf, weights_only=True)) is cls
    assert type(errors[BNLSTM]) is type(errors[nn.LSTM])
    assert "fused_bnlstm.modules.BNLSTM" in str(errors[BNLSTM])  # names the class to allow


# The warning proposed for modules.py (issue #16): runs once fused_bnlstm exports PopulationStatisticsWarning.


def test_eval_on_running_averages_that_training_moved_warns_once_and_not_after_the_re_estimate():
    import fused_bnlstm

    category = getattr(fused_bnlstm, "PopulationStatisticsWarning", None)
    if category is None:
        pytest.skip("fused_bnlstm.PopulationStatisticsWarning not there yet")
    torch.manual_seed(0)
    x = torch.randn(4, 8, 2, dtype=DTYPE)

    def eval_warnings(module):
        module.eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                module(x)
        module.train()
        return [w for w in caught if issubclass(w.category, category)]

    fresh = BNLSTM(2, 3, backend="reference", dtype=DTYPE)
    assert eval_warnings(fresh) == []  # never trained: nothing to lag
    trained = copy.deepcopy(fresh)
    trained(x)  # a training call folds its batch statistics into the running averages
    re_estimated = copy.deepcopy(trained)
    update_population_statistics([x], re_estimated)
    assert eval_warnings(re_estimated) == []
    caught = eval_warnings(trained)
    assert len(caught) == 1 and "update_population_statistics" in str(caught[0].message)
    assert eval_warnings(trained) == []  # once per module


def test_the_readme_training_recipes_run_as_written(tmp_path, monkeypatch):
    """The python blocks of README.md's "Training recipes" in order, with tiny stand-ins for the data."""
    import re

    readme = (Path(ROOT) / "README.md").read_text()
    if "## Training recipes" not in readme:
        pytest.skip("README.md has no 'Training recipes' section yet")
    section = readme.split("## Training recipes", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks
    from examples.stateful_lm import WordLM

    torch.manual_seed(0)
    namespace = {
        "train_loader": [(torch.rand(64, 16, 1), torch.zeros(16)) for _ in range(2)],
        "x": torch.randn(120, 4, 3), "y": torch.randn(120, 4, 5), "input_size": 3, "hidden_size": 5,
        "loss_fn": lambda output, target: (output - target).pow(2).mean(),
        "WordLM": lambda vocab, emb, hidden, max_length: WordLM(vocab, emb, hidden, max_length, "reference"),
        "vocab": 20, "bptt": 5, "chunks": chunks, "train_stream": batchify(torch.randint(0, 20, (240,)), 4),
    }
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, block in enumerate(blocks):
            # "..." stands for the rest of a training step
            exec(compile(block.replace("    ...\n", "    logits.sum().backward()\n"), f"recipe {k}", "exec"), namespace)
    assert isinstance(namespace["lstm"], BNLSTM)
