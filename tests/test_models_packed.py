"""``apply_longattn(model, packed=True)`` on ragged batches (issue 14): tiny random LED, Longformer and LongT5.

Same comparisons as ``tests/test_models.py`` (real-token hidden states, logits and loss against the stock fp32
model; every parameter gradient within the model-level tolerance rule against an fp64 oracle), on batches whose
rows have very different lengths, including rows shorter than the window and than LongT5's global block. Also:
the packed path really runs (the varlen op is called and the padded one is not), padding rows of the layer output
are 0, layouts packing cannot serve fall back to the padded patch with a warning, and the layout is computed once
per forward.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longattn  # noqa: E402
from longattn import varlen_api  # noqa: E402
from tests.test_models import (  # noqa: E402
    build,
    check_matches_stock,
    global_mask,
    led_config,
    longformer_config,
    longt5_config,
    patched_copy,
    seq2seq_labels,
    token_batch,
)

S = 45
RAGGED = [45, 3, 31, 12]  # a full row, one shorter than every window, two in between


@pytest.fixture(autouse=True)
def _fresh_warnings():
    from longattn.models import _common

    _common._warned.clear()
    yield
    _common._warned.clear()


class _Calls:
    """Counts calls of the varlen and padded ops made by the patched layers."""

    def __init__(self, monkeypatch, module, names):
        self.counts = dict.fromkeys(names, 0)
        for name in names:
            original = getattr(module, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("seed, globals_", [(0, "none"), (1, "one"), (2, "many")])
def test_longformer_packed_matches_stock(seed, globals_, monkeypatch):
    from longattn.models import longformer

    calls = _Calls(monkeypatch, longformer, ("longformer_attention_varlen", "longformer_attention"))
    stock = build(transformers.LongformerForMaskedLM, longformer_config(windows=(8, 12)), seed)
    ids, mask = token_batch(RAGGED, S, seed, pad_id=1)
    inputs = dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask(globals_, RAGGED, S),
                  labels=ids.masked_fill(mask == 0, -100))
    check_matches_stock(stock, inputs, mask, lambda out: out.hidden_states[-1], oracle="patched", packed=True)
    assert calls.counts["longformer_attention_varlen"] > 0 and calls.counts["longformer_attention"] == 0


@pytest.mark.parametrize("seed, globals_", [(0, "one"), (1, "many")])
def test_led_packed_matches_stock(seed, globals_):
    stock = build(transformers.LEDForConditionalGeneration, led_config(windows=(16, 8)), seed)
    ids, mask = token_batch(RAGGED, S, seed, pad_id=1)
    inputs = dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask(globals_, RAGGED, S),
                  labels=seq2seq_labels(len(RAGGED), seed))
    check_matches_stock(stock, inputs, mask, lambda out: out.encoder_last_hidden_state, oracle="patched",
                        packed=True, pad_to_window=False)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("attention_type", ["local", "transient-global"])
def test_longt5_packed_matches_stock(seed, attention_type, monkeypatch):
    from longattn.models import longt5

    calls = _Calls(monkeypatch, longt5, ("local_attention_varlen", "local_attention"))
    tg_calls = _Calls(monkeypatch, varlen_api, ("tglobal_attention_varlen",))
    stock = build(transformers.LongT5ForConditionalGeneration, longt5_config(attention_type), seed)
    lengths = [41, 3, 27, 10]  # 3 < global_block_size = 4: a row without a full block
    ids, mask = token_batch(lengths, 41, seed, pad_id=0)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=seq2seq_labels(len(lengths), seed))
    check_matches_stock(stock, inputs, mask, lambda out: out.encoder_last_hidden_state, packed=True)
    if attention_type == "local":
        assert calls.counts["local_attention_varlen"] > 0 and calls.counts["local_attention"] == 0
    else:
        assert tg_calls.counts["tglobal_attention_varlen"] > 0


@pytest.mark.parametrize("family", ["longformer", "local", "transient-global"])
def test_packed_padding_rows_of_the_layer_are_zero(family):
    """The layer output at padding positions is 0 (documented for packed=True, every family)."""
    if family == "longformer":
        model = build(transformers.LongformerModel, longformer_config(windows=(8,)), 0)
        pad_id = 1
    else:
        model = build(transformers.LongT5EncoderModel, longt5_config(family), 0)
        pad_id = 0
    longattn.apply_longattn(model, packed=True)
    ids, mask = token_batch([20, 7], 20, 0, pad_id=pad_id)
    attn = next(m for m in model.modules() if type(m).__name__ in (
        "LongformerSelfAttention", "LongT5LocalAttention", "LongT5TransientGlobalAttention"))
    seen = []
    attn.register_forward_hook(lambda mod, args, out: seen.append(out[0]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert seen and (seen[0][1, 7:] == 0).all() and (seen[0][1, :7] != 0).any()


def test_unpaddable_layouts_fall_back_with_a_warning(monkeypatch):
    """Padding inside a row (Longformer) and left padding (LongT5 transient-global) run the padded patch."""
    from longattn.models import longformer

    calls = _Calls(monkeypatch, longformer, ("longformer_attention_varlen", "longformer_attention"))
    model = build(transformers.LongformerModel, longformer_config(windows=(8,)), 0)
    stock_out = model(input_ids=token_batch([16, 16], 16, 0, pad_id=1)[0],
                      attention_mask=torch.tensor([[1] * 16, [1] * 5 + [0] * 3 + [1] * 8])).last_hidden_state
    longattn.apply_longattn(model, packed=True)
    ids, _ = token_batch([16, 16], 16, 0, pad_id=1)
    inner_padding = torch.tensor([[1] * 16, [1] * 5 + [0] * 3 + [1] * 8])
    with pytest.warns(UserWarning, match="not contiguous"):
        out = model(input_ids=ids, attention_mask=inner_padding).last_hidden_state
    assert calls.counts["longformer_attention"] > 0 and calls.counts["longformer_attention_varlen"] == 0
    real = inner_padding.bool()
    torch.testing.assert_close(out[real], stock_out[real], rtol=1e-5, atol=1e-5)

    t5 = build(transformers.LongT5EncoderModel, longt5_config("transient-global"), 0)
    longattn.apply_longattn(t5, packed=True)
    ids, mask = token_batch([12, 9], 12, 0, pad_id=0)
    with pytest.warns(UserWarning, match="start at position 0"):
        t5(input_ids=ids, attention_mask=mask.flip(1))


def test_unpadded_batch_runs_the_padded_ops_silently(monkeypatch):
    """Nothing to gain without padding: the padded op, no warning."""
    from longattn.models import longformer

    calls = _Calls(monkeypatch, longformer, ("longformer_attention_varlen", "longformer_attention"))
    model = longattn.apply_longattn(build(transformers.LongformerModel, longformer_config(windows=(8,)), 0),
                                    packed=True, pad_to_window=False)
    ids, mask = token_batch([16, 16], 16, 0, pad_id=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, attention_mask=mask)
    assert calls.counts["longformer_attention_varlen"] == 0 and calls.counts["longformer_attention"] > 0


@pytest.mark.parametrize("family", ["longformer", "local", "transient-global"])
def test_packed_layout_reads_the_host_once_per_forward(family, monkeypatch):
    """One host read (the layout) per forward, whatever the number of layers."""
    from longattn.models import _packing

    reads = []
    original = _packing._layout
    monkeypatch.setattr(_packing, "_layout", lambda *a, **k: reads.append(1) or original(*a, **k))
    if family == "longformer":
        model = build(transformers.LongformerModel, longformer_config(windows=(8, 8, 8)), 0)
        pad_id = 1
    else:
        model = build(transformers.LongT5EncoderModel, longt5_config(family), 0)  # two encoder layers
        pad_id = 0
    longattn.apply_longattn(model, packed=True)
    ids, mask = token_batch([24, 9], 24, 0, pad_id=pad_id)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(reads) == 1


def test_packed_training_with_dropout_runs_and_is_finite():
    model = build(transformers.LEDForConditionalGeneration, led_config(windows=(8, 8), attention_dropout=0.3), 0)
    patched = patched_copy(model, packed=True).train()
    ids, mask = token_batch(RAGGED, S, 0, pad_id=1)
    out = patched(input_ids=ids, attention_mask=mask, labels=seq2seq_labels(len(RAGGED), 0))
    out.loss.backward()
    assert out.loss.isfinite() and all(p.grad is None or p.grad.isfinite().all() for p in patched.parameters())
