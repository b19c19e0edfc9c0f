"""Feature pages on the hand-set induction model (tests/planted.py), whose circuit is known:
L0H0 copies the previous token's code into a slot, L1H0's query reads the current token's code
and its key reads the slot. Layer 1's planted dictionary has a "current token is X" feature
(read by L1H0's query) and a "previous token was X" feature (read by L1H0's key, written by
L0H0)."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from headscope.analysis.session import Session
from headscope.dictionaries.basis import DictionarySet
from headscope.dictionaries.feature_page import TextSource, feature_page
from headscope.dictionaries.sae import SAE, SAEConfig, save_sae
from headscope.errors import InputError
from headscope.operations.table import OPERATIONS, Context
from headscope.precompute.config import PrecomputeConfig
from headscope.precompute.sequences import iter_sequences
from headscope.server import create_app
from tests.planted import CODE, POS, induction_adapter

X = "q"  # the planted token


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    ad = induction_adapter()
    d = ad.spec.d_model
    x_id = ad.tokens.encode(X)[-1] if hasattr(ad.tokens, "encode") else None
    x_id = int(Session(ad).state(X).ids[0, -1]) if x_id is None else x_id
    code = ad.embed_matrix()[x_id, :CODE].float()  # [64] +-1, norm 8
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(d_in=d, d_sae=8, architecture="standard", site="resid", layers=(1,)))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(8, d, generator=g) * 0.01)
        sae.W_enc.zero_()
        sae.b_enc.fill_(-100.0)  # features 2.. never fire
        sae.b_dec.zero_()
        sae.W_enc[:CODE, 0] = code / 8  # current token is X: 8 there, ~N(0, 1) elsewhere
        sae.W_dec[0].zero_()
        sae.W_dec[0, :CODE] = code / 8
        sae.W_enc[CODE + POS :, 1] = code / 8  # previous token was X (L0H0's slot)
        sae.W_dec[1].zero_()
        sae.W_dec[1, CODE + POS :] = code / 8
        sae.b_enc[:2] = -4.0
    save_sae(sae, root / "resid_L1")
    (root / "resid_L1" / "features.json").write_text(
        json.dumps({"0": {"label": "the token q", "density": 0.1}})
    )
    data = root / "data.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"the q of qua{i} is quiet, aq qb" * 2}) + "\n")
    return ad, DictionarySet(root), data


def test_a_planted_features_page(setup):
    ad, dicts, data = setup
    page = feature_page(ad, dicts, 1, 0, n_tokens=512, data=data, seq_len=24, top=5)
    assert page.feature == "sae:L1/0" and page.label == "the token q"
    assert page.n_tokens >= 512 and 0 < page.density < 0.5
    assert len(page.contexts) == 5
    for c in page.contexts:  # it fires on q and only on q
        assert c.tokens[c.at] == X and c.acts[c.at] == pytest.approx(c.activation)
        assert c.activation == pytest.approx(4.0, abs=1e-3)  # 8 - 4
        assert all(a == 0 or t == X for t, a in zip(c.tokens, c.acts, strict=True))
    assert sum(page.histogram.counts) == round(page.density * page.n_tokens)
    # L1H0's query is the current token's code; the feature's row (activation 4 times code/8)
    # is half of it
    assert page.query_readers[0].head == "L1H0"
    assert page.query_readers[0].share == pytest.approx(0.5, abs=0.02)
    assert page.writers == [] or page.writers[0].head != "L0H0"  # nothing copies the token itself
    assert [vw.side for vw in page.near] == ["query", "key"]
    assert page.near[0].head == "L1H0"


def test_the_previous_token_feature_is_written_by_the_previous_token_head(setup):
    ad, dicts, data = setup
    page = feature_page(ad, dicts, 1, 1, n_tokens=512, data=data, seq_len=24, top=5)
    for c in page.contexts:  # fires on the token after q
        assert c.tokens[c.at - 1] == X
    assert page.key_readers[0].head == "L1H0"
    assert page.key_readers[0].share > 0.3
    assert all(r.share < 0.05 for r in page.key_readers[1:])  # nothing else reads the slot
    assert page.writers[0].head == "L0H0"
    # only L0H0 writes the slot the feature reads: pre-activation = its write + b_enc (-4)
    w = page.writers[0].value
    assert w > 4 and page.writers[0].share == pytest.approx(w / (w - 4.0), rel=1e-4)
    assert len(page.writers) == 1
    assert page.label is None and page.card is None


def test_the_operation_and_its_errors(setup):
    ad, dicts, data = setup
    op = next(o for o in OPERATIONS if o.name == "feature")
    ctx = Context(Session(ad), dicts)
    with pytest.raises(InputError, match="out of range"):
        op.run(ctx, op.request(layer=1, feature=99))
    with pytest.raises(InputError, match="no residual dictionary for layer 0"):
        op.run(ctx, op.request(layer=0, feature=0))
    text = op.text(feature_page(ad, dicts, 1, 1, n_tokens=256, data=data, seq_len=24), None)
    assert "written by" in text and "L0H0" in text


@pytest.fixture
def served_run(tmp_path):
    """A run folder whose manifest names data unlike the default text: another text field, 5
    sequences of 20 tokens."""
    other = tmp_path / "run_data.jsonl"
    with open(other, "w") as f:
        for i in range(40):
            f.write(json.dumps({"body": f"zz q{i % 7} yy aq {i} q." * 2}) + "\n")
    run = tmp_path / "myrun"
    run.mkdir()
    cfg = PrecomputeConfig(model="x", data=str(other), text_field="body", sequences=5, seq_len=20)
    manifest = {
        "config": cfg.to_dict(),
        "dataset": {"path": str(other)},
        "tokens": {"sequences": 5, "tokens": 100},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run, other


def test_a_served_runs_data(setup, served_run):
    ad, dicts, _ = setup
    run, other = served_run
    source = TextSource.of_run(run)
    assert source is not None and source.text_field == "body" and source.seq_len == 20
    page = feature_page(ad, dicts, 1, 0, n_tokens=512, top=5, source=source)
    assert page.from_run and page.data == str(other) and page.skipped_sequences == 0
    assert page.data_name == "run myrun's data (run_data.jsonl, 5 sequences of 20 tokens)"
    assert page.n_tokens == 5 * 19  # the run's 5 sequences and no more, BOS left out
    seqs = list(iter_sequences(ad.tokens, other, 20, text_field="body", limit=5))
    assert page.contexts
    for c in page.contexts:  # every context is the run's tokens at its (sequence, position)
        ids = seqs[c.sequence].ids
        lo = c.position - c.at
        assert c.tokens == [ad.tokens.display(int(t)) for t in ids[lo : lo + len(c.tokens)]]
        assert c.tokens[c.at] == X

    # the server reads the run it serves; without a run, the default text
    client = TestClient(create_app(run, Session(ad), dictionaries=dicts))
    got = client.post("/api/feature", json={"layer": 1, "feature": 0, "n_tokens": 256}).json()
    assert got["from_run"] and got["data_name"].startswith("run myrun's data")
    assert got["n_tokens"] == 5 * 19
    plain = feature_page(ad, dicts, 1, 0, n_tokens=256, data=setup[2], seq_len=24)
    assert not plain.from_run and plain.data_name == "data.jsonl (24-token sequences)"


def test_a_run_without_a_precompute_config_falls_back(tmp_path):
    """A run not made by a precompute (a HeadVis import) or without a manifest: the default text."""
    assert TextSource.of_run(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    assert TextSource.of_run(tmp_path) is None
