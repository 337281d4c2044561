"""Two GRPO steps of `GRPOTrainer` or `FusedGRPOTrainer` (argv[1]: "stock" or "fused") under DeepSpeed ZeRO-3, every
parameter partitioned; run by `accelerate launch` from tests/test_integration_trl.py. Rank 0 writes the logged losses
and the final full weights to argv[2]."""

from __future__ import annotations

import os
import sys

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from grpo_kernels.integrations.trl import FusedGRPOTrainer

VOCAB = ["<pad>", "<eos>", *"abcdefghij"]


def main(kind: str, out: str) -> None:
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    ))  # fmt: skip
    initial_head = model.lm_head.weight.detach().clone()
    path = os.path.join(os.path.dirname(out), f"model-{kind}-{os.environ.get('RANK', '0')}")  # the same on each rank
    model.save_pretrained(path)
    args = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(out), kind), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=6, use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
        max_steps=2, beta=0.04, optim="sgd", learning_rate=0.5, seed=0, loss_type="dapo",
    )  # fmt: skip
    cls = FusedGRPOTrainer if kind == "fused" else GRPOTrainer
    dataset = Dataset.from_dict({"prompt": ["abc", "bcd", "cde", "def"] * 4})
    trainer = cls(model=path, reward_funcs=lambda completions, **kw: [float(c.count("a")) for c in completions],
                  args=args, train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    import deepspeed

    engine = trainer.model_wrapped
    params = dict(engine.module.named_parameters())
    assert trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    assert params["lm_head.weight"].numel() == 0, "the head is not partitioned"
    with deepspeed.zero.GatheredParameters(list(params.values())):
        if trainer.accelerator.is_main_process:
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            weights = {n: p.detach().clone() for n, p in params.items()}
            torch.save({"losses": losses, "params": weights, "initial_head": initial_head}, out)
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # gloo's and DeepSpeed's threads can abort the interpreter's own exit ("terminate called without an active
    # exception") once everything above is done and written: leave without it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
