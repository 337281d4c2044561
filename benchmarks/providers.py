"""What the suite measures: the ops, the shapes (cases and sweeps) and each implementation of an op (a provider).

Four ops:

- `fused_linear`: the GRPO loss from hidden states `[B, T, H]` and the LM-head weight `[V, H]`; gradients flow to
  both. Compute-bound: its floor is the plain matrix products it must do (one forward, two backward).
- `linear_logprobs`: per-token log-probs from hidden states and the LM-head weight without gradients, as a GRPO step
  computes them for the old and reference policies; forward only, one matrix product.
- `loss_from_logits`: the GRPO loss from logits `[B, T, V]`; the gradient flows to the logits. Memory-bound: its
  floor is a device copy's bandwidth, and it must read the logits once forward, and read them and write their
  gradient backward.
- `advantages`: group advantages from rewards `[B]`, groups of `GROUP_SIZE`; forward only, memory-bound.

Every loss is TRL 1.16's default: `loss_type="dapo"`, `beta=0`, on-policy (old log-probs = the current ones),
temperature 1, every token in the loss (a mask of ones is passed all the same).

Two kinds of inputs (`Case.inputs`): "random", logits of unit scale (a near-uniform softmax, entropy about log V - 0.5)
and random token ids; and "peaked", for gradient filtering, which only pays where the softmax is peaked as a trained
model's is: the first V/16 rows of the weight (a frequency-sorted vocabulary's common tokens) are 5 times larger, so
that the softmax's mass sits on them (mean entropy about 2.2 nats, about 80 tokens above 2**-12 per position), and
the completion tokens are sampled from that softmax, as a policy's own samples are.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from grpo_kernels import (
    GRPOLossConfig,
    backend,
    fused_linear,
    fused_linear_grpo_loss,
    group_advantages,
    grpo_loss,
    linear_logprobs,
    reference,
)

OPS = ("fused_linear", "linear_logprobs", "loss_from_logits", "advantages")
LINEAR_OPS = ("fused_linear", "linear_logprobs")  # from hidden states: shapes with H, compute-bound
INPUTS = ("random", "peaked")
PEAKED_HOT_FRACTION = 16  # the first V / 16 vocabulary rows carry the mass...
PEAKED_HOT_SCALE = 5.0  # ...by being this much larger
FILTER_EPS = 2.0**-12  # the gradient filtering threshold of the "ours-filter" provider ("auto" for bf16 inputs)
MODES = ("forward", "backward", "forward+backward")
FORWARD = ("forward",)
OP_MODES = {"fused_linear": MODES, "linear_logprobs": FORWARD, "loss_from_logits": MODES, "advantages": FORWARD}
GROUP_SIZE = 8  # completions per prompt in the advantages op
CONFIG = GRPOLossConfig(loss_type="dapo")
LINEAR_ARGS = ("hidden", "weight", "ids", "advantages", "mask")


@dataclass(frozen=True)
class Case:
    """One shape of one op on one device.

    Args:
        op: one of `OPS`.
        B, T: batch and completion length (`advantages`: B rewards, T = 1).
        H: hidden size (`fused_linear` and `linear_logprobs` only).
        V: vocabulary size (not for `advantages`).
        dtype: "float32" or "bfloat16" (the inputs'; `advantages` is always fp32).
        device: "cpu" or "cuda".
        inputs: "random" or "peaked" (`fused_linear` only; see the module's docstring).
    """

    op: str
    B: int
    T: int
    H: int | None
    V: int | None
    dtype: str
    device: str
    inputs: str = "random"

    @property
    def N(self) -> int:
        """Tokens (rewards for `advantages`)."""
        return self.B * self.T

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def label(self) -> str:
        """E.g. "fused_linear B=8 T=1024 H=4096 V=131072 bfloat16"."""
        dims = " ".join(f"{k}={v}" for k, v in (("B", self.B), ("T", self.T), ("H", self.H), ("V", self.V)) if v)
        return f"{self.op} {dims} {self.dtype}" + ("" if self.inputs == "random" else f" {self.inputs}")

    def flops(self, mode: str) -> float:
        """Floating-point operations of the matrix products the op must do in `mode` (0 for memory-bound ops)."""
        if self.op not in LINEAR_OPS:
            return 0.0
        products = {"forward": 1, "backward": 2, "forward+backward": 3}[mode]
        return 2.0 * products * self.N * self.H * self.V

    def bytes_moved(self, mode: str) -> float:
        """The fewest bytes of device memory the op must move in `mode` (0 for compute-bound ops)."""
        if self.op == "loss_from_logits":
            passes = {"forward": 1, "backward": 2, "forward+backward": 3}[mode]
            return float(passes * self.N * self.V * self.torch_dtype.itemsize)
        if self.op == "advantages":
            return 8.0 * self.N  # read fp32 rewards, write fp32 advantages
        return 0.0

    def copy_bytes(self) -> int:
        """Bytes a device copy of the op's largest input moves (read and write): the memory-bound ops' floor."""
        if self.op == "loss_from_logits":
            return 2 * self.N * self.V * self.torch_dtype.itemsize
        return 2 * 4 * self.N if self.op == "advantages" else 0

    def grad_bytes(self) -> int:
        """Bytes of the gradients the op hands back (`d_hidden` and `d_weight`, or `d_logits`)."""
        size = self.torch_dtype.itemsize
        if self.op == "fused_linear":
            return (self.N + self.V) * self.H * size
        if self.op == "linear_logprobs":
            return 0
        if self.op == "loss_from_logits":
            return self.N * self.V * size
        return 0


def _bt(n: int, t: int = 1024) -> tuple[int, int]:
    """`(B, T)` with `B * T = n` and completions of `t` tokens (one shorter completion when `n < t`)."""
    return max(1, n // t), min(n, t)


def _grid(op: str, ns: Sequence[int], h: int | None, v: int | None, dtype: str, device: str) -> list[Case]:
    return [Case(op, *_bt(n), h, v, dtype, device) for n in ns]


def _rewards(bs: Sequence[int], device: str) -> list[Case]:
    return [Case("advantages", b, 1, None, None, "float32", device) for b in bs]


def sweep(name: str, device: str) -> list[Case]:
    """The cases of a named sweep: "quick" (up to 11 minutes on a 2-core CPU) or "full" (per device type)."""
    if name == "quick":
        return [
            *_grid("fused_linear", (256, 1024), 512, 32_768, "float32", device),
            *_grid("linear_logprobs", (1024, 4096), 512, 32_768, "float32", device),
            *_grid("loss_from_logits", (1024, 4096), None, 32_768, "float32", device),
            *_rewards((1024, 65_536), device),
        ]
    if name != "full":
        raise ValueError(f"unknown sweep {name!r}: use 'quick' or 'full'")
    if device == "cpu":
        return [
            *_grid("fused_linear", (1024, 4096, 8192), 512, 32_768, "float32", "cpu"),
            *_grid("fused_linear", (1024, 4096, 8192), 512, 65_536, "float32", "cpu"),
            *_grid("linear_logprobs", (1024, 4096, 8192), 512, 65_536, "float32", "cpu"),
            *_grid("loss_from_logits", (1024, 4096), None, 32_768, "float32", "cpu"),
            *_grid("loss_from_logits", (1024, 4096), None, 131_072, "float32", "cpu"),
            *_rewards((1024, 65_536, 1_048_576), "cpu"),
        ]
    # GPU, in the order a time-boxed run should get them: the issue-3 target (Llama-3: V = 128k, H = 4,096, N =
    # 8,192), the fast memory-bound ops, then the long runs: the target's N = 32,768, Qwen2.5 (152k, 896) and
    # Llama-2/Mistral (32k, 4,096); fp32 last
    return [
        *_grid("fused_linear", (1024, 8192), 4096, 131_072, "bfloat16", device),
        *_grid("linear_logprobs", (1024, 8192, 32_768), 4096, 131_072, "bfloat16", device),
        *_grid("loss_from_logits", (1024, 4096, 16_384), None, 131_072, "bfloat16", device),
        *_rewards((1024, 65_536, 1_048_576), device),
        *_grid("loss_from_logits", (1024, 4096, 16_384), None, 151_936, "bfloat16", device),
        *_grid("loss_from_logits", (1024, 4096, 16_384), None, 32_768, "bfloat16", device),
        *_grid("fused_linear", (32_768,), 4096, 131_072, "bfloat16", device),
        *_grid("fused_linear", (4096, 16_384, 65_536), 896, 151_936, "bfloat16", device),
        *_grid("linear_logprobs", (4096, 16_384, 65_536), 896, 151_936, "bfloat16", device),
        *_grid("fused_linear", (4096, 16_384, 65_536), 4096, 32_768, "bfloat16", device),
        *_grid("fused_linear", (1024, 4096), 896, 151_936, "float32", device),
    ]


def make_inputs(case: Case) -> dict[str, torch.Tensor]:
    """Fresh random inputs: hidden states and a weight that give logits of unit scale (or peaked ones), random token
    ids (or ids sampled from the peaked softmax), advantages of both signs, a mask of ones."""
    if case.inputs not in INPUTS:
        raise ValueError(f"unknown inputs {case.inputs!r}: use one of {', '.join(INPUTS)}")
    if case.inputs != "random" and case.op != "fused_linear":
        raise ValueError(f"{case.inputs} inputs are for the fused_linear op only; got {case.op}")
    torch.manual_seed(0)
    dev, dt, B, T = case.device, case.torch_dtype, case.B, case.T
    if case.op == "advantages":
        return {"rewards": torch.rand(B, device=dev)}
    inputs = {
        "ids": torch.randint(case.V, (B, T), device=dev),
        "advantages": torch.randn(B, device=dev),
        "mask": torch.ones(B, T, device=dev),
    }
    if case.op in LINEAR_OPS:
        hidden = torch.randn(B, T, case.H, device=dev, dtype=dt)
        weight = torch.randn(case.V, case.H, device=dev) * case.H**-0.5
        if case.inputs == "peaked":
            weight[: case.V // PEAKED_HOT_FRACTION] *= PEAKED_HOT_SCALE
            inputs["ids"] = _sampled_ids(hidden, weight.to(dt))
        grad = case.op == "fused_linear"  # log-probs of the old and reference policies need none
        inputs["hidden"] = hidden.requires_grad_(grad)
        inputs["weight"] = weight.to(dt).requires_grad_(grad)
    else:
        inputs["logits"] = torch.randn(B, T, case.V, device=dev, dtype=dt).requires_grad_()
    return inputs


def _sampled_ids(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`[B, T]` tokens drawn from `softmax(hidden @ weight.T)`, a few hundred MiB of logits at a time."""
    B, T, H = hidden.shape
    flat = hidden.reshape(-1, H)
    ids = torch.empty(flat.shape[0], dtype=torch.long, device=hidden.device)
    step = max(1, (256 << 20) // (4 * weight.shape[0]))
    for start in range(0, flat.shape[0], step):
        probs = torch.softmax((flat[start : start + step] @ weight.T).float(), dim=-1)
        ids[start : start + step] = torch.multinomial(probs, 1).squeeze(1)
    return ids.view(B, T)


@dataclass
class Bound:
    """A provider bound to one case's inputs.

    Args:
        forward: runs the op's forward; returns what `backward` takes (a loss for autograd providers).
        backward: runs the backward on `forward`'s result; None where the op has none.
        grads: tensors whose `.grad` is reset before each run.
    """

    forward: Callable[[], Any]
    backward: Callable[[Any], Any] | None = lambda loss: loss.backward()
    grads: tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True)
class Provider:
    """One implementation of an op.

    Args:
        name: stable id in results.json (the same for every op it implements).
        op: the op it implements.
        label: its column title in results.md.
        bind: `(case, inputs) -> Bound`; imports what it needs when called.
        module: the Python package it needs (None: this project's and PyTorch's code only).
        devices: device types it runs on.
        role: "ours", "baseline" (the other providers' results are compared with it in `speedup_vs`) or "floor"
            (the bare work of the op: its matrix products, or a device copy of its largest input).
        memory: `case -> bytes` it needs beyond the inputs, where that can exceed the device (None: bounded).
        has_backward: False for a provider with no backward of an op that has one (a device copy): forward rows
            only.
    """

    name: str
    op: str
    label: str
    bind: Callable[[Case, dict[str, torch.Tensor]], Bound]
    module: str | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    role: str = "baseline"
    memory: Callable[[Case], int] | None = field(default=None, repr=False)
    has_backward: bool = True

    def unavailable(self, device: str) -> str | None:
        """Why the provider cannot run on `device`, or None when it can."""
        if device not in self.devices:
            return f"runs on {' or '.join(self.devices)} only"
        if self.module is not None and importlib.util.find_spec(self.module) is None:
            return f"{self.module} is not installed"
        return None


# --- fused_linear --------------------------------------------------------------------------------------------------


def _ours_linear(
    name: str,
    strategy: str = "chunked",
    grad_filter_eps: float | None = None,
    add_weight_grad: str = "cublas",
    borrow_rows: bool = True,
    mixed_sums: bool = True,
    sums_in_rows: bool = True,
    compiled: bool = False,
) -> Callable[[Case, dict], Bound]:
    def bind(case: Case, x: dict) -> Bound:
        if strategy == "fused" and not hasattr(fused_linear, "use_fused_kernels"):
            raise RuntimeError("this grpo_kernels has no fused linear kernels (GRPO_KERNELS_LINEAR=fused)")
        extra = {} if grad_filter_eps is None else {"grad_filter_eps": grad_filter_eps}

        # module settings the call's forward reads as it starts, set around it (where this grpo_kernels has them)
        settings = {"ADD_WEIGHT_GRAD": add_weight_grad, "MIXED_SUMS": mixed_sums, "SCRATCH_SUMS_IN_ROWS": sums_in_rows}

        def loss() -> torch.Tensor:
            return fused_linear_grpo_loss(*(x[k] for k in LINEAR_ARGS), config=CONFIG, **extra).loss

        if compiled:  # traced at the first (warm-up) call, inside the settings below
            loss = torch.compile(loss, fullgraph=True)

        def forward() -> torch.Tensor:
            before = {k: getattr(fused_linear, k) for k in settings if hasattr(fused_linear, k)}
            for k in before:
                setattr(fused_linear, k, settings[k])
            rows = getattr(fused_linear, "BORROW_ROWS", None)
            rows_before = None if rows is None else dict(rows)
            if rows is not None and not borrow_rows:
                rows.update(cuda=False)
            try:
                with backend(name), fused_linear.schedule(strategy):
                    return loss()
            finally:
                for k, v in before.items():
                    setattr(fused_linear, k, v)
                if rows is not None:
                    rows.update(rows_before)

        return Bound(forward, grads=(x["hidden"], x["weight"]))

    return bind


def _eager_linear(case: Case, x: dict) -> Bound:
    def forward() -> torch.Tensor:
        return reference.linear_grpo_loss(*(x[k] for k in LINEAR_ARGS), config=CONFIG).loss

    return Bound(forward, grads=(x["hidden"], x["weight"]))


def _trl_linear(case: Case, x: dict) -> Bound:
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # the vocabulary tile GRPOTrainer uses

    from grpo_kernels.integrations.trl_reference import TRLLoss

    loss_fn = TRLLoss(CONFIG, use_vllm=False)
    B, T, H = x["hidden"].shape

    def forward() -> torch.Tensor:
        # (hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs), as GRPOTrainer does
        logps, entropy, *_ = ChunkedLogProbFunction.apply(
            x["hidden"].reshape(-1, H), x["weight"], None, x["ids"].reshape(-1), CONFIG.temperature,
            _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy"),
        )  # fmt: skip
        return loss_fn(logps.view(B, T), entropy.view(B, T), x["ids"], x["advantages"], x["mask"])[0]

    return Bound(forward, grads=(x["hidden"], x["weight"]))


def _liger_linear(case: Case, x: dict) -> Bound:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(
        beta=CONFIG.beta, compiled=False, use_ref_model=False, loss_type=CONFIG.loss_type, epsilon_low=CONFIG.epsilon,
        epsilon_high=CONFIG.epsilon_high_value, temperature=CONFIG.temperature,
    )  # fmt: skip

    def forward() -> torch.Tensor:
        return loss_fn(x["hidden"], x["weight"], x["ids"], x["mask"], x["advantages"])[0]

    return Bound(forward, grads=(x["hidden"], x["weight"]))


def _cce_linear(case: Case, x: dict) -> Bound:
    from cut_cross_entropy import linear_cross_entropy

    _, T, H = x["hidden"].shape
    adv = x["advantages"].repeat_interleave(T)

    def forward() -> torch.Tensor:
        # -log p per token; on-policy the GRPO gradient is -A * d log p, so the loss around it is `A . ce / N`
        ce = linear_cross_entropy(x["hidden"].reshape(-1, H), x["weight"], x["ids"].reshape(-1), reduction="none")
        return (ce * adv).sum() / ce.numel()

    return Bound(forward, grads=(x["hidden"], x["weight"]))


def _matmul_floor(case: Case, x: dict) -> Bound:
    """The three products into outputs allocated once, as an op that reuses its buffers would (on a CPU a fresh
    `[N, V]` tensor per run would add the cost of touching new pages)."""
    h, w = x["hidden"].detach().reshape(-1, case.H), x["weight"].detach()
    z, d_h, d_w = h.new_empty(h.shape[0], w.shape[0]), torch.empty_like(h), torch.empty_like(w)

    def backward(logits: torch.Tensor) -> None:
        # the gradient products, with the logits standing in for their gradient (same shape and dtype)
        torch.mm(logits, w, out=d_h)
        torch.mm(logits.t(), h, out=d_w)

    return Bound(lambda: torch.mm(h, w.t(), out=z), backward)


def _logits_memory(case: Case) -> int:
    return case.N * case.V * case.torch_dtype.itemsize


def _eager_linear_memory(case: Case) -> int:
    # logits in the input dtype, their fp32 copy, log-softmax, softmax and the fp32 gradient, about at once
    return case.N * case.V * (case.torch_dtype.itemsize + 4 * 4)


# --- linear_logprobs -----------------------------------------------------------------------------------------------


def _ours_logprobs(name: str, strategy: str = "chunked") -> Callable[[Case, dict], Bound]:
    def bind(case: Case, x: dict) -> Bound:
        def forward() -> torch.Tensor:
            with torch.no_grad(), backend(name), fused_linear.schedule(strategy):
                return linear_logprobs(x["hidden"], x["weight"], x["ids"])

        return Bound(forward, backward=None)

    return bind


def _eager_logprobs(case: Case, x: dict) -> Bound:
    def forward() -> torch.Tensor:  # the logits, an fp32 log-softmax, a gather: as a plain training loop does
        with torch.no_grad():
            logits = x["hidden"] @ x["weight"].T
            return torch.log_softmax(logits.float(), dim=-1).gather(-1, x["ids"].unsqueeze(-1)).squeeze(-1)

    return Bound(forward, backward=None)


def _trl_logprobs(case: Case, x: dict) -> Bound:
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    B, T, H = x["hidden"].shape

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return ChunkedLogProbFunction.apply(
                x["hidden"].reshape(-1, H), x["weight"], None, x["ids"].reshape(-1), 1.0,
                _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",),
            )[0].view(B, T)  # fmt: skip

    return Bound(forward, backward=None)


def _cce_logprobs(case: Case, x: dict) -> Bound:
    from cut_cross_entropy import linear_cross_entropy

    B, T, H = x["hidden"].shape

    def forward() -> torch.Tensor:
        with torch.no_grad():
            ce = linear_cross_entropy(x["hidden"].reshape(-1, H), x["weight"], x["ids"].reshape(-1), reduction="none")
            return -ce.view(B, T)

    return Bound(forward, backward=None)


def _matmul_floor_forward(case: Case, x: dict) -> Bound:
    h, w = x["hidden"].reshape(-1, case.H), x["weight"]
    z = h.new_empty(h.shape[0], w.shape[0])
    return Bound(lambda: torch.mm(h, w.t(), out=z), backward=None)


def _eager_logprobs_memory(case: Case) -> int:
    # logits in the input dtype, their fp32 copy and its log-softmax
    return case.N * case.V * (case.torch_dtype.itemsize + 2 * 4)


# --- loss_from_logits ----------------------------------------------------------------------------------------------


def _ours_logits(name: str) -> Callable[[Case, dict], Bound]:
    def bind(case: Case, x: dict) -> Bound:
        def forward() -> torch.Tensor:
            with backend(name):
                return grpo_loss(x["logits"], x["ids"], x["advantages"], x["mask"], config=CONFIG).loss

        return Bound(forward, grads=(x["logits"],))

    return bind


def _eager_logits(case: Case, x: dict) -> Bound:
    def forward() -> torch.Tensor:
        return reference.grpo_loss(x["logits"], x["ids"], x["advantages"], x["mask"], config=CONFIG).loss

    return Bound(forward, grads=(x["logits"],))


def _trl_logits(case: Case, x: dict) -> Bound:
    from trl.trainer.utils import selective_log_softmax_and_entropy

    from grpo_kernels.integrations.trl_reference import TRLLoss

    loss_fn = TRLLoss(CONFIG, use_vllm=False)

    def forward() -> torch.Tensor:
        logps, entropy = selective_log_softmax_and_entropy(x["logits"], x["ids"], entropy_requires_grad=False)
        return loss_fn(logps, entropy, x["ids"], x["advantages"], x["mask"])[0]

    return Bound(forward, grads=(x["logits"],))


def _liger_logits(case: Case, x: dict) -> Bound:
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    # Liger takes the model's logits [B, T + 1, V] and drops the last position itself; by default its backward
    # writes the gradient over them (inplace=True), which changes no timing
    logits = torch.cat([x["logits"].detach(), x["logits"].detach()[:, -1:]], dim=1).requires_grad_()

    def forward() -> torch.Tensor:
        return triton_grpo_loss(
            logits, None, None, x["ids"], x["advantages"], x["mask"], temperature=CONFIG.temperature,
            beta=CONFIG.beta, eps_low=CONFIG.epsilon, eps_high=CONFIG.epsilon_high_value, loss_type=CONFIG.loss_type,
            reduce=True,
        )[0]  # fmt: skip

    return Bound(forward, grads=(logits,))


def _copy_floor(key: str) -> Callable[[Case, dict], Bound]:
    def bind(case: Case, x: dict) -> Bound:
        src = x[key].detach()
        dst = torch.empty_like(src)
        return Bound(lambda: dst.copy_(src), backward=None)

    return bind


def _eager_logits_memory(case: Case) -> int:
    # fp32 copy of the logits, log-softmax, softmax and the gradient, about at once
    return case.N * case.V * (4 * 4 + case.torch_dtype.itemsize)


# --- advantages ----------------------------------------------------------------------------------------------------


def _ours_advantages(name: str) -> Callable[[Case, dict], Bound]:
    def bind(case: Case, x: dict) -> Bound:
        def forward() -> torch.Tensor:
            with backend(name):
                return group_advantages(x["rewards"], GROUP_SIZE)

        return Bound(forward, backward=None)

    return bind


def _eager_advantages(case: Case, x: dict) -> Bound:
    return Bound(lambda: reference.group_advantages(x["rewards"], GROUP_SIZE), backward=None)


def _ours(op: str, bind: Callable[[str], Callable[[Case, dict], Bound]]) -> tuple[Provider, Provider]:
    """This project's Triton path (CUDA) and CPU path (forced with `backend("torch")`) of `op`."""
    return (
        Provider("ours-triton", op, "grpo_kernels (Triton)", bind("triton"), devices=("cuda",), role="ours"),
        Provider("ours-torch", op, "grpo_kernels (CPU path)", bind("torch"), devices=("cpu",), role="ours"),
    )


# the opt-in `GRPO_KERNELS_LINEAR=fused` kernels (logits tiles in registers), next to the default chunked schedule
_OURS_FUSED = Provider(
    "ours-fused", "fused_linear", "grpo_kernels (fused Triton)", _ours_linear("triton", "fused"), devices=("cuda",),
    role="ours",
)  # fmt: skip

# `GRPO_KERNELS_LINEAR=vocab-blocks`: d_weight per vocabulary block (one more product, small chunks), any device
_OURS_VOCAB = Provider(
    "ours-vocab", "fused_linear", "grpo_kernels (vocab blocks)", _ours_linear("auto", "vocab-blocks"), role="ours"
)

# `GRPO_KERNELS_LINEAR=tiles`: per chunk of tokens, gradients a block of vocabulary columns at a time (one more
# product, large ones, little memory), any device
_OURS_TILES = Provider("ours-tiles", "fused_linear", "grpo_kernels (tiles)", _ours_linear("auto", "tiles"), role="ours")

# `GRPO_KERNELS_LINEAR=scratch`: the single pass with small chunks, the first chunk's logits kept in d_weight's memory,
# part of the later chunks' in d_hidden's unwritten rows on CUDA; the same without those rows
# (`fused_linear.BORROW_ROWS`), with the first chunk's fp32 d_hidden sums after its logits in d_weight's memory
# (`fused_linear.SCRATCH_SUMS_IN_ROWS` off: fewer tokens in it), with those sums added apart from its 16-bit products
# (`fused_linear.MIXED_SUMS` off), and with the chunks' d_weight additions by ops/weight_grad.py
# (`fused_linear.ADD_WEIGHT_GRAD = "triton"`)
_OURS_SCRATCH = Provider(
    "ours-scratch", "fused_linear", "grpo_kernels (scratch)", _ours_linear("auto", "scratch"), role="ours"
)
_OURS_SCRATCH_OWN = Provider(
    "ours-scratch-own", "fused_linear", "grpo_kernels (scratch, no borrowed rows)",
    _ours_linear("triton", "scratch", borrow_rows=False), devices=("cuda",), role="ours",
)  # fmt: skip
_OURS_SCRATCH_AFTER = Provider(
    "ours-scratch-after", "fused_linear", "grpo_kernels (scratch, first sums after the logits)",
    _ours_linear("triton", "scratch", sums_in_rows=False), devices=("cuda",), role="ours",
)  # fmt: skip
_OURS_SCRATCH_ADDS = Provider(
    "ours-scratch-adds", "fused_linear", "grpo_kernels (scratch, separate fp32 additions)",
    _ours_linear("triton", "scratch", mixed_sums=False), devices=("cuda",), role="ours",
)  # fmt: skip
_OURS_SCRATCH_TADD = Provider(
    "ours-scratch-tadd", "fused_linear", "grpo_kernels (scratch, Triton additions)",
    _ours_linear("triton", "scratch", add_weight_grad="triton"), devices=("cuda",), role="ours",
)  # fmt: skip

# the default schedule inside `torch.compile` (inductor): the custom ops' single pass, gradients handed over in place
_OURS_COMPILED = Provider(
    "ours-compiled", "fused_linear", "grpo_kernels (torch.compile)", _ours_linear("triton", compiled=True),
    devices=("cuda",), role="ours",
)  # fmt: skip

_OURS_FUSED_LOGPROBS = dataclasses.replace(
    _OURS_FUSED, op="linear_logprobs", bind=_ours_logprobs("triton", "fused")
)  # fmt: skip

# gradient filtering (approximate) on the default chunked schedule: only pays on peaked inputs
_OURS_FILTER = Provider(
    "ours-filter", "fused_linear", "grpo_kernels (filter 2^-12)", _ours_linear("auto", "chunked", FILTER_EPS),
    role="ours",
)  # fmt: skip

PROVIDERS: tuple[Provider, ...] = (
    *_ours("fused_linear", _ours_linear),
    _OURS_FUSED,
    _OURS_VOCAB,
    _OURS_TILES,
    _OURS_SCRATCH,
    _OURS_SCRATCH_OWN,
    _OURS_SCRATCH_AFTER,
    _OURS_SCRATCH_ADDS,
    _OURS_SCRATCH_TADD,
    _OURS_FILTER,
    _OURS_COMPILED,
    Provider("eager", "fused_linear", "eager PyTorch", _eager_linear, memory=_eager_linear_memory),
    Provider("trl", "fused_linear", "TRL 1.16 chunked", _trl_linear, module="trl"),
    Provider("liger", "fused_linear", "Liger fused linear", _liger_linear, module="liger_kernel"),
    Provider("cce", "fused_linear", "Cut Cross-Entropy", _cce_linear, "cut_cross_entropy", ("cuda",)),
    Provider("floor", "fused_linear", "matmul floor", _matmul_floor, role="floor", memory=_logits_memory),
    *_ours("linear_logprobs", _ours_logprobs),
    _OURS_FUSED_LOGPROBS,
    Provider("eager", "linear_logprobs", "eager PyTorch", _eager_logprobs, memory=_eager_logprobs_memory),
    Provider("trl", "linear_logprobs", "TRL 1.16 chunked", _trl_logprobs, module="trl"),
    Provider("cce", "linear_logprobs", "Cut Cross-Entropy", _cce_logprobs, "cut_cross_entropy", ("cuda",)),
    Provider("floor", "linear_logprobs", "matmul floor", _matmul_floor_forward, role="floor", memory=_logits_memory),
    *_ours("loss_from_logits", _ours_logits),
    Provider("eager", "loss_from_logits", "eager PyTorch", _eager_logits, memory=_eager_logits_memory),
    Provider("trl", "loss_from_logits", "TRL 1.16", _trl_logits, module="trl"),
    Provider("liger", "loss_from_logits", "Liger triton_grpo_loss", _liger_logits, "liger_kernel", ("cuda",)),
    Provider("floor", "loss_from_logits", "copy floor", _copy_floor("logits"), role="floor", has_backward=False),
    *_ours("advantages", _ours_advantages),
    Provider("eager", "advantages", "eager PyTorch", _eager_advantages),
    Provider("floor", "advantages", "copy floor", _copy_floor("rewards"), role="floor"),
)
