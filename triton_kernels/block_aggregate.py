"""Fused block aggregation (LongT5's side tokens): segment sums by block id, optional RMS norm with weight.

Forward: block ids need not be sorted (padding, id -1, may sit anywhere), so torch first sorts each row's
ids once (stable argsort, so each block keeps sequence order) and finds each block's segment of the
sorted order with ``searchsorted``. Then one program per (batch row, block) gathers its tokens, sums them in
float32 in a fixed order (deterministic, no atomics) and, with a weight, normalises the row in the same
program: ``out = weight * sums * rsqrt(mean(sums**2) + eps)``.

Backward: ``dx[b, s] = dsums[b, ids[b, s]]`` (0 for dropped tokens), a gather; with a weight the RMS-norm
backward ``dsums = rstd * w * dy - sums * rstd**3 * mean(sums * w * dy)`` is computed inside the gather
kernel from one per-block coefficient (a torch reduction over (B, G, C), as is ``dweight``; both tiny next
to x's (B, S, C) and deterministic).

Layouts: x (B, S, C) and dout (B, G, C) with any strides and a unit last stride; ids contiguous int32 (B, S);
outputs contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting

# Channel tile: a whole LongT5 d_model row (512..4096) takes 2..16 passes of 256. Token step: 16 rows of a
# block per load (LongT5's global_block_size is 16). Not measured (no GPU when written).
_GPU_BLOCK_C, _GPU_BLOCK_S = 256, 16
_INTERPRET_BLOCK_C, _INTERPRET_BLOCK_S = 32, 8


def _blocks(C: int) -> tuple[int, int]:
    block_c, block_s = (_INTERPRET_BLOCK_C, _INTERPRET_BLOCK_S) if interpreting() else (_GPU_BLOCK_C, _GPU_BLOCK_S)
    return min(block_c, triton.next_power_of_2(C)), block_s


@triton.jit
def _aggregate_kernel(X, Order, Bounds, W, Out, Sums, Rstd, stride_xb, stride_xs, S, G, C, eps,
                      HAS_WEIGHT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Block g of row b: sum x over tokens Order[b, Bounds[b, g] : Bounds[b, g + 1]], then the optional norm."""
    pid = tl.program_id(0)
    b = (pid // G).to(tl.int64)
    g = (pid % G).to(tl.int64)
    start = tl.load(Bounds + b * (G + 1) + g)
    end = tl.load(Bounds + b * (G + 1) + g + 1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    row = (b * G + g) * C  # (B, G, C) contiguous outputs
    sumsq = tl.zeros([BLOCK_C], dtype=tl.float32)  # per-channel partials of sum(sums**2)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + offs_c
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            pos = s0 + offs_s
            tok = tl.load(Order + b * S + pos, mask=pos < end, other=0).to(tl.int64)
            x = tl.load(X + b * stride_xb + tok[:, None] * stride_xs + c[None, :],
                        mask=(pos < end)[:, None] & (c < C)[None, :], other=0.0)
            acc += tl.sum(x.to(tl.float32), 0)
        if HAS_WEIGHT:
            tl.store(Sums + row + c, acc, mask=c < C)
            sumsq += acc * acc
        else:
            tl.store(Out + row + c, acc.to(Out.dtype.element_ty), mask=c < C)
    if HAS_WEIGHT:
        rstd = 1.0 / tl.sqrt(tl.sum(sumsq, 0) / C + eps)
        tl.store(Rstd + b * G + g, rstd)
        tl.debug_barrier()  # the sums stored above are re-read below
        for c0 in range(0, C, BLOCK_C):
            c = c0 + offs_c
            sums = tl.load(Sums + row + c, mask=c < C, other=0.0)
            w = tl.load(W + c, mask=c < C, other=0.0).to(tl.float32)
            tl.store(Out + row + c, (w * sums * rstd).to(Out.dtype.element_ty), mask=c < C)


@triton.jit
def _scatter_grad_kernel(DOut, Ids, W, Sums, Rstd, Coef, DX, stride_db, stride_dg, S, G, C,
                         HAS_WEIGHT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx of BLOCK_S tokens x BLOCK_C channels of row b: the (normalised) gradient of each token's block."""
    b = tl.program_id(2).to(tl.int64)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ids = tl.load(Ids + b * S + s, mask=s < S, other=-1)
    keep = (ids >= 0) & (ids < G)  # out-of-range ids are dropped, never read through (no host check)
    gid = tl.where(keep, ids, 0).to(tl.int64)
    mask = keep[:, None] & (c < C)[None, :]
    dy = tl.load(DOut + b * stride_db + gid[:, None] * stride_dg + c[None, :], mask=mask, other=0.0)
    dx = dy.to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + c, mask=c < C, other=0.0).to(tl.float32)
        sums = tl.load(Sums + (b * G + gid)[:, None] * C + c[None, :], mask=mask, other=0.0)
        rstd = tl.load(Rstd + b * G + gid, mask=keep, other=0.0)
        coef = tl.load(Coef + b * G + gid, mask=keep, other=0.0)
        dx = rstd[:, None] * w[None, :] * dx - sums * coef[:, None]
    tl.store(DX + (b * S + s)[:, None] * C + c[None, :], dx.to(DX.dtype.element_ty),
             mask=(s < S)[:, None] & (c < C)[None, :])


def forward(x, block_ids, num_blocks, weight, eps):
    """-> (out (B, G, C) in x's dtype, sums (B, G, C) float32, rstd (B, G) float32); see ``longattn.backends``.

    ``sums`` and ``rstd`` are empty (0,) tensors without a weight.
    """
    B, S, C = x.shape
    G = num_blocks
    out = torch.empty(B, G, C, dtype=x.dtype, device=x.device)
    empty = x.new_empty(0, dtype=torch.float32)
    sums = torch.empty(B, G, C, dtype=torch.float32, device=x.device) if weight is not None else empty
    rstd = torch.empty(B, G, dtype=torch.float32, device=x.device) if weight is not None else empty.clone()
    if G == 0:
        return out, sums, rstd
    # Dropped tokens (-1) sort last, as block G; stable, so each block keeps the sequence order.
    key = torch.where(block_ids >= 0, block_ids.long(), G)
    order = torch.argsort(key, dim=1, stable=True)
    bounds = torch.searchsorted(torch.gather(key, 1, order),
                                torch.arange(G + 1, device=x.device).expand(B, G + 1).contiguous())
    block_c, block_s = _blocks(C)
    # Without a weight, W, Sums and Rstd are never read: ``out`` stands in (empty tensors may be null pointers).
    w, s_ptr, r_ptr = (out, out, out) if weight is None else (weight, sums, rstd)
    _aggregate_kernel[(B * G,)](
        x, order.to(torch.int32), bounds.to(torch.int32), w, out, s_ptr, r_ptr,
        x.stride(0), x.stride(1), S, G, C, float(eps),
        HAS_WEIGHT=weight is not None, BLOCK_S=block_s, BLOCK_C=block_c,
    )
    return out, sums, rstd


def backward(dout, x, block_ids, num_blocks, weight, sums, rstd, eps):
    """-> (dx (B, S, C) in x's dtype, dweight (C,) in weight's dtype or empty (0,))."""
    B, S, C = x.shape
    G = num_blocks
    dx = torch.empty(B, S, C, dtype=x.dtype, device=x.device)
    dweight, coef = x.new_empty(0), None
    if weight is not None:
        dy = dout.float()
        normed = sums * rstd[..., None]
        dweight = (dy * normed).sum(dim=(0, 1)).to(weight.dtype)
        # d/dsums of mean(sums**2): the per-block scalar rstd**3 * mean(sums * w * dy).
        coef = (rstd.pow(3) * (sums * weight.float() * dy).mean(-1)).contiguous()
    if G == 0:
        return dx.zero_(), dweight
    block_c, block_s = _blocks(C)
    grid = (triton.cdiv(S, block_s), triton.cdiv(C, block_c), B)
    _scatter_grad_kernel[grid](
        dout, block_ids, dout if weight is None else weight, dout if weight is None else sums,
        dout if weight is None else rstd, dout if coef is None else coef, dx,
        dout.stride(0), dout.stride(1), S, G, C,
        HAS_WEIGHT=weight is not None, BLOCK_S=block_s, BLOCK_C=block_c,
    )
    return dx, dweight
