"""Shared by the backend tests: random op inputs, population statistics, and by-name comparison helpers.

Every fused backend is held to the reference the same way: every output, every gradient by name (random
cotangents on output, h_n and c_n) and the returned batch statistics; as a module, every output, parameter
gradient and buffer (``twin_modules``, ``assert_modules_agree``).
"""

import os

import torch

from fused_bnlstm import BNLSTM
from fused_bnlstm.ops import LayerConfig, LayerParams, Population, bnlstm_layer

CPU = torch.device("cpu")

# gradient names as the issues spell them -> the op's argument
GRADIENTS = {
    "dx": "x", "dh0": "h0", "dc0": "c0", "dW_ih": "weight_ih", "dW_hh": "weight_hh", "dbias": "bias",
    "dgamma_ih": "gamma_ih", "dgamma_hh": "gamma_hh", "dgamma_c": "gamma_c", "dbeta_c": "beta_c",
    "dW_hr": "weight_hr",
}
# the op's arguments a projection adds (op_inputs(..., proj=P)), in every normalization
PROJECTION = ("weight_hr",)
# the op's arguments each normalization reads (without a projection)
USED = {
    "frame": tuple(arg for arg in GRADIENTS.values() if arg not in PROJECTION),
    "sequence": ("x", "h0", "c0", "weight_ih", "weight_hh", "bias", "gamma_ih"),
    None: ("x", "h0", "c0", "weight_ih", "weight_hh", "bias"),
}
# float32: BN over two or three rows amplifies rounding, so atol scales with each tensor's magnitude
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.float64: dict(atol=1e-10, rtol=1e-8)}


def assert_close_by_name(actual, expected, name, atol, rtol):
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


def op_inputs(T, B, I, H, lengths, dtype, device=CPU, bias=True, seed=0, proj=0):
    """Random op inputs (x zero past each row's length), each a leaf that requires grad; with ``proj`` > 0 a
    projection (weight_hr [proj, H], only then a key; h0 and weight_hh's depth then proj wide)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        value = scale * torch.randn(*shape, generator=g, dtype=torch.float64) + shift
        return value.to(device, dtype).requires_grad_()

    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    if lengths is not None:
        x = x * (torch.arange(T).unsqueeze(1) < torch.tensor(lengths)).unsqueeze(2)
    P = proj or H
    inputs = dict(
        x=x.to(device, dtype).requires_grad_(), h0=rand(B, P), c0=rand(B, H),
        weight_ih=rand(4 * H, I, scale=0.5), weight_hh=rand(4 * H, P, scale=0.5),
        bias=rand(4 * H, scale=0.3) if bias else None,
        gamma_ih=rand(4 * H, scale=0.2, shift=0.4), gamma_hh=rand(4 * H, scale=0.2, shift=0.4),
        gamma_c=rand(H, scale=0.2, shift=0.4), beta_c=rand(H, scale=0.2),
    )
    if proj:
        inputs["weight_hr"] = rand(P, H, scale=0.5)
    return inputs


def population(T, H, normalization, dtype, device=CPU, seed=1):
    """Population statistics as the module passes them (one row per step, or one row sequence-wise)."""
    if normalization is None:
        return None
    g = torch.Generator().manual_seed(seed)
    rows = T if normalization == "frame" else 1

    def mean(width):
        return torch.randn(rows, width, generator=g, dtype=torch.float64).to(device, dtype)

    def var(width):
        return (torch.rand(rows, width, generator=g, dtype=torch.float64) + 0.5).to(device, dtype)

    if normalization == "sequence":
        return Population(mean(4 * H), var(4 * H))
    return Population(mean(4 * H), var(4 * H), mean(4 * H), var(4 * H), mean(H), var(H))


def call_layer(inputs, *, backend="reference", lengths=None, population=None, **config):
    """``bnlstm_layer`` on ``op_inputs``-style tensors by name; ``lengths`` a list or a tensor; ``config``
    holds ``LayerConfig`` fields (normalization, eps, use_batch_stats)."""
    if lengths is not None and not isinstance(lengths, torch.Tensor):
        lengths = torch.tensor(lengths)
    params = LayerParams(**{name: inputs.get(name) for name in LayerParams._fields})
    return bnlstm_layer(inputs["x"], inputs["h0"], inputs["c0"], params, lengths=lengths, population=population,
                        config=LayerConfig(**config), backend=backend)


def run_layer(backend, inputs, lengths, pop, use_batch_stats, normalization, cotangent_seed=2):
    """Outputs, every gradient by name (random cotangents on output, h_n and c_n) and the batch statistics."""
    out, h_n, c_n, stats = call_layer(inputs, backend=backend, lengths=lengths, population=pop,
                                      use_batch_stats=use_batch_stats, normalization=normalization)
    g = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [torch.randn(v.shape, generator=g, dtype=torch.float64).to(v) for v in (out, h_n, c_n)]
    names = [n for n, arg in GRADIENTS.items()
             if arg in USED[normalization] + PROJECTION and inputs.get(arg) is not None]
    grads = torch.autograd.grad([out, h_n, c_n], [inputs[GRADIENTS[n]] for n in names], cotangents)
    results = {"output": out, "h_n": h_n, "c_n": c_n}
    results.update(dict(zip(names, grads)))
    return results, stats


def compare_with_reference(backend, T, B, I, H, lengths, normalization, use_batch_stats, dtype, device=CPU,
                           bias=True, tolerance=None, proj=0):
    """Hold ``backend`` to the reference on one case: every output, every gradient by name, the statistics."""
    tolerance = tolerance or TOLERANCES[dtype]
    pop = population(T, H, normalization, dtype, device)
    inputs = op_inputs(T, B, I, H, lengths, dtype, device, bias, proj=proj)
    ref, ref_stats = run_layer("reference", inputs, lengths, pop, use_batch_stats, normalization)
    got, got_stats = run_layer(backend, inputs, lengths, pop, use_batch_stats, normalization)
    assert ref.keys() == got.keys()
    for name in ref:
        assert_close_by_name(got[name], ref[name], name, **tolerance)
    assert_same_statistics(ref_stats, got_stats, **tolerance)


def assert_same_statistics(expected, actual, **tolerance):
    if expected is None:
        assert actual is None
        return
    assert actual is not None
    assert actual.counts.dtype == torch.int64 and actual.counts.device == CPU
    assert torch.equal(expected.counts, actual.counts), (expected.counts, actual.counts)
    for name in expected._fields[1:]:
        want, got = getattr(expected, name), getattr(actual, name)
        if want is None:
            assert got is None, name
            continue
        assert not got.requires_grad, name
        # steps that fell back on population statistics carry NaN in both
        torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m: f"stats.{name}: {m}", **tolerance)


def twin_modules(backend, *args, **kwargs):
    """A reference BNLSTM and a ``backend`` one with the same parameters, perturbed from their initial values
    (``args``, ``kwargs``: BNLSTM's, dtype and device included)."""
    torch.manual_seed(0)
    reference = BNLSTM(*args, backend="reference", **kwargs)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.2 * torch.randn_like(param))
    model = BNLSTM(*args, backend=backend, **kwargs)
    model.load_state_dict(reference.state_dict())
    return reference, model


def module_step(model, run, cotangent_seed=3):
    """``run(model)`` -> tensors, then the gradient of every parameter of a random projection of those that
    require grad: {"output[k]": tensor, "d<parameter name>": gradient}."""
    outputs = run(model)
    results = {f"output[{k}]": value for k, value in enumerate(outputs)}
    differentiable = [value for value in outputs if value.requires_grad]
    if differentiable:
        g = torch.Generator().manual_seed(cotangent_seed)
        loss = sum((torch.randn(v.shape, generator=g, dtype=torch.float64).to(v) * v).sum() for v in differentiable)
        names, params = zip(*model.named_parameters())
        results.update({f"d{name}": grad for name, grad in zip(names, torch.autograd.grad(loss, params))})
    return results


def assert_modules_agree(reference, model, run, cotangent_seed=3, **tolerance):
    """``run``'s outputs, every parameter's gradient and every buffer of ``model`` against ``reference``'s
    (``TOLERANCES`` of the outputs' dtype unless given); ``run`` updates the running buffers in training."""
    want, got = module_step(reference, run, cotangent_seed), module_step(model, run, cotangent_seed)
    tolerance = tolerance or TOLERANCES[want["output[0]"].dtype]
    for name in want:
        assert_close_by_name(got[name], want[name], name, **tolerance)
    buffers = dict(model.named_buffers())
    for name, buffer in reference.named_buffers():
        if buffer.is_floating_point():
            assert_close_by_name(buffers[name], buffer, name, **tolerance)
        else:
            assert torch.equal(buffers[name].cpu(), buffer.cpu()), name


def has_nvidia_toolchain() -> bool:
    """Whether triton brings its own ptxas, so kernels compile for sm90 on a machine without a GPU."""
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas"))
