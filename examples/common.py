"""Helpers shared by the experiments: data, the paper's initialization, seeds, records and plots."""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import platform
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

EXAMPLES_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = EXAMPLES_DIR / "results"


def add_common_arguments(parser, *, smoke_help="a few steps at tiny sizes (what the tests run)"):
    """--full / --smoke / --out / --seed / --threads / --backend / --device, shared by every experiment."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the paper's settings (meant for a GPU)")
    size.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON record and PNG plot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--backend", default="auto", help="BNLSTM backend: auto, reference, triton or cpp")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def setting_name(args) -> str:
    return "full" if args.full else "smoke" if args.smoke else "reduced"


def pick_device(name: str | None) -> torch.device:
    if name is not None:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def environment(device: torch.device, backend: str) -> dict:
    """What the numbers were measured on, for the record."""
    from fused_bnlstm.ops import resolve_backend

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=EXAMPLES_DIR, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "backend_requested": backend,
        "backend_resolved": resolve_backend(backend, device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "git_commit": commit,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def start_run(args) -> torch.device:
    """The device the run uses, with the thread count and seeds the arguments ask for."""
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    return device


def finish_record(record: dict, out: Path, name: str, plot) -> dict:
    """Make the record JSON-clean, note whether it is finite, and write it with its plot (``plot(record, out)``)."""
    record = clean_floats(record)
    record["finite"] = all_finite(record)
    record["json"] = str(write_record(out, name, record))
    record["png"] = str(plot(record, out))
    write_record(out, name, record)
    return record


def write_record(out_dir: Path, name: str, record: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, allow_nan=True) + "\n")
    return path


def save_figure(fig, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def pyplot():
    """matplotlib with a file-only backend, so the experiments run without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def init_paper_weights(lstm: nn.Module, recurrent: str = "identity") -> None:
    """The authors' initialization on an ``nn.LSTM`` or a ``BNLSTM`` (same parameter names and gate order).

    W_ih orthogonal per gate block. W_hh per gate block orthogonal, except with ``recurrent="identity"``
    the cell-candidate block (g) is the identity, as the authors' sequential MNIST code ("--init id",
    ``Wa = [I, orthogonal]`` over their g, f, i, o order). Biases zero but the forget gate's 1 (on bias_ih).
    Gammas and beta_c keep the module's own initialization (``gamma_init``, 0).
    """
    for name, param in lstm.named_parameters():
        if name.startswith("weight_"):
            H = param.shape[0] // 4
            for k, block in enumerate(param.split(H, dim=0)):  # i, f, g, o
                if name.startswith("weight_hh") and recurrent == "identity" and k == 2:
                    block.copy_(torch.eye(H, dtype=param.dtype))
                else:
                    nn.init.orthogonal_(block)
        elif name.startswith("bias_"):
            param.zero_()
            if name.startswith("bias_ih"):
                H = param.shape[0] // 4
                param[H:2 * H] = 1.0


@contextlib.contextmanager
def on_running_averages():
    """For comparisons that evaluate on the running averages on purpose: no warning that they may lag the
    weights (``fused_bnlstm.PopulationStatisticsWarning``, where the package has it)."""
    import fused_bnlstm

    with warnings.catch_warnings():
        category = getattr(fused_bnlstm, "PopulationStatisticsWarning", None)
        if category is not None:
            warnings.simplefilter("ignore", category)
        yield


def clean_floats(value):
    """Python floats for JSON (NaN/inf kept so a test can catch them)."""
    if isinstance(value, dict):
        return {k: clean_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_floats(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return clean_floats(value.tolist())
    return value


def all_finite(value) -> bool:
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


# Data -------------------------------------------------------------------------------------------------


def load_digits_split(seed: int = 0):
    """scikit-learn's bundled 8x8 digits (1797 images, no download): 70/15/15 stratified split.

    Returns {"train": (x, y), "valid": (x, y), "test": (x, y)} with x float32 [N, 64] in [0, 1] (pixels in
    row-major order) and y int64 [N].
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    x_valid, x_test, y_valid, y_test = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest,
                                                        random_state=seed)
    return {"train": (x_train, y_train), "valid": (x_valid, y_valid), "test": (x_test, y_test)}


def load_pixel_data(args):
    """The pixel-by-pixel data set the arguments ask for: MNIST from ``--mnist DIR``, else the 8x8 digits.

    Returns (the split as ``load_digits_split`` gives it, MNIST or not).
    """
    if args.full and args.mnist is None:
        print("note: --full without --mnist runs the 8x8 digits at the paper's model sizes (the paper used 784-step "
              "MNIST; pass --mnist DIR with the standard IDX files)", file=sys.stderr)
    if args.mnist is not None:
        return load_mnist_split(args.mnist), True
    return load_digits_split(args.seed), False


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (stem, stem.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            path = folder / (candidate + suffix)
            if path.exists():
                return path
    raise FileNotFoundError(f"no {stem}[.gz] in {folder} (the standard MNIST IDX files; nothing is downloaded)")


def load_mnist_split(folder: Path, valid_size: int = 5000):
    """MNIST from the four standard IDX files in ``folder`` (optionally .gz): the paper's 55k/5k/10k split.

    Returns the same layout as ``load_digits_split`` with x float32 [N, 784] in [0, 1].
    """
    folder = Path(folder)
    x_train = _read_idx(_find_idx(folder, "train-images-idx3-ubyte")).reshape(-1, 784)
    y_train = _read_idx(_find_idx(folder, "train-labels-idx1-ubyte"))
    x_test = _read_idx(_find_idx(folder, "t10k-images-idx3-ubyte")).reshape(-1, 784)
    y_test = _read_idx(_find_idx(folder, "t10k-labels-idx1-ubyte"))
    scale = lambda a: (a.astype(np.float32) / 255.0)  # noqa: E731
    n = x_train.shape[0] - valid_size
    return {
        "train": (scale(x_train[:n]), y_train[:n].astype(np.int64)),
        "valid": (scale(x_train[n:]), y_train[n:].astype(np.int64)),
        "test": (scale(x_test), y_test.astype(np.int64)),
    }


def progress(total: int, desc: str, disable: bool = False, position: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable, position=position, dynamic_ncols=True, leave=True)
