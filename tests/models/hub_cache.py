"""A Hugging Face Hub cache folder written by hand, in the layout huggingface_hub writes and reads:
models--org--name/{refs/<branch>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, blobs/<sha256>}."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_hub_repo(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str,
                   refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `files` (name in the repo -> a file to copy, or bytes) into `cache` as the snapshot of `commit`,
    with each of `refs` (branches, tags) pointing at it; returns the snapshot folder."""
    assert len(commit) == 40
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for name, source in files.items():
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def model_files(folder: Path) -> dict[str, Path]:
    """The files of a saved model folder, by name."""
    return {p.name: p for p in folder.iterdir() if p.is_file()}
