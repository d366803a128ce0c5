"""torch.compile, torch.export and ONNX: the layer op as registered custom ops (``fused_bnlstm/ops/registered.py``).

Compiles use the ``aot_eager`` backend (dynamo + AOT autograd, which is what sees the custom ops and their
autograd) except one Inductor run, to keep CI short; shapes are tiny.
"""

import pytest
import torch
import torch._dynamo

from fused_bnlstm import BNLSTM
from fused_bnlstm.ops import backend_available
from fused_bnlstm.ops import registered

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
requires_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and backend_available("triton", CUDA)[0]),
                                   reason="needs a CUDA GPU with the Triton backend")
FUSED = [pytest.param(name, id=name, marks=pytest.mark.skipif(not backend_available(name, CPU)[0],
                                                             reason=backend_available(name, CPU)[1]))
         for name in ("cpp", "triton")]
BACKENDS = [pytest.param("reference", id="reference"), *FUSED]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _twins(backend, **kwargs):
    torch.manual_seed(0)
    model = BNLSTM(3, 4, max_length=8, backend=backend, **kwargs)
    twin = BNLSTM(3, 4, max_length=8, backend=backend, **kwargs)
    twin.load_state_dict(model.state_dict())
    return model, twin


def _assert_same_training_step(compiled, model, twin, x):
    out, (h_n, c_n) = compiled(x)
    (out.sum() + h_n.sum()).backward()
    want, (h_want, _) = twin(x)
    (want.sum() + h_want.sum()).backward()
    torch.testing.assert_close(out, want)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, c, msg=lambda m: f"{name}: {m}")


def _opcheck_layer_arguments(T=3, B=3, I=2, H=4, device=CPU, dtype=torch.float64):
    """x, h0, c0, params (weight_ih, weight_hh, bias, gamma_ih, gamma_hh, gamma_c, beta_c, no weight_hr),
    lengths and frame-wise population rows for the registered ops (float64 on the CPU: the interpreter runs
    it too)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    params = [rand(4 * H, I).requires_grad_(), rand(4 * H, H).requires_grad_(), rand(4 * H).requires_grad_(),
              *[(0.5 + rand(w).abs()).requires_grad_() for w in (4 * H, 4 * H, H)], rand(H).requires_grad_(),
              torch.empty(0, device=device, dtype=dtype)]
    population = [rand(T, 4 * H), rand(T, 4 * H).abs() + 0.5, rand(T, 4 * H), rand(T, 4 * H).abs() + 0.5,
                  rand(T, H), rand(T, H).abs() + 0.5]
    # no step with fewer than two rows: the NaN rows of the returned statistics never compare equal
    return rand(T, B, I).requires_grad_(), rand(B, H), rand(B, H), params, torch.tensor([3, 3, 2]), population


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_op_passes_opcheck(backend):
    x, h0, c0, params, lengths, population = _opcheck_layer_arguments()
    for use_batch_stats in (True, False):
        args = (x, h0, c0, params, lengths, population, "frame", 1e-5, use_batch_stats, backend)
        torch.library.opcheck(registered.layer, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_backward_op_passes_opcheck(backend):
    x, h0, c0, params, lengths, population = _opcheck_layer_arguments()
    T, B, H = x.shape[0], x.shape[1], h0.shape[1]
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(T, B, H, generator=g, dtype=torch.float64),
                  torch.randn(B, H, generator=g, dtype=torch.float64),
                  torch.randn(B, H, generator=g, dtype=torch.float64)]
    for use_batch_stats in (True, False):
        args = (cotangents, x.detach(), h0, c0, [p.detach() for p in params], lengths, population, "frame", 1e-5,
                use_batch_stats, backend)
        grads = registered.layer_backward(*args)
        assert len(grads) == 3 + len(params) and grads[0].shape == x.shape
        torch.library.opcheck(registered.layer_backward, args)


@requires_cuda
def test_cuda_triton_ops_pass_opcheck_and_compile_fullgraph(no_tf32):
    """The CUDA tier (benchmarks/gpu_check.sh runs this file): both registered ops through opcheck on the GPU's
    Triton kernels, and a fullgraph compile of a BNLSTM, AOT autograd and Inductor, equal to eager."""
    x, h0, c0, params, lengths, population = _opcheck_layer_arguments(device=CUDA, dtype=torch.float32)
    T, B, H = x.shape[0], x.shape[1], h0.shape[1]
    cotangents = [torch.randn(T, B, H, device=CUDA), torch.randn(B, H, device=CUDA), torch.randn(B, H, device=CUDA)]
    for use_batch_stats in (True, False):
        torch.library.opcheck(registered.layer, (x, h0, c0, params, lengths, population, "frame", 1e-5,
                                                 use_batch_stats, "triton"))
        torch.library.opcheck(registered.layer_backward, (cotangents, x.detach(), h0, c0, [p.detach() for p in params],
                                                          lengths, population, "frame", 1e-5, use_batch_stats,
                                                          "triton"))
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        model, twin = _twins("triton")
        model.to(CUDA)
        twin.to(CUDA)
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        _assert_same_training_step(compiled, model, twin, torch.randn(5, 3, 3, device=CUDA))
        model.eval()
        twin.eval()
        x_eval = torch.randn(5, 3, 3, device=CUDA)
        torch.testing.assert_close(compiled(x_eval)[0], twin(x_eval)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_equals_eager_without_graph_breaks_or_recompiles(backend):
    model, twin = _twins(backend)
    x = torch.randn(5, 3, 3)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    model.reset_running_stats()  # explain ran the model once
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same_training_step(compiled, model, twin, x)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for m in (model, twin):
            m.zero_grad()
        _assert_same_training_step(compiled, model, twin, torch.randn(5, 3, 3))
    for m in (model, twin):
        m.eval()
    torch.testing.assert_close(compiled(x)[0], twin(x)[0])


@pytest.mark.parametrize("backend", FUSED)
def test_compile_dynamic_runs_every_length_without_recompiling(backend):
    model, twin = _twins(backend)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    # (B differs from input_size on the first call: dynamo's duck sizing would give them one symbol, and the
    # input_size check would then specialize B too)
    _assert_same_training_step(compiled, model, twin, torch.randn(4, 2, 3))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for T, B in ((6, 3), (5, 4), (7, 2)):
            for m in (model, twin):
                m.zero_grad()
            _assert_same_training_step(compiled, model, twin, torch.randn(T, B, 3))


@pytest.mark.parametrize("backend", FUSED)
def test_compile_fullgraph_with_a_projection_equals_eager(backend):
    # proj_size: the op's output and h_n are P wide (its fake implementations say so)
    model, twin = _twins(backend, proj_size=2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same_training_step(compiled, model, twin, torch.randn(5, 3, 3))


def test_compile_with_inductor_on_the_default_backend():
    model, twin = _twins("auto")
    compiled = torch.compile(model, fullgraph=True)
    _assert_same_training_step(compiled, model, twin, torch.randn(4, 3, 3))


def _trained_eval_model(backend):
    torch.manual_seed(0)
    model = BNLSTM(3, 4, max_length=8, backend=backend)
    for _ in range(2):
        model(torch.randn(6, 3, 3))
    return model.eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_of_an_eval_model(backend):
    model = _trained_eval_model(backend)
    x = torch.randn(6, 2, 3)
    if backend == "reference":
        # the reference is traced step by step: the program takes the exported length only
        program = torch.export.export(model, (x,))
        lengths = (6,)
    else:
        # the fused op is one node whose shapes follow T
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("T", min=2, max=64)},))
        lengths = (6, 3, 11)
    for T in lengths:
        x = torch.randn(T, 2, 3)
        torch.testing.assert_close(program.module()(x)[0], model(x)[0])


def test_onnx_export_runs_in_onnxruntime():
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _trained_eval_model("auto")
    x = torch.randn(6, 2, 3)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    (out, *_) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x)[0])
