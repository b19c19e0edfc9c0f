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
