"""The reference op is trusted first: held to an independent composition and to gradcheck in float64."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from fused_bnlstm import BNLSTM
from layer_cases import call_layer, op_inputs, population


def composed_bnlstm(x, lengths, p, running, max_length, training, momentum, eps):
    """nn.LSTMCell-style gates with F.batch_norm per step over the running rows, written independently.

    ``running[q]`` is a list of per-slot (mean, var) buffers that F.batch_norm updates in place.
    Returns output [T, B, H], h_n, c_n.
    """
    T, B, _ = x.shape
    H = p["weight_hh"].shape[1]
    h = x.new_zeros(B, H)
    c = x.new_zeros(B, H)
    outputs = []
    for t in range(T):
        rows = (lengths > t).nonzero().squeeze(1)
        slot = min(t, max_length - 1)
        batch_stats = training and rows.numel() >= 2
        if batch_stats:
            running["count"][slot] += 1
        # BatchNorm1d with momentum=None: a cumulative average, factor 1 / num_batches_tracked.
        factor = momentum if momentum is not None else 1.0 / max(running["count"][slot], 1)

        def bn(v, q, weight, bias=None):
            mean, var = running[q][slot]
            return F.batch_norm(v, mean, var, weight, bias, training=batch_stats, momentum=factor, eps=eps)

        xt, ht, ct = x[t, rows], h[rows], c[rows]
        gates = (bn(ht @ p["weight_hh"].t(), "hh", p["gamma_hh"]) + bn(xt @ p["weight_ih"].t(), "ih", p["gamma_ih"])
                 + p["bias_ih"] + p["bias_hh"])
        i, f, g, o = gates.chunk(4, 1)
        c_new = torch.sigmoid(f) * ct + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(bn(c_new, "c", p["gamma_c"], p["beta_c"]))
        out = x.new_zeros(B, H).index_copy(0, rows, h_new)
        h = h.index_copy(0, rows, h_new)
        c = c.index_copy(0, rows, c_new)
        outputs.append(out)
    return torch.stack(outputs), h, c


def _fresh_running(max_length, H, dtype):
    running = {
        q: [(torch.zeros(w, dtype=dtype), torch.ones(w, dtype=dtype)) for _ in range(max_length)]
        for q, w in (("ih", 4 * H), ("hh", 4 * H), ("c", H))
    }
    running["count"] = [0] * max_length
    return running


@pytest.mark.parametrize(
    "T, B, I, H, lengths, max_length",
    [
        pytest.param(5, 3, 4, 6, [5, 5, 5], 8, id="B3-T5-H6-full"),
        pytest.param(7, 4, 3, 5, [7, 4, 2, 1], 7, id="B4-T7-H5-varlen-tail-of-one"),
        pytest.param(6, 3, 2, 3, [6, 6, 3], 4, id="B3-T6-H3-past-max-length"),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_reference_matches_batch_norm_composition(T, B, I, H, lengths, max_length, momentum):
    torch.manual_seed(0)
    dtype = torch.float64
    model = BNLSTM(I, H, max_length=max_length, momentum=momentum, backend="reference", dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(0.3 * torch.randn_like(param))
    p = {name[: -len("_l0")]: param.detach() for name, param in model.named_parameters()}
    lengths_t = torch.tensor(lengths)
    x = torch.randn(T, B, I, dtype=dtype)
    x = x * (torch.arange(T).unsqueeze(1) < lengths_t).unsqueeze(2)
    running = _fresh_running(max_length, H, dtype)

    for step in range(2):  # two training steps exercise the running-statistics update twice
        expected, h_exp, c_exp = composed_bnlstm(x, lengths_t, p, running, max_length, True, momentum, 1e-5)
        packed = pack_padded_sequence(x, lengths_t, enforce_sorted=False)
        out, (h_n, c_n) = model(packed)
        out_padded = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)[0]
        torch.testing.assert_close(out_padded, expected)
        torch.testing.assert_close(h_n[0], h_exp)
        torch.testing.assert_close(c_n[0], c_exp)
        for q in ("ih", "hh", "c"):
            torch.testing.assert_close(getattr(model, f"running_mean_{q}_l0"),
                                       torch.stack([m for m, _ in running[q]]), msg=f"running_mean_{q}")
            torch.testing.assert_close(getattr(model, f"running_var_{q}_l0"),
                                       torch.stack([v for _, v in running[q]]), msg=f"running_var_{q}")
        assert model.num_batches_tracked_l0.tolist() == running["count"]

    model.eval()
    expected, _, _ = composed_bnlstm(x, lengths_t, p, running, max_length, False, momentum, 1e-5)
    out, _ = model(pack_padded_sequence(x, lengths_t, enforce_sorted=False))
    torch.testing.assert_close(torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)[0], expected)


def test_reference_sequence_normalization_matches_composition():
    torch.manual_seed(1)
    T, B, I, H = 6, 3, 4, 5
    dtype = torch.float64
    model = BNLSTM(I, H, normalization="sequence", backend="reference", dtype=dtype)
    lengths = torch.tensor([6, 4, 2])
    x = torch.randn(T, B, I, dtype=dtype) * (torch.arange(T).unsqueeze(1) < lengths).unsqueeze(2)
    valid = torch.arange(T).unsqueeze(1) < lengths  # [T, B]
    a_ih = x @ model.weight_ih_l0.t()
    mean, var = torch.zeros(4 * H, dtype=dtype), torch.ones(4 * H, dtype=dtype)
    normed = torch.zeros_like(a_ih)
    normed[valid] = F.batch_norm(a_ih[valid], mean, var, model.gamma_ih_l0, None, training=True, momentum=0.1)
    h = c = x.new_zeros(B, H)
    expected = []
    for t in range(T):
        gates = normed[t] + h @ model.weight_hh_l0.t() + model.bias_ih_l0 + model.bias_hh_l0
        i, f, g, o = gates.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        keep = valid[t].unsqueeze(1)
        expected.append(torch.where(keep, h_new, 0))
        h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
    out, _ = model(pack_padded_sequence(x, lengths, enforce_sorted=False))
    out = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)[0]
    torch.testing.assert_close(out, torch.stack(expected))
    torch.testing.assert_close(model.running_mean_ih_l0[0], mean)
    torch.testing.assert_close(model.running_var_ih_l0[0], var)


@pytest.mark.parametrize(
    "normalization, use_batch_stats, lengths",
    [
        pytest.param("frame", True, [4, 2, 1], id="frame-train-varlen"),
        pytest.param("frame", False, None, id="frame-eval"),
        pytest.param("sequence", True, [4, 3, 1], id="sequence-train"),
        pytest.param(None, True, [4, 4, 2], id="plain"),
    ],
)
def test_reference_gradcheck_float64(normalization, use_batch_stats, lengths):
    T, B, I, H = 4, 3, 2, 3
    inputs = op_inputs(T, B, I, H, lengths, torch.float64)
    pop = population(T, H, normalization, torch.float64)
    names = list(inputs)

    def run(*tensors):
        out, h, c, _ = call_layer(dict(zip(names, tensors)), lengths=lengths, population=pop,
                                  use_batch_stats=use_batch_stats, normalization=normalization)
        return out, h, c

    used = [inputs[n] for n in names]
    assert torch.autograd.gradcheck(run, used, fast_mode=True, atol=1e-6)


def test_reference_returns_biased_batch_statistics_per_step():
    T, B, I, H = 3, 4, 2, 3
    lengths = torch.tensor([3, 3, 1, 2])
    inputs = {k: v.detach() for k, v in op_inputs(T, B, I, H, lengths.tolist(), torch.float64).items()}
    _, _, _, stats = call_layer(inputs, lengths=lengths, population=population(T, H, "frame", torch.float64))
    assert stats.counts.tolist() == [4, 3, 2]
    for t in range(T):
        rows = lengths > t
        a_ih = inputs["x"][t, rows] @ inputs["weight_ih"].t()
        torch.testing.assert_close(stats.mean_ih[t], a_ih.mean(0))
        torch.testing.assert_close(stats.var_ih[t], a_ih.var(0, unbiased=False))


@pytest.mark.parametrize(
    "lengths, message",
    [
        pytest.param([4, 0, 2], "every length must be in [1, T=4], got min 0", id="zero-length"),
        pytest.param([4, 5, 2], "every length must be in [1, T=4], got min 2 and max 5", id="too-long"),
        pytest.param([4, 2], "lengths must be a CPU int64 tensor of shape [3]", id="wrong-batch"),
    ],
)
def test_layer_op_refuses_bad_lengths(lengths, message):
    inputs = {k: v.detach() for k, v in op_inputs(4, 3, 2, 3, None, torch.float64).items()}
    with pytest.raises(ValueError, match=re.escape(message)):
        call_layer(inputs, lengths=lengths, population=population(4, 3, "frame", torch.float64))
