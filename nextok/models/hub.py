"""A model argument -> a local path: a path that exists, else a Hugging Face Hub id in the Hub's own cache.

Hub ids are `org/name` (a model folder: config.json, generation_config.json, the tokenizer files and the
safetensors weights are fetched, nothing else) and `org/name/file.gguf` (or `gguf_file="file.gguf"`: that
one file). `revision` is a branch, a tag or a commit hash. Files go through `huggingface_hub`
(`snapshot_download`, `hf_hub_download`) into its standard cache: $HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub. With HF_HUB_OFFLINE=1 nothing is asked of the network (`local_files_only`); without
it, huggingface_hub itself falls back to the cached files when the Hub cannot be reached. A model that is
in neither place is one ModelLoadError line that names the id, the revision and the cache folder.

The cache folder and offline mode are read from the environment at each call and passed on explicitly:
huggingface_hub reads its own constants once, at import.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from nextok.errors import ModelLoadError
from nextok.paths import default_model_path

# What a model folder needs (the loader and the tokenizer read nothing else); pytorch_model*.bin only
# when a repository has no safetensors weights.
MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
               "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json"]
BIN_FILES = ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"]

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:/(?P<file>.+\.gguf))?", re.IGNORECASE)
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's ENV_VARS_TRUE_VALUES


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are on this machine, and the name it goes by (served model name, records)."""

    path: Path
    name: str


def resolve_model(model: str | os.PathLike | None, revision: str | None = None,
                  gguf_file: str | None = None) -> ModelSource:
    """The local path of `model`: an existing path wins; else a Hub id, fetched or found in the Hub cache.

    None is $NEXTOK_MODEL (a path or a Hub id) or the embedded default model. `gguf_file` names a GGUF
    inside a Hub repository (or inside a local folder, as in transformers' `from_pretrained`).
    """
    model = default_model_path() if model is None else model
    local = Path(model).expanduser()
    if local.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for Hub ids, and {str(model)!r} is a local path: "
                             f"leave revision out, or check out that revision there")
        if gguf_file is not None:
            if not local.is_dir():
                raise ValueError(f"gguf_file={gguf_file!r} names a file inside a folder or a Hub repository, "
                                 f"and {str(model)!r} is a file: pass the .gguf path alone")
            local = local / gguf_file
        return ModelSource(local, local.stem if local.suffix.lower() == ".gguf" else local.name)
    match = _HUB_ID.fullmatch(str(model))
    if match is None or str(model).startswith((".", "~")):
        return ModelSource(local, local.name)  # not a Hub id: the loader says "no such file or folder"
    repo_id, filename = match["repo"], match["file"]
    if gguf_file is not None and filename is not None and gguf_file != filename:
        raise ValueError(f"gguf_file={gguf_file!r} and the file in {str(model)!r} differ: give the file once")
    filename = filename or gguf_file
    path = _fetch(repo_id, revision, filename)
    return ModelSource(path, f"{repo_id}/{filename}" if filename else repo_id)


def hub_cache_dir() -> Path:
    """The Hub cache as huggingface_hub computes it, from the environment as it is now."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE), as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def _fetch(repo_id: str, revision: str | None, filename: str | None) -> Path:
    import huggingface_hub as hf
    from huggingface_hub import errors

    cache, offline = hub_cache_dir(), hub_offline()
    options = {"revision": revision, "cache_dir": cache, "local_files_only": offline}
    where = f"{repo_id}{'/' + filename if filename else ''} (revision {revision or 'main'})"
    get = f"`hf download {repo_id}{' ' + filename if filename else ''}{' --revision ' + revision if revision else ''}`"
    try:
        if filename is not None:
            return Path(hf.hf_hub_download(repo_id, filename, **options))
        folder = Path(hf.snapshot_download(repo_id, allow_patterns=MODEL_FILES, **options))
        if not any(folder.glob("model*.safetensors*")):
            folder = Path(hf.snapshot_download(repo_id, allow_patterns=BIN_FILES, **options))
    except errors.LocalEntryNotFoundError as e:  # not cached (or partly), and no network or offline mode
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        if type(e).__name__ == "IncompleteSnapshotError":  # a partial download (recent huggingface_hub)
            why += " (the cached copy is incomplete)"
        raise ModelLoadError(f"{where}: no such local path, not in the Hugging Face cache {cache}, and {why}; "
                             f"download it with {get} where there is network (into the same cache), "
                             f"or pass a local path") from None
    except errors.EntryNotFoundError:  # on the Hub (LocalEntryNotFoundError is caught above)
        raise ModelLoadError(f"{where}: the repository has no file {filename!r}") from None
    except errors.RevisionNotFoundError:
        raise ModelLoadError(f"{where}: the Hub has no revision {revision!r} of {repo_id}") from None
    except errors.GatedRepoError:
        raise ModelLoadError(f"{where}: the repository is gated; accept its terms on huggingface.co, then log in "
                             f"(`hf auth login`) or set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise ModelLoadError(f"{where}: no local path of that name, and no such repository on the Hub (if it is "
                             f"private, log in: `hf auth login`)") from None
    except (OSError, ValueError) as e:  # HfHubHTTPError is an OSError; HFValidationError a ValueError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{where}: cannot fetch it from the Hub into {cache} ({type(e).__name__}: {first})") \
            from None
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f" (cached: {', '.join(ggufs)})" if ggufs else ""
        raise ModelLoadError(f"{where}: no config.json in the repository; for a GGUF repository name the file: "
                             f"{repo_id}/FILE.gguf or gguf_file='FILE.gguf'{hint}")
    return folder
