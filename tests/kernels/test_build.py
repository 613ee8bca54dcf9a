"""Building and loading the kernels: the header as the one source of signatures, the instruction-set
tiers, NEXTOK_REQUIRE_KERNELS, and the AMX probe."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from nextok import kernels
from nextok.kernels import build as lib_module
from nextok.kernels.build import TIERS, best_tier, signatures


def test_every_prototype_of_the_header_is_in_the_loaded_library():
    lib = kernels.library()
    if lib is None:
        pytest.skip("no kernels on this machine (NEXTOK_REQUIRE_KERNELS=1 turns this into a failure)")
    names = signatures()
    assert {"linear_f32", "paged_attention_f32", "forward_layers", "top_k_f32"} <= set(names)
    wanted = names if kernels.tier() == "avx512_bf16" else [n for n in names if "bf16" not in n and "int8" not in n
                                                            and "amx" not in n]
    missing = [n for n in wanted if not hasattr(lib, n)]
    assert missing == []
    args, ret = names["linear_f32"]
    assert args == [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                    ctypes.c_int64, ctypes.c_int64, ctypes.c_int] and ret is ctypes.c_int
    assert signatures()["read_sum_f32"][1] is ctypes.c_float and signatures()["amx_init"][0] == []


def test_a_type_the_loader_does_not_know_is_an_error():
    with pytest.raises(ValueError, match="double"):
        signatures("int f(double x, int y);")


def test_tiers_follow_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("NEXTOK_KERNEL_TIER", raising=False)
    full, float32 = TIERS
    assert best_tier(set()) is None
    assert best_tier(set(float32.cpu_flags)) is float32  # AVX-512 F alone: the float32 kernels
    assert best_tier(set(full.cpu_flags)) is full
    monkeypatch.setenv("NEXTOK_KERNEL_TIER", "avx512")
    assert best_tier(set(full.cpu_flags)) is float32
    monkeypatch.setenv("NEXTOK_KERNEL_TIER", "avx1024")
    with pytest.raises(ValueError, match="NEXTOK_KERNEL_TIER='avx1024'"):
        best_tier(set(full.cpu_flags))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_the_float32_tier_runs_the_float32_model_alone(tiny_model_dir):
    """A CPU with AVX-512 F only gets the float32 kernels: the same tokens as the full tier."""
    if kernels.tier() != "avx512_bf16":
        pytest.skip("needs a CPU with AVX-512 BF16 to compare the two tiers")
    code = f"""
        from nextok import LLM, SamplingParams, kernels
        llm = LLM({str(tiny_model_dir)!r}, dtype="float32", kv_cache_memory=16 << 20)
        out = llm.generate(["The cat sat on", "Once upon a time"], SamplingParams(max_new_tokens=12), use_tqdm=False)
        print(kernels.tier(), kernels.has("linear_bf16"), [r.outputs[0].token_ids for r in out])
    """
    lower = _python(code, NEXTOK_KERNEL_TIER="avx512")
    full = _python(code)
    assert lower.returncode == 0 and full.returncode == 0, lower.stderr + full.stderr
    tier, bf16, tokens = lower.stdout.split(" ", 2)
    assert (tier, bf16) == ("avx512", "False")
    assert tokens == full.stdout.split(" ", 2)[2]


def test_required_kernels_that_cannot_load_are_an_error(tmp_path):
    code = """
        from nextok import kernels
        try:
            kernels.library()
        except kernels.KernelBuildError as e:
            print("refused:", e)
    """
    out = _python(code, NEXTOK_REQUIRE_KERNELS="1", NEXTOK_KERNELS="0")
    assert "refused:" in out.stdout and "contradict" in out.stdout
    out = _python(code, NEXTOK_REQUIRE_KERNELS="1", CC=str(tmp_path / "no-compiler"), PATH=str(tmp_path),
                  NEXTOK_CACHE=str(tmp_path))
    assert "refused:" in out.stdout, out.stdout + out.stderr
    out = _python("from nextok import kernels; print(kernels.library())", NEXTOK_REQUIRE_KERNELS="0",
                  NEXTOK_KERNELS="0")
    assert out.stdout.strip() == "None"  # not required: off is off


def test_amx_is_trusted_only_after_a_child_process_ran_it(tmp_path, monkeypatch):
    fake = tmp_path / "nextok-avx512_bf16-x.so"
    fake.write_bytes(b"not a library")  # the child fails to load it, as it would die of SIGILL: not trusted
    assert lib_module.amx_runs_here(fake) is False
    assert (tmp_path / "nextok-avx512_bf16-x.amx").read_text() == "0"  # the verdict is kept
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the cached verdict is asked again"))
    assert lib_module.amx_runs_here(fake) is False


def test_kernel_errors_become_python_exceptions():
    if not kernels.has("linear_f32"):
        pytest.skip("no kernels on this machine")
    with pytest.raises(ValueError, match="linear_f32"):
        kernels.call("linear_f32", None, None, 7, None, None, 1, 32, 32, 1)  # format 7 does not exist
