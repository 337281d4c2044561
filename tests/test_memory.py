"""The byte meter counts exactly what a block allocates."""

import torch

from grpo_kernels.memory import MemoryMeter


def test_counts_new_storages_not_views_and_frees():
    x = torch.randn(1000)
    with MemoryMeter() as meter:
        a = torch.empty(2000)  # 8,000 bytes
        b = a.view(40, 50)  # a view: no allocation
        c = x * 2  # 4,000 bytes
        del c  # freed: the peak keeps it, the end does not
        b.add_(1.0)  # in place: no allocation
    assert meter.peak_bytes == 12_000
    assert meter.end_bytes == 8_000
    del a, b


def test_sees_the_backward_pass():
    x = torch.randn(256, 256, requires_grad=True)
    with MemoryMeter() as meter:
        (x * 3).exp().sum().backward()
    # forward keeps x * 3 (256 KiB) and its exp; the backward makes x.grad (256 KiB)
    assert meter.peak_bytes >= 2 * 256 * 256 * 4
    assert meter.end_bytes >= 256 * 256 * 4
