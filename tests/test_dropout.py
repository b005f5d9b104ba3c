"""Fused attention-probability dropout (``dropout_p``) through the ops, backends and HF patches (issue 13).

The bits themselves (Philox layout, known-answer vectors, torch == Triton == C++) are tested in
tests/test_dropout_rng.py; here: the ops use them in the right place. The torch backend equals the dense fp64
oracle given the same keep mask; Triton (a GPU, or the interpreter: ``TRITON_INTERPRET=1``) drops the same entries
as torch (outputs and every gradient within the tolerance rule); gradcheck with a fixed seed; keep rate and
E[out] on the op's outputs; reproducibility; ``dropout_p = 0`` is today's path; the HF patches train on longattn.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch

import longattn
from longattn import _dropout
from longattn.dispatch import unsupported_reasons
from tests import reference
from tests.conftest import grads, make_case
from tests.tolerance import assert_close_to_oracle, assert_within_rule

P = 0.3
TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")


def _rng_of(seed, B, H, device="cpu"):
    """The ``[seed, offset]`` a dropout call draws right after ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _dropout.philox_seed_offset(torch.device(device), _dropout.philox_increment(B, H))


def _seeded(fn, seed):
    """``fn()`` right after ``torch.manual_seed(seed)``, leaving the global generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


# --------------------------------------------------------------------------------------------------------
# the three ops: one runner each (case -> output) and the matching fp64 oracle with the keep mask
# --------------------------------------------------------------------------------------------------------


def _tglobal(case, backend, p):
    return longattn.tglobal_attention(case.q, case.k, case.v, case.side_k, case.side_v, case.window, case.query_block,
                                      key_padding_mask=case.key_padding_mask, side_mask=case.side_mask,
                                      rel_bias=case.rel_bias, side_bias=case.side_bias, scale=case.scale,
                                      dropout_p=p, backend=backend)


def _tglobal_oracle(case, p, rng):
    B, S, H, _ = case.q.shape
    keep = _dropout.dense_keep_mask(rng, p, B, H, S, case.side_k.shape[1])
    return reference.band_side_attention(case.q, case.k, case.v, case.side_k, case.side_v, case.window,
                                         band_key_mask=case.key_padding_mask, side_mask=case.side_mask,
                                         query_block=case.query_block, band_bias=case.rel_bias,
                                         side_bias=case.side_bias, scale=case.scale, keep=keep, dropout_p=p)


def _local(case, backend, p):
    return longattn.local_attention(case.q, case.k, case.v, case.window, key_padding_mask=case.key_padding_mask,
                                    rel_bias=case.rel_bias, scale=case.scale, dropout_p=p, backend=backend)


def _local_oracle(case, p, rng):
    B, S, H, _ = case.q.shape
    keep = _dropout.dense_keep_mask(rng, p, B, H, S)
    return reference.band_side_attention(case.q, case.k, case.v, None, None, case.window,
                                         band_key_mask=case.key_padding_mask, band_bias=case.rel_bias,
                                         scale=case.scale, keep=keep, dropout_p=p)


def _global_mask(S, device):
    glob = torch.zeros(2, S, dtype=torch.bool, device=device)
    glob[0, [0, S // 2, S - 1]] = True  # start, middle, end
    glob[1, [3, 7]] = True
    return glob


def _longformer(case, backend, p):
    S = case.q.shape[1]
    return longattn.longformer_attention(case.q, case.k, case.v, case.window, _global_mask(S, case.q.device),
                                         key_padding_mask=case.key_padding_mask, q_global=case.side_k,
                                         scale=case.scale, max_globals=4, dropout_p=p, backend=backend)


def _longformer_oracle(case, p, rng):
    S, H = case.q.shape[1], case.q.shape[2]
    glob = _global_mask(S, case.q.device)
    keep = reference.longformer_keep_masks(rng, p, glob, case.key_padding_mask, H)
    return reference.longformer_attention(case.q, case.k, case.v, case.window, glob,
                                          key_padding_mask=case.key_padding_mask, q_global=case.side_k,
                                          scale=case.scale, keep=keep, dropout_p=p)


def _longformer_case(**kw):
    # side_k doubles as q_global (B, S, H, D): G = S; the case's side keys are otherwise unused.
    return make_case(B=2, G=kw["S"], padding="tail", **kw)


OPS = {
    "local": (_local, _local_oracle, lambda: make_case(B=2, S=37, H=2, D=16, window=(5, 3), bias=True,
                                                       padding="tail")),
    "tglobal": (_tglobal, _tglobal_oracle, lambda: make_case(B=2, S=37, H=2, D=16, window=(4, 3), G=5, bias=True,
                                                             padding="tail", side_padding=True)),
    "longformer": (_longformer, _longformer_oracle, lambda: _longformer_case(S=29, H=2, D=16, window=(3, 3))),
}


FIELDS = ("q", "k", "v", "side_k", "side_v", "rel_bias", "side_bias")


def _leaf_names(case, op):
    """The differentiable inputs the op reads (Longformer: q, k, v and side_k as q_global)."""
    if op == "longformer":
        return ["q", "k", "v", "side_k"]
    return [n for n in FIELDS if getattr(case, n) is not None]


def _leaves(case, op):
    return [getattr(case, n) for n in _leaf_names(case, op)]


@pytest.mark.parametrize("op", OPS)
def test_torch_backend_equals_dense_oracle_with_the_same_mask(op):
    run, oracle, make = OPS[op]
    case = make()
    B, H = case.q.shape[0], case.q.shape[2]
    rng = _rng_of(3, B, H)
    ref = oracle(case, P, rng)
    leaves = _leaves(case, op)
    ref_grads = grads(ref, leaves)
    out = _seeded(lambda: run(case, "torch", P), 3)
    assert_close_to_oracle("out", out, ref)
    for g, r in zip(grads(out, leaves), ref_grads):
        assert_close_to_oracle("grad", g, r)
    # the mask does something: the same call without dropout differs
    assert (run(case, "torch", 0.0) - out).abs().max() > 1e-3


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("op", OPS)
def test_triton_drops_the_same_entries_as_torch(op, dtype):
    """For one seed, Triton and torch drop the same entries: outputs and every gradient within the rule
    (baseline: the torch backend in the same dtype; both against the fp64 oracle with that seed's mask)."""
    _assert_drops_like_torch(op, OPS[op][2]().cast(torch.float64, DEVICE), "triton", dtype)


@needs_triton
@pytest.mark.parametrize("window", [(7, 3), (8, 3), (18, 20)], ids=["7-3", "8-3", "18-20"])
def test_triton_aligned_band_tiles_drop_the_same_entries(window):
    """With dropout the forward and dQ start their band tiles at the multiple of 4 at or below ``m0 - left`` and draw
    their keep bits one Philox call per 4 keys: the same entries as torch's, for left windows that are a multiple of
    4 or not (tiles shifted 0 to 3 keys, a tile more for some query tiles), with padding and a bias table."""
    case = make_case(B=2, S=41, H=2, D=16, window=window, bias=True, padding="tail")
    _assert_drops_like_torch("local", case.cast(torch.float64, DEVICE), "triton", torch.float32)


def _assert_drops_like_torch(op, case, backend, dtype):
    """``backend`` against torch for seed 5: outputs and every gradient within the rule (baseline: torch in
    ``dtype``; both against the fp64 oracle of the fp64 ``case`` with that seed's mask)."""
    run, oracle, _ = OPS[op]
    B, H = case.q.shape[0], case.q.shape[2]
    ref = oracle(case, P, _rng_of(5, B, H, case.q.device.type))
    ref_grads = grads(ref, _leaves(case, op))
    results = {}
    for name in ("torch", backend):
        c = case.cast(dtype)
        out = _seeded(lambda c=c, name=name: run(c, name, P), 5)
        results[name] = (out, grads(out, _leaves(c, op)))
    (base, base_grads), (out, got) = results["torch"], results[backend]
    assert_within_rule("out", out, base, ref)
    for g, b, r in zip(got, base_grads, ref_grads):
        assert_within_rule("grad", g, b, r, grad=True)


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_float64_fixed_seed(op):
    """Every call re-seeds, so the op is one fixed function of its inputs (the same keep mask each time)."""
    run, _, make = OPS[op]
    case = make()
    names = _leaf_names(case, op)

    def fn(*xs):
        c = dataclasses.replace(case, **dict(zip(names, xs)))
        return _seeded(lambda: run(c, "torch", P), 7)

    inputs = [getattr(case, n).detach().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


# --------------------------------------------------------------------------------------------------------
# statistics on the op's outputs
# --------------------------------------------------------------------------------------------------------


def _sigma_bound(n, p, sigmas=5.0):
    return sigmas * (p * (1 - p) / n) ** 0.5


def test_keep_rate_and_independence_from_outputs():
    """Window 0: row i attends only key i with probability 1, so out = keep / (1 - p) * v: the op's output shows
    each entry's keep bit. Keep rate 1 - p, and heads / rows / consecutive calls independent (pair rates p^2)."""
    B, S, H, D, p = 2, 1500, 4, 4, 0.25
    ones = torch.ones(B, S, H, D, dtype=torch.float64)
    out = longattn.local_attention(ones, ones, ones, 0, dropout_p=p, backend="torch")
    dropped = out[..., 0] == 0  # (B, S, H)
    kept = out[..., 0][~dropped]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))
    n = dropped.numel()
    assert abs(dropped.double().mean().item() - p) < _sigma_bound(n, p)
    both = p * p
    assert abs((dropped[..., 0] & dropped[..., 1]).double().mean().item() - both) < _sigma_bound(B * S, both)
    assert abs((dropped[:, 1:] & dropped[:, :-1]).double().mean().item() - both) < _sigma_bound(B * S * H, both)
    again = longattn.local_attention(ones, ones, ones, 0, dropout_p=p, backend="torch")[..., 0] == 0
    assert abs((dropped & again).double().mean().item() - both) < _sigma_bound(n, both)


@pytest.mark.parametrize("op", ["local", "tglobal", "longformer"])
def test_expected_output_is_the_no_dropout_output(op):
    """E[out] over seeds equals the output without dropout (dropout rescales kept probabilities by 1/(1-p)):
    the mean of N draws is within 5 standard errors of it, per element."""
    run, _, make = OPS[op]
    case = make()
    with torch.no_grad():
        want = run(case, "torch", 0.0)
        draws = torch.stack([_seeded(lambda: run(case, "torch", P), s) for s in range(300)])
    mean, sem = draws.mean(0), draws.std(0) / len(draws) ** 0.5
    assert ((mean - want).abs() <= 5 * sem + 1e-9).all()


# --------------------------------------------------------------------------------------------------------
# reproducibility, p = 0, errors, backends
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_manual_seed_reproduces_and_consecutive_calls_differ(op):
    run, _, make = OPS[op]
    case = make()
    torch.manual_seed(0)
    first, second = run(case, "torch", P), run(case, "torch", P)
    torch.manual_seed(0)
    assert torch.equal(run(case, "torch", P), first)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("op", OPS)
def test_p0_is_todays_path_bitwise_and_draws_nothing(op):
    run, _, make = OPS[op]
    case = make()
    fn = {"local": longattn.local_attention, "tglobal": longattn.tglobal_attention,
          "longformer": longattn.longformer_attention}[op]
    state = torch.get_rng_state()
    out = run(case, "torch", 0.0)
    assert torch.equal(torch.get_rng_state(), state)  # no generator touched
    # today's call, without the keyword at all
    orig = fn.__kwdefaults__["dropout_p"]
    assert orig == 0.0
    plain = _without_dropout_kwarg(run, case)
    assert torch.equal(out, plain)
    for g, h in zip(grads(out, _leaves(case, op)), grads(plain, _leaves(case, op))):
        assert torch.equal(g, h)


def _without_dropout_kwarg(run, case):
    """``run`` with ``dropout_p`` left out of the public call (its default)."""
    import functools

    originals = {name: getattr(longattn, name) for name in ("local_attention", "tglobal_attention",
                                                            "longformer_attention")}

    def strip(fn):
        @functools.wraps(fn)
        def call(*args, dropout_p=0.0, **kwargs):
            assert dropout_p == 0.0
            return fn(*args, **kwargs)
        return call

    try:
        for name, fn in originals.items():
            setattr(longattn, name, strip(fn))
        return run(case, "torch", 0.0)
    finally:
        for name, fn in originals.items():
            setattr(longattn, name, fn)


@pytest.mark.parametrize("bad, error", [(-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError),
                                        ("0.1", TypeError), (torch.tensor(0.1), TypeError), (True, TypeError),
                                        (None, TypeError)])
@pytest.mark.parametrize("op", OPS)
def test_bad_dropout_p_raises_naming_it(op, bad, error):
    run, _, make = OPS[op]
    with pytest.raises(error, match="dropout_p"):
        run(make(), "torch", bad)


def test_cuda_backend_accepts_dropout():
    """The CUDA kernels run dropout (csrc/band_side/dropout.h): no backend reason names it."""
    for op in ("local", "tglobal", "longformer"):
        reasons = unsupported_reasons("cuda", torch.device("cuda"), torch.float16, 64, op, ("dropout",))
        assert not any("dropout" in r for r in reasons), reasons


# GPU cases for the CUDA kernels (D in 32/64/128): several 64-row query tiles, band windows that cross key tiles,
# side keys over more than one 64-key tile (TGlobal, Longformer's global rows attend all S tokens).
CUDA_CASES = {
    "local": lambda: make_case(B=2, S=150, H=2, D=32, window=(37, 20), bias=True, padding="tail"),
    "tglobal": lambda: make_case(B=2, S=150, H=2, D=64, window=(20, 9), G=70, bias=True, padding="tail",
                                 side_padding=True),
    "longformer": lambda: _longformer_case(S=150, H=2, D=32, window=(20, 20)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("op", OPS)
def test_cuda_drops_the_same_entries_as_torch(op, dtype):
    """For one seed, the CUDA kernels and the torch backend drop the same entries: outputs and every gradient
    within the rule (baseline: torch in the same dtype; both against the fp64 oracle with that seed's mask)."""
    _assert_drops_like_torch(op, CUDA_CASES[op]().cast(torch.float64, "cuda"), "cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_cuda_keep_pattern_read_back_through_one_hot_values(backend):
    """v[j] = e_(j mod 64) and a window narrower than 64: out[i, j mod 64] = P_ij * keep_ij / (1 - p), so the
    exact zeros of the output are the dropped band entries. CUDA's are the dense mask's, entry by entry."""
    B, S, H, D, (left, right) = 2, 200, 3, 64, (30, 20)
    case = make_case(B=B, S=S, H=H, D=D, window=(left, right), dtype=torch.float16, device="cuda")
    v = torch.nn.functional.one_hot(torch.arange(S, device="cuda") % D, D).to(torch.float16)
    v = v[None, :, None, :].expand(B, S, H, D).contiguous()
    out = _seeded(lambda: longattn.local_attention(case.q, case.k, v, case.window, scale=0.1, dropout_p=P,
                                                   backend=backend), 9)
    keep = _dropout.dense_keep_mask(_rng_of(9, B, H, "cuda"), P, B, H, S).to("cuda")  # (B, H, S, S) bool
    i, j = torch.meshgrid(torch.arange(S, device="cuda"), torch.arange(S, device="cuda"), indexing="ij")
    band = (j >= i - left) & (j <= i + right)
    got_zero = out.permute(0, 2, 1, 3)[:, :, i, j % D] == 0  # (B, H, S, S) read back per (i, j)
    assert torch.equal(got_zero & band, ~keep & band)


def test_torch_compile_fullgraph_forward_backward():
    case = make_case(B=1, S=20, H=2, D=16, window=(3, 3), G=3, bias=True, dtype=torch.float32)

    def fn(q, k, v, sk, sv):
        return longattn.tglobal_attention(q, k, v, sk, sv, case.window, case.query_block, side_bias=case.side_bias,
                                          dropout_p=P, backend="torch")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [case.q, case.k, case.v, case.side_k, case.side_v]
    torch.manual_seed(4)
    want = fn(*leaves)
    torch.manual_seed(4)
    got = compiled(*leaves)
    torch.testing.assert_close(got, want)  # the traced seed draw is the same torch.randint
    for g, w in zip(grads(got, leaves), grads(want, leaves)):
        torch.testing.assert_close(g, w)


def test_opcheck_with_dropout():
    ops = torch.ops.longattn
    case = make_case(B=1, S=10, H=2, D=16, window=(3, 2), G=3, bias=True, padding="tail", side_padding=True,
                     dtype=torch.float32)
    rng = _rng_of(1, 1, 2)
    args = (case.q, case.k, case.v, case.side_k, case.side_v, case.key_padding_mask, case.side_mask,
            case.query_block.to(torch.int32), case.rel_bias, case.side_bias, *case.window, 0.5, "torch", P, rng)
    torch.library.opcheck(ops.band_side_attention.default, args)
    glob = torch.zeros(1, 10, dtype=torch.bool)
    glob[0, [2, 6]] = True
    args = (case.q, case.k, case.v, None, None, None, glob, case.key_padding_mask, *case.window, 0.5, 2, "torch", P,
            rng)
    torch.library.opcheck(ops.longformer_attention.default, args)


# --------------------------------------------------------------------------------------------------------
# HF models in training mode with their default attention dropout
# --------------------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _models():
    from tests.test_models import led_config, longformer_config, longt5_config

    longformer = longformer_config(windows=(8, 8))  # one window: the stock model pads S to it
    longformer.attention_probs_dropout_prob = 0.1  # the default of the published checkpoints
    return {
        "longformer": (transformers.LongformerModel, longformer, "LongformerSelfAttention"),
        "led": (transformers.LEDModel, led_config(attention_dropout=0.1), "LEDEncoderSelfAttention"),
        "longt5-local": (transformers.LongT5EncoderModel, longt5_config("local", dropout_rate=0.1),
                         "LongT5LocalAttention"),
        "longt5-tglobal": (transformers.LongT5EncoderModel, longt5_config("transient-global", dropout_rate=0.1),
                           "LongT5TransientGlobalAttention"),
    }


@pytest.mark.parametrize("family", ["longformer", "led", "longt5-local", "longt5-tglobal"])
def test_models_train_with_dropout_on_longattn_only(family, monkeypatch):
    """Training mode with the default attention dropout: no fallback, no warning, no stock attention code."""
    from tests.test_models import build, token_batch

    cls, config, attn_name = _models()[family]
    model = longattn.apply_longattn(build(cls, config, 0).train(), backend="torch")
    attn_cls = next(type(m) for m in model.modules() if type(m).__name__ == attn_name)

    def refuse(*args, **kwargs):
        raise AssertionError("the stock attention forward ran")

    monkeypatch.setattr(attn_cls, "forward", refuse)
    ids, mask = token_batch([33, 20], 33, 0, pad_id=1 if family in ("longformer", "led") else 0)
    kw = dict(input_ids=ids, attention_mask=mask)
    if family == "led":
        kw["decoder_input_ids"] = ids[:, :5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(0)
        out = model(**kw)
        hidden = out.encoder_last_hidden_state if family == "led" else out.last_hidden_state
        hidden[mask.bool()].square().mean().backward()
        torch.manual_seed(0)
        again = model(**kw)
    again = again.encoder_last_hidden_state if family == "led" else again.last_hidden_state
    assert torch.equal(hidden, again)  # reproducible under torch.manual_seed
    # eval mode: dropout off
    model.eval()
    with torch.no_grad():
        first, second = (model(**kw) for _ in range(2))
    key = "encoder_last_hidden_state" if family == "led" else "last_hidden_state"
    assert torch.equal(getattr(first, key), getattr(second, key))


def _train_losses(model, steps, seed, batch):
    ids, mask, target = batch
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = (hidden[mask.bool()] - target[mask.bool()]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["longformer", "longt5-tglobal"])
def test_training_reaches_the_stock_loss_within_seed_spread(family):
    """A few SGD steps of a tiny regression task with attention dropout: the patched model's final loss lies
    within the spread of the stock model's over seeds (same place, scaling and distribution; other draws)."""
    from tests.test_models import build, token_batch

    cls, config, _ = _models()[family]
    ids, mask = token_batch([33, 20], 33, 0, pad_id=1 if family == "longformer" else 0)
    target = torch.randn(2, 33, config.hidden_size if hasattr(config, "hidden_size") else config.d_model,
                         generator=torch.Generator().manual_seed(9))
    batch = (ids, mask, target)
    steps, seeds = 3, range(3)
    stock = [_train_losses(build(cls, config, 0).train(), steps, s, batch)[-1] for s in seeds]
    ours = [_train_losses(longattn.apply_longattn(build(cls, config, 0).train(), backend="torch"), steps, s,
                          batch)[-1] for s in seeds]
    spread = max(stock) - min(stock)
    mean_stock, mean_ours = sum(stock) / len(stock), sum(ours) / len(ours)
    assert spread > 0  # dropout is on in both
    assert abs(mean_ours - mean_stock) <= 2 * spread, (stock, ours)
