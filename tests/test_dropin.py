"""The last nn.LSTM gaps, each as users hit them: second-order gradients, buffers that keep their identity
(shared memory, threads, inference mode), proj_size, empty batches, float16, torch.func, the meta device,
and BNLSTMCell's hidden-state errors."""

import re
import threading

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fused_bnlstm import BNLSTM, BNLSTMCell
from fused_bnlstm.ops import backend_available

CPU = torch.device("cpu")
BACKENDS = [pytest.param(name, id=name, marks=pytest.mark.skipif(not backend_available(name, CPU)[0],
                                                               reason=backend_available(name, CPU)[1]))
            for name in ("reference", "cpp", "triton")]


def _model(backend, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    model = BNLSTM(3, 4, backend=backend, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_matches_the_reference(backend):
    """g = d out / d x with create_graph, then a loss on g: the second-order term must reach the weights."""
    x = torch.randn(5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = {}
    for name in ("reference", backend):
        model = _model(name)
        xi = x.clone().requires_grad_()
        out, _ = model(xi)
        (g,) = torch.autograd.grad(out.sum(), xi, create_graph=True)
        assert g.requires_grad
        loss = out.mean() + 10 * g.pow(2).sum()
        grads[name] = torch.autograd.grad(loss, [model.weight_hh_l0, model.gamma_hh_l0])
    for want, got in zip(grads["reference"], grads[backend]):
        torch.testing.assert_close(got, want)
    assert grads[backend][0].abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck(backend):
    model = _model(backend)
    x = torch.randn(3, 3, 3, dtype=torch.float64, requires_grad=True)

    def run(x, w_hh):
        with torch.nn.utils.stateless._reparametrize_module(model, {"weight_hh_l0": w_hh}):
            return model(x)[0]

    assert torch.autograd.gradgradcheck(run, (x, model.weight_hh_l0.detach().clone().requires_grad_()),
                                        fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_gradients_through_torch_func(backend):
    """is_grads_batched (vmap over the backward) and torch.func.jacrev, as nn.LSTM allows."""
    model = _model(backend)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    out, _ = model(x)
    basis = torch.eye(out.numel(), dtype=torch.float64).reshape(-1, *out.shape)[:5]
    (batched,) = torch.autograd.grad(out, x, basis, is_grads_batched=True, retain_graph=True)
    for k in range(basis.shape[0]):
        (one,) = torch.autograd.grad(out, x, basis[k], retain_graph=True)
        torch.testing.assert_close(batched[k], one)


def test_buffers_keep_identity_under_inference_mode_and_threads():
    model = BNLSTM(3, 4, max_length=6, backend="reference")
    ids = {name: b.data_ptr() for name, b in model.named_buffers()}
    with torch.inference_mode():
        model(torch.randn(5, 3, 3))  # a training-mode call under inference mode
    model(torch.randn(6, 3, 3))  # and a later one must still update in place
    assert {name: b.data_ptr() for name, b in model.named_buffers()} == ids
    assert model.num_batches_tracked_l0.tolist() == [2, 2, 2, 2, 2, 1]

    threads = [threading.Thread(target=lambda: [model(torch.randn(4, 3, 3)) for _ in range(20)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert model.num_batches_tracked_l0.tolist() == [162, 162, 162, 162, 2, 1]  # none of 160 updates lost


def _train_in_child(model):
    model(torch.randn(5, 3, 3))


def test_shared_memory_model_sees_its_childrens_updates():
    model = BNLSTM(3, 4, max_length=8, backend="reference")
    model.share_memory()
    ctx = mp.get_context("spawn")
    children = [ctx.Process(target=_train_in_child, args=(model,)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0
    assert model.num_batches_tracked_l0.tolist() == [2] * 5 + [0] * 3
    assert not torch.equal(model.running_mean_ih_l0[0], torch.zeros(16))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_proj_size_equals_nn_lstm(bidirectional):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, num_layers=2, proj_size=2, bidirectional=bidirectional, dtype=torch.float64)
    model = BNLSTM(3, 5, num_layers=2, proj_size=2, bidirectional=bidirectional, normalization=None,
                   dtype=torch.float64)
    model.load_state_dict(lstm.state_dict(), strict=True)
    D = 2 if bidirectional else 1
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    hx = (torch.randn(2 * D, 3, 2, dtype=torch.float64), torch.randn(2 * D, 3, 5, dtype=torch.float64))
    want, got = lstm(x, hx), model(x, hx)
    for a, b in zip((want[0], *want[1]), (got[0], *got[1])):
        torch.testing.assert_close(b, a)
    grads = [torch.autograd.grad(out[0].sum(), [x, *m.parameters()]) for out, m in ((want, lstm), (got, model))]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a)
    with pytest.raises(RuntimeError, match=re.escape(f"Expected hidden[0] size ({2 * D}, 3, 2), got [{2 * D}, 3, 5]")):
        model(x, (hx[1], hx[1]))


def test_proj_size_with_batch_norm_gradcheck_and_backend_choice(monkeypatch):
    from fused_bnlstm.ops import fused_cpp

    # "auto" runs the projection on the fused CPU kernels where they are built
    calls = []
    kernels = fused_cpp.bnlstm_layer_cpp
    monkeypatch.setattr(fused_cpp, "bnlstm_layer_cpp", lambda **kwargs: calls.append(1) or kernels(**kwargs))
    model = _model("auto", proj_size=2)
    assert model.weight_hr_l0.shape == (2, 4) and "proj_size=2" in repr(model)
    x = torch.randn(3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert model(x)[0].shape == (3, 3, 2)
    assert torch.autograd.gradcheck(lambda x: model(x)[0], (x,), fast_mode=True)
    assert bool(calls) == backend_available("cpp", torch.device("cpu"))[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_backward_is_a_no_op(backend):
    model = BNLSTM(3, 4, backend=backend)
    x = torch.randn(5, 0, 3, requires_grad=True)
    out, (h_n, c_n) = model(x)
    assert out.shape == (5, 0, 4) and out.grad_fn is not None
    (out.sum() + h_n.sum()).backward()
    assert x.grad.shape == x.shape and model.weight_hh_l0.grad.abs().sum() == 0


def test_reference_float16_gradients_are_finite_with_zero_initial_state():
    model = BNLSTM(3, 8, backend="reference", dtype=torch.float16)
    x = torch.randn(6, 4, 3, dtype=torch.float16, requires_grad=True)
    out, _ = model(x)  # h0 = 0: W_hh h has variance 0 at the first step
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_training_forward_on_the_meta_device():
    model = BNLSTM(3, 4, device="meta")
    out, (h_n, c_n) = model(torch.empty(5, 2, 3, device="meta"))
    assert out.shape == (5, 2, 4) and out.device.type == "meta"


@pytest.mark.parametrize(
    "hx, message",
    [
        pytest.param((torch.zeros(3, 21), torch.zeros(3, 20)), "hidden0 has inconsistent hidden_size: got 21, expected 20",
                     id="h-width"),
        pytest.param((torch.zeros(5, 20), torch.zeros(5, 20)), "Input batch size 3 doesn't match hidden0 batch size 5",
                     id="h-batch"),
        pytest.param((torch.zeros(3, 20), torch.zeros(3, 21)), "hidden1 has inconsistent hidden_size: got 21, expected 20",
                     id="c-width"),
        pytest.param((torch.zeros(3, 20), torch.zeros(4, 20)), "Input batch size 3 doesn't match hidden1 batch size 4",
                     id="c-batch"),
    ],
)
def test_cell_hidden_errors_follow_nn_lstm_cell(hx, message):
    for cell in (nn.LSTMCell(4, 20), BNLSTMCell(4, 20)):
        with pytest.raises(RuntimeError, match=re.escape(message)):
            cell(torch.randn(3, 4), hx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_dropout_is_dropconnect_on_weight_hh(backend):
    model = _model(backend, weight_dropout=0.5)
    assert set(model.state_dict()) == set(_model(backend).state_dict()) and "weight_dropout=0.5" in repr(model)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    torch.manual_seed(7)
    out, _ = model(x)
    # the same draw by hand: one mask on W_hh for the whole call, as AWD-LSTM's weight drop
    torch.manual_seed(7)
    dropped = torch.nn.functional.dropout(model.weight_hh_l0, p=0.5, training=True)
    plain = _model(backend)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        plain.weight_hh_l0.copy_(dropped)
    torch.testing.assert_close(out, plain(x)[0])
    (g,) = torch.autograd.grad(out.sum(), model.weight_hh_l0)
    assert (g[dropped == 0] == 0).all() and (g[dropped != 0] != 0).any()
    model.eval()
    plain.load_state_dict(model.state_dict())
    plain.eval()
    torch.testing.assert_close(model(x)[0], plain(x)[0])


def test_awd_lstm_style_weight_drop_wrapper_works_and_flat_weights_reads():
    """AWD-LSTM's WeightDrop: remove the parameter, keep a raw copy, assign the dropped tensor each call."""
    model = _model("reference")
    assert [w.shape for w in model._flat_weights] == [w.shape for w in nn.LSTM(3, 4)._flat_weights]
    raw = model.weight_hh_l0
    del model._parameters["weight_hh_l0"]
    model.register_parameter("weight_hh_l0_raw", nn.Parameter(raw.detach().clone()))
    setattr(model, "weight_hh_l0", torch.nn.functional.dropout(model.weight_hh_l0_raw, p=0.3, training=True))
    out, _ = model(torch.randn(4, 3, 3, dtype=torch.float64))
    out.sum().backward()
    assert model.weight_hh_l0_raw.grad is not None
    with pytest.raises(AttributeError, match="weight_dropout=p"):
        model._flat_weights = []
