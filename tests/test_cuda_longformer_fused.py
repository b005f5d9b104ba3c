"""The CUDA backend's fused Longformer forward (``cuda_backend.longformer_forward``): the slots kernel, which also
zeroes the arrival counters, then one ``cuda_longformer_fwd`` launch (csrc/longformer/fused_fwd.h) whose leading CTAs
are the global rows' split-KV CTAs (the last of a slot tile to arrive merges its splits) and whose others are the band
pass; and its fused backward (``cuda_backend.longformer_backward``): one ``cuda_longformer_bwd`` raw op of 4 launches
(csrc/longformer/fused_bwd.h: delta of both passes' rows, dQ with the global rows' split CTAs leading the band pass's,
the band dK/dV, then the global rows' dK/dV with the band's side-key finish and the splits' dq sum in the same grid;
with shared k / v the CTA owning a global token's key row adds the side-key sum there first, then its own). The
backward's tests are the last two sections.

CPU part (needs the built extension, not a GPU): the raw op's checks (its CPU registration runs the CUDA one's, then
says it needs CUDA tensors), its fake, that the backend's calls pass those checks for every layout (key splits, padded
splits, packed ranges, separate projections), which calls keep the composed path (dropout, no slots), and
statement-level emulations of the launch's index arithmetic: the grid's split and band CTAs and their arrival counters,
and the rule by which band CTAs leave the used slots' rows to the merge (``is_used_slot_row``), against the slot layout.
The merge itself is ``merge.h``'s ``merge_elements``, the arithmetic ``rows_merge_kernel`` runs (emulated in
``tests/test_cuda_longformer.py::test_rows_kernels_emulation_matches_the_torch_composition``).

GPU part (``@pytest.mark.gpu``): out, lse and glse bitwise equal to the composed path's (the same tile code and merge)
for globals at the start, middle and end, 64 globals, two slot tiles, more globals than slots, padding, fp16 / bf16,
D = 32 / 64 / 128, key splits (whole and padded), packed ranges and separate projections; repeated runs bitwise equal
at a length with many splits per slot tile; the public op against the fp64 oracle within the rule; and the forward's
two kernels under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import collections

import pytest
import torch

import longattn
from longattn.backends import _longformer, cuda_backend
from tests import reference
from tests.conftest import DeviceWork, grads
from tests.tolerance import assert_within_rule

BUILT = cuda_backend._C is not None and hasattr(torch.ops.longattn, "cuda_longformer_fwd")
needs_build = pytest.mark.skipif(not BUILT, reason="longattn._C is not built (or predates cuda_longformer_fwd)")
gpu_ready = pytest.mark.skipif(
    not torch.cuda.is_available() or bool(cuda_backend.unavailable_reasons(torch.device("cuda"))),
    reason="needs a CUDA GPU the extension was built for")

B, S, H, D, G, C = 2, 48, 2, 32, 3, 3
N = S // C  # keys per split
_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_F16 = dict(dtype=torch.float16)
_SLOTS, _FUSED = "longattn.cuda_longformer_global_slots", "longattn.cuda_longformer_fwd"
_FUSED_BWD, _BAND_BWD = "longattn.cuda_longformer_bwd", "longattn.cuda_band_side_bwd"
BUILT_BWD = cuda_backend._C is not None and hasattr(torch.ops.longattn, "cuda_longformer_bwd")
needs_bwd_build = pytest.mark.skipif(not BUILT_BWD, reason="longattn._C is not built (or predates cuda_longformer_bwd)")


# --------------------------------------------------------------------------------------------------------
# The raw op: checks (CPU registration), fake, and the backend's calls.
# --------------------------------------------------------------------------------------------------------


def _fused_call(change=None):
    """cuda_longformer_fwd on CPU with valid arguments (B, S, H, D, G, C above) changed by ``change``, straight to the
    CPU kernel."""
    z = torch.zeros(B, S, H, D, **_F16)
    split = torch.zeros(B * C, N, H, D, **_F16)
    args = dict(q=z, k=z, v=z, band_rows=torch.ones(B, S, dtype=torch.bool), pos=torch.arange(G).repeat(B, 1),
                used=torch.ones(B, G, dtype=torch.bool), key_padding_mask=torch.ones(B, S, dtype=torch.bool), left=4,
                right=5, scale=0.125, q_global=z, split_k=split, split_v=split,
                split_mask=torch.ones(B * C, N, dtype=torch.bool), counter=torch.zeros(B * H, dtype=torch.int32),
                key_ranges=None, side_ranges=None, split_ranges=None)
    args.update(change or {})
    op = torch.ops.longattn.cuda_longformer_fwd.default
    return op.redispatch(_CPU, *[args[a.name] for a in op._schema.arguments])


FUSED_BAD = {  # change -> message pattern after "cuda_longformer_fwd: "
    "counter-size": ({"counter": torch.zeros(B * H + 1, dtype=torch.int32)},
                     r"counter must have B \* H \* ceil\(G / 64\) = 4 elements"),
    "counter-dtype": ({"counter": torch.zeros(B * H, dtype=torch.int64)}, r"counter must be Int"),
    "counter-strided": ({"counter": torch.zeros(2 * B * H, dtype=torch.int32)[::2]}, r"counter must be contiguous"),
    "counter-device": ({"counter": torch.zeros(B * H, dtype=torch.int32, device="meta")},
                       r"counter must be on q's device"),
    "q_global-dtype": ({"q_global": torch.zeros(B, S, H, D, dtype=torch.bfloat16)},
                       r"q_global must have q's dtype and shape"),
    "q_global-shape": ({"q_global": torch.zeros(B, S + 1, H, D, **_F16)}, r"q_global must have q's dtype and shape"),
    "q-dtype": ({"q": torch.zeros(B, S, H, D)}, r"q must be float16 or bfloat16"),
    "pos-dtype": ({"pos": torch.zeros(B, G, dtype=torch.int32)}, r"side_index must be Long"),
    "used-shape": ({"used": torch.ones(B, G + 1, dtype=torch.bool)}, r"side_mask must have shape"),
    "band_rows-shape": ({"band_rows": torch.ones(B, S + 1, dtype=torch.bool)}, r"band_key_mask must have shape"),
    "left": ({"left": S}, r"left must be in \[0, S - 1\]"),
    "splits-B": ({"split_k": torch.zeros(B * C + 1, N, H, D, **_F16)}, r"side_k's B must be a multiple of q's B_q"),
    "split_v-shape": ({"split_v": torch.zeros(B * C, N + 1, H, D, **_F16)}, r"side_v must have shape"),
    "split_mask-shape": ({"split_mask": torch.ones(B * C, N + 1, dtype=torch.bool)}, r"side_mask must have shape"),
    "split_ranges-dtype": ({"split_ranges": torch.zeros(B * C, G, 2, dtype=torch.int64)}, r"side_ranges must be Int"),
}


@needs_build
@pytest.mark.parametrize("case", FUSED_BAD)
def test_fused_op_rejects_bad_arguments(case):
    change, pattern = FUSED_BAD[case]
    with pytest.raises(RuntimeError, match=rf"^cuda_longformer_fwd: {pattern}") as info:
        _fused_call(change)
    assert not isinstance(info.value, NotImplementedError), info.value


_I32 = dict(dtype=torch.int32)
FUSED_VALID = {
    "default": {},
    "no-masks": {"key_padding_mask": None, "split_mask": None},
    "one-split": {"split_k": torch.zeros(B, S, H, D, **_F16), "split_v": torch.zeros(B, S, H, D, **_F16),
                  "split_mask": None},
    "ranges": {"key_ranges": torch.zeros(B, S, 2, **_I32), "side_ranges": torch.zeros(B, S, 2, **_I32),
               "split_ranges": torch.zeros(B * C, G, 2, **_I32)},
    "no-slots": {"pos": torch.zeros(B, 0, dtype=torch.int64), "used": torch.ones(B, 0, dtype=torch.bool),
                 "counter": torch.zeros(0, dtype=torch.int32)},
    "all-slots": {"pos": torch.arange(S).repeat(B, 1), "used": torch.ones(B, S, dtype=torch.bool)},
    "bf16": {x: torch.zeros(B, S, H, D, dtype=torch.bfloat16) for x in ("q", "k", "v", "q_global")}
    | {x: torch.zeros(B * C, N, H, D, dtype=torch.bfloat16) for x in ("split_k", "split_v")},
}


@needs_build
@pytest.mark.parametrize("case", FUSED_VALID)
def test_fused_op_accepts_valid_arguments(case):
    with pytest.raises(NotImplementedError, match="cuda_longformer_fwd: needs CUDA tensors"):
        _fused_call(FUSED_VALID[case])


def _meta_operands():
    """(B, S, H, D) and split (B * C, N, H, D) bf16 operands, a (B, S) mask and the slots' pos / used, on meta."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    z, split = torch.empty(B, S, H, D, **meta), torch.empty(B * C, N, H, D, **meta)
    mask = torch.empty(B, S, dtype=torch.bool, device="meta")
    pos, used = torch.empty(B, G, dtype=torch.int64, device="meta"), torch.empty(B, G, dtype=torch.bool, device="meta")
    return z, split, mask, pos, used


@needs_build
def test_fused_op_fake_shapes():
    z, split, mask, pos, used = _meta_operands()
    counter = torch.empty(B * H, dtype=torch.int32, device="meta")
    out, lse, glse = torch.ops.longattn.cuda_longformer_fwd(z, z, z, mask, pos, used, mask, 4, 5, 0.125, z, split,
                                                            split, None, counter)
    assert (out.shape, out.dtype) == ((B, S, H, D), torch.bfloat16)
    assert (lse.shape, lse.dtype, glse.shape, glse.dtype) == ((B, H, S), torch.float32, (B, H, G), torch.float32)


def _backend_args(device, Sx=S, dtype=torch.float16, projections=False, packed=False, Gx=G):
    """cuda_backend.longformer_forward's arguments: globals at the start, middle and end of row 0 and on a padding token
    of row 1, padding in row 1, ``packed``: two sequences per row (``key_ranges``)."""
    gen = torch.Generator().manual_seed(Sx)

    def leaf():
        return torch.randn(B, Sx, H, D, generator=gen).to(device, dtype)

    q, k, v = leaf(), leaf(), leaf()
    qg, kg, vg = (leaf(), leaf(), leaf()) if projections else (None, None, None)
    glob = torch.zeros(B, Sx, dtype=torch.bool)
    glob[0, [0, Sx // 2, Sx - 1]] = True
    glob[1, [3, Sx - 1]] = True
    pad = torch.ones(B, Sx, dtype=torch.bool)
    pad[1, Sx - 7:] = False
    key_ranges = None
    if packed:
        cut = Sx // 3
        key_ranges = torch.tensor([[0, cut]] * cut + [[cut, Sx]] * (Sx - cut), dtype=torch.int32).repeat(B, 1, 1)
        key_ranges = key_ranges.to(device)
    return (q, k, v, qg, kg, vg, glob.to(device), pad.to(device), 4, 5, 0.125, Gx, 0.0, None, key_ranges)


def _torch_slots(global_mask, key_padding_mask, G, zero=None):
    """cuda_backend.global_slots on CPU: the torch layout (the slots kernel's, bitwise); the counters left as given."""
    return _longformer.global_slots(global_mask, key_padding_mask, G)


LAYOUTS = {  # name -> (SPLIT_KEYS, S, _backend_args keywords)
    "one-split": (None, S, {}),
    "splits": (16, S, {}),
    "whole-splits": (20, S, {}),  # 16-key splits (whole_split)
    "padded-splits": (16, 47, {}),  # the last split padded: KeySplits.keys copies k_global / v_global
    "packed": (16, S, {"packed": True}),
    "projections": (16, S, {"projections": True}),
    "all-slots": (16, S, {"Gx": S}),
}


@needs_build
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backend_calls_pass_the_fused_op_checks(layout, monkeypatch):
    """The backend's fused call, on CPU tensors (the slots from the torch layout), gets through every check of the raw
    op's CPU registration to its "needs CUDA tensors": the band pass's and the splits' arguments, the counters."""
    split_keys, Sx, kw = LAYOUTS[layout]
    monkeypatch.setattr(_longformer, "SPLIT_KEYS", split_keys)
    monkeypatch.setattr(cuda_backend, "global_slots", _torch_slots)
    with pytest.raises(NotImplementedError, match="cuda_longformer_fwd: needs CUDA tensors"):
        cuda_backend.longformer_forward(*_backend_args("cpu", Sx, **kw))


@needs_build
@pytest.mark.parametrize("change, raw_ops", [
    ({}, [_SLOTS, _FUSED]),
    ({"Gx": 0}, [_SLOTS, "longattn.cuda_band_side_fwd"]),  # no slots: the band pass alone (2 launches already)
    ({"dropout": True}, [_SLOTS, "longattn.cuda_band_side_fwd", "longattn.cuda_band_side_fwd",
                         "longattn.cuda_longformer_rows_merge"]),  # dropout: the composed path
], ids=["fused", "no-slots", "dropout"])
def test_which_calls_are_fused(change, raw_ops, monkeypatch):
    """On meta tensors (the raw ops' fakes): the fused forward is 2 raw ops (slots, fused) and no torch glue; G = 0 and
    dropout keep the composed path."""
    monkeypatch.setattr(_longformer, "SPLIT_KEYS", 16)
    change = dict(change)
    dropout = change.pop("dropout", False)
    args = list(_backend_args("meta", **change))
    if dropout:
        args[12:14] = [0.1, torch.zeros(2, dtype=torch.int64, device="meta")]
    with torch.no_grad(), DeviceWork() as work:
        out, lse, glse, band_rows, pos, used = cuda_backend.longformer_forward(*args)
    assert work.kernels == raw_ops and work.glue == [], (work.kernels, work.glue)
    assert (out.shape, lse.shape, glse.shape) == ((B, S, H, D), (B, H, S), (B, H, args[11]))


# --------------------------------------------------------------------------------------------------------
# Emulations of the launch's index arithmetic (csrc/longformer/fused_fwd.h, band_side/fwd_kernel.h).
# --------------------------------------------------------------------------------------------------------


def _is_used_slot_row(band_rows, pad, pos, used, b, i):
    """fwd_kernel.h is_used_slot_row, statement by statement: whether the band CTA leaves row i's out to the merge."""
    Gx = pos.shape[1]
    if Gx == 0 or band_rows[b, i] or (pad is not None and not pad[b, i]):
        return False
    if not used[b, Gx - 1]:
        return True
    return i <= pos[b, Gx - 1]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("padded", [True, False])
def test_band_ctas_leave_exactly_the_merged_rows(seed, padded):
    """The rows the band CTAs do not store are exactly the used slots' positions, the rows the merge writes (so each
    row of out has one writer in the launch), for fewer, as many and more globals than slots."""
    gen = torch.Generator().manual_seed(seed)
    Bx, Sx = 3, 70
    glob = torch.rand(Bx, Sx, generator=gen) < [0.02, 0.2, 0.6][seed % 3]
    pad = (torch.rand(Bx, Sx, generator=gen) > 0.2) if padded else None
    counts = (glob if pad is None else glob & pad).sum(1).tolist()
    for Gx in sorted({0, 1, min(counts), max(counts), max(counts) + 3, Sx}):
        Gx = min(Gx, Sx)
        band_rows, pos, used = _longformer.global_slots(glob, pad, Gx)
        for b in range(Bx):
            skipped = {i for i in range(Sx) if _is_used_slot_row(band_rows, pad, pos, used, b, i)}
            merged = {int(p) for p, u in zip(pos[b], used[b]) if u}
            assert skipped == merged, (seed, Gx, b)


def _fused_grid(Bx, Hx, Sx, Gx, Cx):
    """longformer_fwd_kernel's blockIdx.x -> ("rows", slot tile, split batch row, h, counter index) or ("band",
    query tile, b, h), and the number of counters the op checks for."""
    n_slot_tiles, n_query_tiles = -(-Gx // 64), -(-Sx // 64)
    n_lead = n_slot_tiles * Bx * Cx * Hx
    ctas = []
    for x in range(n_lead + n_query_tiles * Bx * Hx):
        if x < n_lead:
            tile, rest = x % n_slot_tiles, x // n_slot_tiles
            bc, h = rest % (Bx * Cx), rest // (Bx * Cx)
            ctas.append(("rows", tile, bc, h, ((bc // Cx) * Hx + h) * n_slot_tiles + tile))
        else:
            x -= n_lead
            tile, rest = x % n_query_tiles, x // n_query_tiles
            ctas.append(("band", tile, rest % Bx, rest // Bx))
    return ctas, Bx * Hx * n_slot_tiles


def _arrivals(split_ctas, counter, Cx, order):
    """merge_when_last's protocol for the split CTAs arriving in ``order``: atomicAdd, the one that saw C - 1 merges
    and resets the counter -> the CTAs that merged."""
    mergers = []
    for i in order:
        at = split_ctas[i][-1]
        arrived, counter[at] = counter[at], counter[at] + 1
        if arrived == Cx - 1:
            mergers.append(split_ctas[i])
            counter[at] = 0
    return mergers


@pytest.mark.parametrize("Bx, Hx, Sx, Gx, Cx", [(1, 1, 1, 1, 1), (2, 3, 300, 70, 4), (3, 2, 130, 64, 1),
                                                (1, 12, 4096, 1, 4), (2, 2, 200, 0, 3)])
def test_fused_grid_covers_every_tile_once(Bx, Hx, Sx, Gx, Cx):
    """Every split CTA (slot tile x split batch row x head) and band CTA (query tile x batch row x head) once, each of
    the B * H * ceil(G / 64) counters (the size the op checks) counted up by exactly its C splits, and the arrival
    protocol: one merge per slot tile in any arrival order, counters left at zero."""
    ctas, n_counters = _fused_grid(Bx, Hx, Sx, Gx, Cx)
    n_slot_tiles, n_query_tiles = -(-Gx // 64), -(-Sx // 64)
    split_ctas = [c[1:] for c in ctas if c[0] == "rows"]
    band = [c[1:] for c in ctas if c[0] == "band"]
    assert sorted(c[:3] for c in split_ctas) == sorted(
        (t, bc, h) for t in range(n_slot_tiles) for bc in range(Bx * Cx) for h in range(Hx))
    assert sorted(band) == sorted((t, b, h) for t in range(n_query_tiles) for b in range(Bx) for h in range(Hx))
    counts = collections.Counter(c[-1] for c in split_ctas)
    assert sorted(counts) == list(range(n_counters)) and set(counts.values()) <= {Cx}
    # Any arrival order: one merger per slot tile of each (b, h), and the counters back at zero (a second launch, e.g.
    # a replay, finds them as the slots kernel left them).
    counter = [0] * n_counters
    gen = torch.Generator().manual_seed(Sx)
    for _ in range(3):
        mergers = _arrivals(split_ctas, counter, Cx, torch.randperm(len(split_ctas), generator=gen).tolist())
        assert sorted((t, bc // Cx, h) for t, bc, h, _ in mergers) == sorted(
            (t, b, h) for t in range(n_slot_tiles) for b in range(Bx) for h in range(Hx))
        assert counter == [0] * n_counters


# --------------------------------------------------------------------------------------------------------
# GPU: the fused forward against the composed path, the oracle, and the profiler.
# --------------------------------------------------------------------------------------------------------


def _gpu_case(Sx, Dx, dtype, layout, *, Hx=2, padding=True, projections=False, packed=False, seed=0):
    """cuda_backend.longformer_forward's arguments on the GPU (window (40, 33), scale 1 / sqrt(D)) without G."""
    gen = torch.Generator().manual_seed(seed)

    def leaf():
        return torch.randn(2, Sx, Hx, Dx, generator=gen).to("cuda", dtype)

    q, k, v = leaf(), leaf(), leaf()
    qg, kg, vg = (leaf(), leaf(), leaf()) if projections else (None, None, None)
    glob = torch.zeros(2, Sx, dtype=torch.bool)
    if layout == "start-middle-end":
        glob[0, [0, Sx // 2, Sx - 1]] = True
        glob[1, [0, Sx - 1]] = True  # Sx - 1 is padding in row 1: never global
    elif layout == "64":
        glob[0, torch.randperm(Sx, generator=gen)[:64]] = True
        glob[1, torch.arange(0, Sx, 7)[:10]] = True
    elif layout == "80":
        glob[0, torch.arange(1, Sx, 3)[:80]] = True
        glob[1, :20] = True
    elif layout == "middle":
        glob[:, Sx // 2] = True
    pad = torch.ones(2, Sx, dtype=torch.bool)
    if padding:
        pad[1, Sx - 37:] = False
    key_ranges = None
    if packed:
        cuts = [0, Sx // 5, Sx // 2, Sx]
        key_ranges = torch.cat([torch.tensor([[a, b]] * (b - a), dtype=torch.int32) for a, b in zip(cuts, cuts[1:])])
        key_ranges = key_ranges.repeat(2, 1, 1).to("cuda")
    return (q, k, v, qg, kg, vg, glob.to("cuda"), pad.to("cuda"), 40, 33, Dx ** -0.5), key_ranges


# name -> (S, D, dtype, globals layout, max_globals, SPLIT_KEYS, _gpu_case keywords)
GPU_CASES = {
    "start-middle-end": (300, 64, torch.float16, "start-middle-end", 3, 64, {}),  # 5 splits of 60
    "start-middle-end-bf16-d128": (300, 128, torch.bfloat16, "start-middle-end", 4, 64, {}),
    "64-globals": (512, 64, torch.bfloat16, "64", 64, 128, {}),  # one full slot tile, 4 splits
    "two-slot-tiles": (400, 64, torch.float16, "80", 96, 100, {}),
    "more-globals-than-slots": (300, 64, torch.float16, "64", 16, 64, {}),
    "projections-d32": (260, 32, torch.float16, "start-middle-end", 8, 100, {"projections": True}),  # 4 of 65
    "padded-splits": (331, 64, torch.bfloat16, "start-middle-end", 3, 64, {}),  # prime S: the last split padded
    "packed": (300, 64, torch.float16, "64", 64, 64, {"packed": True}),
    "one-split": (300, 64, torch.float16, "start-middle-end", 3, None, {"padding": False}),
    "long": (8192, 64, torch.float16, "middle", 1, None, {"Hx": 4}),  # 8 splits of 1024 per slot tile
}


def _assert_bitwise(names, got, want):
    """Each named tensor of ``got`` has ``want``'s shape, dtype and bits."""
    for what, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        assert torch.equal(a, b), (what, (a != b).sum().item() if a.shape == b.shape else None)


def _gpu_args(name, monkeypatch, dtype=None):
    """Case ``name``'s backend arguments (in ``dtype``, default the case's), its key splits set -> (args, G,
    key_ranges)."""
    Sx, Dx, case_dtype, layout, Gx, split_keys, kw = GPU_CASES[name]
    if split_keys is not None:
        monkeypatch.setattr(_longformer, "SPLIT_KEYS", split_keys)
    args, key_ranges = _gpu_case(Sx, Dx, dtype or case_dtype, layout, **kw)
    return args, Gx, key_ranges


@pytest.mark.gpu
@gpu_ready
@needs_build
@pytest.mark.parametrize("name", GPU_CASES)
def test_fused_forward_is_bitwise_the_composed_path(name, monkeypatch):
    """out, lse and glse (and the slot layout) bitwise equal to the 4-launch composition: each CTA runs the same tile
    code on the same params, the merge the same merge_elements arithmetic in split order whichever split arrives last,
    and the band CTAs leave the used slots' rows to it."""
    args, Gx, key_ranges = _gpu_args(name, monkeypatch)
    fused = cuda_backend.longformer_forward(*args, Gx, 0.0, None, key_ranges)
    composed = _longformer.composed_forward(cuda_backend, *args, Gx, 0.0, None, key_ranges)
    _assert_bitwise(("out", "lse", "glse", "band_rows", "pos", "used"), fused, composed)


@pytest.mark.gpu
@gpu_ready
@needs_build
@pytest.mark.parametrize("name", ["long", "two-slot-tiles"])
def test_fused_forward_is_deterministic(name, monkeypatch):
    """Repeated calls are bitwise equal whatever order the split CTAs arrive in (8 splits per slot tile at S = 8192)."""
    args, Gx, key_ranges = _gpu_args(name, monkeypatch)
    first = cuda_backend.longformer_forward(*args, Gx, 0.0, None, key_ranges)
    for _ in range(3):
        again = cuda_backend.longformer_forward(*args, Gx, 0.0, None, key_ranges)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
@gpu_ready
@needs_build
@pytest.mark.parametrize("name", ["start-middle-end-bf16-d128", "64-globals", "projections-d32", "padded-splits"])
def test_fused_longformer_within_rule(name, monkeypatch):
    """The public op (fused forward and backward) against the fp64 oracle within the rule, the torch backend in the
    same dtype as the baseline: out and every gradient."""
    dtype = GPU_CASES[name][2]
    (q, k, v, qg, kg, vg, glob, pad, left, right, _), Gx, _ = _gpu_args(name, monkeypatch, torch.float64)
    leaves = [x.requires_grad_() for x in (q, k, v, qg, kg, vg) if x is not None]
    kwargs = dict(key_padding_mask=pad, q_global=qg, k_global=kg, v_global=vg)
    ref = reference.longformer_attention(q, k, v, (left, right), glob, **kwargs)
    want = grads(ref, leaves)
    runs = {}
    for backend in ("cuda", "torch"):
        low = [x.detach().to(dtype).requires_grad_() for x in leaves]
        it = iter(low)
        q_, k_, v_ = next(it), next(it), next(it)
        proj = dict(zip(("q_global", "k_global", "v_global"), it))
        out = longattn.longformer_attention(q_, k_, v_, (left, right), glob, key_padding_mask=pad, **proj,
                                            max_globals=Gx, backend=backend)
        runs[backend] = (out, grads(out, low))
    (out, got), (base, base_grads) = runs["cuda"], runs["torch"]
    assert_within_rule("out", out, base, ref)
    for i, (g, b, w) in enumerate(zip(got, base_grads, want)):
        assert_within_rule(f"grad {i}", g, b, w, grad=True)


@pytest.mark.gpu
@gpu_ready
@needs_build
@pytest.mark.parametrize("projections", [False, True])
def test_fused_forward_launches_two_kernels_without_sync(projections, monkeypatch):
    """The public forward: the slots kernel and the fused kernel, nothing else, and no host sync (sync debug mode
    "error"); the backward's kernels are printed (counted by
    test_fused_backward_launches_four_kernels_without_sync)."""
    from tests.test_host_sync import _gpu_kernels

    monkeypatch.setattr(_longformer, "SPLIT_KEYS", 64)  # several splits
    (q, k, v, qg, kg, vg, glob, pad, left, right, _), _ = _gpu_case(300, 64, torch.float16, "start-middle-end",
                                                                    projections=projections)
    proj = dict(q_global=qg, k_global=kg, v_global=vg)

    def forward():
        return longattn.longformer_attention(q, k, v, (left, right), glob, key_padding_mask=pad, **proj,
                                             max_globals=3, backend="cuda")

    forward()  # warm up outside the checks
    kernels = _gpu_kernels(forward)
    print(f"fused forward: {len(kernels)} kernels {kernels}")
    assert len(kernels) == 2, kernels
    assert "global_slots_kernel" in kernels[0] and "longformer_fwd_kernel" in kernels[1], kernels
    leaves = [x.requires_grad_() for x in (q, k, v, qg, kg, vg) if x is not None]
    out = forward()
    backward = _gpu_kernels(lambda: torch.autograd.grad(out, leaves, torch.ones_like(out)))
    print(f"backward: {len(backward)} kernels {backward}")


@pytest.mark.gpu
@gpu_ready
@needs_build
def test_opcheck_fused_op(monkeypatch):
    """Schema (the counters declared mutated; the launch leaves them zero, so opcheck's repeated runs agree), the fake
    against the CUDA implementation, and tracing."""
    monkeypatch.setattr(_longformer, "SPLIT_KEYS", 64)
    (q, k, v, _, _, _, glob, pad, left, right, scale), _ = _gpu_case(300, 64, torch.float16, "64")
    counter = torch.ones(2 * 2, dtype=torch.int32, device="cuda")
    band_rows, pos, used = cuda_backend.global_slots(glob, pad, 64, zero=counter)
    assert not counter.any()
    sp = _longformer.key_splits(300, {})
    args = (q, k, v, band_rows, pos, used, pad, left, right, scale, q, sp.keys(k), sp.keys(v),
            sp.key_mask(pad, 2, q.device), counter)
    torch.library.opcheck(torch.ops.longattn.cuda_longformer_fwd.default, args)
    assert not counter.any()


# --------------------------------------------------------------------------------------------------------
# The fused backward's raw op (cuda_longformer_bwd): checks (CPU registration), fake, the backend's calls, and
# emulations of its launches' index arithmetic (csrc/longformer/fused_bwd.h, fused_bwd.cu, fused_bwd_dq.h).
# --------------------------------------------------------------------------------------------------------


def _fused_bwd_call(change=None):
    """cuda_longformer_bwd on CPU with valid arguments (B, S, H, D, G, C above) changed by ``change``, straight to the
    CPU kernel."""
    z = torch.zeros(B, S, H, D, **_F16)
    split = torch.zeros(B * C, N, H, D, **_F16)
    args = dict(dout=z, q=z, k=z, v=z, out=z, lse=torch.zeros(B, H, S), glse=torch.zeros(B, H, G),
                band_rows=torch.ones(B, S, dtype=torch.bool), pos=torch.arange(G).repeat(B, 1),
                used=torch.ones(B, G, dtype=torch.bool), left=4, right=5, scale=0.125, split_k=split, split_v=split,
                split_mask=torch.ones(B * C, N, dtype=torch.bool), key_ranges=None, side_ranges=None,
                split_ranges=None, q_global=None, shared_kv=True)
    args.update(change or {})
    op = torch.ops.longattn.cuda_longformer_bwd.default
    return op.redispatch(_CPU, *[args[a.name] for a in op._schema.arguments])


FUSED_BWD_BAD = {  # change -> message pattern after "cuda_longformer_bwd: "
    "q-dtype": ({"q": torch.zeros(B, S, H, D)}, r"q must be float16 or bfloat16"),
    "dout-shape": ({"dout": torch.zeros(B, S + 1, H, D, **_F16)}, r"dout must have shape"),
    "out-dtype": ({"out": torch.zeros(B, S, H, D, dtype=torch.bfloat16)}, r"out must have q's dtype"),
    "lse-shape": ({"lse": torch.zeros(B, H, S + 1)}, r"lse must have shape"),
    "lse-dtype": ({"lse": torch.zeros(B, H, S, **_F16)}, r"lse must be Float"),
    "glse-shape": ({"glse": torch.zeros(B, H, G + 1)}, r"lse must have shape \(B / lse_split, H, S\)"),
    "pos-dtype": ({"pos": torch.zeros(B, G, dtype=torch.int32)}, r"side_index must be Long"),
    "used-shape": ({"used": torch.ones(B, G + 1, dtype=torch.bool)}, r"side_mask must have shape"),
    "band_rows-shape": ({"band_rows": torch.ones(B, S + 1, dtype=torch.bool)}, r"band_key_mask must have shape"),
    "left": ({"left": S}, r"left must be in \[0, S - 1\]"),
    "split_k-dim": ({"split_k": torch.zeros(B * C, N, H * D, **_F16)}, r"split_k must have shape \(B \* C, n, H, D\)"),
    "splits-B": ({"split_k": torch.zeros(B * C + 1, N, H, D, **_F16)}, r"side_k's B must be a multiple of q's B_q"),
    "split_v-shape": ({"split_v": torch.zeros(B * C, N + 1, H, D, **_F16)}, r"side_v must have shape"),
    "split_mask-shape": ({"split_mask": torch.ones(B * C, N + 1, dtype=torch.bool)}, r"side_mask must have shape"),
    "split_ranges-dtype": ({"split_ranges": torch.zeros(B * C, G, 2, dtype=torch.int64)}, r"side_ranges must be Int"),
    "q_global-dtype": ({"q_global": torch.zeros(B, S, H, D, dtype=torch.bfloat16)},
                       r"q_global must have q's dtype and shape"),
    "q_global-shape": ({"q_global": torch.zeros(B, S + 1, H, D, **_F16)}, r"q_global must have q's dtype and shape"),
}


@needs_bwd_build
@pytest.mark.parametrize("case", FUSED_BWD_BAD)
def test_fused_backward_op_rejects_bad_arguments(case):
    change, pattern = FUSED_BWD_BAD[case]
    with pytest.raises(RuntimeError, match=rf"^cuda_longformer_bwd: {pattern}") as info:
        _fused_bwd_call(change)
    assert not isinstance(info.value, NotImplementedError), info.value


FUSED_BWD_VALID = {
    "default": {},
    "no-split-mask": {"split_mask": None},
    "one-split": {"split_k": torch.zeros(B, S, H, D, **_F16), "split_v": torch.zeros(B, S, H, D, **_F16),
                  "split_mask": None},
    "ranges": {"key_ranges": torch.zeros(B, S, 2, **_I32), "side_ranges": torch.zeros(B, S, 2, **_I32),
               "split_ranges": torch.zeros(B * C, G, 2, **_I32)},
    "no-slots": {"pos": torch.zeros(B, 0, dtype=torch.int64), "used": torch.ones(B, 0, dtype=torch.bool),
                 "glse": torch.zeros(B, H, 0)},
    "all-slots": {"pos": torch.arange(S).repeat(B, 1), "used": torch.ones(B, S, dtype=torch.bool),
                  "glse": torch.zeros(B, H, S)},
    "bf16": {x: torch.zeros(B, S, H, D, dtype=torch.bfloat16) for x in ("dout", "q", "k", "v", "out")}
    | {x: torch.zeros(B * C, N, H, D, dtype=torch.bfloat16) for x in ("split_k", "split_v")},
    "projections": {"q_global": torch.zeros(B, S, H, D, **_F16), "shared_kv": False},
}


@needs_bwd_build
@pytest.mark.parametrize("case", FUSED_BWD_VALID)
def test_fused_backward_op_accepts_valid_arguments(case):
    with pytest.raises(NotImplementedError, match="cuda_longformer_bwd: needs CUDA tensors"):
        _fused_bwd_call(FUSED_BWD_VALID[case])


@needs_bwd_build
def test_fused_backward_op_fake_shapes():
    z, split, mask, pos, used = _meta_operands()
    lse, glse = torch.empty(B, H, S, device="meta"), torch.empty(B, H, G, device="meta")
    op = torch.ops.longattn.cuda_longformer_bwd
    grads_ = op(z, z, z, z, z, lse, glse, mask, pos, used, 4, 5, 0.125, split, split, None)
    assert [(g.shape, g.dtype) for g in grads_] == [((B, S, H, D), torch.bfloat16)] * 3 + [((0,), torch.bfloat16)] * 3
    grads_ = op(z, z, z, z, z, lse, glse, mask, pos, used, 4, 5, 0.125, split, split, None, q_global=z, shared_kv=False)
    assert [g.shape for g in grads_] == [(B, S, H, D)] * 4 + [(B * C, N, H, D)] * 2


def _backward_args(device, Sx=S, **kw):
    """cuda_backend.longformer_backward's arguments for _backend_args' case (the slots from the torch layout; out, lse,
    glse of the right shapes, values irrelevant to the checks)."""
    q, k, v, qg, kg, vg, glob, pad, left, right, scale, Gx, p, rng, key_ranges = _backend_args(device, Sx, **kw)
    band_rows, pos, used = _longformer.global_slots(glob, pad, Gx)
    lse, glse = torch.zeros(B, H, Sx, device=device), torch.zeros(B, H, Gx, device=device)
    return (torch.zeros_like(q), q, k, v, qg, kg, vg, torch.zeros_like(q), lse, glse, band_rows, pos, used, glob, pad,
            left, right, scale, p, rng, key_ranges)


@needs_bwd_build
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backend_backward_calls_pass_the_fused_op_checks(layout, monkeypatch):
    """The backend's fused backward call, on CPU tensors, gets through every check of the raw op's CPU registration to
    its "needs CUDA tensors"."""
    split_keys, Sx, kw = LAYOUTS[layout]
    monkeypatch.setattr(_longformer, "SPLIT_KEYS", split_keys)
    with pytest.raises(NotImplementedError, match="cuda_longformer_bwd: needs CUDA tensors"):
        cuda_backend.longformer_backward(*_backward_args("cpu", Sx, **kw))


@needs_bwd_build
@pytest.mark.parametrize("change, raw_ops", [
    ({}, [_FUSED_BWD]),
    ({"Gx": 0}, [_BAND_BWD]),  # no slots: the band pass alone (4 launches)
    ({"dropout": True}, [_BAND_BWD, _BAND_BWD, "longattn.cuda_longformer_rows_add"]),  # dropout: the composed path
    ({"projections": True}, [_FUSED_BWD]),
    ({"projections": "k_global"}, [_BAND_BWD, _BAND_BWD, "longattn.cuda_longformer_rows_add"]),  # k_global alone
], ids=["fused", "no-slots", "dropout", "projections", "k_global-alone"])
def test_which_backward_calls_are_fused(change, raw_ops, monkeypatch):
    """On meta tensors (the raw ops' fakes): the fused backward is 1 raw op and no torch glue, with or without separate
    global projections; G = 0, dropout and k_global without v_global keep the composed path. The gradients' shapes:
    (B, S, H, D), empty (0,) for absent projections."""
    monkeypatch.setattr(_longformer, "SPLIT_KEYS", 16)
    change = dict(change)
    dropout = change.pop("dropout", False)
    alone = change.get("projections") == "k_global"
    args = list(_backward_args("meta", **change))
    if dropout:
        args[18:20] = [0.1, torch.zeros(2, dtype=torch.int64, device="meta")]
    if alone:
        args[4], args[6] = None, None  # q_global, v_global
    with torch.no_grad(), DeviceWork() as work:
        got = cuda_backend.longformer_backward(*args)
    assert work.kernels == raw_ops and work.glue == (["aten.add_"] if alone else []), (work.kernels, work.glue)
    for x, g in zip(args[1:7], got):
        assert g.shape == ((0,) if x is None else (B, S, H, D))


def _fused_bwd_launches(Bx, Hx, Sx, Gx, Cx, Dx, n_keys, finish_jobs, first_job):
    """The fused backward's launches, statement by statement (fused_bwd.cu, fused_bwd_dq.h, fused_bwd_rows.h): the
    delta launch's storing lanes -> ("band", b, s, h) / ("rows", bc, g, h); the dQ launch's CTAs -> ("rows", slot tile,
    bc, h) / ("band", query tile, b, h); launch 4's CTAs and threads -> ("keys", key tile, bc, h) / ("finish", job) /
    ("add", b, g, e). ``finish_jobs``: finish_warps(band).total(); ``first_job``: the side keys' jobs with shared k / v
    (their rows' owners take them), else 0."""
    band_rows, rows_rows = Bx * Sx * Hx, Bx * Cx * Gx * Hx
    band_warps, rows_warps = -(-band_rows // 4), -(-rows_rows // 4)  # delta_warps: 4 rows a warp, 8 lanes a row
    delta = []
    for w in range(-(-(band_warps + rows_warps) // 8) * 8):  # 8 warps a CTA
        name, warp, n_rows, S_ = ("band", w, band_rows, Sx) if w < band_warps else ("rows", w - band_warps, rows_rows,
                                                                                      Gx)
        for lane in range(0, 32, 8):  # each row's first lane, the one that stores (band_side_bwd_delta_rows)
            r = warp * 4 + lane // 8
            if r < n_rows:  # the bound on the pass's own params
                delta.append((name, r // (Hx * S_), (r // Hx) % S_, r % Hx))
    n_slot_tiles, n_query_tiles = -(-Gx // 64), -(-Sx // 64)
    n_lead = n_slot_tiles * Bx * Cx * Hx
    dq = []
    for x in range(n_lead + n_query_tiles * Bx * Hx):
        if x < n_lead:
            tile, rest = x % n_slot_tiles, x // n_slot_tiles
            dq.append(("rows", tile, rest % (Bx * Cx), rest // (Bx * Cx)))
        else:
            x -= n_lead
            tile, rest = x % n_query_tiles, x // n_query_tiles
            dq.append(("band", tile, rest % Bx, rest // Bx))
    # Launch 4: fused_bwd.h rows_launch, then longformer_bwd_rows_kernel over the grid (key_tiles + lead_x, B * C, H).
    elements = Bx * Gx * Hx * Dx
    finish_ctas, add_ctas, key_tiles = -(-(finish_jobs - first_job) // 4), -(-elements // 128), -(-n_keys // 64)
    per_x = max(Bx * Cx * Hx, 1)
    lead_x = -(-(finish_ctas + add_ctas) // per_x)
    last = []
    for z in range(Hx):
        for y in range(Bx * Cx):
            for x in range(key_tiles + lead_x):
                if x < key_tiles:
                    last.append(("keys", x, y, z))
                    continue
                lead = (z * (Bx * Cx) + y) * lead_x + x - key_tiles
                for tid in range(128):
                    if lead < finish_ctas:
                        job = first_job + lead * 4 + tid // 32
                        if tid % 32 == 0 and job < finish_jobs:  # band_side_bwd_finish_warp: jobs past total idle
                            last.append(("finish", job))
                        continue
                    t = (lead - finish_ctas) * 128 + tid
                    if t < elements:
                        bg = t // (Hx * Dx)
                        last.append(("add", bg // Gx, bg % Gx, t % (Hx * Dx)))
    return delta, dq, last


@pytest.mark.parametrize("shared", [True, False], ids=["shared-kv", "projections"])
@pytest.mark.parametrize("Bx, Hx, Sx, Gx, Cx, Dx", [(1, 1, 1, 1, 1, 32), (2, 3, 300, 70, 4, 64),
                                                    (3, 2, 130, 64, 1, 128), (1, 12, 1024, 1, 4, 64),
                                                    (2, 2, 200, 200, 3, 32), (1, 1, 4096, 1, 1, 64)])
def test_fused_backward_launches_cover_every_job_once(Bx, Hx, Sx, Gx, Cx, Dx, shared):
    """Every delta row of both passes (band (b, s, h); global rows (b * C + c, g, h)) once; every dQ tile of both
    passes once; in launch 4 every key tile of the global rows once, every element of every slot row once, and every
    band finish job once, except the side keys' jobs with shared k / v (then their rows' owners add those sums: see
    test_fused_backward_key_owners_finish_each_global_row_once)."""
    side_key_jobs = -(-(Bx * Gx * Hx * (Dx // 2)) // 32)  # finish_warps(band): the side keys' column pairs, no bias
    first_job = side_key_jobs if shared else 0
    n_keys = -(-Sx // Cx)
    delta, dq, last = _fused_bwd_launches(Bx, Hx, Sx, Gx, Cx, Dx, n_keys, side_key_jobs, first_job)
    assert sorted(delta) == sorted([("band", b, s, h) for b in range(Bx) for s in range(Sx) for h in range(Hx)]
                                   + [("rows", bc, g, h) for bc in range(Bx * Cx) for g in range(Gx)
                                      for h in range(Hx)])
    n_slot_tiles, n_query_tiles = -(-Gx // 64), -(-Sx // 64)
    assert sorted(dq) == sorted([("rows", t, bc, h) for t in range(n_slot_tiles) for bc in range(Bx * Cx)
                                 for h in range(Hx)]
                                + [("band", t, b, h) for t in range(n_query_tiles) for b in range(Bx)
                                   for h in range(Hx)])
    assert sorted(last) == sorted([("keys", t, bc, h) for t in range(-(-n_keys // 64)) for bc in range(Bx * Cx)
                                   for h in range(Hx)]
                                  + [("finish", w) for w in range(first_job, side_key_jobs)]
                                  + [("add", b, g, e) for b in range(Bx) for g in range(Gx) for e in range(Hx * Dx)])


def _key_owner_finishes(pos, used, Sx, n_keys, Cx, Dx=64):
    """fused_bwd_rows.h finish_owned_key_rows with shared k / v, statement by statement, over launch 4's key tiles and
    their 128 threads: the slot table of each CTA (b * C + c, key tile), then each thread's two rows and column pairs.
    Returns, per finished element pair, (band batch row, slot, dk row, column, thread) and the thread that then adds
    the global rows' dK/dV into that dk element pair (band_side_bwd_dkdv_tile's epilogue: rows k0 / k1 of the thread,
    put_acc_row's columns), or None where the epilogue adds nothing there."""
    Bx, Gx = pos.shape
    finished = []
    for b in range(Bx * Cx):
        bb = b // Cx
        for tile in range(-(-n_keys // 64)):
            key0 = tile * 64
            row0 = (b % Cx) * n_keys + key0
            slot_of = [-1] * 64
            for g in range(Gx):
                if not used[bb, g]:
                    continue
                r = int(pos[bb, g]) - row0
                if 0 <= r < 64:
                    slot_of[r] = g
            # (dk row, column) -> the thread adding the global rows' dK/dV there (no split mask: a slot's token is real)
            epilogue = {}
            for tid in range(128):
                warp, lane = tid // 32, tid % 32
                for g in (key0 + warp * 16 + lane // 4, key0 + warp * 16 + lane // 4 + 8):
                    into = (b % Cx) * n_keys + g  # side_key_rows(rows, b, g)
                    if g < n_keys and into < Sx:
                        for n in range(Dx // 8):
                            epilogue[(into, n * 8 + (lane % 4) * 2)] = tid
            for tid in range(128):
                lane = tid % 32
                for half in range(2):
                    r = (tid // 32) * 16 + lane // 4 + 8 * half
                    slot = slot_of[r]
                    if key0 + r >= n_keys or slot < 0:
                        continue
                    row = int(pos[bb, slot])
                    if not (used[bb, slot] and 0 <= row < Sx):  # side_key_rows(band, bb, slot)
                        continue
                    for n in range(Dx // 8):
                        col = n * 8 + (lane % 4) * 2
                        finished.append((bb, slot, row, col, tid, epilogue.get((row, col))))
    return finished


@pytest.mark.parametrize("Sx, n_keys, Gx, where", [
    (48, 48, 3, [0, 24, 47]), (48, 16, 3, [0, 24, 47]), (47, 16, 4, [0, 15, 16, 46]), (300, 64, 70, "every-4"),
    (130, 64, 130, "all"), (200, 70, 5, [1, 69, 70, 139, 199]), (64, 16, 8, [])])
@pytest.mark.parametrize("bad_pos", [False, True], ids=["slots", "bad-positions"])
def test_fused_backward_key_owners_finish_each_global_row_once(Sx, n_keys, Gx, where, bad_pos):
    """With shared k / v, every column pair of every used slot's dk / dv row (globals at the start, middle, end, at
    split boundaries, in a padded last split, two slot tiles, every token) gets the band pass's side-key sum once, from
    one key-tile CTA of launch 4, in the thread that later adds its global rows' dK/dV into that same pair (so the
    composed path's order holds), and no other row gets one; unused slots (more slots than globals), padding rows and
    used slots whose position lies outside [0, S) (the raw op takes any index values) get nothing."""
    Cx = -(-Sx // n_keys)
    glob = torch.zeros(2, Sx, dtype=torch.bool)
    if where == "all":
        glob[:] = True
    elif where == "every-4":
        glob[:, ::4] = True
    else:
        glob[0, where] = True
    glob[1, [Sx - 1]] = True
    pad = torch.ones(2, Sx, dtype=torch.bool)
    pad[1, Sx // 2:] = False  # row 1's global is a padding token: no slot
    pad[1, 0] = True
    _, pos, used = _longformer.global_slots(glob, pad, Gx)
    if bad_pos:  # the raw op takes any index: used slots outside [0, S) (the padded split's rows too) get nothing
        used[0, :2] = True
        pos[0, :2] = torch.tensor([Cx * n_keys - 1 if Cx * n_keys > Sx else Sx + 3, -2])
    finished = _key_owner_finishes(pos, used, Sx, n_keys, Cx)
    expected = sorted((b, g, int(pos[b, g]), col) for b in range(2) for g in range(Gx)
                      if used[b, g] and 0 <= pos[b, g] < Sx for col in range(0, 64, 2))
    assert sorted((b, g, row, col) for b, g, row, col, _, _ in finished) == expected
    assert all(tid == adder for *_, tid, adder in finished)


# --------------------------------------------------------------------------------------------------------
# GPU: the fused backward against the composed path, and the profiler.
# --------------------------------------------------------------------------------------------------------


def _backward_of(args, Gx, key_ranges, fused):
    """dout and the six gradients of the fused (``longformer_backward``) or composed backward, after the (fused)
    forward of the same arguments."""
    out, lse, glse, band_rows, pos, used = cuda_backend.longformer_forward(*args, Gx, 0.0, None, key_ranges)
    gen = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    q, k, v, qg, kg, vg, glob, pad, left, right, scale = args
    bwd_args = (dout, q, k, v, qg, kg, vg, out, lse, glse, band_rows, pos, used, glob, pad, left, right, scale, 0.0,
                None, key_ranges)
    if fused:
        return cuda_backend.longformer_backward(*bwd_args)
    return _longformer.composed_backward(cuda_backend, *bwd_args)


@pytest.mark.gpu
@gpu_ready
@needs_bwd_build
@pytest.mark.parametrize("name", GPU_CASES)
def test_fused_backward_is_bitwise_the_composed_path(name, monkeypatch):
    """dq, dk, dv (and the global projections' gradients) bitwise equal to the composed backward's (8 launches): the
    same tile code per CTA, and each element's adds in the same order (with separate projections too: dq_global
    zeroed by the delta launch, the splits' dk / dv stored per split)."""
    args, Gx, key_ranges = _gpu_args(name, monkeypatch)
    fused = _backward_of(args, Gx, key_ranges, True)
    composed = _backward_of(args, Gx, key_ranges, False)
    _assert_bitwise(("dq", "dk", "dv", "dq_global", "dk_global", "dv_global"), fused, composed)


@pytest.mark.gpu
@gpu_ready
@needs_bwd_build
@pytest.mark.parametrize("name", ["long", "two-slot-tiles"])
def test_fused_backward_is_deterministic(name, monkeypatch):
    """Repeated fused backward calls are bitwise equal."""
    args, Gx, key_ranges = _gpu_args(name, monkeypatch)
    first = _backward_of(args, Gx, key_ranges, True)
    for _ in range(3):
        for a, b in zip(first, _backward_of(args, Gx, key_ranges, True)):
            assert torch.equal(a, b)


@pytest.mark.gpu
@gpu_ready
@needs_bwd_build
@pytest.mark.parametrize("projections", [False, True])
def test_fused_backward_launches_four_kernels_without_sync(projections, monkeypatch):
    """The public backward: delta, dQ, band dK/dV, then the global rows' dK/dV with the band's finish and the splits'
    dq sum, nothing else, and no host sync (sync debug mode "error")."""
    from tests.test_host_sync import _gpu_kernels

    monkeypatch.setattr(_longformer, "SPLIT_KEYS", 60)  # 5 whole splits: no padded copy
    (q, k, v, qg, kg, vg, glob, pad, left, right, _), _ = _gpu_case(300, 64, torch.float16, "start-middle-end",
                                                                    projections=projections)
    leaves = [x.requires_grad_() for x in (q, k, v, qg, kg, vg) if x is not None]
    out = longattn.longformer_attention(q, k, v, (left, right), glob, key_padding_mask=pad, q_global=qg, k_global=kg,
                                        v_global=vg, max_globals=3, backend="cuda")
    dout = torch.ones_like(out)
    torch.autograd.grad(out, leaves, dout, retain_graph=True)  # warm up outside the checks
    kernels = _gpu_kernels(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True))
    print(f"fused backward: {len(kernels)} kernels {kernels}")
    assert len(kernels) == 4, kernels
    for at, name in enumerate(("longformer_bwd_delta_kernel", "longformer_bwd_dq_kernel", "band_side_bwd_dkdv_kernel",
                               "longformer_bwd_rows_kernel")):
        assert name in kernels[at], kernels


@pytest.mark.gpu
@gpu_ready
@needs_bwd_build
def test_opcheck_fused_backward_op(monkeypatch):
    """Schema, the fake against the CUDA implementation, and tracing."""
    monkeypatch.setattr(_longformer, "SPLIT_KEYS", 64)
    args, _ = _gpu_case(300, 64, torch.float16, "64")
    q, k, v, _, _, _, glob, pad, left, right, scale = args
    out, lse, glse, band_rows, pos, used = cuda_backend.longformer_forward(*args, 64, 0.0, None, None)
    sp = _longformer.key_splits(300, {})
    dout = torch.randn_like(out)
    bwd = (dout, q, k, v, out, lse, glse, band_rows, pos, used, left, right, scale, sp.keys(k), sp.keys(v),
           sp.key_mask(pad, 2, q.device))
    torch.library.opcheck(torch.ops.longattn.cuda_longformer_bwd.default, bwd)
    torch.library.opcheck(torch.ops.longattn.cuda_longformer_bwd.default, bwd, {"q_global": k, "shared_kv": False})
