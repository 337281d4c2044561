"""The fused GRPO loss in a plain PyTorch loop over a Hugging Face model: hidden states from the backbone, the loss from
them and `lm_head.weight` (no logits), `backward()`, an optimizer step. Offline, on a CPU, in a few seconds:

    python examples/plain_loop.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo_kernels import GRPOLossConfig, fused_linear_grpo_loss, group_advantages


def main(steps: int = 3) -> list[float]:
    """Train a tiny random Llama for `steps` GRPO steps on a toy reward; returns the gradient norms."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    model = LlamaForCausalLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = GRPOLossConfig(loss_type="dapo", epsilon_high=0.28)
    G, P, T = 8, 6, 12  # completions per prompt, prompt length, completion length
    prompt = torch.randint(3, cfg.vocab_size, (1, P)).expand(G, P)
    norms = []
    for step in range(steps):
        with torch.no_grad():
            ids = model.generate(prompt, do_sample=True, max_new_tokens=T, min_new_tokens=T, pad_token_id=0)
        completion = ids[:, P:]  # [G, T]
        rewards = (completion % 2 == 0).float().mean(-1)  # toy reward: the share of even token ids
        advantages = group_advantages(rewards, num_generations=G)
        hidden = model.model(input_ids=ids).last_hidden_state[:, P - 1 : -1]  # position t predicts completion token t
        out = fused_linear_grpo_loss(hidden, model.lm_head.weight, completion, advantages, config=config)
        out.loss.backward()  # here the loss is 0 (ratios 1, advantages summing to 0), its gradient is not
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        norms.append(grad_norm.item())
        print(f"step {step}: reward {rewards.mean().item():.3f}, gradient norm {grad_norm.item():.4f}")
    return norms


if __name__ == "__main__":
    main()
