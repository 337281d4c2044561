"""Numerical edge cases of the public ops, each with the defined result that docs/validation.md lists: extreme logits,
a temperature near 0, log-ratios that overflow `exp`, degenerate reward groups, NaN and inf inputs, empty batches;
and the argument table of docs/validation.md, one bad input per row."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, assert_within_pytorch_error, loss_and_grad

from grpo_kernels import (
    GRPOLossConfig,
    HeadOptions,
    backend,
    fused_linear_grpo_loss,
    group_advantages,
    grpo_loss,
    linear_logprobs,
    reference,
    selective_log_softmax,
)
from grpo_kernels.config import LOSS_TYPES, MIN_TEMPERATURE
from grpo_kernels.integrations.trl_reference import TRLLoss

BACKENDS = ["triton", "torch"]


def _dev(impl, device):
    return device if impl == "triton" else "cpu"


def _near(logps, sigma, dev, mask=None):
    """`logps` plus noise; 0 where `mask` is False, as the reference's own log-probs there (a ratio of 1)."""
    x = (logps.double().cpu() + torch.randn(logps.shape, dtype=torch.float64) * sigma).float().to(dev)
    return x if mask is None else torch.where(mask, x, 0.0)


# --------------------------------------------------------------------------------------------------------------------
# Extreme logits: +-1e4 in fp32, +-65,000 in fp16
# --------------------------------------------------------------------------------------------------------------------

EXTREMES = [(torch.float32, 1e4, 2.0), (torch.float16, 65000.0, 100.0), (torch.float16, 2000.0, 100.0)]


def _extreme_logits(B, T, V, dtype, scale, noise, dev):
    """Logits of +-scale (plus a little noise, at most +-4 * noise), and ids of tokens on the + side, whose log-probs
    stay above -1e4 (those on the - side lie near -2 * scale)."""
    sign = torch.where(torch.rand(B, T, V) < 0.5, -1.0, 1.0)
    sign[..., 0] = 1.0
    logits = (sign * scale + torch.randn(B, T, V).clamp(-4, 4) * noise).to(dtype)
    assert torch.isfinite(logits).all()
    top = torch.where(sign > 0, torch.rand(B, T, V), -1.0)
    return logits.to(dev), top.argmax(-1).to(dev), (sign < 0).to(dev)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype,scale,noise", EXTREMES)
def test_extreme_logits_match_the_fp64_reference(impl, dtype, scale, noise, device):
    dev = _dev(impl, device)
    B, T, V = 3, 5, 67
    logits, ids, _ = _extreme_logits(B, T, V, dtype, scale, noise, dev)
    logps, _ = reference.logprobs_and_entropy(logits.double(), ids)
    adv = torch.randn(B, device=dev)
    mask = torch.rand(B, T, device=dev) > 0.2
    extra = {"old_logps": _near(logps, 0.2, dev, mask), "ref_logps": _near(logps, 0.3, dev, mask)}
    config = GRPOLossConfig(loss_type="grpo", beta=0.04, entropy_coef=0.01)
    with backend(impl):
        out, dx = loss_and_grad(grpo_loss, logits, ids, adv, mask, config=config, **extra)
        sel = selective_log_softmax(logits, ids)
    same, dx_same = loss_and_grad(reference.grpo_loss, logits, ids, adv, mask, config=config, **extra)
    exact, dx_exact = loss_and_grad(
        reference.grpo_loss, logits, ids, adv, mask, config=config, upcast_to=torch.float64, **extra
    )
    assert torch.isfinite(out.loss) and torch.isfinite(dx).all() and torch.isfinite(out.entropy).all()
    assert_within_pytorch_error(out.loss, same.loss, exact.loss, name="loss")
    assert_within_pytorch_error(out.logps, same.logps, exact.logps, name="logps")
    assert_within_pytorch_error(out.entropy, same.entropy, exact.entropy, name="entropy")
    assert_within_pytorch_error(dx, dx_same, dx_exact, name="dlogits")
    sel_same, sel_exact = (reference.selective_log_softmax(z, ids) for z in (logits, logits.double()))
    assert_within_pytorch_error(sel, sel_same, sel_exact, name="selective_log_softmax")


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype,scale,noise", EXTREMES)
def test_log_probs_far_below_minus_1e4_are_exact(impl, dtype, scale, noise, device):
    """A token at -scale while others are at +scale has log-prob about -2 * scale; it must not be floored."""
    dev = _dev(impl, device)
    logits, _, low = _extreme_logits(2, 4, 41, dtype, scale, noise, dev)
    ids = torch.where(low, torch.rand(low.shape, device=dev), -1.0).argmax(-1)
    with backend(impl):
        got = selective_log_softmax(logits, ids)
    same = reference.selective_log_softmax(logits, ids)
    exact = reference.selective_log_softmax(logits.double(), ids)
    assert exact.max() < -1.9 * scale
    assert_within_pytorch_error(got, same, exact, name="logps")


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.float16, 65000.0)])
def test_extreme_logits_through_the_head(impl, dtype, scale, device):
    """Hidden states and a head whose logits reach +-scale: loss, log-probs and every gradient match fp64. In fp16
    the logits are exact multiples of 256 (up to 64,000), so that the fp16 product itself is exact."""
    dev = _dev(impl, device)
    B, T, H, V = 2, 5, 8, 53
    if dtype == torch.float16:
        k = torch.randint(0, H, (B, T))
        hidden = torch.nn.functional.one_hot(k, H).float() * 256 * torch.where(torch.rand(B, T, 1) < 0.5, -1.0, 1.0)
        weight = torch.randint(-250, 251, (V, H)).float()
    else:
        hidden = torch.randn(B, T, H)
        weight = torch.randn(V, H) * scale / math.sqrt(H)
    hidden, weight = hidden.to(dtype).to(dev), weight.to(dtype).to(dev)
    ids = torch.randint(0, V, (B, T), device=dev)
    adv = torch.randn(B, device=dev)
    mask = torch.rand(B, T, device=dev) > 0.2
    logps, _ = reference.logprobs_and_entropy(reference.linear_logits(hidden.double(), weight.double()), ids)
    extra = {"old_logps": _near(logps, 0.2, dev, mask), "ref_logps": _near(logps, 0.3, dev, mask)}
    config = GRPOLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01)

    def run(fn, upcast_to=None, **kwargs):
        h, w = (t.detach().clone() for t in (hidden, weight))
        h, w = (t if upcast_to is None else t.to(upcast_to) for t in (h, w))
        h.requires_grad_(), w.requires_grad_()
        out = fn(h, w, ids, adv, mask, config=config, **extra, **kwargs)
        return out, torch.autograd.grad(out.loss, (h, w))

    with backend(impl):
        out, (dh, dw) = run(fused_linear_grpo_loss)
        lp, ent = linear_logprobs(hidden, weight, ids, mask=mask, return_entropy=True)
    same, (dh_same, dw_same) = run(reference.linear_grpo_loss, upcast=dtype != torch.float32)
    exact, (dh_exact, dw_exact) = run(reference.linear_grpo_loss, upcast_to=torch.float64)
    assert logps.abs().max() > scale
    assert torch.isfinite(out.loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()
    assert_within_pytorch_error(out.loss, same.loss, exact.loss, name="loss")
    assert_within_pytorch_error(out.logps, same.logps, exact.logps, name="logps")
    assert_within_pytorch_error(lp, same.logps, exact.logps, name="linear_logprobs")
    assert_within_pytorch_error(ent, same.entropy, exact.entropy, name="linear_logprobs entropy")
    assert_within_pytorch_error(dh, dh_same, dh_exact, name="d_hidden")
    assert_within_pytorch_error(dw, dw_same, dw_exact, name="d_weight")


# --------------------------------------------------------------------------------------------------------------------
# Temperature near 0
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", BACKENDS)
def test_temperature_near_zero_matches_the_reference(impl, device):
    """At temperature 1e-3 the log-probs reach thousands and the distributions are nearly one-hot: still exact."""
    dev = _dev(impl, device)
    B, T, V, H = 3, 4, 45, 8
    logits = torch.randn(B, T, V, device=dev)
    ids = torch.randint(0, V, (B, T), device=dev)
    ids[:, 0] = logits[:, 0].argmax(-1)  # some tokens at the mode: log-prob near 0
    adv = torch.randn(B, device=dev)
    logps, _ = reference.logprobs_and_entropy(logits.double(), ids, 1e-3)
    extra = {"old_logps": _near(logps, 0.1, dev), "ref_logps": _near(logps, 0.1, dev)}
    config = GRPOLossConfig(loss_type="bnpo", beta=0.04, temperature=1e-3)
    with backend(impl):
        out, dx = loss_and_grad(grpo_loss, logits, ids, adv, config=config, **extra)
        sel = selective_log_softmax(logits, ids, temperature=1e-3)
    same, dx_same = loss_and_grad(reference.grpo_loss, logits, ids, adv, config=config, **extra)
    exact, dx_exact = loss_and_grad(
        reference.grpo_loss, logits, ids, adv, config=config, upcast_to=torch.float64, **extra
    )
    assert exact.logps.min() < -500
    assert_within_pytorch_error(out.loss, same.loss, exact.loss, name="loss")
    assert_within_pytorch_error(out.logps, same.logps, exact.logps, name="logps")
    assert_within_pytorch_error(out.entropy, same.entropy, exact.entropy, name="entropy")
    assert_within_pytorch_error(dx, dx_same, dx_exact, name="dlogits")
    assert_within_pytorch_error(sel, same.logps, exact.logps, name="selective_log_softmax")

    hidden, weight = torch.randn(B, T, H, device=dev), torch.randn(V, H, device=dev)
    z = reference.linear_logits(hidden, weight)
    logps, _ = reference.logprobs_and_entropy(z.double(), ids, 1e-3)
    extra = {"old_logps": _near(logps, 0.1, dev), "ref_logps": _near(logps, 0.1, dev)}
    with backend(impl):
        lp, ent = linear_logprobs(hidden, weight, ids, temperature=1e-3, return_entropy=True)
        fused = fused_linear_grpo_loss(hidden, weight, ids, adv, config=config, **extra)
    same = reference.grpo_loss(z, ids, adv, config=config, **extra)
    exact = reference.linear_grpo_loss(hidden.double(), weight.double(), ids, adv, config=config, **extra)
    assert exact.logps.min() < -500
    assert_within_pytorch_error(lp, same.logps, exact.logps, name="linear_logprobs")
    assert_within_pytorch_error(ent, same.entropy, exact.entropy, name="linear_logprobs entropy")
    assert_within_pytorch_error(fused.loss, same.loss, exact.loss, name="fused loss")
    assert_within_pytorch_error(fused.logps, same.logps, exact.logps, name="fused logps")


@pytest.mark.parametrize("temperature", [0.0, -1.0, 1e-45, MIN_TEMPERATURE / 2])
def test_temperature_too_small_is_an_error(temperature):
    """Below about 2.9e-39, 1 / temperature overflows fp32: every entry point refuses it instead of returning NaN."""
    match = "temperature must be"
    with pytest.raises(ValueError, match=match):
        GRPOLossConfig(temperature=temperature)
    with pytest.raises(ValueError, match=match):
        HeadOptions(temperature=temperature)
    with pytest.raises(ValueError, match=match):
        selective_log_softmax(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature)
    with pytest.raises(ValueError, match=match):
        linear_logprobs(torch.randn(1, 2, 3), torch.randn(5, 3), torch.zeros(1, 2, dtype=torch.long),
                        temperature=temperature)  # fmt: skip


def test_smallest_temperature_is_accepted():
    x = torch.tensor([[0.0, -1e-30]])
    got = selective_log_softmax(x, torch.zeros(1, dtype=torch.long), temperature=MIN_TEMPERATURE)
    assert torch.isfinite(got).all()


# --------------------------------------------------------------------------------------------------------------------
# Log-ratios that overflow exp
# --------------------------------------------------------------------------------------------------------------------


def _overflow_case(impl, dev, config, which, offset, mask=None, adv=None):
    """Our loss and TRL 1.16's on the same per-token log-probs, with `old_logps` or `ref_logps` = logps + offset at
    token 1 of every row (exactly logps elsewhere)."""
    B, T, V = 3, 4, 29
    logits = torch.randn(B, T, V, device=dev)
    ids = torch.randint(0, V, (B, T), device=dev)
    adv = torch.tensor([1.0, -1.0, 0.5], device=dev) if adv is None else adv.to(dev)
    with backend(impl):
        base = grpo_loss(logits, ids, adv, mask, config=GRPOLossConfig())
    shift = torch.zeros(B, T, device=dev)
    shift[:, 1] = offset
    far = {f"{which}_logps": base.logps + shift}
    if config.beta != 0.0 and which != "ref":
        far["ref_logps"] = base.logps
    x = logits.clone().requires_grad_()
    with backend(impl):
        out = grpo_loss(x, ids, adv, mask, config=config, **far)
        out.loss.backward()
    lp = base.logps.clone().requires_grad_()
    m = torch.ones(B, T, dtype=torch.long, device=dev) if mask is None else mask.long()
    trl_loss, trl_metrics = TRLLoss(config, use_vllm=False)(lp, base.entropy, ids, adv, m, **far)
    trl_loss.backward()
    return out, x.grad, trl_loss, lp.grad, trl_metrics


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("offset", [-100.0, -1000.0])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reference_far_below_the_policy_is_finite(impl, offset, loss_type, device):
    """ref_logps = logps - 100 (or - 1000): k3 = exp(-100) + 100 - 1 = 99 (999), finite, as TRL."""
    config = GRPOLossConfig(loss_type=loss_type, beta=0.04)
    out, dx, trl_loss, _, trl_metrics = _overflow_case(impl, _dev(impl, device), config, "ref", offset)
    assert torch.isfinite(dx).all()
    assert out.metrics["kl"].item() == pytest.approx((-offset - 1 + math.exp(offset)) / 4, rel=1e-6)
    assert_close(out.loss, trl_loss, atol=1e-6, rtol=1e-6, name="loss vs TRL")
    assert out.metrics["kl"].item() == pytest.approx(trl_metrics["kl"], rel=1e-6)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("offset", [100.0, 1000.0])
def test_reference_far_above_the_policy_gives_an_infinite_kl(impl, offset, device):
    """ref_logps = logps + 100: k3 = exp(100) - 101 = 2.7e43 overflows fp32, so the KL and the loss are +inf, as in
    TRL: never a finite number."""
    config = GRPOLossConfig(loss_type="dapo", beta=0.04)
    out, _, trl_loss, _, trl_metrics = _overflow_case(impl, _dev(impl, device), config, "ref", offset)
    assert out.loss.item() == math.inf and out.metrics["kl"].item() == math.inf
    assert trl_loss.item() == math.inf and trl_metrics["kl"] == math.inf


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("which", ["old", "ref"])
def test_far_log_probs_on_masked_tokens_change_nothing(impl, which, device):
    """Where TRL's loss is NaN (0 * inf on a masked-out token) ours is the loss of the tokens in the mask: the same as
    with those values replaced by the policy's own log-probs."""
    dev = _dev(impl, device)
    mask = torch.ones(3, 4, dtype=torch.bool, device=dev)
    mask[:, 1] = False
    config = GRPOLossConfig(loss_type="grpo", beta=0.04)
    torch.manual_seed(1)
    far, _, trl_far, _, _ = _overflow_case(impl, dev, config, which, 1000.0 if which == "ref" else -1000.0, mask)
    torch.manual_seed(1)
    near, _, trl_near, _, _ = _overflow_case(impl, dev, config, which, 0.0, mask)
    assert torch.isfinite(far.loss) and far.loss.item() == near.loss.item()
    assert far.metrics["kl"].item() == near.metrics["kl"].item()
    assert_close(near.loss, trl_near, atol=1e-6, rtol=1e-6, name="loss vs TRL")
    assert math.isnan(trl_far.item())


# (loss type, importance sampling level) -> the loss with old_logps = logps - 100 at token 1 of rows with advantages
# +1, -1, 0.5 (ratio exp(100) = inf in fp32 there, 1 elsewhere): what it is, and TRL gives the same
RATIO_OVERFLOW = {
    # -min(r A, clip(r) A) at r = inf: -(1 + eps) A for A > 0 (exact); +inf for A < 0 (the true e^100 overflows)
    ("dapo", "token"): math.inf,
    ("grpo", "token"): math.inf,
    # r = exp(mean log-ratio) = exp(25) = 7.2e10 per row: finite, and exactly the clipped objective
    ("grpo", "sequence"): (-(1.2 * 1.0) + math.exp(25.0) - 1.2 * 0.5) / 3,
    # cispo caps the (detached) ratio at epsilon_high: finite
    ("cispo", "token"): "trl",
    # sapo's gate sigmoid(tau (r - 1)) = 1 at r = inf: finite loss (its gradient there is NaN, as in TRL)
    ("sapo", "token"): "trl",
    # vespo clamps the log-ratio to 20: finite
    ("vespo", "token"): "trl",
}


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("case", list(RATIO_OVERFLOW), ids=lambda c: "-".join(c))
def test_importance_ratio_overflow(impl, case, device):
    loss_type, level = case
    expected = RATIO_OVERFLOW[case]
    config = GRPOLossConfig(loss_type=loss_type, importance_sampling_level=level)
    out, dx, trl_loss, trl_grad, _ = _overflow_case(impl, _dev(impl, device), config, "old", -100.0)
    if expected == "trl":
        assert torch.isfinite(out.loss)
        assert_close(out.loss, trl_loss, atol=1e-6, rtol=1e-6, name="loss vs TRL")
    elif expected == math.inf:
        assert out.loss.item() == math.inf and trl_loss.item() == math.inf
    else:
        assert out.loss.item() == pytest.approx(expected, rel=1e-6)
        assert trl_loss.item() == pytest.approx(expected, rel=1e-6)
    # the gradient is finite exactly where TRL's is
    assert bool(torch.isfinite(dx).all()) == bool(torch.isfinite(trl_grad).all())


@pytest.mark.parametrize("impl", BACKENDS)
def test_ratio_overflow_with_zero_advantage_is_nan_as_in_trl(impl, device):
    """r = inf times A = 0 is NaN in TRL and here (the limit is 0): a NaN, never a wrong finite number."""
    config = GRPOLossConfig(loss_type="grpo")
    adv = torch.tensor([1.0, 0.0, 0.5])
    out, _, trl_loss, _, _ = _overflow_case(impl, _dev(impl, device), config, "old", -100.0, adv=adv)
    assert math.isnan(out.loss.item()) and math.isnan(trl_loss.item())


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("offset", [100.0, 1000.0])
@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo", "vespo"])
def test_old_policy_far_above_gives_a_vanishing_ratio(impl, offset, loss_type, device):
    """old_logps = logps + 100: r = exp(-100) (a subnormal in fp32) or 0: finite, equal to TRL's."""
    config = GRPOLossConfig(loss_type=loss_type)
    out, dx, trl_loss, _, _ = _overflow_case(impl, _dev(impl, device), config, "old", offset)
    assert torch.isfinite(out.loss) and torch.isfinite(dx).all()
    assert_close(out.loss, trl_loss, atol=1e-6, rtol=1e-6, name="loss vs TRL")


# --------------------------------------------------------------------------------------------------------------------
# Rewards: equal in a group, NaN
# --------------------------------------------------------------------------------------------------------------------

NAN = math.nan


def _scaled(x, mean, std):
    return (x - mean) / (std + 1e-4)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_degenerate_groups(impl, scale, device):
    """Groups of 4: all equal (std 0); one NaN; all NaN; one reward and three NaN; and the batch of all of them."""
    dev = _dev(impl, device)
    rewards = torch.tensor([2.0, 2.0, 2.0, 2.0, 1.0, NAN, 3.0, 0.0, NAN, NAN, NAN, NAN, 5.0, NAN, NAN, NAN], device=dev)
    with backend(impl):
        got = group_advantages(rewards, 4, scale_rewards=scale)
    mean_b = 4 / 3
    std_g = math.sqrt(((1 - mean_b) ** 2 + (3 - mean_b) ** 2 + (0 - mean_b) ** 2) / 2)
    present = [2.0, 2.0, 2.0, 2.0, 1.0, 3.0, 0.0, 5.0]
    m = sum(present) / len(present)
    std_batch = math.sqrt(sum((r - m) ** 2 for r in present) / (len(present) - 1))
    centred = [r - mean_b for r in (1.0, 0.0, 3.0, 0.0)]  # 0.0 for the NaN reward (an advantage of 0)
    centred = [centred[0], 0.0, centred[2], 0.0 - mean_b]
    if scale == "group":
        second = [_scaled(c, 0.0, std_g) for c in centred]
    elif scale == "batch":
        second = [_scaled(c, 0.0, std_batch) for c in centred]
    else:
        second = centred
    second[1] = 0.0  # the NaN reward
    expected = [0.0] * 4 + second + [0.0] * 8  # std 0 -> 0; all NaN -> 0; a lone reward minus its own mean -> 0
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert got[:4].tolist() == [0.0] * 4 and got[8:].tolist() == [0.0] * 8
    assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-6, name="advantages")


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_all_rewards_nan_gives_zero_advantages(impl, scale, aggregation, device):
    dev = _dev(impl, device)
    with backend(impl):
        got = group_advantages(torch.full((8, 2), NAN, device=dev), 4, scale_rewards=scale,
                               multi_objective_aggregation=aggregation)  # fmt: skip
    assert got.tolist() == [0.0] * 8


@pytest.mark.parametrize("impl", BACKENDS)
def test_nan_in_one_reward_function_uses_the_others(impl, device):
    """sum_then_normalize: a row's total is the weighted sum of its non-NaN rewards ([1, NaN] -> 1); a row of NaN is
    unscorable (advantage 0) and left out of its group's mean and std."""
    dev = _dev(impl, device)
    rewards = torch.tensor([[1.0, NAN], [NAN, NAN], [2.0, 1.0], [0.0, 3.0], [4.0, NAN], [NAN, 2.0]], device=dev)
    with backend(impl):
        got = group_advantages(rewards, 3, reward_weights=[1.0, 2.0])
    totals = [1.0, 4.0]  # group 1: rows 0 and 2 (row 1 unscorable)
    std = math.sqrt(((1.0 - 2.5) ** 2 + (4.0 - 2.5) ** 2) / 1)
    second = [6.0, 4.0, 4.0]
    m2 = sum(second) / 3
    std2 = math.sqrt(sum((t - m2) ** 2 for t in second) / 2)
    expected = [_scaled(totals[0], 2.5, std), 0.0, _scaled(totals[1], 2.5, std)]
    expected += [_scaled(t, m2, std2) for t in second]
    assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-6, name="advantages")


# --------------------------------------------------------------------------------------------------------------------
# NaN and inf in logits, hidden states and the head
# --------------------------------------------------------------------------------------------------------------------

NAN_CONFIGS = [
    {"loss_type": t} for t in LOSS_TYPES
] + [
    {"loss_type": "dapo", "top_entropy_quantile": 0.5},
    {"loss_type": "dapo", "off_policy_mask_threshold": 0.1},
    {"loss_type": "grpo", "beta": 0.1, "entropy_coef": 0.1},
    {"loss_type": "sapo", "importance_sampling_level": "sequence"},
    {"loss_type": "vespo", "importance_sampling_level": "sequence"},
]  # fmt: skip


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, math.inf])
@pytest.mark.parametrize("options", NAN_CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_nan_or_inf_logits_give_a_nan_loss(impl, bad, options, device):
    """One NaN or +inf logit at a token in the loss: that token's log-prob and entropy are NaN, every other token's
    are exact, and the loss is NaN whatever the options (nothing drops it silently)."""
    dev = _dev(impl, device)
    B, T, V = 3, 4, 29
    config = GRPOLossConfig(max_completion_length=T, **options)
    logits = torch.randn(B, T, V, device=dev)
    ids = torch.randint(0, V, (B, T), device=dev)
    clean, _ = reference.logprobs_and_entropy(logits.double(), ids)
    logits[1, 2, 5] = bad
    extra = {"ref_logps": clean.float()} if config.beta else {}
    x = logits.clone().requires_grad_()
    with backend(impl):
        out = grpo_loss(x, ids, torch.tensor([1.0, -1.0, 0.5], device=dev), config=config, **extra)
        out.loss.backward()
        sel = selective_log_softmax(logits, ids)
    assert math.isnan(out.loss.item())
    bad_token = torch.zeros(B, T, dtype=torch.bool, device=dev)
    bad_token[1, 2] = True
    for name, got in (("logps", out.logps), ("entropy", out.entropy), ("selective_log_softmax", sel)):
        assert torch.isnan(got[bad_token]).all() and torch.isfinite(got[~bad_token]).all(), name
    assert torch.isnan(x.grad[1, 2]).all()


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize(
    "where,bad",
    [("hidden", NAN), ("hidden", math.inf), ("hidden", -math.inf), ("weight", NAN), ("bias", NAN), ("bias", math.inf)],
)
@pytest.mark.parametrize("options", NAN_CONFIGS[:3] + NAN_CONFIGS[-5:], ids=lambda o: "-".join(map(str, o.values())))
def test_nan_or_inf_in_the_head_gives_a_nan_loss(impl, where, bad, options, device):
    """NaN or +-inf in the hidden states (one token), NaN in the weight or NaN or +inf in the bias (one vocabulary
    entry): NaN log-probs at the tokens that read it and a NaN loss. (A bias of -inf is a vocabulary entry of
    probability 0, as a logit of -inf.)"""
    dev = _dev(impl, device)
    B, T, H, V = 3, 4, 8, 29
    config = GRPOLossConfig(max_completion_length=T, **options)
    tensors = {"hidden": torch.randn(B, T, H, device=dev), "weight": torch.randn(V, H, device=dev),
               "bias": torch.randn(V, device=dev)}  # fmt: skip
    ids = torch.randint(0, V, (B, T), device=dev)
    clean = linear_logprobs(tensors["hidden"], tensors["weight"], ids, bias=tensors["bias"])
    index = {"hidden": (1, 2, 3), "weight": (5, 1), "bias": (5,)}[where]
    tensors[where][index] = bad
    extra = {"ref_logps": clean} if config.beta else {}
    h = tensors["hidden"].requires_grad_()
    with backend(impl):
        out = fused_linear_grpo_loss(h, tensors["weight"], ids, torch.tensor([1.0, -1.0, 0.5], device=dev),
                                     bias=tensors["bias"], config=config, **extra)  # fmt: skip
        out.loss.backward()
        lp = linear_logprobs(tensors["hidden"], tensors["weight"], ids, bias=tensors["bias"]).detach()
    assert math.isnan(out.loss.item())
    if where == "hidden":
        assert math.isnan(lp[1, 2].item())
        lp[1, 2] = 0.0
        assert torch.isfinite(lp).all()
    else:
        assert torch.isnan(lp).all()


@pytest.mark.parametrize("impl", BACKENDS)
def test_nan_where_the_mask_is_zero_is_never_read(impl, device):
    """NaN hidden states, logits, old or reference log-probs at masked-out tokens leave the loss exact."""
    dev = _dev(impl, device)
    B, T, H, V = 3, 4, 8, 29
    hidden, weight = torch.randn(B, T, H, device=dev), torch.randn(V, H, device=dev)
    ids = torch.randint(0, V, (B, T), device=dev)
    adv = torch.randn(B, device=dev)
    mask = torch.rand(B, T, device=dev) > 0.3
    mask[0, 0], mask[1, 1] = False, True
    lp = linear_logprobs(hidden, weight, ids)
    extra = {"old_logps": _near(lp, 0.1, dev), "ref_logps": _near(lp, 0.1, dev),
             "importance_sampling_ratio": torch.rand(B, T, device=dev) + 0.5}  # fmt: skip
    config = GRPOLossConfig(loss_type="grpo", beta=0.1)
    with backend(impl):
        expected = fused_linear_grpo_loss(hidden, weight, ids, adv, mask, config=config, **extra)
        expected_logits = grpo_loss(hidden @ weight.T, ids, adv, mask, config=config, **extra)
    poisoned = {k: torch.where(mask, v, NAN) for k, v in extra.items()}
    hidden_nan = torch.where(mask.unsqueeze(-1), hidden, NAN)
    with backend(impl):
        got = fused_linear_grpo_loss(hidden_nan, weight, ids, adv, mask, config=config, **poisoned)
        got_logits = grpo_loss(hidden_nan @ weight.T, ids, adv, mask, config=config, **poisoned)
    assert torch.isfinite(got.loss) and got.loss.item() == expected.loss.item()
    assert torch.isfinite(got_logits.loss) and got_logits.loss.item() == expected_logits.loss.item()


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["old_logps", "ref_logps", "importance_sampling_ratio"])
@pytest.mark.parametrize("loss_type", ["grpo", "vespo"])
def test_non_finite_per_token_inputs_in_the_loss_are_errors(impl, bad, name, loss_type, device):
    """NaN or an infinity in old or reference log-probs or importance weights at a token in the loss would give a NaN
    or infinite loss and gradients, a ratio of 0, or (vespo, whose weight treats NaN as 0) silently drop the
    sequence: an error that names the argument."""
    dev = _dev(impl, device)
    B, T, V = 2, 3, 11
    logits = torch.randn(B, T, V, device=dev)
    ids = torch.randint(0, V, (B, T), device=dev)
    values = {"old_logps": torch.randn(B, T, device=dev) - 2, "ref_logps": torch.randn(B, T, device=dev) - 2,
              "importance_sampling_ratio": torch.rand(B, T, device=dev) + 0.5}  # fmt: skip
    values[name][1, 2] = bad
    config = GRPOLossConfig(loss_type=loss_type, beta=0.1)
    match = f"{name} holds NaN or an infinity at a token in the loss"
    with backend(impl), pytest.raises(ValueError, match=match):
        grpo_loss(logits, ids, torch.randn(B, device=dev), config=config, **values)
    with backend(impl), pytest.raises(ValueError, match=match):
        fused_linear_grpo_loss(torch.randn(B, T, 4, device=dev), torch.randn(V, 4, device=dev), ids,
                               torch.randn(B, device=dev), config=config, **values)  # fmt: skip


@pytest.mark.parametrize("impl", BACKENDS)
def test_token_ids_of_every_accepted_integer_dtype(impl, device):
    """Token ids in int32, int16, int8 or uint8 give the loss and log-probs of int64 ids."""
    dev = _dev(impl, device)
    B, T, H, V = 2, 3, 4, 11
    hidden, weight = torch.randn(B, T, H, device=dev), torch.randn(V, H, device=dev)
    ids, adv = torch.randint(0, V, (B, T), device=dev), torch.randn(B, device=dev)
    with backend(impl):
        expected = fused_linear_grpo_loss(hidden, weight, ids, adv)
        expected_logits = grpo_loss(hidden @ weight.T, ids, adv)
        for dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
            got = fused_linear_grpo_loss(hidden, weight, ids.to(dtype), adv)
            got_logits = grpo_loss(hidden @ weight.T, ids.to(dtype), adv)
            assert torch.equal(got.logps, expected.logps) and got.loss.item() == expected.loss.item(), dtype
            assert torch.equal(got_logits.logps, expected_logits.logps), dtype


def test_nan_sampling_logps_read_as_no_divergence():
    """sampling_logps may hold NaN (a token the sampler could not score): the off-policy mask reads it as a zero
    divergence, as TRL does, so the loss equals the loss with the sampler's log-prob equal to the policy's."""
    B, T, V = 2, 3, 11
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    adv = torch.tensor([-1.0, -0.5])
    logps = selective_log_softmax(logits, ids)
    sampling = logps - 0.05 * torch.rand(B, T)
    config = GRPOLossConfig(loss_type="dapo", off_policy_mask_threshold=0.02)
    with_nan = sampling.clone()
    with_nan[0, 1] = NAN
    as_equal = sampling.clone()
    as_equal[0, 1] = logps[0, 1]
    a = grpo_loss(logits, ids, adv, config=config, sampling_logps=with_nan)
    b = grpo_loss(logits, ids, adv, config=config, sampling_logps=as_equal)
    assert torch.isfinite(a.loss) and a.loss.item() == b.loss.item()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_minus_infinity_logit_at_the_completion_token(impl, device):
    """A completion token of probability 0 has log-prob -inf; the loss (ratio exp(-inf + inf)) is then NaN."""
    dev = _dev(impl, device)
    logits = torch.randn(2, 3, 17, device=dev)
    ids = torch.randint(0, 17, (2, 3), device=dev)
    logits[1, 2, ids[1, 2]] = -math.inf
    with backend(impl):
        sel = selective_log_softmax(logits, ids)
        out = grpo_loss(logits, ids, torch.tensor([1.0, -1.0], device=dev))
    assert sel[1, 2].item() == -math.inf and out.logps[1, 2].item() == -math.inf
    assert math.isnan(out.loss.item())


# --------------------------------------------------------------------------------------------------------------------
# Empty batches (B = 0 and T = 0 from logits: tests/test_validation.py)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"top_entropy_quantile": 0.5}, {"importance_sampling_level": "sequence"}])
def test_no_completion_tokens_through_the_head(impl, options, device):
    """T = 0: a zero loss and zero gradients of the right shapes; log-probs of shape [B, 0]."""
    dev = _dev(impl, device)
    hidden = torch.randn(2, 0, 8, device=dev, requires_grad=True)
    weight = torch.randn(11, 8, device=dev, requires_grad=True)
    ids = torch.zeros(2, 0, dtype=torch.long, device=dev)
    with backend(impl):
        out = fused_linear_grpo_loss(hidden, weight, ids, torch.randn(2, device=dev), config=GRPOLossConfig(**options))
        out.loss.backward()
        lp, ent = linear_logprobs(hidden, weight, ids, return_entropy=True)
    assert out.loss.item() == 0.0 and hidden.grad.shape == (2, 0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert lp.shape == ent.shape == (2, 0)
    with pytest.raises(ValueError, match="the batch is empty"):
        fused_linear_grpo_loss(torch.randn(0, 3, 8), torch.randn(11, 8), torch.zeros(0, 3, dtype=torch.long),
                               torch.randn(0))  # fmt: skip


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 7), (0, 3, 7)])
def test_selective_log_softmax_of_no_rows(impl, shape, device):
    dev = _dev(impl, device)
    logits = torch.randn(shape, device=dev)
    with backend(impl):
        got = selective_log_softmax(logits, torch.zeros(shape[:-1], dtype=torch.long, device=dev))
    assert got.shape == shape[:-1] and got.dtype == torch.float32


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_masked_batch_is_a_zero_loss(impl, loss_type, device):
    """No token in the mask: loss 0 and zero gradients for every loss type and both entry points, whatever (even
    NaN) the hidden states and per-token inputs hold."""
    dev = _dev(impl, device)
    B, T, H, V = 2, 3, 8, 11
    hidden = torch.full((B, T, H), NAN, device=dev, requires_grad=True)
    weight = torch.randn(V, H, device=dev, requires_grad=True)
    logits = torch.full((B, T, V), NAN, device=dev, requires_grad=True)
    ids = torch.randint(0, V, (B, T), device=dev)
    mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
    nan = torch.full((B, T), NAN, device=dev)
    config = GRPOLossConfig(loss_type=loss_type, beta=0.1, entropy_coef=0.1, max_completion_length=T)
    args = (ids, torch.randn(B, device=dev), mask)
    kwargs = {"config": config, "old_logps": nan, "ref_logps": nan}
    with backend(impl):
        fused = fused_linear_grpo_loss(hidden, weight, *args, **kwargs)
        fused.loss.backward()
        plain = grpo_loss(logits, *args, **kwargs)
        plain.loss.backward()
    for out in (fused, plain):
        assert out.loss.item() == 0.0
        assert torch.equal(out.logps, torch.zeros(B, T, device=dev))
    for g in (hidden.grad, weight.grad, logits.grad):
        assert torch.equal(g, torch.zeros_like(g))


# --------------------------------------------------------------------------------------------------------------------
# The argument table of docs/validation.md: the rows no other test covers (the others: tests/test_validation.py,
# tests/test_advantages.py::test_bad_input, tests/test_fused_linear.py::test_bad_input, the NaN tests above)
# --------------------------------------------------------------------------------------------------------------------


def _loss(**changes):
    B, T, V = 2, 3, 11
    args = {"logits": torch.randn(B, T, V), "completion_ids": torch.randint(0, V, (B, T)), "advantages": torch.randn(B)}
    args.update(changes)
    return grpo_loss(args.pop("logits"), args.pop("completion_ids"), args.pop("advantages"), **args)


def _linear(fn=fused_linear_grpo_loss, **changes):
    B, T, H, V = 2, 3, 4, 11
    args = {"hidden": torch.randn(B, T, H), "weight": torch.randn(V, H), "ids": torch.randint(0, V, (B, T))}
    if fn is fused_linear_grpo_loss:
        args["advantages"] = torch.randn(B)
    args.update(changes)
    positional = [args.pop(k) for k in ("hidden", "weight", "ids", "advantages") if k in args]
    return fn(*positional, **args)


META = torch.device("meta")
ARGUMENT_ROWS = [
    # grpo_loss
    (lambda: _loss(logits=torch.randn(2, 3, 0)), ValueError, "logits must be \\[B, T, V\\] with V >= 1"),
    (lambda: _loss(completion_ids=[[0]]), TypeError, "completion_ids must be a torch.Tensor"),
    (lambda: _loss(completion_ids=torch.zeros(2, 3, dtype=torch.long, device=META)), ValueError,
     "completion_ids is on meta"),
    (lambda: _loss(advantages=torch.tensor([1.0, math.inf])), ValueError, "advantages must be finite"),
    (lambda: _loss(completion_mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError,
     "completion_mask must be a bool"),
    (lambda: _loss(completion_mask=torch.ones(2, 3, device=META)), ValueError, "completion_mask is on meta"),
    (lambda: _loss(ref_logps=torch.randn(2, 4), config=GRPOLossConfig(beta=0.1)), ValueError, "ref_logps has shape"),
    (lambda: _loss(ref_logps=torch.ones(2, 3, dtype=torch.long), config=GRPOLossConfig(beta=0.1)), TypeError,
     "ref_logps must be a floating-point"),
    (lambda: _loss(old_logps=torch.randn(2, 3, device=META)), ValueError, "old_logps is on meta"),
    (lambda: _loss(sampling_logps=torch.ones(2, 3, dtype=torch.int32)), TypeError, "sampling_logps must be a floating"),
    (lambda: _loss(importance_sampling_ratio=torch.ones(2, 1, dtype=torch.long)), TypeError,
     "importance_sampling_ratio must be a floating"),
    (lambda: _loss(num_items_in_batch=torch.tensor([3.0, 4.0])), ValueError, "num_items_in_batch must be a scalar"),
    (lambda: _loss(num_items_in_batch=torch.tensor(math.nan)), ValueError, "num_items_in_batch must be a finite"),
    (lambda: _loss(num_items_in_batch=torch.tensor(-5.0)), ValueError, "num_items_in_batch must be a finite number >="),
    (lambda: _loss(num_items_in_batch=torch.tensor(True)), TypeError, "num_items_in_batch must be a real number"),
    (lambda: _loss(num_items_in_batch=torch.tensor(1 + 1j)), TypeError, "num_items_in_batch must be a real number"),
    (lambda: _loss(num_items_in_batch=math.inf), ValueError, "num_items_in_batch must be a finite number"),
    (lambda: _loss(importance_sampling_ratio=torch.tensor([[1.0], [-0.5]])), ValueError,
     "importance_sampling_ratio holds a negative value at a token in the loss"),
    # selective_log_softmax
    (lambda: selective_log_softmax([1.0], torch.zeros((), dtype=torch.long)), TypeError, "logits must be a torch"),
    (lambda: selective_log_softmax(torch.ones(3, dtype=torch.long), torch.zeros((), dtype=torch.long)), TypeError,
     "logits must be a floating-point"),
    (lambda: selective_log_softmax(torch.tensor(1.0), torch.zeros((), dtype=torch.long)), ValueError,
     "logits must be \\[..., V\\]"),
    (lambda: selective_log_softmax(torch.randn(2, 5), torch.zeros(2)), TypeError, "ids must be an integer tensor"),
    (lambda: selective_log_softmax(torch.randn(2, 5), torch.zeros(2, dtype=torch.long, device=META)), ValueError,
     "ids is on meta"),
    (lambda: selective_log_softmax(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=math.inf),
     ValueError, "temperature must be a finite number"),
    (lambda: selective_log_softmax(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=True),
     ValueError, "temperature must be a positive number"),
    (lambda: selective_log_softmax(torch.randn(2, 5), torch.full((2,), 5)), ValueError,
     "ids holds token ids outside \\[0, 5\\) .*, e.g. the pad token$"),
    # fused_linear_grpo_loss and linear_logprobs
    (lambda: _linear(hidden=[[[1.0]]]), TypeError, "hidden must be a torch.Tensor"),
    (lambda: _linear(hidden=torch.ones(2, 3, 4, dtype=torch.long)), TypeError, "hidden must be a floating-point"),
    (lambda: _linear(weight=torch.randn(0, 4)), ValueError, "weight has shape \\(0, 4\\)"),
    (lambda: _linear(weight=torch.randn(11, 4, device=META)), ValueError, "weight is on meta"),
    (lambda: _linear(bias=torch.randn(11, dtype=torch.float64)), TypeError, "and bias is torch.float64"),
    (lambda: _linear(bias=torch.randn(11, device=META)), ValueError, "bias is on meta"),
    (lambda: _linear(config={"beta": 0.0}), TypeError, "config must be a GRPOLossConfig"),
    (lambda: _linear(ids=torch.zeros(2, 3)), TypeError, "completion_ids must be an integer tensor"),
    (lambda: _linear(completion_mask=torch.full((2, 3), 2)), ValueError, "completion_mask must hold only 0 and 1"),
    (lambda: _linear(logit_scale=math.nan), ValueError, "logit_scale must be a finite number"),
    (lambda: _linear(logit_scale=0.0), ValueError, "logit_scale must be > 0"),
    (lambda: _linear(linear_logprobs, logit_scale=-1.0), ValueError, "logit_scale must be > 0"),
    (lambda: _linear(ids=torch.zeros(2, 3, dtype=torch.uint32)), TypeError,
     "completion_ids must be an integer tensor \\(token ids\\) of int64, int32, int16, int8 or uint8"),
    (lambda: _linear(final_logit_softcapping=0.0), ValueError, "final_logit_softcapping must be > 0"),
    (lambda: _linear(grad_filter_eps=1.0), ValueError, "grad_filter_eps must be in \\[0, 1\\)"),
    (lambda: _linear(linear_logprobs, grad_filter_eps="high"), ValueError, "grad_filter_eps must be None, a float"),
    (lambda: _linear(grad_filter_eps=math.nan), ValueError, "grad_filter_eps must be a finite number"),
    (lambda: _linear(linear_logprobs, ids=torch.randint(0, 11, (2, 4))), ValueError, "ids has shape \\(2, 4\\)"),
    (lambda: _linear(linear_logprobs, ids=torch.zeros(2, 3)), TypeError, "ids must be an integer tensor"),
    (lambda: _linear(linear_logprobs, ids=torch.full((2, 3), 11)), ValueError,
     "ids holds token ids outside .*, and be masked out with mask$"),
    (lambda: _linear(linear_logprobs, mask=torch.ones(2, 4)), ValueError, "mask has shape"),
    (lambda: _linear(linear_logprobs, mask=torch.full((2, 3), 0.5)), ValueError, "mask must hold only 0 and 1"),
    (lambda: _linear(linear_logprobs, temperature=-1.0), ValueError, "temperature must be > 0"),
    # group_advantages
    (lambda: group_advantages([1.0, 2.0], 2), TypeError, "rewards must be a torch.Tensor"),
    (lambda: group_advantages(torch.randn(4), 2, reward_weights=[math.nan]), ValueError,
     "reward_weights must be finite"),
    (lambda: group_advantages(torch.randn(4), True), ValueError, "num_generations must be an int >= 2"),
    (lambda: group_advantages(torch.randn(4), 1), ValueError, "num_generations must be an int >= 2"),
    (lambda: group_advantages(torch.randn(4), 2, scale_rewards=[]), ValueError, "scale_rewards must be 'group'"),
    (lambda: group_advantages(torch.randn(4, 2), 2, reward_weights="ab"), TypeError, "reward_weights must be K"),
    (lambda: group_advantages(torch.randn(4, device=META), 2), ValueError, "rewards is on the meta device"),
    (lambda: _linear(hidden=torch.randn(2, 3, 4, device=META), weight=torch.randn(11, 4, device=META),
                     ids=torch.zeros(2, 3, dtype=torch.long, device=META), advantages=torch.randn(2, device=META)),
     ValueError, "hidden is on the meta device"),
    # GRPOLossConfig
    (lambda: GRPOLossConfig(vespo_k_pos=math.nan), ValueError, "vespo_k_pos must be a finite number"),
    (lambda: GRPOLossConfig(vespo_k_pos=-1.0), ValueError, "vespo_k_pos must be >= 0"),
    (lambda: GRPOLossConfig(vespo_lambda_neg=-0.5), ValueError, "vespo_lambda_neg must be >= 0"),
    (lambda: GRPOLossConfig(off_policy_mask_threshold=-1.0), ValueError, "off_policy_mask_threshold must be >= 0"),
    (lambda: GRPOLossConfig(delta=math.inf), ValueError, "delta must be a finite number"),
    (lambda: GRPOLossConfig(sapo_temperature_pos=-1.0), ValueError, "sapo_temperature_pos and"),
    (lambda: GRPOLossConfig(top_entropy_quantile=-0.1), ValueError, "top_entropy_quantile must lie in"),
    (lambda: GRPOLossConfig(max_completion_length=True), ValueError, "max_completion_length must be a positive int"),
    (lambda: GRPOLossConfig(use_bias_correction_kl="yes"), TypeError, "use_bias_correction_kl must be a bool"),
]  # fmt: skip


@pytest.mark.parametrize("call,error,match", ARGUMENT_ROWS)
def test_every_row_of_the_argument_table(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_nan_aware_min_and_max():
    """The clip metrics' minimum and maximum over rows skip rows without tokens (NaN) and are NaN when no row has
    any, with no boolean indexing (whose data-dependent size makes a GPU wait)."""
    import math

    from grpo_kernels.objective import _nan_reduce

    x = torch.tensor([0.5, math.nan, 0.25, 0.75])
    assert _nan_reduce(x, torch.amin).item() == 0.25 and _nan_reduce(x, torch.amax).item() == 0.75
    assert math.isnan(_nan_reduce(torch.full((3,), math.nan), torch.amin).item())
    assert math.isnan(_nan_reduce(torch.empty(0), torch.amax).item())
    assert _nan_reduce(torch.tensor([math.inf, math.nan]), torch.amin).item() == math.inf
