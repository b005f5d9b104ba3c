"""Packed variable-length batches: the flash-attn ``cu_seqlens`` layout and conversions to and from padding.

A padded batch ``x (B, S, ...)`` with a mask of real tokens ``attention_mask (B, S)`` packs into
``packed (total, ...)``: the real tokens of row 0 in their original order, then those of row 1, ... .
``cu_seqlens (B + 1,)`` int32 holds the cumulative lengths (``cu_seqlens[b]:cu_seqlens[b + 1]`` are row b's
tokens) and ``max_seqlen`` an upper bound on the lengths (the exact maximum when computed here).

Real tokens may sit anywhere in a row (right, left or scattered padding); their order is kept. Rows without
real tokens (length 0) are accepted everywhere: they contribute no tokens and ``cu_seqlens`` repeats a value.

Host syncs: :func:`pack` needs ``total`` (the packed size, a shape) and ``max_seqlen`` (a host int). Computed
from the mask they cost exactly one device-to-host read (one ``.tolist()`` of both); pass ``total=`` and
``max_seqlen=`` (e.g. known from the data loader) and :func:`pack` reads no device data at all, so it also
traces under ``torch.compile(fullgraph=True)``. :func:`unpack`, :func:`seqlens_from_cu` and
:func:`cu_from_seqlens` (given a tensor) never sync. Checks that read device data run only in debug mode
(``longattn.set_debug(True)`` / ``LONGATTN_DEBUG=1``).

Example::

    from longattn.varlen import pack, unpack
    packed, index = pack(hidden, attention_mask)          # (B, S, H, D) -> (total, H, D); one host read
    out = some_varlen_op(packed, index.cu_seqlens, index.max_seqlen)
    hidden_out = unpack(out, index)                       # (B, S, H, D), padding positions = 0.0

Both directions are differentiable (``index_select`` one way, ``index_copy`` the other).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._validation import _as_int, _describe, check_mask, debug_checks

__all__ = ["PackIndex", "check_cu_seqlens", "cu_from_seqlens", "pack", "seqlens_from_cu", "unpack"]


class PackIndex(NamedTuple):
    """What :func:`unpack` and the packed ops need, from :func:`pack`.

    ``indices (total,)`` int64: flat positions ``b * seqlen + s`` of the real tokens, in packed order.
    ``cu_seqlens (batch_size + 1,)`` int32; ``max_seqlen``: a host int >= 1 (1 when every row is empty, so the
    index always passes :func:`check_cu_seqlens`); ``batch_size``, ``seqlen``: the padded sizes B, S.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch_size: int
    seqlen: int


def check_cu_seqlens(cu_seqlens, max_seqlen, total, device, *, batch_size=None) -> tuple[int, int]:
    """Validate a flash-attn ``cu_seqlens`` / ``max_seqlen`` pair for ``total`` packed tokens on ``device``.

    Always (host metadata only): ``cu_seqlens`` is a contiguous 1-D int32 tensor of ``B + 1 >= 2`` elements
    on ``device`` (``B == batch_size`` when given); ``max_seqlen`` a positive int; ``total`` a non-negative
    int. In debug mode only, since it reads device data (one ``.tolist()``): ``cu_seqlens[0] == 0``,
    non-decreasing (zero-length sequences are allowed), ``cu_seqlens[-1] == total`` and every length
    ``<= max_seqlen``. Raises TypeError / ValueError naming the argument. Returns ``(max_seqlen, total)``.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected a torch.Tensor, got {_describe(cu_seqlens)}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens: expected dtype int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor of B + 1 >= 2 elements, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    want = torch.device(device)
    if cu_seqlens.device.type != want.type or want.index not in (None, cu_seqlens.device.index):
        raise ValueError(f"cu_seqlens: expected a tensor on {device}, got one on {cu_seqlens.device}")
    if not cu_seqlens.is_contiguous():
        raise ValueError(f"cu_seqlens: expected a contiguous tensor, got strides {cu_seqlens.stride()}")
    if batch_size is not None and cu_seqlens.numel() != batch_size + 1:
        raise ValueError(f"cu_seqlens: expected B + 1 = {batch_size + 1} elements, got {cu_seqlens.numel()}")
    max_seqlen = _as_int("max_seqlen", max_seqlen)
    if max_seqlen <= 0:
        raise ValueError(f"max_seqlen: expected a positive int, got {max_seqlen}")
    total = _as_int("total", total)
    if total < 0:
        raise ValueError(f"total: expected a non-negative int, got {total}")
    if debug_checks():
        lengths = seqlens_from_cu(cu_seqlens)
        first, last, shortest, longest = torch.stack(
            [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()
        if first != 0:
            raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {first}")
        if shortest < 0:
            raise ValueError("cu_seqlens: expected non-decreasing values (lengths >= 0), got a negative length")
        if last != total:
            raise ValueError(f"cu_seqlens: expected cu_seqlens[-1] == total = {total}, got {last}")
        if longest > max_seqlen:
            raise ValueError(f"max_seqlen: {max_seqlen} is smaller than the longest sequence ({longest})")
    return max_seqlen, total


def seqlens_from_cu(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens (B + 1,)`` -> lengths ``(B,)`` of the same dtype and device (no sync)."""
    return cu_seqlens[1:] - cu_seqlens[:-1]


def cu_from_seqlens(lengths) -> torch.Tensor:
    """Lengths ``(B,)`` (an integer tensor, kept on its device, or a sequence of ints) -> ``(B + 1,)`` int32."""
    if not isinstance(lengths, torch.Tensor):
        if not isinstance(lengths, Sequence):
            raise TypeError(f"lengths: expected an integer tensor or a sequence of ints, got {_describe(lengths)}")
        lengths = torch.tensor([_as_int("lengths", n) for n in lengths], dtype=torch.int32)
    if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype.is_complex:
        raise ValueError(f"lengths: expected a 1-D integer tensor, got {_describe(lengths)}")
    cu = lengths.new_zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


def pack(x: torch.Tensor, attention_mask, *, total=None, max_seqlen=None) -> tuple[torch.Tensor, PackIndex]:
    """``x (B, S, ...)``, ``attention_mask (B, S)`` (bool or 0/1 ints, True = real token, any positions)
    -> ``(packed (total, ...), PackIndex)``.

    Without both ``total`` and ``max_seqlen`` this reads them from the mask with one device-to-host sync
    (a single ``.tolist()``; a missing one is computed, a given one kept); with both it reads no device data.
    ``total`` must equal the number of real tokens and ``max_seqlen`` be at least the longest row: checked in
    debug mode only (one more read); otherwise a wrong ``total`` stays in bounds (extra real tokens are
    dropped, surplus slots repeat the last position). Differentiable with respect to ``x``. ``x`` of any
    strides (reshaped, so copied only when its first two dims cannot be merged).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {_describe(x)}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x: expected a (B, S, ...) tensor with B >= 1, got shape {tuple(x.shape)}")
    batch, seqlen = x.shape[:2]
    mask = check_mask("attention_mask", attention_mask, (batch, seqlen), x.device).reshape(-1)
    lengths = mask.view(batch, seqlen).sum(1, dtype=torch.int32)
    if total is None or max_seqlen is None:
        # The only host read: both sizes in one transfer.
        found_total, found_max = torch.stack([lengths.sum(), lengths.max()]).tolist()
        total = found_total if total is None else total
        max_seqlen = max(found_max, 1) if max_seqlen is None else max_seqlen
    cu_seqlens = cu_from_seqlens(lengths)
    max_seqlen, total = check_cu_seqlens(cu_seqlens, max_seqlen, total, x.device)
    # The i-th real token (row-major, so rows stay in order and tokens keep their order within a row) is the
    # first position where the running count of real tokens reaches i + 1: a searchsorted over a sorted
    # cumsum, with sizes known on the host, instead of nonzero(), which would sync. No duplicate writes, so
    # deterministic. The clamp keeps a wrong caller-given `total` (caught in debug mode) in bounds.
    running = torch.cumsum(mask, 0)
    wanted = torch.arange(1, total + 1, device=x.device, dtype=running.dtype)
    indices = torch.searchsorted(running, wanted).clamp_(max=mask.numel() - 1)
    packed = x.reshape(batch * seqlen, *x.shape[2:]).index_select(0, indices)
    return packed, PackIndex(indices, cu_seqlens, max_seqlen, batch, seqlen)


def unpack(packed: torch.Tensor, index: PackIndex, fill: float = 0.0) -> torch.Tensor:
    """``packed (total, ...)`` and the :class:`PackIndex` from :func:`pack` -> ``(B, S, ...)``, padding
    positions set to ``fill``. No host sync; differentiable with respect to ``packed``."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed: expected a torch.Tensor, got {_describe(packed)}")
    if not isinstance(index, PackIndex):
        raise TypeError(f"index: expected the PackIndex returned by pack, got {_describe(index)}")
    if packed.dim() < 1 or packed.shape[0] != index.indices.shape[0]:
        raise ValueError(f"packed: expected {index.indices.shape[0]} packed tokens in dim 0, got shape "
                         f"{tuple(packed.shape)}")
    if packed.device != index.indices.device:
        raise ValueError(f"packed: expected a tensor on {index.indices.device}, got one on {packed.device}")
    rest = packed.shape[1:]
    out = packed.new_full((index.batch_size * index.seqlen, *rest), fill)
    return out.index_copy(0, index.indices, packed).view(index.batch_size, index.seqlen, *rest)
