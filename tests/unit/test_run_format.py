"""Every file a precompute (and a HeadVis import) writes matches the run-format models."""

from __future__ import annotations

import json

import pytest

from headscope.files import read_json, write_json
from headscope.store import RunError, open_run
from headscope.store.run_format import (
    SCHEMA_VERSION,
    HeadPayload,
    Manifest,
    MetricsTable,
    MotifMap,
)


def _check_run(path) -> None:
    manifest = Manifest.model_validate(read_json(path / "manifest.json"))
    assert manifest.schema_version == SCHEMA_VERSION and manifest.status == "complete"
    table = MetricsTable.model_validate(read_json(path / "metrics.json"))
    heads = sorted((path / "heads").glob("L*H*.json"))
    assert len(heads) == len(table.rows) == manifest.model.n_layers * manifest.model.n_heads
    for f in heads:
        payload = HeadPayload.model_validate(read_json(f))
        assert f.stem == payload.head
        for bucket in payload.buckets:
            assert all(0 <= i < len(payload.examples) for i in bucket.examples)
    if (path / "motifs" / "map.json").is_file():
        MotifMap.model_validate(read_json(path / "motifs" / "map.json"))


def test_a_precompute_writes_the_format(tiny_run):
    _check_run(tiny_run())


def test_every_pca_point_has_its_context(tiny_run):
    """The PCA hover needs no stored example: every point of every head carries the tokens
    around its key and its query (ids vocab.json can show), and where its sequence is among
    the head's examples they are that sequence's tokens."""
    run = tiny_run()
    vocab = read_json(run / "vocab.json")
    n_points = n_checked = 0
    for f in sorted((run / "heads").glob("L*H*.json")):
        payload = HeadPayload.model_validate(read_json(f))
        assert payload.pca is not None and payload.pca.points
        examples = {ex.sequence: ex.tokens for ex in payload.examples}
        for point in payload.pca.points:
            n_points += 1
            at = {s.start + i: t for s in point.context for i, t in enumerate(s.tokens)}
            assert point.q_pos in at and point.k_pos in at
            assert all(str(t) in vocab for t in at.values())
            if point.sequence in examples:
                n_checked += 1
                seq = examples[point.sequence]
                assert all(seq[pos] == t for pos, t in at.items())
    assert n_points > 0 and n_checked > 0


def test_a_headvis_import_writes_the_format(tiny_run, tmp_path):
    from headscope.store.headvis import export_headvis, import_headvis

    tree = export_headvis(tiny_run(), tmp_path / "tree")
    _check_run(import_headvis(tree, tmp_path / "imported"))


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m.update(schema_version=SCHEMA_VERSION + 1), "schema_version"),
        (lambda m: m.pop("config"), "config"),
        (lambda m: m.update(status="finished"), "status"),
    ],
)
def test_a_malformed_manifest_is_one_clear_error(tiny_run, tmp_path, edit, needle):
    import shutil

    run = shutil.copytree(tiny_run(), tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    edit(manifest)
    write_json(run / "manifest.json", manifest)
    with pytest.raises(RunError, match=needle):
        open_run(run)


def test_a_malformed_head_file_is_one_clear_error(tiny_run, tmp_path):
    import shutil

    run = shutil.copytree(tiny_run(), tmp_path / "run")
    (run / "heads" / "L0H1.json").write_text('{"head": "L0H1"}')
    with pytest.raises(RunError, match="L0H1.json"):
        open_run(run).head("L0H1")
