"""Group-relative advantages from rewards, as TRL 1.16 forms them, in one kernel per group (plus one pass over the
batch when a batch-wide standard deviation is needed).

Rewards are `[B, K]` (K reward functions, NaN = not scorable), groups are `G` consecutive rows. Standard deviations
are Bessel-corrected over the non-NaN values (NaN with fewer than two); a NaN advantage becomes 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SCALES = {"group": 0, "batch": 1, "none": 2}
AGGREGATIONS = {"sum_then_normalize": 0, "normalize_then_sum": 1}


@triton.jit
def _group_advantages_kernel(
    rewards_ptr,  # [B, K] fp32 contiguous
    weights_ptr,  # [K] fp32
    out_ptr,  # [B] fp32: the advantage, or the group-centred reward when a batch pass follows
    total_ptr,  # [B] fp32: the aggregated reward (read by the batch pass)
    G,
    K,
    AGGREGATION: tl.constexpr,  # 0 sum_then_normalize, 1 normalize_then_sum
    SCALE: tl.constexpr,  # 0 group, 1 batch, 2 none
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_K)
    in_group = rows < G
    inside = in_group[:, None] & (cols[None, :] < K)
    r = tl.load(rewards_ptr + (group * G + rows)[:, None] * K + cols[None, :], mask=inside, other=float("nan"))
    w = tl.load(weights_ptr + cols, mask=cols < K, other=0.0)
    present = r == r  # not NaN
    scorable = tl.sum(present.to(tl.int32), axis=1) > 0

    if AGGREGATION == 1:
        # normalise each reward function over the group first
        n_k = tl.sum(present.to(tl.float32), axis=0)
        mean_k = tl.sum(tl.where(present, r, 0.0), axis=0) / n_k
        dev = tl.where(present, r - mean_k[None, :], 0.0)
        std_k = tl.sqrt(tl.sum(dev * dev, axis=0) / (n_k - 1))
        std_k = tl.where(n_k > 1, std_k, float("nan"))
        r = (r - mean_k[None, :]) / (std_k[None, :] + 1e-4)
        present = r == r
    total = tl.sum(tl.where(present, r * w[None, :], 0.0), axis=1)
    total = tl.where(scorable, total, float("nan"))
    tl.store(total_ptr + group * G + rows, total, mask=in_group)

    if AGGREGATION == 0:
        valid = scorable & in_group
        n = tl.sum(valid.to(tl.float32), axis=0)
        mean = tl.sum(tl.where(valid, total, 0.0), axis=0) / n
        adv = total - mean
        if SCALE == 0:
            dev = tl.where(valid, adv, 0.0)
            std = tl.sqrt(tl.sum(dev * dev, axis=0) / (n - 1))
            std = tl.where(n > 1, std, float("nan"))
            adv = adv / (std + 1e-4)
        if SCALE != 1:
            adv = tl.where(adv == adv, adv, 0.0)
        tl.store(out_ptr + group * G + rows, adv, mask=in_group)


@triton.jit
def _batch_scale_kernel(
    total_ptr,  # [B] fp32 aggregated rewards (NaN = unscorable)
    out_ptr,  # [B] fp32: in: group-centred rewards (sum_then_normalize); out: advantages
    B,
    CENTER_BY_BATCH: tl.constexpr,  # normalize_then_sum centres by the batch mean
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    n = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([], dtype=tl.float32)
    for start in range(0, B, BLOCK):
        x = tl.load(total_ptr + start + offs, mask=start + offs < B, other=float("nan"))
        ok = x == x
        n += tl.sum(ok.to(tl.float32), axis=0)
        acc += tl.sum(tl.where(ok, x, 0.0), axis=0)
    mean = acc / n
    sq = tl.zeros([], dtype=tl.float32)
    for start in range(0, B, BLOCK):
        x = tl.load(total_ptr + start + offs, mask=start + offs < B, other=float("nan"))
        d = tl.where(x == x, x - mean, 0.0)
        sq += tl.sum(d * d, axis=0)
    std = tl.where(n > 1, tl.sqrt(sq / (n - 1)), float("nan"))
    std = tl.where(B > 1, std, 0.0)
    for start in range(0, B, BLOCK):
        inside = start + offs < B
        if CENTER_BY_BATCH:
            centred = tl.load(total_ptr + start + offs, mask=inside, other=0.0) - mean
        else:
            centred = tl.load(out_ptr + start + offs, mask=inside, other=0.0)
        adv = centred / (std + 1e-4)
        tl.store(out_ptr + start + offs, tl.where(adv == adv, adv, 0.0), mask=inside)


def group_advantages_fwd(
    rewards: torch.Tensor,  # [B, K] fp32 contiguous
    weights: torch.Tensor,  # [K] fp32
    num_generations: int,
    scale_rewards: str,
    multi_objective_aggregation: str,
) -> torch.Tensor:  # [B] fp32
    B, K = rewards.shape
    G = num_generations
    aggregation = AGGREGATIONS[multi_objective_aggregation]
    scale = SCALES[scale_rewards]
    out = torch.empty(B, dtype=torch.float32, device=rewards.device)
    total = torch.empty(B, dtype=torch.float32, device=rewards.device)
    _group_advantages_kernel[(B // G,)](
        rewards,
        weights,
        out,
        total,
        G,
        K,
        AGGREGATION=aggregation,
        SCALE=scale,
        BLOCK_G=max(2, triton.next_power_of_2(G)),
        BLOCK_K=max(2, triton.next_power_of_2(K)),
    )
    if aggregation == 1 or scale == 1:
        _batch_scale_kernel[(1,)](
            total, out, B, CENTER_BY_BATCH=aggregation == 1, BLOCK=min(4096, max(16, triton.next_power_of_2(B)))
        )
    return out
