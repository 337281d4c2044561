"""A thin GRPO trainer on the fused GRPO loss: memory that does not grow with the vocabulary.

python -m trainer                      # a tiny model learns single-digit addition on a CPU
python -m trainer --help               # every option
accelerate launch -m trainer ...       # several processes / GPUs (DDP; FSDP2 with --fsdp)

from trainer import Trainer, TrainerConfig
Trainer(TrainerConfig(max_steps=50, output_dir="runs/a")).train()
"""

from trainer.config import TrainerConfig, parse_config
from trainer.loop import Trainer, plan_microbatches
from trainer.model import estimate_memory, format_memory

__all__ = ["Trainer", "TrainerConfig", "estimate_memory", "format_memory", "parse_config", "plan_microbatches"]
