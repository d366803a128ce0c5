"""``python -m benchmarks``: time every available BNLSTM backend against nn.LSTM, the reference and
torch.compile, side by side in one run; print a table; write JSON, CSV and a PNG chart."""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys

import torch

from benchmarks import report, timing
from benchmarks.candidates import COMPILE_AUTO_MAX_T, Runner, discover
from benchmarks.machine import REPO_ROOT, extension_build, machine_record
from benchmarks.shapes import MODES, PRESETS, Shape

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    presets = "; ".join(f"{name}: {p.shape} ({p.description})" for name, p in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Speed and memory of BNLSTM against torch.nn.LSTM, the reference and torch.compile.",
        epilog=f"Presets: {presets}. Records go to benchmarks/results/ unless --out says otherwise.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="problem shape and default repeats (default: cpu)")
    for dim, meaning in (("T", "time steps"), ("B", "batch size"), ("I", "input size"), ("H", "hidden size")):
        parser.add_argument(f"--{dim}", type=int, help=f"{meaning}, overrides the preset's")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to time")
    parser.add_argument("--repeats", type=int, help="timed calls per implementation and mode "
                        "(default: the preset's, per device)")
    parser.add_argument("--warmup", type=int, default=2, help="at least this many untimed calls first, "
                        "then more until the time per call settles (default 2; torch.compile at least 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:index] (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--backends", nargs="+", help="BNLSTM backends to include (default: every one "
                        "available on the device)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", dest="compile_mode",
                        help=f"torch.compile of the reference: auto includes it when T <= {COMPILE_AUTO_MAX_T} "
                        "(compile time grows with T: minutes per mode beyond that)")
    parser.add_argument("--no-none", action="store_true", help="leave out the normalization=None rows")
    parser.add_argument("--tf32", choices=("off", "on"), default="off",
                        help="TF32 for the BNLSTM rows on GPU (nn.LSTM is timed with both)")
    parser.add_argument("--settle-seconds", type=float, default=15.0,
                        help="CPU: at most this long waiting for the time per call to steady before timing "
                        "(default 15; 0 skips, for smoke tests)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    parser.add_argument("--out", default=f"{REPO_ROOT}/benchmarks/results", help="folder for the records")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("T", "B", "I", "H", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    return args


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


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    preset = PRESETS[args.preset]
    overrides = {d: getattr(args, d) for d in ("T", "B", "I", "H") if getattr(args, d) is not None}
    shape = Shape(**{**preset.shape.as_dict(), **overrides})
    repeats = args.repeats or (preset.repeats_gpu if device.type == "cuda" else preset.repeats_cpu)
    tf32 = args.tf32 == "on"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    settle_s = timing.settle_cpu(args.settle_seconds) if device.type == "cpu" and args.settle_seconds > 0 else 0.0
    candidates, skipped = discover(device, shape, compile_mode=args.compile_mode, backends=args.backends,
                                   include_none=not args.no_none, tf32_default=tf32)
    # the extension is loaded by now: name the build on disk before a rebuild can replace it mid-run
    extension = extension_build()
    warmups = {c.key: max(args.warmup, 2) if c.kind == "compile" else args.warmup for c in candidates}
    per_mode = sum(warmups.values()) + len(candidates) * (repeats + (0 if args.no_memory else 1))
    progress = _progress(per_mode * len(args.modes), not args.no_progress)

    results = []
    for mode in args.modes:
        runners, first_call = [], {}
        for candidate in candidates:
            progress.set_description_str(f"{mode}: {candidate.label} [{candidate.norm_label}] warm-up")
            planned = warmups[candidate.key]

            def tick(index, planned=planned):
                # warm-up runs past the planned count until it settles: grow the bar's total to match
                if index >= planned:
                    progress.total += 1
                progress.update(1)

            try:
                runner = Runner(candidate, shape, mode, device, dtype)
                first_call[candidate.key] = timing.warm_up(runner.before, runner, device, planned, tick=tick)
                problem = runner.check_finite()
                if problem is not None:
                    raise FloatingPointError(problem)
                runners.append(runner)
            except Exception as error:  # noqa: BLE001 (a failure is a result: reported, not fatal)
                results.append(_row(candidate, mode, repeats, tf32, error=_error_text(error)))
        progress.set_description_str(f"{mode}: timing {len(runners)} side by side")
        times = timing.interleaved_times(runners, repeats, device, tick=lambda: progress.update(1))
        for runner, measured in zip(runners, times):
            candidate = runner.candidate
            if isinstance(measured, BaseException):
                results.append(_row(candidate, mode, repeats, tf32, error=_error_text(measured)))
                progress.update(0 if args.no_memory else 1)
                continue
            row = _row(candidate, mode, repeats, tf32)
            row.update(report.summarize(measured, shape), first_call_s=first_call[candidate.key][0],
                       warmup_calls=first_call[candidate.key][1])
            if not args.no_memory:
                progress.set_description_str(f"{mode}: {candidate.label} [{candidate.norm_label}] memory")
                try:
                    row.update(timing.measure_memory(runner.before, runner, device, runner.release_caches,
                                                     runner.uncached))
                except Exception as error:  # noqa: BLE001 (the times stand; the memory figure is missing)
                    row["mem_method"] = f"failed: {_error_text(error)}"
                progress.update(1)
            results.append(row)
        del runners
        gc.collect()
    progress.close()

    order = {c.key: i for i, c in enumerate(candidates)}
    results.sort(key=lambda r: (MODES.index(r["mode"]), order[r["key"]]))
    report.add_ratios(results, tf32)
    if device.type == "cuda":
        # the runners switched TF32 per row; the record states the run's setting
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    machine = machine_record(device)
    machine["load_average_1min_start"] = load_start
    machine["cpu_settle_s"] = settle_s
    machine["extension"] = extension
    return {
        "schema": 1,
        "machine": machine,
        "config": {
            "preset": args.preset if not overrides else "custom",
            "base_preset": args.preset,
            "shape": shape.as_dict(),
            "dtype": args.dtype,
            "modes": list(args.modes),
            "repeats": repeats,
            "warmup": args.warmup,
            "compile": args.compile_mode,
            "tf32": tf32 if device.type == "cuda" else None,
            "layers": 1,
            "bidirectional": False,
            "command": " ".join(["python -m benchmarks"] + sys.argv[1:]),
        },
        "method": {
            "clock": "CUDA events, device synchronized before and after" if device.type == "cuda"
            else "time.perf_counter around one call",
            "warm_up": "at least --warmup untimed calls, then until two consecutive calls agree within 1.25x "
            "(at most 30 calls or 10 s after the first); warmup_calls holds the count",
            "settle": "CPU: a small parallel matmul runs until its time per call is steady before anything "
            "is timed (cpu_settle_s), since a new process's threads first wait whole scheduler slices",
            "repeats": "interleaved across implementations, rotating order, after warm-up",
            "spread": "IQR (p75 - p25) and min/max over the timed calls",
            "memory": "torch.cuda.max_memory_allocated over one call minus allocated before"
            if device.type == "cuda" else
            "peak_mem_mib: peak of torch CPU allocator bytes over one call (torch.profiler memory events); "
            "peak_rss_mib: peak RSS over another call (sampled every ~0.2 ms by a sampler process, after "
            "malloc_trim) minus RSS before",
            "compile_time": "excluded: first_call_s holds the first warm-up call, compilation included",
            "input_grad": "forward+backward computes dx too (x.requires_grad=True)",
            "finite": "after warm-up one untimed call must give a finite output (and finite dx and weight "
            "gradients in forward+backward), else the row is reported failed and not timed",
        },
        "results": results,
        "skipped": [{"implementation": s.label, "reason": s.reason} for s in skipped],
    }


def _row(candidate, mode: str, repeats: int, tf32: bool, error: str | None = None) -> dict:
    return {
        "mode": mode,
        "key": candidate.key,
        "implementation": candidate.label,
        "kind": candidate.kind,
        "backend": candidate.backend,
        "normalization": candidate.normalization,
        "normalization_label": candidate.norm_label if candidate.kind != "lstm" else "none",
        "tf32": candidate.tf32,
        "status": "ok" if error is None else "failed",
        "error": error,
        "repeats": repeats,
        "peak_mem_mib": None,
        "mem_method": None,
        "peak_rss_mib": None,
        "first_call_s": None,
        "warmup_calls": None,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    record = run(args)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    stem = f"{record['config']['preset']}_{record['machine']['device_type']}_{stamp}"
    paths = report.write_records(record, args.out, stem)
    print(report.header_line(record))
    print(report.format_table(record))
    warning = report.load_warning(record)
    if warning:
        print()
        print(warning)
        if record["machine"]["torch_threads"] > 1:
            print("(with every core contended, each parallel region waits for a descheduled thread: "
                  "--threads 1 gives steadier numbers there, see benchmarks/README.md)")
    print()
    print("ratios: time / nn.LSTM's time and / the reference's (same normalization; nn.LSTM against the "
          "reference without normalization); above 1 is slower")
    for ext, path in paths.items():
        print(f"{ext}: {path}")
    return 0
