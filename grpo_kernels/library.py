"""The ops as `torch.library` custom ops, so that `torch.compile` sees each as one opaque node with a fake (meta)
implementation and a registered backward: a compiled model that calls the loss compiles without graph breaks inside
it. The public functions take this path while `torch.compiler.is_compiling()`; in eager mode they call the same
implementations through their autograd Functions. The fused linear loss's single pass (gradients formed in the
forward) is one op here too, `fused_linear_grpo`, whose backward multiplies them in place by a mutating op.

Options travel as a JSON string (custom ops take tensors and plain scalars), metrics as one fp32 vector in the order
of `metric_names`.
"""

from __future__ import annotations

import json

import torch

from grpo_kernels import cpu
from grpo_kernels.config import GRPOLossConfig, HeadOptions
from grpo_kernels.objective import LossInputs, LossPlan, grpo_objective, row_grads

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


# --------------------------------------------------------------------------------------------- linear, single pass


def single_pass_applies(hidden: Tensor, config: GRPOLossConfig, backend: str, strategy: str) -> bool:
    """Whether the compiled fused linear loss takes the single pass (`fused_linear_grpo`), as far as the trace can
    tell: not the fused kernels or the tiles strategy, not fp16, no entropy quantile (see `fused_linear_loss`)."""
    return (
        not _fused(backend, strategy)
        and strategy != "tiles"
        and hidden.dtype != torch.float16
        and config.top_entropy_quantile == 1.0
    )


@torch.library.custom_op("grpo_kernels::fused_linear_grpo", mutates_args=())
def fused_linear_grpo(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, mask: Tensor | None, advantages: Tensor,
    old_logps: Tensor | None, ref_logps: Tensor | None, importance_sampling_ratio: Tensor | None,
    sampling_logps: Tensor | None, num_items_in_batch: Tensor | None, options: str, temperature: float,
    logit_scale: float, softcap: float | None, grad_filter_eps: float | None, backend: str, strategy: str,
    chunk_bytes: int, needs_hidden: bool, needs_weight: bool, needs_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """`(loss, metrics, logps [B, T], entropy [B, T], d_hidden, d_weight, d_bias)`: the fused linear loss by the
    single-pass schedule, the gradients formed here for the inputs the `needs_*` flags name (empty for the others),
    for an incoming gradient of 1; the backward multiplies them in place (`scale_grads_`). Where the single pass
    does not apply to the data (a sequence-level loss with a sequence longer than a chunk), two passes, both here."""
    from grpo_kernels.backend import backend as use_backend
    from grpo_kernels.fused_linear import (
        active_positions,
        linear_backward,
        linear_forward,
        scratch_plan,
        single_pass,
        single_pass_chunks,
    )
    from grpo_kernels.objective import loss_and_metrics

    config = _decode(options)
    head = HeadOptions(temperature, logit_scale, softcap, grad_filter_eps)
    args = (advantages, mask, old_logps, ref_logps, importance_sampling_ratio, sampling_logps)
    inputs = _loss_inputs(*args)
    if mask is None:
        inputs.mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    needs = (needs_hidden, needs_weight, needs_bias and bias is not None)
    schedule = (strategy, chunk_bytes)
    with use_backend(backend):
        positions = active_positions(mask)
        first, limit = scratch_plan(hidden, weight, needs, strategy, budget=chunk_bytes)
        chunks = single_pass_chunks(positions, inputs, config, weight.shape[0], hidden.device, first, limit, schedule)
        grads = (None, None, None)
        if chunks is not None:
            lm, logps, entropy = single_pass(hidden, weight, bias, ids, positions, inputs, config, head, chunks,
                                             num_items_in_batch, needs, schedule)  # fmt: skip
            loss, metrics = loss_and_metrics(logps, entropy, inputs, config, num_items_in_batch, backend == "triton")
            if lm is not None:
                grads = lm.finish_grads()
        else:
            ops, fused = _ops(backend), _fused(backend, strategy)
            logps, entropy, saved = linear_forward(hidden, weight, bias, ids, positions, head, ops, fused,
                                                   chunk_bytes, strategy)  # fmt: skip
            plan = LossPlan.build(inputs.mask, config, None, num_items_in_batch)  # no entropy quantile here
            loss, metrics = grpo_objective(logps, entropy, inputs, config, num_items_in_batch, plan)
            if any(needs):  # the loss's closed-form gradients (no torch.func: the compiled graph's checks forbid it)
                g_lp, g_ent = row_grads(logps, inputs, config, plan)
                grads = linear_backward(hidden, weight, bias, ids, positions, head, ops, fused, saved, g_lp, g_ent,
                                        needs, strategy, chunk_bytes)  # fmt: skip
    names = metric_names(config)
    vector = torch.stack([metrics[k].to(torch.float32) for k in names]) if names else hidden.new_zeros(0)
    empty = [hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)]
    d_h, d_w, d_b = (e if g is None else g for g, e in zip(grads, empty, strict=True))
    return loss.detach().clone(), vector, logps.detach(), entropy.detach(), d_h, d_w, d_b


@fused_linear_grpo.register_fake
def _(hidden, weight, bias, ids, mask, advantages, old_logps, ref_logps, importance_sampling_ratio, sampling_logps,
      num_items_in_batch, options, temperature, logit_scale, softcap, grad_filter_eps, backend, strategy, chunk_bytes,
      needs_hidden, needs_weight, needs_bias):  # fmt: skip
    B, T, _ = hidden.shape
    dtype = _math_dtype(hidden, "torch")  # the chunked schedules keep fp64 for fp64 inputs
    names = metric_names(_decode(options))
    return (
        hidden.new_empty((), dtype=dtype),
        hidden.new_empty(len(names), dtype=torch.float32),
        hidden.new_empty(B, T, dtype=dtype),
        hidden.new_empty(B, T, dtype=dtype),
        hidden.new_empty(hidden.shape) if needs_hidden else hidden.new_empty(0),  # contiguous, whatever the inputs'
        weight.new_empty(weight.shape) if needs_weight else weight.new_empty(0),
        bias.new_empty(bias.shape) if needs_bias and bias is not None else weight.new_empty(0),
    )


@torch.library.custom_op("grpo_kernels::scale_grads_", mutates_args=("d_hidden", "d_weight", "d_bias"))
def scale_grads_(d_hidden: Tensor, d_weight: Tensor, d_bias: Tensor, scale: Tensor, backend: str) -> None:
    """Multiplies the single pass's gradients in place by the loss's incoming gradient `scale` (nothing moves when it
    is 1). The compiler keeps this functional: inductor hands the gradients over in place where the backward owns
    them (PyTorch then refuses `retain_graph=True`) and copies them first where it does not; `aot_eager` copies."""
    grads = [g for g in (d_hidden, d_weight, d_bias) if g.numel()]
    if backend == "triton" and all(g.is_contiguous() for g in grads):
        from grpo_kernels.ops.scale import scale_

        scale_(grads, scale.to(grads[0].device).reshape(()) if grads else scale)
    else:
        cpu.scale_(grads, scale.reshape(()))


@scale_grads_.register_fake
def _(d_hidden, d_weight, d_bias, scale, backend):
    return None


def _single_pass_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[4:])
    ctx.bias = inputs[2] is not None
    ctx.backend = inputs[16]


def _single_pass_backward(ctx, grad_loss, *_):
    d_h, d_w, d_b = ctx.saved_tensors
    scale_grads_(d_h, d_w, d_b, grad_loss, ctx.backend)
    grads = [g if g.numel() else None for g in (d_h, d_w, d_b)]
    return *grads[:2], grads[2] if ctx.bias else None, *(None,) * 19


fused_linear_grpo.register_autograd(_single_pass_backward, setup_context=_single_pass_setup)


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


# the per-token inputs the objective is differentiable in, by their index among its arguments
_DIFFERENTIABLE = (2, 4, 5, 6, 7)  # advantages, old_logps, ref_logps, importance_sampling_ratio, sampling_logps


@torch.library.custom_op("grpo_kernels::grpo_objective_backward", mutates_args=())
def objective_backward(
    logps: Tensor, entropy: Tensor, advantages: Tensor, mask: Tensor, old_logps: Tensor | None,
    ref_logps: Tensor | None, importance_sampling_ratio: Tensor | None, sampling_logps: Tensor | None,
    num_items_in_batch: Tensor | None, options: str, grad_loss: Tensor, inputs_grad: bool,
) -> list[Tensor]:  # fmt: skip
    """`[d loss / d logps, d loss / d entropy]` times `grad_loss` (the objective is cheap: it is recomputed), and
    with `inputs_grad` those of advantages, old_logps, ref_logps, importance_sampling_ratio and sampling_logps
    (empty where one is None)."""
    args = [advantages, mask, old_logps, ref_logps, importance_sampling_ratio, sampling_logps]
    present = [i for i in _DIFFERENTIABLE if inputs_grad and args[i - 2] is not None]

    def loss(lp, ent, *wrt):
        full = list(args)
        for i, t in zip(present, wrt, strict=True):
            full[i - 2] = t
        return _objective(lp, ent, tuple(full), options, num_items_in_batch)[0]

    # torch.func works here, where a custom op's body runs below autograd
    _, pullback = torch.func.vjp(loss, logps, entropy, *(args[i - 2] for i in present))
    d_lp, d_ent, *d_in = pullback(grad_loss)
    grads = dict(zip(present, d_in, strict=True))
    rest = [grads[i].clone() if i in grads else logps.new_empty(0) for i in _DIFFERENTIABLE] if inputs_grad else []
    return [d_lp.clone(), d_ent.clone(), *rest]


@objective_backward.register_fake
def _(logps, entropy, advantages, mask, old_logps, ref_logps, importance_sampling_ratio, sampling_logps,
      num_items_in_batch, options, grad_loss, inputs_grad):  # fmt: skip
    args = [advantages, mask, old_logps, ref_logps, importance_sampling_ratio, sampling_logps]
    rest = [logps.new_empty(0) if args[i - 2] is None else torch.empty_like(args[i - 2]) for i in _DIFFERENTIABLE]
    return [torch.empty_like(logps), torch.empty_like(entropy), *(rest if inputs_grad else [])]


def _objective_setup(ctx, inputs, output):
    *tensors, options = inputs
    ctx.save_for_backward(*tensors)
    ctx.options = options


def _objective_backward(ctx, grad_loss, _grad_metrics):
    inputs_grad = any(ctx.needs_input_grad[i] for i in _DIFFERENTIABLE)
    d_lp, d_ent, *d_in = objective_backward(*ctx.saved_tensors, ctx.options, grad_loss, inputs_grad)
    grads = [d_lp, d_ent, None, None, None, None, None, None, None, None]
    for i, g in zip(_DIFFERENTIABLE, d_in, strict=False):
        grads[i] = g if ctx.needs_input_grad[i] and g.numel() else None
    return tuple(grads)


objective.register_autograd(_objective_backward, setup_context=_objective_setup)
