"""Per-token log-probability and entropy from logits: one read of each row forward, one read and one write backward.

Each logit `x` is first transformed as language models do, `z = cap * tanh(scale * x / cap) / temperature` (the
soft-cap only when set; fp32 math whatever the input dtype). Forward, a single pass over the row keeps an online
log-sum-exp (`m`, `s = sum exp(z - m)`) and `u = sum exp(z - m) * (z - m)`, so that

    logp = (z[y] - m) - log s,     entropy = log s - u / s,

and keeps `(m, log s)` for the backward (one fp32 log-sum-exp would lose |lse| * 2**-24 of every log-prob). A row
may also come as blocks of columns, one launch each (`block_stats`): `(m, s, u)` and the target's `z` are then carried
from block to block.

The loops are short so that a row streams at the memory's speed rather than the instruction issue's: each lane keeps
its own `s` and `u` (one reduction a block, for `m`; the sums are rescaled only when `m` grows), whole blocks load
without masks (a row's last, partial block apart), a head without scale or soft-cap is not multiplied, and 16-bit
logits take their exponentials as powers of 2 (`_exp_k`). Built for sm_90 at V = 131,072 in bf16
(`python -m benchmarks.kernel_resources`), the forward's loop over 16 columns a thread has 256 instructions, the
rescale that runs only when `m` grows among them (350 before these changes); the backward's 156 (292).

Backward, with upstream gradients `g` (of logp) and `h` (of the entropy), the row is read once more and written once
(into a new tensor, or over the logits themselves when the caller owns them):

    dz_j = g * ([j == y] - p_j) - h * p_j * (log p_j + entropy),   log p_j = (z_j - m) - log s,
    dx_j = dz_j * scale * (1 - tanh^2) / temperature.

Rows whose mask is 0 are not read: their outputs and gradients are 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_kernels.ops._common import div, exp, math_options, num_warps_for, row_block

# Exponentials of 16-bit inputs (EXP2) are taken in "K units", t = K * x with K = log2(e), so that e^x = 2^t: one
# instruction of the hardware (which flushes results below 2^-126 to zero; they add nothing to a sum whose largest
# term is 1). The difference from the row max is taken first, t = (z - m) * K, exact near the max: a fused
# z * K - m * K rounds m * K, which shifts every exponent of the row alike (by up to 2^-8 at |m| = 65,000, a log-prob
# error of 2.7e-3). fp32 inputs keep K = 1 and `exp` (libdevice's when PRECISE).
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp_k(t, EXP2: tl.constexpr, PRECISE: tl.constexpr):
    """`e^(t / K)`: `2^t` when EXP2 (K = log2(e)), else `exp(t)` (K = 1)."""
    if EXP2:
        return tl.exp2(t)
    return exp(t, PRECISE)


@triton.jit
def _transform(x, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr, SCALED: tl.constexpr):
    """The head's transform of raw logits `x`, in fp32; without a soft-cap one multiply by `logit_scale /
    temperature`, and none when that is 1 (`SCALED` false)."""
    z = x.to(tl.float32)
    if HAS_SOFTCAP:
        z = z * logit_scale
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)  # softcap * tanh(z / softcap)
        z = z * inv_temperature
    elif SCALED:
        z = z * (logit_scale * inv_temperature)
    return z


@triton.jit
def _fold_block(row_ptr, start, cols, V, m, s_acc, u_acc, logit_scale, softcap, inv_temperature, K,
                HAS_SOFTCAP: tl.constexpr, SCALED: tl.constexpr, EXP2: tl.constexpr, PRECISE: tl.constexpr,
                MASKED: tl.constexpr):  # fmt: skip
    """Fold the columns `start + cols` of a row into its running statistics: the row max `m` (a scalar) and, lane by
    lane, `s = sum e^(z - m)` and `u = sum e^(z - m) * (z - m) * K` (`[BLOCK_V]`, summed across lanes once, at the
    end). Only the last block of a row is `MASKED`."""
    if MASKED:
        in_row = start + cols < V
        z = _transform(tl.load(row_ptr + start + cols, mask=in_row, other=0.0), logit_scale, softcap,
                       inv_temperature, HAS_SOFTCAP, SCALED)  # fmt: skip
        z = tl.where(in_row, z, float("-inf"))
    else:
        z = _transform(tl.load(row_ptr + start + cols), logit_scale, softcap, inv_temperature, HAS_SOFTCAP, SCALED)
    m_new = tl.maximum(m, tl.max(z, axis=0))
    if m_new > m:  # the row max grew (rarely after the first blocks): rescale the lanes' sums to it
        shift = (m - m_new) * K  # -inf while the row had no finite logit: its sums are then 0
        alpha = _exp_k(shift, EXP2, PRECISE)
        u_acc = tl.where(s_acc > 0, alpha * (u_acc + shift * s_acc), 0.0)
        s_acc = alpha * s_acc
        m = m_new
    m_ref = tl.where(m == float("-inf"), 0.0, m)  # all -inf so far: any finite reference works
    t = (z - m_ref) * K if EXP2 else z - m_ref
    e = _exp_k(t, EXP2, PRECISE)
    s_acc += e
    u_acc += e * tl.maximum(t, -3.0e38)  # 0, not NaN, where z = -inf (e = 0)
    return m, s_acc, u_acc


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,  # [B, T, V], last dim contiguous
    stride_b,
    stride_t,
    ids_ptr,  # [B * T] int
    mask_ptr,  # [B * T] int8 (read when HAS_MASK)
    logp_ptr,  # [B * T] fp32 out
    entropy_ptr,  # [B * T] fp32 out
    stats_ptr,  # [2, B * T] fp32 out: row max, log-sum
    state_ptr,  # [4, B * T] fp32 (read unless FIRST, written unless LAST): running m, s, u and the target's z
    N,
    T,
    V,
    col_offset,  # vocabulary index of the first column (a block of columns, in `block_stats`)
    inv_temperature,
    logit_scale,
    softcap,
    HAS_MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    SCALED: tl.constexpr,  # logit_scale / temperature != 1 (without a soft-cap)
    EXP2: tl.constexpr,  # 16-bit logits: exponentials as powers of 2
    PRECISE: tl.constexpr,
    FIRST: tl.constexpr,  # the row's first block of columns: the running statistics start empty
    LAST: tl.constexpr,  # its last: logp, entropy and stats are written; before it, the running state
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    active = True
    if HAS_MASK:
        active = tl.load(mask_ptr + row) != 0
    if active:
        K = _LOG2E if EXP2 else 1.0
        row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
        cols = tl.arange(0, BLOCK_V)
        if FIRST:
            m = tl.full([], float("-inf"), tl.float32)
            s_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            u_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            z_y = tl.zeros([], dtype=tl.float32)
        else:  # the running sums start in lane 0
            m = tl.load(state_ptr + row)
            s_acc = tl.where(cols == 0, tl.load(state_ptr + N + row), 0.0)
            u_acc = tl.where(cols == 0, tl.load(state_ptr + 2 * N + row) * K, 0.0)
            z_y = tl.load(state_ptr + 3 * N + row)
        v_full = V - V % BLOCK_V
        for start in range(0, v_full, BLOCK_V):
            m, s_acc, u_acc = _fold_block(row_ptr, start, cols, V, m, s_acc, u_acc, logit_scale, softcap,
                                          inv_temperature, K, HAS_SOFTCAP, SCALED, EXP2, PRECISE, False)  # fmt: skip
        if v_full < V:
            m, s_acc, u_acc = _fold_block(row_ptr, v_full, cols, V, m, s_acc, u_acc, logit_scale, softcap,
                                          inv_temperature, K, HAS_SOFTCAP, SCALED, EXP2, PRECISE, True)  # fmt: skip
        s = tl.sum(s_acc, axis=0)
        u = tl.sum(u_acc, axis=0) / K
        y = tl.load(ids_ptr + row).to(tl.int64) - col_offset
        if (y >= 0) & (y < V):  # the target's column is in this block
            z_y = _transform(tl.load(row_ptr + y), logit_scale, softcap, inv_temperature, HAS_SOFTCAP, SCALED)
        if LAST:
            m = tl.where(m == float("-inf"), 0.0, m)
            log_s = tl.log(s)
            tl.store(logp_ptr + row, (z_y - m) - log_s)
            tl.store(entropy_ptr + row, log_s - div(u, s, PRECISE))
            tl.store(stats_ptr + row, m)
            tl.store(stats_ptr + N + row, log_s)
        else:
            tl.store(state_ptr + row, m)
            tl.store(state_ptr + N + row, s)
            tl.store(state_ptr + 2 * N + row, u)
            tl.store(state_ptr + 3 * N + row, z_y)
    else:
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(stats_ptr + row, 0.0)
        tl.store(stats_ptr + N + row, 0.0)


@triton.jit
def _grad_block(row_ptr, out_ptr, start, cols, V, y, m, log_s, log_s_k, g, h, entropy, logit_scale, softcap,
                inv_temperature, K, HAS_DENTROPY: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SCALED: tl.constexpr,
                EXP2: tl.constexpr, PRECISE: tl.constexpr, MASKED: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """Write the logits gradient of the columns `start + cols` of a row. Only the last block of a row is `MASKED`."""
    if MASKED:
        in_row = start + cols < V
        x = tl.load(row_ptr + start + cols, mask=in_row, other=0.0)
    else:
        x = tl.load(row_ptr + start + cols)
    z = _transform(x, logit_scale, softcap, inv_temperature, HAS_SOFTCAP, SCALED)
    zm = z - m  # exact near the row max
    t = zm * K - log_s_k if EXP2 else zm - log_s  # log p in K units (a multiply-add: only log s * K is rounded)
    p = _exp_k(t, EXP2, PRECISE)
    target = tl.minimum(tl.maximum(y - start, -1), BLOCK_V).to(tl.int32)  # the target's lane (none: -1 or BLOCK_V)
    d = tl.where(cols == target, g, 0.0) - g * p
    if HAS_DENTROPY:
        d -= tl.where(p > 0, h * p * ((zm - log_s) + entropy), 0.0)
    if HAS_SOFTCAP:
        c = 2.0 * tl.sigmoid(2.0 * x.to(tl.float32) * logit_scale / softcap) - 1.0
        d = d * (logit_scale * inv_temperature) * (1.0 - c * c)
    elif SCALED:
        d = d * (logit_scale * inv_temperature)
    if MASKED:
        tl.store(out_ptr + start + cols, d.to(out_ptr.dtype.element_ty), mask=in_row)
    else:
        tl.store(out_ptr + start + cols, d.to(out_ptr.dtype.element_ty))


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,  # [B, T, V], last dim contiguous
    stride_b,
    stride_t,
    dlogits_ptr,  # [B * T, V] out, rows stride_out apart, last dim contiguous (may be the logits themselves)
    stride_out,
    ids_ptr,
    mask_ptr,
    stats_ptr,  # [2, B * T] fp32: row max, log-sum
    entropy_ptr,
    dlogp_ptr,  # [B * T] fp32
    dentropy_ptr,  # [B * T] fp32 (read when HAS_DENTROPY)
    N,
    T,
    V,
    col_offset,  # vocabulary index of the first column (a block of columns, in `block_grad`)
    inv_temperature,
    logit_scale,
    softcap,
    HAS_MASK: tl.constexpr,
    HAS_DENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    SCALED: tl.constexpr,  # logit_scale / temperature != 1 (without a soft-cap)
    EXP2: tl.constexpr,  # 16-bit logits: exponentials as powers of 2
    PRECISE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    out_ptr = dlogits_ptr + row * stride_out
    cols = tl.arange(0, BLOCK_V)
    active = True
    if HAS_MASK:
        active = tl.load(mask_ptr + row) != 0
    if active:
        K = _LOG2E if EXP2 else 1.0
        row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
        m = tl.load(stats_ptr + row)
        log_s = tl.load(stats_ptr + N + row)
        log_s_k = log_s * K  # at most 18 (V = 262,144): rounded by 1e-6 at most, p by 7e-7 (relative)
        g = tl.load(dlogp_ptr + row)
        h = 0.0
        entropy = 0.0
        if HAS_DENTROPY:
            h = tl.load(dentropy_ptr + row)
            entropy = tl.load(entropy_ptr + row)
        y = tl.load(ids_ptr + row).to(tl.int64) - col_offset
        v_full = V - V % BLOCK_V
        for start in range(0, v_full, BLOCK_V):
            _grad_block(row_ptr, out_ptr, start, cols, V, y, m, log_s, log_s_k, g, h, entropy, logit_scale, softcap,
                        inv_temperature, K, HAS_DENTROPY, HAS_SOFTCAP, SCALED, EXP2, PRECISE, False,
                        BLOCK_V)  # fmt: skip
        if v_full < V:
            _grad_block(row_ptr, out_ptr, v_full, cols, V, y, m, log_s, log_s_k, g, h, entropy, logit_scale, softcap,
                        inv_temperature, K, HAS_DENTROPY, HAS_SOFTCAP, SCALED, EXP2, PRECISE, True,
                        BLOCK_V)  # fmt: skip
    else:
        for start in range(0, V, BLOCK_V):
            zeros = tl.zeros([BLOCK_V], dtype=dlogits_ptr.dtype.element_ty)
            tl.store(out_ptr + start + cols, zeros, mask=start + cols < V)


def _scaled(temperature: float, logit_scale: float, softcap: float | None) -> bool:
    """Whether the kernels multiply the logits (the `SCALED` flag): a soft-cap has its own path."""
    return softcap is None and float(logit_scale) * (1.0 / temperature) != 1.0


def _exp2(logits: torch.Tensor) -> bool:
    """Whether the kernels take exponentials as powers of 2 (the `EXP2` flag): for 16-bit logits."""
    return logits.element_size() == 2


def _mask_arg(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like if mask is None else mask.contiguous().view(-1).to(torch.int8)


def logprobs_fwd(
    logits: torch.Tensor,  # [B, T, V], last dim contiguous
    ids: torch.Tensor,  # [B, T] int
    mask: torch.Tensor | None,  # [B, T] bool
    temperature: float,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return fp32 `(logp, entropy, stats)`: `[B, T]`, `[B, T]` and `[2, B, T]` (row max, log-sum) for the backward."""
    B, T, V = logits.shape
    out = torch.empty((4, B, T), dtype=torch.float32, device=logits.device)
    if B * T == 0:
        return out[0], out[1], out[2:]
    block = row_block(V)
    _logprobs_fwd_kernel[(B * T,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        ids.contiguous().view(-1),  # the kernels read ids[row]: a strided view would be read wrong
        _mask_arg(mask, ids),
        out[0],
        out[1],
        out[2:],
        out,  # no running state: the whole row is one block
        B * T,
        T,
        V,
        0,
        1.0 / temperature,
        float(logit_scale),
        float(softcap or 1.0),
        HAS_MASK=mask is not None,
        HAS_SOFTCAP=softcap is not None,
        SCALED=_scaled(temperature, logit_scale, softcap),
        EXP2=_exp2(logits),
        FIRST=True,
        LAST=True,
        BLOCK_V=block,
        num_warps=num_warps_for(block),
        **math_options(logits.dtype),
    )
    return out[0], out[1], out[2:]


def logprobs_bwd(
    logits: torch.Tensor,  # [B, T, V]
    ids: torch.Tensor,  # [B, T]
    mask: torch.Tensor | None,  # [B, T] bool
    stats: torch.Tensor,  # [2, B, T] fp32 from the forward
    entropy: torch.Tensor,  # [B, T] fp32
    grad_logp: torch.Tensor,  # [B, T]
    grad_entropy: torch.Tensor | None,  # [B, T]
    temperature: float,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    out: torch.Tensor | None = None,  # [B, T, V], rows equally spaced, last dim contiguous; may be `logits` itself
    col_offset: int = 0,  # `logits` holds the vocabulary's columns col_offset, col_offset + 1, ... (a block of them)
) -> torch.Tensor:
    """Return the gradient with respect to the logits, `[B, T, V]`, in `out` or a new tensor of the logits' dtype.
    With `col_offset`, `logits` is a block of columns of the full logits and `stats`/`entropy` are the full rows'."""
    B, T, V = logits.shape
    dlogits = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device) if out is None else out
    if B * T == 0:
        return dlogits
    if dlogits.stride(2) != 1 or (B > 1 and dlogits.stride(0) != T * dlogits.stride(1)):
        raise ValueError(f"out must have equally spaced rows, each contiguous; got strides {dlogits.stride()}")
    block = row_block(V)
    stats, entropy, grad_logp = stats.contiguous(), entropy.contiguous(), grad_logp.float().contiguous()
    _logprobs_bwd_kernel[(B * T,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        dlogits,
        dlogits.stride(1),
        ids.contiguous().view(-1),  # the kernels read ids[row]: a strided view would be read wrong
        _mask_arg(mask, ids),
        stats,
        entropy,
        grad_logp,
        grad_logp if grad_entropy is None else grad_entropy.float().contiguous(),
        B * T,
        T,
        V,
        col_offset,
        1.0 / temperature,
        float(logit_scale),
        float(softcap or 1.0),
        HAS_MASK=mask is not None,
        HAS_DENTROPY=grad_entropy is not None,
        HAS_SOFTCAP=softcap is not None,
        SCALED=_scaled(temperature, logit_scale, softcap),
        EXP2=_exp2(logits),
        BLOCK_V=block,
        num_warps=num_warps_for(block),
        **math_options(logits.dtype),
    )
    return dlogits


def chunk_stats(z, ids, temperature, logit_scale, softcap):
    """`(logp [c], entropy [c], stats)` of an owned chunk of raw logits `z` `[c, V]` (read, not modified)."""
    logp, entropy, stats = logprobs_fwd(z.unsqueeze(0), ids.unsqueeze(0), None, temperature, logit_scale, softcap)
    return logp[0], entropy[0], stats


def block_stats(z, ids, col_offset, state, first, last, temperature, logit_scale, softcap, keep=False):
    """Fold a block of columns `z` `[n, v]` (vocabulary entries `col_offset` on) of the raw logits into the rows'
    running statistics `state`, fp32 `[4, n]`: the blocks of a row in order, `first` for its first (`state` is then
    only written) and `last` for its last, after which `state` holds `(logp, entropy, row max, log-sum)` as
    `chunk_stats` gives them for the whole row. `z` is only read (`keep`, which the PyTorch path needs, is implied)."""
    n, v = z.shape
    if n == 0:
        return state
    if not state.is_contiguous():
        raise ValueError("block_stats: state must be contiguous [4, n]")
    block = row_block(v)
    _logprobs_fwd_kernel[(n,)](
        z, 0, z.stride(0), ids, ids, state[0], state[1], state[2:], state, n, n, v, col_offset, 1.0 / temperature,
        float(logit_scale), float(softcap or 1.0), HAS_MASK=False, HAS_SOFTCAP=softcap is not None,
        SCALED=_scaled(temperature, logit_scale, softcap), EXP2=_exp2(z), FIRST=first, LAST=last, BLOCK_V=block,
        num_warps=num_warps_for(block), **math_options(z.dtype),
    )  # fmt: skip
    return state


def row_stats(state) -> tuple[torch.Tensor, torch.Tensor]:
    """`(row max, log-sum)`, fp32 `[c]`, from the `state` of `chunk_stats`."""
    return state[0, 0], state[1, 0]


def block_grad(z, ids, col_offset, m, log_s, entropy, grad_logp, grad_entropy, mask, temperature, logit_scale,
               softcap):  # fmt: skip
    """The gradient with respect to a block of columns `z` `[n, v]` (vocabulary entries `col_offset` on) of the raw
    logits, written over `z`, from the full rows' `m`, `log_s` and `entropy` `[n]`; rows where `mask` `[n]` is False
    get zeros."""
    stats = torch.stack((m, log_s)).float().unsqueeze(1)
    dz = logprobs_bwd(
        z.unsqueeze(0), ids.unsqueeze(0), None if mask is None else mask.unsqueeze(0), stats,
        entropy.float().unsqueeze(0), grad_logp.unsqueeze(0),
        None if grad_entropy is None else grad_entropy.unsqueeze(0), temperature, logit_scale, softcap,
        out=z.unsqueeze(0), col_offset=col_offset,
    )  # fmt: skip
    return dz[0]


def chunk_grad(z, ids, stats, entropy, grad_logp, grad_entropy, temperature, logit_scale, softcap):
    """The gradient with respect to the raw logits of the chunk, written over `z` itself."""
    dz = logprobs_bwd(
        z.unsqueeze(0), ids.unsqueeze(0), None, stats, entropy.unsqueeze(0), grad_logp.unsqueeze(0),
        None if grad_entropy is None else grad_entropy.unsqueeze(0), temperature, logit_scale, softcap,
        out=z.unsqueeze(0),
    )  # fmt: skip
    return dz[0]
