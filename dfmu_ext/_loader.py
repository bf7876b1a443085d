"""Loads the compiled extension once, turning build mismatches into readable errors."""
from __future__ import annotations

import warnings

import torch

from ._linkage import linkage_problems

try:
    from . import _build_config
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "dfmu_ext's compiled kernels are not built. Install with `pip install --no-build-isolation .` "
        "(or `make test` / `make demo`) from the source tree."
    ) from exc


def _torch_release(version: str) -> str:
    return version.split("+")[0]


if _torch_release(_build_config.TORCH_VERSION) != _torch_release(torch.__version__):
    raise ImportError(
        f"dfmu_ext was built against torch {_build_config.TORCH_VERSION} but torch {torch.__version__} is "
        "installed; C++ extensions only work with the torch they were compiled for. Rebuild with "
        "`pip install --no-build-isolation --force-reinstall --no-deps .`."
    )

try:
    from . import _C  # noqa: F401  (registers torch.ops.dfmu_ext.*)
except ImportError as exc:
    raise ImportError(
        f"dfmu_ext's compiled library failed to load ({exc}). It was built for torch "
        f"{_build_config.TORCH_VERSION} (CUDA {_build_config.CUDA_VERSION}); rebuild it against the "
        "installed torch with `pip install --no-build-isolation --force-reinstall --no-deps .`."
    ) from exc


def warn_if_static_cxx_runtime(path: str) -> bool:
    """Warns (RuntimeWarning) when the library at ``path`` carries its own libstdc++ instead of the
    process's shared one: its C++ error messages would be cut short or crash the process
    (:mod:`dfmu_ext.buildcheck`). Returns whether it warned; non-ELF platforms are not checked."""
    try:
        problems = linkage_problems(path)
    except (OSError, ValueError):
        return False
    for problem in problems:
        warnings.warn(problem, RuntimeWarning, stacklevel=3)
    return bool(problems)


warn_if_static_cxx_runtime(_C.__file__)


#: the package version (read by the package root and the deletion record)
__version__ = "0.1.0"


def build_info() -> dict:
    """What the compiled kernels were built with: ``with_cuda``, torch and CUDA versions, arch list,
    the C++ compiler (``compiler``) and the one torch was built with (``torch_compiler``)."""
    return {
        "with_cuda": bool(_build_config.WITH_CUDA),
        "torch_version": _build_config.TORCH_VERSION,
        "cuda_version": _build_config.CUDA_VERSION,
        "arch_list": [a for a in _build_config.ARCH_LIST.split(";") if a],
        "compiler": getattr(_build_config, "CXX_COMPILER", None),  # None: built before it was recorded
        "torch_compiler": getattr(_build_config, "TORCH_COMPILER", None),
        "runtime_torch_version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
