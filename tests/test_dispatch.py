"""``backend="auto"``: the measured table, its lookup per op and size class, the cache, and torch.compile.

Runs on CPU: a GPU is faked where needed (a ``cuda`` device object, a monkeypatched compute capability and
backend capabilities), since only the choice is under test, never a kernel.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from longattn import dispatch
from longattn.bench import autotable

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible sm_90 GPU on which every backend supports everything except what ``refuse`` lists."""
    refuse: dict[str, str] = {}

    def unsupported(name, device, dtype, head_dim, op, features=()):
        return [refuse[name]] if name in refuse else []

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(dispatch, "unsupported_reasons", unsupported)
    dispatch.clear_cache()
    yield refuse
    dispatch.clear_cache()


@pytest.fixture
def restore_table():
    yield
    dispatch.load_table()


def _resolve(op, S, requested="auto", device=CUDA):
    return dispatch.resolve_backend(requested, device=device, dtype=torch.bfloat16, head_dim=64, op=op, seqlen=S)


def test_packaged_table_is_complete_and_sourced():
    table = dispatch.auto_table()
    classes = len(table["size_classes"]["measured_seqlens"])
    assert len(table["size_classes"]["upper_bounds"]) == classes - 1
    for source in table["sources"]:
        assert (ROOT / source["file"]).is_file() and source["git_commit"] and source["device"]
    assert table["devices"]
    for entry in table["devices"].values():
        assert set(entry["ops"]) == {*autotable.OPS, "band_side"}
        for rows in entry["ops"].values():
            assert len(rows) == classes
            for row in rows:
                assert row["order"] and set(row["order"]) <= set(dispatch.BACKEND_NAMES)


def test_packaged_table_is_generated_from_its_sources():
    """The table is data rebuilt from the saved results, never edited by hand."""
    table = dispatch.auto_table()
    rebuilt = autotable.build_table([ROOT / s["file"] for s in table["sources"]])
    for source in rebuilt["sources"]:
        source["file"] = str(Path(source["file"]).relative_to(ROOT))
    assert rebuilt == table


@pytest.mark.parametrize("op", ["local", "longformer", "tglobal", "aggregate"])
def test_auto_picks_the_measured_fastest(fake_gpu, op):
    table = dispatch.auto_table()
    for S, row in zip(table["size_classes"]["measured_seqlens"], table["devices"]["sm_90"]["ops"][op]):
        fastest = min(row["ms"], key=row["ms"].get)
        assert _resolve(op, S) == fastest, (op, S, row)


def test_unsupported_first_choice_falls_through(fake_gpu):
    order = dispatch.auto_order(CUDA, "tglobal", 1)
    fake_gpu[order[0]] = "pretend it cannot"
    assert _resolve("tglobal", 16384) == order[1]
    with pytest.raises(dispatch.BackendUnavailableError, match="pretend it cannot"):
        _resolve("tglobal", 16384, requested=order[0])


def test_order_ends_with_every_backend(fake_gpu):
    for op in ("local", "longformer", "tglobal", "aggregate", "band_side", "block_aggregate"):
        for cls in range(3):
            assert sorted(dispatch.auto_order(CUDA, op, cls)) == sorted(dispatch.BACKEND_NAMES)


def test_cpu_is_torch_and_kernel_op_names_still_work():
    cpu = torch.device("cpu")
    for op in ("band_side", "block_aggregate", "local", "aggregate"):
        assert dispatch.resolve_backend("auto", device=cpu, dtype=torch.float32, head_dim=16, op=op) == "torch"
    with pytest.raises(ValueError, match="op"):
        dispatch.resolve_backend("auto", device=cpu, dtype=torch.float32, head_dim=16, op="conv")


def _synthetic_run(path, device, times):
    results = [{"op": op, "S": S, "impl": f"longattn:{b}", "pass": "fwdbwd", "status": "ok", "time_ms": t}
               for (op, S, b), t in times.items()]
    path.write_text(json.dumps({"device": device, "device_type": "cuda", "git_commit": "abc1234",
                                "timestamp": "2026-01-01T00:00:00+00:00", "results": results}))
    return path


def test_table_built_from_results_drives_auto(tmp_path, fake_gpu, restore_table, monkeypatch):
    """End to end on made-up figures: build the table, load it, and check each class's choice and bounds."""
    times = {}
    for op in autotable.OPS:
        for S, (cuda_ms, triton_ms) in {1024: (1.0, 2.0), 4096: (2.0, 1.0), 16384: (3.0, 4.0)}.items():
            times[(op, S, "cuda")], times[(op, S, "triton")] = cuda_ms, triton_ms
    del times[("tglobal", 4096, "triton")]  # a backend missing from one row is tried after the measured ones
    run = _synthetic_run(tmp_path / "run.json", "cuda:0 Fake GPU (sm_80, 40 GiB)", times)
    out = tmp_path / "table.json"
    assert autotable.main([str(run), "--out", str(out)]) == 0
    table = dispatch.load_table(out)
    assert table["size_classes"] == {"measured_seqlens": [1024, 4096, 16384], "upper_bounds": [2048, 8192]}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    expected = {1000: "cuda", 2048: "cuda", 2049: "triton", 8192: "triton", 8193: "cuda", 10**6: "cuda"}
    for S, name in expected.items():
        assert _resolve("longformer", S) == name, S
    assert _resolve("tglobal", 4096) == "cuda"
    assert _resolve("local", None) == "triton"  # no length given: the middle class
    # An architecture the table has not measured uses the nearest measured one (sm_80 here).
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    dispatch.clear_cache()
    assert _resolve("local", 4096) == "triton"


def test_auto_table_cli_refuses_incomplete_results(tmp_path, capsys):
    run = _synthetic_run(tmp_path / "run.json", "cuda:0 Fake GPU (sm_90, 80 GiB)", {("local", 4096, "cuda"): 1.0})
    assert autotable.main([str(run), "--out", str(tmp_path / "t.json")]) == 2
    assert "no measurement of longformer" in capsys.readouterr().err and not (tmp_path / "t.json").exists()


def test_resolution_is_cached(fake_gpu, monkeypatch):
    calls = []
    inner = dispatch.unsupported_reasons
    monkeypatch.setattr(dispatch, "unsupported_reasons", lambda *a: calls.append(a) or inner(*a))
    dispatch.clear_cache()
    first = _resolve("local", 4096)
    n = len(calls)
    assert n >= 1
    for _ in range(100):
        assert _resolve("local", 5000) == first  # same size class: served from the cache
    assert len(calls) == n
    _resolve("local", 65536)  # another size class: resolved afresh
    assert len(calls) > n


def test_resolution_compiles_without_graph_break_for_dynamic_lengths():
    def f(x):
        name = dispatch.resolve_backend("auto", device=x.device, dtype=x.dtype, head_dim=x.shape[-1],
                                        op="local", seqlen=x.shape[1])
        return x * (2 if name == "torch" else 3)

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    for S in (100, 200, 40000):
        x = torch.randn(1, S, 2, 8)
        torch._dynamo.mark_dynamic(x, 1)  # S symbolic from the first call, as a model's varying lengths make it
        torch.testing.assert_close(compiled(x), x * 2)


def test_info_lists_each_backends_optional_features():
    from longattn import info

    features = info.backend_features()
    assert set(features) == {"torch", "triton", "cuda"}
    assert features["torch"] == dict.fromkeys(info.OPTIONAL_FEATURES, "yes")  # the reference takes everything
    assert "grouped-query" in features["cuda"]["grouped_kv"]  # a declined feature shows the backend's reason
    assert "optional features" in info.format_info()


def test_info_says_how_triton_launches(monkeypatch):
    from longattn.triton_kernels import _launch

    from longattn import info

    assert info.triton_launch_mode().startswith("cached") == _launch.ENABLED
    monkeypatch.setattr(_launch, "ENABLED", False)
    assert "LONGATTN_TRITON_LAUNCH=triton" in info.format_info().split("triton_launch", 1)[1].splitlines()[0]


def test_info_runs_from_an_uninstalled_tree(monkeypatch):
    """``longattn info`` from a source tree never installed (the GPU check's first step, seen on an H200 on
    2026-11-30): ``longattn.triton_kernels`` does not import, and info says so instead of failing."""
    from longattn import info

    monkeypatch.setitem(sys.modules, "longattn.triton_kernels", None)  # import of it raises ImportError
    monkeypatch.delitem(sys.modules, "longattn.triton_kernels._launch", raising=False)
    assert info.triton_launch_mode().startswith("unavailable (ModuleNotFoundError")
    assert "triton_launch" in info.format_info()
