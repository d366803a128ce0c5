"""The Triton backend held to the reference: every output, gradient and batch statistic, by name.

Tiers:
- interpreter (machines without CUDA; conftest sets ``TRITON_INTERPRET=1``): the kernels on CPU tensors in
  float32 / float64 (and float16 against a float64 reference), tiny odd shapes, every mode, the module end to
  end, gradcheck, launch counts, determinism; plus one subprocess that compiles every kernel for sm90, since
  the interpreter accepts Python the compiler rejects;
- CUDA (skips without a GPU): the same comparisons on the device in float32 (TF32 off), and bf16 / fp16
  with the kernel's error at most about 2x PyTorch's own against a float64 reference.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fused_bnlstm import BNLSTM
from fused_bnlstm.ops import Population, backend_available
from layer_cases import (CPU, GRADIENTS, TOLERANCES, USED, assert_close_by_name, assert_modules_agree,
                         assert_same_statistics, call_layer, compare_with_reference, has_nvidia_toolchain, module_step,
                         op_inputs, population, run_layer, twin_modules)

_cpu_ok, _cpu_reason = backend_available("triton", CPU)
requires_interpreter = pytest.mark.skipif(not _cpu_ok, reason=f"Triton on CPU tensors: {_cpu_reason}")
# the interpreter's numpy sigmoid overflows exp() on large negative inputs, harmlessly (1 / inf = 0)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not backend_available("triton", torch.device("cuda"))[0],
    reason="needs a CUDA GPU with the Triton backend",
)


@pytest.fixture(autouse=True)
def per_step_variant(monkeypatch):
    """These tests are the per-step kernels' (the persistent ones have tests/test_triton_persistent.py): on
    CUDA ``auto`` may choose the persistent kernels, so the variant is pinned; tests that route elsewhere
    set it themselves."""
    from fused_bnlstm.ops import fused_triton

    monkeypatch.setenv(fused_triton.VARIANT_ENV, "step")


LAYER_CASES = [
    # frame-wise training; lengths with steps where fewer than two rows still run
    pytest.param(7, 3, 5, 24, [7, 1, 4], "frame", True, id="B3-T7-I5-H24-frame-train-varlen-tail1"),
    pytest.param(4, 5, 1, 8, None, "frame", True, id="B5-T4-I1-H8-frame-train"),
    pytest.param(1, 2, 5, 3, None, "frame", True, id="B2-T1-I5-H3-frame-train"),
    pytest.param(7, 5, 1, 3, [7, 2, 7, 5, 1], "frame", True, id="B5-T7-I1-H3-frame-train-varlen"),
    pytest.param(4, 3, 5, 40, [4, 3, 2], "frame", True, id="B3-T4-I5-H40-frame-train-two-k-chunks"),
    # frame-wise eval: population statistics at every step
    pytest.param(4, 3, 5, 8, [4, 2, 3], "frame", False, id="B3-T4-I5-H8-frame-eval-varlen"),
    pytest.param(7, 2, 1, 24, None, "frame", False, id="B2-T7-I1-H24-frame-eval"),
    # sequence-wise
    pytest.param(4, 3, 5, 24, [4, 1, 2], "sequence", True, id="B3-T4-I5-H24-sequence-train-varlen"),
    pytest.param(7, 2, 1, 3, None, "sequence", True, id="B2-T7-I1-H3-sequence-train"),
    pytest.param(4, 5, 1, 8, [4, 4, 1, 2, 3], "sequence", False, id="B5-T4-I1-H8-sequence-eval-varlen"),
    # plain LSTM through the same kernels
    pytest.param(7, 3, 5, 8, [7, 3, 5], None, True, id="B3-T7-I5-H8-plain-varlen"),
    pytest.param(1, 2, 1, 3, None, None, True, id="B2-T1-I1-H3-plain"),
]


# float64 holds the arithmetic to 1e-10, which float32's tolerance could hide: once per mode, on cases with
# a fallback step (fewer than two rows) or padding and two column blocks where the mode has them
FLOAT64_CASES = ("B3-T7-I5-H24-frame-train-varlen-tail1", "B2-T7-I1-H24-frame-eval",
                 "B3-T4-I5-H24-sequence-train-varlen", "B3-T7-I5-H8-plain-varlen")


def _in_dtypes(cases):
    """Every case in float32, the ``FLOAT64_CASES`` in float64 as well."""
    dtypes = (torch.float32, "fp32"), (torch.float64, "fp64")
    return [pytest.param(*case.values, dtype, id=f"{case.id}-{name}") for case in cases for dtype, name in dtypes
            if dtype == torch.float32 or case.id in FLOAT64_CASES]


@requires_interpreter
@pytest.mark.parametrize("T, B, I, H, lengths, normalization, use_batch_stats, dtype", _in_dtypes(LAYER_CASES))
def test_bnlstm_layer_triton_matches_reference(nan_poisoned_empty, T, B, I, H, lengths, normalization,
                                               use_batch_stats, dtype):
    compare_with_reference("triton", T, B, I, H, lengths, normalization, use_batch_stats, dtype)


@requires_interpreter
@pytest.mark.parametrize("normalization", ["frame", "sequence", None], ids=["frame", "sequence", "plain"])
def test_bnlstm_layer_triton_without_bias(normalization):
    compare_with_reference("triton", 4, 3, 5, 8, [4, 3, 1], normalization, True, torch.float32, bias=False)


@requires_interpreter
@pytest.mark.parametrize("normalization", ["frame", "sequence", None], ids=["frame", "sequence", "plain"])
def test_bnlstm_layer_triton_gradcheck_float64(normalization):
    # one per mode at the smallest shape with a batch-statistics step (three rows) and, frame-wise, a step
    # that falls back to the population's (one row; eval runs that path at every step)
    T, B, I, H, lengths, use_batch_stats = 2, 3, 1, 3, [2, 1, 1], True
    inputs = op_inputs(T, B, I, H, lengths, torch.float64)
    pop = population(T, H, normalization, torch.float64)
    names = list(USED[normalization])
    fixed = {n: v.detach() for n, v in inputs.items() if n not in names}

    def run(*tensors):
        out, h_n, c_n, _ = call_layer({**dict(zip(names, tensors)), **fixed}, backend="triton", lengths=lengths,
                                      population=pop, use_batch_stats=use_batch_stats, normalization=normalization)
        return out, h_n, c_n

    assert torch.autograd.gradcheck(run, [inputs[n] for n in names], fast_mode=True, atol=1e-6)


@requires_interpreter
def test_bnlstm_layer_triton_strided_inputs():
    T, B, I, H, lengths = 4, 3, 5, 8, [4, 2, 3]
    inputs = op_inputs(T, B, I, H, lengths, torch.float32)
    pop = population(T, H, "frame", torch.float32)
    expected, expected_stats = run_layer("reference", inputs, lengths, pop, True, "frame")
    # the same values through transposed and sliced views
    strided = {name: value.detach().clone() for name, value in inputs.items()}
    strided["x"] = strided["x"].transpose(0, 1).contiguous().transpose(0, 1)
    strided["weight_hh"] = strided["weight_hh"].t().contiguous().t()
    strided["gamma_ih"] = torch.stack([strided["gamma_ih"], strided["gamma_ih"]], 1)[:, 0]
    strided = {name: value.requires_grad_() for name, value in strided.items()}
    assert not strided["x"].is_contiguous() and not strided["gamma_ih"].is_contiguous()
    actual, actual_stats = run_layer("triton", strided, lengths, pop, True, "frame")
    for name in expected:
        assert_close_by_name(actual[name], expected[name], name, **TOLERANCES[torch.float32])
    assert_same_statistics(expected_stats, actual_stats, **TOLERANCES[torch.float32])


def assert_deterministic(device, T, B, I, H, lengths):
    """Two identical calls give bitwise-identical outputs and gradients (no atomics anywhere)."""
    inputs = op_inputs(T, B, I, H, lengths, torch.float32, device)
    pop = population(T, H, "frame", torch.float32, device)
    first, _ = run_layer("triton", inputs, lengths, pop, True, "frame")
    second, _ = run_layer("triton", inputs, lengths, pop, True, "frame")
    for name in first:
        assert torch.equal(first[name], second[name]), name


@requires_interpreter
def test_bnlstm_layer_triton_deterministic():
    assert_deterministic(CPU, 5, 4, 3, 24, [5, 3, 5, 1])


@requires_interpreter
def test_bnlstm_layer_triton_rejects_bfloat16_under_interpreter():
    inputs = {n: v.detach().to(torch.bfloat16) for n, v in op_inputs(2, 2, 1, 3, None, torch.float32).items()}
    with pytest.raises(TypeError, match="no bfloat16"):
        call_layer(inputs, backend="triton", population=population(2, 3, "frame", torch.bfloat16))


class _CountingKernel:
    """Stands in for a Triton kernel object and counts its launches."""

    def __init__(self, kernel, counter, name):
        self.kernel, self.counter, self.name = kernel, counter, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.counter[self.name] = self.counter.get(self.name, 0) + 1
            return launch(*args, **kwargs)

        return counted


def _count_launches(monkeypatch, T, normalization):
    from fused_bnlstm.ops import triton_kernels

    counter = {}
    for name in ("bnlstm_fwd_step_kernel", "bnlstm_bwd_step_kernel", "bnlstm_infer_step_kernel",
                 "sequence_bn_fwd_kernel", "sequence_bn_bwd_kernel"):
        monkeypatch.setattr(triton_kernels, name, _CountingKernel(getattr(triton_kernels, name), counter, name))
    B, I, H = 3, 2, 3
    inputs = op_inputs(T, B, I, H, None, torch.float32)
    out, h_n, c_n, _ = call_layer(inputs, backend="triton", population=population(T, H, normalization, torch.float32),
                                  normalization=normalization)
    forward = sum(counter.values())
    (out.sum() + h_n.sum() + c_n.sum()).backward()
    return forward, sum(counter.values()) - forward


@requires_interpreter
@pytest.mark.parametrize("normalization", ["frame", "sequence", None], ids=["frame", "sequence", "plain"])
def test_bnlstm_layer_triton_one_launch_per_step(monkeypatch, normalization):
    short_forward, short_backward = _count_launches(monkeypatch, 1, normalization)
    long_forward, long_backward = _count_launches(monkeypatch, 7, normalization)
    # one Triton launch per step in each direction, plus a constant that does not grow with T
    assert long_forward - short_forward == 6
    assert long_backward - short_backward == 6
    assert short_forward - 1 <= 1 and short_backward - 1 <= 1


@requires_interpreter
def test_triton_backend_unavailable_without_interpreter(monkeypatch):
    from fused_bnlstm.ops import fused_triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = fused_triton.available(CPU)
    assert not ok and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        BNLSTM(2, 3, backend="triton")(torch.randn(4, 2, 2))


@pytest.mark.parametrize("setting, device_type, cudnn_rnn, expected", [
    pytest.param(None, "cuda", "tf32", "tf32", id="unset-cuda-cudnn-tf32"),
    pytest.param("auto", "cuda", "tf32", "tf32", id="auto-cuda-cudnn-tf32"),
    pytest.param("auto", "cuda", "ieee", "ieee", id="auto-cuda-cudnn-ieee"),
    pytest.param("auto", "cpu", "tf32", "ieee", id="auto-cpu"),
    pytest.param("ieee", "cuda", "tf32", "ieee", id="ieee"),
    pytest.param("tf32", "cuda", "ieee", "tf32", id="tf32"),
    pytest.param("TF32x3", "cuda", "tf32", "tf32x3", id="tf32x3"),
])
def test_triton_precision_policy(monkeypatch, setting, device_type, cudnn_rnn, expected):
    from fused_bnlstm.ops import fused_triton
    from fused_bnlstm.ops.triton_common import recurrent_precision

    if setting is None:
        monkeypatch.delenv(fused_triton.PRECISION_ENV, raising=False)
    else:
        monkeypatch.setenv(fused_triton.PRECISION_ENV, setting)
    rnn = torch.backends.cudnn.rnn
    saved = rnn.fp32_precision
    try:
        # nn.LSTM's own switch (torch's per-operator TF32 setting for cuDNN RNNs)
        rnn.fp32_precision = cudnn_rnn
        device = torch.device(device_type)
        assert recurrent_precision(torch.float32, device) == expected
        # other dtypes ignore the setting: fp64 in IEEE, half types on their own tensor-core path
        assert recurrent_precision(torch.float64, device) == "ieee"
        assert recurrent_precision(torch.bfloat16, device) is None
    finally:
        rnn.fp32_precision = saved


def test_triton_precision_rejects_unknown_setting(monkeypatch):
    from fused_bnlstm.ops import fused_triton
    from fused_bnlstm.ops.triton_common import recurrent_precision

    monkeypatch.setenv(fused_triton.PRECISION_ENV, "fp32")
    with pytest.raises(ValueError, match="FUSED_BNLSTM_TRITON_PRECISION must be one of auto, ieee, tf32, tf32x3"):
        recurrent_precision(torch.float32, CPU)


@requires_interpreter
@pytest.mark.parametrize("setting", ["ieee", "tf32", "tf32x3"])
def test_bnlstm_layer_triton_precision_settings_match_reference(monkeypatch, setting):
    # the interpreter computes every dot in IEEE: this holds each variant's launch path to the reference
    monkeypatch.setenv("FUSED_BNLSTM_TRITON_PRECISION", setting)
    compare_with_reference("triton", 3, 3, 2, 24, [3, 1, 2], "frame", True, torch.float32)


class _NoHostReads:
    """Makes every read of a tensor's values into Python (``.item()``, ``int()``, ``.tolist()``, ...) raise,
    except inside a kernel launch (the interpreter itself copies tensors to numpy): on a GPU each such read
    waits for the device."""

    READS = ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        from fused_bnlstm.ops import triton_kernels

        self.active = False
        for name in self.READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._guarded(original, name))
        for name in ("bnlstm_fwd_step_kernel", "bnlstm_bwd_step_kernel", "bnlstm_infer_step_kernel",
                     "sequence_bn_fwd_kernel", "sequence_bn_bwd_kernel"):
            monkeypatch.setattr(triton_kernels, name, self._launch_unguarded(getattr(triton_kernels, name)))

    def _guarded(self, original, name):
        def read(tensor, *args, **kwargs):
            if self.active:
                raise AssertionError(f"the op read a tensor to the host: Tensor.{name}")
            return original(tensor, *args, **kwargs)

        return read

    def _launch_unguarded(self, kernel):
        guard = self

        class Launcher:
            def __getitem__(self, grid):
                launch = kernel[grid]

                def unguarded(*args, **kwargs):
                    active, guard.active = guard.active, False
                    try:
                        return launch(*args, **kwargs)
                    finally:
                        guard.active = active

                return unguarded

        return Launcher()


@requires_interpreter
@pytest.mark.parametrize("normalization, use_batch_stats, lengths, proj", [
    pytest.param("frame", True, [4, 1, 3], 0, id="frame-train-varlen"),
    pytest.param("frame", False, None, 0, id="frame-eval"),
    pytest.param("sequence", True, [4, 2, 3], 0, id="sequence-train-varlen"),
    pytest.param(None, True, [4, 2, 3], 0, id="plain-varlen"),
    # a projection's host steps between the launches read nothing back either
    pytest.param("frame", True, [4, 1, 3], 3, id="frame-train-varlen-projection"),
    pytest.param("frame", False, [4, 1, 3], 3, id="frame-eval-varlen-projection"),
])
def test_bnlstm_layer_triton_never_reads_tensors_to_host(monkeypatch, normalization, use_batch_stats, lengths, proj):
    from fused_bnlstm.ops import LayerConfig, LayerParams
    from fused_bnlstm.ops.common import prepare_layer
    from fused_bnlstm.ops.fused_triton import bnlstm_layer_triton

    T, B, I, H = 4, 3, 2, 8
    tensors = op_inputs(T, B, I, H, lengths, torch.float32, proj=proj)
    params = LayerParams(**{n: tensors[n] for n in LayerParams._fields if n in tensors})
    config = LayerConfig(normalization=normalization, use_batch_stats=use_batch_stats)
    # prepare_layer reads the CPU lengths once, by contract; the backend then reads nothing back
    inputs = prepare_layer(tensors["x"], tensors["h0"], tensors["c0"], params, config,
                           None if lengths is None else torch.tensor(lengths), population(T, H, normalization,
                                                                                          torch.float32))
    guard = _NoHostReads(monkeypatch)
    guard.active = True
    out, h_n, c_n, _ = bnlstm_layer_triton(inputs=inputs, params=params, config=config)
    torch.autograd.grad([out, h_n, c_n], [tensors["x"], tensors["weight_hr" if proj else "weight_hh"]],
                        [torch.ones_like(out), torch.ones_like(h_n), torch.ones_like(c_n)])
    with torch.no_grad():
        bnlstm_layer_triton(inputs=inputs, params=params, config=config)
    guard.active = False


def _launched(monkeypatch):
    """Record each step-kernel launch: the kernel's name and its keyword arguments."""
    from fused_bnlstm.ops import triton_kernels

    launches = []

    def recording(name, kernel):
        class Launcher:
            def __getitem__(self, grid):
                def launch(**kwargs):
                    launches.append((name, kwargs))
                    return kernel[grid](**kwargs)

                return launch

        return Launcher()

    for name in ("bnlstm_fwd_step_kernel", "bnlstm_infer_step_kernel"):
        monkeypatch.setattr(triton_kernels, name, recording(name, getattr(triton_kernels, name)))
    return launches


NO_GRAD_CASES = [
    pytest.param(5, 3, 2, 24, [5, 1, 3], "frame", False, id="B3-T5-H24-frame-eval-varlen"),
    pytest.param(4, 5, 1, 8, [4, 4, 1, 2, 3], "frame", True, id="B5-T4-H8-frame-train-varlen"),
    pytest.param(4, 3, 2, 8, [4, 2, 3], "sequence", True, id="B3-T4-H8-sequence-train-varlen"),
    pytest.param(4, 3, 2, 8, [4, 2, 3], "sequence", False, id="B3-T4-H8-sequence-eval-varlen"),
    pytest.param(4, 3, 2, 8, [4, 2, 3], None, True, id="B3-T4-H8-plain-varlen"),
]


def compare_no_grad(monkeypatch, T, B, I, H, lengths, normalization, use_batch_stats, device=CPU, proj=0):
    """Under no_grad: the same outputs and statistics as the reference, and nothing saved (two state slots,
    no W_hh h_{t-1}; with a projection ``proj``, two slots of the projected state too, which the recurrent dot
    reads at depth proj); without batch statistics, the batch-tiled inference kernel."""
    pop = population(T, H, normalization, torch.float32, device)
    inputs = op_inputs(T, B, I, H, lengths, torch.float32, device, proj=proj)
    config = dict(population=pop, lengths=lengths, use_batch_stats=use_batch_stats, normalization=normalization)
    launches = _launched(monkeypatch)
    with torch.no_grad():
        expected = call_layer(inputs, backend="reference", **config)
        actual = call_layer(inputs, backend="triton", **config)
    for name in ("output", "h_n", "c_n"):
        assert_close_by_name(getattr(actual, name), getattr(expected, name), name, **TOLERANCES[torch.float32])
    assert_same_statistics(expected.stats, actual.stats, **TOLERANCES[torch.float32])
    assert len(launches) == T
    for name, arguments in launches:
        assert arguments["p_h"].shape[0] == 2 and arguments.get("p_a_hh") is None
        assert arguments["p_r"].shape == (2, B, proj or H) and arguments["P"] == (proj or H)
        uses_batch = normalization == "frame" and use_batch_stats
        assert name == ("bnlstm_fwd_step_kernel" if uses_batch else "bnlstm_infer_step_kernel")


@requires_interpreter
@pytest.mark.parametrize("T, B, I, H, lengths, normalization, use_batch_stats", NO_GRAD_CASES)
def test_bnlstm_layer_triton_no_grad_matches_reference(monkeypatch, nan_poisoned_empty, T, B, I, H, lengths,
                                                       normalization, use_batch_stats):
    compare_no_grad(monkeypatch, T, B, I, H, lengths, normalization, use_batch_stats)


@requires_interpreter
@pytest.mark.parametrize("normalization, use_batch_stats", [
    pytest.param("frame", True, id="frame-train"), pytest.param("frame", False, id="frame-eval"),
    pytest.param("sequence", False, id="sequence-eval"), pytest.param(None, True, id="plain"),
])
def test_bnlstm_layer_triton_projection_no_grad_matches_reference(monkeypatch, nan_poisoned_empty, normalization,
                                                                  use_batch_stats):
    compare_no_grad(monkeypatch, 3, 3, 2, 8, [3, 1, 2], normalization, use_batch_stats, proj=3)


@requires_interpreter
def test_bnlstm_layer_triton_eval_tiles_large_batches():
    # the inference kernel tiles the batch: more rows than one training program may hold
    T, B, I, H = 2, 520, 1, 3
    inputs = op_inputs(T, B, I, H, None, torch.float32)
    config = dict(population=population(T, H, "frame", torch.float32), use_batch_stats=False)
    with torch.no_grad():
        expected = call_layer(inputs, backend="reference", **config)
        actual = call_layer(inputs, backend="triton", **config)
    for name in ("output", "h_n", "c_n"):
        assert_close_by_name(getattr(actual, name), getattr(expected, name), name, **TOLERANCES[torch.float32])
    with pytest.raises(ValueError, match="B <= 512"):
        call_layer(inputs, backend="triton", **config)


@pytest.fixture
def fake_graphs(monkeypatch):
    """The graph path on the CPU: graphs on, and a "capture" that keeps the launches closure and replays it
    as it was captured. Like a CUDA graph it then runs with the captured call's tensors, so a launch that
    reads anything but its workspace's buffers replays stale data and the comparison fails."""
    from fused_bnlstm.ops import fused_triton

    captured = []

    def capture(launches):
        captured.append(launches)
        return launches

    monkeypatch.setattr(fused_triton, "_graphs_enabled", lambda device: True)
    monkeypatch.setattr(fused_triton, "_capture", capture)
    monkeypatch.setattr(fused_triton, "_WORKSPACES", fused_triton._WorkspacePool())
    return captured


def compare_repeated_calls(normalization, use_batch_stats, lengths, device=CPU, proj=0):
    """One shape, a call per entry of ``lengths`` with new inputs, lengths and cotangents each (with graphs:
    eager, capture and replay, then replays), each held to the reference, with and without gradients."""
    T, B, I, H = 4, 3, 2, 16
    for seed, call_lengths in enumerate(lengths):
        pop = population(T, H, normalization, torch.float32, device, seed=10 + seed)
        inputs = op_inputs(T, B, I, H, call_lengths, torch.float32, device, seed=seed, proj=proj)
        case = (call_lengths, pop, use_batch_stats, normalization, 100 + seed)
        expected, expected_stats = run_layer("reference", inputs, *case)
        actual, actual_stats = run_layer("triton", inputs, *case)
        for name in expected:
            assert_close_by_name(actual[name], expected[name], f"call {seed}: {name}", **TOLERANCES[torch.float32])
        assert_same_statistics(expected_stats, actual_stats, **TOLERANCES[torch.float32])
        with torch.no_grad():
            expected = call_layer(inputs, backend="reference", lengths=call_lengths, population=pop,
                                  use_batch_stats=use_batch_stats, normalization=normalization)
            actual = call_layer(inputs, backend="triton", lengths=call_lengths, population=pop,
                                use_batch_stats=use_batch_stats, normalization=normalization)
        for name in ("output", "h_n", "c_n"):
            assert_close_by_name(getattr(actual, name), getattr(expected, name), f"no_grad call {seed}: {name}",
                                 **TOLERANCES[torch.float32])


REPEATED_CALLS = [
    pytest.param("frame", True, ([4, 1, 3], [4, 4, 2], None, [2, 4, 4]), id="frame-train-varlen"),
    pytest.param("frame", False, ([4, 2, 3], None, [1, 4, 4], [4, 4, 4]), id="frame-eval-varlen"),
    pytest.param("sequence", True, ([4, 1, 3], [4, 4, 4], [4, 4, 2], [3, 3, 3]), id="sequence-train-varlen"),
    pytest.param(None, True, (None, [4, 2, 3], [1, 1, 4], [4, 3, 2]), id="plain-varlen"),
]


@requires_interpreter
@pytest.mark.parametrize("normalization, use_batch_stats, lengths", REPEATED_CALLS)
def test_bnlstm_layer_triton_graph_replay_matches_reference(fake_graphs, normalization, use_batch_stats, lengths):
    compare_repeated_calls(normalization, use_batch_stats, lengths)
    # captured once each: the training forward and backward, the no_grad forward
    assert len(fake_graphs) == 3


@requires_interpreter
def test_bnlstm_layer_triton_graph_capture_refused_launches_steps(monkeypatch):
    from fused_bnlstm.ops import fused_triton

    def refuse(launches):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fused_triton, "_graphs_enabled", lambda device: True)
    monkeypatch.setattr(fused_triton, "_capture", refuse)
    monkeypatch.setattr(fused_triton, "_WORKSPACES", fused_triton._WorkspacePool())
    with pytest.warns(UserWarning, match="launching each step instead"):
        compare_repeated_calls("frame", True, ([4, 1, 3], [4, 4, 2], [2, 4, 4]))


PROJECTION_CASES = [
    # frame-wise training: a step where one row runs (population fallback); one and two column blocks
    pytest.param(3, 3, 3, 8, 3, [3, 1, 2], "frame", True, id="B3-T3-I3-H8-P3-frame-train-varlen-tail1"),
    pytest.param(3, 3, 3, 4, 2, None, "frame", True, id="B3-T3-I3-H4-P2-frame-train"),
    pytest.param(3, 3, 2, 24, 5, [2, 3, 3], "frame", True, id="B3-T3-I2-H24-P5-frame-train-varlen-two-blocks"),
    # frame-wise eval with gradients: population statistics in the training kernels
    pytest.param(3, 3, 3, 8, 3, [3, 1, 2], "frame", False, id="B3-T3-I3-H8-P3-frame-eval-varlen"),
    pytest.param(3, 3, 3, 8, 3, [3, 1, 2], "sequence", True, id="B3-T3-I3-H8-P3-sequence-train-varlen"),
    pytest.param(3, 3, 3, 4, 2, [2, 3, 1], "sequence", False, id="B3-T3-I3-H4-P2-sequence-eval-varlen"),
    pytest.param(3, 3, 3, 8, 3, [3, 1, 2], None, True, id="B3-T3-I3-H8-P3-plain-varlen"),
]


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("T, B, I, H, P, lengths, normalization, use_batch_stats", PROJECTION_CASES)
def test_bnlstm_layer_triton_projection_matches_reference(nan_poisoned_empty, T, B, I, H, P, lengths,
                                                          normalization, use_batch_stats, dtype):
    # proj_size P: output and h_n [., B, P], every gradient by name, dW_hr included
    compare_with_reference("triton", T, B, I, H, lengths, normalization, use_batch_stats, dtype, proj=P)


@requires_interpreter
def test_bnlstm_layer_triton_projection_graph_replay_matches_reference(fake_graphs):
    # the host steps between a projection's launches replay with them: they must read the workspace's buffers
    compare_repeated_calls("frame", True, ([4, 1, 3], None, [4, 4, 2], [2, 4, 4]), proj=3)
    assert len(fake_graphs) == 3


def _step(x, hx=None, time_offset=0):
    """``run`` for assert_modules_agree: output (a PackedSequence's data), h_n and c_n of model(x, hx)."""
    def run(model):
        out, (h_n, c_n) = model(x, hx, time_offset=time_offset)
        return (out.data if isinstance(out, PackedSequence) else out), h_n, c_n
    return run


@requires_interpreter
@pytest.mark.parametrize("proj_size", [0, 2], ids=["", "proj"])
def test_bnlstm_module_triton_bidirectional_two_layers_packed(proj_size):
    reference, triton_model = twin_modules("triton", input_size=3, hidden_size=5, num_layers=2, bidirectional=True,
                                           proj_size=proj_size)
    lengths = torch.tensor([4, 6, 2])
    x = torch.randn(6, 3, 3) * (torch.arange(6).unsqueeze(1) < lengths).unsqueeze(2)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    # a training step (running statistics updated from the kernels' batch statistics), then eval
    assert_modules_agree(reference, triton_model, _step(packed))
    reference.eval()
    triton_model.eval()
    assert_modules_agree(reference, triton_model, _step(packed))


@requires_interpreter
@pytest.mark.parametrize("normalization", ["sequence", None], ids=["sequence", "plain"])
def test_bnlstm_module_triton_batch_first_other_normalizations(normalization):
    reference, triton_model = twin_modules("triton", input_size=2, hidden_size=3, batch_first=True,
                                           normalization=normalization)
    x = torch.randn(3, 5, 2)
    assert_modules_agree(reference, triton_model, _step(x))


@requires_interpreter
def test_bnlstm_module_triton_without_running_stats():
    # track_running_stats=False: batch statistics in eval too, identity fallback where one row runs
    reference, triton_model = twin_modules("triton", input_size=2, hidden_size=3, track_running_stats=False)
    lengths = torch.tensor([5, 2, 3])
    x = torch.randn(5, 3, 2) * (torch.arange(5).unsqueeze(1) < lengths).unsqueeze(2)
    reference.eval()
    triton_model.eval()
    assert_modules_agree(reference, triton_model, _step(pack_padded_sequence(x, lengths, enforce_sorted=False)))


@requires_interpreter
def test_bnlstm_module_triton_unbatched_eval():
    reference, triton_model = twin_modules("triton", input_size=2, hidden_size=3)
    x = torch.randn(4, 2)
    batch = torch.randn(4, 3, 2)
    module_step(reference, _step(batch))
    module_step(triton_model, _step(batch))
    reference.eval()
    triton_model.eval()
    assert_modules_agree(reference, triton_model, _step(x))


@requires_interpreter
def test_bnlstm_module_triton_graph_replay_bidirectional(fake_graphs):
    # both directions (one key) hold workspaces of their own until their backward has run
    reference, triton_model = twin_modules("triton", input_size=2, hidden_size=3, bidirectional=True)
    for seed in range(3):
        torch.manual_seed(seed)
        lengths = torch.tensor([4, 2, 3])
        x = torch.randn(4, 3, 2) * (torch.arange(4).unsqueeze(1) < lengths).unsqueeze(2)
        assert_modules_agree(reference, triton_model, _step(pack_padded_sequence(x, lengths, enforce_sorted=False)),
                             cotangent_seed=seed)
    assert fake_graphs


@requires_interpreter
def test_bnlstm_module_triton_time_offset_chunks():
    reference, triton_model = twin_modules("triton", input_size=2, hidden_size=3, max_length=5)
    x = torch.randn(3, 2, 2)
    hx = (torch.randn(1, 2, 3), torch.randn(1, 2, 3))
    assert_modules_agree(reference, triton_model, _step(x, hx=hx, time_offset=3))


@requires_interpreter
def test_bnlstm_module_triton_matches_padded_output():
    reference, triton_model = twin_modules("triton", input_size=2, hidden_size=3, num_layers=1)
    lengths = torch.tensor([2, 5, 5])
    x = torch.randn(5, 3, 2) * (torch.arange(5).unsqueeze(1) < lengths).unsqueeze(2)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out = pad_packed_sequence(triton_model(packed)[0], total_length=5)[0]
    expected = pad_packed_sequence(reference(packed)[0], total_length=5)[0]
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-4)


def _count_variant_launches(monkeypatch):
    """Count, by name, the launches of both variants' forward and backward kernels."""
    from fused_bnlstm.ops import persistent_triton, triton_kernels

    counter = {}
    kernels = {triton_kernels: ("bnlstm_fwd_step_kernel", "bnlstm_bwd_step_kernel", "bnlstm_infer_step_kernel"),
               persistent_triton: ("bnlstm_persistent_fwd_kernel", "bnlstm_persistent_bwd_kernel")}
    for module, names in kernels.items():
        for name in names:
            monkeypatch.setattr(module, name, _CountingKernel(getattr(module, name), counter, name))
    return counter


@requires_interpreter
def test_bnlstm_module_triton_variant_persistent(monkeypatch):
    """FUSED_BNLSTM_TRITON_VARIANT=persistent: BNLSTM(..., backend="triton") runs the persistent kernels (one
    launch per layer-direction forward and one backward, no per-step launch) and matches the reference
    module: outputs, every parameter's gradient and the running statistics, in training and in eval."""
    from fused_bnlstm.ops import fused_triton

    monkeypatch.setenv(fused_triton.VARIANT_ENV, "persistent")
    counter = _count_variant_launches(monkeypatch)
    reference, triton_model = twin_modules("triton", input_size=3, hidden_size=5, bidirectional=True)
    # one row left at the last step: its statistics fall back to the population's
    lengths = torch.tensor([4, 1, 3])
    x = torch.randn(4, 3, 3) * (torch.arange(4).unsqueeze(1) < lengths).unsqueeze(2)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    assert_modules_agree(reference, triton_model, _step(packed))
    assert counter == {"bnlstm_persistent_fwd_kernel": 2, "bnlstm_persistent_bwd_kernel": 2}
    reference.eval()
    triton_model.eval()
    assert_modules_agree(reference, triton_model, _step(packed))
    assert counter == {"bnlstm_persistent_fwd_kernel": 4, "bnlstm_persistent_bwd_kernel": 4}


@requires_interpreter
def test_triton_variant_setting(monkeypatch):
    """``auto`` (the default) asks ``persistent_preferred`` on CUDA only; ``step`` and ``persistent`` force
    one; anything else is a ValueError, also through the op."""
    from fused_bnlstm.ops import fused_triton, persistent_triton

    cuda = torch.device("cuda")
    monkeypatch.setattr(persistent_triton, "persistent_preferred", lambda B, H, dtype, device: H == 100)
    for setting in (None, "auto", " Auto "):
        if setting is None:
            monkeypatch.delenv(fused_triton.VARIANT_ENV, raising=False)
        else:
            monkeypatch.setenv(fused_triton.VARIANT_ENV, setting)
        assert fused_triton.variant(64, 100, torch.float32, CPU) == "step"
        assert fused_triton.variant(64, 100, torch.float32, cuda) == "persistent"
        assert fused_triton.variant(64, 1000, torch.float32, cuda) == "step"
    for setting in ("step", "persistent"):
        monkeypatch.setenv(fused_triton.VARIANT_ENV, setting)
        assert fused_triton.variant(64, 1000, torch.float32, cuda) == setting
        assert fused_triton.variant(64, 100, torch.float32, CPU) == setting
    monkeypatch.setenv(fused_triton.VARIANT_ENV, "fused")
    message = "FUSED_BNLSTM_TRITON_VARIANT must be one of auto, step, persistent, got 'fused'"
    with pytest.raises(ValueError, match=message):
        fused_triton.variant(64, 100, torch.float32, cuda)
    with pytest.raises(ValueError, match=message):
        call_layer(op_inputs(2, 2, 1, 3, None, torch.float32), backend="triton",
                   population=population(2, 3, "frame", torch.float32))


@requires_interpreter
def test_triton_variant_never_persistent_with_projection(monkeypatch):
    """The persistent kernels have no projection: ``variant`` keeps a call with one on the per-step launches
    whatever the setting, also where ``auto`` would choose the persistent kernels; through the op, such a
    call asked to run persistent runs per step and matches the reference."""
    from fused_bnlstm.ops import fused_triton, persistent_triton

    monkeypatch.setattr(persistent_triton, "persistent_preferred", lambda B, H, dtype, device: True)
    for setting in ("auto", "persistent", "step"):
        monkeypatch.setenv(fused_triton.VARIANT_ENV, setting)
        for device in (CPU, torch.device("cuda")):
            assert fused_triton.variant(3, 8, torch.float32, device, projection=True) == "step"
    counter = _count_variant_launches(monkeypatch)
    compare_with_reference("triton", 3, 3, 2, 8, [3, 1, 2], "frame", True, torch.float32, proj=3)
    assert counter == {"bnlstm_fwd_step_kernel": 3, "bnlstm_bwd_step_kernel": 3}


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this process alone (torch.distributed initialized for the test, then not)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _run_synchronized(backend, inputs, lengths, pop, normalization, use_batch_stats, group):
    """``run_layer`` with the statistics synchronized over ``group``."""
    out, h_n, c_n, stats = call_layer(inputs, backend=backend, lengths=lengths, population=pop,
                                      normalization=normalization, use_batch_stats=use_batch_stats,
                                      process_group=group)
    g = torch.Generator().manual_seed(2)
    cotangents = [torch.randn(v.shape, generator=g, dtype=torch.float64).to(v) for v in (out, h_n, c_n)]
    names = [n for n, arg in GRADIENTS.items() if arg in USED[normalization] and inputs.get(arg) is not None]
    grads = torch.autograd.grad([out, h_n, c_n], [inputs[GRADIENTS[n]] for n in names], cotangents)
    return {"output": out, "h_n": h_n, "c_n": c_n, **dict(zip(names, grads))}, stats


@requires_interpreter
@pytest.mark.parametrize("T, B, H, lengths, normalization, use_batch_stats, dtype, launches", [
    # counts (3, 2, 1): two steps synchronized (two launches forward, three backward), the last on the population
    pytest.param(3, 3, 24, [3, 1, 2], "frame", True, torch.float64, (5, 7), id="B3-T3-H24-frame-train-tail1-fp64"),
    pytest.param(2, 4, 5, None, "frame", True, torch.float32, (4, 6), id="B4-T2-H5-frame-train-fp32"),
    pytest.param(3, 3, 5, [3, 2, 1], "frame", False, torch.float64, (3, 3), id="B3-T3-H5-frame-eval-fp64"),
    pytest.param(3, 3, 5, [3, 2, 1], None, True, torch.float64, (3, 3), id="B3-T3-H5-plain-fp64"),
])
def test_bnlstm_layer_triton_synchronized_matches_reference(monkeypatch, fake_graphs, nan_poisoned_empty,
                                                            one_rank_group, T, B, H, lengths, normalization,
                                                            use_batch_stats, dtype, launches):
    """Synchronized statistics over a group of one rank, held to the reference over the same group: the
    phases, the host's a_hh and the group moments standing in as the population (the collectives themselves
    and ranks that differ are ``tests/test_distributed.py``'s). Per-step launches only (never persistent,
    whatever the setting), two forward / three backward per step with batch statistics, never captured."""
    from fused_bnlstm.ops import fused_triton

    monkeypatch.setenv(fused_triton.VARIANT_ENV, "persistent")
    tolerance = TOLERANCES[dtype]
    pop = population(T, H, normalization, dtype)
    inputs = op_inputs(T, B, 2, H, lengths, dtype)
    case = (lengths, pop, normalization, use_batch_stats, one_rank_group)
    expected, expected_stats = _run_synchronized("reference", inputs, *case)
    for call in range(2):
        counter = _count_variant_launches(monkeypatch)
        actual, actual_stats = _run_synchronized("triton", inputs, *case)
        assert (counter.get("bnlstm_fwd_step_kernel", 0), counter.get("bnlstm_bwd_step_kernel", 0)) == launches
        assert set(counter) <= {"bnlstm_fwd_step_kernel", "bnlstm_bwd_step_kernel"}, counter
        for name in expected:
            assert_close_by_name(actual[name], expected[name], f"call {call}: {name}", **tolerance)
        assert_same_statistics(expected_stats, actual_stats, **tolerance)
    assert fake_graphs == []


@requires_interpreter
@pytest.mark.parametrize("normalization, proj", [("sequence", 0), ("frame", 2)], ids=["sequence", "projection"])
def test_bnlstm_layer_triton_synchronized_refuses_sequence_and_projection(one_rank_group, normalization, proj):
    """Sequence-wise and projected synchronized calls are the reference's (the module routes them there)."""
    inputs = op_inputs(3, 2, 2, 4, None, torch.float32, proj=proj)
    with pytest.raises(NotImplementedError, match="synchronizes frame-wise statistics"):
        call_layer(inputs, backend="triton", population=population(3, 4, normalization, torch.float32),
                   normalization=normalization, process_group=one_rank_group)


CUDA = torch.device("cuda")
# few distinct (H, B-block) pairs: the step kernels compile once per hidden size and row block
CUDA_CASES = [
    pytest.param(16, 8, 32, 64, [16, 12, 1, 16, 9, 3, 16, 8], "frame", True, id="B8-T16-H64-frame-train-varlen"),
    pytest.param(16, 8, 32, 64, None, "frame", False, id="B8-T16-H64-frame-eval"),
    pytest.param(16, 8, 32, 64, [16, 12, 1, 16, 9, 3, 16, 8], "sequence", True, id="B8-T16-H64-sequence-train"),
    pytest.param(16, 8, 32, 64, [16, 2, 5, 16, 9, 3, 16, 8], None, True, id="B8-T16-H64-plain-varlen"),
    pytest.param(12, 64, 50, 100, None, "frame", True, id="B64-T12-H100-frame-train"),
]
LOW_PRECISION_CASES = CUDA_CASES[:1] + CUDA_CASES[2:4]


@requires_cuda
@pytest.mark.parametrize("T, B, I, H, lengths, normalization, use_batch_stats", CUDA_CASES)
def test_bnlstm_layer_triton_cuda_float32(no_tf32, T, B, I, H, lengths, normalization, use_batch_stats):
    compare_with_reference("triton", T, B, I, H, lengths, normalization, use_batch_stats, torch.float32, device=CUDA)


@requires_cuda
@pytest.mark.parametrize("T, B, I, H, lengths, normalization, use_batch_stats", CUDA_CASES[:4])
def test_bnlstm_layer_triton_cuda_projection(no_tf32, T, B, I, H, lengths, normalization, use_batch_stats):
    compare_with_reference("triton", T, B, I, H, lengths, normalization, use_batch_stats, torch.float32, device=CUDA,
                           proj=24)


def compare_low_precision(T, B, I, H, lengths, normalization, use_batch_stats, dtype, device):
    """The kernel's error against a float64 reference is at most about 2x PyTorch's own at that dtype.

    Shapes keep three or more running rows at every batch-statistics step: BN over two rows is so
    ill-conditioned that any 16-bit computation of it is off by percents. Where PyTorch's own run is not
    finite (fp16 overflow in the reference's BN backward), ours must be finite and within 1% of the scale.
    """
    exact_pop = population(T, H, normalization, torch.float64, device)
    exact_inputs = op_inputs(T, B, I, H, lengths, torch.float64, device)
    exact, _ = run_layer("reference", exact_inputs, lengths, exact_pop, use_batch_stats, normalization)
    low_pop = None if exact_pop is None else Population(*[p if p is None else p.to(dtype) for p in exact_pop])
    low_inputs = {n: None if v is None else v.detach().to(dtype).requires_grad_() for n, v in exact_inputs.items()}
    torch_low, _ = run_layer("reference", low_inputs, lengths, low_pop, use_batch_stats, normalization)
    ours, _ = run_layer("triton", low_inputs, lengths, low_pop, use_batch_stats, normalization)
    for name, expected in exact.items():
        torch_error = (torch_low[name].double() - expected).abs().max().item()
        our_error = (ours[name].double() - expected).abs().max().item()
        scale = expected.abs().max().item()
        bound = 2.0 * torch_error if math.isfinite(torch_error) else 1e-2 * scale
        assert our_error <= bound + 1e-3 * scale, (name, our_error, torch_error)


@requires_interpreter
@pytest.mark.parametrize("T, B, I, H, lengths, normalization, use_batch_stats", [
    pytest.param(7, 5, 5, 24, [7, 4, 4, 4, 1], "frame", True, id="B5-T7-I5-H24-frame-train-varlen-tail1-fp16"),
    pytest.param(4, 5, 1, 8, [4, 4, 1, 2, 3], "sequence", True, id="B5-T4-I1-H8-sequence-train-fp16"),
    pytest.param(7, 3, 5, 8, [7, 3, 5], None, True, id="B3-T7-I5-H8-plain-fp16"),
])
def test_bnlstm_layer_triton_float16_error(T, B, I, H, lengths, normalization, use_batch_stats):
    compare_low_precision(T, B, I, H, lengths, normalization, use_batch_stats, torch.float16, CPU)


@requires_interpreter
def test_bnlstm_module_triton_autocast_float16():
    # under autocast the op computes in autocast's dtype, as nn.LSTM does; running statistics stay float32
    reference, triton_model = twin_modules("triton", input_size=3, hidden_size=8)
    exact = BNLSTM(3, 8, backend="reference", dtype=torch.float64)
    exact.load_state_dict(reference.state_dict())
    x = torch.randn(5, 3, 3)
    expected, _ = exact(x.double())
    with torch.autocast("cpu", dtype=torch.float16):
        ours, _ = triton_model(x)
        theirs, _ = reference(x)
    assert ours.dtype == torch.float16 and triton_model.running_mean_ih_l0.dtype == torch.float32
    torch_error = (theirs.double() - expected).abs().max().item()
    assert (ours.double() - expected).abs().max().item() <= 2.0 * torch_error + 1e-3
    assert_close_by_name(triton_model.running_mean_ih_l0, exact.running_mean_ih_l0.float(), "running_mean_ih",
                         atol=1e-2, rtol=1e-2)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T, B, I, H, lengths, normalization, use_batch_stats", LOW_PRECISION_CASES)
def test_bnlstm_layer_triton_cuda_low_precision(no_tf32, dtype, T, B, I, H, lengths, normalization,
                                                use_batch_stats):
    compare_low_precision(T, B, I, H, lengths, normalization, use_batch_stats, dtype, CUDA)


@requires_cuda
@pytest.mark.parametrize("T, B, I, H, lengths, normalization, use_batch_stats", LOW_PRECISION_CASES)
def test_bnlstm_layer_triton_cuda_tf32(no_tf32, monkeypatch, T, B, I, H, lengths, normalization, use_batch_stats):
    # TF32 on both sides: torch's matmuls (the reference's, and our hoisted and post-loop GEMMs) and our
    # recurrent dots; the error against float64 at most about 2x PyTorch's own
    monkeypatch.setenv("FUSED_BNLSTM_TRITON_PRECISION", "tf32")
    torch.backends.cuda.matmul.allow_tf32 = True
    compare_low_precision(T, B, I, H, lengths, normalization, use_batch_stats, torch.float32, CUDA)


@requires_cuda
def test_bnlstm_layer_triton_cuda_tf32x3(no_tf32, monkeypatch):
    monkeypatch.setenv("FUSED_BNLSTM_TRITON_PRECISION", "tf32x3")
    compare_with_reference("triton", 16, 8, 32, 64, [16, 12, 1, 16, 9, 3, 16, 8], "frame", True, torch.float32,
                           device=CUDA)


@requires_cuda
@pytest.mark.parametrize("T, B, I, H, lengths, normalization, use_batch_stats", [
    pytest.param(16, 8, 32, 64, None, "frame", False, id="B8-T16-H64-frame-eval"),
    pytest.param(12, 64, 50, 100, [12] * 60 + [5, 3, 1, 7], "frame", False, id="B64-T12-H100-frame-eval-varlen"),
    pytest.param(12, 64, 50, 100, None, "frame", True, id="B64-T12-H100-frame-train"),
    pytest.param(16, 8, 32, 64, [16, 2, 5, 16, 9, 3, 16, 8], None, True, id="B8-T16-H64-plain-varlen"),
])
def test_bnlstm_layer_triton_cuda_no_grad(no_tf32, monkeypatch, T, B, I, H, lengths, normalization,
                                          use_batch_stats):
    compare_no_grad(monkeypatch, T, B, I, H, lengths, normalization, use_batch_stats, CUDA)


@requires_cuda
@pytest.mark.parametrize("normalization, use_batch_stats", [
    pytest.param("frame", True, id="frame-train"), pytest.param("frame", False, id="frame-eval"),
    pytest.param("sequence", True, id="sequence-train"), pytest.param(None, True, id="plain"),
])
def test_bnlstm_layer_triton_cuda_no_host_sync(no_tf32, normalization, use_batch_stats):
    T, B, I, H, lengths = 16, 8, 32, 64, [16, 12, 1, 16, 9, 3, 16, 8]
    inputs = op_inputs(T, B, I, H, lengths, torch.float32, CUDA)
    config = dict(population=population(T, H, normalization, torch.float32, CUDA), lengths=lengths,
                  use_batch_stats=use_batch_stats, normalization=normalization)
    cotangents = [torch.randn(T, B, H, device=CUDA), torch.randn(B, H, device=CUDA), torch.randn(B, H, device=CUDA)]

    def step():
        out, h_n, c_n, _ = call_layer(inputs, backend="triton", **config)
        torch.autograd.grad([out, h_n, c_n], [inputs["x"], inputs["weight_hh"]], cotangents)
        with torch.no_grad():
            call_layer(inputs, backend="triton", **config)

    # the first call compiles, the second captures the step loops (torch.cuda.graph synchronizes)
    step()
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
@pytest.mark.parametrize("proj", [0, 5], ids=["no-projection", "P5"])
@pytest.mark.parametrize("normalization, use_batch_stats, lengths", REPEATED_CALLS)
def test_bnlstm_layer_triton_cuda_graph_replay(no_tf32, monkeypatch, normalization, use_batch_stats, lengths, proj):
    from fused_bnlstm.ops import fused_triton

    monkeypatch.delenv(fused_triton.GRAPHS_ENV, raising=False)
    monkeypatch.setattr(fused_triton, "_WORKSPACES", fused_triton._WorkspacePool())
    captured = []
    capture = fused_triton._capture
    monkeypatch.setattr(fused_triton, "_capture", lambda launches: captured.append(launches) or capture(launches))
    compare_repeated_calls(normalization, use_batch_stats, lengths, CUDA, proj=proj)
    assert len(captured) == 3


@requires_cuda
def test_bnlstm_layer_triton_cuda_inside_user_graph(no_tf32):
    # a caller's own capture records the launches (the op's graphs stand aside); replays follow new inputs
    T, B, I, H = 16, 8, 32, 64
    inputs = {n: v.detach() for n, v in op_inputs(T, B, I, H, None, torch.float32, CUDA).items()}
    config = dict(population=population(T, H, "frame", torch.float32, CUDA), use_batch_stats=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        call_layer(inputs, backend="triton", **config)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = call_layer(inputs, backend="triton", **config).output
    for seed in (1, 2):
        for name, value in op_inputs(T, B, I, H, None, torch.float32, CUDA, seed=seed).items():
            inputs[name].copy_(value.detach())
        graph.replay()
        with torch.no_grad():
            expected = call_layer(inputs, backend="reference", **config).output
        assert_close_by_name(static_out, expected, "output", **TOLERANCES[torch.float32])


@requires_cuda
def test_bnlstm_module_triton_cuda_inside_user_graph(no_tf32):
    """A BNLSTM module captured in a caller's torch.cuda.graph: a training forward (its running-statistics
    update recorded too, as BatchNorm's is) and eval, replayed on new inputs, equal an eager twin's calls."""
    reference, captured = twin_modules("triton", input_size=16, hidden_size=32, max_length=12)
    reference.to(CUDA)
    captured.to(CUDA)
    static_x = torch.randn(12, 8, 16, device=CUDA)
    for training in (True, False):
        for model in (reference, captured):
            model.train(training)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            captured(static_x)  # warm-up outside the capture (compiles, allocates), as torch.cuda.graph asks
        torch.cuda.current_stream().wait_stream(side)
        reference.load_state_dict(captured.state_dict())
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = captured(static_x)[0]
        reference.load_state_dict(captured.state_dict())  # the capture ran no kernel; keep both equal anyway
        for seed in (1, 2):
            static_x.copy_(torch.randn(12, 8, 16, generator=torch.Generator().manual_seed(seed)).to(CUDA))
            graph.replay()
            with torch.no_grad():
                expected = reference(static_x)[0]
            assert_close_by_name(static_out, expected, f"output (training={training})", **TOLERANCES[torch.float32])
            for (name, want), got in zip(reference.named_buffers(), captured.buffers()):
                assert_close_by_name(got.float(), want.float(), name, **TOLERANCES[torch.float32])


@requires_cuda
def test_bnlstm_layer_triton_cuda_deterministic(no_tf32):
    assert_deterministic(CUDA, 16, 8, 32, 64, [16, 12, 1, 16, 9, 3, 16, 8])


@requires_cuda
def test_bnlstm_module_triton_cuda_bidirectional(no_tf32):
    reference, triton_model = twin_modules("triton", input_size=16, hidden_size=64, num_layers=2, bidirectional=True)
    reference.to(CUDA)
    triton_model.to(CUDA)
    lengths = torch.tensor([9, 3, 12, 12, 7])
    x = torch.randn(12, 5, 16) * (torch.arange(12).unsqueeze(1) < lengths).unsqueeze(2)
    packed = pack_padded_sequence(x.to(CUDA), lengths, enforce_sorted=False)
    assert_modules_agree(reference, triton_model, _step(packed))


_COMPILE_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction

    from fused_bnlstm.ops import fused_triton as F
    from fused_bnlstm.ops import triton_kernels as K
    from fused_bnlstm.ops.triton_common import _BLOCK_FEATURES, _BLOCK_ROWS, block_rows

    TARGET = GPUTarget("cuda", 90, 32)
    BACKEND = make_backend(TARGET)
    # buffers in the accumulation dtype; the other pointers are in the input's dtype
    ACC_BUFFERS = ("p_c", "p_a_hh", "p_stats", "p_dstate", "p_dparams", "p_dgamma", "p_fold")
    INT_BUFFERS = {"p_lengths": "*i64", "p_steps": "*i32"}

    def compile_for_sm90(kernel, dtype, constexprs, num_warps):
        # as a launch specializes: 16-byte-aligned pointers, None pointers and flags as constexprs
        fn = kernel if isinstance(kernel, JITFunction) else kernel.fn  # the JITFunction under @triton.heuristics
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.startswith("p_"):
                signature[name] = INT_BUFFERS.get(name) or ("*fp32" if name in ACC_BUFFERS else f"*{dtype}")
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[name] = "fp32" if name == "eps" else "i32"
        options = BACKEND.parse_options({"num_warps": num_warps})
        return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)

    B = 64
    tiles = dict(H=100, BB=block_rows(B), BH=F._BLOCK_H)
    infer_tiles = dict(tiles, BB=F._INFER_ROWS, P=100)
    # every kernel in fp32 IEEE and bf16, the dot kernels in TF32 as well; plain variants once
    for dtype, precision in (("fp32", "ieee"), ("fp32", "tf32"), ("bf16", None)):
        frame = dict(FRAME=True, HAS_BIAS=True, PRECISION=precision, **tiles)
        compile_for_sm90(K.bnlstm_fwd_step_kernel, dtype, dict(frame, SAVE=True, RECURRENT=True, P=100),
                         F._num_warps(B))
        compile_for_sm90(K.bnlstm_bwd_step_kernel, dtype, dict(frame, RECURRENT=True, PHASE=0), F._num_warps(B))
        compile_for_sm90(K.bnlstm_infer_step_kernel, dtype,
                         dict(FOLDED=True, HAS_BIAS=False, p_bias=None, PRECISION=precision, **infer_tiles), 4)
        if precision == "tf32":
            continue
        for kernel in (K.sequence_bn_fwd_kernel, K.sequence_bn_bwd_kernel):
            compile_for_sm90(kernel, dtype, dict(BR=_BLOCK_ROWS, BF=_BLOCK_FEATURES), 4)
    plain = dict(FRAME=False, HAS_BIAS=False, PRECISION="ieee", p_bias=None, p_affine=None, p_steps=None, **tiles)
    compile_for_sm90(K.bnlstm_fwd_step_kernel, "fp32",
                     dict(plain, SAVE=False, RECURRENT=True, P=100, p_pop=None, p_a_hh=None, p_stats=None),
                     F._num_warps(B))
    compile_for_sm90(K.bnlstm_bwd_step_kernel, "fp32",
                     dict(plain, RECURRENT=True, PHASE=0, p_stats=None, p_dparams=None), F._num_warps(B))
    compile_for_sm90(K.bnlstm_infer_step_kernel, "fp32",
                     dict(FOLDED=False, HAS_BIAS=True, p_fold=None, PRECISION="ieee", **infer_tiles), 4)
    # a projection (proj_size 50): the recurrent dots at depth P, the backward without its own dot
    frame = dict(FRAME=True, HAS_BIAS=True, PRECISION="tf32", **tiles)
    compile_for_sm90(K.bnlstm_fwd_step_kernel, "fp32", dict(frame, SAVE=True, RECURRENT=True, P=50),
                     F._num_warps(B))
    compile_for_sm90(K.bnlstm_bwd_step_kernel, "fp32", dict(frame, RECURRENT=False, PHASE=0, p_w_hh=None),
                     F._num_warps(B))
    compile_for_sm90(K.bnlstm_infer_step_kernel, "fp32",
                     dict(FOLDED=True, HAS_BIAS=False, p_bias=None, PRECISION="tf32", **dict(infer_tiles, P=50)), 4)
    # synchronized statistics: the forward reading the host's a_hh, the backward's three phases (no bias: phase
    # 2 keeps sum dz in the bias columns all the same)
    frame = dict(FRAME=True, HAS_BIAS=False, PRECISION="tf32", p_bias=None, **tiles)
    compile_for_sm90(K.bnlstm_fwd_step_kernel, "fp32", dict(frame, SAVE=True, RECURRENT=False, P=100, p_w_hh=None),
                     F._num_warps(B))
    for phase in (1, 2, 3):
        compile_for_sm90(K.bnlstm_bwd_step_kernel, "fp32", dict(frame, RECURRENT=True, PHASE=phase), F._num_warps(B))
    print("compiled")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tier runs the compiled kernels themselves")
@pytest.mark.skipif(not _cpu_ok or not has_nvidia_toolchain(), reason="needs triton with its bundled ptxas")
def test_triton_kernels_compile_for_sm90():
    """The interpreter accepts Python the compiler does not: compile every kernel for an H100 (no GPU needed)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
