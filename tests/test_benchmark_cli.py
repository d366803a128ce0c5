"""Smoke tests of the benchmark command (``python -m benchmarks``) and of ``benchmarks/gpu_check.sh``'s use
of it, at tiny shapes with one repeat and no warm-up. They check that the records are written and well
formed and that every option does what it says, never what the times are."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
TINY = ["--T", "3", "--B", "2", "--I", "3", "--H", "4", "--repeats", "1", "--warmup", "0", "--settle-seconds", "0",
        "--compile", "off", "--no-progress", "--device", "cpu"]


def _run_cli(args, out, env=None, timeout=180):
    command = [sys.executable, "-m", "benchmarks", *args, "--out", str(out)]
    environment = {**os.environ, **(env or {})}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _records(out):
    records = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".json"):
            with open(os.path.join(out, name)) as handle:
                records.append(json.load(handle))
    return records


def test_benchmark_cli_writes_records(tmp_path):
    result = _run_cli(TINY + ["--modes", "forward+backward", "--kernels", "on"], tmp_path)
    assert "| implementation | norm | precision | median ms |" in result.stdout
    # the header names the ISA the cpp kernels ran with, the CPU's vector flags, threads and load
    machine_line = next(line for line in result.stdout.splitlines() if line.startswith("machine: "))
    assert "cpp kernels" in machine_line and "torch threads" in machine_line and "load average" in machine_line

    files = sorted(os.listdir(tmp_path))
    stems = {os.path.splitext(name)[0] for name in files}
    assert len(stems) == 1 and sorted(os.path.splitext(name)[1] for name in files) == [".csv", ".json", ".png"]
    stem = os.path.join(tmp_path, stems.pop())

    with open(stem + ".json") as handle:
        record = json.load(handle)
    machine = record["machine"]
    for key in ("date", "commit", "device_name", "torch_threads", "torch", "triton", "tf32_matmul", "cpu_flags",
                "cpp_kernels", "load_average", "load_average_start"):
        assert key in machine
    assert machine["device_type"] == "cpu" and machine["torch_threads"] >= 1
    if machine["cpp_kernels"]["isa"] is not None:
        assert machine["cpp_kernels"]["isa"] in machine_line
    assert record["config"]["shape"] == {"T": 3, "B": 2, "I": 3, "H": 4}
    assert record["config"]["precisions"] == ["fp32"]
    results = record["results"]
    assert {r["mode"] for r in results} == {"forward+backward"}
    lstm = [r for r in results if r["kind"] == "lstm"]
    reference = [r for r in results if r["backend"] == "reference" and r["kind"] == "bnlstm"]
    assert len(lstm) == 1 and sorted(r["normalization_label"] for r in reference) == ["frame", "none"]
    for row in lstm + reference:
        assert row["status"] == "ok", row["error"]
        assert row["precision"] == "fp32" and row["dtype"] == "float32"
        assert row["median_ms"] > 0 and len(row["times_ms"]) == 1 and row["repeats"] == 1
        assert row["cpu_ms"] is not None and row["cpu_ms"] >= 0
        assert row["ratio_vs_lstm"] > 0 and row["ratio_vs_reference"] > 0
        assert row["peak_mem_mib"] is not None and row["peak_mem_mib"] >= 0
    # --kernels on: the operators nn.LSTM ran are named (oneDNN's on CPU); the reference is not profiled
    assert lstm[0]["kernels"] and all(k["name"] for k in lstm[0]["kernels"])
    assert all(r["kernels"] is None for r in reference)
    assert any(s["implementation"].startswith("torch.compile") for s in record["skipped"])

    with open(stem + ".csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(results)
    assert {"median_ms", "iqr_ms", "cpu_ms", "per_step_us", "tokens_per_s", "peak_mem_mib", "ratio_vs_lstm",
            "precision", "variant", "cpp_isa", "load_1min", "kernels", "commit", "device_name",
            "torch_threads"} <= set(rows[0])
    assert all(float(row["median_ms"]) > 0 for row in rows if row["status"] == "ok")

    with open(stem + ".png", "rb") as handle:
        png = handle.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def _gpu_check_text():
    with open(GPU_CHECK) as handle:
        return handle.read()


def _gpu_bench_args():
    """BENCH_ARGS as bash reads it from gpu_check.sh."""
    line = next(line for line in _gpu_check_text().splitlines() if line.startswith("BENCH_ARGS=("))
    script = f'{line}\nprintf "%s\\n" "${{BENCH_ARGS[@]}}"'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()


def test_gpu_check_script_parses_and_its_time_limits_add_up_to_under_9_minutes():
    assert subprocess.run(["bash", "-n", GPU_CHECK], capture_output=True).returncode == 0
    text = _gpu_check_text()
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    limits = [int(v) for line in code for v in re.findall(r"(?<![\w-])timeout (\d+)", line)]
    # the script's own functions, each a `timeout` inside: tests FILE LIMIT LOG, bench PRESET LIMIT
    limits += [int(v) for line in code for v in re.findall(r"^(?:tests|bench) \S+ (\d+)\b", line)]
    # two timeouts in the machine block, install, three test runs, three presets
    assert len(limits) == 9, limits
    assert sum(limits) < 9 * 60, limits
    for preset in ("smnist", "charptb", "generic"):
        assert re.search(rf"^bench {preset} \d+$", text, re.MULTILINE)
    compile_tier = "tests/test_compile.py::test_cuda_triton_ops_pass_opcheck_and_compile_fullgraph"
    for tests in ("tests/test_triton.py", "tests/test_triton_persistent.py", compile_tier):
        assert re.search(rf"^tests {re.escape(tests)} \d+ ", text, re.MULTILINE)
    path, name = compile_tier.split("::")
    with open(os.path.join(ROOT, path)) as handle:
        assert f"def {name}(" in handle.read()
    assert "gpu_triton_bench" not in text


def test_gpu_check_command_line_runs_on_cpu(tmp_path):
    """The exact arguments gpu_check.sh gives the CLI, at a tiny shape on CPU with the Triton interpreter:
    every mode, every Triton variant that runs off CUDA, fp32 and bf16 (tf32 noted as CUDA-only), kernels
    named."""
    from benchmarks.candidates import VARIANTS

    args = _gpu_bench_args()
    assert {"fp32", "tf32", "bf16"} <= set(args) and "--kernels" in args
    _run_cli(["--preset", "smnist", *args, *TINY, "--backends", "reference", "triton", "--no-memory",
              "--time-budget", "120"], tmp_path, env={"TRITON_INTERPRET": "1"}, timeout=300)
    (record,) = _records(tmp_path)
    assert record["config"]["base_preset"] == "smnist" and record["config"]["precisions"] == ["fp32", "bf16"]
    assert any(s["implementation"] == "precision tf32" for s in record["skipped"])
    results = record["results"]
    assert {r["mode"] for r in results} == {"forward-train", "forward+backward", "eval-forward"}
    lstm = {(r["mode"], r["precision"]) for r in results if r["kind"] == "lstm" and r["status"] == "ok"}
    assert len(lstm) == 6
    triton = [r for r in results if r["backend"] == "triton"]
    on_cpu = {v.name for v in VARIANTS["triton"] if v.available(torch.device("cpu"))[0]}
    assert {r["variant"] for r in triton} == on_cpu and {"step", "persistent"} <= on_cpu
    # CUDA graph replay is noted, not timed, off CUDA
    assert any("CUDA graph replay" in s["implementation"] for s in record["skipped"])
    fp32 = [r for r in triton if r["precision"] == "fp32"]
    assert len(fp32) == 3 * 2 * len(on_cpu)  # modes x normalizations x variants
    for row in fp32:
        assert row["status"] == "ok", row["error"]
        assert row["ratio_vs_lstm"] > 0 and row["ratio_vs_reference"] > 0
    # the reference runs at the first precision only
    assert {r["precision"] for r in results if r["backend"] == "reference"} == {"fp32"}
    assert all(r["kernels"] for r in results if r["kind"] == "lstm" and r["status"] == "ok")
    # the heuristic's choice per row: off CUDA the per-step launches, marked in the table
    assert {r["variant"] for r in triton if r["auto_pick"]} == {"step"}
    assert not any(r["auto_pick"] for r in results if r["backend"] != "triton")
    from benchmarks.report import format_table

    table = format_table(record)
    assert "BNLSTM triton (per-step launches) *" in table and "rows marked *" in table
    assert "BNLSTM triton (persistent kernels) *" not in table


def test_presets_threads_and_time_budget(tmp_path):
    """Several presets and thread counts: one record each; a spent --time-budget skips rows but still writes."""
    result = _run_cli(["--preset", "default", "cpu", "--threads", "1", "2", "--time-budget", "0",
                       "--modes", "eval-forward", "--backends", "reference", *TINY], tmp_path)
    records = _records(tmp_path)
    assert len(records) == 4
    assert sorted(r["machine"]["torch_threads"] for r in records) == [1, 1, 2, 2]
    assert {r["config"]["base_preset"] for r in records} == {"default"}  # "cpu" is the old name of "default"
    for record in records:
        assert record["results"] and all(r["status"] == "skipped" for r in record["results"])
    assert "skipped: not reached within --time-budget" in result.stdout


def test_unknown_triton_variant_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--triton-variants", "nope", "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown variant 'nope'; registered: " in result.stderr


def test_reference_every_times_the_reference_in_fewer_rounds(tmp_path):
    _run_cli(TINY + ["--modes", "eval-forward", "--repeats", "4", "--reference-every", "2", "--no-memory",
                     "--backends", "reference"], tmp_path)
    (record,) = _records(tmp_path)
    repeats = {r["kind"] + "-" + str(r["backend"]): r["repeats"] for r in record["results"]}
    assert repeats == {"lstm-None": 4, "bnlstm-reference": 2}


def test_variant_registry_adds_and_skips_rows(monkeypatch):
    """A new Triton variant is one registry entry: it becomes rows when available, a note when not."""
    from benchmarks import candidates
    from benchmarks.shapes import PRECISIONS, Shape

    monkeypatch.setattr(candidates, "_backend_rows", lambda name, device, backends: (True, ""))
    monkeypatch.setitem(candidates.VARIANTS, "triton", (
        candidates.Variant("steps", "per-step launches"),
        candidates.Variant("graph", "CUDA graph replay", module_options=(("no_such_option", True),),
                           available=candidates.module_accepts("no_such_option")),
        candidates.Variant("env", "by environment", environment=(("FUSED_BNLSTM_TEST_VARIANT", "1"),)),
    ))
    device = torch.device("cpu")
    found, skipped = candidates.discover(device, Shape(3, 2, 3, 4), compile_mode="off", backends=["triton"],
                                         precisions=[PRECISIONS["fp32"], PRECISIONS["bf16"]])
    triton = [c for c in found if c.backend == "triton"]
    assert {c.variant.name for c in triton} == {"steps", "env"}
    assert len(triton) == 2 * 2 * 2  # variants x normalizations x precisions
    assert len({c.key for c in found}) == len(found)
    assert any("graph" in s.label or "CUDA graph replay" in s.label for s in skipped)
    only, _ = candidates.discover(device, Shape(3, 2, 3, 4), compile_mode="off", backends=["triton"],
                                  triton_variants=["env"])
    assert {c.variant.name for c in only if c.backend == "triton"} == {"env"}
    with pytest.raises(ValueError, match="unknown triton variant"):
        candidates.discover(device, Shape(3, 2, 3, 4), backends=["triton"], triton_variants=["nope"])


def test_kernel_notes_read_cudnn_and_cublas_names():
    from benchmarks.report import kernel_notes

    assert kernel_notes([{"name": "RNN_blockPersist_fp_LSTM<float, float, float, 128>"}]) == "cuDNN persistent RNN"
    assert "TF32" in kernel_notes([{"name": "sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32"}])
    assert "bf16" in kernel_notes([{"name": "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_tn"}])
    assert kernel_notes([{"name": "ampere_sgemm_128x64_tn"}]) == "fp32 FMA GEMM"
    assert kernel_notes(None) == ""
    assert kernel_notes([{"name": "bnlstm_persistent_fwd_kernel"}]) == ""  # ours, not cuDNN's


def test_report_compare_puts_records_side_by_side(tmp_path):
    """``python -m benchmarks.report --compare``: rows matched by implementation, normalization and
    precision; a row one record lacks shows '-'."""
    def record(commit, medians):
        rows = [{"mode": "eval-forward", "implementation": name, "normalization_label": "none", "precision": "fp32",
                 "kind": "lstm" if name.startswith("nn.LSTM") else "bnlstm", "status": "ok", "median_ms": median,
                 "cpu_ms": median / 2}
                for name, median in medians.items()]
        return {"machine": {"commit": commit}, "config": {}, "results": rows}

    records = [record("aaaaaaa", {"nn.LSTM (oneDNN)": 2.0, "BNLSTM cpp": 3.0}),
               record("bbbbbbb", {"nn.LSTM (oneDNN)": 2.0, "BNLSTM cpp": 2.0, "BNLSTM triton": 8.0})]
    from benchmarks.report import format_comparison

    table = format_comparison(records, ["before", "after"])
    assert "| implementation | norm | precision | before median ms | before x nn.LSTM | after median ms |" in table
    assert "| BNLSTM cpp | none | fp32 | 3.00 | 1.50 | 2.00 | 1.00 |" in table
    assert "| BNLSTM triton | none | fp32 | - | - | 8.00 | 4.00 |" in table
    cpu = format_comparison(records, ["before", "after"], metric="cpu_ms")
    assert "| BNLSTM cpp | none | fp32 | 1.50 | 1.50 | 1.00 | 1.00 |" in cpu and "before cpu ms" in cpu
