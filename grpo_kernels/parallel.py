"""Vocabulary-parallel heads (tensor parallelism): each rank of a process group holds a contiguous shard of the head,
rows `[rank * V_local, (rank + 1) * V_local)` of the full `[V, H]` weight, and the same hidden states.

Forward, per chunk of tokens, each rank folds its shard's logits into log-sum-exp statistics (`m`, `s`,
`u = sum e * (z - m)`) and the target logit when the target is in its shard; three all-reduces (max, then two sums)
combine them into the full vocabulary's log-probs and entropies, identical on every rank. Backward, each rank forms
its shard's logits gradient from the global statistics: `d_weight` stays local, `d_hidden` and `d_bias`'s shard
too, and one all-reduce sums `d_hidden`. The logits of a chunk exist for the local shard only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from grpo_kernels import cpu
from grpo_kernels.config import HeadOptions


def _chunks(n: int, vocab: int) -> list[slice]:
    size = max(64, cpu.CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _local_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, head: HeadOptions):
    """Raw and transformed logits of the shard, in fp32 (fp64 kept)."""
    x = h @ weight.t()
    if bias is not None:
        x = x + bias
    x = x.to(cpu.math_dtype(x))
    z = x * head.logit_scale
    if head.final_logit_softcapping is not None:
        z = head.final_logit_softcapping * torch.tanh(z / head.final_logit_softcapping)
    return x, z / head.temperature


class VocabParallelLogProbs(torch.autograd.Function):
    """`(hidden [N, H], weight shard [V_local, H], bias shard | None, ids [N] (global), group, HeadOptions)
    -> (logp [N], entropy [N])`, the same on every rank of `group`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, group, head: HeadOptions):
        V_local = weight.shape[0]
        start = dist.get_rank(group) * V_local
        local = ids.long() - start
        inside = (local >= 0) & (local < V_local)
        n = hidden.shape[0]
        dtype = cpu.math_dtype(hidden)
        m, log_s, logp, entropy = (torch.empty(n, dtype=dtype, device=hidden.device) for _ in range(4))
        for sl in _chunks(n, V_local):
            _, z = _local_logits(hidden[sl], weight, bias, head)
            m_r = z.amax(-1)
            dist.all_reduce(m_r, dist.ReduceOp.MAX, group=group)
            zc = z - m_r[:, None]
            e = zc.exp()
            stats = torch.stack((e.sum(-1), (e * zc).sum(-1)))
            target = zc.gather(-1, local[sl].clamp(0, V_local - 1)[:, None]).squeeze(-1)
            stats = torch.cat((stats, torch.where(inside[sl], target, 0)[None]))
            dist.all_reduce(stats, group=group)
            s, u, zy = stats
            m[sl], log_s[sl] = m_r, s.log()
            logp[sl] = zy - log_s[sl]
            entropy[sl] = log_s[sl] - u / s
        ctx.save_for_backward(hidden, weight, bias, local, inside, m, log_s, entropy)
        ctx.group, ctx.head = group, head
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, local, inside, m, log_s, entropy = ctx.saved_tensors
        head = ctx.head
        V_local = weight.shape[0]
        d_h = torch.zeros(hidden.shape, dtype=cpu.math_dtype(hidden), device=hidden.device)
        d_w = torch.zeros_like(weight, dtype=d_h.dtype)
        d_b = None if bias is None else torch.zeros_like(bias, dtype=d_h.dtype)
        g = torch.zeros_like(entropy) if grad_logp is None else grad_logp.to(entropy.dtype)
        for sl in _chunks(hidden.shape[0], V_local):
            x, z = _local_logits(hidden[sl], weight, bias, head)
            logp = z - m[sl, None] - log_s[sl, None]
            p = logp.exp()
            dz = -g[sl, None] * p
            rows = inside[sl].nonzero().squeeze(-1)
            dz[rows, local[sl][rows]] += g[sl][rows]
            if grad_entropy is not None:
                h = grad_entropy[sl].to(dz.dtype)
                dz -= h[:, None] * p * (logp + entropy[sl, None])
            dz *= head.logit_scale / head.temperature
            if head.final_logit_softcapping is not None:
                dz *= 1 - torch.tanh(x * head.logit_scale / head.final_logit_softcapping) ** 2
            dz = dz.to(weight.dtype)
            d_h[sl] = (dz @ weight).to(d_h.dtype)
            d_w += (dz.t() @ hidden[sl]).to(d_w.dtype)
            if d_b is not None:
                d_b += dz.sum(0).to(d_b.dtype)
        dist.all_reduce(d_h, group=ctx.group)
        d_b = None if d_b is None else d_b.to(bias.dtype)
        return d_h.to(hidden.dtype), d_w.to(weight.dtype), d_b, None, None, None
