"""HeadVis interchange (docs/headvis-format.md).

``tests/fixtures/headvis_peer/`` was written by Neuronpedia's HeadVis writer itself
(``compute-head-metrics.py`` of github.com/hijohnnylin/neuronpedia at commit ebb8426, unmodified,
on the tiny llama of ``tests/tiny_models.py``: 72 sequences of 10 tokens, 3 intervals, 2 keys per
query row). It must import with every head and every value.

The other direction was checked once by running Neuronpedia's loaders (``load-head-metrics.py``
and ``load-head-sequences.py`` at the same commit, database calls stubbed) on headscope's export
of the tiny run below: both found the tree, ``_read_run_config`` found every key they require
(model_name, dataset_name, n_sequences, seq_len, dtype, attn_implementation), the metrics loader
built one row per scatter record with every column set, and the sequence loader built one row
per sampled sequence, its flat attention indices decoding to keys at or before their queries.
:func:`check_neuronpedia_tree` checks the same fields and types with our own code, on the peer's
tree (so the check is right) and on our export (so the export passes it).
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from headscope.files import read_json
from headscope.store import open_run
from headscope.store.headvis import export_headvis, import_headvis

N_SEQUENCES = 12
PEER = Path(__file__).parent.parent / "fixtures" / "headvis_peer"


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    return tiny_run(sequences=N_SEQUENCES, motif_sequences=6)


@pytest.fixture(scope="module")
def tree(run, tmp_path_factory) -> Path:
    return export_headvis(run, tmp_path_factory.mktemp("export") / "tree")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _buckets(payload: dict) -> list[tuple]:
    return [(b["lo"], b["hi"], b["examples"]) for b in payload["buckets"]]


def _decode(s: dict) -> list[list]:
    """A head file's sequence's flat sparse pattern as [[query, key, weight], ...]."""
    n, idx, val = len(s["tokens"]), s["attention_indices"], s["attention_values"]
    return [[i // n, i % n, w] for i, w in zip(idx, val, strict=True)]


# ------------------------------------------------------- what Neuronpedia's readers read


def check_neuronpedia_tree(tree: Path) -> dict:
    """Every field Neuronpedia's frontend config and its two loaders read, with its type."""
    config = read_json(tree / "config.json")
    merged = {**config, **config.get("pipeline_config", {})}  # as the loaders merge them
    for key in ("model_name", "dataset_name", "dtype", "attn_implementation"):
        assert isinstance(merged[key], str), key
    for key in ("n_sequences", "seq_len", "n_layers", "n_heads", "n_intervals"):
        assert _int(merged[key]) and merged[key] >= 1, key
    assert config.get("np_model_id") is None or isinstance(config["np_model_id"], str)
    assert all(isinstance(m, str) for m in config["metrics"])
    assert set(config["metric_descriptions"]) == set(config["metrics"])
    assert config["head_data_pattern"] == "L{layer}H{head}.json"
    assert config["has_umap"] is False and config["umap_heads"] == []
    for item in config["custom_plots"] + config["custom_tables"]:
        assert set(item) == {"key", "label"}
    assert set(config["statistics_display"]) == {"n_samples", "mean_max_activation"}
    heads = [tuple(h) for h in config["heads"]]
    assert all(len(h) == 2 and _int(h[0]) and _int(h[1]) for h in heads)
    assert read_json(tree / "server_config.json") == {}
    assert read_json(tree / "attributions" / "manifest.json") == {}

    scatter = read_json(tree / "scatter_data.json")
    assert [(r["layer"], r["head"]) for r in scatter] == heads
    assert all(r[m] is None or _num(r[m]) for r in scatter for m in config["metrics"])
    on_disk = {p.name for p in (tree / "heads").glob("*.json")}
    assert on_disk == {f"L{layer}H{h}.json" for layer, h in heads}

    for layer, h in heads:
        head = read_json(tree / "heads" / f"L{layer}H{h}.json")
        where = f"L{layer}H{h}"
        for key in ("qk_distance_histogram", "histogram"):  # a run may have no histogram
            hist = head[key] if key == "qk_distance_histogram" else head.get(key)
            if hist is not None:
                assert len(hist["bin_values"]) == len(hist["bin_edges"]) - 1, (where, key)
                assert all(_num(x) for x in hist["bin_edges"] + hist["bin_values"]), where
        assert all(_int(c) for c in head.get("histogram", {}).get("bin_values", []))
        for key in ("top_query_tokens", "top_key_tokens"):
            for row in head[key]:
                assert isinstance(row["token"], str) and _num(row["weight"]), (where, row)
        stats = head["statistics"]
        assert stats["n_samples"] == len(head["sequences"]), where
        assert stats["mean_max_activation"] is None or _num(stats["mean_max_activation"])
        for s in head["sequences"]:
            n = len(s["tokens"])
            assert all(isinstance(t, str) for t in s["tokens"]) and s["seq_len"] == n, where
            assert _int(s["sequence_id"]) and 1 <= s["interval"] <= config["n_intervals"]
            assert _num(s["max_activation"]) and 0 <= s["max_activation"] <= 1
            idx, val = s["attention_indices"], s["attention_values"]
            assert len(idx) == len(val), where
            assert all(_int(i) and 0 <= i < n * n and i % n <= i // n for i in idx), where
            assert all(_num(w) and 0 <= w <= 1 for w in val), where
    return config


def _canonical(value) -> bool:
    """Sorted keys everywhere; every float already at 6 significant digits."""
    if isinstance(value, dict):
        return list(value) == sorted(value) and all(_canonical(v) for v in value.values())
    if isinstance(value, list):
        return all(_canonical(v) for v in value)
    return not isinstance(value, float) or float(f"{value:.6g}") == value


def test_export_has_what_neuronpedia_reads(run, tree):
    config = check_neuronpedia_tree(tree)
    peer_config = read_json(PEER / "config.json")
    assert set(peer_config) - {"np_model_id"} <= set(config), "the peer's config fields"
    peer_head = read_json(PEER / "heads" / "L0H0.json")
    head = read_json(tree / "heads" / "L1H2.json")
    assert set(peer_head) <= set(head)
    assert set(peer_head["sequences"][0]) <= set(head["sequences"][0])
    assert set(head["statistics"]) == set(peer_head["statistics"])
    for f in ("config.json", "scatter_data.json", "heads/L1H2.json"):
        assert _canonical(read_json(tree / f)), f

    r = open_run(run)
    m = r.metrics
    assert len(config["heads"]) == len(m) == 12
    assert config["metrics"] == list(m.columns[3:])
    assert config["metric_descriptions"] == r.metric_docs
    assert config["headscope"]["model"]["architecture"] == "llama"
    assert config["pipeline_config"]["n_sequences"] == N_SEQUENCES
    assert config["pipeline_config"]["seq_len"] == 48
    assert config["n_intervals"] == 10
    rec = read_json(tree / "scatter_data.json")[5]
    row = m[(m.layer == rec["layer"]) & (m["head"] == rec["head"])].iloc[0]
    for name in m.columns[3:]:
        assert rec[name] == pytest.approx(row[name], rel=1e-5, abs=1e-12)

    # intervals count from the lowest; token strings from vocab.json; the run's sparse pattern
    vocab = read_json(run / "vocab.json")
    payload = r.head("L1H2")
    n = len(payload["buckets"])
    assert head["interval_bounds"] == [[b["lo"], b["hi"]] for b in reversed(payload["buckets"])]
    for b, bucket in enumerate(payload["buckets"]):
        for i in bucket["examples"]:
            ex = payload["examples"][i]
            s = next(s for s in head["sequences"] if s["sequence_id"] == ex["sequence"])
            assert s["interval"] == n - b
            assert s["tokens"] == [vocab[str(t)] for t in ex["tokens"]]
            assert _decode(s) == sorted(ex["sparse"])
    # the attention-weighted distance histogram holds all of the sparse attention
    total = sum(w for s in head["sequences"] for w in s["attention_values"])
    assert sum(head["qk_distance_histogram"]["bin_values"]) == pytest.approx(total, rel=1e-4)
    assert head["histogram"]["bin_values"] == payload["histogram"]["counts"]
    assert sum(head["histogram"]["bin_values"]) == N_SEQUENCES
    top = payload["top_query_tokens"][0]
    want = {"token": top["token"], "weight": top["mass"], "count": top["count"]}
    assert head["top_query_tokens"][0] == want


# ------------------------------------------------------------------ the peer's tree


def test_peer_tree_imports_with_every_head(tmp_path):
    check_neuronpedia_tree(PEER)  # the check of the export below holds for the real thing
    r = open_run(out := import_headvis(PEER, tmp_path / "run"))
    config = read_json(PEER / "config.json")
    scatter = read_json(PEER / "scatter_data.json")
    assert list(r.metrics.columns) == ["layer", "head", "name", *config["metrics"]]
    for rec, row in zip(scatter, r.metrics.to_dict("records"), strict=True):
        assert {k: row[k] for k in rec} == rec, "metrics equal scatter_data.json"
    assert r.metric_docs == config["metric_descriptions"]
    assert r.manifest["model"] == {"name": "headscope/tiny-llama", "n_layers": 3, "n_heads": 4}
    assert r.manifest["dataset"] == {"name": "headscope/test-texts"}
    assert r.manifest["config"]["pipeline_config"] == config["pipeline_config"]

    vocab = read_json(out / "vocab.json")
    assert list(vocab.values()) == sorted(vocab.values())
    for layer, h in config["heads"]:
        name = f"L{layer}H{h}"
        peer = read_json(PEER / "heads" / f"{name}.json")
        p = r.head(name)
        assert len(p["buckets"]) == config["n_intervals"]
        hist = peer["histogram"]
        assert p["histogram"] == {"edges": hist["bin_edges"], "counts": hist["bin_values"]}
        assert p["mean_max_attention"] == peer["statistics"]["mean_max_activation"]
        for interval, bucket in zip(range(3, 0, -1), p["buckets"], strict=True):
            sent = [s for s in peer["sequences"] if s["interval"] == interval]
            got = [p["examples"][i] for i in bucket["examples"]]
            assert [e["sequence"] for e in got] == [s["sequence_id"] for s in sent]
            for e, s in zip(got, sent, strict=True):
                assert [vocab[str(t)] for t in e["tokens"]] == s["tokens"]
                assert e["sparse"] == _decode(s)
                assert e["max_attention"] == s["max_activation"]
                assert bucket["lo"] <= e["max_attention"] <= bucket["hi"]
        assert p["buckets"][0]["hi"] == 1.0 and p["buckets"][-1]["lo"] == 0.0
        for upper, lower in zip(p["buckets"], p["buckets"][1:], strict=False):
            assert lower["hi"] == upper["lo"], "contiguous, highest first"
        # a peer's weight is a total over the sampled sequences: mass is its per-occurrence mean
        occurrences = Counter(t for s in peer["sequences"] for t in s["tokens"])
        for row, sent in zip(p["top_key_tokens"], peer["top_key_tokens"], strict=True):
            assert row["token"] == sent["token"] and row["count"] == occurrences[sent["token"]]
            assert row["mass"] * row["count"] == pytest.approx(sent["weight"])

    # L1H0 sampled nothing in interval 2: an empty, zero-width bucket between its neighbours
    buckets = r.head("L1H0")["buckets"]
    assert [len(b["examples"]) for b in buckets] == [2, 0, 1]
    assert buckets[1]["lo"] == buckets[1]["hi"] == buckets[0]["lo"]

    # its export keeps what the Neuronpedia loaders read, and then round-trips exactly
    t1 = export_headvis(out, tmp_path / "t1")
    c1 = check_neuronpedia_tree(t1)
    assert c1["pipeline_config"] == config["pipeline_config"]
    assert c1["np_model_id"] == "tiny-llama" and c1["model_name"] == "headscope/tiny-llama"
    assert read_json(t1 / "scatter_data.json") == scatter
    t2 = export_headvis(import_headvis(t1, tmp_path / "run2"), tmp_path / "t2")
    assert _files(t2) == _files(t1)


def _peer_files() -> dict[str, object]:
    return {p.relative_to(PEER).as_posix(): read_json(p) for p in PEER.rglob("*.json")}


def test_peer_tree_with_attention_free_layers_and_a_null_metric(tmp_path):
    """Hybrid models (linear-attention layers between softmax ones) have no heads in some
    layers; a metric the writer could not compute is null."""
    files = {k: v for k, v in _peer_files().items() if not k.startswith("heads/L1H")}
    files["config.json"]["heads"] = [h for h in files["config.json"]["heads"] if h[0] != 1]
    files["config.json"]["pipeline_config"]["attention_layer_indices"] = [0, 2]
    files["scatter_data.json"] = [r for r in files["scatter_data.json"] if r["layer"] != 1]
    files["scatter_data.json"][0]["induction_score"] = None
    r = open_run(import_headvis(_write_tree(tmp_path / "peer", files), tmp_path / "run"))
    assert r.manifest["layers"] == [0, 2] and r.manifest["model"]["n_layers"] == 3
    assert r.metrics["name"].tolist() == [f"L{a}H{b}" for a in (0, 2) for b in range(4)]
    assert math.isnan(r.metrics["induction_score"][0])
    assert read_json(r.path / "metrics.json")["rows"][0][-1] is None
    assert r.head("L0H0")["metrics"]["induction_score"] is None
    out = export_headvis(r.path, tmp_path / "tree")
    assert read_json(out / "scatter_data.json")[0]["induction_score"] is None
    assert read_json(out / "config.json")["heads"][4] == [2, 0]


# ----------------------------------------------------------------------------- a real run


def test_export_is_deterministic_and_replaces_an_old_export(run, tree, tmp_path):
    again = export_headvis(run, tmp_path / "again")
    assert _files(again) == _files(tree)
    (again / "heads" / "L9H9.json").write_text("{}")  # a stale file from some older export
    export_headvis(run, again)
    assert _files(again) == _files(tree)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"], "no temporary dirs left"


def test_export_refuses_a_directory_that_is_not_a_tree(run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a HeadVis tree"):
        export_headvis(run, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_round_trip_is_byte_identical(run, tree, tmp_path):
    run2 = import_headvis(tree, tmp_path / "run2")
    tree2 = export_headvis(run2, tmp_path / "tree2")
    assert _files(tree2) == _files(tree)

    r1, r2 = open_run(run), open_run(run2)
    assert r2.manifest["config"]["imported_from"] == str(tree)
    assert r2.manifest["config"]["precompute"] == r1.manifest["config"]
    assert r2.manifest["model"] == r1.manifest["model"]
    assert list(r2.metrics.columns) == list(r1.metrics.columns)
    ids = ["layer", "head", "name"]
    assert (r2.metrics[ids] == r1.metrics[ids]).all(axis=None)
    for name in r1.metrics.columns[3:]:
        assert r2.metrics[name].tolist() == pytest.approx(r1.metrics[name].tolist(), rel=1e-5)
    assert r2.metric_docs == r1.metric_docs

    vocab2 = read_json(run2 / "vocab.json")
    assert list(vocab2.values()) == sorted(vocab2.values()), "ids in sorted string order"
    vocab1 = read_json(run / "vocab.json")
    for name in ("L0H0", "L1H2", "L2H3"):
        p1, p2 = r1.head(name), r2.head(name)
        assert _buckets(p2) == _buckets(p1)
        assert p2["histogram"] == p1["histogram"]
        assert p2["pca"] == {} and p2["similar"] == [] and p2["curves"] == {}
        rows = [
            [(r["token"], r["mass"], r["count"]) for r in p["top_query_tokens"]] for p in (p1, p2)
        ]
        assert rows[0] == rows[1]
        assert all(vocab2[str(r["id"])] == r["token"] for r in p2["top_key_tokens"])
        for e1, e2 in zip(p1["examples"], p2["examples"], strict=True):
            assert e2["sequence"] == e1["sequence"] and e2["sparse"] == sorted(e1["sparse"])
            assert e2["doc_starts"] == e1["doc_starts"]
            assert [vocab2[str(t)] for t in e2["tokens"]] == [vocab1[str(t)] for t in e1["tokens"]]
            # derived from the sparse pattern: never above the run's maxima (stored to 0.01)
            for key in ("max_as_query", "max_as_key"):
                pairs = zip(e2[key], e1[key], strict=True)
                assert all(d <= x + 0.005 + 1e-9 for d, x in pairs), key
            assert max(e2["max_as_query"]) == pytest.approx(max(e1["max_as_query"]), abs=0.006)


# ------------------------------------------------------------------- older trees


def _older_files() -> dict[str, object]:
    """The older layout: model and dataset as strings, metrics as names, numbers as strings,
    ``{l}_{h}`` file names, deciles lowest first with lo/hi keys, some heads without histogram or
    top tokens, no sequence indices or max attention, one head's metrics only in its own file."""
    seq_a = {
        "tokens": ["<bos>", "The", " cat", " The", " cat"],
        "attention": [["0", "0", "1"], [1, 0, 0.9], [2, 1, 0.8], [3, 0, 0.5], [4, 2, "0.75"]],
    }
    seq_b = {"tokens": ["<bos>", "a", "b"], "attention": [[0, 0, 1.0], [1, 1, 0.3], [2, 0, 0.9]]}

    def head(layer, h, *, hist=True, top=True, stats=None):
        low = {"lo": 0.0, "hi": 0.5, "sequences": [seq_b]}
        high = {"lo": "0.5", "hi": "1", "sequences": [seq_a]}
        d = {"layer": layer, "head": str(h), "statistics": stats or {}, "deciles": [low, high]}
        d = copy.deepcopy(d)
        if hist:
            d["histogram"] = {"edges": [0, 0.5, 1], "counts": ["1", 1]}
        if top:
            d["top_query_tokens"] = [{"token": " cat", "mean_attention": "0.8", "count": 2}]
            d["top_key_tokens"] = [{"token": "The", "mass": 0.65, "count": "2"}]
        return d

    return {
        "config.json": {
            "model": "gpt2-small",
            "dataset": "openwebtext",
            "metrics": ["prev_token_score", {"name": "induction_score", "description": "copy"}],
            "n_layers": "2",
            "n_heads": 2,
            "heads": ["0_0", "0_1", "L1H0", [1, 1]],
        },
        "scatter_data.json": [
            {"layer": "0", "head": "0", "prev_token_score": "0.9", "induction_score": 0.1},
            {"layer": 0, "head": 1, "prev_token_score": 0.2, "induction_score": 0.7},
            {"id": "L1H0", "prev_token_score": 0.3, "induction_score": 0.4},
        ],
        "heads/0_0.json": head(0, 0),
        "heads/0_1.json": head(0, 1, hist=False),
        "heads/L1H0.json": head(1, 0, top=False),
        "heads/1_1.json": head(1, 1, stats={"prev_token_score": "0.05", "induction_score": 0.95}),
    }


def _write_tree(root: Path, files: dict[str, object]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return root


def test_import_a_tree_in_the_older_layout(tmp_path):
    tree = _write_tree(tmp_path / "np", _older_files())
    run = open_run(out := import_headvis(tree, tmp_path / "run"))
    m = run.metrics
    assert list(m.columns) == ["layer", "head", "name", "prev_token_score", "induction_score"]
    assert m["name"].tolist() == ["L0H0", "L0H1", "L1H0", "L1H1"]
    assert m.iloc[:, 3:].values.T.tolist() == [[0.9, 0.2, 0.3, 0.05], [0.1, 0.7, 0.4, 0.95]]
    assert run.metric_docs == {"prev_token_score": "", "induction_score": "copy"}
    assert run.manifest["model"] == {"name": "gpt2-small", "n_layers": 2, "n_heads": 2}
    assert run.manifest["dataset"] == {"name": "openwebtext"}, "strings become names"
    assert run.manifest["config"] == {"imported_from": str(tree)}
    assert read_json(out / "metrics.json")["rows"][3] == [1, 1, 0.05, 0.95]

    vocab = read_json(out / "vocab.json")
    strings = sorted(["<bos>", "The", " cat", " The", "a", "b"])
    assert vocab == {str(i): s for i, s in enumerate(strings)}
    ids = {s: int(i) for i, s in vocab.items()}
    p = run.head("L0H0")
    assert _buckets(p) == [(0.5, 1.0, [0]), (0.0, 0.5, [1])]
    a, b = p["examples"]
    assert a["tokens"] == [ids[t] for t in ["<bos>", "The", " cat", " The", " cat"]]
    assert a["sparse"] == [[0, 0, 1.0], [1, 0, 0.9], [2, 1, 0.8], [3, 0, 0.5], [4, 2, 0.75]]
    assert a["max_attention"] == 0.8  # derived: queries >= 1, keys 1..q
    assert (a["max_as_query"], a["max_as_key"]) == ([0, 0, 0.8, 0, 0.75], [0.9, 0.8, 0.75, 0, 0])
    assert a["doc_starts"] == [] and b["doc_starts"] == []
    assert (a["sequence"], b["sequence"]) == (0, 1), "numbered by first appearance"
    assert run.head("L1H1")["examples"][0]["sequence"] == 0, "same tokens, same number"
    assert p["histogram"] == {"edges": [0.0, 0.5, 1.0], "counts": [1, 1]}
    assert p["top_query_tokens"] == [{"token": " cat", "id": ids[" cat"], "mass": 0.8, "count": 2}]
    assert "histogram" not in run.head("L0H1")
    assert run.head("L1H0")["top_query_tokens"] == []

    # the imported run exports in the peer's layout
    check_neuronpedia_tree(export_headvis(out, tmp_path / "tree"))


def test_import_replaces_an_earlier_import_but_nothing_else(tmp_path):
    files = _older_files()
    out = import_headvis(_write_tree(tmp_path / "np", files), tmp_path / "run")
    del files["config.json"]["metrics"]  # then the metrics are the numeric scatter fields
    import_headvis(_write_tree(tmp_path / "np", files), out)
    assert list(open_run(out).metrics.columns[3:]) == ["induction_score", "prev_token_score"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a run imported from HeadVis"):
        import_headvis(tmp_path / "np", other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------ malformed trees


def _malform(files: dict, spec: str) -> None:
    """Apply ``"FILE:a.0.b = JSON"``: set the value at that path in FILE (``-`` removes it, one
    past a list's end appends, no path replaces the whole file with the text)."""
    target, value = spec.split(" = ", 1)
    file, _, path = target.partition(":")
    if not path:
        files.pop(file) if value == "-" else files.__setitem__(file, value)
        return
    *parents, last = [int(p) if p.lstrip("-").isdigit() else p for p in path.split(".")]
    node = files[file]
    for p in parents:
        node = node[p]
    if value == "-":
        del node[last]
    elif isinstance(node, list) and last == len(node):
        node.append(json.loads(value))
    else:
        node[last] = json.loads(value)


_SEQ = "heads/L0H1.json:sequences.0"
_OLD = "heads/0_1.json:deciles.1.sequences.0"
MALFORMED = {  # "TREE FILE:PATH = VALUE" -> the error, after the file's name
    f"peer {_SEQ}.attention_indices.2 = 100": r" at sequences\[0\]: attention_indices\[2\] = "
    r"100 is outside the 10 x 10 pattern",
    f"peer {_SEQ}.attention_indices.1 = 1": r"attention_indices\[1\]: key position 1 comes "
    r"after query position 0 \(causal attention\)",
    f"peer {_SEQ}.attention_values.-1 = -": r"19 attention_indices but 18 attention_values",
    f"peer {_SEQ}.seq_len = 12": r"seq_len 12 is not the number of tokens \(10\)",
    f"peer {_SEQ}.interval = 4": r"\.interval: 4 is above the tree's n_intervals \(3\)",
    f"peer {_SEQ}.tokens = -": r" at sequences\[0\]\.tokens: required field missing",
    "peer heads/L0H1.json:histogram.bin_values.-1 = -": r"51 bin edges need 50 bin values",
    'peer scatter_data.json:1.induction_score = "x"': r"\[1\]\.induction_score: .*number",
    "peer scatter_data.json:0.layer = -": r"\[0\]: a scatter record needs 'layer' and 'head'",
    'peer config.json:heads.0 = "first"': r"heads\[0\]: cannot read a head id from 'first'",
    "older config.json = -": r"np: no config\.json",
    'older heads/0_1.json = {"deciles": [': r"0_1\.json: not valid JSON",
    f"older {_OLD}.attention.2 = [5, 1, 0.5]": r"query position 5 is outside the sequence's",
    f"older {_OLD}.attention.2 = [2, 3, 0.5]": r"key position 3 comes after query position 2",
    f"older {_OLD}.attention.2 = [2, 1, 1.5]": r"attention weight 1\.5 is outside \[0, 1\]",
    f"older {_OLD}.attention.2 = [2, 1]": r"attention\[2\]: expected a \[query, key, weight\]",
    f"older {_OLD}.tokens.1 = 17": r"sequences\[0\]\.tokens\[1\]: Input should be a valid string",
    "older heads/0_1.json = -": r"head L0H1 has no file \(looked for heads/L0H1\.json and",
    "older scatter_data.json:1.induction_score = -": r"no value for metric 'induction_score'",
    "older heads/0_1.json:deciles.0.hi = 1.5": r"decile interval \[0\.0, 1\.5\] is not inside",
    "older heads/0_1.json:layer = 1": r"0_1\.json at layer: says 1, but the file is L0H1",
    'older config.json:heads.4 = "L5H0"': r"head L5H0 is outside 2 layers x 2 heads",
}


@pytest.mark.parametrize("spec", list(MALFORMED))
def test_malformed_trees_fail_clearly_and_write_nothing(tmp_path, spec):
    which, _, change = spec.partition(" ")
    files = _peer_files() if which == "peer" else _older_files()
    _malform(files, change)
    tree = _write_tree(tmp_path / "np", files)
    with pytest.raises(ValueError, match=MALFORMED[spec]) as e:
        import_headvis(tree, tmp_path / "out" / "run")
    assert "\n" not in str(e.value), "one line"
    assert Path(change.split(":")[0].split(" = ")[0]).name in str(e.value), "names the file"
    assert not (tmp_path / "out" / "run").exists()
    leftovers = list((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert leftovers == [], "no temporary directory left behind"
