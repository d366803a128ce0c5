"""A stateful word-level language model over a stream (truncated BPTT), and its population statistics.

The pattern of ``pytorch/examples``' word language model with ``nn.LSTM`` swapped for ``BNLSTM``: the
training text is one long stream of tokens cut into ``batch`` parallel columns, read in chunks of ``bptt``
tokens with the hidden state carried from chunk to chunk (detached), so the model sees positions 0, 1, 2,
... of each column. Every chunk passes ``time_offset=position`` (its first token's position in the stream):
the first ``max_length - 1`` positions (the warm-up from the zero state) each get their own statistics
slot, every later position shares the last one (the paper's practice past T_max; training warns once when
it gets there).

After training, the population statistics are estimated three ways and the validation stream scored with
each (eval mode, state carried, ``time_offset=position`` as in training):

- ``running``: the running averages training kept (momentum 0.1);
- ``restart``: ``update_population_statistics(chunks, model)``, the ``(x,)`` pattern: every chunk runs from a
  zero state at offset 0, which is not what the model sees in a stream;
- ``carried``: ``update_population_statistics(chunks, model, forward=CarryState())``: the chunks run in
  stream order with the state carried and ``time_offset=position``, exactly as in training and evaluation.

    python -m examples.stateful_lm            # words of the Python reference (pydoc_data.topics), ~2 min
    python -m examples.stateful_lm --text FILE
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.common import (add_common_arguments, environment, finish_record, init_paper_weights,
                             on_running_averages, progress, pyplot, save_figure, setting_name, start_run)
from fused_bnlstm import BNLSTM, update_population_statistics

NAME = "stateful_lm"
SETTINGS = {
    "smoke": dict(vocab=200, emb=16, hidden=16, batch=8, bptt=10, max_length=25, steps=8, lr=2e-3,
                  max_chars=20000),
    "reduced": dict(vocab=5000, emb=128, hidden=256, batch=20, bptt=35, max_length=105, steps=1000, lr=2e-3,
                    max_chars=None),
    "full": dict(vocab=10000, emb=650, hidden=650, batch=20, bptt=35, max_length=105, steps=20000, lr=2e-3,
                 max_chars=None),
}


def load_words(path: Path | None, max_chars: int | None, vocab_size: int):
    """Tokens of a text (words and punctuation, lower-cased), the ``vocab_size - 1`` most frequent kept and the
    rest ``<unk>``; contiguous 90/5/5 split. Default text: the Python reference the standard library ships."""
    if path is None:
        from pydoc_data.topics import topics

        text, source = "\n".join(topics[key] for key in sorted(topics)), "pydoc_data.topics"
    else:
        text, source = Path(path).read_text(encoding="utf-8", errors="replace"), str(path)
    words = re.findall(r"\w+|[^\w\s]", text[:max_chars].lower())
    vocab = ["<unk>"] + [w for w, _ in Counter(words).most_common(vocab_size - 1)]
    index = {w: k for k, w in enumerate(vocab)}
    ids = torch.tensor([index.get(w, 0) for w in words], dtype=torch.long)
    a, b = int(len(ids) * 0.9), int(len(ids) * 0.95)
    return {"train": ids[:a], "valid": ids[a:b], "test": ids[b:]}, vocab, source


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """A stream [N] -> [N // batch, batch]: ``batch`` parallel columns, each a contiguous part of the stream."""
    n = ids.numel() // batch
    return ids[:n * batch].view(batch, n).t().contiguous()


def chunks(stream: torch.Tensor, bptt: int):
    """(input [L, B], target [L, B], position) for consecutive chunks of a batchified stream."""
    for position in range(0, stream.shape[0] - 1, bptt):
        length = min(bptt, stream.shape[0] - 1 - position)
        yield stream[position:position + length], stream[position + 1:position + 1 + length], position


class WordLM(nn.Module):
    """Embedding -> BNLSTM -> linear readout, called as ``model(tokens, hidden, time_offset=position)``."""

    def __init__(self, vocab: int, emb: int, hidden: int, max_length: int, backend: str):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.rnn = BNLSTM(emb, hidden, max_length=max_length, gamma_init=0.1, backend=backend)
        init_paper_weights(self.rnn, recurrent="orthogonal")
        self.readout = nn.Linear(hidden, vocab)

    def forward(self, tokens, hidden=None, time_offset: int = 0):
        output, hidden = self.rnn(self.embed(tokens), hidden, time_offset=time_offset)
        return self.readout(output), hidden


class CarryState:
    """``forward=`` for ``update_population_statistics`` on a stream: batches are ``(input, target, position)``
    chunks in stream order; the state is carried from chunk to chunk and starts from zero at position 0."""

    def __init__(self):
        self.hidden = None

    def __call__(self, model, batch):
        tokens, _, position = batch
        if position == 0:
            self.hidden = None
        _, self.hidden = model(tokens, self.hidden, time_offset=position)


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, bptt: int, device) -> float:
    """Eval mode, the state carried over the whole stream, ``time_offset`` = position (as in training)."""
    model.eval()
    hidden, total, count = None, 0.0, 0
    for x, y, position in chunks(stream, bptt):
        logits, hidden = model(x.to(device), hidden, time_offset=position)
        total += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return math.exp(total / count)


def run(args) -> dict:
    setting = setting_name(args)
    cfg = dict(SETTINGS[setting])
    for key in ("steps", "hidden", "batch", "bptt", "max_length"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = start_run(args)
    splits, vocab, source = load_words(args.text, cfg["max_chars"], cfg["vocab"])
    train, valid = batchify(splits["train"], cfg["batch"]), batchify(splits["valid"], cfg["batch"])
    model = WordLM(len(vocab), cfg["emb"], cfg["hidden"], cfg["max_length"], args.backend).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])

    bar = progress(cfg["steps"], "stateful BN-LSTM LM", disable=args.no_progress)
    step, epochs, hidden, losses = 0, 0, None, []
    start = time.perf_counter()
    with warnings.catch_warnings():
        # by design here: positions past max_length share the last slot (the module says so once)
        warnings.filterwarnings("ignore", message=r".*share the last statistics slot")
        while step < cfg["steps"]:
            for x, y, position in chunks(train, cfg["bptt"]):
                if position == 0:
                    hidden = None
                hidden = None if hidden is None else tuple(h.detach() for h in hidden)
                logits, hidden = model(x.to(device), hidden, time_offset=position)
                loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 0.25)
                optimizer.step()
                losses.append(loss.item())
                step += 1
                bar.update()
                if step >= cfg["steps"]:
                    break
            else:
                epochs += 1
        train_seconds = time.perf_counter() - start
        bar.close()

        with on_running_averages():
            running = perplexity(model, valid, cfg["bptt"], device)
        restart = copy.deepcopy(model)
        update_population_statistics(((x, y) for x, y, _ in chunks(train, cfg["bptt"])), restart, device=device)
        carried = copy.deepcopy(model)
        update_population_statistics(chunks(train, cfg["bptt"]), carried, device=device, forward=CarryState())
        result = {"running": running, "restart": perplexity(restart, valid, cfg["bptt"], device),
                  "carried": perplexity(carried, valid, cfg["bptt"], device)}

    record = {
        "experiment": NAME,
        "setting": setting,
        "text": {"source": source, "vocab_size": len(vocab), "train_tokens": int(splits["train"].numel()),
                 "valid_tokens": int(splits["valid"].numel())},
        "config": {**cfg, "seed": args.seed, "optimizer": "Adam(lr)", "grad_clip_norm": 0.25,
                   "epochs_completed": epochs, "stream_columns": cfg["batch"], "train_positions": int(train.shape[0])},
        "environment": environment(device, args.backend),
        "train_loss": losses,
        "train_seconds": train_seconds,
        "valid_perplexity": result,
    }
    return finish_record(record, Path(args.out), NAME, plot)


def plot(record: dict, out: Path) -> Path:
    plt = pyplot()
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    losses = record["train_loss"]
    ax_loss.plot(range(1, len(losses) + 1), [math.exp(v) for v in losses], color="tab:red", alpha=0.6)
    ax_loss.set(yscale="log", xlabel="training chunks", ylabel="training perplexity", title="stateful BN-LSTM LM")
    ax_loss.grid(alpha=0.3)
    ppl = record["valid_perplexity"]
    ax_ppl.bar(list(ppl), list(ppl.values()), color=["tab:gray", "tab:orange", "tab:green"])
    ax_ppl.set(ylabel="validation perplexity (state carried)", title="population statistics from ...")
    for k, v in enumerate(ppl.values()):
        ax_ppl.annotate(f"{v:.1f}", (k, v), ha="center", va="bottom")
    return save_figure(fig, out, NAME)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--text", type=Path, default=None, help="a plain-text file (default: pydoc_data.topics)")
    for name in ("steps", "hidden", "batch", "bptt", "max-length"):
        parser.add_argument(f"--{name}", type=int, default=None)
    record = run(parser.parse_args(argv))
    ppl = record["valid_perplexity"]
    print(f"validation perplexity, state carried: running averages {ppl['running']:.1f}, "
          f"re-estimated restarting every chunk {ppl['restart']:.1f}, re-estimated carrying the state "
          f"{ppl['carried']:.1f}")
    print(f"wrote {record['json']} and {record['png']}")


if __name__ == "__main__":
    main()
