"""Plain-PyTorch reference of every op: the specification in code.

Everything here materialises what the kernels avoid (full logits, fp32 copies) and follows TRL 1.16's
`GRPOTrainer._compute_loss` and `_generate_and_score_completions` step by step, so it reads as the definition of the
loss. Tests and benchmarks compare the fast paths against these functions. The fast paths share only the small,
detached helpers whose cost is O(B * T) (`vespo_weights`, `nanstd`).

Shapes: B completions, T completion tokens, V vocabulary, H hidden size, K reward functions.
"""

from __future__ import annotations

import math

import torch

from grpo_kernels.config import GRPOLossConfig, GRPOLossOutput


def logprobs_and_entropy(
    logits: torch.Tensor,  # [..., V]
    ids: torch.Tensor,  # [...]
    temperature: float = 1.0,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probability of `ids` and entropy of softmax(logits / temperature).

    With `upcast` the math runs in fp32 (fp64 stays fp64); without it, in the logits' own dtype.
    """
    z = logits.float() if upcast and logits.dtype in (torch.float16, torch.bfloat16) else logits
    z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logps = logp_all.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return logps, entropy


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`log_softmax(logits / temperature).gather(ids)`, materialised."""
    return logprobs_and_entropy(logits, ids, temperature)[0]


def linear_logits(
    hidden: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None = None,  # [V]
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> torch.Tensor:
    """The LM head's logits as models compute them: `hidden @ weight.T + bias`, scaled, then soft-capped."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    return scale_and_cap(z, logit_scale, final_logit_softcapping)


def add_weight_grad(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = True) -> torch.Tensor:
    """`out += a.T @ b` (`[M, N] += [K, M].T @ [K, N]`), or `out = a.T @ b` without `accumulate`: a chunk's share of
    the LM head's weight gradient, its logits gradient `a` times its hidden rows `b`."""
    return out.addmm_(a.t(), b) if accumulate else torch.mm(a.t(), b, out=out)


def scale_and_cap(logits: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """`softcap * tanh(logit_scale * logits / softcap)`, the soft-cap only when set."""
    z = logits * logit_scale if logit_scale != 1.0 else logits
    return z if softcap is None else softcap * torch.tanh(z / softcap)


# --------------------------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------------------------


def scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x * scale` (a 0-dim `scale`) in the wider of the two dtypes, rounded once to `x`'s: how the fused linear loss's
    backward scales the gradients its forward formed by the loss's incoming gradient (`ops/scale.py`)."""
    wide = torch.promote_types(x.dtype, scale.dtype)
    return (x.to(wide) * scale.to(wide)).to(x.dtype)


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs; NaN where fewer than two values are present."""
    dims = dim if dim is not None else tuple(range(x.dim()))
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True)
    var = torch.where(count > 1, var * count / (count - 1), torch.full_like(var, math.nan))
    std = var.sqrt()
    return std if keepdim else std.squeeze(dims)


def group_advantages(
    rewards: torch.Tensor,  # [B] or [B, K]
    num_generations: int,
    scale_rewards: str = "group",
    reward_weights: torch.Tensor | None = None,  # [K]
    multi_objective_aggregation: str = "sum_then_normalize",
) -> torch.Tensor:  # [B]
    """Advantages from rewards, as TRL 1.16 forms them (NaN reward = not scorable)."""
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))  # fp32, or fp64 for an upcast reference
    if r.dim() == 1:
        r = r.unsqueeze(1)
    G, K = num_generations, r.shape[1]
    w = torch.ones(K, dtype=r.dtype, device=r.device) if reward_weights is None else reward_weights.to(r)
    unscorable = torch.isnan(r).all(dim=1)
    if multi_objective_aggregation == "sum_then_normalize":
        total = (r * w).nansum(dim=1)
        total[unscorable] = math.nan
        mean = torch.nanmean(total.view(-1, G), dim=1).repeat_interleave(G)
        if scale_rewards == "batch":
            std = nanstd(total).expand_as(total) if total.numel() > 1 else torch.zeros_like(total)
        else:
            std = nanstd(total.view(-1, G), dim=1).repeat_interleave(G) if G > 1 else torch.zeros_like(total)
        adv = total - mean
        if scale_rewards != "none":
            adv = adv / (std + 1e-4)
    else:  # normalize_then_sum
        grouped = r.view(-1, G, K)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if G > 1 else torch.zeros_like(mean_k)
        total = (((grouped - mean_k) / (std_k + 1e-4)).view(-1, K) * w).nansum(dim=1)
        total[unscorable] = math.nan
        std = nanstd(total).expand_as(total) if total.numel() > 1 else torch.zeros_like(total)
        adv = (total - torch.nanmean(total)) / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


# --------------------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------------------


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Boolean `[B, T]`: active tokens whose entropy is at least the `quantile` quantile of the active entropies."""
    active = entropy.detach()[mask.bool()].float()
    if active.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(active, quantile)
    return (entropy.detach() * mask >= threshold) & mask.bool()


def off_policy_mask(
    advantages: torch.Tensor,  # [B, 1] or [B, T]
    logps: torch.Tensor,  # [B, T]
    sampling_logps: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T]
    threshold: float,
) -> torch.Tensor:
    """1.0 keeps a sequence: its advantage is >= 0 or its mean KL(sampler || policy) is <= threshold."""
    kl = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)
    mean_kl = (kl * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(mask.dtype)


@torch.no_grad()
def vespo_weights(
    advantages: torch.Tensor,  # [B, 1] or [B, T]
    log_ratio: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T]
    importance_sampling_ratio: torch.Tensor | None,  # [B, T] or [B, 1]
    config: GRPOLossConfig,
) -> torch.Tensor:
    """VESPO's detached gamma weight `phi(w) = exp(lambda + k log w - lambda w)` of the sequence ratio w."""
    low = math.log(1e-8)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
    if importance_sampling_ratio is not None:
        log_w = log_w + importance_sampling_ratio.log().clamp(low, 20.0).sum(-1, keepdim=True)
    log_w = log_w.clamp(low, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, config.vespo_k_pos, config.vespo_k_neg)
    lam = torch.where(nonneg, config.vespo_lambda_pos, config.vespo_lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp())
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_loss_from_logps(
    logps: torch.Tensor,  # [B, T], differentiable
    entropy: torch.Tensor,  # [B, T], differentiable (used by the entropy bonus)
    advantages: torch.Tensor,  # [B] or [B, T]
    completion_mask: torch.Tensor | None = None,  # [B, T]
    *,
    config: GRPOLossConfig = GRPOLossConfig(),  # noqa: B008 (frozen)
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss and TRL's metrics from per-token log-probs and entropies, in TRL 1.16's order."""
    cfg = config
    mask = torch.ones_like(logps) if completion_mask is None else completion_mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    eps_low, eps_high = cfg.epsilon_low, cfg.epsilon_high_value

    # 1. top-entropy token mask
    entropy_mask = (
        high_entropy_mask(entropy, mask, 1 - cfg.top_entropy_quantile) if cfg.top_entropy_quantile < 1 else None
    )

    # 2. old policy, off-policy sequence mask
    old = logps.detach() if old_logps is None else old_logps
    seq_mask = None
    if cfg.off_policy_mask_threshold is not None:
        sampler = old if sampling_logps is None else sampling_logps
        seq_mask = off_policy_mask(adv, logps, sampler, mask, cfg.off_policy_mask_threshold)

    # 3. importance ratio, token or sequence level
    log_ratio = logps - old
    if cfg.importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_w)

    # 4. k3 KL to the reference, optionally weighted by the (differentiable) ratio
    kl = None
    if cfg.beta != 0.0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        if cfg.use_bias_correction_kl:
            kl = kl * ratio

    # 5. per-token policy term
    if cfg.loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=eps_high).detach() * adv * logps
    elif cfg.uses_clipping:
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        unclipped = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
        per_token = -torch.min(unclipped * adv, clipped * adv)
    elif cfg.loss_type == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    else:  # vespo
        phi = vespo_weights(adv, log_ratio, mask, importance_sampling_ratio, cfg)
        per_token = -phi * adv * logps

    if seq_mask is not None:
        per_token = per_token * seq_mask
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if importance_sampling_ratio is not None and cfg.loss_type != "vespo":
        per_token = per_token * importance_sampling_ratio
    if kl is not None:
        per_token = per_token + cfg.beta * kl

    # 6. aggregation over the micro-batch
    B = logps.shape[0]
    if cfg.loss_type in ("grpo", "sapo"):
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif cfg.loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif cfg.loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * cfg.max_completion_length)
    elif cfg.loss_type in ("dapo", "cispo", "vespo"):
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype)
        loss = (per_token * mask).sum() / n.clamp(min=1.0)
    else:  # luspo
        loss = (per_token * mask).sum(-1).mean()

    # 7. entropy bonus over the tokens the policy term acts on
    metrics: dict[str, torch.Tensor] = {}
    if cfg.entropy_coef != 0.0:
        metrics["policy_loss"] = loss.detach()
        eff = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - cfg.entropy_coef * (entropy * eff).sum() / eff.sum().clamp(min=1.0)

    # 8. metrics (detached), with TRL's names and meanings
    def global_mean(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            return x.sum() / B
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    def per_sequence_mean(x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    with torch.no_grad():
        if kl is not None:
            metrics["kl"] = global_mean(kl)
        metrics["entropy"] = global_mean(entropy)
        if cfg.uses_clipping:  # TRL counts them after delta's cap of the ratio
            capped = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
            low = ((capped < 1 - eps_low) & (adv < 0)).float()
            high = ((capped > 1 + eps_high) & (adv > 0)).float()
            metrics["clip_ratio/low_mean"] = global_mean(low)
            metrics["clip_ratio/high_mean"] = global_mean(high)
            metrics["clip_ratio/region_mean"] = global_mean(torch.maximum(low, high))
            metrics["clip_ratio/low_min"] = _nanmin(per_sequence_mean(low))
            metrics["clip_ratio/high_max"] = _nanmax(per_sequence_mean(high))
        elif cfg.loss_type == "cispo":
            metrics["cispo_clip_ratio"] = global_mean(((ratio > eps_high) & (adv > 0)).float())
        elif cfg.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"] = global_mean(phi)
    return loss, metrics


def _nanmin(x: torch.Tensor) -> torch.Tensor:
    x = x[~torch.isnan(x)]
    return x.min() if x.numel() else torch.tensor(math.nan, device=x.device)


def _nanmax(x: torch.Tensor) -> torch.Tensor:
    x = x[~torch.isnan(x)]
    return x.max() if x.numel() else torch.tensor(math.nan, device=x.device)


def grpo_loss(
    logits: torch.Tensor,  # [B, T, V]
    completion_ids: torch.Tensor,  # [B, T]
    advantages: torch.Tensor,  # [B] or [B, T]
    completion_mask: torch.Tensor | None = None,  # [B, T]
    *,
    config: GRPOLossConfig = GRPOLossConfig(),  # noqa: B008 (frozen)
    upcast: bool = True,
    **inputs: torch.Tensor | float | None,
) -> GRPOLossOutput:
    """The whole loss from materialised logits (keyword inputs as in `grpo_kernels.grpo_loss`)."""
    logps, entropy = logprobs_and_entropy(logits, completion_ids, config.temperature, upcast=upcast)
    if completion_mask is not None:
        active = completion_mask.bool()
        logps = torch.where(active, logps, torch.zeros_like(logps))
        entropy = torch.where(active, entropy, torch.zeros_like(entropy))
    loss, metrics = grpo_loss_from_logps(logps, entropy, advantages, completion_mask, config=config, **inputs)
    return GRPOLossOutput(loss=loss, logps=logps.detach(), entropy=entropy.detach(), metrics=metrics)


def linear_grpo_loss(
    hidden: torch.Tensor,  # [B, T, H]
    weight: torch.Tensor,  # [V, H]
    completion_ids: torch.Tensor,  # [B, T]
    advantages: torch.Tensor,  # [B] or [B, T]
    completion_mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    config: GRPOLossConfig = GRPOLossConfig(),  # noqa: B008 (frozen)
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    upcast: bool = True,
    **inputs: torch.Tensor | float | None,
) -> GRPOLossOutput:
    """The loss from hidden states and the LM-head weight, materialising the `[B, T, V]` logits."""
    logits = linear_logits(hidden, weight, bias, logit_scale, final_logit_softcapping)
    return grpo_loss(logits, completion_ids, advantages, completion_mask, config=config, upcast=upcast, **inputs)
