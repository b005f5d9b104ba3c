"""The tolerance rule (flash-attn's), in one place.

A backend's max abs error against the float64 oracle may be at most ``factor`` times the error of the
torch backend doing the same computation in the same dtype, plus an absolute floor per dtype:
``factor`` = 2 for outputs, 3 for gradients. Inputs are O(1) (randn), so the floors are absolute.
"""

from __future__ import annotations

import torch

OUT_FACTOR = 2.0
GRAD_FACTOR = 3.0

FLOORS = {
    # float64: only rounding of a few hundred-term sums; far below any real bug.
    torch.float64: 1e-10,
    # float32: ~100 ulps at O(1) values (2^-23 ~ 1.2e-7), covers summation-order changes in long rows.
    torch.float32: 2e-5,
    # float16: 10-bit mantissa (2^-11 ~ 4.9e-4) on values rounded once in, once out, plus the P cast.
    torch.float16: 2e-3,
    # bfloat16: 7-bit mantissa (2^-8 ~ 3.9e-3); two roundings of O(1) values.
    torch.bfloat16: 1.6e-2,
}


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.double() - ref.double()).abs().max().item()


def assert_within_rule(name, value, baseline, oracle, *, grad: bool = False):
    """``value`` (backend under test) and ``baseline`` (torch backend, same dtype) vs the fp64 ``oracle``."""
    factor = GRAD_FACTOR if grad else OUT_FACTOR
    floor = FLOORS[value.dtype]
    err, base_err = max_error(value, oracle), max_error(baseline, oracle)
    bound = factor * base_err + floor
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x torch-backend error {base_err:.3e} + {floor:.1e}"


def assert_close_to_oracle(name, value, oracle, *, scale: float = 1.0):
    """For the torch backend itself (it is the baseline): error within the dtype's floor."""
    floor = FLOORS[value.dtype] * scale
    err = max_error(value, oracle)
    assert err <= floor, f"{name}: error {err:.3e} vs the fp64 oracle exceeds {floor:.1e} ({value.dtype})"
