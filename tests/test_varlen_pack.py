"""Padded <-> packed conversions and cu_seqlens checks (issue 14 groundwork): ``longattn.varlen``."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import longattn
from longattn.varlen import PackIndex, check_cu_seqlens, cu_from_seqlens, pack, seqlens_from_cu, unpack
from tests.test_host_sync import OpLog

S = 7


def _masks() -> dict[str, torch.Tensor]:
    right = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6])
    left = right.flip(1)
    scattered = torch.tensor([[0, 1, 0, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0, 0]])
    empty_rows = torch.tensor([[0] * 7, [1, 1, 0, 1, 0, 0, 0], [0] * 7])
    return {"right": right.bool(), "left": left.bool(), "scattered": scattered.bool(),
            "empty_rows": empty_rows.bool(), "int_mask": scattered.to(torch.int64),
            "full_b1": torch.ones(1, S, dtype=torch.bool), "one_token_b1": torch.arange(S)[None] == 3}


def _expected(mask: torch.Tensor):
    """The oracle, by Python loops: flat indices of real tokens in order, and the lengths."""
    mask = mask.bool()
    idx = [b * mask.shape[1] + s for b in range(mask.shape[0]) for s in range(mask.shape[1]) if mask[b, s]]
    return idx, [int(row.sum()) for row in mask]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", list(_masks()))
def test_round_trip_and_index(name, dtype):
    mask = _masks()[name]
    x = torch.randn(mask.shape[0], S, 2, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, index = pack(x, mask)
    idx, lengths = _expected(mask)
    assert index.indices.dtype == torch.int64 and index.indices.tolist() == idx
    assert index.cu_seqlens.dtype == torch.int32
    assert index.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert index.max_seqlen == max(max(lengths), 1)
    assert (index.batch_size, index.seqlen) == tuple(mask.shape)
    assert packed.shape == (len(idx), 2, 3) and packed.dtype == dtype
    assert torch.equal(packed, x.reshape(-1, 2, 3)[idx])
    out = unpack(packed, index, fill=-5.0)
    keep = mask.bool()[..., None, None]
    assert torch.equal(out, torch.where(keep, x, torch.full_like(x, -5.0)))
    assert torch.equal(unpack(packed, index), torch.where(keep, x, torch.zeros_like(x)))


def test_all_padding_batch_packs_to_nothing():
    x = torch.randn(2, S, 4)
    packed, index = pack(x, torch.zeros(2, S, dtype=torch.bool))
    assert packed.shape == (0, 4) and index.cu_seqlens.tolist() == [0, 0, 0] and index.max_seqlen == 1
    assert torch.equal(unpack(packed, index, fill=1.5), torch.full_like(x, 1.5))


def test_non_contiguous_input_and_given_sizes_match():
    mask = _masks()["scattered"]
    x = torch.randn(3, 2, S, 4).transpose(1, 2)  # (B, S, H, D) view of (B, H, S, D)
    packed, index = pack(x, mask)
    packed2, index2 = pack(x, mask, total=packed.shape[0], max_seqlen=index.max_seqlen)
    assert torch.equal(packed, packed2) and torch.equal(index.indices, index2.indices)
    assert torch.equal(unpack(packed, index), x * mask[..., None, None])


def test_gradcheck_pack_and_unpack():
    mask = _masks()["scattered"]
    x = torch.randn(3, S, 2, dtype=torch.float64, requires_grad=True)
    _, index = pack(x.detach(), mask)
    assert torch.autograd.gradcheck(lambda t: pack(t, mask)[0], (x,))
    p = torch.randn(index.indices.numel(), 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unpack(t, index, fill=3.0), (p,))
    # Through both: the gradient of unpack(pack(x)) is the mask.
    (g,) = torch.autograd.grad(unpack(*pack(x, mask)).sum(), x)
    assert torch.equal(g, mask[..., None].expand_as(x).to(g.dtype))


class HostReads(TorchFunctionMode):
    """Python-level reads of tensor data to the host. On CPU ``tolist`` / ``item`` dispatch no aten op (they
    read memory directly), so the dispatch-level ``OpLog`` alone would miss them; both are counted."""

    READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "numpy")

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _sync_count(fn) -> int:
    with HostReads() as reads, OpLog() as log:
        fn()
    return len(reads.reads) + len(log.syncs())


def test_host_syncs():
    mask = _masks()["scattered"]
    x = torch.randn(3, S, 4)
    packed, index = pack(x, mask)
    assert _sync_count(lambda: pack(x, mask)) == 1
    assert _sync_count(lambda: pack(x, mask, total=packed.shape[0], max_seqlen=index.max_seqlen)) == 0
    assert _sync_count(lambda: unpack(packed, index)) == 0
    assert _sync_count(lambda: cu_from_seqlens(seqlens_from_cu(index.cu_seqlens))) == 0


def test_pack_unpack_compile_fullgraph():
    mask = _masks()["scattered"]
    x = torch.randn(3, S, 4, requires_grad=True)
    _, index = pack(x, mask)
    total = index.indices.numel()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def roundtrip(x, mask):
        packed, idx = pack(x, mask, total=total, max_seqlen=index.max_seqlen)
        return unpack(packed * 2, idx, fill=1.0)

    out = roundtrip(x, mask)
    assert torch.equal(out, torch.where(mask[..., None], 2 * x, torch.ones_like(x)))
    out.sum().backward()
    assert torch.equal(x.grad, 2 * mask[..., None].expand_as(x).float())


def test_seqlen_helpers():
    cu = cu_from_seqlens([3, 0, 5])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8]
    assert seqlens_from_cu(cu).tolist() == [3, 0, 5]
    assert cu_from_seqlens(torch.tensor([2, 2], dtype=torch.int64)).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="lengths"):
        cu_from_seqlens(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="lengths"):
        cu_from_seqlens(3)


def test_check_cu_seqlens_metadata_errors():
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    assert check_cu_seqlens(cu, 5, 8, "cpu", batch_size=3) == (5, 8)
    with pytest.raises(TypeError, match="cu_seqlens.*int32"):
        check_cu_seqlens(cu.long(), 5, 8, "cpu")
    with pytest.raises(TypeError, match="cu_seqlens"):
        check_cu_seqlens([0, 3, 8], 5, 8, "cpu")
    with pytest.raises(ValueError, match="cu_seqlens.*1-D"):
        check_cu_seqlens(cu[None], 5, 8, "cpu")
    with pytest.raises(ValueError, match="cu_seqlens.*1-D"):
        check_cu_seqlens(cu[:1], 5, 8, "cpu")
    with pytest.raises(ValueError, match="cu_seqlens.*meta"):
        check_cu_seqlens(cu, 5, 8, "meta")
    with pytest.raises(ValueError, match="cu_seqlens.*contiguous"):
        check_cu_seqlens(torch.zeros(8, dtype=torch.int32)[::2], 5, 8, "cpu")
    with pytest.raises(ValueError, match="cu_seqlens.*B \\+ 1 = 3"):
        check_cu_seqlens(cu, 5, 8, "cpu", batch_size=2)
    with pytest.raises(ValueError, match="max_seqlen"):
        check_cu_seqlens(cu, 0, 8, "cpu")
    with pytest.raises(TypeError, match="max_seqlen"):
        check_cu_seqlens(cu, 5.0, 8, "cpu")
    with pytest.raises(TypeError, match="max_seqlen"):
        check_cu_seqlens(cu, True, 8, "cpu")
    with pytest.raises(ValueError, match="total"):
        check_cu_seqlens(cu, 5, -1, "cpu")


@pytest.fixture
def debug_mode():
    longattn.set_debug(True)
    yield
    longattn.set_debug(False)


@pytest.mark.parametrize("values, max_seqlen, total, match", [
    ([1, 3, 8], 5, 8, "cu_seqlens\\[0\\] == 0"),
    ([0, 5, 3, 8], 5, 8, "non-decreasing"),
    ([0, 3, 8], 5, 9, "total = 9"),
    ([0, 3, 9], 5, 9, "max_seqlen: 5 .* longest sequence \\(6\\)"),
])
def test_check_cu_seqlens_value_errors_in_debug_mode(values, max_seqlen, total, match, debug_mode):
    cu = torch.tensor(values, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        check_cu_seqlens(cu, max_seqlen, total, "cpu")


def test_value_checks_are_off_without_debug_mode():
    cu = torch.tensor([0, 5, 3, 8], dtype=torch.int32)
    with OpLog() as log:
        check_cu_seqlens(cu, 1, 2, "cpu")
    assert log.ops == []


def test_pack_given_wrong_sizes(debug_mode):
    mask = _masks()["right"]
    x = torch.randn(3, S)
    with pytest.raises(ValueError, match="total"):
        pack(x, mask, total=5, max_seqlen=7)
    with pytest.raises(ValueError, match="max_seqlen"):
        pack(x, mask, total=12, max_seqlen=6)


def test_pack_wrong_total_stays_in_bounds_without_debug():
    mask = _masks()["right"]  # 12 real tokens
    x = torch.randn(3, S)
    packed, index = pack(x, mask, total=5, max_seqlen=7)
    assert torch.equal(packed, x.reshape(-1)[:5])
    packed, index = pack(x, mask, total=14, max_seqlen=7)  # too many: the extra slots read the last position
    assert torch.equal(packed[:12], x[mask]) and torch.equal(packed[12:], x[-1, -1].expand(2))


def test_pack_unpack_input_errors():
    x = torch.randn(2, S, 3)
    with pytest.raises(ValueError, match="attention_mask"):
        pack(x, torch.ones(2, S + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask"):
        pack(x, torch.ones(2, S))
    with pytest.raises(ValueError, match="x"):
        pack(torch.randn(S), torch.ones(1, S, dtype=torch.bool))
    with pytest.raises(TypeError, match="x"):
        pack(None, torch.ones(1, S, dtype=torch.bool))
    packed, index = pack(x, torch.ones(2, S, dtype=torch.bool))
    with pytest.raises(ValueError, match="packed"):
        unpack(packed[1:], index)
    with pytest.raises(TypeError, match="index"):
        unpack(packed, tuple(index))
    assert isinstance(index, PackIndex)


@pytest.mark.gpu
def test_gpu_pack_unpack_without_sync_matches_cpu():
    mask = _masks()["scattered"]
    x = torch.randn(3, S, 2, 8, requires_grad=True)
    ref_packed, ref_index = pack(x, mask)
    (ref_grad,) = torch.autograd.grad((unpack(ref_packed * 3, ref_index) ** 2).sum(), x)
    xc, mask_c = x.detach().cuda().requires_grad_(), mask.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host read of device data raises
    try:
        packed, index = pack(xc, mask_c, total=ref_packed.shape[0], max_seqlen=ref_index.max_seqlen)
        (grad,) = torch.autograd.grad((unpack(packed * 3, index) ** 2).sum(), xc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(packed.cpu(), ref_packed.detach()) and torch.equal(index.cu_seqlens.cpu(), ref_index.cu_seqlens)
    assert torch.equal(index.indices.cpu(), ref_index.indices)
    torch.testing.assert_close(grad.cpu(), ref_grad)
