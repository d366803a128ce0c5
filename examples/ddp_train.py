"""Data-parallel training of a BNLSTM with torch.distributed: DDP, optionally with synchronized statistics.

    torchrun --nproc_per_node 2 -m examples.ddp_train                # each rank normalizes over its own rows
    torchrun --nproc_per_node 2 -m examples.ddp_train --sync         # every BN over the global batch
    torchrun --nproc_per_node 2 -m examples.ddp_train --benchmark    # time per step with and without sync

gloo on CPU, NCCL on CUDA (one GPU per rank). The task is tiny and synthetic: classify whether the running sum
of a noisy sequence ends positive, sequences of different lengths (packed), each rank drawing its own shard.
After training, ``update_population_statistics`` re-estimates the population statistics on every rank's
batches pooled together, so every rank evaluates with the same buffers.

``--benchmark`` times training steps (forward, backward, optimizer) of four set-ups at one small shape and
prints the medians on rank 0: DDP without and with synchronized statistics, on the default backend (the cpp
kernels on a CPU, which synchronize frame-wise statistics in their own loops) and on the reference. The sync
cost per step is each backend's synced time minus its plain one.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import pack_padded_sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fused_bnlstm import BNLSTM, convert_sync_bnlstm, update_population_statistics


class Classifier(nn.Module):
    def __init__(self, hidden: int, max_length: int, backend: str):
        super().__init__()
        self.rnn = BNLSTM(1, hidden, max_length=max_length, backend=backend)
        self.head = nn.Linear(hidden, 2)

    def forward(self, packed):
        _, (h_n, _) = self.rnn(packed)
        return self.head(h_n[-1])


def make_batch(generator, batch: int, max_length: int, device):
    """Noisy sequences [T, B, 1] packed by length, and whether each one's sum ends positive."""
    lengths = torch.randint(max_length // 2, max_length + 1, (batch,), generator=generator)
    x = torch.randn(max_length, batch, 1, generator=generator)
    x = x * (torch.arange(max_length).unsqueeze(1) < lengths).unsqueeze(2)
    target = (x.sum((0, 2)) > 0).long()
    return pack_padded_sequence(x.to(device), lengths, enforce_sorted=False), target.to(device)


def train_steps(model, optimizer, generator, args, device, steps: int) -> list[float]:
    """``steps`` training steps; seconds of each."""
    times = []
    for _ in range(steps):
        packed, target = make_batch(generator, args.batch, args.length, device)
        start = time.perf_counter()
        loss = F.cross_entropy(model(packed), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def build(args, device, *, sync: bool, backend: str):
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = Classifier(args.hidden, args.length, backend).to(device)
    if sync:
        convert_sync_bnlstm(model)
    model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, torch.optim.Adam(model.parameters(), lr=args.lr)


def environment(device) -> dict:
    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "commit": commit,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "isa": isa,
        "threads_per_rank": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sync", action="store_true", help="synchronized statistics (convert_sync_bnlstm)")
    parser.add_argument("--benchmark", action="store_true", help="time steps with and without sync")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="sequences per rank")
    parser.add_argument("--length", type=int, default=32, help="longest sequence")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--backend", default="auto", help="BNLSTM backend")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    # torchrun's environment names the group; a caller that already joined one (the tests) keeps it
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # each rank its own shard of the data
    generator = torch.Generator().manual_seed(1000 + rank)
    try:
        if args.benchmark:
            benchmark(args, device, generator, rank, world_size)
        else:
            train(args, device, generator, rank, world_size)
    finally:
        if created:
            dist.destroy_process_group()


def train(args, device, generator, rank, world_size) -> None:
    model, optimizer = build(args, device, sync=args.sync, backend=args.backend)
    times = train_steps(model, optimizer, generator, args, device, args.steps)
    # exact population statistics over every rank's batches (pooled across ranks), then evaluation
    batches = [make_batch(generator, args.batch, args.length, device) for _ in range(4)]
    update_population_statistics(batches, model.module)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for _ in range(4):
            packed, target = make_batch(generator, args.batch, args.length, device)
            correct += int((model(packed).argmax(1) == target).sum())
            total += target.numel()
    # every rank holds the same buffers: compare a checksum
    checksum = torch.stack([b.double().sum() for b in model.module.buffers()]).to(device)
    sums = [torch.zeros_like(checksum) for _ in range(world_size)]
    dist.all_gather(sums, checksum)
    counts = torch.tensor([correct, total], device=device)
    dist.all_reduce(counts)
    if rank == 0:
        same = all(torch.equal(s, sums[0]) for s in sums)
        print(f"{world_size} ranks, sync={args.sync}: {args.steps} steps, median {1e3 * statistics.median(times):.1f} "
              f"ms/step; eval accuracy {int(counts[0]) / int(counts[1]):.3f}; buffers equal on every rank: {same}")


def benchmark(args, device, generator, rank, world_size) -> None:
    setups = {"ddp": dict(sync=False, backend=args.backend), "ddp-sync": dict(sync=True, backend=args.backend),
              "ddp-reference": dict(sync=False, backend="reference"),
              "ddp-sync-reference": dict(sync=True, backend="reference")}
    built = {name: build(args, device, **setup) for name, setup in setups.items()}
    times = {name: [] for name in setups}
    for name, (model, optimizer) in built.items():
        train_steps(model, optimizer, generator, args, device, 3)  # warm-up
    # rounds of a few steps each, the set-ups interleaved, so a change of load hits all of them
    for _ in range(max(1, args.steps // 5)):
        for name, (model, optimizer) in built.items():
            times[name] += train_steps(model, optimizer, generator, args, device, 5)
    model, optimizer = built["ddp-sync-reference"]
    collectives = count_collectives(lambda: train_steps(model, optimizer, generator, args, device, 1))
    latency = all_reduce_latency(torch.zeros(2, 4 * args.hidden, device=device), device)
    medians = torch.tensor([statistics.median(t) for t in times.values()] + [latency], dtype=torch.float64,
                           device=device)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    latency = float(medians[-1])
    if rank == 0:
        env = environment(device)
        print(f"# {world_size} ranks ({'nccl' if device.type == 'cuda' else 'gloo'}), T={args.length} "
              f"B={args.batch}/rank I=1 H={args.hidden}, {len(times['ddp'])} steps each, " +
              ", ".join(f"{k}={v}" for k, v in env.items()))
        for name, median in zip(times, medians.tolist()):
            print(f"{name:14s} {1e3 * median:8.2f} ms/step (median, slowest rank)")
        print(f"sync cost      {1e3 * (medians[1] - medians[0]):8.2f} ms/step on {args.backend}, "
              f"{1e3 * (medians[3] - medians[2]):8.2f} on the reference")
        print(f"the reference's collectives per step: {collectives} (the cpp loops': one fewer per layer call, through "
              f"torch's functional all-reduce); one all-reduce of [2, 4H]: {1e6 * latency:.0f} us (median of 200); "
              f"product {1e3 * collectives * latency:.2f} ms")


def count_collectives(step) -> int:
    """How many all-reduces the package issues through ``dist.all_reduce`` during ``step()`` (DDP's own gradient
    buckets not counted; nor the cpp loops', which call torch's functional all-reduce from C++)."""
    calls = 0
    original = dist.all_reduce

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        step()
    finally:
        dist.all_reduce = original
    return calls


def all_reduce_latency(tensor, device, repeats: int = 200) -> float:
    """Median seconds of one blocking all-reduce of ``tensor``."""
    times = []
    for _ in range(repeats + 10):
        start = time.perf_counter()
        dist.all_reduce(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[10:])


if __name__ == "__main__":
    main()
