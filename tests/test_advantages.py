"""Group advantages: the Triton kernel against the reference, the reference against hand-worked values and TRL's
`nanstd`, and the input checks."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close
from trl.trainer.utils import nanstd as trl_nanstd

from grpo_kernels import backend, group_advantages, reference

SCALES = ["group", "batch", "none"]
AGGREGATIONS = ["sum_then_normalize", "normalize_then_sum"]


def rewards_with_nans(B, K, device, nan_fraction=0.2):
    r = torch.randn(B, K, device=device) * 2
    r[torch.rand(B, K, device=device) < nan_fraction] = math.nan
    r[0] = math.nan  # an unscorable completion
    return r


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("B,G,K", [(8, 4, 1), (12, 3, 3), (16, 16, 2), (6, 2, 5), (64, 8, 4)])
def test_matches_reference(impl, scale, aggregation, B, G, K, device):
    dev = device if impl == "triton" else "cpu"
    rewards = rewards_with_nans(B, K, dev)
    weights = torch.rand(K, device=dev) + 0.5
    with backend(impl):
        got = group_advantages(
            rewards, G, scale_rewards=scale, reward_weights=weights, multi_objective_aggregation=aggregation
        )
    expected = reference.group_advantages(rewards.double(), G, scale, weights.double(), aggregation)
    assert got.shape == (B,) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert_close(got, expected, atol=1e-5, rtol=1e-5, name="advantages")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_one_dimensional_rewards_and_large_batch(impl, device):
    dev = device if impl == "triton" else "cpu"
    rewards = torch.randn(4096 * 2 + 16, device=dev)
    with backend(impl):
        got = group_advantages(rewards, 16, scale_rewards="batch")
    expected = reference.group_advantages(rewards.double(), 16, "batch")
    assert_close(got, expected, atol=1e-5, rtol=1e-5, name="advantages")


def test_hand_worked_group():
    """Rewards 1, 2, 3, 6 in one group: mean 3, Bessel std sqrt(14/3) = 2.1602."""
    got = reference.group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64), 4)
    std = math.sqrt(14 / 3)
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0], dtype=torch.float64) / (std + 1e-4)
    assert_close(got, expected, atol=1e-12, rtol=1e-12, name="advantages")


def test_equal_rewards_give_zero_and_unscorable_gives_zero():
    rewards = torch.tensor([[1.0], [1.0], [1.0], [math.nan], [5.0], [7.0]])
    got = reference.group_advantages(rewards, 3)
    assert got[:3].tolist() == [0.0, 0.0, 0.0]  # std 0: (r - mean) / 1e-4 = 0
    assert got[3] == 0.0  # unscorable
    assert got[4] < 0 < got[5]  # the NaN is left out of its group's mean and std


def test_reference_nanstd_is_trls():
    """fp32, as TRL computes rewards (its Bessel factor `count / (count - 1)` is an fp32 division)."""
    x = torch.randn(5, 7)
    x[x > 1] = math.nan
    for dim in (None, 0, 1):
        ours = reference.nanstd(x) if dim is None else reference.nanstd(x, dim=dim)
        theirs = trl_nanstd(x) if dim is None else trl_nanstd(x, dim=dim)
        assert_close(ours, theirs, atol=1e-7, rtol=1e-6, name=f"nanstd dim={dim}")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: group_advantages(torch.randn(6), 4), "not a multiple of num_generations"),
        (lambda: group_advantages(torch.randn(0, 2), 2), "empty"),
        (lambda: group_advantages(torch.randn(4), 0), "num_generations"),
        (lambda: group_advantages(torch.randn(4), 2, scale_rewards="std"), "scale_rewards"),
        (lambda: group_advantages(torch.randn(4), 2, multi_objective_aggregation="max"), "multi_objective"),
        (lambda: group_advantages(torch.randn(4, 3), 2, reward_weights=[1.0, 2.0]), "reward_weights"),
        (lambda: group_advantages(torch.tensor([1.0, math.inf]), 2), "rewards must be finite"),
        (lambda: group_advantages(torch.randn(2, 2, 2), 2), "rewards must be"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_integer_rewards_rejected():
    with pytest.raises(TypeError, match="rewards must be a floating-point tensor"):
        group_advantages(torch.ones(4, dtype=torch.long), 2)
