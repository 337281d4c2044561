"""`FusedGRPOTrainer` against TRL 1.16's `GRPOTrainer`, on tiny models built from configs (no download) and a character
tokenizer built in code: the same log-prob passes, loss, parameter gradients and logged metrics on the same inputs for
every loss type and option, and a real `train()` logging TRL's metric keys. Also `backbone_and_head` on common
architectures and the plain-loop example.

Both trainers work in fp32 and differ only in reduction order (TRL's chunked LM head, our kernels), so results agree to
fp32 rounding: rtol 1e-4, atol 1e-6 on losses, gradients and metrics (observed: about 1e-6 relative). CPU runs use
the PyTorch backend, not Triton's interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import assert_close, free_port
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    LlamaForSequenceClassification,
    MixtralConfig,
    OPTConfig,
    OPTForCausalLM,
    PhiConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from trl import GRPOConfig, GRPOTrainer

from grpo_kernels import GRPOLossConfig, backend, grpo_loss, head_options_from_config
from grpo_kernels.config import LOSS_TYPES
from grpo_kernels.integrations.models import backbone_and_head
from grpo_kernels.integrations.trl import FusedGRPOTrainer

VOCAB = ["<pad>", "<eos>", *"abcdefghijklmnopqrstuvwxyz "]
TINY = {
    "vocab_size": len(VOCAB), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
}  # fmt: skip
MODELS = {
    "llama": lambda: LlamaConfig(**TINY),
    "gemma2": lambda: Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=2.0),  # a cap small enough to bite
    "mixtral": lambda: MixtralConfig(
        **TINY, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02
    ),
}
DATASET = Dataset.from_dict({"prompt": ["abc", "hello", "xyz q", "tea"] * 4})
B, P, T = 4, 3, 6  # completions, prompt length, completion length of the hand-made batches
RTOL, ATOL = 1e-4, 1e-6


def tiny_opt() -> OPTForCausalLM:
    """A causal LM whose head `backbone_and_head` does not know."""
    return OPTForCausalLM(OPTConfig(vocab_size=len(VOCAB), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                    num_attention_heads=4, word_embed_proj_dim=32))  # fmt: skip


def reward_a(completions, **kwargs) -> list[float]:
    return [float(c.count("a")) for c in completions]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """`model_path(kind)`: a tiny model saved once, loaded by path so that TRL builds the reference model from it."""
    paths = {}

    def get(kind: str) -> Path:
        if kind not in paths:
            torch.manual_seed(0)
            paths[kind] = tmp_path_factory.mktemp(kind)
            AutoModelForCausalLM.from_config(MODELS[kind]()).save_pretrained(paths[kind])
        return paths[kind]

    return get


@pytest.fixture
def make_trainer(model_path, tokenizer, tmp_path):
    def make(cls, kind: str = "llama", peft_config=None, trainer_kwargs=None, **options) -> GRPOTrainer:
        args = GRPOConfig(
            output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=4, num_generations=4,
            max_completion_length=T, use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
            **options,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(model_path(kind))
        if peft_config is not None:
            torch.manual_seed(1)  # the same adapter weights for both trainers
        return cls(model=model, reward_funcs=reward_a, args=args, train_dataset=DATASET, processing_class=tokenizer,
                   peft_config=peft_config, **(trainer_kwargs or {}))  # fmt: skip

    return make


def token_batch(g: torch.Generator, lengths: tuple[int, ...] = (4, T, 1, T)) -> tuple[torch.Tensor, ...]:
    """`(prompt_ids, prompt_mask, completion_ids, completion_mask)` as TRL pads them (prompts left, completions right),
    with completions of the given lengths."""
    prompt_ids = torch.randint(2, len(VOCAB), (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, 0] = 0
    completion_ids = torch.randint(2, len(VOCAB), (B, T), generator=g)
    completion_mask = (torch.arange(T) < torch.tensor(lengths).unsqueeze(1)).long()
    prompt_ids, completion_ids = prompt_ids * prompt_mask, completion_ids * completion_mask  # pad id 0
    return prompt_ids, prompt_mask, completion_ids, completion_mask


@pytest.mark.parametrize("kind", list(MODELS))
def test_logprob_pass_matches_trl(make_trainer, kind):
    """The old / reference log-prob pass (`_get_per_token_logps_and_entropies`): log-probs, entropies and the MoE
    auxiliary loss as TRL's fused LM head gives them, in chunks of rows, with temperature and soft-cap."""
    stock = make_trainer(GRPOTrainer, kind, temperature=0.7)
    fused = make_trainer(FusedGRPOTrainer, kind, temperature=0.7)
    prompt_ids, prompt_mask, completion_ids, completion_mask = token_batch(torch.Generator().manual_seed(0))
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    aux = kind == "mixtral"
    with torch.no_grad(), backend("torch"):
        expected = stock._get_per_token_logps_and_entropies(stock.model, ids, mask, T, 3, True, aux)
        got = fused._get_per_token_logps_and_entropies(fused.model, ids, mask, T, 3, True, aux)
    for name, g, e in zip(("logps", "entropy", "aux_loss"), got, expected, strict=True):
        assert (g is None) == (e is None), name
        if e is not None:
            assert_close(g, e, rtol=RTOL, atol=ATOL, name=name)
    assert bool((got[0][completion_mask == 0] == 0).all()), "padding must get log-prob 0, as in TRL"


# (id, model, GRPOConfig options, extra inputs, trainer attributes set on both trainers)
CASES = [
    *[(loss_type, "llama", {"loss_type": loss_type}, (), {}) for loss_type in LOSS_TYPES],
    ("dapo-entropy-bonus-top-entropy", "llama", {"loss_type": "dapo", "entropy_coef": 0.05,
                                                "top_entropy_quantile": 0.6}, (), {}),
    ("grpo-entropy-bonus", "llama", {"loss_type": "grpo", "entropy_coef": 0.05}, (), {}),
    ("dapo-entropy-bonus-one-item", "llama", {"loss_type": "dapo", "entropy_coef": 0.05}, ("one_item",), {}),
    ("adaptive-entropy", "llama", {"loss_type": "bnpo", "entropy_coef": 0.05, "use_adaptive_entropy": True,
                                   "entropy_target": 100.0}, (), {"_last_world_entropy": 0.0}),
    ("gspo-delta", "llama", {"loss_type": "grpo", "importance_sampling_level": "sequence", "delta": 1.5,
                             "epsilon_high": 0.28}, (), {}),
    ("off-policy-mask", "llama", {"loss_type": "dapo", "off_policy_mask_threshold": 0.02}, ("sampling",), {}),
    ("vllm-is-token", "llama", {"loss_type": "cispo"}, ("is_token",), {"use_vllm": True}),
    ("vllm-is-sequence", "llama", {"loss_type": "grpo", "importance_sampling_level": "sequence"}, ("is_sequence",),
     {"use_vllm": True}),
    ("vespo-vllm-is", "llama", {"loss_type": "vespo"}, ("is_token",), {"use_vllm": True}),
    ("tool-mask", "llama", {"loss_type": "dapo"}, ("tool_mask",), {}),
    ("per-token-advantages", "llama", {"loss_type": "luspo", "importance_sampling_level": "sequence"},
     ("advantages_per_token",), {}),
    ("cast-lm-head-fp32", "llama", {"loss_type": "dapo", "cast_lm_head_to_fp32": True}, (), {}),
    ("eval-mode", "llama", {"loss_type": "dapo", "entropy_coef": 0.05}, ("eval",), {}),
    ("gemma2-softcap", "gemma2", {"loss_type": "grpo"}, (), {}),
    ("mixtral-aux-loss", "mixtral", {"loss_type": "dapo"}, (), {}),
]  # fmt: skip


def loss_inputs(
    trainer: GRPOTrainer, extras: tuple[str, ...], seed: int = 1, lengths: tuple[int, ...] = (4, T, 1, T)
) -> dict:
    """A micro-batch dict as `_generate_and_score_completions` builds it, with old / reference log-probs off the
    current policy (so ratios are clipped), from `trainer`'s own log-prob pass."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids, prompt_mask, completion_ids, completion_mask = token_batch(g, lengths)
    with torch.no_grad(), backend("torch"):
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), T
        )

    def near(scale: float, row_shift: tuple[float, ...] = (0.0,) * B) -> torch.Tensor:
        shift = torch.tensor(row_shift).unsqueeze(1)
        return (logps + scale * torch.randn(B, T, generator=g) + shift) * completion_mask

    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([0.9, -1.1, 0.4, -0.6]),
        "num_items_in_batch": 2 * completion_mask.sum() + 3,  # the generation batch spans two micro-batches
        # whole rows off-policy too, so that sequence-level ratios clip: high in row 0, low in rows 1 and 3
        "old_per_token_logps": near(0.3, (-0.4, 0.4, 0.0, 0.3)),
        "ref_per_token_logps": near(0.3),
    }
    if "one_item" in extras:  # TRL's normaliser falls below 1 on two processes, where our loss clamps it
        inputs["num_items_in_batch"] = torch.tensor(1)
    if "sampling" in extras:
        inputs["sampling_per_token_logps"] = near(0.2)
        inputs["sampling_per_token_logps"][1, 2] = math.nan  # a token the sampler could not score
    if "is_token" in extras:
        inputs["importance_sampling_ratio"] = torch.exp(0.3 * torch.randn(B, T, generator=g) * completion_mask)
    if "is_sequence" in extras:
        inputs["importance_sampling_ratio"] = torch.exp(0.3 * torch.randn(B, 1, generator=g))
    if "tool_mask" in extras:
        inputs["tool_mask"] = (torch.rand(B, T, generator=g) > 0.3).long()
    if "advantages_per_token" in extras:
        inputs["advantages"] = torch.randn(B, T, generator=g)
    return inputs


def loss_and_gradients(trainer: GRPOTrainer, inputs: dict, extras: tuple[str, ...], attributes: dict):
    for name, value in attributes.items():
        setattr(trainer, name, value)
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train("eval" not in extras)
    mode = "eval" if "eval" in extras else "train"
    with backend("torch"):  # the backward too: the two-pass schedule picks its backend there
        loss = trainer.compute_loss(trainer.model, inputs)
        if mode == "train":
            loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    return loss, {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}, metrics


@pytest.mark.parametrize(("kind", "options", "extras", "attributes"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_loss_gradients_and_metrics_match_trl(make_trainer, kind, options, extras, attributes):
    """`compute_loss` on the same inputs: same loss, same gradient of every parameter, same metrics (names, order and
    values), with beta > 0, temperature, gradient accumulation and a generation batch larger than the micro-batch."""
    options = {"beta": 0.04, "temperature": 0.8, "gradient_accumulation_steps": 2, **options}
    stock = make_trainer(GRPOTrainer, kind, **options)
    fused = make_trainer(FusedGRPOTrainer, kind, **options)
    inputs = loss_inputs(stock, extras)
    loss, grads, metrics = loss_and_gradients(fused, inputs, extras, attributes)
    trl_loss, trl_grads, trl_metrics = loss_and_gradients(stock, inputs, extras, attributes)
    assert_close(loss, trl_loss, rtol=RTOL, atol=ATOL, name="loss")
    assert grads.keys() == trl_grads.keys()
    for name, g in grads.items():
        assert_close(g, trl_grads[name], rtol=RTOL, atol=ATOL, name=name)
    assert list(metrics) == list(trl_metrics)
    for name, value in metrics.items():
        assert math.isclose(value, trl_metrics[name], rel_tol=RTOL, abs_tol=ATOL), (name, value, trl_metrics[name])
    assert fused.entropy_coef == stock.entropy_coef


def test_lora_matches_trl(make_trainer):
    """With peft adapters (random, so that every adapter matrix gets a gradient): the reference log-probs with the
    adapters disabled, the loss and the adapters' gradients are TRL's."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           init_lora_weights=False)  # fmt: skip
    options = {"loss_type": "dapo", "beta": 0.04, "entropy_coef": 0.05, "gradient_accumulation_steps": 2}
    stock = make_trainer(GRPOTrainer, peft_config=lora, **options)
    fused = make_trainer(FusedGRPOTrainer, peft_config=lora, **options)
    assert stock.ref_model is None and fused.ref_model is None  # the base model, adapters disabled, is the reference
    prompt_ids, prompt_mask, completion_ids, completion_mask = token_batch(torch.Generator().manual_seed(3))
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad(), backend("torch"):
        for trainer in (stock, fused):
            with trainer.model.disable_adapter():
                trainer.ref = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, T)[0]
            trainer.policy = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, T)[0]
    assert_close(fused.ref, stock.ref, rtol=RTOL, atol=ATOL, name="reference log-probs")
    assert_close(fused.policy, stock.policy, rtol=RTOL, atol=ATOL, name="policy log-probs")
    assert (fused.ref - fused.policy).abs().max() > 1e-3  # the adapters change the policy
    inputs = loss_inputs(stock, ())
    loss, grads, _ = loss_and_gradients(fused, inputs, (), {})
    trl_loss, trl_grads, _ = loss_and_gradients(stock, inputs, (), {})
    assert_close(loss, trl_loss, rtol=RTOL, atol=ATOL, name="loss")
    assert grads.keys() == trl_grads.keys() and all("lora_" in name for name in grads)
    for name, g in grads.items():
        assert_close(g, trl_grads[name], rtol=RTOL, atol=ATOL, name=name)


def test_deepspeed_zero3_training_matches_trl(tmp_path):
    """Two steps of `accelerate launch` with two processes under DeepSpeed ZeRO-3 (every parameter partitioned, gloo on
    the CPU): the fused trainer logs TRL's losses and ends with TRL's weights."""
    pytest.importorskip("deepspeed")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }))  # fmt: skip
    results = {}
    for kind in ("fused", "stock"):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "--use_deepspeed", "--deepspeed_config_file", str(config),
               str(Path(__file__).with_name("zero3_grpo_run.py")), kind, str(tmp_path / f"{kind}.pt")]  # fmt: skip
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-4000:]
        results[kind] = torch.load(tmp_path / f"{kind}.pt", weights_only=True)
    fused, stock = results["fused"], results["stock"]
    assert len(fused["losses"]) == 2
    for a, b in zip(fused["losses"], stock["losses"], strict=True):
        assert math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL), (a, b)
    assert fused["params"].keys() == stock["params"].keys()
    for name, p in fused["params"].items():
        assert_close(p, stock["params"][name], rtol=RTOL, atol=ATOL, name=name)
    assert (fused["params"]["lm_head.weight"] - fused["initial_head"]).abs().max() > 1e-3  # the head was trained


class TwoProcesses:
    """A trainer's accelerator acting as one of two processes: in every collective (reduce, gather) the other process's
    part is replayed from `peer`, what the same trainer sent on another batch (None: record only)."""

    num_processes = 2

    def __init__(self, accelerator, peer: list[torch.Tensor] | None = None) -> None:
        self.accelerator, self.peer, self.sent = accelerator, peer, []

    def __getattr__(self, name: str):
        return getattr(self.accelerator, name)

    def reduce(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        self.sent.append(x)
        return x if self.peer is None else x + self.peer[len(self.sent) - 1]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        self.sent.append(x.reshape(-1))
        return x.reshape(-1) if self.peer is None else torch.cat([x.reshape(-1), self.peer[len(self.sent) - 1]])

    gather_for_metrics = gather


TWO_PROCESS_IDS = ("dapo", "dapo-entropy-bonus-one-item", "grpo-entropy-bonus", "gspo-delta", "vespo",
                   "per-token-advantages", "mixtral-aux-loss")  # fmt: skip
TWO_PROCESS_CASES = [c for c in CASES if c[0] in TWO_PROCESS_IDS]


@pytest.mark.parametrize(
    ("kind", "options", "extras", "attributes"),
    [c[1:] for c in TWO_PROCESS_CASES],
    ids=[c[0] for c in TWO_PROCESS_CASES],
)
def test_two_processes_reduce_metrics_as_trl(make_trainer, kind, options, extras, attributes):
    """With two processes holding different token counts, the loss (normalised by the process count) and the metrics
    (per-token or per-sequence means, min / max over both processes) are TRL's."""
    options = {"beta": 0.04, "gradient_accumulation_steps": 2, **options}
    results = []
    for cls in (FusedGRPOTrainer, GRPOTrainer):
        trainer = make_trainer(cls, kind, **options)
        accelerator = trainer.accelerator
        trainer.accelerator = TwoProcesses(accelerator)
        loss_and_gradients(trainer, loss_inputs(trainer, extras, seed=2, lengths=(T, 2, 5, 3)), extras, attributes)
        trainer.model.zero_grad()
        trainer.accelerator = TwoProcesses(accelerator, peer=trainer.accelerator.sent)
        results.append(loss_and_gradients(trainer, loss_inputs(trainer, extras), extras, attributes))
    (loss, grads, metrics), (trl_loss, trl_grads, trl_metrics) = results
    assert_close(loss, trl_loss, rtol=RTOL, atol=ATOL, name="loss")
    for name, g in grads.items():
        assert_close(g, trl_grads[name], rtol=RTOL, atol=ATOL, name=name)
    assert list(metrics) == list(trl_metrics)
    for name, value in metrics.items():
        assert math.isclose(value, trl_metrics[name], rel_tol=RTOL, abs_tol=ATOL), (name, value, trl_metrics[name])


@pytest.mark.parametrize("loss_type", ["cispo", "dapo"])
def test_two_processes_average_one_token_rows_over_rows(make_trainer, loss_type):
    """With one completion token a row (T = 1) TRL averages every metric over the rows, padding included, on each
    process and across them: the logged means weigh each process's metrics by its rows, not by its tokens (a
    clip ratio above 1 before, where a process held only padding)."""
    trainer = make_trainer(FusedGRPOTrainer, loss_type=loss_type, epsilon_high=0.5, beta=0.04)
    accelerator = trainer.accelerator
    g = torch.Generator().manual_seed(0)
    parts = []
    for rows, tokens in ((1, 0), (3, 2)):  # the first process holds padding only
        logits = torch.randn(rows, 1, 7, generator=g, dtype=torch.float64)
        mask = (torch.arange(rows) < tokens).unsqueeze(1)
        out = grpo_loss(logits, torch.randint(0, 7, (rows, 1), generator=g), torch.rand(rows, dtype=torch.float64),
                        mask, config=GRPOLossConfig.from_trl(trainer.args),
                        old_logps=torch.randn(rows, 1, generator=g, dtype=torch.float64) - 2,
                        ref_logps=torch.randn(rows, 1, generator=g, dtype=torch.float64) - 2)  # fmt: skip
        parts.append((rows, mask, out.metrics))
    sent = None
    for rows, mask, metrics in parts:
        trainer.accelerator = TwoProcesses(accelerator, peer=sent)
        trainer._metrics["train"].clear()
        trainer._log_loss_metrics("train", metrics, mask, torch.zeros(rows))
        sent = trainer.accelerator.sent
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged and "entropy" in logged
    for name, value in logged.items():
        if name in ("clip_ratio/low_min", "clip_ratio/high_max"):
            continue
        want = sum(r * float(m[name]) for r, _, m in parts) / sum(r for r, _, _ in parts)
        assert math.isclose(value, want, rel_tol=1e-6, abs_tol=1e-9), (name, value, want)


def test_train_logs_trl_metrics(make_trainer):
    """A real `train()` with gradient accumulation: it runs, logs every key TRL logs, and its first step (same seed, so
    the same completions) has TRL's loss and metrics."""
    options = {"loss_type": "dapo", "beta": 0.04, "entropy_coef": 0.01, "gradient_accumulation_steps": 2,
               "max_steps": 2}  # fmt: skip
    logs = []
    for cls in (GRPOTrainer, FusedGRPOTrainer):
        trainer = make_trainer(cls, **options)
        with backend("torch"):
            trainer.train()
        logs.append(trainer.state.log_history)
    trl_logs, fused_logs = logs
    assert [list(entry) for entry in fused_logs] == [list(entry) for entry in trl_logs]
    for name in ("loss", "grad_norm", "kl", "entropy", "policy_loss", "clip_ratio/region_mean", "reward"):
        assert math.isclose(fused_logs[0][name], trl_logs[0][name], rel_tol=RTOL, abs_tol=ATOL), name


def test_gradient_filtering_changes_only_the_gradients(make_trainer):
    """FusedGRPOTrainer(grad_filter_eps=...) filters the head's backward: TRL's loss, other gradients (the tiny
    model's probabilities are all below 0.2); a bad value fails when the trainer is built."""
    options = {"beta": 0.04, "gradient_accumulation_steps": 2}
    stock = make_trainer(GRPOTrainer, **options)
    fused = make_trainer(FusedGRPOTrainer, trainer_kwargs={"grad_filter_eps": 0.2}, **options)
    inputs = loss_inputs(stock, ())
    loss, grads, _ = loss_and_gradients(fused, inputs, (), {})
    trl_loss, trl_grads, _ = loss_and_gradients(stock, inputs, (), {})
    assert_close(loss, trl_loss, rtol=RTOL, atol=ATOL, name="loss")
    assert grads.keys() == trl_grads.keys()
    assert any(not torch.allclose(g, trl_grads[n], rtol=RTOL, atol=ATOL) for n, g in grads.items())
    with pytest.raises(ValueError, match="grad_filter_eps must be in"):
        make_trainer(FusedGRPOTrainer, trainer_kwargs={"grad_filter_eps": 2.0})


def test_rejects_what_it_cannot_honour(make_trainer, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="use_liger_kernel"):
        make_trainer(FusedGRPOTrainer, use_liger_kernel=True)
    opt = tiny_opt()
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, use_cpu=True,
                      report_to=[])  # fmt: skip
    with pytest.raises(ValueError, match="OPTForCausalLM"):
        FusedGRPOTrainer(model=opt, reward_funcs=reward_a, args=args, train_dataset=DATASET, processing_class=tokenizer)
    fused = make_trainer(FusedGRPOTrainer)
    inputs = loss_inputs(fused, ())
    with pytest.raises(ValueError, match="pixel_values"):
        fused.compute_loss(fused.model, {**inputs, "pixel_values": torch.zeros(1, 3, 4, 4)})


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(**TINY),
        Qwen2Config(**TINY),
        Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=2.0),
        GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1),
        PhiConfig(**TINY),  # a biased head
    ],
    ids=lambda c: c.model_type,
)
def test_backbone_and_head_reproduce_the_logits(config):
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, len(VOCAB), (2, 7))
    backbone, lm_head = backbone_and_head(model)
    head = head_options_from_config(model.config)
    with torch.no_grad():
        z = torch.nn.functional.linear(backbone(input_ids=ids).last_hidden_state, lm_head.weight, lm_head.bias)
        z = z * head.logit_scale
        if head.final_logit_softcapping is not None:
            z = head.final_logit_softcapping * torch.tanh(z / head.final_logit_softcapping)
        assert_close(z, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6, name=config.model_type)


def test_backbone_and_head_rejects_unknown_models():
    opt = tiny_opt()
    with pytest.raises(ValueError, match="OPTForCausalLM"):
        backbone_and_head(opt)
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        backbone_and_head(LlamaForSequenceClassification(LlamaConfig(**TINY)))


def test_plain_loop_example():
    path = Path(__file__).parents[1] / "examples" / "plain_loop.py"
    spec = importlib.util.spec_from_file_location("plain_loop", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with backend("torch"):
        norms = example.main(steps=2)
    assert len(norms) == 2 and all(math.isfinite(n) and n > 0 for n in norms)


def test_a_copy_of_a_patched_model_runs_its_own_weights():
    """`FusedGRPOTrainer` replaces the policy's forward; a deep copy of the model (a snapshot, an averaged or an
    evaluation copy) runs the copy's weights in both the plain forward and the hidden-state one, not the original's."""
    import copy

    from transformers import LlamaForCausalLM

    from grpo_kernels.integrations.trl import _add_hidden_state_forward

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))  # fmt: skip
    _add_hidden_state_forward(model, False)
    twin = copy.deepcopy(model)
    torch.nn.init.zeros_(twin.lm_head.weight)
    ids = torch.randint(0, 64, (2, 5))
    assert model(ids).logits.abs().sum() > 0 and torch.equal(twin(ids).logits, torch.zeros(2, 5, 64))
    heads = [m(ids, logits_to_keep=3, grpo_head=lambda h, w, b: (w,))[0][0] for m in (model, twin)]
    assert heads[0] is model.lm_head.weight and heads[1] is twin.lm_head.weight


def test_backbone_and_head_of_a_compiled_model():
    """TRL's `torch_compile` hands over `torch.compile`d models (the reference model too): their backbone and head
    are the compiled model's own."""
    from transformers import LlamaForCausalLM

    from grpo_kernels.integrations.models import backbone_and_head

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))  # fmt: skip
    backbone, head = backbone_and_head(torch.compile(model))
    assert backbone is model.model and head is model.lm_head


def test_a_head_in_peft_modules_to_save_is_refused_by_name():
    """LoRA's `modules_to_save=["lm_head"]` wraps the head in a trained copy the fused loss would not read: a clear
    error that names modules_to_save."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from grpo_kernels.integrations.models import backbone_and_head

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))  # fmt: skip
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="lm_head is in PEFT's modules_to_save"):
        backbone_and_head(peft_model)
