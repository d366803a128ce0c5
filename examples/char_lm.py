"""Character-level language modelling, BN-LSTM against LSTM (paper §5.2 Penn Treebank, §5.3 text8).

Both models read one-hot characters and predict the next one; bits per character (bpc) are measured on a
held-out split (contiguous 90/5/5 train/valid/test split of the text). Recipe after the authors' PTB
setting: Adam (lr 2e-3), gradient-norm clipping at 1.0, orthogonal initialization, forget bias 1, training
on random windows of ``seq_len`` characters from a zero state. The BN-LSTM (gamma 0.1) has a fixed
``max_length = seq_len``, so at evaluation every step past the training length uses the last slot's
population statistics; these are re-estimated exactly on training windows by
``fused_bnlstm.update_population_statistics`` before every evaluation.

The generalization test (the paper's Figure 3b) scores the same test characters cut into sequences of
1, 2, 4, ... times the training length, each from a zero state.

    python -m examples.char_lm                         # Python's own reference text (pydoc_data.topics)
    python -m examples.char_lm --text FILE             # any plain-text file (PTB: ptb.char.train.txt etc.)
    python -m examples.char_lm --full --text FILE      # the paper's PTB sizes (1000 units, length 100)
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.common import (add_common_arguments, environment, finish_record, init_paper_weights, progress,
                             pyplot, save_figure, seed_everything, setting_name, start_run)
from fused_bnlstm import BNLSTM, update_population_statistics

NAME = "char_lm"
MODELS = ("lstm", "bnlstm")
SETTINGS = {
    # stats_batches: training batches of windows (eval_batch each) that re-estimate the population
    # statistics; max_eval_chars caps each held-out split; length_multiples: the generalization test.
    "smoke": dict(hidden=16, seq_len=10, batch=8, steps=4, eval_every=2, lr=2e-3, eval_batch=64,
                  stats_batches=1, max_eval_chars=2000, length_multiples=(1, 2, 4)),
    "reduced": dict(hidden=128, seq_len=50, batch=32, steps=3000, eval_every=250, lr=2e-3, eval_batch=256,
                    stats_batches=8, max_eval_chars=None, length_multiples=(1, 2, 4, 8, 16)),
    "full": dict(hidden=1000, seq_len=100, batch=64, steps=40000, eval_every=1000, lr=2e-3, eval_batch=256,
                 stats_batches=40, max_eval_chars=None, length_multiples=(1, 2, 3, 5, 10)),
}
# Cooijmans et al., Table 2 / 3: test bits per character.
PAPER_BPC = {"penn_treebank": {"lstm": 1.38, "bnlstm": 1.32}, "text8": {"lstm": 1.43, "bnlstm": 1.36}}


def default_text() -> tuple[str, str]:
    """Real English prose the standard library ships: the Python Language Reference topics (pydoc)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics)), "pydoc_data.topics (Python language reference)"


def split_text(text: str, vocab: list[str]):
    index = {ch: k for k, ch in enumerate(vocab)}
    encoded = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    n = encoded.numel()
    a, b = int(n * 0.9), int(n * 0.95)
    return {"train": encoded[:a], "valid": encoded[a:b], "test": encoded[b:]}


class CharModel(nn.Module):
    """One-hot characters [T, B] -> (BN-)LSTM -> logits [T, B, V]."""

    def __init__(self, model: str, vocab_size: int, hidden: int, seq_len: int, backend: str):
        super().__init__()
        self.vocab_size = vocab_size
        if model == "bnlstm":
            self.rnn = BNLSTM(vocab_size, hidden, max_length=seq_len, gamma_init=0.1, backend=backend)
        else:
            self.rnn = nn.LSTM(vocab_size, hidden)
        init_paper_weights(self.rnn, recurrent="orthogonal")
        self.readout = nn.Linear(hidden, vocab_size)

    def forward(self, ids):
        x = F.one_hot(ids, self.vocab_size).to(self.readout.weight.dtype)  # [T, B, V]
        output, _ = self.rnn(x)
        return self.readout(output)


def _segments(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping (input, target) windows: [length + 1, N] with consecutive windows sharing an end."""
    n = (ids.numel() - 1) // length
    starts = torch.arange(n) * length
    return torch.stack([ids[s:s + length + 1] for s in starts.tolist()], dim=1)


@torch.no_grad()
def bits_per_char(model, ids: torch.Tensor, length: int, batch: int, device) -> float:
    """Mean bpc over every character of ``ids`` cut into sequences of ``length``, each from a zero state."""
    model.eval()
    windows = _segments(ids, length)
    total, count = 0.0, 0
    for start in range(0, windows.shape[1], batch):
        w = windows[:, start:start + batch].to(device)
        logits = model(w[:-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[1:].reshape(-1), reduction="sum").item()
        count += w[1:].numel()
    model.train()
    return total / count / math.log(2)


def refresh_statistics(model, train_ids, cfg, limit, device, generator):
    """Exact population statistics over ``limit`` batches of random training windows (None: 4x as many)."""
    if not isinstance(model.rnn, BNLSTM):
        return
    batches = limit if limit is not None else 4 * cfg["stats_batches"]
    loader = [_random_windows(train_ids, cfg["seq_len"], cfg["eval_batch"], generator)[:-1] for _ in range(batches)]
    update_population_statistics(loader, model, device=device)


def _random_windows(ids, length, batch, generator):
    starts = torch.randint(0, ids.numel() - length - 1, (batch,), generator=generator)
    return torch.stack([ids[s:s + length + 1] for s in starts.tolist()], dim=1)  # [length + 1, batch]


def train_one(job: dict) -> dict:
    cfg, model_name = job["cfg"], job["model"]
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    seed_everything(job["seed"])
    splits, V = job["splits"], job["vocab_size"]
    T = cfg["seq_len"]
    torch.manual_seed(job["seed"])
    model = CharModel(model_name, V, cfg["hidden"], T, job["backend"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    generator = torch.Generator().manual_seed(job["seed"] + 1)
    stats_generator = torch.Generator().manual_seed(job["seed"] + 2)

    history = {"step": [], "valid_bpc": [], "train_bpc": [], "elapsed_s": []}
    best = {"valid_bpc": math.inf, "step": 0, "state": None}
    running, running_count, train_time = 0.0, 0, 0.0
    bar = progress(cfg["steps"], f"{model_name:>6}", disable=job["no_progress"], position=job["position"])
    for step in range(1, cfg["steps"] + 1):
        start = time.perf_counter()
        w = _random_windows(splits["train"], T, cfg["batch"], generator).to(device)
        logits = model(w[:-1])
        loss = F.cross_entropy(logits.reshape(-1, V), w[1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_time += time.perf_counter() - start
        running += loss.item() / math.log(2)
        running_count += 1
        bar.update()
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            refresh_statistics(model, splits["train"], cfg, cfg["stats_batches"], device, stats_generator)
            valid = bits_per_char(model, splits["valid"], T, cfg["eval_batch"], device)
            history["step"].append(step)
            history["valid_bpc"].append(valid)
            history["train_bpc"].append(running / running_count)
            history["elapsed_s"].append(train_time)
            running, running_count = 0.0, 0
            bar.set_postfix(valid_bpc=f"{valid:.3f}")
            if valid < best["valid_bpc"]:
                best = {"valid_bpc": valid, "step": step, "state": copy.deepcopy(model.state_dict())}
    bar.close()

    model.load_state_dict(best["state"])
    refresh_statistics(model, splits["train"], cfg, None, device, stats_generator)
    lengths = [T * m for m in cfg["length_multiples"]]
    # The same characters for every length: the longest multiple of the longest length (plus one target).
    usable = ((splits["test"].numel() - 1) // lengths[-1]) * lengths[-1] + 1
    test_region = splits["test"][:usable]
    by_length = {str(L): bits_per_char(model, test_region, L, cfg["eval_batch"], device) for L in lengths}
    return {"model": model_name, "history": history, "best_valid_bpc": best["valid_bpc"], "best_step": best["step"],
            "test_bpc": bits_per_char(model, splits["test"], T, cfg["eval_batch"], device),
            "test_bpc_by_length": by_length, "length_test_chars": usable - 1, "train_seconds": train_time}


def run(args) -> dict:
    setting = setting_name(args)
    cfg = dict(SETTINGS[setting])
    for key in ("steps", "hidden", "batch", "seq_len", "eval_every"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["length_multiples"] = list(cfg["length_multiples"])
    device = start_run(args)
    if args.text is not None:
        text, source = Path(args.text).read_text(encoding="utf-8", errors="replace"), str(args.text)
    else:
        text, source = default_text()
    vocab = sorted(set(text))
    splits = split_text(text, vocab)
    if cfg["max_eval_chars"] is not None:
        splits["valid"] = splits["valid"][:cfg["max_eval_chars"]]
        splits["test"] = splits["test"][:cfg["max_eval_chars"]]

    jobs = [dict(cfg=cfg, model=m, seed=args.seed, splits=splits, vocab_size=len(vocab), device=str(device),
                 backend=args.backend, no_progress=args.no_progress, position=None,
                 threads=args.threads if args.jobs <= 1 else (args.threads or 1)) for m in reversed(MODELS)]
    if args.jobs > 1:
        for k, job in enumerate(jobs):
            job["position"] = k
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(train_one, jobs))
    else:
        results = [train_one(job) for job in jobs]
    runs = {r["model"]: r for r in results}

    record = {
        "experiment": NAME,
        "setting": setting,
        "text": {"source": source, "chars": len(text), "vocab_size": len(vocab),
                 "split_chars": {k: int(v.numel()) for k, v in splits.items()}},
        "config": {**cfg, "jobs": args.jobs, "threads_per_run": jobs[0]["threads"] or torch.get_num_threads(), "seed": args.seed, "optimizer": "Adam(lr)", "grad_clip_norm": 1.0,
                   "init": "orthogonal W_ih and W_hh gate blocks, forget bias 1",
                   "bnlstm": "gamma_init 0.1, max_length = seq_len (later steps use the last slot)",
                   "lstm": "torch.nn.LSTM", "input": "one-hot characters"},
        "environment": environment(device, args.backend),
        "runs": runs,
        "paper_test_bpc": PAPER_BPC,
        "summary": {m: {"best_valid_bpc": r["best_valid_bpc"], "test_bpc": r["test_bpc"],
                        "test_bpc_by_length": r["test_bpc_by_length"], "best_step": r["best_step"],
                        "train_seconds": r["train_seconds"]} for m, r in runs.items()},
    }
    return finish_record(record, Path(args.out), NAME, plot)


def plot(record: dict, out: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    style = {"lstm": dict(color="tab:blue", label="LSTM"), "bnlstm": dict(color="tab:red", label="BN-LSTM")}
    for model_name, r in record["runs"].items():
        h = r["history"]
        axes[0].plot(h["step"], h["valid_bpc"], marker=".", **style[model_name])
        lengths = [int(L) for L in r["test_bpc_by_length"]]
        axes[1].plot(lengths, list(r["test_bpc_by_length"].values()), marker="o", **style[model_name])
    T = record["config"]["seq_len"]
    axes[0].set(title="validation bits per character", xlabel="training steps", ylabel="bpc")
    axes[1].axvline(T, color="0.5", ls=":", label=f"training length {T}")
    axes[1].set(title="test bpc vs evaluation sequence length (same characters)", xlabel="sequence length",
                ylabel="bpc", xscale="log")
    lengths = [T * m for m in record["config"]["length_multiples"]]
    axes[1].minorticks_off()
    axes[1].set_xticks(lengths, [str(L) for L in lengths])
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    cfg = record["config"]
    fig.suptitle(f"{record['text']['source']} ({record['text']['chars']} chars), hidden {cfg['hidden']}, "
                 f"length {T}, batch {cfg['batch']}, {cfg['steps']} steps ({record['setting']} setting)")
    return save_figure(fig, out, NAME)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--text", type=Path, default=None, help="a plain-text file (default: pydoc_data.topics)")
    parser.add_argument("--jobs", type=int, default=1, help="train the two models on this many processes")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    record = run(parser.parse_args(argv))
    for model_name, s in record["summary"].items():
        lengths = ", ".join(f"{L}: {v:.3f}" for L, v in s["test_bpc_by_length"].items())
        print(f"{model_name:>6}: best valid {s['best_valid_bpc']:.3f} bpc at step {s['best_step']}, "
              f"test {s['test_bpc']:.3f} bpc; by length {lengths} ({s['train_seconds']:.0f} s training)")
    print(f"wrote {record['json']} and {record['png']}")


if __name__ == "__main__":
    main()
