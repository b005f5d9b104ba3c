"""``longattn._memo.LastCall``: a result is reused only for the same, unmodified tensors (views included)."""

from __future__ import annotations

import torch

from longattn._memo import LastCall


def _counting():
    calls = []

    def compute():
        calls.append(1)
        return len(calls)

    return calls, compute


def test_same_tensor_hits_and_an_inplace_write_misses():
    memo, (_, compute) = LastCall(), _counting()
    x = torch.arange(6)
    assert memo.get(compute, (x, None), (1,)) == 1
    assert memo.get(compute, (x, None), (1,)) == 1
    assert memo.get(compute, (x, None), (2,)) == 2  # other arguments differ
    x.add_(1)
    assert memo.get(compute, (x, None), (2,)) == 3
    assert memo.get(compute, (x.clone(), None), (2,)) == 4  # equal values, another tensor
    assert memo.get(compute, (x, x), (2,)) == 5  # None is not a tensor


def test_new_views_of_the_same_data_hit():
    """``mask[None]`` is a new view object every call: the same base, geometry and version count as the same."""
    memo, (_, compute) = LastCall(), _counting()
    base = torch.zeros(4, 6, dtype=torch.bool)
    assert memo.get(compute, (base[None],)) == 1
    assert memo.get(compute, (base[None],)) == 1
    assert memo.get(compute, (base[None, 1:],)) == 2  # another offset and shape
    assert memo.get(compute, (base.view(torch.uint8)[None, 1:],)) == 3  # another dtype
    assert memo.get(compute, (base.t()[None],)) == 4  # another stride
    assert memo.get(compute, (base,)) == 5  # the base itself is not its view
    view = base[None]
    assert memo.get(compute, (view,)) == 6
    base[0, 0] = True  # a write through the base bumps the views' shared version
    assert memo.get(compute, (view,)) == 7


def test_peek_and_put():
    memo = LastCall()
    x = torch.ones(3)
    assert memo.peek((x,), ("a",)) is None
    memo.put((x,), ("a",), "result")
    assert memo.peek((x,), ("a",)) == "result"
    assert memo.peek((x,), ("b",)) is None
    assert memo.peek((x[None],), ("a",)) is None


def test_entries_do_not_keep_their_tensors_alive():
    import weakref

    memo = LastCall()
    x = torch.ones(3)
    memo.get(lambda: 1, (x[None],))
    ref = weakref.ref(x)
    del x
    assert ref() is None


def test_inference_tensors_are_not_kept():
    memo, (_, compute) = LastCall(), _counting()
    with torch.inference_mode():
        x = torch.ones(3)
    assert memo.get(compute, (x,)) == 1
    assert memo.get(compute, (x,)) == 2
