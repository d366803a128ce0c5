"""What the benchmark compares, found at run time, and how one call of each is made.

A ``Candidate`` is one implementation: ``torch.nn.LSTM`` (oneDNN on CPU, cuDNN on GPU with TF32 off and
on), every ``BNLSTM`` backend that ``fused_bnlstm.ops.backend_available`` allows on the device, each with
frame-wise normalization and with ``normalization=None``, and ``torch.compile`` of the reference module.
A ``Runner`` binds a candidate to a shape and a mode: ``before()`` runs outside the timed region
(gradients to None, TF32 switches), ``__call__()`` is exactly what is timed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.shapes import Shape

# torch.compile unrolls the reference's T-step Python loop into one graph; compile time grows with T
# (on the 2-core CPU: ~40 s for forward+backward at T=10, ~70-95 s per mode at T=50).
COMPILE_AUTO_MAX_T = 16


@dataclass(frozen=True)
class Candidate:
    key: str  # unique, file- and id-safe: "bnlstm-reference-frame"
    label: str  # shown in the table: "BNLSTM reference"
    kind: str  # "lstm" | "bnlstm" | "compile"
    backend: str | None = None  # BNLSTM backend ("reference", "triton", "cpp")
    normalization: str | None = None  # "frame" or None
    tf32: bool | None = None  # nn.LSTM on CUDA: the cuDNN / cuBLAS TF32 switches for this row

    @property
    def norm_label(self) -> str:
        return "none" if self.normalization is None else self.normalization


@dataclass(frozen=True)
class Skipped:
    label: str
    reason: str


def lstm_kernel_name(device: torch.device) -> str:
    """Which kernel nn.LSTM dispatches to on ``device`` in training, read off its autograd graph."""
    lstm = nn.LSTM(3, 4).to(device)
    out = lstm(torch.randn(2, 2, 3, device=device))[0]
    names, stack = [], [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None:
            names.append(type(fn).__name__)
            stack.extend(next_fn for next_fn, _ in fn.next_functions)
    joined = " ".join(names).lower()
    if "cudnn" in joined:
        return "cuDNN"
    if "mkldnn" in joined:
        return "oneDNN"
    if "miopen" in joined:
        return "MIOpen"
    return "ATen native"


def discover(device: torch.device, shape: Shape, *, compile_mode: str = "auto",
             backends: list[str] | None = None, include_none: bool = True,
             tf32_default: bool = False) -> tuple[list[Candidate], list[Skipped]]:
    """Every implementation that can run on ``device``, and a reason for each that cannot.

    ``backends`` limits the BNLSTM backends (default: all of ``fused_bnlstm.ops.BACKENDS``);
    ``compile_mode`` is "on", "off" or "auto" (on when ``shape.T <= COMPILE_AUTO_MAX_T``).
    """
    from fused_bnlstm.ops import BACKENDS, backend_available

    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    kernel = lstm_kernel_name(device)
    if device.type == "cuda":
        for tf32 in (False, True):
            state = "on" if tf32 else "off"
            candidates.append(Candidate(f"lstm-tf32{state}", f"nn.LSTM ({kernel}, TF32 {state})", "lstm",
                                        tf32=tf32))
    else:
        candidates.append(Candidate("lstm", f"nn.LSTM ({kernel})", "lstm"))

    wanted = BACKENDS if backends is None else [b for b in BACKENDS if b in backends]
    normalizations = ("frame", None) if include_none else ("frame",)
    for name in wanted:
        ok, reason = backend_available(name, device)
        if ok and name == "triton" and device.type == "cpu":
            ok, reason = False, "runs on CPU only under the Triton interpreter (numpy), far too slow to time"
        if not ok:
            skipped.append(Skipped(f"BNLSTM {name}", reason))
            continue
        for norm in normalizations:
            key = f"bnlstm-{name}-{'none' if norm is None else norm}"
            candidates.append(Candidate(key, f"BNLSTM {name}", "bnlstm", backend=name, normalization=norm,
                                        tf32=tf32_default if device.type == "cuda" else None))

    label = "torch.compile(BNLSTM reference)"
    if compile_mode == "off":
        skipped.append(Skipped(label, "--compile off"))
    elif compile_mode == "auto" and shape.T > COMPILE_AUTO_MAX_T:
        skipped.append(Skipped(label, (
            f"T={shape.T} > {COMPILE_AUTO_MAX_T}: compile unrolls the T-step loop and takes minutes per mode "
            "(~70-95 s at T=50 on 2 CPU cores); --compile on includes it")))
    elif "reference" not in wanted:
        skipped.append(Skipped(label, "the reference backend was not selected"))
    else:
        candidates.append(Candidate("compile-reference-frame", label, "compile", backend="reference",
                                    normalization="frame",
                                    tf32=tf32_default if device.type == "cuda" else None))
    return candidates, skipped


def _bnlstm(candidate: Candidate, shape: Shape, device, dtype) -> nn.Module:
    from fused_bnlstm import BNLSTM

    return BNLSTM(shape.I, shape.H, normalization=candidate.normalization, backend=candidate.backend,
                  device=device, dtype=dtype)


def build_module(candidate: Candidate, shape: Shape, device, dtype) -> nn.Module:
    """A fresh module for ``candidate``: the same seeded weights for every candidate (nn.LSTM loads the
    BNLSTM's ``weight_*``/``bias_*``, which share nn.LSTM's names and layouts). Built in float32 and then
    cast, since the orthogonal initialization (a QR) has no float16/bfloat16 kernel."""
    torch.manual_seed(0)
    if candidate.kind == "lstm":
        source = _bnlstm(Candidate("", "", "bnlstm", backend="reference", normalization=None), shape,
                         device, torch.float32)
        lstm = nn.LSTM(shape.I, shape.H, device=device)
        lstm.load_state_dict(source.state_dict())
        return lstm.to(dtype)
    module = _bnlstm(candidate, shape, device, torch.float32).to(dtype)
    if candidate.kind == "compile":
        return torch.compile(module, dynamic=False)
    return module


@contextlib.contextmanager
def _environment(**variables: str):
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


class Runner:
    """One candidate, one shape, one mode: ``before()`` untimed, ``__call__()`` timed."""

    def __init__(self, candidate: Candidate, shape: Shape, mode: str, device: torch.device,
                 dtype: torch.dtype = torch.float32, module: nn.Module | None = None):
        self.candidate, self.shape, self.mode, self.device = candidate, shape, mode, device
        self.module = module if module is not None else build_module(candidate, shape, device, dtype)
        generator = torch.Generator().manual_seed(1)
        # Random data, never zeros; the same for every candidate.
        self.x = torch.randn(shape.T, shape.B, shape.I, generator=generator, dtype=dtype).to(device)
        self.grad_out = torch.randn(shape.T, shape.B, shape.H, generator=generator, dtype=dtype).to(device)
        if mode == "forward+backward":
            # A layer inside a network needs dx: every candidate computes it.
            self.x.requires_grad_(True)
        self.module.train(mode != "eval-forward")
        self.parameters = list(self.module.parameters())

    def before(self) -> None:
        for p in self.parameters:
            p.grad = None
        self.x.grad = None
        if self.device.type == "cuda" and self.candidate.tf32 is not None:
            _set_tf32(self.candidate.tf32)

    def __call__(self) -> None:
        if self.mode == "eval-forward":
            with torch.inference_mode():
                self.module(self.x)
        elif self.mode == "forward-train":
            self.module(self.x)
        else:
            output = self.module(self.x)[0]
            output.backward(self.grad_out)

    def release_caches(self) -> None:
        """Empty what a backend keeps between calls (the cpp backend's workspace), so that a memory
        measurement sees the call allocate it instead of finding it already resident."""
        if self.candidate.backend == "cpp":
            from fused_bnlstm.ops import fused_cpp

            if hasattr(fused_cpp, "empty_cache"):
                fused_cpp.empty_cache()

    def uncached(self) -> contextlib.AbstractContextManager:
        """A context in which the backend allocates every buffer through torch's allocator, so the
        profiler's memory events see it: the cpp backend's workspace cache hands out its large blocks from
        aligned_alloc and is switched off by FUSED_BNLSTM_CPU_CACHE=0 (read on every allocation)."""
        if self.candidate.backend != "cpp":
            return contextlib.nullcontext()
        return _environment(FUSED_BNLSTM_CPU_CACHE="0")

    def check_finite(self) -> str | None:
        """One untimed call that keeps its results: None when the output (and, in forward+backward, the
        input and weight gradients) are finite, else what was not. A row that computes NaN is not timed."""
        self.before()
        if self.mode == "eval-forward":
            with torch.inference_mode():
                output = self.module(self.x)[0]
        else:
            output = self.module(self.x)[0]
            if self.mode == "forward+backward":
                output.backward(self.grad_out)
        checked = {"output": output}
        if self.mode == "forward+backward":
            checked["dx"] = self.x.grad
            checked.update({f"d{name}": p.grad for name, p in self.module.named_parameters()})
        bad = [name for name, value in checked.items()
               if value is None or not bool(torch.isfinite(value).all())]
        return None if not bad else "non-finite or missing: " + ", ".join(bad)

    def call_synchronized(self) -> None:
        """One call that returns only when the device is done (for wall-clock timers: pytest-benchmark)."""
        self()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
