"""``longattn bench --model modernbert|mistral|gemma3``: one Hugging Face model under each attention implementation.

The model is :func:`longattn.hf_models.build_hf_model`'s random base model (``--size base``: the real model's
attention shapes; ``tiny``: the test config), ``--layers`` deep, built once per sequence length and switched
between implementations with ``model.set_attn_implementation`` (same weights for every row). Rows:

- the stock implementations ``sdpa``, ``flex_attention``, ``eager`` (``--baseline``; ``all`` = these three);
- ``longattn:<backend>`` for each ``--backend``: ``attn_implementation="longattn"`` after
  ``longattn.register_hf_attention(backend=...)``.

What a ``longattn`` row times is stated, never assumed: one counting forward before the timings wraps the
registered function's fast path (``hf_attention.banded_attention``) and its delegation (``hf_attention.delegate``)
and records, per forward, how many attention calls ran on longattn's band op (``longattn_calls`` of
``attn_calls``) and why the others delegated (``delegated``). A row where no call ran on longattn is not timed
(it would time ``sdpa`` under the longattn label): it is listed with the delegation reason.

Grouped-query attention: Mistral-7B and Gemma-3 have fewer K/V heads than query heads; every row uses the
config's own ``num_key_value_heads`` (``--kv-heads`` overrides; longattn's ops take the grouped K/V as they are)
and prints it with the run's settings.

``--sliding-only`` sets ``layer_types = ["sliding_attention"] * layers`` (the sliding layers alone); by default
the family's own pattern applies (ModernBERT: a global layer every third; Gemma 3: every sixth).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

FAMILIES = ("modernbert", "mistral", "gemma3")
STOCK_IMPLS = ("sdpa", "flex_attention", "eager")
# The family's window field in the HF config (--window sets it): ModernBERT's full window, the others' keys per query.
WINDOW_FIELD = {"modernbert": "local_attention", "mistral": "sliding_window", "gemma3": "sliding_window"}
DEFAULT_LAYERS = {"modernbert": 3, "mistral": 2, "gemma3": 2}  # ModernBERT: one global and two sliding layers


def config_overrides(settings: dict, S: int | None = None) -> dict:
    """The ``build_hf_model`` overrides of this run: depth, K/V heads, window, shapes, layer pattern (and room for
    ``S`` positions)."""
    from ..hf_models import build_hf_config

    family, layers = settings["model"], settings["layers"]
    out = {"num_hidden_layers": layers}
    if settings.get("heads"):
        out["num_attention_heads"] = settings["heads"]
    if settings.get("head_dim") and family != "modernbert":  # ModernBERT derives it from hidden_size / heads
        out["head_dim"] = settings["head_dim"]
    if settings.get("d_model"):
        out["hidden_size"] = settings["d_model"]
    if settings.get("window"):
        out[WINDOW_FIELD[family]] = settings["window"]
    if settings.get("sliding_only"):
        out["layer_types"] = ["sliding_attention"] * layers
    config = build_hf_config(family, size=settings["size"], **out)
    if family != "modernbert":
        out["num_key_value_heads"] = settings.get("kv_heads") or config.num_key_value_heads
    if S is not None:
        out["max_position_embeddings"] = max(S, config.max_position_embeddings)
    return out


def describe(settings: dict) -> str:
    """The run's model settings, printed before the table: sizes, layer pattern, windows, K/V heads."""
    from ..hf_models import build_hf_config

    family = settings["model"]
    config = build_hf_config(family, size=settings["size"], **config_overrides(settings))
    heads = config.num_attention_heads
    kinds = list(getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers)
    sliding = kinds.count("sliding_attention")
    if family == "modernbert":
        half = config.local_attention // 2
        window = f"local_attention={config.local_attention} (longattn window ({half}, {half}))"
        kv = "K/V heads: as many as query heads (ModernBERT has no grouped-query attention)"
    else:
        w = config.sliding_window
        window = f"sliding_window={w} (longattn window ({w - 1}, 0), causal)"
        real = build_hf_config(family, size=settings["size"]).num_key_value_heads
        kv = (f"K/V heads: num_key_value_heads={config.num_key_value_heads} of {heads} query heads (the "
              f"{settings['size']} config has {real}; --kv-heads to override)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (f"model: {family} ({settings['size']} config, random weights), {config.num_hidden_layers} layers "
            f"({sliding} sliding, {len(kinds) - sliding} global), hidden {config.hidden_size}, {heads} heads of "
            f"{head_dim}, {window}\n{kv}")


@contextlib.contextmanager
def count_longattn_calls():
    """Count the registered ``"longattn"`` function's fast-path calls and its delegations (by reason).

    Yields ``{"longattn": int, "delegated": {reason: int}}``; the one-time delegation warnings are silenced
    inside (the counts carry the reasons)."""
    from .. import hf_attention as hfa

    counts = {"longattn": 0, "delegated": {}}
    banded, delegate = hfa.banded_attention, hfa.delegate

    def counted_banded(*args, **kwargs):
        counts["longattn"] += 1
        return banded(*args, **kwargs)

    def counted_delegate(reason, *args, **kwargs):
        counts["delegated"][reason] = counts["delegated"].get(reason, 0) + 1
        return delegate(reason, *args, **kwargs)

    hfa.banded_attention, hfa.delegate = counted_banded, counted_delegate
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield counts
    finally:
        hfa.banded_attention, hfa.delegate = banded, delegate


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:  # Linux's estimate of what can be allocated without swapping (free memory plus reclaimable caches)
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def eager_bytes(config, batch: int, S: int, dtype: torch.dtype, which: str) -> int:
    """What ``eager`` holds of S x S tensors at its peak: per layer the scores, the masked scores, the fp32
    softmax and its cast (fwd: one layer's worth at a time; fwd+bwd: the softmax output and its cast are
    saved by every layer), plus the shared additive mask."""
    e = torch.finfo(dtype).bits // 8
    per_head = batch * config.num_attention_heads * S * S
    layers = config.num_hidden_layers if which == "fwdbwd" else 1
    return per_head * ((4 + e) * layers + 2 * e) + batch * S * S * e


class HFModelBench:
    """The rows, model and calls of ``--model modernbert|mistral|gemma3`` (the interface of ``model.PatchedBench``)."""

    def __init__(self, settings: dict, shape):
        import longattn

        self.settings, self.shape, self.family = settings, shape, settings["model"]
        self.device = torch.device(shape.device)
        self.baselines = [b for b in settings["baselines"] if b in STOCK_IMPLS]
        self.rows = self.baselines + [f"longattn:{b}" for b in settings["backends"]]
        self.available = longattn.available_backends(self.device)

    def build(self, S: int):
        """(model, call, hidden size): the sdpa model and ``call(model, embeds) -> last hidden state``."""
        from ..hf_models import build_hf_model

        model = build_hf_model(self.family, size=self.settings["size"], attn_implementation="sdpa",
                               dtype=self.shape.dtype, device=self.device, **config_overrides(self.settings, S))
        mask = torch.ones(self.shape.batch, S, dtype=torch.long, device=self.device)
        extra = {} if self.family == "modernbert" else {"use_cache": False}

        def call(m, embeds):
            return m(inputs_embeds=embeds, attention_mask=mask, **extra).last_hidden_state

        return model, call, model.config.hidden_size

    def prepare(self, row: str, stock, call, embeds) -> tuple[object, str | None, dict]:
        """(model, reason it cannot run or None, fields for the row's records)."""
        import longattn

        impl, _, backend = row.partition(":")  # "sdpa" -> ("sdpa", ""); "longattn:torch" -> ("longattn", "torch")
        if backend:
            if self.available.get(backend):
                return stock, "; ".join(self.available[backend]), {}
            longattn.register_hf_attention(backend=backend)
        try:
            stock.set_attn_implementation(impl)
        except Exception as exc:
            from .runner import _reason

            return stock, f"set_attn_implementation({impl!r}) failed: {_reason(exc)}", {}
        if not backend:
            return stock, None, {}
        try:
            with count_longattn_calls() as counts, torch.no_grad():
                call(stock, embeds)
        except longattn.BackendUnavailableError as exc:  # e.g. backend "cuda" with grouped-query K/V
            return stock, str(exc), {}
        delegated = "; ".join(f"{n}x {reason}" for reason, n in counts["delegated"].items())
        fields = {"attn_calls": counts["longattn"] + sum(counts["delegated"].values()),
                  "longattn_calls": counts["longattn"], "delegated": delegated}
        if counts["longattn"] == 0:
            return stock, f"no attention call ran on longattn (every layer delegated: {delegated})", fields
        return stock, None, fields

    def pass_blocker(self, row: str, which: str, S: int, model) -> str | None:
        """Why ``row`` cannot run pass ``which`` at ``S`` (a reason), or None; checked before any timing."""
        if row == "flex_attention" and which == "fwdbwd" and self.device.type == "cpu":
            return "FlexAttention has no backward on CPU (torch raises NotImplementedError)"
        if row == "eager":
            need, avail = eager_bytes(model.config, self.shape.batch, S, self.shape.dtype, which), \
                _available_bytes(self.device)
            if avail is not None and need > avail:
                return (f"eager would hold ~{need / 2**30:.1f} GiB of S x S attention weights, "
                        f"{avail / 2**30:.1f} GiB available")
        return None


def longattn_notes(records: list[dict]) -> list[str]:
    """One line per longattn row and S: how many attention calls per forward ran on longattn's band op."""
    lines, seen = [], set()
    for r in records:
        key = (r["impl"], r["S"])
        if "longattn_calls" not in r or key in seen:
            continue
        seen.add(key)
        line = (f"  {r['impl']:<17}S={r['S']}: {r['longattn_calls']} of {r['attn_calls']} attention calls per "
                "forward ran on longattn")
        lines.append(line + (f"; delegated: {r['delegated']}" if r.get("delegated") else ""))
    return ["ran on longattn (counted in one forward before the timings):", *lines] if lines else []
