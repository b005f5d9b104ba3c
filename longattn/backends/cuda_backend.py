"""The CUDA backend: hand-written kernels compiled into ``longattn._C`` (sources in ``csrc/``).

Placeholder until the kernels land: it reports itself unavailable with the reason.
"""

from __future__ import annotations

NAME = "cuda"


def unavailable_reasons(device) -> list[str]:
    return ["the CUDA kernels are not implemented yet"]


def unsupported_reasons(device, dtype, head_dim, op) -> list[str]:
    return unavailable_reasons(device)
