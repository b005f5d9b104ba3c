"""Patchers that put Hugging Face LED / Longformer / LongT5 attention on longattn ops."""


def apply_longattn(model, *, backend="auto"):
    raise NotImplementedError("apply_longattn: the model wrappers are not implemented yet")


def revert_longattn(model):
    raise NotImplementedError("revert_longattn: the model wrappers are not implemented yet")
