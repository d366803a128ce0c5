"""Summaries, the printed table, the JSON and CSV records and the PNG chart of ratios."""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from benchmarks.shapes import MODES, Shape

MIB = 2**20

# One CSV row per (mode, implementation); the machine columns repeat so that CSVs from many runs and
# machines can be concatenated and still be read.
CSV_FIELDS = [
    "date", "commit", "device_type", "device_name", "cpp_isa", "torch_threads", "load_1min", "torch", "triton",
    "preset", "T", "B", "I", "H", "mode", "implementation", "key", "backend", "variant", "normalization",
    "precision", "dtype", "tf32", "status", "repeats", "warmup", "median_ms", "p25_ms", "p75_ms", "iqr_ms",
    "min_ms", "max_ms", "mean_ms", "cpu_ms", "per_step_us", "sequences_per_s", "tokens_per_s", "peak_mem_mib",
    "mem_method", "peak_rss_mib", "ratio_vs_lstm", "ratio_vs_reference", "first_call_s", "warmup_calls",
    "kernels", "error",
]


def summarize(samples: list, shape: Shape) -> dict:
    """Median, quartiles, extremes (ms), time per step, throughput, from ``timing.Sample``s (or seconds);
    ``cpu_ms``: the median CPU time per call where measured (CPU runs)."""
    walls = [getattr(s, "wall_s", s) for s in samples]
    cpus = [s.cpu_s for s in samples if getattr(s, "cpu_s", None) is not None]
    ms = np.asarray(walls) * 1e3
    median = float(np.median(ms))
    p25, p75 = (float(v) for v in np.percentile(ms, [25, 75]))
    return {
        "times_ms": [round(float(v), 4) for v in ms],
        "median_ms": median,
        "p25_ms": p25,
        "p75_ms": p75,
        "iqr_ms": p75 - p25,
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "mean_ms": float(ms.mean()),
        "cpu_ms": float(np.median(cpus)) * 1e3 if cpus else None,
        "per_step_us": median * 1e3 / shape.T,
        "sequences_per_s": shape.B / (median / 1e3),
        "tokens_per_s": shape.T * shape.B / (median / 1e3),
    }


def add_ratios(results: list[dict]) -> None:
    """ratio_vs_lstm: median / nn.LSTM's median in the same mode at the same precision. ratio_vs_reference:
    median / the reference BNLSTM's median in the same mode with the same normalization, at the same
    precision where the reference ran at it, else at the reference's precision (it runs at the first only);
    nn.LSTM against the reference with normalization=None. Above 1 is slower."""
    ok = [r for r in results if r["status"] == "ok"]
    for row in results:
        row["ratio_vs_lstm"] = None
        row["ratio_vs_reference"] = None
        if row["status"] != "ok":
            continue
        lstm = [r for r in ok if r["mode"] == row["mode"] and r["kind"] == "lstm"
                and r["precision"] == row["precision"]]
        if lstm:
            row["ratio_vs_lstm"] = row["median_ms"] / lstm[0]["median_ms"]
        reference = [r for r in ok if r["mode"] == row["mode"] and r["kind"] == "bnlstm"
                     and r["backend"] == "reference" and r["normalization"] == row["normalization"]]
        reference.sort(key=lambda r: r["precision"] != row["precision"])
        if reference:
            row["ratio_vs_reference"] = row["median_ms"] / reference[0]["median_ms"]


def _math_of(name: str) -> str | None:
    """The math one kernel's name says it does (cuBLAS/cuDNN/CUTLASS name theirs by it), or None."""
    if "bf16" in name:
        return "bf16 tensor cores"
    if "tf32" in name or "s1688" in name or "s16816" in name:
        return "TF32 tensor cores"
    if any(tag in name for tag in ("h884", "h1688", "h16816", "f16f16", "fp16")):
        return "fp16 tensor cores"
    if "sgemm" in name or "f32f32_f32" in name:
        return "fp32 FMA GEMM"
    return None


def kernel_notes(kernels: list[dict] | None) -> str:
    """What a row's kernel names say, read by pattern: "cuDNN persistent RNN" for cuDNN's persistent
    kernels, and the GEMM math seen (a guess from names; the names themselves are printed beside it)."""
    names = [k["name"].lower() for k in kernels or []]
    # (our own persistent kernels are named bnlstm_persistent_*)
    notes = ["cuDNN persistent RNN"] if any("persist" in name and "bnlstm" not in name for name in names) else []
    for name in names:
        math = _math_of(name)
        if math and math not in notes:
            notes.append(math)
    return ", ".join(notes)


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(record: dict) -> str:
    """A Markdown table per mode (readable in a terminal, pasteable into a README), then the kernels each
    row ran where they were read, then what was not measured."""
    lines = []
    cpu = record["machine"]["device_type"] == "cpu"
    columns = (["implementation", "norm", "precision", "median ms", "IQR ms", "min ms"] + (["CPU ms"] if cpu else [])
               + ["us/step", "tokens/s", "peak MiB"] + (["RSS MiB"] if cpu else []) + ["x nn.LSTM", "x reference"])
    header = "| " + " | ".join(columns) + " |"
    rule = "| --- | --- | --- |" + " ---: |" * (len(columns) - 3)
    for mode in MODES:
        rows = [r for r in record["results"] if r["mode"] == mode]
        if not rows:
            continue
        lines += ["", f"{mode}:", "", header, rule]
        for r in rows:
            implementation = r["implementation"] + (" *" if r.get("auto_pick") else "")
            lead = f"| {implementation} | {r['normalization_label']} | {r.get('precision', '-')} | "
            if r["status"] != "ok":
                lines.append(lead + f"{r['status']}: {r['error']} |" + " |" * (len(columns) - 4))
                continue
            cells = [f"{r['median_ms']:.2f}", f"{r['iqr_ms']:.2f}", f"{r['min_ms']:.2f}"]
            cells += [_fmt(r.get("cpu_ms"), ".2f")] if cpu else []
            cells += [f"{r['per_step_us']:.1f}", f"{r['tokens_per_s']:,.0f}", _fmt(r["peak_mem_mib"], ".1f")]
            cells += [_fmt(r.get("peak_rss_mib"), ".1f")] if cpu else []
            cells += [_fmt(r["ratio_vs_lstm"], ".2f"), _fmt(r["ratio_vs_reference"], ".2f")]
            lines.append(lead + " | ".join(cells) + " |")
    if any(r.get("auto_pick") for r in record["results"]):
        lines += ["", "rows marked *: the variant the backend runs by default here (its heuristic, its switches unset)"]
    kernel_rows = [r for r in record["results"] if r.get("kernels")]
    if kernel_rows:
        lines += ["", "kernels (one profiled call; the top by self time, share of it):"]
        for r in kernel_rows:
            names = "; ".join(f"{k['name'][:70]}" + (f" {k['share']:.0%}" if k.get("share") is not None else "")
                              for k in r["kernels"])
            notes = kernel_notes(r["kernels"])
            lines.append(f"- {r['mode']} {r['implementation']} [{r['normalization_label']}, {r['precision']}]: "
                         + (f"({notes}) " if notes else "") + names)
    if record["skipped"]:
        lines += ["", "not measured:"]
        lines += [f"- {s['implementation']}: {s['reason']}" for s in record["skipped"]]
    return "\n".join(lines)


def header_line(record: dict) -> str:
    """The run in one line: shape, precisions, device, threads, load, versions, repeats, date, commit."""
    m, c = record["machine"], record["config"]
    precisions = ", ".join(c.get("precisions") or [c.get("dtype", "float32")])
    threads = f"{m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''}"
    load = m.get("load_average_1min_start")
    load = "" if load is None else f", load {load:.1f}/{m['load_average_1min']:.1f} (start/end)"
    triton = f", triton {m['triton']}" if m.get("triton") and any(
        r.get("backend") == "triton" for r in record["results"]) else ""
    return (f"{c['preset']}: {Shape(**c['shape'])} {precisions} on {m['device_name']} "
            f"({m['device_type']}, {threads}{load}), torch {m['torch']}{triton}, "
            f"{c['repeats']} repeats after {c['warmup']} warm-up, {m['date']}, commit {m['commit']}")


def machine_line(record: dict) -> str:
    """The machine details that decide which kernels ran: on CPU the model, ISA flags, the ISA the cpp
    kernels picked and ATen's, the load averages; on CUDA the card, capability, CUDA and cuDNN versions."""
    m = record["machine"]
    if m["device_type"] == "cuda":
        return (f"machine: {m['device_name']} (sm {m.get('gpu_capability')}, {m.get('gpu_sms')} SMs), CUDA "
                f"{m.get('cuda')}, cuDNN {m.get('cudnn')}; host {m.get('cpu_model')}")
    kernels = m.get("cpp_kernels") or {}
    if kernels.get("isa"):
        brgemm = {True: ", brgemm", False: ", no brgemm"}.get(kernels.get("brgemm"), "")
        gemm = f", all-step GEMMs {kernels['gemm']}" if kernels.get("gemm") else ""
        cpp = f"cpp kernels {kernels['isa']}{brgemm}{gemm}"
    else:
        cpp = f"cpp kernels: ISA unknown ({kernels.get('error', 'not recorded')})"
    built = m.get("extension")
    cpp += f" (extension built {built['built']})" if built else ""
    flags = ("not recorded" if "cpu_flags" not in m
             else " ".join(m["cpu_flags"]) or "none of avx2/avx512 reported")
    loads = [("start", m.get("load_average_start")), ("end", m.get("load_average"))]
    load = "; ".join(f"{name} {' '.join(f'{v:.2f}' for v in values)}" for name, values in loads if values)
    return (f"machine: {m['cpu_model']}, {m.get('cpu_affinity')} cores, flags {flags}; {cpp}; ATen "
            f"{m.get('aten_cpu_capability')}; {m['torch_threads']} torch threads; load average 1/5/15 min {load}")


def load_warning(record: dict) -> str | None:
    """A sentence when other processes competed for the cores while this ran (CPU runs only)."""
    m = record["machine"]
    if m["device_type"] != "cpu" or m.get("load_average_1min") is None:
        return None
    load = max(m["load_average_1min"], m.get("load_average_1min_start") or 0.0)
    if load <= m["cpu_affinity"] + 0.5:
        return None
    return (f"warning: 1-minute load average reached {load:.1f} on {m['cpu_affinity']} cores: other processes "
            "competed for the CPU, so times are inflated and noisy; compare ratios within this run only")


def write_json(record: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")


def write_csv(record: dict, path: str) -> None:
    m, c = record["machine"], record["config"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in record["results"]:
            row = {k: m.get(k) for k in ("date", "commit", "device_type", "device_name", "torch_threads",
                                         "torch", "triton")}
            row.update(c["shape"], preset=c["preset"], warmup=c["warmup"],
                       cpp_isa=(m.get("cpp_kernels") or {}).get("isa"), load_1min=m.get("load_average_1min"))
            row.update({k: v for k, v in r.items() if k in CSV_FIELDS})
            row["implementation"] = r["implementation"]
            row["normalization"] = r["normalization_label"]
            row["kernels"] = "; ".join(k["name"] for k in r.get("kernels") or [])
            writer.writerow(row)


def write_chart(record: dict, path: str) -> None:
    """Horizontal bars of each implementation's time over nn.LSTM's, one panel per mode, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    modes = [mode for mode in MODES if any(r["mode"] == mode for r in record["results"])]
    def label_of(r: dict) -> str:
        return f"{r['implementation']} [{r['normalization_label']}, {r.get('precision', '')}]"

    labels = []
    for r in record["results"]:
        if label_of(r) not in labels:
            labels.append(label_of(r))
    finite = [r["ratio_vs_lstm"] for r in record["results"] if r.get("ratio_vs_lstm")]
    low = min(finite + [1.0]) / 1.6
    high = max(finite + [1.0]) * 1.6
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 0.45 * len(labels) + 1.8),
                             sharey=True, squeeze=False)
    colors = {"frame": "tab:blue", "none": "tab:orange"}
    for ax, mode in zip(axes[0], modes):
        by_label = {label_of(r): r for r in record["results"] if r["mode"] == mode}
        y = np.arange(len(labels))
        values = [by_label[l]["ratio_vs_lstm"] if l in by_label and by_label[l]["ratio_vs_lstm"] else np.nan
                  for l in labels]
        bar_colors = [colors.get(by_label[l]["normalization_label"], "tab:gray") if l in by_label else "white"
                      for l in labels]
        # Bars grow from 1 (as fast as nn.LSTM): right is slower, left is faster.
        ax.barh(y, [v - 1.0 for v in values], left=1.0, color=bar_colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(mode)
        ax.set_xlabel("time / nn.LSTM time (log scale)")
        for yi, value in zip(y, values):
            if np.isfinite(value):
                ax.text(value if value >= 1 else 1.0, yi, f" {value:.2f}x", va="center", fontsize=8)
            elif labels[yi] in by_label:
                ax.text(1.0, yi, " failed", va="center", fontsize=8, color="tab:red")
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
    fig.suptitle(header_line(record), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_records(record: dict, out_dir: str, stem: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "csv", "png")}
    write_json(record, paths["json"])
    write_csv(record, paths["csv"])
    write_chart(record, paths["png"])
    return paths


def _row_id(row: dict) -> tuple:
    # records before schema 2 have no precision: they ran at their config's one dtype
    return row["mode"], row["implementation"], row["normalization_label"], row.get("precision", "fp32")


def format_comparison(records: list[dict], names: list[str], metric: str = "median_ms") -> str:
    """One Markdown table per mode with every record's ``metric`` (median_ms, min_ms or cpu_ms) and that
    metric over nn.LSTM's at the same precision, side by side; rows matched by implementation,
    normalization and precision (e.g. the same preset before and after a change)."""
    label = metric.replace("_ms", "")
    columns = ["implementation", "norm", "precision"]
    for name in names:
        columns += [f"{name} {label} ms", f"{name} x nn.LSTM"]
    lines = []
    by_record = [{_row_id(r): r for r in record["results"] if r["status"] == "ok" and r.get(metric) is not None}
                 for record in records]
    for mode in MODES:
        ids = list(dict.fromkeys(i for rows in by_record for i in rows if i[0] == mode))
        if not ids:
            continue
        lines += ["", f"{mode}:", "", "| " + " | ".join(columns) + " |",
                  "| --- | --- | --- |" + " ---: |" * (len(columns) - 3)]
        for row_id in ids:
            cells = list(row_id[1:])
            for rows in by_record:
                row = rows.get(row_id)
                lstm = [r for i, r in rows.items() if i[0] == mode and i[3] == row_id[3] and r["kind"] == "lstm"]
                ratio = row[metric] / lstm[0][metric] if row and lstm else None
                cells += [_fmt(row[metric] if row else None, ".2f"), _fmt(ratio, ".2f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m benchmarks.report RECORD.json ...``: print each record's header and tables again
    (Markdown, for benchmarks/README.md); with ``--compare``, one side-by-side table of them all."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    parser.add_argument("records", nargs="+", help="JSON records written by python -m benchmarks")
    parser.add_argument("--compare", action="store_true", help="medians and ratios side by side, one column "
                        "pair per record (named by --names, else by commit)")
    parser.add_argument("--names", nargs="+", help="column names for --compare, one per record")
    parser.add_argument("--metric", choices=("median_ms", "min_ms", "cpu_ms"), default="median_ms",
                        help="what --compare sets side by side (default median_ms)")
    args = parser.parse_args(argv)
    records = []
    for path in args.records:
        with open(path) as handle:
            records.append(json.load(handle))
    if args.compare:
        names = args.names or [r["machine"]["commit"][:7] for r in records]
        if len(names) != len(records):
            parser.error(f"--names: {len(names)} names for {len(records)} records")
        for name, record in zip(names, records):
            print(f"{name}: {header_line(record)}")
        print(format_comparison(records, names, args.metric))
        return 0
    for record in records:
        print(f"`{record['config']['command']}`: {header_line(record)}")
        print(machine_line(record))
        print(format_table(record))
        warning = load_warning(record)
        if warning:
            print()
            print(warning)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
