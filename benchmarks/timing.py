"""Clocks, warm-up, interleaved repeats and peak memory.

CPU: ``time.perf_counter`` (monotonic) around one call. GPU: a CUDA event pair around one call, with the
device synchronized before the first event (so earlier work never overlaps) and after the last (so the
elapsed time is read only when both have completed); events measure device time, and because the queue is
empty at the start event, the launch gaps of a per-step kernel loop count too, as they should.

Repeats are interleaved across candidates (round r times every candidate once, in a rotating order), so a
slow spell on a shared machine hits every candidate alike instead of one.

Peak memory, measured in one extra untimed call per candidate after timing:
- GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
  before the call (parameters and inputs excluded): the allocator's peak over the call.
- CPU: resident set size sampled every ~0.5 ms by a thread during the call, peak minus the RSS before it,
  after ``malloc_trim(0)`` has handed freed heap back to the OS (otherwise a call can reuse memory an
  earlier candidate freed and look free). A sampled estimate: allocations shorter than the interval can
  be missed, and the sampler needs the GIL, which a Python loop releases only every few milliseconds.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from typing import Callable, Sequence

import torch


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes(fd: int) -> int:
    # /proc/self/statm: size resident shared text lib data dt, in pages
    return int(os.pread(fd, 128, 0).split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssSampler(threading.Thread):
    def __init__(self, fd: int, interval: float = 5e-4):
        super().__init__(daemon=True)
        self.fd, self.interval = fd, interval
        self.peak = _rss_bytes(fd)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss_bytes(self.fd))
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, _rss_bytes(self.fd))
        return self.peak


def cpu_memory_method() -> str | None:
    return "rss-sampled" if os.path.exists("/proc/self/statm") else None


def peak_memory_bytes(before: Callable[[], None], call: Callable[[], None], device: torch.device) -> int | None:
    """Peak memory one call needs beyond what was allocated before it (see the module docstring)."""
    before()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if cpu_memory_method() is None:
        return None
    _malloc_trim()
    fd = os.open("/proc/self/statm", os.O_RDONLY)
    try:
        base = _rss_bytes(fd)
        sampler = _RssSampler(fd)
        sampler.start()
        try:
            call()
        finally:
            peak = sampler.stop()
    finally:
        os.close(fd)
    return max(0, peak - base)


def time_one(before: Callable[[], None], call: Callable[[], None], device: torch.device) -> float:
    """Seconds one call takes (``before`` runs outside the timed region)."""
    before()
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    call()
    return time.perf_counter() - begin


def warm_up(before, call, device, calls: int) -> float:
    """Run ``calls`` untimed calls (module load, oneDNN primitives, autotuning, compilation); return the
    wall time of the first, which includes all of that."""
    first = 0.0
    for index in range(calls):
        begin = time.perf_counter()
        before()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index == 0:
            first = time.perf_counter() - begin
    return first


def interleaved_times(runners: Sequence, repeats: int, device: torch.device,
                      tick: Callable[[], None] = lambda: None) -> list[list[float] | BaseException]:
    """``repeats`` timed calls of every runner, round-robin in a rotating order; a runner that raises is
    reported by its exception and not called again."""
    times: list[list[float] | BaseException] = [[] for _ in runners]
    for round_index in range(repeats):
        count = len(runners)
        for offset in range(count):
            index = (round_index + offset) % count
            if isinstance(times[index], BaseException):
                tick()
                continue
            runner = runners[index]
            try:
                times[index].append(time_one(runner.before, runner, device))
            except Exception as error:  # noqa: BLE001 (reported in the records)
                times[index] = error
            tick()
    return times
