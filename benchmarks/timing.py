"""Clocks, warm-up, interleaved repeats, peak memory and which kernels a call ran: the one timer of the
benchmark, for CPU and GPU alike.

CPU: ``time.perf_counter`` (monotonic) around one call, and beside it the process's CPU time
(``time.process_time``: every thread of this process, so with one thread it is what the call computed, which
other processes on a shared machine disturb much less than the wall clock; OpenMP threads spinning between
parallel regions count too). GPU: a CUDA event pair around one call, with the
device synchronized before the first event (so earlier work never overlaps) and after the last (so the
elapsed time is read only when both have completed); events measure device time, and because the queue is
empty at the start event, the launch gaps of a per-step kernel loop count too, as they should.

Repeats are interleaved across candidates (round r times every candidate once, in a rotating order), so a
slow spell on a shared machine hits every candidate alike instead of one.

Peak memory, measured in extra untimed calls per candidate after timing:
- GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
  before the call (parameters and inputs excluded): the caching allocator's peak over the call.
- CPU, ``peak_mem_mib``: the same quantity for torch's CPU allocator, from the profiler's memory events
  (``profile_memory=True``: every tensor allocation and free in order, summed, the peak taken). Exact for
  tensors and deterministic; blind to memory a library mallocs on its own. The profiler slows that call
  down (up to ~5x for the reference's many small ops), which does not matter for memory.
- CPU, ``peak_rss_mib``: what the OS saw: resident set size sampled every ~0.2 ms by a separate sampler
  process during another call (a thread would need the GIL, which a C++ op may hold throughout), peak
  minus the RSS before it, after ``malloc_trim(0)`` has handed freed heap back to the OS. An estimate:
  pages allocated but never touched do not count, and a peak shorter than the interval, or one while the
  sampler is descheduled on a busy machine, can be missed.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import subprocess
import sys
import time
from typing import Callable, NamedTuple, Sequence

import torch


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# Runs in a separate process (``python -I -S -c``), so sampling never waits for this process's GIL, which
# a C++ op may hold for its whole call. Prints "ready", samples /proc/<pid>/statm (resident pages) every
# ~0.2 ms until its stdin closes, then prints the peak in bytes.
_SAMPLER = """
import os, select, sys
path = '/proc/%s/statm' % sys.argv[1]
page = os.sysconf('SC_PAGE_SIZE')
fd = os.open(path, os.O_RDONLY)
def rss():
    return int(os.pread(fd, 128, 0).split()[1]) * page
peak = rss()
sys.stdout.write('ready\\n'); sys.stdout.flush()
while True:
    peak = max(peak, rss())
    if select.select([sys.stdin], [], [], 0.0002)[0]:
        break
peak = max(peak, rss())
sys.stdout.write('%d\\n' % peak); sys.stdout.flush()
"""


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_allocator_peak(call: Callable[[], None]) -> int | None:
    """Peak of the bytes allocated (minus freed) through torch's CPU allocator over one call, from the
    profiler's memory events: the CPU counterpart of the CUDA allocator's peak. None if unavailable."""
    from torch.profiler import ProfilerActivity, profile

    try:
        # kineto logs two lines to the C-level stderr per profile; keep them out of the progress bar
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except (AttributeError, RuntimeError):
        return None
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _rss_peak(call: Callable[[], None]) -> int | None:
    """Peak resident set size over one call minus the RSS before it, sampled from another process."""
    if not os.path.exists("/proc/self/statm"):
        return None
    _malloc_trim()
    sampler = subprocess.Popen([sys.executable, "-I", "-S", "-c", _SAMPLER, str(os.getpid())],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if sampler.stdout.readline().strip() != "ready":
            return None
        base = _rss_bytes()
        call()
    finally:
        sampler.stdin.close()
        output = sampler.stdout.read().strip()
        sampler.wait()
    return max(0, int(output) - base) if output.isdigit() else None


def measure_memory(before: Callable[[], None], call: Callable[[], None], device: torch.device,
                   release: Callable[[], None] = lambda: None,
                   uncached: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict:
    """Peak memory of one call beyond what was allocated before it (see the module docstring), in MiB:
    ``peak_mem_mib`` (the allocator's peak: CUDA caching allocator, or torch's CPU allocator through the
    profiler), ``mem_method``, and on CPU ``peak_rss_mib`` (what the OS saw, sampled). ``release`` empties
    caches a backend keeps between calls before each measured call, and ``uncached`` is a context in which
    the backend allocates everything through torch's allocator (for the profiler's count), so the call's
    own need is counted."""
    mib = float(2**20)
    before()
    release()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return {"peak_mem_mib": peak / mib, "mem_method": "cuda-allocator-peak", "peak_rss_mib": None}
    with uncached():
        peak = _cpu_allocator_peak(call)
    before()
    release()
    gc.collect()
    rss = _rss_peak(call)
    return {
        "peak_mem_mib": None if peak is None else peak / mib,
        "mem_method": None if peak is None else "cpu-allocator-peak (torch.profiler memory events)",
        "peak_rss_mib": None if rss is None else rss / mib,
    }


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


class Sample(NamedTuple):
    wall_s: float  # CUDA events on GPU, perf_counter on CPU
    cpu_s: float | None  # CPU: process CPU time over the call; GPU: None


def time_one(before: Callable[[], None], call: Callable[[], None], device: torch.device) -> Sample:
    """One call's time (``before`` runs outside the timed region)."""
    before()
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize(device)
        return Sample(start.elapsed_time(end) / 1e3, None)
    cpu_begin, begin = time.process_time(), time.perf_counter()
    call()
    wall = time.perf_counter() - begin
    return Sample(wall, time.process_time() - cpu_begin)


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
        times.append(time_one(before, call, device).wall_s)
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
                      tick: Callable[[], None] = lambda: None, *, every: Sequence[int] | None = None,
                      deadline: float | None = None) -> list[list[Sample] | BaseException]:
    """``repeats`` timed calls of every runner, round-robin in a rotating order; a runner that raises is
    reported by its exception and not called again.

    ``every[i] = k`` times runner i only in every k-th round (a slow reference among fast kernels);
    ``deadline`` (``time.monotonic()``) ends the rounds early once passed, after at least one."""
    times: list[list[Sample] | BaseException] = [[] for _ in runners]
    every = every or [1] * len(runners)
    for round_index in range(repeats):
        if deadline is not None and round_index > 0 and time.monotonic() > deadline:
            break
        count = len(runners)
        for offset in range(count):
            index = (round_index + offset) % count
            if isinstance(times[index], BaseException) or round_index % every[index]:
                tick()
                continue
            runner = runners[index]
            try:
                times[index].append(time_one(runner.before, runner, device))
            except Exception as error:  # noqa: BLE001 (reported in the records)
                times[index] = error
            tick()
    return times


def _self_time(event, device_type: str) -> float:
    if device_type == "cuda":
        value = getattr(event, "self_device_time_total", None)
        return value if value is not None else getattr(event, "self_cuda_time_total", 0.0)
    return event.self_cpu_time_total


def kernels_of(before: Callable[[], None], call: Callable[[], None], device: torch.device,
               top: int = 4) -> list[dict]:
    """What one call ran, from ``torch.profiler``: on CUDA the device kernels, on CPU the operators, the
    ``top`` by self time, as ``{"name", "share"}`` (share of the call's total self time). On CUDA the
    names say which cuDNN algorithm and which math (TF32, bf16 tensor cores or fp32 FMA) a row used."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    before()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with _quiet_stderr(), profile(activities=activities) as prof:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wanted = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == wanted and _self_time(e, device.type) > 0]
    total = sum(_self_time(e, device.type) for e in events) or 1.0
    events.sort(key=lambda e: _self_time(e, device.type), reverse=True)
    return [{"name": e.key, "share": round(_self_time(e, device.type) / total, 3)} for e in events[:top]]
