"""``benchmarks/tune_triton.py``'s plumbing on CPU: the plan's order, the budget, failed configs, the JSON.

The sweep's timings only mean something on a GPU (``benchmarks/gpu_check.sh`` runs it there); here one tiny sweep
runs under the Triton interpreter in a subprocess (TRITON_INTERPRET must be set before the kernels are imported),
and the budget logic runs in-process on a fake clock.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tune_triton.py"


def _load():
    spec = importlib.util.spec_from_file_location("tune_triton", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tt = _load()
FWDBWD = [p for p in tt.PATTERNS if p.which == "fwdbwd"]


def test_candidates_start_with_the_current_config_and_fit_the_head_dim():
    for D in (64, 128):
        configs = tt.candidates(D)
        assert configs[0] == tt.current_tiles(D) and len(set(configs)) == len(configs) > tt.TOP
        assert all(c == configs[0] or c in tt.CANDIDATES[D] and tt.fits(D, c) for c in configs)
        assert all(x >= 16 and x & (x - 1) == 0 for c in configs for x in c[:2])  # powers of two >= 16
    assert tt.fits(64, (128, 128, 8)) and not tt.fits(128, (128, 128, 8))  # too many accumulators per thread
    assert tt.candidates(32)[1:] == [c for c in tt.CANDIDATES[64] if c != tt.current_tiles(32)]  # 64's list
    # --configs are run as given (a bad one is the kernels' to refuse), after the current one.
    assert tt.candidates(64, [(24, 16, 1)]) == [tt.current_tiles(64), (24, 16, 1)]


def test_plan_puts_the_most_informative_units_first():
    configs = {D: [(D, 0, r) for r in range(6)] for D in (64, 128)}  # rank r: stand-in configs
    units = tt.plan(tt.PATTERNS, [64, 128], configs)
    assert len(units) == len({(u.pattern, u.D, u.rank) for u in units}) == len(tt.PATTERNS) * 2 * 6
    first = units[:len(FWDBWD) * (tt.TOP + 1)]
    # The first pass: every fwd+bwd pattern at the first head dim, current config and TOP alternatives ...
    assert {(u.pattern, u.D, u.rank) for u in first} == {(p, 64, r) for p in FWDBWD for r in range(tt.TOP + 1)}
    # ... each pattern's current config next to its first alternative (a speed-up as early as possible).
    assert [(u.pattern, u.rank) for u in first[:4]] == [(FWDBWD[0], 0), (FWDBWD[0], 1), (FWDBWD[1], 0),
                                                        (FWDBWD[1], 1)]
    assert all(u.config == configs[u.D][u.rank] for u in units)
    later = units[len(first):]
    assert max(i for i, u in enumerate(later) if u.rank <= tt.TOP) < min(i for i, u in enumerate(later)
                                                                        if u.rank > tt.TOP)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fake_measure(clock, seconds, fail=()):
    def measure(unit):
        clock.now += seconds[unit.pattern.name]
        record = {**tt.base_record(unit), "status": "ok", "check": "reference" if unit.rank == 0 else "ok",
                  "time_ms": 10.0 - unit.rank}
        if unit.config in fail:
            record.update(status="error", reason="OutOfResources: shared memory")
        return record
    return measure


def test_sweep_stops_at_the_budget_and_keeps_what_it_measured():
    clock, written = FakeClock(), []
    local, tglobal = FWDBWD[0], FWDBWD[1]
    units = [tt.Unit(p, 64, (16 * (r + 1), 16, 1), r) for p in (local, tglobal) for r in range(3)]
    units.sort(key=lambda u: (u.pattern != local, u.rank))
    records = []
    tt.sweep(units, _fake_measure(clock, {"local": 3.0, "tglobal": 20.0}), 30.0, records,
             on_record=lambda recs: written.append(len(recs)), clock=clock)
    status = [(r["op"], r["status"], r.get("reason", "")) for r in records]
    assert written == list(range(1, 7))  # the JSON is rewritten after every unit
    assert status[:4] == [("local", "ok", "")] * 3 + [("tglobal", "ok", "")]  # 9 s, then 29 s spent
    # 1 s left: tglobal's 20 s would not fit; its later alternatives are skipped the same way.
    assert [s[1] for s in status[4:]] == ["not run"] * 2 and all(s[2].startswith("budget") for s in status[4:])

    records = []
    tt.sweep(units, _fake_measure(clock, {"local": 40.0, "tglobal": 1.0}), 30.0, records, clock=clock)
    # The first unit overruns the budget: nothing else starts.
    assert [r["status"] for r in records] == ["ok"] + ["not run"] * 5
    assert all(r["reason"] == "budget spent" for r in records[1:])


def test_best_config_is_the_fastest_checked_one():
    clock = FakeClock()
    local = FWDBWD[0]
    units = [tt.Unit(local, 64, (16 * (r + 1), 16, 1), r) for r in range(4)]
    records = tt.sweep(units, _fake_measure(clock, {"local": 1.0}, fail={(64, 16, 1)}), 100.0, [], clock=clock)
    records[2]["check"] = "FAIL: dq 1e-1 > 2e-2"  # the fastest of the rest fails its check: never the best
    (best,) = tt.best_configs(records)
    assert best["current"] == [16, 16, 1] and best["current_ms"] == 10.0
    assert best["best"] == [32, 16, 1] and best["best_ms"] == 9.0 and best["speedup"] == pytest.approx(10 / 9)
    assert (best["measured"], best["failed"], best["not_run"]) == (3, 2, 0)
    assert "32x16/1w" in tt.table([best])[1] and "1.11x" in tt.table([best])[1]
    (alone,) = tt.best_configs(records[:1])  # the current config alone: no best, no speed-up
    assert alone["current_ms"] == 10.0 and alone["best"] is None and alone["speedup"] is None


def test_budget_is_capped_by_the_gpu_check_step_limit():
    assert tt.budget_seconds(120.0, {}) == 120.0
    assert tt.budget_seconds(120.0, {tt.LIMIT_ENV: "60"}) == 60.0 - tt.LIMIT_MARGIN_S
    assert tt.budget_seconds(120.0, {tt.LIMIT_ENV: "5"}) == 0.0


@pytest.mark.parametrize("argv", [["--configs", "64,64"], ["--configs", "a,b,c"], ["--ops", "dense"],
                                  ["--budget", "0"], ["--head-dims", "64,256"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit) as exc:
        tt.parse_args(argv)
    assert exc.value.code == 2


def test_spent_budget_writes_a_json_with_nothing_measured(tmp_path, capsys):
    out = tmp_path / "tune.json"
    assert tt.main(["--budget", "1e-9", "--ops", "local", "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    assert run["stopped"] == "budget" and run["results"]
    assert all(r["status"] == "not run" and r["reason"] == "budget spent" for r in run["results"])
    assert all(b["speedup"] is None and b["current_ms"] is None for b in run["best"])
    assert capsys.readouterr().out.rstrip().endswith(run["table"][-1])


def test_tiny_sweep_under_the_interpreter_records_a_bad_config_and_goes_on(tmp_path):
    out = tmp_path / "tune.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("LONGATTN_TRITON_TILES", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--seqlen", "32", "--head-dims", "16", "--heads", "1",
                           "--ops", "local", "--configs", "24,16,1", "32,16,1", "--min-run-time", "0.01",
                           "--prewarm", "1", "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads(out.read_text())
    assert run["settings"]["mode"] == "tune-triton" and run["settings"]["interpreter"] is True
    assert {"device", "versions", "git_commit", "shapes", "candidates"} <= set(run) and run["stopped"] is None
    # --prewarm 1: one child ran every unit once first (and exited cleanly, the bad config included)
    assert run["prewarm"]["workers"] == run["prewarm"]["finished"] == 1 and run["prewarm"]["exit_codes"] == [0]
    rows = {(r["pass"], tuple(r["config"])): r for r in run["results"]}
    assert set(rows) == {(p, c) for p in ("fwd", "fwdbwd") for c in ((16, 16, 1), (24, 16, 1), (32, 16, 1))}
    for which in ("fwd", "fwdbwd"):
        ref, bad, other = rows[which, (16, 16, 1)], rows[which, (24, 16, 1)], rows[which, (32, 16, 1)]
        assert ref["current"] and ref["status"] == "ok" and ref["check"] == "reference" and ref["time_ms"] > 0
        # 24 is not a power of two: the kernel refuses it, the record says why, and the sweep goes on.
        assert bad["status"] == "error" and "power of 2" in bad["reason"] and "time_ms" not in bad
        assert other["status"] == "ok" and other["check"] == "ok" and 0 <= other["max_diff"] < 1e-4
    assert set(rows["fwdbwd", (32, 16, 1)]["diffs"]) == {"out", "dq", "dk", "dv", "drel_bias"}
    best = {b["pass"]: b for b in run["best"]}
    assert set(best) == {"fwd", "fwdbwd"} and all(b["best"] in ([16, 16, 1], [32, 16, 1]) for b in best.values())
    assert all(b["failed"] == 1 and b["measured"] == 2 and b["speedup"] >= 1.0 for b in best.values())
    assert proc.stdout.rstrip().endswith(run["table"][-1])  # the table is printed last
