"""The implementations timed for each op: longattn's backends and the baselines.

``make(name, case, grad)`` prepares one implementation for one case *outside* any timing (HF modules
built, block masks and dense masks built) and returns ``forward(inputs) -> out``: ``inputs`` is the dict
of leaf tensors of ``cases.leaves``, ``out`` is in longattn's layout, ``(B, S, H, D)`` (``(B, G, C)`` for
``aggregate``). It raises ``Unavailable`` with the reason when the implementation cannot run the case.

A case whose tensors hold a ``key_padding_mask`` ``(B, S)`` (right-padded ragged batches, ``ragged``) is run with
it by the longattn and ``hf`` implementations; the other baselines do not take padding and say so.

Baselines. Each is what an expert user of that library would write for the case (DESIGN.md section 5):
everything that does not depend on the inputs' values (modules, masks, block masks, compiled code) is built
once in ``make``, outside the timing, and only the call a model would make per step is timed.

- ``hf``:         the stock Hugging Face module (``LongformerSelfAttention``, ``LongT5LocalAttention``,
                  ``LongT5TransientGlobalAttention``; for ``aggregate`` HF's ``_create_global_aggregates``
                  + ``LongT5LayerNorm``), built from a random small config matching the shape. Its Q/K/V
                  (and LongT5's output) projections are replaced by *feeders* that hand it the case's
                  q, k, v, so it runs its own attention code on the same inputs as every other row: the
                  time is attention only, and ``--check`` can compare its output. The masks the HF model
                  builds once per forward (not per layer) are built here once: Longformer's sign-coded
                  mask and LongT5-local's blocked mask. Fair because it is exactly what a user of the
                  ``transformers`` model runs, minus the projections every implementation would share.
- ``flex``:       FlexAttention as its authors recommend: ``torch.compile(flex_attention)`` compiled once
                  per case (fresh dynamo state, so the sweep never hits the recompile limit and falls back
                  to eager), a ``BlockMask`` from ``create_block_mask`` built once (``_compile=True`` on GPU
                  so S x S is never materialised; ``B=None`` when the pattern is the same for every row, so
                  one mask serves the batch), and mods written with index arithmetic (``_flex_mods``):
                  ``local`` = band mask + bias table read by offset; ``longformer`` = ``band | (kv == g) |
                  (q == g)`` with the global positions unrolled as constants (no memory read; a lookup
                  table only beyond ``FLEX_MAX_UNROLLED_GLOBALS`` or when rows differ); ``tglobal`` = the G
                  side keys appended after the S band keys in one K/V (one softmax over both, as the op
                  defines), side keys always attended and the query's block ``min(q // block, G - 1)``
                  computed, not looked up, when there is no padding, and the two bias tables applied in
                  ``score_mod``. Fully-inside blocks are "full blocks" (no mod evaluated). ``kernel_options``:
                  torch's defaults (``FLEX_KERNEL_OPTIONS`` records any measured better setting).
- ``sdpa_mask``:  SDPA with the whole pattern as a dense mask built once: bool ``(B, 1, S, S)`` broadcast over
                  heads for Longformer (SDPA's memory-efficient kernel takes it), additive ``(1|B, H, S,
                  S+G)`` in the input dtype when the op has bias tables; skipped when mask and scores would
                  not fit. Fair as the fastest thing SDPA alone can do for an arbitrary pattern.
- ``sdpa_dense``: SDPA with no mask over the same q, k, v (flash attention): a different (dense) function,
                  timed only as the speed of light for the per-FLOP rate, never as a baseline to beat.
"""

from __future__ import annotations

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
    if case.op in ("local", "tglobal") and "rel_bias" not in case.tensors and name != "sdpa_dense":
        raise Unavailable(f"{name} is built with the LongT5 bias tables (--no-bias times the longattn backends only)")
    if name == "hf":
        return _make_hf(case)
    if case.op not in ATTENTION_OPS:
        raise Unavailable(f"{name} is an attention baseline; {case.op} is not attention")
    if "key_padding_mask" in case.tensors:
        raise Unavailable(f"{name} is built for unpadded batches (no key padding mask)")
    return {"flex": _make_flex, "sdpa_mask": _make_sdpa_mask, "sdpa_dense": _make_sdpa_dense}[name](case)


# --- longattn ---------------------------------------------------------------------------------------------

def require_backend(backend: str, case: Case, features: tuple[str, ...] = ()) -> None:
    """Raise ``Unavailable`` with the reasons when longattn backend ``backend`` cannot run ``case``'s op
    (``features``: as ``dispatch.unsupported_reasons``, e.g. ``("ranges",)`` for the packed ops)."""
    head_dim = case.H * case.D if case.op == "aggregate" else case.D
    op = "block_aggregate" if case.op == "aggregate" else "band_side"
    reasons = dispatch.unsupported_reasons(backend, case.device, case.dtype, head_dim, op, features)
    if reasons:
        raise Unavailable("; ".join(reasons))


def _make_longattn(backend: str, case: Case):
    require_backend(backend, case)
    window, t = case.window, case.tensors
    kpm = t.get("key_padding_mask")  # None: no padding
    if case.op == "local":
        return lambda x: api.local_attention(x["q"], x["k"], x["v"], window, key_padding_mask=kpm,
                                             rel_bias=x.get("rel_bias"), scale=case.scale, backend=backend)
    if case.op == "longformer":
        # max_globals given, as a model would (it knows its global count), so no host sync is timed.
        return lambda x: api.longformer_attention(x["q"], x["k"], x["v"], window, x["global_mask"],
                                                  key_padding_mask=kpm, max_globals=case.globals, backend=backend)
    if case.op == "tglobal":
        return lambda x: api.tglobal_attention(x["q"], x["k"], x["v"], x["side_k"], x["side_v"], window,
                                               x["query_block"], key_padding_mask=kpm, side_mask=x["side_mask"],
                                               rel_bias=x.get("rel_bias"), side_bias=x.get("side_bias"),
                                               scale=case.scale, backend=backend)
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
    gm, kpm = case.tensors["global_mask"], case.tensors.get("key_padding_mask")
    counts = gm.sum(1)
    if not bool((counts == counts[:1]).all()):
        raise Unavailable("the rows have different numbers of global tokens (the feeder hands HF one count)")
    # (B, n) positions of each row's global tokens, in HF's order (row-major nonzero).
    gpos = gm.nonzero()[:, 1].view(B, -1)
    rows = torch.arange(B, device=case.device)[:, None]
    feed = {}
    # HF works in (S, B, E) and divides its query in place: the feeders hand over copies (as its Linear
    # layers would hand over fresh outputs), never views of the case's tensors.
    to_sbe = lambda t: t.transpose(0, 1).clone(memory_format=torch.contiguous_format).view(t.shape[1], B, E)
    layer.query, layer.key, layer.value = (_Feeder(lambda h, n=n: to_sbe(feed["x"][n])) for n in "qkv")
    layer.key_global = _Feeder(lambda h: to_sbe(feed["x"]["k"]))
    layer.value_global = _Feeder(lambda h: to_sbe(feed["x"]["v"]))
    layer.query_global = _Feeder(lambda h: to_sbe(feed["x"]["q"][rows, gpos]))
    hidden = torch.zeros(B, S, E, device=case.device, dtype=case.dtype)
    # LongformerModel's mask inside the layers: <0 padding, 0 local, >0 global (only the sign is read).
    mask = gm.to(case.dtype) if kpm is None else torch.where(kpm, gm.to(case.dtype), -1.0)
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
    kpm = t.get("key_padding_mask")
    real = torch.ones(B, S, device=case.device) if kpm is None else kpm.float()
    # The LongT5 stack hands the local module its blocked boolean mask (built once per model, not per layer)
    # and the TGlobal module the raw 2-D mask (DESIGN.md section 3).
    mask = real if tglobal else mod._get_local_attention_mask(real, layer.block_len, case.device)

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

# Positions of at most this many global tokens are written into Longformer's mask_mod as constants
# (``kv == p`` comparisons, no memory read); more fall back to a 1-D lookup table.
FLEX_MAX_UNROLLED_GLOBALS = 8
# kernel_options per op: torch's defaults for now. No setting has been measured to beat them on a GPU; a
# GPU run that finds one records it here, with the figure beside it.
FLEX_KERNEL_OPTIONS: dict[str, dict] = {}


def _flex_api():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention ({exc})") from exc
    return create_block_mask, flex_attention


def _same_for_every_row(t: torch.Tensor) -> bool:
    return bool((t == t[:1]).all())


def _flex_mods(case: Case):
    """(mask_mod, score_mod, batch_dependent) written as an expert would for this case.

    Index arithmetic wherever the pattern allows it: a captured tensor read inside ``mask_mod`` costs a
    gather per score in every partial block (on the H100 run, ``gm[b, kv] | gm[b, q]`` for one global token
    made Flex 14.6x slower forward than ``band | (kv == 0) | (q == 0)`` at S=16384). Bias tables are read
    by offset, as Flex's own relative-bias examples do.
    """
    S, (left, right), t = case.S, case.window, case.tensors

    def band(q, kv):
        return (kv >= q - left) & (kv <= q + right)

    if case.op == "longformer":
        gm = t["global_mask"]
        if not _same_for_every_row(gm):  # per-row globals: only a (B, S) lookup can say
            return (lambda b, h, q, kv: band(q, kv) | gm[b, kv] | gm[b, q]), None, True
        positions = [int(p) for p in gm[0].nonzero().flatten().tolist()]
        if len(positions) <= FLEX_MAX_UNROLLED_GLOBALS:
            def mask_mod(b, h, q, kv):
                keep = band(q, kv)
                for p in positions:  # unrolled at trace time: constants, no loads
                    keep = keep | (kv == p) | (q == p)
                return keep
        else:
            is_global = gm[0].contiguous()

            def mask_mod(b, h, q, kv):
                return band(q, kv) | is_global[kv] | is_global[q]
        return mask_mod, None, False

    rb, width = t["rel_bias"], left + right
    if case.op == "local":
        return (lambda b, h, q, kv: band(q, kv)), \
            (lambda s, b, h, q, kv: s + rb[h, (kv - q + left).clamp(0, width)]), False

    # TGlobal: the G side keys are appended after the S band keys (kv >= S is a side key).
    G, bs = case.num_blocks, case.block_size
    sb, qb, sm = t["side_bias"], t["query_block"], t["side_mask"]
    pos = torch.arange(S, device=case.device)
    arithmetic = bool(sm.all()) and bool((qb == torch.clamp(pos // bs, max=G - 1)[None]).all())
    if arithmetic:  # no padding (the standard shapes): every side key is attended, block = min(q // bs, G - 1)
        def mask_mod(b, h, q, kv):
            return (kv >= S) | band(q, kv)

        def query_block(b, q):
            return torch.clamp(q // bs, max=G - 1)
    else:
        def mask_mod(b, h, q, kv):
            return ((kv < S) & band(q, kv)) | ((kv >= S) & sm[b, (kv - S).clamp(0, G - 1)])

        def query_block(b, q):
            return qb[b, q]

    def score_mod(s, b, h, q, kv):
        # Both tables are read at clamped offsets (in range for every kv) and the right one kept.
        band_bias = rb[h, (kv - q + left).clamp(0, width)]
        side_bias = sb[h, (kv - S - query_block(b, q) + G).clamp(0, 2 * G)]
        return s + torch.where(kv < S, band_bias, side_bias)

    return mask_mod, score_mod, not arithmetic


def _make_flex(case: Case):
    create_block_mask, flex_attention = _flex_api()
    S, G = case.S, (case.num_blocks if case.op == "tglobal" else 0)
    mask_mod, score_mod, batch_dependent = _flex_mods(case)
    # Built once, outside the timing; shared over the batch (B=None) when the pattern does not depend on it,
    # and over the heads always. _compile=True builds it blockwise instead of materialising S x (S+G).
    block_mask = create_block_mask(mask_mod, B=case.B if batch_dependent else None, H=None, Q_LEN=S,
                                   KV_LEN=S + G, device=case.device, _compile=case.device.type == "cuda")
    # A fresh compile cache per case: each case's mods are new closures, and across the standard sweep
    # (3 ops x 3 lengths x 2 grad modes) they would pass dynamo's recompile limit (8), after which Flex
    # silently runs eagerly (materialising the scores) and the baseline would be timed at its worst.
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    options = FLEX_KERNEL_OPTIONS.get(case.op)
    on_cpu = case.device.type == "cpu"

    def forward(x):
        q, k, v = x["q"], x["k"], x["v"]
        if on_cpu and torch.is_grad_enabled() and q.requires_grad:
            raise Unavailable(f"FlexAttention has no CPU backward (torch {torch.__version__})")
        if G:  # one K/V holding band keys then side keys: Flex attends both in one softmax
            k, v = torch.cat([k, x["side_k"]], 1), torch.cat([v, x["side_v"]], 1)
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
                   block_mask=block_mask, scale=case.scale, kernel_options=options)
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
