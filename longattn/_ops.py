"""The torch.library custom ops behind the public API (namespace ``longattn``).

Two forward ops (the band + side-keys primitive and block aggregation) and their backward ops, each with
a fake (meta) implementation, and autograd formulas connecting them. The ``backend`` argument is already
resolved to a concrete name ("torch", "triton", "cuda") by the public API; the op body hands the call to
that backend module, whose contract is documented in ``longattn.backends``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _fake
from .dispatch import get_backend

# --------------------------------------------------------------------------------------------------------
# band + side keys attention
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("longattn::band_side_attention", mutates_args=())
def band_side_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    side_k: Tensor,
    side_v: Tensor,
    band_key_mask: Tensor | None,
    side_mask: Tensor | None,
    query_block: Tensor | None,
    band_bias: Tensor | None,
    side_bias: Tensor | None,
    left: int,
    right: int,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(out (B, S, H, D), lse (B, H, S)); see ``longattn.backends`` for the exact contract."""
    return get_backend(backend).band_side_forward(
        q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left, right, scale
    )


@band_side_attention.register_fake
def _(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left, right,
      scale, backend):
    return _fake.band_side_forward(q)


@torch.library.custom_op("longattn::band_side_attention_backward", mutates_args=())
def band_side_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    side_k: Tensor,
    side_v: Tensor,
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dside_k, dside_v, dband_bias, dside_bias); absent bias tables get empty gradients."""
    return tuple(
        get_backend(backend).band_side_backward(
            dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias,
            side_bias, left, right, scale,
        )
    )


@band_side_attention_backward.register_fake
def _(dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias, side_bias,
      left, right, scale, backend):
    return _fake.band_side_backward(q, k, v, side_k, side_v, band_bias, side_bias)


def _band_side_setup_context(ctx, inputs, output):
    (q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left, right,
     scale, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block,
                          band_bias, side_bias)
    ctx.args = (left, right, scale, backend)


def _band_side_backward(ctx, dout, dlse):
    (q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias,
     side_bias) = ctx.saved_tensors
    if dout.stride(-1) != 1:  # e.g. an expanded gradient of .sum(); the kernels need a dense last dim
        dout = dout.contiguous()
    dq, dk, dv, dsk, dsv, dbb, dsb = band_side_attention_backward(
        dout, q, k, v, side_k, side_v, out, lse, band_key_mask, side_mask, query_block, band_bias, side_bias,
        *ctx.args,
    )
    return (dq, dk, dv, dsk, dsv, None, None, None,
            dbb if band_bias is not None else None,
            dsb if side_bias is not None else None,
            None, None, None, None)


band_side_attention.register_autograd(_band_side_backward, setup_context=_band_side_setup_context)


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


def _aggregate_backward(ctx, dout, dsums, drstd):
    x, block_ids, weight, sums, rstd = ctx.saved_tensors
    num_blocks, eps, backend = ctx.args
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dx, dweight = block_aggregate_backward(dout, x, block_ids, num_blocks, weight, sums, rstd, eps, backend)
    return dx, None, None, (dweight if weight is not None else None), None, None


block_aggregate.register_autograd(_aggregate_backward, setup_context=_aggregate_setup_context)
