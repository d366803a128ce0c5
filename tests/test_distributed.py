"""BNLSTM with torch.distributed (gloo, CPU): DDP out of the box, synchronized statistics, pooled re-estimation.

Every check runs its ranks as processes spawned by the test (a free localhost port found at run time, a
time limit per spawn, so a hang fails instead of stalling CI) and is held to a single process computed here
in the parent:

- synchronized statistics (``convert_sync_bnlstm``): N ranks give the outputs, input gradients and running
  buffers of one process run on the N ranks' rows concatenated, and the *sum* over ranks of each rank's
  parameter gradients equals that process's gradients of the summed loss (DDP averages, so its gradients
  times N equal them). Ranks see different lengths, different T, and a rank may have no rows at all;
- DDP without sync: each rank normalizes over its own rows; DDP's gradients are the mean of the ranks' own
  gradients and every rank starts a forward with rank 0's buffers, with ranks of different lengths;
- ``update_population_statistics`` pools its exact sums across ranks: every rank ends with the statistics
  of one pass over the union of the ranks' batches.

Spawns are few and batch many checks (start-up is seconds per process on a 2-core machine): the checks of
one world size run in one spawn (a module-scoped fixture), each test compares one check's results.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fused_bnlstm import BNLSTM, convert_sync_bnlstm, update_population_statistics
from fused_bnlstm.ops import backend_available

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the gloo backend is not available"),
    # the re-estimation cases run past max_length on purpose (the shared last slot)
    pytest.mark.filterwarnings("ignore:BNLSTM. a training call reached step"),
]

# seconds a whole spawn may take (a hang fails the test instead of stalling CI), and a collective on its own
TIME_LIMIT = 150
COLLECTIVE_TIMEOUT = 60
I, H = 3, 5
TOLERANCE = dict(rtol=1e-8, atol=1e-10)  # float64 everywhere
# triton: on CPU tensors under its interpreter, whose TRITON_INTERPRET=1 (conftest) the spawned ranks inherit
DDP_BACKENDS = [b for b in ("reference", "cpp", "triton") if backend_available(b, torch.device("cpu"))[0]]
# What each fused backend synchronizes in its own loops (the normalizations, and whether with a projection); the
# module runs the other synchronized calls on the reference.
FUSED_SYNC = {"cpp": (("frame", "sequence"), True), "triton": (("frame",), False)}
# The interpreter takes seconds a case: Triton runs these sync cases (different T with and without lengths,
# one-row tails, one row a rank, two layers both ways, ranks without rows, DDP) and no DDP-without-sync check.
TRITON_CASES = ("frame-T5-T7", "frame-plain-T4-T6", "frame-2layers-bidirectional", "frame-empty-rank",
                "frame-one-row-each", "frame-T6-T3-empty", "ddp-sync",
                "plain-T3-T5", "plain-projection-T4-T5")


# ---- running ranks -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    jobs = torch.load(os.path.join(folder, "jobs.pt"), weights_only=False)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    try:
        results = {name: job(rank, world_size, **kwargs) for name, (job, kwargs) in jobs.items()}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))


def _spawn(world_size: int, jobs: dict) -> list[dict]:
    """Run every job ``name -> (function, kwargs)`` as ``function(rank, world_size, **kwargs)`` on
    ``world_size`` spawned ranks of one gloo group; return each rank's {name: result}."""
    with tempfile.TemporaryDirectory() as folder:
        torch.save(jobs, os.path.join(folder, "jobs.pt"))
        context = mp.start_processes(_rank_main, args=(world_size, _free_port(), folder), nprocs=world_size,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + TIME_LIMIT
        # join raises (with the rank's traceback) as soon as a rank fails
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                pytest.fail(f"{world_size} ranks did not finish within {TIME_LIMIT} s (a hang?)")
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


# ---- one training call, the same in the parent and on a rank ------------------------------------------------

def _model(spec: dict, *, backend: str = "reference") -> BNLSTM:
    model = BNLSTM(I, H, backend=backend, dtype=torch.float64, **spec["kwargs"])
    model.load_state_dict(spec["state"])
    return model


def _model_input(batch: dict):
    if batch["lengths"] is None:
        return batch["x"]
    return pack_padded_sequence(batch["x"], torch.tensor(batch["lengths"]), enforce_sorted=False)


def _train_call(model, batch: dict, module=None) -> dict:
    """Forward and backward with random cotangents on every output: outputs, gradients by name, buffers.
    ``module``: the BNLSTM inside ``model`` (a DDP wrapper), whose parameter names are used."""
    module = model if module is None else module
    x = batch["x"].clone().requires_grad_()
    h0, c0 = batch["h0"].clone().requires_grad_(), batch["c0"].clone().requires_grad_()
    out, (h_n, c_n) = model(_model_input(dict(batch, x=x)), (h0, c0))
    if batch["lengths"] is not None:
        out = pad_packed_sequence(out, total_length=x.shape[0])[0]
    g = batch["cotangents"]
    loss = (out * g["output"]).sum() + (h_n * g["h_n"]).sum() + (c_n * g["c_n"]).sum()
    loss.backward()
    grads = {"x": x.grad, "h0": h0.grad, "c0": c0.grad}
    grads.update({name: p.grad.clone() for name, p in module.named_parameters()})
    return {"output": out.detach(), "h_n": h_n.detach(), "c_n": c_n.detach(), "grads": grads,
            "buffers": {name: b.clone() for name, b in module.named_buffers()}}


# ---- cases, built in the parent ------------------------------------------------------------------------------

def _spec(seed: int, **kwargs) -> dict:
    """A model (its constructor arguments and a state with random BN parameters and running statistics)."""
    torch.manual_seed(seed)
    model = BNLSTM(I, H, dtype=torch.float64, backend="reference", **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("weight"):
                p.copy_(torch.rand_like(p) * 0.5 + 0.05 if name.startswith("gamma") else torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.startswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.startswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return {"kwargs": kwargs, "state": copy.deepcopy(model.state_dict())}


def _batch(spec: dict, T: int, B: int, lengths=None) -> dict:
    """One rank's batch: x [T, B, I] (zero past each length; a plain tensor when ``lengths`` is None),
    (h0, c0), and cotangents for output, h_n and c_n."""
    kw = spec["kwargs"]
    D = 2 if kw.get("bidirectional") else 1
    L = kw.get("num_layers", 1)
    P = kw.get("proj_size", 0) or H  # the state's (and output's) width
    valid = torch.arange(T).unsqueeze(1) < (torch.tensor(lengths) if lengths is not None else T)  # [T, B]
    mask = valid.unsqueeze(2).double()
    return {
        "x": torch.randn(T, B, I, dtype=torch.float64) * mask,
        "lengths": lengths,
        "h0": torch.randn(L * D, B, P, dtype=torch.float64) * 0.5,
        "c0": torch.randn(L * D, B, H, dtype=torch.float64) * 0.5,
        "cotangents": {"output": torch.randn(T, B, D * P, dtype=torch.float64) * mask,
                       "h_n": torch.randn(L * D, B, P, dtype=torch.float64),
                       "c_n": torch.randn(L * D, B, H, dtype=torch.float64)},
    }


def _concatenate(batches: list[dict]) -> dict:
    """The ranks' batches as one: rows concatenated in rank order, time padded to the longest."""
    T = max(b["x"].shape[0] for b in batches)

    def pad(t):  # [T_r, ...] -> [T, ...]
        return torch.cat([t, t.new_zeros(T - t.shape[0], *t.shape[1:])])

    lengths = [n for b in batches for n in (b["lengths"] or [b["x"].shape[0]] * b["x"].shape[1])]
    return {
        "x": torch.cat([pad(b["x"]) for b in batches], 1),
        "lengths": None if all(n == T for n in lengths) else lengths,
        "h0": torch.cat([b["h0"] for b in batches], 1),
        "c0": torch.cat([b["c0"] for b in batches], 1),
        "cotangents": {"output": torch.cat([pad(b["cotangents"]["output"]) for b in batches], 1),
                       "h_n": torch.cat([b["cotangents"]["h_n"] for b in batches], 1),
                       "c_n": torch.cat([b["cotangents"]["c_n"] for b in batches], 1)},
    }


def _rows(batches: list[dict], rank: int) -> slice:
    start = sum(b["x"].shape[1] for b in batches[:rank])
    return slice(start, start + batches[rank]["x"].shape[1])


# ---- what the ranks run --------------------------------------------------------------------------------------

def _job_sync(rank, world_size, *, spec, batches, backend, ddp=False):
    """One training call of a model in sync mode on this rank's batch (DDP-wrapped with ``ddp``), and the
    backend each layer call ran on."""
    module = convert_sync_bnlstm(_model(spec, backend=backend))
    model = DistributedDataParallel(module) if ddp else module
    ran = []
    choose = module._layer_backend
    module._layer_backend = lambda *args: ran.append(choose(*args)) or ran[-1]
    return dict(_train_call(model, batches[rank], module), ran=ran)


def _job_sync_error(rank, world_size, *, spec, batches):
    """A training call whose *global* batch has one row: every rank raises BatchNorm's ValueError."""
    model = convert_sync_bnlstm(_model(spec))
    try:
        _train_call(model, batches[rank])
    except ValueError as error:
        return str(error)
    return None


def _job_ddp(rank, world_size, *, spec, batches, backend):
    """DDP without sync: one training call; then the buffers a second call starts from (after DDP's
    broadcast from rank 0)."""
    module = _model(spec, backend=backend)
    model = DistributedDataParallel(module)
    first = _train_call(model, batches[rank], module)
    seen = {}
    hook = module.register_forward_pre_hook(
        lambda m, args: seen.update({name: b.clone() for name, b in m.named_buffers()}))
    module.zero_grad()
    _train_call(model, batches[rank], module)
    hook.remove()
    return {"first": first, "second_call_buffers": seen}


def _job_population(rank, world_size, *, spec, loaders, sync_spec=None, sync_loaders=None):
    """Re-estimation on this rank's batches: pooled over the ranks, and (opt-out) this rank's alone; and,
    with ``sync_spec``, a model in sync mode (its statistics are global during the pass already)."""
    result = {}
    for name, pool in (("pooled", True), ("local", False)):
        model = _model(spec)
        update_population_statistics(loaders[rank], model, forward=_population_forward, pool_across_ranks=pool)
        result[name] = {n: b.clone() for n, b in model.named_buffers()}
    if sync_spec is not None:
        model = convert_sync_bnlstm(_model(sync_spec))
        update_population_statistics(sync_loaders[rank], model, forward=_population_forward)
        result["sync"] = {n: b.clone() for n, b in model.named_buffers()}
    return result


def _population_forward(model, batch):
    model(_model_input(batch))


def _job_example(rank, world_size):
    """examples/ddp_train.py in sync mode, a few tiny steps, in this rank's group: what rank 0 prints."""
    import contextlib
    import io
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from examples import ddp_train

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ddp_train.main(["--sync", "--steps", "2", "--batch", "3", "--length", "5", "--hidden", "6"])
    return printed.getvalue()


# ---- the expectations ---------------------------------------------------------------------------------------

def _assert_matches_concatenated(results: list[dict], batches: list[dict], single: dict, *, ddp=False):
    """Each rank's outputs, input gradients and buffers equal the single process's (its rows, its steps);
    the ranks' parameter gradients, summed, equal its parameter gradients (of the summed loss). Under DDP,
    which averages, each rank's gradients times N equal them."""
    for rank, result in enumerate(results):
        rows, T = _rows(batches, rank), batches[rank]["x"].shape[0]
        torch.testing.assert_close(result["output"], single["output"][:T, rows], **TOLERANCE)
        for name in ("h_n", "c_n"):
            torch.testing.assert_close(result[name], single[name][:, rows], **TOLERANCE, msg=name)
        torch.testing.assert_close(result["grads"]["x"], single["grads"]["x"][:T, rows], **TOLERANCE)
        for name in ("h0", "c0"):
            torch.testing.assert_close(result["grads"][name], single["grads"][name][:, rows], **TOLERANCE)
        for name, value in single["buffers"].items():
            torch.testing.assert_close(result["buffers"][name], value, **TOLERANCE,
                                       msg=lambda m, name=name: f"rank {rank} buffer {name}: {m}")
    for name, value in single["grads"].items():
        if name in ("x", "h0", "c0"):
            continue
        totals = [r["grads"][name] * len(results) for r in results] if ddp else \
            [sum(r["grads"][name] for r in results)]
        for total in totals:
            torch.testing.assert_close(total, value, **TOLERANCE, msg=lambda m, name=name: f"d{name}: {m}")


def _single(spec: dict, batches: list[dict]) -> dict:
    return _train_call(_model(spec), _concatenate(batches))


# Sync cases: name -> (model arguments, per-rank (T, B, lengths)); run on 2 ranks.
SYNC_CASES_2 = {
    # rank 1 runs longer than rank 0; the tails have one row left: global counts decide the fallback
    "frame-T5-T7": (dict(max_length=8), [(5, 3, [5, 3, 1]), (7, 3, [7, 2, 7])]),
    "frame-plain-T4-T6": (dict(max_length=8), [(4, 2, None), (6, 3, [6, 1, 3])]),
    "frame-2layers-bidirectional": (dict(num_layers=2, bidirectional=True, max_length=8),
                                    [(6, 2, [6, 3]), (4, 3, [4, 4, 2])]),
    # rank 0 plain (its reverse direction flips time), rank 1 packed (it gathers per row)
    "sequence-bidirectional-T5-T3": (dict(normalization="sequence", bidirectional=True),
                                     [(5, 2, None), (3, 3, [3, 1, 2])]),
    "frame-bidirectional-plain-packed": (dict(bidirectional=True, max_length=8), [(5, 2, None), (4, 2, [4, 1])]),
    # a rank with no rows still takes part in every collective
    "frame-empty-rank": (dict(max_length=8), [(5, 3, [5, 4, 1]), (2, 0, None)]),
    # one row per rank: a batch of two for the group, not BatchNorm's error
    "frame-one-row-each": (dict(max_length=8), [(4, 1, None), (3, 1, None)]),
    # no statistics: nothing to reduce, each rank runs the group's steps all the same
    "plain-T3-T5": (dict(normalization=None), [(3, 2, [3, 1]), (5, 2, None)]),
    # a projection (proj_size): the recurrence and the output on the projected state
    "frame-projection-bidirectional-T5-T3": (dict(max_length=8, proj_size=2, bidirectional=True),
                                             [(5, 2, [5, 2]), (3, 3, None)]),
    "sequence-projection-T4-T5": (dict(normalization="sequence", proj_size=3), [(4, 2, [4, 3]), (5, 2, None)]),
    "plain-projection-T4-T5": (dict(normalization=None, proj_size=2), [(4, 2, [4, 3]), (5, 2, None)]),
}
SYNC_CASES_3 = {
    "frame-T6-T3-empty": (dict(max_length=8), [(6, 2, [6, 2]), (3, 2, None), (2, 0, None)]),
}


def _sync_inputs(cases: dict, seed: int) -> dict:
    built = {}
    for k, (name, (kwargs, shapes)) in enumerate(cases.items()):
        spec = _spec(seed + k, **kwargs)
        built[name] = (spec, [_batch(spec, T, B, lengths) for T, B, lengths in shapes])
    return built


def _population_inputs(world_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    spec = _spec(seed, max_length=6)
    shapes = [[(4, 3, None), (7, 3, [7, 2, 2])], [(5, 2, None)], [(3, 2, None), (2, 3, None), (8, 2, [8, 1])]]
    loaders = [[_batch(spec, *shape) for shape in shapes[r]] for r in range(world_size)]
    if world_size > 2:
        return {"spec": spec, "loaders": loaders}
    sync_spec = _spec(seed + 1, max_length=6, num_layers=2)
    sync_loaders = [[_batch(sync_spec, 4, 2, None), _batch(sync_spec, 6, 2, [6, 3])] for _ in range(world_size)]
    return {"spec": spec, "loaders": loaders, "sync_spec": sync_spec, "sync_loaders": sync_loaders}


def _jobs(world_size: int) -> tuple[dict, dict]:
    """What a spawn of ``world_size`` ranks runs, and the inputs the expectations need."""
    cases = _sync_inputs(SYNC_CASES_2 if world_size == 2 else SYNC_CASES_3, seed=10 * world_size)
    jobs = {f"sync/{name}/{backend}": (_job_sync, dict(spec=spec, batches=batches, backend=backend))
            for name, (spec, batches) in cases.items() for backend in DDP_BACKENDS
            if backend != "triton" or name in TRITON_CASES}
    population = _population_inputs(world_size, seed=5)
    jobs["population"] = (_job_population, population)
    if world_size == 3:  # (each process costs seconds here: DDP, the error and the example run on 2 ranks)
        return jobs, {"cases": cases, "population": population}
    ddp_spec = _spec(7, max_length=8)
    ddp_batches = [_batch(ddp_spec, 4 + 2 * r, 3, [4 + 2 * r, 2, 1]) for r in range(world_size)]
    cases["ddp-sync"] = (ddp_spec, ddp_batches)
    for backend in DDP_BACKENDS:
        jobs[f"sync/ddp-sync/{backend}"] = (_job_sync, dict(spec=ddp_spec, batches=ddp_batches, backend=backend,
                                                           ddp=True))
    for backend in DDP_BACKENDS:
        if backend != "triton":
            jobs[f"ddp/{backend}"] = (_job_ddp, dict(spec=ddp_spec, batches=ddp_batches, backend=backend))
    jobs["example"] = (_job_example, {})
    one_row = _spec(3)
    jobs["sync-error"] = (_job_sync_error, dict(spec=one_row, batches=[_batch(one_row, 3, 1), _batch(one_row, 3, 0)]))
    return jobs, {"cases": cases, "population": population, "ddp": (ddp_spec, ddp_batches)}


def _run_world(world_size: int):
    jobs, inputs = _jobs(world_size)
    return world_size, _spawn(world_size, jobs), inputs


@pytest.fixture(scope="module")
def world2():
    return _run_world(2)


@pytest.fixture(scope="module")
def world3():
    return _run_world(3)


@pytest.fixture(params=[2, 3], ids=["2ranks", "3ranks"])
def world(request):
    """The results of one spawn (one per world size and module), for checks that run on both."""
    return request.getfixturevalue(f"world{request.param}")


# ---- the tests -----------------------------------------------------------------------------------------------

def test_convert_sync_bnlstm_sets_every_layer():
    model = torch.nn.Sequential(BNLSTM(I, H), torch.nn.Linear(H, H), BNLSTM(H, H))
    group = object()
    assert convert_sync_bnlstm(model, process_group=group) is model
    assert all(m.sync_statistics and m.process_group is group for m in (model[0], model[2]))


def test_sync_mode_without_process_group_is_local():
    # torch.distributed not initialized: sync mode normalizes over this process's rows, as before
    spec = _spec(1, max_length=8)
    batch = _batch(spec, 4, 3, [4, 2, 1])
    expected = _train_call(_model(spec), batch)
    result = _train_call(convert_sync_bnlstm(_model(spec)), batch)
    torch.testing.assert_close(result["output"], expected["output"], **TOLERANCE)
    for name, value in expected["grads"].items():
        torch.testing.assert_close(result["grads"][name], value, **TOLERANCE)


@pytest.mark.parametrize("backend", DDP_BACKENDS)
def test_sync_matches_concatenated_batch(world, backend):
    """Sync mode on N ranks == one process on the concatenated rows (every case of this world size). A fused
    backend synchronizes what FUSED_SYNC says in its own loops; the module runs the rest on the reference."""
    world_size, results, inputs = world
    for name, (spec, batches) in inputs["cases"].items():
        if f"sync/{name}/{backend}" not in results[0]:
            continue
        single = _single(spec, batches)
        ranks = [r[f"sync/{name}/{backend}"] for r in results]
        normalizations, with_projection = FUSED_SYNC.get(backend, ((), False))
        kwargs = spec["kwargs"]
        normalization = kwargs.get("normalization", "frame")
        # (without normalization there is nothing to synchronize: the module passes no group)
        synchronized = normalization is None or normalization in normalizations and (
            not kwargs.get("proj_size") or with_projection)
        expected = backend if synchronized else "reference"
        assert all(set(r["ran"]) == {expected} for r in ranks), (name, [r["ran"] for r in ranks])
        try:
            _assert_matches_concatenated(ranks, batches, single, ddp=name == "ddp-sync")
        except AssertionError as error:
            raise AssertionError(f"case {name}: {error}") from None


def test_sync_global_batch_of_one_raises_on_every_rank(world2):
    _, results, _ = world2
    messages = [r["sync-error"] for r in results]
    assert all(m is not None and "Expected more than 1 value per channel" in m for m in messages), messages


def test_example_ddp_train_with_sync(world2):
    _, results, _ = world2
    assert "sync=True" in results[0]["example"] and "buffers equal on every rank: True" in results[0]["example"]
    assert results[1]["example"] == ""


@pytest.mark.parametrize("backend", [b for b in DDP_BACKENDS if b != "triton"])
def test_ddp_without_sync(world2, backend):
    """Each rank normalizes over its own rows: DDP's gradient is the mean of the ranks' own gradients, each
    rank's buffers are its own update, and the next call starts from rank 0's buffers on every rank."""
    world_size, results, inputs = world2
    spec, batches = inputs["ddp"]
    local = [_train_call(_model(spec, backend="reference"), batch) for batch in batches]
    tolerance = TOLERANCE if backend == "reference" else dict(rtol=1e-7, atol=1e-9)
    for rank, result in enumerate(r[f"ddp/{backend}"] for r in results):
        first = result["first"]
        torch.testing.assert_close(first["output"], local[rank]["output"], **tolerance)
        for name, value in local[rank]["grads"].items():
            expected = value if name in ("x", "h0", "c0") else sum(l["grads"][name] for l in local) / world_size
            torch.testing.assert_close(first["grads"][name], expected, **tolerance, msg=lambda m, n=name: f"{n}: {m}")
        for name, value in local[rank]["buffers"].items():
            torch.testing.assert_close(first["buffers"][name], value, **tolerance)
        for name, value in local[0]["buffers"].items():
            torch.testing.assert_close(result["second_call_buffers"][name], value, **tolerance)


def test_population_statistics_pooled_across_ranks(world):
    world_size, results, inputs = world
    population = inputs["population"]
    spec, loaders = population["spec"], population["loaders"]

    def estimate(spec, batches):
        model = _model(spec)
        update_population_statistics(batches, model, forward=_population_forward)
        return {n: b for n, b in model.named_buffers()}

    union = estimate(spec, [b for rank in range(world_size) for b in loaders[rank]])
    # a model in sync mode: one process running each step's batches of every rank concatenated
    sync_loaders = population.get("sync_loaders")
    sync_union = {} if sync_loaders is None else estimate(
        population["sync_spec"],
        [_concatenate([sync_loaders[r][k] for r in range(world_size)]) for k in range(len(sync_loaders[0]))])
    for rank, result in enumerate(r["population"] for r in results):
        own = estimate(spec, loaders[rank])
        for name in union:
            torch.testing.assert_close(result["pooled"][name], union[name], **TOLERANCE,
                                       msg=lambda m, name=name: f"rank {rank} pooled {name}: {m}")
            torch.testing.assert_close(result["local"][name], own[name], **TOLERANCE)
        for name in sync_union:
            torch.testing.assert_close(result["sync"][name], sync_union[name], **TOLERANCE,
                                       msg=lambda m, name=name: f"rank {rank} sync {name}: {m}")
