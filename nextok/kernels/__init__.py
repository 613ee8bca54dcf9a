"""nextok's own CPU kernels (cpu_kernels.c), compiled once on first use and loaded with ctypes.

The library is built with the system C compiler (`cc`, or $CC) for AVX-512 with BF16 and VNNI and cached
under $NEXTOK_CACHE/kernels (default ~/.cache/nextok/kernels), keyed by the source and flags.
Where the CPU lacks those instructions, no compiler is found, the build fails, or
NEXTOK_KERNELS=0 is set, `library()` returns None and every op falls back to PyTorch.
On CPUs with AMX, bfloat16 and int8 products of more than 4 rows use the tile unit
(NEXTOK_AMX=0 keeps them on AVX-512).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from nextok.paths import default_cache_dir

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni", "-mamx-tile", "-mamx-bf16", "-fopenmp", "-shared", "-fPIC"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_amx = False

_P, _I64, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "linear_f32": [_P, _P, _INT, _P, _P, _I64, _I64, _I64, _INT],
    "linear_bf16": [_P, _P, _INT, _P, _P, _I64, _I64, _I64, _INT],
    "linear_int8": [_P, _P, _P, _P, _P, _I64, _I64, _I64, _INT],
    "rms_norm_f32": [_P, _P, _P, _P, _I64, _I64, _F],
    "rms_norm_bf16": [_P, _P, _P, _P, _I64, _I64, _F],
    "silu_mul_f32": [_P, _P, _I64, _I64],
    "silu_mul_bf16": [_P, _P, _I64, _I64],
    "rotary_store_f32": [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64],
    "rotary_store_bf16": [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64],
    "decode_attention_f32": [_P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _F, _INT],
    "decode_attention_bf16": [_P, _I64, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64, _F, _INT],
    "read_sum_f32": [_P, _I64, _INT],
    "bf16_to_f32": [_P, _P, _I64, _INT],
    "top_k_f32": [_P, _I64, _I64, _I64, _P, _P, _INT],
    "logsumexp_f32": [_P, _I64, _I64, _P, _INT],
    "amx_init": [],
    "decode_layers": [_P, _I64, _P, _P, _P, _P, _P, _P, _I64, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _F, _F,
                      _INT, _INT],
}
RESTYPES = {"read_sum_f32": ctypes.c_float, "amx_init": ctypes.c_int, "top_k_f32": ctypes.c_int64}


def enabled_by_environment() -> bool:
    return os.environ.get("NEXTOK_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cpu_flags() -> set[str]:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supported() -> bool:
    flags = cpu_flags()
    return all(flag in flags for flag in REQUIRED_CPU_FLAGS)


def amx_enabled() -> bool:
    """Whether bfloat16 products of several rows run on AMX tiles (needs amx_bf16 and Linux's permission)."""
    return library() is not None and _amx


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None where it cannot be used here."""
    global _library, _tried, _amx
    if _tried:
        return _library
    with _lock:
        if not _tried:
            if enabled_by_environment() and cpu_supported():
                _library = _load()
                wanted = {"amx_tile", "amx_bf16"} <= cpu_flags() and os.environ.get("NEXTOK_AMX", "1") != "0"
                _amx = _library is not None and wanted and bool(_library.amx_init())
            _tried = True
    return _library


def _cache_dir() -> Path:
    return default_cache_dir() / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _load() -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        warnings.warn("nextok: no C compiler found (cc/gcc); running on PyTorch ops only, which is slower. "
                      "Install gcc to build nextok's CPU kernels.", stacklevel=3)
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                               check=True, capture_output=True, text=True)
                os.replace(built, target)  # atomic: a concurrent loader sees the whole file or none
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        warnings.warn(f"nextok: cannot build the CPU kernels ({detail}); running on PyTorch ops only, "
                      "which is slower", stacklevel=3)
        return None
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = RESTYPES.get(name)
    return lib
