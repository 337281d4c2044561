"""Assertions that compare a result with a same-dtype PyTorch result and an upcast reference."""

from __future__ import annotations

import socket
import types
import warnings

import torch
import torch.autograd.forward_ad as fwad

from grpo_kernels import reference


def _where(actual: torch.Tensor, expected: torch.Tensor) -> str:
    diff = (actual.double() - expected.double()).abs()
    flat = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    bad = int((~torch.isclose(actual.double(), expected.double(), rtol=0, atol=0)).sum()) if diff.numel() else 0
    return (
        f"largest difference {diff.reshape(-1)[flat].item():.3e} at {idx}: got {actual.reshape(-1)[flat].item():.8g}, "
        f"expected {expected.reshape(-1)[flat].item():.8g} ({bad} of {diff.numel()} elements differ)"
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "") -> None:
    """`torch.testing`-style closeness, with a message that says where and by how much values differ."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    ok = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    assert bool(ok.all()), f"{name}: {_where(a, e)} (atol={atol}, rtol={rtol})"


def assert_within_pytorch_error(
    actual: torch.Tensor,
    same_dtype: torch.Tensor,
    upcast: torch.Tensor,
    *,
    name: str,
    factor: float = 2.0,
    input_dtype: torch.dtype | None = None,
    input_scale: float = 0.0,
) -> None:
    """The result's error against the upcast reference is at most `factor` times PyTorch's own error at the same
    dtype, plus 4 units in the last place of the inputs' dtype (default: `same_dtype`'s), so that a result PyTorch
    happens to hit exactly still leaves room for another summation order or rounding of the inputs. The units are
    those of the largest result, or `input_scale` where that is larger: the magnitude at which rounded intermediate
    inputs enter the result (`loss_condition`)."""
    a, t, u = (x.detach().double().cpu() for x in (actual, same_dtype, upcast))
    assert a.shape == u.shape, f"{name}: shape {tuple(a.shape)} != {tuple(u.shape)}"
    # where the upcast reference is NaN (a minimum over no tokens, say) the result must be NaN too; compare the rest
    undefined = u.isnan()
    assert torch.equal(a.isnan(), undefined), (
        f"{name}: NaN at {a.isnan().nonzero().tolist()}, reference's at {undefined.nonzero().tolist()}"
    )
    a, t, u = a[~undefined], torch.where(t.isnan(), u, t)[~undefined], u[~undefined]  # a NaN of PyTorch's: no slack
    eps = torch.finfo(input_dtype or same_dtype.dtype).eps
    scale = max(1.0, input_scale, u.abs().max().item() if u.numel() else 0.0)
    err = (a - u).abs().max().item() if u.numel() else 0.0
    err_torch = (t - u).abs().max().item() if u.numel() else 0.0
    bound = factor * err_torch + 4 * eps * scale
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x PyTorch's {err_torch:.3e} + 4 ulp; {_where(a, u)}"


def loss_condition(
    logps: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor | None, **inputs
) -> float:
    """`sum_i |dL/dlogp_i| |logp_i| + |dL/dentropy_i| |entropy_i|` in fp64 from the exact log-probs and entropies:
    how far the loss moves when each of them is off by one unit of its own last place (relative). A loss of a few
    tokens with log-probs near -12 moves by more than a unit of its own last place when a single log-prob rounds the
    other way: PyTorch's own fp32 loss, with the vocabulary merely permuted, exceeds 2 x its error + 4 ulp of |loss|
    in 2 of 300 draws of `test_fused_linear`'s Qwen-vocabulary case."""
    lp = logps.detach().double().cpu().requires_grad_()
    ent = entropy.detach().double().cpu().requires_grad_()
    args = _on_cpu_in_fp64(inputs)
    m = None if mask is None else mask.cpu()
    loss, _ = reference.grpo_loss_from_logps(lp, ent, advantages.detach().double().cpu(), m, **args)
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    total = 0.0
    for g, x in ((g_lp, lp), (g_ent, ent)):
        if g is not None:
            total += float(torch.nansum(g.abs() * x.detach().abs()))
    return total


def _on_cpu_in_fp64(inputs: dict) -> dict:
    """The loss's keyword inputs on the CPU, floating-point tensors in fp64."""
    return {k: (v.detach().cpu().double() if v.is_floating_point() else v.cpu()) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}  # fmt: skip


def metric_conditions(
    logps: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor | None, **inputs
) -> dict[str, float]:
    """`loss_condition` for each of the loss's metrics: `sum_i |dm/dlogp_i| |logp_i| + |dm/dentropy_i| |entropy_i|`
    in fp64, by forward-mode derivatives (the metrics are formed without autograd), one token at a time. The KL
    metric moves by `|1 - e^(ref - logp)|` times a log-prob's rounding, several units of its own last place where
    the reference log-prob is far from the policy's."""
    lp, ent = (x.detach().double().cpu() for x in (logps, entropy))
    args = _on_cpu_in_fp64(inputs)
    m = None if mask is None else mask.cpu()
    adv = advantages.detach().double().cpu()
    totals: dict[str, float] = {}
    active = range(lp.numel()) if m is None else m.reshape(-1).nonzero().squeeze(1).tolist()
    with warnings.catch_warnings():  # PyTorch scripts its forward-mode decompositions on first use, and warns
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        for x in (lp, ent):
            for i in active:
                tangent = torch.zeros_like(x)
                tangent.view(-1)[i] = abs(float(x.view(-1)[i]))
                with fwad.dual_level():
                    dual = fwad.make_dual(x, tangent)
                    lp_in, ent_in = (dual, ent) if x is lp else (lp, dual)
                    _, metrics = reference.grpo_loss_from_logps(lp_in, ent_in, adv, m, **args)
                    for k, v in metrics.items():
                        d = fwad.unpack_dual(v).tangent
                        totals[k] = totals.get(k, 0.0) + (0.0 if d is None else abs(float(torch.nan_to_num(d))))
    return totals


def assert_none_rounded_to_zero(actual: torch.Tensor, exact: torch.Tensor, *, name: str = "") -> None:
    """No entry of `exact` of at least the smallest subnormal of `actual`'s dtype is zero in `actual`: a value rounded
    once to that dtype is not (one rounded before a loss scale multiplies it may be)."""
    info = torch.finfo(actual.dtype)
    smallest = info.smallest_normal * info.eps
    lost = int(((actual == 0) & (exact.abs() >= smallest)).sum())
    assert lost == 0, f"{name}: {lost} of {actual.numel()} entries of at least {smallest:.3g} rounded to zero"


def loss_and_grad(fn, x: torch.Tensor, *args, upcast_to: torch.dtype | None = None, **kwargs):
    """`(output, d output.loss / d x)` of `fn(x, *args, **kwargs)` for a fresh leaf copy of `x` (upcast first when
    asked)."""
    x = x.detach().clone()
    x = (x if upcast_to is None else x.to(upcast_to)).requires_grad_()
    out = fn(x, *args, **kwargs)
    (dx,) = torch.autograd.grad(out.loss, x)
    return out, dx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def filtering_bound(hidden, weight, bias, ids, adv, mask, config, eps, **extra):
    """The exact fp64 gradients `(d_hidden, d_weight, d_bias)` and, for each, a bound on what gradient filtering at
    `eps` may leave out: the sum of |logit gradient| * |other factor| over the entries at most their token's
    threshold `eps / temperature * (|dL/dlogp| + |dL/dentropy|)`."""
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    raw = h64 @ w64.T + b64
    logps, entropy = reference.logprobs_and_entropy(raw, ids, config.temperature)
    logps, entropy = logps * mask, entropy * mask
    loss, _ = reference.grpo_loss_from_logps(logps, entropy, adv.double(), mask, config=config, **extra)
    g, h, dz = torch.autograd.grad(loss, (logps, entropy, raw), retain_graph=True, allow_unused=True)
    exact = torch.autograd.grad(loss, (h64, w64, b64))
    r = eps / config.temperature * (g.abs() + (0 if h is None else h.abs()))
    small = torch.where(dz.abs() <= r[..., None], dz.abs(), torch.zeros_like(dz))  # [B, T, V]
    bounds = (small @ w64.abs().detach(), torch.einsum("btv,bth->vh", small, h64.abs().detach()), small.sum((0, 1)))
    return exact, bounds


# test_fused_kernels_fp32_sums_over_large_vocabularies' cases (`benchmarks/gpu_run.sh` diagnoses them on a GPU):
# (N, H, V) and whether the entropy bonus reaches d_hidden
LARGE_VOCABULARY_CASES = {"qwen": ((6, 12, 151_936), False), "largest": ((4, 8, 262_144), True)}


def large_vocabulary_case(shape: tuple[int, int, int], entropy: bool) -> types.SimpleNamespace:
    """Inputs `h [N, H]`, `w [V, H]`, `ids`, `g = dL/dlogp` and `g_ent = dL/dentropy` (None without `entropy`), drawn
    on the CPU from seed 0, with their fp64 logits `z64`, probabilities `p64`, entropies `ent64` and `d_hidden`."""
    N, H, V = shape
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen) / H**0.5 * 2
    ids, g = torch.randint(0, V, (N,), generator=gen), torch.randn(N, generator=gen)
    g_ent = torch.randn(N, generator=gen) * 0.1 if entropy else None
    z64 = h.double() @ w.double().t()
    logp64 = z64.log_softmax(-1)
    p64 = logp64.exp()
    ent64 = -(p64 * logp64).sum(-1)
    dz = g.double()[:, None] * (torch.nn.functional.one_hot(ids, V).double() - p64)
    if entropy:
        dz -= g_ent.double()[:, None] * p64 * (logp64 + ent64[:, None])
    return types.SimpleNamespace(h=h, w=w, ids=ids, g=g, g_ent=g_ent, z64=z64, p64=p64, ent64=ent64,
                                 d_hidden=dz @ w.double())  # fmt: skip
