"""GPU tests of both kernel backends, ``cuda`` and ``triton``, in one place.

Every test here carries ``@pytest.mark.gpu`` (skipped with the reason when no CUDA device is visible); a
backend that cannot run a case (not built, Triton missing, a head dim the CUDA kernels lack) skips with its
own reason. The oracle is ``tests/reference.py`` in float64 (or the torch backend in float64 where the dense
oracle would be S x S), the bound the tolerance rule of ``tests/tolerance.py``.

``pytest -m "gpu and not slow"`` is the smoke set of a short GPU run. It covers every kernel of both backends:
forward and backward, fp16 and bf16, every head dim each backend takes, band-key masks, side masks, both bias
tables, side keys (TGlobal), Longformer globals, block aggregation, offsets past 2^31 elements and bitwise
determinism. Its cost on a fresh machine is mostly Triton compiles (one per kernel and specialization: dtype,
head-dim block, the optional-input flags, and which integer arguments are divisible by 16), so Triton runs a
feature-complete subset of the shape matrix (TRITON_SMOKE); the CUDA kernels are prebuilt and run all of it.
Long sequences (S >= 65536) and the rest of the Triton matrix carry ``slow``.
"""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn import dispatch
from tests import reference
from tests.conftest import check_backend_against_oracle, grads, make_case
from tests.tolerance import assert_within_rule

pytestmark = pytest.mark.gpu

KERNEL_BACKENDS = ("cuda", "triton")
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


def require(backend, dtype, head_dim, op="band_side"):
    """Skip, saying why, when `backend` cannot run `op` for this dtype / head dim on the GPU."""
    reasons = dispatch.unsupported_reasons(backend, torch.device("cuda"), dtype, head_dim, op)
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")


# --------------------------------------------------------------------------------------------------------
# The primitive (band + side keys, through tglobal_attention) against the fp64 oracle
# --------------------------------------------------------------------------------------------------------

# DESIGN.md section 4 shapes with the GPU tiles in mind (64 x 64 for CUDA; 64 x 64 / 64 x 32 for Triton):
# odd S crossing several tiles, windows wide enough for mask-free interior tiles (W >= 127), windows inside one
# tile, side keys spanning tiles, every head dim.
CASES = {
    "odd-S-side-bias-padded": dict(B=2, S=1000, H=3, D=64, window=(37, 21), G=3, bias=True, padding="tail",
                                   side_padding=True),
    "longt5-like": dict(B=2, S=1031, H=3, D=64, window=(127, 127), G=64, bias=True, padding="tail",
                        side_padding=True),
    "interior-tiles": dict(B=1, S=1531, H=2, D=64, window=(200, 150), G=2, bias=True),
    "causal": dict(B=2, S=700, H=2, D=64, window=(130, 0), G=0),
    "anti-causal-side": dict(B=1, S=333, H=2, D=32, window=(0, 70), G=4, bias=True),
    "S<window": dict(B=2, S=50, H=2, D=64, window=(256, 256), G=1, bias=True),
    "window>=S-dense": dict(B=1, S=300, H=2, D=64, window=(300, 400), G=0, bias=True),
    "window-0": dict(B=2, S=129, H=2, D=64, window=(0, 0), G=0),
    "S=1": dict(B=2, S=1, H=3, D=64, window=(2, 2), G=1, bias=True),
    "all-padding-row": dict(B=2, S=200, H=2, D=64, window=(16, 16), G=3, padding="rows", side_padding=True),
    "G=0": dict(B=2, S=257, H=2, D=128, window=(64, 64), G=0, bias=True),
    "many-side-keys": dict(B=2, S=512, H=2, D=64, window=(8, 8), G=150, bias=True, side_padding=True),
    "non-contiguous": dict(B=2, S=450, H=4, D=64, window=(60, 90), G=2, bias=True, layout="bhsd"),
    "D=16": dict(B=2, S=1031, H=3, D=16, window=(90, 17), G=8, bias=True, padding="tail", side_padding=True),
    "D=24-padded": dict(B=1, S=517, H=2, D=24, window=(40, 40), G=5, bias=True, side_padding=True),
    "D=32": dict(B=2, S=260, H=2, D=32, window=(33, 33), G=2, bias=True),
    "D=128": dict(B=1, S=400, H=2, D=128, window=(100, 27), G=70, bias=True, padding="tail"),
    "scale=1": dict(B=1, S=300, H=2, D=64, window=(127, 127), G=20, bias=True, scale=1.0),
}
# Triton's smoke subset, per dtype. Together: every head-dim block (16; 32 via D=24, padded; 64; 128), both
# dtypes, all optional inputs on (band-key mask, side mask, both bias tables, side keys over several query
# chunks) and all off (causal), each through the forward, delta, dQ, dK/dV (band and side) and bias-gradient
# kernels. Kept to six entries: each one compiles its own specializations (~5-9 s of compiling on a fast host).
TRITON_SMOKE = {
    torch.float16: ("odd-S-side-bias-padded", "D=16", "causal"),
    torch.bfloat16: ("odd-S-side-bias-padded", "D=24-padded", "D=128"),
}


def _matrix():
    params = []
    for backend in KERNEL_BACKENDS:
        for dtype_param in DTYPES:
            dtype = dtype_param.values[0]
            for name in CASES:
                slow = backend == "triton" and name not in TRITON_SMOKE[dtype]
                params.append(pytest.param(backend, dtype, name, id=f"{backend}-{dtype_param.id}-{name}",
                                           marks=[pytest.mark.slow] if slow else []))
    return params


@pytest.mark.parametrize("backend,dtype,name", _matrix())
def test_band_side_matches_oracle(backend, dtype, name):
    require(backend, dtype, CASES[name]["D"])
    check_backend_against_oracle(make_case(**CASES[name], device="cuda"), backend, dtype)


@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.slow)])
def test_fully_masked_rows_give_zero_output_and_zero_grads(backend):
    require(backend, torch.bfloat16, 64)
    case = make_case(B=2, S=300, H=2, D=64, window=(20, 20), G=0, padding="rows", device="cuda")
    _, out, got = check_backend_against_oracle(case, backend, torch.bfloat16)
    assert out[0].abs().max().item() == 0.0
    assert got[0][0].abs().max().item() == 0.0  # dq of the all-padding row


@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["longformer", "longt5"])
@pytest.mark.parametrize("S", [8192, pytest.param(65536, marks=pytest.mark.slow),
                               pytest.param(131072, marks=pytest.mark.slow)])
def test_long_sequences(S, kind, backend):
    # The dense oracle is S x S; the torch backend in float64 (itself checked against the oracle) stands in.
    require(backend, torch.bfloat16, 64)
    if kind == "longformer":
        shape = dict(B=1, S=S, H=2, D=64, window=(256, 256), G=1, bias=True, padding="tail")
    else:
        shape = dict(B=1, S=S, H=12, D=64, window=(127, 127), G=64, bias=True, padding="tail", side_padding=True)
    case = make_case(**shape, device="cuda")
    ref = case.run("torch")
    check_backend_against_oracle(case, backend, torch.bfloat16, oracle=(ref, grads(ref, case.leaves())))


# --------------------------------------------------------------------------------------------------------
# Longformer globals (global rows pass + band with the global tokens as side keys)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split_keys", [None, 128, 100])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_longformer_globals(backend, split_keys, monkeypatch):
    """``split_keys``: the CUDA path's global rows split over about that many keys instead of the default (one split
    at this S): 128 asked, 111 taken (S = 777 = 7 x 111: whole splits, views of k / v); 100 asked, no divisor of 777
    near it: 8 splits of 100, the last padded."""
    require(backend, torch.bfloat16, 64)
    if split_keys is not None and backend != "cuda":
        pytest.skip("the key splits are the CUDA path's (Triton has its own split-KV kernels)")
    if split_keys is not None:
        from longattn.backends import _longformer

        monkeypatch.setattr(_longformer, "SPLIT_KEYS", split_keys)
    B, S, H, D = 2, 777, 2, 64
    case = make_case(B=B, S=S, H=H, D=D, G=0, device="cuda")
    glob = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    glob[0, [0, 300, 776]] = True  # start, middle, end
    glob[1, :70] = True  # more than one 64-key side tile
    pad = torch.ones(B, S, dtype=torch.bool, device="cuda")
    pad[1, 700:] = False
    ref = reference.longformer_attention(case.q, case.k, case.v, 64, glob, key_padding_mask=pad)
    ref_grads = grads(ref, [case.q, case.k, case.v])
    results = {}
    for name in ("torch", backend):
        c = case.cast(torch.bfloat16)
        out = longattn.longformer_attention(c.q, c.k, c.v, 64, glob, key_padding_mask=pad, max_globals=70,
                                            backend=name)
        results[name] = (out, grads(out, [c.q, c.k, c.v]))
    assert_within_rule("out", results[backend][0], results["torch"][0], ref)
    for name, g, b, r in zip(["dq", "dk", "dv"], results[backend][1], results["torch"][1], ref_grads):
        assert_within_rule(name, g, b, r, grad=True)


@pytest.mark.parametrize("n_globals", [1, 70])
def test_triton_longformer_is_deterministic_at_many_splits(n_globals):
    """The fused Triton op merges the global rows' splits in the last program of a slot tile to finish (an arrival
    counter): whichever program that is, the merge runs in split order, so runs are bitwise equal. S = 16384 gives
    tens of splits per slot tile on a GPU, in flight next to the band programs."""
    require("triton", torch.bfloat16, 64)
    B, S, H, D = 1, 16384, 4, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    glob = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    glob[0, torch.linspace(0, S - 1, n_globals, device="cuda").long()] = True
    dout = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    runs = []
    for _ in range(3):
        out = longattn.longformer_attention(q, k, v, 256, glob, max_globals=n_globals, backend="triton")
        runs.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------
# Block aggregation
# --------------------------------------------------------------------------------------------------------

AGGREGATE_SHAPES = [(2, 1000, 96, 62), (1, 4096, 768, 256), (3, 17, 8, 0), (1, 5, 4, 9)]


def _aggregate_matrix():
    params = []
    for backend in KERNEL_BACKENDS:
        for dtype in DTYPES + [pytest.param(torch.float32, id="fp32")]:
            for shape in AGGREGATE_SHAPES:
                # Triton: one shape in fp16 and bf16 runs every kernel (the rest cost compiles: slow).
                slow = backend == "triton" and (shape != AGGREGATE_SHAPES[0] or dtype.id == "fp32")
                params.append(pytest.param(backend, dtype.values[0], shape, id=f"{backend}-{dtype.id}-{shape}",
                                           marks=[pytest.mark.slow] if slow else []))
    return params


@pytest.mark.parametrize("weighted", [False, True], ids=["sum", "rmsnorm"])
@pytest.mark.parametrize("backend,dtype,shape", _aggregate_matrix())
def test_block_aggregate_matches_oracle(backend, dtype, shape, weighted):
    B, S, C, G = shape
    require(backend, dtype, C, op="block_aggregate")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, C, generator=gen).to(dtype).cuda().requires_grad_(True)
    ids = torch.randint(-1, G, (B, S), generator=gen, dtype=torch.int32).cuda()
    weight = (1 + 0.1 * torch.randn(C, generator=gen)).cuda().requires_grad_(True) if weighted else None
    leaves = [x] + ([weight] if weighted else [])
    ref = reference.block_aggregate(x, ids, G, weight=weight)
    ref_grads = grads(ref, leaves)
    results = {}
    for name in ("torch", backend):
        out = longattn.block_aggregate(x, ids, G, weight=weight, backend=name)
        results[name] = (out, grads(out, leaves))
    assert_within_rule("out", results[backend][0], results["torch"][0], ref)
    for name, g, b, r in zip(["dx", "dweight"], results[backend][1], results["torch"][1], ref_grads):
        assert_within_rule(name, g, b, r, grad=True)


# --------------------------------------------------------------------------------------------------------
# Bitwise determinism
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_is_bitwise_deterministic(backend):
    # Both backends reduce without atomics (fixed-order partial sums), so two identical calls must agree to
    # the bit: the output and the gradient of every input, side keys and both bias tables included.
    # The smoke matrix's all-inputs shape (its Triton specializations are compiled already); its side keys are
    # split over several query chunks (CUDA: 8 on 132 SMs), so the fixed-order partial sums are exercised.
    require(backend, torch.bfloat16, 64)
    case = make_case(**CASES["odd-S-side-bias-padded"], device="cuda").cast(torch.bfloat16)
    names = ["out", *case.grad_names()]
    assert len(names) == 8  # out, dq, dk, dv, dside_k, dside_v, drel_bias, dside_bias
    runs = []
    for _ in range(2):
        out = case.run(backend)
        runs.append([out, *grads(out, case.leaves())])
    for name, first, second in zip(names, *runs):
        assert torch.equal(first, second), f"{backend}: {name} differs between two identical runs"


# --------------------------------------------------------------------------------------------------------
# Offsets past 2^31 elements
# --------------------------------------------------------------------------------------------------------

# (B, S, H, D): "batch" puts the 2^31 crossing in b * batch_stride + s * row_stride (row offsets stay below
# 2^30), "row" in s * row_stride alone (B = 1). Both are 2^31 + 2^17 elements per tensor (4 GiB in fp16).
OFFSET_LAYOUTS = {"batch": (2, (1 << 20) + 64, 8, 128), "row": (1, (1 << 20) + 64, 16, 128)}
OFFSET_WINDOW = 63  # left = right; one 127-key band
OFFSET_TAIL = 512  # rows in the slice: a multiple of both backends' query and key tiles (64 and 64 / 32)


@pytest.mark.parametrize("layout", OFFSET_LAYOUTS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_64bit_offsets(backend, layout):
    """Rows whose elements lie past 2^31 (forward and every gradient) equal the same rows computed from a
    small contiguous copy of the sequence's tail, bitwise.

    Why exact: both backends tile queries in blocks of 64 starting at row 0, and walk key tiles whose positions
    relative to the query tile do not depend on where the sequence starts (CUDA: key tiles at multiples of 64;
    Triton: at m0 - left) except where the window reaches row 0. The tail starts at a multiple of 64
    (OFFSET_TAIL), so every query tile whose window lies inside the tail, and every key tile whose queries do,
    runs the same tiles with the same data in the same order in both calls: the same sums in the same order.
    The copy is contiguous and small, so its offsets fit in 32 bits; a 32-bit overflow in the full call reads
    or writes other rows and shows as a mismatch. Compared: rows with s >= S - OFFSET_TAIL + 2 * 64 (query
    tiles past the window's reach into the tail's start, key tiles likewise).
    """
    B, S, H, D = OFFSET_LAYOUTS[layout]
    require(backend, torch.float16, D)
    assert B * S * H * D > 2**31 and S % 64 == 0 and OFFSET_TAIL % 64 == 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, S, H, D, device="cuda", dtype=torch.float16, generator=gen) for _ in range(4))
    first = S - OFFSET_TAIL + 2 * 64  # both windows (63 rows) fit within one 64-row tile of the tail's start
    first_past_2_31 = ((1 << 31) - (B - 1) * S * H * D + H * D - 1) // (H * D)  # in the last batch row
    assert first <= first_past_2_31 < S, "the compared rows must include rows past 2^31 elements"

    def run(q, k, v, dout):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = longattn.local_attention(*leaves, OFFSET_WINDOW, backend=backend)
        dq, dk, dv = torch.autograd.grad(out, leaves, dout)
        return [t.detach()[:, -(S - first):].clone() for t in (out, dq, dk, dv)]  # frees the full tensors

    full = run(q, k, v, dout)
    tail = run(*(t[:, S - OFFSET_TAIL:].contiguous() for t in (q, k, v, dout)))
    for name, a, b in zip(["out", "dq", "dk", "dv"], full, tail):
        assert torch.equal(a, b), f"{backend} {layout}: {name} rows past 2^31 elements differ from the tail's"


# --------------------------------------------------------------------------------------------------------
# Per-row key ranges: what is specific to the CUDA kernels' kRanges instantiations (csrc/band_side/ranges.h).
# Every backend's numerics against the oracle are in tests/test_ranges.py; these need no tolerance.
# --------------------------------------------------------------------------------------------------------

RANGE_RESULTS = ("out", "lse", "dq", "dk", "dv", "dside_k", "dside_v", "dband_bias", "dside_bias")


def _cuda_band_side(case, dout, rows=slice(None), window=None, band_bias=None, **extra):
    """[out, lse, *gradients] of the raw CUDA primitive on the tokens `rows` of `case` (with its side keys and
    masks; `window` / the float32 `band_bias` table when given, else the case's), with the keywords `extra`."""
    from longattn.backends import cuda_backend

    q, k, v = (x.detach()[:, rows] for x in (case.q, case.k, case.v))
    side_k, side_v = case.side_k.detach(), case.side_v.detach()
    bb = band_bias if band_bias is not None else (None if case.rel_bias is None else case.rel_bias.detach().float())
    sb = None if case.side_bias is None else case.side_bias.detach().float()
    bkm = None if case.key_padding_mask is None else case.key_padding_mask[:, rows]
    left, right = window or case.window
    args = (bkm, case.side_mask, case.query_block[:, rows].to(torch.int32), bb, sb, left, right, case.scale)
    out, lse = cuda_backend.band_side_forward(q, k, v, side_k, side_v, *args, **extra)
    return [out, lse, *cuda_backend.band_side_backward(dout[:, rows], q, k, v, side_k, side_v, out, lse, *args,
                                                       **extra)]


def _full_ranges(B, S, n):
    return torch.tensor([0, n], dtype=torch.int32, device="cuda").expand(B, S, 2).contiguous()


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_cuda_ranges_holding_every_key_equal_no_ranges_bitwise(dropout):
    # Ranges that exclude nothing run the kRanges kernels over exactly the tiles (and in the order) of the
    # kernels without ranges, and mask nothing more: every result must be bitwise the same.
    require("cuda", torch.bfloat16, 64)
    case = make_case(**CASES["odd-S-side-bias-padded"], device="cuda").cast(torch.bfloat16)
    B, S, G = case.q.shape[0], case.q.shape[1], case.side_k.shape[1]
    dout = torch.randn(case.q.shape, generator=torch.Generator("cuda").manual_seed(0), device="cuda").to(case.q.dtype)
    extra = dict(dropout_p=0.1, rng=torch.tensor([7, 0], dtype=torch.int64, device="cuda")) if dropout else {}
    plain = _cuda_band_side(case, dout, **extra)
    ranged = _cuda_band_side(case, dout, key_ranges=_full_ranges(B, S, S), side_ranges=_full_ranges(B, S, G),
                             **extra)
    for name, a, b in zip(RANGE_RESULTS, plain, ranged):
        assert torch.equal(a, b), f"{name} differs with ranges that exclude nothing"


def test_cuda_packed_tile_aligned_sequences_equal_separate_runs_bitwise():
    # Sequences starting on 64-token tiles, packed into one row with key_ranges, visit the same tiles in the same
    # order as each sequence run alone (the other sequences' keys are masked, which adds exact zeros): out, lse,
    # dq, dk, dv bitwise equal; the band-bias gradient sums the same terms in another order (close).
    require("cuda", torch.bfloat16, 64)
    lengths, (left, right) = (128, 64, 192, 100), (70, 30)
    S = sum(lengths)
    case = make_case(B=1, S=S, H=2, D=64, window=(left, right), G=0, bias=True, device="cuda").cast(torch.bfloat16)
    dout = torch.randn(case.q.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda").to(case.q.dtype)
    cu = [0]
    key_ranges = torch.zeros(1, S, 2, dtype=torch.int32, device="cuda")
    for n in lengths:  # every row sees its own sequence's tokens
        key_ranges[0, cu[-1]:cu[-1] + n] = torch.tensor([cu[-1], cu[-1] + n], dtype=torch.int32, device="cuda")
        cu.append(cu[-1] + n)
    packed = _cuda_band_side(case, dout, key_ranges=key_ranges)
    table = case.rel_bias.detach().float()
    dband_bias = torch.zeros_like(table)
    for s, n in enumerate(lengths):
        rows = slice(cu[s], cu[s + 1])
        lc, rc = min(left, n - 1), min(right, n - 1)  # the raw op takes windows up to S - 1 (equivalent)
        alone = _cuda_band_side(case, dout, rows, window=(lc, rc), band_bias=table[:, left - lc:left + rc + 1])
        for name, whole, part in zip(RANGE_RESULTS[:5], packed, alone):
            got = whole[:, :, rows] if name == "lse" else whole[:, rows]
            assert torch.equal(got, part), f"sequence {s}: {name} differs from the sequence run alone"
        dband_bias[:, left - lc:left + rc + 1] += alone[7]
    torch.testing.assert_close(packed[7], dband_bias, rtol=1e-4, atol=1e-4)


def test_cuda_arbitrary_ranges_are_safe_and_deterministic():
    # Non-monotone, empty, reversed and out-of-range values: finite results, two runs bitwise equal, and rows
    # left with no key at all get out = 0, lse = +inf and zero dq.
    require("cuda", torch.bfloat16, 64)
    case = make_case(**CASES["many-side-keys"], device="cuda").cast(torch.bfloat16)
    B, S, G = case.q.shape[0], case.q.shape[1], case.side_k.shape[1]
    gen = torch.Generator("cuda").manual_seed(2)
    dout = torch.randn(case.q.shape, generator=gen, device="cuda").to(case.q.dtype)
    key_ranges = torch.randint(-100, S + 100, (B, S, 2), generator=gen, device="cuda", dtype=torch.int32)
    side_ranges = torch.randint(-100, G + 100, (B, S, 2), generator=gen, device="cuda", dtype=torch.int32)
    key_ranges[:, 100:140] = torch.tensor([2**31 - 1, -(2**31)], dtype=torch.int32, device="cuda")  # reversed, extreme
    side_ranges[:, 100:140] = torch.tensor([G, G], dtype=torch.int32, device="cuda")  # empty
    runs = [_cuda_band_side(case, dout, key_ranges=key_ranges, side_ranges=side_ranges) for _ in range(2)]
    for name, a, b in zip(RANGE_RESULTS, *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
        assert torch.isfinite(a).all() or name == "lse", f"{name} is not finite"
    out, lse, dq = runs[0][:3]
    assert out[:, 100:140].abs().max().item() == 0.0 and dq[:, 100:140].abs().max().item() == 0.0
    assert torch.isinf(lse[:, :, 100:140]).all()
