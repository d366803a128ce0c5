"""The compiled C++ backend (``fused_bnlstm._C``, backend="cpp") held to the reference.

Every output, every gradient by name (random cotangents on output, h_n and c_n) and the returned batch
statistics, over tiny odd shapes in every mode; gradcheck in float64; ``torch.library.opcheck`` on the two
registered ops; the module end to end. Every buffer the extension allocates comes NaN-filled
(``FUSED_BNLSTM_CPU_POISON=1``), so an element no kernel wrote shows up. The whole file skips, saying why,
where the extension was not built (``FUSED_BNLSTM_BUILD_EXTENSION=0``).
"""

import contextlib
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fused_bnlstm import BNLSTM
from fused_bnlstm.ops import LayerConfig, LayerParams, backend_available, bnlstm_layer
from layer_cases import (CPU, PROJECTION, TOLERANCES, USED, assert_close_by_name, assert_modules_agree,
                         assert_same_statistics, call_layer, compare_with_reference, op_inputs, population, run_layer,
                         twin_modules)

_built, _why = backend_available("cpp", CPU)
pytestmark = pytest.mark.skipif(not _built, reason=f"fused_bnlstm._C is not built here: {_why}")


@pytest.fixture(autouse=True)
def nan_poisoned_buffers(monkeypatch, nan_poisoned_empty):
    """The extension's buffers (its workspace cache included), as torch.empty / empty_like (conftest), hand out
    NaN-filled float tensors, so an element no kernel wrote shows up."""
    monkeypatch.setenv("FUSED_BNLSTM_CPU_POISON", "1")

SHAPES = [
    pytest.param(1, 2, 1, 3, None, id="T1-B2-I1-H3"),
    pytest.param(4, 3, 5, 8, None, id="T4-B3-I5-H8"),
    pytest.param(7, 5, 5, 24, None, id="T7-B5-I5-H24"),
    pytest.param(7, 3, 1, 8, [7, 4, 2], id="T7-B3-I1-H8-varlen-tail-of-one"),
    pytest.param(4, 5, 5, 3, [4, 1, 3, 2, 4], id="T4-B5-I5-H3-varlen"),
    pytest.param(4, 2, 1, 24, [2, 4], id="T4-B2-I1-H24-varlen-one-row"),
    pytest.param(1, 3, 5, 8, [1, 1, 1], id="T1-B3-I5-H8-lengths-all-T"),
]
MODES = [
    pytest.param("frame", True, id="frame-train"),
    pytest.param("frame", False, id="frame-eval"),
    pytest.param("sequence", True, id="sequence-train"),
    pytest.param("sequence", False, id="sequence-eval"),
    pytest.param(None, True, id="none"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalization, use_batch_stats", MODES)
@pytest.mark.parametrize("T, B, I, H, lengths", SHAPES)
def test_bnlstm_layer_cpp_matches_reference(T, B, I, H, lengths, normalization, use_batch_stats, dtype):
    # by name, dtype and shape included (assert_close checks both)
    compare_with_reference("cpp", T, B, I, H, lengths, normalization, use_batch_stats, dtype)


@pytest.mark.parametrize("normalization, use_batch_stats", MODES)
@pytest.mark.parametrize("T, B, I, H, lengths", [
    pytest.param(4, 3, 5, 8, None, id="T4-B3-I5-H8"),
    pytest.param(7, 3, 1, 8, [7, 4, 2], id="T7-B3-I1-H8-varlen-tail-of-one"),
])
def test_bnlstm_layer_cpp_without_bias_matches_reference(T, B, I, H, lengths, normalization, use_batch_stats):
    dtype = torch.float64
    pop = population(T, H, normalization, dtype)
    inputs = op_inputs(T, B, I, H, lengths, dtype, bias=False)
    ref, ref_stats = run_layer("reference", inputs, lengths, pop, use_batch_stats, normalization)
    cpp, cpp_stats = run_layer("cpp", inputs, lengths, pop, use_batch_stats, normalization)
    assert ref.keys() == cpp.keys() and "dbias" not in cpp
    for name in ref:
        assert_close_by_name(cpp[name], ref[name], name, **TOLERANCES[dtype])
    assert_same_statistics(ref_stats, cpp_stats, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalization, use_batch_stats", MODES)
@pytest.mark.parametrize("T, B, I, H, lengths", [
    pytest.param(5, 3, 2, 8, None, id="T5-B3-I2-H8"),
    pytest.param(7, 3, 1, 8, [7, 4, 2], id="T7-B3-I1-H8-varlen-tail-of-one"),
])
def test_bnlstm_layer_cpp_inference_path_matches_reference(T, B, I, H, lengths, normalization, use_batch_stats,
                                                           dtype):
    # Nothing requires grad: the extension keeps only two states instead of the [T, ...] histories.
    _compare_without_grad(T, B, I, H, lengths, normalization, use_batch_stats, dtype)


def _compare_without_grad(T, B, I, H, lengths, normalization, use_batch_stats, dtype, proj=0):
    """A call where nothing requires grad (no histories kept) held to the reference: outputs and statistics."""
    pop = population(T, H, normalization, dtype)
    inputs = {k: v.detach() for k, v in op_inputs(T, B, I, H, lengths, dtype, proj=proj).items() if v is not None}
    kwargs = dict(lengths=lengths, population=pop, use_batch_stats=use_batch_stats, normalization=normalization)
    ref = call_layer(inputs, **kwargs, backend="reference")
    with torch.no_grad():
        cpp = call_layer(inputs, **kwargs, backend="cpp")
    for name, want, got in zip(("output", "h_n", "c_n"), ref[:3], cpp[:3]):
        assert not got.requires_grad
        assert_close_by_name(got, want, name, **TOLERANCES[dtype])
    assert_same_statistics(ref[3], cpp[3], **TOLERANCES[dtype])


@pytest.mark.parametrize("normalization, use_batch_stats, lengths", [
    pytest.param("frame", True, [3, 3, 3], id="frame-train"),
    pytest.param("frame", True, [3, 1, 2], id="frame-train-varlen-fallback"),
    pytest.param("frame", False, [3, 2, 3], id="frame-eval-varlen"),
    pytest.param("sequence", True, [3, 1, 2], id="sequence-train-varlen"),
    pytest.param(None, True, [3, 2, 1], id="none-varlen"),
])
def test_bnlstm_layer_cpp_gradcheck(normalization, use_batch_stats, lengths):
    T, B, I, H = 3, 3, 2, 2
    inputs = op_inputs(T, B, I, H, lengths, torch.float64)
    names = [n for n in USED[normalization] if inputs[n] is not None]
    pop = population(T, H, normalization, torch.float64)

    def layer(*args):
        values = dict(inputs, **dict(zip(names, args)))
        out, h_n, c_n, _ = call_layer(values, lengths=lengths, population=pop, use_batch_stats=use_batch_stats,
                                      normalization=normalization, backend="cpp")
        return out, h_n, c_n

    assert torch.autograd.gradcheck(layer, [inputs[n] for n in names], eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("normalization, use_batch_stats, lengths, proj", [
    pytest.param("frame", True, [3, 1, 2], 0, id="frame-train-varlen-fallback"),
    pytest.param("sequence", True, [3, 1, 2], 0, id="sequence-train-varlen"),
    pytest.param(None, True, None, 0, id="none"),
    pytest.param("frame", True, [3, 2, 3], 1, id="frame-train-varlen-projection"),
])
def test_bnlstm_layer_cpp_double_backward(normalization, use_batch_stats, lengths, proj):
    # A gradient penalty needs a graph of the gradients: the cpp backward hands over to the reference's VJP
    # then, never a silent zero (issue #11).
    T, B, I, H = 3, 3, 2, 2
    inputs = op_inputs(T, B, I, H, lengths, torch.float64, proj=proj)
    names = [n for n in USED[normalization] + PROJECTION if inputs.get(n) is not None]
    pop = population(T, H, normalization, torch.float64)

    def layer(*args):
        values = dict(inputs, **dict(zip(names, args)))
        out, h_n, c_n, _ = call_layer(values, lengths=lengths, population=pop, use_batch_stats=use_batch_stats,
                                      normalization=normalization, backend="cpp")
        return out, h_n, c_n

    assert torch.autograd.gradgradcheck(layer, [inputs[n] for n in names], eps=1e-6, atol=1e-6, rtol=1e-5)

    penalties = {}
    for backend in ("reference", "cpp"):
        out = call_layer(inputs, backend=backend, lengths=lengths, population=pop,
                         use_batch_stats=use_batch_stats, normalization=normalization).output
        (g,) = torch.autograd.grad(out.sum(), inputs["x"], create_graph=True)
        assert g.requires_grad
        loss = out.mean() + 10 * g.pow(2).sum()
        penalties[backend] = torch.autograd.grad(loss, inputs["weight_hh"])[0]
    assert penalties["cpp"].abs().max() > 0
    assert_close_by_name(penalties["cpp"], penalties["reference"], "dW_hh (penalty)", **TOLERANCES[torch.float64])


def test_bnlstm_layer_cpp_under_torch_func_and_batched_grads():
    # torch.func transforms and batched cotangents (issue #11) run through the reference: same results.
    T, B, I, H = 3, 3, 2, 4
    inputs = {k: v.detach() for k, v in op_inputs(T, B, I, H, [3, 1, 2], torch.float64).items()}
    pop = population(T, H, "frame", torch.float64)

    def layer(backend):
        return lambda x: call_layer(dict(inputs, x=x), backend=backend, lengths=[3, 1, 2], population=pop).output

    jacobians = {b: torch.func.jacrev(layer(b))(inputs["x"]) for b in ("reference", "cpp")}
    assert_close_by_name(jacobians["cpp"], jacobians["reference"], "jacrev dx", **TOLERANCES[torch.float64])
    x = inputs["x"].clone().requires_grad_()
    out = layer("cpp")(x)
    cotangents = torch.randn(4, *out.shape, dtype=torch.float64)
    (batched,) = torch.autograd.grad(out, x, cotangents, is_grads_batched=True)
    for k in range(4):
        (one,) = torch.autograd.grad(layer("reference")(x), x, cotangents[k])
        assert_close_by_name(batched[k], one, f"batched dx[{k}]", **TOLERANCES[torch.float64])


# --- a projection (proj_size, LSTMP): the projected loops of csrc/bnlstm_cpu.cpp ------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalization, use_batch_stats", MODES)
@pytest.mark.parametrize("T, B, I, H, P, lengths", [
    pytest.param(4, 3, 5, 8, 3, None, id="T4-B3-I5-H8-P3"),
    pytest.param(5, 5, 3, 6, 2, [5, 1, 3, 2, 5], id="T5-B5-I3-H6-P2-varlen"),
    pytest.param(3, 4, 2, 70, 5, [3, 3, 1, 2], id="T3-B4-I2-H70-P5-varlen-two-chunks"),
])
def test_bnlstm_layer_cpp_with_projection_matches_reference(T, B, I, H, P, lengths, normalization, use_batch_stats,
                                                            dtype):
    # output [T, B, P], h_n [B, P], c_n [B, H], every gradient (dW_hr [P, H], dW_hh [4H, P]), the statistics
    compare_with_reference("cpp", T, B, I, H, lengths, normalization, use_batch_stats, dtype, proj=P)


@pytest.mark.parametrize("normalization, use_batch_stats", MODES)
def test_bnlstm_layer_cpp_with_projection_inference_path_matches_reference(normalization, use_batch_stats):
    # Nothing requires grad: two states of each kind (m, r, c) used in turn instead of the histories.
    _compare_without_grad(5, 3, 2, 8, [5, 2, 4], normalization, use_batch_stats, torch.float64, proj=3)


@pytest.mark.parametrize("normalization, lengths", [
    pytest.param("frame", [3, 1, 2], id="frame-train-varlen-fallback"),
    pytest.param(None, [3, 2, 3], id="none-varlen"),
])
def test_bnlstm_layer_cpp_with_projection_gradcheck(normalization, lengths):
    T, B, I, H, P = 3, 3, 2, 3, 2
    inputs = op_inputs(T, B, I, H, lengths, torch.float64, proj=P)
    names = [n for n in USED[normalization] + PROJECTION if inputs[n] is not None]
    pop = population(T, H, normalization, torch.float64)

    def layer(*args):
        values = dict(inputs, **dict(zip(names, args)))
        return call_layer(values, lengths=lengths, population=pop, normalization=normalization, backend="cpp")[:3]

    assert torch.autograd.gradcheck(layer, [inputs[n] for n in names], eps=1e-6, atol=1e-6, rtol=1e-5)


def _isas():
    from fused_bnlstm import _C

    widest = _C.kernel_isa()
    return {"avx512": ["default", "avx2", "avx512"], "avx2": ["default", "avx2"]}.get(widest, ["default"])


@pytest.mark.parametrize("gemm", ["brgemm", "mm"], ids=["tiles-brgemm", "tiles-mm"])
@pytest.mark.parametrize("brgemm", ["1", "0"], ids=["brgemm", "at-mm"])
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("normalization, use_batch_stats, lengths", [
    pytest.param("frame", True, [7, 4, 2, 7, 1], id="frame-train-varlen"),
    pytest.param("sequence", True, None, id="sequence-train"),
    pytest.param(None, True, [7, 3, 5, 1, 7], id="none-varlen"),
])
def test_bnlstm_layer_cpp_every_kernel_path_matches_reference(monkeypatch, isa, brgemm, gemm, normalization,
                                                              use_batch_stats, lengths):
    # The step kernels are compiled per instruction set, the float32 per-step GEMMs have a brgemm and an
    # at::mm path, and the all-step GEMMs brgemm tiles and at::mm: pin each in turn (the CPU picks by itself).
    if isa not in _isas():
        pytest.skip(f"this CPU does not run the {isa} kernels")
    from fused_bnlstm import _C

    monkeypatch.setenv("FUSED_BNLSTM_CPU_ISA", isa)
    monkeypatch.setenv("FUSED_BNLSTM_CPU_BRGEMM", brgemm)
    monkeypatch.setenv("FUSED_BNLSTM_CPU_GEMM", gemm)
    assert _C.kernel_isa() == isa
    assert _C.gemm_backend() == ("brgemm" if gemm == "brgemm" and _C.uses_brgemm() else "mm")
    assert _C.uses_brgemm() == (brgemm == "1" and _brgemm_built())
    T, B, I, H = 7, 5, 3, 70  # H past one 64-unit kernel block
    run = {}
    for dtype in (torch.float32, torch.float64):
        pop = population(T, H, normalization, dtype)
        inputs = op_inputs(T, B, I, H, lengths, dtype)
        for backend in ("reference", "cpp"):
            run[backend, dtype] = run_layer(backend, inputs, lengths, pop, use_batch_stats, normalization)
    truth, truth_stats = run["reference", torch.float64]
    cpp64, cpp64_stats = run["cpp", torch.float64]
    for name in truth:
        assert_close_by_name(cpp64[name], truth[name], f"{name} (fp64)", **TOLERANCES[torch.float64])
    assert_same_statistics(truth_stats, cpp64_stats, **TOLERANCES[torch.float64])
    # float32: BN over two rows is ill-conditioned here, so hold the kernel to the reference's own float32
    # error against float64 (at most about twice it).
    ref32, cpp32 = run["reference", torch.float32][0], run["cpp", torch.float32][0]
    for name in truth:
        scale = max(1.0, truth[name].abs().max().item())
        ref_error = (ref32[name].double() - truth[name]).abs().max().item()
        cpp_error = (cpp32[name].double() - truth[name]).abs().max().item()
        assert cpp_error <= 2 * ref_error + 1e-5 * scale, (name, cpp_error, ref_error)


@contextlib.contextmanager
def _split_steps():
    # At least two threads (on one the step loops never split), and splitting pinned on
    # (FUSED_BNLSTM_CPU_SPLIT=always): left to SplitGuard, a loaded machine would run the steps whole.
    threads, mode = torch.get_num_threads(), os.environ.get("FUSED_BNLSTM_CPU_SPLIT")
    torch.set_num_threads(max(2, threads))
    os.environ["FUSED_BNLSTM_CPU_SPLIT"] = "always"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if mode is None:
            del os.environ["FUSED_BNLSTM_CPU_SPLIT"]
        else:
            os.environ["FUSED_BNLSTM_CPU_SPLIT"] = mode


# H=200: the backward's step gradients chunk-major (at most 4 chunks, csrc/bnlstm_cpu.cpp); 300: row-major
@pytest.mark.parametrize("H", [200, 300])
@pytest.mark.parametrize("lengths", [None, [5] * 40 + [3] * 24], ids=["full", "lengths"])
@pytest.mark.parametrize("normalization", ["frame", None])
def test_bnlstm_layer_cpp_split_steps_match_reference(normalization, lengths, H):
    # Wide enough that a step's pass splits over threads and the float32 input branch takes the one GEMM
    # over all steps; H past a multiple of the 64-unit chunks, so that the last chunk of the chunked
    # histories is narrow (StepRows, csrc/bnlstm_kernels.inc).
    T, B, I = 5, 64, 50
    with _split_steps():
        pop = population(T, H, normalization, torch.float32)
        inputs = op_inputs(T, B, I, H, lengths, torch.float32)
        ref, ref_stats = run_layer("reference", inputs, lengths, pop, True, normalization)
        cpp, cpp_stats = run_layer("cpp", inputs, lengths, pop, True, normalization)
    for name in ref:
        assert_close_by_name(cpp[name], ref[name], name, **TOLERANCES[torch.float32])
    assert_same_statistics(ref_stats, cpp_stats, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("normalization, use_batch_stats", [
    pytest.param("frame", False, id="frame-eval"),
    pytest.param("frame", True, id="frame-train-no-grad"),
    pytest.param(None, True, id="none"),
])
def test_bnlstm_layer_cpp_split_steps_inference_matches_reference(normalization, use_batch_stats):
    # Split steps with nothing saved: the input branch runs inside each step's pass even at I > 16, and
    # without batch statistics each row runs from the gates to h on the stack (csrc/bnlstm.cpp, the kernels).
    with _split_steps():
        _compare_without_grad(5, 64, 50, 200, [5] * 40 + [3] * 24, normalization, use_batch_stats, torch.float32)


def _brgemm_built():
    import os

    from fused_bnlstm import _C

    saved = os.environ.pop("FUSED_BNLSTM_CPU_BRGEMM", None)
    try:
        return _C.uses_brgemm()
    finally:
        if saved is not None:
            os.environ["FUSED_BNLSTM_CPU_BRGEMM"] = saved


@pytest.mark.parametrize("cache", ["1", "0"], ids=["cached", "uncached"])
def test_bnlstm_layer_cpp_workspace_cache_reuses_buffers_safely(monkeypatch, cache):
    # Buffers of one call return to the cache and are handed to the next: results must not change, and
    # tensors still alive (outputs, saved buffers of a pending backward) must not be handed out.
    from fused_bnlstm import _C

    monkeypatch.setenv("FUSED_BNLSTM_CPU_CACHE", cache)
    T, B, I, H = 40, 16, 4, 80  # [T, B, 4H] float64 buffers of 1.6 MB: cached
    inputs = op_inputs(T, B, I, H, None, torch.float64)
    pop = population(T, H, "frame", torch.float64)
    first, _ = run_layer("cpp", inputs, None, pop, True, "frame")
    pending = call_layer(inputs, population=pop, use_batch_stats=True, backend="cpp")
    second, _ = run_layer("cpp", inputs, None, pop, True, "frame")
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=0, msg=name)
    grads = torch.autograd.grad(pending[0].sum(), [inputs["weight_hh"]])
    again = torch.autograd.grad(
        call_layer(inputs, population=pop, use_batch_stats=True, backend="cpp")[0].sum(), [inputs["weight_hh"]])
    torch.testing.assert_close(grads[0], again[0], rtol=0, atol=0)
    # A live output keeps its buffer: a call on other input must not write into it.
    kept = call_layer(inputs, population=pop, use_batch_stats=True, backend="cpp")[0].detach()
    snapshot = kept.clone()
    other = {k: (v.detach() * 0.5 if v is not None else None) for k, v in inputs.items()}
    for _ in range(2):
        call_layer(other, population=pop, use_batch_stats=True, backend="cpp")
    torch.testing.assert_close(kept, snapshot, rtol=0, atol=0)
    if cache == "1":
        assert _C.cached_bytes() > 0
    _C.empty_cache()
    assert _C.cached_bytes() == 0


def test_bnlstm_layer_cpp_caches_stay_bounded_as_shapes_change(monkeypatch):
    # Calls at a growing T (issue #11): the workspace cache holds no more than one call's worth of freed
    # buffers (it used to keep every T's), and no kernel shape asked of oneDNN depends on T.
    from fused_bnlstm import _C

    monkeypatch.setenv("FUSED_BNLSTM_CPU_GEMM", "brgemm")  # the all-step GEMMs as brgemm tiles (else MKL)

    B, I, H = 16, 8, 64

    def train_step(T):
        inputs = op_inputs(T, B, I, H, None, torch.float32)
        out = call_layer(inputs, population=population(T, H, "frame", torch.float32), backend="cpp").output
        out.sum().backward()

    _C.empty_cache()
    train_step(400)
    one_call = _C.cached_bytes()
    _C.empty_cache()
    for T in range(40, 401, 40):
        train_step(T)
        stats = _C.workspace_stats()
        assert stats["cached"] <= stats["working_set"], (T, stats)
        assert stats["cached"] <= one_call + (4 << 20), (T, stats["cached"], one_call)
    for T in range(1, 17):  # T * B = 16 T meets every remainder against the GEMM tiles (128, 256 rows)
        train_step(T)
    shapes = _C.brgemm_shapes()
    for T in (100, 333, 517):
        train_step(T)
        assert _C.brgemm_shapes() == shapes, T
    _C.empty_cache()
    assert _C.cached_bytes() == 0


def test_bnlstm_layer_cpp_low_precision_runs_in_float32():
    T, B, I, H = 4, 3, 5, 8
    inputs = op_inputs(T, B, I, H, None, torch.float32)
    pop = population(T, H, "frame", torch.float32)
    low = {k: v.detach().to(torch.bfloat16).requires_grad_() for k, v in inputs.items()}
    out, h_n, c_n, stats = call_layer(low, population=pop, use_batch_stats=True, backend="cpp")
    assert out.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    assert stats.mean_ih.dtype == torch.bfloat16
    up = {k: v.detach().to(torch.float32) for k, v in low.items()}
    ref = call_layer(up, population=pop, use_batch_stats=True, backend="reference")
    torch.testing.assert_close(out.float(), ref[0], atol=2e-2, rtol=2e-2)
    out.sum().backward()
    assert low["weight_hh"].grad.dtype == torch.bfloat16


def test_bnlstm_layer_cpp_none_matches_nn_lstm():
    torch.manual_seed(0)
    T, B, I, H = 6, 3, 5, 8
    lstm = torch.nn.LSTM(I, H, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0, c0 = torch.randn(1, B, H, dtype=torch.float64), torch.randn(1, B, H, dtype=torch.float64)
    want, (h_want, c_want) = lstm(x, (h0, c0))
    params = LayerParams(lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0)
    out, h_n, c_n, stats = bnlstm_layer(x, h0[0], c0[0], params, config=LayerConfig(normalization=None),
                                        backend="cpp")
    assert stats is None
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(h_n, h_want[0])
    torch.testing.assert_close(c_n, c_want[0])


@pytest.mark.parametrize("normalization, use_batch_stats, lengths, proj", [
    pytest.param("frame", True, [3, 2, 3], 0, id="frame-train-varlen"),
    pytest.param("frame", False, None, 0, id="frame-eval"),
    pytest.param("sequence", True, [3, 1, 2], 0, id="sequence-train-varlen"),
    pytest.param(None, True, [3, 1, 2], 0, id="none-varlen"),
    pytest.param("frame", True, [3, 2, 3], 2, id="frame-train-varlen-projection"),
])
def test_cpp_ops_pass_opcheck(normalization, use_batch_stats, lengths, proj):
    # The two registered ops: schema, fake (meta) implementation, autograd registration, AOT dispatch.
    from fused_bnlstm.ops.common import prepare_layer
    from fused_bnlstm.ops.fused_cpp import forward_arguments

    T, B, I, H = 3, 3, 2, 4
    inputs = op_inputs(T, B, I, H, lengths, torch.float64, proj=proj)
    params = LayerParams(**{name: inputs.get(name) for name in LayerParams._fields})
    config = LayerConfig(normalization=normalization, use_batch_stats=use_batch_stats)
    prepared = prepare_layer(inputs["x"], inputs["h0"], inputs["c0"], params, config,
                             None if lengths is None else torch.tensor(lengths),
                             population(T, H, normalization, torch.float64))
    forward = forward_arguments(prepared, params, config, save=True)
    torch.library.opcheck(torch.ops.fused_bnlstm.bnlstm_forward.default, (), forward)

    with torch.no_grad():
        output, h_n, c_n, _, saved = torch.ops.fused_bnlstm.bnlstm_forward(**forward)
    g = torch.Generator().manual_seed(2)
    cotangents = [torch.randn(v.shape, generator=g, dtype=v.dtype) for v in (output, h_n, c_n)]
    backward = dict(grad_output=cotangents[0], grad_h_n=cotangents[1], grad_c_n=cotangents[2],
                    x=forward["x"].detach(), weights=[w.detach() for w in forward["weights"]], has_bias=True,
                    lengths=forward["lengths"], counts=forward["counts"], batch_stats=forward["batch_stats"],
                    saved=saved, normalization=normalization, need_dx=True, group_name=None)
    torch.library.opcheck(torch.ops.fused_bnlstm.bnlstm_backward.default, (), backward)


def test_cpp_backend_reports_devices_it_cannot_run_on():
    from fused_bnlstm.ops import fused_cpp

    ok, reason = fused_cpp.available(torch.device("meta"))
    assert not ok and "CPU" in reason


# --- the module end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize("proj_size", [0, 3], ids=["", "proj"])
@pytest.mark.parametrize("normalization", ["frame", "sequence", None])
def test_bnlstm_cpp_bidirectional_two_layers_packed(normalization, proj_size):
    ref, cpp = twin_modules("cpp", 5, 6, num_layers=2, bidirectional=True, normalization=normalization,
                            proj_size=proj_size, dtype=torch.float64)
    lengths = [5, 2, 4, 3]
    x = torch.randn(5, 4, 5, dtype=torch.float64)
    h0 = torch.randn(4, 4, proj_size or 6, dtype=torch.float64)

    def run(module):
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        out, (h_n, c_n) = module(packed, (h0, torch.zeros(4, 4, 6, dtype=torch.float64)))
        return pad_packed_sequence(out)[0], h_n, c_n

    assert_modules_agree(ref, cpp, run)
    ref.eval()
    cpp.eval()
    assert_modules_agree(ref, cpp, run)


def test_bnlstm_cpp_running_statistics_after_training_steps():
    ref, cpp = twin_modules("cpp", 3, 8, num_layers=2, max_length=5, momentum=None, dtype=torch.float64)
    torch.manual_seed(1)
    batches = [torch.randn(7, 4, 3, dtype=torch.float64) for _ in range(2)]
    for k, x in enumerate(batches):
        assert_modules_agree(ref, cpp, lambda m, x=x, k=k: m(x, time_offset=k)[0:1])
    ref.eval()
    cpp.eval()
    with torch.no_grad():
        assert_modules_agree(ref, cpp, lambda m: (m(batches[0])[0],))


def test_bnlstm_cpp_batch_first_unbatched_and_time_offset():
    ref, cpp = twin_modules("cpp", 4, 5, batch_first=True, normalization="frame", dtype=torch.float64)
    x = torch.randn(3, 6, 4, dtype=torch.float64).requires_grad_()
    assert_modules_agree(ref, cpp, lambda m: (m(x, time_offset=2)[0],))
    ref.eval()
    cpp.eval()
    xu = torch.randn(6, 4, dtype=torch.float64)
    assert_modules_agree(ref, cpp, lambda m: (m(xu)[0], *m(xu)[1]))


def test_bnlstm_auto_picks_cpp_on_cpu():
    from fused_bnlstm.ops import resolve_backend

    assert resolve_backend("auto", CPU) == "cpp"
