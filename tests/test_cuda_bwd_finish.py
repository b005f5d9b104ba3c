"""The CUDA band op's backward without ATen glue (issue 12, targets 2 and 6): bias partials zeroed by the delta kernel
(no ``at::zeros`` launch), the finish kernel (``band_side_bwd_finish_kernel``: side keys over chunks, the band- and
side-bias tables over key CTAs, in the outputs' dtypes; no ATen ``sum`` / ``to``), 16-bit bias tables converted to
float32 by the delta kernel (no ATen cast; tests/test_cuda_bias_tables.py), and one query chunk for Longformer's
global rows (their keys' rows written by the dK/dV epilogue: no (B, S, H, D) float32 partials).

CPU: the kernels' index arithmetic emulated from csrc/band_side/bwd_kernel.h (the delta kernel's zero fill of an
uninitialised buffer, band_bias_grad_tile / side_bias_grad_tile, the finish kernel's warp jobs and lane-strided sums
with their xor tree) against the sums they stand for, and the host's chunk choice (band_side_api.cpp). GPU
(``@pytest.mark.gpu``): bias tables of every dtype against the fp64 oracle, their gradients in the table's dtype,
bitwise reproducibility, and the Longformer backward's peak memory.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import longattn
from tests.conftest import grads, make_case
from tests.test_cuda_longformer import gpu_ready
from tests.tolerance import assert_within_rule

TILE, THREADS = 64, 128


# --------------------------------------------------------------------------------------------------------
# Emulations (csrc/band_side/bwd_kernel.h)
# --------------------------------------------------------------------------------------------------------


def _delta_zero_fill(shape, rows_per_delta_grid):
    """The delta kernel's grid_zero_fill of a bias partial buffer (``at::empty``: NaN here): the delta grid (one warp
    per (b, s, h) row, 8 warps per CTA) zeroes elements i = thread, thread + grid threads, ...; every element must be
    written (checked). The dK/dV CTAs then accumulate into their rows."""
    buf = torch.full(shape, float("nan"), dtype=torch.float64)
    flat = buf.view(-1)
    threads = -(-rows_per_delta_grid // 8) * 256
    for t in range(min(threads, flat.numel())):
        flat[t::threads] = 0.0
    assert not buf.isnan().any()
    return buf


def _band_bias_grad_tile(sDs, key0, q0, left, width, row):
    """band_bias_grad_tile: thread tid owns diagonal d = tid - 63 (entry t = left + key0 - q0 + d) of the dS^T tile
    sDs[key_local][query_local] and adds its elements into the CTA's row."""
    for tid in range(THREADS):
        d = tid - (TILE - 1)
        if d > TILE - 1:
            continue
        t = left + key0 - q0 + d
        if t < 0 or t >= width:
            continue
        lo, hi = max(0, -d), min(TILE, TILE - d)
        row[t] += sum(float(sDs[il + d, il]) for il in range(lo, hi))


def _side_bias_grad_tile(sDs, qb, key0, q0, S_, G_, row):
    """side_bias_grad_tile: entries u = g - qb + G of the tile's (key, query) pairs, one thread per u in the tile's
    range, a fixed-order sum over the tile's queries."""
    nq = min(TILE, S_ - q0)
    qb_min, qb_max = min(qb[:nq]), max(qb[:nq])
    u_lo, u_hi = key0 - qb_max + G_, min(key0 + TILE, G_) - 1 - qb_min + G_
    for tid in range(THREADS):
        for u in range(u_lo + tid, u_hi + 1, THREADS):
            acc = 0.0
            for il in range(nq):
                kl = u - G_ + qb[il] - key0
                if 0 <= kl < TILE:
                    acc += float(sDs[kl, il])
            row[u] += acc


def _tile_T(dS, q0, key0):
    """The dS^T tile the dK/dV CTA puts in shared memory: sDs[key_local][query_local], zeros past the ends."""
    tile = torch.zeros(TILE, TILE, dtype=torch.float64)
    blk = dS[q0:q0 + TILE, key0:key0 + TILE].T
    tile[:blk.shape[0], :blk.shape[1]] = blk
    return tile


def _warp_column_sum(partial, h, rows, width, col):
    """warp_column_sum: lane l sums rows l, l + 32, ... of column ``col`` of head h's (B, rows) partial rows in order,
    then the xor tree (every lane ends with the same value: float addition commutes) -> lane 0's value."""
    B_ = partial.shape[0]
    lanes = [0.0] * 32
    for lane in range(32):
        for r in range(lane, B_ * rows, 32):
            lanes[lane] += float(partial[r // rows, h, r % rows, col])
    for off in (16, 8, 4, 2, 1):
        lanes = [lanes[lane] + lanes[lane ^ off] for lane in range(32)]
    assert len(set(lanes)) == 1
    return lanes[0]


def _finish_jobs(B_, G_, H_, D_, side_partials, band_width, side_bias):
    """finish_warps and the kernel's decode of warp w -> the job list (kind, index) per warp (side-key warps carry 32
    threads each, the rest one entry per warp)."""
    pairs = B_ * G_ * H_ * (D_ // 2) if side_partials else 0
    warps = [-(-pairs // 32), H_ * band_width if band_width else 0, H_ * (2 * G_ + 1) if side_bias else 0]
    jobs = []
    for w in range(sum(warps)):
        if w < warps[0]:
            jobs += [("side-key", t) for t in range(w * 32, w * 32 + 32) if t < pairs]
        elif w - warps[0] < warps[1]:
            jobs.append(("band-bias", w - warps[0]))
        else:
            jobs.append(("side-bias", w - warps[0] - warps[1]))
    return jobs


# --------------------------------------------------------------------------------------------------------
# CPU tests
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S_, left, right", [(150, 70, 60), (64, 3, 3), (200, 0, 130)])
def test_band_bias_partials_and_finish_match_the_offset_sum(S_, left, right):
    """The delta kernel zeroes the (B, H, n_band_tiles, L + R + 1) partials (``at::empty``), every band CTA adds its
    query tiles' diagonals into its row, and the finish kernel's warp per entry sums the rows: the gradient
    sum_{i, j: j - i + left = t} dS[i, j] over batch rows, without a zero-fill launch or ATen's sum."""
    gen = torch.Generator().manual_seed(S_)
    B_, H_ = 2, 2
    width = left + right + 1
    i, j = torch.arange(S_)[:, None], torch.arange(S_)[None, :]
    band = (j >= i - left) & (j <= i + right)
    dS = torch.randn(B_, H_, S_, S_, generator=gen, dtype=torch.float64) * band
    n_tiles = -(-S_ // TILE)
    partial = _delta_zero_fill((B_, H_, n_tiles, width), B_ * S_ * H_)
    for b in range(B_):
        for h in range(H_):
            for x in range(n_tiles):  # band CTA x: key tile x, every query tile (dS is 0 outside the band)
                for q0 in range(0, S_, TILE):
                    _band_bias_grad_tile(_tile_T(dS[b, h], q0, x * TILE), x * TILE, q0, left, width, partial[b, h, x])
    want = torch.zeros(H_, width, dtype=torch.float64)
    for t in range(width):
        want[:, t] = (dS * (j - i + left == t)).sum((0, 2, 3))
    got = torch.tensor([[_warp_column_sum(partial, h, n_tiles, width, t) for t in range(width)] for h in range(H_)],
                       dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunks", [1, 2])
def test_side_bias_partials_and_finish_match_the_block_offset_sum(chunks):
    """The side CTAs (key tile x query chunk) likewise: each adds u = g - qb + G per (query, key) pair of its chunk
    into its (2G + 1)-entry row (zeroed by the delta kernel), and the finish kernel sums the rows over batch rows and
    CTAs."""
    gen = torch.Generator().manual_seed(chunks)
    B_, H_, S_, G_ = 2, 2, 150, 70
    qb = torch.randint(-1, G_, (B_, S_), generator=gen)
    dS = torch.randn(B_, H_, S_, G_, generator=gen, dtype=torch.float64)
    n_q, n_side = -(-S_ // TILE), -(-G_ // TILE)
    chunk_tiles = -(-n_q // chunks)
    width = 2 * G_ + 1
    partial = _delta_zero_fill((B_, H_, n_side * chunks, width), B_ * S_ * H_)
    for b in range(B_):
        for h in range(H_):
            for cta in range(n_side * chunks):
                key0, chunk = (cta // chunks) * TILE, cta % chunks
                for qt in range(chunk * chunk_tiles, min(n_q, (chunk + 1) * chunk_tiles)):
                    q0 = qt * TILE
                    qbs = [int(x) for x in qb[b, q0:q0 + TILE]] + [-1] * TILE
                    _side_bias_grad_tile(_tile_T(dS[b, h], q0, key0), qbs, key0, q0, S_, G_, partial[b, h, cta])
    u = torch.arange(G_)[None, None, :] - qb[:, :, None] + G_  # (B, S, G)
    want = torch.stack([torch.stack([(dS[:, h] * (u == e)).sum() for e in range(width)]) for h in range(H_)])
    got = torch.tensor([[_warp_column_sum(partial, h, n_side * chunks, width, e) for e in range(width)]
                        for h in range(H_)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("side_partials, band_width, side_bias", [(True, 7, True), (False, 7, False),
                                                                  (False, 0, True), (True, 0, False)])
def test_finish_warps_cover_every_output_once(side_partials, band_width, side_bias):
    """The finish kernel's grid (finish_warps): side-key pairs, then the band table's entries, then the side table's,
    each output exactly once, none when nothing is owed (then the host launches nothing)."""
    B_, G_, H_, D_ = 2, 5, 3, 32
    jobs = _finish_jobs(B_, G_, H_, D_, side_partials, band_width, side_bias)
    assert len(jobs) == len(set(jobs))
    want = ([("side-key", t) for t in range(B_ * G_ * H_ * D_ // 2)] if side_partials else []) + [
        ("band-bias", e) for e in range(H_ * band_width)] + (
        [("side-bias", e) for e in range(H_ * (2 * G_ + 1))] if side_bias else [])
    assert sorted(jobs) == sorted(want)


def _side_chunks(S_, G_, B_, H_, left, right, sms, side_only):
    """band_side_api.cpp band_side_bwd's chunk choice -> (chunks, query tiles per chunk)."""
    n_q, n_side = -(-S_ // TILE), -(-G_ // TILE)
    if n_side == 0 or side_only:
        return 1, n_q
    occupancy = -(-(2 * sms) // (n_side * B_ * H_))
    tiles = min(max((left + right) // TILE + 2, -(-n_q // occupancy)), n_q)
    return -(-n_q // tiles), tiles


def test_global_rows_take_one_chunk_and_no_float32_partials():
    """Longformer's global rows (side_only: the op's rows are the G slots, its side keys the ~1024-key splits) run
    one query chunk however few key tiles there are, so no (chunks, B * C, n, H, D) float32 partials exist (2 x 384
    MiB at S = 131072, H = 12, D = 64); the band op's other callers keep the occupancy split (TGlobal at S = 4096)."""
    assert _side_chunks(80, 1024, 2, 1, 0, 0, 132, side_only=True) == (1, 2)
    # 512 slots against one 256-key split, B * H = 2: the occupancy split would have made 4 chunks
    assert _side_chunks(512, 256, 1, 2, 0, 0, 132, side_only=True) == (1, 8)
    assert _side_chunks(512, 256, 1, 2, 0, 0, 132, side_only=False) == (4, 2)
    assert _side_chunks(4096, 256, 1, 12, 127, 127, 132, side_only=False)[0] > 1


# --------------------------------------------------------------------------------------------------------
# GPU tests
# --------------------------------------------------------------------------------------------------------


def _with_bias_dtype(case, dtype, bias_dtype):
    """``case`` in ``dtype`` with its bias tables in ``bias_dtype`` (fresh leaves)."""
    case = case.cast(dtype)
    tables = {n: getattr(case, n).detach().to(bias_dtype).requires_grad_() for n in ("rel_bias", "side_bias")
              if getattr(case, n) is not None}
    return dataclasses.replace(case, **tables)


def _run(name, case, backend):
    """(out, leaves) of the public op: ``local`` (local_attention, the case's band part) or ``tglobal``."""
    if name == "local":
        out = longattn.local_attention(case.q, case.k, case.v, case.window, key_padding_mask=case.key_padding_mask,
                                       rel_bias=case.rel_bias, scale=case.scale, backend=backend)
        return out, [case.q, case.k, case.v, case.rel_bias]
    return case.run(backend), [case.q, case.k, case.v, case.side_k, case.side_v, case.rel_bias, case.side_bias]


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["local", "tglobal"])
def test_bias_tables_of_every_dtype_within_rule(name, dtype, bias_dtype):
    """Bias tables of every dtype (16-bit: converted to float32 by longattn's kernels; float64: a float32 copy) and
    their gradients written by the finish kernel in it: out and every gradient against the fp64 oracle within the rule
    (baseline: the torch backend), and bitwise reproducible."""
    case = make_case(B=2, S=200, H=2, D=64, window=(40, 25), G=0 if name == "local" else 25, bias=True,
                     padding="tail", side_padding=True, seed=7, device="cuda")
    oracle = case.cast(torch.float64)
    ref = oracle.run_oracle()
    want = grads(ref, [oracle.q, oracle.k, oracle.v, oracle.side_k, oracle.side_v, oracle.rel_bias, oracle.side_bias]
                 if name == "tglobal" else [oracle.q, oracle.k, oracle.v, oracle.rel_bias])
    cuda_case, torch_case = (_with_bias_dtype(case, dtype, bias_dtype) for _ in range(2))
    out, leaves = _run(name, cuda_case, "cuda")
    got = grads(out, leaves)
    base, base_leaves = _run(name, torch_case, "torch")
    base_grads = grads(base, base_leaves)
    assert_within_rule("out", out, base, ref)
    for i, (g, b, w, x) in enumerate(zip(got, base_grads, want, leaves)):
        assert g.dtype == x.dtype, i
        assert_within_rule(f"grad {i}", g, b, w, grad=True)
    out2, leaves2 = _run(name, cuda_case, "cuda")
    assert all(torch.equal(a, b) for a, b in zip(got, grads(out2, leaves2)))


@pytest.mark.gpu
@gpu_ready
def test_longformer_backward_peak_memory_is_its_gradients():
    """The CUDA Longformer op's backward allocates dq, dk, dv and small buffers only: no (B, S, H, D) float32 partials
    for the global rows' keys (which were 4/3 of dq + dk + dv more). Bound: 1.1 x (dq + dk + dv) + 1 MiB."""
    B_, S_, H_, D_ = 1, 8192, 4, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B_, S_, H_, D_, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
               for _ in range(3))
    glob = torch.zeros(B_, S_, dtype=torch.bool, device="cuda")
    glob[0, [0, 4000]] = True
    out = longattn.longformer_attention(q, k, v, 256, glob, max_globals=2, backend="cuda")
    dout = torch.randn_like(out)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads_bytes = 3 * q.numel() * q.element_size()
    assert peak <= 1.1 * grads_bytes + 2**20, (peak, grads_bytes)
