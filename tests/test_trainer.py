"""The trainer: the default run learns, one step matches the reference loss on materialised logits, token-budget
micro-batches and packing give the gradient of one big batch, resume continues exactly, two gloo processes train,
and options, rewards and bad values fail clearly."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, free_port

from grpo_kernels import GRPOLossConfig, reference
from grpo_kernels.config import LOSS_TYPES
from trainer import Trainer, TrainerConfig, estimate_memory, format_memory, parse_config, plan_microbatches
from trainer.config import SetupError
from trainer.data import PromptSampler, arithmetic_examples, score
from trainer.loop import Rollout
from trainer.model import MicroBatch, causal_lm, make_optimizer, model_config

ROOT = Path(__file__).resolve().parents[1]


def small(tmp_path: Path, **overrides) -> TrainerConfig:
    """A fast configuration: 4 prompts x 4 completions a step."""
    options = dict(num_prompts=4, num_generations=4, max_steps=2, pretrain_steps=0, output_dir=str(tmp_path),
                   tensorboard=False)  # fmt: skip
    return TrainerConfig(**{**options, **overrides})


def rollout(trainer: Trainer, rows: int = 12, seed: int = 0) -> Rollout:
    """A rollout of random prompts and completions of varied lengths (some stopped with EOS), advantages, and old and
    reference log-probs near the policy's."""
    g = torch.Generator().manual_seed(seed)
    V = trainer.tokenizer.vocab_size
    prompts = [torch.randint(0, 256, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g) for _ in range(rows)]
    completions = []
    for _ in range(rows):
        c = torch.randint(0, V - 1, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)
        if torch.rand(1, generator=g) < 0.5:
            c[-1] = trainer.tokenizer.eos_token_id
        completions.append(c)
    r = Rollout(
        prompt_ids=prompts,
        completion_ids=completions,
        advantages=torch.randn(rows, generator=g),
        num_items=float(sum(len(c) for c in completions)),
        steps=[list(range(rows))],
        metrics={},
    )
    C = max(len(c) for c in completions)
    r.old_logps = torch.randn(rows, C, generator=g) * 0.1 - 5.5
    r.ref_logps = torch.randn(rows, C, generator=g) * 0.1 - 5.5
    return r


def gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in trainer.policy.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


# ---------------------------------------------------------------------------------------------------------------------
# The loss of a step
# ---------------------------------------------------------------------------------------------------------------------


def reference_step(trainer: Trainer, r: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss and gradients the plain way: left-padded prompts + right-padded completions in one batch,
    position ids from the attention mask, the LM head's logits materialised, `reference.linear_grpo_loss`."""
    model = trainer.policy.model
    cfg = trainer.cfg
    B = len(r.prompt_ids)
    P = max(len(p) for p in r.prompt_ids)
    C = max(len(c) for c in r.completion_ids)
    ids = torch.full((B, P + C), trainer.tokenizer.pad_token_id)
    attention = torch.zeros(B, P + C, dtype=torch.long)
    completion_ids = torch.full((B, C), trainer.tokenizer.pad_token_id)
    mask = torch.zeros(B, C, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(r.prompt_ids, r.completion_ids, strict=True)):
        ids[i, P - len(p) : P], attention[i, P - len(p) : P] = p, 1
        ids[i, P : P + len(c)], attention[i, P : P + len(c)] = c, 1
        completion_ids[i, : len(c)], mask[i, : len(c)] = c, True
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    hidden = model.model(input_ids=ids, attention_mask=attention, position_ids=positions).last_hidden_state
    out = reference.linear_grpo_loss(
        hidden[:, P - 1 : -1], model.lm_head.weight, completion_ids, r.advantages, mask, config=cfg.loss_config(),
        old_logps=r.old_logps, ref_logps=r.ref_logps, num_items_in_batch=r.num_items,
    )  # fmt: skip
    out.loss.backward()
    return out.loss.detach(), gradients(trainer)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_step_matches_reference_loss_on_materialised_logits(loss_type, tmp_path):
    cfg = small(tmp_path, loss_type=loss_type, beta=0.04, temperature=0.8, entropy_coef=0.01,
                max_completion_length=11, max_tokens_per_microbatch=1 << 20)  # fmt: skip
    trainer = Trainer(cfg)
    r = rollout(trainer)
    sums = trainer.accumulate(r, list(range(len(r.prompt_ids))))
    grads = gradients(trainer)
    expected_loss, expected = reference_step(trainer, r)
    assert_close(torch.tensor(sums.loss), expected_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert grads.keys() == expected.keys()
    for name in grads:
        assert_close(grads[name], expected[name], atol=1e-6, rtol=1e-4, name=name)


def test_grad_filter_eps_reaches_the_loss(tmp_path):
    """--grad-filter-eps filters the head's backward only: the same loss, other gradients (the untrained model's
    probabilities are all below 0.2); none is exact."""
    results = []
    for eps in (None, 0.2):
        trainer = Trainer(small(tmp_path / str(eps), grad_filter_eps=eps))
        sums = trainer.accumulate(rollout(trainer), list(range(12)))
        results.append((sums.loss, gradients(trainer)))
    (loss, exact), (filtered_loss, filtered) = results
    assert filtered_loss == loss
    assert filtered.keys() == exact.keys()
    assert not torch.equal(filtered["model.model.embed_tokens.weight"], exact["model.model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="grad_filter_eps must lie in"):
        TrainerConfig(grad_filter_eps=1.5)


def test_loss_strategy_and_chunk_budget_reach_the_loss(tmp_path, monkeypatch):
    """--loss-strategy and --loss-chunk-mib pick the fused loss's schedule for the policy's loss (its backward
    included): tiles with a 64 KiB budget forms its gradients in vocabulary blocks, and the step's loss and gradients
    equal the default schedule's; --dry-run-memory's loss workspace follows the budget."""
    import grpo_kernels.fused_linear as fl

    blocks = []
    real = fl.cpu.block_grad
    monkeypatch.setattr(fl.cpu, "block_grad", lambda z, *a: blocks.append(z.shape) or real(z, *a))
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, "cpu", 1)
    results = []
    for options in ({}, {"loss_strategy": "tiles", "loss_chunk_mib": 1 / 16}):
        trainer = Trainer(small(tmp_path / str(len(options)), **options))
        sums = trainer.accumulate(rollout(trainer), list(range(12)))
        results.append((sums.loss, gradients(trainer)))
        assert bool(blocks) == bool(options)
        assert all(rows * cols * 4 <= 1 << 16 for rows, cols in blocks)
    (loss, grads), (tiled_loss, tiled) = results
    assert_close(torch.tensor(tiled_loss), torch.tensor(loss), atol=1e-6, rtol=1e-5, name="loss")
    for name in grads:
        assert_close(tiled[name], grads[name], atol=1e-6, rtol=1e-4, name=name)
    workspace = {}
    for mib in (1.0, 4.0):
        cfg = small(tmp_path, loss_chunk_mib=mib, max_tokens_per_microbatch=1 << 14)
        workspace[mib] = {name: n for name, n, _ in estimate_memory(cfg, model_config(cfg))}["loss workspace"]
    assert workspace[4.0] - workspace[1.0] >= 2 << 20  # at least 3 MiB more of fp32 logits (and their temporaries)


def test_old_and_reference_logprobs_come_from_hidden_states(tmp_path):
    trainer = Trainer(small(tmp_path, beta=0.04, num_iterations=2))
    r = rollout(trainer)
    logps = trainer._logprobs(trainer.policy, r)
    model = trainer.policy.model
    for i, (p, c) in enumerate(zip(r.prompt_ids, r.completion_ids, strict=True)):
        logits = model(input_ids=torch.cat([p, c])[None]).logits[0, len(p) - 1 : -1]
        expected = reference.selective_log_softmax(logits, c, trainer.cfg.temperature)
        assert_close(logps[i, : len(c)], expected, atol=1e-5, rtol=1e-5, name=f"row {i}")
        assert (logps[i, len(c) :] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# Micro-batches
# ---------------------------------------------------------------------------------------------------------------------


def test_plan_microbatches_keeps_the_budget():
    lengths = [5, 30, 7, 7, 12, 3, 40, 9]
    for packed in (False, True):
        plan = plan_microbatches(lengths, 24, packed)
        assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
        for mb in plan:
            cost = sum(lengths[i] for i in mb) if packed else len(mb) * max(lengths[i] for i in mb)
            assert cost <= 24 or len(mb) == 1, (mb, cost)
    assert [len(mb) for mb in plan_microbatches([5] * 10, 1000, False)] == [10]
    assert plan_microbatches([100, 1], 10, True) == [[0], [1]]  # a long sequence alone, still trained


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_token_budget_microbatches_and_packing_give_the_big_batch_gradient(loss_type, tmp_path):
    trainer = Trainer(small(tmp_path, loss_type=loss_type, beta=0.04))
    r = rollout(trainer, rows=16)
    rows = list(range(16))
    variants = {"one batch": (1 << 20, False), "budget 24": (24, False), "packed, budget 30": (30, True)}
    results = {}
    for name, (budget, packed) in variants.items():
        trainer.cfg = dataclasses.replace(trainer.cfg, max_tokens_per_microbatch=budget, packing=packed)
        assert (len(trainer._plan(r, rows)) == 1) == (budget > 1000)
        sums = trainer.accumulate(r, rows)
        results[name] = (sums.loss, gradients(trainer))
    loss, grads = results.pop("one batch")
    for name, (other_loss, other) in results.items():
        assert math.isclose(other_loss, loss, rel_tol=1e-5, abs_tol=1e-7), (name, other_loss, loss)
        for k in grads:
            assert_close(other[k], grads[k], atol=1e-6, rtol=1e-4, name=f"{name}: {k}")


def test_packed_microbatch_predicts_each_completion_from_its_own_sequence(tmp_path):
    trainer = Trainer(small(tmp_path))
    r = rollout(trainer, rows=5)
    rows = list(range(5))
    padded = MicroBatch.build(r.prompt_ids, r.completion_ids, rows, packed=False, pad_token_id=256, device="cpu")
    packed = MicroBatch.build(r.prompt_ids, r.completion_ids, rows, packed=True, pad_token_id=256, device="cpu")
    assert packed.input_ids.shape == (
        1,
        sum(len(p) + len(c) for p, c in zip(r.prompt_ids, r.completion_ids, strict=True)),
    )
    for mb in (padded, packed):  # the token at each gathered position is the one before the completion token
        flat = mb.input_ids.reshape(-1)
        nxt = flat[(mb.index + 1).clamp(max=flat.numel() - 1)]
        assert torch.equal(
            torch.where(mb.completion_mask.bool(), nxt, 0), torch.where(mb.completion_mask.bool(), mb.completion_ids, 0)
        )
    policy = trainer.policy
    with torch.no_grad():
        assert_close(policy.hidden_states(packed), policy.hidden_states(padded), atol=1e-5, rtol=1e-5, name="hidden")


# ---------------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------------


def test_default_run_learns(tmp_path):
    """A shortened default run: the answer accuracy of the last 20 of 120 steps beats that of the first 20."""
    history = Trainer(TrainerConfig(max_steps=120, output_dir=str(tmp_path), tensorboard=False)).train()
    accuracy = [m["rewards/answer/mean"] for m in history]
    first, last = sum(accuracy[:20]) / 20, sum(accuracy[-20:]) / 20
    assert last > first + 0.15, (first, last)
    assert history[-1]["reward"] > history[0]["reward"]


def test_resume_continues_exactly(tmp_path):
    common = dict(max_steps=3, steps_per_generation=2, beta=0.04)
    full = Trainer(small(tmp_path / "full", save_steps=1, **common)).train()
    resumed_trainer = Trainer(small(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-1"), **common))
    assert resumed_trainer.rollout is not None  # checkpoint-1 is half-way through a generation batch
    resumed = resumed_trainer.train()
    assert [m["step"] for m in resumed] == [2, 3]
    for a, b in zip(full[1:], resumed, strict=True):
        for key in ("reward", "loss", "kl", "grad_norm", "completions/mean_length"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    w_full = dict(
        Trainer(
            small(tmp_path / "x", resume=str(tmp_path / "full" / "checkpoint-3"), **common)
        ).policy.named_parameters()
    )
    w_resumed = Trainer(small(tmp_path / "y", resume=str(tmp_path / "resumed" / "checkpoint-3"), **common)).policy
    for name, p in w_resumed.named_parameters():
        assert torch.equal(p, w_full[name]), name


def test_an_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(small(tmp_path, max_steps=1, save_steps=1))
    trainer.train()
    first = trainer.save()  # the same step again: replaces the checkpoint
    assert first == tmp_path / "checkpoint-1" and (first / "process_0.pt").is_file()
    trainer.step = 2
    real_save = torch.save

    def interrupted(obj, f, *args, **kwargs):
        if str(f).endswith("process_0.pt"):
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.setattr(torch, "save", real_save)
    assert not (tmp_path / "checkpoint-2").exists() and (tmp_path / ".checkpoint-2.partial").is_dir()
    resumed = Trainer(small(tmp_path, max_steps=1, resume="latest"))  # the complete checkpoint
    assert resumed.step == 1
    trainer.save()  # a later save clears what the interrupted one left
    assert (tmp_path / "checkpoint-2" / "process_0.pt").is_file() and not (tmp_path / ".checkpoint-2.partial").exists()
    with pytest.raises(SetupError, match="not a checkpoint"):
        Trainer(small(tmp_path, resume=str(tmp_path / "missing")))


def test_lora_reference_is_the_base_model_with_adapters_disabled(tmp_path):
    pytest.importorskip("peft")
    common = dict(lora_r=4, max_steps=3, steps_per_generation=2)
    trainer = Trainer(small(tmp_path / "lora", save_steps=1, **common))
    assert trainer.ref_policy is None
    history = trainer.train()
    assert history[-1]["kl"] > 0
    base = Trainer(small(tmp_path / "base", beta=0.0))  # the same initial weights, no adapters
    r = rollout(trainer)
    with trainer.policy.model.disable_adapter():
        ref = trainer._logprobs(trainer.policy, r)
    assert_close(ref, base._logprobs(base.policy, r), atol=1e-6, rtol=1e-6, name="reference log-probs")
    resumed = Trainer(small(tmp_path / "resumed", resume=str(tmp_path / "lora" / "checkpoint-1"), **common)).train()
    assert [m["loss"] for m in resumed] == [m["loss"] for m in history[1:]]
    # the last checkpoint as --model: the tiny base rebuilt from the run's options, its adapters merged in
    merged = trainer.policy.model.merge_and_unload()
    started = Trainer(small(tmp_path / "from-lora", model=str(tmp_path / "lora" / "checkpoint-3"), max_steps=1))
    weights = dict(causal_lm(started.policy).named_parameters())
    assert weights.keys() == dict(merged.named_parameters()).keys()
    for name, p in merged.named_parameters():
        assert_close(weights[name], p, atol=1e-6, rtol=1e-6, name=name)
        assert weights[name].requires_grad, name


def test_run_writes_metrics_curves_and_checkpoint(tmp_path):
    history = Trainer(small(tmp_path, beta=0.04)).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows == history
    for key in ("reward", "reward_std", "rewards/answer/mean", "rewards/format/std", "kl", "entropy", "loss",
                "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio", "tokens_per_second",
                "peak_memory_gib", "learning_rate", "grad_norm", "skipped_steps"):  # fmt: skip
        assert key in rows[0], key
    assert (tmp_path / "checkpoint-2" / "config.json").is_file()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_tensorboard_logs_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    Trainer(small(tmp_path, max_steps=1, tensorboard=True)).train()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def tiny_hub_model(path: Path) -> None:
    """A Llama with a character-level Hugging Face tokenizer, saved as `from_pretrained` reads it, and a dataset."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokens = ["<pad>", "<s>", "</s>", "<unk>", *"0123456789+-=?#., abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)  # fmt: skip
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    rows = [{"question": "what is 2+2?", "answer": "2+2 = 4. #### 4"}, {"question": "what is 3+4?", "answer": "#### 7"}]
    (path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_hugging_face_model_and_dataset(tmp_path):
    tiny_hub_model(tmp_path / "hub")
    cfg = small(tmp_path / "run", model=str(tmp_path / "hub"), dataset=str(tmp_path / "hub" / "data.jsonl"),
                reward_funcs=["math", "stop"], num_prompts=2, max_completion_length=12, packing=True)  # fmt: skip
    history = Trainer(cfg).train()
    assert [m["step"] for m in history] == [1, 2] and "rewards/math/mean" in history[-1]
    assert (tmp_path / "run" / "checkpoint-2" / "tokenizer.json").is_file()
    resumed = Trainer(dataclasses.replace(cfg, resume="latest", max_steps=3)).train()
    assert [m["step"] for m in resumed] == [3]


def test_nan_reward_and_nan_loss_skip_the_step_without_touching_the_weights(tmp_path, monkeypatch):
    def broken(*, completions, **kwargs):
        return [math.inf] * len(completions)

    cfg = small(tmp_path, max_steps=1, reward_funcs=["answer"], reward_weights=[1.0])
    trainer = Trainer(cfg, reward_functions={"broken": broken})
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    with pytest.warns(RuntimeWarning, match="broken returned NaN or infinite"):
        history = trainer.train()
    assert history[-1]["skipped_steps"] == 1
    for n, p in trainer.policy.named_parameters():
        assert torch.equal(p, before[n]), n

    trainer = Trainer(small(tmp_path / "loss", max_steps=2))
    forward = trainer.policy.forward

    calls = []

    def nan_loss_once(mb, loss=None, temperature=1.0):
        out = forward(mb, loss, temperature)
        if loss is not None and not calls:
            calls.append(1)
            out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(trainer.policy, "forward", nan_loss_once)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    with pytest.warns(RuntimeWarning, match="NaN or infinite; skipping the step"):
        trainer.optimize(*_first_step(trainer))
    assert trainer.skipped == 1 and not trainer.optimizer.state
    for n, p in trainer.policy.named_parameters():
        assert torch.equal(p, before[n]), n
    history = trainer.train()  # the next step trains
    assert history[-1]["skipped_steps"] == 1 and history[-1]["grad_norm"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.policy.named_parameters())


def _first_step(trainer: Trainer) -> tuple[Rollout, list[int]]:
    r, _ = trainer.generate()
    trainer.rollout = r
    return r, r.steps[0]


def _launch_two(output_dir: Path, *options: str) -> str:
    """`accelerate launch` of a short run on two processes (on the CPU: gloo); returns its standard output."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "trainer", "--max-steps", "2", "--num-prompts", "4", "--num-generations", "4", "--pretrain-steps", "0",
           "--max-tokens-per-microbatch", "40", "--output-dir", str(output_dir), "--no-tensorboard",
           *options]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_on_gloo_train(tmp_path):
    """`accelerate launch` with two processes; without GPUs they run on the CPU and all-reduce over gloo. Standard
    output holds the main process's metrics lines alone (no library's warning, e.g. DeepSpeed's accelerator pick)."""
    out = _launch_two(tmp_path)
    assert [line.split(" | ")[0] for line in out.splitlines()] == ["step 1", "step 2"], out
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2]
    assert (tmp_path / "checkpoint-2" / "process_1.pt").is_file()


def test_fsdp_shards_over_two_gloo_processes_and_trains_as_ddp(tmp_path):
    """`--fsdp`: every parameter of the policy is a DTensor shard, half on each process; the steps (generation on the
    sharded model, loss, clipping, KL to the sharded reference) give DDP's metrics and weights; the checkpoint holds
    the full weights, and `--resume latest` continues exactly."""
    from safetensors.torch import load_file

    with pytest.raises(ValueError, match="--fsdp shards the model over processes"):
        Trainer(small(tmp_path / "one", fsdp=True))
    options = ("--pretrain-steps", "50", "--beta", "0.04")  # a policy whose rewards vary, and a reference model
    ddp, fsdp, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    _launch_two(ddp, *options)
    out = _launch_two(fsdp, *options, "--fsdp", "--save-steps", "1")
    found = re.search(r"FSDP2: policy: (\d+) of (\d+) parameters are DTensors sharded over (\d+) processes; this "
                      r"process holds ([\d,]+) of ([\d,]+) values", out)  # fmt: skip
    assert found, out[-2000:]
    sharded, params, processes, local, total = (int(g.replace(",", "")) for g in found.groups())
    assert sharded == params > 0 and processes == 2 and total / 2 <= local < 0.51 * total, found.group(0)
    a, b = _metrics(ddp), _metrics(fsdp)
    assert [m["step"] for m in b] == [1, 2] and a[0]["reward_std"] > 0
    for x, y in zip(a, b, strict=True):
        for key in ("reward", "loss", "grad_norm", "kl", "entropy", "completions/mean_length"):
            assert math.isclose(x[key], y[key], rel_tol=1e-5, abs_tol=1e-9), (x["step"], key, x[key], y[key])
    w_ddp, w_fsdp = (load_file(d / "checkpoint-2" / "model.safetensors") for d in (ddp, fsdp))
    assert w_ddp.keys() == w_fsdp.keys()  # full weights, the tied head saved once, as save_pretrained does
    for name in w_ddp:
        assert_close(w_fsdp[name], w_ddp[name], atol=1e-6, rtol=1e-5, name=name)

    shutil.copytree(fsdp / "checkpoint-1", resumed / "checkpoint-1")
    _launch_two(resumed, *options, "--fsdp", "--resume", "latest")
    assert [m["step"] for m in _metrics(resumed)] == [2]
    for key in ("reward", "loss", "grad_norm", "kl"):
        assert _metrics(resumed)[0][key] == b[1][key], key
    w_resumed = load_file(resumed / "checkpoint-2" / "model.safetensors")
    for name in w_fsdp:  # the same weights after step 2: the optimizer state came back too
        assert torch.equal(w_resumed[name], w_fsdp[name]), name


# ---------------------------------------------------------------------------------------------------------------------
# Options, data, rewards
# ---------------------------------------------------------------------------------------------------------------------


def test_loss_options_are_grpo_loss_config_fields_with_its_defaults():
    cfg = TrainerConfig()
    for f in dataclasses.fields(GRPOLossConfig):
        assert hasattr(cfg, f.name), f.name
        if f.name not in ("max_completion_length", "beta"):  # the built-in task's short completions, and its KL
            assert getattr(cfg, f.name) == f.default, f.name
    assert cfg.loss_config() == GRPOLossConfig(max_completion_length=cfg.max_completion_length, beta=cfg.beta)


def test_command_line_yaml_and_help(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("loss_type: grpo\nbeta: 0.04\nreward-weights: [1, 0.5]\nepsilon_high: 0.28\nlearning_rate: 1e-6\n")
    cfg = parse_config(["--config", str(path), "--beta", "0.1", "--no-gradient-checkpointing", "--delta", "none"])
    assert (cfg.loss_type, cfg.beta, cfg.reward_weights, cfg.epsilon_high) == ("grpo", 0.1, [1.0, 0.5], 0.28)
    assert cfg.learning_rate == 1e-6
    assert cfg.gradient_checkpointing is False and cfg.delta is None
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainerConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "max_tokens_per_microbatch" not in text and "token budget of a micro-batch" in " ".join(text.split())
    path.write_text("los_type: grpo\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)])
    assert "unknown options los_type" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--loss-type", "ppo"])
    assert "loss_type must be one of" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_generations": 1}, "num_generations must be >= 2"),
        ({"reward_weights": [1.0]}, "reward_weights has 1 values but reward_funcs has 2"),
        ({"num_prompts": 3, "num_generations": 3, "steps_per_generation": 2}, "does not split evenly"),
        ({"max_tokens_per_microbatch": 0}, "max_tokens_per_microbatch must be a positive int"),
        ({"loss_type": "dr_grpo", "epsilon": -1.0}, "epsilon must be >= 0"),
        ({"lr_scheduler": "step"}, "lr_scheduler must be one of"),
        ({"optimizer": "adam8bit"}, "optimizer must be one of adamw, adafactor, sgd"),
        ({"loss_strategy": "blocks"}, "loss_strategy must be one of chunked, fused, vocab-blocks, tiles, scratch"),
        ({"loss_chunk_mib": 0.0}, "loss_chunk_mib must be a positive, finite number"),
        ({"loss_chunk_mib": float("inf")}, "loss_chunk_mib must be a positive, finite number"),
        ({"loss_strategy": "tiles", "grad_filter_eps": 0.001}, "loss_strategy tiles does not filter gradients"),
        ({"loss_strategy": "scratch", "grad_filter_eps": 0.001}, "loss_strategy scratch does not filter gradients"),
        ({"dtype": "float16"}, "dtype float16 is not supported: the weights and AdamW's state would be fp16"),
        ({"scale_rewards": "bogus"}, "scale_rewards must be one of group, batch, none"),
        ({"multi_objective_aggregation": "mean"}, "multi_objective_aggregation must be one of sum_then_normalize"),
        ({"seed": -1}, "seed must be an int in \\[0, 2\\*\\*32\\)"),
        ({"reward_funcs": ["bogus"], "reward_weights": [1.0]}, "unknown reward function 'bogus' in reward_funcs"),
        ({"reward_funcs": ["bogus"]}, "unknown reward function 'bogus'"),  # named before the weights' count
    ],
)
def test_bad_options_fail_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig(**overrides)


def test_what_the_options_name_fails_in_one_line(tmp_path, capsys):
    """A missing model, dataset, checkpoint, YAML file or reward module, a malformed dataset or YAML file and a bad
    YAML value: `python -m trainer` prints one error line naming the option (exit 2), no traceback."""
    from trainer.__main__ import main

    bad_jsonl, bad_yaml, bad_value = tmp_path / "bad.jsonl", tmp_path / "bad.yaml", tmp_path / "value.yaml"
    bad_jsonl.write_text('{"question": "1+1", "answer": \n')
    bad_yaml.write_text("learning_rate: [1\n")
    bad_value.write_text("learning_rate: abc\n")
    common = ["--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--pretrain-steps", "0", "--num-prompts", "2",
              "--num-generations", "2", "--no-tensorboard"]  # fmt: skip
    for argv, message in [
        (["--model", str(tmp_path / "missing")], f"--model {tmp_path / 'missing'}: no such directory"),
        (["--dataset", str(tmp_path / "missing.jsonl")], "no such .json, .jsonl, .csv or .parquet file"),
        (["--dataset", str(bad_jsonl)], f"--dataset {bad_jsonl} (split 'train'): cannot load it"),
        (["--resume", str(tmp_path)], f"--resume {tmp_path}: {tmp_path} is not a checkpoint"),
        (["--resume", "latest"], "--resume latest: no checkpoint-*/ in"),
        (
            ["--reward-funcs", "no_such_module:score", "--reward-weights", "1"],
            "reward function 'no_such_module:score': cannot import 'no_such_module'",
        ),
    ]:
        assert main([*argv, *common]) == 2, argv
        err = capsys.readouterr().err  # the last line (the datasets library logs what it could not read before it)
        line = err.strip().splitlines()[-1]
        assert line.startswith("python -m trainer: error: ") and message in line, err
        assert "Traceback" not in err
    for path, message in [(tmp_path / "none.yaml", "cannot read it"), (bad_yaml, "not valid YAML"),
                          (bad_value, "learning_rate cannot be 'abc'")]:  # fmt: skip
        with pytest.raises(SystemExit):
            parse_config(["--config", str(path)])
        err = capsys.readouterr().err
        assert str(path) in err and message in err, err


def test_resume_refuses_other_options_and_a_new_run_old_checkpoints(tmp_path):
    """A resumed run continues its checkpoint's run: options that would not take effect (the learning rate, whose
    optimizer and scheduler state are restored) or would change the run (the seed, from which the reference model is
    rebuilt) are an error naming them, while how long it runs and how it computes its steps may change. A new run in
    an output_dir that holds checkpoints is an error (`--resume latest` would mix the two) unless
    `overwrite_output_dir` deletes them. A checkpoint of the tiny model loads with `--model` (its byte tokenizer)."""
    Trainer(small(tmp_path, max_steps=1, beta=0.04)).train()
    with pytest.raises(SetupError, match=r"other options: learning_rate \(0.0003 there, 0.1 here\); seed \(0 there, 7"):
        Trainer(small(tmp_path, max_steps=2, beta=0.04, resume="latest", learning_rate=0.1, seed=7))
    resumed = Trainer(small(tmp_path, max_steps=2, beta=0.04, resume="latest", max_tokens_per_microbatch=64))
    assert resumed.step == 1
    with pytest.raises(SetupError, match="holds checkpoints of an earlier run \\(checkpoint-1\\)"):
        Trainer(small(tmp_path, max_steps=1))
    again = Trainer(small(tmp_path, max_steps=1, overwrite_output_dir=True))
    assert not (tmp_path / "checkpoint-1").exists() and again.step == 0
    again.train()
    tiny = Trainer(small(tmp_path / "from-checkpoint", model=str(tmp_path / "checkpoint-1"), max_steps=1))
    assert tiny.tokenizer.vocab_size == again.tokenizer.vocab_size
    for (name, p), q in zip(tiny.policy.named_parameters(), again.policy.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_resume_latest_alone_takes_the_checkpoints_options(tmp_path):
    """`--resume latest` with no other option continues the run with the options it was saved with (the learning
    rate, loss and group sizes of its checkpoint, not the defaults); the command line and --config still set what a
    resumed run may change, and where it writes is this run's own."""
    run = ["--output-dir", str(tmp_path), "--max-steps", "1", "--pretrain-steps", "0", "--num-prompts", "2",
           "--num-generations", "3", "--learning-rate", "0.002", "--loss-type", "grpo", "--beta", "0.02",
           "--no-tensorboard"]  # fmt: skip
    first = parse_config(run)
    Trainer(first).train()
    resumed = parse_config(["--resume", "latest", "--output-dir", str(tmp_path)])
    assert resumed == dataclasses.replace(first, resume="latest")
    (tmp_path / "more.yaml").write_text("max_steps: 3\n")
    longer = parse_config(["--resume", "latest", "--output-dir", str(tmp_path), "--config", str(tmp_path / "more.yaml"),
                           "--max-tokens-per-microbatch", "64"])  # fmt: skip
    assert longer == dataclasses.replace(first, resume="latest", max_steps=3, max_tokens_per_microbatch=64)
    trainer = Trainer(longer)
    assert trainer.step == 1
    assert [m["step"] for m in trainer.train()] == [2, 3]
    elsewhere = parse_config(["--resume", str(tmp_path / "checkpoint-3"), "--output-dir", str(tmp_path / "next")])
    assert elsewhere.output_dir == str(tmp_path / "next") and elsewhere.learning_rate == 0.002


def test_reward_functions_that_misbehave_fail_clearly():
    kwargs = dict(prompts=["1+1="] * 2, completions=["2", "3"], answers=["2", "2"], stopped=[True, False])

    def raises(**kw):
        raise KeyError("answer")

    with pytest.raises(RuntimeError, match="reward function 'raises' raised KeyError"):
        score(["raises"], [raises], **kwargs)
    with pytest.raises(ValueError, match="'short' returned 1 values for 2 completions"):
        score(["short"], [lambda **kw: [1.0]], **kwargs)
    with pytest.raises(TypeError, match="'text' returned 'yes' for completion 0"):
        score(["text"], [lambda **kw: ["yes", 1.0]], **kwargs)
    with pytest.raises(TypeError, match=re.escape("'pair' returned tensor([1., 2.]) for completion 1")):
        score(["pair"], [lambda **kw: [1.0, torch.tensor([1.0, 2.0])]], **kwargs)
    with pytest.raises(TypeError, match="'complex' returned 1j for completion 0"):
        score(["complex"], [lambda **kw: [1j, 1.0]], **kwargs)
    rewards, invalid = score(["ok", "none"], [lambda **kw: [1.0, math.nan], lambda **kw: [None, 0.5]], **kwargs)
    assert torch.equal(invalid, torch.tensor([[False, False], [True, False]]))
    assert math.isnan(rewards[0, 1]) and rewards[1, 1] == 0.5
    # NumPy scalars and one-element arrays and tensors, as reward code built on NumPy returns them
    np = pytest.importorskip("numpy")
    functions = [lambda **kw: [np.float32(0.25), np.int64(1)], lambda **kw: [np.array(0.5), torch.tensor([True])]]
    rewards, invalid = score(["numpy", "arrays"], functions, **kwargs)
    assert rewards.tolist() == [[0.25, 0.5], [1.0, 1.0]] and not invalid.any()


def test_built_in_rewards():
    from trainer.data import answer_reward, format_reward, math_reward, stop_reward

    completions = ["7", "7x", " 7 ", "\\boxed{7}", "²", "", "12"]
    answers = ["7"] * 6 + ["12"]
    stopped = [True, True, True, False, True, True, False]
    assert answer_reward(completions=completions, answers=answers) == [1, 0, 1, 1, 0, 0, 1]
    assert format_reward(completions=completions, stopped=stopped) == [1, 0.5, 0, 0, 0, 0, 0.5]
    assert stop_reward(stopped=stopped) == [float(s) for s in stopped]
    got = math_reward(completions=["so the answer is 1,234.", "\\boxed{12}", "no"], answers=["1234", "12", "3"])
    assert got == [1.0, 1.0, 0.0]


def test_prompts_depend_only_on_the_seed_and_the_batch_index():
    examples = arithmetic_examples()
    assert len(examples) == 55 and all(str(eval(e.prompt[:-1])) == e.answer for e in examples)
    a, b = PromptSampler(examples, seed=3), PromptSampler(examples, seed=3)
    b.batch(7, 16)
    assert a.batch(2, 16) == b.batch(2, 16) and a.batch(9, 16) == b.batch(9, 16)
    epoch = [e for i in range(5) for e in a.batch(i, 11)]
    assert sorted(epoch, key=lambda e: e.prompt) == sorted(examples, key=lambda e: e.prompt)


def test_dataset_file_examples(tmp_path):
    from trainer.data import dataset_examples

    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"q": "2+2?", "a": "think... #### 4"}) + "\n" + json.dumps({"q": "3", "a": "5"}) + "\n")
    examples = dataset_examples(str(path), None, "train", "q", "a")
    assert [(e.prompt, e.answer) for e in examples] == [("2+2?", "4"), ("3", "5")]
    with pytest.raises(ValueError, match="has no column 'question'"):
        dataset_examples(str(path), None, "train", "question", "a")
    rows = [{"q": "1+1?", "a": "2"}, {"q": None, "a": "3"}, {"q": "  ", "a": "4"}, {"q": "2+2?", "a": ""}]
    for bad, row in ((1, rows[:2]), (1, [rows[0], rows[2]]), (1, [rows[0], rows[3]])):
        path.write_text("".join(json.dumps(r) + "\n" for r in row))
        with pytest.raises(ValueError, match=f"row {bad}: '[qa]' is empty"):
            dataset_examples(str(path), None, "train", "q", "a")


def test_dry_run_memory_report(tmp_path):
    cfg = TrainerConfig(beta=0.04, max_tokens_per_microbatch=8192)
    items = {name: n for name, n, _ in estimate_memory(cfg, model_config(cfg))}
    assert items["reference model"] == items["weights"] > 0
    assert items["optimizer (adamw)"] == 2 * items["gradients"]
    assert items["estimated peak"] >= items["weights"] + items["optimizer (adamw)"]
    sharded = {name: n for name, n, _ in estimate_memory(dataclasses.replace(cfg, fsdp=True), model_config(cfg), 2)}
    assert sharded["weights"] == items["weights"] // 2 and 0 < sharded["gathered weights"] <= items["weights"]
    done = subprocess.run([sys.executable, "-m", "trainer", "--dry-run-memory", "--output-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "estimated peak" in done.stdout and not (tmp_path / "metrics.jsonl").exists()
    assert "GiB" in format_memory(estimate_memory(TrainerConfig(), model_config(TrainerConfig())))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "sgd"])
def test_optimizer_state_estimate_is_what_the_optimizer_keeps(optimizer, tmp_path):
    """--dry-run-memory's optimizer line is the bytes of state the chosen optimizer holds after a step of the model
    (step counters aside), and the peak moves with it."""
    from transformers import AutoModelForCausalLM

    cfg = small(tmp_path, optimizer=optimizer)
    model = AutoModelForCausalLM.from_config(model_config(cfg))
    opt = make_optimizer(cfg, list(model.parameters()))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    kept = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k != "step")
    items = {name: n for name, n, _ in estimate_memory(cfg, model_config(cfg))}
    assert items[f"optimizer ({optimizer})"] == kept
    adamw = {name: n for name, n, _ in estimate_memory(small(tmp_path), model_config(cfg))}
    assert items["estimated peak"] - adamw["estimated peak"] == kept - adamw["optimizer (adamw)"]


def test_memory_light_optimizers_train_and_resume(tmp_path):
    """--optimizer adafactor and sgd: the optimizer asked for, steps that change the weights, and a resumed run whose
    second step (Adafactor's state restored from the checkpoint) is the uninterrupted run's."""
    full = Trainer(small(tmp_path / "full", optimizer="adafactor", save_steps=1))
    assert type(full.optimizer.optimizer) is torch.optim.Adafactor
    metrics = full.train()
    resumed = Trainer(small(tmp_path / "resumed", optimizer="adafactor",
                           resume=str(tmp_path / "full" / "checkpoint-1")))  # fmt: skip
    again = resumed.train()
    assert [m["step"] for m in again] == [2]
    for key in ("loss", "grad_norm", "reward"):
        assert again[0][key] == metrics[1][key], key
    sgd = Trainer(small(tmp_path / "sgd", optimizer="sgd", max_steps=1))
    assert type(sgd.optimizer.optimizer) is torch.optim.SGD and not sgd.optimizer.optimizer.state_dict()["state"]
    before = {n: p.detach().clone() for n, p in sgd.policy.named_parameters()}
    sgd.train()
    assert any(not torch.equal(p, before[n]) for n, p in sgd.policy.named_parameters())
