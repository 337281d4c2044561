"""Public functions and their autograd glue.

`grpo_loss` reads the logits once in its forward for the per-token log-probs and entropies (Triton on CUDA, the
chunked PyTorch path on CPU) and once in its backward for their gradient. When the logits alone require grad
(`GRPOLossFunction`), the forward also forms the loss's derivative with respect to those `[B, T]` vectors in closed
form (`objective.row_grads`) and the loss and metrics without a graph (`objective.grpo_objective`); with Triton and a
token-local loss, all three in one launch (`objective.token_objective`). Otherwise autograd runs through the objective
(`LogProbEntropyFunction`, also `selective_log_softmax`'s op).
"""

from __future__ import annotations

import torch

from grpo_kernels import cpu
from grpo_kernels.backend import use_triton
from grpo_kernels.config import GRPOLossConfig, GRPOLossOutput, HeadOptions, resolve_grad_filter_eps
from grpo_kernels.objective import (
    LossInputs,
    LossPlan,
    device_value,
    fused_objective_applies,
    grpo_objective,
    loss_and_metrics,
    row_grads,
    token_objective,
)
from grpo_kernels.validation import (
    ValueChecks,
    check_finite,
    check_finite_in_loss,
    check_ids,
    check_mask,
    check_positive_items,
    check_tensor,
)


def _logprob_ops(t: torch.Tensor):
    if use_triton(t):
        from grpo_kernels.ops import logprobs

        return logprobs
    return cpu


class LogProbEntropyFunction(torch.autograd.Function):
    """`(logits [B, T, V], ids [B, T], mask [B, T] | None, HeadOptions) -> (logp, entropy)`, fp32 `[B, T]`."""

    @staticmethod
    def forward(ctx, logits, ids, mask, head: HeadOptions):
        ops = _logprob_ops(logits)
        logp, entropy, stats = ops.logprobs_fwd(logits, ids, mask, *_head_args(head))
        ctx.save_for_backward(logits, ids, mask, stats, entropy)
        ctx.head = head
        ctx.ops = ops
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, ids, mask, stats, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        if grad_logp is None:
            grad_logp = torch.zeros_like(entropy)
        args = _head_args(ctx.head)
        dlogits = ctx.ops.logprobs_bwd(logits, ids, mask, stats, entropy, grad_logp, grad_entropy, *args)
        return dlogits, None, None, None


class GRPOLossFunction(torch.autograd.Function):
    """The loss from logits with its derivative in closed form: `(logits [B, T, V], ids, mask | None, LossInputs,
    GRPOLossConfig, num_items_in_batch, plans: list) -> (anchor, logp, entropy)`. The forward reads the logits for the
    log-probs and forms `dL/dlogp` and `dL/dentropy` `[B, T]` (`objective.row_grads`), so no autograd graph runs
    through the loss's small ops; `anchor` is a zero whose gradient is the loss's: the caller adds it to the loss it
    forms (without gradient) from the log-probs and the batch's plan. The forward appends `(plan, (loss, metrics))` to
    `plans` when its Triton objective formed those too (`objective.token_objective`), else `(plan, None)`. The
    backward multiplies those coefficients by the loss's incoming gradient and writes the logits' gradient in one
    pass: rounded once to the logits' dtype after the scaling, so a loss scaled against fp16 underflow keeps its small
    gradients."""

    @staticmethod
    def forward(ctx, logits, ids, mask, inputs: LossInputs, config: GRPOLossConfig, num_items, plans: list):
        ops = _logprob_ops(logits)
        head = HeadOptions(temperature=config.temperature)
        logp, entropy, stats = ops.logprobs_fwd(logits, ids, mask, *_head_args(head))
        plan = LossPlan.build(inputs.mask, config, entropy, num_items)
        if ops is not cpu and fused_objective_applies(logp, inputs, config):  # the loss and metrics too, one launch
            loss, metrics, grad_logp, grad_entropy = token_objective(logp, entropy, inputs, config, plan)
            plans.append((plan, (loss, metrics)))
        else:
            grad_logp, grad_entropy = row_grads(logp, inputs, config, plan, entropy)
            plans.append((plan, None))
        ctx.save_for_backward(logits, ids, mask, stats, entropy, grad_logp, grad_entropy)
        ctx.head, ctx.ops = head, ops
        ctx.mark_non_differentiable(logp, entropy)
        ctx.set_materialize_grads(False)  # no zeros for the non-differentiable outputs
        return torch.zeros((), dtype=logp.dtype, device=logp.device), logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        logits, ids, mask, stats, entropy, grad_logp, grad_entropy = ctx.saved_tensors
        if grad_loss is None:  # the loss was not used
            return None, None, None, None, None, None, None
        grad_logp = grad_logp * grad_loss
        grad_entropy = None if grad_entropy is None else grad_entropy * grad_loss
        dlogits = ctx.ops.logprobs_bwd(logits, ids, mask, stats, entropy, grad_logp, grad_entropy,
                                       *_head_args(ctx.head))  # fmt: skip
        return dlogits, None, None, None, None, None, None


def _head_args(head: HeadOptions) -> tuple[float, float, float | None]:
    return head.temperature, head.logit_scale, head.final_logit_softcapping


def _contiguous_last(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def loss_inputs(
    checks: ValueChecks,
    B: int,
    T: int,
    device: torch.device,
    config: GRPOLossConfig,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor | None,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    importance_sampling_ratio: torch.Tensor | None,
    sampling_logps: torch.Tensor | None,
) -> LossInputs:
    """Check the per-token inputs of a GRPO loss over `[B, T]` tokens and gather them into `LossInputs`."""
    if B == 0:
        raise ValueError("the batch is empty (B = 0): the loss needs at least one completion")
    bt = f"[B, T] = [{B}, {T}]"
    check_tensor(
        "advantages", advantages, kind="float", shapes=((B,), (B, T)), device=device, shape_hint=f"[B] or {bt}"
    )
    check_finite(checks, "advantages", advantages)
    if completion_mask is not None:
        check_tensor("completion_mask", completion_mask, kind="mask", shapes=((B, T),), device=device, shape_hint=bt)
    mask = check_mask(checks, "completion_mask", completion_mask)
    for name, x in (("old_logps", old_logps), ("ref_logps", ref_logps), ("sampling_logps", sampling_logps)):
        if x is not None:
            check_tensor(name, x, kind="float", shapes=((B, T),), device=device, shape_hint=bt)
    if config.beta != 0.0 and ref_logps is None:
        raise ValueError(f"ref_logps is required when beta != 0 (beta = {config.beta}): pass the reference log-probs")
    if importance_sampling_ratio is not None:
        check_tensor(
            "importance_sampling_ratio",
            importance_sampling_ratio,
            kind="float",
            shapes=((B, T), (B, 1)),
            device=device,
            shape_hint=f"{bt} or [B, 1]",
        )
    # NaN or an infinity would poison the loss (an infinite ratio or KL term; for vespo, whose weight treats NaN as 0,
    # silently drop the sequence); sampling_logps may hold NaN, which the off-policy mask reads as no divergence, as TRL
    # does
    check_finite_in_loss(checks, "old_logps", old_logps, mask)
    check_finite_in_loss(checks, "ref_logps", ref_logps if config.beta != 0.0 else None, mask)
    check_finite_in_loss(checks, "importance_sampling_ratio", importance_sampling_ratio, mask, nonnegative=True)
    if mask is None:
        mask = torch.ones((B, T), dtype=torch.bool, device=device)

    def upcast(x: torch.Tensor | None) -> torch.Tensor | None:  # fp32, or fp64 kept as is
        return None if x is None else x.to(torch.promote_types(x.dtype, torch.float32))

    adv = upcast(advantages)
    return LossInputs(
        advantages=adv.unsqueeze(1) if adv.dim() == 1 else adv,
        mask=mask,
        old_logps=upcast(old_logps),
        ref_logps=None if config.beta == 0.0 else upcast(ref_logps),
        importance_sampling_ratio=upcast(importance_sampling_ratio),
        sampling_logps=upcast(sampling_logps),
    )


def _checked_loss_inputs(B, T, V, device, config, completion_ids, advantages, completion_mask, old_logps, ref_logps,
                         importance_sampling_ratio, sampling_logps, num_items_in_batch):  # fmt: skip
    """`(LossInputs, num_items_in_batch)` for a loss over `[B, T]` tokens of a `V`-entry vocabulary, after every
    argument check (the value checks in one host sync)."""
    checks = ValueChecks()
    shape = f"[{B}, {T}]"
    check_tensor("completion_ids", completion_ids, kind="int", shapes=((B, T),), device=device, shape_hint=shape)
    check_ids(checks, "completion_ids", completion_ids, V)
    inputs = loss_inputs(
        checks, B, T, device, config, advantages, completion_mask, old_logps, ref_logps, importance_sampling_ratio,
        sampling_logps,
    )  # fmt: skip
    num_items = check_positive_items(checks, num_items_in_batch, device)
    checks.run()
    return inputs, num_items


def grpo_loss(
    logits: torch.Tensor,  # [B, T, V]
    completion_ids: torch.Tensor,  # [B, T]
    advantages: torch.Tensor,  # [B] or [B, T]
    completion_mask: torch.Tensor | None = None,  # [B, T]
    *,
    config: GRPOLossConfig = GRPOLossConfig(),  # noqa: B008 (frozen)
    old_logps: torch.Tensor | None = None,  # [B, T]
    ref_logps: torch.Tensor | None = None,  # [B, T]
    importance_sampling_ratio: torch.Tensor | None = None,  # [B, T] or [B, 1]
    sampling_logps: torch.Tensor | None = None,  # [B, T]
    num_items_in_batch: torch.Tensor | float | None = None,
) -> GRPOLossOutput:
    """The GRPO loss of TRL 1.16 from logits, reading the logits once forward and once backward.

    Args:
        logits: `[B, T, V]`, any float dtype; position t predicts `completion_ids[:, t]` (already shifted).
        completion_ids: `[B, T]` token ids in `[0, V)`.
        advantages: `[B]` (one per completion) or `[B, T]`.
        completion_mask: `[B, T]`, 1 for tokens in the loss (completion mask times any tool mask); default all ones.
        config: the loss options (`GRPOLossConfig`).
        old_logps: log-probs of the policy that sampled (default: the current log-probs, detached).
        ref_logps: reference log-probs, required when `config.beta != 0`.
        importance_sampling_ratio: sampler-correction weight, `[B, T]` or `[B, 1]` (e.g. vLLM's truncated IS).
        sampling_logps: the sampler's log-probs for the off-policy mask (default: `old_logps`).
        num_items_in_batch: normaliser of dapo, cispo and vespo (default: the mask's sum). No gradient-accumulation
            scaling is applied: that is the caller's.

    Returns:
        `GRPOLossOutput` with the differentiable scalar `loss`, detached fp32 `logps` and `entropy` (`[B, T]`) and
        TRL's metrics.
    """
    if not isinstance(config, GRPOLossConfig):
        raise TypeError(f"config must be a GRPOLossConfig; got {type(config).__name__}")
    check_tensor("logits", logits, kind="float")
    if logits.dim() != 3 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [B, T, V] with V >= 1; got shape {tuple(logits.shape)}")
    B, T, V = logits.shape
    inputs, num_items = _checked_loss_inputs(
        B, T, V, logits.device, config, completion_ids, advantages, completion_mask, old_logps, ref_logps,
        importance_sampling_ratio, sampling_logps, num_items_in_batch,
    )  # fmt: skip
    mask = None if completion_mask is None else inputs.mask
    if torch.compiler.is_compiling():
        from grpo_kernels import library

        logps, entropy, _ = library.logprobs_entropy(
            _contiguous_last(logits), completion_ids, mask, config.temperature, 1.0, None, _backend_name(logits)
        )
        loss, metrics = _compiled_objective(logps, entropy, inputs, config, num_items)
    elif torch.is_grad_enabled() and logits.requires_grad and not inputs.requires_grad():
        plans = []
        anchor, logps, entropy = GRPOLossFunction.apply(
            _contiguous_last(logits), completion_ids, mask, inputs, config, num_items, plans
        )
        ((plan, done),) = plans
        if done is None:
            with torch.no_grad():
                done = grpo_objective(logps, entropy, inputs, config, num_items, plan=plan)
        loss, metrics = done
        loss = loss + anchor
    else:  # no gradient, or one for the per-token inputs too (advantages, ...): autograd through the loss
        head = HeadOptions(temperature=config.temperature)
        logps, entropy = LogProbEntropyFunction.apply(_contiguous_last(logits), completion_ids, mask, head)
        if torch.is_grad_enabled() and (logits.requires_grad or inputs.requires_grad()):
            loss, metrics = grpo_objective(logps, entropy, inputs, config, num_items)
        else:  # as the gradient's branch forms them: the same loss and metrics, bit for bit, with or without grad
            loss, metrics = loss_and_metrics(logps, entropy, inputs, config, num_items, use_triton(logits))
    return GRPOLossOutput(loss=loss, logps=logps.detach(), entropy=entropy.detach(), metrics=metrics)


@torch.compiler.assume_constant_result
def _backend_name(t: torch.Tensor) -> str:
    return "triton" if use_triton(t) else "torch"


@torch.compiler.assume_constant_result
def _linear_schedule(t: torch.Tensor) -> tuple[str, int]:
    """`(GRPO_KERNELS_LINEAR strategy, chunk budget in bytes)`, read once when the call is traced."""
    from grpo_kernels.fused_linear import linear_schedule

    return linear_schedule(t.device)


def _compiled_objective(logps, entropy, inputs: LossInputs, config: GRPOLossConfig, num_items):
    """The objective as one custom op, for `torch.compile`."""
    from grpo_kernels import library

    n = None if num_items is None else device_value(num_items, logps.device)
    loss, vector = library.objective(
        logps, entropy, inputs.advantages, inputs.mask, inputs.old_logps, inputs.ref_logps,
        inputs.importance_sampling_ratio, inputs.sampling_logps, n, library.encode(config),
    )  # fmt: skip
    return loss, dict(zip(library.metric_names(config), vector.unbind(0), strict=True))


def selective_log_softmax(
    logits: torch.Tensor,  # [..., V]
    ids: torch.Tensor,  # [...]
    temperature: float = 1.0,
) -> torch.Tensor:  # [...] fp32
    """`log_softmax(logits / temperature)` gathered at `ids`, without an fp32 copy of the logits.

    For old and reference policies; differentiable all the same.
    """
    check_tensor("logits", logits, kind="float")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1; got shape {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    check_tensor("ids", ids, kind="int", shapes=(lead,), device=logits.device, shape_hint=str(list(lead)))
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number; got {temperature!r}")
    checks = ValueChecks()
    check_ids(checks, "ids", ids, logits.shape[-1], mask=None)
    checks.run()
    x = _contiguous_last(logits)
    x3 = x.reshape(1, -1, x.shape[-1]) if x.dim() != 3 else x
    head = HeadOptions(temperature=float(temperature))
    logps, _ = LogProbEntropyFunction.apply(x3, ids.reshape(x3.shape[:2]), None, head)
    return logps.reshape(lead)


def group_advantages(
    rewards: torch.Tensor,  # [B] or [B, K]
    num_generations: int,
    *,
    scale_rewards: str | bool = "group",
    reward_weights: torch.Tensor | list[float] | None = None,  # [K]
    multi_objective_aggregation: str = "sum_then_normalize",
) -> torch.Tensor:  # [B] fp32
    """Advantages from rewards, as TRL 1.16 computes them.

    Args:
        rewards: `[B]` or `[B, K]` (K reward functions); NaN marks a reward that could not be computed. Groups are
            `num_generations` consecutive rows (the completions of one prompt).
        num_generations: G, the group size; B must be a multiple of it.
        scale_rewards: "group" (divide by the group's std + 1e-4), "batch" (the batch's std) or "none"; True/False
            mean "group"/"none" as in TRL.
        reward_weights: `[K]` weights of the reward functions (default ones).
        multi_objective_aggregation: "sum_then_normalize" (weighted sum, then group-normalise) or
            "normalize_then_sum" (normalise each function per group, sum, then normalise over the batch).
    """
    scale = scale_rewards
    if isinstance(scale, bool):  # TRL's True / False
        scale = "group" if scale else "none"
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none'; got {scale_rewards!r}")
    if multi_objective_aggregation not in ("sum_then_normalize", "normalize_then_sum"):
        raise ValueError(
            "multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum'; "
            f"got {multi_objective_aggregation!r}"
        )
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
        raise ValueError(
            f"num_generations must be an int >= 2 (a completion's advantage is its reward against the other "
            f"completions of its prompt; alone, it is always 0); got {num_generations!r}"
        )
    check_tensor("rewards", rewards, kind="float", shape_hint="[B] or [B, K]")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [B] or [B, K]; got shape {tuple(rewards.shape)}")
    r = rewards.unsqueeze(1) if rewards.dim() == 1 else rewards
    B, K = r.shape
    if B == 0 or K == 0:
        raise ValueError(f"rewards is empty (shape {tuple(rewards.shape)}): a batch needs at least one group")
    if B % num_generations:
        raise ValueError(
            f"rewards has {B} rows, not a multiple of num_generations = {num_generations}: every group must be complete"
        )
    if reward_weights is None:
        weights = torch.ones(K, dtype=torch.float32, device=r.device)
    else:
        try:
            weights = torch.as_tensor(reward_weights, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"reward_weights must be K numbers (a list or a tensor); got {reward_weights!r}") from err
        weights = device_value(weights, r.device)
        if weights.shape != (K,):
            raise ValueError(f"reward_weights has shape {tuple(weights.shape)} but rewards has K = {K} columns")
    checks = ValueChecks()
    check_finite(checks, "rewards", r, allow_nan=True)
    check_finite(checks, "reward_weights", weights)
    checks.run()
    if use_triton(r):
        from grpo_kernels.ops.advantages import group_advantages_fwd

        return group_advantages_fwd(
            r.float().contiguous(), weights, num_generations, scale, multi_objective_aggregation
        )
    from grpo_kernels import reference

    return reference.group_advantages(r.float(), num_generations, scale, weights, multi_objective_aggregation)


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A plain tensor from a `DTensor` (an all-gather whose backward reduce-scatters), anything else unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_head(hidden, weight, bias) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check the head's tensors; gather FSDP2-sharded (`DTensor`) head weights, whose gradients then flow back to the
    shards; under autocast, cast to the autocast dtype as `F.linear` would."""
    hidden, weight, bias = (_full(t) for t in (hidden, weight, bias))
    check_tensor("hidden", hidden, kind="float", shape_hint="[B, T, H]")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H]; got shape {tuple(hidden.shape)}")
    H = hidden.shape[-1]
    check_tensor("weight", weight, kind="float", device=hidden.device, shape_hint=f"[V, {H}]")
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but must be [V, H] with H = {H} (hidden's last dim)")
    if bias is not None:
        V = weight.shape[0]
        check_tensor("bias", bias, kind="float", shapes=((V,),), device=hidden.device, shape_hint=f"[{V}]")
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(
            f"hidden is {hidden.dtype} but weight is {weight.dtype}"
            + ("" if bias is None else f" and bias is {bias.dtype}")
            + ": pass one dtype (e.g. hidden.to(weight.dtype)), or run under torch.autocast"
        )
    return hidden, weight, bias


def fused_linear_grpo_loss(
    hidden: torch.Tensor,  # [B, T, H]
    weight: torch.Tensor,  # [V, H]
    completion_ids: torch.Tensor,  # [B, T]
    advantages: torch.Tensor,  # [B] or [B, T]
    completion_mask: torch.Tensor | None = None,  # [B, T]
    *,
    bias: torch.Tensor | None = None,  # [V]
    config: GRPOLossConfig = GRPOLossConfig(),  # noqa: B008 (frozen)
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    grad_filter_eps: float | str | None = None,
    vocab_process_group=None,
) -> GRPOLossOutput:
    """The GRPO loss of TRL 1.16 from hidden states and the LM-head weight, never materialising the logits.

    Args:
        hidden: `[B, T, H]` hidden states; position t predicts `completion_ids[:, t]` (already shifted).
        weight: `[V, H]` LM-head weight (`model.lm_head.weight`); gradients flow to it, to `hidden` and to `bias`.
        completion_ids, advantages, completion_mask, config, old_logps, ref_logps, importance_sampling_ratio,
            sampling_logps, num_items_in_batch: as in `grpo_loss`.
        bias: optional `[V]` LM-head bias.
        logit_scale, final_logit_softcapping: the head's logit transform (see `head_options_from_config`);
            `config.temperature` divides the result.
        grad_filter_eps: None (the default: exact gradients), a float in [0, 1), or "auto" (2**-12 for bf16
            inputs, 2**-15 for fp16, about 4e-9 for fp32): leave out of the backward's weight products the vocabulary
            columns whose logit gradients are all at most this fraction of their token's gradient scale, i.e. (without
            the entropy bonus) whose softmax probabilities are all at most `grad_filter_eps`, unless a token would
            lose more than 64 times that in all (a flat softmax keeps every column). Faster where the distributions
            are peaked; approximate (see `HeadOptions`).
        vocab_process_group: for a vocabulary-parallel head: each rank of this `torch.distributed` group passes its
            contiguous shard of `weight` (and `bias`), rows `[rank * V_local, (rank + 1) * V_local)`, and the same
            hidden states; `completion_ids` are global ids.

    Returns:
        `GRPOLossOutput`, as `grpo_loss`.
    """
    if not isinstance(config, GRPOLossConfig):
        raise TypeError(f"config must be a GRPOLossConfig; got {type(config).__name__}")
    hidden, weight, bias = _check_head(hidden, weight, bias)
    B, T, _ = hidden.shape
    V = _vocab(weight, vocab_process_group)
    head = _head_options(config.temperature, logit_scale, final_logit_softcapping, grad_filter_eps, hidden,
                         vocab_process_group)  # fmt: skip
    inputs, num_items = _checked_loss_inputs(
        B, T, V, hidden.device, config, completion_ids, advantages, completion_mask, old_logps, ref_logps,
        importance_sampling_ratio, sampling_logps, num_items_in_batch,
    )  # fmt: skip
    if vocab_process_group is not None:
        logps, entropy = _vocab_parallel(hidden, weight, bias, completion_ids, inputs.mask, head, vocab_process_group)
        loss, metrics = grpo_objective(logps, entropy, inputs, config, num_items)
        return GRPOLossOutput(loss=loss, logps=logps.detach(), entropy=entropy.detach(), metrics=metrics)
    if torch.compiler.is_compiling():
        from grpo_kernels import library

        backend_name, schedule = _backend_name(hidden), _linear_schedule(hidden)
        inputs_grad = torch.is_grad_enabled() and inputs.requires_grad()  # the single pass: the head's gradients only
        if library.single_pass_applies(hidden, config, backend_name, schedule[0]) and not inputs_grad:
            needs = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
            n = None if num_items is None else device_value(num_items, hidden.device)
            loss, vector, logps, entropy, *_ = library.fused_linear_grpo(
                hidden, weight, bias, completion_ids, inputs.mask if completion_mask is not None else None,
                inputs.advantages, inputs.old_logps, inputs.ref_logps, inputs.importance_sampling_ratio,
                inputs.sampling_logps, n, library.encode(config), *_head_args(head), head.grad_filter_eps,
                backend_name, *schedule, *needs,
            )  # fmt: skip
            metrics = dict(zip(library.metric_names(config), vector.detach().unbind(0), strict=True))
            return GRPOLossOutput(loss=loss, logps=logps.detach(), entropy=entropy.detach(), metrics=metrics)
        logps, entropy = _compiled_linear(hidden, weight, bias, completion_ids, inputs.mask, head)
        loss, metrics = _compiled_objective(logps, entropy, inputs, config, num_items)
        return GRPOLossOutput(loss=loss, logps=logps.detach(), entropy=entropy.detach(), metrics=metrics)
    from grpo_kernels.fused_linear import fused_linear_loss

    loss, logps, entropy, metrics = fused_linear_loss(
        hidden, weight, bias, completion_ids, inputs, config, head, num_items, masked=completion_mask is not None
    )
    return GRPOLossOutput(loss=loss, logps=logps, entropy=entropy, metrics=metrics)


def linear_logprobs(
    hidden: torch.Tensor,  # [B, T, H]
    weight: torch.Tensor,  # [V, H]
    ids: torch.Tensor,  # [B, T]
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    mask: torch.Tensor | None = None,  # [B, T]: tokens outside it are skipped and get 0
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    grad_filter_eps: float | str | None = None,
    vocab_process_group=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (and entropies) of `ids` from hidden states, without the logits; differentiable.

    For old and reference policies, or anyone who wants only the log-probs. Returns fp32 `[B, T]` (a pair with
    `return_entropy`). `grad_filter_eps`, `vocab_process_group`: as in `fused_linear_grpo_loss`."""
    hidden, weight, bias = _check_head(hidden, weight, bias)
    B, T, _ = hidden.shape
    head = _head_options(temperature, logit_scale, final_logit_softcapping, grad_filter_eps, hidden,
                         vocab_process_group)  # fmt: skip
    checks = ValueChecks()
    check_tensor("ids", ids, kind="int", shapes=((B, T),), device=hidden.device, shape_hint=f"[{B}, {T}]")
    check_ids(checks, "ids", ids, _vocab(weight, vocab_process_group), mask="mask")
    if mask is not None:
        check_tensor("mask", mask, kind="mask", shapes=((B, T),), device=hidden.device, shape_hint=f"[{B}, {T}]")
    mask = check_mask(checks, "mask", mask)
    checks.run()
    if vocab_process_group is not None:
        logps, entropy = _vocab_parallel(hidden, weight, bias, ids, mask, head, vocab_process_group)
    elif torch.compiler.is_compiling():
        logps, entropy = _compiled_linear(hidden, weight, bias, ids, mask, head)
    else:
        from grpo_kernels.fused_linear import LinearLogProbEntropyFunction, active_positions

        logps, entropy = LinearLogProbEntropyFunction.apply(hidden, weight, bias, ids, active_positions(mask), head)
    return (logps, entropy) if return_entropy else logps


def _head_options(temperature, logit_scale, softcap, grad_filter_eps, hidden: torch.Tensor, group) -> HeadOptions:
    eps = resolve_grad_filter_eps(grad_filter_eps, hidden.dtype)
    if eps is not None and group is not None:
        raise ValueError("grad_filter_eps is not supported with vocab_process_group: pass grad_filter_eps=None")
    return HeadOptions(temperature, logit_scale, softcap, eps)


def _compiled_linear(hidden, weight, bias, ids, mask, head: HeadOptions):
    """The two-pass linear log-probs as one custom op, for `torch.compile`."""
    from grpo_kernels import library

    logps, entropy, *_ = library.linear_logprobs_entropy(
        hidden, weight, bias, ids, mask, *_head_args(head), head.grad_filter_eps, _backend_name(hidden),
        *_linear_schedule(hidden),
    )  # fmt: skip
    return logps, entropy


def _vocab(weight: torch.Tensor, group) -> int:
    """The full vocabulary size: the weight's rows, times the ranks of a vocabulary-parallel group."""
    if group is None:
        return weight.shape[0]
    import torch.distributed as dist

    return weight.shape[0] * dist.get_world_size(group)


def _vocab_parallel(hidden, weight, bias, ids, mask, head: HeadOptions, group):
    """`[B, T]` log-probs and entropies through a vocabulary-parallel head, for the active tokens only."""
    from grpo_kernels.fused_linear import active_positions
    from grpo_kernels.parallel import VocabParallelLogProbs

    B, T, H = hidden.shape
    positions = active_positions(mask)
    flat, flat_ids = hidden.reshape(B * T, H), ids.reshape(-1)
    if positions is not None:
        flat, flat_ids = flat.index_select(0, positions), flat_ids.index_select(0, positions)
    logp, entropy = VocabParallelLogProbs.apply(flat, weight, bias, flat_ids, group, head)
    if positions is None:
        return logp.view(B, T), entropy.view(B, T)
    zeros = logp.new_zeros(B * T)
    return zeros.index_copy(0, positions, logp).view(B, T), zeros.index_copy(0, positions, entropy).view(B, T)
