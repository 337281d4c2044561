"""Bad input to the loss and the config gets a clear error that names the argument."""

from __future__ import annotations

import pytest
import torch

from grpo_kernels import GRPOLossConfig, grpo_loss, selective_log_softmax


def good(**changes):
    B, T, V = 2, 3, 11
    args = {
        "logits": torch.randn(B, T, V),
        "completion_ids": torch.randint(0, V, (B, T)),
        "advantages": torch.randn(B),
        "completion_mask": torch.ones(B, T, dtype=torch.long),
    }
    args.update(changes)
    return args


def call(config=None, **changes):
    args = good(**changes)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("logits", "completion_ids", "advantages")}
    return grpo_loss(args["logits"], args["completion_ids"], args["advantages"], config=config or GRPOLossConfig(),
                     **kwargs)  # fmt: skip


@pytest.mark.parametrize(
    "changes,error,match",
    [
        ({"logits": torch.randn(2, 3)}, ValueError, "logits must be \\[B, T, V\\]"),
        ({"logits": torch.randint(0, 5, (2, 3, 11))}, TypeError, "logits must be a floating-point tensor"),
        ({"logits": [[1.0]]}, TypeError, "logits must be a torch.Tensor"),
        ({"completion_ids": torch.randint(0, 11, (2, 4))}, ValueError, "completion_ids has shape \\(2, 4\\)"),
        ({"completion_ids": torch.rand(2, 3)}, TypeError, "completion_ids must be an integer tensor"),
        ({"completion_ids": torch.full((2, 3), 11)}, ValueError, "completion_ids holds token ids outside \\[0, 11\\)"),
        ({"completion_ids": torch.full((2, 3), -100)}, ValueError, "completion_ids holds token ids outside"),
        ({"advantages": torch.randn(3)}, ValueError, "advantages has shape \\(3,\\)"),
        ({"advantages": torch.tensor([1.0, float("nan")])}, ValueError, "advantages must be finite"),
        ({"advantages": torch.ones(2, dtype=torch.long)}, TypeError, "advantages must be a floating-point"),
        ({"completion_mask": torch.ones(2, 4)}, ValueError, "completion_mask has shape"),
        ({"completion_mask": torch.full((2, 3), 2)}, ValueError, "completion_mask must hold only 0 and 1"),
        ({"old_logps": torch.randn(2, 4)}, ValueError, "old_logps has shape"),
        ({"importance_sampling_ratio": torch.rand(2)}, ValueError, "importance_sampling_ratio has shape"),
        ({"sampling_logps": torch.randn(3, 3)}, ValueError, "sampling_logps has shape"),
        ({"num_items_in_batch": -1}, ValueError, "num_items_in_batch must be a finite number >= 0"),
        ({"num_items_in_batch": "12"}, TypeError, "num_items_in_batch must be a number"),
        ({"advantages": torch.randn(2, device="meta")}, ValueError, "advantages is on meta"),
    ],
)
def test_bad_loss_input(changes, error, match):
    with pytest.raises(error, match=match):
        call(**changes)


def test_empty_batch_is_an_error_and_no_tokens_a_zero_loss():
    with pytest.raises(ValueError, match="the batch is empty"):
        grpo_loss(torch.randn(0, 3, 5), torch.zeros(0, 3, dtype=torch.long), torch.randn(0))
    logits = torch.randn(2, 0, 5, requires_grad=True)
    out = grpo_loss(logits, torch.zeros(2, 0, dtype=torch.long), torch.randn(2), config=GRPOLossConfig("grpo"))
    out.loss.backward()
    assert out.loss.item() == 0.0 and logits.grad.shape == (2, 0, 5)


def test_beta_needs_ref_logps():
    with pytest.raises(ValueError, match="ref_logps is required when beta != 0"):
        call(config=GRPOLossConfig(beta=0.1))


def test_config_is_not_a_dict():
    with pytest.raises(TypeError, match="config must be a GRPOLossConfig"):
        grpo_loss(torch.randn(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), torch.ones(1), config={"beta": 0.1})


@pytest.mark.parametrize(
    "options,match",
    [
        ({"loss_type": "ppo"}, "loss_type must be one of"),
        ({"importance_sampling_level": "batch"}, "importance_sampling_level"),
        ({"beta": -0.1}, "beta must be >= 0"),
        ({"epsilon": -0.2}, "epsilon must be >= 0"),
        ({"epsilon_high": -1.0}, "epsilon_high"),
        ({"delta": 0.0}, "delta must be > 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_entropy_quantile": 1.5}, "top_entropy_quantile must lie in"),
        ({"max_completion_length": 0}, "max_completion_length"),
        ({"loss_type": "dr_grpo", "max_completion_length": None}, "dr_grpo"),
        ({"sapo_temperature_neg": 0.0}, "sapo_temperature"),
        ({"entropy_coef": float("inf")}, "entropy_coef must be a finite number"),
        ({"off_policy_mask_threshold": "0.5"}, "off_policy_mask_threshold must be a finite number"),
    ],
)
def test_bad_config(options, match):
    with pytest.raises(ValueError, match=match):
        GRPOLossConfig(**options)


def test_config_from_trl_args():
    from trl import GRPOConfig

    args = GRPOConfig(
        output_dir="/tmp/unused", loss_type="cispo", epsilon_high=5.0, beta=0.01, top_entropy_quantile=0.2,
        max_completion_length=64, report_to=[], use_cpu=True, bf16=False,
    )  # fmt: skip
    config = GRPOLossConfig.from_trl(args)
    assert (config.loss_type, config.epsilon_high, config.beta) == ("cispo", 5.0, 0.01)
    assert config.top_entropy_quantile == 0.2
    assert config.max_completion_length == 64 and config.temperature == args.temperature


def test_selective_log_softmax_bad_input():
    with pytest.raises(ValueError, match="ids has shape"):
        selective_log_softmax(torch.randn(2, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="ids holds token ids outside"):
        selective_log_softmax(torch.randn(2, 5), torch.full((2,), 5))
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        selective_log_softmax(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=0)


def test_a_device_without_an_index_is_the_current_one(monkeypatch):
    """The devices "cuda" and "cuda:0" are one when device 0 is current, and another device is still told apart."""
    from grpo_kernels.validation import check_tensor, same_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert same_device(torch.device("cuda:0"), "cuda")
    assert not same_device(torch.device("cuda"), torch.device("cuda:1"))
    assert not same_device(torch.device("cuda"), torch.device("cpu"))
    assert same_device(torch.device("cpu"), "cpu")
    check_tensor("x", torch.zeros(2), kind="float", device=torch.device("cpu"))
    x = torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="x is on meta but the other inputs are on cpu"):
        check_tensor("x", x, kind="float", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="x is on the meta device, which holds no values"):  # on one device, still
        check_tensor("x", x, kind="float", device=torch.device("meta"))
