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
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from longattn._memo import LastCall

from ._launch import cached

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
# all D wide). The 8 warps date from kernels that spilled at 4 (an early offline sm_90 compile). The kernels of
# 2026-12-01 compiled at 4 warps (one warpgroup per 64 rows) spill nothing but the dK/dV kernel with both tables
# (24-36 B) and issue 18-33 % fewer instructions per score at more programs per SM (sm_90 SASS, static; the table
# is beside ``benchmarks/tune_triton.py``'s CANDIDATES, whose sweep tries them first): the choice is a GPU's to make.
_GPU_TILES = {16: (64, 64, 8), 32: (64, 64, 8), 64: (64, 64, 8), 128: (64, 32, 8)}
# For tuning runs: LONGATTN_TRITON_TILES="BLOCK_M,BLOCK_N,num_warps" overrides the table (powers of two >= 16).
_TILES_ENV = "LONGATTN_TRITON_TILES"
# For measurements: LONGATTN_TRITON_KV_STAGES=N software-pipelines the dK/dV kernels' query-tile loop N deep instead of
# the launch default (3 on sm_90). At 1 the loop is ~6 % shorter (sm_90 SASS, local op, D = 64, Triton 3.8: 574
# instructions per tile against 610), but the next tile's loads are no longer prefetched: which is faster is for a GPU
# to say (``benchmarks/gpu_check.py``'s bench-kv-stages).
_KV_STAGES_ENV = "LONGATTN_TRITON_KV_STAGES"
# Under TRITON_INTERPRET=1 (CPU tests) every tile op is a numpy call, so small tiles keep the tests fast and
# make small sequences cross several tiles (edge and interior paths both run). 16 is tl.dot's minimum.
_INTERPRET_TILES = (16, 16, 1)
# Warps of the side keys' dK/dV launch with a narrow (16-key) side tile (``side_tiles``). From an offline sm_90
# compile at Longformer's shape (bf16, D = 64, 1 global, Triton 3.8, 3.6 alike; not timed): per query tile, 4 warps
# issue 4 x 472 SASS instructions (79 registers), 8 warps 8 x 381, 2 warps 2 x 748 (220 registers); the 64-key tile
# issued 8 x 436. Its few programs (one per side tile, batch * head and query chunk) run one or two to an SM, so the
# fewest warp-instructions at the fewest per warp scheduler win: 4.
_SIDE_KEY_WARPS = 4
# exp(x) = exp2(x log2 e), exp2 being the hardware instruction; log2 e = 1.4426950408889634 is written as a literal
# where it is used. A tl.constexpr global costs every launch a check (Triton compares each global a kernel reads with
# its compiled value: ~0.5 us on this project's CPU), and a helper function around exp2 changes the register
# allocation (sm_90, the dQ kernel with every bias and mask: 8 more bytes of spills).


@functools.cache
def interpreting() -> bool:
    """TRITON_INTERPRET=1: read once, as Triton itself does when it decorates the kernels at import."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Host-side integer helpers. ``triton.cdiv`` / ``triton.next_power_of_2`` are constexpr functions: called from Python
# they cost ~6 us each (an import and argument unwrapping per call), a dozen of them per op call.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


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
    return max(1, min(n_units, cdiv(waves * num_sms(device), n_programs), cap))


# The backward's bias-gradient partials (``bias_grad``) may take this much: a quarter of q's bytes (about 1/28 of the
# memory floor of q, k, v, o and their gradients), and at least _PARTIAL_MIN_BYTES, so that small problems (LongT5
# TGlobal at S = 16384, B = 1, H = 12: 10 MiB) keep one side-key tile per program.
_PARTIAL_SHARE = 4
_PARTIAL_MIN_BYTES = 32 << 20


@functools.cache
def partial_programs(n_rows: int, n_tiles: int, row_bytes: int, q_bytes: int, device=None, *, spent: int = 0,
                     waves: int = 4) -> int:
    """Programs per row of the grid's other axes (``n_rows`` of them) of a pass whose programs each own one partial
    row of ``row_bytes`` for a run of consecutive tiles (with fewer programs than ``n_tiles``: PERSISTENT, the runs
    balanced to within one tile), so the partials take ``n_rows * programs * row_bytes`` bytes: the side-key dK/dV
    pass (``band_side._keys_kernel`` with SIDE), ``n_rows = B * H * splits``, whose side-bias rows have 2G + L columns
    (G ~ S / block length), so one row per side-key tile would be quadratic in S (LongT5 TGlobal at S = 131072:
    101 MiB); the one split heuristic of that pass next to ``split_count``.

    ``n_tiles`` (one tile per program, the kernel compiled as without persistence) when their rows fit the budget,
    ``max(_PARTIAL_MIN_BYTES, q_bytes / _PARTIAL_SHARE) - spent`` (``spent``: the bytes of the other partials, the
    band-bias rows). Otherwise as many as fit, but never fewer than keep ``waves`` waves of the device's SMs busy
    (memory then gives way), then rounded down (by at most a quarter) to fill the last wave best: a program holds an
    SM alone (over 128 registers x 8 warps on sm_90), and a long run of tiles leaves no later programs to fill a
    part-empty last wave. Under the interpreter: about 2 tiles per program on multi-tile inputs with partials, so
    tests cross the accumulate path."""
    if row_bytes == 0 or n_tiles < 2:
        return n_tiles
    if interpreting():
        return cdiv(n_tiles, 2)
    column = n_rows * row_bytes  # one program per row of the other axes
    budget = max(_PARTIAL_MIN_BYTES, q_bytes // _PARTIAL_SHARE) - spent
    if n_tiles * column <= budget:
        return n_tiles
    sms = num_sms(device)
    programs = min(n_tiles, max(budget // column, cdiv(waves * sms, n_rows)))
    return max(range(programs - programs // 4, programs + 1),
               key=lambda p: (n_rows * p / (sms * cdiv(n_rows * p, sms)), p))


def head_dim_block(D: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot's minimum); the pad columns are masked to zero."""
    return max(16, next_power_of_2(D))


def attention_tiles(D: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a head dim D (padded as ``head_dim_block``)."""
    return _attention_tiles(D, os.environ.get(_TILES_ENV))


# Per call only the override is read (tests set it at run time); the rest is cached, as is side_tiles' choice:
# every band op call picks its tiles twice or more (forward, backward, side keys).
@functools.cache
def _attention_tiles(D: int, override: str | None) -> tuple[int, int, int]:
    if override:
        block_m, block_n, warps = (int(x) for x in override.split(","))
        return block_m, block_n, warps
    if interpreting():
        return _INTERPRET_TILES
    return _GPU_TILES[head_dim_block(D)]


def side_tiles(G: int, D: int, side_bias: bool = False) -> tuple[int, int]:
    """(SIDE_N, num_warps of the side keys' dK/dV launch) for G side keys and head dim D: the side tiles' width in the
    forward / dQ kernels' side loop (``band_side._rows_kernel``'s SIDE_N) and the key tile of the side keys' dK/dV
    (``band_side._keys_kernel`` with SIDE), chosen here once for both passes.

    ``max(16, next_power_of_2(G))`` keys when that is narrower than ``attention_tiles``' BLOCK_N (16: tl.dot's
    minimum), else BLOCK_N itself. Longformer's few global keys (1 to a dozen) would otherwise fill a 64-key tile with
    masked columns: one side tile against the 9 band tiles of a 64-row query tile at window +-256, ~10 % more MMA
    work in the forward, the dQ pass and the side dK/dV. A narrow tile holds all G keys (one side tile per query
    tile). With a side bias table the width stays BLOCK_N (the side dK/dV pass's side-bias sums are built
    for it).

    Offline sm_90 compile at Longformer's benchmark shape (bf16, S = 16384, D = 64, window +-256; Triton 3.6 / 3.8;
    static SASS, not timed): with 1 global (G = 1 is a compile-time constant, so most of a wide tile's masked columns
    were folded away already) the side tile's wgmma go from 8 / 16 of 64x32x16 per warpgroup (forward / dQ) to 4 / 12
    of 64x8x16 plus 1 of 64x32x16, but its instructions only by ~40-65 per warp of ~5000 per query tile; with
    2 to 15 globals (G not a constant) the side loop shrinks from 564 / 566-572 to 207-211 / 203-207 instructions per
    warp. The dQ kernel stays at <= 128 registers (two programs per SM). The side dK/dV: see ``_SIDE_KEY_WARPS``;
    under the interpreter or the tile override its warps are ``attention_tiles``'."""
    return _side_tiles(G, D, side_bias, os.environ.get(_TILES_ENV))


@functools.cache
def _side_tiles(G: int, D: int, side_bias: bool, override: str | None) -> tuple[int, int]:
    block_m, block_n, warps = _attention_tiles(D, override)
    side_n = min(block_n, max(16, next_power_of_2(G)))
    if side_bias or G == 0 or side_n == block_n:
        return block_n, warps
    if interpreting() or override:
        return side_n, warps
    return side_n, _SIDE_KEY_WARPS


class LaunchTiles(NamedTuple):
    """A band launch's tiles (``launch_tiles``): BLOCK_M, BLOCK_N, num_warps (``attention_tiles``), SIDE_N and the
    side keys' dK/dV warps (``side_tiles``), BLOCK_D (``head_dim_block``), DOT_PREC (``dot_precision``), the
    dK/dV kernels' KV_STAGES (None: the launch default; ``_KV_STAGES_ENV``) and the launch options of the forward
    and, without dropout, of the dQ kernel (``rows_cap``)."""

    block_m: int
    block_n: int
    warps: int
    side_n: int
    side_warps: int
    block_d: int
    dot_prec: str
    kv_stages: int | None
    rows_options: dict


# The forward and dQ kernels (``band_side._rows_kernel``) are written to hold two programs per SM (sm_90: 65536
# registers, so 128 a thread at 8 warps; ``tests/test_triton_bias_cost.py``) and are launched with that cap (ptxas's
# maxnreg). Without it Triton 3.6's ptxas (the H200 image's) gave LongT5 TGlobal's forward with its padding mask 169
# registers and the local op's dQ with a band table (LongT5's local attention) 170, 158 with padding: one program
# per SM. Capped: 122, 126, 125, no spill, their band loops 649 -> 659, 607 -> 624 and 679 -> 704 instructions per
# tile. Where ptxas already fit (Triton 3.8, every other op) the cap moves a loop by -1 to +4 %. With dropout the
# forward needs 168-242 and capped it fits (its loops +1 to +3 %, at most 24 B spilled, outside them but for 2-3
# local-memory accesses per tile of LongT5's forwards under 3.6); the dQ needs 217-235 and capped it spills inside
# its loops (16-79 accesses per tile), so it is launched uncapped. sm_90, D = 64, bf16, S = 16384,
# compiled on the CPU as the launches specialize them; not timed.
_TWO_PROGRAMS_REGISTERS = 65536 // 2 // 32  # a thread's registers at two programs per SM, times num_warps


def rows_cap(warps: int) -> dict:
    """The forward / dQ launch's ``maxnreg`` keyword for ``warps`` warps (two programs per SM), or {} when no cap
    binds (a thread has at most 255 registers)."""
    cap = _TWO_PROGRAMS_REGISTERS // warps
    return {"maxnreg": cap} if cap < 255 else {}


def launch_tiles(D: int, G: int, side_bias: bool, dtype) -> LaunchTiles:
    """Every tile choice of a band launch (head dim D, G side keys, a side bias table or not, q's dtype) in one cached
    lookup: the launchers pick them at every forward and backward, and looked up one by one each read the tile
    override and a cache again (a microsecond or two of a call's host time on this CPU, within the run-to-run noise of
    whole calls). The overrides are read per call, as ``attention_tiles`` reads its own."""
    return _launch_tiles(D, G, side_bias, dtype, os.environ.get(_TILES_ENV), os.environ.get(_KV_STAGES_ENV))


@functools.lru_cache(maxsize=1024)  # G (TGlobal's S / block) varies with the length
def _launch_tiles(D: int, G: int, side_bias: bool, dtype, override: str | None, kv_stages: str | None
                  ) -> LaunchTiles:
    block_m, block_n, warps = _attention_tiles(D, override)
    if kv_stages is not None and not (kv_stages.isdigit() and int(kv_stages) >= 1):
        raise ValueError(f"{_KV_STAGES_ENV}: expected a positive integer, got {kv_stages!r}")
    return LaunchTiles(block_m, block_n, warps, *_side_tiles(G, D, side_bias, override), head_dim_block(D),
                       dot_precision(dtype), None if kv_stages is None else int(kv_stages), rows_cap(warps))


def dot_precision(dtype) -> str:
    """fp32 inputs use exact fp32 products ("ieee"), matching torch's default (TF32 off for matmul)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def strides3(x) -> tuple[int, int, int]:
    """(batch, sequence, head) strides of a (B, S, H, D) tensor; the kernels assume a unit last stride."""
    strides = x.stride()
    if strides[-1] != 1 and x.shape[-1] > 1:
        raise ValueError(f"the Triton kernels need a contiguous last dim, got strides {strides}")
    return strides[0], strides[1], strides[2]


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


# The forward adds the bias tables' entries through tl.dot's accumulator: the scores are (q k^T + bias / scale) * scale
# (``band_side._rows_kernel``'s BIAS_ACC). Added after the product instead, the table loads (a gather, which Triton
# lays out for coalescing, not as the product's registers) pulled the scores' softmax into both layouts: every tile
# converted the bias tile and the scores through shared memory (+4 barriers) and computed exp2 twice, and ptxas
# serialized the wgmma of the local op with a band table (sm_90 SASS, D = 64, bf16, 64 x 64 tiles; Triton 3.6 / 3.8,
# instructions per band tile 731 / 668 -> 577 / 568). As the accumulator, the tile is converted once into the
# product's layout and everything after stays there. Dividing by scale is exact for a power of two and within a
# rounding otherwise; it is done only when 1 / scale cannot push a bias entry of magnitude below 2**63 (ordinary
# values, +-inf included) past float32's range: |scale| >= 2**-64. Otherwise (scale = 0, say) the tables are added
# after the product as in the backward.
BIAS_ACC_MIN_SCALE = 2.0**-64


def bias_acc(band_bias, side_bias, scale: float) -> bool:
    """Whether a forward launch adds its bias tables through the product's accumulator (``BIAS_ACC_MIN_SCALE``)."""
    return (band_bias is not None or side_bias is not None) and abs(scale) >= BIAS_ACC_MIN_SCALE


@triton.jit
def band_bias(bias_ptr, rows, cols, left, right):
    """Float32 ``band_bias`` entries of pairs (i, j) (``rows``, ``cols`` as in ``band_scores``; ``bias_ptr``: this
    head's row of W entries), the offsets clamped into the row: a pair outside the band reads an entry, never out
    of bounds, and is masked by ``band_scores``."""
    return tl.load(bias_ptr + tl.minimum(tl.maximum(cols - rows + left, 0), left + right)).to(tl.float32)


@triton.jit
def side_bias(bias_ptr, qblock, g, G):
    """Float32 ``side_bias`` entries of (query, side key g) pairs (``qblock``, ``g`` as in ``side_scores``;
    ``bias_ptr``: this head's row of 2G + 1 entries), clamped into the row as ``band_bias``."""
    return tl.load(bias_ptr + tl.minimum(tl.maximum(g - qblock + G, 0), 2 * G)).to(tl.float32)


@triton.jit
def band_scores(qk, rows, cols, edge, S, left, right, scale, bias_ptr, kmask_ptr,
                HAS_BIAS: tl.constexpr, HAS_KMASK: tl.constexpr, halo=None, HAS_HALO: tl.constexpr = False,
                HAS_HMASK: tl.constexpr = False):
    """Float32 scores of band pairs (i, j) from ``qk = <q_i, k_j>``; -inf where not attended.

    ``rows`` / ``cols`` hold i and j, broadcastable to qk's shape: ``(BLOCK_M, 1)`` and ``(1, BLOCK_N)`` for a
    key tile, or ``(BLOCK_M, 1)`` and ``(BLOCK_M, BLOCK_T)`` for the skewed tiles of the bias gradient.
    ``bias_ptr`` points at this head's row of ``band_bias`` (W entries); ``kmask_ptr`` at this batch row of
    ``band_key_mask`` (uint8, S entries). ``edge`` (scalar) adds the band / sequence mask.

    HAS_HALO (see ``load_halo_rows``): keys ``j`` lie in ``[halo[0], halo[1])`` instead of ``[0, S)``; the halo keys'
    mask (HAS_HMASK: ``halo[2]``, this batch row of ``halo_mask``) is read only on edge tiles, the only ones that
    reach outside ``[0, S)``.
    """
    s = qk * scale
    t = cols - rows + left  # band offset j - i + left
    if HAS_BIAS:
        s += band_bias(bias_ptr, rows, cols, left, right)
    if edge:
        if HAS_HALO:
            keep = (t >= 0) & (t <= left + right) & (cols >= halo[0]) & (cols < halo[1])
            if HAS_HMASK:
                keep = keep & (tl.load(halo[2] + halo_row(cols, S, halo[3]), mask=keep & ((cols < 0) | (cols >= S)),
                                       other=1) != 0)
        else:
            keep = (t >= 0) & (t <= left + right) & (cols >= 0) & (cols < S)
        s = tl.where(keep, s, float("-inf"))
    if HAS_KMASK:
        # with a halo, band_key_mask covers the local keys only (halo keys: halo_mask, above)
        km = tl.load(kmask_ptr + cols, mask=(cols >= 0) & (cols < S), other=1 if HAS_HALO else 0)
        s = tl.where(km != 0, s, float("-inf"))
    return s


# --------------------------------------------------------------------------------------------------------
# halo keys (sequence parallelism; notes/halo_contract.md): band keys j in [-HL, S + HR) in local numbering, the
# rows j < 0 and j >= S read in place from the (HL + HR)-row halo buffers. The kernels take them behind a
# constexpr HAS_HALO, so without a halo nothing below is compiled in. ``halo`` (in the kernels) is the tuple
# ``(key_lo, key_hi, halo_mask row pointer, HL)``: the keys ``[key_lo, key_hi)`` any query can reach (``halo_args``).
# --------------------------------------------------------------------------------------------------------


@triton.jit
def halo_row(j, S, HL):
    """Row of the halo buffers holding key ``j`` outside ``[0, S)``: ``HL + j`` (left part), ``HL + j - S`` (right)."""
    return tl.where(j < 0, j + HL, j - S + HL)


@triton.jit
def load_halo_rows(base, hbase, offs, S, stride, hstride, halo, offs_d, D, ALIGN: tl.constexpr):
    """``load_rows`` of key rows ``offs`` in local numbering: row j of the (S, D) matrix at ``base`` for j in
    ``[0, S)``, else row ``halo_row(j)`` of the halo matrix at ``hbase`` (row stride ``hstride``); zeros outside
    ``[halo[0], halo[1])``. One load: each row's pointer is selected from the two sources (no branch, no copy).

    ``ALIGN``: the bytes every row pointer is known to be a multiple of (``halo_args``). Triton's alignment analysis
    loses it through the select, and without it the load is neither vectorised nor pipelined (sm_90 SASS: scalar
    16-bit loads instead of 128-bit cp.async)."""
    local = (offs >= 0) & (offs < S)
    row_ptr = tl.where(local, base + offs.to(tl.int64) * stride,
                       hbase + halo_row(offs, S, halo[3]).to(tl.int64) * hstride)
    row_ptr = tl.multiple_of(row_ptr, ALIGN)
    mask = (offs[:, None] >= halo[0]) & (offs[:, None] < halo[1]) & (offs_d[None, :] < D)
    return tl.load(row_ptr[:, None] + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def side_scores(qk, qblock, g, G, scale, bias_ptr, smask_ptr, HAS_BIAS: tl.constexpr, HAS_SMASK: tl.constexpr):
    """Float32 scores of (query i, side key g) pairs; -inf for g outside [0, G) and masked side keys.

    ``qblock``: query blocks of the rows, ``(BLOCK_M, 1)`` int32 (only read with a bias); ``g``: side-key
    indices broadcastable against it. ``bias_ptr``: this head's row of ``side_bias`` (2G + 1 entries);
    ``smask_ptr``: this batch row of ``side_mask`` (uint8, G entries).
    """
    s = qk * scale
    if HAS_BIAS:
        s += side_bias(bias_ptr, qblock, g, G)
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
    alpha = tl.exp2((m_i - m_safe) * 1.4426950408889634)
    p = tl.exp2((s - m_safe[:, None]) * 1.4426950408889634)
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
    p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        dp = dp * z
    return p * (dp - delta[:, None])


@triton.jit
def kv_grad_step(s, z, q, do, v, lse, delta, dk, dv, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """dK (unscaled) and dV of a key tile accumulated over one query tile (q, do: (BLOCK_M, BLOCK_D); s: its
    float32 scores against the key tile; lse, delta: the rows' statistics). -> (dk, dv)."""
    dk, dv, _ = kv_grad_ds_step(s, z, q, do, v, lse, delta, dk, dv, HAS_DROPOUT, DOT_PREC)
    return dk, dv


@triton.jit
def kv_grad_ds_step(s, z, q, do, v, lse, delta, dk, dv, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """``kv_grad_step`` that also returns the tile's float32 dS (the bias-table sums read it). -> (dk, dv, ds)."""
    p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)  # lse = +inf (row outside [0, S), no key): p = 0
    pz = p
    if HAS_DROPOUT:
        pz = p * z
    dv += tl.dot(tl.trans(pz.to(do.dtype)), do, input_precision=DOT_PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if HAS_DROPOUT:
        dp = dp * z
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    return dk, dv, ds


# --------------------------------------------------------------------------------------------------------
# per-row key ranges (packed variable-length batches; notes/ranges_contract.md). A range tensor is contiguous
# int32 (B, R, 2): row r of batch row b may attend key j only if ranges[b, r, 0] <= j < ranges[b, r, 1]. The
# kernels take it behind a constexpr HAS_RANGES, so without ranges nothing below is compiled in.
# --------------------------------------------------------------------------------------------------------


@triton.jit
def load_ranges(ptr, rows, row_ok, n):
    """(lo, hi) of ``rows`` (``ptr``: this batch row of a (B, R, 2) range tensor), clamped to [0, n] so that any
    value is safe and no bound arithmetic overflows; rows not ``row_ok`` get the empty range (0, 0)."""
    lo = tl.load(ptr + 2 * rows, mask=row_ok, other=0)
    hi = tl.load(ptr + 2 * rows + 1, mask=row_ok, other=0)
    return tl.minimum(tl.maximum(lo, 0), n), tl.minimum(tl.maximum(hi, 0), n)


@triton.jit
def range_union(lo, hi, n, AXIS: tl.constexpr):
    """``[min lo, max hi)`` over the rows (along ``AXIS``) with a non-empty range: the keys a tile of rows may attend
    (``n``, 0 when none has a key). Exact for the monotone ranges of packed batches, a superset for any others."""
    nonempty = lo < hi
    return tl.min(tl.where(nonempty, lo, n), AXIS), tl.max(tl.where(nonempty, hi, 0), AXIS)


@triton.jit
def range_tiles(t_lo, t_hi, start, lo, hi, BLOCK: tl.constexpr):
    """``[t_lo, t_hi)`` cut to the tiles ``[start + t * BLOCK, start + (t + 1) * BLOCK)`` that meet keys ``[lo, hi)``
    (``lo``, ``hi`` in [0, n]); the result stays inside ``[t_lo, t_hi]`` (empty: t_hi == t_lo)."""
    first = tl.maximum(lo - start, 0) // BLOCK
    last = (tl.maximum(hi - start, 0) + BLOCK - 1) // BLOCK
    t_lo_new = tl.minimum(tl.maximum(t_lo, first), t_hi)
    return t_lo_new, tl.maximum(tl.minimum(t_hi, last), t_lo_new)


@triton.jit
def range_mask(s, cols, lo, hi):
    """Scores ``s`` (rows, cols) with -inf where key ``cols`` (1, BLOCK_N) lies outside the row's ``[lo, hi)``."""
    return tl.where((cols >= lo[:, None]) & (cols < hi[:, None]), s, float("-inf"))


@triton.jit
def _tile_sees(ptr, row0, n_rows, key_lo, key_hi, n, BLOCK_M: tl.constexpr):
    """True when some row of ``[row0, row0 + BLOCK_M)`` (of ``n_rows``) has a range meeting keys [key_lo, key_hi)."""
    rows = row0 + tl.arange(0, BLOCK_M)
    lo, hi = load_ranges(ptr, rows, (rows >= 0) & (rows < n_rows), n)
    return tl.max(((lo < hi) & (lo < key_hi) & (hi > key_lo)).to(tl.int32), 0) > 0


@triton.jit
def trim_row_tiles(ptr, t_lo, t_hi, start, n_rows, key_lo, key_hi, n, BLOCK_M: tl.constexpr):
    """``[t_lo, t_hi)`` of row tiles ``start + t * BLOCK_M`` without the tiles at either end none of whose rows may
    attend keys ``[key_lo, key_hi)``: the key-side (dK/dV) passes skip them. For monotone ranges the rows that see a
    key tile are one interval, so every tile skipped is skipped; for any others the tiles kept are a superset."""
    while (t_lo < t_hi) & (_tile_sees(ptr, start + t_lo * BLOCK_M, n_rows, key_lo, key_hi, n, BLOCK_M) == 0):
        t_lo += 1
    while (t_lo < t_hi) & (_tile_sees(ptr, start + (t_hi - 1) * BLOCK_M, n_rows, key_lo, key_hi, n, BLOCK_M) == 0):
        t_hi -= 1
    return t_lo, t_hi


@triton.jit
def range_cover(lo, hi, row_ok, n, AXIS: tl.constexpr):
    """``[max lo, min hi)`` over the rows ``row_ok`` (along ``AXIS``): a key tile inside it is in every row's range
    (no range mask)."""
    return tl.max(tl.where(row_ok, lo, 0), AXIS), tl.min(tl.where(row_ok, hi, n), AXIS)


@triton.jit
def ranged_scores(s, n0, cols, ptr, rows, row_ok, n, cover_lo, cover_hi, BLOCK_N: tl.constexpr):
    """``range_mask`` of the key tile ``[n0, n0 + BLOCK_N)`` (``cols``: (1, BLOCK_N)) for ``rows`` (their ranges
    reloaded from ``ptr``, see ``load_ranges``: cached, and not kept live through the loop, where registers are
    short), skipped when the tile lies in the rows' cover (``range_cover``): for packed batches, every tile but
    those at a sequence boundary."""
    if (n0 < cover_lo) | (n0 + BLOCK_N > cover_hi):
        s = range_mask(s, cols, *load_ranges(ptr, rows, row_ok, n))
    return s


def range_arg(ranges, name: str, rows: tuple[int, int], dummy):
    """(pointer, flag) of an optional per-row range tensor, which must be contiguous int32 ``(*rows, 2)`` on
    ``dummy``'s device (``dummy`` stands in, never read, when it is None or empty)."""
    if ranges is None:
        return dummy, False
    if ranges.dtype != torch.int32 or tuple(ranges.shape) != (*rows, 2) or not ranges.is_contiguous() or (
            ranges.device != dummy.device):
        raise ValueError(f"{name}: expected a contiguous int32 {(*rows, 2)} tensor on {dummy.device}, got "
                         f"{ranges.dtype} {tuple(ranges.shape)} strides {tuple(ranges.stride())} on {ranges.device}")
    return (dummy, True) if ranges.numel() == 0 else (ranges, True)


# The kernels' halo keywords without a halo: None arguments are compile-time constants, so the no-halo kernels are
# compiled exactly as before the halo existed (no extra parameters).
_NO_HALO = dict(HK=None, HV=None, HMask=None, stride_hkb=None, stride_hks=None, stride_hkh=None, stride_hvb=None,
                stride_hvs=None, stride_hvh=None, n_halo=None, halo_left=None, key_lo=None, key_hi=None,
                HAS_HALO=False, HAS_HMASK=False, HALO_ALIGN=1)


def _row_align(*tensors) -> int:
    """16 when every (batch, row, head) start of ``tensors`` is 16-byte aligned (then 128-bit loads), else 1."""
    ok = all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:3]) for t in tensors)
    return 16 if ok else 1


def halo_args(halo_k, halo_v, halo_mask, halo_left, k, v, left: int, right: int) -> dict:
    """The band kernels' halo keywords (``notes/halo_contract.md``): ``halo_k``, ``halo_v`` (B, HL + HR, H_kv, D) like
    ``k`` (same dtype and device, unit last stride, any other strides), ``halo_mask`` None or contiguous bool
    (B, HL + HR), ``halo_left`` the int HL. All None: no halo (``_NO_HALO``). Bad input raises ValueError naming the
    argument. ``key_lo`` / ``key_hi``: the band keys ``[-min(HL, left), S + min(HR, right))`` some query can reach;
    halo rows beyond them are never loaded (their gradients are zeros). ``HALO_ALIGN``: see ``load_halo_rows``."""
    if halo_k is None:
        for name, x in (("halo_v", halo_v), ("halo_mask", halo_mask), ("halo_left", halo_left or None)):
            if x is not None:
                raise ValueError(f"{name} was given without halo_k")
        return dict(_NO_HALO)
    B, S, H_kv, D = k.shape
    for name, x in (("halo_k", halo_k), ("halo_v", halo_v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or (x.shape[0], *x.shape[2:]) != (B, H_kv, D) or (
                x.dtype != k.dtype or x.device != k.device or (x.stride(-1) != 1 and D > 1)):
            raise ValueError(f"{name}: expected a (B, HL + HR, H_kv, D) = ({B}, *, {H_kv}, {D}) {k.dtype} tensor on "
                             f"{k.device} with unit last stride, got {_describe(x)}")
    n_halo = halo_k.shape[1]
    if halo_v.shape != halo_k.shape:
        raise ValueError(f"halo_v: shape {tuple(halo_v.shape)} differs from halo_k's {tuple(halo_k.shape)}")
    if isinstance(halo_left, bool) or not isinstance(halo_left, int) or not 0 <= halo_left <= n_halo:
        raise ValueError(f"halo_left: expected an int in [0, {n_halo}] (halo_k.shape[1]), got {halo_left!r}")
    if halo_mask is not None and (not isinstance(halo_mask, torch.Tensor) or halo_mask.dtype != torch.bool or (
            tuple(halo_mask.shape) != (B, n_halo) or not halo_mask.is_contiguous() or halo_mask.device != k.device)):
        raise ValueError(f"halo_mask: expected None or a contiguous bool ({B}, {n_halo}) tensor on {k.device}, got "
                         f"{_describe(halo_mask)}")
    # An empty halo tensor may have a null data pointer: k stands in (never read, key_lo / key_hi exclude it).
    hk, hv = (halo_k, halo_v) if n_halo else (k, k)
    return dict(HK=hk, HV=hv, HMask=as_u8(halo_mask, hk), stride_hkb=hk.stride(0), stride_hks=hk.stride(1),
                stride_hkh=hk.stride(2), stride_hvb=hv.stride(0), stride_hvs=hv.stride(1), stride_hvh=hv.stride(2),
                n_halo=n_halo, halo_left=halo_left, key_lo=-min(halo_left, left),
                key_hi=S + min(n_halo - halo_left, right), HAS_HALO=True,
                HAS_HMASK=halo_mask is not None and n_halo > 0, HALO_ALIGN=_row_align(k, v, hk, hv))


def _describe(x) -> str:
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    return f"{x.dtype} {tuple(x.shape)} strides {tuple(x.stride())} on {x.device}"


def halo_excluded(halo_k, **options) -> None:
    """ValueError when a halo (``halo_k`` given) meets an option it cannot be combined with (``options``: name ->
    whether that option is on)."""
    if halo_k is not None:
        for name, on in options.items():
            if on:
                raise ValueError(f"halo_k: halo keys cannot be combined with {name}")


def dlse_args(dlse, lse):
    """The lse-gradient keywords of ``band_side._rows_kernel``'s backward (which computes delta); ``dlse`` must be a
    float32 tensor shaped like ``lse`` (any strides: autograd may hand an expanded one; copied contiguous then,
    B * H * S floats)."""
    if dlse is None:
        return {}
    if not isinstance(dlse, torch.Tensor) or dlse.dtype != torch.float32 or dlse.shape != lse.shape or (
            dlse.device != lse.device):
        got = f"{dlse.dtype} {tuple(dlse.shape)} on {dlse.device}" if isinstance(dlse, torch.Tensor) else type(dlse)
        raise ValueError(f"dlse: expected a float32 {tuple(lse.shape)} tensor on {lse.device}, got {got}")
    return dict(DLse=dlse.contiguous(), HAS_DLSE=True)


def halo_grad_args(halo, dk, block_n: int):
    """(the (dhalo_k, dhalo_v) returned, empty without a halo; the dK/dV kernel's output keywords; its extra key
    tiles): contiguous (B, n_halo, H_kv, D) like ``dk``, written by ``cdiv(HL, BLOCK_N) + cdiv(HR + S % 4, BLOCK_N)``
    programs (none for an empty part) past those of the S keys (``band_side._keys_kernel``); ``block_n``: the band
    launch's BLOCK_N."""
    if not halo["HAS_HALO"]:
        return (), {}, 0
    B, S, H_kv, D = dk.shape
    n_halo, left = halo["n_halo"], halo["halo_left"]
    dhk = torch.empty(B, n_halo, H_kv, D, dtype=dk.dtype, device=dk.device)
    dhv = torch.empty_like(dhk)
    # an empty halo tensor may have a null data pointer: dk stands in (no halo tile, never written)
    out = dict(DHK=dhk if n_halo else dk, DHV=dhv if n_halo else dk, stride_dhb=dhk.stride(0))
    # the right part's tiles start at S rounded down to a multiple of 4 (``band_side._keys_kernel``): S % 4 more keys
    right = n_halo - left
    return (dhk, dhv), out, cdiv(left, block_n) + (cdiv(right + S % 4, block_n) if right else 0)


@triton.jit
def store_tile_bounds(out, lo, hi, row_ok, n, AXIS: tl.constexpr, tile_ok=None):
    """The four bounds columns of ``tile_bounds`` (union lo, hi; cover lo, hi) of ranges ``lo``, ``hi`` (in [0, n],
    as ``load_ranges`` gives them) of rows ``row_ok``, reduced along ``AXIS``: one tile's at ``out`` (AXIS 0), or
    those of a row of tiles (AXIS 1: ``out`` a pointer per tile, stored where ``tile_ok``)."""
    u_lo, u_hi = range_union(lo, hi, n, AXIS)
    c_lo, c_hi = range_cover(lo, hi, row_ok, n, AXIS)
    tl.store(out, u_lo, mask=tile_ok)
    tl.store(out + 1, u_hi, mask=tile_ok)
    tl.store(out + 2, c_lo, mask=tile_ok)
    tl.store(out + 3, c_hi, mask=tile_ok)


@triton.jit
def _tile_bounds_kernel(KRange, SRange, Used, Bounds, R, n_keys, n_side, HAS_K: tl.constexpr, HAS_S: tl.constexpr,
                        HAS_USED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per (batch row, tile of BLOCK_M of the R rows): the union and the cover (``range_union``, ``range_cover``) of
    its rows' key ranges (columns 0..3) and side ranges (4..7) into Bounds (B, row tiles, 8) int32; with HAS_USED
    only the rows where ``Used`` (B, R) uint8 is set count."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    if HAS_USED:
        row_ok = row_ok & (tl.load(Used + b * R + rows, mask=row_ok, other=0) != 0)
    out = Bounds + (b * tl.num_programs(0) + pid_m) * 8
    if HAS_K:
        lo, hi = load_ranges(KRange + b * 2 * R, rows, row_ok, n_keys)
        store_tile_bounds(out, lo, hi, row_ok, n_keys, 0)
    if HAS_S:
        s_lo, s_hi = load_ranges(SRange + b * 2 * R, rows, row_ok, n_side)
        store_tile_bounds(out + 4, s_lo, s_hi, row_ok, n_side, 0)


def tile_bounds(key_ranges, side_ranges, n_keys, n_side, block_m, like, used=None):
    """(B, cdiv(R, block_m), 8) int32 range bounds per tile of the R rows of the (B, R, 2) ``key_ranges`` (keys in
    [0, n_keys)) / ``side_ranges`` (side keys in [0, n_side)) (``_tile_bounds_kernel``; the columns of an absent
    tensor are left unset; ``used`` (B, R) uint8: rows that count), or ``like`` when there are no ranges. The
    attention kernels read these scalars per tile instead of reducing the rows' ranges themselves: reductions
    before the tile loop cost the dQ kernel (all biases on) ~100 registers' worth of spills on sm_90.

    The result is kept for the next call with the same, unmodified range tensors (``longattn._memo``): the packed ops
    pass the same ranges to every layer's forward and backward, which then launch no bounds kernel."""
    if key_ranges is None and side_ranges is None:
        return like
    return _LAST_BOUNDS.get(lambda: _tile_bounds(key_ranges, side_ranges, n_keys, n_side, block_m, like, used),
                            (key_ranges, side_ranges, used), (n_keys, n_side, block_m))


_LAST_BOUNDS = LastCall()


def check_bounds(bounds, B: int, R: int, block_m: int, like):
    """``bounds`` if it has ``tile_bounds``' layout for R rows in tiles of ``block_m`` (B, cdiv(R, block_m), 8) int32,
    contiguous, on ``like``'s device; else ValueError (bounds of another tiling would skip keys)."""
    shape = (B, cdiv(R, block_m), 8)
    if (bounds.dtype != torch.int32 or tuple(bounds.shape) != shape or not bounds.is_contiguous()
            or bounds.device != like.device):
        raise ValueError(f"range_bounds: expected a contiguous int32 {shape} tensor on {like.device} (tile bounds for "
                         f"BLOCK_M = {block_m}), got {bounds.dtype} {tuple(bounds.shape)} on {bounds.device}")
    return bounds


def _tile_bounds(key_ranges, side_ranges, n_keys, n_side, block_m, like, used):
    B, R = (key_ranges if key_ranges is not None else side_ranges).shape[:2]
    n_tiles = cdiv(R, block_m)
    bounds = torch.empty(B, n_tiles, 8, dtype=torch.int32, device=like.device)
    if bounds.numel():
        cached(_tile_bounds_kernel)[(n_tiles, B)](like if key_ranges is None else key_ranges,
                                          like if side_ranges is None else side_ranges,
                                          like if used is None else used, bounds, R, n_keys, n_side,
                                          HAS_K=key_ranges is not None, HAS_S=side_ranges is not None,
                                          HAS_USED=used is not None, BLOCK_M=block_m)
    return bounds
