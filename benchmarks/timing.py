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


def settle_cpu(max_seconds: float = 15.0) -> float:
    """Run a small multi-threaded matmul until its time per call is steady; return the seconds it took.

    Seen on the shared 2-core machine under load: for the first second or two of a process every parallel
    call takes a whole scheduler slice (~25 ms for a 256x256 matmul that takes 0.1 ms later; ~160 ms for a
    tiny LSTM), whatever it is, until the new threads get their share of the cores. Timing in that window
    measures the scheduler. This waits it out: steady means the median of the last 20 calls within 1.5x of
    the fastest call seen, after at least 0.3 s.
    """
    a = torch.randn(256, 256)
    begin = time.perf_counter()
    times: list[float] = []
    while time.perf_counter() - begin < max_seconds:
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
        if len(times) >= 20 and time.perf_counter() - begin > 0.3:
            recent = sorted(times[-20:])[10]
            if recent <= 1.5 * min(times):
                break
    return time.perf_counter() - begin


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


def warm_up(before, call, device, min_calls: int, *, max_calls: int = 30, max_seconds: float = 10.0,
            settle: float = 1.25, tick: Callable[[int], None] = lambda index: None) -> tuple[float, int]:
    """Untimed calls until the time per call has settled; returns (first call's seconds, calls made).

    A count alone is not enough: oneDNN JIT-compiles its kernels over the first calls (~0.2-0.35 s each
    on this CPU even for a tiny LSTM), torch.compile compiles and may recompile on the second call, and
    Triton autotunes. So: at least ``min_calls``, then until two consecutive calls agree within
    ``settle`` x, at most ``max_calls`` calls or ``max_seconds`` after the first call. ``min_calls=0``
    skips warm-up altogether (smoke tests only).
    """
    if min_calls <= 0:
        return 0.0, 0
    times: list[float] = []
    first_done = 0.0
    while len(times) < max_calls:
        times.append(time_one(before, call, device))
        tick(len(times) - 1)
        if len(times) == 1:
            first_done = time.perf_counter()
        if len(times) >= max(min_calls, 2):
            last, previous = times[-1], times[-2]
            if last <= settle * previous and previous <= settle * last:
                break
        if len(times) >= min_calls and time.perf_counter() - first_done > max_seconds:
            break
    return (times[0] if times else 0.0), len(times)


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
