"""The CLI's live commands, generated from the operation table: text output, --json, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from headscope.cli import main
from headscope.dictionaries.sae import SAE, SAEConfig, save_sae
from headscope.operations import OPERATIONS
from tests.tiny_models import save_tiny

TEXT = "abcab cabc aab. The quick brown fox; the quick brown"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny("llama", root / "model")
    for layer in range(3):
        cfg = SAEConfig(d_in=32, d_sae=16, architecture="topk", k=4, site="resid", layers=(layer,))
        save_sae(SAE(cfg, generator=torch.Generator().manual_seed(layer)), root / f"d/L{layer}")
    (root / "q.txt").write_text("the [[cat]] sat\na [[dog]] ran\n")
    (root / "k.txt").write_text("one [[cat]] here\nsome [[dog]] there\n")
    prompt = {"text": "the cat sat on the mat and the cat", "key": "sat", "candidates": ["mat"]}
    (root / "p.jsonl").write_text(json.dumps(prompt) + "\n")
    return root, str(model)


def _args(root, model) -> dict[str, list[str]]:
    """One working command line per live operation (the test fails if an operation has none)."""
    pair = ["--text", TEXT, "--query", "12", "--key", "4"]
    return {
        "tokenize": ["--text", "hi there"],
        "attend": ["--text", "hi there", "--head", "L1H2", "L0H0"],
        "attend-summary": ["--text", TEXT, "--head", "L1H2", "--top", "2"],
        "rank-heads": [*pair, "--top", "3"],
        "attribute qk": [*pair, "--head", "L2H1"],
        "attribute ov": [*pair, "--head", "L2H1"],
        "composition": [*pair, "--head", "L2H1"],
        "sweep": ["--template", "x {} y", "--range", "10:30:5", "--head", "L1H2", "--head", "L2H0"],
        "geometry": ["--queries", str(root / "q.txt"), "--keys", str(root / "k.txt"), "--head", "L1H0"],
        "intervene": [*pair, "--head", "L2H1", "--component", "L1H0", "--side", "key", "--at", "4"],
        "virtual-weights": ["--dictionaries", str(root / "d"), "--head", "L1H0", "--feature", "3"],
        "feature": ["--dictionaries", str(root / "d"), "--layer", "1", "--feature", "3", "--n-tokens", "256"],
        "head-loadings": [
            "--dictionaries", str(root / "d"), "--text", TEXT, "--layer", "0",
            "--source-feature", "1", "--source-pos", "4", "--target-feature", "2", "--target-pos", "12",
        ],
        "edge-graph": [
            "--dictionaries", str(root / "d"), "--text", TEXT, "--layer", "2", "--position", "12",
            "--depth", "2", "--top", "3",
        ],
        "describe-text": ["--text", TEXT, "--head", "L1H2", "--rules", "- {name: prev, distance: 1}"],
        "knockout": [
            "--text", TEXT, "--head", "L2H1", "--query", "12", "--keys", "4", "3", "--rule", "key: {text: c}",
        ],
        "intervention-curve": [
            *pair, "--head", "L2H1", "--component", "L1H0", "--side", "key", "--scale", "0", "1", "2",
        ],
        "prompt-set": ["--prompts", str(root / "p.jsonl"), "--head", "L1H0", "L2H1"],
        # the CLI's own ablate command (the operation serves /api/ablate)
        "ablate": ["--task", "repeated", "--sequences", "2", "--seq-len", "21", "--heads", "L0H0", "L1H1"],
        # the CLI's own long-prefix command (the operation serves /api/long-prefix)
        "long-prefix": ["--prefix-lengths", "1", "2", "--sequences", "2", "--seq-len", "16"],
    }  # fmt: skip


# what each command's text must say: a word that names its content, checked in the output
TEXT_HAS = {
    "tokenize": "'<bos>'  (id",
    "attend": "L1H2: the last token attends to",
    "attend-summary": "L1H2 on ",
    "rank-heads": "query 12",
    "attribute qk": "score (model)",
    "attribute ov": "promotes:",
    "composition": "K-composition",
    "sweep": "L2H0",
    "geometry": "mean own-pair cosine",
    "intervene": "score",
    "virtual-weights": "same side:",
    "feature": "read on the query side",
    "head-loadings": "share",
    "edge-graph": "layer 0 -> 1:",
    "describe-text": "all rules",
    "knockout": "where the attention goes",
    "intervention-curve": "L2H1 attn",
    "prompt-set": "heads by accuracy",
    "ablate": "zero ablation of 2 head(s)",
    "long-prefix": "long-prefix induction test of",
}


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: op.name)
def test_every_live_command_prints_text_and_json(env, op, capsys):
    root, model = env
    argv = [*op.name.split(), "--model", model, *_args(root, model)[op.name]]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert TEXT_HAS[op.name] in out, out
    assert "Traceback" not in out
    assert main([*argv, "--json"]) == 0
    op.result.model_validate(json.loads(capsys.readouterr().out))


def test_text_rounds_numbers_and_sweep_ranges_exclude_the_stop(env, capsys):
    root, model = env
    argv = ["sweep", "--model", model, "--template", "x {} y", "--range", "10:30:5"]
    assert main([*argv, "--head", "L1H2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["values"] == ["10", "15", "20", "25"]
    argv = ["intervene", "--model", model, "--text", TEXT, "--head", "L2H1"]
    assert main([*argv, "--component", "L1H0", "--side", "query", "--scale", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and "--key K" in out  # no key given: says how to get one
    for number in out.replace(",", " ").split():
        if number.lstrip("+-").replace(".", "", 1).isdigit() and "." in number:
            assert len(number.split(".")[1]) <= 5, number


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["attribute", "qk", "--text", TEXT, "--head", "L9H0", "--query", "3", "--key", "1"], "L9H0"),
        (["attribute", "qk", "--text", TEXT, "--head", "L1H0", "--query", "3", "--key", "5"], "causal"),
        (["attribute", "qk", "--text", TEXT, "--head", "L1H0", "--query", "3", "--key", "1", "--basis", "sae"], "no dictionaries"),
        (["sweep", "--template", "no slot", "--range", "1:3", "--head", "L0H0"], "{}"),
        (["sweep", "--template", "x {}", "--range", "5:1", "--head", "L0H0"], "empty"),
        (["intervene", "--text", TEXT, "--head", "L1H0", "--component", "L7.mlp", "--side", "key"], "upstream"),
        (["intervene", "--text", TEXT, "--head", "L1H0", "--component", "nope", "--side", "key"], "unknown component"),
        (["geometry", "--queries", "/nonexistent.txt", "--keys", "/nonexistent.txt"], "cannot read"),
        (["tokenize", "--text", "x" * 5000], "limit"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_code_2(env, argv, needle, capsys):
    _, model = env
    assert main([*argv, "--model", model]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err, err


def test_compare_prints_rank_correlations(tiny_run, tmp_path, capsys):
    from headscope.store import open_run

    run = open_run(tiny_run())
    m = run.metrics
    n_layers, n_heads = int(m["layer"].max()) + 1, int(m["head"].max()) + 1

    def grid(col: str, sign: float) -> list[list[float]]:
        by = {(r.layer, r.head): sign * getattr(r, col) for r in m.itertuples()}
        return [[by[(layer, h)] for h in range(n_heads)] for layer in range(n_layers)]

    summary = {
        "config": {"num_hidden_layers": n_layers, "num_attention_heads": n_heads},
        "metrics": {
            "prev_token_score": grid("prev_token_score", 1.0),
            "pattern_entropy": grid("pattern_entropy", -1.0),
        },
    }
    (tmp_path / "s.json").write_text(json.dumps(summary))
    assert main(["compare", str(run.path), str(tmp_path / "s.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rho = {c["metric"]: c["spearman"] for c in out["metrics"]}
    assert rho["prev_token_score"] == pytest.approx(1.0) and rho[
        "pattern_entropy"
    ] == pytest.approx(-1.0)
    copy = shutil.copytree(run.path, tmp_path / "run")
    assert main(["compare", str(copy), str(tmp_path / "s.json"), "--add-columns"]) == 0
    assert "ref:prev_token_score" in capsys.readouterr().out
    table = json.loads((copy / "metrics.json").read_text())
    col = table["columns"].index("ref:prev_token_score")
    own = table["columns"].index("prev_token_score")
    assert all(r[col] == pytest.approx(r[own], abs=1e-6) for r in table["rows"])
    assert "ref:prev_token_score" in open_run(copy).metrics.columns
    assert main(["compare", str(copy), str(tmp_path / "s.json"), "--add-columns"]) == 0  # again
    assert json.loads((copy / "metrics.json").read_text())["columns"] == table["columns"]
    (tmp_path / "bad.json").write_text("{")
    assert main(["compare", str(run.path), str(tmp_path / "bad.json")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_feature_reads_a_runs_data(env, tmp_path, capsys):
    """``headscope feature --run RUN``: the run's data, as the server does for the run it serves."""
    root, model = env
    data = tmp_path / "other.jsonl"
    data.write_text("".join(json.dumps({"body": f"zz q{i} yy {i}."}) + "\n" for i in range(30)))
    run = tmp_path / "myrun"
    run.mkdir()
    cfg = {"model": model, "data": str(data), "text_field": "body", "seq_len": 16, "sequences": 4}
    (run / "manifest.json").write_text(json.dumps({"config": cfg}))
    argv = ["feature", "--model", model, "--dictionaries", str(root / "d"), "--layer", "1"]
    assert main([*argv, "--feature", "3", "--n-tokens", "256", "--run", str(run), "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert page["from_run"] and page["data_name"].startswith("run myrun's data (other.jsonl")
    assert main([*argv, "--feature", "3", "--run", str(tmp_path / "nope")]) == 2
    assert "no run folder" in capsys.readouterr().err
