"""The one place that chooses a backend.

``resolve_backend`` turns the user's ``backend=`` ("auto", "cuda", "triton", "torch") into the name of a
backend able to run the call, or raises ``BackendUnavailableError`` listing why the requested one cannot.

``"auto"`` follows measurements, not a fixed preference: ``longattn/auto_table.json`` (package data) holds,
per GPU architecture, per op (``local``, ``longformer``, ``tglobal``, ``aggregate``, and ``band_side`` for
a caller that does not say which pattern) and per sequence-length class, the backends in order of measured
forward+backward time, with the figures and the run they come from beside them. The first backend in that
order that supports the call's device, dtype, head dim and the features it needs (``"grouped_kv"``,
``"dropout"``: see ``unsupported_reasons``) wins; the table was measured without those features. A GPU run
refreshes the table from its results JSON (``longattn auto-table RESULTS.json``); nothing here needs editing
when the numbers change.
On CPU the only fast path is the torch backend (Triton runs there only under its interpreter, a test vehicle).

Resolution is cached: per call it costs one size-class comparison and one dict lookup. The cache key is
(requested backend, device, dtype, head dim, op, size class, features); ``clear_cache()`` drops it (after a
backend's availability changed inside a process, e.g. a test toggling ``TRITON_INTERPRET``).

Adding a backend means adding its module to ``longattn.backends.BACKEND_MODULES`` and, for ``auto`` to
pick it, measuring it so the table lists it.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from types import ModuleType

import torch

from .backends import BACKEND_MODULES

BACKEND_NAMES = tuple(BACKEND_MODULES)
AUTO_TABLE_PATH = Path(__file__).with_name("auto_table.json")
CPU_ORDER = ("torch",)
# The patterns of the band_side primitive and the kernel op each one runs (what backends' capability
# functions take). "band_side" / "block_aggregate" are the kernel ops themselves, for callers that pass them.
OP_KERNEL = {"local": "band_side", "longformer": "band_side", "tglobal": "band_side", "band_side": "band_side",
             "aggregate": "block_aggregate", "block_aggregate": "block_aggregate"}
_OP_ROW = {"block_aggregate": "aggregate"}


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


def unsupported_reasons(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, op: str,
                        features: tuple[str, ...] = ()):
    """Why backend ``name`` cannot run ``op`` (a pattern or a kernel op) for these inputs (empty: it can).

    ``features``: optional capabilities the call needs, e.g. ``"dropout"`` (``dropout_p > 0``); a backend's
    ``unsupported_reasons`` gets them as the keyword ``features`` only when there are some.
    """
    try:
        module = get_backend(name)
    except Exception as exc:
        return [f"importing {BACKEND_MODULES[name]} failed: {exc!r}"]
    extra = {"features": tuple(features)} if features else {}
    return list(module.unsupported_reasons(device, dtype, head_dim, OP_KERNEL.get(op, op), **extra))


# --- the measured table -------------------------------------------------------------------------------------

def load_table(path=AUTO_TABLE_PATH) -> dict:
    """Read the table (format: ``longattn.bench.autotable``) and make it the one ``auto`` follows."""
    global _TABLE, SIZE_CLASS_BOUNDS
    _TABLE = json.loads(Path(path).read_text())
    SIZE_CLASS_BOUNDS = tuple(_TABLE["size_classes"]["upper_bounds"])
    _resolve_cached.cache_clear()
    return _TABLE


def auto_table() -> dict:
    """The table ``auto`` follows (``auto_table.json`` unless ``load_table`` was given another)."""
    return _TABLE


def size_class(seqlen) -> int:
    """Index of ``seqlen``'s class: how many of the table's class bounds it exceeds (None: the middle class).

    Plain comparisons with module constants, so under ``torch.compile`` with a dynamic S they become guards
    on the class bounds (a recompile only when S moves to another class), never a specialisation on S.
    """
    if seqlen is None:
        return len(SIZE_CLASS_BOUNDS) // 2
    index = 0
    for bound in SIZE_CLASS_BOUNDS:
        if seqlen > bound:
            index += 1
    return index


def _table_for(capability: tuple[int, int]) -> dict:
    """The measured entry of this GPU architecture, else that of the nearest measured one."""
    devices = _TABLE["devices"]
    key = f"sm_{capability[0]}{capability[1]}"
    if key in devices:
        return devices[key]
    nearest = min(devices.values(), key=lambda d: abs(10 * d["capability"][0] + d["capability"][1]
                                                      - 10 * capability[0] - capability[1]))
    return nearest


def auto_order(device: torch.device, op: str, size_class_index: int) -> tuple[str, ...]:
    """The backends ``auto`` tries, best first, for ``op`` on ``device`` in that size class."""
    if device.type != "cuda":
        return CPU_ORDER
    entry = _table_for(torch.cuda.get_device_capability(device))
    row = entry["ops"][_OP_ROW.get(op, op)]
    order = row[min(size_class_index, len(row) - 1)]["order"]
    return tuple(order) + tuple(name for name in BACKEND_NAMES if name not in order)


# --- resolution ----------------------------------------------------------------------------------------------

def resolve_backend(requested: str, *, device: torch.device, dtype: torch.dtype, head_dim: int, op: str,
                    seqlen=None, features: tuple[str, ...] = ()) -> str:
    """The backend that will run ``op`` for these inputs (see module docstring).

    ``op``: "local", "longformer", "tglobal" or "aggregate" (the patterns the table was measured on), or the
    kernel ops "band_side" / "block_aggregate". ``seqlen``: the sequence length S, an int or, under
    ``torch.compile`` with a dynamic S, a SymInt (only compared with the class bounds); None uses the middle
    size class. The other arguments must be static under ``torch.compile`` (they are: device, dtype, a head
    dim the kernels specialise on). ``features``: capabilities the call needs (see ``unsupported_reasons``).
    """
    return _resolve(requested, device, dtype, head_dim, op, size_class(seqlen), tuple(features))


def resolve(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, op: str, seqlen=None,
            features: tuple[str, ...] = ()) -> str:
    """``resolve_backend`` with positional arguments and ``features`` a tuple: the public ops' per-call form (no
    keyword binding, no tuple copy)."""
    return _resolve(requested, device, dtype, head_dim, op, size_class(seqlen), features)


@torch.compiler.assume_constant_result  # a pure function of static metadata: resolved once while tracing
def _resolve(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, op: str, cls: int,
             features: tuple[str, ...] = ()) -> str:
    return _resolve_cached(requested, device, dtype, head_dim, op, cls, features)


@functools.lru_cache(maxsize=1024)
def _resolve_cached(requested, device, dtype, head_dim, op, cls, features=()) -> str:
    # Exceptions are not cached: an impossible explicit request is re-examined (and raises) each call.
    if op not in OP_KERNEL:
        raise ValueError(f"op: expected one of {tuple(OP_KERNEL)}, got {op!r}")
    if requested != "auto":
        reasons = unsupported_reasons(requested, device, dtype, head_dim, op, features)
        if reasons:
            raise BackendUnavailableError(
                f"backend={requested!r} cannot run {op} for dtype={dtype}, head_dim={head_dim} on {device}: "
                + "; ".join(reasons)
            )
        return requested
    tried = []
    for name in auto_order(device, op, cls):
        reasons = unsupported_reasons(name, device, dtype, head_dim, op, features)
        if not reasons:
            return name
        tried.append(f"{name}: " + "; ".join(reasons))
    raise BackendUnavailableError(
        f"no backend can run {op} for dtype={dtype}, head_dim={head_dim} on {device}: " + " | ".join(tried)
    )


def clear_cache() -> None:
    """Forget cached resolutions (after a backend's availability changed inside the process)."""
    _resolve_cached.cache_clear()


_TABLE: dict = {}
SIZE_CLASS_BOUNDS: tuple[int, ...] = ()
load_table()


def available_backends(device=None) -> dict[str, list[str]]:
    """Map each backend name to the reasons it cannot run on ``device`` (an empty list = available).

    ``device`` defaults to the current CUDA device when one is visible, else the CPU.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    return {name: unavailable_reasons(name, device) for name in BACKEND_NAMES}
