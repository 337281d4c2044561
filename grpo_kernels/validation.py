"""Argument checks of the public functions: every message names the argument and says what was expected.

Checks on values (token ids in range, a binary mask, finite advantages) need the data; they are gathered into one
small tensor so that a call costs a single host-device synchronisation.
"""

from __future__ import annotations

import math
import numbers

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)  # those PyTorch's CPU ops all take


def check_tensor(
    name: str,
    x: object,
    *,
    kind: str,
    shapes: tuple[tuple[int, ...], ...] | None = None,
    device: torch.device | None = None,
    shape_hint: str = "",
) -> torch.Tensor:
    """`x` must be a tensor of `kind` ("float", "int" or "mask") with one of `shapes` (any if None), on `device`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor{' of shape ' + shape_hint if shape_hint else ''}; got {type(x).__name__}"
        )
    if kind == "float" and x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (fp16, bf16, fp32 or fp64); got {x.dtype}")
    if kind == "int" and x.dtype not in _INTS:
        raise TypeError(
            f"{name} must be an integer tensor (token ids) of int64, int32, int16, int8 or uint8; got {x.dtype}"
        )
    if kind == "mask" and x.dtype.is_complex:
        raise TypeError(f"{name} must be a bool, integer or floating 0/1 tensor; got {x.dtype}")
    if shapes is not None and not any(_same_shape(x.shape, s) for s in shapes):
        raise ValueError(f"{name} has shape {tuple(x.shape)} but must be {shape_hint}")
    if device is not None and not same_device(x.device, device):
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {device}: move all inputs to one device")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values: pass tensors on a CPU or a GPU")
    return x


def _same_shape(shape, expected: tuple) -> bool:
    """`tuple(shape) == expected`, entry by entry: under torch.compile with dynamic shapes the sizes are symbols,
    which compare one by one (a tuple's `in` test does not see them equal)."""
    return len(shape) == len(expected) and all(a == b for a, b in zip(shape, expected, strict=True))


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether `a` and `b` name one device; an accelerator without an index ("cuda") is its current device."""
    return _indexed(torch.device(a)) == _indexed(torch.device(b))


def _indexed(d: torch.device) -> torch.device:
    if d.index is not None or d.type in ("cpu", "meta"):
        return d
    module = getattr(torch, d.type, None)
    current = getattr(module, "current_device", None)
    return torch.device(d.type, current()) if current is not None else d


class ValueChecks:
    """Collects boolean 'this is wrong' flags as tensors, then raises the first that holds, with one sync."""

    def __init__(self) -> None:
        self._flags: list[torch.Tensor] = []
        self._messages: list[str] = []

    def fail_if(self, flag: torch.Tensor, message: str) -> None:
        self._flags.append(flag.reshape(()))
        self._messages.append(message)

    def run(self) -> None:
        """Raise for the first flag that holds. Skipped under `torch.compile`, where reading values back to the host
        would break the graph: compiled code gets the shape, dtype and device checks only."""
        if not self._flags or torch.compiler.is_compiling():
            return
        flags = torch.stack(self._flags).tolist()
        for bad, message in zip(flags, self._messages, strict=True):
            if bad:
                raise ValueError(message)


def check_ids(checks: ValueChecks, name: str, ids: torch.Tensor, vocab: int, mask: str | None = "completion_mask"):
    """Token ids in `[0, vocab)`; the message tells how padding is masked out (the function's `mask` argument)."""
    if ids.numel():
        checks.fail_if(
            (ids.min() < 0) | (ids.max() >= vocab),
            f"{name} holds token ids outside [0, {vocab}) (the vocabulary size); padding ids must be valid ids too, "
            "e.g. the pad token" + (f", and be masked out with {mask}" if mask else ""),
        )


def check_mask(checks: ValueChecks, name: str, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Return the mask as bool; a numeric mask must hold only 0 and 1."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if mask.numel():
        checks.fail_if(((mask != 0) & (mask != 1)).any(), f"{name} must hold only 0 and 1 (or be a bool tensor)")
    return mask != 0


def check_finite(checks: ValueChecks, name: str, x: torch.Tensor | None, allow_nan: bool = False) -> None:
    if x is None or not x.numel():
        return
    bad = torch.isinf(x).any() if allow_nan else ~torch.isfinite(x).all()
    checks.fail_if(bad, f"{name} must be finite" + (" (NaN marks an unscorable reward)" if allow_nan else ""))


def check_finite_in_loss(checks: ValueChecks, name: str, x: torch.Tensor | None, mask: torch.Tensor | None,
                         nonnegative: bool = False) -> None:  # fmt: skip
    """NaN or an infinity in `x` (`[B, T]` or `[B, 1]`) at a token in the loss (`mask` `[B, T]` bool; None: every
    token) is an error, and so is a negative value where `nonnegative` (importance weights); values at masked-out
    tokens are never read."""
    if x is None or not x.numel():
        return
    where = (lambda bad: bad) if mask is None else (lambda bad: bad & mask)
    checks.fail_if(
        where(~torch.isfinite(x)).any(),
        f"{name} holds NaN or an infinity at a token in the loss (completion_mask = 1): pass finite values there "
        "(values where the mask is 0 are ignored)",
    )
    if nonnegative:
        checks.fail_if(
            where(x < 0).any(),
            f"{name} holds a negative value at a token in the loss (completion_mask = 1): importance weights are >= 0",
        )


def check_positive_items(checks: ValueChecks, num_items_in_batch: object,
                         device: torch.device) -> torch.Tensor | float | None:  # fmt: skip
    """`num_items_in_batch` as the loss reads it: None, a finite number >= 0, or a real scalar tensor moved to `device`
    (its value checked with the others, in `checks`' one sync)."""
    if num_items_in_batch is None:
        return None
    expected = "a finite number >= 0 (it is clamped to at least 1)"
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar; got shape {tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.dtype.is_complex:
            raise TypeError(f"num_items_in_batch must be a real number; got a {num_items_in_batch.dtype} tensor")
        value = num_items_in_batch.to(device, non_blocking=True)  # a copy from the host that does not wait
        checks.fail_if(~torch.isfinite(value) | (value < 0), f"num_items_in_batch must be {expected}")
        return value
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError(f"num_items_in_batch must be a number or a scalar tensor; got {num_items_in_batch!r}")
    if not math.isfinite(num_items_in_batch) or num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be {expected}; got {num_items_in_batch}")
    return float(num_items_in_batch)
