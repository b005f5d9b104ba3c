"""longattn.nn modules vs naive implementations built from the fp64 oracle (tests/reference.py).

Each module is compared with the same projections applied by hand around the dense float64 oracle: in float64
within the float64 floor, in float32 within the float32 floor (inputs and weights are O(1)), for the outputs
and the gradients of the input and of every parameter.
"""

from __future__ import annotations

import pytest
import torch

from longattn import nn as lnn
from tests import reference
from tests.tolerance import FLOORS

B, S, E, H = 2, 37, 32, 4


def inputs(dtype, seed=0, padding=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, E, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    lengths = torch.tensor([S, S - 11])
    mask = torch.arange(S)[None, :] < lengths[:, None] if padding else None
    return x, mask


def randomize(module, dtype, seed=0):
    """O(1) random weights (so attention is peaked and every parameter matters), in ``dtype``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() == 2 else 0.5))
    return module.to(dtype)


def linear(x, layer):
    return torch.nn.functional.linear(x, layer.weight, layer.bias)


def heads(x):
    return x.view(*x.shape[:2], H, -1)


def zero_padding_rows(out, mask):
    return out if mask is None else torch.where(mask[:, :, None, None], out, torch.zeros_like(out))


def check(module, naive, x, *args, dtype):
    """Outputs and the gradients of x and every parameter, module vs naive (naive in float64)."""
    cot = torch.randn(B, S, E, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = module(x, *args)
    assert out.shape == (B, S, E) and out.dtype == dtype
    params = [x, *module.parameters()]
    got = torch.autograd.grad(out, params, cot.to(dtype), allow_unused=True)
    module64 = module.to(torch.float64)
    x64 = x.detach().double().requires_grad_(True)
    want_out = naive(module64, x64, *args)
    want = torch.autograd.grad(want_out, [x64, *module64.parameters()], cot, allow_unused=True)
    floor = FLOORS[dtype]
    err = (out.double() - want_out).abs().max().item()
    assert err <= floor, f"output: error {err:.3e} > {floor:.1e}"
    names = ["x"] + [n for n, _ in module64.named_parameters()]
    for name, g, w in zip(names, got, want):
        g = torch.zeros_like(w) if g is None else g.double()
        w = torch.zeros_like(g) if w is None else w
        err = (g - w).abs().max().item()
        assert err <= 3 * floor * max(1.0, w.abs().max().item()), f"grad {name}: error {err:.3e}"


# ------------------------------------------------------------------------------------------ sliding window
def naive_sliding(module, x, mask):
    q, k, v = (heads(linear(x, p)) for p in (module.q_proj, module.k_proj, module.v_proj))
    out = reference.band_side_attention(q, k, v, window=module.window, band_key_mask=mask,
                                        band_bias=module.rel_bias, scale=module.scale)
    return linear(zero_padding_rows(out, mask).flatten(2), module.out_proj)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("window, relative_bias", [(5, False), ((7, 0), True), ((3, 9), True), (64, False)])
@pytest.mark.parametrize("padding", [True, False])
def test_sliding_window_attention(dtype, window, relative_bias, padding):
    module = randomize(lnn.SlidingWindowAttention(E, H, window, relative_bias=relative_bias), dtype)
    x, mask = inputs(dtype, padding=padding)
    check(module, naive_sliding, x, mask, dtype=dtype)


# ---------------------------------------------------------------------------------------------- longformer
def naive_longformer(module, x, global_mask, mask):
    q, k, v, qg, kg, vg = (heads(linear(x, getattr(module, n))) for n in
                           ("query", "key", "value", "query_global", "key_global", "value_global"))
    out = reference.longformer_attention(q, k, v, module.window, global_mask, key_padding_mask=mask, q_global=qg,
                                         k_global=kg, v_global=vg)
    return linear(out.flatten(2), module.output)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("globals_", [[], [0], [0, 13, 25, 36]])
def test_longformer_attention(dtype, globals_):
    module = randomize(lnn.LongformerAttention(E, H, 4), dtype)
    x, mask = inputs(dtype)
    glob = torch.zeros(B, S, dtype=torch.bool)
    glob[:, globals_] = True  # 36 is padding in row 1: padding is never global
    check(module, naive_longformer, x, glob, mask, dtype=dtype)


def test_longformer_attention_compiles_with_max_globals():
    module = randomize(lnn.LongformerAttention(E, H, 4), torch.float32)
    x, mask = inputs(torch.float32)
    glob = torch.zeros(B, S, dtype=torch.bool)
    glob[:, [0, 9]] = True
    want = module(x, glob, mask)
    torch._dynamo.reset()
    got = torch.compile(module, fullgraph=True, backend="aot_eager")(x, glob, mask, max_globals=2)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------- tglobal
def naive_block_ids(mask, block):
    """Written from the LongT5 rule itself (not from longattn): block s // block for real tokens, tokens past the
    last full block join it, padding and rows with no full block get -1."""
    ids = torch.full(mask.shape, -1, dtype=torch.long)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        full = n // block
        for s in range(n):
            ids[b, s] = min(s // block, full - 1)
    return ids


def naive_tglobal(module, x, mask):
    G, r = S // module.global_block_size, module.local_radius
    ids = naive_block_ids(mask, module.global_block_size)
    norm = module.global_input_layer_norm
    aggregates = reference.block_aggregate(x, ids, G, weight=norm.weight, eps=norm.eps)
    q, k, v = (heads(linear(x, p)) for p in (module.q, module.k, module.v))
    side_k, side_v = heads(linear(aggregates, module.k)), heads(linear(aggregates, module.v))
    bucket = lambda offsets: lnn.t5_relative_bucket(offsets, num_buckets=module.num_buckets,
                                                    max_distance=module.max_distance)
    band = module.relative_attention_bias(bucket(torch.arange(-r, r + 1))).t()
    side = module.global_relative_attention_bias(bucket(torch.arange(-G, G + 1))).t()
    block_mask = torch.arange(G)[None, :] <= ids.max(1, keepdim=True).values
    out = reference.band_side_attention(q, k, v, side_k, side_v, r, band_key_mask=mask, side_mask=block_mask,
                                        query_block=ids, band_bias=band, side_bias=side, scale=1.0)
    return linear(zero_padding_rows(out, mask).flatten(2), module.o)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("radius, block", [(5, 4), (3, 16), (40, 5)])
def test_tglobal_attention(dtype, radius, block):
    module = randomize(lnn.TGlobalAttention(E, H, radius, block, num_buckets=8, max_distance=16), dtype)
    x, mask = inputs(dtype)
    check(module, naive_tglobal, x, mask, dtype=dtype)


def test_t5_relative_bucket_matches_hf():
    modeling = pytest.importorskip("transformers.models.longt5.modeling_longt5")
    offsets = torch.arange(-300, 301)
    for bidirectional in (True, False):
        for num_buckets, max_distance in [(32, 128), (8, 16)]:
            want = modeling.LongT5Attention._relative_position_bucket(offsets, bidirectional, num_buckets,
                                                                       max_distance)
            got = lnn.t5_relative_bucket(offsets, bidirectional=bidirectional, num_buckets=num_buckets,
                                         max_distance=max_distance)
            assert torch.equal(got, want)


def test_tglobal_attention_loads_hf_longt5_weights():
    """Same parameter names as HF's LongT5TransientGlobalAttention: its weights load and outputs agree."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.longt5.modeling_longt5 import LongT5TransientGlobalAttention

    config = transformers.LongT5Config(d_model=E, d_kv=8, num_heads=H, local_radius=5, global_block_size=4,
                                       relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                       encoder_attention_type="transient-global", dropout_rate=0.0)
    hf = randomize(LongT5TransientGlobalAttention(config, has_relative_attention_bias=True), torch.float32).eval()
    module = lnn.TGlobalAttention(E, H, 5, 4, head_dim=8, num_buckets=8, max_distance=16,
                                  eps=config.layer_norm_epsilon)
    module.load_state_dict(hf.state_dict())
    x, mask = inputs(torch.float32)
    with torch.no_grad():
        got, want = module(x, mask), hf(x, mask=mask.long())[0]
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=2e-5)  # HF leaves padding rows unzeroed


def test_modules_validate_heads():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        lnn.SlidingWindowAttention(30, 4, 3)


def _module(name, dropout):
    if name == "sliding":
        return lnn.SlidingWindowAttention(E, H, 5, dropout=dropout), ()
    if name == "longformer":
        glob = torch.zeros(B, S, dtype=torch.bool)
        glob[:, 0] = True
        return lnn.LongformerAttention(E, H, 5, dropout=dropout), (glob,)
    return lnn.TGlobalAttention(E, H, 5, 4, dropout=dropout), ()


@pytest.mark.parametrize("name", ["sliding", "longformer", "tglobal"])
def test_dropout_runs_fused_in_training_and_not_in_eval(name):
    """``dropout`` reaches the op in training mode only: eval equals a module without dropout; training differs
    from it, is finite, and is reproducible from the generator state."""
    module, extra = _module(name, 0.5)
    plain, _ = _module(name, 0.0)
    randomize(module, torch.float32)
    plain.load_state_dict(module.state_dict())
    x, mask = inputs(torch.float32)
    module.eval(), plain.eval()
    assert torch.equal(module(x, *extra, mask), plain(x, *extra, mask))
    module.train()
    torch.manual_seed(3)
    first = module(x, *extra, mask)
    torch.manual_seed(3)
    again = module(x, *extra, mask)
    assert torch.equal(first, again) and first.isfinite().all()
    assert not torch.allclose(first, plain(x, *extra, mask))


def test_dropout_is_validated():
    with pytest.raises(ValueError, match="dropout"):
        lnn.SlidingWindowAttention(E, H, 5, dropout=1.0)
