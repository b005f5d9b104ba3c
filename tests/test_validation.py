"""Every input check of the public API raises the right error type with a message naming the argument."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import longattn

B, S, H, D, G = 2, 10, 2, 16, 3


def qkv(**over):
    t = {name: torch.randn(B, S, H, D) for name in ("q", "k", "v")}
    t.update(over)
    return t["q"], t["k"], t["v"]


def side(g=G):
    return torch.randn(B, g, H, D), torch.randn(B, g, H, D)


def qb():
    return torch.zeros(B, S, dtype=torch.long)


def local(**kw):
    q, k, v = qkv(**{n: kw.pop(n) for n in ("q", "k", "v") if n in kw})
    return longattn.local_attention(q, k, v, kw.pop("window", 2), **kw)


def tglobal(**kw):
    q, k, v = qkv(**{n: kw.pop(n) for n in ("q", "k", "v") if n in kw})
    sk, sv = side()
    return longattn.tglobal_attention(q, k, v, kw.pop("side_k", sk), kw.pop("side_v", sv), kw.pop("window", 2),
                                      kw.pop("query_block", qb()), **kw)


def longformer(**kw):
    q, k, v = qkv(**{n: kw.pop(n) for n in ("q", "k", "v") if n in kw})
    glob = torch.zeros(B, S, dtype=torch.bool)
    glob[:, 0] = True
    return longattn.longformer_attention(q, k, v, kw.pop("window", 2), kw.pop("global_mask", glob), **kw)


CASES = [
    # (id, call, error type, argument named first in the message)
    ("q-not-tensor", lambda: local(q=[1.0]), TypeError, "q"),
    ("q-rank", lambda: local(q=torch.randn(B, S, H * D)), ValueError, "q"),
    ("q-empty", lambda: longattn.local_attention(*[torch.randn(B, 0, H, D)] * 3, 2), ValueError, "q"),
    ("q-int", lambda: local(q=torch.ones(B, S, H, D, dtype=torch.int32)), TypeError, "q"),
    ("k-shape", lambda: local(k=torch.randn(B, S + 1, H, D)), ValueError, "k"),
    ("v-dtype", lambda: local(v=torch.randn(B, S, H, D, dtype=torch.float64)), TypeError, "v"),
    ("k-device", lambda: local(k=torch.randn(B, S, H, D, device="meta")), ValueError, "k"),
    ("q-last-dim-stride", lambda: local(q=torch.randn(B, S, H, 2 * D)[..., ::2]), ValueError, "q"),
    ("window-negative", lambda: local(window=-1), ValueError, "window"),
    ("window-float", lambda: local(window=2.5), TypeError, "window"),
    ("window-bool", lambda: local(window=True), TypeError, "window"),
    ("window-triple", lambda: local(window=(1, 2, 3)), ValueError, "window"),
    ("window-pair-negative", lambda: local(window=(3, -2)), ValueError, "window"),
    ("mask-shape", lambda: local(key_padding_mask=torch.ones(B, S + 1, dtype=torch.bool)), ValueError,
     "key_padding_mask"),
    ("mask-float", lambda: local(key_padding_mask=torch.ones(B, S)), TypeError, "key_padding_mask"),
    ("mask-int-values", lambda: local(key_padding_mask=torch.full((B, S), 2)), ValueError, "key_padding_mask"),
    ("rel-bias-shape", lambda: local(window=2, rel_bias=torch.randn(H, 4)), ValueError, "rel_bias"),
    ("rel-bias-int", lambda: local(window=2, rel_bias=torch.ones(H, 5, dtype=torch.long)), TypeError, "rel_bias"),
    ("scale-str", lambda: local(scale="1"), TypeError, "scale"),
    ("scale-nan", lambda: local(scale=float("nan")), ValueError, "scale"),
    ("backend-name", lambda: local(backend="cudnn"), ValueError, "backend"),
    ("backend-unavailable", lambda: local(backend="cuda"), longattn.BackendUnavailableError, "backend"),
    ("side-k-heads", lambda: tglobal(side_k=torch.randn(B, G, H + 1, D)), ValueError, "side_k"),
    ("side-v-shape", lambda: tglobal(side_v=torch.randn(B, G + 1, H, D)), ValueError, "side_v"),
    ("side-k-dtype", lambda: tglobal(side_k=torch.randn(B, G, H, D, dtype=torch.float64)), TypeError, "side_k"),
    ("side-mask-shape", lambda: tglobal(side_mask=torch.ones(B, G + 1, dtype=torch.bool)), ValueError,
     "side_mask"),
    ("side-bias-shape", lambda: tglobal(side_bias=torch.randn(H, 2 * G)), ValueError, "side_bias"),
    ("query-block-range", lambda: tglobal(query_block=torch.full((B, S), G)), ValueError, "query_block"),
    ("query-block-below", lambda: tglobal(query_block=torch.full((B, S), -2)), ValueError, "query_block"),
    ("query-block-float", lambda: tglobal(query_block=torch.zeros(B, S)), TypeError, "query_block"),
    ("query-block-shape", lambda: tglobal(query_block=torch.zeros(B, S + 1, dtype=torch.long)), ValueError,
     "query_block"),
    ("global-mask-none", lambda: longformer(global_mask=None), TypeError, "global_mask"),
    ("global-mask-shape", lambda: longformer(global_mask=torch.ones(B, 1, dtype=torch.bool)), ValueError,
     "global_mask"),
    ("max-globals-too-small", lambda: longformer(global_mask=torch.ones(B, S, dtype=torch.bool), max_globals=2),
     ValueError, "max_globals"),
    ("q-global-shape", lambda: longformer(q_global=torch.randn(B, S, H, D + 1)), ValueError, "q_global"),
    ("agg-x-rank", lambda: longattn.block_aggregate(torch.randn(S, D), torch.zeros(1, S, dtype=torch.long), 1),
     ValueError, "x"),
    ("agg-ids-range", lambda: longattn.block_aggregate(torch.randn(1, S, D), torch.full((1, S), 5), 5),
     ValueError, "block_ids"),
    ("agg-num-blocks", lambda: longattn.block_aggregate(torch.randn(1, S, D), torch.zeros(1, S, dtype=torch.long),
                                                        -1), ValueError, "num_blocks"),
    ("agg-weight-shape", lambda: longattn.block_aggregate(torch.randn(1, S, D), torch.zeros(1, S, dtype=torch.long),
                                                          1, weight=torch.ones(D + 1)), ValueError, "weight"),
    ("agg-eps", lambda: longattn.block_aggregate(torch.randn(1, S, D), torch.zeros(1, S, dtype=torch.long), 1,
                                                 weight=torch.ones(D), eps=0.0), ValueError, "eps"),
    ("block-size", lambda: longattn.tglobal_block_ids(torch.ones(B, S), 0), ValueError, "block_size"),
    ("block-ids-mask-rank", lambda: longattn.tglobal_block_ids(torch.ones(S), 4), ValueError, "mask"),
]


# Checks that read tensor values (a host sync) run only in debug mode (longattn.set_debug / LONGATTN_DEBUG=1).
DEBUG_ONLY = {"mask-int-values", "query-block-range", "query-block-below", "max-globals-too-small", "agg-ids-range"}


@pytest.fixture
def debug_mode():
    longattn.set_debug(True)
    yield
    longattn.set_debug(False)


@pytest.mark.parametrize("call, error, argument", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(call, error, argument, request):
    if request.node.callspec.id in DEBUG_ONLY:
        request.getfixturevalue("debug_mode")
    with pytest.raises(error) as info:
        call()
    assert str(info.value).startswith(f"{argument}:") or str(info.value).startswith(f"{argument}="), str(info.value)


def test_backend_unavailable_lists_reasons():
    reasons = longattn.available_backends("cpu")
    assert reasons["torch"] == []
    with pytest.raises(longattn.BackendUnavailableError, match="cuda"):
        local(backend="cuda")


def test_int_masks_are_accepted():
    q, k, v = qkv()
    as_bool = torch.ones(B, S, dtype=torch.bool)
    as_bool[0, 5:] = False
    out_bool = longattn.local_attention(q, k, v, 2, key_padding_mask=as_bool)
    out_int = longattn.local_attention(q, k, v, 2, key_padding_mask=as_bool.long())
    assert torch.equal(out_bool, out_int)


@pytest.mark.parametrize("case", sorted(DEBUG_ONLY))
def test_value_checks_are_off_by_default_and_bad_values_are_dropped(case):
    """Without debug mode, out-of-range index values and non-0/1 masks run (no sync) and stay finite."""
    call = dict((c[0], c[1]) for c in CASES)[case]
    out = call()
    assert torch.isfinite(out).all()


def test_out_of_range_block_ids_are_dropped():
    x = torch.randn(1, S, D)
    ids = torch.tensor([[0, 0, 1, 7, -3, 1, 99, 0, 1, 1]])
    got = longattn.block_aggregate(x, ids, 2, backend="torch")
    keep = torch.tensor([[0, 0, 1, -1, -1, 1, -1, 0, 1, 1]])
    torch.testing.assert_close(got, longattn.block_aggregate(x, keep, 2, backend="torch"), atol=0, rtol=0)


def test_debug_mode_from_environment():
    code = ("import torch, longattn; q = torch.randn(1, 4, 1, 16); "
            "longattn.tglobal_attention(q, q, q, q[:, :1], q[:, :1], 1, torch.full((1, 4), 5))")
    env = {**os.environ, "LONGATTN_DEBUG": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "query_block" in result.stderr


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_out_of_range_block_ids_are_dropped_by_triton():
    x = torch.randn(1, S, D, requires_grad=True)
    ids = torch.tensor([[0, 0, 1, 7, -3, 1, 99, 0, 1, 1]])
    keep = torch.tensor([[0, 0, 1, -1, -1, 1, -1, 0, 1, 1]])
    got = longattn.block_aggregate(x, ids, 2, backend="triton")
    want = longattn.block_aggregate(x, keep, 2, backend="torch")
    torch.testing.assert_close(got, want)
    (dx,) = torch.autograd.grad(got.sum(), [x])
    assert torch.equal(dx[0, [3, 4, 6]], torch.zeros(3, D))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_out_of_range_query_block_is_clamped_by_triton():
    """Without debug mode nothing checks query_block: every backend clamps it to [-1, G - 1] (same result)."""
    q, k, v = (torch.randn(1, S, H, D, requires_grad=True) for _ in range(3))
    sk, sv = (torch.randn(1, G, H, D, requires_grad=True) for _ in range(2))
    sb = torch.randn(H, 2 * G + 1, requires_grad=True)
    bad = torch.tensor([[-7, 0, 0, 1, 1, 2, 2, 9, 40, -1]])
    results = []
    for backend, ids in (("triton", bad), ("torch", bad.clamp(-1, G - 1))):
        out = longattn.tglobal_attention(q, k, v, sk, sv, 2, ids, side_bias=sb, backend=backend)
        results.append((out, *torch.autograd.grad(out.sum(), [q, sk, sb])))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
