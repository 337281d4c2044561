"""The token-local GRPO objective in one launch: each token's `dL/dlogp` and each row's sums of the loss's terms and
of the metrics' values.

The loss from logits forms `dL/dlogp` in closed form and the loss and TRL's metrics without a graph
(`objective.row_grads`, `objective.row_terms`). Those are some 70 small PyTorch ops a call; on a GPU each is a launch
the host must issue, and at a few thousand tokens the host, not the device, sets the pace. For a `token_local`
loss (each token's term depends on its own log-prob alone) one program per row does all of it: its tokens'
gradients, and `[SUMS, B]` row sums that a few ops turn into the loss and the metrics (`objective.token_objective`).
The reference is `objective.row_terms` with `objective.row_grads`, which the tests compare it with.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_kernels.ops._common import exp, interpreting, math_options

# rows of the `[SUMS, B]` sums: the loss's terms, the KL, the entropy, the low / high / either clipped tokens
# (cispo's clipped tokens in HIGH), and the active tokens
TERM, KL, ENTROPY, LOW, HIGH, REGION, COUNT = range(7)
SUMS = 7
CLIPPED, CISPO, SAPO = range(3)
NAN = tl.constexpr(tl.PropagateNan.ALL)  # minima and maxima of NaN are NaN, as in PyTorch


@triton.jit
def _objective_kernel(
    logp_ptr, ent_ptr, mask_ptr,  # [B, T] fp32, fp32, uint8; rows T apart
    adv_ptr, adv_row, adv_col,  # advantages, any float dtype: element (b, t) at b * adv_row + t * adv_col
    old_ptr, old_row,  # [B, T] old log-probs (HAS_OLD)
    ref_ptr, ref_row,  # [B, T] reference log-probs (HAS_KL)
    isr_ptr, isr_row, isr_col,  # importance-sampling ratio (HAS_ISR), strided like the advantages
    weight_ptr,  # [] d loss / d (a token's term), or [B] per row (ROW_WEIGHT)
    grad_ptr,  # [B, T] fp32 out: dL/dlogp
    sums_ptr,  # [SUMS, B] fp32 out
    B, T, lo, hi, delta, beta, tau_pos, tau_neg,  # lo, hi: the ratio's clip range (cispo: its cap in hi)
    LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr, HAS_ISR: tl.constexpr,
    HAS_DELTA: tl.constexpr, ROW_WEIGHT: tl.constexpr, PRECISE: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(weight_ptr + row) if ROW_WEIGHT else tl.load(weight_ptr)
    acc_term = tl.zeros([BLOCK_T], tl.float32)
    acc_kl = tl.zeros([BLOCK_T], tl.float32)
    acc_ent = tl.zeros([BLOCK_T], tl.float32)
    acc_low = tl.zeros([BLOCK_T], tl.float32)
    acc_high = tl.zeros([BLOCK_T], tl.float32)
    acc_region = tl.zeros([BLOCK_T], tl.float32)
    acc_count = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        col = t.to(tl.int64)
        live = t < T
        active = (tl.load(mask_ptr + row * T + t, mask=live, other=0) != 0) & live
        logp = tl.load(logp_ptr + row * T + t, mask=active, other=0.0)
        adv = tl.load(adv_ptr + row * adv_row + col * adv_col, mask=active, other=0.0).to(tl.float32)
        old = logp  # on-policy: a ratio of 1, or NaN where the log-prob is not finite (as PyTorch's objective has it)
        if HAS_OLD:
            old = tl.load(old_ptr + row * old_row + t, mask=active, other=0.0).to(tl.float32)
        ratio = exp(tl.where(active, logp - old, 0.0), PRECISE)
        # the policy term, its derivatives by the ratio (g_ratio) and by the log-prob (g_logp), unweighted
        if LOSS == 1:  # cispo: -min(ratio, eps_high) * adv * logp, the ratio detached
            capped = tl.minimum(ratio, hi, propagate_nan=NAN)
            term = -capped * adv * logp
            g_logp = -capped * adv
            g_ratio = tl.zeros([BLOCK_T], tl.float32)
            high = (ratio > hi) & (adv > 0)
            low = t < 0  # none
        elif LOSS == 2:  # sapo: -sigmoid(tau * (ratio - 1)) * 4 / tau * adv
            tau = tl.where(adv > 0, tau_pos, tau_neg)
            s = tl.sigmoid(tau * (ratio - 1.0))
            term = -s * (4.0 / tau) * adv
            g_ratio = -4.0 * adv * s * (1.0 - s)
            g_logp = tl.zeros([BLOCK_T], tl.float32)
            low = t < 0  # none
            high = low
        else:  # the clipped surrogate -min(u * adv, c * adv); autograd's minimum: half to each side on a tie
            clipped = tl.minimum(tl.maximum(ratio, lo, propagate_nan=NAN), hi, propagate_nan=NAN)
            d_clipped = ((ratio >= lo) & (ratio <= hi)).to(tl.float32)
            unclipped = ratio
            d_unclipped = tl.full([BLOCK_T], 1.0, tl.float32)
            if HAS_DELTA:
                unclipped = tl.minimum(ratio, delta, propagate_nan=NAN)
                d_unclipped = (ratio <= delta).to(tl.float32)
            a = unclipped * adv
            b = clipped * adv
            term = -tl.minimum(a, b, propagate_nan=NAN)
            to_a = tl.where(a == b, 0.5, (a <= b).to(tl.float32))
            g_ratio = -adv * (to_a * d_unclipped + (1.0 - to_a) * d_clipped)
            g_logp = tl.zeros([BLOCK_T], tl.float32)
            low = (unclipped < lo) & (adv < 0)  # after delta's cap, as TRL counts them
            high = (unclipped > hi) & (adv > 0)
        if HAS_ISR:
            isr = tl.load(isr_ptr + row * isr_row + col * isr_col, mask=active, other=0.0).to(tl.float32)
            term = term * isr
            g_ratio = g_ratio * isr
            if LOSS == 1:  # the others' g_logp is still 0 here (times an infinite ratio: NaN)
                g_logp = g_logp * isr
        kl = tl.zeros([BLOCK_T], tl.float32)
        if HAS_KL:  # kl = exp(d) - d - 1, d = ref - logp (times the ratio with the bias correction)
            ref = tl.load(ref_ptr + row * ref_row + t, mask=active, other=0.0).to(tl.float32)
            d = tl.where(active, ref - logp, 0.0)
            e = exp(d, PRECISE)
            kl = e - d - 1.0
            d_kl = 1.0 - e
            if BIAS_KL:
                g_ratio += beta * kl
                kl = kl * ratio
                d_kl = d_kl * ratio
            term += beta * kl
            g_logp += beta * d_kl
        grad = g_logp
        if LOSS != 1 or (HAS_KL and BIAS_KL):  # not for cispo's detached ratio alone (whose 0 * inf would be NaN)
            grad += g_ratio * ratio
        grad = grad * w
        tl.store(grad_ptr + row * T + t, tl.where(active, grad, 0.0), mask=live)
        ent = tl.load(ent_ptr + row * T + t, mask=active, other=0.0)
        acc_term += tl.where(active, term, 0.0)
        acc_kl += tl.where(active, kl, 0.0)
        acc_ent += tl.where(active, ent, 0.0)
        acc_low += (active & low).to(tl.float32)
        acc_high += (active & high).to(tl.float32)
        acc_region += (active & (low | high)).to(tl.float32)
        acc_count += active.to(tl.float32)
    out = sums_ptr + row
    tl.store(out, tl.sum(acc_term, 0))
    tl.store(out + B, tl.sum(acc_kl, 0))
    tl.store(out + 2 * B, tl.sum(acc_ent, 0))
    tl.store(out + 3 * B, tl.sum(acc_low, 0))
    tl.store(out + 4 * B, tl.sum(acc_high, 0))
    tl.store(out + 5 * B, tl.sum(acc_region, 0))
    tl.store(out + 6 * B, tl.sum(acc_count, 0))


def _strides(x: torch.Tensor, B: int, T: int) -> tuple[int, int]:
    """`(row, column)` element strides of a `[B or 1, T or 1]` tensor: 0 along a dimension of one, broadcast."""
    return (x.stride(0) if x.shape[0] == B else 0), (x.stride(1) if x.shape[1] == T else 0)


def objective_fwd(
    logps: torch.Tensor,  # [B, T] fp32, contiguous
    entropy: torch.Tensor,  # [B, T] fp32, contiguous
    mask: torch.Tensor,  # [B, T] bool, contiguous
    advantages: torch.Tensor,  # [B, 1] or [B, T]
    old_logps: torch.Tensor | None,  # [B, T]
    ref_logps: torch.Tensor | None,  # [B, T], with beta != 0
    importance_sampling_ratio: torch.Tensor | None,  # [B, 1] or [B, T]
    weight: torch.Tensor,  # [] fp32, or [B] fp32 for one weight per row (grpo, sapo)
    *,
    loss_type: int,  # CLIPPED, CISPO or SAPO
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    beta: float,
    bias_corrected_kl: bool,
    sapo_temperatures: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(dL/dlogp [B, T] fp32, sums [SUMS, B] fp32)` of a token-local GRPO loss whose tokens' terms are weighted by
    `weight` (see `objective.token_objective`; 0 at masked-out tokens, whatever their inputs)."""
    B, T = logps.shape
    dev = logps.device
    for name, x in (("logps", logps), ("entropy", entropy), ("mask", mask)):
        if x.shape != (B, T) or not x.is_contiguous() or x.device != dev:
            raise ValueError(f"{name} must be a contiguous [B, T] = [{B}, {T}] tensor on {dev}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor; got {mask.dtype}")
    if weight.shape not in ((), (B,)) or weight.dtype != torch.float32:
        raise ValueError(f"weight must be an fp32 scalar or [B] = [{B}]; got {tuple(weight.shape)}, {weight.dtype}")
    grad = torch.empty(B, T, dtype=torch.float32, device=dev)
    sums = torch.empty(SUMS, B, dtype=torch.float32, device=dev)
    if B == 0:
        return grad, sums

    def rows(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else (x if x.stride(-1) == 1 else x.contiguous())

    old, ref = rows(old_logps), rows(ref_logps)
    isr = importance_sampling_ratio
    # the clip range as PyTorch compares with it: each bound rounded once to fp32, from double
    lo, hi = (0.0, epsilon_high) if loss_type == CISPO else (1.0 - epsilon_low, 1.0 + epsilon_high)
    block = max(16, min(triton.next_power_of_2(T), 1 << 14 if interpreting() else 1024))
    _objective_kernel[(B,)](
        logps, entropy, mask.view(torch.uint8), advantages, *_strides(advantages, B, T),
        logps if old is None else old, 0 if old is None else old.stride(0),
        logps if ref is None else ref, 0 if ref is None else ref.stride(0),
        advantages if isr is None else isr, *((0, 0) if isr is None else _strides(isr, B, T)),
        weight, grad, sums, B, T, lo, hi, 0.0 if delta is None else delta, beta,
        *sapo_temperatures,
        LOSS=loss_type, HAS_OLD=old is not None, HAS_KL=beta != 0.0, BIAS_KL=bias_corrected_kl,
        HAS_ISR=isr is not None, HAS_DELTA=delta is not None, ROW_WEIGHT=weight.dim() == 1, BLOCK_T=block,
        num_warps=4, **math_options(logps.dtype),
    )  # fmt: skip
    return grad, sums
