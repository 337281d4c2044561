"""The backbone and the LM head of Hugging Face causal language models, for losses that start from hidden states.

    backbone, lm_head = backbone_and_head(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, P + T, H]
    out = fused_linear_grpo_loss(
        hidden[:, -T - 1 : -1], lm_head.weight, completion_ids, advantages, completion_mask, bias=lm_head.bias,
        config=config, **head_kwargs(model),
    )

Only architectures whose `*ForCausalLM.forward` is `lm_head(backbone(...).last_hidden_state)`, followed at most by
the logit scale or soft-cap that `head_options_from_config` reads, are accepted: for any other, hidden states times
`lm_head.weight` would not be the model's logits.
"""

from __future__ import annotations

import torch

from grpo_kernels.fused_linear import head_options_from_config

# model_type -> the *ForCausalLM class checked to compute its logits as described above (transformers 5.x)
SUPPORTED_MODEL_TYPES = {
    "cohere": "CohereForCausalLM",  # logits * logit_scale
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",  # final_logit_softcapping
    "gemma3_text": "Gemma3ForCausalLM",  # final_logit_softcapping
    "glm4": "Glm4ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "granite": "GraniteForCausalLM",  # logits / logits_scaling
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmo": "OlmoForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "phi": "PhiForCausalLM",  # biased lm_head
    "phi3": "Phi3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM",
}


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT `PeftModel` (its `get_base_model()`), else `model` itself. Adapters stay
    injected in its layers, so the backbone it exposes runs them."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """`(backbone, lm_head)` of a causal LM: `backbone(...)` returns `last_hidden_state` `[B, S, H]`, and
    `lm_head.weight` `[V, H]` (with `lm_head.bias`, possibly None) turns it into the logits before the transform of
    `head_kwargs(model)`.

    Args:
        model: a transformers `*ForCausalLM` of a type in `SUPPORTED_MODEL_TYPES`, or a PEFT model wrapping one.

    Raises:
        ValueError: naming the model class, for an architecture not known to compute its logits that way.
    """
    inner = unwrap_peft(getattr(model, "_orig_mod", model))  # torch.compile's wrapper (TRL's torch_compile) too
    name = type(inner).__name__
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if SUPPORTED_MODEL_TYPES.get(model_type) != name:
        raise ValueError(
            f"backbone_and_head does not support {name} (model_type {model_type!r}): it knows the causal LMs "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES.values()))}. For another model, check that its forward computes "
            "the logits as lm_head(backbone(...).last_hidden_state), up to the transform head_options_from_config "
            "reads, and pass its backbone's hidden states and lm_head.weight to the loss yourself"
        )
    backbone, lm_head = inner.base_model, inner.get_output_embeddings()
    if type(lm_head).__name__ == "ModulesToSaveWrapper":
        raise ValueError(
            f"{name}'s lm_head is in PEFT's modules_to_save, whose wrapper keeps a trained copy of the head apart from "
            "the weight the fused loss reads: leave lm_head out of modules_to_save (and out of LoRA's target_modules)"
        )
    if backbone is inner or not isinstance(lm_head, torch.nn.Linear):
        raise ValueError(
            f"{name} has no separate backbone ({inner.base_model_prefix!r}) and nn.Linear output embeddings: got "
            f"{type(backbone).__name__} and {type(lm_head).__name__}"
        )
    return backbone, lm_head


def head_kwargs(model: torch.nn.Module) -> dict[str, float | None]:
    """`logit_scale` and `final_logit_softcapping` of the model's head, as keyword arguments of
    `fused_linear_grpo_loss` and `linear_logprobs` (see `head_options_from_config`)."""
    head = head_options_from_config(unwrap_peft(model).config)
    return {"logit_scale": head.logit_scale, "final_logit_softcapping": head.final_logit_softcapping}


def router_aux_loss(
    model: torch.nn.Module,
    router_logits: tuple[torch.Tensor, ...],  # one [tokens, num_experts] per MoE layer
    attention_mask: torch.Tensor | None,  # [B, S]
) -> torch.Tensor:
    """The load-balancing loss of a Mixture-of-Experts model from its backbone's router logits, as its
    `*ForCausalLM.forward` (and TRL 1.16's fused LM head) computes it: Mixtral's `load_balancing_loss_func`."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    inner = unwrap_peft(model)
    text = inner.config.get_text_config()
    num_experts = getattr(text, "num_experts", None) or inner.num_experts
    top_k = getattr(text, "num_experts_per_tok", None) or inner.num_experts_per_tok
    return load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)
