"""The policy: loading, the forward pass to hidden states, the fused loss on them, and the memory estimate.

The model never produces logits during training: `Policy.forward` runs the backbone (`model.model`) for hidden
states, gathers the positions that predict completion tokens, and hands them with `lm_head.weight` to
`fused_linear_grpo_loss` (or to `linear_logprobs` for the old and reference policies). A micro-batch is either
right-padded rows or, with packing, one row of concatenated sequences with per-sequence position ids, which
transformers turns into a document mask (flash-attn's varlen path, flex_attention's block mask, or SDPA's dense mask).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from grpo_kernels import GRPOLossConfig, GRPOLossOutput, backend, fused_linear_grpo_loss, linear_logprobs
from grpo_kernels.fused_linear import linear_strategy, schedule, workspace_bytes
from grpo_kernels.integrations.models import backbone_and_head, head_kwargs, unwrap_peft
from trainer.config import SetupError, TrainerConfig, first_line
from trainer.data import ByteTokenizer, Example, HFTokenizer, noisy_sums

TINY_MODEL = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, name)


def tiny_model_config(tokenizer: ByteTokenizer, max_positions: int):
    """A two-layer Llama on the byte vocabulary: 0.15 M parameters, trains on a CPU."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=max_positions,
        num_key_value_heads=TINY_MODEL["num_attention_heads"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **TINY_MODEL,
    )


# In a checkpoint of a model on `ByteTokenizer`'s vocabulary (the built-in tiny model): `--model` then loads that
# tokenizer, which transformers does not know
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


def _pretrained(model: str, what: str, load):
    """`load()` for `--model model`, its failures (no such directory, no network, not a model) as a `SetupError`."""
    if model.startswith(("./", "../", "/", "~")) and not Path(model).expanduser().is_dir():
        raise SetupError(f"--model {model}: no such directory")
    try:
        return load()
    except (OSError, ValueError) as err:
        raise SetupError(f"--model {model}: cannot load its {what}: {first_line(err, type(err).__name__)}") from err


def model_config(cfg: TrainerConfig):
    """The transformers config of the model to train (downloads only the config of a Hub model)."""
    if cfg.model is None:
        return tiny_model_config(ByteTokenizer(), cfg.max_prompt_length + cfg.max_completion_length)
    from transformers import AutoConfig

    return _pretrained(cfg.model, "config", lambda: AutoConfig.from_pretrained(cfg.model))


def pretrain(
    model: nn.Module, tokenizer: ByteTokenizer, examples: Sequence[Example], steps: int, seed: int, batch_size: int = 64
) -> None:
    """Next-token pretraining of the tiny model on `noisy_sums` of `examples` (answers right 40% of the time), the
    loss on the answer and EOS only; deterministic given `seed`."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    from accelerate import PartialState
    from tqdm.auto import tqdm

    shown = steps > 0 and PartialState().is_main_process
    for _ in tqdm(range(steps), desc="pretraining", unit="step", leave=False, disable=not shown, dynamic_ncols=True):
        rows = []
        for e in noisy_sums(examples, batch_size, 0.4, rng):
            prompt = tokenizer.encode_prompt(e.prompt)
            rows.append((prompt, [*e.answer.encode(), tokenizer.eos_token_id]))
        L = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), L), tokenizer.pad_token_id)
        labels = torch.full((len(rows), L), -100)
        for i, (p, a) in enumerate(rows):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # no gradient left behind for GRPO's first step


def load_model(
    cfg: TrainerConfig, device: torch.device, examples: Sequence[Example]
) -> tuple[nn.Module, ByteTokenizer | HFTokenizer]:
    """The model to train, on `device`, and its tokenizer: the tiny model (initialised from `cfg.seed` and pretrained
    for `cfg.pretrain_steps` steps on `examples`) or a Hugging Face one; with LoRA adapters when `cfg.lora_r > 0`, with
    gradient checkpointing when asked for."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.model is None:
        tokenizer: ByteTokenizer | HFTokenizer = ByteTokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(model_config(cfg), dtype=dtype, attn_implementation="sdpa")
            model.to(device)
            pretrain(model, tokenizer, examples, cfg.pretrain_steps, cfg.seed)
    else:
        from transformers import AutoTokenizer

        if (Path(cfg.model).expanduser() / BYTE_TOKENIZER_FILE).is_file():  # a checkpoint of the tiny model
            tokenizer = ByteTokenizer()
        else:
            hf = _pretrained(cfg.model, "tokenizer", lambda: AutoTokenizer.from_pretrained(cfg.model))
            tokenizer = HFTokenizer(hf, cfg.chat_template)
        if (Path(cfg.model).expanduser() / "adapter_config.json").is_file():  # a checkpoint of a LoRA run
            model = _merged_adapters(cfg.model, device).to(dtype)
        else:
            model = _pretrained(cfg.model, "weights", lambda: AutoModelForCausalLM.from_pretrained(
                cfg.model, dtype=dtype, attn_implementation="sdpa"))  # fmt: skip
    model.to(device)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora_r:
        if importlib.util.find_spec("peft") is None:
            raise ImportError("lora_r > 0 needs peft: pip install peft")
        from peft import LoraConfig, get_peft_model

        target = cfg.lora_target_modules
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            target_modules=target[0] if target == ["all-linear"] else target,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model, tokenizer


def _merged_adapters(model: str, device: torch.device) -> nn.Module:
    """The model a LoRA run's checkpoint `model` holds: its base model, the adapters merged into it. The base is the
    one its adapter config names, or (the built-in tiny model, which has no name) rebuilt as that run built it, from
    the options it saved."""
    if importlib.util.find_spec("peft") is None:
        raise SetupError(f"--model {model}: holds LoRA adapters, which need peft: pip install peft")
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.config import CONFIG_FILE, saved_options
    from trainer.data import arithmetic_examples, dataset_examples

    path = Path(model).expanduser()
    base_name = _pretrained(model, "adapter config", lambda: PeftConfig.from_pretrained(str(path)))
    base_name = base_name.base_model_name_or_path
    if base_name is not None:
        base = _pretrained(base_name, "weights", lambda: AutoModelForCausalLM.from_pretrained(
            base_name, attn_implementation="sdpa"))  # fmt: skip
    elif (path / BYTE_TOKENIZER_FILE).is_file() and (path / CONFIG_FILE).is_file():
        names = {f.name for f in fields(TrainerConfig)}
        run = TrainerConfig(**{k: v for k, v in saved_options(path).items() if k in names})
        run = replace(run, lora_r=0, gradient_checkpointing=False)
        examples = (arithmetic_examples() if run.dataset is None else
                    dataset_examples(run.dataset, run.dataset_config, run.dataset_split, run.prompt_column,
                                     run.answer_column))  # fmt: skip
        base, _ = load_model(run, device, examples)
    else:
        raise SetupError(f"--model {model}: LoRA adapters whose base model is not named in adapter_config.json")
    merged = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    return merged.requires_grad_(True)  # peft froze the base to load adapters for inference


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a `Policy` and a peft wrapper."""
    return unwrap_peft(model.model if isinstance(model, Policy) else model)


def reference_model(cfg: TrainerConfig, model: nn.Module) -> nn.Module | None:
    """The frozen reference policy: None when `beta == 0` (no KL term) or under LoRA (the policy with its adapters
    disabled is the reference); otherwise a frozen copy of the initial weights."""
    if cfg.beta == 0.0 or cfg.lora_r:
        return None
    ref = copy.deepcopy(causal_lm(model)).eval()  # in eval mode, activation checkpointing is off
    return ref.requires_grad_(False)


def packed_attention(device: torch.device) -> str:
    """The attention that runs packed sequences: flash-attn's varlen kernel when installed, flex_attention on CUDA,
    else SDPA with a dense document mask (PyTorch 2.13's flex_attention has no backward on CPU)."""
    if device.type == "cuda":
        return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "flex_attention"
    return "sdpa"


@contextlib.contextmanager
def attention(model: nn.Module, implementation: str) -> Iterator[None]:
    """Run the block with another attention implementation."""
    lm = causal_lm(model)
    before = lm.config._attn_implementation
    if implementation == before:
        yield
        return
    lm.set_attn_implementation(implementation)
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


@dataclass
class MicroBatch:
    """Whole sequences (prompt + completion) laid out for one forward pass.

    Attributes:
        input_ids: `[b, L]` right-padded rows, or `[1, N]` packed sequences.
        attention_mask: `[b, L]`, None when packed (the position ids mark the sequences).
        position_ids: `[b, L]` or `[1, N]`, restarting at 0 in every sequence.
        index: `[b, T]` flat positions (in `input_ids.reshape(-1)`) of the tokens whose hidden states predict each
            completion token, 0 where the completion is shorter than `T`.
        completion_ids: `[b, T]` completion tokens, right-padded.
        completion_mask: `[b, T]` 1 on completion tokens.
        rows: `[b]` the rows of the rollout these sequences are.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    index: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    rows: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel() if self.attention_mask is None else int(self.attention_mask.sum())

    @staticmethod
    def build(
        prompts: Sequence[torch.Tensor],  # [p_i] each
        completions: Sequence[torch.Tensor],  # [c_i] each
        rows: Sequence[int],
        *,
        packed: bool,
        pad_token_id: int,
        device: torch.device,
    ) -> MicroBatch:
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
        T = max(len(c) for c in completions)
        b = len(rows)
        completion_ids = torch.full((b, T), pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros((b, T), dtype=torch.long)
        index = torch.zeros((b, T), dtype=torch.long)
        if packed:
            input_ids = torch.cat([torch.cat([p, c]) for p, c in zip(prompts, completions, strict=True)])[None]
            position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
            attention_mask = None
            starts = [0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()]
        else:
            L = max(lengths)
            input_ids = torch.full((b, L), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((b, L), dtype=torch.long)
            for j, (p, c) in enumerate(zip(prompts, completions, strict=True)):
                input_ids[j, : lengths[j]] = torch.cat([p, c])
                attention_mask[j, : lengths[j]] = 1
            position_ids = torch.arange(L).expand(b, L)
            starts = [j * L for j in range(b)]
        for j, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            completion_ids[j, : len(c)] = c
            completion_mask[j, : len(c)] = 1
            index[j, : len(c)] = starts[j] + len(p) - 1 + torch.arange(len(c))
        tensors = (input_ids, attention_mask, position_ids, index, completion_ids, completion_mask)
        moved = [None if t is None else t.to(device) for t in tensors]
        return MicroBatch(*moved, rows=torch.as_tensor(list(rows), device=device))


@dataclass
class LossInputs:
    """What the loss needs besides the micro-batch's tokens; tensors cover the micro-batch's rows."""

    config: GRPOLossConfig
    advantages: torch.Tensor  # [b]
    old_logps: torch.Tensor | None = None  # [b, T]
    ref_logps: torch.Tensor | None = None  # [b, T]
    num_items_in_batch: float | None = None


class Policy(nn.Module):
    """A causal LM whose forward returns the GRPO loss (or per-token log-probs) of a micro-batch, from hidden states.

    The loss is formed inside `forward` so that DDP and FSDP see every parameter use, the LM head's included.
    """

    def __init__(self, model: nn.Module, packed_attention: str | None = None, grad_filter_eps: float | None = None,
                 loss_strategy: str | None = None, loss_chunk_mib: float | None = None):  # fmt: skip
        super().__init__()
        self.model = model
        self.packed_attention = packed_attention
        self.grad_filter_eps = grad_filter_eps  # the loss's backward only
        self.schedule = (loss_strategy, loss_chunk_mib)  # the fused loss's (None: the environment's)
        backbone_and_head(model)  # fails early, naming the model, for an architecture it does not know
        self.head = head_kwargs(model)

    def hidden_states(self, mb: MicroBatch) -> torch.Tensor:  # [b, T, H]
        """Hidden states of the positions that predict the completion tokens."""
        backbone, _ = backbone_and_head(self.model)
        with contextlib.ExitStack() as stack:
            if mb.attention_mask is None and self.packed_attention is not None:
                stack.enter_context(attention(self.model, self.packed_attention))
            out = backbone(
                input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids, use_cache=False
            )
        hidden = out.last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])[mb.index]

    def forward(self, mb: MicroBatch, loss: LossInputs | None = None, temperature: float = 1.0):
        """`GRPOLossOutput` of the micro-batch when `loss` is given, else its `[b, T]` fp32 log-probs (0 off the
        completion mask) at `temperature`."""
        hidden = self.hidden_states(mb)
        _, head = backbone_and_head(self.model)
        kernels = backend("torch") if hidden.device.type == "cpu" else contextlib.nullcontext()
        with kernels, schedule(*self.schedule):  # the loss's backward keeps what its forward read
            if loss is None:
                return linear_logprobs(
                    hidden, head.weight, mb.completion_ids, bias=head.bias, mask=mb.completion_mask,
                    temperature=temperature, **self.head,
                )  # fmt: skip
            out: GRPOLossOutput = fused_linear_grpo_loss(
                hidden, head.weight, mb.completion_ids, loss.advantages, mb.completion_mask, bias=head.bias,
                config=loss.config, old_logps=loss.old_logps, ref_logps=loss.ref_logps,
                num_items_in_batch=loss.num_items_in_batch, grad_filter_eps=self.grad_filter_eps, **self.head,
            )  # fmt: skip
        return out

    def generate(self, **kwargs) -> torch.Tensor:
        """The wrapped model's `generate`; under FSDP2 a forward method of the sharded root, so that it gathers the
        embeddings and the head the way `forward` does."""
        return self.model.generate(**kwargs)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of the classes transformers keeps whole when it splits a model
    (`_no_split_modules`, e.g. `LlamaDecoderLayer`)."""
    lm = causal_lm(model)
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"--fsdp: {type(lm).__name__} names no decoder layer class (_no_split_modules is "
                         f"{sorted(names)}), so there is nothing to shard per layer")  # fmt: skip
    return layers


def shard(policy: Policy, device: torch.device, world: int) -> Policy:
    """Shard `policy`'s weights over the `world` processes of the default process group with FSDP2: each decoder layer
    is a group of its own (gathered for its forward and backward, then freed), the rest (embeddings, final norm, LM
    head) the root's. Inside `forward` and `generate` the weights are plain tensors; outside they are `DTensor`s
    sharded on dim 0, and so are their gradients. The weights are the first process's, as under DDP (each process may
    have initialised e.g. LoRA adapters from its own random state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world,))
    first = policy.state_dict() if mesh.get_rank() == 0 else {}
    for layer in decoder_layers(policy.model):
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    register_fsdp_forward_method(policy, "generate")
    set_model_state_dict(policy, first, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return policy


def sharding_summary(module: nn.Module) -> str:
    """How `module`'s parameters are laid out: how many are `DTensor`s sharded on dim 0, over how many processes, and
    the share of the values this process holds."""
    from torch.distributed.tensor import DTensor, Shard

    params = list(module.parameters())
    sharded = [p for p in params if isinstance(p, DTensor) and p.placements == (Shard(0),)]
    meshes = sorted({p.device_mesh.size() for p in sharded})
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    total = sum(p.numel() for p in params)
    return (f"{len(sharded)} of {len(params)} parameters are DTensors sharded over {'/'.join(map(str, meshes))} "
            f"processes; this process holds {local:,} of {total:,} values")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------------------------------


OPTIMIZER_STATE = {
    "adamw": "two moments per trainable parameter",
    "adafactor": "a row and a column of second moments per weight matrix, one per other parameter",
    "sgd": "none",
}


def make_optimizer(cfg: TrainerConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """`cfg.optimizer` over `params`: AdamW, PyTorch's Adafactor, or plain SGD."""
    kind = {"adamw": torch.optim.AdamW, "adafactor": torch.optim.Adafactor, "sgd": torch.optim.SGD}[cfg.optimizer]
    return kind(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def optimizer_state_values(optimizer: str, shapes: list[tuple[int, ...]]) -> int:
    """Values of state the optimizer keeps for parameters of these shapes (each in the parameter's dtype; step
    counters aside): AdamW two per value; Adafactor, for a matrix (or a stack of them), one per row and one per column,
    else one per value; SGD none."""
    if optimizer == "adamw":
        return 2 * sum(math.prod(s) for s in shapes)
    if optimizer == "adafactor":
        return sum(math.prod(s[:-2]) * (s[-2] + s[-1]) if len(s) >= 2 else math.prod(s) for s in shapes)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Memory estimate
# ---------------------------------------------------------------------------------------------------------------------


def estimate_memory(cfg: TrainerConfig, config, num_processes: int = 1) -> list[tuple[str, int, str]]:
    """Estimated peak bytes of training a model of transformers config `config` under `cfg`, on one process:
    `[(item, bytes, how it was counted)]`, the last item the peak. Weights, gradients, optimizer state and the KV cache
    are counted exactly; activations are a rule of thumb for decoder-only transformers (attention that keeps no
    `[T, T]` scores, as flash and SDPA kernels); the loss workspace is what the fused loss allocates at most. With
    `cfg.fsdp` the weights, gradients and optimizer state are split over `num_processes`, and the gathered weights
    (embeddings, head and two decoder layers) are added."""
    from transformers import AutoModelForCausalLM

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in meta.parameters())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    b = torch.finfo(dtype).bits // 8
    H, L, V = text.hidden_size, text.num_hidden_layers, text.vocab_size
    inter = getattr(text, "intermediate_size", None) or 4 * H
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or H // heads
    lora = cfg.lora_r > 0
    if lora:  # adapters on every linear layer but the head: A [r, in] and B [out, r]
        linear = [p for n, p in meta.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n]
        shapes = [s for p in linear for s in ((cfg.lora_r, p.shape[1]), (p.shape[0], cfg.lora_r))]
    else:
        shapes = [tuple(p.shape) for p in meta.parameters()]
    trainable = sum(math.prod(s) for s in shapes)
    optimizer = optimizer_state_values(cfg.optimizer, shapes) * b
    has_reference = cfg.beta != 0.0 and not lora
    tokens = cfg.max_tokens_per_microbatch
    layer = (10 * H + 4 * inter) * b  # one layer's activations per token: projections, norms, MLP
    per_token = L * H * b + layer if cfg.gradient_checkpointing else L * layer
    d_weight = 0 if lora else V * H * b
    # gathered hidden states and their gradient, the loss's own workspace (its chunk of logits above all), dW
    with schedule(cfg.loss_strategy, cfg.loss_chunk_mib):
        workspace, strategy = workspace_bytes(tokens, H, V, dtype, device), linear_strategy()
    loss = 2 * tokens * H * b + workspace + d_weight
    rows = cfg.num_prompts * cfg.num_generations // num_processes
    context = cfg.max_prompt_length + cfg.max_completion_length
    generation = 2 * L * kv_heads * head_dim * b * rows * context + rows * V * 4  # KV cache, one step's logits
    shards = num_processes if cfg.fsdp else 1
    weights = (n_params + (trainable if lora else 0)) * b // shards
    reference = n_params * b // shards if has_reference else 0
    layers = decoder_layers(meta) if cfg.fsdp else []
    layer_params = sum(p.numel() for p in layers[0].parameters()) if layers else 0
    gathered = (n_params - len(layers) * layer_params + 2 * layer_params) * b if cfg.fsdp else 0
    fixed = weights + reference + trainable * b // shards + optimizer // shards + gathered
    peak = fixed + max(tokens * per_token + loss, generation)
    split = f", split over {shards} processes (FSDP2)" if cfg.fsdp else ""
    items = [
        ("weights", weights, f"{n_params / 1e6:.4g} M parameters x {b} bytes" + (" + adapters" if lora else "")
         + split),
        ("reference model", reference,
         f"frozen copy{split}" if has_reference else "none (beta = 0, or LoRA: the base weights with adapters off)"),
        ("gradients", trainable * b // shards, f"{trainable / 1e6:.4g} M trainable parameters{split}"),
        (f"optimizer ({cfg.optimizer})", optimizer // shards, OPTIMIZER_STATE[cfg.optimizer] + split),
        ("activations", tokens * per_token, f"{tokens} tokens x {per_token / 1024:.1f} KiB/token"
         + (" (checkpointed)" if cfg.gradient_checkpointing else "")),
        ("loss workspace", loss, f"the {strategy} schedule's chunk of logits, hidden states of {tokens} "
         "tokens and their gradient" + ("" if lora else ", LM-head gradient")),
        ("generation", generation, f"KV cache of {rows} sequences x {context} tokens, one step's logits"),
    ]  # fmt: skip
    if cfg.fsdp:
        items.append(("gathered weights", gathered, "FSDP2: embeddings, head and two decoder layers in full"))
    gather = ", gathered weights" if cfg.fsdp else ""
    return [*items, ("estimated peak", peak, f"weights, reference, gradients, optimizer{gather} + max(micro-batch, "
                                             "generation)")]  # fmt: skip


def format_memory(items: list[tuple[str, int, str]]) -> str:
    """The estimate as a table in GiB."""
    width = max(len(name) for name, _, _ in items) + 2
    lines = [f"{'':{width}}{'GiB':>10}"]
    for name, n, note in items:
        lines.append(f"{name:{width}}{n / 2**30:10.3f}   {note}")
    return "\n".join(lines)
