"""The record of where and when a benchmark ran: machine, threads, versions, TF32, date, commit."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import subprocess

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# the /proc/cpuinfo flags that decide which kernels oneDNN and the cpp extension pick
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16")


def cpu_flags() -> list[str]:
    """Which of ``ISA_FLAGS`` the CPU reports (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in ISA_FLAGS if flag in present]
    except OSError:
        pass
    return []


def cpp_kernels() -> dict:
    """The ISA the cpp extension's kernels run with on this CPU (``kernel_isa()``: the same build picks
    different kernels on different CPUs), whether its GEMMs use oneDNN's brgemm (``uses_brgemm()``) and
    which path its all-step GEMMs take (``gemm_backend()``: "brgemm" or "mm", where exposed); read from
    ``fused_bnlstm.ops.fused_cpp`` if it exposes them, else from ``fused_bnlstm._C``. ``isa`` is None, with
    ``error`` saying why, when neither can be read."""
    sources = []
    try:
        from fused_bnlstm.ops import fused_cpp

        sources += [fused_cpp, getattr(fused_cpp, "_C", None)]
    except ImportError:
        pass
    try:
        from fused_bnlstm import _C

        sources.append(_C)
    except ImportError as error:
        reason = f"fused_bnlstm._C not importable ({error})"
    else:
        reason = "no kernel_isa() in fused_bnlstm.ops.fused_cpp or fused_bnlstm._C"
    for source in sources:
        if source is not None and callable(getattr(source, "kernel_isa", None)):
            brgemm = getattr(source, "uses_brgemm", None)
            gemm = getattr(source, "gemm_backend", None)
            return {"isa": str(source.kernel_isa()), "brgemm": bool(brgemm()) if callable(brgemm) else None,
                    "gemm": str(gemm()) if callable(gemm) else None, "error": None}
    return {"isa": None, "brgemm": None, "gemm": None, "error": reason}


def load_average() -> tuple[float, float, float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS has none)."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_commit() -> str:
    """HEAD's short hash, with ``+dirty`` when tracked files differ from it; "unknown" outside git."""
    commit = _git("rev-parse", "--short=12", "HEAD")
    if commit is None:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if dirty else "")


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def extension_build() -> dict | None:
    """The compiled extension the "cpp" rows ran: its file, build time and a hash. The commit alone does not
    say this, since the extension is built at install time and may predate the checkout's sources."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("fused_bnlstm._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return None
    with open(spec.origin, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()[:12]
    built = datetime.datetime.fromtimestamp(os.path.getmtime(spec.origin), datetime.timezone.utc)
    return {"file": os.path.relpath(spec.origin, REPO_ROOT), "built": built.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "sha256_12": digest}


def _aten_capability() -> str | None:
    """The vector ISA ATen's own CPU kernels dispatch to (AVX2, AVX512, ...)."""
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return get() if callable(get) else None


def machine_record(device: torch.device) -> dict:
    """Everything a reader needs to compare two records."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device_type": device.type,
        "device_name": _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_flags": cpu_flags(),
        "aten_cpu_capability": _aten_capability(),
        "cpp_kernels": cpp_kernels(),
        "load_average_1min": (load_average() or (None,))[0],
        "load_average": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda": torch.version.cuda,
        "cudnn": None,
        "tf32_matmul": None,
        "tf32_cudnn": None,
        "extension": extension_build(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        record.update(
            device_name=torch.cuda.get_device_name(index),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_sms=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return record
