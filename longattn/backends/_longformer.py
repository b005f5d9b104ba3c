"""Longformer / LED attention as one backend call: the band pass with the global tokens as side keys, then
the global rows (DESIGN.md section 1, the "Longformer / LED global" row).

This module is the one place that orders global tokens into slots and that assembles the op from a
backend's two passes, so every backend computes the same thing:

1. **Slots.** ``global_slots`` gives each batch row's global tokens (``global_mask & key_padding_mask``) in
   sequence order in slots ``0 .. count-1`` of ``G`` (``G`` is ``max_globals`` clamped to ``S``: a size
   known on the host, so nothing syncs); the remaining slots point at distinct non-global positions and are
   marked unused. A row with more than ``G`` globals keeps its first ``G`` (debug mode raises instead).
2. **Band pass** (``backend.band_side_forward``): every query attends the real non-global keys of its window
   plus the used slots' ``k``/``v`` as side keys, in one softmax. Padding rows are then zeroed, and the
   saved ``lse`` of padding and global rows is set to ``+inf`` so the band backward ignores them.
3. **Global rows** (``backend.global_rows_forward``): the slots' ``q_global`` rows attend every real token
   through ``k_global``/``v_global`` (a G x S attention: split over key chunks and combined by log-sum-exp);
   the result overwrites the global rows of ``out``. Unused slots get ``glse = +inf`` (no gradient).

Backward mirrors it: the band backward (its side-key gradients land on the global tokens' rows of dk/dv,
which the band leaves at exactly 0 because global tokens are never band keys), then the global-rows
backward (its key gradients added into dk/dv when the global projections are the local ones).

A backend with ``longformer_band_forward`` / ``longformer_band_backward`` (Triton, CUDA) runs step 2 in its kernels:
the slots' tokens are read from ``k``/``v`` through ``pos`` (no gathered copy), padding rows are zeroed and the
``lse`` of non-band rows set inside the kernel, and the side-key dK/dV are added into dk/dv by a kernel (no
scatter). Others get the gather / ``masked_fill`` / ``scatter_add`` composition (``gathered_band_forward``).

A backend with ``global_slots`` (Triton, CUDA) computes step 1 in one kernel, bitwise equal to the torch function here
(argsort, gather and mask ops otherwise).

A backend with ``longformer_forward`` / ``longformer_backward`` (Triton, CUDA) runs all three steps
itself, in fewer launches than the composition (``composed_forward`` / ``composed_backward``, the steps above, which
it may still call for cases it does not fuse).

A backend without its own global-rows pass uses ``rows_via_band_side``: the slot queries against the S
tokens as side keys of the band primitive (with an empty band), which every backend already runs. The CUDA backend
runs the same composition on its raw ops (``KeySplits`` for the splits' layout; the copy, merge and sum of the split
rows in kernels of its own).
"""

from __future__ import annotations

import functools

import torch

from longattn._memo import LastCall

_INF = float("inf")
_DENSE = torch.contiguous_format


def global_slots(global_mask, key_padding_mask, G: int):
    """Slot layout of the global tokens.

    Args:
        global_mask: (B, S) bool; key_padding_mask: (B, S) bool or None (True = real token).
        G: number of slots, ``0 <= G <= S``.

    Returns:
        ``band_rows`` (B, S) bool: real non-global tokens (the band keys, and the rows the band pass owns);
        ``pos`` (B, G) int64: the slots' sequence positions, distinct within a row (globals first, in order;
        unused slots point at non-global positions); ``used`` (B, G) bool: the slot holds a global token.
    """
    is_global = global_mask if key_padding_mask is None else global_mask & key_padding_mask
    band_rows = ~is_global if key_padding_mask is None else key_padding_mask ^ is_global  # is_global <= real
    # A stable descending sort of "global" puts the globals first, in sequence order, then every other position.
    # Contiguous (B, G), as the backends' slot kernels write it (one layout for the op's fake).
    pos = torch.argsort(is_global.view(torch.uint8), dim=1, stable=True, descending=True)[:, :G].contiguous()
    return band_rows, pos, torch.gather(is_global, 1, pos)


def dropout_kwargs(dropout_p: float, rng, dropout_offset: int = 0) -> dict:
    """The backend functions' dropout keywords: none at all for ``dropout_p = 0`` (today's calls, unchanged, and
    backends without dropout need not know the keywords), else ``dropout_p`` and the ``rng`` tensor, and
    ``dropout_offset`` when it is not 0 (feature "dropout_offset": the counters' position of row 0 and band key 0,
    a sequence-parallel shard's start in its sequence)."""
    if not dropout_p:
        return {}
    return {"dropout_p": dropout_p, "rng": rng, **({"dropout_offset": dropout_offset} if dropout_offset else {})}


def ranges_kwargs(key_ranges, side_ranges) -> dict:
    """The backend functions' per-row range keywords (packed batches): only those given, so calls without ranges
    are today's (and backends without the feature "ranges" never see them)."""
    ranges = {}
    if key_ranges is not None:
        ranges["key_ranges"] = key_ranges
    if side_ranges is not None:
        ranges["side_ranges"] = side_ranges
    return ranges


def halo_kwargs(halo_k, halo_v, halo_mask, halo_left: int) -> dict:
    """The band functions' halo keywords (contract in ``longattn.backends``, "Halo keys"): none without a halo, so
    calls without one are today's (and backends without the feature "halo" never see them)."""
    if halo_k is None:
        return {}
    return {"halo_k": halo_k, "halo_v": halo_v, "halo_mask": halo_mask, "halo_left": halo_left}


def slot_ranges(global_mask, key_padding_mask, pos, used, G: int, key_ranges):
    """Per-row ranges of a packed Longformer call, from the band rows' ``key_ranges`` (B, S, 2) int32.

    Returns ``{"key_ranges", "side_ranges"}`` for the band pass (a row sees the slots of the globals inside its own
    key range: slots are in sequence order, so they are the contiguous slots ``[#globals before lo, #globals
    before hi)``) and the per-slot ``key_ranges`` (B, G, 2) of the global rows (a global token attends its own
    range; an unused slot gets the empty range, so no kernel plans work for it). ``({}, {})`` without
    ``key_ranges``.

    A function of the masks, ``key_ranges`` and G alone (``pos``, ``used`` derive from the masks): the result is kept
    for the next call with the same, unmodified tensors (``longattn._memo``), so the backward and the other layers'
    calls run none of its torch ops.
    """
    if key_ranges is None:
        return {}, {}
    return _SLOT_RANGES.get(lambda: _slot_ranges(global_mask, key_padding_mask, pos, used, G, key_ranges),
                            (global_mask, key_padding_mask, key_ranges), (G,))


_SLOT_RANGES = LastCall()


def _slot_ranges(global_mask, key_padding_mask, pos, used, G, key_ranges):
    B, S = global_mask.shape
    is_global = global_mask if key_padding_mask is None else global_mask & key_padding_mask
    before = torch.zeros(B, S + 1, dtype=torch.int32, device=global_mask.device)
    before[:, 1:] = torch.cumsum(is_global, 1)
    side = torch.gather(before, 1, key_ranges.clamp(0, S).reshape(B, 2 * S).long()).clamp_(max=G)
    rows = torch.gather(key_ranges, 1, pos[:, :, None].expand(B, pos.shape[1], 2)).mul_(used[:, :, None])
    return {"key_ranges": key_ranges, "side_ranges": side.view(B, S, 2)}, {"key_ranges": rows}


def _expand(pos, x):
    """(B, G) positions -> (B, G, H, D) gather / scatter index for ``x`` (B, S, H, D)."""
    B, G = pos.shape
    return pos.view(B, G, 1, 1).expand(B, G, x.shape[2], x.shape[3])  # view(): half the host cost of [:, :, None]


def forward(backend, q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left, right, scale,
            G, dropout_p=0.0, rng=None, key_ranges=None):
    """-> (out (B, S, H, D), lse (B, H, S), glse (B, H, G), band_rows, pos, used); ``*_global`` may be None
    (= q, k, v). The last three are the slot layout (``global_slots``), returned for ``backward``.

    Dropout (``rng`` = ``[seed, offset]``): band rows use side key ids = slots, global rows the global-row
    counters (``longattn._dropout``). ``key_ranges`` (B, S, 2): each row's sequence bounds in a packed batch
    (``slot_ranges``).

    A backend with ``longformer_forward`` / ``longformer_backward`` (same arguments, without ``backend``; Triton,
    CUDA) runs the whole op in its own launches; others get the composition below (``composed_forward``)."""
    if hasattr(backend, "longformer_forward"):
        return backend.longformer_forward(q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left,
                                          right, scale, G, dropout_p, rng, key_ranges)
    return composed_forward(backend, q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left,
                            right, scale, G, dropout_p, rng, key_ranges)


def composed_forward(backend, q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left, right,
                     scale, G, dropout_p=0.0, rng=None, key_ranges=None):
    """``forward`` from the backend's slot, band and global-rows functions (steps 1-3 of the module docstring)."""
    B, S, H, D = q.shape
    drop = dropout_kwargs(dropout_p, rng)
    band_rows, pos, used = getattr(backend, "global_slots", global_slots)(global_mask, key_padding_mask, G)
    band_ranges, row_ranges = slot_ranges(global_mask, key_padding_mask, pos, used, G, key_ranges)
    if hasattr(backend, "longformer_band_forward"):
        out, lse = backend.longformer_band_forward(q, k, v, pos, used, band_rows, key_padding_mask, left, right,
                                                   scale, **drop, **band_ranges)
    else:
        out, lse = gathered_band_forward(backend.band_side_forward, q, k, v, pos, used, band_rows, key_padding_mask,
                                         left, right, scale, **drop, **band_ranges)
    if G == 0:
        return out, lse, lse.new_empty(B, H, 0), band_rows, pos, used
    glse = backend.global_rows_forward(*global_projections(q, k, v, q_global, k_global, v_global), pos, used,
                                       key_padding_mask, scale, out, **drop, **row_ranges)
    return out, lse, glse, band_rows, pos, used


def backward(backend, dout, q, k, v, q_global, k_global, v_global, out, lse, glse, band_rows, pos, used, global_mask,
             key_padding_mask, left, right, scale, dropout_p=0.0, rng=None, key_ranges=None):
    """-> (dq, dk, dv, dq_global, dk_global, dv_global); the last three are empty (0,) when absent.

    ``band_rows``, ``pos``, ``used``: the slot layout ``forward`` returned (not recomputed)."""
    args = (dout, q, k, v, q_global, k_global, v_global, out, lse, glse, band_rows, pos, used, global_mask,
            key_padding_mask, left, right, scale, dropout_p, rng, key_ranges)
    if hasattr(backend, "longformer_backward"):
        return backend.longformer_backward(*args)
    return composed_backward(backend, *args)


def composed_backward(backend, dout, q, k, v, q_global, k_global, v_global, out, lse, glse, band_rows, pos, used,
                      global_mask, key_padding_mask, left, right, scale, dropout_p=0.0, rng=None, key_ranges=None):
    """``backward`` from the backend's band and global-rows functions."""
    G = glse.shape[-1]
    drop = dropout_kwargs(dropout_p, rng)
    band_ranges, row_ranges = slot_ranges(global_mask, key_padding_mask, pos, used, G, key_ranges)
    if hasattr(backend, "longformer_band_backward"):  # side-key dK/dV added into dk, dv by the backend
        dq, dk, dv = backend.longformer_band_backward(dout, q, k, v, out, lse, pos, used, band_rows, left, right,
                                                      scale, **drop, **band_ranges)
    else:
        dq, dk, dv = gathered_band_backward(backend.band_side_backward, dout, q, k, v, out, lse, pos, used, band_rows,
                                            left, right, scale, **drop, **band_ranges)
    if G == 0:
        return dq, dk, dv, *no_global_rows_grads(q, q_global, k_global, v_global)
    # Global rows have lse = +inf in the band pass, so the band leaves dq = 0 there.
    dqg, dkg, dvg = backend.global_rows_backward(
        dout, *global_projections(q, k, v, q_global, k_global, v_global), out, glse, pos, used, key_padding_mask, scale,
        dq if q_global is None else None, dk if k_global is None else None, dv if v_global is None else None,
        **drop, **row_ranges)
    # Distinct empty tensors: a custom op's outputs may not alias one another.
    return (dq, dk, dv, *(q.new_empty(0) if x is None else g for x, g in ((q_global, dqg), (k_global, dkg),
                                                                          (v_global, dvg))))


def global_projections(q, k, v, q_global, k_global, v_global):
    """The tensors the global rows read: each global projection, or the band's q, k, v where it is None."""
    return (q if q_global is None else q_global, k if k_global is None else k_global,
            v if v_global is None else v_global)


def no_global_rows_grads(q, q_global, k_global, v_global):
    """The global projections' gradients of a call without slots (G = 0): zeros, or empty (0,) for an absent one
    (distinct tensors: a custom op's outputs may not alias one another)."""
    return tuple(q.new_empty(0) if x is None else torch.zeros_like(x, memory_format=_DENSE)
                 for x in (q_global, k_global, v_global))


def gathered_band_forward(band_side_forward, q, k, v, pos, used, band_rows, key_padding_mask, left, right, scale,
                          **kw):
    """Step 2 on a backend's plain primitive -> (out, lse): the slots' tokens gathered as side keys, then padding
    rows zeroed and the lse of non-band rows set to +inf around it (for backends, or calls, without
    ``longformer_band_forward``). ``kw``: the dropout and range keywords."""
    index = _expand(pos, k)
    out, lse = band_side_forward(q, k, v, torch.gather(k, 1, index), torch.gather(v, 1, index), band_rows, used, None,
                                 None, None, left, right, scale, **kw)
    lse.masked_fill_(~band_rows[:, None, :], _INF)
    if key_padding_mask is not None:
        out.masked_fill_(~key_padding_mask[:, :, None, None], 0.0)
    return out, lse


def gathered_band_backward(band_side_backward, dout, q, k, v, out, lse, pos, used, band_rows, left, right, scale,
                           **kw):
    """Backward of :func:`gathered_band_forward` -> (dq, dk, dv), the side keys' dK/dV scattered into rows ``pos``."""
    index = _expand(pos, k)
    dq, dk, dv, dsk, dsv, _, _ = band_side_backward(dout, q, k, v, torch.gather(k, 1, index), torch.gather(v, 1, index),
                                                    out, lse, band_rows, used, None, None, None, left, right, scale,
                                                    **kw)
    if pos.shape[1] > 0:
        # Global tokens are never band keys, so their dk/dv rows are 0 here: adding is exact (and the indices are
        # distinct: deterministic).
        dk.scatter_add_(1, index, dsk)
        dv.scatter_add_(1, index, dsv)
    return dq, dk, dv


def rows_by_gather(rows_forward, rows_backward):
    """The global-rows contract from functions on gathered slot rows.

    ``rows_forward(q_rows, k, v, key_mask, scale) -> (out_rows (B, G, H, D), lse (B, H, G))`` and
    ``rows_backward(dout_rows, q_rows, k, v, out_rows, lse, key_mask, scale, dk_into, dv_into)
    -> (dq_rows, dk, dv)`` become

    ``global_rows_forward(q, k, v, pos, used, key_mask, scale, out) -> glse``: rows ``pos`` of ``q`` attend every
    real token of ``k``, ``v``; used slots' results overwrite those rows of ``out``; ``glse`` is ``+inf`` for
    unused slots (so they get no gradient);

    ``global_rows_backward(dout, q, k, v, out, glse, pos, used, key_mask, scale, dq_into, dk_into, dv_into)
    -> (dq, dk, dv)``: each gradient added into the given ``*_into`` tensor (and returned), or new.

    Dropout keywords (``dropout_p``, ``rng``) and per-slot ``key_ranges`` (B, G, 2), when given, are passed on to
    both functions; row ``s`` of ``q_rows`` is slot ``s`` (the global-row counters of ``longattn._dropout``).
    """

    def global_rows_forward(q, k, v, pos, used, key_mask, scale, out, **drop):
        index = _expand(pos, q)
        rows_out, glse = rows_forward(torch.gather(q, 1, index), k, v, key_mask, scale, **drop)
        glse.masked_fill_(~used[:, None, :], _INF)
        # Unused slots write back what is there: the indices are distinct, so this is deterministic.
        out.scatter_(1, index, torch.where(used[:, :, None, None], rows_out, torch.gather(out, 1, index)))
        return glse

    def global_rows_backward(dout, q, k, v, out, glse, pos, used, key_mask, scale, dq_into, dk_into, dv_into,
                             **drop):
        index = _expand(pos, q)
        dq_rows, dk, dv = rows_backward(torch.gather(dout, 1, index), torch.gather(q, 1, index), k, v,
                                        torch.gather(out, 1, index), glse, key_mask, scale, dk_into, dv_into, **drop)
        # Unused slots have glse = +inf: their dq_rows are 0.
        if dq_into is None:
            return torch.zeros_like(q, memory_format=_DENSE).scatter_(1, index, dq_rows), dk, dv
        return dq_into.scatter_add_(1, index, dq_rows), dk, dv

    return global_rows_forward, global_rows_backward


# Keys per split of ``rows_via_band_side``'s global rows (flash-decoding): the G slot queries of one (b, h) are one
# query tile, so without splits one program walks all S keys; 1024-key splits give S / 1024 programs per (b, h).
SPLIT_KEYS = 1024


class KeySplits:
    """The global rows' keys cut into ``C`` splits of ``n`` keys, each split a batch row of the band primitive.

    Split ``c`` of batch row ``b`` is primitive batch row ``b * C + c``: the slot queries repeated, keys
    ``[c n, (c + 1) n)`` as its side keys (k, v padded to ``C n`` rows when S is not a multiple: padding keys are
    masked), per-slot ranges shifted into the split. ``C = 1`` is the unsplit call, with every tensor passed
    through unchanged (dropout always takes it: its counters number side keys within the call)."""

    def __init__(self, S: int, split_keys: int | None):
        self.S = S
        self.n = S if not split_keys or S <= split_keys else split_keys
        self.C = -(-S // self.n) if S else 1
        self.pad = self.C * self.n - S

    def rows(self, x):
        """(B, G, ...) per-slot rows -> (B * C, G, ...), each split's copy."""
        if self.C == 1:
            return x
        return x[:, None].expand(x.shape[0], self.C, *x.shape[1:]).reshape(-1, *x.shape[1:])

    def keys(self, x):
        """(B, S, ...) keys -> (B * C, n, ...)."""
        if self.C == 1:
            return x
        if self.pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, self.pad))
        return x.reshape(x.shape[0] * self.C, self.n, *x.shape[2:])

    def key_mask(self, key_mask, B: int, device):
        if self.C == 1 or (key_mask is None and not self.pad):
            return key_mask
        if not self.pad:  # no padding keys: the mask itself, one row per split (a view when contiguous)
            return key_mask.reshape(B * self.C, self.n)
        if key_mask is None:
            key_mask = torch.ones(B, self.S, dtype=torch.bool, device=device)
        return torch.nn.functional.pad(key_mask, (0, self.pad), value=False).view(B * self.C, self.n)

    def ranges(self, key_ranges):
        """Per-slot (B, G, 2) key ranges -> (B * C, G, 2) side ranges within each split (kept for the next call with
        the same ranges and splits, as ``slot_ranges``' result is)."""
        if key_ranges is None or self.C == 1:
            return key_ranges
        return _SPLIT_RANGES.get(lambda: self._shifted(key_ranges), (key_ranges,), (self.C, self.n))

    def _shifted(self, key_ranges):
        start = torch.arange(self.C, device=key_ranges.device, dtype=key_ranges.dtype) * self.n
        shifted = key_ranges[:, None] - start[None, :, None, None]
        return shifted.clamp_(0, self.n).reshape(-1, *key_ranges.shape[1:])

    def stats(self, lse):
        """(B, H, G) merged statistics -> (B * C, H, G)."""
        return self.rows(lse)

    def merge(self, out, lse):
        """Splits' ``out (B * C, G, H, D)``, ``lse (B * C, H, G)`` -> the whole rows' ``(out, lse)`` by log-sum-exp
        (+inf lse, zero out: no key in any split). Differentiable in both inputs, and NaN-free for rows with no key
        (the sequence-parallel global rows backpropagate through it)."""
        if self.C == 1:
            return out, lse
        BC, G, H, D = out.shape
        lse = lse.view(-1, self.C, H, G)
        finite = torch.where(lse == torch.inf, -torch.inf, lse)  # an empty split weighs nothing
        top = finite.amax(1, keepdim=True).detach()  # any shift gives the same result: no gradient through it
        weight = torch.exp(finite - torch.where(top == -torch.inf, 0.0, top))  # (B, C, H, G)
        total = weight.sum(1)
        seen = total > 0
        merged = torch.einsum("bchg,bcghd->bghd", weight, out.view(-1, self.C, G, H, D).to(weight.dtype))
        merged = merged / torch.where(seen, total, 1.0).transpose(1, 2)[..., None]
        lse = torch.where(seen, top[:, 0] + torch.log(torch.where(seen, total, 1.0)), torch.inf)
        return merged.to(out.dtype), lse

    def sum_rows(self, x):
        """(B * C, G, ...) per-split gradients -> (B, G, ...)."""
        return x if self.C == 1 else x.view(-1, self.C, *x.shape[1:]).sum(1)

    def unkeys(self, x):
        """(B * C, n, ...) per-split key gradients -> (B, S, ...)."""
        if self.C == 1:
            return x
        x = x.view(-1, self.C * self.n, *x.shape[2:])
        return x[:, :self.S].contiguous() if self.pad else x


_SPLIT_RANGES = LastCall()


def key_splits(S: int, drop: dict) -> KeySplits:
    """The global rows' key splits at call time: about ``SPLIT_KEYS`` keys each (the module value, ``whole_split``),
    none with dropout."""
    return KeySplits(S, None if drop or not SPLIT_KEYS else whole_split(S, SPLIT_KEYS))


@functools.lru_cache(maxsize=256)
def whole_split(S: int, split_keys: int) -> int:
    """Keys per split: the largest divisor of S in ``[split_keys / 2, split_keys]``, so the splits are views of k, v
    (HF pads Longformer / LED inputs to a multiple of the attention window: S = 512 m has one), else ``split_keys``
    (the last split padded: ``KeySplits.keys`` copies k, v)."""
    if S <= split_keys:
        return split_keys
    for n in range(split_keys, (split_keys + 1) // 2 - 1, -1):
        if S % n == 0:
            return n
    return split_keys


def _split_keys(sp, qs, k, v, key_mask):
    """The band primitive's (side_k, side_v, band_key_mask, side_mask) for the split rows ``qs``: each split's keys
    as side keys, and an empty band."""
    no_band = torch.zeros(qs.shape[:2], dtype=torch.bool, device=qs.device)
    return sp.keys(k), sp.keys(v), no_band, sp.key_mask(key_mask, k.shape[0], k.device)


def split_rows_forward(band_side_forward, sp, qs, k, v, key_mask, scale, key_ranges=None, **drop):
    """The slot queries of every split, ``qs`` (B * C, G, H, D) (``sp.rows`` of the gathered rows), against their
    split's keys on a band primitive -> the unmerged ``(out (B * C, G, H, D), lse (B * C, H, G))``, which
    ``sp.merge`` combines."""
    side_k, side_v, no_band, side_mask = _split_keys(sp, qs, k, v, key_mask)
    return band_side_forward(qs, qs, qs, side_k, side_v, no_band, side_mask, None, None, None, 0, 0, scale,
                             global_rows=True, **drop, **ranges_kwargs(None, sp.ranges(key_ranges)))


def split_rows_backward(band_side_backward, sp, douts, qs, k, v, outs, lse, key_mask, scale, dk_into=None,
                        dv_into=None, key_ranges=None, **drop):
    """Backward of :func:`split_rows_forward`; ``douts``, ``qs``, ``outs`` (B * C, G, H, D) are every split's copy of
    the rows, ``outs`` the merged rows and ``lse`` (B, H, G) the merged statistics (so each split's probabilities and
    ``delta`` are the whole row's) -> ``(dq (B * C, G, H, D) per split, dk, dv)``, dk / dv added into ``dk_into`` /
    ``dv_into`` when given."""
    side_k, side_v, no_band, side_mask = _split_keys(sp, qs, k, v, key_mask)
    dq_parts, _, _, dk, dv, _, _ = band_side_backward(
        douts, qs, qs, qs, side_k, side_v, outs, sp.stats(lse), no_band, side_mask, None, None, None, 0, 0, scale,
        global_rows=True, **drop, **ranges_kwargs(None, sp.ranges(key_ranges)))
    dk, dv = sp.unkeys(dk), sp.unkeys(dv)
    dk = dk if dk_into is None else dk_into.add_(dk)
    dv = dv if dv_into is None else dv_into.add_(dv)
    return dq_parts, dk, dv


def rows_via_band_side(band_side_forward, band_side_backward):
    """The global-rows contract on a backend's band primitive (``rows_by_gather`` of the functions below).

    The slot queries (B, G, H, D) are the "sequence" of the primitive, with an empty band (every band key
    masked) and the S tokens as side keys masked by ``key_padding_mask``. Split-KV (flash-decoding): the keys are
    cut into ``SPLIT_KEYS``-key splits (``KeySplits``; the module value at call time), each a batch row of the
    primitive, merged by log-sum-exp;
    the backward runs every split against the merged ``out`` and ``lse`` (so its probabilities and ``delta`` are
    the whole row's) and sums the splits' dQ. The band functions must take the dropout keywords and
    ``global_rows=True`` (row s then draws slot s's global-row dropout counters, its keys the side-key ids: the
    layout of ``longattn._dropout``); with dropout the keys are not split.
    """

    def rows_forward(q_rows, k, v, key_mask, scale, key_ranges=None, **drop):
        sp = key_splits(k.shape[1], drop)
        return sp.merge(*split_rows_forward(band_side_forward, sp, sp.rows(q_rows), k, v, key_mask, scale, key_ranges,
                                            **drop))

    def rows_backward(dout_rows, q_rows, k, v, out_rows, lse, key_mask, scale, dk_into=None, dv_into=None,
                      key_ranges=None, **drop):
        sp = key_splits(k.shape[1], drop)
        dq_parts, dk, dv = split_rows_backward(band_side_backward, sp, sp.rows(dout_rows), sp.rows(q_rows), k, v,
                                               sp.rows(out_rows), lse, key_mask, scale, dk_into, dv_into, key_ranges,
                                               **drop)
        return sp.sum_rows(dq_parts), dk, dv

    return rows_by_gather(rows_forward, rows_backward)
