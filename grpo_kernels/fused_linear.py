"""The GRPO loss straight from hidden states and the LM-head weight, a chunk of tokens at a time.

Only the tokens in the loss (the mask's ones) are projected. For each chunk of them the logits `hidden @ weight.T +
bias` are formed (a `[chunk, V]` buffer, the only vocabulary-sized memory), read once by the log-prob kernel, and then
overwritten in place by their gradient, which two matrix products turn into the chunk's `d_hidden` rows and its share
of `d_weight`. The logits of the whole batch never exist.

Two schedules:

- single pass (`FusedLinearGRPOFunction`): when every token's gradient coefficient `dL/dlogp` is known once the
  chunk's own log-probs are (token-level ratios; or whole sequences per chunk for the sequence-level options GSPO,
  VESPO and the off-policy mask), the forward forms the gradients right away: three matrix products in all, and the
  backward only scales them by the incoming gradient (`ops/scale.py`: nothing to do when it is 1). `dL/dlogp`
  comes in closed form, not by autograd: token by token for token-level losses (`objective.TokenGrads`, a few ops a
  chunk), row by row for the others (`objective.row_grads`). The loss itself is formed once, for the whole batch,
  with the metrics. `d_weight` is not zeroed first: the first chunk's product writes it.
- two passes (`LinearLogProbEntropyFunction` + the objective): when the loss needs statistics of the whole batch first
  (`top_entropy_quantile < 1`), a sequence does not fit in one chunk, or the inputs are fp16 (whose gradients must be
  rounded after a loss scale multiplies them, not before), the forward keeps only `[N]`-sized statistics and the
  backward recomputes each chunk's logits: four products.

`d_weight` is accumulated across chunks in the weight's dtype (exact fp32 accumulation for fp32 weights; for bf16
weights each chunk's product is added in bf16, as chunked losses usually do). Each chunk rereads and rewrites all of
`d_weight`, so chunks are large on CUDA (1 GiB of fp32 logits: 512 MiB of bf16 logits beyond the gradients).

`GRPO_KERNELS_LINEAR` picks the strategy:

- `chunked` (the default): as above.
- `vocab-blocks`: the token chunks form only `d_hidden` and keep each token's log-sum-exp statistics and gradient
  coefficients (`[N]` vectors); `d_weight` and `d_bias` are then formed one block of vocabulary columns at a time, from
  that block's logits recomputed for every token: one more matrix product, but `d_weight` is written once, never
  accumulated, and chunks and blocks are small (128 MiB of fp32 logits on CUDA at most: 64 MiB in bf16).
- `tiles`: always two passes over the same chunks of tokens (sized by the hidden size: their fp32 `d_hidden` rows are
  the one other buffer), a block of vocabulary columns at a time: the forward folds each block's logits into the
  tokens' running log-sum-exp statistics (`block_stats`); the backward recomputes each block's logits and forms its
  share of the gradients. Four products, like `vocab-blocks`, but large ones in few chunks, with little beyond the
  gradients (64 MiB of fp32 logits on CUDA at most: 32 MiB in bf16, plus the chunk's `d_hidden` rows, 24 MiB at
  H = 4,096 in bf16). No gradient filtering.
- `scratch`: the single pass with small chunks (60 MiB of bf16 logits on CUDA), except its first chunk, whose
  logits are kept in `d_weight`'s own memory before `d_weight` is formed: a `[V, H]` gradient holds the logits of
  about H tokens (with their fp32 `d_hidden` rows), in blocks of vocabulary columns. That chunk forms its gradients
  from them, the blocks' `d_weight` rows written last to first so that none overwrites logits still to be read; the
  chunks after it add to `d_weight`. Three products, as the default, and half the rereading of `d_weight` that small
  chunks alone would need at N = 2H. On CUDA the chunks after the first also keep part of their logits in the rows
  of `d_hidden` of the tokens after them, which nothing has written yet (`_Borrow`): larger chunks, fewer
  rereadings. No gradient filtering. Where the single pass does not apply, two passes in small chunks, whose backward
  keeps its first chunk's logits in `d_weight`'s memory the same way.
- `fused`: the Triton kernels of `ops/linear.py` (CUDA), which keep each logits tile in registers.

Gradient filtering (`HeadOptions.grad_filter_eps`, approximate, off by default): once a chunk's logits gradient is
formed, only its columns with an entry above its token's threshold enter the products for `d_hidden`, `d_weight` and
`d_bias`, gathered a bounded number of columns at a time (`d_weight` rows are added with `index_add_`). Where the
softmax is peaked a chunk keeps a few percent of the vocabulary, and two of the three products shrink with it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator

import torch

from grpo_kernels import cpu
from grpo_kernels.backend import use_triton
from grpo_kernels.config import GRPOLossConfig, HeadOptions
from grpo_kernels.objective import (
    LossInputs,
    LossPlan,
    TokenGrads,
    grpo_objective,
    loss_and_metrics,
    row_grads,
    token_local,
)

# Bytes of one chunk of logits. On CPU, 24 MiB (96 tokens at V = 65,536) keeps the three matrix products within a few
# percent of their speed at 256 MiB chunks, measured on 2 cores at N = 8,192, H = 512; fewer than 64 tokens a chunk
# slows the weight-gradient product, which rereads d_weight once per chunk.
CHUNK_BYTES = {"cpu": 24 << 20, "cuda": 1 << 30}
# With GRPO_KERNELS_LINEAR=vocab-blocks nothing is accumulated across chunks, so chunks can be small: on CUDA at most
# 128 MiB (64 MiB of bf16 logits), for token chunks and vocabulary blocks alike.
VOCAB_BLOCKS_CHUNK_BYTES = {"cpu": 24 << 20, "cuda": 128 << 20}
# GRPO_KERNELS_LINEAR=tiles: the logits buffer (in fp32 bytes; half that in bf16), and a quarter of it for each token
# chunk's fp32 d_hidden rows: 32 + 16 MiB beyond the gradients on CUDA in bf16
TILES_CHUNK_BYTES = {"cpu": 24 << 20, "cuda": 64 << 20}
# GRPO_KERNELS_LINEAR=scratch: the chunks after the first (whose logits live in d_weight's memory), in fp32 bytes as
# CHUNK_BYTES: 60 MiB of bf16 logits, 240 tokens at V = 131,072
SCRATCH_CHUNK_BYTES = {"cpu": 24 << 20, "cuda": 120 << 20}
# ...and the first chunk's blocks of vocabulary columns: at most that budget over this many bytes per logit. On CUDA a
# block's copy (in the weight's dtype, where its logits reach into its own rows of d_weight) fills the buffer the later
# chunks use anyway: 18 blocks of 7,296 columns at the target shape, each with its products, two row kernels and an
# fp32 addition of the chunk's d_hidden rows (on the H200 the 33 blocks of 4,032 columns spent 2.0 ms in those
# additions alone); the CPU path's fp32 logits and its row kernels' temporaries take twice as many bytes per logit
SCRATCH_BLOCK_BYTES = {"cpu": 8, "cuda": 4}
# where its fp32 d_hidden sums start in d_weight's memory: aligned for cuBLAS's fast kernels
SCRATCH_ALIGN = 256
# ...or whether they may lie in d_hidden's own memory instead, which it does not need until the chunk's rows are
# stored, where the first chunk then takes more tokens (`_scratch_capacity`): at N = 8,192, H = 4,096, V = 131,072 in
# bf16 4,096 tokens instead of 3,855, and 14 later chunks instead of 15 (one fewer reading and writing of d_weight)
SCRATCH_SUMS_IN_ROWS = True
# GRPO_KERNELS_LINEAR=scratch: whether the chunks after the first may keep part of their logits in d_hidden's rows of
# the tokens after them (`_Borrow`). On CUDA small chunks are bound by rereading d_weight, so fewer of them pay; on the
# CPU the products are bound by arithmetic, and the row kernels' copies of a block's rows would add to the peak.
BORROW_ROWS = {"cpu": False, "cuda": True}
# What adds each chunk's share to d_weight on the Triton path (the chunked and scratch strategies): "cublas"
# (`addmm_`) or, on trial, "triton" (`ops/weight_grad.py`, which loads d_weight's tiles ahead of its products; the
# benchmarks' ours-scratch-tadd provider sets it around its calls). Read when a call's forward (or, for two passes, its
# backward) starts.
ADD_WEIGHT_GRAD = "cublas"
# Whether the tiles and scratch strategies' fp32 `d_hidden` sums take each block's 16-bit product inside the product
# (`torch.addmm` with `out_dtype`, CUDA only, where the PyTorch version accepts fp32 sums with 16-bit factors:
# `mixed_sums`; 2.11 refuses them) instead of a 16-bit product and an fp32 addition per block: one kernel instead of
# two and one rounding fewer (the H200 spent 2.0 ms in the 33 additions of the scratch strategy's first chunk). Read
# as `_Head` starts.
MIXED_SUMS = True
STRATEGIES = ("chunked", "fused", "vocab-blocks", "tiles", "scratch")
# Gradient filtering leaves a chunk's small columns out only while no token loses more than this many times its
# threshold in all (its left-out probability mass, without the entropy bonus, at most 64 * grad_filter_eps: 1.6% at
# 2**-12): a flat softmax, where the many small entries add up, keeps every column.
FILTER_MAX_LEFT_OUT = 64
MIN_CHUNK_TOKENS = {"cpu": 64, "cuda": 1}
# On the CPU, fp32 (fp64) matrix products over more than two blocks of this many terms sum each block apart and add
# the blocks' sums pairwise, where the blocks' sums take at most CPU_PARTIAL_SUMS elements (see `_product`).
CPU_SUM_TERMS = 4096
CPU_PARTIAL_SUMS = 1 << 18
# Blocks of vocabulary columns (tiles, vocab-blocks) are whole multiples of this many columns, the last aside: the
# rows of a block's logits are then 16-byte aligned, as cuBLAS's fast kernels need. On the H200 at N = 8,192,
# H = 4,096, V = 151,936, tiles took 175 ms with blocks of 15,194 columns and 71.0 ms with 15,232.
BLOCK_COLUMNS = 64
# Rows of a chunk's logits start this many elements apart at least (the buffer's rows padded past V to a multiple):
# on CUDA, cuBLAS takes far slower kernels for rows that are not 16-byte aligned. On the H200 the default took 18.7 ms
# at GPT-2's vocabulary (50,257; N = 8,192, H = 768) against 4.17 ms at 50,304 before its rows were padded, 15.0 ms
# against 4.28 after: the extents count too, so the logits and `d_weight` products also take an aligned prefix of the
# vocabulary apart from the rest (`column_parts`).
ROW_ALIGN = {"cpu": 1, "cuda": 64}


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


def chunk_tokens(vocab: int, device: torch.device, budget: int | None = None) -> int:
    """Tokens per chunk so that one chunk of fp32 logits takes about `budget` bytes (by default `CHUNK_BYTES` of the
    device, or `VOCAB_BLOCKS_CHUNK_BYTES`, where smaller, for the vocab-blocks strategy)."""
    kind = _kind(device)
    budget = _chunk_bytes(kind) if budget is None else budget
    return max(MIN_CHUNK_TOKENS[kind], budget // (4 * max(vocab, 1)))


def _kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def tile_tokens(hidden_size: int, device: torch.device, budget: int | None = None) -> int:
    """Tokens per chunk of the tiles strategy: their fp32 `d_hidden` rows take a quarter of the chunk budget."""
    kind = _kind(device)
    budget = _chunk_bytes(kind) if budget is None else budget
    return max(MIN_CHUNK_TOKENS[kind], budget // (16 * max(hidden_size, 1)))


def _chunk_bytes(kind: str, strategy: str | None = None) -> int:
    """The budget of one chunk of fp32 logits: `GRPO_KERNELS_CHUNK_MIB` (MiB) where set, else the strategy's (the
    environment's unless `strategy` says). A call reads it once, in its forward: its backward keeps that budget."""
    override = os.environ.get("GRPO_KERNELS_CHUNK_MIB")  # set but empty: as if unset
    if override:
        try:
            mib = float(override)
        except ValueError:
            mib = 0.0
        if not 0 < mib < math.inf:
            raise ValueError(f"GRPO_KERNELS_CHUNK_MIB must be a positive, finite number of MiB; got {override!r}")
        return max(1, int(mib * (1 << 20)))
    strategy = linear_strategy() if strategy is None else strategy
    if strategy == "vocab-blocks":
        return min(CHUNK_BYTES[kind], VOCAB_BLOCKS_CHUNK_BYTES[kind])
    if strategy == "tiles":
        return min(CHUNK_BYTES[kind], TILES_CHUNK_BYTES[kind])
    if strategy == "scratch":
        return min(CHUNK_BYTES[kind], SCRATCH_CHUNK_BYTES[kind])
    return CHUNK_BYTES[kind]


def workspace_bytes(tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """At most the bytes one call's forward and backward allocate beyond the gradients they hand back, for `tokens`
    tokens in the loss, under the strategy and chunk budget the environment sets now: the logits buffer (in the
    inputs' dtype on CUDA, fp32 or fp64 on the CPU path), with tiles a chunk's fp32 `d_hidden` rows, with the fused
    kernels their fp32 `d_hidden`, and `[N]`-sized vectors."""
    strategy, budget = linear_schedule(device)
    kind = _kind(device)
    b = torch.finfo(dtype).bits // 8
    # the logits: in the inputs' dtype on CUDA; on the CPU path in fp32 or fp64 with a temporary of the same size
    # (their exponentials) and a bool one, and their gradient in the weight's dtype when that has 16 bits
    per_logit = b if kind == "cuda" else 2 * max(b, 4) + 1 + (b if b < 4 else 0)
    vectors = 128 * tokens  # [N]-sized vectors: logps, entropies, statistics, coefficients, positions, masks
    if strategy == "fused" and kind == "cuda":
        return 8 * tokens * hidden_size + vectors  # fp32 d_hidden, and its rows scattered to [B, T]
    rows = min(tokens, chunk_tokens(vocab, device, budget))
    # the chunk's logits (rows padded), its gathered rows and its d_hidden rows
    buffer, extra = rows * padded_vocab(vocab, device) * per_logit, 2 * rows * hidden_size * b
    if strategy == "vocab-blocks":
        buffer = max(buffer, tokens * max(1, min(vocab, budget // (4 * max(tokens, 1)))) * per_logit)
    if strategy == "scratch":  # the first chunk: a block copied out, 16-bit d_hidden products, its gathered rows
        lb = b if kind == "cuda" else max(b, 4)
        # as single_pass_chunks and scratch_fits take it, with d_hidden's rows as many as the tokens (more, where
        # some are masked out, can only let the first chunk take more, up to d_weight's memory's worth of logits)
        room, in_rows = _scratch_capacity(vocab, hidden_size, b, lb, max(b, 4), tokens, b)
        room = vocab * hidden_size * b // (vocab * lb) if in_rows or room < tokens else room
        c = min(room, tokens) if room > rows or tokens <= room else 0
        # a chunk that borrows d_hidden's rows (`_Borrow`) gathers more rows than the buffer holds: at most the first
        # chunk's, where the weight's layout leaves no room in d_weight's memory
        borrow = _Borrow(vocab, hidden_size, lb, b, rows, ROW_ALIGN[kind]) if lb == b and BORROW_ROWS[kind] else None
        most = rows if borrow is None else borrow.limit(tokens)
        if most > rows:
            extra = 2 * most * hidden_size * b
            if kind == "cpu":  # and the row kernels' temporaries, a few rows of a block at a time
                buffer = max(buffer, rows * vocab * lb + min(most * vocab, cpu.BLOCK_ELEMENTS) * (3 * lb + 1))
        if c:
            block = c * scratch_block_width(vocab, c, budget, device)
            if kind == "cpu":  # the row kernels' copies and temporaries, a few rows of the block at a time
                block = max(block * b, min(block, cpu.BLOCK_ELEMENTS) * (3 * lb + 1))
            else:
                block *= b
            buffer = max(buffer, block, c * hidden_size * b)
            extra = max(extra, c * hidden_size * b)
    if strategy == "tiles":
        c = min(tokens, tile_tokens(hidden_size, device, budget))
        buffer = max(buffer, c * max(1, min(vocab, budget // (4 * max(c, 1)))) * per_logit)
        extra = max(extra, c * hidden_size * (4 + 2 * b))  # fp32 d_hidden rows, their product, the gathered rows
    return buffer + extra + vectors


def check_schedule(strategy: str | None, chunk_mib: float | None) -> None:
    """A clear error for a strategy or chunk budget that `schedule` would not take."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    number = isinstance(chunk_mib, (int, float)) and not isinstance(chunk_mib, bool)
    if chunk_mib is not None and not (number and 0 < chunk_mib < math.inf):
        raise ValueError(f"chunk_mib must be a positive, finite number of MiB; got {chunk_mib!r}")


@contextlib.contextmanager
def schedule(strategy: str | None = None, chunk_mib: float | None = None) -> Iterator[None]:
    """Within the block, `GRPO_KERNELS_LINEAR=strategy` and `GRPO_KERNELS_CHUNK_MIB=chunk_mib` where given (None
    leaves a variable as it is). A call whose forward runs inside keeps them for its backward, wherever that runs."""
    check_schedule(strategy, chunk_mib)
    values = {"GRPO_KERNELS_LINEAR": strategy, "GRPO_KERNELS_CHUNK_MIB": None if chunk_mib is None else str(chunk_mib)}
    before = {name: os.environ.get(name) for name, value in values.items() if value is not None}
    os.environ.update({name: value for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def linear_schedule(device: torch.device) -> tuple[str, int]:
    """`(strategy, chunk budget in bytes)` as the environment sets them now: a call reads them once, in its forward."""
    strategy = linear_strategy()
    return strategy, _chunk_bytes(_kind(device), strategy)


def linear_strategy() -> str:
    """`GRPO_KERNELS_LINEAR`: "chunked" (the default), "fused", "vocab-blocks", "tiles" or "scratch" (see the
    module's docstring)."""
    strategy = os.environ.get("GRPO_KERNELS_LINEAR") or "chunked"  # set but empty: as if unset
    if strategy not in STRATEGIES:
        raise ValueError(f"GRPO_KERNELS_LINEAR must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    return strategy


class _Head:
    """The active tokens' hidden rows and the head's weights: chunk logits, and gradient accumulation."""

    def __init__(self, hidden, weight, bias, ids, positions: torch.Tensor | None, head: HeadOptions, ops=None,
                 strategy: str | None = None, chunk_bytes: int | None = None) -> None:  # fmt: skip
        B, T, H = hidden.shape
        self.shape = (B, T, H)
        self.flat = hidden.reshape(B * T, H)
        self.positions = positions  # flat index b * T + t of each active token; None: all are active
        self.n = B * T if positions is None else positions.numel()
        self.all_ids = ids.contiguous().view(-1)  # the kernels read ids[row], whatever the caller's strides
        self.ids = self.all_ids if self.positions is None else self.all_ids.index_select(0, self.positions)
        self.weight, self.bias, self.head = weight, bias, head
        # d_weight and d_bias per vocabulary block after the token chunks, from [N]-sized statistics they keep
        self.strategy = linear_strategy() if strategy is None else strategy
        self.vocab_blocks = self.strategy == "vocab-blocks"
        self.tiles = self.strategy == "tiles"  # gradients per block of vocabulary columns of each token chunk
        # the budget of a chunk of fp32 logits (and of a vocabulary block), as the forward read it
        self.chunk_bytes = _chunk_bytes(_kind(hidden.device), self.strategy) if chunk_bytes is None else chunk_bytes
        self._rows: dict[str, torch.Tensor] | None = None
        self.ops = _row_ops(hidden) if ops is None else ops  # the backward reuses the forward's choice
        self._buffer: torch.Tensor | None = None
        self.borrow: _Borrow | None = None  # set with the gradients (start_grads)
        self.borrowed: int | None = None
        self.args = (head.temperature, head.logit_scale, head.final_logit_softcapping)
        self.filter_eps = head.grad_filter_eps
        if ADD_WEIGHT_GRAD not in ("cublas", "triton"):
            raise ValueError(f'fused_linear.ADD_WEIGHT_GRAD must be "cublas" or "triton"; got {ADD_WEIGHT_GRAD!r}')
        # (its kernel steps along the rows of d_weight, like the weight's, and of the hidden states one element apart)
        self.triton_add = (ADD_WEIGHT_GRAD == "triton" and self.ops is not cpu and weight.dtype != torch.float64
                           and weight.stride(-1) == 1 and self.flat.stride(-1) == 1)  # fmt: skip
        # fp32 d_hidden sums of 16-bit products inside the products (`mixed_sums`)
        math = cpu.math_dtype(self.flat)
        self.mixed = MIXED_SUMS and weight.dtype != math and mixed_sums(hidden.device, weight.dtype, math)
        if self.strategy in ("tiles", "scratch") and self.filter_eps is not None:
            raise ValueError(
                f"grad_filter_eps is not supported by the {self.strategy} strategy (set by GRPO_KERNELS_LINEAR, "
                "schedule() or the trainer's loss_strategy): pass grad_filter_eps=None or use another strategy"
            )

    def rows(self, sl: slice) -> torch.Tensor:  # [c, H]
        return self.flat[sl] if self.positions is None else self.flat.index_select(0, self.positions[sl])

    @property
    def logits_dtype(self) -> torch.dtype:
        """The inputs' dtype, or fp32 / fp64 on the CPU path (whose chunk math works in place)."""
        return _logits_dtype(self.flat, self.ops)

    def project(self, h: torch.Tensor, cols: slice, out: torch.Tensor) -> torch.Tensor:
        """The raw logits `h @ weight[cols].T + bias[cols]` of rows `h`, written into `out`; the whole vocabulary's
        (`cols` all of it) in the products `column_parts` says."""
        parts = column_parts(self.weight.shape[0], h.device) if cols == slice(None) else (cols,)
        for part in parts:
            o = out if len(parts) == 1 else out[:, part]  # parts of the whole vocabulary
            if out.dtype == h.dtype:
                torch.mm(h, self.weight[part].t(), out=o)
            else:
                o.copy_(h @ self.weight[part].t())
        if self.bias is not None:
            out += self.bias[cols]
        return out

    def logits(self, sl: slice) -> torch.Tensor:  # [c, V], rows `padded_vocab` elements apart
        """The chunk's raw logits, in one buffer reused by every chunk (the chunk ops overwrite it)."""
        h = self.rows(sl)
        n, V = h.shape[0], self.weight.shape[0]
        row = padded_vocab(V, self.flat.device)
        return self.project(h, slice(None), self._scratch(n * row).view(n, row)[:, :V])

    def _scratch(self, numel: int) -> torch.Tensor:
        """The first `numel` elements of the one logits buffer, grown (never shrunk) when too small."""
        if self._buffer is None or self._buffer.numel() < numel:
            self._buffer = None  # release the old one first
            self._buffer = torch.empty(numel, dtype=self.logits_dtype, device=self.flat.device)
        return self._buffer[:numel]

    def _scratch_as(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """`numel` elements of `dtype` at the start of the logits buffer."""
        size = numel * dtype.itemsize
        return self._scratch(-(-size // self.logits_dtype.itemsize)).view(torch.uint8)[:size].view(dtype)

    def stats(self, z: torch.Tensor, sl: slice):
        """`(logp, entropy, state)` of the chunk; `state` feeds `add_grads` for the same `z`."""
        return self.ops.chunk_stats(z, self.ids[sl], *self.args)

    def start_grads(self, needs: tuple[bool, bool, bool]) -> None:
        V, dev = self.weight.shape[0], self.flat.device
        self.d_h = None
        if needs[0]:
            # contiguous whatever the hidden states' strides: the scratch strategy's chunks borrow its last rows
            make = torch.empty if self.positions is None else torch.zeros
            self.d_h = make(self.flat.shape, dtype=self.flat.dtype, device=self.flat.device)
        # d_weight is not zeroed: the first product written to each of its rows writes, later ones add
        self.d_w = torch.empty_like(self.weight) if needs[1] else None
        self.d_w_written = False
        self.d_b = torch.zeros(V, dtype=cpu.math_dtype(self.flat), device=dev) if needs[2] else None
        if self.vocab_blocks and (needs[1] or needs[2]):
            self._rows = {}
        self.borrow = borrowing(self.flat, self.weight, needs, self.strategy, self.ops, self.chunk_bytes)
        self.borrowed = None  # the first row of d_hidden a chunk's logits took
        # the scratch strategy's first chunk: its most tokens, and where its d_hidden sums lie (`scratch_layout`)
        scratch = self.strategy == "scratch" and needs[1]
        self.first = scratch_layout(self.flat, self.weight, needs[0], self.ops) if scratch else (0, False)

    def add_grads(self, z, sl, state, entropy, grad_logp, grad_entropy) -> None:
        """Turn the chunk's logits `z` into their gradient (in place), then into the weights' gradients (with
        vocabulary blocks: into `d_hidden`, keeping what `finish_grads` needs for the weights')."""
        if self._rows is not None:
            m, log_s = self.ops.row_stats(state)
            self._keep(sl, m=m, log_s=log_s, entropy=entropy, g=grad_logp, h=grad_entropy)
            if self.d_h is None:  # the logits' gradient would only feed d_hidden here
                return
        dz = self.ops.chunk_grad(z, self.ids[sl], state, entropy, grad_logp, grad_entropy, *self.args)
        dz = dz.to(self.weight.dtype)
        cols = self._kept_columns(dz, grad_logp, grad_entropy)
        if cols is not None:
            self._filtered_grads(dz, sl, cols)
            return
        if self.d_h is not None:
            if self.positions is None:
                _product(dz, self.weight, out=self.d_h[sl])
            else:
                self.d_h.index_copy_(0, self.positions[sl], _product(dz, self.weight))
        if self._rows is not None:
            return
        if self.d_w is not None:
            self._add_weight_grad(slice(0, self.weight.shape[0]), dz, self.rows(sl), self.d_w_written)
            self.d_w_written = True
        if self.d_b is not None:
            self.d_b += dz.sum(0, dtype=self.d_b.dtype)

    def _add_weight_grad(self, cols: slice, dz: torch.Tensor, rows: torch.Tensor, accumulate: bool) -> None:
        """`d_weight[cols] (+)= dz.T @ rows` for a chunk's logits gradient `dz` `[c, w]` over the vocabulary columns
        `cols` (starting at a whole multiple of `ROW_ALIGN`), in the products `column_parts` says."""
        for part in column_parts(cols.stop - cols.start, rows.device):
            out = self.d_w[cols][part]
            if self.triton_add:
                from grpo_kernels.ops.weight_grad import add_weight_grad

                add_weight_grad(out, dz[:, part], rows, accumulate=accumulate)
            else:
                _product(dz[:, part].t(), rows, out=out, accumulate=accumulate)

    def tile_chunks(self) -> list[slice]:
        """The tiles strategy's chunks of active tokens: as many as `tile_tokens` needs, of near-equal sizes."""
        return _token_ranges(self.n, tile_tokens(self.flat.shape[1], self.flat.device, self.chunk_bytes), even=True)

    def tile_width(self, n: int) -> int:
        """Vocabulary columns per block of a chunk of `n` tokens: blocks of near-equal widths (whole multiples of
        `BLOCK_COLUMNS` where they hold that many), as few as keep a block of fp32 logits within the chunk budget."""
        return block_width(self.weight.shape[0], self.chunk_bytes // (4 * max(n, 1)), even=True)

    def tile_stats(self) -> torch.Tensor:
        """`[4, n]`: `(logp, entropy, row max, log-sum)` of the active tokens (the tiles strategy's forward), a chunk of
        tokens and a block of vocabulary columns at a time, each block folded into the rows' running statistics."""
        V = self.weight.shape[0]
        out = torch.empty(4, self.n, dtype=cpu.math_dtype(self.flat), device=self.flat.device)
        for sl in self.tile_chunks():
            h = self.rows(sl)
            n, width = h.shape[0], self.tile_width(h.shape[0])
            buffer, ids = self._scratch(n * width), self.ids[sl]
            state = torch.empty(4, n, dtype=out.dtype, device=out.device)  # contiguous: the kernel reads it so
            for start in range(0, V, width):
                cols = slice(start, min(start + width, V))
                z = self.project(h, cols, buffer[: n * (cols.stop - start)].view(n, cols.stop - start))
                self.ops.block_stats(z, ids, start, state, start == 0, cols.stop == V, *self.args)
            out[:, sl] = state
        return out

    def tile_grads(self, sl, m, log_s, entropy, grad_logp, grad_entropy) -> None:
        """The tokens `sl`'s share of the gradients (the tiles strategy), one block of vocabulary columns at a time:
        the block's logits are recomputed and turned into their gradient from the rows' statistics `m`, `log_s`,
        `entropy` `[c]`; `d_hidden`'s rows are summed over the blocks in fp32, and each block adds to its own rows of
        `d_weight` and entries of `d_bias`."""
        h = self.rows(sl)
        n, H = h.shape
        V = self.weight.shape[0]
        width = self.tile_width(n)
        buffer = self._scratch(n * width)
        acc = rows_out = None
        if self.d_h is not None:
            math = cpu.math_dtype(self.flat)
            direct = self.positions is None and self.d_h.dtype == math  # fp32 (fp64) d_hidden sums in place
            acc = self.d_h[sl] if direct else torch.empty(n, H, dtype=math, device=h.device)
            acc.zero_()
            if self._rows_out():
                rows_out = torch.empty(n, H, dtype=self.weight.dtype, device=h.device)
        ids, accumulate = self.ids[sl], self.d_w_written
        for start in range(0, V, width):
            cols = slice(start, min(start + width, V))
            z = self.project(h, cols, buffer[: n * (cols.stop - start)].view(n, cols.stop - start))
            dz = self.ops.block_grad(z, ids, start, m, log_s, entropy, grad_logp, grad_entropy, None, *self.args)
            dz = dz.to(self.weight.dtype)
            if acc is not None:
                self._sum_rows(acc, dz, cols, rows_out)
            if self.d_w is not None:
                _product(dz.t(), h, out=self.d_w[cols], accumulate=accumulate)
                self.d_w_written = True
            if self.d_b is not None:
                self.d_b[cols] += dz.sum(0, dtype=self.d_b.dtype)
        if acc is not None and not direct:
            self._store_rows(sl, acc, rows_out)

    def _rows_out(self) -> bool:
        """Whether fp32 (fp64) `d_hidden` sums need a buffer of 16-bit rows: for 16-bit weights, to hold each block's
        product where the product cannot add into fp32 sums itself (`mixed_sums`), and to store the sums at the
        tokens' positions (`_store_rows`)."""
        if self.weight.dtype == cpu.math_dtype(self.flat):
            return False
        return not self.mixed or self.positions is not None

    def _sum_rows(self, acc: torch.Tensor, dz: torch.Tensor, cols: slice, rows_out: torch.Tensor | None) -> None:
        """`acc += dz @ weight[cols]`: a block's share of `d_hidden`'s rows, summed in fp32 (fp64) in place; for
        16-bit weights inside the product (`mixed_sums`) or through the 16-bit products' buffer `rows_out`."""
        if self.mixed:
            torch.addmm(acc, dz, self.weight[cols], out_dtype=acc.dtype, out=acc)
        elif self.weight.dtype == acc.dtype:
            _product(dz, self.weight[cols], out=acc, accumulate=True)
        else:
            acc += _product(dz, self.weight[cols], out=rows_out)

    def _store_rows(self, sl: slice, acc: torch.Tensor, rows_out: torch.Tensor | None) -> None:
        """The chunk `sl`'s summed `d_hidden` rows `acc` into `d_hidden` (at its tokens' positions; 16-bit rows
        through the products' buffer `rows_out`)."""
        if self.positions is None:
            self.d_h[sl] = acc
        else:
            self.d_h.index_copy_(0, self.positions[sl], acc if rows_out is None else rows_out.copy_(acc))

    def scratch_plan(self, size: int) -> tuple[int | None, Callable[[int], int] | None]:
        """`(first, limit)` as the module's `scratch_plan` gives them, from what `start_grads` derived, for chunks of
        `size` tokens."""
        first = self.first[0]
        return first if first > size else None, None if self.borrow is None else self.borrow.limit

    def scratch_fits(self, sl: slice) -> bool:
        """Whether the scratch strategy keeps the chunk `sl`'s logits in `d_weight`'s memory: it is the strategy, the
        chunk is the first (nothing written to `d_weight` yet) and not larger than `scratch_tokens` allows."""
        if self.strategy != "scratch" or self.d_w is None or self.d_w_written or not self.d_w.is_contiguous():
            return False
        return 0 < sl.stop - sl.start <= self.first[0]

    def _first_sums(self, n: int, memory: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """`(acc, in_rows)`: the scratch strategy's first chunk's fp32 (fp64) `d_hidden` sums `[n, H]`, zeroed, at
        the end of `d_weight`'s `memory` (bytes), or at the start of `d_hidden`'s (`scratch_layout`)."""
        H, math = self.flat.shape[1], cpu.math_dtype(self.flat)
        size = n * H * math.itemsize
        in_rows = self.first[1]
        if in_rows:
            start, memory = 0, self.d_h.view(-1).view(torch.uint8)
        else:
            start = (memory.numel() - size) // SCRATCH_ALIGN * SCRATCH_ALIGN
        return memory[start : start + size].view(math).view(n, H).zero_(), in_rows

    def scratch_grads(self, sl: slice, coefficients) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk `sl`'s `(logp, entropy)` `[c]`, and its gradients formed from logits kept in `d_weight`'s
        memory (the scratch strategy's first chunk; `scratch_fits`): `coefficients(logp, entropy)` gives the tokens'
        `(dL/dlogp, dL/dentropy)` once their log-probs are known.

        `d_weight`'s bytes hold, from the start, the chunk's logits a block of vocabulary columns after another (each
        block `[c, w]` row-major), and at their end the chunk's fp32 `d_hidden` rows, summed over the blocks. The
        blocks' statistics come first, then their gradients (in place) and `d_hidden`, then `d_weight` from the last
        block back to the first: block `b`'s rows of `d_weight` start past block `b`'s logits, and a token's logits
        take fewer bytes than a row of `d_weight`, so they overwrite only logits already turned into `d_weight`
        (or block `b`'s own, which are copied out first where they overlap)."""
        h = self.rows(sl)
        n, H = h.shape
        V, wdt = self.weight.shape[0], self.weight.dtype
        math, ldt = cpu.math_dtype(self.flat), self.logits_dtype
        memory = self.d_w.view(-1).view(torch.uint8)
        lb = ldt.itemsize
        width = scratch_block_width(V, n, self.chunk_bytes, h.device)
        blocks = [slice(start, min(start + width, V)) for start in range(0, V, width)]

        def block(cols: slice) -> torch.Tensor:  # the block's [c, w] logits (their gradient later)
            start = n * cols.start * lb
            return memory[start : start + n * (cols.stop - cols.start) * lb].view(ldt).view(n, cols.stop - cols.start)

        ids = self.ids[sl]
        state = torch.empty(4, n, dtype=math, device=h.device)
        for i, cols in enumerate(blocks):
            z = self.project(h, cols, block(cols))
            self.ops.block_stats(z, ids, cols.start, state, i == 0, i == len(blocks) - 1, *self.args, keep=True)
        logp, entropy, m, log_s = state
        g_lp, g_ent = coefficients(logp, entropy)
        acc = rows_out = None
        in_rows = direct = False
        if self.d_h is not None:  # fp32 (fp64) sums of d_hidden's rows, after the logits or in d_hidden's memory
            acc, in_rows = self._first_sums(n, memory)
            direct = in_rows and self.positions is None and self.d_h.dtype == math  # acc is d_hidden[sl] itself
            if self._rows_out() or (in_rows and not direct):  # 16-bit products, or rows stored, through a buffer
                rows_out = self._scratch_as(n * H, wdt).view(n, H)
        for cols in blocks:
            dz = self.ops.block_grad(block(cols), ids, cols.start, m, log_s, entropy, g_lp, g_ent, None, *self.args)
            dz = dz.to(wdt)
            if acc is not None:
                self._sum_rows(acc, dz, cols, rows_out)
            if self.d_b is not None:
                self.d_b[cols] += dz.sum(0, dtype=self.d_b.dtype)
        if in_rows and not direct:  # the sums leave d_hidden's memory before its rows are written
            rows_out.copy_(acc)
            if self.positions is not None:
                acc.zero_()  # d_hidden's rows of inactive tokens stay 0
            self._store_rows(sl, rows_out, None)
        elif acc is not None and not direct:
            self._store_rows(sl, acc, rows_out)
        acc = rows_out = None  # the buffer is free for the staging below
        for cols in reversed(blocks):
            dz = block(cols)
            rows = (cols.start * H * wdt.itemsize, cols.stop * H * wdt.itemsize)  # d_weight[cols]'s bytes
            if dz.dtype != wdt:
                dz = dz.to(wdt)
            elif n * cols.stop * lb > rows[0]:  # the block's logits reach into its rows of d_weight
                dz = self._scratch_as(dz.numel(), wdt).view(dz.shape).copy_(dz)
            _product(dz.t(), h, out=self.d_w[cols])
        self.d_w_written = True
        return logp, entropy

    def borrows(self, sl: slice) -> bool:
        """Whether the chunk `sl` keeps part of its logits in `d_hidden`'s rows (`_Borrow`): more tokens than the
        chunk buffer holds, under the scratch strategy with `d_hidden` and `d_weight` formed."""
        return self.borrow is not None and sl.stop - sl.start > self.borrow.size

    def borrow_grads(self, sl: slice, coefficients) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk `sl`'s `(logp, entropy)` `[c]`, and its gradients (`borrows`): the logits of its first `width`
        vocabulary columns lie in the last rows of `d_hidden`, those of the tokens after the chunk, the rest in the
        chunk buffer (its rows padded to `ROW_ALIGN`). Each block is folded into the rows' statistics;
        `coefficients(logp, entropy)` gives `(dL/dlogp, dL/dentropy)`; each block is then turned into its gradient in
        place and into its share of `d_hidden` (the first block writes the chunk's rows, the second adds to them:
        16-bit rows are rounded once per block), `d_weight` and `d_bias`. Inactive rows of `d_hidden` taken so are
        zeroed again in `finish_grads`."""
        h = self.rows(sl)
        n, V = h.shape[0], self.weight.shape[0]
        math, ldt = cpu.math_dtype(self.flat), self.logits_dtype
        left = self.n - sl.start
        width = self.borrow.width(n, left)
        if width is None:
            raise RuntimeError(f"a chunk of {n} tokens with {left} to come does not fit its buffers")
        rows = left - n  # d_hidden's last rows, from an aligned byte on
        memory = self.d_h.view(-1).view(torch.uint8)
        start = -(-(memory.numel() - rows * self.d_h.shape[1] * self.d_h.element_size()) // SCRATCH_ALIGN)
        start *= SCRATCH_ALIGN
        first_row = self.d_h.shape[0] - rows
        self.borrowed = first_row if self.borrowed is None else min(self.borrowed, first_row)
        blocks = []
        if width:
            blocks.append((slice(0, width), memory[start : start + n * width * ldt.itemsize].view(ldt).view(n, width)))
        if width < V:
            rest = V - width
            pad = self.borrow.padded(rest)
            blocks.append((slice(width, V), self._scratch(n * pad).view(n, pad)[:, :rest]))
        ids = self.ids[sl]
        state = torch.empty(4, n, dtype=math, device=h.device)
        for i, (cols, z) in enumerate(blocks):
            self.project(h, cols, z)
            self.ops.block_stats(z, ids, cols.start, state, i == 0, i == len(blocks) - 1, *self.args, keep=True)
        logp, entropy, m, log_s = state
        g_lp, g_ent = coefficients(logp, entropy)
        # d_hidden's rows of the chunk: in place, or gathered for the tokens' positions
        d_rows = self.d_h[sl] if self.positions is None else torch.empty(n, h.shape[1], dtype=h.dtype, device=h.device)
        accumulate = self.d_w_written
        for i, (cols, z) in enumerate(blocks):
            dz = self.ops.block_grad(z, ids, cols.start, m, log_s, entropy, g_lp, g_ent, None, *self.args)
            _product(dz, self.weight[cols], out=d_rows, accumulate=i > 0)
            self._add_weight_grad(cols, dz, h, accumulate)
            if self.d_b is not None:
                self.d_b[cols] += dz.sum(0, dtype=self.d_b.dtype)
        if self.positions is not None:
            self._store_rows(sl, d_rows, None)
        self.d_w_written = True
        return logp, entropy

    def _kept_columns(self, dz: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None):
        """Gradient filtering: the vocabulary columns of the chunk's logits gradient `dz` `[c, V]` with an entry above
        its token's threshold (see `HeadOptions.grad_filter_eps`), or None to keep them all (filtering off, a token
        would lose more than `FILTER_MAX_LEFT_OUT` thresholds, or too few columns are left out to be worth gathering
        the rest)."""
        if self.filter_eps is None or dz.shape[0] == 0:
            return None
        temperature, logit_scale, _ = self.args
        r = grad_logp.abs() if grad_entropy is None else grad_logp.abs() + grad_entropy.abs()
        r = (r.float() * (self.filter_eps * abs(logit_scale) / temperature))[:, None]
        n, V = dz.shape
        keep = torch.empty(V, dtype=torch.bool, device=dz.device)
        left_out = torch.zeros(n, 1, dtype=torch.float32, device=dz.device)  # each token's sum of |dz| left out
        # an eighth of the vocabulary (or a few million comparisons) at a time; on the CPU a flat softmax is seen in
        # the first and ends the scan, on a GPU it is checked once at the end (each check waits for the device)
        cpu_device = dz.device.type == "cpu"
        step = max(1, min(-(-V // 8), (4 << 20 if cpu_device else 16 << 20) // max(n, 1)))
        for start in range(0, V, step):
            block = dz[:, start : start + step].abs().float()
            kept = torch.gt((block - r).amax(0), 0.0, out=keep[start : start + step])  # a - b > 0 exactly when a > b
            left_out += block.sum(1, keepdim=True) - block[:, kept].sum(1, keepdim=True)
            if cpu_device and (left_out > FILTER_MAX_LEFT_OUT * r).any():
                return None
        if (left_out > FILTER_MAX_LEFT_OUT * r).any():  # too much would be left out: keep every column
            return None
        cols = keep.nonzero().squeeze(1)
        return cols if 2 * cols.numel() <= V else None

    def _filtered_grads(self, dz: torch.Tensor, sl: slice, cols: torch.Tensor) -> None:
        """`add_grads` for the kept columns `cols` of `dz` only, gathered a bounded number at a time. The columns are
        distinct, so `index_add_` adds to each row of `d_weight` once: the result does not depend on its order."""
        n, H = dz.shape[0], self.flat.shape[1]
        weights = self._rows is None  # with vocabulary blocks the weights' gradients come later, unfiltered
        rows = self.rows(sl) if weights and self.d_w is not None else None
        if rows is not None and not self.d_w_written:  # index_add_ adds to every row
            self.d_w.zero_()
            self.d_w_written = True
        d_h = None
        if self.d_h is not None:
            d_h = self.d_h[sl] if self.positions is None else dz.new_empty(n, H, dtype=self.d_h.dtype)
            d_h.zero_()
        step = max(1, self.chunk_bytes // (8 * H))
        for start in range(0, cols.numel(), step):
            c = cols[start : start + step]
            d = dz.index_select(1, c)
            if d_h is not None:
                d_h += _product(d, self.weight.index_select(0, c))
            if weights and self.d_w is not None:
                self.d_w.index_add_(0, c, _product(d.t(), rows))
            if weights and self.d_b is not None:
                self.d_b.index_add_(0, c, d.sum(0, dtype=self.d_b.dtype))
        if d_h is not None and self.positions is not None:
            self.d_h.index_copy_(0, self.positions[sl], d_h)

    def _keep(self, sl: slice, **values: torch.Tensor | None) -> None:
        """Store the chunk's `[c]` values at their tokens' rows of `[B * T]` vectors (zero for tokens not in the
        loss)."""
        for key, value in values.items():
            if value is None:
                continue
            if key not in self._rows:
                self._rows[key] = torch.zeros(self.flat.shape[0], dtype=cpu.math_dtype(self.flat),
                                              device=self.flat.device)  # fmt: skip
            dst, value = self._rows[key], value.reshape(-1).to(self._rows[key].dtype)
            if self.positions is None:
                dst[sl] = value
            else:
                dst.index_copy_(0, self.positions[sl], value)

    def _vocab_block_grads(self) -> None:
        """`d_weight` and `d_bias` block by block of the vocabulary: each block's logits for every token are
        recomputed (one more matrix product in all), turned into their gradient with the rows' statistics, and
        multiplied once by the hidden rows; nothing is accumulated across chunks."""
        rows, self._rows = self._rows, None
        self._buffer = None  # the token chunks' buffer
        if not rows:  # no token in the loss: the zero gradients stand
            return
        flat, ids, mask = self.flat, self.all_ids, None
        if self.positions is not None:
            if self._all_finite(flat):  # every row is projected; those outside the loss get zero gradients
                mask = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
                mask.index_fill_(0, self.positions, True)
            else:  # a NaN or inf outside the loss would reach d_weight through 0 * NaN: only the loss's rows
                flat, ids = flat.index_select(0, self.positions), self.ids
                rows = {k: None if v is None else v.index_select(0, self.positions) for k, v in rows.items()}
        n, V = flat.shape[0], self.weight.shape[0]
        width = block_width(V, self.chunk_bytes // (4 * max(n, 1)))
        buffer = torch.empty(n * width, dtype=self.logits_dtype, device=flat.device)
        h = rows.get("h")
        for start in range(0, V, width):
            cols = slice(start, min(start + width, V))
            z = self.project(flat, cols, buffer[: n * (cols.stop - start)].view(n, cols.stop - start))
            dz = self.ops.block_grad(z, ids, start, rows["m"], rows["log_s"], rows["entropy"], rows["g"], h, mask,
                                     *self.args)  # fmt: skip
            dz = dz.to(self.weight.dtype)
            if self.d_w is not None:
                _product(dz.t(), flat, out=self.d_w[cols])
                self.d_w_written = True
            if self.d_b is not None:
                self.d_b[cols] = dz.sum(0, dtype=self.d_b.dtype)

    def _all_finite(self, x: torch.Tensor) -> bool:
        """Whether every element of `x` `[n, H]` is finite, checked a chunk of rows at a time (one sync)."""
        step = max(1, self.chunk_bytes // max(x.shape[1], 1))
        ok = torch.ones((), dtype=torch.bool, device=x.device)
        for start in range(0, x.shape[0], step):
            ok &= torch.isfinite(x[start : start + step]).all()
        return bool(ok)

    def finish_grads(self, scale: torch.Tensor | None = None):
        """`(d_hidden [B, T, H], d_weight, d_bias)`, each None where not needed, multiplied in place by `scale`
        (the gradients are handed over, not copied: this can be done once)."""
        B, T, H = self.shape
        if self._rows is not None:
            self._vocab_block_grads()
        d_h, d_w, d_b = self.d_h, self.d_w, self.d_b
        self.d_h = self.d_w = self.d_b = None
        if self.borrowed is not None and self.positions is not None:  # inactive rows a chunk's logits took
            active = torch.zeros(d_h.shape[0], dtype=torch.bool, device=d_h.device).index_fill_(0, self.positions, 1)
            d_h[self.borrowed :].masked_fill_(~active[self.borrowed :, None], 0)
        if d_w is not None and not self.d_w_written:  # no token in the loss: nothing was written
            d_w.zero_()
        if scale is not None:
            grads = [g for g in (d_h, d_w, d_b) if g is not None]
            if self.ops is cpu or not all(g.is_contiguous() for g in grads):
                cpu.scale_(grads, scale)
            else:
                from grpo_kernels.ops.scale import scale_

                scale_(grads, scale)
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


def _logits_dtype(hidden: torch.Tensor, ops) -> torch.dtype:
    """The dtype of a chunk's logits: the inputs', or fp32 / fp64 on the CPU path (whose chunk math works in place)."""
    return cpu.math_dtype(hidden) if ops is cpu else hidden.dtype


def scratch_tokens(hidden: torch.Tensor, weight: torch.Tensor, d_hidden: bool = True, ops=None) -> int:
    """Tokens whose logits (and, with `d_hidden`, fp32 `d_hidden` rows) fit in the memory of a `d_weight` like
    `weight` (and of a `d_hidden` like `hidden`): the scratch strategy's first chunk (`scratch_layout`). About H for a
    large vocabulary in 16 bits (4,096 tokens at N = 8,192, H = 4,096, V = 131,072 in bf16, 3,855 at N = 4,096);
    on the CPU path, whose logits are fp32, half that for 16-bit weights."""
    return scratch_layout(hidden, weight, d_hidden, ops)[0]


def scratch_layout(hidden: torch.Tensor, weight: torch.Tensor, d_hidden: bool = True, ops=None) -> tuple[int, bool]:
    """`(tokens, in_rows)` of the scratch strategy's first chunk (`_scratch_capacity`): its logits in `d_weight`'s
    memory and its fp32 `d_hidden` sums after them, or (`in_rows`) in `d_hidden`'s own memory, where more tokens fit
    so (a `d_hidden` of at least about 2H rows in 16 bits)."""
    V, H = weight.shape
    if not weight.is_contiguous():  # its gradient takes its strides: its memory is not one run of bytes
        return 0, False
    ops = _row_ops(hidden) if ops is None else ops
    ab = cpu.math_dtype(hidden).itemsize if d_hidden else 0
    rows = hidden.numel() // max(H, 1)  # d_hidden's rows: every token's, active or not
    return _scratch_capacity(V, H, weight.element_size(), _logits_dtype(hidden, ops).itemsize, ab, rows,
                             hidden.element_size())  # fmt: skip


def scratch_block_width(vocab: int, tokens: int, budget: int, device: torch.device) -> int:
    """Vocabulary columns of each block of the scratch strategy's first chunk of `tokens` tokens, under the chunk
    budget `budget` (`SCRATCH_BLOCK_BYTES`)."""
    return block_width(vocab, budget // (SCRATCH_BLOCK_BYTES[_kind(device)] * max(tokens, 1)), even=True)


def _scratch_capacity(V: int, H: int, weight_bytes: int, logit_bytes: int, sum_bytes: int, rows: int = 0,
                      row_bytes: int = 0) -> tuple[int, bool]:  # fmt: skip
    """`(tokens, in_rows)`: tokens whose `[V]` logits fit in `V * H` elements of `weight_bytes` with their `[H]` sums
    of `sum_bytes` (none where 0): the sums after the logits, from a multiple of `SCRATCH_ALIGN` bytes, or
    (`in_rows`) in the memory of `rows` rows of `H` elements of `row_bytes` (`d_hidden`'s), where more tokens fit so."""
    size = V * H * weight_bytes
    after = max(0, (size - (SCRATCH_ALIGN if sum_bytes else 0)) // max(V * logit_bytes + H * sum_bytes, 1))
    if not sum_bytes or not SCRATCH_SUMS_IN_ROWS:
        return after, False
    apart = min(size // max(V * logit_bytes, 1), rows * row_bytes // sum_bytes)
    return (apart, True) if apart > after else (after, False)


class _Borrow:
    """The scratch strategy's chunks after its first, where `d_hidden` and `d_weight` are both formed: beyond the chunk
    buffer (`size` tokens' logits, rows `align` elements apart), a chunk's logits may take the last rows of `d_hidden`,
    those of the tokens after it, which nothing has written yet. Its first `width` vocabulary columns then lie there,
    the rest in the buffer. At N = 8,192, H = 4,096, V = 131,072 in bf16 the 4,096 tokens after a 4,096-token first
    chunk take 14 chunks instead of 18 (356 tokens at first, 240 the buffer alone): 4 fewer rereadings of
    `d_weight`."""

    def __init__(self, vocab: int, hidden_size: int, logit_bytes: int, row_bytes: int, size: int, align: int):
        self.V, self.H, self.lb, self.rb = vocab, hidden_size, logit_bytes, row_bytes
        self.size, self.align = size, align
        self.cap = size * self.padded(vocab)  # the buffer's elements

    def width(self, tokens: int, left: int) -> int | None:
        """Columns of a chunk of `tokens` tokens (`left` still to come, itself among them) kept in `d_hidden`'s rows,
        a whole multiple of `BLOCK_COLUMNS` (or all of them): None where the rest does not fit in the buffer."""
        free = (left - tokens) * self.H * self.rb - SCRATCH_ALIGN  # from an aligned byte on
        w = min(self.V, max(0, free) // (tokens * self.lb))
        if w < self.V:
            w -= w % BLOCK_COLUMNS
        return w if tokens * self.padded(self.V - w) <= self.cap else None

    def padded(self, width: int) -> int:
        return -(-width // self.align) * self.align

    def limit(self, left: int) -> int:
        """The most tokens the next chunk may take when `left` tokens are still to come."""
        if left <= self.size:
            return left
        most = (self.cap * self.lb + left * self.H * self.rb - SCRATCH_ALIGN) // (self.V * self.lb + self.H * self.rb)
        c = min(left, most)
        while c > self.size and self.width(c, left) is None:
            c -= 1
        return max(c, self.size)


def borrowing(hidden: torch.Tensor, weight: torch.Tensor, needs, strategy: str, ops=None,
              budget: int | None = None) -> _Borrow | None:  # fmt: skip
    """The scratch strategy's `_Borrow` for a call whose backward forms `needs` (hidden, weight, bias), or None where
    its chunks do not borrow `d_hidden`'s rows (another strategy; `d_hidden` or `d_weight` not formed; logits of
    another dtype than the weight's, as on the CPU path for 16-bit weights; `BORROW_ROWS` off for the device)."""
    ops = _row_ops(hidden) if ops is None else ops
    ldt, kind = _logits_dtype(hidden, ops), _kind(hidden.device)
    if strategy != "scratch" or not (needs[0] and needs[1]) or ldt != weight.dtype or not BORROW_ROWS[kind]:
        return None
    V, H = weight.shape
    size = chunk_tokens(V, hidden.device, _chunk_bytes(kind, strategy) if budget is None else budget)
    return _Borrow(V, H, ldt.itemsize, hidden.element_size(), size, ROW_ALIGN[kind])


def scratch_plan(hidden: torch.Tensor, weight: torch.Tensor, needs, strategy: str, ops=None,
                 budget: int | None = None) -> tuple[int | None, Callable[[int], int] | None]:  # fmt: skip
    """`(first, limit)` of the scratch strategy's chunks for `_token_ranges` and `_row_ranges`: the first chunk's
    tokens where `d_weight`'s memory holds more than a chunk (`scratch_tokens`), and the most tokens of each later
    chunk that borrows `d_hidden`'s rows (`_Borrow.limit`); None for what does not apply (other strategies, `d_weight`
    not formed)."""
    if strategy != "scratch" or not needs[1]:
        return None, None
    kind = _kind(hidden.device)
    size = chunk_tokens(weight.shape[0], hidden.device, _chunk_bytes(kind, strategy) if budget is None else budget)
    first = scratch_tokens(hidden, weight, needs[0], ops)
    borrow = borrowing(hidden, weight, needs, strategy, ops, budget)
    return first if first > size else None, None if borrow is None else borrow.limit


_MIXED_SUMS: dict[tuple[str, torch.dtype, torch.dtype], bool] = {}


def mixed_sums(device: torch.device, dtype: torch.dtype, sums: torch.dtype) -> bool:
    """Whether `torch.addmm(acc, a, b, out_dtype=sums, out=acc)` adds the product of `dtype` matrices `a`, `b` into
    `sums` (`acc`'s dtype, wider) on `device`, summed in `sums` and rounded once: CUDA only, and not every PyTorch
    version (some want `acc` in the factors' dtype). Tried once per device type on a 1 x 1 product; checking the
    arguments raises before any kernel is queued, so a refusal costs no wait."""
    key = (device.type, dtype, sums)
    if key not in _MIXED_SUMS:
        ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and sums == torch.float32
        if ok:
            acc = torch.zeros(1, 1, dtype=sums, device=device)
            one = torch.ones(1, 1, dtype=dtype, device=device)
            try:
                torch.addmm(acc, one, one, out_dtype=sums, out=acc)
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _MIXED_SUMS[key] = ok
    return _MIXED_SUMS[key]


def padded_vocab(vocab: int, device: torch.device) -> int:
    """The distance between rows of a chunk's logits: `vocab` rounded up to a multiple of `ROW_ALIGN`."""
    align = ROW_ALIGN[_kind(device)]
    return -(-vocab // align) * align


def column_parts(vocab: int, device: torch.device) -> tuple[slice, ...]:
    """The vocabulary's columns as the chunk products take them: where rows are padded (`ROW_ALIGN`), an unaligned
    vocabulary's longest prefix of whole multiples of the alignment, then the rest (a product of its own), so that the
    long products' extents are aligned too; else all in one product. `d_hidden`'s product, which sums over the
    vocabulary, stays whole: two would round its 16-bit rows twice."""
    align = ROW_ALIGN[_kind(device)]
    head = vocab - vocab % align
    if head in (0, vocab):
        return (slice(None),)
    return slice(0, head), slice(head, vocab)


def block_width(vocab: int, most: int, even: bool = False) -> int:
    """Columns per block of the vocabulary: at most `most` (at least 1), a whole multiple of `BLOCK_COLUMNS` where
    a block holds that many, so that every block but the last starts its logits rows and weight rows aligned; `even`:
    blocks of near-equal widths, as few as that allows."""
    most = max(1, min(vocab, most))
    if BLOCK_COLUMNS <= most < vocab:
        most -= most % BLOCK_COLUMNS
    if not even or most == vocab:
        return most
    width = -(-vocab // -(-vocab // most))
    return min(most, -(-width // BLOCK_COLUMNS) * BLOCK_COLUMNS) if most >= BLOCK_COLUMNS else width


def _product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False):
    """`a @ b`, into `out` where given, or added to it with `accumulate` (then `out` is read, else only written).

    fp32 (fp64) products on the CPU are summed more carefully than MKL sums a few shapes on its own (measured on a
    2-core AVX-512 machine: the error of a product of 3 rows over a 151,936-column vocabulary was 12 times that of 4
    rows; over 125,000 tokens, 1e-5 of the largest entry): a product of fewer than 16 rows takes the rows past a
    multiple of 4 from a product of 4 rows (those MKL sums in one long sequence), and one whose inner dimension holds
    several blocks of `CPU_SUM_TERMS` terms, with few outputs, sums each block apart and then adds the blocks' sums
    pairwise."""
    (M, K), N = a.shape, b.shape[1]
    few_rows = M % 4 and M < 16
    long_sum = K >= 2 * CPU_SUM_TERMS and (K // CPU_SUM_TERMS) * M * N <= CPU_PARTIAL_SUMS
    if a.device.type != "cpu" or a.dtype not in (torch.float32, torch.float64) or not (few_rows or long_sum):
        if accumulate:
            return out.addmm_(a, b)
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    if few_rows:
        sums = torch.empty(M, N, dtype=a.dtype)
        whole = M - M % 4
        if whole:
            sums[:whole] = _block_sums(a[:whole], b)
        if M > 4:  # the last 4 rows, of which the ones past `whole` are kept
            sums[whole:] = _block_sums(a[-4:], b)[4 - (M - whole) :]
        else:
            sums[:] = _block_sums(torch.cat((a, a.new_zeros(4 - M, K))), b)[:M]
    else:
        sums = _block_sums(a, b)
    if out is None:
        return sums
    return out.add_(sums) if accumulate else out.copy_(sums)


def _block_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` on the CPU, with each block of `CPU_SUM_TERMS` terms of the inner dimension summed apart and the
    blocks' sums added pairwise, where they take at most `CPU_PARTIAL_SUMS` elements."""
    (M, K), N = a.shape, b.shape[1]
    parts = K // CPU_SUM_TERMS
    if parts < 2 or parts * M * N > CPU_PARTIAL_SUMS:
        return torch.mm(a, b)
    k = parts * CPU_SUM_TERMS
    sums = torch.bmm(a[:, :k].unflatten(1, (parts, -1)).transpose(0, 1), b[:k].unflatten(0, (parts, -1))).sum(0)
    return sums.addmm_(a[:, k:], b[k:]) if k < K else sums


def active_positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Flat indices `b * T + t` of the tokens in the loss (None when all are: no rows are gathered then)."""
    if mask is None:
        return None
    positions = mask.reshape(-1).nonzero().squeeze(1)
    return None if positions.numel() == mask.numel() else positions


def _row_ops(t: torch.Tensor):
    if use_triton(t):
        from grpo_kernels.ops import logprobs

        return logprobs
    return cpu


def _token_ranges(n: int, size: int, even: bool = False, first: int | None = None,
                  limit: Callable[[int], int] | None = None) -> list[slice]:  # fmt: skip
    """Consecutive slices of at most `size` of `range(n)` (the first of at most `first` where given; with `limit`,
    each later one of at most `limit(tokens still to come)`); `even`: as few as that allows, of near-equal sizes."""
    if even and n > 0:
        count = -(-n // size)
        return [slice(i * n // count, (i + 1) * n // count) for i in range(count)]
    out = [] if first is None or n == 0 else [slice(0, min(first, n))]
    start = 0 if first is None else min(first, n)
    while start < n:
        stop = min(start + (size if limit is None else max(1, limit(n - start))), n)
        out.append(slice(start, stop))
        start = stop
    return out


def _row_ranges(counts: list[int], size: int, first: int | None = None,
                limit: Callable[[int], int] | None = None) -> list[tuple[slice, slice]] | None:  # fmt: skip
    """Pack whole rows (`counts[b]` active tokens each) into chunks of at most `size` tokens (the first of at most
    `first` where given; with `limit`, each later one of at most `limit(tokens still to come)`):
    `[(row slice, token slice)]`, or None when one row alone is larger than `size`."""
    if counts and max(counts) > size:
        return None
    total = sum(counts)
    out, start_row, start_tok, tok = [], 0, 0, 0
    for b, c in enumerate(counts):
        most = first if not out and first is not None else size if limit is None else limit(total - start_tok)
        if tok - start_tok + c > most and b > start_row:
            out.append((slice(start_row, b), slice(start_tok, tok)))
            start_row, start_tok = b, tok
        tok += c
    out.append((slice(start_row, len(counts)), slice(start_tok, tok)))
    return out


def use_fused_kernels(t: torch.Tensor, strategy: str | None = None) -> bool:
    """True when `GRPO_KERNELS_LINEAR=fused` (or `strategy`, where given) asks for the Triton kernels that keep the
    logits in registers (`ops/linear.py`) and Triton runs the op. They are opt-in: their backward is far slower than
    the chunked schedules' (measured on an H200)."""
    return (linear_strategy() if strategy is None else strategy) == "fused" and use_triton(t)


def linear_forward(hidden, weight, bias, ids, positions, head: HeadOptions, ops, fused: bool,
                   chunk_bytes: int | None = None, strategy: str | None = None):  # fmt: skip
    """`(logp [B, T], entropy [B, T], saved)`: the two-pass schedule's forward over the tokens at `positions`
    (`active_positions` of the mask: finding them waits for the device, so a caller finds them once for both passes);
    `saved` (`[N]` entropies of the active tokens and, for the fused kernels and the tiles strategy, `[2, N]`
    statistics) feeds `linear_backward`."""
    lm = _Head(hidden, weight, bias, ids, positions, head, ops, strategy, chunk_bytes)
    stats = None
    if fused:
        from grpo_kernels.ops.linear import linear_fwd

        logp, entropy, stats = linear_fwd(lm.flat, weight, bias, lm.ids, lm.positions, lm.args)
    elif lm.tiles:  # the rows' statistics are kept for the backward's blocks
        logp, entropy, *_ = out = lm.tile_stats()
        stats = out[2:]
    else:
        logp = torch.empty(lm.n, dtype=cpu.math_dtype(hidden), device=hidden.device)
        entropy = torch.empty_like(logp)
        for sl in _token_ranges(lm.n, chunk_tokens(weight.shape[0], hidden.device, lm.chunk_bytes)):
            logp[sl], entropy[sl], _ = lm.stats(lm.logits(sl), sl)
    return lm.scatter(logp), lm.scatter(entropy), (entropy, stats)


def linear_backward(hidden, weight, bias, ids, positions, head: HeadOptions, ops, fused: bool, saved, grad_logp,
                    grad_entropy, needs: tuple[bool, bool, bool], strategy: str | None = None,
                    chunk_bytes: int | None = None):  # fmt: skip
    """`(d_hidden, d_weight, d_bias)` (None where not needed) from the gradients of `linear_forward`'s outputs; the
    logits are recomputed, tile by tile in the fused kernels or chunk by chunk."""
    entropy, stats = saved
    lm = _Head(hidden, weight, bias, ids, positions, head, ops, strategy, chunk_bytes)
    gather = (lambda x: x.reshape(-1)) if lm.positions is None else (lambda x: x.reshape(-1)[lm.positions])
    g_lp = torch.zeros_like(entropy) if grad_logp is None else gather(grad_logp).to(entropy.dtype)
    g_ent = None if grad_entropy is None else gather(grad_entropy).to(entropy.dtype)
    if fused:
        from grpo_kernels.ops.linear import linear_bwd

        d_h, d_w, d_b = linear_bwd(lm.flat, weight, bias, lm.ids, lm.positions, stats, entropy, g_lp, g_ent, lm.args,
                                   needs, lm.filter_eps)  # fmt: skip
        d_h = None if d_h is None else lm.scatter_rows(d_h).to(hidden.dtype)
        return d_h, d_w, None if d_b is None else d_b.to(bias.dtype)
    lm.start_grads(needs)
    if lm.tiles:
        for sl in lm.tile_chunks():
            lm.tile_grads(sl, stats[0, sl], stats[1, sl], entropy[sl], g_lp[sl], None if g_ent is None else g_ent[sl])
        return lm.finish_grads()
    size = chunk_tokens(weight.shape[0], hidden.device, lm.chunk_bytes)
    first, limit = lm.scratch_plan(size)
    for sl in _token_ranges(lm.n, size, first=first, limit=limit):
        if lm.scratch_fits(sl) or lm.borrows(sl):
            grads = lm.scratch_grads if lm.scratch_fits(sl) else lm.borrow_grads
            grads(sl, lambda lp, ent, sl=sl: (g_lp[sl], None if g_ent is None else g_ent[sl]))
            continue
        z = lm.logits(sl)
        _, _, state = lm.stats(z, sl)  # recomputed: the forward kept only [N]-sized results
        lm.add_grads(z, sl, state, entropy[sl], g_lp[sl], None if g_ent is None else g_ent[sl])
        del z, state  # the chunk buffer goes before the vocabulary blocks' one comes
    return lm.finish_grads()


class LinearLogProbEntropyFunction(torch.autograd.Function):
    """`(hidden [B, T, H], weight [V, H], bias [V] | None, ids [B, T], positions [N] | None, HeadOptions)
    -> (logp, entropy)`, fp32 `[B, T]` (0 outside `positions`, the mask's `active_positions`; None: every token). The
    backward recomputes the logits: tile by tile in the fused Triton kernels, or chunk by chunk, with the
    implementation the forward used, over the same positions."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, positions, head: HeadOptions):
        ctx.strategy, ctx.chunk_bytes = linear_schedule(hidden.device)  # read once: the backward keeps them
        ctx.ops, ctx.head = _row_ops(hidden), head
        ctx.fused = use_fused_kernels(hidden, ctx.strategy)
        logp, entropy, (saved_entropy, stats) = linear_forward(hidden, weight, bias, ids, positions, head, ctx.ops,
                                                               ctx.fused, ctx.chunk_bytes, ctx.strategy)  # fmt: skip
        ctx.save_for_backward(hidden, weight, bias, ids, positions, saved_entropy, stats)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, ids, positions, entropy, stats = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None
        grads = linear_backward(hidden, weight, bias, ids, positions, ctx.head, ctx.ops, ctx.fused, (entropy, stats),
                                grad_logp, grad_entropy, tuple(ctx.needs_input_grad[:3]), ctx.strategy,
                                ctx.chunk_bytes)  # fmt: skip
        return (*grads, None, None, None)


def single_pass_chunks(
    positions: torch.Tensor | None,
    inputs: LossInputs,
    config: GRPOLossConfig,
    vocab: int,
    device: torch.device,
    first: int | None = None,
    limit: Callable[[int], int] | None = None,
    schedule: tuple[str, int] | None = None,
) -> list[tuple[slice, slice]] | None:
    """Chunks for the single-pass schedule as `(row slice, token slice)` over the active tokens, or None when it
    does not apply (the tiles strategy always takes two passes: its statistics pass is the product it does anyway).
    `first`: the first chunk may hold that many tokens where that is more than the others; `limit`: the most tokens
    of each chunk after it, given the tokens still to come (the scratch strategy's `scratch_plan`); `schedule`: the
    call's `(strategy, chunk budget)` (`linear_schedule`, read now where not given)."""
    strategy, budget = linear_schedule(device) if schedule is None else schedule
    if config.top_entropy_quantile < 1.0 or strategy == "tiles":
        return None
    size = chunk_tokens(vocab, device, budget)
    first = first if first is not None and first > size else None
    if not token_local(config):
        return _row_ranges(inputs.mask.sum(-1).tolist(), size, first, limit)
    T = inputs.mask.shape[1]
    n = inputs.mask.numel() if positions is None else positions.numel()
    ranges = _token_ranges(n, size, first=first, limit=limit)
    ends = [i for sl in ranges for i in (sl.start, sl.stop - 1)]
    if positions is not None and ends:  # the chunks' first and last tokens' flat positions, in one read
        ends = positions[torch.as_tensor(ends).to(positions.device, non_blocking=True)].tolist()
    firsts, lasts = ends[::2], ends[1::2]
    return [(slice(a // T, b // T + 1), sl) for sl, a, b in zip(ranges, firsts, lasts, strict=True)]


def single_pass(
    hidden,
    weight,
    bias,
    ids,
    positions,
    inputs: LossInputs,
    config: GRPOLossConfig,
    head: HeadOptions,
    chunks,
    num_items_in_batch,
    needs,
    schedule,
) -> tuple[_Head | None, torch.Tensor, torch.Tensor]:
    """The single-pass schedule's chunks (`single_pass_chunks`): `(head, logps [B, T], entropy [B, T])`, whose `head`
    holds the gradients formed for the inputs `needs` flags (hidden, weight, bias; `_Head.finish_grads` hands them
    over), None where none is, by the strategy and chunk budget `schedule` gives (the ones the chunks were planned
    with)."""
    lm = _Head(hidden, weight, bias, ids, positions, head, strategy=schedule[0], chunk_bytes=schedule[1])
    grads = any(needs)
    logp = torch.empty(lm.n, dtype=cpu.math_dtype(hidden), device=hidden.device)
    entropy = torch.empty_like(logp)
    token_grads = row_grads = None
    if grads:
        lm.start_grads(needs)
        plan = LossPlan.build(inputs.mask, config, None, num_items_in_batch)
        if token_local(config):  # closed form, token by token
            token_grads = TokenGrads.build(inputs, config, plan, positions, logp.dtype)
        else:  # each chunk's whole rows
            row_grads = _RowGrads(inputs, config, plan, positions, logp)
    for rows, sl in chunks:
        if grads and (lm.scratch_fits(sl) or lm.borrows(sl)):  # the scratch strategy's chunks in blocks

            def coefficients(lp, ent, rows=rows, sl=sl):
                logp[sl], entropy[sl] = lp, ent
                return token_grads(logp[sl], sl) if row_grads is None else row_grads(rows, sl)

            (lm.scratch_grads if lm.scratch_fits(sl) else lm.borrow_grads)(sl, coefficients)
            continue
        z = lm.logits(sl)
        logp[sl], entropy[sl], state = lm.stats(z, sl)
        if grads:
            g_lp, g_ent = token_grads(logp[sl], sl) if row_grads is None else row_grads(rows, sl)
            lm.add_grads(z, sl, state, entropy[sl], g_lp, g_ent)
    return lm if grads else None, lm.scatter(logp), lm.scatter(entropy)


class FusedLinearGRPOFunction(torch.autograd.Function):
    """The single-pass schedule: `(hidden, weight, bias, ids, positions, LossInputs, GRPOLossConfig, HeadOptions,
    chunks, num_items_in_batch, needs, schedule) -> (anchor, logps, entropy)`; the gradients are formed in the forward
    for the inputs `needs` flags (hidden, weight, bias), none when autograd is off, by the strategy and chunk budget
    `schedule` gives (the ones the chunks were planned with). `anchor` is a zero whose gradient is the loss's: the
    caller adds it to the loss it forms from the log-probs, once for the batch."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, positions, inputs, config, head, chunks, num_items_in_batch, needs,
                schedule):  # fmt: skip
        lm, logps, entropies = single_pass(hidden, weight, bias, ids, positions, inputs, config, head, chunks,
                                           num_items_in_batch, needs, schedule)  # fmt: skip
        ctx.lm = lm
        ctx.mark_non_differentiable(logps, entropies)
        return torch.zeros((), dtype=logps.dtype, device=hidden.device), logps, entropies

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps, _grad_entropy):
        if ctx.lm is None or (ctx.lm.d_h is None and ctx.lm.d_w is None and ctx.lm.d_b is None):
            raise RuntimeError(
                "fused_linear_grpo_loss forms its gradients in the forward and hands them over in the first backward; "
                "a second backward through the same call is not supported: call the loss again"
            )
        d_hidden, d_weight, d_bias = ctx.lm.finish_grads(grad_loss)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None, None, None, None


class _RowGrads:
    """`dL/dlogp` and `dL/dentropy` of a chunk of whole rows (`objective.row_grads`, for the losses that are not
    `token_local`: sequence-level ratios and masks, VESPO), in the order of the chunk's tokens."""

    def __init__(self, inputs: LossInputs, config: GRPOLossConfig, plan: LossPlan, positions, logp) -> None:
        self.inputs, self.config, self.plan, self.positions = inputs, config, plan, positions
        self.logp = logp  # [N], filled chunk by chunk
        self.lengths = inputs.mask.sum(-1, keepdim=True)

    def __call__(self, rows: slice, sl: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        T, device = self.inputs.mask.shape[1], self.logp.device
        # this chunk's tokens in their rows' [rows, T] layout
        flat = torch.arange(sl.start, sl.stop, device=device) if self.positions is None else self.positions[sl]
        local = flat - rows.start * T
        n_rows = rows.stop - rows.start
        lp = self.logp.new_zeros(n_rows * T).index_copy_(0, local, self.logp[sl]).view(n_rows, T)
        part = self.inputs.rows(rows)
        part.mask = torch.zeros(n_rows * T, dtype=torch.bool, device=device).index_fill_(0, local, True)
        part.mask = part.mask.view(n_rows, T)
        part.lengths = self.lengths[rows]
        grads = row_grads(lp, part, self.config, self.plan)
        g_lp, g_ent = (None if g is None else g.reshape(-1).index_select(0, local) for g in grads)
        return g_lp, g_ent


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
    """`(loss, logps, entropy, metrics)` by the single-pass schedule where it applies, else by two passes (and
    autograd through the objective, where a per-token input such as `ref_logps` requires grad: the single pass forms
    the gradients of the head's inputs only)."""
    mask = inputs.mask if masked else None
    positions = active_positions(mask)
    chunks = None
    # fp16 takes two passes: its gradients are then rounded once, after the loss's incoming gradient (a loss scale
    # against fp16 underflow) has multiplied them; formed in the forward, entries below fp16's range would be lost
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    schedule = linear_schedule(hidden.device)  # read once: the chunks' plan and the chunks themselves agree
    inputs_grad = torch.is_grad_enabled() and inputs.requires_grad()
    if not use_fused_kernels(hidden, schedule[0]) and hidden.dtype != torch.float16 and not inputs_grad:
        first, limit = scratch_plan(hidden, weight, needs, schedule[0], budget=schedule[1])
        chunks = single_pass_chunks(positions, inputs, config, weight.shape[0], hidden.device, first, limit, schedule)
    if chunks is not None:
        anchor, logps, entropy = FusedLinearGRPOFunction.apply(
            hidden, weight, bias, ids, positions, inputs, config, head, chunks, num_items_in_batch, needs, schedule
        )
        loss, metrics = loss_and_metrics(logps, entropy, inputs, config, num_items_in_batch, use_triton(hidden))
        return loss + anchor, logps, entropy, metrics
    logps, entropy = LinearLogProbEntropyFunction.apply(hidden, weight, bias, ids, positions, head)
    loss, metrics = grpo_objective(logps, entropy, inputs, config, num_items_in_batch)
    return loss, logps.detach(), entropy.detach(), metrics
