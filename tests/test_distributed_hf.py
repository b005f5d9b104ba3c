"""``longattn.distributed.sequence_parallel``: patched Hugging Face encoders at P = 2 and 3 against the unsharded
models, with and without gradient checkpointing.

One gloo group of 3 CPU processes (the spawn harness of ``tests/test_distributed.py``; 30 s collective timeout, so
a bug fails instead of hanging) runs the P = 3 checks, then ranks 0 and 1 the P = 2 checks on a subgroup. Every
rank builds the same tiny random model and whole inputs, runs the oracles unsharded, then the model patched
(``backend="torch"``) under ``sequence_parallel`` with the whole inputs as buffers, sharded in place. Each rank's
loss is ``(hidden_r * W_r).sum()``, ``W`` one random weight that is 0 on padding tokens, so the ranks' losses add
up to the unsharded one. Compared, on this rank's rows and on every parameter's gradient summed over the ranks:

- float64 against the unsharded *patched* float64 model: relative error <= 1e-10 (all rows; gradients relative
  to the largest gradient of the parameter's module, as ``tests/test_models.py``). Everything sharding can break
  (halos, global tokens on one rank, block ids and aggregates across ranks, positions) shows here.
- float32 against the unsharded *stock* float32 model: hidden states of real tokens within 1e-5 relative, gradients
  within ``tests/test_models.py``'s rule against the float64 oracle (both ways).
"""

from __future__ import annotations

import copy
import functools
import os
import threading
import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh

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


def _oracle(stock, fn, inputs, real, apply_kw):
    """``(W, hidden, grads)`` of the unsharded patched float64 model (the loss weight ``W`` is 0 on padding)."""
    B, S = real.shape
    W = torch.randn(B, S, stock.config.hidden_size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    W = W * real[..., None]
    oracle = longattn.apply_longattn(copy.deepcopy(stock).double(), backend="torch", **apply_kw)
    return (W, *_run(oracle, fn, inputs, W))


def _sharded(model, fn, inputs, W, *, group, bounds=None, multiple_of=1, backward="inside"):
    """``model`` under ``sequence_parallel`` with copies of the whole ``inputs`` as buffers; the backward of this
    rank's loss runs in the block ("inside"), after it ("after": the buffers hold the whole sequence again), or in
    the block on a new thread ("thread": an empty context, as in autograd's device threads on a GPU). Returns
    ``(shards, hidden (B, S_r, E), gathered hidden (B, S, E), {param: grad summed over the group})``."""
    bufs = {n: x.clone() for n, x in inputs.items()}
    model.zero_grad(set_to_none=True)
    with sequence_parallel(group, model=model, buffers=list(bufs.values()), bounds=bounds,
                           multiple_of=multiple_of) as sh:
        a, b = sh.start, sh.stop
        assert all(x.shape[:2] == (W.shape[0], b - a) for x in bufs.values())  # sharded in place
        hidden = fn(model, **bufs)
        loss = (hidden.double() * W[:, a:b]).sum()
        whole = gather_sequence(hidden.detach(), sh)
        if backward == "inside":
            loss.backward()
        elif backward == "thread":
            failed = []
            worker = threading.Thread(target=lambda: _capture(failed, loss.backward))
            worker.start()
            worker.join()
            if failed:
                raise failed[0]
    if backward == "after":
        loss.backward()
    assert all(torch.equal(bufs[n], inputs[n]) for n in inputs)  # restored on exit
    return sh, hidden.detach(), whole, _summed_grads(model, sh.group)


def _summed_grads(model, group) -> dict:
    """``{param: grad summed over the group}`` (one all-reduce of them all, flattened)."""
    params = dict(model.named_parameters())
    flat = summed(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params.values()]),
                  group)
    names = (n.replace("_checkpoint_wrapped_module.", "") for n in params)  # (torch's checkpoint_wrapper)
    return dict(zip(names, (g.view_as(p) for g, p in zip(flat.split([p.numel() for p in params.values()]),
                                                          params.values()))))


def _capture(failed, fn):
    try:
        fn()
    except BaseException as e:  # (a thread's exception does not reach join())
        failed.append(e)


def _assert_f64(sh, hidden, whole, grads, ref, ref_g):
    _assert_rel("hidden states", hidden, ref[:, sh.start:sh.stop], ref.abs().max().item())
    _assert_rel("gathered hidden states", whole, ref, ref.abs().max().item())
    _assert_grads_rel(grads, ref_g)


def check_matches_unsharded(stock, fn, inputs, real, *, group, bounds=None, multiple_of=1, backward="inside",
                            **apply_kw):
    """``stock`` (an fp32 model in eval mode) under ``sequence_parallel`` vs unsharded, as the module docstring says.

    ``fn(model, **inputs)`` returns the encoder's ``(B, S, E)`` hidden states; ``real`` ``(B, S)`` marks real tokens;
    ``backward`` as in :func:`_sharded`.
    """
    W, ref, ref_g = _oracle(stock, fn, inputs, real, apply_kw)
    stock_h, stock_g = _run(stock, fn, inputs, W)
    for dtype in (torch.float64, torch.float32):
        model = longattn.apply_longattn(copy.deepcopy(stock).to(dtype), backend="torch", **apply_kw)
        sh, hidden, whole, grads = _sharded(model, fn, inputs, W, group=group, bounds=bounds, multiple_of=multiple_of,
                                            backward=backward)
        if dtype == torch.float64:
            _assert_f64(sh, hidden, whole, grads, ref, ref_g)
        else:
            mine = real[:, sh.start:sh.stop].bool()
            assert_rel_close("hidden states", hidden[mine], stock_h[:, sh.start:sh.stop][mine])
            assert_grads_within_rule(grads, stock_g, ref_g, both_ways=True)


def check_checkpointed(stock, fn, inputs, real, runs, *, group, bounds, wrap=None, **apply_kw):
    """``stock`` in training mode with gradient checkpointing under ``sequence_parallel``, float64, equals the
    unsharded patched model (fp64, 1e-10) for each ``(use_reentrant, backward)`` of ``runs`` (``backward`` as in
    :func:`_sharded`). Checkpointing by transformers' ``gradient_checkpointing_enable`` (a per-layer recompute in the
    backward), or, with ``wrap`` (a layer class), by torch's ``apply_activation_checkpointing`` on those layers. The
    configs have no dropout."""
    W, ref, ref_g = _oracle(stock, fn, inputs, real, apply_kw)
    for reentrant, backward in runs:
        model = longattn.apply_longattn(copy.deepcopy(stock).double().train(), backend="torch", **apply_kw)
        if wrap is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # (transformers 5: a deprecated alias, the usual call)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        else:
            impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
            apply_activation_checkpointing(model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper,
                                                                                          checkpoint_impl=impl),
                                           check_fn=lambda m: isinstance(m, wrap))
        try:
            _assert_f64(*_sharded(model, fn, inputs, W, group=group, bounds=bounds, backward=backward), ref, ref_g)
        except AssertionError as e:
            raise AssertionError(f"use_reentrant={reentrant}, backward {backward}, wrap {wrap}: {e}") from None


def _encoder_hidden(model, **inputs):
    # (float inputs, inputs_embeds, in the model's dtype)
    return model(**{n: x.to(model.dtype) if x.is_floating_point() else x for n, x in inputs.items()}).last_hidden_state


def _led_encoder_hidden(model, **inputs):
    return model.get_encoder()(**inputs).last_hidden_state


def _longformer_inputs(S, lengths, globals_, seed):
    ids, mask = token_batch(lengths, S, seed, pad_id=1)
    return dict(input_ids=ids, attention_mask=mask, global_attention_mask=_globals(len(lengths), S, globals_)), mask


# ------------------------------------------------------------------------------------------------------------- cases
def check_longformer_even_shards(group):
    """Shards of 24 = 2 x max(attention_window): HF's pad-to-window is a no-op on every rank. Row 0 has global
    tokens on both ranks, row 1 on rank 0 only (and padding on rank 1)."""
    inputs, mask = _longformer_inputs(48, [48, 37], [[0, 30], [5]], seed=0)
    stock = build(transformers.LongformerModel, longformer_config(windows=(8, 12)), 0)
    check_matches_unsharded(stock, _encoder_hidden, inputs, mask, group=group, multiple_of=12)


def check_longformer_uneven_no_pad(group):
    """``pad_to_window=False``, uneven shards (17 | 28); rank 0 holds no global token at all; the backward after
    the block (the embedding saved the model's copy of ``input_ids``, not the buffer restored on exit). Then the
    same from ``inputs_embeds`` (positions by the stock rule for embeddings: from the shard's offset)."""
    inputs, mask = _longformer_inputs(45, [45, 31], [[40], []], seed=1)
    stock = build(transformers.LongformerModel, longformer_config(windows=(8, 12)), 1)
    check_matches_unsharded(stock, _encoder_hidden, inputs, mask, group=group, bounds=(0, 17, 45),
                            pad_to_window=False, backward="after")
    inputs["inputs_embeds"] = torch.randn(*mask.shape, 32, generator=torch.Generator().manual_seed(5))
    del inputs["input_ids"]
    check_matches_unsharded(stock, _encoder_hidden, inputs, mask, group=group, bounds=(0, 17, 45),
                            pad_to_window=False)


def check_led_encoder(group):
    """LED's encoder (positions from the shard's offset), a global token on rank 0 only; the decoder refuses."""
    inputs, mask = _longformer_inputs(45, [45, 30], [[2], []], seed=2)
    stock = build(transformers.LEDModel, led_config(windows=(16, 8)), 2)
    check_matches_unsharded(stock, _led_encoder_hidden, inputs, mask, group=group, bounds=(0, 20, 45),
                            pad_to_window=False)
    model = longattn.apply_longattn(copy.deepcopy(stock), backend="torch", pad_to_window=False)
    bufs = [x.clone() for x in inputs.values()]
    with pytest.raises(ValueError, match="decoder"):
        with sequence_parallel(group, model=model, buffers=bufs, bounds=(0, 20, 45)):
            model(**dict(zip(inputs, bufs)), decoder_input_ids=torch.ones(2, 3, dtype=torch.long))


def check_longt5(attention_type, bounds, group):
    ids, mask = token_batch([40, 27, 3], 40, 3, pad_id=0)  # row 1: orphans on rank 1; row 2: no full block
    stock = build(transformers.LongT5EncoderModel, longt5_config(attention_type), 3)
    check_matches_unsharded(stock, _encoder_hidden, dict(input_ids=ids, attention_mask=mask), mask, group=group,
                            bounds=bounds)


def check_longt5_tglobal(group):
    """Transient-global, shards 18 | 22: block 4 (tokens 16-19) straddles the ranks."""
    check_longt5("transient-global", (0, 18, 40), group)


def check_longt5_local(group):
    """Local attention, a 3-token shard (the band's radius 5 reaches past it); the group as a 1-D DeviceMesh."""
    check_longt5("local", (0, 3, 40), DeviceMesh.from_group(group, "cpu", mesh_dim_names=("cp",)))


def check_errors(group):
    """A shard the model pads to its window (rank 1's 21 tokens; rank 0's 24 need none), an unpatched model,
    ``output_attentions``, bounds given twice: every rank raises, none hangs."""
    inputs, _ = _longformer_inputs(45, [45, 31], [[0], []], seed=4)
    stock = build(transformers.LongformerModel, longformer_config(windows=(8, 12)), 4)
    model = longattn.apply_longattn(copy.deepcopy(stock), backend="torch")  # pads each shard to a multiple of 12
    bufs = [x.clone() for x in inputs.values()]
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\].*pad_to_window=False"):
        with sequence_parallel(group, model=model, buffers=bufs, bounds=(0, 24, 45)):
            model(**dict(zip(inputs, bufs)))
    with pytest.raises(ValueError, match="apply_longattn"):
        with sequence_parallel(group, model=stock, buffers=bufs):
            pass
    model = longattn.apply_longattn(copy.deepcopy(stock), backend="torch", pad_to_window=False)
    with pytest.raises(ValueError, match="cannot run sharded.*output_attentions"):  # no stock fallback on a shard
        with sequence_parallel(group, model=model, buffers=bufs):
            model(**dict(zip(inputs, bufs)), output_attentions=True)
    # Ranks whose models differ (rank 1's second layer has another window): the entry check, which the layers'
    # once-per-forward checks rely on, raises everywhere.
    other = build(transformers.LongformerModel, longformer_config(windows=(8, 12 + 4 * dist.get_rank(group))), 4)
    other = longattn.apply_longattn(other, backend="torch", pad_to_window=False)
    with pytest.raises(ValueError, match="disagree on the arguments of sequence_parallel"):
        with sequence_parallel(group, model=other, buffers=bufs):
            pass
    sh = SeqShards(group, (0, 17, 45))
    with pytest.raises(ValueError, match="bounds"):
        with sequence_parallel(sh, model=model, bounds=(0, 20, 45)):
            pass


def check_buffers(group):
    """Even shards (23 | 22), a buffer with the sequence on dim 0, one left sharded on exit; gather_sequence."""
    model = longattn.apply_longattn(build(transformers.LongformerModel, longformer_config(), 0), backend="torch")
    whole = torch.arange(90).view(2, 45)
    ids, seq_first = whole.clone(), whole.t().contiguous()
    with sequence_parallel(group, model=model, buffers=[ids, seq_first], buffer_seq_dims=[1, 0],
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
    assert torch.equal(got, x) and torch.allclose(mine.grad, sh.size * W[:, sh.start:sh.stop].double())


def _counted_models(L: int) -> dict:
    """``family: (model, inputs, bounds)``: an L-layer Longformer (globals on both ranks) and LongT5 TGlobal."""
    ids, mask = token_batch([48, 37], 48, 8, pad_id=1)
    lf = dict(input_ids=ids, attention_mask=mask, global_attention_mask=_globals(2, 48, [[3], [30]]))
    t5 = dict(zip(("input_ids", "attention_mask"), token_batch([40, 27], 40, 9, pad_id=0)))
    config = longt5_config("transient-global")
    config.num_layers = L
    longformer = build(transformers.LongformerModel, longformer_config(windows=(8,) * L), 0)
    return {"longformer": (longattn.apply_longattn(longformer, backend="torch", pad_to_window=False), lf, (0, 20, 48)),
            "tglobal": (longattn.apply_longattn(build(transformers.LongT5EncoderModel, config, 3), backend="torch"),
                        t5, (0, 18, 40))}


def _calls(model, inputs, bounds, group) -> tuple[dict, dict]:
    """Collective calls (by kind) of one forward of ``model`` under ``sequence_parallel`` (the same for the second
    forward in the block: each forward checks its layers' arguments again), and those counted in the second one's
    backward (``stats`` counts the forward collectives: those of a checkpointed layer's recompute)."""
    bufs = {n: x.clone() for n, x in inputs.items()}
    with sequence_parallel(group, model=model, buffers=list(bufs.values()), bounds=bounds):
        calls = []
        for _ in range(2):
            reset_stats()
            hidden = model(**bufs).last_hidden_state
            calls.append(stats()["calls"])
        reset_stats()
        hidden.sum().backward()
    assert calls[0] == calls[1], calls
    return calls[0], stats()["calls"]


PER_FORWARD = {"longformer": dict(all_gather_ints=3), "tglobal": dict(all_gather_ints=4)}
PER_LAYER = {"longformer": dict(all_gather=1, all_to_all=2), "tglobal": dict(all_gather=2, all_to_all=1)}


def check_collectives_per_layer(group):
    """Inside ``sequence_parallel`` each op's agreement check runs once per forward (per kind of op and window),
    not once per layer: the agreement all-gathers (``all_gather_ints``) of a 1- and a 3-layer encoder are equal,
    and per layer only the data collectives remain (Longformer: the global-token all-gather, the halo and the
    global-row all-to-alls; TGlobal: the halo all-to-all, the edge-partial and aggregate all-gathers). Per forward:
    Longformer's position ids, global count and one check; TGlobal's block ids, their check and one check for each
    of its two ops. (Before: one more all-gather per op call, 4 -> 3 collectives per Longformer layer, 5 -> 3 per
    TGlobal layer.)"""
    for L in (1, 3):
        for family, (model, inputs, bounds) in _counted_models(L).items():
            forward, backward = _calls(model, inputs, bounds, group)
            assert forward == {**PER_FORWARD[family], **{k: L * n for k, n in PER_LAYER[family].items()}}, \
                (family, L, forward)
            assert backward == {}, (family, L, backward)


def check_checkpointing_collectives(group):
    """With gradient checkpointing the forward makes the same collectives as without, and each layer's recompute
    in the backward repeats that layer's data collectives (on every rank: a rank that skipped or added one would
    hang the others) but none of its agreement checks (cache hits of the forward's), 3 layers. LongT5's layer 0
    makes a new compact bias in its recompute, so it derives the block ids again (one all-gather of ints)."""
    L = 3
    for reentrant in (False, True):
        for family, (model, inputs, bounds) in _counted_models(L).items():
            model.train()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            forward, recompute = _calls(model, inputs, bounds, group)
            data = {k: L * n for k, n in PER_LAYER[family].items()}
            assert forward == {**PER_FORWARD[family], **data}, (family, reentrant, forward)
            assert recompute == {**data, **({"all_gather_ints": 1} if family == "tglobal" else {})}, \
                (family, reentrant, recompute)


def check_gradient_checkpointing(group):
    """``gradient_checkpointing_enable``: the backward inside the block (reentrant or not), after it, and on another
    thread (the recompute runs under the context of the layer's forward) equals the unsharded model. Longformer with
    globals on both ranks / one rank (also checkpointed by torch's ``checkpoint_wrapper``), LED's encoder, LongT5
    TGlobal with a straddling block."""
    inside = [(False, "inside"), (True, "inside")]
    inputs, mask = _longformer_inputs(48, [48, 37], [[0, 30], [5]], seed=0)
    stock = build(transformers.LongformerModel, longformer_config(windows=(8, 12)), 0)
    check_checkpointed(stock, _encoder_hidden, inputs, mask, [*inside, (True, "after"), (False, "thread")],
                       group=group, bounds=(0, 24, 48))
    check_checkpointed(stock, _encoder_hidden, inputs, mask, [(True, "after"), (False, "thread")], group=group,
                       bounds=(0, 24, 48), wrap=transformers.models.longformer.modeling_longformer.LongformerLayer)
    inputs, mask = _longformer_inputs(45, [45, 30], [[2], []], seed=2)
    stock = build(transformers.LEDModel, led_config(windows=(16, 8)), 2)
    check_checkpointed(stock, _led_encoder_hidden, inputs, mask, [*inside, (False, "after")], group=group,
                       bounds=(0, 20, 45), pad_to_window=False)
    ids, mask = token_batch([40, 27, 3], 40, 3, pad_id=0)
    stock = build(transformers.LongT5EncoderModel, longt5_config("transient-global"), 3)
    check_checkpointed(stock, _encoder_hidden, dict(input_ids=ids, attention_mask=mask), mask,
                       [*inside, (False, "after"), (True, "thread")], group=group, bounds=(0, 18, 40))


def check_p3_longformer(group):
    """P = 3, uneven shards (14 | 16 | 15, ``pad_to_window=False``): row 0's one global token on rank 1 only, none in
    row 1; then checkpointed, the backward after the block."""
    inputs, mask = _longformer_inputs(45, [45, 33], [[20], []], seed=10)
    stock = build(transformers.LongformerModel, longformer_config(windows=(8, 12)), 10)
    bounds = (0, 14, 30, 45)
    check_matches_unsharded(stock, _encoder_hidden, inputs, mask, group=group, bounds=bounds, pad_to_window=False)
    check_checkpointed(stock, _encoder_hidden, inputs, mask, [(False, "after")], group=group, bounds=bounds,
                       pad_to_window=False)


def check_p3_longt5_tglobal(group):
    """P = 3, shards 10 | 8 | 22: blocks 2 (tokens 8-11) and 4 (16-19) straddle the ranks, row 1's orphans
    (24-26) are on rank 2, row 2 has no full block; then checkpointed (reentrant), the backward inside the block."""
    ids, mask = token_batch([40, 27, 3], 40, 11, pad_id=0)
    stock = build(transformers.LongT5EncoderModel, longt5_config("transient-global"), 11)
    inputs = dict(input_ids=ids, attention_mask=mask)
    check_matches_unsharded(stock, _encoder_hidden, inputs, mask, group=group, bounds=(0, 10, 18, 40))
    check_checkpointed(stock, _encoder_hidden, inputs, mask, [(True, "inside")], group=group, bounds=(0, 10, 18, 40))


def check_longt5_attention_dropout(group):
    """Training with LongT5's attention dropout (transient-global, dropout_rate 0.2; hidden-state dropout, which
    draws per token from each rank's generator, off): with the same generator state on every rank, the sharded
    model equals the unsharded patched one run with that seed (fp64); the keep bits are the whole sequence's."""
    ids, mask = token_batch([40, 27, 3], 40, 3, pad_id=0)
    stock = build(transformers.LongT5EncoderModel, longt5_config("transient-global", dropout_rate=0.2), 3).train()
    for module in stock.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    inputs = dict(input_ids=ids, attention_mask=mask)
    torch.manual_seed(11)
    W, ref, ref_g = _oracle(stock, _encoder_hidden, inputs, mask, {})
    torch.manual_seed(12)
    assert not torch.allclose(_oracle(stock, _encoder_hidden, inputs, mask, {})[1], ref)  # dropout is on
    model = longattn.apply_longattn(copy.deepcopy(stock).double(), backend="torch")
    torch.manual_seed(11)
    _assert_f64(*_sharded(model, _encoder_hidden, inputs, W, group=group, bounds=(0, 16, 40)), ref, ref_g)


CHECKS_P2 = [check_longformer_even_shards, check_longformer_uneven_no_pad, check_led_encoder, check_longt5_tglobal,
             check_longt5_local, check_errors, check_buffers, check_collectives_per_layer,
             check_checkpointing_collectives, check_gradient_checkpointing, check_longt5_attention_dropout]
CHECKS_P3 = [check_p3_longformer, check_p3_longt5_tglobal]


def _worker(rank, store):
    """P = 3 checks on the world, then P = 2 checks on ranks 0 and 1 (rank 2 leaves: a check that used the
    default group instead of its own would fail)."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = timedelta(seconds=30)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3, timeout=timeout)
    try:
        pair = dist.new_group([0, 1], timeout=timeout)  # (every rank takes part in creating it)
        for check in CHECKS_P3:
            check(dist.group.WORLD)
        if rank < 2:
            for check in CHECKS_P2:
                check(pair)
    except BaseException:
        traceback.print_exc()  # mp reports the first rank to exit, often a peer of the one that failed
        raise
    finally:
        dist.destroy_process_group()


def test_patched_hf_encoders_sequence_parallel(tmp_path):
    """Longformer, LED encoder, LongT5 (transient-global, local) at P = 2 and 3 equal the unsharded models, with and
    without gradient checkpointing."""
    _start(_worker, 3, tmp_path)
