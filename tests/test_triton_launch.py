"""The Triton backend's cached launches (``triton_kernels/_launch.py``) launch the kernel Triton would, with the
arguments Triton would pass its C launcher, on every call: first calls, repeated calls (the cached route), new
tensors, other dtypes, misaligned tensors and new shapes.

Runs in a child Python without TRITON_INTERPRET (the interpreter replaces ``triton.jit``), on CPU tensors, with
Triton's host-side launch path emulated for an sm_90 target (``tests/triton_emulation.py``): each call is also bound
by Triton's own binder, and the launch made must match it.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import run_sm90_compile

B, S, H, D, W, BLOCK = 1, 48, 2, 16, 5, 8


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return type(a) is type(b) and a == b


class _Checked:
    """``CachedLaunch.launch`` checked against Triton's binding of the same call: the compiled kernel launched is the
    one of Triton's cache key, and the launcher gets Triton's arguments and grid."""

    def __init__(self, emulation):
        from longattn.triton_kernels import _launch

        self.emulation, self.hits, self.keys = emulation, 0, set()
        real = _launch.CachedLaunch.launch

        def launch(launcher, grid, args, kwargs):
            key, values = emulation.bind(launcher.kernel, args, kwargs)
            misses, n = emulation.misses, len(emulation.launches)
            real(launcher, grid, args, kwargs)
            self.hits += emulation.misses == misses
            self.keys.add((launcher.kernel, key))
            assert len(emulation.launches) == n + 1, "one launch per call"
            made = emulation.launches[-1]
            name = launcher.kernel.__name__
            assert made.kernel is launcher.kernel and made.triton_key == key, f"{name}: another compiled kernel"
            assert made.grid == tuple(grid) + (1,) * (3 - len(grid)), f"{name}: grid {made.grid} for {grid}"
            assert len(made.args) == len(values), f"{name}: {len(made.args)} arguments, Triton passes {len(values)}"
            for i, (a, b) in enumerate(zip(made.args, values)):
                assert _same(a, b), f"{name}: argument {i} ({launcher.kernel.arg_names[i]}) {a!r} != Triton's {b!r}"

        _launch.CachedLaunch.launch = launch
        self._undo = lambda: setattr(_launch.CachedLaunch, "launch", real)


def _tensors(dtype, misaligned=False, seqlen=S, device="cpu"):
    def t(*shape):
        if not misaligned:
            return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()
        n = torch.Size(shape).numel()
        flat = torch.randn(n + 1, dtype=dtype, device=device)
        return flat[1:].view(shape).requires_grad_()  # data_ptr 2 or 4 bytes off 16

    glob = torch.zeros(B, seqlen, dtype=torch.bool, device=device)
    glob[:, [0, seqlen // 2]] = True
    nb = seqlen // BLOCK
    ones = dict(dtype=torch.bool, device=device)
    qb = (torch.arange(seqlen, device=device) // BLOCK).to(torch.int32).expand(B, seqlen).contiguous()
    return dict(q=t(B, seqlen, H, D), k=t(B, seqlen, H, D), v=t(B, seqlen, H, D), sk=t(B, nb, H, D),
                sv=t(B, nb, H, D), rb=t(H, 2 * W + 1), sb=t(H, 2 * nb + 1), x=t(B, seqlen, 32), w=t(32),
                mask=torch.ones(B, seqlen, **ones), glob=glob, bm=torch.ones(B, nb, **ones), qb=qb)


def _calls(t):
    import longattn

    opts = dict(backend="triton")
    yield longattn.local_attention(t["q"], t["k"], t["v"], W, key_padding_mask=t["mask"], rel_bias=t["rb"], **opts)
    yield longattn.local_attention(t["q"], t["k"], t["v"], (W, 2), dropout_p=0.25, **opts)
    yield longattn.tglobal_attention(t["q"], t["k"], t["v"], t["sk"], t["sv"], W, t["qb"], key_padding_mask=t["mask"],
                                     side_mask=t["bm"], rel_bias=t["rb"], side_bias=t["sb"], **opts)
    yield longattn.longformer_attention(t["q"], t["k"], t["v"], W, t["glob"], key_padding_mask=t["mask"],
                                        max_globals=4, **opts)
    yield longattn.longformer_attention(t["q"], t["k"], t["v"], W, t["glob"], max_globals=2, dropout_p=0.1, **opts)
    yield longattn.block_aggregate(t["x"], t["qb"], S // BLOCK, weight=t["w"], **opts)
    T = t["q"].shape[1]
    cu = torch.tensor([0, T // 3, T], dtype=torch.int32, device=t["q"].device)
    yield longattn.local_attention_varlen(t["q"][0], t["k"][0], t["v"][0], cu, T, W, **opts)


def _run_all(dtype, **kw) -> list[torch.Tensor]:
    """Every call's output and gradients (None where a leaf is unused)."""
    t = _tensors(dtype, **kw)
    results = []
    for out in _calls(t):
        leaves = [x for x in t.values() if x.requires_grad]
        results += [out, *torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)]
    return results


def check_cached_launches():
    """Every op forward and backward, twice with new tensors (the second time from the cache), then with fp16,
    misaligned tensors and another length: each launch checked by ``_Checked``; raises on the first difference."""
    from tests.triton_emulation import EmulatedTriton

    emulation = EmulatedTriton().install()
    checked = _Checked(emulation)
    try:
        _run_all(torch.float32)
        first = len(checked.keys)
        hits = checked.hits
        _run_all(torch.float32)
        assert checked.hits - hits == len(emulation.launches) // 2, "the second round was not served from the cache"
        assert len(checked.keys) == first, "the second round compiled other kernels"
        for variant in (dict(dtype=torch.float16), dict(dtype=torch.float32, misaligned=True),
                        dict(dtype=torch.float32, seqlen=S + 8)):  # S not a multiple of 16: new specializations
            keys = len(checked.keys)
            _run_all(**variant)
            assert len(checked.keys) > keys, f"{variant}: Triton compiled nothing new, the test checks nothing"
        assert checked.hits > 0
    finally:
        checked._undo()
        emulation.uninstall()
    print(f"launches {len(emulation.launches)}, from the cache {checked.hits}, Triton kernels {len(checked.keys)}")


def _pointers_kernel():
    """A ``@triton.jit`` kernel of 12 pointers and 2 scalars (its body is never compiled: the emulation launches
    nothing)."""
    import triton

    @triton.jit
    def _pointers(x, d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, y, n, flag):
        pass

    return _pointers


def _pointer_args(dummy, **changes) -> dict:
    """One call's arguments of ``_pointers_kernel``: ``dummy`` for d0 to d9, then ``changes``."""
    args = dict(x=torch.zeros(64), **{f"d{i}": dummy for i in range(10)}, y=torch.zeros(64), n=64, flag=False)
    return {**args, **changes}


def check_repeated_tensors():
    """A kernel given one dummy tensor for 10 pointers, as the launchers pass them: the cache reads the dtype and
    pointer of each distinct tensor only, so the dummy or another tensor misaligned or of another dtype, each way a
    repeat can stop repeating (another dtype, a misaligned tensor, None, another tensor), a second pattern of repeats
    in the same layout, and a changed scalar must each launch Triton's kernel for that call (``_Checked``); every call
    twice, the second time from the cache."""
    from longattn.triton_kernels._launch import cached

    from tests.triton_emulation import EmulatedTriton

    f32, misaligned, f16 = (lambda: torch.zeros(1)), (lambda: torch.zeros(5)[1:]), (lambda: torch.zeros(1).half())
    calls = [lambda: _pointer_args(f32()), lambda: _pointer_args(misaligned()), lambda: _pointer_args(f16()),
             lambda: _pointer_args(f32(), x=misaligned()), lambda: _pointer_args(f32(), y=f16()),
             lambda: _pointer_args(f32(), d3=f16()), lambda: _pointer_args(f32(), d9=misaligned()),
             lambda: _pointer_args(f32(), d5=None), lambda: _pointer_args(f32(), d0=f32()),
             lambda: _pointer_args(f32(), **dict.fromkeys([f"d{i}" for i in range(5, 10)], f32())),
             lambda: _pointer_args(f32(), n=65), lambda: _pointer_args(f32(), flag=True),
             lambda: _pointer_args(f32(), n=True)]
    kernel = _pointers_kernel()
    emulation = EmulatedTriton().install()
    checked = _Checked(emulation)
    try:
        for second in (False, True):
            hits = checked.hits
            for call in calls:
                args = call()
                n, flag = args.pop("n"), args.pop("flag")
                cached(kernel)[(1,)](*args.values(), n=n, flag=flag)
            if second:
                assert checked.hits - hits == len(calls), "the second round was not served from the cache"
        layouts = cached(kernel).layouts.values()
        assert sum(len(layout.sharings) for layout in layouts) >= 2, "no repeats checked: the test checks nothing"
        assert len(checked.keys) >= 8, "Triton compiled one kernel for most calls: the test checks nothing"
    finally:
        checked._undo()
        emulation.uninstall()


def test_repeated_tensors_launch_triton_kernel():
    assert os.environ.get("LONGATTN_TRITON_LAUNCH") != "triton", "the cached launches are off: nothing to test"
    run_sm90_compile("tests.test_triton_launch:check_repeated_tensors")


def check_launch_hooks():
    """Triton's hook chains in ``knobs.runtime``: empty, the cached launch passes None for both hooks and builds no
    launch metadata (Triton would call the empty chains); with a hook in either chain, that chain and the compiled
    kernel's metadata reach the launcher."""
    from longattn.triton_kernels import _launch
    from longattn.triton_kernels._launch import cached
    from triton import knobs

    from tests.triton_emulation import EmulatedTriton

    kernel = _pointers_kernel()
    emulation = EmulatedTriton().install()
    _launch.runtime.hooks = knobs.runtime
    seen = []
    compiled = None
    try:
        def launch():
            args = _pointer_args(torch.zeros(1))
            n, flag = args.pop("n"), args.pop("flag")
            return cached(kernel)[(1,)](*args.values(), n=n, flag=flag)

        compiled = launch()  # the first launch: Triton's own path, which calls the chains itself
        real_run, real_metadata = compiled.run, compiled.launch_metadata
        compiled.run = lambda *a: (seen.append(a[6:9]), real_run(*a))
        compiled.launch_metadata = lambda *a: ("metadata", real_metadata(*a))[0]
        launch()
        assert seen[-1] == (None, None, None), seen[-1]
        for chain in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
            hook = lambda metadata: None  # noqa: E731 (never called: the emulated launcher calls no hook)
            chain.add(hook)
            try:
                launch()
                enter, leave = seen[-1][1:]
                assert seen[-1][0] == "metadata" and chain in (enter, leave), seen[-1]
                assert (enter is None) == (chain is knobs.runtime.launch_exit_hook), seen[-1]
            finally:
                chain.remove(hook)
    finally:
        if compiled is not None:
            vars(compiled).pop("run", None), vars(compiled).pop("launch_metadata", None)
        emulation.uninstall()


def test_empty_launch_hooks_are_not_called():
    assert os.environ.get("LONGATTN_TRITON_LAUNCH") != "triton", "the cached launches are off: nothing to test"
    run_sm90_compile("tests.test_triton_launch:check_launch_hooks")


def test_cached_launches_match_triton():
    env_off = os.environ.get("LONGATTN_TRITON_LAUNCH") == "triton"
    assert not env_off, "LONGATTN_TRITON_LAUNCH=triton turns the cached launches off: nothing to test"
    run_sm90_compile("tests.test_triton_launch:check_cached_launches")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [dict(dtype=torch.float16), dict(dtype=torch.bfloat16),
                                     dict(dtype=torch.float16, misaligned=True)], ids=["fp16", "bf16", "misaligned"])
def test_cached_launches_equal_triton_launches_bitwise_on_gpu(variant, monkeypatch):
    """On a GPU: every op, forward and backward, launched through Triton (``ENABLED`` off) and through the cache
    (twice: the second round from it) give bitwise the same results (the kernels are deterministic; dropout draws
    from the same seed)."""
    from longattn.triton_kernels import _launch

    from longattn.backends import triton_backend

    if triton_backend.unavailable_reasons(torch.device("cuda")):
        pytest.skip("; ".join(triton_backend.unavailable_reasons(torch.device("cuda"))))
    runs = []
    for enabled in (False, True, True):
        monkeypatch.setattr(_launch, "ENABLED", enabled)
        torch.manual_seed(0)
        runs.append(_run_all(device="cuda", **variant))
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other)):
            assert (a is None) == (b is None), i
            assert a is None or torch.equal(a, b), f"result {i} differs between Triton's launch and the cached one"
