"""The portable torch backend: the CPU path and the semantic reference for every kernel.

It follows the contract in ``longattn.backends`` with plain torch ops, processing queries in chunks of
``n`` rows so memory stays O(B*S*H*D) plus one chunk's scores, never S x S and never HF's 2x-redundant
overlapping-chunk layout.

Chunk layout: queries ``i0 .. i0+n-1`` see band keys ``j = i0 - left + c`` for ``c in [0, n + left + right)``
(rows outside [0, S) are zero-filled and masked). Query row ``r`` then finds its band offset
``t = j - i + left`` at column ``c = r + t``, so the band of the chunk is the strided view
``X[r, r + t]`` (``_band_view``): bias tables are added, and their gradients summed, through that view
with no index tensors and no atomics.

Per-row key ranges (packed variable-length batches, ``key_ranges`` / ``side_ranges``): keys outside a row's range
are masked like padding. On the CPU the ranges are also read once per call to plan the work: a chunk computes only
the side keys its rows' ranges reach and skips the range mask where every row sees all the chunk's keys, and the
global-rows pass computes a key chunk only for the slots whose ranges reach it. Elsewhere (that read would sync a
GPU) every chunk is computed in full and masked.

Precision: the two matmuls take inputs in the input dtype and their fp16/bf16 results are rounded to it
before the float32 widening (torch's matmul output dtype; HF's einsum does the same), so half-precision
scores here carry one more rounding than the kernels' float32 accumulators: the tolerance rule's baseline is
this slightly looser error. Softmax and the log-sum-exp run in float32 (float64 for float64), gradients are
accumulated in float32 and cast at the end.
"""

from __future__ import annotations

import torch

from .. import _dropout
from .._fake import stat_dtype
from . import _longformer

NAME = "torch"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# One chunk's float32 score tensor is kept near this many elements (~64 MiB).
_CHUNK_ELEMENTS = 1 << 24


def unavailable_reasons(device: torch.device) -> list[str]:
    return []


def unsupported_reasons(device, dtype, head_dim, op, features=()) -> list[str]:
    # Every feature ("grouped_kv", "dropout", "ranges", "halo", "lse_grad", "dropout_offset") is supported: this
    # backend is the reference.
    if dtype not in SUPPORTED_DTYPES:
        return [f"dtype {dtype} is not one of {SUPPORTED_DTYPES}"]
    return []




def _dense(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` contiguous in ``dtype`` with one copy (``.to(dtype).contiguous()`` copies twice for a strided x)."""
    if x.dtype == dtype:
        return x.contiguous()
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _chunk_rows(B: int, H: int, S: int, width: int, G: int) -> int:
    """Query rows per chunk: about half a band wide (little wasted work), bounded by the memory budget."""
    rows = max(64, -(-(width // 2) // 64) * 64)
    budget = max(16, _CHUNK_ELEMENTS // max(1, B * H * (rows + width + G)))
    return max(1, min(S, rows, budget))


def _in_ranges(ranges: torch.Tensor, i0: int, i1: int, c0: int, c1: int) -> torch.Tensor:
    """(B, i1 - i0, c1 - c0) bool: rows i0..i1-1 of ``ranges`` (B, R, 2) allow key ``c`` in [c0, c1), i.e.
    ``ranges[b, i, 0] <= c < ranges[b, i, 1]`` (any values: an empty or reversed range allows nothing)."""
    r = ranges[:, i0:i1].long()
    c = torch.arange(c0, c1, device=ranges.device)
    return (c >= r[..., 0:1]) & (c < r[..., 1:2])


def _range_bounds(ranges: torch.Tensor | None, n: int, rows: int, S: int) -> list[tuple[int, ...]] | None:
    """Per chunk of ``rows`` query rows (of ``ranges`` (B, S, 2), clamped to [0, n]): ``(lo, hi, lo_max, hi_min)``,
    where ``[lo, hi)`` is the smallest span holding every key some row of the chunk (in any batch row) may see
    (``(n, 0)`` when none) and every row's range holds ``[lo_max, hi_min)`` (a chunk's key columns inside it need
    no mask).

    None (masks everywhere, nothing skipped) without ranges or off the CPU: the bounds are read on the host (one
    transfer per call), which on a GPU would be a device sync. Packed batches have monotone ranges, so a chunk's
    span is its own sequences' keys (e.g. their side keys of a concatenated TGlobal batch: the rest is never
    computed), and a chunk inside one sequence needs no range mask at all."""
    if ranges is None or ranges.device.type != "cpu":
        return None
    lo, hi = ranges[..., 0].long().clamp(0, n), ranges[..., 1].long().clamp(0, n)  # (B, S)
    live = hi > lo
    pad = -S % rows

    def per_chunk(x, fill):
        return torch.nn.functional.pad(x, (0, pad), value=fill).view(x.shape[0], -1, rows)

    stats = torch.stack([per_chunk(lo.masked_fill(~live, n), n).amin(dim=(0, 2)),
                         per_chunk(hi.masked_fill(~live, 0), 0).amax(dim=(0, 2)),
                         per_chunk(lo, 0).amax(dim=(0, 2)), per_chunk(hi, n).amin(dim=(0, 2))], 1)
    return [tuple(row) for row in stats.tolist()]


def _band_view(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, n, n + width - 1) chunk -> (B, H, n, width) view with ``view[..., r, t] = x[..., r, r + t]``."""
    B, H, n, m = x.shape
    sb, sh, sr, sc = x.stride()
    return x.as_strided((B, H, n, width), (sb, sh, sr + sc, sc), x.storage_offset())


def _band_keys(xt: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """Rows k0..k1-1 of a (B, H, S, D) view, zero-filled where outside [0, S)."""
    S = xt.shape[2]
    if k0 >= 0 and k1 <= S:
        return xt[:, :, k0:k1]
    out = xt.new_zeros(xt.shape[0], xt.shape[1], k1 - k0, xt.shape[3])
    lo, hi = max(k0, 0), min(k1, S)
    if hi > lo:
        out[:, :, lo - k0 : hi - k0] = xt[:, :, lo:hi]
    return out


def _by_kv_head(x: torch.Tensor, H_kv: int) -> torch.Tensor:
    """(B, H, n, X) -> (B, H_kv, H // H_kv * n, X): the rows of the query heads sharing a K/V head, stacked
    (a view for H_kv = H; otherwise a copy of this query-sized chunk, never of K/V)."""
    B, H, n, X = x.shape
    return x.reshape(B, H_kv, H // H_kv * n, X)


class _Problem:
    """The normalised inputs of one call, as (B, H, S, D) views, and the per-chunk score builder."""

    def __init__(self, q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias,
                 left, right, scale, dropout_p=0.0, rng=None, key_ranges=None, side_ranges=None, dropout_offset=0):
        self.B, self.S, self.H, self.D = q.shape
        self.dropout_offset = dropout_offset  # the keep bits' position of row 0 and band key 0
        self.H_kv = k.shape[2]  # grouped-query attention: query head h reads K/V head h // (H // H_kv)
        self.dropout_p, self.rng = dropout_p, rng
        self.G = side_k.shape[1]
        self.left, self.right, self.width = left, right, left + right + 1
        self.scale = scale
        self.dtype = q.dtype
        self.acc = stat_dtype(q.dtype)
        self.qt, self.kt, self.vt = (x.transpose(1, 2) for x in (q, k, v))
        self.skt, self.svt = side_k.transpose(1, 2), side_v.transpose(1, 2)
        self.band_key_mask = band_key_mask
        self.side_mask = side_mask
        self.query_block = query_block
        self.band_bias = None if band_bias is None else band_bias.to(self.acc)
        self.side_bias = None if side_bias is None else side_bias.to(self.acc)
        self.rows = _chunk_rows(self.B, self.H, self.S, self.width, self.G)
        self._geometry_cache = {}
        # Per-row key ranges (packed batches): band / side keys outside them are masked; each chunk computes only
        # the side keys of its rows' ranges and skips masks its keys do not need (``_range_bounds``).
        self.key_ranges, self.side_ranges = key_ranges, side_ranges
        self._key_bounds = _range_bounds(key_ranges, self.S, self.rows, self.S)
        self._side_bounds = _range_bounds(side_ranges, self.G, self.rows, self.S)

    def mm(self, a, b):
        """``a @ b`` for ``a`` (B, H, n, X) per query head and ``b`` (B, H_kv, X, Y) per K/V head -> (B, H, n, Y).

        Grouped-query attention without repeating K/V: the ``H // H_kv`` query heads of a K/V head are stacked
        as rows of one matrix (``_by_kv_head``), so each K/V tile is read by one plain matmul.
        """
        out = torch.matmul(_by_kv_head(a, self.H_kv), b)
        return out.view(self.B, self.H, a.shape[2], out.shape[-1])

    def mm_kv(self, a, b):
        """``a^T @ b`` summed over each K/V head's query heads: a (B, H, n, X), b (B, H, n, Y) -> (B, H_kv, X, Y)
        (the K/V gradients of grouped-query attention, the group sum folded into the matmul's reduction)."""
        return torch.matmul(_by_kv_head(a, self.H_kv).transpose(-1, -2), _by_kv_head(b, self.H_kv))

    def chunks(self):
        for i0 in range(0, self.S, self.rows):
            yield i0, min(self.S, i0 + self.rows)

    def band_kv(self, i0, i1):
        k0, k1 = i0 - self.left, i1 + self.right
        return _band_keys(self.kt, k0, k1), _band_keys(self.vt, k0, k1)

    def _band_mask(self, i0, i1, device):
        """Additive float mask (0 / -inf) of the chunk's band: (1 or B, 1, n, n + L + R).

        The geometry (offset in [0, L+R] and key inside [0, S)) is the same for every interior chunk of a
        given size, so it is built once and reused; key padding adds a (B, 1, 1, m) term per chunk.
        """
        n, width, S = i1 - i0, self.width, self.S
        k0 = i0 - self.left
        interior = k0 >= 0 and i1 + self.right <= S
        key = (n, device) if interior else None
        geometry = self._geometry_cache.get(key) if key else None
        if geometry is None:
            cols = torch.arange(n + width - 1, device=device)
            offset = cols[None, :] - torch.arange(n, device=device)[:, None]  # t = j - i + left
            keep = (offset >= 0) & (offset < width) & ((cols + k0 >= 0) & (cols + k0 < S))[None, :]
            geometry = torch.zeros(n, n + width - 1, dtype=self.acc, device=device).masked_fill_(~keep, -torch.inf)
            if key:
                self._geometry_cache[key] = geometry
        if self.band_key_mask is None:
            return geometry[None, None]
        lo, hi = max(k0, 0), min(i1 + self.right, S)
        keys = torch.full((self.B, n + width - 1), -torch.inf, dtype=self.acc, device=device)
        keys[:, lo - k0 : hi - k0].masked_fill_(self.band_key_mask[:, lo:hi], 0.0)
        return (geometry[None] + keys[:, None, :])[:, None]

    def side_span(self, i0, i1):
        """The side keys ``[g0, g1)`` the chunk computes: all G, or the span of its rows' ``side_ranges``."""
        if self._side_bounds is None:
            return 0, self.G
        lo, hi = self._side_bounds[i0 // self.rows][:2]
        return (lo, hi) if hi > lo else (0, 0)

    @staticmethod
    def _needs_range_mask(bounds, chunk, c0, c1):
        """Whether some row of ``chunk`` may not see some key in [c0, c1) (always, without host bounds)."""
        if bounds is None:
            return True
        _, _, lo_max, hi_min = bounds[chunk]
        return c1 > c0 and not (lo_max <= c0 and hi_min >= c1)

    def scores(self, i0, i1, qc, kb):
        """Masked float32 scores of queries i0..i1-1: band (B, H, n, n+L+R) and side (B, H, n, g1 - g0) for the
        chunk's ``side_span`` (None when it is empty)."""
        band = self.mm(qc, kb.transpose(-1, -2)).to(self.acc)
        if self.scale != 1.0:
            band.mul_(self.scale)
        band += self._band_mask(i0, i1, qc.device)
        k0, k1 = i0 - self.left, i1 + self.right
        if self.key_ranges is not None and self._needs_range_mask(self._key_bounds, i0 // self.rows, max(k0, 0),
                                                                  min(k1, self.S)):
            band.masked_fill_(~_in_ranges(self.key_ranges, i0, i1, k0, k1)[:, None], -torch.inf)
        if self.band_bias is not None:
            _band_view(band, self.width).add_(self.band_bias[None, :, None, :])
        g0, g1 = self.side_span(i0, i1)
        if g1 <= g0:
            return band, None
        side = self.mm(qc, self.skt[:, :, g0:g1].transpose(-1, -2)).to(self.acc)
        if self.scale != 1.0:
            side.mul_(self.scale)
        if self.side_bias is not None:
            index = self._side_bias_index(i0, i1, g0, g1)  # (B, n, g1 - g0)
            side += self.side_bias[:, index].permute(1, 0, 2, 3)
        if self.side_mask is not None:
            side = side.masked_fill_(~self.side_mask[:, None, None, g0:g1], -torch.inf)
        if self.side_ranges is not None and self._needs_range_mask(self._side_bounds, i0 // self.rows, g0, g1):
            side.masked_fill_(~_in_ranges(self.side_ranges, i0, i1, g0, g1)[:, None], -torch.inf)
        return band, side

    def _side_bias_index(self, i0, i1, g0, g1):
        # Block ids are clamped to [-1, G - 1] (values are not checked on the host): the index is in [1, 2G].
        g = torch.arange(g0, g1, device=self.query_block.device)
        return g[None, None, :] - self.query_block[:, i0:i1, None].long().clamp(-1, self.G - 1) + self.G

    def keep_scale(self, i0, i1):
        """Dropout factors ``Z = keep / (1 - p)`` of the chunk (``_dropout``'s counter layout), in the accumulation
        dtype: band (B, H, n, n + L + R) over keys ``i0 - left ..`` (sliced by ``_band_view`` like the scores) and
        side (B, H, n, g1 - g0) over the chunk's ``side_span``; None without dropout."""
        if not self.dropout_p:
            return None, None
        n, at = i1 - i0, self.dropout_offset
        args = (self.rng, self.dropout_p, self.B, self.H, i0 + at, i1 - i0)
        scale = _dropout.dropout_scale(self.dropout_p)
        band = _dropout.keep_mask_rect(*args, i0 - self.left + at, n + self.width - 1).to(self.acc).mul_(scale)
        g0, g1 = self.side_span(i0, i1)
        if g1 <= g0:
            return band, None
        return band, _dropout.keep_mask_rect(*args, g0, g1 - g0, side=True).to(self.acc).mul_(scale)

    def probabilities(self, band, side, lse):
        """exp(score - lse) in place; rows with lse = +inf become 0."""
        band = band.sub_(lse[..., None]).exp_()
        if side is not None:
            side = side.sub_(lse[..., None]).exp_()
        return band, side


def band_side_forward(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias,
                      left, right, scale, dropout_p=0.0, rng=None, key_ranges=None, side_ranges=None, *, halo_k=None,
                      halo_v=None, halo_mask=None, halo_left=0, dropout_offset=0):
    if halo_k is not None:
        _check_halo_alone(key_ranges, side_ranges)
        halo = _Halo(halo_k, halo_v, halo_mask, halo_left, q.shape[1])
        out, lse = band_side_forward(halo.rows(q), halo.keys(k, halo_k), halo.keys(v, halo_v), side_k, side_v,
                                     halo.key_mask(band_key_mask), side_mask, halo.rows(query_block, -1), band_bias,
                                     side_bias, left, right, scale, dropout_p, rng,
                                     dropout_offset=dropout_offset - halo_left)
        return halo.local(out, 1), halo.local(lse, 2)
    P = _Problem(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias,
                 left, right, scale, dropout_p, rng, key_ranges, side_ranges, dropout_offset)
    out = torch.empty(P.B, P.S, P.H, P.D, dtype=q.dtype, device=q.device)
    lse = torch.empty(P.B, P.H, P.S, dtype=stat_dtype(q.dtype), device=q.device)
    out_t = out.transpose(1, 2)
    for i0, i1 in P.chunks():
        qc = P.qt[:, :, i0:i1]
        kb, vb = P.band_kv(i0, i1)
        band, side = P.scores(i0, i1, qc, kb)
        row_max = band.amax(-1)
        if side is not None:
            row_max = torch.maximum(row_max, side.amax(-1))
        empty = row_max == -torch.inf
        row_max.masked_fill_(empty, 0.0)
        # Unnormalised probabilities once; the division by the row sum happens on the (n, D) output.
        band = band.sub_(row_max[..., None]).exp_()
        total = band.sum(-1)  # the normaliser is taken before dropout (dropout acts on the probabilities)
        zb, zs = P.keep_scale(i0, i1)
        if zb is not None:
            band.mul_(zb)
        oc = P.mm(band.to(q.dtype), vb).to(P.acc)
        if side is not None:
            side = side.sub_(row_max[..., None]).exp_()
            total += side.sum(-1)
            if zs is not None:
                side.mul_(zs)
            g0, g1 = P.side_span(i0, i1)
            oc += P.mm(side.to(q.dtype), P.svt[:, :, g0:g1]).to(P.acc)
        oc /= total.masked_fill(empty, 1.0)[..., None]
        row_lse = (row_max + total.log()).masked_fill_(empty, torch.inf)
        out_t[:, :, i0:i1] = oc
        lse[:, :, i0:i1] = row_lse
    return out, lse


def band_side_backward(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block,
                       band_bias, side_bias, left, right, scale, dropout_p=0.0, rng=None, key_ranges=None,
                       side_ranges=None, *, halo_k=None, halo_v=None, halo_mask=None, halo_left=0, dropout_offset=0,
                       dlse=None):
    """With dropout (``Z = keep / (1 - p)``): ``dV = (P Z)^T dO``, ``dS = P (Z dO V^T - delta)``. With ``dlse``
    (the gradient of ``lse``): ``dS = P (dP - delta + dlse)``, as ``d lse_i / d s_ij = P_ij``."""
    if halo_k is not None:
        _check_halo_alone(key_ranges, side_ranges)
        halo = _Halo(halo_k, halo_v, halo_mask, halo_left, q.shape[1])
        dq, dk, dv, *rest = band_side_backward(
            halo.rows(dout), halo.rows(q), halo.keys(k, halo_k), halo.keys(v, halo_v), side_k, side_v, halo.rows(out),
            halo.rows(lse, torch.inf, dim=2), halo.key_mask(band_key_mask), side_mask, halo.rows(query_block, -1),
            band_bias, side_bias, left, right, scale, dropout_p, rng, dropout_offset=dropout_offset - halo_left,
            dlse=None if dlse is None else halo.rows(dlse, 0.0, dim=2))
        return (halo.local(dq, 1), halo.local(dk, 1), halo.local(dv, 1), *rest, halo.outside(dk), halo.outside(dv))
    P = _Problem(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias,
                 left, right, scale, dropout_p, rng, key_ranges, side_ranges, dropout_offset)
    acc, dt = P.acc, q.dtype
    dout_t, out_t = dout.transpose(1, 2), out.transpose(1, 2)
    dq = torch.empty(P.B, P.S, P.H, P.D, dtype=dt, device=q.device)
    dk = torch.empty(P.B, P.S, P.H_kv, P.D, dtype=dt, device=q.device)  # K/V's heads (grouped-query: H_kv < H)
    dv = torch.empty_like(dk)
    dsk = torch.zeros(P.B, P.H_kv, P.G, P.D, dtype=acc, device=q.device)
    dsv = torch.zeros_like(dsk)
    dbb = torch.zeros(P.H, P.width, dtype=acc, device=q.device) if band_bias is not None else None
    dsb = torch.zeros(P.H, 2 * P.G + 1, dtype=acc, device=q.device) if side_bias is not None else None
    dq_t = dq.transpose(1, 2)
    band_keys = _KeyGradWindow(dk.transpose(1, 2), dv.transpose(1, 2), left, right)
    for i0, i1 in P.chunks():
        qc, doc = P.qt[:, :, i0:i1], dout_t[:, :, i0:i1]
        kb, vb = P.band_kv(i0, i1)
        band, side = P.scores(i0, i1, qc, kb)
        row_lse = lse[:, :, i0:i1].to(acc)
        band, side = P.probabilities(band, side, row_lse)
        delta = (doc.to(acc) * out_t[:, :, i0:i1].to(acc)).sum(-1, keepdim=True)
        if dlse is not None:  # rows with lse = +inf have P = 0: whatever dlse holds there must not reach dS
            delta -= torch.where(row_lse < torch.inf, dlse[:, :, i0:i1].to(acc), 0.0)[..., None]
        # dS = P * (dP - delta), in place over the probabilities once dV has used them.
        zb, zs = P.keep_scale(i0, i1)
        dvc = P.mm_kv(_dropped(band, zb).to(dt), doc).to(acc)
        dband = band.mul_(_dropped(P.mm(doc, vb.transpose(-1, -2)).to(acc), zb, True).sub_(delta))
        if dbb is not None:
            dbb += _band_view(dband, P.width).sum(dim=(0, 2))
        dband16 = dband.to(dt)
        dqc = P.mm(dband16, kb).to(acc)
        dkc = P.mm_kv(dband16, qc).to(acc).mul_(scale)
        band_keys.add(i0, i1, dkc, dvc, last=i1 == P.S)
        if side is not None:
            g0, g1 = P.side_span(i0, i1)
            dsv[:, :, g0:g1] += P.mm_kv(_dropped(side, zs).to(dt), doc).to(acc)
            dside = side.mul_(_dropped(P.mm(doc, P.svt[:, :, g0:g1].transpose(-1, -2)).to(acc), zs, True).sub_(delta))
            if dsb is not None:
                index = P._side_bias_index(i0, i1, g0, g1)  # (B, n, g1 - g0)
                flat = dside.permute(1, 0, 2, 3).reshape(P.H, -1)
                dsb.index_add_(1, index.reshape(-1), flat)
            dside16 = dside.to(dt)
            dqc += P.mm(dside16, P.skt[:, :, g0:g1]).to(acc)
            dsk[:, :, g0:g1] += P.mm_kv(dside16, qc).to(acc).mul_(scale)
        dq_t[:, :, i0:i1] = dqc.mul_(scale)
    return (
        dq,
        dk,
        dv,
        _dense(dsk.transpose(1, 2), dt),
        _dense(dsv.transpose(1, 2), dt),
        q.new_empty(0) if dbb is None else dbb.to(band_bias.dtype),
        q.new_empty(0) if dsb is None else dsb.to(side_bias.dtype),
    )


def _check_halo_alone(key_ranges, side_ranges):
    if key_ranges is not None or side_ranges is not None:
        raise ValueError("key_ranges / side_ranges: not supported together with halo keys (halo_k)")


class _Halo:
    """Halo keys as the reference computes them: today's call on the extended sequence ``[left halo | local |
    right halo]`` (copies: the kernels read the halo in place instead), with zero query rows for the halo that
    give no output and, with ``lse = +inf``, no gradient (contract: ``longattn.backends``, "Halo keys")."""

    def __init__(self, halo_k, halo_v, halo_mask, halo_left: int, S: int):
        self.hl, self.hr, self.S = halo_left, halo_k.shape[1] - halo_left, S
        self.halo_mask = halo_mask

    def keys(self, x, halo):
        """(B, S, ...) local rows -> (B, HL + S + HR, ...) extended rows."""
        return torch.cat([halo[:, :self.hl], x, halo[:, self.hl:]], 1)

    def key_mask(self, band_key_mask):
        if band_key_mask is None and self.halo_mask is None:
            return None
        B = (band_key_mask if band_key_mask is not None else self.halo_mask).shape[0]
        ones = torch.ones(B, self.S + self.hl + self.hr, dtype=torch.bool,
                          device=(band_key_mask if band_key_mask is not None else self.halo_mask).device)
        local = ones[:, :self.S] if band_key_mask is None else band_key_mask
        halo = ones[:, :self.hl + self.hr] if self.halo_mask is None else self.halo_mask
        return self.keys(local, halo)

    def rows(self, x, fill=0, dim=1):
        """Local rows padded to the extended length along ``dim`` with ``fill`` (None stays None)."""
        if x is None:
            return None
        pad = [0, 0] * (x.dim() - 1 - dim) + [self.hl, self.hr]
        return torch.nn.functional.pad(x, pad, value=fill)

    def local(self, x, dim):
        return x.narrow(dim, self.hl, self.S).contiguous()

    def outside(self, x):
        """The halo rows of an extended (B, HL + S + HR, ...) tensor, packed as the halo buffers."""
        return torch.cat([x[:, :self.hl], x[:, self.hl + self.S:]], 1)


def _dropped(x, z, inplace=False):
    """``x * z`` (dropout factors ``z``, or None: ``x`` itself); in place with ``inplace``."""
    if z is None:
        return x
    return x.mul_(z) if inplace else x * z


class _KeyGradWindow:
    """Band dK/dV accumulated in float32 over a sliding window of keys, written out once final.

    Query chunk ``[i0, i1)`` touches keys ``[i0 - left, i1 + right)``; the next chunk starts at key
    ``i1 - left``, so keys below it are complete and are written to ``dk`` / ``dv`` (in their dtype) at once,
    and only the ``left + right`` overlapping keys are carried to the next chunk. Memory: one chunk's worth
    of float32 rows instead of two full-length float32 buffers.
    """

    def __init__(self, dk_t, dv_t, left, right):
        self.dk_t, self.dv_t = dk_t, dv_t  # (B, H, S, D) views of the outputs
        self.left, self.overlap = left, left + right
        self.carry = None

    def add(self, i0, i1, dkc, dvc, last):
        """dkc, dvc: (B, H, i1 - i0 + left + right, D) float32 gradients of keys ``[i0 - left, i1 + right)``."""
        if self.carry is not None and self.overlap:
            dkc[:, :, : self.overlap] += self.carry[0]
            dvc[:, :, : self.overlap] += self.carry[1]
        done = dkc.shape[2] if last else i1 - i0
        k0, S = i0 - self.left, self.dk_t.shape[2]
        lo, hi = max(k0, 0), min(k0 + done, S)
        if hi > lo:
            self.dk_t[:, :, lo:hi] = dkc[:, :, lo - k0 : hi - k0]
            self.dv_t[:, :, lo:hi] = dvc[:, :, lo - k0 : hi - k0]
        self.carry = (dkc[:, :, done:], dvc[:, :, done:])


# --------------------------------------------------------------------------------------------------------
# Longformer global rows: G queries against all S keys, split over key chunks and merged by log-sum-exp
# --------------------------------------------------------------------------------------------------------


# Keys per chunk of the global-rows pass: its float32 dK/dV chunks stay a small fraction of a (B, S, H, D) tensor.
_KEY_CHUNK = 256


def _key_chunks(B, H, G, S):
    n = max(16, min(_KEY_CHUNK, _CHUNK_ELEMENTS // max(1, B * H * G)))
    return [(j0, min(S, j0 + n)) for j0 in range(0, S, n)]


def _row_scores(qt, kt, key_mask, j0, j1, scale, acc, key_ranges=None):
    """(B, H, G, j1 - j0) float scores of the slot queries against keys j0..j1-1; -inf for padding keys and keys
    outside the slot's ``key_ranges`` (B, G, 2)."""
    s = torch.matmul(qt, kt[:, :, j0:j1].transpose(-1, -2)).to(acc)
    if scale != 1.0:
        s.mul_(scale)
    if key_mask is not None:
        s.masked_fill_(~key_mask[:, None, None, j0:j1], -torch.inf)
    if key_ranges is not None:
        s.masked_fill_(~_in_ranges(key_ranges, 0, key_ranges.shape[1], j0, j1)[:, None], -torch.inf)
    return s


def _row_plan(B, H, G, S, key_ranges):
    """``(j0, j1, s0, s1)`` per key chunk of the global-rows pass: slots ``s0 .. s1-1`` compute it. Without ranges
    (or off the CPU: deciding reads the ranges on the host) every slot computes every chunk; with them a chunk is
    computed only for the slots from the first to the last whose range reaches it, and skipped when none does
    (packed batches: slots in sequence order, so a key chunk is computed by its own sequences' slots only)."""
    chunks = _key_chunks(B, H, G, S)
    if key_ranges is None or key_ranges.device.type != "cpu" or not chunks or G == 0:
        return [(j0, j1, 0, G) for j0, j1 in chunks]
    lo, hi = key_ranges[..., 0].long().clamp(0, S), key_ranges[..., 1].long().clamp(0, S)  # (B, G)
    starts = torch.tensor([j0 for j0, _ in chunks])
    ends = torch.tensor([j1 for _, j1 in chunks])
    hit = ((lo[..., None] < ends) & (hi[..., None] > starts) & (hi > lo)[..., None]).any(0)  # (G, chunks)
    slot = torch.arange(G)[:, None]
    first = torch.where(hit, slot, G).amin(0).tolist()
    last = torch.where(hit, slot, -1).amax(0).tolist()
    return [(j0, j1, s0, s1 + 1) for (j0, j1), s0, s1 in zip(chunks, first, last) if s1 >= s0]


def _rows_keep_scale(dropout_p, rng, B, H, s0, s1, j0, j1, acc):
    """Dropout factors (B, H, s1 - s0, j1 - j0) of the global rows (slots s0..s1-1) against keys j0..j1-1, or
    None."""
    if not dropout_p:
        return None
    keep = _dropout.keep_mask_rect(rng, dropout_p, B, H, s0, s1 - s0, j0, j1 - j0, side=True, global_rows=True)
    return keep.to(acc).mul_(_dropout.dropout_scale(dropout_p))


def _rows_forward(q_rows, k, v, key_mask, scale, dropout_p=0.0, rng=None, key_ranges=None):
    """-> (out (B, G, H, D), lse (B, H, G)): q_rows (B, G, H, D) attending every real token of k, v (B, S, H, D)
    (of slot s's ``key_ranges[:, s]`` when given: contiguous int32 (B, G, 2), any values).

    Each key chunk gives a partial (max, sum, out); partials are merged in key order by the log-sum-exp
    rule (flash-decoding's split-KV combine, here sequential), so memory is one chunk's scores. Dropout
    (global-row counters: row = slot) scales the probabilities after the sum is taken.
    """
    B, G, H, D = q_rows.shape
    S, acc = k.shape[1], stat_dtype(q_rows.dtype)
    qt, kt, vt = q_rows.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    m = torch.full((B, H, G), -torch.inf, dtype=acc, device=q_rows.device)
    total = torch.zeros(B, H, G, dtype=acc, device=q_rows.device)
    o = torch.zeros(B, H, G, D, dtype=acc, device=q_rows.device)
    for j0, j1, s0, s1 in _row_plan(B, H, G, S, key_ranges):
        ranges = None if key_ranges is None else key_ranges[:, s0:s1]
        m_old = m[:, :, s0:s1]
        s = _row_scores(qt[:, :, s0:s1], kt, key_mask, j0, j1, scale, acc, ranges)
        m_new = torch.maximum(m_old, s.amax(-1))
        m_safe = m_new.masked_fill(m_new == -torch.inf, 0.0)
        alpha = (m_old - m_safe).exp_()
        p = s.sub_(m_safe[..., None]).exp_()
        total[:, :, s0:s1].mul_(alpha).add_(p.sum(-1))
        p = _dropped(p, _rows_keep_scale(dropout_p, rng, B, H, s0, s1, j0, j1, acc), True)
        o[:, :, s0:s1].mul_(alpha[..., None]).add_(torch.matmul(p.to(q_rows.dtype), vt[:, :, j0:j1]).to(acc))
        m_old.copy_(m_new)
    empty = total == 0
    out = _dense((o / total.masked_fill(empty, 1.0)[..., None]).transpose(1, 2), q_rows.dtype)
    lse = (m + total.log()).masked_fill_(empty, torch.inf)
    return out, lse


def _rows_backward(dout_rows, q_rows, k, v, out_rows, lse, key_mask, scale, dk_into=None, dv_into=None,
                   dropout_p=0.0, rng=None, key_ranges=None):
    """-> (dq_rows, dk, dv) of ``global_rows_forward``; dk / dv are added into ``dk_into`` / ``dv_into``
    (and returned) when given, one key chunk at a time, so no full-length temporary exists."""
    B, G, H, D = q_rows.shape
    S, acc, dt = k.shape[1], stat_dtype(q_rows.dtype), q_rows.dtype
    qt, kt, vt, dot = (x.transpose(1, 2) for x in (q_rows, k, v, dout_rows))
    delta = (dout_rows.to(acc) * out_rows.to(acc)).sum(-1).transpose(1, 2)[..., None]  # (B, H, G, 1)
    new = torch.empty if key_ranges is None else torch.zeros  # key chunks no slot reaches are skipped below
    dk = new(B, S, H, D, dtype=dt, device=k.device) if dk_into is None else dk_into
    dv = new(B, S, H, D, dtype=dt, device=k.device) if dv_into is None else dv_into
    dk_t, dv_t = dk.transpose(1, 2), dv.transpose(1, 2)
    dq = torch.zeros(B, H, G, D, dtype=acc, device=k.device)
    for j0, j1, s0, s1 in _row_plan(B, H, G, S, key_ranges):
        ranges = None if key_ranges is None else key_ranges[:, s0:s1]
        p = _row_scores(qt[:, :, s0:s1], kt, key_mask, j0, j1, scale, acc, ranges)
        p = p.sub_(lse[:, :, s0:s1, None]).exp_()  # lse = +inf: 0
        z = _rows_keep_scale(dropout_p, rng, B, H, s0, s1, j0, j1, acc)
        dot_s = dot[:, :, s0:s1]
        dvc = torch.matmul(_dropped(p, z).to(dt).transpose(-1, -2), dot_s).to(acc)
        dp = _dropped(torch.matmul(dot_s, vt[:, :, j0:j1].transpose(-1, -2)).to(acc), z, True)
        ds = p.mul_(dp.sub_(delta[:, :, s0:s1])).to(dt)
        dq[:, :, s0:s1] += torch.matmul(ds, kt[:, :, j0:j1]).to(acc)
        dkc = torch.matmul(ds.transpose(-1, -2), qt[:, :, s0:s1]).to(acc).mul_(scale)
        if dk_into is not None:  # each on its own: a separate k_global comes without a separate v_global, or not
            dkc += dk_t[:, :, j0:j1]
        if dv_into is not None:
            dvc += dv_t[:, :, j0:j1]
        dk_t[:, :, j0:j1] = dkc
        dv_t[:, :, j0:j1] = dvc
    return _dense(dq.mul_(scale).transpose(1, 2), dt), dk, dv


# The global-rows contract of longattn.backends._longformer, on the gathered slot rows above.
global_rows_forward, global_rows_backward = _longformer.rows_by_gather(_rows_forward, _rows_backward)


def _bins(block_ids, num_blocks):
    """Block id per token, with dropped (-1) and out-of-range ids sent to an extra bin ``num_blocks``."""
    ids = block_ids.long()
    return torch.where((ids >= 0) & (ids < num_blocks), ids, num_blocks)


def block_aggregate_forward(x, block_ids, num_blocks, weight, eps):
    B, S, C = x.shape
    acc = stat_dtype(x.dtype)
    bins = _bins(block_ids, num_blocks)
    sums = torch.zeros(B, num_blocks + 1, C, dtype=acc, device=x.device)
    sums.scatter_add_(1, bins[..., None].expand(B, S, C), x.to(acc))
    sums = sums[:, :num_blocks].contiguous()
    if weight is None:
        empty = x.new_empty(0, dtype=acc)
        return sums.to(x.dtype), empty, empty.clone()
    rstd = torch.rsqrt(sums.pow(2).mean(-1) + eps)
    out = (weight.to(acc) * sums * rstd[..., None]).to(x.dtype)
    return out, sums, rstd


def block_aggregate_backward(dout, x, block_ids, num_blocks, weight, sums, rstd, eps):
    B, S, C = x.shape
    acc = stat_dtype(x.dtype)
    dy = dout.to(acc)
    if weight is None:
        dsums, dweight = dy, x.new_empty(0)
    else:
        sums, rstd = sums.to(acc), rstd.to(acc)[..., None]
        w = weight.to(acc)
        dweight = (dy * sums * rstd).sum(dim=(0, 1)).to(weight.dtype)
        wdy = w * dy
        dsums = rstd * wdy - sums * rstd.pow(3) * (sums * wdy).mean(-1, keepdim=True)
    padded = torch.cat([dsums, dsums.new_zeros(B, 1, C)], dim=1)
    bins = _bins(block_ids, num_blocks)
    dx = torch.gather(padded, 1, bins[..., None].expand(B, S, C)).to(x.dtype)
    return dx, dweight
