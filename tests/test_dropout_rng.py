"""The dropout random bits: Philox4x32-10, the counter layout, and the same bits in torch, Triton and C++/CUDA.

The torch reference (``longattn._dropout``) is checked against Random123's known-answer vectors and against an
independent scalar implementation of the layout written from its spec (the table in the module doc); the
Triton helpers (under ``TRITON_INTERPRET=1`` or on a GPU) and ``csrc/common/philox.h`` (compiled as host code
with g++, and as device code with nvcc) must give the very same bits. Statistical checks use 5-sigma binomial
bounds on a few hundred thousand entries, so a correct generator fails them with probability ~1e-6.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longattn import _dropout as dr
from tests.conftest import TRITON_DEVICE as DEVICE
from tests.conftest import needs_triton

REPO = Path(__file__).resolve().parents[1]
M32 = 0xFFFFFFFF

# Random123 tests/kat_vectors, "philox4x32 10" lines: counter words, key words, output words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_scalar(ctr, key):
    """Philox4x32-10 on Python ints (no overflow to worry about): an independent check of the tensor version."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def layout_bits(seed, offset, bh, i, key, *, side=False, global_row=False):
    """The bits of one entry, straight from the layout table of ``longattn._dropout`` (uint64 seed/offset)."""
    base = ((offset >> 2) + bh) % 2**64
    c2 = (key >> 2) | (0x80000000 if side else 0)
    c3 = i | (0x80000000 if global_row else 0)
    return philox_scalar((base & M32, base >> 32, c2, c3), (seed & M32, seed >> 32))[key & 3]


# Entries that push every word to its limits: seed and offset >= 2**63 (negative as int64), c0:c1 wrapping
# past 2**64 with bh, rows near 2**31, keys near 2**33, side keys, global rows.
EDGE_ENTRIES = [
    # (seed, offset, bh, i, key, side, global_row)
    (0, 0, 0, 0, 0, False, False),
    (2**64 - 1, 2**64 - 4, 7, 5, 9, False, False),
    (0x8000000000000001, 2**64 - 8, 2**32 - 1, 2**31 - 1, 2**33 - 1, False, False),
    (0x0123456789ABCDEF, 0xFEDCBA9876543210, 12345, 77, 3, True, False),
    (42, 4 * 2**40, 3, 2**31 - 1, 2**33 - 2, True, True),
    (42, 12, 0, 1000, 1001, False, True),
]


# --------------------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_torch_philox_known_answers(ctr, key, expected):
    assert philox_scalar(ctr, key) == expected
    words = [torch.tensor([x], dtype=torch.int64) for x in (*ctr, *key)]
    assert tuple(int(w) for w in dr.philox4x32_10(*words)) == expected


def test_torch_philox_many_counters_match_scalar():
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (6, 64), generator=gen, dtype=torch.int64)
    got = torch.stack(dr.philox4x32_10(*words))
    for n in range(words.shape[1]):
        col = [int(w) for w in words[:, n]]
        assert tuple(int(x) for x in got[:, n]) == philox_scalar(col[:4], col[4:])


@pytest.mark.parametrize("entry", EDGE_ENTRIES)
def test_torch_bits_follow_layout_table(entry):
    seed, offset, bh, i, key, side, global_row = entry
    row_id = (dr.GLOBAL_ROW_BASE if global_row else 0) + i
    key_id = (dr.SIDE_KEY_BASE if side else 0) + key
    t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    got = dr.philox_bits((seed, offset), t(bh), t(row_id), t(key_id))
    assert int(got) == layout_bits(seed, offset, bh, i, key, side=side, global_row=global_row)


def test_rng_tensor_bit_patterns_and_errors():
    assert dr.as_rng_tensor((2**64 - 1, 2**63)).tolist() == [-1, -(2**63)]
    assert dr.as_rng_tensor((-1, 5)).tolist() == [-1, 5]
    rng = torch.tensor([3, 4])
    assert dr.as_rng_tensor(rng) is rng
    with pytest.raises(ValueError, match="rng"):
        dr.as_rng_tensor((2**64, 0))
    with pytest.raises(ValueError, match="rng"):
        dr.as_rng_tensor(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="rng"):
        dr.as_rng_tensor((1.5, 0))


def test_keep_threshold():
    assert dr.keep_threshold(0.0) == 0
    assert dr.keep_threshold(0.5) == 2**31
    assert dr.keep_threshold(0.25) == 2**30
    assert dr.keep_threshold(2.0**-40) == 1  # any p > 0 drops something: ceil
    assert dr.keep_threshold(1.0 - 2.0**-53) == 2**32 - 1  # clamped to uint32
    assert dr.keep_threshold_i32(0.5) == -(2**31) and dr.keep_threshold_i32(0.25) == 2**30
    assert dr.dropout_scale(0.2) == 1.0 / 0.8


@pytest.mark.parametrize("bad,error", [(torch.tensor(0.1), TypeError), ("0.1", TypeError), (True, TypeError),
                                       (None, TypeError), (-0.1, ValueError), (1.0, ValueError),
                                       (float("nan"), ValueError), (float("inf"), ValueError)])
def test_check_dropout_p_rejects(bad, error):
    with pytest.raises(error, match="dropout_p"):
        dr.check_dropout_p(bad)


def test_check_dropout_p_accepts():
    assert dr.check_dropout_p(0) == 0.0 and dr.check_dropout_p(0.1) == 0.1


def test_same_rng_same_mask_and_chunks_agree():
    """A chunk's mask is the dense mask's slice (bits depend on absolute (b, h, row, key) only)."""
    B, H, S, G, p = 2, 3, 40, 5, 0.3
    rng = (123456789, 4 * 1000)
    dense = dr.dense_keep_mask(rng, p, B, H, S, G)
    assert torch.equal(dense, dr.dense_keep_mask(rng, p, B, H, S, G))
    assert not torch.equal(dense, dr.dense_keep_mask((123456790, 4000), p, B, H, S, G))
    # A band chunk: rows 10..19, keys i - 3 .. i + 3 (clamped), plus the side keys.
    rows = torch.arange(10, 20)[:, None]
    band = (rows + torch.arange(-3, 4)[None, :]).clamp(0, S - 1)
    keys = torch.cat([band, dr.SIDE_KEY_BASE + torch.arange(G).expand(10, G)], 1)
    chunk = dr.keep_mask(rng, p, B, H, rows, keys)
    cols = torch.cat([band, S + torch.arange(G).expand(10, G)], 1)
    expect = torch.gather(dense[:, :, 10:20], 3, cols.expand(B, H, 10, cols.shape[1]))
    assert torch.equal(chunk, expect)
    assert dr.keep_mask(rng, 0.0, B, H, rows, keys).all()


def test_per_batch_rows():
    """Rows that differ by batch row, as (B, 1, n, 1) row ids, pick the dense mask's rows of each b."""
    B, H, S, p = 2, 3, 40, 0.5
    rng = (99, 4 * 7)
    positions = torch.tensor([[3, 10, 11], [0, 39, 20]])
    got = dr.keep_mask(rng, p, B, H, positions.view(B, 1, 3, 1), torch.arange(S))
    dense = dr.dense_keep_mask(rng, p, B, H, S)
    assert got.shape == (B, H, 3, S)
    for b in range(B):
        assert torch.equal(got[b], dense[b][:, positions[b]])


def test_global_rows_are_side_keys_of_flagged_slot_rows():
    """Longformer's global row of slot s sees token j as side key j of row GLOBAL_ROW_BASE + s."""
    B, H, G, S, p = 2, 2, 3, 21, 0.5
    rng = (7, 4 * 9)
    got = dr.global_rows_keep_mask(rng, p, B, H, G, S)
    rows = dr.GLOBAL_ROW_BASE + torch.arange(G)[:, None]
    assert torch.equal(got, dr.keep_mask(rng, p, B, H, rows, dr.SIDE_KEY_BASE + torch.arange(S)))


def test_traceable_by_torch_compile():
    """Under torch.compile the draw is a torch.randint (fullgraph, no graph break), seeded by manual_seed."""
    def draw_and_mask(x):
        rng = dr.philox_seed_offset(x.device, 8)
        return x * dr.keep_mask_rect(rng, 0.3, 1, 2, 0, 8, -3, 8, device=x.device), rng

    compiled = torch.compile(draw_and_mask, fullgraph=True, backend="aot_eager")
    x = torch.ones(1, 2, 8, 8)
    torch.manual_seed(0)
    (a, rng_a), (b, _) = compiled(x), compiled(x)
    torch.manual_seed(0)
    assert torch.equal(a, compiled(x)[0]) and not torch.equal(a, b)
    assert torch.equal(a, x * dr.keep_mask_rect(rng_a, 0.3, 1, 2, 0, 8, -3, 8))


@pytest.mark.parametrize("key0,n_keys,side,global_rows", [(-7, 30, False, False), (-8, 13, False, True),
                                                           (5, 1, False, False), (0, 9, True, False),
                                                           (6, 11, True, True), (3, 0, False, False)])
def test_rect_mask_equals_entrywise_mask(key0, n_keys, side, global_rows):
    """The 4-keys-per-call rectangle path against the one-call-per-entry path (any key alignment)."""
    rng = (2**64 - 3, 2**64 - 8)
    rect = dr.keep_mask_rect(rng, 0.4, 2, 2, 11, 6, key0, n_keys, side=side, global_rows=global_rows)
    rows = (dr.GLOBAL_ROW_BASE if global_rows else 0) + torch.arange(11, 17)[:, None]
    keys = (dr.SIDE_KEY_BASE if side else 0) + torch.arange(key0, key0 + n_keys)[None, :]
    assert rect.shape == (2, 2, 6, n_keys)
    assert torch.equal(rect, dr.keep_mask(rng, 0.4, 2, 2, rows, keys))


# --------------------------------------------------------------------------------------------------------
# Statistics: keep rate and independence (5-sigma binomial bounds)
# --------------------------------------------------------------------------------------------------------


def _assert_rate(observed: float, expected: float, n: int):
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert abs(observed - expected) <= 5 * sigma + 1e-12, (observed, expected, sigma)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(p):
    mask = dr.dense_keep_mask((987654321, 8), p, 2, 4, 180, 20)
    _assert_rate(mask.double().mean().item(), 1 - p, mask.numel())
    glob = dr.global_rows_keep_mask((987654321, 8), p, 2, 4, 180, 180)
    _assert_rate(glob.double().mean().item(), 1 - p, glob.numel())


def _assert_uncorrelated(a: torch.Tensor, b: torch.Tensor, p: float):
    """Two independent Bernoulli(1-p) masks agree with probability p^2 + (1-p)^2."""
    agree = (a == b).double().mean().item()
    _assert_rate(agree, p * p + (1 - p) * (1 - p), a.numel())


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_uncorrelated_across_heads_rows_keys_lanes_and_calls(p):
    torch.manual_seed(0)
    B, H, S, G = 2, 4, 160, 16
    rng1 = dr.philox_seed_offset("cpu", dr.philox_increment(B, H))
    rng2 = dr.philox_seed_offset("cpu", dr.philox_increment(B, H))
    m = dr.dense_keep_mask(rng1, p, B, H, S, G)
    _assert_uncorrelated(m[:, :-1], m[:, 1:], p)  # neighbouring heads
    _assert_uncorrelated(m[:-1], m[1:], p)  # batch rows
    _assert_uncorrelated(m[:, :, :-1], m[:, :, 1:], p)  # neighbouring query rows
    _assert_uncorrelated(m[..., :-1], m[..., 1:], p)  # neighbouring keys, mostly lanes of one Philox call
    _assert_uncorrelated(m[..., 0:S:4], m[..., 4:S + 4:4], p)  # same lane of neighbouring calls
    upper = torch.ones(S, S, dtype=torch.bool).triu(1)
    _assert_uncorrelated(m[..., :S][..., upper], m.transpose(2, 3)[..., :S, :S][..., upper], p)  # (i,j), (j,i)
    _assert_uncorrelated(m, dr.dense_keep_mask(rng2, p, B, H, S, G), p)  # consecutive calls
    glob = dr.global_rows_keep_mask(rng1, p, B, H, G, S)  # Longformer's global rows against band rows
    _assert_uncorrelated(m[:, :, :G, :S], glob, p)
    _assert_uncorrelated(m[:, :, :G, S:], glob[..., :G], p)  # ... and the band rows' side keys
    # Consecutive offsets of one seed (the philox_state path's calls): offset += 4*B*H moves c0:c1 past
    # every (b, h) of the previous call.
    seed = int(rng1[0])
    a = dr.dense_keep_mask((seed, 4 * 1000), p, B, H, S, G)
    b = dr.dense_keep_mask((seed, 4 * 1000 + dr.philox_increment(B, H)), p, B, H, S, G)
    _assert_uncorrelated(a, b, p)


# --------------------------------------------------------------------------------------------------------
# Drawing (seed, offset)
# --------------------------------------------------------------------------------------------------------


def test_manual_seed_reproduces_draws_and_calls_differ():
    torch.manual_seed(1234)
    a, b = dr.philox_seed_offset("cpu", 8), dr.philox_seed_offset("cpu", 8)
    torch.manual_seed(1234)
    a2, b2 = dr.philox_seed_offset("cpu", 8), dr.philox_seed_offset("cpu", 8)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not torch.equal(a, b)
    assert a.dtype == torch.int64 and a.shape == (2,)
    gen = torch.Generator().manual_seed(7)
    c = dr.philox_seed_offset("cpu", 8, generator=gen)
    assert torch.equal(c, dr.philox_seed_offset("cpu", 8, generator=torch.Generator().manual_seed(7)))


class _PhiloxGenerator:
    """Stands in for a CUDA generator on CPU: the ``philox_state`` protocol outside graph capture."""

    device = torch.device("cpu")

    def __init__(self, seed, offset):
        self.seed, self.offset = seed, offset

    def philox_state(self, increment):
        as_i64 = dr.as_rng_tensor((self.seed, self.offset))
        state = (as_i64[:1], as_i64[1:], torch.tensor([0]))
        self.offset = (self.offset + 4 * math.ceil(increment / 4)) % 2**64
        return state


def test_philox_state_reservation_advances_offset():
    gen = _PhiloxGenerator(2**64 - 5, 2**64 - 24)
    a = dr.philox_seed_offset("cpu", dr.philox_increment(2, 3), generator=gen)
    b = dr.philox_seed_offset("cpu", dr.philox_increment(2, 3), generator=gen)
    assert a.tolist() == [-5, -24] and b.tolist() == [-5, 0]  # the offset wraps modulo 2**64


def _cuda_philox_state() -> bool:
    """Whether this torch's CUDA generator reserves Philox offsets (``philox_state``; absent in torch 2.11, seen on an
    H200 image 2026-11-30), else longattn draws a fresh ``torch.randint`` seed per call (see ``_dropout``)."""
    try:
        torch.cuda.default_generators[0].philox_state(4)
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return True


@pytest.mark.gpu
def test_cuda_generator_draws_and_graph_replays_draw_fresh_masks():
    philox = _cuda_philox_state()
    torch.cuda.manual_seed(3)
    a = dr.philox_seed_offset("cuda", 24)
    b = dr.philox_seed_offset("cuda", 24)
    torch.cuda.manual_seed(3)
    assert torch.equal(a, dr.philox_seed_offset("cuda", 24))
    if philox:  # one seed, offsets reserved 24 apart
        assert a[0] == b[0] and int(b[1]) - int(a[1]) == 24
    else:  # a fresh seed per call, offset 0
        assert a[0] != b[0] and int(a[1]) == int(b[1]) == 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rng = dr.philox_seed_offset("cuda", 24)
        mask = dr.dense_keep_mask(rng, 0.5, 2, 3, 32, 4, device="cuda")
    graph.replay()
    first_rng, first = rng.clone(), mask.clone()
    graph.replay()
    assert not torch.equal(first, mask)
    if philox:
        assert int(rng[1]) - int(first_rng[1]) == 24
    else:
        assert int(rng[0]) != int(first_rng[0])
    assert torch.equal(mask, dr.dense_keep_mask(rng.clone(), 0.5, 2, 3, 32, 4, device="cuda"))


@pytest.mark.gpu
def test_torch_reference_same_bits_on_cuda():
    rng = (0x0123456789ABCDEF, 0xFEDCBA9876543210)
    cpu = dr.dense_keep_mask(rng, 0.3, 2, 3, 50, 6)
    assert torch.equal(cpu, dr.dense_keep_mask(rng, 0.3, 2, 3, 50, 6, device="cuda").cpu())


# --------------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------------


@needs_triton
def test_triton_philox_known_answers():
    import triton
    import triton.language as tl

    @triton.jit
    def kat_kernel(words_ptr, seed, out_ptr):
        x0, x1, x2, x3 = tl.philox(seed, tl.load(words_ptr), tl.load(words_ptr + 1), tl.load(words_ptr + 2),
                                   tl.load(words_ptr + 3))
        tl.store(out_ptr, x0.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 1, x1.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 2, x2.to(tl.int32, bitcast=True))
        tl.store(out_ptr + 3, x3.to(tl.int32, bitcast=True))

    for ctr, key, expected in KAT:
        words = torch.tensor([x - 2**32 if x >= 2**31 else x for x in ctr], dtype=torch.int32, device=DEVICE)
        out = torch.zeros(4, dtype=torch.int32, device=DEVICE)
        kat_kernel[(1,)](words, (key[1] << 32) | key[0], out)  # tl.philox's key is (seed_lo, seed_hi)
        assert tuple(int(x) & M32 for x in out.cpu()) == expected


@needs_triton
@pytest.mark.parametrize("aligned,col0,side,global_rows", [(True, -8, False, False), (True, 4, True, True),
                                                           (False, -3, False, True), (False, 5, True, False)])
def test_triton_tiles_equal_torch_bits(aligned, col0, side, global_rows):
    """Tiles of 16 x 16 over a 21 x 45 block (edge tiles included), aligned and any-alignment helpers."""
    from longattn.triton_kernels import _dropout as tdr

    B, H, row0, n_rows, n_cols, p = 1, 2, 5, 21, 45, 0.3
    rng = dr.as_rng_tensor((0x8123456789ABCDEF, 2**64 - 4), device=DEVICE)  # c0:c1 wraps past 2**64 at bh = 1
    opts = dict(side=side, global_rows=global_rows)
    bits = tdr.dropout_tiles(rng, B * H, row0, n_rows, col0, n_cols, aligned=aligned, **opts)
    ref = dr.bits_rect(rng, B, H, row0, n_rows, col0, n_cols, **opts).reshape(B * H, n_rows, n_cols)
    assert torch.equal(bits.cpu(), ref.cpu())
    keep = tdr.dropout_tiles(rng, B * H, row0, n_rows, col0, n_cols, aligned=aligned,
                             thresh=dr.keep_threshold_i32(p), **opts)
    ref = dr.keep_mask_rect(rng, p, B, H, row0, n_rows, col0, n_cols, **opts).reshape(B * H, n_rows, n_cols)
    assert torch.equal(keep.cpu(), ref.cpu())


def compile_tiles_for_sm90():
    """Compile the helpers (64 x 64 tiles, 4 warps) to sm_90 cubins; needs TRITON_INTERPRET unset."""
    import triton
    from longattn.triton_kernels import _dropout as tdr
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = tdr._tiles_kernel
    types = {"rng_ptr": "*i64", "out_ptr": "*i32"}
    for aligned, keep in ((True, True), (True, False), (False, True)):  # the last one covers bits_tile too
        meta = dict(BLOCK_M=64, BLOCK_N=64, ALIGNED=aligned, KEEP=keep, SIDE=True, GLOBAL_ROWS=True)
        sig = {n: "constexpr" if n in meta else types.get(n, "i32") for n in fn.arg_names}
        consts = {(fn.arg_names.index(n),): v for n, v in meta.items()}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})


def test_triton_tiles_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from tests.test_dropout_rng import compile_tiles_for_sm90; compile_tiles_for_sm90()"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]


def test_triton_threshold_travels_as_int32():
    for p in (0.0, 0.1, 0.5, 0.9, 1 - 2.0**-40):
        t = dr.keep_threshold_i32(p)
        assert -(2**31) <= t < 2**31 and t & M32 == dr.keep_threshold(p)


# --------------------------------------------------------------------------------------------------------
# C++ / CUDA header
# --------------------------------------------------------------------------------------------------------

def _compile(command):
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, f"{' '.join(command)} failed:\n{run.stderr}"


_HOST_PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include "common/philox.h"
using namespace longattn::philox;
// Reads commands from stdin: "k c0 c1 c2 c3 k0 k1" (raw Philox), "b seed offset bh i key side global"
// (one entry of the dropout layout), "t p" (the keep threshold of p, given as a hex float).
int main() {
  char cmd[2];
  while (std::scanf("%1s", cmd) == 1) {
    if (cmd[0] == 'k') {
      unsigned c[4], k[2];
      if (std::scanf("%u %u %u %u %u %u", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1]) != 6) return 1;
      const Words4 v = philox4x32_10(Words4{c[0], c[1], c[2], c[3]}, k[0], k[1]);
      std::printf("%u %u %u %u\n", v.x, v.y, v.z, v.w);
    } else if (cmd[0] == 'b') {
      unsigned long long seed, offset;
      unsigned bh;
      long long i, key;
      int side, global;
      if (std::scanf("%llu %llu %u %lld %lld %d %d", &seed, &offset, &bh, &i, &key, &side, &global) != 7) return 1;
      const uint32_t row = global ? global_row_word(i) : row_word(i);
      std::printf("%u\n", dropout_bits(dropout_rng(seed, offset, bh), key, side != 0, row));
    } else {
      char p[64];
      if (std::scanf("%63s", p) != 1) return 1;
      std::printf("%u\n", keep_threshold(std::strtod(p, nullptr)));
    }
  }
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found: cannot compile philox.h as host code")
def test_cpp_header_bits_equal_torch(tmp_path):
    src, exe = tmp_path / "philox_host.cpp", tmp_path / "philox_host"
    src.write_text(_HOST_PROGRAM)
    _compile(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{REPO / 'csrc'}", str(src),
              "-o", str(exe)])
    lines, expected = [], []
    for ctr, key, out in KAT:
        lines.append("k " + " ".join(map(str, (*ctr, *key))))
        expected.append(" ".join(map(str, out)))
    entries = list(EDGE_ENTRIES)
    gen = torch.Generator().manual_seed(5)  # random entries, checked against the torch reference
    for _ in range(200):
        seed, offset = (int(x) for x in torch.randint(0, 2**62, (2,), generator=gen))
        bh, i, key = (int(x) for x in torch.randint(0, 2**31, (3,), generator=gen))
        side, glob = (bool(x) for x in torch.randint(0, 2, (2,), generator=gen))
        entries.append((seed * 4 + 3, offset * 4, bh, i, key, side, glob))
    t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    for seed, offset, bh, i, key, side, glob in entries:
        lines.append(f"b {seed} {offset} {bh} {i} {key} {int(side)} {int(glob)}")
        row_id = (dr.GLOBAL_ROW_BASE if glob else 0) + i
        key_id = (dr.SIDE_KEY_BASE if side else 0) + key
        expected.append(str(int(dr.philox_bits((seed, offset), t(bh), t(row_id), t(key_id)))))
    for p in (0.0, 0.1, 0.3, 0.5, 2.0**-40, 1 - 2.0**-53):
        lines.append(f"t {p.hex()}")
        expected.append(str(dr.keep_threshold(p)))
    run = subprocess.run([str(exe)], input="\n".join(lines) + "\n", check=True, capture_output=True, text=True)
    assert run.stdout.splitlines() == expected


_DEVICE_PROGRAM = r"""
#include "common/philox.h"
using namespace longattn::philox;
// The mma-fragment pattern of the header's comment: lanes 2u and 2u+1 hold keys 4q..4q+3 of rows r and r+8.
__global__ void keep_fragment(const int64_t* rng, uint32_t threshold, int row0, int key0, unsigned* out) {
  const int lane = threadIdx.x, r = row0 + lane / 4, q = (key0 >> 2) + (lane % 4) / 2;
  const DropoutRng state = dropout_rng(rng, blockIdx.x);
  const Words4 mine = dropout_bits4(state, band_group_word(4 * q), row_word(r + (lane & 1) * 8));
  const unsigned give0 = (lane & 1) ? mine.x : mine.z, give1 = (lane & 1) ? mine.y : mine.w;
  const unsigned got0 = __shfl_xor_sync(0xffffffffu, give0, 1), got1 = __shfl_xor_sync(0xffffffffu, give1, 1);
  const unsigned keep_bits = keep(mine.x, threshold) | keep(got0, threshold) << 1 | keep(got1, threshold) << 2;
  out[blockIdx.x * 32 + lane] = keep_bits + dropout_bits(state, key0, true, global_row_word(r));
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: cannot compile philox.h as device code")
def test_cuda_header_compiles_for_device(tmp_path):
    src = tmp_path / "philox_device.cu"
    src.write_text(_DEVICE_PROGRAM)
    _compile(["nvcc", "-std=c++17", "-x", "cu", "-arch=sm_80", "-Werror", "all-warnings", f"-I{REPO / 'csrc'}",
              "-c", str(src), "-o", str(tmp_path / "philox_device.o")])
