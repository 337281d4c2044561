"""The GRPO loop: sample G completions per prompt, score them, turn rewards into advantages, then optimise.

    every steps_per_generation x num_iterations steps: a generation batch of num_prompts x G completions
        -> rewards [B, K] -> group_advantages -> old and reference log-probs (no grad, from hidden states)
    every step: a 1/steps_per_generation share of the batch, in micro-batches of at most max_tokens_per_microbatch
        tokens -> hidden states -> fused loss -> backward; then one optimizer step (--optimizer)

Normalisation under gradient accumulation: each micro-batch's loss is multiplied by its share of the step, of the
step's completions for the per-sequence losses (grpo, sapo, dr_grpo, luspo) and of its tokens for the token-level
ones (bnpo, dapo, cispo, vespo); dapo, cispo and vespo divide by the completion tokens of the whole generation batch
over all processes (TRL's `num_items_in_batch`), spread over its steps. With micro-batches of equal size this is TRL's
division by the number of accumulation steps; with micro-batches of any size it gives the gradient of the step's
completions taken as one batch. Two things stay per micro-batch, as in TRL: the entropy threshold of
`top_entropy_quantile`, and the mean of the entropy bonus under the per-sequence losses.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from grpo_kernels import backend, group_advantages
from grpo_kernels.reference import nanstd
from trainer.config import CONFIG_FILE, SetupError, TrainerConfig, checkpoints, find_checkpoint, saved_options
from trainer.data import (
    HFTokenizer,
    PromptSampler,
    RewardFunction,
    arithmetic_examples,
    dataset_examples,
    reward_function,
    score,
)
from trainer.logs import MetricsLogger, plot_metrics
from trainer.model import (
    BYTE_TOKENIZER_FILE,
    LossInputs,
    MicroBatch,
    Policy,
    load_model,
    make_optimizer,
    packed_attention,
    reference_model,
    shard,
    sharding_summary,
)

PER_SEQUENCE_LOSSES = ("grpo", "sapo", "dr_grpo", "luspo")
GENERATION_TOKEN_LOSSES = ("dapo", "cispo", "vespo")


def plan_microbatches(lengths: Sequence[int], budget: int, packed: bool) -> list[list[int]]:
    """Split sequences into micro-batches of at most `budget` tokens, longest first: the sum of their lengths when
    packed, rows times the longest otherwise. A sequence longer than the budget gets a micro-batch of its own.

    Returns lists of indices into `lengths`.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        cost = used + lengths[i] if packed else (len(current) + 1) * lengths[current[0] if current else i]
        if current and cost > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


@dataclass
class Rollout:
    """This process's share of one generation batch.

    Attributes:
        prompt_ids, completion_ids: one token tensor per completion (completions end with EOS when they stopped).
        advantages: `[B]`.
        num_items: completion tokens of the generation batch over all processes.
        steps: the rows each of the `steps_per_generation` optimizer steps trains on.
        metrics: the generation batch's reward and length metrics.
        old_logps, ref_logps: `[B, C]` log-probs of the sampling policy and the reference, when needed.
        used: optimizer steps already taken on it (up to steps_per_generation x num_iterations).
    """

    prompt_ids: list[torch.Tensor]
    completion_ids: list[torch.Tensor]
    advantages: torch.Tensor
    num_items: float
    steps: list[list[int]]
    metrics: dict[str, float]
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    used: int = 0


@dataclass
class _StepSums:
    """Token-weighted sums of the loss metrics over a step's micro-batches."""

    tokens: int = 0
    loss: float = 0.0
    finite: bool = True
    weighted: dict[str, float] = field(default_factory=dict)
    lowest: dict[str, float] = field(default_factory=dict)
    highest: dict[str, float] = field(default_factory=dict)

    def add(self, loss: float, metrics: dict[str, torch.Tensor], tokens: int) -> None:
        self.loss += loss
        self.finite &= math.isfinite(loss)
        self.tokens += tokens
        for k, v in metrics.items():
            x = float(v)
            if k.endswith("_min"):
                self.lowest[k] = min(self.lowest.get(k, math.inf), x)
            elif k.endswith("_max"):
                self.highest[k] = max(self.highest.get(k, -math.inf), x)
            else:
                self.weighted[k] = self.weighted.get(k, 0.0) + x * tokens

    def result(self) -> dict[str, float]:
        out = {k: v / max(self.tokens, 1) for k, v in self.weighted.items()}
        return {**out, **self.lowest, **self.highest, "loss": self.loss}


def _kernels(device: torch.device):
    """The kernels' chunked PyTorch path on CPU (never Triton's interpreter), the default elsewhere."""
    return backend("torch") if device.type == "cpu" else contextlib.nullcontext()


def rollout_metrics(
    rewards: torch.Tensor,  # [B, K] over all processes
    names: Sequence[str],
    weights: Sequence[float],
    lengths: torch.Tensor,  # [B]
    stopped: torch.Tensor,  # [B] bool
    num_generations: int,
) -> dict[str, float]:
    """TRL's reward and completion metrics of a generation batch; non-finite rewards are left out of the means."""
    finite = torch.where(torch.isfinite(rewards), rewards, math.nan)
    total = (finite * torch.tensor(weights)).nansum(1)
    group_std = nanstd(total.view(-1, num_generations), dim=1)
    m = {"reward": total.mean().item(), "reward_std": nanstd(total).item()}
    for k, name in enumerate(names):
        m[f"rewards/{name}/mean"] = torch.nanmean(finite[:, k]).item()
        m[f"rewards/{name}/std"] = nanstd(finite[:, k]).item()
    m["frac_reward_zero_std"] = torch.isclose(group_std, torch.zeros_like(group_std)).float().mean().item()
    lengths = lengths.float()
    m["completions/mean_length"] = lengths.mean().item()
    m["completions/min_length"] = lengths.min().item()
    m["completions/max_length"] = lengths.max().item()
    m["completions/clipped_ratio"] = 1.0 - stopped.float().mean().item()
    done = lengths[stopped]
    m["completions/mean_terminated_length"] = done.mean().item() if done.numel() else 0.0
    m["completions/min_terminated_length"] = done.min().item() if done.numel() else 0.0
    m["completions/max_terminated_length"] = done.max().item() if done.numel() else 0.0
    return m


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's peak resident size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextlib.contextmanager
def _no_transformers_progress_bars():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# What a resumed run may set otherwise than its checkpoint's: how long it runs and saves, where, and how it computes
# the same steps (micro-batches, packing, checkpointing, the loss's strategy). Anything else would not take effect
# (the learning rate: the optimizer's and scheduler's state come from the checkpoint) or change the run's meaning
# (the seed and pretraining: the reference model).
RESUME_MAY_CHANGE = frozenset({
    "max_steps", "save_steps", "output_dir", "resume", "overwrite_output_dir", "tensorboard", "dry_run_memory",
    "max_tokens_per_microbatch", "packing", "gradient_checkpointing", "loss_strategy", "loss_chunk_mib",
})  # fmt: skip


def check_resumable(cfg: TrainerConfig, path: Path) -> None:
    """A clear error when `cfg` differs from the configuration `path` was saved with in more than
    `RESUME_MAY_CHANGE`."""
    saved = saved_options(path)
    now = cfg.to_dict()
    differ = [f"{k} ({saved[k]!r} there, {now[k]!r} here)" for k in now
              if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]  # fmt: skip
    if differ:
        raise SetupError(
            f"--resume {cfg.resume}: {path} was saved by a run with other options: {'; '.join(differ)}. A resumed run "
            "continues that run (its optimizer, scheduler and reference model): pass its options, or start a new run"
        )


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load what `save_pretrained` wrote in `path` into `model` (a transformers model, or peft adapters)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    if not state:
        raise FileNotFoundError(f"{path} holds no *.safetensors weights")
    if hasattr(model, "get_base_model"):  # peft: the adapters only
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[n].data_ptr() for n in state if n in params}
    untied = [n for n in missing if n not in params or params[n].data_ptr() not in loaded]
    if unexpected or untied:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {untied}, unexpected {unexpected}")


class Trainer:
    """GRPO training as `cfg` describes; `train()` runs it.

    Args:
        cfg: the options.
        reward_functions: reward functions by name, replacing `cfg.reward_funcs` (weights still from
            `cfg.reward_weights`, in this order).
    """

    def __init__(self, cfg: TrainerConfig, reward_functions: dict[str, RewardFunction] | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.accelerator = acc = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: gloo across processes
        self.device = acc.device
        self.world, self.rank = acc.num_processes, acc.process_index
        if cfg.num_prompts % self.world:
            raise ValueError(f"num_prompts = {cfg.num_prompts} must be a multiple of the {self.world} processes")
        if reward_functions is not None:
            self.reward_names, self.reward_fns = list(reward_functions), list(reward_functions.values())
        else:
            self.reward_names, self.reward_fns = cfg.reward_funcs, [reward_function(n) for n in cfg.reward_funcs]
        if len(self.reward_fns) != len(cfg.reward_weights):
            raise ValueError(
                f"{len(self.reward_fns)} reward functions but {len(cfg.reward_weights)} reward_weights: "
                "give one weight per function"
            )
        set_seed(cfg.seed, device_specific=True)
        examples = (
            arithmetic_examples()
            if cfg.dataset is None
            else dataset_examples(cfg.dataset, cfg.dataset_config, cfg.dataset_split, cfg.prompt_column,
                                  cfg.answer_column)
        )  # fmt: skip
        self.sampler = PromptSampler(examples, cfg.seed)
        self.output_dir = Path(cfg.output_dir)
        checkpoint = find_checkpoint(cfg.resume, self.output_dir) if cfg.resume else None
        if checkpoint is not None:
            check_resumable(cfg, checkpoint)
        elif earlier := checkpoints(self.output_dir):
            if not cfg.overwrite_output_dir:
                names = ", ".join(p.name for p in earlier)
                raise SetupError(
                    f"output_dir {self.output_dir} holds checkpoints of an earlier run ({names}), which --resume "
                    "latest would mix with this one: pass --resume latest to continue that run, --overwrite-output-dir "
                    "to delete them, or another --output-dir"
                )
            acc.wait_for_everyone()  # every process has found them before they go
            if acc.is_main_process:
                for p in earlier:
                    shutil.rmtree(p)
            acc.wait_for_everyone()
        model, self.tokenizer = load_model(cfg, self.device, examples)
        ref = reference_model(cfg, model)
        if checkpoint is not None:
            load_weights(model, checkpoint)  # the full weights, before DDP or FSDP distributes them
        attn = packed_attention(self.device) if cfg.packing else None
        policy = Policy(model, attn, cfg.grad_filter_eps, cfg.loss_strategy, cfg.loss_chunk_mib)
        self.ref_policy = None if ref is None else Policy(ref, attn, None, cfg.loss_strategy, cfg.loss_chunk_mib)
        if cfg.fsdp:
            if self.world < 2:
                raise SetupError("--fsdp shards the model over processes, but this is the only one: launch with "
                                 "accelerate launch --num_processes N (N >= 2), or leave --fsdp out")  # fmt: skip
            for p in filter(None, (policy, self.ref_policy)):
                shard(p, self.device, self.world)
            acc.print(f"FSDP2: policy: {sharding_summary(policy)}")
        params = [p for p in policy.parameters() if p.requires_grad]  # after sharding: the DTensor parameters
        optimizer = make_optimizer(cfg, params)
        if cfg.fsdp:
            self.policy, self.optimizer = policy, acc.prepare(optimizer)
        else:
            self.policy, self.optimizer = acc.prepare(policy, optimizer)
        self.params = params
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.optimizer, self._lr_factor)
        self.loss_config = cfg.loss_config()
        self.step = 0
        self.skipped = 0
        self.generations = 0
        self.num_tokens = 0
        self.rollout: Rollout | None = None
        if checkpoint is not None:
            self.load(checkpoint)

    # -- schedule --------------------------------------------------------------------------------------------------

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    # -- generation ------------------------------------------------------------------------------------------------

    @property
    def _generator(self) -> torch.nn.Module:
        """The policy's transformers (or peft) model, outside DDP (under FSDP2 its weights are shards)."""
        return self.accelerator.unwrap_model(self.policy).model

    @torch.no_grad()
    def _sample(self, prompt_ids: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[bool]]:
        """G completions per prompt with `generate` (KV cache, temperature / top-p / top-k, stop at EOS)."""
        from transformers import GenerationConfig

        cfg, tok = self.cfg, self.tokenizer
        P = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), P), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompt_ids):  # left padding
            input_ids[i, P - len(p) :] = p
            attention_mask[i, P - len(p) :] = 1
        generation = GenerationConfig(
            do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            max_new_tokens=cfg.max_completion_length, eos_token_id=tok.eos_token_ids, pad_token_id=tok.pad_token_id,
            use_cache=True,
        )  # fmt: skip
        model = self._generator
        model.eval()
        try:  # sharded: every process runs forward passes until all have finished, as each one gathers weights
            out = self.accelerator.unwrap_model(self.policy).generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=generation,
                synced_gpus=cfg.fsdp,
            )
        finally:
            model.train()
        completions, stopped = [], []
        eos = torch.tensor(tok.eos_token_ids)
        for row in out[:, P:].cpu():
            is_eos = torch.isin(row, eos)
            if is_eos.any():
                completions.append(row[: int(is_eos.int().argmax()) + 1])
                stopped.append(True)
            else:
                completions.append(row)
                stopped.append(False)
        return completions, stopped

    def generate(self) -> tuple[Rollout | None, dict[str, float]]:
        """Sample and score a generation batch: the rollout, or None when a reward is NaN or infinite; and its
        metrics."""
        cfg, acc = self.cfg, self.accelerator
        n = cfg.num_prompts // self.world
        examples = self.sampler.batch(self.generations, cfg.num_prompts)[self.rank * n : (self.rank + 1) * n]
        self.generations += 1
        G = cfg.num_generations
        examples = [e for e in examples for _ in range(G)]
        prompt_ids = [torch.tensor(self.tokenizer.encode_prompt(e.prompt)[-cfg.max_prompt_length :]) for e in examples]
        completion_ids, stopped = self._sample(prompt_ids)
        rewards, invalid = score(
            self.reward_names, self.reward_fns, prompts=[e.prompt for e in examples],
            completions=[self.tokenizer.decode(c.tolist()) for c in completion_ids],
            answers=[e.answer for e in examples], stopped=stopped,
        )  # fmt: skip
        lengths = torch.tensor([len(c) for c in completion_ids])
        local = (rewards, invalid, lengths, torch.tensor(stopped))
        rewards, invalid, lengths, stopped_all = (acc.gather(t.to(self.device)).cpu() for t in local)
        metrics = rollout_metrics(rewards, self.reward_names, cfg.reward_weights, lengths, stopped_all, G)
        if invalid.any():
            bad = sorted({self.reward_names[k] for k in invalid.nonzero()[:, 1].tolist()})
            warnings.warn(f"step {self.step + 1}: reward function(s) {', '.join(bad)} returned NaN or infinite values; "
                          "skipping the step", RuntimeWarning, stacklevel=2)  # fmt: skip
            return None, metrics
        with _kernels(self.device):
            advantages = group_advantages(
                rewards, G, scale_rewards=cfg.scale_rewards, reward_weights=cfg.reward_weights,
                multi_objective_aggregation=cfg.multi_objective_aggregation,
            )  # fmt: skip
        B = len(completion_ids)
        order = torch.randperm(B).tolist()
        per_step = B // cfg.steps_per_generation
        rollout = Rollout(
            prompt_ids=prompt_ids,
            completion_ids=completion_ids,
            advantages=advantages[self.rank * B : (self.rank + 1) * B],
            num_items=float(lengths.sum()),
            steps=[order[i * per_step : (i + 1) * per_step] for i in range(cfg.steps_per_generation)],
            metrics=metrics,
        )
        if cfg.needs_old_logps:
            rollout.old_logps = self._logprobs(self.policy, rollout)
        if cfg.beta != 0.0:
            if self.ref_policy is not None:
                rollout.ref_logps = self._logprobs(self.ref_policy, rollout)
            else:  # LoRA: the base weights are the reference
                with self._generator.disable_adapter():
                    rollout.ref_logps = self._logprobs(self.policy, rollout)
        return rollout, metrics

    def _microbatch(self, rollout: Rollout, rows: Sequence[int]) -> MicroBatch:
        return MicroBatch.build(
            [rollout.prompt_ids[r] for r in rows], [rollout.completion_ids[r] for r in rows], rows,
            packed=self.cfg.packing, pad_token_id=self.tokenizer.pad_token_id, device=self.device,
        )  # fmt: skip

    def _plan(self, rollout: Rollout, rows: Sequence[int]) -> list[list[int]]:
        lengths = [len(rollout.prompt_ids[r]) + len(rollout.completion_ids[r]) for r in rows]
        return [[rows[i] for i in mb] for mb in plan_microbatches(lengths, self.cfg.max_tokens_per_microbatch,
                                                                  self.cfg.packing)]  # fmt: skip

    @torch.no_grad()
    def _logprobs(self, policy: torch.nn.Module, rollout: Rollout) -> torch.Tensor:  # [B, C]
        """Per-token log-probs of every completion under `policy`, micro-batch by micro-batch, from hidden states."""
        B = len(rollout.completion_ids)
        out = torch.zeros(B, max(len(c) for c in rollout.completion_ids), device=self.device)
        for rows in self._plan(rollout, list(range(B))):
            mb = self._microbatch(rollout, rows)
            logps = policy(mb, temperature=self.cfg.temperature)
            out[mb.rows, : logps.shape[1]] = logps
        return out

    # -- optimisation ----------------------------------------------------------------------------------------------

    def accumulate(self, rollout: Rollout, rows: Sequence[int]) -> _StepSums:
        """Forward and backward passes over `rows` of the rollout in token-budget micro-batches, leaving the step's
        gradient in `.grad` (all-reduced over processes after the last micro-batch)."""
        cfg, acc = self.cfg, self.accelerator
        plan = self._plan(rollout, rows)
        step_tokens = sum(len(rollout.completion_ids[r]) for r in rows)
        items_per_step = rollout.num_items / (self.world * cfg.steps_per_generation)
        per_sequence = cfg.loss_type in PER_SEQUENCE_LOSSES
        sums = _StepSums()
        self.policy.train()
        for k, mb_rows in enumerate(plan):
            mb = self._microbatch(rollout, mb_rows)
            tokens = int(mb.completion_mask.sum())
            share = len(mb_rows) / len(rows) if per_sequence else tokens / step_tokens
            T = mb.completion_ids.shape[1]
            inputs = LossInputs(
                config=self.loss_config,
                advantages=rollout.advantages[mb.rows.cpu()].to(self.device),
                old_logps=None if rollout.old_logps is None else rollout.old_logps[mb.rows, :T],
                ref_logps=None if rollout.ref_logps is None else rollout.ref_logps[mb.rows, :T],
                num_items_in_batch=share * items_per_step if cfg.loss_type in GENERATION_TOKEN_LOSSES else None,
            )
            last = k == len(plan) - 1
            if cfg.fsdp:  # reduce-scatter the gradients after the last micro-batch only, as DDP's no_sync
                self.policy.set_requires_gradient_sync(last)
            with contextlib.nullcontext() if last or cfg.fsdp else acc.no_sync(self.policy):
                out = self.policy(mb, inputs)
                loss = out.loss * share
                acc.backward(loss)  # also on a NaN loss, so that every process joins the gradient all-reduce
            sums.add(loss.item(), out.metrics, tokens)
            self.num_tokens += mb.num_tokens
        return sums

    def optimize(self, rollout: Rollout, rows: Sequence[int]) -> dict[str, float]:
        """One optimizer step on `rows` of the rollout. A NaN or infinite loss or gradient norm on any process skips
        the step (the weights and optimizer state stay as they were)."""
        cfg, acc = self.cfg, self.accelerator
        sums = self.accumulate(rollout, rows)
        grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm or math.inf)
        if cfg.fsdp:  # the norm of sharded gradients: a DTensor holding each process's part
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        bad = torch.tensor(float(not (sums.finite and math.isfinite(grad_norm))), device=self.device)
        if acc.reduce(bad, reduction="sum").item() > 0:
            self.skipped += 1
            warnings.warn(f"step {self.step + 1}: the loss or its gradient is NaN or infinite; skipping the step "
                          f"({self.skipped} skipped so far)", RuntimeWarning, stacklevel=2)  # fmt: skip
        else:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = sums.result()
        names = sorted(metrics)
        gathered = acc.gather(torch.tensor([[metrics[n] for n in names]], device=self.device)).cpu()
        for i, n in enumerate(names):
            col = gathered[:, i]
            metrics[n] = (col.min() if n.endswith("_min") else col.max() if n.endswith("_max") else col.mean()).item()
        metrics["grad_norm"] = grad_norm
        return metrics

    def train(self) -> list[dict[str, float]]:
        """Train until `max_steps`; returns the metrics of each step. Writes `metrics.jsonl`, `curves.png` and a
        checkpoint every `save_steps` and at the end to `output_dir`."""
        cfg, acc = self.cfg, self.accelerator
        uses = cfg.steps_per_generation * cfg.num_iterations
        logger = MetricsLogger(self.output_dir, cfg.max_steps, self.step, acc.is_main_process, cfg.tensorboard)
        history = []
        try:
            while self.step < cfg.max_steps:
                start = time.perf_counter()
                tokens_before = self.num_tokens
                if self.rollout is None or self.rollout.used == uses:
                    self.rollout, generation_metrics = self.generate()
                if self.rollout is None:
                    self.skipped += 1
                    metrics = dict(generation_metrics)
                else:
                    rollout = self.rollout
                    metrics = dict(rollout.metrics)
                    metrics.update(self.optimize(rollout, rollout.steps[rollout.used % cfg.steps_per_generation]))
                    rollout.used += 1
                self.step += 1
                elapsed = time.perf_counter() - start
                tokens = acc.reduce(torch.tensor(self.num_tokens - tokens_before, device=self.device), "sum").item()
                metrics.update(
                    step=self.step,
                    learning_rate=self.scheduler.get_last_lr()[0],
                    skipped_steps=self.skipped,
                    num_tokens=acc.reduce(torch.tensor(self.num_tokens, device=self.device), "sum").item(),
                    tokens_per_second=tokens / elapsed,
                    step_time=elapsed,
                    peak_memory_gib=peak_memory_gib(self.device),
                )
                metrics = {"step": metrics.pop("step"), **metrics}
                logger.log(metrics)
                history.append(metrics)
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < cfg.max_steps:
                    self.save()
            self.save()
        finally:
            logger.close()
        if acc.is_main_process and history:
            plot_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "curves.png")
        return history

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def save(self) -> Path:
        """Write `output_dir/checkpoint-{step}`: the model (`save_pretrained`), optimizer, scheduler, step and
        counters, and per process the RNG states and the generation batch still in use. Everything is written to a
        hidden `.checkpoint-{step}.partial` first and renamed once complete, so an interrupted save never leaves a
        checkpoint that `--resume` would pick up."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{self.step}"
        path = self.output_dir / f".checkpoint-{self.step}.partial"
        if acc.is_main_process:
            shutil.rmtree(path, ignore_errors=True)  # what an earlier interrupted save left
            path.mkdir(parents=True)
        acc.wait_for_everyone()
        weights = optimizer = None
        if self.cfg.fsdp:  # gather the full weights and optimizer state on the main process, in CPU memory
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(self.policy, options=options)
            model = self._generator
            names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
            tied = names - dict(model.named_parameters()).keys()  # the head when it is the embedding: saved once
            weights = {n: t for n, t in ((k.removeprefix("model."), t) for k, t in full.items()) if n not in tied}
            optimizer = get_optimizer_state_dict(self.policy, self.optimizer.optimizer, options=options)
        if acc.is_main_process:
            with _no_transformers_progress_bars():  # a bar of its own would break into the training bar
                self._generator.save_pretrained(path, state_dict=weights)
            if isinstance(self.tokenizer, HFTokenizer):
                self.tokenizer.tokenizer.save_pretrained(path)
            (path / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=1) + "\n")
            if not isinstance(self.tokenizer, HFTokenizer):  # the byte vocabulary, which --model then loads
                (path / BYTE_TOKENIZER_FILE).write_text(json.dumps({"vocab_size": self.tokenizer.vocab_size}) + "\n")
            state = {
                "step": self.step,
                "skipped": self.skipped,
                "generations": self.generations,
                "num_tokens": self.num_tokens,
                "optimizer": self.optimizer.state_dict() if optimizer is None else optimizer,
                "scheduler": self.scheduler.state_dict(),
                "config": self.cfg.to_dict(),
            }
            torch.save(state, path / "trainer_state.pt")
        acc.wait_for_everyone()
        rollout = self.rollout
        keep = rollout is not None and rollout.used < self.cfg.steps_per_generation * self.cfg.num_iterations
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"rollout": asdict(rollout) if keep else None, "rng": rng}, path / f"process_{self.rank}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():  # the same step saved again (e.g. after a resume): the new one replaces it
                shutil.rmtree(final)
            path.rename(final)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> None:
        """Continue from a checkpoint written by `save`, exactly where it stopped: the optimizer, scheduler, counters,
        RNG states and generation batch (`__init__` loads the weights, before the model is distributed)."""
        proc = path / f"process_{self.rank}.pt"
        if not proc.is_file():
            raise FileNotFoundError(f"{proc} is missing: resume with as many processes as the checkpoint was saved by")
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        if state["config"].get("fsdp", False) != self.cfg.fsdp:
            saved = "without" if self.cfg.fsdp else "with"
            raise ValueError(f"{path} was saved {saved} --fsdp: its optimizer state is laid out differently; resume "
                             f"{saved} --fsdp")  # fmt: skip
        if self.cfg.fsdp:  # every process reads the full state and keeps its own shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.policy, self.optimizer.optimizer, state["optimizer"], options=options)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.skipped = state["step"], state["skipped"]
        self.generations, self.num_tokens = state["generations"], state["num_tokens"]
        local = torch.load(proc, map_location="cpu", weights_only=True)
        random.setstate(local["rng"]["python"])
        torch.set_rng_state(local["rng"]["torch"])
        if "cuda" in local["rng"]:
            torch.cuda.set_rng_state_all(local["rng"]["cuda"])
        if local["rollout"] is not None:
            r = Rollout(**local["rollout"])
            r.old_logps = None if r.old_logps is None else r.old_logps.to(self.device)
            r.ref_logps = None if r.ref_logps is None else r.ref_logps.to(self.device)
            self.rollout = r
