"""Problem shapes, presets, precisions and modes of the benchmark: every shape the benchmark times is here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Shape:
    """One single-layer, unidirectional problem: T steps, B sequences, I inputs, H hidden units."""

    T: int
    B: int
    I: int  # noqa: E741 (the paper's and nn.LSTM's name)
    H: int

    def __str__(self) -> str:
        return f"T={self.T} B={self.B} I={self.I} H={self.H}"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    shape: Shape
    repeats_cpu: int
    repeats_gpu: int
    description: str
    # what the design predicts on an H100 for the Triton backend (fp32, TF32 off), written before any GPU run,
    # printed under a CUDA run's tables so the first measurement is read against it
    gpu_prediction: str = ""


# The paper's tasks (Cooijmans et al. 2017, section 5), a generic shape, and a CPU-sized default that
# finishes in about two minutes on two cores with the reference and nn.LSTM (compile skipped, see cli).
PRESETS: dict[str, Preset] = {
    "default": Preset(Shape(T=64, B=32, I=64, H=128), 10, 50, "CPU-sized default"),
    "smnist": Preset(
        Shape(T=784, B=64, I=1, H=100), 5, 20, "sequential MNIST, pixel by pixel",
        gpu_prediction="each step is tiny (64x400x100 multiply-adds), so the per-step loops are launch-bound: "
        "~784 launches each way at ~10-30 us of host + device overhead, ~10-25 ms forward and ~2x that "
        "forward+backward; cuDNN's persistent kernels should win here, CUDA graphs are the lever"),
    "charptb": Preset(
        Shape(T=100, B=64, I=50, H=1000), 5, 20, "character-level Penn Treebank",
        gpu_prediction="2 * 64 * 4000 * 1000 flops per step, ~51 GFLOP forward, ~1 ms at ~50 TFLOP/s of fp32 "
        "FMA; but the grid has ceil(1000 / 16) = 63 programs on 132 SMs, so ~2 ms forward and ~3x that "
        "forward+backward (a persistent kernel or a split reduction over H would fill the chip)"),
    "text8": Preset(Shape(T=180, B=128, I=27, H=2000), 3, 20, "text8 characters"),
    "generic": Preset(
        Shape(T=100, B=64, I=512, H=512), 5, 20, "a generic mid-sized layer",
        gpu_prediction="32 programs on 132 SMs: occupancy-bound like char-PTB, a quarter of its flops per step"),
}
# older names still accepted on the command line
PRESET_ALIASES = {"cpu": "default"}

# the small shapes of the pytest-benchmark version (benchmarks/test_bench_bnlstm.py), by test id
PYTEST_SHAPES: dict[str, Shape] = {
    "T16-B8-I16-H32": Shape(T=16, B=8, I=16, H=32),
    "T50-B32-I64-H128": Shape(T=50, B=32, I=64, H=128),
}


@dataclass(frozen=True)
class Precision:
    """How a row computes: the tensors' dtype and, on CUDA, torch's TF32 switches (matmul, cuDNN) for it.

    nn.LSTM's cuDNN follows ``torch.backends.cudnn.allow_tf32``, and the Triton kernels' fp32 dots follow
    cuDNN's RNN setting (``FUSED_BNLSTM_TRITON_PRECISION=auto``). A new precision (3xTF32, autocast) is one
    more entry here."""

    name: str
    dtype: torch.dtype
    tf32_matmul: bool
    tf32_cudnn: bool
    description: str
    cuda_only: bool = False


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", torch.float32, False, False, "float32; on CUDA IEEE products (TF32 off)"),
    "tf32": Precision("tf32", torch.float32, True, True, "float32 tensors, TF32 tensor-core products",
                      cuda_only=True),
    "default": Precision("default", torch.float32, False, True, "float32 with torch's default switches "
                         "(matmul TF32 off, cuDNN TF32 on): what a user gets without asking", cuda_only=True),
    "bf16": Precision("bf16", torch.bfloat16, False, False, "bfloat16 tensors"),
    "fp16": Precision("fp16", torch.float16, False, False, "float16 tensors"),
    "fp64": Precision("fp64", torch.float64, False, False, "float64 tensors"),
}

# forward-train: training-mode forward that records the autograd graph (batch statistics, running
# statistics updated); forward+backward: that plus backward of a random cotangent on the output, input
# gradient included; eval-forward: eval-mode forward (population statistics) under torch.inference_mode.
MODES = ("forward-train", "forward+backward", "eval-forward")
