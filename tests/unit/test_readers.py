"""Readers of users' data: every format, every kind of bad document counted rather than raised."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from headscope.data import Document, ReadReport, iter_documents


def read(path: Path, **kwargs: object) -> tuple[list[Document], ReadReport]:
    report = ReadReport()
    docs = list(iter_documents(path, report=report, **kwargs))  # type: ignore[arg-type]
    return docs, report


def write_jsonl(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    path.write_bytes(data)
    return path


def write_arrow_stream(path: Path, table: pa.Table, batch_rows: int = 2) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)


def write_hf_dataset(folder: Path, shards: list[pa.Table]) -> None:
    """The layout ``Dataset.save_to_disk`` writes: Arrow stream shards plus two JSON files."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, table in zip(names, shards, strict=True):
        write_arrow_stream(folder / name, table)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    state = {"_data_files": [{"filename": n} for n in names], "_split": None}
    (folder / "state.json").write_text(json.dumps(state))


# --- formats


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes("\ufeffFirst line\r\nsecond line\r\n".encode())
    docs, report = read(path)
    assert docs == [Document("notes.txt", "First line\nsecond line\n", "notes.txt", "user")]
    assert report.documents == 1
    assert report.summary() == "read 1 document, skipped none"


def test_folder_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("# markdown")
    (tmp_path / "b" / "a.py").write_text("x = 1\n")
    (tmp_path / "a.txt").write_text("plain")
    write_jsonl(tmp_path / "c.jsonl", ['{"text": "line one"}', '{"text": "line two"}'])
    pq.write_table(pa.table({"text": ["row zero"]}), tmp_path / "d.parquet")
    (tmp_path / ".hidden.txt").write_text("never read")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00\x01")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")

    docs, report = read(tmp_path)

    assert [d.id for d in docs] == [
        "a.txt",
        "b/a.py",
        "b/z.md",
        "c.jsonl:1",
        "c.jsonl:2",
        "d.parquet[0]",
    ]
    assert [d.domain for d in docs] == ["user", "code", "user", "user", "user", "user"]
    assert docs[3].source == "c.jsonl"
    assert report.skipped == {"unsupported file": 1}
    assert report.examples == {"unsupported file": ["table.csv"]}


def test_jsonl_with_custom_field_keeps_id_source_domain(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            json.dumps({"body": "alpha", "id": "doc-a", "source": "wiki", "domain": "prose"}),
            json.dumps({"body": "beta", "id": 7}),
            json.dumps({"body": "gamma", "text": "not this one"}),
        ],
    )
    docs, report = read(path, text_field="body")
    assert docs == [
        Document("doc-a", "alpha", "wiki", "prose"),
        Document("7", "beta", "data.jsonl", "user"),
        Document("data.jsonl:3", "gamma", "data.jsonl", "user"),
    ]
    assert report.n_skipped == 0


def test_reads_headscope_corpus_format_back(tmp_path: Path) -> None:
    record = {
        "domain": "verse",
        "id": "shakespeare-poems/sonnets/018",
        "source": "shakespeare-poems",
    }
    record["text"] = "Shall I compare thee to a summer's day?"
    path = write_jsonl(tmp_path / "corpus.jsonl", [json.dumps(record, sort_keys=True)])
    docs, _ = read(path)
    assert docs == [Document(record["id"], record["text"], record["source"], record["domain"])]


def test_parquet_reads_column_across_many_batches(tmp_path: Path) -> None:
    n = 2500  # more than one read batch of 1024 rows
    table = pa.table({"content": [f"row {i}" for i in range(n)], "other": list(range(n))})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=1000)
    docs, report = read(tmp_path / "big.parquet", text_field="content")
    assert [d.text for d in docs] == [f"row {i}" for i in range(n)]
    assert docs[1234].id == "big.parquet[1234]"
    assert report.documents == n


def test_parquet_is_read_lazily(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), tmp_path / "t.parquet")
    report = ReadReport()
    first = next(iter_documents(tmp_path / "t.parquet", report=report))
    assert first.text == "a"
    assert report.documents == 1


def test_parquet_id_source_domain_columns(tmp_path: Path) -> None:
    table = pa.table({"text": ["x", "y"], "id": [10, 11], "domain": ["code", None]})
    pq.write_table(table, tmp_path / "t.parquet")
    docs, _ = read(tmp_path / "t.parquet")
    assert docs == [
        Document("10", "x", "t.parquet", "code"),
        Document("11", "y", "t.parquet", "user"),
    ]


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    shards = [pa.table({"text": ["zero", "one", "two"]}), pa.table({"text": ["three", "four"]})]
    write_hf_dataset(tmp_path / "mydata", shards)
    docs, report = read(tmp_path / "mydata")
    assert [d.text for d in docs] == ["zero", "one", "two", "three", "four"]
    assert [d.id for d in docs] == [f"mydata[{i}]" for i in range(5)]  # one numbering across shards
    assert {d.source for d in docs} == {"mydata"}
    assert report.n_skipped == 0


def test_hf_dataset_dict_reads_splits_in_listed_order(tmp_path: Path) -> None:
    root = tmp_path / "dd"
    write_hf_dataset(root / "train", [pa.table({"text": ["t0", "t1"]})])
    write_hf_dataset(root / "test", [pa.table({"text": ["e0"]})])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    docs, _ = read(root)
    assert [(d.id, d.text) for d in docs] == [
        ("train[0]", "t0"),
        ("train[1]", "t1"),
        ("test[0]", "e0"),
    ]


def test_hf_dataset_inside_a_folder_and_custom_column(tmp_path: Path) -> None:
    write_hf_dataset(tmp_path / "sub" / "ds", [pa.table({"content": ["c0"], "text": [1]})])
    docs, _ = read(tmp_path, text_field="content")
    assert [(d.id, d.text) for d in docs] == [("sub/ds[0]", "c0")]


def test_single_arrow_file(tmp_path: Path) -> None:
    write_arrow_stream(tmp_path / "x.arrow", pa.table({"text": ["a", "b", "c"]}))
    docs, _ = read(tmp_path / "x.arrow")
    assert [d.id for d in docs] == ["x.arrow[0]", "x.arrow[1]", "x.arrow[2]"]


# --- bad input is counted, not raised


def test_bad_text_files_are_counted(tmp_path: Path) -> None:
    (tmp_path / "binary.txt").write_bytes(b"abc\x00def")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "empty.md").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    (tmp_path / "good.txt").write_text("fine")
    docs, report = read(tmp_path)
    assert [d.id for d in docs] == ["good.txt"]
    assert report.skipped == {"binary": 1, "undecodable": 1, "empty": 2}
    assert report.examples["empty"] == ["blank.txt", "empty.md"]
    assert report.summary() == (
        "read 1 document, skipped 4: 2 empty (blank.txt, empty.md), "
        "1 binary (binary.txt), 1 undecodable (latin1.txt)"
    )


def test_bad_jsonl_lines_are_counted(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            '{"text": "good"}',
            "{not json",
            "[1, 2]",
            '{"other": "x"}',
            '{"text": null}',
            '{"text": 42}',
            '{"text": ["a"]}',
            '{"text": "   "}',
            '{"text": "nul\\u0000inside"}',
            b'{"text": "\xff\xfe"}',
            '{"text": "lone \\ud800 surrogate"}',
            "",
            '{"text": "also good"}',
        ],
    )
    docs, report = read(path)
    assert [d.text for d in docs] == ["good", "also good"]
    assert report.skipped == {
        "malformed JSON": 2,
        "missing field": 2,
        "not a string": 2,
        "empty": 1,
        "binary": 1,
        "undecodable": 2,
    }
    assert report.examples["malformed JSON"] == ["a.jsonl:2", "a.jsonl:3"]
    assert report.examples["undecodable"] == ["a.jsonl:10", "a.jsonl:11"]


def test_bad_table_rows_are_counted(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["ok", None, "", "a\x00b"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["no text column"] * 3}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "c.parquet")
    pq.write_table(pa.table({"text": pa.array([b"bytes"], pa.binary())}), tmp_path / "d.parquet")
    (tmp_path / "e.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "f.arrow").write_bytes(b"not arrow either")
    docs, report = read(tmp_path)
    assert [d.text for d in docs] == ["ok"]
    assert report.skipped == {
        "missing field": 4,
        "empty": 1,
        "binary": 1,
        "not a string": 3,
        "unreadable file": 2,
    }
    assert report.examples["missing field"] == [
        "a.parquet[1]",
        "b.parquet[0]",
        "b.parquet[1]",
        "b.parquet[2]",
    ]
    assert report.examples["unreadable file"] == ["e.parquet", "f.arrow"]


def test_report_keeps_five_examples_per_reason(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", ['{"text": ""}'] * 8)
    _, report = read(path)
    assert report.skipped == {"empty": 8}
    assert report.examples["empty"] == [f"a.jsonl:{i}" for i in range(1, 6)]
    assert report.summary() == (
        "read 0 documents, skipped 8: 8 empty (a.jsonl:1, a.jsonl:2, a.jsonl:3, a.jsonl:4, "
        "a.jsonl:5, ...)"
    )
    assert report.to_dict()["skipped"] == {"empty": 8}


def test_missing_path_raises_at_the_call(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        iter_documents(missing)


def test_unsupported_file_type_raises_at_the_call(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'.*data\.csv"):
        iter_documents(path)
