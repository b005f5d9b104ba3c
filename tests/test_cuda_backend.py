"""The CUDA backend (``longattn._C``, sources in ``csrc/``).

CPU part (always runs): the extension imports when it was built, its raw ops are registered with the
expected schemas and have fake implementations, and the backend says clearly why it cannot run on a CPU.

GPU part (``@pytest.mark.gpu``, skipped with the reason when no CUDA device is visible): the DESIGN.md
section 4 matrix against the fp64 oracle with the tolerance rule in fp16 / bf16 -- the baseline of the
rule is the torch backend in the same dtype --, long sequences up to S = 131072 (oracle: the torch backend
in float64, the dense oracle being S x S), bitwise determinism of the backward, block aggregation, and one
``torch.library.opcheck`` per raw op.
"""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.backends import cuda_backend
from tests import reference
from tests.conftest import GRAD_NAMES, check_backend_against_oracle, grads, make_case
from tests.tolerance import assert_within_rule

BUILT = cuda_backend._C is not None
needs_build = pytest.mark.skipif(
    not BUILT, reason=f"longattn._C is not built ({cuda_backend._IMPORT_ERROR}); "
    "build with `pip install --no-build-isolation -e .` where nvcc is available")
gpu_ready = pytest.mark.skipif(
    not torch.cuda.is_available() or bool(cuda_backend.unavailable_reasons(torch.device("cuda"))),
    reason="needs a CUDA GPU the extension was built for: "
    + ("; ".join(cuda_backend.unavailable_reasons(torch.device("cuda"))) if torch.cuda.is_available()
       else "no CUDA device visible"))

SCHEMAS = {
    "cuda_band_side_fwd":
        "longattn::cuda_band_side_fwd(Tensor q, Tensor k, Tensor v, Tensor side_k, Tensor side_v, "
        "Tensor? band_key_mask, Tensor? side_mask, Tensor? query_block, Tensor? band_bias, Tensor? side_bias, "
        "int left, int right, float scale) -> (Tensor out, Tensor lse)",
    "cuda_band_side_bwd":
        "longattn::cuda_band_side_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor side_k, Tensor side_v, "
        "Tensor out, Tensor lse, Tensor? band_key_mask, Tensor? side_mask, Tensor? query_block, "
        "Tensor? band_bias, Tensor? side_bias, int left, int right, float scale) -> (Tensor dq, Tensor dk, "
        "Tensor dv, Tensor dside_k, Tensor dside_v, Tensor dband_bias, Tensor dside_bias)",
    "cuda_block_aggregate_fwd":
        "longattn::cuda_block_aggregate_fwd(Tensor x, Tensor block_ids, int num_blocks, Tensor? weight, "
        "float eps) -> (Tensor out, Tensor sums, Tensor rstd)",
    "cuda_block_aggregate_bwd":
        "longattn::cuda_block_aggregate_bwd(Tensor dout, Tensor x, Tensor block_ids, int num_blocks, "
        "Tensor? weight, Tensor sums, Tensor rstd, float eps) -> (Tensor dx, Tensor dweight)",
}


# --------------------------------------------------------------------------------------------------------
# CPU-runnable
# --------------------------------------------------------------------------------------------------------


@needs_build
def test_extension_imports_and_reports_archs():
    import longattn._C as C

    assert isinstance(C.cuda_archs, str) and C.cuda_archs
    assert cuda_backend.built_archs(), f"could not parse cuda_archs={C.cuda_archs!r}"


@needs_build
@pytest.mark.parametrize("name", SCHEMAS)
def test_raw_op_schema(name):
    assert str(getattr(torch.ops.longattn, name).default._schema) == SCHEMAS[name]


def test_cpu_device_gives_a_clear_reason():
    reasons = longattn.available_backends("cpu")["cuda"]
    assert reasons, "the CUDA backend must not claim to run on a CPU"
    expected = "needs a CUDA device; got cpu" if BUILT else "longattn._C is not built"
    assert any(expected in r for r in reasons), reasons


def test_explicit_request_on_cpu_raises_with_reason():
    q = torch.randn(1, 8, 2, 32, dtype=torch.float16)
    expected = "needs a CUDA device; got cpu" if BUILT else "not built"
    with pytest.raises(longattn.BackendUnavailableError, match=expected):
        longattn.local_attention(q, q, q, 2, backend="cuda")
    x = torch.randn(1, 8, 4)
    with pytest.raises(longattn.BackendUnavailableError, match=expected):
        longattn.block_aggregate(x, torch.zeros(1, 8, dtype=torch.int32), 1, backend="cuda")


def test_unsupported_reasons_name_dtype_and_head_dim(monkeypatch):
    monkeypatch.setattr(cuda_backend, "unavailable_reasons", lambda device: [])
    cuda = torch.device("cuda")
    assert cuda_backend.unsupported_reasons(cuda, torch.float16, 64, "band_side") == []
    assert any("float16 / bfloat16" in r for r in cuda_backend.unsupported_reasons(cuda, torch.float32, 64,
                                                                                      "band_side"))
    assert any("head_dim" in r for r in cuda_backend.unsupported_reasons(cuda, torch.bfloat16, 16, "band_side"))
    assert cuda_backend.unsupported_reasons(cuda, torch.float32, 768, "block_aggregate") == []
    assert cuda_backend.unsupported_reasons(cuda, torch.float64, 768, "block_aggregate")


def test_arch_list_parsing(monkeypatch):
    class FakeC:
        cuda_archs = "8.0;9.0+PTX"

    monkeypatch.setattr(cuda_backend, "_C", FakeC)
    assert cuda_backend.built_archs() == [(8, 0, False), (9, 0, True)]
    assert cuda_backend._runs_on((8, 6))  # sm_80 cubin runs on 8.6
    assert cuda_backend._runs_on((10, 0))  # PTX of 9.0 JIT-compiles
    assert not cuda_backend._runs_on((7, 5))
    FakeC.cuda_archs = "9.0"
    assert not cuda_backend._runs_on((8, 0))


@needs_build
def test_fake_shapes_of_raw_ops():
    B, S, H, D, G = 2, 37, 3, 64, 5
    meta = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(B, H, S, D, **meta).transpose(1, 2)  # strided input; outputs are dense
    side = torch.empty(B, G, H, D, **meta)
    qb = torch.empty(B, S, device="meta", dtype=torch.int32)
    bb = torch.empty(H, 9, device="meta", dtype=torch.float32)
    sb = torch.empty(H, 2 * G + 1, device="meta", dtype=torch.float32)
    ops = torch.ops.longattn
    out, lse = ops.cuda_band_side_fwd(q, q, q, side, side, None, None, qb, bb, sb, 4, 4, 0.125)
    assert out.shape == (B, S, H, D) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert lse.shape == (B, H, S) and lse.dtype == torch.float32
    g = ops.cuda_band_side_bwd(out, q, q, q, side, side, out, lse, None, None, qb, bb, sb, 4, 4, 0.125)
    assert [tuple(t.shape) for t in g] == [(B, S, H, D)] * 3 + [(B, G, H, D)] * 2 + [(H, 9), (H, 2 * G + 1)]
    assert all(t.is_contiguous() for t in g)
    g = ops.cuda_band_side_bwd(out, q, q, q, side, side, out, lse, None, None, None, None, None, 4, 4, 0.125)
    assert g[5].shape == (0,) and g[6].shape == (0,)

    x = torch.empty(B, S, 48, device="meta", dtype=torch.float16)
    ids = torch.empty(B, S, device="meta", dtype=torch.int32)
    w = torch.empty(48, device="meta", dtype=torch.float32)
    out, sums, rstd = ops.cuda_block_aggregate_fwd(x, ids, 7, w, 1e-6)
    assert out.shape == (B, 7, 48) and out.dtype == torch.float16
    assert sums.shape == (B, 7, 48) and sums.dtype == torch.float32 and rstd.shape == (B, 7)
    out, sums, rstd = ops.cuda_block_aggregate_fwd(x, ids, 7, None, 1e-6)
    assert sums.shape == (0,) and rstd.shape == (0,)
    dx, dw = ops.cuda_block_aggregate_bwd(out, x, ids, 7, w, sums, rstd, 1e-6)
    assert dx.shape == x.shape and dw.shape == (48,) and dw.dtype == torch.float32


# --------------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------------

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]

# DESIGN.md section 4 shapes, with 64 x 64 kernel tiles in mind: odd S crossing several tiles, windows
# wide enough for mask-free interior tiles (W >= 127), windows inside one tile, side keys spanning tiles.
CASES = {
    "odd-S-side-bias-padded": dict(B=2, S=1000, H=3, D=64, window=(37, 21), G=3, bias=True, padding="tail",
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
    "D=32": dict(B=2, S=260, H=2, D=32, window=(33, 33), G=2, bias=True),
    "D=128": dict(B=1, S=400, H=2, D=128, window=(100, 27), G=70, bias=True, padding="tail"),
    "scale=1": dict(B=1, S=300, H=2, D=64, window=(127, 127), G=20, bias=True, scale=1.0),
}


def _check(case, dtype, oracle=None):
    return check_backend_against_oracle(case, "cuda", dtype, oracle)


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_band_side_matches_oracle(name, dtype):
    _check(make_case(**CASES[name], device="cuda"), dtype)


@pytest.mark.gpu
@gpu_ready
def test_fully_masked_rows_give_zero_output_and_zero_grads():
    case = make_case(B=2, S=300, H=2, D=64, window=(20, 20), G=0, padding="rows", device="cuda")
    test, out, got = _check(case, torch.bfloat16)
    assert out[0].abs().max().item() == 0.0
    assert got[0][0].abs().max().item() == 0.0  # dq of the all-padding row


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("S", [8192, 32768, 131072])
def test_long_sequences(S):
    # The dense oracle is S x S; the torch backend in float64 (itself checked against the oracle) stands in.
    case = make_case(B=1, S=S, H=2, D=64, window=(256, 256), G=1, bias=True, padding="tail", device="cuda")
    ref = case.run("torch")
    _check(case, torch.bfloat16, oracle=(ref, grads(ref, case.leaves())))


@pytest.mark.gpu
@gpu_ready
def test_backward_is_bitwise_deterministic():
    case = make_case(B=2, S=2000, H=3, D=64, window=(127, 127), G=40, bias=True, side_padding=True,
                     device="cuda").cast(torch.bfloat16)
    runs = []
    for _ in range(2):
        out = case.run("cuda")
        runs.append([out] + grads(out, case.leaves()))
    for name, a, b in zip(["out"] + GRAD_NAMES, *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def _aggregate_inputs(B, S, C, G, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, C, generator=gen).to(dtype).cuda().requires_grad_(True)
    ids = torch.randint(-1, G, (B, S), generator=gen, dtype=torch.int32).cuda()
    weight = (1 + 0.1 * torch.randn(C, generator=gen)).cuda().requires_grad_(True)
    return x, ids, weight


@pytest.mark.gpu
@gpu_ready
@pytest.mark.parametrize("dtype", DTYPES + [pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("weighted", [False, True], ids=["sum", "rmsnorm"])
@pytest.mark.parametrize("shape", [(2, 1000, 96, 62), (1, 4096, 768, 256), (3, 17, 8, 0), (1, 5, 4, 9)])
def test_block_aggregate_matches_oracle(shape, weighted, dtype):
    B, S, C, G = shape
    x, ids, weight = _aggregate_inputs(B, S, C, G, dtype)
    w = weight if weighted else None
    leaves = [x] + ([weight] if weighted else [])
    ref = reference.block_aggregate(x, ids, G, weight=w)
    ref_g = grads(ref, leaves)
    results = {}
    for backend in ("torch", "cuda"):
        out = longattn.block_aggregate(x, ids, G, weight=w, backend=backend)
        results[backend] = (out, grads(out, leaves))
    assert_within_rule("out", results["cuda"][0], results["torch"][0], ref)
    for name, g, b, r in zip(["dx", "dweight"], results["cuda"][1], results["torch"][1], ref_g):
        assert_within_rule(name, g, b, r, grad=True)
    again = longattn.block_aggregate(x, ids, G, weight=w, backend="cuda")
    assert torch.equal(again, results["cuda"][0])


def _opcheck_inputs():
    case = make_case(B=2, S=150, H=2, D=64, window=(20, 9), G=3, bias=True, padding="tail", side_padding=True,
                     device="cuda").cast(torch.float16)
    qb = case.query_block.to(torch.int32)
    bb, sb = case.rel_bias.detach().float(), case.side_bias.detach().float()
    q, k, v, sk, sv = (t.detach() for t in (case.q, case.k, case.v, case.side_k, case.side_v))
    return q, k, v, sk, sv, case.key_padding_mask, case.side_mask, qb, bb, sb


@pytest.mark.gpu
@gpu_ready
def test_opcheck_raw_ops():
    q, k, v, sk, sv, bkm, sm, qb, bb, sb = _opcheck_inputs()
    fwd_args = (q, k, v, sk, sv, bkm, sm, qb, bb, sb, 20, 9, 0.125)
    torch.library.opcheck(torch.ops.longattn.cuda_band_side_fwd.default, fwd_args)
    out, lse = torch.ops.longattn.cuda_band_side_fwd(*fwd_args)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.longattn.cuda_band_side_bwd.default,
                          (dout, q, k, v, sk, sv, out, lse, bkm, sm, qb, bb, sb, 20, 9, 0.125))
    x, ids, weight = (t.detach() for t in _aggregate_inputs(2, 100, 32, 7, torch.bfloat16))
    torch.library.opcheck(torch.ops.longattn.cuda_block_aggregate_fwd.default, (x, ids, 7, weight, 1e-6))
    out, sums, rstd = torch.ops.longattn.cuda_block_aggregate_fwd(x, ids, 7, weight, 1e-6)
    torch.library.opcheck(torch.ops.longattn.cuda_block_aggregate_bwd.default,
                          (torch.randn_like(out), x, ids, 7, weight, sums, rstd, 1e-6))


@pytest.mark.gpu
@gpu_ready
def test_raw_op_rejects_bad_arguments():
    q, k, v, sk, sv, bkm, sm, qb, bb, sb = _opcheck_inputs()
    fwd = torch.ops.longattn.cuda_band_side_fwd
    with pytest.raises(RuntimeError, match="band_bias must have shape"):
        fwd(q, k, v, sk, sv, bkm, sm, qb, bb[:, :-1], sb, 20, 9, 0.125)
    with pytest.raises(RuntimeError, match=r"left and right must be in \[0, S - 1\]"):
        fwd(q, k, v, sk, sv, None, None, None, None, None, 150, 0, 0.125)
    with pytest.raises(RuntimeError, match="head dim"):
        fwd(q[..., :16], k[..., :16], v[..., :16], sk[..., :16], sv[..., :16], None, None, None, None, None, 2, 2,
            0.25)
    # Out-of-range block ids are clamped, never read out of bounds.
    bad = torch.full_like(qb, 10**6)
    out, _ = fwd(q, k, v, sk, sv, bkm, sm, bad, bb, sb, 20, 9, 0.125)
    assert torch.isfinite(out).all()
