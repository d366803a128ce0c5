"""Side-by-side CPU timing of the compiled backend: BNLSTM(backend="cpp") against torch.nn.LSTM and the reference.

    python csrc/bench_cpu.py --threads 1 --reps 9
    python csrc/bench_cpu.py --threads 2 --reps 15 --shapes 784,64,1,100

Every candidate runs once to warm up, then the candidates take turns, ``--reps`` rounds, so that load from
other processes falls on all of them alike; the table gives medians (and minima). With one thread it also
reports the calling thread's CPU time (``time.thread_time``), which other processes on a shared machine
disturb much less than the wall clock. Forward+backward is one training step (``(out.sum() + h_n.sum())
.backward()`` through the module, statistics update included); eval is the module's forward under no_grad.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import time

import torch

from fused_bnlstm import BNLSTM


def candidates(I, H):
    torch.manual_seed(0)
    return {
        "nn.LSTM": torch.nn.LSTM(I, H),
        "cpp frame": BNLSTM(I, H, backend="cpp"),
        "cpp None": BNLSTM(I, H, backend="cpp", normalization=None),
        "reference frame": BNLSTM(I, H, backend="reference"),
    }


def train_step(module, x):
    module.train()
    x = x.clone().requires_grad_()
    out, (h_n, _) = module(x)
    (out.sum() + h_n.sum()).backward()


def eval_step(module, x):
    module.eval()
    with torch.no_grad():
        module(x)


def measure(T, B, I, H, reps, reference_every):
    x = torch.randn(T, B, I)
    modules = candidates(I, H)
    runs = {}
    for name, module in modules.items():
        runs[f"train {name}"] = (train_step, module)
        if name != "reference frame":
            runs[f"eval {name}"] = (eval_step, module)
    wall = {key: [] for key in runs}
    cpu = {key: [] for key in runs}
    for step, module in runs.values():
        step(module, x)
    for rep in range(reps):
        for key, (step, module) in runs.items():
            if key == "train reference frame" and rep % reference_every:
                continue
            c0, w0 = time.thread_time(), time.perf_counter()
            step(module, x)
            wall[key].append(time.perf_counter() - w0)
            cpu[key].append(time.thread_time() - c0)
    return wall, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--reference-every", type=int, default=3, help="time the slow reference every k rounds")
    parser.add_argument("--shapes", nargs="*", default=["784,64,1,100", "100,64,50,256"], help="T,B,I,H")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fused_bnlstm import _C

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, threads={torch.get_num_threads()}, "
          f"kernels={_C.kernel_isa()}, brgemm={_C.uses_brgemm()}, float32")
    for shape in args.shapes:
        T, B, I, H = (int(v) for v in shape.split(","))
        wall, cpu = measure(T, B, I, H, args.reps, args.reference_every)
        med = {k: statistics.median(v) for k, v in wall.items()}
        cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
        print(f"\n## T={T} B={B} I={I} H={H}")
        print("| run | wall median ms | wall min ms | thread CPU median ms | vs nn.LSTM (wall) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for key in wall:
            base = med["train nn.LSTM"] if key.startswith("train") else med["eval nn.LSTM"]
            print(f"| {key} | {med[key] * 1e3:.1f} | {min(wall[key]) * 1e3:.1f} | {cpu_med[key] * 1e3:.1f} | "
                  f"{med[key] / base:.2f}x |")
        print(f"reference / cpp frame, train: {med['train reference frame'] / med['train cpp frame']:.1f}x (wall), "
              f"{cpu_med['train reference frame'] / cpu_med['train cpp frame']:.1f}x (thread CPU)")


if __name__ == "__main__":
    main()
