"""The plumbing of ``benchmarks/profile_ops.py`` (its figures are GPU kernels; here it lists aten ops) and of
``benchmarks/host_profile.py``'s per-call breakdown, on CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str = "profile_ops"):
    """``benchmarks/<name>.py`` as a module (the benchmark scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cpu_run_lists_each_pass_and_writes_the_run(tmp_path, capsys):
    if torch.cuda.is_available():
        import pytest

        pytest.skip("the CPU plumbing run: on a GPU the script profiles the standard shapes")
    po = _load()
    out = tmp_path / "profile.json"
    assert po.main(["--seqlen", "64", "--op", "local,longformer,aggregate", "--globals", "1,3",
                    "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    assert run["device_type"] == "cpu" and run["settings"]["mode"] == "profile-ops"
    rows = run["results"]
    assert [(r["op"], r.get("globals"), r["pass"]) for r in rows] == [
        ("local", None, "fwd"), ("local", None, "bwd"), ("longformer", 1, "fwd"), ("longformer", 1, "bwd"),
        ("longformer", 3, "fwd"), ("longformer", 3, "bwd"), ("aggregate", None, "fwd"), ("aggregate", None, "bwd")]
    for r in rows:
        assert r["status"] == "ok" and r["launches_per_call"] > 0 and r["us_per_call"] > 0
        names = [a["name"] for a in r["activities"]]
        assert all(n.startswith("aten::") for n in names) and len(names) == len(set(names))
        assert abs(sum(a["per_call"] for a in r["activities"]) - r["launches_per_call"]) < 1e-9
    # The outermost ops only: a matmul's inner bmm is not listed beside it.
    assert "aten::bmm" not in {a["name"] for a in rows[0]["activities"]} or \
        "aten::matmul" not in {a["name"] for a in rows[0]["activities"]}
    assert "local" in capsys.readouterr().out


def test_window_and_no_bias_reach_the_profiled_cases(tmp_path, monkeypatch):
    """Target 4's profile (``gpu_check``'s profile-globals): the local op at Longformer's window, without its table."""
    po = _load()
    seen = []
    real = po.build_case
    monkeypatch.setattr(po, "build_case", lambda op, S, st: seen.append((op, st.window, st.bias)) or real(op, S, st))
    out = tmp_path / "profile.json"
    po.main(["--seqlen", "48", "--op", "local,longformer", "--backend", "torch", "--no-bias", "--window", "6",
             "--globals", "2", "--json", str(out)])
    assert seen == [("local", 6, False), ("longformer", 6, False)]
    settings = json.loads(out.read_text())["settings"]
    assert settings["window"] == 6 and settings["bias"] is False
    rows = json.loads(out.read_text())["results"]
    assert [r["status"] for r in rows] == ["ok"] * 4


def test_host_profile_plumbing_on_cpu(tmp_path, capsys):
    hp = _load("host_profile")
    if torch.cuda.is_available():
        import pytest

        pytest.skip("the CPU plumbing run: on a GPU the script profiles the kernel backends")
    out = tmp_path / "host.txt"
    assert hp.main(["--seqlen", "32", "--op", "aggregate", "--calls", "3", "--top", "5", "--out", str(out)]) == 0
    text = out.read_text()
    assert "aggregate  torch  fwd" in text and "aggregate  torch  fwdbwd" in text
    assert text.count("==== aggregate torch") == 2 and "Ordered by: internal time" in text
    assert "us per call" in capsys.readouterr().out


def test_breakdown_times_and_profiles_ops_on_other_threads():
    """A CUDA op's backward runs on the autograd engine's device thread: the breakdown must time and profile op
    implementations there too (here a worker thread runs a torch-backend op on CPU), and restore what it wraps."""
    import threading

    import longattn
    from longattn import _ops

    hp = _load("host_profile")
    original = _ops._call
    q = torch.randn(1, 16, 2, 8, requires_grad=True)

    def call():
        out = longattn.local_attention(q, q, q, 3, backend="torch")
        torch.autograd.grad(out.sum(), q)

    breakdown = hp.Breakdown(profile_other_threads=True).install()
    try:
        call()
        assert breakdown.seconds["ops_main"] > 0 and breakdown.seconds["ops_other"] == 0
        worker = threading.Thread(target=call)
        worker.start()
        worker.join()
        assert breakdown.seconds["ops_other"] > 0
        if sys.version_info < (3, 12):  # from 3.12 cProfile is process-wide: no per-thread profiler is needed
            (profiler,) = breakdown.profilers.values()
            assert any("local" in str(entry.code) or "band_side" in str(entry.code) for entry in profiler.getstats())
        line = breakdown.line(2, 1e-3)
        assert "other threads" in line and "missed 0" in line
    finally:
        breakdown.uninstall()
    assert _ops._call is original


def count_steady_state_launches():
    """Child process (no TRITON_INTERPRET; Triton's launch path emulated for sm_90): after a warm-up call, a
    Triton-backend local fwd+bwd makes its launches from longattn's launch cache, none through Triton's own path."""
    import longattn
    from tests.triton_emulation import EmulatedTriton

    hp = _load("host_profile")
    emulation = EmulatedTriton(record=False).install()
    breakdown = hp.Breakdown().install()
    try:
        q = torch.randn(1, 48, 2, 16, requires_grad=True)
        bias = torch.randn(2, 11, requires_grad=True)

        def call():
            out = longattn.local_attention(q, q, q, 5, rel_bias=bias, backend="triton")
            torch.autograd.grad(out, (q, bias), torch.ones_like(out))

        call()
        assert breakdown.counts["first"] > 0 and breakdown.counts["jit.run"] == breakdown.counts["first"]
        breakdown.reset()
        call()
        assert breakdown.counts["launch"] >= 3 and breakdown.counts["first"] == 0 and breakdown.counts["jit.run"] == 0
        assert breakdown.seconds["launch"] > 0
    finally:
        breakdown.uninstall()
        emulation.uninstall()


def test_breakdown_counts_cached_and_missed_triton_launches():
    from tests.conftest import run_sm90_compile

    run_sm90_compile("tests.test_profile_ops:count_steady_state_launches")


def check_launch_probe():
    """``benchmarks/launch_probe.py`` with Triton's launch path emulated for sm_90 (its CPU plumbing): one line per
    launch kind with both threads' figures, the launches going through longattn's launch cache."""
    from tests.triton_emulation import EmulatedTriton

    emulation = EmulatedTriton().install()
    try:
        lines = _load("launch_probe").probe(torch.device("cpu"), calls=3)
    finally:
        emulation.uninstall()
    assert [line.split("  ")[0].strip() for line in lines] == ["launch, 1 pointer", "launch, 24 pointers",
                                                                "torch add_"]
    assert all("calling thread" in line and "in autograd backward" in line for line in lines)
    # first calls (1 per kernel) through Triton's path, then 3 + 3 cached launches of each: all recorded
    assert emulation.misses == 2 and len(emulation.launches) == 2 * 7
    assert [len(launch.args) for launch in emulation.launches] == [2] * 7 + [25] * 7  # the pointers and BLOCK


def test_launch_probe_plumbing():
    from tests.conftest import run_sm90_compile

    run_sm90_compile("tests.test_profile_ops:check_launch_probe")

