"""What the benchmark compares, found at run time, and how one call of each is made.

A ``Candidate`` is one implementation at one precision: ``torch.nn.LSTM`` (oneDNN on CPU, cuDNN on GPU),
every ``BNLSTM`` backend that ``fused_bnlstm.ops.backend_available`` allows on the device (each variant of
a backend that has several, see ``VARIANTS``), each with frame-wise normalization and with
``normalization=None``, and ``torch.compile`` of the reference module. nn.LSTM and the fused backends run at
every precision asked for (``shapes.PRECISIONS``); the reference and torch.compile at the first only.
A ``Runner`` binds a candidate to a shape and a mode: ``before()`` runs outside the timed region
(gradients to None, TF32 switches), ``__call__()`` is exactly what is timed.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from benchmarks.shapes import PRECISIONS, Precision, Shape

# torch.compile unrolls the reference's T-step Python loop into one graph; compile time grows with T
# (on the 2-core CPU: ~40 s for forward+backward at T=10, ~70-95 s per mode at T=50).
COMPILE_AUTO_MAX_T = 16


def _always(device: torch.device) -> tuple[bool, str]:
    return True, ""


def module_accepts(option: str) -> Callable[[torch.device], tuple[bool, str]]:
    """An ``available`` test for a variant that needs a ``BNLSTM`` keyword argument this checkout may lack."""
    def available(device: torch.device) -> tuple[bool, str]:
        from fused_bnlstm import BNLSTM

        if option in inspect.signature(BNLSTM.__init__).parameters:
            return True, ""
        return False, f"BNLSTM has no {option!r} argument in this checkout"
    return available


@dataclass(frozen=True)
class Variant:
    """One way of running a backend, timed as its own row: the ``BNLSTM`` keyword arguments and environment
    variables that select it. ``environment`` is set around each call (a few microseconds)."""

    name: str  # in keys and on the command line: "step"
    label: str  # in the table: "per-step launches"
    module_options: tuple[tuple[str, object], ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    available: Callable[[torch.device], tuple[bool, str]] = _always


def triton_switch(attribute: str, cuda_only: bool = False) -> Callable[[torch.device], tuple[bool, str]]:
    """An ``available`` test for a Triton variant selected by the environment variable whose name
    ``fused_bnlstm.ops.fused_triton.<attribute>`` holds (a checkout without it has no such variant)."""
    def available(device: torch.device) -> tuple[bool, str]:
        from fused_bnlstm.ops import fused_triton

        if not hasattr(fused_triton, attribute):
            return False, f"fused_triton has no {attribute} (no such switch in this checkout)"
        if cuda_only and device.type != "cuda":
            return False, f"a CUDA feature; nothing to time on {device.type}"
        return True, ""
    return available


_VARIANT_ENV, _GRAPHS_ENV = "FUSED_BNLSTM_TRITON_VARIANT", "FUSED_BNLSTM_TRITON_GRAPHS"

# backend -> its variants, each timed as a row; a backend not listed runs as it is (one row). A new
# variant is one entry (its switch: environment variables or BNLSTM keyword arguments), and
# ``--triton-variants`` picks among them by name. The Triton ones are fused_triton's VARIANT_ENV and
# GRAPHS_ENV settings; "auto", the default, is one of them by shape and is not timed twice.
VARIANTS: dict[str, tuple[Variant, ...]] = {
    "triton": (
        Variant("step", "per-step launches", environment=((_VARIANT_ENV, "step"), (_GRAPHS_ENV, "0"))),
        Variant("step-graph", "per-step, CUDA graph replay", environment=((_VARIANT_ENV, "step"), (_GRAPHS_ENV, "1")),
                available=triton_switch("GRAPHS_ENV", cuda_only=True)),
        Variant("persistent", "persistent kernels", environment=((_VARIANT_ENV, "persistent"),),
                available=triton_switch("VARIANT_ENV")),
    ),
}


@dataclass(frozen=True)
class Candidate:
    key: str  # unique, file- and id-safe: "bnlstm-reference-frame-fp32"
    label: str  # shown in the table: "BNLSTM reference"
    kind: str  # "lstm" | "bnlstm" | "compile"
    backend: str | None = None  # BNLSTM backend ("reference", "triton", "cpp")
    normalization: str | None = None  # "frame" or None
    precision: Precision = PRECISIONS["fp32"]
    variant: Variant | None = None
    auto_pick: bool = False  # the variant the backend's own heuristic runs at this shape, device and precision

    @property
    def norm_label(self) -> str:
        return "none" if self.normalization is None else self.normalization

    @property
    def tf32(self) -> bool | None:
        """The TF32 switches this row runs with on CUDA (the matmul one; see ``Precision``)."""
        return self.precision.tf32_matmul if self.precision.dtype == torch.float32 else None


@dataclass(frozen=True)
class Skipped:
    label: str
    reason: str


def lstm_kernel_name(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Which kernel nn.LSTM dispatches to on ``device`` in training, read off its autograd graph."""
    lstm = nn.LSTM(3, 4).to(device=device, dtype=dtype)
    out = lstm(torch.randn(2, 2, 3, device=device, dtype=dtype))[0]
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


def resolve_precisions(names: list[str], device: torch.device) -> tuple[list[Precision], list[Skipped]]:
    """The precisions by name, in order, and a note for each that means nothing on ``device`` (a TF32
    switch off CUDA), so that one command line serves both CPU and GPU; ValueError for an unknown name."""
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision {unknown[0]!r}; expected one of {sorted(PRECISIONS)}")
    chosen, skipped = [], []
    for name in dict.fromkeys(names):
        precision = PRECISIONS[name]
        if precision.cuda_only and device.type != "cuda":
            skipped.append(Skipped(f"precision {name}", f"sets CUDA's TF32 switches; nothing to time on "
                                   f"{device.type} (fp32 is the same computation)"))
        else:
            chosen.append(precision)
    return chosen, skipped


def _variants(backend: str, device: torch.device, wanted: list[str] | None,
              skipped: list[Skipped]) -> list[Variant | None]:
    """The variants of ``backend`` to time (``[None]`` for a backend without variants)."""
    registered = VARIANTS.get(backend)
    if not registered:
        return [None]
    if wanted is not None:
        known = {v.name for v in registered}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise ValueError(f"unknown {backend} variant {unknown[0]!r}; registered: {sorted(known)}")
    chosen = []
    for variant in registered:
        if wanted is not None and variant.name not in wanted:
            continue
        ok, reason = variant.available(device)
        if ok:
            chosen.append(variant)
        else:
            skipped.append(Skipped(f"BNLSTM {backend} ({variant.label})", reason))
    return chosen


def _backend_rows(name: str, device: torch.device, backends: list[str] | None) -> tuple[bool, str]:
    """Whether backend ``name`` is timed on ``device`` (and why not)."""
    from fused_bnlstm.ops import backend_available

    ok, reason = backend_available(name, device)
    if ok and name == "triton" and device.type == "cpu" and (backends is None or name not in backends):
        # the interpreter (numpy) is far too slow to time; asked for by name, it proves the CLI on CPU
        ok, reason = False, ("runs on CPU only under the Triton interpreter (numpy), far too slow to time; "
                             "--backends triton with TRITON_INTERPRET=1 runs it anyway (smoke tests)")
    return ok, reason


def auto_variant(backend: str, device: torch.device, shape: Shape, precision: Precision) -> str | None:
    """The ``VARIANTS`` name a backend runs by default (its switches unset) at this shape: for Triton,
    ``fused_triton.variant``'s heuristic, and graph replay where it is on by default (CUDA)."""
    if backend != "triton":
        return None
    from fused_bnlstm.ops import fused_triton

    with _environment(**{fused_triton.VARIANT_ENV: None, fused_triton.GRAPHS_ENV: None}):
        kernels = fused_triton.variant(shape.B, shape.H, precision.dtype, device)
        graphs = fused_triton._graphs_enabled(device)
    return "persistent" if kernels == "persistent" else "step-graph" if graphs else "step"


def discover(device: torch.device, shape: Shape, *, compile_mode: str = "auto",
             backends: list[str] | None = None, include_none: bool = True,
             precisions: list[Precision] | None = None, triton_variants: list[str] | None = None,
             ) -> tuple[list[Candidate], list[Skipped]]:
    """Every implementation that can run on ``device``, and a reason for each that cannot.

    ``backends`` limits the BNLSTM backends (default: all of ``fused_bnlstm.ops.BACKENDS``);
    ``compile_mode`` is "on", "off" or "auto" (on when ``shape.T <= COMPILE_AUTO_MAX_T``); ``precisions``
    defaults to fp32; ``triton_variants`` limits the Triton variants by name (default: every registered one).
    """
    from fused_bnlstm.ops import BACKENDS

    precisions = precisions or [PRECISIONS["fp32"]]
    first = precisions[0]
    candidates: list[Candidate] = []
    skipped: list[Skipped] = []
    for precision in precisions:
        kernel = lstm_kernel_name(device, precision.dtype)
        candidates.append(Candidate(f"lstm-{precision.name}", f"nn.LSTM ({kernel})", "lstm",
                                    precision=precision))

    wanted = BACKENDS if backends is None else [b for b in BACKENDS if b in backends]
    normalizations = ("frame", None) if include_none else ("frame",)
    for name in wanted:
        ok, reason = _backend_rows(name, device, backends)
        if not ok:
            skipped.append(Skipped(f"BNLSTM {name}", reason))
            continue
        for variant in _variants(name, device, triton_variants if name == "triton" else None, skipped):
            label = f"BNLSTM {name}" + (f" ({variant.label})" if variant else "")
            for precision in precisions if name != "reference" else [first]:
                for norm in normalizations:
                    key = "-".join(["bnlstm", name] + ([variant.name] if variant else [])
                                   + ["none" if norm is None else norm, precision.name])
                    picked = variant is not None and variant.name == auto_variant(name, device, shape, precision)
                    candidates.append(Candidate(key, label, "bnlstm", backend=name, normalization=norm,
                                                precision=precision, variant=variant, auto_pick=picked))

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
        candidates.append(Candidate(f"compile-reference-frame-{first.name}", label, "compile",
                                    backend="reference", normalization="frame", precision=first))
    return candidates, skipped


def _bnlstm(candidate: Candidate, shape: Shape, device, dtype) -> nn.Module:
    from fused_bnlstm import BNLSTM

    options = dict(candidate.variant.module_options) if candidate.variant else {}
    # max_length=T: every step its own statistics, as the paper trains s-MNIST (T_max = 784)
    return BNLSTM(shape.I, shape.H, normalization=candidate.normalization, backend=candidate.backend,
                  max_length=shape.T, device=device, dtype=dtype, **options)


def build_module(candidate: Candidate, shape: Shape, device) -> nn.Module:
    """A fresh module for ``candidate``: the same seeded weights for every candidate (nn.LSTM loads the
    BNLSTM's ``weight_*``/``bias_*``, which share nn.LSTM's names and layouts). Built in float32 and then
    cast to the candidate's dtype, since the orthogonal initialization (a QR) has no float16/bfloat16 kernel."""
    torch.manual_seed(0)
    dtype = candidate.precision.dtype
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


def _set_environ(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def _environment(**variables: str | None):
    """Environment variables set (None: unset) for the block, then restored."""
    saved = {name: os.environ.get(name) for name in variables}
    for name, value in variables.items():
        _set_environ(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            _set_environ(name, value)


def set_precision_switches(precision: Precision) -> None:
    """torch's CUDA TF32 switches as ``precision`` wants them (they are process-wide: set before each call)."""
    torch.backends.cuda.matmul.allow_tf32 = precision.tf32_matmul
    torch.backends.cudnn.allow_tf32 = precision.tf32_cudnn


class Runner:
    """One candidate, one shape, one mode: ``before()`` untimed, ``__call__()`` timed."""

    def __init__(self, candidate: Candidate, shape: Shape, mode: str, device: torch.device,
                 module: nn.Module | None = None):
        self.candidate, self.shape, self.mode, self.device = candidate, shape, mode, device
        self.module = module if module is not None else build_module(candidate, shape, device)
        dtype = candidate.precision.dtype
        generator = torch.Generator().manual_seed(1)
        # Random data, never zeros; the same for every candidate.
        self.x = torch.randn(shape.T, shape.B, shape.I, generator=generator, dtype=dtype).to(device)
        self.grad_out = torch.randn(shape.T, shape.B, shape.H, generator=generator, dtype=dtype).to(device)
        if mode == "forward+backward":
            # A layer inside a network needs dx: every candidate computes it.
            self.x.requires_grad_(True)
        self.module.train(mode != "eval-forward")
        self.parameters = list(self.module.parameters())
        self.variant = candidate.variant

    def _variant_scope(self) -> contextlib.AbstractContextManager:
        """The row's variant switched on around a call (its environment variables)."""
        if self.variant is None or not self.variant.environment:
            return contextlib.nullcontext()
        return _environment(**dict(self.variant.environment))

    def before(self) -> None:
        for p in self.parameters:
            p.grad = None
        self.x.grad = None
        if self.device.type == "cuda":
            set_precision_switches(self.candidate.precision)

    def __call__(self) -> None:
        with self._variant_scope():
            self._call()

    def _call(self) -> None:
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
        with self._variant_scope():
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
