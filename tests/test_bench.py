"""``longattn bench``: end to end on tiny CPU configs, outputs well-formed, FLOP counts exact.

No test asserts a timing: only that numbers are produced, written and labelled.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from longattn import dispatch
from longattn.bench import flops, impls, oracle, report, timing
from longattn.bench.cases import Settings, build_case, global_positions
from longattn.cli import main

TINY = ["bench", "--seqlen", "64", "--heads", "2", "--head-dim", "16", "--window", "8", "--block-size", "4",
        "--globals", "2", "--min-run-time", "0.01", "--no-progress"]


def _run(tmp_path, *extra):
    json_path, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    rc = main([*TINY, "--json", str(json_path), "--csv", str(csv_path), *extra])
    assert rc == 0
    return json_path, csv_path


@pytest.fixture(scope="module")
def checked_run(tmp_path_factory):
    """One tiny run of every op with --check (baselines that need compiling skipped to stay fast)."""
    tmp = tmp_path_factory.mktemp("bench")
    paths = _run(tmp, "--check", "--baseline", "hf,sdpa_mask,sdpa_dense", "--pass", "fwd,fwdbwd")
    return paths, json.loads(paths[0].read_text())


def test_json_has_metadata_settings_and_rows(checked_run):
    _, run = checked_run
    for key in ("timestamp", "device", "versions", "git_commit", "settings", "backends", "results"):
        assert key in run
    assert {"torch", "triton", "transformers", "longattn", "torch_cuda"} <= set(run["versions"])
    st = run["settings"]
    assert st["seqlens"] == [64] and st["heads"] == 2 and st["head_dim"] == 16 and st["window"] == 8
    assert st["ops"] == ["local", "longformer", "tglobal", "aggregate"] and st["passes"] == ["fwd", "fwdbwd"]
    timed = [r for r in run["results"] if r["status"] == "ok"]
    assert {r["op"] for r in timed} == {"local", "longformer", "tglobal", "aggregate"}
    for r in timed:
        assert r["time_ms"] > 0 and r["runs"] >= 1
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
        _assert_host_fields(r, st["device"])


def _assert_host_fields(r, device):
    """A timed row's host-overhead fields: the figures on a GPU, empty with the reason on CPU."""
    assert {"call_wall_ms", "gpu_ms", "host_overhead_ms"} <= set(r), r
    if device == "cpu":
        assert r["host_overhead_ms"] is None and r["gpu_ms"] is None
        assert r["host_overhead_reason"] == timing.HOST_OVERHEAD_CPU_REASON
    else:
        assert r["call_wall_ms"] > 0
        if r.get("host_overhead_reason") != timing.HOST_OVERHEAD_SYNC_REASON:  # a baseline may sync the host
            assert r["host_overhead_ms"] == pytest.approx(r["call_wall_ms"] - r["gpu_ms"]), r


def test_torch_backend_and_baselines_timed(checked_run):
    _, run = checked_run
    timed = {(r["op"], r["impl"], r["pass"]) for r in run["results"] if r["status"] == "ok"}
    for op in ("local", "longformer", "tglobal", "aggregate"):
        assert (op, "longattn:torch", "fwdbwd") in timed
        assert (op, "hf", "fwd") in timed
    for op in ("local", "longformer", "tglobal"):
        assert (op, "sdpa_dense", "fwd") in timed and (op, "sdpa_mask", "fwdbwd") in timed
        row = next(r for r in run["results"] if (r["op"], r["impl"], r["pass"]) == (op, "longattn:torch", "fwd"))
        assert row["tflops"] > 0 and row["vs_sdpa_rate"] > 0 and row["vs_best_baseline"] > 0


def _run_dtype(run) -> torch.dtype:
    return getattr(torch, run["settings"]["dtype"])


def test_check_errors_within_bound(checked_run):
    _, run = checked_run
    checked = [r for r in run["results"] if r["status"] == "ok" and "check_max_err" in r]
    assert {r["impl"] for r in checked} >= {"longattn:torch", "hf", "sdpa_mask"}
    # The run's own dtype sets the bound (float32 on CPU, bfloat16 by default on a GPU).
    bound = oracle.CHECK_BOUND[_run_dtype(run)]
    for r in checked:
        assert r["check"] == "ok" and r["check_max_err"] <= bound, r
    dense = [r for r in run["results"] if r["impl"] == "sdpa_dense" and r["status"] == "ok"]
    assert all(r["check"].startswith("n/a") for r in dense)


def test_unavailable_backends_listed_with_reason(checked_run):
    _, run = checked_run
    st = run["settings"]
    device = torch.device(st["device"])
    for op, kernel_op_dim in (("local", st["head_dim"]), ("aggregate", st["heads"] * st["head_dim"])):
        rows = {r["impl"]: r for r in run["results"] if r["op"] == op}
        for name in run["backends"]:
            # Expected from what this machine actually offers for this dtype / head dim, not from a guess.
            reasons = dispatch.unsupported_reasons(name, device, _run_dtype(run), kernel_op_dim, op)
            row = rows[f"longattn:{name}"]
            if reasons:
                assert row["status"] == "unavailable" and row["reason"], row
            else:
                assert row["status"] == "ok", row
    agg = [r for r in run["results"] if r["op"] == "aggregate" and r["impl"] == "sdpa_dense"]
    assert agg and all(r["status"] == "unavailable" and r["reason"] for r in agg)


def test_csv_written(checked_run):
    (json_path, csv_path), run = checked_run
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(run["results"]) and {"op", "S", "impl", "pass", "time_ms", "tflops"} <= set(rows[0])
    assert {"host_overhead_ms", "call_wall_ms", "gpu_ms", "host_overhead_reason"} <= set(rows[0])


def test_png_written(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the bench extra (matplotlib)")
    png_path = tmp_path / "r.png"
    assert main([*TINY, "--op", "local", "--baseline", "none", "--pass", "fwd", "--plot", str(png_path)]) == 0
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 1000


def test_plot_without_matplotlib_fails_before_timing(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit, match="matplotlib"):
        main([*TINY, "--plot", str(tmp_path / "r.png")])
    assert "longattn:torch" not in capsys.readouterr().out


def test_table_printed_and_skips_explained(tmp_path, capsys):
    main([*TINY, "--op", "local", "--baseline", "sdpa_dense", "--pass", "fwd", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "longattn:torch" in out and "sdpa_dense" in out and "TFLOP/s" in out
    assert "host µs" in out.splitlines()[0] and f"host µs n/a: {timing.HOST_OVERHEAD_CPU_REASON}" in out
    cpu = torch.device("cpu")
    skipped = [name for name in dispatch.BACKEND_NAMES
               if dispatch.unsupported_reasons(name, cpu, torch.float32, 16, "local")]
    assert ("not run:" in out) == bool(skipped)
    for name in skipped:
        assert f"longattn:{name}" in out.split("not run:")[1]


def test_cli_checks_every_baseline_without_noise(tmp_path):
    """The CLI as a user runs it (own process, CPU): every baseline passes --check, Flex included (its CPU
    backward is listed as unavailable), and nothing prints torch's build-tool line about CUDA_HOME."""
    json_path = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "longattn", *TINY, "--device", "cpu", "--backend", "none",
                           "--baseline", "hf,flex,sdpa_mask", "--op", "local,longformer,tglobal", "--pass",
                           "fwd,fwdbwd", "--check", "--json", str(json_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for stream in (proc.stdout, proc.stderr):
        assert "CUDA_HOME" not in stream and "No CUDA runtime" not in stream, stream
    rows = json.loads(json_path.read_text())["results"]
    for op in ("local", "longformer", "tglobal"):
        for impl in ("hf", "flex", "sdpa_mask"):
            fwd = next(r for r in rows if (r["op"], r["impl"], r["pass"]) == (op, impl, "fwd"))
            assert fwd["status"] == "ok" and fwd["check"] == "ok", fwd
        flex_bwd = next(r for r in rows if (r["op"], r["impl"], r["pass"]) == (op, "flex", "fwdbwd"))
        assert flex_bwd["status"] == "unavailable" and "backward" in flex_bwd["reason"]


def _dense_from_mods(case):
    """The pattern and biases Flex's mods describe, evaluated on broadcast index grids (no compile)."""
    mask_mod, score_mod, _ = impls._flex_mods(case)
    G = case.num_blocks if case.op == "tglobal" else 0
    b = torch.arange(case.B)[:, None, None, None]
    h = torch.arange(case.H)[None, :, None, None]
    q = torch.arange(case.S)[None, None, :, None]
    kv = torch.arange(case.S + G)[None, None, None, :]
    keep = mask_mod(b, h, q, kv).expand(case.B, case.H, case.S, case.S + G)
    bias = None if score_mod is None else score_mod(torch.zeros(()), b, h, q, kv)
    return keep, bias


@pytest.mark.parametrize("op,globals_,padded", [("longformer", 1, False), ("longformer", 3, False),
                                                ("longformer", 12, False), ("local", 1, False),
                                                ("tglobal", 1, False), ("tglobal", 1, True)])
def test_flex_mods_match_the_dense_pattern(op, globals_, padded):
    """Flex's mask_mod / score_mod (index arithmetic, unrolled globals, or lookups) describe exactly the
    dense pattern and biases SDPA's mask holds."""
    S = 45 if padded else 48  # 45 = 2 blocks of 16 + 13 orphans that join the last block
    case = build_case(op, S, Settings(batch=2, heads=2, head_dim=8, window=5, globals=globals_, block_size=16))
    if padded:  # a padded row: side keys masked, block ids from the padding
        from longattn.api import tglobal_block_ids

        mask = torch.ones(2, S, dtype=torch.bool)
        mask[1, 20:] = False
        case.tensors["query_block"], case.tensors["side_mask"] = tglobal_block_ids(mask, 16)
    keep, bias = _dense_from_mods(case)
    dense = impls._dense_pattern(case)
    if dense.dtype == torch.bool:
        assert torch.equal(keep, dense.expand_as(keep))
        return
    finite = torch.isfinite(dense).expand_as(keep)
    assert torch.equal(keep, finite)
    assert torch.allclose(bias.expand_as(keep)[finite], dense.expand_as(keep)[finite])


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "longattn", "bench", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--seqlen" in proc.stdout


def test_report_without_gpu_results(tmp_path, capsys):
    assert main(["bench", "--report", "--results-dir", str(tmp_path)]) == 0
    assert "No GPU results" in capsys.readouterr().out


def _gpu_run(results):
    return {"device_type": "cuda", "device": "cuda:0 test GPU", "timestamp": "2026-01-01T00:00:00+00:00",
            "settings": {"mode": "ops"}, "results": results}


def test_report_host_overhead_column():
    """A run with host overhead gets the column (µs; – with the reason where it is missing); one saved before
    the field existed renders without it."""
    base = {"op": "local", "pass": "fwd", "kind": "longattn", "time_ms": 0.5, "tflops": 1.0, "peak_mem_bytes": 2**20}
    rows = [{**base, "S": 4096, "impl": "longattn:cuda", "status": "ok", "host_overhead_ms": 0.0425},
            {**base, "S": 4096, "impl": "hf", "status": "ok", "host_overhead_ms": None,
             "host_overhead_reason": timing.HOST_OVERHEAD_SYNC_REASON},
            {**base, "S": 4096, "impl": "flex", "status": "unavailable", "reason": "no triton"}]
    text = report.markdown(_gpu_run(rows), "x.json", None)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert "| host overhead (µs) |" in table[0] and len({line.count("|") for line in table}) == 1
    assert "| 4096 | longattn:cuda | 0.500 | 1.0 | 1 | 42 |" in text
    assert "| 4096 | hf | 0.500 | 1.0 | 1 | – |" in text
    assert f"– where {timing.HOST_OVERHEAD_SYNC_REASON}" in text
    old = report.markdown(_gpu_run([{k: v for k, v in r.items() if "host" not in k} for r in rows]), "x.json", None)
    assert "host overhead" not in old.lower() and len({line.count("|") for line in old.splitlines()
                                                       if line.startswith("|")}) == 1


def test_readme_results_section_is_generated():
    """The README's results section is `longattn bench --report`'s output for the saved runs, verbatim."""
    from pathlib import Path

    from longattn.bench import report
    from longattn.bench.cli import RESULTS_DIR

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Results\n"):readme.index("## Building from source\n")]
    assert section.strip() == report.render(RESULTS_DIR, plot=False).strip()


def test_save_refuses_cpu_runs(tmp_path):
    rc = main([*TINY, "--op", "aggregate", "--baseline", "none", "--pass", "fwd", "--device", "cpu", "--save",
               "--results-dir", str(tmp_path)])
    assert rc == 2 and not list(tmp_path.iterdir())


@pytest.mark.gpu
def test_save_writes_gpu_run_with_commit(tmp_path):
    pytest.importorskip("matplotlib", reason="--save writes a plot (the bench extra)")
    rc = main([*TINY, "--op", "aggregate", "--baseline", "none", "--pass", "fwd", "--device", "cuda", "--save",
               "--results-dir", str(tmp_path)])
    saved = list(tmp_path.glob("*.json"))
    assert rc == 0 and len(saved) == 1
    run = json.loads(saved[0].read_text())
    assert run["device_type"] == "cuda" and "git_commit" in run and run["settings"]["device"] == "cuda"
    for r in run["results"]:
        _assert_host_fields(r, "cuda")
    assert "| host overhead (µs) |" in report.markdown(run, "x.json", None)


@pytest.mark.gpu
def test_host_overhead_on_gpu():
    """Launch-only calls get the figures; a call that syncs the host (``.item()``) gets the reason instead."""
    a = torch.randn(1 << 20, device="cuda")
    out = torch.empty_like(a)
    t = timing.time_call(lambda: torch.add(a, a, out=out), torch.device("cuda"), min_run_time=0.05,
                         host_overhead=True)
    assert t.host.reason is None and t.host.gpu_s > 0
    assert t.host.overhead_s == pytest.approx(t.host.wall_s - t.host.gpu_s)
    synced = timing.time_call(lambda: torch.add(a, a, out=out).sum().item(), torch.device("cuda"),
                              min_run_time=0.05, host_overhead=True)
    assert synced.host.reason == timing.HOST_OVERHEAD_SYNC_REASON and synced.host.wall_s > 0


def test_model_mode_lists_patched_rows(tmp_path):
    json_path = tmp_path / "m.json"
    rc = main(["bench", "--model", "longt5-local", "--seqlen", "32", "--heads", "2", "--head-dim", "8",
               "--window", "4", "--layers", "1", "--min-run-time", "0.01", "--no-progress", "--backend", "torch",
               "--json", str(json_path)])
    assert rc == 0
    rows = json.loads(json_path.read_text())["results"]
    assert {r["impl"] for r in rows} == {"stock", "patched:torch"}
    assert all(r["status"] == "ok" for r in rows if r["impl"] == "stock")
    for r in rows:
        if r["status"] == "ok":
            _assert_host_fields(r, json.loads(json_path.read_text())["settings"]["device"])
    assert all(r["status"] == "ok" or r["reason"] for r in rows)


# --- FLOP count against an independent brute-force count -------------------------------------------------

def _brute_force_keys(op, S, window, G_pos=(), blocks=0):
    """Mean attended keys from the explicit S x S pattern (DESIGN.md section 1 written out)."""
    left, right = window
    total = 0
    for i in range(S):
        if op == "longformer" and i in G_pos:
            total += S
            continue
        band = [j for j in range(S) if i - left <= j <= i + right and j not in G_pos]
        total += len(band) + len(G_pos) + blocks
    return total / S


@pytest.mark.parametrize("S,window,globals_", [(10, 2, 1), (7, 3, 2), (5, 9, 3), (12, 0, 1)])
def test_mean_keys_longformer(S, window, globals_):
    case = build_case("longformer", S, Settings(heads=1, head_dim=4, window=window, globals=globals_))
    pos = set(global_positions(S, globals_).tolist())
    assert flops.mean_attended_keys(case) == pytest.approx(_brute_force_keys("longformer", S, (window, window), pos))


@pytest.mark.parametrize("op,S,window,block", [("local", 9, 2, 4), ("tglobal", 10, 1, 3), ("tglobal", 3, 1, 4)])
def test_mean_keys_local_tglobal(op, S, window, block):
    case = build_case(op, S, Settings(heads=1, head_dim=4, window=window, block_size=block))
    blocks = S // block if op == "tglobal" else 0
    assert flops.mean_attended_keys(case) == pytest.approx(_brute_force_keys(op, S, (window, window), (), blocks))


def test_flop_formula_hand_computed():
    # S=4, window 1, no globals: rows attend 2, 3, 3, 2 keys -> mean 2.5; fwd = 4*B*H*S*2.5*D.
    case = build_case("local", 4, Settings(batch=2, heads=3, head_dim=8, window=1))
    assert flops.mean_attended_keys(case) == 2.5
    assert flops.attention_flops(case) == 4 * 2 * 3 * 4 * 2.5 * 8
    assert flops.pass_flops(100.0, "bwd") == 250.0 and flops.pass_flops(100.0, "fwdbwd") == 350.0
    assert flops.dense_flops(case) == 4 * 2 * 3 * 4 * 4 * 8


def test_nothing_touches_cuda_at_import():
    code = ("import longattn.bench.cli, longattn.bench.runner, longattn.bench.impls, longattn.bench.model, "
            "longattn.bench.report, torch; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_no_build_helpers_imported_at_run_time():
    """Running ops and the bench (no Flex: Inductor's CPU codegen is torch's business) never imports
    torch.utils.cpp_extension, whose import logs "No CUDA runtime is found, using CUDA_HOME=..."."""
    argv = [*TINY, "--op", "local,aggregate", "--device", "cpu", "--backend", "torch", "--baseline", "hf,sdpa_mask",
            "--pass", "fwd,fwdbwd"]
    code = ("import sys\nfrom longattn.cli import main\n"
            f"assert main({argv!r}) == 0\n"
            "build = ('torch.utils.cpp_extension', 'torch.utils.benchmark')\n"
            "loaded = [m for m in sys.modules if m.startswith(build)]\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "CUDA_HOME" not in proc.stderr + proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default shape")
def test_cpu_defaults(capsys):
    import argparse

    from longattn.bench.cli import add_parser, resolve_settings

    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    args = sub.choices["bench"].parse_args([])
    st = resolve_settings(args)
    assert st["device"] == "cpu" and st["seqlens"] == [1024] and st["heads"] == 4 and st["dtype"] == "float32"


# --- host overhead: the arithmetic, with fake timings -----------------------------------------------------

def _fake_gpu(monkeypatch, walls, gpu_times):
    """Replace (a) and (b) of ``timing.measure_host_overhead`` with fakes; returns the sleeps (b) was asked for."""
    walls, gpu_times, covers = iter(walls), iter(gpu_times), []

    def queued(fn, device, cover_s):
        covers.append(cover_s)
        return next(gpu_times)

    monkeypatch.setattr(timing, "_isolated_call", lambda fn, device: next(walls))
    monkeypatch.setattr(timing, "_queued_gpu_time", queued)
    return covers


def test_host_overhead_arithmetic_with_fake_timings(monkeypatch):
    """overhead = median of the isolated walls - median of the back-to-back GPU times; (b)'s sleep covers
    twice the median time the call took to return; fields in milliseconds."""
    # (a): (seconds until the call returned, seconds until synchronised)
    covers = _fake_gpu(monkeypatch, [(30e-6, 40e-6), (70e-6, 90e-6), (35e-6, 50e-6)], [12e-6, 10e-6, 11e-6])
    host = timing.measure_host_overhead(None, torch.device("cuda"), per_call_s=1e-3, budget_s=12e-3)  # 3 calls
    assert host.reason is None and host.wall_s == 50e-6 and host.gpu_s == 11e-6
    assert host.overhead_s == pytest.approx(39e-6) and covers == [timing.SLEEP_COVER * 35e-6] * 3
    f = host.fields()
    assert f["call_wall_ms"] == pytest.approx(0.05) and f["gpu_ms"] == pytest.approx(0.011)
    assert f["host_overhead_ms"] == pytest.approx(0.039) and "host_overhead_reason" not in f


@pytest.mark.parametrize("per_call_s,calls", [(1.0, 1), (1e-3, 3), (1e-6, 25)])
def test_host_overhead_calls_follow_the_budget(monkeypatch, per_call_s, calls):
    """About budget / (4 calls' time) samples of each, at least 1 (a slow op), at most 25 (a fast one)."""
    covers = _fake_gpu(monkeypatch, [(5e-5, 1e-4)] * 100, [1e-5] * 100)
    timing.measure_host_overhead(None, torch.device("cuda"), per_call_s=per_call_s, budget_s=12e-3)
    assert len(covers) == calls


def test_host_overhead_retries_then_gives_the_sync_reason(monkeypatch):
    """(b) None = the GPU caught up with the host: once more behind a 4x longer sleep, else no figure."""
    covers = _fake_gpu(monkeypatch, [(5e-5, 1e-4)], [None, 2e-5])
    host = timing.measure_host_overhead(None, torch.device("cuda"), per_call_s=1.0, budget_s=1e-3)
    assert host.gpu_s == 2e-5 and covers == [1e-4, 4e-4]
    _fake_gpu(monkeypatch, [(5e-5, 1e-4)], [None, None])
    host = timing.measure_host_overhead(None, torch.device("cuda"), per_call_s=1.0, budget_s=1e-3)
    assert host.wall_s == 1e-4 and host.gpu_s is None and host.reason == timing.HOST_OVERHEAD_SYNC_REASON
    f = host.fields()
    assert f["host_overhead_ms"] is None and f["call_wall_ms"] == pytest.approx(0.1)
    assert f["host_overhead_reason"] == timing.HOST_OVERHEAD_SYNC_REASON


def test_host_overhead_failure_keeps_the_row(monkeypatch):
    def broken(fn, device):
        raise RuntimeError("no sleep kernel\nmore")

    monkeypatch.setattr(timing, "_isolated_call", broken)
    host = timing.measure_host_overhead(None, torch.device("cuda"), per_call_s=1e-3, budget_s=1e-2)
    assert host.overhead_s is None and host.reason == "not measured (RuntimeError: no sleep kernel)"


def test_host_overhead_on_cpu_is_empty_with_the_reason():
    t = timing.time_call(lambda: None, torch.device("cpu"), min_run_time=0.001, host_overhead=True)
    assert t.host.reason == timing.HOST_OVERHEAD_CPU_REASON and t.host.overhead_s is None
    fields = t.fields()
    assert fields["host_overhead_ms"] is None and fields["host_overhead_reason"] == timing.HOST_OVERHEAD_CPU_REASON
    assert "host_overhead_ms" not in timing.time_call(lambda: None, torch.device("cpu"), min_run_time=0.001).fields()


# --- --model modernbert|mistral|gemma3: attention implementations of one HF model --------------------------

HF_TINY = ["bench", "--seqlen", "64", "--min-run-time", "0.01", "--no-progress", "--baseline", "sdpa,eager",
           "--backend", "torch,cuda", "--device", "cpu"]


def test_hf_model_mode_rows_reasons_and_longattn_count(tmp_path, capsys):
    """ModernBERT tiny (one global, two sliding layers): every stock row timed, the longattn row timed with 2 of 3
    attention calls counted on longattn's band op, the unavailable backend listed with its reason."""
    json_path, csv_path = tmp_path / "m.json", tmp_path / "m.csv"
    assert main([*HF_TINY, "--model", "modernbert", "--json", str(json_path), "--csv", str(csv_path)]) == 0
    out = capsys.readouterr()
    run = json.loads(json_path.read_text())
    rows = run["results"]
    assert run["settings"]["size"] == "tiny" and run["settings"]["layers"] == 3
    assert "3 layers (2 sliding, 1 global)" in run["settings"]["model_config"] in out.err
    assert {r["impl"] for r in rows} == {"sdpa", "eager", "longattn:torch", "longattn:cuda"}
    assert {(r["impl"], r["pass"]) for r in rows if r["status"] == "ok"} == {
        (i, p) for i in ("sdpa", "eager", "longattn:torch") for p in ("fwd", "fwdbwd")}
    for r in rows:
        if r["status"] == "ok":
            assert r["time_ms"] > 0 and r["best_baseline"] in ("sdpa", "eager") and r["vs_best_baseline"] > 0
    assert all(r["status"] == "unavailable" and "CUDA" in r["reason"] for r in rows if r["impl"] == "longattn:cuda")
    torch_rows = [r for r in rows if r["impl"] == "longattn:torch"]
    assert all(r["longattn_calls"] == 2 and r["attn_calls"] == 3 for r in torch_rows)
    assert all("1x global attention" in r["delegated"] for r in torch_rows)
    assert "longattn:torch   S=64: 2 of 3 attention calls per forward ran on longattn" in out.out
    assert all("longattn_calls" not in r for r in rows if not r["impl"].startswith("longattn"))
    with open(csv_path) as f:
        assert {r["longattn_calls"] for r in csv.DictReader(f) if r["impl"] == "longattn:torch"} == {"2"}


def test_hf_model_mode_grouped_kv_runs_on_longattn(tmp_path):
    """Default: the config's K/V heads (said in the settings; the tiny config has one per query head). With
    --kv-heads below the query heads (grouped-query attention) the sliding layers still run on longattn."""
    json_path = tmp_path / "m.json"
    argv = [*HF_TINY, "--model", "mistral", "--backend", "torch", "--pass", "fwd", "--json", str(json_path)]
    assert main(argv) == 0
    run = json.loads(json_path.read_text())
    assert "num_key_value_heads=4 of 4 query heads" in run["settings"]["model_config"]
    assert [r["longattn_calls"] for r in run["results"] if r["impl"] == "longattn:torch"] == [2]
    assert main([*argv, "--kv-heads", "2"]) == 0
    run = json.loads(json_path.read_text())
    assert "num_key_value_heads=2 of 4 query heads" in run["settings"]["model_config"]
    assert [r["longattn_calls"] for r in run["results"] if r["impl"] == "longattn:torch"] == [2]


def test_hf_model_pass_blockers():
    """FlexAttention's missing CPU backward and eager's S x S weights past the memory budget are reasons, checked
    before any timing."""
    from longattn.bench.hf_model import HFModelBench, eager_bytes
    from longattn.hf_models import build_hf_config

    settings = {"model": "mistral", "size": "tiny", "baselines": ["sdpa", "flex_attention", "eager"],
                "backends": []}
    bench = HFModelBench(settings, Settings(device="cpu"))
    model = type("M", (), {"config": build_hf_config("mistral", num_hidden_layers=2)})()
    assert "no backward on CPU" in bench.pass_blocker("flex_attention", "fwdbwd", 64, model)
    assert bench.pass_blocker("flex_attention", "fwd", 64, model) is None
    assert bench.pass_blocker("eager", "fwdbwd", 64, model) is None
    assert "GiB of S x S attention weights" in bench.pass_blocker("eager", "fwd", 1 << 22, model)
    # fp32, 4 heads, S=8: per layer scores + fp32 softmax, 2 layers saved in fwd+bwd, plus the masks.
    assert eager_bytes(model.config, 1, 8, torch.float32, "fwdbwd") == 4 * 64 * ((4 + 4) * 2 + 2 * 4) + 64 * 4


def test_hf_model_options_only_in_hf_modes():
    with pytest.raises(SystemExit, match="--kv-heads"):
        main(["bench", "--model", "led", "--kv-heads", "2", "--no-progress"])


def test_report_of_an_hf_model_run():
    """A saved --model modernbert run renders its settings, the fastest stock baseline and the longattn count."""
    rows = [{"S": 8192, "impl": "sdpa", "pass": "fwdbwd", "status": "ok", "time_ms": 10.0, "peak_mem_bytes": 2**20,
             "vs_best_baseline": 1.0},
            {"S": 8192, "impl": "longattn:cuda", "pass": "fwdbwd", "status": "ok", "time_ms": 5.0,
             "peak_mem_bytes": 2**20, "vs_best_baseline": 2.0, "longattn_calls": 2, "attn_calls": 3},
            {"S": 8192, "impl": "eager", "pass": "fwdbwd", "status": "unavailable", "reason": "too big"}]
    run = {**_gpu_run(rows), "settings": {"mode": "model", "model": "modernbert", "layers": 3, "seqlens": [8192],
                                          "dtype": "bfloat16", "model_config": "model: modernbert (base)\nK/V"}}
    text = report.model_markdown(run, "x.json")
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert "(3 layers," in text and "model: modernbert (base). K/V" in text
    assert "| vs best stock | on longattn |" in table[0] and len({line.count("|") for line in table}) == 1
    assert "| 8192 | longattn:cuda | forward+backward | 5.00 | 1 | 2.00× | 2/3 |" in table


def test_git_commit_prefers_the_commit_the_tree_was_sent_from(monkeypatch):
    """A GPU machine's copy of the tree can carry a stale ``.git``: the commit named in LONGATTN_GIT_COMMIT wins."""
    from longattn.bench import output

    monkeypatch.setenv("LONGATTN_GIT_COMMIT", "abc1234")
    assert output.git_commit() == "abc1234"
    monkeypatch.delenv("LONGATTN_GIT_COMMIT")
    sha = output.git_commit()
    assert sha is None or (len(sha.split("+")[0]) == 40 and sha != "abc1234")


def test_no_bias_drops_the_tables_and_times_the_backends_only(tmp_path):
    """``--no-bias``: local / tglobal without their bias tables (the other inputs drawn as with them), checked against
    the oracle without them; the baselines built with the tables say so instead of timing another function."""
    biased, plain = (build_case("tglobal", 64, Settings(heads=2, head_dim=16, bias=b)) for b in (True, False))
    assert {"rel_bias", "side_bias"} <= biased.tensors.keys() and not {"rel_bias", "side_bias"} & plain.tensors.keys()
    assert torch.equal(biased.tensors["q"], plain.tensors["q"])
    with pytest.raises(impls.Unavailable, match="bias tables"):
        impls.make("flex", plain, grad=False)
    out = tmp_path / "nobias.json"
    assert main(["bench", "--op", "local,tglobal", "--seqlen", "64", "--heads", "2", "--no-bias", "--pass", "fwd",
                 "--backend", "torch", "--baseline", "hf,sdpa_mask", "--check", "--min-run-time", "0.01",
                 "--no-progress", "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    assert run["settings"]["bias"] is False
    rows = {(r["op"], r["impl"]): r for r in run["results"]}
    for op in ("local", "tglobal"):
        assert rows[(op, "longattn:torch")]["check"].startswith("ok")
        assert rows[(op, "hf")]["status"] == "unavailable" and "bias tables" in rows[(op, "hf")]["reason"]
