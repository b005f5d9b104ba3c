"""``attn_implementation="longattn"`` on Hugging Face models with sliding-window layers (issue 17).

Tiny random models (longattn.hf_models), fp32 on CPU with the torch backend, right and left padding. Parity: hidden
states on real tokens and every parameter gradient of the ``"longattn"`` model against the same weights run with
``"eager"``, judged by the tolerance rule with a float64 eager oracle. The sliding layers must run longattn's op
(counted with a dispatch mode) and build nothing S x S; everything else delegates with a one-time warning.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import longattn
from longattn import hf_attention
from longattn.hf_models import build_hf_config, build_hf_model
from longattn.models import _common
from tests.tolerance import assert_close_to_oracle, assert_within_rule

transformers = pytest.importorskip("transformers", reason="transformers (the 'test' extra) is not installed")

FAMILIES = ["modernbert", "mistral", "qwen2", "gemma3", "gpt_oss"]
# Sliding layers of each tiny config (layer_types), i.e. the number of longattn op calls per forward.
SLIDING_LAYERS = {"modernbert": 2, "mistral": 2, "qwen2": 1, "gemma3": 1, "gpt_oss": 1}
ALL_SLIDING = {  # overrides that make every layer a sliding one (the no-S x S check)
    "modernbert": dict(layer_types=["sliding_attention"] * 3),
    "mistral": {},
    "qwen2": dict(max_window_layers=0),
    "gemma3": dict(layer_types=["sliding_attention"] * 2),
    "gpt_oss": dict(layer_types=["sliding_attention"] * 2),
}


@pytest.fixture(autouse=True)
def registered():
    assert hf_attention.register_hf_attention(backend="torch") == "longattn"
    _common._warned.clear()  # each test sees its own one-time warnings
    yield
    longattn.register_hf_attention()


class OpRecorder(TorchDispatchMode):
    """Records the longattn ops called (forward and backward) and the shape of every tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.longattn_ops = []
        self.shapes = []

    @property
    def longattn_calls(self) -> int:
        """Forward calls of longattn ops."""
        return sum("backward" not in name for name in self.longattn_ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "namespace", None) == "longattn":
            self.longattn_ops.append(func.name())
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.shapes.append(tuple(x.shape))
        return out


@contextlib.contextmanager
def fp64_softmax():
    """HF's eager attention takes the softmax with ``dtype=torch.float32`` even for float64 models, which would
    leave the float64 oracle at fp32 precision; keep float64 softmaxes in float64."""
    softmax = torch.nn.functional.softmax

    def softmax64(x, *args, dtype=None, **kwargs):
        return softmax(x, *args, dtype=None if x.dtype == torch.float64 else dtype, **kwargs)

    torch.nn.functional.softmax = softmax64
    try:
        yield
    finally:
        torch.nn.functional.softmax = softmax


def inputs(B=2, S=77, pad=19, seed=0, side="right"):
    """Random token ids and an attention mask where the last row has ``pad`` padding tokens on ``side``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    padding = slice(S - pad, S) if side == "right" else slice(0, pad)
    mask[-1, padding] = 0
    ids[-1, padding] = 0
    return ids, mask


def forward_backward(model, ids, mask, proj):
    """Hidden states on real tokens and the gradients of ``sum(hidden * proj)`` over them (None if unused)."""
    model.zero_grad(set_to_none=True)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    (hidden[real] * proj.to(hidden.dtype)).sum().backward()
    return hidden[real].detach(), {n: p.grad for n, p in model.named_parameters()}


def same_weights(family, impls, dtypes, **overrides):
    """One model per (attn_implementation, dtype), all with the first one's weights."""
    models = [build_hf_model(family, attn_implementation=impl, **overrides) for impl in impls]
    for m in models:
        m.load_state_dict(models[0].state_dict())
        if family == "gpt_oss":
            m.set_experts_implementation("eager")  # grouped_mm has no float64 (the oracle)
    return [m.to(dtype) for m, dtype in zip(models, dtypes)]


@pytest.mark.parametrize("side", ["right", "left"])  # left: padding keys inside causal windows
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_eager(family, side):
    check_parity_with_eager(family, side)


# Grouped-query (H_kv = 2) and multi-query (H_kv = 1) versions of the tiny configs (4 query heads); ModernBERT has
# no K/V head option. Gemma-3-1B itself is multi-query.
GQA_CONFIGS = {"mistral": 2, "qwen2": 1, "gemma3": 1, "gpt_oss": 2}


@pytest.mark.parametrize("family", GQA_CONFIGS)
def test_grouped_query_parity_with_eager(family):
    """num_key_value_heads < num_attention_heads: the sliding layers run on longattn with H_kv-head K/V (no
    fallback, no repeat_kv), hidden states and every gradient (k_proj / v_proj included) as eager."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no delegation on the sliding layers (global layers warn: filtered below)
        warnings.filterwarnings("ignore", message=".*no sliding window.*")
        check_parity_with_eager(family, "right", num_key_value_heads=GQA_CONFIGS[family])


def check_parity_with_eager(family, side, **overrides):
    """Parity of the ``"longattn"`` model with ``"eager"`` (tolerance rule, float64 eager oracle), on the op."""
    ours, eager, oracle = same_weights(family, ["longattn", "eager", "eager"],
                                       [torch.float32, torch.float32, torch.float64], **overrides)
    kv_heads = overrides.get("num_key_value_heads")
    if kv_heads is not None:
        attn = ours.layers[0].self_attn
        assert attn.q_proj.out_features == ours.config.num_attention_heads // kv_heads * attn.k_proj.out_features
    if family == "gpt_oss":  # make the sinks matter (init std 0.02 leaves them ~0)
        with torch.no_grad():
            for m in (ours, eager, oracle):
                for layer in m.layers:
                    layer.self_attn.sinks.copy_(torch.linspace(-2, 2, layer.self_attn.sinks.numel()))
    ids, mask = inputs(side=side)
    proj = torch.randn(int(mask.sum()), ours.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with OpRecorder() as rec:
        h, grads = forward_backward(ours, ids, mask, proj)
    assert rec.longattn_calls == SLIDING_LAYERS[family]
    assert len(rec.longattn_ops) == 2 * SLIDING_LAYERS[family]  # and as many backward calls
    h_eager, grads_eager = forward_backward(eager, ids, mask, proj)
    with fp64_softmax():
        h_oracle, grads_oracle = forward_backward(oracle, ids, mask, proj)
    assert_within_rule(f"{family} hidden", h, h_eager, h_oracle)
    assert grads.keys() == grads_eager.keys()
    checked = 0
    for name, g in grads.items():
        assert (g is None) == (grads_eager[name] is None), name
        if g is not None:
            assert_within_rule(f"{family} grad {name}", g, grads_eager[name], grads_oracle[name], grad=True)
            checked += 1
    assert checked > 10
    if family == "gpt_oss":
        assert all(layer.self_attn.sinks.grad.abs().min() > 0 for layer in ours.layers)


@pytest.mark.parametrize("family", ["mistral", "gpt_oss"])
def test_cpu_autocast_bf16(family):
    """Under autocast the models hand over mixed dtypes (fp32 rotary output, bf16 values): the op runs in bf16,
    and output and gradients keep the rule against the same model's eager run under autocast."""
    # Every expert on every token: bf16 noise must not flip a discrete top-k routing choice between the runs.
    overrides = dict(num_experts_per_tok=4) if family == "gpt_oss" else {}
    ours, eager, oracle = same_weights(family, ["longattn", "eager", "eager"],
                                       [torch.float32, torch.float32, torch.float64], **overrides)
    ids, mask = inputs()
    proj = torch.randn(int(mask.sum()), ours.config.hidden_size, generator=torch.Generator().manual_seed(1))
    runs = []
    for m in (ours, eager, oracle):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=m is not oracle), OpRecorder() as rec:
            with fp64_softmax():
                runs.append(forward_backward(m, ids, mask, proj))
        assert rec.longattn_calls == (SLIDING_LAYERS[family] if m is ours else 0)
    (h, g), (h_eager, g_eager), (h_oracle, g_oracle) = runs
    assert_within_rule("hidden", h, h_eager, h_oracle)
    for name in g:
        if g[name] is not None and "layers" in name:
            assert_within_rule(name, g[name], g_eager[name], g_oracle[name], grad=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_sliding_layers_run_longattn_without_dense_mask(family):
    """Every layer sliding: one longattn call per layer, no tensor with two dims of size S, no warning."""
    model = build_hf_model(family, attn_implementation="longattn", **ALL_SLIDING[family])
    S = 151
    ids, mask = inputs(S=S, pad=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback anywhere
        with torch.no_grad(), OpRecorder() as rec:
            model(input_ids=ids, attention_mask=mask)
        with torch.no_grad(), OpRecorder() as no_mask:
            model(input_ids=ids)  # no padding mask at all
    for r in (rec, no_mask):
        assert r.longattn_calls == model.config.num_hidden_layers
        dense = [s for s in r.shapes if sum(d == S for d in s) >= 2]
        assert not dense, f"S x S tensors were built: {dense[:5]}"


def _forward_warnings(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with OpRecorder() as rec:
            out = model(**kwargs)
    return out, rec.longattn_calls, [str(w.message) for w in caught if "longattn" in str(w.message)]


def test_global_layers_delegate_with_one_warning():
    model = build_hf_model("modernbert", attn_implementation="longattn", num_hidden_layers=6)  # 2 global layers
    ids, mask = inputs()
    with torch.no_grad():
        _, calls, msgs = _forward_warnings(model, input_ids=ids, attention_mask=mask)
        assert calls == 4 and len(msgs) == 1 and "no sliding window" in msgs[0]
        _, calls, msgs = _forward_warnings(model, input_ids=ids, attention_mask=mask)
        assert calls == 4 and not msgs  # once per process and reason, not per layer or call


def test_kv_cache_prefill_fast_then_decode_delegates():
    """With a cache, the prefill (q_len == kv_len) runs longattn; the one-token steps delegate to sdpa."""
    ours, eager = same_weights("mistral", ["longattn", "eager"], [torch.float32] * 2)
    ids, mask = inputs(B=1, S=40, pad=0)
    nxt = torch.tensor([[5]])
    with torch.no_grad():
        out, calls, msgs = _forward_warnings(ours, input_ids=ids, attention_mask=mask, use_cache=True)
        assert calls == ours.config.num_hidden_layers and not msgs
        step, calls, msgs = _forward_warnings(ours, input_ids=nxt, cache=out.past_key_values,
                                              use_cache=True)
        assert calls == 0 and any("KV cache" in m for m in msgs)
        ref = eager(input_ids=ids, attention_mask=mask, use_cache=True)
        ref_step = eager(input_ids=nxt, cache=ref.past_key_values, use_cache=True)
    torch.testing.assert_close(step.last_hidden_state, ref_step.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_generate_matches_eager():
    """Greedy generation with left padding: prefill on longattn, decoding steps on sdpa, same tokens as eager."""
    config = build_hf_config("mistral")
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    ids, mask = inputs(S=30, pad=5, side="left")
    tokens = {}
    for impl in ("eager", "longattn"):
        model.set_attn_implementation(impl)
        with OpRecorder() as rec:
            tokens[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                          pad_token_id=0)
        assert rec.longattn_calls == (config.num_hidden_layers if impl == "longattn" else 0)
    assert torch.equal(tokens["eager"], tokens["longattn"])


def test_mask_overlays_delegate():
    """Gemma 3 with bidirectional attention ORs a window overlay into the mask: that layer delegates."""
    ours, eager = same_weights("gemma3", ["longattn", "eager"], [torch.float32] * 2,
                               use_bidirectional_attention=True)
    ids, mask = inputs()
    with torch.no_grad():
        out, calls, msgs = _forward_warnings(ours, input_ids=ids, attention_mask=mask)
        ref = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls == 0 and any("extra mask patterns" in m for m in msgs)
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], ref[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, kwargs, reason", [
    ("gemma2", {}, "softcapping"),  # Gemma 2 caps its logits: its own eager function runs
    ("modernbert", dict(output_attentions=True), "output_attentions"),
])
def test_eager_delegation(family, kwargs, reason):
    ours, eager = same_weights(family, ["longattn", "eager"], [torch.float32] * 2)
    ids, mask = inputs()
    with torch.no_grad():
        out, calls, msgs = _forward_warnings(ours, input_ids=ids, attention_mask=mask, **kwargs)
        ref = eager(input_ids=ids, attention_mask=mask, **kwargs)
    assert calls == 0 and any(reason in m and "HF's eager" in m for m in msgs)
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], rtol=1e-5, atol=1e-5)
    for a, b in zip(out.attentions or (), ref.attentions or ()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dropout_in_training_runs_on_longattn():
    """Attention dropout in training takes the fast path (fused dropout in the op), no delegation for it."""
    model = build_hf_model("modernbert", attn_implementation="longattn", attention_dropout=0.1).train()
    ids, mask = inputs()
    _, calls, msgs = _forward_warnings(model, input_ids=ids, attention_mask=mask)
    assert calls > 0 and not any("dropout" in m for m in msgs)


def test_entry_points(tmp_path):
    """from_pretrained(attn_implementation=...), set_attn_implementation and a config set before init."""
    model = build_hf_model("mistral", attn_implementation="eager")
    model.save_pretrained(tmp_path)
    ids, mask = inputs()
    loaded = transformers.MistralModel.from_pretrained(tmp_path, attn_implementation="longattn")
    model.set_attn_implementation("longattn")
    for m in (loaded, model):
        assert m.config._attn_implementation == "longattn"
        with torch.no_grad():
            _, calls, _ = _forward_warnings(m.eval(), input_ids=ids, attention_mask=mask)
        assert calls == m.config.num_hidden_layers


def dense_sink_attention(q, k, v, sinks, window, key_mask, scale):
    """fp64 reference on ``(B, H, S, D)``: band + padding mask, one extra logit per head in the denominator."""
    B, H, S, D = q.shape
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    allowed = (j >= i - window[0]) & (j <= i + window[1]) & key_mask[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    scores = torch.cat([scores, sinks.view(1, H, 1, 1).expand(B, H, S, 1)], -1)
    return (scores.softmax(-1)[..., :-1] @ v).transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinks_as_a_side_key_against_a_dense_oracle(causal, dtype):
    """The op-level sink: output and the gradients of q, k, v and the sink logits vs a float64 dense oracle."""
    B, H, S, D, w = 2, 3, 53, 16, 9
    g = torch.Generator().manual_seed(0)
    leaves64 = [torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(3)]
    leaves64.append(torch.randn(H, generator=g, dtype=torch.float64) * 2)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[1, 40:] = False
    mask = hf_attention.longattn_mask(q_length=S, kv_length=S, attention_mask=key_mask, local_size=w,
                                      **({} if causal else {"allow_is_bidirectional_skip": True}))
    window = mask.window()
    grad_out = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    results = []
    for run, leaves in (("op", [x.to(dtype).requires_grad_() for x in leaves64]),
                        ("oracle", [x.clone().requires_grad_() for x in leaves64])):
        leaves = [x.detach().requires_grad_() for x in leaves]
        q, k, v, sinks = leaves
        out = (hf_attention.banded_attention(q, k, v, mask, window, D**-0.5, sinks) if run == "op"
               else dense_sink_attention(q, k, v, sinks, window, key_mask, D**-0.5))
        out.backward(grad_out.to(out.dtype))
        results.append([out.detach()] + [x.grad for x in leaves])
    for name, ours, ref in zip(["out", "dq", "dk", "dv", "dsinks"], *results):
        assert_close_to_oracle(name, ours, ref)


def test_register_is_idempotent():
    from transformers import AttentionInterface, AttentionMaskInterface

    assert longattn.register_hf_attention() == longattn.register_hf_attention() == "longattn"
    assert AttentionInterface._global_mapping["longattn"] is hf_attention.longattn_attention_forward
    assert AttentionMaskInterface._global_mapping["longattn"] is hf_attention.longattn_mask
    with pytest.raises(ValueError, match="backend"):
        longattn.register_hf_attention(backend="nope")


def test_import_does_not_import_transformers():
    code = "import sys, longattn; assert 'transformers' not in sys.modules, 'imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 in the environment to run on CPU")
def test_triton_backend_on_a_tiny_model():
    """The Triton kernels behind the attention interface (under the interpreter on CPU): Mistral fwd + bwd, with
    grouped-query attention (2 K/V heads for 4 query heads)."""
    longattn.register_hf_attention(backend="triton")
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    ours, eager, oracle = same_weights("mistral", ["longattn", "eager", "eager"],
                                       [torch.float32, torch.float32, torch.float64], num_hidden_layers=1,
                                       num_key_value_heads=2)
    ids, mask = inputs(S=45, pad=11)
    proj = torch.randn(int(mask.sum()), ours.config.hidden_size, generator=torch.Generator().manual_seed(1))
    ids, mask, proj = ids.to(device), mask.to(device), proj.to(device)
    runs = []
    for m in (ours, eager, oracle):
        with fp64_softmax(), OpRecorder() as rec:
            runs.append(forward_backward(m.to(device), ids, mask, proj))
        assert rec.longattn_calls == (1 if m is ours else 0)
    (h, g), (h_eager, g_eager), (h_oracle, g_oracle) = runs
    assert_within_rule("hidden", h, h_eager, h_oracle)
    for name in ("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
                 "layers.0.self_attn.v_proj.weight", "embed_tokens.weight"):
        assert_within_rule(name, g[name], g_eager[name], g_oracle[name], grad=True)
