"""The CUDA backend: hand-written kernels compiled into ``longattn._C`` (sources in ``csrc/``).

The extension registers its raw ops with the dispatcher (schemas in ``csrc/extension.cpp``, CUDA
implementations in ``csrc/*_api.cpp``); this module gives them fake (meta) implementations so they trace
under ``torch.compile`` / FakeTensor, says when the backend cannot run, and maps the backend contract of
``longattn.backends`` onto them. Nothing here touches CUDA unless the device asked about is a CUDA device.

Kernel design (see csrc/band_side/*.h): flash-attention-2 style tiles of 64 queries x 64 keys, 4 warps,
``mma.sync.m16n8k16`` + ``ldmatrix`` + ``cp.async`` double buffering, online softmax, lse saved; backward
as three kernels (delta, dQ per query tile, dK/dV per key tile) and, when partial sums are owed (side keys split over
query chunks, bias tables), a fourth that sums them in a fixed order and writes the gradients in their dtypes, with no
atomics and no ATen kernel around them, so gradients are bitwise reproducible; the tile kernels read float32 bias
tables (a float16 / bfloat16 table converted by a small kernel before the forward's band kernel, and by the backward's
delta kernel: no ATen cast). Attention dropout (``dropout_p > 0``) runs in separate instantiations of the same kernels
(``csrc/band_side/dropout.h``: Philox bits of ``longattn._dropout``'s counter layout, regenerated in the
backward), so ``dropout_p = 0`` runs exactly the dropout-free code. Per-row key ranges (``key_ranges`` /
``side_ranges``, the feature ``"ranges"`` of packed variable-length batches) likewise
(``csrc/band_side/ranges.h``): a query tile walks only the key tiles its rows' ranges meet and masks element
by element only on a range's edge tiles; a dK/dV key tile visits only the query tiles whose rows' ranges meet it.
Halo keys (``halo_k`` / ``halo_v`` / ``halo_mask`` / ``halo_left``, the feature ``"halo"``, notes/halo_contract.md)
run in a third kind of instantiation (``kHalo``, with or without dropout, never with ranges): the band walk covers the
keys ``[-HL, S + HR)``, the tiles reaching outside ``[0, S)`` read those rows from the halo buffers in place and test
each element, and the dK/dV kernel writes the halo keys' gradients (``dhalo_k``, ``dhalo_v``). The dropout offset
(``dropout_offset``, the feature ``"dropout_offset"``: query ``i`` and band key ``j``, halo keys at their local
``j``, draw the counters of ``i + offset`` / ``j + offset``, so a sequence-parallel shard draws the whole sequence's
bits) is read only by the kHalo kernels, which a call with an offset runs even with an empty halo: the other
kernels are the code without it. The lse gradient (``dlse``, the feature ``"lse_grad"``) only changes the
backward's delta (``rowsum(dO * O) - dlse``).

Longformer's band pass (``longformer_band_forward`` / ``longformer_band_backward``, the optional part of the contract
that ``longattn.backends._longformer`` calls) runs in a fourth kind of instantiation (``kIndexed``, with or without
dropout, never with halo keys): side key g is token ``pos[b, g]`` of k / v, read in place; the forward's
epilogue zeroes padding rows and sets the lse of non-band rows to +inf; the backward adds the side keys' dK/dV
(float32 partials over query chunks, summed in chunk order) into rows ``pos`` of dk / dv with the finish kernel. No
gather, masked_fill or scatter around the kernels. With per-row key ranges (packed batches: ``key_ranges`` over the
band keys, ``side_ranges`` over the slots g) it runs the ``kIndexed && kRanges`` instantiation, the same single raw op
each way (a call without ranges keeps the code without them).

The rest of the Longformer op runs on small kernels of its own (``csrc/longformer``, raw ops
``cuda_longformer_*``): the slot layout (``global_slots``: one CTA per batch row, a block-wide prefix count), and
around the global rows' band op (the slot queries against ``_longformer.SPLIT_KEYS``-key splits of the tokens, each
split a batch row) the log-sum-exp merge of the splits written straight into the slots' rows of ``out``, and in the
backward the sum of the splits' dq rows added into the slots' rows of dq (into a dq it zeroes first with separate
global projections). All deterministic (one thread per output element, splits summed in order) and safe for any slot
position (out of range: skipped). The global rows' band op itself runs with ``side_only`` (no band keys: no band tile
walked, no mask for them) and ``query_index`` (the slots' rows of q, and in the backward of dout and out, read in place
at the tokens ``pos`` names, every split from the same unsplit tensors: no copy per split), its backward with
``lse_split`` (each split reads the merged glse, no per-split copy) and, when the global rows share k / v with the band
pass, with ``dside_k_into`` / ``dside_v_into``: the keys' dK/dV added into the band pass's dk / dv by the dK/dV
kernel's epilogue (one query chunk: each key row has one owner CTA, so no (B, S, H, D) float32 partials). The composed
Longformer op (``_longformer.composed_forward``) runs 4 raw ops forward (slots, band pass, global rows, merge) and 3
backward (band pass, global rows, dq add). ``longformer_forward`` fuses the forward into 2 raw ops and 2 launches: the
slots kernel (zeroing arrival counters) and ``cuda_longformer_fwd``, one grid of the global rows' split CTAs, the last
of each slot tile merging its splits (no merge launch), then the band pass's CTAs (``csrc/longformer/fused_fwd.h``;
dropout and G = 0 keep the composition). ``longformer_backward`` fuses the backward into 1 raw op and 4 launches
(``cuda_longformer_bwd``, ``csrc/longformer/fused_bwd.h``: one delta launch for both passes' rows, one dQ launch of the
global rows' split CTAs then the band pass's, the band dK/dV, then the global rows' dK/dV with the band's side-key
finish and the splits' dq sum in the same grid; separate global projections too); dropout keeps the composed 3 raw
ops (8 launches), G = 0 the band pass's one (4). What torch still runs around the global rows: when no split size
near ``SPLIT_KEYS`` divides S (``_longformer.whole_split``; a prime S) the padded copies of k / v / the key mask (and,
with separate global k / v projections, the un-padding of their gradients); with per-slot key ranges (packed
batches) their shift into each split; with only one of k_global / v_global given, the shared one's ``add_``.
"""

from __future__ import annotations

import sys

import torch

from . import _longformer

NAME = "cuda"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# block_aggregate is a segment sum + RMS norm, no tensor cores: float32 is supported as well.
AGGREGATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (32, 64, 128)
MIN_CAPABILITY = (8, 0)  # mma.sync bf16, cp.async, ldmatrix

_BUILD_HINT = ("build it with `TORCH_CUDA_ARCH_LIST=<arch> pip install --no-build-isolation -e .` "
               "in an environment with a CUDA toolkit (nvcc) and a CUDA build of torch")

try:
    from .. import _C  # noqa: F401  (loads the library: registers the raw ops)

    _IMPORT_ERROR = None
except ImportError as exc:  # a pure-Python install: the backend reports itself unavailable
    _C = None
    _IMPORT_ERROR = exc

_ARCH_NAMES = {"Ampere": "8.0;8.6", "Ada": "8.9", "Hopper": "9.0", "Blackwell": "10.0;12.0"}


def built_archs() -> list[tuple[int, int, bool]]:
    """The (major, minor, has_ptx) archs longattn._C was compiled for, parsed from TORCH_CUDA_ARCH_LIST."""
    if _C is None:
        return []
    spec = getattr(_C, "cuda_archs", "")
    for name, value in _ARCH_NAMES.items():
        spec = spec.replace(name, value)
    archs = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        item = item.removesuffix("+PTX").rstrip("afAF")  # 9.0a -> 9.0
        try:
            major, minor = (int(x) for x in item.split(".", 1))
        except ValueError:
            continue
        archs.append((major, minor, ptx))
    return archs


def _runs_on(capability: tuple[int, int]) -> bool:
    # Cubins run on the same major and any minor >= theirs; PTX JIT-compiles for any newer arch.
    major, minor = capability
    for a_major, a_minor, ptx in built_archs():
        if (a_major == major and a_minor <= minor) or (ptx and (a_major, a_minor) <= capability):
            return True
    return False


def unavailable_reasons(device) -> list[str]:
    device = torch.device(device)
    if _C is None:
        return [f"the CUDA extension longattn._C is not built ({_IMPORT_ERROR}); {_BUILD_HINT}"]
    if device.type != "cuda":
        return [f"needs a CUDA device; got {device.type}"]
    if not torch.cuda.is_available():
        return ["needs a CUDA device; none is visible"]
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return [f"needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (mma.sync bf16, cp.async); "
                f"{device} has {capability[0]}.{capability[1]}"]
    if not _runs_on(capability):
        return [f"longattn._C was built for TORCH_CUDA_ARCH_LIST={_C.cuda_archs}, which does not include "
                f"sm_{capability[0]}{capability[1]}; rebuild with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]}"]
    return []


GROUPED_KV_REASON = "grouped-query attention (H_kv < H) is not supported by the CUDA kernels yet"
FEATURES = ("dropout", "ranges", "halo", "lse_grad", "dropout_offset")
# Pairs of features the kernels do not combine (the kHalo kernels, which also take the dropout offset, have no ranges).
_EXCLUSIVE = (("ranges", "halo"), ("ranges", "dropout_offset"))


def unsupported_reasons(device, dtype, head_dim, op, features=()) -> list[str]:
    """Accepts the features ``"dropout"``, ``"ranges"`` (per-row key ranges), ``"halo"`` (halo keys),
    ``"lse_grad"`` (``dlse``) and ``"dropout_offset"``, ranges never with the last two together or with the halo;
    declines ``"grouped_kv"`` and any other."""
    reasons = unavailable_reasons(device)
    if "grouped_kv" in features and op == "band_side":
        reasons.append(GROUPED_KV_REASON)  # the csrc kernels index K/V by the query head
    reasons += [f"feature {f!r} is not supported (the CUDA backend takes {FEATURES})" for f in features
                if f not in FEATURES and f != "grouped_kv"]
    reasons += [f"features {a!r} and {b!r} are not supported together" for a, b in _EXCLUSIVE
                if a in features and b in features]
    if reasons:
        return reasons
    if op == "block_aggregate":
        if dtype not in AGGREGATE_DTYPES:
            reasons.append(f"block_aggregate takes {AGGREGATE_DTYPES}; got {dtype}")
        return reasons
    if dtype not in SUPPORTED_DTYPES:
        reasons.append(f"the attention kernels take float16 / bfloat16 (tensor-core mma); got {dtype}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        # 16 would need its own tile shape (a 16-wide k-step per tile); the torch/Triton backends cover it.
        reasons.append(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}; got {head_dim}")
    return reasons


# ------------------------------------------------------------------------------------------------------
# The backend contract (see longattn.backends)
# ------------------------------------------------------------------------------------------------------


def _halo_kwargs(q, k, left, right, key_ranges, side_ranges, halo_k, halo_v, halo_mask, halo_left):
    """The raw ops' halo keywords ({} without halo keys), after the checks the kernels need (ValueError naming the
    keyword, before any launch; the raw ops repeat them as RuntimeErrors)."""
    if halo_k is None:
        if halo_v is not None or halo_mask is not None or halo_left:
            raise ValueError("halo_k: required with halo_v / halo_mask / halo_left, got None")
        return {}
    if key_ranges is not None or side_ranges is not None:
        raise ValueError("key_ranges / side_ranges: not supported with halo keys (halo_k) on the CUDA backend")
    if halo_v is None:
        raise ValueError("halo_v: required with halo_k, got None")
    B, S, H, D = q.shape
    for name, t in (("halo_k", halo_k), ("halo_v", halo_v)):
        if t.dim() != 4 or t.shape[0] != B or tuple(t.shape[2:]) != tuple(k.shape[2:]) or t.shape != halo_k.shape:
            raise ValueError(f"{name}: expected shape (B, HL + HR, H, D) = ({B}, {halo_k.shape[1]}, "
                             f"{k.shape[2]}, {D}) like halo_k, got {tuple(t.shape)}")
        if t.dtype != k.dtype or t.device != k.device:
            raise ValueError(f"{name}: expected k's dtype and device ({k.dtype}, {k.device}), got "
                             f"({t.dtype}, {t.device})")
        if t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")
    rows = halo_k.shape[1]
    if isinstance(halo_left, bool) or not isinstance(halo_left, int) or not 0 <= halo_left <= rows:
        raise ValueError(f"halo_left: expected an int in [0, HL + HR] = [0, {rows}], got {halo_left!r}")
    if halo_mask is not None and (halo_mask.dtype != torch.bool or tuple(halo_mask.shape) != (B, rows)
                                  or halo_mask.device != k.device or not halo_mask.is_contiguous()):
        raise ValueError(f"halo_mask: expected a contiguous bool ({B}, {rows}) tensor on {k.device}, got "
                         f"{halo_mask.dtype} {tuple(halo_mask.shape)} on {halo_mask.device}")
    for name, offset, most in (("left", left, S + halo_left - 1), ("right", right, S + rows - halo_left - 1)):
        if not 0 <= offset <= max(most, 0):
            raise ValueError(f"{name}: expected a value in [0, {max(most, 0)}] with this halo, got {offset}")
    return {"halo_k": halo_k, "halo_v": halo_v, "halo_mask": halo_mask, "halo_left": halo_left}


def _offset_kwargs(q, halo_k, halo_left, dropout_p, global_rows, key_ranges, side_ranges, dropout_offset):
    """The raw ops' ``dropout_offset`` keyword ({} for 0), after the checks the kernels need (ValueError naming the
    keyword, before any launch; the raw ops repeat them). The ids ``i + offset`` / ``j + offset`` are ints in the
    kernels, up to the last 64-tile's end."""
    if isinstance(dropout_offset, bool) or not isinstance(dropout_offset, int) or dropout_offset < 0 \
            or dropout_offset % 4:
        raise ValueError(f"dropout_offset: expected a non-negative multiple of 4, got {dropout_offset!r}")
    if not dropout_offset:
        return {}
    if not dropout_p:
        raise ValueError(f"dropout_offset: only with dropout_p > 0, got {dropout_offset} with dropout_p = {dropout_p}")
    if global_rows:
        raise ValueError(f"dropout_offset: not with global_rows (Longformer's global rows), got {dropout_offset}")
    if key_ranges is not None or side_ranges is not None:
        raise ValueError("dropout_offset: not supported with key_ranges / side_ranges on the CUDA backend, got "
                         f"{dropout_offset}")
    hr = 0 if halo_k is None else halo_k.shape[1] - halo_left
    if dropout_offset + q.shape[1] + hr >= 2**31 - 128:
        raise ValueError(f"dropout_offset: expected dropout_offset + S + HR < 2^31 - 128, got {dropout_offset} + "
                         f"{q.shape[1]} + {hr}")
    return {"dropout_offset": dropout_offset}


def _check_dlse(dlse, lse):
    if dlse is not None and (dlse.dtype != torch.float32 or dlse.shape != lse.shape or dlse.device != lse.device):
        raise ValueError(f"dlse: expected a float32 {tuple(lse.shape)} tensor on {lse.device} like lse, got "
                         f"{dlse.dtype} {tuple(dlse.shape)} on {dlse.device}")


def band_side_forward(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias,
                      left, right, scale, dropout_p=0.0, rng=None, global_rows=False, key_ranges=None,
                      side_ranges=None, *, halo_k=None, halo_v=None, halo_mask=None, halo_left=0, dropout_offset=0):
    """``global_rows``: the rows are Longformer global rows (slot s = row s; the global-row dropout counters).
    ``key_ranges`` / ``side_ranges``: None or contiguous int32 (B, S, 2), row i's band / side keys [lo, hi)
    (with ``global_rows``, ``side_ranges`` holds each slot's key range: the tokens are the side keys).
    ``halo_*``: band keys beyond both ends of the sequence, read in place (notes/halo_contract.md); passed only
    when used, never with ranges. ``dropout_offset``: with dropout, the counters' position of row 0 and band key 0
    (a multiple of 4; never with ranges or global rows)."""
    halo = _halo_kwargs(q, k, left, right, key_ranges, side_ranges, halo_k, halo_v, halo_mask, halo_left)
    halo.update(_offset_kwargs(q, halo_k, halo_left, dropout_p, global_rows, key_ranges, side_ranges, dropout_offset))
    return tuple(torch.ops.longattn.cuda_band_side_fwd(
        q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left, right,
        float(scale), float(dropout_p), rng, global_rows, key_ranges, side_ranges, **halo))


def band_side_backward(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block,
                       band_bias, side_bias, left, right, scale, dropout_p=0.0, rng=None, global_rows=False,
                       key_ranges=None, side_ranges=None, *, halo_k=None, halo_v=None, halo_mask=None, halo_left=0,
                       dropout_offset=0, dlse=None):
    """The 7 gradients, then (dhalo_k, dhalo_v) when ``halo_k`` is given. ``dlse``: None or float32 (B, H, S), the
    gradient of the forward's ``lse`` (the kernels use ``delta - dlse``; rows with ``lse = +inf`` get none)."""
    halo = _halo_kwargs(q, k, left, right, key_ranges, side_ranges, halo_k, halo_v, halo_mask, halo_left)
    halo.update(_offset_kwargs(q, halo_k, halo_left, dropout_p, global_rows, key_ranges, side_ranges, dropout_offset))
    _check_dlse(dlse, lse)
    grads = torch.ops.longattn.cuda_band_side_bwd(
        dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias, side_bias,
        left, right, float(scale), float(dropout_p), rng, global_rows, key_ranges, side_ranges, **halo,
        **({} if dlse is None else {"dlse": dlse}))
    return tuple(grads) if halo_k is not None else tuple(grads[:7])


def block_aggregate_forward(x, block_ids, num_blocks, weight, eps):
    return tuple(torch.ops.longattn.cuda_block_aggregate_fwd(x, block_ids, num_blocks, weight, float(eps)))


def block_aggregate_backward(dout, x, block_ids, num_blocks, weight, sums, rstd, eps):
    return tuple(torch.ops.longattn.cuda_block_aggregate_bwd(dout, x, block_ids, num_blocks, weight, sums, rstd,
                                                             float(eps)))


def longformer_band_forward(q, k, v, pos, used, band_rows, key_padding_mask, left, right, scale, dropout_p=0.0,
                            rng=None, *, key_ranges=None, side_ranges=None):
    """Longformer's band pass (``_longformer`` step 2) in one launch -> (out, lse): the used slots' tokens ``pos``
    (B, G) int64 of k, v are the side keys, read in place (side key id = slot g for dropout); rows not in
    ``key_padding_mask`` (None: all real) get out = 0 and rows not in ``band_rows`` lse = +inf in the kernel.
    ``key_ranges`` / ``side_ranges``: None or contiguous int32 (B, S, 2) (packed batches, ``_longformer.slot_ranges``):
    row i's band keys and its slots ``[lo, hi)`` (slot g is token ``pos[b, g]``), read by the same launch (the
    kernels' kIndexed && kRanges instantiation)."""
    return tuple(torch.ops.longattn.cuda_band_side_fwd(
        q, k, v, k, v, band_rows, used, None, None, None, left, right, float(scale), float(dropout_p), rng,
        key_ranges=key_ranges, side_ranges=side_ranges, side_index=pos, query_mask=key_padding_mask,
        band_rows_only=True))


def longformer_band_backward(dout, q, k, v, out, lse, pos, used, band_rows, left, right, scale, dropout_p=0.0,
                             rng=None, *, key_ranges=None, side_ranges=None):
    """Backward of ``longformer_band_forward`` -> (dq, dk, dv): the side keys' dK/dV added into rows ``pos`` of
    dk, dv by a kernel, in a fixed order (the used slots name distinct tokens, which are never band keys, so those
    rows are exactly the side-key gradients); ``key_ranges`` / ``side_ranges`` as in the forward, same launches."""
    grads = torch.ops.longattn.cuda_band_side_bwd(
        dout, q, k, v, k, v, out, lse, band_rows, used, None, None, None, left, right, float(scale),
        float(dropout_p), rng, key_ranges=key_ranges, side_ranges=side_ranges, side_index=pos)
    return grads[0], grads[1], grads[2]


# ------------------------------------------------------------------------------------------------------
# Longformer's slot layout and global rows (longattn.backends._longformer) on the glue kernels of csrc/longformer
# ------------------------------------------------------------------------------------------------------


def global_slots(global_mask, key_padding_mask, G, zero=None):
    """Longformer's slot layout (``_longformer.global_slots``, bitwise equal) in one launch -> (band_rows (B, S) bool,
    pos (B, G) int64, used (B, G) bool), all contiguous; the masks are read in place (any strides). ``zero``: None, or
    a contiguous int32 tensor the same launch zeroes (``longformer_forward``'s arrival counters)."""
    if global_mask.dtype != torch.bool or global_mask.dim() != 2:
        raise ValueError(f"global_mask: expected a bool (B, S) tensor, got {global_mask.dtype} "
                         f"{tuple(global_mask.shape)}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != global_mask.shape
                                         or key_padding_mask.device != global_mask.device):
        raise ValueError(f"key_padding_mask: expected a bool {tuple(global_mask.shape)} tensor on "
                         f"{global_mask.device} like global_mask, got {key_padding_mask.dtype} "
                         f"{tuple(key_padding_mask.shape)} on {key_padding_mask.device}")
    if isinstance(G, bool) or not isinstance(G, int) or not 0 <= G <= global_mask.shape[1]:
        raise ValueError(f"G: expected an int in [0, S] = [0, {global_mask.shape[1]}], got {G!r}")
    extra = () if zero is None else (zero,)  # (a library built before ``zero`` takes the call without it)
    return tuple(torch.ops.longattn.cuda_longformer_global_slots(global_mask, key_padding_mask, G, *extra))


_TILE = 64  # the kernels' query tile: slots per split CTA of the fused forward (its counters: one per slot tile)
_FUSED_FORWARD = _C is not None and hasattr(torch.ops.longattn, "cuda_longformer_fwd")  # else a library to rebuild
_THIS = sys.modules[__name__]


def longformer_forward(q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left, right, scale, G,
                       dropout_p=0.0, rng=None, key_ranges=None):
    """Longformer's whole forward (``_longformer.forward``'s contract) in two launches: the slots kernel, which also
    zeroes the arrival counters, then ``cuda_longformer_fwd`` (``csrc/longformer/fused_fwd.h``): one grid whose
    leading CTAs are the global rows' split-KV CTAs (the slot queries, read in place at ``pos``, against one
    ``_longformer.KeySplits`` key split each; the last CTA of a slot tile to arrive merges its splits into the used
    slots' rows of out and glse, in split order) and whose other CTAs are the band pass (``longformer_band_forward``'s
    kIndexed kernel, which leaves those rows to the merge). Bitwise the composed path's result (the same tile code and
    merge), in 2 launches instead of 4.

    The composed path (``_longformer.composed_forward`` on this backend's functions) runs what is not fused: no slots
    (G = 0: slots and band pass, 2 launches already) and dropout (one unsplit global-rows pass, 4 launches). Per-row
    key ranges (packed batches) are fused (their ``slot_ranges`` / ``KeySplits.ranges`` are torch ops on a first call,
    kept for the next, as in the composed path), as are separate global projections; an S that no split size near
    ``SPLIT_KEYS`` divides pads copies of k_global / v_global and the key mask (``KeySplits.keys``), as before."""
    if not G or dropout_p or not _FUSED_FORWARD:
        return _longformer.composed_forward(_THIS, q, k, v, q_global, k_global, v_global, global_mask,
                                            key_padding_mask, left, right, scale, G, dropout_p, rng, key_ranges)
    B, S, H, _ = q.shape
    qg, kg, vg = _longformer.global_projections(q, k, v, q_global, k_global, v_global)
    counter = torch.empty(B * H * -(-G // _TILE), dtype=torch.int32, device=q.device)
    band_rows, pos, used = global_slots(global_mask, key_padding_mask, G, zero=counter)
    band_ranges, row_ranges = _longformer.slot_ranges(global_mask, key_padding_mask, pos, used, G, key_ranges)
    sp = _longformer.key_splits(S, {})
    out, lse, glse = torch.ops.longattn.cuda_longformer_fwd(
        q, k, v, band_rows, pos, used, key_padding_mask, left, right, float(scale), qg, sp.keys(kg), sp.keys(vg),
        sp.key_mask(key_padding_mask, B, q.device), counter, key_ranges=band_ranges.get("key_ranges"),
        side_ranges=band_ranges.get("side_ranges"), split_ranges=sp.ranges(row_ranges.get("key_ranges")))
    return out, lse, glse, band_rows, pos, used


_FUSED_BACKWARD = _C is not None and hasattr(torch.ops.longattn, "cuda_longformer_bwd")  # else a library to rebuild


def longformer_backward(dout, q, k, v, q_global, k_global, v_global, out, lse, glse, band_rows, pos, used, global_mask,
                        key_padding_mask, left, right, scale, dropout_p=0.0, rng=None, key_ranges=None):
    """Longformer's whole backward (``_longformer.backward``'s contract) in one raw op and 4 launches
    (``csrc/longformer/fused_bwd.h``): one delta launch for the band pass's rows and the global rows'; one dQ launch
    whose leading CTAs are the global rows' split dQ CTAs (the slot queries, read in place at ``pos``, against one
    ``_longformer.KeySplits`` key split each, with the merged ``glse``) and whose other CTAs are the band pass's; the
    band pass's dK/dV; one last grid (``csrc/longformer/fused_bwd_rows.h``) of the global rows' dK/dV, added into dk /
    dv (k / v shared) or stored per split (separate ``k_global`` and ``v_global``: ``KeySplits.unkeys`` of them, views
    unless the last split is padded), beside the band pass's finish (its side-key partials added into rows ``pos`` of
    dk / dv: with k / v shared by the CTA that owns the row, before its own add) and the splits' dq rows summed
    into rows ``pos`` of dq (or of dq_global, which the delta launch zeroes, with a separate ``q_global``). Bitwise the
    composed path's gradients (the same tile code, and every element's adds in the same order), in 4 launches instead
    of 8.

    The composed path (``_longformer.composed_backward``) runs what is not fused: no slots (G = 0: the band pass, 4
    launches), dropout, and one of ``k_global`` / ``v_global`` without the other. Per-row key ranges (packed batches)
    are fused, their ranges kept from the forward's call as in the composed path; an S that no split size near
    ``SPLIT_KEYS`` divides pads copies of the keys and the key mask (and un-pads separate projections' gradients)."""
    G = glse.shape[-1]
    if not G or dropout_p or not _FUSED_BACKWARD or (k_global is None) != (v_global is None):
        return _longformer.composed_backward(_THIS, dout, q, k, v, q_global, k_global, v_global, out, lse, glse,
                                             band_rows, pos, used, global_mask, key_padding_mask, left, right, scale,
                                             dropout_p, rng, key_ranges)
    B, S = q.shape[:2]
    _, kg, vg = _longformer.global_projections(q, k, v, q_global, k_global, v_global)
    band_ranges, row_ranges = _longformer.slot_ranges(global_mask, key_padding_mask, pos, used, G, key_ranges)
    sp = _longformer.key_splits(S, {})
    shared = k_global is None
    dq, dk, dv, dqg, dkg, dvg = torch.ops.longattn.cuda_longformer_bwd(
        dout, q, k, v, out, lse, glse, band_rows, pos, used, left, right, float(scale), sp.keys(kg), sp.keys(vg),
        sp.key_mask(key_padding_mask, B, q.device), key_ranges=band_ranges.get("key_ranges"),
        side_ranges=band_ranges.get("side_ranges"), split_ranges=sp.ranges(row_ranges.get("key_ranges")),
        q_global=q_global, shared_kv=shared)
    # Absent projections get the op's distinct empty (0,) tensors (a custom op's outputs may not alias one another).
    return dq, dk, dv, dqg, dkg if shared else sp.unkeys(dkg), dvg if shared else sp.unkeys(dvg)


def _check_slots(q, pos, used):
    """ValueErrors for the global rows' slot arguments, before any launch (the raw ops repeat them)."""
    B = q.shape[0]
    if pos.dtype != torch.int64 or pos.dim() != 2 or pos.shape[0] != B or pos.device != q.device:
        raise ValueError(f"pos: expected an int64 (B, G) tensor with B = {B} on {q.device}, got {pos.dtype} "
                         f"{tuple(pos.shape)} on {pos.device}")
    if used.dtype != torch.bool or used.shape != pos.shape or used.device != q.device:
        raise ValueError(f"used: expected a bool {tuple(pos.shape)} tensor on {q.device} like pos, got {used.dtype} "
                         f"{tuple(used.shape)} on {used.device}")


def _split_rows_args(sp, q, k, v, pos, key_mask, scale, key_ranges, drop) -> tuple[tuple, dict]:
    """The raw band op's arguments for the global rows (from ``q`` through ``scale``, keywords): the slots' rows of
    ``q`` (B, S, H, D) read in place through ``query_index = pos`` (B, G) by every split (the op's batch is the splits'
    B * C, its rows the G slots), each split's keys as side keys (``KeySplits.keys``: views of k / v, padded copies
    only when S is not a multiple of the split size), ``side_only`` (no band keys: ``q`` stands in for the unused k /
    v), the global-row dropout counters and the per-slot ranges shifted into each split."""
    side_mask = sp.key_mask(key_mask, k.shape[0], k.device)
    kw = {"dropout_global_rows": True, "side_only": True, "query_index": pos}
    if drop:
        kw.update(dropout_p=float(drop["dropout_p"]), rng=drop["rng"])
    if key_ranges is not None:
        kw["side_ranges"] = sp.ranges(key_ranges)
    return (q, q, q, sp.keys(k), sp.keys(v), None, side_mask, None, None, None, 0, 0, float(scale)), kw


def global_rows_forward(q, k, v, pos, used, key_mask, scale, out, dropout_p=0.0, rng=None, *, key_ranges=None):
    """Longformer's global rows (contract: ``_longformer.rows_by_gather``) -> glse (B, H, G), in two raw ops: the
    band op with the key splits (``_longformer.KeySplits``) as batch rows (``side_only``: the split's tokens are the
    only keys; the slots' query rows read in place at ``pos`` by every split, ``query_index``; per-slot ``key_ranges``
    (B, G, 2) shifted into each split), then the splits merged in float32, in split order, by a kernel that writes the
    used slots' rows of ``out`` in place (no gather, copy, where, scatter, masked_fill or mask fill). Dropout keeps
    one split (C = 1: the merge is then the identity)."""
    _check_slots(q, pos, used)
    drop = _longformer.dropout_kwargs(dropout_p, rng)
    sp = _longformer.key_splits(k.shape[1], drop)
    args, kw = _split_rows_args(sp, q, k, v, pos, key_mask, scale, key_ranges, drop)
    parts, lse_parts = torch.ops.longattn.cuda_band_side_fwd(*args, **kw)
    return torch.ops.longattn.cuda_longformer_rows_merge(parts, lse_parts, pos, used, out)


def global_rows_backward(dout, q, k, v, out, glse, pos, used, key_mask, scale, dq_into, dk_into, dv_into,
                         dropout_p=0.0, rng=None, *, key_ranges=None):
    """Backward of ``global_rows_forward`` -> (dq, dk, dv), in two raw ops: the band op's backward over the splits
    (the slots' rows of dout, q and out read in place at ``pos``, ``query_index``; ``lse_split``: each split reads the
    merged ``glse``), then the splits' dq rows summed in float32, in split order, and added into rows ``pos`` of dq by a
    kernel (unused slots, glse = +inf, have none). dq is added into ``dq_into``, else into a new dq the add zeroes
    first. dk / dv: with ``dk_into`` and ``dv_into`` (k / v shared with the band pass) the keys' gradients are added
    into them by the band op's dK/dV epilogue (``dside_k_into`` / ``dside_v_into``); else returned
    (``KeySplits.unkeys`` of the op's split gradients: views, copies only when the last split is padded)."""
    _check_slots(q, pos, used)
    drop = _longformer.dropout_kwargs(dropout_p, rng)
    sp = _longformer.key_splits(k.shape[1], drop)
    args, kw = _split_rows_args(sp, q, k, v, pos, key_mask, scale, key_ranges, drop)
    into = dk_into is not None and dv_into is not None
    if into:
        kw.update(dside_k_into=dk_into, dside_v_into=dv_into)
    grads = torch.ops.longattn.cuda_band_side_bwd(dout, *args[:5], out, glse, *args[5:], lse_split=sp.C, **kw)
    if into:
        dk, dv = dk_into, dv_into
    else:  # one of them at most shared with the band pass (k_global or v_global alone): added here
        dk, dv = sp.unkeys(grads[3]), sp.unkeys(grads[4])
        dk = dk if dk_into is None else dk_into.add_(dk)
        dv = dv if dv_into is None else dv_into.add_(dv)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if dq_into is None else dq_into
    torch.ops.longattn.cuda_longformer_rows_add(grads[0], pos, used, dq, zero_fill=dq_into is None)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------------
# Fake (meta) implementations of the raw ops: shapes and dtypes only, matching csrc/*_api.cpp.
# ------------------------------------------------------------------------------------------------------


def _op_rows(q, side_k, query_index):
    """The raw band op's query rows (B, S, H, D): q's, or with ``query_index`` (the global rows read in place) the key
    splits' batch B = B_q * C (side_k's) by the G slots."""
    if query_index is None:
        return q
    return q.new_empty(side_k.shape[0], query_index.shape[1], *q.shape[2:])


def _register_fakes():
    from .. import _fake

    @torch.library.register_fake("longattn::cuda_band_side_fwd")
    def _(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left, right,
          scale, dropout_p=0.0, rng=None, dropout_global_rows=False, key_ranges=None, side_ranges=None, halo_k=None,
          halo_v=None, halo_mask=None, halo_left=0, dropout_offset=0, side_index=None, query_mask=None,
          band_rows_only=False, side_only=False, query_index=None):
        return _fake.band_side_forward(_op_rows(q, side_k, query_index))

    @torch.library.register_fake("longattn::cuda_band_side_bwd")
    def _(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias,
          side_bias, left, right, scale, dropout_p=0.0, rng=None, dropout_global_rows=False, key_ranges=None,
          side_ranges=None, halo_k=None, halo_v=None, halo_mask=None, halo_left=0, dlse=None, dropout_offset=0,
          side_index=None, side_only=False, lse_split=1, dside_k_into=None, dside_v_into=None, query_index=None):
        q = _op_rows(q, side_k, query_index)
        grads = _fake.band_side_backward(q, k, v, side_k, side_v, band_bias, side_bias, halo_k)
        if side_only:  # no band keys: no dk / dv
            grads = (grads[0], q.new_empty(0), q.new_empty(0), *grads[3:])
        if side_index is not None or dside_k_into is not None:  # the side keys' gradients are in dk / dv or *_into
            grads = (*grads[:3], q.new_empty(0), q.new_empty(0), *grads[5:])
        return grads if halo_k is not None else (*grads, q.new_empty(0), q.new_empty(0))  # always 9

    @torch.library.register_fake("longattn::cuda_block_aggregate_fwd")
    def _(x, block_ids, num_blocks, weight, eps):
        return _fake.block_aggregate_forward(x, num_blocks, weight)

    @torch.library.register_fake("longattn::cuda_block_aggregate_bwd")
    def _(dout, x, block_ids, num_blocks, weight, sums, rstd, eps):
        return _fake.block_aggregate_backward(x, weight)

    if not hasattr(torch.ops.longattn, "cuda_longformer_global_slots"):
        return  # a library built before the Longformer glue ops (rebuild it)

    @torch.library.register_fake("longattn::cuda_longformer_global_slots")
    def _(global_mask, key_padding_mask, G, zero=None):
        B, S = global_mask.shape
        return (global_mask.new_empty(B, S), global_mask.new_empty(B, G, dtype=torch.int64),
                global_mask.new_empty(B, G))

    @torch.library.register_fake("longattn::cuda_longformer_rows_merge")
    def _(out_parts, lse_parts, pos, used, out):
        return lse_parts.new_empty(out.shape[0], out.shape[2], pos.shape[1])

    @torch.library.register_fake("longattn::cuda_longformer_rows_add")
    def _(dq_parts, pos, used, dq, zero_fill=False):
        return None

    if not hasattr(torch.ops.longattn, "cuda_longformer_fwd"):
        return  # a library built before the fused forward (rebuild it)

    @torch.library.register_fake("longattn::cuda_longformer_fwd")
    def _(q, k, v, band_rows, pos, used, key_padding_mask, left, right, scale, q_global, split_k, split_v, split_mask,
          counter, key_ranges=None, side_ranges=None, split_ranges=None):
        out, lse = _fake.band_side_forward(q)
        return out, lse, lse.new_empty(q.shape[0], q.shape[2], pos.shape[1])


    if not hasattr(torch.ops.longattn, "cuda_longformer_bwd"):
        return  # a library built before the fused backward (rebuild it)

    @torch.library.register_fake("longattn::cuda_longformer_bwd")
    def _(dout, q, k, v, out, lse, glse, band_rows, pos, used, left, right, scale, split_k, split_v, split_mask,
          key_ranges=None, side_ranges=None, split_ranges=None, q_global=None, shared_kv=True):
        dense = torch.contiguous_format
        dqg = q.new_empty(0) if q_global is None else torch.empty_like(q, memory_format=dense)
        splits = (q.new_empty(0), q.new_empty(0)) if shared_kv else tuple(
            torch.empty_like(x, memory_format=dense) for x in (split_k, split_v))
        return (*(torch.empty_like(x, memory_format=dense) for x in (q, k, v)), dqg, *splits)


if _C is not None and hasattr(torch.ops.longattn, "cuda_band_side_fwd"):
    _register_fakes()
