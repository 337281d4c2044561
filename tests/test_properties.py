"""Property-based tests: random shapes (B = 1, T = 1, V below a block, odd sizes), random option combinations, random
masks (fully masked rows and batches), advantages of both signs and zero, old and reference log-probs far from the
policy. Every implementation of each public op agrees with the fp64 reference on the loss and the gradients.

The loss is discontinuous where a ratio meets a clip bound, an entropy meets the top-entropy quantile or a sequence's
KL meets the off-policy threshold; there fp32 and fp64 may legitimately fall on different sides, so examples within
a relative 1e-4 of such a point are rejected (`assume`), never compared with a looser tolerance.

`--hypothesis-profile=thorough` runs thousands of examples instead of the default few hundred.
"""

from __future__ import annotations

import contextlib
import math

import torch
from helpers import filtering_bound
from hypothesis import assume, given
from hypothesis import strategies as st

from grpo_kernels import (
    GRPOLossConfig,
    backend,
    fused_linear,
    fused_linear_grpo_loss,
    group_advantages,
    grpo_loss,
    linear_logprobs,
    reference,
)
from grpo_kernels.config import LOSS_TYPES

RTOL = 2e-4  # fp32 results against the fp64 reference, relative to the reference's largest magnitude

configs = st.builds(
    GRPOLossConfig,
    loss_type=st.sampled_from(LOSS_TYPES),
    beta=st.sampled_from([0.0, 0.04, 0.5]),
    epsilon=st.floats(0.05, 0.4),
    epsilon_high=st.none() | st.floats(0.1, 3.0),
    delta=st.none() | st.floats(1.1, 3.0),
    importance_sampling_level=st.sampled_from(["token", "sequence"]),
    temperature=st.floats(0.3, 2.0),
    use_bias_correction_kl=st.booleans(),
    max_completion_length=st.integers(1, 16),
    top_entropy_quantile=st.sampled_from([1.0, 1.0, 0.6, 0.2]),
    off_policy_mask_threshold=st.none() | st.floats(0.0, 1.0),
    entropy_coef=st.sampled_from([0.0, 0.0, 0.05]),
)


@st.composite
def batches(draw, max_v: int = 70):
    """Shapes, masks and the per-token inputs of a loss, drawn from a seed (tensors) and hypothesis (structure)."""
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 6))
    V = draw(st.integers(1, max_v))
    lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    adv_shape = draw(st.sampled_from([(B,), (B, T)]))
    adv = torch.randn(adv_shape, generator=g, dtype=torch.float64)
    adv[torch.rand(adv_shape, generator=g) < 0.2] = 0.0
    spread = draw(st.sampled_from([0.0, 0.3, 2.0]))  # how far old / reference policies are from the current one
    return {
        "B": B, "T": T, "V": V, "mask": mask, "advantages": adv, "g": g,
        "noise": lambda: torch.randn(B, T, generator=g, dtype=torch.float64) * spread,
        "is_ratio": draw(st.sampled_from([None, "token", "sequence"])),
    }  # fmt: skip


def _extras(batch, logps64: torch.Tensor, config: GRPOLossConfig) -> dict:
    B, T, g = batch["B"], batch["T"], batch["g"]
    extra = {"old_logps": logps64 + batch["noise"](), "sampling_logps": logps64 + batch["noise"]()}
    if config.beta:
        extra["ref_logps"] = logps64 + batch["noise"]()
    if batch["is_ratio"] is not None:
        extra["importance_sampling_ratio"] = torch.rand(B, T if batch["is_ratio"] == "token" else 1, generator=g) + 0.5
    return {k: v.double() for k, v in extra.items()}


def _away_from_discontinuities(config, logps, entropy, batch, extra, margin=1e-4):
    """Reject examples whose reference values sit within `margin` (relative) of a point where the loss jumps."""
    mask = batch["mask"]
    if not mask.any():
        return
    log_ratio = torch.where(mask, logps - extra["old_logps"], 0)
    if config.importance_sampling_level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = log_ratio.expand_as(logps)
    ratio = log_ratio.exp()[mask]
    bounds = [1 - config.epsilon, 1 + config.epsilon_high_value, config.epsilon_high_value]
    if config.delta is not None:
        bounds.append(config.delta)
    for b in bounds:
        assume(bool(((ratio - b).abs() > margin * max(1.0, b)).all()))
    if config.top_entropy_quantile < 1:
        active = entropy[mask]
        threshold = torch.quantile(active.float(), 1 - config.top_entropy_quantile)
        assume(bool(((active - threshold).abs() > margin * max(1.0, threshold.abs().item())).all()))
    if config.off_policy_mask_threshold is not None:
        kl = torch.where(mask, extra["sampling_logps"] - logps, 0).sum(-1) / mask.sum(-1).clamp(min=1)
        assume(bool(((kl - config.off_policy_mask_threshold).abs() > margin).all()))
    if config.loss_type == "vespo":  # the gamma weight clamps log w at 20 and log(1e-8)
        log_w = torch.where(mask, logps - extra["old_logps"], 0).clamp(-20, 20).sum(-1)
        assume(bool(((log_w - 20).abs() > margin).all() and ((log_w - math.log(1e-8)).abs() > margin).all()))


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if not e.numel():
        return
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), finite), f"{name}: non-finite values differ"
    scale = max(1.0, e[finite].abs().max().item()) if finite.any() else 1.0
    err = (a[finite] - e[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= RTOL * scale, f"{name}: max error {err:.3e} > {RTOL} x {scale:.3e}"


@contextlib.contextmanager
def _implementation(impl: str):
    """`impl` is "torch" or "triton", then optionally "-" and a linear strategy ("chunked" by default).
    Yields the device its inputs go to (Triton: the GPU when there is one, else the interpreter on the CPU)."""
    name, _, strategy = impl.partition("-")
    with backend(name), fused_linear.schedule(strategy or "chunked"):
        yield "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"


def _reference_inputs(batch, config, logits64, ids):
    """The fp64 reference log-probs and entropies, the extra inputs drawn around them, after the rejection test."""
    mask = batch["mask"]
    with torch.no_grad():
        logps, entropy = reference.logprobs_and_entropy(logits64, ids, config.temperature)
    logps, entropy = logps * mask, entropy * mask
    extra = _extras(batch, logps, config)
    _away_from_discontinuities(config, logps, entropy, batch, extra)
    return extra


@given(config=configs, batch=batches())
def test_grpo_loss_from_logits(config, batch):
    B, T, V, g = batch["B"], batch["T"], batch["V"], batch["g"]
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask, adv = batch["mask"], batch["advantages"]
    extra = _reference_inputs(batch, config, logits, ids)
    x = logits.clone().requires_grad_()
    expected = reference.grpo_loss(x, ids, adv, mask, config=config, **extra)
    (d_expected,) = torch.autograd.grad(expected.loss, x)
    for impl in ("triton", "torch"):
        with _implementation(impl) as dev:
            y = logits.float().to(dev).requires_grad_()
            out = grpo_loss(y, ids.to(dev), adv.float().to(dev), mask.to(dev), config=config,
                            **{k: v.float().to(dev) for k, v in extra.items()})  # fmt: skip
            (dy,) = torch.autograd.grad(out.loss, y)
        _close(out.loss, expected.loss, f"{impl} loss")
        _close(dy, d_expected, f"{impl} dlogits")
        _close(out.logps, expected.logps, f"{impl} logps")
        _close(out.entropy, expected.entropy, f"{impl} entropy")


HEADS = st.sampled_from([{}, {"logit_scale": 0.5}, {"final_logit_softcapping": 4.0, "logit_scale": 1.5}])


@given(config=configs, batch=batches(max_v=40), H=st.integers(1, 24), use_bias=st.booleans(), head=HEADS)
def test_fused_linear_grpo_loss(config, batch, H, use_bias, head):
    B, T, V, g = batch["B"], batch["T"], batch["V"], batch["g"]
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 2 / max(1, H) ** 0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1 if use_bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask, adv = batch["mask"], batch["advantages"]
    extra = _reference_inputs(batch, config, reference.linear_logits(hidden, weight, bias, **head), ids)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if use_bias else ())]
    expected = reference.linear_grpo_loss(leaves[0], leaves[1], ids, adv, mask, bias=leaves[2] if use_bias else None,
                                          config=config, **head, **extra)  # fmt: skip
    d_expected = torch.autograd.grad(expected.loss, leaves)
    for impl in ("triton-fused", "triton-chunked", "triton-vocab-blocks", "triton-tiles", "torch", "torch-vocab-blocks",
                 "torch-tiles"):  # fmt: skip
        with _implementation(impl) as dev:
            got = [t.float().to(dev).requires_grad_() for t in leaves]
            out = fused_linear_grpo_loss(got[0], got[1], ids.to(dev), adv.float().to(dev), mask.to(dev),
                                         bias=got[2] if use_bias else None, config=config, **head,
                                         **{k: v.float().to(dev) for k, v in extra.items()})  # fmt: skip
            grads = torch.autograd.grad(out.loss, got)
        _close(out.loss, expected.loss, f"{impl} loss")
        for name, a, e in zip(("d_hidden", "d_weight", "d_bias"), grads, d_expected, strict=False):
            _close(a, e, f"{impl} {name}")


@given(config=configs, batch=batches(max_v=60), H=st.integers(1, 16), eps=st.sampled_from([0.0, 1e-3, 0.02, 0.2]),
       hot=st.sampled_from([1.0, 4.0, 12.0]))  # fmt: skip
def test_gradient_filtering_error_is_bounded(config, batch, H, eps, hot):
    """With `grad_filter_eps`, each gradient is within the sum of the entries filtering may leave out of the exact
    one (plus fp32 rounding), for any options, shapes and peakedness; the loss is the exact one."""
    B, T, V, g = batch["B"], batch["T"], batch["V"], batch["g"]
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / max(1, H) ** 0.5
    weight[: max(1, V // 8)] *= hot  # a few columns hold the mass
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    ids = torch.randint(0, V, (B, T), generator=g)
    mask, adv = batch["mask"], batch["advantages"]
    extra = _reference_inputs(batch, config, reference.linear_logits(hidden, weight, bias), ids)
    exact, bounds = filtering_bound(hidden, weight, bias, ids, adv, mask, config, eps, **extra)
    expected = reference.linear_grpo_loss(hidden, weight, ids, adv, mask, bias=bias, config=config, **extra)
    for impl in ("triton-fused", "triton-chunked", "torch", "torch-vocab-blocks"):
        with _implementation(impl) as dev:
            got = [t.float().to(dev).requires_grad_() for t in (hidden, weight, bias)]
            out = fused_linear_grpo_loss(got[0], got[1], ids.to(dev), adv.float().to(dev), mask.to(dev), bias=got[2],
                                         config=config, grad_filter_eps=eps,
                                         **{k: v.float().to(dev) for k, v in extra.items()})  # fmt: skip
            grads = torch.autograd.grad(out.loss, got)
        _close(out.loss, expected.loss, f"{impl} loss")
        for name, a, e, bound in zip(("d_hidden", "d_weight", "d_bias"), grads, exact, bounds, strict=True):
            excess = (a.double().cpu() - e).abs() - bound
            scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
            assert excess.numel() == 0 or excess.max().item() <= RTOL * scale, f"{impl} {name}: beyond the bound"


@given(batch=batches(max_v=40), H=st.integers(1, 20), temperature=st.floats(0.3, 2.0))
def test_linear_logprobs(batch, H, temperature):
    B, T, V, g = batch["B"], batch["T"], batch["V"], batch["g"]
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = batch["mask"]
    x = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    logps, entropy = reference.logprobs_and_entropy(reference.linear_logits(*x), ids, temperature)
    weights = torch.randn(2, B, T, generator=g, dtype=torch.float64) * mask
    expected = torch.autograd.grad((logps * weights[0] + entropy * weights[1]).sum(), x)
    for impl in ("triton-fused", "triton-chunked", "triton-tiles", "torch", "torch-tiles"):
        with _implementation(impl) as dev:
            y = [t.float().to(dev).requires_grad_() for t in x]
            lp, ent = linear_logprobs(y[0], y[1], ids.to(dev), temperature=temperature, return_entropy=True,
                                      mask=mask.to(dev))  # fmt: skip
            w = weights.to(dev)
            grads = torch.autograd.grad((lp * w[0] + ent * w[1]).sum(), y)
        _close(lp, logps * mask, f"{impl} logps")
        _close(ent, entropy * mask, f"{impl} entropy")
        for name, a, e in zip(("d_hidden", "d_weight"), grads, expected, strict=True):
            _close(a, e, f"{impl} {name}")


@given(
    G=st.integers(2, 6),
    groups=st.integers(1, 5),
    K=st.integers(1, 4),
    scale=st.sampled_from(["group", "batch", "none"]),
    aggregation=st.sampled_from(["sum_then_normalize", "normalize_then_sum"]),
    nan_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_group_advantages(G, groups, K, scale, aggregation, nan_fraction, ties, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(G * groups, K, generator=g, dtype=torch.float64)
    if ties:  # equal rewards in a group: std 0
        rewards = rewards.round()
    rewards[torch.rand(rewards.shape, generator=g) < nan_fraction] = math.nan
    weights = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
    expected = reference.group_advantages(rewards, G, scale, weights, aggregation)
    for impl in ("triton", "torch"):
        with _implementation(impl) as dev:
            r, w = rewards.float().to(dev), weights.float().to(dev)
            got = group_advantages(r, G, scale_rewards=scale, reward_weights=w, multi_objective_aggregation=aggregation)
        assert torch.isfinite(got).all()
        _close(got, expected, f"{impl} advantages")
