"""The default corpus: a balanced, multi-domain English corpus built offline from text that ships
in installed Python packages and in Python itself.

`build_corpus` writes two files:

- ``corpus.jsonl``: one ``{"domain", "id", "source", "text"}`` object per line, in a fixed
  pseudo-random order so that any prefix of the file mixes all domains;
- ``corpus_stats.json``: documents and bytes per domain and per source, the sources skipped and
  why, and the sha256 of ``corpus.jsonl``.

The same installation always gives byte-identical files: sources are read in sorted order, units
are chosen and documents ordered by sha256 of their ids, and no time or path is recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from headscope.data.readers import CORPUS_FILE, STATS_FILE
from headscope.data.sources import DOMAINS, SOURCES, Source, clear_caches
from headscope.data.units import SourceUnavailable, Unit
from headscope.errors import DataError
from headscope.files import write_lines

STATS_SCHEMA_VERSION = 1
DEFAULT_MIN_BYTES = 5_000_000
DEFAULT_MAX_BYTES = 10_000_000
DEFAULT_MAX_DOC_BYTES = 20_000


class MissingSourceWarning(UserWarning):
    """A corpus source was skipped because its package or files are not installed."""


class CorpusTooSmallError(DataError):
    """The installed sources hold less text than the corpus needs."""


@dataclass(frozen=True)
class Count:
    """Documents and UTF-8 bytes of document text."""

    documents: int
    bytes: int


@dataclass(frozen=True)
class SourceStats:
    """What one source contributed, and from which package version under which licence."""

    domain: str
    version: str
    licence: str
    available_bytes: int
    documents: int
    bytes: int


@dataclass(frozen=True)
class CorpusStats:
    """The contents of ``corpus_stats.json``."""

    documents: int
    bytes: int  # UTF-8 bytes of all document texts
    file_bytes: int  # size of corpus.jsonl
    sha256: str  # of corpus.jsonl
    domains: dict[str, Count]
    sources: dict[str, SourceStats]
    skipped_sources: dict[str, str] = field(default_factory=dict)  # name -> why
    max_bytes: int = DEFAULT_MAX_BYTES
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
    schema_version: int = STATS_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorpusStats:
        return cls(
            **{
                **data,
                "domains": {k: Count(**v) for k, v in data["domains"].items()},
                "sources": {k: SourceStats(**v) for k, v in data["sources"].items()},
            }
        )

    @classmethod
    def load(cls, path: Path) -> CorpusStats:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def split_text(text: str, max_bytes: int) -> list[str]:
    """Cut `text` into pieces of at most `max_bytes` UTF-8 bytes whose concatenation is `text`.

    Each cut falls after the last paragraph break in the window if there is one in its second
    half, else after the last line break, else after the last space, else between characters.
    """
    if max_bytes < 4:
        raise ValueError(f"max_bytes must be at least 4 (one UTF-8 character), got {max_bytes}")
    pieces = []
    rest = text
    while len(rest.encode("utf-8")) > max_bytes:
        window = rest.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        cut = len(window)
        for sep in ("\n\n", "\n", " "):
            pos = window.rfind(sep)
            if pos >= len(window) // 2:
                cut = pos + len(sep)
                break
        pieces.append(rest[:cut])
        rest = rest[cut:]
    if rest:
        pieces.append(rest)
    return pieces


def _water_fill(available: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` bytes equally between names; what a name cannot use goes to the others."""
    budgets = {}
    left = total
    names = sorted(available, key=lambda n: (available[n], n))
    for i, name in enumerate(names):
        budgets[name] = min(available[name], left // (len(names) - i))
        left -= budgets[name]
    return {name: budgets[name] for name in available}


def _rank(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _select(source: str, units: list[Unit], budget: int) -> list[Unit]:
    """A spread-out subset of the units within `budget` bytes, in the source's own order."""
    if sum(len(u.text.encode("utf-8")) for u in units) <= budget:
        return units
    keep: set[str] = set()
    used = 0
    for unit in sorted(units, key=lambda u: _rank(f"{source}/{u.key}")):
        size = len(unit.text.encode("utf-8"))
        if used + size <= budget:
            keep.add(unit.key)
            used += size
    return [u for u in units if u.key in keep]


_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def _documents(source: Source, units: Iterable[Unit], max_doc_bytes: int) -> list[dict[str, str]]:
    docs = []
    for unit in units:
        # Drop blank lines around each part but keep the indentation of its first line (code).
        parts = [_BLANK_LINES.sub("", p).rstrip() for p in split_text(unit.text, max_doc_bytes)]
        parts = [p for p in parts if p]
        base = f"{source.name}/{unit.key}"
        for i, part in enumerate(parts, 1):
            doc_id = base if len(parts) == 1 else f"{base}/part{i}"
            docs.append(
                {"id": doc_id, "source": source.name, "domain": source.domain, "text": part}
            )
    return docs


def _read_sources(sources: Iterable[Source]) -> tuple[dict[str, list[Unit]], dict[str, str]]:
    units: dict[str, list[Unit]] = {}
    skipped: dict[str, str] = {}
    for source in sources:
        try:
            read = [u for u in source.read() if u.text.strip()]
            if not read:
                raise SourceUnavailable("its files hold no text")
        except (SourceUnavailable, OSError, ValueError) as exc:
            skipped[source.name] = str(exc)
            warnings.warn(
                f"corpus source {source.name!r} ({source.domain}) skipped: {exc}",
                MissingSourceWarning,
                stacklevel=3,
            )
            continue
        keys = [u.key for u in read]
        if len(set(keys)) != len(keys):
            raise AssertionError(f"corpus source {source.name!r} repeats unit keys")
        units[source.name] = read
    return units, skipped


def build_corpus(
    out_dir: Path,
    *,
    min_bytes: int = DEFAULT_MIN_BYTES,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
) -> CorpusStats:
    """Build the default corpus into `out_dir` (``corpus.jsonl`` and ``corpus_stats.json``).

    Up to `max_bytes` bytes of text are shared equally between the domains (prose, verse,
    dialogue, code, lists), and within a domain between its sources; what a small source
    cannot fill goes to the others. Documents are natural units (a sonnet, a scene, a Bible
    chapter, a module) cut at paragraph or line breaks into pieces of at most `max_doc_bytes`.

    A source whose optional package is missing is skipped with a `MissingSourceWarning`.
    Raises `CorpusTooSmallError` (and writes nothing) when the text comes to under `min_bytes`.
    """
    out_dir = Path(out_dir)
    try:
        units, skipped = _read_sources(SOURCES)
    finally:
        clear_caches()
    by_name = {s.name: s for s in SOURCES}
    domain_available = {
        d: sum(
            len(u.text.encode("utf-8")) for n in units if by_name[n].domain == d for u in units[n]
        )
        for d in DOMAINS
    }
    domain_budget = _water_fill(domain_available, max_bytes)

    docs: list[dict[str, str]] = []
    source_stats: dict[str, SourceStats] = {}
    for domain in DOMAINS:
        names = [n for n in units if by_name[n].domain == domain]
        available = {n: sum(len(u.text.encode("utf-8")) for u in units[n]) for n in names}
        for name, budget in _water_fill(available, domain_budget[domain]).items():
            source = by_name[name]
            source_docs = _documents(source, _select(name, units[name], budget), max_doc_bytes)
            docs += source_docs
            source_stats[name] = SourceStats(
                domain=domain,
                version=source.version(),
                licence=source.licence,
                available_bytes=available[name],
                documents=len(source_docs),
                bytes=sum(len(d["text"].encode("utf-8")) for d in source_docs),
            )
    docs.sort(key=lambda d: _rank(d["id"]))

    domains = {
        d: Count(
            documents=sum(s.documents for s in source_stats.values() if s.domain == d),
            bytes=sum(s.bytes for s in source_stats.values() if s.domain == d),
        )
        for d in DOMAINS
    }
    total = sum(c.bytes for c in domains.values())
    if total < min_bytes:
        why = "; ".join(f"{n}: {r}" for n, r in skipped.items()) or "no source was skipped"
        raise CorpusTooSmallError(
            f"the installed sources give {total:,} bytes of text, under the {min_bytes:,} "
            f"needed ({why}). Install the optional sources with pip install 'headscope[corpus]'."
        )
    for d in DOMAINS:
        if domains[d].documents == 0:
            warnings.warn(f"the corpus has no {d} documents", MissingSourceWarning, stacklevel=2)

    out_dir.mkdir(parents=True, exist_ok=True)
    file_bytes, sha256 = write_lines(
        out_dir / CORPUS_FILE,
        (json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs),
    )
    stats = CorpusStats(
        documents=len(docs),
        bytes=total,
        file_bytes=file_bytes,
        sha256=sha256,
        domains=domains,
        sources=source_stats,
        skipped_sources=skipped,
        max_bytes=max_bytes,
        max_doc_bytes=max_doc_bytes,
    )
    text = json.dumps(stats.to_dict(), ensure_ascii=False, sort_keys=True, indent=2) + "\n"
    write_lines(out_dir / STATS_FILE, [text])
    return stats


def format_stats(stats: CorpusStats) -> str:
    """A table of documents and bytes per domain, with the total and any skipped sources."""
    rows = [f"{'domain':<10} {'documents':>10} {'bytes':>12} {'share':>7}"]
    for domain, count in stats.domains.items():
        share = count.bytes / stats.bytes if stats.bytes else 0.0
        rows.append(f"{domain:<10} {count.documents:>10,} {count.bytes:>12,} {share:>7.1%}")
    rows.append(
        f"{'total':<10} {stats.documents:>10,} {stats.bytes:>12,} {1:>7.1%}"
        f"  ({stats.bytes / 1e6:.2f} MB of text, {stats.file_bytes / 1e6:.2f} MB file)"
    )
    rows += [f"skipped {name}: {why}" for name, why in stats.skipped_sources.items()]
    return "\n".join(rows)


def default_corpus_path() -> Path:
    """The folder of the default corpus in the user's cache: ``$HEADSCOPE_CACHE/corpus``, else
    ``$XDG_CACHE_HOME/headscope/corpus``, else ``~/.cache/headscope/corpus``."""
    if cache := os.environ.get("HEADSCOPE_CACHE"):
        return Path(cache).expanduser() / "corpus"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "headscope" / "corpus"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_default_corpus() -> Path:
    """The path of the default ``corpus.jsonl``, built first if it is missing or does not match
    its stats (an interrupted or edited copy)."""
    out_dir = default_corpus_path()
    corpus = out_dir / CORPUS_FILE
    try:
        if CorpusStats.load(out_dir / STATS_FILE).sha256 == _sha256_file(corpus):
            return corpus
    except (OSError, ValueError, KeyError, TypeError):
        pass
    build_corpus(out_dir)
    return corpus
