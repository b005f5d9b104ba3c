"""apply_longattn / revert_longattn on tiny random Hugging Face Longformer, LED and LongT5 models (CPU).

Comparisons (DESIGN.md section 3; issue 5's acceptance):
- outputs (hidden states of real tokens, logits, loss): patched vs stock in fp32 within 1e-5 *relative* to the
  tensor's largest magnitude (``assert_rel_close``). HF leaves padding query rows unzeroed, so only real tokens
  are compared for hidden states.
- gradients of every parameter: the tolerance rule of ``tests/tolerance.py`` at model level: the patched fp32
  model's error against a float64 oracle may be at most 3x the stock fp32 model's error plus a floor of 2e-5 (the
  fp32 floor) *relative to the largest oracle gradient of the parameter's module*. Model gradients are not O(1)
  like the kernels' randn inputs, so an absolute floor would be meaningless; and per module rather than per
  tensor because a Linear's weight and bias share a scale while a key bias alone has a mathematically zero
  gradient (pure rounding noise).
  The oracle is the stock model in float64 for LongT5. HF's float64 Longformer/LED cannot be one: its
  ``finfo(float64).min`` mask becomes -inf in the fp32 softmax, so every all-padding window row is NaN and its
  backward spreads NaN to every gradient. There the oracle is the *patched* model in float64, and the roles are
  checked both ways (the stock fp32 gradients must be within the same rule of it), so a bug shared by the
  patched fp32 and fp64 runs cannot hide.
- Weights are initialised larger than HF's defaults so that attention is peaked and the query/key gradients
  are not negligible.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longattn  # noqa: E402
from longattn.models import _common, longt5  # noqa: E402
from tests import reference  # noqa: E402
from tests.tolerance import FLOORS, GRAD_FACTOR  # noqa: E402

OUT_RTOL = 1e-5
GRAD_FLOOR = FLOORS[torch.float32]
VOCAB = 97


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Fallback warnings are once per process; each test starts from a clean slate."""
    _common._warned.clear()
    yield
    _common._warned.clear()


# ----------------------------------------------------------------------------------------------------- models
def longformer_config(windows=(8, 12), **kw):
    return transformers.LongformerConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=len(windows), num_attention_heads=2,
        intermediate_size=64, attention_window=list(windows), max_position_embeddings=200, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=1, initializer_range=0.2, **kw)


def led_config(windows=(8, 12), **kw):
    return transformers.LEDConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=len(windows), decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, attention_window=list(windows),
        max_decoder_position_embeddings=64, dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, init_std=0.2,
        **{"attention_dropout": 0.0, "max_encoder_position_embeddings": 200, **kw})


def longt5_config(attention_type, **kw):
    # Few buckets and a short max_distance so the band (r=5) and side offsets reach the logarithmic buckets.
    return transformers.LongT5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
        global_block_size=4, encoder_attention_type=attention_type,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, initializer_factor=2.0, **{"local_radius": 5, "dropout_rate": 0.0, **kw})


def build(cls, config, seed):
    torch.manual_seed(seed)
    model = cls(config).eval()
    # Random (not zero) biases and norms, so every parameter matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def token_batch(lengths, S, seed, pad_id):
    """``input_ids`` and ``attention_mask`` ``(B, S)``: row b has ``lengths[b]`` real tokens, then padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), S), generator=gen)
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad_id), mask


def global_mask(pattern, lengths, S):
    """None (no global token), or ``(B, S)`` 0/1 with 1 / several globals at the start, middle and end."""
    if pattern == "none":
        return None
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    if pattern == "one":
        mask[0, 0] = 1  # the other rows have none
    else:
        for b, n in enumerate(lengths):
            mask[b, [0, n // 2, n // 2 + 1, n - 1]] = 1
    return mask


def seq2seq_labels(B, seed, T=7):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed + 100))


# ------------------------------------------------------------------------------------------------ comparisons
def assert_rel_close(name, got, want, rtol=OUT_RTOL):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"{name}: max error {err:.3e} > {rtol:.0e} x max |stock| {scale:.3e}"


def run_with_grads(model, inputs):
    """Forward with ``output_hidden_states``, backward of the loss; returns (outputs, {name: grad})."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, output_hidden_states=True)
    out.loss.backward()
    return out, {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_within_rule(patched, stock, oracle, *, both_ways=False):
    """Per parameter: |patched - oracle| <= 3 |stock - oracle| + 2e-5 x (largest oracle grad of its module)."""
    module_scale = {}
    for name, want in oracle.items():
        owner = name.rsplit(".", 1)[0]
        module_scale[owner] = max(module_scale.get(owner, 0.0), want.abs().max().item())
    for name, want in oracle.items():
        floor = GRAD_FLOOR * module_scale[name.rsplit(".", 1)[0]]
        err = (patched[name].double() - want).abs().max().item()
        base = (stock[name].double() - want).abs().max().item()
        assert err <= GRAD_FACTOR * base + floor, \
            f"grad {name}: error {err:.3e} > {GRAD_FACTOR} x stock fp32 error {base:.3e} + {floor:.1e}"
        if both_ways:
            assert base <= GRAD_FACTOR * err + floor, \
                f"grad {name}: stock fp32 is {base:.3e} from the oracle, > {GRAD_FACTOR} x {err:.3e} + {floor:.1e}"


def patched_copy(model, **kw):
    return longattn.apply_longattn(copy.deepcopy(model), **kw)


def check_matches_stock(stock, inputs, real, hidden, *, oracle="stock", **apply_kw):
    """Patched vs stock (fp32) outputs, and gradients against the fp64 ``oracle`` ("stock" or "patched", see the
    module docstring). ``hidden(out)`` picks the encoder's last hidden state; ``real`` ``(B, S)`` marks the tokens
    compared."""
    patched = patched_copy(stock, **apply_kw)
    out_s, grads_s = run_with_grads(stock, inputs)
    out_p, grads_p = run_with_grads(patched, inputs)
    oracle_model = copy.deepcopy(patched if oracle == "patched" else stock).double()
    _, grads_o = run_with_grads(oracle_model, inputs)
    real = real.bool()
    assert_rel_close("last hidden state", hidden(out_p)[real], hidden(out_s)[real])
    assert_rel_close("loss", out_p.loss, out_s.loss)
    logits_s, logits_p = out_s.logits, out_p.logits
    if logits_s.shape[:2] == real.shape:  # token-level head: only real tokens
        logits_s, logits_p = logits_s[real], logits_p[real]
    assert_rel_close("logits", logits_p, logits_s)
    assert all(g.isfinite().all() for g in grads_o.values()), "the fp64 oracle's gradients are not finite"
    assert_grads_within_rule(grads_p, grads_s, grads_o, both_ways=oracle == "patched")
    return patched


# ------------------------------------------------------------------------------------------ Longformer and LED
S_LONG = 45  # not a multiple of any window (8, 12, 16)
LENGTHS = [45, 31]
# (seed, global tokens, pad_to_window): every global pattern with and without HF's padding, over several seeds.
LONG_CASES = [(0, "none", True), (1, "none", False), (2, "one", True), (0, "one", False), (1, "many", True),
              (2, "many", False)]


@pytest.mark.parametrize("seed, globals_, pad_to_window", LONG_CASES)
def test_longformer_matches_stock(seed, globals_, pad_to_window):
    stock = build(transformers.LongformerForMaskedLM, longformer_config(windows=(8, 12)), seed)
    ids, mask = token_batch(LENGTHS, S_LONG, seed, pad_id=1)
    inputs = dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask(globals_, LENGTHS, S_LONG),
                  labels=ids.masked_fill(mask == 0, -100))
    check_matches_stock(stock, inputs, mask, lambda out: out.hidden_states[-1], oracle="patched",
                        pad_to_window=pad_to_window)


@pytest.mark.parametrize("seed, globals_, pad_to_window", LONG_CASES)
def test_led_matches_stock(seed, globals_, pad_to_window):
    stock = build(transformers.LEDForConditionalGeneration, led_config(windows=(16, 8)), seed)
    ids, mask = token_batch(LENGTHS, S_LONG, seed, pad_id=1)
    inputs = dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask(globals_, LENGTHS, S_LONG),
                  labels=seq2seq_labels(len(LENGTHS), seed))
    check_matches_stock(stock, inputs, mask, lambda out: out.encoder_last_hidden_state, oracle="patched",
                        pad_to_window=pad_to_window)


@pytest.mark.parametrize("family", ["longformer", "led"])
def test_pad_to_window_false_runs_the_layers_unpadded(family):
    model, kw = _small_model(family)
    longattn.apply_longattn(model, pad_to_window=False)
    attn = next(m for m in model.modules() if _common.patch_state(m) is not None)
    seen = []
    attn.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    with torch.no_grad():
        out = model(**kw).last_hidden_state
    assert seen == [S_LONG] and out.shape[1] == S_LONG  # 45, where HF pads to 48


@pytest.mark.parametrize("cls", ["LEDForSequenceClassification", "LEDForQuestionAnswering", "LEDModel"])
def test_led_heads_patched(cls):
    if not hasattr(transformers, cls):  # LEDForSequenceClassification is gone from transformers 5.x
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    stock = build(getattr(transformers, cls), led_config(), 3)
    patched = patched_copy(stock)
    assert _num_patched(patched) == 2 and _num_patched(patched.get_decoder() if cls == "LEDModel" else
                                                       patched.led.decoder) == 0
    ids, mask = token_batch([40, 22], 40, 3, pad_id=1)
    ids[:, 39] = 2  # LEDForSequenceClassification pools the last eos token
    ids[1, 21] = 2
    kw = dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask("many", [40, 22], 40))
    with torch.no_grad():
        out_s, out_p = stock(**kw), patched(**kw)
    assert_rel_close("encoder last hidden state", out_p.encoder_last_hidden_state[mask.bool()],
                     out_s.encoder_last_hidden_state[mask.bool()])
    first = out_s.logits if cls == "LEDForSequenceClassification" else \
        out_s.start_logits if cls == "LEDForQuestionAnswering" else out_s.last_hidden_state
    got = out_p.logits if cls == "LEDForSequenceClassification" else \
        out_p.start_logits if cls == "LEDForQuestionAnswering" else out_p.last_hidden_state
    assert_rel_close("head output", got, first)


@pytest.mark.parametrize("cls", ["LongformerForSequenceClassification", "LongformerForQuestionAnswering",
                                 "LongformerForTokenClassification", "LongformerForMultipleChoice"])
def test_longformer_heads_patched(cls):
    model = build(getattr(transformers, cls), longformer_config(), 0)
    patched = patched_copy(model)
    assert _num_patched(patched) == 2
    ids, mask = token_batch([24, 17], 24, 0, pad_id=1)
    kw = dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask("many", [24, 17], 24))
    if cls.endswith("MultipleChoice"):  # (batch, choices, S)
        kw = {k: v[None] for k, v in kw.items()}
    with torch.no_grad():
        got, want = patched(**kw), model(**kw)
    key = "start_logits" if cls.endswith("QuestionAnswering") else "logits"
    assert_rel_close(key, got[key], want[key])


def _num_patched(model):
    return sum(_common.patch_state(m) is not None for m in model.modules())


# ----------------------------------------------------------------------------------------------------- LongT5
T5_LENGTHS = [41, 27, 3]  # 41 and 27: partial local and global blocks; 3 < global_block_size: no full block


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("attention_type", ["local", "transient-global"])
def test_longt5_matches_stock(seed, attention_type):
    stock = build(transformers.LongT5ForConditionalGeneration, longt5_config(attention_type), seed)
    ids, mask = token_batch(T5_LENGTHS, 41, seed, pad_id=0)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=seq2seq_labels(len(T5_LENGTHS), seed))
    check_matches_stock(stock, inputs, mask, lambda out: out.encoder_last_hidden_state)


@pytest.mark.parametrize("attention_type", ["local", "transient-global"])
@pytest.mark.parametrize("cls", ["LongT5Model", "LongT5EncoderModel"])
def test_longt5_models_patched(cls, attention_type):
    stock = build(getattr(transformers, cls), longt5_config(attention_type), 5)
    patched = patched_copy(stock)
    assert _num_patched(patched) == 2
    ids, mask = token_batch([50, 33], 50, 5, pad_id=0)
    kw = dict(input_ids=ids, attention_mask=mask)
    if cls == "LongT5Model":
        kw["decoder_input_ids"] = seq2seq_labels(2, 5)
    with torch.no_grad():
        got, want = patched(**kw), stock(**kw)
    hidden = "encoder_last_hidden_state" if cls == "LongT5Model" else "last_hidden_state"
    assert_rel_close(hidden, got[hidden][mask.bool()], want[hidden][mask.bool()])
    if cls == "LongT5Model":  # the decoder's output too
        assert_rel_close("last_hidden_state", got.last_hidden_state, want.last_hidden_state)


# LongT5 padding query rows (longattn/models/longt5.py's docstring, README "Hugging Face models"): real rows equal
# stock; padding rows follow longattn's rule, not stock's, and can reach no real token.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("attention_type", ["local", "transient-global"])
@pytest.mark.parametrize("cls", ["LongT5EncoderModel", "LongT5ForConditionalGeneration"])
def test_longt5_padding_rows_cannot_reach_real_tokens(cls, attention_type, dtype):
    """Whatever the padding positions hold, the patched model's real-token outputs, its loss and every gradient
    (w.r.t. the real inputs and every parameter) are bitwise the same."""
    model = build(getattr(transformers, cls), longt5_config(attention_type), 3).to(dtype)
    longattn.apply_longattn(model, backend="torch")
    seq2seq = cls == "LongT5ForConditionalGeneration"
    ids, mask = token_batch(T5_LENGTHS, 41, 3, pad_id=0)
    real = mask.bool()
    gen = torch.Generator().manual_seed(3)
    embeds = model.get_input_embeddings()(ids).detach()
    noise = 10 * torch.randn(embeds.shape, generator=gen, dtype=dtype)
    weight = torch.randn(embeds.shape, generator=gen, dtype=dtype)[real]
    labels = dict(labels=seq2seq_labels(len(T5_LENGTHS), 3)) if seq2seq else {}

    def run(x):
        model.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        out = model(inputs_embeds=x, attention_mask=mask, **labels)
        hidden = out.encoder_last_hidden_state if seq2seq else out.last_hidden_state
        loss = (hidden[real] * weight).sum() + (out.loss if seq2seq else 0)  # reads real rows only
        loss.backward()
        return hidden, loss, x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    hidden, loss, grad_x, grads = run(embeds)
    hidden_n, loss_n, grad_x_n, grads_n = run(torch.where(real[..., None], embeds, noise))
    assert not torch.equal(hidden[~real], hidden_n[~real])  # the padding rows did change
    assert torch.equal(hidden[real], hidden_n[real]) and torch.equal(loss, loss_n)
    assert torch.equal(grad_x[real], grad_x_n[real])
    assert grads.keys() == grads_n.keys() and all(torch.equal(grads[n], grads_n[n]) for n in grads), \
        [n for n in grads if not torch.equal(grads[n], grads_n[n])]


@pytest.mark.parametrize("attention_type", ["local", "transient-global"])
@pytest.mark.parametrize("S, lengths", [(41, [41, 27, 3]), (42, [42, 40])])
def test_longt5_padding_rows_are_the_documented_values(attention_type, S, lengths):
    """One attention layer in float64. Patched: every row (padding included) is the primitive with the real keys
    of the band, the valid blocks and HF's block ids (-1 for padding), by the oracle. Stock: real rows equal that
    too; padding rows are what the docstring says HF computes (its -1e10 mask swamps every score in the fp32
    softmax): the mean of the values of the query's 3 local blocks; for transient-global, 0 when the row has a
    block with no real token (S=41: 27 and 3 real tokens), else the mean of those values and all G aggregates
    (S=42, 40 real tokens: 10 full blocks, G=10)."""
    from transformers.models.longt5 import modeling_longt5 as hf

    tglobal = attention_type == "transient-global"
    model = build(transformers.LongT5EncoderModel, longt5_config(attention_type), 4).double()
    layer = model.encoder.block[0].layer[0]
    attn = layer.TransientGlobalSelfAttention if tglobal else layer.LocalSelfAttention
    _, mask = token_batch(lengths, S, 4, pad_id=0)
    real = mask.bool()
    x = torch.randn(len(lengths), S, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    B, H, D, r, bl = len(lengths), attn.n_heads, attn.key_value_proj_dim, attn.local_radius, attn.block_len
    with torch.no_grad():
        stock = attn(x, mask=mask if tglobal else hf._get_local_attention_mask(mask, bl, x.device))[0]
        patched = longattn.apply_longattn(copy.deepcopy(model), backend="torch").encoder.block[0].layer[0]
        patched = (patched.TransientGlobalSelfAttention if tglobal else patched.LocalSelfAttention)(x, mask=mask)[0]

        q, k, v = (proj(x).view(B, S, H, D) for proj in (attn.q, attn.k, attn.v))
        side = dict(band_bias=attn.compute_bias(bl)[0, 0, :, 0, 1 : 2 * bl])  # query t=0 of a block: offsets -r..r
        values = hf._concatenate_3_blocks(hf._split_into_blocks(v, bl, 1), 1, 2).sum(2)  # (B, blocks, H, D)
        count = torch.full((B, 1, 1, 1), 3 * bl, dtype=torch.float64)
        if tglobal:
            G = S // attn.global_block_size
            ids, valid = hf._make_global_fixed_block_ids(mask, attn.global_block_size)
            norm = attn.global_input_layer_norm  # (HF's computes the variance in fp32: the oracle's norm instead)
            agg = reference.block_aggregate(x, ids, G, weight=norm.weight, eps=norm.variance_epsilon)
            side_k, side_v = attn.k(agg).view(B, G, H, D), attn.v(agg).view(B, G, H, D)
            buckets = attn._relative_position_bucket(torch.arange(-G, G + 1),
                                                     num_buckets=attn.relative_attention_num_buckets,
                                                     max_distance=attn.relative_attention_max_distance)
            side.update(side_k=side_k, side_v=side_v, side_mask=valid.bool(), query_block=ids,
                        side_bias=attn.global_relative_attention_bias(buckets).t())
            full = valid.bool().all(-1)[:, None, None, None]  # else the padding queries attend the empty blocks
            values, count = torch.where(full, values + side_v.sum(1, keepdim=True), 0.0), count + G
        rule = reference.band_side_attention(q, k, v, window=(r, r), band_key_mask=real, scale=1.0, **side)
        rule = attn.o(rule.reshape(B, S, H * D))
        hf_padding = attn.o((values / count).repeat_interleave(bl, 1)[:, :S].reshape(B, S, H * D))

    torch.testing.assert_close(patched, rule, rtol=0, atol=1e-12)
    assert_rel_close("stock real rows", stock[real], rule[real])  # HF's softmax runs in fp32
    assert_rel_close("stock padding rows", stock[~real], hf_padding[~real])
    assert (stock[~real] - rule[~real]).abs().max() > 0.1  # so the README's "padding rows differ" stays true


@pytest.mark.parametrize("attention_type", ["local", "transient-global"])
def test_longt5_fp16_padding_rows_stay_finite(attention_type):
    """Stock fp16 local attention turns padding rows into NaN (-1e10 overflows to -inf on every score), and the
    next layer spreads it to real tokens (0 x NaN); the patched rows are finite everywhere."""
    model = build(transformers.LongT5EncoderModel, longt5_config(attention_type), 3).half()
    longattn.apply_longattn(model, backend="torch")
    ids, mask = token_batch(T5_LENGTHS, 41, 3, pad_id=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert all(h.isfinite().all() for h in out.hidden_states)


def test_longt5_compact_position_bias_feeds_later_layers():
    """Layer 0 returns the compact (1, H, band + side) bias; the tables get gradients through every layer."""
    model = patched_copy(build(transformers.LongT5EncoderModel, longt5_config("transient-global"), 0))
    attn = model.encoder.block[0].layer[0].TransientGlobalSelfAttention
    x = torch.randn(2, 30, 32)
    out, bias = attn(x, mask=torch.ones(2, 30, dtype=torch.long))
    r, G = attn.local_radius, 30 // attn.global_block_size
    assert isinstance(bias, torch.Tensor) and bias.shape == (1, attn.n_heads, 2 * r + 1 + 2 * G + 1)
    later = model.encoder.block[1].layer[0].TransientGlobalSelfAttention
    later(x, mask=torch.ones(2, 30, dtype=torch.long), position_bias=bias)[0].sum().backward()
    assert attn.relative_attention_bias.weight.grad.abs().sum() > 0
    assert attn.global_relative_attention_bias.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attention_type", ["local", "transient-global"])
def test_longt5_mask_derived_once_per_forward(attention_type, monkeypatch):
    """Layer 0 derives the block ids (transient-global) / key padding mask (local) from the mask; the later layers
    reuse them. A compact bias passed with another mask does not lend its values."""
    name = "_unblock_local_mask" if attention_type == "local" else "tglobal_block_ids"
    calls, derive = [], getattr(longt5, name)
    monkeypatch.setattr(longt5, name, lambda *args: calls.append(args) or derive(*args))
    model = build(transformers.LongT5EncoderModel, longt5_config(attention_type), 0)  # 2 layers
    ids, mask = token_batch([41, 27], 41, 0, pad_id=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        longattn.apply_longattn(model)
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert len(calls) == 1
        assert_rel_close("last hidden state", got[mask.bool()], want[mask.bool()])

        attn, later = (block.layer[0].TransientGlobalSelfAttention if attention_type != "local" else
                       block.layer[0].LocalSelfAttention for block in model.encoder.block[:2])
        x = torch.randn(2, 41, 32)
        masks = [mask.clone(), torch.ones_like(mask)]
        if attention_type == "local":
            from transformers.models.longt5.modeling_longt5 import _get_local_attention_mask
            masks = [_get_local_attention_mask(m, attn.block_len, x.device) for m in masks]
        _, bias = attn(x, mask=masks[0])
        reused = later(x, mask=masks[1], position_bias=bias)[0]
        fresh = later(x, mask=masks[1], position_bias=bias.detach().clone())[0]
    assert len(calls) == 4 and torch.equal(reused, fresh)  # layer 0, then `later` twice: no reuse


def test_longt5_mixed_train_eval_layers_run_fused():
    """A later layer in train mode with dropout runs the fused op with dropout (it reads layer 0's compact bias)."""
    model = patched_copy(build(transformers.LongT5EncoderModel, longt5_config("local", dropout_rate=0.1), 0))
    model.encoder.block[1].train()
    ids, mask = token_batch([41, 27], 41, 0, pad_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all()


def test_tglobal_block_ids_match_hf():
    from transformers.models.longt5.modeling_longt5 import _make_global_fixed_block_ids

    gen = torch.Generator().manual_seed(0)
    for S, block in [(41, 4), (16, 4), (3, 4), (37, 5), (64, 16)]:
        lengths = torch.randint(0, S + 1, (6,), generator=gen)
        lengths[0] = S
        mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
        ids_hf, seg_hf = _make_global_fixed_block_ids(mask, block)
        ids, block_mask = longattn.tglobal_block_ids(mask, block)
        assert torch.equal(ids.long(), ids_hf.long()) and torch.equal(block_mask, seg_hf.bool()), (S, block)


def test_unblock_local_mask_recovers_padding():
    from transformers.models.longt5.modeling_longt5 import _get_local_attention_mask

    ids, mask = token_batch([41, 27, 3], 41, 0, pad_id=0)
    blocked = _get_local_attention_mask(mask, 6, mask.device)
    assert torch.equal(longt5._unblock_local_mask(blocked, 41, 6), mask.bool())


# --------------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("family", ["led", "local", "transient-global"])
def test_greedy_generate_same_tokens(family):
    if family == "led":
        model = build(transformers.LEDForConditionalGeneration, led_config(), 4)
        ids, mask = token_batch([45, 30], 45, 4, pad_id=1)
        kw = dict(global_attention_mask=global_mask("one", [45, 30], 45))
    else:
        model = build(transformers.LongT5ForConditionalGeneration, longt5_config(family), 4)
        ids, mask = token_batch([41, 27], 41, 4, pad_id=0)
        kw = {}
    gen_kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=1, **kw)
    want = model.generate(ids, **gen_kw)
    got = patched_copy(model).generate(ids, **gen_kw)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------- training path
@pytest.mark.parametrize("family, use_reentrant", [("led", True), ("transient-global", True), ("local", True),
                                                    ("transient-global", False)])
def test_gradient_checkpointing(family, use_reentrant):
    stock, inputs, real, hidden = _training_case(family)
    stock.train()
    stock.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    patched = check_matches_stock(stock, inputs, real, hidden, oracle="patched" if family == "led" else "stock")
    assert _num_patched(patched) == 2 and patched.is_gradient_checkpointing


def _training_case(family):
    if family == "led":
        model = build(transformers.LEDForConditionalGeneration, led_config(), 7)
        ids, mask = token_batch([45, 30], 45, 7, pad_id=1)
        inputs = dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask("many", [45, 30], 45),
                      labels=seq2seq_labels(2, 7))
    else:
        model = build(transformers.LongT5ForConditionalGeneration, longt5_config(family), 7)
        ids, mask = token_batch([41, 27], 41, 7, pad_id=0)
        inputs = dict(input_ids=ids, attention_mask=mask, labels=seq2seq_labels(2, 7))
    return model, inputs, mask, lambda out: out.encoder_last_hidden_state


def test_attention_dropout_in_training_runs_fused():
    """With attention dropout > 0 in train mode the fused op runs with dropout (no fallback, no warning);
    ``torch.manual_seed`` reproduces it; eval mode equals stock. Distribution checks: tests/test_dropout.py."""
    stock = build(transformers.LEDForConditionalGeneration, led_config(attention_dropout=0.3), 0).train()
    patched = patched_copy(stock)
    ids, mask = token_batch([45, 30], 45, 0, pad_id=1)
    kw = dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask("one", [45, 30], 45))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(11)
        got = patched(**kw).encoder_last_hidden_state
        torch.manual_seed(11)
        again = patched(**kw).encoder_last_hidden_state
        other = patched(**kw).encoder_last_hidden_state
    assert torch.equal(got, again) and not torch.equal(got, other)
    patched.eval()
    stock.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval mode: no fallback, no warning
        real = mask.bool()
        torch.testing.assert_close(patched(**kw).encoder_last_hidden_state[real],
                                   stock(**kw).encoder_last_hidden_state[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["longformer", "transient-global"])
def test_output_attentions_falls_back_with_warning(family):
    if family == "longformer":
        model = build(transformers.LongformerModel, longformer_config(), 0)
        ids, mask = token_batch([45, 31], 45, 0, pad_id=1)
        kw = dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask("many", [45, 31], 45))
    else:
        model = build(transformers.LongT5EncoderModel, longt5_config(family), 0)
        ids, mask = token_batch([41, 27], 41, 0, pad_id=0)
        kw = dict(input_ids=ids, attention_mask=mask)
    want = model(**kw, output_attentions=True)
    patched = patched_copy(model, pad_to_window=False)
    with pytest.warns(UserWarning, match="output_attentions"):
        got = patched(**kw, output_attentions=True)
    for a, b in zip(got.attentions, want.attentions):
        assert torch.equal(a, b)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)


# ------------------------------------------------------------------------------------- revert, weights, errors
@pytest.mark.parametrize("family", ["longformer", "led", "local", "transient-global"])
def test_revert_is_bitwise_and_state_dict_unchanged(family):
    model, kw = _small_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(**kw).last_hidden_state
        longattn.apply_longattn(model, pad_to_window=False)
        assert _num_patched(model) > 0
        after = model.state_dict()
        assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
        longattn.revert_longattn(model)
        assert _num_patched(model) == 0
        assert not any(k.startswith("_longattn") for m in model.modules() for k in m.__dict__)
        assert torch.equal(model(**kw).last_hidden_state, want)


def _small_model(family):
    if family == "longformer":
        model = build(transformers.LongformerModel, longformer_config(), 2)
        ids, mask = token_batch([45, 31], 45, 2, pad_id=1)
        return model, dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask("one", [45, 31], 45))
    if family == "led":
        model = build(transformers.LEDModel, led_config(), 2).get_encoder()
        ids, mask = token_batch([45, 31], 45, 2, pad_id=1)
        return model, dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask("one", [45, 31], 45))
    model = build(transformers.LongT5EncoderModel, longt5_config(family), 2)
    ids, mask = token_batch([41, 27], 41, 2, pad_id=0)
    return model, dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("family", ["led", "transient-global"])
def test_save_and_load_round_trip(family, tmp_path):
    if family == "led":
        model = build(transformers.LEDForConditionalGeneration, led_config(), 1)
        ids, mask = token_batch([45, 30], 45, 1, pad_id=1)
    else:
        model = build(transformers.LongT5ForConditionalGeneration, longt5_config(family), 1)
        ids, mask = token_batch([41, 27], 41, 1, pad_id=0)
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=seq2seq_labels(2, 1))
    longattn.apply_longattn(model)
    with torch.no_grad():
        want = model(**kw).logits
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert _num_patched(loaded) == 0  # patching belongs to the instance, not the checkpoint
    sd_saved, sd_loaded = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd_saved[k], sd_loaded[k]) for k in sd_saved)
    longattn.apply_longattn(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(**kw).logits, want)


def test_deepcopy_of_patched_model_uses_its_own_weights():
    model, kw = _small_model("led")
    longattn.apply_longattn(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
        assert not torch.equal(clone(**kw).last_hidden_state, model(**kw).last_hidden_state)
        attn = clone.layers[0].self_attn.longformer_self_attn
        assert attn.forward.__self__ is attn


def test_nothing_to_patch_raises():
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=32, vocab_size=50))
    with pytest.raises(ValueError, match="none of the attention modules"):
        longattn.apply_longattn(bert)
    with pytest.raises(ValueError, match="nothing"):
        longattn.revert_longattn(bert)
    with pytest.raises(ValueError, match="backend"):
        longattn.apply_longattn(build(transformers.LongformerModel, longformer_config(), 0), backend="nope")


def test_unsupported_transformers_signature_is_refused():
    from longattn.models import _patching

    spec = _patching.PatchSpec("longformer", "LongformerSelfAttention", _patching.longformer.longformer_forward,
                               ("hidden_states", "attention_mask"))
    with pytest.raises(RuntimeError, match="unsupported transformers"):
        _patching._resolve(spec)


def test_second_apply_updates_settings_and_revert_restores_the_first_original():
    model, kw = _small_model("longformer")
    with torch.no_grad():
        want = model(**kw).last_hidden_state
        longattn.apply_longattn(model, pad_to_window=False)
        longattn.apply_longattn(model, backend="torch")  # back to padding, keeps the stock original
        assert all(_common.patch_state(m).backend == "torch" for m in model.modules() if _common.patch_state(m))
        assert "_pad_to_window_size" not in model.__dict__
        longattn.revert_longattn(model)
        assert torch.equal(model(**kw).last_hidden_state, want)


# ------------------------------------------------------------------------------------- no S x window tensors
def largest_tensor_created(fn) -> int:
    """The largest storage (in elements) of any tensor an aten op returns while ``fn()`` runs: what it
    allocates, so a broadcast view counts as the storage it views."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.untyped_storage().nbytes() // t.element_size())
            return out

    with Largest():
        fn()
    return Largest.largest


@pytest.mark.parametrize("family", ["led", "local", "transient-global"])
def test_patched_attention_forms_no_s_by_window_tensor(family):
    """Every tensor the patched attention module allocates (forward and backward) is smaller than ``S x band``."""
    S, B = 512, 1
    if family == "led":
        model = build(transformers.LEDModel, led_config(windows=(64,)), 0)
        attn = model.get_encoder().layers[0].self_attn.longformer_self_attn
        band, H = 2 * attn.one_sided_attn_window_size + 1, attn.num_heads
        glob = torch.zeros(B, S, dtype=torch.bool)
        glob[:, [0, 100]] = True
        args = dict(attention_mask=torch.where(glob, 1e4, 0.0), is_index_masked=torch.zeros(B, S, dtype=torch.bool),
                    is_index_global_attn=glob, is_global_attn=True)
    else:
        model = build(transformers.LongT5EncoderModel, longt5_config(family, local_radius=32), 0)
        attn = model.encoder.block[0].layer[0]
        attn = attn.LocalSelfAttention if family == "local" else attn.TransientGlobalSelfAttention
        band, H = 2 * attn.local_radius + 1, attn.n_heads
        args = dict(mask=torch.ones(B, S, dtype=torch.long))
    longattn.apply_longattn(model)
    x = torch.randn(B, S, 32, requires_grad=True)
    limit = B * H * S * band

    largest = largest_tensor_created(lambda: attn(x, **args)[0].sum().backward())
    assert 0 < largest < limit, f"a {largest}-element tensor >= B*H*S*band = {limit}"


@pytest.mark.parametrize("attention_type", ["local", "transient-global"])
def test_patched_longt5_encoder_reads_no_device_data_on_the_host(attention_type):
    """Forward and backward of the patched encoder dispatch no op that syncs with the device (the stock
    transient-global forward does: a ``_local_scalar_dense`` in its block ids)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith(("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.is_nonzero")):
                Syncs.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    model = longattn.apply_longattn(build(transformers.LongT5EncoderModel, longt5_config(attention_type), 0))
    ids, mask = token_batch([41, 27], 41, 0, pad_id=0)
    with Syncs():
        model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert not Syncs.seen


# ------------------------------------------------------------------------------------------------ torch.compile
def test_torch_compile_patched_longt5_encoder_fullgraph():
    model = build(transformers.LongT5EncoderModel, longt5_config("transient-global"), 0)
    ids, mask = token_batch([41, 27], 41, 0, pad_id=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    longattn.apply_longattn(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_rel_close("compiled encoder", got[mask.bool()], want[mask.bool()])
    got.sum().backward()
    assert model.encoder.block[0].layer[0].TransientGlobalSelfAttention.q.weight.grad is not None


def test_torch_compile_patched_led_encoder():
    """Default (not fullgraph) compile: the stock LEDEncoder reads ``is_global_attn`` with ``.item()`` and the
    per-row global count is data-dependent, so the graph breaks there by design of the HF code."""
    model, kw = _small_model("led")
    with torch.no_grad():
        want = model(**kw).last_hidden_state
    longattn.apply_longattn(model, pad_to_window=False)
    torch._dynamo.reset()
    got = torch.compile(model, backend="aot_eager")(**kw).last_hidden_state
    real = kw["attention_mask"].bool()
    assert_rel_close("compiled encoder", got[real], want[real])


def test_patched_led_encoder_forms_no_s_by_s_mask():
    """Stock LEDEncoder.forward materialises (B, 1, S, S) mask tensors to keep one row; once an LED model is
    patched, the mask helper computes that row alone, with bitwise the same values."""
    S = 1024
    model = build(transformers.LEDModel, led_config(windows=(16,), max_encoder_position_embeddings=S), 0)
    ids, mask = token_batch([S, S - 100], S, 0, model.config.pad_token_id)
    glob = torch.zeros_like(mask)
    glob[:, [0, 500]] = 1
    encoder = model.get_encoder()

    def run():
        with torch.no_grad():
            return encoder(input_ids=ids, attention_mask=mask, global_attention_mask=glob).last_hidden_state

    want = run()
    longattn.apply_longattn(model)
    helper = transformers.models.led.modeling_led._prepare_4d_attention_mask_inverted
    merged = (mask * (glob + 1)).float()  # LEDEncoder._merge_to_attention_mask's 0 / 1 / 2 values
    stock_helper = helper.__wrapped__
    assert stock_helper is not helper
    assert largest_tensor_created(lambda: stock_helper(merged, torch.float32)) >= 2 * S * S  # what is avoided
    assert torch.equal(helper(merged, torch.float32), stock_helper(merged, torch.float32))
    got, patched_largest = run(), largest_tensor_created(run)
    assert patched_largest < S * S // 4, f"patched LED encoder allocated a {patched_largest}-element tensor"
    real = mask.bool()
    assert_rel_close("last_hidden_state", got[real], want[real])
