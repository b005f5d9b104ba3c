"""Pieces shared by every band + side-keys kernel: tile shapes, tile geometry and the one score function.

Geometry (DESIGN.md section 1). A program of the forward / dQ kernels owns ``BLOCK_M`` query rows
``[m0, m0 + BLOCK_M)`` of one (batch, head). Its band keys are ``[m0 - left, m0 + BLOCK_M - 1 + right]``; they
are cut into key tiles that start at ``m0 - left`` (not at multiples of ``BLOCK_N``), so a query tile visits
``cdiv(BLOCK_M - 1 + W, BLOCK_N)`` tiles, ``W = left + right + 1``, minus those wholly outside ``[0, S)``.
The dK/dV kernel mirrors this: a key tile ``[n0, n0 + BLOCK_N)`` sees queries ``[n0 - right, n0 + BLOCK_N - 1
+ left]``, cut into query tiles starting at ``n0 - right``.

A (query tile, key tile) pair is *interior* when every (i, j) in it lies in the band and in ``[0, S)``: its
scores need no element mask (as the mask-free middle stage of Triton's fused-attention tutorial). Only
the first and last tiles of a row of tiles are edges. ``band_key_mask`` and ``side_mask`` are per-key
(column) masks, applied on every tile because they depend on data.

Rows outside ``[0, S)`` are loaded as zeros with ``lse = +inf`` in the backward (so their probabilities are
exactly 0) and are never stored, so they need no score mask either.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Tile shapes, (BLOCK_M, BLOCK_N, num_warps), by padded head dim.
#
# NOT MEASURED: this was written on a machine without a GPU; the choice below is from tile arithmetic
# only and is the first thing to tune (here, or with the env override below). A BLOCK_M-row query tile
# visits cdiv(BLOCK_M - 1 + W, BLOCK_N) key tiles (they start at its first band key, not at a multiple of
# BLOCK_N), of which BLOCK_M * W / (tiles * BLOCK_N) of the scores are useful:
#     W = 255 (LongT5 r=127):       32x32 89 %, 64x64 80 %, 128x64 66 %, 128x128 66 %
#     W = 513 (Longformer 512):     32x32 94 %, 64x64 89 %, 128x64 80 %, 128x128 80 %
# 64x64 keeps >= 80 % of the work useful on the standard shapes while still feeding 64-wide MMAs; 32x32
# wastes less but halves the MMA size and doubles the K/V reloads. flash-attn's 128x128 (tuned for dense
# attention) would waste a third of LongT5's band. D = 128 halves BLOCK_N (q, acc, k/v and dK/dV tiles are
# all D wide). Warps from ptxas register counts of an offline sm_90 compile (bf16, all masks and biases on;
# a proxy, not a timing): with 4 warps the forward and dK/dV kernels spill (D=64: 128 / 288 bytes; D=128,
# 64x64 tiles: up to 1.5 KB); with 8 warps nothing spills for D <= 64 and D=128 with 64x32 spills <= 24 B.
_GPU_TILES = {16: (64, 64, 8), 32: (64, 64, 8), 64: (64, 64, 8), 128: (64, 32, 8)}
# For tuning runs: LONGATTN_TRITON_TILES="BLOCK_M,BLOCK_N,num_warps" overrides the table (powers of two >= 16).
_TILES_ENV = "LONGATTN_TRITON_TILES"
# Under TRITON_INTERPRET=1 (CPU tests) every tile op is a numpy call, so small tiles keep the tests fast and
# make small sequences cross several tiles (edge and interior paths both run). 16 is tl.dot's minimum.
_INTERPRET_TILES = (16, 16, 1)

# exp(x) = exp2(x * LOG2E): exp2 is the hardware instruction.
LOG2E = tl.constexpr(1.4426950408889634)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device=None) -> int:
    """Streaming multiprocessors of ``device`` (default: the current CUDA device), read once per device."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        return 1
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


def split_count(n_programs: int, n_units: int, device=None, *, waves: int = 4, cap: int = 16) -> int:
    """Chunks to cut a reduction over ``n_units`` tiles into, so that ``n_programs`` programs per chunk keep about
    ``waves`` waves of the device's SMs busy (at most ``cap`` chunks: the partials are summed afterwards).

    The one split heuristic of the kernels whose programs would otherwise walk a whole sequence (side-key dK/dV,
    Longformer's global rows). Under the interpreter: 2 chunks, so tests still cross the partial-sum path.
    """
    if interpreting():
        return min(2, n_units)
    return max(1, min(n_units, triton.cdiv(waves * num_sms(device), n_programs), cap))


def head_dim_block(D: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot's minimum); the pad columns are masked to zero."""
    return max(16, triton.next_power_of_2(D))


def attention_tiles(D: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a head dim D (padded as ``head_dim_block``)."""
    if os.environ.get(_TILES_ENV):
        block_m, block_n, warps = (int(x) for x in os.environ[_TILES_ENV].split(","))
        return block_m, block_n, warps
    if interpreting():
        return _INTERPRET_TILES
    return _GPU_TILES[head_dim_block(D)]


def dot_precision(dtype) -> str:
    """fp32 inputs use exact fp32 products ("ieee"), matching torch's default (TF32 off for matmul)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def strides3(x) -> tuple[int, int, int]:
    """(batch, sequence, head) strides of a (B, S, H, D) tensor; the kernels assume a unit last stride."""
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"the Triton kernels need a contiguous last dim, got strides {tuple(x.stride())}")
    return x.stride(0), x.stride(1), x.stride(2)


def as_u8(mask, like):
    """A bool mask as uint8 (a view, no copy), or ``like`` when absent or empty (then never read: an empty
    tensor may have a null data pointer)."""
    return like if mask is None or mask.numel() == 0 else mask.view(torch.uint8)


@triton.jit
def band_tile_interior(m0, n0, S, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """True when the query tile at ``m0`` and the key tile at ``n0`` need no element mask (see module doc)."""
    first_ok = n0 >= m0 + (BLOCK_M - 1) - left  # the tile's first key is in the band of its last query
    last_ok = n0 + (BLOCK_N - 1) <= m0 + right  # the tile's last key is in the band of its first query
    return first_ok & last_ok & (n0 >= 0) & (n0 + BLOCK_N <= S)


@triton.jit
def band_scores(qk, rows, cols, edge, S, left, right, scale, bias_ptr, kmask_ptr,
                HAS_BIAS: tl.constexpr, HAS_KMASK: tl.constexpr):
    """Float32 scores of band pairs (i, j) from ``qk = <q_i, k_j>``; -inf where not attended.

    ``rows`` / ``cols`` hold i and j, broadcastable to qk's shape: ``(BLOCK_M, 1)`` and ``(1, BLOCK_N)`` for a
    key tile, or ``(BLOCK_M, 1)`` and ``(BLOCK_M, BLOCK_T)`` for the skewed tiles of the bias gradient.
    ``bias_ptr`` points at this head's row of ``band_bias`` (W entries); ``kmask_ptr`` at this batch row of
    ``band_key_mask`` (uint8, S entries). ``edge`` (scalar) adds the band / sequence mask.
    """
    s = qk * scale
    t = cols - rows + left  # band offset j - i + left
    if HAS_BIAS:
        # Clamped so that no offset outside the band ever reads out of bounds (those scores are masked).
        s += tl.load(bias_ptr + tl.minimum(tl.maximum(t, 0), left + right)).to(tl.float32)
    if edge:
        keep = (t >= 0) & (t <= left + right) & (cols >= 0) & (cols < S)
        s = tl.where(keep, s, float("-inf"))
    if HAS_KMASK:
        km = tl.load(kmask_ptr + cols, mask=(cols >= 0) & (cols < S), other=0)
        s = tl.where(km != 0, s, float("-inf"))
    return s


@triton.jit
def side_scores(qk, qblock, g, G, scale, bias_ptr, smask_ptr, HAS_BIAS: tl.constexpr, HAS_SMASK: tl.constexpr):
    """Float32 scores of (query i, side key g) pairs; -inf for g outside [0, G) and masked side keys.

    ``qblock``: query blocks of the rows, ``(BLOCK_M, 1)`` int32 (only read with a bias); ``g``: side-key
    indices broadcastable against it. ``bias_ptr``: this head's row of ``side_bias`` (2G + 1 entries);
    ``smask_ptr``: this batch row of ``side_mask`` (uint8, G entries).
    """
    s = qk * scale
    if HAS_BIAS:
        index = g - qblock + G
        s += tl.load(bias_ptr + tl.minimum(tl.maximum(index, 0), 2 * G)).to(tl.float32)
    keep = (g >= 0) & (g < G)
    if HAS_SMASK:
        keep = keep & (tl.load(smask_ptr + g, mask=keep, other=0) != 0)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def load_query_block(ptr, rows, row_ok, G):
    """Block ids of query ``rows`` (``ptr``: this batch row of ``query_block``), clamped to [-1, G - 1] as every
    backend does: the values are not checked on the host (that would sync), so none may index out of range."""
    return tl.minimum(tl.maximum(tl.load(ptr + rows, mask=row_ok, other=0), -1), G - 1)


@triton.jit
def load_rows(base, offs, n_rows, stride, offs_d, D):
    """(len(offs), BLOCK_D) tile of rows ``offs`` of a (n_rows, D) matrix with row stride ``stride``; 0 outside.

    Offsets are int64 so ``row * stride`` never overflows when the tensor has more than 2^31 elements.
    """
    ptrs = base + offs.to(tl.int64)[:, None] * stride + offs_d[None, :]
    mask = (offs[:, None] >= 0) & (offs[:, None] < n_rows) & (offs_d[None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_rows(base, value, offs, n_rows, stride, offs_d, D):
    """Store a (len(offs), BLOCK_D) tile into rows ``offs`` (those in ``[0, n_rows)``) of a (n_rows, D) matrix."""
    ptrs = base + offs.to(tl.int64)[:, None] * stride + offs_d[None, :]
    mask = (offs[:, None] >= 0) & (offs[:, None] < n_rows) & (offs_d[None, :] < D)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def batch_head_offset(pid_bh, H, stride_b, stride_h):
    """int64 element offset of (b, h) = divmod(pid_bh, H) in a (B, *, H, *) tensor."""
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    return b * stride_b + h * stride_h


# --------------------------------------------------------------------------------------------------------
# per-tile attention steps, shared by the band + side kernels (band_side) and the global rows (global_rows).
# ``z`` is the tile's dropout factor (0 or 1 / (1 - p)); it is read only with HAS_DROPOUT (pass any tensor).
# --------------------------------------------------------------------------------------------------------


@triton.jit
def softmax_step(s, z, v, m_i, l_i, acc, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online-softmax update of a query tile's running (max ``m_i``, normaliser ``l_i``, ``acc``) by one key tile
    of float32 scores ``s`` (BLOCK_M, BLOCK_N) and values ``v`` (BLOCK_N, BLOCK_D). -> (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no key so far keeps m = -inf; shift by 0 instead so no inf - inf appears.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m_i - m_safe) * LOG2E)
    p = tl.exp2((s - m_safe[:, None]) * LOG2E)
    l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser is taken before dropout
    if HAS_DROPOUT:
        p = p * z
    # P is rounded to the input dtype before the PV product, as the torch backend does.
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def ds_tile(s, z, v, do, lse, delta, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """float32 dS = P * (dP - delta) of a tile from its scores (softmax backward; P recomputed from the row
    log-sum-exp ``lse``, +inf for a row with no key: P = 0); with dropout dP = Z * (dO V^T)."""
    p = tl.exp2((s - lse[:, None]) * LOG2E)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        dp = dp * z
    return p * (dp - delta[:, None])


@triton.jit
def kv_grad_step(s, z, q, do, v, lse, delta, dk, dv, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """dK (unscaled) and dV of a key tile accumulated over one query tile (q, do: (BLOCK_M, BLOCK_D); s: its
    float32 scores against the key tile; lse, delta: the rows' statistics). -> (dk, dv)."""
    p = tl.exp2((s - lse[:, None]) * LOG2E)  # lse = +inf (row outside [0, S), no key): p = 0
    pz = p
    if HAS_DROPOUT:
        pz = p * z
    dv += tl.dot(tl.trans(pz.to(do.dtype)), do, input_precision=DOT_PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        dp = dp * z
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    return dk, dv
