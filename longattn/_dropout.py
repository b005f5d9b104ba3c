"""Attention-probability dropout bits: one counter-based function of (seed, offset, b, h, row, key).

Every backend (this torch reference, ``triton_kernels/_dropout.py``, ``csrc/common/philox.h``) drops exactly
the same entries for one ``(seed, offset)``, because the bits are a pure function of the entry's coordinates,
never of a kernel's tiling or thread layout.

Generator
    Philox4x32-10 (Salmon et al., SC'11; Random123's ``philox4x32_R(10, ...)``; curand's
    ``curandStatePhilox4_32_10``, behind torch's CUDA random ops and FlashAttention's dropout; Triton's
    ``tl.philox``): a 128-bit counter ``(c0, c1, c2, c3)`` and a 64-bit key ``(k0, k1)`` give four uint32
    words ``(x0, x1, x2, x3)``.

Counter layout (the contract every backend implements; all words uint32)
    ``seed``, ``offset``: uint64 (carried as int64 bit patterns, see "Passing seed and offset").
    ``bh = b * H + h``.

    ======  ==============================================================================================
    key     ``k0 = seed & 0xffffffff``, ``k1 = seed >> 32``
    c0:c1   ``(offset >> 2) + bh`` as a uint64, wrapping modulo 2**64 (c0 = low word, c1 = high word)
    c2      key-group word: ``j >> 2`` for band key ``j``; ``0x80000000 | (g >> 2)`` for side key ``g``
    c3      row word: ``i`` for query ``i``; ``0x80000000 | s`` for Longformer's *global row* of slot ``s``
    lane    ``j & 3`` (band) or ``g & 3`` (side): the entry's bits are output word ``x[lane]``
    ======  ==============================================================================================

    So four consecutive keys ``4q .. 4q + 3`` of one row share one Philox call and use its four outputs:
    a kernel whose key tile starts at a multiple of 4 evaluates Philox once per 4 entries (the Triton helper
    ``keep_tile_aligned``; in CUDA's mma fragment a lane pair holds such a group for rows r and r + 8: each
    lane computes one row's call and they trade two words with ``__shfl_xor_sync(.., 1)``).

    Key ids: this module (and the tests' dense oracle) numbers a row's keys in one int64 space,
    ``key_id = j`` for band key j and ``key_id = SIDE_KEY_BASE + g = 2**33 + g`` for side key g, so that
    ``c2 = (key_id >> 2) & 0xffffffff`` and ``lane = key_id & 3`` in both cases. Row ids likewise:
    ``row_id = i`` or ``GLOBAL_ROW_BASE + s = 2**31 + s``. Limits: ``S < 2**31``, ``G < 2**33``,
    ``B * H < 2**32``; every word is then exact, so nothing overflows for any ``B * H * S * (S + G)``
    (no linear element index is ever formed: (b, h), the key group and the row each have their own word;
    the only 64-bit sum, ``(offset >> 2) + bh``, is one scalar per (b, h)). Keys outside ``[0, S)`` (a tile
    or chunk hanging over the sequence) get well-defined bits that are never used.

    Which keys each op's rows see (the lead wires these; they follow DESIGN.md section 1):
    - local / LongT5 band rows: row ``i``, band keys ``j`` (absolute positions).
    - TGlobal: the same, plus side keys ``g`` = block aggregate index.
    - Longformer band rows: row ``i``, band keys ``j``, side keys ``g`` = the global-token *slot* (the g-th
      global token of the row, in position order, as ``longformer_attention`` gathers them; independent of
      ``max_globals``).
    - Longformer global rows (the global token in slot ``s`` attends every real token ``j`` with the global
      projections): row ``GLOBAL_ROW_BASE + s``, and its keys count as *side* keys ``j`` (key id
      ``SIDE_KEY_BASE + j``). That is exactly what the band + side primitive computes when it runs the
      global rows with the slots as its sequence and the S tokens as side keys (``rows_via_band_side`` in
      ``backends/_longformer.py``): it only has to set the row flag. The Triton global-rows kernel (slot
      tiles over key chunks) must use the same ids. The row flag keeps these bits apart from every band row.

Keep rule
    ``keep = bits >= t`` with the uint32 threshold ``t = ceil(p * 2**32)`` (clamped to ``2**32 - 1``), i.e.
    ``uniform = bits / 2**32 >= p``; ``P(keep) = 1 - t / 2**32``, equal to ``1 - p`` within ``2**-32``.
    Kept probabilities are multiplied by ``1 / (1 - p)``; the softmax normaliser is computed without dropout
    (dropout acts on the normalised probabilities, as ``nn.Dropout`` after ``softmax`` in the HF modules).
    ``p = 0`` gives ``t = 0``: every entry is kept (callers skip the bits altogether then).
    Backward with ``Z = keep / (1 - p)``: ``O = (P*Z) V``, ``dV = (P*Z)^T dO``, ``dP = (dO V^T) * Z``,
    ``dS = P * (dP - delta)`` with the usual ``delta = rowsum(dO * O)`` (still equal to ``rowsum(P * dP)``).

Where (seed, offset) come from: ``philox_seed_offset``
    - A generator with ``philox_state`` (torch's CUDA generators): ``philox_state(4 * B * H)`` reserves the
      counter values ``offset / 4 .. offset / 4 + B*H - 1`` (words c0:c1) for every subsequence (c2:c3) at
      the generator's seed, exactly the protocol of torch's own CUDA random kernels, so our bits never
      reuse a counter that another torch random op used, and the generator's offset advances by ``4*B*H``
      per call: consecutive calls get fresh masks. ``torch.manual_seed`` / ``torch.cuda.manual_seed`` reset
      seed and offset, so a program that makes the same sequence of random calls gets the same masks;
      ``torch.cuda.get_rng_state`` / ``set_rng_state`` (and so ``torch.utils.checkpoint``'s recomputation)
      restore them.
    - Other generators (CPU's Mersenne twister) and under ``torch.compile``: one ``torch.randint`` on the
      device draws a fresh 64-bit seed per call, with offset 0. Reproducible under ``torch.manual_seed``,
      different on every call, and traceable/graph-safe (it is an ordinary random op). The bits differ from
      the eager CUDA path's for the same manual seed (a different draw), never between backends.
    The draw happens once per op call, before backend dispatch, so torch, Triton and CUDA see the same
    ``(seed, offset)`` and drop the same entries. Bits also depend only on absolute (b, h, row, key), so
    the same inputs give the same mask for any tile size, chunk size or backend.

CUDA graphs
    During capture ``philox_state`` returns CUDA tensors aliasing the capture's seed/offset slots, which
    every replay refills; ``philox_seed_offset`` then builds the ``(seed, offset + intragraph_offset)`` pair
    with captured device ops, and kernels *load* it from device memory at run time, so each replay draws a
    fresh mask (the fallback path's ``torch.randint`` is captured the same way). Outside capture the pair is
    built on the host and copied to the device without synchronising (16 bytes, non-blocking).

Passing seed and offset
    Ops and kernels take one ``int64`` tensor ``rng`` of shape ``(2,)`` on the op's device:
    ``rng = [seed, offset]``, uint64 values stored as int64 bit patterns (values >= 2**63 read negative;
    kernels bitcast to uint64). A tensor, not Python ints, so graph replays and ``torch.compile`` see a
    runtime value rather than a constant baked in at capture/trace time. The torch functions here also
    accept a ``(seed, offset)`` pair of ints (any value in ``[-2**63, 2**64)``), for tests.

Wiring (for the ops)
    The public function draws ``rng = philox_seed_offset(q.device, philox_increment(B, H))`` only when
    ``dropout_p > 0`` (so ``dropout_p = 0`` leaves every generator untouched and runs today's code), passes
    ``rng`` and ``p`` into the custom op as inputs (the op stays a deterministic function of its inputs for
    opcheck, fake tensors and the backward) and the autograd context saves ``rng``. Torch backend: a chunk's
    band rectangle (rows ``i0 .. i1-1``, keys ``i0 - left .. i1 - 1 + right``) is ``keep_mask_rect``, which the
    chunk's band view slices like the scores; its side keys are ``keep_mask_rect(..., 0, G, side=True)``;
    Longformer's global rows, slots ``0 .. G-1`` against token keys ``j0 .. j1-1``, are
    ``keep_mask_rect(..., 0, G, j0, j1 - j0, side=True, global_rows=True)``; ``keep_mask`` takes any ids.
    The tests' dense oracle takes ``dense_keep_mask`` and ``global_rows_keep_mask``. Triton:
    ``triton_kernels/_dropout.py``; CUDA: ``csrc/common/philox.h``.

Memory
    Nothing of size S x window is ever stored: the forward draws the bits of each score tile as it computes
    it, the backward regenerates the very same bits from ``(rng, b, h, i, key)`` for the same tile; the
    saved state is the 16-byte ``rng`` tensor (plus ``p``).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

# Philox4x32 round multipliers and Weyl key increments (Random123's PHILOX_M4x32_0/1, PHILOX_W32_0/1).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1

# Row ids of Longformer's global rows and key ids of side keys (see the module doc): the flag bit of the
# row word (c3) / key-group word (c2).
GLOBAL_ROW_BASE = 1 << 31
SIDE_KEY_BASE = 1 << 33
ROW_FLAG = 1 << 31  # the same flag as seen in the 32-bit words, for kernels
KEY_GROUP_FLAG = 1 << 31


def philox_increment(B: int, H: int) -> int:
    """Philox outputs one dropout call reserves from torch's generator: one counter (4 outputs) per (b, h)."""
    return 4 * B * H


# --------------------------------------------------------------------------------------------------------
# Philox4x32-10 on int64 tensors holding uint32 values
# --------------------------------------------------------------------------------------------------------


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) words of the 64-bit product ``a * m`` (a: uint32 values in int64, m: a 32-bit constant).

    The product can exceed int64, so m is split in 16-bit halves: ``a * m = u * 2**16 + t`` with
    ``t = a * m_lo`` and ``u = a * m_hi``, both < 2**48. Then ``lo = (t + (u << 16)) mod 2**32`` and
    ``hi = (u + (t >> 16)) >> 16`` (the low 16 bits of t cannot carry into bit 32). No overflow anywhere.
    """
    t = a * (m & 0xFFFF)
    u = a * (m >> 16)
    lo = (t + ((u & 0xFFFF) << 16)) & _MASK32
    hi = (u + (t >> 16)) >> 16
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random123's ``philox4x32_R(10, ctr={c0, c1, c2, c3}, key={k0, k1})``, elementwise.

    Arguments are int64 tensors (any broadcastable shapes, any device) or ints, holding values in
    ``[0, 2**32)``; at least one must be a tensor. Returns the four output words, int64 tensors of the
    broadcast shape with values in ``[0, 2**32)``.
    """
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


# --------------------------------------------------------------------------------------------------------
# The dropout bits of (rng, bh, row, key)
# --------------------------------------------------------------------------------------------------------


def _to_int64_bits(x: int) -> int:
    """An int in [-2**63, 2**64) as the int64 with the same low 64 bits."""
    if not -(1 << 63) <= x < (1 << 64):
        raise ValueError(f"rng: seed/offset {x} does not fit in 64 bits")
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


def as_rng_tensor(rng, device=None) -> Tensor:
    """``rng`` as the canonical int64 ``(2,)`` tensor ``[seed, offset]`` (uint64 bit patterns).

    Accepts that tensor (returned as is, or moved to ``device``) or a ``(seed, offset)`` pair of ints.
    """
    if isinstance(rng, Tensor):
        if rng.dtype != torch.int64 or rng.shape != (2,):
            raise ValueError(f"rng: expected an int64 tensor of shape (2,) = [seed, offset], got {rng.dtype} "
                             f"{tuple(rng.shape)}")
        return rng if device is None else rng.to(device)
    if (isinstance(rng, (tuple, list)) and len(rng) == 2
            and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in rng)):
        return torch.tensor([_to_int64_bits(int(x)) for x in rng], dtype=torch.int64, device=device)
    raise TypeError(f"rng: expected an int64 (2,) tensor or a (seed, offset) pair of ints, got {rng!r}")


def _counter_words(rng: Tensor, bh: Tensor):
    """(k0, k1, c0, c1) for the (b, h) indices ``bh`` (int64 tensor, values < 2**32); see the module doc."""
    seed, offset = rng[0], rng[1]
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32  # arithmetic shift, then mask: the high word of the uint64 bit pattern
    base_lo = (offset >> 2) & _MASK32  # offset >> 2 as a uint64: bits 2..33 and 34..63 of the pattern
    base_hi = (offset >> 34) & (_MASK32 >> 2)
    lo = base_lo + bh  # < 2**33: the carry of the 64-bit add is bit 32
    c0 = lo & _MASK32
    c1 = (base_hi + (lo >> 32)) & _MASK32
    return k0, k1, c0, c1


def philox_bits(rng, bh: Tensor, rows: Tensor, keys: Tensor) -> Tensor:
    """The uint32 dropout bits (as int64) of entries (bh, row_id, key_id), broadcast together.

    Args:
        rng: ``[seed, offset]`` (see ``as_rng_tensor``), on the device of the index tensors.
        bh: int64 ``b * H + h``, values in ``[0, 2**32)``.
        rows: int64 row ids (``i``, or ``GLOBAL_ROW_BASE + s`` for Longformer's global row of slot s).
        keys: int64 key ids (``j``, or ``SIDE_KEY_BASE + g`` for side keys).

    Returns:
        int64 tensor of the broadcast shape, values in ``[0, 2**32)``.
    """
    rng = as_rng_tensor(rng, device=keys.device)
    k0, k1, c0, c1 = _counter_words(rng, bh)
    x = philox4x32_10(c0, c1, (keys >> 2) & _MASK32, rows & _MASK32, k0, k1)
    lane = keys & 3
    # The broadcast shape of the four words can be smaller than the indices' when one index is constant.
    return torch.where(lane == 0, x[0], torch.where(lane == 1, x[1], torch.where(lane == 2, x[2], x[3])))


# --------------------------------------------------------------------------------------------------------
# Keep masks
# --------------------------------------------------------------------------------------------------------


def check_dropout_p(dropout_p) -> float:
    """``dropout_p`` as a float in [0, 1); TypeError for a non-number or a tensor, ValueError outside."""
    if type(dropout_p) is float and 0.0 <= dropout_p < 1.0:  # the common case, without the numbers.Real ABC check
        return dropout_p
    if isinstance(dropout_p, (bool, Tensor)) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__} {dropout_p!r}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:  # also rejects NaN
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    return p


def keep_threshold(p: float) -> int:
    """The uint32 ``t`` with ``keep = bits >= t``: ``ceil(p * 2**32)``, at most ``2**32 - 1``."""
    return min(math.ceil(p * 4294967296.0), _MASK32)  # p * 2**32 is exact in binary floating point


def keep_threshold_i32(p: float) -> int:
    """``keep_threshold(p)`` as the int32 with the same bits, for kernels that take int32 scalars (Triton
    types a Python int >= 2**31 as int64, so the threshold travels as int32 and is bitcast to uint32)."""
    t = keep_threshold(p)
    return t - (1 << 32) if t >= (1 << 31) else t


def dropout_scale(p: float) -> float:
    """The factor of kept probabilities, ``1 / (1 - p)``."""
    return 1.0 / (1.0 - p)


def keep_mask(rng, p: float, B: int, H: int, rows: Tensor, keys: Tensor) -> Tensor:
    """Keep mask (bool) of any set of (query, key) entries, shape ``broadcast((B, H, 1, 1), rows, keys)``.

    Args:
        rng: ``[seed, offset]``.
        p: dropout probability in [0, 1).
        B, H: batch size and heads (every (b, h) gets its own bits).
        rows: int64 row ids broadcastable to ``(B, H, n, k)``: ``(n, 1)`` query positions, or ``(B, 1, n, 1)``
            for rows that differ by batch row (e.g. a gathered subset of queries).
        keys: int64 key ids broadcastable likewise, e.g. ``(n, k)`` band positions of each query or ``(1, k)``.

    One Philox evaluation per entry; ``keep_mask_rect`` does a quarter of that for a rectangle.
    """
    device = keys.device
    bh = torch.arange(B * H, device=device, dtype=torch.int64).view(B, H, 1, 1)
    bh, rows, keys = torch.broadcast_tensors(bh, rows.to(torch.int64), keys.to(torch.int64))
    if p == 0.0:
        return torch.ones(keys.shape, dtype=torch.bool, device=device)
    return philox_bits(rng, bh, rows, keys) >= keep_threshold(p)


def bits_rect(rng, B: int, H: int, row0: int, n_rows: int, key0: int, n_keys: int, *, side: bool = False,
              global_rows: bool = False, device=None) -> Tensor:
    """uint32 bits (int64) ``(B, H, n_rows, n_keys)`` of rows ``row0 + [0, n_rows)`` and keys ``key0 + [0, n_keys)``.

    Keys are band positions, or side-key indices with ``side`` (then ``key0 >= 0``); rows are query
    positions, or Longformer global-row slots with ``global_rows`` (whose keys are ``side`` keys). ``key0``
    may be negative (a chunk's band starting before token 0): those entries get well-defined, unused bits.
    One Philox call per 4 keys.
    """
    if side and key0 < 0:
        raise ValueError(f"key0: side-key indices start at 0, got {key0}")
    device = torch.device(device) if device is not None else (rng.device if isinstance(rng, Tensor) else None)
    rng = as_rng_tensor(rng, device=device)
    g0, g1 = key0 >> 2, (key0 + n_keys + 3) >> 2  # the Philox calls (key groups) covering the keys
    groups = torch.arange(g0, g1, dtype=torch.int64, device=device) & _MASK32
    if side:
        groups = groups | KEY_GROUP_FLAG
    rows = torch.arange(row0, row0 + n_rows, dtype=torch.int64, device=device)[:, None] & _MASK32
    if global_rows:
        rows = rows | ROW_FLAG
    bh = torch.arange(B * H, device=device, dtype=torch.int64).view(B, H, 1, 1)
    k0, k1, c0, c1 = _counter_words(rng, bh)
    x = torch.stack(torch.broadcast_tensors(*philox4x32_10(c0, c1, groups, rows, k0, k1)), -1)
    first = key0 - 4 * g0
    return x.reshape(B, H, n_rows, 4 * (g1 - g0))[..., first : first + n_keys]


def keep_mask_rect(rng, p: float, B: int, H: int, row0: int, n_rows: int, key0: int, n_keys: int, *,
                   side: bool = False, global_rows: bool = False, device=None) -> Tensor:
    """Keep mask (bool) ``(B, H, n_rows, n_keys)`` of the rectangle of ``bits_rect`` (e.g. one chunk of the torch
    backend: rows ``i0 .. i1-1`` and band keys ``i0 - left .. i1 - 1 + right``, or all side keys)."""
    if p == 0.0:
        device = device if device is not None else (rng.device if isinstance(rng, Tensor) else None)
        return torch.ones((B, H, n_rows, n_keys), dtype=torch.bool, device=device)
    bits = bits_rect(rng, B, H, row0, n_rows, key0, n_keys, side=side, global_rows=global_rows, device=device)
    return bits >= keep_threshold(p)


def dense_key_ids(S: int, G: int = 0, device=None) -> Tensor:
    """``(S + G,)`` key ids in the dense oracle's column order: band keys ``0 .. S-1``, then side keys."""
    band = torch.arange(S, dtype=torch.int64, device=device)
    side = SIDE_KEY_BASE + torch.arange(G, dtype=torch.int64, device=device)
    return torch.cat([band, side])


def dense_keep_mask(rng, p: float, B: int, H: int, S: int, G: int = 0, *, device=None) -> Tensor:
    """``(B, H, S, S + G)`` bool keep mask of every (query, key) pair, columns as ``dense_key_ids``.

    For the dense fp64 oracle and tests only: O(S * (S + G)) memory.
    """
    band = keep_mask_rect(rng, p, B, H, 0, S, 0, S, device=device)
    side = keep_mask_rect(rng, p, B, H, 0, S, 0, G, side=True, device=device)
    return torch.cat([band, side], -1)


def global_rows_keep_mask(rng, p: float, B: int, H: int, G: int, S: int, *, device=None) -> Tensor:
    """``(B, H, G, S)`` bool keep mask of Longformer's global rows: slot ``s`` against token ``j``."""
    return keep_mask_rect(rng, p, B, H, 0, G, 0, S, side=True, global_rows=True, device=device)


# --------------------------------------------------------------------------------------------------------
# Drawing (seed, offset) from torch's generator
# --------------------------------------------------------------------------------------------------------


def _default_generator(device: torch.device):
    if device.type == "cpu":
        return torch.default_generator
    module = getattr(torch, device.type, None)
    generators = getattr(module, "default_generators", None)
    if not generators:
        return None
    index = device.index if device.index is not None else module.current_device()
    return generators[index]


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def philox_seed_offset(device, increment: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw the ``rng = [seed, offset]`` int64 ``(2,)`` tensor of one dropout call, on ``device``.

    ``increment``: the Philox outputs the call consumes per subsequence, ``philox_increment(B, H)``.
    ``generator``: default, the device's default generator (so ``torch.manual_seed`` governs it).
    See the module doc for the two paths (``philox_state`` reservation, or a ``torch.randint`` seed) and
    their behaviour under CUDA-graph capture and ``torch.compile``.
    """
    device = torch.device(device)
    if generator is None and _is_compiling():  # traced: an ordinary random op on the default generator
        return _random_seed(device, None)
    gen = generator if generator is not None else _default_generator(device)
    try:
        seed, offset, intragraph = gen.philox_state(increment)
    except (AttributeError, NotImplementedError, RuntimeError):  # CPU's Mersenne twister; older torch
        return _random_seed(device, gen)
    if seed.device.type == "cpu":  # not capturing: host values, one non-blocking 16-byte copy
        value = (int(offset) + int(intragraph)) & _MASK64
        pair = torch.tensor([int(seed), _to_int64_bits(value)], dtype=torch.int64)
        return pair.to(device, non_blocking=True)
    # Capturing: seed/offset alias the graph's state, refilled at every replay; read them with device ops.
    return torch.cat([seed.view(1), offset.view(1) + int(intragraph)]).to(device)


def _random_seed(device: torch.device, gen) -> Tensor:
    """``[a fresh 64-bit seed, 0]`` drawn on ``device`` (one ``torch.randint``)."""
    seed = torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64, device=device, generator=gen)
    return torch.cat([seed, torch.zeros_like(seed)])
