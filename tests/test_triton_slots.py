"""Longformer's slot layout as one Triton kernel (``triton_kernels/slots.py``, issue 12 target 2).

``triton_backend.global_slots`` must equal ``_longformer.global_slots`` (the torch reference) bitwise, the positions
of unused slots included, on any masks: padding anywhere, globals on padding tokens, rows without globals or with
more than G, G = 0 and G = S, S not a multiple of the chunk (16 tokens under the interpreter), strided masks. And it
must do its work in exactly one launch with no torch op around it (allocations and views aside). Runs on CPU under
``TRITON_INTERPRET=1``, or on a GPU (where ``test_long_rows_on_gpu`` also crosses the GPU's 8192-token chunks).
"""

from __future__ import annotations

import pytest
import torch

from longattn.backends import _longformer, triton_backend
from tests.conftest import INTERPRET, DeviceWork, needs_triton, run_sm90_compile
from tests.conftest import TRITON_DEVICE as DEVICE

pytestmark = needs_triton


def _assert_same(global_mask, key_padding_mask, G):
    got = triton_backend.global_slots(global_mask, key_padding_mask, G)
    want = _longformer.global_slots(global_mask, key_padding_mask, G)
    for name, a, b in zip(("band_rows", "pos", "used"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, (name, a, b)
        assert torch.equal(a, b), f"{name} (G={G}):\n{a}\n!=\n{b}\nglobal_mask\n{global_mask}\npad\n{key_padding_mask}"
    return got


def _random_masks(B, S, p_global, p_real, seed, padding=True):
    g = torch.Generator().manual_seed(seed)
    glob = torch.rand(B, S, generator=g) < p_global
    pad = (torch.rand(B, S, generator=g) < p_real) if padding else None
    return glob.to(DEVICE), None if pad is None else pad.to(DEVICE)


@pytest.mark.parametrize("padding", [False, True], ids=["no-padding-mask", "padding-anywhere"])
def test_random_masks(padding):
    # S across 1..80 (multiples of the 16-token chunk and not), global densities from none to all, every G kind
    for seed in range(12):
        g = torch.Generator().manual_seed(1000 + seed)
        B, S = int(torch.randint(1, 4, (), generator=g)), int(torch.randint(1, 81, (), generator=g))
        density = [0.0, 0.05, 0.3, 0.9, 1.0, 0.15][seed % 6]
        glob, pad = _random_masks(B, S, density, 0.7, seed, padding)
        n_max = int((glob if pad is None else glob & pad).sum(1).max())
        for G in sorted({0, S, max(n_max - 1, 0), min(n_max + 3, S)}):
            _assert_same(glob, pad, G)


@pytest.mark.parametrize("S", [1, 15, 16, 17, 32, 48, 50])
def test_chunk_boundaries(S):
    glob, pad = _random_masks(2, S, 0.25, 0.8, S)
    for G in range(0, S + 1, 1 if S < 20 else 7):
        _assert_same(glob, pad, G)


def test_layout_cases():
    S = 40
    zeros = torch.zeros(2, S, dtype=torch.bool, device=DEVICE)
    ones = torch.ones_like(zeros)
    tail = ones.clone()
    tail[1, 25:] = False
    lead = ones.clone()
    lead[0, :10] = False
    on_padding = zeros.clone()
    on_padding[:, [3, 9, 30, 39]] = True  # row 1: 30 and 39 are padding in `tail`
    for glob, pad in [(zeros, None), (zeros, tail), (ones, None), (ones, tail), (ones, lead), (on_padding, tail),
                      (on_padding, lead), (on_padding, zeros)]:
        for G in (0, 1, 3, 4, 5, 17, S - 1, S):
            _assert_same(glob, pad, G)
    # more globals than slots: the first G in sequence order are kept, no non-global slot
    band_rows, pos, used = _assert_same(ones, tail, 7)
    assert pos.tolist() == [list(range(7))] * 2 and bool(used.all())
    # no global: every slot is unused and points at the first G positions
    band_rows, pos, used = _assert_same(zeros, tail, 5)
    assert pos.tolist() == [list(range(5))] * 2 and not bool(used.any()) and torch.equal(band_rows, tail)


def test_strided_masks():
    B, S = 3, 37
    base_glob, base_pad = _random_masks(S, 2 * B, 0.2, 0.8, 7)
    transposed = (base_glob.t()[:B], base_pad.t()[B:])  # (B, S) with strides (1, 2B)
    glob, pad = _random_masks(B, 3 * S, 0.2, 0.8, 8)
    sliced = (glob[:, ::3], pad[:, 1::3])  # strides (3S, 3), a storage offset for the padding mask
    row_glob, row_pad = _random_masks(1, S, 0.3, 0.7, 9)
    expanded = (row_glob.expand(B, S), row_pad.expand(B, S))  # batch stride 0
    for glob, pad in (transposed, sliced, expanded):
        assert not glob.is_contiguous() and not pad.is_contiguous()
        for G in (0, 2, 9, S):
            _assert_same(glob, pad, G)
            _assert_same(glob, None, G)


@pytest.mark.skipif(not INTERPRET, reason="launches are counted through Triton's interpreter")
@pytest.mark.parametrize("case", ["padding", "no-padding", "strided", "G=0", "G=S"])
def test_one_launch_and_no_torch_op(case, triton_launches):
    glob, pad = _random_masks(2, 70, 0.1, 0.8, 3)
    G = {"G=0": 0, "G=S": 70}.get(case, 4)
    if case == "no-padding":
        pad = None
    elif case == "strided":
        glob, pad = _random_masks(2, 140, 0.1, 0.8, 3)
        glob, pad = glob[:, ::2], pad[:, 1::2]
    with DeviceWork() as work:
        triton_backend.global_slots(glob, pad, G)
    assert work.glue == [] and work.kernels == [], work.glue
    assert triton_launches == ["_slots_kernel"]


@pytest.mark.skipif(not INTERPRET, reason="launches are counted through Triton's interpreter")
def test_bad_input_raises_before_any_launch(triton_launches):
    glob, pad = _random_masks(2, 20, 0.1, 0.8, 4)
    for args, error, name in [((glob.int(), pad, 3), ValueError, "global_mask"),
                              ((glob[0], pad, 3), ValueError, "global_mask"),
                              (([[True]], None, 1), TypeError, "global_mask"),
                              ((glob, pad[:, :10], 3), ValueError, "key_padding_mask"),
                              ((glob, pad.float(), 3), ValueError, "key_padding_mask"),
                              ((glob, pad, 21), ValueError, "G"),
                              ((glob, pad, -1), ValueError, "G"),
                              ((glob, pad, 2.0), TypeError, "G")]:
        with pytest.raises(error, match=name):
            triton_backend.global_slots(*args)
    assert triton_launches == []


def test_empty_batch():
    glob = torch.zeros(0, 5, dtype=torch.bool, device=DEVICE)
    _assert_same(glob, None, 2)
    _assert_same(glob, glob, 0)


@pytest.mark.gpu
def test_long_rows_on_gpu():
    # rows of several 8192-token chunks: globals at both ends, around a chunk boundary, and none
    B, S = 3, 3 * 8192 + 77
    glob, pad = _random_masks(B, S, 0.0, 0.9, 11)
    glob[0, [0, 8191, 8192, S - 1]] = True
    glob[1, torch.randperm(S, device=DEVICE)[:64]] = True
    for G in (0, 1, 4, 64, 100, 8192, 8300, S):
        _assert_same(glob, pad, G)
        _assert_same(glob, None, G)


def compile_slots_for_sm90():
    """Compile the kernel as launched on a GPU (8192-token chunks), with and without a padding mask, for strided
    masks and for contiguous ones (the JIT makes a unit stride a constant); print registers / spills and fail on
    any spill. Needs TRITON_INTERPRET unset."""
    from longattn.triton_kernels import slots

    from tests.test_triton_backend import compile_sm90

    types = {**dict.fromkeys(["GMask", "PMask", "BandRows", "Used"], "*u8"), "Pos": "*i64",
             **dict.fromkeys(["Zero", "KRanges", "SideR", "RowR", "Before", "BandB", "SlotB"], "*i32")}
    ranges = ("KRanges", "SideR", "RowR", "Before", "BandB", "SlotB")
    for pad in (False, True):
        for unit in ({}, dict(stride_gs=1, stride_ps=1)):
            for zero in (False, True):  # with the fused Longformer forward's counters to zero
                print(f"HAS_PAD={pad}, {'unit' if unit else 'any'} mask strides, zero={zero}:", end=" ")
                usage = compile_sm90(slots._slots_kernel, dict(HAS_PAD=pad, BLOCK=slots._GPU_BLOCK, **unit),
                                     slots._GPU_WARPS, types, none_args=ranges + (() if zero else ("Zero", "n_zero")))
                assert "('0', '0')" in usage, usage
    for only in (False, True):  # packed batches: the slots' ranges too (forward), or only them (backward)
        print(f"ranges, RANGES_ONLY={only}:", end=" ")
        tiles = {k: v for k, v in slots._ranges_args(None, (None,) * 5, (64, 16)).items() if k.isupper()}
        usage = compile_sm90(slots._slots_kernel, dict(HAS_PAD=True, BLOCK=slots._GPU_BLOCK, RANGES_ONLY=only,
                                                       **tiles), slots._GPU_WARPS, types, none_args=("Zero", "n_zero"))
        assert "('0', '0')" in usage, usage


def test_kernel_compiles_for_sm90():
    run_sm90_compile("tests.test_triton_slots:compile_slots_for_sm90")


def _random_ranges(B, S, seed):
    """Per-row key ranges of a packed batch, plus out-of-range and empty ones (clamped like the torch function)."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(-3, S + 3, (B, S), generator=g)
    hi = lo + torch.randint(-2, S, (B, S), generator=g)
    return torch.stack([lo, hi], -1).to(torch.int32).to(DEVICE)


@pytest.mark.parametrize("S, G", [(1, 1), (37, 0), (37, 5), (50, 50), (70, 12)])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("block, tiles", [(16, (16, 16)), (128, (16, 32)), (128, (32, 16))],
                         ids=["one-tile-per-step", "band-tiles-per-step", "slot-tiles-per-step"])
def test_slot_ranges_match_the_torch_function(S, G, padding, block, tiles, triton_launches, monkeypatch):
    """Packed Longformer: the slots kernel's ranges (forward: with the layout; backward: from a given layout) are
    bitwise ``_longformer.slot_ranges``, for ranges of any value, and their tile bounds those of the bounds kernel
    (``_common.tile_bounds``), whatever the tiles per step of the kernel's walk (``block`` / 2 rows)."""
    from longattn.triton_kernels import _common, slots

    monkeypatch.setattr(slots, "_INTERPRET_BLOCK", block)
    for seed in range(3):
        glob, pad = _random_masks(2, S, 0.3, 0.8, seed, padding)
        key_ranges = _random_ranges(2, S, seed)
        band_rows, pos, used, band_ranges, row_ranges = slots.global_slots(glob, pad, G, key_ranges=key_ranges,
                                                                           tiles=tiles)
        want_band, want_rows = _longformer.slot_ranges(glob, pad, pos, used, G, key_ranges)
        want_band_bounds = _common._tile_bounds(key_ranges, want_band["side_ranges"], S, G, tiles[0], glob, None)
        want_slot_bounds = _common._tile_bounds(want_rows["key_ranges"], None, S, 0, tiles[1], glob,
                                                used.view(torch.uint8))
        want = (key_ranges, want_band, want_rows, want_band_bounds, want_slot_bounds if G else None)
        _check_packed_ranges((band_ranges, row_ranges), *want)
        slots._PACKED_RANGES.entry = None  # the backward's own launch, as on a miss
        triton_launches.clear()
        with DeviceWork() as work:  # no torch op: allocations and the one launch
            again = slots.slot_ranges(glob, pad, pos, used, G, key_ranges, tiles)
        assert work.glue == [] and triton_launches == ["_slots_kernel"], (work.glue, triton_launches)
        _check_packed_ranges(again, *want)


def _check_packed_ranges(got, key_ranges, want_band, want_rows, want_band_bounds, want_slot_bounds):
    """``slots.slot_ranges``' dicts against the torch function's and the bounds kernel's (slot bounds: their key
    columns, when there are slots)."""
    band, rows = got
    assert band["key_ranges"] is key_ranges
    assert torch.equal(band["side_ranges"], want_band["side_ranges"])
    assert torch.equal(rows["key_ranges"], want_rows["key_ranges"])
    assert torch.equal(band["range_bounds"], want_band_bounds)
    if want_slot_bounds is not None:
        assert torch.equal(rows["range_bounds"][..., :4], want_slot_bounds[..., :4])


def test_packed_slot_ranges_are_kept_for_the_same_inputs(triton_launches):
    """The slot ranges of a packed batch are a function of the masks, the key ranges, G and the tiles: a later call
    with the same unmodified tensors (or new views of them, as ``mask[None]``) computes none; any change does."""
    from longattn.triton_kernels import slots

    glob, pad = _random_masks(1, 40, 0.3, 0.8, 0, True)
    key_ranges = _random_ranges(1, 40, 0)
    first = slots.global_slots(glob[0][None], pad, 6, key_ranges=key_ranges, tiles=(16, 16))
    _, pos, used, band, rows = slots.global_slots(glob[0][None], pad, 6, key_ranges=key_ranges, tiles=(16, 16))
    assert band is first[3] and rows is first[4]
    assert slots.slot_ranges(glob[0][None], pad, pos, used, 6, key_ranges, (16, 16)) == (band, rows)
    triton_launches.clear()
    slots.slot_ranges(glob, pad, pos, used, 6, key_ranges, (32, 16))  # other tiles
    assert triton_launches == ["_slots_kernel"]
    glob[0, 3] = ~glob[0, 3]  # an in-place write: the masks changed
    assert slots.global_slots(glob[0][None], pad, 6, key_ranges=key_ranges, tiles=(16, 16))[3] is not band


def test_slot_ranges_reject_bad_tiles():
    from longattn.triton_kernels import slots

    glob, pad = _random_masks(1, 20, 0.3, 0.8, 0, True)
    for tiles in (None, (16,), (24, 16), (16, 8), (16.0, 16)):
        with pytest.raises(ValueError, match="tiles: expected"):
            slots.global_slots(glob, pad, 2, key_ranges=_random_ranges(1, 20, 0), tiles=tiles)
