"""Options and outputs of the GRPO loss.

`GRPOLossConfig` carries every loss option of TRL 1.16's `GRPOConfig`, under TRL's names and with TRL's defaults, so
that a TRL config maps onto it field by field (`GRPOLossConfig.from_trl(args)`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
# Loss types whose per-token term is the PPO-style clipped surrogate.
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _check_finite(name: str, value: float) -> None:
    # a comparison rather than math.isfinite: torch.compile with dynamic shapes traces floats as symbols, which
    # compare, but which math.isfinite cannot read without a graph break
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be a finite number, got {value!r}")


# The kernels multiply the logits by 1 / temperature in fp32, which must stay finite.
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


def _check_temperature(value: float) -> None:
    if value <= 0:
        raise ValueError(f"temperature must be > 0; got {value}")
    if value < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE:.3g} so that 1 / temperature is finite in fp32; got {value}"
        )


@dataclass(frozen=True)
class GRPOLossConfig:
    """Every option of the GRPO loss, with TRL 1.16's names and defaults.

    Args:
        loss_type: one of grpo, bnpo, dr_grpo, dapo (default), luspo, cispo, sapo, vespo.
        beta: weight of the k3 KL penalty to the reference policy; 0 needs no reference log-probs.
        epsilon: lower clipping range, `r >= 1 - epsilon`.
        epsilon_high: upper clipping range `r <= 1 + epsilon_high` (defaults to `epsilon`); for cispo the cap on `r`.
        delta: optional upper cap on the unclipped ratio (two-sided clipping, INTELLECT-2).
        importance_sampling_level: "token" ratios, or "sequence" (GSPO: one ratio per completion).
        temperature: the logits are divided by it before the softmax.
        use_bias_correction_kl: multiply the KL term by the (differentiable) importance ratio.
        max_completion_length: the constant normaliser of dr_grpo.
        sapo_temperature_pos / sapo_temperature_neg: SAPO gate temperatures for A > 0 / A <= 0.
        vespo_k_pos / vespo_lambda_pos / vespo_k_neg / vespo_lambda_neg: VESPO gamma-weight shape for A >= 0 / A < 0.
        top_entropy_quantile: keep only the top fraction of tokens by entropy in the policy term (1.0 keeps all).
        off_policy_mask_threshold: drop negative-advantage sequences whose mean KL to the sampler exceeds it.
        entropy_coef: weight of the entropy bonus, `loss -= entropy_coef * mean entropy`.
    """

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    temperature: float = 1.0
    use_bias_correction_kl: bool = True
    max_completion_length: int | None = 512
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be 'token' or 'sequence'; got {self.importance_sampling_level!r}"
            )
        for name in ("beta", "epsilon", "temperature", "entropy_coef", "sapo_temperature_pos", "sapo_temperature_neg"):
            _check_finite(name, getattr(self, name))
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "top_entropy_quantile"):
            _check_finite(name, getattr(self, name))
        for name in ("epsilon_high", "delta", "off_policy_mask_threshold"):
            if getattr(self, name) is not None:
                _check_finite(name, getattr(self, name))
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0 (0 disables the KL term); got {self.beta}")
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0; got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError(f"epsilon_high must be >= 0 or None; got {self.epsilon_high}")
        if self.delta is not None and self.delta <= 0:
            raise ValueError(f"delta must be > 0 or None (recommended > 1 + epsilon_high); got {self.delta}")
        _check_temperature(self.temperature)
        if self.sapo_temperature_pos <= 0 or self.sapo_temperature_neg <= 0:
            raise ValueError(
                "sapo_temperature_pos and sapo_temperature_neg must be > 0; got "
                f"{self.sapo_temperature_pos} and {self.sapo_temperature_neg}"
            )
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            if getattr(self, name) < 0:  # a negative power or decay rate turns VESPO's down-weighting into a blow-up
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ValueError(
                "off_policy_mask_threshold must be >= 0 or None (a KL divergence, which is never negative); got "
                f"{self.off_policy_mask_threshold}"
            )
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must lie in [0, 1]; got {self.top_entropy_quantile}")
        if self.max_completion_length is not None and (
            isinstance(self.max_completion_length, bool)
            or not isinstance(self.max_completion_length, int)
            or self.max_completion_length < 1
        ):
            raise ValueError(
                f"max_completion_length must be a positive int or None; got {self.max_completion_length!r}"
            )
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' normalises by max_completion_length, which must then be set")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError(f"use_bias_correction_kl must be a bool; got {self.use_bias_correction_kl!r}")
        # the fields as JSON (the compiled custom ops' argument; `library.encode`), formed once, outside any trace
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        object.__setattr__(self, "encoded", json.dumps(values, sort_keys=True))

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_high_value(self) -> float:
        """The upper clipping range actually used: `epsilon_high`, or `epsilon` when unset (as TRL does)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def uses_clipping(self) -> bool:
        return self.loss_type in CLIPPED_LOSS_TYPES

    @classmethod
    def from_trl(cls, args) -> GRPOLossConfig:
        """Build the loss options from a `trl.GRPOConfig` (or any object with the same attribute names)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


@dataclass(frozen=True)
class HeadOptions:
    """How the LM head turns `hidden @ weight.T + bias` into the logits the softmax sees:
    `final_logit_softcapping * tanh(logit_scale * x / final_logit_softcapping) / temperature` (the soft-cap only when
    set, as Gemma does; `logit_scale` as Cohere, Granite and others do). `head_options_from_config` reads the first two
    from a transformers config.

    `grad_filter_eps` turns on gradient filtering in the backward (approximate; None, the default, is exact): a
    vocabulary column of a chunk (or a tile, in the fused kernels) is left out of the weight products when each of its
    entries of the logits' gradient is at most `grad_filter_eps * logit_scale / temperature * (|dL/dlogp| +
    |dL/dentropy|)` of its token. Without the entropy bonus that is the columns where every token's softmax
    probability is at most `grad_filter_eps`, as Cut Cross-Entropy filters. The chunked schedules keep every column of
    a chunk where some token would lose more than 64 thresholds in all (a flat softmax, whose many small entries add
    up); the fused kernels apply the per-entry rule alone."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    final_logit_softcapping: float | None = None
    grad_filter_eps: float | None = None

    def __post_init__(self) -> None:
        _check_finite("temperature", self.temperature)
        _check_finite("logit_scale", self.logit_scale)
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0 (it multiplies the logits); got {self.logit_scale}")
        _check_temperature(self.temperature)
        if self.grad_filter_eps is not None:
            _check_finite("grad_filter_eps", self.grad_filter_eps)
            if not 0 <= self.grad_filter_eps < 1:
                raise ValueError(f"grad_filter_eps must be in [0, 1) or None; got {self.grad_filter_eps}")
        if self.final_logit_softcapping is not None:
            _check_finite("final_logit_softcapping", self.final_logit_softcapping)
            if self.final_logit_softcapping <= 0:
                raise ValueError(f"final_logit_softcapping must be > 0 or None; got {self.final_logit_softcapping}")


def resolve_grad_filter_eps(value: float | str | None, dtype: torch.dtype) -> float | None:
    """`grad_filter_eps` as a number: None (no filtering), a float in [0, 1), or "auto": the resolution of `dtype`
    below one, `finfo(dtype).eps / 32` (2**-12 for bf16, 2**-15 for fp16, about 4e-9 for fp32)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f'grad_filter_eps must be None, a float in [0, 1) or "auto"; got {value!r}')
        return torch.finfo(dtype).eps / 32
    _check_finite("grad_filter_eps", value)
    return float(value)


@dataclass
class GRPOLossOutput:
    """What one call of the GRPO loss returns.

    Attributes:
        loss: scalar, differentiable.
        logps: `[B, T]` fp32 per-token log-probabilities of the completion tokens (detached; 0 where masked out).
        entropy: `[B, T]` fp32 per-token entropies (detached; 0 where masked out).
        metrics: detached scalars with TRL's names: `kl` (when beta != 0), `entropy`, `clip_ratio/low_mean`,
            `clip_ratio/low_min`, `clip_ratio/high_mean`, `clip_ratio/high_max`, `clip_ratio/region_mean`
            (clipped loss types), `cispo_clip_ratio` (cispo), `vespo/phi_seq_mean` (vespo), `policy_loss`
            (when the entropy bonus is on).
    """

    loss: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
