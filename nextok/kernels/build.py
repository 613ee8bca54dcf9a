"""Building and loading the C kernels (csrc/): instruction-set tiers, the signatures from the header,
and the AMX probe.

The kernels are compiled with the system C compiler (`cc`, or $CC) on first use and cached under
$NEXTOK_CACHE/kernels, keyed by the sources, the flags and the compiler. Two tiers are built from the
same sources, and the best one this CPU runs is loaded:

- "avx512_bf16": AVX-512 with BF16 and VNNI (and the AMX instructions, used only where a child
  process showed they run): every kernel.
- "avx512": AVX-512 F/BW/CD/DQ/VL alone (Skylake-SP, Ice Lake): the float32 kernels.

ctypes gets each function's argument and return types from csrc/nextok.h, the one place the C
signatures are written.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nextok.paths import default_cache_dir

SOURCES = Path(__file__).with_name("csrc")
HEADER = SOURCES / "nextok.h"

_BASE_FLAGS = ["-O3", "-march=x86-64-v4", "-fopenmp", "-shared", "-fPIC"]
_AVX512 = ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")


@dataclass(frozen=True)
class Tier:
    name: str
    cpu_flags: tuple[str, ...]  # what /proc/cpuinfo must list
    compiler_flags: tuple[str, ...]


TIERS = (  # best first
    Tier("avx512_bf16", (*_AVX512, "avx512_bf16", "avx512_vnni"),
         ("-mavx512bf16", "-mavx512vnni", "-mamx-tile", "-mamx-bf16", "-DNEXTOK_BF16")),
    Tier("avx512", _AVX512, ()),
)

_CTYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float, "void": None}
_PROTOTYPE = re.compile(r"\b(int64_t|int|float|void)\s+(\w+)\s*\(([^()]*)\)\s*;")


class KernelBuildError(RuntimeError):
    """The kernels were required (NEXTOK_REQUIRE_KERNELS=1) but cannot be built or loaded here."""


def signatures(header: str | None = None) -> dict[str, tuple[list, object]]:
    """name -> (ctypes argument types, ctypes return type) of every prototype in the header."""
    text = re.sub(r"//[^\n]*", "", header if header is not None else HEADER.read_text())
    found = {}
    for ret, name, args in _PROTOTYPE.findall(" ".join(text.split())):
        types = []
        for arg in [a.strip() for a in args.split(",") if a.strip() not in ("", "void")]:
            if "*" in arg:
                types.append(ctypes.c_void_p)
                continue
            base = arg.replace("const ", "").split()[0]
            if base not in _CTYPES or _CTYPES[base] is None:
                raise ValueError(f"{HEADER.name}: {name}() takes {arg!r}, a type the loader does not know")
            types.append(_CTYPES[base])
        found[name] = (types, _CTYPES[ret])
    return found


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


def best_tier(flags: set[str] | None = None) -> Tier | None:
    """The best tier this CPU runs ($NEXTOK_KERNEL_TIER may ask for a lower one), or None."""
    flags = cpu_flags() if flags is None else flags
    usable = [t for t in TIERS if set(t.cpu_flags) <= flags]
    wanted = os.environ.get("NEXTOK_KERNEL_TIER")
    if wanted:
        names = [t.name for t in TIERS]
        if wanted not in names:
            raise ValueError(f"NEXTOK_KERNEL_TIER={wanted!r} is not a tier: use one of {', '.join(names)}")
        usable = [t for t in usable if names.index(t.name) >= names.index(wanted)]
    return usable[0] if usable else None


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    return default_cache_dir() / "kernels"


def build_library(tier: Tier, cc: str) -> Path:
    """The tier's shared library, compiled once and cached (atomically: a concurrent build sees all or nothing)."""
    sources = sorted(SOURCES.glob("*.c"))
    flags = [*_BASE_FLAGS, *tier.compiler_flags]
    digest = hashlib.sha256(" ".join([cc, *flags]).encode())
    for path in sorted(SOURCES.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    target = _cache_dir() / f"nextok-{tier.name}-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            objects = [Path(tmp) / f"{source.stem}.o" for source in sources]

            def compile_one(pair: tuple[Path, Path]) -> None:
                subprocess.run([cc, *flags, "-c", str(pair[0]), "-o", str(pair[1])], check=True, capture_output=True,
                               text=True)

            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # one file at a time per core
                list(pool.map(compile_one, zip(sources, objects)))
            built = Path(tmp) / target.name
            subprocess.run([cc, *flags, *map(str, objects), "-o", str(built), "-lm"], check=True, capture_output=True,
                           text=True)
            os.replace(built, target)
    return target


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (args, ret) in signatures().items():
        fn = getattr(lib, name, None)
        if fn is not None:  # the lower tier leaves out the bfloat16 functions
            fn.argtypes, fn.restype = args, ret
    return lib


def amx_runs_here(path: str | Path) -> bool:
    """Whether AMX tile instructions run on this machine, asked of a child process once and cached.

    A VM may list amx_tile and still refuse the instructions: the child dies of SIGILL, not us.
    """
    verdict = Path(path).with_suffix(".amx")
    if verdict.exists():
        return verdict.read_text().strip() == "1"
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); "
            "sys.exit(0 if lib.amx_probe() == 1 else 3)")
    try:
        runs = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        runs = False
    try:
        verdict.write_text("1" if runs else "0")
    except OSError:
        pass
    return runs
