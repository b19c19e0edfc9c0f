"""Ablations wired into a run, the CLI and the live operation: on the planted induction model
the ablation column ranks the previous-token head and the induction head first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from headscope.analysis.ablate_live import ablate
from headscope.analysis.session import Session
from headscope.cli import main
from headscope.errors import DataError, InputError
from headscope.files import read_json
from headscope.store import open_run
from headscope.store.columns import add_head_columns
from tests.planted import induction_model
from tests.tiny_models import build_tiny_run, tiny_tokenizer


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("planted-run")
    model = induction_model()
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    return build_tiny_run(root, model=root / "model", seq_len=31, probe_length=12)


def test_ablate_column_ranks_the_circuit_first(planted_run: Path, capsys) -> None:
    rc = main(
        [
            "ablate",
            str(planted_run),
            "--task",
            "repeated",
            "--seq-len",
            "31",
            "--sequences",
            "16",
            "--add-column",
        ]
    )
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, captured.err
    assert "added zero_ablation_loss_delta_repeated" in out
    col = "zero_ablation_loss_delta_repeated"
    m = open_run(planted_run).metrics.set_index("name")[col]
    assert list(m.sort_values(ascending=False).index[:2]) == ["L0H0", "L1H0"], m
    assert m["L0H1"] == pytest.approx(0.0, abs=1e-6)
    js = read_json(planted_run / "metrics.json")
    assert js["columns"][-1] == col and "loss rises" in js["docs"][col]
    i = js["columns"].index(col)
    by_head = {f"L{r[0]}H{r[1]}": r[i] for r in js["rows"]}
    assert by_head["L0H0"] == pytest.approx(m["L0H0"])
    assert read_json(planted_run / "heads" / "L0H0.json")["metrics"][col] == pytest.approx(
        m["L0H0"]
    )
    # a second run replaces the column instead of adding another
    assert main(["ablate", str(planted_run), "--task", "repeated", "--seq-len", "31",
                 "--sequences", "4", "--heads", "L1H0", "--add-column", "--json"]) == 0  # fmt: skip
    payload = json.loads(capsys.readouterr().out.splitlines()[0])
    assert [a["head"] for a in payload["heads"]] == ["L1H0"]
    js = read_json(planted_run / "metrics.json")
    assert js["columns"].count(col) == 1
    i = js["columns"].index(col)
    assert {f"L{r[0]}H{r[1]}": r[i] for r in js["rows"]}["L0H0"] is None


def test_ablate_on_the_runs_dataset(planted_run: Path, capsys) -> None:
    assert main(["ablate", str(planted_run), "--sequences", "2", "--method", "mean"]) == 0
    out = capsys.readouterr().out
    assert "mean ablation of 4 head(s) in" in out and "2 sequence(s) x 31 tokens" in out


def test_live_ablate_repeated_and_text() -> None:
    from headscope.model import ModelAdapter

    sess = Session(ModelAdapter(induction_model(), tiny_tokenizer(), name="ind", source="test"))
    rep = ablate(sess, task="repeated", n_sequences=8, half_len=15)
    assert [a.head for a in rep.ranked()[:2]] == ["L0H0", "L1H0"]
    text = ablate(sess, "qwertyuiopqwertyuiop", ["L0H0", "L1H1"], positions=[-3, -2])
    assert text.positions == [18, 19] and text.n_predictions == 2
    assert text.heads[0].delta > 1.0 and abs(text.heads[1].delta) < 1e-6
    with pytest.raises(InputError, match="repeated task"):
        ablate(sess, "abc", method="resample")
    with pytest.raises(InputError, match="give a text"):
        ablate(sess)
    with pytest.raises(InputError, match="give no text"):
        ablate(sess, "abc", task="repeated")


def test_cli_errors(planted_run: Path, capsys) -> None:
    assert main(["ablate", "--add-column", "--model", "x"]) == 2
    assert "needs a RUN" in capsys.readouterr().err
    with pytest.raises(DataError, match="not in the run"):
        add_head_columns(planted_run, {"c": {"L9H9": 1.0}}, {})
