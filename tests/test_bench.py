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

from longattn.bench import flops
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


def test_check_errors_within_bound(checked_run):
    _, run = checked_run
    checked = [r for r in run["results"] if r["status"] == "ok" and "check_max_err" in r]
    assert {r["impl"] for r in checked} >= {"longattn:torch", "hf", "sdpa_mask"}
    for r in checked:
        assert r["check"] == "ok" and r["check_max_err"] < 1e-4, r
    dense = [r for r in run["results"] if r["impl"] == "sdpa_dense" and r["status"] == "ok"]
    assert all(r["check"].startswith("n/a") for r in dense)


def test_unavailable_backends_listed_with_reason(checked_run):
    _, run = checked_run
    rows = {r["impl"]: r for r in run["results"] if r["op"] == "local"}
    for name, reasons in run["backends"].items():
        row = rows[f"longattn:{name}"]
        if reasons:
            assert row["status"] == "unavailable" and row["reason"]
        else:
            assert row["status"] == "ok"
    agg = [r for r in run["results"] if r["op"] == "aggregate" and r["impl"] == "sdpa_dense"]
    assert agg and all(r["status"] == "unavailable" and r["reason"] for r in agg)


def test_csv_written(checked_run):
    (json_path, csv_path), run = checked_run
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(run["results"]) and {"op", "S", "impl", "pass", "time_ms", "tflops"} <= set(rows[0])


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
    main([*TINY, "--op", "local", "--baseline", "sdpa_dense", "--pass", "fwd"])
    out = capsys.readouterr().out
    assert "longattn:torch" in out and "sdpa_dense" in out and "TFLOP/s" in out
    if any(longattn_reasons for longattn_reasons in __import__("longattn").available_backends("cpu").values()):
        assert "not run:" in out


def test_flex_on_cpu_forward_or_reason(tmp_path):
    json_path, _ = _run(tmp_path, "--op", "local", "--backend", "none", "--baseline", "flex")
    rows = json.loads(json_path.read_text())["results"]
    for r in rows:
        assert r["status"] == "ok" or r["reason"]


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "longattn", "bench", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--seqlen" in proc.stdout


def test_report_without_gpu_results(tmp_path, capsys):
    assert main(["bench", "--report", "--results-dir", str(tmp_path)]) == 0
    assert "No GPU results" in capsys.readouterr().out


def test_save_refuses_cpu_runs(tmp_path):
    rc = main([*TINY, "--op", "aggregate", "--baseline", "none", "--pass", "fwd", "--save", "--results-dir",
               str(tmp_path)])
    assert rc == 2 and not list(tmp_path.iterdir())


def test_model_mode_lists_patched_rows(tmp_path):
    json_path = tmp_path / "m.json"
    rc = main(["bench", "--model", "longt5-local", "--seqlen", "32", "--heads", "2", "--head-dim", "8",
               "--window", "4", "--layers", "1", "--min-run-time", "0.01", "--no-progress", "--backend", "torch",
               "--json", str(json_path)])
    assert rc == 0
    rows = json.loads(json_path.read_text())["results"]
    assert {r["impl"] for r in rows} == {"stock", "patched:torch"}
    assert all(r["status"] == "ok" for r in rows if r["impl"] == "stock")
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default shape")
def test_cpu_defaults(capsys):
    import argparse

    from longattn.bench.cli import add_parser, resolve_settings

    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    args = sub.choices["bench"].parse_args([])
    st = resolve_settings(args)
    assert st["device"] == "cpu" and st["seqlens"] == [1024] and st["heads"] == 4 and st["dtype"] == "float32"
