"""``benchmarks/gpu_check.sh``'s plumbing on CPU: arguments, the time budget, skipped GPU steps, the summary.

The GPU steps themselves (build, GPU tests, compute-sanitizer, bench) only run on a GPU machine; here they
are skipped (CUDA_VISIBLE_DEVICES="" hides any GPU) or replaced by small shell commands.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gc = _load()


def _script(*args, timeout=300):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("args,message", [((), "outdir"), (("OUT", "--budget", "0"), "--budget"),
                                          (("OUT", "--budget", "ten"), "--budget")])
def test_bad_arguments_exit_2(tmp_path, args, message):
    args = tuple(str(tmp_path / a) if a == "OUT" else a for a in args)
    proc = _script(*args)
    assert proc.returncode == 2 and message in proc.stderr


def test_cpu_run_skips_gpu_steps_and_prints_summary_last(tmp_path):
    out = tmp_path / "out"
    proc = _script(str(out), "--budget", "120", "--skip", "racecheck")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outcomes = {line.split()[0]: line for line in proc.stdout.splitlines()
                if line.split() and line.split()[0] in {"env", "build", "tests", "memcheck", "racecheck", "tune",
                                                        "results"}
                or line.startswith("bench-")}
    assert outcomes["env"].split()[1] == "ok"
    for step in ("build", "tests", "memcheck", "bench-16384", "bench-4096", "bench-65536", "bench-globals",
                 "bench-memory", "bench-bias", "bench-host", "tune"):
        assert "skipped: no CUDA GPU visible" in outcomes[step], outcomes[step]
    assert "skipped: no CUDA GPU visible" in next(line for line in proc.stdout.splitlines()
                                                  if line.startswith("profile "))
    assert "skipped: --skip" in outcomes["racecheck"]
    assert "no bench results" in outcomes["results"]
    assert "bench: no results" in proc.stdout
    last = proc.stdout.rstrip().splitlines()[-1]  # the summary is the last thing printed, issue 12's targets last
    assert last.startswith("  6 fwd+bwd peak") and last.endswith("not measured")
    assert (out / "summary.txt").read_text().strip() == proc.stdout[proc.stdout.index("== gpu_check"):].strip()
    assert "longattn" in (out / "env.log").read_text()


def test_unknown_skip_is_refused(tmp_path):
    proc = _script(str(tmp_path), "--skip", "nosuchstep")
    assert proc.returncode == 2 and "nosuchstep" in proc.stderr


def test_budget_skips_what_cannot_fit_and_stops_what_overruns(tmp_path):
    steps = [
        gc.Step("quick", 0, 60, cmd=["bash", "-c", "echo hello"]),
        gc.Step("limit", 0, 60, cmd=["bash", "-c", f"echo ${gc.STEP_LIMIT_ENV}"]),
        gc.Step("fails", 0, 60, cmd=["bash", "-c", "exit 4"]),
        gc.Step("gpu", 0, 60, needs_gpu=True, cmd=["true"]),
        gc.Step("huge", 10_000, 60, cmd=["true"]),
        gc.Step("broken", 0, 60, fn=lambda: 1 / 0),
        gc.Step("overrun", 0, 60, cmd=["bash", "-c", "sleep 60 & wait"]),  # a child too: the group is stopped
        gc.Step("late", 0, 60, fn=lambda: "ran"),
    ]
    outcomes = gc.run_steps(steps, tmp_path, budget_s=gc.SUMMARY_RESERVE_S + 3, have_gpu=None)
    status = {o.name: o.status for o in outcomes}
    assert status["quick"] == "ok" and (tmp_path / "quick.log").read_text() == "hello\n"
    assert 0 < int((tmp_path / "limit.log").read_text()) <= 3  # a command step is told its limit
    assert status["fails"] == "FAILED (rc 4)"
    assert status["gpu"] == "skipped: no CUDA GPU visible"
    assert status["huge"].startswith("skipped: would not fit")
    assert status["overrun"].startswith("stopped at budget")
    assert status["broken"] == "FAILED" and "ZeroDivisionError" in outcomes[5].note
    # The budget is spent: what comes after an overrun cannot start.
    assert status["late"].startswith("skipped: would not fit")


def _record(op, S, impl, which, ms, **extra):
    kind = "longattn" if impl.startswith("longattn:") else "baseline"
    return {"op": op, "S": S, "impl": impl, "kind": kind, "pass": which, "status": "ok", "time_ms": ms,
            "check": "ok", **extra}


def test_summary_compares_best_backend_with_best_fair_baseline(tmp_path):
    for S, records in {4096: [_record("local", 4096, "longattn:cuda", "fwd", 1.0),
                              _record("local", 4096, "flex", "fwd", 2.0)],
                       16384: [_record("longformer", 16384, "longattn:triton", "fwd", 2.0),
                               _record("longformer", 16384, "longattn:cuda", "fwd", 4.0, check="FAIL"),
                               _record("longformer", 16384, "flex", "fwd", 0.5, caveat="unfair"),
                               _record("longformer", 16384, "sdpa_dense", "fwd", 0.1),
                               _record("longformer", 16384, "sdpa_mask", "fwd", 3.0)]}.items():
        run = {"device_type": "cuda", "settings": {"seqlens": [S]}, "results": records}
        (tmp_path / f"bench-{S}.json").write_text(json.dumps(run))
    merged = gc.merge_bench(tmp_path)
    assert merged["settings"]["seqlens"] == [4096, 16384] and len(merged["results"]) == 7
    lines = gc.bench_summary(merged)
    local = next(line for line in lines if line.startswith("local"))
    longformer = next(line for line in lines if line.startswith("longformer"))
    assert "cuda 1.000 ms" in local and "flex 2.000 ms" in local and "2.00x" in local and local.endswith("ok")
    # The caveated Flex row and dense SDPA (another function) are never "the best baseline".
    assert "triton 2.000 ms" in longformer and "sdpa_mask 3.000 ms" in longformer and "1.50x" in longformer
    assert longformer.endswith("FAIL: longattn:cuda")


def test_results_step_saves_run_refreshes_table_and_report(tmp_path, monkeypatch):
    """The last step on a GPU run's bench output (the saved H100 run stands in for it)."""
    pytest.importorskip("matplotlib", reason="the report writes a plot (the bench extra)")
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.setattr(gc, "ROOT", repo)
    out = tmp_path / "out"
    out.mkdir()
    h100 = json.loads(next((ROOT / "benchmarks" / "results").glob("*_NVIDIA-H100-80GB-HBM3_ops.json")).read_text())
    (out / "bench-16384.json").write_text(json.dumps(h100))
    note = gc.collect_results(sys.executable, out)
    assert "failed" not in note, note
    saved = list((repo / "benchmarks" / "results").glob("*_ops.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["results"] == h100["results"]
    table = json.loads((out / "auto_table.json").read_text())
    assert table["sources"][0]["file"] == str(saved[0].relative_to(repo))
    assert table["size_classes"]["measured_seqlens"] == [16384]
    report = (out / "results.md").read_text()
    assert saved[0].name in report and "longattn:cuda" in report


def test_bench_commands_parse_and_cover_the_standard_shapes(tmp_path):
    from longattn.bench.cli import resolve_settings
    from longattn.cli import build_parser

    steps = {s.name: s for s in gc.make_steps(gc.parse_args([str(tmp_path)]), tmp_path, "9.0")}
    assert steps["build"].env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    seen = set()
    for S in gc.BENCH_SEQLENS:
        cmd = steps[f"bench-{S}"].cmd
        assert cmd[1:3] == ["-m", "longattn"]
        st = resolve_settings(build_parser().parse_args(cmd[3:]))
        assert st["ops"] == ["local", "longformer", "tglobal", "aggregate"] and st["passes"] == ["fwd", "fwdbwd"]
        assert st["check"] and st["seqlens"] == [S]
        assert ("torch" in st["backends"]) == (S <= gc.TORCH_ABOVE)
        assert ("hf" in st["baselines"]) == (S <= gc.SLOW_ABOVE)
        assert {"triton", "cuda"} <= set(st["backends"]) and {"flex", "sdpa_dense"} <= set(st["baselines"])
        seen.add(S)
    assert seen == {4096, 16384, 65536}


def test_step_order_puts_the_tile_sweep_after_the_benches_and_before_results(tmp_path):
    steps = gc.make_steps(gc.parse_args([str(tmp_path)]), tmp_path, "9.0")
    names = [s.name for s in steps]
    assert names.index("tune") == len(names) - 2 and names[-1] == "results"
    assert max(i for i, n in enumerate(names) if n.startswith("bench")) < names.index("tune")
    tune = steps[names.index("tune")]
    assert tune.needs_gpu and tune.cap_s == gc.TUNE_CAP_S and tune.min_s < tune.cap_s
    spec = importlib.util.spec_from_file_location("tune_triton", tune.cmd[1])
    tt = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tt
    spec.loader.exec_module(tt)
    args = tt.parse_args(tune.cmd[2:])
    assert args.json == str(tmp_path / "tune-triton.json") and args.budget <= gc.TUNE_CAP_S
    assert args.seqlen == 16384 and args.head_dims == [64, 128] and args.configs is None


def test_extra_runs_are_saved_as_their_own_files_and_summarised(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.setattr(gc, "ROOT", repo)
    out = tmp_path / "out"
    out.mkdir()
    info = {"timestamp": "2026-12-01T10:00:00+00:00", "device": "cuda:0 NVIDIA H200 (sm_90, 139 GiB)",
            "device_type": "cuda"}
    halo = {**info, "settings": {"seqlen": 131072}, "results": [{"backend": "triton", "status": "not run",
                                                                   "reason": "x"}]}
    tune = {**info, "settings": {"mode": "tune-triton"}, "stopped": "budget", "results": [],
            "table": ["op  D pass ...", "local 64 fwdbwd 64x64/8w 1.000 128x64/8w 0.800 1.25x 3/0/5"]}
    (out / "bench-halo.json").write_text(json.dumps(halo))
    (out / "tune-triton.json").write_text(json.dumps(tune))
    note = gc.collect_results(sys.executable, out)
    saved = sorted(p.name for p in (repo / "benchmarks" / "results").glob("*.json"))
    assert saved == ["2026-12-01T100000_NVIDIA-H200_bench-halo.json", "2026-12-01T100000_NVIDIA-H200_tune-triton.json"]
    assert all(name in note for name in saved) and "no bench results" in note
    lines = gc.tune_summary(out)
    assert "budget" in lines[1] and lines[2:] == tune["table"]
    (out / "tune-triton.json").write_text(json.dumps({**tune, "device_type": "cpu"}))
    assert gc.save_run(json.loads((out / "tune-triton.json").read_text()), "tune-triton.json").endswith("not saved)")


def _bench_runs(step) -> list:
    """The ``longattn bench`` settings of each run in a ``bash -c`` step."""
    import shlex

    from longattn.bench.cli import resolve_settings
    from longattn.cli import build_parser

    assert step.cmd[:2] == ["bash", "-c"]
    return [(resolve_settings(build_parser().parse_args(shlex.split(run)[3:])), shlex.split(run)[-1])
            for run in step.cmd[2].split("; ")]


def test_target_commands_parse(tmp_path):
    steps = {s.name: s for s in gc.make_steps(gc.parse_args([str(tmp_path)]), tmp_path, "9.0")}
    runs = _bench_runs(steps["bench-globals"])
    assert len(runs) == len(gc.GLOBALS_COUNTS)
    for g, (st, out) in zip(gc.GLOBALS_COUNTS, runs):
        assert st["ops"] == ["local", "longformer"] and st["window"] == 256 and st["globals"] == g
        assert st["seqlens"] == [16384] and st["passes"] == ["fwdbwd"] and st["backends"] == ["triton", "cuda"]
        assert not st["bias"] and st["baselines"] == [] and out.endswith(f"bench-globals-{g}.json")
    (st, _), = _bench_runs(steps["bench-memory"])
    assert st["seqlens"] == [gc.MEMORY_SEQLEN] and st["passes"] == ["fwdbwd"] and st["baselines"] == []
    (on, on_out), (off, off_out) = _bench_runs(steps["bench-bias"])
    assert on["bias"] and not off["bias"] and on["ops"] == off["ops"] == ["tglobal"] and on["passes"] == ["bwd"]
    assert on_out.endswith("bench-bias-on.json") and off_out.endswith("bench-bias-off.json")
    default_cmd, staged_cmd = steps["bench-kv-stages"].cmd[2].split("; ")
    assert staged_cmd.startswith("LONGATTN_TRITON_KV_STAGES=1 ") and "KV_STAGES" not in default_cmd
    (default, default_out), (staged, staged_out) = _bench_runs(
        gc.Step("x", 1, 1, cmd=["bash", "-c", f"{default_cmd}; {staged_cmd.split(' ', 1)[1]}"]))
    assert default == staged and default["passes"] == ["bwd"] and default["backends"] == ["triton"]
    assert default["ops"] == ["local", "tglobal", "longformer"] and default["seqlens"] == [16384]
    assert default_out.endswith("bench-kv-default.json") and staged_out.endswith("bench-kv-stages-1.json")
    (st, _), = _bench_runs(steps["bench-host"])
    assert st["seqlens"] == [gc.HOST_SEQLEN] and st["passes"] == ["fwd", "fwdbwd"] and len(st["ops"]) == 4
    assert st["baselines"] == ["sdpa_dense"]  # torch's own host cost on the same machine, the floor
    (plain, out), = _bench_runs(steps["bench-host-launch"])
    assert steps["bench-host-launch"].env == {"LONGATTN_TRITON_LAUNCH": "triton"} and plain["backends"] == ["triton"]
    same = lambda settings: {k: v for k, v in settings.items() if k not in ("backends", "baselines")}  # noqa: E731
    assert same(plain) == same(st) and plain["baselines"] == []
    assert out.endswith("bench-host-triton-launch.json")
    plain, globals_ = (shlex.split(c) for c in steps["profile"].cmd[2].split("; "))
    assert plain[1].endswith("profile_ops.py") and plain[-1].endswith("profile-ops.json")
    assert globals_[1].endswith("profile_ops.py") and globals_[-1].endswith("profile-globals.json")
    assert "--no-bias" in globals_ and globals_[globals_.index("--window") + 1] == "256"
    assert globals_[globals_.index("--globals") + 1] == ",".join(map(str, gc.GLOBALS_COUNTS))


def test_targets_summary_sets_each_measured_value_beside_its_bound(tmp_path):
    settings = {"mode": "ops", "batch": 1, "heads": 2, "head_dim": 4, "dtype": "bfloat16", "block_size": 16}
    for g, lf in ((1, 1.1), (64, 1.5)):
        run = {"settings": settings, "results": [_record("local", 16384, "longattn:cuda", "fwdbwd", 1.0, fwd_flops=8.0),
                                                  _record("longformer", 16384, "longattn:cuda", "fwdbwd", lf,
                                                          fwd_flops=8.0 + g / 8),
                                                  _record("longformer", 16384, "longattn:cuda", "fwd", 9.0)]}
        (tmp_path / f"bench-globals-{g}.json").write_text(json.dumps(run))
    bench = {"settings": settings, "results": [
        _record("tglobal", 16384, "longattn:triton", "fwdbwd", 3.0, host_overhead_ms=0.5),
        _record("tglobal", 16384, "longattn:cuda", "fwdbwd", 2.0, host_overhead_ms=0.7)]}
    (tmp_path / "bench-16384.json").write_text(json.dumps(bench))
    host = {"settings": settings,
            "results": [_record("local", 512, "longattn:cuda", "fwd", 0.1, host_overhead_ms=0.03)]}
    host["results"].append(_record("local", 512, "longattn:triton", "fwd", 0.1, host_overhead_ms=0.04))
    host["results"] += [_record("local", 512, "sdpa_dense", p, 0.1, host_overhead_ms=ms)
                        for p, ms in (("fwd", 0.025), ("fwdbwd", 0.3))]
    (tmp_path / "bench-host.json").write_text(json.dumps(host))
    plain = {"settings": settings,
             "results": [_record("local", 512, "longattn:triton", "fwd", 0.1, host_overhead_ms=0.09)]}
    (tmp_path / "bench-host-triton-launch.json").write_text(json.dumps(plain))
    for name, ms in (("on", 2.0), ("off", 1.9)):
        run = {"settings": settings, "results": [_record("tglobal", 16384, "longattn:triton", "bwd", ms)]}
        (tmp_path / f"bench-bias-{name}.json").write_text(json.dumps(run))
    t = 2 * 131072 * 2 * 4 * 2  # B * S * H * D bytes (bf16)
    memory = {"settings": settings, "results": [
        _record("local", 131072, "longattn:cuda", "fwdbwd", 1.0, peak_mem_bytes=5 * t),
        _record("tglobal", 131072, "longattn:cuda", "fwdbwd", 1.0, peak_mem_bytes=4 * t + 2 * t // 16)]}
    memory["results"][0]["S"] = memory["results"][1]["S"] = 131072 * 2  # B = 1 here: twice the tokens
    (tmp_path / "bench-memory.json").write_text(json.dumps(memory))
    profile = {"results": [{"op": "longformer", "globals": 64, "backend": "cuda", "pass": "fwd", "status": "ok",
                            "us_per_call": 5.0, "launches_per_call": 4, "activities": []}]}
    (tmp_path / "profile-ops.json").write_text(json.dumps(profile))

    def prof(op, which, us, kernels, **extra):
        return {"op": op, "backend": "triton", "pass": which, "status": "ok", "us_per_call": us, **extra,
                "activities": [{"name": n, "per_call": 1, "us_per_call": t} for n, t in kernels]}

    by_kernel = {"results": [prof("local", "fwd", 200.0, [("_rows_kernel", 200.0)]),
                             prof("local", "bwd", 600.0, [("_rows_kernel", 250.0), ("_keys_kernel", 350.0)]),
                             prof("longformer", "fwd", 250.0, [("_rows_kernel", 240.0), ("_slots_kernel", 10.0)],
                                  globals=1),
                             prof("longformer", "bwd", 750.0, [("_rows_kernel", 260.0), ("_keys_kernel", 490.0)],
                                  globals=1)]}
    (tmp_path / "profile-globals.json").write_text(json.dumps(by_kernel))
    for name, ms in (("default", 1.5), ("stages-1", 1.25)):
        run = {"settings": settings, "results": [_record("local", 16384, "longattn:triton", "bwd", ms)]}
        (tmp_path / f"bench-kv-{name}.json").write_text(json.dumps(run))
    lines = gc.targets_summary(tmp_path)
    text = "\n".join(lines)
    assert "1 globals (<= 1.15x): cuda 1.10x (1.100 / 1.000 ms)" in text
    assert "64 globals (<= 1.15x): cuda 1.50x (1.500 / 1.000 ms); useful-FLOP ratio 2.00x" in text
    assert "(<= 1.2x): 1.50x (3.000 / 2.000 ms)" in text
    assert "share (1 - without / with; <= 10 %): triton 5.0% (2.000 / 1.900 ms)" in text
    assert "longformer/64 cuda fwd 4" in text
    assert ("4 triton GPU us per fwd+bwd call (profile, no bias, window 256): local 800; longformer/1 1000 (1.25x)"
            in text)
    assert "    longformer/1: _rows_kernel 500; _keys_kernel 490; _slots_kernel 10" in text
    assert "dK/dV loop pipelined 3 (default) -> 1 deep, ms: local 1.500 -> 1.250" in text
    assert ("at S=512, us (fwd <= 40, fwd+bwd <= 80): local cuda fwd 30; local triton fwd 40; dense SDPA fwd 25; "
            "dense SDPA fwdbwd 300") in text
    assert "Triton host overhead at S=512, us, Triton's launches -> cached: local fwd 90 -> 40" in text
    assert "at S=16384, us (fwd <= 40, fwd+bwd <= 80): tglobal triton fwdbwd 500; tglobal cuda fwdbwd 700" in text
    # local: (5t + 3t) / 7t; tglobal: (4t + t/8 + 3t + t/8) / (7t + t/4)
    assert lines[-1].endswith(f"local cuda {8 / 7:.2f}x; tglobal cuda {(7 + 1 / 4) / (7 + 1 / 4):.2f}x")


def test_target_runs_are_saved_under_their_own_mode(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.setattr(gc, "ROOT", repo)
    run = {"timestamp": "2026-12-01T10:00:00+00:00", "device": "cuda:0 NVIDIA H200 (sm_90, 139 GiB)",
           "device_type": "cuda", "settings": {"mode": "ops"}, "results": [_record("local", 1, "flex", "fwd", 1)]}
    saved = gc.save_run(run, "bench-globals-64.json")
    assert saved.endswith("2026-12-01T100000_NVIDIA-H200_bench-globals-64.json")
    # The README report takes the newest run whose mode is "ops": never a target's run.
    assert json.loads((repo / saved).read_text())["settings"]["mode"] == "bench-globals-64"


def test_build_step_unsets_cxx_and_falls_back_to_an_install_without_the_extension(tmp_path):
    steps = {s.name: s for s in gc.make_steps(gc.parse_args([str(tmp_path)]), tmp_path, "9.0")}
    build = steps["build"]
    assert build.env["CXX"] is None and build.env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    # A None in a step's env unsets the variable for its command.
    probe = gc.Step("probe", 0, 60, cmd=["bash", "-c", "echo CXX=${CXX-unset} ARCH=$TORCH_CUDA_ARCH_LIST"],
                    env=build.env)
    assert gc.run_command(probe, tmp_path, 30, {"CXX": "/opt/gcc/bin/g++", "PATH": os.environ["PATH"]})[0] == "ok"
    assert (tmp_path / "probe.log").read_text() == "CXX=unset ARCH=9.0\n"
    # The install failing both ways ("false" stands in for python): the step fails, after trying without the extension.
    failing = gc.Step("build", 0, 60, cmd=gc.build_cmd("false"))
    assert gc.run_command(failing, tmp_path, 30, dict(os.environ))[0] == "FAILED (rc 1)"
    assert "installing longattn without the extension" in (tmp_path / "build.log").read_text()


def test_bench_backends_and_baselines_can_be_chosen(tmp_path):
    args = gc.parse_args([str(tmp_path), "--bench-backends", "triton,cuda", "--bench-baselines", "none"])
    cmd = {s.name: s for s in gc.make_steps(args, tmp_path, "9.0")}["bench-16384"].cmd
    assert cmd[cmd.index("--backend") + 1] == "triton,cuda" and cmd[cmd.index("--baseline") + 1] == "none"


def test_tests_step_runs_the_chosen_targets(tmp_path):
    default = {s.name: s for s in gc.make_steps(gc.parse_args([str(tmp_path)]), tmp_path, "9.0")}["tests"].cmd
    assert default[-1] == str(gc.ROOT / "tests")
    args = gc.parse_args([str(tmp_path), "--tests", "tests/test_a.py, tests/test_b.py::test_c[x]"])
    cmd = {s.name: s for s in gc.make_steps(args, tmp_path, "9.0")}["tests"].cmd
    assert cmd[-2:] == [str(gc.ROOT / "tests/test_a.py"), str(gc.ROOT / "tests/test_b.py::test_c[x]")]
    assert "gpu and not slow" in cmd


def test_run_record_lists_steps_and_failed_tests(tmp_path):
    (tmp_path / "pytest.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad[x]"><failure message="m"/></testcase>'
        '<testcase classname="tests.test_b" name="test_err"><error message="e"/></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped message="s"/></testcase>'
        '</testsuite></testsuites>')
    args = gc.parse_args([str(tmp_path), "--skip", "racecheck", "--tests", "tests/test_a.py"])
    outcomes = [gc.Outcome("build", "ok", 58.04, "build.log"), gc.Outcome("tests", "FAILED (rc 1)", 97.0, "tests.log")]
    record = gc.run_record(outcomes, tmp_path, None, "abc123", args, 160.0)
    assert record["failed_tests"] == ["tests/test_a.py::test_bad[x]", "tests/test_b.py::test_err"]
    assert [s["name"] for s in record["steps"]] == ["build", "tests"] and record["steps"][0]["seconds"] == 58.0
    assert record["git_commit"] == "abc123" and record["skip"] == ["racecheck"] and record["tests"] == "tests/test_a.py"
    # Without a GPU the record stays in OUTDIR: benchmarks/results/ holds GPU runs only.
    assert gc.save_run_record(record, tmp_path) == ""
    assert json.loads((tmp_path / "gpu-check.json").read_text()) == record


def test_baselines_from_an_earlier_run_complete_a_kernels_only_run(tmp_path):
    settings = {"mode": "ops", "seqlens": [16384], "baselines": []}
    now = {"device": "cuda:0 H200", "settings": dict(settings), "results": [
        _record("local", 16384, "longattn:cuda", "fwd", 0.25)]}
    earlier = {"device": "cuda:0 H200", "timestamp": "2026-11-30T22:02:01+00:00", "git_commit": "a3ce0e6e36",
               "results": [_record("local", 16384, "longattn:cuda", "fwd", 0.29),  # a kernel row: not taken
                           _record("local", 16384, "flex", "fwd", 0.49),
                           _record("local", 16384, "longattn:torch", "fwd", 34.0),
                           _record("local", 4096, "flex", "fwd", 0.1)]}  # a length this run did not measure
    assert gc.add_baselines(now, earlier, "old.json") == "2 baseline rows from old.json"
    assert [(r["impl"], r["time_ms"]) for r in now["results"]] == [("longattn:cuda", 0.25), ("flex", 0.49),
                                                                    ("longattn:torch", 34.0)]
    assert now["results"][1]["measured_in"] == "2026-11-30T22:02:01 (commit a3ce0e6)"
    assert now["results"][0]["best_baseline"] == "flex" and now["results"][0]["vs_best_baseline"] == 0.49 / 0.25
    assert now["settings"]["baselines"] == ["flex"] and "old.json" in now["note"]
    other = {**earlier, "device": "cuda:0 H100"}
    assert gc.add_baselines(now, other, "h100.json").startswith("baselines not taken from h100.json: device")
    with pytest.raises(SystemExit):
        gc.parse_args([str(tmp_path), "--baselines-from", "benchmarks/results/no-such-run.json"])
