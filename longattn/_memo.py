"""A one-entry memo of a function of tensors, reused while the next call passes the same tensors, unmodified.

The packed ops derive per-token ranges from ``cu_seqlens`` (``longattn.varlen_api``), and the Triton kernels derive
per-tile bounds from those ranges (``triton_kernels._common.tile_bounds``): the same result for every layer of a model
forward, and again in each backward. A ``LastCall`` keeps the last result while its key tensors are the same tensors
with the same ``_version`` (no in-place write since) and the other arguments are equal. A view counts as the same
tensor as another view of the same base with the same dtype, shape, strides and offset (views share their base's
version counter): wrappers that pass ``mask[None]`` make a new view object every call, of the same unchanged data.

Weak references: an entry never keeps its key tensors alive, only the result. One entry, replaced as a whole (threads
may share it). Not used while tracing (``torch.compile``), for tensor subclasses (fake tensors) or inference tensors
(no version counter): those calls compute afresh every time.

What the version counter cannot see: writes that bypass PyTorch's dispatcher (a raw-pointer kernel, or a compiled
graph's generated code filling a dead buffer it reuses under the same tensor object). The keys here are masks and
sequence boundaries, which a model computes once and shares by every layer; a caller that rewrites one that way and
passes it again gets the kept result.
"""

from __future__ import annotations

import weakref

import torch


def _identity(x):
    """(weak reference to the tensor, or to the base of a view; version; a view's geometry) or None."""
    if x is None:
        return None
    base = x._base
    if base is None:
        return weakref.ref(x), x._version, None
    return weakref.ref(base), x._version, (x.dtype, x.shape, x.stride(), x.storage_offset())


def _same(identity, x) -> bool:
    if x is None or identity is None:
        return x is None and identity is None
    ref, version, geometry = identity
    base = x._base
    if base is None:
        return geometry is None and ref() is x and version == x._version
    return (geometry is not None and ref() is base and version == x._version
            and geometry == (x.dtype, x.shape, x.stride(), x.storage_offset()))


def _cacheable(tensors) -> bool:
    if torch.compiler.is_compiling():  # first: dynamo cannot trace is_inference()
        return False
    return all(x is None or (type(x) is torch.Tensor and not x.is_inference()) for x in tensors)


class LastCall:
    """``get(compute, tensors, others)``: ``compute()``, or the result of the last call with the same ``tensors`` (a
    tuple of tensors or None, by identity and version) and equal ``others`` (a tuple of hashable values).
    ``peek(tensors, others)`` / ``put(tensors, others, result)``: the lookup and the store alone, for a caller whose
    computation differs when the result is known (it computes the result alongside other work)."""

    def __init__(self):
        self.entry = None  # (tensor identities, others), result

    def peek(self, tensors: tuple, others: tuple = ()):
        """The kept result for these arguments, or None."""
        return self._lookup(tensors, others) if _cacheable(tensors) else None

    def put(self, tensors: tuple, others: tuple, result) -> None:
        if _cacheable(tensors):
            self.entry = (tuple(_identity(x) for x in tensors), others), result

    def get(self, compute, tensors: tuple, others: tuple = ()):
        if not _cacheable(tensors):
            return compute()
        result = self._lookup(tensors, others)
        if result is None:
            result = compute()
            self.entry = (tuple(_identity(x) for x in tensors), others), result
        return result

    def _lookup(self, tensors: tuple, others: tuple):
        entry = self.entry
        if entry is None:
            return None
        (identities, cached_others), result = entry
        if cached_others == others and all(_same(i, x) for i, x in zip(identities, tensors)):
            return result
        return None
