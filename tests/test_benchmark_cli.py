"""Smoke test of the benchmark command (``python -m benchmarks``): a tiny shape, one repeat, no warm-up,
one mode (forward+backward: every code path, memory included, at a third of the calls), no torch.compile.
It checks that the records are written and well formed, never what the times are."""

import csv
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_cli_writes_records(tmp_path):
    command = [sys.executable, "-m", "benchmarks", "--T", "3", "--B", "2", "--I", "3", "--H", "4",
               "--modes", "forward+backward", "--repeats", "1", "--warmup", "0", "--settle-seconds", "0", "--compile", "off",
               "--no-progress", "--device", "cpu", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| implementation | norm | median ms |" in result.stdout

    files = sorted(os.listdir(tmp_path))
    stems = {os.path.splitext(name)[0] for name in files}
    assert len(stems) == 1 and sorted(os.path.splitext(name)[1] for name in files) == [".csv", ".json", ".png"]
    stem = os.path.join(tmp_path, stems.pop())

    with open(stem + ".json") as handle:
        record = json.load(handle)
    machine = record["machine"]
    for key in ("date", "commit", "device_name", "torch_threads", "torch", "triton", "tf32_matmul"):
        assert key in machine
    assert machine["device_type"] == "cpu" and machine["torch_threads"] >= 1
    assert record["config"]["shape"] == {"T": 3, "B": 2, "I": 3, "H": 4}
    results = record["results"]
    assert {r["mode"] for r in results} == {"forward+backward"}
    lstm = [r for r in results if r["kind"] == "lstm"]
    reference = [r for r in results if r["backend"] == "reference" and r["kind"] == "bnlstm"]
    assert len(lstm) == 1 and sorted(r["normalization_label"] for r in reference) == ["frame", "none"]
    for row in lstm + reference:
        assert row["status"] == "ok", row["error"]
        assert row["median_ms"] > 0 and len(row["times_ms"]) == 1
        assert row["ratio_vs_lstm"] > 0 and row["ratio_vs_reference"] > 0
        assert row["peak_mem_mib"] is not None and row["peak_mem_mib"] >= 0
    assert any(s["implementation"].startswith("torch.compile") for s in record["skipped"])

    with open(stem + ".csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(results)
    assert {"median_ms", "iqr_ms", "per_step_us", "tokens_per_s", "peak_mem_mib", "ratio_vs_lstm",
            "commit", "device_name", "torch_threads"} <= set(rows[0])
    assert all(float(row["median_ms"]) > 0 for row in rows if row["status"] == "ok")

    with open(stem + ".png", "rb") as handle:
        png = handle.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
