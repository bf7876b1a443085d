"""Build of dfmu_ext: the CPU kernels always, the CUDA kernels whenever torch is a CUDA build and
nvcc is found (a GPU need not be present, so CI compiles and links them).

Switches (environment variables):
  FORCE_CUDA=1            build the CUDA kernels or fail loudly
  DFMU_FORCE_CPU=1        skip the CUDA kernels
  TORCH_CUDA_ARCH_LIST    e.g. "9.0"; default: the visible GPUs, else "8.0;9.0+PTX"
  MAX_JOBS                parallel compile jobs (ninja)
  CUDA_HOME               the CUDA toolkit holding bin/nvcc (found automatically when unset)

Install with `pip install --no-build-isolation .`: the extension is compiled against, and only
works with, the torch that is already installed; build isolation would compile against a fresh
(possibly different) torch downloaded into a throw-away environment.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _find_cuda_home() -> str | None:
    """The toolkit folder with bin/nvcc and include/cuda_runtime.h.

    torch guesses CUDA_HOME from `which nvcc`; when that is a wrapper script (e.g. /usr/local/bin/nvcc)
    the guess (/usr/local) has no headers, so we look for the real toolkit first.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(
                os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


if not _truthy("DFMU_FORCE_CPU"):
    _cuda_home = _find_cuda_home()
    if _cuda_home:
        os.environ["CUDA_HOME"] = _cuda_home  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for token in out.replace(",", " ").split():
        if token.startswith("V") and token[1:2].isdigit():
            return token[1:]
    return None


def _want_cuda() -> tuple[bool, str]:
    if _truthy("DFMU_FORCE_CPU"):
        return False, "DFMU_FORCE_CPU=1"
    force = _truthy("FORCE_CUDA")
    cuda_home = os.environ.get("CUDA_HOME") if cpp_extension.CUDA_HOME else None
    if torch.version.cuda is None:
        if force:
            sys.exit("FORCE_CUDA=1 but the installed torch is a CPU-only build; install a CUDA build of torch.")
        return False, "torch is a CPU-only build"
    if not cuda_home:
        if force:
            sys.exit("FORCE_CUDA=1 but nvcc was not found; set CUDA_HOME to the CUDA toolkit.")
        return False, "nvcc not found"
    nvcc = _nvcc_version(cuda_home)
    if nvcc and nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
        sys.exit(f"nvcc in {cuda_home} is CUDA {nvcc} but torch {torch.__version__} was built with CUDA "
                 f"{torch.version.cuda}; the major versions must match. Point CUDA_HOME at a CUDA "
                 f"{torch.version.cuda.split('.')[0]}.x toolkit, or build CPU-only with DFMU_FORCE_CPU=1.")
    return True, f"nvcc {nvcc} in {cuda_home}"


def _cxx_compiler() -> str:
    """The C++ compiler that compiles and links the library (torch's BuildExtension: $CXX, else c++),
    as "path: first line of --version"."""
    cxx = os.environ.get("CXX", "c++").split()[0]
    path = os.path.realpath(shutil.which(cxx) or cxx)
    try:
        lines = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        lines = []
    return f"{path}: {lines[0].strip() if lines else 'version unknown'}"


def _torch_compiler() -> str:
    """The compiler torch itself was built with, as torch.__config__.show() names it (e.g. "GCC 13.3")."""
    for line in torch.__config__.show().splitlines():
        line = line.strip().lstrip("- ").strip()
        if line.startswith(("GCC ", "clang ", "Clang ")):
            return line
    return "unknown"


WITH_CUDA, REASON = _want_cuda()
CXX_COMPILER, TORCH_COMPILER = _cxx_compiler(), _torch_compiler()
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if visible:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
ARCH_LIST = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if WITH_CUDA else ""
print(f"dfmu_ext: CUDA kernels {'ON' if WITH_CUDA else 'OFF'} ({REASON}); arch list: {ARCH_LIST or '-'}",
      file=sys.stderr)
# The C++ runtime must be the process's shared libstdc++ (python -m dfmu_ext.buildcheck checks it):
# a compiler that links its own static copy breaks every error message (see that module).
print(f"dfmu_ext: C++ compiler {CXX_COMPILER}; torch was built with {TORCH_COMPILER}", file=sys.stderr)


def _write_build_config() -> None:
    """Record what this build was made against; dfmu_ext checks it at import time."""
    text = (
        '"""Written by setup.py at build time: what the compiled extension was built against."""\n'
        f"WITH_CUDA = {WITH_CUDA!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if WITH_CUDA else None!r}\n"
        f"ARCH_LIST = {ARCH_LIST!r}\n"
        f"CXX_COMPILER = {CXX_COMPILER!r}\n"
        f"TORCH_COMPILER = {TORCH_COMPILER!r}\n"
    )
    path = os.path.join(ROOT, "dfmu_ext", "_build_config.py")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


_write_build_config()

sources = [os.path.relpath(p, ROOT) for p in
           [os.path.join(ROOT, "csrc", "ops.cpp")] + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
# Default symbol visibility (torch must match our exception types); the C++ standard is torch's own.
# -fopenmp: at::parallel_for is header code that only runs in parallel when the extension itself is
# compiled with OpenMP (it then uses the OpenMP runtime torch already loaded). -fno-wrapv undoes
# Python's -fwrapv, which stops GCC from vectorising the bfloat16 loops (measured 3x on one thread).
extra_cxx = ["-O3", "-g0", "-fopenmp", "-fno-wrapv"]
include_dirs = [os.path.join(ROOT, "csrc")]
if WITH_CUDA:
    sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")) +
                                                          glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
    # cusparse.h / cublas_v2.h, included by ATen's CUDA headers, may only exist in torch's nvidia-* wheels.
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    ext = CUDAExtension(
        "dfmu_ext._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": extra_cxx, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension("dfmu_ext._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": extra_cxx},
                       extra_link_args=["-fopenmp"])

setup(
    name="dfmu_ext",
    packages=find_packages(include=["dfmu_ext", "dfmu_ext.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
