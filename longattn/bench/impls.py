"""The implementations timed for each op: longattn's backends and the baselines.

``make(name, case, grad)`` prepares one implementation for one case *outside* any timing (HF modules
built, block masks and dense masks built) and returns ``forward(inputs) -> out``: ``inputs`` is the dict
of leaf tensors of ``cases.leaves``, ``out`` is in longattn's layout, ``(B, S, H, D)`` (``(B, G, C)`` for
``aggregate``). It raises ``Unavailable`` with the reason when the implementation cannot run the case.

Baselines:

- ``hf``:         the stock Hugging Face module (``LongformerSelfAttention``, ``LongT5LocalAttention``,
                  ``LongT5TransientGlobalAttention``; for ``aggregate`` HF's ``_create_global_aggregates``
                  + ``LongT5LayerNorm``), built from a random small config matching the shape. Its Q/K/V
                  (and LongT5's output) projections are replaced by *feeders* that hand it the case's
                  q, k, v, so it runs its own attention code on the same inputs as every other row: the
                  time is attention only, and ``--check`` can compare its output.
- ``flex``:       ``torch.compile``-d FlexAttention with a block mask built once outside the timing.
- ``sdpa_mask``:  SDPA with the whole pattern as a dense mask (bool; additive float when the op has bias
                  tables), built outside the timing; skipped when mask and scores would not fit.
- ``sdpa_dense``: SDPA with no mask over the same q, k, v: a different (dense) function, timed only as the
                  speed of light for the per-FLOP rate.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import api, dispatch
from .cases import Case

BASELINES = ("hf", "flex", "sdpa_mask", "sdpa_dense")
ATTENTION_OPS = ("local", "longformer", "tglobal")


class Unavailable(Exception):
    """This implementation cannot run this case; the message says why."""


def impl_names(backends, baselines) -> list[str]:
    return [f"longattn:{b}" for b in backends] + list(baselines)


def is_baseline(name: str) -> bool:
    return not name.startswith("longattn:")


def make(name: str, case: Case, grad: bool):
    """The forward function of implementation ``name`` for ``case`` (see module docstring)."""
    if name.startswith("longattn:"):
        return _make_longattn(name.split(":", 1)[1], case)
    if name == "hf":
        return _make_hf(case)
    if case.op not in ATTENTION_OPS:
        raise Unavailable(f"{name} is an attention baseline; {case.op} is not attention")
    return {"flex": _make_flex, "sdpa_mask": _make_sdpa_mask, "sdpa_dense": _make_sdpa_dense}[name](case)


# --- longattn ---------------------------------------------------------------------------------------------

def _make_longattn(backend: str, case: Case):
    head_dim = case.H * case.D if case.op == "aggregate" else case.D
    op = "block_aggregate" if case.op == "aggregate" else "band_side"
    reasons = dispatch.unsupported_reasons(backend, case.device, case.dtype, head_dim, op)
    if reasons:
        raise Unavailable("; ".join(reasons))
    window, t = case.window, case.tensors
    if case.op == "local":
        return lambda x: api.local_attention(x["q"], x["k"], x["v"], window, rel_bias=x["rel_bias"],
                                             scale=case.scale, backend=backend)
    if case.op == "longformer":
        # max_globals given, as a model would (it knows its global count), so no host sync is timed.
        return lambda x: api.longformer_attention(x["q"], x["k"], x["v"], window, x["global_mask"],
                                                  max_globals=case.globals, backend=backend)
    if case.op == "tglobal":
        return lambda x: api.tglobal_attention(x["q"], x["k"], x["v"], x["side_k"], x["side_v"], window,
                                               x["query_block"], side_mask=x["side_mask"], rel_bias=x["rel_bias"],
                                               side_bias=x["side_bias"], scale=case.scale, backend=backend)
    return lambda x: api.block_aggregate(x["x"], x["block_ids"], case.num_blocks, weight=t["weight"],
                                         backend=backend)


# --- Hugging Face -----------------------------------------------------------------------------------------

class _Feeder(nn.Module):
    """Stands in for a projection: returns ``pick(input)`` (the case's tensor) instead of ``W @ input``."""

    def __init__(self, pick):
        super().__init__()
        self.pick = pick

    def forward(self, hidden):
        return self.pick(hidden)


def _import_hf(module: str):
    try:
        return __import__(f"transformers.models.{module}.modeling_{module}", fromlist=["_"])
    except Exception as exc:  # missing or broken transformers: the baseline is listed with the reason
        raise Unavailable(f"transformers is not importable ({type(exc).__name__}: {exc})") from exc


def _make_hf(case: Case):
    return {"local": _hf_longt5, "tglobal": _hf_longt5, "longformer": _hf_longformer,
            "aggregate": _hf_aggregate}[case.op](case)


def _hf_longformer(case: Case):
    mod = _import_hf("longformer")
    B, S, H, D, w = case.B, case.S, case.H, case.D, case.window[0]
    if case.window[0] != case.window[1]:
        raise Unavailable("HF Longformer windows are symmetric")
    if w == 0 or S % (2 * w):
        raise Unavailable(f"LongformerSelfAttention needs S to be a multiple of attention_window={2 * w} "
                          "(LongformerModel pads before its layers)")
    E = H * D
    config = mod.LongformerConfig(hidden_size=E, num_attention_heads=H, attention_window=[2 * w],
                                  attention_probs_dropout_prob=0.0)
    layer = mod.LongformerSelfAttention(config, layer_id=0).to(case.device, case.dtype).eval()
    gpos = case.tensors["global_pos"]
    feed = {}
    # HF works in (S, B, E) and divides its query in place: the feeders hand over copies (as its Linear
    # layers would hand over fresh outputs), never views of the case's tensors.
    to_sbe = lambda t: t.transpose(0, 1).clone(memory_format=torch.contiguous_format).view(t.shape[1], B, E)
    layer.query, layer.key, layer.value = (_Feeder(lambda h, n=n: to_sbe(feed["x"][n])) for n in "qkv")
    layer.key_global = _Feeder(lambda h: to_sbe(feed["x"]["k"]))
    layer.value_global = _Feeder(lambda h: to_sbe(feed["x"]["v"]))
    layer.query_global = _Feeder(lambda h: to_sbe(feed["x"]["q"][:, gpos]))  # every row has the same globals
    hidden = torch.zeros(B, S, E, device=case.device, dtype=case.dtype)
    # LongformerModel's mask inside the layers: <0 padding, 0 local, >0 global (only the sign is read).
    mask = case.tensors["global_mask"].to(case.dtype)
    is_masked, is_global = mask < 0, mask > 0
    has_global = bool(is_global.any())

    def forward(x):
        feed["x"] = x
        out = layer(hidden, attention_mask=mask, is_index_masked=is_masked, is_index_global_attn=is_global,
                    is_global_attn=has_global)[0]
        return out.reshape(B, S, H, D)

    return forward


def _hf_longt5(case: Case):
    mod = _import_hf("longt5")
    B, S, H, D, r = case.B, case.S, case.H, case.D, case.window[0]
    if case.window[0] != case.window[1]:
        raise Unavailable("HF LongT5 windows are symmetric")
    E, t = H * D, case.tensors
    tglobal = case.op == "tglobal"
    config = mod.LongT5Config(d_model=E, d_kv=D, num_heads=H, local_radius=r, dropout_rate=0.0,
                              global_block_size=max(1, case.block_size), is_decoder=False,
                              encoder_attention_type="transient-global" if tglobal else "local")
    cls = mod.LongT5TransientGlobalAttention if tglobal else mod.LongT5LocalAttention
    layer = cls(config, has_relative_attention_bias=True).to(case.device, case.dtype).eval()
    with torch.no_grad():  # the case's bias tables are these embeddings looked up by T5's buckets
        layer.relative_attention_bias.weight.copy_(t["bucket_emb"])
        if tglobal:
            layer.global_relative_attention_bias.weight.copy_(t["side_bucket_emb"])
    hidden = torch.zeros(B, S, E, device=case.device, dtype=case.dtype)
    feed = {}
    flat = lambda t: t.reshape(t.shape[0], t.shape[1], E)
    layer.q = _Feeder(lambda h: flat(feed["x"]["q"]))
    # TGlobal projects the hidden states and then the block aggregates with the same k / v.
    layer.k = _Feeder(lambda h: flat(feed["x"]["k"] if h is hidden else feed["x"]["side_k"]))
    layer.v = _Feeder(lambda h: flat(feed["x"]["v"] if h is hidden else feed["x"]["side_v"]))
    layer.o = nn.Identity()
    ones = torch.ones(B, S, device=case.device)
    # The LongT5 stack hands the local module its blocked boolean mask (built once per model, not per layer)
    # and the TGlobal module the raw 2-D mask (DESIGN.md section 3).
    mask = ones if tglobal else mod._get_local_attention_mask(ones, layer.block_len, case.device)

    def forward(x):
        feed["x"] = x
        return layer(hidden, mask=mask)[0].reshape(B, S, H, D)

    return forward


def _hf_aggregate(case: Case):
    mod = _import_hf("longt5")
    norm = mod.LongT5LayerNorm(case.H * case.D, eps=1e-6).to(case.device, case.dtype)
    with torch.no_grad():
        norm.weight.copy_(case.tensors["weight"])
    G = case.num_blocks
    return lambda x: norm(mod._create_global_aggregates(x["x"], x["block_ids"], G))


# --- FlexAttention ----------------------------------------------------------------------------------------

@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _make_flex(case: Case):
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as exc:
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention ({exc})") from exc
    S, (left, right), t = case.S, case.window, case.tensors
    G = case.num_blocks if case.op == "tglobal" else 0

    def band(q, kv):
        return (kv >= q - left) & (kv <= q + right)

    score_mod = None
    if case.op == "longformer":
        gm = t["global_mask"]
        mask_mod = lambda b, h, q, kv: band(q, kv) | gm[b, kv] | gm[b, q]
    elif G == 0:
        rb = t["rel_bias"]
        mask_mod = lambda b, h, q, kv: band(q, kv)
        score_mod = lambda s, b, h, q, kv: s + rb[h, (kv - q + left).clamp(0, left + right)]
    else:
        rb, sb, qb, sm = t["rel_bias"], t["side_bias"], t["query_block"], t["side_mask"]

        def mask_mod(b, h, q, kv):
            return ((kv < S) & band(q, kv)) | ((kv >= S) & sm[b, (kv - S).clamp(0, G - 1)])

        def score_mod(s, b, h, q, kv):
            band_bias = rb[h, (kv - q + left).clamp(0, left + right)]
            side_bias = sb[h, (kv - S - qb[b, q] + G).clamp(0, 2 * G)]
            return s + torch.where(kv < S, band_bias, side_bias)

    block_mask = create_block_mask(mask_mod, B=case.B, H=None, Q_LEN=S, KV_LEN=S + G, device=case.device)
    flex = _compiled_flex()

    def forward(x):
        k, v = x["k"], x["v"]
        if G:
            k, v = torch.cat([k, x["side_k"]], 1), torch.cat([v, x["side_v"]], 1)
        out = flex(x["q"].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
                   block_mask=block_mask, scale=case.scale)
        return out.transpose(1, 2)

    return forward


# --- SDPA -------------------------------------------------------------------------------------------------

def free_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device`` (GPU: the CUDA driver; CPU: MemAvailable), for skip-before-allocate."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # unknown: assume a modest machine rather than risk swapping it


def _dense_pattern(case: Case):
    """(mask, keys, values, side): the pattern as a dense ``(B, 1|H, S, S+G)`` bool or additive mask."""
    S, (left, right), t = case.S, case.window, case.tensors
    i = torch.arange(S, device=case.device)[:, None]
    j = torch.arange(S, device=case.device)[None, :]
    in_band = (j >= i - left) & (j <= i + right)
    if case.op == "longformer":
        gm = t["global_mask"]
        return (in_band[None] | gm[:, None, :] | gm[:, :, None])[:, None]  # (B, 1, S, S) bool
    offset = (j - i + left).clamp(0, left + right)
    band = torch.where(in_band, t["rel_bias"][:, offset], float("-inf"))[None]  # (1, H, S, S)
    if case.op == "local":
        return band
    G = case.num_blocks
    side_off = (torch.arange(G, device=case.device)[None, None, :] - t["query_block"].long()[:, :, None] + G)
    side = t["side_bias"][:, side_off.clamp(0, 2 * G)].permute(1, 0, 2, 3)  # (B, H, S, G)
    side = torch.where(t["side_mask"][:, None, None, :], side, float("-inf"))
    return torch.cat([band.expand(case.B, -1, -1, -1), side], -1)  # (B, H, S, S + G)


def _make_sdpa_mask(case: Case):
    S, G = case.S, (case.num_blocks if case.op == "tglobal" else 0)
    elem = torch.finfo(case.dtype).bits // 8
    heads = 1 if case.op == "longformer" else case.H
    mask_bytes = case.B * heads * S * (S + G) * (1 if case.op == "longformer" else elem)
    # Where SDPA falls back to its math path it holds scores, probabilities and their gradients in fp32.
    need = mask_bytes + 3 * case.B * case.H * S * (S + G) * 4
    free = free_memory_bytes(case.device)
    if need > 0.8 * free:
        raise Unavailable(f"the dense mask and scores need ~{need / 2**30:.1f} GiB, more than 80% of the "
                          f"{free / 2**30:.1f} GiB free")
    mask = _dense_pattern(case)
    if mask.dtype != torch.bool:
        mask = mask.to(case.dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def forward(x):
        k, v = x["k"], x["v"]
        if G:
            k, v = torch.cat([k, x["side_k"]], 1), torch.cat([v, x["side_v"]], 1)
        out = sdpa(x["q"].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=case.scale)
        return out.transpose(1, 2)

    return forward


def _make_sdpa_dense(case: Case):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return lambda x: sdpa(x["q"].transpose(1, 2), x["k"].transpose(1, 2), x["v"].transpose(1, 2),
                          scale=case.scale).transpose(1, 2)
