"""The sweep: for each op, sequence length and implementation, check (optionally) and time each pass.

Produces one record (a flat dict, the rows of the table / CSV / JSON) per op x S x implementation x pass.
A record's ``status`` is "ok" (timed), "unavailable" (could not run: ``reason`` says why) or "error"
(raised while running: ``reason`` holds the exception). Every number in an "ok" record comes from a timing
of this run.
"""

from __future__ import annotations

import sys

import torch

from . import flops, impls, oracle, timing
from .cases import Settings, build_case, leaves

PASSES = ("fwd", "bwd", "fwdbwd")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}" if not isinstance(exc, impls.Unavailable) else str(exc)


def _grad_inputs(case, inputs):
    return [inputs[n] for n in case.grad_names]


def _cotangent(out):
    """A fixed random gradient for ``out``: a tensor, or a list / tuple of tensors (a list of per-sequence
    outputs, ``ragged``'s one-by-one rows)."""
    gen = torch.Generator().manual_seed(1)
    make = lambda o: torch.randn(o.shape, generator=gen).to(o.device, o.dtype)  # noqa: E731
    return [make(o) for o in out] if isinstance(out, (list, tuple)) else make(out)


def _pass_fn(forward, case, which: str):
    """The callable timed for pass ``which`` (its setup, e.g. the forward before a backward, runs here).

    ``case`` needs only ``tensors`` and ``grad_names`` (see ``cases.leaves``); ``forward(inputs)`` returns a
    tensor or a list of tensors."""
    if which == "fwd":
        inputs = leaves(case, requires_grad=False)

        def fwd():
            with torch.no_grad():
                return forward(inputs)

        return fwd
    inputs = leaves(case, requires_grad=True)
    wrt = _grad_inputs(case, inputs)
    out = forward(inputs)
    dout = _cotangent(out)
    # autograd.grad returns the gradients without accumulating into .grad (no extra add is timed);
    # allow_unused: dense SDPA does not read TGlobal's side keys.
    if which == "bwd":
        saved = out
        return lambda: torch.autograd.grad(saved, wrt, dout, retain_graph=True, allow_unused=True)
    out = None  # the forward+backward pass builds its own graph each call
    return lambda: torch.autograd.grad(forward(inputs), wrt, dout, allow_unused=True)


def run_sweep(ops, seqlens, settings: Settings, names, passes=PASSES, *, check=False, min_run_time=0.2,
              progress=True, checkpoint=None) -> list[dict]:
    """Time every implementation in ``names`` (see ``impls.impl_names``) on every op and length.

    ``checkpoint(records)``, if given, is called after each implementation with the records so far (ratios
    filled in), so a run stopped from outside (a time budget) keeps what it measured."""
    from tqdm import tqdm

    device = torch.device(settings.device)
    records = []
    bar = tqdm(total=len(ops) * len(seqlens) * len(names), file=sys.stderr, disable=not progress,
               desc="longattn bench", unit="impl")
    for op in ops:
        for S in seqlens:
            case = build_case(op, S, settings)
            keys = flops.mean_attended_keys(case)
            fwd_flops = flops.attention_flops(case, keys)
            reference, check_reason = None, None
            if check:
                try:
                    reference = oracle.oracle_output(case)
                except Exception as exc:
                    check_reason = _reason(exc)
            for name in names:
                bar.set_postfix_str(f"{op} S={S} {name}")
                base = {"op": op, "S": S, "impl": name, "kind": "baseline" if impls.is_baseline(name) else "longattn",
                        "mean_keys": keys,
                        "fwd_flops": flops.dense_flops(case) if name == "sdpa_dense" else fwd_flops}
                records.extend(_run_impl(case, name, base, passes, reference, check, check_reason, min_run_time))
                bar.update(1)
                if checkpoint is not None:
                    add_ratios(records)
                    checkpoint(records)
            del case, reference
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    add_ratios(records)
    return records


def _run_impl(case, name, base, passes, reference, check, check_reason, min_run_time) -> list[dict]:
    device = case.device
    try:
        forward = impls.make(name, case, grad=any(p != "fwd" for p in passes))
    except Exception as exc:
        status = "unavailable" if isinstance(exc, impls.Unavailable) else "error"
        return [{**base, "pass": p, "status": status, "reason": _reason(exc)} for p in passes]
    checked = {}
    if check:
        checked = _check(case, name, forward, reference, check_reason)
    return time_passes(forward, case, {**base, **checked}, passes, device, min_run_time)


def time_passes(forward, case, base: dict, passes, device, min_run_time) -> list[dict]:
    """One record per pass: ``base`` plus the timing of ``forward`` on ``case``'s inputs (``_pass_fn``), the
    TFLOP/s from ``base["fwd_flops"]`` when set, or the status and reason when the pass could not run."""
    out = []
    for which in passes:
        rec = {**base, "pass": which}
        fn = None
        try:
            fn = _pass_fn(forward, case, which)
            t = timing.time_call(fn, device, min_run_time=min_run_time, warmup=1, memory=True, host_overhead=True)
            rec.update(status="ok", **t.fields())
            pf = flops.pass_flops(base.get("fwd_flops"), which)
            rec["tflops"] = None if pf is None else pf / t.median_s / 1e12
        except Exception as exc:  # Unavailable here: a pass this implementation lacks (Flex's CPU backward)
            rec.update(status="unavailable" if isinstance(exc, impls.Unavailable) else "error", reason=_reason(exc))
        finally:
            fn = None
        out.append(rec)
    return out


def _check(case, name, forward, reference, check_reason) -> dict:
    if name == "sdpa_dense":
        return {"check": "n/a (dense SDPA computes a different function)"}
    if reference is None:
        return {"check": f"n/a ({check_reason})"}
    try:
        with torch.no_grad():
            err = oracle.max_error(case, forward(leaves(case, requires_grad=False)), reference)
    except Exception as exc:
        return {"check": f"error ({_reason(exc)})"}
    return {"check": "ok" if oracle.within_bound(case, err) else "FAIL", "check_max_err": err}


def add_ratios(records: list[dict]) -> None:
    """Add ``vs_best_baseline`` (fastest same-function baseline time / this time: >1 = faster than it) and
    ``vs_sdpa_rate`` (this TFLOP/s / dense SDPA's TFLOP/s) to the timed records of each op x S x pass.

    A baseline record carrying a ``caveat`` (e.g. a formulation found unfair after the run) is never the
    best baseline."""
    groups: dict = {}
    for r in records:
        if r["status"] == "ok":
            groups.setdefault((r["op"], r["S"], r["pass"]), []).append(r)
    for group in groups.values():
        same_function = [r for r in group if r["kind"] == "baseline" and r["impl"] != "sdpa_dense"
                         and not r.get("caveat")]
        best = min(same_function, key=lambda r: r["time_ms"], default=None)
        dense = next((r for r in group if r["impl"] == "sdpa_dense"), None)
        for r in group:
            if best is not None:
                r["best_baseline"] = best["impl"]
                r["vs_best_baseline"] = best["time_ms"] / r["time_ms"]
            if dense is not None and r.get("tflops") is not None and dense.get("tflops"):
                r["vs_sdpa_rate"] = r["tflops"] / dense["tflops"]
