"""Units from the Python installation itself: documentation prose, standard-library source,
tables built from stdlib modules, and the stdlib's structured data files. These need no optional
package, so a bare install can still build a corpus with prose, code and lists."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Iterable

from headscope.data.units import SourceUnavailable, Unit, read_text, stdlib_dir

_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages"})
_MAX_SOURCE_BYTES = 100_000
_DOC_FILES = (
    "LICENSE.txt",
    "email/architecture.rst",
    "idlelib/README.txt",
    "idlelib/HISTORY.txt",
    "idlelib/extend.txt",
)
_DATA_FILES = (
    "idlelib/CREDITS.txt",
    "idlelib/ChangeLog",
    "idlelib/NEWS.txt",
    "idlelib/NEWS2x.txt",
    "idlelib/TODO.txt",
    "idlelib/config-extensions.def",
    "idlelib/config-highlight.def",
    "idlelib/config-keys.def",
    "idlelib/config-main.def",
    "lib2to3/Grammar.txt",
    "lib2to3/PatternGrammar.txt",
)


@functools.cache
def _stdlib_sources() -> tuple[tuple[str, str], ...]:
    """(path relative to the stdlib folder, text) of each module outside test folders."""
    root = stdlib_dir()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in _SKIP_DIRS or p.startswith("config-") for p in rel.parts[:-1]):
            continue
        if path.stat().st_size > _MAX_SOURCE_BYTES:
            continue
        try:
            text = path.read_bytes().decode("utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError:
            continue
        if text.strip():
            files.append((rel.as_posix(), text))
    return tuple(files)


def stdlib_code() -> list[Unit]:
    """One unit per standard-library module."""
    return [Unit(rel, text) for rel, text in _stdlib_sources()]


def python_docs() -> list[Unit]:
    """The reference-manual topics behind `help()` (pydoc_data) and the stdlib's prose files."""
    try:
        from pydoc_data import topics
    except ImportError:  # some distributions ship Python without pydoc_data
        topics_by_name: dict[str, str] = {}
    else:
        topics_by_name = topics.topics
    out = [Unit(f"topics/{n}", topics_by_name[n].strip()) for n in sorted(topics_by_name)]
    for rel in _DOC_FILES:
        path = stdlib_dir() / rel
        if path.is_file():
            out.append(Unit(rel, read_text(path).strip()))
    if not out:
        raise SourceUnavailable("this Python installation ships no documentation files")
    return out


def python_data_files() -> list[Unit]:
    """IDLE's change logs and config files, and the lib2to3 grammars, where present."""
    paths = [(rel, stdlib_dir() / rel) for rel in _DATA_FILES]
    return [Unit(rel, read_text(path).strip()) for rel, path in paths if path.is_file()]


# Names that are only a prefix plus the code point carry no information.
_ALGORITHMIC_NAMES = (
    "CJK UNIFIED IDEOGRAPH-",
    "CJK COMPATIBILITY IDEOGRAPH-",
    "HANGUL SYLLABLE ",
    "TANGUT IDEOGRAPH-",
    "TANGUT COMPONENT-",
    "KHITAN SMALL SCRIPT CHARACTER-",
    "NUSHU CHARACTER-",
)


def unicode_names() -> list[Unit]:
    """One unit per 256 code points, one "U+0041 LATIN CAPITAL LETTER A" line per character."""
    import unicodedata

    out = []
    for page in range(0, sys.maxunicode + 1, 256):
        rows = []
        for cp in range(page, page + 256):
            name = unicodedata.name(chr(cp), "")
            if name and not name.startswith(_ALGORITHMIC_NAMES):
                rows.append(f"U+{cp:04X} {name}")
        if rows:
            title = (
                f"Unicode {unicodedata.unidata_version} characters "
                f"U+{page:04X} to U+{page + 255:04X}"
            )
            out.append(Unit(f"U+{page:04X}", _table(title, rows)))
    return out


def _table(title: str, rows: Iterable[str]) -> str:
    return title + "\n\n" + "\n".join(rows)


_DOCSTRING_START = re.compile(r'(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*[rRuU]?("""|\'\'\'|"|\')')


def _summary(source: str) -> str:
    """The first line of a module's docstring, or ""."""
    match = _DOCSTRING_START.match(source)
    if not match:
        return ""
    body = source[match.end() :].split(match.group(1), 1)[0]
    return next((line.strip() for line in body.split("\n") if line.strip()), "")


def _module_index() -> str:
    rows = []
    for rel, text in _stdlib_sources():
        module = rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        summary = _summary(text)
        rows.append(f"{module} — {summary}" if summary else module)
    return _table("Index of the Python standard library modules", rows)


def _entity(name: str, value: str) -> str:
    codes = " ".join(f"U+{ord(c):04X}" for c in value)
    shown = value if value.isprintable() else ""
    return f"&{name} {codes} {shown}".rstrip()


def python_tables() -> list[Unit]:
    """Lists and tables that stdlib modules hold as data."""
    import encodings.aliases
    import html.entities
    import http
    import keyword
    import locale
    import mimetypes
    import opcode
    import pydoc
    import token

    # A fresh MimeTypes holds Python's built-in table only, not this machine's mime.types files.
    mime = sorted(mimetypes.MimeTypes().types_map[True].items())
    tables = {
        "keywords": _table("Python keywords", keyword.kwlist),
        "soft-keywords": _table("Python soft keywords", keyword.softkwlist),
        "token-types": _table(
            "Python token types", [f"{n} {name}" for n, name in sorted(token.tok_name.items())]
        ),
        "opcodes": _table(
            "CPython bytecode instructions",
            [f"{code} {name}" for name, code in sorted(opcode.opmap.items(), key=lambda x: x[1])],
        ),
        "http-status": _table(
            "HTTP status codes",
            [f"{s.value} {s.phrase}: {s.description}".rstrip(": ") for s in http.HTTPStatus],
        ),
        "html-entities": _table(
            "HTML5 named character references",
            [_entity(name, value) for name, value in sorted(html.entities.html5.items())],
        ),
        "encoding-aliases": _table(
            "Text encoding aliases",
            [f"{alias} -> {codec}" for alias, codec in sorted(encodings.aliases.aliases.items())],
        ),
        "locale-aliases": _table(
            "Locale aliases",
            [f"{alias} -> {name}" for alias, name in sorted(locale.locale_alias.items())],
        ),
        "mime-types": _table("MIME types by file extension", [f"{e} {t}" for e, t in mime]),
        "stdlib-modules": _table(
            "Python standard library module names", sorted(sys.stdlib_module_names)
        ),
        "help-topics": _table(
            "Python help topics and where to read about them",
            [
                f"{name}: {' '.join(part for part in entry if part)}"
                for name, entry in sorted(pydoc.Helper.topics.items())
                if isinstance(entry, tuple)
            ],
        ),
        "module-index": _module_index(),
    }
    return [Unit(key, text) for key, text in tables.items()]


def clear_caches() -> None:
    """Forget the files read during a build."""
    _stdlib_sources.cache_clear()
