"""The ops as `torch.library` custom ops, so that `torch.compile` sees each as one opaque node with a fake (meta)
implementation and a registered backward: a compiled model that calls the loss compiles without graph breaks inside
it. The public functions take this path while `torch.compiler.is_compiling()`; in eager mode they call the same
implementations through their autograd Functions (which also keep the single-pass schedule of the fused loss).

Options travel as a JSON string (custom ops take tensors and plain scalars), metrics as one fp32 vector in the order
of `metric_names`.
"""

from __future__ import annotations

import json

import torch

from grpo_kernels import cpu
from grpo_kernels.config import GRPOLossConfig, HeadOptions
from grpo_kernels.objective import LossInputs, grpo_objective

Tensor = torch.Tensor


def metric_names(config: GRPOLossConfig) -> list[str]:
    """The metrics the loss reports for `config`, in a fixed order."""
    names = ["kl"] if config.beta != 0.0 else []
    names.append("entropy")
    if config.uses_clipping:
        names += ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                  "clip_ratio/high_max"]  # fmt: skip
    elif config.loss_type == "cispo":
        names.append("cispo_clip_ratio")
    elif config.loss_type == "vespo":
        names.append("vespo/phi_seq_mean")
    if config.entropy_coef != 0.0:
        names.append("policy_loss")
    return names


def encode(config: GRPOLossConfig) -> str:
    """The config as the custom ops' string argument: formed when the config was made (`GRPOLossConfig.encoded`), so
    that `torch.compile` reads it as a constant string. A frozen dataclass itself is no constant to every PyTorch
    release's compiler (2.11's refuses it), and with dynamic shapes it traces the fields' floats as symbols."""
    return config.encoded


def _decode(options: str) -> GRPOLossConfig:
    return GRPOLossConfig(**json.loads(options))


def _math_dtype(x: Tensor, backend: str) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 and backend == "torch" else torch.float32


def _ops(backend: str):
    if backend == "triton":
        from grpo_kernels.ops import logprobs

        return logprobs
    return cpu


# ---------------------------------------------------------------------------------------------------------- logits


@torch.library.custom_op("grpo_kernels::logprobs_entropy", mutates_args=())
def logprobs_entropy(
    logits: Tensor, ids: Tensor, mask: Tensor | None, temperature: float, logit_scale: float,
    softcap: float | None, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """`(logp [B, T], entropy [B, T], stats [2, B, T])` from logits `[B, T, V]`."""
    logp, entropy, stats = _ops(backend).logprobs_fwd(logits, ids, mask, temperature, logit_scale, softcap)
    dtype = _math_dtype(logits, backend)
    return logp.to(dtype, copy=True), entropy.to(dtype, copy=True), stats.to(dtype, copy=True)


@logprobs_entropy.register_fake
def _(logits, ids, mask, temperature, logit_scale, softcap, backend):
    B, T, _ = logits.shape
    dtype = _math_dtype(logits, backend)
    return (
        logits.new_empty(B, T, dtype=dtype),
        logits.new_empty(B, T, dtype=dtype),
        logits.new_empty(2, B, T, dtype=dtype),
    )


@torch.library.custom_op("grpo_kernels::logprobs_entropy_backward", mutates_args=())
def logprobs_entropy_backward(
    logits: Tensor, ids: Tensor, mask: Tensor | None, stats: Tensor, entropy: Tensor, grad_logp: Tensor,
    grad_entropy: Tensor | None, temperature: float, logit_scale: float, softcap: float | None, backend: str,
) -> Tensor:  # fmt: skip
    return _ops(backend).logprobs_bwd(logits, ids, mask, stats, entropy, grad_logp, grad_entropy, temperature,
                                      logit_scale, softcap)  # fmt: skip


@logprobs_entropy_backward.register_fake
def _(logits, *args):
    return torch.empty_like(logits)


def _logprobs_setup(ctx, inputs, output):
    logits, ids, mask, temperature, logit_scale, softcap, backend = inputs
    ctx.save_for_backward(logits, ids, mask, output[2], output[1])
    ctx.options = (temperature, logit_scale, softcap, backend)


def _logprobs_backward(ctx, grad_logp, grad_entropy, _grad_stats):
    logits, ids, mask, stats, entropy = ctx.saved_tensors
    grad = logprobs_entropy_backward(logits, ids, mask, stats, entropy, grad_logp, grad_entropy, *ctx.options)
    return grad, None, None, None, None, None, None


logprobs_entropy.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


# --------------------------------------------------------------------------------------------------------- linear


@torch.library.custom_op("grpo_kernels::linear_logprobs_entropy", mutates_args=())
def linear_logprobs_entropy(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, mask: Tensor | None, temperature: float,
    logit_scale: float, softcap: float | None, grad_filter_eps: float | None, backend: str, strategy: str,
    chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """`(logp [B, T], entropy [B, T], saved entropies [N], saved statistics [2, N] or [0], positions [N] or [0])`
    from hidden states, by the `GRPO_KERNELS_LINEAR` strategy and chunk budget the caller read (the backward gets the
    same). `positions` are the flat indices of the mask's N tokens (every token's where all are in the loss; empty
    without a mask), found once for both passes: finding them waits for the device."""
    from grpo_kernels.fused_linear import active_positions, linear_forward

    head = HeadOptions(temperature, logit_scale, softcap, grad_filter_eps)
    positions = active_positions(mask)
    logp, entropy, (saved, stats) = linear_forward(hidden, weight, bias, ids, positions, head, _ops(backend),
                                                   _fused(backend, strategy), chunk_bytes, strategy)  # fmt: skip
    stats = hidden.new_empty(0, dtype=saved.dtype) if stats is None else stats
    if mask is None:
        kept = ids.new_empty(0, dtype=torch.int64)
    else:
        kept = torch.arange(mask.numel(), device=mask.device) if positions is None else positions.clone()
    return logp.clone(), entropy.clone(), saved.clone(), stats.clone(), kept


def _fused(backend: str, strategy: str) -> bool:
    return strategy == "fused" and backend == "triton"


@linear_logprobs_entropy.register_fake
def _(hidden, weight, bias, ids, mask, temperature, logit_scale, softcap, grad_filter_eps, backend, strategy,
      chunk_bytes):  # fmt: skip
    B, T, _ = hidden.shape
    fused = _fused(backend, strategy)
    # the chunked schedules keep fp64 for fp64 inputs on either backend (the row kernels' fp32 results, widened)
    dtype = torch.float32 if fused else _math_dtype(hidden, "torch")
    n = torch.library.get_ctx().new_dynamic_size() if mask is not None else B * T
    kept = fused or strategy == "tiles"  # the rows' statistics, for the backward
    stats = hidden.new_empty(2, n, dtype=dtype) if kept else hidden.new_empty(0, dtype=dtype)
    positions = ids.new_empty(0 if mask is None else n, dtype=torch.int64)
    return (hidden.new_empty(B, T, dtype=dtype), hidden.new_empty(B, T, dtype=dtype), hidden.new_empty(n, dtype=dtype),
            stats, positions)  # fmt: skip


@torch.library.custom_op("grpo_kernels::linear_logprobs_entropy_backward", mutates_args=())
def linear_logprobs_entropy_backward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, positions: Tensor, saved: Tensor,
    stats: Tensor, grad_logp: Tensor, grad_entropy: Tensor | None, temperature: float, logit_scale: float,
    softcap: float | None, grad_filter_eps: float | None, backend: str, strategy: str, chunk_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """`(d_hidden, d_weight, d_bias)`; `d_bias` is empty without a bias. `positions`: the forward's."""
    from grpo_kernels.fused_linear import linear_backward

    head = HeadOptions(temperature, logit_scale, softcap, grad_filter_eps)
    needs = (True, True, bias is not None)
    fused = _fused(backend, strategy)
    # none needed where every token is in the loss (saved holds an entropy a token)
    positions = None if saved.shape[0] == hidden.shape[0] * hidden.shape[1] else positions
    d_h, d_w, d_b = linear_backward(hidden, weight, bias, ids, positions, head, _ops(backend), fused,
                                    (saved, stats if stats.numel() else None), grad_logp, grad_entropy, needs,
                                    strategy, chunk_bytes)  # fmt: skip
    return d_h, d_w, weight.new_empty(0) if d_b is None else d_b


@linear_logprobs_entropy_backward.register_fake
def _(hidden, weight, bias, *args):
    return torch.empty_like(hidden), torch.empty_like(weight), weight.new_empty(0) if bias is None else \
        torch.empty_like(bias)  # fmt: skip


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, ids, _mask, *options = inputs
    ctx.save_for_backward(hidden, weight, bias, ids, output[2], output[3], output[4])
    ctx.options = tuple(options)


def _linear_backward(ctx, grad_logp, grad_entropy, _g_saved, _g_stats, _g_positions):
    hidden, weight, bias, ids, saved, stats, positions = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(hidden[..., 0], dtype=saved.dtype)
    d_h, d_w, d_b = linear_logprobs_entropy_backward(hidden, weight, bias, ids, positions, saved, stats, grad_logp,
                                                     grad_entropy, *ctx.options)  # fmt: skip
    return d_h, d_w, d_b if bias is not None else None, *(None,) * (len(ctx.options) + 2)  # ids, mask, options


linear_logprobs_entropy.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------------------ objective


def _loss_inputs(advantages, mask, old_logps, ref_logps, importance_sampling_ratio, sampling_logps) -> LossInputs:
    return LossInputs(advantages, mask, old_logps, ref_logps, importance_sampling_ratio, sampling_logps)


def _objective(logps, entropy, args, options, num_items):
    config = _decode(options)
    loss, metrics = grpo_objective(logps, entropy, _loss_inputs(*args), config, num_items)
    names = metric_names(config)
    vector = torch.stack([metrics[k].to(torch.float32) for k in names]) if names else logps.new_zeros(0)
    return loss, vector


@torch.library.custom_op("grpo_kernels::grpo_objective", mutates_args=())
def objective(
    logps: Tensor, entropy: Tensor, advantages: Tensor, mask: Tensor, old_logps: Tensor | None,
    ref_logps: Tensor | None, importance_sampling_ratio: Tensor | None, sampling_logps: Tensor | None,
    num_items_in_batch: Tensor | None, options: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """`(loss, metrics)` of the GRPO objective on per-token log-probs and entropies `[B, T]`."""
    args = (advantages, mask, old_logps, ref_logps, importance_sampling_ratio, sampling_logps)
    loss, vector = _objective(logps, entropy, args, options, num_items_in_batch)
    return loss.clone(), vector.clone()


@objective.register_fake
def _(logps, entropy, advantages, mask, old_logps, ref_logps, importance_sampling_ratio, sampling_logps,
      num_items_in_batch, options):  # fmt: skip
    return logps.new_empty(()), logps.new_empty(len(metric_names(_decode(options))), dtype=torch.float32)


@torch.library.custom_op("grpo_kernels::grpo_objective_backward", mutates_args=())
def objective_backward(
    logps: Tensor, entropy: Tensor, advantages: Tensor, mask: Tensor, old_logps: Tensor | None,
    ref_logps: Tensor | None, importance_sampling_ratio: Tensor | None, sampling_logps: Tensor | None,
    num_items_in_batch: Tensor | None, options: str, grad_loss: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """`(d loss / d logps, d loss / d entropy)` times `grad_loss` (the objective is cheap: it is recomputed)."""
    args = (advantages, mask, old_logps, ref_logps, importance_sampling_ratio, sampling_logps)
    # torch.func works here, where a custom op's body runs below autograd
    _, pullback = torch.func.vjp(lambda lp, ent: _objective(lp, ent, args, options, num_items_in_batch)[0],
                                 logps, entropy)  # fmt: skip
    d_lp, d_ent = pullback(grad_loss)
    return d_lp.clone(), d_ent.clone()


@objective_backward.register_fake
def _(logps, entropy, *args):
    return torch.empty_like(logps), torch.empty_like(entropy)


def _objective_setup(ctx, inputs, output):
    *tensors, options = inputs
    ctx.save_for_backward(*tensors)
    ctx.options = options


def _objective_backward(ctx, grad_loss, _grad_metrics):
    d_lp, d_ent = objective_backward(*ctx.saved_tensors, ctx.options, grad_loss)
    return d_lp, d_ent, None, None, None, None, None, None, None, None


objective.register_autograd(_objective_backward, setup_context=_objective_setup)
