"""The GRPO loss straight from hidden states and the LM-head weight, a chunk of tokens at a time.

Only the tokens in the loss (the mask's ones) are projected. For each chunk of them the logits `hidden @ weight.T +
bias` are formed (a `[chunk, V]` buffer, the only vocabulary-sized memory), read once by the log-prob kernel, and then
overwritten in place by their gradient, which two matrix products turn into the chunk's `d_hidden` rows and its share
of `d_weight`. The logits of the whole batch never exist.

Two schedules:

- single pass (`FusedLinearGRPOFunction`): when every token's gradient coefficient `dL/dlogp` is known once the
  chunk's own log-probs are (token-level ratios; or whole sequences per chunk for the sequence-level options GSPO,
  VESPO and the off-policy mask), the forward forms the gradients right away: three matrix products in all, and the
  backward only scales them by the incoming gradient.
- two passes (`LinearLogProbEntropyFunction` + the objective): when the loss needs statistics of the whole batch first
  (`top_entropy_quantile < 1`), or a sequence does not fit in one chunk, the forward keeps only `[N]`-sized statistics
  and the backward recomputes each chunk's logits: four products.

`d_weight` is accumulated across chunks in the weight's dtype (exact fp32 accumulation for fp32 weights; for bf16
weights each chunk's product is added in bf16, as chunked losses usually do).
"""

from __future__ import annotations

import os

import torch

from grpo_kernels import cpu
from grpo_kernels.backend import use_triton
from grpo_kernels.config import GRPOLossConfig, HeadOptions
from grpo_kernels.objective import LossInputs, LossPlan, grpo_objective, row_terms

# Bytes of one chunk of logits. On CPU, 24 MiB (96 tokens at V = 65,536) keeps the three matrix products within a few
# percent of their speed at 256 MiB chunks, measured on 2 cores at N = 8,192, H = 512; fewer than 64 tokens a chunk
# slows the weight-gradient product, which rereads d_weight once per chunk.
CHUNK_BYTES = {"cpu": 24 << 20, "cuda": 1 << 30}
MIN_CHUNK_TOKENS = {"cpu": 64, "cuda": 1}


def head_options_from_config(config, temperature: float = 1.0) -> HeadOptions:
    """The head's logit scale and soft-cap from a transformers model config (text config for multimodal models).

    Reads `final_logit_softcapping` (Gemma 2/3) and the scale models apply to the logits: `logit_scale` (Cohere),
    `output_multiplier`, `lm_head_multiplier` (Falcon-H1), or `1 / logits_scaling` (Granite, MiniCPM3;
    HyperCLOVA X multiplies by it).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text, name, None) is not None:
            scale = float(getattr(text, name))
            break
    if scale is None and getattr(text, "logits_scaling", None) is not None:  # HyperCLOVA X multiplies by it
        hyperclova = getattr(text, "model_type", None) == "hyperclovax"
        scale = float(text.logits_scaling) if hyperclova else 1.0 / float(text.logits_scaling)
    softcap = getattr(text, "final_logit_softcapping", None)
    return HeadOptions(
        temperature=temperature,
        logit_scale=1.0 if scale is None else scale,
        final_logit_softcapping=None if softcap is None else float(softcap),
    )


def chunk_tokens(vocab: int, device: torch.device) -> int:
    """Tokens per chunk so that one chunk of fp32 logits takes about `CHUNK_BYTES` of the device."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    return max(MIN_CHUNK_TOKENS[kind], CHUNK_BYTES[kind] // (4 * max(vocab, 1)))


class _Head:
    """The active tokens' hidden rows and the head's weights: chunk logits, and gradient accumulation."""

    def __init__(self, hidden, weight, bias, ids, positions: torch.Tensor | None, head: HeadOptions, ops=None) -> None:
        B, T, H = hidden.shape
        self.shape = (B, T, H)
        self.flat = hidden.reshape(B * T, H)
        self.positions = positions  # flat index b * T + t of each active token; None: all are active
        self.n = B * T if positions is None else positions.numel()
        self.ids = ids.reshape(-1) if self.positions is None else ids.reshape(-1).index_select(0, self.positions)
        self.weight, self.bias, self.head = weight, bias, head
        self.ops = _row_ops(hidden) if ops is None else ops  # the backward reuses the forward's choice
        self._buffer: torch.Tensor | None = None
        self.args = (head.temperature, head.logit_scale, head.final_logit_softcapping)

    def rows(self, sl: slice) -> torch.Tensor:  # [c, H]
        return self.flat[sl] if self.positions is None else self.flat.index_select(0, self.positions[sl])

    def logits(self, sl: slice) -> torch.Tensor:  # [c, V]
        """The chunk's raw logits, in one buffer reused by every chunk (the chunk ops overwrite it); fp32 or fp64
        on the CPU path."""
        h = self.rows(sl)
        dtype = cpu.math_dtype(h) if self.ops is cpu else h.dtype
        if self._buffer is None or self._buffer.shape[0] < h.shape[0]:
            self._buffer = None  # release the old one first
            self._buffer = torch.empty(h.shape[0], self.weight.shape[0], dtype=dtype, device=h.device)
        z = self._buffer[: h.shape[0]]
        if dtype == h.dtype:
            torch.mm(h, self.weight.t(), out=z)
        else:
            z.copy_(h @ self.weight.t())
        if self.bias is not None:
            z += self.bias
        return z

    def stats(self, z: torch.Tensor, sl: slice):
        """`(logp, entropy, state)` of the chunk; `state` feeds `add_grads` for the same `z`."""
        return self.ops.chunk_stats(z, self.ids[sl], *self.args)

    def start_grads(self, needs: tuple[bool, bool, bool]) -> None:
        V, dev = self.weight.shape[0], self.flat.device
        self.d_h = None
        if needs[0]:
            self.d_h = torch.empty_like(self.flat) if self.positions is None else torch.zeros_like(self.flat)
        self.d_w = torch.zeros_like(self.weight) if needs[1] else None
        self.d_b = torch.zeros(V, dtype=cpu.math_dtype(self.flat), device=dev) if needs[2] else None

    def add_grads(self, z, sl, state, entropy, grad_logp, grad_entropy) -> None:
        """Turn the chunk's logits `z` into their gradient (in place), then into the weights' gradients."""
        dz = self.ops.chunk_grad(z, self.ids[sl], state, entropy, grad_logp, grad_entropy, *self.args)
        dz = dz.to(self.weight.dtype)
        if self.d_h is not None:
            if self.positions is None:
                torch.mm(dz, self.weight, out=self.d_h[sl])
            else:
                self.d_h.index_copy_(0, self.positions[sl], dz @ self.weight)
        if self.d_w is not None:
            self.d_w.addmm_(dz.t(), self.rows(sl))
        if self.d_b is not None:
            self.d_b += dz.sum(0, dtype=self.d_b.dtype)

    def finish_grads(self, scale: torch.Tensor | None = None):
        """`(d_hidden [B, T, H], d_weight, d_bias)`, each None where not needed, multiplied in place by `scale`
        (the gradients are handed over, not copied: this can be done once)."""
        B, T, H = self.shape
        d_h, d_w, d_b = self.d_h, self.d_w, self.d_b
        self.d_h = self.d_w = self.d_b = None
        if scale is not None:
            for g in (d_h, d_w, d_b):
                if g is not None:
                    g.mul_(scale.to(g.dtype))
        return None if d_h is None else d_h.view(B, T, H), d_w, None if d_b is None else d_b.to(self.bias.dtype)

    def scatter_rows(self, x: torch.Tensor) -> torch.Tensor:
        """`[n, H]` rows of the active tokens -> `[B, T, H]`, zero elsewhere."""
        B, T, H = self.shape
        if self.positions is None:
            return x.view(B, T, H)
        return x.new_zeros(B * T, H).index_copy_(0, self.positions, x).view(B, T, H)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """`[n]` per-token values of the active tokens -> `[B, T]`, zero elsewhere."""
        B, T, _ = self.shape
        if self.positions is None:
            return x.view(B, T)
        return x.new_zeros(B * T).index_copy_(0, self.positions, x).view(B, T)


def active_positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Flat indices `b * T + t` of the tokens in the loss (None when all are)."""
    return None if mask is None else mask.reshape(-1).nonzero().squeeze(1)


def _row_ops(t: torch.Tensor):
    if use_triton(t):
        from grpo_kernels.ops import logprobs

        return logprobs
    return cpu


def _token_ranges(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _row_ranges(counts: list[int], size: int) -> list[tuple[slice, slice]] | None:
    """Pack whole rows (`counts[b]` active tokens each) into chunks of at most `size` tokens:
    `[(row slice, token slice)]`, or None when one row alone is larger than a chunk."""
    if counts and max(counts) > size:
        return None
    out, start_row, start_tok, tok = [], 0, 0, 0
    for b, c in enumerate(counts):
        if tok + c > size and b > start_row:
            out.append((slice(start_row, b), slice(start_tok, tok)))
            start_row, start_tok = b, tok
        tok += c
    out.append((slice(start_row, len(counts)), slice(start_tok, tok)))
    return out


def use_fused_kernels(t: torch.Tensor) -> bool:
    """True when `GRPO_KERNELS_LINEAR=fused` asks for the Triton kernels that keep the logits in registers
    (`ops/linear.py`) and Triton runs the op. They are opt-in until their speed is measured on a GPU; the default,
    `chunked`, runs the chunked schedules on every device (with the Triton row kernels on CUDA)."""
    strategy = os.environ.get("GRPO_KERNELS_LINEAR", "chunked")
    if strategy not in ("fused", "chunked"):
        raise ValueError(f"GRPO_KERNELS_LINEAR must be 'fused' or 'chunked'; got {strategy!r}")
    return strategy == "fused" and use_triton(t)


def linear_forward(hidden, weight, bias, ids, mask, head: HeadOptions, ops, fused: bool):
    """`(logp [B, T], entropy [B, T], saved)`: the two-pass schedule's forward; `saved` (`[N]` entropies of the
    active tokens and, for the fused kernels, `[2, N]` statistics) feeds `linear_backward`."""
    lm = _Head(hidden, weight, bias, ids, active_positions(mask), head, ops)
    stats = None
    if fused:
        from grpo_kernels.ops.linear import linear_fwd

        logp, entropy, stats = linear_fwd(lm.flat, weight, bias, lm.ids, lm.positions, lm.args)
    else:
        logp = torch.empty(lm.n, dtype=cpu.math_dtype(hidden), device=hidden.device)
        entropy = torch.empty_like(logp)
        for sl in _token_ranges(lm.n, chunk_tokens(weight.shape[0], hidden.device)):
            logp[sl], entropy[sl], _ = lm.stats(lm.logits(sl), sl)
    return lm.scatter(logp), lm.scatter(entropy), (entropy, stats)


def linear_backward(hidden, weight, bias, ids, mask, head: HeadOptions, ops, fused: bool, saved, grad_logp,
                    grad_entropy, needs: tuple[bool, bool, bool]):  # fmt: skip
    """`(d_hidden, d_weight, d_bias)` (None where not needed) from the gradients of `linear_forward`'s outputs; the
    logits are recomputed, tile by tile in the fused kernels or chunk by chunk."""
    entropy, stats = saved
    lm = _Head(hidden, weight, bias, ids, active_positions(mask), head, ops)
    gather = (lambda x: x.reshape(-1)) if lm.positions is None else (lambda x: x.reshape(-1)[lm.positions])
    g_lp = torch.zeros_like(entropy) if grad_logp is None else gather(grad_logp).to(entropy.dtype)
    g_ent = None if grad_entropy is None else gather(grad_entropy).to(entropy.dtype)
    if fused:
        from grpo_kernels.ops.linear import linear_bwd

        d_h, d_w, d_b = linear_bwd(lm.flat, weight, bias, lm.ids, lm.positions, stats, entropy, g_lp, g_ent, lm.args,
                                   needs)  # fmt: skip
        d_h = None if d_h is None else lm.scatter_rows(d_h).to(hidden.dtype)
        return d_h, d_w, None if d_b is None else d_b.to(bias.dtype)
    lm.start_grads(needs)
    for sl in _token_ranges(lm.n, chunk_tokens(weight.shape[0], hidden.device)):
        z = lm.logits(sl)
        _, _, state = lm.stats(z, sl)  # recomputed: the forward kept only [N]-sized results
        lm.add_grads(z, sl, state, entropy[sl], g_lp[sl], None if g_ent is None else g_ent[sl])
    return lm.finish_grads()


class LinearLogProbEntropyFunction(torch.autograd.Function):
    """`(hidden [B, T, H], weight [V, H], bias [V] | None, ids [B, T], mask [B, T] | None, HeadOptions)
    -> (logp, entropy)`, fp32 `[B, T]` (0 where masked). The backward recomputes the logits: tile by tile in the
    fused Triton kernels, or chunk by chunk, with the implementation the forward used."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, mask, head: HeadOptions):
        ctx.ops, ctx.fused, ctx.head = _row_ops(hidden), use_fused_kernels(hidden), head
        logp, entropy, (saved_entropy, stats) = linear_forward(hidden, weight, bias, ids, mask, head, ctx.ops,
                                                               ctx.fused)  # fmt: skip
        ctx.save_for_backward(hidden, weight, bias, ids, mask, saved_entropy, stats)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, ids, mask, entropy, stats = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None
        grads = linear_backward(hidden, weight, bias, ids, mask, ctx.head, ctx.ops, ctx.fused, (entropy, stats),
                                grad_logp, grad_entropy, tuple(ctx.needs_input_grad[:3]))  # fmt: skip
        return (*grads, None, None, None)


def single_pass_chunks(
    positions: torch.Tensor | None, inputs: LossInputs, config: GRPOLossConfig, vocab: int, device: torch.device
) -> list[tuple[slice, slice]] | None:
    """Chunks for the single-pass schedule as `(row slice, token slice)` over the active tokens, or None when it
    does not apply."""
    if config.top_entropy_quantile < 1.0:
        return None
    size = chunk_tokens(vocab, device)
    token_local = (
        config.importance_sampling_level == "token"
        and config.off_policy_mask_threshold is None
        and config.loss_type != "vespo"
    )
    if not token_local:
        return _row_ranges(inputs.mask.sum(-1).tolist(), size)
    T = inputs.mask.shape[1]
    n = inputs.mask.numel() if positions is None else positions.numel()
    chunks = []
    for sl in _token_ranges(n, size):
        first, last = (
            (sl.start, sl.stop - 1) if positions is None else (int(positions[sl.start]), int(positions[sl.stop - 1]))
        )
        chunks.append((slice(first // T, last // T + 1), sl))
    return chunks


class FusedLinearGRPOFunction(torch.autograd.Function):
    """The single-pass schedule: `(hidden, weight, bias, ids, positions, LossInputs, GRPOLossConfig, HeadOptions,
    chunks, num_items_in_batch, needs) -> (loss, logps, entropy)`; the gradients are formed in the forward for the
    inputs `needs` flags (hidden, weight, bias), none when autograd is off."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, positions, inputs, config, head, chunks, num_items_in_batch, needs):
        lm = _Head(hidden, weight, bias, ids, positions, head)
        grads = any(needs)
        if grads:
            lm.start_grads(needs)
        plan = LossPlan.build(inputs.mask, config, None, num_items_in_batch)
        lengths = inputs.mask.sum(-1, keepdim=True)
        logp = torch.empty(lm.n, dtype=cpu.math_dtype(hidden), device=hidden.device)
        entropy = torch.empty_like(logp)
        loss = torch.zeros((), dtype=logp.dtype, device=hidden.device)
        T = inputs.mask.shape[1]
        for rows, sl in chunks:
            z = lm.logits(sl)
            logp[sl], entropy[sl], state = lm.stats(z, sl)
            # this chunk's tokens in their rows' [rows, T] layout: its share of the loss and d loss / d (logp, H)
            flat = torch.arange(sl.start, sl.stop, device=hidden.device) if positions is None else positions[sl]
            local = flat - rows.start * T
            n_rows = rows.stop - rows.start
            lp = logp.new_zeros(n_rows * T).index_copy_(0, local, logp[sl]).view(n_rows, T)
            ent = logp.new_zeros(n_rows * T).index_copy_(0, local, entropy[sl]).view(n_rows, T)
            part = inputs.rows(rows)
            part.mask = torch.zeros(n_rows * T, dtype=torch.bool, device=hidden.device).index_fill_(0, local, True)
            part.mask = part.mask.view(n_rows, T)
            part.lengths = lengths[rows]
            with torch.enable_grad():
                lp.requires_grad_(grads)
                ent.requires_grad_(grads and config.entropy_coef != 0.0)
                share, _ = row_terms(lp, ent, part, config, plan)
                if grads:
                    g = torch.autograd.grad(share, (lp, ent) if ent.requires_grad else (lp,))
            loss += share.detach()
            if grads:
                g_lp = g[0].reshape(-1).index_select(0, local)
                g_ent = g[1].reshape(-1).index_select(0, local) if len(g) > 1 else None
                lm.add_grads(z, sl, state, entropy[sl], g_lp, g_ent)
        logps, entropies = lm.scatter(logp), lm.scatter(entropy)
        ctx.lm = lm if grads else None
        ctx.mark_non_differentiable(logps, entropies)
        return loss, logps, entropies

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps, _grad_entropy):
        if ctx.lm is None or (ctx.lm.d_h is None and ctx.lm.d_w is None and ctx.lm.d_b is None):
            raise RuntimeError(
                "fused_linear_grpo_loss forms its gradients in the forward and hands them over in the first backward; "
                "a second backward through the same call is not supported: call the loss again"
            )
        d_hidden, d_weight, d_bias = ctx.lm.finish_grads(grad_loss)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None, None, None


def fused_linear_loss(
    hidden: torch.Tensor,  # [B, T, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    ids: torch.Tensor,  # [B, T]
    inputs: LossInputs,
    config: GRPOLossConfig,
    head: HeadOptions,
    num_items_in_batch,
    masked: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`(loss, logps, entropy, metrics)` by the single-pass schedule where it applies, else by two passes."""
    mask = inputs.mask if masked else None
    positions = active_positions(mask)
    chunks = None
    if not use_fused_kernels(hidden):
        chunks = single_pass_chunks(positions, inputs, config, weight.shape[0], hidden.device)
    if chunks is not None:
        needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
        loss, logps, entropy = FusedLinearGRPOFunction.apply(
            hidden, weight, bias, ids, positions, inputs, config, head, chunks, num_items_in_batch, needs
        )
        with torch.no_grad():
            _, metrics = grpo_objective(logps, entropy, inputs, config, num_items_in_batch)
        return loss, logps, entropy, metrics
    logps, entropy = LinearLogProbEntropyFunction.apply(hidden, weight, bias, ids, mask, head)
    loss, metrics = grpo_objective(logps, entropy, inputs, config, num_items_in_batch)
    return loss, logps.detach(), entropy.detach(), metrics
