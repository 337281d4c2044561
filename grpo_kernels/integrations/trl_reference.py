"""TRL 1.16's own loss code, run on given per-token log-probs and entropies: the behavioural oracle.

`GRPOTrainer._compute_loss` is called unchanged on a minimal stand-in for the trainer: one process, no gradient
accumulation, training mode. The model call is replaced by the tensors given, so TRL's loss math and ours see
identical inputs, and gradients flow back to them. The tests compare against it; the benchmarks time it as TRL's loss.

    loss, metrics = TRLLoss(GRPOLossConfig(loss_type="grpo", beta=0.04), use_vllm=False)(
        logps, entropy, completion_ids, advantages, mask, ref_logps=ref_logps)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import fields
from types import SimpleNamespace

import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from grpo_kernels import GRPOLossConfig


class _OneProcess:
    num_processes = 1
    sync_gradients = True

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


class TRLLoss:
    """Calls TRL's `_compute_loss` with our config; `metrics` holds what TRL logged."""

    _compute_loss = GRPOTrainer._compute_loss
    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask
    get_off_policy_mask = staticmethod(GRPOTrainer.get_off_policy_mask)
    get_gamma_weights = staticmethod(GRPOTrainer.get_gamma_weights)

    def __init__(self, config: GRPOLossConfig, use_vllm: bool) -> None:
        self.args = SimpleNamespace(**{f.name: getattr(config, f.name) for f in fields(config)}, steps_per_generation=1)
        for name in ("loss_type", "beta", "top_entropy_quantile", "off_policy_mask_threshold", "entropy_coef"):
            setattr(self, name, getattr(config, name))
        self.importance_sampling_level = config.importance_sampling_level
        self.max_completion_length = config.max_completion_length
        self.epsilon_low = config.epsilon
        self.epsilon_high = config.epsilon_high if config.epsilon_high is not None else config.epsilon
        self._entropy_bonus_enabled = config.entropy_coef != 0.0
        self.use_adaptive_entropy = False
        self.use_vllm = use_vllm
        self.vllm_importance_sampling_correction = True
        self.aux_loss_enabled = False
        self.current_gradient_accumulation_steps = 1
        self.accelerator = _OneProcess()
        self.model = SimpleNamespace(training=True)
        self._metrics = defaultdict(lambda: defaultdict(list))

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._logps, self._entropies, None

    def __call__(
        self,
        logps: torch.Tensor,
        entropy: torch.Tensor,
        completion_ids: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        old_logps=None,
        ref_logps=None,
        importance_sampling_ratio=None,
        sampling_logps=None,
        num_items_in_batch=None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        self._logps, self._entropies = logps, entropy
        B = logps.shape[0]
        inputs = {
            "prompt_ids": completion_ids.new_zeros((B, 0)),
            "prompt_mask": mask.new_zeros((B, 0)),
            "completion_ids": completion_ids,
            "completion_mask": mask,
            "advantages": advantages,
            "num_items_in_batch": torch.as_tensor(
                mask.sum() if num_items_in_batch is None else num_items_in_batch, dtype=torch.float32
            ),
        }
        optional = {
            "old_per_token_logps": old_logps,
            "ref_per_token_logps": ref_logps,
            "importance_sampling_ratio": importance_sampling_ratio,
            "sampling_per_token_logps": sampling_logps,
        }
        inputs.update({k: v for k, v in optional.items() if v is not None})
        self._metrics.clear()
        loss = self._compute_loss(None, inputs)
        return loss, {k: v[-1] for k, v in self._metrics["train"].items()}
