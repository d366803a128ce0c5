"""GPU measurements beyond ``gpu_check.sh``, for the GPU issues: one prepared script, parts run by name.

    python3 -m benchmarks.gpu_extra mixed memory sweep long --out DIR    # on the GPU machine, repository root

- ``mixed``: bf16 / fp16 parameters and fp32 parameters under ``torch.autocast``: the output's and the input
  gradient's relative error against float64 (BNLSTM: the reference backend in float64 on the same weights;
  nn.LSTM: cuDNN in float64 on its own weights), and whether anything overflowed.
- ``memory``: peak device memory of one training forward+backward, BNLSTM (Triton, auto variant) against
  nn.LSTM, fp32 and bf16, at the paper's shapes; and what the Triton workspace pool keeps between calls.
- ``sweep``: the per-step kernels' column block (``fused_triton._BLOCK_H``) and warps per program, by shape:
  forward+backward and eval medians at TF32, each configuration checked against the default one's output.
- ``long``: T = 1,000 / 10,000 / 100,000 at B = 32, I = H = 256: time per step and peak memory, forward+backward
  and eval, BNLSTM against nn.LSTM (cuDNN refuses more than 65,535 steps).

Every result is one JSON line in ``DIR/extra.jsonl`` and one printed line; every part runs under its own
try, so one failure leaves the others' figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from benchmarks.shapes import PRESETS
from benchmarks.timing import time_one
from fused_bnlstm import BNLSTM
from fused_bnlstm.ops import fused_triton

# the paper's shapes, as (T, B, I, H), from the benchmark's presets
PAPER = {name: dataclasses.astuple(PRESETS[name].shape) for name in ("smnist", "charptb", "generic")}
LONG = (1_000, 10_000, 100_000)
DEVICE = "cuda"
_RESULTS: list[dict] = []
_OUT: Path | None = None


def smoke() -> None:
    """``--smoke``: tiny shapes on the CPU under TRITON_INTERPRET=1, to prove this script here at no GPU cost."""
    global DEVICE, LONG
    DEVICE, LONG = "cpu", (4, 8)
    for name in PAPER:
        PAPER[name] = (5, 4, 3, 16)


def record(**row) -> None:
    _RESULTS.append(row)
    print(json.dumps(row), flush=True)
    if _OUT is not None:
        with open(_OUT / "extra.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def median_ms(call, repeats: int, warmup: int = 3) -> float:
    """The median of ``repeats`` calls after ``warmup``, in ms, with the benchmark's timer (CUDA events)."""
    if DEVICE == "cpu":
        repeats, warmup = 1, 0
    for _ in range(warmup):
        call()
    sync()
    device = torch.device(DEVICE)
    return 1000 * statistics.median(time_one(lambda: None, call, device).wall_s for _ in range(repeats))


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def models(T, I, H, dtype, seed=0):
    """A BNLSTM (Triton) and an nn.LSTM with the same weights, in ``dtype``; BNLSTM in training mode."""
    torch.manual_seed(seed)
    bn = BNLSTM(I, H, backend="triton", max_length=T, device=DEVICE, dtype=dtype)
    lstm = nn.LSTM(I, H, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(lstm, name).copy_(getattr(bn, name))
    return bn, lstm


def forward_backward(model, x, dy):
    x.grad = None
    for p in model.parameters():
        p.grad = None
    y = model(x)[0]
    y.backward(dy)
    return y


# --------------------------------------------------------------------------------------------- mixed
def part_mixed() -> None:
    for shape, (T, B, I, H) in PAPER.items():
        torch.manual_seed(1)
        x64 = torch.randn(T, B, I, device=DEVICE, dtype=torch.float64)
        dy64 = torch.randn(T, B, H, device=DEVICE, dtype=torch.float64)
        bn64, lstm64 = models(T, I, H, torch.float64)
        bn64_ref = BNLSTM(I, H, backend="reference", max_length=T, device=DEVICE, dtype=torch.float64)
        bn64_ref.load_state_dict(bn64.state_dict())
        xr = x64.clone().requires_grad_()
        y_bn_ref = forward_backward(bn64_ref, xr, dy64)
        g_bn_ref = xr.grad
        xl = x64.clone().requires_grad_()
        y_lstm_ref = forward_backward(lstm64, xl, dy64)
        g_lstm_ref = xl.grad
        for label, dtype, autocast in (("bf16", torch.bfloat16, None), ("fp16", torch.float16, None),
                                       ("fp32 autocast bf16", torch.float32, torch.bfloat16),
                                       ("fp32 autocast fp16", torch.float32, torch.float16)):
            row = dict(part="mixed", shape=shape, precision=label)
            for name, model64, y_ref, g_ref in (("bnlstm", bn64_ref, y_bn_ref, g_bn_ref),
                                                ("lstm", lstm64, y_lstm_ref, g_lstm_ref)):
                try:
                    model = (BNLSTM(I, H, backend="triton", max_length=T, device=DEVICE, dtype=dtype)
                             if name == "bnlstm" else nn.LSTM(I, H, device=DEVICE, dtype=dtype))
                    model.load_state_dict(model64.state_dict())
                    x = x64.to(dtype).requires_grad_()
                    with torch.autocast(DEVICE, dtype=autocast, enabled=autocast is not None):
                        y = forward_backward(model, x, dy64.to(dtype))
                    row[f"{name}_out_err"] = rel(y, y_ref)
                    row[f"{name}_dx_err"] = rel(x.grad, g_ref)
                    row[f"{name}_finite"] = bool(torch.isfinite(y).all() and torch.isfinite(x.grad).all())
                    row[f"{name}_out_dtype"] = str(y.dtype)
                    if name == "bnlstm":
                        row["bnlstm_stats_dtype"] = str(model.running_mean_c_l0.dtype) \
                            if hasattr(model, "running_mean_c_l0") else "?"
                except Exception as error:  # record and go on: nn.LSTM's bf16 needs cuDNN 9.13+
                    row[f"{name}_error"] = f"{type(error).__name__}: {str(error)[:200]}"
            if "bnlstm_out_err" in row and "lstm_out_err" in row:
                row["out_err_ratio"] = row["bnlstm_out_err"] / max(row["lstm_out_err"], 1e-30)
            record(**row)


# --------------------------------------------------------------------------------------------- memory
def peak_bytes(call) -> tuple[int, int]:
    """(peak over what was allocated before the call, what stays allocated after it)."""
    if DEVICE == "cpu":
        call()
        return 0, 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base


def part_memory() -> None:
    for shape, (T, B, I, H) in PAPER.items():
        for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            bn, lstm = models(T, I, H, dtype)
            x = torch.randn(T, B, I, device=DEVICE, dtype=dtype, requires_grad=True)
            dy = torch.randn(T, B, H, device=DEVICE, dtype=dtype)
            row = dict(part="memory", shape=shape, precision=label,
                       input_bytes=x.numel() * x.element_size(), output_bytes=dy.numel() * dy.element_size())
            for name, model in (("bnlstm", bn), ("lstm", lstm)):
                try:
                    first = peak_bytes(lambda: forward_backward(model, x, dy))
                    for _ in range(2):  # the second call captures the graphs; from the third they replay
                        forward_backward(model, x, dy)
                    peak, kept = peak_bytes(lambda: forward_backward(model, x, dy))
                    row[f"{name}_first_call_peak_MiB"] = round(first[0] / 2**20, 2)
                    row[f"{name}_peak_MiB"] = round(peak / 2**20, 2)
                    row[f"{name}_kept_MiB"] = round(kept / 2**20, 2)
                except Exception as error:
                    row[f"{name}_error"] = f"{type(error).__name__}: {str(error)[:200]}"
            row["pool_workspaces"] = len(fused_triton._WORKSPACES.idle)
            if "bnlstm_peak_MiB" in row and "lstm_peak_MiB" in row:
                row["peak_ratio"] = row["bnlstm_peak_MiB"] / max(row["lstm_peak_MiB"], 1e-9)
            record(**row)
            del bn, lstm, x, dy
            fused_triton._WORKSPACES = fused_triton._WorkspacePool()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- sweep
def part_sweep() -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    default_block, default_warps = fused_triton._BLOCK_H, fused_triton._num_warps
    configs = [(16, None), (8, None), (4, None), (32, None), (8, 4), (8, 8), (16, 8), (4, 4)]
    try:
        for shape, (T, B, I, H) in PAPER.items():
            bn, lstm = models(T, I, H, torch.float32)
            x = torch.randn(T, B, I, device=DEVICE, requires_grad=True)
            dy = torch.randn(T, B, H, device=DEVICE)
            lstm_fb = median_ms(lambda: forward_backward(lstm, x, dy), 20)
            with torch.inference_mode():
                lstm_ev = median_ms(lambda: lstm(x), 20)
            reference = None
            for block, warps in configs:
                fused_triton._BLOCK_H = block
                fused_triton._num_warps = default_warps if warps is None else (lambda B, w=warps: w)
                fused_triton._WORKSPACES = fused_triton._WorkspacePool()
                row = dict(part="sweep", shape=shape, precision="tf32", block_h=block,
                           warps=warps or default_warps(B), programs=-(-H // block))
                try:
                    with torch.autocast(DEVICE, enabled=False):
                        y = forward_backward(bn, x, dy).detach()
                    check = (y, x.grad.clone())
                    if reference is None:
                        reference = check
                    row["out_diff"] = rel(check[0], reference[0])
                    row["dx_diff"] = rel(check[1], reference[1])
                    row["fb_ms"] = median_ms(lambda: forward_backward(bn, x, dy), 20)
                    bn.eval()
                    with torch.inference_mode():
                        row["eval_ms"] = median_ms(lambda: bn(x), 20)
                    bn.train()
                    row["lstm_fb_ms"], row["lstm_eval_ms"] = lstm_fb, lstm_ev
                    row["fb_ratio"] = row["fb_ms"] / lstm_fb
                    row["eval_ratio"] = row["eval_ms"] / lstm_ev
                except Exception as error:
                    bn.train()
                    row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                record(**row)
    finally:
        fused_triton._BLOCK_H, fused_triton._num_warps = default_block, default_warps
        fused_triton._WORKSPACES = fused_triton._WorkspacePool()


# --------------------------------------------------------------------------------------------- long
def part_long() -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    B, I, H = 32, 256, 256
    for T in LONG:
        bn, lstm = models(T, I, H, torch.float32)
        x = torch.randn(T, B, I, device=DEVICE, requires_grad=True)
        dy = torch.randn(T, B, H, device=DEVICE)
        repeats = 5 if T <= 10_000 else 1
        for name, model in (("bnlstm", bn), ("lstm", lstm)):
            row = dict(part="long", T=T, B=B, I=I, H=H, model=name)
            try:
                start = time.perf_counter()
                first = peak_bytes(lambda: forward_backward(model, x, dy))
                row["first_call_s"] = round(time.perf_counter() - start, 2)
                row["peak_GiB"] = round(first[0] / 2**30, 3)
                ms = median_ms(lambda: forward_backward(model, x, dy), repeats, warmup=1)
                row["fb_ms"], row["fb_us_per_step"] = ms, 1000 * ms / T
                model.eval()
                with torch.inference_mode():
                    ms = median_ms(lambda: model(x), repeats, warmup=1)
                model.train()
                row["eval_ms"], row["eval_us_per_step"] = ms, 1000 * ms / T
            except Exception as error:
                model.train()
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            record(**row)
        del bn, lstm, x, dy
        fused_triton._WORKSPACES = fused_triton._WorkspacePool()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


PARTS = {"mixed": part_mixed, "memory": part_memory, "sweep": part_sweep, "long": part_long}


def main(argv=None) -> int:
    global _OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", choices=sorted(PARTS))
    parser.add_argument("--out", type=Path, default=Path("gpu_out"))
    parser.add_argument("--smoke", action="store_true", help=smoke.__doc__)
    args = parser.parse_args(argv)
    if args.smoke:
        smoke()
    args.out.mkdir(parents=True, exist_ok=True)
    _OUT = args.out
    if DEVICE == "cuda":
        print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.get_device_name(),
              flush=True)
    failed = 0
    for name in args.parts:
        start = time.perf_counter()
        try:
            PARTS[name]()
        except Exception:
            failed += 1
            traceback.print_exc()
            record(part=name, error=traceback.format_exc()[-800:])
        print(f"== {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
