"""Input checks shared by every public function.

Every check runs before any compute and raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong
shape, value, device or layout) with a message that names the argument, what was expected and what was
given. Shape, dtype, device and layout checks are host-side metadata checks and always run.

Value checks that read tensor data (index ranges, integer masks holding only 0/1, ``max_globals`` against the
real count) would force a device-to-host sync per call, so they run only in debug mode: ``LONGATTN_DEBUG=1`` in
the environment or ``longattn.set_debug(True)`` (never while ``torch.compile`` traces). Without them every
backend is safe for any index value: out-of-range indices are treated as padding (dropped), never read out of
bounds (``longattn.backends`` states this in its contract).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from .backends import BACKEND_MODULES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
MASK_DTYPES = (torch.bool, *INT_DTYPES)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    return f"{type(x).__name__} {x!r}"


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


_INF = float("inf")
_DEBUG = [os.environ.get("LONGATTN_DEBUG", "") not in ("", "0")]


def set_debug(enabled: bool = True) -> None:
    """Turn debug mode on or off: value checks of index tensors / integer masks / ``max_globals`` that sync.

    Off by default (``LONGATTN_DEBUG=1`` in the environment turns it on at import): a normal call never reads
    device data on the host. Out-of-range values are then dropped by the kernels instead of raising.
    """
    _DEBUG[0] = bool(enabled)


def debug_checks() -> bool:
    """True when data-reading value checks should run: debug mode on and not tracing."""
    return _DEBUG[0] and not _is_compiling()


def check_tensor(name: str, x, *, ndim: int, dtypes=FLOAT_DTYPES, device=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {_describe(x)}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({allowed}), got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like q), got one on {x.device}")
    return x


def check_last_dim_contiguous(name: str, x: torch.Tensor) -> None:
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(
            f"{name}: the last dimension must be contiguous (stride 1), got strides {tuple(x.stride())}; "
            f"call .contiguous() or pass a view whose last dim is dense"
        )


def _passes_like(x, ref: torch.Tensor) -> bool:
    """Fast accept: ``x`` is a tensor of ``ref``'s shape, dtype and device with a unit last stride, so it passes
    every check ``ref`` (already validated) passed. False sends the caller to its detailed checks, which raise."""
    return (isinstance(x, torch.Tensor) and x.shape == ref.shape and x.dtype == ref.dtype and x.device == ref.device
            and x.stride(-1) == 1)


def check_like(name: str, x, ref: torch.Tensor, ref_name: str) -> None:
    """``x`` must be a tensor of ``ref``'s shape, dtype and device with a contiguous last dim."""
    if _passes_like(x, ref):
        return
    check_tensor(name, x, ndim=ref.dim(), device=ref.device)
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected shape (B, S, H, D) = {tuple(ref.shape)} like {ref_name}, "
                         f"got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} like {ref_name}, got {x.dtype}")
    check_last_dim_contiguous(name, x)


def check_qkv(q, k, v, *, grouped: bool = False) -> tuple[int, int, int, int]:
    """q, k, v: (B, S, H, D) of one float dtype on one device, last dim contiguous. Returns (B, S, H, D).

    With ``grouped``, k and v may have ``H_kv`` heads instead of H (grouped-query / multi-query attention,
    query head h reading K/V head ``h // (H // H_kv)``): ``H % H_kv == 0`` and k, v of one shape.
    """
    # The common case in one expression (every check below passes): plain tensors of one shape, float dtype and
    # device, dense (is_contiguous() is a cached flag, a third of stride(-1)'s cost; other layouts take the checks).
    if type(q) is Tensor and type(k) is Tensor and type(v) is Tensor:
        shape, dtype = q.shape, q.dtype
        if (len(shape) == 4 and dtype in FLOAT_DTYPES and 0 not in shape and k.shape == shape and v.shape == shape
                and k.dtype is dtype and v.dtype is dtype and q.is_contiguous() and k.is_contiguous()
                and v.is_contiguous() and k.device == (device := q.device) and v.device == device):
            return tuple(shape)
    check_tensor("q", q, ndim=4)
    if 0 in q.shape:
        raise ValueError(f"q: expected a non-empty (B, S, H, D) tensor, got shape {tuple(q.shape)}")
    check_last_dim_contiguous("q", q)
    if _passes_like(k, q) and _passes_like(v, q):  # the common case (H_kv = H), grouped or not
        return tuple(q.shape)
    if not grouped:
        check_like("k", k, q, "q")
        check_like("v", v, q, "q")
        return tuple(q.shape)
    B, S, H, D = q.shape
    check_tensor("k", k, ndim=4, device=q.device)
    kv_heads = k.shape[2]
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, S, D) or kv_heads == 0:
        raise ValueError(f"k: expected shape (B, S, H_kv, D) = ({B}, {S}, H_kv, {D}) like q, got {tuple(k.shape)}")
    if H % kv_heads:
        raise ValueError(f"k: its {kv_heads} heads (H_kv) must divide q's {H} heads (H % H_kv == 0 for grouped-query "
                         f"attention), got k of shape {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k: expected dtype {q.dtype} like q, got {k.dtype}")
    check_last_dim_contiguous("k", k)
    check_like("v", v, k, "k")
    return tuple(q.shape)


def check_side_kv(side_k, side_v, q: torch.Tensor, k: torch.Tensor | None = None) -> int:
    """side_k, side_v: (B, G, H_kv, D) matching q's B, D, dtype and device and k's head count H_kv (side keys
    are keys: with grouped-query attention, query head h reads side head ``h // (H // H_kv)`` too). Returns G."""
    B, _, H, D = q.shape
    H = H if k is None else k.shape[2]
    if type(side_k) is Tensor and type(side_v) is Tensor:  # the common case: every check below passes
        shape = side_k.shape
        if (len(shape) == 4 and shape[0] == B and shape[2] == H and shape[3] == D and side_v.shape == shape
                and side_k.dtype is (dtype := q.dtype) and side_v.dtype is dtype and side_k.is_contiguous()
                and side_v.is_contiguous() and side_k.device == (device := q.device) and side_v.device == device):
            return shape[1]
    for name, x in (("side_k", side_k), ("side_v", side_v)):
        if name == "side_v" and _passes_like(side_v, side_k):  # side_k passed below, so does a tensor like it
            break
        check_tensor(name, x, ndim=4, device=q.device)
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} like q, got {x.dtype}")
        if x.shape[0] != B or x.shape[2] != H or x.shape[3] != D:
            raise ValueError(
                f"{name}: expected shape (B, G, H_kv, D) = ({B}, G, {H}, {D}) to match q's B, D and k's heads, "
                f"got {tuple(x.shape)}"
            )
        check_last_dim_contiguous(name, x)
    if side_k.shape != side_v.shape:
        raise ValueError(
            f"side_v: expected the same shape as side_k {tuple(side_k.shape)}, got {tuple(side_v.shape)}"
        )
    return side_k.shape[1]


def _as_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {_describe(value)}") from None


def normalize_window(window) -> tuple[int, int]:
    """``w`` -> ``(w, w)``; ``(left, right)`` -> itself. Both must be non-negative ints."""
    if type(window) is int and window >= 0:  # the common case, without the Sequence ABC check
        return window, window
    if isinstance(window, Sequence) and not isinstance(window, str):
        if len(window) != 2:
            raise ValueError(f"window: expected an int or a pair (left, right), got {window!r}")
        left, right = (_as_int("window", w) for w in window)
    else:
        left = right = _as_int("window", window)
    if left < 0 or right < 0:
        raise ValueError(f"window: expected non-negative sizes (left, right), got ({left}, {right})")
    return left, right


def check_mask(name: str, mask, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """A bool or 0/1 integer mask of ``shape`` (True = keep). Returns a contiguous bool tensor or None."""
    if mask is None:
        return None
    if (type(mask) is Tensor and mask.dtype is torch.bool and mask.is_contiguous() and mask.shape == shape
            and mask.device == device):
        return mask  # the common case: what the checks below would return
    check_tensor(name, mask, ndim=len(shape), dtypes=MASK_DTYPES, device=device)
    if mask.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if debug_checks() and mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name}: an integer mask must hold only 0 and 1")
        mask = mask != 0
    return mask.contiguous()


def check_scale(scale, head_dim: int, default: float | None) -> float:
    if scale is None:
        return default if default is not None else head_dim**-0.5
    if type(scale) is float and -_INF < scale < _INF:  # the common case (NaN fails the comparisons)
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {_describe(scale)}")
    scale = float(scale)
    if not (scale == scale and abs(scale) != float("inf")):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return scale


def check_bias_table(name: str, table, rows: int, cols: int, q: torch.Tensor) -> torch.Tensor | None:
    """A per-head bias table (rows=H, cols) of a float dtype on q's device."""
    if table is None:
        return None
    if (isinstance(table, Tensor) and table.shape == (rows, cols) and table.dtype in FLOAT_DTYPES
            and table.device == q.device):
        return table  # the common case: every check below passes
    check_tensor(name, table, ndim=2, device=q.device)
    if tuple(table.shape) != (rows, cols):
        raise ValueError(f"{name}: expected shape (H, {cols}) = ({rows}, {cols}), got {tuple(table.shape)}")
    return table


def check_index_tensor(
    name: str, ids, shape: tuple[int, ...], device: torch.device, low: int, high: int
) -> torch.Tensor:
    """An integer index tensor of ``shape``, values meant to be in [low, high] (checked in debug mode only;
    the kernels drop others); returned as contiguous int32 (no copy when it already is)."""
    if (type(ids) is Tensor and ids.dtype is torch.int32 and ids.is_contiguous() and ids.shape == shape
            and ids.device == device and not _DEBUG[0]):
        return ids  # the common case: what the checks below would return
    check_tensor(name, ids, ndim=len(shape), dtypes=INT_DTYPES, device=device)
    if ids.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(ids.shape)}")
    if debug_checks() and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < low or hi > high:
            raise ValueError(f"{name}: expected values in [{low}, {high}], got values in [{lo}, {hi}]")
    return (ids if ids.dtype == torch.int32 else ids.to(torch.int32)).contiguous()  # .to dispatches even as a no-op


_BACKEND_CHOICES = ("auto", *BACKEND_MODULES)


def check_backend_name(backend) -> str:
    if not isinstance(backend, str) or backend not in _BACKEND_CHOICES:
        raise ValueError(f"backend: expected one of {_BACKEND_CHOICES}, got {backend!r}")
    return backend
