"""`torch.compile`: the public ops are custom ops with fake implementations and registered backwards, so a compiled
function that calls them compiles as one graph (`fullgraph=True` fails on any break) and gives the eager results."""

from __future__ import annotations

import shutil

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


def _counting(monkeypatch, name: str) -> list[int]:
    calls: list[int] = []
    fn = getattr(fused_linear, name)
    monkeypatch.setattr(fused_linear, name, lambda *a, **k: calls.append(1) or fn(*a, **k))
    return calls


SINGLE_PASS = {
    "token": GRPOLossConfig(loss_type="grpo", beta=0.1, entropy_coef=0.05),
    "rows": GRPOLossConfig(loss_type="cispo", importance_sampling_level="sequence", off_policy_mask_threshold=0.1),
    "long-rows": GRPOLossConfig(loss_type="vespo", beta=0.05),
}


@pytest.mark.parametrize("case", list(SINGLE_PASS))
def test_compiled_fused_linear_loss_takes_the_single_pass(case, monkeypatch):
    """Compiled, the fused linear loss forms its gradients in the forward as in eager mode (three products, not the
    two passes' four), and its backward multiplies them by the incoming gradient: the loss, metrics, log-probs and
    the gradients of hidden, weight and bias are eager's, in chunks of 4 tokens. A sequence-level loss whose
    sequences do not fit a chunk ("long-rows") takes two passes, both in the forward."""
    config = SINGLE_PASS[case]
    B, T, H, V = 3, 6 if case == "long-rows" else 3, 8, 30
    monkeypatch.setenv("GRPO_KERNELS_CHUNK_MIB", str(4 * V * 4 / 2**20))
    monkeypatch.setitem(fused_linear.MIN_CHUNK_TOKENS, "cpu", 1)
    hidden, weight, bias = torch.randn(B, T, H), torch.randn(V, H), torch.randn(V)
    ids, adv = torch.randint(0, V, (B, T)), torch.randn(B)
    mask = torch.rand(B, T) > 0.3
    mask[:, 0] = True
    old, ref = torch.randn(B, T) - 3, torch.randn(B, T) - 3
    one_pass, backward = _counting(monkeypatch, "single_pass"), _counting(monkeypatch, "linear_backward")

    def step(h, w, b):
        out = fused_linear_grpo_loss(h, w, ids, adv, mask, bias=b, config=config, old_logps=old, ref_logps=ref)
        return out.loss * 3.0, out

    results = []
    for f in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        loss, out = f(h, w, b)
        assert not any(t.requires_grad for t in (out.logps, out.entropy, *out.metrics.values()))  # as in eager mode
        loss.backward()
        results.append((loss, out.logps, out.entropy, h.grad, w.grad, b.grad, out.metrics))
    # compiled: one single pass (or two passes in the forward); eager: the same
    assert len(one_pass) == (0 if case == "long-rows" else 2)
    assert len(backward) == (2 if case == "long-rows" else 0)
    names = ("loss", "logps", "entropy", "d_hidden", "d_weight", "d_bias")
    for name, a, b in zip(names, *(r[:6] for r in results), strict=True):
        assert_close(a, b, atol=1e-6, rtol=1e-5, name=name)
    assert set(results[0][6]) == set(results[1][6])
    for k in results[1][6]:
        assert_close(results[0][6][k], results[1][6][k], atol=1e-6, rtol=1e-5, name=k)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_single_pass_hands_its_gradients_over(compiler, monkeypatch):
    """Under inductor the compiled loss hands over the gradients it formed in its forward in place, not copied
    (d_weight's storage becomes weight.grad); with `retain_graph=True` a second backward adds the same gradients
    again, or PyTorch refuses to retain the graph: never gradients scaled twice. Without autograd the compiled loss
    forms no gradients and gives eager's loss."""
    if compiler == "inductor" and not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("inductor needs a C++ compiler on the CPU")
    hidden, weight = torch.randn(2, 3, 8), torch.randn(20, 8)
    ids, adv = torch.randint(0, 20, (2, 3)), torch.randn(2)
    formed = []
    finish = fused_linear._Head.finish_grads
    monkeypatch.setattr(fused_linear._Head, "finish_grads", lambda lm, *a: formed.append(out := finish(lm, *a)) or out)
    step = torch.compile(lambda h, w: fused_linear_grpo_loss(h, w, ids, adv).loss * 2.0, fullgraph=True,
                         backend=compiler)  # fmt: skip
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    step(h, w).backward()
    assert (w.grad.data_ptr() == formed[0][1].data_ptr()) == (compiler == "inductor")
    h_e, w_e = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (fused_linear_grpo_loss(h_e, w_e, ids, adv).loss * 2.0).backward()
    assert_close(w.grad, w_e.grad, atol=1e-6, rtol=1e-5, name="d_weight")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = step(h, w)
    try:  # PyTorch may refuse to retain a graph whose backward owns its saved tensors
        loss.backward(retain_graph=True)
        loss.backward()
    except RuntimeError as e:
        assert "retain_graph=False" in str(e)
    else:
        assert_close(w.grad, 2 * w_e.grad, atol=1e-6, rtol=1e-5, name="d_weight after two backwards")
        assert_close(h.grad, 2 * h_e.grad, atol=1e-6, rtol=1e-5, name="d_hidden after two backwards")
    starts = _counting(monkeypatch, "single_pass")
    before = len(formed)
    with torch.no_grad():
        loss = step(h, w)
        assert len(starts) == 1 and len(formed) == before  # no gradients formed
        assert_close(loss, 2.0 * fused_linear_grpo_loss(hidden, weight, ids, adv).loss, atol=1e-7, rtol=1e-6,
                     name="loss")  # fmt: skip


def test_custom_single_pass_passes_opcheck():
    """torch.library's checks of the single pass's op, with and without a mask, with and without a bias."""
    B, T, H, V = 2, 3, 8, 20
    hidden, weight = torch.randn(B, T, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    ids, adv = torch.randint(0, V, (B, T)), torch.randn(B, 1, dtype=torch.float64)
    ref = torch.randn(B, T, dtype=torch.float64) - 3
    options = library.encode(GRPOLossConfig(beta=0.1))
    some = torch.tensor([[True, False, True], [True, True, True]])
    for mask, bias in ((None, None), (some, torch.randn(V, dtype=torch.float64))):
        args = (hidden, weight, bias, ids, mask, adv, None, ref, None, None, None, options, 1.0, 1.0, None, None,
                "torch", "chunked", 1 << 10, True, True, bias is not None)  # fmt: skip
        torch.library.opcheck(library.fused_linear_grpo, args)


@pytest.mark.parametrize("compiled", [False, True])
def test_gradients_reach_the_per_token_inputs(compiled):
    """The loss is differentiable in advantages, old_logps, ref_logps and the importance-sampling ratio, as TRL's
    is: from logits and from hidden states, eager and compiled, their gradients are the reference's (the fused linear
    loss then takes two passes and autograd through the objective: its single pass forms the head's gradients only).
    """
    from grpo_kernels import reference

    torch.manual_seed(0)
    B, T, H, V = 2, 3, 8, 20
    f64 = {"dtype": torch.float64}
    hidden, weight = torch.randn(B, T, H, **f64), torch.randn(V, H, **f64)
    ids, mask = torch.randint(0, V, (B, T)), torch.tensor([[True, True, False], [True, True, True]])
    per_token = {
        "advantages": torch.randn(B, **f64),
        "old_logps": torch.randn(B, T, **f64) * 0.1 - 3,
        "ref_logps": torch.randn(B, T, **f64) - 3,
        "importance_sampling_ratio": torch.rand(B, T, **f64) + 0.5,
    }
    config = GRPOLossConfig(loss_type="dapo", beta=0.1)

    def linear(fn, h, w, x):
        return fn(h, w, ids, x["advantages"], mask, config=config, old_logps=x["old_logps"], ref_logps=x["ref_logps"],
                  importance_sampling_ratio=x["importance_sampling_ratio"]).loss  # fmt: skip

    def logits(fn, h, w, x):
        return fn(h @ w.T, ids, x["advantages"], mask, config=config, old_logps=x["old_logps"],
                  ref_logps=x["ref_logps"], importance_sampling_ratio=x["importance_sampling_ratio"]).loss  # fmt: skip

    for name, step, ref_fn, fn in (("linear", linear, reference.linear_grpo_loss, fused_linear_grpo_loss),
                                   ("logits", logits, reference.grpo_loss, grpo_loss)):  # fmt: skip
        results = []
        for f in (fn, ref_fn):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            x = {k: v.clone().requires_grad_() for k, v in per_token.items()}
            call = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled and f is fn else step
            loss = call(f, h, w, x)
            results.append(torch.autograd.grad(loss, [h, w, *x.values()]))
        for k, a, b in zip(["hidden", "weight", *per_token], *results, strict=True):
            assert_close(a, b, atol=1e-12, rtol=1e-10, name=f"{name}: d {k}")
        torch._dynamo.reset()
