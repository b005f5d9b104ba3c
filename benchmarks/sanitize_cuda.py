"""Run every CUDA kernel of longattn._C forward and backward once on small shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool synccheck python benchmarks/sanitize_cuda.py

Shapes are chosen to hit every code path at least once while staying fast under the sanitizer: S not a
multiple of the 64-row tile (edge tiles, zero-filled rows), a band wide enough for mask-free interior tiles,
side keys spanning two tiles with a partial one (and several query chunks in the side dK/dV pass), every
mask and bias, a non-contiguous (B, H, S, D).transpose(1, 2) input, each head dim and dtype, and block
aggregation with dropped tokens, with and without the RMS-norm weight, per-row key ranges (packed batches and
arbitrary values), halo keys (strided halo buffers read in place, halo masks, halos wider than S and than the
window), dropout with halo keys and a dropout offset (the kHalo dropout kernels, also with an empty halo) and the lse
gradient (NaN where lse = +inf, which must not reach any gradient), and Longformer's band pass (side keys read in
place through an index with out-of-range values, padding rows, the finish kernel; the kIndexed kernels, with and
without dropout, with and without per-row key / slot ranges) and its global rows (side_only, lse_split, the dK/dV
epilogue's add into strided destinations, the zero fill of a new dq) and its fused forward (the split CTAs' arrival
counters and last-arriver merge, in one launch with the band CTAs) and backward (one delta and one dQ launch for
both passes, the global rows' dK/dV with the band's finish and the key owners' side-key sums in one launch), and bias
tables of each dtype (read and written in place). Exits non-zero on a CUDA error or a non-finite result; the
sanitizer reports memory / race errors itself.
"""

from __future__ import annotations

import sys

import torch


def packed_ranges(B, S, G, gen):
    """Per-row (key_ranges, side_ranges) (B, S, 2) int32: packed sequences of random lengths in batch row 0 (the
    varlen ops' layout: monotone, side keys split in order), arbitrary values in the others (empty, reversed, out
    of range), so both the tile narrowing and the bounds safety run under the sanitizer."""
    key = torch.randint(-5, S + 5, (B, S, 2), generator=gen, device="cuda", dtype=torch.int32)
    side = torch.randint(-5, G + 5, (B, S, 2), generator=gen, device="cuda", dtype=torch.int32)
    cuts = sorted({0, S, *torch.randint(1, S, (5,), generator=gen, device="cuda").tolist()})
    side_cuts = [c * G // S for c in cuts]
    for (a, b), (ga, gb) in zip(zip(cuts, cuts[1:]), zip(side_cuts, side_cuts[1:])):
        key[0, a:b] = torch.tensor([a, b], dtype=torch.int32)
        side[0, a:b] = torch.tensor([ga, gb], dtype=torch.int32)
    return key.contiguous(), side.contiguous()


def band_side(dtype, D, *, S=200, G=70, left=70, right=60, B=2, H=2, strided=True, masks=True, bias=True,
              ranges=False, halo=None, dlse=False, dropout=None, bias_dtype=torch.float32):
    """``halo``: None or (HL, HR), halo keys on both sides; ``dlse``: pass a random lse gradient; ``dropout``: None or
    (dropout_p, dropout_offset); ``bias_dtype``: the bias tables' dtype (float16 / bfloat16 converted to float32 by
    the forward's conversion kernel and the backward's delta kernel, gradients written in the table's dtype; float64
    through a float32 copy)."""
    ops = torch.ops.longattn
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    if strided:
        q, k, v = (randn(B, H, S, D).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (randn(B, S, H, D) for _ in range(3))
    sk, sv = randn(B, G, H, D), randn(B, G, H, D)
    bkm = (torch.rand(B, S, generator=gen, device="cuda") > 0.2) if masks else None
    if masks:
        bkm[0] = False  # a batch row whose band is empty: rows with no band key
    sm = (torch.rand(B, G, generator=gen, device="cuda") > 0.3) if masks and G else None
    qb = torch.randint(-1, max(G, 1), (B, S), generator=gen, device="cuda", dtype=torch.int32) if bias else None
    bb = torch.randn(H, left + right + 1, generator=gen, device="cuda").to(bias_dtype) if bias else None
    sb = torch.randn(H, 2 * G + 1, generator=gen, device="cuda").to(bias_dtype) if bias else None
    scale = D**-0.5
    extra = {}
    if ranges:
        extra["key_ranges"], extra["side_ranges"] = packed_ranges(B, S, G, gen)
    if halo is not None:
        n = sum(halo)
        hk, hv = ((randn(B, H, n, D).transpose(1, 2) if strided else randn(B, n, H, D)) for _ in range(2))
        hm = (torch.rand(B, n, generator=gen, device="cuda") > 0.2) if masks else None
        extra.update(halo_k=hk, halo_v=hv, halo_mask=hm, halo_left=halo[0])
    if dropout is not None:
        extra.update(dropout_p=dropout[0], rng=torch.tensor([5, 8], dtype=torch.int64, device="cuda"))
        if dropout[1]:
            extra["dropout_offset"] = dropout[1]
    out, lse = ops.cuda_band_side_fwd(q, k, v, sk, sv, bkm, sm, qb, bb, sb, left, right, scale, **extra)
    dout = randn(B, S, H, D)
    if dlse:
        extra["dlse"] = torch.randn(B, H, S, generator=gen, device="cuda").masked_fill(torch.isinf(lse), float("nan"))
    grads = ops.cuda_band_side_bwd(dout, q, k, v, sk, sv, out, lse, bkm, sm, qb, bb, sb, left, right, scale,
                                   **extra)
    torch.cuda.synchronize()
    names = ["out", "dq", "dk", "dv", "dside_k", "dside_v", "dband_bias", "dside_bias", "dhalo_k", "dhalo_v"]
    for name, t in zip(names, (out, *grads)):
        if not torch.isfinite(t).all():
            raise RuntimeError(f"non-finite {name} (dtype={dtype}, D={D})")


def longformer_band(dtype, D, *, S=200, G=70, left=70, right=60, B=2, H=2, dropout=0.0, padding=True, ranges=False):
    """The kIndexed kernels (side_index / query_mask / band_rows_only) and the finish kernel: slots point at
    distinct tokens of k / v (a random permutation), some unused, batch row 1 with indices outside [0, S) (read as
    zeros, given no gradient); padded rows and globals among the band rows' complement. ``ranges``: the packed band
    pass (the kIndexed && kRanges kernels), key ranges over the band keys and side ranges over the G slots, packed in
    batch row 0 and arbitrary in row 1 (``packed_ranges``); ``"key"`` / ``"side"``: only that kind."""
    ops = torch.ops.longattn
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, H, S, D, generator=gen, device="cuda").to(dtype).transpose(1, 2) for _ in range(3))
    pos = torch.stack([torch.randperm(S, generator=gen, device="cuda")[:G] for _ in range(B)])
    pos[1, : G // 4] = torch.tensor([-3, S, S + 5, -(2**40)], device="cuda").repeat(G)[: G // 4]
    used = torch.rand(B, G, generator=gen, device="cuda") > 0.2
    real = torch.rand(B, S, generator=gen, device="cuda") > 0.1 if padding else None
    band_rows = torch.ones(B, S, dtype=torch.bool, device="cuda") if real is None else real.clone()
    band_rows.scatter_(1, pos.clamp(0, S - 1), False)
    extra = {"dropout_p": dropout, "rng": torch.tensor([5, 8], dtype=torch.int64, device="cuda")} if dropout else {}
    if ranges:
        key_ranges, side_ranges = packed_ranges(B, S, G, gen)
        extra.update({"key_ranges": key_ranges} if ranges != "side" else {})
        extra.update({"side_ranges": side_ranges} if ranges != "key" else {})
    out, lse = ops.cuda_band_side_fwd(q, k, v, k, v, band_rows, used, None, None, None, left, right, D**-0.5,
                                      side_index=pos, query_mask=real, band_rows_only=True, **extra)
    grads = ops.cuda_band_side_bwd(torch.randn_like(out), q, k, v, k, v, out, lse, band_rows, used, None, None, None,
                                   left, right, D**-0.5, side_index=pos, **extra)
    torch.cuda.synchronize()
    for name, t in zip(["out", "dq", "dk", "dv"], (out, *grads[:3])):
        if not torch.isfinite(t).all():
            raise RuntimeError(f"non-finite {name} (longformer band, dtype={dtype}, D={D})")


def longformer_glue(dtype, *, B=2, S=300, H=3, D=64, G=40, C=3):
    """csrc/longformer's small kernels: the slot layout (a strided mask, globals on padding tokens), the merge into out
    and the split dq add, with slot positions outside [0, S) (never dereferenced) and unused slots."""
    ops = torch.ops.longattn
    gen = torch.Generator(device="cuda").manual_seed(2)
    glob = (torch.rand(B, 2 * S, generator=gen, device="cuda") > 0.8)[:, ::2]  # strided
    real = torch.rand(B, S, generator=gen, device="cuda") > 0.1
    band_rows, pos, used = ops.cuda_longformer_global_slots(glob, real, G)
    ops.cuda_longformer_global_slots(glob, None, S)  # every position a slot
    pos = pos.clone()
    pos[1, : G // 4] = torch.tensor([-3, S, S + 5, -(2**40)], device="cuda").repeat(G)[: G // 4]
    x = torch.randn(B, S, H, D, generator=gen, device="cuda").to(dtype)
    rows = torch.randn(B * C, G, H, D, generator=gen, device="cuda").to(dtype)
    lse_parts = torch.randn(B * C, H, G, generator=gen, device="cuda")
    lse_parts[0, 0] = float("inf")  # an empty split
    out = x.clone()
    glse = ops.cuda_longformer_rows_merge(rows, lse_parts, pos, used, out)
    dq = torch.zeros_like(x)
    ops.cuda_longformer_rows_add(rows, pos, used, dq)
    torch.cuda.synchronize()
    for name, t in (("rows", rows), ("out", out), ("dq", dq), ("band_rows", band_rows.float())):
        if not torch.isfinite(t).all():
            raise RuntimeError(f"non-finite {name} (longformer glue, dtype={dtype})")
    if torch.isnan(glse).any():
        raise RuntimeError(f"NaN glse (longformer glue, dtype={dtype})")


def longformer_global_rows(dtype, D, *, B=2, S=300, H=2, G=37, n=128, dropout=0.0, ranges=False, in_place=True):
    """The global rows' band op as the CUDA backend runs it: ``side_only`` (no band tile, no band CTA), ``query_index``
    (the slots' rows of the unsplit, strided q / dout / out read in place by every split; ``in_place=False``: the
    rows gathered per split by torch instead, the op without it), the backward's ``lse_split`` (every key split reads
    the merged glse) and ``dside_k_into`` / ``dside_v_into`` (strided destinations, the last split's padding rows
    dropped), then ``rows_add`` with ``zero_fill``; slots with out-of-range positions, masked keys, arbitrary per-slot
    side ranges, and a call with no side key at all."""
    ops = torch.ops.longattn
    gen = torch.Generator(device="cuda").manual_seed(3)
    C, scale = -(-S // n), D**-0.5
    q, k, v = (torch.randn(B, H, S, D, generator=gen, device="cuda").to(dtype).transpose(1, 2) for _ in range(3))
    pos = torch.stack([torch.randperm(S, generator=gen, device="cuda")[:G] for _ in range(B)])
    pos[1, :3] = torch.tensor([-3, S + 7, -(2**40)], device="cuda")[: min(G, 3)]
    used = torch.rand(B, G, generator=gen, device="cuda") > 0.2
    pad = C * n - S
    sk, sv = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).reshape(B * C, n, H, D) for x in (k, v))
    real = torch.rand(B, S, generator=gen, device="cuda") > 0.1
    side_mask = torch.nn.functional.pad(real, (0, pad)).view(B * C, n)
    extra = {"dropout_global_rows": True, "side_only": True}
    if dropout:
        extra.update(dropout_p=dropout, rng=torch.tensor([5, 8], dtype=torch.int64, device="cuda"))
    if ranges:
        extra["side_ranges"] = torch.randint(-5, n + 5, (B * C, G, 2), generator=gen, device="cuda", dtype=torch.int32)

    def rows(x):  # the op's query-side operand: x itself read through pos, or its slots' rows gathered per split
        if in_place:
            return x
        index = pos.clamp(0, S - 1)[:, :, None, None].expand(B, G, H, D)
        return torch.gather(x, 1, index).repeat_interleave(C, 0)

    if in_place:
        extra["query_index"] = pos
    qs = rows(q)
    parts, lse_parts = ops.cuda_band_side_fwd(qs, qs, qs, sk, sv, None, side_mask, None, None, None, 0, 0, scale,
                                              **extra)
    out = torch.zeros(B, S, H, D, device="cuda", dtype=dtype)
    glse = ops.cuda_longformer_rows_merge(parts, lse_parts, pos, used, out)
    douts, outs = rows(torch.randn(B, H, S, D, generator=gen, device="cuda").to(dtype).transpose(1, 2)), rows(out)
    dk, dv = (torch.zeros(B, H, S, D, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(2))  # strided
    grads = ops.cuda_band_side_bwd(douts, qs, qs, qs, sk, sv, outs, glse, None, side_mask, None, None, None, 0, 0,
                                   scale, lse_split=C, dside_k_into=dk, dside_v_into=dv, **extra)
    returned = ops.cuda_band_side_bwd(douts, qs, qs, qs, sk, sv, outs, glse, None, side_mask, None, None, None, 0, 0,
                                      scale, lse_split=C, **extra)
    dq = torch.empty(B, S, H, D, device="cuda", dtype=dtype)
    ops.cuda_longformer_rows_add(grads[0], pos, used, dq, zero_fill=True)
    extra.pop("side_ranges", None)
    none = sk[:, :0], sv[:, :0]  # no side key: out 0, lse +inf, dq 0 without a launch of the band kernels
    o0, l0 = ops.cuda_band_side_fwd(qs, qs, qs, *none, None, None, None, None, None, 0, 0, scale, **extra)
    g0 = ops.cuda_band_side_bwd(douts, qs, qs, qs, *none, outs, l0, None, None, None, None, None, 0, 0, scale,
                                **extra)
    torch.cuda.synchronize()
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv), ("dside_k", returned[3]),
                    ("dside_v", returned[4]), ("out (no keys)", o0), ("dq (no keys)", g0[0])):
        if not torch.isfinite(t).all():
            raise RuntimeError(f"non-finite {name} (longformer global rows, dtype={dtype}, D={D})")
    if not (torch.isinf(l0).all() and (o0 == 0).all() and (g0[0] == 0).all()):
        raise RuntimeError("side_only with no side key: expected out = 0, lse = +inf, dq = 0")
    if in_place and not (parts.view(B, C, G, H, D)[1, :, :min(G, 3)] == 0).all():
        raise RuntimeError("query_index outside [0, S): expected out = 0")


def longformer_fused(dtype, D, *, B=2, S=300, H=2, G=3, split_keys=64, ranges=False, projections=False, many=False):
    """Longformer's fused forward (cuda_backend.longformer_forward: the slots kernel zeroing the arrival counters, then
    one launch of the global rows' split CTAs, the last of each slot tile merging them, and the band CTAs, which leave
    the used slots' rows to the merge), then the fused backward (cuda_backend.longformer_backward: delta of both
    passes, the split dQ CTAs leading the band's, band dK/dV, the finish of the band's side keys and the splits' dq
    sum, the global rows' dK/dV; separate projections: the composed path) and the composed one; out, lse, glse and
    every gradient must equal the composed path's bitwise. ``many``: 80 globals in row 0 (two slot tiles) and more
    globals than slots in row 1."""
    from longattn.backends import _longformer, cuda_backend

    gen = torch.Generator(device="cuda").manual_seed(3)

    def randn():
        return torch.randn(B, S, H, D, generator=gen, device="cuda").to(dtype)

    q, k, v = randn(), randn(), randn()
    qg, kg, vg = (randn(), randn(), randn()) if projections else (None, None, None)
    glob = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    glob[0, [0, S // 2, S - 1]] = True
    glob[1, [min(5, S - 1), S - 1]] = True  # S - 1 is padding in row 1
    if many:
        glob[0, 1:240:3] = True
        glob[1, :G + 10] = True
    pad = torch.ones(B, S, dtype=torch.bool, device="cuda")
    pad[1, S - 20:] = False
    key_ranges = packed_ranges(B, S, G, gen)[0] if ranges else None
    left, right = min(40, S - 1), min(33, S - 1)
    saved = _longformer.SPLIT_KEYS
    _longformer.SPLIT_KEYS = split_keys
    try:
        args = (q, k, v, qg, kg, vg, glob, pad, left, right, D ** -0.5, G, 0.0, None, key_ranges)
        fused = cuda_backend.longformer_forward(*args)
        composed = _longformer.composed_forward(cuda_backend, *args)
        out, lse, glse, band_rows, pos, used = fused
        bwd_args = (torch.randn_like(out), q, k, v, qg, kg, vg, out, lse, glse, band_rows, pos, used, glob, pad, left,
                    right, D ** -0.5, 0.0, None, key_ranges)
        grads = cuda_backend.longformer_backward(*bwd_args)
        composed_grads = _longformer.composed_backward(cuda_backend, *bwd_args)
    finally:
        _longformer.SPLIT_KEYS = saved
    torch.cuda.synchronize()
    names = ("out", "lse", "glse", "dq", "dk", "dv", "dq_global", "dk_global", "dv_global")
    for name, a, b in zip(names, (*fused[:3], *grads), (*composed[:3], *composed_grads)):
        if not torch.equal(a, b):
            raise RuntimeError(f"fused {name} differs from the composed path (longformer fused, dtype={dtype}, D={D})")
    for name, t in (("out", out), *zip(("dq", "dk", "dv"), grads)):
        if not torch.isfinite(t).all():
            raise RuntimeError(f"non-finite {name} (longformer fused, dtype={dtype}, D={D})")


def block_aggregate(dtype, weighted):
    ops = torch.ops.longattn
    B, S, C, G = 2, 300, 96, 20
    x = torch.randn(B, S, C, device="cuda", dtype=dtype)
    ids = torch.randint(-1, G, (B, S), device="cuda", dtype=torch.int32)
    w = torch.randn(C, device="cuda") if weighted else None
    out, sums, rstd = ops.cuda_block_aggregate_fwd(x, ids, G, w, 1e-6)
    dx, dw = ops.cuda_block_aggregate_bwd(torch.randn_like(out), x, ids, G, w, sums, rstd, 1e-6)
    torch.cuda.synchronize()
    for name, t in (("out", out), ("dx", dx), ("dweight", dw)):
        if not torch.isfinite(t).all():
            raise RuntimeError(f"non-finite {name} (block_aggregate, dtype={dtype}, weighted={weighted})")


def main() -> int:
    import longattn  # noqa: F401
    from longattn.backends import cuda_backend

    reasons = cuda_backend.unavailable_reasons(torch.device("cuda"))
    if reasons:
        print("cannot run: " + "; ".join(reasons), file=sys.stderr)
        return 2
    for dtype in (torch.float16, torch.bfloat16):
        for D in (32, 64, 128):
            band_side(dtype, D)
            print(f"band_side fwd+bwd ok: {dtype}, D={D}")
    band_side(torch.bfloat16, 64, G=0, masks=False, bias=False, strided=False)  # plain local attention
    band_side(torch.bfloat16, 64, S=1, G=1, left=0, right=0)  # a single token
    band_side(torch.float16, 64, S=130, G=0, left=129, right=129)  # dense window
    print("band_side edge cases ok")
    for bias_dtype in (torch.float16, torch.bfloat16, torch.float64):  # converted on the device, written in their dtype
        band_side(torch.bfloat16, 64, bias_dtype=bias_dtype)
    # Tables larger than the delta kernel's grid (4 rows: one CTA): its conversion loop strides over them.
    band_side(torch.float16, 64, S=1, G=300, left=0, right=0, bias_dtype=torch.bfloat16)
    band_side(torch.float16, 64, S=1000, G=10, left=20, right=20)  # several query chunks: the finish kernel's sums
    print("band_side bias dtypes and side-key chunks ok")
    for D in (32, 64, 128):
        band_side(torch.bfloat16, D, ranges=True)  # per-row key ranges (packed varlen batches)
    print("band_side with key ranges ok")
    for D in (32, 64, 128):
        band_side(torch.float16, D, halo=(70, 90))  # halo keys: windows across both edges, masked halo rows
    band_side(torch.bfloat16, 64, S=37, left=300, right=200, halo=(300, 210))  # halos wider than S
    band_side(torch.bfloat16, 64, S=130, left=10, right=5, halo=(100, 100))  # halo rows no window reaches
    band_side(torch.float16, 64, G=0, masks=False, bias=False, strided=False, halo=(64, 0))  # one-sided, aligned
    print("band_side with halo keys ok")
    band_side(torch.float16, 64, dlse=True)
    band_side(torch.bfloat16, 64, ranges=True, dlse=True)
    band_side(torch.float16, 128, halo=(40, 40), dlse=True)
    print("band_side with the lse gradient ok")
    for D in (32, 64, 128):
        band_side(torch.bfloat16, D, halo=(70, 90), dropout=(0.3, 72))  # halo keys + dropout offset
    band_side(torch.float16, 64, S=37, left=300, right=200, halo=(300, 210), dropout=(0.2, 1 << 20))
    band_side(torch.float16, 64, halo=(0, 0), dropout=(0.3, 4096), dlse=True)  # empty halo, offset: kHalo kernels
    band_side(torch.bfloat16, 64, dropout=(0.3, 8))  # an offset without halo keys
    band_side(torch.float16, 128, halo=(40, 40), dropout=(0.1, 0))  # halo keys + dropout, no offset
    print("band_side with dropout, halo keys and the dropout offset ok")
    for D in (32, 64, 128):
        longformer_band(torch.float16, D)
        longformer_band(torch.bfloat16, D, dropout=0.2)
    longformer_band(torch.bfloat16, 64, G=0, padding=False)  # no slots: the row masks alone
    longformer_band(torch.float16, 64, S=1, G=1, left=0, right=0)
    for D in (32, 64, 128):  # packed batches: the kIndexed && kRanges kernels
        longformer_band(torch.bfloat16, D, ranges=True)
        longformer_band(torch.float16, D, ranges=True, dropout=0.2)
    longformer_band(torch.float16, 64, ranges="key")
    longformer_band(torch.bfloat16, 64, ranges="side", dropout=0.1)
    longformer_band(torch.bfloat16, 64, G=0, padding=False, ranges=True)  # no slots, ranges: the row masks alone
    print("Longformer band pass (indexed side keys, finish kernel, with and without ranges) ok")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        longformer_glue(dtype)
    longformer_glue(torch.bfloat16, S=1, G=1, C=1)
    print("Longformer slots and global-row kernels ok")
    for D in (32, 64, 128):
        longformer_global_rows(torch.float16, D)  # three splits, the last padded
        longformer_global_rows(torch.bfloat16, D, ranges=True)
        longformer_global_rows(torch.float16, D, G=70, dropout=0.2)  # two query tiles, dropout over splits
    longformer_global_rows(torch.bfloat16, 64, n=300, dropout=0.2)  # dropout keeps one split
    longformer_global_rows(torch.float16, 64, S=1, G=1, n=1)
    longformer_global_rows(torch.bfloat16, 64, ranges=True, in_place=False)  # side_only without query_index
    longformer_global_rows(torch.float16, 128, G=0)  # no slots
    print("Longformer global rows (side_only, query_index, lse_split, dside_*_into, zero_fill) ok")
    for D in (32, 64, 128):
        longformer_fused(torch.float16, D)  # 5 splits of 60 keys
        longformer_fused(torch.bfloat16, D, G=96, many=True, projections=True)  # two slot tiles
    longformer_fused(torch.float16, 64, S=331, split_keys=64)  # prime S: the last split padded
    longformer_fused(torch.bfloat16, 64, G=40, ranges=True)  # packed: the kRanges band CTAs
    longformer_fused(torch.float16, 64, G=12, many=True)  # more globals than slots in both rows
    longformer_fused(torch.float16, 64, S=1, G=1, split_keys=None)
    longformer_fused(torch.bfloat16, 64, S=4096, H=4, G=1, split_keys=1024)  # 4 splits racing to merge
    print("Longformer fused forward (split CTAs merged by the last to arrive, band CTAs) ok")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for weighted in (False, True):
            block_aggregate(dtype, weighted)
    print("block_aggregate fwd+bwd ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
