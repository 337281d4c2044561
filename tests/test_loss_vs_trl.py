"""The loss against TRL 1.16's `_compute_loss`, over every combination of options.

Both the readable reference (`grpo_kernels.reference`) and the production objective (`grpo_kernels.objective`, the
code every fast path runs) must give TRL's loss, TRL's gradients with respect to the per-token log-probs and
entropies, and TRL's metrics. Inputs are fp64, so any difference beyond summation order is a semantic one.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import assert_close

from grpo_kernels import GRPOLossConfig, reference
from grpo_kernels.config import LOSS_TYPES
from grpo_kernels.integrations.trl_reference import TRLLoss
from grpo_kernels.objective import LossInputs, grpo_objective

DT = torch.float64


def make_batch(B: int = 6, T: int = 9, adv_per_token: bool = False, is_shape: str = "token"):
    """Random inputs with ratios on both sides of the clip range, both advantage signs and a zero advantage,
    uneven lengths and one fully masked row."""
    logps = -torch.rand(B, T, dtype=DT) * 4 - 0.05
    lengths = torch.randint(1, T + 1, (B,))
    lengths[1] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(DT)
    adv = torch.randn(B, T, dtype=DT) if adv_per_token else torch.randn(B, dtype=DT)
    adv[0] = 0.0
    batch = {
        "logps": logps,
        "entropy": torch.rand(B, T, dtype=DT) * 3,
        "completion_ids": torch.randint(0, 50, (B, T)),
        "advantages": adv,
        "mask": mask,
        "old_logps": logps + torch.randn(B, T, dtype=DT) * 0.3,
        "ref_logps": logps + torch.randn(B, T, dtype=DT) * 0.5,
        "sampling_logps": logps + torch.randn(B, T, dtype=DT) * 0.4,
        "importance_sampling_ratio": torch.rand(B, T if is_shape == "token" else 1, dtype=DT) * 1.5 + 0.25,
    }
    return batch


def run_all(config: GRPOLossConfig, batch: dict, *, use_is: bool, use_old: bool, use_sampling: bool, num_items=None):
    """(loss, grads, metrics) from TRL, the reference and the objective on the same leaves."""
    optional = {
        "old_logps": batch["old_logps"] if use_old else None,
        "ref_logps": batch["ref_logps"] if config.beta != 0 else None,
        "importance_sampling_ratio": batch["importance_sampling_ratio"] if use_is else None,
        "sampling_logps": batch["sampling_logps"] if use_sampling else None,
    }
    results = {}
    for name in ("trl", "reference", "objective"):
        logps = batch["logps"].clone().requires_grad_()
        entropy = batch["entropy"].clone().requires_grad_()
        if name == "trl":
            loss, metrics = TRLLoss(config, use_vllm=use_is)(
                logps, entropy, batch["completion_ids"], batch["advantages"], batch["mask"],
                num_items_in_batch=num_items, **optional,
            )  # fmt: skip
        elif name == "reference":
            loss, metrics = reference.grpo_loss_from_logps(
                logps, entropy, batch["advantages"], batch["mask"], config=config,
                num_items_in_batch=num_items, **optional,
            )  # fmt: skip
        else:
            adv = batch["advantages"]
            inputs = LossInputs(advantages=adv.unsqueeze(1) if adv.dim() == 1 else adv, mask=batch["mask"].bool())
            for k, v in optional.items():
                setattr(inputs, k, v)
            loss, metrics = grpo_objective(logps, entropy, inputs, config, num_items)
        metrics = {k: float(v) for k, v in metrics.items()}
        grads = torch.autograd.grad(loss, (logps, entropy), allow_unused=True)
        grads = tuple(torch.zeros_like(batch["logps"]) if g is None else g for g in grads)
        results[name] = (loss.detach(), grads, metrics)
    return results


def assert_match(results: dict) -> None:
    loss, (g_logp, g_ent), metrics = results["trl"]
    for name in ("reference", "objective"):
        l2, (g2_logp, g2_ent), m2 = results[name]
        assert_close(l2, loss, atol=1e-12, rtol=1e-9, name=f"{name} loss")
        assert_close(g2_logp, g_logp, atol=1e-12, rtol=1e-9, name=f"{name} d loss / d logps")
        assert_close(g2_ent, g_ent, atol=1e-12, rtol=1e-9, name=f"{name} d loss / d entropy")
        # TRL logs metrics through float32 counts (`torch.tensor(float(B))`), so they carry fp32 precision
        compared = {k: v for k, v in metrics.items() if k != "entropy_coef"}
        assert set(m2) == set(compared), f"{name} metrics {sorted(m2)} != TRL's {sorted(compared)}"
        for k, v in compared.items():
            same = (math.isnan(v) and math.isnan(m2[k])) or math.isclose(m2[k], v, rel_tol=2e-7, abs_tol=1e-12)
            assert same, f"{name} metric {k}: {m2[k]} != TRL's {v}"


GRID = [
    combo
    for combo in itertools.product(
        LOSS_TYPES,
        ("token", "sequence"),  # importance_sampling_level
        (None, 1.4),  # delta
        (True, False),  # use_bias_correction_kl
        (0.0, 0.04),  # beta
        (False, True),  # importance-sampling weight
        (1.0, 0.4),  # top_entropy_quantile
        (None, 0.05),  # off_policy_mask_threshold
    )
    # delta acts on the clipped losses only, the KL correction only when there is a KL term
    if not (combo[2] is not None and combo[0] not in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"))
    and not (combo[3] is False and combo[4] == 0.0)
]


@pytest.mark.parametrize("loss_type,level,delta,bias_kl,beta,use_is,top_q,off_policy", GRID)
def test_every_option_combination_matches_trl(loss_type, level, delta, bias_kl, beta, use_is, top_q, off_policy):
    config = GRPOLossConfig(
        loss_type=loss_type, importance_sampling_level=level, delta=delta, use_bias_correction_kl=bias_kl, beta=beta,
        top_entropy_quantile=top_q, off_policy_mask_threshold=off_policy, epsilon_high=0.28, max_completion_length=9,
    )  # fmt: skip
    batch = make_batch()
    assert_match(run_all(config, batch, use_is=use_is, use_old=True, use_sampling=off_policy is not None))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("delta", [0.5, 1.1, 1.25])
def test_delta_inside_the_clip_range_matches_trl(loss_type, level, delta):
    """TRL caps the ratio at delta in place before it counts the clipped tokens, so with delta < 1 + epsilon_high
    the clip-ratio metrics count the capped ratio (below 1 - epsilon with delta = 0.5: every token is low)."""
    config = GRPOLossConfig(loss_type=loss_type, importance_sampling_level=level, delta=delta, epsilon_high=0.28,
                            beta=0.04, max_completion_length=9)  # fmt: skip
    batch = make_batch()
    assert_match(run_all(config, batch, use_is=False, use_old=True, use_sampling=False))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("adv_per_token", [False, True])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_on_policy_defaults_match_trl(loss_type, adv_per_token, entropy_coef):
    """No old log-probs (the on-policy case), [B] and [B, T] advantages, the entropy bonus, TRL's other defaults."""
    config = GRPOLossConfig(loss_type=loss_type, entropy_coef=entropy_coef, beta=0.02, max_completion_length=9)
    batch = make_batch(adv_per_token=adv_per_token)
    assert_match(run_all(config, batch, use_is=False, use_old=False, use_sampling=False))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_entropy_bonus_with_entropy_mask_and_sequence_weights_match_trl(loss_type):
    config = GRPOLossConfig(
        loss_type=loss_type, entropy_coef=0.05, top_entropy_quantile=0.3, importance_sampling_level="sequence",
        off_policy_mask_threshold=0.1, beta=0.1, max_completion_length=12,
    )  # fmt: skip
    batch = make_batch(B=5, T=12, is_shape="sequence")
    assert_match(run_all(config, batch, use_is=True, use_old=True, use_sampling=False))


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
@pytest.mark.parametrize("num_items", [1, 37.0, 1000])
def test_num_items_in_batch_normaliser_matches_trl(loss_type, num_items):
    config = GRPOLossConfig(loss_type=loss_type)
    batch = make_batch()
    assert_match(run_all(config, batch, use_is=False, use_old=True, use_sampling=False, num_items=num_items))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fully_masked_batch_matches_trl(loss_type):
    config = GRPOLossConfig(loss_type=loss_type, beta=0.1, top_entropy_quantile=0.5, entropy_coef=0.1)
    batch = make_batch()
    batch["mask"] = torch.zeros_like(batch["mask"])
    assert_match(run_all(config, batch, use_is=False, use_old=True, use_sampling=False))


def test_hand_worked_grpo_value():
    """Two tokens, one sequence, numbers small enough to check by hand.

    ratio = exp(logp - old) = e^0.5 = 1.6487 at t0 and e^-0.5 = 0.6065 at t1; A = 1, epsilon = 0.2:
    t0: min(1.6487, 1.2) = 1.2; t1: min(0.6065, 0.8) = 0.6065 -> per-token -1.2 and -0.6065, mean -0.90327.
    """
    logps = torch.tensor([[-1.0, -2.0]], dtype=DT)
    old = torch.tensor([[-1.5, -1.5]], dtype=DT)
    loss, metrics = reference.grpo_loss_from_logps(
        logps, torch.zeros_like(logps), torch.tensor([1.0], dtype=DT), config=GRPOLossConfig(loss_type="grpo"),
        old_logps=old,
    )  # fmt: skip
    assert math.isclose(loss.item(), -(1.2 + math.exp(-0.5)) / 2, rel_tol=1e-12)
    assert metrics["clip_ratio/high_mean"].item() == 0.5  # t0 clipped above with A > 0
    assert metrics["clip_ratio/low_mean"].item() == 0.0  # t1 is below 1 - eps but A > 0: not counted


def test_hand_worked_kl_value():
    """k3 KL with ref - logp = 1: e - 1 - 1 = 0.71828; bias-corrected on-policy (ratio 1) it is unchanged."""
    logps = torch.tensor([[-2.0]], dtype=DT)
    config = GRPOLossConfig(loss_type="bnpo", beta=1.0)
    _, metrics = reference.grpo_loss_from_logps(
        logps, torch.zeros_like(logps), torch.tensor([0.0], dtype=DT), config=config, ref_logps=logps + 1
    )
    assert math.isclose(metrics["kl"].item(), math.e - 2, rel_tol=1e-12)


def test_objective_ignores_garbage_on_masked_tokens():
    """A padding token with an infinite reference log-prob must not turn the loss into NaN."""
    config = GRPOLossConfig(loss_type="grpo", beta=0.1, importance_sampling_level="sequence")
    batch = make_batch()
    clean = run_all(config, batch, use_is=False, use_old=True, use_sampling=False)["objective"]
    padded = batch["mask"] == 0
    assert padded.any()
    batch["ref_logps"] = batch["ref_logps"].masked_fill(padded, math.inf)
    batch["old_logps"] = batch["old_logps"].masked_fill(padded, -math.inf)
    dirty = run_all(config, batch, use_is=False, use_old=True, use_sampling=False)["objective"]
    assert_close(dirty[0], clean[0], atol=0, rtol=0, name="loss")
    assert_close(dirty[1][0], clean[1][0], atol=0, rtol=0, name="grad")


@pytest.mark.parametrize("top_q", [0.0, 0.25, 0.5, 0.8])
def test_entropy_mask_ties_at_the_threshold_match_trl(top_q):
    """Entropies on a coarse grid put tokens exactly on the quantile: TRL keeps them (>=)."""
    config = GRPOLossConfig(loss_type="bnpo", top_entropy_quantile=top_q, entropy_coef=0.1)
    batch = make_batch()
    batch["entropy"] = torch.randint(0, 4, batch["entropy"].shape).to(DT) / 2
    assert_match(run_all(config, batch, use_is=False, use_old=True, use_sampling=False))
