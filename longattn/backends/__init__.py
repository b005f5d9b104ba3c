"""The backends of longattn and the contract each one implements.

A backend is a module in this package exposing ``NAME``, two capability functions and four compute
functions. The one dispatch place (``longattn.dispatch``) is the only code that chooses among them; the
custom ops (``longattn._ops``) call the chosen module's functions with inputs the public API has already
validated and normalised, so a backend checks only what it alone cannot do.

Capabilities
------------
``unavailable_reasons(device: torch.device) -> list[str]``
    Why the backend cannot run at all on ``device`` (no GPU, no compiled extension, Triton missing, ...);
    an empty list means it can. Must not initialise CUDA unless ``device`` is a CUDA device.
``unsupported_reasons(device, dtype, head_dim, op) -> list[str]``
    The same plus the reasons it cannot take this dtype / head dim for ``op`` ("band_side" or
    "block_aggregate"; ``head_dim`` is the channel count C for "block_aggregate"). Calls that need an optional
    capability pass it as the keyword ``features`` (only when there is one): ``"grouped_kv"`` (k, v with fewer
    heads than q), ``"dropout"`` (``dropout_p > 0``), ``"ranges"``, ``"halo"``, ``"lse_grad"`` and
    ``"dropout_offset"`` (sections below). ``longattn info`` lists which backend takes which, with the reasons.

The primitive ("band + side keys", DESIGN.md section 1)
-------------------------------------------------------
``band_side_forward(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias,
                    left, right, scale) -> (out, lse)``

- ``q``: (B, S, H, D); ``k, v``: (B, S, H_kv, D) with ``H % H_kv == 0`` (grouped-query attention when
  ``H_kv < H``: query head h reads K/V head ``h // (H // H_kv)``, without repeating K/V in memory); any strides
  with ``stride(-1) == 1``; one float dtype.
- ``side_k, side_v``: (B, G, H_kv, D), same dtype, ``G >= 0``; same stride rule.
- ``band_key_mask``: None or contiguous bool (B, S), True = this token may be a band key.
- ``side_mask``: None or contiguous bool (B, G), True = this side key may be attended.
- ``query_block``: None or contiguous int32 (B, S), meant to be in [-1, G-1] (other values are clamped to it);
  given whenever ``side_bias`` is.
- ``band_bias``: None or contiguous (H, left + right + 1), any float dtype; entry ``[h, j - i + left]``.
- ``side_bias``: None or contiguous (H, 2G + 1), any float dtype; entry ``[h, g - query_block[b, i] + G]``.
- ``left, right``: ints in [0, S - 1] (the public API clamps larger windows, which are equivalent).
- ``scale``: float multiplying ``<q, k>``.
- returns ``out``: contiguous (B, S, H, D) in q's dtype; ``lse``: contiguous float32 (B, H, S) (float64
  for float64 inputs, which only the torch backend takes), the
  natural-log log-sum-exp of each row's scores, ``+inf`` for a row with no key (whose out is 0).

``band_side_backward(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block,
                     band_bias, side_bias, left, right, scale)
    -> (dq, dk, dv, dside_k, dside_v, dband_bias, dside_bias)``

- ``dout``: (B, S, H, D), any strides with a contiguous last dim.
- returns contiguous gradients shaped like their inputs (dk, dv, dside_k, dside_v with H_kv heads: the sums over
  each K/V head's query heads), in the inputs' dtypes; ``dband_bias`` /
  ``dside_bias`` are empty ``(0,)`` tensors when the table is None. Rows with ``lse == +inf`` contribute
  nothing.

Attention dropout: a backend whose ``unsupported_reasons`` accepts the feature ``"dropout"`` (the keyword
``features``, see ``dispatch.unsupported_reasons``; all three do) also takes the keywords ``dropout_p``
(in (0, 1)) and ``rng`` (int64 ``(2,)`` ``[seed, offset]``) on all four attention functions (band and global
rows): probabilities are multiplied by ``keep / (1 - dropout_p)`` after the softmax (``lse`` is the undropped
one), with the keep bits of ``longattn._dropout`` for (b * H + h, row, key); the backward regenerates them.
Without dropout the keywords are not passed at all.

Per-row key ranges (packed batches)
-----------------------------------
A backend whose ``unsupported_reasons`` accepts the feature ``"ranges"`` also takes, on ``band_side_forward`` /
``band_side_backward``, the keywords ``key_ranges`` and ``side_ranges`` (passed only when given, like dropout's):
contiguous int32 ``(B, S, 2)`` tensors; query ``i`` attends band key ``j`` only if ``key_ranges[b, i, 0] <= j <
key_ranges[b, i, 1]`` and side key ``g`` only if ``side_ranges[b, i, 0] <= g < side_ranges[b, i, 1]``, on top of the
window and the masks. Masked pairs contribute to no output and no gradient; dropout counters are unchanged. Any
values are safe (empty, reversed or out-of-range ranges only exclude keys). Packed variable-length batches
(``longattn.varlen_api``) give every row its sequence's bounds, so ranges are non-decreasing along ``i``; kernels
are correct for any values and fast for those: a query tile visits only the key / side tiles its rows' ranges
reach. ``global_rows_forward`` / ``global_rows_backward`` take per-slot ``key_ranges`` ``(B, G, 2)`` (slot ``s``
attends keys in its range), and Triton's ``longformer_band_*`` the band pair.

Halo keys (sequence-parallel shards)
------------------------------------
A backend whose ``unsupported_reasons`` accepts the feature ``"halo"`` also takes, on ``band_side_forward`` /
``band_side_backward``, the keywords ``halo_k``, ``halo_v`` ((B, HL + HR, H_kv, D), k's dtype, unit last stride),
``halo_mask`` (None or contiguous bool (B, HL + HR)) and ``halo_left`` (the int HL), passed only when given. The
band keys are then the extended sequence ``[halo_k[:, :HL] | k | halo_k[:, HL:]]`` at local positions
``-HL .. S + HR - 1`` (its key mask ``[halo_mask[:, :HL] | band_key_mask | halo_mask[:, HL:]]``, None parts all
True); query ``i`` in ``[0, S)`` attends band keys ``i - left <= j <= i + right`` among them, with ``left``, ``right``
up to ``S + HL - 1`` / ``S + HR - 1``. Side keys and biases are unchanged. The result equals today's op on the
extended sequence with zero query rows for the halo, rows ``[HL, HL + S)`` kept, but the kernels read the halo rows
in place (no extended copy, no extra query rows). The backward returns two more gradients, ``dhalo_k, dhalo_v``
(contiguous, like ``halo_k``): a 9-tuple. Not combined with ``key_ranges`` / ``side_ranges``.

Lse gradient
------------
A backend accepting ``"lse_grad"`` takes ``dlse`` ((B, H, S), the statistics dtype) on ``band_side_backward``: the
gradient of the forward's ``lse`` output, so ``dS = P (dP - delta + dlse)`` (the kernels use ``delta - dlse``; rows
with ``lse = +inf`` get no gradient whatever ``dlse`` holds). Split-KV merges by log-sum-exp differentiate
through it (``longattn.distributed``'s global rows).

Dropout offset
--------------
A backend accepting ``"dropout_offset"`` takes ``dropout_offset`` (an int, a multiple of 4) with the dropout
keywords: query ``i`` draws the counters of row ``i + dropout_offset`` and band key ``j`` (halo keys included, at
their local positions) those of key ``j + dropout_offset``; side keys keep theirs. A sequence-parallel shard passes
its start, so its keep bits are the whole sequence's (``longattn.distributed.band``).

Longformer's global rows
------------------------
``longattn.backends._longformer`` assembles the Longformer op from ``band_side_forward`` / ``band_side_backward``
and two functions every backend exposes (contract in ``_longformer.rows_by_gather``):

``global_rows_forward(q, k, v, pos, used, key_mask, scale, out) -> glse``
    rows ``pos`` (B, G) int64 of q (B, S, H, D) attend every real token of k, v; the ``used`` (B, G) slots'
    results overwrite those rows of ``out`` in place; ``glse`` (B, H, G) float32 is +inf for unused slots.
``global_rows_backward(dout, q, k, v, out, glse, pos, used, key_mask, scale, dq_into, dk_into, dv_into)
    -> (dq, dk, dv)``: each gradient added into the given ``*_into`` tensor (and returned), or new.

The torch backend splits the keys into chunks merged by log-sum-exp; Triton runs ``triton_kernels.global_rows``
(split-KV kernels, deterministic); CUDA runs its band op with the slot queries as the sequence and the tokens
as side keys, split-KV: 1024-key splits as batch rows of the op (each reads the rows in place), the splits merged by
log-sum-exp into ``out`` by small kernels of its own (``csrc/longformer``; ``_longformer.rows_via_band_side`` is
the same composition in torch ops).

Optionally, a backend may also run Longformer's band pass itself (the Triton and CUDA backends do), in which case
``_longformer`` calls these instead of gathering the global tokens' k, v, scattering their gradients back and
masking rows around ``band_side_forward`` / ``band_side_backward``:

``longformer_band_forward(q, k, v, pos, used, band_rows, key_padding_mask, left, right, scale, dropout_p, rng)
    -> (out, lse)``: the used slots' tokens ``pos`` (B, G) of k, v are the side keys, read in place; rows not
    in ``key_padding_mask`` get out = 0, rows not in ``band_rows`` lse = +inf.
``longformer_band_backward(dout, q, k, v, out, lse, pos, used, band_rows, left, right, scale, dropout_p, rng)
    -> (dq, dk, dv)``: the side keys' dK/dV added into the rows ``pos`` of dk, dv, deterministically.

A backend may also compute the slot layout itself (the Triton and CUDA backends do, each in one kernel):

``global_slots(global_mask, key_padding_mask, G) -> (band_rows, pos, used)``
    bitwise equal to ``_longformer.global_slots`` (its docstring states the layout), unused slots included: bool
    ``band_rows`` (B, S), contiguous int64 ``pos`` and bool ``used`` (B, G); bool masks with any strides,
    ``0 <= G <= S``.

Or the whole op (the Triton backend: the slots kernel and one band launch led by the global rows' programs forward,
the band backward's four launches with the global rows folded in, ``triton_kernels/longformer.py``; the CUDA backend:
the slots kernel and ``cuda_longformer_fwd`` forward, ``cuda_longformer_bwd``'s four launches backward,
``csrc/longformer/fused_*.h``, each falling back to the composition for dropout):

``longformer_forward(q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left, right, scale, G,
    dropout_p, rng, key_ranges) -> (out, lse, glse, band_rows, pos, used)`` and
``longformer_backward(dout, q, k, v, q_global, k_global, v_global, out, lse, glse, band_rows, pos, used,
    global_mask, key_padding_mask, left, right, scale, dropout_p, rng, key_ranges) -> (dq, dk, dv, dq_global,
    dk_global, dv_global)``: ``_longformer.forward`` / ``backward``'s results (their docstrings), the computation of
    ``_longformer.composed_forward`` / ``composed_backward``, which a backend may call for cases it does not fuse.

Index values
------------
Index tensors are never range-checked on the host outside debug mode (that would sync), so every backend
must be safe for any value: ``query_block`` is clamped where it indexes ``side_bias``, ``block_ids`` outside
``[0, num_blocks)`` are dropped like -1, global slots beyond ``max_globals`` are not attended. No value may
cause an out-of-bounds access.

Block aggregation (LongT5's side tokens)
----------------------------------------
``block_aggregate_forward(x, block_ids, num_blocks, weight, eps) -> (out, sums, rstd)``

- ``x``: (B, S, C) float, stride(-1) == 1; ``block_ids``: contiguous int32 (B, S), -1 or any value outside
  [0, num_blocks) = dropped; ``weight``: None or contiguous (C,).
- ``sums[b, g] = sum of x[b, s] over s with block_ids[b, s] == g`` (accumulated in float32).
- without weight: ``out = sums`` in x's dtype, and ``sums``/``rstd`` are returned empty ``(0,)``.
- with weight: ``rstd = rsqrt(mean(sums**2, -1) + eps)`` (float32, (B, G)), ``out = weight * sums * rstd``
  in x's dtype, and ``sums`` is returned as float32 (B, G, C) for the backward. (Statistics are float64
  for float64 inputs, as for ``lse``.) Outputs never alias one another or the inputs.

``block_aggregate_backward(dout, x, block_ids, num_blocks, weight, sums, rstd, eps) -> (dx, dweight)``

- ``dx``: contiguous (B, S, C) in x's dtype, 0 for dropped tokens; ``dweight``: (C,) in weight's dtype,
  or empty ``(0,)`` when weight is None.
"""

from __future__ import annotations

BACKEND_MODULES = {
    "torch": "longattn.backends.torch_backend",
    "triton": "longattn.backends.triton_backend",
    "cuda": "longattn.backends.cuda_backend",
}
