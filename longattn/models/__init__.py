"""Patchers that put Hugging Face LED / Longformer / LongT5 attention on longattn ops.

:func:`apply_longattn` / :func:`revert_longattn` are driven by one table (``_patching.PATCHES``): module class ->
replacement forward. The forwards live in :mod:`.longformer` (Longformer and LED's encoder, one shared forward)
and :mod:`.longt5` (local and transient-global).
"""

from ._patching import NO_PAD_PATCHES, PATCHES, PatchSpec, apply_longattn, revert_longattn

__all__ = ["NO_PAD_PATCHES", "PATCHES", "PatchSpec", "apply_longattn", "revert_longattn"]
