"""Triton's host-side launch path for an sm_90 target, run on CPU tensors without a GPU (no compile, no launch).

``EmulatedTriton`` replaces ``JITFunction.run`` with what it does on the host before the C launcher (the generated
binder with each argument's native specialisation, the compile-cache key, the check of the globals the kernel reads)
and returns, per (kernel, Triton cache key), one ``FakeCompiled`` standing in for the compiled kernel: its ``run`` is
the C launcher's signature and records each launch. Triton's own ``JITFunction.run`` is therefore emulated exactly up
to the compile, so ``expected`` tells which compiled kernel and which launcher arguments Triton would use for a call.
``longattn.triton_kernels._launch``'s device, stream and hooks are pointed at CPU stand-ins, and the Triton backend is
made available on CPU. Needs TRITON_INTERPRET unset (the interpreter replaces ``triton.jit``).

Used by ``tests/test_triton_launch.py`` (the cached launches pass Triton's arguments to Triton's kernel) and
``benchmarks/bench_triton_launchers.py`` (host cost of the launch routes).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Launch:
    kernel: object  # the JITFunction
    triton_key: str  # Triton's compile-cache key of the compiled kernel launched
    grid: tuple
    args: tuple  # the launcher's arguments after the hooks: every parameter in signature order
    options: dict = field(default_factory=dict)  # the launch options compiled in (num_warps, maxnreg, ...)


@dataclass
class FakeCompiled:
    """A compiled kernel's launch interface (``function``, ``packed_metadata``, ``launch_metadata``, ``run``)."""

    kernel: object
    triton_key: str
    launches: list = field(default_factory=list)
    record: bool = True
    function: object = None
    packed_metadata: object = None
    options: dict = field(default_factory=dict)

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook,
            *args):
        if self.record:
            self.launches.append(Launch(self.kernel, self.triton_key, (grid_0, grid_1, grid_2), args, self.options))


class _Hooks:
    launch_enter_hook = None
    launch_exit_hook = None


class EmulatedTriton:
    """``install()`` patches (and returns self), ``uninstall()`` restores. ``launches``: every launch, in order,
    whichever route made it; ``record=False`` keeps none (benchmarks). ``misses``: the calls of ``JITFunction.run``."""

    def __init__(self, record: bool = True):
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime import jit

        self._jit, self._knobs = jit, knobs
        self._backend = make_backend(GPUTarget("cuda", 90, 32))
        self._binders: dict = {}
        self._compiled: dict = {}
        self.launches: list[Launch] = []
        self.record = record
        self.misses = 0
        self._undo: list = []

    def bind(self, kernel, args, kwargs):
        """-> (Triton's cache key, the bound arguments' values in signature order) of ``kernel`` called so."""
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or self._knobs.runtime.debug
        kwargs["instrumentation_mode"] = self._knobs.compilation.instrumentation_mode
        if kernel not in self._binders:
            kernel.cache_key  # noqa: B018 (as a first compile would: records the globals the kernel reads)
            self._binders[kernel] = {}, self._jit.create_function_from_signature(kernel.signature, kernel.params,
                                                                                 self._backend)
        key_cache, binder = self._binders[kernel]
        bound_args, specialization, options = binder(*args, **kwargs)
        key = self._jit.compute_cache_key(key_cache, specialization, options)
        absent = object()
        for (name, _), (val, globals_dict) in kernel.used_global_vals.items():
            if globals_dict.get(name, absent) != val:
                raise RuntimeError(f"global {name} changed")
        return key, tuple(bound_args.values())

    def compiled(self, kernel, key, options=None) -> FakeCompiled:
        if (kernel, key) not in self._compiled:
            self._compiled[kernel, key] = FakeCompiled(kernel, key, self.launches, self.record, options=options or {})
        return self._compiled[kernel, key]

    def _run(self, kernel, *args, grid, warmup, **kwargs):
        self.misses += 1
        key, values = self.bind(kernel, args, kwargs)
        # Triton's key holds the options, so one compiled kernel has one set of them
        compiled = self.compiled(kernel, key, {k: v for k, v in kwargs.items() if k not in kernel.arg_names})
        if not warmup:
            n = len(grid)
            compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, 0, None, None, None, None, None,
                         *values)
        return compiled

    def _patch(self, owner, name, value):
        old = getattr(owner, name)
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, old))

    def install(self):
        from longattn.triton_kernels import _launch

        from longattn.backends import triton_backend

        emulation = self
        self._patch(self._jit.JITFunction, "run", lambda kernel, *a, **k: emulation._run(kernel, *a, **k))
        self._patch(triton_backend, "unavailable_reasons", lambda device: [])
        runtime = _launch.runtime
        saved = dict(vars(runtime))
        vars(runtime).update(bound=True, device=lambda: 0, stream=lambda device: 0, hooks=_Hooks)
        self._undo.append(lambda: (vars(runtime).clear(), vars(runtime).update(saved)))
        _launch._LAUNCHERS.clear()  # no compiled kernel of an earlier emulation (or of a GPU) is reused
        return self

    def uninstall(self):
        from longattn.triton_kernels import _launch

        while self._undo:
            self._undo.pop()()
        _launch._LAUNCHERS.clear()
