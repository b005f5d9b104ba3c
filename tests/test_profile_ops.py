"""``benchmarks/profile_ops.py``'s plumbing on CPU (its figures are GPU kernels; here it lists aten ops)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("profile_ops", ROOT / "benchmarks" / "profile_ops.py")
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


def test_host_profile_plumbing_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("host_profile", ROOT / "benchmarks" / "host_profile.py")
    hp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hp)
    if torch.cuda.is_available():
        import pytest

        pytest.skip("the CPU plumbing run: on a GPU the script profiles the kernel backends")
    out = tmp_path / "host.txt"
    assert hp.main(["--seqlen", "32", "--op", "aggregate", "--calls", "3", "--top", "5", "--out", str(out)]) == 0
    text = out.read_text()
    assert "aggregate  torch  fwd" in text and "aggregate  torch  fwdbwd" in text
    assert text.count("==== aggregate torch") == 2 and "Ordered by: internal time" in text
    assert "us per call" in capsys.readouterr().out
