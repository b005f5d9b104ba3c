"""The Triton backend (kernels in the top-level ``triton_kernels/``, installed as ``longattn.triton_kernels``).

Placeholder until the fused kernels land: it reports itself unavailable with the reason.
"""

from __future__ import annotations

NAME = "triton"


def unavailable_reasons(device) -> list[str]:
    return ["the fused Triton kernels are not implemented yet"]


def unsupported_reasons(device, dtype, head_dim, op) -> list[str]:
    return unavailable_reasons(device)
