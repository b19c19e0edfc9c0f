"""Heads of several runs in one motif space: fitting, cross-run nearest heads, the joint map."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from headscope.cli import main
from headscope.errors import DataError, InputError
from headscope.files import write_npy
from headscope.precompute.motif_space import (
    ACROSS_FILE,
    FEATURES_FILE,
    AcrossMaps,
    energy_distances,
    fit_space,
    map_across,
    similar_across,
)
from headscope.store.run import open_run


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    """A tiny run and a copy whose heads are a known permutation of its heads."""
    a = tiny_run(motif_sequences=6)
    feats = np.load(a / FEATURES_FILE)
    assert feats.shape[0] == 12 and feats.shape[1] == 6
    perm = np.random.default_rng(0).permutation(feats.shape[0])
    b = shutil.copytree(a, tmp_path_factory.mktemp("perm") / "permuted")
    write_npy(b / FEATURES_FILE, feats[perm])  # head j of b is head perm[j] of a
    return a, b, perm


def test_energy_distance_is_zero_only_for_the_same_distribution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 4, generator=g)
    d = energy_distances(x, torch.cat([x, x[:1] + 3.0]))
    assert torch.allclose(d.diagonal()[:3], torch.zeros(3, dtype=torch.float64), atol=1e-9)
    assert (d[:, 3] > 1.0).all()


def test_similar_across_finds_each_head_in_the_permuted_run(runs):
    a, b, perm = runs
    names = [f"L{i // 4}H{i % 4}" for i in range(12)]
    for i in (0, 5, 11):
        out = similar_across(a, names[i], b, top=3)
        j = int(np.where(perm == i)[0][0])  # where head i of a went in b
        assert out.nearest[0].head == names[j], out
        assert out.nearest[0].distance == pytest.approx(0.0, abs=1e-6)


def test_a_saved_space_gives_the_same_answer_and_a_map_covers_every_head(runs, tmp_path):
    a, b, _ = runs
    space = fit_space([a, b], tmp_path / "space.safetensors")
    with_space = similar_across(a, "L1H2", b, space=space, top=12)
    assert len(with_space.nearest) == 12 and with_space.nearest[0].distance < 1e-6
    m = map_across([a, b], space=space, method="isomap", n_neighbors=5)
    assert len(m.heads) == len(m.coords) == 24 and all(len(c) == 2 for c in m.coords)
    assert m.heads[0].endswith(":L0H0") and m.heads[12].startswith("permuted:")


def test_the_saved_joint_map_finds_each_head_in_the_other_run(runs, tmp_path, capsys):
    a0, b0, perm = runs
    a = shutil.copytree(a0, tmp_path / "a")  # the session's tiny run stays untouched
    b = shutil.copytree(b0, tmp_path / "b")
    assert main(["motifs", "map", str(a), str(b), "--save"]) == 0
    assert "across.json" in capsys.readouterr().out
    names = [f"L{i // 4}H{i % 4}" for i in range(12)]
    for run, this, other in ((a, 0, "b"), (b, 1, "a")):
        m = AcrossMaps.model_validate_json((run / ACROSS_FILE).read_text())
        assert m.runs == ["a", "b"] and m.this_run == this and m.heads == [names, names]
        assert {"isomap:5", "tsne:15"} <= set(m.maps)
        assert open_run(run).manifest["across"] == ACROSS_FILE
        assert all(len(xy) == 24 for xy in m.maps.values())
        for i, head in enumerate(names):
            near = m.nearest[head][other][0]
            # head j of b is head perm[j] of a
            j = int(np.where(perm == i)[0][0]) if this == 0 else int(perm[i])
            assert near.head == names[j] and near.distance < 1e-6, (head, near)


def test_bad_inputs_are_one_line(runs, tmp_path, capsys):
    a, b, _ = runs
    with pytest.raises(InputError, match="L9H9"):
        similar_across(a, "L9H9", b)
    old = shutil.copytree(a, tmp_path / "old")
    (old / FEATURES_FILE).unlink()
    with pytest.raises(DataError, match="re-run"):
        similar_across(old, "L0H0", b)
    assert main(["similar", "no-colon", str(b)]) == 2
    assert main(["motifs", "map", str(a), "--save"]) == 2
    assert main(["similar", f"{a}:L0H1", str(b), "--top", "2"]) == 0
    assert "L0H1" in capsys.readouterr().out
