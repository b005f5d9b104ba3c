"""The short eager call path (issue 12, target 3: host cost per call; the figures are
``benchmarks/bench_host_overhead.py``'s, never asserted here).

In plain eager mode the public ops call the custom ops' Python implementations directly (no dispatcher round
trip); anything that must see or reinterpret the op (a dispatch mode, fake / meta tensors, the profiler,
``torch.compile``) gets the op itself. Both paths must run the same code and give the same results, and the
Longformer backward must reuse the forward's slot layout instead of recomputing it.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import longattn
from longattn import _ops
from longattn.backends import _longformer
from tests.test_host_sync import OpLog, _calls, _inputs


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _run(call, t, leaves):
    out = call()
    grads = torch.autograd.grad(out, [t[n] for n in leaves], torch.randn_like(out, generator=torch.Generator()
                                                                               .manual_seed(1)))
    with torch.no_grad():
        return out, grads, call()


def test_plain_eager_only_without_anything_that_must_see_the_op():
    x = torch.zeros(2)
    with torch.no_grad():
        assert _ops._plain_eager(x)
        assert not _ops._plain_eager(torch.zeros(2, device="meta"))
        with _PassThrough():
            assert not _ops._plain_eager(x)
        with torch.device("cpu"):  # a torch function mode
            assert not _ops._plain_eager(x)
        with torch.autograd.profiler.profile():
            assert not _ops._plain_eager(x)
    assert not _ops._plain_eager(x)  # grad mode on: the op's autograd formula must record the call


@pytest.mark.parametrize("name", list(_calls(_inputs(), "torch")))
def test_direct_calls_match_the_ops(name):
    """Outputs, gradients and the no-grad forward are bitwise those of the op path (forced by a dispatch mode)."""
    t = _inputs()
    call, leaves = _calls(t, "torch")[name]
    direct = _run(call, t, leaves)
    with _PassThrough():
        via_ops = _run(call, t, leaves)
    for got, want in zip(torch.utils._pytree.tree_leaves(direct), torch.utils._pytree.tree_leaves(via_ops)):
        assert torch.equal(got, want)


def test_dispatch_mode_still_sees_one_op_each_way():
    t = _inputs()
    call, leaves = _calls(t, "torch")["local"]
    with OpLog() as log:
        out = call()
        torch.autograd.grad(out, [t[n] for n in leaves], torch.ones_like(out))
        with torch.no_grad():
            call()
    ops = [op for op in log.ops if op.startswith("longattn.")]
    assert ops == ["longattn.band_side_attention", "longattn.band_side_attention_backward",
                   "longattn.band_side_attention"], log.ops


def test_profiler_shows_the_ops_by_name():
    t = _inputs()
    call, leaves = _calls(t, "torch")["tglobal"]
    with torch.autograd.profiler.profile() as prof:
        out = call()
        torch.autograd.grad(out, [t[n] for n in leaves], torch.ones_like(out))
    names = {e.name for e in prof.function_events}
    assert {"longattn::band_side_attention", "longattn::band_side_attention_backward"} <= names


@pytest.mark.parametrize("grad", [False, True])
def test_meta_tensors_run_the_fakes(grad):
    q = torch.empty(2, 16, 2, 8, device="meta", requires_grad=grad)
    out = longattn.local_attention(q, q, q, 3, backend="torch")
    assert out.device.type == "meta" and out.shape == q.shape


def test_longformer_backward_reuses_the_forward_slots(monkeypatch):
    calls = []
    original = _longformer.global_slots

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(_longformer, "global_slots", counting)
    t = _inputs()
    for name in ("longformer", "longformer-global-projections"):
        call, leaves = _calls(t, "torch")[name]
        calls.clear()
        out = call()
        torch.autograd.grad(out, [t[n] for n in leaves], torch.ones_like(out))
        assert len(calls) == 1, name
