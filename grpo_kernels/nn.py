"""`torch.nn` modules over the functional API."""

from __future__ import annotations

import torch

from grpo_kernels.config import GRPOLossConfig, GRPOLossOutput, HeadOptions, resolve_grad_filter_eps
from grpo_kernels.functional import fused_linear_grpo_loss
from grpo_kernels.fused_linear import check_schedule, schedule


class LinearGRPOLoss(torch.nn.Module):
    """The fused linear GRPO loss as a module holding its `GRPOLossConfig` (and the head's logit transform, gradient
    filtering, and optionally the schedule: `strategy` and `chunk_mib` as `fused_linear.schedule` takes them; None
    leaves `GRPO_KERNELS_LINEAR` and `GRPO_KERNELS_CHUNK_MIB` in charge).

    loss_fn = LinearGRPOLoss(GRPOLossConfig(loss_type="dapo", beta=0.04))
    out = loss_fn(hidden, model.lm_head.weight, completion_ids, advantages, completion_mask, ref_logps=ref)
    """

    def __init__(
        self,
        config: GRPOLossConfig | None = None,
        *,
        logit_scale: float = 1.0,
        final_logit_softcapping: float | None = None,
        grad_filter_eps: float | str | None = None,
        strategy: str | None = None,
        chunk_mib: float | None = None,
    ) -> None:
        super().__init__()
        self.config = GRPOLossConfig() if config is None else config
        if not isinstance(self.config, GRPOLossConfig):
            raise TypeError(f"config must be a GRPOLossConfig; got {type(self.config).__name__}")
        # bad head options fail here, as the functions would fail at the first call
        HeadOptions(logit_scale=logit_scale, final_logit_softcapping=final_logit_softcapping,
                    grad_filter_eps=resolve_grad_filter_eps(grad_filter_eps, torch.float32))  # fmt: skip
        self.logit_scale = logit_scale
        self.final_logit_softcapping = final_logit_softcapping
        self.grad_filter_eps = grad_filter_eps
        check_schedule(strategy, chunk_mib)  # a bad value fails here, not at the first call
        self.schedule = (strategy, chunk_mib)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        completion_ids: torch.Tensor,
        advantages: torch.Tensor,
        completion_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> GRPOLossOutput:
        with schedule(*self.schedule):  # the backward keeps what the forward read
            return fused_linear_grpo_loss(
                hidden, weight, completion_ids, advantages, completion_mask, config=self.config,
                logit_scale=self.logit_scale, final_logit_softcapping=self.final_logit_softcapping,
                grad_filter_eps=self.grad_filter_eps, **kwargs,
            )  # fmt: skip

    def extra_repr(self) -> str:
        """The config, then the options that differ from their defaults."""
        options = {"logit_scale": (self.logit_scale, 1.0), "final_logit_softcapping": (self.final_logit_softcapping,
                   None), "grad_filter_eps": (self.grad_filter_eps, None), "strategy": (self.schedule[0], None),
                   "chunk_mib": (self.schedule[1], None)}  # fmt: skip
        return ", ".join([repr(self.config)] + [f"{k}={v!r}" for k, (v, default) in options.items() if v != default])
