"""Sequence parallelism (longattn.distributed) against the single-process ops, on CPU with gloo.

One gloo group of 4 processes (a FileStore under tmp_path, started from a forkserver; 60 s collective timeout
and TORCH_DISTRIBUTED_DEBUG=DETAIL collective checks, so a bug fails instead of hanging) runs every case for
P = 2, 3 (subgroups) and 4, and P = 1 on one-rank groups. Every rank builds
the *whole* inputs from the same seed, runs the plain op on them (the oracle, backend="torch", fp64) and the
distributed op on its shard, and compares its rows of the output and of every gradient (<= 1e-10); gradients
of replicated tensors (bias tables, side keys, norm weight) are summed over the ranks first. Each rank's loss is
``(out_r * W_r).sum()`` with ``W_r`` its slice of one random weight, so the ranks' losses add up to the oracle's.
"""

from __future__ import annotations

import os
import random
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import longattn
import longattn.distributed as ld
from longattn.distributed.halo import halo_plan
from tests.tolerance import assert_within_rule

pytestmark = pytest.mark.distributed

TOL = 1e-10
B, H, D = 2, 2, 8
F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------- helpers
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=F64)


def make_bounds(S, P, kind, seed=0):
    """Shard bounds: "even", "rand" (random cuts) or "one" (a 1-token shard next to a 2-token one)."""
    if kind == "even":  # SeqShards.even's layout
        return tuple(min(r * -(-S // P), S) for r in range(P + 1))
    if kind == "rand":
        cuts = sorted(random.Random(seed).sample(range(1, S), P - 1))
        return (0, *cuts, S)
    sizes = [1, S - 1] if P == 2 else [2, 1] + [0] * (P - 2)
    if P > 2:
        rest = S - 3
        for i in range(P - 2):
            sizes[2 + i] = rest // (P - 2) + (1 if i < rest % (P - 2) else 0)
    b = [0]
    for n in sizes:
        b.append(b[-1] + n)
    return tuple(b)


def make_mask(S, kind, bounds, g):
    """(B, S) real-token mask: None, random holes, a whole shard of padding, or right padding."""
    if kind == "none":
        return None
    m = torch.rand(B, S, generator=g) > 0.25
    if kind == "shard":  # rank 1 holds no real token in row 0
        m[0, bounds[1]:bounds[2]] = False
    elif kind == "right":
        m[:, :] = True
        m[1, (2 * S) // 3:] = False
    m[:, 0] = True
    return m


def close(what, got, ref, tol=TOL):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    err = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.0e} (rank {dist.get_rank()})"


def summed(x, group):
    """The sum over the group's ranks of a replicated tensor's per-rank gradient."""
    y = x.detach().clone()
    dist.all_reduce(y, group=group)
    return y


def leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


def _fwd_bwd(fn, inputs, W, kw):
    """``fn(**inputs, **kw)`` with fresh float leaves; returns ``(out, {name: grad})`` of ``(out * W).sum()``."""
    ins = {n: leaf(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for n, x in inputs.items()}
    out = fn(**ins, **kw)
    (out * W).sum().backward()
    grads = {n: x.grad if x.grad is not None else torch.zeros_like(x)
             for n, x in ins.items() if isinstance(x, torch.Tensor) and x.requires_grad}
    return out.detach(), grads


def _cast(inputs, dtype):
    return {n: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for n, x in inputs.items()}


def run_both(plain, sharded, full, local_names, replicated_names, W, sh, kw, sharded_kw=None, dtype=F64):
    """Oracle ``plain(**full, **kw)`` vs ``sharded(**local, **kw, seq_parallel=sh)``; compare outputs, gradients.

    ``full``: name -> whole tensor (or a non-tensor argument); ``local_names`` are sliced on dim 1 for the
    shard, ``replicated_names`` are passed whole (their gradients are summed over the group). In float64 the
    errors must be <= 1e-10; in another dtype the tolerance rule applies, with the plain op in that dtype as the
    baseline.
    """
    a, b = sh.start, sh.stop
    ref, ref_g = _fwd_bwd(plain, full, W, kw)
    local = {n: x[:, a:b] if n in local_names and isinstance(x, torch.Tensor) else x for n, x in full.items()}
    out, g = _fwd_bwd(lambda **k: sharded(**k, **(sharded_kw or {}), seq_parallel=sh), _cast(local, dtype),
                      W[:, a:b].to(dtype), kw)
    g = {n: summed(x, sh.group) if n in replicated_names else x for n, x in g.items()}
    mine = {n: x if n in replicated_names else x[:, a:b] for n, x in ref_g.items()}
    if dtype == F64:
        close("out", out, ref[:, a:b])
        for n in g:
            close(f"d{n}", g[n], mine[n])
        return
    base, base_g = _fwd_bwd(plain, _cast(full, dtype), W.to(dtype), kw)
    assert_within_rule("out", out, base[:, a:b], ref[:, a:b])
    for n in g:
        base_n = base_g[n] if n in replicated_names else base_g[n][:, a:b]
        assert_within_rule(f"d{n}", g[n], base_n, mine[n], grad=True)


# ------------------------------------------------------------------------------------------------------------ cases
BAND_CASES = [  # (S, bounds kind, window, mask kind, rel_bias)
    (13, "even", (3, 5), "none", False),
    (13, "rand", (0, 0), "rand", True),
    (13, "one", (5, 0), "rand", True),
    (17, "one", (0, 4), "shard", False),
    (17, "rand", (11, 7), "rand", True),  # windows wider than a shard: halos span several ranks
    (17, "even", (40, 40), "right", False),  # window >= S: dense
    (None, "even", (2, 3), "rand", True),  # S = P: every shard holds one token
    (97, "even", (2, 3), "shard", True),  # long shards: the op on the shard plus two edge ops
    (97, "rand", (4, 0), "rand", False),  # mixed: some ranks long, some short
    (97, "one", (0, 5), "none", True),
]


def band_cases(P):
    for i, (S, bk, window, mk, bias) in enumerate(BAND_CASES):
        S = S or P
        bounds = make_bounds(S, P, bk, seed=i)
        g = _gen(100 + i)
        q, k, v, W = (_randn(g, B, S, H, D) for _ in range(4))
        if i == 0:  # (B, H, S, D).transpose(1, 2) views
            q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        rel = _randn(g, H, window[0] + window[1] + 1) if bias else None
        yield bounds, window, dict(q=q, k=k, v=v, key_padding_mask=make_mask(S, mk, bounds, g), rel_bias=rel), W


def check_band(P, group):
    for bounds, window, full, W in band_cases(P):
        sh = ld.SeqShards(group, bounds)
        run_both(longattn.local_attention, ld.local_attention, full, {"q", "k", "v", "key_padding_mask"},
                 {"rel_bias"}, W, sh, dict(window=window, backend="torch"))


def longformer_cases(P, bounds):
    """Global masks: on shard boundaries, on one rank only, none in a row, at the ends, many."""
    S = bounds[-1]
    cases = []
    gm = torch.zeros(B, S, dtype=torch.bool)
    for b in bounds[1:-1]:
        gm[0, b - 1] = gm[0, b] = True  # both sides of every boundary
    cases.append(gm)
    gm = torch.zeros(B, S, dtype=torch.bool)
    gm[:, bounds[1]:bounds[2]][:, :2] = True  # globals on rank 1 only; row 1 ...
    gm[1] = False  # ... and row 1 has none at all
    cases.append(gm)
    gm = torch.zeros(B, S, dtype=torch.bool)
    gm[0, 0] = gm[0, S - 1] = gm[1, S // 2] = True
    cases.append(gm)
    g = _gen(7)
    cases.append(torch.rand(B, S, generator=g) > 0.6)  # many
    return cases


LF_SETUPS = [  # (S, bounds kind, window, mask kind, separate global projections, max_globals)
    (19, "rand", (2, 3), "rand", True, None),
    (19, "one", (6, 6), "shard", False, 12),
    (23, "even", (9, 1), "none", True, 30),
    (64, "even", (2, 2), "rand", True, None),  # long shards (edge ops)
]


def check_longformer(P, group):
    for i, (S, bk, window, mk, proj, mg) in enumerate(LF_SETUPS):
        bounds = make_bounds(S, P, bk, seed=i)
        sh = ld.SeqShards(group, bounds)
        for j, gm in enumerate(longformer_cases(P, bounds)):
            g = _gen(200 + 10 * i + j)
            q, k, v, W = (_randn(g, B, S, H, D) for _ in range(4))
            glob = {n: _randn(g, B, S, H, D) if proj else None for n in ("q_global", "k_global", "v_global")}
            full = dict(q=q, k=k, v=v, global_mask=gm, key_padding_mask=make_mask(S, mk, bounds, g), **glob)
            run_both(longattn.longformer_attention, ld.longformer_attention, full, set(full), set(), W, sh,
                     dict(window=window, backend="torch"), dict(max_globals=mg))


TG_SETUPS = [  # (S, bounds kind, block size, mask kind, window)
    (21, "rand", 4, "rand", (3, 3)),  # orphans (21 = 5 * 4 + 1) and blocks straddling ranks
    (21, "one", 5, "shard", (7, 7)),
    (23, "even", 2, "right", (1, 2)),
    (19, "rand", 16, "rand", (2, 2)),  # one block; rows whose orphans cross every rank
    (11, "even", 16, "none", (2, 2)),  # G = 0
    (61, "even", 4, "rand", (2, 1)),  # long shards (edge ops)
]


def check_tglobal(P, group):
    C = H * D
    for i, (S, bk, bs, mk, window) in enumerate(TG_SETUPS):
        bounds = make_bounds(S, P, bk, seed=i)
        sh = ld.SeqShards(group, bounds)
        a, b = sh.start, sh.stop
        g = _gen(300 + i)
        mask = make_mask(S, mk, bounds, g)
        mask = torch.ones(B, S, dtype=torch.bool) if mask is None else mask
        if i == 1:
            mask[1, :] = False
            mask[1, :bs + 1] = True  # row 1: one full block plus an orphan
        if i == 3:
            mask[1, bs - 1] = False  # row 1: no full block, every id -1
        ids_ref, bm_ref = longattn.tglobal_block_ids(mask, bs)
        ids, bm = ld.tglobal_block_ids(mask[:, a:b], bs, seq_parallel=sh)
        assert torch.equal(ids, ids_ref[:, a:b]) and torch.equal(bm, bm_ref), f"block ids, case {i}"
        G = S // bs
        x = _randn(g, B, S, C)
        for weight, size in ((None, bs), (_randn(g, C).abs() + 0.5, bs), (_randn(g, C).abs() + 0.5, None)):
            full = dict(x=x, block_ids=ids_ref, weight=weight)
            # Each rank's loss on the replicated aggregate uses its own weight; the oracle's is their sum.
            Wr = _randn(_gen(400 + i + 17 * sh.rank), B, G, C)
            Wsum = summed(Wr, sh.group)
            ref_in = {n: leaf(t) if t is not None and t.is_floating_point() else t for n, t in full.items()}
            ref = longattn.block_aggregate(ref_in["x"], ids_ref, G, weight=ref_in["weight"], backend="torch")
            (ref * Wsum).sum().backward()
            xl, wl = leaf(x[:, a:b]), leaf(weight)
            out = ld.block_aggregate(xl, ids, G, weight=wl, block_size=size, backend="torch", seq_parallel=sh)
            (out * Wr).sum().backward()
            close("agg", out, ref)
            close("dx", xl.grad, ref_in["x"].grad[:, a:b])
            if weight is not None:
                close("dweight", summed(wl.grad, sh.group), ref_in["weight"].grad)
        # The attention itself, with replicated side keys and the ids as query blocks.
        q, k, v, Wq = (_randn(g, B, S, H, D) for _ in range(4))
        full = dict(q=q, k=k, v=v, side_k=_randn(g, B, G, H, D), side_v=_randn(g, B, G, H, D), query_block=ids_ref,
                    key_padding_mask=mask, side_mask=bm_ref, rel_bias=_randn(g, H, sum(window) + 1),
                    side_bias=_randn(g, H, 2 * G + 1))
        run_both(longattn.tglobal_attention, ld.tglobal_attention, full, {"q", "k", "v", "query_block",
                 "key_padding_mask"}, {"side_k", "side_v", "rel_bias", "side_bias"}, Wq, sh,
                 dict(window=window, backend="torch"))


def check_low_precision(P, group):
    """float32 / bfloat16 within the tolerance rule (float32 sums and merges across ranks)."""
    S, bs = 24, 4
    sh = ld.SeqShards(group, make_bounds(S, P, "rand", seed=3))
    a, b = sh.start, sh.stop
    g = _gen(17)
    q, k, v, W = (_randn(g, B, S, H, D) for _ in range(4))
    mask = make_mask(S, "rand", sh.bounds, g)
    gm = torch.rand(B, S, generator=g) > 0.7
    ids, _ = longattn.tglobal_block_ids(mask, bs)
    agg_in = dict(x=_randn(g, B, S, H * D), block_ids=ids, weight=_randn(g, H * D).abs() + 0.5)
    Wa = _randn(g, B, S // bs, H * D)
    Wr = Wa if sh.rank == 0 else torch.zeros_like(Wa)  # the ranks' losses on the replicated output add up to Wa's
    agg_kw = dict(num_blocks=S // bs, backend="torch")
    for dtype in (torch.float32, torch.bfloat16):
        run_both(longattn.longformer_attention, ld.longformer_attention,
                 dict(q=q, k=k, v=v, global_mask=gm, key_padding_mask=mask),
                 {"q", "k", "v", "global_mask", "key_padding_mask"}, set(), W, sh,
                 dict(window=(3, 4), backend="torch"), dtype=dtype)
        ref, ref_g = _fwd_bwd(longattn.block_aggregate, agg_in, Wa, agg_kw)
        base, base_g = _fwd_bwd(longattn.block_aggregate, _cast(agg_in, dtype), Wa.to(dtype), agg_kw)
        local = dict(agg_in, x=agg_in["x"][:, a:b], block_ids=ids[:, a:b])
        out, got = _fwd_bwd(ld.block_aggregate, _cast(local, dtype), Wr.to(dtype),
                            dict(agg_kw, block_size=bs, seq_parallel=sh))
        assert_within_rule("agg", out, base, ref)
        assert_within_rule("dx", got["x"], base_g["x"][:, a:b], ref_g["x"][:, a:b], grad=True)
        assert_within_rule("dweight", summed(got["weight"], group), base_g["weight"], ref_g["weight"], grad=True)


def check_deterministic(P, group):
    """Two runs at fixed P give bitwise-equal outputs and gradients."""
    S = 29
    bounds = make_bounds(S, P, "rand", seed=5)
    sh = ld.SeqShards(group, bounds)
    g = _gen(9)
    q, k, v, W = (_randn(g, B, S, H, D) for _ in range(4))
    gm = torch.rand(B, S, generator=g) > 0.7
    a, b = sh.start, sh.stop
    ids, bm = ld.tglobal_block_ids(torch.ones(B, b - a), 3, seq_parallel=sh)
    w = torch.ones(H * D, dtype=F64)
    runs = []
    for _ in range(2):
        ql, kl, vl = (leaf(t[:, a:b]) for t in (q, k, v))
        out = ld.longformer_attention(ql, kl, vl, (4, 6), gm[:, a:b], seq_parallel=sh, backend="torch")
        agg = ld.block_aggregate(ql.flatten(2), ids, S // 3, weight=w, block_size=3, seq_parallel=sh, backend="torch")
        side = agg.view(B, S // 3, H, D)
        out = out + ld.tglobal_attention(ql, kl, vl, side, side, 5, ids, side_mask=bm, seq_parallel=sh,
                                         backend="torch")
        (out * W[:, a:b]).sum().backward()
        runs.append([out.detach(), ql.grad, kl.grad, vl.grad])
    assert all(torch.equal(x, y) for x, y in zip(*runs)), "two runs differ"


def check_p1(mine):
    """P = 1 (a one-rank group) is bitwise equal to the plain ops."""
    S = 15
    g = _gen(11)
    q, k, v = (_randn(g, B, S, H, D) for _ in range(3))
    mask = torch.rand(B, S, generator=g) > 0.2
    gm = torch.rand(B, S, generator=g) > 0.7
    sh = ld.SeqShards(mine, (0, S))
    assert torch.equal(ld.local_attention(q, k, v, 3, key_padding_mask=mask, seq_parallel=sh, backend="torch"),
                       longattn.local_attention(q, k, v, 3, key_padding_mask=mask, backend="torch"))
    assert torch.equal(ld.longformer_attention(q, k, v, 3, gm, key_padding_mask=mask, seq_parallel=sh, backend="torch"),
                       longattn.longformer_attention(q, k, v, 3, gm, key_padding_mask=mask, backend="torch"))
    ids, bm = ld.tglobal_block_ids(mask, 4, seq_parallel=sh)
    assert all(torch.equal(x, y) for x, y in zip((ids, bm), longattn.tglobal_block_ids(mask, 4)))
    x = _randn(g, B, S, H * D)
    assert torch.equal(ld.block_aggregate(x, ids, 3, seq_parallel=sh, backend="torch"),
                       longattn.block_aggregate(x, ids, 3, backend="torch"))


def check_traffic(P, group):
    """The band sends (left + right) rows' worth of k, v and mask per rank, whatever the shard length."""
    left, right, Bt = 5, 3, 1
    sent = []
    for S_r in (64, 512):
        sh = ld.SeqShards.even(S_r * P, group)
        g = _gen(13)
        q, k, v = (_randn(g, Bt, S_r, H, D) for _ in range(3))
        mask = torch.ones(Bt, S_r, dtype=torch.bool)
        ld.reset_stats()
        ld.local_attention(q, k, v, (left, right), key_padding_mask=mask, seq_parallel=sh, backend="torch")
        sent.append(ld.stats()["bytes"]["all_to_all"])
    r = dist.get_rank()
    rows = left * (r < P - 1) + right * (r > 0)  # to the next rank's left halo, the previous one's right halo
    assert sent[0] == sent[1] == rows * Bt * H * (2 * D + 1) * 8, (sent, rows)
    # TGlobal aggregates: one (B, C + 1) edge partial plus this rank's G / P owned blocks, not all G.
    bs, C = 16, H * D
    for S_r in (64, 512):
        sh = ld.SeqShards.even(S_r * P, group)
        x = _randn(_gen(14), Bt, S_r, C)
        ids, _ = ld.tglobal_block_ids(torch.ones(Bt, S_r), bs, seq_parallel=sh)
        ld.reset_stats()
        ld.block_aggregate(x, ids, S_r * P // bs, block_size=bs, seq_parallel=sh, backend="torch")
        assert ld.stats()["bytes"]["all_gather"] == Bt * (C + 1 + S_r // bs * C) * 8, ld.stats()


def check_bad_input(P, group):
    """Bad input on one rank, or ranks that disagree, raise ValueError on every rank (no hang)."""
    S = 4 * P
    sh = ld.SeqShards.even(S, group)
    r = dist.get_rank()
    q = torch.zeros(1, sh.local_len + (1 if r == 0 else 0), H, D, dtype=F64)
    with pytest.raises(ValueError, match="shard|rejected"):
        ld.local_attention(q, q, q, 2, seq_parallel=sh)
    q = torch.zeros(1, sh.local_len, H, D, dtype=F64)
    with pytest.raises(ValueError, match="disagree"):
        ld.local_attention(q, q, q, 2 + (r == P - 1), seq_parallel=sh)
    with pytest.raises(ValueError, match="bounds"):
        ld.SeqShards(group, (0, S))
    with pytest.raises(ValueError, match="bounds"):
        ld.SeqShards(group, (0,) * P + (S,))
    with pytest.raises(ValueError, match="empty"):
        ld.SeqShards.even(P - 1, group) if P > 1 else ld.SeqShards.even(0, group)
    with pytest.raises(ValueError, match="q's shape"):
        ld.local_attention(q, q[..., :4], q, 2, seq_parallel=sh)
    with pytest.raises(TypeError, match="seq_parallel"):
        ld.local_attention(q, q, q, 2, seq_parallel=group)
    if P != dist.get_world_size():
        return
    # A 1-D DeviceMesh works like its group; a 2-D one is refused.
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (P,))
    sh = ld.SeqShards(mesh, sh.bounds)
    assert sh.size == P and sh.rank == r
    if P == 4:
        with pytest.raises(ValueError, match="1-D"):
            ld.SeqShards(init_device_mesh("cpu", (2, 2)), (0, 1, 2))


def check_public_keyword(P, group):
    """``seq_parallel=`` on the public ops runs ``longattn.distributed``'s versions (bitwise the same result)."""
    S = 23
    sh = ld.SeqShards(group, make_bounds(S, P, "rand", seed=7))
    g = _gen(13)
    q, k, v = (_randn(g, B, S, H, D)[:, sh.start:sh.stop] for _ in range(3))
    mask = (torch.rand(B, S, generator=g) > 0.2)[:, sh.start:sh.stop]
    gm = (torch.rand(B, S, generator=g) > 0.8)[:, sh.start:sh.stop]
    kw = dict(key_padding_mask=mask, seq_parallel=sh, backend="torch")
    assert torch.equal(longattn.local_attention(q, k, v, (3, 5), **kw), ld.local_attention(q, k, v, (3, 5), **kw))
    assert torch.equal(longattn.longformer_attention(q, k, v, 4, gm, max_globals=S, **kw),
                       ld.longformer_attention(q, k, v, 4, gm, max_globals=S, **kw))
    ids, bm = longattn.tglobal_block_ids(mask, 4, seq_parallel=sh)
    assert all(torch.equal(x, y) for x, y in zip((ids, bm), ld.tglobal_block_ids(mask, 4, seq_parallel=sh)))
    agg = longattn.block_aggregate(q.flatten(2), ids, S // 4, block_size=4, seq_parallel=sh, backend="torch")
    assert torch.equal(agg, ld.block_aggregate(q.flatten(2), ids, S // 4, block_size=4, seq_parallel=sh,
                                               backend="torch"))
    side = agg.view(B, S // 4, H, D)
    assert torch.equal(longattn.tglobal_attention(q, k, v, side, side, 2, ids, side_mask=bm, **kw),
                       ld.tglobal_attention(q, k, v, side, side, 2, ids, side_mask=bm, **kw))


def _seeded(fn, seed=77):
    """``fn`` with the CPU generator reset first: the plain op and every rank draw the same dropout seed."""
    def call(**kw):
        torch.manual_seed(seed)
        return fn(**kw)
    return call


def check_dropout(P, group):
    """Attention dropout under seq_parallel (local, TGlobal): with the same generator state on every rank, outputs
    and gradients equal the single-process op's with that seed (the keep bits are the whole sequence's)."""
    S, bs, window, p = 28, 4, (5, 6), 0.3
    cuts = sorted(random.Random(P).sample(range(1, S // 4), P - 1))
    sh = ld.SeqShards(group, (0, *(4 * c for c in cuts), S))
    g = _gen(31)
    q, k, v, W = (_randn(g, B, S, H, D) for _ in range(4))
    mask = make_mask(S, "rand", sh.bounds, g)
    rel = _randn(g, H, sum(window) + 1)
    kw = dict(window=window, dropout_p=p, backend="torch")
    run_both(_seeded(longattn.local_attention), _seeded(ld.local_attention),
             dict(q=q, k=k, v=v, key_padding_mask=mask, rel_bias=rel), {"q", "k", "v", "key_padding_mask"},
             {"rel_bias"}, W, sh, kw)
    ids, bm = longattn.tglobal_block_ids(mask, bs)
    G = S // bs
    full = dict(q=q, k=k, v=v, side_k=_randn(g, B, G, H, D), side_v=_randn(g, B, G, H, D), query_block=ids,
                key_padding_mask=mask, side_mask=bm, rel_bias=rel, side_bias=_randn(g, H, 2 * G + 1))
    run_both(_seeded(longattn.tglobal_attention), _seeded(ld.tglobal_attention), full,
             {"q", "k", "v", "query_block", "key_padding_mask"}, {"side_k", "side_v", "rel_bias", "side_bias"}, W,
             sh, kw)
    # Without the same seed the results differ (the check above can fail), and bounds off the 4-key groups raise
    # on every rank, as does Longformer's dropout.
    ql = q[:, sh.start:sh.stop]
    torch.manual_seed(5)
    other = ld.local_attention(ql, ql, ql, window, dropout_p=p, seq_parallel=sh, backend="torch")
    torch.manual_seed(6)
    assert not torch.equal(other, ld.local_attention(ql, ql, ql, window, dropout_p=p, seq_parallel=sh,
                                                     backend="torch"))
    odd = ld.SeqShards(group, make_bounds(4 * P + 1, P, "even"))
    qo = torch.zeros(1, odd.local_len, H, D, dtype=F64)
    with pytest.raises(ValueError, match="multiples of 4"):
        ld.local_attention(qo, qo, qo, 2, dropout_p=p, seq_parallel=odd)
    with pytest.raises(ValueError, match="dropout_p"):
        longattn.longformer_attention(ql, ql, ql, 2, ql[..., 0, 0] > 0, dropout_p=p, seq_parallel=sh)


CHECKS = [check_band, check_longformer, check_tglobal, check_low_precision, check_deterministic, check_traffic,
          check_bad_input, check_public_keyword, check_dropout]
WORLD = 4


def _worker(rank, store):
    """One process group of 4 ranks; P = 2 and 3 run on its subgroups, P = 1 on one-rank groups."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Collective fingerprint checks: ranks issuing different collectives fail at once, with both named.
    dist.set_debug_level(dist.DebugLevel.DETAIL)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        _run_checks(rank)
    except BaseException:
        traceback.print_exc()  # mp.spawn reports the first rank to exit, often a peer of the one that failed
        raise
    finally:
        dist.destroy_process_group()


def _run_checks(rank):
    singles = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group, in order
    groups = {P: dist.new_group(list(range(P))) if P < WORLD else dist.group.WORLD for P in (2, 3, WORLD)}
    check_p1(singles[rank])
    for P, group in groups.items():
        if rank < P:
            for check in CHECKS:
                check(P, group)
    dist.barrier()


def test_seq_parallel_matches_single_process(tmp_path):
    """P = 1, 2, 3, 4: outputs and gradients equal the plain ops (fp64, <= 1e-10), traffic, errors, determinism."""
    _start(_worker, WORLD, tmp_path)


def _start(fn, nprocs, tmp_path):
    """``fn(rank, store_path)`` in ``nprocs`` fresh processes, forked from a server that imported this module
    (torch and longattn) once: half the wall time of ``mp.spawn``, which imports them in every process."""
    mp.set_forkserver_preload(["tests.test_distributed"])
    mp.start_processes(fn, args=(str(tmp_path / "store"),), nprocs=nprocs, join=True, start_method="forkserver")


def _tglobal_layer(mod, q, k, v, gm, mask, sp):
    """Longformer + TGlobal through ``mod`` (longattn or longattn.distributed), summed: one graph for compile."""
    kw = {} if sp is None else dict(seq_parallel=sp)
    o1 = mod.longformer_attention(q, k, v, (3, 0), gm, key_padding_mask=mask, max_globals=4, backend="torch", **kw)
    ids, bm = mod.tglobal_block_ids(mask, 3, **kw)
    extra = {} if sp is None else dict(block_size=3)
    agg = mod.block_aggregate(q.flatten(2), ids, bm.shape[1], weight=torch.ones(H * D, dtype=q.dtype),
                              backend="torch", **extra, **kw)
    side = agg.view(*agg.shape[:2], H, D)
    o2 = mod.tglobal_attention(q, k, v, side, side, 2, ids, key_padding_mask=mask, side_mask=bm, backend="torch", **kw)
    return o1 + o2


def _compile_worker(rank, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=40))
    try:
        S = 20
        sh = ld.SeqShards(None, (0, 7, S))
        g = _gen(21)
        q, k, v, W = (_randn(g, 1, S, H, D) for _ in range(4))
        gm = torch.zeros(1, S, dtype=torch.bool)
        gm[0, [6, 7, 15]] = True
        mask = torch.ones(1, S, dtype=torch.bool)
        mask[0, 17:] = False
        full = dict(q=q, k=k, v=v, gm=gm, mask=mask)
        ref, ref_g = _fwd_bwd(lambda **kw: _tglobal_layer(longattn, sp=None, **kw), full, W, {})
        compiled = torch.compile(lambda **kw: _tglobal_layer(ld, sp=sh, **kw), fullgraph=True)
        a, b = sh.start, sh.stop
        out, got = _fwd_bwd(compiled, {n: x[:, a:b] for n, x in full.items()}, W[:, a:b], {})
        close("out", out, ref[:, a:b])
        for n in got:
            close(f"d{n}", got[n], ref_g[n][:, a:b])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_seq_parallel_compiles_fullgraph(tmp_path):
    """Longformer + TGlobal (ids, aggregates, attention) under torch.compile(fullgraph=True) at P = 2."""
    _start(_compile_worker, 2, tmp_path)


# --------------------------------------------------------------------------------------- single-process unit tests
@pytest.mark.parametrize("P,left,right", [(4, 3, 2), (3, 9, 0), (4, 0, 7), (1, 5, 5)])
def test_halo_plan_sends_what_each_rank_receives(P, left, right):
    bounds = (0, 1, 4, 6, 14)[: P + 1] if P > 1 else (0, 14)
    plans = [halo_plan(bounds, r, left, right) for r in range(P)]
    for r in range(P):
        for p in range(P):
            assert plans[r][0][p] == plans[p][2][r]  # r sends p exactly what p expects from r
        S, a, b = bounds[-1], bounds[r], bounds[r + 1]
        assert (plans[r][3], plans[r][4]) == (min(left, a), min(right, S - b))
        assert sum(plans[r][2]) == plans[r][3] + plans[r][4]


def test_seq_parallel_keyword_rejects_dropout_and_stray_block_size():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="dropout_p"):
        longattn.longformer_attention(q, q, q, 2, q[..., 0, 0] > 0, dropout_p=0.1, seq_parallel=object())
    with pytest.raises(ValueError, match="block_size"):
        longattn.block_aggregate(q.flatten(2), torch.zeros(1, 8, dtype=torch.int32), 1, block_size=4)
