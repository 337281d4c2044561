"""`fused_linear_grpo_loss` and `linear_logprobs`: both backends and both schedules against the reference that
materialises the logits (same dtype and fp64), against TRL 1.16 on a tiny Llama, and by bytes allocated."""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import (
    LARGE_VOCABULARY_CASES,
    assert_close,
    assert_none_rounded_to_zero,
    assert_within_pytorch_error,
    filtering_bound,
    large_vocabulary_case,
    loss_condition,
    metric_conditions,
)
from torch.utils._python_dispatch import TorchDispatchMode

from grpo_kernels import (
    GRPOLossConfig,
    LinearGRPOLoss,
    backend,
    fused_linear_grpo_loss,
    grpo_loss,
    head_options_from_config,
    linear_logprobs,
    reference,
)
from grpo_kernels import fused_linear as fl
from grpo_kernels.config import LOSS_TYPES
from grpo_kernels.functional import loss_inputs
from grpo_kernels.validation import ValueChecks

# backend-strategy: Triton with the logits kept in registers, Triton row kernels on chunks of logits (d_weight
# accumulated across chunks, or formed per vocabulary block), and the PyTorch path (both schedules)
IMPLS = ["triton-fused", "triton-chunked", "triton-vocab-blocks", "triton-tiles", "triton-scratch", "torch",
         "torch-vocab-blocks", "torch-tiles", "torch-scratch"]  # fmt: skip
FILTERING = [i for i in IMPLS if not i.endswith(("tiles", "scratch"))]  # tiles and scratch refuse gradient filtering
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.bf16)]


def make_inputs(B, T, H, V, dtype, dev, bias=True):
    """Drawn on the CPU and moved to `dev`: the same inputs on every device, so a GPU failure reproduces on a CPU."""
    hidden = torch.randn(B, T, H).to(dtype)
    weight = (torch.randn(V, H) / H**0.5 * 2).to(dtype)
    b = (torch.randn(V) * 0.1).to(dtype) if bias else None
    ids = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.25
    mask[0] = False  # a fully masked row
    adv = torch.randn(B)
    logps = reference.linear_grpo_loss(
        hidden.double(), weight.double(), ids, adv.double(), mask, bias=None if b is None else b.double()
    ).logps.float()
    # Old-policy log-ratios well inside (|d| < 0.1) or well outside (0.32 < |d| < 0.45) the clip range (log 0.8 to
    # log 1.28 at most), so that a log-prob rounded in half precision (bf16 logits are 1/32 apart near 8) cannot move a
    # token across a clip boundary, where the gradient jumps. Zero on padding, as TRL's own log-prob pass leaves them
    # (TRL's metrics read padding when T == 1).
    inside = torch.rand(B, T) < 0.5
    d = torch.where(inside, torch.rand(B, T) * 0.2 - 0.1, torch.rand(B, T) * 0.13 + 0.32)
    d = torch.where(inside | (torch.rand(B, T) < 0.5), d, -d)
    extra = {
        "old_logps": (logps - d) * mask,
        "ref_logps": (logps + torch.randn(B, T) * 0.3) * mask,
    }
    b = None if b is None else b.to(dev)
    return (*(x.to(dev) for x in (hidden, weight)), b, *(x.to(dev) for x in (ids, adv, mask)),
            {k: v.to(dev) for k, v in extra.items()})  # fmt: skip


def run(fn, hidden, weight, bias, ids, adv, mask, upcast_to=None, **kwargs):
    # copies with the same strides (a slice of a larger tensor stays one; `clone` would make it contiguous)
    leaves = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x.detach())
              for x in (hidden, weight) + ((bias,) if bias is not None else ())]  # fmt: skip
    leaves = [(x if upcast_to is None else x.to(upcast_to)).requires_grad_() for x in leaves]
    out = fn(leaves[0], leaves[1], ids, adv, mask, bias=leaves[2] if bias is not None else None, **kwargs)
    grads = torch.autograd.grad(out.loss, leaves)
    return out, grads


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    name = request.param
    name_backend, _, strategy = name.partition("-")
    monkeypatch.setenv("GRPO_KERNELS_LINEAR", strategy or "chunked")
    with backend(name_backend):
        yield name


def check_against_reference(impl, hidden, weight, bias, ids, adv, mask, **kwargs):
    out, grads = run(fused_linear_grpo_loss, hidden, weight, bias, ids, adv, mask, **kwargs)
    same, g_same = run(reference.linear_grpo_loss, hidden, weight, bias, ids, adv, mask, upcast=False, **kwargs)
    exact, g_exact = run(reference.linear_grpo_loss, hidden, weight, bias, ids, adv, mask, upcast_to=torch.float64,
                         **kwargs)  # fmt: skip
    dt = hidden.dtype
    inputs = {k: v for k, v in kwargs.items() if k not in ("logit_scale", "final_logit_softcapping")}
    cond = loss_condition(exact.logps, exact.entropy, adv, mask, **inputs)
    assert_within_pytorch_error(out.loss, same.loss, exact.loss, name="loss", input_dtype=dt, input_scale=cond)
    assert_within_pytorch_error(out.logps, same.logps, exact.logps, name="logps", input_dtype=dt)
    assert_within_pytorch_error(out.entropy, same.entropy, exact.entropy, name="entropy", input_dtype=dt)
    for name, g, gs, ge in zip(("d_hidden", "d_weight", "d_bias"), grads, g_same, g_exact, strict=False):
        assert g.dtype == gs.dtype, f"{name} is {g.dtype}, expected {gs.dtype}"
        assert_within_pytorch_error(g, gs, ge, name=name, input_dtype=dt)
    assert set(out.metrics) == set(exact.metrics)
    conditions = None  # each metric's, as the loss's (`metric_conditions`; 0.3 s, so formed only where needed)
    for k in out.metrics:
        try:
            assert_within_pytorch_error(out.metrics[k], same.metrics[k], exact.metrics[k], name=k, input_dtype=dt)
        except AssertionError:  # the bound only widens with the condition: the same check, taken lazily
            conditions = conditions or metric_conditions(exact.logps, exact.entropy, adv, mask, **inputs)
            assert_within_pytorch_error(out.metrics[k], same.metrics[k], exact.metrics[k], name=k, input_dtype=dt,
                                        input_scale=conditions.get(k, 0.0))  # fmt: skip
    return out


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_loss_type_matches_reference(impl, loss_type, dtype, device):
    dev = "cpu" if impl.startswith("torch") else device
    config = GRPOLossConfig(loss_type=loss_type, beta=0.05, entropy_coef=0.01, temperature=0.9, max_completion_length=7)
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(4, 7, 24, 131, dtype, dev)
    check_against_reference(impl, hidden, weight, bias, ids, adv, mask, config=config, **extra)


@pytest.mark.parametrize(
    "shape,options,head",
    [
        ((2, 1, 17, 123), {"loss_type": "grpo"}, {}),  # T = 1, odd H and V
        ((3, 5, 33, 1000), {"loss_type": "bnpo", "importance_sampling_level": "sequence"}, {"logit_scale": 0.25}),
        ((3, 4, 16, 257), {"loss_type": "dapo"}, {"final_logit_softcapping": 3.0}),
        ((4, 6, 8, 64), {"loss_type": "vespo", "beta": 0.1}, {"final_logit_softcapping": 5.0, "logit_scale": 2.0}),
        ((4, 6, 8, 64), {"loss_type": "cispo", "off_policy_mask_threshold": 0.01, "epsilon_high": 1.2}, {}),
        ((2, 3, 12, 151_936), {"loss_type": "dapo", "beta": 0.1}, {}),  # Qwen's vocabulary
        ((2, 2, 8, 262_144), {"loss_type": "grpo", "entropy_coef": 0.1}, {}),  # the largest vocabulary supported
    ],
    ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else None,
)
def test_odd_shapes_and_heads(impl, shape, options, head, device):
    dev = "cpu" if impl.startswith("torch") else device
    config = GRPOLossConfig(max_completion_length=8, **options)
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(*shape, torch.float32, dev)
    check_against_reference(impl, hidden, weight, bias, ids, adv, mask, config=config, **head, **extra)


SCHEDULES = {
    # options, chunk budget in tokens -> the schedule it must take
    "token chunks across rows": ({"loss_type": "grpo", "beta": 0.1, "entropy_coef": 0.1}, 5, "single"),
    "whole-row chunks": ({"loss_type": "luspo", "importance_sampling_level": "sequence"}, 9, "single"),
    "off-policy mask, whole rows": ({"loss_type": "sapo", "off_policy_mask_threshold": 0.02}, 7, "single"),
    "row longer than a chunk": ({"loss_type": "vespo"}, 3, "two-pass"),
    "entropy quantile": ({"loss_type": "dapo", "top_entropy_quantile": 0.37, "entropy_coef": 0.2}, 5, "two-pass"),
}


@pytest.mark.parametrize("case", list(SCHEDULES))
def test_chunked_schedules(impl, case, device, monkeypatch):
    options, tokens, schedule = SCHEDULES[case]
    dev = "cpu" if impl.startswith("torch") else device
    H, V = 12, 61
    kind = "cuda" if dev == "cuda" else "cpu"
    # `tokens` a chunk: fp32 logits for the chunked strategies, fp32 d_hidden rows (a quarter) for tiles
    monkeypatch.setitem(fl.CHUNK_BYTES, kind, tokens * (16 * H if impl.endswith("tiles") else 4 * V))
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, kind, 1)
    config = GRPOLossConfig(**options)
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(5, 6, H, V, torch.float32, dev)
    mask[2, 3:] = False
    if config.top_entropy_quantile < 1:  # keep every token clear of the quantile, where the mask jumps
        hidden = _away_from_entropy_threshold(hidden, weight, bias, ids, mask, config.top_entropy_quantile)
    inputs = loss_inputs(
        ValueChecks(), 5, 6, torch.device(dev), config, adv, mask, None, extra["ref_logps"], None, None
    )
    chunks = fl.single_pass_chunks(fl.active_positions(mask), inputs, config, V, torch.device(dev))
    assert (chunks is not None) == (schedule == "single" and not impl.endswith("tiles")), case  # tiles: two passes
    if chunks is not None:
        assert len(chunks) > 1
    assert fl.use_fused_kernels(hidden) == (impl == "triton-fused")
    extra["sampling_logps"] = extra["old_logps"] + 0.05
    check_against_reference(impl, hidden, weight, bias, ids, adv, mask, config=config, **extra)


def _away_from_entropy_threshold(hidden, weight, bias, ids, mask, q, margin=1e-3):
    for _ in range(100):
        _, entropy = reference.logprobs_and_entropy(reference.linear_logits(hidden.double(), weight.double(),
                                                                             bias.double()), ids)  # fmt: skip
        active = entropy[mask]
        threshold = torch.quantile(active, 1 - q)
        if (active - threshold).abs().min() > margin:
            return hidden
        hidden = torch.randn_like(hidden)
    raise AssertionError("could not draw inputs away from the entropy threshold")


def test_linear_logprobs(impl, device):
    dev = "cpu" if impl.startswith("torch") else device
    hidden, weight, bias, ids, _, mask, _ = make_inputs(3, 5, 20, 99, torch.float32, dev)
    x = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    logps, entropy = linear_logprobs(x[0], x[1], ids, bias=x[2], temperature=0.7, return_entropy=True, mask=mask)
    grads = torch.autograd.grad((logps * 1.5).sum() - entropy.sum(), x)
    y = [t.detach().clone().double().requires_grad_() for t in (hidden, weight, bias)]
    logits = reference.linear_logits(y[0], y[1], y[2])
    ref_logps, ref_entropy = reference.logprobs_and_entropy(logits, ids, 0.7)
    ref_logps, ref_entropy = ref_logps * mask, ref_entropy * mask
    ref_grads = torch.autograd.grad((ref_logps * 1.5).sum() - ref_entropy.sum(), y)
    assert_close(logps, ref_logps, atol=1e-5, rtol=1e-5, name="logps")
    assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5, name="entropy")
    for name, g, r in zip(("d_hidden", "d_weight", "d_bias"), grads, ref_grads, strict=True):
        assert_close(g, r, atol=1e-5, rtol=1e-4, name=name)


@backend("torch")  # the single-pass schedule, which hands its gradients over once
def test_module_no_grad_and_scaled_backward():
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(3, 4, 10, 50, torch.float32, "cpu")
    loss_fn = LinearGRPOLoss(GRPOLossConfig(loss_type="grpo", beta=0.1))
    with torch.no_grad():
        evaluated = loss_fn(hidden, weight, ids, adv, mask, bias=bias, ref_logps=extra["ref_logps"]).loss
    h = hidden.clone().requires_grad_()
    out = loss_fn(h, weight, ids, adv, mask, bias=bias, ref_logps=extra["ref_logps"])
    assert torch.equal(out.loss.detach(), evaluated)
    (g1,) = torch.autograd.grad(out.loss, h, retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same call is not supported"):
        torch.autograd.grad(out.loss, h)
    again = loss_fn(h, weight, ids, adv, mask, bias=bias, ref_logps=extra["ref_logps"])
    (g3,) = torch.autograd.grad(again.loss * 3, h)
    assert_close(g3, 3 * g1, atol=1e-7, rtol=1e-6, name="scaled d_hidden")


@pytest.mark.parametrize("scale", [1.0, 0.37, -2.5, 0.0])
def test_backward_scales_the_gradients_by_the_incoming_one(impl, scale, device):
    """`(loss * s).backward()` hands over `s` times the gradients of `loss.backward()`. The single-pass schedule forms
    them in the forward and multiplies them by `s` in the backward (`ops/scale.py`, skipped when `s` is 1): bit for bit
    the product of the unscaled gradients and `s`, rounded once. The two-pass schedules carry `s` through the
    objective's backward, where it meets other factors first: within a few units in the last place of the largest
    entry."""
    dev = "cpu" if impl.startswith("torch") else device
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(3, 5, 12, 40, torch.float32, dev)
    config = GRPOLossConfig(loss_type="grpo", beta=0.1)
    grads = []
    for s in (1.0, scale):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        out = fused_linear_grpo_loss(*leaves[:2], ids, adv, mask, bias=leaves[2], config=config, **extra)
        grad = torch.full((), s, dtype=out.loss.dtype, device=dev)
        grads.append(torch.autograd.grad(out.loss, leaves, grad))
    single_pass = impl in ("triton-chunked", "torch")
    for name, g1, gs in zip(("d_hidden", "d_weight", "d_bias"), *grads, strict=True):
        expected = reference.scaled(g1, torch.tensor(scale, device=dev))
        if single_pass:
            assert torch.equal(gs, expected), f"{name}: {(gs - expected).abs().max().item()} off"
        else:  # rounded elsewhere: a few units in the last place of the gradient's largest entry
            atol = 8 * torch.finfo(torch.float32).eps * expected.abs().max().item()
            assert_close(gs, expected, atol=atol, rtol=0, name=name)


def test_fp16_gradients_are_rounded_after_the_loss_scale(impl, device):
    """fp16 training scales the loss (`GradScaler`, 2**16) so that small gradients survive the rounding to fp16: the
    gradients are rounded once, after that scale, and none of `d_hidden`'s or `d_weight`'s entries of at least fp16's
    smallest subnormal becomes zero (formed in the forward and scaled after, most of `d_weight` did)."""
    dev = "cpu" if impl.startswith("torch") else device
    hidden, weight, _, ids, adv, mask, extra = make_inputs(4, 16, 32, 500, torch.float16, dev, bias=False)
    config = GRPOLossConfig(loss_type="dapo", beta=0.1)
    scale = 2.0**16
    leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
    out = fused_linear_grpo_loss(*leaves, ids, adv, mask, config=config, num_items_in_batch=8192, **extra)
    got = torch.autograd.grad(out.loss * scale, leaves)
    wide = [x.double().requires_grad_() for x in (hidden, weight)]
    exact = reference.linear_grpo_loss(*wide, ids, adv.double(), mask, config=config, num_items_in_batch=8192,
                                       **{k: v.double() for k, v in extra.items()})  # fmt: skip
    expected = torch.autograd.grad(exact.loss * scale, wide)
    for name, g, e in zip(("d_hidden", "d_weight"), got, expected, strict=True):
        assert_none_rounded_to_zero(g, e, name=name)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.bf16)])  # fmt: skip
@pytest.mark.parametrize("scale", [1.0, 0.37, -3.0, 0.0])
def test_scale_op_rounds_each_product_once(impl, dtype, scale, device):
    """`scale_` (Triton, and the PyTorch path's) multiplies in place by a 0-dim tensor, in the wider of the two dtypes
    (fp32 math for 16-bit tensors), and rounds once. Sizes around the kernel's blocks, and an empty tensor."""
    from grpo_kernels import cpu
    from grpo_kernels.ops.scale import scale_

    dev = "cpu" if impl == "torch" else device
    s_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=s_dtype, device=dev)
    tensors = [(torch.randn(n) * 3).to(dtype).to(dev) for n in (1, 1000, 4097, 70000, 0)]
    expected = [reference.scaled(x, s) for x in tensors]
    (cpu.scale_ if impl == "torch" else scale_)(tensors, s)
    for x, e in zip(tensors, expected, strict=True):
        assert torch.equal(x, e), f"{x.numel()} elements: {(x.double() - e.double()).abs().max().item()} off"


def test_scale_op_bad_input():
    from grpo_kernels.ops.scale import scale_

    with pytest.raises(ValueError, match="scale must be a 0-dim floating-point tensor"):
        scale_([torch.ones(3)], torch.ones(1))
    first = torch.ones(3)
    with pytest.raises(ValueError, match=r"tensors\[1\] must be a contiguous floating-point tensor"):
        scale_([first, torch.ones(4, 3).t()], torch.tensor(2.0))
    assert torch.equal(first, torch.ones(3))  # checked before any is scaled


def test_module_schedule(monkeypatch):
    """`LinearGRPOLoss(strategy=..., chunk_mib=...)` runs its calls under that schedule (the backward included) and
    leaves the environment as it was; a bad value fails at construction."""
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(3, 4, 10, 50, torch.float32, "cpu")
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, "cpu", 1)
    monkeypatch.delenv("GRPO_KERNELS_LINEAR", raising=False)
    blocks = []
    real = fl.cpu.block_grad
    monkeypatch.setattr(fl.cpu, "block_grad", lambda z, *a: blocks.append(z.shape) or real(z, *a))
    config = GRPOLossConfig(loss_type="grpo", beta=0.1)
    results = []
    with backend("torch"):
        for options in ({}, {"strategy": "tiles", "chunk_mib": 2 * 4 * 50 / 2**20}):  # 2-token statistics chunks
            h = hidden.clone().requires_grad_()
            out = LinearGRPOLoss(config, **options)(h, weight, ids, adv, mask, bias=bias, ref_logps=extra["ref_logps"])
            results.append((out.loss, *torch.autograd.grad(out.loss, h)))
            assert bool(blocks) == bool(options)
    assert "GRPO_KERNELS_LINEAR" not in os.environ
    for a, b, name in zip(*results, ("loss", "d_hidden"), strict=True):
        assert_close(a, b, atol=1e-6, rtol=1e-5, name=name)
    with pytest.raises(ValueError, match="strategy must be one of"):
        LinearGRPOLoss(strategy="blocks")
    for options, error, match in [({"logit_scale": -1.0}, ValueError, "logit_scale must be > 0"),
                                  ({"final_logit_softcapping": 0.0}, ValueError, "final_logit_softcapping must be > 0"),
                                  ({"grad_filter_eps": 2.0}, ValueError, "grad_filter_eps must be in \\[0, 1\\)"),
                                  ({"grad_filter_eps": "x"}, ValueError, 'grad_filter_eps must be None, a float'),
                                  ({"config": "dapo"}, TypeError, "config must be a GRPOLossConfig")]:  # fmt: skip
        with pytest.raises(error, match=match):
            LinearGRPOLoss(**options)
    text = repr(LinearGRPOLoss(config, logit_scale=0.5, grad_filter_eps="auto", strategy="tiles"))
    assert text.endswith("logit_scale=0.5, grad_filter_eps='auto', strategy='tiles')") and repr(config) in text
    assert repr(LinearGRPOLoss(config)) == f"LinearGRPOLoss({config!r})"


def test_matches_trl_on_a_tiny_llama():
    """TRL takes the model's logits; we take its last hidden state and `lm_head.weight`. Same loss, same gradients for
    every parameter of the model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import entropy_from_logits
    from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax

    from grpo_kernels.integrations.trl_reference import TRLLoss

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(cfg).double()
    B, P, T = 4, 5, 7
    input_ids = torch.randint(0, 97, (B, P + T))
    completion_ids = input_ids[:, P:]
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    adv = torch.randn(B, dtype=torch.float64)
    config = GRPOLossConfig(loss_type="grpo", beta=0.05, temperature=0.8, entropy_coef=0.01)
    with torch.no_grad():
        ref = trl_selective_log_softmax(model(input_ids).logits[:, P - 1 : -1] / 0.8, completion_ids) + 0.1

    logits = model(input_ids).logits[:, P - 1 : -1] / config.temperature
    trl_loss, _ = TRLLoss(config, use_vllm=False)(
        trl_selective_log_softmax(logits, completion_ids), entropy_from_logits(logits), completion_ids, adv, mask,
        ref_logps=ref,
    )  # fmt: skip
    trl_grads = torch.autograd.grad(trl_loss, list(model.parameters()))

    hidden = model.model(input_ids).last_hidden_state[:, P - 1 : -1]
    with backend("torch"):
        out = fused_linear_grpo_loss(hidden, model.lm_head.weight, completion_ids, adv, mask, config=config,
                                     ref_logps=ref)  # fmt: skip
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    assert_close(out.loss, trl_loss, atol=1e-12, rtol=1e-10, name="loss")
    for (name, _), g, t in zip(model.named_parameters(), grads, trl_grads, strict=True):
        assert_close(g, t, atol=1e-12, rtol=1e-9, name=name)


def test_extra_memory_is_a_fraction_of_the_logits(monkeypatch):
    """Forward + backward at N = 2,048 tokens, V = 8,192: the fp32 logits alone would be 64 MiB; the fused loss's
    peak allocation, gradients included, stays under an eighth of that."""
    from grpo_kernels.memory import MemoryMeter

    B, T, H, V = 8, 256, 64, 8192
    monkeypatch.setitem(fl.CHUNK_BYTES, "cpu", 1 << 20)
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, "cpu", 1)
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = (torch.randn(V, H) / 8).requires_grad_()
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    config = GRPOLossConfig(loss_type="dapo", entropy_coef=0.01)
    with backend("torch"), MemoryMeter() as meter:
        fused_linear_grpo_loss(hidden, weight, ids, adv, config=config).loss.backward()
    logits_bytes = B * T * V * 4
    assert meter.peak_bytes < logits_bytes / 8, f"peak {meter.peak_bytes / 2**20:.2f} MiB"
    with backend("torch"), MemoryMeter() as naive:
        reference.linear_grpo_loss(hidden, weight, ids, adv, config=config).loss.backward()
    assert naive.peak_bytes > logits_bytes  # the meter sees the materialised logits


@pytest.mark.parametrize("strategy", ["chunked", "vocab-blocks", "tiles", "scratch"])
@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.5])  # the single-pass and the two-pass schedule
def test_extra_memory_beyond_the_gradients_is_a_few_chunks(strategy, top_entropy_quantile, monkeypatch):
    """At N = 2,048, V = 8,192 with 1 MiB chunks (32 tokens; 128-column vocabulary blocks; for tiles, 1,024-token
    chunks of 64-column blocks), forward + backward allocate at most three chunks' worth beyond the gradients they
    hand back."""
    from grpo_kernels.memory import MemoryMeter

    B, T, H, V = 8, 256, 64, 8192
    budget = 1 << 20
    monkeypatch.setitem(fl.CHUNK_BYTES, "cpu", budget)
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, "cpu", 1)
    monkeypatch.setenv("GRPO_KERNELS_LINEAR", strategy)
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = (torch.randn(V, H) / 8).requires_grad_()
    ids = torch.randint(0, V, (B, T))
    config = GRPOLossConfig(loss_type="dapo", entropy_coef=0.01, top_entropy_quantile=top_entropy_quantile)
    with backend("torch"), MemoryMeter() as meter:
        fused_linear_grpo_loss(hidden, weight, ids, torch.randn(B), config=config).loss.backward()
    grads = (hidden.numel() + weight.numel()) * 4
    assert meter.peak_bytes - grads < 3 * budget, f"{(meter.peak_bytes - grads) / 2**20:.2f} MiB beyond the grads"


@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.5])  # the single-pass and the two-pass schedule
def test_the_backward_keeps_the_strategy_and_budget_of_its_forward(top_entropy_quantile, monkeypatch):
    """A forward run under GRPO_KERNELS_LINEAR=vocab-blocks (64 KiB chunks here, 8 MiB for the default strategy)
    whose backward runs after the variable is gone (a benchmark's or a trainer's context ends before the backward)
    still forms d_weight in 64 KiB vocabulary blocks: the backward allocates nothing near a default chunk."""
    from grpo_kernels.memory import MemoryMeter

    B, T, H, V = 4, 128, 32, 4096  # the fp32 logits of every token: 8 MiB
    monkeypatch.setitem(fl.CHUNK_BYTES, "cpu", 8 << 20)
    monkeypatch.setitem(fl.VOCAB_BLOCKS_CHUNK_BYTES, "cpu", 64 << 10)
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, "cpu", 1)
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = (torch.randn(V, H) / 6).requires_grad_()
    ids = torch.randint(0, V, (B, T))
    config = GRPOLossConfig(loss_type="dapo", entropy_coef=0.01, top_entropy_quantile=top_entropy_quantile)
    blocks = []
    real = fl.cpu.block_grad
    monkeypatch.setattr(fl.cpu, "block_grad", lambda z, *a: blocks.append(z.shape) or real(z, *a))
    with backend("torch"):
        monkeypatch.setenv("GRPO_KERNELS_LINEAR", "vocab-blocks")
        loss = fused_linear_grpo_loss(hidden, weight, ids, torch.randn(B), config=config).loss
        monkeypatch.delenv("GRPO_KERNELS_LINEAR")
        with MemoryMeter() as meter:
            loss.backward()
    assert blocks and all(rows * cols * 4 <= 64 << 10 for rows, cols in blocks), blocks
    grads = 0 if top_entropy_quantile == 1.0 else (hidden.numel() + weight.numel()) * 4  # single pass: in the forward
    assert meter.peak_bytes - grads < 3 * (64 << 10), f"{(meter.peak_bytes - grads) / 2**10:.0f} KiB beyond the grads"


@pytest.mark.parametrize("strategy", ["chunked", "vocab-blocks", "tiles", "scratch", "scratch-borrow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("masked", "top_entropy_quantile"), [(False, 1.0), (True, 0.5)])
def test_workspace_bytes_bounds_what_a_call_allocates(strategy, dtype, masked, top_entropy_quantile, monkeypatch):
    """`workspace_bytes` (the trainer's memory estimate uses it) is at least what forward + backward allocate beyond
    the gradients on the CPU path, and not far above it: 1 MiB chunks at N = 2,048, V = 8,192 (scratch-borrow: the
    scratch strategy with `BORROW_ROWS` on)."""
    from grpo_kernels.memory import MemoryMeter

    B, T, H, V = 8, 256, 64, 8192
    monkeypatch.setitem(fl.CHUNK_BYTES, "cpu", 1 << 20)
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, "cpu", 1)
    monkeypatch.setitem(fl.BORROW_ROWS, "cpu", strategy.endswith("-borrow"))
    strategy = strategy.removesuffix("-borrow")
    monkeypatch.setenv("GRPO_KERNELS_LINEAR", strategy)
    hidden = torch.randn(B, T, H, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H) / 8).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3 if masked else None
    config = GRPOLossConfig(loss_type="dapo", entropy_coef=0.01, top_entropy_quantile=top_entropy_quantile)
    with backend("torch"), MemoryMeter() as meter:
        fused_linear_grpo_loss(hidden, weight, ids, torch.randn(B), mask, config=config).loss.backward()
    beyond = meter.peak_bytes - (hidden.numel() + weight.numel()) * hidden.element_size()
    tokens = B * T if mask is None else int(mask.sum())
    estimate = fl.workspace_bytes(tokens, H, V, dtype, torch.device("cpu"))
    assert 0.6 * estimate <= beyond <= estimate, f"{beyond / 2**20:.3f} MiB allocated, {estimate / 2**20:.3f} estimated"


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes a view reaches: `(first, past the last)`."""
    start = t.data_ptr()
    return start, start + (1 + sum((n - 1) * d for n, d in zip(t.shape, t.stride(), strict=True))) * t.itemsize


def _with_projections(head, method, sl, coefficients, seen):
    """`method(head, sl, coefficients)` (a `_Head` strategy's chunk), with `seen(cols, out)` called for each block of
    logits `head.project` writes, before it does."""
    real_project = head.project

    def project(h, cols, out):
        seen(cols, out)
        return real_project(h, cols, out)

    head.project = project
    try:
        return method(head, sl, coefficients)
    finally:
        del head.project


@pytest.mark.parametrize("impl", ["triton-scratch", "torch-scratch"], indirect=True)
@pytest.mark.parametrize(
    "options",
    [
        {"loss_type": "dapo", "beta": 0.1, "entropy_coef": 0.1},
        {"loss_type": "luspo", "importance_sampling_level": "sequence"},  # whole rows per chunk
        {"loss_type": "vespo"},  # rows longer than a chunk: two passes, the backward's first chunk in d_weight
    ],
)
@pytest.mark.parametrize("head", [{}, {"final_logit_softcapping": 3.0}])  # the latter at temperature 0.8
@pytest.mark.parametrize("sums", ["in d_hidden", "after the logits"])
def test_scratch_keeps_the_first_chunk_in_d_weight(impl, options, head, sums, device, monkeypatch):
    """GRPO_KERNELS_LINEAR=scratch: the first chunk holds as many tokens as `d_weight`'s memory holds the logits of,
    with their fp32 `d_hidden` sums in `d_hidden`'s memory (`scratch_tokens`: H = 12 at V = 61 in fp32), or as it
    holds the logits and the sums of (`SCRATCH_SUMS_IN_ROWS` off: 9); whole rows for sequence-level losses. Its blocks
    of logits are views of `d_weight`'s memory, its sums lie where the layout says, the chunks after it take 5 tokens
    (3 for the two passes, whose backward does the same), and the loss and gradients match the reference (so
    `d_hidden`'s rows of masked tokens stay 0 where the sums were)."""
    dev = "cpu" if impl.startswith("torch") else device
    kind = "cuda" if dev == "cuda" else "cpu"
    H, V = 12, 61
    two_pass = options["loss_type"] == "vespo"
    size = 3 if two_pass else 5
    monkeypatch.setitem(fl.CHUNK_BYTES, kind, size * 4 * V)
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, kind, 1)
    monkeypatch.setattr(fl, "SCRATCH_SUMS_IN_ROWS", sums == "in d_hidden")
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(8, 5, H, V, torch.float32, dev)
    first = fl.scratch_tokens(hidden, weight)
    assert first == (12 if sums == "in d_hidden" else 9)
    chunks, blocks, places = [], [], []
    real_grads, real_stats, real_sums = fl._Head.scratch_grads, fl._Head.stats, fl._Head._first_sums

    def first_sums(self, n, memory):  # which gradient's memory the sums take
        acc, in_rows = real_sums(self, n, memory)
        (a0, a1), (h0, h1), (w0, w1) = _span(acc), _span(self.d_h), _span(self.d_w)
        places.append("in d_hidden" if h0 <= a0 and a1 <= h1 else "after the logits" if w0 <= a0 and a1 <= w1
                      else "elsewhere")  # fmt: skip
        return acc, in_rows

    def scratch_grads(self, sl, coefficients):
        chunks.append(("scratch", sl.stop - sl.start))
        memory = self.d_w.untyped_storage().data_ptr()

        def seen(cols, out):  # each block's logits lie within d_weight's bytes
            offset = out.data_ptr() - memory
            blocks.append(offset >= 0 and offset + out.numel() * out.element_size() <= self.d_w.numel() * 4)

        return _with_projections(self, real_grads, sl, coefficients, seen)

    def stats(self, z, sl):
        chunks.append(("chunk", sl.stop - sl.start))
        return real_stats(self, z, sl)

    overlaps, real_product = [], fl._product

    def product(a, b, out=None, accumulate=False):  # no product reads memory it writes
        if out is not None:
            (a0, a1), (o0, o1) = _span(a), _span(out)
            overlaps.append(a0 < o1 and o0 < a1)
        return real_product(a, b, out=out, accumulate=accumulate)

    monkeypatch.setattr(fl._Head, "scratch_grads", scratch_grads)
    monkeypatch.setattr(fl._Head, "stats", stats)
    monkeypatch.setattr(fl._Head, "_first_sums", first_sums)
    monkeypatch.setattr(fl, "_product", product)
    config = GRPOLossConfig(max_completion_length=5, temperature=0.8 if head else 1.0, **options)
    check_against_reference(impl, hidden, weight, bias, ids, adv, mask, config=config, **head, **extra)
    assert places and set(places) == {sums}, places
    counts = mask.sum(-1).tolist()
    if two_pass:  # the forward's chunks, then the backward's
        forward = chunks[: chunks.index(("scratch", first))]
        assert all(kind == "chunk" and n <= size for kind, n in forward) and sum(n for _, n in forward) == sum(counts)
        chunks = chunks[len(forward) :]
    if options["loss_type"] == "luspo":  # whole rows: as many as fit in the first chunk, then in 5 tokens
        fit = max(k for k in range(len(counts) + 1) if sum(counts[:k]) <= first)
        assert chunks[0] == ("scratch", sum(counts[:fit])) and len(chunks) > 1, (chunks, counts)
    else:  # token chunks
        assert chunks[0] == ("scratch", first) and len(chunks) > 2, chunks
    assert all(kind == "chunk" and n <= size for kind, n in chunks[1:]), chunks
    assert blocks and all(blocks), blocks
    assert overlaps and not any(overlaps)
    with pytest.raises(ValueError, match="grad_filter_eps is not supported by the scratch strategy"):
        fused_linear_grpo_loss(hidden, weight, ids, adv, mask, bias=bias, config=config, grad_filter_eps=1e-3, **extra)
    assert sum(size for _, size in chunks) == sum(counts)


@pytest.mark.parametrize("impl", ["triton-scratch", "torch-scratch"], indirect=True)
def test_single_pass_runs_the_schedule_it_planned(impl, device, monkeypatch):
    """The single pass reads the strategy and chunk budget once: the environment changed after its chunks are planned
    (another thread's `schedule()`) does not change how they run (here the scratch strategy's first chunk still keeps
    its logits in `d_weight`'s memory)."""
    dev = "cpu" if impl.startswith("torch") else device
    kind = "cuda" if dev == "cuda" else "cpu"
    H, V = 12, 61
    monkeypatch.setitem(fl.CHUNK_BYTES, kind, 5 * 4 * V)
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, kind, 1)
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(6, 5, H, V, torch.float32, dev)
    real_chunks, real_grads, firsts = fl.single_pass_chunks, fl._Head.scratch_grads, []

    def single_pass_chunks(*args, **kwargs):
        chunks = real_chunks(*args, **kwargs)
        monkeypatch.setenv("GRPO_KERNELS_LINEAR", "chunked")
        monkeypatch.setenv("GRPO_KERNELS_CHUNK_MIB", "64")
        return chunks

    def scratch_grads(self, sl, coefficients):
        firsts.append(sl.stop - sl.start)
        return real_grads(self, sl, coefficients)

    monkeypatch.setattr(fl, "single_pass_chunks", single_pass_chunks)
    monkeypatch.setattr(fl._Head, "scratch_grads", scratch_grads)
    check_against_reference(impl, hidden, weight, bias, ids, adv, mask, config=GRPOLossConfig(loss_type="dapo"),
                            **extra)  # fmt: skip
    assert firsts == [fl.scratch_tokens(hidden, weight)] and firsts[0] > 5, firsts


@pytest.mark.parametrize("impl", ["triton-scratch", "torch-scratch"], indirect=True)
@pytest.mark.parametrize("share", [4, 8])  # CUDA's bytes of the budget per logit of a first-chunk block, the CPU's
@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.5])  # the single pass, the two passes' backward
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.bf16)])
def test_scratch_first_chunk_blocks_fit_the_later_chunks_buffer(impl, share, top_entropy_quantile, dtype, device,
                                                                 monkeypatch):  # fmt: skip
    """The scratch strategy's first chunk takes its vocabulary in blocks of at most the chunk budget over
    `SCRATCH_BLOCK_BYTES` bytes per logit (4 on CUDA: twice as wide as 8 gives, half as many blocks, each with its
    products, row kernels and d_hidden addition): the copies of the blocks whose logits reach into their own rows of
    `d_weight`, and the chunk's 16-bit `d_hidden` products, take no more of the logits buffer than the chunks after
    it do; loss and gradients match the reference."""
    dev = "cpu" if impl.startswith("torch") else device
    kind = "cuda" if dev == "cuda" else "cpu"
    H, V, size = 16, 512, 4
    monkeypatch.setitem(fl.CHUNK_BYTES, kind, size * 4 * V)
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, kind, 1)
    monkeypatch.setitem(fl.SCRATCH_BLOCK_BYTES, kind, share)
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(12, 6, H, V, dtype, dev)
    first = fl.scratch_tokens(hidden, weight)
    width = fl.block_width(V, size * 4 * V // (share * first), even=True)
    narrow = fl.block_width(V, size * 4 * V // (8 * first), even=True)  # 64 columns; 128 for the CPU path's bf16
    assert width == (2 * narrow if share == 4 else narrow) and V // width >= 2, (first, width)
    blocks, used = [], {"first": 0, "later": 0}
    real_grads, real_scratch = fl._Head.scratch_grads, fl._Head._scratch
    phase = ["later"]

    def scratch_grads(self, sl, coefficients):
        phase[0] = "first"
        try:
            return _with_projections(self, real_grads, sl, coefficients, lambda cols, out: blocks.append(cols))
        finally:
            phase[0] = "later"

    def scratch(self, numel):
        used[phase[0]] = max(used[phase[0]], numel)
        return real_scratch(self, numel)

    monkeypatch.setattr(fl._Head, "scratch_grads", scratch_grads)
    monkeypatch.setattr(fl._Head, "_scratch", scratch)
    config = GRPOLossConfig(loss_type="grpo", entropy_coef=0.1, top_entropy_quantile=top_entropy_quantile)
    check_against_reference(impl, hidden, weight, bias, ids, adv, mask, config=config, **extra)
    assert blocks == [slice(a, min(a + width, V)) for a in range(0, V, width)], blocks
    assert 0 < used["first"] <= used["later"], used


@pytest.mark.parametrize("impl", ["triton-scratch", "torch-scratch"], indirect=True)
@pytest.mark.parametrize(
    "options",
    [
        {"loss_type": "dapo", "beta": 0.1, "entropy_coef": 0.1},
        {"loss_type": "luspo", "importance_sampling_level": "sequence"},  # whole rows per chunk
        {"loss_type": "grpo", "entropy_coef": 0.1, "top_entropy_quantile": 0.5},  # two passes
    ],
)
@pytest.mark.parametrize("layout", ["masked", "all", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.bf16)])
def test_scratch_chunks_borrow_d_hidden_rows(impl, options, layout, dtype, device, monkeypatch):
    """Under the scratch strategy with `BORROW_ROWS` on, the chunks after the first take more tokens than the chunk
    buffer holds (4 here, at H = 64, V = 200), part of their logits in the rows of `d_hidden` after the chunk's last
    token, which nothing has written yet; fewer chunks in all, and the loss and gradients (`d_hidden`'s masked rows
    zero again) match the reference. Every token in the loss or some masked out, and hidden states that are a slice
    of a larger tensor (as a model's last hidden state without its last position: `d_hidden` is contiguous
    anyway)."""
    dev = "cpu" if impl.startswith("torch") else device
    kind = "cuda" if dev == "cuda" else "cpu"
    borrows = impl != "torch-scratch" or dtype == torch.float32  # the CPU path's logits are fp32: none for bf16
    H, V, size = 64, 200, 4
    monkeypatch.setitem(fl.CHUNK_BYTES, kind, size * 4 * V)
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, kind, 1)
    monkeypatch.setitem(fl.BORROW_ROWS, kind, True)
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(32, 4, H, V, dtype, dev)
    if layout != "masked":
        mask = torch.ones_like(mask)
        extra = {k: v.where(v != 0, -1.0) for k, v in extra.items()}  # log-probs for every token
    if layout == "sliced":
        hidden = torch.cat((hidden, hidden[:, :1]), 1)[:, :-1]
        assert not hidden.is_contiguous()
    first = fl.scratch_tokens(hidden, weight)
    # its fp32 d_hidden sums in d_hidden's memory: H tokens' logits, half as many fp32 ones on the CPU path
    assert first == (64 if borrows else 32)
    chunks, spans = [], []
    real_borrow, real_stats, real_scratch = fl._Head.borrow_grads, fl._Head.stats, fl._Head.scratch_grads

    def borrow_grads(self, sl, coefficients):
        n = sl.stop - sl.start
        chunks.append(("borrow", n))
        assert size < n <= self.borrow.limit(self.n - sl.start)
        size_h = self.d_h.element_size()
        last = sl.stop - 1 if self.positions is None else int(self.positions[sl.stop - 1])
        free = self.d_h.data_ptr() + (last + 1) * H * size_h, self.d_h.data_ptr() + self.d_h.numel() * size_h

        def seen(cols, out):  # a block in d_hidden lies past the chunk's rows; the other in the buffer
            start, end = _span(out)
            spans.append(free[0] <= start and end <= free[1] if cols.start == 0 else self._buffer is not None)

        return _with_projections(self, real_borrow, sl, coefficients, seen)

    def stats(self, z, sl):
        chunks.append(("chunk", sl.stop - sl.start))
        return real_stats(self, z, sl)

    def scratch_grads(self, sl, coefficients):
        chunks.append(("scratch", sl.stop - sl.start))
        return real_scratch(self, sl, coefficients)

    monkeypatch.setattr(fl._Head, "borrow_grads", borrow_grads)
    monkeypatch.setattr(fl._Head, "stats", stats)
    monkeypatch.setattr(fl._Head, "scratch_grads", scratch_grads)
    config = GRPOLossConfig(max_completion_length=4, **options)
    check_against_reference(impl, hidden, weight, bias, ids, adv, mask, config=config, **extra)
    if options.get("top_entropy_quantile"):  # the forward's chunks first
        chunks = chunks[next(i for i, (k, _) in enumerate(chunks) if k == "scratch") :]
    tokens = int(mask.sum())
    assert chunks[0][0] == "scratch" and sum(n for _, n in chunks) == tokens, chunks
    borrowed = [n for k, n in chunks if k == "borrow"]
    assert all(k != "chunk" or n <= size for k, n in chunks), chunks
    if not borrows:
        assert not borrowed, chunks
        return
    assert borrowed and spans and all(spans), (chunks, spans)
    if options["loss_type"] == "luspo":  # fewer chunks than the buffer alone would take
        alone = fl._row_ranges(mask.sum(-1).tolist(), size, first)
    else:
        alone = fl._token_ranges(tokens, size, first=first)
    assert len(chunks) < len(alone), (chunks, alone)


@pytest.mark.parametrize("column_major", [True, False])
def test_workspace_bytes_bounds_borrowing_chunks(column_major, monkeypatch):
    """With `BORROW_ROWS` on, `workspace_bytes` still bounds what the scratch strategy allocates, where a column-major
    weight leaves its first chunk no room in `d_weight`'s memory, so that it borrows `d_hidden`'s rows too (and
    gathers more rows than the buffer holds: 1 MiB chunks of 256 tokens at N = 2,048, H = 2,048, V = 1,024, 360 tokens
    of each row's 512 in the loss); a row-major one keeps its first chunk's sums after its logits
    (`SCRATCH_SUMS_IN_ROWS` off), so that it leaves tokens to chunks that borrow (in `d_hidden`'s memory the first
    chunk would take them all: H tokens' logits where V < H)."""
    from grpo_kernels.memory import MemoryMeter

    B, T, H, V = 4, 512, 2048, 1024
    monkeypatch.setitem(fl.CHUNK_BYTES, "cpu", 1 << 20)
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, "cpu", 1)
    monkeypatch.setitem(fl.BORROW_ROWS, "cpu", True)
    monkeypatch.setattr(fl, "SCRATCH_SUMS_IN_ROWS", False)
    monkeypatch.setenv("GRPO_KERNELS_LINEAR", "scratch")
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H) / 8
    weight = (weight.t().contiguous().t() if column_major else weight).requires_grad_()
    ids = torch.randint(0, V, (B, T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, :360] = True
    borrowed, real = [], fl._Head.borrow_grads
    monkeypatch.setattr(fl._Head, "borrow_grads", lambda self, sl, c: borrowed.append(sl.start) or real(self, sl, c))
    with backend("torch"), MemoryMeter() as meter:
        fused_linear_grpo_loss(hidden, weight, ids, torch.randn(B), mask, config=GRPOLossConfig()).loss.backward()
    assert borrowed and (borrowed[0] == 0) == column_major, borrowed  # the first chunk borrows where it has no room
    beyond = meter.peak_bytes - (hidden.numel() + weight.numel()) * 4
    estimate = fl.workspace_bytes(int(mask.sum()), H, V, torch.float32, torch.device("cpu"))
    assert 0.4 * estimate <= beyond <= estimate, f"{beyond / 2**20:.3f} MiB allocated, {estimate / 2**20:.3f} estimated"


@pytest.mark.parametrize("impl", ["triton-scratch", "torch-scratch"], indirect=True)
def test_scratch_edge_cases(impl, device, monkeypatch):
    """Under the scratch strategy, a batch with no token in the loss (a sequence-level loss: one empty chunk) and a
    column-major weight (whose gradient takes its strides, so that its memory is not one run of bytes: plain chunks,
    the first not sized for the scratch) match the reference."""
    dev = "cpu" if impl.startswith("torch") else device
    kind = "cuda" if dev == "cuda" else "cpu"
    monkeypatch.setitem(fl.CHUNK_BYTES, kind, 5 * 4 * 61)
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, kind, 1)
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(6, 5, 12, 61, torch.float32, dev)
    config = GRPOLossConfig(loss_type="luspo", importance_sampling_level="sequence")
    check_against_reference(impl, hidden, weight, bias, ids, adv, torch.zeros_like(mask), config=config)
    column_major = weight.t().contiguous().t()
    assert fl.scratch_tokens(hidden, weight) == 12 and fl.scratch_tokens(hidden, column_major) == 0
    sizes = []
    real_stats = fl._Head.stats

    def stats(self, z, sl):
        sizes.append(sl.stop - sl.start)
        return real_stats(self, z, sl)

    monkeypatch.setattr(fl._Head, "stats", stats)
    check_against_reference(impl, hidden, column_major, bias, ids, adv, mask, config=GRPOLossConfig(), **extra)
    assert sizes and max(sizes) <= 5, sizes


@pytest.mark.parametrize("impl", ["triton-chunked", "triton-scratch"], indirect=True)
@pytest.mark.parametrize("options", [{"loss_type": "dapo", "entropy_coef": 0.1}, {"loss_type": "vespo"}])
def test_triton_weight_grad_additions(impl, options, device, monkeypatch):
    """`fused_linear.ADD_WEIGHT_GRAD = "triton"`: every chunk's share of `d_weight` after the first is added by
    `ops/weight_grad.py` (single pass and, for VESPO rows longer than a chunk, two passes), and the loss and gradients
    match the reference; a bad value fails clearly."""
    from grpo_kernels.ops import weight_grad

    dev = device
    kind = "cuda" if dev == "cuda" else "cpu"
    monkeypatch.setitem(fl.CHUNK_BYTES, kind, 3 * 4 * 61)  # 3-token chunks
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, kind, 1)
    monkeypatch.setattr(fl, "ADD_WEIGHT_GRAD", "triton")
    calls, real = [], weight_grad.add_weight_grad
    monkeypatch.setattr(weight_grad, "add_weight_grad", lambda out, a, b, accumulate: calls.append(accumulate)
                        or real(out, a, b, accumulate))  # fmt: skip
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(6, 5, 12, 61, torch.float32, dev)
    check_against_reference(impl, hidden, weight, bias, ids, adv, mask, config=GRPOLossConfig(**options), **extra)
    assert calls and all(calls) == (impl == "triton-scratch")  # the default's first chunk writes d_weight
    assert calls.count(False) == (impl == "triton-chunked")
    monkeypatch.setattr(fl, "ADD_WEIGHT_GRAD", "cutlass")
    with pytest.raises(ValueError, match='ADD_WEIGHT_GRAD must be "cublas" or "triton"'):
        fused_linear_grpo_loss(hidden, weight, ids, adv, mask, bias=bias, **extra)


def _strided(x: torch.Tensor, step: int = 2) -> torch.Tensor:
    """`x`'s values in a tensor whose last dimension is `step` elements apart (a slice of a wider one)."""
    wide = torch.zeros(*x.shape[:-1], x.shape[-1] * step, dtype=x.dtype, device=x.device)
    wide[..., ::step] = x
    return wide[..., ::step]


@pytest.mark.parametrize(
    "layout", ["column-major weight", "strided hidden and bias", "strided ids and mask", "strided ids, no mask"]
)
@pytest.mark.parametrize(("impl", "add"), [(i, "cublas") for i in IMPLS] + [("triton-chunked", "triton"),
                                           ("triton-scratch", "triton")], indirect=["impl"])  # fmt: skip
def test_strided_inputs(impl, add, layout, device, monkeypatch):
    """A column-major weight (a tied embedding's transpose), hidden states and a bias whose last dimension is not one
    element apart (slices), and token ids and a mask that are such slices, match the reference on every path: the
    kernels that step along rows one element at a time (the fused kernels, the Triton `d_weight` addition) take
    copies of them or are not used."""
    dev = "cpu" if impl.startswith("torch") else device
    monkeypatch.setattr(fl, "ADD_WEIGHT_GRAD", add)
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(3, 4, 16, 70, torch.float32, dev)
    if layout == "column-major weight":
        weight = weight.t().contiguous().t()
    elif layout == "strided hidden and bias":
        hidden, bias = _strided(hidden), _strided(bias)
        assert hidden.stride(-1) == bias.stride(-1) == 2
    else:  # views whose flattening is still a view, 2 elements apart (the kernels read ids[row])
        ids, mask = _strided(ids), (_strided(mask) if layout == "strided ids and mask" else None)
        assert ids.reshape(-1).stride() == (2,)
    config = GRPOLossConfig(loss_type="dapo", beta=0.1, entropy_coef=0.05)
    check_against_reference(impl, hidden, weight, bias, ids, adv, mask, config=config, **extra)
    if layout.startswith("strided ids"):
        got = linear_logprobs(hidden, weight, ids, bias=bias, return_entropy=True)
        want = linear_logprobs(hidden, weight, ids.contiguous(), bias=bias, return_entropy=True)
        for x, y in zip(got, want, strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_hidden_states_outside_the_loss_stay_out(impl, value, device):
    """A NaN or inf hidden state at a padding token (masked out) changes nothing: the loss, metrics and gradients
    equal those with a finite one there, on every path (a row projected but outside the loss must not reach d_weight
    through 0 * NaN), and d_hidden is zero at that token."""
    dev = "cpu" if impl.startswith("torch") else device
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(3, 4, 16, 70, torch.float32, dev)
    mask[1, 2] = False
    bad = hidden.clone()
    bad[1, 2, 5] = value
    config = GRPOLossConfig(loss_type="dapo", beta=0.1, entropy_coef=0.05)
    out, grads = run(fused_linear_grpo_loss, bad, weight, bias, ids, adv, mask, config=config, **extra)
    want, want_grads = run(fused_linear_grpo_loss, hidden, weight, bias, ids, adv, mask, config=config, **extra)
    assert torch.equal(out.loss, want.loss)
    assert all(torch.equal(out.metrics[k], want.metrics[k]) for k in want.metrics)
    assert torch.equal(grads[0], want_grads[0]) and torch.all(grads[0][1, 2] == 0)
    # d_weight and d_bias may sum the same products in another order (only the loss's rows), so within fp32 rounding
    for name, g, w in zip(("d_weight", "d_bias"), grads[1:], want_grads[1:], strict=True):
        assert g.isfinite().all(), name
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")


def test_scratch_allocates_no_logits_for_its_first_chunk(monkeypatch):
    """At N = 512, H = 64, V = 8,192 in fp32 on the CPU path, the scratch strategy's first chunk takes 64 tokens,
    whose logits (2 MiB) live in `d_weight`'s memory and their fp32 `d_hidden` sums in `d_hidden`'s: forward +
    backward allocate under a quarter of that beyond the gradients (4-token chunks after it), where the default
    strategy with 64-token chunks allocates more than them."""
    from grpo_kernels.memory import MemoryMeter

    B, T, H, V = 4, 128, 64, 8192
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, "cpu", 1)
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = (torch.randn(V, H) / 8).requires_grad_()
    ids = torch.randint(0, V, (B, T))
    config = GRPOLossConfig(loss_type="dapo", entropy_coef=0.01)
    first = fl.scratch_tokens(hidden, weight)
    assert first == 64
    logits = first * V * 4
    grads = (hidden.numel() + weight.numel()) * 4
    peaks = {}
    for strategy, budget in (("scratch", 4 * 4 * V), ("chunked", first * 4 * V)):
        monkeypatch.setitem(fl.CHUNK_BYTES, "cpu", budget)
        monkeypatch.setenv("GRPO_KERNELS_LINEAR", strategy)
        with backend("torch"), MemoryMeter() as meter:
            fused_linear_grpo_loss(hidden, weight, ids, torch.randn(B), config=config).loss.backward()
        peaks[strategy] = meter.peak_bytes - grads
    assert peaks["scratch"] < logits / 4 < logits < peaks["chunked"], {k: v / 2**20 for k, v in peaks.items()}


@pytest.mark.parametrize("strategy", ["chunked", "vocab-blocks", "tiles", "scratch"])
def test_a_million_tokens_in_one_call(strategy, monkeypatch):
    """N = 1,000,000 tokens (B = T = 1,000, a tenth masked) in one call on the CPU path: loss and gradients equal the
    fp64 reference's, the gradients to 1e-5 of their largest entry (fp32 sums over a million tokens)."""
    monkeypatch.setenv("GRPO_KERNELS_LINEAR", strategy)
    B, T, H, V = 1000, 1000, 8, 50
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H) / 3
    ids, adv, mask = torch.randint(V, (B, T)), torch.randn(B), torch.rand(B, T) > 0.1
    config = GRPOLossConfig(loss_type="dapo")
    with backend("torch"):
        out, grads = run(fused_linear_grpo_loss, hidden, weight, None, ids, adv, mask, config=config)
    exact, exact_grads = run(reference.linear_grpo_loss, hidden, weight, None, ids, adv, mask, upcast_to=torch.float64,
                             config=config)  # fmt: skip
    assert_close(out.loss, exact.loss, atol=1e-7, rtol=1e-6, name="loss")
    for name, g, e in zip(("d_hidden", "d_weight"), grads, exact_grads, strict=True):
        assert_close(g, e, atol=1e-5 * e.abs().max().item(), rtol=0, name=name)


@pytest.mark.parametrize(
    "options",
    [{"loss_type": "dapo", "beta": 0.1}, {"loss_type": "grpo", "entropy_coef": 0.1, "top_entropy_quantile": 0.5}],
)
@pytest.mark.parametrize("vocab", [61, 150])
def test_logits_rows_padded_past_the_vocabulary(impl, options, vocab, device, monkeypatch):
    """With the rows of a chunk's logits padded to a multiple of 64 elements (as CUDA pads them, for aligned rows),
    an odd vocabulary's loss and gradients match the reference, in the single-pass and the two-pass schedule, and the
    chunks' logits are views a whole multiple of 64 elements a row apart. Past 64 columns the logits and `d_weight`
    are formed in two products each, the first over a whole multiple of 64 columns (`column_parts`). The scratch
    strategy's first chunk (about 10 tokens here) keeps its logits in `d_weight`'s memory; the chunks after it too
    are padded."""
    dev = "cpu" if impl.startswith("torch") else device
    kind = "cuda" if dev == "cuda" else "cpu"
    monkeypatch.setitem(fl.ROW_ALIGN, kind, 64)
    monkeypatch.setitem(fl.CHUNK_BYTES, kind, 5 * 4 * vocab)  # 5-token chunks
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, kind, 1)
    strides, widths = [], set()
    real_logits, real_mm = fl._Head.logits, torch.mm

    def logits(self, sl):
        z = real_logits(self, sl)
        strides.append(z.stride())
        return z

    def mm(a, b, *args, out=None, **kwargs):  # the products' outer extents (the vocabulary's, in one or two parts)
        widths.update((a.shape[0], b.shape[1]))
        return real_mm(a, b, *args, out=out, **kwargs)

    monkeypatch.setattr(fl._Head, "logits", logits)
    monkeypatch.setattr(fl.torch, "mm", mm)
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(5, 6, 12, vocab, torch.float32, dev)
    check_against_reference(impl, hidden, weight, bias, ids, adv, mask, config=GRPOLossConfig(**options), **extra)
    assert (not strides) == impl.endswith(("fused", "tiles"))
    if strides:
        assert set(strides) == {(-(-vocab // 64) * 64, 1)}
        assert (vocab in widths) == (vocab == 61) and (vocab == 61 or {128, 22} <= widths)


def test_whole_row_chunks_pack_rows():
    """Sequence-level losses take whole rows per chunk: every chunk holds as many consecutive rows as fit, the first
    up to `first` tokens where that is larger (the scratch strategy's first chunk); a row longer than a chunk: None."""
    rows = lambda chunks: [(r.start, r.stop, t.start, t.stop) for r, t in chunks]
    assert rows(fl._row_ranges([3, 3, 3, 3, 3], 7)) == [(0, 2, 0, 6), (2, 4, 6, 12), (4, 5, 12, 15)]
    assert rows(fl._row_ranges([3, 3, 3, 3, 3], 7, first=10)) == [(0, 3, 0, 9), (3, 5, 9, 15)]
    assert rows(fl._row_ranges([0, 5, 2, 0, 4], 6)) == [(0, 2, 0, 5), (2, 5, 5, 11)]
    assert fl._row_ranges([3, 8, 3], 7, first=10) is None
    assert [(t.start, t.stop) for t in fl._token_ranges(23, 5, first=9)] == [(0, 9), (9, 14), (14, 19), (19, 23)]
    assert fl._token_ranges(0, 5, first=9) == []


@pytest.mark.parametrize("even", [False, True])
@pytest.mark.parametrize(("vocab", "most"), [(131_072, 16_384), (151_936, 16_384), (131_072, 8_956), (1000, 300),
                                             (61, 20), (61, 100), (50, 10**6), (65_536, 4_793)])  # fmt: skip
def test_vocabulary_blocks_are_aligned(vocab, most, even):
    """A block of vocabulary columns holds at most the budget's columns, a whole multiple of BLOCK_COLUMNS where it
    holds that many (the last block aside); `even`: as few blocks as that allows, of near-equal widths."""
    width = fl.block_width(vocab, most, even)
    cap = min(vocab, most)
    aligned = cap if cap < fl.BLOCK_COLUMNS or cap == vocab else cap - cap % fl.BLOCK_COLUMNS
    assert 1 <= width <= aligned
    if cap >= fl.BLOCK_COLUMNS and width < vocab:
        assert width % fl.BLOCK_COLUMNS == 0
    if even:
        assert -(-vocab // width) == -(-vocab // aligned)  # as few blocks as the aligned cap allows
        blocks = -(-vocab // width)
        assert vocab - (blocks - 1) * width > width - blocks * fl.BLOCK_COLUMNS  # the last block near the others
    else:
        assert width == aligned
    expected = {(151_936, 16_384, True): 15_232, (131_072, 8_956, True): 8_768, (1000, 300, True): 256}
    assert width == expected.get((vocab, most, even), width)


def test_chunk_budget_from_the_environment(monkeypatch):
    """GRPO_KERNELS_CHUNK_MIB sets the chunk budget of every strategy; a bad value is a clear error; set but empty,
    it and GRPO_KERNELS_LINEAR are as if unset."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("GRPO_KERNELS_CHUNK_MIB", "2")
    assert fl.chunk_tokens(1024, cpu) == 2 * (1 << 20) // (4 * 1024)
    monkeypatch.setenv("GRPO_KERNELS_LINEAR", "vocab-blocks")
    assert fl.chunk_tokens(1024, cpu) == 512
    for bad in ("0", "-1", "lots", "nan", "inf"):
        monkeypatch.setenv("GRPO_KERNELS_CHUNK_MIB", bad)
        with pytest.raises(ValueError, match="GRPO_KERNELS_CHUNK_MIB must be a positive, finite number"):
            fl.chunk_tokens(1024, cpu)
    monkeypatch.setenv("GRPO_KERNELS_CHUNK_MIB", "")
    monkeypatch.setenv("GRPO_KERNELS_LINEAR", "")
    assert fl.linear_schedule(cpu) == ("chunked", fl.CHUNK_BYTES["cpu"])


def test_schedule_sets_the_strategy_and_budget_for_a_block(monkeypatch):
    """`fused_linear.schedule` sets GRPO_KERNELS_LINEAR and GRPO_KERNELS_CHUNK_MIB inside its block (None leaves one
    as it is), restores them after, even on an error, and names a bad value."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("GRPO_KERNELS_LINEAR", "vocab-blocks")
    monkeypatch.delenv("GRPO_KERNELS_CHUNK_MIB", raising=False)
    with fl.schedule("tiles", chunk_mib=2):
        assert fl.linear_schedule(cpu) == ("tiles", 2 << 20)
        with fl.schedule(chunk_mib=0.5):
            assert fl.linear_schedule(cpu) == ("tiles", 1 << 19)
        assert fl.linear_schedule(cpu) == ("tiles", 2 << 20)
    with pytest.raises(RuntimeError), fl.schedule("chunked"):
        raise RuntimeError
    assert os.environ["GRPO_KERNELS_LINEAR"] == "vocab-blocks" and "GRPO_KERNELS_CHUNK_MIB" not in os.environ
    with pytest.raises(ValueError, match="strategy must be one of chunked, fused, vocab-blocks, tiles"):
        fl.schedule("blocks").__enter__()
    for bad in (0, math.inf, True, "2"):
        with pytest.raises(ValueError, match="chunk_mib must be a positive, finite number of MiB"):
            fl.schedule(chunk_mib=bad).__enter__()


def test_head_options_from_transformers_configs():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    assert head_options_from_config(Gemma2Config()).final_logit_softcapping == 30.0
    assert head_options_from_config(CohereConfig(logit_scale=0.0625)).logit_scale == 0.0625
    assert head_options_from_config(GraniteConfig(logits_scaling=8.0)).logit_scale == 0.125
    llama = head_options_from_config(LlamaConfig(), temperature=0.7)
    assert (llama.logit_scale, llama.final_logit_softcapping, llama.temperature) == (1.0, None, 0.7)


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"hidden": torch.randn(6, 10)}, ValueError, "hidden must be \\[B, T, H\\]"),
        ({"weight": torch.randn(50, 9)}, ValueError, "weight has shape \\(50, 9\\) but must be \\[V, H\\] with H = 10"),
        ({"weight": torch.randn(50, 10, dtype=torch.float64)}, TypeError, "hidden is torch.float32 but weight is"),
        ({"bias": torch.randn(49)}, ValueError, "bias has shape \\(49,\\)"),
        ({"ids": torch.full((2, 3), 50)}, ValueError, "completion_ids holds token ids outside \\[0, 50\\)"),
        ({"advantages": torch.randn(2, 4)}, ValueError, "advantages has shape \\(2, 4\\)"),
    ],
)
def test_bad_input(change, error, match):
    args = {"hidden": torch.randn(2, 3, 10), "weight": torch.randn(50, 10), "bias": None,
            "ids": torch.randint(0, 50, (2, 3)), "advantages": torch.randn(2)}  # fmt: skip
    args.update(change)
    with pytest.raises(error, match=match):
        fused_linear_grpo_loss(args["hidden"], args["weight"], args["ids"], args["advantages"], bias=args["bias"])


def test_fused_kernels_are_deterministic(impl, device):
    """Bit-identical loss and gradients run to run (the fused backward orders its additions)."""
    dev = "cpu" if impl.startswith("torch") else device
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(6, 9, 40, 300, torch.float32, dev)
    config = GRPOLossConfig(loss_type="grpo", beta=0.1, entropy_coef=0.05)
    a = run(fused_linear_grpo_loss, hidden, weight, bias, ids, adv, mask, config=config, **extra)
    b = run(fused_linear_grpo_loss, hidden, weight, bias, ids, adv, mask, config=config, **extra)
    assert torch.equal(a[0].loss, b[0].loss)
    for x, y in zip(a[1], b[1], strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("shape,entropy", list(LARGE_VOCABULARY_CASES.values()), ids=list(LARGE_VOCABULARY_CASES))
def test_fused_kernels_fp32_sums_over_large_vocabularies(shape, entropy, device):
    """The fused kernels' fp32 `d_hidden` sums a token's row of the vocabulary tile by tile (1,187 tiles at Qwen's
    151,936 columns, 2,048 at 262,144): within 4 units in the last place of its largest entry of the fp64 result,
    as a correctly rounded sum of the fp32 logits' gradients is (their own rounding moves it by about 1e-8). A plain
    chain of fp32 additions is 6 to 10 units off here: the tiles' additions are compensated (Kahan's), the target's
    one-hot term is added apart from the dot of the small terms, and so is the forward's sum of exponentials that
    every probability is divided by."""
    from grpo_kernels.ops.linear import linear_bwd, linear_fwd

    case = large_vocabulary_case(shape, entropy)
    g_ent, exact = case.g_ent, case.d_hidden
    head = (1.0, 1.0, None)
    h, w, ids, g = (x.to(device) for x in (case.h, case.w, case.ids, case.g))
    _, ent, stats = linear_fwd(h, w, None, ids, None, head)
    d_h, _, _ = linear_bwd(h, w, None, ids, None, stats, ent, g, None if g_ent is None else g_ent.to(device), head,
                           (True, False, False))  # fmt: skip
    err = (d_h.double().cpu() - exact).abs().max().item()
    ulp = exact.abs().max().item() * torch.finfo(torch.float32).eps / 2
    assert err <= 4 * ulp, f"d_hidden: error {err:.3e} = {err / ulp:.1f} units in the last place of its largest entry"


@pytest.mark.parametrize("strategy", ["vocab-blocks", "tiles"])
@pytest.mark.parametrize("name", ["triton", "torch"])
@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.5])  # the single-pass and the two-pass schedule
def test_block_strategies_form_the_gradients_block_by_block(strategy, name, top_entropy_quantile, device, monkeypatch):
    """With GRPO_KERNELS_LINEAR=vocab-blocks, d_weight and d_bias come from several vocabulary blocks of every token,
    each written once; with tiles, each chunk of tokens (sized by H) forms its gradients from several blocks of
    vocabulary columns (and refuses gradient filtering with a clear error). Both match the chunked strategy's
    gradients and the reference."""
    dev = "cpu" if name == "torch" else device
    kind = "cuda" if dev == "cuda" else "cpu"
    B, T, H, V = 4, 9, 40, 300
    budget = 7 * 4 * V  # 7-token chunks of statistics; vocab-blocks: blocks of budget / (4 * 36) columns; tiles:
    monkeypatch.setitem(fl.CHUNK_BYTES, kind, budget)  # chunks of at most 13 tokens (budget / (16 H)), blocks of at
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, kind, 1)  # most budget / (4 * tokens) columns, both of even sizes
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(B, T, H, V, torch.float32, dev)
    mask.fill_(True)
    mask[0], mask[3, 5:] = False, False  # 23 tokens in the loss
    config = GRPOLossConfig(loss_type="dapo", beta=0.1, entropy_coef=0.05, top_entropy_quantile=top_entropy_quantile)
    ops = fl._row_ops(hidden) if name == "triton" else fl.cpu
    blocks, stat_blocks = [], []
    real, real_stats = ops.block_grad, ops.block_stats
    monkeypatch.setattr(
        ops, "block_grad", lambda z, ids, start, *a: blocks.append((start, z.shape)) or real(z, ids, start, *a)
    )
    monkeypatch.setattr(  # the tiles forward: (first column, shape, first block, last block)
        ops, "block_stats", lambda z, ids, start, state, first, last, *a: stat_blocks.append(
            (start, tuple(z.shape), first, last)) or real_stats(z, ids, start, state, first, last, *a)
    )  # fmt: skip
    if strategy == "vocab-blocks":  # every token of the batch, masked ones too, in each block
        expected = [(start, (B * T, min(58, V - start))) for start in range(0, V, 58)]
    else:  # the 23 active tokens in 2 chunks, of 11 and 12; 300 columns in blocks of at most 190 or 175 columns,
        # whole multiples of 64 (BLOCK_COLUMNS) but the last: 128, 128 and 44
        expected = [(s, (r, min(128, V - s))) for r in (11, 12) for s in (0, 128, 256)]
    with backend(name):
        monkeypatch.setenv("GRPO_KERNELS_LINEAR", "chunked")
        _, chunked = run(fused_linear_grpo_loss, hidden, weight, bias, ids, adv, mask, config=config, **extra)
        assert not blocks and not stat_blocks
        monkeypatch.setenv("GRPO_KERNELS_LINEAR", strategy)
        check_against_reference(name, hidden, weight, bias, ids, adv, mask, config=config, **extra)
        assert [(start, tuple(shape)) for start, shape in blocks] == expected
        if strategy == "tiles":  # the forward's blocks are the backward's
            assert stat_blocks == [(s, shape, s == 0, s + shape[1] == V) for s, shape in expected]
        else:
            assert not stat_blocks
        _, blocked = run(fused_linear_grpo_loss, hidden, weight, bias, ids, adv, mask, config=config, **extra)
        if strategy == "tiles":
            with pytest.raises(ValueError, match="grad_filter_eps is not supported by the tiles strategy"):
                run(fused_linear_grpo_loss, hidden, weight, bias, ids, adv, mask, config=config, grad_filter_eps=0.01,
                    **extra)  # fmt: skip
    for a, b, what in zip(blocked, chunked, ("d_hidden", "d_weight", "d_bias"), strict=True):
        assert_close(a, b, atol=1e-6, rtol=1e-5, name=f"{what}: {strategy} vs chunks")


@pytest.mark.parametrize("frozen", ["hidden", "weight", "bias"])
def test_gradients_of_only_the_inputs_that_need_them(impl, frozen, device):
    """A frozen input (a frozen backbone, head or bias) gets no gradient; the others' equal the reference's."""
    dev = "cpu" if impl.startswith("torch") else device
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(3, 6, 16, 70, torch.float32, dev)
    config = GRPOLossConfig(loss_type="dapo", beta=0.1, entropy_coef=0.05)
    names = ("hidden", "weight", "bias")
    inputs = zip(names, (hidden, weight, bias), strict=True)
    leaves = [t.detach().clone().requires_grad_(name != frozen) for name, t in inputs]
    out = fused_linear_grpo_loss(leaves[0], leaves[1], ids, adv, mask, bias=leaves[2], config=config, **extra)
    out.loss.backward()
    _, expected = run(reference.linear_grpo_loss, hidden, weight, bias, ids, adv, mask, upcast_to=torch.float64,
                      config=config, **extra)  # fmt: skip
    for name, leaf, e in zip(names, leaves, expected, strict=True):
        if name == frozen:
            assert leaf.grad is None, name
        else:
            assert_close(leaf.grad, e, atol=1e-5, rtol=1e-4, name=f"d_{name}")


def test_backward_runs_where_the_forward_ran(monkeypatch):
    """A forward inside `backend("torch")` keeps that backend for its backward, wherever `.backward()` is called."""
    from grpo_kernels.ops import logprobs

    def refuse(*args, **kwargs):
        raise AssertionError("the backward switched to the Triton row kernels")

    monkeypatch.setattr(logprobs, "chunk_grad", refuse)
    monkeypatch.setenv("GRPO_KERNELS_LINEAR", "chunked")
    hidden, weight, bias, ids, adv, mask, _ = make_inputs(3, 4, 8, 40, torch.float32, "cpu")
    h = hidden.clone().requires_grad_()
    config = GRPOLossConfig(loss_type="dapo", top_entropy_quantile=0.5)  # the two-pass schedule
    with backend("torch"):
        out = fused_linear_grpo_loss(h, weight, ids, adv, mask, bias=bias, config=config)
    with backend("triton"):
        out.loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def token_chunks(monkeypatch, dev: str, tokens: int, V: int) -> None:
    """Chunks of `tokens` tokens at vocabulary V, in both chunked strategies."""
    kind = "cuda" if dev == "cuda" else "cpu"
    for table in (fl.CHUNK_BYTES, fl.VOCAB_BLOCKS_CHUNK_BYTES):
        monkeypatch.setitem(table, kind, tokens * 4 * V)
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, kind, 1)


def peaked_inputs(B, T, H, V, dev, hot=64, temperature=0.8):
    """Hidden states and a head whose softmax is peaked on `hot` columns (the first ones, as a frequency-sorted
    vocabulary has them), with completion tokens sampled from that softmax, as a policy's own samples are. Drawn on the
    CPU, like `make_inputs`."""
    hidden = torch.randn(B, T, H)
    weight = torch.randn(V, H) / H**0.5 * 1.5
    weight[:hot] *= 4
    bias = torch.randn(V) * 0.1
    probs = torch.softmax((hidden.double() @ weight.double().T + bias.double()) / temperature, -1)
    ids = torch.multinomial(probs.reshape(B * T, V), 1).reshape(B, T)
    mask = torch.rand(B, T) > 0.2
    logps = probs.reshape(B, T, V).gather(-1, ids[..., None]).squeeze(-1).log().float()
    extra = {"old_logps": (logps + torch.randn(B, T) * 0.05) * mask,
             "ref_logps": (logps + torch.randn(B, T) * 0.3) * mask}  # fmt: skip
    adv = torch.randn(B)
    return (*(x.to(dev) for x in (hidden, weight, bias, ids, adv, mask)), {k: v.to(dev) for k, v in extra.items()})


@pytest.mark.parametrize("impl", FILTERING, indirect=True)
@pytest.mark.parametrize(
    "options",
    [{"loss_type": "dapo"}, {"loss_type": "grpo", "beta": 0.1, "entropy_coef": 0.05},
     {"loss_type": "dapo", "top_entropy_quantile": 0.5}],  # token-local, entropy bonus, two-pass
)  # fmt: skip
@pytest.mark.parametrize("padded", [False, True])  # logits rows 1,024 elements apart, as CUDA pads them
def test_gradient_filtering_leaves_out_only_small_gradients(impl, options, padded, device, monkeypatch):
    """With `grad_filter_eps`, each gradient's error against the exact one is within the bound of the entries that
    filtering may leave out (plus the unfiltered result's own rounding error); something is left out; the forward's
    results are unchanged; results are bit-identical run to run; and None stays exact (bit-identical to no
    filtering)."""
    dev = "cpu" if impl.startswith("torch") else device
    if padded:
        if impl == "triton-fused":
            pytest.skip("the fused kernels keep no rows of logits")
        monkeypatch.setitem(fl.ROW_ALIGN, "cuda" if dev == "cuda" else "cpu", 64)
    V, eps = 1000, 1e-3
    token_chunks(monkeypatch, dev, 8, V)  # few columns kept in each
    hidden, weight, bias, ids, adv, mask, extra = peaked_inputs(4, 9, 40, V, dev)
    config = GRPOLossConfig(temperature=0.8, **options)
    args = (hidden, weight, bias, ids, adv, mask)
    plain, g_plain = run(fused_linear_grpo_loss, *args, config=config, **extra)
    off, g_off = run(fused_linear_grpo_loss, *args, config=config, grad_filter_eps=None, **extra)
    out, g_out = run(fused_linear_grpo_loss, *args, config=config, grad_filter_eps=eps, **extra)
    _, g_again = run(fused_linear_grpo_loss, *args, config=config, grad_filter_eps=eps, **extra)
    assert all(torch.equal(a, b) for a, b in zip(g_out, g_again, strict=True)), "filtering is not deterministic"
    assert torch.equal(off.loss, plain.loss) and all(torch.equal(a, b) for a, b in zip(g_off, g_plain, strict=True))
    assert torch.equal(out.loss, plain.loss) and torch.equal(out.logps, plain.logps)
    exact, bounds = filtering_bound(*args, config, eps, **extra)
    for name, g, gp, e, bound in zip(("d_hidden", "d_weight", "d_bias"), g_out, g_plain, exact, bounds, strict=True):
        e = e.cpu()
        rounding = (gp.double().cpu() - e).abs().max().item()
        excess = ((g.double().cpu() - e).abs() - bound.cpu() - 4 * rounding - 1e-7).max().item()
        assert excess <= 0, f"{name}: error beyond the filtering bound by {excess:.3g}"
        assert bound.max() < 0.05 * e.abs().max(), f"{name}: the bound is too loose to test anything"
    assert not torch.equal(g_out[0], g_plain[0]), "filtering left nothing out of d_hidden"


@pytest.mark.parametrize("impl", [i for i in FILTERING if i != "triton-fused"], indirect=True)
def test_gradient_filtering_keeps_every_column_of_a_flat_softmax(impl, device, monkeypatch):
    """Near-uniform probabilities, each below the threshold, add up: the chunked schedules then keep every column
    (bit-identical to no filtering) rather than leave out most of each token's probability mass."""
    dev = "cpu" if impl.startswith("torch") else device
    V = 1000
    token_chunks(monkeypatch, dev, 8, V)
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(4, 9, 40, V, torch.float32, dev)
    config = GRPOLossConfig(loss_type="grpo", beta=0.1, entropy_coef=0.05)
    args = (hidden, weight, bias, ids, adv, mask)
    _, g_plain = run(fused_linear_grpo_loss, *args, config=config, **extra)
    _, g_out = run(fused_linear_grpo_loss, *args, config=config, grad_filter_eps=0.005, **extra)
    assert all(torch.equal(a, b) for a, b in zip(g_out, g_plain, strict=True))


def test_grad_filter_eps_values():
    """The "auto" value is the input dtype's resolution below one; bad values are clear errors."""
    from grpo_kernels.config import HeadOptions, resolve_grad_filter_eps

    assert resolve_grad_filter_eps("auto", torch.bfloat16) == 2.0**-12
    assert resolve_grad_filter_eps("auto", torch.float16) == 2.0**-15
    assert resolve_grad_filter_eps(None, torch.float32) is None
    for bad in ("high", float("nan")):
        with pytest.raises(ValueError, match="grad_filter_eps"):
            resolve_grad_filter_eps(bad, torch.float32)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="grad_filter_eps must be in \\[0, 1\\)"):
            HeadOptions(grad_filter_eps=bad)
    hidden, weight, ids = torch.randn(2, 3, 8), torch.randn(20, 8), torch.randint(0, 20, (2, 3))
    with pytest.raises(ValueError, match="grad_filter_eps must be in"):
        linear_logprobs(hidden, weight, ids, grad_filter_eps=2.0)
    with pytest.raises(ValueError, match="grad_filter_eps is not supported with vocab_process_group"):
        linear_logprobs(hidden, weight, ids, grad_filter_eps="auto", vocab_process_group=object())


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a value back from the device (a CUDA synchronisation): scalars, nonzero, boolean
    indexing; `.tolist()` is counted by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        indices = args[1] if name.startswith("index.") else ()
        boolean_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        if name.startswith(("_local_scalar_dense", "nonzero", "is_nonzero", "masked_select")) or boolean_index:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _HostValues(TorchDispatchMode):
    """Records where a tensor is made from host data (`torch.tensor(x, device=...)`, indexing by a Python list): on CUDA
    each such copy from the host waits for every queued kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("lift_fresh"):
            import traceback

            frames = [f for f in traceback.extract_stack() if "grpo_kernels" in f.filename]
            self.sites.append(f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ["triton-chunked", "triton-scratch", "triton-vocab-blocks"], indirect=True)
@pytest.mark.parametrize(
    "options",
    [{"loss_type": "dapo"}, {"loss_type": "dr_grpo", "max_completion_length": 8},
     {"loss_type": "grpo", "beta": 0.1, "entropy_coef": 0.1},
     {"loss_type": "luspo", "importance_sampling_level": "sequence"}, {"loss_type": "cispo"}],
)  # fmt: skip
@pytest.mark.parametrize("num_items_in_batch", [None, 17.0, "tensor"])
def test_the_loss_sends_no_host_values_to_the_device(impl, options, num_items_in_batch, device, monkeypatch):
    """Once its inputs are checked, the loss (from hidden states, in chunks, and from logits) makes no tensor from host
    data: numbers are filled in on the device and the metrics' rows are picked by views. On CUDA a copy from the host
    waits for every queued kernel; after the chunks it left the GPU idle while Python queued the rest (on the H200 the
    metric rows picked by a list made the default's backward, which only hands the gradients over, take 1.18 ms, its
    host's time, against 0.013 ms before)."""
    B, T, H, V = 4, 8, 16, 64
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(B, T, H, V, torch.float32, device)
    mask = torch.ones_like(mask)  # every token: no positions to plan with
    extra = {k: v.where(v != 0, -1.0) for k, v in extra.items()}
    nib = torch.tensor(17, device=device) if num_items_in_batch == "tensor" else num_items_in_batch
    config = GRPOLossConfig(**options)
    token_chunks(monkeypatch, device, 8, V)
    logits = (hidden @ weight.T + bias).requires_grad_(True)
    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    with _HostValues() as mode:
        out = fused_linear_grpo_loss(hidden, weight, ids, adv, mask, bias=bias, config=config, num_items_in_batch=nib,
                                     **extra)  # fmt: skip
        out.loss.backward()
        grpo_loss(logits, ids, adv, mask, config=config, num_items_in_batch=nib, **extra).loss.backward()
    assert mode.sites == [], mode.sites


def test_entropy_threshold_reads_nothing_back():
    """top_entropy_quantile's threshold: bit for bit `torch.quantile` of the active entropies (as TRL takes it), +inf
    where none is active, without gathering them (which waits for the device to count them)."""
    from grpo_kernels.objective import entropy_threshold

    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        B, T = torch.randint(1, 9, (2,), generator=gen).tolist()
        entropy = torch.rand(B, T, generator=gen) * 5
        mask = torch.rand(B, T, generator=gen) < torch.rand((), generator=gen)
        q = float(torch.rand((), generator=gen))
        with _HostReads() as mode:
            got = entropy_threshold(entropy, mask, q)
        assert mode.count == 0
        want = torch.quantile(entropy[mask], q) if mask.any() else torch.tensor(float("inf"))
        assert torch.equal(got, want), (got, want)
    assert entropy_threshold(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), 0.5) == float("inf")  # no rows


@pytest.mark.parametrize("impl", ["triton-chunked", "triton-tiles", "torch-scratch"], indirect=True)
@pytest.mark.parametrize("entropy_quantile", [1.0, 0.5])  # the single pass where it applies; two passes
def test_a_call_finds_its_active_tokens_once(impl, entropy_quantile, device):
    """The active tokens' positions (`nonzero`, which waits for the device) are found once per call and kept for the
    backward, whichever schedule runs it."""
    dev = "cpu" if impl.startswith("torch") else device
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(4, 8, 16, 64, torch.float32, dev)
    config = GRPOLossConfig(loss_type="dapo", entropy_coef=0.1, top_entropy_quantile=entropy_quantile)

    class Nonzero(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Nonzero.count += func.__name__.startswith("nonzero")
            return func(*args, **(kwargs or {}))

    for t in (hidden, weight, bias):
        t.requires_grad_(True)
    with Nonzero():
        fused_linear_grpo_loss(hidden, weight, ids, adv, mask, bias=bias, config=config, **extra).loss.backward()
    assert Nonzero.count == 1, Nonzero.count


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["chunked", "scratch", "tiles"])
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_syncs_only_while_checking_and_planning(strategy, masked, monkeypatch):
    """On CUDA, with the device's own record of synchronising calls (`torch.cuda.set_sync_debug_mode`): a training
    step of the fused loss waits for the device only in its input checks and its chunk plan (two or three times, few
    chunks or many), never in its chunks, its objective or its backward."""
    import warnings

    B, T, H, V = 4, 64, 32, 512
    hidden, weight, _, ids, adv, mask, extra = make_inputs(B, T, H, V, torch.bfloat16, "cuda")
    if not masked:
        mask = torch.ones_like(mask)
        extra = {k: v.where(v != 0, -1.0) for k, v in extra.items()}
    for t in (hidden, weight):
        t.requires_grad_(True)
    monkeypatch.setenv("GRPO_KERNELS_LINEAR", strategy)
    counts = []
    for tokens in (256, 16):
        token_chunks(monkeypatch, "cuda", tokens, V)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = fused_linear_grpo_loss(hidden, weight, ids, adv, mask, config=GRPOLossConfig(loss_type="dapo"),
                                             **extra)  # fmt: skip
                out.loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in seen))
        hidden.grad = weight.grad = None
    assert counts[0] == counts[1] <= 3, counts


@pytest.mark.bf16
@pytest.mark.parametrize("strategy", ["tiles", "scratch"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("mixed", [True, False])
def test_fp32_sums_take_16_bit_products_inside_the_product(strategy, masked, mixed, device, monkeypatch):
    """Where `addmm` adds bf16 products into fp32 sums (`fused_linear.mixed_sums`: CUDA, where this PyTorch accepts
    it, else skipped; on the CPU emulated, the Triton path in the interpreter): the tiles and scratch strategies' fp32
    d_hidden sums take each block of vocabulary columns in one such `addmm`, with no 16-bit product added to them
    afterwards; with `MIXED_SUMS` off, the other way round. Both match the reference."""
    seen = {"mixed": 0, "added": 0}  # addmm of 16-bit factors into fp32 sums; fp32 additions of 16-bit products
    if device == "cuda":
        if mixed and not fl.mixed_sums(torch.device("cuda"), torch.bfloat16, torch.float32):
            pytest.skip(f"torch {torch.__version__}'s addmm does not add bf16 products into fp32 sums")
    else:
        addmm = torch.addmm

        def emulated(acc, a, b, *args, out_dtype=None, out=None, **kwargs):
            if out_dtype is None:
                return addmm(acc, a, b, *args, out=out, **kwargs)
            assert out is acc and acc.dtype == out_dtype != a.dtype == b.dtype, (acc.dtype, out_dtype, a.dtype)
            seen["mixed"] += 1
            return acc.addmm_(a.to(out_dtype), b.to(out_dtype))

        monkeypatch.setattr(torch, "addmm", emulated)
        monkeypatch.setattr(fl, "mixed_sums", lambda dev, dtype, sums: sums == torch.float32 != dtype)
    monkeypatch.setattr(fl, "MIXED_SUMS", mixed)
    monkeypatch.setenv("GRPO_KERNELS_LINEAR", strategy)
    kind = "cuda" if device == "cuda" else "cpu"
    H, V = 32, 512
    monkeypatch.setitem(fl.CHUNK_BYTES, kind, 8 * 4 * V)  # several chunks, and blocks of columns in each
    monkeypatch.setitem(fl.MIN_CHUNK_TOKENS, kind, 1)
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(6, 8, H, V, torch.bfloat16, device)
    if not masked:
        mask = torch.ones_like(mask)
        extra = {k: v.where(v != 0, -1.0) for k, v in extra.items()}

    class Sums(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.__name__.startswith("addmm.dtype"):
                seen["mixed"] += 1
            elif func.__name__.startswith("add_") and args[0].dtype == torch.float32 and args[0].dim() == 2:
                seen["added"] += isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bfloat16
            return func(*args, **kwargs)

    config = GRPOLossConfig(loss_type="dapo", entropy_coef=0.1)
    with backend("triton"):
        with Sums():
            run(fused_linear_grpo_loss, hidden, weight, bias, ids, adv, mask, config=config, **extra)
        check_against_reference("triton-" + strategy, hidden, weight, bias, ids, adv, mask, config=config, **extra)
    assert (seen["mixed"] > 0, seen["added"] > 0) == (mixed, not mixed), seen


@pytest.mark.parametrize("impl", ["triton-chunked", "triton-vocab-blocks", "torch"], indirect=True)
@pytest.mark.parametrize(
    "options",
    [{"loss_type": "dapo"}, {"loss_type": "grpo", "beta": 0.1, "entropy_coef": 0.1},
     {"loss_type": "luspo", "importance_sampling_level": "sequence"}],
)  # fmt: skip
def test_chunks_read_nothing_back_from_the_device(impl, options, device, monkeypatch):
    """The chunked schedules plan their chunks with a fixed number of reads from the device and then run every chunk
    without one (on a GPU each read waits for the queued work, which leaves the GPU idle while Python queues the
    next chunk): few chunks or many, the same number of reads."""
    B, T, H, V = 4, 8, 16, 64
    dev = "cpu" if impl.startswith("torch") else device
    hidden, weight, bias, ids, adv, mask, extra = make_inputs(B, T, H, V, torch.float32, dev)
    config = GRPOLossConfig(**options)
    tolist = torch.Tensor.tolist
    reads = []
    whole_rows = options.get("importance_sampling_level") == "sequence"  # a chunk holds whole rows (T = 8)
    for tokens in (32, 8) if whole_rows else (16, 2):
        token_chunks(monkeypatch, dev, tokens, V)
        listed = {"n": 0}

        def counting_tolist(self, listed=listed):
            listed["n"] += 1
            return tolist(self)

        monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
        with _HostReads() as mode:
            run(fused_linear_grpo_loss, hidden, weight, bias, ids, adv, mask, config=config, **extra)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        reads.append(mode.count + listed["n"])
    assert reads[0] == reads[1], f"device reads with few chunks and with many: {reads}"
