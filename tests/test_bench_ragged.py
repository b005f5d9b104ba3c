"""``longattn bench --ragged``: tiny CPU runs of the ops and model modes, inputs consistent across layouts, errors.

No test asserts a timing: only that every row is timed and labelled, the ratios are the quotients of this run's
times, and ``--check`` compares each layout's real-token outputs with the per-sequence oracle.
"""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch

from longattn.bench import ragged
from longattn.bench.cases import Settings, padding_mask
from longattn.cli import main
from longattn.varlen import pack

LENGTHS = [16, 40, 9]
TINY = ["bench", "--ragged", ",".join(map(str, LENGTHS)), "--heads", "2", "--head-dim", "16", "--window", "4",
        "--block-size", "4", "--globals", "2", "--min-run-time", "0.01", "--no-progress", "--backend", "torch"]
OPS = ("local", "longformer", "tglobal", "aggregate")
KINDS = ("padded:torch", "packed:torch", "one-by-one:torch", "hf")


def _run(tmp_path, *extra) -> dict:
    path = tmp_path / "r.json"
    assert main([*TINY, "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def ops_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ragged"), "--check")


def _row(run, op, impl, which):
    return next(r for r in run["results"] if (r["op"], r["impl"], r["pass"]) == (op, impl, which))


def test_ops_rows_timed_and_labelled(ops_run):
    st = ops_run["settings"]
    assert st["mode"] == "ragged" and st["ragged"] == LENGTHS and st["passes"] == ["fwd", "fwdbwd"]
    assert st["baselines"] == ["hf"] and st["seqlens"] == [40] and st["batch"] == 3
    timed = {(r["op"], r["impl"], r["pass"]) for r in ops_run["results"] if r["status"] == "ok"}
    assert timed == {(op, impl, p) for op in OPS for impl in KINDS for p in ("fwd", "fwdbwd")}
    for r in ops_run["results"]:
        assert r["mode"] == "ragged" and r["lengths"] == LENGTHS
        assert (r["B"], r["S"], r["T"]) == (3, 40, sum(LENGTHS))
        assert r["time_ms"] > 0 and r["runs"] >= 1
    # Useful FLOPs: the real tokens', the same for every row of an op.
    for op in ("local", "longformer", "tglobal"):
        counts = {r["fwd_flops"] for r in ops_run["results"] if r["op"] == op}
        assert len(counts) == 1 and counts.pop() > 0


def test_ratios_are_quotients_of_the_measured_times(ops_run):
    for op in OPS:
        for which in ("fwd", "fwdbwd"):
            t = {impl: _row(ops_run, op, impl, which)["time_ms"] for impl in KINDS}
            packed = _row(ops_run, op, "packed:torch", which)
            assert packed["packed_vs_one_by_one"] == pytest.approx(t["packed:torch"] / t["one-by-one:torch"])
            assert packed["padded_vs_packed"] == pytest.approx(t["padded:torch"] / t["packed:torch"])
            assert packed["hf_vs_packed"] == pytest.approx(t["hf"] / t["packed:torch"])
            for impl in ("padded:torch", "one-by-one:torch", "hf"):
                assert "padded_vs_packed" not in _row(ops_run, op, impl, which)


def test_check_every_layout_against_the_per_sequence_oracle(ops_run):
    for r in ops_run["results"]:
        assert r["check"] == "ok", r
        assert r["check_max_err"] < 1e-4
        if r["kind"] == "packed":
            assert r["check_vs_padded"] < 1e-5


def test_check_catches_a_wrong_packed_output(monkeypatch, tmp_path):
    make = ragged._make_packed

    def off_by_one_token(*args):
        forward = make(*args)
        return lambda x: torch.roll(forward(x), 1, 0)  # every row one token late

    monkeypatch.setattr(ragged, "_make_packed", off_by_one_token)
    run = _run(tmp_path, "--check", "--op", "local", "--pass", "fwd", "--baseline", "none")
    assert _row(run, "local", "packed:torch", "fwd")["check"] == "FAIL"
    assert _row(run, "local", "padded:torch", "fwd")["check"] == "ok"


def test_table_and_csv_say_what_ran(tmp_path, capsys):
    csv_path = tmp_path / "r.csv"
    _run(tmp_path, "--op", "aggregate", "--pass", "fwd", "--csv", str(csv_path))
    out = capsys.readouterr().out
    assert "lengths=16,40,9 (B=3, right-padded to S=40; T=65 real tokens" in out
    assert "H=2 D=16 float32 on cpu | backends torch" in out
    assert "packed/1-by-1" in out and "padded/packed" in out
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["impl"] for r in rows] == list(KINDS)
    packed = rows[1]
    assert packed["mode"] == "ragged" and packed["lengths"] == str(LENGTHS) and float(packed["padded_vs_packed"]) > 0


def test_rounds_keep_each_rows_median_round(tmp_path):
    run = _run(tmp_path, "--op", "aggregate", "--pass", "fwd", "--baseline", "none", "--rounds", "3")
    rows = run["results"]
    assert run["settings"]["rounds"] == 3 and len(rows) == 3
    for r in rows:
        assert len(r["round_times_ms"]) == 3 and r["time_ms"] == sorted(r["round_times_ms"])[1]
    t = {r["impl"]: r["time_ms"] for r in rows}
    assert rows[1]["padded_vs_packed"] == pytest.approx(t["padded:torch"] / t["packed:torch"])


@pytest.mark.parametrize("model", ["led", "longt5-local", "longt5-tglobal"])
def test_model_mode_stock_padded_packed(tmp_path, model):
    run = _run(tmp_path, "--model", model, "--layers", "1")
    rows = run["results"]
    assert {r["impl"] for r in rows} == {"stock", "patched:torch", "packed:torch"}
    assert all(r["status"] == "ok" and r["mode"] == "ragged" and r["lengths"] == LENGTHS for r in rows), rows
    t = {(r["impl"], r["pass"]): r["time_ms"] for r in rows}
    for r in rows:
        if r["impl"] == "packed:torch":
            assert r["packed_layers"] == 1  # the one layer really ran packed
            assert r["padded_vs_packed"] == pytest.approx(t[("patched:torch", r["pass"])] / r["time_ms"])
            assert r["hf_vs_packed"] == pytest.approx(t[("stock", r["pass"])] / r["time_ms"])


@pytest.mark.parametrize("op", ["local", "longformer", "tglobal", "aggregate"])
def test_layouts_hold_the_same_numbers(op):
    """Each sequence's tensors are the padded batch's real rows, the packed ones their concatenation (checked
    against ``longattn.varlen.pack``), and the side keys / blocks line up."""
    st = Settings(heads=2, head_dim=8, window=3, block_size=4, globals=2)
    rc = ragged.build_ragged(op, LENGTHS, st)
    real = padding_mask(LENGTHS, 40, "cpu")
    for name in ("q", "k", "v", "x", "global_mask"):
        if name in rc.padded.tensors:
            packed, _ = pack(rc.padded.tensors[name], real)
            assert torch.equal(rc.packed.tensors[name], packed)
            for b, seq in enumerate(rc.sequences):
                assert torch.equal(seq.tensors[name][0], rc.padded.tensors[name][b, :LENGTHS[b]])
    if op == "longformer":
        assert [s.globals for s in rc.sequences] == [2, 2, 2] and rc.packed.globals == 6
    if op == "tglobal":
        cu_blocks = rc.packed.tensors["cu_blocks"].tolist()
        assert cu_blocks == [0, 4, 14, 16]
        for b, seq in enumerate(rc.sequences):
            G_b = LENGTHS[b] // 4
            assert torch.equal(rc.packed.tensors["side_k"][cu_blocks[b]:cu_blocks[b + 1]], seq.tensors["side_k"][0])
            assert torch.equal(seq.tensors["side_k"][0], rc.padded.tensors["side_k"][b, :G_b])
            assert rc.padded.tensors["side_mask"][b].sum() == G_b


@pytest.mark.parametrize("value", ["0,16", "16,-3", "a,b", "16,,9", ""])
def test_bad_lengths_rejected(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--ragged", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--ragged" in err and "positive sequence lengths" in err


@pytest.mark.parametrize("extra, words", [
    (["--seqlen", "64"], "--seqlen does not apply to --ragged"),
    (["--batch", "2"], "--batch does not apply to --ragged"),
    (["--baseline", "flex"], "take no padding"),
    (["--model", "mistral"], "not --model mistral"),
    (["--model", "led", "--rounds", "2"], "--rounds"),
    (["--rounds", "0"], "--rounds"),
])
def test_options_that_do_not_apply(extra, words):
    with pytest.raises(SystemExit, match=words):
        main(["bench", "--ragged", "16,9", *extra])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default")
def test_cpu_default_lengths():
    from longattn.bench.cli import add_parser, resolve_settings

    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    st = resolve_settings(sub.choices["bench"].parse_args(["--ragged"]))
    assert st["ragged"] == [128, 1024, 256, 562] and st["heads"] == 4 and st["dtype"] == "float32"
    assert st["passes"] == ["fwd", "fwdbwd"] and st["mode"] == "ragged"
