"""Memory-efficient GRPO loss kernels with every option of TRL 1.16's GRPO loss.

from grpo_kernels import GRPOLossConfig, grpo_loss, group_advantages, selective_log_softmax
from grpo_kernels import LinearGRPOLoss, fused_linear_grpo_loss, linear_logprobs
"""

from grpo_kernels.backend import backend
from grpo_kernels.config import GRPOLossConfig, GRPOLossOutput, HeadOptions
from grpo_kernels.functional import (
    fused_linear_grpo_loss,
    group_advantages,
    grpo_loss,
    linear_logprobs,
    selective_log_softmax,
)
from grpo_kernels.fused_linear import head_options_from_config
from grpo_kernels.nn import LinearGRPOLoss

__version__ = "0.1.0"

__all__ = [
    "GRPOLossConfig",
    "GRPOLossOutput",
    "HeadOptions",
    "LinearGRPOLoss",
    "backend",
    "fused_linear_grpo_loss",
    "group_advantages",
    "grpo_loss",
    "head_options_from_config",
    "linear_logprobs",
    "selective_log_softmax",
]
