"""BNLSTM / BNLSTMCell as drop-ins for nn.LSTM / nn.LSTMCell: forms, statistics semantics, state, errors."""

import copy
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

from fused_bnlstm import BNLSTM, BNLSTMCell, bnlstm_layer, update_population_statistics
from fused_bnlstm.ops import LayerParams

DTYPE = torch.float64


def _randomize(model, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=g, dtype=param.dtype))
    return model


def _padded(T, B, I, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=DTYPE)
    return x * (torch.arange(T).unsqueeze(1) < torch.tensor(lengths)).unsqueeze(2)


# --------------------------------------------------------------------------------------------------------
# normalization=None is a plain LSTM: it must equal nn.LSTM given nn.LSTM's state dict.


@pytest.mark.parametrize(
    "num_layers, bidirectional, form",
    [
        pytest.param(1, False, "time-major", id="L1-uni-time-major"),
        pytest.param(1, True, "time-major", id="L1-bi-time-major"),
        pytest.param(2, False, "batch-first", id="L2-uni-batch-first"),
        pytest.param(2, True, "packed", id="L2-bi-packed-varlen"),
        pytest.param(2, True, "unbatched", id="L2-bi-unbatched"),
        pytest.param(1, True, "packed-sorted", id="L1-bi-packed-sorted"),
    ],
)
@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "h0c0"])
def test_plain_bnlstm_equals_nn_lstm(num_layers, bidirectional, form, with_hx):
    torch.manual_seed(0)
    T, B, I, H = 6, 3, 4, 5
    D = 2 if bidirectional else 1
    batch_first = form == "batch-first"
    lstm = nn.LSTM(I, H, num_layers, bidirectional=bidirectional, batch_first=batch_first, dtype=DTYPE)
    model = BNLSTM(I, H, num_layers, bidirectional=bidirectional, batch_first=batch_first,
                   normalization=None, backend="reference", dtype=DTYPE)
    model.load_state_dict(lstm.state_dict(), strict=True)

    if form.startswith("packed"):
        lengths = [6, 5, 2] if form == "packed-sorted" else [3, 6, 1]
        seqs = [torch.randn(n, I, dtype=DTYPE, requires_grad=True) for n in lengths]
        make_input = lambda: pack_sequence(seqs, enforce_sorted=form == "packed-sorted")  # noqa: E731
        leaves = seqs
        state_batch = (B,)
    elif form == "unbatched":
        x = torch.randn(T, I, dtype=DTYPE, requires_grad=True)
        make_input, leaves, state_batch = (lambda: x), [x], ()
    else:
        x = torch.randn(B, T, I, dtype=DTYPE, requires_grad=True) if batch_first else \
            torch.randn(T, B, I, dtype=DTYPE, requires_grad=True)
        make_input, leaves, state_batch = (lambda: x), [x], (B,)
    hx = None
    if with_hx:
        h0 = torch.randn(num_layers * D, *state_batch, H, dtype=DTYPE, requires_grad=True)
        c0 = torch.randn(num_layers * D, *state_batch, H, dtype=DTYPE, requires_grad=True)
        hx, leaves = (h0, c0), leaves + [h0, c0]

    results = []
    for module in (lstm, model):
        out, (h_n, c_n) = module(make_input(), hx)
        out_t = out.data if form.startswith("packed") else out
        g = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=DTYPE)).sum() for t in (out_t, h_n, c_n))
        grads = torch.autograd.grad(loss, leaves + list(module.parameters()))
        results.append((out, out_t, h_n, c_n, grads))
    (ref_out, ref_t, ref_h, ref_c, ref_g), (out, out_t, h_n, c_n, grads) = results
    if form.startswith("packed"):
        assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
        for attr in ("sorted_indices", "unsorted_indices"):
            a, b = getattr(out, attr), getattr(ref_out, attr)
            assert (a is None and b is None) or torch.equal(a, b)
    torch.testing.assert_close(out_t, ref_t, msg="output")
    torch.testing.assert_close(h_n, ref_h, msg="h_n")
    torch.testing.assert_close(c_n, ref_c, msg="c_n")
    names = [f"input{i}" for i in range(len(leaves))] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, grads, ref_g):
        torch.testing.assert_close(a, b, msg=f"d{name}")


def test_parameter_names_and_shapes_follow_nn_lstm():
    lstm = nn.LSTM(3, 4, 2, bidirectional=True)
    model = BNLSTM(3, 4, 2, bidirectional=True)
    lstm_shapes = {n: p.shape for n, p in lstm.named_parameters()}
    model_shapes = {n: p.shape for n, p in model.named_parameters()}
    assert all(model_shapes[n] == s for n, s in lstm_shapes.items())
    extra = set(model_shapes) - set(lstm_shapes)
    assert extra == {f"{p}_l{k}{s}" for p in ("gamma_ih", "gamma_hh", "gamma_c", "beta_c")
                     for k in range(2) for s in ("", "_reverse")}
    missing, unexpected = model.load_state_dict(lstm.state_dict(), strict=False)
    assert unexpected == [] and all(("running" in k or "num_batches" in k or "gamma" in k or "beta" in k)
                                    for k in missing)
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"):
        assert getattr(model, attr) == getattr(lstm, attr)
    assert [[p.shape for p in w] for w in model.all_weights] == [[p.shape for p in w] for w in lstm.all_weights]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"])
def test_constructs_in_every_dtype(dtype):
    model = BNLSTM(3, 4, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    block = model.weight_hh_l0[:4].float()
    torch.testing.assert_close(block @ block.t(), torch.eye(4), atol=2e-2, rtol=0)


def test_initialization_follows_the_paper():
    model = BNLSTM(5, 6, gamma_init=0.1)
    assert torch.all(model.gamma_ih_l0 == 0.1) and torch.all(model.gamma_hh_l0 == 0.1)
    assert torch.all(model.gamma_c_l0 == 0.1) and torch.all(model.beta_c_l0 == 0)
    bias = model.bias_ih_l0 + model.bias_hh_l0
    assert torch.all(bias[6:12] == 1.0) and torch.all(bias[:6] == 0) and torch.all(bias[12:] == 0)
    for block in model.weight_hh_l0.detach().split(6):
        torch.testing.assert_close(block @ block.t(), torch.eye(6), atol=1e-5, rtol=0)
    assert torch.all(model.running_var_ih_l0 == 1) and torch.all(model.running_mean_c_l0 == 0)


# --------------------------------------------------------------------------------------------------------
# Population statistics.


# max_length 3 < T: steps 2 and 3 both update the last slot, in order (folded in closed form); 4 = T: the
# last step alone reaches the last slot; 8: every step its own slot (these two: _stats' foreach path)
@pytest.mark.parametrize("max_length", [3, 4, 8], ids=["shared-last-slot", "reaches-last-slot", "own-slots"])
def test_running_statistics_after_training_steps_equal_hand_computation(max_length):
    torch.manual_seed(0)
    T, B, I, H, m = 4, 5, 3, 2, 0.1
    model = _randomize(BNLSTM(I, H, max_length=max_length, momentum=m, dtype=DTYPE, backend="reference"))
    batches = [torch.randn(T, B, I, dtype=DTYPE) for _ in range(3)]
    for x in batches:
        model(x)
    W = model.weight_ih_l0.detach()
    mean, var = torch.zeros(max_length, 4 * H, dtype=DTYPE), torch.ones(max_length, 4 * H, dtype=DTYPE)
    count = [0] * max_length
    for x in batches:
        for t in range(T):
            slot = min(t, max_length - 1)
            a = x[t] @ W.t()
            mean[slot] = (1 - m) * mean[slot] + m * a.mean(0)
            var[slot] = (1 - m) * var[slot] + m * a.var(0, unbiased=True)
            count[slot] += 1
    torch.testing.assert_close(model.running_mean_ih_l0, mean)
    torch.testing.assert_close(model.running_var_ih_l0, var)
    assert model.num_batches_tracked_l0.tolist() == count


def test_cumulative_average_with_momentum_none():
    torch.manual_seed(0)
    T, B, I, H = 3, 4, 2, 2
    model = BNLSTM(I, H, momentum=None, dtype=DTYPE, backend="reference")
    batches = [torch.randn(T, B, I, dtype=DTYPE) for _ in range(4)]
    for x in batches:
        model(x)
    W = model.weight_ih_l0.detach()
    for t in range(T):
        a = torch.stack([x[t] @ W.t() for x in batches])  # [batches, B, 4H]
        torch.testing.assert_close(model.running_mean_ih_l0[t], a.mean(1).mean(0))
        torch.testing.assert_close(model.running_var_ih_l0[t], a.var(1, unbiased=True).mean(0))


def test_padding_never_enters_statistics():
    torch.manual_seed(0)
    T, B, I, H = 5, 4, 3, 3
    lengths = [5, 2, 4, 3]
    clean = _padded(T, B, I, lengths)
    garbage = clean + 100.0 * (torch.arange(T).unsqueeze(1) >= torch.tensor(lengths)).unsqueeze(2)
    model = _randomize(BNLSTM(I, H, dtype=DTYPE, backend="reference"))
    # The op itself, handed padding full of garbage, must not let it into outputs or statistics.
    params = LayerParams(weight_ih=model.weight_ih_l0, weight_hh=model.weight_hh_l0,
                         bias=model.bias_ih_l0 + model.bias_hh_l0, gamma_ih=model.gamma_ih_l0,
                         gamma_hh=model.gamma_hh_l0, gamma_c=model.gamma_c_l0, beta_c=model.beta_c_l0)
    population = model._population("_l0", torch.zeros(T, dtype=torch.long), clean)
    results = [bnlstm_layer(x, x.new_zeros(B, H), x.new_zeros(B, H), params, lengths=torch.tensor(lengths),
                            population=population) for x in (clean, garbage)]
    torch.testing.assert_close(results[0][:3], results[1][:3])
    for name in ("counts", "mean_ih", "var_ih", "mean_hh", "var_hh", "mean_c", "var_c"):
        torch.testing.assert_close(getattr(results[0][3], name), getattr(results[1][3], name), msg=name,
                                   equal_nan=True)
    model(pack_padded_sequence(garbage, torch.tensor(lengths), enforce_sorted=False))
    W = model.weight_ih_l0.detach()
    for t in range(T):
        rows = torch.tensor(lengths) > t
        a = clean[t, rows] @ W.t()
        expected = 0.1 * a.mean(0) if rows.sum() >= 2 else torch.zeros_like(a[0])  # one row: no update
        torch.testing.assert_close(model.running_mean_ih_l0[t], expected)


def test_eval_past_max_length_uses_last_slot():
    torch.manual_seed(0)
    T, B, I, H, L = 6, 3, 2, 3, 3
    model = _randomize(BNLSTM(I, H, max_length=L, dtype=DTYPE, backend="reference"))
    for x in [torch.randn(T, B, I, dtype=DTYPE) for _ in range(2)]:
        model(x)
    model.eval()
    x = torch.randn(T, B, I, dtype=DTYPE)
    out, _ = model(x)
    # Same model with the statistics laid out explicitly per step (slots 0, 1, 2, 2, 2, 2).
    explicit = BNLSTM(I, H, max_length=T, dtype=DTYPE, backend="reference")
    state = model.state_dict()
    slots = torch.tensor([min(t, L - 1) for t in range(T)])
    for key, value in state.items():
        if key.startswith(("running_", "num_batches")) and value.dim():
            state[key] = value[slots]
    explicit.load_state_dict(state)
    explicit.eval()
    torch.testing.assert_close(out, explicit(x)[0])
    # And the last slot really matters past the end: perturb it and the tail moves, the head does not.
    with torch.no_grad():
        model.running_mean_ih_l0[L - 1] += 1.0
    moved = model(x)[0]
    torch.testing.assert_close(moved[: L - 1], out[: L - 1])
    assert not torch.allclose(moved[L - 1:], out[L - 1:])


def test_buffers_keep_their_size_and_identity_and_eval_reuses_the_longest_trained_step():
    model = BNLSTM(2, 3, max_length=8, dtype=DTYPE, backend="reference")
    buffers = {name: (b, b.data_ptr()) for name, b in model.named_buffers()}
    assert model.running_mean_ih_l0.shape == (8, 12) and int(model.running_length) == 0
    model(torch.randn(5, 2, 2, dtype=DTYPE))
    assert model.num_batches_tracked_l0.tolist() == [1] * 5 + [0] * 3 and int(model.running_length) == 5
    model(torch.randn(3, 2, 2, dtype=DTYPE), time_offset=4)
    assert model.num_batches_tracked_l0.tolist() == [1, 1, 1, 1, 2, 1, 1, 0] and int(model.running_length) == 7
    with pytest.warns(UserWarning, match="max_length=8: steps from 7 on share the last statistics slot"):
        model(torch.randn(3, 2, 2, dtype=DTYPE), time_offset=7)  # steps 7, 8, 9 all train slot 7
    assert model.num_batches_tracked_l0.tolist() == [1, 1, 1, 1, 2, 1, 1, 3] and int(model.running_length) == 8
    for name, b in model.named_buffers():
        assert b is buffers[name][0] and b.data_ptr() == buffers[name][1], name
    # eval past the longest trained sequence reads its last slot
    short = BNLSTM(2, 3, max_length=8, dtype=DTYPE, backend="reference")
    short(torch.randn(3, 4, 2, dtype=DTYPE))
    short.eval()
    x = torch.randn(6, 2, 2, dtype=DTYPE)
    explicit = copy.deepcopy(short)
    with torch.no_grad():
        for name, b in explicit.named_buffers():
            if name.startswith("running_") and b.dim() == 2:
                b[3:] = b[2]
    explicit.running_length.fill_(0)  # untrained: every step its own slot
    torch.testing.assert_close(short(x)[0], explicit(x)[0])


def test_eval_and_empty_batches_leave_buffers_alone():
    model = BNLSTM(2, 3, max_length=4, dtype=DTYPE, backend="reference")
    model(torch.randn(4, 3, 2, dtype=DTYPE))
    before = copy.deepcopy(model.state_dict())
    model.eval()
    model(torch.randn(6, 3, 2, dtype=DTYPE))
    model.train()
    out, (h_n, c_n) = model(torch.randn(4, 0, 2, dtype=DTYPE))
    assert out.shape == (4, 0, 3) and h_n.shape == (1, 0, 3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fewer_than_two_running_rows_use_population_statistics():
    torch.manual_seed(0)
    T, B, I, H = 5, 2, 3, 4
    lengths = [5, 1]  # from t = 1 on a single row runs: no batch variance
    model = _randomize(BNLSTM(I, H, max_length=T, dtype=DTYPE, backend="reference"))
    with torch.no_grad():
        model.running_mean_hh_l0.normal_()
        model.running_var_c_l0.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _padded(T, B, I, lengths).requires_grad_()
    out, (h_n, c_n) = model(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False))
    out.data.sum().backward()
    assert torch.isfinite(out.data).all() and torch.isfinite(x.grad).all()
    assert model.num_batches_tracked_l0.tolist() == [1, 0, 0, 0, 0]
    for key in ("running_mean_hh_l0", "running_var_c_l0"):
        assert torch.equal(getattr(model, key)[1:], before[key][1:]), key
    # Past t = 0 the single long row runs exactly as in eval mode with the statistics held before the call.
    first_step = copy.deepcopy(model)
    first_step.load_state_dict(before)
    _, (h1, c1) = first_step(x[:1].detach())
    eval_model = copy.deepcopy(first_step)
    eval_model.load_state_dict(before)
    eval_model.eval()
    tail, _ = eval_model(x[1:, :1].detach(), (h1[:, :1], c1[:, :1]), time_offset=1)
    padded_out = pad_packed_sequence(out)[0]
    torch.testing.assert_close(padded_out[1:, :1], tail)


def test_whole_batch_of_one_in_training_is_an_error_but_eval_is_fine():
    model = BNLSTM(2, 3)
    with pytest.raises(ValueError, match=re.escape("Expected more than 1 value per channel when training, "
                                                   "got input size torch.Size([1, 12])")):
        model(torch.randn(4, 1, 2))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        model(torch.randn(4, 2))  # unbatched in training
    model.eval()
    out, _ = model(torch.randn(4, 2))
    assert out.shape == (4, 3)
    BNLSTM(2, 3, normalization=None)(torch.randn(4, 1, 2))  # a plain LSTM has no batch statistics


def test_chunked_run_with_time_offset_equals_full_run():
    torch.manual_seed(0)
    T, B, I, H = 8, 3, 2, 3
    full = _randomize(BNLSTM(I, H, num_layers=2, dtype=DTYPE, backend="reference"))
    chunked = copy.deepcopy(full)
    x = torch.randn(T, B, I, dtype=DTYPE)
    out_full, (h_full, c_full) = full(x)
    out_a, hx = chunked(x[:3])
    out_b, (h_b, c_b) = chunked(x[3:], hx, time_offset=3)
    torch.testing.assert_close(torch.cat([out_a, out_b]), out_full)
    torch.testing.assert_close((h_b, c_b), (h_full, c_full))
    for key, value in full.state_dict().items():
        torch.testing.assert_close(chunked.state_dict()[key], value, msg=key)


# eval reads slot min(t + time_offset, running_length - 1): consecutive slots (rows of the buffers as they are,
# without a graph; copies with one) and, past the longest training sequence, the last one repeated
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_eval_chunked_run_with_time_offset_equals_full_run(grad):
    torch.manual_seed(0)
    T, B, I, H = 8, 3, 2, 3
    model = _randomize(BNLSTM(I, H, max_length=16, dtype=DTYPE, backend="reference"))
    for _ in range(2):
        model(torch.randn(6, B, I, dtype=DTYPE))  # running_length 6: slots 6.. read slot 5
    model.eval()
    x = torch.randn(T, B, I, dtype=DTYPE, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out_full, (h_full, c_full) = model(x)
        out_a, hx = model(x[:3])
        out_b, (h_b, c_b) = model(x[3:5], hx, time_offset=3)
        out_c, (h_c, c_c) = model(x[5:], (h_b, c_b), time_offset=5)
    torch.testing.assert_close(torch.cat([out_a, out_b, out_c]), out_full)
    torch.testing.assert_close((h_c, c_c), (h_full, c_full))


def test_reverse_direction_reads_only_the_valid_part():
    torch.manual_seed(0)
    T, B, I, H = 6, 3, 2, 3
    lengths = [6, 4, 2]
    bi = _randomize(BNLSTM(I, H, bidirectional=True, dtype=DTYPE, backend="reference"))
    uni = BNLSTM(I, H, dtype=DTYPE, backend="reference")
    uni.load_state_dict({k.replace("_reverse", ""): v for k, v in bi.state_dict().items() if "_reverse" in k})
    x = _padded(T, B, I, lengths)
    flipped = torch.zeros_like(x)
    for b, n in enumerate(lengths):
        flipped[:n, b] = x[:n, b].flip(0)
    out_bi, (h_bi, _) = bi(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False))
    out_uni, (h_uni, _) = uni(pack_padded_sequence(flipped, torch.tensor(lengths), enforce_sorted=False))
    out_bi = pad_packed_sequence(out_bi)[0][..., H:]
    out_uni = pad_packed_sequence(out_uni)[0]
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out_bi[:n, b], out_uni[:n, b].flip(0))
        assert torch.all(out_bi[n:, b] == 0)
    torch.testing.assert_close(h_bi[1], h_uni[0])
    for q in ("ih", "hh", "c"):
        torch.testing.assert_close(getattr(bi, f"running_mean_{q}_l0_reverse"), getattr(uni, f"running_mean_{q}_l0"))


def test_state_dict_round_trip_and_deepcopy_give_identical_outputs():
    torch.manual_seed(0)
    model = _randomize(BNLSTM(3, 4, num_layers=2, bidirectional=True, dtype=DTYPE, backend="reference"))
    for _ in range(2):
        model(torch.randn(7, 3, 3, dtype=DTYPE))  # grows the buffers to 7 slots
    fresh = BNLSTM(3, 4, num_layers=2, bidirectional=True, dtype=DTYPE, backend="reference")
    fresh.load_state_dict(model.state_dict())
    twin = copy.deepcopy(model)
    x = torch.randn(9, 2, 3, dtype=DTYPE)
    for m in (model, fresh, twin):
        m.eval()
    expected = model(x)
    for other in (fresh, twin):
        out, (h_n, c_n) = other(x)
        assert torch.equal(out, expected[0]) and torch.equal(h_n, expected[1][0]) and torch.equal(c_n, expected[1][1])


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    model = BNLSTM(3, 4, num_layers=2, dropout=1.0, normalization=None, dtype=DTYPE, backend="reference")
    second = BNLSTM(4, 4, normalization=None, dtype=DTYPE, backend="reference")
    second.load_state_dict({k.replace("_l1", "_l0"): v for k, v in model.state_dict().items() if "_l1" in k})
    x = torch.randn(5, 2, 3, dtype=DTYPE)
    out, _ = model(x)  # p=1 drops all of layer 0's output: layer 1 sees zeros
    torch.testing.assert_close(out, second(torch.zeros(5, 2, 4, dtype=DTYPE))[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_track_running_stats_false_always_uses_batch_statistics():
    torch.manual_seed(0)
    model = _randomize(BNLSTM(3, 4, track_running_stats=False, dtype=DTYPE, backend="reference"))
    assert not any("running" in k for k in model.state_dict())
    x = torch.randn(5, 3, 3, dtype=DTYPE)
    train_out = model(x)[0]
    model.eval()
    torch.testing.assert_close(model(x)[0], train_out)


def test_update_population_statistics_is_exact():
    torch.manual_seed(0)
    T, I, H = 4, 3, 2
    model = _randomize(BNLSTM(I, H, dtype=DTYPE, backend="reference"))
    batches = [torch.randn(T, 3, I, dtype=DTYPE), torch.randn(T, 5, I, dtype=DTYPE)]
    model(batches[0])  # some history that the re-estimation must replace
    update_population_statistics([(x, None) for x in batches], model)
    assert model.training
    W = model.weight_ih_l0.detach()
    for t in range(T):
        a = torch.cat([x[t] for x in batches]) @ W.t()  # every frame of the pass, pooled
        torch.testing.assert_close(model.running_mean_ih_l0[t], a.mean(0))
        torch.testing.assert_close(model.running_var_ih_l0[t], a.var(0, unbiased=True))
    assert model.num_batches_tracked_l0.tolist()[:T + 1] == [2] * T + [0]


def test_update_population_statistics_pools_batches_of_different_lengths():
    torch.manual_seed(0)
    model = _randomize(BNLSTM(2, 3, dtype=DTYPE, backend="reference"))
    batches = [torch.randn(3, 4, 2, dtype=DTYPE), torch.randn(6, 5, 2, dtype=DTYPE)]
    update_population_statistics(batches, model)
    assert model.num_batches_tracked_l0.tolist()[:7] == [2, 2, 2, 1, 1, 1, 0]
    W = model.weight_ih_l0.detach()
    for t in range(6):
        a = torch.cat([x[t] for x in batches if x.shape[0] > t]) @ W.t()
        torch.testing.assert_close(model.running_mean_ih_l0[t], a.mean(0))
        torch.testing.assert_close(model.running_var_ih_l0[t], a.var(0, unbiased=True))


def test_cell_steps_equal_the_layer():
    torch.manual_seed(0)
    T, B, I, H = 5, 3, 2, 4
    layer = _randomize(BNLSTM(I, H, dtype=DTYPE, backend="reference"))
    cell = BNLSTMCell(I, H, dtype=DTYPE)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in layer.state_dict().items()
                          if not k.startswith(("running", "num_batches"))}, strict=False)
    x = torch.randn(T, B, I, dtype=DTYPE)
    out, _ = layer(x)
    h = c = None
    for t in range(T):
        h, c = cell(x[t], None if h is None else (h, c), time_step=t)
        torch.testing.assert_close(h, out[t])
    for q in ("ih", "hh", "c"):
        torch.testing.assert_close(getattr(cell, f"running_mean_{q}"), getattr(layer, f"running_mean_{q}_l0"))
        torch.testing.assert_close(getattr(cell, f"running_var_{q}"), getattr(layer, f"running_var_{q}_l0"))


def test_plain_cell_equals_nn_lstm_cell():
    torch.manual_seed(0)
    ref = nn.LSTMCell(3, 4, dtype=DTYPE)
    cell = BNLSTMCell(3, 4, normalization=None, dtype=DTYPE)
    cell.load_state_dict(ref.state_dict())
    x, h, c = (torch.randn(2, n, dtype=DTYPE) for n in (3, 4, 4))
    torch.testing.assert_close(cell(x, (h, c)), ref(x, (h, c)))
    torch.testing.assert_close(cell(x[0], (h[0], c[0])), ref(x[0], (h[0], c[0])))


# --------------------------------------------------------------------------------------------------------
# Bad input: nn.LSTM's exception types and words, and nothing changed by a failed call.


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        pytest.param(dict(dropout=1.5), ValueError, "dropout should be a number in range [0, 1]", id="dropout"),
        pytest.param(dict(hidden_size=0), ValueError, "hidden_size must be greater than zero", id="hidden0"),
        pytest.param(dict(hidden_size=2.0), TypeError, "hidden_size should be of type int, got: float", id="hidden-float"),
        pytest.param(dict(input_size=0), ValueError, "input_size must be greater than zero", id="input0"),
        pytest.param(dict(num_layers=0), ValueError, "num_layers must be greater than zero", id="layers0"),
        pytest.param(dict(bias=1), TypeError, "bias should be of type bool, got: int", id="bias-int"),
        pytest.param(dict(batch_first=None), TypeError, "batch_first should be of type bool", id="batch-first"),
        pytest.param(dict(proj_size=-1), ValueError, "proj_size should be a positive integer or zero", id="proj-neg"),
        pytest.param(dict(eps=0.0), ValueError, "eps must be a number greater than zero", id="eps0"),
        pytest.param(dict(momentum=1.5), ValueError, "momentum must be None or a number in [0, 1]", id="momentum"),
        pytest.param(dict(max_length=0), ValueError, "max_length must be a positive int", id="max-length"),
        pytest.param(dict(normalization="layer"), ValueError, "normalization must be one of", id="normalization"),
        pytest.param(dict(backend="cuda"), ValueError, "backend must be one of", id="backend"),
    ],
)
def test_constructor_errors(kwargs, error, message):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(error, match=re.escape(message)):
        BNLSTM(**args)


def test_dropout_with_one_layer_warns_like_nn_lstm():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        BNLSTM(3, 4, dropout=0.5)


@pytest.mark.parametrize(
    "make_call, error, message",
    [
        pytest.param(lambda m: m(torch.randn(2, 3, 4, 3)), ValueError,
                     "Expected input to be 2D or 3D, got 4D instead", id="input-4d"),
        pytest.param(lambda m: m(torch.randn(5, 2, 7)), RuntimeError,
                     "input.size(-1) must be equal to input_size. Expected 3, got 7", id="feature-size"),
        pytest.param(lambda m: m(torch.randn(5, 2, 3, dtype=torch.float64)), ValueError,
                     "RNN input dtype (torch.float64) does not match weight dtype (torch.float32)", id="dtype"),
        pytest.param(lambda m: m(torch.randn(5, 2, 3), (torch.zeros(2, 4), torch.zeros(2, 4))), RuntimeError,
                     "For batched 3-D input, hx and cx should also be 3-D but got (2-D, 2-D) tensors", id="hx-2d"),
        pytest.param(lambda m: m(torch.randn(5, 3), (torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))), RuntimeError,
                     "For unbatched 2-D input, hx and cx should also be 2-D but got (3-D, 3-D) tensors",
                     id="unbatched-hx-3d"),
        pytest.param(lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 2, 4))), RuntimeError,
                     "Expected hidden[0] size (1, 2, 4), got [1, 3, 4]", id="h0-batch"),
        pytest.param(lambda m: m(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(1, 2, 4))), RuntimeError,
                     "Expected hidden[0] size (1, 2, 4), got [2, 2, 4]", id="h0-layers"),
        pytest.param(lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 5))), RuntimeError,
                     "Expected hidden[1] size (1, 2, 4), got [1, 2, 5]", id="c0-hidden"),
        pytest.param(lambda m: m(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4).double())),
                     ValueError, "cx dtype (torch.float64) does not match input dtype (torch.float32)", id="c0-dtype"),
        pytest.param(lambda m: m(torch.randn(0, 2, 3)), RuntimeError,
                     "Expected sequence length to be larger than 0 in RNN", id="zero-length"),
        pytest.param(lambda m: m(torch.randn(5, 2, 3), time_offset=-1), ValueError,
                     "time_offset must be >= 0, got -1", id="negative-offset"),
        pytest.param(lambda m: m(torch.randn(5, 2, 3), time_offset=1.5), TypeError,
                     "time_offset should be of type int", id="float-offset"),
        pytest.param(lambda m: m(torch.randn(5, 1, 3)), ValueError,
                     "Expected more than 1 value per channel when training", id="batch-of-one"),
    ],
)
def test_forward_errors_leave_buffers_unchanged(make_call, error, message):
    model = BNLSTM(3, 4)
    model(torch.randn(5, 2, 3))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=re.escape(message)):
        make_call(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_zero_length_in_packed_lengths_is_refused():
    with pytest.raises(RuntimeError, match="Length of all samples has to be greater than 0"):
        pack_padded_sequence(torch.randn(3, 2, 3), torch.tensor([3, 0]), enforce_sorted=False)


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = BNLSTM(3, 4, backend="triton")
    with pytest.raises(RuntimeError, match="BNLSTM backend 'triton' cannot run on cpu tensors"):
        model(torch.randn(5, 2, 3))
