"""The fused loss with an FSDP2-style sharded head: two processes on the gloo backend (CPU), each holding half of the
LM-head weight as a `DTensor`, give the single-process loss and, once gathered, its weight gradient."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_kernels import GRPOLossConfig, backend, fused_linear_grpo_loss


def _inputs():
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 6, 16, 50
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / 4
    ids, adv = torch.randint(0, V, (B, T), generator=g), torch.randn(B, generator=g)
    return hidden, weight, ids, adv, torch.rand(B, T, generator=g) > 0.2


CONFIG = GRPOLossConfig(loss_type="grpo", entropy_coef=0.05)


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
    dist.destroy_process_group()


def test_fsdp2_sharded_head_matches_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
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
    dist.destroy_process_group()


def test_vocabulary_parallel_head_matches_the_whole_head():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_tp_worker, args=(port, out), nprocs=2, join=True)
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
