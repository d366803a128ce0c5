"""The paper's Figure 1: how the BN scale gamma decides whether gradients flow back through time.

(a) ||dLoss/dh_t|| against t, at initialization, in a batch-normalized tanh RNN on the sequential
    (pixel-by-pixel) digits task, for gamma in {0.1, 0.3, 0.5, 0.7, 1.0}:

        h_t = tanh(BN(W_hh h_{t-1}; gamma) + BN(W_ih x_t; gamma) + b)

    with a linear readout of h_T and the cross-entropy loss. Large gamma means high pre-activation variance,
    a saturated tanh and vanishing gradients.
(b) E[tanh'(x)] for x ~ N(0, sigma^2) against sigma (Gauss-Hermite quadrature), with its interquartile
    range, and the pre-activation standard deviation actually measured in (a) for each gamma.
(c) The same measurement through ``fused_bnlstm.BNLSTM`` (run one step at a time with ``time_offset`` so
    every h_t is a tensor we can take the gradient of) for gamma_init 0.1 against 1.0.

    python -m examples.gamma_gradient_flow            # reduced CPU setting, ~1 minute
    python -m examples.gamma_gradient_flow --full     # paper-size: pass --mnist DIR for 784 steps
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.common import (add_common_arguments, environment, finish_record, load_pixel_data, progress,
                             pyplot, save_figure, setting_name, start_run)
from fused_bnlstm import BNLSTM

NAME = "gamma_gradient_flow"
SETTINGS = {
    # hidden units, batch size (the authors': 100, 100), batches averaged
    "smoke": dict(hidden=32, batch=32, batches=1),
    "reduced": dict(hidden=100, batch=100, batches=4),
    "full": dict(hidden=100, batch=100, batches=16),
}
RNN_GAMMAS = (0.1, 0.3, 0.5, 0.7, 1.0)
LSTM_GAMMAS = (0.1, 1.0)


class BNTanhRNN(nn.Module):
    """The batch-normalized tanh RNN of the authors' gradient-flow experiment, frame-wise statistics.

    As in their code (cooijmanstim/recurrent-batch-normalization, ``construct_rnn``): one BN over the
    summed pre-activation, W_hh the identity, W_ih orthogonal, beta = 0, every gamma at ``gamma``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_classes: int, gamma: float):
        super().__init__()
        self.weight_ih = nn.Parameter(nn.init.orthogonal_(torch.empty(hidden_size, input_size)))
        self.weight_hh = nn.Parameter(torch.eye(hidden_size))
        self.gamma = nn.Parameter(torch.full((hidden_size,), gamma))
        self.beta = nn.Parameter(torch.zeros(hidden_size))
        self.readout = nn.Linear(hidden_size, num_classes)

    def forward(self, x, h0):
        """x [T, B, I], h0 [B, H] -> (logits [B, C], hidden states h_1..h_T each [B, H])."""
        h = h0
        states = []
        for t in range(x.shape[0]):
            pre = h @ self.weight_hh.t() + x[t] @ self.weight_ih.t()  # [B, H]
            h = torch.tanh(F.batch_norm(pre, None, None, self.gamma, self.beta, training=True))
            h.retain_grad()
            states.append(h)
        return self.readout(h), states


def _initial_state(B, H, noise, seed, device):
    """h_0: zeros, or white noise of std ``noise`` (the authors' ``--noise`` option).

    With h_0 = 0 and an input that is blank in every image at the first steps (the digits' corner pixel),
    the first pre-activations have zero batch variance and BN multiplies their gradient by gamma/sqrt(eps).
    """
    generator = torch.Generator().manual_seed(seed + 12345)
    return (noise * torch.randn(B, H, generator=generator)).to(device)


def _per_example_norms(states):
    """||dL/dh_t||_2 over hidden units, averaged over the batch, for each t (the authors' measure)."""
    return [s.grad.reshape(-1, s.shape[-1]).norm(dim=1).mean().item() for s in states]


def rnn_gradient_norms(x, y, gamma, hidden, seed, noise):
    """||dL/dh_t||, t = 1..T, for one batch at initialization."""
    torch.manual_seed(seed)
    model = BNTanhRNN(x.shape[2], hidden, 10, gamma).to(x.device)
    logits, states = model(x, _initial_state(x.shape[1], hidden, noise, seed, x.device))
    F.cross_entropy(logits, y).backward()
    return _per_example_norms(states)


def bnlstm_gradient_norms(x, y, gamma, hidden, seed, noise, backend):
    """||dL/dh_t|| through BNLSTM, run step by step with ``time_offset`` so each h_t keeps its gradient."""
    torch.manual_seed(seed)
    T, B, _ = x.shape
    lstm = BNLSTM(x.shape[2], hidden, gamma_init=gamma, max_length=T, backend=backend).to(x.device)
    readout = nn.Linear(hidden, 10).to(x.device)
    h = _initial_state(B, hidden, noise, seed, x.device).unsqueeze(0)  # [1, B, H]
    c = torch.zeros_like(h)
    states = []
    for t in range(T):
        _, (h, c) = lstm(x[t:t + 1], (h, c), time_offset=t)
        h.retain_grad()
        states.append(h)
    F.cross_entropy(readout(h[0]), y).backward()
    return _per_example_norms(states)


def expected_tanh_derivative(sigmas, points: int = 201):
    """E[tanh'(x)], x ~ N(0, sigma^2), by Gauss-Hermite quadrature, and its 25th/75th percentiles.

    tanh' decreases in |x|, so its quantiles are tanh' at the half-normal quantiles of |x|.
    """
    z, w = np.polynomial.hermite_e.hermegauss(points)
    w = w / w.sum()
    dtanh = lambda v: 1.0 - np.tanh(v) ** 2  # noqa: E731
    mean = np.array([(w * dtanh(s * z)).sum() for s in sigmas])
    normal = statistics.NormalDist()
    abs_z_25, abs_z_75 = normal.inv_cdf(0.625), normal.inv_cdf(0.875)
    q25 = dtanh(np.asarray(sigmas) * abs_z_75)
    q75 = dtanh(np.asarray(sigmas) * abs_z_25)
    return mean, q25, q75


def run(args) -> dict:
    setting = setting_name(args)
    cfg = dict(SETTINGS[setting])
    device = start_run(args)
    data, is_mnist = load_pixel_data(args)
    task = "sequential MNIST (784 steps)" if is_mnist else "sequential 8x8 digits (64 steps)"
    x_all = torch.from_numpy(data["train"][0])
    y_all = torch.from_numpy(data["train"][1])
    generator = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(cfg["batches"]):
        idx = torch.randperm(x_all.shape[0], generator=generator)[:cfg["batch"]]
        # [N, T] pixels -> [T, B, 1], time-major
        batches.append((x_all[idx].t().unsqueeze(2).to(device), y_all[idx].to(device)))
    T = batches[0][0].shape[0]

    rnn_gammas = args.gammas or list(RNN_GAMMAS)
    lstm_gammas = args.lstm_gammas or list(LSTM_GAMMAS)
    total = cfg["batches"] * (len(rnn_gammas) + len(lstm_gammas))
    bar = progress(total, "gradient flow", disable=args.no_progress)
    rnn, lstm = {}, {}
    for gamma in rnn_gammas:
        norms = []
        for k, (x, y) in enumerate(batches):
            norms.append(rnn_gradient_norms(x, y, gamma, cfg["hidden"], args.seed + k, args.h0_noise))
            bar.update()
        rnn[str(gamma)] = {"grad_norm": np.mean(norms, axis=0).tolist()}
    for gamma in lstm_gammas:
        norms = []
        for k, (x, y) in enumerate(batches):
            norms.append(bnlstm_gradient_norms(x, y, gamma, cfg["hidden"], args.seed + k, args.h0_noise,
                                               args.backend))
            bar.update()
        lstm[str(gamma)] = {"grad_norm": np.mean(norms, axis=0).tolist()}
    bar.close()

    sigmas = np.linspace(0.0, 2.0, 81)
    mean, q25, q75 = expected_tanh_derivative(sigmas)
    record = {
        "experiment": NAME,
        "setting": setting,
        "task": task,
        "config": {**cfg, "seq_len": T, "seed": args.seed, "rnn_gammas": rnn_gammas, "lstm_gammas": lstm_gammas,
                   "loss": "cross-entropy of a linear readout of h_T, at initialization",
                   "h0_noise_std": args.h0_noise,
                   "norm": "L2 norm of dLoss/dh_t over hidden units, mean over examples and batches",
                   "rnn": "h_t = tanh(BN(W_hh h_{t-1} + W_ih x_t; gamma, beta=0)), W_hh = I, W_ih orthogonal",
                   "bnlstm_init": "package default: orthogonal gate blocks, forget bias 1; h_0 as the RNN, c_0 = 0"},
        "environment": environment(device, args.backend),
        "bn_tanh_rnn": rnn,
        "bnlstm": lstm,
        "tanh_derivative": {"sigma": sigmas.tolist(), "mean": mean.tolist(), "q25": q25.tolist(),
                            "q75": q75.tolist()},
        "summary": {
            "rnn_first_step_grad_norm": {g: v["grad_norm"][0] for g, v in rnn.items()},
            "rnn_last_step_grad_norm": {g: v["grad_norm"][-1] for g, v in rnn.items()},
            "bnlstm_first_step_grad_norm": {g: v["grad_norm"][0] for g, v in lstm.items()},
            "bnlstm_last_step_grad_norm": {g: v["grad_norm"][-1] for g, v in lstm.items()},
        },
    }
    return finish_record(record, Path(args.out), NAME, plot)


def plot(record: dict, out: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    cmap = plt.get_cmap("viridis")
    rnn = record["bn_tanh_rnn"]
    for k, (gamma, v) in enumerate(rnn.items()):
        steps = np.arange(1, len(v["grad_norm"]) + 1)
        axes[0].semilogy(steps, v["grad_norm"], color=cmap(k / max(1, len(rnn) - 1)), label=f"gamma={gamma}")
    axes[0].set(title="(a) BN tanh RNN: ||dLoss/dh_t|| at init", xlabel="t", ylabel="gradient norm")
    axes[0].legend()

    d = record["tanh_derivative"]
    axes[1].plot(d["sigma"], d["mean"], color="k", label="E[tanh'(x)], x ~ N(0, sigma^2)")
    axes[1].fill_between(d["sigma"], d["q25"], d["q75"], color="0.8", label="interquartile range")
    # BN sets the tanh input's standard deviation to gamma (beta = 0).
    for k, gamma in enumerate(rnn):
        axes[1].axvline(float(gamma), color=cmap(k / max(1, len(rnn) - 1)), ls=":", label=f"sigma = gamma = {gamma}")
    axes[1].set(title="(b) expected derivative of tanh", xlabel="input standard deviation sigma",
                ylabel="derivative", ylim=(0, 1.05))
    axes[1].legend(fontsize=7)

    colors = {0: "tab:blue", 1: "tab:red"}
    for k, (gamma, v) in enumerate(record["bnlstm"].items()):
        steps = np.arange(1, len(v["grad_norm"]) + 1)
        axes[2].semilogy(steps, v["grad_norm"], color=colors.get(k), label=f"BNLSTM gamma_init={gamma}")
    axes[2].set(title="(c) BNLSTM: ||dLoss/dh_t|| at init", xlabel="t", ylabel="gradient norm")
    axes[2].legend()
    fig.suptitle(f"{record['task']}, hidden {record['config']['hidden']}, batch {record['config']['batch']}, "
                 f"mean of {record['config']['batches']} batches ({record['setting']} setting)")
    return save_figure(fig, out, NAME)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--mnist", type=Path, default=None,
                        help="folder with the standard MNIST IDX files (784 steps); default: 8x8 digits")
    parser.add_argument("--h0-noise", type=float, default=0.1,
                        help="std of the white noise h_0 starts from (0: zeros; see _initial_state)")
    parser.add_argument("--gammas", type=float, nargs="+", default=None, help=f"RNN gammas {RNN_GAMMAS}")
    parser.add_argument("--lstm-gammas", type=float, nargs="+", default=None, help=f"BNLSTM gammas {LSTM_GAMMAS}")
    record = run(parser.parse_args(argv))
    for part in ("rnn", "bnlstm"):
        first = record["summary"][f"{part}_first_step_grad_norm"]
        last = record["summary"][f"{part}_last_step_grad_norm"]
        print(f"{part}: ||dL/dh_1|| " + ", ".join(f"gamma {g}: {v:.3g}" for g, v in first.items())
              + "  (||dL/dh_T|| " + ", ".join(f"{v:.3g}" for v in last.values()) + ")")
    print(f"wrote {record['json']} and {record['png']}")


if __name__ == "__main__":
    main()
