"""pytest-benchmark version of ``python -m benchmarks`` at small shapes, run on request:

    pytest benchmarks/                       # every available backend, nn.LSTM, the reference
    pytest benchmarks/ --bench-compile       # plus torch.compile of the reference (slow to compile)
    pytest benchmarks/ --benchmark-group-by=group --benchmark-sort=mean

Benchmarks are grouped by mode and shape, so pytest-benchmark's table compares the implementations side by
side. pytest-benchmark reads a wall clock; on CUDA every timed call synchronizes the device before it
returns. A timing never fails a test: these only fail when an implementation raises.
"""

import pytest
import torch

from benchmarks.candidates import Runner, discover
from benchmarks.shapes import MODES, PYTEST_SHAPES as SHAPES
from benchmarks.timing import warm_up

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "candidate" not in metafunc.fixturenames:
        return
    compile_mode = "on" if metafunc.config.getoption("--bench-compile") else "off"
    params = []
    for shape_id, shape in SHAPES.items():
        candidates, _ = discover(DEVICE, shape, compile_mode=compile_mode)
        for candidate in candidates:
            for mode in MODES:
                params.append(pytest.param(candidate, shape, mode, id=f"{mode}-{shape_id}-{candidate.key}"))
    metafunc.parametrize(("candidate", "shape", "mode"), params)


def test_bnlstm_speed(benchmark, request, candidate, shape, mode):
    runner = Runner(candidate, shape, mode, DEVICE)
    benchmark.group = f"{mode} {shape} {DEVICE.type}"
    benchmark.extra_info.update(implementation=candidate.label, normalization=candidate.norm_label,
                                threads=torch.get_num_threads(), **shape.as_dict())
    # Warm up until the time per call settles (oneDNN JIT, compilation), then time.
    warm_up(runner.before, runner, DEVICE, 2)
    benchmark.pedantic(runner.call_synchronized, setup=runner.before,
                       rounds=request.config.getoption("--bench-rounds"), warmup_rounds=0)
