"""`FusedGRPOTrainer`: TRL 1.16's `GRPOTrainer` with its loss, and its old and reference log-probs, computed by
grpo_kernels from the backbone's hidden states and `lm_head.weight`.

    from grpo_kernels.integrations.trl import FusedGRPOTrainer

    trainer = FusedGRPOTrainer(model="Qwen/Qwen3-0.6B", reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds)
    trainer.train()

It is built exactly like `GRPOTrainer` and trains the same objective: every loss option of the `GRPOConfig` goes to
`fused_linear_grpo_loss` (`GRPOLossConfig.from_trl`), with TRL's normalisation for gradient accumulation, several
processes and `steps_per_generation`, the vLLM importance-sampling correction, the entropy mask and (adaptive) entropy
bonus, the off-policy mask, tool masks and the MoE auxiliary loss, and it logs TRL's loss metrics under TRL's names,
reduced across processes as TRL reduces them. Generation, rewards and advantages are TRL's own.

What it cannot compute the same way raises a `ValueError` when the trainer is built: `use_liger_kernel=True`,
vision-language models and multimodal inputs, model types `backbone_and_head` does not know, and
`top_entropy_quantile < 1` on several processes (TRL takes that quantile over all processes' tokens, our loss over
the local ones).

Under DeepSpeed ZeRO-3 the loss runs as the LM head's own forward, so DeepSpeed's hooks gather the partitioned head
weight for it and again for its backward, and the gradient goes back to the partitions as DeepSpeed's own modules'
do (tested with two gloo processes against `GRPOTrainer` under ZeRO-3).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers import ProcessorMixin
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from grpo_kernels import GRPOLossConfig, GRPOLossOutput, fused_linear_grpo_loss, linear_logprobs
from grpo_kernels.config import HeadOptions, resolve_grad_filter_eps
from grpo_kernels.integrations.models import backbone_and_head, head_kwargs, router_aux_loss, unwrap_peft

# loss types TRL normalises by the token count of the whole generation batch (`num_items_in_batch`)
_TOKEN_NORMALISED = ("dapo", "cispo", "vespo")
_MULTIMODAL_INPUTS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip
# TRL's loss metrics in the order it logs them; the means are reduced as sums and counts across processes
_CLIP_MEANS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
_MEAN_METRICS = ("kl", "entropy", *_CLIP_MEANS, "cispo_clip_ratio", "vespo/phi_seq_mean")
_METRIC_ORDER = ("kl", "entropy", *_CLIP_MEANS, "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio",
                 "vespo/phi_seq_mean")  # fmt: skip


def _reject_multimodal(inputs: dict[str, Any]) -> None:
    given = [k for k in _MULTIMODAL_INPUTS if inputs.get(k) is not None]
    if given:
        raise ValueError(f"FusedGRPOTrainer takes text-only inputs; got {', '.join(given)}: use trl.GRPOTrainer")


def _add_hidden_state_forward(model: torch.nn.Module, cast_lm_head_to_fp32: bool) -> None:
    """Let `model(..., logits_to_keep=T, grpo_head=fn)` run the backbone only and return
    `(fn(hidden, weight, bias), aux_loss)`: `hidden` `[B, T, H]` are the states that predict the last T tokens,
    `weight`/`bias` the LM head's, `aux_loss` the MoE load-balancing loss (None unless router logits are requested).
    Calls without `grpo_head` go to the model's previous forward, so generation is unchanged. The loss thus runs inside
    the model's forward, under DDP as TRL's fused LM head does."""
    previous = model.forward
    text_config = model.config.get_text_config()

    @functools.wraps(type(model).forward)
    def forward(self, *args, grpo_head=None, **kwargs):
        if grpo_head is None:
            return _previous_forward(self, model, previous)(*args, **kwargs)
        keep = kwargs.pop("logits_to_keep")
        kwargs.pop("labels", None)  # PEFT wrappers pass labels=None
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone, lm_head = backbone_and_head(self)  # looked up per call: FSDP and PEFT replace modules
        outputs = backbone(*args, **kwargs)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = router_aux_loss(self, outputs.router_logits, kwargs.get("attention_mask"))

        def head(hidden: torch.Tensor) -> tuple:
            weight, bias = lm_head.weight, lm_head.bias
            if isinstance(weight, DTensor):  # FSDP2 shards the head: gather it, as TRL's fused LM head does
                weight = weight.full_tensor()
                bias = None if bias is None else bias.full_tensor()
            hidden = hidden.to(weight.device)
            if not cast_lm_head_to_fp32:
                return grpo_head(hidden, weight, bias)
            with torch.autocast(hidden.device.type, enabled=False):
                return grpo_head(hidden.float(), weight, bias)

        return _as_forward_of(lm_head, head, outputs.last_hidden_state[:, -keep - 1 : -1]), aux_loss

    model.forward = types.MethodType(forward, model)


def _previous_forward(module: torch.nn.Module, patched: torch.nn.Module, previous):
    """The forward that `_add_hidden_state_forward` replaced, for `module`: `patched`'s own, or for a copy of it
    (`copy.deepcopy` rebinds the replacement to the copy, whose weights must then run) the same method bound to the
    copy, or its class's forward where the replaced one was no method of `patched`."""
    if module is patched:
        return previous
    if isinstance(previous, types.MethodType) and previous.__self__ is patched:
        return types.MethodType(previous.__func__, module)
    return types.MethodType(type(module).forward, module)


def _as_forward_of(module: torch.nn.Module, fn, *args) -> tuple:
    """`fn(*args)` called as `module`'s forward, so that the hooks an engine keeps on the module run around it:
    DeepSpeed ZeRO-3 gathers the partitioned head weight before the forward and again before the backward, which
    reads it. `fn` returns a tuple of tensors (and dicts of them), the outputs such hooks can follow."""
    own = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _logprobs_head(hidden, weight, bias, *, ids, mask, temperature: float, head: dict) -> tuple[torch.Tensor, ...]:
    """`(logps, entropy)` `[B, T]` of `ids` (0 where `mask` is 0) from the states that predict them."""
    ids, mask = ids.to(weight.device), mask.to(weight.device)
    return linear_logprobs(
        hidden, weight, ids, bias=bias, temperature=temperature, return_entropy=True, mask=mask, **head
    )


def _loss_head(hidden, weight, bias, *, tensors: dict[str, torch.Tensor | None], **options) -> tuple:
    """`fused_linear_grpo_loss` on the head's device (the backbone may end on another one under `device_map`), as the
    tuple `(loss, logps, entropy, metrics)` of its `GRPOLossOutput`."""
    moved = {k: None if v is None else v.to(weight.device) for k, v in tensors.items()}
    out = fused_linear_grpo_loss(hidden, weight, bias=bias, **moved, **options)
    return out.loss, out.logps, out.entropy, out.metrics


class FusedGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose loss and log-prob passes never materialise the logits.

    Args:
        *args, **kwargs: exactly those of `trl.GRPOTrainer` (TRL 1.16).
        grad_filter_eps: gradient filtering of the head's backward, as in `fused_linear_grpo_loss` (approximate;
            None, the default, is exact).

    Raises:
        ValueError: for an option or model it cannot honour exactly (see the module's documentation).
    """

    def __init__(self, *args: Any, grad_filter_eps: float | str | None = None, **kwargs: Any) -> None:
        # a bad value fails here, not at the first step ("auto" resolves per step, from the hidden states' dtype)
        HeadOptions(grad_filter_eps=resolve_grad_filter_eps(grad_filter_eps, torch.float32))
        self._grad_filter_eps = grad_filter_eps
        given = inspect.signature(GRPOTrainer.__init__).bind(self, *args, **kwargs).arguments
        if given.get("args") is not None and given["args"].use_liger_kernel:
            raise ValueError(
                "use_liger_kernel=True is not supported by FusedGRPOTrainer, which computes the loss from the "
                "hidden states itself: set use_liger_kernel=False"
            )
        if isinstance(given.get("processing_class"), ProcessorMixin):
            raise ValueError("FusedGRPOTrainer supports text-only models: a processor (multimodal) was given")
        super().__init__(*args, **kwargs)
        if self._is_vlm:
            raise ValueError("FusedGRPOTrainer supports text-only models: the model's processing class is multimodal")
        if self.top_entropy_quantile < 1.0 and self.accelerator.num_processes > 1:
            raise ValueError(
                f"top_entropy_quantile={self.top_entropy_quantile} on {self.accelerator.num_processes} processes: TRL "
                "takes the entropy quantile over every process's tokens and the fused loss over the local ones; set "
                "top_entropy_quantile=1.0 or run one process"
            )
        self._loss_config = GRPOLossConfig.from_trl(self.args)
        policy = unwrap_peft(self.model)
        backbone_and_head(policy)
        self._head_transform = head_kwargs(policy)
        _add_hidden_state_forward(policy, self.args.cast_lm_head_to_fp32)
        if self.ref_model is not None:
            ref = getattr(self.ref_model, "module", self.ref_model)  # under DeepSpeed, TRL hands over its engine
            backbone_and_head(ref)
            _add_hidden_state_forward(ref, self.args.cast_lm_head_to_fp32)

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids: torch.Tensor,  # [B, P + T]
        attention_mask: torch.Tensor,  # [B, P + T]
        logits_to_keep: int,  # T
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **multimodal: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """TRL's log-prob pass (old and reference policies) by `linear_logprobs`: per-token log-probs `[B, T]` of the
        last T tokens (0 where `attention_mask` is 0), entropies if asked, and the MoE auxiliary loss if asked.

        Args:
            model: the policy or reference model (possibly wrapped); input_ids, attention_mask: prompt + completion;
            logits_to_keep: T, the completion length; batch_size: rows per forward (default all);
            compute_entropy, compute_aux_loss: also return those; multimodal: must all be None.
        """
        _reject_multimodal(multimodal)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies, aux_losses = [], [], []
        extra = {"output_router_logits": True} if compute_aux_loss else {}
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            head = functools.partial(
                _logprobs_head, ids=ids[:, -logits_to_keep:], mask=mask[:, -logits_to_keep:],
                temperature=self.temperature, head=self._head_transform,
            )  # fmt: skip
            with self.accelerator.autocast():
                (lp, ent), aux = model(
                    input_ids=ids, attention_mask=mask, logits_to_keep=logits_to_keep, grpo_head=head, **extra
                )
            logps.append(lp)
            entropies.append(ent)
            aux_losses.append(aux)
        return (
            torch.cat(logps),
            torch.cat(entropies) if compute_entropy else None,
            torch.stack(aux_losses).mean() if compute_aux_loss else None,
        )

    def _applied_entropy_coef(self) -> float:
        """The entropy bonus's weight for this micro-batch, as TRL gates it."""
        if self.use_adaptive_entropy:
            return self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        return self.entropy_coef

    def _compute_loss(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's `_compute_loss` by `fused_linear_grpo_loss`: the same loss, gradients and metrics.

        Args:
            model: the policy (possibly wrapped by DDP); inputs: a micro-batch of `_generate_and_score_completions`.
        """
        _reject_multimodal(inputs)
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1

        # Our loss divides sum(m * l) by max(num_items_in_batch, 1) for the token-normalised types and has no
        # accumulation scaling; TRL's `loss - coef * H` has the policy term divided by its normaliser (for those types
        # the generation batch's token count, rescaled to one accumulation window) and the entropy mean H by the
        # accumulation factor only. `scale` and the rescaled coefficient reproduce both.
        num_items = None
        if self.loss_type in _TOKEN_NORMALISED:
            normalizer = max(float(inputs["num_items_in_batch"]), 1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer *= accumulation / self.args.steps_per_generation
            num_items, scale = normalizer, max(normalizer, 1.0) / normalizer
        else:
            scale = 1.0 / accumulation
        config = dataclasses.replace(
            self._loss_config, entropy_coef=self._applied_entropy_coef() / (accumulation * scale)
        )

        ratio = None
        if self.loss_type == "vespo":
            ratio = inputs.get("importance_sampling_ratio")
        elif self.use_vllm and self.vllm_importance_sampling_correction:
            ratio = inputs["importance_sampling_ratio"]
        tensors = {
            "completion_ids": completion_ids,
            "advantages": inputs["advantages"],
            "completion_mask": mask,
            "old_logps": inputs.get("old_per_token_logps"),
            "ref_logps": inputs.get("ref_per_token_logps"),
            "importance_sampling_ratio": ratio,
            "sampling_logps": inputs.get("sampling_per_token_logps"),
        }
        head = functools.partial(
            _loss_head, tensors=tensors, config=config, num_items_in_batch=num_items,
            grad_filter_eps=self._grad_filter_eps, **self._head_transform,
        )  # fmt: skip
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        with self.accelerator.autocast():
            out, aux_loss = model(
                input_ids=torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                attention_mask=torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
                logits_to_keep=completion_ids.size(1),
                grpo_head=head,
                **extra,
            )
        out = GRPOLossOutput(*out)
        loss = out.loss * scale

        metrics = self._metrics[mode]
        if self._entropy_bonus_enabled:
            policy_loss = out.metrics.get("policy_loss", out.loss.detach())
            if self.loss_type in _TOKEN_NORMALISED:
                policy_loss = policy_loss * scale
            metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if self.use_adaptive_entropy and mode == "train":
                self._update_adaptive_entropy(out.entropy, mask)
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_loss_metrics(mode, out.metrics, mask, inputs["advantages"])
        return loss

    def _update_adaptive_entropy(self, entropy: torch.Tensor, mask: torch.Tensor) -> None:
        """TRL's adaptive entropy controller: accumulate the window's entropy, and at an optimizer step move
        `entropy_coef` towards `entropy_target`."""
        effective = mask
        if self.top_entropy_quantile < 1.0:
            effective = mask * self.get_high_entropy_mask(entropy, mask, 1 - self.top_entropy_quantile)
        stats = torch.stack([(entropy * effective).sum(), effective.sum().float()])
        self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        if not self.accelerator.sync_gradients:
            return
        window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
        if world_entropy <= self.args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
        self._last_world_entropy = world_entropy
        self._entropy_window_stats = None

    def _log_loss_metrics(
        self, mode: str, values: dict[str, torch.Tensor], mask: torch.Tensor, advantages: torch.Tensor
    ) -> None:
        """Log the loss's metrics as TRL does: means over every process's tokens (or sequences, for per-sequence
        quantities), and the min / max of the per-sequence clip ratios over all processes."""
        per_sequence = {"vespo/phi_seq_mean"}
        if self.importance_sampling_level == "sequence":
            per_sequence.update((*_CLIP_MEANS, "cispo_clip_ratio"))
        if advantages.dim() == 2 and advantages.size(1) != 1:  # [B, T] advantages make every metric per token
            per_sequence.clear()
        rows = torch.tensor(float(mask.size(0)), device=mask.device)
        tokens = mask.sum().float()
        means = [k for k in _MEAN_METRICS if k in values]
        if mask.size(1) == 1:  # one token a row: TRL (and the loss's metrics) average every quantity over the rows
            per_sequence.update(means)
        counts = torch.stack([rows if k in per_sequence else tokens for k in means])
        sums = torch.stack([values[k].float() for k in means]) * counts.clamp(min=1.0)  # our means -> local sums
        totals = self.accelerator.reduce(torch.stack([sums, counts]), reduction="sum")
        logged = dict(zip(means, (totals[0] / totals[1].clamp(min=1.0)).tolist(), strict=True))
        if "clip_ratio/low_min" in values:
            logged["clip_ratio/low_min"] = nanmin(self.accelerator.gather(values["clip_ratio/low_min"])).item()
            logged["clip_ratio/high_max"] = nanmax(self.accelerator.gather(values["clip_ratio/high_max"])).item()
        for name in _METRIC_ORDER:
            if name in logged:
                self._metrics[mode][name].append(logged[name])
