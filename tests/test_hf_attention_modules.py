"""The public ops reproduce Hugging Face's attention modules, built from small random configs.

q/k/v come from the HF module's own projections, so outputs *and* parameter gradients are compared. HF's
softmax runs in float32 even for float64 modules, hence the 1e-5-relative comparisons. Longformer runs in
float32: HF's own float64 backward gives NaN parameter gradients (its masked rows), so it cannot be a target.
"""

from __future__ import annotations

import pytest
import torch

import longattn

transformers = pytest.importorskip("transformers", reason="transformers (the 'test' extra) is not installed")
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402
from transformers.models.longt5 import modeling_longt5  # noqa: E402

RTOL = ATOL = 1e-5


def _param_grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def _compare_grads(ours, stock):
    """Same gradients; a parameter one side never used (None) must have an all-zero gradient on the other."""
    for name in ours.keys() | stock.keys():
        mine = ours.get(name, torch.zeros_like(stock.get(name, ours.get(name))))
        theirs = stock.get(name, torch.zeros_like(mine))
        torch.testing.assert_close(mine, theirs, rtol=RTOL, atol=ATOL, msg=name)


def _split_heads(x, heads):
    B, S, E = x.shape
    return x.view(B, S, heads, E // heads)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("globals_at", [[], [0], [0, 13, 31], list(range(0, 32, 3))])
def test_longformer_self_attention(seed, globals_at):
    torch.manual_seed(seed)
    B, S, E, H, window = 2, 32, 32, 4, 8
    config = transformers.LongformerConfig(hidden_size=E, num_attention_heads=H, attention_window=[window],
                                           attention_probs_dropout_prob=0.0)
    module = LongformerSelfAttention(config, layer_id=0).eval()
    hidden = torch.randn(B, S, E)
    real = torch.ones(B, S, dtype=torch.bool)
    real[1, 23:] = False
    is_global = torch.zeros(B, S, dtype=torch.bool)
    is_global[:, globals_at] = True
    is_global &= real
    # Inside the layer HF encodes padding / local / global as negative / 0 / positive.
    layer_mask = torch.zeros(B, S)
    layer_mask[~real] = torch.finfo(torch.float32).min
    layer_mask[is_global] = torch.finfo(torch.float32).max

    stock = module(hidden, attention_mask=layer_mask, is_index_masked=~real, is_index_global_attn=is_global,
                   is_global_attn=bool(is_global.any()))[0]
    stock.pow(2).sum().backward()
    stock_grads = _param_grads(module)
    module.zero_grad()

    proj = {name: _split_heads(getattr(module, name)(hidden), H)
            for name in ("query", "key", "value", "query_global", "key_global", "value_global")}
    ours = longattn.longformer_attention(
        proj["query"], proj["key"], proj["value"], window // 2, is_global, key_padding_mask=real,
        q_global=proj["query_global"], k_global=proj["key_global"], v_global=proj["value_global"],
    ).reshape(B, S, E)
    ours.pow(2).sum().backward()
    torch.testing.assert_close(ours, stock, rtol=RTOL, atol=ATOL)
    assert torch.equal(ours[1, 23:], torch.zeros_like(ours[1, 23:]))
    _compare_grads(_param_grads(module), stock_grads)


def _longt5_tables(module, window, num_blocks):
    """Band (H, 2r+1) and side (H, 2G+1) bias tables from the module's bucketed embeddings."""
    def table(embedding, offsets):
        buckets = module._relative_position_bucket(
            offsets, bidirectional=not module.is_decoder, num_buckets=module.relative_attention_num_buckets,
            max_distance=module.relative_attention_max_distance)
        return embedding(buckets).T

    band = table(module.relative_attention_bias, torch.arange(-window, window + 1))
    side = table(module.global_relative_attention_bias, torch.arange(-num_blocks, num_blocks + 1))
    return band, side


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("S, radius, block", [(37, 3, 4), (64, 7, 16), (20, 5, 3), (9, 2, 16)])
def test_longt5_transient_global_attention(seed, S, radius, block):
    torch.manual_seed(seed)
    B, E, H, Dh = 2, 24, 3, 8
    config = transformers.LongT5Config(d_model=E, d_kv=Dh, num_heads=H, local_radius=radius, global_block_size=block,
                                       encoder_attention_type="transient-global", dropout_rate=0.0,
                                       relative_attention_num_buckets=8, relative_attention_max_distance=16)
    module = modeling_longt5.LongT5TransientGlobalAttention(config, has_relative_attention_bias=True)
    module = module.double().eval()
    with torch.no_grad():  # HF initialises the norm weight to ones; make it matter
        module.global_input_layer_norm.weight.uniform_(0.5, 1.5)
    hidden = torch.randn(B, S, E, dtype=torch.float64)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, S - S // 3:] = 0
    real = mask.bool()

    stock = module(hidden, mask=mask)[0]
    (stock * real[..., None]).pow(2).sum().backward()
    stock_grads = _param_grads(module)
    module.zero_grad()

    block_ids, block_mask = longattn.tglobal_block_ids(mask, block)
    G = block_mask.shape[1]
    norm = module.global_input_layer_norm
    aggregates = longattn.block_aggregate(hidden, block_ids, G, weight=norm.weight, eps=norm.variance_epsilon)
    q, k, v = (_split_heads(getattr(module, name)(hidden), H) for name in ("q", "k", "v"))
    side_k, side_v = (_split_heads(getattr(module, name)(aggregates), H) for name in ("k", "v"))
    band_bias, side_bias = _longt5_tables(module, radius, G)
    context = longattn.tglobal_attention(q, k, v, side_k, side_v, radius, block_ids, key_padding_mask=real,
                                         side_mask=block_mask, rel_bias=band_bias, side_bias=side_bias)
    ours = module.o(context.reshape(B, S, H * Dh))
    (ours * real[..., None]).pow(2).sum().backward()
    torch.testing.assert_close(ours[real], stock[real], rtol=RTOL, atol=ATOL)
    _compare_grads(_param_grads(module), stock_grads)


@pytest.mark.parametrize("S, block", [(37, 4), (64, 16), (20, 3), (9, 16), (100, 7)])
def test_block_ids_match_hf(S, block):
    gen = torch.Generator().manual_seed(S)
    for lengths in ([S, S], [S, S // 2], [1, 0], [block - 1, block]):
        mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
        mask[0, torch.randint(0, S, (2,), generator=gen)] = 0  # holes in the middle too
        ids, block_mask = longattn.tglobal_block_ids(mask, block)
        hf_ids, hf_segments = modeling_longt5._make_global_fixed_block_ids(mask, block)
        assert torch.equal(ids, hf_ids.to(torch.int32))
        assert torch.equal(block_mask, hf_segments == 1)
