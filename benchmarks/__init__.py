"""Speed and memory benchmark of BNLSTM against torch.nn.LSTM, the reference and torch.compile.

``python -m benchmarks`` runs it (see ``benchmarks/README.md``); ``pytest benchmarks/`` runs the
pytest-benchmark version at small shapes. Neither is part of the pass/fail suite.

- ``shapes``: the presets (the paper's tasks, a generic shape, a CPU-sized default).
- ``candidates``: what is compared, discovered at run time (every backend ``backend_available`` allows).
- ``timing``: warm-up, interleaved repeats, the clocks (perf_counter on CPU, CUDA events on GPU), memory.
- ``machine``: the record of where and when it ran.
- ``report``: the table, the JSON and CSV records and the PNG chart.
- ``cli``: the command line.
"""

from benchmarks.candidates import Candidate, Runner, discover
from benchmarks.shapes import MODES, PRESETS, Shape

__all__ = ["Candidate", "MODES", "PRESETS", "Runner", "Shape", "discover"]
