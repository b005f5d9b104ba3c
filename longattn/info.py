"""What ``longattn info`` reports: versions, the device, the backends and why any cannot run."""

from __future__ import annotations

import platform

import torch


def cuda_extension_info() -> tuple[bool, str]:
    """(built?, description): whether ``longattn._C`` was built, and for which CUDA archs."""
    try:
        from . import _C
    except ImportError as exc:
        return False, f"not built ({exc}); reinstall with a CUDA toolkit and a CUDA build of torch"
    return True, f"built for TORCH_CUDA_ARCH_LIST={_C.cuda_archs} (CUDA {getattr(_C, 'cuda_version', '?')})"


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as exc:  # report, never fail: info must always print
        return f"not importable ({type(exc).__name__}: {exc})"
    return getattr(module, "__version__", "?")


def info_dict() -> dict:
    from . import __version__
    from .dispatch import auto_table, available_backends

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"cuda:0 {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        device = "cpu (no CUDA device visible)"
    built, ext = cuda_extension_info()
    return {
        "longattn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "device": device,
        "cuda_extension": ext,
        "cuda_extension_built": built,
        "backends": available_backends(),
        "features": backend_features(),
        "auto_table": _auto_table_summary(auto_table()),
        "triton_launch": triton_launch_mode(),
    }


def triton_launch_mode() -> str:
    """How the Triton backend launches its kernels (``triton_kernels/_launch.py``), or why it cannot: from a source
    tree that was never installed, ``longattn.triton_kernels`` does not exist (an install maps it)."""
    try:
        from .triton_kernels import _launch
    except ImportError as exc:
        return f"unavailable ({type(exc).__name__}: {exc})"

    if _launch.ENABLED:
        return "cached (compiled kernels' launchers called directly; LONGATTN_TRITON_LAUNCH=triton: Triton's own)"
    return "Triton's own kernel[grid] (LONGATTN_TRITON_LAUNCH=triton)"


# dropout_p > 0, H_kv < H, packed batches (*_varlen), sequence-parallel halo keys read in place, an lse gradient,
# dropout counters at a shard's offset
OPTIONAL_FEATURES = ("dropout", "grouped_kv", "ranges", "halo", "lse_grad", "dropout_offset")


def backend_features() -> dict[str, dict[str, str]]:
    """Per backend, each optional feature of the attention kernels: "yes", or the reason it declines it (on the
    default device, fp16, head dim 64)."""
    from .dispatch import BACKEND_NAMES, unsupported_reasons

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = {}
    for name in BACKEND_NAMES:
        base = set(unsupported_reasons(name, device, torch.float16, 64, "band_side"))
        table[name] = {}
        for feature in OPTIONAL_FEATURES:
            extra = [r for r in unsupported_reasons(name, device, torch.float16, 64, "band_side", (feature,))
                     if r not in base]
            table[name][feature] = "; ".join(extra) if extra else "yes"
    return table


def _auto_table_summary(table: dict) -> str:
    """Where backend="auto"'s measured order comes from: the GPUs and the number of results files."""
    gpus = ", ".join(f"{arch} ({entry['device'].split('(')[0].split(' ', 1)[-1].strip()})"
                     for arch, entry in table["devices"].items())
    return f"measured on {gpus}; from {len(table['sources'])} results file(s) (longattn auto-table)"


def format_info() -> str:
    info = info_dict()
    lines = [f"{key:<14} {info[key]}" for key in
             ("longattn", "python", "torch", "torch_cuda", "triton", "transformers", "device", "cuda_extension",
              "auto_table", "triton_launch")]
    lines.append("backends (on the device above):")
    for name, reasons in info["backends"].items():
        lines.append(f"  {name:<8} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
    lines.append("optional features (dropout: dropout_p > 0; grouped_kv: fewer K/V heads; ranges: *_varlen ops; "
                 "halo, lse_grad, dropout_offset: seq_parallel):")
    for name, features in info["features"].items():
        lines.append(f"  {name:<8} " + ", ".join(f"{f}: {v}" for f, v in features.items()))
    return "\n".join(lines)
