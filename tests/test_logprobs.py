"""The log-prob/entropy op (`LogProbEntropyFunction`) on both backends against PyTorch at the same dtype and an
upcast fp64 reference: values and gradients, odd vocabularies, T = 1, masked rows, strided views, -inf logits."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_close, assert_within_pytorch_error

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
@pytest.mark.parametrize("layout", ["every other id", "the last id of wider rows"])
def test_strided_ids_and_mask(impl, layout, device):
    """Token ids and a mask that are views whose flattening is still a view (rows of ids[:, ::2]; T = 1 completions
    sliced from the prompt + completion ids) give the values of their contiguous copies."""
    dev = device if impl == "triton" else "cpu"
    B, T, step = (3, 4, 2) if layout == "every other id" else (3, 1, 6)
    wide_ids = torch.randint(0, 77, (B, T * step), device=dev)
    wide_mask = torch.rand(B, T * step, device=dev) > 0.3
    pick = (slice(None), slice(None, None, step)) if layout == "every other id" else (slice(None), slice(-1, None))
    ids, mask = wide_ids[pick], wide_mask[pick]
    assert not ids.is_contiguous() and ids.reshape(-1).stride() == (step,)
    logits = torch.randn(B, T, 77, device=dev)
    grads = (torch.randn(B, T, device=dev), torch.randn(B, T, device=dev))
    with backend(impl):
        a = run_op(logits, ids, mask, 1.0, grads)
        b = run_op(logits, ids.contiguous(), mask.contiguous(), 1.0, grads)
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


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("V", [64, 100])
@pytest.mark.parametrize("head", [(1.0, 1.0, None), (0.7, 2.0, None), (0.8, 1.0, 5.0)])
def test_rows_of_many_blocks(dtype, V, head, device, monkeypatch):
    """The Triton kernels stream a row in blocks of columns: whole blocks unmasked, then a masked tail. With 16-column
    blocks (on a GPU a row of 131,072 has 32 of 4,096), rows whose max sits in the last block (the running sums
    rescaled at every block), in the first, or anywhere, give the values and gradients of one pass over the row: a
    multiple of the block (64) and a tail of 4 (100); temperature, logit scale and soft-cap."""
    from grpo_kernels.ops import logprobs as triton_ops

    monkeypatch.setattr(triton_ops, "row_block", lambda n: 16)
    temperature, logit_scale, softcap = head
    B, T = 2, 4
    logits = torch.randn(B, T, V) * 3
    logits[0, 0] = torch.linspace(-8, 8, V)  # increasing: a new max in every block
    logits[0, 1] = torch.linspace(8, -8, V)  # decreasing: the max in the first
    logits[1, 0, V - 1] = 12.0  # a lone max in the last column
    logits = logits.to(dtype).to(device)
    ids = torch.randint(0, V, (B, T), device=device)
    ids[0, 0], ids[1, 1] = V - 1, 0
    grads = (torch.randn(B, T, device=device), torch.randn(B, T, device=device))
    options = {"logit_scale": logit_scale, "softcap": softcap}
    with backend("triton"):
        got = run_op(logits, ids, None, temperature, grads, **options)
    same = run_reference(logits, ids, None, temperature, (grads[0].to(dtype), grads[1].to(dtype)), **options)
    exact = run_reference(logits, ids, None, temperature, (grads[0].double(), grads[1].double()), torch.float64,
                          **options)  # fmt: skip
    for name, a, s, u in zip(("logp", "entropy", "dlogits"), got, same, exact, strict=True):
        assert_within_pytorch_error(a, s, u, name=name, input_dtype=dtype)


@pytest.mark.parametrize("dtype", _dtypes())
def test_minus_infinity_in_whole_blocks(dtype, device, monkeypatch):
    """-inf logits in the unmasked blocks: a row whose first blocks are all -inf, -inf scattered through whole blocks
    and the tail. They get probability 0 and gradient 0; the rest match the row without them."""
    from grpo_kernels.ops import logprobs as triton_ops

    monkeypatch.setattr(triton_ops, "row_block", lambda n: 16)
    V = 100
    logits = torch.randn(3, V) * 3
    logits[0, :48] = float("-inf")  # its first three blocks
    logits[1, torch.randperm(V)[:40]] = float("-inf")
    logits = logits.to(dtype).to(device)
    finite = torch.isfinite(logits)
    ids = torch.stack([torch.nonzero(finite[r])[-1, 0] for r in range(3)])  # a finite target in each row
    grads = (torch.randn(3, device=device), torch.randn(3, device=device))
    with backend("triton"):
        got = run_op(logits[None], ids[None], None, 1.0, (grads[0][None], grads[1][None]))
    for r in range(3):
        keep = finite[r]
        row, target = logits[r, keep].double(), keep[: ids[r]].sum()
        ref = run_reference(row[None, None], target.view(1, 1), None, 1.0,
                            (grads[0][r].double().view(1, 1), grads[1][r].double().view(1, 1)))  # fmt: skip
        # fp32 math on the same inputs: only the gradient's rounding to the logits' dtype is left
        assert_close(got[0][0, r], ref[0][0, 0], atol=1e-5, rtol=1e-5, name=f"row {r} logp")
        assert_close(got[1][0, r], ref[1][0, 0], atol=1e-5, rtol=1e-5, name=f"row {r} entropy")
        rtol = torch.finfo(dtype).eps
        assert_close(got[2][0, r, keep], ref[2][0, 0], atol=1e-5, rtol=rtol, name=f"row {r} dlogits")
        assert torch.all(got[2][0, r, ~keep] == 0), f"row {r}: a nonzero gradient at a -inf logit"


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


def test_backward_writes_rows_a_stride_apart(device):
    """`logprobs_bwd` writes into an `out` whose rows are further apart than V (a padded buffer's view, as the fused
    linear loss's chunks are) exactly what it writes into a contiguous one, leaving the padding alone; an `out` whose
    rows are not equally spaced is refused with the reason."""
    from grpo_kernels.ops.logprobs import logprobs_bwd, logprobs_fwd

    B, T, V = 2, 3, 50
    logits = (torch.randn(B, T, V) * 2).to(device)
    ids = torch.randint(0, V, (B, T), device=device)
    _, entropy, stats = logprobs_fwd(logits, ids, None, 1.0)
    grad = torch.randn(B, T, device=device)
    want = logprobs_bwd(logits, ids, None, stats, entropy, grad, grad, 1.0)
    padded = torch.full((B, T, 64), 7.0, device=device)
    got = logprobs_bwd(logits, ids, None, stats, entropy, grad, grad, 1.0, out=padded[..., :V])
    assert got.data_ptr() == padded.data_ptr() and torch.equal(padded[..., :V], want)
    assert torch.equal(padded[..., V:], torch.full((B, T, 64 - V), 7.0, device=device))
    uneven = torch.empty(B, T + 1, V, device=device)[:, :T]  # rows of a sample 50 apart, samples 200 apart
    with pytest.raises(ValueError, match="out must have equally spaced rows"):
        logprobs_bwd(logits, ids, None, stats, entropy, grad, grad, 1.0, out=uneven)
