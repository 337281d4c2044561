"""The fused loss with an FSDP2-style sharded head: two processes on the gloo backend (CPU), each holding half of the
LM-head weight as a `DTensor`, give the single-process loss and, once gathered, its weight gradient."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from grpo_kernels import GRPOLossConfig, backend, fused_linear_grpo_loss


def _inputs():
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 6, 16, 50
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / 4
    ids, adv = torch.randint(0, V, (B, T), generator=g), torch.randn(B, generator=g)
    return hidden, weight, ids, adv, torch.rand(B, T, generator=g) > 0.2


CONFIG = GRPOLossConfig(loss_type="grpo", entropy_coef=0.05)


def _spawn_two(worker) -> dict:
    """Run `worker(rank, port, out)` in two processes; `out` is the dict they fill."""
    out = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), out), nprocs=2, join=True)
    return out


def _leave() -> None:
    """End a worker once its results are in the shared dict: gloo's threads can abort an interpreter's normal exit
    ("terminate called without an active exception"), which would fail the spawn for no fault of the test."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    hidden, weight, ids, adv, mask = _inputs()
    sharded = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    with backend("torch"):
        loss = fused_linear_grpo_loss(hidden, sharded, ids, adv, mask, config=CONFIG).loss
        loss.backward()
    grad = sharded.grad.full_tensor()
    if rank == 0:
        out["loss"], out["grad"] = loss.detach(), grad
    _leave()


def test_fsdp2_sharded_head_matches_one_process():
    out = _spawn_two(_worker)
    hidden, weight, ids, adv, mask = _inputs()
    w = weight.clone().requires_grad_()
    with backend("torch"):
        loss = fused_linear_grpo_loss(hidden, w, ids, adv, mask, config=CONFIG).loss
        loss.backward()
    assert torch.allclose(out["loss"], loss.detach(), rtol=1e-6, atol=1e-7)
    assert torch.allclose(out["grad"], w.grad, rtol=1e-5, atol=1e-7)


def _tp_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    hidden, weight, ids, adv, mask = _inputs()
    bias = torch.linspace(-1, 1, weight.shape[0])
    V_local = weight.shape[0] // 2
    rows = slice(rank * V_local, (rank + 1) * V_local)
    h = hidden.clone().requires_grad_()
    w, b = weight[rows].clone().requires_grad_(), bias[rows].clone().requires_grad_()
    config = GRPOLossConfig(loss_type="grpo", entropy_coef=0.05, temperature=0.8)
    out_ = fused_linear_grpo_loss(h, w, ids, adv, mask, bias=b, config=config, final_logit_softcapping=3.0,
                                  vocab_process_group=dist.group.WORLD)  # fmt: skip
    out_.loss.backward()
    out[rank] = (out_.loss.detach(), h.grad, w.grad, b.grad)
    _leave()


def test_vocabulary_parallel_head_matches_the_whole_head():
    out = _spawn_two(_tp_worker)
    hidden, weight, ids, adv, mask = _inputs()
    bias = torch.linspace(-1, 1, weight.shape[0])
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    config = GRPOLossConfig(loss_type="grpo", entropy_coef=0.05, temperature=0.8)
    with backend("torch"):
        loss = fused_linear_grpo_loss(h, w, ids, adv, mask, bias=b, config=config, final_logit_softcapping=3.0).loss
        loss.backward()
    for rank in (0, 1):
        r_loss, r_h = out[rank][:2]
        assert torch.allclose(r_loss, loss.detach(), rtol=1e-6, atol=1e-7)
        assert torch.allclose(r_h, h.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(torch.cat([out[0][2], out[1][2]]), w.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(torch.cat([out[0][3], out[1][3]]), b.grad, rtol=1e-5, atol=1e-7)


def _zero3_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config)


def _zero3_batch(rank: int) -> dict:
    """Rank `rank`'s micro-batch: 4 prompt + 5 completion tokens per row, with the completions' loss inputs."""
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    tensors = {"completion_ids": ids[:, 4:], "advantages": torch.randn(3, generator=g),
               "completion_mask": torch.rand(3, 5, generator=g) > 0.2}  # fmt: skip
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "logits_to_keep": 5, "tensors": tensors}


def _zero3_loss(model, batch: dict) -> torch.Tensor:
    import functools

    from grpo_kernels.integrations.trl import _loss_head

    head = functools.partial(_loss_head, tensors=batch["tensors"], config=CONFIG)
    with backend("torch"):
        (loss, *_), _ = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              logits_to_keep=batch["logits_to_keep"], grpo_head=head)  # fmt: skip
    return loss


def _zero3_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", DS_ACCELERATOR="cpu")  # fmt: skip
    import deepspeed

    from grpo_kernels.integrations.trl import _add_hidden_state_forward

    deepspeed.init_distributed(dist_backend="gloo")
    model = _zero3_model()
    _add_hidden_state_forward(model, cast_lm_head_to_fp32=False)
    config = {"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config)
    assert engine.module.lm_head.weight.numel() == 0  # partitioned: the loss must gather it, forward and backward
    loss = _zero3_loss(engine, _zero3_batch(rank))
    engine.backward(loss)
    engine.step()
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        if rank == 0:
            out["params"] = {n: p.detach().clone() for n, p in params.items()}
    _leave()


def test_deepspeed_zero3_head_gets_the_data_parallel_gradient():
    """FusedGRPOTrainer's hidden-state forward under DeepSpeed ZeRO-3 on two gloo processes: the loss runs as the LM
    head's forward, so ZeRO-3 gathers the partitioned head for it and again for its backward; one SGD step (lr 1)
    moves every parameter, the head's included, by minus the mean of the two processes' gradients."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("trl")
    out = _spawn_two(_zero3_worker)
    from grpo_kernels.integrations.trl import _add_hidden_state_forward

    model = _zero3_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _add_hidden_state_forward(model, cast_lm_head_to_fp32=False)
    (sum(_zero3_loss(model, _zero3_batch(rank)) for rank in range(2)) / 2).backward()
    for name, p in model.named_parameters():
        expected = before[name] - p.grad
        assert torch.allclose(out["params"][name], expected, rtol=1e-5, atol=1e-7), name
    assert (model.lm_head.weight.grad.abs() > 0).any()
