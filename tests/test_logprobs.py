"""The log-prob/entropy op (`LogProbEntropyFunction`) on both backends against PyTorch at the same dtype and an
upcast fp64 reference: values and gradients, odd vocabularies, T = 1, masked rows, strided views, -inf logits."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_within_pytorch_error

from grpo_kernels import backend, reference, selective_log_softmax
from grpo_kernels.config import HeadOptions
from grpo_kernels.functional import LogProbEntropyFunction

BACKENDS = ["triton", "torch"]


def _dtypes():
    return [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.bf16)]


def run_op(logits, ids, mask, temperature, grads, logit_scale=1.0, softcap=None):
    x = logits.detach().clone().requires_grad_()
    logp, entropy = LogProbEntropyFunction.apply(x, ids, mask, HeadOptions(temperature, logit_scale, softcap))
    (dx,) = torch.autograd.grad((logp * grads[0]).sum() + (entropy * grads[1]).sum(), x)
    return logp, entropy, dx


def run_reference(logits, ids, mask, temperature, grads, upcast_to=None, logit_scale=1.0, softcap=None):
    x = logits.detach().clone()
    x = (x if upcast_to is None else x.to(upcast_to)).requires_grad_()
    z = reference.scale_and_cap(x, logit_scale, softcap)
    logp, entropy = reference.logprobs_and_entropy(z, ids, temperature, upcast=False)
    if mask is not None:
        logp, entropy = logp * mask, entropy * mask
    (dx,) = torch.autograd.grad((logp * grads[0]).sum() + (entropy * grads[1]).sum(), x)
    return logp, entropy, dx


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("shape", [(2, 1, 123), (3, 5, 1000), (2, 3, 32003), (1, 4, 1), (2, 2, 7)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients(impl, dtype, shape, temperature, device):
    dev = device if impl == "triton" else "cpu"
    B, T, V = shape
    logits = (torch.randn(B, T, V) * 3).to(dtype).to(dev)
    ids = torch.randint(0, V, (B, T), device=dev)
    mask = torch.rand(B, T, device=dev) > 0.3
    grads = (torch.randn(B, T, device=dev), torch.randn(B, T, device=dev))
    with backend(impl):
        got = run_op(logits, ids, mask, temperature, grads)
    same = run_reference(logits, ids, mask.to(dtype), temperature, (grads[0].to(dtype), grads[1].to(dtype)))
    exact = run_reference(
        logits, ids, mask.double(), temperature, (grads[0].double(), grads[1].double()), torch.float64
    )
    for name, a, s, u in zip(("logp", "entropy", "dlogits"), got, same, exact, strict=True):
        assert_within_pytorch_error(a, s, u, name=f"{impl} {name}")
    assert got[2].dtype == dtype


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("logit_scale,softcap", [(0.5, None), (1.0, 3.0), (2.0, 10.0)])
def test_logit_scale_and_softcap(impl, logit_scale, softcap, device):
    dev = device if impl == "triton" else "cpu"
    logits = torch.randn(3, 4, 517, device=dev) * 5
    ids = torch.randint(0, 517, (3, 4), device=dev)
    grads = (torch.randn(3, 4, device=dev), torch.randn(3, 4, device=dev))
    options = {"logit_scale": logit_scale, "softcap": softcap}
    with backend(impl):
        got = run_op(logits, ids, None, 0.8, grads, **options)
    same = run_reference(logits, ids, None, 0.8, grads, **options)
    exact = run_reference(logits, ids, None, 0.8, (grads[0].double(), grads[1].double()), torch.float64, **options)
    for name, a, s, u in zip(("logp", "entropy", "dlogits"), got, same, exact, strict=True):
        assert_within_pytorch_error(a, s, u, name=f"{impl} {name}")


@pytest.mark.parametrize("impl", BACKENDS)
def test_masked_rows_are_zero_and_not_read(impl, device):
    dev = device if impl == "triton" else "cpu"
    logits = torch.randn(3, 4, 50, device=dev)
    mask = torch.ones(3, 4, dtype=torch.bool, device=dev)
    mask[1] = False
    logits[1] = float("nan")  # a masked row is never read: NaN there must not leak anywhere
    ids = torch.randint(0, 50, (3, 4), device=dev)
    with backend(impl):
        logp, entropy, dx = run_op(logits, ids, mask, 1.0, (torch.ones(3, 4, device=dev),) * 2)
    assert torch.all(logp[1] == 0) and torch.all(entropy[1] == 0) and torch.all(dx[1] == 0)
    assert torch.isfinite(logp).all() and torch.isfinite(dx).all()


@pytest.mark.parametrize("impl", BACKENDS)
def test_strided_view_is_read_in_place(impl, device):
    """`logits[:, :-1]` (the usual shift) is a non-contiguous view; the result equals the contiguous one."""
    dev = device if impl == "triton" else "cpu"
    full = torch.randn(3, 6, 77, device=dev)
    view = full[:, :-1]
    ids = torch.randint(0, 77, (3, 5), device=dev)
    grads = (torch.randn(3, 5, device=dev), torch.randn(3, 5, device=dev))
    with backend(impl):
        a = run_op(view, ids, None, 1.0, grads)
        b = run_op(view.contiguous(), ids, None, 1.0, grads)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("impl", BACKENDS)
def test_minus_infinity_logits(impl, device):
    """Vocabulary entries masked with -inf have probability 0 and contribute nothing, not NaN."""
    dev = device if impl == "triton" else "cpu"
    logits = torch.randn(2, 3, 40, device=dev)
    logits[..., 30:] = float("-inf")
    ids = torch.randint(0, 30, (2, 3), device=dev)
    grads = (torch.randn(2, 3, device=dev), torch.randn(2, 3, device=dev))
    with backend(impl):
        got = run_op(logits, ids, None, 1.0, grads)
    finite = run_reference(logits[..., :30].double(), ids, None, 1.0, (grads[0].double(), grads[1].double()))
    assert torch.allclose(got[0].double(), finite[0], atol=1e-5)
    assert torch.allclose(got[1].double(), finite[1], atol=1e-5)
    assert torch.all(got[2][..., 30:] == 0)
    assert torch.allclose(got[2][..., :30].double(), finite[2], atol=1e-5)


@pytest.mark.parametrize("impl", BACKENDS)
def test_selective_log_softmax_any_leading_shape(impl, device):
    dev = device if impl == "triton" else "cpu"
    logits = torch.randn(2, 3, 4, 33, device=dev)
    ids = torch.randint(0, 33, (2, 3, 4), device=dev)
    with backend(impl):
        got = selective_log_softmax(logits, ids, temperature=0.9)
    expected = reference.selective_log_softmax(logits.double(), ids, 0.9)
    assert got.shape == ids.shape and got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=1e-5)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", _dtypes())
def test_block_stats_fold_blocks_into_whole_rows(impl, dtype, device):
    """`block_stats` (the tiles strategy's forward), folding uneven blocks of columns in order, gives each row's
    log-prob and entropy as one pass over the whole row does, and the row max and log-sum that make its
    log-sum-exp; the target may sit in any block, and a row's first blocks may be all -inf."""
    from grpo_kernels import cpu
    from grpo_kernels.ops import logprobs as triton_ops

    dev = device if impl == "triton" else "cpu"
    ops = triton_ops if impl == "triton" else cpu
    n, V, edges = 6, 1000, [0, 7, 300, 301, 1000]
    logits = (torch.randn(n, V) * 3).to(dtype).to(dev)
    logits[0, :301] = float("-inf")  # row 0: its first three blocks hold nothing
    ids = torch.tensor([999, 3, 150, 300, 700, 0], device=dev)
    head = (0.7, 2.0, 10.0)  # temperature, logit scale, soft-cap
    state = torch.empty(4, n, dtype=torch.float32, device=dev)
    for start, stop in itertools.pairwise(edges):
        z = logits[:, start:stop].clone()
        z = z if impl == "triton" else z.float()  # the CPU path's logits are fp32
        ops.block_stats(z, ids, start, state, start == 0, stop == V, *head)
    grads = (torch.zeros(n, device=dev), torch.zeros(n, device=dev))
    args = (None, head[0], grads)
    same = run_reference(logits[None], ids[None], *args, logit_scale=head[1], softcap=head[2])
    exact = run_reference(logits[None], ids[None], *args, torch.float64, logit_scale=head[1], softcap=head[2])
    for name, a, s, u in zip(("logp", "entropy"), state[:2], same, exact, strict=False):
        assert_within_pytorch_error(a, s[0], u[0], name=f"{impl} {name}", input_dtype=dtype)
    z = reference.scale_and_cap(logits.double(), head[1], head[2]) / head[0]
    assert torch.allclose(state[2].double(), z.amax(-1), atol=0, rtol=1e-6)  # the row max, in fp32 math
    assert torch.allclose(state[2].double() + state[3].double(), torch.logsumexp(z, -1), atol=1e-5, rtol=0)
