"""The one table of patch specs, and ``apply_longattn`` / ``revert_longattn`` driven by it.

Patching is per module *instance*: each matching attention module gets an instance-level ``forward`` (a
method bound to it, so ``copy.deepcopy`` rebinds it to the copy) and a ``PatchState`` remembering what to
restore. Parameters never move, so state dicts, ``save_pretrained`` / ``from_pretrained`` are untouched.
transformers is imported lazily: it is not a dependency of longattn.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import types
from collections.abc import Callable

from .._validation import check_backend_name
from . import longformer, longt5
from ._common import _STATE_ATTR, PatchState, patch_state, warn_once

TESTED_MAJOR = 5  # transformers 5.x (checked against 5.23)


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    """Replace ``<package>.<cls>.forward`` on every instance by ``forward`` (a function of ``self``).

    ``params``: the stock forward's parameter names, in order, that ``forward`` mirrors; a transformers version
    whose stock forward has other parameters is refused rather than silently mis-patched.
    """

    package: str
    cls: str
    forward: Callable
    params: tuple[str, ...]
    method: str = "forward"


# module class -> replacement. LED's encoder self-attention is Longformer's, line for line: same forward.
PATCHES = (
    PatchSpec("longformer", "LongformerSelfAttention", longformer.longformer_forward, longformer.FORWARD_PARAMS),
    PatchSpec("led", "LEDEncoderSelfAttention", longformer.longformer_forward, longformer.FORWARD_PARAMS),
    PatchSpec("longt5", "LongT5LocalAttention", longt5.longt5_local_forward, longt5.FORWARD_PARAMS),
    PatchSpec("longt5", "LongT5TransientGlobalAttention", longt5.longt5_tglobal_forward, longt5.FORWARD_PARAMS),
)

@dataclasses.dataclass(frozen=True)
class FunctionPatch:
    """Replace the module-level function ``<package>.<name>`` by ``make(stock)``, process-wide, the first time
    ``apply_longattn`` patches a model with modules of ``package``; ``revert_longattn`` leaves it in place.

    For helpers the stock *model* forwards call outside the attention modules. A replacement must return the
    stock values bitwise (it only saves memory), so leaving it installed changes no output of any model.
    ``params``: the stock function's parameters (a transformers version with others is refused).
    """

    package: str
    name: str
    make: Callable
    params: tuple[str, ...]


# LEDEncoder.forward's mask preparation materialises (B, 1, S, S) tensors to keep one row of them.
FUNCTION_PATCHES = (
    FunctionPatch("led", "_prepare_4d_attention_mask_inverted", longformer.row_mask_only, ("mask", "dtype", "tgt_len")),
)

# With pad_to_window=False: the modules that pad S to a multiple of attention_window before the layers, and what
# their _pad_to_window_size returns after padding_len (it takes the same names as parameters, plus pad_token_id).
_LONGFORMER_PAD = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
_LED_PAD = ("input_ids", "attention_mask", "inputs_embeds")
NO_PAD_PATCHES = (
    PatchSpec("longformer", "LongformerModel", longformer.no_pad_to_window_size(_LONGFORMER_PAD),
              (*_LONGFORMER_PAD, "pad_token_id"), method="_pad_to_window_size"),
    PatchSpec("led", "LEDEncoder", longformer.no_pad_to_window_size(_LED_PAD), (*_LED_PAD, "pad_token_id"),
              method="_pad_to_window_size"),
)


def apply_longattn(model, *, backend: str = "auto", pad_to_window: bool = True, packed: bool = False):
    """Run the long-sequence attention of a Hugging Face model instance on longattn ops, in place.

    Supported: ``LongformerModel`` and every Longformer head; ``LEDModel`` / ``LEDForConditionalGeneration`` /
    ``LEDForQuestionAnswering`` / ``LEDForSequenceClassification`` (where transformers still has it): the encoder
    self-attention, the decoder is ordinary attention and stays; ``LongT5Model`` /
    ``LongT5ForConditionalGeneration`` / ``LongT5EncoderModel`` with ``encoder_attention_type`` "local" or
    "transient-global". Any module tree containing those attention modules works (the match is by module class).

    Patching an LED model also replaces, process-wide and for good, LED's module-level mask helper that
    ``LEDEncoder.forward`` calls with one returning bitwise the same values without its ``(B, 1, S, S)``
    temporaries (see ``FUNCTION_PATCHES``).

    Equal to the stock model's within rounding: every real token's hidden states, losses, logits, generated
    tokens, and all gradients of a loss that reads no padding row (every HF head's loss). Padding query rows are 0
    for Longformer/LED, as stock; the LongT5 encoder's differ from stock's (a rounding artifact of its ``-1e10``
    mask, NaN in fp16) and can reach no real token: see :mod:`longattn.models.longt5`. The stock forward still
    runs, with a one-time warning, for ``output_attentions=True``. Attention dropout in training mode runs in the
    fused ops (``dropout_p``: same place, scaling and distribution as stock, not the same random draws).

    Args:
        model: an ``nn.Module``; patched in place and returned.
        backend: "auto", "cuda", "triton" or "torch", passed to every op.
        pad_to_window: False skips Longformer/LED's padding of S to a multiple of ``attention_window`` (the
            kernels need none); outputs on real tokens are unchanged. Ignored for LongT5.
        packed: True runs each patched attention layer of a batch with padding on its real tokens only (packed
            by the attention mask, the ``*_varlen`` ops, scattered back; see ``longattn.models._packing``): the
            same real-token outputs and gradients, at the cost of the real tokens. Padding rows of the layer's
            output are then 0 (for LongT5 too). Rows whose real tokens are not contiguous (and, for LongT5
            transient-global, not starting at position 0) run the padded patch, with a one-time warning.

    Raises:
        ValueError: nothing in ``model`` to patch.
        RuntimeError: an installed transformers whose attention forwards differ from the tested 5.x ones.
    """
    check_backend_name(backend)
    specs = list(PATCHES) + ([] if pad_to_window else list(NO_PAD_PATCHES))
    matched = _matches(model, specs)
    if not any(spec in PATCHES for spec, _ in matched):
        names = ", ".join(spec.cls for spec in PATCHES)
        raise ValueError(f"apply_longattn: {type(model).__name__} contains none of the attention modules longattn "
                         f"patches ({names})")
    for spec, module in matched:
        _patch(module, spec, backend, packed=bool(packed))
    for patch in FUNCTION_PATCHES:
        if any(spec.package == patch.package for spec, _ in matched):
            _install(patch)
    if pad_to_window:  # a second apply with the default undoes an earlier pad_to_window=False
        for spec, module in _matches(model, NO_PAD_PATCHES):
            _unpatch(module, spec.method)
    return model


def revert_longattn(model):
    """Undo :func:`apply_longattn` in place (restores each module's previous ``forward`` exactly); returns model.

    Raises ValueError if nothing in ``model`` is patched.
    """
    reverted = 0
    for module in model.modules():
        for attr in [a for a in module.__dict__ if a.startswith(_STATE_ATTR)]:
            reverted += _unpatch(module, attr[len(_STATE_ATTR) + 1 :] or "forward")
    if reverted == 0:
        raise ValueError(f"revert_longattn: nothing in {type(model).__name__} was patched by apply_longattn")
    return model


@functools.cache
def _install(patch: FunctionPatch) -> None:
    """Install ``patch`` once per process (cached: a second call would wrap the replacement)."""
    modeling = _modeling(patch.package)
    stock = getattr(modeling, patch.name)
    _check_params(patch.name, stock, patch.params)
    setattr(modeling, patch.name, patch.make(stock))


def _state_attr(method: str) -> str:
    # "forward" keeps the plain name so the forwards can find their state with patch_state(module).
    return _STATE_ATTR if method == "forward" else f"{_STATE_ATTR}_{method}"


def _unpatch(module, method: str) -> bool:
    state = module.__dict__.pop(_state_attr(method), None)
    if state is None:
        return False
    if state.original is None:
        module.__dict__.pop(method, None)
    else:
        module.__dict__[method] = state.original
    return True


def _patch(module, spec: PatchSpec, backend: str, packed: bool = False) -> None:
    attr = _state_attr(spec.method)
    state = module.__dict__.get(attr)
    if state is None:  # a second apply keeps the first original and only updates the settings
        state = PatchState(original=module.__dict__.get(spec.method), backend=backend)
        module.__dict__[attr] = state
    state.backend, state.packed = backend, packed
    module.__dict__[spec.method] = types.MethodType(spec.forward, module)


def _matches(model, specs):
    """``(spec, module)`` for every module of ``model`` that is an instance of a spec's class."""
    classes = [(spec, _resolve(spec)) for spec in specs]
    return [(spec, module) for module in model.modules() for spec, cls in classes
            if cls is not None and isinstance(module, cls)]


def _modeling(package: str):
    """``transformers.models.<package>.modeling_<package>``, or None if transformers or the family is missing."""
    try:
        return importlib.import_module(f"transformers.models.{package}.modeling_{package}")
    except ImportError:
        return None


@functools.cache
def _resolve(spec: PatchSpec):
    """The transformers class of ``spec`` (None if transformers or the model family is missing), checked once."""
    modeling = _modeling(spec.package)
    cls = None if modeling is None else getattr(modeling, spec.cls, None)
    if cls is None:
        return None
    _check_version(spec, cls)
    return cls


def _check_version(spec: PatchSpec, cls) -> None:
    import transformers

    _check_params(f"{spec.cls}.{spec.method}", getattr(cls, spec.method), spec.params, skip_self=True)
    major = int(transformers.__version__.split(".")[0])
    if major != TESTED_MAJOR:
        warn_once("transformers-version", f"longattn: apply_longattn was tested with transformers {TESTED_MAJOR}.x, "
                                          f"found {transformers.__version__}; the patched signatures match")


def _check_params(what: str, fn, expected: tuple[str, ...], skip_self: bool = False) -> None:
    """Refuse a transformers version whose ``fn`` takes other parameters than the replacement was written for."""
    import transformers

    params = tuple(inspect.signature(fn).parameters)[1 if skip_self else 0 :]
    if params != expected:
        raise RuntimeError(
            f"apply_longattn: unsupported transformers {transformers.__version__}: {what} takes {params}, "
            f"longattn's replacement was written for {expected} (tested with transformers {TESTED_MAJOR}.x)")


__all__ = ["PATCHES", "NO_PAD_PATCHES", "FUNCTION_PATCHES", "FunctionPatch", "PatchSpec", "apply_longattn",
           "revert_longattn", "patch_state"]
