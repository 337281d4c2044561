"""The PyTorch path of each op, for CPU tensors (and any device without Triton).

It computes what the kernels compute, a chunk of rows at a time, so that it never holds more than one chunk of fp32
logits: the peak extra memory is `rows_per_chunk * V * 4` bytes on top of the outputs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK_ELEMENTS = 1 << 22  # fp32 elements per chunk: 16 MiB
# exp(x) is exactly 0 in fp32 below about -104, so flooring log-probs there changes no probability and keeps
# p * (log p + ...) at 0 instead of 0 * -inf for logits of -inf
_LOGP_FLOOR = -1e4


def _row_chunks(x: torch.Tensor) -> Iterator[tuple[torch.Tensor, slice]]:
    """Yield `(rows, flat_slice)`: 2-D views `[r, V]` of `x` `[B, T, V]` covering the flattened rows in order."""
    B, T, V = x.shape
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    if B <= 1 or x.stride(0) == T * x.stride(1):
        flat = x.as_strided((B * T, V), (x.stride(1), x.stride(2)))
        for s in range(0, B * T, step):
            yield flat[s : s + step], slice(s, min(s + step, B * T))
        return
    for b in range(B):
        for s in range(0, T, step):
            yield x[b, s : s + step], slice(b * T + s, b * T + min(s + step, T))


def math_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for 16- and 32-bit inputs; fp64 inputs keep fp64 (for exact references)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _transformed(rows: torch.Tensor, temperature: float, logit_scale: float, softcap: float | None) -> torch.Tensor:
    """A copy of a chunk in `math_dtype`, transformed as the model's head does: scaled, soft-capped, over the
    temperature. Always a copy: the math below works in place."""
    z = rows.to(math_dtype(rows), copy=True)
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z.div_(temperature)


def logprobs_fwd(
    logits: torch.Tensor,  # [B, T, V]
    ids: torch.Tensor,  # [B, T]
    mask: torch.Tensor | None,  # [B, T] bool
    temperature: float,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(logp, entropy, stats)` in `math_dtype`: `[B, T]`, `[B, T]` and `[2, B, T]` (the row max of the transformed
    logits and the log of the row's sum of `exp(z - max)`, for the backward); zeros where `mask` is False.

    Peak extra memory: about three fp32 chunks."""
    B, T, _ = logits.shape
    out = torch.zeros((4, B * T), dtype=math_dtype(logits), device=logits.device)
    flat_ids = ids.reshape(-1, 1).long()
    for rows, sl in _row_chunks(logits):
        logp = _transformed(rows, temperature, logit_scale, softcap)
        m = logp.amax(dim=-1, keepdim=True)
        log_s = torch.logsumexp(logp.sub_(m), dim=-1, keepdim=True)
        logp.sub_(log_s)
        out[0, sl] = logp.gather(-1, flat_ids[sl]).squeeze(-1)  # before the floor: the target's exact log-prob
        out[1, sl] = -(logp.clamp_(min=_LOGP_FLOOR).exp().mul_(logp).sum(-1))
        out[2, sl] = m.squeeze(-1)
        out[3, sl] = log_s.squeeze(-1)
    if mask is not None:
        out = torch.where(mask.reshape(1, -1), out, 0)
    out = out.view(4, B, T)
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
    out: torch.Tensor | None = None,  # [B, T, V] contiguous; may be `logits` itself
) -> torch.Tensor:
    """The gradient with respect to the logits, `[B, T, V]` (in `out`, or a new tensor of the logits' dtype); zero
    rows where `mask` is False.

    `dz = -p * (g + h * (log p + entropy)) + g * onehot(y)`, times the transform's derivative. Peak extra memory: two
    fp32 chunks (three with a soft-cap) besides the output."""
    B, T, V = logits.shape
    dlogits = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device) if out is None else out
    flat_out = dlogits.view(B * T, V)
    flat_ids = ids.reshape(-1, 1).long()
    g = grad_logp.reshape(-1, 1).to(math_dtype(logits))
    h = None if grad_entropy is None else grad_entropy.reshape(-1, 1).to(math_dtype(logits))
    inactive = None if mask is None else ~mask.reshape(-1)
    m, log_s = stats.reshape(2, -1, 1)
    ent = entropy.reshape(-1, 1)
    for rows, sl in _row_chunks(logits):
        logp = _transformed(rows, temperature, logit_scale, softcap).sub_(m[sl]).sub_(log_s[sl])
        logp.clamp_(min=_LOGP_FLOOR)
        d = logp.exp()
        if h is None:
            d.mul_(-g[sl])
        else:
            d.mul_(logp.add_(ent[sl]).mul_(h[sl]).add_(g[sl])).neg_()
        del logp
        d.scatter_add_(-1, flat_ids[sl], g[sl]).mul_(logit_scale / temperature)
        if softcap is not None:
            d.mul_(1 - rows.to(d.dtype).mul(logit_scale / softcap).tanh_().square_())
        if inactive is not None:
            d[inactive[sl]] = 0
        flat_out[sl] = d
    return dlogits


# The fused linear loss works on owned chunks of logits `z` `[c, V]` (fresh from `hidden @ weight.T`), so it works
# in place, a few rows at a time: the only other buffer is one block of exponentials, small enough to stay in cache.
BLOCK_ELEMENTS = 1 << 18  # 1 MiB of fp32


def _blocks(n_rows: int, vocab: int) -> Iterator[slice]:
    step = max(1, BLOCK_ELEMENTS // max(vocab, 1))
    for s in range(0, n_rows, step):
        yield slice(s, min(s + step, n_rows))


def chunk_stats(
    z: torch.Tensor,  # [c, V] in math_dtype, owned: transformed and shifted in place
    ids: torch.Tensor,  # [c]
    temperature: float,
    logit_scale: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """`(logp [c], entropy [c], state)`; `state` (row max, log-sum, sum) is what `chunk_grad` needs."""
    c = z.shape[0]
    m, log_s, s = (torch.empty(c, 1, dtype=z.dtype, device=z.device) for _ in range(3))
    entropy = torch.empty(c, dtype=z.dtype, device=z.device)
    for b in _blocks(c, z.shape[1]):
        zb = z[b]
        if softcap is None:
            zb.mul_(logit_scale / temperature)
        else:
            zb.mul_(logit_scale / softcap).tanh_().mul_(softcap / temperature)
        torch.amax(zb, dim=-1, keepdim=True, out=m[b])
        zb.sub_(m[b])
        e = zb.exp()
        torch.sum(e, dim=-1, keepdim=True, out=s[b])
        u = e.mul_(zb).sum(-1)  # sum e * (z - m); e is not needed after
        torch.log(s[b], out=log_s[b])
        entropy[b] = log_s[b].squeeze(-1) - u / s[b].squeeze(-1)
    logp = (z.gather(-1, ids.long().unsqueeze(-1)) - log_s).squeeze(-1)
    return logp, entropy, (m, log_s, s)


def block_stats(
    z: torch.Tensor,  # [n, v] raw logits of vocabulary entries col_offset, col_offset + 1, ..., in math_dtype, owned
    ids: torch.Tensor,  # [n]
    col_offset: int,
    state: torch.Tensor,  # [4, n] in math_dtype: running (m, s, u, target's z), read unless `first`
    first: bool,
    last: bool,
    temperature: float,
    logit_scale: float,
    softcap: float | None,
    keep: bool = False,
) -> torch.Tensor:
    """Fold a block of columns of the raw logits into the rows' running statistics `state`, the blocks of a row in
    order, as the Triton kernel does: `m` the running max, `s = sum exp(z - m)`, `u = sum exp(z - m) * (z - m)`.
    After the `last` block `state` holds `(logp, entropy, row max, log-sum)`. `keep`: `z` is left as it was (a few
    rows at a time are transformed in a copy), else it is transformed and shifted in place."""
    if first:
        state[0].fill_(float("-inf"))
        state[1:].zero_()
    m, s, u, z_y = state
    y = ids.long() - col_offset
    target = (y >= 0) & (y < z.shape[1])
    y = y.clamp(0, z.shape[1] - 1).unsqueeze(-1)
    for r in _blocks(z.shape[0], z.shape[1]):
        zb = z[r].clone() if keep else z[r]
        if softcap is None:
            zb.mul_(logit_scale / temperature)
        else:
            zb.mul_(logit_scale / softcap).tanh_().mul_(softcap / temperature)
        z_y[r] = torch.where(target[r], zb.gather(-1, y[r]).squeeze(-1), z_y[r])
        m_new = torch.maximum(m[r], zb.amax(-1))
        m_ref = m_new.masked_fill(m_new == float("-inf"), 0.0)  # all -inf so far: any finite reference works
        shift = torch.where(s[r] > 0, m[r] - m_ref, 0.0)
        alpha = shift.exp()
        e = zb.sub_(m_ref.unsqueeze(-1)).exp()
        u_b = e.mul(zb.masked_fill_(e == 0, 0.0)).sum(-1)
        u[r] = alpha * (u[r] + shift * s[r]) + u_b
        s[r] = alpha * s[r] + e.sum(-1)
        m[r] = m_new
    if last:
        m = m.masked_fill(m == float("-inf"), 0.0)
        log_s = s.log()
        state.copy_(torch.stack(((z_y - m) - log_s, log_s - u / s, m, log_s)))
    return state


def row_stats(state: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """`(row max, log-sum)` `[c]` from the `state` of `chunk_stats`."""
    return state[0].squeeze(-1), state[1].squeeze(-1)


def block_grad(
    z: torch.Tensor,  # [n, v] raw logits of vocabulary entries col_offset, col_offset + 1, ..., in math_dtype, owned
    ids: torch.Tensor,  # [n]
    col_offset: int,
    m: torch.Tensor,  # [n] the full rows' max of the transformed logits
    log_s: torch.Tensor,  # [n] and log-sum of exp(z - m)
    entropy: torch.Tensor,  # [n]
    grad_logp: torch.Tensor,  # [n]
    grad_entropy: torch.Tensor | None,  # [n]
    mask: torch.Tensor | None,  # [n] bool: rows outside get zeros
    temperature: float,
    logit_scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """The gradient with respect to a block of columns of the raw logits, written over `z`, from the full rows'
    statistics: `k (g onehot(y) - p (g + h (log p + entropy)))` times the soft-cap's derivative, `k` the scale over
    the temperature."""
    k = logit_scale / temperature
    m, log_s = m.to(z.dtype).unsqueeze(-1), log_s.to(z.dtype).unsqueeze(-1)
    g = grad_logp.to(z.dtype).unsqueeze(-1)
    h = None if grad_entropy is None else grad_entropy.to(z.dtype).unsqueeze(-1)
    ent = entropy.to(z.dtype).unsqueeze(-1)
    y = ids.long() - col_offset
    target = ((y >= 0) & (y < z.shape[1])).unsqueeze(-1)
    y = y.clamp(0, z.shape[1] - 1).unsqueeze(-1)
    for r in _blocks(z.shape[0], z.shape[1]):
        zb = z[r]
        factor = None
        if softcap is None:
            zb.mul_(k)
        else:
            zb.mul_(logit_scale / softcap).tanh_()
            factor = 1.0 - zb.square()  # the soft-cap's derivative
            zb.mul_(softcap / temperature)
        logp = zb.sub_(m[r]).sub_(log_s[r])
        p = logp.exp()
        if h is None:
            torch.mul(p, -g[r] * k, out=zb)
        else:
            zb.add_(ent[r]).mul_(h[r]).add_(g[r]).mul_(p).mul_(-k)
            zb.masked_fill_(p == 0, 0.0)  # p log p -> 0
        zb.scatter_add_(-1, y[r], g[r] * k * target[r])
        if factor is not None:
            zb.mul_(factor)
        if mask is not None:
            zb.masked_fill_(~mask[r].unsqueeze(-1), 0.0)
    return z


def chunk_grad(
    z: torch.Tensor,  # [c, V], as `chunk_stats` left it (z - m)
    ids: torch.Tensor,  # [c]
    state: tuple,
    entropy: torch.Tensor,  # [c]
    grad_logp: torch.Tensor,  # [c]
    grad_entropy: torch.Tensor | None,  # [c]
    temperature: float,
    logit_scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """The gradient with respect to the raw logits, `[c, V]`, written over `z`.

    With `zc = z - m`, `e = exp(zc)`, `s = sum e`: `dz = g * onehot(y) + e * (a + b * zc)` where
    `a = -(g + h * (entropy - log s)) / s` and `b = -h / s`, times the transform's derivative."""
    m, log_s, s = state
    k = logit_scale / temperature
    g = grad_logp.to(z.dtype).unsqueeze(-1)
    if grad_entropy is None:
        a, b = -g * k / s, None
    else:
        h = grad_entropy.to(z.dtype).unsqueeze(-1)
        a = -(g + h * (entropy.to(z.dtype).unsqueeze(-1) - log_s)) * k / s
        b = -h * k / s
    y = ids.long().unsqueeze(-1)
    for r in _blocks(z.shape[0], z.shape[1]):
        zb = z[r]
        e = zb.exp()
        factor = None
        if softcap is not None:  # 1 - tanh^2, from the shifted logits
            factor = zb.add(m[r]).mul_(temperature / softcap).square_().neg_().add_(1.0)
        if b is None:
            torch.mul(e, a[r], out=zb)
        else:
            zb.mul_(b[r]).add_(a[r]).mul_(e)
        zb.scatter_add_(-1, y[r], g[r] * k)
        if factor is not None:
            zb.mul_(factor)
    return z


def scale_(tensors: list[torch.Tensor], scale: torch.Tensor) -> None:
    """Multiply each of `tensors` in place by the 0-dim `scale`, as `ops/scale.py` does: nothing to do when it is 1,
    else in fp32 math for 16-bit tensors, rounded once. A CPU `scale` is read on the host. On a GPU (the PyTorch path
    there) it stays on the device, so that the host does not wait for the queued work, and is rounded to each
    tensor's dtype before the multiply."""
    if scale.device.type != "cpu":
        for x in tensors:
            x.mul_(scale.to(x.dtype))
        return
    s = scale.item()
    if s != 1.0:
        for x in tensors:
            x.mul_(s)
