"""``longattn bench --ragged L1,L2,...``: a ragged batch run padded, packed, one sequence at a time, and by stock HF.

The batch: ``B = len(lengths)`` sequences, right-padded to ``S = max(lengths)``; ``T = sum(lengths)`` real tokens.

Ops mode (``--op``): for each op and each longattn backend, rows

- ``padded:<backend>``      the padded op on the ``(B, S)`` batch with its key padding mask (what a padded model runs:
                            every padded position costs as much as a real one);
- ``packed:<backend>``      the ``*_varlen`` op (``longattn.varlen_api``) on the ``T`` packed real tokens;
- ``one-by-one:<backend>``  the padded op on each sequence alone (``B = 1``, ``S = L_b``, no padding), one after the
                            other: what the real tokens cost, the reference the packed op should match;
- ``hf``                    the stock Hugging Face module on the padded batch with its masks (``impls``' ``hf``
                            baseline; ``--baseline none`` drops it).

Every row reads the same numbers: a sequence's tensors are slices of the padded batch's, the packed tensors their
concatenation (``build_ragged``). Ratios, on the packed rows, from this run's times of the same op, backend and pass:
``packed / one-by-one`` (issue 14's target: <= 1.15x, fwd+bwd), ``padded / packed`` (target: >= 1.8x) and
``hf / packed``. TFLOP/s counts the real tokens' useful FLOPs (``flops``, summed over the sequences) for every row,
so a row that computes padding shows a lower rate.

``--check``: every row's real-token outputs against the float64 oracle of each sequence alone (``oracle``; the
issue's definition of a packed op), and on the packed rows ``check_vs_padded``, the largest difference from the
same backend's padded output on the real tokens.

Model mode (``--model led|longt5-local|longt5-tglobal``): ``model.run_model`` with ``model.PatchedBench(lengths)``:
``stock`` (HF's layers), ``patched:<backend>`` (``apply_longattn``) and ``packed:<backend>``
(``apply_longattn(packed=True)``) on the ragged batch; ratio ``patched / packed`` and ``stock / packed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys

import torch

from . import flops, impls, oracle, output
from .cases import (
    NUM_BUCKETS,
    Case,
    Settings,
    build_case,
    global_positions,
    leaves,
    padding_mask,
    t5_relative_bucket,
)
from .runner import _reason, time_passes

VARIANTS = ("padded", "packed", "one-by-one")
RAGGED_BASELINES = ("hf",)  # the others (flex, sdpa_*) are built for unpadded batches
RATIOS = {  # record field: (numerator row kind, denominator row kind, column title)
    "packed_vs_one_by_one": ("packed", "one-by-one", "packed/1-by-1"),
    "padded_vs_packed": ("padded", "packed", "padded/packed"),
    "hf_vs_packed": ("hf", "packed", "hf/packed"),
}
TARGETS = "issue 14's targets (GPU, fwd+bwd): packed/1-by-1 <= 1.15x, padded/packed >= 1.8x"
CSV_FIELDS = ("mode", "op", "lengths", "B", "S", "T", "impl", "kind", "backend", "pass", "status", "time_ms", "tflops",
              "peak_mem_bytes", *RATIOS, "fwd_flops", "runs", "call_wall_ms", "gpu_ms", "host_overhead_ms", "check",
              "check_max_err", "check_vs_padded", "layers", "d_model", "packed_layers", "reason")


# --- inputs -----------------------------------------------------------------------------------------------

PER_TOKEN = ("q", "k", "v", "x", "global_mask")  # a case's (B, S, ...) tensors: sliced per sequence, then packed
SHARED = ("rel_bias", "bucket_emb", "side_bucket_emb", "weight")  # the same in every layout

@dataclasses.dataclass
class RaggedCase:
    """One op's inputs in the three layouts (same numbers).

    ``padded``: a ``Case`` of ``(B, S, ...)`` tensors with ``key_padding_mask (B, S)`` (aggregate: its block ids
    mark padding -1). ``sequences``: one unpadded ``Case`` per sequence (``B = 1``, ``S = L_b``). ``packed``: a
    ``Case`` whose tensors are in the packed layout, ``(T, ...)`` (``B = 1``, ``S = T``), with ``cu_seqlens`` and,
    for the LongT5 ops, ``cu_blocks`` and the concatenated side keys ``(G, H, D)``, ``G = T // block_size``.
    """

    lengths: list[int]
    padded: Case
    sequences: list[Case]
    packed: Case

    @property
    def op(self) -> str:
        return self.padded.op

    def real(self, out: torch.Tensor) -> torch.Tensor:
        """A padded output ``(B, S|G, ...)`` -> its real rows ``(1, T|sum G_b, ...)`` (blocks for aggregate)."""
        return torch.cat([out[b:b + 1, :self._rows(s)] for b, s in enumerate(self.sequences)], 1)

    def real_packed(self, out: torch.Tensor) -> torch.Tensor:
        """A packed output ``(T|G, ...)`` -> ``(1, T|sum G_b, ...)`` (aggregate: the existing blocks come first)."""
        return out[None, :sum(self._rows(s) for s in self.sequences)]

    def _rows(self, seq: Case) -> int:
        return seq.num_blocks if self.op == "aggregate" else seq.S


def build_ragged(op: str, lengths, settings: Settings) -> RaggedCase:
    """The inputs of ``op`` on the ragged batch ``lengths`` (``settings.batch`` is ignored: B = len(lengths))."""
    from ..api import tglobal_block_ids

    B, S = len(lengths), max(lengths)
    padded = build_case(op, S, dataclasses.replace(settings, batch=B))
    t, device = padded.tensors, padded.device
    real = padding_mask(lengths, S, device)
    if op == "aggregate":
        t["block_ids"] = tglobal_block_ids(real, settings.block_size)[0]
    else:
        t["key_padding_mask"] = real
    if op == "longformer":  # each row's global tokens among its own real tokens
        gm = torch.zeros(B, S, dtype=torch.bool)
        for b, length in enumerate(lengths):
            gm[b, global_positions(length, settings.globals)] = True
        t["global_mask"] = gm.to(device)
        t.pop("global_pos")
        padded.globals = int(gm.sum(1).max())  # the padded op's max_globals: per row
    if op == "tglobal":
        t["query_block"], t["side_mask"] = tglobal_block_ids(real, settings.block_size)
    sequences = [_sequence_case(padded, b, length) for b, length in enumerate(lengths)]
    return RaggedCase(list(lengths), padded, sequences, _packed_case(padded, sequences))


def _sequence_case(padded: Case, b: int, length: int) -> Case:
    """Sequence ``b`` of the padded case alone: its rows ``[:length]``, no padding."""
    from ..api import tglobal_block_ids

    t = padded.tensors
    seq = dataclasses.replace(padded, B=1, S=length, tensors={})
    s = seq.tensors
    for name in PER_TOKEN:
        if name in t:
            s[name] = t[name][b:b + 1, :length].contiguous()
    s.update({name: t[name] for name in SHARED if name in t})
    if padded.op == "longformer":
        seq.globals = int(s["global_mask"].sum())
    if padded.op in ("tglobal", "aggregate"):
        ids, block_mask = tglobal_block_ids(torch.ones(1, length, dtype=torch.bool, device=padded.device),
                                            padded.block_size)
        G, G_b = padded.num_blocks, length // padded.block_size
        seq.num_blocks = G_b
        if padded.op == "aggregate":
            s["block_ids"] = ids
        else:  # its blocks are the padded row's first G_b; bias tables are indexed by offset (+G)
            s["query_block"], s["side_mask"] = ids, block_mask
            s["side_k"], s["side_v"] = (t[n][b:b + 1, :G_b].contiguous() for n in ("side_k", "side_v"))
            s["side_bias"] = t["side_bias"][:, G - G_b:G + G_b + 1].contiguous()
    return seq


def _packed_case(padded: Case, sequences: list[Case]) -> Case:
    """The sequences' tensors concatenated in the packed layout (see ``RaggedCase``)."""
    from ..varlen import cu_from_seqlens
    from ..varlen_api import tglobal_block_ids_varlen

    T, device, op = sum(s.S for s in sequences), padded.device, padded.op
    packed = dataclasses.replace(padded, B=1, S=T, tensors={})
    p, t = packed.tensors, padded.tensors
    cat = lambda name: torch.cat([s.tensors[name][0] for s in sequences])  # noqa: E731
    p.update({name: cat(name) for name in PER_TOKEN if name in t})
    p.update({name: t[name] for name in SHARED if name in t})
    p["cu_seqlens"] = cu_from_seqlens([s.S for s in sequences]).to(device)
    if op == "longformer":
        packed.globals = int(p["global_mask"].sum())  # the packed op's max_globals: the whole batch
    if op in ("tglobal", "aggregate"):
        ids, block_mask, p["cu_blocks"] = tglobal_block_ids_varlen(p["cu_seqlens"], T, padded.block_size)
        G = packed.num_blocks = T // padded.block_size
        if op == "aggregate":
            p["block_ids"] = ids
        else:  # sequence b's side keys are rows cu_blocks[b]:cu_blocks[b + 1]; rows past them are never attended
            p["query_block"], p["side_mask"] = ids, block_mask
            for name in ("side_k", "side_v"):
                x = cat(name)
                p[name] = torch.cat([x, x.new_zeros(G - x.shape[0], *x.shape[1:])])
            p["side_bias"] = p["side_bucket_emb"][t5_relative_bucket(torch.arange(-G, G + 1, device=device),
                                                                     NUM_BUCKETS)].T.contiguous()
    return packed


# --- implementations --------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Group:
    """Several cases' inputs as one (keys ``"<name>@<i>"``), so ``runner``'s passes time them one after another."""

    cases: list[Case]

    @property
    def tensors(self) -> dict:
        return {f"{n}@{i}": v for i, c in enumerate(self.cases) for n, v in c.tensors.items()}

    @property
    def grad_names(self) -> tuple[str, ...]:
        return tuple(f"{n}@{i}" for i, c in enumerate(self.cases) for n in c.grad_names)


def _make_one_by_one(backend: str, cases: list[Case]):
    """``forward(inputs) -> [out_b]``: the padded op of ``backend`` on each sequence, in order."""
    calls = [(impls.make(f"longattn:{backend}", c, grad=True), [(f"{n}@{i}", n) for n in c.tensors])
             for i, c in enumerate(cases)]
    return lambda x: [f({n: x[key] for key, n in names}) for f, names in calls]


def _make_packed(backend: str, case: Case, max_seqlen: int):
    """``forward(inputs) -> (T|G, ...)``: the ``*_varlen`` op of ``backend`` on the packed case."""
    from .. import varlen_api as va

    impls.require_backend(backend, case, ("ranges",) if case.op != "aggregate" else ())
    t, window, cu = case.tensors, case.window, case.tensors["cu_seqlens"]
    if case.op == "local":
        return lambda x: va.local_attention_varlen(x["q"], x["k"], x["v"], cu, max_seqlen, window,
                                                   rel_bias=x["rel_bias"], scale=case.scale, backend=backend)
    if case.op == "longformer":  # max_globals given (no host sync timed), as in impls
        return lambda x: va.longformer_attention_varlen(x["q"], x["k"], x["v"], cu, max_seqlen, window,
                                                        x["global_mask"], max_globals=case.globals, backend=backend)
    if case.op == "tglobal":
        return lambda x: va.tglobal_attention_varlen(x["q"], x["k"], x["v"], x["side_k"], x["side_v"], cu, max_seqlen,
                                                     window, x["query_block"], t["cu_blocks"],
                                                     side_mask=x["side_mask"], rel_bias=x["rel_bias"],
                                                     side_bias=x["side_bias"], scale=case.scale, backend=backend)
    return lambda x: va.block_aggregate_varlen(x["x"], x["block_ids"], case.num_blocks, weight=t["weight"],
                                               backend=backend)


def _implementations(rc: RaggedCase, backends, baselines):
    """``(impl name, row kind, backend, inputs case, real-token extractor, make forward)`` of every row."""
    max_seqlen = max(rc.lengths)
    padded_real = lambda out: rc.real(out)  # noqa: E731
    for backend in backends:
        yield (f"padded:{backend}", "padded", backend, rc.padded, padded_real,
               lambda b=backend: impls.make(f"longattn:{b}", rc.padded, grad=True))
        yield (f"packed:{backend}", "packed", backend, rc.packed, rc.real_packed,
               lambda b=backend: _make_packed(b, rc.packed, max_seqlen))
        yield (f"one-by-one:{backend}", "one-by-one", backend, _Group(rc.sequences),
               lambda outs: torch.cat(outs, 1), lambda b=backend: _make_one_by_one(b, rc.sequences))
    for name in baselines:
        yield name, name, None, rc.padded, padded_real, lambda n=name: impls.make(n, rc.padded, grad=True)


# --- the sweep --------------------------------------------------------------------------------------------

def run_ragged_ops(settings: dict, shape: Settings, progress: bool = True, checkpoint=None) -> list[dict]:
    """Time every row of every op of ``settings["ops"]`` on the ragged batch ``settings["ragged"]``.

    ``settings["rounds"]`` (default 1): an op's rows are timed that many times round-robin (each row once per
    round) and each record keeps its median round (``round_times_ms`` lists them all): on a shared machine whose
    load drifts, the rows compared then see the same conditions. ``checkpoint(records)`` after each timing."""
    from tqdm import tqdm

    lengths, device, rounds = settings["ragged"], torch.device(shape.device), settings.get("rounds") or 1
    baselines = [b for b in settings["baselines"] if b in RAGGED_BASELINES]
    rows_per_op = len(VARIANTS) * len(settings["backends"]) + len(baselines)
    bar = tqdm(total=len(settings["ops"]) * rows_per_op * rounds, file=sys.stderr, disable=not progress,
               desc="longattn bench --ragged", unit="impl")
    records = []
    for op in settings["ops"]:
        rc = build_ragged(op, lengths, shape)
        base = _base_fields(rc)
        reference, ref_reason = (_oracle(rc) if settings["check"] else (None, None))
        padded_out = {}  # backend -> the padded op's real-token output (check_vs_padded)
        prepared = []  # (row fields, forward, inputs case) of the rows that can run
        for name, kind, backend, case, real, make in _implementations(rc, settings["backends"], baselines):
            row = {**base, "impl": name, "kind": kind, "backend": backend}
            try:
                forward = make()
            except Exception as exc:
                status = "unavailable" if isinstance(exc, impls.Unavailable) else "error"
                records += [{**row, "pass": p, "status": status, "reason": _reason(exc)} for p in settings["passes"]]
                bar.update(rounds)
                continue
            if settings["check"]:
                row.update(_check(rc, case, forward, real, reference, ref_reason, kind, padded_out, backend))
            prepared.append((row, forward, case))
        timed = [[] for _ in prepared]  # per row, per round: its records (one per pass)
        for _ in range(rounds):
            for i, (row, forward, case) in enumerate(prepared):
                bar.set_postfix_str(f"{op} {row['impl']}")
                timed[i].append(time_passes(forward, case, row, settings["passes"], device, settings["min_run_time"]))
                bar.update(1)
                if checkpoint is not None:
                    checkpoint(_with_ratios(records + _medians(timed)))
        records = _with_ratios(records + _medians(timed))
        del rc, reference, padded_out, prepared
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return records


def _medians(timed: list[list[list[dict]]]) -> list[dict]:
    """Per row and pass, the record of its median round (the first failed one if a round failed)."""
    out = []
    for per_round in filter(None, timed):
        for recs in zip(*per_round):
            failed = [r for r in recs if r["status"] != "ok"]
            if failed or len(recs) == 1:
                out.append((failed or recs)[0])
                continue
            times = [r["time_ms"] for r in recs]
            median = statistics.median_low(times)
            out.append({**recs[times.index(median)], "round_times_ms": times})
    return out


def _with_ratios(records: list[dict]) -> list[dict]:
    add_ratios(records)
    return records


def _base_fields(rc: RaggedCase) -> dict:
    """The fields every record of this op shares: the batch and the real tokens' useful forward FLOPs."""
    fwd = [flops.attention_flops(s) for s in rc.sequences]
    return {"mode": "ragged", "op": rc.op, "lengths": rc.lengths, "B": len(rc.lengths), "S": rc.padded.S,
            "T": rc.packed.S, "fwd_flops": None if None in fwd else sum(fwd)}


def _oracle(rc: RaggedCase):
    """(the float64 oracle of each sequence alone, concatenated ``(1, T|sum G_b, ...)``, None) or (None, why)."""
    try:
        return torch.cat([oracle.oracle_output(s) for s in rc.sequences], 1), None
    except Exception as exc:
        return None, _reason(exc)


def _check(rc, case, forward, real, reference, ref_reason, kind, padded_out, backend) -> dict:
    """``check`` / ``check_max_err`` against the per-sequence oracle; ``check_vs_padded`` on packed rows."""
    try:
        with torch.no_grad():
            out = real(forward(leaves(case, requires_grad=False)))
    except Exception as exc:
        return {"check": f"error ({_reason(exc)})"}
    fields = {}
    if kind == "padded":
        padded_out[backend] = out
    elif kind == "packed" and backend in padded_out:
        fields["check_vs_padded"] = (out.double() - padded_out[backend].double()).abs().max().item()
    if reference is None:
        return {**fields, "check": f"n/a ({ref_reason})"}
    err = oracle.max_error(rc.padded, out, reference)
    return {**fields, "check": "ok" if oracle.within_bound(rc.padded, err) else "FAIL", "check_max_err": err}


def add_ratios(records: list[dict]) -> None:
    """``RATIOS`` on the packed rows: times of the same op, pass and backend (``hf``: the op's HF row)."""
    times = {}
    for r in records:
        if r["status"] == "ok":
            times[(r["op"], r["pass"], r["kind"], r.get("backend"))] = r["time_ms"]
    for r in records:
        if r["status"] != "ok" or r["kind"] != "packed":
            continue
        for field, (num, den, _) in RATIOS.items():
            a, b = ((r["op"], r["pass"], kind, None if kind == "hf" else r["backend"]) for kind in (num, den))
            if a in times and b in times:
                r[field] = times[a] / times[b]


# --- model mode -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def count_packed_layers():
    """Count the attention layers that run packed (``{"layers": n}``): each one scatters its packed result back
    through ``PackedLayout.unpack`` once (``longattn.models._packing``), wrapped for the duration."""
    from ..models._packing import PackedLayout

    counts, unpack = {"layers": 0}, PackedLayout.unpack

    def counted(self, x):
        counts["layers"] += 1
        return unpack(self, x)

    PackedLayout.unpack = counted
    try:
        yield counts
    finally:
        PackedLayout.unpack = unpack


class RaggedModelBench:
    """``model.PatchedBench`` on the ragged batch (rows ``stock``, ``patched:<b>``, ``packed:<b>``); a packed row
    first runs one counted forward: ``packed_layers`` (layers that ran packed, of ``layers``) is recorded, and a
    row where no layer ran packed (every one fell back to the padded patch) is not timed, with the reason."""

    def __init__(self, settings: dict, shape: Settings, lengths):
        from .model import PatchedBench

        self.inner = PatchedBench(settings, shape, lengths=lengths)
        self.unpadded = len(set(lengths)) == 1  # apply_longattn(packed=True) then runs padded: nothing to gain
        self.rows, self.baselines = self.inner.rows, self.inner.baselines
        self.build, self.pass_blocker = self.inner.build, self.inner.pass_blocker

    def prepare(self, row: str, stock, call, embeds):
        model, reason, fields = self.inner.prepare(row, stock, call, embeds)
        if reason or not row.startswith("packed:"):
            return model, reason, fields
        try:
            with count_packed_layers() as counts, torch.no_grad():
                call(model, embeds)
        except Exception as exc:
            return model, f"the packed forward failed: {_reason(exc)}", fields
        fields = {**fields, "packed_layers": counts["layers"]}
        if not counts["layers"]:
            why = "; the batch has no padding" if self.unpadded else ""
            return model, f"no layer ran packed (every layer ran the padded patch{why})", fields
        return model, None, fields


def run_ragged_model(settings: dict, shape: Settings, progress: bool = True) -> list[dict]:
    """``stock`` vs ``patched:<b>`` vs ``packed:<b>`` layers on the ragged batch (see the module docstring)."""
    from .model import run_model

    lengths = settings["ragged"]
    shape = dataclasses.replace(shape, batch=len(lengths))
    records = run_model({**settings, "seqlens": [max(lengths)]}, shape, progress=progress,
                        bench=RaggedModelBench(settings, shape, lengths))
    kinds = {"stock": "hf", "patched": "padded", "packed": "packed"}  # the ops rows' kinds, for the ratios
    for r in records:
        row, _, backend = r["impl"].partition(":")
        r.update(mode="ragged", lengths=list(lengths), B=len(lengths), T=sum(lengths), kind=kinds[row],
                 backend=backend or None)
    add_ratios(records)
    return records


# --- output -----------------------------------------------------------------------------------------------

def describe(settings: dict, shape: Settings) -> str:
    """What ran: the batch, its padding and the shapes (the table's header line)."""
    lengths = settings["ragged"]
    B, S, T = len(lengths), max(lengths), sum(lengths)
    layers = settings["layers"]
    what = (f"model {settings['model']} ({layers} layer{'s' * (layers != 1)})" if settings.get("model")
            else f"ops {','.join(settings['ops'])}")
    return (f"ragged batch: lengths={','.join(map(str, lengths))} (B={B}, right-padded to S={S}; T={T} real "
            f"tokens, {100 * (1 - T / (B * S)):.0f}% padding) | {what} | H={shape.heads} D={shape.head_dim} "
            f"{settings['dtype']} on {settings['device']} | backends {','.join(settings['backends']) or 'none'}")


def format_table(records: list[dict], header: str, memory_note: str = "") -> str:
    """The ragged table: a row per op x implementation x pass, the ratios on the packed rows, then what did not
    run and why."""
    w = max([11, *(len(r["op"]) + 1 for r in records)])
    titles = [title for _, _, title in RATIOS.values()]
    head = (f"{'op':<{w}}{'implementation':<20}{'pass':<8}{'time ms':>10}{'TFLOP/s':>9}{'peak MiB':>10}"
            + "".join(f"{t:>15}" for t in titles) + "  check")
    lines = [header, "", head, "-" * len(head)]
    for r in records:
        if r["status"] != "ok":
            continue
        mem = r.get("peak_mem_bytes")
        check = r.get("check", "")
        if "check_max_err" in r:
            check += f" (max err {r['check_max_err']:.1e})"
        if "check_vs_padded" in r:
            check += f" [vs padded {r['check_vs_padded']:.1e}]"
        if "packed_layers" in r:
            check += f"{r['packed_layers']} of {r['layers']} layers ran packed"
        ratios = "".join(f"{output._fmt(r.get(f), '.2f') + ('x' if f in r else ''):>15}" for f in RATIOS)
        lines.append(f"{r['op']:<{w}}{r['impl']:<20}{r['pass']:<8}{r['time_ms']:>10.2f}"
                     f"{output._fmt(r.get('tflops'), '.3f', 'n/a'):>9}"
                     f"{output._fmt(None if mem is None else mem / 2**20, '.1f', 'n/a'):>10}{ratios}  {check}")
    lines += ["", "packed/1-by-1 = packed time / the sequences' time one by one, unpadded (<= 1: packing costs "
              "nothing);",
              "padded/packed = padded (model mode: patched) time / packed time (> 1: packed is faster);",
              "hf/packed = stock HF (model mode: the stock layers) time / packed time. " + TARGETS + ".",
              "TFLOP/s: the real tokens' useful FLOPs, the same count for every row."]
    if memory_note:
        lines.append(memory_note)
    return "\n".join(lines + output.not_run_lines(records, w, 20))
