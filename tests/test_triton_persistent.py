"""The persistent Triton kernels (``fused_bnlstm/ops/persistent_triton.py``) held to the reference.

Tiers:
- interpreter (no CUDA; conftest sets ``TRITON_INTERPRET=1``): every output, gradient by name and batch
  statistic against the reference for the "registers" form (one program, h carried in registers) and the
  "single" form (one program walking column blocks through memory: the "grid" kernel with one program, its
  barrier only a CTA barrier); gradcheck in float64; double backward through the reference's VJP; plus a
  subprocess that compiles both kernels for sm90 and checks the compile report behind ``persistent_fits``;
- CUDA (skips without a GPU): the multi-program "grid" form (a cooperative launch with one grid barrier
  per step), which the interpreter cannot run since it runs programs one after another.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fused_bnlstm import ops
from fused_bnlstm.ops import LayerConfig, LayerParams, backend_available
from layer_cases import (CPU, USED, call_layer, compare_with_reference, has_nvidia_toolchain, op_inputs,
                         population)

_cpu_ok, _cpu_reason = backend_available("triton", CPU)
requires_interpreter = pytest.mark.skipif(not _cpu_ok, reason=f"Triton on CPU tensors: {_cpu_reason}")
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not backend_available("triton", torch.device("cuda"))[0],
    reason="needs a CUDA GPU with the Triton backend",
)
# the interpreter's numpy sigmoid overflows exp() on large negative inputs, harmlessly (1 / inf = 0)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

# the name the tests give the persistent backend in bnlstm_layer (it is not one of ops.BACKENDS yet)
BACKEND = "triton_persistent"


@pytest.fixture
def persistent(monkeypatch):
    """``use(form)`` routes ``bnlstm_layer(..., backend=BACKEND)`` to the persistent kernels in that form."""
    from fused_bnlstm.ops.persistent_triton import bnlstm_layer_triton_persistent

    original = ops._backend_function

    def use(form):
        entry = functools.partial(bnlstm_layer_triton_persistent, form=form)
        monkeypatch.setattr(ops, "_backend_function", lambda name: entry if name == BACKEND else original(name))

    return use


LAYER_CASES = [
    # frame-wise training; lengths with steps where fewer than two rows still run (population fallback)
    pytest.param(7, 3, 5, 24, [7, 1, 4], "frame", True, id="B3-T7-I5-H24-frame-train-varlen-tail1"),
    pytest.param(4, 5, 1, 8, None, "frame", True, id="B5-T4-I1-H8-frame-train"),
    pytest.param(1, 2, 5, 3, None, "frame", True, id="B2-T1-I5-H3-frame-train"),
    pytest.param(7, 5, 1, 3, [7, 2, 7, 5, 1], "frame", True, id="B5-T7-I1-H3-frame-train-varlen"),
    # frame-wise eval: population statistics at every step
    pytest.param(4, 3, 5, 8, [4, 2, 3], "frame", False, id="B3-T4-I5-H8-frame-eval-varlen"),
    # sequence-wise: the input branch normalized before the loop
    pytest.param(4, 3, 5, 24, [4, 1, 2], "sequence", True, id="B3-T4-I5-H24-sequence-train-varlen"),
    pytest.param(4, 5, 1, 8, [4, 4, 1, 2, 3], "sequence", False, id="B5-T4-I1-H8-sequence-eval-varlen"),
    # plain LSTM through the same kernels
    pytest.param(7, 3, 5, 8, [7, 3, 5], None, True, id="B3-T7-I5-H8-plain-varlen"),
]

# the block-walking form with several 16-unit blocks per step (H = 24: 2, H = 40: 3)
BLOCK_CASES = [
    pytest.param(7, 3, 5, 24, [7, 1, 4], "frame", True, id="B3-T7-I5-H24-frame-train-varlen-tail1"),
    pytest.param(4, 3, 5, 40, [4, 3, 2], "frame", True, id="B3-T4-I5-H40-frame-train-varlen"),
    pytest.param(4, 2, 1, 24, None, "frame", False, id="B2-T4-I1-H24-frame-eval"),
    pytest.param(4, 3, 5, 40, [4, 1, 2], "sequence", True, id="B3-T4-I5-H40-sequence-train-varlen"),
    pytest.param(2, 5, 1, 24, None, None, True, id="B5-T2-I1-H24-plain"),
]

# one 8-unit block (H <= 8) on one program: the path where every program owns one block (OWN_BLOCK, the
# grid form's at the paper shapes on an H100), the forward's states carried in registers across the loop
# (blocks under 16 units never take the "registers" form: its dot needs 16)
OWN_BLOCK_CASES = [
    pytest.param(7, 3, 5, 7, [7, 1, 4], "frame", True, id="B3-T7-I5-H7-frame-train-varlen-tail1"),
    pytest.param(4, 5, 1, 8, None, "frame", True, id="B5-T4-I1-H8-frame-train"),
    pytest.param(4, 3, 5, 6, [4, 2, 3], "frame", False, id="B3-T4-I5-H6-frame-eval-varlen"),
    pytest.param(4, 3, 5, 8, [4, 1, 2], "sequence", True, id="B3-T4-I5-H8-sequence-train-varlen"),
    pytest.param(5, 2, 3, 5, [5, 3], None, True, id="B2-T5-I3-H5-plain-varlen"),
]


@pytest.fixture
def own_block(persistent, monkeypatch):
    """The "single" form with 8-unit blocks: at H <= 8 one block on one program (OWN_BLOCK)."""
    from fused_bnlstm.ops import persistent_triton

    persistent("single")
    monkeypatch.setattr(persistent_triton, "_BLOCK_H", 8)


@requires_interpreter
@pytest.mark.parametrize("T, B, I, H, lengths, normalization, use_batch_stats", LAYER_CASES)
def test_bnlstm_layer_triton_persistent_registers_matches_reference(persistent, nan_poisoned_empty, T, B, I, H,
                                                                    lengths, normalization, use_batch_stats):
    persistent("registers")
    compare_with_reference(BACKEND, T, B, I, H, lengths, normalization, use_batch_stats, torch.float32)


@requires_interpreter
@pytest.mark.parametrize("T, B, I, H, lengths, normalization, use_batch_stats", BLOCK_CASES)
def test_bnlstm_layer_triton_persistent_single_matches_reference(persistent, nan_poisoned_empty, T, B, I, H,
                                                                 lengths, normalization, use_batch_stats):
    persistent("single")
    compare_with_reference(BACKEND, T, B, I, H, lengths, normalization, use_batch_stats, torch.float32)


@requires_interpreter
@pytest.mark.parametrize("T, B, I, H, lengths, normalization, use_batch_stats", OWN_BLOCK_CASES)
def test_bnlstm_layer_triton_persistent_own_block_matches_reference(own_block, nan_poisoned_empty, T, B, I, H,
                                                                    lengths, normalization, use_batch_stats):
    compare_with_reference(BACKEND, T, B, I, H, lengths, normalization, use_batch_stats, torch.float32)


@requires_interpreter
@pytest.mark.parametrize("form", ["registers", "single"])
def test_bnlstm_layer_triton_persistent_float64(persistent, form):
    persistent(form)
    compare_with_reference(BACKEND, 4, 3, 2, 24, [4, 1, 3], "frame", True, torch.float64)


@requires_interpreter
@pytest.mark.parametrize("normalization", ["frame", "sequence", None], ids=["frame", "sequence", "plain"])
def test_bnlstm_layer_triton_persistent_without_bias(persistent, normalization):
    persistent("registers")
    compare_with_reference(BACKEND, 4, 3, 5, 8, [4, 3, 1], normalization, True, torch.float32, bias=False)


@requires_interpreter
@pytest.mark.parametrize("H, block_h", [(24, 16), (6, 8)], ids=["blocks", "own-block"])
def test_bnlstm_layer_triton_persistent_no_grad_matches_reference(persistent, monkeypatch, H, block_h):
    """Without gradients the forward saves nothing (two state slots) and still returns the statistics."""
    from fused_bnlstm.ops import persistent_triton

    persistent("single")
    monkeypatch.setattr(persistent_triton, "_BLOCK_H", block_h)
    T, B, I, lengths = 5, 3, 2, [5, 2, 4]
    inputs = op_inputs(T, B, I, H, lengths, torch.float32)
    pop = population(T, H, "frame", torch.float32)
    with torch.no_grad():
        expected = call_layer(inputs, lengths=lengths, population=pop)
        actual = call_layer(inputs, backend=BACKEND, lengths=lengths, population=pop)
    for name, want, got in zip(("output", "h_n", "c_n"), expected[:3], actual[:3]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(actual.stats.mean_hh, expected.stats.mean_hh, equal_nan=True, atol=1e-4, rtol=1e-3)


@requires_interpreter
def test_bnlstm_layer_triton_persistent_gradcheck_float64(persistent):
    persistent("registers")
    T, B, I, H, lengths = 3, 3, 2, 3, [3, 1, 2]
    inputs = op_inputs(T, B, I, H, lengths, torch.float64)
    pop = population(T, H, "frame", torch.float64)
    names = list(USED["frame"])
    fixed = {n: v.detach() for n, v in inputs.items() if n not in names}

    def run(*tensors):
        out, h_n, c_n, _ = call_layer({**dict(zip(names, tensors)), **fixed}, backend=BACKEND, lengths=lengths,
                                      population=pop)
        return out, h_n, c_n

    assert torch.autograd.gradcheck(run, [inputs[n] for n in names], fast_mode=True, atol=1e-6)


@requires_interpreter
def test_bnlstm_layer_triton_persistent_double_backward(persistent):
    """create_graph=True hands backward to the reference's VJP: a gradient penalty matches the reference's."""
    persistent("registers")
    T, B, I, H, lengths = 3, 3, 2, 8, [3, 2, 3]
    pop = population(T, H, "frame", torch.float64)
    penalties = {}
    for backend in ("reference", BACKEND):
        inputs = op_inputs(T, B, I, H, lengths, torch.float64)
        out, h_n, _, _ = call_layer(inputs, backend=backend, lengths=lengths, population=pop)
        (dx,) = torch.autograd.grad(out.square().sum() + h_n.sum(), inputs["x"], create_graph=True)
        (penalties[backend],) = torch.autograd.grad(dx.square().sum(), inputs["weight_hh"])
    torch.testing.assert_close(penalties[BACKEND], penalties["reference"])


@requires_interpreter
def test_bnlstm_layer_triton_persistent_batched_cotangents(persistent):
    """is_grads_batched=True (batched cotangents) goes through the reference's VJP and matches it."""
    persistent("single")
    T, B, I, H, lengths = 3, 3, 2, 8, [3, 1, 2]
    pop = population(T, H, "frame", torch.float64)
    cotangents = torch.randn(2, T, B, H, dtype=torch.float64)
    grads = {}
    for backend in ("reference", BACKEND):
        inputs = op_inputs(T, B, I, H, lengths, torch.float64)
        out = call_layer(inputs, backend=backend, lengths=lengths, population=pop).output
        (grads[backend],) = torch.autograd.grad(out, inputs["weight_hh"], cotangents, is_grads_batched=True)
    torch.testing.assert_close(grads[BACKEND], grads["reference"])


@requires_interpreter
def test_bnlstm_layer_triton_persistent_refusals():
    from fused_bnlstm.ops.common import prepare_layer
    from fused_bnlstm.ops.persistent_triton import bnlstm_layer_triton_persistent

    T, B, I, H = 2, 3, 2, 4
    inputs = op_inputs(T, B, I, H, None, torch.float32)
    params = LayerParams(**{n: inputs[n] for n in LayerParams._fields if n in inputs})
    layer_input = prepare_layer(inputs["x"], inputs["h0"], inputs["c0"], params, LayerConfig(), None,
                                population(T, H, "frame", torch.float32))
    with pytest.raises(NotImplementedError, match="proj_size"):
        bnlstm_layer_triton_persistent(inputs=layer_input, params=params._replace(weight_hr=torch.eye(H)),
                                       config=LayerConfig())
    with pytest.raises(NotImplementedError, match="process_group"):
        bnlstm_layer_triton_persistent(inputs=layer_input, params=params, config=LayerConfig(process_group=object()))
    with pytest.raises(ValueError, match="form"):
        bnlstm_layer_triton_persistent(inputs=layer_input, params=params, config=LayerConfig(), form="cooperative")
    with pytest.raises(ValueError, match="B <= 256"):
        wide = op_inputs(1, 257, I, H, None, torch.float32)
        bnlstm_layer_triton_persistent(
            inputs=prepare_layer(wide["x"], wide["h0"], wide["c0"], params, LayerConfig(normalization=None), None,
                                 None), params=params, config=LayerConfig(normalization=None))


def test_persistent_fits_follows_the_compile_report():
    """The envelope of the "registers" form (README: Persistent kernels): s-MNIST's H = 100 does not fit."""
    from fused_bnlstm.ops.persistent_triton import persistent_fits

    assert persistent_fits(64, 16, torch.float32) and persistent_fits(32, 16, torch.bfloat16)
    assert not persistent_fits(64, 32, torch.float32) and not persistent_fits(64, 100, torch.bfloat16)
    assert not persistent_fits(128, 16, torch.float32)
    # the backward spilled at these (sm90 compile report)
    assert not persistent_fits(32, 32, torch.float32) and not persistent_fits(64, 16, torch.bfloat16)


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, re, subprocess, sys, tempfile
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource, make_backend

    from fused_bnlstm.ops import persistent_triton as P
    from fused_bnlstm.ops.triton_common import block_rows

    TARGET = GPUTarget("cuda", 90, 64)
    BACKEND = make_backend(TARGET)
    ACC_BUFFERS = ("p_c", "p_a_hh", "p_stats", "p_dstate", "p_dparams")
    INT_BUFFERS = {"p_lengths": "*i64", "p_steps": "*i32", "p_sem": "*i32"}

    def compile_for_sm90(kernel, dtype, constexprs, num_warps):
        # as a launch specializes: 16-byte-aligned pointers, flags as constexprs; then ptxas -v's report
        fn = kernel.fn
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
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as ptx:
            ptx.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx.name, "-o", ptx.name + ".o"],
                             capture_output=True, text=True, check=True).stderr
        spills = re.search(r"(\\d+) bytes spill stores, (\\d+) bytes spill loads", log)
        return dict(regs=int(re.search(r"Used (\\d+) registers", log).group(1)),
                    spills=int(spills.group(1)) + int(spills.group(2)), shared=compiled.metadata.shared)

    for B, H, dtype, torch_dtype, precision, form, programs in json.loads(sys.argv[1]):
        torch_dtype = getattr(torch, torch_dtype)
        carry = form == "registers"
        # the kernels keep the one block in registers where it covers H (BH >= H)
        common = dict(H=H, NUM_PROGRAMS=programs, PRECISION=precision, BB=block_rows(B),
                      BH=P._single_block_h(H) if carry else P._BLOCK_H)
        warps = P._REGISTERS_WARPS if carry else P._block_warps(B)
        for name, kernel, constexprs in (("fwd", P.bnlstm_persistent_fwd_kernel, dict(common, SAVE=True, BATCH=True)),
                                         ("bwd", P.bnlstm_persistent_bwd_kernel, common)):
            report = compile_for_sm90(kernel, dtype, dict(constexprs, FRAME=True, HAS_BIAS=True), warps)
            fits = P.persistent_fits(B, H, torch_dtype)
            print(json.dumps(dict(kernel=name, B=B, H=H, dtype=dtype, form=form, fits=fits, **report)), flush=True)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tier runs the compiled kernels themselves")
@pytest.mark.skipif(not _cpu_ok or not has_nvidia_toolchain(), reason="needs triton with its bundled ptxas")
def test_triton_persistent_kernels_compile_for_sm90():
    """Both kernels compile for an H100 (the interpreter accepts Python the compiler rejects, and has no
    bfloat16): the "registers" form where ``persistent_fits`` says it fits, without spills, and the
    multi-program "grid" form (its barrier's atomics and one block a program included) at s-MNIST's H = 100
    within the SM's 227 KiB of shared memory, in float32 (TF32) and bfloat16."""
    cases = [[64, 16, "fp32", "float32", "tf32", "registers", 1], [64, 100, "fp32", "float32", "tf32", "grid", 7],
             [32, 16, "bf16", "bfloat16", None, "registers", 1], [64, 100, "bf16", "bfloat16", None, "grid", 7]]
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) == 2 * len(cases), result.stdout
    for report in reports:
        # both forms without a spill: "registers" where persistent_fits says so, "grid" at B = 64
        assert report["shared"] <= 227 * 1024 and report["spills"] == 0, report
        assert report["fits"] == (report["form"] == "registers"), report


@requires_cuda
@pytest.mark.parametrize("form", ["registers", "single", "grid"])
@pytest.mark.parametrize("normalization", ["frame", "sequence", None], ids=["frame", "sequence", "plain"])
def test_bnlstm_layer_triton_persistent_cuda(persistent, monkeypatch, form, normalization):
    """On the GPU in IEEE float32: the grid form runs several programs (H = 100: 7) and its grid barrier."""
    persistent(form)
    monkeypatch.setenv("FUSED_BNLSTM_TRITON_PRECISION", "ieee")
    H = 32 if form == "registers" else 100
    compare_with_reference(BACKEND, 9, 5, 7, H, [9, 3, 9, 1, 6], normalization, True, torch.float32,
                           device=torch.device("cuda"))
