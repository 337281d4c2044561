"""`torch.compile`: the public ops are custom ops with fake implementations and registered backwards, so a compiled
function that calls them compiles as one graph (`fullgraph=True` fails on any break) and gives the eager results."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from grpo_kernels import (
    GRPOLossConfig,
    LinearGRPOLoss,
    backend,
    fused_linear,
    fused_linear_grpo_loss,
    grpo_loss,
    library,
    linear_logprobs,
)

CONFIGS = [
    GRPOLossConfig(loss_type="grpo", beta=0.1, entropy_coef=0.05),
    GRPOLossConfig(loss_type="dapo", importance_sampling_level="sequence", top_entropy_quantile=0.5),
    GRPOLossConfig(loss_type="cispo", epsilon_high=2.0, off_policy_mask_threshold=0.1),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with backend("torch"):
        yield


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.loss_type)
def test_grpo_loss_compiles_without_graph_breaks(config):
    B, T, V = 3, 5, 40
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    mask = torch.rand(B, T) > 0.2
    ref = torch.randn(B, T) - 3

    def step(x):
        out = grpo_loss(x.tanh() * 4, ids, adv, mask, config=config, ref_logps=ref)
        return out.loss, out.metrics

    x = logits.clone().requires_grad_()
    loss, metrics = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    (grad,) = torch.autograd.grad(loss, x)
    y = logits.clone().requires_grad_()
    eager_loss, eager_metrics = step(y)
    (eager_grad,) = torch.autograd.grad(eager_loss, y)
    assert_close(loss, eager_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(grad, eager_grad, atol=1e-7, rtol=1e-5, name="grad")
    assert set(metrics) == set(eager_metrics)
    for k in metrics:
        assert_close(metrics[k], eager_metrics[k], atol=1e-6, rtol=1e-5, name=k)


@pytest.fixture
def constants_only(monkeypatch):
    """Functions marked `assume_constant_result` get every non-tensor argument as a Python constant, as PyTorch
    2.11's compiler requires (it cannot make a constant of a frozen dataclass; later releases pass such objects by
    identity)."""
    from torch._dynamo.variables import functions

    invoke = functions.invoke_and_store_as_constant

    def strict(tx, fn, name, args, kwargs):
        for x in [*args, *kwargs.values()]:
            if not x.is_tensor():
                x.as_python_constant()  # raises for anything that is not a constant
        return invoke(tx, fn, name, args, kwargs)

    monkeypatch.setattr(functions, "invoke_and_store_as_constant", strict)


@pytest.mark.parametrize("config", CONFIGS[:1], ids=lambda c: c.loss_type)
def test_compiles_where_constant_functions_take_constants_only(config, constants_only):
    test_grpo_loss_compiles_without_graph_breaks(config)
    torch._dynamo.reset()
    test_fused_linear_loss_compiles_with_the_model(config)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.loss_type)
def test_fused_linear_loss_compiles_with_the_model(config):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    B, P, T = 3, 2, 5
    input_ids = torch.randint(0, 64, (B, P + T))
    adv, mask, ref = torch.randn(B), torch.rand(B, T) > 0.2, torch.randn(B, T) - 4

    def step():
        hidden = model.model(input_ids).last_hidden_state[:, P - 1 : -1]
        return fused_linear_grpo_loss(hidden, model.lm_head.weight, input_ids[:, P:], adv, mask, config=config,
                                      ref_logps=ref).loss  # fmt: skip

    params = list(model.parameters())
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")()
    grads = torch.autograd.grad(loss, params)
    eager = step()
    eager_grads = torch.autograd.grad(eager, params)
    assert_close(loss, eager, atol=1e-6, rtol=1e-5, name="loss")
    for (name, _), g, e in zip(model.named_parameters(), grads, eager_grads, strict=True):
        assert_close(g, e, atol=1e-6, rtol=1e-4, name=name)


@pytest.mark.parametrize(("strategy", "grad_filter_eps"), [("chunked", None), ("chunked", 0.05), ("tiles", None)])
def test_linear_logprobs_compiles(strategy, grad_filter_eps, monkeypatch):
    hidden, weight = torch.randn(2, 4, 16), torch.randn(50, 16) * 1.5  # peaked: filtering at 0.05 leaves columns out
    ids = torch.randint(0, 50, (2, 4))
    monkeypatch.setenv("GRPO_KERNELS_LINEAR", strategy)
    monkeypatch.setenv("GRPO_KERNELS_CHUNK_MIB", str(3 * 50 * 4 / 2**20))  # 3-token chunks (tiles: 2 tokens)
    monkeypatch.setitem(fused_linear.MIN_CHUNK_TOKENS, "cpu", 1)

    def fn(h, w):
        return linear_logprobs(h, w, ids, return_entropy=True, grad_filter_eps=grad_filter_eps)

    results = []
    for f in (torch.compile(fn, fullgraph=True, backend="aot_eager"), fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logps, entropy = f(h, w)
        (logps.sum() + entropy.sum()).backward()
        results.append((logps, entropy, h.grad, w.grad))
    for name, a, b in zip(("logps", "entropy", "d_hidden", "d_weight"), *results, strict=True):
        assert_close(a, b, atol=1e-6, rtol=1e-5, name=name)
    assert (results[0][3] == 0).all(1).any() == (grad_filter_eps is not None)  # whole rows of d_weight left out


def test_custom_ops_pass_opcheck(device):
    """torch.library's own checks: schema, fake implementation, autograd registration."""
    logits, ids = torch.randn(2, 3, 20, dtype=torch.float64), torch.randint(0, 20, (2, 3))
    torch.library.opcheck(library.logprobs_entropy, (logits, ids, None, 0.8, 1.0, None, "torch"))
    hidden, weight = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
    some = torch.tensor([[True, False, True], [False, True, True]])
    for name, dev in (("torch", "cpu"), ("triton", device)):  # fp64 inputs: fp64 log-probs from either backend
        for mask in (None, some.to(dev), torch.ones(2, 3, dtype=torch.bool, device=dev)):  # the forward's positions
            args = (hidden.to(dev), weight.to(dev), None, ids.to(dev), mask, 1.0, 1.0, None, None, name)
            for strategy in ("chunked", "tiles", "vocab-blocks"):
                torch.library.opcheck(library.linear_logprobs_entropy, (*args, strategy, 1 << 10))
    logps, entropy = torch.randn(2, 3, dtype=torch.float64) - 2, torch.rand(2, 3, dtype=torch.float64)
    args = (logps, entropy, torch.randn(2, 1, dtype=torch.float64), torch.ones(2, 3, dtype=torch.bool), None, None,
            None, None, None, library.encode(GRPOLossConfig(loss_type="grpo")))  # fmt: skip
    torch.library.opcheck(library.objective, args)


def test_loss_compiles_with_dynamic_shapes():
    """`torch.compile(..., dynamic=True)` traces Python floats (the config's, the head's) and sizes as symbols: the
    loss module and `linear_logprobs` still compile as one graph each, and give the eager results at two sizes."""
    loss_fn = LinearGRPOLoss(GRPOLossConfig(beta=0.0, epsilon_high=0.28), logit_scale=0.5)

    def step(h, w, ids, adv):
        return loss_fn(h, w, ids, adv).loss + linear_logprobs(h, w, ids, temperature=0.7).sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for B, T in ((2, 3), (3, 5)):
        hidden, weight = torch.randn(B, T, 8), torch.randn(11, 8)
        ids, adv = torch.randint(0, 11, (B, T)), torch.randn(B)
        results = []
        for f in (compiled, step):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            loss = f(h, w, ids, adv)
            loss.backward()
            results.append((loss, h.grad, w.grad))
        for name, a, b in zip(("loss", "d_hidden", "d_weight"), *results, strict=True):
            assert_close(a, b, atol=1e-6, rtol=1e-5, name=f"{name} at {B}x{T}")


@pytest.mark.parametrize("mask_kind", ["some", "all"])
def test_compiled_linear_logprobs_finds_the_masks_tokens_once(mask_kind, monkeypatch):
    """The compiled op finds the mask's tokens (a wait for the device) in its forward only; its backward takes them
    from it, and gives eager's gradients, with some tokens masked out or none."""
    hidden, weight = torch.randn(3, 5, 16), torch.randn(40, 16)
    ids = torch.randint(0, 40, (3, 5))
    mask = torch.rand(3, 5) > 0.4 if mask_kind == "some" else torch.ones(3, 5, dtype=torch.bool)
    mask[0, 0], mask[-1, -1] = True, mask_kind == "all"
    calls = []
    find = fused_linear.active_positions
    monkeypatch.setattr(fused_linear, "active_positions", lambda m: calls.append(1) or find(m))

    def fn(h, w):
        logps, entropy = linear_logprobs(h, w, ids, return_entropy=True, mask=mask)
        return (logps * torch.arange(15.0).view(3, 5)).sum() + entropy.sum()

    results = []
    for f in (torch.compile(fn, fullgraph=True, backend="aot_eager"), fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        calls.clear()
        f(h, w).backward()
        assert len(calls) == 1
        results.append((h.grad, w.grad))
    for name, a, b in zip(("d_hidden", "d_weight"), *results, strict=True):
        assert_close(a, b, atol=1e-6, rtol=1e-5, name=name)
    assert (results[0][0][~mask] == 0).all()
