"""``longattn bench --model``: a stack of Hugging Face layers, stock vs longattn, end to end.

The loop (``run_model``) is shared; what differs per model is a *bench*: its rows, its model and its calls.
``PatchedBench`` (below) patches LED / LongT5 modules; ``hf_model.HFModelBench`` switches ModernBERT / Mistral /
Gemma 3 between attention implementations (``sdpa``, ``flex_attention``, ``eager``, ``longattn``; see there).

Patched models (random weights, no dropout, a tiny vocabulary since inputs go in as embeddings):

- ``led``:            ``LEDModel``'s encoder, ``attention_window = 2 * window`` (default window 256) and
                      ``--globals`` global tokens (default 1, the first token);
- ``longt5-local``:   ``LongT5EncoderModel`` with ``encoder_attention_type="local"``, ``local_radius=window``
                      (default 127);
- ``longt5-tglobal``: the same with ``"transient-global"`` and ``global_block_size=--block-size``.

Size: ``--layers`` (default 2), ``--d-model`` (default heads x head-dim), ``--heads``, FFN 4 x d_model.
Rows: ``stock`` (HF's own attention) and ``patched:<backend>`` (a deep copy through
``longattn.apply_longattn(model, backend=...)``) for each requested backend; a patch that raises (e.g. before
the patchers land) is listed with the exception instead of a number. Passes: ``fwd`` (no grad) and
``fwdbwd`` (loss gradient into every weight and the input embeddings); memory as in ``timing``. A row or pass
that cannot run (``pass_blocker``) is listed with the reason; one that raises, with the exception.
"""

from __future__ import annotations

import copy
import sys

import torch

from . import timing
from .cases import DEFAULT_WINDOW, Settings, global_positions, padding_mask
from .runner import _reason

MODEL_WINDOW = {"led": DEFAULT_WINDOW["longformer"], "longt5-local": DEFAULT_WINDOW["local"],
                "longt5-tglobal": DEFAULT_WINDOW["tglobal"]}


def build_model(kind: str, S: int, shape: Settings, layers: int, d_model: int | None, lengths=None):
    """(model, call, E): the stock model and ``call(model, embeds) -> last hidden state``.

    ``lengths``: a right-padded ragged batch (``ragged``): row b holds ``lengths[b] <= S`` real tokens (its
    attention mask), ``B = len(lengths)``; default ``shape.batch`` rows of S real tokens. LED's global tokens are
    placed in each row's real tokens (``global_positions(lengths[b], globals)``)."""
    E = d_model or shape.heads * shape.head_dim
    w = MODEL_WINDOW[kind] if shape.window is None else shape.window
    device = torch.device(shape.device)
    lengths = [S] * shape.batch if lengths is None else list(lengths)
    mask = padding_mask(lengths, S, device).long()
    if kind == "led":
        from transformers import LEDConfig, LEDModel

        config = LEDConfig(vocab_size=128, d_model=E, encoder_layers=layers, decoder_layers=1,
                           encoder_attention_heads=shape.heads, decoder_attention_heads=shape.heads,
                           encoder_ffn_dim=4 * E, decoder_ffn_dim=4 * E, attention_window=2 * w,
                           max_encoder_position_embeddings=S, max_decoder_position_embeddings=16, dropout=0.0,
                           attention_dropout=0.0, activation_dropout=0.0)
        model = LEDModel(config)
        glob = torch.zeros(len(lengths), S, dtype=torch.long)
        for b, length in enumerate(lengths):
            glob[b, global_positions(length, shape.globals)] = 1
        glob = glob.to(device)

        def call(m, embeds):
            return m.get_encoder()(inputs_embeds=embeds, attention_mask=mask, global_attention_mask=glob)[0]
    else:
        from transformers import LongT5Config, LongT5EncoderModel

        config = LongT5Config(vocab_size=128, d_model=E, d_kv=E // shape.heads, num_heads=shape.heads,
                              num_layers=layers, d_ff=4 * E, local_radius=w, global_block_size=shape.block_size,
                              dropout_rate=0.0, encoder_attention_type="local" if kind == "longt5-local"
                              else "transient-global")
        model = LongT5EncoderModel(config)

        def call(m, embeds):
            return m(inputs_embeds=embeds, attention_mask=mask)[0]
    return model.to(device=device, dtype=shape.dtype).eval(), call, E


class PatchedBench:
    """The rows, model and calls of ``--model led|longt5-*``: ``stock`` and ``patched:<backend>`` (a deep copy
    through ``longattn.apply_longattn``). ``hf_model.HFModelBench`` has the same interface.

    ``lengths`` (``ragged``): the batch is right-padded to ``S = max(lengths)`` (see ``build_model``) and the rows
    also hold ``packed:<backend>``, ``apply_longattn(model, packed=True)``."""

    def __init__(self, settings: dict, shape: Settings, lengths=None):
        import longattn

        self.settings, self.shape, self.lengths = settings, shape, lengths
        self.baselines = ["stock"]
        kinds = ("patched", "packed") if lengths else ("patched",)
        self.rows = ["stock"] + [f"{kind}:{b}" for kind in kinds for b in settings["backends"]]
        self.available = longattn.available_backends(torch.device(shape.device))

    def build(self, S: int):
        return build_model(self.settings["model"], S, self.shape, self.settings["layers"], self.settings["d_model"],
                           lengths=self.lengths)

    def prepare(self, row: str, stock, call, embeds) -> tuple[object, str | None, dict]:
        """(model, reason it cannot run or None, fields for the row's records)."""
        import longattn

        if row == "stock":
            return stock, None, {}
        kind, backend = row.split(":", 1)
        if self.available.get(backend):
            return stock, "; ".join(self.available[backend]), {}
        try:
            model = copy.deepcopy(stock)
            longattn.apply_longattn(model, backend=backend, packed=kind == "packed")
        except Exception as exc:
            return stock, f"apply_longattn failed: {_reason(exc)}", {}
        return model, None, {}

    def pass_blocker(self, row: str, which: str, S: int, model) -> str | None:
        return None


def model_bench(settings: dict, shape: Settings):
    """The bench of ``settings["model"]``: ``PatchedBench`` (LED, LongT5) or ``hf_model.HFModelBench``."""
    from .hf_model import FAMILIES, HFModelBench

    return (HFModelBench if settings["model"] in FAMILIES else PatchedBench)(settings, shape)


def run_model(settings: dict, shape: Settings, progress: bool = True, bench=None) -> list[dict]:
    """Time every row's model at every sequence length; records like the ops sweep's. ``bench``: default
    ``model_bench(settings, shape)`` (``ragged`` passes its own)."""
    from tqdm import tqdm

    kind, device = settings["model"], torch.device(shape.device)
    bench = bench or model_bench(settings, shape)
    rows = bench.rows
    passes = [p for p in settings["passes"] if p in ("fwd", "fwdbwd")] or ["fwd", "fwdbwd"]
    records = []
    bar = tqdm(total=len(settings["seqlens"]) * len(rows), file=sys.stderr, disable=not progress,
               desc=f"longattn bench --model {kind}", unit="model")
    for S in settings["seqlens"]:
        try:
            stock, call, E = bench.build(S)
        except Exception as exc:
            records += [{"op": f"model:{kind}", "S": S, "impl": r, "kind": "model", "pass": p, "status": "error",
                         "reason": _reason(exc)} for r in rows for p in passes]
            bar.update(len(rows))
            continue
        embeds = torch.randn(shape.batch, S, E, generator=torch.Generator().manual_seed(S)).to(device, shape.dtype)
        for row in rows:
            bar.set_postfix_str(f"S={S} {row}")
            model, reason, fields = bench.prepare(row, stock, call, embeds)
            base = {"op": f"model:{kind}", "S": S, "impl": row, "kind": "model", "layers": settings["layers"],
                    "d_model": E, **fields}
            for which in passes:
                rec = {**base, "pass": which}
                blocked = reason or bench.pass_blocker(row, which, S, model)
                if blocked:
                    rec.update(status="unavailable", reason=blocked)
                else:
                    rec.update(_time_model(model, call, embeds, which, device, settings["min_run_time"]))
                records.append(rec)
            del model
            bar.update(1)
        del stock
    bar.close()
    _add_speedups(records, bench.baselines)
    return records


def _time_model(model, call, embeds, which, device, min_run_time) -> dict:
    try:
        if which == "fwd":
            def fn():
                with torch.no_grad():
                    return call(model, embeds)
        else:
            x = embeds.detach().requires_grad_(True)
            dout = torch.randn_like(embeds)

            def fn():
                model.zero_grad(set_to_none=True)  # no accumulation into the previous call's grads
                call(model, x).backward(dout)
        t = timing.time_call(fn, device, min_run_time=min_run_time, warmup=1, memory=True, host_overhead=True)
        return {"status": "ok", **t.fields()}
    except Exception as exc:
        if device.type == "cuda":  # e.g. out of memory: give the cached blocks back before the next row
            torch.cuda.empty_cache()
        return {"status": "error", "reason": _reason(exc)}


def _add_speedups(records: list[dict], baselines) -> None:
    """``vs_best_baseline`` here = the fastest baseline row's time / this time (LED, LongT5: the stock model;
    the HF families: the fastest of the stock attention implementations timed)."""
    best: dict = {}
    for r in records:
        key = (r["S"], r["pass"])
        if r["impl"] in baselines and r["status"] == "ok" and r["time_ms"] < best.get(key, (None, float("inf")))[1]:
            best[key] = (r["impl"], r["time_ms"])
    for r in records:
        if r["status"] == "ok" and (r["S"], r["pass"]) in best:
            r["best_baseline"], t = best[(r["S"], r["pass"])]
            r["vs_best_baseline"] = t / r["time_ms"]
