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


def dense_mask_and_bias(B, S, H, G, window, *, band_key_mask=None, side_mask=None, query_block=None,
                        band_bias=None, side_bias=None, device="cpu"):
    """The explicit ``(B, H, S, S + G)`` additive bias (0 where no bias) and ``(B, 1, S, S + G)`` bool mask."""
    left, right = window
    i = torch.arange(S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    in_band = (j >= i - left) & (j <= i + right)
    band_mask = in_band[None].expand(B, S, S)
    if band_key_mask is not None:
        band_mask = band_mask & band_key_mask.bool()[:, None, :]
    side = torch.ones(B, S, G, dtype=torch.bool, device=device)
    if side_mask is not None:
        side = side & side_mask.bool()[:, None, :]
    mask = torch.cat([band_mask, side], dim=-1)[:, None]
    bias = torch.zeros(B, H, S, S + G, dtype=torch.float64, device=device)
    if band_bias is not None:
        offset = (j - i + left).clamp(0, left + right)
        table = _f64(band_bias)[:, offset]  # (H, S, S)
        bias[..., :S] = bias[..., :S] + torch.where(in_band, table, torch.zeros_like(table))[None]
    if side_bias is not None and G > 0:
        g = torch.arange(G, device=device)
        offset = g[None, None, :] - query_block.long()[:, :, None] + G  # (B, S, G)
        bias[..., S:] = bias[..., S:] + _f64(side_bias)[:, offset].permute(1, 0, 2, 3)
    return mask, bias


def masked_softmax_attention(scores, mask, values):
    """softmax over the last dim of ``scores`` where ``mask``; rows with nothing to attend give 0."""
    scores = scores.masked_fill(~mask, float("-inf"))
    has_key = mask.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    return probs @ values


def band_side_attention(q, k, v, side_k=None, side_v=None, window=(0, 0), *, band_key_mask=None, side_mask=None,
                        query_block=None, band_bias=None, side_bias=None, scale=None):
    """DESIGN.md section 1 in float64. q, k, v (B, S, H, D); side_k, side_v (B, G, H, D). -> (B, S, H, D)."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, S, H, D = q.shape
    if side_k is None:
        side_k = side_v = q.new_zeros(B, 0, H, D)
    side_k, side_v = _f64(side_k), _f64(side_v)
    G = side_k.shape[1]
    scale = D**-0.5 if scale is None else scale
    if isinstance(window, int):
        window = (window, window)
    mask, bias = dense_mask_and_bias(B, S, H, G, window, band_key_mask=band_key_mask, side_mask=side_mask,
                                     query_block=query_block, band_bias=band_bias, side_bias=side_bias,
                                     device=q.device)
    keys = torch.cat([k, side_k], 1).transpose(1, 2)  # (B, H, S+G, D)
    values = torch.cat([v, side_v], 1).transpose(1, 2)
    scores = scale * q.transpose(1, 2) @ keys.transpose(-1, -2) + bias
    return masked_softmax_attention(scores, mask, values).transpose(1, 2)


def longformer_attention(q, k, v, window, global_mask, *, key_padding_mask=None, q_global=None, k_global=None,
                         v_global=None, scale=None):
    """Longformer self-attention (HF semantics) with one explicit S x S mask per row type, in float64."""
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
    local = masked_softmax_attention(scale * q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2),
                                     local_mask[:, None], v.transpose(1, 2))
    qg = q if q_global is None else _f64(q_global)
    kg = k if k_global is None else _f64(k_global)
    vg = v if v_global is None else _f64(v_global)
    global_rows = masked_softmax_attention(scale * qg.transpose(1, 2) @ kg.transpose(1, 2).transpose(-1, -2),
                                           real[:, None, None, :].expand(B, 1, S, S), vg.transpose(1, 2))
    out = torch.where(glob[:, None, :, None], global_rows, local).transpose(1, 2)
    return torch.where(real[:, :, None, None], out, torch.zeros_like(out))


def block_aggregate(x, block_ids, num_blocks, *, weight=None, eps=1e-6):
    """One-hot matmul segment sum (B, S, C) -> (B, G, C), then T5 RMS norm when ``weight`` is given."""
    x = _f64(x)
    ids = block_ids.long()
    onehot = (ids[:, :, None] == torch.arange(num_blocks, device=x.device)[None, None, :]).to(torch.float64)
    sums = onehot.transpose(1, 2) @ x
    if weight is None:
        return sums
    return _f64(weight) * sums / torch.sqrt(sums.pow(2).mean(-1, keepdim=True) + eps)
