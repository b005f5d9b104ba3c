"""``apply_longattn(model, packed=True)``: patched layers run on the real tokens only (issue 14).

A padded batch's attention layer packs its inputs by the attention mask (:func:`longattn.varlen.pack`), runs a
``*_varlen`` op on the real tokens, and scatters the result back into the padded layout the model expects,
padding rows 0. Projections before the op and the output projection after it also run on the real tokens only.

When packing is exact. A packed sequence's windows, offsets and blocks count in packed positions, the padded
op's in padded ones; they agree on every real token when each row's real tokens are contiguous (left or right
padding) -- and, for LongT5 transient-global, whose blocks start at position 0 of the padded row, when they
start at position 0 (right padding). Otherwise, or when nothing is padding (packing would gain nothing), the layer
runs the padded patch; a one-time warning names the reason for a layout packing cannot serve.

Host syncs: one per forward, by the first patched layer (the packed size, the longest row, the layout flags and
the global count in one read); later layers reuse it (``once_per_forward``).
"""

from __future__ import annotations

import dataclasses

import torch

from ..varlen import PackIndex, pack, unpack
from ._common import once_per_forward, warn_once


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """One forward's packing of a ``(B, S)`` batch.

    ``index``: the :class:`longattn.varlen.PackIndex` (``cu_seqlens``, ``max_seqlen``, token indices);
    ``num_global``: global tokens among the real ones (0 without a global mask).
    """

    index: PackIndex
    num_global: int

    @property
    def total(self) -> int:
        return self.index.indices.shape[0]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, S, ...)`` -> ``(T, ...)`` real tokens."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index.indices)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, ...)`` -> ``(B, S, ...)``, padding rows 0."""
        return unpack(x, self.index)


def packed_layout(module, carrier, mask, real: torch.Tensor, is_global: torch.Tensor | None, *,
                  aligned_start: bool):
    """The forward's :class:`PackedLayout` for ``real (B, S)`` bool, or None when the layer should run padded.

    ``aligned_start``: packing also needs each row's real tokens to start at position 0 (LongT5 transient-global's
    blocks). Computed once per forward: ``carrier`` and ``mask`` are objects every layer of one forward receives
    (``real`` is derived from ``mask``; see ``once_per_forward``).
    """
    key = ("packed", tuple(real.shape), aligned_start)
    found = once_per_forward(carrier, mask, key, lambda: _layout(real, is_global, aligned_start))
    if isinstance(found, str):
        if found:
            warn_once(f"{type(module).__name__}:packed:{found}",
                      f"longattn: {type(module).__name__} runs the padded patch instead of packed ({found}).")
        return None
    return found


def _layout(real: torch.Tensor, is_global: torch.Tensor | None, aligned_start: bool) -> PackedLayout | str:
    """A :class:`PackedLayout`, or why not (``""``: no padding, nothing to gain)."""
    B, S = real.shape
    lengths = real.sum(1)
    starts = real[:, 0].long() + (real[:, 1:] & ~real[:, :-1]).sum(1)  # runs of real tokens per row
    late_start = (~real[:, 0] & (lengths > 0)).sum()
    globals_ = (is_global & real).sum() if is_global is not None else lengths.new_zeros(())
    total, longest, runs, late, num_global = torch.stack(
        [lengths.sum(), lengths.max(), starts.max(), late_start, globals_]).tolist()  # the one host read
    if total == B * S:
        return ""
    if runs > 1:
        return "a row's real tokens are not contiguous (padding inside a row)"
    if aligned_start and late:
        return "a row's real tokens do not start at position 0 (left padding moves LongT5's global blocks)"
    _, index = pack(real[:, :, None], real, total=total, max_seqlen=max(longest, 1))
    return PackedLayout(index, num_global)
