"""The GGUF conversion cache: where the converted copy of a GGUF file lives, and when it is removed.

Key: the file's content and the format version, `<cache>/gguf/<sha256[:32]>-v<CACHE_FORMAT_VERSION>`. A file
that is copied, moved, renamed or reinstalled (new path, new mtime) finds its conversion again; sha256 reads
the 98 MB default model in about 0.07 s on one core (blake2b takes 0.11 s). The digest is remembered per
(resolved path, size, mtime) in `<cache>/gguf/digests.json`, so loading the same file again reads none of it.

Housekeeping runs after each successful GGUF load, and a failure in it never fails the load:
- the folder just used gets its mtime set to now (a folder's mtime is its last use);
- conversions of another format version go, and so do version 1's folders keyed on name, size and mtime
  (`<cache>/<stem>-<size>-<mtime_ns>-v1`);
- conversions not used for MAX_UNUSED_DAYS (30) days go;
- while the conversions take more than MAX_CACHE_BYTES (20 GiB) together, the least recently used go,
  never the one just used.
A folder goes by a rename to a temporary name first (one atomic step: another process sees it whole or
not at all), then a delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

CACHE_FORMAT_VERSION = 2  # bump when the converted cache layout or contents change
MAX_UNUSED_DAYS = 30
MAX_CACHE_BYTES = 20 << 30
_MEMO_ENTRIES = 256  # digests remembered (one per GGUF path loaded)
_CHUNK = 4 << 20
_FOLDER = re.compile(r"[0-9a-f]{32}-v(\d+)")
_LEGACY = re.compile(r".+-\d+-\d+-v\d+")  # version 1: <stem>-<size>-<mtime_ns>-v1, directly in the cache


def cache_root(cache_dir: Path) -> Path:
    return cache_dir / "gguf"


def content_digest(path: Path, cache_dir: Path) -> str:
    """sha256 of the file's bytes, read from the memo when the file's path, size and mtime are unchanged."""
    key, stamp = _memo_key(path)
    entry = _read_memo(cache_dir).get(key)
    if isinstance(entry, list) and entry[:2] == stamp and len(entry) == 3:
        return str(entry[2])
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(_CHUNK))
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(buffer[:n])
    return digest.hexdigest()


def folder_for(digest: str, cache_dir: Path) -> Path:
    return cache_root(cache_dir) / f"{digest[:32]}-v{CACHE_FORMAT_VERSION}"


def record_use(path: Path, digest: str, folder: Path, cache_dir: Path) -> None:
    """After a successful load: remember the digest, mark `folder` used, and apply the removal rules."""
    try:
        _remember(path, digest, cache_dir)
        if folder.is_dir():
            os.utime(folder)
        _evict(cache_dir, keep=folder)
    except OSError:  # housekeeping: an unwritable or vanished cache only costs disk space or time
        pass


def _memo_key(path: Path) -> tuple[str, list[int]]:
    stat = path.stat()
    return str(path.resolve()), [stat.st_size, stat.st_mtime_ns]


def _read_memo(cache_dir: Path) -> dict:
    try:
        memo = json.loads((cache_root(cache_dir) / "digests.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _remember(path: Path, digest: str, cache_dir: Path) -> None:
    key, stamp = _memo_key(path)
    memo = _read_memo(cache_dir)
    if memo.get(key) == [*stamp, digest]:
        return
    memo.pop(key, None)
    memo[key] = [*stamp, digest]  # newest last; the oldest are dropped beyond _MEMO_ENTRIES
    memo = dict(list(memo.items())[-_MEMO_ENTRIES:])
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".digests.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(memo, f)
        os.replace(tmp, root / "digests.json")  # atomic: a concurrent reader sees the old or the new memo
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _evict(cache_dir: Path, keep: Path) -> None:
    for legacy in cache_dir.iterdir():
        if _LEGACY.fullmatch(legacy.name) and (legacy / "config.json").is_file():
            _remove(legacy)
    root = cache_root(cache_dir)
    if not root.is_dir():
        return
    now, current = time.time(), []
    for folder in root.iterdir():
        match = _FOLDER.fullmatch(folder.name)
        if match is None or not folder.is_dir():
            continue
        if int(match[1]) != CACHE_FORMAT_VERSION:
            _remove(folder)
            continue
        used = folder.stat().st_mtime
        if folder != keep and now - used > MAX_UNUSED_DAYS * 86400:
            _remove(folder)
            continue
        current.append((used, sum(f.stat().st_size for f in folder.iterdir() if f.is_file()), folder))
    total = sum(size for _, size, _ in current)
    for _, size, folder in sorted(current, key=lambda item: item[0]):  # least recently used first
        if total <= MAX_CACHE_BYTES:
            break
        if folder != keep:
            _remove(folder)
            total -= size


def _remove(folder: Path) -> None:
    gone = folder.with_name(f".{folder.name}.removed-{os.getpid()}.tmp")
    try:
        folder.rename(gone)
    except OSError:  # another process removed it first
        return
    shutil.rmtree(gone, ignore_errors=True)
