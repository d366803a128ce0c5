"""Problem shapes, presets and modes of the benchmark."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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


# The paper's tasks (Cooijmans et al. 2017, section 5), a generic shape, and a CPU-sized default that
# finishes in about two minutes on two cores with the reference and nn.LSTM (compile skipped, see cli).
PRESETS: dict[str, Preset] = {
    "cpu": Preset(Shape(T=64, B=32, I=64, H=128), 10, 50, "CPU-sized default"),
    "smnist": Preset(Shape(T=784, B=64, I=1, H=100), 5, 20, "sequential MNIST, pixel by pixel"),
    "charptb": Preset(Shape(T=100, B=64, I=50, H=1000), 5, 20, "character-level Penn Treebank"),
    "text8": Preset(Shape(T=180, B=128, I=27, H=2000), 3, 20, "text8 characters"),
    "generic": Preset(Shape(T=100, B=64, I=512, H=512), 5, 20, "a generic mid-sized layer"),
}

# forward-train: training-mode forward that records the autograd graph (batch statistics, running
# statistics updated); forward+backward: that plus backward of a random cotangent on the output, input
# gradient included; eval-forward: eval-mode forward (population statistics) under torch.inference_mode.
MODES = ("forward-train", "forward+backward", "eval-forward")
