"""HeadVis interchange (docs/headvis-format.md): the export of a real tiny run matches the format,
is deterministic and survives export -> import -> export byte for byte; hand-written trees with a
published export's variations import; malformed trees fail clearly and leave nothing behind."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from headscope.precompute.config import PrecomputeConfig
from headscope.precompute.runner import run_precompute
from headscope.store import open_run
from headscope.store.files import read_json
from headscope.store.headvis import export_headvis, import_headvis
from tests.tiny_models import save_tiny, write_texts

N_SEQUENCES = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("headvis")
    model = save_tiny("llama", root / "model")
    data = write_texts(root / "data.jsonl")
    cfg = PrecomputeConfig(
        model=str(model),
        data=str(data),
        sequences=N_SEQUENCES,
        seq_len=48,
        batch_size=2,
        motif_sequences=6,
        pca_pairs=16,
        probe_sequences=2,
        probe_length=12,
    )
    return run_precompute(cfg, root / "run", progress=False)


@pytest.fixture(scope="module")
def tree(run, tmp_path_factory) -> Path:
    return export_headvis(run, tmp_path_factory.mktemp("export") / "tree")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------- the format, as schema

NUM = "number"  # int or float, never bool


class Map:
    """An object with any string keys, every value matching ``schema``."""

    def __init__(self, schema):
        self.schema = schema


def check(value, schema, where: str = "$") -> None:
    """A small JSON-schema: a type, ``[item_schema]``, ``Map(schema)``, ``dict`` (any object) or
    ``{"key": schema, "key?": optional}`` (no other keys allowed)."""
    if schema == NUM:
        assert isinstance(value, int | float) and not isinstance(value, bool), where
        assert math.isfinite(value), where
    elif schema is dict:
        assert isinstance(value, dict), where
    elif isinstance(schema, type):
        assert isinstance(value, schema) and not isinstance(value, bool), where
    elif isinstance(schema, list):
        assert isinstance(value, list), where
        for i, v in enumerate(value):
            check(v, schema[0], f"{where}[{i}]")
    elif isinstance(schema, Map):
        assert isinstance(value, dict), where
        for k, v in value.items():
            check(v, schema.schema, f"{where}.{k}")
    else:
        assert isinstance(value, dict), where
        required = {k for k in schema if not k.endswith("?")}
        allowed = {k.rstrip("?"): s for k, s in schema.items()}
        assert required <= set(value), f"{where}: missing {sorted(required - set(value))}"
        assert set(value) <= set(allowed), f"{where}: unknown {sorted(set(value) - set(allowed))}"
        for k, v in value.items():
            check(v, allowed[k], f"{where}.{k}")


CONFIG = {
    "format": str,
    "format_version": int,
    "model": dict,
    "dataset": dict,
    "tokens?": dict,
    "precompute?": dict,
    "metrics": [{"name": str, "description": str}],
    "n_layers": int,
    "n_heads": int,
    "heads": [str],
}
TOKEN_ROW = {"token": str, "mass": NUM, "count": int}
SEQUENCE = {
    "sequence_index": int,
    "tokens": [str],
    "max_attention": NUM,
    "doc_starts": [int],
    "sparse_attention": [[NUM]],
}
HEAD = {
    "id": str,
    "layer": int,
    "head": int,
    "statistics": Map(NUM),
    "histogram?": {"bin_edges": [NUM], "counts": [int]},
    "top_query_tokens": [TOKEN_ROW],
    "top_key_tokens": [TOKEN_ROW],
    "deciles": [{"interval": [NUM], "sequences": [SEQUENCE]}],
}


def _canonical(value, where: str = "$") -> None:
    """Sorted keys everywhere; every float already at 6 significant digits."""
    if isinstance(value, dict):
        assert list(value) == sorted(value), f"{where}: keys not sorted"
        for k, v in value.items():
            _canonical(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _canonical(v, f"{where}[{i}]")
    elif isinstance(value, float):
        assert float(f"{value:.6g}") == value, f"{where}: {value} has more than 6 digits"


def validate_tree(tree: Path, *, n_sequences: int | None = None) -> dict:
    """Every file of a HeadVis tree against the format; returns the parsed config."""
    config = read_json(tree / "config.json")
    check(config, CONFIG, "config.json")
    assert config["format"] == "headvis" and config["format_version"] == 1
    model = config["model"]
    assert (model["n_layers"], model["n_heads"]) == (config["n_layers"], config["n_heads"])
    metrics = [m["name"] for m in config["metrics"]]
    assert len(set(metrics)) == len(metrics) and metrics

    scatter = read_json(tree / "scatter_data.json")
    check(scatter, [Map(NUM)], "scatter_data.json")
    by_head = {f"L{r['layer']}H{r['head']}": r for r in scatter}
    assert list(by_head) == config["heads"], "one scatter record per head, in config order"
    heads_on_disk = {p.stem for p in (tree / "heads").glob("*.json")}
    assert heads_on_disk == set(config["heads"]), "every head in config has a file, no others"

    for name in config["heads"]:
        rec = by_head[name]
        assert set(rec) == {"layer", "head", *metrics}
        assert isinstance(rec["layer"], int) and isinstance(rec["head"], int)
        assert 0 <= rec["layer"] < config["n_layers"] and 0 <= rec["head"] < config["n_heads"]
        where = f"heads/{name}.json"
        raw = (tree / "heads" / f"{name}.json").read_text()
        head = json.loads(raw)
        check(head, HEAD, where)
        _canonical(head, where)
        assert (head["id"], head["layer"], head["head"]) == (name, rec["layer"], rec["head"])
        assert head["statistics"] == {m: rec[m] for m in metrics}

        if "histogram" in head:
            edges, counts = head["histogram"]["bin_edges"], head["histogram"]["counts"]
            assert len(counts) == len(edges) - 1 and edges[0] == 0.0 and edges[-1] == 1.0
            assert all(a < b for a, b in zip(edges, edges[1:], strict=False))
            assert all(c >= 0 for c in counts)
            if n_sequences is not None:
                assert sum(counts) == n_sequences

        # a query spends at most all its attention; a key can receive more than 1 in total
        for key, most in (("top_query_tokens", 1.0), ("top_key_tokens", math.inf)):
            for row in head[key]:
                assert 0.0 <= row["mass"] <= most and row["count"] >= 1, (where, key, row)

        deciles = head["deciles"]
        intervals = [d["interval"] for d in deciles]
        assert all(len(i) == 2 and i[0] < i[1] for i in intervals), (where, intervals)
        assert intervals[0][1] == 1.0 and intervals[-1][0] == 0.0, "deciles cover [0, 1]"
        for upper, lower in zip(intervals, intervals[1:], strict=False):
            assert lower[1] == upper[0], f"{where}: deciles not contiguous, highest first"
        for d in deciles:
            lo, hi = d["interval"]
            for seq in d["sequences"]:
                n = len(seq["tokens"])
                assert lo <= seq["max_attention"] <= hi, (where, lo, hi, seq["max_attention"])
                starts = seq["doc_starts"]
                assert starts == sorted(starts) and all(0 <= s < n for s in starts)
                assert seq["sparse_attention"], "a kept sequence has some attention"
                for triple in seq["sparse_attention"]:
                    assert len(triple) == 3, (where, triple)
                    q, k, w = triple
                    assert isinstance(q, int) and isinstance(k, int), (where, triple)
                    assert 0 <= k <= q < n, (where, triple, n)
                    assert 0.0 <= w <= 1.0, (where, triple)
    for f in ("config.json", "scatter_data.json"):
        _canonical(read_json(tree / f), f)
    return config


# ----------------------------------------------------------------------------- a real run


def test_export_matches_the_format(run, tree):
    config = validate_tree(tree, n_sequences=N_SEQUENCES)
    m = open_run(run).metrics
    assert len(config["heads"]) == len(m) == 12
    assert [x["name"] for x in config["metrics"]] == list(m.columns[3:])
    assert config["model"]["architecture"] == "llama"
    assert config["precompute"]["sequences"] == N_SEQUENCES
    # values are the run's, rounded to 6 significant digits
    rec = read_json(tree / "scatter_data.json")[5]
    row = m[(m.layer == rec["layer"]) & (m["head"] == rec["head"])].iloc[0]
    for name in m.columns[3:]:
        assert rec[name] == pytest.approx(row[name], rel=1e-5, abs=1e-12)
    # token strings come from vocab.json; sparse patterns are the run's
    vocab = read_json(run / "vocab.json")
    payload = open_run(run).head("L1H2")
    ex = payload["examples"][0]
    exported = [
        s
        for d in read_json(tree / "heads" / "L1H2.json")["deciles"]
        for s in d["sequences"]
        if s["sequence_index"] == ex["sequence"]
    ][0]
    assert exported["tokens"] == [vocab[str(t)] for t in ex["tokens"]]
    assert exported["sparse_attention"] == ex["sparse"]


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
    assert (r2.metrics[["layer", "head", "name"]] == r1.metrics[["layer", "head", "name"]]).all(
        axis=None
    )
    for name in r1.metrics.columns[3:]:
        assert r2.metrics[name].tolist() == pytest.approx(r1.metrics[name].tolist(), rel=1e-5)
    assert r2.metric_docs == r1.metric_docs

    vocab2 = read_json(run2 / "vocab.json")
    assert list(vocab2.values()) == sorted(vocab2.values()), "ids in sorted string order"
    vocab1 = read_json(run / "vocab.json")
    for name in ("L0H0", "L1H2", "L2H3"):
        p1, p2 = r1.head(name), r2.head(name)
        assert [(b["lo"], b["hi"], b["examples"]) for b in p2["buckets"]] == [
            (b["lo"], b["hi"], b["examples"]) for b in p1["buckets"]
        ]
        assert p2["histogram"] == p1["histogram"]
        assert p2["pca"] == {} and p2["similar"] == [] and p2["curves"] == {}
        assert [(r["token"], r["mass"], r["count"]) for r in p2["top_query_tokens"]] == [
            (r["token"], r["mass"], r["count"]) for r in p1["top_query_tokens"]
        ]
        assert all(vocab2[str(r["id"])] == r["token"] for r in p2["top_key_tokens"])
        for e1, e2 in zip(p1["examples"], p2["examples"], strict=True):
            assert e2["sequence"] == e1["sequence"] and e2["sparse"] == e1["sparse"]
            assert [vocab2[str(t)] for t in e2["tokens"]] == [vocab1[str(t)] for t in e1["tokens"]]
            # derived from the sparse pattern: never above the run's maxima (stored to 0.01)
            assert len(e2["max_as_query"]) == len(e2["max_as_key"]) == len(e2["tokens"])
            for derived, exact in (("max_as_query", "max_as_query"), ("max_as_key", "max_as_key")):
                assert all(
                    d <= x + 0.005 + 1e-9 for d, x in zip(e2[derived], e1[exact], strict=True)
                ), derived
            assert max(e2["max_as_query"]) == pytest.approx(max(e1["max_as_query"]), abs=0.006)


# ------------------------------------------------------------------- hand-written trees


def _minimal_files() -> dict[str, object]:
    """A small tree the way a published (Neuronpedia-like) export might write it: model and
    dataset as strings, metrics as names, numbers as strings, ``{l}_{h}`` file names, deciles
    lowest first with lo/hi keys, no histogram or top tokens on some heads, no sequence indices,
    no max attention, and one head's metrics only in its own file."""
    seq_a = {
        "tokens": ["<bos>", "The", " cat", " The", " cat"],
        "attention": [["0", "0", "1"], [1, 0, 0.9], [2, 1, 0.8], [3, 0, 0.5], [4, 2, "0.75"]],
    }
    seq_b = {"tokens": ["<bos>", "a", "b"], "attention": [[0, 0, 1.0], [1, 1, 0.3], [2, 0, 0.9]]}

    def head(layer, h, *, hist=True, top=True, stats=None):
        d = {
            "layer": layer,
            "head": str(h),
            "statistics": stats or {},
            "deciles": [
                {"lo": 0.0, "hi": 0.5, "sequences": [copy.deepcopy(seq_b)]},
                {"lo": "0.5", "hi": "1", "sequences": [copy.deepcopy(seq_a)]},
            ],
        }
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


def test_import_a_hand_written_tree(tmp_path):
    tree = _write_tree(tmp_path / "np", _minimal_files())
    out = import_headvis(tree, tmp_path / "run")
    run = open_run(out)
    m = run.metrics
    assert list(m.columns) == ["layer", "head", "name", "prev_token_score", "induction_score"]
    assert m["name"].tolist() == ["L0H0", "L0H1", "L1H0", "L1H1"]
    assert m["prev_token_score"].tolist() == [0.9, 0.2, 0.3, 0.05]
    assert m["induction_score"].tolist() == [0.1, 0.7, 0.4, 0.95]
    assert run.metric_docs == {"prev_token_score": "", "induction_score": "copy"}
    assert run.manifest["model"] == {"name": "gpt2-small", "n_layers": 2, "n_heads": 2}
    assert run.manifest["dataset"] == {"name": "openwebtext"}
    assert run.manifest["config"] == {"imported_from": str(tree)}
    metrics_json = read_json(out / "metrics.json")
    assert metrics_json["rows"][3] == [1, 1, 0.05, 0.95]

    vocab = read_json(out / "vocab.json")
    strings = sorted(["<bos>", "The", " cat", " The", "a", "b"])
    assert vocab == {str(i): s for i, s in enumerate(strings)}
    ids = {s: int(i) for i, s in vocab.items()}
    p = run.head("L0H0")
    assert [(b["lo"], b["hi"], b["examples"]) for b in p["buckets"]] == [
        (0.5, 1.0, [0]),
        (0.0, 0.5, [1]),
    ]
    a, b = p["examples"]
    assert a["tokens"] == [ids[t] for t in ["<bos>", "The", " cat", " The", " cat"]]
    assert a["sparse"] == [[0, 0, 1.0], [1, 0, 0.9], [2, 1, 0.8], [3, 0, 0.5], [4, 2, 0.75]]
    assert a["max_attention"] == 0.8  # derived: queries >= 1, keys 1..q
    assert a["max_as_query"] == [0.0, 0.0, 0.8, 0.0, 0.75]
    assert a["max_as_key"] == [0.9, 0.8, 0.75, 0.0, 0.0]
    assert a["doc_starts"] == [] and b["doc_starts"] == []
    assert (a["sequence"], b["sequence"]) == (0, 1), "numbered by first appearance"
    assert run.head("L1H1")["examples"][0]["sequence"] == 0, "same tokens, same number"
    assert p["histogram"] == {"edges": [0.0, 0.5, 1.0], "counts": [1, 1]}
    assert p["top_query_tokens"] == [{"token": " cat", "id": ids[" cat"], "mass": 0.8, "count": 2}]
    assert "histogram" not in run.head("L0H1")
    assert run.head("L1H0")["top_query_tokens"] == []

    # the imported run exports as a valid tree
    validate_tree(export_headvis(out, tmp_path / "tree"))


def test_import_finds_metrics_when_config_lists_none(tmp_path):
    files = _minimal_files()
    del files["config.json"]["metrics"]
    run = open_run(import_headvis(_write_tree(tmp_path / "np", files), tmp_path / "run"))
    assert list(run.metrics.columns[3:]) == ["induction_score", "prev_token_score"]


def test_import_replaces_an_earlier_import_but_nothing_else(tmp_path):
    tree = _write_tree(tmp_path / "np", _minimal_files())
    out = import_headvis(tree, tmp_path / "run")
    import_headvis(tree, out)
    assert open_run(out).metrics.shape == (4, 5)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a run imported from HeadVis"):
        import_headvis(tree, other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def _break(files: dict, how: str) -> None:
    seq = files["heads/0_1.json"]["deciles"][1]["sequences"][0]
    if how == "no config":
        del files["config.json"]
    elif how == "not json":
        files["heads/0_1.json"] = '{"layer": 0, "head": 1, "deciles": ['
    elif how == "query out of range":
        seq["attention"][2] = [5, 1, 0.5]
    elif how == "key out of range":
        seq["attention"][2] = [2, -1, 0.5]
    elif how == "key after query":
        seq["attention"][2] = [2, 3, 0.5]
    elif how == "weight above 1":
        seq["attention"][2] = [2, 1, 1.5]
    elif how == "not a triple":
        seq["attention"][2] = [2, 1]
    elif how == "bad number":
        seq["attention"][2] = [2, 1, "lots"]
    elif how == "token not a string":
        seq["tokens"][1] = 17
    elif how == "missing head file":
        del files["heads/0_1.json"]
    elif how == "missing metric":
        del files["scatter_data.json"][1]["induction_score"]
    elif how == "bad interval":
        files["heads/0_1.json"]["deciles"][0]["hi"] = 1.5
    elif how == "histogram counts":
        files["heads/0_1.json"]["histogram"] = {"bin_edges": [0, 0.5, 1], "counts": [1]}
    elif how == "wrong head in file":
        files["heads/0_1.json"]["layer"] = 1
    elif how == "head outside model":
        files["config.json"]["heads"].append("L5H0")
    else:
        raise AssertionError(how)


MALFORMED = {
    "no config": r"np: no config\.json",
    "not json": r"heads/0_1\.json: not valid JSON",
    "query out of range": r"0_1\.json at deciles\[1\]\.sequences\[0\]\.attention\[2\]: query position 5 is outside",
    "key out of range": r"0_1\.json at .*attention\[2\]: key position -1 is outside",
    "key after query": r"0_1\.json at .*attention\[2\]: key position 3 comes after query position 2",
    "weight above 1": r"0_1\.json at .*attention\[2\]: attention weight 1\.5 is outside \[0, 1\]",
    "not a triple": r"0_1\.json at .*attention\[2\]: expected a \[query, key, weight\] triple",
    "bad number": r"0_1\.json at .*attention\[2\]\[2\]: expected a number, got 'lots'",
    "token not a string": r"0_1\.json at .*tokens\[1\]: expected a token string",
    "missing head file": r"head L0H1 has no file \(looked for heads/L0H1\.json and heads/0_1\.json\)",
    "missing metric": r"0_1\.json: no value for metric 'induction_score'",
    "bad interval": r"0_1\.json at deciles\[0\]: decile interval \[0\.0, 1\.5\]",
    "histogram counts": r"0_1\.json at histogram: 3 bin edges need 2 counts, not 1",
    "wrong head in file": r"0_1\.json at layer: says 1, but the file is L0H1",
    "head outside model": r"config\.json: head L5H0 is outside 2 layers x 2 heads",
}


@pytest.mark.parametrize("how", list(MALFORMED))
def test_malformed_trees_fail_clearly_and_write_nothing(tmp_path, how):
    files = _minimal_files()
    _break(files, how)
    tree = _write_tree(tmp_path / "np", files)
    with pytest.raises(ValueError, match=MALFORMED[how]):
        import_headvis(tree, tmp_path / "out" / "run")
    assert not (tmp_path / "out" / "run").exists()
    leftovers = list((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert leftovers == [], "no temporary directory left behind"
