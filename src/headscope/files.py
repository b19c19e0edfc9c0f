"""Atomic writes: a file (or folder) is either its old version or its complete new one, never
half. Every file headscope writes goes through :func:`atomic_file` or :func:`atomic_dir`.

``atomic_file`` yields a temporary path in the target's folder; when the block ends without an
exception the temporary file is flushed to disk (fsync) and renamed over the target, otherwise it
is removed. The helpers below it cover every format headscope writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file, save_file
from torch import Tensor


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path | str, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``.

    ``mode``: the file's permissions (mkstemp's default 0600 would hide a shared cache).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a fresh folder beside ``path``; on success it replaces ``path`` whole.

    An existing ``path`` is moved aside first and removed after the rename, so no file of the old
    version survives in the new one. On an exception the new folder is removed and ``path`` is
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync(f)
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.replace(path, old / "old")
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, data: Any, *, indent: int | None = None) -> None:
    """Compact JSON (or indented with ``indent``); NaN and infinities are refused."""
    raw = json.dumps(
        data,
        ensure_ascii=False,
        indent=indent,
        allow_nan=False,
        separators=None if indent else (",", ":"),
    )
    write_bytes(path, raw.encode("utf-8") + (b"\n" if indent else b""))


def write_lines(path: Path | str, lines: Iterable[str]) -> tuple[int, str]:
    """Stream ``lines`` into ``path`` as UTF-8; returns (bytes written, sha256 hex)."""
    digest = hashlib.sha256()
    size = 0
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        for line in lines:
            data = line.encode("utf-8")
            f.write(data)
            digest.update(data)
            size += len(data)
    return size, digest.hexdigest()


def write_with(path: Path | str, write: Callable[[Path], object]) -> None:
    """Any writer that takes a file path (``DataFrame.to_parquet``, ``np.save``, ...)."""
    with atomic_file(path) as tmp:
        write(tmp)


def write_npy(path: Path | str, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        np.save(f, array)


def write_tensors(
    path: Path | str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    write_with(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_tensors(path: Path | str) -> dict[str, Tensor]:
    return load_file(str(path))
