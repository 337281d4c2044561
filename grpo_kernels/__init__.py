"""Memory-efficient GRPO loss kernels with every option of TRL 1.16's GRPO loss.

from grpo_kernels import GRPOLossConfig, grpo_loss, group_advantages, selective_log_softmax
"""

from grpo_kernels.backend import backend
from grpo_kernels.config import GRPOLossConfig, GRPOLossOutput
from grpo_kernels.functional import group_advantages, grpo_loss, selective_log_softmax

__version__ = "0.1.0"

__all__ = [
    "GRPOLossConfig",
    "GRPOLossOutput",
    "backend",
    "group_advantages",
    "grpo_loss",
    "selective_log_softmax",
]
