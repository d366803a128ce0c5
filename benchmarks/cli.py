"""``python -m benchmarks``: time every available BNLSTM backend against nn.LSTM, the reference and
torch.compile, side by side in one run; print a table; write JSON, CSV and a PNG chart.

One run per preset and thread count asked for. A run: settle the CPU, discover the candidates (every
implementation at every precision asked for), then per mode warm each candidate up, time them interleaved,
measure peak memory and (on CUDA) name the kernels each ran; then ratios, the record, the table."""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time
from dataclasses import dataclass

import torch

from benchmarks import report, timing
from benchmarks.candidates import COMPILE_AUTO_MAX_T, VARIANTS, Candidate, Runner, discover, resolve_precisions
from benchmarks.machine import REPO_ROOT, extension_build, load_average, machine_record
from benchmarks.shapes import MODES, PRECISIONS, PRESET_ALIASES, PRESETS, Precision, Shape

METHOD_GPU = {
    "clock": "CUDA events, device synchronized before and after",
    "memory": "torch.cuda.max_memory_allocated over one call minus allocated before",
    "kernels": "torch.profiler over one untimed call: the device kernels with the most self time; their names "
    "say which cuDNN algorithm and which math (TF32 / bf16 tensor cores, fp32 FMA) a row ran",
}
METHOD_CPU = {
    "clock": "time.perf_counter around one call; cpu_ms: time.process_time over the same call (all threads)",
    "memory": "peak_mem_mib: peak of torch CPU allocator bytes over one call (torch.profiler memory events); "
    "peak_rss_mib: peak RSS over another call (sampled every ~0.2 ms by a sampler process, after "
    "malloc_trim) minus RSS before",
    "settle": "a small parallel matmul runs until its time per call is steady before anything is timed "
    "(cpu_settle_s), since a new process's threads first wait whole scheduler slices",
    "kernels": "with --kernels on: torch.profiler over one untimed call, the operators with the most self time",
}
METHOD_COMMON = {
    "warm_up": "at least --warmup untimed calls, then until two consecutive calls agree within 1.25x "
    "(at most 30 calls or 10 s after the first); warmup_calls holds the count",
    "repeats": "interleaved across implementations, rotating order, after warm-up; --reference-every k times "
    "the reference every k-th round only; --time-budget ends the rounds early (each row's repeats says how many)",
    "spread": "IQR (p75 - p25) and min/max over the timed calls",
    "precision": "each row's dtype and CUDA TF32 switches (benchmarks/shapes.py PRECISIONS), set before every "
    "call; nn.LSTM and the fused backends at every precision asked for, the reference and torch.compile at "
    "the first",
    "compile_time": "excluded: first_call_s holds the first warm-up call, compilation included",
    "input_grad": "forward+backward computes dx too (x.requires_grad=True)",
    "finite": "after warm-up one untimed call must give a finite output (and finite dx and weight "
    "gradients in forward+backward), else the row is reported failed and not timed",
}


def parse_args(argv=None) -> argparse.Namespace:
    presets = "; ".join(f"{name}: {p.shape} ({p.description})" for name, p in PRESETS.items())
    precisions = "; ".join(f"{name}: {p.description}" for name, p in PRECISIONS.items())
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Speed and memory of BNLSTM against torch.nn.LSTM, the reference and torch.compile.",
        epilog=f"Presets: {presets}. Precisions: {precisions}. "
        "Records go to benchmarks/results/ unless --out says otherwise.",
    )
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS) + sorted(PRESET_ALIASES),
                        default=["default"], help="problem shapes and default repeats, one run each "
                        "(default: default)")
    for dim, meaning in (("T", "time steps"), ("B", "batch size"), ("I", "input size"), ("H", "hidden size")):
        parser.add_argument(f"--{dim}", type=int, help=f"{meaning}, overrides the preset's")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to time")
    parser.add_argument("--repeats", type=int, help="timed calls per implementation and mode "
                        "(default: the preset's, per device)")
    parser.add_argument("--warmup", type=int, default=2, help="at least this many untimed calls first, "
                        "then more until the time per call settles (default 2; torch.compile at least 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:index] (default: cuda when available)")
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS),
                        help="precisions to time, side by side (default: fp32 on CPU, fp32 tf32 on CUDA); "
                        "the reference runs at the first only; tf32 and default are noted and skipped off CUDA")
    parser.add_argument("--threads", type=int, nargs="+", help="torch.set_num_threads, one run each "
                        "(default: torch's choice)")
    parser.add_argument("--backends", nargs="+", help="BNLSTM backends to include (default: every one "
                        "available on the device; triton on CPU only when named here, under TRITON_INTERPRET=1)")
    parser.add_argument("--triton-variants", nargs="+", metavar="NAME",
                        help="Triton variants to time (default: every registered one: "
                        f"{', '.join(v.name for v in VARIANTS['triton'])}; see candidates.VARIANTS)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", dest="compile_mode",
                        help=f"torch.compile of the reference: auto includes it when T <= {COMPILE_AUTO_MAX_T} "
                        "(compile time grows with T: minutes per mode beyond that)")
    parser.add_argument("--no-none", action="store_true", help="leave out the normalization=None rows")
    parser.add_argument("--reference-every", type=int, default=1, metavar="K",
                        help="time the (slow) reference only every K-th round (default 1: every round)")
    parser.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                        help="name the kernels each row ran (one profiled call per row); auto: on CUDA only")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="per run: start no new row and end the timed rounds early once this many seconds "
                        "have passed (rows not reached are reported skipped), so a caller's hard timeout "
                        "still finds the records written")
    parser.add_argument("--settle-seconds", type=float, default=15.0,
                        help="CPU: at most this long waiting for the time per call to steady before timing "
                        "(default 15; 0 skips, for smoke tests)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    parser.add_argument("--out", default=f"{REPO_ROOT}/benchmarks/results", help="folder for the records")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.preset = [PRESET_ALIASES.get(name, name) for name in args.preset]
    for name in ("T", "B", "I", "H", "repeats", "reference_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.threads and min(args.threads) < 1:
        parser.error(f"--threads must be at least 1, got {min(args.threads)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    known = [v.name for v in VARIANTS["triton"]]
    unknown = [name for name in args.triton_variants or [] if name not in known]
    if unknown:
        parser.error(f"--triton-variants: unknown variant {unknown[0]!r}; registered: {', '.join(known)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
    names = args.precisions or (["fp32", "tf32"] if device.type == "cuda" else ["fp32"])
    args.precisions, args.precision_skips = resolve_precisions(names, device)
    if not args.precisions:
        parser.error(f"none of the precisions {names} can run on {device.type}")
    return args


@dataclass
class Setup:
    """What one run times: a preset (with the command line's overrides) at one thread count."""

    preset: str
    overridden: bool
    shape: Shape
    device: torch.device
    precisions: list[Precision]
    repeats: int
    threads: int | None
    deadline: float | None  # time.monotonic() after which nothing new starts

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def make_setup(args: argparse.Namespace, preset_name: str, threads: int | None) -> Setup:
    device = torch.device(args.device)
    preset = PRESETS[preset_name]
    overrides = {d: getattr(args, d) for d in ("T", "B", "I", "H") if getattr(args, d) is not None}
    repeats = args.repeats or (preset.repeats_gpu if device.type == "cuda" else preset.repeats_cpu)
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    return Setup(preset_name, bool(overrides), Shape(**{**preset.shape.as_dict(), **overrides}), device,
                 args.precisions, repeats, threads, deadline)


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        class _Silent:
            total = 0

            def update(self, n=1):
                pass

            def set_description_str(self, text):
                pass

            def close(self):
                pass
        return _Silent()
    return tqdm(total=total, unit="call", file=sys.stderr, dynamic_ncols=True, leave=False, mininterval=0.5)


def _error_text(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def _row(candidate: Candidate, mode: str, status: str = "ok", error: str | None = None) -> dict:
    return {
        "mode": mode,
        "key": candidate.key,
        "implementation": candidate.label,
        "kind": candidate.kind,
        "backend": candidate.backend,
        "variant": candidate.variant.name if candidate.variant else None,
        "auto_pick": candidate.auto_pick,
        "normalization": candidate.normalization,
        "normalization_label": candidate.norm_label if candidate.kind != "lstm" else "none",
        "precision": candidate.precision.name,
        "dtype": str(candidate.precision.dtype).replace("torch.", ""),
        "tf32": candidate.tf32,
        "status": status,
        "error": error,
        "repeats": 0,
        "peak_mem_mib": None,
        "mem_method": None,
        "peak_rss_mib": None,
        "first_call_s": None,
        "warmup_calls": None,
        "kernels": None,
    }


def _warmed_runner(candidate: Candidate, mode: str, setup: Setup, warmup: int, progress) -> tuple[Runner, tuple]:
    """A runner for ``candidate`` after its warm-up and the finiteness check; raises what went wrong."""
    progress.set_description_str(f"{mode}: {candidate.label} [{candidate.norm_label}, "
                                 f"{candidate.precision.name}] warm-up")

    def tick(index):
        # warm-up runs past the planned count until it settles: grow the bar's total to match
        if index >= warmup:
            progress.total += 1
        progress.update(1)

    runner = Runner(candidate, setup.shape, mode, setup.device)
    max_seconds = 10.0 if setup.deadline is None else min(10.0, max(0.0, setup.deadline - time.monotonic()))
    first_call = timing.warm_up(runner.before, runner, setup.device, warmup, max_seconds=max_seconds, tick=tick)
    problem = runner.check_finite()
    if problem is not None:
        raise FloatingPointError(problem)
    return runner, first_call


def _after_timing(runner: Runner, row: dict, setup: Setup, args: argparse.Namespace, progress) -> None:
    """The untimed extras of a timed row: peak memory, and the kernels it ran."""
    candidate = runner.candidate
    if not args.no_memory:
        progress.set_description_str(f"{row['mode']}: {candidate.label} [{candidate.norm_label}] memory")
        try:
            row.update(timing.measure_memory(runner.before, runner, setup.device, runner.release_caches,
                                             runner.uncached))
        except Exception as error:  # noqa: BLE001 (the times stand; the memory figure is missing)
            row["mem_method"] = f"failed: {_error_text(error)}"
        progress.update(1)
    wants_kernels = args.kernels == "on" or (args.kernels == "auto" and setup.device.type == "cuda")
    # the reference's thousands of small ops say nothing a reader needs, and profiling them takes long
    if wants_kernels and candidate.backend != "reference" and not setup.past_deadline():
        try:
            row["kernels"] = timing.kernels_of(runner.before, runner, setup.device)
        except Exception as error:  # noqa: BLE001 (a missing kernel list is not a failed row)
            row["kernels"] = [{"name": f"profiler failed: {_error_text(error)}", "share": None}]


def time_mode(mode: str, candidates: list[Candidate], setup: Setup, args: argparse.Namespace,
              progress) -> list[dict]:
    """Every candidate in one mode: warm-up each, time them interleaved, then memory and kernels."""
    rows, runners, first_calls = [], [], {}
    for candidate in candidates:
        if setup.past_deadline():
            rows.append(_row(candidate, mode, "skipped", "not reached within --time-budget"))
            continue
        warmup = max(args.warmup, 2) if candidate.kind == "compile" else args.warmup
        try:
            runner, first_calls[candidate.key] = _warmed_runner(candidate, mode, setup, warmup, progress)
            runners.append(runner)
        except Exception as error:  # noqa: BLE001 (a failure is a result: reported, not fatal)
            rows.append(_row(candidate, mode, "failed", _error_text(error)))
    progress.set_description_str(f"{mode}: timing {len(runners)} side by side")
    every = [args.reference_every if r.candidate.kind == "bnlstm" and r.candidate.backend == "reference" else 1
             for r in runners]
    measured_all = timing.interleaved_times(runners, setup.repeats, setup.device, tick=lambda: progress.update(1),
                                            every=every, deadline=setup.deadline)
    for runner, measured in zip(runners, measured_all):
        if isinstance(measured, BaseException):
            rows.append(_row(runner.candidate, mode, "failed", _error_text(measured)))
            continue
        row = _row(runner.candidate, mode)
        first_s, calls = first_calls[runner.candidate.key]
        row.update(report.summarize(measured, setup.shape), repeats=len(measured), first_call_s=first_s,
                   warmup_calls=calls)
        _after_timing(runner, row, setup, args, progress)
        rows.append(row)
    del runners
    gc.collect()
    return rows


def _config(setup: Setup, args: argparse.Namespace) -> dict:
    return {
        "preset": setup.preset if not setup.overridden else "custom",
        "base_preset": setup.preset,
        "shape": setup.shape.as_dict(),
        "precisions": [p.name for p in setup.precisions],
        "dtype": str(setup.precisions[0].dtype).replace("torch.", ""),
        "modes": list(args.modes),
        "repeats": setup.repeats,
        "warmup": args.warmup,
        "compile": args.compile_mode,
        "triton_variants": args.triton_variants,
        "reference_every": args.reference_every,
        "time_budget_s": args.time_budget,
        "layers": 1,
        "bidirectional": False,
        "command": " ".join(["python -m benchmarks"] + sys.argv[1:]),
    }


def run(args: argparse.Namespace, preset_name: str | None = None, threads: int | None = None) -> dict:
    """One run (a preset at a thread count): the record, ready for ``report``."""
    setup = make_setup(args, preset_name or args.preset[0], threads)
    if setup.threads:
        torch.set_num_threads(setup.threads)
    # the runners set the TF32 switches per row; the run leaves them as it found them
    tf32_before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    load_start = load_average()
    settle_s = (timing.settle_cpu(args.settle_seconds)
                if setup.device.type == "cpu" and args.settle_seconds > 0 else 0.0)
    candidates, skipped = discover(setup.device, setup.shape, compile_mode=args.compile_mode,
                                   backends=args.backends, include_none=not args.no_none,
                                   precisions=setup.precisions, triton_variants=args.triton_variants)
    # the extension is loaded by now: name the build on disk before a rebuild can replace it mid-run
    extension = extension_build()
    per_mode = len(candidates) * (args.warmup + setup.repeats + (0 if args.no_memory else 1))
    progress = _progress(per_mode * len(args.modes), not args.no_progress)
    results = []
    for mode in args.modes:
        results += time_mode(mode, candidates, setup, args, progress)
    progress.close()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_before

    order = {c.key: i for i, c in enumerate(candidates)}
    results.sort(key=lambda r: (MODES.index(r["mode"]), order[r["key"]]))
    report.add_ratios(results)
    machine = machine_record(setup.device)
    machine.update(load_average_1min_start=load_start[0] if load_start else None, load_average_start=load_start,
                   cpu_settle_s=settle_s, extension=extension)
    return {
        "schema": 2,
        "machine": machine,
        "config": _config(setup, args),
        "method": {**METHOD_COMMON, **(METHOD_GPU if setup.device.type == "cuda" else METHOD_CPU)},
        "results": results,
        "skipped": [{"implementation": s.label, "reason": s.reason} for s in args.precision_skips + skipped],
        "gpu_prediction": PRESETS[setup.preset].gpu_prediction if setup.device.type == "cuda" else "",
    }


def print_record(record: dict, paths: dict[str, str]) -> None:
    print(report.header_line(record))
    print(report.machine_line(record))
    print(report.format_table(record))
    warning = report.load_warning(record)
    if warning:
        print()
        print(warning)
        if record["machine"]["torch_threads"] > 1:
            print("(with every core contended, each parallel region waits for a descheduled thread: "
                  "--threads 1 gives steadier numbers there, see benchmarks/README.md)")
    if record.get("gpu_prediction"):
        print()
        print(f"predicted before any GPU run (H100, fp32, TF32 off): {record['gpu_prediction']}")
    print()
    print("ratios: time / nn.LSTM's time at the same precision, and / the reference's (same normalization, "
          "same precision where timed, else the first; nn.LSTM against the reference without "
          "normalization); above 1 is slower")
    for ext, path in paths.items():
        print(f"{ext}: {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    for preset_name in args.preset:
        for threads in args.threads or [None]:
            record = run(args, preset_name, threads)
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
            thread_tag = f"_t{threads}" if threads else ""
            stem = f"{record['config']['preset']}_{record['machine']['device_type']}{thread_tag}_{stamp}"
            # two runs in one second (a preset and its alias, or tiny shapes) must not overwrite each other
            taken = 1
            while os.path.exists(os.path.join(args.out, f"{stem}.json" if taken == 1 else f"{stem}_{taken}.json")):
                taken += 1
            stem = stem if taken == 1 else f"{stem}_{taken}"
            print_record(record, report.write_records(record, args.out, stem))
            print()
    return 0
