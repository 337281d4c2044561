"""Per-token log-probability and entropy straight from hidden states and the LM-head weight, logits never stored.

Forward: each program takes `BLOCK_N` tokens and a slice of the vocabulary, forms `hidden @ weight.T` tile by tile in
registers (`tl.dot`, fp32 accumulation), applies bias, logit scale, soft-cap and temperature, and folds each tile into
an online log-sum-exp (`m`, `s`, `u = sum e * (z - m)`) and the target logit. The vocabulary is split across programs
so that short batches still fill the GPU; `[splits, N]` partial statistics are merged after the kernel. With fp32
inputs the sum of exponentials is compensated (Kahan's summation): every probability of the backward is divided by
it, so its rounding reaches `d_hidden` in full rather than averaged.

Backward: each program recomputes one `[BLOCK_N, BLOCK_V]` tile of logits, turns it into its gradient with the
per-token coefficients `g = dL/dlogp` and `h = dL/dentropy`, and adds `dz @ weight` to `d_hidden` and `dz.T @ hidden`
to `d_weight`, `BLOCK_K` columns at a time. Those additions are ordered: a turnstile per (block, column chunk) lets the
vocabulary tiles add into a block of `d_hidden` in increasing order, and the token tiles into a block of `d_weight`,
so results are bit-identical run to run (no float atomics). Every wait is on a program with a smaller id, which the
GPU has already started, so the order cannot deadlock. `d_hidden` accumulates in an fp32 buffer `[N, H]`. For fp32
inputs its additions are compensated (a second `[N, H]` buffer holds what each lost) and the target's one-hot term
`g * weight[y]` is added apart from the tile's dot: at V = 151,936 a plain chain of fp32 additions was 6 to 10 units
in the last place off, this is within 2. `d_weight` accumulates in the weight's own dtype, one addition per `BLOCK_N`
tokens (exact for fp32 weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from grpo_kernels.ops._common import dot, exp, interpreting, math_options, multiprocessors


@triton.jit
def _head_transform(acc, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    z = acc * logit_scale
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
    return z * inv_temperature


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, hrows, row_ok, cols, col_ok, H, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < H
        a_mask = row_ok[:, None] & k_ok[None, :]
        a = tl.load(hidden_ptr + hrows[:, None] * stride_h + kk[None, :], mask=a_mask, other=0.0)
        b_mask = col_ok[None, :] & k_ok[:, None]
        b = tl.load(weight_ptr + cols[None, :] * stride_w + kk[:, None], mask=b_mask, other=0.0)
        acc = dot(a, b, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _linear_fwd_kernel(
    hidden_ptr, stride_h,  # [rows, H]
    weight_ptr, stride_w,  # [V, H]
    bias_ptr,  # [V]
    ids_ptr,  # [N] target of each token
    pos_ptr,  # [N] row of `hidden` of each token (HAS_POS)
    part_ptr,  # [4, SPLITS, N] fp32 out: m, s, u, target logit
    N, H, V, v_per_split,
    inv_temperature, logit_scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    PRECISE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    hrows = rows.to(tl.int64)
    if HAS_POS:
        hrows = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    y = tl.load(ids_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    s_lost = tl.zeros([BLOCK_N], dtype=tl.float32)  # what the additions to s lost (IEEE: Kahan's summation)
    u = tl.zeros([BLOCK_N], dtype=tl.float32)
    zy = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        acc = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, hrows, row_ok, cols, col_ok, H, stride_h, stride_w,
                           HAS_BIAS, IEEE, BLOCK_N, BLOCK_V, BLOCK_K)  # fmt: skip
        z = _head_transform(acc, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = tl.where(s > 0, m - m_ref, 0.0)
        alpha = exp(shift, PRECISE)
        e = exp(z - m_ref[:, None], PRECISE)
        zc = tl.where(e > 0, z - m_ref[:, None], 0.0)
        u = alpha * (u + shift * s) + tl.sum(e * zc, axis=1)
        if IEEE:  # fp32 inputs: the sum of a long row's tiles keeps the bits each addition would drop
            s = alpha * s
            add = tl.sum(e, axis=1) - alpha * s_lost
            total = s + add
            s_lost = (total - s) - add
            s = total
        else:
            s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = part_ptr + split * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + splits * N, s - s_lost, mask=row_ok)
    tl.store(out + 2 * splits * N, u, mask=row_ok)
    tl.store(out + 3 * splits * N, zy, mask=row_ok)


@triton.jit
def _turnstile_wait(lock_ptr, turn):
    while tl.atomic_cas(lock_ptr, turn, turn) != turn:
        pass


@triton.jit
def _linear_bwd_kernel(
    hidden_ptr, stride_h,  # [rows, H]
    weight_ptr, stride_w,  # [V, H]
    bias_ptr,
    ids_ptr, pos_ptr,
    stats_ptr,  # [3, N] fp32: row max, log-sum, reciprocal of the sum
    entropy_ptr, dlogp_ptr, dentropy_ptr,  # [N] fp32
    dh_ptr,  # [N, H] fp32 accumulator (compact: one row per token)
    dh_comp_ptr,  # [N, H] fp32: the low-order parts the additions into dh_ptr lost (IEEE, NEED_DH)
    dw_ptr,  # [V, H] in the weight's dtype, zero-initialised
    db_ptr,  # [V] fp32
    lock_h_ptr,  # [num_n, num_k] int32
    lock_w_ptr,  # [num_v, num_k] int32
    N, H, V, num_n, num_v,
    inv_temperature, logit_scale, softcap,
    filter_scale,  # grad_filter_eps * |logit_scale| / temperature (FILTER)
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DENTROPY: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, IEEE: tl.constexpr, PRECISE: tl.constexpr,
    FILTER: tl.constexpr,
    GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # tile order: groups of GROUP_N token blocks; inside a group the token block varies fastest
    pid = tl.program_id(0)
    group_size = GROUP_N * num_v
    first_n = (pid // group_size) * GROUP_N
    width = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % group_size) % width
    pid_v = (pid % group_size) // width

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    hrows = rows.to(tl.int64)
    if HAS_POS:
        hrows = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    acc = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, hrows, row_ok, cols, col_ok, H, stride_h, stride_w,
                       HAS_BIAS, IEEE, BLOCK_N, BLOCK_V, BLOCK_K)  # fmt: skip
    z = _head_transform(acc, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    m = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    log_s = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
    g = tl.load(dlogp_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(ids_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    logp = (z - m[:, None]) - log_s[:, None]
    if IEEE:  # p = e^(z - m) / s: a division's one rounding, where e^((z - m) - log s) carries the rounding of
        # log s (half a unit of |log s|, about 12 at V = 151,936) into every p alike, which d_hidden's sum of
        # p * weight does not average out
        p = exp(z - m[:, None], PRECISE) * tl.load(stats_ptr + 2 * N + rows, mask=row_ok, other=0.0)[:, None]
    else:
        p = exp(logp, PRECISE)
    hot = cols[None, :] == y[:, None]
    # fp32 inputs (IEEE): `d_hidden` takes the target's one-hot term as one product `hot_g * weight[y]` (`hot_g` per
    # row, 0 where the target is not in this tile) added apart from the dot, so that the dot's sum holds only the
    # small terms `-g * p` (a large term in a chain of fp32 additions costs the low bits of every term after it).
    # 16-bit inputs keep the term in the tile: their result is rounded far coarser, and the gather's registers would
    # spill on Hopper's tiles
    if IEEE:  # noqa: SIM108 (a compile-time choice, kept as a block like the others)
        d = -g[:, None] * p
    else:
        d = tl.where(hot, g[:, None], 0.0) - g[:, None] * p
    if HAS_DENTROPY:
        h = tl.load(dentropy_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        d -= tl.where(p > 0, h[:, None] * p * (logp + ent[:, None]), 0.0)
    if IEEE:  # y < V: the target's column is valid
        in_tile = row_ok & (y >= pid_v * BLOCK_V) & (y < pid_v * BLOCK_V + BLOCK_V)
        hot_g = tl.where(in_tile, g, 0.0) * (logit_scale * inv_temperature)
    d = d * (logit_scale * inv_temperature)
    if HAS_SOFTCAP:
        t = 2.0 * tl.sigmoid(2.0 * acc * logit_scale / softcap) - 1.0
        d = d * (1.0 - t * t)
        if IEEE:
            hot_g = hot_g * tl.sum(tl.where(hot, 1.0 - t * t, 0.0), axis=1)
    d = tl.where(row_ok[:, None] & col_ok[None, :], d, 0.0)
    dd = d.to(weight_ptr.dtype.element_ty)  # d_hidden's (IEEE: without the one-hot term)
    keep = 1
    if FILTER:  # gradient filtering (approximate): skip the products of a tile whose entries are all small
        r = tl.abs(g)
        if HAS_DENTROPY:
            r += tl.abs(h)
        whole = tl.where(hot, d + hot_g[:, None], d) if IEEE else d
        keep = tl.max((tl.abs(whole) > (r * filter_scale)[:, None]).to(tl.int32))

    num_k = tl.cdiv(H, BLOCK_K)
    if NEED_DH:  # d_hidden[rows] += dz @ weight[cols]: vocabulary tiles in increasing order
        for kc in range(0, num_k):
            kk = kc * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = kk < H
            part = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            if keep > 0:
                w = tl.load(weight_ptr + cols[:, None] * stride_w + kk[None, :],
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                part = dot(dd, w, part, IEEE)
                if IEEE:
                    w_y = tl.load(weight_ptr + y[:, None] * stride_w + kk[None, :],
                                  mask=in_tile[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                    part += hot_g[:, None] * w_y.to(tl.float32)
            lock = lock_h_ptr + pid_n * num_k + kc
            _turnstile_wait(lock, pid_v)
            if keep > 0:
                offs = rows[:, None].to(tl.int64) * H + kk[None, :]
                ok = row_ok[:, None] & k_ok[None, :]
                total = tl.load(dh_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
                if IEEE:  # Kahan's summation: the additions' lost low-order parts carried in dh_comp_ptr
                    lost = tl.load(dh_comp_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
                    part -= lost
                    new = total + part
                    tl.store(dh_comp_ptr + offs, (new - total) - part, mask=ok)
                    total = new
                else:
                    total += part
                tl.store(dh_ptr + offs, total, mask=ok)
            tl.debug_barrier()  # all warps have stored before the next tile may read (it loads from L2: .cg)
            tl.atomic_xchg(lock, pid_v + 1)
    if IEEE:  # the whole gradient, for d_weight and d_bias (formed here: fp32's d and dd are one tile above)
        d = tl.where(hot, d + hot_g[:, None], d)
        dd = d
    if NEED_DW or NEED_DB:  # d_weight[cols] += dz.T @ hidden[rows]: token tiles in increasing order
        for kc in range(0, num_k):
            lock = lock_w_ptr + pid_v * num_k + kc
            if NEED_DW:
                kk = kc * BLOCK_K + tl.arange(0, BLOCK_K)
                k_ok = kk < H
                part = tl.zeros([BLOCK_V, BLOCK_K], dtype=tl.float32)
                if keep > 0:
                    a = tl.load(hidden_ptr + hrows[:, None] * stride_h + kk[None, :],
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                    part = dot(tl.trans(dd), a, part, IEEE)
                _turnstile_wait(lock, pid_n)
                if keep > 0:
                    ptrs = dw_ptr + cols[:, None].to(tl.int64) * H + kk[None, :]
                    ok = col_ok[:, None] & k_ok[None, :]
                    old = tl.load(ptrs, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
                    tl.store(ptrs, (old + part).to(dw_ptr.dtype.element_ty), mask=ok)
            else:
                _turnstile_wait(lock, pid_n)
            if NEED_DB and kc == 0:  # noqa: SIM102 (kept apart: a compile-time and a run-time condition)
                if keep > 0:
                    db = tl.load(db_ptr + cols, mask=col_ok, other=0.0, cache_modifier=".cg") + tl.sum(d, axis=0)
                    tl.store(db_ptr + cols, db, mask=col_ok)
            tl.debug_barrier()
            tl.atomic_xchg(lock, pid_n + 1)


@dataclass(frozen=True)
class Tiles:
    """A kernel's launch configuration on a GPU: the tile `[BLOCK_N tokens, BLOCK_V columns]`, `BLOCK_K` of the
    hidden size per step, warps and pipeline stages, and optionally a cap on registers per thread (`maxnreg`: fewer
    registers can let an SM hold more blocks, at the risk of spills)."""

    BLOCK_N: int
    BLOCK_V: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None

    def launch(self) -> dict:
        """The launch options: warps, stages and the register cap when there is one."""
        out = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            out["maxnreg"] = self.maxnreg
        return out


# (kernel, "fp32" or "low" for bf16/fp16 inputs[, compute capability's major]) -> tiles: an architecture's entry where
# one was measured, else the general one. `benchmarks/tune_fused.py` times alternatives on a GPU.
TILES = {
    ("fwd", "low"): Tiles(64, 128, 64, 8, 3),
    ("fwd", "fp32"): Tiles(64, 128, 64, 8, 3),
    ("bwd", "low"): Tiles(64, 128, 64, 8, 2),
    ("bwd", "fp32"): Tiles(64, 128, 64, 8, 2),
    # Hopper: on an H200 with triton 3.6, N 8,192, H 4,096, V 131,072 (benchmarks/results/h200/fused/tune-2/), the
    # forward takes 18.9 ms (36.9 with the general tiles) and the backward 171 ms (457). Triton 3.9 spills some
    # registers with them (benchmarks/results/kernels/)
    ("fwd", "low", 9): Tiles(128, 256, 64, 8, 3),
    ("bwd", "low", 9): Tiles(128, 256, 64, 8, 3),
}


def tiles_key(kernel: str, dtype: torch.dtype, device: torch.device) -> tuple:
    """The key of `TILES` a launch on `device` uses: its architecture's entry when there is one."""
    general = (kernel, "fp32" if dtype == torch.float32 else "low")
    try:
        major = torch.cuda.get_device_properties(device if device.type == "cuda" else None).major
    except (AssertionError, RuntimeError):  # no CUDA: the interpreter, which sizes its own tiles
        return general
    return (*general, major) if (*general, major) in TILES else general


def _tiles(kernel: str, n: int, V: int, H: int, dtype: torch.dtype, device: torch.device) -> Tiles:
    if interpreting():  # fewer, larger numpy steps; tl.dot needs at least 16
        return Tiles(max(16, min(64, triton.next_power_of_2(n))), max(16, min(128, triton.next_power_of_2(V))),
                     max(16, min(64, triton.next_power_of_2(H))), 4, 3 if kernel == "fwd" else 2)  # fmt: skip
    return TILES[tiles_key(kernel, dtype, device)]


def _unit_stride(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The kernels step along a tensor's last dimension one element at a time (rows of `hidden` and `weight` are
    `stride(0)` apart; `bias`, `ids` and `positions` are read as runs): a copy of any whose last stride is not 1 (a
    transposed or sliced weight), the others as they are."""
    return [x if x is None or x.stride(-1) == 1 else x.contiguous() for x in tensors]


def _common(hidden, weight, head):
    temperature, logit_scale, softcap = head
    return (1.0 / temperature, float(logit_scale), float(softcap or 1.0), softcap is not None,
            hidden.dtype == torch.float32)  # fmt: skip


def linear_fwd(
    hidden: torch.Tensor,  # [rows, H] (a copy where its last stride is not 1)
    weight: torch.Tensor,  # [V, H] (likewise)
    bias: torch.Tensor | None,  # [V]
    ids: torch.Tensor,  # [N]
    positions: torch.Tensor | None,  # [N] rows of `hidden` (None: token i is row i)
    head: tuple[float, float, float | None],  # temperature, logit scale, soft-cap
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 `(logp [N], entropy [N], stats [3, N])` (stats: row max, log-sum and reciprocal sum of the transformed
    logits)."""
    N, V, H = ids.numel(), weight.shape[0], hidden.shape[1]
    dev = hidden.device
    if N == 0:
        return torch.zeros(0, device=dev), torch.zeros(0, device=dev), torch.zeros(3, 0, device=dev)
    hidden, weight, bias, ids, positions = _unit_stride(hidden, weight, bias, ids, positions)
    t = _tiles("fwd", N, V, H, hidden.dtype, hidden.device)
    BN, BV = t.BLOCK_N, t.BLOCK_V
    num_n, num_vb = triton.cdiv(N, BN), triton.cdiv(V, BV)
    target = 1 if interpreting() else 2 * multiprocessors(dev)
    splits = max(1, min(num_vb, triton.cdiv(target, num_n)))
    v_per_split = triton.cdiv(num_vb, splits) * BV
    splits = triton.cdiv(V, v_per_split)
    part = torch.empty(4, splits, N, dtype=torch.float32, device=dev)
    inv_t, scale, cap, has_cap, ieee = _common(hidden, weight, head)
    _linear_fwd_kernel[(num_n, splits)](
        hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight, ids,
        positions if positions is not None else ids, part, N, H, V, v_per_split, inv_t, scale, cap,
        HAS_BIAS=bias is not None, HAS_POS=positions is not None, HAS_SOFTCAP=has_cap, IEEE=ieee,
        BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=t.BLOCK_K, **t.launch(), **math_options(hidden.dtype),
    )  # fmt: skip
    # the splits' partial statistics merged in fp64 ([4, splits, N]: 32 bytes a token and split, a few MiB at most
    # next to the logits' products), each result rounded once to fp32
    m, s, u, zy = part.double()
    top = m.amax(0)
    ref = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.where(s > 0, torch.exp(m - ref), torch.zeros_like(s))
    total = (s * w).sum(0)
    u_total = (w * (u + torch.where(s > 0, m - ref, torch.zeros_like(m)) * s)).sum(0)
    log_s = total.log()
    entropy = log_s - u_total / total
    logp = (zy.sum(0) - ref) - log_s
    return logp.float(), entropy.float(), torch.stack((ref, log_s, total.reciprocal())).float()


def linear_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    positions: torch.Tensor | None,
    stats: torch.Tensor,  # [3, N], linear_fwd's
    entropy: torch.Tensor,  # [N]
    grad_logp: torch.Tensor,  # [N]
    grad_entropy: torch.Tensor | None,  # [N]
    head: tuple[float, float, float | None],
    needs: tuple[bool, bool, bool],  # d_hidden, d_weight, d_bias
    grad_filter_eps: float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`(d_hidden [N, H] fp32 (one row per token), d_weight [V, H] in the weight's dtype, d_bias [V] fp32)`.

    With `grad_filter_eps` (approximate), a `[BLOCK_N, BLOCK_V]` tile adds nothing when each of its logit gradients
    is at most `grad_filter_eps * |logit_scale| / temperature * (|grad_logp| + |grad_entropy|)` of its token; None
    (the default) is exact."""
    N, V, H = ids.numel(), weight.shape[0], hidden.shape[1]
    dev = hidden.device
    hidden, weight, bias, ids, positions = _unit_stride(hidden, weight, bias, ids, positions)
    d_h = torch.zeros(N, H, dtype=torch.float32, device=dev) if needs[0] else None
    d_w = torch.zeros(weight.shape, dtype=weight.dtype, device=dev) if needs[1] else None  # row-major, as stored
    d_b = torch.zeros(V, dtype=torch.float32, device=dev) if needs[2] else None
    if N == 0 or not any(needs):
        return d_h, d_w, d_b
    t = _tiles("bwd", N, V, H, hidden.dtype, hidden.device)
    BN, BV, BK = t.BLOCK_N, t.BLOCK_V, t.BLOCK_K
    num_n, num_v, num_k = triton.cdiv(N, BN), triton.cdiv(V, BV), triton.cdiv(H, BK)
    lock_h = torch.zeros(num_n, num_k, dtype=torch.int32, device=dev)
    lock_w = torch.zeros(num_v, num_k, dtype=torch.int32, device=dev)
    inv_t, scale, cap, has_cap, ieee = _common(hidden, weight, head)
    d_h_lost = torch.zeros_like(d_h) if d_h is not None and ieee else None  # the compensated sums' (fp32 inputs)
    g = grad_logp.float().contiguous()
    _linear_bwd_kernel[(num_n * num_v,)](
        hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight, ids,
        positions if positions is not None else ids, stats.contiguous(), entropy.contiguous(), g,
        g if grad_entropy is None else grad_entropy.float().contiguous(),
        d_h if d_h is not None else g, d_h_lost if d_h_lost is not None else g, d_w if d_w is not None else weight,
        d_b if d_b is not None else g,
        lock_h, lock_w, N, H, V, num_n, num_v, inv_t, scale, cap,
        0.0 if grad_filter_eps is None else grad_filter_eps * abs(scale) * inv_t,
        HAS_BIAS=bias is not None, HAS_POS=positions is not None, HAS_SOFTCAP=has_cap,
        HAS_DENTROPY=grad_entropy is not None, NEED_DH=needs[0], NEED_DW=needs[1], NEED_DB=needs[2], IEEE=ieee,
        FILTER=grad_filter_eps is not None, GROUP_N=8, BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK,
        **t.launch(), **math_options(hidden.dtype),
    )  # fmt: skip
    if d_h_lost is not None:
        d_h -= d_h_lost
    return d_h, d_w, d_b
