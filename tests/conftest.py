"""Shared fixtures: the GPU marker's skip, and random inputs for the primitive."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# Triton tests run on a CUDA GPU, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, which must be set
# before Triton is imported, hence in the environment).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(),
    reason="Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 in the environment to run on CPU "
    "(e.g. TRITON_INTERPRET=1 pytest tests/test_triton_backend.py)",
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclasses.dataclass
class Case:
    """One call of the primitive: q, k, v (B, S, H, D), side keys (B, G, H, D) and the optional extras."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    side_k: torch.Tensor
    side_v: torch.Tensor
    window: tuple[int, int]
    query_block: torch.Tensor
    key_padding_mask: torch.Tensor | None = None
    side_mask: torch.Tensor | None = None
    rel_bias: torch.Tensor | None = None
    side_bias: torch.Tensor | None = None
    scale: float = 1.0

    def _differentiable(self):
        return (self.q, self.k, self.v, self.side_k, self.side_v, self.rel_bias, self.side_bias)

    def leaves(self):
        """The differentiable inputs, in a fixed order."""
        return [x for x in self._differentiable() if x is not None]

    def grad_names(self):
        """Names of the gradients of ``leaves()``, in the same order."""
        return [n for n, x in zip(GRAD_NAMES, self._differentiable()) if x is not None]

    def cast(self, dtype, device=None):
        """A detached copy in ``dtype`` (floats only) with fresh leaves that require grad."""
        def conv(x):
            if x is None:
                return None
            y = x.detach().to(device=device or x.device)
            if y.is_floating_point():
                y = y.to(dtype).requires_grad_(True)
            return y
        return dataclasses.replace(self, **{f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def run(self, backend):
        import longattn

        return longattn.tglobal_attention(
            self.q, self.k, self.v, self.side_k, self.side_v, self.window, self.query_block,
            key_padding_mask=self.key_padding_mask, side_mask=self.side_mask, rel_bias=self.rel_bias,
            side_bias=self.side_bias, scale=self.scale, backend=backend)

    def run_oracle(self):
        from tests import reference

        return reference.band_side_attention(
            self.q, self.k, self.v, self.side_k, self.side_v, self.window, band_key_mask=self.key_padding_mask,
            side_mask=self.side_mask, query_block=self.query_block, band_bias=self.rel_bias,
            side_bias=self.side_bias, scale=self.scale)


def make_case(B=2, S=37, H=2, D=16, window=(4, 3), G=0, *, bias=False, padding=None, side_padding=False,
              scale=None, layout="bshd", seed=0, dtype=torch.float64, device="cpu") -> Case:
    """Random inputs. ``padding``: None, "tail" (row b loses its last tokens) or "rows" (row 0 all padding).

    ``layout="bhsd"`` makes q, k, v non-contiguous ``(B, H, S, D).transpose(1, 2)`` views.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

    if layout == "bhsd":
        q, k, v = (randn(B, H, S, D).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (randn(B, S, H, D) for _ in range(3))
    side_k, side_v = randn(B, G, H, D), randn(B, G, H, D)
    left, right = window
    key_padding_mask = None
    if padding == "tail":
        lengths = torch.tensor([S - (b * S) // (2 * B) for b in range(B)])
        key_padding_mask = (torch.arange(S)[None, :] < lengths[:, None]).to(device)
    elif padding == "rows":
        key_padding_mask = torch.ones(B, S, dtype=torch.bool)
        key_padding_mask[0] = False
        key_padding_mask = key_padding_mask.to(device)
    side_mask = None
    if side_padding and G > 0:
        side_mask = (torch.rand(B, G, generator=gen) > 0.3).to(device)
    if G > 0:
        query_block = torch.randint(-1, G, (B, S), generator=gen).to(device)
    else:
        query_block = torch.full((B, S), -1, device=device)
    rel_bias = randn(H, left + right + 1) if bias else None
    side_bias = randn(H, 2 * G + 1) if bias and G > 0 else None
    return Case(q, k, v, side_k, side_v, (left, right), query_block, key_padding_mask, side_mask, rel_bias,
                side_bias, D**-0.5 if scale is None else scale).cast(dtype)


def longformer_leaves(name, B, S, H, D, *, projections, pad_tail, dtype, device):
    """Random Longformer inputs seeded by ``name``: ``(q, k, v), kwargs, leaves``. q, k, v (and with
    ``projections`` q_global, k_global, v_global) are (B, S, H, D) leaves drawn in float64 then cast; ``kwargs``
    holds them and a key_padding_mask whose batch row 1 loses its last ``pad_tail`` tokens; ``leaves`` lists every
    tensor that gets a gradient."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))

    def leaf():
        return torch.randn(B, S, H, D, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()

    q, k, v = leaf(), leaf(), leaf()
    qg, kg, vg = (leaf(), leaf(), leaf()) if projections else (None, None, None)
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, S - pad_tail:] = False
    kwargs = dict(key_padding_mask=pad.to(device), q_global=qg, k_global=kg, v_global=vg)
    return (q, k, v), kwargs, [x for x in (q, k, v, qg, kg, vg) if x is not None]


def grads(out, leaves, seed=1):
    """Gradients of <out, R> for a fixed random R, for every leaf (zeros where a leaf is unused)."""
    gen = torch.Generator().manual_seed(seed)
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    got = torch.autograd.grad(out, leaves, cot, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, leaves)]


GRAD_NAMES = ("dq", "dk", "dv", "dside_k", "dside_v", "drel_bias", "dside_bias")


def check_backend_against_oracle(case: Case, backend: str, dtype: torch.dtype, oracle=None):
    """The tolerance rule (DESIGN.md section 4) for one case: ``backend`` in ``dtype``, output and every grad.

    The error bound comes from the torch backend on the same inputs in the same dtype, both measured
    against ``oracle`` = (output, grads), by default the fp64 dense oracle on ``case``. Also checks that
    outputs and grads have the input's dtype and shape, the output is contiguous, and all are finite.
    Returns (the case run on ``backend``, its output, its grads).
    """
    from tests.tolerance import assert_within_rule

    if oracle is None:
        ref = case.run_oracle()
        oracle = (ref, grads(ref, case.leaves()))
    ref, ref_grads = oracle
    runs = {}
    for name in ("torch", backend):
        run_case = case.cast(dtype)
        out = run_case.run(name)
        runs[name] = (run_case, out, grads(out, run_case.leaves()))
    _, base_out, base_grads = runs["torch"]
    test, out, got = runs[backend]
    assert out.dtype == dtype and out.shape == case.q.shape and out.is_contiguous()
    assert torch.isfinite(out).all(), f"{backend}: non-finite output"
    assert_within_rule("out", out, base_out, ref)
    for name, g, b, r, leaf in zip(case.grad_names(), got, base_grads, ref_grads, test.leaves()):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        assert torch.isfinite(g).all(), f"{backend}: non-finite {name}"
        assert_within_rule(name, g, b, r, grad=True)
    return test, out, got


def run_sm90_compile(entry: str) -> None:
    """Run ``entry`` ("module:function", e.g. "tests.test_triton_backend:compile_all_for_sm90") in a child Python
    without TRITON_INTERPRET (the interpreter replaces ``triton.jit``, so nothing would compile) and fail with its
    stderr if it raises. Skips when Triton's NVIDIA backend is not installed."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    module, function = entry.split(":")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", f"from {module} import {function}; {function}()"], env=env,
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]


# --------------------------------------------------------------------------------------------------------------
# Device work inside an op (issue 12, target 2): torch glue, longattn raw ops, Triton launches
# --------------------------------------------------------------------------------------------------------------

_ALLOCATIONS = {"aten.empty", "aten.empty_like", "aten.new_empty", "aten.empty_strided", "aten.new_empty_strided"}


class DeviceWork(TorchDispatchMode):
    """The device work dispatched while active: ``glue``, the aten ops that compute (a GPU kernel that is not
    longattn's; allocations, views and ``detach`` move no data and are left out), and ``kernels``, longattn's raw
    ops (``longattn.*``)."""

    def __init__(self):
        super().__init__()
        self.glue: list[str] = []
        self.kernels: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("longattn."):
            self.kernels.append(name)
        elif not (func.is_view or func.overloadpacket is torch.ops.aten.detach or name in _ALLOCATIONS):
            self.glue.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def triton_launches(monkeypatch):
    """The names of the Triton kernels launched while the test runs, in order: the launcher of the kernels' class is
    wrapped (``InterpretedFunction`` under ``TRITON_INTERPRET=1``, ``JITFunction`` on a GPU). Dispatch modes are off
    inside a launch: the interpreter copies tensors to and from its buffers itself."""
    from longattn.triton_kernels import _launch, band_side

    monkeypatch.setattr(_launch, "ENABLED", False)  # every launch through ``run`` (the cached ones skip it)
    kernel_type = type(band_side._rows_kernel)
    launches = []
    real_run = kernel_type.run

    def run(self, *args, **kwargs):
        launches.append(self.fn.__name__ if hasattr(self, "fn") else self.__name__)
        with _disable_current_modes():
            return real_run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_type, "run", run)
    return launches
