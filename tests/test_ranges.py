"""Per-row key ranges (``key_ranges`` / ``side_ranges``, notes/ranges_contract.md): the kernel feature behind packed
variable-length batches (issue 14), on the backend functions directly, against the fp64 oracle.

Each backend that declares the feature ``"ranges"`` runs: torch always (float64, within the float64 floor of the
oracle); Triton on a GPU or under ``TRITON_INTERPRET=1`` (float32 / float16, the tolerance rule with the torch
backend in the same dtype as the baseline); CUDA on a GPU. Ranges come from random ``cu_seqlens`` (sequences of
length 1, shorter than the window, not tile multiples, several per batch), as the packed ops build them, and from
arbitrary values (non-monotone, empty, reversed, out of range) for safety.
"""

from __future__ import annotations

import dataclasses
import inspect
import os

import pytest
import torch

from longattn import _dropout, dispatch
from longattn.backends import torch_backend
from tests import reference
from tests.tolerance import assert_close_to_oracle, assert_within_rule

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
H, D = 2, 16
BAND_GRADS = ("dq", "dk", "dv", "dside_k", "dside_v", "dband_bias", "dside_bias")


def _takes_ranges(name: str, device: str, dtype: torch.dtype, dim: int) -> bool:
    """The backend declares the feature (for this dtype and head dim) and its band functions take the keywords."""
    module = dispatch.get_backend(name)
    if dispatch.unsupported_reasons(name, torch.device(device), dtype, dim, "band_side", ("ranges",)):
        return False
    return all("key_ranges" in inspect.signature(f).parameters
               for f in (module.band_side_forward, module.band_side_backward))


def _backend_params():
    triton_device = "cpu" if INTERPRET else "cuda"
    triton_runs = INTERPRET or torch.cuda.is_available()
    return [
        pytest.param("torch", "cpu", torch.float64, D, id="torch-fp64"),
        *(pytest.param("triton", triton_device, dtype, D, id=f"triton-{tag}",
                       marks=pytest.mark.skipif(not (triton_runs and _takes_ranges("triton", triton_device, dtype, D)),
                                                reason="Triton needs a GPU or TRITON_INTERPRET=1, and a backend "
                                                "that accepts the feature 'ranges'"))
          for dtype, tag in ((torch.float32, "fp32"), (torch.float16, "fp16"))),
        # the CUDA kernels take head dims 32, 64, 128 only
        pytest.param("cuda", "cuda", torch.float16, 32, id="cuda-fp16",
                     marks=[pytest.mark.gpu, pytest.mark.skipif(
                         not (torch.cuda.is_available() and _takes_ranges("cuda", "cuda", torch.float16, 32)),
                         reason="needs a CUDA GPU and a CUDA backend that accepts the feature 'ranges'")]),
    ]


BACKENDS = _backend_params()


# --------------------------------------------------------------------------------------------------------
# packed layouts: ranges from cu_seqlens, as the varlen API builds them
# --------------------------------------------------------------------------------------------------------


def _cumulative(lengths) -> list[int]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def _ranges_of(cu, counts=None) -> torch.Tensor:
    """(1, total, 2) int32: each token of sequence s gets ``[cu[s], cu[s + 1])``; with ``counts`` (tokens per
    sequence, default the lengths of ``cu``) the range repeats per token of the sequence."""
    counts = [b - a for a, b in zip(cu, cu[1:])] if counts is None else counts
    rows = [[cu[s], cu[s + 1]] for s, n in enumerate(counts) for _ in range(n)]
    return torch.tensor(rows, dtype=torch.int32).reshape(1, -1, 2)


def _random_lengths(gen, total_max, longest):
    """Random sequence lengths (a 1 among them), summing to at most ``total_max``."""
    lengths = [1]
    while True:
        n = int(torch.randint(1, longest + 1, (1,), generator=gen))
        if sum(lengths) + n > total_max:
            return lengths
        lengths.append(n)


@dataclasses.dataclass
class BandCase:
    """One band + side call (float64 leaves, cast per backend)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    side_k: torch.Tensor
    side_v: torch.Tensor
    window: tuple[int, int]
    key_ranges: torch.Tensor | None
    side_ranges: torch.Tensor | None = None
    query_block: torch.Tensor | None = None
    band_bias: torch.Tensor | None = None
    side_bias: torch.Tensor | None = None
    band_key_mask: torch.Tensor | None = None
    side_mask: torch.Tensor | None = None

    def floats(self):
        return (self.q, self.k, self.v, self.side_k, self.side_v, self.band_bias, self.side_bias)

    def on(self, dtype, device):
        """A copy with floats in ``dtype`` (biases float32 off float64) and every tensor on ``device``."""
        def conv(x, name):
            if x is None:
                return None
            x = x.to(device)
            if x.is_floating_point():
                bias = name.endswith("bias") and dtype != torch.float64
                x = x.to(torch.float32 if bias else dtype)
            return x
        return dataclasses.replace(self, **{f.name: conv(getattr(self, f.name), f.name)
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def local_case(seed, S_max=80, window=(9, 6), kv_heads=H, D=D):
    """Packed local attention: sequences of length 1, shorter than the window, odd lengths; band bias."""
    gen = torch.Generator().manual_seed(seed)
    cu = _cumulative(_random_lengths(gen, S_max, 2 * sum(window)))
    S = cu[-1]
    q, k, v = _rand(gen, 1, S, H, D), _rand(gen, 1, S, kv_heads, D), _rand(gen, 1, S, kv_heads, D)
    empty = q.new_zeros(1, 0, kv_heads, D)
    return BandCase(q, k, v, empty, empty, window, _ranges_of(cu), band_bias=_rand(gen, H, sum(window) + 1))


def tglobal_case(seed, S_max=80, window=(5, 5), block=4, with_bias=True, D=D):
    """Packed TGlobal: each sequence's side keys (one per ``block`` tokens) concatenated, ``side_ranges`` its
    blocks, ``query_block`` in the concatenated numbering, side and band bias."""
    gen = torch.Generator().manual_seed(seed)
    lengths = _random_lengths(gen, S_max, 23)
    cu = _cumulative(lengths)
    cu_blocks = _cumulative([-(-n // block) for n in lengths])
    S, G = cu[-1], cu_blocks[-1]
    q, k, v = (_rand(gen, 1, S, H, D) for _ in range(3))
    side_k, side_v = _rand(gen, 1, G, H, D), _rand(gen, 1, G, H, D)
    query_block = torch.tensor([cu_blocks[s] + t // block for s, n in enumerate(lengths) for t in range(n)],
                               dtype=torch.int32)[None]
    return BandCase(q, k, v, side_k, side_v, window, _ranges_of(cu), _ranges_of(cu_blocks, lengths), query_block,
                    _rand(gen, H, sum(window) + 1) if with_bias else None,
                    _rand(gen, H, 2 * G + 1) if with_bias else None), cu, cu_blocks


def arbitrary_case(seed, S=45, G=6, window=(7, 4), D=D):
    """Any values: non-monotone, empty, reversed, out-of-range and extreme ranges, with padding masks, two batch
    rows and out-of-range block ids."""
    gen = torch.Generator().manual_seed(seed)
    B = 2
    q, k, v = (_rand(gen, B, S, H, D) for _ in range(3))
    side_k, side_v = _rand(gen, B, G, H, D), _rand(gen, B, G, H, D)
    key_ranges = torch.randint(-4, S + 5, (B, S, 2), generator=gen, dtype=torch.int32)
    side_ranges = torch.randint(-3, G + 4, (B, S, 2), generator=gen, dtype=torch.int32)
    extreme = torch.iinfo(torch.int32)
    key_ranges[0, :4] = torch.tensor([[extreme.min, extreme.max], [extreme.max, extreme.min], [5, 5], [S, S + 3]])
    side_ranges[0, :4] = torch.tensor([[extreme.min, extreme.max], [extreme.max, extreme.min], [2, 2], [G, 2 * G]])
    # rows 4, 5 see nothing at all (no band key and no side key): out = 0, lse = +inf
    key_ranges[1, 4:6], side_ranges[1, 4:6] = torch.tensor([3, 1]), torch.tensor([0, 0])
    band_key_mask = torch.rand(B, S, generator=gen) > 0.2
    side_mask = torch.rand(B, G, generator=gen) > 0.3
    query_block = torch.randint(-3, G + 3, (B, S), generator=gen, dtype=torch.int32)
    return BandCase(q, k, v, side_k, side_v, window, key_ranges, side_ranges, query_block,
                    _rand(gen, H, sum(window) + 1), _rand(gen, H, 2 * G + 1), band_key_mask, side_mask)


# --------------------------------------------------------------------------------------------------------
# runners: the backend functions, and the oracle's output and gradients for the same cotangent
# --------------------------------------------------------------------------------------------------------


def _cotangent(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_band(name, case: BandCase, dtype, device, *, ranges=True, **drop):
    """-> (out, lse, grads) of the backend's band_side_forward / backward (grads as BAND_GRADS)."""
    module = dispatch.get_backend(name)
    c = case.on(dtype, device)
    scale = c.q.shape[-1] ** -0.5
    extra = dict(key_ranges=c.key_ranges, side_ranges=c.side_ranges) if ranges else {}
    extra = {key: x for key, x in extra.items() if x is not None}
    common = (c.band_key_mask, c.side_mask, c.query_block, c.band_bias, c.side_bias, *c.window, scale)
    out, lse = module.band_side_forward(c.q, c.k, c.v, c.side_k, c.side_v, *common, **drop, **extra)
    dout = _cotangent(out.shape).to(device, dtype)
    grads = module.band_side_backward(dout, c.q, c.k, c.v, c.side_k, c.side_v, out, lse, *common, **drop, **extra)
    return out, lse, grads


def oracle_band(case: BandCase, keep=None, dropout_p=0.0):
    """-> (out, grads) in float64, grads as BAND_GRADS (zeros for absent tables, like the backends' empties)."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in case.floats()]
    q, k, v, side_k, side_v, band_bias, side_bias = leaves
    out = reference.band_side_attention(q, k, v, side_k, side_v, case.window, band_key_mask=case.band_key_mask,
                                        side_mask=case.side_mask, query_block=case.query_block, band_bias=band_bias,
                                        side_bias=side_bias, scale=q.shape[-1] ** -0.5, keep=keep, dropout_p=dropout_p,
                                        key_ranges=case.key_ranges, side_ranges=case.side_ranges)
    present = [x for x in leaves if x is not None]
    got = iter(torch.autograd.grad(out, present, _cotangent(out.shape), allow_unused=True))
    grads = []
    for x in leaves:
        g = None if x is None else next(got)
        grads.append(torch.zeros(0, dtype=torch.float64) if x is None else torch.zeros_like(x) if g is None else g)
    return out, grads


def check_band(name, case, dtype, device):
    """Output and every gradient of ``name`` vs the oracle: the float64 floor for torch in float64, else the rule
    against the torch backend in ``dtype``."""
    ref, ref_grads = oracle_band(case)
    out, lse, grads = run_band(name, case, dtype, device)
    assert out.shape == case.q.shape and out.dtype == dtype and torch.isfinite(out).all()
    if name == "torch" and dtype == torch.float64:
        assert_close_to_oracle("out", out, ref)
        for gname, g, r in zip(BAND_GRADS, grads, ref_grads):
            assert_close_to_oracle(gname, g, r, scale=10.0)
        return out, lse, grads
    base_out, _, base_grads = run_band("torch", case, dtype, "cpu")
    assert_within_rule("out", out.cpu(), base_out, ref)
    for gname, g, b, r in zip(BAND_GRADS, grads, base_grads, ref_grads):
        if r.numel():
            assert torch.isfinite(g).all(), f"{name}: non-finite {gname}"
            assert_within_rule(gname, g.cpu(), b, r, grad=True)
    return out, lse, grads


# --------------------------------------------------------------------------------------------------------
# the band + side primitive
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,device,dtype,dim", BACKENDS)
def test_packed_local_matches_oracle(name, device, dtype, dim, seed):
    check_band(name, local_case(seed, D=dim), dtype, device)


@pytest.mark.parametrize("name,device,dtype,dim", BACKENDS)
def test_packed_causal_local_matches_oracle(name, device, dtype, dim):
    check_band(name, local_case(5, window=(12, 0), D=dim), dtype, device)


@pytest.mark.parametrize("name,device,dtype,dim", BACKENDS)
def test_packed_local_grouped_kv_matches_oracle(name, device, dtype, dim):
    if dispatch.unsupported_reasons(name, torch.device(device), dtype, dim, "band_side", ("grouped_kv", "ranges")):
        pytest.skip(f"{name} declines grouped_kv")
    check_band(name, local_case(6, kv_heads=1, D=dim), dtype, device)


@pytest.mark.parametrize("name,device,dtype,dim", BACKENDS)
def test_packed_tglobal_matches_oracle(name, device, dtype, dim):
    check_band(name, tglobal_case(2, D=dim)[0], dtype, device)


@pytest.mark.parametrize("name,device,dtype,dim", BACKENDS)
def test_arbitrary_ranges_are_safe(name, device, dtype, dim):
    case = arbitrary_case(3, D=dim)
    out, lse, grads = check_band(name, case, dtype, device)
    # rows that see no key: out = 0, lse = +inf, no gradient into q
    assert torch.equal(out[1, 4:6].cpu(), torch.zeros_like(out[1, 4:6].cpu()))
    assert torch.isinf(lse[1, :, 4:6]).all() and (lse[1, :, 4:6] > 0).all()
    assert torch.equal(grads[0][1, 4:6].cpu(), torch.zeros_like(grads[0][1, 4:6].cpu()))


def test_packed_equals_each_sequence_alone():
    """The contract's use: packed TGlobal (concatenated side keys, one shared side-bias table read at the same
    in-sequence block offsets) equals the padded primitive run on each sequence alone (torch, float64)."""
    case, cu, cu_blocks = tglobal_case(4, S_max=150)
    out, _, (dq, dk, dv, dsk, dsv, dbb, dsb) = run_band("torch", case, torch.float64, "cpu")
    dout = _cotangent(out.shape)
    G = case.side_k.shape[1]
    dbb_sum, dsb_sum = torch.zeros_like(dbb), torch.zeros_like(dsb)
    for s in range(len(cu) - 1):
        t, g = slice(cu[s], cu[s + 1]), slice(cu_blocks[s], cu_blocks[s + 1])
        n = cu_blocks[s + 1] - cu_blocks[s]
        args = (case.q[:, t], case.k[:, t], case.v[:, t], case.side_k[:, g], case.side_v[:, g], None, None,
                case.query_block[:, t] - cu_blocks[s], case.band_bias, case.side_bias[:, G - n : G + n + 1],
                *case.window, D**-0.5)
        o, lse = torch_backend.band_side_forward(*args)
        grads = torch_backend.band_side_backward(dout[:, t], *args[:5], o, lse, *args[5:])
        torch.testing.assert_close(out[:, t], o, rtol=0, atol=1e-12)
        for packed, alone in zip((dq[:, t], dk[:, t], dv[:, t], dsk[:, g], dsv[:, g]), grads[:5]):
            torch.testing.assert_close(packed, alone, rtol=0, atol=1e-12)
        dbb_sum += grads[5]
        dsb_sum[:, G - n : G + n + 1] += grads[6]
    torch.testing.assert_close(dbb, dbb_sum, rtol=0, atol=1e-11)
    torch.testing.assert_close(dsb, dsb_sum, rtol=0, atol=1e-11)


def test_torch_many_chunks_and_dropout_match_oracle():
    """Several query chunks (each computing only its rows' side keys) and dropout: the keep bits are those of the
    same (row, key) counters as without ranges."""
    case = tglobal_case(6, S_max=200, window=(20, 20))[0]
    S, G = case.q.shape[1], case.side_k.shape[1]
    assert S > 2 * torch_backend._chunk_rows(1, H, S, 41, G)
    check_band("torch", case, torch.float64, "cpu")
    p, rng = 0.25, torch.tensor([1234, 8], dtype=torch.int64)
    keep = _dropout.dense_keep_mask(rng, p, 1, H, S, G)
    ref, ref_grads = oracle_band(case, keep, p)
    out, _, grads = run_band("torch", case, torch.float64, "cpu", dropout_p=p, rng=rng)
    assert_close_to_oracle("out", out, ref)
    for gname, g, r in zip(BAND_GRADS, grads, ref_grads):
        assert_close_to_oracle(gname, g, r, scale=10.0)


def test_range_bounds_of_monotone_ranges():
    """The fast path's plan: a chunk computes only the keys its rows' ranges reach (``lo .. hi``), and needs no
    range mask on the keys every row sees (``lo_max .. hi_min``)."""
    case = tglobal_case(6, S_max=300)[0]
    S, G = case.q.shape[1], case.side_k.shape[1]
    rows = 64
    bounds = torch_backend._range_bounds(case.side_ranges, G, rows, S)
    assert len(bounds) == -(-S // rows)
    for c, got in enumerate(bounds):
        r = case.side_ranges[0, c * rows : (c + 1) * rows].long()
        assert got == (r[:, 0].min(), r[:, 1].max(), r[:, 0].max(), r[:, 1].min())
    assert bounds[0][1] < G and bounds[-1][0] > 0  # the first and last chunks skip most side keys
    # one sequence per chunk: every row sees the whole span
    one = torch_backend._range_bounds(torch.tensor([[[0, 3]] * 4 + [[3, 9]] * 4], dtype=torch.int32), 9, 4, 8)
    assert one == [(0, 3, 0, 3), (3, 9, 3, 9)]
    # dead rows only (reversed, empty, clamped to empty): nothing to compute
    empty = torch.tensor([[[3, 1], [5, 5], [-4, 0], [G, G + 9]]], dtype=torch.int32)
    assert [b[:2] for b in torch_backend._range_bounds(empty, G, 2, 4)] == [(G, 0), (G, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_full_ranges_are_bitwise_no_ranges(dtype):
    """Ranges [0, S) for every row (side ranges too) change nothing, to the bit (several chunks, dropout)."""
    case = tglobal_case(7, S_max=200, window=(9, 3))[0]
    S = case.q.shape[1]
    case.key_ranges = torch.tensor([0, S], dtype=torch.int32).expand(1, S, 2).contiguous()
    case.side_ranges = case.key_ranges.clone()
    drop = dict(dropout_p=0.2, rng=torch.tensor([7, 0], dtype=torch.int64))
    for extra in ({}, drop):
        with_ranges = run_band("torch", case, dtype, "cpu", **extra)
        without = run_band("torch", case, dtype, "cpu", ranges=False, **extra)
        for a, b in zip((with_ranges[0], with_ranges[1], *with_ranges[2]), (without[0], without[1], *without[2])):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------
# Longformer's global rows: per-slot key ranges
# --------------------------------------------------------------------------------------------------------


def _rows_case(seed, cu, pos, used, D=D):
    """Packed sequences ``cu`` with their global tokens in slots ``pos`` (in sequence order), each slot ranging
    over its sequence; slot 3 gets a reversed range (sees nothing) and token 50 is padding."""
    gen = torch.Generator().manual_seed(seed)
    S = cu[-1]
    q, k, v = (_rand(gen, 1, S, H, D) for _ in range(3))
    seq = [max(s for s in range(len(cu) - 1) if cu[s] <= p) for p in pos]
    key_ranges = torch.tensor([[[cu[s], cu[s + 1]] for s in seq]], dtype=torch.int32)
    key_ranges[0, 3] = torch.tensor([41, 2])
    key_mask = torch.ones(1, S, dtype=torch.bool)
    key_mask[0, 50] = False
    return q, k, v, torch.tensor([pos]), torch.tensor([used]), key_mask, key_ranges


ROWS_SMALL = dict(cu=[0, 1, 13, 40, 57], pos=[0, 5, 12, 20, 44, 30], used=[True] * 5 + [False])
# several key chunks of the torch pass (256 keys), each computed by its own sequences' slots only
ROWS_LONG = dict(cu=[0, 1, 150, 151, 420, 700], pos=[0, 3, 100, 150, 200, 300, 500, 699, 7],
                 used=[True] * 8 + [False])


def run_rows(name, case, dtype, device, **drop):
    """-> (out rows (B, G, H, D), glse, (dq, dk, dv)) of the backend's global_rows_forward / backward, on the CPU."""
    q, k, v, pos, used, key_mask, key_ranges = case
    module, D = dispatch.get_backend(name), q.shape[-1]
    qd, kd, vd, dout = (x.to(device, dtype) for x in (q, k, v, _cotangent(q.shape)))
    idx, u, km, kr = (x.to(device) for x in (pos, used, key_mask, key_ranges))
    out = torch.zeros_like(qd)
    glse = module.global_rows_forward(qd, kd, vd, idx, u, km, D**-0.5, out, key_ranges=kr, **drop)
    grads = module.global_rows_backward(dout, qd, kd, vd, out, glse, idx, u, km, D**-0.5, None, None, None,
                                        key_ranges=kr, **drop)
    rows = torch.gather(out, 1, idx[:, :, None, None].expand(-1, -1, H, D))
    return rows.cpu() * used[:, :, None, None], glse.cpu(), [g.cpu() for g in grads]


def oracle_rows(case, keep=None, dropout_p=0.0):
    q, k, v, pos, used, key_mask, key_ranges = case
    D = q.shape[-1]
    index = pos[:, :, None, None].expand(-1, -1, H, D)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    rows = reference.global_rows_attention(torch.gather(leaves[0], 1, index), leaves[1], leaves[2],
                                           key_mask=key_mask, key_ranges=key_ranges, scale=D**-0.5, keep=keep,
                                           dropout_p=dropout_p) * used[:, :, None, None]
    dout_rows = torch.gather(_cotangent(q.shape), 1, index)  # unused slots: no output, no gradient
    return rows, torch.autograd.grad(rows, leaves, dout_rows)


@pytest.mark.parametrize("name,device,dtype,dim", BACKENDS)
def test_global_rows_per_slot_ranges_match_oracle(name, device, dtype, dim):
    case = _rows_case(8, **ROWS_SMALL, D=dim)
    ref_rows, ref_grads = oracle_rows(case)
    out_rows, glse, grads = run_rows(name, case, dtype, device)
    assert torch.isinf(glse[0, :, 3]).all() and torch.isinf(glse[0, :, 5]).all()  # empty range, unused slot
    assert torch.equal(out_rows[0, 3], torch.zeros_like(out_rows[0, 3]))
    if name == "torch" and dtype == torch.float64:
        assert_close_to_oracle("out", out_rows, ref_rows)
        for gname, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_close_to_oracle(gname, g, r, scale=10.0)
        return
    base_rows, _, base_grads = run_rows("torch", case, dtype, "cpu")
    assert_within_rule("out", out_rows, base_rows, ref_rows)
    for gname, g, b, r in zip(("dq", "dk", "dv"), grads, base_grads, ref_grads):
        assert_within_rule(gname, g, b, r, grad=True)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_global_rows_many_key_chunks_match_oracle(p):
    """Key chunks computed by a subset of the slots (``_row_plan``), with and without dropout (global-row
    counters: slot, key)."""
    case = _rows_case(9, **ROWS_LONG)
    q, pos, key_ranges = case[0], case[3], case[6]
    plan = torch_backend._row_plan(1, H, pos.shape[1], q.shape[1], key_ranges)
    assert len(plan) > 1 and any(s1 - s0 < pos.shape[1] for _, _, s0, s1 in plan)
    rng = torch.tensor([99, 4], dtype=torch.int64)
    keep = _dropout.global_rows_keep_mask(rng, p, 1, H, pos.shape[1], q.shape[1]) if p else None
    ref_rows, ref_grads = oracle_rows(case, keep, p)
    out_rows, _, grads = run_rows("torch", case, torch.float64, "cpu", **(dict(dropout_p=p, rng=rng) if p else {}))
    assert_close_to_oracle("out", out_rows, ref_rows)
    for gname, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close_to_oracle(gname, g, r, scale=10.0)
