"""The one place that chooses a backend.

``resolve_backend`` turns the user's ``backend=`` ("auto", "cuda", "triton", "torch") into the name of a
backend able to run the call, or raises ``BackendUnavailableError`` listing why the requested one cannot.
Adding a backend means adding its module to ``longattn.backends.BACKEND_MODULES`` and, if it should ever
be picked automatically, a place in ``AUTO_ORDER``.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from .backends import BACKEND_MODULES

BACKEND_NAMES = tuple(BACKEND_MODULES)

# Preference of backend="auto" per device type, first usable wins. No GPU measurement exists yet
# (benchmarks/results/ is empty): the Triton kernels come first because they are verified against the fp64
# oracle (under the Triton interpreter), the CUDA kernels have compiled but never run on a GPU. Replace this
# with a per-shape-class table of measured times once a GPU run lands.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("torch",),
}


class BackendUnavailableError(ValueError):
    """A backend was requested explicitly but cannot run this call; the message lists why."""


@functools.cache
def get_backend(name: str) -> ModuleType:
    return importlib.import_module(BACKEND_MODULES[name])


def unavailable_reasons(name: str, device: torch.device) -> list[str]:
    """Why backend ``name`` cannot run on ``device`` at all (empty when it can)."""
    try:
        module = get_backend(name)
    except Exception as exc:  # a backend that cannot even be imported says why
        return [f"importing {BACKEND_MODULES[name]} failed: {exc!r}"]
    return list(module.unavailable_reasons(device))


def unsupported_reasons(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, op: str):
    try:
        module = get_backend(name)
    except Exception as exc:
        return [f"importing {BACKEND_MODULES[name]} failed: {exc!r}"]
    return list(module.unsupported_reasons(device, dtype, head_dim, op))


@torch.compiler.assume_constant_result  # a pure function of static metadata: resolved once while tracing
def resolve_backend(requested: str, *, device: torch.device, dtype: torch.dtype, head_dim: int, op: str) -> str:
    """The backend that will run ``op`` for these inputs (see module docstring)."""
    if requested != "auto":
        reasons = unsupported_reasons(requested, device, dtype, head_dim, op)
        if reasons:
            raise BackendUnavailableError(
                f"backend={requested!r} cannot run {op} for dtype={dtype}, head_dim={head_dim} on {device}: "
                + "; ".join(reasons)
            )
        return requested
    tried = []
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        reasons = unsupported_reasons(name, device, dtype, head_dim, op)
        if not reasons:
            return name
        tried.append(f"{name}: " + "; ".join(reasons))
    raise BackendUnavailableError(
        f"no backend can run {op} for dtype={dtype}, head_dim={head_dim} on {device}: " + " | ".join(tried)
    )


def available_backends(device=None) -> dict[str, list[str]]:
    """Map each backend name to the reasons it cannot run on ``device`` (an empty list = available).

    ``device`` defaults to the current CUDA device when one is visible, else the CPU.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    return {name: unavailable_reasons(name, device) for name in BACKEND_NAMES}
