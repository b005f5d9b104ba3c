"""The torch.library custom ops behind the public API (namespace ``longattn``): the one dispatch layer.

Three forward ops (the band + side-keys primitive, Longformer attention, block aggregation) and their
backward ops, each with a fake (meta) implementation, and autograd formulas connecting them. The ``backend``
argument is already resolved to a concrete name ("torch", "triton", "cuda") by the public API; the op body
hands the call to that backend module (contract in ``longattn.backends``), whose launcher starts the kernels.
Each public call is one of these ops in the forward and one in the backward: nothing else touches the device.

Attention dropout: the attention ops take ``dropout_p`` and ``rng`` (the int64 ``[seed, offset]`` tensor the public
API drew, ``longattn._dropout``) as inputs, so each op stays a deterministic function of its inputs; the autograd
context saves ``rng`` and the backward op regenerates the same keep mask from it (nothing S x window is saved).
``dropout_p = 0`` (``rng`` None) calls the backends exactly as before, without dropout keywords.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from . import _fake
from .backends import _longformer
from .backends._longformer import dropout_kwargs, halo_kwargs, ranges_kwargs
from .dispatch import get_backend


def _dense_grad(dout: Tensor | None, out: Tensor, shape=None) -> Tensor:
    """The output gradient as the kernels take it: zeros when autograd passes none (grads are not
    materialised, so the statistics outputs never cost a zero tensor), a dense last dim otherwise (e.g. the
    expanded gradient of ``.sum()``)."""
    if dout is None:
        return out.new_zeros(out.shape if shape is None else shape)
    # is_contiguous() (a cached flag) first: a third of stride(-1)'s cost on the common dense gradient.
    return dout if dout.is_contiguous() or dout.stride(-1) == 1 else dout.contiguous()


def _plain_eager(x: Tensor) -> bool:
    """True when calling an op's Python implementation directly runs exactly what calling the op would, only
    without the C++ dispatcher's round trip into Python (11 us per op call on this project's CPU): eager mode (not
    ``torch.compile`` / ``make_fx`` tracing), below autograd (grad mode off: an ``autograd.Function``'s forward, a
    backward without ``create_graph``, ``no_grad``), no Python dispatch or function mode (a ``FakeTensorMode``, a
    ``TorchDispatchMode`` that must see the op as one call), no functorch transform, no profiler (whose trace
    then shows the op by name), and ``x`` (the op's first tensor) not on the meta device (where the op runs its
    fake)."""
    return not (_grad_enabled() or _dispatch_modes() or _function_modes() or _functorch_active() or _compiling()
                or _profiling() or x.is_meta)


# The checks of ``_plain_eager`` bound once (each dotted lookup costs on every op call); the same function objects,
# so torch.compile still recognises them.
_grad_enabled, _compiling = torch.is_grad_enabled, torch.compiler.is_compiling
_dispatch_modes, _function_modes = torch._C._len_torch_dispatch_stack, torch._C._len_torch_function_stack
_functorch_active, _profiling = torch._C._are_functorch_transforms_active, torch._C._autograd._profiler_enabled


def _call(op, *args):
    """``op(*args)``, or in plain eager mode (``_plain_eager``) the op's one Python implementation called directly."""
    return op._init_fn(*args) if _plain_eager(args[0]) else op(*args)


def _autograd(op, backward, setup_context, grad_inputs, differentiable: int = 1):
    """Register ``op``'s autograd formula and return the function the public API calls (``_eager_function``)."""
    op.register_autograd(backward, setup_context=setup_context)
    return _eager_function(op, backward, setup_context, grad_inputs, differentiable)


_OUTPUT = threading.local()  # the full op output of an eager Function's forward, for ``call`` to hand back


def _eager_function(op, backward, setup_context, grad_inputs, differentiable: int):
    """The function the public API calls for ``op`` (whose autograd formula is ``backward`` / ``setup_context``).

    Eager calls with gradients go through an ``autograd.Function`` carrying the same formula, not through the
    custom op's own autograd wrapper: that wrapper re-reads the op's schema on every call
    (``torch._library.utils.fill_defaults``, quadratic in the argument count: 41 us per call for band_side's
    14 arguments, 9 us for block_aggregate's 6, measured on this project's CPU). Under ``torch.compile`` the op
    (and its registered formula) runs. Every other call of a forward or backward op goes through ``_call``: in
    plain eager mode the op's implementation directly, else the op (so a dispatch mode sees it, fakes run on
    fake tensors). Every path runs the one implementation and the one formula.

    The Function's autograd outputs are the op's first ``differentiable`` outputs; ``call`` returns the others (the
    statistics and slot layouts, which the caller does not differentiate) as plain tensors, which the formula saves
    like any intermediate. Each further autograd output would cost 1 to 2 us per call (autograd wraps it, the
    backward receives its gradient, a saved output is re-wrapped when unpacked). The formula's backward takes the
    gradients of the first ``differentiable`` outputs, the others defaulting to None (no gradient reached them).

    Likewise the Function's inputs are the op's whole input tuple (one argument, which autograd does not look into)
    and then only the inputs that can take a gradient, ``grad_inputs(inputs)`` (by position, so the same function
    picks their gradients out of the formula's): masks, index tensors and numbers never do, and each Function input
    costs autograd time in the forward and the backward (0.2 us each, measured).
    """

    class _Fn(torch.autograd.Function):
        # forward(ctx, ...) style: the setup_context style binds the arguments with inspect on every call.
        @staticmethod
        def forward(ctx, inputs, *_):  # *_: grad_inputs(inputs), passed for autograd to track
            output = _call(op, *inputs)
            setup_context(ctx, inputs, output)
            _OUTPUT.value = output
            return output[0] if differentiable == 1 else output[:differentiable]

    def fn_backward(ctx, *grads):
        return (None, *grad_inputs(backward(ctx, *grads)))

    _Fn.backward = staticmethod(fn_backward)
    _Fn.__name__ = _Fn.__qualname__ = f"{op._name.split('::')[-1]}_fn"

    def call(*inputs):
        if _grad_enabled() and not _compiling():
            head = _Fn.apply(inputs, *grad_inputs(inputs))
            output, _OUTPUT.value = _OUTPUT.value, None
            return ((head,) if differentiable == 1 else head) + output[differentiable:]
        return _call(op, *inputs)

    return call


# --------------------------------------------------------------------------------------------------------
# band + side keys attention
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("longattn::band_side_attention", mutates_args=())
def band_side_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    side_k: Tensor | None,
    side_v: Tensor | None,
    band_key_mask: Tensor | None,
    side_mask: Tensor | None,
    query_block: Tensor | None,
    band_bias: Tensor | None,
    side_bias: Tensor | None,
    left: int,
    right: int,
    scale: float,
    backend: str,
    dropout_p: float = 0.0,
    rng: Tensor | None = None,
    key_ranges: Tensor | None = None,
    side_ranges: Tensor | None = None,
    halo_k: Tensor | None = None,
    halo_v: Tensor | None = None,
    halo_mask: Tensor | None = None,
    halo_left: int = 0,
    dropout_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """(out (B, S, H, D), lse (B, H, S)); see ``longattn.backends`` for the exact contract.

    ``side_k = side_v = None`` means no side keys (G = 0; the local op passes None so that it allocates
    nothing outside the op). ``key_ranges`` / ``side_ranges``: per-row (B, S, 2) int32 key bounds (packed batches,
    ``longattn.varlen_api``). ``halo_k`` / ``halo_v`` (B, HL + HR, H_kv, D), ``halo_mask``, ``halo_left`` = HL: band
    keys before and after the sequence, read in place (a sequence-parallel shard's neighbours' keys).
    ``dropout_offset``: the dropout counters' position of row 0 and band key 0 (a shard's start in its sequence)."""
    if side_k is None:
        side_k = side_v = _no_side_keys(k)
    if not dropout_p and key_ranges is None and side_ranges is None and halo_k is None:  # no optional keyword
        return get_backend(backend).band_side_forward(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block,
                                                      band_bias, side_bias, left, right, scale)
    return get_backend(backend).band_side_forward(
        q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left, right, scale,
        **dropout_kwargs(dropout_p, rng, dropout_offset), **ranges_kwargs(key_ranges, side_ranges),
        **halo_kwargs(halo_k, halo_v, halo_mask, halo_left),
    )


def _no_side_keys(k):
    """The (B, 0, H_kv, D) side keys (and values) of a call without any: with k's head count (side keys are keys:
    H_kv heads under grouped-query attention)."""
    return k.new_empty(k.shape[0], 0, k.shape[2], k.shape[3])


@band_side_attention.register_fake
def _(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left, right,
      scale, backend, dropout_p=0.0, rng=None, key_ranges=None, side_ranges=None, halo_k=None, halo_v=None,
      halo_mask=None, halo_left=0, dropout_offset=0):
    return _fake.band_side_forward(q)


@torch.library.custom_op("longattn::band_side_attention_backward", mutates_args=())
def band_side_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    side_k: Tensor | None,
    side_v: Tensor | None,
    out: Tensor,
    lse: Tensor,
    band_key_mask: Tensor | None,
    side_mask: Tensor | None,
    query_block: Tensor | None,
    band_bias: Tensor | None,
    side_bias: Tensor | None,
    left: int,
    right: int,
    scale: float,
    backend: str,
    dropout_p: float = 0.0,
    rng: Tensor | None = None,
    key_ranges: Tensor | None = None,
    side_ranges: Tensor | None = None,
    dropout_offset: int = 0,
    dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dside_k, dside_v, dband_bias, dside_bias); absent bias tables get empty gradients. ``dlse``: the
    gradient of the forward's ``lse`` output, or None (no gradient reached it)."""
    if not dropout_p and key_ranges is None and side_ranges is None and dlse is None:  # no optional keyword
        if side_k is None:
            side_k = side_v = _no_side_keys(k)
        return tuple(get_backend(backend).band_side_backward(dout, q, k, v, side_k, side_v, out, lse, band_key_mask,
                                                             side_mask, query_block, band_bias, side_bias, left,
                                                             right, scale))
    return _band_side_grads(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias,
                            side_bias, left, right, scale, backend, dropout_p, rng, key_ranges, side_ranges, None, None,
                            None, 0, dropout_offset, dlse)


@band_side_attention_backward.register_fake
def _(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias, side_bias,
      left, right, scale, backend, dropout_p=0.0, rng=None, key_ranges=None, side_ranges=None, dropout_offset=0,
      dlse=None):
    return _fake.band_side_backward(q, k, v, side_k, side_v, band_bias, side_bias)


@torch.library.custom_op("longattn::band_side_halo_attention_backward", mutates_args=())
def band_side_halo_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    side_k: Tensor | None,
    side_v: Tensor | None,
    out: Tensor,
    lse: Tensor,
    band_key_mask: Tensor | None,
    side_mask: Tensor | None,
    query_block: Tensor | None,
    band_bias: Tensor | None,
    side_bias: Tensor | None,
    left: int,
    right: int,
    scale: float,
    backend: str,
    dropout_p: float,
    rng: Tensor | None,
    key_ranges: Tensor | None,
    side_ranges: Tensor | None,
    halo_k: Tensor,
    halo_v: Tensor,
    halo_mask: Tensor | None,
    halo_left: int,
    dropout_offset: int = 0,
    dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward of a call with halo keys: ``band_side_attention_backward``'s gradients, then (dhalo_k,
    dhalo_v). (Its own op, so calls without a halo keep their seven outputs: no empty tensors on the hot path.)"""
    return _band_side_grads(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias,
                            side_bias, left, right, scale, backend, dropout_p, rng, key_ranges, side_ranges, halo_k,
                            halo_v, halo_mask, halo_left, dropout_offset, dlse)


@band_side_halo_attention_backward.register_fake
def _(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias, side_bias,
      left, right, scale, backend, dropout_p, rng, key_ranges, side_ranges, halo_k, halo_v, halo_mask, halo_left,
      dropout_offset=0, dlse=None):
    return _fake.band_side_backward(q, k, v, side_k, side_v, band_bias, side_bias, halo_k)


def _band_side_grads(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias,
                     side_bias, left, right, scale, backend, dropout_p, rng, key_ranges, side_ranges, halo_k, halo_v,
                     halo_mask, halo_left, dropout_offset, dlse):
    """The one implementation of both backward ops: the backend's ``band_side_backward`` with the optional
    keywords of the features the call uses (contract: ``longattn.backends``)."""
    if side_k is None:
        side_k = side_v = _no_side_keys(k)
    return tuple(get_backend(backend).band_side_backward(
        dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias,
        side_bias, left, right, scale, **dropout_kwargs(dropout_p, rng, dropout_offset),
        **ranges_kwargs(key_ranges, side_ranges), **halo_kwargs(halo_k, halo_v, halo_mask, halo_left),
        **({} if dlse is None else {"dlse": dlse}),
    ))


def _optional_tail(inputs, fixed: int, defaults: tuple) -> tuple:
    """The optional trailing inputs of an op call (``inputs[fixed:]``, ``inputs`` a tuple), padded with their
    ``defaults``."""
    return defaults if len(inputs) == fixed else tuple(inputs[fixed:]) + defaults[len(inputs) - fixed:]


# dropout_p, rng, key_ranges, side_ranges, halo_k, halo_v, halo_mask, halo_left, dropout_offset
_BAND_SIDE_TAIL = (0.0, None, None, None, None, None, None, 0, 0)


_NO_TENSORS = (None,) * 6  # rng, key_ranges, side_ranges, halo_k, halo_v, halo_mask (not saved)


def _band_side_setup_context(ctx, inputs, output):
    (q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left, right,
     scale, backend, *optional) = inputs
    out, lse = output
    if optional:
        dropout_p, rng, key_ranges, side_ranges, halo_k, halo_v, halo_mask, halo_left, dropout_offset = (
            _optional_tail(inputs, 14, _BAND_SIDE_TAIL))
        ctx.save_for_backward(q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias,
                              side_bias, rng, key_ranges, side_ranges, halo_k, halo_v, halo_mask)
    else:  # the six optional tensors are None: not saved (a saved None costs too)
        dropout_p, halo_left, dropout_offset = 0.0, 0, 0
        ctx.save_for_backward(q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias,
                              side_bias)
    ctx.args = (left, right, scale, backend, dropout_p, halo_left, dropout_offset, len(inputs))  # one attribute
    ctx.materialize_grads = False  # set_materialize_grads(False) without its Python frame


def _band_side_backward(ctx, dout, dlse=None):
    (q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias, side_bias,
     *optional) = ctx.saved_tensors
    rng, key_ranges, side_ranges, halo_k, halo_v, halo_mask = optional or _NO_TENSORS
    left, right, scale, backend, dropout_p, halo_left, dropout_offset, num_inputs = ctx.args
    dout = _dense_grad(dout, out)
    args = (dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias, side_bias,
            left, right, scale, backend, dropout_p, rng, key_ranges, side_ranges)
    if halo_k is not None:
        dq, dk, dv, dsk, dsv, dbb, dsb, dhk, dhv = _call(band_side_halo_attention_backward, *args, halo_k, halo_v,
                                                         halo_mask, halo_left, dropout_offset, dlse)
    else:  # without an offset or an lse gradient: today's arguments (the op's defaults fill the rest)
        tail = (dropout_offset, dlse) if dropout_offset or dlse is not None else ()
        dq, dk, dv, dsk, dsv, dbb, dsb = _call(band_side_attention_backward, *args, *tail)
        dhk = dhv = None
    grads = (dq, dk, dv, dsk if side_k is not None else None, dsv if side_v is not None else None, None, None, None,
             dbb if band_bias is not None else None, dsb if side_bias is not None else None, None, None, None, None)
    if num_inputs == len(grads):  # the 14 required inputs only
        return grads
    grads += (None, None, None, None, dhk if halo_k is not None else None, dhv if halo_v is not None else None)
    return grads[:num_inputs] + (None,) * (num_inputs - len(grads))


def _band_side_grad_inputs(inputs):  # q, k, v, side_k, side_v; band_bias, side_bias; halo_k, halo_v (if given)
    return inputs[:5] + inputs[8:10] + inputs[18:20]


run_band_side = _autograd(band_side_attention, _band_side_backward, _band_side_setup_context, _band_side_grad_inputs)
# With a differentiable lse (a split-KV merge by log-sum-exp differentiates through it: ``with_lse``).
run_band_side_with_lse = _eager_function(band_side_attention, _band_side_backward, _band_side_setup_context,
                                         _band_side_grad_inputs, 2)


# --------------------------------------------------------------------------------------------------------
# Longformer / LED: band pass + global rows in one op (longattn.backends._longformer)
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("longattn::longformer_attention", mutates_args=())
def longformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_global: Tensor | None,
    k_global: Tensor | None,
    v_global: Tensor | None,
    global_mask: Tensor,
    key_padding_mask: Tensor | None,
    left: int,
    right: int,
    scale: float,
    num_slots: int,
    backend: str,
    dropout_p: float = 0.0,
    rng: Tensor | None = None,
    key_ranges: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out (B, S, H, D), lse (B, H, S), glse (B, H, num_slots), band_rows (B, S) bool, pos (B, num_slots) int64,
    used (B, num_slots) bool); see ``longattn.backends._longformer``. The last three, the slot layout, are saved
    for the backward (no gradient: integer and bool outputs)."""
    return _longformer.forward(get_backend(backend), q, k, v, q_global, k_global, v_global, global_mask,
                               key_padding_mask, left, right, scale, num_slots, dropout_p, rng, key_ranges)


@longformer_attention.register_fake
def _(q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left, right, scale, num_slots,
      backend, dropout_p=0.0, rng=None, key_ranges=None):
    out, lse = _fake.band_side_forward(q)
    B, S = global_mask.shape
    pos = q.new_empty(B, num_slots, dtype=torch.int64)  # contiguous, as every backend's global_slots
    return (out, lse, lse.new_empty(B, q.shape[2], num_slots), global_mask.new_empty(B, S, dtype=torch.bool), pos,
            global_mask.new_empty(B, num_slots, dtype=torch.bool))


@torch.library.custom_op("longattn::longformer_attention_backward", mutates_args=())
def longformer_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_global: Tensor | None,
    k_global: Tensor | None,
    v_global: Tensor | None,
    out: Tensor,
    lse: Tensor,
    glse: Tensor,
    band_rows: Tensor,
    pos: Tensor,
    used: Tensor,
    global_mask: Tensor,
    key_padding_mask: Tensor | None,
    left: int,
    right: int,
    scale: float,
    backend: str,
    dropout_p: float = 0.0,
    rng: Tensor | None = None,
    key_ranges: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dq_global, dk_global, dv_global); absent global projections get empty gradients."""
    return _longformer.backward(get_backend(backend), dout, q, k, v, q_global, k_global, v_global, out, lse, glse,
                                band_rows, pos, used, global_mask, key_padding_mask, left, right, scale, dropout_p,
                                rng, key_ranges)


@longformer_attention_backward.register_fake
def _(dout, q, k, v, q_global, k_global, v_global, out, lse, glse, band_rows, pos, used, global_mask,
      key_padding_mask, left, right, scale, backend, dropout_p=0.0, rng=None, key_ranges=None):
    grads = _fake.band_side_backward(q, k, v, q, q, None, None)[:3]
    return (*grads, *(q.new_empty(0) if x is None else torch.empty_like(x, memory_format=torch.contiguous_format)
                      for x in (q_global, k_global, v_global)))


_LONGFORMER_TAIL = (0.0, None, None)  # dropout_p, rng, key_ranges


def _longformer_setup_context(ctx, inputs, output):
    (q, k, v, q_global, k_global, v_global, global_mask, key_padding_mask, left, right, scale, _,
     backend) = inputs[:13]
    dropout_p, rng, key_ranges = _optional_tail(inputs, 13, _LONGFORMER_TAIL)
    out, lse, glse, band_rows, pos, used = output
    ctx.save_for_backward(q, k, v, q_global, k_global, v_global, out, lse, glse, band_rows, pos, used, global_mask,
                          key_padding_mask, rng, key_ranges)
    ctx.args = (left, right, scale, backend, dropout_p, len(inputs))
    ctx.materialize_grads = False  # the statistics get no gradient: no zero tensors for them


def _longformer_backward(ctx, dout, *_):  # *_: the statistics' and slot layout's gradients (unused)
    (q, k, v, q_global, k_global, v_global, out, lse, glse, band_rows, pos, used, global_mask, key_padding_mask, rng,
     key_ranges) = ctx.saved_tensors
    left, right, scale, backend, dropout_p, num_inputs = ctx.args
    dout = _dense_grad(dout, out)
    dq, dk, dv, dqg, dkg, dvg = _call(longformer_attention_backward, dout, q, k, v, q_global, k_global, v_global, out,
                                      lse, glse, band_rows, pos, used, global_mask, key_padding_mask, left, right,
                                      scale, backend, dropout_p, rng, key_ranges)
    return (dq, dk, dv, dqg if q_global is not None else None, dkg if k_global is not None else None,
            dvg if v_global is not None else None) + (None,) * (num_inputs - 6)


def _longformer_grad_inputs(inputs):  # q, k, v, q_global, k_global, v_global
    return inputs[:6]


run_longformer = _autograd(longformer_attention, _longformer_backward, _longformer_setup_context,
                           _longformer_grad_inputs)


# --------------------------------------------------------------------------------------------------------
# block aggregation
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("longattn::block_aggregate", mutates_args=())
def block_aggregate(
    x: Tensor, block_ids: Tensor, num_blocks: int, weight: Tensor | None, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(out (B, G, C), sums, rstd); see ``longattn.backends``."""
    return tuple(get_backend(backend).block_aggregate_forward(x, block_ids, num_blocks, weight, eps))


@block_aggregate.register_fake
def _(x, block_ids, num_blocks, weight, eps, backend):
    return _fake.block_aggregate_forward(x, num_blocks, weight)


@torch.library.custom_op("longattn::block_aggregate_backward", mutates_args=())
def block_aggregate_backward(
    dout: Tensor,
    x: Tensor,
    block_ids: Tensor,
    num_blocks: int,
    weight: Tensor | None,
    sums: Tensor,
    rstd: Tensor,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dx (B, S, C), dweight (C,) or empty)."""
    return tuple(
        get_backend(backend).block_aggregate_backward(dout, x, block_ids, num_blocks, weight, sums, rstd, eps)
    )


@block_aggregate_backward.register_fake
def _(dout, x, block_ids, num_blocks, weight, sums, rstd, eps, backend):
    return _fake.block_aggregate_backward(x, weight)


def _aggregate_setup_context(ctx, inputs, output):
    x, block_ids, num_blocks, weight, eps, backend = inputs
    _, sums, rstd = output
    ctx.save_for_backward(x, block_ids, weight, sums, rstd)
    ctx.args = (num_blocks, eps, backend)
    ctx.materialize_grads = False


def _aggregate_backward(ctx, dout, *_):  # *_: the statistics' gradients (unused)
    x, block_ids, weight, sums, rstd = ctx.saved_tensors
    num_blocks, eps, backend = ctx.args
    dout = _dense_grad(dout, x, (x.shape[0], num_blocks, x.shape[2]))
    dx, dweight = _call(block_aggregate_backward, dout, x, block_ids, num_blocks, weight, sums, rstd, eps, backend)
    return dx, None, None, (dweight if weight is not None else None), None, None


def _aggregate_grad_inputs(inputs):  # x, weight
    return inputs[0], inputs[3]


run_block_aggregate = _autograd(block_aggregate, _aggregate_backward, _aggregate_setup_context,
                                _aggregate_grad_inputs)
