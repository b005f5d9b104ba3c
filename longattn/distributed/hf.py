"""``sequence_parallel``: run a Hugging Face encoder patched by :func:`longattn.apply_longattn` sequence-parallel.

    longattn.apply_longattn(model)                          # Longformer, LED or LongT5, packed=False
    with sequence_parallel(group, model=model, buffers=[ids, mask, gmask], multiple_of=512) as sh:
        out = model(input_ids=ids, attention_mask=mask, global_attention_mask=gmask)  # ids, mask, gmask: sharded
        hidden = out.last_hidden_state                       # (B, S_r, E): this rank's rows [sh.start, sh.stop)
    # on exit the buffers hold the whole sequence again

Like torch's ``context_parallel`` (``torch.distributed.tensor.experimental``), the context manager takes the
**whole-sequence** inputs (``buffers``, each with its sequence dim in ``buffer_seq_dims``), shards them **in
place** (``resize_`` + ``copy_``) into contiguous shards ``[bounds[r], bounds[r+1])`` and restores them on exit
(except those in ``no_restore_buffers``). In place, so that a training loop keeps its tensors and its
``model(**batch)`` call unchanged; whole-sequence inputs, so that the context manager (not every call site) owns
the layout. Callers that already hold their shards pass a :class:`SeqShards` (or ``bounds=``) and no buffers.

Inside the context the patched attention layers read the active shards through one accessor
(``longattn.models._common.active_seq_parallel``) and pass ``seq_parallel=`` to the ops: the band's halo
exchange, Longformer's global tokens gathered and their rows merged across ranks (the global count taken over the
whole sequence, not the rank's ``is_global_attn``), LongT5's block ids, aggregates and ``G = S // block_size``
of the whole sequence. LongT5's relative position biases depend only on offsets, so they need nothing. What mixes
positions outside the attention layers is fixed by hooks on ``model``, removed on exit:

- Longformer's learned positions (``padding_idx + cumsum(real)``) continue the previous ranks' counts (one
  all-gather of ``B`` ints per forward) unless ``position_ids`` are passed (then shard them as a buffer);
- LED's encoder positions start at the shard's offset.

Supported: the encoders of ``LongformerModel`` / Longformer heads whose outputs are per token, ``LEDEncoder``
(``model.get_encoder()`` of an LED model) and ``LongT5EncoderModel`` / a LongT5 encoder (local or
transient-global), in eval mode or training. Attention dropout runs in LongT5's ops: each (row, key) keep bit is
drawn once, by the rank of its row, at its whole-sequence position (with the same generator state on every rank,
bitwise the unsharded model's; tested with hidden-state dropout off). Longformer / LED attention dropout under
``seq_parallel`` raises (set the config's attention dropout to 0). Hidden-state dropout is per token from each
rank's own generator: identical generators give the shards the same hidden masks, so seed the ranks differently
in training (attention dropout then draws other, equally valid bits). Not supported:
decoders (cross-attention over a sharded encoder output; they raise: gather the encoder output with
:func:`gather_sequence` and run the decoder outside the context), ``output_attentions`` (its stock fallback would
see one shard: raises), ``apply_longattn(packed=True)`` models, and heads that read a fixed position (the
pooler's token 0 lives on rank 0 only). Longformer / LED pad each rank's shard to a multiple of
``attention_window`` inside the model: that is only right at the end of the sequence, so either every shard is a
multiple of ``max(attention_window)`` (``multiple_of=`` that, ``S`` divisible by it) or the model is patched with
``apply_longattn(model, pad_to_window=False)``; a shard the model padded raises on every rank.

The backward needs no context (its collectives are in the autograd graph), so it may run inside the block or after
it. After it, the buffers hold the whole sequence again, which is why the model and its encoders get private copies
of the sharded buffers (a forward pre-hook, while grad is enabled: ``B x S_r`` ints): the graph saves those (the
embedding's ``input_ids``, the masks a checkpointed layer keeps), not the buffers. A loss of yours that saves a
buffer (``cross_entropy``'s labels) needs it in ``no_restore_buffers`` or the backward inside the block (else
autograd raises its in-place-modification error, on every rank).

Gradient checkpointing (transformers' ``model.gradient_checkpointing_enable()`` or torch's ``checkpoint_wrapper``
/ FSDP's ``apply_activation_checkpointing``, reentrant or not) recomputes a layer in the backward, maybe after the
block and, on a GPU, in autograd's device thread, where the context variable is not set. So each forward in the
block wraps the model's checkpoint functions (transformers' per-layer ``_gradient_checkpointing_func``, torch's
``CheckpointWrapper.checkpoint_fn``; put back on exit) to run the checkpointed function, in its forward and in its
recompute, under the context active when the layer was called: the recompute is sharded like the forward wherever
and whenever it runs. It repeats the layer's data collectives on every rank (the same ones in the same order: the
ranks run the same backward); its agreement checks are cache hits of the forward's (:meth:`SeqShards.agreed_once`;
the cache is the same on every rank, so a forward of other shapes in between costs the same checks everywhere),
and LongT5's layer 0, which makes a new compact bias in its recompute, derives the block ids again (one all-gather
of ints). ``torch.utils.checkpoint`` called by hand around part of the model is not covered: it recomputes
unsharded (a ``CheckpointError`` or wrong gradients) unless its backward runs inside the block on the thread that
entered it (CPU tensors).

Parameter gradients are per-rank shares, to be summed over the group (a DDP over the sequence-parallel ranks
averages them: scale each rank's loss by the group size).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from ..models import _common
from . import _comm
from .shards import SeqShards

_DECODERS = (("led", "LEDDecoder"), ("longt5", "LongT5Stack"))


class SeqParallelContext:
    """What the patched forwards read inside :func:`sequence_parallel`: ``shards`` and per-forward helpers.

    ``shards`` runs each op's agreement all-gather once per distinct fingerprint and forward
    (:meth:`SeqShards.agreed_once`; a pre-hook on the model forgets at every forward): an L-layer encoder pays one
    check per kind of op and window instead of one per op call. Safe because what the layers' fingerprints hold
    (batch, shard and head sizes, dtypes, windows, options) is fixed within a forward by its inputs and the model,
    which the entry check compared across ranks; a rank whose input is bad (a shard the model padded) already
    fails at the first layer's check, on every rank.
    """

    def __init__(self, shards: SeqShards):
        self.shards = shards
        self._globals = (None, 0)  # (is_global tensor, its count): one collective per forward, not per layer

    def max_globals(self, is_global: Tensor) -> int:
        """The largest number of global tokens of a row over the *whole* sequence (the Longformer encoder's
        ``is_global_attn`` is this rank's). One all-gather of ``B`` ints, reused by the layers that get the same
        ``is_index_global_attn`` tensor."""
        if self._globals[0] is is_global and not torch.compiler.is_compiling():
            return self._globals[1]
        count = int(self._gather_rows(is_global.shape[1], is_global.sum(1)).sum(0).max())
        self._globals = (is_global, count)
        return count

    def longformer_position_ids(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, padding_idx: int):
        """Longformer's position ids of this shard as the whole sequence numbers them: ``(B, S_r)`` int64, or None
        to leave them to the stock code (all-padding ids: ``padding_idx`` everywhere, no offset needed).

        HF: ``padding_idx + cumsum(real) * real`` from ``input_ids`` (``real = input_ids != padding_idx``), or
        ``padding_idx + 1 + arange(S)`` from ``inputs_embeds``.
        """
        sh = self.shards
        if input_ids is None:  # (a shard the model padded gets its extra rows too: the layers raise, on every rank)
            n = inputs_embeds.shape[1]
            pos = torch.arange(sh.start, sh.start + n, dtype=torch.long, device=inputs_embeds.device) + padding_idx + 1
            return pos[None].expand(inputs_embeds.shape[0], -1)
        real = input_ids.ne(padding_idx).long()
        if input_ids.shape[1] != sh.local_len and not bool(real.any()):
            return None  # the pad-to-window embedding of padding ids alone (inputs_embeds given): no collective
        before = self._gather_rows(input_ids.shape[1], real.sum(1))[:sh.rank].sum(0)  # (B,) real on lower ranks
        return (torch.cumsum(real, 1) + before[:, None]) * real + padding_idx

    def _gather_rows(self, rows: int, values: Tensor) -> Tensor:
        """All-gather of ``values`` (``(B,)`` ints): ``(P, B)``. Every rank raises together if some rank runs on
        other than its shard's rows (Longformer / LED padded its shard to the window: the module docstring)."""
        sh = self.shards
        mine = torch.cat([torch.tensor([int(rows != sh.local_len)], device=values.device), values.long()])
        allr = _comm.all_gather_ints(mine, sh.group).cpu()  # (P, 1 + B)
        if bool(allr[:, 0].any()):
            raise ValueError(
                f"sequence_parallel: rank(s) {allr[:, 0].nonzero().flatten().tolist()} run Longformer / LED on more "
                f"rows than their shard (bounds {sh.bounds}): the model padded a shard to a multiple of "
                "attention_window; make every shard a multiple of max(attention_window) (multiple_of=) or patch with "
                "apply_longattn(model, pad_to_window=False)")
        return allr[:, 1:]


@contextlib.contextmanager
def sequence_parallel(mesh_or_group, *, model, buffers: Sequence[Tensor] = (),
                      buffer_seq_dims: Sequence[int] | None = None, no_restore_buffers: Sequence[Tensor] = (),
                      bounds: Sequence[int] | None = None, multiple_of: int = 1):
    """Run ``model``'s patched encoder layers sequence-parallel over ``mesh_or_group`` inside the block.

    Args:
        mesh_or_group: a ProcessGroup, a 1-D DeviceMesh (``mesh["cp"]``), None (the default group), or a
            :class:`SeqShards` (its group and bounds; then no ``bounds`` / ``multiple_of``).
        model: the module the inputs go through, patched by :func:`longattn.apply_longattn` (checked: every
            Longformer / LED / LongT5 attention module in it is patched and not ``packed``); the position hooks
            go on it for the duration of the block.
        buffers: whole-sequence tensors (``input_ids``, ``attention_mask``, ``global_attention_mask``,
            ``position_ids``, labels...) sharded in place on entry; ``(B, S)`` or any shape with the sequence at
            ``buffer_seq_dims``. They must own their storage and not require grad. Empty: the caller passes local
            shards and gives ``bounds`` or a SeqShards.
        buffer_seq_dims: the sequence dim of each buffer (default 1 for all).
        no_restore_buffers: buffers (by identity) left sharded on exit.
        bounds: explicit shard bounds ``(0, b_1, ..., S)``; default ``SeqShards.even(S, group, multiple_of)``
            with ``S`` the buffers' length.
        multiple_of: every shard but the last a multiple of this (Longformer / LED with padding to the window:
            ``max(attention_window)``, and ``S`` divisible by it).

    Yields:
        the :class:`SeqShards` in use (``sh.start``, ``sh.stop``: this rank's rows of the outputs).

    Raises:
        TypeError / ValueError: bad arguments, an unpatched or packed model, buffers of different lengths, a
        decoder or a shard padded by the model inside the block (on every rank, not a hang).
    """
    buffers = list(buffers)
    dims = [1] * len(buffers) if buffer_seq_dims is None else [int(d) for d in buffer_seq_dims]
    if len(dims) != len(buffers):
        raise ValueError(f"buffer_seq_dims: expected {len(buffers)} entries (one per buffer), got {len(dims)}")
    try:
        _check_model(model)
        error = None
    except (TypeError, ValueError) as e:
        error = e
    shards = _make_shards(mesh_or_group, buffers, dims, bounds, multiple_of)
    # Every rank checks its layout and model against the others' (one tiny all-gather): a bad one raises everywhere.
    # The model's fingerprint (parameter shapes and dtypes, the attention modules' windows and modes) makes the
    # layers' checks once per forward safe: see SeqParallelContext.
    device = next(model.parameters()).device  # (a CUDA tensor for the check's collective with NCCL)
    shards.agree("sequence_parallel", (shards.bounds, None if error else _model_fingerprint(model)), error, device)
    ctx = SeqParallelContext(shards.agreed_once() if shards.verify else shards)
    keep = {id(b) for b in no_restore_buffers}
    originals = [None if id(b) in keep else b.clone() for b in buffers]
    hooks = _install_hooks(model, ctx, buffers)
    sharded = 0
    try:
        for buf, dim in zip(buffers, dims):
            local = shards.local(buf, dim).clone()
            buf.resize_(local.shape).copy_(local)
            sharded += 1
        token = _common.SEQ_PARALLEL.set(ctx)
        try:
            yield shards
        finally:
            _common.SEQ_PARALLEL.reset(token)
    finally:
        for h in hooks:
            h.remove()
        _unwrap_checkpointing(model)
        for buf, orig in zip(buffers[:sharded], originals):
            if orig is not None:
                buf.resize_(orig.shape).copy_(orig)


def gather_sequence(x: Tensor, seq_parallel: SeqShards, dim: int = 1) -> Tensor:
    """The whole-sequence tensor on every rank from each rank's shard along ``dim`` (autograd: the backward hands
    each rank the gradient of its rows, summed over the ranks' losses). For a decoder, a loss over the whole
    sequence, or checks; the sharded model itself never needs it."""
    sh = seq_parallel
    if x.shape[dim] != sh.local_len:
        raise ValueError(f"x: expected this rank's shard of {sh.local_len} rows along dim {dim}, got {tuple(x.shape)}")
    most = max(b - a for a, b in zip(sh.bounds, sh.bounds[1:]))
    x = x.movedim(dim, 0)
    padded = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])], 0)
    allg = _comm.all_gather(padded, sh.group, sh.size)  # (P, most, ...)
    whole = torch.cat([allg[r, : b - a] for r, (a, b) in enumerate(zip(sh.bounds, sh.bounds[1:]))], 0)
    return whole.movedim(0, dim)


def _make_shards(mesh_or_group, buffers, dims, bounds, multiple_of) -> SeqShards:
    lengths = set()
    for i, (buf, dim) in enumerate(zip(buffers, dims)):
        if not isinstance(buf, Tensor):
            raise TypeError(f"buffers[{i}]: expected a torch.Tensor, got {type(buf).__name__}")
        if buf.requires_grad:
            raise ValueError(f"buffers[{i}]: requires grad; shard a differentiable input (inputs_embeds) yourself")
        if not -buf.dim() <= dim < buf.dim():
            raise ValueError(f"buffer_seq_dims[{i}]: {dim} is not a dim of a {buf.dim()}-D buffer")
        lengths.add(buf.shape[dim])
    if len(lengths) > 1:
        raise ValueError(f"buffers: sequence lengths differ along buffer_seq_dims: {sorted(lengths)}")
    if isinstance(mesh_or_group, SeqShards):
        if bounds is not None or multiple_of != 1:
            raise ValueError("bounds, multiple_of: not used with a SeqShards (it has its bounds)")
        shards = mesh_or_group
    elif bounds is not None:
        shards = SeqShards(mesh_or_group, bounds)
    elif lengths:
        shards = SeqShards.even(next(iter(lengths)), mesh_or_group, multiple_of=multiple_of)
    else:
        raise ValueError("bounds: required without buffers (the caller's inputs are already its shards)")
    if lengths and lengths != {shards.seq_len}:
        raise ValueError(f"buffers: expected the whole sequence of {shards.seq_len} tokens along buffer_seq_dims, "
                         f"got {lengths.pop()}")
    return shards


def _check_model(model) -> None:
    from ..models._patching import PATCHES, _matches

    matched = [m for _, m in _matches(model, PATCHES)]
    if not matched:
        raise ValueError(f"model: {type(model).__name__} holds no Longformer / LED / LongT5 attention module")
    for m in matched:
        state = _common.patch_state(m)
        if state is None:
            raise ValueError(f"model: its {type(m).__name__} is not patched; call longattn.apply_longattn(model) first")
        if getattr(state, "packed", False):
            raise ValueError("model: patched with packed=True; sequence_parallel runs the padded layout: "
                             "apply_longattn(model, packed=False)")


def _model_fingerprint(model) -> tuple:
    """What must be equal on every rank for the layers' checks to run once per forward: parameter names, shapes and
    dtypes; the attention modules' public scalar attributes (windows, radii, block sizes, dropout, training) and
    patch options (backend)."""
    from ..models._patching import PATCHES, _matches

    params = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters())
    attn = tuple((type(m).__name__, _common.patch_state(m).backend, _common.patch_state(m).packed,
                  tuple(sorted((k, v) for k, v in vars(m).items()
                               if not k.startswith("_") and isinstance(v, (bool, int, float, str)))))
                 for _, m in _matches(model, PATCHES))
    return params, attn


def _install_hooks(model, ctx: SeqParallelContext, buffers: list[Tensor]) -> list:
    """Forward pre-hooks on ``model`` and its encoders (a new forward: the layers check their arguments again, the
    buffers are passed as private copies, gradient checkpointing is wrapped), its position embeddings and decoders
    (handles, removed on exit)."""
    from ..models._patching import _modeling

    classes = {}
    for package, name in (("longformer", "LongformerEmbeddings"), ("longformer", "LongformerEncoder"),
                          ("led", "LEDEncoder"), *_DECODERS):
        modeling = _modeling(package)
        classes[name] = None if modeling is None else getattr(modeling, name, None)
    # A new forward (of the model, or of an encoder called directly: model.get_encoder()(...)) checks again.
    encoders = tuple(c for c in (classes["LongformerEncoder"], classes["LEDEncoder"], classes["LongT5Stack"]) if c)
    def new_forward(module, args, kwargs):
        ctx.shards.forget_agreed()
        _wrap_checkpointing(module)  # (also when enabled inside the block)
        if not torch.is_grad_enabled():
            return None

        def private(x):  # what the graph saves must survive the buffers' restore on exit (module docstring)
            return x.clone() if any(x is b for b in buffers) else x

        return tuple(private(a) for a in args), {k: private(v) for k, v in kwargs.items()}

    hooks = [m.register_forward_pre_hook(new_forward, with_kwargs=True)
             for m in model.modules() if m is model or isinstance(m, encoders)]

    def longformer_positions(module, args, kwargs):
        names = ("input_ids", "token_type_ids", "position_ids", "inputs_embeds")
        kw = {**dict(zip(names, args)), **kwargs}
        if kw.get("position_ids") is None:
            kw["position_ids"] = ctx.longformer_position_ids(kw.get("input_ids"), kw.get("inputs_embeds"),
                                                             module.padding_idx)
        return (), kw  # (position_ids None: the stock rule)

    def led_positions(module, args, kwargs):  # forward(input_ids_shape, cache_length=0): positions from the offset
        if len(args) > 1:
            return (args[0], args[1] + ctx.shards.start, *args[2:]), kwargs
        return args, {**kwargs, "cache_length": kwargs.get("cache_length", 0) + ctx.shards.start}

    def refuse_decoder(module, args, kwargs):
        raise ValueError(f"sequence_parallel: {type(module).__name__} is a decoder; only encoders run "
                         "sequence-parallel (gather the encoder output with longattn.distributed.gather_sequence "
                         "and run the decoder outside the block)")

    for module in model.modules():
        if classes["LongformerEmbeddings"] and isinstance(module, classes["LongformerEmbeddings"]):
            hooks.append(module.register_forward_pre_hook(longformer_positions, with_kwargs=True))
        elif classes["LEDEncoder"] and isinstance(module, classes["LEDEncoder"]):
            hooks.append(module.embed_positions.register_forward_pre_hook(led_positions, with_kwargs=True))
        elif any(classes[n] and isinstance(module, classes[n]) for _, n in _DECODERS) and \
                getattr(module, "is_decoder", True):  # LED's decoder class; LongT5's stack with is_decoder
            hooks.append(module.register_forward_pre_hook(refuse_decoder, with_kwargs=True))
    return hooks


def _checkpoint_funcs(module) -> list[tuple[str, object]]:
    """``(attribute, checkpoint function)`` of ``module``: transformers' per-layer ``_gradient_checkpointing_func``
    (set by ``gradient_checkpointing_enable``) and the ``checkpoint_fn`` of torch's ``CheckpointWrapper``
    (``checkpoint_wrapper``, FSDP's ``apply_activation_checkpointing``); both are called as
    ``checkpoint(function, *args, **kwargs)``."""
    names = ("_gradient_checkpointing_func", "checkpoint_fn") if isinstance(module, _checkpoint_wrapper()) else \
        ("_gradient_checkpointing_func",)
    return [(name, module.__dict__[name]) for name in names if module.__dict__.get(name) is not None]


@functools.cache
def _checkpoint_wrapper() -> type | tuple:
    try:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    except ImportError:  # pragma: no cover (a torch without it)
        return ()
    return CheckpointWrapper


def _wrap_checkpointing(model) -> None:
    """Wrap every checkpoint function in ``model`` (:func:`_checkpoint_funcs`; once) with
    :func:`_checkpoint_in_context`."""
    for m in model.modules():
        for name, checkpoint in _checkpoint_funcs(m):
            if not hasattr(checkpoint, "_longattn_unwrapped"):
                setattr(m, name, _checkpoint_in_context(checkpoint))


def _unwrap_checkpointing(model) -> None:
    """Put back the checkpoint functions :func:`_wrap_checkpointing` wrapped (checkpoints already taken keep
    their context: it is in their recompute's closure)."""
    for m in model.modules():
        for name, checkpoint in _checkpoint_funcs(m):
            if hasattr(checkpoint, "_longattn_unwrapped"):
                setattr(m, name, checkpoint._longattn_unwrapped)


def _checkpoint_in_context(checkpoint):
    """``checkpoint(function, *args, **kwargs)`` (a ``partial(torch.utils.checkpoint.checkpoint, use_reentrant=...)``)
    whose ``function`` runs, in the forward and in the backward's recompute, under the ``sequence_parallel`` context
    active at the call: the recompute may run after the block or in another thread (autograd's device threads on a
    GPU), where the context variable is unset or another block's."""

    @functools.wraps(checkpoint)
    def checkpoint_in_context(function, *args, **kwargs):
        active = _common.SEQ_PARALLEL.get()
        if active is None:
            return checkpoint(function, *args, **kwargs)

        def run(*a, **kw):
            token = _common.SEQ_PARALLEL.set(active)
            try:
                return function(*a, **kw)
            finally:
                _common.SEQ_PARALLEL.reset(token)

        return checkpoint(run, *args, **kwargs)

    checkpoint_in_context._longattn_unwrapped = checkpoint
    return checkpoint_in_context
