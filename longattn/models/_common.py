"""What every patched forward shares: the per-instance patch state and the one-time fallback warnings."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

_STATE_ATTR = "_longattn_patch"
_warned: set[str] = set()


@dataclasses.dataclass
class PatchState:
    """Stored on a patched module instance (a plain attribute: never in the state dict).

    ``original`` is the instance-level ``forward`` the module had before patching, or None when it used its
    class's (the usual case); revert restores exactly that.
    """

    original: Callable | None
    backend: str


def patch_state(module) -> PatchState | None:
    return module.__dict__.get(_STATE_ATTR)


def stock_forward(module) -> Callable:
    """The forward the module would run unpatched, bound to it."""
    state = patch_state(module)
    if state is not None and state.original is not None:
        return state.original
    return type(module).forward.__get__(module)


def warn_once(key: str, message: str) -> None:
    """Warn the first time ``key`` comes up in this process (fallbacks happen every layer, every step)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def fallback_reason(module, output_attentions: bool, dropout_p: float) -> str | None:
    """Why a fused kernel cannot stand in for ``module``'s stock forward on this call, or None.

    - ``output_attentions=True`` asks for the attention probabilities, which a fused kernel never forms.
    - Attention-probability dropout in training mode: the fused ops have no dropout, and the stock forward is
      the only way to keep exactly the stock distribution (equal outputs are checked with dropout off).
    """
    if output_attentions:
        return "output_attentions=True: the fused kernels never form attention probabilities"
    if module.training and dropout_p > 0:
        return (f"training mode with attention dropout p={dropout_p}: the fused kernels have no dropout, so the "
                "stock forward keeps the stock distribution (set the attention dropout to 0 to train on longattn)")
    return None


def warn_fallback(module, reason: str) -> None:
    warn_once(f"{type(module).__name__}:{reason}",
              f"longattn: {type(module).__name__} falls back to the stock Hugging Face forward ({reason}).")
