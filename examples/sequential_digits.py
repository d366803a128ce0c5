"""BN-LSTM against an LSTM of the same size, pixel by pixel, on sequential and permuted digits (paper §5.1).

Each image is read one pixel per time step (8x8 digits: 64 steps; MNIST: 784) and classified from the last
hidden state. Both models get the authors' recipe: RMSProp (lr 1e-3, decay 0.9), gradient-norm clipping at
1.0, orthogonal W_ih, identity-based W_hh, forget bias 1. The LSTM is ``torch.nn.LSTM``; the BN-LSTM is
``fused_bnlstm.BNLSTM`` (gamma 0.1). Validation accuracy is tracked against training steps; the BN-LSTM is
evaluated with population statistics re-estimated on the training set by
``fused_bnlstm.update_population_statistics`` before every evaluation. The reported test accuracy is the
model at its best validation accuracy.

    python -m examples.sequential_digits                    # 8x8 digits, reduced CPU setting
    python -m examples.sequential_digits --jobs 2           # the four runs on two processes
    python -m examples.sequential_digits --full --mnist DIR # the paper's setting (standard IDX files)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.common import (add_common_arguments, environment, finish_record, init_paper_weights,
                             load_pixel_data, on_running_averages, progress, pyplot, save_figure, seed_everything,
                             setting_name, start_run)
from fused_bnlstm import BNLSTM, update_population_statistics

NAME = "sequential_digits"
TASKS = ("sequential", "permuted")
MODELS = ("lstm", "bnlstm")
SETTINGS = {
    # stats_batches: training batches (of eval_batch) that re-estimate the population statistics before
    # each validation (None: the whole training set); the final test always uses the whole training set.
    "smoke": dict(hidden=8, batch=16, steps=6, eval_every=3, eval_batch=256, stats_batches=1, lr=1e-3),
    "reduced": dict(hidden=100, batch=64, steps=2000, eval_every=100, eval_batch=512, stats_batches=None, lr=1e-3),
    "full": dict(hidden=100, batch=100, steps=100000, eval_every=1000, eval_batch=1000, stats_batches=10,
                 lr=1e-3),
}
PAPER_TEST_ACCURACY = {"sequential": {"lstm": 98.9, "bnlstm": 99.0}, "permuted": {"lstm": 90.2, "bnlstm": 95.4}}


class PixelClassifier(nn.Module):
    """An (BN-)LSTM over pixels [T, B, 1] and a linear readout of the last hidden state."""

    def __init__(self, model: str, hidden: int, seq_len: int, backend: str):
        super().__init__()
        if model == "bnlstm":
            self.rnn = BNLSTM(1, hidden, max_length=seq_len, gamma_init=0.1, backend=backend)
        else:
            self.rnn = nn.LSTM(1, hidden)
        init_paper_weights(self.rnn, recurrent="identity")
        self.readout = nn.Linear(hidden, 10)

    def forward(self, x):
        output, _ = self.rnn(x)
        return self.readout(output[-1])


def _as_sequences(x: np.ndarray, permutation: np.ndarray | None) -> torch.Tensor:
    """[N, T] pixels -> [T, N, 1] time-major float tensor, pixels reordered by ``permutation``."""
    x = torch.from_numpy(x if permutation is None else x[:, permutation])
    return x.t().unsqueeze(2).contiguous()


def _batches(x: torch.Tensor, y: torch.Tensor, size: int, limit: int | None = None):
    """(x [T, b, 1], y [b]) in order; ``limit`` batches at most."""
    count = 0
    for start in range(0, x.shape[1], size):
        if limit is not None and count >= limit:
            return
        yield x[:, start:start + size], y[start:start + size]
        count += 1


@torch.no_grad()
def evaluate(model, x, y, batch, device):
    model.eval()
    correct, loss = 0, 0.0
    for xb, yb in _batches(x, y, batch):
        logits = model(xb.to(device))
        loss += F.cross_entropy(logits, yb.to(device), reduction="sum").item()
        correct += (logits.argmax(1).cpu() == yb).sum().item()
    model.train()
    return 100.0 * correct / x.shape[1], loss / x.shape[1]


def refresh_statistics(model, x, y, batch, limit, device):
    """Exact population statistics over (``limit`` batches of) the training set, in one pass."""
    if isinstance(model.rnn, BNLSTM):
        update_population_statistics(_batches(x, y, batch, limit), model, device=device)


def train_one(job: dict) -> dict:
    """Train one (task, model) pair; returns its record. Top-level so a process pool can run it."""
    cfg, task, model_name = job["cfg"], job["task"], job["model"]
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    seed_everything(job["seed"])
    data = job["data"]
    permutation = data["permutation"] if task == "permuted" else None
    x_train, y_train = _as_sequences(data["train"][0], permutation), torch.from_numpy(data["train"][1])
    x_valid, y_valid = _as_sequences(data["valid"][0], permutation), torch.from_numpy(data["valid"][1])
    x_test, y_test = _as_sequences(data["test"][0], permutation), torch.from_numpy(data["test"][1])
    T = x_train.shape[0]

    torch.manual_seed(job["seed"])
    model = PixelClassifier(model_name, cfg["hidden"], T, job["backend"]).to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=cfg["lr"], alpha=0.9)
    generator = torch.Generator().manual_seed(job["seed"] + 1)
    order, cursor = torch.randperm(x_train.shape[1], generator=generator), 0

    history = {"step": [], "valid_accuracy": [], "valid_loss": [], "train_loss": [], "elapsed_s": []}
    best = {"valid_accuracy": -1.0, "step": 0, "state": None}
    running_loss, running_count, train_time = 0.0, 0, 0.0
    bar = progress(cfg["steps"], f"{task:>10} {model_name:>6}", disable=job["no_progress"], position=job["position"])
    for step in range(1, cfg["steps"] + 1):
        start = time.perf_counter()
        if cursor + cfg["batch"] > order.numel():
            order, cursor = torch.randperm(x_train.shape[1], generator=generator), 0
        idx = order[cursor:cursor + cfg["batch"]]
        cursor += cfg["batch"]
        logits = model(x_train[:, idx].to(device))
        loss = F.cross_entropy(logits, y_train[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_time += time.perf_counter() - start
        running_loss += loss.item()
        running_count += 1
        bar.update()
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            # Evaluate a copy, so the training run keeps its own running (momentum) statistics.
            evaluated = copy.deepcopy(model)
            refresh_statistics(evaluated, x_train, y_train, cfg["eval_batch"], cfg["stats_batches"], device)
            accuracy, valid_loss = evaluate(evaluated, x_valid, y_valid, cfg["eval_batch"], device)
            history["step"].append(step)
            history["valid_accuracy"].append(accuracy)
            history["valid_loss"].append(valid_loss)
            history["train_loss"].append(running_loss / running_count)
            history["elapsed_s"].append(train_time)
            running_loss, running_count = 0.0, 0
            bar.set_postfix(valid_acc=f"{accuracy:.1f}")
            if accuracy > best["valid_accuracy"]:
                best = {"valid_accuracy": accuracy, "step": step, "state": evaluated.state_dict(),
                        "running_state": copy.deepcopy(model.state_dict())}
    bar.close()

    result = {"task": task, "model": model_name, "history": history, "best_valid_accuracy": best["valid_accuracy"],
              "best_step": best["step"], "train_seconds": train_time}
    if model_name == "bnlstm":
        # For comparison: the running (momentum 0.1) averages training kept, instead of the exact re-estimate.
        model.load_state_dict(best["running_state"])
        with on_running_averages():
            result["test_accuracy_running_stats"] = evaluate(model, x_test, y_test, cfg["eval_batch"], device)[0]
    model.load_state_dict(best["state"])
    refresh_statistics(model, x_train, y_train, cfg["eval_batch"], None, device)
    result["test_accuracy"], result["test_loss"] = evaluate(model, x_test, y_test, cfg["eval_batch"], device)
    return result


def run(args) -> dict:
    setting = setting_name(args)
    cfg = dict(SETTINGS[setting])
    for key in ("steps", "hidden", "batch", "eval_every"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = start_run(args)
    data, is_mnist = load_pixel_data(args)
    dataset = "MNIST (784 steps)" if is_mnist else "scikit-learn 8x8 digits (64 steps)"
    T = data["train"][0].shape[1]
    data["permutation"] = np.random.RandomState(args.seed).permutation(T)

    tasks = args.tasks or list(TASKS)
    jobs = []
    # The slower BN-LSTM runs first, so that on a pool they run side by side and the LSTMs fill in after.
    for model_name in reversed(MODELS):
        for task in tasks:
            jobs.append(dict(cfg=cfg, task=task, model=model_name, seed=args.seed, data=data, device=str(device),
                             backend=args.backend, no_progress=args.no_progress, position=None,
                             threads=args.threads if args.jobs <= 1 else (args.threads or 1)))
    if args.jobs > 1:
        for k, job in enumerate(jobs):
            job["position"] = k
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(train_one, jobs))
    else:
        results = [train_one(job) for job in jobs]

    runs = {task: {} for task in tasks}
    for result in results:
        runs[result["task"]][result["model"]] = result
    record = {
        "experiment": NAME,
        "setting": setting,
        "dataset": dataset,
        "config": {**cfg, "jobs": args.jobs, "threads_per_run": jobs[0]["threads"] or torch.get_num_threads(), "seq_len": T, "seed": args.seed, "optimizer": "RMSprop(lr, alpha=0.9)",
                   "grad_clip_norm": 1.0, "init": "orthogonal W_ih, identity g-block of W_hh, forget bias 1",
                   "bnlstm": "gamma_init 0.1, max_length = seq_len, frame-wise statistics",
                   "lstm": "torch.nn.LSTM", "split_sizes": {k: int(data[k][0].shape[0])
                                                             for k in ("train", "valid", "test")}},
        "environment": environment(device, args.backend),
        "runs": runs,
        "paper_mnist_test_accuracy": PAPER_TEST_ACCURACY,
        "summary": {task: {m: {"best_valid_accuracy": r["best_valid_accuracy"], "test_accuracy": r["test_accuracy"],
                               "best_step": r["best_step"], "train_seconds": r["train_seconds"]}
                           for m, r in by_model.items()} for task, by_model in runs.items()},
    }
    return finish_record(record, Path(args.out), NAME, plot)


def plot(record: dict, out: Path) -> Path:
    plt = pyplot()
    tasks = list(record["runs"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.4), squeeze=False)
    style = {"lstm": dict(color="tab:blue", label="LSTM"), "bnlstm": dict(color="tab:red", label="BN-LSTM")}
    for ax, task in zip(axes[0], tasks):
        for model_name, result in record["runs"][task].items():
            h = result["history"]
            ax.plot(h["step"], h["valid_accuracy"], marker=".", **style[model_name])
        ax.set(title=f"{task} ({record['dataset']})", xlabel="training steps", ylabel="validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    cfg = record["config"]
    fig.suptitle(f"hidden {cfg['hidden']}, batch {cfg['batch']}, RMSProp lr {cfg['lr']}, "
                 f"{cfg['steps']} steps ({record['setting']} setting); BN-LSTM with re-estimated population stats")
    return save_figure(fig, out, NAME)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--mnist", type=Path, default=None,
                        help="folder with the standard MNIST IDX files (never downloaded); default: 8x8 digits")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    parser.add_argument("--jobs", type=int, default=1, help="run the (task, model) pairs on this many processes")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    record = run(parser.parse_args(argv))
    for task, by_model in record["summary"].items():
        for model_name, s in by_model.items():
            print(f"{task:>10} {model_name:>6}: best valid {s['best_valid_accuracy']:.2f}% at step {s['best_step']}, "
                  f"test {s['test_accuracy']:.2f}% ({s['train_seconds']:.0f} s training)")
    print(f"wrote {record['json']} and {record['png']}")


if __name__ == "__main__":
    main()
