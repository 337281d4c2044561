"""`grpo_loss` from logits, end to end: both backends against the materialised reference (same dtype and fp64) and
against TRL 1.16 fed with TRL's own log-probs of the same logits."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, assert_none_rounded_to_zero, assert_within_pytorch_error, loss_and_grad
from trl.trainer.utils import entropy_from_logits
from trl.trainer.utils import selective_log_softmax as trl_selective_log_softmax

from grpo_kernels import GRPOLossConfig, backend, grpo_loss, reference
from grpo_kernels.config import LOSS_TYPES
from grpo_kernels.integrations.trl_reference import TRLLoss

BACKENDS = ["triton", "torch"]


def make_inputs(B, T, V, dtype, dev, adv_per_token=False):
    logits = (torch.randn(B, T, V) * 2).to(dtype).to(dev)
    ids = torch.randint(0, V, (B, T), device=dev)
    mask = torch.rand(B, T, device=dev) > 0.25
    mask[0] = False  # a fully masked row
    logps, _ = reference.logprobs_and_entropy(logits.double(), ids)
    extra = {
        "old_logps": (logps + torch.randn(B, T, device=dev, dtype=torch.float64) * 0.2).float(),
        "ref_logps": (logps + torch.randn(B, T, device=dev, dtype=torch.float64) * 0.3).float(),
    }
    adv = torch.randn(B, T, device=dev) if adv_per_token else torch.randn(B, device=dev)
    return logits, ids, adv, mask, extra


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.bf16)])
def test_loss_and_dlogits_match_reference(impl, loss_type, dtype, device):
    dev = device if impl == "triton" else "cpu"
    config = GRPOLossConfig(loss_type=loss_type, beta=0.05, entropy_coef=0.01, max_completion_length=6)
    logits, ids, adv, mask, extra = make_inputs(4, 6, 321, dtype, dev)
    with backend(impl):
        out, dx = loss_and_grad(grpo_loss, logits, ids, adv, mask, config=config, **extra)
    same, dx_same = loss_and_grad(reference.grpo_loss, logits, ids, adv, mask, config=config, upcast=False, **extra)
    exact, dx_exact = loss_and_grad(
        reference.grpo_loss, logits, ids, adv, mask, config=config, upcast_to=torch.float64, **extra
    )
    assert_within_pytorch_error(out.loss, same.loss, exact.loss, name="loss", input_dtype=dtype)
    assert_within_pytorch_error(dx, dx_same, dx_exact, name="dlogits")
    assert_within_pytorch_error(out.logps, same.logps, exact.logps, name="logps", input_dtype=dtype)
    assert dx.dtype == dtype and out.logps.dtype == torch.float32
    assert set(out.metrics) == set(exact.metrics)
    for k in out.metrics:
        assert_close(out.metrics[k], exact.metrics[k], atol=1e-5, rtol=1e-4, name=k)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize(
    "shape,options",
    [
        ((2, 1, 123), {"loss_type": "grpo"}),  # T = 1
        ((3, 4, 1000), {"loss_type": "bnpo", "importance_sampling_level": "sequence", "beta": 0.1}),
        ((2, 3, 32003), {"loss_type": "dapo", "top_entropy_quantile": 0.5, "entropy_coef": 0.1}),
        ((4, 5, 77), {"loss_type": "cispo", "epsilon_high": 1.1, "off_policy_mask_threshold": 0.01}),
        ((4, 5, 77), {"loss_type": "sapo", "temperature": 0.6}),
        ((4, 5, 77), {"loss_type": "vespo", "delta": 2.0}),
        ((4, 5, 77), {"loss_type": "luspo", "importance_sampling_level": "sequence", "delta": 1.3}),
    ],
)
def test_odd_shapes_and_options(impl, shape, options, device):
    dev = device if impl == "triton" else "cpu"
    config = GRPOLossConfig(max_completion_length=8, **options)
    logits, ids, adv, mask, extra = make_inputs(*shape, torch.float32, dev, adv_per_token=True)
    extra["importance_sampling_ratio"] = torch.rand(shape[0], 1, device=dev) + 0.5
    with backend(impl):
        out, dx = loss_and_grad(grpo_loss, logits, ids, adv, mask, config=config, **extra)
    same, dx_same = loss_and_grad(reference.grpo_loss, logits, ids, adv, mask, config=config, upcast=False, **extra)
    exact, dx_exact = loss_and_grad(
        reference.grpo_loss, logits, ids, adv, mask, config=config, upcast_to=torch.float64, **extra
    )
    assert_within_pytorch_error(out.loss, same.loss, exact.loss, name="loss")
    assert_within_pytorch_error(dx, dx_same, dx_exact, name="dlogits")
    assert_within_pytorch_error(out.entropy, same.entropy, exact.entropy, name="entropy")


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl_on_the_same_logits(impl, loss_type, device):
    """TRL computes the log-probs and entropies with its own utilities, then its own loss; we take the logits."""
    dev = device if impl == "triton" else "cpu"
    config = GRPOLossConfig(loss_type=loss_type, beta=0.04, temperature=0.9, entropy_coef=0.02)
    logits, ids, adv, mask, extra = make_inputs(4, 5, 97, torch.float32, dev)
    x = logits.detach().clone().double().requires_grad_()
    z = x / config.temperature
    trl_logps = trl_selective_log_softmax(z, ids)
    trl_entropy = entropy_from_logits(z)
    trl_extra = {k: v.double() for k, v in extra.items()}
    trl_loss, trl_metrics = TRLLoss(config, use_vllm=False)(trl_logps, trl_entropy, ids, adv.double(), mask.double(),
                                                            **trl_extra)  # fmt: skip
    (trl_dx,) = torch.autograd.grad(trl_loss, x)
    with backend(impl):
        out, dx = loss_and_grad(grpo_loss, logits, ids, adv, mask, config=config, **extra)
    assert_close(out.loss, trl_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(dx, trl_dx, atol=1e-7, rtol=1e-4, name="dlogits")
    for k, v in trl_metrics.items():
        if k != "entropy_coef":
            assert_close(out.metrics[k], torch.tensor(v), atol=1e-6, rtol=1e-5, name=k)


@pytest.mark.parametrize("impl", BACKENDS)
def test_deterministic(impl, device):
    dev = device if impl == "triton" else "cpu"
    config = GRPOLossConfig(loss_type="grpo", beta=0.1, entropy_coef=0.1)
    logits, ids, adv, mask, extra = make_inputs(3, 4, 500, torch.float32, dev)
    with backend(impl):
        a = loss_and_grad(grpo_loss, logits, ids, adv, mask, config=config, **extra)
        b = loss_and_grad(grpo_loss, logits, ids, adv, mask, config=config, **extra)
    assert torch.equal(a[0].loss, b[0].loss) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 0.37), (torch.float32, -2.5), (torch.float16, 2.0**16),
                                         (torch.float16, 1 / 3)])  # fmt: skip
def test_scaled_backward_rounds_the_gradient_once(impl, dtype, scale, device):
    """`(loss * s).backward()`, as gradient accumulation (1/3) and fp16 loss scaling (2**16) have it: the logits'
    gradient is within PyTorch's own error of the fp64 one at the same `s`, rounded once after the scaling (formed
    first and scaled after, an fp16 gradient loses the entries below its smallest subnormal). The loss and metrics
    equal the call's without gradient."""
    dev = device if impl == "triton" else "cpu"
    config = GRPOLossConfig(loss_type="dapo", beta=0.1, entropy_coef=0.05)
    logits, ids, adv, mask, extra = make_inputs(4, 16, 1000, dtype, dev)
    logits, extra["num_items_in_batch"] = logits * 3, 8192

    def scaled(fn, **kwargs):
        def loss(*args, **kw):
            out = fn(*args, **kw)
            return type(out)(loss=out.loss * scale, logps=out.logps, entropy=out.entropy, metrics=out.metrics)

        return loss_and_grad(loss, logits, ids, adv, mask, config=config, **kwargs, **extra)

    with backend(impl):
        with torch.no_grad():
            evaluated = grpo_loss(logits, ids, adv, mask, config=config, **extra)
        out, dx = scaled(grpo_loss)
    _, dx_same = scaled(reference.grpo_loss, upcast=False)
    _, dx_exact = scaled(reference.grpo_loss, upcast_to=torch.float64)
    assert torch.equal(out.loss, evaluated.loss * scale)
    assert out.metrics.keys() == evaluated.metrics.keys()
    for k, v in out.metrics.items():
        assert torch.equal(v, evaluated.metrics[k]), k
    assert_within_pytorch_error(dx, dx_same, dx_exact, name="dlogits")
    # the small entries, which the bound above (a few units in the last place of the largest) does not see
    assert_none_rounded_to_zero(dx, dx_exact, name="dlogits")


def test_metrics_keep_their_dtypes_and_positive_zero():
    """Each metric keeps its own dtype (an fp64 KL from fp64 reference log-probs, fp32 entropies from fp32 logits),
    and a clip ratio's extreme with nothing clipped is +0, not -0."""
    config = GRPOLossConfig(loss_type="dapo", beta=0.1)
    logits, ids, adv, mask, extra = make_inputs(3, 6, 11, torch.float32, "cpu")
    with backend("torch"):
        out = grpo_loss(logits, ids, adv, mask, config=config, ref_logps=extra["ref_logps"].double())
    assert out.metrics["kl"].dtype == torch.float64 and out.metrics["entropy"].dtype == torch.float32
    assert out.metrics["clip_ratio/low_mean"].dtype == torch.float32
    high = out.metrics["clip_ratio/high_max"]  # on-policy: every ratio is 1
    assert high.item() == 0.0 and math.copysign(1.0, high.item()) == 1.0


def test_no_autograd_graph_through_the_loss():
    """With the logits alone requiring grad, the loss's graph is the closed-form derivative's node and the sum that
    adds it: none of the objective's small ops. A second backward through it (`retain_graph`) gives the same gradient;
    per-token inputs that require grad get theirs through autograd, as before."""
    config = GRPOLossConfig(loss_type="grpo", beta=0.1, top_entropy_quantile=0.5, entropy_coef=0.1)
    logits, ids, adv, mask, extra = make_inputs(3, 5, 64, torch.float32, "cpu")
    x = logits.clone().requires_grad_()
    with backend("torch"):
        out = grpo_loss(x, ids, adv, mask, config=config, **extra)
    nodes, stack = [], [out.loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            nodes.append(type(node).__name__)
            stack += [n for n, _ in node.next_functions]
    assert sorted(nodes) == ["AccumulateGrad", "AddBackward0", "GRPOLossFunctionBackward"], nodes
    (g1,) = torch.autograd.grad(out.loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out.loss, x)
    assert torch.equal(g1, g2)
    ref = extra["ref_logps"].clone().requires_grad_()
    with backend("torch"):
        out = grpo_loss(x, ids, adv, mask, config=config, old_logps=extra["old_logps"], ref_logps=ref)
    g_x, g_ref = torch.autograd.grad(out.loss, (x, ref))
    assert_close(g_x, g1, atol=1e-6, rtol=1e-5, name="dlogits through autograd")
    ref64 = ref.detach().double().requires_grad_()
    expected = reference.grpo_loss(x.detach().double(), ids, adv, mask, config=config, old_logps=extra["old_logps"],
                                   ref_logps=ref64)  # fmt: skip
    (g_ref64,) = torch.autograd.grad(expected.loss, ref64)
    assert g_ref64.abs().sum() > 0
    assert_close(g_ref, g_ref64, atol=1e-6, rtol=1e-4, name="d ref_logps")


def test_no_logits_sized_temporaries_on_the_torch_path(monkeypatch):
    """Forward + backward allocate the gradient (one `[B, T, V]` tensor) and a few fp32 chunks, nothing else of that
    size: the peak of live bytes allocated inside the call, measured by the package's meter."""
    from grpo_kernels import cpu
    from grpo_kernels.memory import MemoryMeter

    monkeypatch.setattr(cpu, "CHUNK_ELEMENTS", 1 << 18)  # 1 MiB chunks against 8 MiB of logits
    B, T, V = 4, 64, 8192
    logits = torch.randn(B, T, V, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    config = GRPOLossConfig(loss_type="grpo", entropy_coef=0.1)
    with backend("torch"), MemoryMeter() as meter:
        grpo_loss(logits, ids, adv, config=config).loss.backward()
    grad_bytes = logits.numel() * logits.element_size()
    chunk_bytes = cpu.CHUNK_ELEMENTS * 4
    assert meter.peak_bytes <= grad_bytes + 3 * chunk_bytes + (1 << 20), (
        f"peak {meter.peak_bytes / 2**20:.1f} MiB vs gradient {grad_bytes / 2**20:.1f} MiB"
    )
    assert meter.peak_bytes < 2 * grad_bytes  # the materialising path holds several [B, T, V] fp32 tensors


TOKEN_LOCAL_OPTIONS = [
    {},
    {"beta": 0.1, "use_bias_correction_kl": False, "entropy_coef": 0.05},
    {"beta": 0.1, "use_bias_correction_kl": True, "importance_sampling_ratio": "token"},
    {"delta": 1.1, "epsilon_high": 0.28, "importance_sampling_ratio": "row", "num_items_in_batch": 37},
    {"epsilon": 0.0, "epsilon_high": 0.0},  # on-policy ratios sit on both clip bounds
]


@pytest.mark.parametrize(
    "options", TOKEN_LOCAL_OPTIONS, ids=["plain", "kl-entropy", "kl-bias-is", "delta-is-items", "no-clip-range"]
)
@pytest.mark.parametrize("old", [True, False], ids=["old", "on-policy"])
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "vespo"])
def test_token_grads_equal_autograd_through_the_objective(loss_type, old, options):
    """The fused linear loss's closed-form `dL/dlogp`, `dL/dentropy` (token by token, in the order of the active
    tokens) against autograd through the objective over the whole batch, in fp64: ratios inside and outside the clip
    range (ties of the clipped minimum included: on-policy every ratio is 1), masked tokens and an empty row."""
    from grpo_kernels.objective import LossInputs, LossPlan, TokenGrads, row_terms, token_local

    B, T = 5, 9
    options = dict(options)
    num_items = options.pop("num_items_in_batch", None)
    is_ratio = options.pop("importance_sampling_ratio", None)
    config = GRPOLossConfig(loss_type=loss_type, **options)
    assert token_local(config)
    mask = torch.rand(B, T) > 0.3
    mask[1] = False
    logps = (-torch.rand(B, T, dtype=torch.float64) * 4).requires_grad_(True)
    entropy = (torch.rand(B, T, dtype=torch.float64) * 3).requires_grad_(True)
    inputs = LossInputs(
        advantages=torch.randn(B, 1, dtype=torch.float64),
        mask=mask,
        old_logps=(logps.detach() + torch.randn(B, T, dtype=torch.float64) * 0.3) if old else None,
        ref_logps=logps.detach() + torch.randn(B, T, dtype=torch.float64) * 0.5,
        importance_sampling_ratio=None if is_ratio is None else torch.rand(B, T if is_ratio == "token" else 1) + 0.5,
    )
    plan = LossPlan.build(mask, config, None, num_items)
    loss, _ = row_terms(logps, entropy, inputs, config, plan, metrics=False)
    expected = torch.autograd.grad(loss, (logps, entropy), allow_unused=True)
    positions = mask.reshape(-1).nonzero().squeeze(1)
    grads = TokenGrads.build(inputs, config, plan, positions, torch.float64)
    got_lp, got_ent = [], []
    for sl in (slice(0, 7), slice(7, positions.numel())):  # two chunks
        g_lp, g_ent = grads(logps.detach().reshape(-1)[positions[sl]], sl)
        got_lp.append(g_lp)
        got_ent.append(g_ent)
    assert_close(torch.cat(got_lp), expected[0].reshape(-1)[positions], atol=1e-15, rtol=1e-12, name="dL/dlogp")
    if config.entropy_coef == 0.0:
        assert got_ent[0] is None
    else:
        assert_close(torch.cat(got_ent), expected[1].reshape(-1)[positions], atol=1e-15, rtol=1e-12, name="dL/dent")


@pytest.mark.parametrize(
    "options", TOKEN_LOCAL_OPTIONS, ids=["plain", "kl-entropy", "kl-bias-is", "delta-is-items", "no-clip-range"]
)
@pytest.mark.parametrize("old", [True, False], ids=["old", "on-policy"])
@pytest.mark.parametrize("adv_per_token", [False, True], ids=["adv-row", "adv-token"])
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "vespo"])
def test_objective_kernel_matches_the_objective(loss_type, adv_per_token, old, options, device):
    """The one-launch token-local objective (`ops/objective.py` + `objective.token_objective`): its loss, every
    metric, dL/dlogp and dL/dentropy against `row_terms` and `row_grads` in fp32 and in fp64, with masked tokens whose
    inputs are infinite, an empty row, and ratios inside, outside and (on-policy) on the clip bounds."""
    from grpo_kernels.objective import LossInputs, LossPlan, row_grads, row_terms, token_objective

    B, T = 6, 37
    options = dict(options)
    num_items = options.pop("num_items_in_batch", None)
    is_ratio = options.pop("importance_sampling_ratio", None)
    config = GRPOLossConfig(loss_type=loss_type, **options)
    mask = torch.rand(B, T) > 0.3
    mask[1] = False
    logps = -torch.rand(B, T, dtype=torch.float64) * 4
    entropy = torch.rand(B, T, dtype=torch.float64) * 3
    inputs = LossInputs(
        advantages=torch.randn(B, T if adv_per_token else 1, dtype=torch.float64),
        mask=mask,
        old_logps=(logps + torch.randn(B, T, dtype=torch.float64) * 0.3).masked_fill(~mask, -math.inf) if old else None,
        ref_logps=(logps + torch.randn(B, T, dtype=torch.float64) * 0.5).masked_fill(~mask, math.inf),
        importance_sampling_ratio=None if is_ratio is None else torch.rand(B, T if is_ratio == "token" else 1) + 0.5,
    )

    def on(dtype, dev):
        fields = {k: None if v is None else v.to(dev) if v.dtype == torch.bool else v.to(dev, dtype)
                  for k, v in vars(inputs).items()}  # fmt: skip
        return logps.to(dev, dtype), entropy.to(dev, dtype), LossInputs(**fields)

    results = {}
    for key, dtype, dev in (("exact", torch.float64, "cpu"), ("same", torch.float32, "cpu")):
        lp, ent, rows = on(dtype, dev)
        plan = LossPlan.build(rows.mask, config, ent, num_items)
        loss, metrics = row_terms(lp, ent, rows, config, plan)
        results[key] = (loss, metrics, *row_grads(lp, rows, config, plan, ent))
    lp, ent, rows = on(torch.float32, device)
    plan = LossPlan.build(rows.mask, config, ent, num_items)
    loss, metrics, g_lp, g_ent = token_objective(lp, ent, rows, config, plan)
    (e_loss, e_metrics, e_lp, e_ent), (s_loss, s_metrics, s_lp, s_ent) = results["exact"], results["same"]
    assert list(metrics) == list(e_metrics)
    assert loss.dtype == s_loss.dtype and all(metrics[k].dtype == s_metrics[k].dtype for k in metrics)
    assert_within_pytorch_error(loss, s_loss, e_loss, name="loss")
    for k in metrics:
        assert_within_pytorch_error(metrics[k], s_metrics[k], e_metrics[k], name=k)
    assert_within_pytorch_error(g_lp, s_lp, e_lp, name="dL/dlogp")
    assert (g_ent is None) == (e_ent is None)
    if g_ent is not None:
        assert_within_pytorch_error(g_ent, s_ent, e_ent, name="dL/dentropy")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "sapo"])
def test_objective_kernel_edge_inputs(loss_type, device):
    """`num_items_in_batch` as a one-element `[1]` tensor (a scalar weight for every row, not a row's) and an infinite
    importance-sampling ratio at an active token (validation lets it through): the kernel's dL/dlogp is the same
    number (or the same infinity) as `row_grads`' at every token, and its loss as `row_terms`'."""
    from grpo_kernels.objective import LossInputs, LossPlan, row_grads, row_terms, token_objective

    B, T = 4, 9
    config = GRPOLossConfig(loss_type=loss_type)
    mask = torch.rand(B, T) > 0.2
    mask[:, 0] = True
    logps = -torch.rand(B, T) * 4
    entropy = torch.rand(B, T) * 3
    ratio = torch.rand(B, T) + 0.5
    ratio[2, 0] = math.inf
    inputs = LossInputs(advantages=torch.randn(B, 1), mask=mask, old_logps=logps + torch.randn(B, T) * 0.3,
                        importance_sampling_ratio=ratio)  # fmt: skip
    num_items = torch.tensor([29.0])
    on = {k: None if v is None else v.to(device) for k, v in vars(inputs).items()}
    plan = LossPlan.build(mask.to(device), config, entropy.to(device), num_items.to(device))
    loss, _, grad, _ = token_objective(logps.to(device), entropy.to(device), LossInputs(**on), config, plan)
    plan = LossPlan.build(mask, config, entropy, num_items)
    want_loss, _ = row_terms(logps, entropy, inputs, config, plan, metrics=False)
    want, _ = row_grads(logps, inputs, config, plan, entropy)
    grad = grad.cpu()
    assert torch.equal(grad.isnan(), want.isnan()) and torch.equal(grad.isinf(), want.isinf())
    assert torch.equal(grad[grad.isinf()], want[want.isinf()])
    finite = want.isfinite()
    assert_close(grad[finite], want[finite], atol=1e-7, rtol=1e-5, name="dL/dlogp")
    assert (loss.isfinite() == want_loss.isfinite()) and (not loss.isfinite() or torch.isclose(loss.cpu(), want_loss))


def test_objective_kernel_leaves_wide_inputs_to_pytorch():
    """fp64 per-token inputs (which PyTorch's objective computes in fp64), losses that are not token-local and rows of
    one token (TRL's metrics then read padding) are not the kernel's: `fused_objective_applies` says so and
    `token_objective` refuses them by name."""
    from grpo_kernels.objective import LossInputs, LossPlan, fused_objective_applies, token_objective

    mask = torch.ones(2, 3, dtype=torch.bool)
    logps = -torch.rand(2, 3)
    fp32 = LossInputs(advantages=torch.randn(2, 1), mask=mask)
    fp64 = LossInputs(advantages=torch.randn(2, 1, dtype=torch.float64), mask=mask)
    seq = GRPOLossConfig(importance_sampling_level="sequence")
    assert fused_objective_applies(logps, fp32, GRPOLossConfig())
    assert not fused_objective_applies(logps, fp64, GRPOLossConfig())
    assert not fused_objective_applies(logps, fp32, seq)
    assert not fused_objective_applies(logps.double(), fp32, GRPOLossConfig())
    one_token = LossInputs(advantages=torch.randn(2, 1), mask=mask[:, :1])
    assert not fused_objective_applies(logps[:, :1], one_token, GRPOLossConfig())
    with pytest.raises(ValueError, match="token_objective needs a token-local loss on fp32 log-probs"):
        token_objective(logps, logps, fp32, seq, LossPlan.build(mask, seq))


ROW_OPTIONS = [
    {"importance_sampling_level": "sequence"},
    {"importance_sampling_level": "sequence", "beta": 0.1, "entropy_coef": 0.05, "importance_sampling_ratio": "row"},
    {"importance_sampling_level": "sequence", "beta": 0.1, "use_bias_correction_kl": False, "delta": 1.05},
    {"off_policy_mask_threshold": 0.02, "beta": 0.1, "importance_sampling_ratio": "token", "sampling_logps": True},
    {"importance_sampling_level": "sequence", "off_policy_mask_threshold": 0.02, "epsilon": 0.0, "epsilon_high": 0.0},
    {"beta": 0.1, "entropy_coef": 0.05, "num_items_in_batch": 37},  # token-local: row_grads takes those too
    {"top_entropy_quantile": 0.4, "beta": 0.1, "entropy_coef": 0.05},  # the entropy mask, from the batch's plan
    {"top_entropy_quantile": 0.7, "importance_sampling_level": "sequence", "importance_sampling_ratio": "token"},
]


@pytest.mark.parametrize("options", ROW_OPTIONS, ids=["seq", "seq-kl-is", "seq-kl-delta", "offpolicy", "seq-offpolicy",
                                                      "token", "entropy-mask", "seq-entropy-mask"])  # fmt: skip
@pytest.mark.parametrize("old", [True, False], ids=["old", "on-policy"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_row_grads_equal_autograd_through_the_objective(loss_type, old, options):
    """The closed-form `dL/dlogp`, `dL/dentropy` of whole rows (sequence-level ratios, the off-policy mask, VESPO)
    against autograd through the objective, in fp64, the rows split into two chunks with the batch's plan; per-token
    advantages, masked tokens and an empty row."""
    from grpo_kernels.objective import LossInputs, LossPlan, row_grads, row_terms

    B, T = 6, 9
    options = dict(options)
    num_items = options.pop("num_items_in_batch", None)
    is_ratio = options.pop("importance_sampling_ratio", None)
    sampling = options.pop("sampling_logps", False)
    config = GRPOLossConfig(loss_type=loss_type, **options)
    mask = torch.rand(B, T) > 0.3
    mask[1] = False
    logps = (-torch.rand(B, T, dtype=torch.float64) * 4).requires_grad_(True)
    entropy = (torch.rand(B, T, dtype=torch.float64) * 3).requires_grad_(True)
    lp = logps.detach()
    inputs = LossInputs(
        advantages=torch.randn(B, T, dtype=torch.float64),
        mask=mask,
        old_logps=(lp + torch.randn(B, T, dtype=torch.float64) * 0.2) if old else None,
        ref_logps=lp + torch.randn(B, T, dtype=torch.float64) * 0.5,
        importance_sampling_ratio=None if is_ratio is None else torch.rand(B, T if is_ratio == "token" else 1) + 0.5,
        sampling_logps=(lp + torch.randn(B, T, dtype=torch.float64) * 0.2) if sampling else None,
    )
    plan = LossPlan.build(mask, config, entropy, num_items)
    if config.top_entropy_quantile < 1.0:  # a mask that keeps some active tokens and drops others
        kept = mask & (entropy.detach() >= plan.entropy_threshold)
        assert 0 < kept.sum() < mask.sum()
    loss, _ = row_terms(logps, entropy, inputs, config, plan, metrics=False)
    expected = torch.autograd.grad(loss, (logps, entropy), allow_unused=True)
    ent = entropy.detach()
    got = [row_grads(lp[rows], inputs.rows(rows), config, plan, ent[rows]) for rows in (slice(0, 2), slice(2, B))]
    assert_close(torch.cat([g[0] for g in got]), expected[0], atol=1e-15, rtol=1e-12, name="dL/dlogp")
    if config.top_entropy_quantile < 1.0:
        with pytest.raises(ValueError, match="needs the rows' entropy for the entropy mask"):
            row_grads(lp, inputs, config, plan)
    if config.entropy_coef == 0.0:
        assert got[0][1] is None
    else:
        assert_close(torch.cat([g[1] for g in got]), expected[1], atol=1e-15, rtol=1e-12, name="dL/dentropy")


@pytest.mark.parametrize(
    "options,kernels",
    [
        ({"loss_type": "dapo"}, ["logprobs_fwd", "objective", "logprobs_bwd"]),
        ({"loss_type": "grpo", "beta": 0.1, "entropy_coef": 0.05}, ["logprobs_fwd", "objective", "logprobs_bwd"]),
        ({"loss_type": "vespo"}, ["logprobs_fwd", "logprobs_bwd"]),  # not token-local: PyTorch's objective
    ],
    ids=["dapo", "grpo-kl-entropy", "vespo"],
)
def test_loss_from_logits_kernel_launches(options, kernels, device, monkeypatch):
    """With Triton, a token-local loss from logits launches three kernels for its forward and backward (the log-probs,
    the objective with its gradient, the logits' gradient) and two without grad, the same loss either way: the one-
    launch objective is the path taken, not a fallback to PyTorch's ops."""
    from grpo_kernels.ops import logprobs, objective

    kernel_type = type(objective._objective_kernel)
    launched = []
    run = kernel_type.run

    def counted(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_type, "run", counted)
    assert type(logprobs._logprobs_fwd_kernel) is kernel_type
    config = GRPOLossConfig(max_completion_length=9, **options)
    logits, ids, adv, mask, extra = make_inputs(3, 9, 50, torch.float32, device)
    logits.requires_grad_()
    with backend("triton"):
        out = grpo_loss(logits, ids, adv, mask, config=config, **extra)
        out.loss.backward()
        assert launched == [f"_{k}_kernel" for k in kernels]
        launched.clear()
        with torch.no_grad():
            again = grpo_loss(logits, ids, adv, mask, config=config, **extra)
        assert launched == [f"_{k}_kernel" for k in kernels if k != "logprobs_bwd"]
    assert torch.equal(again.loss, out.loss.detach())
