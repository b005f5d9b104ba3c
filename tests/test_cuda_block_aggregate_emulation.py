"""The CUDA block aggregation's order kernel (csrc/block_aggregate/order.cu), emulated on the CPU, and the op on a GPU.

- ``block_order_kernel`` emulated statement by statement (every CTA, warp and lane; ballots, shuffles, match_any
  and shared atomics spelled out), with the kernel's own constants read from order.cu and with tiny ones (so small
  rows cross many id tiles, chunks and warps), checked against torch's stable argsort + searchsorted: ``seg`` and
  each block's slice of ``perm`` bitwise, no slot written twice, none from ``seg[G]`` on, no id read out of the row.
  Ids: sorted, unsorted, -1 anywhere, out of range, all dropped, G = 1, S not a multiple of anything, S = 1, rows
  that start off a 16-byte boundary. (G = 0 launches nothing: the API returns before.)
- ``aggregate_dweight_kernel`` (aggregate.cu) emulated lane by lane, with its constants and tiny ones: every channel
  reads every (b, g) row once, and sums to the float64 reference.
- ``aggregate_dx_chunks_kernel`` (aggregate.cu) emulated thread by thread: every element of dx written once, from its
  block's row through dout's strides (or dsums'), 0 for dropped tokens; and when the scalar kernel is taken instead.
- GPU (``@pytest.mark.gpu``): the op's sums against the same sums taken in sequence order (what the stable order
  gives) bitwise, on unsorted ids with dropped and out-of-range ones; outputs and gradients against the torch backend;
  dx bitwise dout's block rows through either dx kernel.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from longattn.backends import cuda_backend

_SOURCE = (Path(__file__).resolve().parents[1] / "csrc" / "block_aggregate" / "order.cu").read_text()


def _constant(name: str) -> int:
    return int(re.search(rf"constexpr int {name} = (\d+);", _SOURCE).group(1))


KERNEL = dict(threads=_constant("kThreads"), tile=_constant("kTile"), chunks=_constant("kChunks"),
              unroll=_constant("kUnroll"))
# 2 warps, 1 mask word, 4 blocks per CTA (the kernel's tile is a multiple of 32; with one of 4 the block scan of
# phase 3 is one partial warp, which the emulation spells as such).
TINY = dict(threads=64, tile=4, chunks=32, unroll=2)


class _Row:
    """A row of ids in device memory starting at byte address ``addr``: reads outside it fail."""

    def __init__(self, ids: list[int], addr: int):
        self.ids, self.addr = ids, addr

    def __getitem__(self, s: int) -> int:
        assert 0 <= s < len(self.ids), f"id read out of the row: {s}"
        return self.ids[s]

    def int4(self, s: int) -> list[int]:
        assert (self.addr + 4 * s) % 16 == 0, f"int4 load of token {s} off a 16-byte boundary"
        return [self[s + j] for j in range(4)]


def _match_any(owned, ids, lane):
    """__match_any_sync(owners, ids[lane]): the owned lanes holding the same id."""
    return [m for m in range(32) if owned[m] and ids[m] == ids[lane]]


def _walk_chunks(row: _Row, S, shift, mask, before, lo, hi, unroll, step):
    """walk_chunks: step(s, id) per warp step (lists over the 32 lanes), marked chunks of rank [lo, hi) in order;
    ``before[i]``: the marked chunks in mask words < i."""
    for i, bits in enumerate(mask):
        rank = before[i]
        if rank >= hi:
            break
        if rank + bin(bits).count("1") <= lo:
            continue
        while bits and rank < hi:
            if rank >= lo:
                start = (i * 32 + (bits & -bits).bit_length() - 1) << shift
                end = min(start + (1 << shift), S)
                for s0 in range(start, end, 32 * unroll):
                    ids = [[row[s0 + u * 32 + lane] if s0 + u * 32 + lane < end else -1 for lane in range(32)]
                           for u in range(unroll)]
                    for u in range(unroll):
                        step([s0 + u * 32 + lane for lane in range(32)], ids[u])
            bits &= bits - 1
            rank += 1


def _order_cta(row: _Row, S, G, g0, perm, seg, threads, tile, chunks, unroll):
    """One CTA of block_order_kernel: row b, id tile [g0, g0 + tile)."""
    warps = threads // 32
    g_hi = G if G - g0 < tile else g0 + tile
    shift = 5
    while (chunks << shift) < S:
        shift += 1
    mask = [0] * (chunks // 32)
    cursor = [[0] * tile for _ in range(warps)]

    # Phase 1.
    below = [[0] * 32 for _ in range(warps)]

    def count_token(w, lane, id_):
        below[w][lane] += 0 <= id_ < g0
        return g0 <= id_ < g_hi

    def mark_chunk(owned, s, lane_count=32):
        chunk = [s[m] >> shift if owned[m] else -1 for m in range(lane_count)]
        for lane in range(lane_count):
            prev = chunk[lane - 1] if lane >= 1 else chunk[lane]  # __shfl_up_sync: lane 0 keeps its own
            if owned[lane] and (lane == 0 or prev != chunk[lane]):
                assert 0 <= chunk[lane] < chunks, f"chunk {chunk[lane]} past the mask"
                mask[chunk[lane] >> 5] |= 1 << (chunk[lane] & 31)

    head = min(S, ((16 - (row.addr & 15)) & 15) // 4)
    nvec = (S - head) // 4
    for w in range(warps):
        for v0 in range(w * 32, nvec, threads * unroll):
            q = [[row.int4(head + 4 * v) if v < nvec else [-1] * 4
                  for v in (v0 + u * threads + lane for lane in range(32))] for u in range(unroll)]
            for u in range(unroll):
                s = [head + 4 * (v0 + u * threads + lane) for lane in range(32)]
                own = [[count_token(w, lane, q[u][lane][j]) for j in range(4)] for lane in range(32)]
                if any(any(o) for o in own):
                    for j in range(4):
                        mark_chunk([own[lane][j] for lane in range(32)], [s[lane] + j for lane in range(32)])
    tail = S - head - 4 * nvec
    s = [lane if lane < head else head + 4 * nvec + (lane - head) for lane in range(32)]
    owned = [count_token(0, lane, row[s[lane]] if lane < head + tail else -1) for lane in range(32)]
    if any(owned):
        mark_chunk(owned, s)
    warp_sum = [sum(below[w]) for w in range(warps)]
    base = sum(warp_sum)

    counts = [bin(mask[lane]).count("1") if lane < len(mask) else 0 for lane in range(32)]
    before = [sum(counts[:lane]) for lane in range(32)]  # exclusive scan
    marked = sum(counts)
    ranges = [(marked * w // warps, marked * (w + 1) // warps) for w in range(warps)]

    # Phase 2.
    for w, (lo, hi) in enumerate(ranges):
        def count_step(s, ids, w=w):
            owned = [g0 <= i < g_hi for i in ids]
            for lane in range(32):
                if owned[lane]:
                    peers = _match_any(owned, ids, lane)
                    if lane == peers[0]:
                        cursor[w][ids[lane] - g0] += len(peers)
        _walk_chunks(row, S, shift, mask, before, lo, hi, unroll, count_step)

    # Phase 3: thread l owns block g0 + l; warp scans of 32 then the warp totals in order.
    total = [sum(cursor[w][lt] for w in range(warps)) for lt in range(tile)]
    scan = [sum(total[(lt // 32) * 32: lt + 1]) for lt in range(tile)]
    warp_sum = [scan[w * 32 + 31] for w in range(tile // 32)] if tile >= 32 else [scan[-1]]
    for lt in range(tile):
        start = base + scan[lt] - total[lt] + sum(warp_sum[: lt // 32])
        if g0 + lt < g_hi:
            assert seg[g0 + lt] is None, "seg written twice"
            seg[g0 + lt] = start
        if g0 + lt == G - 1:
            assert seg[G] is None, "seg[G] written twice"
            seg[G] = start + total[lt]
        for w in range(warps):
            cursor[w][lt], start = start, start + cursor[w][lt]

    # Phase 4.
    for w, (lo, hi) in enumerate(ranges):
        def slot_step(s, ids, w=w):
            owned = [g0 <= i < g_hi for i in ids]
            if not any(owned):
                return
            slots, leaders = {}, []
            for lane in range(32):
                if owned[lane]:
                    peers = _match_any(owned, ids, lane)
                    slots[lane] = cursor[w][ids[lane] - g0] + sum(1 for m in peers if m < lane)
                    if lane == peers[0]:
                        leaders.append((ids[lane] - g0, len(peers)))
            for local, n in leaders:  # after __syncwarp: every lane has read the cursors
                cursor[w][local] += n
            for lane, slot in slots.items():
                assert 0 <= slot < S and perm[slot] is None, f"perm slot {slot} out of the row or written twice"
                perm[slot] = s[lane]
        _walk_chunks(row, S, shift, mask, before, lo, hi, unroll, slot_step)


def emulate_order(ids: torch.Tensor, G: int, addr: int = 0, **consts):
    """(perm (B, S), seg (B, G + 1)) as lists, None where the kernel writes nothing; row b's ids start at byte
    ``addr + 4 b S``."""
    consts = consts or KERNEL
    assert consts["tile"] <= consts["threads"] and consts["chunks"] <= 32 * 32
    B, S = ids.shape
    perms, segs = [], []
    for b in range(B):
        row = _Row(ids[b].tolist(), addr + 4 * b * S)
        perm, seg = [None] * S, [None] * (G + 1)
        for g0 in range(0, G, consts["tile"]):  # grid x: ceil(G / tile) CTAs per row
            _order_cta(row, S, G, g0, perm, seg, **consts)
        perms.append(perm)
        segs.append(seg)
    return perms, segs


def reference_order(ids: torch.Tensor, G: int):
    """Torch's stable argsort of the ids (dropped ones last) and the block bounds by searchsorted."""
    key = torch.where((ids >= 0) & (ids < G), ids.long(), G)
    sorted_key, order = torch.sort(key, dim=1, stable=True)
    bounds = torch.arange(G + 1, device=ids.device).expand(ids.shape[0], G + 1).contiguous()
    seg = torch.searchsorted(sorted_key, bounds)
    return order, seg


def _check(ids, G, addr=0, **consts):
    perms, segs = emulate_order(ids, G, addr, **consts)
    order, seg = reference_order(ids, G)
    for b in range(ids.shape[0]):
        assert segs[b] == seg[b].tolist(), (b, segs[b], seg[b].tolist())
        kept = segs[b][G]
        assert perms[b][:kept] == order[b, :kept].tolist(), b
        assert all(p is None for p in perms[b][kept:]), "a slot from seg[G] on was written"
        assert segs[b][0] == 0


def _ids(kind: str, B: int, S: int, G: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "sorted":  # LongT5's layout: blocks of consecutive tokens, padding (-1) at the end
        ids = torch.arange(S).div(max(1, math.ceil(S / max(G, 1))), rounding_mode="floor").expand(B, S).clone()
        ids[:, S - S // 7:] = -1
        return ids.int()
    if kind == "unsorted":
        return torch.randint(0, max(G, 1), (B, S), generator=gen, dtype=torch.int32)
    if kind == "dropped":  # -1 anywhere and ids past G, and a few extremes
        ids = torch.randint(-3, G + 3, (B, S), generator=gen, dtype=torch.int32)
        ids.view(-1)[:: 11] = -(2**31)
        ids.view(-1)[5:: 13] = 2**31 - 1
        return ids
    if kind == "few":  # most tokens in one or two blocks (long runs of one id)
        return torch.randint(0, 2, (B, S), generator=gen, dtype=torch.int32).mul(min(G - 1, 3))
    raise ValueError(kind)


CASES = [  # (B, S, G)
    (1, 1, 1), (2, 1, 3), (1, 7, 1), (2, 37, 5), (1, 100, 9), (2, 133, 20), (1, 300, 17), (1, 257, 130),
]


@pytest.mark.parametrize("consts", [TINY, KERNEL], ids=["tiny-tiles", "kernel-tiles"])
@pytest.mark.parametrize("kind", ["sorted", "unsorted", "dropped", "few"])
@pytest.mark.parametrize("B,S,G", CASES)
def test_order_matches_stable_sort(B, S, G, kind, consts):
    gen = torch.Generator().manual_seed(B * 1000 + S * 31 + G)
    ids = _ids(kind, B, S, G, gen)
    for addr in (0, 4, 8, 12) if consts is TINY else (0, 12):
        _check(ids, G, addr, **consts)


@pytest.mark.parametrize("G", [1, 4, 40])
def test_order_all_dropped_and_large_rows(G):
    """All ids dropped (seg all 0, nothing written), then rows long enough for chunks of more than 32 tokens."""
    _check(torch.full((2, 45), -1, dtype=torch.int32), G, 4, **TINY)
    _check(torch.full((1, 45), G, dtype=torch.int32), G, 0, **TINY)
    gen = torch.Generator().manual_seed(G)
    _check(_ids("dropped", 1, 2500, G, gen), G, 8, **TINY)  # 32 chunks: 2^7 tokens each
    _check(_ids("sorted", 1, 2500, G, gen), G, 0, **TINY)
    _check(_ids("unsorted", 1, 32 * 32 + 10, G, gen), G, 4, **TINY)  # just past 32 chunks of 32: chunks of 64


# ---------------------------------------------------------------------------------------------------------------
# aggregate_dweight_kernel (aggregate.cu), emulated
# ---------------------------------------------------------------------------------------------------------------

_AGG_SOURCE = (Path(__file__).resolve().parents[1] / "csrc" / "block_aggregate" / "aggregate.cu").read_text()
DWEIGHT = dict(warps=int(re.search(r"constexpr int kDweightWarps = (\d+);", _AGG_SOURCE).group(1)),
               unroll=int(re.search(r"constexpr int kDweightUnroll = (\d+);", _AGG_SOURCE).group(1)))


def emulate_dweight(dy, sums, rstd, warps, unroll):
    """aggregate_dweight_kernel statement by statement: (C,) float32, and the (b, g) rows each channel read, in order.
    dy (B, G, C) any float dtype; sums (B, G, C), rstd (B, G) float32. Every CTA (32 channels), warp and lane."""
    B, G, C = dy.shape
    dweight = torch.empty(C, dtype=torch.float32)
    reads = {c: [] for c in range(C)}
    for cta in range(-(-C // 32)):
        warp_sums = torch.zeros(warps, 32, dtype=torch.float32)
        for warp in range(warps):
            for lane in range(32):
                c = cta * 32 + lane
                acc = torch.zeros((), dtype=torch.float32)
                if c < C:
                    for b in range(B):
                        for g0 in range(warp, G, warps * unroll):
                            for u in range(unroll):
                                g = g0 + u * warps
                                if g < G:
                                    acc = acc + dy[b, g, c].float() * sums[b, g, c] * rstd[b, g]
                                    reads[c].append((b, g))
                warp_sums[warp, lane] = acc
        for lane in range(32):  # warp 0, after the barrier: the warps' sums in warp order
            c = cta * 32 + lane
            if c < C:
                total = torch.zeros((), dtype=torch.float32)
                for w in range(warps):
                    total = total + warp_sums[w, lane]
                dweight[c] = total
    return dweight, reads


@pytest.mark.parametrize("consts", [DWEIGHT, dict(warps=2, unroll=3)], ids=["kernel", "tiny"])
@pytest.mark.parametrize("B, G, C", [(1, 1, 1), (2, 5, 40), (1, 300, 33), (3, 7, 64)])
def test_dweight_reads_every_row_once(consts, B, G, C):
    """Each channel reads every (b, g) row exactly once, and the sum is dy * sums * rstd over the rows (float64
    reference): G below, at and above warps * unroll, C not a multiple of 32."""
    gen = torch.Generator().manual_seed(B * G + C)
    dy = torch.randn(B, G, C, generator=gen).to(torch.bfloat16)
    sums = torch.randn(B, G, C, generator=gen)
    rstd = torch.rand(B, G, generator=gen) + 0.5
    got, reads = emulate_dweight(dy, sums, rstd, **consts)
    rows = sorted((b, g) for b in range(B) for g in range(G))
    assert all(sorted(r) == rows for r in reads.values())
    want = (dy.double() * sums.double() * rstd.double()[..., None]).sum((0, 1))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# aggregate_dx_chunks_kernel (aggregate.cu), emulated
# ---------------------------------------------------------------------------------------------------------------

DX_CHUNK = int(re.search(r"constexpr int kDxChunk = (\d+);", _AGG_SOURCE).group(1))
DX_THREADS = int(re.search(r"constexpr int kThreads = (\d+);", _AGG_SOURCE).group(1))


def dx_chunks_ok(C, element_bytes, weight, dx_ptr, dsums_ptr, dout_ptr, do_sb, do_sg):
    """aggregate.cu's dx_chunks_ok: whether every 16-byte chunk of the chunked dx launch is aligned."""
    V = DX_CHUNK // element_bytes
    if C % V or dx_ptr % DX_CHUNK:
        return False
    if weight:
        return dsums_ptr % DX_CHUNK == 0
    return dout_ptr % DX_CHUNK == 0 and do_sb % V == 0 and do_sg % V == 0


def emulate_dx_chunks(ids, G, C, element_bytes, source):
    """aggregate_dx_chunks_kernel statement by statement over its 1-D grid: dx (B, S, C) float64 and how many times
    each element was written. ``source(b, id, c0, V)``: the V values the thread loads (dsums' or dout's row)."""
    B, S = ids.shape
    V = DX_CHUNK // element_bytes
    chunks = C // V
    dx = torch.full((B * S * C,), float("nan"), dtype=torch.float64)
    writes = torch.zeros(B * S * C, dtype=torch.int64)
    for cta in range(-(-(B * S * chunks) // DX_THREADS)):
        for tid in range(DX_THREADS):
            t = cta * DX_THREADS + tid
            if t >= B * S * chunks:
                continue
            bs, c0 = t // chunks, (t % chunks) * V
            b = bs // S
            i = int(ids.view(-1)[bs])
            v = source(b, i, c0, V) if 0 <= i < G else torch.zeros(V, dtype=torch.float64)
            dx[bs * C + c0: bs * C + c0 + V] = v
            writes[bs * C + c0: bs * C + c0 + V] += 1
    return dx.view(B, S, C), writes.view(B, S, C)


@pytest.mark.parametrize("element_bytes", [2, 4])
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("B, S, G, C", [(1, 1, 1, 8), (2, 37, 5, 24), (1, 300, 20, 96), (3, 5, 2, 1024)])
def test_dx_chunks_write_every_element_once(element_bytes, weight, B, S, G, C):
    """Every element of dx written once, by the chunk that holds it: the source row of its token's block (dsums'
    float32 row without strides, or dout's through its batch and block strides; 8 spare elements per row, so the
    rows start 16-byte aligned) and 0 for dropped tokens (-1 and out-of-range ids)."""
    gen = torch.Generator().manual_seed(B * S + C + element_bytes)
    ids = torch.randint(-2, G + 2, (B, S), generator=gen, dtype=torch.int32)
    rows = torch.randn(B, G, C + 8, generator=gen, dtype=torch.float64)  # dout (B, G, C) as a strided view
    flat = rows.view(-1)
    do_sb, do_sg = G * (C + 8), C + 8
    if weight:
        def source(b, i, c0, V):
            return rows[b, i, c0:c0 + V]  # dsums (B, G, C): its own row
    else:
        def source(b, i, c0, V):
            at = b * do_sb + i * do_sg + c0
            return flat[at:at + V]
    assert dx_chunks_ok(C, element_bytes, weight, 0, 0, 0, do_sb, do_sg)
    dx, writes = emulate_dx_chunks(ids, G, C, element_bytes, source)
    assert bool((writes == 1).all())
    keep = ((ids >= 0) & (ids < G))[..., None]
    want = torch.where(keep, rows[torch.arange(B)[:, None], ids.clamp(0, G - 1).long(), :C], 0.0)
    assert torch.equal(dx, want)


def test_dx_chunks_only_when_aligned():
    """The scalar kernel takes any layout the chunks cannot: C not a multiple of the chunk, a misaligned pointer, or
    dout strides off the chunk (without a weight; with one the source is dsums, the kernel's own float32 rows)."""
    assert dx_chunks_ok(768, 2, False, 0, 0, 512, 1024 * 768, 768)
    assert not dx_chunks_ok(764, 2, False, 0, 0, 0, 764 * 4, 764)  # C % 8
    assert dx_chunks_ok(764, 4, False, 0, 0, 0, 764 * 4, 764)  # float32: chunks of 4
    assert not dx_chunks_ok(768, 2, False, 8, 0, 0, 0, 768)  # dx off 16 bytes
    assert not dx_chunks_ok(768, 2, False, 0, 0, 2, 0, 768)  # dout off 16 bytes
    assert not dx_chunks_ok(768, 2, False, 0, 0, 0, 0, 770)  # dout's block stride
    assert dx_chunks_ok(768, 2, True, 0, 0, 2, 0, 770)  # with a weight dout is not read here
    assert not dx_chunks_ok(768, 2, True, 0, 4, 0, 0, 768)  # dsums off 16 bytes


# ---------------------------------------------------------------------------------------------------------------
# GPU: the op itself
# ---------------------------------------------------------------------------------------------------------------

gpu_ready = pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_backend._C is None
    or bool(cuda_backend.unavailable_reasons(torch.device("cuda"))),
    reason="needs a CUDA GPU the extension was built for")


def sequential_sums(x: torch.Tensor, ids: torch.Tensor, G: int) -> torch.Tensor:
    """(B, G, C) float32: each block's tokens added in sequence order onto 0, one token per step (the kernel's order;
    adding +0.0 for absent tokens leaves the sum bit for bit)."""
    B, S, C = x.shape
    order, seg = reference_order(ids, G)
    count = seg[:, 1:] - seg[:, :-1]
    acc = torch.zeros(B, G, C, dtype=torch.float32, device=x.device)
    xf = x.float()
    for r in range(int(count.max()) if count.numel() else 0):
        pos = (seg[:, :-1] + r).clamp(max=S - 1)
        tok = torch.gather(order, 1, pos)
        term = torch.gather(xf, 1, tok[..., None].expand(B, G, C))
        acc = acc + torch.where((r < count)[..., None], term, torch.zeros_like(term))
    return acc


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", [None, torch.float32, torch.bfloat16])
def test_cuda_op_sums_in_stable_order(dtype, weight_dtype):
    """S = 5000, G = 300, unsorted ids with -1 and out-of-range ones; x a strided view (row starts off 16 bytes)."""
    import longattn

    B, S, G, C = 2, 5000, 300, 96
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(-2, G + 2, (B, S), generator=gen, dtype=torch.int32).cuda()
    ids_off = torch.empty(B * S + 1, dtype=torch.int32, device="cuda")[1:].view(B, S)  # data 4 bytes off 16
    ids_off.copy_(ids)
    x = torch.randn(B, S, C + 8, generator=gen).to(dtype).cuda()[..., :C]
    weight = None if weight_dtype is None else (torch.rand(C, generator=gen) + 0.5).to(weight_dtype).cuda()
    want = sequential_sums(x, ids, G)
    for block_ids in (ids, ids_off):
        out, sums, rstd = torch.ops.longattn.cuda_block_aggregate_fwd(x, block_ids, G, weight, 1e-6)
        if weight is None:
            assert torch.equal(out, want.to(dtype))
        else:
            assert torch.equal(sums, want)
            ref = (weight.float() * want * torch.rsqrt(want.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
            torch.testing.assert_close(out, ref)
        again = torch.ops.longattn.cuda_block_aggregate_fwd(x, block_ids, G, weight, 1e-6)
        assert torch.equal(again[0], out)  # deterministic
    # Through the public op, against the torch backend, gradients included.
    got, ref = [], []
    for backend, sink in (("cuda", got), ("torch", ref)):
        xg = x.detach().clone().requires_grad_()
        wg = None if weight is None else weight.detach().clone().requires_grad_()
        o = longattn.block_aggregate(xg, ids, G, weight=wg, backend=backend)
        grads = torch.autograd.grad(o, [t for t in (xg, wg) if t is not None], torch.ones_like(o))
        sink.extend([o, *grads])
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["chunks", "odd-strides", "odd-C"])
def test_cuda_dx_is_the_blocks_rows(dtype, layout):
    """Without a weight dx[b, s] is dout[b, id] bitwise (0 for dropped ids), through the chunked kernel (aligned rows)
    and the scalar one (dout rows at an odd stride; C not a multiple of the chunk); with a weight, tokens of one block
    get the same row."""
    B, S, G = 2, 3000, 200
    C = 101 if layout == "odd-C" else 96
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(-2, G + 2, (B, S), generator=gen, dtype=torch.int32).cuda()
    x = torch.randn(B, S, C, generator=gen).to(dtype).cuda()
    pad = 1 if layout == "odd-strides" else 8
    dout = torch.randn(B, G, C + pad, generator=gen).to(dtype).cuda()[..., :C]
    _, sums, rstd = torch.ops.longattn.cuda_block_aggregate_fwd(x, ids, G, None, 1e-6)
    dx = torch.ops.longattn.cuda_block_aggregate_bwd(dout, x, ids, G, None, sums, rstd, 1e-6)[0]
    keep = ((ids >= 0) & (ids < G))[..., None]
    want = torch.where(keep, dout[torch.arange(B, device="cuda")[:, None], ids.clamp(0, G - 1).long()], 0)
    assert torch.equal(dx, want)
    weight = torch.rand(C, device="cuda") + 0.5
    _, sums, rstd = torch.ops.longattn.cuda_block_aggregate_fwd(x, ids, G, weight, 1e-6)
    dx = torch.ops.longattn.cuda_block_aggregate_bwd(dout, x, ids, G, weight, sums, rstd, 1e-6)[0]
    first = torch.full((B, G + 4), -1, dtype=torch.long)
    for b in range(B):
        for s_, i in enumerate(ids[b].tolist()):
            if 0 <= i < G and first[b, i] < 0:
                first[b, i] = s_
    rows = first[torch.arange(B)[:, None], ids.clamp(0, G - 1).long().cpu()].cuda()
    same = torch.where(keep, dx[torch.arange(B, device="cuda")[:, None], rows.clamp(min=0)], 0)
    assert torch.equal(dx, same)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_cuda_op_launches_only_its_kernels(weight_dtype):
    """The raw forward launches the order and the aggregate kernel, the backward 3 kernels: no torch kernel (sort,
    copies, dtype casts, fills) around them, for a weight in float32 or bfloat16, contiguous or not."""
    B, S, G, C = 1, 4096, 256, 64
    x = torch.randn(B, S, C, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(-1, G, (B, S), device="cuda", dtype=torch.int32)
    weight = torch.rand(2 * C, device="cuda").to(weight_dtype)[::2]
    out, sums, rstd = torch.ops.longattn.cuda_block_aggregate_fwd(x, ids, G, weight, 1e-6)
    dout = torch.randn_like(out)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as fwd:
        torch.ops.longattn.cuda_block_aggregate_fwd(x, ids, G, weight, 1e-6)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as bwd:
        torch.ops.longattn.cuda_block_aggregate_bwd(dout, x, ids, G, weight, sums, rstd, 1e-6)
        torch.cuda.synchronize()
    kernels = [[e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
               for prof in (fwd, bwd)]
    assert len(kernels[0]) == 2, kernels
    assert any("block_order_kernel" in k for k in kernels[0]) and any("aggregate_fwd" in k for k in kernels[0]), kernels
    assert len(kernels[1]) == 3 and all("longattn" in k for k in kernels[1]), kernels
