"""Read users' documents from text files, folders, JSON Lines, Parquet and Hugging Face
`datasets` folders (saved with ``save_to_disk``; read here with pyarrow alone).

Bad documents are skipped and counted in a `ReadReport`, never raised, so one stray binary file
or broken line cannot stop a long run. Tables are read in row batches, so memory stays bounded
however large the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from headscope.errors import DataError, NotFound

USER_DOMAIN = "user"
# A folder holding both files is a corpus written by `headscope.data.build_corpus`.
CORPUS_FILE = "corpus.jsonl"
STATS_FILE = "corpus_stats.json"
_BATCH_ROWS = 1024
_META_FIELDS = ("id", "source", "domain")


@dataclass(frozen=True)
class Document:
    """One document. `id`, `source` and `domain` come from the data's own fields where it has
    them; otherwise `id` is the document's location (see `ReadReport`), `source` its file or
    dataset, and `domain` "code" for .py files, else "user"."""

    id: str
    text: str
    source: str
    domain: str


@dataclass
class ReadReport:
    """What a read kept and skipped: counts per reason, with a few example locations each.

    Locations are ``file`` for a whole file, ``file.jsonl:LINE`` (1-based) for a JSON line and
    ``file.parquet[ROW]`` (0-based) for a table row, relative to the folder that was read.
    """

    MAX_EXAMPLES: ClassVar[int] = 5

    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    # The fields of the first row that had no text field, to name the right one in an error.
    row_fields: list[str] | None = None

    def skip(self, reason: str, location: str) -> None:
        """Count one skipped document (or file) and remember where, for the first few."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.MAX_EXAMPLES:
            shown.append(location)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line for a person, e.g. "read 120 documents, skipped 3: 2 empty (a.jsonl:4,
        a.jsonl:9), 1 binary (x.txt)"."""
        read = f"read {self.documents:,} document{'s' if self.documents != 1 else ''}"
        if not self.skipped:
            return read + ", skipped none"
        parts = []
        for reason, count in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            shown = self.examples[reason]
            more = ", ..." if count > len(shown) else ""
            parts.append(f"{count:,} {reason} ({', '.join(shown)}{more})")
        return f"{read}, skipped {self.n_skipped:,}: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"documents": self.documents, "skipped": self.skipped, "examples": self.examples}


def _int_id(value: Any) -> str | None:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _problem(text: str) -> str | None:
    """Why `text` is not a usable document, or None."""
    if "\x00" in text:
        return "binary"
    if not text.strip():
        return "empty"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from a JSON "\ud800" escape
        return "undecodable"
    return None


class _Reader:
    """Reads one path given by the user; `root` is the folder that locations are relative to."""

    def __init__(self, root: Path, text_field: str, report: ReadReport) -> None:
        self.root = root
        self.text_field = text_field
        self.report = report

    def rel(self, path: Path) -> str:
        rel = path.relative_to(self.root).as_posix()
        return path.name if rel == "." else rel

    def emit(
        self,
        location: str,
        text: Any,
        meta: dict[str, Any],
        default_source: str,
        default_domain: str = USER_DOMAIN,
    ) -> Iterator[Document]:
        """Yield `text` as a document, or count why not. `meta` may carry id/source/domain."""
        if text is None:
            self.report.skip("missing field", location)
            return
        if not isinstance(text, str):
            self.report.skip("not a string", location)
            return
        if problem := _problem(text):
            self.report.skip(problem, location)
            return
        doc_id, source, domain = (meta.get(k) for k in _META_FIELDS)
        self.report.documents += 1
        yield Document(
            id=doc_id if isinstance(doc_id, str) and doc_id else _int_id(doc_id) or location,
            text=text,
            source=source if isinstance(source, str) and source else default_source,
            domain=domain if isinstance(domain, str) and domain else default_domain,
        )

    # --- one reader per file type

    def text_file(self, path: Path) -> Iterator[Document]:
        rel = self.rel(path)
        try:
            data = path.read_bytes()
        except OSError:
            self.report.skip("unreadable file", rel)
            return
        if b"\x00" in data:
            self.report.skip("binary", rel)
            return
        try:
            text = data.decode("utf-8-sig").replace("\r\n", "\n")
        except UnicodeDecodeError:
            self.report.skip("undecodable", rel)
            return
        domain = "code" if path.suffix.lower() == ".py" else USER_DOMAIN
        yield from self.emit(rel, text, {"id": rel}, rel, domain)

    def jsonl_file(self, path: Path) -> Iterator[Document]:
        rel = self.rel(path)
        try:
            f = path.open("rb")
        except OSError:
            self.report.skip("unreadable file", rel)
            return
        with f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                location = f"{rel}:{lineno}"
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    self.report.skip("undecodable", location)
                    continue
                except json.JSONDecodeError:
                    self.report.skip("malformed JSON", location)
                    continue
                if not isinstance(record, dict):
                    self.report.skip("malformed JSON", location)
                    continue
                if self.text_field not in record and self.report.row_fields is None:
                    self.report.row_fields = list(record)
                meta = {k: record.get(k) for k in _META_FIELDS}
                yield from self.emit(location, record.get(self.text_field), meta, rel)

    def parquet_file(self, path: Path) -> Iterator[Document]:
        rel = self.rel(path)
        yield from self.rows(self.parquet_batches(path), rel)

    def arrow_file(self, path: Path) -> Iterator[Document]:
        rel = self.rel(path)
        yield from self.rows(self.ipc_batches([path]), rel)

    def parquet_batches(self, path: Path) -> Iterator[pa.RecordBatch]:
        try:
            table = pq.ParquetFile(path)
            names = table.schema_arrow.names
            if self.text_field not in names and self.report.row_fields is None:
                self.report.row_fields = list(names)
            columns = [c for c in (self.text_field, *_META_FIELDS) if c in names]
            yield from table.iter_batches(batch_size=_BATCH_ROWS, columns=columns)
        except (OSError, pa.ArrowException):
            self.report.skip("unreadable file", self.rel(path))

    def ipc_batches(self, shards: list[Path]) -> Iterator[pa.RecordBatch]:
        """The batches of Arrow IPC streams (what ``datasets`` writes) or IPC files."""
        for shard in shards:
            try:
                with pa.memory_map(str(shard)) as source:
                    yield from _ipc_batches(source)
            except (OSError, pa.ArrowException):
                self.report.skip("unreadable file", self.rel(shard))

    def rows(self, batches: Iterable[pa.RecordBatch], name: str) -> Iterator[Document]:
        """Documents from the `text_field` column of table batches, rows numbered from 0."""
        row = 0
        for batch in batches:
            names = batch.schema.names
            meta_columns = {k: _column(batch, k) for k in _META_FIELDS if k in names}
            texts = _column(batch, self.text_field) if self.text_field in names else None
            for i in range(batch.num_rows):
                location = f"{name}[{row}]"
                row += 1
                if texts is None:
                    if self.report.row_fields is None:
                        self.report.row_fields = list(names)
                    self.report.skip("missing field", location)
                    continue
                text = texts[i]
                if isinstance(text, _Undecodable):
                    self.report.skip("undecodable", location)
                    continue
                meta = {k: v[i] for k, v in meta_columns.items()}
                yield from self.emit(location, text, meta, name)

    # --- folders

    def hf_dataset(self, folder: Path) -> Iterator[Document]:
        """A folder written by ``Dataset.save_to_disk``: shards listed in state.json."""
        name = self.rel(folder)
        yield from self.rows(self.ipc_batches(_hf_shards(folder)), name)

    def folder(self, folder: Path) -> Iterator[Document]:
        if (folder / "dataset_dict.json").is_file():
            for split in _hf_splits(folder):
                yield from self.hf_dataset(folder / split)
            return
        if _is_hf_dataset(folder):
            yield from self.hf_dataset(folder)
            return
        if (folder / CORPUS_FILE).is_file() and (folder / STATS_FILE).is_file():
            yield from self.jsonl_file(folder / CORPUS_FILE)
            return
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            if entry.name.startswith(".") or entry.name == "__pycache__":
                continue
            if entry.is_dir():
                yield from self.folder(entry)
            elif read := self.reader_for(entry):
                yield from read(entry)
            else:
                self.report.skip("unsupported file", self.rel(entry))

    def reader_for(self, path: Path) -> Callable[[Path], Iterator[Document]] | None:
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            return self.text_file
        return {
            ".jsonl": self.jsonl_file,
            ".parquet": self.parquet_file,
            ".arrow": self.arrow_file,
        }.get(suffix)


TEXT_SUFFIXES = (".txt", ".md", ".py")
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet", ".arrow")


class _Undecodable:
    """Marks a table value whose bytes are not valid UTF-8."""


def _column(batch: pa.RecordBatch, name: str) -> list[Any]:
    column = batch.column(batch.schema.get_field_index(name))
    try:
        return column.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException):
        values: list[Any] = []
        for i in range(len(column)):
            try:
                values.append(column[i].as_py())
            except (UnicodeDecodeError, pa.ArrowException):
                values.append(_Undecodable())
        return values


def _ipc_batches(source: pa.NativeFile) -> Iterator[pa.RecordBatch]:
    try:
        yield from pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def _is_hf_dataset(folder: Path) -> bool:
    if (folder / "state.json").is_file():
        return True
    return (folder / "dataset_info.json").is_file() and any(folder.glob("*.arrow"))


def _hf_shards(folder: Path) -> list[Path]:
    """The Arrow shards of a saved dataset, in the order state.json lists them."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        files = [folder / f["filename"] for f in state["_data_files"]]
        if files and all(f.is_file() for f in files):
            return files
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return sorted(folder.glob("*.arrow"))


def _hf_splits(folder: Path) -> list[str]:
    """The splits of a saved DatasetDict, in the order dataset_dict.json lists them."""
    try:
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        if isinstance(splits, list) and all((folder / str(s)).is_dir() for s in splits):
            return [str(s) for s in splits]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_hf_dataset(p))


def iter_documents(
    path: Path, *, text_field: str = "text", report: ReadReport | None = None
) -> Iterator[Document]:
    """The documents in `path`, in a fixed order.

    `path` may be a .txt/.md/.py file (one document), a .jsonl file (one document per line,
    text in `text_field`; "id", "source" and "domain" fields are kept, so headscope's own
    corpus.jsonl reads back as written), a .parquet or .arrow file (column `text_field`), a
    folder saved by Hugging Face ``datasets`` (``save_to_disk`` of a Dataset or DatasetDict),
    or any other folder, read recursively in sorted order, hidden entries aside.

    Bad documents (binary, undecodable, empty, missing or non-string field, malformed JSON,
    unreadable or unsupported files in a folder) are skipped and counted in `report`.
    Raises NotFound (a FileNotFoundError) for a missing path and DataError (a ValueError) for
    an unsupported file type, at the call, before any reading.
    """
    path = Path(path)
    if not path.exists():
        raise NotFound(f"no such file or folder: {path}")
    report = report if report is not None else ReadReport()
    if path.is_dir():
        return _Reader(path, text_field, report).folder(path)
    reader = _Reader(path.parent, text_field, report)
    read = reader.reader_for(path)
    if read is None:
        raise DataError(
            f"unsupported file type {path.suffix or '(none)'!r}: {path}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)} files, or a folder"
        )
    return read(path)


def check_readable(path: Path, *, text_field: str = "text") -> None:
    """Raise :class:`DataError` unless ``path`` holds at least one readable document.

    Reads up to the first usable document (to the end only when there is none), so a command
    can refuse unusable data before it loads a model. The message says how many documents were
    read and skipped, and why (and, when rows lack ``text_field``, which fields they have)."""
    report = ReadReport()
    if next(iter_documents(path, text_field=text_field, report=report), None) is not None:
        return
    if not report.skipped:
        raise DataError(f"no documents in {path}: it is empty")
    hint = ""
    if set(report.skipped) == {"missing field"} and report.row_fields is not None:
        fields = ", ".join(report.row_fields) or "none"
        hint = (
            f"; the rows have no {text_field!r} field (the first row's fields: {fields}): "
            "name the text field with --text-field"
        )
    raise DataError(f"no readable document in {path}: {report.summary()}{hint}")
