"""Build script for longattn.

The CUDA extension ``longattn._C`` (sources in ``csrc/``) is built when a CUDA toolkit (nvcc) and a CUDA
build of torch are both present; otherwise longattn installs as pure Python (torch and Triton backends).

Environment variables:
  LONGATTN_SKIP_CUDA_BUILD=1   never build the extension.
  TORCH_CUDA_ARCH_LIST         archs to compile for, honoured as given (torch's own variable). When unset we
                               use the compute capabilities of the visible GPUs, else "8.0;9.0"; we never add
                               -gencode flags of our own, so the list is always the whole truth.
  MAX_JOBS                     parallel compile jobs (ninja), as in torch.utils.cpp_extension.
  CXX                          the C++ compiler (compiles the .cpp files and links the extension). It must
                               link libstdc++ dynamically; see _ensure_dynamic_libstdcxx.
"""

import glob
import os
import shlex
import shutil
import struct
import subprocess
import tempfile

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


# ---- C++ runtime: the extension must share torch's libstdc++.so -------------------------------------------

_STATIC_WHY = (
    "An extension that carries its own copy of libstdc++ runs it next to the libstdc++.so.6 that torch loads; "
    "C++ code of the two copies disagrees (locale facets, exception state), so a TORCH_CHECK message from the "
    "extension comes out garbled, or the process crashes while formatting it (seen on an H100 machine whose first "
    "`c++` on PATH added -static-libstdc++).")
_STATIC_FIX = ("Set CXX to a C++ compiler that links libstdc++ dynamically (e.g. CXX=/usr/bin/g++), and remove "
               "-static-libstdc++ from CXXFLAGS / LDFLAGS.")
_PROBE_SOURCE = '#include <string>\nstd::string longattn_probe(int n) { return std::to_string(n); }\n'


def _elf_needed(path):
    """The DT_NEEDED entries of an ELF shared object (what `readelf -d` lists as NEEDED), parsed directly."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    end, is64 = ("<" if data[5] == 1 else ">"), data[4] == 2  # EI_DATA, EI_CLASS
    (shoff,) = struct.unpack_from(end + ("Q" if is64 else "I"), data, 0x28 if is64 else 0x20)
    shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A if is64 else 0x2E)
    section_fmt, dyn_fmt = end + ("IIQQQQIIQQ" if is64 else "I" * 10), end + ("qQ" if is64 else "iI")
    # Section header fields: name, type, flags, addr, offset, size, link, info, addralign, entsize.
    sections = [struct.unpack_from(section_fmt, data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for section in sections:
        if section[1] != 6:  # SHT_DYNAMIC; its sh_link is the string table of the names
            continue
        strtab = sections[section[6]][4]
        for offset in range(section[4], section[4] + section[5], struct.calcsize(dyn_fmt)):
            tag, value = struct.unpack_from(dyn_fmt, data, offset)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                start = strtab + value
                needed.append(data[start : data.index(b"\0", start)].decode())
    return needed


def _links_libstdcxx_dynamically(path):
    return any(name.startswith("libstdc++.so") for name in _elf_needed(path))


def _probe_static_libstdcxx(cxx, as_cxx=False):
    """Whether the build links libstdc++ statically, tested the way the extension is built: a tiny C++ file
    compiled with `cxx` (torch's ninja build compiles the .cpp files with CXX, else `c++`) and linked by
    setuptools' C++ link step (CXX, else the compiler Python was built with; LDFLAGS etc. included).
    ``as_cxx``: probe the build as if CXX=`cxx` were set. None when the probe itself fails to build."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    saved = os.environ.get("CXX")
    if as_cxx:
        os.environ["CXX"] = cxx
    try:
        with tempfile.TemporaryDirectory(prefix="longattn-cxx-probe-") as tmp:
            src, obj, lib = (os.path.join(tmp, name) for name in ("probe.cpp", "probe.o", "probe.so"))
            with open(src, "w") as f:
                f.write(_PROBE_SOURCE)
            subprocess.run([*shlex.split(cxx), "-fPIC", "-c", src, "-o", obj], check=True, capture_output=True)
            compiler = new_compiler()
            customize_compiler(compiler)
            compiler.link_shared_object([obj], lib, target_lang="c++")
            return not _links_libstdcxx_dynamically(lib)
    except Exception as exc:  # a broken compiler: let the real build report it
        print(f"longattn: could not test how {cxx!r} links libstdc++ ({exc})")
        return None
    finally:
        if saved is None:
            os.environ.pop("CXX", None)
        else:
            os.environ["CXX"] = saved


def _ensure_dynamic_libstdcxx():
    """Refuse (CXX given) or replace (CXX unset: the first `c++` on PATH) a compiler that links libstdc++
    statically, before anything is compiled. The build_ext step re-checks the built extension."""
    from torch.utils.cpp_extension import get_cxx_compiler

    cxx = get_cxx_compiler()  # CXX, else `c++`: what torch's ninja build compiles with
    if not _probe_static_libstdcxx(cxx):
        return
    if os.environ.get("CXX"):
        raise RuntimeError(f"longattn: building with CXX={cxx} links libstdc++ statically. {_STATIC_WHY} {_STATIC_FIX}")
    for candidate in ("/usr/bin/g++", "/usr/bin/c++", *sorted(glob.glob("/usr/bin/g++-[0-9]*"), reverse=True)):
        if os.path.exists(candidate) and _probe_static_libstdcxx(candidate, as_cxx=True) is False:
            print(f"longattn: building with `{shutil.which(cxx) or cxx}` links libstdc++ statically; using "
                  f"CXX={candidate} instead, which links it dynamically (set CXX to choose another compiler)")
            os.environ["CXX"] = candidate
            return
    raise RuntimeError(f"longattn: building with `{shutil.which(cxx) or cxx}` links libstdc++ statically. "
                       f"{_STATIC_WHY} {_STATIC_FIX}")


def _extensions():
    build, why = _want_cuda_extension()
    if not build:
        print(f"longattn: building without the CUDA extension ({why})")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    _ensure_dynamic_libstdcxx()
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
            # -compress-all: nvcc leaves a translation unit's small fatbin uncompressed, and each tile kernel family
            # is its own unit (csrc/band_side/instantiations): uncompressed, their line info more than doubles the .so.
            "nvcc": ["-O3", "-std=c++20", "-DNDEBUG", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                     "-Xfatbin", "-compress-all"],
        },
        py_limited_api=False,
    )
    class Build(BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, extension):
            super().build_extension(extension)
            path = self.get_ext_fullpath(extension.name)
            if not _links_libstdcxx_dynamically(path):  # the probe below missed a way of linking it statically
                raise RuntimeError(f"longattn: {path} does not load libstdc++.so (linked statically). {_STATIC_WHY} "
                                   f"{_STATIC_FIX}")

    return [ext], {"build_ext": Build}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
