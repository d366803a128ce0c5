"""pytest-benchmark options for ``pytest benchmarks/`` (never part of the pass/fail suite: pytest.ini's
testpaths is tests/ only)."""

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("fused_bnlstm benchmarks")
    group.addoption("--bench-compile", action="store_true", default=False,
                    help="also time torch.compile of the reference (compiles for minutes)")
    group.addoption("--bench-rounds", type=int, default=10, help="timed rounds per benchmark (default 10)")


@pytest.fixture(scope="session", autouse=True)
def _settled_cpu():
    """Wait out a new process's first scheduler-bound second before anything is timed (see timing.py)."""
    import torch

    from benchmarks.timing import settle_cpu

    if not torch.cuda.is_available():
        settle_cpu()
