"""The one place that loads the compiled extension ``mtlfast._C``.

Importing ``mtlfast._C`` registers the ``torch.ops.mtlfast`` kernels (C++ CPU, and CUDA when
built against a CUDA torch). When it is missing, or switched off with ``MTLFAST_NO_EXT=1``,
every op falls back to its pure-torch reference and ONE warning says so.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from types import ModuleType

import torch

__all__ = ["extension", "has_cpu_kernels", "has_cuda_kernels", "has_triton", "info"]


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("MTLFAST_NO_EXT") == "1":
        return None, "disabled by MTLFAST_NO_EXT=1"
    try:
        return importlib.import_module("mtlfast._C"), ""
    except ImportError as exc:  # not built, or built against another torch
        return None, str(exc).splitlines()[0]


extension, _missing_reason = _load()
if extension is None:
    warnings.warn(
        f"mtlfast: compiled extension unavailable ({_missing_reason}); "
        "using the slower pure-torch kernels",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cpu_kernels() -> bool:
    """True when the C++ CPU kernels are loaded."""
    return extension is not None


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels were linked in (a build against a CUDA torch with nvcc)."""
    return extension is not None and bool(extension.has_cuda_kernels())


@functools.cache
def has_triton() -> bool:
    """True when Triton is importable (kernels run on GPU, or on CPU with TRITON_INTERPRET=1).
    Asked once per process: ``find_spec`` walks sys.path, and the heads ask on every call."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def info() -> dict[str, object]:
    """What this installation can run: versions, kernels built, devices visible."""
    triton_version = None
    if has_triton():
        try:
            triton_version = importlib.import_module("triton").__version__
        except Exception as exc:  # a broken Triton install is worth reporting, not crashing on
            triton_version = f"import failed: {exc}"
    return {
        "mtlfast": importlib.import_module("mtlfast").__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "extension": extension is not None,
        "extension_missing_reason": _missing_reason or None,
        "compiler": extension.compiler() if extension is not None else None,
        "cpu_kernels": has_cpu_kernels(),
        "cuda_kernels": has_cuda_kernels(),
        "triton": triton_version,
        "triton_interpreter": triton_interpreter(),
        "threads": torch.get_num_threads(),
    }
