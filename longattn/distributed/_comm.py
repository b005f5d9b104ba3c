"""The only place longattn.distributed talks to torch.distributed, plus a byte counter.

Every collective here is one of torch's functional collectives (``torch.distributed._functional_collectives``):
the autograd-aware ones carry gradients back to their owners (the backward of an all-to-all is the transposed
all-to-all, of an all-gather a reduce-scatter), and all of them are traceable by ``torch.compile``. There is no
home-made transport. The counter records, per collective kind, the bytes this rank *sends* (its input minus
what it keeps for itself), so tests can check the traffic the cost model in the README promises.
"""

from __future__ import annotations

import collections

import torch.distributed._functional_collectives as funcol
from torch import Tensor

_SENT: collections.Counter = collections.Counter()
_CALLS: collections.Counter = collections.Counter()


def reset_stats() -> None:
    """Zero the byte and call counters of this process."""
    _SENT.clear()
    _CALLS.clear()


def stats() -> dict:
    """``{"bytes": {kind: bytes sent by this rank}, "calls": {kind: count}}`` since the last reset: the collectives
    longattn issues (forwards, and the recomputes of checkpointed layers), not the backward's transposed ones."""
    return {"bytes": dict(_SENT), "calls": dict(_CALLS)}


def _count(kind: str, nbytes: int) -> None:
    _SENT[kind] += int(nbytes)
    _CALLS[kind] += 1


# torch >= 2.13 renamed the tensor all-gather / reduce-scatter to *_single (the old names warn FutureWarning).
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter_autograd = (getattr(funcol, "reduce_scatter_single_autograd", None)
                            or funcol.reduce_scatter_tensor_autograd)


def wait(x: Tensor) -> Tensor:
    """The plain tensor of a collective's result handed back in flight (``wait=False``), once it has arrived.

    Eager funcol returns an AsyncCollectiveTensor that waits on its first non-view use, but views of it stay
    wrappers (every later op on them then dispatches through Python): wait explicitly where the result is used.
    Traced, the collectives return a waited tensor already (the compiler places the waits)."""
    return funcol.wait_tensor(x) if isinstance(x, funcol.AsyncCollectiveTensor) else x


def all_to_all(x: Tensor, send_sizes: list[int], recv_sizes: list[int], group, rank: int, *,
               wait_now: bool = True) -> Tensor:
    """Autograd all-to-all along dim 0: rows ``[sum(send[:p]), sum(send[:p+1]))`` go to rank ``p``.

    ``wait_now=False``: the result may still be in flight (overlapping what the caller computes next); pass it to
    :func:`wait` where it is used."""
    row = x[0].numel() * x.element_size() if x.shape[0] else 0
    _count("all_to_all", (sum(send_sizes) - send_sizes[rank]) * row)
    out = funcol.all_to_all_single_autograd(x.contiguous(), recv_sizes, send_sizes, group)
    return wait(out) if wait_now else out


def all_gather(x: Tensor, group, size: int, *, wait_now: bool = True) -> Tensor:
    """Autograd all-gather along a new leading dim: ``(P, *x.shape)`` in rank order (backward: reduce-scatter).
    ``wait_now``: as :func:`all_to_all`."""
    _count("all_gather", x.numel() * x.element_size())
    out = _all_gather_autograd(x.contiguous().unsqueeze(0), 0, group)
    return wait(out) if wait_now else out


def reduce_scatter_sum(x: Tensor, group, size: int) -> Tensor:
    """Autograd reduce-scatter (sum) along dim 0, which must be divisible by the group size (backward: all-gather)."""
    _count("reduce_scatter", x.numel() * x.element_size() * (size - 1) // size)
    return wait(_reduce_scatter_autograd(x.contiguous(), "sum", 0, group))


def all_gather_ints(x: Tensor, group) -> Tensor:
    """All-gather of a small int64 tensor with no autograd (plans, agreement checks): ``(P, *x.shape)``."""
    _count("all_gather_ints", x.numel() * x.element_size())
    return wait(_all_gather(x.contiguous().unsqueeze(0), 0, group))
