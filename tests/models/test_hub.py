"""nextok/models/hub.py: Hub ids resolved through huggingface_hub's cache, offline, in a cache built by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from nextok import LLM, SamplingParams
from nextok.errors import ModelLoadError
from nextok.models.hub import resolve_model
from nextok.models.loader import load_checkpoint
from tests.models.checkpoints import assert_same_state_dict, llama_to_gguf, tiny_llama
from tests.models.hub_cache import model_files, write_hub_repo

MAIN, V2 = "a" * 40, "b" * 40


@pytest.fixture
def hub(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hub cache in $HF_HUB_CACHE, and offline mode (as the environment sets them for a user)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    for name in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _ids(llm: LLM) -> list[int]:
    params = SamplingParams(max_new_tokens=6)
    return llm.generate(prompt_token_ids=[[1, 2, 3, 4]], params=params)[0].outputs[0].token_ids


def test_offline_hit_loads_the_cached_model(hub: Path, tiny_model_dir: Path, tiny_llm: LLM) -> None:
    snapshot = write_hub_repo(hub, "org/tiny", model_files(tiny_model_dir), MAIN)
    llm = LLM("org/tiny", dtype="float32", kv_cache_memory=16 << 20)
    assert llm.model_path == snapshot and llm.model_name == "org/tiny"
    assert llm.tokenizer is not None
    assert _ids(llm) == _ids(tiny_llm)  # the same weights as the folder it was copied from


def test_hf_home_is_honoured(hub: Path, tiny_model_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(hub.parent / "home"))
    snapshot = write_hub_repo(hub.parent / "home" / "hub", "org/tiny", model_files(tiny_model_dir), MAIN)
    assert resolve_model("org/tiny").path == snapshot


def test_offline_miss_is_one_line_that_says_what_and_how(hub: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        LLM("org/missing", revision="v2")
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("org/missing", "revision v2", str(hub), "HF_HUB_OFFLINE",
                     "`hf download org/missing --revision v2`", "local path"):
        assert fragment in message


def test_revision_picks_a_branch_or_a_commit(hub: Path, tiny_model_dir: Path) -> None:
    files = model_files(tiny_model_dir)
    main = write_hub_repo(hub, "org/tiny", files, MAIN)
    config = files["config.json"].read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 1')
    v2 = write_hub_repo(hub, "org/tiny", {**files, "config.json": config.encode()}, V2, refs=("v2",))
    assert resolve_model("org/tiny").path == main
    assert resolve_model("org/tiny", revision="v2").path == v2
    assert resolve_model("org/tiny", revision=V2).path == v2
    assert load_checkpoint(resolve_model("org/tiny", revision="v2").path).config["num_hidden_layers"] == 1
    with pytest.raises(ModelLoadError, match="revision v3"):
        resolve_model("org/tiny", revision="v3")


def test_gguf_inside_a_repository(hub: Path, tmp_path: Path) -> None:
    expected = llama_to_gguf(tiny_llama(), tmp_path / "tiny.gguf", Q.F16)
    snapshot = write_hub_repo(hub, "org/tiny-GGUF", {"tiny.F16.gguf": tmp_path / "tiny.gguf"}, MAIN)
    source = resolve_model("org/tiny-GGUF/tiny.F16.gguf")
    assert source.path == snapshot / "tiny.F16.gguf" and source.name == "org/tiny-GGUF/tiny.F16.gguf"
    assert resolve_model("org/tiny-GGUF", gguf_file="tiny.F16.gguf") == source
    assert_same_state_dict(load_checkpoint(source.path, cache_dir=tmp_path / "cache").state_dict, expected)
    with pytest.raises(ModelLoadError, match=r"org/tiny-GGUF/other.gguf \(revision main\)"):
        resolve_model("org/tiny-GGUF", gguf_file="other.gguf")
    with pytest.raises(ModelLoadError, match=r"no config.json .*gguf_file='FILE.gguf' \(cached: tiny.F16.gguf\)"):
        resolve_model("org/tiny-GGUF")


def test_a_local_path_that_exists_wins(hub: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    write_hub_repo(hub, "org/tiny", model_files(tiny_model_dir), MAIN)
    local = tmp_path / "org" / "tiny"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/tiny").path == Path("org/tiny")
    assert resolve_model(tiny_model_dir).path == tiny_model_dir
    assert resolve_model(tiny_model_dir).name == tiny_model_dir.name
    with pytest.raises(ValueError, match="revision='v2' is for Hub ids"):
        resolve_model(tiny_model_dir, revision="v2")


def test_what_is_not_a_hub_id_stays_a_missing_path(hub: Path, tmp_path: Path) -> None:
    for model in (tmp_path / "nowhere", "./org/name", "nowhere"):
        with pytest.raises(ModelLoadError, match="no such file or folder"):
            load_checkpoint(resolve_model(model).path)


def test_gguf_file_in_a_local_folder(tmp_path: Path) -> None:
    llama_to_gguf(tiny_llama(), tmp_path / "tiny.gguf", Q.F16)
    source = resolve_model(tmp_path, gguf_file="tiny.gguf")
    assert source.path == tmp_path / "tiny.gguf" and source.name == "tiny"


def test_without_offline_mode_an_unreachable_hub_falls_back_to_the_cache(hub: Path, tiny_model_dir: Path,
                                                                        tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    dead = "http://127.0.0.1:9"  # the discard port: refused at once, wherever the tests run
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", dead)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        dead + "/{repo_id}/resolve/{revision}/{filename}")
    snapshot = write_hub_repo(hub, "org/tiny", model_files(tiny_model_dir), MAIN)
    assert resolve_model("org/tiny").path == snapshot
    llama_to_gguf(tiny_llama(), tmp_path / "tiny.gguf", Q.F16)
    gguf_snapshot = write_hub_repo(hub, "org/tiny-GGUF", {"tiny.gguf": tmp_path / "tiny.gguf"}, MAIN)
    assert resolve_model("org/tiny-GGUF/tiny.gguf").path == gguf_snapshot / "tiny.gguf"
    with pytest.raises(ModelLoadError, match="the Hub cannot be reached"):
        resolve_model("org/missing")
