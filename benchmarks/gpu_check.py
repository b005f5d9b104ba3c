"""The whole GPU verification in one command, sized for a short GPU lease (``benchmarks/gpu_check.sh``).

    benchmarks/gpu_check.sh OUTDIR [--budget SECONDS] [--skip STEP,...] [--commit SHA] [--python PY]
                             [--bench-backends LIST] [--bench-baselines LIST] [--tests LIST]
                             [--baselines-from RUN.json]

On a fresh H100/H200 machine (torch, Triton, nvcc; no network), in order:

1. ``env``        versions, GPU, nvcc, commit (each step logs to ``OUTDIR/<step>.log``);
2. ``build``      the CUDA extension for the visible GPU's arch only (``pip install --no-build-isolation
                  --no-deps -e .`` with ``TORCH_CUDA_ARCH_LIST`` set to it), with ``CXX`` unset: an image's own
                  compiler may link libstdc++ statically, which setup.py refuses when CXX names it and replaces
                  (``/usr/bin/g++``) when CXX is unset (seen on an H200 image, 2026-11-30: CXX=/opt/gcc/bin/g++).
                  If that build fails, longattn is installed without the extension (the step still fails), so
                  the Triton backend, which needs the package installed, still runs in the steps after;
3. ``tests``      ``pytest -m "gpu and not slow"`` (junit XML in OUTDIR; 4 workers when pytest-xdist is there), on
                  tests/ or on the files / node ids ``--tests`` names;
4. ``memcheck``   compute-sanitizer on ``benchmarks/sanitize_cuda.py`` (every CUDA kernel once, small shapes), before
                  any timing: a short budget then drops a timing rather than the memory check;
5. ``bench-16384`` ``longattn bench --check`` on DESIGN.md's standard shapes at S=16384 (local, longformer, tglobal,
                  aggregate; fwd and fwd+bwd; every backend and baseline), then issue 12's targets: ``bench-globals``
                  (target 4: Longformer with 1 and 64 global tokens against the local op without bias tables and with
                  the same window, S=16384, Triton and CUDA), ``bench-memory`` (target 6: fwd+bwd peak memory of every
                  op at S=131072), ``profile`` (target 2: ``benchmarks/profile_ops.py``, each op's kernels, launches
                  and GPU time per call; then target 4's shapes, local without bias and Longformer with 1 and 64
                  globals at window 256, kernel by kernel: ``profile-globals.json``), ``bench-bias`` (target 5:
                  TGlobal's backward with and without its bias tables), ``bench-kv-stages`` (the Triton backwards with
                  the dK/dV loop pipelined 1 deep against the default: ``_common._KV_STAGES_ENV``), ``bench-host``
                  (target 3: every op at S=512, where wall minus GPU time is the host's cost), ``bench-host-launch``
                  (its Triton run again with Triton's own launches, ``LONGATTN_TRITON_LAUNCH=triton``: the launch
                  cache's share) and ``host-profile`` (``benchmarks/host_profile.py``: where that host time goes, by
                  cProfile and per call by thread (the backward runs on the autograd engine's device thread), Triton
                  launch and launch-cache miss, and ``benchmarks/launch_probe.py``'s one launch by thread and pointer
                  count, into ``OUTDIR/host-profile.txt``);
   ``racecheck``  compute-sanitizer's race check on the same script;
   ``bench-ragged``: ``longattn bench --ragged --check`` (issue 14's lengths 2048,16384,4096,9000: padded vs packed
                  vs one by one, Triton and CUDA); ``bench-4096``, ``bench-65536``: the other standard lengths, at
                  S=65536 without HF (seconds per call); the torch backend (the CPU path) only at S=4096;
6. ``bench-halo`` ``benchmarks/bench_halo.py``: one sequence-parallel shard's band with its halo read in place
                  against the plain band op (issue 15: S_r = 131072, window 256, Triton and CUDA);
7. ``tune``       ``benchmarks/tune_triton.py``: the Triton kernels' tile shapes swept on the standard shapes
                  (S=16384, D=64 and 128; local, TGlobal, Longformer) within what is left of the budget (at most
                  ``TUNE_CAP_S``), the most informative configs first, into ``OUTDIR/tune-triton.json``;
8. ``results``    the bench JSONs merged into ``OUTDIR/bench.json``, copied to ``benchmarks/results/``, the
                  refreshed ``auto`` table (``OUTDIR/auto_table.json``) and README section (``OUTDIR/results.md``);
                  the other runs' JSONs (globals, memory, profiles, ragged, halo, tune) copied there as their own
                  files.

Then a short summary table, printed last. Each step gets the budget that remains (minus a small reserve for
the summary), capped at its own limit; a step whose minimum no longer fits is skipped and listed, a step that
runs out of time is stopped (its process group terminated) and listed as such; a command step finds its limit in
seconds in ``GPU_CHECK_STEP_LIMIT_S`` (the tune step stops itself before it). The bench and the tune sweep rewrite
their JSON after each measurement, so a stopped run keeps what it measured. Without a GPU the GPU steps are
skipped with the reason (this is how the plumbing is tested on CPU). Exit status: 0 when every step that ran
passed, 1 otherwise, 2 for bad arguments.

Expected time on an H100, from the first GPU run's logs (2026-11-24): build 39 s (then: each tile kernel and
(dtype, head dim) is its own translation unit, so the build is as long as the longest of them); ``longattn bench`` at
one length about 2 minutes, most of it FlexAttention's compiles (20-37 s per op). With the GPU test set
(under 3 minutes) the three bench lengths may not all fit in 480 s: the last one (S=65536) is then skipped
or stopped, and the summary says so; give ``--budget`` more, or ``--skip`` steps, to get it. On an H200 (2026-11-30,
commit a3ce0e6): build 58 s, the whole GPU test set 97 s (4 workers), and ``bench-16384`` with every baseline ran past
its 300 s limit before the aggregate op (the host-overhead measurement of each row and FlexAttention's compiles): to
time the kernels again after a run that measured the baselines, pass ``--bench-baselines none``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480  # 8 minutes, the build included
SUMMARY_RESERVE_S = 10  # kept back for merging results and printing the summary
BENCH_SEQLENS = (16384, 4096, 65536)  # most telling first: a stopped run still has the H100 reference length
SLOW_ABOVE = 16384  # above this length HF takes seconds per call: not benched
# Above this the torch backend (the CPU path) is not benched on a GPU: at S=16384 it took 0.1-0.2 s per call on an
# H200 and, with HF and FlexAttention's compiles, kept the S=16384 step past its 300 s (2026-11-30).
TORCH_ABOVE = 4096
TUNE_CAP_S = 120  # the tile sweep uses what the steps before it left, at most this
STEP_LIMIT_ENV = "GPU_CHECK_STEP_LIMIT_S"  # a command step's limit (seconds), in its environment
GLOBALS_COUNTS = (1, 64)  # issue 12, target 4: Longformer's cost from 1 to 64 global tokens
MEMORY_SEQLEN = 131072  # issue 12, target 6
HOST_SEQLEN = 512  # issue 12, target 3: a shape whose kernels take a few microseconds, so wall minus GPU is the host
EXTRA_RUNS = ("bench-ragged.json", "bench-halo.json", "tune-triton.json", "bench-memory.json", "profile-ops.json",
              "profile-globals.json", "bench-kv-default.json", "bench-kv-stages-1.json",
              "bench-host.json", "bench-host-triton-launch.json", "bench-bias-on.json", "bench-bias-off.json",
              *(f"bench-globals-{g}.json" for g in GLOBALS_COUNTS))  # saved as their own files


@dataclass
class Step:
    """One step: ``cmd`` run with its output in ``OUTDIR/<name>.log``, or ``fn(ctx)`` (returns a note)."""

    name: str
    min_s: float  # start only with at least this much budget left
    cap_s: float  # never run longer than this, whatever the budget
    needs_gpu: bool = False
    cmd: list | None = None
    fn: object = None
    env: dict = field(default_factory=dict)  # added to the environment; a None value unsets the variable
    ok_codes: tuple = (0,)


@dataclass
class Outcome:
    name: str
    status: str  # "ok", "FAILED (rc N)", "stopped at budget", "skipped: ..."
    seconds: float = 0.0
    note: str = ""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", help="directory for the results JSON, logs and summary (created)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for everything, the build included (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--skip", default="", help="comma list of steps not to run (e.g. build,racecheck)")
    parser.add_argument("--commit", help="git commit to record when the tree is not a git checkout")
    parser.add_argument("--python", default=sys.executable, help="the Python that has torch (default: this one)")
    parser.add_argument("--bench-backends", help="the standard benches' longattn backends (comma list; default: all "
                                                 f"up to S={TORCH_ABOVE}, then triton,cuda)")
    parser.add_argument("--bench-baselines", help="the standard benches' baselines (comma list or none; default: all "
                                                  f"up to S={SLOW_ABOVE}, then flex,sdpa_mask,sdpa_dense)")
    parser.add_argument("--tests", help="the tests step's pytest targets instead of all of tests/ (comma list of files "
                                        "or node ids relative to the root, e.g. to rerun what a run of the same "
                                        "commit failed, or the tests of the kernels changed since it)")
    parser.add_argument("--baselines-from", help="a saved ops run (path relative to the root, under "
                                                 "benchmarks/results/) whose baseline rows complete this run's, e.g. "
                                                 "with --bench-baselines none: the baselines are not timed twice")
    args = parser.parse_args(argv)
    if args.baselines_from and not (ROOT / args.baselines_from).is_file():
        parser.error(f"--baselines-from: no file {args.baselines_from} under {ROOT}")
    if not args.budget > 0:
        parser.error(f"--budget: expected a positive number of seconds, got {args.budget}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


def gpu_arch(python: str) -> tuple[str | None, str]:
    """("9.0", device name) of the visible GPU, or (None, why not)."""
    code = ("import torch\nif torch.cuda.is_available():\n    p = torch.cuda.get_device_properties(0)\n"
            "    print(f'{p.major}.{p.minor}|{p.name}')\nelse:\n    print('|torch.cuda.is_available() is False')")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot ask torch for the GPU ({exc})"
    arch, _, name = out.rpartition("\n")[2].partition("|")
    return (arch or None), (name or "no answer from torch")


def git_commit(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LONGATTN_GIT_COMMIT")
    return out.stdout.strip() or os.environ.get("LONGATTN_GIT_COMMIT")


def bench_cmd(python: str, outdir: Path, S: int, backends: str | None = None,
              baselines: str | None = None) -> list[str]:
    """``longattn bench`` at the standard shapes and length ``S``; ``backends`` / ``baselines`` (comma lists, e.g. to
    time only the kernels again when a run of the same commit measured the baselines) replace the defaults."""
    return [python, "-m", "longattn", "bench", "--op", "local,longformer,tglobal,aggregate", "--seqlen", str(S),
            "--pass", "fwd,fwdbwd", "--check", "--no-progress", "--min-run-time", "0.1",
            "--backend", backends or ("triton,cuda" if S > TORCH_ABOVE else "all"),
            "--baseline", baselines or ("flex,sdpa_mask,sdpa_dense" if S > SLOW_ABOVE else "all"),
            "--json", str(outdir / f"bench-{S}.json")]


def build_cmd(python: str) -> list[str]:
    """Install longattn in place with its CUDA extension; without it when that build fails (exit status 1 then)."""
    install = shlex.join([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e",
                          str(ROOT)])
    return ["bash", "-c", f"echo compilers: CC=${{CC:-}} c++=$(command -v c++) g++=$(command -v g++); {install} || "
                          f"{{ echo 'gpu_check: the CUDA build failed; installing longattn without the extension'; "
                          f"LONGATTN_SKIP_CUDA_BUILD=1 {install}; exit 1; }}"]


def _kernel_bench(python: str, outdir: Path, name: str, *args: str, backends: str = "triton,cuda",
                  baselines: str = "none") -> str:
    """One ``longattn bench`` run of the kernel backends (no baselines unless named) into ``OUTDIR/<name>.json``."""
    return shlex.join([python, "-m", "longattn", "bench", *args, "--no-progress", "--backend", backends,
                       "--baseline", baselines, "--json", str(outdir / f"{name}.json")])


def globals_cmd(python: str, outdir: Path) -> list[str]:
    """Target 4: the local op without bias tables (the band Longformer runs) and Longformer with the same window (256)
    at S=16384, for each global count."""
    return ["bash", "-c", "; ".join(
        _kernel_bench(python, outdir, f"bench-globals-{g}", "--op", "local,longformer", "--no-bias", "--seqlen",
                      "16384", "--window", "256", "--globals", str(g), "--pass", "fwdbwd", "--min-run-time", "0.2")
        for g in GLOBALS_COUNTS)]


def profile_cmd(python: str, outdir: Path) -> list[str]:
    """Target 2: every op's kernels at the bench's shapes (``profile-ops.json``); then target 4's: the local op
    without bias tables and Longformer with 1 and 64 globals at the same window (256), S=16384
    (``profile-globals.json``), so the summary can say which kernels Longformer's extra time is in."""
    script = str(ROOT / "benchmarks" / "profile_ops.py")
    return ["bash", "-c", "; ".join([
        shlex.join([python, script, "--json", str(outdir / "profile-ops.json")]),
        shlex.join([python, script, "--op", "local,longformer", "--no-bias", "--window", "256", "--seqlen", "16384",
                    "--globals", ",".join(map(str, GLOBALS_COUNTS)), "--json", str(outdir / "profile-globals.json")]),
    ])]


def kv_stages_cmd(python: str, outdir: Path) -> list[str]:
    """The Triton dK/dV kernels' query-tile loop software-pipelined 1 deep (``LONGATTN_TRITON_KV_STAGES=1``: fewer
    instructions, but the next tile's loads not prefetched) against the default 3, each op's backward at S=16384
    (``_common._KV_STAGES_ENV``)."""
    args = ("--op", "local,tglobal,longformer", "--seqlen", "16384", "--pass", "bwd", "--min-run-time", "0.2")
    return ["bash", "-c", "; ".join([
        _kernel_bench(python, outdir, "bench-kv-default", *args, backends="triton"),
        "LONGATTN_TRITON_KV_STAGES=1 " + _kernel_bench(python, outdir, "bench-kv-stages-1", *args, backends="triton"),
    ])]


def bias_cmd(python: str, outdir: Path) -> list[str]:
    """Target 5: TGlobal's backward at S=16384 with and without its two bias tables (their gradients' cost is the
    difference: the Triton kernels reduce them inside the dQ pass, so no kernel of their own shows it)."""
    return ["bash", "-c", "; ".join(
        _kernel_bench(python, outdir, f"bench-bias-{name}", "--op", "tglobal", "--seqlen", "16384", "--pass", "bwd",
                      "--min-run-time", "0.2", *flag) for name, flag in (("on", ()), ("off", ("--no-bias",))))]


def host_cmd(python: str, outdir: Path) -> list[str]:
    """Target 3: every op at a tiny length, where the host overhead column is the host cost itself; dense SDPA beside
    them as the machine's floor for one attention call through torch (its autograd included: on the H200 VM of
    2026-11-30 dense SDPA's fwd+bwd alone showed ~500 us at S=16384)."""
    return ["bash", "-c", _kernel_bench(python, outdir, "bench-host", "--op", "local,longformer,tglobal,aggregate",
                                        "--seqlen", str(HOST_SEQLEN), "--pass", "fwd,fwdbwd", "--min-run-time", "0.1",
                                        baselines="sdpa_dense")]


def host_launch_cmd(python: str, outdir: Path) -> list[str]:
    """Target 3, the Triton launch cache's share: ``host_cmd``'s Triton run again with Triton's own launches (the step
    sets ``LONGATTN_TRITON_LAUNCH=triton``; ``triton_kernels/_launch.py``)."""
    return ["bash", "-c", _kernel_bench(python, outdir, "bench-host-triton-launch", "--op",
                                        "local,longformer,tglobal,aggregate", "--seqlen", str(HOST_SEQLEN), "--pass",
                                        "fwd,fwdbwd", "--min-run-time", "0.1", backends="triton")]


def memory_cmd(python: str, outdir: Path) -> list[str]:
    """Target 6: every op's fwd+bwd peak memory at S=131072 (the kernel backends; the bench records the peak)."""
    return ["bash", "-c", _kernel_bench(python, outdir, "bench-memory", "--op", "local,longformer,tglobal,aggregate",
                                        "--seqlen", str(MEMORY_SEQLEN), "--pass", "fwdbwd", "--min-run-time", "0.05")]


def ragged_cmd(python: str, outdir: Path) -> list[str]:
    """Issue 14's comparison at its GPU default lengths, the kernel backends only (the torch backend and HF take
    seconds per call at 16384)."""
    return [python, "-m", "longattn", "bench", "--ragged", "--op", "local,longformer,tglobal", "--pass", "fwd,fwdbwd",
            "--check", "--no-progress", "--backend", "triton,cuda", "--baseline", "none",
            "--json", str(outdir / "bench-ragged.json")]


def pytest_targets(chosen: str | None) -> list[str]:
    """The tests step's pytest targets: ``chosen`` (a comma list of files or node ids under the root), else tests/."""
    if not chosen:
        return [str(ROOT / "tests")]
    return [str(ROOT / t.strip()) for t in chosen.split(",") if t.strip()]


def _has_xdist(python: str) -> bool:
    """Whether ``python`` can run pytest-xdist (the GPU tests then run in 4 processes: most of their time is
    Triton compiling kernels on the CPU)."""
    try:
        return subprocess.run([python, "-c", "import xdist"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def make_steps(args, outdir: Path, arch: str | None) -> list[Step]:
    py = args.python
    bench_choice = (args.bench_backends, args.bench_baselines)
    sanitizer = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), "compute-sanitizer")
    sanitize_script = str(ROOT / "benchmarks" / "sanitize_cuda.py")
    steps = [
        Step("env", 5, 60, cmd=["bash", "-c", f"{py} -m longattn info; nvidia-smi -L; nvcc --version | tail -2; "
                                              f"echo commit: ${{LONGATTN_GIT_COMMIT:-unknown}}"], ok_codes=(0, 127)),
        Step("build", 60, 300, needs_gpu=True, cmd=build_cmd(py),
             env={"TORCH_CUDA_ARCH_LIST": arch or "", "MAX_JOBS": str(os.cpu_count() or 4), "CXX": None}),
        Step("tests", 60, 240, needs_gpu=True,
             cmd=[py, "-m", "pytest", "-q", "-m", "gpu and not slow", "-p", "no:cacheprovider",
                  *(["-n", "4"] if _has_xdist(py) else []), "--junitxml", str(outdir / "pytest.xml"),
                  *pytest_targets(args.tests)]),
        # Correctness before speed: the sanitizer on every kernel right after the tests, so a short budget drops a
        # timing rather than the memory check of kernels that may never have run under it.
        Step("memcheck", 30, 120, needs_gpu=True,
             cmd=[sanitizer, "--tool", "memcheck", "--error-exitcode", "3", py, sanitize_script]),
        Step(f"bench-{BENCH_SEQLENS[0]}", 45, 300, needs_gpu=True,
             cmd=bench_cmd(py, outdir, BENCH_SEQLENS[0], *bench_choice)),
        Step("bench-globals", 30, 120, needs_gpu=True, cmd=globals_cmd(py, outdir)),
        Step("bench-memory", 30, 120, needs_gpu=True, cmd=memory_cmd(py, outdir)),
        Step("profile", 30, 150, needs_gpu=True, cmd=profile_cmd(py, outdir)),
        Step("bench-bias", 20, 90, needs_gpu=True, cmd=bias_cmd(py, outdir)),
        Step("bench-kv-stages", 30, 120, needs_gpu=True, cmd=kv_stages_cmd(py, outdir)),
        Step("bench-host", 20, 90, needs_gpu=True, cmd=host_cmd(py, outdir)),
        Step("bench-host-launch", 15, 60, needs_gpu=True, cmd=host_launch_cmd(py, outdir),
             env={"LONGATTN_TRITON_LAUNCH": "triton"}),
        Step("host-profile", 20, 90, needs_gpu=True,
             cmd=[py, str(ROOT / "benchmarks" / "host_profile.py"), "--out", str(outdir / "host-profile.txt")]),
        Step("racecheck", 30, 150, needs_gpu=True,
             cmd=[sanitizer, "--tool", "racecheck", "--error-exitcode", "3", py, sanitize_script]),
        Step("bench-ragged", 45, 180, needs_gpu=True, cmd=ragged_cmd(py, outdir)),
    ]
    steps += [Step(f"bench-{S}", 45, 300, needs_gpu=True, cmd=bench_cmd(py, outdir, S, *bench_choice))
              for S in BENCH_SEQLENS[1:]]
    steps.append(Step("bench-halo", 20, 90, needs_gpu=True,
                      cmd=[py, str(ROOT / "benchmarks" / "bench_halo.py"), "--json", str(outdir / "bench-halo.json")]))
    steps.append(Step("tune", 40, TUNE_CAP_S, needs_gpu=True,
                      cmd=[py, str(ROOT / "benchmarks" / "tune_triton.py"), "--budget", str(TUNE_CAP_S),
                           "--json", str(outdir / "tune-triton.json")]))
    steps.append(Step("results", 1, 60, fn=lambda: collect_results(py, outdir, args.baselines_from)))
    return steps


def run_command(step: Step, outdir: Path, limit_s: float, env: dict) -> tuple[str, str]:
    """Run ``step.cmd`` for at most ``limit_s`` seconds (its whole process group stopped after)."""
    log = outdir / f"{step.name}.log"
    with open(log, "w") as f:
        try:
            proc = subprocess.Popen(step.cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    env={k: v for k, v in {**env, **step.env, STEP_LIMIT_ENV: f"{limit_s:.0f}"}.items()
                                         if v is not None},  # None: unset
                                    start_new_session=True)
        except OSError as exc:
            f.write(f"cannot start: {exc}\n")
            return f"FAILED (cannot start: {exc.strerror})", log.name
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            return f"stopped at budget ({limit_s:.0f} s)", log.name
    return ("ok" if rc in step.ok_codes else f"FAILED (rc {rc})"), log.name


def run_steps(steps: list[Step], outdir: Path, budget_s: float, *, have_gpu: str | None, skip=(),
              env=None, clock=time.monotonic) -> list[Outcome]:
    """Run the steps in order within ``budget_s`` (see module docstring); returns one outcome per step."""
    env = dict(os.environ if env is None else env)
    deadline = clock() + budget_s - SUMMARY_RESERVE_S
    outcomes = []
    for step in steps:
        left = deadline - clock()
        if step.name in skip:
            outcomes.append(Outcome(step.name, "skipped: --skip"))
        elif step.needs_gpu and have_gpu is None:
            outcomes.append(Outcome(step.name, "skipped: no CUDA GPU visible"))
        elif left < step.min_s:
            outcomes.append(Outcome(step.name, f"skipped: would not fit ({max(left, 0):.0f} s left, needs "
                                               f"{step.min_s:.0f} s)"))
        else:
            start = clock()
            if step.fn is not None:
                try:
                    status, note = "ok", step.fn()
                except Exception as exc:  # a results step that breaks must not hide the summary
                    status, note = "FAILED", f"{type(exc).__name__}: {exc}"
            else:
                status, note = run_command(step, outdir, min(left, step.cap_s), env)
            outcomes.append(Outcome(step.name, status, clock() - start, note))
    return outcomes


def merge_bench(outdir: Path) -> dict | None:
    """The per-length bench JSONs in OUTDIR as one run (settings' seqlens = those measured), or None."""
    runs = [json.loads(p.read_text()) for S in BENCH_SEQLENS if (p := outdir / f"bench-{S}.json").is_file()]
    if not runs:
        return None
    merged = {**runs[0], "results": [r for run in runs for r in run["results"]]}
    seqlens = sorted({s for run in runs for s in run["settings"]["seqlens"]})
    merged["settings"] = {**runs[0]["settings"], "seqlens": seqlens,
                          "gpu_check": f"backend torch not run above S={TORCH_ABOVE}, baseline hf above S={SLOW_ABOVE}"}
    return merged


def _longattn_importable() -> None:
    """Put the checkout first on sys.path: the results helpers import longattn from this tree, installed or not."""
    if sys.path[0] != str(ROOT):
        sys.path.insert(0, str(ROOT))


def add_baselines(merged: dict, earlier: dict, name: str) -> str:
    """Copy into ``merged`` the rows of ``earlier`` (a saved ops run, file ``name``) that it lacks: the baselines and
    the torch backend at the lengths it measured, each marked ``measured_in``, so a run that timed only the kernels
    (``--bench-baselines none``) still reports against every baseline without timing them twice. Only from a run on
    the same device; returns what it did."""
    if earlier.get("device") != merged.get("device"):
        return f"baselines not taken from {name}: device {earlier.get('device')!r}, not {merged.get('device')!r}"
    have = {(r["op"], r["S"], r["pass"], r["impl"]) for r in merged["results"]}
    seqlens = set(merged["settings"]["seqlens"])
    when = f"{earlier['timestamp'][:19]} (commit {str(earlier.get('git_commit'))[:7]})"
    taken = [{**r, "measured_in": when} for r in earlier["results"]
             if (r["kind"] != "longattn" or r["impl"] == "longattn:torch") and r["S"] in seqlens
             and (r["op"], r["S"], r["pass"], r["impl"]) not in have]
    merged["results"] += taken
    _longattn_importable()
    from longattn.bench.runner import add_ratios

    add_ratios(merged["results"])  # the kernels' rows against the baselines they now sit beside
    merged["settings"]["baselines"] = sorted({*merged["settings"].get("baselines", []),
                                              *(r["impl"] for r in taken if r["kind"] != "longattn")})
    merged["note"] = (f"The kernels' rows from this run; {len(taken)} baseline and torch-backend rows from {name}, "
                      f"measured on the same device (marked measured_in), so the baselines were not timed twice.")
    return f"{len(taken)} baseline rows from {name}"


def collect_results(python: str, outdir: Path, baselines_from: str | None = None) -> str:
    """Merge the bench runs (and ``baselines_from``'s baseline rows, ``add_baselines``), keep a copy under
    benchmarks/results/, refresh the auto table and README section."""
    notes = []
    for extra in EXTRA_RUNS:  # their own files: not merged into the ops runs
        if (outdir / extra).is_file():
            notes.append(save_run(json.loads((outdir / extra).read_text()), extra))
    merged = merge_bench(outdir)
    if merged is None:
        return ", ".join([*notes, "no bench results"])
    if baselines_from:
        notes.append(add_baselines(merged, json.loads((ROOT / baselines_from).read_text()), baselines_from))
    (outdir / "bench.json").write_text(json.dumps(merged, indent=1, default=str) + "\n")
    notes.append("bench.json")
    if merged.get("device_type") != "cuda":
        return "bench.json (CPU run: not saved under benchmarks/results/)"
    _longattn_importable()
    from longattn.bench.cli import results_stem

    saved = ROOT / "benchmarks" / "results" / f"{results_stem(merged, merged['settings'])}.json"
    saved.write_text(json.dumps(merged, indent=1, default=str) + "\n")
    rel = saved.relative_to(ROOT)
    notes.append(str(rel))
    for what, cmd in (("auto_table.json", [python, "-m", "longattn", "auto-table", str(rel), "--out",
                                           str(outdir / "auto_table.json")]),
                      ("results.md", [python, "-m", "longattn", "bench", "--report", "--out",
                                      str(outdir / "results.md"), "--results-dir", str(saved.parent)])):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        notes.append(what if proc.returncode == 0 else f"{what} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return ", ".join(notes)


def save_run(run: dict, name: str) -> str:
    """Copy a GPU run of the ``--ragged`` bench, ``bench_halo.py`` or ``tune_triton.py`` to ``benchmarks/results/``
    (its own file, ``<timestamp>_<gpu>_<mode>.json``: the README report and the auto table read the ops runs only).
    A run whose settings name no mode (``bench_halo.py``), or the ops mode (the targets' runs, which the README must
    not take for the standard shapes' run), takes its file's: ``bench-halo``, ``bench-globals-64``."""
    if run.get("device_type") != "cuda":
        return f"{name} (CPU run: not saved)"
    _longattn_importable()
    from longattn.bench.cli import results_stem

    if run["settings"].get("mode") in (None, "ops"):  # saved under its own mode, which the README report never reads
        run = {**run, "settings": {**run["settings"], "mode": Path(name).stem}}
    stem = results_stem(run, run["settings"])
    saved = ROOT / "benchmarks" / "results" / f"{stem}.json"
    saved.write_text(json.dumps(run, indent=1, default=str) + "\n")
    return str(saved.relative_to(ROOT))


def failed_tests(junit: Path) -> list[str]:
    """The node ids (file::name) of the tests that failed or errored in a junit XML, in file order."""
    if not junit.is_file():
        return []
    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            path = case.get("classname", "").replace(".", "/")
            failed.append(f"{path}.py::{case.get('name')}")
    return failed


def run_record(outcomes: list[Outcome], outdir: Path, gpu: str | None, commit: str | None, args,
               elapsed: float) -> dict:
    """The run itself as JSON: device, commit, budget, each step's status and seconds, the failed tests."""
    return {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": f"cuda:0 {gpu}" if gpu else None,
            "git_commit": commit, "budget_s": args.budget, "elapsed_s": round(elapsed, 1),
            "skip": sorted(args.skip), "tests": args.tests,
            "steps": [{"name": o.name, "status": o.status, "seconds": round(o.seconds, 1), "note": o.note}
                      for o in outcomes],
            "failed_tests": failed_tests(outdir / "pytest.xml")}


def save_run_record(record: dict, outdir: Path) -> str:
    """``OUTDIR/gpu-check.json``, and on a GPU a copy under benchmarks/results/ (``<timestamp>_<gpu>_gpu-check``)."""
    (outdir / "gpu-check.json").write_text(json.dumps(record, indent=1) + "\n")
    if not record["device"]:
        return ""
    _longattn_importable()
    from longattn.bench.cli import results_stem

    saved = ROOT / "benchmarks" / "results" / f"{results_stem(record, {'mode': 'gpu-check'})}.json"
    saved.write_text(json.dumps(record, indent=1) + "\n")
    return str(saved.relative_to(ROOT))


def ragged_summary(outdir: Path) -> list[str]:
    """Per op, pass and backend: packed / one-by-one and padded / packed (issue 14's targets), and --check."""
    path = outdir / "bench-ragged.json"
    if not path.is_file():
        return []
    rows = [r for r in json.loads(path.read_text())["results"] if r.get("kind") == "packed" and r["status"] == "ok"]
    lines = ["", f"ragged {rows[0]['lengths'] if rows else ''}: {'op':<11}{'pass':<8}{'impl':<18}"
                 f"{'packed/1-by-1':>14}{'padded/packed':>14}  check"]
    for r in rows:
        fmt = lambda x: "-" if x is None else f"{x:.2f}x"
        lines.append(f"{'':8}{r['op']:<11}{r['pass']:<8}{r['impl']:<18}{fmt(r.get('packed_vs_one_by_one')):>14}"
                     f"{fmt(r.get('padded_vs_packed')):>14}  {r.get('check', '-')}")
    return lines


def halo_summary(outdir: Path) -> list[str]:
    """Per backend and pass: the halo read in place against the plain band op (issue 15: <= 3 % at 131072)."""
    path = outdir / "bench-halo.json"
    if not path.is_file():
        return []
    lines = ["", f"halo (S_r, window): {'backend':<8}{'pass':<8}{'plain ms':>10}{'halo ms':>10}{'overhead':>10}"]
    for r in json.loads(path.read_text())["results"]:
        if r["status"] != "ok" or r.get("halo_overhead") is None:
            lines.append(f"{'':20}{r['backend']:<8}{r.get('pass', ''):<8} not run: {r.get('reason', r)}")
            continue
        lines.append(f"{'':20}{r['backend']:<8}{r['pass']:<8}{r['plain_ms']:>10.3f}{r['halo_ms']:>10.3f}"
                     f"{r['halo_overhead'] * 100:>9.1f}%")
    return lines


def tune_summary(outdir: Path) -> list[str]:
    """The tile sweep's table (per op, D and pass: the current config against the fastest checked one)."""
    path = outdir / "tune-triton.json"
    if not path.is_file():
        return []
    run = json.loads(path.read_text())
    return ["", f"tune (Triton tiles BLOCK_MxBLOCK_N/warps, {run.get('stopped') or 'complete'}):", *run["table"]]


def bench_summary(run: dict | None) -> list[str]:
    """Per op, S and pass: the fastest longattn backend against the fastest fair baseline, and --check."""
    if not run:
        return ["bench: no results"]
    lines = [f"{'op':<11}{'S':>7} {'pass':<7}{'best longattn':>22}{'best baseline':>22}{'speed-up':>10}  check"]
    groups: dict = {}
    for r in run["results"]:
        groups.setdefault((r["op"], r["S"], r["pass"]), []).append(r)
    for (op, S, which), rows in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1], g[0][2])):
        ok = [r for r in rows if r["status"] == "ok"]
        ours = min((r for r in ok if r["kind"] == "longattn"), key=lambda r: r["time_ms"], default=None)
        base = min((r for r in ok if r["kind"] == "baseline" and r["impl"] != "sdpa_dense" and not r.get("caveat")),
                   key=lambda r: r["time_ms"], default=None)
        fails = sorted({r["impl"] for r in rows if str(r.get("check", "")).startswith(("FAIL", "error"))}
                       | {r["impl"] for r in rows if r["status"] == "error"})
        fmt = lambda r: "-" if r is None else f"{r['impl'].replace('longattn:', '')} {r['time_ms']:.3f} ms"
        ratio = f"{base['time_ms'] / ours['time_ms']:.2f}x" if ours and base else "-"
        lines.append(f"{op:<11}{S:>7} {which:<7}{fmt(ours):>22}{fmt(base):>22}{ratio:>10}  "
                     + ("FAIL: " + ", ".join(fails) if fails else "ok"))
    return lines


def _load(outdir: Path, name: str) -> dict | None:
    path = outdir / name
    return json.loads(path.read_text()) if path.is_file() else None


def _pass_ms(run: dict | None, op: str, which: str) -> dict:
    """backend -> milliseconds of ``op``'s longattn rows of pass ``which`` in a bench run."""
    return {r["impl"].split(":", 1)[1]: r["time_ms"] for r in (run or {}).get("results", [])
            if r["op"] == op and r["pass"] == which and r["kind"] == "longattn" and r["status"] == "ok"}


def _fwdbwd_ms(run: dict | None, op: str) -> dict:
    return _pass_ms(run, op, "fwdbwd")


def _flop_ratio(run: dict | None, op: str, base: str) -> float | None:
    """``op``'s useful forward FLOPs over ``base``'s in one run (the bench counts the pairs each attends: the ratio
    no exact kernel can beat; Longformer's global rows attend all S keys and every row the G global keys)."""
    flops = {r["op"]: r["fwd_flops"] for r in (run or {}).get("results", []) if r.get("fwd_flops")}
    return flops[op] / flops[base] if op in flops and base in flops else None


def _memory_floor(run: dict, r: dict) -> tuple[float, float] | None:
    """(bytes held by the inputs the bench does not count in its peak, the floor: inputs + outputs + gradients) of
    a fwd+bwd row (target 6's bound is 1.2x the floor; the output gradient is the caller's, in neither)."""
    st = run["settings"]
    size = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}.get(str(st.get("dtype")).replace("torch.", ""))
    if size is None or not st.get("heads") or not st.get("head_dim"):
        return None
    t = st.get("batch", 1) * r["S"] * st["heads"] * st["head_dim"] * size  # one (B, S, H, D) tensor
    side = t / st.get("block_size", 16)  # TGlobal's side keys / values, the aggregate's output: (B, S / block, H*D)
    if r["op"] == "aggregate":
        return t, 2 * t + side  # x; x, out, dx
    if r["op"] == "tglobal":
        return 3 * t + 2 * side, 7 * t + 4 * side  # q, k, v, side k/v; those, o and every gradient
    return 3 * t, 7 * t  # q, k, v; q, k, v, o, dq, dk, dv


def _launch_cache_lines(cached_run, triton_run) -> list[str]:
    """Target 3: the Triton backend's host overhead at S = HOST_SEQLEN with the launch cache and with Triton's own
    launches (``bench-host-launch``), op by op."""
    def host(run):
        return {(r["op"], r["pass"]): r["host_overhead_ms"] * 1e3 for r in (run or {}).get("results", [])
                if r["impl"] == "longattn:triton" and r["status"] == "ok" and r.get("host_overhead_ms") is not None}

    cached, plain = host(cached_run), host(triton_run)
    cells = [f"{op} {p} {plain[op, p]:.0f} -> {cached[op, p]:.0f}" for op, p in sorted(cached) if (op, p) in plain]
    return [f"  3 Triton host overhead at S={HOST_SEQLEN}, us, Triton's launches -> cached: " + "; ".join(cells)
            ] if cells else []


def _globals_kernel_lines(profiled) -> list[str]:
    """Target 4 by kernel (``profile-globals.json``): each backend's GPU microseconds per fwd+bwd call of the local op
    (no bias, window 256) and of Longformer with each global count, and Longformer's kernels by their time (fwd and
    bwd passes added up, name cut short): where its extra time over the band alone goes."""
    rows = [r for r in (profiled or {}).get("results", []) if r.get("status") == "ok"]
    lines = []
    for backend in sorted({r["backend"] for r in rows}):
        totals, kernels = {}, {}
        for r in rows:
            if r["backend"] != backend:
                continue
            case = r["op"] + (f"/{r['globals']}" if "globals" in r else "")
            totals[case] = totals.get(case, 0.0) + r["us_per_call"]
            for a in r["activities"]:
                names = kernels.setdefault(case, {})
                names[a["name"][:40]] = names.get(a["name"][:40], 0.0) + a["us_per_call"]
        base = totals.get("local")
        cells = [f"{case} {us:.0f}" + (f" ({us / base:.2f}x)" if base and case != "local" else "")
                 for case, us in totals.items()]
        lines.append(f"  4 {backend} GPU us per fwd+bwd call (profile, no bias, window 256): " + "; ".join(cells))
        lines += [f"    {case}: " + "; ".join(f"{name} {us:.0f}" for name, us in sorted(names.items(),
                                                                                      key=lambda kv: -kv[1]))
                  for case, names in kernels.items()]
    return lines


def _sdpa_floor(run) -> str:
    """"; dense SDPA <pass> <us> ..." from a run's dense-SDPA rows (the first op's): torch's own host overhead for one
    attention call on the same machine, the floor the targets' figures are read against."""
    rows = [r for r in (run or {}).get("results", []) if r["impl"] == "sdpa_dense" and r["status"] == "ok"
            and r.get("host_overhead_ms") is not None]
    first = {}
    for r in rows:
        first.setdefault(r["pass"], r["host_overhead_ms"] * 1e3)
    return "".join(f"; dense SDPA {p} {us:.0f}" for p, us in first.items())


def targets_summary(outdir: Path) -> list[str]:
    """Issue 12's targets, measured value beside each bound, from the runs this check wrote."""
    lines = ["", "issue 12 targets:"]
    bench = _load(outdir, f"bench-{BENCH_SEQLENS[0]}.json")
    for g in GLOBALS_COUNTS:
        run = _load(outdir, f"bench-globals-{g}.json")
        local, lf = _fwdbwd_ms(run, "local"), _fwdbwd_ms(run, "longformer")
        cells = [f"{b} {lf[b] / local[b]:.2f}x ({lf[b]:.3f} / {local[b]:.3f} ms)" for b in sorted(lf) if b in local]
        floor = _flop_ratio(run, "longformer", "local")
        lines.append(f"  4 Longformer/local (no bias) fwd+bwd, S=16384, window 256, {g} globals (<= 1.15x): "
                     + ("; ".join(cells) or "not measured")
                     + (f"; useful-FLOP ratio {floor:.2f}x (the floor of any exact kernel)" if floor else ""))
    lines += _globals_kernel_lines(_load(outdir, "profile-globals.json"))
    default, staged = (_load(outdir, f"bench-kv-{name}.json") for name in ("default", "stages-1"))
    cells = [f"{op} {default_ms:.3f} -> {staged_ms:.3f}" for op in ("local", "tglobal", "longformer")
             if (default_ms := _pass_ms(default, op, "bwd").get("triton")) and
             (staged_ms := _pass_ms(staged, op, "bwd").get("triton"))]
    if cells:
        lines.append("  4/5 Triton backward, dK/dV loop pipelined 3 (default) -> 1 deep, ms: " + "; ".join(cells))
    tg = _fwdbwd_ms(bench, "tglobal")
    lines.append(f"  5 Triton/CUDA TGlobal fwd+bwd at S={BENCH_SEQLENS[0]} (<= 1.2x): "
                 + (f"{tg['triton'] / tg['cuda']:.2f}x ({tg['triton']:.3f} / {tg['cuda']:.3f} ms)"
                    if {"triton", "cuda"} <= tg.keys() else "not measured"))
    on, off = (_pass_ms(_load(outdir, f"bench-bias-{name}.json"), "tglobal", "bwd") for name in ("on", "off"))
    cells = [f"{b} {1 - off[b] / on[b]:.1%} ({on[b]:.3f} / {off[b]:.3f} ms)" for b in sorted(on) if b in off]
    lines.append("  5 TGlobal backward, the bias tables' share (1 - without / with; <= 10 %): "
                 + ("; ".join(cells) or "not measured"))
    profiled = _load(outdir, "profile-ops.json")
    rows = [r for r in (profiled or {}).get("results", []) if r.get("status") == "ok"]
    if rows:
        lines.append("  2 GPU activities per call (fwd <= 2, bwd <= 4): " + "; ".join(
            f"{r['op']}{'/' + str(r['globals']) if 'globals' in r else ''} {r['backend']} {r['pass']} "
            f"{r['launches_per_call']:g}" for r in rows))
    for label, run in ((f"S={HOST_SEQLEN}", _load(outdir, "bench-host.json")), (f"S={BENCH_SEQLENS[0]}", bench)):
        host = [r for r in (run or {}).get("results", []) if r["kind"] == "longattn" and r["status"] == "ok"
                and r.get("host_overhead_ms") is not None and r["pass"] in ("fwd", "fwdbwd")]
        if host:
            lines.append(f"  3/7 host overhead at {label}, us (fwd <= 40, fwd+bwd <= 80): " + "; ".join(
                f"{r['op']} {r['impl'].split(':', 1)[1]} {r['pass']} {r['host_overhead_ms'] * 1e3:.0f}"
                for r in host) + _sdpa_floor(run))
    lines += _launch_cache_lines(_load(outdir, "bench-host.json"), _load(outdir, "bench-host-triton-launch.json"))
    memory = _load(outdir, "bench-memory.json")
    cells = []
    for r in (memory or {}).get("results", []):
        floor = _memory_floor(memory, r) if r["status"] == "ok" and r.get("peak_mem_bytes") is not None else None
        if floor:
            cells.append(f"{r['op']} {r['impl'].split(':', 1)[1]} {(r['peak_mem_bytes'] + floor[0]) / floor[1]:.2f}x")
    lines.append(f"  6 fwd+bwd peak / floor at S={MEMORY_SEQLEN} (<= 1.2x): " + ("; ".join(cells) or "not measured"))
    return lines


def summary(outcomes: list[Outcome], outdir: Path, elapsed: float, budget: float) -> str:
    lines = ["", f"== gpu_check summary ({elapsed:.0f} s of {budget:.0f} s budget; logs in {outdir}) ==",
             f"{'step':<19}{'status':<48}{'s':>6}  note"]
    lines += [f"{o.name:<19}{o.status:<48}{o.seconds:>6.0f}  {o.note}" for o in outcomes]
    lines.append("")
    lines += bench_summary(merge_bench(outdir))
    lines += targets_summary(outdir)
    lines += ragged_summary(outdir)
    lines += halo_summary(outdir)
    lines += tune_summary(outdir)
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    outdir = Path(args.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    arch, gpu = gpu_arch(args.python)
    commit = git_commit(args.commit)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIP_NO_INDEX": "1",
           **({"LONGATTN_GIT_COMMIT": commit} if commit else {})}
    print(f"gpu_check: GPU {gpu} (arch {arch}), commit {commit}, budget {args.budget:.0f} s, out {outdir}",
          flush=True)
    steps = make_steps(args, outdir, arch)
    unknown = args.skip - {s.name for s in steps}
    if unknown:
        print(f"gpu_check: --skip: unknown steps {sorted(unknown)}; steps are {[s.name for s in steps]}",
              file=sys.stderr)
        return 2
    remaining = args.budget - (time.monotonic() - start)
    outcomes = run_steps(steps, outdir, remaining, have_gpu=arch, skip=args.skip, env=env)
    elapsed = time.monotonic() - start
    text = summary(outcomes, outdir, elapsed, args.budget)
    (outdir / "summary.txt").write_text(text + "\n")
    note = save_run_record(run_record(outcomes, outdir, gpu if arch else None, commit, args, elapsed), outdir)
    print(text + (f"\nrun record: {note}" if note else ""))
    return 1 if any(o.status.startswith(("FAILED", "stopped")) for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
