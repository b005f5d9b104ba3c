"""Build script for longattn.

The CUDA extension ``longattn._C`` (sources in ``csrc/``) is built when a CUDA toolkit (nvcc) and a CUDA
build of torch are both present; otherwise longattn installs as pure Python (torch and Triton backends).

Environment variables:
  LONGATTN_SKIP_CUDA_BUILD=1   never build the extension.
  TORCH_CUDA_ARCH_LIST         archs to compile for, honoured as given (torch's own variable). When unset we
                               use the compute capabilities of the visible GPUs, else "8.0;9.0"; we never add
                               -gencode flags of our own, so the list is always the whole truth.
  MAX_JOBS                     parallel compile jobs (ninja), as in torch.utils.cpp_extension.
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["longattn", "longattn.backends", "longattn.models", "longattn.bench", "longattn.triton_kernels"]
PACKAGE_DIR = {"longattn.triton_kernels": "triton_kernels"}
DEFAULT_ARCHS = "8.0;9.0"


def _locate_cuda_home():
    """Point CUDA_HOME at the real toolkit when torch would guess wrong.

    Without CUDA_HOME/CUDA_PATH, torch derives the toolkit from the first ``nvcc`` on PATH; a wrapper
    script such as /usr/local/bin/nvcc then yields CUDA_HOME=/usr/local, which has no CUDA headers or
    libcudart, and the C++ sources (ATen/cuda headers) fail to compile. Must run before torch's
    cpp_extension is imported (it reads the variable at import time).
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc and os.path.exists(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include", "cuda_runtime_api.h")):
        return
    if os.path.exists("/usr/local/cuda/include/cuda_runtime_api.h"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _want_cuda_extension():
    if os.environ.get("LONGATTN_SKIP_CUDA_BUILD", "0") == "1":
        return False, "LONGATTN_SKIP_CUDA_BUILD=1"
    _locate_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False, "torch is not installed in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return True, ""


def _arch_list():
    """TORCH_CUDA_ARCH_LIST if set, else the visible GPUs' archs, else DEFAULT_ARCHS."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs
    import torch

    if torch.cuda.is_available():  # build time only; never at import time of longattn
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_ARCHS


def _extensions():
    build, why = _want_cuda_extension()
    if not build:
        print(f"longattn: building without the CUDA extension ({why})")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = _arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch when it builds the nvcc flags
    print(f"longattn: building longattn._C for TORCH_CUDA_ARCH_LIST={archs}")
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    define = [("LONGATTN_CUDA_ARCHS", f'"{archs}"')]
    ext = CUDAExtension(
        name="longattn._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "-DNDEBUG", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
