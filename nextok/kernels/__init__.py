"""nextok's own CPU kernels (csrc/), compiled once on first use and loaded with ctypes.

`library()` returns the loaded library of the best instruction-set tier this CPU runs (see
build.py), or None where there is none: no AVX-512, no C compiler, a failed build, or
NEXTOK_KERNELS=0. Then every op falls back to PyTorch (ops.py). With NEXTOK_REQUIRE_KERNELS=1 a
missing library is an error instead (CI sets it, so the kernel tests cannot skip silently).
On CPUs with AMX, bfloat16 products use the tile unit (NEXTOK_AMX=0 keeps them on AVX-512).

The kernels are pure functions of tensors: they know nothing of models. `call` runs one and turns
its status into an exception.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import warnings

from nextok.kernels.build import (KernelBuildError, Tier, amx_runs_here, best_tier, build_library, compiler, cpu_flags,
                                    load)

__all__ = ["KernelBuildError", "amx_enabled", "call", "has", "library", "tier"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tier: Tier | None = None
_path: str | None = None
_tried = False
_amx = False


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None where it cannot be used here."""
    global _library, _tier, _path, _tried, _amx
    if _tried:
        return _library
    with _lock:
        if not _tried:
            try:
                _library, _tier, _path = _load()
                _amx = _tier is not None and _amx_wanted() and bool(_library.amx_init())
            finally:
                _tried = True
    return _library


def _load() -> tuple[ctypes.CDLL | None, Tier | None, str | None]:
    required = _flag("NEXTOK_REQUIRE_KERNELS", "0")
    if not _flag("NEXTOK_KERNELS", "1"):
        if required:
            raise KernelBuildError("NEXTOK_REQUIRE_KERNELS=1 and NEXTOK_KERNELS=0 contradict each other")
        return None, None, None
    chosen = best_tier()
    cc = compiler()
    problem = None
    if chosen is None:
        problem = "this CPU has no AVX-512"
    elif cc is None:
        problem = "no C compiler found (cc/gcc); install gcc to build them"
    else:
        try:
            path = build_library(chosen, cc)
            return load(path), chosen, str(path)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr \
                else e
            problem = f"the {chosen.name} build failed ({detail})"
    if required:
        raise KernelBuildError(f"nextok's CPU kernels are required (NEXTOK_REQUIRE_KERNELS=1) but {problem}")
    warnings.warn(f"nextok: not using the CPU kernels: {problem}; running on PyTorch ops, which is slower",
                  stacklevel=3)
    return None, None, None


def _amx_wanted() -> bool:
    if not ({"amx_tile", "amx_bf16"} <= cpu_flags() and _flag("NEXTOK_AMX", "1")):
        return False
    return _tier.name == "avx512_bf16" and amx_runs_here(_path)


def tier() -> str | None:
    """The loaded tier's name ("avx512_bf16", "avx512"), or None without kernels."""
    library()
    return None if _tier is None else _tier.name


def has(name: str) -> bool:
    """Whether the loaded library has this kernel (the avx512 tier lacks the bfloat16 ones)."""
    lib = library()
    return lib is not None and hasattr(lib, name)


def amx_enabled() -> bool:
    """Whether bfloat16 products run on AMX tiles."""
    return library() is not None and _amx


def call(name: str, *args) -> int:
    """Run kernel `name`; a status below 0 becomes MemoryError or ValueError. Returns the status."""
    status = getattr(library(), name)(*args)
    if isinstance(status, int) and status < 0:
        if status == -1:
            raise MemoryError(f"nextok kernel {name}: out of memory")
        raise ValueError(f"nextok kernel {name}: an argument it cannot take")
    return status
