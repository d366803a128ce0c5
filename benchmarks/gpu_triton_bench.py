"""Times BNLSTM ``backend="triton"`` against ``torch.nn.LSTM`` (cuDNN) and the reference on one CUDA GPU.

Run by ``benchmarks/gpu_check.sh`` (one prepared device call). For each of the paper's shapes it times
forward and forward+backward of one training call (batch statistics) with CUDA events around each call
(the device synchronized first, so the launch gaps of the per-step loops count), after warm-up (which
includes Triton's compilation), and reports the median over the repeats, interleaved across candidates.
Inputs are random normal data (never zeros); every candidate's output is checked to be finite.

    python benchmarks/gpu_triton_bench.py --out OUT_DIR [--repeats 5]

Writes ``OUT_DIR/triton_bench.json`` and ``OUT_DIR/triton_bench.md``; prints the table last.

Predictions to hold the first numbers against (written before any GPU run; H100, fp32 without TF32):
- s-MNIST (T=784, H=100): each step is tiny (64x400x100 multiply-adds), so the loops are launch-bound:
  ~784 launches each way at roughly 10-30 us of host + device overhead, ~10-25 ms forward and ~2x that
  for forward+backward; cuDNN's persistent kernels should win here. CUDA graphs are the lever.
- char-PTB (T=100, H=1000): 2 * 64 * 4000 * 1000 flops per step, ~51 GFLOP forward; at ~50 TFLOP/s of
  fp32 FMA that is ~1 ms, but the grid has only ceil(1000 / 16) = 63 programs on 132 SMs, so expect
  ~2 ms forward and ~3x that forward+backward (BH cannot go under 16, the smallest tl.dot width; a
  persistent kernel or splitting the reduction over H across programs would fill the chip).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from fused_bnlstm import BNLSTM

# (name, T, B, I, H): s-MNIST, char-level PTB, and the H=512 shape of the issue
SHAPES = [("smnist", 784, 64, 1, 100), ("ptb-char", 100, 64, 50, 1000), ("h512", 100, 64, 512, 512)]


def make_candidates(I, H, device):
    """name -> (module, tf32 flag or None). Weights are shared where the layouts agree."""
    torch.manual_seed(0)
    candidates = {
        "bnlstm-triton-frame": (BNLSTM(I, H, backend="triton", device=device), None),
        "bnlstm-triton-frame-tf32": (BNLSTM(I, H, backend="triton", device=device), True),
        "bnlstm-triton-none": (BNLSTM(I, H, backend="triton", normalization=None, device=device), None),
        "bnlstm-reference-frame": (BNLSTM(I, H, backend="reference", device=device), None),
        "nn.LSTM-cudnn-tf32-off": (nn.LSTM(I, H, device=device), False),
        "nn.LSTM-cudnn-tf32-on": (nn.LSTM(I, H, device=device), True),
    }
    for module, _ in candidates.values():
        module.train()
    return candidates


def set_tf32(flag):
    torch.backends.cuda.matmul.allow_tf32 = bool(flag)
    torch.backends.cudnn.allow_tf32 = bool(flag)


def timed(fn):
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def bench_shape(name, T, B, I, H, repeats, device):
    x = torch.randn(T, B, I, device=device, requires_grad=True)
    candidates = make_candidates(I, H, device)
    grad_out = torch.randn(T, B, H, device=device)

    def forward(module):
        with torch.no_grad():
            out, _ = module(x)
        return out

    def forward_backward(module):
        module.zero_grad(set_to_none=True)
        out, _ = module(x)
        out.backward(grad_out)
        return out

    results = {}
    for key, (module, tf32) in candidates.items():
        set_tf32(tf32 if tf32 is not None else False)
        out = forward_backward(module)  # warm-up: compilation, cuDNN plans
        torch.cuda.synchronize()
        if not torch.isfinite(out).all():
            raise RuntimeError(f"{key} produced non-finite output at {name}")
        results[key] = {"forward_ms": [], "forward_backward_ms": []}
    for r in range(repeats):
        keys = list(candidates)
        keys = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in keys:
            module, tf32 = candidates[key]
            set_tf32(tf32 if tf32 is not None else False)
            results[key]["forward_ms"].append(timed(lambda: forward(module)))
            results[key]["forward_backward_ms"].append(timed(lambda: forward_backward(module)))
    set_tf32(False)
    summary = {}
    for key, times in results.items():
        summary[key] = {kind: statistics.median(values) for kind, values in times.items()}
        summary[key]["repeats"] = len(times["forward_ms"])
    return summary


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda")
    record = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "notes": "training-mode calls (batch statistics); medians of CUDA-event times per call; BNLSTM rows "
                 "run with TF32 off (IEEE fp32 dots in the triton kernels); nn.LSTM rows state their TF32 switches",
        "shapes": {},
    }
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None
    for name, T, B, I, H in SHAPES:
        start = time.time()
        try:
            record["shapes"][name] = {"T": T, "B": B, "I": I, "H": H,
                                      "results": bench_shape(name, T, B, I, H, args.repeats, device)}
        except Exception as error:  # keep what the other shapes measured
            record["shapes"][name] = {"T": T, "B": B, "I": I, "H": H, "error": repr(error)}
        record["shapes"][name]["wall_s"] = round(time.time() - start, 1)
        with open(f"{args.out}/triton_bench.json", "w") as handle:
            json.dump(record, handle, indent=2)

    lines = [f"# BNLSTM triton vs nn.LSTM vs reference on {record['device']} (torch {record['torch']}, "
             f"triton {record['triton']})", "", "| shape | candidate | forward ms | forward+backward ms |",
             "| --- | --- | ---: | ---: |"]
    for name, entry in record["shapes"].items():
        label = f"{name} T={entry['T']} B={entry['B']} I={entry['I']} H={entry['H']}"
        if "error" in entry:
            lines.append(f"| {label} | error | {entry['error'][:80]} | |")
            continue
        for key, value in entry["results"].items():
            lines.append(f"| {label} | {key} | {value['forward_ms']:.2f} | {value['forward_backward_ms']:.2f} |")
    table = "\n".join(lines)
    with open(f"{args.out}/triton_bench.md", "w") as handle:
        handle.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
