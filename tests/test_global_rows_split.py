"""Split-KV global rows on a backend's band primitive (``backends._longformer.rows_via_band_side``, the CUDA path).

The slot queries attend the S keys cut into splits, each split a batch row of the primitive, merged by
log-sum-exp; the backward runs each split against the merged statistics. Run here on the torch backend's
primitive (the CUDA kernels need a GPU; ``test_gpu_kernels.py`` runs them) against the fp64 oracle
(``tests.reference.global_rows_attention``): outputs, lse and gradients, for splits that divide S and that do not,
key masks, per-slot key ranges, unused slots, a slot with no key at all.
"""

from __future__ import annotations

import pytest
import torch

from longattn.backends import _longformer
from longattn.backends import torch_backend as tb

from . import reference


def _primitive():
    def forward(*args, global_rows=False, **kw):
        return tb.band_side_forward(*args, **kw)

    def backward(*args, global_rows=False, **kw):
        return tb.band_side_backward(*args, **kw)

    return forward, backward


def _case(S, G=4, B=2, H=2, D=8, masked=True, ranges=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = rand(B, S, H, D), rand(B, S, H, D), rand(B, S, H, D)
    pos = torch.stack([torch.randperm(S, generator=g)[:G] for _ in range(B)])
    used = torch.ones(B, G, dtype=torch.bool)
    used[1, -1] = False
    key_mask = (torch.rand(B, S, generator=g) > 0.2) if masked else None
    if masked:
        key_mask[0] = False
        key_mask[0, :3] = True
    key_ranges = None
    if ranges:
        lo = torch.randint(0, S, (B, G), generator=g)
        key_ranges = torch.stack([lo, lo + torch.randint(0, S, (B, G), generator=g)], -1).to(torch.int32)
        key_ranges[0, 0] = torch.tensor([S - 1, 2])  # empty: this slot sees no key
    return q, k, v, pos, used, key_mask, key_ranges


@pytest.mark.parametrize("S, split", [(40, 8), (37, 8), (37, 5), (9, 1024), (37, None)])
@pytest.mark.parametrize("masked, ranges", [(True, False), (False, False), (True, True)])
def test_split_global_rows_match_oracle(S, split, masked, ranges, monkeypatch):
    monkeypatch.setattr(_longformer, "SPLIT_KEYS", split)
    q, k, v, pos, used, key_mask, key_ranges = _case(S, masked=masked, ranges=ranges)
    fwd, bwd = _longformer.rows_via_band_side(*_primitive())
    extra = {} if key_ranges is None else {"key_ranges": key_ranges}
    scale = 0.3
    out = torch.zeros_like(q)
    glse = fwd(q, k, v, pos, used, key_mask, scale, out, **extra)
    index = pos[:, :, None, None].expand(-1, -1, q.shape[2], q.shape[3])
    q_rows = torch.gather(q, 1, index).requires_grad_()
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    ref = reference.global_rows_attention(q_rows, kk, vv, key_mask=key_mask, key_ranges=key_ranges, scale=scale)
    got_rows = torch.gather(out, 1, index)
    torch.testing.assert_close(got_rows[used], ref[used].detach(), atol=1e-12, rtol=0)
    assert (glse[~used[:, None, :].expand_as(glse)] == torch.inf).all()

    dout = torch.randn_like(q)
    dout_rows = torch.gather(dout, 1, index) * used[:, :, None, None]
    dq, dk, dv = bwd(dout, q, k, v, out, glse, pos, used, key_mask, scale, None, None, None, **extra)
    ref_dq_rows, ref_dk, ref_dv = torch.autograd.grad(ref, (q_rows, kk, vv), dout_rows)
    torch.testing.assert_close(torch.gather(dq, 1, index)[used], ref_dq_rows[used], atol=1e-12, rtol=0)
    torch.testing.assert_close(dk, ref_dk, atol=1e-12, rtol=0)
    torch.testing.assert_close(dv, ref_dv, atol=1e-12, rtol=0)


def test_one_split_is_the_unsplit_call():
    """``S <= split_keys`` and dropout take the unsplit path: every tensor passed through unchanged."""
    sp = _longformer.KeySplits(37, 1024)
    k = torch.randn(2, 37, 2, 8)
    assert sp.C == 1 and sp.keys(k) is k and sp.rows(k) is k
    assert _longformer.KeySplits(4096, None).C == 1
    assert _longformer.KeySplits(4096, 1024).C == 4


@pytest.mark.parametrize("split", [8, 5])
def test_sequence_parallel_partials_split_like_unsplit(split, monkeypatch):
    """``longattn.distributed.longformer._partials`` (a rank's global-row partials, differentiable in out and lse):
    split keys give the unsplit result and gradients (fp64), NaN-free for a batch row with no real key."""
    from longattn.distributed import longformer as sp_longformer

    g = torch.Generator().manual_seed(3)
    B, Q, S, H, D = 2, 5, 37, 2, 8
    qg, kg, vg = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                  for shape in ((B, Q, H, D), (B, S, H, D), (B, S, H, D)))
    real = torch.rand(B, S, generator=g) > 0.3
    real[1] = False  # this rank holds no real key of row 1: lse +inf, out 0, no gradient
    w = torch.randn(B, Q, H, D + 1, generator=g, dtype=torch.float64)

    def run(split_keys):
        monkeypatch.setattr(sp_longformer, "SPLIT_KEYS", split_keys)
        parts = sp_longformer._partials(qg, kg, vg, real, 0.3, "torch")
        loss = (torch.where(parts.isfinite(), parts, 0.0) * w).sum()
        return parts, torch.autograd.grad(loss, (qg, kg, vg))

    (got, got_grads), (ref, ref_grads) = run(split), run(None)
    assert (got[1, ..., -1] == torch.inf).all() and (got[1, ..., :-1] == 0).all()
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    for a, b in zip(got_grads, ref_grads):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
