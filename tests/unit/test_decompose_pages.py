"""Feature pages of saved decompositions (headscope.decompose.pages) on hand-set one-layer models
(tests/planted.py): the page of an MTC feature moved by the previous-token head names the token
that sent it; QK pages pair the planted query and key tokens; the split page gives each planted
behaviour its own sub-head; the index lists them all and the manifest points at it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from headscope.decompose import (
    capture_layer,
    save_mtc,
    save_qk,
    save_split,
    train_mtc,
    train_qk,
    train_split,
)
from headscope.decompose.pages import INDEX, write_pages
from headscope.files import write_json
from tests.planted import (
    KA,
    KB,
    MOVED,
    MOVED_OUT,
    QA,
    QB,
    XQ,
    YQ,
    moved_feature_model,
    planted_adapter,
    planted_tokens,
    two_head_sum_model,
    two_match_model,
)


def fake_run(root: Path, ids: torch.Tensor, heads: list[str]) -> Path:
    """The parts of a run the pages read: a manifest and each head's stored example sequences."""
    root.mkdir(parents=True)
    write_json(root / "manifest.json", {"schema_version": 1})
    for i, head in enumerate(heads):
        rows = ids[i::2] if len(heads) > 1 else ids
        examples = [
            {"sequence": int(j * len(heads) + i), "tokens": r.tolist(), "max_attention": 0.5}
            for j, r in enumerate(rows)
        ]
        write_json(root / "heads" / f"{head}.json", {"head": head, "examples": examples})
    return root


def test_mtc_page_names_the_source_a_feature_was_moved_from(tmp_path, one_thread):
    adapter = planted_adapter(moved_feature_model())
    train, test = capture_layer(adapter, planted_tokens(80, 24, 40), 0).split(16)
    mtc, stats = train_mtc(train, test, n_features=8, k_moved=8, epochs=40, lr=3e-3)
    f = int(mtc.W_dec.detach()[:, MOVED_OUT].abs().argmax())
    run = fake_run(tmp_path / "run", planted_tokens(12, 24, 40, seed=5), ["L0H0", "L0H1"])
    save_mtc(mtc, run / "decompose" / "mtc-L0" / "mtc", stats.model_dump())

    index = write_pages(adapter, run)
    assert json.loads((run / "manifest.json").read_text())["decompose"] == INDEX
    (entry,) = index.entries
    assert entry.kind == "mtc" and entry.name == "mtc-L0/mtc" and entry.heads == ["L0H0", "L0H1"]
    assert entry.loads_on.get("L0H0", 0) >= 1 and entry.stats["fve"] == stats.fve
    pages = json.loads((run / "decompose" / "mtc-L0" / "mtc" / "pages.json").read_text())
    assert pages["columns"] == ["L0H0", "L0H1", "identity"] and len(pages["contexts"]) == 12
    page = next(p for p in pages["features"] if p["feature"] == f)
    assert page["loading"][0] > 0.7
    toks = [c["tokens"] for c in pages["contexts"]]
    assert page["sources"] and all(
        toks[s["context"]][s["position"]] in MOVED for s in page["sources"]
    )
    # moved by the previous-token head: each destination got it from the token before it
    assert page["destinations"]
    for d in page["destinations"]:
        assert d["source"] == d["position"] - 1, d
        assert toks[d["context"]][d["source"]] in MOVED

    # on one head's example sequences only
    assert write_pages(adapter, run, heads=["L0H0"]).sequences == 6
    pages = json.loads((run / "decompose" / "mtc-L0" / "mtc" / "pages.json").read_text())
    assert [c["sequence"] % 2 for c in pages["contexts"]] == [0] * 6


def test_qk_and_split_pages(tmp_path, one_thread):
    adapter = planted_adapter(two_match_model())
    train, test = capture_layer(adapter, planted_tokens(96, 24, 60), 0).split(16)
    qk, qk_stats = train_qk(train, test, 0, n_features=6, l1=1e-3, epochs=30, lr=1e-2)
    run = fake_run(tmp_path / "qkrun", planted_tokens(16, 24, 60, seed=3), ["L0H0"])
    save_qk(qk, run / "decompose" / "qk-L0H0", qk_stats.model_dump())
    (entry,) = write_pages(adapter, run).entries
    assert entry.kind == "qk" and entry.heads == ["L0H0"] and entry.pages == "qk-L0H0/pages.json"
    pages = json.loads((run / "decompose" / "qk-L0H0" / "pages.json").read_text())
    toks = [c["tokens"] for c in pages["contexts"]]
    found = set()
    for feat in pages["report"]["features"][:2]:
        qs = {toks[p["context"]][p["query"]] for p in feat["pairs"]}
        ks = {toks[p["context"]][p["key"]] for p in feat["pairs"]}
        for name, q_set, k_set in (("A", QA, KA), ("B", QB, KB)):
            if qs and qs <= set(q_set) and ks <= set(k_set):
                found.add(name)
    assert found == {"A", "B"}

    adapter = planted_adapter(two_head_sum_model())
    train, test = capture_layer(adapter, planted_tokens(96, 24, 60), 0).split(16)
    split, split_stats = train_split(adapter, train, test, [0], 2, epochs=40, lr=1e-2)
    run = fake_run(tmp_path / "splitrun", planted_tokens(16, 24, 60, seed=4), ["L0H0"])
    save_split(split, run / "decompose" / "split-L0H0", split_stats.model_dump())
    (entry,) = write_pages(adapter, run).entries
    assert entry.kind == "split" and entry.loads_on == {"L0H0": 1}
    pages = json.loads((run / "decompose" / "split-L0H0" / "pages.json").read_text())
    assert pages["head"] == "L0H0" and pages["fve"] > 0.98
    assert len(pages["examples"]) == 16
    by_kind: dict[str, list[int]] = {"x": [], "y": []}
    for ex in pages["examples"]:
        ids = pages["contexts"][ex["context"]]["tokens"]
        assert len(ex["top"]) == len(ids) == len(ex["share"]) == len(ex["norm"])
        assert abs(sum(ex["output_share"]) - 1) < 1e-3
        for t, sub in zip(ids[1:], ex["top"][1:], strict=True):
            if t in XQ:
                by_kind["x"].append(sub)
            elif t in YQ:
                by_kind["y"].append(sub)
    x = max(set(by_kind["x"]), key=by_kind["x"].count)
    y = max(set(by_kind["y"]), key=by_kind["y"].count)
    assert x != y
    assert by_kind["x"].count(x) > 0.85 * len(by_kind["x"])
    assert by_kind["y"].count(y) > 0.85 * len(by_kind["y"])


def test_save_load_save_writes_the_same_bytes(tmp_path, one_thread):
    """Saved folders round-trip bit-identically: saving what was loaded rewrites every file
    byte for byte (the pages read exactly what training wrote)."""
    from headscope.decompose import load_mtc, load_qk, load_split

    adapter = planted_adapter(two_head_sum_model())
    train, test = capture_layer(adapter, planted_tokens(24, 24, 60), 0).split(8)
    mtc, mtc_stats = train_mtc(train, test, n_features=8, k_moved=4, epochs=1)
    qk, qk_stats = train_qk(train, test, 0, n_features=4, rank=2, epochs=1)
    split, split_stats = train_split(adapter, train, test, [0], 2, epochs=1)
    for name, obj, stats, save, load in (
        ("mtc", mtc, mtc_stats, save_mtc, load_mtc),
        ("qk", qk, qk_stats, save_qk, load_qk),
        ("split", split, split_stats, save_split, load_split),
    ):
        first, second = tmp_path / f"{name}1", tmp_path / f"{name}2"
        save(obj, first, stats.model_dump())
        save(load(first), second, stats.model_dump())
        for f in ("cfg.json", "weights.safetensors", "stats.json"):
            assert (first / f).read_bytes() == (second / f).read_bytes(), (name, f)
