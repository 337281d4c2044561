"""The GRPO objective on per-token log-probs and entropies, arranged so that it can run a few rows at a time.

The loss is a weighted sum of per-token terms. Every weight depends only on the mask and the batch (the per-sequence
lengths, the token count, `num_items_in_batch`, and the entropy threshold of `top_entropy_quantile`), so `LossPlan`
fixes them once for the batch and `row_terms` turns any set of whole rows into their share of the loss and of the
metrics. The result equals `reference.grpo_loss_from_logps`; the difference is only that a fused op can feed it one
chunk of rows at a time and form that chunk's gradients straight away.

Masked-out tokens contribute exactly zero, whatever the log-probs given for them (TRL multiplies by the mask, so an
infinite KL on a padding token poisons its loss with NaN; here it does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from grpo_kernels.config import GRPOLossConfig
from grpo_kernels.reference import vespo_weights


@dataclass
class LossInputs:
    """The per-row inputs besides the log-probs, shaped `[B, T]` (advantages `[B, 1]` or `[B, T]`)."""

    advantages: torch.Tensor
    mask: torch.Tensor  # bool
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    importance_sampling_ratio: torch.Tensor | None = None  # [B, T] or [B, 1]
    sampling_logps: torch.Tensor | None = None
    lengths: torch.Tensor | None = None  # [B, 1] per-row token counts, when `mask` covers only part of each row

    def rows(self, sl: slice) -> LossInputs:
        return LossInputs(*(None if t is None else t[sl] for t in self.__dict__.values()))

    def requires_grad(self) -> bool:
        """Whether any of the inputs requires grad (the loss is differentiable in the floating-point ones)."""
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in self.__dict__.values())


def device_value(x: torch.Tensor | float, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`x` (a number or a tensor) as a `dtype` tensor on `device`, without waiting for the device: a number is filled in
    there (`torch.tensor(x, device=...)` copies it from the host, and on CUDA a copy from the host waits for every
    queued kernel), a tensor elsewhere is copied without blocking."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype, non_blocking=True)
    return torch.full((), float(x), dtype=dtype, device=device)


@dataclass
class LossPlan:
    """Batch-level constants of the loss: the weights that turn per-token terms into the loss."""

    num_rows: int
    token_count: torch.Tensor  # sum of the mask, fp32 scalar
    policy_norm: torch.Tensor | None  # divides sum(m * l) for the token-level losses; None for per-row ones
    entropy_threshold: torch.Tensor | None  # top_entropy_quantile's threshold (None: keep every token)
    entropy_norm: torch.Tensor | None  # max(sum of the effective mask, 1) when the entropy bonus is on

    @staticmethod
    def build(
        mask: torch.Tensor,  # [B, T] bool
        config: GRPOLossConfig,
        entropy: torch.Tensor | None = None,  # [B, T], needed only when top_entropy_quantile < 1
        num_items_in_batch: torch.Tensor | float | None = None,
    ) -> LossPlan:
        cfg = config
        token_count = mask.sum().float()
        policy_norm = None
        if cfg.loss_type == "bnpo":
            policy_norm = token_count.clamp(min=1.0)
        elif cfg.loss_type == "dr_grpo":
            policy_norm = device_value(mask.shape[0] * cfg.max_completion_length, mask.device)
        elif cfg.loss_type in ("dapo", "cispo", "vespo"):
            n = token_count if num_items_in_batch is None else device_value(num_items_in_batch, mask.device)
            policy_norm = n.clamp(min=1.0)

        threshold = None
        effective_count = token_count
        if cfg.top_entropy_quantile < 1.0:
            if entropy is None:
                raise ValueError("top_entropy_quantile < 1 needs the entropies of the whole batch to build the plan")
            threshold = entropy_threshold(entropy, mask, 1.0 - cfg.top_entropy_quantile)
            effective_count = (mask & (entropy.detach() >= threshold)).sum().float()
        entropy_norm = effective_count.clamp(min=1.0) if cfg.entropy_coef != 0.0 else None
        return LossPlan(mask.shape[0], token_count, policy_norm, threshold, entropy_norm)


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """The `q` quantile (linear interpolation, as `torch.quantile`) of the active entropies; +inf if none is active.
    Without reading the device where it can: the inactive entries become NaN, which `torch.nanquantile` leaves out
    (gathering the active ones would wait for the device to count them)."""
    if 0 < mask.numel() <= 1 << 24:
        t = torch.nanquantile(torch.where(mask, entropy.detach().float(), math.nan).reshape(-1), q)
        return torch.where(torch.isnan(t), math.inf, t)
    active = entropy.detach()[mask].float()
    if active.numel() == 0:
        return torch.full((), math.inf, device=entropy.device)
    if active.numel() <= 1 << 24:
        return torch.quantile(active, q)
    # torch.quantile refuses more than 2**24 values; the same interpolation from a sort
    s = active.sort().values
    pos = q * (s.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, s.numel() - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _batch_metrics(
    values: dict[str, torch.Tensor],  # [rows, T], or [rows, 1] for a value per sequence
    extremes: tuple[torch.Tensor, torch.Tensor] | None,  # (low, high): the minimum over rows of low's row means, the
    # maximum of high's
    active: torch.Tensor,  # [rows, T] bool
    plan: LossPlan,
) -> dict[str, torch.Tensor]:
    """TRL's metrics of the whole batch: each value averaged over the batch's active tokens, or over its sequences
    when it is `[rows, 1]` (sequence-level ratios), and the NaN-aware extremes of row means (an empty row's is NaN and
    skipped). The values of each kind are stacked and reduced together, so the metrics take a few ops, not a few per
    metric."""
    out = {}
    groups: dict[tuple[bool, torch.dtype], list[str]] = {}  # stacked apart by kind and by dtype, which each keeps
    for k, v in values.items():
        groups.setdefault((v.shape[1] == 1, v.dtype), []).append(k)
    for (per_row, _), names in groups.items():
        x = torch.stack([values[k] for k in names])
        if per_row:
            sums = x.sum((1, 2)) / plan.num_rows
        else:
            sums = torch.where(active, x, 0).sum((1, 2)) / plan.token_count.clamp(min=1.0)
        out.update(zip(names, sums.unbind(0), strict=True))
    if extremes is not None:
        low, high = extremes
        x = torch.stack(torch.broadcast_tensors(low, -high))  # [2, rows, T or 1]: one NaN-aware minimum for both
        rows = x.squeeze(2) if x.shape[2] == 1 else torch.where(active, x, 0).sum(-1) / active.sum(-1)
        lowest, highest = _nan_reduce(rows, torch.amin).unbind(0)
        out["clip_ratio/low_min"], out["clip_ratio/high_max"] = lowest, 0.0 - highest  # +0, not -0, for no clipping
    return out


def row_terms(
    logps: torch.Tensor,  # [rows, T] fp32, differentiable
    entropy: torch.Tensor | None,  # [rows, T] fp32, differentiable when the entropy bonus is on
    inputs: LossInputs,  # the same rows
    config: GRPOLossConfig,
    plan: LossPlan,
    metrics: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """These rows' share of the loss (a scalar to sum over chunks) and, when they are the whole batch, its metrics
    (`metrics=False`: none, for a share of the batch)."""
    cfg = config
    active = inputs.mask
    mask = active.to(logps.dtype)
    adv = inputs.advantages.to(logps.dtype)
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    eps_low, eps_high = cfg.epsilon_low, cfg.epsilon_high_value

    old = logps.detach() if inputs.old_logps is None else inputs.old_logps
    log_ratio = torch.where(active, logps - old, zero)
    lengths = mask.sum(-1, keepdim=True) if inputs.lengths is None else inputs.lengths.to(logps.dtype)
    if cfg.importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = log_ratio.sum(-1, keepdim=True) / lengths.clamp(min=1.0)
    ratio = torch.exp(log_w)

    if cfg.loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=eps_high).detach() * adv * logps
    elif cfg.uses_clipping:
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        unclipped = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
        per_token = -torch.min(unclipped * adv, clipped * adv)
    elif cfg.loss_type == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg).to(logps.dtype)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * adv
    else:  # vespo
        phi = vespo_weights(adv, log_ratio, mask, inputs.importance_sampling_ratio, cfg)
        per_token = -phi * adv * logps

    if cfg.off_policy_mask_threshold is not None:
        sampler = old if inputs.sampling_logps is None else inputs.sampling_logps
        kl_sampler = torch.where(active, torch.nan_to_num(sampler - logps.detach(), nan=0.0), zero)
        mean_kl = kl_sampler.sum(-1, keepdim=True) / lengths.clamp(min=1.0)
        per_token = per_token * ((adv >= 0) | (mean_kl <= cfg.off_policy_mask_threshold)).to(logps.dtype)
    effective = active
    if plan.entropy_threshold is not None:
        effective = active & (entropy.detach() >= plan.entropy_threshold)
        per_token = per_token * effective.to(logps.dtype)
    if inputs.importance_sampling_ratio is not None and cfg.loss_type != "vespo":
        per_token = per_token * inputs.importance_sampling_ratio
    kl = None
    if cfg.beta != 0.0:
        d = torch.where(active, inputs.ref_logps - logps, zero)
        kl = torch.exp(d) - d - 1
        if cfg.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + cfg.beta * kl
    per_token = torch.where(active, per_token, zero)

    if plan.policy_norm is not None:
        loss = per_token.sum() / plan.policy_norm
    elif cfg.loss_type == "luspo":
        loss = per_token.sum() / plan.num_rows
    else:  # grpo, sapo: mean over sequences of the per-sequence mean
        loss = (per_token.sum(-1) / lengths.squeeze(-1).clamp(min=1.0)).sum() / plan.num_rows
    policy_loss = None
    if plan.entropy_norm is not None:
        policy_loss = loss.detach()
        loss = loss - cfg.entropy_coef * torch.where(effective, entropy, zero).sum() / plan.entropy_norm

    if not metrics:
        return loss, {}
    with torch.no_grad():
        dtype = logps.dtype
        values = {} if kl is None else {"kl": kl}
        if entropy is not None:
            values["entropy"] = entropy.to(dtype)
        extremes = None
        if cfg.uses_clipping:
            # of the ratio after delta's cap, as TRL counts them (which caps it in place before its metrics)
            low = ((unclipped < 1 - eps_low) & (adv < 0)).to(dtype)
            high = ((unclipped > 1 + eps_high) & (adv > 0)).to(dtype)
            values.update({"clip_ratio/low_mean": low, "clip_ratio/high_mean": high,
                           "clip_ratio/region_mean": torch.maximum(low, high)})  # fmt: skip
            extremes = (low, high)
        elif cfg.loss_type == "cispo":
            values["cispo_clip_ratio"] = ((ratio > eps_high) & (adv > 0)).to(dtype)
        elif cfg.loss_type == "vespo":
            values["vespo/phi_seq_mean"] = phi
        out = _batch_metrics(values, extremes, active, plan)
        if policy_loss is not None:
            out["policy_loss"] = policy_loss
    return loss, out


def token_local(config: GRPOLossConfig) -> bool:
    """True when each token's term of the loss depends on its own log-prob alone, with weights the mask fixes: token-
    level ratios, no off-policy mask, no VESPO weights, no entropy quantile. `TokenGrads` then differentiates it."""
    return (
        config.importance_sampling_level == "token"
        and config.off_policy_mask_threshold is None
        and config.loss_type != "vespo"
        and config.top_entropy_quantile == 1.0
    )


@dataclass
class TokenGrads:
    """`dL/dlogp` and `dL/dentropy` of a `token_local` loss, token by token, by the closed-form derivative of
    `row_terms` (what autograd through it gives, without a graph: a fused op asks for them a chunk at a time).

    The per-token inputs are flattened once, in the order of the tokens the caller visits (`positions`: flat indices
    `b * T + t` of the active tokens; None: every token of `[B, T]`). On-policy (no `old_logps`) every ratio is 1, so
    the policy term's gradient does not depend on the log-probs: it is formed once, for all tokens.
    """

    config: GRPOLossConfig
    advantages: torch.Tensor  # [N]
    old_logps: torch.Tensor | None  # [N]
    ref_logps: torch.Tensor | None  # [N]
    importance_sampling_ratio: torch.Tensor | None  # [N]
    weight: torch.Tensor  # [N] or a scalar: d loss / d (a token's term)
    entropy_grad: torch.Tensor | None  # [N]
    on_policy_grad: torch.Tensor | None = None  # [N]: the policy term's weighted gradient when every ratio is 1

    @staticmethod
    def build(inputs: LossInputs, config: GRPOLossConfig, plan: LossPlan, positions: torch.Tensor | None,
              dtype: torch.dtype) -> TokenGrads:  # fmt: skip
        if not token_local(config):
            raise ValueError(f"TokenGrads needs a token-local loss (see token_local); got {config}")
        B, T = inputs.mask.shape
        n = B * T if positions is None else positions.numel()

        def flat(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            x = x.to(dtype).expand(B, T).reshape(-1)
            return x if positions is None else x.index_select(0, positions)

        lengths = inputs.mask.sum(-1, keepdim=True) if inputs.lengths is None else inputs.lengths
        weight = _term_weight(config, plan, lengths.to(dtype).clamp(min=1.0))
        weight = weight if weight.dim() == 0 else flat(weight)
        entropy_grad = None
        if plan.entropy_norm is not None:
            entropy_grad = (-config.entropy_coef / plan.entropy_norm.to(dtype)).expand(n).contiguous()
        grads = TokenGrads(config, flat(inputs.advantages), flat(inputs.old_logps), flat(inputs.ref_logps),
                           flat(inputs.importance_sampling_ratio), weight, entropy_grad)  # fmt: skip
        if grads.old_logps is None:
            ones = torch.ones(n, dtype=dtype, device=inputs.mask.device)
            grads.on_policy_grad = grads._policy_grad(ones, grads.advantages, grads.importance_sampling_ratio) * weight
        return grads

    def __call__(self, logps: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(dL/dlogp, dL/dentropy | None)` `[c]` of the tokens `sl` (of the visiting order), from their `logps`."""
        cfg = self.config
        weight = self.weight if self.weight.dim() == 0 else self.weight[sl]
        if self.on_policy_grad is not None:
            ratio = 1.0
            grad = self.on_policy_grad[sl]
        else:
            # d ratio / d logp = ratio
            ratio = torch.exp(logps - self.old_logps[sl])
            is_ratio = None if self.importance_sampling_ratio is None else self.importance_sampling_ratio[sl]
            grad = self._policy_grad(ratio, self.advantages[sl], is_ratio) * weight
        if cfg.beta != 0.0:
            d = self.ref_logps[sl] - logps
            e = torch.exp(d)
            d_kl = 1 - e  # of kl = exp(d) - d - 1
            if cfg.use_bias_correction_kl:  # kl * ratio
                d_kl = (d_kl + (e - d - 1)) * ratio
            grad = grad + cfg.beta * d_kl * weight
        return grad, None if self.entropy_grad is None else self.entropy_grad[sl]

    def _policy_grad(self, ratio: torch.Tensor, adv: torch.Tensor, is_ratio: torch.Tensor | None) -> torch.Tensor:
        """d (the policy term) / d logp, unweighted, at these ratios."""
        d_ratio, d_logp = _policy_term_grads(self.config, ratio, adv)
        grad = d_logp if d_ratio is None else d_ratio * ratio
        return grad if is_ratio is None else grad * is_ratio


def _term_weight(cfg: GRPOLossConfig, plan: LossPlan, count: torch.Tensor) -> torch.Tensor:
    """d loss / d (a token's term) of `row_terms`: a scalar, or `[rows, 1]` from the rows' token counts `count`
    (clamped to 1) for grpo and sapo, the mean over sequences of each sequence's mean."""
    if plan.policy_norm is not None:
        return 1.0 / plan.policy_norm.to(count.dtype)
    if cfg.loss_type == "luspo":
        return torch.full((), 1.0 / plan.num_rows, dtype=count.dtype, device=count.device)
    return 1.0 / count / plan.num_rows


def _policy_term_grads(cfg: GRPOLossConfig, ratio: torch.Tensor, adv: torch.Tensor):
    """`(d/d ratio, d/d logp)` of the policy term of `row_terms` (not VESPO's), one of them None: cispo's term reaches
    the log-prob directly (its ratio is detached), the others' through the ratio."""
    if cfg.loss_type == "cispo":
        return None, -torch.clamp(ratio, max=cfg.epsilon_high_value) * adv
    if cfg.uses_clipping:
        # -min(u * adv, c * adv): autograd's minimum sends the gradient to the smaller side, half to each on a tie
        eps_low, eps_high = cfg.epsilon_low, cfg.epsilon_high_value
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        d_clipped = ((ratio >= 1 - eps_low) & (ratio <= 1 + eps_high)).to(ratio.dtype)
        unclipped, d_unclipped = ratio, 1.0
        if cfg.delta is not None:
            unclipped, d_unclipped = torch.clamp(ratio, max=cfg.delta), (ratio <= cfg.delta).to(ratio.dtype)
        a, b = unclipped * adv, clipped * adv
        to_a = torch.where(a == b, 0.5, (a <= b).to(ratio.dtype))
        return -adv * (to_a * d_unclipped + (1 - to_a) * d_clipped), None
    # sapo: -sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg).to(ratio.dtype)
    s = torch.sigmoid(tau * (ratio - 1))
    return -4 * adv * s * (1 - s), None


def row_grads(
    logps: torch.Tensor,  # [rows, T]
    inputs: LossInputs,  # the same rows, whole
    config: GRPOLossConfig,
    plan: LossPlan,
    entropy: torch.Tensor | None = None,  # [rows, T], for the entropy mask of `plan.entropy_threshold`
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(dL/dlogp [rows, T], dL/dentropy [rows, T] | None)` of these whole rows' share of the loss (`row_terms`), in
    closed form, for every option: sequence-level ratios (each token's log-prob reaches its row's ratio), the
    off-policy mask, VESPO's weights and the entropy mask of `top_entropy_quantile < 1` (all detached, as TRL has
    them). The entropy mask needs `entropy` and a plan built from the whole batch's entropies."""
    cfg = config
    active = inputs.mask
    effective = None
    if plan.entropy_threshold is not None:
        if entropy is None:
            raise ValueError("row_grads needs the rows' entropy for the entropy mask of top_entropy_quantile < 1")
        effective = active & (entropy.detach() >= plan.entropy_threshold)
    mask = active.to(logps.dtype)
    adv = inputs.advantages.to(logps.dtype)
    old = logps if inputs.old_logps is None else inputs.old_logps
    log_ratio = torch.where(active, logps - old, 0.0)
    lengths = mask.sum(-1, keepdim=True) if inputs.lengths is None else inputs.lengths.to(logps.dtype)
    count = lengths.clamp(min=1.0)
    token_level = cfg.importance_sampling_level == "token"
    ratio = torch.exp(log_ratio if token_level else log_ratio.sum(-1, keepdim=True) / count)

    weight = mask * _term_weight(cfg, plan, count)
    policy = weight  # d loss / d (the policy term), per token
    if cfg.off_policy_mask_threshold is not None:
        sampler = old if inputs.sampling_logps is None else inputs.sampling_logps
        kl_sampler = torch.where(active, torch.nan_to_num(sampler - logps, nan=0.0), 0.0)
        mean_kl = kl_sampler.sum(-1, keepdim=True) / count
        policy = policy * ((adv >= 0) | (mean_kl <= cfg.off_policy_mask_threshold)).to(logps.dtype)
    if effective is not None:
        policy = policy * effective.to(logps.dtype)
    if cfg.loss_type == "vespo":  # -phi * adv * logp, phi detached
        d_ratio = None
        d_logp = -vespo_weights(adv, log_ratio, mask, inputs.importance_sampling_ratio, cfg) * adv
    else:
        if inputs.importance_sampling_ratio is not None:
            policy = policy * inputs.importance_sampling_ratio.to(logps.dtype)
        d_ratio, d_logp = _policy_term_grads(cfg, ratio, adv)
    g_ratio = None if d_ratio is None else policy * d_ratio  # d loss / d ratio, per token
    g_logp = torch.zeros_like(logps) if d_logp is None else policy * d_logp
    if cfg.beta != 0.0:
        d = torch.where(active, inputs.ref_logps.to(logps.dtype) - logps, 0.0)
        e = torch.exp(d)
        d_kl = 1 - e  # of kl = exp(d) - d - 1
        if cfg.use_bias_correction_kl:  # kl * ratio
            d_kl = d_kl * ratio
            g_kl = cfg.beta * weight * (e - d - 1)
            g_ratio = g_kl if g_ratio is None else g_ratio + g_kl
        g_logp = g_logp + cfg.beta * weight * d_kl
    if g_ratio is not None:  # d ratio / d logp: ratio per token, or ratio / length for each token of its row
        g_logp = g_logp + (g_ratio * ratio if token_level else g_ratio.sum(-1, keepdim=True) * ratio / count * mask)
    g_ent = None
    if plan.entropy_norm is not None:
        g_ent = (mask if effective is None else effective.to(logps.dtype)) * (
            -cfg.entropy_coef / plan.entropy_norm.to(logps.dtype)
        )
    return g_logp, g_ent


def fused_objective_applies(logps: torch.Tensor, inputs: LossInputs, config: GRPOLossConfig) -> bool:
    """Whether `token_objective` can stand for `row_grads` and `row_terms`: a `token_local` loss on fp32 log-probs,
    with per-token inputs of at most fp32 (wider ones keep PyTorch's promotion to fp64), over more than one token per
    row (with T = 1 TRL's metrics read each `[B, 1]` value as its sequence's, padding included)."""
    wide = any(t is not None and t.dtype == torch.float64 for t in vars(inputs).values())
    return token_local(config) and logps.dtype == torch.float32 and not wide and inputs.mask.shape[1] > 1


def token_objective(
    logps: torch.Tensor,  # [B, T] fp32
    entropy: torch.Tensor,  # [B, T] fp32
    inputs: LossInputs,
    config: GRPOLossConfig,
    plan: LossPlan,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """`(loss, metrics, dL/dlogp [B, T], dL/dentropy [B, T] | None)` of a whole batch's `token_local` loss: what
    `row_terms` and `row_grads` give, from one kernel (`ops/objective.py`: each token's gradient and each row's sums)
    and a few ops on `[B]`-sized sums. See `fused_objective_applies` for the losses it takes."""
    from grpo_kernels.ops import objective as kernel

    if not fused_objective_applies(logps, inputs, config):
        raise ValueError(f"token_objective needs a token-local loss on fp32 log-probs; got {config}")
    cfg = config
    mask = inputs.mask
    lengths = mask.sum(-1) if inputs.lengths is None else inputs.lengths.reshape(-1)
    # d loss / d (a token's term): a scalar, or [B] for grpo and sapo (the mean over sequences of each one's mean)
    weight = _term_weight(cfg, plan, lengths.float().clamp(min=1.0))
    weight = weight.reshape(()) if plan.policy_norm is not None else weight  # whatever num_items_in_batch's shape
    loss_type = {"cispo": kernel.CISPO, "sapo": kernel.SAPO}.get(cfg.loss_type, kernel.CLIPPED)
    grad, sums = kernel.objective_fwd(
        logps.contiguous(), entropy.contiguous(), mask.contiguous(), inputs.advantages, inputs.old_logps,
        inputs.ref_logps, inputs.importance_sampling_ratio, weight, loss_type=loss_type,
        epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high_value, delta=cfg.delta, beta=cfg.beta,
        bias_corrected_kl=cfg.use_bias_correction_kl,
        sapo_temperatures=(cfg.sapo_temperature_pos, cfg.sapo_temperature_neg),
    )  # fmt: skip
    loss = (sums[kernel.TERM] * weight).sum()
    names = {"kl": kernel.KL} if cfg.beta != 0.0 else {}
    names["entropy"] = kernel.ENTROPY
    if cfg.uses_clipping:
        names.update({"clip_ratio/low_mean": kernel.LOW, "clip_ratio/high_mean": kernel.HIGH,
                      "clip_ratio/region_mean": kernel.REGION})  # fmt: skip
    elif cfg.loss_type == "cispo":
        names["cispo_clip_ratio"] = kernel.HIGH
    means = torch.stack([sums[i] for i in names.values()]).sum(1) / plan.token_count.clamp(min=1.0)  # no host index
    metrics = dict(zip(names, means.unbind(0), strict=True))
    if cfg.uses_clipping:  # the NaN-aware extremes of the rows' means (an empty row's is NaN)
        rows = torch.stack((sums[kernel.LOW], -sums[kernel.HIGH])) / sums[kernel.COUNT]
        lowest, highest = _nan_reduce(rows, torch.amin).unbind(0)
        metrics["clip_ratio/low_min"], metrics["clip_ratio/high_max"] = lowest, 0.0 - highest
    g_ent = None
    if plan.entropy_norm is not None:
        metrics["policy_loss"] = loss
        loss = loss - cfg.entropy_coef * sums[kernel.ENTROPY].sum() / plan.entropy_norm
        g_ent = mask.float() * (-cfg.entropy_coef / plan.entropy_norm.float())
    return loss, metrics, grad, g_ent


def _nan_reduce(x: torch.Tensor, op) -> torch.Tensor:
    """`op` (`torch.amin` or `torch.amax`) over the last dimension of `x`, of the entries that are not NaN; NaN where
    none is. No boolean indexing: its data-dependent shape would wait for the device."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], math.nan)
    valid = ~torch.isnan(x)
    fill = math.inf if op is torch.amin else -math.inf
    return torch.where(valid.any(-1), op(torch.where(valid, x, fill), -1), math.nan)


def loss_and_metrics(
    logps: torch.Tensor,  # [B, T]
    entropy: torch.Tensor,  # [B, T]
    inputs: LossInputs,
    config: GRPOLossConfig,
    num_items_in_batch: torch.Tensor | float | None,
    triton: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and metrics of a whole batch without a graph: in one kernel launch (`token_objective`) where `triton`
    (the op runs Triton kernels) and `fused_objective_applies`, else by `grpo_objective`'s PyTorch ops."""
    with torch.no_grad():
        if triton and fused_objective_applies(logps, inputs, config):
            plan = LossPlan.build(inputs.mask, config, entropy, num_items_in_batch)
            loss, metrics, *_ = token_objective(logps, entropy, inputs, config, plan)
            return loss, metrics
        return grpo_objective(logps, entropy, inputs, config, num_items_in_batch)


def grpo_objective(
    logps: torch.Tensor,  # [B, T]
    entropy: torch.Tensor,  # [B, T]
    inputs: LossInputs,
    config: GRPOLossConfig,
    num_items_in_batch: torch.Tensor | float | None = None,
    plan: LossPlan | None = None,  # the batch's, when the caller has built it already
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and metrics of a whole batch whose per-token log-probs and entropies are at hand."""
    if plan is None:
        plan = LossPlan.build(inputs.mask, config, entropy, num_items_in_batch)
    return row_terms(logps, entropy, inputs, config, plan)
