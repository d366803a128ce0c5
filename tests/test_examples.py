"""The experiments in examples/ run end to end in their smoke setting and write a finite record and a plot."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

# examples/ is a folder of scripts at the repository root, not part of the installed package.
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples import char_lm, gamma_gradient_flow, population_statistics, sequential_digits, stateful_lm  # noqa: E402


def _finite(value):
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def _run(module, tmp_path, *extra):
    # One thread: the smoke shapes are tiny, and CI machines are shared (restored for the tests after).
    threads = torch.get_num_threads()
    try:
        module.main(["--smoke", "--out", str(tmp_path), "--seed", "0", "--no-progress", "--threads", "1", *extra])
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / f"{module.NAME}.json").read_text())
    png = tmp_path / f"{module.NAME}.png"
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["experiment"] == module.NAME
    assert record["setting"] == "smoke"
    assert record["finite"] is True and _finite(record)
    assert record["environment"]["backend_resolved"] in ("reference", "triton", "cpp")
    return record


def test_gamma_gradient_flow(tmp_path):
    record = _run(gamma_gradient_flow, tmp_path)
    T = record["config"]["seq_len"]
    assert set(record["bn_tanh_rnn"]) == {str(g) for g in gamma_gradient_flow.RNN_GAMMAS}
    assert set(record["bnlstm"]) == {str(g) for g in gamma_gradient_flow.LSTM_GAMMAS}
    for curves in (record["bn_tanh_rnn"], record["bnlstm"]):
        for v in curves.values():
            assert len(v["grad_norm"]) == T and all(g > 0 for g in v["grad_norm"])
    derivative = record["tanh_derivative"]
    assert derivative["mean"][0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(derivative["mean"], derivative["mean"][1:]))
    assert all(lo - 1e-9 <= m <= hi + 1e-9 for lo, m, hi in zip(derivative["q25"], derivative["mean"], derivative["q75"]))
    # The paper's Figure 1(a) at a fixed seed: large gamma vanishes the gradient reaching the first step.
    first = record["summary"]["rnn_first_step_grad_norm"]
    assert first["0.1"] > 10 * first["1.0"]


def test_sequential_digits(tmp_path):
    record = _run(sequential_digits, tmp_path)
    assert set(record["runs"]) == set(sequential_digits.TASKS)
    for by_model in record["runs"].values():
        assert set(by_model) == set(sequential_digits.MODELS)
        for result in by_model.values():
            history = result["history"]
            assert history["step"] == [3, 6]
            assert len(history["valid_accuracy"]) == len(history["step"])
            assert all(0.0 <= a <= 100.0 for a in history["valid_accuracy"])
            assert 0.0 <= result["test_accuracy"] <= 100.0
    assert "test_accuracy_running_stats" in record["runs"]["sequential"]["bnlstm"]
    assert record["config"]["seq_len"] == 64


def test_char_lm(tmp_path):
    record = _run(char_lm, tmp_path)
    assert set(record["runs"]) == set(char_lm.MODELS)
    T = record["config"]["seq_len"]
    for result in record["runs"].values():
        assert result["history"]["step"] == [2, 4]
        assert all(0.0 < b < 10.0 for b in result["history"]["valid_bpc"])
        assert list(result["test_bpc_by_length"]) == [str(T * m) for m in record["config"]["length_multiples"]]
        assert 0.0 < result["test_bpc"] < 10.0
    assert record["text"]["vocab_size"] > 50


def test_population_statistics(tmp_path):
    record = _run(population_statistics, tmp_path, "--tasks", "sequential")
    result = record["runs"]["sequential"]
    for q in population_statistics.QUANTITIES:
        assert len(result["per_slot"][q]["mean_error_max"]) == 64
        assert all(v >= 0 for v in result["per_slot"][q]["exact_var_max"])
    accuracies = {**result["test_accuracy"], **result["frozen_weights_test_accuracy"]}
    assert {"running", "exact", "running (c, step 0) only"} <= set(accuracies)
    assert all(0.0 <= a <= 100.0 for a in accuracies.values())


def test_stateful_lm(tmp_path):
    record = _run(stateful_lm, tmp_path)
    assert set(record["valid_perplexity"]) == {"running", "restart", "carried"}
    assert all(1.0 < p < record["text"]["vocab_size"] * 2 for p in record["valid_perplexity"].values())
    assert len(record["train_loss"]) == record["config"]["steps"]


def test_load_mnist_split_reads_idx_files(tmp_path):
    from examples.common import load_mnist_split

    def write_idx(name, array, gz):
        import gzip
        import struct

        header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
        opener = gzip.open if gz else open
        with opener(tmp_path / (name + (".gz" if gz else "")), "wb") as f:
            f.write(header + array.astype("uint8").tobytes())

    rng = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (12, 28, 28), generator=rng).numpy()
    test = torch.randint(0, 256, (5, 28, 28), generator=rng).numpy()
    write_idx("train-images-idx3-ubyte", train, gz=True)
    write_idx("train-labels-idx1-ubyte", torch.arange(12).remainder(10).numpy(), gz=False)
    write_idx("t10k-images-idx3-ubyte", test, gz=False)
    write_idx("t10k-labels-idx1-ubyte", torch.arange(5).numpy(), gz=True)
    data = load_mnist_split(tmp_path, valid_size=2)
    assert data["train"][0].shape == (10, 784) and data["valid"][0].shape == (2, 784)
    assert data["test"][0].shape == (5, 784)
    assert data["train"][0][0, 0] == pytest.approx(train[0, 0, 0] / 255.0)
    assert data["valid"][1].tolist() == [0, 1] and data["test"][1].tolist() == [0, 1, 2, 3, 4]
