"""Launch a compiled Triton kernel without Triton's per-call argument binding (issue 12, target 3: host cost).

``kernel[grid](*args, **kwargs)`` runs ``JITFunction.run``: a generated binder that calls Triton's native
specialisation once per parameter and builds a dict of all of them, a string cache key, the check of the globals
the kernel reads, then the C launcher. With the band kernels' 97 to 121 parameters that is ~30 us per launch on
this project's CPU, more than all of longattn's own host work for a call (``benchmarks/bench_triton_launchers.py``).

``cached(kernel)[grid](*args, **kwargs)`` does the same launch for a third of that: the first call with a given
*argument key* goes through ``JITFunction.run`` (which compiles or finds the kernel, and launches it), and the
compiled kernel it returns is kept under that key; later calls with the same key hand the arguments straight to the
compiled kernel's C launcher, exactly as ``JITFunction.run`` would (every parameter in signature order, defaults
filled in, the same stream and launch hooks). The key holds every argument's type, every scalar's value, every
tensor's dtype and whether it starts at a multiple of 16 bytes (what Triton specialises a pointer on), the keyword
names and the current device: two calls with the same key get the same specialisation from Triton, so the same
compiled kernel. It is finer than Triton's key (scalars by value, not by divisibility), so the first call of each new
shape pays Triton's binding once more. Launchers pass one dummy tensor for many absent pointers (the local forward's
21 tensors are 6 objects): where a call's tensors repeat as a pattern its layout has learnt (``_Sharing``: each
repeat ``is`` an earlier tensor), the key names that pattern and holds the dtype and alignment of the distinct tensors
only. ``tests/test_triton_launch.py`` checks, on CPU with Triton's launch path emulated for sm_90, that every cached
launch is the one Triton would make (also when a repeat stops repeating), and on a GPU that results are bitwise
Triton's.

Measured on this project's 2-core CPU (Triton 3.8, its launch path emulated for sm_90 as in the tests; ``timeit`` of
one launch of the local forward's ``_rows_kernel``, 50 arguments and 39 keywords, 21 tensors of 6 objects, minimum of
three runs): 11.1 us cached (``CachedLaunch.launch`` alone 9.2 us; 12.7 and 10.8 us when every tensor's dtype and
pointer was read), 40 us through ``JITFunction.run``. Whole calls: ``benchmarks/bench_triton_launchers.py``.

Not cached (Triton's own ``kernel[grid]`` instead): the interpreter (``TRITON_INTERPRET=1``), a kernel with
``pre_run_hooks``, a callable grid, an argument that is neither a tensor nor an int, float, bool, str or None, and
everything when ``LONGATTN_TRITON_LAUNCH=triton`` (read at import; for
comparisons). Triton's check that the globals a kernel reads have not changed since it was compiled runs on the first
call of each key only: longattn's kernels read constant globals.
"""

from __future__ import annotations

import functools
import operator
import os

import torch

_MAX_KEYS = 256  # per kernel; past it the cache starts over (a long run over ever-new shapes stays bounded)
ENABLED = os.environ.get("LONGATTN_TRITON_LAUNCH", "cached") != "triton"
# Scalars the key holds by value (with their types: True and 1 specialise differently). Any other argument type
# (a tuple, a Triton dtype, ...) sends the call to Triton's own launch.
_SCALARS = frozenset({int, float, bool, str, type(None)})
# Repeated tensor arguments (``_Sharing``) from which checking for them pays: on this CPU the check costs ~25 ns a
# repeat and ~0.3 us more, reading a tensor's dtype and pointer ~0.1 us (Longformer's 3 to 9 repeats do not pay).
_MIN_REPEATS = 8
_LEARNING_CALLS = 8  # per layout: its first calls that no known _Sharing holds for are searched for one (Python loop)


_dtype = operator.attrgetter("dtype")
_data_ptr = torch.Tensor.data_ptr


def _alignment(pointers: tuple[int, ...]) -> bool | tuple:
    """Which of the tensors' data pointers are multiples of 16 bytes (Triton's pointer specialisation): True when
    all are (the common case, found without a Python loop), else one bool per pointer."""
    if not functools.reduce(operator.or_, pointers, 0) & 15:
        return True
    return tuple([p & 15 == 0 for p in pointers])


def _picker(indices):
    """values -> the tuple of values[i] for i in indices (``itemgetter``, which returns a bare item for one index)."""
    if len(indices) == 1:
        i = indices[0]
        return lambda values: (values[i],)
    return operator.itemgetter(*indices) if indices else lambda values: ()


def _firsts(tensors) -> tuple[int, ...]:
    """For each of ``tensors``, the index of the first one that is the same object."""
    first: dict[int, int] = {}
    return tuple([first.setdefault(id(t), i) for i, t in enumerate(tensors)])


class _Sharing:
    """Which of a call's tensor arguments are one object (launchers pass one dummy tensor for each absent pointer:
    the local forward's 21 tensors are 6 objects): ``positions`` are the tensors' indices in ``values``, ``firsts``
    their ``_firsts``. It holds for another call whose tensors repeat at least so (each of ``repeats_of(values)``
    ``is`` its ``firsts_of(values)``); then every tensor's dtype and pointer is one of ``distinct(values)``'s (the
    first of each object), so the key needs only those."""

    def __init__(self, positions: list[int], firsts: tuple[int, ...]):
        repeats = [i for i, j in enumerate(firsts) if i != j]
        self.repeats = len(repeats)
        self.distinct = _picker([positions[i] for i in sorted(set(firsts))])
        self.repeats_of = _picker([positions[i] for i in repeats])
        self.firsts_of = _picker([positions[firsts[i]] for i in repeats])


class _Layout:
    """Where a call's arguments go, for one pattern of argument types and keyword names: ``values`` = positional
    arguments then keyword values, in call order. ``scalars`` / ``tensors`` pick them out for the key (``positions``:
    the tensors' indices), ``sharings`` the patterns of repeated tensors learnt (``learn``); ``bound(values)`` is every
    kernel parameter in signature order (Triton's bound arguments), the parameters not given taking their defaults.
    ``cacheable``: every argument a tensor or a ``_SCALARS`` value."""

    def __init__(self, kernel, n_args: int, kwargs: dict, types: tuple):
        self.cacheable = all(issubclass(t, torch.Tensor) or t in _SCALARS for t in types)
        self.positions = [i for i, t in enumerate(types) if issubclass(t, torch.Tensor)]
        self.tensors = _picker(self.positions)
        self.scalars = _picker([i for i, t in enumerate(types) if not issubclass(t, torch.Tensor)])
        self.sharings: list[_Sharing] = []  # learnt, in order; the first that holds is a call's (``CachedLaunch``)
        self.learning = _LEARNING_CALLS
        names = list(kernel.signature.parameters)
        given = {name: n_args + i for i, name in enumerate(kwargs)}
        missing = [name for name in names[n_args:] if name not in given]
        self.defaults = tuple(kernel.signature.parameters[name].default for name in missing)
        at_default = {name: len(types) + i for i, name in enumerate(missing)}
        self.order = list(range(n_args)) + [given.get(name, at_default.get(name)) for name in names[n_args:]]
        self.bound = self._binder(len(types))

    def _binder(self, n_values: int):
        """values -> ``values + defaults`` in signature order, without the copies a call needs none of (no
        defaults: no concatenation; nothing to reorder either: ``values`` itself)."""
        ordered, defaults = _picker(self.order), self.defaults
        if defaults:
            return lambda values: ordered(values + defaults)
        return (lambda values: values) if self.order == list(range(n_values)) else ordered

    def learn(self, values) -> _Sharing | None:
        """The ``_Sharing`` of ``values``' tensors, appended to ``sharings``, if it has ``_MIN_REPEATS`` repeats
        (checking one costs about what reading a few tensors' dtypes and pointers does), else None. Called only for
        the first ``_LEARNING_CALLS`` calls none of ``sharings`` holds for. The sharing a call gets (the first of
        ``sharings`` that holds, else None) is then a function of the call alone, so the same call always finds its
        entry: an appended sharing holds for no call that got None before (that call had fewer repeats), and comes
        after the one any other call got."""
        self.learning -= 1
        sharing = _Sharing(self.positions, _firsts(self.tensors(values)))
        if sharing.repeats < _MIN_REPEATS:
            return None
        self.sharings.append(sharing)
        return sharing


def _live(hook):
    """A launch hook as Triton's C launcher should get it: None when there is nothing to call. Triton (3.6, 3.8) keeps
    an empty ``HookChain`` in ``knobs.runtime`` when no hook is set, and its launcher calls any hook that is not None,
    with the ``launch_metadata`` built for it, at every launch, for nothing: on this CPU the two empty calls take
    0.28 us and the metadata's dict 0.24 us, plus ``launch_metadata``'s own call (a profiler's hook added to the
    chain makes it live again)."""
    return None if hook is None or not getattr(hook, "calls", True) else hook


class _Runtime:
    """Triton's device, stream and launch-hook getters, bound on first use (replaced by the CPU tests' emulation)."""

    def __init__(self):
        self.bound = False

    def bind(self):
        from triton import knobs
        from triton.runtime import driver

        active = driver.active
        self.device, self.stream, self.hooks = active.get_current_device, active.get_current_stream, knobs.runtime
        self.bound = True


runtime = _Runtime()


class CachedLaunch:
    """``cached(kernel)``: ``[grid](*args, **kwargs)`` as ``kernel[grid]`` with the launches cached (module
    docstring). ``layouts``: (argument types, keyword names) -> ``_Layout``; ``entries``: argument key -> the
    compiled kernel."""

    def __init__(self, kernel):
        from triton.runtime.jit import JITFunction

        self.kernel = kernel
        self.layouts: dict = {}
        self.entries: dict = {}
        self.cacheable = isinstance(kernel, JITFunction)

    def __getitem__(self, grid):
        if not (ENABLED and self.cacheable and isinstance(grid, tuple)) or self.kernel.pre_run_hooks:
            return self.kernel[grid]
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        values = (*args, *kwargs.values())
        shape = (tuple(map(type, values)), tuple(kwargs))
        layout = self.layouts.get(shape)
        if layout is None:
            layout = self.layouts[shape] = _Layout(self.kernel, len(args), kwargs, shape[0])
        if not layout.cacheable:
            return self.kernel[grid](*args, **kwargs)
        if not runtime.bound:
            runtime.bind()
        device = runtime.device()
        for sharing in layout.sharings:  # the first that holds (inline: a Python call costs as much)
            if all(map(operator.is_, sharing.repeats_of(values), sharing.firsts_of(values))):
                break
        else:
            sharing = layout.learn(values) if layout.learning else None
        tensors = layout.tensors(values) if sharing is None else sharing.distinct(values)
        key = (device, layout, sharing, layout.scalars(values), tuple(map(_dtype, tensors)),
               _alignment(tuple(map(_data_ptr, tensors))))
        compiled = self.entries.get(key)
        if compiled is None:
            return self._first_launch(key, grid, args, kwargs)
        values = layout.bound(values)
        stream = runtime.stream(device)
        hooks = runtime.hooks
        enter, leave = _live(hooks.launch_enter_hook), _live(hooks.launch_exit_hook)
        metadata = None if enter is None and leave is None else compiled.launch_metadata(grid, stream, *values)
        n = len(grid)
        compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, compiled.function,
                     compiled.packed_metadata, metadata, enter, leave, *values)
        return compiled

    def _first_launch(self, key, grid, args, kwargs):
        compiled = self.kernel.run(*args, grid=grid, warmup=False, **kwargs)
        if len(self.entries) >= _MAX_KEYS:
            self.entries.clear()
            self.layouts.clear()
        self.entries[key] = compiled
        return compiled


_LAUNCHERS: dict[int, CachedLaunch] = {}


def cached(kernel) -> CachedLaunch:
    """The one ``CachedLaunch`` of ``kernel`` (a ``@triton.jit`` function; under the interpreter it launches as
    Triton's ``kernel[grid]``)."""
    launcher = _LAUNCHERS.get(id(kernel))
    if launcher is None or launcher.kernel is not kernel:
        launcher = _LAUNCHERS[id(kernel)] = CachedLaunch(kernel)
    return launcher
