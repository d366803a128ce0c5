"""Why evaluating a BN-LSTM on its running averages fails on the pixel tasks, measured (issue #16).

Trains the BN-LSTM of ``examples.sequential_digits`` (same data, model, optimizer and seed), then compares,
at the last step, the population statistics training kept (running averages, momentum 0.1, as
``BatchNorm1d``) with the exact ones ``fused_bnlstm.update_population_statistics`` computes in one pass at
the final weights:

- test accuracy with each;
- slot by slot, how far the running means are from the exact ones, in exact standard deviations
  (``|mean_run - mean_exact| / sqrt(var_exact + eps)``, the error BN's output sees) and the exact variances
  (near zero: the quantity is the same for every sequence at that step);
- which slots cost the accuracy: every slot exact except one quantity at one step on the running averages,
  the first slots exact and the rest running, means and variances separately;
- whether the averages only lag the weights: the weights frozen after training, more training-mode batches
  (momentum 0.1 or a cumulative average) and the accuracy again.

    python -m examples.population_statistics                          # both tasks, 2000 steps (~5 min)
    python -m examples.population_statistics --final-lr 1e-4 --final-lr-steps 100
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.common import (add_common_arguments, environment, finish_record, load_digits_split,
                             on_running_averages, progress, pyplot, save_figure, seed_everything, setting_name,
                             start_run)
from examples.sequential_digits import PixelClassifier, _as_sequences, _batches, evaluate
from fused_bnlstm import update_population_statistics

NAME = "population_statistics"
TASKS = ("sequential", "permuted")
QUANTITIES = ("ih", "hh", "c")
# frozen_batches: training-mode batches run at the final weights; epoch_batches: the cumulative average's
# pass (None: one epoch). "full" is "reduced": the question is about these sizes, not the paper's.
_REDUCED = dict(hidden=100, batch=64, steps=2000, eval_batch=512, lr=1e-3, frozen_batches=(10, 50, 200),
                epoch_batches=None)
SETTINGS = {
    "smoke": dict(hidden=8, batch=16, steps=6, eval_batch=256, lr=1e-3, frozen_batches=(2, 4), epoch_batches=2),
    "reduced": _REDUCED,
    "full": _REDUCED,
}


def _stats(model) -> dict:
    """{q: (mean [T, F], var [T, F])} float64 of the (one-layer) BN-LSTM, the slots of the sequence only."""
    rnn, T = model.rnn, int(model.rnn.running_length)
    return {q: (getattr(rnn, f"running_mean_{q}_l0")[:T].double(), getattr(rnn, f"running_var_{q}_l0")[:T].double())
            for q in QUANTITIES}


def _mixed(running_model, exact_model, use_exact) -> nn.Module:
    """A copy of ``running_model`` whose slots where ``use_exact(q, kind)`` ([T] bool) is set hold the exact
    statistics instead."""
    model = copy.deepcopy(running_model)
    T = int(model.rnn.running_length)
    with torch.no_grad():
        for q in QUANTITIES:
            for kind in ("mean", "var"):
                name = f"running_{kind}_{q}_l0"
                mask = use_exact(q, kind)
                getattr(model.rnn, name)[:T][mask] = getattr(exact_model.rnn, name)[:T][mask]
    return model


def train_and_compare(task: str, cfg: dict, data: dict, args, device) -> dict:
    seed_everything(args.seed)
    permutation = data["permutation"] if task == "permuted" else None
    sets = {k: (_as_sequences(data[k][0], permutation), torch.from_numpy(data[k][1])) for k in ("train", "test")}
    x_train, y_train = sets["train"]
    T = x_train.shape[0]
    torch.manual_seed(args.seed)
    model = PixelClassifier("bnlstm", cfg["hidden"], T, args.backend).to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=cfg["lr"], alpha=0.9)
    generator = torch.Generator().manual_seed(args.seed + 1)
    order, cursor = torch.randperm(x_train.shape[1], generator=generator), 0
    bar = progress(cfg["steps"], f"{task:>10} bnlstm", disable=args.no_progress)
    start = time.perf_counter()
    for step in range(1, cfg["steps"] + 1):  # as examples.sequential_digits.train_one
        if step > cfg["steps"] - args.final_lr_steps:
            for group in optimizer.param_groups:
                group["lr"] = args.final_lr
        if cursor + cfg["batch"] > order.numel():
            order, cursor = torch.randperm(x_train.shape[1], generator=generator), 0
        idx = order[cursor:cursor + cfg["batch"]]
        cursor += cfg["batch"]
        loss = F.cross_entropy(model(x_train[:, idx].to(device)), y_train[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.update()
    bar.close()
    train_seconds = time.perf_counter() - start

    def accuracy(m):
        with on_running_averages():  # most of these evaluations are on running averages on purpose
            return evaluate(m, *sets["test"], cfg["eval_batch"], device)[0]

    exact = copy.deepcopy(model)
    update_population_statistics(_batches(x_train, y_train, cfg["eval_batch"]), exact, device=device)
    eps = model.rnn.eps
    running_stats, exact_stats = _stats(model), _stats(exact)
    per_slot = {}
    for q in QUANTITIES:
        (mean_r, var_r), (mean_e, var_e) = running_stats[q], exact_stats[q]
        z = (mean_r - mean_e).abs() / (var_e + eps).sqrt()
        ratio = (var_r + eps) / (var_e + eps)
        per_slot[q] = {"mean_error_max": z.max(1).values, "mean_error_median": z.median(1).values,
                       "var_ratio_max": ratio.max(1).values, "var_ratio_min": ratio.min(1).values,
                       "exact_var_max": var_e.max(1).values}
    steps = torch.arange(T)
    everywhere = lambda value: torch.full((T,), bool(value))  # noqa: E731
    hybrids = {
        "running": accuracy(model),
        "exact": accuracy(exact),
        "exact slot 0, running after": accuracy(_mixed(model, exact, lambda q, kind: steps < 1)),
        "exact slots 0-1, running after": accuracy(_mixed(model, exact, lambda q, kind: steps < 2)),
        "exact slots 0-7, running after": accuracy(_mixed(model, exact, lambda q, kind: steps < 8)),
        "running means, exact variances": accuracy(_mixed(model, exact, lambda q, kind: everywhere(kind == "var"))),
        "exact means, running variances": accuracy(_mixed(model, exact, lambda q, kind: everywhere(kind == "mean"))),
    }
    for quantity in QUANTITIES:
        hybrids[f"running {quantity} only"] = accuracy(_mixed(model, exact, lambda q, kind: everywhere(q != quantity)))
    for quantity in QUANTITIES:
        for t in range(min(3, T)):
            hybrids[f"running ({quantity}, step {t}) only"] = accuracy(
                _mixed(model, exact, lambda q, kind: ~((steps == t) & (q == quantity))))

    # Frozen weights: more training-mode batches, no optimizer step. If the averages only lag, they catch up.
    frozen = {}
    refresh_generator = torch.Generator().manual_seed(args.seed + 2)

    def refresh(base, batches, momentum):
        m = copy.deepcopy(base)
        m.rnn.momentum = momentum
        if momentum is None:
            m.rnn.reset_running_stats()
        m.train()
        with torch.no_grad():
            for _ in range(batches):
                idx = torch.randperm(x_train.shape[1], generator=refresh_generator)[:cfg["batch"]]
                m(x_train[:, idx].to(device))
        return accuracy(m)

    for batches in cfg["frozen_batches"]:
        frozen[f"momentum 0.1, {batches} more batches"] = refresh(model, batches, 0.1)
    epoch = cfg["epoch_batches"] or max(1, x_train.shape[1] // cfg["batch"])
    frozen[f"momentum None from reset, {epoch} batches (~one epoch)"] = refresh(model, epoch, None)
    return {"task": task, "train_seconds": train_seconds, "final_train_loss": loss.item(),
            "test_accuracy": hybrids, "frozen_weights_test_accuracy": frozen, "per_slot": per_slot,
            "gamma_c_abs_max": model.rnn.gamma_c_l0.abs().max().item()}


def run(args) -> dict:
    setting = setting_name(args)
    cfg = dict(SETTINGS[setting])
    for key in ("steps", "hidden", "batch"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = start_run(args)
    data = load_digits_split(args.seed)
    data["permutation"] = np.random.RandomState(args.seed).permutation(data["train"][0].shape[1])
    tasks = args.tasks or list(TASKS)
    runs = {task: train_and_compare(task, cfg, data, args, device) for task in tasks}
    record = {
        "experiment": NAME,
        "setting": setting,
        "dataset": "scikit-learn 8x8 digits (64 steps)",
        "config": {**cfg, "seed": args.seed, "final_lr": args.final_lr, "final_lr_steps": args.final_lr_steps,
                   "optimizer": "RMSprop(lr, alpha=0.9)", "momentum": 0.1, "eps": 1e-5,
                   "model": "examples.sequential_digits.PixelClassifier('bnlstm')", "evaluated_at": "last step"},
        "environment": environment(device, args.backend),
        "runs": runs,
    }
    return finish_record(record, Path(args.out), NAME, plot)


def plot(record: dict, out: Path) -> Path:
    plt = pyplot()
    tasks = list(record["runs"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 7.5), squeeze=False)
    colors = {"ih": "tab:blue", "hh": "tab:orange", "c": "tab:green"}
    for col, task in enumerate(tasks):
        run_ = record["runs"][task]
        for q in QUANTITIES:
            slot = run_["per_slot"][q]
            axes[0][col].semilogy([max(v, 1e-6) for v in slot["mean_error_max"]], color=colors[q], label=q)
            axes[1][col].semilogy([max(v, 1e-20) for v in slot["exact_var_max"]], color=colors[q], label=q)
        acc = run_["test_accuracy"]
        axes[0][col].set(title=f"{task}: test acc. running {acc['running']:.1f} %, exact {acc['exact']:.1f} %",
                         xlabel="step (statistics slot)", ylabel="max |mean_run - mean_exact| / sqrt(var + eps)")
        axes[1][col].axhline(1e-5, color="gray", linestyle=":", label="eps")
        axes[1][col].set(xlabel="step (statistics slot)", ylabel="largest exact variance over features")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(loc="best")
    fig.suptitle("BN-LSTM running averages (momentum 0.1) against exact re-estimates at the final weights")
    return save_figure(fig, out, NAME)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--final-lr", type=float, default=1e-3, help="learning rate of the last --final-lr-steps")
    parser.add_argument("--final-lr-steps", type=int, default=0)
    record = run(parser.parse_args(argv))
    for task, r in record["runs"].items():
        print(f"{task}: test accuracy")
        for name, value in {**r["test_accuracy"], **r["frozen_weights_test_accuracy"]}.items():
            print(f"  {name:>55}: {value:5.1f} %")
    print(f"wrote {record['json']} and {record['png']}")


if __name__ == "__main__":
    main()
