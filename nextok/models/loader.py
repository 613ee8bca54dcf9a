"""Checkpoints -> (HF config dict, HF-named state dict, generation config, tokenizer).

Two sources: a Hugging Face folder (config.json + model.safetensors, a sharded safetensors index, or
pytorch_model.bin read with `weights_only=True`), or a GGUF file. The first load of a GGUF converts it
(see nextok/models/gguf.py) and writes the result as an HF folder under the cache directory, keyed on the
file's content (nextok/models/gguf_cache.py, which also says when old conversions are removed), so the
next load of the same file is a plain safetensors read.

Tied embeddings: when `config["tie_word_embeddings"]` is true the state dict has no `lm_head.weight`
(as in HF's own files); the model ties its head to the input embedding.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nextok.errors import ModelLoadError
from nextok.models.gguf import read_gguf
from nextok.models.gguf_cache import content_digest, folder_for, record_use
from nextok.models.registry import ARCHITECTURES, find_architecture
from nextok.paths import default_cache_dir
from nextok.tokenizer import Tokenizer

_STALE_TMP_S = 3600  # a conversion takes seconds: a temporary folder this old belongs to a killed process


@dataclass
class Checkpoint:
    """A loaded checkpoint in Hugging Face form, ready for the model registry.

    `state_dict` uses the HF checkpoint keys, holds floating-point tensors in the requested dtype
    (loaded with blocks=True, a GGUF's quantized weights are gguf_blocks.QuantizedWeight instead), and
    has no `lm_head.weight` when `config["tie_word_embeddings"]` is true.
    """

    path: Path
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    generation_config: dict[str, Any] = field(default_factory=dict)
    tokenizer: Tokenizer | None = None


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32,
                    cache_dir: Path | None = None, blocks: bool = False) -> Checkpoint:
    """Load an HF model folder or a GGUF file (converted once, then read from `cache_dir`).

    blocks: read a GGUF file's quantized 2-D weights as their blocks (gguf_blocks.QuantizedWeight, which
    build_model packs for the CPU kernels) straight from the file, with no float32 conversion and no
    cache: for models that will run on the kernels in float32 or bfloat16 (linear.keeps_blocks).

    Any problem with the files is a ModelLoadError naming the path and the problem in one line, whatever
    the library underneath raised (a damaged file fails in numpy, struct, safetensors or json in many ways).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            return _load_hf_folder(path, dtype)
        if (path.suffix.lower() == ".gguf" or _magic(path) == b"GGUF") and blocks:
            return _read_gguf_blocks(path, dtype)
        if path.suffix.lower() == ".gguf" or _magic(path) == b"GGUF":
            return _load_gguf(path, dtype, Path(cache_dir) if cache_dir else default_cache_dir())
    except ModelLoadError:
        raise
    except MemoryError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load it ({type(e).__name__}: {_one_line(e)})") from e
    raise ModelLoadError(f"{path}: neither a GGUF file nor a Hugging Face model folder (config.json + weights)")


def gguf_cache_folder(path: Path, cache_dir: Path) -> Path:
    """Where the converted copy of a GGUF file lives: keyed by its content and CACHE_FORMAT_VERSION."""
    return folder_for(content_digest(path, cache_dir), cache_dir)


# ---------------------------------------------------------------------------------------------- HF folders

def _load_hf_folder(folder: Path, dtype: torch.dtype) -> Checkpoint:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: not a Hugging Face model folder (no config.json)")
    config = _normalize_config(_read_json(config_file), config_file)
    state_dict = _read_weights(folder)
    state_dict = _fix_prefix(state_dict, ARCHITECTURES[config["architectures"][0]].weight_prefix)
    if config["tie_word_embeddings"]:
        state_dict.pop("lm_head.weight", None)
    generation_file = folder / "generation_config.json"
    tokenizer = None
    if (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file()
                                                  and (folder / "merges.txt").is_file()):
        tokenizer = Tokenizer.from_pretrained(folder)
    return Checkpoint(
        path=folder, config=config, state_dict=_to_dtype(state_dict, dtype),
        generation_config=_read_json(generation_file) if generation_file.is_file() else {},
        tokenizer=tokenizer,
    )


def _normalize_config(config: dict[str, Any], file: Path) -> dict[str, Any]:
    """Check the architecture is supported; fill `architectures`, `tie_word_embeddings` and `rope_theta`."""
    architecture = find_architecture(config)
    if architecture is None:
        found = config.get("architectures") or config.get("model_type")
        raise ModelLoadError(f"{file}: unsupported architecture {found!r}; "
                             f"supported: {', '.join(ARCHITECTURES)}")
    config = dict(config, architectures=[architecture.name])
    config.setdefault("tie_word_embeddings", architecture.tied_by_default)
    rope = config.get("rope_parameters")  # transformers >= 5 writes rope_theta in here
    if "rope_theta" not in config and isinstance(rope, dict) and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    return config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for index_name, reader in (("model.safetensors.index.json", _read_safetensors),
                               ("pytorch_model.bin.index.json", _read_bin)):
        if (index := folder / index_name).is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise ModelLoadError(f"{index}: the index has no weight_map")
            state_dict: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (folder / shard).is_file():
                    raise ModelLoadError(f"{folder / shard}: shard listed in {index_name} is missing")
                state_dict.update(reader(folder / shard))
            return state_dict
    if (file := folder / "model.safetensors").is_file():
        return _read_safetensors(file)
    if (file := folder / "pytorch_model.bin").is_file():
        return _read_bin(file)
    raise ModelLoadError(f"{folder}: no weights (expected model.safetensors, model.safetensors.index.json "
                         f"or pytorch_model.bin)")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: truncated or corrupt safetensors file ({_one_line(e)})") from None


def _read_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(e)):
            raise ModelLoadError(
                f"{file}: loading it needs unsafe unpickling (it holds {found[1]}, not only tensors), and nextok "
                f"only reads pickles with weights_only=True; if you trust the file, convert it to safetensors "
                f"(transformers: from_pretrained, then save_pretrained(..., safe_serialization=True))") from None
        reason = re.search(r"Unsupported operand \d+", str(e))
        raise ModelLoadError(f"{file}: corrupt, or a pickle that weights_only=True cannot read "
                             f"({reason[0] if reason else _one_line(e)}); convert it to safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: truncated or corrupt pytorch checkpoint ({_one_line(e)})") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ModelLoadError(f"{file}: not a state dict of tensors")
    return state_dict


def _fix_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Add the base-model prefix when the checkpoint was saved from the bare model (`h.0...`)."""
    if not state_dict or any(k.startswith(prefix) for k in state_dict):
        return state_dict
    return {k if k.startswith("lm_head.") else prefix + k: v for k, v in state_dict.items()}


def _to_dtype(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------- GGUF + cache

def _read_gguf_blocks(path: Path, dtype: torch.dtype) -> Checkpoint:
    """A GGUF read directly: quantized weights in their blocks, the rest dequantized (seconds, so no cache)."""
    config, state_dict, tokenizer = read_gguf(path, blocks=True)
    return Checkpoint(path=path, config=config, state_dict=_to_dtype(state_dict, dtype), tokenizer=tokenizer)


def _load_gguf(path: Path, dtype: torch.dtype, cache_dir: Path) -> Checkpoint:
    digest = content_digest(path, cache_dir)
    folder = folder_for(digest, cache_dir)
    if folder.is_dir():
        try:
            checkpoint = _load_hf_folder(folder, dtype)
            checkpoint.path = path
            record_use(path, digest, folder, cache_dir)
            return checkpoint
        except ModelLoadError as e:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"{folder}: ignoring a damaged GGUF cache ({e})", stacklevel=3)
            shutil.rmtree(folder, ignore_errors=True)
    config, state_dict, tokenizer = read_gguf(path)
    checkpoint = Checkpoint(path=path, config=config, state_dict=state_dict, tokenizer=tokenizer)
    _write_cache(folder, checkpoint)
    record_use(path, digest, folder, cache_dir)
    checkpoint.state_dict = _to_dtype(state_dict, dtype)
    return checkpoint


def _write_cache(folder: Path, checkpoint: Checkpoint) -> None:
    """Write the converted GGUF as an HF folder: into a temporary folder, then one atomic rename."""
    from safetensors.torch import save_file

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as e:
        warnings.warn(f"{folder}: cannot write the GGUF cache ({e}); the next load converts again", stacklevel=4)
        return
    try:
        save_file(checkpoint.state_dict, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(checkpoint.config, indent=2))
        if checkpoint.generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(checkpoint.generation_config, indent=2))
        if checkpoint.tokenizer is not None:
            checkpoint.tokenizer.save(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not folder.is_dir():
                raise
    except Exception as e:  # the conversion itself succeeded; a cache that cannot be written only costs time
        warnings.warn(f"{folder}: cannot write the GGUF cache ({_one_line(e)}); the next load converts again",
                      stacklevel=4)
    finally:  # also on KeyboardInterrupt: no temporary folder left behind
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_tmp(folder: Path) -> None:
    """Temporary folders of conversions that were killed (a live one is seconds old, never an hour)."""
    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):
        try:
            if time.time() - stale.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(stale)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------- helpers

def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{file}: cannot read JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file}: expected a JSON object")
    return data


def _magic(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(4)
    except OSError:
        return b""


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
