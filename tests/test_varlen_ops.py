"""The packed variable-length ops (``longattn.*_varlen``, issue 14) against each sequence computed alone.

Every packed op must equal its op applied to each sequence by itself (no padding): outputs and every gradient. The
per-sequence reference is the independent float64 dense oracle (``tests/reference.py``, explicit masks), never a
backend. The torch backend in float64 must agree with it to rounding (1e-10); Triton (a GPU, or the interpreter on
CPU) is held to the tolerance rule with the torch backend's packed run in the same dtype as the baseline.
Sequence sets cover length 1, lengths below the window and the block size,
lengths that are no tile multiple, zero-length sequences, globals at sequence edges and many sequences.
"""

from __future__ import annotations

import os

import pytest
import torch

import longattn
from longattn import dispatch
from longattn.varlen import cu_from_seqlens
from longattn.varlen_api import token_ranges
from tests import reference
from tests.conftest import TRITON_DEVICE, needs_triton
from tests.tolerance import FLOORS, assert_within_rule

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
H, D = 2, 16
LENGTH_SETS = {
    "mixed": [5, 1, 17, 9],
    "zero_length": [6, 0, 11, 0],
    "many_short": [3, 2, 7, 1, 4, 6, 2, 5],
    "one_long": [37],
}


def _triton_runs() -> bool:
    device = "cpu" if INTERPRET else "cuda"
    if not (INTERPRET or torch.cuda.is_available()):
        return False
    return not dispatch.unsupported_reasons("triton", torch.device(device), torch.float32, D, "band_side", ("ranges",))


BACKENDS = [
    pytest.param("torch", torch.float64, id="torch-fp64"),
    pytest.param("triton", torch.float32, id="triton-fp32",
                 marks=pytest.mark.skipif(not _triton_runs(), reason="Triton needs a GPU or TRITON_INTERPRET=1 and "
                                          "the feature 'ranges'")),
]


def _device(backend):
    return "cuda" if backend == "triton" and not INTERPRET else "cpu"


def _segments(lengths):
    cu = cu_from_seqlens(lengths).tolist()
    return list(zip(cu[:-1], cu[1:]))


def _leaves(gen, dtype, device, *shapes):
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
            for s in shapes]


def _grads(out, leaves, seed=7):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, leaves, g.to(out), allow_unused=True)


def _compare(backend, dtype, packed_fn, per_sequence_fn, leaves64):
    """``packed_fn(leaves, backend)`` vs the concatenation of ``per_sequence_fn(leaves)`` (the fp64 oracle)."""
    want = per_sequence_fn(leaves64)
    want_grads = _grads(want, leaves64)
    device = _device(backend)
    cast = [x.detach().to(device=device, dtype=dtype if x.is_floating_point() else x.dtype).requires_grad_()
            for x in leaves64]
    got = packed_fn(cast, backend)
    got_grads = _grads(got, cast)
    if dtype == torch.float64:
        assert (got - want).abs().max().item() <= FLOORS[torch.float64]
        for name, a, b in zip(range(len(cast)), got_grads, want_grads):
            assert (a - b).abs().max().item() <= FLOORS[torch.float64], f"gradient of input {name}"
        return
    base_leaves = [x.detach().cpu().to(dtype).requires_grad_() for x in leaves64]
    base = packed_fn(base_leaves, "torch")
    base_grads = _grads(base, base_leaves)
    assert_within_rule("out", got.cpu(), base, want)
    for i, (a, b, c) in enumerate(zip(got_grads, base_grads, want_grads)):
        assert_within_rule(f"grad {i}", a.cpu(), b, c, grad=True)


@pytest.mark.parametrize("backend, dtype", BACKENDS)
@pytest.mark.parametrize("lengths", list(LENGTH_SETS.values()), ids=list(LENGTH_SETS))
@pytest.mark.parametrize("window", [(3, 3), (4, 0), (40, 2)], ids=["w3", "causal4", "wide"])
def test_local_varlen_equals_each_sequence_alone(backend, dtype, lengths, window):
    T, seg = sum(lengths), _segments(lengths)
    gen = torch.Generator().manual_seed(len(lengths))
    leaves = _leaves(gen, torch.float64, "cpu", (T, H, D), (T, 1, D), (T, 1, D), (H, sum(window) + 1))
    cu = cu_from_seqlens(lengths)

    def packed(x, be):
        q, k, v, bias = x
        return longattn.local_attention_varlen(q, k, v, cu.to(q.device), max(lengths), window, rel_bias=bias,
                                               backend=be)

    def alone(x):
        q, k, v, bias = x
        return torch.cat([reference.band_side_attention(q[a:b][None], k[a:b][None], v[a:b][None], window=window,
                                                        band_bias=bias)[0] if b > a else q[a:b]
                          for a, b in seg])

    _compare(backend, dtype, packed, alone, leaves)


@pytest.mark.parametrize("backend, dtype", BACKENDS)
@pytest.mark.parametrize("lengths, globals_", [
    ([5, 1, 17, 9], [0, 5, 6, 21, 30]),          # first token, a length-1 sequence, the last token, middle
    ([6, 0, 11, 0], []),                          # no global at all
    ([3, 2, 7, 1, 4, 6, 2, 5], list(range(30))),  # every token global
    ([37], [0, 1, 2, 18, 36]),
], ids=["edges", "none", "all", "one_long"])
def test_longformer_varlen_equals_each_sequence_alone(backend, dtype, lengths, globals_):
    T, seg = sum(lengths), _segments(lengths)
    gen = torch.Generator().manual_seed(T)
    leaves = _leaves(gen, torch.float64, "cpu", *((T, H, D),) * 6)
    is_global = torch.zeros(T, dtype=torch.bool)
    is_global[[g for g in globals_ if g < T]] = True
    cu = cu_from_seqlens(lengths)

    def packed(x, be):
        q, k, v, qg, kg, vg = x
        return longattn.longformer_attention_varlen(q, k, v, cu.to(q.device), max(lengths), 3,
                                                    is_global.to(q.device), q_global=qg, k_global=kg, v_global=vg,
                                                    max_globals=len(globals_), backend=be)

    def alone(x):
        q, k, v, qg, kg, vg = x
        return torch.cat([reference.longformer_attention(
            q[a:b][None], k[a:b][None], v[a:b][None], 3, is_global[a:b][None], q_global=qg[a:b][None],
            k_global=kg[a:b][None], v_global=vg[a:b][None])[0] if b > a else q[a:b]
            for a, b in seg])

    _compare(backend, dtype, packed, alone, leaves)


@pytest.mark.parametrize("backend, dtype", BACKENDS)
@pytest.mark.parametrize("lengths", [[5, 1, 17, 9], [13, 3, 8], [37]], ids=["mixed", "orphans", "one_long"])
def test_tglobal_varlen_equals_each_sequence_alone(backend, dtype, lengths):
    """Blocks, side keys and both biases per sequence, side keys concatenated (block size 4: sequences with no
    full block, orphans joining the last block)."""
    T, seg, bs, r = sum(lengths), _segments(lengths), 4, 2
    cu = cu_from_seqlens(lengths)
    block_ids, block_mask, cu_blocks = longattn.tglobal_block_ids_varlen(cu, T, bs)
    G = block_mask.shape[0]
    gen = torch.Generator().manual_seed(T)
    leaves = _leaves(gen, torch.float64, "cpu", (T, H, D), (T, H, D), (T, H, D), (G, H, D), (G, H, D),
                     (H, 2 * r + 1), (H, 2 * G + 1))

    def packed(x, be):
        q, k, v, sk, sv, rb, sb = x
        dev = q.device
        return longattn.tglobal_attention_varlen(q, k, v, sk, sv, cu.to(dev), max(lengths), r, block_ids.to(dev),
                                                 cu_blocks.to(dev), side_mask=block_mask.to(dev), rel_bias=rb,
                                                 side_bias=sb, backend=be)

    def alone(x):
        q, k, v, sk, sv, rb, sb = x
        outs = []
        for s, (a, b) in enumerate(seg):
            ids, mask = longattn.tglobal_block_ids(torch.ones(1, b - a, dtype=torch.bool), bs)
            g0, g1 = cu_blocks[s].item(), cu_blocks[s + 1].item()
            Gs = g1 - g0
            outs.append(reference.band_side_attention(
                q[a:b][None], k[a:b][None], v[a:b][None], sk[g0:g1][None], sv[g0:g1][None], (r, r), side_mask=mask,
                query_block=ids, band_bias=rb, side_bias=sb[:, G - Gs: G + Gs + 1], scale=1.0)[0])
        return torch.cat(outs)

    _compare(backend, dtype, packed, alone, leaves)


@pytest.mark.parametrize("lengths", [[5, 1, 17, 9], [0, 4, 0, 12, 3], [3], [8, 8]])
def test_block_ids_and_aggregate_varlen_match_each_sequence(lengths):
    T, bs = sum(lengths), 4
    cu = cu_from_seqlens(lengths)
    ids, mask, cu_blocks = longattn.tglobal_block_ids_varlen(cu, T, bs)
    assert ids.dtype == torch.int32 and ids.shape == (T,) and mask.shape == (T // bs,)
    expect, offset = [], 0
    for n in lengths:
        if n == 0:
            continue
        own, _ = longattn.tglobal_block_ids(torch.ones(1, n, dtype=torch.bool), bs)
        expect += [i + offset if i >= 0 else -1 for i in own[0].tolist()]
        offset += n // bs
    assert ids.tolist() == expect
    assert cu_blocks.tolist() == [0, *torch.tensor([n // bs for n in lengths]).cumsum(0).tolist()]
    assert mask.tolist() == [g < offset for g in range(T // bs)]
    x = torch.randn(T, 6, dtype=torch.float64)
    w = torch.randn(6, dtype=torch.float64)
    got = longattn.block_aggregate_varlen(x, ids, T // bs, weight=w)
    want = longattn.block_aggregate(x[None], ids[None], T // bs, weight=w)[0]
    assert torch.equal(got, want)


def test_token_ranges_are_each_tokens_sequence_bounds():
    lengths = [2, 0, 3, 1]
    ranges = token_ranges(cu_from_seqlens(lengths), 6)
    assert ranges.dtype == torch.int32 and ranges.shape == (1, 6, 2)
    assert ranges[0].tolist() == [[0, 2], [0, 2], [2, 5], [2, 5], [2, 5], [5, 6]]


def test_token_ranges_tolerate_a_wrong_cu_seqlens():
    """Tokens past cu_seqlens[-1] (a wrong cu_seqlens, outside debug mode) take the last sequence: in range."""
    ranges = token_ranges(torch.tensor([0, 2, 4], dtype=torch.int32), 7)
    assert ranges[0].tolist() == [[0, 2], [0, 2], [2, 4], [2, 4], [2, 4], [2, 4], [2, 4]]


def _packed_calls(T=17, lengths=(5, 12), backend="torch", dtype=torch.float64, device="cpu"):
    """(call(cu, cu_blocks), leaves) of the local and TGlobal packed ops on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, H, D, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
               for _ in range(3))
    cu = cu_from_seqlens(list(lengths)).to(device)
    block_ids, block_mask, cu_blocks = longattn.tglobal_block_ids_varlen(cu, T, 4)
    G = block_mask.shape[0]
    sk, sv = (torch.randn(G, H, D, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(2))

    def local(cu, cu_blocks):
        return longattn.local_attention_varlen(q, k, v, cu, max(lengths), 3, backend=backend)

    def tglobal(cu, cu_blocks):
        return longattn.tglobal_attention_varlen(q, k, v, sk, sv, cu, max(lengths), 2, block_ids, cu_blocks,
                                                 side_mask=block_mask, backend=backend)

    return {"local": local, "tglobal": tglobal}, cu, cu_blocks, (q, k, v)


@pytest.mark.parametrize("name", ["local", "tglobal"])
def test_packed_ops_reuse_the_last_ranges(name):
    """Issue 12 target 2 for the packed ops: a call with the cu_seqlens (and cu_blocks) tensors of the previous call,
    unmodified, dispatches its kernel op alone (the ranges are kept); its backward is the backward op alone (the
    result is a view of the padded op's, not a select with a zero-filled gradient). A modified or another tensor gets
    fresh ranges: the results always equal a fresh computation."""
    from tests.test_host_sync import OpLog

    calls, cu, cu_blocks, leaves = _packed_calls()
    call = calls[name]
    first = call(cu, cu_blocks)
    with OpLog() as fwd:
        again = call(cu, cu_blocks)
    assert fwd.ops == ["longattn.band_side_attention"], fwd.ops
    assert torch.equal(first, again)
    with OpLog() as bwd:
        torch.autograd.grad(again, leaves, torch.ones_like(again))
    assert bwd.ops == ["aten.ones_like", "longattn.band_side_attention_backward"], bwd.ops
    # Other lengths written into the same tensors in place: new ranges, the fresh result.
    new_cu = cu_from_seqlens([9, 8])
    new_blocks = longattn.tglobal_block_ids_varlen(new_cu, 17, 4)[2]
    cu.copy_(new_cu)
    cu_blocks.copy_(new_blocks)
    fresh = calls[name](new_cu.clone(), new_blocks.clone())
    assert torch.equal(call(cu, cu_blocks), fresh) and not torch.equal(fresh, first)
    with torch.inference_mode():  # inference tensors have no version counter: never cached
        assert torch.equal(call(new_cu.clone(), new_blocks.clone()), fresh)


def test_empty_batch_returns_empty_and_keeps_the_graph():
    q = torch.randn(0, H, D, requires_grad=True)
    cu = torch.zeros(3, dtype=torch.int32)
    out = longattn.local_attention_varlen(q, q, q, cu, 1, 3)
    assert out.shape == (0, H, D)
    out.sum().backward()
    assert q.grad.shape == q.shape


def _qkv(T=10):
    return (torch.randn(T, H, D) for _ in range(3))


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k, v, cu: longattn.local_attention_varlen(q[None], k, v, cu, 5, 2), ValueError, "q: expected a 3-D"),
    (lambda q, k, v, cu: longattn.local_attention_varlen(q, k, v, cu.long(), 5, 2), TypeError, "cu_seqlens"),
    (lambda q, k, v, cu: longattn.local_attention_varlen(q, k, v, cu[None], 5, 2), ValueError, "cu_seqlens"),
    (lambda q, k, v, cu: longattn.local_attention_varlen(q, k, v, cu, 0, 2), ValueError, "max_seqlen"),
    (lambda q, k, v, cu: longattn.local_attention_varlen(q, k[:9], v, cu, 5, 2), ValueError, "k: expected"),
    (lambda q, k, v, cu: longattn.local_attention_varlen(q, k, v, cu, 5, -1), ValueError, "window"),
    (lambda q, k, v, cu: longattn.longformer_attention_varlen(q, k, v, cu, 5, 2, torch.zeros(9, dtype=torch.bool)),
     ValueError, "global_mask"),
    (lambda q, k, v, cu: longattn.tglobal_attention_varlen(q, k, v, q[:2], k[:2], cu, 5, 2,
                                                           torch.zeros(10, dtype=torch.int32),
                                                           torch.zeros(4, dtype=torch.int32)),
     ValueError, "cu_blocks"),
])
def test_bad_input_names_the_argument(call, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        call(q, k, v, cu_from_seqlens([5, 5]))


@pytest.mark.parametrize("cu, match", [([1, 5, 10], "cu_seqlens\\[0\\] == 0"), ([0, 6, 4, 10], "non-decreasing"),
                                       ([0, 5, 9], "== total"), ([0, 2, 10], "max_seqlen")])
def test_debug_mode_checks_cu_seqlens_values(cu, match):
    q, k, v = _qkv()
    longattn.set_debug(True)
    try:
        with pytest.raises(ValueError, match=match):
            longattn.local_attention_varlen(q, k, v, torch.tensor(cu, dtype=torch.int32), 5, 2)
    finally:
        longattn.set_debug(False)


def test_wrong_cu_seqlens_out_of_debug_mode_stays_in_bounds():
    """Garbage boundaries give garbage rows, never an out-of-bounds access or NaN."""
    q, k, v = _qkv()
    for cu in ([3, 1, 50, -4], [0, 0, 0], [0, 10, 10]):
        out = longattn.local_attention_varlen(q, k, v, torch.tensor(cu, dtype=torch.int32), 5, 2, backend="torch")
        assert out.shape == q.shape and out.isfinite().all()


def test_varlen_ops_compile_without_graph_breaks():
    lengths = [5, 1, 9]
    cu = cu_from_seqlens(lengths)
    q, k, v = (x.requires_grad_() for x in _qkv(15))
    is_global = torch.zeros(15, dtype=torch.bool)
    is_global[[0, 7]] = True

    def f(q, k, v):
        a = longattn.local_attention_varlen(q, k, v, cu, 9, 2, backend="torch")
        b = longattn.longformer_attention_varlen(q, k, v, cu, 9, 2, is_global, max_globals=2, backend="torch")
        return (a + b).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    want = f(q, k, v)
    torch.testing.assert_close(got, want)
    gq, = torch.autograd.grad(got, q)
    wq, = torch.autograd.grad(want, q)
    torch.testing.assert_close(gq, wq)


@needs_triton
@pytest.mark.parametrize("name", ["local", "tglobal"])
def test_triton_packed_ops_reuse_the_last_tile_bounds(name, triton_launches):
    """The Triton kernels' per-tile range bounds (``_common.tile_bounds``) are kept with the ranges: a call with the
    previous call's cu_seqlens launches its attention kernel alone, and its backward the band backward's launches
    (at most the issue's 4), no bounds kernel; the results are those of a fresh call."""
    calls, cu, cu_blocks, leaves = _packed_calls(backend="triton", dtype=torch.float32, device=TRITON_DEVICE)
    call = calls[name]
    first = call(cu, cu_blocks)
    torch.autograd.grad(first, leaves, torch.ones_like(first))
    triton_launches.clear()
    again = call(cu, cu_blocks)
    assert triton_launches == ["_rows_kernel"], triton_launches
    triton_launches.clear()
    grads_again = torch.autograd.grad(again, leaves, torch.ones_like(again))
    assert "_tile_bounds_kernel" not in triton_launches and len(triton_launches) <= 4, triton_launches
    fresh_calls, fresh_cu, fresh_blocks, fresh_leaves = _packed_calls(backend="triton", dtype=torch.float32,
                                                                      device=TRITON_DEVICE)
    fresh = fresh_calls[name](fresh_cu.clone(), fresh_blocks.clone())
    assert torch.equal(again, fresh)
    for got, want in zip(grads_again, torch.autograd.grad(fresh, fresh_leaves, torch.ones_like(fresh))):
        assert torch.equal(got, want)


@needs_triton
def test_triton_packed_longformer_launches_at_most_two_and_four(triton_launches):
    """Issue 12 target 2 for the packed Longformer op on Triton: the forward is the slots kernel (which also writes the
    slots' ranges and their tile bounds) and the band launch; the backward reuses those ranges (the same masks and
    cu_seqlens), so it is the band backward's four launches, for the first call as for the next. The results equal
    those of fresh tensors (a recomputation of everything)."""
    T, lengths = 17, [5, 12]

    def inputs():
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(T, H, D, generator=g).to(TRITON_DEVICE).requires_grad_() for _ in range(3))
        is_global = torch.zeros(T, dtype=torch.bool, device=TRITON_DEVICE)
        is_global[[0, 7, 16]] = True
        return q, k, v, is_global, cu_from_seqlens(lengths).to(TRITON_DEVICE)

    def call(q, k, v, is_global, cu):
        return longattn.longformer_attention_varlen(q, k, v, cu, max(lengths), 2, is_global, max_globals=3,
                                                    backend="triton")

    q, k, v, is_global, cu = inputs()
    for _ in range(2):
        triton_launches.clear()
        out = call(q, k, v, is_global, cu)
        assert triton_launches == ["_slots_kernel", "_rows_kernel"], triton_launches
        triton_launches.clear()
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert len(triton_launches) <= 4 and "_slots_kernel" not in triton_launches, triton_launches
        assert "_tile_bounds_kernel" not in triton_launches, triton_launches
    from longattn.triton_kernels import slots

    again = call(q, k, v, is_global, cu)
    slots._PACKED_RANGES.entry = None  # lost (as under torch.compile): the backward's slots launch recomputes them
    triton_launches.clear()
    for got, expected in zip(torch.autograd.grad(again, (q, k, v), torch.ones_like(again)), grads):
        assert torch.equal(got, expected)
    assert triton_launches[0] == "_slots_kernel" and len(triton_launches) == 5, triton_launches
    fresh = inputs()
    want = call(*fresh)
    assert torch.equal(out, want)
    for got, expected in zip(grads, torch.autograd.grad(want, fresh[:3], torch.ones_like(want))):
        assert torch.equal(got, expected)
