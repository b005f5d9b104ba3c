"""The one oracle: naive dense float64 implementations that build the explicit S x (S + G) mask and bias.

Independent of longattn's code paths (no chunking, no band views, no gathers of global tokens): each
function writes down DESIGN.md section 1 literally. Used by the tests and by ``longattn bench --check``.
All inputs are promoted to float64 and outputs stay float64, so autograd through them gives the reference
gradients too.
"""

from __future__ import annotations

import torch


def _f64(x):
    return None if x is None else x.to(torch.float64)


def in_ranges(ranges, n, device="cpu"):
    """(B, R, n) bool: ``ranges[b, r, 0] <= j < ranges[b, r, 1]`` for ``j`` in [0, n) (``ranges`` (B, R, 2) ints,
    any values: an empty or reversed range is all False)."""
    j = torch.arange(n, device=device)[None, None, :]
    ranges = ranges.long()
    return (j >= ranges[..., 0:1]) & (j < ranges[..., 1:2])


def dense_mask_and_bias(B, S, H, G, window, *, band_key_mask=None, side_mask=None, query_block=None,
                        band_bias=None, side_bias=None, key_ranges=None, side_ranges=None, device="cpu"):
    """The explicit ``(B, H, S, S + G)`` additive bias (0 where no bias) and ``(B, 1, S, S + G)`` bool mask.

    ``key_ranges`` / ``side_ranges``: optional (B, S, 2) ints, query ``i`` may see band key ``j`` only if
    ``key_ranges[b, i, 0] <= j < key_ranges[b, i, 1]`` and side key ``g`` only if
    ``side_ranges[b, i, 0] <= g < side_ranges[b, i, 1]`` (packed variable-length batches)."""
    left, right = window
    i = torch.arange(S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    in_band = (j >= i - left) & (j <= i + right)
    band_mask = in_band[None].expand(B, S, S)
    if band_key_mask is not None:
        band_mask = band_mask & band_key_mask.bool()[:, None, :]
    if key_ranges is not None:
        band_mask = band_mask & in_ranges(key_ranges, S, device)
    side = torch.ones(B, S, G, dtype=torch.bool, device=device)
    if side_mask is not None:
        side = side & side_mask.bool()[:, None, :]
    if side_ranges is not None:
        side = side & in_ranges(side_ranges, G, device)
    mask = torch.cat([band_mask, side], dim=-1)[:, None]
    bias = torch.zeros(B, H, S, S + G, dtype=torch.float64, device=device)
    if band_bias is not None:
        offset = (j - i + left).clamp(0, left + right)
        table = _f64(band_bias)[:, offset]  # (H, S, S)
        bias[..., :S] = bias[..., :S] + torch.where(in_band, table, torch.zeros_like(table))[None]
    if side_bias is not None and G > 0:
        g = torch.arange(G, device=device)
        # the contract clamps block ids to [-1, G - 1] (values are not checked on the host)
        offset = g[None, None, :] - query_block.long().clamp(-1, G - 1)[:, :, None] + G  # (B, S, G)
        bias[..., S:] = bias[..., S:] + _f64(side_bias)[:, offset].permute(1, 0, 2, 3)
    return mask, bias


def masked_softmax_attention(scores, mask, values, keep=None, dropout_p=0.0):
    """softmax over the last dim of ``scores`` where ``mask``; rows with nothing to attend give 0.

    ``keep`` (bool, broadcastable to the scores): attention dropout after the softmax, kept probabilities
    scaled by ``1 / (1 - dropout_p)``."""
    scores = scores.masked_fill(~mask, float("-inf"))
    has_key = mask.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return probs @ values


def band_side_attention(q, k, v, side_k=None, side_v=None, window=(0, 0), *, band_key_mask=None, side_mask=None,
                        query_block=None, band_bias=None, side_bias=None, scale=None, keep=None, dropout_p=0.0,
                        key_ranges=None, side_ranges=None, with_lse=False):
    """DESIGN.md section 1 in float64 (``keep``: optional (B, H, S, S + G) dropout keep mask, columns band keys
    then side keys, e.g. ``longattn._dropout.dense_keep_mask``; ``key_ranges`` / ``side_ranges``: optional
    (B, S, 2) per-row key ranges, see ``dense_mask_and_bias``).
    q (B, S, H, D); k, v (B, S, H_kv, D); side_k, side_v (B, G, H_kv, D).
    -> (B, S, H, D), and with ``with_lse`` also the (B, H, S) log-sum-exp of each row's scores (+inf for a row
    with no key). Grouped-query attention (H_kv < H): query head h reads K/V head h // (H // H_kv); the oracle
    simply repeats K/V (the backends must not)."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, S, H, D = q.shape
    if side_k is None:
        side_k = side_v = k.new_zeros(B, 0, k.shape[2], D)
    side_k, side_v = _f64(side_k), _f64(side_v)
    group = H // k.shape[2]
    k, v, side_k, side_v = (x.repeat_interleave(group, dim=2) for x in (k, v, side_k, side_v))
    G = side_k.shape[1]
    scale = D**-0.5 if scale is None else scale
    if isinstance(window, int):
        window = (window, window)
    mask, bias = dense_mask_and_bias(B, S, H, G, window, band_key_mask=band_key_mask, side_mask=side_mask,
                                     query_block=query_block, band_bias=band_bias, side_bias=side_bias,
                                     key_ranges=key_ranges, side_ranges=side_ranges, device=q.device)
    keys = torch.cat([k, side_k], 1).transpose(1, 2)  # (B, H, S+G, D)
    values = torch.cat([v, side_v], 1).transpose(1, 2)
    scores = scale * q.transpose(1, 2) @ keys.transpose(-1, -2) + bias
    out = masked_softmax_attention(scores, mask, values, keep, dropout_p).transpose(1, 2)
    if not with_lse:
        return out
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)
    return out, torch.where(mask.any(-1), lse, torch.full_like(lse, float("inf")))


def band_side_with_halo(q, k, v, halo_k, halo_v, halo_left, *, halo_mask=None, band_key_mask=None,
                        query_block=None, **kwargs):
    """The halo contract (``longattn.backends``, "Halo keys") by its definition: the oracle on the extended
    sequence ``[halo_k[:, :HL] | k | halo_k[:, HL:]]`` with zero query rows for the halo, rows ``[HL, HL + S)``
    kept. Other keywords as :func:`band_side_attention`; -> (out (B, S, H, D), lse (B, H, S))."""
    B, S = q.shape[:2]
    hl, n = halo_left, halo_k.shape[1]

    def ext(x, halo):
        return torch.cat([halo[:, :hl], x, halo[:, hl:]], 1)

    def rows(x, fill):
        return torch.cat([x.new_full((B, hl, *x.shape[2:]), fill), x, x.new_full((B, n - hl, *x.shape[2:]), fill)], 1)

    ones = torch.ones(B, S + n, dtype=torch.bool, device=q.device)
    mask = ext(ones[:, :S] if band_key_mask is None else band_key_mask.bool(),
               ones[:, :n] if halo_mask is None else halo_mask.bool())
    out, lse = band_side_attention(rows(q, 0), ext(k, halo_k), ext(v, halo_v), band_key_mask=mask,
                                   query_block=None if query_block is None else rows(query_block, -1),
                                   with_lse=True, **kwargs)
    return out[:, hl:hl + S], lse[:, :, hl:hl + S]


def longformer_keep_masks(rng, dropout_p, global_mask, key_padding_mask, H):
    """Dense (B, H, S, S) dropout keep masks (local rows, global rows) in token positions for
    ``longformer_attention``: a local row's global key j uses the side-key bits of j's slot (its rank among the
    row's global tokens); the global row of the token in slot s uses the global-row bits of s."""
    from longattn import _dropout

    B, S = global_mask.shape
    real = torch.ones(B, S, dtype=torch.bool) if key_padding_mask is None else key_padding_mask.bool()
    glob = global_mask.bool() & real
    slot = (glob.long().cumsum(1) - 1).clamp(min=0)  # (B, S): slot of each global token
    dense = _dropout.dense_keep_mask(rng, dropout_p, B, H, S, S)  # band keys, then side keys 0..S-1
    side_of_key = torch.gather(dense[..., S:], 3, slot[:, None, None, :].expand(B, H, S, S))
    local = torch.where(glob[:, None, None, :], side_of_key, dense[..., :S])
    rows = _dropout.global_rows_keep_mask(rng, dropout_p, B, H, S, S)  # slot s -> row s
    global_rows = torch.gather(rows, 2, slot[:, None, :, None].expand(B, H, S, S))
    return local, global_rows


def longformer_attention(q, k, v, window, global_mask, *, key_padding_mask=None, q_global=None, k_global=None,
                         v_global=None, scale=None, keep=None, dropout_p=0.0, key_ranges=None):
    """Longformer self-attention (HF semantics) with one explicit S x S mask per row type, in float64.

    ``keep``: optional pair of (B, H, S, S) dropout keep masks (local rows, global rows), e.g.
    ``longformer_keep_masks``. ``key_ranges``: optional (B, S, 2) ints in token positions; token ``i`` (local
    or global row) attends key ``j`` (band or global) only if ``key_ranges[b, i, 0] <= j < key_ranges[b, i, 1]``
    (packed batches: every token gets its own sequence's ``[start, end)``)."""
    keep_local, keep_global = (None, None) if keep is None else keep
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, S, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    left, right = (window, window) if isinstance(window, int) else window
    real = torch.ones(B, S, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask.bool()
    glob = global_mask.bool() & real
    i = torch.arange(S, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    in_band = (j >= i - left) & (j <= i + right)
    # local rows: real non-global keys inside the window, plus every global key
    local_mask = (in_band[None] & (real & ~glob)[:, None, :]) | glob[:, None, :]
    allowed = torch.ones(B, S, S, dtype=torch.bool, device=q.device)
    if key_ranges is not None:
        allowed = in_ranges(key_ranges, S, q.device)
        local_mask = local_mask & allowed
    local = masked_softmax_attention(scale * q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2),
                                     local_mask[:, None], v.transpose(1, 2), keep_local, dropout_p)
    qg = q if q_global is None else _f64(q_global)
    kg = k if k_global is None else _f64(k_global)
    vg = v if v_global is None else _f64(v_global)
    global_rows = masked_softmax_attention(scale * qg.transpose(1, 2) @ kg.transpose(1, 2).transpose(-1, -2),
                                           (real[:, None, :] & allowed)[:, None], vg.transpose(1, 2),
                                           keep_global, dropout_p)
    out = torch.where(glob[:, None, :, None], global_rows, local).transpose(1, 2)
    return torch.where(real[:, :, None, None], out, torch.zeros_like(out))


def global_rows_attention(q_rows, k, v, *, key_mask=None, key_ranges=None, scale=None, keep=None, dropout_p=0.0):
    """The global-rows primitive in float64: q_rows (B, G, H, D) attend keys k, v (B, S, H, D) where ``key_mask``
    (B, S) and ``key_ranges`` (B, G, 2) per slot allow -> (B, G, H, D); a row with no key gives 0. ``keep``:
    optional (B, H, G, S) dropout keep mask, e.g. ``longattn._dropout.global_rows_keep_mask``."""
    q_rows, k, v = _f64(q_rows), _f64(k), _f64(v)
    B, G, H, D = q_rows.shape
    S = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    mask = torch.ones(B, G, S, dtype=torch.bool, device=k.device)
    if key_mask is not None:
        mask = mask & key_mask.bool()[:, None, :]
    if key_ranges is not None:
        mask = mask & in_ranges(key_ranges, S, k.device)
    scores = scale * q_rows.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)
    return masked_softmax_attention(scores, mask[:, None], v.transpose(1, 2), keep, dropout_p).transpose(1, 2)


def block_aggregate(x, block_ids, num_blocks, *, weight=None, eps=1e-6):
    """One-hot matmul segment sum (B, S, C) -> (B, G, C), then T5 RMS norm when ``weight`` is given."""
    x = _f64(x)
    ids = block_ids.long()
    onehot = (ids[:, :, None] == torch.arange(num_blocks, device=x.device)[None, None, :]).to(torch.float64)
    sums = onehot.transpose(1, 2) @ x
    if weight is None:
        return sums
    return _f64(weight) * sums / torch.sqrt(sums.pow(2).mean(-1, keepdim=True) + eps)
