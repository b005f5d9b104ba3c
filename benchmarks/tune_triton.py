"""Tile-shape sweep of the Triton kernels under a time budget (issue 12: ``_GPU_TILES`` are guesses).

    python benchmarks/tune_triton.py [--seqlen 16384] [--head-dims 64,128] [--ops local,tglobal,...]
        [--configs BM,BN,W ...] [--budget SECONDS] [--min-run-time 0.1] [--prewarm N] [--json OUT]

Times each op pattern with the Triton backend (``backend="triton"``) under each candidate tile config
``(BLOCK_M, BLOCK_N, num_warps)``, switched through ``LONGATTN_TRITON_TILES`` (read by
``triton_kernels._common.attention_tiles`` at every launch, so one process compiles and runs every variant).
Shapes (``longattn.bench.cases``, DESIGN.md section 5): B=1, H=12, S=16384, bf16, head dims 64 and 128:

- ``local``          LongT5 local: window 127, relative bias table, scale 1; forward and forward+backward;
- ``tglobal``        LongT5 transient-global: window 127, blocks of 16, side keys = ``block_aggregate`` (RMS norm) of
                     k and v over ``tglobal_block_ids``' blocks, both bias tables; forward+backward;
- ``longformer-g1``, ``longformer-g64``  Longformer: window 256, 1 global (position 0) or 64 (spread), with
                     ``max_globals``; forward+backward.

Forward+backward differentiates q, k, v, the side keys and the bias tables (a training step's gradients).

Candidates per head dim: the current ``_GPU_TILES`` entry first (the reference), then ``CANDIDATES[D]`` in order,
filtered by ``fits`` (``--configs`` replaces the list and is run as given, unfiltered). Per (pattern, head dim,
config), in ``plan``'s order (the most informative first: every forward+backward pattern at the first head dim,
current config and ``TOP`` alternatives, then the rest):

1. one call (Triton compiles the variant: its time, ``first_call_s``, counts against the budget, never in the
   timing), whose output and gradients are compared with the current config's (``max_diff``: max abs
   difference over every tensor; passes when each is within ``tests/tolerance.py``'s floor for the dtype times
   ``max(1, max |reference|)``: a different tile shape only reorders fp32 sums before the final rounding);
2. ``longattn.bench.timing.time_call`` (CUDA events on a GPU, wall clock on CPU): ``time_ms`` is the median.

``kernels`` lists the Triton kernels a unit's first call loaded (name, registers, spills as the driver reports
them). Compiling dominates the budget (seconds per variant, one at a time in a process), so on a GPU ``--prewarm N``
child processes first compile the plan's variants in parallel, in plan order, for at most ``PREWARM_SHARE`` of the
budget (Triton's on-disk cache hands their work to the sweep, whose first calls then only load it; nothing is timed
meanwhile). A config that raises (out of shared memory, a compile error, a bad shape) is recorded with the reason and
the sweep goes on. Before each unit the budget is checked: a unit is skipped when the budget is spent or when the
slowest unit of its pattern so far would not fit in what is left. Under ``benchmarks/gpu_check.py`` the budget is
also capped by the step's limit (``GPU_CHECK_STEP_LIMIT_S``, minus ``LIMIT_MARGIN_S``); SIGTERM stops the sweep
the same way. The JSON (``--json``) is rewritten after every unit: run info (device, versions, commit), shapes,
one record per unit (``status`` ok / error / not run, ``check``, ``time_ms``, ``max_diff``), and per (pattern,
head dim, pass) the fastest checked config and its speed-up over the current one (``best``), then the table
printed last (``table``).

On CPU (no GPU) it runs under ``TRITON_INTERPRET=1`` for testing the plumbing, e.g. ``--seqlen 64 --head-dims
16 --heads 2 --ops local --configs 32,16,1`` (fp32 there: the interpreter's bf16 is broken); its times are the
interpreter's, not the kernels'.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from longattn.triton_kernels import _common

from longattn import api
from longattn.bench import impls
from longattn.bench.cases import Settings, build_case
from longattn.bench.output import run_info
from longattn.bench.timing import synchronize, time_call

ROOT = Path(__file__).resolve().parents[1]
# Tried after the current config, by padded head dim (others: 64's list), most promising first (the first TOP of
# them in the sweep's first pass). The order is from the kernels compiled on the CPU for sm_90a as a launch at
# S = 16384 specializes them (Triton 3.8, bf16, 2026-12-01; a proxy, not a timing): SASS instructions of the band
# loop x warps per score of the tile, plain (local, Longformer) / with both tables (TGlobal), and programs per SM:
#   D=64:  64x64/8w (current)  fwd 0.83 / 1.23, dQ 0.86 / 1.25, dK/dV 1.20 / 2.43   (2, 2, 1 per SM)
#          64x64/4w            fwd 0.68 / 0.97, dQ 0.63 / 0.93, dK/dV 0.80 / 1.93   (3, 3, 2; dK/dV with tables
#                              spills 36 B); 64x32/4w 0.81 / 1.08, 0.71 / 1.04, 1.17 / 2.14 (5, 4, 3 plain; 3, 4, 2);
#          128x32/8w 0.77 / 1.05, 0.68 / 0.99, 1.23 / 2.32; 128x64/8w 0.64 / 0.94, 0.59 / 0.88, 0.83 / 2.02 at one
#          program per SM; 64x32/8w 1.09 / 1.46, 1.05 / 1.53, 1.88 / 3.15.
#   D=128: 64x32/8w (current)  fwd 1.27 / 1.66, dQ 1.32 / 1.86, dK/dV 2.29 / 3.56   (2, 2, 1 per SM)
#          64x32/4w            fwd 0.97 / 1.25, dQ 0.88 / 1.19, dK/dV 1.57 / 2.55   (3, 2, 2; dK/dV with tables
#                              spills 24 B); 128x32/8w 0.90 / 1.19, 0.79 / 1.09, 1.60 / 2.71 at one per SM; 32x32/4w
#                              1.53 / 1.98, 1.39 / 1.77, 2.17 / 3.47; 64x64/4w spills 24-336 B.
# Why 8 warps on a 64-row tile cost more: its two warpgroups split every product's columns, so the softmax's row
# reductions cross warpgroups through shared memory each tile, and the backward's dP product, whose result is the
# A operand of the next product, is computed whole by both warpgroups (16 wgmma per warpgroup and tile where 12
# are needed). One warpgroup per 64 rows (4 warps) does neither.
CANDIDATES = {
    64: ((64, 64, 4), (64, 32, 4), (128, 32, 8), (128, 64, 8), (64, 32, 8), (32, 64, 4), (32, 32, 4), (32, 64, 8)),
    128: ((64, 32, 4), (128, 32, 8), (32, 32, 4), (32, 32, 8), (64, 64, 8), (32, 64, 8), (16, 32, 4), (64, 16, 8)),
}
TOP = 3
# ``fits``: at most this many fp32 accumulator values per thread in the largest kernel (of 255 registers).
ACC_PER_THREAD = 128
PREWARM_MAX_WORKERS = 8
PREWARM_SHARE = 0.5  # of the budget, at most, for the parallel compiles before the sweep
PREWARM_MIN_S = 20.0  # no prewarm when its share is shorter (the children's imports alone take seconds)
LIMIT_ENV = "GPU_CHECK_STEP_LIMIT_S"
LIMIT_MARGIN_S = 15.0  # of the step's limit: the imports before the sweep, the last write and the exit


@dataclass(frozen=True)
class Pattern:
    """One timed call: ``name`` (``--ops``), the bench op it builds, its pass and Longformer's global count."""

    name: str
    op: str
    which: str  # "fwd" or "fwdbwd"
    globals: int = 1


# Most informative first (the order of the sweep within a pass of ``plan``).
PATTERNS = (Pattern("local", "local", "fwdbwd"), Pattern("tglobal", "tglobal", "fwdbwd"),
            Pattern("longformer-g1", "longformer", "fwdbwd", 1), Pattern("longformer-g64", "longformer", "fwdbwd", 64),
            Pattern("local", "local", "fwd"))
OP_NAMES = tuple(dict.fromkeys(p.name for p in PATTERNS))
BIAS_NAMES = ("rel_bias", "side_bias")  # differentiated too: a model's bias tables are trained


@dataclass(frozen=True)
class Unit:
    """One measurement: ``pattern`` at head dim ``D`` with tiles ``config``; ``rank`` 0 is the current config."""

    pattern: Pattern
    D: int
    config: tuple[int, int, int]
    rank: int


class Stopped(Exception):
    """SIGTERM (the GPU check's step limit): stop the sweep, keep what was measured."""


# --- candidates and order -------------------------------------------------------------------------------------

def fits(D: int, config) -> bool:
    """A coarse register filter: the fp32 accumulators per thread of the forward (q tile's output and scores) and
    of the dK/dV kernel (dK, dV and scores) stay within ``ACC_PER_THREAD``."""
    block_m, block_n, warps = config
    d = _common.head_dim_block(D)
    threads = 32 * warps
    forward = block_m * (d + block_n)
    keys = block_n * 2 * d + block_m * block_n
    return max(forward, keys) <= ACC_PER_THREAD * threads


def current_tiles(D: int) -> tuple[int, int, int]:
    """What the kernels use for head dim ``D`` without the override (``_GPU_TILES``; the interpreter's tiles there)."""
    with tiles_env(None):
        return tuple(_common.attention_tiles(D))


def candidates(D: int, explicit=None) -> list[tuple[int, int, int]]:
    """The current config first, then ``explicit`` as given or ``CANDIDATES`` that ``fits``; no repeats."""
    listed = CANDIDATES.get(_common.head_dim_block(D), CANDIDATES[64])
    pool = explicit if explicit is not None else [c for c in listed if fits(D, c)]
    return list(dict.fromkeys([current_tiles(D), *(tuple(c) for c in pool)]))


def plan(patterns, head_dims, configs: dict) -> list[Unit]:
    """Every (pattern, head dim, config) unit, most informative first: (0) each forward+backward pattern at the first
    head dim with the current config and ``TOP`` alternatives; (1) those configs for the other patterns and head
    dims; (2) the remaining configs. Within a pass, each pattern's current config and first alternative come
    together (a speed-up as early as possible), then the next alternative of every pattern, and so on."""
    units = [Unit(p, D, c, r) for p in patterns for D in head_dims for r, c in enumerate(configs[D])]

    def key(u: Unit):
        d, early = head_dims.index(u.D), u.rank <= TOP
        phase = 0 if d == 0 and u.pattern.which == "fwdbwd" and early else 1 if early else 2
        return phase, d, max(u.rank, 1), patterns.index(u.pattern), u.rank

    return sorted(units, key=key)


@contextlib.contextmanager
def tiles_env(config):
    """``LONGATTN_TRITON_TILES`` set to ``config`` (None: unset) inside the block, restored after."""
    saved = os.environ.pop(_common._TILES_ENV, None)
    if config is not None:
        os.environ[_common._TILES_ENV] = ",".join(str(x) for x in config)
    try:
        yield
    finally:
        os.environ.pop(_common._TILES_ENV, None)
        if saved is not None:
            os.environ[_common._TILES_ENV] = saved


# --- the sweep ---------------------------------------------------------------------------------------------------

def base_record(unit: Unit) -> dict:
    bm, bn, w = unit.config
    return {"op": unit.pattern.name, "D": unit.D, "pass": unit.pattern.which, "config": list(unit.config),
            "block_m": bm, "block_n": bn, "num_warps": w, "current": unit.rank == 0}


def sweep(units, measure, budget_s: float, records: list, *, on_record=lambda records: None,
          clock=time.monotonic) -> list:
    """Run ``measure(unit) -> record`` for each unit in order within ``budget_s`` seconds, appending to ``records``
    (one record per unit, skipped ones with ``status`` "not run") and calling ``on_record(records)`` after each.

    Skipped: every unit once the budget is spent, and a unit whose pattern's slowest unit so far (compile included)
    would not fit in what is left (so an alternative never runs after its current config was skipped)."""
    deadline = clock() + budget_s
    cost = {}
    for unit in units:
        left, estimate = deadline - clock(), cost.get(unit.pattern)
        reason = ("budget spent" if left <= 0
                  else f"budget: ~{estimate:.0f} s needed, {left:.0f} s left" if estimate and estimate > left else None)
        if reason:
            record = {**base_record(unit), "status": "not run", "reason": reason}
        else:
            start = clock()
            record = measure(unit)
            cost[unit.pattern] = max(cost.get(unit.pattern, 0.0), clock() - start)
        records.append(record)
        on_record(records)
    return records


def compiled_kernels() -> dict:
    """id -> [kernel name, registers, spills] of every Triton kernel this process has loaded for longattn (Triton's
    in-memory caches; ``n_spills`` as the driver reports it). Empty under the interpreter or when Triton's internals
    differ from 3.x's: a diagnostic, never needed."""
    from longattn import triton_kernels

    found = {}
    try:
        for module in list(sys.modules.values()):
            if not getattr(module, "__name__", "").startswith(triton_kernels.__name__ + "."):
                continue
            for name, fn in vars(module).items():
                for entry in list(getattr(fn, "device_caches", {}).values()):
                    for kernel in list(entry[0].values()):
                        found[id(kernel)] = [name, getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None)]
    except Exception:  # another Triton version's layout: no kernel list
        return {}
    return found


def _tolerance_floors() -> dict:
    """``tests/tolerance.py``'s absolute floors per dtype (loaded by path: the tests' rule, in one place)."""
    path = ROOT / "tests" / "tolerance.py"
    spec = importlib.util.spec_from_file_location("_longattn_tolerance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FLOORS


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


class Tuner:
    """The real ``measure``: builds each (pattern, D)'s inputs once, keeps the current config's results."""

    def __init__(self, S: int, heads: int, device: torch.device, dtype: torch.dtype, min_run_time: float):
        self.S, self.heads, self.device, self.dtype, self.min_run_time = S, heads, device, dtype, min_run_time
        self.floors = _tolerance_floors()
        self.calls: dict = {}
        self.references: dict = {}

    def call(self, pattern: Pattern, D: int):
        """(run, names): ``run()`` -> the output (and the gradients) of one call of ``pattern`` at head dim D."""
        key = (pattern, D)
        if key not in self.calls:
            self.calls[key] = self._build(pattern, D)
        return self.calls[key]

    def _build(self, pattern: Pattern, D: int):
        settings = Settings(batch=1, heads=self.heads, head_dim=D, globals=pattern.globals, dtype=self.dtype,
                            device=str(self.device))
        case = build_case(pattern.op, self.S, settings)
        t = case.tensors
        if pattern.op == "tglobal":  # LongT5's side keys: RMS-normed block sums (of k and v, standing in for hidden)
            B, S, H = case.B, case.S, case.H
            weight = torch.ones(H * D, device=self.device, dtype=self.dtype)
            with torch.no_grad():
                for name, x in (("side_k", t["k"]), ("side_v", t["v"])):
                    t[name] = api.block_aggregate(x.reshape(B, S, H * D), t["query_block"], case.num_blocks,
                                                  weight=weight, backend="triton").view(B, -1, H, D)
        forward = impls.make("longattn:triton", case, grad=pattern.which == "fwdbwd")
        if pattern.which == "fwd":
            x = dict(t)
            return torch.no_grad()(lambda: (forward(x),)), ["out"]
        names = [n for n in (*case.grad_names, *BIAS_NAMES) if n in t]
        x = {n: (v.detach().requires_grad_(True) if n in names else v) for n, v in t.items()}
        leaves = [x[n] for n in names]
        gen = torch.Generator().manual_seed(1)
        dout = torch.randn(case.B, case.S, case.H, D, generator=gen).to(self.device, self.dtype)

        def run():
            out = forward(x)
            return (out.detach(), *torch.autograd.grad(out, leaves, dout))

        return run, ["out", *(f"d{n}" for n in names)]

    def first_call(self, unit: Unit):
        """(run, names, results, kernels) of ``unit``'s first call under its tiles (Triton compiles the variant, or
        loads it from its cache); ``kernels``: those first loaded in this process by the call (``compiled_kernels``)."""
        run, names = self.call(unit.pattern, unit.D)
        before = compiled_kernels()
        with tiles_env(unit.config):
            results = run()
            synchronize(self.device)
        after = compiled_kernels()
        return run, names, results, [after[k] for k in after.keys() - before.keys()]

    def measure(self, unit: Unit) -> dict:
        record = base_record(unit)
        stage = "inputs"
        try:
            self.call(unit.pattern, unit.D)  # built once per (pattern, D), outside the first call's time
            stage = "first call (compile)"
            start = time.perf_counter()
            run, names, results, kernels = self.first_call(unit)
            record["first_call_s"] = round(time.perf_counter() - start, 3)
            if kernels:
                record["kernels"] = sorted(kernels)
            with tiles_env(unit.config):
                stage = "check"
                record.update(self._check(unit, names, results))
                del results
                stage = "timing"
                timing = time_call(run, self.device, min_run_time=self.min_run_time, warmup=1)
            record.update(status="ok", time_ms=timing.median_s * 1e3, runs=timing.runs)
        except impls.Unavailable as exc:
            record.update(status="not run", reason=str(exc))
        except Exception as exc:  # out of shared memory, compile errors, bad tiles: recorded, the sweep goes on
            record.update(status="error", stage=stage, reason=_first_line(exc))
        return record

    def _check(self, unit: Unit, names, results) -> dict:
        """The check fields of ``unit``: the current config's results are kept as the reference."""
        bad = [n for n, x in zip(names, results) if not bool(torch.isfinite(x).all())]
        key = (unit.pattern, unit.D)
        if unit.rank == 0:
            self.references[key] = None if bad else [x.detach().clone() for x in results]
            return {"check": f"FAIL: not finite: {', '.join(bad)}" if bad else "reference", "max_diff": None}
        if bad:
            return {"check": f"FAIL: not finite: {', '.join(bad)}", "max_diff": None}
        reference = self.references.get(key)
        if reference is None:
            return {"check": "no reference (the current config failed)", "max_diff": None}
        diffs, over = {}, []
        for name, x, ref in zip(names, results, reference):
            diffs[name] = (x.float() - ref.float()).abs().max().item() if x.numel() else 0.0
            tol = self.floors[ref.dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
            if diffs[name] > tol:
                over.append(f"{name} {diffs[name]:.2e} > {tol:.2e}")
        return {"check": "FAIL: " + "; ".join(over) if over else "ok", "max_diff": max(diffs.values(), default=0.0),
                "diffs": diffs}


# --- results -----------------------------------------------------------------------------------------------------

def best_configs(records: list) -> list[dict]:
    """Per (op, D, pass): the current config's time, the fastest config whose check passed (once any alternative
    passed), and the speed-up (current / best; only when both were measured)."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["op"], r["D"], r["pass"]), []).append(r)
    out = []
    for (op, D, which), rows in groups.items():
        ok = [r for r in rows if r["status"] == "ok" and r.get("check") in ("reference", "ok")]
        current = next((r for r in rows if r["current"]), None)
        # no "best" until an alternative was measured: the current config alone is no comparison
        best = min(ok, key=lambda r: r["time_ms"]) if any(not r["current"] for r in ok) else None
        cur_ms = current.get("time_ms") if current and current["status"] == "ok" else None
        out.append({"op": op, "D": D, "pass": which, "current": current["config"] if current else None,
                    "current_ms": cur_ms, "best": best["config"] if best else None,
                    "best_ms": best["time_ms"] if best else None,
                    "speedup": cur_ms / best["time_ms"] if best and cur_ms else None,
                    "measured": sum(r["status"] == "ok" for r in rows),
                    "failed": sum(r["status"] == "error" or str(r.get("check", "")).startswith("FAIL") for r in rows),
                    "not_run": sum(r["status"] == "not run" for r in rows)})
    return out


def table(best: list[dict]) -> list[str]:
    """The short table printed last (and kept in the JSON for ``gpu_check``'s summary)."""
    cfg = lambda c: "-" if c is None else f"{c[0]}x{c[1]}/{c[2]}w"
    ms = lambda x: "-" if x is None else f"{x:.3f}"
    lines = [f"{'op':<15}{'D':>4} {'pass':<7}{'current':>11}{'ms':>9}{'best':>11}{'ms':>9}{'speed-up':>9}"
             f"  ok/failed/not run"]
    for b in best:
        speedup = "-" if b["speedup"] is None else f"{b['speedup']:.2f}x"
        lines.append(f"{b['op']:<15}{b['D']:>4} {b['pass']:<7}{cfg(b['current']):>11}{ms(b['current_ms']):>9}"
                     f"{cfg(b['best']):>11}{ms(b['best_ms']):>9}{speedup:>9}  {b['measured']}/{b['failed']}/"
                     f"{b['not_run']}")
    return lines


def write_json(path, header: dict, records: list, *, elapsed_s: float, stopped: str | None) -> dict:
    best = best_configs(records)
    run = {**header, "elapsed_s": round(elapsed_s, 1), "stopped": stopped, "results": records, "best": best,
           "table": table(best)}
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(run, indent=1, default=str) + "\n")
        tmp.replace(path)  # a reader (or a stop) never sees half a file
    return run


# --- command line ------------------------------------------------------------------------------------------------

def _config(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected BLOCK_M,BLOCK_N,num_warps (three positive integers), got {text!r}")
    return values


def _names(text: str, allowed, what: str) -> list:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{what}: expected a comma list of {list(allowed)}, got {text!r}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="benchmarks/tune_triton.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--head-dims", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ops", type=lambda s: _names(s, OP_NAMES, "--ops"), default=list(OP_NAMES))
    p.add_argument("--configs", type=_config, nargs="+", default=None, metavar="BM,BN,W",
                   help="tile configs to try after the current one, run as given (default: CANDIDATES that fit)")
    p.add_argument("--budget", type=float, default=120.0, help="seconds for the whole sweep, compiles included")
    p.add_argument("--min-run-time", type=float, default=0.1, help="seconds of timed calls per unit")
    p.add_argument("--dtype", default=None, help="default bfloat16 on a GPU, float32 on CPU (the interpreter)")
    p.add_argument("--json", default=None, help="write the results here (rewritten after every unit)")
    p.add_argument("--prewarm", type=int, default=None, metavar="N",
                   help="child processes compiling the variants before the sweep (default: on a GPU, "
                        f"min({PREWARM_MAX_WORKERS}, CPUs - 2); 0 on CPU)")
    p.add_argument("--compile-only", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                   help=argparse.SUPPRESS)  # a prewarm child: the first call of these units of the plan, nothing else
    args = p.parse_args(argv)
    if args.seqlen < 1 or args.heads < 1 or not args.budget > 0 or min(args.head_dims) < 1:
        p.error("--seqlen, --heads, --head-dims and --budget must be positive")
    unknown = [D for D in args.head_dims if _common.head_dim_block(D) not in _common._GPU_TILES]
    if unknown:
        p.error(f"--head-dims: the kernels have no tiles for {unknown} (padded head dims {sorted(_common._GPU_TILES)})")
    return args


def budget_seconds(budget: float, env=os.environ) -> float:
    """``--budget``, capped by the GPU check's step limit when it runs us (minus ``LIMIT_MARGIN_S``)."""
    limit = env.get(LIMIT_ENV)
    return budget if not limit else max(0.0, min(budget, float(limit) - LIMIT_MARGIN_S))


def prewarm_workers(requested, device: torch.device) -> int:
    if requested is not None:
        return max(0, requested)
    if device.type != "cuda" or _common.interpreting():
        return 0
    return max(0, min(PREWARM_MAX_WORKERS, (os.cpu_count() or 1) - 2))


def prewarm(argv: list, n_units: int, workers: int, seconds: float) -> dict:
    """Compile the plan's kernel variants in ``workers`` child processes (``--compile-only``: unit i goes to child
    ``i % workers``, so the first units of the plan compile first) for at most ``seconds``, before the sweep: Triton
    compiles one variant at a time in a process, and its on-disk cache hands the children's work to the sweep.
    The children also run each variant once (nothing is timed meanwhile). -> what ran, for the JSON."""
    script = str(Path(__file__).resolve())
    procs = []
    for w in range(min(workers, n_units)):
        units = ",".join(str(i) for i in range(w, n_units, workers))
        procs.append(subprocess.Popen([sys.executable, script, *argv, "--prewarm", "0", "--json", "",
                                       "--compile-only", units], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    start, finished = time.monotonic(), 0
    try:
        for proc in procs:
            proc.wait(timeout=max(0.0, start + seconds - time.monotonic()))
            finished += 1
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"workers": len(procs), "finished": finished, "exit_codes": [proc.returncode for proc in procs],
            "seconds": round(time.monotonic() - start, 1), "limit_s": round(seconds, 1)}


def compile_only(tuner: Tuner, units: list, indices) -> int:
    """A prewarm child: the first call of ``units[i]`` for each index (errors are the sweep's to record)."""
    for i in indices:
        with contextlib.suppress(Exception):
            tuner.first_call(units[i])
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    budget = budget_seconds(args.budget)
    patterns = [p for p in PATTERNS if p.name in args.ops]
    configs = {D: candidates(D, args.configs) for D in args.head_dims}
    units = plan(patterns, args.head_dims, configs)
    tuner = Tuner(args.seqlen, args.heads, device, dtype, args.min_run_time)
    if args.compile_only is not None:
        return compile_only(tuner, units, args.compile_only)
    workers = prewarm_workers(args.prewarm, device)
    settings = {"mode": "tune-triton", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                "seqlen": args.seqlen, "batch": 1, "heads": args.heads, "head_dims": args.head_dims, "ops": args.ops,
                "budget_s": budget, "min_run_time": args.min_run_time, "prewarm_workers": workers,
                "interpreter": _common.interpreting(), "tiles_env": _common._TILES_ENV}
    header = {**run_info(settings),
              "shapes": {"local": "LongT5 local: window 127, relative bias table, scale 1",
                         "tglobal": "LongT5 transient-global: window 127, block 16 (G = S // 16 side keys from "
                                    "block_aggregate with RMS norm), band and side bias tables, scale 1",
                         "longformer-g1": "Longformer: window 256, 1 global (position 0), max_globals given",
                         "longformer-g64": "Longformer: window 256, 64 globals spread over S, max_globals given",
                         "grads": "fwdbwd differentiates q, k, v, side keys and bias tables (random dout)"},
              "candidates": {D: [list(c) for c in cs] for D, cs in configs.items()}}
    records, stopped = [], None
    save = lambda recs: write_json(args.json, header, recs, elapsed_s=time.monotonic() - start, stopped=stopped)

    def on_term(signum, frame):
        raise Stopped("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        if workers and PREWARM_SHARE * budget >= PREWARM_MIN_S:
            header["prewarm"] = prewarm(argv, len(units), workers, PREWARM_SHARE * budget)
        sweep(units, tuner.measure, budget - (time.monotonic() - start), records, on_record=save)
    except (Stopped, KeyboardInterrupt) as exc:
        stopped = f"stopped ({exc or type(exc).__name__}) after {len(records)} units"
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped is None and any(r.get("reason", "").startswith("budget") for r in records):
        stopped = "budget"
    run = save(records)
    print(f"tune_triton: {device} {settings['dtype']} S={args.seqlen} H={args.heads}, "
          f"{sum(r['status'] == 'ok' for r in records)} of {len(records)} units measured in "
          f"{run['elapsed_s']:.0f} s (budget {budget:.0f} s){'; ' + stopped if stopped else ''}")
    print("\n".join(run["table"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
