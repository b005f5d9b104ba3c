"""``longattn.distributed.sequence_parallel``: patched Hugging Face encoders at P = 2 against the unsharded models.

One gloo group of 2 CPU processes (the spawn harness of ``tests/test_distributed.py``; 30 s collective timeout, so
a bug fails instead of hanging). Every rank builds the same tiny random model and whole inputs, runs the oracles
unsharded, then the model patched (``backend="torch"``) under ``sequence_parallel`` with the whole inputs as
buffers, sharded in place. Each rank's loss is ``(hidden_r * W_r).sum()``, ``W`` one random weight that is 0 on
padding tokens, so the ranks' losses add up to the unsharded one. Compared, on this rank's rows and on every
parameter's gradient summed over the ranks:

- float64 against the unsharded *patched* float64 model: relative error <= 1e-10 (all rows; gradients relative
  to the largest gradient of the parameter's module, as ``tests/test_models.py``). Everything sharding can break
  (halos, global tokens on one rank, block ids and aggregates across ranks, positions) shows here.
- float32 against the unsharded *stock* float32 model: hidden states of real tokens within 1e-5 relative, gradients
  within ``tests/test_models.py``'s rule against the float64 oracle (both ways).
"""

from __future__ import annotations

import copy
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

transformers = pytest.importorskip("transformers")

import longattn  # noqa: E402
from longattn.distributed import SeqShards, gather_sequence, reset_stats, sequence_parallel, stats  # noqa: E402
from tests.test_distributed import _start, summed  # noqa: E402
from tests.test_models import (  # noqa: E402
    assert_grads_within_rule,
    assert_rel_close,
    build,
    led_config,
    longformer_config,
    longt5_config,
    token_batch,
)

pytestmark = pytest.mark.distributed

F64_RTOL = 1e-10
P = 2


# ----------------------------------------------------------------------------------------------------------- helpers
def _globals(B, S, positions):
    """``(B, S)`` long global-attention mask with 1 at ``positions[b]`` of each row."""
    g = torch.zeros(B, S, dtype=torch.long)
    for b, pos in enumerate(positions):
        g[b, pos] = 1
    return g


def _run(model, fn, inputs, W):
    """``hidden = fn(model, **inputs)``; backward of ``(hidden * W).sum()``; returns (hidden, {param: grad})."""
    model.zero_grad(set_to_none=True)
    hidden = fn(model, **inputs)
    (hidden.double() * W).sum().backward()
    return hidden.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                             for n, p in model.named_parameters()}


def _assert_rel(name, got, want, scale):
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert err <= F64_RTOL * max(scale, 1e-300), \
        f"{name}: max error {err:.3e} > {F64_RTOL:.0e} x {scale:.3e} (rank {dist.get_rank()})"


def _assert_grads_rel(got, want):
    scale = {}
    for name, g in want.items():
        owner = name.rsplit(".", 1)[0]
        scale[owner] = max(scale.get(owner, 0.0), g.abs().max().item())
    for name, g in want.items():
        _assert_rel(f"grad {name}", got[name], g, scale[name.rsplit(".", 1)[0]])


def check_matches_unsharded(stock, fn, inputs, real, *, group=None, bounds=None, multiple_of=1, **apply_kw):
    """``stock`` (an fp32 model in eval mode) under ``sequence_parallel`` vs unsharded, as the module docstring says.

    ``fn(model, **inputs)`` returns the encoder's ``(B, S, E)`` hidden states; ``real`` ``(B, S)`` marks real tokens.
    """
    B, S = real.shape
    W = torch.randn(B, S, stock.config.hidden_size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    W = W * real[..., None]
    oracle = longattn.apply_longattn(copy.deepcopy(stock).double(), backend="torch", **apply_kw)
    ref, ref_g = _run(oracle, fn, inputs, W)
    stock_h, stock_g = _run(stock, fn, inputs, W)
    for dtype in (torch.float64, torch.float32):
        model = longattn.apply_longattn(copy.deepcopy(stock).to(dtype), backend="torch", **apply_kw)
        bufs = {n: x.clone() for n, x in inputs.items()}
        with sequence_parallel(group, model=model, buffers=list(bufs.values()), bounds=bounds,
                               multiple_of=multiple_of) as sh:
            a, b = sh.start, sh.stop
            assert all(x.shape[:2] == (B, b - a) for x in bufs.values())  # sharded in place
            hidden, grads = _run(model, fn, bufs, W[:, a:b])
            whole = gather_sequence(hidden, sh)
        assert all(torch.equal(bufs[n], inputs[n]) for n in inputs)  # restored on exit
        grads = {n: summed(g, sh.group) for n, g in grads.items()}
        if dtype == torch.float64:
            _assert_rel("hidden states", hidden, ref[:, a:b], ref.abs().max().item())
            _assert_rel("gathered hidden states", whole, ref, ref.abs().max().item())
            _assert_grads_rel(grads, ref_g)
        else:
            mine = real[:, a:b].bool()
            assert_rel_close("hidden states", hidden[mine], stock_h[:, a:b][mine])
            assert_grads_within_rule(grads, stock_g, ref_g, both_ways=True)


def _encoder_hidden(model, **inputs):
    # (float inputs, inputs_embeds, in the model's dtype)
    return model(**{n: x.to(model.dtype) if x.is_floating_point() else x for n, x in inputs.items()}).last_hidden_state


def _led_encoder_hidden(model, **inputs):
    return model.get_encoder()(**inputs).last_hidden_state


def _longformer_inputs(S, lengths, globals_, seed):
    ids, mask = token_batch(lengths, S, seed, pad_id=1)
    return dict(input_ids=ids, attention_mask=mask, global_attention_mask=_globals(len(lengths), S, globals_)), mask


# ------------------------------------------------------------------------------------------------------------- cases
def check_longformer_even_shards():
    """Shards of 24 = 2 x max(attention_window): HF's pad-to-window is a no-op on every rank. Row 0 has global
    tokens on both ranks, row 1 on rank 0 only (and padding on rank 1)."""
    inputs, mask = _longformer_inputs(48, [48, 37], [[0, 30], [5]], seed=0)
    stock = build(transformers.LongformerModel, longformer_config(windows=(8, 12)), 0)
    check_matches_unsharded(stock, _encoder_hidden, inputs, mask, multiple_of=12)


def check_longformer_uneven_no_pad():
    """``pad_to_window=False``, uneven shards (17 | 28); rank 0 holds no global token at all. Then the same from
    ``inputs_embeds`` (positions by the stock rule for embeddings: from the shard's offset)."""
    inputs, mask = _longformer_inputs(45, [45, 31], [[40], []], seed=1)
    stock = build(transformers.LongformerModel, longformer_config(windows=(8, 12)), 1)
    check_matches_unsharded(stock, _encoder_hidden, inputs, mask, bounds=(0, 17, 45), pad_to_window=False)
    inputs["inputs_embeds"] = torch.randn(*mask.shape, 32, generator=torch.Generator().manual_seed(5))
    del inputs["input_ids"]
    check_matches_unsharded(stock, _encoder_hidden, inputs, mask, bounds=(0, 17, 45), pad_to_window=False)


def check_led_encoder():
    """LED's encoder (positions from the shard's offset), a global token on rank 0 only; the decoder refuses."""
    inputs, mask = _longformer_inputs(45, [45, 30], [[2], []], seed=2)
    stock = build(transformers.LEDModel, led_config(windows=(16, 8)), 2)
    check_matches_unsharded(stock, _led_encoder_hidden, inputs, mask, bounds=(0, 20, 45), pad_to_window=False)
    model = longattn.apply_longattn(copy.deepcopy(stock), backend="torch", pad_to_window=False)
    bufs = [x.clone() for x in inputs.values()]
    with pytest.raises(ValueError, match="decoder"):
        with sequence_parallel(None, model=model, buffers=bufs, bounds=(0, 20, 45)):
            model(**dict(zip(inputs, bufs)), decoder_input_ids=torch.ones(2, 3, dtype=torch.long))


def check_longt5(attention_type, bounds, group=None):
    ids, mask = token_batch([40, 27, 3], 40, 3, pad_id=0)  # row 1: orphans on rank 1; row 2: no full block
    stock = build(transformers.LongT5EncoderModel, longt5_config(attention_type), 3)
    check_matches_unsharded(stock, _encoder_hidden, dict(input_ids=ids, attention_mask=mask), mask, group=group,
                            bounds=bounds)


def check_longt5_tglobal():
    """Transient-global, shards 18 | 22: block 4 (tokens 16-19) straddles the ranks."""
    check_longt5("transient-global", (0, 18, 40))


def check_longt5_local():
    """Local attention, a 3-token shard (the band's radius 5 reaches past it); the group as a 1-D DeviceMesh."""
    check_longt5("local", (0, 3, 40), group=init_device_mesh("cpu", (P,), mesh_dim_names=("cp",))["cp"])


def check_errors():
    """A shard the model pads to its window (rank 1's 21 tokens; rank 0's 24 need none), an unpatched model,
    ``output_attentions``, bounds given twice: every rank raises, none hangs."""
    inputs, _ = _longformer_inputs(45, [45, 31], [[0], []], seed=4)
    stock = build(transformers.LongformerModel, longformer_config(windows=(8, 12)), 4)
    model = longattn.apply_longattn(copy.deepcopy(stock), backend="torch")  # pads each shard to a multiple of 12
    bufs = [x.clone() for x in inputs.values()]
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\].*pad_to_window=False"):
        with sequence_parallel(None, model=model, buffers=bufs, bounds=(0, 24, 45)):
            model(**dict(zip(inputs, bufs)))
    with pytest.raises(ValueError, match="apply_longattn"):
        with sequence_parallel(None, model=stock, buffers=bufs):
            pass
    model = longattn.apply_longattn(copy.deepcopy(stock), backend="torch", pad_to_window=False)
    with pytest.raises(ValueError, match="cannot run sharded.*output_attentions"):  # no stock fallback on a shard
        with sequence_parallel(None, model=model, buffers=bufs):
            model(**dict(zip(inputs, bufs)), output_attentions=True)
    # Ranks whose models differ (rank 1's second layer has another window): the entry check, which the layers'
    # once-per-forward checks rely on, raises everywhere.
    other = build(transformers.LongformerModel, longformer_config(windows=(8, 12 + 4 * dist.get_rank())), 4)
    other = longattn.apply_longattn(other, backend="torch", pad_to_window=False)
    with pytest.raises(ValueError, match="disagree on the arguments of sequence_parallel"):
        with sequence_parallel(None, model=other, buffers=bufs):
            pass
    sh = SeqShards(None, (0, 17, 45))
    with pytest.raises(ValueError, match="bounds"):
        with sequence_parallel(sh, model=model, bounds=(0, 20, 45)):
            pass


def check_buffers():
    """Even shards (23 | 22), a buffer with the sequence on dim 0, one left sharded on exit; gather_sequence."""
    model = longattn.apply_longattn(build(transformers.LongformerModel, longformer_config(), 0), backend="torch")
    whole = torch.arange(90).view(2, 45)
    ids, seq_first = whole.clone(), whole.t().contiguous()
    with sequence_parallel(None, model=model, buffers=[ids, seq_first], buffer_seq_dims=[1, 0],
                           no_restore_buffers=[seq_first]) as sh:
        assert sh.bounds == (0, 23, 45)
        assert torch.equal(ids, whole[:, sh.start:sh.stop]) and torch.equal(seq_first, whole.t()[sh.start:sh.stop])
    assert torch.equal(ids, whole) and torch.equal(seq_first, whole.t()[sh.start:sh.stop])
    # gather_sequence: the whole tensor on every rank; its backward sums the ranks' gradients of each shard.
    g = torch.Generator().manual_seed(6)
    x, W = torch.randn(2, 45, 3, generator=g, dtype=torch.float64), torch.randn(2, 45, 3, generator=g)
    mine = x[:, sh.start:sh.stop].clone().requires_grad_(True)
    got = gather_sequence(mine, sh)
    (got * W).sum().backward()
    assert torch.equal(got, x) and torch.allclose(mine.grad, P * W[:, sh.start:sh.stop].double())


def _forward_calls(model, inputs, bounds) -> dict:
    """Collective calls (by kind) of one forward of ``model`` under ``sequence_parallel`` (the same for the second
    forward in the block: each forward checks its layers' arguments again)."""
    bufs = {n: x.clone() for n, x in inputs.items()}
    with sequence_parallel(None, model=model, buffers=list(bufs.values()), bounds=bounds):
        calls = []
        for _ in range(2):
            reset_stats()
            model(**bufs)
            calls.append(stats()["calls"])
    assert calls[0] == calls[1], calls
    return calls[0]


def check_collectives_per_layer():
    """Inside ``sequence_parallel`` each op's agreement check runs once per forward (per kind of op and window),
    not once per layer: the agreement all-gathers (``all_gather_ints``) of a 1- and a 3-layer encoder are equal,
    and per layer only the data collectives remain (Longformer: the global-token all-gather, the halo and the
    global-row all-to-alls; TGlobal: the halo all-to-all, the edge-partial and aggregate all-gathers). Per forward:
    Longformer's position ids, global count and one check; TGlobal's block ids, their check and one check for each
    of its two ops. (Before: one more all-gather per op call, 4 -> 3 collectives per Longformer layer, 5 -> 3 per
    TGlobal layer.)"""
    ids, mask = token_batch([48, 37], 48, 8, pad_id=1)
    lf = dict(input_ids=ids, attention_mask=mask, global_attention_mask=_globals(2, 48, [[3], [30]]))
    t5 = dict(zip(("input_ids", "attention_mask"), token_batch([40, 27], 40, 9, pad_id=0)))
    calls = {}
    for L in (1, 3):
        model = build(transformers.LongformerModel, longformer_config(windows=(8,) * L), 0)
        calls["longformer", L] = _forward_calls(longattn.apply_longattn(model, backend="torch", pad_to_window=False),
                                                lf, (0, 20, 48))
        config = longt5_config("transient-global")
        config.num_layers = L
        model = longattn.apply_longattn(build(transformers.LongT5EncoderModel, config, 3), backend="torch")
        calls["tglobal", L] = _forward_calls(model, t5, (0, 18, 40))
    for family, per_forward, per_layer in (("longformer", dict(all_gather_ints=3), dict(all_gather=1, all_to_all=2)),
                                           ("tglobal", dict(all_gather_ints=4), dict(all_gather=2, all_to_all=1))):
        for L in (1, 3):
            assert calls[family, L] == {**per_forward, **{k: L * n for k, n in per_layer.items()}}, (family, calls)


CHECKS = [check_longformer_even_shards, check_longformer_uneven_no_pad, check_led_encoder, check_longt5_tglobal,
          check_longt5_local, check_errors, check_buffers, check_collectives_per_layer]


def _worker(rank, store):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=P,
                            timeout=timedelta(seconds=30))
    try:
        for check in CHECKS:
            check()
    except BaseException:
        traceback.print_exc()  # mp reports the first rank to exit, often a peer of the one that failed
        raise
    finally:
        dist.destroy_process_group()


def test_patched_hf_encoders_sequence_parallel(tmp_path):
    """Longformer, LED encoder, LongT5 (transient-global, local) at P = 2 equal the unsharded models."""
    _start(_worker, P, tmp_path)
